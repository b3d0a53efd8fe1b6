"""Toxicity filter by blocklist: the simplest method that works at web scale.

C4 (Raffel et al. 2020) drops every page containing a word of a "bad words" list; that
also drops medical and literary text, so here a document is removed only when listed
words are more than a small fraction of its words (one mention in a long text stays).
The list is data/blocklist.txt, our own; `--blocklist FILE` swaps it.
"""
from __future__ import annotations

import os
import re

DEFAULT_BLOCKLIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "blocklist.txt")


def load_blocklist(path: str = DEFAULT_BLOCKLIST) -> list[str]:
    with open(path, encoding="utf-8") as f:
        terms = [line.split("#", 1)[0].strip().lower() for line in f]
    return [t for t in terms if t]


class ToxicityFilter:
    def __init__(self, terms: list[str], max_word_frac: float = 0.002):
        self.max_word_frac = max_word_frac
        # Longest first so a phrase wins over its first word; whitespace inside a phrase
        # may be any run of spaces.
        alternatives = sorted({r"\s+".join(map(re.escape, t.split())) for t in terms}, key=len, reverse=True)
        self.pattern = re.compile(r"\b(?:" + "|".join(alternatives) + r")\b", re.IGNORECASE) if alternatives else None

    def hits(self, text: str) -> int:
        return len(self.pattern.findall(text)) if self.pattern else 0

    def is_toxic(self, text: str) -> bool:
        n = self.hits(text)
        return n > 0 and n / max(1, len(text.split())) > self.max_word_frac
