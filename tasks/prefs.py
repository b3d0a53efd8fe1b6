"""Preference pairs for reward modelling: (prompt, chosen, rejected) -> two token sequences.

Formats, one JSON object per line:
  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages, "margin"?: float, "kind"?: str}
      a string response is one assistant turn after the prompt;
  {"chosen": conversation, "rejected": conversation}  (Anthropic-HH style)
      two whole conversations, as message lists or as "\\n\\nHuman: ...\\n\\nAssistant: ..." text,
      that share a prefix: the shared turns are the prompt, the rest are the two responses.
Each side is encoded with the chat template, so its last token is the <|end|> of the
final assistant turn: that is where the reward model reads its score.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass

from data.text.chat import RecordError, encode_chat, iter_jsonl, to_messages, truncate

_HH_TURN = re.compile(r"\n\n(Human|Assistant):", re.IGNORECASE)


def parse_hh_text(text: str) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> messages."""
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    if len(parts) < 3:
        raise RecordError("missing_field", "no 'Human:'/'Assistant:' turns")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role.lower() == "human" else "assistant", "content": content.strip()})
    return messages


def _conversation(value) -> list[dict]:
    if isinstance(value, str):
        return parse_hh_text(value)
    return to_messages({"messages": value})


def split_at_divergence(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(shared prompt turns, chosen tail, rejected tail): the prompt is the longest common
    prefix of turns that ends before an assistant turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # the responses start at an assistant turn on both sides: back up to one
    while n > 0 and not (n < len(chosen) and n < len(rejected)
                         and chosen[n]["role"] == rejected[n]["role"] == "assistant"):
        n -= 1
    prompt, c_tail, r_tail = chosen[:n], chosen[n:], rejected[n:]
    if not prompt or c_tail == r_tail:
        raise RecordError("no_divergence", "chosen and rejected share no prompt, or do not differ")
    return prompt, c_tail, r_tail


def pair_messages(rec) -> tuple[list[dict], list[dict], float]:
    """(chosen conversation, rejected conversation, margin) from one record."""
    if not isinstance(rec, dict):
        raise RecordError("invalid_json", "record is not an object")
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise RecordError("missing_field", key)
    margin = rec.get("margin", 0.0)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise RecordError("missing_field", "margin is not a number")
    if "prompt" in rec:
        from data.text.chat import prompt_messages
        prompt = prompt_messages({"prompt": rec["prompt"]})
        sides = []
        for key in ("chosen", "rejected"):
            value = rec[key]
            if isinstance(value, str):
                if not value.strip():
                    raise RecordError("empty_content", key)
                sides.append(prompt + [{"role": "assistant", "content": value}])
            else:
                sides.append(to_messages({"messages": prompt + list(value)}))
        return sides[0], sides[1], float(margin)
    chosen, rejected = _conversation(rec["chosen"]), _conversation(rec["rejected"])
    prompt, c_tail, r_tail = split_at_divergence(chosen, rejected)
    return prompt + c_tail, prompt + r_tail, float(margin)


@dataclass
class Pair:
    chosen: list[int]
    rejected: list[int]
    margin: float
    kind: str
    prompt: list[dict]


def load_pairs(paths: list[str], tok, max_len: int, truncation: str = "truncate"):
    """Encode every record; return (pairs, skipped reasons Counter)."""
    pairs, skipped = [], Counter()
    for rec, (chosen, rejected, margin) in iter_jsonl(paths, pair_messages, skipped):
        sides = [truncate(*encode_chat(tok, conv), max_len, truncation) for conv in (chosen, rejected)]
        if None in sides:
            skipped["too_long"] += 1
            continue
        pairs.append(Pair(sides[0][0], sides[1][0], margin, str(rec.get("kind", "all")), chosen[:-1]))
    return pairs, skipped


def split_pairs(pairs, fraction: float):
    """Held-out pairs chosen by a hash of the prompt, so one prompt is never on both sides."""
    def held_out(p) -> bool:
        key = json.dumps(p.prompt, sort_keys=True).encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2**64 < fraction
    val = [p for p in pairs if held_out(p)]
    return [p for p in pairs if not held_out(p)], val
