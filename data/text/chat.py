"""Chat format: conversations <-> token ids plus a loss mask, and the JSONL adapters.

A conversation is a list of {"role": "system"|"user"|"assistant", "content": str}.
Its tokens are <|endoftext|> (the document start the base model knows), then for each
turn the role token, the content, and <|end|>:

    <|endoftext|><|user|>What is 2+3?<|end|><|assistant|>5<|end|>
    mask:   0        0    0 ...       0       0          1   1

The mask is 1 exactly on assistant content and the <|end|> that closes it: the model
learns to answer and to stop, never to imitate the user (InstructGPT, Ouyang et al. 2022).
To generate, encode the prompt with add_generation_prompt=True (it ends in
<|assistant|>) and stop at <|end|>.

Adapters: Alpaca (instruction, input, output), prompt/completion, messages, and
ShareGPT conversations (from/value). A bad record raises RecordError with a reason.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from cli import UserError

ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "bot": "assistant", "model": "assistant"}


class RecordError(UserError, ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _text(rec: dict, key: str, required: bool = True) -> str:
    value = rec.get(key)
    if value is None:
        if required:
            raise RecordError("missing_field", key)
        return ""
    if not isinstance(value, str):
        raise RecordError("missing_field", f"{key} is not a string")
    return value


def _check(messages: list[dict]) -> list[dict]:
    if not messages:
        raise RecordError("missing_field", "no messages")
    for m in messages:
        if m["role"] not in ROLES:
            raise RecordError("unknown_role", str(m["role"]))
        if not m["content"].strip():
            raise RecordError("empty_content", m["role"])
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("no_assistant_turn")
    return messages


def to_messages(rec) -> list[dict]:
    """Any supported record format -> a checked list of messages."""
    if not isinstance(rec, dict):
        raise RecordError("invalid_json", "record is not an object")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise RecordError("missing_field", "messages is not a list of objects")
        return _check([{"role": m.get("role"), "content": _text(m, "content")} for m in msgs])
    if "conversations" in rec:
        turns = rec["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise RecordError("missing_field", "conversations is not a list of objects")
        out = []
        for t in turns:
            role = _SHAREGPT_ROLES.get(str(t.get("from", "")).lower())
            if role is None:
                raise RecordError("unknown_role", str(t.get("from")))
            out.append({"role": role, "content": _text(t, "value")})
        return _check(out)
    if "instruction" in rec or "output" in rec:
        instruction, extra = _text(rec, "instruction"), _text(rec, "input", required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _check([{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec, "output")}])
    if "prompt" in rec or "completion" in rec:
        if "prompt" not in rec:
            raise RecordError("missing_field", "prompt")
        return _check(_prompt_only(rec["prompt"]) + [{"role": "assistant", "content": _text(rec, "completion")}])
    raise RecordError("missing_field", "no messages, conversations, instruction/output or prompt/completion")


def _prompt_only(rec_prompt) -> list[dict]:
    if isinstance(rec_prompt, str):
        if not rec_prompt.strip():
            raise RecordError("empty_content", "prompt")
        return [{"role": "user", "content": rec_prompt}]
    if isinstance(rec_prompt, list) and all(isinstance(m, dict) for m in rec_prompt) and rec_prompt:
        msgs = [{"role": m.get("role"), "content": _text(m, "content")} for m in rec_prompt]
        for m in msgs:
            if m["role"] not in ROLES:
                raise RecordError("unknown_role", str(m["role"]))
            if not m["content"].strip():
                raise RecordError("empty_content", m["role"])
        return msgs
    raise RecordError("missing_field", "prompt must be a string or a list of messages")


def prompt_messages(rec: dict) -> list[dict]:
    """The conversation to answer, from a prompt record ({"prompt": ...} or {"messages": ...}),
    without any final assistant turn."""
    if not isinstance(rec, dict):
        raise RecordError("invalid_json", "record is not an object")
    if "prompt" in rec:
        return _prompt_only(rec["prompt"])
    if "messages" in rec:
        msgs = _prompt_only(rec["messages"])
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise RecordError("missing_field", "no prompt turns")
        return msgs
    raise RecordError("missing_field", "no prompt or messages")


def encode_chat(tok, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on assistant content and its <|end|>)."""
    role_ids = {"system": tok.system_id, "user": tok.user_id, "assistant": tok.assistant_id}
    ids, mask = [tok.eot_id], [0]
    for m in messages:
        content = tok.encode(m["content"])
        learn = 1 if m["role"] == "assistant" else 0
        ids += [role_ids[m["role"]]] + content + [tok.end_id]
        mask += [0] + [learn] * len(content) + [learn]
    if add_generation_prompt:
        ids.append(tok.assistant_id)
        mask.append(0)
    return ids, mask


def encode_prompt(tok, messages: list[dict]) -> list[int]:
    return encode_chat(tok, messages, add_generation_prompt=True)[0]


def truncate(ids: list[int], mask: list[int], max_len: int, mode: str = "truncate"):
    """Fit a sequence into max_len tokens. "truncate" cuts from the prompt side (the start,
    keeping the leading <|endoftext|>); "drop" refuses. None if nothing learnable is left."""
    if len(ids) <= max_len:
        return ids, mask
    if mode == "drop":
        return None
    cut = len(ids) - max_len
    ids, mask = ids[:1] + ids[1 + cut:], mask[:1] + mask[1 + cut:]
    if not any(mask):
        return None
    return ids, mask


@dataclass
class ChatExample:
    ids: list[int]
    mask: list[int]
    meta: dict


def iter_jsonl(paths: list[str], parse, skipped: Counter):
    """(record, parse(record)) for every good line of JSONL files; a bad line is counted in
    `skipped` by reason (invalid_utf8, invalid_json, or the RecordError's) and passed over.
    Missing files raise FileNotFoundError."""
    for path in paths:
        with open(path, "rb") as f:
            for raw in f:
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw.decode("utf-8-sig"))  # -sig: a leading BOM is not an error
                    parsed = parse(rec)
                except RecordError as e:
                    skipped[e.reason] += 1
                except UnicodeDecodeError:
                    skipped["invalid_utf8"] += 1
                except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
                    skipped["invalid_json"] += 1
                else:
                    yield rec, parsed


def load_chat_jsonl(paths: list[str], tok, max_len: int, truncation: str = "truncate"):
    """Read every record; return (examples, skipped reasons Counter, number truncated)."""
    examples, skipped, truncated = [], Counter(), 0
    for rec, messages in iter_jsonl(paths, to_messages, skipped):
        ids, mask = encode_chat(tok, messages)
        fitted = truncate(ids, mask, max_len, truncation)
        if fitted is None:
            skipped["too_long"] += 1
            continue
        truncated += len(fitted[0]) < len(ids)
        meta = {k: rec[k] for k in ("family", "answer", "id", "answer_type") if k in rec}
        examples.append(ChatExample(fitted[0], fitted[1], meta))
    return examples, skipped, truncated


class Side:
    """One answer in context: token ids and the mask of the final answer's tokens (what
    data.loader.collate reads; DPO's pairs and evals.sampled_kl's answers)."""

    def __init__(self, ids: list[int], mask: list[int]):
        self.ids, self.mask = ids, mask


def answer_only(ids: list[int], assistant_id: int) -> list[int]:
    """The loss mask of the last assistant turn: the tokens after its role token."""
    start = len(ids) - 1 - ids[::-1].index(assistant_id)
    return [0] * (start + 1) + [1] * (len(ids) - start - 1)
