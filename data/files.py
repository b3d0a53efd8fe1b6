"""Atomic file writes, the one way every stage writes a whole file (configs, reports,
metadata, tokenizers, exports): write under a temporary name, then rename into place, so
a reader or a run killed midway sees the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os


def atomic_write(path: str, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` atomically; no temporary file is left behind."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_json(path: str, error: type[Exception], missing: str) -> dict:
    """The JSON object in `path`. Raises error(missing) when there is no such file, and
    error(...) when it is unreadable, not JSON, or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise error(missing) from None
    except (OSError, ValueError) as e:
        raise error(f"{path} is unreadable or not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise error(f"{path} does not hold a JSON object")
    return obj


def read_json_or_none(path: str):
    """The JSON in `path`, or None when it is missing or unreadable (for optional outputs a
    stage may not have written yet)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj, indent: int = 2) -> None:
    atomic_write(path, json.dumps(obj, indent=indent) + "\n")
