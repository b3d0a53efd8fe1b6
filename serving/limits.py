"""Who may ask, and how much: API keys (compared in constant time; logs keep only a hash),
per-key token buckets for requests and tokens per minute, and the abuse tracker that blocks
a key whose requests keep tripping the content filter."""
from __future__ import annotations

import collections
import hashlib
import hmac

from cli import UserError


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
