"""`python -m data.prepare --engine ray`: the same preparation as Ray tasks, on this
machine or on a cluster, with the same output byte for byte.

  plan      input files -> pieces: whole files (small ones grouped up to --split-bytes)
            and byte ranges of large plain JSONL files, cut at line starts; a task per
            range counts its lines, so each range knows its first line number and record
            ids are the local run's (`path:line`)
  filter    a task per group of pieces runs the local run's per-document function
            (filter_pass.process_record: normalize, filters, language, toxicity, PII, MinHash) on
            every record; it returns the records' outcomes (small: ids, reasons, hashes)
            to the driver, and leaves the passing texts and the LSH band keys, partitioned
            by key, in Ray's object store
  account   the driver takes the outcomes in input order through filter_pass.FilterResult.add,
            the local run's own bookkeeping: removal log, exact duplicates (first seen
            wins), survivor indices
  dedup     a task per band-key partition groups its keys into candidate pairs
            (dedup.band_candidate_pairs); the driver merges all pairs by union-find, and
            the smallest index (the first seen) survives, as in dedup.NearDedup
  tokenizer a task per filter output counts the pre-tokenized chunks of its training
            documents; the driver adds the counts and learns the merges once
  shards    a task per filter output encodes its survivors; the driver writes them to the
            shards in order as they arrive, while the next tasks encode

Results are always taken in plan order (file, then byte offset, then record), so every
first-seen decision, the split and the shards are those of `--engine local`. At most
`--workers` tasks run at a time. A task whose worker dies, or that fails with an
OSError, is retried by Ray (RETRIES); a bad input file is a counted reject, as locally.
On a cluster every node must see the inputs at the same paths (a shared filesystem); the
code (data/ and cli.py) is shipped to the workers with the job.
"""
from __future__ import annotations

import logging
import os
import socket
import uuid
import zlib
from collections import Counter, deque
from typing import Callable, Iterable, Iterator

import numpy as np

from cli import UserError

try:
    import ray
except ImportError:
    raise UserError("--engine ray needs Ray: pip install -r requirements-scale.txt") from None

from data.dedup import band_candidate_pairs, band_partitions, clusters_from_pairs
from data.filter_pass import (WORKER, FilterResult, PrepareConfig, Progress, RemovedLog, init_worker, near_dedup_report,
                              new_near_dedup, process_record)
from data.sources import Document, Piece, byte_ranges, count_lines, read_piece
from data.text.tokenizer import GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, Tokenizer, count_chunks, train_merges

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETRIES = {"max_retries": 3, "retry_exceptions": [OSError]}
_RANK_BITS = 32  # a document's global rank: (task index << 32) + its position among the task's documents


# ----------------------------------------------------------------------------- tasks (run on the workers)

def _setup_worker(setup) -> PrepareConfig:
    """The per-process state of prepare's workers, built once per run in each worker process."""
    run_id, cfg, blocklist_terms, policy = setup
    if WORKER.get("run") != run_id:
        init_worker(cfg, blocklist_terms, policy)
        WORKER["run"] = run_id
    return cfg


@ray.remote(**RETRIES)
def _count_lines_task(path: str, start: int, end: int) -> tuple[int, bool]:
    return count_lines(path, start, end)


@ray.remote(**RETRIES)
def _filter_task(setup, task_index: int, pieces: list[Piece], parts: int):
    """Pass 1 over some pieces: (outcomes, passing texts, *band-key partitions)."""
    cfg = _setup_worker(setup)
    outcomes, texts, signatures = [], [], []
    for piece in pieces:
        for record in read_piece(piece, cfg.text_field, cfg.max_doc_bytes):
            record, stats = process_record(record)
            if isinstance(record, Document):
                texts.append(record.text)
                record = Document(record.id, record.source, "")  # the text stays in the object store
                if parts:
                    signatures.append(stats.pop("signature"))
            outcomes.append((record, stats))
    if not parts:
        return outcomes, texts
    ranks = (task_index << _RANK_BITS) + np.arange(len(texts), dtype=np.int64)
    sigs = np.stack(signatures) if signatures else np.zeros((0, cfg.bands * cfg.rows), dtype=np.uint32)
    return (outcomes, texts, *band_partitions(sigs, ranks, cfg.bands, cfg.rows, parts))


@ray.remote(**RETRIES)
def _pairs_task(excluded: np.ndarray, *parts) -> np.ndarray:
    """Candidate pairs (global ranks) among one partition's band keys, exact duplicates left out."""
    band = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[1] for p in parts])
    ranks = np.concatenate([p[2] for p in parts])
    keep = ~np.isin(ranks, excluded)
    return band_candidate_pairs(band[keep], values[keep], ranks[keep])


@ray.remote(**RETRIES)
def _count_chunks_task(texts: list[str], positions: np.ndarray, pattern: str) -> Counter:
    return count_chunks((texts[i] for i in positions), pattern)


@ray.remote(**RETRIES)
def _encode_task(texts: list[str], positions: np.ndarray, tokenizer_state) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(UTF-8 bytes of each chosen text, all their token ids in one array, tokens per text)."""
    key, merges, pattern = tokenizer_state
    if WORKER.get("tokenizer_key") != key:
        WORKER["tokenizer"], WORKER["tokenizer_key"] = Tokenizer(merges, pattern), key
    chosen = [texts[i] for i in positions]
    encoded = WORKER["tokenizer"].encode_batch(chosen, num_threads=1)
    flat = np.concatenate([np.asarray(ids, dtype=np.uint32) for ids in encoded]) if encoded else np.zeros(0, np.uint32)
    return ([len(t.encode("utf-8", "surrogatepass")) for t in chosen], flat,
            np.array([len(ids) for ids in encoded], dtype=np.int64))


# ----------------------------------------------------------------------------- the driver

def _get(ref):
    """ray.get, with the failures a user can act on as one-line errors (a bug keeps its traceback)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (OSError, zlib.error)):
            raise UserError(f"reading input failed: {e.cause}") from None
        raise
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError) as e:
        raise UserError(f"a Ray task failed {RETRIES['max_retries'] + 1} times: {str(e).splitlines()[0]}") from None


def in_order(submit: Callable, items: Iterable, window: int) -> Iterator:
    """(item, submit(item)) for every item, in order, with at most `window` of the submitted
    tasks unfinished at any time: tasks run in parallel and finish in any order, the caller
    sees them in input order (a finished task waits for the ones before it to be handed back)."""
    items, pending, running = iter(items), deque(), set()
    while True:
        while len(running) < window:
            item = next(items, _END)
            if item is _END:
                break
            refs = submit(item)
            probe = refs[0] if isinstance(refs, list) else refs  # a task's returns are ready together
            pending.append((item, refs, probe))
            running.add(probe)
        if not pending:
            return
        if pending[0][2] in running:
            done, _ = ray.wait(list(running), num_returns=1, fetch_local=False)
            running.difference_update(done)
            continue
        item, refs, _ = pending.popleft()
        yield item, refs


_END = object()


def worker_env() -> dict:
    """The runtime_env of a Ray instance on this machine whose workers run our tasks."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise UserError(f"no Ray cluster at --ray-address {address} ({e}); start one with `ray start --head`") from None


def connect(cfg: PrepareConfig) -> bool:
    """Join the cluster at --ray-address, or start a Ray instance here with --workers CPUs;
    use the one already running in this process if any (its workers must be able to import
    data/: see worker_env). True when this run started Ray."""
    if ray.is_initialized():
        return False
    if cfg.ray_address and ":" in cfg.ray_address and "://" not in cfg.ray_address:
        _check_reachable(cfg.ray_address)  # ray.init would retry a wrong address for minutes
    try:
        if cfg.ray_address:  # the code travels with the job to every node
            code = {"py_modules": [os.path.join(REPO, "data"), os.path.join(REPO, "cli.py")],
                    "excludes": ["corpus/", "__pycache__/"]}
            ray.init(address=cfg.ray_address, runtime_env=code, logging_level=logging.WARNING)
        else:  # this machine: the workers import it from here
            ray.init(address="local", num_cpus=cfg.workers or os.cpu_count() or 1, include_dashboard=False,
                     runtime_env=worker_env(), logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot start or reach Ray{' at ' + cfg.ray_address if cfg.ray_address else ''}: "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return True


class RayEngine:
    """The engine interface of prepare.LocalEngine (filter_pass, near_duplicates,
    train_tokenizer, encoded, close), with the work in Ray tasks."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.started = connect(cfg)
        self.cpus = int(ray.cluster_resources().get("CPU", 1))
        self.window = cfg.workers or self.cpus
        self.run_id = uuid.uuid4().hex
        # near duplicates: band keys grouped in `parts` partitions across the cluster; with
        # --verify-jaccard the streaming index on the driver (its checks need earlier shingles)
        self.parts = self.window if cfg.near_dedup and cfg.verify_jaccard <= 0 else 0
        self.near = new_near_dedup(cfg) if not self.parts else None
        self.texts: list = []       # per filter task: ObjectRef of its passing texts
        self.partitions: list = []  # per filter task: ObjectRefs of its band-key partitions
        self.survivor: list = []    # per filter task: survivor index of each passing text, -1 if an exact duplicate
        self.excluded: list = []    # global ranks of the exact duplicates

    def describe(self) -> str:
        return f"Ray: {self.window} task(s) at a time, {self.cpus} CPU(s) in the cluster"

    def plan(self, files: list[str]) -> list[list[Piece]]:
        """The filter tasks' pieces, in input order."""
        split = self.cfg.split_bytes
        ranges = {path: byte_ranges(path, split) or [] for path in files}
        todo = [(path, a, b) for path, rs in ranges.items() for a, b in rs]
        lines = {key: _get(ref) for key, ref in in_order(lambda r: _count_lines_task.remote(*r), todo, self.window)}
        tasks, group, group_bytes = [], [], 0
        for path in files:
            if any(lines[(path, a, b)][1] for a, b in ranges[path]):  # (a file of blank lines is read whole)
                tasks += [group] if group else []
                group, group_bytes, line = [], 0, 1
                for a, b in ranges[path]:
                    tasks.append([Piece(path, a, b, line)])
                    line += lines[(path, a, b)][0]
                continue
            group.append(Piece(path))
            group_bytes += os.path.getsize(path) if os.path.isfile(path) else 0
            if group_bytes >= split:
                tasks.append(group)
                group, group_bytes = [], 0
        return tasks + ([group] if group else [])

    def filter_pass(self, files: list[str], blocklist_terms: list[str], log: RemovedLog, policy) -> FilterResult:
        """Pass 1 in tasks; the outcomes are accounted for in input order, as locally."""
        setup = ray.put((self.run_id, self.cfg, blocklist_terms, policy))
        tasks = self.plan(files)
        result, progress = FilterResult(), Progress("filter")

        def submit(t):
            return _filter_task.options(num_returns=2 + self.parts).remote(setup, t, tasks[t], self.parts)

        for t, refs in in_order(submit, range(len(tasks)), self.window):
            outcomes = _get(refs[0])
            self.texts.append(refs[1])
            self.partitions.append(refs[2:])
            survivor = []
            for record, stats in outcomes:
                is_doc = isinstance(record, Document)
                if result.add(record, stats, self.cfg, log, self.near):
                    survivor.append(len(result.ids) - 1)
                elif is_doc:  # an exact duplicate
                    self.excluded.append((t << _RANK_BITS) + len(survivor))
                    survivor.append(-1)
                result.progress(progress)
            self.survivor.append(np.array(survivor, dtype=np.int64))
        result.progress(progress, final=True)
        return result

    def near_duplicates(self) -> tuple[dict[int, int], dict]:
        """({removed survivor index: surviving index}, the report's near_dedup counts)."""
        if not self.parts:
            return (self.near.duplicates() if self.near else {}), near_dedup_report(self.near)
        excluded = ray.put(np.array(self.excluded, dtype=np.int64))
        refs = [_pairs_task.remote(excluded, *[task[p] for task in self.partitions]) for p in range(self.parts)]
        pairs = np.concatenate([_get(r) for r in refs]) if refs else np.zeros((0, 2), dtype=np.int64)
        self.partitions = []  # the band keys are no longer needed
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in self.survivor])])
        flat = np.concatenate(self.survivor) if self.survivor else np.zeros(0, dtype=np.int64)
        index = flat[offsets[pairs >> _RANK_BITS] + (pairs & ((1 << _RANK_BITS) - 1))]
        return clusters_from_pairs(index.tolist()), {"candidate_pairs": len(pairs), "rejected_by_jaccard": 0}

    def _chosen(self, skip: set) -> Iterator[tuple[int, np.ndarray]]:
        """(task, positions of its texts that are survivors not in `skip`) for every filter task."""
        skip_array = np.array(sorted(skip), dtype=np.int64)
        for t, survivor in enumerate(self.survivor):
            yield t, np.flatnonzero((survivor >= 0) & ~np.isin(survivor, skip_array))

    def train_tokenizer(self, skip: set) -> Tokenizer:
        """Chunk counts in tasks, the merges learned once, here."""
        counts: Counter = Counter()
        pattern = GPT4_SPLIT_PATTERN  # as Tokenizer.train

        def submit(chosen):
            return _count_chunks_task.remote(self.texts[chosen[0]], chosen[1], pattern)

        for _, ref in in_order(submit, self._chosen(skip), self.window):
            counts.update(_get(ref))
        merges = train_merges(counts, self.cfg.vocab_size - 256 - len(SPECIAL_TOKENS))
        return Tokenizer(merges, pattern)

    def encoded(self, tokenizer: Tokenizer, skip: set) -> Iterator[tuple[int, int, list[int]]]:
        """(survivor index, UTF-8 bytes, token ids) of every survivor not in `skip`, in order."""
        state = ray.put((uuid.uuid4().hex, tokenizer.merges, tokenizer.pattern))

        def submit(chosen):
            return _encode_task.remote(self.texts[chosen[0]], chosen[1], state)

        for (t, positions), ref in in_order(submit, self._chosen(skip), self.window):
            nbytes, flat, lengths = _get(ref)
            for i, n, ids in zip(self.survivor[t][positions], nbytes, np.split(flat, np.cumsum(lengths)[:-1])):
                yield int(i), n, ids.tolist()

    def close(self) -> None:
        self.texts, self.partitions = [], []
        if self.started:
            ray.shutdown()
