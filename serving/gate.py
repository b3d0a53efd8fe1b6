"""Who may ask and what they may send: the caller's identity (an API key's HMAC, or the
address of an open server), the request and token buckets and the abuse block
(limits.Limiter, through the store), the body's size, the model name, and the content
filter on what comes in. Every refusal is an ApiError the routes turn into OpenAI's error
body; nothing here runs the model."""
from __future__ import annotations

import asyncio
import time

from serving import protocol
from serving.config import ServeConfig
from serving.limits import KeyStore, Limiter, key_id
from serving.metrics import Metrics
from serving.moderation import Moderator
from serving.protocol import ApiError, retry_after
from serving.store import OffLoop


class Gate:
    """The checks every route runs before it does anything (one per Server)."""

    def __init__(self, cfg: ServeConfig, keys: KeyStore | None, identity_secret: bytes, limiter: Limiter,
                 db: OffLoop, metrics: Metrics, moderator: Moderator | None, model_id: str):
        self.cfg, self.keys, self.identity_secret = cfg, keys, identity_secret
        self.limiter, self.db, self.metrics, self.moderator, self.model_id = limiter, db, metrics, moderator, model_id

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
