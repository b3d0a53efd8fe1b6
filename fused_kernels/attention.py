"""Flash attention (FlashAttention-2, Dao 2023) in Triton, with a plain-PyTorch reference.

    flash_attention(q, k, v, causal=True, sm_scale=None, kv_start=None, *, backend="auto")

q: (B, H, T, D); k, v: (B, H_kv, T, D) with H % H_kv == 0. Query head h reads K/V head
h // (H / H_kv) (grouped-query attention), straight from the K/V tensors: nothing is
repeated in memory. kv_start: optional integer (B,) tensor; keys before kv_start[b] are
masked in row b (left padding: PPO rollouts, reward-model batches). A query that sees no
key at all (causal, before kv_start) gets an output of zeros and passes no gradient.
sm_scale defaults to 1/sqrt(D). Returns (B, H, T, D) in q's dtype.

The algorithm (what the kernels below do):

- forward, one program per (block of BLOCK_M queries, query head): stream K/V blocks,
  keep a running max m and sum l of exp(s - m) per query and rescale the accumulator
  when m grows (online softmax), all in fp32 and in base 2 (exp2 with log2(e) folded
  into the scale). Saves lse = m + log2(l) per query (B*H*T floats), never the T x T
  probabilities. Causal: key blocks right of the diagonal are skipped, not masked;
  masks (causal diagonal, kv_start, the ragged end when T is not a multiple of the
  block) are applied only in the blocks that need them.
- backward, three kernels and no atomics (so the result is bitwise deterministic):
  delta = rowsum(dO * O); then one program per (block of keys, K/V head) recomputes
  P = exp2(S - lse) for every query block and every query head of its group and sums
  dV += P^T dO and dK += dS^T Q in registers (the group sum of GQA included); then one
  program per (block of queries, query head) does dQ += dS K. dS = P * (dP - delta).

Block sizes / warps / stages on CUDA come from a short list per kernel (first that
fits the GPU's shared memory wins; see `_cuda_configs`). They are not tuned on
hardware yet: `python -m bench.kernels --sweep` times the alternatives on a GPU.
The interpreter (TRITON_INTERPRET=1, tests) uses small blocks so that tiny shapes still
span several blocks. See fused_kernels/__init__.py for how the backend is chosen.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange

from fused_kernels import HAS_TRITON, kernel_pair, launch, select_backend

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.runtime.errors import OutOfResources
else:  # pragma: no cover
    triton = tl = None
    OutOfResources = RuntimeError

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def triton_usable(device) -> bool:
    """Whether attn_impl='auto' should pick the Triton kernels for this device."""
    return HAS_TRITON and torch.device(device).type == "cuda"


# ----------------------------------------------------------------------------- kernels
# Written without @triton.jit helpers so each can be built both compiled and
# interpreted (fused_kernels.kernel_pair). Strides are in elements; the last dim is contiguous.

def _attn_fwd(Q, K, V, O, LSE, KV_START,
              stride_qb, stride_qh, stride_qt,
              stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt,
              stride_ob, stride_oh, stride_ot,
              H, T, GROUP, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    hk = h // GROUP
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < T

    q_ptrs = Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh

    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.load(KV_START + b)
    lo = (kv_lo // BLOCK_N) * BLOCK_N  # key blocks entirely before kv_start are skipped
    hi = T
    if CAUSAL:
        hi = tl.minimum((start_m + 1) * BLOCK_M, T)  # ... and so are blocks right of the diagonal
    diag = start_m * BLOCK_M  # the smallest query index of this block

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        # rows past the end are read from row T-1 instead of masked (no predicates on the
        # loads); their scores are masked below, so they carry zero weight
        rows_k = tl.minimum(cols, T - 1)
        if EVEN_D:
            kT = tl.load(k_base + rows_k[None, :] * stride_kt + offs_d[:, None])
        else:
            kT = tl.load(k_base + rows_k[None, :] * stride_kt + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        edge = (start_n + BLOCK_N > T) | (start_n < kv_lo)
        if CAUSAL:
            edge = edge | (start_n + BLOCK_N - 1 > diag)
        if edge:  # only blocks on a boundary pay for the mask
            ok = cols[None, :] < T
            if HAS_KV_START:
                ok = ok & (cols[None, :] >= kv_lo)
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None])
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if EVEN_D:
            v = tl.load(v_base + rows_k[:, None] * stride_vt + offs_d[None, :])
        else:
            v = tl.load(v_base + rows_k[:, None] * stride_vt + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    # lse = +inf for a row that saw no key: the backward then gets P = exp2(S - inf) = 0
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + off_bh.to(tl.int64) * T + offs_m, lse, mask=m_ok)
    o_ptrs = O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _attn_bwd_delta(O, DO, DELTA,
                    stride_ob, stride_oh, stride_ot,
                    stride_dob, stride_doh, stride_dot,
                    H, T,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + off_bh.to(tl.int64) * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)


def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, KV_START,
                   stride_qb, stride_qh, stride_qt,
                   stride_kb, stride_kh, stride_kt,
                   stride_vb, stride_vh, stride_vt,
                   stride_dob, stride_doh, stride_dot,
                   stride_dkb, stride_dkh, stride_dkt,
                   stride_dvb, stride_dvh, stride_dvt,
                   H, H_KV, T, GROUP, qk_scale, sm_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    off_bhk = tl.program_id(1)
    b = off_bhk // H_KV
    hk = off_bhk % H_KV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < T
    kv_mask = n_ok[:, None] & d_ok[None, :]
    # Loads clamp row indices to T-1 instead of masking (no predicates in the loop); the
    # extra rows get zero weight (queries: lse = +inf) or are not stored (keys).
    rows_n = tl.minimum(offs_n, T - 1)
    k_ptrs = K + b.to(tl.int64) * stride_kb + hk * stride_kh + rows_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + b.to(tl.int64) * stride_vb + hk * stride_vh + rows_n[:, None] * stride_vt + offs_d[None, :]
    if EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.load(KV_START + b)
    lo = 0
    if CAUSAL:  # queries before this key block never see it; under causal masking
        # neither do queries before kv_start (they see nothing)
        lo = (tl.maximum(start_n, kv_lo) // BLOCK_M) * BLOCK_M
    hi = T
    if HAS_KV_START:  # a key block wholly before kv_start is masked for every query
        hi = tl.where(start_n + BLOCK_N <= kv_lo, 0, T)

    # Keys at or past T and keys before kv_start get wrong values below; each key row's
    # dK/dV depends only on its own column of P, so they are zeroed or dropped at the end.
    for g in range(0, GROUP):
        off_bh = b * H + hk * GROUP + g
        q_base = Q + b.to(tl.int64) * stride_qb + (hk * GROUP + g) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + (hk * GROUP + g) * stride_doh
        lse_base = LSE + off_bh.to(tl.int64) * T
        delta_base = DELTA + off_bh.to(tl.int64) * T
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            r_ok = rows < T
            rows_c = tl.minimum(rows, T - 1)
            if EVEN_D:
                qT = tl.load(q_base + rows_c[None, :] * stride_qt + offs_d[:, None])
                do = tl.load(do_base + rows_c[:, None] * stride_dot + offs_d[None, :])
            else:
                qT = tl.load(q_base + rows_c[None, :] * stride_qt + offs_d[:, None], mask=d_ok[:, None], other=0.0)
                do = tl.load(do_base + rows_c[:, None] * stride_dot + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + rows, mask=r_ok, other=float("inf"))
            sT = tl.dot(k, qT, input_precision=PRECISION) * qk_scale
            pT = tl.math.exp2(sT - lse[None, :])
            if CAUSAL:
                if start_m < start_n + BLOCK_N - 1:  # the block touches the diagonal
                    pT = tl.where(offs_n[:, None] <= rows[None, :], pT, 0.0)
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
            delta = tl.load(delta_base + rows, mask=r_ok, other=0.0)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=PRECISION)

    dk = dk * sm_scale
    if HAS_KV_START:
        keep = offs_n[:, None] >= kv_lo
        dk = tl.where(keep, dk, 0.0)
        dv = tl.where(keep, dv, 0.0)
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, KV_START,
                 stride_qb, stride_qh, stride_qt,
                 stride_kb, stride_kh, stride_kt,
                 stride_vb, stride_vh, stride_vt,
                 stride_dob, stride_doh, stride_dot,
                 stride_dqb, stride_dqh, stride_dqt,
                 H, T, GROUP, qk_scale, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    b = off_bh // H
    h = off_bh % H
    hk = h // GROUP
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    r_ok = rows < T
    q_mask = r_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + off_bh.to(tl.int64) * T + rows, mask=r_ok, other=float("inf"))
    delta = tl.load(DELTA + off_bh.to(tl.int64) * T + rows, mask=r_ok, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh

    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.load(KV_START + b)
    lo = (kv_lo // BLOCK_N) * BLOCK_N
    hi = T
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, T)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        cols_c = tl.minimum(cols, T - 1)  # clamped, not masked: those scores are masked below
        if EVEN_D:
            kT = tl.load(k_base + cols_c[None, :] * stride_kt + offs_d[:, None])
            vT = tl.load(v_base + cols_c[None, :] * stride_vt + offs_d[:, None])
        else:
            kT = tl.load(k_base + cols_c[None, :] * stride_kt + offs_d[:, None], mask=d_ok[:, None], other=0.0)
            vT = tl.load(v_base + cols_c[None, :] * stride_vt + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        edge = (start_n + BLOCK_N > T) | (start_n < kv_lo)
        if CAUSAL:
            edge = edge | (start_n + BLOCK_N - 1 > start_m)
        if edge:
            ok = cols[None, :] < T
            if HAS_KV_START:
                ok = ok & (cols[None, :] >= kv_lo)
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None])
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=q_mask)


_FWD = kernel_pair(_attn_fwd)
_DELTA = kernel_pair(_attn_bwd_delta)
_DKDV = kernel_pair(_attn_bwd_dkdv)
_DQ = kernel_pair(_attn_bwd_dq)


# ----------------------------------------------------------------------------- launch configs

# (BLOCK_M, BLOCK_N, num_warps, num_stages), in order of preference; the first one the
# GPU can hold is used (a smaller one is tried when Triton reports OutOfResources).
# Not timed on a GPU yet. Chosen by compiling every candidate for sm_90 (H100) with
# Triton 3.9 and reading the cubin's resource usage: each first choice uses wgmma,
# software-pipelined loads and no register spills (the tutorial's own (32, 128, 4, 5)
# for dK/dV spills with our masking, (32, 128, 8, 5) does not).
_CUDA_CONFIGS = {
    # forward: BLOCK_M queries x BLOCK_N keys
    ("fwd", 64): [(128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1)],
    ("fwd", 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1)],
    ("fwd", 256): [(64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 1), (16, 16, 4, 1)],
    # dK/dV: BLOCK_M queries streamed past BLOCK_N keys held in registers
    ("dkdv", 64): [(32, 128, 8, 5), (32, 64, 4, 3), (16, 64, 4, 2), (16, 32, 4, 1)],
    ("dkdv", 128): [(32, 128, 8, 3), (32, 64, 4, 2), (16, 64, 4, 2), (16, 32, 4, 1)],
    ("dkdv", 256): [(32, 64, 8, 2), (16, 32, 4, 1), (16, 16, 4, 1)],
    # dQ: BLOCK_M queries held, BLOCK_N keys streamed
    ("dq", 64): [(128, 32, 4, 5), (64, 32, 4, 3), (64, 16, 4, 2), (32, 16, 4, 1)],
    ("dq", 128): [(128, 32, 8, 3), (64, 32, 4, 3), (64, 16, 4, 2), (32, 16, 4, 1)],
    ("dq", 256): [(64, 32, 8, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
}
# float32 inputs (ieee or tf32 dots, per torch.backends.cuda.matmul.allow_tf32): smaller
# tiles, 8 warps; the bf16 lists above spill registers badly in fp32.
_CUDA_CONFIGS_FP32 = {
    "fwd": [(64, 32, 8, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
    "dkdv": [(32, 64, 8, 2), (16, 32, 4, 2), (16, 16, 4, 1)],
    "dq": [(64, 32, 8, 2), (32, 32, 4, 2), (16, 16, 4, 1)],
}
# Small blocks for the interpreter, unequal so the tests cover BLOCK_M != BLOCK_N.
_INTERPRET_CONFIGS = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}
_DELTA_BLOCK = 64
_chosen: dict = {}  # (kind, head-dim bucket, dtype) -> index of the config that compiled
CONFIG_OVERRIDE: dict = {}  # kind -> (BLOCK_M, BLOCK_N, warps, stages); for bench.kernels --sweep


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _launch(kind: str, interpret: bool, grid_of, args: tuple, const: dict, dtype):
    """Launch one of the three main kernels with the block sizes for this setting."""
    pair = {"fwd": _FWD, "dkdv": _DKDV, "dq": _DQ}[kind]
    if interpret:
        bm, bn = _INTERPRET_CONFIGS[kind]
        launch(pair, True, grid_of(bm, bn), *args, BLOCK_M=bm, BLOCK_N=bn, **const)
        return
    if kind in CONFIG_OVERRIDE:
        bm, bn, warps, stages = CONFIG_OVERRIDE[kind]
        launch(pair, False, grid_of(bm, bn), *args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
               **const)
        return
    bucket = 64 if const["BLOCK_D"] <= 64 else 128 if const["BLOCK_D"] <= 128 else 256
    configs = _CUDA_CONFIGS_FP32[kind] if dtype == torch.float32 else _CUDA_CONFIGS[(kind, bucket)]
    key = (kind, bucket, dtype)
    for i in range(_chosen.get(key, 0), len(configs)):
        bm, bn, warps, stages = configs[i]
        try:
            launch(pair, False, grid_of(bm, bn), *args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                   num_stages=stages, **const)
        except OutOfResources:
            continue
        _chosen[key] = i
        return
    raise RuntimeError(f"flash_attention: no {kind} block configuration fits this GPU")


def _precision(dtype):
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def _triton_forward(q, k, v, kv_start, causal: bool, sm_scale: float, interpret: bool):
    B, H, T, D = q.shape
    group = H // k.shape[1]
    # o laid out as (B, T, H, D): the model's transpose(1, 2).reshape afterwards is free
    o = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
    block_d = _block_d(D)
    const = dict(HEAD_DIM=D, BLOCK_D=block_d, EVEN_D=block_d == D, CAUSAL=causal, HAS_KV_START=kv_start is not None,
                 PRECISION=_precision(q.dtype))
    args = (q, k, v, o, lse, kv_start if kv_start is not None else lse,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o),
            H, T, group, sm_scale * 1.4426950408889634)
    _launch("fwd", interpret, lambda bm, bn: (triton.cdiv(T, bm), B * H), args, const, q.dtype)
    return o, lse


def _triton_backward(do, q, k, v, o, lse, kv_start, causal: bool, sm_scale: float, interpret: bool):
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    group = H // H_kv
    if do.stride(-1) != 1:
        do = do.contiguous()
    block_d = _block_d(D)
    delta = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
    launch(_DELTA, interpret, (triton.cdiv(T, _DELTA_BLOCK), B * H),
           o, do, delta, *_strides3(o), *_strides3(do), H, T,
           HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=_DELTA_BLOCK)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    const = dict(HEAD_DIM=D, BLOCK_D=block_d, EVEN_D=block_d == D, CAUSAL=causal, HAS_KV_START=kv_start is not None,
                 PRECISION=_precision(q.dtype))
    ks = kv_start if kv_start is not None else lse
    scale2 = sm_scale * 1.4426950408889634
    _launch("dkdv", interpret, lambda bm, bn: (triton.cdiv(T, bn), B * H_kv),
            (q, k, v, do, dk, dv, lse, delta, ks,
             *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
             H, H_kv, T, group, scale2, sm_scale), const, q.dtype)
    _launch("dq", interpret, lambda bm, bn: (triton.cdiv(T, bm), B * H),
            (q, k, v, do, dq, lse, delta, ks,
             *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq),
             H, T, group, scale2, sm_scale), const, q.dtype)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kv_start, causal, sm_scale, interpret):
        o, lse = _triton_forward(q, k, v, kv_start, causal, sm_scale, interpret)
        ctx.save_for_backward(q, k, v, o, lse, kv_start)
        ctx.causal, ctx.sm_scale, ctx.interpret = causal, sm_scale, interpret
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_start = ctx.saved_tensors
        dq, dk, dv = _triton_backward(do, q, k, v, o, lse, kv_start, ctx.causal, ctx.sm_scale, ctx.interpret)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------- reference

def attention_reference(q, k, v, causal: bool = True, sm_scale: float | None = None, kv_start=None):
    """The same function in plain PyTorch (the CPU path): scores in at least fp32, K/V
    shared by query groups through broadcasting (no copies), masked rows give zeros."""
    B, H, T, D = q.shape
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = rearrange(q.to(acc), "b (h g) t d -> b h g t d", h=k.shape[1])  # g query heads per K/V head
    kf, vf = (rearrange(t.to(acc), "b h t d -> b h 1 t d") for t in (k, v))  # broadcast over g
    s = (qg @ kf.transpose(-2, -1)) * sm_scale  # (B, H_kv, group, T, T)
    keys = torch.arange(T, device=q.device)
    ok = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        ok = keys[None, :] <= keys[:, None]
    ok = ok.expand(B, T, T)
    if kv_start is not None:
        ok = ok & (keys[None, None, :] >= kv_start.to(q.device)[:, None, None])
    ok = rearrange(ok, "b tq tk -> b 1 1 tq tk")
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    o = (p @ vf) / torch.where(l == 0, torch.ones_like(l), l)
    return rearrange(o, "b h g t d -> b (h g) t d").to(q.dtype)


# ----------------------------------------------------------------------------- entry point

def _check(q, k, v, kv_start):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"flash_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must have shape (B, heads, T, D), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"flash_attention: {name} must be floating point, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ in shape")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch, "
                         "length and head dim")
    if k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"flash_attention: {H} query heads are not divisible by {k.shape[1]} key/value heads")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim {D} > {MAX_HEAD_DIM} is not supported")
    if kv_start is not None:
        if not isinstance(kv_start, torch.Tensor) or kv_start.shape != (B,):
            raise ValueError(f"flash_attention: kv_start must be a tensor of shape ({B},)")
        if kv_start.is_floating_point() or kv_start.dtype == torch.bool or kv_start.is_complex():
            raise ValueError(f"flash_attention: kv_start must be an integer tensor, got {kv_start.dtype}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    sm_scale: float | None = None, kv_start: torch.Tensor | None = None, *,
                    backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * sm_scale + mask) v for q (B, H, T, D) and k, v (B, H_kv, T, D).

    causal: query i sees keys j <= i. kv_start (B,) integers: row b also masks keys
    j < kv_start[b]; a query left with no key outputs zeros. backend: 'auto' (Triton on
    CUDA or under TRITON_INTERPRET=1, else PyTorch), 'triton' or 'torch'.
    Invalid inputs raise ValueError before any kernel runs."""
    _check(q, k, v, kv_start)
    B, H, T, D = q.shape
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    how = select_backend(q.device, backend, "flash_attention", kernel_dtypes_ok=q.dtype in KERNEL_DTYPES)
    if how == "torch" or T == 0 or B * H == 0:
        return attention_reference(q, k, v, causal, sm_scale, kv_start)
    if how == "compiled" and B * H > 65535:
        raise ValueError(f"flash_attention: batch x heads = {B * H} exceeds the CUDA grid limit 65535")
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return _FlashAttention.apply(q, k, v, kv_start, bool(causal), sm_scale, how == "interpret")
