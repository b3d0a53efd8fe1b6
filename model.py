"""The transformer every stage shares: a decoder-only language model in plain PyTorch.

Llama-style by default (Touvron et al. 2023): RMSNorm before each sublayer, rotary
position embeddings (Su et al. 2021), SwiGLU feed-forward (Shazeer 2020), grouped-query
attention (Ainslie et al. 2023: `n_kv_head` < `n_head` K/V heads shared by groups of
query heads), no biases. GPT-2-style flags (LayerNorm with bias, learned positions, GELU
MLP, tied embeddings) select the other family, so either kind of published checkpoint
maps onto this file.

Also here: explicit weight init, presets, parameter and FLOP counts (for MFU), a KV
cache, and batched `generate()` over left-padded prompts (what PPO rollouts need).
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # < n_head: grouped-query attention; == n_head: multi-head
    d_model: int = 256
    d_ff: int = 0  # 0: derived (SwiGLU: 8/3 d rounded up to 64; GELU: 4 d)
    max_seq_len: int = 256
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # swiglu | gelu
    pos_emb: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    bias: bool = False
    qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2); `bias` puts them everywhere
    tie_embeddings: bool = False
    dropout: float = 0.0
    init_std: float = 0.02
    attn_impl: str = "auto"  # auto | sdpa | eager | triton (auto: triton on CUDA when available, else sdpa)
    ce_impl: str = "auto"  # auto | torch: the lm-head loss by fused_kernels (Triton on CUDA) or plain PyTorch

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if (self.d_model // self.n_head) % 2 and self.pos_emb == "rope":
            raise ValueError("rotary embeddings need an even head dimension")
        for name, allowed in (("norm", ("rmsnorm", "layernorm")), ("mlp", ("swiglu", "gelu")),
                              ("pos_emb", ("rope", "learned")), ("attn_impl", ("auto", "sdpa", "eager", "triton")),
                              ("ce_impl", ("auto", "torch"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.d_ff == 0:
            if self.mlp == "swiglu":  # same parameter count as a 4d GELU MLP, rounded for matmuls
                self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
            else:
                self.d_ff = 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)


# Sizes only; the vocabulary always comes from the tokenizer of the data.
PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_kv_head=2, d_model=256, max_seq_len=256),  # CPU default, ~5M params
    "gpt2-124m": dict(n_layer=12, n_head=12, n_kv_head=12, d_model=768, max_seq_len=1024),
    "350m": dict(n_layer=24, n_head=16, n_kv_head=4, d_model=1024, max_seq_len=1024),
}


# ----------------------------------------------------------------------------- layers

def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 -> fp32; fp64 stays fp64 so reference tests stay exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # statistics in fp32 even under bf16 autocast: a sum of squares overflows bf16 precision
        xf = upcast(x)
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim // 2), in fp32."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) by position-dependent angles. x: (B, H, T, D);
    cos/sin: (B, 1, T, D/2) gathered at each token's position."""
    x1, x2 = upcast(x).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer for a batch, filled left to right. The buffers are
    allocated at the first write, in the dtype the keys are computed in (bf16 under
    autocast or FSDP mixed precision, whatever the parameters' dtype)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device):
        self.shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.device = device
        self.k = self.v = None
        self.length = 0  # slots filled (same for every row; padding is masked, not skipped)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k is None:
            self.k = torch.zeros(self.shape, device=self.device, dtype=k.dtype)
            self.v = torch.zeros(self.shape, device=self.device, dtype=v.dtype)
        t = k.shape[2]
        self.k[layer, :, :, self.length:self.length + t] = k
        self.v[layer, :, :, self.length:self.length + t] = v
        end = self.length + t
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_rows(self, n: int) -> None:
        """Each row becomes n consecutive copies (row i -> rows i*n .. i*n+n-1): a prompt
        prefilled once, then sampled n times."""
        if n == 1 or self.k is None:
            return
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)
        self.shape = tuple(self.k.shape)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)

    def forward(self, x, rope, mask, layer: int, cache: KVCache | None, impl: str):
        q = rearrange(self.wq(x), "b t (h d) -> b h t d", d=self.cfg.head_dim)
        k = rearrange(self.wk(x), "b t (h d) -> b h t d", d=self.cfg.head_dim)
        v = rearrange(self.wv(x), "b t (h d) -> b h t d", d=self.cfg.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = attention(q, k, v, mask, impl)
        return self.wo(rearrange(y, "b h t d -> b t (h d)"))


def attention(q, k, v, mask, impl: str):
    """q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D). mask: None for plain causal attention
    over the whole sequence, else a boolean (B, 1, Tq, Tk) tensor of allowed keys; for
    impl 'triton' it may instead be an integer (B,) tensor, kv_start: causal attention
    with the keys before kv_start[b] masked (left padding), which the kernel applies
    itself. A pad query (before kv_start) gets zeros from the kernel; under a dense mask
    it attends to itself. Either way the real queries see the same keys."""
    if impl == "triton":
        flash_attention = _kernel("attention", "flash_attention")
        if flash_attention is None:
            raise ValueError("attn_impl='triton' needs fused_kernels/attention.py")
        if mask is not None and mask.dtype == torch.bool:
            raise ValueError("the Triton attention takes kv_start (an integer (B,) tensor), not a dense mask")
        return flash_attention(q, k, v, causal=True, kv_start=mask)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # GQA: K/V head i serves query heads i*g .. i*g+g-1, as copies (contiguous: for a
        # single K/V head repeat returns a stride-0 view, whose matmul gradient rounds differently)
        k, v = (repeat(t, "b h t d -> b (h g) t d", g=groups).contiguous() for t in (k, v))
    if impl == "sdpa":
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if impl != "eager":
        raise ValueError(f"unknown attention implementation {impl!r}")
    # eager: the textbook formula, in fp32 (the reference the tests compare against)
    scores = (upcast(q) @ upcast(k).transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is None:
        Tq, Tk = q.shape[2], k.shape[2]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ upcast(v)).type_as(q)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)  # up (SwiGLU: the gate)
        if self.swiglu:
            self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)  # SwiGLU: the value
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)  # down

    def forward(self, x):
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, layer: int, cache: KVCache | None = None, impl: str = "sdpa"):
        x = x + self.dropout(self.attn(self.norm1(x), rope, mask, layer, cache, impl))
        return x + self.dropout(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------- model

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.grad_checkpointing = False
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """GPT-2 init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 L)
        so the residual stream's variance does not grow with depth; norms 1, biases 0."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p) if name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                    or name.endswith("norm_f.weight") else nn.init.zeros_(p)
            elif name.endswith("wo.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)
        self.init_rope()

    @torch.no_grad()
    def init_rope(self):
        """(Re)compute the rotary tables: they are buffers, not weights, so a model built
        on the meta device and then loaded from a checkpoint needs this."""
        cos, sin = rope_tables(self.cfg, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    # -- counting
    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.tok_emb.weight.numel() if not self.cfg.tie_embeddings else 0
            n -= self.pos_emb.weight.numel() if self.pos_emb is not None else 0
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix B:
        6 per weight that takes part in a matmul (the lm head included, the embedding
        lookup not), plus 12 L d T for the attention scores and their weighted sum."""
        cfg = self.cfg
        matmul_params = self.num_params(exclude_embedding=True)
        return 6 * matmul_params + 12 * cfg.n_layer * cfg.d_model * seq_len

    # -- forward
    def _resolved_impl(self, device) -> str:
        impl = self.cfg.attn_impl
        if impl == "auto":
            usable = _kernel("attention", "triton_usable")  # triton installed and a CUDA device
            impl = "triton" if usable is not None and usable(device) else "sdpa"
        return impl

    def hidden_states(self, idx: torch.Tensor, kv_start: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d) for token ids idx (B, T).

        kv_start (B,): number of left-padding tokens per row; those keys are masked and
        positions count from the first real token, so a left-padded row computes exactly
        what the unpadded row would. With a cache, idx continues the cached sequence.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {past + T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        device = idx.device
        slots = torch.arange(past, past + T, device=device)
        impl = self._resolved_impl(device)
        if kv_start is None:
            positions = slots.unsqueeze(0).expand(B, T)
            # plain causal attention needs no mask, except a query block after a cache
            mask = None if past == 0 else (
                torch.arange(past + T, device=device)[None, :] <= slots[:, None])[None, None].expand(B, 1, T, past + T)
        else:
            kv_start = kv_start.to(device)
            positions = (slots[None, :] - kv_start[:, None]).clamp(min=0)
            if impl == "triton" and past == 0:
                mask = kv_start  # the kernel masks the padding itself: no (B, T, T) mask
            else:
                keys = torch.arange(past + T, device=device)
                allowed = (keys[None, None, :] <= slots[None, :, None]) & (keys[None, None, :] >= kv_start[:, None, None])
                allowed |= keys[None, None, :] == slots[None, :, None]  # a pad query sees itself: no empty softmax
                mask = allowed[:, None]
        if impl == "triton" and mask is not None and mask.dtype == torch.bool:
            impl = "sdpa"  # decoding after a cache (a query block offset into the keys) stays on PyTorch
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
            rope = None
        else:
            rope = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])
        for layer, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, mask, layer, cache, impl, use_reentrant=False)
            else:
                x = block(x, rope, mask, layer, cache, impl)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

    def forward(self, idx, targets=None, kv_start=None, cache=None, reduction: str = "mean", last_only: bool = False,
                temperature: float = 1.0, return_entropy: bool = False):
        """Logits (B, T, V) when targets is None (only the last position's (B, V) with
        last_only); else the cross-entropy loss (mean over non-ignored targets, or per
        token with reduction="none": minus the log-probs RM and PPO need). temperature
        divides the logits first, as sampling does; return_entropy adds the per-token
        entropy of that distribution (no gradient). Everything goes through forward():
        under FSDP it is the call that gathers the sharded weights."""
        h = self.hidden_states(idx, kv_start, cache)
        if targets is not None:
            return lm_loss(h, self.lm_head.weight, targets, reduction, temperature, return_entropy,
                           impl=self.cfg.ce_impl)
        return self.lm_head(h[:, -1] if last_only else h)

    # -- generation
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, pad_id: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens=(),
                 generator=None, min_width: int = 0, num_samples: int = 1) -> list[list[int]]:
        """Sample continuations for a batch of prompts (token id lists, any lengths).

        Prompts are left-padded into one batch; the KV cache makes each step cost one
        token per row. temperature 0 is greedy. A row stops after its first stop token
        (included in its output); the batch stops when every row has. Under torch.distributed
        every rank keeps stepping until all ranks are done, since each forward of a
        sharded model is a collective (docs/design.md: generation under FSDP).
        generator: one torch.Generator for the batch, or a list with one per row (then a
        row's sample depends only on its own generator, not on which rows share its batch).
        min_width: left-pad prompts to at least this many tokens (PPO pads every rank alike).
        num_samples: continuations per prompt (PPO's groups). Each prompt is prefilled once
        and its cache copied, so a group costs one prompt pass; the result has
        len(prompts) * num_samples rows, prompt i's samples at i*n .. i*n+n-1, and a list of
        generators then has one per output row.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one non-empty prompt")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        device = self.tok_emb.weight.device
        B, T0 = len(prompts), max(min_width, max(len(p) for p in prompts))
        total = min(T0 + max_new_tokens, self.cfg.max_seq_len)
        if total <= T0:
            raise ValueError(f"prompt of {T0} tokens leaves no room under max_seq_len {self.cfg.max_seq_len}")
        idx = torch.full((B, T0), pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            idx[i, T0 - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        kv_start = torch.tensor([T0 - len(p) for p in prompts], dtype=torch.long, device=device)
        cache = KVCache(self.cfg, B, total, device)
        logits = self(idx, kv_start=kv_start, cache=cache, last_only=True)
        if num_samples > 1:  # the prompt pass is shared by its group; the samples part here
            cache.repeat_rows(num_samples)
            logits, kv_start = logits.repeat_interleave(num_samples, 0), kv_start.repeat_interleave(num_samples, 0)
            B *= num_samples
        stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out = torch.full((B, total - T0), pad_id, dtype=torch.long, device=device)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        for t in range(total - T0):
            nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, t] = nxt
            if len(stop):
                done |= torch.isin(nxt, stop)
            finished = done.all()
            if distributed:
                flag = (~finished).to(torch.int32)
                torch.distributed.all_reduce(flag)  # sum of "still running" over ranks
                finished = flag == 0
            if bool(finished) or t == total - T0 - 1:
                break
            logits = self(nxt[:, None], kv_start=kv_start, cache=cache, last_only=True)
        results = []
        for row in out.tolist():
            for j, tok in enumerate(row):
                if tok in stop_tokens:  # what follows a stop token is padding
                    row = row[: j + 1]
                    break
            results.append(row)
        return results


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator=None) -> torch.Tensor:
    """One token per row from logits (B, V): greedy at temperature 0, else top-k then
    nucleus (top-p) filtering of the tempered distribution. generator: one for the
    batch, or a list of one per row."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the token that crosses p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if isinstance(generator, (list, tuple)):
        if len(generator) != len(probs):
            raise ValueError(f"{len(generator)} generators for {len(probs)} rows")
        return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@functools.lru_cache(maxsize=None)
def _kernel(module: str, name: str):
    """fused_kernels.<module>.<name> if the kernels package provides it, else None. Looked up
    once: a failed import retried on every forward would cost a file-system search."""
    try:
        return getattr(importlib.import_module(f"fused_kernels.{module}"), name)
    except (ImportError, AttributeError):
        return None


def lm_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
            temperature: float = 1.0, return_entropy: bool = False, impl: str = "auto"):
    """Cross-entropy of the lm head over hidden states h (..., d) against targets (...).

    Uses the fused linear cross-entropy kernel when fused_kernels/ provides it (no (N, V)
    logits in memory), unless impl is "torch" (the model's ce_impl: a switch that keeps
    the Triton kernel out of a first GPU run); otherwise this plain reference: logits in
    fp32, then the loss.
    Targets of -100 are ignored (their loss and entropy are 0); a batch with every target
    ignored gives 0, not NaN. Logits are divided by temperature (scaling h is the same
    thing). With return_entropy the result is (loss, entropy) where entropy (...) is per
    token and carries no gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    fused_linear_cross_entropy = None if impl == "torch" else _kernel("cross_entropy", "fused_linear_cross_entropy")
    x = h.reshape(-1, h.shape[-1])
    if temperature != 1.0:
        x = x / temperature
    t = targets.reshape(-1)
    # Rows with an ignored target (the prompt in SFT, all but the response in PPO: most of
    # the rows there) would cost a full lm-head matmul each for a loss of 0: drop them.
    # Only on the CPU, where it is measured (BENCHMARKS.md); on CUDA, counting the rows is a
    # host sync inside every forward, a trade not yet measured there.
    rows, compact = None, False
    if x.device.type == "cpu":
        rows = (t != -100).nonzero().squeeze(1)
        compact = 0 < len(rows) < len(t)
    if compact:
        x, t = x.index_select(0, rows), t.index_select(0, rows)
    if fused_linear_cross_entropy is not None:
        out = fused_linear_cross_entropy(x, weight, t, ignore_index=-100, reduction=reduction,
                                         return_entropy=return_entropy)
        out, entropy = out if return_entropy else (out, None)
    else:
        logits = upcast(x @ weight.t())
        per_token = F.cross_entropy(logits, t, ignore_index=-100, reduction="none")
        entropy = None
        if return_entropy:
            with torch.no_grad():
                logp = logits.log_softmax(dim=-1)
                entropy = -(logp.exp() * logp).sum(dim=-1)
        if reduction == "none":
            out = per_token
        elif reduction == "sum":
            out = per_token.sum()
        else:
            out = per_token.sum() / (t != -100).sum().clamp(min=1)
    if compact and reduction == "none":
        out = out.new_zeros(targets.numel()).index_copy(0, rows, out)
    if compact and entropy is not None:
        entropy = entropy.new_zeros(targets.numel()).index_copy(0, rows, entropy)
    elif entropy is not None:
        entropy = entropy.masked_fill(t == -100, 0.0)
    if reduction == "none":
        out = out.view(targets.shape)
    return (out, entropy.view(targets.shape)) if return_entropy else out


class ScalarHeadModel(Transformer):
    """The transformer plus a scalar head: the reward model (and PPO's critic).

    The score of a sequence is the head applied to the final hidden state of one token,
    the last of the response (its <|end|>), so it has read the prompt and the whole
    response. The language-model head is kept (unused) so the weights stay a complete
    checkpoint of the trunk; the state dict is the Transformer's plus `score_head.*`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.score_head = nn.Linear(cfg.d_model, 1)
        self.init_score_head()
        if not cfg.tie_embeddings:  # unused here: frozen, so the optimizer holds no (empty) state for it
            self.lm_head.weight.requires_grad_(False)

    @torch.no_grad()
    def init_score_head(self):
        # small, as in the InstructGPT/TRL reward models: scores start near 0 for every input
        nn.init.normal_(self.score_head.weight, 0.0, 1.0 / math.sqrt(self.cfg.d_model + 1))
        nn.init.zeros_(self.score_head.bias)

    def score(self, idx: torch.Tensor, last_index: torch.Tensor, kv_start: torch.Tensor | None = None) -> torch.Tensor:
        """Scores (B,) read at position last_index[b] of each row of idx (B, T): the reward.
        Right padding: last_index = length - 1. Left padding: last_index = T - 1 and
        kv_start = the number of pad tokens, so padding never changes a score."""
        h = self.hidden_states(idx, kv_start)
        rows = torch.arange(idx.shape[0], device=idx.device)
        return self.score_head(h[rows, last_index.to(idx.device)]).squeeze(-1).float()

    def values(self, idx: torch.Tensor, kv_start: torch.Tensor | None = None) -> torch.Tensor:
        """The head at every position (B, T): PPO's per-token values."""
        return self.score_head(self.hidden_states(idx, kv_start)).squeeze(-1).float()

    # forward stays the language model's. Under FSDP2 these two are registered as forward
    # methods (distributed.prepare_model), so calling them gathers the sharded weights too.
    FORWARD_METHODS = ("score", "values")
