"""`python -m data.prepare --engine ray`: the same output, byte for byte, as `--engine local`,
with 1 and 2 workers and when a task dies mid-run; and the byte-range split of JSONL files
that lets several tasks read one file (every line in exactly one range, record ids as a
whole-file read gives them). The Ray tests share one local Ray instance with 2 CPUs."""
import gzip
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from data.sources import Piece, byte_ranges, count_lines, read_file, read_piece
from prepare_helpers import GERMAN, REPO, prose, read_json, replace_words, run_main, toxic_doc, write_jsonl

# ----------------------------------------------------------------------------- byte ranges (no Ray needed)

LINES = [
    json.dumps({"id": "a", "text": "first document, long enough to span a few small ranges"}),
    "",
    json.dumps({"id": "b", "text": "second"}),
    "{not json",
    "",
    "",
    json.dumps({"text": "no id: the record id is path:line"}),
    json.dumps({"text": "x" * 300}),  # longer than max_doc_bytes below: too_long
    '"a string, not an object"',
    json.dumps({"id": "c", "text": "caf\u00e9 \u2603 unicode"}, ensure_ascii=False),
    "   ",
]


def records_of(records):
    return [(type(r).__name__, r.id, getattr(r, "text", None), getattr(r, "reason", None)) for r in records]


def read_by_ranges(path, split_bytes, max_doc_bytes):
    ranges = byte_ranges(str(path), split_bytes)
    if ranges is None:
        return None, records_of(read_file(str(path), max_doc_bytes=max_doc_bytes))
    out, line = [], 1
    for start, end in ranges:
        out += read_piece(Piece(str(path), start, end, line), max_doc_bytes=max_doc_bytes)
        line += count_lines(str(path), start, end)[0]
    return ranges, records_of(out)


@pytest.mark.parametrize("ending", ["\n", ""], ids=["final_newline", "no_final_newline"])
def test_every_split_of_a_jsonl_file_reads_like_the_whole_file(tmp_path, ending):
    path = tmp_path / "f.jsonl"
    data = ("\n".join(LINES) + ending).encode("utf-8")
    path.write_bytes(data)
    whole = records_of(read_file(str(path), max_doc_bytes=200))
    assert [r[3] for r in whole].count("too_long") == 1 and any(r[1] == f"{path}:7" for r in whole)
    newlines = {i + 1 for i, b in enumerate(data) if b == 10}  # offsets that start a line
    for split_bytes in range(1, len(data) + 2):  # boundaries inside lines, at newlines, in blank runs
        ranges, records = read_by_ranges(path, split_bytes, 200)
        assert records == whole, split_bytes
        if split_bytes >= len(data):
            assert ranges is None
            continue
        assert ranges[0][0] == 0 and ranges[-1][1] == len(data)
        assert all(a < b for a, b in ranges) and all(ranges[k][1] == ranges[k + 1][0] for k in range(len(ranges) - 1))
        assert all(a in newlines for a, _ in ranges[1:]), "a range starts at a line start"


def test_count_lines_counts_as_the_reader_does(tmp_path):
    path = tmp_path / "f.jsonl"
    for content, expected in ((b"", (0, False)), (b"\n", (1, False)), (b"a", (1, True)), (b"a\n\n", (2, True)),
                              (b" \n\t\n x", (3, True)), (b"\n \n", (2, False))):
        path.write_bytes(content)
        assert count_lines(str(path), 0, len(content)) == expected, content


def test_what_is_not_split(tmp_path):
    big = "".join(json.dumps({"text": prose(i, 30)}) + "\n" for i in range(20))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(big.encode()))  # a gzip stream has no random access
    (tmp_path / "b.txt").write_text(big)
    (tmp_path / "c.jsonl").write_bytes(b"\x00\x01binary" * 500)
    (tmp_path / "d.jsonl").write_text(big)
    for name in ("a.jsonl.gz", "b.txt", "c.jsonl"):
        assert byte_ranges(str(tmp_path / name), 100) is None, name
    assert byte_ranges(str(tmp_path / "d.jsonl"), len(big)) is None  # small enough
    assert len(byte_ranges(str(tmp_path / "d.jsonl"), 1000)) > 1


# ----------------------------------------------------------------------------- the Ray engine

@pytest.fixture(scope="module")
def ray_instance(tmp_path_factory):
    """One local Ray instance (2 CPUs) for the module. Its worker processes carry a fault
    that a test can arm: the first document a worker cleans after `armed` exists kills that
    worker (os._exit, as the OOM killer or a lost node would), once."""
    ray = pytest.importorskip("ray")
    fault = tmp_path_factory.mktemp("fault")
    armed, fired = str(fault / "armed"), str(fault / "fired")

    def install_fault():  # runs in each worker process as it starts
        import data.filter_pass as filter_pass
        clean_document = filter_pass.clean_document

        def dying_once(text):
            if os.path.exists(armed) and not os.path.exists(fired):
                open(fired, "w").close()
                os._exit(1)
            return clean_document(text)

        filter_pass.clean_document = dying_once

    from data.ray_engine import worker_env
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING,
             runtime_env={**worker_env(), "worker_process_setup_hook": install_fault})
    yield SimpleNamespace(armed=armed, fired=fired)
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Exact and near duplicates across files and across the byte ranges of a large JSONL
    file, bad records and files, a gzip file, .txt files."""
    d = tmp_path_factory.mktemp("ray_corpus") / "in"
    d.mkdir()
    good = [prose(600 + i, 90) for i in range(30)]
    long_text = prose(700, 300)
    n_words = len(long_text.split(" "))
    lines = []
    for i, text in enumerate(good):
        lines.append(json.dumps({"id": f"big-{i}", "text": text}))
        if i % 6 == 0:
            lines += ["", "{broken json"]
        if i == 4:
            lines.append(json.dumps({"id": "big-near-1", "text": replace_words(long_text, [30, 140], seed=4)}))
        if i == 20:
            lines.append(json.dumps({"id": "big-copy-of-3", "text": good[3].replace(" ", "  ")}))
            lines.append(json.dumps({"text": replace_words(long_text, [60, n_words - 30], seed=5)}))
    lines.append(json.dumps({"text": prose(701, 90)}))  # last line, no newline, no id
    (d / "b_big.jsonl").write_text("\n".join(lines), encoding="utf-8")
    write_jsonl(d / "a_first.jsonl", [{"id": "orig-long", "text": long_text}, {"id": "a-1", "text": prose(702, 90)}])
    with gzip.open(d / "c_more.jsonl.gz", "wt", encoding="utf-8") as f:
        for obj in ({"id": "gz-copy-of-big-7", "text": good[7] + "\n"}, {"id": "gz-1", "text": prose(703, 90)},
                    {"id": "gz-near", "text": replace_words(good[12], [10, 40], seed=6)}):
            f.write(json.dumps(obj) + "\n")
    (d / "d_copy.txt").write_text(good[25].replace(". ", ".   "), encoding="utf-8")
    (d / "e_german.txt").write_text(GERMAN, encoding="utf-8")
    (d / "f_toxic.txt").write_text(toxic_doc(), encoding="utf-8")
    (d / "g_badutf8.txt").write_bytes(prose(704, 90).encode() + b"\xff\xfe")
    (d / "h_empty.txt").write_bytes(b"")
    (d / "i_truncated.jsonl.gz").write_bytes(gzip.compress(b'{"text": "cut short"}\n' * 50)[:-30])
    (d / "j_bad.jsonl").write_bytes(b'{"id": "bad-utf8", "text": "caf\xe9"}\n["a list"]\n{"id": "no-text"}\n')
    return d


OPTIONS = ["--vocab-size", 300, "--val-fraction", 0.2, "--split-bytes", 2500, "--shard-tokens", 3000]


def prepare(corpus, out, *extra):
    run_main(["--input", corpus, "--out", out, *OPTIONS, *extra])
    return out


@pytest.fixture(scope="module")
def local_run(corpus, tmp_path_factory):
    return prepare(corpus, tmp_path_factory.mktemp("local") / "o", "--workers", 1)


def assert_same_output(a, b):
    """removed.jsonl, meta.json, tokenizer.json, every shard and report.json (less its timings)."""
    meta = read_json(a / "meta.json")
    shards = [name for split in ("train", "val") for name in meta["splits"][split]]
    assert len(shards) >= 3  # --shard-tokens makes several
    for name in ["removed.jsonl", "meta.json", "tokenizer.json", *shards]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = read_json(a / "report.json"), read_json(b / "report.json")
    ra.pop("seconds"), rb.pop("seconds")
    assert ra == rb
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))


def test_the_local_reference_run_sees_every_kind_of_removal(local_run, corpus):
    report = read_json(local_run / "report.json")
    assert report["documents"]["removed"] == {
        "exact_duplicate": 3, "near_duplicate": 3, "malformed_json": 6, "missing_field": 1, "invalid_utf8": 2,
        "language": 1, "toxicity": 1, "empty": 1, "unreadable": 1}
    with open(local_run / "removed.jsonl", encoding="utf-8") as f:
        dups = {e["id"]: e["duplicate_of"] for e in map(json.loads, f) if "duplicate_of" in e}
    big = str(corpus / "b_big.jsonl")
    near_2 = next(k for k in dups if k.startswith(big + ":"))  # the id-less near copy: path:line
    assert dups == {"big-near-1": "orig-long", near_2: "orig-long", "big-copy-of-3": "big-3",
                    "gz-copy-of-big-7": "big-7", "gz-near": "big-12", str(corpus / "d_copy.txt"): "big-25"}
    assert len(byte_ranges(big, 2500)) >= 4  # the large file really is read in several ranges


@pytest.mark.parametrize("workers", [1, 2])
def test_ray_engine_gives_the_local_output(ray_instance, local_run, corpus, tmp_path, workers):
    out = prepare(corpus, tmp_path / "o", "--engine", "ray", "--workers", workers)
    assert_same_output(local_run, out)


def test_a_task_killed_mid_run_is_retried_and_the_output_is_the_same(ray_instance, local_run, corpus, tmp_path):
    open(ray_instance.armed, "w").close()
    try:
        out = prepare(corpus, tmp_path / "o", "--engine", "ray", "--workers", 2)
    finally:
        os.remove(ray_instance.armed)
    assert os.path.exists(ray_instance.fired), "no worker died: the fault was not triggered"
    assert_same_output(local_run, out)


def test_verify_jaccard_and_chunks_layout_match_too(ray_instance, corpus, tmp_path):
    extra = ["--verify-jaccard", 0.7, "--layout", "chunks", "--chunk-len", 64, "--min-chunk-len", 16,
             "--chunk-stride", 48, "--no-exact-dedup"]
    a = prepare(corpus, tmp_path / "local", "--workers", 1, *extra)
    b = prepare(corpus, tmp_path / "ray", "--engine", "ray", "--workers", 2, *extra)
    assert read_json(a / "report.json")["near_dedup"]["candidate_pairs"] > 0
    assert_same_output(a, b)


def test_governance_mixture_and_decontamination_match_too(ray_instance, corpus, tmp_path):
    """Sources with licences and shares, an opt-out, a licence allow-list, required consent,
    decontamination: Ray's output equals the local one, the data card included."""
    sources = tmp_path / "sources.json"
    sources.write_text(json.dumps([
        {"path": str(corpus / "b_big.jsonl"), "name": "big", "domain": "web", "license": "CC-BY-4.0",
         "consent": "licensed", "share": 0.6},
        {"path": str(corpus / "a_first.jsonl"), "name": "first", "domain": "books", "license": "MIT",
         "consent": "public-domain", "share": 0.3},
        {"path": str(corpus / "c_more.jsonl.gz"), "name": "more", "domain": "books", "license": "GPL-3.0-only",
         "consent": "unknown", "share": 0.1}]), encoding="utf-8")
    (tmp_path / "opt_out.txt").write_text("big-5\nbig-9\n", encoding="utf-8")
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": " ".join(prose(611, 90).split()[20:40])}])
    extra = ["--sources", sources, "--opt-out", tmp_path / "opt_out.txt", "--allow-licenses", "CC-BY-4.0,MIT",
             "--require-consent", "--decontaminate", tmp_path / "eval.jsonl", "--shard-tokens", 400]
    a = prepare(corpus, tmp_path / "local", "--workers", 1, *extra)
    b = prepare(corpus, tmp_path / "ray", "--engine", "ray", "--workers", 2, *extra)
    removed = read_json(a / "report.json")["documents"]["removed"]
    assert removed["opted_out"] == 2 and removed["contaminated"] == 1 and removed["license_not_allowed"] == 3
    assert removed["mixture_downsampled"] > 0
    assert_same_output(a, b)
    assert (a / "DATA_CARD.md").read_bytes() == (b / "DATA_CARD.md").read_bytes()


def test_a_ray_address_where_nothing_listens_is_one_error_line(corpus, tmp_path):
    pytest.importorskip("ray")
    proc = subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(corpus), "--out", str(tmp_path / "o"),
                           "--engine", "ray", "--ray-address", "127.0.0.1:1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no Ray cluster at --ray-address 127.0.0.1:1"), proc.stderr
