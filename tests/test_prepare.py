"""Tests for `python -m data.prepare` (data.prepare.main) and data.shards."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data.prepare import main
from data.shards import DataDirError, ShardWriter, dtype_for_vocab, load_split, write_meta
from data.text.tokenizer import Tokenizer

from prepare_helpers import (CORPUS, EMAIL_1, EMAIL_2, GERMAN, PHONE_1, PHONE_2, REPO, assert_one_error_line,
                             decoded_documents, prose, read_json, replace_words, run_main, split_tokens, toxic_doc,
                             write_jsonl)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "d"
    main(["--out", str(out)])
    return out


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """12 clean English documents, one per JSONL line."""
    d = tmp_path_factory.mktemp("small")
    texts = {f"doc-{i:02d}": prose(200 + i, 90) for i in range(12)}
    write_jsonl(d / "docs.jsonl", [{"id": k, "text": v} for k, v in texts.items()])
    return d, texts


@pytest.fixture(scope="module")
def small_run(small_dir, tmp_path_factory):
    d, texts = small_dir
    out = tmp_path_factory.mktemp("small_out") / "o"
    run_main(["--input", d, "--out", out, "--workers", 1, "--vocab-size", 300, "--val-fraction", 0.2])
    return out


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    """A directory with one or more instance of every kind of removal, plus good documents."""
    d = tmp_path_factory.mktemp("mixed") / "in"
    d.mkdir()
    good = {f"good-{i}": prose(i, 100) for i in range(10)}
    write_jsonl(d / "a_good.jsonl", [{"id": k, "text": v} for k, v in good.items()])
    # exact duplicates: same text, different whitespace
    (d / "b_copy.txt").write_text(good["good-1"].replace(" ", "  ") + "\n\n\n   \n", encoding="utf-8")
    write_jsonl(d / "b_dups.jsonl", [
        {"id": "dup-of-3", "text": "  " + good["good-3"].replace(". ", ".   ").replace("\n\n", "\n \n\n") + "\n"},
        {"id": "dup-of-5", "text": good["good-5"].replace(" the ", "\tthe ")},
    ])
    # near duplicates: a long document and two copies with three words changed
    long_text = prose(100, 300)
    n_words = len(long_text.split(" "))
    write_jsonl(d / "c_long.jsonl", [{"id": "long-orig", "text": long_text}])
    write_jsonl(d / "d_near.jsonl", [
        {"id": "long-near-1", "text": replace_words(long_text, [50, 150, n_words - 40], seed=1)},
        {"id": "long-near-2", "text": replace_words(long_text, [20, 120, n_words - 70], seed=2)},
    ])
    (d / "e_german.txt").write_text(GERMAN, encoding="utf-8")
    (d / "f_toxic.txt").write_text(toxic_doc(), encoding="utf-8")
    (d / "g_lorem.txt").write_text(prose(79, 100) + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
                                   encoding="utf-8")
    pii_text = (prose(78, 100) + f"\n\nFor questions write to {EMAIL_1} or call {PHONE_1} before the end of the "
                f"month. The museum office answers at {EMAIL_2} and by phone on {PHONE_2} every weekday.")
    write_jsonl(d / "h_pii.jsonl", [{"id": "pii-doc", "text": pii_text}])
    with open(d / "i_bad.jsonl", "wb") as f:
        f.write(b'{"id": "broken", "text": "unterminated string\n')
        f.write(b'["a", "json", "list"]\n')
        f.write(json.dumps({"id": "no-text", "body": prose(300, 60)}).encode() + b"\n")
        f.write(json.dumps({"id": "num-text", "text": 12345}).encode() + b"\n")
        f.write(b'{"id": "bad-utf8", "text": "caf\xe9 \xff\xfe"}\n')
        f.write(b"\n")
        f.write(json.dumps({"id": "good-after-bad", "text": prose(301, 100)}).encode() + b"\n")
    (d / "j_badutf8.txt").write_bytes(prose(302, 100).encode() + b"\n\xff\xfe\xfd the end.\n")
    (d / "k_empty.txt").write_bytes(b"")
    (d / "l_blank.txt").write_bytes(b"   \n\n\t \n")
    (d / "m_binary.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)) * 8)
    (d / "README.md").write_text("Not an input: unknown suffixes inside directories are ignored.\n")
    kept_texts = {**good, "good-after-bad": prose(301, 100), "long-orig": long_text}
    return {"dir": d, "kept_texts": kept_texts, "pii_text": pii_text}


EXPECTED_REMOVED = {
    "exact_duplicate": 3, "near_duplicate": 2, "language": 1, "toxicity": 1, "lorem_ipsum": 1,
    "malformed_json": 2, "missing_field": 2, "invalid_utf8": 2, "empty": 2, "binary": 1,
}
EXPECTED_READ = 30
EXPECTED_KEPT = 13


@pytest.fixture(scope="module")
def mixed_run(mixed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed_out") / "o1"
    run_main(["--input", mixed_dir["dir"], "--out", out, "--workers", 1, "--vocab-size", 300])
    return out


# ----------------------------------------------------------------------------- default run

def test_default_run_meta_and_report(default_run):
    meta = read_json(default_run / "meta.json")
    report = read_json(default_run / "report.json")
    assert meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 8192
    assert set(meta["splits"]) == {"train", "val"}
    for split in ("train", "val"):
        files = meta["splits"][split]
        assert files, split
        total_bytes = 0
        for name in files:
            path = default_run / name
            assert path.is_file()
            total_bytes += path.stat().st_size
        assert total_bytes == 2 * report["tokens"][split] == 2 * meta["tokens"][split]
    docs = report["documents"]
    assert docs["read"] == 42
    assert docs["kept"] == 42
    assert docs["removed"] == {}
    assert report["tokens"]["train"] > 1_000_000
    assert report["tokens"]["val"] > 0
    assert report["split_documents"]["train"] + report["split_documents"]["val"] == 42
    assert 3 <= report["bytes_per_token"] <= 5
    seconds = report["seconds"]  # each pass timed, and the passes fit inside the whole run
    assert {"read_filter", "dedup", "tokenizer", "tokenize", "total"} <= set(seconds)
    passes = sum(seconds[k] for k in ("read_filter", "dedup", "tokenizer", "tokenize"))
    assert 0 < passes <= seconds["total"] + 0.01
    assert (default_run / "tokenizer.json").is_file()
    assert (default_run / "removed.jsonl").read_text() == ""


def test_default_run_shard_decodes_to_corpus_text(default_run):
    meta = read_json(default_run / "meta.json")
    tok = Tokenizer.load(str(default_run / "tokenizer.json"))
    assert tok.vocab_size == meta["vocab_size"]
    train = load_split(str(default_run), "train")
    assert train[0].dtype == np.dtype("<u2")
    first = np.asarray(train[0][:200]).tolist()
    assert first[0] == meta["eot_id"] == tok.eot_id
    assert meta["eot_id"] not in first[1:]  # the first document is far longer than 200 tokens
    text = tok.decode(first[1:])
    assert sum(c.isalpha() for c in text) > 0.6 * len(text)
    assert "\ufffd" not in text[:-3]
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        corpus = [" ".join(json.loads(line)["text"].split()) for line in f]
    snippet = " ".join(text.split()[:-1])  # drop a possibly cut last word
    assert len(snippet) > 300
    assert any(snippet in doc for doc in corpus)


# ----------------------------------------------------------------------------- accounting

def test_accounting_identity_and_reasons(mixed_run):
    report = read_json(mixed_run / "report.json")
    docs = report["documents"]
    assert docs["read"] == docs["kept"] + sum(docs["removed"].values())
    assert docs["removed"] == EXPECTED_REMOVED
    assert docs["read"] == EXPECTED_READ
    assert docs["kept"] == EXPECTED_KEPT
    assert report["split_documents"]["train"] + report["split_documents"]["val"] == EXPECTED_KEPT


def test_removed_log_matches_report(mixed_run, mixed_dir):
    report = read_json(mixed_run / "report.json")
    with open(mixed_run / "removed.jsonl", encoding="utf-8") as f:
        entries = [json.loads(line) for line in f]
    assert len(entries) == sum(report["documents"]["removed"].values())
    counts = {}
    for e in entries:
        assert {"id", "source", "reason"} <= set(e)
        assert os.path.isfile(e["source"])
        assert os.path.dirname(os.path.abspath(e["source"])) == str(mixed_dir["dir"])
        counts[e["reason"]] = counts.get(e["reason"], 0) + 1
        if e["reason"] in ("exact_duplicate", "near_duplicate"):
            assert "duplicate_of" in e
        else:
            assert "duplicate_of" not in e
    assert counts == report["documents"]["removed"]
    dups = {e["id"]: e["duplicate_of"] for e in entries if "duplicate_of" in e}
    copy_txt = str(mixed_dir["dir"] / "b_copy.txt")
    assert dups == {copy_txt: "good-1", "dup-of-3": "good-3", "dup-of-5": "good-5",
                    "long-near-1": "long-orig", "long-near-2": "long-orig"}
    by_reason = {}
    for e in entries:
        by_reason.setdefault(e["reason"], set()).add(e["id"])
    assert by_reason["missing_field"] == {"no-text", "num-text"}
    assert by_reason["language"] == {str(mixed_dir["dir"] / "e_german.txt")}
    assert by_reason["toxicity"] == {str(mixed_dir["dir"] / "f_toxic.txt")}
    assert by_reason["lorem_ipsum"] == {str(mixed_dir["dir"] / "g_lorem.txt")}
    assert by_reason["binary"] == {str(mixed_dir["dir"] / "m_binary.txt")}
    assert by_reason["empty"] == {str(mixed_dir["dir"] / "k_empty.txt"), str(mixed_dir["dir"] / "l_blank.txt")}
    # no kept document is listed as removed
    assert not (set(mixed_dir["kept_texts"]) | {"pii-doc"}) & {e["id"] for e in entries}


def test_kept_documents_are_exactly_the_survivors_and_pii_is_scrubbed(mixed_run, mixed_dir):
    report = read_json(mixed_run / "report.json")
    assert report["pii"]["email"] == 2
    assert report["pii"]["phone"] == 2
    decoded = decoded_documents(mixed_run, "train") + decoded_documents(mixed_run, "val")
    assert len(decoded) == EXPECTED_KEPT
    pii_docs = [t for t in decoded if "<EMAIL>" in t]
    assert len(pii_docs) == 1
    (scrubbed,) = pii_docs
    assert scrubbed.count("<EMAIL>") == 2
    assert scrubbed.count("<PHONE>") == 2
    everything = "\n".join(decoded)
    for raw in (EMAIL_1, EMAIL_2, PHONE_1, PHONE_2, "@"):
        assert raw not in everything
    others = sorted(t for t in decoded if t is not scrubbed)
    assert others == sorted(mixed_dir["kept_texts"].values())
    assert "Lorem ipsum" not in everything and "Lehrer" not in everything


def test_two_workers_give_the_same_result(mixed_run, mixed_dir, tmp_path):
    out = tmp_path / "o2"
    run_main(["--input", mixed_dir["dir"], "--out", out, "--workers", 2, "--vocab-size", 300])
    r1, r2 = read_json(mixed_run / "report.json"), read_json(out / "report.json")
    assert r2["documents"] == r1["documents"]
    assert r2["pii"] == r1["pii"]
    assert r2["tokens"] == r1["tokens"]
    assert (out / "removed.jsonl").read_text() == (mixed_run / "removed.jsonl").read_text()
    assert read_json(out / "tokenizer.json") == read_json(mixed_run / "tokenizer.json")
    m1, m2 = read_json(mixed_run / "meta.json"), read_json(out / "meta.json")
    for split in ("train", "val"):
        assert m1["splits"][split] == m2["splits"][split]
        for name in m1["splits"][split]:
            assert (out / name).read_bytes() == (mixed_run / name).read_bytes()


# ----------------------------------------------------------------------------- split, chunks, tokenizer reuse

def test_train_val_split_is_by_document(small_run, small_dir):
    _, texts = small_dir
    report = read_json(small_run / "report.json")
    train = decoded_documents(small_run, "train")
    val = decoded_documents(small_run, "val")
    assert len(val) >= 2
    assert len(val) == round(0.2 * len(texts)) == report["split_documents"]["val"]
    assert len(train) == len(texts) - len(val) == report["split_documents"]["train"]
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(texts.values())
    train_stream = "\n".join(train)
    for doc in val:
        assert doc not in train_stream
        # not even a long piece of a val document leaks into train
        assert doc[:200] not in train_stream


def test_chunks_layout(small_dir, tmp_path):
    d, texts = small_dir
    out = tmp_path / "chunks"
    run_main(["--input", d, "--out", out, "--workers", 1, "--vocab-size", 300, "--layout", "chunks",
              "--chunk-len", 64, "--chunk-stride", 32, "--min-chunk-len", 16, "--val-fraction", 0.2])
    meta = read_json(out / "meta.json")
    report = read_json(out / "report.json")
    assert meta["layout"] == "chunks"
    assert meta["chunk_len"] == 64
    eot, pad = meta["eot_id"], meta["pad_id"]
    tok = Tokenizer.load(str(out / "tokenizer.json"))
    rebuilt = []
    for split in ("train", "val"):
        for name in meta["splits"][split]:
            assert (out / name).stat().st_size % (64 * 2) == 0
        flat = split_tokens(out, split)
        assert flat.size % 64 == 0
        rows = flat.reshape(-1, 64).tolist()
        assert len(rows) == report["chunks"][split]
        assert rows and rows[0][0] == eot
        docs = []
        for row in rows:
            if pad in row:  # padding only at the end of a row
                k = row.index(pad)
                assert all(t == pad for t in row[k:]), row
            body = [t for t in row if t != pad]
            assert eot not in body[1:]
            if row[0] == eot:  # first row of a document
                docs.append(list(body))
            else:  # a continuation starts where the previous row's second half starts
                prev = docs[-1]
                assert len(prev) >= 64
                assert body[:32] == prev[-32:], "consecutive rows of a document overlap by 32 tokens"
                docs[-1] = prev + body[32:]
        assert len(docs) == report["split_documents"][split]
        rebuilt += [tok.decode(doc[1:]) for doc in docs]
    # overlapping rows stitched back together give the documents, whole
    assert sorted(rebuilt) == sorted(texts.values())
    assert any(len(doc) > 64 for doc in rebuilt)  # at least some documents span several rows


def test_tokenizer_is_reused(small_run, small_dir, tmp_path, capsys):
    d, _ = small_dir
    out = tmp_path / "reuse"
    given = small_run / "tokenizer.json"
    capsys.readouterr()
    run_main(["--input", d, "--out", out, "--workers", 1, "--vocab-size", 1000, "--val-fraction", 0.2,
              "--tokenizer", given])
    printed = capsys.readouterr().out
    assert "training" not in printed
    assert read_json(out / "tokenizer.json") == read_json(given)
    meta = read_json(out / "meta.json")
    assert meta["vocab_size"] == read_json(small_run / "meta.json")["vocab_size"] <= 300
    # same documents, same split, same tokenizer: the same shards
    for split in ("train", "val"):
        assert (split_tokens(out, split) == split_tokens(small_run, split)).all()


def test_config_file_overrides_and_cli_wins(small_dir, tmp_path):
    d, texts = small_dir
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"input": [str(d)], "vocab-size": 280, "val_fraction": 0.5,
                               "workers": 1, "pii": False}))
    out = tmp_path / "cfgout"
    run_main(["--config", cfg, "--out", out, "--val-fraction", 0.25])
    saved = read_json(out / "prepare_config.json")
    assert saved["vocab_size"] == 280
    assert saved["pii"] is False
    assert saved["input"] == [str(d)]
    assert saved["val_fraction"] == 0.25  # the command line beats the config file
    assert read_json(out / "meta.json")["vocab_size"] == 280
    report = read_json(out / "report.json")
    assert report["pii"] == {}
    assert report["split_documents"]["val"] == round(0.25 * len(texts))


def test_nothing_survives(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "lorem.txt").write_text(prose(5, 100) + "\n\nLorem ipsum dolor sit amet.")
    (d / "short.txt").write_text("Too short to be a document.")
    (d / "bad.jsonl").write_text("{not json}\n")
    out = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(["--input", d, "--out", out, "--workers", 1, "--vocab-size", 300])
    assert e.value.code not in (0, None)
    assert_one_error_line(capsys.readouterr().err)
    report = read_json(out / "report.json")
    assert report["documents"]["read"] == 3
    assert report["documents"]["kept"] == 0
    assert sum(report["documents"]["removed"].values()) == 3
    assert report["documents"]["removed"]["lorem_ipsum"] == 1
    assert report["documents"]["removed"]["malformed_json"] == 1
    assert not (out / "meta.json").exists()
    assert len((out / "removed.jsonl").read_text().splitlines()) == 3


# ----------------------------------------------------------------------------- shards

def test_dtype_for_vocab():
    assert dtype_for_vocab(300) == np.uint16
    assert dtype_for_vocab(8192) == np.uint16
    assert dtype_for_vocab(65536) == np.uint16  # ids 0..65535 all fit
    assert dtype_for_vocab(65537) == np.uint32
    assert dtype_for_vocab(100_277) == np.uint32


def test_shard_writer_uint32_roundtrip(tmp_path):
    vocab = 100_000
    w = ShardWriter(str(tmp_path), "train", dtype_for_vocab(vocab), vocab, shard_tokens=1000)
    ids = [0, 1, 65535, 65536, 70000, vocab - 1]
    w.write(ids)
    files = w.close()
    assert files == ["train_0000.bin"]
    write_meta(str(tmp_path), {"dtype": "uint32", "vocab_size": vocab, "splits": {"train": files}})
    (arr,) = load_split(str(tmp_path), "train")
    assert arr.dtype == np.dtype("<u4")
    assert arr.tolist() == ids
    assert (tmp_path / "train_0000.bin").stat().st_size == 4 * len(ids)


def test_shard_writer_rolls_over(tmp_path):
    w = ShardWriter(str(tmp_path), "val", np.uint16, 1000, shard_tokens=10)
    chunks = [list(range(0, 7)), list(range(7, 14)), list(range(14, 25))]
    for c in chunks:
        w.write(c)
    files = w.close()
    assert files == ["val_0000.bin", "val_0001.bin", "val_0002.bin"]
    assert w.total == 25
    sizes = [np.fromfile(tmp_path / f, dtype="<u2").size for f in files]
    assert sizes == [10, 10, 5]
    joined = np.concatenate([np.fromfile(tmp_path / f, dtype="<u2") for f in files])
    assert joined.tolist() == list(range(25))
    assert not list(tmp_path.glob("*.tmp"))


def test_shard_writer_exact_fill_opens_no_empty_file(tmp_path):
    w = ShardWriter(str(tmp_path), "train", np.uint16, 100, shard_tokens=10)
    w.write(list(range(10)))
    assert w.close() == ["train_0000.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_0000.bin"]


def test_shard_writer_rejects_out_of_range_ids(tmp_path):
    w = ShardWriter(str(tmp_path), "train", np.uint16, 300, shard_tokens=100)
    w.write([1, 2, 299])
    with pytest.raises(ValueError):
        w.write([5, 300])
    with pytest.raises(ValueError):
        w.write([-1])
    assert w.total == 3
    w.close()
    assert np.fromfile(tmp_path / "train_0000.bin", dtype="<u2").tolist() == [1, 2, 299]


def _good_data_dir(path):
    path.mkdir()
    w = ShardWriter(str(path), "train", np.uint16, 100)
    w.write([1, 2, 3, 4])
    write_meta(str(path), {"dtype": "uint16", "vocab_size": 100, "splits": {"train": w.close()}})
    return path


def test_load_split_errors(tmp_path):
    good = _good_data_dir(tmp_path / "good")
    assert [a.tolist() for a in load_split(str(good), "train")] == [[1, 2, 3, 4]]

    empty = tmp_path / "nometa"
    empty.mkdir()
    with pytest.raises(DataDirError):
        load_split(str(empty), "train")

    missing = _good_data_dir(tmp_path / "missing")
    os.remove(missing / "train_0000.bin")
    with pytest.raises(DataDirError):
        load_split(str(missing), "train")

    truncated = _good_data_dir(tmp_path / "truncated")
    with open(truncated / "train_0000.bin", "r+b") as f:
        f.truncate(7)  # 3.5 uint16 values
    with pytest.raises(DataDirError):
        load_split(str(truncated), "train")

    with pytest.raises(DataDirError):
        load_split(str(good), "val")


# ----------------------------------------------------------------------------- CLI errors

def _error_argv(case, tmp_path, good_input):
    out = tmp_path / "out"
    if case == "missing_input":
        return ["--input", tmp_path / "no_such_file.jsonl", "--out", out]
    if case == "unwritable_out":
        (tmp_path / "plainfile").write_text("x")
        return ["--input", good_input, "--out", tmp_path / "plainfile" / "sub"]
    if case == "vocab_too_small":
        return ["--input", good_input, "--out", out, "--vocab-size", 10]
    if case == "val_fraction":
        return ["--input", good_input, "--out", out, "--val-fraction", 2]
    if case == "missing_tokenizer":
        return ["--input", good_input, "--out", out, "--tokenizer", tmp_path / "no_tokenizer.json"]
    if case == "bad_tokenizer":
        (tmp_path / "tok.json").write_text('{"hello": 1}')
        return ["--input", good_input, "--out", out, "--tokenizer", tmp_path / "tok.json"]
    if case == "unknown_config_key":
        (tmp_path / "cfg.json").write_text(json.dumps({"vocab_size": 300, "no_such_option": 1}))
        return ["--config", tmp_path / "cfg.json", "--input", good_input, "--out", out]
    if case == "ray_address_without_ray_engine":
        return ["--input", good_input, "--out", out, "--ray-address", "auto"]
    if case == "config_not_json":
        (tmp_path / "cfg.json").write_text("{vocab_size: 300")
        return ["--config", tmp_path / "cfg.json", "--input", good_input, "--out", out]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_input", "unwritable_out", "vocab_too_small", "val_fraction",
                                  "missing_tokenizer", "bad_tokenizer", "unknown_config_key", "config_not_json",
                                  "ray_address_without_ray_engine"])
def test_cli_errors_are_one_line(case, tmp_path, small_dir, capsys):
    d, _ = small_dir
    argv = _error_argv(case, tmp_path, d / "docs.jsonl")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(argv + ["--workers", 1])
    assert e.value.code not in (0, None)
    assert_one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_engine_ray_without_ray_installed_says_what_to_install(small_dir, tmp_path, capsys, monkeypatch):
    d, _ = small_dir
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.delitem(sys.modules, "data.ray_engine", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_main(["--input", d, "--out", tmp_path / "out", "--engine", "ray"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "pip install -r requirements-scale.txt" in err


def test_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--input", "--out", "--vocab-size", "--val-fraction", "--layout", "--chunk-len",
                   "--tokenizer", "--config", "--workers", "--no-gopher-quality", "--no-pii",
                   "--engine", "--ray-address", "--split-bytes"):
        assert option in out, option
    flat = " ".join(out.split())
    assert "(default: 8192)" in flat
    assert "(default: 0.05)" in flat
    assert "(default: stream)" in flat
    # each option states its real default once; only --config and --tokenizer default to None
    assert flat.count("(default: None)") <= 2, "options claim '(default: None)' besides their real default"


def test_cli_subprocess_missing_input(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "data.prepare", "--input", str(tmp_path / "MISSING"), "--out", str(tmp_path / "X")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert "MISSING" in lines[0]


def test_shard_writer_refuses_a_dtype_too_small_for_the_vocab(tmp_path):
    # uint16 would wrap id 65536 to 0 silently (docs/design.md pitfall)
    with pytest.raises(ValueError):
        ShardWriter(str(tmp_path), "train", np.uint16, 70_000)
    ShardWriter(str(tmp_path), "train", np.uint16, 65_536).close()  # ids up to 65535 fit


def test_config_file_input_as_a_single_string(small_dir, tmp_path):
    d, _ = small_dir
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"input": str(d), "vocab_size": 280, "workers": 1}))
    out = tmp_path / "strout"
    run_main(["--config", cfg, "--out", out])
    assert read_json(out / "prepare_config.json")["input"] == [str(d)]
    assert read_json(out / "report.json")["documents"]["kept"] > 0


def test_a_one_file_corpus_gets_a_validation_split_from_its_end(tmp_path, capsys):
    """One .txt file is one document, and a split by document would leave validation
    empty: its last --val-fraction of tokens is held out instead, nothing lost or doubled."""
    import gzip
    with gzip.open(os.path.join(REPO, "data", "corpus", "shakespeare.jsonl.gz"), "rt", encoding="utf-8") as f:
        works = [json.loads(line)["text"] for _, line in zip(range(2), f)]
    corpus = tmp_path / "book.txt"
    corpus.write_text(works[0], encoding="utf-8")
    out = tmp_path / "out"
    run_main(["--input", corpus, "--out", out, "--vocab-size", 300, "--workers", 1, "--val-fraction", 0.1])
    assert "the validation split is its last 10% of tokens" in capsys.readouterr().out
    report = read_json(out / "report.json")
    assert report["val_split"] == "the last tokens of the only document"
    assert report["split_documents"] == {"train": 1, "val": 1}
    train, val = decoded_documents(out, "train"), decoded_documents(out, "val")
    assert len(train) == len(val) == 1 and works[0].rstrip().endswith(val[0].rstrip())  # the end of the play
    assert train[0][-60:] + val[0][:60] in works[0]  # cut once: nothing lost or doubled at the cut
    n = report["tokens"]["train"] + report["tokens"]["val"] - 2  # less the two separators
    assert report["tokens"]["val"] - 1 == round(0.1 * n) > 0
    second = tmp_path / "second.txt"  # two documents: the split stays by document
    second.write_text(works[1], encoding="utf-8")
    run_main(["--input", corpus, second, "--out", tmp_path / "two", "--vocab-size", 300, "--workers", 1,
              "--val-fraction", 0.5])
    assert read_json(tmp_path / "two" / "report.json")["val_split"] == "by document"
