"""Tests for data.sources: every input record comes out as a Document or a Rejected."""
import gzip
import json
import os
import random
import struct

import pytest

from data.sources import Document, Rejected, iter_records, list_files

GOOD = "The river ran past the old mill, and the miller watched it every morning."


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return str(path)


def jsonl(*objs):
    return "".join(json.dumps(o) + "\n" for o in objs)


def records(paths, **kw):
    return list(iter_records([str(p) for p in paths], **kw))


def docs(recs):
    return [r for r in recs if isinstance(r, Document)]


def rejects(recs):
    return [r for r in recs if isinstance(r, Rejected)]


# ----------------------------------------------------------------------------- .txt and directories

def test_txt_file_is_one_document(tmp_path):
    text = "First line of the story.\n\nSecond paragraph, with more words.\n"
    p = write(tmp_path / "story.txt", text)
    recs = records([p])
    assert len(recs) == 1
    (doc,) = recs
    assert isinstance(doc, Document)
    assert doc.text == text
    assert doc.id == p
    assert doc.source == p


def test_directory_is_recursive_sorted_and_skips_unknown_suffixes(tmp_path):
    root = tmp_path / "corpus"
    # Created out of order on purpose: the reading order must not depend on creation order.
    write(root / "sub_b" / "deep" / "e.txt", "text e")
    write(root / "sub_b" / "d.txt", "text d")
    write(root / "sub_a" / "c.jsonl", jsonl({"id": "c1", "text": "text c1"}, {"id": "c2", "text": "text c2"}))
    write(root / "b.txt", "text b")
    write(root / "a.txt", "text a")
    write(root / "notes.md", "markdown is not an input format")
    write(root / "image.png", b"\x89PNG\r\n\x1a\n\x00\x00binary")
    write(root / "sub_a" / "data.csv", "x,y\n1,2\n")
    write(root / "sub_b" / "README", "no suffix at all")

    recs = records([root])
    assert all(isinstance(r, Document) for r in recs), recs
    assert [r.text for r in recs] == ["text a", "text b", "text c1", "text c2", "text d", "text e"]
    # list_files agrees and never lists the ignored files
    files = list_files([str(root)])
    assert [os.path.relpath(f, root) for f in files] == [
        "a.txt", "b.txt", os.path.join("sub_a", "c.jsonl"),
        os.path.join("sub_b", "d.txt"), os.path.join("sub_b", "deep", "e.txt")]
    # deterministic: a second pass gives the same stream
    assert records([root]) == recs


@pytest.mark.parametrize("name", ["notes.md", "data.csv", "README"])
def test_explicitly_named_file_is_read_whatever_its_suffix(tmp_path, name):
    p = write(tmp_path / name, "Plain words in a file with an odd name.\n")
    (doc,) = records([p])
    assert isinstance(doc, Document)
    assert doc.text == "Plain words in a file with an odd name.\n"
    assert doc.id == p


def test_list_files_missing_path_raises(tmp_path):
    good = write(tmp_path / "a.txt", "hello")
    with pytest.raises(FileNotFoundError):
        list_files([good, str(tmp_path / "does_not_exist.txt")])
    with pytest.raises(FileNotFoundError):
        list(iter_records([str(tmp_path / "missing_dir")]))


# ----------------------------------------------------------------------------- JSONL

def test_jsonl_text_field_and_ids(tmp_path):
    p = write(tmp_path / "a.jsonl",
              json.dumps({"id": "doc-1", "text": "first document"}) + "\n"
              + json.dumps({"text": "second document"}) + "\n"
              + json.dumps({"id": 7, "text": "third document"}) + "\n")
    recs = records([p])
    assert [type(r) for r in recs] == [Document] * 3
    assert [r.text for r in recs] == ["first document", "second document", "third document"]
    assert [r.id for r in recs] == ["doc-1", f"{p}:2", "7"]
    assert all(r.source == p for r in recs)


def test_jsonl_blank_lines_are_not_records_but_count_for_line_numbers(tmp_path):
    p = write(tmp_path / "a.jsonl",
              json.dumps({"text": "one"}) + "\n\n   \n"
              + json.dumps({"text": "two"}) + "\n\n")
    recs = records([p])
    assert [type(r) for r in recs] == [Document, Document]
    assert [r.text for r in recs] == ["one", "two"]
    assert [r.id for r in recs] == [f"{p}:1", f"{p}:4"]


def test_jsonl_gz(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    p.write_bytes(gzip.compress(jsonl({"id": "g1", "text": "gzipped one"}, {"text": "gzipped two"}).encode()))
    recs = records([p])
    assert [type(r) for r in recs] == [Document, Document]
    assert [r.text for r in recs] == ["gzipped one", "gzipped two"]
    assert [r.id for r in recs] == ["g1", f"{p}:2"]


def test_jsonl_custom_text_field(tmp_path):
    p = write(tmp_path / "a.jsonl", jsonl({"id": "x", "content": "from content", "text": "not this"},
                                          {"id": "y", "content": "second content"}))
    recs = records([p], text_field="content")
    assert [type(r) for r in recs] == [Document, Document]
    assert [r.text for r in recs] == ["from content", "second content"]
    assert [r.id for r in recs] == ["x", "y"]
    # with the default field, the second line lacks "text"
    recs = records([p])
    assert isinstance(recs[0], Document) and recs[0].text == "not this"
    assert isinstance(recs[1], Rejected) and recs[1].reason == "missing_field"


# ----------------------------------------------------------------------------- parquet

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def test_parquet_with_id_column(tmp_path):
    p = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["p1", "p2", "p3"], "text": ["alpha text", None, "gamma text"]}), p)
    recs = records([p])
    assert len(recs) == 3
    assert isinstance(recs[0], Document) and recs[0].id == "p1" and recs[0].text == "alpha text"
    assert isinstance(recs[1], Rejected) and recs[1].reason == "missing_field" and recs[1].id == "p2"
    assert isinstance(recs[2], Document) and recs[2].id == "p3" and recs[2].text == "gamma text"
    assert all(r.source == p for r in recs)


def test_parquet_without_id_column_and_custom_field(tmp_path):
    p = str(tmp_path / "b.parquet")
    pq.write_table(pa.table({"body": ["one", "two", "three"], "n": [1, 2, 3]}), p)
    recs = records([p], text_field="body")
    assert [type(r) for r in recs] == [Document] * 3
    assert [r.text for r in recs] == ["one", "two", "three"]
    ids = [r.id for r in recs]
    assert len(set(ids)) == 3
    assert all(i.startswith(p + ":") for i in ids)


def test_parquet_missing_column_is_rejected_and_stream_continues(tmp_path):
    bad = str(tmp_path / "a_bad.parquet")
    pq.write_table(pa.table({"body": ["no text column here"]}), bad)
    good = write(tmp_path / "b_good.txt", GOOD)
    recs = records([bad, good])
    assert len(recs) == 2
    assert isinstance(recs[0], Rejected) and recs[0].reason == "missing_field" and recs[0].source == bad
    assert isinstance(recs[1], Document) and recs[1].text == GOOD


def test_parquet_that_is_not_parquet_is_unreadable(tmp_path):
    bad = write(tmp_path / "a.parquet", b"this is not a parquet file at all\n" * 10)
    good = write(tmp_path / "b.txt", GOOD)
    recs = records([bad, good])
    assert [type(r) for r in recs] == [Rejected, Document]
    assert recs[0].reason == "unreadable"


# ----------------------------------------------------------------------------- bad inputs

def test_malformed_and_non_object_json_lines(tmp_path):
    p = write(tmp_path / "a.jsonl",
              '{"text": "unterminated\n'
              + '[1, 2, 3]\n'
              + '"just a string"\n'
              + json.dumps({"text": "still read"}) + "\n")
    recs = records([p])
    assert [type(r) for r in recs] == [Rejected, Rejected, Rejected, Document]
    assert [r.reason for r in recs[:3]] == ["malformed_json"] * 3
    assert [r.id for r in recs[:3]] == [f"{p}:1", f"{p}:2", f"{p}:3"]
    assert recs[3].text == "still read"


def test_deeply_nested_json_and_bom(tmp_path):
    # json.loads raises RecursionError (not ValueError) on absurd nesting; a BOM is fine
    p = tmp_path / "n.jsonl"
    p.write_bytes(b"[" * 100_000 + b"\n" + b"\xef\xbb\xbf" + json.dumps({"text": "after"}).encode() + b"\n")
    recs = records([str(p)])
    assert [r.reason for r in recs[:1]] == ["malformed_json"]
    assert isinstance(recs[1], Document) and recs[1].text == "after"


def test_missing_and_non_string_text_field(tmp_path):
    p = write(tmp_path / "a.jsonl", jsonl(
        {"id": "a", "body": "no text key"},
        {"id": "b", "text": None},
        {"id": "c", "text": 42},
        {"id": "d", "text": ["a", "list"]},
        {"id": "e", "text": "fine"},
    ))
    recs = records([p])
    assert [type(r) for r in recs] == [Rejected] * 4 + [Document]
    assert [r.reason for r in recs[:4]] == ["missing_field"] * 4
    assert [r.id for r in recs] == ["a", "b", "c", "d", "e"]
    assert recs[4].text == "fine"


def test_invalid_utf8_in_txt(tmp_path):
    bad = write(tmp_path / "a.txt", b"caf\xe9 au lait is a drink people order in the morning\n")
    good = write(tmp_path / "b.txt", GOOD)
    recs = records([bad, good])
    assert [type(r) for r in recs] == [Rejected, Document]
    assert recs[0].reason == "invalid_utf8"
    assert recs[0].source == bad
    assert recs[1].text == GOOD


def test_invalid_utf8_in_jsonl_line(tmp_path):
    p = write(tmp_path / "a.jsonl",
              json.dumps({"text": "before"}).encode() + b"\n"
              + b'{"text": "bad \xff\xfe byte"}\n'
              + json.dumps({"text": "after"}).encode() + b"\n")
    recs = records([p])
    assert [type(r) for r in recs] == [Document, Rejected, Document]
    assert recs[1].reason == "invalid_utf8"
    assert recs[1].id == f"{p}:2"
    assert [recs[0].text, recs[2].text] == ["before", "after"]


@pytest.mark.parametrize("name,content", [
    ("empty.txt", b""),
    ("spaces.txt", b"  \n\t\n   \r\n"),
    ("blank.jsonl", b"\n\n   \n\n"),
    ("empty.jsonl", b""),
    ("empty.jsonl.gz", gzip.compress(b"", mtime=0)),
], ids=["empty_txt", "whitespace_txt", "blank_lines_jsonl", "empty_jsonl", "empty_jsonl_gz"])
def test_empty_inputs(tmp_path, name, content):
    bad = write(tmp_path / f"a_{name}", content)
    good = write(tmp_path / "b.txt", GOOD)
    recs = records([bad, good])
    assert [type(r) for r in recs] == [Rejected, Document]
    assert recs[0].reason == "empty"
    assert recs[0].source == bad


def test_empty_text_in_jsonl_is_empty(tmp_path):
    p = write(tmp_path / "a.jsonl", jsonl({"id": "blank", "text": "   \n "}, {"id": "ok", "text": "words"}))
    recs = records([p])
    assert [type(r) for r in recs] == [Rejected, Document]
    assert recs[0].reason == "empty" and recs[0].id == "blank"


@pytest.mark.parametrize("name", ["a.txt", "a.jsonl"])
def test_binary_file_with_nul_bytes(tmp_path, name):
    rng = random.Random(0)
    blob = bytes(rng.randrange(256) for _ in range(4000)) + b"\x00\x00\x00" + b"more\n"
    bad = write(tmp_path / name, blob)
    good = write(tmp_path / "b.txt", GOOD)
    recs = records([bad, good])
    assert [type(r) for r in recs] == [Rejected, Document]
    assert recs[0].reason == "binary"


def test_too_long_jsonl_line_then_good_line(tmp_path):
    limit = 1000
    huge = json.dumps({"text": "word " * 5000})  # ~25 kB on one line
    p = write(tmp_path / "a.jsonl",
              json.dumps({"text": "short one"}) + "\n" + huge + "\n" + json.dumps({"text": "short two"}) + "\n")
    recs = records([p], max_doc_bytes=limit)
    assert [type(r) for r in recs] == [Document, Rejected, Document]
    assert recs[1].reason == "too_long"
    assert recs[1].id == f"{p}:2"
    assert recs[0].text == "short one"
    assert recs[2].text == "short two"
    assert recs[2].id == f"{p}:3"


def test_too_long_jsonl_last_line_without_newline(tmp_path):
    p = write(tmp_path / "a.jsonl", json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "x" * 5000}))
    recs = records([p], max_doc_bytes=100)
    assert [type(r) for r in recs] == [Document, Rejected]
    assert recs[1].reason == "too_long"


def test_too_long_txt(tmp_path):
    bad = write(tmp_path / "a.txt", "word " * 400)  # 2000 bytes
    exact = write(tmp_path / "b.txt", "y" * 1000)  # exactly at the limit: kept
    good = write(tmp_path / "c.txt", GOOD)
    recs = records([bad, exact, good], max_doc_bytes=1000)
    assert [type(r) for r in recs] == [Rejected, Document, Document]
    assert recs[0].reason == "too_long"
    assert recs[1].text == "y" * 1000


def _many_lines(n, seed=0):
    rng = random.Random(seed)
    return [{"id": f"line{i}", "text": " ".join(str(rng.random()) for _ in range(40))} for i in range(n)]


def test_truncated_jsonl_gz_keeps_readable_records(tmp_path):
    objs = _many_lines(400)
    data = gzip.compress(jsonl(*objs).encode())
    p = tmp_path / "a.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    good = write(tmp_path / "b.txt", GOOD)
    recs = records([p, good])
    *from_gz, last_gz, after = recs
    assert isinstance(last_gz, Rejected) and last_gz.reason == "unreadable" and last_gz.source == str(p)
    # the records before the cut come out, intact and in order
    assert len(from_gz) >= 50
    assert all(isinstance(r, Document) for r in from_gz)
    assert [r.id for r in from_gz] == [o["id"] for o in objs[: len(from_gz)]]
    assert [r.text for r in from_gz] == [o["text"] for o in objs[: len(from_gz)]]
    assert len(from_gz) < len(objs)
    assert isinstance(after, Document) and after.text == GOOD


def test_not_gzip_at_all_is_unreadable(tmp_path):
    p = write(tmp_path / "a.jsonl.gz", b'{"text": "plain text, not gzip"}\n')
    good = write(tmp_path / "b.txt", GOOD)
    recs = records([p, good])
    assert [type(r) for r in recs] == [Rejected, Document]
    assert recs[0].reason == "unreadable"


def test_corrupt_jsonl_gz_is_rejected_not_raised(tmp_path):
    """A damaged deflate stream must end that file with a Rejected("unreadable"), like a
    truncated one, keep the records read before the damage, and let the stream go on."""
    objs = _many_lines(60, seed=1)
    payload = jsonl(*objs).encode()
    assert len(payload) < 65535
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # gzip, deflate, no flags
    stored = b"\x00" + struct.pack("<HH", len(payload), len(payload) ^ 0xFFFF) + payload  # non-final stored block
    damaged = b"\x07" + b"\x00" * 32  # final block with the reserved block type 3: invalid
    p = tmp_path / "a.jsonl.gz"
    p.write_bytes(header + stored + damaged)
    good = write(tmp_path / "b.txt", GOOD)
    recs = records([p, good])  # must not raise
    *from_gz, last_gz, after = recs
    assert isinstance(after, Document) and after.text == GOOD
    assert isinstance(last_gz, Rejected) and last_gz.reason == "unreadable" and last_gz.source == str(p)
    assert all(isinstance(r, Document) for r in from_gz)
    assert [r.id for r in from_gz] == [o["id"] for o in objs[: len(from_gz)]]


def test_stream_continues_across_many_bad_files(tmp_path):
    """One file of each kind of damage, interleaved with good ones: every good record survives."""
    d = tmp_path / "mixed"
    write(d / "01_good.txt", "good one")
    write(d / "02_bad.jsonl", b'{oops\n' + json.dumps({"text": "good two"}).encode() + b"\n")
    write(d / "03_empty.txt", b"")
    write(d / "04_good.jsonl", jsonl({"text": "good three"}))
    write(d / "05_bin.txt", b"\x00\x01\x02" * 100)
    write(d / "06_utf8.txt", b"\xc3\x28 broken")
    write(d / "07_good.txt", "good four")
    recs = records([d])
    assert [r.text for r in docs(recs)] == ["good one", "good two", "good three", "good four"]
    assert [r.reason for r in rejects(recs)] == ["malformed_json", "empty", "binary", "invalid_utf8"]
