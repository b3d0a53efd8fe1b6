"""OpenAI's API shapes, so the official `openai` client works unchanged: the error body
(ApiError), validation of hostile request bodies (a clean 400, never a 500), completion
ids, and the bodies and server-sent-event chunks of responses."""
from __future__ import annotations

import codecs
import json
import math
import re
import secrets
import time
from dataclasses import dataclass

from serving.types import SamplingParams, TokenLogprob

CHAT_ID, COMPLETION_ID = "chatcmpl-", "cmpl-"
ID_PATTERN = re.compile(r"^(chatcmpl|cmpl)-[0-9a-f]{32}$")
DONE = "data: [DONE]\n\n"


class ApiError(Exception):
    """An OpenAI-shaped error response: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error", 500: "server_error"}

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def retry_after(seconds: float) -> dict:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model[:200]}` does not exist.", "model_not_found", "model")


# ----------------------------------------------------------------------------- request bodies

def parse_json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "We could not parse the JSON body of your request.", "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.", "invalid_json")
    where = lone_surrogate(body)
    if where is not None:  # JSON may escape one (\ud800), but it is no character: nothing could store it as text
        raise ApiError(400, f"{where} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not "
                            "valid Unicode text", "invalid_unicode", where)
    return body


def lone_surrogate(obj, where: str = "body") -> str | None:
    """Where in a parsed JSON value a string (or key) holds an unpaired surrogate, or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return where
    elif isinstance(obj, dict):
        for k, v in obj.items():
            found = lone_surrogate(k, where) or lone_surrogate(v, f"{where}.{k}" if where != "body" else k)
            if found:
                return found
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found = lone_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}", "invalid_type", name)
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ApiError(400, f"'{name}' must be between {lo} and {hi}, got {value}", "invalid_value", name)
    return value


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and 0 < len(s) <= 64
                                                                for s in stops):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings (<= 64 chars)",
                       "invalid_value", "stop")
    return tuple(stops)


def _content_text(content, i: int, limit: int) -> str:
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "invalid_value",
                               f"messages[{i}].content")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", "invalid_type", f"messages[{i}].content")
    if len(content) > limit:
        raise ApiError(400, f"messages[{i}].content is {len(content)} characters; the limit is {limit}",
                       "message_too_long", f"messages[{i}].content")
    return content


def parse_messages(body: dict, max_messages: int, max_chars: int) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_value", "messages")
    if len(messages) > max_messages:
        raise ApiError(400, f"{len(messages)} messages; the limit is {max_messages}", "too_many_messages", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", "invalid_type", f"messages[{i}]")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}].role must be system, user or assistant", "invalid_value",
                           f"messages[{i}].role")
        out.append({"role": role, "content": _content_text(m.get("content"), i, max_chars)})
    return out


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def parse_prompts(body: dict, max_chars: int, max_prompts: int, vocab_size: int) -> list[str | list[int]]:
    """/v1/completions' prompt: a string, a list of token ids, or a list of up to
    `max_prompts` of either (one choice each, in order)."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) or _is_ids(prompt) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) or _is_ids(p) for p in prompts):
        raise ApiError(400, "'prompt' must be a string, a list of token ids, or a list of either",
                       "invalid_type", "prompt")
    if len(prompts) > max_prompts:
        raise ApiError(400, f"{len(prompts)} prompts; the limit is {max_prompts}", "too_many_prompts", "prompt")
    for p in prompts:
        if isinstance(p, str) and len(p) > max_chars:
            raise ApiError(400, f"prompt is {len(p)} characters; the limit is {max_chars}",
                           "message_too_long", "prompt")
        if isinstance(p, list) and not all(0 <= t < vocab_size for t in p):
            raise ApiError(400, f"token ids must be in [0, {vocab_size})", "invalid_value", "prompt")
    return prompts


def parse_tokenize(body: dict, max_chars: int) -> tuple[str, bool]:
    """vLLM's POST /tokenize body (lm-eval's remote tokenizer): (prompt, add_special_tokens)."""
    prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
    if not isinstance(prompt, str) or len(prompt) > max_chars or not isinstance(special, bool):
        raise ApiError(400, f"'prompt' must be a string of at most {max_chars} characters and "
                            "'add_special_tokens' a boolean", "invalid_value", "prompt")
    return prompt, special


def parse_detokenize(body: dict, vocab_size: int) -> list[int]:
    """vLLM's POST /detokenize body: {"tokens": [ids]}."""
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab_size for t in tokens):
        raise ApiError(400, f"'tokens' must be a list of token ids in [0, {vocab_size})", "invalid_value", "tokens")
    return tokens


def parse_logprobs(body: dict, chat: bool) -> tuple[int | None, bool]:
    """(log-prob alternatives per token, or None for no log-probs; echo). Chat: `logprobs`
    true and `top_logprobs` 0..20; completions: `logprobs` 0..20 and `echo`."""
    if body.get("best_of", 1) not in (1, None):
        raise ApiError(400, "best_of is not supported (only 1)", "unsupported_parameter", "best_of")
    if chat:
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise ApiError(400, "'logprobs' must be a boolean", "invalid_type", "logprobs")
        top = _number(body, "top_logprobs", None, 0, 20, integer=True)
        if top is not None and not wanted:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "invalid_value", "top_logprobs")
        return ((top or 0) if wanted else None), False
    echo = body.get("echo", False)
    if not isinstance(echo, (bool, type(None))):
        raise ApiError(400, "'echo' must be a boolean", "invalid_type", "echo")
    if body.get("logprobs") is False:  # what some clients send for "none"
        return None, bool(echo)
    return _number(body, "logprobs", None, 0, 20, integer=True), bool(echo)


def _max_tokens(body: dict, prompt_len: int, context: int, max_tokens_limit: int, least: int = 1) -> int:
    if prompt_len >= context:
        raise ApiError(400, f"This model's maximum context length is {context} tokens; your prompt is "
                            f"{prompt_len} tokens.", "context_length_exceeded", "messages")
    limit = min(max_tokens_limit or context, context)
    # max_completion_tokens (OpenAI's newer name) wins over max_tokens, unless it is null
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, least, limit, integer=True)
    room = context - prompt_len
    if max_tokens is None:
        return min(room, limit)
    if max_tokens > room:
        raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you "
                            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                            f"for the completion).", "context_length_exceeded", "max_tokens")
    return max_tokens


def parse_sampling(body: dict, prompt_len: int, context: int, max_tokens_limit: int,
                   chat: bool = True) -> SamplingParams:
    """max_tokens (within the context; 0 with echo: the prompt alone, scored with logprobs), temperature,
    top_p, top_k, seed, stop, ignore_eos, logprobs, echo."""
    if "n" in body and (type(body["n"]) is not int or body["n"] != 1):  # not true, not 1.0
        raise ApiError(400, "only n=1 is supported", "invalid_value", "n")
    logprobs, echo = parse_logprobs(body, chat)
    least = 0 if echo else 1
    max_tokens = _max_tokens(body, prompt_len, context, max_tokens_limit, least)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "'ignore_eos' must be a boolean", "invalid_type", "ignore_eos")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0:
        raise ApiError(400, "'top_p' must be greater than 0", "invalid_value", "top_p")
    return SamplingParams(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, 0.0, 2.0)),
                          top_p=top_p if top_p < 1 else None,
                          top_k=_number(body, "top_k", None, 0, 1 << 30, integer=True) or None,
                          seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
                          stop=_stop_strings(body), ignore_eos=ignore_eos, logprobs=logprobs, echo=echo)


def parse_stream(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", False)
    options = body.get("stream_options")
    options = {} if options is None else options  # an empty list is not an object
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError(400, "'stream' must be a boolean and 'stream_options' an object", "invalid_type", "stream")
    return stream, bool(options.get("include_usage", False))


def parse_moderation_input(body: dict, max_items: int, max_chars: int) -> list[str]:
    items = body.get("input")
    items = [items] if isinstance(items, str) else items
    if not isinstance(items, list) or not items or len(items) > max_items:
        raise ApiError(400, f"'input' must be a string or a list of 1..{max_items} strings",
                       "invalid_value", "input")
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("type") == "text":
            item = item.get("text")
        if not isinstance(item, str) or len(item) > max_chars:
            raise ApiError(400, f"input[{i}] must be text of at most {max_chars} characters",
                           "invalid_value", "input")
        texts.append(item)
    return texts


def parse_feedback(body: dict) -> tuple[list[str], dict, str]:
    """(completion ids to look up, the feedback log's entry, the metric's rating label):
    {"id", "rating": "up"|"down"} or a pairwise vote {"ids": [a, b], "preferred": a|b|"tie"}
    (a tie is recorded with preferred None); an optional "comment" goes into the entry."""
    comment = body.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > 4000):
        raise ApiError(400, "'comment' must be a string of at most 4000 characters", "invalid_value", "comment")
    extra = {"comment": comment} if comment else {}
    if "ids" in body:  # a pairwise vote: two completions of one prompt, and the better one
        ids, preferred = body.get("ids"), body.get("preferred")
        if (not isinstance(ids, list) or len(ids) != 2 or not all(isinstance(i, str) and ID_PATTERN.match(i)
                                                                 for i in ids) or ids[0] == ids[1]):
            raise ApiError(400, "'ids' must be two different completion ids", "invalid_value", "ids")
        if preferred not in ids and preferred != "tie":
            raise ApiError(400, "'preferred' must be one of 'ids', or \"tie\"", "invalid_value", "preferred")
        if preferred == "tie":
            return ids, {"type": "pairwise", "ids": ids, "preferred": None, **extra}, "tie"
        return ids, {"type": "pairwise", "ids": ids, "preferred": preferred, **extra}, "pairwise"
    cid, rating = body.get("id"), body.get("rating")
    if not isinstance(cid, str) or not ID_PATTERN.match(cid):
        raise ApiError(400, "'id' must be a completion id (chatcmpl-... or cmpl-...)", "invalid_value", "id")
    if rating not in ("up", "down"):
        raise ApiError(400, "'rating' must be \"up\" or \"down\"", "invalid_value", "rating")
    return [cid], {"type": "rating", "id": cid, "rating": rating, **extra}, rating


# ----------------------------------------------------------------------------- responses

def new_completion_id(chat: bool) -> str:
    return (CHAT_ID if chat else COMPLETION_ID) + secrets.token_hex(16)


def usage(info: dict) -> dict:
    return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
            "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}


def public_reason(reason: str) -> str:
    """The engine's finish reason as a client sees it: an aborted request just stopped."""
    return "stop" if reason == "abort" else reason


def sse(obj: dict, ensure_ascii: bool = True) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=ensure_ascii)}\n\n"


@dataclass
class Completion:
    """What every body and chunk of one completion carries: id, created, model, and whether
    it is a chat completion (or a text completion)."""
    chat: bool
    model: str
    id: str = ""
    created: int = 0
    include_usage: bool = False

    def __post_init__(self):
        self.id = self.id or new_completion_id(self.chat)
        self.created = self.created or int(time.time())

    def body(self, text: str, reason: str, usage: dict, logprobs: dict | None = None) -> dict:
        """The whole (non-streamed) response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": usage,
                "system_fingerprint": None}

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def chunk(self, delta: str | None, reason: str | None, role: bool = False, logprobs: dict | None = None) -> str:
        """One stream event: a text delta (with its tokens' logprobs), the finish reason, or
        (chat) the opening role."""
        if self.chat:
            d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": logprobs, "finish_reason": reason}
        payload = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                   "choices": [choice]}
        if self.include_usage:
            payload["usage"] = None
        return sse(payload, ensure_ascii=False)

    def usage_chunk(self, usage: dict) -> str:
        """stream_options.include_usage: the last event before [DONE], with no choices."""
        return sse({"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                    "choices": [], "usage": usage})


def merge_choices(bodies: list[dict]) -> dict:
    """One text completion of several prompts: choice i answers prompt i; usage adds up."""
    merged = dict(bodies[0])
    merged["choices"] = [dict(b["choices"][0], index=i) for i, b in enumerate(bodies)]
    merged["usage"] = {k: sum(b["usage"][k] for b in bodies) for k in bodies[0]["usage"]}
    return merged


class LogprobShaper:
    """OpenAI's `logprobs` objects from the engine's entries (token id, logprob, [(id,
    logprob)] likeliest first; logprob None for a prompt's first token): chat's {"content":
    [{"token", "logprob", "bytes", "top_logprobs"}]} or completions' {"tokens",
    "token_logprobs", "top_logprobs" ({token: logprob}, the token itself included),
    "text_offset"}, whose offsets count characters of the choice's text across a stream's
    chunks. A token that is not valid UTF-8 on its own is written "bytes:\\xNN..." (its
    `bytes` are exact)."""

    def __init__(self, piece, chat: bool):
        self.piece, self.chat = piece, chat  # piece(id) -> the token's bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.offset = 0

    def token(self, t: int) -> str:
        data = self.piece(t)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{c:02x}" for c in data)

    def shape(self, entries: list[TokenLogprob]) -> dict:
        if self.chat:
            return {"content": [{"token": self.token(t), "logprob": lp, "bytes": list(self.piece(t)),
                                 "top_logprobs": [{"token": self.token(i), "logprob": v, "bytes": list(self.piece(i))}
                                                  for i, v in top]} for t, lp, top in entries], "refusal": None}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in entries:
            out["tokens"].append(self.token(t))
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if lp is None else
                                       {**{self.token(i): v for i, v in top}, self.token(t): lp})
            out["text_offset"].append(self.offset)
            self.offset += len(self.decoder.decode(self.piece(t)))
        return out


def moderation_result(verdict: dict, categories: tuple[str, ...]) -> dict:
    """One /v1/moderations result from a Moderator.check verdict, every category listed."""
    flagged = verdict["categories"]
    return {"flagged": verdict["flagged"],
            "categories": {c: c in flagged for c in categories},
            "category_scores": {c: float(verdict["scores"].get(c, 0.0)) for c in categories},
            "category_applied_input_types": {c: ["text"] if c in flagged else [] for c in categories}}


def moderation_response(results: list[dict], model: str) -> dict:
    return {"id": "modr-" + secrets.token_hex(16), "model": model, "results": results}
