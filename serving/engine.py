"""The engine: one thread owns the model; requests join and leave the running batch at every
decode step (continuous batching, Yu et al. 2022 "Orca"). Rows are left-padded in one KV
cache; a new request is prefilled on its own cache and copied in. Nothing here knows HTTP:
a request's events go to its queue, and the server reads them."""
from __future__ import annotations

import asyncio
import collections
import logging
import queue as queue_mod
import secrets
import threading
import time
from dataclasses import dataclass, field, fields

import torch

from data.text.tokenizer import Tokenizer
from model import KVCache, sample_next
from serving.decode import DecodeStep
from serving.metrics import Metrics
from serving.moderation import Moderator
from serving.text import TextStream
from serving.types import SamplingParams, TokenLogprob

log = logging.getLogger("serve")


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
    or a plain queue when loop is None): ("delta", text) and at the end ("finish", info).
    With `logprobs` set (k alternatives), a ("logprobs", entries) event comes just before a
    delta, with the entries (TokenLogprob) of the tokens whose text the delta completes, and
    info has "logprobs" (every generated token's entry, or only those of the sent text when
    the output filter cut the response), "logprobs_tail" (those not yet sent) and, with
    `echo`, "prompt_logprobs" (the first token's logprob None). Built by keyword; the
    sampling fields are SamplingParams', so `GenRequest.of(ids, params, ...)` copies them."""
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    moderate: bool = True
    logprobs: int | None = None  # None: none; k: each token's log-prob and the k likeliest alternatives
    echo: bool = False  # max_tokens may be 0; with logprobs, the prompt's tokens are scored too
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
    prompt_logprobs: list[TokenLogprob] | None = None  # with echo: per prompt token, logprob None for the first
    token_logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token
    # where each generated token's text ends in the response; None: the output filter
    # stopped on that token, so none of its text is ever sent
    text_ends: list[int | None] = field(default_factory=list)
    logprobs_sent: int = 0  # entries of token_logprobs already sent with a delta

    @classmethod
    def of(cls, prompt: list[int], params: SamplingParams, **engine_side) -> "GenRequest":
        """A request for `prompt` with the caller's sampling options; `engine_side`: moderate,
        loop, queue."""
        return cls(prompt=prompt, **{f.name: getattr(params, f.name) for f in fields(params)}, **engine_side)

    def sent(self, k: int) -> bool:
        """Whether the text of generated token k has gone out in a delta."""
        end = self.text_ends[k]
        return end is not None and end <= self.text.sent

    def __post_init__(self):
        if self.queue is None:
            self.queue = asyncio.Queue() if self.loop is not None else queue_mod.SimpleQueue()


class Engine:
    """Continuous batching on one thread that owns the model.

    Each iteration: finished and aborted rows leave the batch; waiting requests are admitted
    while rows are free (prefilled together on a fresh cache, left-padded among themselves,
    sampled once, then copied into the batch cache); one decode step runs for every row
    (serving.decode.DecodeStep: the model's forward with the per-op overhead taken out).
    Greedy rows compute exactly what `model.generate` computes for the prompt alone (with
    quantization="int8", what it computes with the int8-rounded weights, up to rounding).
    """

    def __init__(self, model, tok: Tokenizer, *, max_running: int = 16, max_waiting: int = 64,
                 metrics: "Metrics | None" = None, moderator: Moderator | None = None,
                 quantization: str = "none", count_finishes: bool = True):
        self.model, self.tok = model, tok
        # request_success by finish reason: the engine's count, unless its owner counts each
        # request once as it ends (the server: a client may leave after the engine finished)
        self.count_finishes = count_finishes
        self.decode_step = DecodeStep(model, quantization)
        self.decode_step.apply_to_model()  # int8: the prefill runs on the same (dequantized) weights
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
        least = 0 if req.echo else 1  # the prompt alone (scored with logprobs), no token generated
        if not req.prompt or len(req.prompt) + req.max_tokens > limit or req.max_tokens < least:
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
        if any(r.echo and r.logprobs is not None for r in reqs):
            logits = self._score_prompts(idx.to(self.device), kv_start, pre, reqs)
        else:
            logits = self.model(idx.to(self.device), kv_start=kv_start, cache=pre, last_only=True)
        self.metrics.prompt_tokens.inc(sum(len(r.prompt) for r in reqs))
        rows = [j for j, r in enumerate(reqs) if r.max_tokens > 0]
        for r in reqs:
            if r.max_tokens == 0:  # scored, nothing to generate
                self._final_event(r, "length", events)
        for j in rows:
            self.cache.insert(pre, j, len(reqs[j].prompt))
            self.running.append(reqs[j])
        if rows:
            live = [reqs[j] for j in rows]
            self._advance(live, self._sample(logits[rows] if len(rows) < len(reqs) else logits, live), events)

    def _score_prompts(self, idx: torch.Tensor, kv_start: torch.Tensor, pre: KVCache,
                       reqs: list[GenRequest]) -> torch.Tensor:
        """The prefill's last logits, and the echo rows' prompt log-probs (r.prompt_logprobs),
        from every position's logits of those rows only."""
        h = self.model.hidden_states(idx, kv_start, pre)
        width = idx.shape[1]
        for j, r in enumerate(reqs):
            if r.echo and r.logprobs is not None:
                logits = self.model.lm_head(h[j, width - len(r.prompt):-1])
                r.prompt_logprobs = [TokenLogprob(r.prompt[0], None, [])] + self._logprobs(logits, r.prompt[1:],
                                                                                            r.logprobs)
        return self.model.lm_head(h[:, -1])

    def _decode(self, events: list) -> None:
        if self.cache.length + 1 > self.cache.capacity:
            self.cache.compact()
        rows = self.running
        idx = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        logits = self.decode_step(idx, self.cache)
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
        tokens = out.tolist()
        want = [i for i, r in enumerate(reqs) if r.logprobs is not None]
        for i in want:  # the distribution the sampler started from, before temperature, top-k and top-p
            reqs[i].token_logprobs.append(self._logprobs(logits[i:i + 1], tokens[i:i + 1], reqs[i].logprobs)[0])
        return tokens

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
        """A TokenLogprob (the token, its log-prob, the k likeliest) per row of logits (T, V):
        log_softmax in float32 of the model's logits, the model's own distribution."""
        if not tokens:
            return []
        lp = logits.float().log_softmax(dim=-1)
        chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
        if k > 0:
            top_lp, top_id = lp.topk(k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(top_id.tolist(), top_lp.tolist())]
        else:
            tops = [[] for _ in tokens]
        return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]

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
            if r.logprobs is not None:
                # where its text ends; a token the filter stopped on sent none of its text
                r.text_ends.append(len(r.text.text) if reason != "content_filter" else None)
                if delta and reason is None:
                    self._send_logprobs(r, events)
            if delta:
                events.append((r, ("delta", delta)))
            if reason is not None:
                self._finish(r, reason, events)
        # finished rows left in _finish; dropping shared padding keeps attention short
        if self.cache.n and int(self.cache.kv_start[:self.cache.n].min()) >= 64:
            self.cache.compact()

    @staticmethod
    def _send_logprobs(r: GenRequest, events: list) -> None:
        """A ("logprobs", entries) event for the tokens whose text is now all sent (it comes
        just before the delta that sends it)."""
        k = r.logprobs_sent
        while k < len(r.token_logprobs) and r.sent(k):
            k += 1
        if k > r.logprobs_sent:
            events.append((r, ("logprobs", r.token_logprobs[r.logprobs_sent:k])))
            r.logprobs_sent = k

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
        if self.count_finishes:
            m.success.labels(finished_reason=reason).inc()
        m.e2e.observe(now - r.arrival)
        info = {"finish_reason": reason, "prompt_tokens": len(r.prompt), "completion_tokens": len(r.tokens),
                "text": r.text.emitted if r.text is not None else "",
                "flags": list(r.text.flags) if r.text is not None and reason == "content_filter" else [],
                "timings": {"queue_s": (r.admitted_at - r.arrival) if r.admitted_at else None,
                            "ttft_s": (r.first_token_at - r.arrival) if r.first_token_at else None,
                            "e2e_s": now - r.arrival}}
        if r.logprobs is not None:  # a filtered response keeps only the entries of the text it sent
            kept = [e for k, e in enumerate(r.token_logprobs) if reason != "content_filter" or r.sent(k)]
            info.update(logprobs=kept, logprobs_tail=kept[r.logprobs_sent:],
                        prompt_logprobs=r.prompt_logprobs)
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
        return self.wait(self.submit(req), timeout)

    @staticmethod
    def wait(req: GenRequest, timeout: float = 300.0) -> dict:
        """A submitted request's finish info (RuntimeError on an engine error), from a plain queue."""
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
