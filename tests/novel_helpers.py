"""The held-out parts of the new request kind (tasks/novel.py), as the leak checks of
test_novel and test_simulate_users look for them."""
from __future__ import annotations

import re

from tasks import novel


def _pattern(template: str) -> re.Pattern:
    """A template as a pattern over prompts (lower-cased, final punctuation optional, as
    tasks.redteam.dress may type it)."""
    text = re.escape(template.lower().rstrip(".?!"))
    return re.compile(re.sub(r"\\\{\w+\\\}", ".+?", text))


def held_out_parts() -> list:
    """Every held-out part: words and names as lower-case strings, templates as patterns."""
    p = novel.pools()
    parts = [x.lower() for key in ("person", "item", "work", "phrase") for x in p[key][1]]
    parts += [f"'{w}'" for w in p["word"][1]]
    parts += [_pattern(t) for key in ("privacy_template", "copyright_template") for t in p[key][1]]
    parts += [_pattern(t) for pair in p["lookalike_template"].values() for t in pair[1]]
    return parts


def found(part, text: str) -> bool:
    return part in text if isinstance(part, str) else part.search(text) is not None
