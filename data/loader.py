"""Training batches: pretraining windows from prepared shards (a weighted mixture,
distributed, resumable); conversations for SFT and PPO-ptx in length buckets; epochs of
shuffled indices for the reward model's pairs and PPO's prompts.

Pretraining:

Each source (a `data.prepare` output directory) is cut into windows of seq_len + 1
tokens (inputs and their next-token targets); every epoch visits its windows in a
fresh seeded permutation. A global step draws, for each of its `global_rows` rows, a
source with the mixture weights; the k-th draw of a source takes that source's next
window. Rank r keeps rows [r R, (r+1) R) of every step (R = global_rows / world):
ranks see disjoint data, and the rows of a step are the same whatever the world size,
so one process with the same global batch trains on exactly the same tokens.

The whole position is (step, cursor per source): that is the resume state.

Conversations (`BucketLoader`): right-padded batches of similar length, each rank its
slice of a global batch; state (epoch, position). Indices (`EpochCursor`): a seeded
permutation per epoch, read in global batches; state (epoch, index).
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from cli import UserError
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


# ----------------------------------------------------------------------------- conversations and indices

def batches_for_epoch(lengths: list[int], rows: int, epoch: int, seed: int) -> list[list[int]]:
    """Shuffle, then sort within pools of 50 batches by length, cut into batches, shuffle
    the batches: similar lengths share a batch, and the order stays random."""
    order = list(range(len(lengths)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    out = []
    pool = 50 * rows
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        out += [chunk[i:i + rows] for i in range(0, len(chunk) - rows + 1, rows)]
    random.Random(f"{seed}:{epoch}:batches").shuffle(out)
    return out


class BucketLoader:
    """Global batches of `rows` examples; each rank takes its slice. State: (epoch, position)."""

    def __init__(self, examples, rows: int, rank: int, world: int, seed: int):
        if len(examples) < rows:
            raise UserError(f"{len(examples)} training examples are fewer than one global batch of {rows}")
        self.examples, self.rows, self.rank, self.world, self.seed = examples, rows, rank, world, seed
        self.lengths = [len(e.ids) for e in examples]
        self.epoch, self.position = 0, 0
        self._batches = batches_for_epoch(self.lengths, rows, 0, seed)

    def next_batch(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = batches_for_epoch(self.lengths, self.rows, self.epoch, self.seed)
        batch = self._batches[self.position]
        self.position += 1
        per_rank = self.rows // self.world
        return collate([self.examples[i] for i in batch[self.rank * per_rank:(self.rank + 1) * per_rank]], pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = batches_for_epoch(self.lengths, self.rows, self.epoch, self.seed)


def collate(examples, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and targets; a target is -100 (ignored) unless the mask is 1."""
    width = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        ids, mask = torch.tensor(e.ids), torch.tensor(e.mask)
        n = len(e.ids) - 1
        x[row, :n] = ids[:-1]
        y[row, :n] = torch.where(mask[1:] == 1, ids[1:], torch.tensor(-100))
    return x, y


class EpochCursor:
    """Global batches of indices into n items: epoch e visits them in the permutation
    seeded by seed + e; a batch that would run past the end starts the next epoch (the
    tail is left out). State: {"epoch", "index"}, the whole resume position."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def next(self) -> list[int]:
        if self.index + self.batch > self.n:
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        rows = self._order[self.index:self.index + self.batch]
        self.index += self.batch
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation()
