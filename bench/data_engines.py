"""`python -m data.prepare` throughput with `--engine local` and `--engine ray`, and how the
deduplication state grows with the number of documents.

    pip install -r requirements-scale.txt
    python -m bench.data_engines [--mb 100] [--append BENCHMARKS.md]

1. A synthetic corpus of `--mb` MB, made from the embedded Shakespeare corpus: passages
   of `--passage-lines` lines, each repeated with a tenth of its words replaced (so the
   copies are different documents), plus exact copies (changed whitespace) and near
   copies (two words changed) of earlier passages, spread over `--files` plain JSONL
   files (each larger than --split-bytes, so the Ray engine reads byte ranges).
2. The whole `python -m data.prepare` on it, timed as a subprocess: `--engine local` and
   `--engine ray` with each `--ray-workers` count (a Ray instance started by the run,
   included in the time). MB/s = input bytes / wall seconds, and for the filter pass
   alone. The outputs are compared byte for byte.
3. Memory of the deduplication state for 10^4.. documents of random signatures (every
   band key unique, the worst case), each measured in a fresh process as its peak RSS
   growth: the exact-duplicate table (on the driver of either engine), the local run's
   streaming LSH index (dedup.NearDedup, on the driver), and the Ray engine's band-key
   partitions with their grouping (dedup.band_partitions + band_candidate_pairs; spread
   over the partition tasks, so a node holds its share).
"""
from __future__ import annotations

import datetime
import filecmp
import gzip
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from bench.data import machine
from cli import UserError, entry_point, parse_config, print_config
from data.filter_pass import DEFAULT_CORPUS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class BenchConfig:
    mb: float = field(default=100.0, metadata={"help": "size of the synthetic corpus in MB"})
    files: int = field(default=4, metadata={"help": "JSONL files the corpus is spread over"})
    passage_lines: int = field(default=200, metadata={"help": "lines of Shakespeare per document"})
    ray_workers: list[int] = field(default_factory=lambda: [1, 2], metadata={"help": "--workers of each Ray run", "nargs": True})
    local_workers: int = field(default=2, metadata={"help": "--workers of the local run"})
    vocab_size: int = field(default=8192, metadata={"help": "tokenizer size of every run"})
    memory_docs: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000],
                                   metadata={"help": "document counts of the dedup memory measurement", "nargs": True})
    append: str = field(default="", metadata={"help": "append a results section to this markdown file"})

    def __post_init__(self):
        if self.mb <= 0 or self.files < 1 or self.passage_lines < 1:
            raise UserError("--mb, --files and --passage-lines must be positive")


# ----------------------------------------------------------------------------- 1. the corpus

def passages(lines_per_passage: int) -> list[str]:
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        works = [json.loads(line)["text"] for line in f]
    out = []
    for text in works:
        lines = text.split("\n")
        out += ["\n".join(lines[i:i + lines_per_passage]) for i in range(0, len(lines), lines_per_passage)]
    return [p for p in out if len(p.split()) >= 80]


def _replace_words(text: str, frac: float, vocab: list[str], rng: random.Random, count: int = 0) -> str:
    words = text.split(" ")
    for _ in range(count or max(1, int(frac * len(words)))):
        i = rng.randrange(len(words))
        words[i] = rng.choice(vocab)
    return " ".join(words)


def make_corpus(cfg: BenchConfig, out_dir: str) -> tuple[list[str], dict]:
    """Write the corpus; (its files, counts of planted duplicates)."""
    rng = random.Random(0)
    base = passages(cfg.passage_lines)
    vocab = sorted({w for p in base[:200] for w in p.split() if w.isalpha()})
    target = int(cfg.mb * 1e6)
    docs, written, planted = [], 0, {"exact": 0, "near": 0}
    while written < target:
        k = rng.random()
        if docs and k < 0.05:  # an exact copy of an earlier document, other whitespace
            text = rng.choice(docs).replace(" ", "  ")
            planted["exact"] += 1
        elif docs and k < 0.10:  # a near copy: two words changed
            text = _replace_words(rng.choice(docs), 0, vocab, rng, count=2)
            planted["near"] += 1
        else:
            text = _replace_words(rng.choice(base), 0.1, vocab, rng)
        docs.append(text)
        written += len(json.dumps({"text": text})) + 1
    paths = [os.path.join(out_dir, f"part-{k:02d}.jsonl") for k in range(cfg.files)]
    per_file = -(-len(docs) // cfg.files)
    for k, path in enumerate(paths):
        with open(path, "w", encoding="utf-8") as f:
            for j, text in enumerate(docs[k * per_file:(k + 1) * per_file]):
                f.write(json.dumps({"id": f"d{k}-{j}", "text": text}) + "\n")
    planted["documents"] = len(docs)
    return paths, planted


# ----------------------------------------------------------------------------- 2. the runs

def run_prepare(corpus_dir: str, out: str, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "data.prepare", "--input", corpus_dir, "--out", out, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise UserError(f"data.prepare {' '.join(args)} failed (exit code {proc.returncode}); its output is above")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    mb = report["bytes"]["input"] / 1e6
    return {"wall_s": wall, "mb_per_s": mb / wall, "filter_mb_per_s": mb / report["seconds"]["read_filter"],
            "seconds": report["seconds"], "documents": report["documents"], "input_mb": mb}


def same_output(a: str, b: str) -> bool:
    names = sorted(n for n in os.listdir(a) if n not in ("report.json", "prepare_config.json"))
    if names != sorted(n for n in os.listdir(b) if n not in ("report.json", "prepare_config.json")):
        return False
    reports = []
    for d in (a, b):
        with open(os.path.join(d, "report.json")) as f:
            reports.append({k: v for k, v in json.load(f).items() if k != "seconds"})
    return reports[0] == reports[1] and all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


# ----------------------------------------------------------------------------- 3. dedup memory

def _memory_mb(field_name: str) -> float:
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field_name + ":")) * 1024 / 1e6


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def _measure(kind: str, n: int) -> dict:
    """In a fresh process: peak RSS growth (MB) while building one kind of dedup state for n
    documents: "exact" (the exact-duplicate table and the survivors' ids, on the driver of
    either engine), "near-local" (the local streaming LSH index, on the driver), "near-ray"
    (the Ray engine's band-key partitions and their grouping, all partitions together)."""
    from data.dedup import NearDedup, band_candidate_pairs, band_partitions
    rng = np.random.default_rng(n)
    _reset_peak()
    before = _memory_mb("VmRSS")
    t0 = time.perf_counter()
    block = 50_000
    if kind == "exact":
        seen, ids = {}, []
        for i in range(n):
            ids.append(f"part-00.jsonl:{i}")
            seen[hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()] = ids[-1]
    elif kind == "near-local":
        near = NearDedup(14, 8)
        for start in range(0, n, block):
            for j, sig in enumerate(rng.integers(0, 1 << 32, size=(min(block, n - start), 112), dtype=np.uint32)):
                near.add(start + j, sig)
        near.duplicates()
    else:
        parts = []
        for start in range(0, n, block):
            sigs = rng.integers(0, 1 << 32, size=(min(block, n - start), 112), dtype=np.uint32)
            parts.append(band_partitions(sigs, np.arange(start, start + len(sigs), dtype=np.int64), 14, 8, 1)[0])
        del sigs
        band, values, ranks = (np.concatenate([p[k] for p in parts]) for k in range(3))
        parts = None
        band_candidate_pairs(band, values, ranks)
    seconds = time.perf_counter() - t0
    peak = _memory_mb("VmHWM") - before
    return {"kind": kind, "documents": n, "peak_mb": peak, "bytes_per_doc": peak * 1e6 / n, "seconds": seconds}


MEMORY_KINDS = ("exact", "near-local", "near-ray")


def measure_memory(n: int, kind: str) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_measure, kind, n).result()


# ----------------------------------------------------------------------------- main

def report_lines(cfg: BenchConfig, argv, corpus: dict, runs: dict, memory: list[dict]) -> list[str]:
    cmd = "python -m bench.data_engines " + " ".join(sys.argv[1:] if argv is None else argv)
    load = os.getloadavg()
    lines = [f"\n## Data preparation: `--engine local` and `--engine ray` — {datetime.date.today().isoformat()}\n",
             f"Machine: {machine()}; load average {load[0]:.1f} at the end (a shared machine: other jobs were running). "
             f"Command: `{cmd.strip()}`.\n",
             f"Corpus: {corpus['input_mb']:.1f} MB in {cfg.files} JSONL files, {corpus['documents']:,} documents "
             f"(Shakespeare passages of {cfg.passage_lines} lines with a tenth of their words replaced; "
             f"{corpus['exact']:,} exact and {corpus['near']:,} near copies planted), vocab {cfg.vocab_size}.\n",
             "| engine | workers | wall | MB/s (whole run) | MB/s (filter pass) | filter / dedup / tokenizer / tokenize s | same output as local |",
             "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        s = r["seconds"]
        lines.append(f"| {name.split()[0]} | {name.split()[1]} | {r['wall_s']:.1f} s | {r['mb_per_s']:.2f} | "
                     f"{r['filter_mb_per_s']:.2f} | {s['read_filter']:.1f} / {s['dedup']:.1f} / {s['tokenizer']:.1f} / "
                     f"{s['tokenize']:.1f} | {r.get('same', 'reference')} |")
    lines += ["", "Deduplication state against the number of documents: peak RSS growth in a fresh process "
              "(random signatures, so every band key is unique: the worst case), and the time to build it:", "",
              "| documents | exact table + ids (the driver, either engine) | near, local: NearDedup (the driver) | "
              "near, Ray: band keys + grouping (all partitions together) |", "|---|---|---|---|"]
    by_n: dict = {}
    for m in memory:
        by_n.setdefault(m["documents"], {})[m["kind"]] = m
    for n, m in sorted(by_n.items()):
        lines.append(f"| {n:,} | " + " | ".join(f"{m[k]['peak_mb']:,.0f} MB = {m[k]['bytes_per_doc']:,.0f} B/doc "
                                                f"({m[k]['seconds']:.1f} s)" for k in MEMORY_KINDS) + " |")
    return lines + [""]


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(BenchConfig, argv, description="data.prepare throughput by engine, and dedup memory")
    print_config(cfg, "bench config")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError("bench.data_engines needs Ray: pip install -r requirements-scale.txt") from None
    with tempfile.TemporaryDirectory() as tmp:
        corpus_dir = os.path.join(tmp, "corpus")
        os.makedirs(corpus_dir)
        t0 = time.perf_counter()
        _, corpus = make_corpus(cfg, corpus_dir)
        print(f"corpus: {corpus['documents']:,} documents in {time.perf_counter() - t0:.1f} s", flush=True)
        common = ["--vocab-size", str(cfg.vocab_size)]
        runs = {f"local {cfg.local_workers}": run_prepare(corpus_dir, os.path.join(tmp, "local"),
                                                          common + ["--workers", str(cfg.local_workers)])}
        print(f"local: {runs[f'local {cfg.local_workers}']}", flush=True)
        corpus["input_mb"] = runs[f"local {cfg.local_workers}"]["input_mb"]
        for w in cfg.ray_workers:
            out = os.path.join(tmp, f"ray{w}")
            runs[f"ray {w}"] = run_prepare(corpus_dir, out, common + ["--engine", "ray", "--workers", str(w)])
            runs[f"ray {w}"]["same"] = "yes" if same_output(os.path.join(tmp, "local"), out) else "NO"
            print(f"ray {w}: {runs[f'ray {w}']}", flush=True)
    memory = []
    for n in cfg.memory_docs:
        for kind in MEMORY_KINDS:
            memory.append(measure_memory(n, kind))
            print(f"dedup memory: {memory[-1]}", flush=True)
    lines = report_lines(cfg, argv, corpus, runs, memory)
    print("\n".join(lines))
    if cfg.append:
        with open(cfg.append, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        print(f"appended to {cfg.append}")


if __name__ == "__main__":
    main()
