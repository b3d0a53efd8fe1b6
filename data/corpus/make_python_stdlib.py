"""Build data/corpus/python_stdlib.jsonl.gz: source files of Python's standard library, the
embedded corpus's second domain (code, PSF-2.0), so that a mixture of two domains can be
shown on any machine without a download.

Run once by a maintainer, never at training time (the output is committed):

    python data/corpus/make_python_stdlib.py

The top-level pure-Python modules of the running interpreter's `Lib/` (no packages, no
tests, no private `_*.py`), each at most 60 KB, sorted by name, until 3 MB of text. One
JSON line per file with its own governance fields: {"id", "text", "license": "PSF-2.0",
"consent": "licensed", "url", "domain": "code"}.
"""
import gzip
import io
import json
import os
import platform
import sys
import sysconfig

MAX_FILE_BYTES, MAX_TOTAL_BYTES = 60_000, 3_000_000


def main(out_path: str = "data/corpus/python_stdlib.jsonl.gz") -> None:
    lib, version = sysconfig.get_paths()["stdlib"], platform.python_version()
    names = sorted(n for n in os.listdir(lib) if n.endswith(".py") and not n.startswith(("_", "test")))
    raw, total, count = io.BytesIO(), 0, 0
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:  # mtime=0: byte-identical rebuilds
        for name in names:
            with open(os.path.join(lib, name), "rb") as f:
                data = f.read()
            if len(data) > MAX_FILE_BYTES or total + len(data) > MAX_TOTAL_BYTES:
                continue
            record = {"id": f"cpython-{version}/Lib/{name}", "text": data.decode("utf-8"), "license": "PSF-2.0",
                      "consent": "licensed", "url": f"https://github.com/python/cpython/blob/v{version}/Lib/{name}",
                      "domain": "code"}
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            total, count = total + len(data), count + 1
    with open(out_path, "wb") as f:
        f.write(raw.getvalue())
    print(f"wrote {out_path}: {count} files, {total / 1e6:.1f} MB of text, {len(raw.getvalue()) / 1e6:.2f} MB gzip")


if __name__ == "__main__":
    main(*sys.argv[1:])
