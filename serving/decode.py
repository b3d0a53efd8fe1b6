"""One decode step for the whole running batch, with the per-step overhead taken out.

`model.Transformer.forward` is written to be read and to train: three projections and two
einops rearranges per attention, a GQA repeat, a mask built from scratch, RMSNorm as seven
elementwise ops. At one token per row that is ~250 small ops a step, each a few
microseconds of dispatch on a CPU — about 1.2 ms of a 4.3 ms step for the default model,
the rest being the weights read from memory (BENCHMARKS.md, "The decode loop"). This step
computes the same function with fewer ops (the approach of gpt-fast and llama.cpp's fused
graphs, by hand): Q, K and V in one matmul (and SwiGLU's two up-projections in one), rotary
on the query and key heads in one call, grouped-query attention inside SDPA (no copies), and
the padding mask made once per step for every layer. It reads and writes the serving
engine's BatchKVCache through the same `update` the model uses.

In float32 its logits match the model's forward to rounding (the tests compare ids and
log-probs against model.generate). `quantization="int8"` also stores every matmul weight as
int8 with one scale per output channel (symmetric, like llama.cpp's q8_0 but per row), read
by PyTorch's weight-only int8 kernel (its inputs rounded to bfloat16): a quarter of the
bytes per step, which is what bounds a decode step at small batch on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model import RMSNorm, Transformer, upcast

QUANTIZATIONS = ("none", "int8")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, scale per output row): w ~= q * scale, |q| <= 127, symmetric per row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


class Linear:
    """A projection y = x W^T (+ b) as the step runs it: the weight as given, or int8 with
    per-row scales (weight-only). PyTorch's int8 kernel reads its input in blocks of 16 and
    gives wrong results (or crashes) for other widths, so such a layer keeps the int8-rounded
    weight in float and multiplies it the ordinary way: the same numbers, without the speed."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quantization: str):
        self.bias = None if bias is None else bias.detach()
        self.weight = weight.detach()
        if quantization == "int8":
            self.q, scale = quantize_int8(weight)
            self.scale = scale.to(torch.bfloat16)
            self.weight = None if weight.shape[1] % 16 == 0 else self.dequantized().to(weight.dtype)

    def dequantized(self) -> torch.Tensor:
        """The weight the int8 kernel effectively multiplies by, in float32."""
        return self.q.float() * self.scale.float()[:, None]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        # the kernel's fast path takes bfloat16 activations; the rest of the step stays in the
        # model's dtype (PyTorch's CPU attention is several times slower in bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.q, self.scale).to(x.dtype)
        return y if self.bias is None else y + self.bias


def fused(*layers: torch.nn.Linear, quantization: str) -> Linear:
    """Several projections of the same input as one matmul (their outputs side by side)."""
    biases = [layer.bias for layer in layers]
    bias = None if biases[0] is None else torch.cat(biases)
    return Linear(torch.cat([layer.weight for layer in layers]), bias, quantization)


def fast_norm(norm: torch.nn.Module):
    """The norm as one fused op: PyTorch's rms_norm for our RMSNorm in float32/64 (the same
    formula; the module's seven elementwise ops otherwise), LayerNorm as it is."""
    if isinstance(norm, RMSNorm) and norm.weight.dtype in (torch.float32, torch.float64):
        return lambda x: F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps)
    return norm


class DecodeStep:
    """`step(ids, cache)`: the logits (rows, vocab) in float32 for one new token per live row
    of a BatchKVCache (left-padded rows, `cache.kv_start`), appending its keys and values."""

    def __init__(self, model: Transformer, quantization: str = "none"):
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        if quantization == "int8" and model.lm_head.weight.device.type != "cpu":
            raise ValueError("int8 weights use PyTorch's CPU weight-only kernel; serve on CPU")
        cfg = self.cfg = model.cfg
        self.model, self.quantization = model, quantization
        self.heads = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim)
        self.layers = []
        for block in model.blocks:
            attn, mlp = block.attn, block.mlp
            up = fused(mlp.w1, mlp.w3, quantization=quantization) if mlp.swiglu else \
                fused(mlp.w1, quantization=quantization)
            self.layers.append((fast_norm(block.norm1), fused(attn.wq, attn.wk, attn.wv, quantization=quantization),
                                Linear(attn.wo.weight, attn.wo.bias, quantization),
                                fast_norm(block.norm2), up, Linear(mlp.w2.weight, mlp.w2.bias, quantization),
                                mlp.swiglu))
        self.head = Linear(model.lm_head.weight, None, quantization)
        self.norm_f = fast_norm(model.norm_f)

    def apply_to_model(self) -> None:
        """With int8, give the model (which runs the prefill) the weights the step multiplies
        by, so a prompt's keys and values come from the same weights as its decode steps."""
        if self.quantization == "none":
            return
        m = self.model
        for block, (_, qkv, wo, _, up, w2, swiglu) in zip(m.blocks, self.layers):
            targets = [block.attn.wq, block.attn.wk, block.attn.wv, block.attn.wo, block.mlp.w1] + \
                ([block.mlp.w3] if swiglu else []) + [block.mlp.w2]
            weights = [*qkv.dequantized().split(self.heads), wo.dequantized(),
                       *(up.dequantized().chunk(2) if swiglu else [up.dequantized()]), w2.dequantized()]
            for linear, w in zip(targets, weights):
                linear.weight.data = w.to(linear.weight.dtype)
        m.lm_head.weight.data = self.head.dequantized().to(m.lm_head.weight.dtype)

    def _inputs(self, ids: torch.Tensor, cache) -> tuple:
        """Embeddings (B, d), the rotary tables at each row's position as (cos|cos, -sin|sin)
        of shape (B, 1, head_dim), and the padding mask (B, 1, 1, keys)."""
        n, past = ids.shape[0], cache.length
        kv_start = cache.kv_start[:n]
        positions = (past - kv_start).clamp(min=0)
        x = self.model.tok_emb(ids[:, 0])
        if self.model.pos_emb is not None:
            x = x + self.model.pos_emb(positions)
            rope = None
        else:
            cos, sin = self.model.rope_cos[positions][:, None], self.model.rope_sin[positions][:, None]
            rope = (torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1))
        keys = torch.arange(past + 1, device=ids.device)
        mask = (keys[None, :] >= kv_start[:, None])[:, None, None, :]  # each row sees its own tokens only
        return x, rope, mask

    @staticmethod
    def rotate(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor) -> torch.Tensor:
        """model.apply_rope in fewer ops, to the bit: with x = (x1, x2), x * (cos, cos) +
        (x2, x1) * (-sin, sin) is (x1 cos - x2 sin, x2 cos + x1 sin) — negating a factor and
        swapping the terms of a sum are exact in floating point."""
        xf = upcast(x)
        return (xf * cos2 + xf.roll(x.shape[-1] // 2, dims=-1) * sin2).type_as(x)

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """ids (B, 1): each live row's newest token; the cache holds rows 0..B-1. With one
        token per row, (B, heads, 1, D) and (B, heads, D) are the same memory: no transposes."""
        nq, nk, _ = self.heads
        b, d = ids.shape[0], self.cfg.head_dim
        x, rope, mask = self._inputs(ids, cache)
        for layer, (norm1, qkv, wo, norm2, up, w2, swiglu) in enumerate(self.layers):
            out = qkv(norm1(x))  # (B, q | k | v): the query and key heads side by side, one rotary call
            qk, v = out[:, :nq + nk].view(b, (nq + nk) // d, d), out[:, nq + nk:].view(b, nk // d, 1, d)
            if rope is not None:
                qk = self.rotate(qk, *rope)
            q, k = qk[:, :nq // d, None], qk[:, nq // d:, None]
            keys, values = cache.update(layer, k, v)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=nq != nk)
            x = x + wo(y.view(b, nq))
            h = up(norm2(x))
            if swiglu:
                gate, value = h.chunk(2, dim=-1)
                h = F.silu(gate) * value
            else:
                h = F.gelu(h, approximate="tanh")
            x = x + w2(h)
        cache.length += 1
        return self.head(self.norm_f(x)).float()
