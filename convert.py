"""Hugging Face interop: our checkpoints <-> Hugging Face model directories.

    python convert.py to-hf --ckpt runs/ppo --out hf/ppo        # then transformers, or `vllm serve hf/ppo`
    python convert.py from-hf --hf ~/models/SmolLM --out runs/smol  # then `python train_sft.py --init runs/smol`

**Export** (`to-hf`). A Llama-style checkpoint (RMSNorm, RoPE, SwiGLU, any GQA) becomes
`LlamaForCausalLM` (`Qwen2ForCausalLM` when it has biases on q/k/v only); a GPT-2-style one
(LayerNorm, learned positions, tanh-GELU MLP) becomes `GPT2LMHeadModel`. The weights map one
to one, with no permutation: our rotary embedding rotates the pair (x[i], x[i + D/2]),
which is Hugging Face's rotate-half layout (not Meta's interleaved one). GPT-2 stores its
linear layers as Conv1D, (in, out), so they are transposed, and q/k/v are fused into
`c_attn`. A reward model or critic (a checkpoint with `score_head.*`) becomes
`*ForSequenceClassification` with `num_labels=1`: `score.weight` is our head's weight; HF's
head has no bias, so ours is stored in config.json as `score_bias`, next to the reward
model's `score_norm`:

    raw score  = logits[:, 0] + config.score_bias            (read at the last non-pad token, our <|end|>)
    our score  = (raw - score_norm.mean) / score_norm.std     (what train_rm.RewardScorer.score returns)

The tokenizer is written as `tokenizer.json` (byte-level BPE with our split regex and the
six special tokens as added tokens) and `tokenizer_config.json` (eos `<|end|>`, pad
`<|pad|>`, and a Jinja chat template that renders data/chat.py's format). Our tokenizer
never reads special-token text in user text as a special token; Hugging Face's does unless
`split_special_tokens=True` (transformers) / `encode_special_tokens = True` (tokenizers),
and with that flag the ids are ours exactly. The chat template refuses (raise_exception)
a message whose content holds special-token text, rather than letting it inject a turn.

**Import** (`from-hf`). A local directory (nothing is downloaded) of `LlamaForCausalLM`,
`MistralForCausalLM` (a sliding window caps the context at the window, where the two
attentions are identical), `Qwen2ForCausalLM` (q/k/v biases) or `GPT2LMHeadModel`, with
safetensors weights (never pickles) and a byte-level BPE `tokenizer.json`, becomes our
checkpoint directory (DESIGN.md). Our tokenizer's id layout is fixed (the 256 bytes, the
merges in order, then our six special tokens), so the embedding and lm-head rows are
reordered into it by token; a special token of ours that the model lacks starts as the
mean embedding, and Hugging Face tokens ours cannot produce (other added tokens, padding
rows) are left out. Anything else is refused with one `error:` line naming what: other
architectures, RoPE scaling (Llama 3.1's `llama3`, linear, YaRN, ...), a head_dim other than
hidden_size / heads, activations other than SiLU (Llama family) or GPT-2's tanh GELU, Llama
biases on attention but not the MLP (or the reverse), SentencePiece-style tokenizers
(byte_fallback / Metaspace: Llama 2, Mistral v0.1), normalizers other than NFC, and
pickled weights (.bin).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

import torch

import runtime
from cli import UserError, die, parse_config, print_config
from data.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError
from model import ModelConfig, Transformer

REPO = os.path.dirname(os.path.abspath(__file__))

# What Hugging Face's ByteLevel pre-tokenizer splits by when use_regex is true (GPT-2's pattern).
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Stages whose models continue documents and stop at <|endoftext|>; every other stage's
# model answers in the chat format and stops at <|end|> (as sample.py --chat does).
BASE_STAGES = ("pretrain", "hf-import")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConvertError(ValueError):
    """A checkpoint or Hugging Face directory that cannot be converted (says what and why)."""


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
        raise ConvertError(f"tokenizer.json: vocabulary entry {piece!r} is not byte-level "
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


# data/chat.py's format: <|endoftext|>, then per turn the role token, the content, <|end|>;
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
    """The split regex of a byte-level pre-tokenizer, or ConvertError."""
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
            raise ConvertError("tokenizer.json: ByteLevel with add_prefix_space=true is not supported")
        if pre.get("use_regex", True):
            return GPT2_SPLIT_PATTERN
    if isinstance(pre, dict) and pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 2:
        split, byte_level = pre["pretokenizers"]
        if (isinstance(split, dict) and split.get("type") == "Split" and isinstance(byte_level, dict)
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)):
            pattern = split.get("pattern") or {}
            if "Regex" not in pattern or split.get("behavior") != "Isolated" or split.get("invert"):
                raise ConvertError(f"tokenizer.json: Split pre-tokenizer {json.dumps(split)[:200]} is not supported "
                                   "(only a Regex pattern with behavior Isolated)")
            if byte_level.get("add_prefix_space"):
                raise ConvertError("tokenizer.json: ByteLevel with add_prefix_space=true is not supported")
            return pattern["Regex"]
    raise ConvertError(f"tokenizer.json: pre-tokenizer {describe(pre)} is not supported ({supported})")


def tokenizer_from_hf(spec: dict) -> tuple[Tokenizer, list[int | None], list[str]]:
    """Our tokenizer from a Hugging Face byte-level BPE tokenizer.json (parsed).

    Returns (tokenizer, hf_ids, notes): hf_ids[i] is the Hugging Face id of our token i
    (None when it has none), notes say what differs. Our layout is the 256 bytes, then
    one token per merge in the file's order (the first merge that makes a token; later
    ones making the same bytes are the tiktoken-style extra splits), then our specials."""
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise ConvertError(f"tokenizer.json: model type {kind!r} is not supported (only byte-level BPE)")
    for key in ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise ConvertError(f"tokenizer.json: BPE with {key}={model[key]!r} is not supported "
                               "(SentencePiece-style tokenizers are not byte-level)")
    notes = []
    normalizer = spec.get("normalizer")
    if normalizer is not None:
        if isinstance(normalizer, dict) and normalizer.get("type") == "NFC":
            notes.append("the Hugging Face tokenizer NFC-normalizes text first; ours encodes text as given "
                         "(data.prepare normalizes to NFC; do the same for other text)")
        else:
            kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
            raise ConvertError(f"tokenizer.json: normalizer {kind!r} is not supported (only none or NFC)")
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise ConvertError("tokenizer.json: the BPE model has no vocab/merges")

    rank: dict[bytes, int] = {bytes([b]): b for b in range(256)}
    hf_ids: list[int | None] = [vocab.get(BYTE_TO_CHAR[b]) for b in range(256)]
    ours: list[tuple[int, int]] = []
    for m in merges:
        parts = m.split(" ") if isinstance(m, str) else m
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise ConvertError(f"tokenizer.json: merge {m!r} is not a pair")
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
        raise ConvertError(f"tokenizer.json: cannot build the tokenizer: {e}") from None

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


# ----------------------------------------------------------------------------- weight names

def _family_of(cfg: ModelConfig) -> str:
    """Which Hugging Face architecture expresses this model exactly."""
    if cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and cfg.pos_emb == "rope":
        return "qwen2" if cfg.qkv_bias and not cfg.bias else "llama"
    if cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.pos_emb == "learned":
        if cfg.n_kv_head != cfg.n_head:
            raise ConvertError(f"GPT-2 has no grouped-query attention: n_kv_head {cfg.n_kv_head} "
                               f"!= n_head {cfg.n_head}")
        return "gpt2"
    raise ConvertError(f"no Hugging Face architecture matches norm={cfg.norm}, mlp={cfg.mlp}, pos_emb={cfg.pos_emb} "
                       "(Llama: rmsnorm + swiglu + rope; GPT-2: layernorm + gelu + learned)")


def _llama_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, Hugging Face name) for every weight of a Llama-family model but the lm head."""
    pairs = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm_f.weight", "model.norm.weight")]
    qkv_bias = cfg.bias or cfg.qkv_bias
    linear = [("attn.wq", "self_attn.q_proj", qkv_bias), ("attn.wk", "self_attn.k_proj", qkv_bias),
              ("attn.wv", "self_attn.v_proj", qkv_bias), ("attn.wo", "self_attn.o_proj", cfg.bias),
              ("mlp.w1", "mlp.gate_proj", cfg.bias), ("mlp.w3", "mlp.up_proj", cfg.bias),
              ("mlp.w2", "mlp.down_proj", cfg.bias)]
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        pairs += [(ours + "norm1.weight", theirs + "input_layernorm.weight"),
                  (ours + "norm2.weight", theirs + "post_attention_layernorm.weight")]
        for o, t, has_bias in linear:
            pairs.append((f"{ours}{o}.weight", f"{theirs}{t}.weight"))
            if has_bias:
                pairs.append((f"{ours}{o}.bias", f"{theirs}{t}.bias"))
    return pairs


def _gpt2_to_hf(w: dict, cfg: ModelConfig) -> dict:
    """GPT-2 names and layouts: Conv1D weights are (in, out), q/k/v fused into c_attn;
    a bias or LayerNorm bias we do not have is zero."""
    def bias(name: str, size: int) -> torch.Tensor:
        return w[name] if name in w else torch.zeros(size, dtype=w["tok_emb.weight"].dtype)

    d, out = cfg.d_model, {"transformer.wte.weight": w["tok_emb.weight"], "transformer.wpe.weight": w["pos_emb.weight"]}
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[h + theirs + ".weight"] = w[o + ours + ".weight"]
            out[h + theirs + ".bias"] = bias(o + ours + ".bias", d)
        qkv = ("attn.wq", "attn.wk", "attn.wv")
        out[h + "attn.c_attn.weight"] = torch.cat([w[o + p + ".weight"].t() for p in qkv], dim=1)
        out[h + "attn.c_attn.bias"] = torch.cat([bias(o + p + ".bias", d) for p in qkv])
        for ours, theirs, size in (("attn.wo", "attn.c_proj", d), ("mlp.w1", "mlp.c_fc", cfg.d_ff),
                                   ("mlp.w2", "mlp.c_proj", d)):
            out[h + theirs + ".weight"] = w[o + ours + ".weight"].t()
            out[h + theirs + ".bias"] = bias(o + ours + ".bias", size)
    out["transformer.ln_f.weight"] = w["norm_f.weight"]
    out["transformer.ln_f.bias"] = bias("norm_f.bias", d)
    return out


def _gpt2_from_hf(hf: dict, cfg: ModelConfig) -> dict:
    d, w = cfg.d_model, {"tok_emb.weight": hf["transformer.wte.weight"], "pos_emb.weight": hf["transformer.wpe.weight"]}
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            w[o + ours + ".weight"], w[o + ours + ".bias"] = hf[h + theirs + ".weight"], hf[h + theirs + ".bias"]
        for k, p in enumerate(("attn.wq", "attn.wk", "attn.wv")):
            w[o + p + ".weight"] = hf[h + "attn.c_attn.weight"][:, k * d:(k + 1) * d].t()
            w[o + p + ".bias"] = hf[h + "attn.c_attn.bias"][k * d:(k + 1) * d]
        for ours, theirs in (("attn.wo", "attn.c_proj"), ("mlp.w1", "mlp.c_fc"), ("mlp.w2", "mlp.c_proj")):
            w[o + ours + ".weight"], w[o + ours + ".bias"] = hf[h + theirs + ".weight"].t(), hf[h + theirs + ".bias"]
    w["norm_f.weight"], w["norm_f.bias"] = hf["transformer.ln_f.weight"], hf["transformer.ln_f.bias"]
    return w


# ----------------------------------------------------------------------------- export

def _atomic_save_safetensors(tensors: dict, path: str, metadata: dict) -> None:
    from safetensors.torch import save_file
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def hf_config(cfg: ModelConfig, tok: Tokenizer, family: str, scalar: bool, eos: int, dtype: str) -> dict:
    """config.json for transformers (and vLLM / llama.cpp, which read the same keys)."""
    head = "ForSequenceClassification" if scalar else ("LMHeadModel" if family == "gpt2" else "ForCausalLM")
    arch = {"llama": "Llama", "qwen2": "Qwen2", "gpt2": "GPT2"}[family] + head
    common = {"architectures": [arch], "model_type": family, "vocab_size": cfg.vocab_size,
              "bos_token_id": tok.eot_id, "eos_token_id": eos, "pad_token_id": tok.pad_id,
              "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
              "use_cache": True, "torch_dtype": dtype}
    if scalar:
        common.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if family == "gpt2":
        return {**common, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_inner": cfg.d_ff, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    llama = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layer,
             "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
             "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
             "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
             "attention_dropout": 0.0}
    if family == "qwen2":
        return {**llama, "use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer}
    return {**llama, "attention_bias": cfg.bias, "mlp_bias": cfg.bias}


def export_hf(ckpt: str, out: str, dtype: str = "float32") -> list[str]:
    """Write our checkpoint `ckpt` as a Hugging Face directory `out`. Returns summary lines."""
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    config = runtime.read_checkpoint_config(ckpt)
    cfg = ModelConfig.from_dict(config["model"])
    weights, _ = runtime.load_weights(ckpt)
    tok = Tokenizer.load(os.path.join(ckpt, "tokenizer.json"))
    if tok.vocab_size != cfg.vocab_size:
        raise ConvertError(f"{ckpt}: the tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}")
    family = _family_of(cfg)
    scalar = "score_head.weight" in weights
    if os.path.realpath(out) == os.path.realpath(ckpt) or os.path.isfile(os.path.join(out, "train_config.json")):
        raise ConvertError(f"--out {out} is one of our checkpoint directories; write the export elsewhere")

    stale = [f for f in ("model.safetensors.index.json", "pytorch_model.bin") if os.path.exists(os.path.join(out, f))]
    if stale:
        raise ConvertError(f"--out {out} already holds other weights ({', '.join(stale)}); use an empty directory")

    try:
        if family == "gpt2":
            hf = _gpt2_to_hf(weights, cfg)
        else:
            hf = {theirs: weights[ours] for ours, theirs in _llama_names(cfg)}
        if scalar:
            hf["score.weight"] = weights["score_head.weight"]
        elif not cfg.tie_embeddings:
            hf["lm_head.weight"] = weights["lm_head.weight"]
    except KeyError as e:
        raise ConvertError(f"{ckpt}: weight {e.args[0]} is missing for its model config") from None
    hf = {k: v.to(DTYPES[dtype]) for k, v in hf.items()}

    stage = config.get("stage", "")
    eos = tok.eot_id if stage in BASE_STAGES else tok.end_id
    hf_cfg = hf_config(cfg, tok, family, scalar, eos, dtype)
    if scalar:
        hf_cfg["score_bias"] = float(weights["score_head.bias"].reshape(-1)[0]) if "score_head.bias" in weights else 0.0
        if config.get("score_norm"):
            hf_cfg["score_norm"] = config["score_norm"]
    hf_cfg["our_checkpoint"] = {"stage": stage, "step": config.get("step"), "model": cfg.to_dict()}

    os.makedirs(out, exist_ok=True)
    _atomic_save_safetensors(hf, os.path.join(out, "model.safetensors"), {"format": "pt"})
    runtime.write_json(os.path.join(out, "tokenizer.json"), hf_tokenizer_json(tok))
    runtime.write_json(os.path.join(out, "tokenizer_config.json"), hf_tokenizer_config(tok, cfg.max_seq_len))
    runtime.write_json(os.path.join(out, "generation_config.json"),
                       {"bos_token_id": tok.eot_id, "eos_token_id": [eos], "pad_token_id": tok.pad_id})
    runtime.write_json(os.path.join(out, "config.json"), hf_cfg)  # last: a complete directory has it
    n = sum(v.numel() for v in hf.values())
    return [f"exported {ckpt} (stage {stage or '?'}, step {config.get('step', '?')}) to {out} as "
            f"{hf_cfg['architectures'][0]} ({n / 1e6:.2f}M parameters, {dtype}); "
            + ("score = logits + config.json's score_bias" if scalar else
               "generation stops at " + ("<|end|>" if eos == tok.end_id else "<|endoftext|>"))]


# ----------------------------------------------------------------------------- import

SUPPORTED = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
             "GPT2LMHeadModel": "gpt2"}


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{os.path.dirname(path) or '.'} has no {what} ({os.path.basename(path)})") from None
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path} is unreadable or not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path} does not hold a JSON object")
    return obj


def read_hf_weights(hf_dir: str) -> dict:
    """Every tensor of a Hugging Face directory's safetensors weights (sharded or not), fp32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(_read_json(index, "weight index").get("weight_map", {}).values()))
    elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        files = ["model.safetensors"]
    elif any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(hf_dir)):
        raise ConvertError(f"{hf_dir} has only pickled PyTorch weights; this tool never unpickles: "
                           "save them as safetensors first (model.save_pretrained(..., safe_serialization=True))")
    else:
        raise ConvertError(f"{hf_dir} has no model.safetensors")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(os.path.join(hf_dir, name)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ConvertError(f"{os.path.join(hf_dir, name)} is truncated or corrupt: {e}") from None
    return {k: v.to(torch.float32) for k, v in tensors.items()}


def _rope_theta(hc: dict) -> float:
    params = hc.get("rope_parameters") or hc.get("rope_scaling") or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        kinds = {json.dumps(v, sort_keys=True) for v in params.values()}  # per layer type: must agree
        if len(kinds) > 1:
            raise ConvertError(f"rope parameters differ between layer types: {sorted(kinds)}")
        params = next(iter(params.values()))
    kind = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else params
    if kind not in (None, "default"):
        raise ConvertError(f"rope scaling {kind!r} is not supported (only plain RoPE)")
    if isinstance(params, dict) and params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConvertError("partial rotary embeddings are not supported")
    theta = (params.get("rope_theta") if isinstance(params, dict) else None) or hc.get("rope_theta") or 10000.0
    return float(theta)


def family_of_hf(hc: dict) -> str:
    arch = (hc.get("architectures") or [None])[0]
    if arch not in SUPPORTED:
        raise ConvertError(f"architecture {arch!r} (model_type {hc.get('model_type')!r}) is not supported "
                           f"(supported: {', '.join(SUPPORTED)})")
    return SUPPORTED[arch]


def model_config_from_hf(hc: dict, vocab_size: int, max_seq_len: int = 0) -> tuple[ModelConfig, str, list[str]]:
    """Our ModelConfig for a Hugging Face config.json; (config, family, notes)."""
    family, notes = family_of_hf(hc), []
    try:
        if family == "gpt2":
            act = hc.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
                raise ConvertError(f"activation_function {act!r} is not supported (ours is GELU's tanh form: gelu_new)")
            for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                              ("add_cross_attention", False)):
                if hc.get(key, want) != want:
                    raise ConvertError(f"GPT-2 with {key}={hc[key]} is not supported")
            d = int(hc.get("n_embd", 768))
            context = int(hc.get("n_positions", 1024))
            cfg = dict(n_layer=int(hc.get("n_layer", 12)), n_head=int(hc.get("n_head", 12)), d_model=d,
                       d_ff=int(hc.get("n_inner") or 4 * d), norm="layernorm",
                       norm_eps=float(hc.get("layer_norm_epsilon", 1e-5)), mlp="gelu", pos_emb="learned", bias=True,
                       tie_embeddings=bool(hc.get("tie_word_embeddings", True)))
            cfg["n_kv_head"] = cfg["n_head"]
        else:
            if hc.get("hidden_act", "silu") != "silu":
                raise ConvertError(f"hidden_act {hc['hidden_act']!r} is not supported (ours is SwiGLU: silu)")
            d, heads = int(hc["hidden_size"]), int(hc["num_attention_heads"])
            if hc.get("head_dim") not in (None, d // heads):
                raise ConvertError(f"head_dim {hc['head_dim']} differs from hidden_size / num_attention_heads "
                                   f"= {d // heads}")
            context = int(hc.get("max_position_embeddings", 2048))
            cfg = dict(n_layer=int(hc["num_hidden_layers"]), n_head=heads,
                       n_kv_head=int(hc.get("num_key_value_heads") or heads), d_model=d,
                       d_ff=int(hc["intermediate_size"]), norm="rmsnorm", norm_eps=float(hc.get("rms_norm_eps", 1e-6)),
                       mlp="swiglu", pos_emb="rope", rope_theta=_rope_theta(hc),
                       tie_embeddings=bool(hc.get("tie_word_embeddings", False)))
            if family == "qwen2":
                cfg["qkv_bias"] = True
            else:
                attn_bias, mlp_bias = bool(hc.get("attention_bias", False)), bool(hc.get("mlp_bias", False))
                if attn_bias != mlp_bias:
                    raise ConvertError(f"attention_bias={attn_bias} with mlp_bias={mlp_bias} is not supported "
                                       "(biases everywhere or nowhere)")
                cfg["bias"] = attn_bias
            window = hc.get("sliding_window")
            sliding = (hc.get("use_sliding_window", False) if family == "qwen2" else True) and window is not None \
                or "sliding_attention" in (hc.get("layer_types") or [])
            if sliding and window is not None and int(window) < context:
                notes.append(f"sliding-window attention (window {window}): the context is capped at {window} tokens, "
                             "where full attention is the same")
                context = int(window)
            elif sliding and window is None:
                raise ConvertError("sliding-window attention without a window size is not supported")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConvertError):
            raise
        raise ConvertError(f"config.json: missing or invalid key: {e}") from None
    if max_seq_len:
        context = min(context, max_seq_len)
    try:
        return ModelConfig(vocab_size=vocab_size, max_seq_len=context, **cfg), family, notes
    except ValueError as e:
        raise ConvertError(f"config.json: {e}") from None


def _strip_prefix(hf: dict, family: str) -> dict:
    """Accept files saved from the base model too (no `model.` / `transformer.` prefix)."""
    prefix = "transformer." if family == "gpt2" else "model."
    out = {}
    for k, v in hf.items():
        if k.endswith(("attn.bias", "attn.masked_bias")) and family == "gpt2" and v.ndim == 4:
            continue  # causal-mask buffers of old GPT-2 files
        if k.endswith("rotary_emb.inv_freq"):
            continue  # a buffer old Llama files stored
        out[k if k.startswith(prefix) or k == "lm_head.weight" else prefix + k] = v
    return out


class _ReadRecorder(dict):
    """A dict that remembers which keys were read (weights left unread are not understood)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen = set()

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.seen.add(key)
        return value


def _rows(matrix: torch.Tensor, hf_ids: list[int | None]) -> torch.Tensor:
    """Rows of matrix for our token ids; a token Hugging Face lacks gets the mean row."""
    have = torch.tensor([i is not None for i in hf_ids])
    rows = matrix[torch.tensor([i if i is not None else 0 for i in hf_ids])]
    rows[~have] = matrix[rows.new_tensor([i for i in hf_ids if i is not None], dtype=torch.long)].mean(dim=0)
    return rows


def import_hf(hf_dir: str, out: str, max_seq_len: int = 0, train_config: dict | None = None) -> list[str]:
    """Write the Hugging Face directory `hf_dir` as our checkpoint `out`. Returns notes."""
    if not os.path.isdir(hf_dir):
        raise ConvertError(f"{hf_dir} is not a directory")
    hc = _read_json(os.path.join(hf_dir, "config.json"), "Hugging Face config")
    family_of_hf(hc)  # an unsupported architecture is the first thing to say
    spec = _read_json(os.path.join(hf_dir, "tokenizer.json"), "tokenizer")
    tok, hf_ids, tok_notes = tokenizer_from_hf(spec)
    cfg, family, notes = model_config_from_hf(hc, tok.vocab_size, max_seq_len)
    hf = _strip_prefix(read_hf_weights(hf_dir), family)

    emb_name = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    if emb_name not in hf:
        raise ConvertError(f"{hf_dir}: no {emb_name} in the weights")
    if max(i for i in hf_ids if i is not None) >= hf[emb_name].shape[0]:
        raise ConvertError(f"{hf_dir}: the tokenizer has ids beyond the {hf[emb_name].shape[0]} embedding rows")
    read = _ReadRecorder(hf)
    try:
        w = _gpt2_from_hf(read, cfg) if family == "gpt2" else {ours: read[theirs] for ours, theirs in _llama_names(cfg)}
    except KeyError as e:
        raise ConvertError(f"{hf_dir}: weight {e.args[0]} is missing for its config") from None
    unknown = sorted(set(hf) - read.seen - {"lm_head.weight"})
    if unknown:
        raise ConvertError(f"{hf_dir}: weights not understood for {hc['architectures'][0]}: {unknown[:4]}")
    w["tok_emb.weight"] = _rows(hf[emb_name], hf_ids)
    if cfg.tie_embeddings:
        w["lm_head.weight"] = w["tok_emb.weight"]  # one tensor under two names, as in the model
    elif "lm_head.weight" not in hf:
        raise ConvertError(f"{hf_dir}: no lm_head.weight, and tie_word_embeddings is false")
    else:
        w["lm_head.weight"] = _rows(hf["lm_head.weight"], hf_ids)

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # to_empty unties them
    try:
        model.load_state_dict(w, strict=True)
    except RuntimeError as e:
        detail = str(e).splitlines()[-1].strip()
        raise ConvertError(f"{hf_dir}: weights do not match its config.json: {detail}") from None
    model.init_rope()
    os.makedirs(out, exist_ok=True)
    tok_path = os.path.join(out, "tokenizer.json")
    tok.save(tok_path)
    env = runtime.Env(0, 0, 1, torch.device("cpu"))
    source = {"hf": os.path.abspath(hf_dir), "architecture": hc["architectures"][0], "model_type": hc.get("model_type")}
    runtime.save_checkpoint(out, model, None, env, stage="hf-import", step=0, train_config=train_config or {},
                            trainer_state={}, tokenizer_path=tok_path, extra_config={"source": source})
    summary = (f"imported {hf_dir} ({hc['architectures'][0]}: {cfg.n_layer} layers, d_model {cfg.d_model}, "
               f"{cfg.n_head} heads ({cfg.n_kv_head} kv), context {cfg.max_seq_len}, "
               f"{model.num_params() / 1e6:.2f}M parameters) to {out}; vocabulary {tok.vocab_size} "
               f"(Hugging Face: {hf[emb_name].shape[0]} embedding rows)")
    return [summary] + [f"note: {n}" for n in notes + tok_notes]


# ----------------------------------------------------------------------------- CLI

@dataclass
class ToHFConfig:
    ckpt: str = field(default=os.path.join(REPO, "runs", "ppo"), metadata={"help": "our checkpoint directory"})
    out: str = field(default="", metadata={"help": "Hugging Face directory to write (required)"})
    dtype: str = field(default="float32", metadata={"choices": list(DTYPES), "help": "weight dtype of the export"})

    def __post_init__(self):
        if not self.out:
            raise UserError("--out is required (the Hugging Face directory to write)")


@dataclass
class FromHFConfig:
    hf: str = field(default="", metadata={"help": "local Hugging Face model directory (required; "
                                                  "nothing is downloaded)"})
    out: str = field(default="", metadata={"help": "our checkpoint directory to write (required)"})
    max_seq_len: int = field(default=0, metadata={"help": "cap the context (0: the model's max_position_embeddings)"})

    def __post_init__(self):
        if not self.hf or not self.out:
            raise UserError("--hf and --out are required")
        if self.max_seq_len < 0:
            raise UserError("--max-seq-len must be >= 0")


COMMANDS = {"to-hf": (ToHFConfig, "our checkpoint -> Hugging Face directory (transformers, vLLM, llama.cpp)"),
            "from-hf": (FromHFConfig, "local Hugging Face directory (Llama, Mistral, Qwen2, GPT-2) -> our checkpoint")}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: python convert.py {to-hf,from-hf} [options]   (python convert.py to-hf --help)\n" + \
        "\n".join(f"  {name:8s} {text}" for name, (_, text) in COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        sys.exit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        die(f"unknown command {argv[0]!r}: use to-hf or from-hf")
    config_class, text = COMMANDS[argv[0]]
    cfg = parse_config(config_class, argv[1:], description=text)
    print_config(cfg, f"convert {argv[0]} config")
    try:
        if argv[0] == "to-hf":
            lines = export_hf(cfg.ckpt, cfg.out, cfg.dtype)
        else:
            lines = import_hf(cfg.hf, cfg.out, cfg.max_seq_len, train_config={"command": "from-hf", **vars(cfg)})
    except (ConvertError, runtime.CheckpointError, TokenizerError, UserError, OSError, ValueError) as e:
        die(str(e))
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
