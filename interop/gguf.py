"""Our Llama-style checkpoints -> one GGUF file for llama.cpp (`python convert.py to-gguf`).

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

import os

import torch

from data.text.hf_tokenizer import CHAT_TEMPLATE, hf_tokenizer_json
from data.text.tokenizer import GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, Tokenizer
from interop.weights import BASE_STAGES, ConvertError, family_of, read_ours
from model import ModelConfig

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
    if family_of(cfg) != "llama" or cfg.bias or cfg.qkv_bias:
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
