"""Stage 1 end to end on CPU: loss falls, resume is exact, torchrun equals one process,
gradient accumulation equals a big batch, checkpoints and bad input fail clearly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import train_pretrain  # noqa: E402
from data.loader import MixtureLoader, parse_mixture  # noqa: E402

from conftest import TINY  # noqa: E402
from error_helpers import assert_clean_error


def run(args, capsys=None):
    train_pretrain.main([str(a) for a in args])


def metrics(out, key="loss"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r[key] for r in rows if key in r}


def test_loss_decreases_and_checkpoint_is_complete(data_dirs, tmp_path):
    out = tmp_path / "run"
    run(["--data", data_dirs[0], "--out", out, "--max-steps", 40, "--lr", 3e-3, "--log-every", 1,
         "--eval-every", 20, *TINY])
    losses = metrics(out)
    assert len(losses) == 40
    assert losses[1] == pytest.approx(np.log(512), abs=0.1)  # uniform at init
    assert np.mean([losses[s] for s in range(36, 41)]) < losses[1] - 0.6
    val = metrics(out, "val_loss")
    assert val[40] < val[20] and 0 < metrics(out, "val_bpb")[40] < 10
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json", "metrics.jsonl",
                 "state/trainer.json", "state/optimizer.pt", "state/rng_rank0.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "pretrain" and config["step"] == 40 and config["model"]["d_model"] == 32


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(data_dirs, tmp_path):
    common = ["--data", f"a={data_dirs[0]}:0.6,b={data_dirs[1]}:0.4", "--schedule-steps", 8, "--log-every", 1,
              "--eval-every", 4, *TINY]
    full, part = tmp_path / "full", tmp_path / "part"
    run(["--out", full, "--max-steps", 8, *common])
    run(["--out", part, "--max-steps", 4, *common])
    with open(part / "metrics.jsonl", "a") as f:  # logged after the last save by a run that then died
        f.write(json.dumps({"step": 6, "loss": 123.0}) + "\n")
    run(["--out", part, "--max-steps", 8, "--resume", *common])
    a, b = metrics(full), metrics(part)
    steps = [json.loads(line)["step"] for line in open(part / "metrics.jsonl") if '"loss"' in line]
    assert steps == list(range(1, 9))  # the orphan record is gone, every step logged once
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    assert metrics(part, "val_loss")[8] == pytest.approx(metrics(full, "val_loss")[8], abs=1e-6)
    from safetensors.torch import load_file
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_gradient_accumulation_equals_one_big_batch(data_dirs, tmp_path):
    big, acc = tmp_path / "big", tmp_path / "acc"
    base = [a for a in TINY if a not in ("--batch-size", "4")]
    args = ["--data", data_dirs[0], "--max-steps", 4, "--log-every", 1, "--eval-every", 100, *base]
    run(["--out", big, "--batch-size", 8, *args])
    run(["--out", acc, "--batch-size", 2, "--global-batch-tokens", 8 * 32, *args])
    a, b = metrics(big), metrics(acc)
    for step in range(1, 5):
        assert b[step] == pytest.approx(a[step], abs=2e-5), step


def test_torchrun_two_processes_match_one_process(data_dirs, tmp_path):
    """FSDP2 over gloo with 2 x 2 rows per step == 1 process with 4 rows per step."""
    one, two = tmp_path / "one", tmp_path / "two"
    base = [a for a in TINY if a not in ("--batch-size", "4")]
    args = ["--data", data_dirs[0], "--max-steps", 4, "--log-every", 1, "--eval-every", 4, *base]
    run(["--out", one, "--batch-size", 4, *args])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_pretrain.py", "--out", str(two), "--batch-size", "2", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(one), metrics(two)
    for step in range(1, 5):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    assert metrics(two, "val_loss")[4] == pytest.approx(metrics(one, "val_loss")[4], abs=1e-5)
    from safetensors.torch import load_file
    wa, wb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:  # the sharded run saved whole, unsharded tensors
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_mixture_weights_are_respected_and_ranks_are_disjoint(data_dirs):
    sources = parse_mixture(f"a={data_dirs[0]}:0.75,b={data_dirs[1]}:0.25")
    loader = MixtureLoader(sources, seq_len=32, global_rows=16, seed=3)
    counts = np.zeros(2)
    for step in range(300):
        counts += np.bincount(loader.source_choices(step), minlength=2)
    assert counts[0] / counts.sum() == pytest.approx(0.75, abs=0.02)
    # two ranks split each global step exactly: together they see what one process sees
    single = MixtureLoader(sources, 32, 16, 0, 1, seed=3)
    ranks = [MixtureLoader(sources, 32, 16, r, 2, seed=3) for r in range(2)]
    for _ in range(5):
        x, _ = single.next_batch()
        parts = [r.next_batch()[0] for r in ranks]
        np.testing.assert_array_equal(np.concatenate(parts), x)
    # the state is the position: a restored loader continues with the same batches
    restored = MixtureLoader(sources, 32, 16, 0, 1, seed=3)
    restored.load_state_dict(json.loads(json.dumps(single.state_dict())))
    np.testing.assert_array_equal(restored.next_batch()[0], single.next_batch()[0])


def test_parse_mixture():
    assert parse_mixture("d") == [("data0", "d", 1.0)]
    assert parse_mixture("x=d1:3,y=d2:1") == [("x", "d1", 0.75), ("y", "d2", 0.25)]
    for bad in ("", "x=d:0", "x=d1,x=d2"):
        with pytest.raises(ValueError):
            parse_mixture(bad)


def test_truncated_checkpoint_fails_with_a_clear_error(data_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    run(["--data", data_dirs[0], "--out", out, "--max-steps", 2, "--eval-every", 100, *TINY])
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(["--data", data_dirs[0], "--out", out, "--max-steps", 4, "--resume", *TINY])
    assert "truncated or corrupt" in assert_clean_error(capsys, e)
    import sample
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(out)])
    assert "truncated or corrupt" in assert_clean_error(capsys, e)


def test_incompatible_checkpoint_and_bad_input_fail_clearly(data_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    run(["--data", data_dirs[0], "--out", out, "--max-steps", 2, "--eval-every", 100, *TINY])
    cases = [
        ["--data", data_dirs[0], "--out", out, "--max-steps", 4, "--resume", *TINY, "--d-model", "64"],  # other shape
        ["--data", data_dirs[0], "--out", tmp_path / "empty", "--resume", *TINY],  # nothing to resume
        ["--data", str(tmp_path / "missing"), "--out", tmp_path / "x", *TINY],  # missing data
        ["--data", str(tmp_path), "--out", tmp_path / "x", *TINY],  # a directory that is not prepared data
        ["--data", data_dirs[0], "--out", tmp_path / "x", "--lr", "-1", *TINY],  # invalid value
        ["--data", data_dirs[0], "--out", tmp_path / "x", "--init", str(tmp_path / "nothing"), *TINY],
        ["--data", data_dirs[0], "--out", tmp_path / "x", "--global-batch-tokens", "100", *TINY],
    ]
    for args in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run(args)
        assert_clean_error(capsys, e)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dirs, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train_pretrain.py", "--data", data_dirs[0], "--out", str(out),
                             "--max-steps", "100000", "--log-every", "1", "--save-every", "100000", *TINY],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 3/"):
            break
        assert time.time() < deadline
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "stopped by signal" in stdout
    step = json.loads((out / "config.json").read_text())["step"]
    assert 3 <= step < 100000
    assert json.loads((out / "state" / "trainer.json").read_text())["step"] == step


def test_sample_cli(data_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    run(["--data", data_dirs[0], "--out", out, "--max-steps", 2, "--eval-every", 100, *TINY])
    import sample
    capsys.readouterr()
    sample.main(["--ckpt", str(out), "--prompt", "ROMEO.", "--num-samples", "2", "--max-new-tokens", "5",
                 "--device", "cpu"])
    text = capsys.readouterr().out
    assert text.count("--- sample") == 2 and text.count("ROMEO.") == 2
    sample.main(["--ckpt", str(out), "--prompt", "ROMEO.", "--num-samples", "1", "--max-new-tokens", "5",
                 "--temperature", "0", "--device", "cpu"])
    first = capsys.readouterr().out
    sample.main(["--ckpt", str(out), "--prompt", "ROMEO.", "--num-samples", "1", "--max-new-tokens", "5",
                 "--temperature", "0", "--device", "cpu", "--seed", "9"])
    assert capsys.readouterr().out == first  # greedy does not depend on the seed


def test_activation_checkpointing_gives_the_same_losses(data_dirs, tmp_path):
    args = ["--data", data_dirs[0], "--max-steps", 3, "--log-every", 1, "--eval-every", 100, *TINY]
    run(["--out", tmp_path / "plain", *args])
    run(["--out", tmp_path / "ckpt", "--grad-checkpointing", *args])
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")
    for step in (1, 2, 3):
        assert b[step] == pytest.approx(a[step], abs=1e-6)


def test_wandb_offline_needs_no_network_or_account(data_dirs, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"WANDB_SILENT": "true", "HOME": str(tmp_path)})  # no ~/.netrc login to fall back on
    proc = subprocess.run([sys.executable, "train_pretrain.py", "--data", data_dirs[0], "--out", str(out),
                           "--max-steps", "2", "--log-every", "1", "--eval-every", "100", "--wandb", "offline", *TINY],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert len(metrics(out)) == 2  # metrics.jsonl is written whatever wandb does


def test_nonfinite_losses_skip_the_update_then_stop(data_dirs, tmp_path, monkeypatch, capsys):
    import model as model_module
    real_forward = model_module.Transformer.forward
    calls = {"n": 0}

    def flaky_forward(self, idx, targets=None, **kw):
        out = real_forward(self, idx, targets, **kw)
        calls["n"] += 1
        if targets is not None and self.training and calls["n"] in (2, 3):
            return out * float("nan")  # steps 2 and 3 blow up
        return out

    monkeypatch.setattr(model_module.Transformer, "forward", flaky_forward)
    out = tmp_path / "run"
    run(["--data", data_dirs[0], "--out", out, "--max-steps", 5, "--log-every", 1, "--eval-every", 100, *TINY])
    text = capsys.readouterr().out
    assert "step 2: non-finite loss or gradient, update skipped (1 in a row)" in text
    assert "step 3: non-finite loss or gradient, update skipped (2 in a row)" in text
    assert sorted(metrics(out)) == [1, 4, 5]  # the skipped steps log nothing, training went on

    def always_nan(self, idx, targets=None, **kw):
        return real_forward(self, idx, targets, **kw) * float("nan")

    monkeypatch.setattr(model_module.Transformer, "forward", always_nan)
    with pytest.raises(SystemExit) as e:
        run(["--data", data_dirs[0], "--out", tmp_path / "nan", "--max-steps", 10, "--max-nonfinite", 3, *TINY])
    assert "3 non-finite steps in a row" in assert_clean_error(capsys, e)


def test_init_starts_from_the_checkpoint_weights(data_dirs, tmp_path):
    first = tmp_path / "first"
    run(["--data", data_dirs[0], "--out", first, "--max-steps", 30, "--lr", 3e-3, "--log-every", 1,
         "--eval-every", 100, *TINY])
    second = tmp_path / "second"
    run(["--data", data_dirs[0], "--out", second, "--init", first, "--max-steps", 1, "--log-every", 1,
         "--eval-every", 100, *TINY])
    # the first step of the --init run starts where the first run ended, far below log(vocab)
    assert metrics(second)[1] < metrics(first)[1] - 0.3
