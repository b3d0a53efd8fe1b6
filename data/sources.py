"""Readers: turn input paths into a stream of documents, or of counted rejects.

Every input record comes out exactly once, either as a `Document` (id, source, text) or
as a `Rejected` (id, source, reason), so prepare can account for all of them. Nothing is
read whole into memory except one .txt document (bounded by `max_doc_bytes`) or one
JSON line (bounded the same way): memory does not grow with the corpus.

Formats: .txt (one document per file), .jsonl / .jsonl.gz (one JSON object per line,
text under `text_field`), .parquet (needs pyarrow), directories (recursive, sorted).
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, Union

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


@dataclass
class Document:
    id: str
    source: str
    text: str


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


def _read_jsonl(path: str, text_field: str, max_doc_bytes: int) -> Iterator[Record]:
    opener = gzip.open if path.lower().endswith(".gz") else open
    any_line = False
    try:
        with opener(path, "rb") as f:
            head = f.peek(8192)[:8192] if hasattr(f, "peek") else b""
            if looks_binary(head):
                yield Rejected(path, path, "binary")
                return
            for lineno, (line, too_long) in enumerate(_bounded_lines(f, max_doc_bytes), start=1):
                rec_id = f"{path}:{lineno}"
                if too_long:
                    any_line = True
                    yield Rejected(rec_id, path, "too_long", f"line longer than {max_doc_bytes} bytes")
                    continue
                if not line.strip():
                    continue  # blank lines are not records
                any_line = True
                try:
                    obj = json.loads(line.decode("utf-8-sig"))  # -sig: a leading BOM is not an error
                except UnicodeDecodeError as e:
                    yield Rejected(rec_id, path, "invalid_utf8", f"byte {e.start}")
                    continue
                except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
                    yield Rejected(rec_id, path, "malformed_json", str(e)[:80])
                    continue
                if not isinstance(obj, dict):
                    yield Rejected(rec_id, path, "malformed_json", "line is not a JSON object")
                    continue
                text = obj.get(text_field)
                if text is None:
                    yield Rejected(str(obj.get("id", rec_id)), path, "missing_field", f"no {text_field!r}")
                    continue
                if not isinstance(text, str):
                    yield Rejected(str(obj.get("id", rec_id)), path, "missing_field",
                                   f"{text_field!r} is not a string")
                    continue
                doc_id = obj.get("id")
                doc_id = str(doc_id) if isinstance(doc_id, (str, int)) else rec_id
                if not text.strip():
                    yield Rejected(doc_id, path, "empty")
                    continue
                yield Document(doc_id, path, text)
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
    row = 0
    batches = pf.iter_batches(columns=columns, batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            texts = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
        except Exception as e:  # corrupt page or invalid UTF-8 in a string column
            yield Rejected(f"{path}:{row}", path, "unreadable", f"rows from {row} on: {str(e)[:80]}")
            return
        for text, doc_id in zip(texts, ids):
            rec_id = str(doc_id) if doc_id is not None else f"{path}:{row}"
            row += 1
            if not isinstance(text, str):
                yield Rejected(rec_id, path, "missing_field", f"{text_field!r} is null or not a string")
            elif not text.strip():
                yield Rejected(rec_id, path, "empty")
            else:
                yield Document(rec_id, path, text)


def iter_records(paths: list[str], text_field: str = "text", max_doc_bytes: int = 64 << 20) -> Iterator[Record]:
    """Stream every record of every input path, in a deterministic order."""
    for path in list_files(paths):
        kind = _kind(path)
        if kind == "jsonl":
            yield from _read_jsonl(path, text_field, max_doc_bytes)
        elif kind == "parquet":
            yield from _read_parquet(path, text_field)
        else:  # .txt, or a file named explicitly whatever its suffix
            yield from _read_txt(path, max_doc_bytes)
