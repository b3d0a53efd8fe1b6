"""Hugging Face model directories <-> our checkpoints (`python convert.py to-hf|from-hf`).

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
    our score  = (raw - score_norm.mean) / score_norm.std     (what checkpoint.RewardScorer.score returns)

The tokenizer is written as `tokenizer.json` (byte-level BPE with our split regex and the
six special tokens as added tokens) and `tokenizer_config.json` (eos `<|end|>`, pad
`<|pad|>`, and a Jinja chat template that renders data/text/chat.py's format), by
data/text/hf_tokenizer.py. Our tokenizer never reads special-token text in user text as a
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
"""
from __future__ import annotations

import json
import os

import torch

from checkpoint import save_checkpoint
from data.files import atomic_write, read_json, write_json
from data.text.hf_tokenizer import hf_tokenizer_config, hf_tokenizer_json, tokenizer_from_hf
from data.text.tokenizer import Tokenizer
from distributed import Env
from interop.weights import BASE_STAGES, DTYPES, ConvertError, family_of, read_ours, walk, weight_table
from model import ModelConfig, Transformer

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



def export_hf(ckpt: str, out: str, dtype: str = "float32") -> list[str]:
    """Write our checkpoint `ckpt` as a Hugging Face directory `out`. Returns summary lines."""
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    config, cfg, weights, tok = read_ours(ckpt)
    family = family_of(cfg)
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
    atomic_write(os.path.join(out, "model.safetensors"),
                         save({k: v.contiguous() for k, v in hf.items()}, metadata={"format": "pt"}))
    write_json(os.path.join(out, "tokenizer.json"), hf_tokenizer_json(tok))
    write_json(os.path.join(out, "tokenizer_config.json"), hf_tokenizer_config(tok, cfg.max_seq_len))
    write_json(os.path.join(out, "generation_config.json"),
                       {"bos_token_id": tok.eot_id, "eos_token_id": [eos], "pad_token_id": tok.pad_id})
    write_json(os.path.join(out, "config.json"), hf_cfg)  # last: a complete directory has it
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
    env = Env(0, 0, 1, torch.device("cpu"))
    source = {"hf": os.path.abspath(hf_dir), "architecture": hc["architectures"][0], "model_type": hc.get("model_type")}
    save_checkpoint(out, model, None, env, stage="hf-import", step=0, train_config=train_config or {},
                            trainer_state={}, tokenizer_path=tok_path, extra_config={"source": source})
    summary = (f"imported {hf_dir} ({hc['architectures'][0]}: {cfg.n_layer} layers, d_model {cfg.d_model}, "
               f"{cfg.n_head} heads ({cfg.n_kv_head} kv), context {cfg.max_seq_len}, "
               f"{model.num_params() / 1e6:.2f}M parameters) to {out}; vocabulary {tok.vocab_size} "
               f"(Hugging Face: {hf[emb_name].shape[0]} embedding rows)")
    return [summary] + [f"note: {n}" for n in notes + tok_notes]
