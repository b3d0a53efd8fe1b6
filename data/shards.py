"""Token shards: flat little-endian arrays of token ids, described by meta.json.

Layout (contract, docs/design.md): OUT/meta.json =
  {"dtype": "uint16"|"uint32", "vocab_size": N, "splits": {"train": [files], "val": [files]}, ...}
and each file is raw token ids. uint16 is used only when every id (special tokens
included) is below 65536; otherwise ids would wrap silently. Files are written under a
temporary name and renamed when complete, and meta.json is written last, so a directory
with a meta.json is always whole.
"""
from __future__ import annotations

import os

import numpy as np

from cli import UserError
from data.files import read_json, write_json


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token ids to `{split}_{k:04d}.bin` files of at most `shard_tokens` ids."""

    def __init__(self, out_dir: str, split: str, dtype: np.dtype, vocab_size: int, shard_tokens: int = 1 << 27):
        self.out_dir, self.split, self.dtype = out_dir, split, np.dtype(dtype).newbyteorder("<")
        if np.iinfo(self.dtype).max < vocab_size - 1:
            raise ValueError(f"{self.dtype.name} cannot hold token ids up to {vocab_size - 1}")
        self.vocab_size = vocab_size
        self.shard_tokens = shard_tokens
        self.files: list[str] = []
        self.total = 0
        self._file = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.files):04d}.bin"
        self.files.append(name)
        self._path = os.path.join(self.out_dir, name)
        self._file = open(self._path + ".tmp", "wb")
        self._in_shard = 0

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            os.replace(self._path + ".tmp", self._path)
            self._file = None

    def write(self, ids) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        arr = arr.astype(self.dtype)
        while arr.size:
            if self._file is None or self._in_shard >= self.shard_tokens:
                self._close()
                self._open()
            room = self.shard_tokens - self._in_shard
            part, arr = arr[:room], arr[room:]
            self._file.write(part.tobytes())
            self._in_shard += part.size
            self.total += part.size

    def close(self) -> list[str]:
        self._close()
        return self.files


def write_meta(out_dir: str, meta: dict) -> None:
    write_json(os.path.join(out_dir, "meta.json"), meta)


class DataDirError(UserError, ValueError):
    """A prepared-data directory that is missing, incomplete or inconsistent."""


def read_meta(data_dir: str) -> dict:
    path = os.path.join(data_dir, "meta.json")
    meta = read_json(path, DataDirError, f"{data_dir} has no meta.json: run `python -m data.prepare --out {data_dir}` first")
    if meta.get("dtype") not in ("uint16", "uint32") or not isinstance(meta.get("splits"), dict):
        raise DataDirError(f"{path} is not a data.prepare meta file")
    return meta


def load_split(data_dir: str, split: str) -> list[np.memmap]:
    """Memory-map every shard of a split (read-only); checks sizes against the dtype."""
    meta = read_meta(data_dir)
    if split not in meta["splits"]:
        raise DataDirError(f"{data_dir} has no {split!r} split (has {sorted(meta['splits'])})")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    arrays = []
    for name in meta["splits"][split]:
        path = os.path.join(data_dir, name)
        if not os.path.isfile(path):
            raise DataDirError(f"shard {path} listed in meta.json is missing")
        size = os.path.getsize(path)
        if size % dtype.itemsize:
            raise DataDirError(f"shard {path} is truncated ({size} bytes is not a whole number of {meta['dtype']})")
        if size:
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
    return arrays
