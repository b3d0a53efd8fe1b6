"""Text in and out of the model: prompt ids for a chat or a raw prompt, and TextStream,
which turns one response's token ids into text deltas (incremental UTF-8 that never emits
half a character, stop strings, and the output filter's hold-back)."""
from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

from data.text.chat import encode_prompt
from data.text.tokenizer import Tokenizer

if TYPE_CHECKING:
    from serving.moderation import Moderator


def chat_prompt_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """The chat template (data/text/chat.py) with role tokens placed as ids: content is encoded as
    ordinary text, so a user who types `<|assistant|>` gets those characters, not the token."""
    return encode_prompt(tok, messages)


def completion_prompt_ids(tok: Tokenizer, text: str) -> list[int]:
    """A raw prompt continues a document, as sample.py does without --chat."""
    return [tok.eot_id] + tok.encode(text)


class TextStream:
    """Token ids in, text deltas out, for one response.

    Bytes are decoded incrementally: a character split across tokens is held until its last
    byte arrives (an invalid byte becomes U+FFFD, as in data/text/tokenizer.py). Text that could be
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
