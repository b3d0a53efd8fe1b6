"""Readers: turn input paths into a stream of documents, or of counted rejects.

Every input record comes out exactly once, either as a `Document` (id, source, text) or
as a `Rejected` (id, source, reason), so prepare can account for all of them. Nothing is
read whole into memory except one .txt document (bounded by `max_doc_bytes`) or one
JSON line (bounded the same way): memory does not grow with the corpus.

Formats: .txt (one document per file), .jsonl / .jsonl.gz (one JSON object per line,
text under `text_field`), .parquet (needs pyarrow), directories (recursive, sorted).

For readers in parallel (data/ray_engine.py), a large plain JSONL file is cut into byte
ranges at line starts (`byte_ranges`, `count_lines`), and `read_piece` reads one range
exactly as `read_file` reads that part of the whole file, record ids included.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import Iterator, Optional, Union

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


# A record's own governance fields (data/governance.py), which win over its file's.
RECORD_FIELDS = ("license", "consent", "url", "domain", "source")


@dataclass
class Document:
    id: str
    source: str  # the input file
    text: str
    meta: Optional[dict] = None  # the record's own RECORD_FIELDS, when it has any


def record_meta(obj: dict) -> Optional[dict]:
    meta = {k: obj[k] for k in RECORD_FIELDS if isinstance(obj.get(k), str) and obj[k]}
    return meta or None


@dataclass
class Rejected:
    id: str
    source: str
    reason: str
    detail: str = ""


Record = Union[Document, Rejected]


def looks_binary(data: bytes) -> bool:
    """NUL bytes, or many control characters, in the first 8 KiB: not text."""
    head = data[:8192]
    if not head:
        return False
    if b"\x00" in head:
        return True
    controls = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    return controls / len(head) > 0.1


def _kind(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(TEXT_SUFFIXES):
        return "txt"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def list_files(paths: list[str]) -> list[str]:
    """Expand directories (a folder's files, then its subfolders, each sorted by name);
    raise FileNotFoundError for a missing path."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    full = os.path.join(root, name)
                    if _kind(full) is not None:
                        files.append(full)
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(path)
    return files


def _read_txt(path: str, max_doc_bytes: int) -> Iterator[Record]:
    doc_id = path
    with open(path, "rb") as f:
        data = f.read(max_doc_bytes + 1)
    if len(data) > max_doc_bytes:
        yield Rejected(doc_id, path, "too_long", f"more than {max_doc_bytes} bytes")
    elif not data.strip():
        yield Rejected(doc_id, path, "empty")
    elif looks_binary(data):
        yield Rejected(doc_id, path, "binary")
    else:
        try:
            yield Document(doc_id, path, data.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield Rejected(doc_id, path, "invalid_utf8", f"byte {e.start}")


def _bounded_lines(f, max_line_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """Yield (line, too_long); a line over the limit is skipped without being held whole."""
    while True:
        line = f.readline(max_line_bytes + 1)
        if not line:
            return
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while True:  # drain the rest of this line in bounded pieces
                rest = f.readline(1 << 20)
                if not rest or rest.endswith(b"\n"):
                    break
            yield b"", True
        else:
            yield line, False


def _parse_jsonl_line(path: str, rec_id: str, line: bytes, text_field: str) -> Record | None:
    """One JSONL line as a record; None for a blank line (blank lines are not records)."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line.decode("utf-8-sig"))  # -sig: a leading BOM is not an error
    except UnicodeDecodeError as e:
        return Rejected(rec_id, path, "invalid_utf8", f"byte {e.start}")
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        return Rejected(rec_id, path, "malformed_json", str(e)[:80])
    if not isinstance(obj, dict):
        return Rejected(rec_id, path, "malformed_json", "line is not a JSON object")
    text = obj.get(text_field)
    if text is None:
        return Rejected(str(obj.get("id", rec_id)), path, "missing_field", f"no {text_field!r}")
    if not isinstance(text, str):
        return Rejected(str(obj.get("id", rec_id)), path, "missing_field", f"{text_field!r} is not a string")
    doc_id = obj.get("id")
    doc_id = str(doc_id) if isinstance(doc_id, (str, int)) else rec_id
    if not text.strip():
        return Rejected(doc_id, path, "empty")
    return Document(doc_id, path, text, record_meta(obj))


def _jsonl_records(path: str, lines: Iterator[tuple[bytes, bool]], first_line: int, text_field: str,
                   max_doc_bytes: int) -> Iterator[Record]:
    for lineno, (line, too_long) in enumerate(lines, start=first_line):
        rec_id = f"{path}:{lineno}"
        if too_long:
            yield Rejected(rec_id, path, "too_long", f"line longer than {max_doc_bytes} bytes")
        else:
            record = _parse_jsonl_line(path, rec_id, line, text_field)
            if record is not None:
                yield record


def _read_jsonl(path: str, text_field: str, max_doc_bytes: int) -> Iterator[Record]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    any_line = False
    try:
        with opener(path, "rb") as f:
            head = f.peek(8192)[:8192] if hasattr(f, "peek") else b""
            if looks_binary(head):
                yield Rejected(path, path, "binary")
                return
            for record in _jsonl_records(path, _bounded_lines(f, max_doc_bytes), 1, text_field, max_doc_bytes):
                any_line = True
                yield record
    except (OSError, EOFError, zlib.error) as e:  # truncated or corrupt .gz (BadGzipFile is an OSError)
        any_line = True
        yield Rejected(path, path, "unreadable", str(e)[:80])
    if not any_line:
        yield Rejected(path, path, "empty")


def _read_parquet(path: str, text_field: str) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        yield Rejected(path, path, "unsupported", "reading .parquet needs pyarrow (pip install pyarrow)")
        return
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        yield Rejected(path, path, "unreadable", str(e)[:80])
        return
    if text_field not in pf.schema_arrow.names:
        yield Rejected(path, path, "missing_field", f"no column {text_field!r}")
        return
    columns = [text_field] + (["id"] if "id" in pf.schema_arrow.names and text_field != "id" else [])
    meta_columns = [c for c in RECORD_FIELDS if c in pf.schema_arrow.names and c not in columns]
    row = 0
    batches = pf.iter_batches(columns=columns + meta_columns, batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
            metas = [batch.column(len(columns) + k).to_pylist() for k in range(len(meta_columns))]
        except Exception as e:  # corrupt page or invalid UTF-8 in a string column
            yield Rejected(f"{path}:{row}", path, "unreadable", f"rows from {row} on: {str(e)[:80]}")
            return
        for n, (text, doc_id) in enumerate(zip(texts, ids)):
            rec_id = str(doc_id) if doc_id is not None else f"{path}:{row}"
            row += 1
            if not isinstance(text, str):
                yield Rejected(rec_id, path, "missing_field", f"{text_field!r} is null or not a string")
            elif not text.strip():
                yield Rejected(rec_id, path, "empty")
            else:
                yield Document(rec_id, path, text, record_meta({c: m[n] for c, m in zip(meta_columns, metas)}))


def read_file(path: str, text_field: str = "text", max_doc_bytes: int = 64 << 20) -> Iterator[Record]:
    """Every record of one input file, by its format's reader."""
    kind = _kind(path)
    if kind == "jsonl":
        yield from _read_jsonl(path, text_field, max_doc_bytes)
    elif kind == "parquet":
        yield from _read_parquet(path, text_field)
    else:  # .txt, or a file named explicitly whatever its suffix
        yield from _read_txt(path, max_doc_bytes)


def iter_records(paths: list[str], text_field: str = "text", max_doc_bytes: int = 64 << 20) -> Iterator[Record]:
    """Stream every record of every input path, in a deterministic order."""
    for path in list_files(paths):
        yield from read_file(path, text_field, max_doc_bytes)


# ----------------------------------------------------------------------------- pieces of the input

@dataclass(frozen=True)
class Piece:
    """A unit of reading work: a whole file (`end` None), or the lines of a plain JSONL
    file that lie in the byte range [start, end), which starts at a line start.
    `first_line` is the file's line number of the range's first line (record ids of
    JSONL lines are `path:line`, whoever reads them)."""
    path: str
    start: int = 0
    end: Optional[int] = None
    first_line: int = 1


def read_piece(piece: Piece, text_field: str = "text", max_doc_bytes: int = 64 << 20) -> Iterator[Record]:
    """The records of one piece, exactly as `read_file` gives them for that part of the file."""
    if piece.end is None:
        yield from read_file(piece.path, text_field, max_doc_bytes)
        return
    path = piece.path
    try:
        with open(path, "rb") as f:
            f.seek(piece.start)
            lines = _bounded_lines(f, max_doc_bytes)

            def in_range():
                while f.tell() < piece.end:
                    item = next(lines, None)
                    if item is None:
                        return
                    yield item

            yield from _jsonl_records(path, in_range(), piece.first_line, text_field, max_doc_bytes)
    except OSError as e:  # the file changed or vanished after it was planned: as the whole-file reader says it
        yield Rejected(path, path, "unreadable", str(e)[:80])


def byte_ranges(path: str, split_bytes: int) -> Optional[list[tuple[int, int]]]:
    """Cut a plain (uncompressed) JSONL file larger than `split_bytes` into byte ranges of
    about that size, each starting at a line start, together covering the file: every line
    lies in exactly one range. None when the file is read whole: not JSONL, compressed (a
    gzip stream cannot be entered in the middle), small, binary or unreadable."""
    if _kind(path) != "jsonl" or path.lower().endswith(".gz"):
        return None
    try:
        size = os.path.getsize(path)
        if size <= split_bytes:
            return None
        with open(path, "rb") as f:
            if looks_binary(f.read(8192)):
                return None  # the whole-file reader rejects it as one record
            cuts = sorted({_line_start_at_or_after(f, pos) for pos in range(split_bytes, size, split_bytes)})
    except OSError:
        return None
    bounds = [0] + [c for c in cuts if 0 < c < size] + [size]
    return list(zip(bounds[:-1], bounds[1:]))


def _line_start_at_or_after(f, pos: int) -> int:
    """The first offset >= pos (pos > 0) that starts a line, or the file's size."""
    f.seek(pos - 1)
    while True:
        chunk = f.read(1 << 16)
        if not chunk:
            return f.tell()
        i = chunk.find(b"\n")
        if i >= 0:
            return f.tell() - len(chunk) + i + 1


_NOT_WHITESPACE = re.compile(rb"[^ \t\n\r\x0b\x0c]")


def count_lines(path: str, start: int, end: int) -> tuple[int, bool]:
    """(lines in the byte range [start, end) of a file, as `_bounded_lines` counts them;
    whether the range holds anything but whitespace). `start` must be a line start and
    `end` a line start or the file's size: the count is then the range's newlines, plus one
    for a last line without a newline at the end of the file."""
    lines, last, nonblank = 0, b"\n", False
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(left, 8 << 20))
            if not chunk:
                break
            left -= len(chunk)
            lines += chunk.count(b"\n")
            nonblank = nonblank or _NOT_WHITESPACE.search(chunk) is not None
            last = chunk[-1:]
    return lines + (last != b"\n"), nonblank
