"""Pretraining batches from prepared shards: a weighted mixture, distributed, resumable.

Each source (a `data.prepare` output directory) is cut into windows of seq_len + 1
tokens (inputs and their next-token targets); every epoch visits its windows in a
fresh seeded permutation. A global step draws, for each of its `global_rows` rows, a
source with the mixture weights; the k-th draw of a source takes that source's next
window. Rank r keeps rows [r R, (r+1) R) of every step (R = global_rows / world):
ranks see disjoint data, and the rows of a step are the same whatever the world size,
so one process with the same global batch trains on exactly the same tokens.

The whole position is (step, cursor per source): that is the resume state.
"""
from __future__ import annotations

import os

import numpy as np

from data.shards import DataDirError, load_split, read_meta


def parse_mixture(spec: str) -> list[tuple[str, str, float]]:
    """'DIR' or 'name=DIR:weight,name2=DIR2:weight2' -> [(name, dir, weight)], weights summing to 1."""
    sources = []
    for i, part in enumerate(p for p in spec.split(",") if p.strip()):
        part = part.strip()
        name, _, rest = part.rpartition("=") if "=" in part else (f"data{i}", "", part)
        path, weight = rest, 1.0
        if ":" in rest:
            head, _, tail = rest.rpartition(":")
            try:
                weight = float(tail)
                path = head
            except ValueError:
                path = rest  # a ':' inside the path, no weight given
        if weight <= 0:
            raise ValueError(f"mixture weight for {name!r} must be positive, got {weight}")
        sources.append((name or f"data{i}", path, weight))
    if not sources:
        raise ValueError("--data is empty")
    names = [s[0] for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate source names in --data: {names}")
    total = sum(s[2] for s in sources)
    return [(n, p, w / total) for n, p, w in sources]


class TokenSource:
    """The windows of one split of one prepared directory."""

    def __init__(self, data_dir: str, split: str, seq_len: int):
        self.dir, self.split, self.seq_len = data_dir, split, seq_len
        self.meta = read_meta(data_dir)
        self.arrays = load_split(data_dir, split)
        per_file = np.array([max(0, (len(a) - 1) // seq_len) for a in self.arrays], dtype=np.int64)
        self.ends = np.cumsum(per_file)
        self.num_windows = int(self.ends[-1]) if len(self.ends) else 0
        if self.num_windows == 0:
            ntok = sum(len(a) for a in self.arrays)
            raise DataDirError(f"{data_dir} {split} split has {ntok} tokens: too few for one sequence of {seq_len + 1}")

    def window(self, w: int) -> np.ndarray:
        f = int(np.searchsorted(self.ends, w, side="right"))
        start = (w - (int(self.ends[f - 1]) if f else 0)) * self.seq_len
        return np.asarray(self.arrays[f][start:start + self.seq_len + 1], dtype=np.int64)


class MixtureLoader:
    def __init__(self, sources: list[tuple[str, str, float]], seq_len: int, global_rows: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, split: str = "train"):
        if global_rows % world_size:
            raise ValueError(f"{global_rows} rows per step do not split over {world_size} ranks")
        self.names = [s[0] for s in sources]
        self.weights = np.array([s[2] for s in sources], dtype=np.float64)
        self.sources = [TokenSource(path, split, seq_len) for _, path, _ in sources]
        vocab = {s.meta["vocab_size"] for s in self.sources}
        if len(vocab) > 1:
            raise DataDirError(f"mixture sources have different vocabularies {sorted(vocab)}: prepare them with one --tokenizer")
        self.seq_len, self.global_rows = seq_len, global_rows
        self.rank, self.world = rank, world_size
        self.seed = seed
        self.step = 0
        self.cursors = [0] * len(self.sources)  # windows consumed per source, over the whole run
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _window_id(self, src: int, k: int) -> int:
        n = self.sources[src].num_windows
        epoch, i = divmod(k, n)
        key = (src, epoch)
        if key not in self._perm_cache:
            self._perm_cache = {key: np.random.default_rng([self.seed, src, epoch]).permutation(n)}
        return int(self._perm_cache[key][i])

    def source_choices(self, step: int) -> np.ndarray:
        """Which source each global row of `step` reads (the same on every rank)."""
        if len(self.sources) == 1:
            return np.zeros(self.global_rows, dtype=np.int64)
        return np.random.default_rng([self.seed, 7919, step]).choice(len(self.sources), size=self.global_rows,
                                                                     p=self.weights)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets), each (global_rows / world, seq_len) int64, for this rank."""
        choices = self.source_choices(self.step)
        per_rank = self.global_rows // self.world
        mine = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        rows = []
        counters = list(self.cursors)
        for g, src in enumerate(choices):
            k = counters[src]
            counters[src] += 1
            if g in mine:
                rows.append(self.sources[src].window(self._window_id(src, k)))
        self.cursors = counters
        self.step += 1
        batch = np.stack(rows)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"step": self.step, "cursors": list(self.cursors), "names": self.names, "seed": self.seed,
                "seq_len": self.seq_len, "global_rows": self.global_rows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("names") != self.names or state.get("seq_len") != self.seq_len:
            raise ValueError(f"data state was saved for sources {state.get('names')} with seq_len "
                             f"{state.get('seq_len')}, this run has {self.names} with seq_len {self.seq_len}")
        self.step, self.cursors = int(state["step"]), [int(c) for c in state["cursors"]]


def eval_windows(source: TokenSource, max_windows: int, rank: int, world: int) -> list[np.ndarray]:
    """A fixed, evenly spread set of windows of a (validation) source; rank r takes every
    world-th. Every rank gets the same number (a sharded forward is a collective), so the
    count is rounded down to a multiple of the world size (at least one window each)."""
    n = min(max_windows, source.num_windows)
    n = max(world, n - n % world)
    ids = np.linspace(0, source.num_windows - 1, n).round().astype(np.int64)
    return [source.window(int(w)) for w in ids[rank::world]]


def has_split(data_dir: str, split: str) -> bool:
    return bool(read_meta(data_dir)["splits"].get(split))


def default_data_ready(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta.json"))
