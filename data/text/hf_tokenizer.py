"""Our tokenizer <-> a Hugging Face `tokenizers` file (tokenizer.json), for convert.py.

Export (`hf_tokenizer_json`, `hf_tokenizer_config`): our byte-level BPE as tokenizer.json
(our split regex, the merges in GPT-2's printable byte alphabet, the six special tokens as
added tokens) and tokenizer_config.json (eos `<|end|>`, pad `<|pad|>`, and a Jinja chat
template that renders data/text/chat.py's format). Hugging Face's tokenizer reads special-token
text in user text as a special token unless `split_special_tokens=True` (transformers) /
`encode_special_tokens = True` (tokenizers); with that flag its ids are ours exactly. The
chat template refuses (raise_exception) a message whose content holds special-token text.

Import (`tokenizer_from_hf`): a byte-level BPE tokenizer.json (GPT-2's ByteLevel
pre-tokenizer, or a Split regex then ByteLevel; no normalizer or NFC) becomes our
Tokenizer, whose id layout is fixed (the 256 bytes, the merges in order, our six special
tokens), plus the Hugging Face id of each of our tokens, so convert.py can reorder the
embedding rows. Anything else (SentencePiece-style byte_fallback / Metaspace, other
normalizers or pre-tokenizers) raises TokenizerError naming what.
"""
from __future__ import annotations

import json

from data.text.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError

# What Hugging Face's ByteLevel pre-tokenizer splits by when use_regex is true (GPT-2's pattern).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


# ----------------------------------------------------------------------------- byte-level alphabet

def _byte_to_char() -> dict[int, str]:
    """GPT-2's map from the 256 bytes to printable characters (the strings of every
    byte-level BPE vocabulary): printable Latin-1 bytes stand for themselves, the others
    (controls, space, ...) take the code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def piece_of(data: bytes) -> str:
    return "".join(BYTE_TO_CHAR[b] for b in data)


def bytes_of(piece: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in piece)
    except KeyError as e:
        raise TokenizerError(f"tokenizer.json: vocabulary entry {piece!r} is not byte-level "
                           f"(character {e.args[0]!r} stands for no byte)") from None


# ----------------------------------------------------------------------------- tokenizer export

def hf_tokenizer_json(tok: Tokenizer) -> dict:
    """Our tokenizer as a Hugging Face `tokenizers` file.

    Ours encodes with tiktoken, which merges the adjacent pair of lowest rank among *all*
    pairs whose concatenation is a token. Hugging Face's BPE only applies listed merges, so
    every split of a token into two tokens is listed at that token's rank (our own merge
    first, so an import reads our merges back exactly), as Hugging Face's own tiktoken
    converter does; `ignore_merges` matches tiktoken's whole-chunk lookup."""
    vocab = {piece_of(b): i for i, b in enumerate(tok.token_bytes)}
    rank = {b: i for i, b in enumerate(tok.token_bytes)}
    merges = []
    for k, (a, b) in enumerate(tok.merges):
        whole = tok.token_bytes[256 + k]
        splits = sorted((rank[whole[:j]], rank[whole[j:]]) for j in range(1, len(whole))
                        if whole[:j] in rank and whole[j:] in rank and (rank[whole[:j]], rank[whole[j:]]) != (a, b))
        for left, right in [(a, b), *splits]:
            merges.append(f"{piece_of(tok.token_bytes[left])} {piece_of(tok.token_bytes[right])}")
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in tok.special_tokens.items()]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


# data/text/chat.py's format: <|endoftext|>, then per turn the role token, the content, <|end|>;
# the generation prompt is <|assistant|>. Roles are written as whole literals (never built
# from the input), and content holding special-token text is refused: rendered into the
# string it would become a control token, where our tokenizer keeps it text.
CHAT_TEMPLATE = (
    "{%- set specials = " + json.dumps(list(SPECIAL_TOKENS)) + " -%}"
    "{{- '<|endoftext|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is not string -%}"
    "{{- raise_exception('message content must be a string') -}}"
    "{%- endif -%}"
    "{%- for token in specials -%}{%- if token in message['content'] -%}"
    "{{- raise_exception('message content contains the special-token text ' ~ token ~ ', which our tokenizer "
    "encodes as text and a chat template cannot: encode it with split_special_tokens=True') -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if message['role'] == 'system' -%}{{- '<|system|>' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '<|user|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|assistant|>' -}}"
    "{%- else -%}{{- raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') -}}"
    "{%- endif -%}"
    "{{- message['content'] -}}{{- '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def hf_tokenizer_config(tok: Tokenizer, max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>", "eos_token": "<|end|>", "pad_token": "<|pad|>", "unk_token": None,
        "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "split_special_tokens": False, "model_max_length": max_len, "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }


# ----------------------------------------------------------------------------- tokenizer import

def _split_pattern(pre) -> str:
    """The split regex of a byte-level pre-tokenizer, or TokenizerError."""
    def describe(p):
        if not isinstance(p, dict):
            return repr(p)
        if p.get("type") == "Sequence":
            return "Sequence(" + ", ".join(describe(q) for q in p.get("pretokenizers", [])) + ")"
        return str(p.get("type"))

    supported = "supported: ByteLevel(use_regex=true), or Sequence(Split(Regex, Isolated), ByteLevel(use_regex=false))"
    if isinstance(pre, dict) and pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise TokenizerError("tokenizer.json: ByteLevel with add_prefix_space=true is not supported")
        if pre.get("use_regex", True):
            return GPT2_SPLIT_PATTERN
    if isinstance(pre, dict) and pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 2:
        split, byte_level = pre["pretokenizers"]
        if (isinstance(split, dict) and split.get("type") == "Split" and isinstance(byte_level, dict)
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)):
            pattern = split.get("pattern") or {}
            if "Regex" not in pattern or split.get("behavior") != "Isolated" or split.get("invert"):
                raise TokenizerError(f"tokenizer.json: Split pre-tokenizer {json.dumps(split)[:200]} is not supported "
                                   "(only a Regex pattern with behavior Isolated)")
            if byte_level.get("add_prefix_space"):
                raise TokenizerError("tokenizer.json: ByteLevel with add_prefix_space=true is not supported")
            return pattern["Regex"]
    raise TokenizerError(f"tokenizer.json: pre-tokenizer {describe(pre)} is not supported ({supported})")


def tokenizer_from_hf(spec: dict) -> tuple[Tokenizer, list[int | None], list[str]]:
    """Our tokenizer from a Hugging Face byte-level BPE tokenizer.json (parsed).

    Returns (tokenizer, hf_ids, notes): hf_ids[i] is the Hugging Face id of our token i
    (None when it has none), notes say what differs. Our layout is the 256 bytes, then
    one token per merge in the file's order (the first merge that makes a token; later
    ones making the same bytes are the tiktoken-style extra splits), then our specials."""
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise TokenizerError(f"tokenizer.json: model type {kind!r} is not supported (only byte-level BPE)")
    for key in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise TokenizerError(f"tokenizer.json: BPE with {key}={model[key]!r} is not supported "
                               "(SentencePiece-style tokenizers are not byte-level)")
    notes = []
    normalizer = spec.get("normalizer")
    if normalizer is not None:
        if isinstance(normalizer, dict) and normalizer.get("type") == "NFC":
            notes.append("the Hugging Face tokenizer NFC-normalizes text first; ours encodes text as given "
                         "(data.prepare normalizes to NFC; do the same for other text)")
        else:
            kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
            raise TokenizerError(f"tokenizer.json: normalizer {kind!r} is not supported (only none or NFC)")
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise TokenizerError("tokenizer.json: the BPE model has no vocab/merges")

    rank: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    hf_ids: list[int | None] = [vocab.get(BYTE_TO_CHAR[b]) for b in range(256)]
    ours: list[tuple[int, int]] = []
    for m in merges:
        parts = m.split(" ") if isinstance(m, str) else m
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise TokenizerError(f"tokenizer.json: merge {m!r} is not a pair")
        left, right = bytes_of(parts[0]), bytes_of(parts[1])
        whole = left + right
        if whole in rank or left not in rank or right not in rank:
            continue
        rank[whole] = 256 + len(ours)
        ours.append((rank[left], rank[right]))
        hf_ids.append(vocab.get(parts[0] + parts[1]))
    added = {t.get("content"): t.get("id") for t in spec.get("added_tokens") or [] if isinstance(t, dict)}
    hf_ids += [added.get(s, vocab.get(s)) for s in SPECIAL_TOKENS]
    try:
        tok = Tokenizer(ours, pattern)
    except (TokenizerError, ValueError) as e:  # tiktoken cannot compile the split regex
        raise TokenizerError(f"tokenizer.json: cannot build the tokenizer: {e}") from None

    missing_bytes = sum(i is None for i in hf_ids[:256])
    if missing_bytes:
        notes.append(f"{missing_bytes} of the 256 bytes have no token in the Hugging Face vocabulary: "
                     "their embeddings start as the mean")
    reached = set(hf_ids)
    unreached = [p for p, i in vocab.items() if i not in reached and p not in added]
    if unreached:
        notes.append(f"{len(unreached)} Hugging Face vocabulary entries no merge produces are left out "
                     f"(e.g. {unreached[:3]})")
    dropped = [s for s in added if s not in SPECIAL_TOKENS]
    if dropped:
        notes.append(f"{len(dropped)} Hugging Face added tokens are left out (ours are {', '.join(SPECIAL_TOKENS)}): "
                     f"{', '.join(map(str, dropped[:6]))}{' ...' if len(dropped) > 6 else ''}")
    new = [s for s, i in zip(SPECIAL_TOKENS, hf_ids[-len(SPECIAL_TOKENS):]) if i is None]
    if new:
        notes.append(f"new special tokens (embeddings start as the mean; fine-tuning teaches them): {', '.join(new)}")
    return tok, hf_ids, notes

