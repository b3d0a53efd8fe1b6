"""What the two converters share: the weight-name tables between our checkpoints and
Hugging Face's (one table per architecture, walked forward by export and backward by
import, so the two directions cannot drift apart), our checkpoint read for export, and
`ConvertError`.
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

from checkpoint import load_weights, read_checkpoint_config
from cli import UserError
from data.text.tokenizer import Tokenizer
from model import ModelConfig

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


def family_of(cfg: ModelConfig) -> str:
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


def read_ours(ckpt: str) -> tuple[dict, ModelConfig, dict, Tokenizer]:
    """(config.json, its ModelConfig, the weights, the tokenizer) of one of our checkpoints."""
    config = read_checkpoint_config(ckpt)
    cfg = ModelConfig.from_dict(config["model"])
    weights, _ = load_weights(ckpt)
    tok = Tokenizer.load(os.path.join(ckpt, "tokenizer.json"))
    if tok.vocab_size != cfg.vocab_size:
        raise ConvertError(f"{ckpt}: the tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}")
    return config, cfg, weights, tok
