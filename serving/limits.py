"""Who may ask, and how much: API keys (compared in constant time; logs keep only an HMAC),
per-key token buckets for requests and tokens per minute, and the abuse tracker that blocks
a key whose requests keep tripping the content filter."""
from __future__ import annotations

import hashlib
import hmac

from cli import UserError


def key_id(text: str, secret: bytes) -> str:
    """What the store keeps instead of a key or an address: a short HMAC-SHA256 under the
    deployment's secret. A bare hash of an address is reversed by hashing the few billion
    candidates; without the secret, this one is not."""
    return "hmac:" + hmac.new(secret, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]


def load_identity_secret(path: str) -> bytes:
    """--identity-secret-file: at least 16 bytes (leading and trailing whitespace dropped)."""
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise UserError(f"cannot read --identity-secret-file {path}: {e.strerror}") from None
    if len(secret) < 16:
        raise UserError(f"--identity-secret-file {path} must hold at least 16 bytes (e.g. openssl rand -hex 32)")
    return secret


class KeyStore:
    """Bearer keys from a file (one per line; a line starting with '#' is a comment, and a
    '#' inside a key is part of it). Every key is compared with
    hmac.compare_digest and the loop never stops early, so timing tells nothing."""

    def __init__(self, keys: list[str]):
        self.keys = [k.encode() for k in keys]

    @classmethod
    def load(cls, path: str) -> "KeyStore":
        try:
            with open(path, encoding="utf-8") as f:
                keys = [line.strip() for line in f if not line.lstrip().startswith("#")]
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


class Limiter:
    """Per-identity token buckets (requests/minute and tokens/minute) and the abuse tracker:
    an identity flagged `max_flags` times within `window` seconds is blocked for `block_s`.
    The buckets, flags and blocks live in the serving store, so every replica that shares
    it enforces the same limits; times are wall-clock seconds (time.time()), which the
    replicas' clocks share."""

    def __init__(self, store, rpm: float, tpm: float, max_flags: int, window: float, block_s: float):
        self.store = store
        self.rpm, self.tpm = rpm, tpm
        self.max_flags, self.window, self.block_s = max_flags, window, block_s

    def blocked_for(self, ident: str, now: float) -> float:
        return self.store.blocked_for(ident, now) if self.max_flags else 0.0

    def take_request(self, ident: str, now: float) -> float:
        return self.store.take(f"requests:{ident}", 1, self.rpm, self.rpm / 60.0, now) if self.rpm else 0.0

    def take_tokens(self, ident: str, amount: int, now: float) -> float:
        return self.store.take(f"tokens:{ident}", amount, self.tpm, self.tpm / 60.0, now) if self.tpm else 0.0

    def refund_tokens(self, ident: str, amount: int) -> None:
        if self.tpm and amount > 0:
            self.store.give_back(f"tokens:{ident}", amount, self.tpm)

    def record_flag(self, ident: str, now: float) -> bool:
        """Count a flagged request; True when this one blocks the identity."""
        if not self.max_flags:
            return False
        return self.store.add_flag(ident, now, self.window, self.max_flags, self.block_s)
