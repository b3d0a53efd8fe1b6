"""The HTTP API (FastAPI): a Server holds what one app needs, and each route is a short
function over it. Handlers are async and never run the model: the engine thread does.

A chat or text completion goes through three steps: `prepare` (who asks, may they, what
did they send: a Generation, or an ApiError), `run` (charge the token budget and hand the
request to the engine), then `collect` (one JSON body) or `stream` (server-sent events).
Either way `finish` writes the request's final row, then refunds unused tokens and counts
output flags. The store is never called on the event loop: `self.db` (store.OffLoop) runs
each call on a thread with a timeout, so a locked or stalled database fails the requests
that need it with 503 store_unavailable while /health and everything else stay fast. A
response is delivered only once its final row is written: a non-streamed one gets 503
instead, a stream ends with an error event and [DONE], and the row is marked as an error
as soon as the store answers again.
A text completion of several prompts is one Generation per prompt, merged into one body.
Log-probs (chat `logprobs`/`top_logprobs`, completions `logprobs`/`echo`) come from the
engine as entries and are shaped by protocol.LogprobShaper; /tokenize, /detokenize and
/tokenizer_info are vLLM's routes, for lm-eval's remote tokenizer."""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request  # Request at module level: handler annotations resolve in these globals
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from data.tokenizer import Tokenizer
from data.toxicity import load_blocklist
from serving import protocol
from serving.config import STATIC_PAGE, ServeConfig
from serving.engine import Engine, EngineFull, GenRequest
from serving.limits import KeyStore, Limiter, key_id
from serving.metrics import Metrics
from serving.moderation import CATEGORIES, Moderator
from serving.protocol import ApiError, Completion, retry_after
from serving.store import OffLoop, Store, StoreUnavailable
from serving.text import chat_prompt_ids, completion_prompt_ids


@dataclass(eq=False)
class Generation:
    """One chat or text completion on its way through the server."""
    ident: str  # the caller's hashed key (or address)
    out: Completion  # id, created, model: what the response carries
    prompt_ids: list[int]
    params: dict  # protocol.parse_sampling's
    stream: bool
    record: dict  # the request log's record, completed when the request ends
    req: GenRequest | None = None
    echo_text: str = ""  # completions with echo: the prompt's text, which the choice's text starts with
    echo_skip: int = 0  # prompt tokens not echoed: a string prompt's document-start token
    shaper: protocol.LogprobShaper | None = None  # with logprobs


class Server:
    """Everything one app needs: the model's engine, tokenizer, limits, logs and metrics."""

    def __init__(self, cfg: ServeConfig, model, tok: Tokenizer, model_id: str, moderator: Moderator | None,
                 keys: KeyStore | None, store: Store, identity_secret: bytes):
        self.cfg, self.tok, self.model_id = cfg, tok, model_id
        self.metrics = Metrics()
        self.moderator = moderator
        self.engine = Engine(model, tok, max_running=cfg.max_running, max_waiting=cfg.max_waiting,
                             metrics=self.metrics, moderator=moderator, quantization=cfg.quantization,
                             count_finishes=False)  # finish() counts each request once, as its row ends
        self.context = model.cfg.max_seq_len
        self.keys = keys
        self.store = store
        self.db = OffLoop(store, cfg.store_timeout_s)
        self.identity_secret = identity_secret
        self.replica = "replica-" + secrets.token_hex(6)  # this process's readiness probe row
        self.limiter = Limiter(store, cfg.rate_limit_rpm, cfg.rate_limit_tpm, cfg.abuse_max_flags,
                               cfg.abuse_window_s, cfg.abuse_block_s)
        self.created = int(time.time())

    # -- per request: who is asking, may they, what did they send
    def identity(self, request) -> str:
        """The caller's key id (an HMAC), after checking the key; an open server uses the
        address (the peer's, or X-Forwarded-For's from --forwarded-allow-ips only)."""
        auth = request.headers.get("authorization", "")
        if self.keys is None:
            return key_id("addr:" + (request.client.host if request.client else "?"), self.identity_secret)
        scheme, _, presented = auth.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip() or not self.keys.check(presented.strip()):
            raise ApiError(401, "Incorrect API key provided.", "invalid_api_key")
        return key_id(presented.strip(), self.identity_secret)

    async def admit(self, request) -> str:
        """The caller's identity, once its key is good and its request bucket not empty."""
        ident = self.identity(request)
        now = time.time()
        wait = await self.db(self.limiter.blocked_for, ident, now)
        if wait:
            self.metrics.rate_limited.labels(reason="blocked").inc()
            raise ApiError(429, "This key is blocked for a while: too many requests tripped the content filter.",
                           "key_blocked", headers=retry_after(wait))
        wait = await self.db(self.limiter.take_request, ident, now)
        if wait:
            self.metrics.rate_limited.labels(reason="requests").inc()
            raise ApiError(429, "Rate limit reached for requests per minute.", "rate_limit_exceeded",
                           headers=retry_after(wait))
        return ident

    async def read_json(self, request) -> dict:
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body exceeds {limit} bytes", "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds {limit} bytes", "request_too_large")
            chunks.append(chunk)
        return protocol.parse_json_body(b"".join(chunks))

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if not isinstance(model, str):
            raise ApiError(400, "'model' is required (see GET /v1/models)", "invalid_value", "model")
        if model not in (self.model_id, self.cfg.ckpt_name):
            raise protocol.model_not_found(model)

    def model_card(self) -> dict:
        """The model as /v1/models lists it (the checkpoint's directory name, never its path)."""
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "serve.py",
                "root": self.cfg.ckpt_name, "max_model_len": self.context}

    # -- moderation, limits, ids
    async def check_text(self, text: str, moderator: Moderator | None = None) -> dict:
        """Moderator.check, off the event loop when a classifier has to run."""
        moderator = moderator or self.moderator
        if moderator.classifier is not None:
            return await asyncio.to_thread(moderator.check, text)
        return moderator.check(text)

    async def moderate(self, text: str, ident: str, stage: str) -> dict | None:
        """Blocklist and classifier on a text; flags are counted by category and stage, and
        tracked per key."""
        if self.moderator is None:
            return None
        result = await self.check_text(text)
        if result["flagged"]:
            await self.flagged(result["categories"], ident, stage)
        return result

    async def flagged(self, categories: list[str], ident: str, stage: str) -> None:
        for c in categories:
            self.metrics.safety_flags.labels(category=c, stage=stage).inc()
        await self.db(self.limiter.record_flag, ident, time.time())

    async def charge_tokens(self, ident: str, amount: int) -> None:
        if self.cfg.rate_limit_tpm and amount > self.cfg.rate_limit_tpm:
            raise ApiError(400, f"this request needs {amount} tokens (prompt + max_tokens); the per-minute limit is "
                                f"{int(self.cfg.rate_limit_tpm)}: lower max_tokens", "tokens_exceed_limit",
                           "max_tokens")
        wait = await self.db(self.limiter.take_tokens, ident, amount, time.time())
        if wait:
            self.metrics.rate_limited.labels(reason="tokens").inc()
            raise ApiError(429, "Rate limit reached for tokens per minute.", "rate_limit_exceeded",
                           headers=retry_after(wait))

    def kept(self, record: dict) -> dict:
        """What the store keeps of a request: all of it, or with --no-request-log only who
        asked, when and how it ended (no messages, prompt or completion)."""
        if self.cfg.request_log:
            return record
        return {k: v for k, v in record.items() if k not in ("messages", "prompt", "completion")}

    async def log_request(self, record: dict, status: str = "complete") -> None:
        """Write a request's final row (raises StoreUnavailable)."""
        await self.db(self.store.finish_request, record["id"], status, self.kept(record))

    def log_request_later(self, record: dict, status: str) -> None:
        """Write a request's final row with no one waiting for it (store.OffLoop.later)."""
        self.db.later(self.store.finish_request, record["id"], status, self.kept(record))

    # -- a chat or text completion: prepare, run, then collect or stream
    async def prepare(self, request, chat: bool) -> list[Generation]:
        """Check the caller and the body, and moderate the input (400 content_filter): one
        Generation per prompt (a chat has one; a text completion one per prompt it lists)."""
        ident = await self.admit(request)
        body = await self.read_json(request)
        self.check_model(body)
        if chat:
            messages = protocol.parse_messages(body, self.cfg.max_messages, self.cfg.max_message_chars)
            prompts = [(chat_prompt_ids(self.tok, messages), {"messages": messages},  # a caller writes the
                        [m["content"] for m in messages], "", 0)]  # assistant turns it sends too
        else:
            prompts = [self.completion_prompt(p) for p in protocol.parse_prompts(
                body, self.cfg.max_message_chars, self.cfg.max_messages, self.tok.vocab_size)]
        stream, include_usage = protocol.parse_stream(body)
        if stream and len(prompts) > 1:
            raise ApiError(400, "streaming is supported for one prompt at a time", "unsupported_parameter", "stream")
        params = [protocol.parse_sampling(body, len(p[0]), self.context, self.cfg.max_tokens_limit, chat)
                  for p in prompts]
        gens: list[Generation] = []
        try:
            for prompt, p in zip(prompts, params):
                gens.append(await self.prepare_one(ident, chat, *prompt, p, stream, include_usage))
        except (ApiError, StoreUnavailable) as e:  # a later prompt failed: the earlier ones' rows end too
            for gen in gens:
                self.log_request_later({**gen.record, "completion": None, "finish_reason": "error",
                                        "error": getattr(e, "code", "store_unavailable")}, "error")
            raise
        return gens

    def completion_prompt(self, prompt: str | list[int]) -> tuple:
        """(ids, what the log keeps, the text to moderate, the echo text, prompt tokens not echoed)
        of a completions prompt: a string continues a document, after the document-start token
        (not echoed, so every token of the string is scored); ids are taken as they are."""
        if isinstance(prompt, str):
            return completion_prompt_ids(self.tok, prompt), {"prompt": prompt}, [prompt], prompt, 1
        text = self.tok.decode(prompt)
        return list(prompt), {"prompt": prompt}, [text], text, 0

    async def prepare_one(self, ident: str, chat: bool, prompt_ids: list[int], logged: dict, user_texts: list[str],
                          echo_text: str, echo_skip: int, params: dict, stream: bool,
                          include_usage: bool) -> Generation:
        out = Completion(chat, self.model_id, include_usage=include_usage)
        record = {"id": out.id, "time": time.time(), "endpoint": "chat" if chat else "completions",
                  "model": self.model_id, "key": ident, **logged,
                  "params": {k: v for k, v in params.items() if k != "stop"} | {"stop": list(params["stop"])}}
        await self.db(self.store.begin_request, out.id, ident, record["endpoint"], self.kept(record))  # a row
        verdict = await self.moderate("\n".join(user_texts), ident, "input")  # from admission on
        if verdict is not None and verdict["flagged"]:
            await self.log_request({**record, "finish_reason": "content_filter", "stage": "input",
                                    "categories": verdict["categories"], "completion": None})
            raise ApiError(400, "The request was rejected by the content filter (categories: "
                                + ", ".join(verdict["categories"]) + ").", "content_filter",
                           "messages" if chat else "prompt")
        shaper = None if params["logprobs"] is None else protocol.LogprobShaper(self.piece, chat)
        return Generation(ident, out, prompt_ids, params, stream, record, echo_text=echo_text if params["echo"] else "",
                          echo_skip=echo_skip, shaper=shaper)

    def piece(self, token: int) -> bytes:
        """A token's bytes (a special token's are its name)."""
        return self.tok.token_bytes[token] if token < len(self.tok.token_bytes) else self.tok.id_to_piece(token)

    def logprobs(self, gen: Generation, entries: list, echo: bool = False) -> dict | None:
        """The choice's (or chunk's) `logprobs`: the entries, after the echoed prompt's."""
        if gen.shaper is None:
            return None
        if echo and gen.params["echo"]:
            entries = (gen.req.prompt_logprobs or [])[gen.echo_skip:] + list(entries)
        return gen.shaper.shape(entries)

    async def run(self, gen: Generation) -> None:
        """Charge prompt + max_tokens to the caller's bucket and queue the request (503 when full)."""
        p = gen.params
        budget = len(gen.prompt_ids) + p["max_tokens"]
        await self.charge_tokens(gen.ident, budget)
        gen.req = GenRequest(gen.prompt_ids, p["max_tokens"], p["temperature"], p["top_p"], p["top_k"], p["stop"],
                             p["seed"], p["ignore_eos"], moderate=self.moderator is not None,
                             logprobs=p["logprobs"], echo=p["echo"], loop=asyncio.get_running_loop())
        try:
            self.engine.submit(gen.req)
        except EngineFull:
            self.db.later(self.limiter.refund_tokens, gen.ident, budget)
            raise ApiError(503, "The server is overloaded: too many requests are running and waiting. Retry later.",
                           "server_overloaded", headers=retry_after(1)) from None

    async def classify_output(self, info: dict) -> None:
        """The classifier reads the whole response once it is complete (the blocklist ran on
        every step in the engine); a flagged response ends as content_filter."""
        if self.moderator is None or self.moderator.classifier is None or not info["text"]:
            return
        if info["finish_reason"] not in ("stop", "length"):
            return
        verdict = await asyncio.to_thread(self.moderator.check, info["text"])
        if verdict["flagged"]:
            info["finish_reason"], info["flags"] = "content_filter", verdict["categories"]
            info["withheld"] = True  # a non-streamed response is not delivered

    def final_row(self, gen: Generation, info: dict | None, error: str | None) -> tuple[dict, str, str]:
        """(record, status, finish reason) of a request that ended (info: the engine's finish
        event) or failed (error; "client disconnected" is an abort)."""
        aborted = error == "client disconnected"
        reason = "abort" if aborted else info["finish_reason"] if info else "error"
        record = {**gen.record, "completion": info["text"] if info else None, "finish_reason": reason,
                  "error": error, "usage": protocol.usage(info) if info else None,
                  "timings": info["timings"] if info else None}
        return record, "aborted" if aborted else "complete" if info else "error", reason

    async def finish(self, gen: Generation, info: dict | None, error: str | None = None) -> None:
        """Write the request's final row, then refund unused tokens and count output flags.
        When the row cannot be written, raises StoreUnavailable and leaves a retry that
        marks the request as an error: the response must not be delivered."""
        record, status, reason = self.final_row(gen, info, error)
        try:
            await self.log_request(record, status)
        except StoreUnavailable as e:
            self.log_request_later({**record, "finish_reason": "error", "error": f"store_unavailable: the final "
                                    f"write failed ({e}); the response was not delivered"}, "error")
            self.metrics.success.labels(finished_reason="error").inc()
            raise
        self.metrics.success.labels(finished_reason=reason).inc()
        if info is not None:  # the row is written: the response stands even if these fail
            with contextlib.suppress(StoreUnavailable):
                await self.db(self.limiter.refund_tokens, gen.ident,
                              gen.params["max_tokens"] - info["completion_tokens"])
            if info["finish_reason"] == "content_filter":
                for c in info["flags"]:
                    self.metrics.safety_flags.labels(category=c, stage="output").inc()
                with contextlib.suppress(StoreUnavailable):
                    await self.db(self.limiter.record_flag, gen.ident, time.time())

    def abort(self, gen: Generation) -> None:
        """The client went away: free its row in the batch and end its row in the store.
        Nothing here waits (a cancelled handler cannot): the write goes to the retry thread."""
        self.engine.abort(gen.req)
        record, status, reason = self.final_row(gen, None, "client disconnected")
        self.metrics.success.labels(finished_reason=reason).inc()
        self.log_request_later(record, status)

    async def collect(self, gen: Generation, request) -> dict | Response:
        """Wait for the whole response (499 when the client disconnects first)."""
        info, checked = None, time.monotonic()
        try:
            while info is None:
                try:
                    kind, payload = await asyncio.wait_for(gen.req.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    kind = payload = None
                if time.monotonic() - checked >= 0.5:  # tokens may flow all along: look at the client anyway
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        self.abort(gen)
                        return Response(status_code=499)
                if kind == "error":
                    with contextlib.suppress(StoreUnavailable):
                        await self.finish(gen, None, payload)
                    raise ApiError(500, f"generation failed: {payload}", "engine_error")
                if kind == "finish":
                    info = payload
        except asyncio.CancelledError:  # the server is shutting down: the row says aborted, not incomplete
            self.abort(gen)
            raise
        await self.classify_output(info)
        await self.finish(gen, info)  # StoreUnavailable: 503, the completion is not delivered
        if info.get("withheld"):
            info["text"], info["logprobs"] = "", []
        return gen.out.body(gen.echo_text + info["text"], protocol.public_reason(info["finish_reason"]),
                            protocol.usage(info), self.logprobs(gen, info.get("logprobs", []), echo=True))

    async def _next_events(self, gen: Generation) -> tuple[str, list, tuple | None]:
        """(the text deltas that piled up while we were writing, joined; their tokens'
        logprobs entries; the end event or None)."""
        items = [await gen.req.queue.get()]
        while not gen.req.queue.empty():
            items.append(gen.req.queue.get_nowait())
        text = "".join(p for k, p in items if k == "delta")
        entries = [e for k, p in items if k == "logprobs" for e in p]
        return text, entries, next(((k, p) for k, p in items if k not in ("delta", "logprobs")), None)

    async def _ending(self, gen: Generation, kind: str, payload) -> list[str]:
        """The last events of a stream: the finish reason, usage and [DONE]; or an error event
        and [DONE] when generation failed or the final row could not be written."""
        if kind == "error":
            with contextlib.suppress(StoreUnavailable):
                await self.finish(gen, None, payload)
            return [protocol.sse(ApiError(500, f"generation failed: {payload}", "engine_error").body()), protocol.DONE]
        await self.classify_output(payload)
        try:
            await self.finish(gen, payload)
        except StoreUnavailable:
            return [protocol.sse(STORE_UNAVAILABLE_IN_STREAM.body()), protocol.DONE]
        tail = [gen.out.chunk(None, protocol.public_reason(payload["finish_reason"]),
                              logprobs=self.logprobs(gen, payload.get("logprobs_tail", [])))]
        if gen.out.include_usage:
            tail.append(gen.out.usage_chunk(protocol.usage(payload)))
        return tail + [protocol.DONE]

    async def stream(self, gen: Generation):
        """Server-sent events: the role (chat), text deltas, then _ending's."""
        done = False
        try:
            if gen.out.chat:
                yield gen.out.chunk(None, None, role=True)
            echoed = not gen.params["echo"]
            while not done:
                text, entries, end = await self._next_events(gen)
                done = end is not None
                if not echoed and not (done and end[0] == "error"):  # the prompt first, once it is scored
                    echoed = True
                    yield gen.out.chunk(gen.echo_text, None, logprobs=self.logprobs(gen, [], echo=True))
                if text and not (done and end[0] == "error"):
                    yield gen.out.chunk(text, None, logprobs=self.logprobs(gen, entries))
                if done:
                    for event in await self._ending(gen, *end):
                        yield event
        finally:
            if not done:
                self.abort(gen)


STORE_UNAVAILABLE = "The serving store is unavailable. Retry later."
# A stream's last words when its final row cannot be written: the text already sent stands
# unrecorded, so the client is told the request failed
STORE_UNAVAILABLE_IN_STREAM = ApiError(503, "The response could not be recorded: the serving store is unavailable. "
                                            "Retry later.", "store_unavailable")


# ----------------------------------------------------------------------------- the routes

def _server(request) -> Server:
    return request.app.state.server


async def generate(request: Request, chat: bool):
    server = _server(request)
    gens = await server.prepare(request, chat)
    for i, gen in enumerate(gens):
        try:
            await server.run(gen)
        except (ApiError, StoreUnavailable) as e:  # refused before it ran (429, 503): the row says so
            for other in gens[i:]:
                server.log_request_later({**other.record, "completion": None, "finish_reason": "error",
                                          "error": getattr(e, "code", "store_unavailable")}, "error")
            for other in gens[:i]:  # the prompts already queued go too
                server.abort(other)
            raise
    if not gens[0].stream:
        bodies = [await server.collect(gen, request) for gen in gens]
        bad = next((b for b in bodies if isinstance(b, Response)), None)
        return bad or (bodies[0] if len(bodies) == 1 else protocol.merge_choices(bodies))
    return StreamingResponse(server.stream(gens[0]), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def chat_completions(request: Request):
    return await generate(request, chat=True)


async def completions(request: Request):
    return await generate(request, chat=False)


async def moderations(request: Request):
    server = _server(request)
    cfg = server.cfg
    ident = await server.admit(request)
    body = await server.read_json(request)
    texts = protocol.parse_moderation_input(body, cfg.max_messages, cfg.max_message_chars)
    moderator = server.moderator or Moderator(load_blocklist(cfg.blocklist))
    results = []
    for text in texts:
        verdict = await server.check_text(text, moderator)
        for c in verdict["categories"]:
            server.metrics.safety_flags.labels(category=c, stage="moderations").inc()
        results.append(protocol.moderation_result(verdict, CATEGORIES))
    if any(r["flagged"] for r in results):  # probing the filter counts toward a block like any flagged request
        await server.db(server.limiter.record_flag, ident, time.time())
    name = f"blocklist:{os.path.basename(cfg.blocklist)}"
    if cfg.classifier:
        name += f"+classifier:{os.path.basename(os.path.normpath(cfg.classifier))}"
    return protocol.moderation_response(results, name)


async def feedback(request: Request):
    """A rating or a pairwise vote on completions served to the same key, each completed
    chat completion whose text the store keeps (what the export can use: anything else is
    refused, never recorded in vain). The 200 comes once the vote is committed."""
    server = _server(request)
    ident = await server.admit(request)
    body = await server.read_json(request)
    check, entry, rating = protocol.parse_feedback(body)
    for cid in check:
        summary = await server.db(server.store.request_summary, cid)
        if summary is None:
            raise ApiError(404, f"No completion with id {cid} was served here.", "completion_not_found", "id")
        if summary["key"] != ident:
            raise ApiError(403, f"The completion {cid} was served to another key: only its user may rate it.",
                           "permission_denied", "id")
        why = ("it is not a chat completion" if summary["endpoint"] != "chat" else
               f"it did not complete (status {summary['status']})" if summary["status"] != "complete" else
               "the server keeps no request text (--no-request-log)" if not summary["text_kept"] else None)
        if why:
            raise ApiError(409, f"The completion {cid} cannot be rated: {why}.", "completion_not_rateable", "id")
    feedback_id = "fb-" + secrets.token_hex(12)
    await server.db(server.store.add_feedback, feedback_id, ident,
                    {"feedback_id": feedback_id, "time": time.time(), "key": ident, **entry})
    server.metrics.feedback.labels(rating=rating).inc()
    return {"id": feedback_id, "object": "feedback", "recorded": True}


async def list_models(request: Request):
    server = _server(request)
    await server.admit(request)
    return {"object": "list", "data": [server.model_card()]}


async def get_model(model_id: str, request: Request):
    server = _server(request)
    await server.admit(request)
    if model_id != server.model_id:
        raise protocol.model_not_found(model_id)
    return server.model_card()


async def tokenizer_info(request: Request):
    """vLLM's tokenizer routes, which lm-eval's `tokenizer_backend=remote` reads: special-token
    text in a prompt is ordinary text, as everywhere here (so lm-eval's prefix token for an
    empty context needs `custom_prefix_token_id`; the document-start token is eos_token).
    They check the key but spend no request from its bucket: lm-eval calls /tokenize for
    every string it encodes."""
    server = _server(request)
    server.identity(request)
    return {"eos_token": "<|endoftext|>", "bos_token": None, "pad_token": "<|pad|>",
            "model_max_length": server.context, "vocab_size": server.tok.vocab_size,
            "tokenizer_class": "data.tokenizer.Tokenizer (byte-level BPE)"}


async def tokenize(request: Request):
    """{"prompt", "add_special_tokens"} -> {"tokens", "count", "max_model_len"}; with special
    tokens, the ids a completions string prompt gets (the document-start token first)."""
    server = _server(request)
    server.identity(request)
    prompt, special = protocol.parse_tokenize(await server.read_json(request), server.cfg.max_message_chars)
    ids = completion_prompt_ids(server.tok, prompt) if special else server.tok.encode(prompt)
    return {"tokens": ids, "count": len(ids), "max_model_len": server.context}


async def detokenize(request: Request):
    server = _server(request)
    server.identity(request)
    tokens = protocol.parse_detokenize(await server.read_json(request), server.tok.vocab_size)
    return {"prompt": server.tok.decode(tokens)}


async def health(request: Request):
    """Liveness: the process answers and its engine runs. Never waits for the store."""
    server = _server(request)
    engine = server.engine
    if not engine.alive():
        return JSONResponse({"status": "engine stopped", "error": engine.error}, status_code=503)
    return {"status": "ok", "model": server.model_id, "running": len(engine.running), "waiting": len(engine.waiting)}


async def ready(request: Request):
    """Readiness, for a load balancer: live, and the store takes a write within
    --store-timeout-s (503 store_unavailable when it is down, locked, read-only or full)."""
    server = _server(request)
    if not server.engine.alive():
        return JSONResponse({"status": "engine stopped", "error": server.engine.error}, status_code=503)
    try:
        await server.db(server.store.probe, server.replica)
    except StoreUnavailable as e:
        return JSONResponse({"status": "store unavailable", "error": str(e)}, status_code=503,
                            headers=retry_after(1))
    return {"status": "ready", "model": server.model_id}


async def prometheus(request: Request):
    return Response(generate_latest(_server(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def chat_page():
    with open(STATIC_PAGE, encoding="utf-8") as f:
        return HTMLResponse(f.read())


# ----------------------------------------------------------------------------- errors and the app

def error_response(request, e: ApiError) -> JSONResponse:
    _server(request).metrics.http_errors.labels(status=str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def on_api_error(request, e: ApiError):
    return error_response(request, e)


async def on_http_error(request, e):
    message = {404: f"Unknown route {request.method} {request.url.path}", 405: "Method not allowed"}.get(
        e.status_code, str(e.detail))
    return error_response(request, ApiError(e.status_code, message, "not_found" if e.status_code == 404 else None))


async def on_validation_error(request, e):
    return error_response(request, ApiError(400, "invalid request", "invalid_value"))


async def on_store_error(request, e):
    """The database failed or did not answer in time (PostgreSQL restarting or stalled, a
    SQLite file locked past --store-timeout-s, a full or read-only disk)."""
    return error_response(request, ApiError(503, STORE_UNAVAILABLE, "store_unavailable", headers=retry_after(1)))


@contextlib.asynccontextmanager
async def lifespan(app):
    server = app.state.server
    if server.engine.thread is None:
        server.engine.start()
    yield
    server.engine.shutdown()
    server.db.close()  # the rows still to write get their chance before the store closes


ROUTES = [("GET", "/health", health), ("GET", "/ready", ready), ("GET", "/metrics", prometheus),
          ("GET", "/", chat_page),
          ("GET", "/v1/models", list_models), ("GET", "/v1/models/{model_id:path}", get_model),
          ("POST", "/v1/chat/completions", chat_completions), ("POST", "/v1/completions", completions),
          ("POST", "/v1/moderations", moderations), ("POST", "/v1/feedback", feedback),
          ("GET", "/tokenizer_info", tokenizer_info), ("POST", "/tokenize", tokenize),
          ("POST", "/detokenize", detokenize)]


def create_app(server: Server) -> FastAPI:
    """The FastAPI app over one Server (app.state.server)."""
    app = FastAPI(title="serve.py", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    for error in (StoreUnavailable, *server.store.errors):
        app.add_exception_handler(error, on_store_error)
    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    return app
