"""Text normalization and line-level cleaning (C4 and FineWeb style).

Normalization (always cheap, on by default): Unicode NFC (or NFKC), one newline
convention, invisible/control characters removed, non-breaking and odd spaces made
plain, trailing spaces stripped, runs of blank lines collapsed.

Line filters follow C4 (Raffel et al. 2020, sec. 2.2) and FineWeb (Penedo et al. 2024):
drop lines of web boilerplate ("javascript must be enabled", cookie/privacy notices,
"lorem ipsum"), and optionally lines that do not end in terminal punctuation or have
too few words. The last two are off by default: C4's rule deletes most verse and every
speaker tag of a play, and the default corpus is Shakespeare.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Characters that end a line in some convention (vertical tab, form feed, file/group/
# record separators, NEL, Unicode line/paragraph separators) become "\n", so words on
# either side stay apart; other C0/C1 controls and invisible format characters go.
_LINE_BREAKS = re.compile(r"\r\n|[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_ODD_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUNS = re.compile(r"\n{3,}")


def normalize(text: str, form: str = "NFC") -> str:
    """Canonical Unicode, plain spaces and newlines, no control characters."""
    if form:
        text = unicodedata.normalize(form, text)
    text = _LINE_BREAKS.sub("\n", text)
    text = _CONTROL.sub("", text)
    text = _ODD_SPACE.sub(" ", text)
    text = _TRAILING.sub("\n", text + "\n")
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip()


# C4's boilerplate phrases (lowercased substring match) plus a few common web ones.
BOILERPLATE_LINE_PHRASES = (
    "javascript", "enable cookies", "cookie policy", "use of cookies", "uses cookies",
    "privacy policy", "terms of use", "terms of service", "all rights reserved",
    "click here", "sign up for our newsletter", "subscribe to our newsletter",
)
_TERMINAL = (".", "!", "?", '"', "'", "\u201d", "\u2019", ":", ";", ")")


@dataclass
class LineFilterConfig:
    drop_boilerplate: bool = True
    require_terminal_punct: bool = False  # C4: off by default (keeps verse and drama)
    min_words_per_line: int = 0  # C4 uses 3; 0 keeps speaker tags like "HAMLET."
    max_line_chars: int = 0  # drop absurdly long lines (0 = keep)


def filter_lines(text: str, cfg: LineFilterConfig) -> tuple[str, int]:
    """Remove unwanted lines; returns (text, number of lines removed). Blank lines stay."""
    kept: list[str] = []
    removed = 0
    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped:
            kept.append(line)
            continue
        lower = stripped.lower()
        if cfg.drop_boilerplate and len(stripped) < 300 and any(p in lower for p in BOILERPLATE_LINE_PHRASES):
            removed += 1
        elif cfg.require_terminal_punct and not stripped.endswith(_TERMINAL):
            removed += 1
        elif cfg.min_words_per_line and len(stripped.split()) < cfg.min_words_per_line:
            removed += 1
        elif cfg.max_line_chars and len(stripped) > cfg.max_line_chars:
            removed += 1
        else:
            kept.append(line)
    if not removed:
        return text, 0
    return _BLANK_RUNS.sub("\n\n", "\n".join(kept)).strip(), removed


def is_lorem_ipsum(text: str) -> bool:
    """C4 drops any page containing placeholder text."""
    return "lorem ipsum" in text.lower()
