"""Fused linear cross-entropy: the lm-head matmul and the loss, chunk by chunk of rows.

    fused_linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean",
                               z_loss=0.0, return_entropy=False, *, chunk_size=None,
                               backend="auto")

x (N, D) hidden states, weight (V, D) the lm head, targets (N,) class ids. The result
equals F.cross_entropy((x @ weight.T).float(), targets, ignore_index, reduction) without
the (N, V) logits ever existing at once: only one chunk of rows of them, reused (one
exception, on the CPU only: reduction "none" with gradients, below).

Per row i with target t_i != ignore_index and lse_i = logsumexp_j(logit_ij):
    loss_i = lse_i - logit_i,t_i + z_loss * lse_i**2      (the z-loss term is part of loss_i)
and loss_i = 0 for an ignored row. reduction "none" returns these (N,) (minus the
log-probs that the reward model and PPO stages need; temperature is applied by scaling
x), "sum" their sum, "mean" their sum / max(number of non-ignored rows, 1), so a batch
with every row ignored gives 0, not NaN. The loss is float32 (float64 for float64
inputs) whatever the inputs' dtype. With return_entropy the result is (loss, entropy),
entropy (N,) the entropy of softmax(logits_i) for every row, detached.

Per chunk of rows: logits = x_c @ W^T (a cuBLAS / BLAS matmul, fp32 accumulation),
then one pass over the vocabulary computes the running max, sum of exponentials and the
entropy accumulator (online, like flash attention's softmax), and, when gradients are
wanted, a second pass overwrites the logits with dloss/dlogits = softmax * (1 + 2 z lse)
- onehot(target) (zero for ignored rows). Then grad_x_c = G @ W and grad_W += G^T x_c,
the latter accumulated in fp32 across chunks (bf16 accumulation drifts: Liger #512).
On CUDA that pass is a Triton kernel (one program per row); on the CPU the same steps
are PyTorch ops (or the Triton kernel again, interpreted, under TRITON_INTERPRET=1). For mean/sum the gradients are computed during the forward and only
scaled by grad_output in the backward (no second pass over the vocabulary). For
reduction "none" the backward needs per-row scales: on CUDA it recomputes each chunk's
logits (one extra matmul) rather than keep them; on the CPU, where time and not memory
is short, it keeps each chunk's dlogits from the forward (as much memory as the plain
x @ W.T path holds for its backward; CPU_KEEPS_DLOGITS).

Chunk size (`_chunk_rows`): on CUDA max(N*D/V, 1024) rows, on the CPU 2^23 logits; so at
most max(N*D, 1024*V) logits (CUDA) or 2^23 (CPU) exist at a time, and a batch smaller
than one chunk is done in one. Results do not depend on the chunk size beyond float
round-off, and are deterministic for a given size. Under autocast the matmuls
run in the autocast dtype, as `x @ weight.T` would.
See fused_kernels/__init__.py for how the backend is chosen (TRITON_INTERPRET=1 runs the
Triton kernel on CPU tensors through Triton's interpreter).
"""
from __future__ import annotations

import torch
from einops import einsum

from fused_kernels import HAS_TRITON, kernel_pair, launch, select_backend

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = tl = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCTIONS = ("mean", "sum", "none")
CPU_CHUNK_LOGITS = 1 << 23  # logits per chunk on the CPU (32 MB in fp32; see BENCHMARKS.md)
INTERPRET_BLOCK_V = 32  # small so that tests with V ~ 100 span several blocks
CPU_KEEPS_DLOGITS = True  # reduction "none" on the CPU: keep dlogits chunks instead of recomputing


# ----------------------------------------------------------------------------- kernel

def _ce_rows(LOGITS, stride_row, TARGETS, LOSS, ENTROPY, SCALE, V, ignore_index, z_loss,
             WRITE_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_V: tl.constexpr):
    """One program per row of the logits chunk: loss, entropy and (WRITE_GRAD) the
    gradient of the loss w.r.t. the logits, written over the logits, times SCALE[row]."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    offs = tl.arange(0, BLOCK_V)
    # pass 1: m = running max, s = sum exp(l - m), w = sum exp(l - m) * (l - m)
    m = float("-inf")
    s = 0.0
    w = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        ok = cols < V
        x = tl.load(ptr + cols, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        d = tl.where(ok, x - m_new, 0.0)
        # the old terms' (l - m) shift by (m - m_new); s == 0 guards -inf * 0 on the first block
        w = alpha * (w + tl.where(s > 0.0, m - m_new, 0.0) * s) + tl.sum(e * d, 0)
        s = alpha * s + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - w / s  # -sum p log p = log s - sum p (l - m)
    valid = target != ignore_index
    x_t = tl.load(ptr + target, mask=valid, other=0.0).to(tl.float32)
    loss = tl.where(valid, lse - x_t + z_loss * lse * lse, 0.0)
    tl.store(LOSS + row, loss)
    tl.store(ENTROPY + row, entropy)
    if WRITE_GRAD:
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(SCALE + row).to(tl.float32)
        scale = tl.where(valid, scale, 0.0)
        coef = scale * (1.0 + 2.0 * z_loss * lse)
        # pass 2: dloss/dlogit_j = p_j (1 + 2 z lse) - [j == target], times the row's scale
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            ok = cols < V
            x = tl.load(ptr + cols, mask=ok, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) * coef
            g = tl.where(cols == target, g - scale, g)
            tl.store(ptr + cols, g.to(LOGITS.dtype.element_ty), mask=ok)


_CE_ROWS = kernel_pair(_ce_rows)


def _triton_rows(logits, targets, loss, entropy, scale, ignore_index, z_loss, write_grad, interpret):
    rows, V = logits.shape
    if interpret:
        block, warps = INTERPRET_BLOCK_V, 4
    else:
        block = min(triton.next_power_of_2(V), 4096)  # the row is streamed in blocks of this many
        warps = 4 if block <= 1024 else 8
    launch(_CE_ROWS, interpret, (rows,), logits, logits.stride(0), targets, loss, entropy,
           scale if scale is not None else loss, V, ignore_index, float(z_loss),
           WRITE_GRAD=write_grad, HAS_SCALE=scale is not None, BLOCK_V=block, num_warps=warps)


def _torch_rows(logits, work, targets, loss, entropy, scale, ignore_index, z_loss, write_grad):
    """The kernel's computation in PyTorch; overwrites logits with the gradient if asked.
    work: a buffer like logits in the accumulation dtype (written with the log-probs).
    Everything lands in preallocated buffers: on the CPU a fresh (rows, V) tensor per
    step costs more in page faults than the arithmetic."""
    acc = work.dtype
    lf = logits if logits.dtype == acc else logits.to(acc)
    logp = torch.ops.aten._log_softmax.out(lf, -1, False, out=work)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp_t = logp.gather(1, safe[:, None]).squeeze(1)
    per_row = -logp_t
    lse = None
    if z_loss:
        lse = lf.gather(1, safe[:, None]).squeeze(1) - logp_t  # logp_j = l_j - lse
        per_row = per_row + z_loss * lse * lse
    loss.copy_(torch.where(valid, per_row, torch.zeros_like(per_row)))
    if entropy is None and not write_grad:
        return
    p = torch.exp(logp, out=lf)  # lf (the logits or their upcast copy) is ours to overwrite
    if entropy is not None:
        entropy.copy_(-einsum(p, logp, "n v, n v -> n"))  # a batched matmul: no (rows, V) product
    if write_grad:
        s = valid.to(acc) if scale is None else torch.where(valid, scale.to(acc), torch.zeros((), dtype=acc))
        coef = s * (1.0 + 2.0 * z_loss * lse) if z_loss else s
        p.mul_(coef[:, None])  # softmax * (1 + 2 z lse) * scale, 0 for ignored rows
        rows = torch.arange(len(targets), device=p.device)
        p.index_put_((rows, safe), -s, accumulate=True)  # minus the one-hot target
        if p is not logits:
            logits.copy_(p)


# ----------------------------------------------------------------------------- driver

_ADDMM_OUT_DTYPE_OK: dict = {}  # device -> whether torch.addmm(..., out_dtype=float32, out=acc) works there


def _addmm_out_dtype_ok(acc: torch.Tensor, a: torch.Tensor) -> bool:
    """Check once per device, on a small product, that cuBLAS accumulates bf16/fp16
    products into an fp32 `out` that is also the added matrix (torch >= 2.8)."""
    key = (acc.device, a.dtype)
    if key not in _ADDMM_OUT_DTYPE_OK:
        g = torch.Generator(device=acc.device).manual_seed(0)
        x = torch.randn(32, 16, device=acc.device, generator=g).to(a.dtype)
        y = torch.randn(16, 24, device=acc.device, generator=g).to(a.dtype)
        c = torch.randn(32, 24, device=acc.device, generator=g, dtype=acc.dtype)
        want = c + x.to(acc.dtype) @ y.to(acc.dtype)
        try:
            torch.addmm(c, x, y, out_dtype=acc.dtype, out=c)
            ok = bool(torch.allclose(c, want, atol=1e-3, rtol=1e-3))
        except (RuntimeError, TypeError):
            ok = False
        _ADDMM_OUT_DTYPE_OK[key] = ok
    return _ADDMM_OUT_DTYPE_OK[key]


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    """acc (fp32 or fp64) += a @ b, with a, b possibly bf16/fp16: the products are
    accumulated in acc's precision, never rounded to the inputs' dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda and _addmm_out_dtype_ok(acc, a):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # bf16 tensor cores, fp32 accumulator
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunk_rows(N: int, V: int, D: int, device) -> int:
    """Rows per chunk. CUDA: N*D/V rows (Liger's choice: the logits chunk is the size of
    x) but at least 1024, since every chunk also reads and writes the whole fp32 weight
    gradient (V x D), which a few hundred rows of matmul cannot hide when D is small.
    CPU: CPU_CHUNK_LOGITS logits (a bigger chunk is faster there; see BENCHMARKS.md)."""
    if device.type == "cuda":
        return max(1024, -(-N * D // V))
    return max(1, CPU_CHUNK_LOGITS // V)


def _run(x, w, targets, ignore_index, z_loss, want_entropy, grad_x, grad_w, scale, chunk, how, acc_dtype,
         keep: list | None = None):
    """The chunk loop. Returns (loss, entropy, gx, gw); gx/gw are computed when grad_x /
    grad_w (and multiplied row-wise by scale when given). With `keep` (a list), each
    chunk's unscaled dloss/dlogits is appended to it instead of being multiplied out."""
    N, D = x.shape
    V = w.shape[0]
    dev = x.device
    out_dtype = acc_dtype
    loss = torch.empty(N, device=dev, dtype=out_dtype)
    entropy = torch.empty(N, device=dev, dtype=out_dtype) if (want_entropy or how != "torch") else None
    gx = torch.empty_like(x) if grad_x else None
    gw = torch.zeros(V, D, device=dev, dtype=acc_dtype) if grad_w else None
    write_grad = grad_x or grad_w or keep is not None
    buf = work = None
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        xc = x[start:end]
        if buf is None or keep is not None:  # else one buffer for every chunk (the last uses its first rows)
            buf = torch.empty(end - start, V, device=dev, dtype=x.dtype)
        if work is None and how == "torch":
            work = torch.empty(end - start, V, device=dev, dtype=acc_dtype)
        logits = torch.mm(xc, w.t(), out=buf[:end - start])
        sc = scale[start:end] if scale is not None else None
        ent = entropy[start:end] if entropy is not None else None
        if how == "torch":
            _torch_rows(logits, work[:end - start], targets[start:end], loss[start:end], ent, sc, ignore_index,
                        z_loss, write_grad)
        else:
            _triton_rows(logits, targets[start:end], loss[start:end], ent, sc, ignore_index, z_loss,
                         write_grad, how == "interpret")
        if keep is not None:
            keep.append(logits)
            continue
        if grad_x:
            torch.mm(logits, w, out=gx[start:end])
        if grad_w:
            _accumulate_fp32(gw, logits.t(), xc)
    return loss, (entropy if want_entropy else None), gx, gw


class _FusedLinearCE(torch.autograd.Function):
    """x and weight come in their own dtypes and are cast to the compute dtype inside, so
    the weight gradient reaches an fp32 weight (autocast) from the fp32 accumulator
    directly, not through a round trip to bf16."""

    @staticmethod
    def forward(ctx, x, w, targets, ignore_index, reduction, z_loss, want_entropy, chunk, how, compute, acc_dtype):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        eager = reduction != "none"  # mean/sum: the gradients now, only scaled in backward
        # reduction none on the CPU: keep each chunk's dlogits for the backward (memory is
        # not what is short there, and recomputing the logits would cost a fourth matmul)
        keep = [] if (reduction == "none" and how == "torch" and x.device.type == "cpu" and CPU_KEEPS_DLOGITS
                      and (need_x or need_w)) else None
        loss, entropy, gx, gw = _run(_as(x, compute), _as(w, compute), targets, ignore_index, z_loss, want_entropy,
                                     eager and need_x, eager and need_w, None, chunk, how, acc_dtype, keep)
        ctx.reduction = reduction
        ctx.params = (ignore_index, z_loss, chunk, how, compute, acc_dtype, x.dtype, w.dtype)
        ctx.kept = keep is not None
        if reduction == "none":
            ctx.save_for_backward(x, w, targets, *(keep or ()))
            out = loss
        else:
            count = (targets != ignore_index).sum()
            ctx.save_for_backward(gx, gw, count)
            out = loss.sum()
            if reduction == "mean":
                out = out / count.clamp(min=1).to(out.dtype)
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
            return out, entropy
        return out

    @staticmethod
    def backward(ctx, grad_out, *_):
        ignore_index, z_loss, chunk, how, compute, acc_dtype, x_dtype, w_dtype = ctx.params
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.reduction == "none" and ctx.kept:
            x, w, targets, *kept = ctx.saved_tensors
            gx, gw = _kept_backward(kept, _as(x, compute), _as(w, compute), grad_out, need_x, need_w, acc_dtype)
        elif ctx.reduction == "none":  # per-row scales: recompute each chunk with them
            x, w, targets = ctx.saved_tensors
            with torch.autocast(x.device.type, enabled=False):
                _, _, gx, gw = _run(_as(x, compute), _as(w, compute), targets, ignore_index, z_loss, False,
                                    need_x, need_w, grad_out.to(acc_dtype).contiguous(), chunk, how, acc_dtype)
        else:
            gx, gw, count = ctx.saved_tensors
            s = grad_out.to(acc_dtype)
            if ctx.reduction == "mean":
                s = s / count.clamp(min=1).to(acc_dtype)
            gx = gx * s.to(gx.dtype) if need_x else None
            gw = gw * s if need_w else None
        gx = gx.to(x_dtype) if gx is not None else None
        gw = gw.to(w_dtype) if gw is not None else None
        return gx, gw, None, None, None, None, None, None, None, None, None


def _kept_backward(kept, x, w, grad_out, need_x, need_w, acc_dtype):
    """gx, gw from the kept chunks of dloss/dlogits, each row scaled by grad_out."""
    gx = torch.empty_like(x) if need_x else None
    gw = torch.zeros(w.shape, device=w.device, dtype=acc_dtype) if need_w else None
    start = 0
    for g in kept:
        end = start + g.shape[0]
        g = g * grad_out[start:end, None].to(g.dtype)  # not in place: a second backward sees the same
        if need_x:
            torch.mm(g, w, out=gx[start:end])
        if need_w:
            _accumulate_fp32(gw, g.t(), x[start:end])
        start = end
    return gx, gw


def _as(t: torch.Tensor, dtype) -> torch.Tensor:
    t = t if t.dtype == dtype else t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _check(x, weight, targets, ignore_index, reduction, z_loss, chunk_size):
    if reduction not in REDUCTIONS:
        raise ValueError(f"fused_linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for name, t in (("x", x), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"fused_linear_cross_entropy: {name} must be a tensor, got {type(t).__name__}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"fused_linear_cross_entropy: x must be (N, D) and weight (V, D), got "
                         f"{tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: x has {x.shape[1]} features, weight {weight.shape[1]}")
    if targets.dim() != 1 or targets.shape[0] != x.shape[0]:
        raise ValueError(f"fused_linear_cross_entropy: targets must have shape ({x.shape[0]},), "
                         f"got {tuple(targets.shape)}")
    if not x.is_floating_point() or not weight.is_floating_point():
        raise ValueError(f"fused_linear_cross_entropy: x and weight must be floating point, got "
                         f"{x.dtype} and {weight.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"fused_linear_cross_entropy: targets must be integer class ids, got {targets.dtype}")
    if not (x.device == weight.device == targets.device):
        raise ValueError(f"fused_linear_cross_entropy: x, weight, targets on different devices "
                         f"({x.device}, {weight.device}, {targets.device})")
    if weight.shape[0] == 0:
        raise ValueError("fused_linear_cross_entropy: weight has no rows (empty vocabulary)")
    if not z_loss >= 0:
        raise ValueError(f"fused_linear_cross_entropy: z_loss must be >= 0, got {z_loss}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"fused_linear_cross_entropy: targets outside [0, {weight.shape[0]}) "
                             f"(and not ignore_index {ignore_index})")


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = -100, reduction: str = "mean", z_loss: float = 0.0,
                               return_entropy: bool = False, *, chunk_size: int | None = None,
                               backend: str = "auto"):
    """Cross-entropy of softmax(x @ weight.T) against targets, chunked (module docstring).

    Returns the loss (a scalar for mean/sum, (N,) for none; float32, float64 for float64
    inputs), or (loss, entropy) with return_entropy. chunk_size: rows per chunk (default
    by device). backend: 'auto' | 'triton' | 'torch' (fused_kernels/__init__.py)."""
    _check(x, weight, targets, ignore_index, reduction, z_loss, chunk_size)
    dev = x.device
    compute = torch.promote_types(x.dtype, weight.dtype)
    if torch.is_autocast_enabled(dev.type) and compute != torch.float64:
        compute = torch.get_autocast_dtype(dev.type)  # what x @ weight.T would run in
    acc_dtype = torch.promote_types(compute, torch.float32)
    how = select_backend(dev, backend, "fused_linear_cross_entropy", kernel_dtypes_ok=compute in KERNEL_DTYPES)
    N, D = x.shape
    chunk = chunk_size or _chunk_rows(N, weight.shape[0], D, dev)
    targets = targets.contiguous()
    with torch.autocast(dev.type, enabled=False):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _FusedLinearCE.apply(x, weight, targets, ignore_index, reduction, float(z_loss),
                                        return_entropy, chunk, how, compute, acc_dtype)
        loss, entropy, _, _ = _run(_as(x, compute), _as(weight, compute), targets, ignore_index, float(z_loss),
                                   return_entropy, False, False, None, chunk, how, acc_dtype)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / (targets != ignore_index).sum().clamp(min=1).to(loss.dtype)
    return (loss, entropy) if return_entropy else loss
