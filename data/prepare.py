"""Stage 0: raw text -> clean, deduplicated, tokenized shards (`python -m data.prepare`).

The order is the one the data literature converged on (C4, Gopher/MassiveText,
RefinedWeb, FineWeb): cheap normalization first, then document filters from cheapest to
dearest, then PII scrubbing of what survives, then deduplication, and only then the
tokenizer, trained on the final training text so its merges fit what the model sees.

  pass 1  read -> normalize -> line filters -> quality -> language -> toxicity -> PII
          -> exact dedup (on the fly) -> MinHash signature into the LSH index
          survivors are spilled to disk, so memory holds only hashes and signatures
  dedup   LSH candidates -> union-find clusters -> one survivor per cluster
  split   train/val by document (hash of the id)
  pass 2  train the BPE tokenizer on the train documents (or load --tokenizer)
  pass 3  encode, join documents with <|endoftext|> (or cut fixed-length chunks), write shards

Every input record ends up kept or removed with a reason (report.json, removed.jsonl):
documents.read == documents.kept + sum(documents.removed).

Where the work runs is the engine's business: `--engine local` (LocalEngine, below: a
process pool on this machine) or `--engine ray` (data/ray_engine.py: Ray tasks on a
cluster). Both run the same per-document function and bookkeeping (data/filter_pass.py:
`process_record`, `FilterResult.add`) and the same `write_shards`, so their outputs are
identical byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator, Optional

from cli import UserError, config_dict, entry_point, parse_config, print_config
from data import governance
from data.files import write_json
from data.filter_pass import (FilterResult, PrepareConfig, Progress, RemovedLog, filter_pass, near_dedup_report,
                              new_near_dedup)
from data.shards import ShardWriter, dtype_for_vocab, write_meta
from data.sources import list_files
from data.text.tokenizer import Tokenizer
from data.toxicity import load_blocklist


def _val_indices(ids: list[str], survivors: list[int], fraction: float, seed: int) -> set[int]:
    """The documents whose hashed id ranks lowest: deterministic, order-independent."""
    if fraction <= 0 or len(survivors) < 2:
        return set()
    k = max(1, round(fraction * len(survivors)))
    key = lambda i: hashlib.blake2b(f"{seed}:{ids[i]}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return set(sorted(survivors, key=key)[:k])


def _iter_spill(path: str):
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _chunk_rows(ids: list[int], cfg: PrepareConfig, pad_id: int) -> list[list[int]]:
    """Fixed-length windows every `chunk_stride` tokens; a short tail is padded, or dropped
    when shorter than `min_chunk_len`."""
    rows = []
    start = 0
    while True:
        window = ids[start:start + cfg.chunk_len]
        if len(window) < cfg.chunk_len:
            if len(window) < cfg.min_chunk_len:
                break
            window = window + [pad_id] * (cfg.chunk_len - len(window))
        rows.append(window)
        if start + cfg.chunk_len >= len(ids):
            break
        start += cfg.chunk_stride
    return rows


def _prepare_out_dir(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to output directory {out}: {e.strerror or e}") from None
    # A previous run's shards must not be mistaken for this run's.
    for name in os.listdir(out):
        if name == "meta.json" or re.fullmatch(r"(train|val)_\d{4}\.bin(\.tmp)?", name):
            os.remove(os.path.join(out, name))


# ----------------------------------------------------------------------------- the run, step by step

@dataclass
class Inputs:
    files: list[str]
    blocklist_terms: list[str]
    tokenizer: Optional[Tokenizer]  # the --tokenizer to reuse, or None
    sources: list  # governance.Source entries of --sources (empty without one)
    policy: governance.Policy


def open_inputs(cfg: PrepareConfig) -> Inputs:
    """The input files (those of --sources, else --input), the blocklist, the tokenizer to
    reuse, the governance policy; an output directory that is writable and holds no
    earlier shards."""
    sources = governance.load_sources(cfg.sources) if cfg.sources else []
    paths = [s.path for s in sources] if sources else cfg.input
    try:
        files = list_files(paths)
    except FileNotFoundError as e:
        raise UserError(f"input path not found: {e.args[0]}") from None
    if not files:
        raise UserError(f"no readable input files (.txt, .jsonl, .jsonl.gz, .parquet) under {' '.join(paths)}")
    policy = governance.build_policy(files, sources, cfg.allow_licenses, cfg.require_consent, cfg.opt_out,
                                     cfg.decontamination_files(), cfg.decontam_ngram, cfg.flag_only,
                                     cfg.representation_probe)
    blocklist_terms: list[str] = []
    if cfg.toxicity:
        try:
            blocklist_terms = load_blocklist(cfg.blocklist)
        except OSError as e:
            raise UserError(f"cannot read --blocklist {cfg.blocklist}: {e.strerror}") from None
    tokenizer = Tokenizer.load(cfg.tokenizer) if cfg.tokenizer else None
    _prepare_out_dir(cfg.out)
    return Inputs(files, blocklist_terms, tokenizer, sources, policy)


class LocalEngine:
    """This machine: a process pool for pass 1 and for the tokenizer's counting, tiktoken's
    threads for encoding; the survivors' text waits in a spill file between the passes.
    (data/ray_engine.py is the same run as Ray tasks.)"""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.workers = cfg.workers or min(8, os.cpu_count() or 1)
        self.spill_path = os.path.join(cfg.out, ".spill.jsonl")
        self.near = new_near_dedup(cfg)

    def describe(self) -> str:
        return f"{self.workers} worker(s)"

    def filter_pass(self, files: list[str], blocklist_terms: list[str], log: RemovedLog,
                    policy: governance.Policy) -> FilterResult:
        return filter_pass(self.cfg, files, blocklist_terms, self.workers, log, self.near, self.spill_path, policy)

    def near_duplicates(self) -> tuple[dict[int, int], dict]:
        """({removed survivor index: surviving index}, the report's near_dedup counts)."""
        return (self.near.duplicates() if self.near else {}), near_dedup_report(self.near)

    def _texts(self, skip: set) -> Iterator[tuple[int, str]]:
        for i, rec in enumerate(_iter_spill(self.spill_path)):
            if i not in skip:
                yield i, rec["text"]

    def train_tokenizer(self, skip: set) -> Tokenizer:
        """The BPE tokenizer trained on the survivors not in `skip`."""
        return Tokenizer.train((t for _, t in self._texts(skip)), self.cfg.vocab_size, workers=self.workers)

    def encoded(self, tokenizer: Tokenizer, skip: set) -> Iterator[tuple[int, int, list[int]]]:
        """(survivor index, UTF-8 bytes, token ids) of every survivor not in `skip`, in order."""
        texts = self._texts(skip)
        while True:
            batch = list(islice(texts, 256))
            if not batch:
                return
            encoded = tokenizer.encode_batch([t for _, t in batch], num_threads=self.workers)
            for (i, text), tokens in zip(batch, encoded):
                yield i, len(text.encode("utf-8", "surrogatepass")), tokens

    def close(self) -> None:
        if os.path.exists(self.spill_path):
            os.remove(self.spill_path)


def make_engine(cfg: PrepareConfig):
    if cfg.engine == "ray":
        from data.ray_engine import RayEngine  # Ray is imported only here
        return RayEngine(cfg)
    return LocalEngine(cfg)


def write_shards(cfg: PrepareConfig, tokenizer: Tokenizer, encoded: Iterable[tuple[int, int, list[int]]],
                 val_set: set, kept: int, copies: Optional[dict] = None, source_of: Optional[list] = None) -> dict:
    """Pass 3: write the encoded documents ((index, UTF-8 bytes, token ids), in order), each
    after a separator and `copies[index]` times (the mixture's repetitions; once when
    absent), to the train and val shards, then meta.json; returns the report's token and
    byte counts (train tokens per source with `source_of`, each survivor's source).
    A corpus of a single document (one text file) has no document to hold out: then the
    last --val-fraction of its tokens is the validation split (split_documents counts it
    in both; report["val_split"] says which way the split went)."""
    copies = copies or {}
    tail = cfg.val_fraction if cfg.val_fraction > 0 and not val_set and kept == 1 else 0.0
    tokens_by_source: Counter = Counter()
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    writers = {s: ShardWriter(cfg.out, s, dtype, tokenizer.vocab_size, cfg.shard_tokens) for s in ("train", "val")}
    doc_tokens = kept_bytes = 0
    docs_per_split, chunks_per_split = Counter(), Counter()
    progress = Progress("tokenize")
    for i, nbytes, tokens in encoded:
        split = "val" if i in val_set else "train"
        docs_per_split[split] += 1
        doc_tokens += len(tokens)
        kept_bytes += nbytes
        ids_with_sep = [tokenizer.eot_id] + list(tokens)  # every document starts after a separator
        if tail:
            cut = len(ids_with_sep) - max(1, round(tail * len(tokens)))
            ids_with_sep, held = ids_with_sep[:cut], [tokenizer.eot_id] + ids_with_sep[cut:]
            docs_per_split["val"] += 1
            for row in [held] if cfg.layout == "stream" else _chunk_rows(held, cfg, tokenizer.pad_id):
                writers["val"].write(row)
        rows = [ids_with_sep] if cfg.layout == "stream" else _chunk_rows(ids_with_sep, cfg, tokenizer.pad_id)
        times = copies.get(i, 1)
        if cfg.layout != "stream":
            chunks_per_split[split] += len(rows) * times
        if source_of is not None and split == "train":
            tokens_by_source[source_of[i]] += len(ids_with_sep) * times
        for _ in range(times):
            for row in rows:
                writers[split].write(row)
        progress.update(docs_per_split.total(), kept)
    splits = {s: w.close() for s, w in writers.items()}
    meta = {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "splits": splits,
            "tokens": {s: w.total for s, w in writers.items()}, "layout": cfg.layout,
            "eot_id": tokenizer.eot_id, "pad_id": tokenizer.pad_id, "tokenizer": "tokenizer.json",
            "bytes_per_token": kept_bytes / max(1, doc_tokens)}
    if cfg.layout == "chunks":
        meta["chunk_len"] = cfg.chunk_len
    write_meta(cfg.out, meta)
    counts = {"tokens": {s: w.total for s, w in writers.items()},
              "val_split": "the last tokens of the only document" if tail else "by document",
              "split_documents": {"train": docs_per_split["train"], "val": docs_per_split["val"]},
              "bytes_per_token": round(kept_bytes / max(1, doc_tokens), 4),
              "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "kept_bytes": kept_bytes}
    if cfg.layout == "chunks":
        counts["chunks"] = dict(chunks_per_split)
    if source_of is not None:
        counts["train_tokens_by_source"] = dict(tokens_by_source)
    return counts


def run(cfg: PrepareConfig) -> dict:
    """The whole preparation: inputs, pass 1 (governance, filters, decontamination),
    near-duplicate clusters, the mixture, pass 2 (the tokenizer), pass 3 (shards),
    report.json and DATA_CARD.md. Raises cli.UserError for bad input and when no document
    survives. The engine (local processes or Ray tasks) changes where the work runs, never
    its result."""
    t_start = time.time()
    seconds: dict[str, float] = {}
    inputs = open_inputs(cfg)
    tokenizer = inputs.tokenizer
    write_json(os.path.join(cfg.out, "prepare_config.json"), config_dict(cfg))
    engine = make_engine(cfg)
    try:
        print(f"prepare: {len(inputs.files)} input file(s) -> {cfg.out} ({engine.describe()})", flush=True)
        log = RemovedLog(os.path.join(cfg.out, "removed.jsonl"))
        passed = engine.filter_pass(inputs.files, inputs.blocklist_terms, log, inputs.policy)
        seconds["read_filter"] = time.time() - t_start

        t0 = time.time()  # near-duplicate clusters
        near_dups, near_counts = engine.near_duplicates()
        for index in sorted(near_dups):
            passed.per_source[passed.source_names[index]]["removed:near_duplicate"] += 1
            log.remove(passed.ids[index], passed.sources[index], "near_duplicate", duplicate_of=passed.ids[near_dups[index]])
        survivors = [i for i in range(len(passed.ids)) if i not in near_dups]
        seconds["dedup"] = time.time() - t0
        val_set = _val_indices(passed.ids, survivors, cfg.val_fraction, cfg.seed)
        if cfg.val_fraction > 0 and len(survivors) == 1:
            print(f"prepare: one document: the validation split is its last {100 * cfg.val_fraction:g}% of tokens "
                  f"(a split by document needs two)", flush=True)
        copies = mix(passed, survivors, val_set, inputs.sources, cfg.seed, log)
        log.file.close()
        dropped = {i for i, c in copies.items() if c == 0}
        survivors = [i for i in survivors if i not in dropped]
        kept, removed = len(survivors), log.counts
        report = {
            "documents": {"read": passed.read, "kept": kept, "removed": dict(sorted(removed.items()))},
            "pii": {kind: passed.pii.get(kind, 0) for kind in cfg.pii_kinds} if cfg.pii else {},
            "lines_removed": passed.lines_removed,
            "bytes": {"input": passed.bytes_in},
            "near_dedup": near_counts,
        }
        assert passed.read == kept + sum(removed.values()), "every record must be kept or removed"
        if kept == 0:
            _write_report(cfg.out, report, seconds, t_start)
            raise UserError(f"no document survived filtering ({passed.read} read); "
                            f"see {os.path.join(cfg.out, 'removed.jsonl')}")
        skip = set(near_dups) | dropped

        t0 = time.time()  # pass 2: the tokenizer
        if tokenizer is None:
            print(f"[tokenizer] training byte-level BPE, vocab {cfg.vocab_size}, on {kept - len(val_set)} train documents", flush=True)
            tokenizer = engine.train_tokenizer(skip | val_set)
            if tokenizer.vocab_size < cfg.vocab_size:
                print(f"[tokenizer] the corpus supports only {tokenizer.vocab_size} tokens (asked {cfg.vocab_size})")
        tokenizer.save(os.path.join(cfg.out, "tokenizer.json"))
        seconds["tokenizer"] = time.time() - t0

        t0 = time.time()  # pass 3: encode and write shards
        counts = write_shards(cfg, tokenizer, engine.encoded(tokenizer, skip), val_set, kept, copies,
                              passed.source_names)
        seconds["tokenize"] = time.time() - t0
    finally:
        engine.close()
    report["bytes"]["kept"] = counts.pop("kept_bytes")
    tokens_by_source = counts.pop("train_tokens_by_source")
    report.update(counts)
    report.update(governance_report(cfg, inputs, passed, survivors, val_set, copies, tokens_by_source))
    _write_report(cfg.out, report, seconds, t_start)
    governance.write_data_card(os.path.join(cfg.out, "DATA_CARD.md"), report)
    return report


def mix(passed: FilterResult, survivors: list[int], val_set: set, sources: list, seed: int,
        log: RemovedLog) -> dict[int, int]:
    """The mixture over the training survivors ({index: copies}); documents it leaves out
    are logged as removed (mixture_downsampled). Validation documents are never repeated
    or dropped: the split stays by document."""
    if not sources:
        return {}
    train = [(i, passed.ids[i], passed.source_names[i], passed.domains[i], passed.sizes[i])
             for i in survivors if i not in val_set]
    copies = governance.mixture_copies(train, sources, seed)
    for i in sorted(i for i, c in copies.items() if c == 0):
        passed.per_source[passed.source_names[i]]["removed:mixture_downsampled"] += 1
        log.remove(passed.ids[i], passed.sources[i], "mixture_downsampled")
    return copies


def governance_report(cfg: PrepareConfig, inputs: Inputs, passed: FilterResult, survivors: list[int], val_set: set,
                      copies: dict, tokens_by_source: Counter) -> dict:
    """The report's sources, composition (per source and per domain), contamination and
    representation entries: what DATA_CARD.md shows."""
    declared = {s.name: s for s in inputs.sources}
    per: dict[str, dict] = {}
    for name, c in passed.per_source.items():
        src = declared.get(name)
        per[name] = {"domain": passed.domain_of[name], "documents_read": c["read"], "bytes_in": c["bytes_in"],
                     "removed": {k.split(":", 1)[1]: v for k, v in sorted(c.items()) if k.startswith("removed:")},
                     "documents_kept": 0, "bytes_kept": 0, "repeats": 0, "train_tokens": tokens_by_source.get(name, 0),
                     "license": src.license if src else None, "consent": src.consent if src else None}
    groups: dict[str, Counter] = {}
    for i in survivors:
        entry = per[passed.source_names[i]]
        entry["documents_kept"] += 1
        entry["bytes_kept"] += passed.sizes[i]
        entry["repeats"] += max(0, copies.get(i, 1) - 1)
        if passed.groups[i] is not None:
            groups.setdefault(passed.source_names[i], Counter()).update(passed.groups[i])
    total_tokens = sum(tokens_by_source.values()) or 1
    for entry in per.values():
        entry["train_token_share"] = round(entry["train_tokens"] / total_tokens, 4)
    by_domain: dict[str, dict] = {}
    for entry in per.values():
        d = by_domain.setdefault(entry["domain"], Counter())
        for key in ("documents_read", "bytes_in", "documents_kept", "bytes_kept", "repeats", "train_tokens"):
            d[key] += entry[key]
    for d in by_domain.values():
        d["train_token_share"] = round(d["train_tokens"] / total_tokens, 4)
    decon = inputs.policy.decontaminator
    contaminated = [r for r in (passed.per_source.values()) if r.get("removed:contaminated")]
    return {
        "sources": [{"name": s.name, "path": s.path, "domain": s.domain, "license": s.license, "consent": s.consent,
                     "url": s.url, "notes": s.notes, "share": s.share, "weight": s.weight} for s in inputs.sources],
        "composition": {"by_source": per, "by_domain": {k: dict(v) for k, v in sorted(by_domain.items())}},
        "contamination": {
            "files": cfg.decontamination_files(), "ngram": cfg.decontam_ngram,
            "evaluation_items": decon.items if decon else 0,
            "items_shorter_than_ngram": decon.too_short if decon else 0,
            "removed": sum(r["removed:contaminated"] for r in contaminated),
            "flagged": len(passed.flagged), "flag_only": cfg.flag_only,
            "flagged_examples": [{"id": i, "source": n, "ngram": g} for i, n, g in passed.flagged[:20]],
        },
        "representation": {name: {**{g: c.get(g, 0) for g in governance.GROUP_TERMS},
                                  "female_to_male": round(c.get("female", 0) / max(1, c.get("male", 0)), 4)}
                           for name, c in sorted(groups.items())} if cfg.representation_probe else {},
    }


def _write_report(out: str, report: dict, seconds: dict, t_start: float) -> None:
    seconds["total"] = time.time() - t_start
    report["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    write_json(os.path.join(out, "report.json"), report)


def print_summary(report: dict) -> None:
    docs = report["documents"]
    print(f"documents: read {docs['read']}, kept {docs['kept']}, removed {sum(docs['removed'].values())}")
    for reason, n in docs["removed"].items():
        print(f"  removed {reason:28s} {n}")
    if report.get("pii"):
        print("pii replaced: " + ", ".join(f"{k} {v}" for k, v in report["pii"].items()))
    if "tokens" in report:
        print(f"tokens: train {report['tokens']['train']:,}, val {report['tokens']['val']:,} "
              f"({report['split_documents']['train']} / {report['split_documents']['val']} documents), "
              f"{report['bytes_per_token']:.3f} bytes/token, vocab {report['vocab_size']} ({report['dtype']})")
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()))


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(PrepareConfig, argv, description=__doc__.split("\n")[0])
    print_config(cfg, "prepare config")
    report = run(cfg)
    print_summary(report)
    print(f"wrote {cfg.out}/: meta.json, tokenizer.json, report.json, removed.jsonl and shards")


if __name__ == "__main__":
    main()
