"""Hugging Face interop: our checkpoints <-> Hugging Face model directories.

    python convert.py to-hf --ckpt runs/ppo --out hf/ppo        # then transformers, or `vllm serve hf/ppo`
    python convert.py from-hf --hf ~/models/SmolLM --out runs/smol  # then `python train_sft.py --init runs/smol`
    python convert.py to-gguf --ckpt runs/ppo --out ppo.gguf      # then `llama-server -m ppo.gguf` (--outtype f16, q8_0)

**Export** (`to-hf`). A Llama-style checkpoint (RMSNorm, RoPE, SwiGLU, any GQA) becomes
`LlamaForCausalLM` (`Qwen2ForCausalLM` when it has biases on q/k/v only); a GPT-2-style one
(LayerNorm, learned positions, tanh-GELU MLP) becomes `GPT2LMHeadModel`. The weights map one
to one, with no permutation: our rotary embedding rotates the pair (x[i], x[i + D/2]),
which is Hugging Face's rotate-half layout (not Meta's interleaved one). GPT-2 stores its
linear layers as Conv1D, (in, out), so they are transposed, and q/k/v are fused into
`c_attn`. Each architecture's mapping is one table (`weight_table`: our names, theirs, and
a transform with its inverse) that export walks forward and import walks back. A reward
model or critic (a checkpoint with `score_head.*`) becomes `*ForSequenceClassification`
with `num_labels=1`: `score.weight` is our head's weight; HF's head has no bias, so ours is
stored in config.json as `score_bias`, next to the reward model's `score_norm`:

    raw score  = logits[:, 0] + config.score_bias            (read at the last non-pad token, our <|end|>)
    our score  = (raw - score_norm.mean) / score_norm.std     (what runtime.RewardScorer.score returns)

The tokenizer is written as `tokenizer.json` (byte-level BPE with our split regex and the
six special tokens as added tokens) and `tokenizer_config.json` (eos `<|end|>`, pad
`<|pad|>`, and a Jinja chat template that renders data/chat.py's format), by
data/hf_tokenizer.py. Our tokenizer never reads special-token text in user text as a
special token; Hugging Face's does unless `split_special_tokens=True` (transformers) /
`encode_special_tokens = True` (tokenizers), and with that flag the ids are ours exactly.
The chat template refuses (raise_exception) a message whose content holds special-token
text, rather than letting it inject a turn.

**Import** (`from-hf`). A local directory (nothing is downloaded) of `LlamaForCausalLM`,
`MistralForCausalLM` (a sliding window caps the context at the window, where the two
attentions are identical), `Qwen2ForCausalLM` (q/k/v biases) or `GPT2LMHeadModel`, with
safetensors weights (never pickles) and a byte-level BPE `tokenizer.json`, becomes our
checkpoint directory (docs/design.md). Our tokenizer's id layout is fixed (the 256 bytes, the
merges in order, then our six special tokens), so the embedding and lm-head rows are
reordered into it by token; a special token of ours that the model lacks starts as the
mean embedding, and Hugging Face tokens ours cannot produce (other added tokens, padding
rows) are left out. Anything else is refused with one `error:` line naming what: other
architectures, RoPE scaling (Llama 3.1's `llama3`, linear, YaRN, ...), a head_dim other than
hidden_size / heads, activations other than SiLU (Llama family) or GPT-2's tanh GELU, Llama
biases on attention but not the MLP (or the reverse), SentencePiece-style tokenizers
(byte_fallback / Metaspace: Llama 2, Mistral v0.1), normalizers other than NFC, and
pickled weights (.bin).

**GGUF** (`to-gguf`). A Llama-style checkpoint without biases becomes one GGUF file for
llama.cpp's `llama` architecture, written with the `gguf` package of llama.cpp's own
project: hyperparameters (`llama.*`: context, widths, heads, rope base, RMSNorm eps), the
tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q` ... `ffn_down`,
`output_norm`, `output` unless tied) in f32, f16 or q8_0 (1-D norms stay f32), q and k
rows permuted to llama.cpp's interleaved rotary pairs, and the vocabulary as
`tokenizer.ggml.*` (gpt2-type BPE, pre-tokenizer `llama-bpe`, bos `<|endoftext|>`, eos
as to-hf's, the chat template). Details at `export_gguf`.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

import runtime
from cli import UserError, entry_point, parse_config, print_config
from data.files import read_json
from data.hf_tokenizer import CHAT_TEMPLATE, hf_tokenizer_config, hf_tokenizer_json, tokenizer_from_hf
from data.tokenizer import GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, Tokenizer
from model import ModelConfig, Transformer

REPO = os.path.dirname(os.path.abspath(__file__))

# Stages whose models continue documents and stop at <|endoftext|>; every other stage's
# model answers in the chat format and stops at <|end|> (as sample.py --chat does).
BASE_STAGES = ("pretrain", "hf-import")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConvertError(UserError, ValueError):
    """A checkpoint or Hugging Face directory that cannot be converted (says what and why)."""


# ----------------------------------------------------------------------------- weight mapping
# One table per model: each Rule names our tensors, the Hugging Face tensors they become,
# and the transform between them with its inverse. Export walks the table forward, import
# walks the same table backward (`walk`), so the two directions cannot drift apart.

class Transform(NamedTuple):
    """A pair of inverse functions, each from a tuple of tensors to a tuple of tensors."""
    to_hf: Callable[..., tuple]  # our tensors -> theirs
    from_hf: Callable[..., tuple]  # theirs -> ours

    def then(self, other: "Transform") -> "Transform":
        """This transform, then `other` (its inverse: other's inverse, then this one's)."""
        return Transform(lambda *ts: other.to_hf(*self.to_hf(*ts)), lambda *ts: self.from_hf(*other.from_hf(*ts)))


SAME = Transform(lambda *ts: ts, lambda *ts: ts)
# GPT-2's Conv1D stores a linear layer's weight as (in, out): ours transposed.
CONV1D = Transform(lambda *ts: tuple(t.t() for t in ts), lambda *ts: tuple(t.t() for t in ts))


def fused(n: int, dim: int) -> Transform:
    """n of our tensors as one, concatenated along dim (GPT-2's c_attn: q, k, v)."""
    return Transform(lambda *ts: (torch.cat(ts, dim),), lambda t: t.chunk(n, dim))


def zeros(size: int, name: str) -> Transform:
    """A bias Hugging Face has and our model does not (GPT-2 without biases): zeros on
    export; on import nothing, which is only exact when it is zero."""
    def from_hf(t):
        if t.any():
            raise ConvertError(f"{name} is not zero, and the model has no such bias")
        return ()
    return Transform(lambda: (torch.zeros(size),), from_hf)


class Rule(NamedTuple):
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    transform: Transform = SAME


def rename(ours: str, theirs: str, transform: Transform = SAME) -> Rule:
    """One tensor of ours as one of theirs."""
    return Rule((ours,), (theirs,), transform)


def walk(table: list[Rule], tensors: dict, to_hf: bool) -> dict:
    """The tensors named on one side of the table as those of the other side: ours ->
    Hugging Face's with to_hf, else back. A name the table needs and `tensors` lacks
    raises KeyError."""
    out = {}
    for rule in table:
        src, dst, fn = ((rule.ours, rule.theirs, rule.transform.to_hf) if to_hf else
                        (rule.theirs, rule.ours, rule.transform.from_hf))
        results = fn(*(tensors[name] for name in src))
        out.update(zip(dst, results, strict=True))
    return out


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


def weight_table(cfg: ModelConfig, family: str, scalar: bool = False) -> list[Rule]:
    """Every weight of the Hugging Face model: the family's layers, then the head
    (`score` for a reward model or critic, else the lm head unless tied)."""
    table = _gpt2_table(cfg) if family == "gpt2" else _llama_table(cfg)
    if scalar:
        table.append(rename("score_head.weight", "score.weight"))
    elif not cfg.tie_embeddings:
        table.append(rename("lm_head.weight", "lm_head.weight"))
    return table


def _llama_table(cfg: ModelConfig) -> list[Rule]:
    """Llama, Mistral and Qwen2: the same tensors under other names."""
    qkv_bias = cfg.bias or cfg.qkv_bias
    linear = [("attn.wq", "self_attn.q_proj", qkv_bias), ("attn.wk", "self_attn.k_proj", qkv_bias),
              ("attn.wv", "self_attn.v_proj", qkv_bias), ("attn.wo", "self_attn.o_proj", cfg.bias),
              ("mlp.w1", "mlp.gate_proj", cfg.bias), ("mlp.w3", "mlp.up_proj", cfg.bias),
              ("mlp.w2", "mlp.down_proj", cfg.bias)]
    table = [rename("tok_emb.weight", "model.embed_tokens.weight"), rename("norm_f.weight", "model.norm.weight")]
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}.", f"model.layers.{i}."
        table += [rename(o + "norm1.weight", h + "input_layernorm.weight"),
                  rename(o + "norm2.weight", h + "post_attention_layernorm.weight")]
        for ours, theirs, has_bias in linear:
            table.append(rename(f"{o}{ours}.weight", f"{h}{theirs}.weight"))
            if has_bias:
                table.append(rename(f"{o}{ours}.bias", f"{h}{theirs}.bias"))
    return table


def _gpt2_table(cfg: ModelConfig) -> list[Rule]:
    """GPT-2: Conv1D weights are (in, out); q/k/v are fused into c_attn; every layer has
    a bias, zero where ours has none."""
    def bias(ours: tuple[str, ...], theirs: str, size: int, present: bool, transform: Transform = SAME) -> Rule:
        return Rule(ours, (theirs,), transform) if present else Rule((), (theirs,), zeros(size, theirs))

    d, qkv_bias = cfg.d_model, cfg.bias or cfg.qkv_bias
    table = [rename("tok_emb.weight", "transformer.wte.weight"), rename("pos_emb.weight", "transformer.wpe.weight")]
    for i in range(cfg.n_layer):
        o, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            table += [rename(f"{o}{ours}.weight", f"{h}{theirs}.weight"),
                      bias((f"{o}{ours}.bias",), f"{h}{theirs}.bias", d, cfg.bias)]
        qkv = [o + p for p in ("attn.wq", "attn.wk", "attn.wv")]
        table += [Rule(tuple(p + ".weight" for p in qkv), (h + "attn.c_attn.weight",), CONV1D.then(fused(3, dim=1))),
                  bias(tuple(p + ".bias" for p in qkv), h + "attn.c_attn.bias", 3 * d, qkv_bias, fused(3, dim=0))]
        for ours, theirs, size in (("attn.wo", "attn.c_proj", d), ("mlp.w1", "mlp.c_fc", cfg.d_ff),
                                   ("mlp.w2", "mlp.c_proj", d)):
            table += [rename(f"{o}{ours}.weight", f"{h}{theirs}.weight", CONV1D),
                      bias((f"{o}{ours}.bias",), f"{h}{theirs}.bias", size, cfg.bias)]
    return table + [rename("norm_f.weight", "transformer.ln_f.weight"),
                    bias(("norm_f.bias",), "transformer.ln_f.bias", d, cfg.bias)]


# ----------------------------------------------------------------------------- export

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


def read_ours(ckpt: str) -> tuple[dict, ModelConfig, dict, Tokenizer]:
    """(config.json, its ModelConfig, the weights, the tokenizer) of one of our checkpoints."""
    config = runtime.read_checkpoint_config(ckpt)
    cfg = ModelConfig.from_dict(config["model"])
    weights, _ = runtime.load_weights(ckpt)
    tok = Tokenizer.load(os.path.join(ckpt, "tokenizer.json"))
    if tok.vocab_size != cfg.vocab_size:
        raise ConvertError(f"{ckpt}: the tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}")
    return config, cfg, weights, tok


def export_hf(ckpt: str, out: str, dtype: str = "float32") -> list[str]:
    """Write our checkpoint `ckpt` as a Hugging Face directory `out`. Returns summary lines."""
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    config, cfg, weights, tok = read_ours(ckpt)
    family = _family_of(cfg)
    scalar = "score_head.weight" in weights
    if os.path.realpath(out) == os.path.realpath(ckpt) or os.path.isfile(os.path.join(out, "train_config.json")):
        raise ConvertError(f"--out {out} is one of our checkpoint directories; write the export elsewhere")

    stale = [f for f in ("model.safetensors.index.json", "pytorch_model.bin") if os.path.exists(os.path.join(out, f))]
    if stale:
        raise ConvertError(f"--out {out} already holds other weights ({', '.join(stale)}); use an empty directory")

    try:
        hf = walk(weight_table(cfg, family, scalar), weights, to_hf=True)
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
    from safetensors.torch import save
    runtime.atomic_write(os.path.join(out, "model.safetensors"),
                         save({k: v.contiguous() for k, v in hf.items()}, metadata={"format": "pt"}))
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
    return read_json(path, ConvertError, f"{os.path.dirname(path) or '.'} has no {what} ({os.path.basename(path)})")


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

    table = weight_table(cfg, family)
    emb_name = next(rule.theirs[0] for rule in table if rule.ours == ("tok_emb.weight",))
    if emb_name not in hf:
        raise ConvertError(f"{hf_dir}: no {emb_name} in the weights")
    if max(i for i in hf_ids if i is not None) >= hf[emb_name].shape[0]:
        raise ConvertError(f"{hf_dir}: the tokenizer has ids beyond the {hf[emb_name].shape[0]} embedding rows")
    if not cfg.tie_embeddings and "lm_head.weight" not in hf:
        raise ConvertError(f"{hf_dir}: no lm_head.weight, and tie_word_embeddings is false")
    try:
        w = walk(table, hf, to_hf=False)
    except KeyError as e:
        raise ConvertError(f"{hf_dir}: weight {e.args[0]} is missing for its config") from None
    unknown = sorted(set(hf) - {name for rule in table for name in rule.theirs} - {"lm_head.weight"})
    if unknown:
        raise ConvertError(f"{hf_dir}: weights not understood for {hc['architectures'][0]}: {unknown[:4]}")
    for name in ("tok_emb.weight", "lm_head.weight"):  # rows in our token order
        if name in w:
            w[name] = _rows(w[name], hf_ids)
    if cfg.tie_embeddings:
        w["lm_head.weight"] = w["tok_emb.weight"]  # one tensor under two names, as in the model

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


# ----------------------------------------------------------------------------- GGUF (llama.cpp)
# llama.cpp's `llama` architecture, written with its project's `gguf` package. Its rotary
# embedding rotates adjacent pairs (x[2i], x[2i+1]) (Meta's interleaved layout), ours and
# Hugging Face's rotate (x[i], x[i + D/2]): q and k rows are permuted within each head, as
# llama.cpp's convert_hf_to_gguf.py does for a Hugging Face Llama. Vocabulary: a gpt2-type
# BPE (the byte-level strings of tokenizer.json, every split of every token at its rank,
# our six special tokens as control tokens) whose pre-tokenizer is named `llama-bpe`:
# llama.cpp recognizes a pre-tokenizer only by name (convert_hf_to_gguf.py hashes a fixed
# text through the vocabulary, which a new vocabulary never matches), and its llama-bpe
# split and whole-chunk lookup (ignore_merges) give our ids (docs/design.md).

GGUF_OUTTYPES = ("f32", "f16", "q8_0")
# Split regexes llama.cpp's `llama-bpe` pre-tokenizer reproduces: ours (GPT-4's), and
# Llama 3's as its tokenizer.json writes it (what an import of a Llama 3 model keeps).
LLAMA_BPE_PATTERNS = (
    GPT4_SPLIT_PATTERN,
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+",
)
GGUF_NAMES = {"attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v", "attn.wo": "attn_output",
              "mlp.w1": "ffn_gate", "mlp.w3": "ffn_up", "mlp.w2": "ffn_down", "norm1": "attn_norm",
              "norm2": "ffn_norm"}


def _interleave_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows from rotate-half order (i, i + D/2) to llama.cpp's adjacent pairs (2i, 2i+1)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(cfg: ModelConfig, weights: dict) -> dict[str, torch.Tensor]:
    """Our Llama-style weights under llama.cpp's names (fp32), q/k rows interleaved; no
    `output.weight` when the embeddings are tied (llama.cpp then uses token_embd)."""
    out = {"token_embd.weight": weights["tok_emb.weight"], "output_norm.weight": weights["norm_f.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = weights["lm_head.weight"]
    for i in range(cfg.n_layer):
        for ours, theirs in GGUF_NAMES.items():
            w = weights[f"blocks.{i}.{ours}.weight"]
            if ours in ("attn.wq", "attn.wk"):
                w = _interleave_rope_rows(w, cfg.n_head if ours == "attn.wq" else cfg.n_kv_head)
            out[f"blk.{i}.{theirs}.weight"] = w
    return {k: v.detach().to(torch.float32).contiguous() for k, v in out.items()}


def gguf_vocab(tok: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of tokenizer.ggml.*: tokenizer.json's byte-level strings."""
    import gguf
    if tok.pattern not in LLAMA_BPE_PATTERNS:
        raise ConvertError(f"the tokenizer's split regex {tok.pattern!r} is not one llama.cpp's llama-bpe "
                           "pre-tokenizer reproduces (ours, GPT-4's, or Llama 3's)")
    spec = hf_tokenizer_json(tok)
    by_id = {i: piece for piece, i in spec["model"]["vocab"].items()}
    tokens = [by_id[i] for i in range(len(tok.token_bytes))] + list(tok.special_tokens)
    types = [int(gguf.TokenType.NORMAL)] * len(tok.token_bytes) + [int(gguf.TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    return tokens, types, spec["model"]["merges"]


def _gguf_data(t: torch.Tensor, outtype: str):
    """(array, ggml type) of one tensor: 1-D tensors (norms) stay f32, as llama.cpp's own
    converter keeps them; a q8_0 matrix whose rows are not whole 32-value blocks is f16."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    a = t.numpy()
    if outtype == "f32" or a.ndim == 1:
        return a, Q.F32
    if outtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0
    return a.astype("float16"), Q.F16


def _gguf_model(cfg: ModelConfig, weights: dict, ckpt: str) -> None:
    """Refuse what llama.cpp's llama architecture would not run as ours."""
    if "score_head.weight" in weights:
        raise ConvertError(f"{ckpt} is a reward model or critic (score_head); GGUF export is for language models")
    if _family_of(cfg) != "llama" or cfg.bias or cfg.qkv_bias:
        raise ConvertError("GGUF export supports Llama-style models without biases (rmsnorm + swiglu + rope, "
                           f"bias=False, qkv_bias=False); this one has norm={cfg.norm}, mlp={cfg.mlp}, "
                           f"pos_emb={cfg.pos_emb}, bias={cfg.bias}, qkv_bias={cfg.qkv_bias}")


def _gguf_metadata(writer, cfg: ModelConfig, tok: Tokenizer, vocab: tuple, eos: int, file_type: int,
                   name: str) -> None:
    """The model's hyperparameters and the tokenizer.ggml.* keys (vocab: gguf_vocab's)."""
    import gguf
    tokens, types, merges = vocab
    writer.add_name(name)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tok.eot_id)
    writer.add_eos_token_id(eos)
    writer.add_pad_token_id(tok.pad_id)
    writer.add_add_bos_token(False)  # the chat template starts with <|endoftext|> itself
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def export_gguf(ckpt: str, out: str, outtype: str = "f32") -> list[str]:
    """Write our Llama-style checkpoint `ckpt` as one GGUF file `out` for llama.cpp:
    weights in f32, f16 or q8_0, the vocabulary, special ids and chat template. The file
    appears whole or not at all (written under a temporary name, then renamed)."""
    import gguf
    if outtype not in GGUF_OUTTYPES:
        raise ConvertError(f"--outtype must be one of {list(GGUF_OUTTYPES)}, got {outtype!r}")
    if os.path.isdir(out):
        raise ConvertError(f"--out {out} is a directory; name the file to write, such as {out}/model.gguf")
    config, cfg, weights, tok = read_ours(ckpt)
    _gguf_model(cfg, weights, ckpt)
    vocab = gguf_vocab(tok)
    try:
        tensors = gguf_tensors(cfg, weights)
    except KeyError as e:
        raise ConvertError(f"{ckpt}: weight {e.args[0]} is missing for its model config") from None
    stage = config.get("stage", "")
    eos = tok.eot_id if stage in BASE_STAGES else tok.end_id
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        _gguf_metadata(writer, cfg, tok, vocab, eos, file_type, os.path.basename(os.path.normpath(ckpt)))
        counts: dict[str, int] = {}
        for name, t in tensors.items():
            data, qtype = _gguf_data(t, outtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    n = sum(t.numel() for t in tensors.values())
    kinds = ", ".join(f"{c} {k}" for k, c in sorted(counts.items()))
    return [f"exported {ckpt} (stage {stage or '?'}, step {config.get('step', '?')}) to {out} as GGUF llama "
            f"({n / 1e6:.2f}M parameters, {outtype}: {kinds} tensors; {os.path.getsize(out) / 1e6:.2f} MB); "
            "generation stops at " + ("<|end|>" if eos == tok.end_id else "<|endoftext|>")]


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


@dataclass
class ToGGUFConfig:
    ckpt: str = field(default=os.path.join(REPO, "runs", "ppo"), metadata={"help": "our checkpoint directory"})
    out: str = field(default="", metadata={"help": "GGUF file to write (required), e.g. model.gguf"})
    outtype: str = field(default="f32", metadata={"choices": list(GGUF_OUTTYPES),
                                                  "help": "weight type of the matrices (norms stay f32)"})

    def __post_init__(self):
        if not self.out:
            raise UserError("--out is required (the GGUF file to write)")


COMMANDS = {"to-hf": (ToHFConfig, "our checkpoint -> Hugging Face directory (transformers, vLLM)"),
            "to-gguf": (ToGGUFConfig, "our Llama-style checkpoint -> one GGUF file (llama.cpp)"),
            "from-hf": (FromHFConfig, "local Hugging Face directory (Llama, Mistral, Qwen2, GPT-2) -> our checkpoint")}


@entry_point
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: python convert.py {to-hf,to-gguf,from-hf} [options]   (python convert.py to-hf --help)\n" + \
        "\n".join(f"  {name:8s} {text}" for name, (_, text) in COMMANDS.items())
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return
    if not argv:
        raise UserError("no command: use to-hf, to-gguf or from-hf (python convert.py --help)")
    if argv[0] not in COMMANDS:
        raise UserError(f"unknown command {argv[0]!r}: use to-hf, to-gguf or from-hf")
    config_class, text = COMMANDS[argv[0]]
    cfg = parse_config(config_class, argv[1:], description=text)
    print_config(cfg, f"convert {argv[0]} config")
    try:
        if argv[0] == "to-hf":
            lines = export_hf(cfg.ckpt, cfg.out, cfg.dtype)
        elif argv[0] == "to-gguf":
            lines = export_gguf(cfg.ckpt, cfg.out, cfg.outtype)
        else:
            lines = import_hf(cfg.hf, cfg.out, cfg.max_seq_len, train_config={"command": "from-hf", **vars(cfg)})
    except (OSError, ValueError) as e:  # a file that cannot be read or written, a value a library refused
        raise UserError(str(e)) from None
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
