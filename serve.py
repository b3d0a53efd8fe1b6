"""Stage 4: serve a checkpoint behind an OpenAI-compatible API, with continuous batching,
Prometheus metrics, content filtering, abuse limits, a chat page and a feedback loop.

    python serve.py --ckpt runs/ppo                         # http://127.0.0.1:8000, open (no keys)
    python serve.py --ckpt runs/ppo --api-keys keys.txt     # bearer keys, one per line
    python serve.py --log-dir runs/serve --export-feedback prefs.jsonl   # users' votes -> train_rm.py --data

Read top to bottom, the file is the server:
  1. text: chat prompts with special tokens placed as ids; incremental UTF-8 decoding that
     never emits half a character, stop strings, and the output filter's hold-back;
  2. moderation: the project's blocklist (data/toxicity.py) with OpenAI's categories,
     plus an optional classifier (a scalar-head checkpoint);
  3. the engine: one thread owns the model; requests join and leave the running batch at
     every decode step (continuous batching, Yu et al. 2022 "Orca"). Rows are left-padded
     in one KV cache; a new request is prefilled on its own cache and copied in;
  4. metrics (vLLM's names under the `serve:` prefix), request and feedback logs, API
     keys, token buckets, the abuse tracker;
  5. the HTTP API (FastAPI): OpenAI's shapes for responses, stream chunks and errors, so
     the official `openai` client works unchanged;
  6. the feedback export: thumbs and pairwise votes joined with the request log into
     prompt/chosen/rejected records for the next reward model.
"""
from __future__ import annotations

import asyncio
import codecs
import collections
import hashlib
import hmac
import json
import logging
import math
import os
import queue as queue_mod
import re
import secrets
import threading
import time
from dataclasses import dataclass, field

import torch
from fastapi import Request  # at module level: handler annotations are resolved in this module's globals

import runtime
from cli import UserError, die, parse_config, print_config
from data.chat import encode_prompt
from data.tokenizer import Tokenizer, TokenizerError
from data.toxicity import DEFAULT_BLOCKLIST, ToxicityFilter, load_blocklist
from model import KVCache, sample_next

REPO = os.path.dirname(os.path.abspath(__file__))
STATIC_PAGE = os.path.join(REPO, "static", "chat.html")
log = logging.getLogger("serve")


@dataclass
class ServeConfig:
    ckpt: str = field(default=os.path.join(REPO, "runs", "ppo"), metadata={"help": "checkpoint directory to serve"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0: every interface)"})
    port: int = 8000
    api_keys: str = field(default="", metadata={"help": "file with one API key per line (empty: an open server)"})
    log_dir: str = field(default=os.path.join(REPO, "runs", "serve"),
                         metadata={"help": "request log (requests.jsonl) and feedback (feedback.jsonl) go here"})
    request_log: bool = field(default=True, metadata={"help": "write the JSONL request log"})
    export_feedback: str = field(default="", metadata={
        "help": "write the feedback under --log-dir as prompt/chosen/rejected JSONL to this file and exit"})
    served_model_name: str = field(default="", metadata={"help": "model id (default: <checkpoint dir>-step<N>)"})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})
    threads: int = field(default=0, metadata={"help": "torch CPU threads for the model (0: torch's default)"})
    dtype: str = field(default="auto", metadata={"choices": ["auto", "float32", "bfloat16"],
                                                 "help": "auto: float32 on CPU, bfloat16 on CUDA"})
    max_running: int = field(default=16, metadata={"help": "rows in the running batch"})
    max_waiting: int = field(default=64, metadata={"help": "queued requests beyond the batch (then 503)"})
    max_tokens_limit: int = field(default=0, metadata={"help": "largest max_tokens a request may ask (0: the context)"})
    max_request_bytes: int = 1_000_000
    max_messages: int = 64
    max_message_chars: int = 32_000
    rate_limit_rpm: float = field(default=600.0, metadata={"help": "requests per minute per key (0: off)"})
    rate_limit_tpm: float = field(default=200_000.0, metadata={
        "help": "tokens (prompt + max_tokens, unused refunded) per minute per key (0: off)"})
    moderation: bool = field(default=True, metadata={"help": "filter input (400 content_filter) and output"})
    blocklist: str = field(default=DEFAULT_BLOCKLIST, metadata={"help": "blocklist file (data/toxicity.py's format)"})
    classifier: str = field(default="", metadata={
        "help": "optional scalar-head checkpoint whose sigmoid(score) is P(unsafe)"})
    classifier_threshold: float = 0.5
    classifier_category: str = "harassment"
    abuse_max_flags: int = field(default=5, metadata={
        "help": "flagged requests within --abuse-window-s that block a key (0: never block)"})
    abuse_window_s: float = 600.0
    abuse_block_s: float = 900.0
    access_log: bool = field(default=False, metadata={"help": "uvicorn's access log (paths only, never keys)"})

    def __post_init__(self):
        if self.export_feedback:
            return
        if not 0 < self.port < 65536 and self.port != 0:
            raise UserError(f"--port must be in 1..65535, got {self.port}")
        for name in ("max_running", "max_request_bytes", "max_messages", "max_message_chars"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive")
        if self.max_waiting < 0 or self.max_tokens_limit < 0 or self.rate_limit_rpm < 0 or self.rate_limit_tpm < 0:
            raise UserError("--max-waiting, --max-tokens-limit and the rate limits must be >= 0")
        if self.abuse_max_flags < 0 or self.abuse_window_s <= 0 or self.abuse_block_s < 0:
            raise UserError("need --abuse-max-flags >= 0, --abuse-window-s > 0, --abuse-block-s >= 0")
        if not 0 < self.classifier_threshold < 1:
            raise UserError("--classifier-threshold must be in (0, 1)")
        if self.classifier_category not in CATEGORIES:
            raise UserError(f"--classifier-category must be one of {', '.join(CATEGORIES)}")


# ============================================================================ 1. text

def chat_prompt_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """The chat template (data/chat.py) with role tokens placed as ids: content is encoded as
    ordinary text, so a user who types `<|assistant|>` gets those characters, not the token."""
    return encode_prompt(tok, messages)


def completion_prompt_ids(tok: Tokenizer, text: str) -> list[int]:
    """A raw prompt continues a document, as sample.py does without --chat."""
    return [tok.eot_id] + tok.encode(text)


class TextStream:
    """Token ids in, text deltas out, for one response.

    Bytes are decoded incrementally: a character split across tokens is held until its last
    byte arrives (an invalid byte becomes U+FFFD, as in data/tokenizer.py). Text that could be
    the start of a stop string is held back until it is decided; with a moderator, so is a
    trailing partial word, so a blocklisted word is never sent: the response stops before it
    with reason "content_filter". The emitted text is the response."""

    HOLD_WORD_MAX = 48  # a "word" longer than this is not held back

    def __init__(self, token_bytes: list[bytes], stops: tuple[str, ...] = (), moderator: "Moderator | None" = None):
        self.token_bytes = token_bytes
        self.stops = tuple(s for s in stops if s)
        self.moderator = moderator
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""
        self.sent = 0  # characters of self.text already emitted
        self.flags: list[str] = []

    @property
    def emitted(self) -> str:
        return self.text[:self.sent]

    def push(self, token: int) -> tuple[str, str | None]:
        """(delta, finish reason or None) after one more token."""
        if 0 <= token < len(self.token_bytes):  # special tokens have no text
            self.text += self.decoder.decode(self.token_bytes[token])
        return self._advance(final=False)

    def close(self) -> tuple[str, str | None]:
        """Flush at the end of generation: (last delta, "stop" / "content_filter" / None)."""
        self.text += self.decoder.decode(b"", final=True)
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str | None]:
        reason = None
        if self.stops:
            found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
            if found:
                self.text, reason, final = self.text[:min(found)], "stop", True
        end = len(self.text) if final else len(self.text) - self._hold()
        if end <= self.sent:
            return "", reason
        if self.moderator is not None:
            lo = max(0, self.sent - 48)
            while lo > 0 and not self.text[lo - 1].isspace() and self.sent - lo < 96:
                lo -= 1  # start the window at a word start, so \b there is real
            self.flags = self.moderator.blocklist_categories(self.text[lo:end])
            if self.flags:
                self.text = self.text[:self.sent]
                return "", "content_filter"
        delta, self.sent = self.text[self.sent:end], end
        return delta, reason

    def _hold(self) -> int:
        text, hold = self.text, 0
        for s in self.stops:  # the longest suffix that starts a stop string
            for k in range(min(len(s) - 1, len(text) - self.sent), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        if self.moderator is not None:
            i = len(text)
            while i > self.sent and (text[i - 1].isalnum() or text[i - 1] == "_") \
                    and len(text) - i < self.HOLD_WORD_MAX:
                i -= 1
            if len(text) - i < self.HOLD_WORD_MAX:
                hold = max(hold, len(text) - i)
        return hold


# ============================================================================ 2. moderation

# OpenAI's moderation categories (the /v1/moderations response lists every one).
CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
              "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
              "violence/graphic")
# The categories of data/blocklist.txt's terms; a term of another list counts as harassment.
_SEXUAL = ("porn porno pornography pornhub xxx blowjob blowjobs handjob cumshot creampie gangbang dildo dildos "
           "masturbate masturbating masturbation milf hentai camgirl camgirls").split() + [
    "nude selfies", "sex cam", "sex chat", "hot singles", "escort service", "barely legal", "jerk off"]
TERM_CATEGORIES = {**{t: ("sexual",) for t in _SEXUAL},
                   "kill yourself": ("harassment/threatening", "self-harm/instructions"),
                   "go kill yourself": ("harassment/threatening", "self-harm/instructions")}


class Moderator:
    """Blocklist matches (any listed word or phrase flags the text; categories by term) plus an
    optional classifier. The blocklist part is cheap and thread-safe: the engine runs it on
    every output step."""

    def __init__(self, terms: list[str], classifier: "Classifier | None" = None):
        self.filter = ToxicityFilter(terms)
        self.classifier = classifier

    def blocklist_categories(self, text: str) -> list[str]:
        if self.filter.pattern is None:
            return []
        cats = set()
        for match in self.filter.pattern.findall(text):
            cats.update(TERM_CATEGORIES.get(" ".join(match.lower().split()), ("harassment",)))
        return sorted(cats)

    def check(self, text: str) -> dict:
        """{"flagged", "categories": [..], "scores": {category: score}} for one text."""
        cats = set(self.blocklist_categories(text))
        scores = {c: 1.0 for c in cats}
        if self.classifier is not None:
            p = self.classifier.probability(text)
            c = self.classifier.category
            scores[c] = max(scores.get(c, 0.0), p)
            if p >= self.classifier.threshold:
                cats.add(c)
        return {"flagged": bool(cats), "categories": sorted(cats), "scores": scores}


class Classifier:
    """A scalar-head checkpoint (model.ScalarHeadModel, e.g. trained by train_rm.py on
    safe/unsafe pairs) read as P(unsafe) = sigmoid(raw score) of the text as a user turn."""

    def __init__(self, ckpt: str, threshold: float, category: str, device="cpu"):
        from model import ScalarHeadModel
        self.model, _ = runtime.load_model(ckpt, device=device, model_class=ScalarHeadModel)
        self.model.eval()
        self.tok = Tokenizer.load(os.path.join(ckpt, "tokenizer.json"))
        self.threshold, self.category, self.device = threshold, category, device
        self.lock = threading.Lock()

    @torch.no_grad()
    def probability(self, text: str) -> float:
        from data.chat import encode_chat
        ids = encode_chat(self.tok, [{"role": "user", "content": text}])[0]
        n = self.model.cfg.max_seq_len
        ids = ids[:1] + ids[-(n - 1):] if len(ids) > n else ids
        with self.lock:
            raw = self.model.score(torch.tensor([ids], device=self.device), torch.tensor([len(ids) - 1]))
        return float(torch.sigmoid(raw[0]))


# ============================================================================ 3. the engine

class BatchKVCache:
    """The running batch's keys and values: rows 0..n-1 are live, all filled up to `length`
    slots and left-padded (row r's tokens start at kv_start[r]). It has what model.Attention
    needs from a cache (`length`, `update`), plus what continuous batching needs: insert a
    prefilled row, remove a row, and drop columns that are padding for every row.

    Shifting a row's keys along the slots is exact: positions are slot - kv_start, so rotary
    angles and the mask move with the row."""

    def __init__(self, cfg, rows: int, device, dtype):
        shape = (cfg.n_layer, rows, cfg.n_kv_head, cfg.max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.kv_start = torch.zeros(rows, dtype=torch.long, device=device)
        self.capacity = cfg.max_seq_len
        self.n = 0
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        n, t = k.shape[0], k.shape[2]
        end = self.length + t
        self.k[layer, :n, :, self.length:end] = k
        self.v[layer, :n, :, self.length:end] = v
        return self.k[layer, :n, :, :end], self.v[layer, :n, :, :end]

    def insert(self, src: KVCache, j: int, prompt_len: int) -> int:
        """Copy row j of a prefill cache (its last prompt_len slots) in as a new last row."""
        if self.n == 0:
            self.length = 0
        if prompt_len > self.length:
            self._shift(prompt_len - self.length)
        r, end = self.n, self.length
        self.k[:, r, :, end - prompt_len:end] = src.k[:, j, :, src.length - prompt_len:src.length]
        self.v[:, r, :, end - prompt_len:end] = src.v[:, j, :, src.length - prompt_len:src.length]
        self.kv_start[r] = end - prompt_len
        self.n += 1
        return r

    def remove(self, r: int) -> None:
        """Free row r; the last row moves into its place (the caller moves its bookkeeping too)."""
        last = self.n - 1
        if r != last:
            self.k[:, r, :, :self.length] = self.k[:, last, :, :self.length]
            self.v[:, r, :, :self.length] = self.v[:, last, :, :self.length]
            self.kv_start[r] = self.kv_start[last]
        self.n -= 1
        if self.n == 0:
            self.length = 0

    def compact(self) -> None:
        """Drop the leading slots that every live row has as padding."""
        if self.n == 0:
            self.length = 0
            return
        m = int(self.kv_start[:self.n].min())
        if m > 0:
            n, end = self.n, self.length
            self.k[:, :n, :, :end - m] = self.k[:, :n, :, m:end].clone()
            self.v[:, :n, :, :end - m] = self.v[:, :n, :, m:end].clone()
            self.kv_start[:n] -= m
            self.length -= m

    def _shift(self, d: int) -> None:
        n, end = self.n, self.length
        if n:
            self.k[:, :n, :, d:end + d] = self.k[:, :n, :, :end].clone()
            self.v[:, :n, :, d:end + d] = self.v[:, :n, :, :end].clone()
            self.kv_start[:n] += d
        self.length += d


class EngineFull(Exception):
    """The running batch and the waiting queue are both full (HTTP 503)."""


@dataclass(eq=False)
class GenRequest:
    """One generation. The engine sends its events to `queue` (an asyncio.Queue on `loop`,
    or a plain queue when loop is None): ("delta", text) and at the end ("finish", info)."""
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    moderate: bool = True
    loop: asyncio.AbstractEventLoop | None = None
    queue: object = None
    # engine-side state
    arrival: float = field(default_factory=time.perf_counter)
    aborted: bool = False
    tokens: list[int] = field(default_factory=list)
    text: TextStream | None = None
    generator: torch.Generator | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    admitted_at: float | None = None

    def __post_init__(self):
        if self.queue is None:
            self.queue = asyncio.Queue() if self.loop is not None else queue_mod.SimpleQueue()


class Engine:
    """Continuous batching on one thread that owns the model.

    Each iteration: finished and aborted rows leave the batch; waiting requests are admitted
    while rows are free (prefilled together on a fresh cache, left-padded among themselves,
    sampled once, then copied into the batch cache); one decode step runs for every row.
    Greedy rows compute exactly what `model.generate` computes for the prompt alone.
    """

    def __init__(self, model, tok: Tokenizer, *, max_running: int = 16, max_waiting: int = 64,
                 metrics: "Metrics | None" = None, moderator: Moderator | None = None):
        self.model, self.tok = model, tok
        self.max_running, self.max_waiting = max_running, max_waiting
        self.metrics = metrics if metrics is not None else Metrics()
        self.moderator = moderator
        self.device = model.lm_head.weight.device
        self.dtype = model.lm_head.weight.dtype
        self.cache = BatchKVCache(model.cfg, max_running, self.device, self.dtype)
        self.running: list[GenRequest] = []
        self.waiting: collections.deque[GenRequest] = collections.deque()
        self.cv = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.steps = 0
        self.error: str | None = None
        self.stop_ids = frozenset(range(len(tok.token_bytes), tok.vocab_size))  # every special token ends a turn

    # -- the API the server calls (any thread)
    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()
        return self

    def shutdown(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and not self.stopping

    def submit(self, req: GenRequest) -> GenRequest:
        limit = self.model.cfg.max_seq_len
        if not req.prompt or len(req.prompt) + req.max_tokens > limit or req.max_tokens < 1:
            raise ValueError(f"prompt of {len(req.prompt)} tokens + max_tokens {req.max_tokens} must fit in {limit}")
        with self.cv:
            if len(self.running) + len(self.waiting) >= self.max_running + self.max_waiting:
                raise EngineFull("the server is at capacity")
            self.waiting.append(req)
            self.metrics.waiting.set(len(self.waiting))
            self.cv.notify()
        return req

    def abort(self, req: GenRequest) -> None:
        req.aborted = True
        with self.cv:
            self.cv.notify()

    # -- the engine thread
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.waiting and not self.running:
                    self.cv.wait()
                if self.stopping:
                    break
                free = self.max_running - len(self.running)
                newcomers = []
                while self.waiting and len(newcomers) < free:
                    newcomers.append(self.waiting.popleft())
                self.metrics.waiting.set(len(self.waiting))
            events: list = []
            try:
                with torch.inference_mode():
                    self._drop_aborted(events, newcomers)
                    newcomers = [r for r in newcomers if not r.aborted]
                    if newcomers:
                        self._prefill(newcomers, events)
                    if self.running:
                        self._decode(events)
            except Exception as e:  # a bug or out of memory: fail the batch, keep serving
                log.exception("engine step failed")
                self.error = f"{type(e).__name__}: {e}"
                failed = self.running + [r for r in newcomers if r not in self.running]
                events = [ev for ev in events if ev[0] not in failed] + [(r, ("error", self.error)) for r in failed]
                self.running = []
                self.cache.n, self.cache.length = 0, 0
            self.metrics.running.set(len(self.running))
            self._deliver(events)
        # shutting down: everything still here ends with an error event
        events = [(r, ("error", "the server is shutting down")) for r in list(self.running) + list(self.waiting)]
        self.running, self.waiting = [], collections.deque()
        self._deliver(events)

    def _drop_aborted(self, events: list, newcomers: list) -> None:
        for r in [r for r in self.running if r.aborted]:
            self._finish(r, "abort", events)
        for r in newcomers:
            if r.aborted:
                self._final_event(r, "abort", events)

    def _prefill(self, reqs: list[GenRequest], events: list) -> None:
        now = time.perf_counter()
        width = max(len(r.prompt) for r in reqs)
        idx = torch.full((len(reqs), width), self.tok.pad_id, dtype=torch.long)
        for j, r in enumerate(reqs):
            idx[j, width - len(r.prompt):] = torch.tensor(r.prompt)
            r.admitted_at = now
            r.text = TextStream(self.tok.token_bytes, r.stop, self.moderator if r.moderate else None)
            if r.temperature > 0:
                r.generator = torch.Generator(device=self.device).manual_seed(
                    r.seed if r.seed is not None else secrets.randbits(63))
            self.metrics.queue_time.observe(now - r.arrival)
        kv_start = torch.tensor([width - len(r.prompt) for r in reqs], device=self.device)
        pre = KVCache(self.model.cfg, len(reqs), width, self.device)
        logits = self.model(idx.to(self.device), kv_start=kv_start, cache=pre, last_only=True)
        self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in reqs))
        for j, r in enumerate(reqs):
            self.cache.insert(pre, j, len(r.prompt))
            self.running.append(r)
        self._advance(reqs, self._sample(logits, reqs), events)

    def _decode(self, events: list) -> None:
        if self.cache.length + 1 > self.cache.capacity:
            self.cache.compact()
        rows = self.running
        idx = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        logits = self.model(idx, kv_start=self.cache.kv_start[:len(rows)], cache=self.cache, last_only=True)
        self.metrics.batch_size.observe(len(rows))
        self.steps += 1
        self._advance(list(rows), self._sample(logits, rows), events)

    def _sample(self, logits: torch.Tensor, reqs: list[GenRequest]) -> list[int]:
        logits = logits.float()
        out = logits.argmax(dim=-1)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            if r.temperature > 0:
                groups.setdefault((r.temperature, r.top_p, r.top_k), []).append(i)
        for (temperature, top_p, top_k), rows in groups.items():
            picked = sample_next(logits[rows], temperature, top_k, top_p, [reqs[i].generator for i in rows])
            out[rows] = picked
        return out.tolist()

    def _advance(self, reqs: list[GenRequest], tokens: list[int], events: list) -> None:
        now = time.perf_counter()
        self.metrics.generation_tokens.inc(len(reqs))
        for r, t in zip(reqs, tokens):
            r.tokens.append(t)
            if r.first_token_at is None:
                r.first_token_at = now
                self.metrics.ttft.observe(now - r.arrival)
            else:
                self.metrics.itl.observe(now - r.last_token_at)
            r.last_token_at = now
            reason = None
            if t in self.stop_ids and not r.ignore_eos:
                delta, reason = r.text.close()
                reason = reason or "stop"
            else:
                delta, reason = r.text.push(t)
                if reason is None and len(r.tokens) >= r.max_tokens:
                    more, reason = r.text.close()
                    delta += more
                    reason = reason or "length"
            if delta:
                events.append((r, ("delta", delta)))
            if reason is not None:
                self._finish(r, reason, events)
        # finished rows left in _finish; dropping shared padding keeps attention short
        if self.cache.n and int(self.cache.kv_start[:self.cache.n].min()) >= 64:
            self.cache.compact()

    def _finish(self, r: GenRequest, reason: str, events: list) -> None:
        i = self.running.index(r)
        self.cache.remove(i)
        last = self.running.pop()
        if last is not r:
            self.running[i] = last
        self._final_event(r, reason, events)

    def _final_event(self, r: GenRequest, reason: str, events: list) -> None:
        now = time.perf_counter()
        m = self.metrics
        m.success.labels(finished_reason=reason).inc()
        m.e2e.observe(now - r.arrival)
        info = {"finish_reason": reason, "prompt_tokens": len(r.prompt), "completion_tokens": len(r.tokens),
                "text": r.text.emitted if r.text is not None else "",
                "flags": list(r.text.flags) if r.text is not None and reason == "content_filter" else [],
                "timings": {"queue_s": (r.admitted_at - r.arrival) if r.admitted_at else None,
                            "ttft_s": (r.first_token_at - r.arrival) if r.first_token_at else None,
                            "e2e_s": now - r.arrival}}
        events.append((r, ("finish", info)))

    @staticmethod
    def _deliver(events: list) -> None:
        """Hand the step's events over: one wake-up per event loop, not one per token."""
        by_loop: dict = {}
        for r, ev in events:
            if r.loop is None:
                r.queue.put(ev)
            else:
                by_loop.setdefault(r.loop, []).append((r.queue, ev))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is listening
                pass

    # -- a synchronous helper (tests, the benchmark's reference run)
    def generate(self, req: GenRequest, timeout: float = 300.0) -> dict:
        self.submit(req)
        deadline = time.monotonic() + timeout
        while True:
            kind, payload = req.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if kind == "finish":
                return payload
            if kind == "error":
                raise RuntimeError(payload)


def _put_all(items) -> None:
    for q, ev in items:
        q.put_nowait(ev)


# ============================================================================ 4. metrics, logs, keys, limits

class Metrics:
    """vLLM's metric names (docs: "Production Metrics") under our own prefix, in a registry
    of their own: prometheus_client's global registry refuses a second app in one process."""

    def __init__(self, prefix: str = "serve"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = r = CollectorRegistry()

        def name(s):
            return f"{prefix}:{s}"
        latency = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
        self.running = Gauge(name("num_requests_running"), "Requests in the running batch", registry=r)
        self.waiting = Gauge(name("num_requests_waiting"), "Requests waiting for a row", registry=r)
        self.ttft = Histogram(name("time_to_first_token_seconds"), "Arrival to first generated token",
                              buckets=latency, registry=r)
        self.itl = Histogram(name("inter_token_latency_seconds"), "Time between consecutive tokens of a request",
                             buckets=latency, registry=r)
        self.e2e = Histogram(name("e2e_request_latency_seconds"), "Arrival to last token", buckets=latency,
                             registry=r)
        self.queue_time = Histogram(name("request_queue_time_seconds"), "Arrival to admission into the batch",
                                    buckets=latency, registry=r)
        self.prompt_tokens = Counter(name("prompt_tokens"), "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter(name("generation_tokens"), "Tokens generated", registry=r)
        self.success = Counter(name("request_success"), "Finished requests by finish reason",
                               ["finished_reason"], registry=r)
        self.batch_size = Histogram(name("iteration_batch_size"), "Rows in the batch at each decode step",
                                    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256), registry=r)
        self.safety_flags = Counter(name("safety_flags"), "Moderation flags by category and stage",
                                    ["category", "stage"], registry=r)
        self.rate_limited = Counter(name("rate_limited_requests"), "Requests refused with 429, by reason",
                                    ["reason"], registry=r)
        self.feedback = Counter(name("feedback"), "Feedback received, by rating", ["rating"], registry=r)
        self.http_errors = Counter(name("http_errors"), "Error responses by status code", ["status"], registry=r)


def key_id(secret: str) -> str:
    """What logs store instead of a key or an address: a short hash."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class KeyStore:
    """Bearer keys from a file (one per line, '#' comments). Every key is compared with
    hmac.compare_digest and the loop never stops early, so timing tells nothing."""

    def __init__(self, keys: list[str]):
        self.keys = [k.encode() for k in keys]

    @classmethod
    def load(cls, path: str) -> "KeyStore":
        try:
            with open(path, encoding="utf-8") as f:
                keys = [line.split("#", 1)[0].strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --api-keys {path}: {e}") from None
        keys = [k for k in keys if k]
        if not keys:
            raise UserError(f"--api-keys {path} holds no key")
        return cls(keys)

    def check(self, presented: str) -> bool:
        given = presented.encode("utf-8", "surrogatepass")
        ok = False
        for k in self.keys:
            ok |= hmac.compare_digest(k, given)
        return ok


class TokenBucket:
    def __init__(self, capacity: float, per_second: float, now: float):
        self.capacity, self.rate, self.level, self.at = capacity, per_second, capacity, now

    def take(self, amount: float, now: float) -> float:
        """0.0 when taken; otherwise the seconds until `amount` will be available."""
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


class Limiter:
    """Per-identity token buckets (requests/minute and tokens/minute) and the abuse tracker:
    an identity flagged `max_flags` times within `window` seconds is blocked for `block_s`.
    Used from the event loop only (one thread). Identities are bounded in number."""

    MAX_IDENTITIES = 100_000

    def __init__(self, rpm: float, tpm: float, max_flags: int, window: float, block_s: float):
        self.rpm, self.tpm = rpm, tpm
        self.max_flags, self.window, self.block_s = max_flags, window, block_s
        self.requests: collections.OrderedDict = collections.OrderedDict()
        self.tokens: collections.OrderedDict = collections.OrderedDict()
        self.flags: dict[str, collections.deque] = {}
        self.blocked: dict[str, float] = {}

    def _bucket(self, table, ident: str, per_minute: float, now: float) -> TokenBucket:
        b = table.get(ident)
        if b is None:
            b = table[ident] = TokenBucket(per_minute, per_minute / 60.0, now)
            if len(table) > self.MAX_IDENTITIES:
                table.popitem(last=False)
        table.move_to_end(ident)
        return b

    def blocked_for(self, ident: str, now: float) -> float:
        until = self.blocked.get(ident, 0.0)
        if until <= now:
            self.blocked.pop(ident, None)
            return 0.0
        return until - now

    def take_request(self, ident: str, now: float) -> float:
        return self._bucket(self.requests, ident, self.rpm, now).take(1, now) if self.rpm else 0.0

    def take_tokens(self, ident: str, amount: int, now: float) -> float:
        return self._bucket(self.tokens, ident, self.tpm, now).take(amount, now) if self.tpm else 0.0

    def refund_tokens(self, ident: str, amount: int) -> None:
        if self.tpm and amount > 0 and ident in self.tokens:
            self.tokens[ident].give_back(amount)

    def record_flag(self, ident: str, now: float) -> bool:
        """Count a flagged request; True when this one blocks the identity."""
        if not self.max_flags:
            return False
        q = self.flags.setdefault(ident, collections.deque())
        q.append(now)
        while q and q[0] < now - self.window:
            q.popleft()
        if len(self.flags) > self.MAX_IDENTITIES:
            self.flags.pop(next(iter(self.flags)))
        if len(q) >= self.max_flags:
            self.blocked[ident] = now + self.block_s
            q.clear()
            return True
        return False


class JsonlLog:
    """Append-only JSON lines. Each record is one os.write on an O_APPEND descriptor, so
    replicas sharing a --log-dir interleave whole lines."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")
        with self.lock:
            os.write(self.fd, line)

    def close(self) -> None:
        os.close(self.fd)


def read_jsonl(path: str) -> list[dict]:
    """Every JSON object in a log; a broken line (a crash mid-write) is skipped."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw.decode("utf-8", "surrogatepass"))
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


# ============================================================================ 5. the HTTP API

class ApiError(Exception):
    """An OpenAI-shaped error response: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def _retry_after(seconds: float) -> dict:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


# -- request validation (hostile input gets a clean 400)

def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", "invalid_type", name)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", "invalid_value", name)
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 64
                                                                for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings (<= 64 chars)",
                       "invalid_value", "stop")
    return tuple(stops)


def _content_text(content, i: int, limit: int) -> str:
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "invalid_value",
                               f"messages[{i}].content")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", "invalid_type", f"messages[{i}].content")
    if len(content) > limit:
        raise ApiError(400, f"messages[{i}].content is {len(content)} characters; the limit is {limit}",
                       "message_too_long", f"messages[{i}].content")
    return content


def parse_messages(body: dict, max_messages: int, max_chars: int) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_value", "messages")
    if len(messages) > max_messages:
        raise ApiError(400, f"{len(messages)} messages; the limit is {max_messages}", "too_many_messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "invalid_type", f"messages[{i}]")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant", "invalid_value",
                           f"messages[{i}].role")
        out.append({"role": role, "content": _content_text(m.get("content"), i, max_chars)})
    return out


class Server:
    """Everything one app needs: the model's engine, tokenizer, limits, logs and metrics."""

    def __init__(self, cfg: ServeConfig, model, tok: Tokenizer, model_id: str, moderator: Moderator | None,
                 keys: KeyStore | None):
        self.cfg, self.tok, self.model_id = cfg, tok, model_id
        self.metrics = Metrics()
        self.moderator = moderator
        self.engine = Engine(model, tok, max_running=cfg.max_running, max_waiting=cfg.max_waiting,
                             metrics=self.metrics, moderator=moderator)
        self.context = model.cfg.max_seq_len
        self.keys = keys
        self.limiter = Limiter(cfg.rate_limit_rpm, cfg.rate_limit_tpm, cfg.abuse_max_flags, cfg.abuse_window_s,
                               cfg.abuse_block_s)
        self.request_log = JsonlLog(os.path.join(cfg.log_dir, "requests.jsonl")) if cfg.request_log else None
        self.feedback_log = JsonlLog(os.path.join(cfg.log_dir, "feedback.jsonl"))
        self.served_ids: collections.OrderedDict = collections.OrderedDict()  # completion ids of this process
        self.created = int(time.time())

    # -- per request: who is asking, may they, what did they send
    def identity(self, request) -> str:
        """The caller's key id (hashed), after checking the key; an open server uses the address."""
        auth = request.headers.get("authorization", "")
        if self.keys is None:
            return key_id("addr:" + (request.client.host if request.client else "?"))
        scheme, _, presented = auth.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip() or not self.keys.check(presented.strip()):
            raise ApiError(401, "Incorrect API key provided.", "invalid_api_key")
        return key_id(presented.strip())

    def admit(self, request, ident: str) -> None:
        now = time.monotonic()
        wait = self.limiter.blocked_for(ident, now)
        if wait:
            self.metrics.rate_limited.labels(reason="blocked").inc()
            raise ApiError(429, "This key is blocked for a while: too many requests tripped the content filter.",
                           "key_blocked", headers=_retry_after(wait))
        wait = self.limiter.take_request(ident, now)
        if wait:
            self.metrics.rate_limited.labels(reason="requests").inc()
            raise ApiError(429, "Rate limit reached for requests per minute.", "rate_limit_exceeded",
                           headers=_retry_after(wait))

    async def read_json(self, request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.cfg.max_request_bytes:
            raise ApiError(400, f"request body exceeds {self.cfg.max_request_bytes} bytes", "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.cfg.max_request_bytes:
                raise ApiError(400, f"request body exceeds {self.cfg.max_request_bytes} bytes", "request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "We could not parse the JSON body of your request.", "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", "invalid_json")
        return body

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required (see GET /v1/models)", "invalid_value", "model")
        if model not in (self.model_id, os.path.basename(os.path.normpath(self.cfg.ckpt))):
            raise ApiError(404, f"The model `{model[:200]}` does not exist.", "model_not_found", "model")

    async def moderate(self, text: str, ident: str, stage: str) -> dict | None:
        """Blocklist and classifier on a text (the classifier off the event loop); flags are
        counted by category and stage, and tracked per key."""
        if self.moderator is None:
            return None
        if self.moderator.classifier is not None:
            result = await asyncio.to_thread(self.moderator.check, text)
        else:
            result = self.moderator.check(text)
        if result["flagged"]:
            self.flagged(result["categories"], ident, stage)
        return result

    def flagged(self, categories: list[str], ident: str, stage: str) -> None:
        for c in categories:
            self.metrics.safety_flags.labels(category=c, stage=stage).inc()
        self.limiter.record_flag(ident, time.monotonic())

    def sampling(self, body: dict, prompt_len: int) -> dict:
        if body.get("n", 1) != 1:
            raise ApiError(400, "only n=1 is supported", "invalid_value", "n")
        if body.get("logprobs") or body.get("best_of", 1) not in (1, None) or body.get("echo"):
            raise ApiError(400, "logprobs, best_of and echo are not supported", "unsupported_parameter")
        if prompt_len >= self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens; your prompt is "
                                f"{prompt_len} tokens.", "context_length_exceeded", "messages")
        limit = min(self.cfg.max_tokens_limit or self.context, self.context)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, limit, integer=True)
        room = self.context - prompt_len
        if max_tokens is None:
            max_tokens = min(room, limit)
        elif max_tokens > room:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                                f"for the completion).", "context_length_exceeded", "max_tokens")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "'ignore_eos' must be a boolean", "invalid_type", "ignore_eos")
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p <= 0:
            raise ApiError(400, "'top_p' must be greater than 0", "invalid_value", "top_p")
        return {"max_tokens": max_tokens, "temperature": float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                "top_p": top_p if top_p < 1 else None,
                "top_k": _number(body, "top_k", None, 0, 1 << 30, integer=True) or None,
                "seed": _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
                "stop": _stop_strings(body), "ignore_eos": ignore_eos}

    def charge_tokens(self, ident: str, amount: int) -> None:
        if self.cfg.rate_limit_tpm and amount > self.cfg.rate_limit_tpm:
            raise ApiError(400, f"this request needs {amount} tokens (prompt + max_tokens); the per-minute limit is "
                                f"{int(self.cfg.rate_limit_tpm)}: lower max_tokens", "tokens_exceed_limit",
                           "max_tokens")
        wait = self.limiter.take_tokens(ident, amount, time.monotonic())
        if wait:
            self.metrics.rate_limited.labels(reason="tokens").inc()
            raise ApiError(429, "Rate limit reached for tokens per minute.", "rate_limit_exceeded",
                           headers=_retry_after(wait))

    def remember(self, completion_id: str) -> None:
        self.served_ids[completion_id] = True
        if len(self.served_ids) > 200_000:
            self.served_ids.popitem(last=False)

    def known_id(self, completion_id: str) -> bool:
        """Served by this process, or in the request log (replicas may share a --log-dir)."""
        if completion_id in self.served_ids:
            return True
        if self.request_log is None:
            return False
        needle = json.dumps(completion_id).encode()
        with open(self.request_log.path, "rb") as f:
            return any(needle in line and json.loads(line).get("id") == completion_id for line in f)


CHAT_ID, COMPLETION_ID = "chatcmpl-", "cmpl-"
_ID_PATTERN = re.compile(r"^(chatcmpl|cmpl)-[0-9a-f]{32}$")


def create_app(server: Server):
    """The FastAPI app. Handlers are async and never run the model: the engine thread does."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if server.engine.thread is None:
            server.engine.start()
        yield
        server.engine.shutdown()

    app = FastAPI(title="serve.py", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    cfg, metrics, engine, tok = server.cfg, server.metrics, server.engine, server.tok

    def error_response(e: ApiError) -> JSONResponse:
        metrics.http_errors.labels(status=str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request, e):
        message = {404: f"Unknown route {request.method} {request.url.path}", 405: "Method not allowed"}.get(
            e.status_code, str(e.detail))
        return error_response(ApiError(e.status_code, message, "not_found" if e.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e):
        return error_response(ApiError(400, "invalid request", "invalid_value"))

    # -- open endpoints
    @app.get("/health")
    async def health():
        if not engine.alive():
            return JSONResponse({"status": "engine stopped", "error": engine.error}, status_code=503)
        return {"status": "ok", "model": server.model_id, "running": len(engine.running),
                "waiting": len(engine.waiting)}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def chat_page():
        with open(STATIC_PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    # -- the API
    def model_card() -> dict:
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "serve.py",
                "root": os.path.abspath(cfg.ckpt), "max_model_len": server.context}

    @app.get("/v1/models")
    async def list_models(request: Request):
        server.admit(request, server.identity(request))
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        server.admit(request, server.identity(request))
        if model_id != server.model_id:
            raise ApiError(404, f"The model `{model_id[:200]}` does not exist.", "model_not_found", "model")
        return model_card()

    async def generate(request: Request, chat: bool):
        ident = server.identity(request)
        server.admit(request, ident)
        body = await server.read_json(request)
        server.check_model(body)
        if chat:
            messages = parse_messages(body, cfg.max_messages, cfg.max_message_chars)
            prompt_ids = chat_prompt_ids(tok, messages)
            user_texts = [m["content"] for m in messages if m["role"] != "assistant"]
            logged_input = {"messages": messages}
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ApiError(400, "'prompt' must be a string", "invalid_type", "prompt")
            if len(prompt) > cfg.max_message_chars:
                raise ApiError(400, f"prompt is {len(prompt)} characters; the limit is {cfg.max_message_chars}",
                               "message_too_long", "prompt")
            prompt_ids, user_texts, logged_input = completion_prompt_ids(tok, prompt), [prompt], {"prompt": prompt}
        params = server.sampling(body, len(prompt_ids))
        stream = body.get("stream", False)
        options = body.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise ApiError(400, "'stream' must be a boolean and 'stream_options' an object", "invalid_type", "stream")
        include_usage = bool(options.get("include_usage", False))
        completion_id = (CHAT_ID if chat else COMPLETION_ID) + secrets.token_hex(16)
        created = int(time.time())
        record = {"id": completion_id, "time": time.time(), "endpoint": "chat" if chat else "completions",
                  "model": server.model_id, "key": ident, **logged_input,
                  "params": {k: v for k, v in params.items() if k != "stop"} | {"stop": list(params["stop"])}}

        verdict = await server.moderate("\n".join(user_texts), ident, "input")
        if verdict is not None and verdict["flagged"]:
            if server.request_log is not None:
                server.request_log.write({**record, "finish_reason": "content_filter", "stage": "input",
                                          "categories": verdict["categories"], "completion": None})
            raise ApiError(400, "The request was rejected by the content filter (categories: "
                                + ", ".join(verdict["categories"]) + ").", "content_filter",
                           "messages" if chat else "prompt")
        budget = len(prompt_ids) + params["max_tokens"]
        server.charge_tokens(ident, budget)
        req = GenRequest(prompt_ids, params["max_tokens"], params["temperature"], params["top_p"], params["top_k"],
                         params["stop"], params["seed"], params["ignore_eos"], moderate=server.moderator is not None,
                         loop=asyncio.get_running_loop())
        try:
            engine.submit(req)
        except EngineFull:
            server.limiter.refund_tokens(ident, budget)
            raise ApiError(503, "The server is overloaded: too many requests are running and waiting. Retry later.",
                           "server_overloaded", headers=_retry_after(1)) from None

        def finished(info: dict | None, error: str | None = None) -> None:
            if info is not None:
                server.limiter.refund_tokens(ident, params["max_tokens"] - info["completion_tokens"])
                server.remember(completion_id)
                if info["finish_reason"] == "content_filter":
                    for c in info["flags"]:
                        metrics.safety_flags.labels(category=c, stage="output").inc()
                    server.limiter.record_flag(ident, time.monotonic())
            if server.request_log is not None:
                server.request_log.write({**record, "completion": info["text"] if info else None,
                                          "finish_reason": info["finish_reason"] if info else "error",
                                          "error": error, "usage": usage(info) if info else None,
                                          "timings": info["timings"] if info else None})

        async def classify_output(info: dict) -> None:
            """The classifier reads the whole response once it is complete (the blocklist ran
            on every step in the engine); a flagged response ends as content_filter."""
            if server.moderator is None or server.moderator.classifier is None or not info["text"]:
                return
            if info["finish_reason"] not in ("stop", "length"):
                return
            verdict = await asyncio.to_thread(server.moderator.check, info["text"])
            if verdict["flagged"]:
                info["finish_reason"], info["flags"] = "content_filter", verdict["categories"]
                info["withheld"] = True  # a non-streamed response is not delivered

        def usage(info: dict) -> dict:
            return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                    "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}

        def public_reason(reason: str) -> str:
            return "stop" if reason == "abort" else reason

        if not stream:
            info = None
            try:
                while info is None:
                    try:
                        kind, payload = await asyncio.wait_for(req.queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            engine.abort(req)
                            finished(None, "client disconnected")
                            return Response(status_code=499)
                        continue
                    if kind == "error":
                        finished(None, payload)
                        raise ApiError(500, f"generation failed: {payload}", "engine_error")
                    if kind == "finish":
                        info = payload
            except asyncio.CancelledError:
                engine.abort(req)
                raise
            await classify_output(info)
            finished(info)
            if info.get("withheld"):
                info["text"] = ""
            reason = public_reason(info["finish_reason"])
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": info["text"]},
                          "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": info["text"], "logprobs": None, "finish_reason": reason}
            return {"id": completion_id, "object": "chat.completion" if chat else "text_completion",
                    "created": created, "model": server.model_id, "choices": [choice], "usage": usage(info),
                    "system_fingerprint": None}

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            payload = {"id": completion_id, "object": obj, "created": created, "model": server.model_id,
                       "choices": [choice]}
            if include_usage:
                payload["usage"] = None
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def events():
            done = False
            try:
                if chat:
                    yield chunk(None, None, role=True)
                while not done:
                    items = [await req.queue.get()]
                    while not req.queue.empty():  # coalesce what piled up while we were writing
                        items.append(req.queue.get_nowait())
                    text = "".join(p for k, p in items if k == "delta")
                    end = next(((k, p) for k, p in items if k != "delta"), None)
                    if end is None:
                        if text:
                            yield chunk(text, None)
                        continue
                    done = True
                    kind, payload = end
                    if kind == "error":
                        finished(None, payload)
                        err = ApiError(500, f"generation failed: {payload}", "engine_error").body()
                        yield f"data: {json.dumps(err)}\n\n"
                        return
                    if text:
                        yield chunk(text, None)
                    await classify_output(payload)
                    finished(payload)
                    yield chunk(None, public_reason(payload["finish_reason"]))
                    if include_usage:
                        tail = {"id": completion_id, "object": obj, "created": created, "model": server.model_id,
                                "choices": [], "usage": usage(payload)}
                        yield f"data: {json.dumps(tail)}\n\n"
                    yield "data: [DONE]\n\n"
            finally:
                if not done:  # the client went away: free its row
                    engine.abort(req)
                    finished(None, "client disconnected")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        ident = server.identity(request)
        server.admit(request, ident)
        body = await server.read_json(request)
        items = body.get("input")
        items = [items] if isinstance(items, str) else items
        if not isinstance(items, list) or not items or len(items) > cfg.max_messages:
            raise ApiError(400, f"'input' must be a string or a list of 1..{cfg.max_messages} strings",
                           "invalid_value", "input")
        texts = []
        for i, item in enumerate(items):
            if isinstance(item, dict) and item.get("type") == "text":
                item = item.get("text")
            if not isinstance(item, str) or len(item) > cfg.max_message_chars:
                raise ApiError(400, f"input[{i}] must be text of at most {cfg.max_message_chars} characters",
                               "invalid_value", "input")
            texts.append(item)
        moderator = server.moderator or Moderator(load_blocklist(cfg.blocklist))
        results = []
        for text in texts:
            if moderator.classifier is not None:
                verdict = await asyncio.to_thread(moderator.check, text)
            else:
                verdict = moderator.check(text)
            for c in verdict["categories"]:
                metrics.safety_flags.labels(category=c, stage="moderations").inc()
            results.append({"flagged": verdict["flagged"],
                            "categories": {c: c in verdict["categories"] for c in CATEGORIES},
                            "category_scores": {c: float(verdict["scores"].get(c, 0.0)) for c in CATEGORIES},
                            "category_applied_input_types": {c: ["text"] if c in verdict["categories"] else []
                                                             for c in CATEGORIES}})
        return {"id": "modr-" + secrets.token_hex(16), "model": f"blocklist:{os.path.basename(cfg.blocklist)}"
                + (f"+classifier:{os.path.basename(os.path.normpath(cfg.classifier))}" if cfg.classifier else ""),
                "results": results}

    @app.post("/v1/feedback")
    async def feedback(request: Request):
        ident = server.identity(request)
        server.admit(request, ident)
        body = await server.read_json(request)
        comment = body.get("comment")
        if comment is not None and (not isinstance(comment, str) or len(comment) > 4000):
            raise ApiError(400, "'comment' must be a string of at most 4000 characters", "invalid_value", "comment")
        if "ids" in body:  # a pairwise vote: two completions of one prompt, and the better one
            ids, preferred = body.get("ids"), body.get("preferred")
            if (not isinstance(ids, list) or len(ids) != 2 or not all(isinstance(i, str) and _ID_PATTERN.match(i)
                                                                     for i in ids) or ids[0] == ids[1]):
                raise ApiError(400, "'ids' must be two different completion ids", "invalid_value", "ids")
            if preferred not in ids:
                raise ApiError(400, "'preferred' must be one of 'ids'", "invalid_value", "preferred")
            check, entry, rating = ids, {"type": "pairwise", "ids": ids, "preferred": preferred}, "pairwise"
        else:
            cid, rating = body.get("id"), body.get("rating")
            if not isinstance(cid, str) or not _ID_PATTERN.match(cid):
                raise ApiError(400, "'id' must be a completion id (chatcmpl-... or cmpl-...)", "invalid_value", "id")
            if rating not in ("up", "down"):
                raise ApiError(400, "'rating' must be \"up\" or \"down\"", "invalid_value", "rating")
            check, entry = [cid], {"type": "rating", "id": cid, "rating": rating}
        for cid in check:
            if not await asyncio.to_thread(server.known_id, cid):
                raise ApiError(404, f"No completion with id {cid} was served here.", "completion_not_found", "id")
        feedback_id = "fb-" + secrets.token_hex(12)
        server.feedback_log.write({"feedback_id": feedback_id, "time": time.time(), "key": ident, **entry,
                                   **({"comment": comment} if comment else {})})
        metrics.feedback.labels(rating=rating).inc()
        return {"id": feedback_id, "object": "feedback", "recorded": True}

    return app


# ============================================================================ 6. the feedback export

def export_feedback(log_dir: str, out: str) -> dict:
    """Join feedback.jsonl with requests.jsonl into train_rm.py records:
    {"prompt": messages, "chosen": str, "rejected": str, "kind": ...}.

    A pairwise vote gives one pair (both completions must answer the same messages). Thumbs
    are grouped by prompt: every thumbs-up completion against every thumbs-down completion of
    the same messages (a completion's latest rating counts). Only chat completions are
    exported; what cannot be used is counted by reason."""
    requests_path, feedback_path = os.path.join(log_dir, "requests.jsonl"), os.path.join(log_dir, "feedback.jsonl")
    if not os.path.exists(feedback_path):
        raise UserError(f"no feedback in {log_dir} (no feedback.jsonl)")
    served = {r["id"]: r for r in read_jsonl(requests_path)
              if isinstance(r.get("id"), str) and r.get("endpoint") == "chat" and isinstance(r.get("completion"), str)}
    skipped: collections.Counter = collections.Counter()
    records, seen = [], set()

    def usable(cid) -> dict | None:
        r = served.get(cid)
        if r is None:
            skipped["unknown_or_not_chat"] += 1
        elif not r["completion"].strip():
            skipped["empty_completion"] += 1
        else:
            return r
        return None

    def add(chosen: dict, rejected: dict, kind: str) -> None:
        if chosen["messages"] != rejected["messages"]:
            skipped["different_prompts"] += 1
        elif chosen["completion"] == rejected["completion"]:
            skipped["same_text"] += 1
        elif (chosen["id"], rejected["id"]) not in seen:
            seen.add((chosen["id"], rejected["id"]))
            records.append({"prompt": chosen["messages"], "chosen": chosen["completion"],
                            "rejected": rejected["completion"], "kind": kind,
                            "source_ids": [chosen["id"], rejected["id"]]})

    ratings: dict[str, str] = {}
    for fb in read_jsonl(feedback_path):
        if fb.get("type") == "pairwise" and isinstance(fb.get("ids"), list) and len(fb["ids"]) == 2:
            a, b = (usable(i) for i in fb["ids"])
            if a is not None and b is not None:
                chosen, rejected = (a, b) if fb.get("preferred") == a["id"] else (b, a)
                add(chosen, rejected, "feedback_pairwise")
        elif fb.get("type") == "rating" and fb.get("rating") in ("up", "down"):
            ratings[fb.get("id")] = fb["rating"]  # the latest rating of a completion wins
    by_prompt: dict[str, dict[str, list]] = {}
    for cid, rating in ratings.items():
        r = usable(cid)
        if r is not None:
            key = json.dumps(r["messages"], sort_keys=True)
            by_prompt.setdefault(key, {"up": [], "down": []})[rating].append(r)
    for groups in by_prompt.values():
        if not groups["up"] or not groups["down"]:
            skipped["rating_without_opposite"] += len(groups["up"]) + len(groups["down"])
        for good in groups["up"]:
            for bad in groups["down"]:
                add(good, bad, "feedback_thumbs")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return {"pairs": len(records), "by_kind": dict(collections.Counter(r["kind"] for r in records)),
            "skipped": dict(skipped)}


# ============================================================================ entry point

def load_server(cfg: ServeConfig) -> Server:
    """Checkpoint, tokenizer, moderation and keys -> a Server (raises UserError)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available")
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        model, config = runtime.load_model(cfg.ckpt, device=device)
        tok = Tokenizer.load(os.path.join(cfg.ckpt, "tokenizer.json"))
    except (runtime.CheckpointError, TokenizerError) as e:
        raise UserError(str(e)) from None
    if tok.vocab_size != model.cfg.vocab_size:
        raise UserError(f"{cfg.ckpt}: tokenizer has {tok.vocab_size} tokens, the model {model.cfg.vocab_size}")
    for p in model.parameters():  # weights in the serving dtype; rotary tables stay fp32
        p.data = p.data.to(dtype)
    model.eval()
    name = cfg.served_model_name or f"{os.path.basename(os.path.normpath(cfg.ckpt))}-step{config.get('step', 0)}"
    moderator = None
    if cfg.moderation:
        try:
            terms = load_blocklist(cfg.blocklist)
        except OSError as e:
            raise UserError(f"cannot read --blocklist {cfg.blocklist}: {e.strerror}") from None
        classifier = None
        if cfg.classifier:
            try:
                classifier = Classifier(cfg.classifier, cfg.classifier_threshold, cfg.classifier_category, device)
            except (runtime.CheckpointError, TokenizerError) as e:
                raise UserError(f"--classifier: {e}") from None
        moderator = Moderator(terms, classifier)
    keys = KeyStore.load(cfg.api_keys) if cfg.api_keys else None
    try:
        return Server(cfg, model, tok, name, moderator, keys)
    except OSError as e:
        raise UserError(f"cannot write the logs under --log-dir {cfg.log_dir}: {e.strerror}") from None


def main(argv=None) -> None:
    cfg = parse_config(ServeConfig, argv, description=__doc__.split("\n")[0])
    if cfg.export_feedback:
        try:
            summary = export_feedback(cfg.log_dir, cfg.export_feedback)
        except UserError as e:
            die(str(e))
        except OSError as e:
            die(f"cannot write {cfg.export_feedback}: {e.strerror}")
        def counts(d: dict) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"
        print(f"exported {summary['pairs']} preference pairs to {cfg.export_feedback} ({counts(summary['by_kind'])}); "
              f"skipped {sum(summary['skipped'].values())} ({counts(summary['skipped'])})")
        print(f"train on them: python train_rm.py --init <sft checkpoint> --data {cfg.export_feedback}")
        return
    print_config(cfg, "serve config")
    try:
        server = load_server(cfg)
    except UserError as e:
        die(str(e))
    import uvicorn
    app = create_app(server)
    print(f"serving {server.model_id} ({sum(p.numel() for p in server.engine.model.parameters()) / 1e6:.2f}M "
          f"parameters, context {server.context}) on http://{cfg.host}:{cfg.port} "
          f"({'API keys required' if server.keys else 'open: no API keys'})", flush=True)
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=cfg.access_log,
                    timeout_graceful_shutdown=5)
    except OSError as e:
        die(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror}")


if __name__ == "__main__":
    main()
