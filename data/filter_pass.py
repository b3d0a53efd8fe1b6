"""Pass 1 of `python -m data.prepare`, shared by both engines (the process pool of
data/prepare.py and the Ray tasks of data/ray_engine.py): the run's settings
(`PrepareConfig`), the per-document function (`process_record`: governance, normalization,
filters, language, toxicity, PII, decontamination, dedup keys), the bookkeeping that
accounts for every record in input order (`FilterResult.add`, `RemovedLog`), and the
local pass itself (`filter_pass`).
"""
from __future__ import annotations

import json
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Optional

from cli import UserError
from data import clean, governance, langid, pii, quality
from data.dedup import MinHasher, NearDedup, exact_hash, shingle_hashes
from data.parallel import bounded_imap
from data.sources import Document, Rejected, iter_records
from data.toxicity import DEFAULT_BLOCKLIST, ToxicityFilter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CORPUS = os.path.join(REPO, "data", "corpus", "shakespeare.jsonl.gz")
DEFAULT_OUT = os.path.join(REPO, "prepared", "shakespeare")


@dataclass
class PrepareConfig(clean.LineFilterConfig, quality.QualityConfig):
    input: list[str] = field(default_factory=lambda: [DEFAULT_CORPUS],
                             metadata={"help": "files or directories (.txt, .jsonl[.gz], .parquet)", "nargs": True})
    out: str = field(default=DEFAULT_OUT, metadata={"help": "output directory"})
    text_field: str = field(default="text", metadata={"help": "JSONL/parquet field holding the text"})
    vocab_size: int = field(default=8192, metadata={"help": "tokenizer size incl. 256 bytes and 6 special tokens"})
    tokenizer: Optional[str] = field(default=None, metadata={"help": "reuse this tokenizer.json instead of training"})
    workers: int = field(default=0, metadata={"help": "processes for filtering and tokenizer counting (0 = all cores, at most 8); "
                                                      "--engine ray: tasks at a time (0 = the cluster's CPUs)"})
    engine: str = field(default="local", metadata={"choices": ["local", "ray"],
                                                    "help": "local: this machine's processes; ray: Ray tasks (pip install -r requirements-scale.txt), same output"})
    ray_address: Optional[str] = field(default=None, metadata={"help": "--engine ray: join this cluster (host:port, or auto) instead of "
                                                                       "starting a Ray instance here with --workers CPUs"})
    split_bytes: int = field(default=8 << 20, metadata={"help": "--engine ray: bytes per task: larger plain JSONL files are read as "
                                                                 "byte ranges of about this size, smaller files grouped up to it"})
    max_doc_bytes: int = field(default=32 << 20, metadata={"help": "longer documents/lines are removed as too_long"})
    unicode_form: str = field(default="NFC", metadata={"choices": ["NFC", "NFKC", "none"]})
    drop_lorem_ipsum: bool = True
    langid: bool = True
    languages: list[str] = field(default_factory=lambda: ["en"], metadata={"help": "languages to keep"})
    min_lang_score: float = 0.5
    toxicity: bool = True
    blocklist: str = DEFAULT_BLOCKLIST
    max_toxic_word_frac: float = 0.002
    pii: bool = True
    pii_kinds: list[str] = field(default_factory=lambda: list(pii.PLACEHOLDERS))
    exact_dedup: bool = True
    near_dedup: bool = True
    ngram: int = field(default=5, metadata={"help": "MinHash shingle size in words"})
    bands: int = 14
    rows: int = 8
    verify_jaccard: float = field(default=0.0, metadata={"help": "if > 0, confirm LSH candidates by exact Jaccard >= this"})
    seed: int = 1234
    val_fraction: float = field(default=0.05, metadata={"help": "share of documents in the validation split"})
    layout: str = field(default="stream", metadata={"choices": ["stream", "chunks"],
                                                      "help": "stream: documents joined by <|endoftext|>; chunks: fixed-length rows"})
    chunk_len: int = 1024
    chunk_stride: int = field(default=512, metadata={"help": "chunks layout: step between chunk starts (512 of 1024 = 50% overlap)"})
    min_chunk_len: int = field(default=128, metadata={"help": "chunks layout: drop a final chunk shorter than this"})
    shard_tokens: int = 100_000_000
    sources: str = field(default="", metadata={
        "help": "JSON list of inputs, each with path, domain, license (SPDX), consent, url, notes and a share or "
                "weight (docs/data.md); replaces --input"})
    allow_licenses: list[str] = field(default_factory=list, metadata={
        "help": "keep only documents under these SPDX licence ids (comma-separated; empty: any)"})
    require_consent: bool = field(default=False, metadata={
        "help": "remove documents whose consent is missing or unknown"})
    opt_out: str = field(default="", metadata={
        "help": "file of document ids, URLs or domains (one a line) to remove before anything else"})
    decontaminate: list[str] = field(default_factory=lambda: ["auto"], metadata={
        "nargs": True, "help": "evaluation files (JSONL prompts/answers/messages, or text lines) whose word n-grams "
                               "no kept document may share; auto: the task suite's held-out files beside --out, "
                               "when they exist; none: off"})
    decontam_ngram: int = field(default=13, metadata={"help": "n of the shared word n-gram (GPT-3's 13)"})
    flag_only: bool = field(default=False, metadata={
        "help": "report contaminated documents without removing them"})
    representation_probe: bool = field(default=True, metadata={
        "help": "count gendered words per source for the data card (a measurement, not a filter)"})

    def __post_init__(self):
        if not 262 <= self.vocab_size <= 1 << 32:
            raise UserError(f"--vocab-size must be between 262 and 2^32, got {self.vocab_size}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        if self.layout == "chunks" and not (0 < self.min_chunk_len <= self.chunk_len and 0 < self.chunk_stride <= self.chunk_len):
            raise UserError("chunks layout needs 0 < --min-chunk-len <= --chunk-len and 0 < --chunk-stride <= --chunk-len")
        if self.bands < 1 or self.rows < 1 or self.ngram < 1:
            raise UserError("--bands, --rows and --ngram must be positive")
        unknown = set(self.pii_kinds) - set(pii.PLACEHOLDERS)
        if unknown:
            raise UserError(f"unknown --pii-kinds {sorted(unknown)}; known: {list(pii.PLACEHOLDERS)}")
        if self.shard_tokens < 1:
            raise UserError("--shard-tokens must be positive")
        if self.split_bytes < 1:
            raise UserError("--split-bytes must be positive")
        if self.ray_address and self.engine != "ray":
            raise UserError("--ray-address needs --engine ray")
        if self.decontam_ngram < 1:
            raise UserError(f"--decontam-ngram must be positive, got {self.decontam_ngram}")

    def decontamination_files(self) -> list[str]:
        """The evaluation files named by --decontaminate (auto: the suite's, when present)."""
        files = []
        for item in self.decontaminate:
            if item == "none":
                return []
            if item == "auto":
                tasks = os.path.join(os.path.dirname(os.path.abspath(self.out)), "tasks")
                files += [os.path.join(tasks, name) for name in ("eval.jsonl", "eval_heldout_phrasing.jsonl")
                          if os.path.exists(os.path.join(tasks, name))]
            else:
                files.append(item)
        return files


# ----------------------------------------------------------------------------- pass 1 (per document)

WORKER: dict = {}  # per-process state: config, toxicity filter, MinHasher


def init_worker(cfg: PrepareConfig, blocklist_terms: list[str], policy: governance.Policy | None = None) -> None:
    WORKER["cfg"] = cfg
    WORKER["policy"] = policy if policy is not None else governance.Policy(probe=cfg.representation_probe)
    WORKER["toxicity"] = ToxicityFilter(blocklist_terms, cfg.max_toxic_word_frac) if cfg.toxicity else None
    WORKER["minhash"] = MinHasher(cfg.bands * cfg.rows, cfg.ngram, cfg.seed)
    WORKER["languages"] = set(cfg.languages)


def clean_document(text: str) -> tuple[Optional[str], str, dict]:
    """Normalize, filter and scrub one document: (text or None, removal reason, stats)."""
    cfg: PrepareConfig = WORKER["cfg"]
    stats: dict = {}
    text = clean.normalize(text, "" if cfg.unicode_form == "none" else cfg.unicode_form)
    text, stats["lines_removed"] = clean.filter_lines(text, cfg)
    if not text:
        return None, "empty_after_cleaning", stats
    if cfg.drop_lorem_ipsum and clean.is_lorem_ipsum(text):
        return None, "lorem_ipsum", stats
    for enabled, check in ((cfg.gopher_quality, quality.gopher_quality),
                           (cfg.gopher_repetition, quality.gopher_repetition),
                           (cfg.fineweb_quality, quality.fineweb_quality)):
        reason = check(text, cfg) if enabled else None
        if reason:
            return None, reason, stats
    if cfg.langid:
        lang, score = langid.identify(text)
        if lang not in WORKER["languages"] or score < cfg.min_lang_score:
            stats["language"] = [lang, round(score, 3)]
            return None, "language", stats
    if WORKER["toxicity"] is not None and WORKER["toxicity"].is_toxic(text):
        return None, "toxicity", stats
    if cfg.pii:
        text, stats["pii"] = pii.scrub(text, cfg.pii_kinds)
    return text, "", stats


def process_record(record):
    """One record through pass 1: governance (opt-out, licence, consent), cleaning and the
    filters, decontamination, then the dedup keys; stats carry its source and domain."""
    policy: governance.Policy = WORKER["policy"]
    meta = policy.metadata(record.source, getattr(record, "meta", None))
    if isinstance(record, Rejected):
        return record, {"source": meta["source"], "domain": meta["domain"]}
    bytes_in = len(record.text.encode("utf-8", "surrogatepass"))
    refusal = policy.refusal(record.id, meta)  # honoured before anything else
    if refusal:
        return Rejected(record.id, record.source, *refusal), {"source": meta["source"], "domain": meta["domain"],
                                                             "bytes_in": bytes_in}
    text, reason, stats = clean_document(record.text)
    stats.update(source=meta["source"], domain=meta["domain"], bytes_in=bytes_in)
    if text is None:
        detail = json.dumps(stats["language"]) if "language" in stats else ""
        return Rejected(record.id, record.source, reason, detail), stats
    gram = policy.contamination(text)
    if gram and not policy.flag_only:
        return Rejected(record.id, record.source, "contaminated", gram), stats
    stats["contaminated"] = gram
    stats["bytes_out"] = len(text.encode("utf-8", "surrogatepass"))
    stats["groups"] = governance.group_counts(text) if policy.probe else None
    cfg = WORKER["cfg"]
    shingles = shingle_hashes(text, cfg.ngram) if cfg.near_dedup else None
    stats["hash"] = exact_hash(text)
    stats["signature"] = WORKER["minhash"].signature_of_hashes(shingles) if cfg.near_dedup else None
    stats["shingles"] = shingles if cfg.verify_jaccard > 0 else None
    return Document(record.id, record.source, text), stats


# ----------------------------------------------------------------------------- helpers

class Progress:
    """A progress line printed at most every `every` seconds."""

    def __init__(self, label: str, every: float = 2.0):
        self.label, self.every = label, every
        self.start = self.last = time.time()

    def update(self, done: int, total: Optional[int] = None, extra: str = "", force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(1e-9, now - self.start)
        eta = f", eta {(total - done) / max(rate, 1e-9):.0f}s" if total else ""
        print(f"[{self.label}] {done}{'/' + str(total) if total else ''} ({rate:.0f}/s{eta}){extra}", flush=True)


class RemovedLog:
    """removed.jsonl (one line per removed document, with its reason) and the counts."""

    def __init__(self, path: str):
        self.file = open(path, "w", encoding="utf-8")
        self.counts: Counter = Counter()

    def remove(self, rec_id: str, source: str, reason: str, detail: str = "", duplicate_of: Optional[str] = None):
        self.counts[reason] += 1
        entry = {"id": rec_id, "source": source, "reason": reason}
        if detail:
            entry["detail"] = detail
        if duplicate_of is not None:
            entry["duplicate_of"] = duplicate_of
        self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")


@dataclass
class FilterResult:
    """What pass 1 leaves: the documents that passed (in input order; their text stays with
    the engine) with their source, domain and size, and the counts for the report."""
    ids: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # each survivor's input file
    source_names: list[str] = field(default_factory=list)  # ... and source (a sources-file name, or the file)
    domains: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # UTF-8 bytes after cleaning
    groups: list = field(default_factory=list)  # the representation probe's counts, or None
    read: int = 0
    lines_removed: int = 0
    bytes_in: int = 0
    pii: Counter = field(default_factory=Counter)
    seen_hash: dict = field(default_factory=dict)  # exact-duplicate key -> id of its first document
    per_source: dict = field(default_factory=dict)  # source name -> Counter (read, bytes_in, removed:<reason>)
    domain_of: dict = field(default_factory=dict)  # source name -> domain (of its first record)
    flagged: list = field(default_factory=list)  # (id, source, n-gram) of contaminated documents kept (--flag-only)

    def add(self, record, stats: Optional[dict], cfg: PrepareConfig, log: RemovedLog, near) -> bool:
        """Account for one record of pass 1, in input order: log it as removed (a reject,
        or an exact duplicate of an earlier document) or give it the next survivor index
        (and its signature to `near`, the streaming near-duplicate index, if any). True when
        it survives."""
        self.read += 1
        stats = stats or {}
        name = stats.get("source", record.source)
        counts = self.per_source.setdefault(name, Counter())
        self.domain_of.setdefault(name, stats.get("domain", "unknown"))
        counts["read"] += 1
        counts["bytes_in"] += stats.get("bytes_in", 0)
        self.lines_removed += stats.get("lines_removed", 0)
        self.bytes_in += stats.get("bytes_in", 0)
        if isinstance(record, Rejected):
            counts["removed:" + record.reason] += 1
            log.remove(record.id, record.source, record.reason, record.detail)
            return False
        self.pii.update(stats.get("pii") or {})
        if cfg.exact_dedup and stats["hash"] in self.seen_hash:
            counts["removed:exact_duplicate"] += 1
            log.remove(record.id, record.source, "exact_duplicate", duplicate_of=self.seen_hash[stats["hash"]])
            return False
        if cfg.exact_dedup:
            self.seen_hash[stats["hash"]] = record.id
        if near is not None:
            near.add(len(self.ids), stats["signature"], stats["shingles"])
        if stats.get("contaminated"):
            self.flagged.append((record.id, name, stats["contaminated"]))
        self.ids.append(record.id)
        self.sources.append(record.source)
        self.source_names.append(name)
        self.domains.append(stats.get("domain", "unknown"))
        self.sizes.append(stats.get("bytes_out", 0))
        self.groups.append(stats.get("groups"))
        return True

    def progress(self, progress: Progress, final: bool = False) -> None:
        progress.update(self.read, force=final, extra=f", {self.bytes_in / 1e6:.1f} MB, {len(self.ids)} "
                                                      f"{'passed filters' if final else 'kept so far'}")


def new_near_dedup(cfg: PrepareConfig) -> Optional[NearDedup]:
    return NearDedup(cfg.bands, cfg.rows, cfg.verify_jaccard if cfg.verify_jaccard > 0 else None) if cfg.near_dedup else None


def near_dedup_report(near: Optional[NearDedup]) -> dict:
    return {"candidate_pairs": near.candidate_pairs, "rejected_by_jaccard": near.rejected_pairs} if near else {}


def filter_pass(cfg: PrepareConfig, files: list[str], blocklist_terms: list[str], workers: int,
                log: RemovedLog, near, spill_path: str, policy: governance.Policy) -> FilterResult:
    """Pass 1 on this machine: read, clean, filter, scrub PII, drop exact duplicates, add
    MinHash signatures to the near-duplicate index; the survivors' text goes to the spill file."""
    result = FilterResult()
    progress = Progress("filter")
    records = iter_records(files, cfg.text_field, cfg.max_doc_bytes)
    pool = None
    spill = open(spill_path, "w", encoding="utf-8")
    try:
        if workers > 1:
            pool = get_context("spawn").Pool(workers, initializer=init_worker, initargs=(cfg, blocklist_terms, policy))
            results = bounded_imap(pool, process_record, records, block=8 * workers)
        else:
            init_worker(cfg, blocklist_terms, policy)
            results = map(process_record, records)
        for record, stats in results:
            if result.add(record, stats, cfg, log, near):
                spill.write(json.dumps({"id": record.id, "text": record.text}, ensure_ascii=False) + "\n")
            result.progress(progress)
    except (OSError, zlib.error) as e:  # the readers turn these into counted rejects; this is a last resort
        raise UserError(f"reading input failed: {e}") from None
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        spill.close()
    result.progress(progress, final=True)
    return result
