"""The HTTP API (FastAPI): a Server holds what one app needs, and each route is a short
function over it. Handlers are async and never run the model: the engine thread does.

A chat or text completion goes through three steps: `prepare` (who asks, may they, what
did they send — serving/gate.py: a Generation, or an ApiError), `run` (charge the token
budget and hand the request to the engine), then serving/generation.py's `collect` (one
JSON body) or `events` (server-sent events). Either way `Generation.finish` writes the
request's final row, then refunds unused tokens and counts output flags. The store is never called on the event loop: `self.db` (store.OffLoop) runs
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

from fastapi import FastAPI, Request  # Request at module level: handler annotations resolve in these globals
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from data.text.tokenizer import Tokenizer
from data.toxicity import load_blocklist
from serving import protocol
from serving.config import STATIC_PAGE, ServeConfig
from serving.engine import Engine, EngineFull, GenRequest
from serving.gate import Gate
from serving.generation import Generation
from serving.limits import KeyStore, Limiter
from serving.metrics import Metrics
from serving.moderation import CATEGORIES, Moderator
from serving.protocol import ApiError, Completion, retry_after
from serving.store import OffLoop, Store, StoreUnavailable
from serving.text import chat_prompt_ids, completion_prompt_ids
from serving.types import Prompt, SamplingParams


class Server:
    """Everything one app needs: the model's engine and tokenizer, the gate (keys, limits,
    input filter), the store and the metrics; it turns a request into Generations."""

    def __init__(self, cfg: ServeConfig, model, tok: Tokenizer, model_id: str, moderator: Moderator | None,
                 keys: KeyStore | None, store: Store, identity_secret: bytes):
        self.cfg, self.tok, self.model_id = cfg, tok, model_id
        self.metrics = Metrics()
        self.moderator = moderator
        self.engine = Engine(model, tok, max_running=cfg.max_running, max_waiting=cfg.max_waiting,
                             metrics=self.metrics, moderator=moderator, quantization=cfg.quantization,
                             count_finishes=False)  # Generation.finish counts each request once, as its row ends
        self.context = model.cfg.max_seq_len
        self.store = store
        self.db = OffLoop(store, cfg.store_timeout_s)
        self.replica = "replica-" + secrets.token_hex(6)  # this process's readiness probe row
        self.limiter = Limiter(store, cfg.rate_limit_rpm, cfg.rate_limit_tpm, cfg.abuse_max_flags,
                               cfg.abuse_window_s, cfg.abuse_block_s)
        self.gate = Gate(cfg, keys, identity_secret, self.limiter, self.db, self.metrics, moderator, model_id)
        self.created = int(time.time())

    def model_card(self) -> dict:
        """The model as /v1/models lists it (the checkpoint's directory name, never its path)."""
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "serve.py",
                "root": self.cfg.ckpt_name, "max_model_len": self.context}

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

    # -- a chat or text completion: prepare, run, then Generation.collect or .events
    async def prepare(self, request, chat: bool) -> list[Generation]:
        """Check the caller and the body, and moderate the input (400 content_filter): one
        Generation per prompt (a chat has one; a text completion one per prompt it lists)."""
        ident = await self.gate.admit(request)
        body = await self.gate.read_json(request)
        self.gate.check_model(body)
        if chat:
            messages = protocol.parse_messages(body, self.cfg.max_messages, self.cfg.max_message_chars)
            prompts = [Prompt(chat_prompt_ids(self.tok, messages), {"messages": messages},  # a caller writes
                              [m["content"] for m in messages])]  # the assistant turns it sends too
        else:
            prompts = [self.completion_prompt(p) for p in protocol.parse_prompts(
                body, self.cfg.max_message_chars, self.cfg.max_messages, self.tok.vocab_size)]
        stream, include_usage = protocol.parse_stream(body)
        if stream and len(prompts) > 1:
            raise ApiError(400, "streaming is supported for one prompt at a time", "unsupported_parameter", "stream")
        params = [protocol.parse_sampling(body, len(p.ids), self.context, self.cfg.max_tokens_limit, chat)
                  for p in prompts]
        gens: list[Generation] = []
        try:
            for prompt, p in zip(prompts, params):
                gens.append(await self.prepare_one(ident, chat, prompt, p, stream, include_usage))
        except (ApiError, StoreUnavailable) as e:  # a later prompt failed: the earlier ones' rows end too
            for gen in gens:
                self.log_request_later({**gen.record, "completion": None, "finish_reason": "error",
                                        "error": getattr(e, "code", "store_unavailable")}, "error")
            raise
        return gens

    def completion_prompt(self, prompt: str | list[int]) -> Prompt:
        """A completions prompt: a string continues a document, after the document-start
        token (not echoed, so every token of the string is scored); ids are taken as they are."""
        if isinstance(prompt, str):
            return Prompt(completion_prompt_ids(self.tok, prompt), {"prompt": prompt}, [prompt], prompt, echo_skip=1)
        text = self.tok.decode(prompt)
        return Prompt(list(prompt), {"prompt": prompt}, [text], text)

    async def prepare_one(self, ident: str, chat: bool, prompt: Prompt, params: SamplingParams, stream: bool,
                          include_usage: bool) -> Generation:
        out = Completion(chat, self.model_id, include_usage=include_usage)
        record = {"id": out.id, "time": time.time(), "endpoint": "chat" if chat else "completions",
                  "model": self.model_id, "key": ident, **prompt.logged, "params": params.logged()}
        await self.db(self.store.begin_request, out.id, ident, record["endpoint"], self.kept(record))  # a row
        verdict = await self.gate.moderate("\n".join(prompt.user_texts), ident, "input")  # from admission on
        if verdict is not None and verdict["flagged"]:
            await self.log_request({**record, "finish_reason": "content_filter", "stage": "input",
                                    "categories": verdict["categories"], "completion": None})
            raise ApiError(400, "The request was rejected by the content filter (categories: "
                                + ", ".join(verdict["categories"]) + ").", "content_filter",
                           "messages" if chat else "prompt")
        shaper = None if params.logprobs is None else protocol.LogprobShaper(self.piece, chat)
        return Generation(self, ident, out, prompt.ids, params, stream, record,
                          echo_text=prompt.echo_text if params.echo else "", echo_skip=prompt.echo_skip, shaper=shaper)

    def piece(self, token: int) -> bytes:
        """A token's bytes (a special token's are its name)."""
        return self.tok.token_bytes[token] if token < len(self.tok.token_bytes) else self.tok.id_to_piece(token)

    async def run(self, gen: Generation) -> None:
        """Charge prompt + max_tokens to the caller's bucket and queue the request (503 when full)."""
        budget = len(gen.prompt_ids) + gen.params.max_tokens
        await self.gate.charge_tokens(gen.ident, budget)
        gen.req = GenRequest.of(gen.prompt_ids, gen.params, moderate=self.moderator is not None,
                                loop=asyncio.get_running_loop())
        try:
            self.engine.submit(gen.req)
        except EngineFull:
            self.db.later(self.limiter.refund_tokens, gen.ident, budget)
            raise ApiError(503, "The server is overloaded: too many requests are running and waiting. Retry later.",
                           "server_overloaded", headers=retry_after(1)) from None


STORE_UNAVAILABLE = "The serving store is unavailable. Retry later."


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
                other.abort()
            raise
    if not gens[0].stream:
        bodies = [await gen.collect(request) for gen in gens]
        bad = next((b for b in bodies if isinstance(b, Response)), None)
        return bad or (bodies[0] if len(bodies) == 1 else protocol.merge_choices(bodies))
    return StreamingResponse(gens[0].events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def chat_completions(request: Request):
    return await generate(request, chat=True)


async def completions(request: Request):
    return await generate(request, chat=False)


async def moderations(request: Request):
    server = _server(request)
    cfg = server.cfg
    ident = await server.gate.admit(request)
    body = await server.gate.read_json(request)
    texts = protocol.parse_moderation_input(body, cfg.max_messages, cfg.max_message_chars)
    moderator = server.moderator or Moderator(load_blocklist(cfg.blocklist))
    results = []
    for text in texts:
        verdict = await server.gate.check_text(text, moderator)
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
    ident = await server.gate.admit(request)
    body = await server.gate.read_json(request)
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
    await server.gate.admit(request)
    return {"object": "list", "data": [server.model_card()]}


async def get_model(model_id: str, request: Request):
    server = _server(request)
    await server.gate.admit(request)
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
    server.gate.identity(request)
    return {"eos_token": "<|endoftext|>", "bos_token": None, "pad_token": "<|pad|>",
            "model_max_length": server.context, "vocab_size": server.tok.vocab_size,
            "tokenizer_class": "data.text.tokenizer.Tokenizer (byte-level BPE)"}


async def tokenize(request: Request):
    """{"prompt", "add_special_tokens"} -> {"tokens", "count", "max_model_len"}; with special
    tokens, the ids a completions string prompt gets (the document-start token first)."""
    server = _server(request)
    server.gate.identity(request)
    prompt, special = protocol.parse_tokenize(await server.gate.read_json(request), server.cfg.max_message_chars)
    ids = completion_prompt_ids(server.tok, prompt) if special else server.tok.encode(prompt)
    return {"tokens": ids, "count": len(ids), "max_model_len": server.context}


async def detokenize(request: Request):
    server = _server(request)
    server.gate.identity(request)
    tokens = protocol.parse_detokenize(await server.gate.read_json(request), server.tok.vocab_size)
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
