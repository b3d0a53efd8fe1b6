"""One chat or text completion on its way through the server, after serving/gate.py let it
in and the Server queued it on the engine: it collects the engine's events into one JSON
body (`collect`) or relays them as server-sent events (`stream`), runs the output
classifier on the finished text, and ends its row in the store (`finish`; `abort` when the
client goes away). A response is delivered only once its final row is written: a
non-streamed one gets 503 instead, a stream ends with an error event and [DONE]."""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from fastapi.responses import Response

from serving import protocol
from serving.engine import GenRequest
from serving.protocol import ApiError, Completion
from serving.store import StoreUnavailable
from serving.types import SamplingParams, TokenLogprob

# A stream's last words when its final row cannot be written: the text already sent stands
# unrecorded, so the client is told the request failed
STORE_UNAVAILABLE_IN_STREAM = ApiError(503, "The response could not be recorded: the serving store is unavailable. "
                                            "Retry later.", "store_unavailable")


@dataclass(eq=False)
class Generation:
    """One completion (a text completion of several prompts is one per prompt)."""
    server: object  # the serving.app.Server that made it (its engine, store, limits, metrics)
    ident: str  # the caller's hashed key (or address)
    out: Completion  # id, created, model: what the response carries
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    record: dict  # the request log's record, completed when the request ends
    req: GenRequest | None = None
    echo_text: str = ""  # completions with echo: the prompt's text, which the choice's text starts with
    echo_skip: int = 0  # prompt tokens not echoed: a string prompt's document-start token
    shaper: protocol.LogprobShaper | None = None  # with logprobs

    def logprobs(self, entries: list[TokenLogprob], echo: bool = False) -> dict | None:
        """The choice's (or chunk's) `logprobs`: the entries, after the echoed prompt's."""
        if self.shaper is None:
            return None
        if echo and self.params.echo:
            entries = (self.req.prompt_logprobs or [])[self.echo_skip:] + list(entries)
        return self.shaper.shape(entries)

    async def classify_output(self, info: dict) -> None:
        """The classifier reads the whole response once it is complete (the blocklist ran on
        every step in the engine); a flagged response ends as content_filter."""
        if self.server.moderator is None or self.server.moderator.classifier is None or not info["text"]:
            return
        if info["finish_reason"] not in ("stop", "length"):
            return
        verdict = await asyncio.to_thread(self.server.moderator.check, info["text"])
        if verdict["flagged"]:
            info["finish_reason"], info["flags"] = "content_filter", verdict["categories"]
            info["withheld"] = True  # a non-streamed response is not delivered

    def final_row(self, info: dict | None, error: str | None) -> tuple[dict, str, str]:
        """(record, status, finish reason) of a request that ended (info: the engine's finish
        event) or failed (error; "client disconnected" is an abort)."""
        aborted = error == "client disconnected"
        reason = "abort" if aborted else info["finish_reason"] if info else "error"
        record = {**self.record, "completion": info["text"] if info else None, "finish_reason": reason,
                  "error": error, "usage": protocol.usage(info) if info else None,
                  "timings": info["timings"] if info else None}
        return record, "aborted" if aborted else "complete" if info else "error", reason

    async def finish(self, info: dict | None, error: str | None = None) -> None:
        """Write the request's final row, then refund unused tokens and count output flags.
        When the row cannot be written, raises StoreUnavailable and leaves a retry that
        marks the request as an error: the response must not be delivered."""
        record, status, reason = self.final_row(info, error)
        try:
            await self.server.log_request(record, status)
        except StoreUnavailable as e:
            self.server.log_request_later({**record, "finish_reason": "error", "error": f"store_unavailable: the "
                                           f"final write failed ({e}); the response was not delivered"}, "error")
            self.server.metrics.success.labels(finished_reason="error").inc()
            raise
        self.server.metrics.success.labels(finished_reason=reason).inc()
        if info is not None:  # the row is written: the response stands even if these fail
            with contextlib.suppress(StoreUnavailable):
                await self.server.db(self.server.limiter.refund_tokens, self.ident,
                                     self.params.max_tokens - info["completion_tokens"])
            if info["finish_reason"] == "content_filter":
                for c in info["flags"]:
                    self.server.metrics.safety_flags.labels(category=c, stage="output").inc()
                with contextlib.suppress(StoreUnavailable):
                    await self.server.db(self.server.limiter.record_flag, self.ident, time.time())

    def abort(self) -> None:
        """The client went away: free its row in the batch and end its row in the store.
        Nothing here waits (a cancelled handler cannot): the write goes to the retry thread."""
        self.server.engine.abort(self.req)
        record, status, reason = self.final_row(None, "client disconnected")
        self.server.metrics.success.labels(finished_reason=reason).inc()
        self.server.log_request_later(record, status)

    async def collect(self, request) -> dict | Response:
        """Wait for the whole response (499 when the client disconnects first)."""
        info, checked = None, time.monotonic()
        try:
            while info is None:
                try:
                    kind, payload = await asyncio.wait_for(self.req.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    kind = payload = None
                if time.monotonic() - checked >= 0.5:  # tokens may flow all along: look at the client anyway
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        self.abort()
                        return Response(status_code=499)
                if kind == "error":
                    with contextlib.suppress(StoreUnavailable):
                        await self.finish(None, payload)
                    raise ApiError(500, f"generation failed: {payload}", "engine_error")
                if kind == "finish":
                    info = payload
        except asyncio.CancelledError:  # the server is shutting down: the row says aborted, not incomplete
            self.abort()
            raise
        await self.classify_output(info)
        await self.finish(info)  # StoreUnavailable: 503, the completion is not delivered
        if info.get("withheld"):
            info["text"], info["logprobs"] = "", []
        return self.out.body(self.echo_text + info["text"], protocol.public_reason(info["finish_reason"]),
                            protocol.usage(info), self.logprobs(info.get("logprobs", []), echo=True))

    async def _next_events(self) -> tuple[str, list, tuple | None]:
        """(the text deltas that piled up while we were writing, joined; their tokens'
        logprobs entries; the end event or None)."""
        items = [await self.req.queue.get()]
        while not self.req.queue.empty():
            items.append(self.req.queue.get_nowait())
        text = "".join(p for k, p in items if k == "delta")
        entries = [e for k, p in items if k == "logprobs" for e in p]
        return text, entries, next(((k, p) for k, p in items if k not in ("delta", "logprobs")), None)

    async def _ending(self, kind: str, payload) -> list[str]:
        """The last events of a stream: the finish reason, usage and [DONE]; or an error event
        and [DONE] when generation failed or the final row could not be written."""
        if kind == "error":
            with contextlib.suppress(StoreUnavailable):
                await self.finish(None, payload)
            return [protocol.sse(ApiError(500, f"generation failed: {payload}", "engine_error").body()), protocol.DONE]
        await self.classify_output(payload)
        try:
            await self.finish(payload)
        except StoreUnavailable:
            return [protocol.sse(STORE_UNAVAILABLE_IN_STREAM.body()), protocol.DONE]
        tail = [self.out.chunk(None, protocol.public_reason(payload["finish_reason"]),
                              logprobs=self.logprobs(payload.get("logprobs_tail", [])))]
        if self.out.include_usage:
            tail.append(self.out.usage_chunk(protocol.usage(payload)))
        return tail + [protocol.DONE]

    async def events(self):
        """Server-sent events: the role (chat), text deltas, then _ending's."""
        done = False
        try:
            if self.out.chat:
                yield self.out.chunk(None, None, role=True)
            echoed = not self.params.echo
            while not done:
                text, entries, end = await self._next_events()
                done = end is not None
                if not echoed and not (done and end[0] == "error"):  # the prompt first, once it is scored
                    echoed = True
                    yield self.out.chunk(self.echo_text, None, logprobs=self.logprobs([], echo=True))
                if text and not (done and end[0] == "error"):
                    yield self.out.chunk(text, None, logprobs=self.logprobs(entries))
                if done:
                    for event in await self._ending(*end):
                        yield event
        finally:
            if not done:
                self.abort()
