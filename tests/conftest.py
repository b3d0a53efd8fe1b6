"""Shared fixtures: two small prepared corpora (one tokenizer), a tiny pretrained model, and
the main job in miniature."""
from __future__ import annotations

import gzip
import json
import os
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# A model small enough that a training step takes milliseconds on a CPU.
TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--n-kv-head", "1", "--seq-len", "32",
        "--batch-size", "4", "--eval-windows", "8", "--sample-tokens", "8", "--device", "cpu", "--dtype", "float32",
        "--warmup-steps", "2"]


@pytest.fixture(scope="session")
def data_dirs(tmp_path_factory):
    """Two small prepared sources sharing one tokenizer: a few plays, and a few others."""
    root = tmp_path_factory.mktemp("data")
    with gzip.open(os.path.join(REPO, "data", "corpus", "shakespeare.jsonl.gz"), "rt", encoding="utf-8") as f:
        works = [json.loads(line) for line in f]
    comedies = root / "comedies.jsonl"
    comedies.write_text("".join(json.dumps(w) + "\n" for w in works[:4]))
    histories = root / "histories.jsonl"
    histories.write_text("".join(json.dumps(w) + "\n" for w in works[7:10]))
    a, b = root / "a", root / "b"
    from data import prepare
    prepare.main(["--input", str(comedies), "--out", str(a), "--vocab-size", "512", "--workers", "1",
                  "--val-fraction", "0.25"])
    prepare.main(["--input", str(histories), "--out", str(b), "--tokenizer", str(a / "tokenizer.json"),
                  "--workers", "1", "--val-fraction", "0.34"])
    return str(a), str(b)



def tiny(**overrides) -> list[str]:
    """TINY with some options changed, e.g. tiny(seq_len=96)."""
    args = list(TINY)
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    return args


@pytest.fixture(scope="session")
def tiny_pretrained(data_dirs, tmp_path_factory):
    """A 1-layer model pretrained for 30 steps, with a 96-token context for chat tasks."""
    import train_pretrain
    out = tmp_path_factory.mktemp("pretrained") / "ckpt"
    args = tiny(seq_len=96)
    train_pretrain.main(["--data", data_dirs[0], "--out", str(out), "--max-steps", "30", "--lr", "3e-3",
                         "--eval-every", "100", *args])
    return str(out)


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server on a loopback port for the whole session (tests/pg_server.py):
    .url() and .new_database() give postgresql:// URLs. Skipped, with the reason, where
    PostgreSQL or psycopg is not installed (.ci/run installs both)."""
    import pg_server
    reason = pg_server.why_unavailable()
    if reason:
        pytest.skip(reason)
    server = pg_server.PostgresServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres):
    """postgresql://serve_test@127.0.0.1:PORT/serve1: a database created on the session's server."""
    return postgres.new_database()


@pytest.fixture(scope="session")
def mini_job(tmp_path_factory):
    """The main job in miniature with both rounds, half the simulated users' traffic the new
    request kind (tasks/novel.py), started twice: the first start stops after SFT (as if
    interrupted there), the second runs what is left. One run read by the pipeline, round-2
    and repeatability tests (each mini job costs most of a minute). Tests that start it
    again must leave its report as they found it."""
    from pipeline_helpers import mini_args, run_pipeline
    root = tmp_path_factory.mktemp("mini_job")
    args = mini_args(root) + ["--novel-share", "0.5"]
    first = run_pipeline(args + ["--stages", "prepare", "tasks", "pretrain", "sft"])
    second = run_pipeline(args)
    return types.SimpleNamespace(root=root, args=args, first=first, second=second)
