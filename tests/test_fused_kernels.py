"""Tests for fused_kernels/: flash attention and the fused linear cross-entropy.

The Triton kernels run on the CPU through Triton's interpreter: the `interpreted`
fixture sets TRITON_INTERPRET=1 for one test at a time (kernels read it per call, see
fused_kernels/__init__.py), so no other test module is switched to the interpreter. float32
and float16 only: the interpreter gets bf16 tl.dot wrong. Every result is checked
against a float64 reference: attention against SDPA in float64 with an explicit mask,
cross-entropy against F.cross_entropy on float64 logits (computed from the inputs'
dtype, so only the kernels' own rounding is measured). Shapes are small and the cases
cover the axes (T, head dim, GQA ratio, causal, left padding, dtype) without their full
product: the interpreter runs one program at a time in numpy.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_kernels
from fused_kernels import attention as A
from fused_kernels import cross_entropy as C
from fused_kernels.attention import attention_reference, flash_attention
from fused_kernels.cross_entropy import fused_linear_cross_entropy

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def interpreted(monkeypatch):
    """Run the Triton kernels through the interpreter for this test only."""
    pytest.importorskip("triton", reason="the Triton kernel tests need triton (pip install triton)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def count_launches(monkeypatch, module) -> list:
    """Record every kernel launch the module makes (to prove the Triton path ran)."""
    calls = []
    real = module.launch

    def spy(pair, interpret, *args, **kwargs):
        calls.append(interpret)
        return real(pair, interpret, *args, **kwargs)

    monkeypatch.setattr(module, "launch", spy)
    return calls


# ----------------------------------------------------------------------------- attention reference

def sdpa_float64(q, k, v, causal, kv_start, do):
    """Output and gradients in float64 from SDPA with an explicit boolean mask. Rows with
    no visible key are given their own key (so SDPA stays finite), then zeroed, and their
    upstream gradient is zero: the kernel's contract is zeros and no gradient there."""
    q, k, v = (t.detach().to(F64).requires_grad_() for t in (q, k, v))
    B, H, T, D = q.shape
    group = H // k.shape[1]
    i = torch.arange(T)
    ok = torch.ones(B, T, T, dtype=torch.bool)
    if causal:
        ok &= i[None, None, :] <= i[None, :, None]
    if kv_start is not None:
        ok &= i[None, None, :] >= kv_start[:, None, None]
    empty = ~ok.any(-1)  # (B, T)
    ok |= empty[:, :, None] & (i[None, None, :] == i[None, :, None])
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                         attn_mask=ok[:, None])
    keep = (~empty)[:, None, :, None].to(F64)
    out = out * keep
    (out * do.to(F64) * keep).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def random_qkv(B, H, H_kv, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(dtype).requires_grad_() for h in (H, H_kv, H_kv))
    do = torch.randn(B, H, T, D, generator=g).to(dtype)
    return q, k, v, do


# B, H, H_kv, T, D, causal, kv_start, dtype: every T in {1, 7, 65, 130}, D in {16, 32, 64}
# (and 8, 24: padded head dims), GQA ratios 1, 2, 4, causal and not, left padding
# (including a row padded past its end), float32 and float16
ATTN_CASES = [
    (1, 2, 2, 1, 16, True, None, torch.float32),
    (2, 4, 2, 7, 32, True, None, torch.float32),
    (1, 4, 1, 65, 16, True, None, torch.float32),
    (1, 2, 2, 130, 64, False, None, torch.float32),
    (2, 4, 2, 65, 32, True, [0, 20], torch.float32),
    (2, 4, 4, 33, 16, False, [3, 40], torch.float32),
    (2, 4, 1, 130, 16, True, [5, 70], torch.float32),
    (2, 2, 1, 20, 24, True, [0, 6], torch.float32),
    (1, 4, 2, 9, 8, True, None, torch.float32),
    (2, 4, 2, 65, 32, True, None, torch.float16),
    (2, 2, 1, 40, 64, False, [0, 9], torch.float16),
    (1, 4, 4, 7, 16, True, [2], torch.float16),
]


@pytest.mark.parametrize("B,H,H_kv,T,D,causal,kv_start,dtype", ATTN_CASES)
def test_flash_attention_matches_float64(interpreted, monkeypatch, B, H, H_kv, T, D, causal, kv_start, dtype):
    calls = count_launches(monkeypatch, A)
    q, k, v, do = random_qkv(B, H, H_kv, T, D, dtype)
    ks = torch.tensor(kv_start) if kv_start is not None else None
    out = flash_attention(q, k, v, causal=causal, kv_start=ks)
    out.backward(do)
    assert calls and all(calls), "the interpreted Triton kernels did not run"
    assert out.dtype == dtype and out.shape == (B, H, T, D)
    assert q.grad.dtype == dtype and k.grad.shape == k.shape and v.grad.shape == v.shape
    want = sdpa_float64(q, k, v, causal, ks, do)
    tol = dict(atol=3e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), want):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.to(F64), ref, **tol, msg=name)


def test_attention_reference_matches_float64():
    """The CPU path (used when neither CUDA nor the interpreter is there)."""
    for B, H, H_kv, T, D, causal, kv_start, _ in ATTN_CASES[:8]:
        q, k, v, do = random_qkv(B, H, H_kv, T, D, F64, seed=1)
        ks = torch.tensor(kv_start) if kv_start is not None else None
        out = attention_reference(q, k, v, causal, None, ks)
        out.backward(do)
        want = sdpa_float64(q, k, v, causal, ks, do)
        for got, ref in zip((out, q.grad, k.grad, v.grad), want):
            torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


def test_flash_attention_sm_scale_and_strided_inputs(interpreted):
    """A non-default scale, and q/k/v as the model makes them: transposed views."""
    g = torch.Generator().manual_seed(3)
    B, T, H, H_kv, D = 2, 19, 4, 2, 16
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, H_kv, D, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, H_kv, D, generator=g).transpose(1, 2).requires_grad_()
    out = flash_attention(q, k, v, sm_scale=0.3)
    ref = attention_reference(q.detach().to(F64), k.detach().to(F64), v.detach().to(F64), True, 0.3)
    torch.testing.assert_close(out.to(F64), ref, atol=3e-5, rtol=1e-4)


def test_flash_attention_backward_is_deterministic(interpreted):
    q, k, v, do = random_qkv(2, 4, 1, 33, 16, torch.float32, seed=4)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        flash_attention(q, k, v, kv_start=torch.tensor([0, 5])).backward(do)
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_flash_attention_padded_queries_are_zero_and_pass_no_gradient(interpreted):
    q, k, v, do = random_qkv(2, 2, 1, 12, 16, torch.float32, seed=5)
    ks = torch.tensor([0, 5])
    out = flash_attention(q, k, v, kv_start=ks)
    out.backward(do)
    assert torch.all(out[1, :, :5] == 0)
    assert torch.all(q.grad[1, :, :5] == 0)  # the pad queries
    assert torch.all(k.grad[1, :, :5] == 0) and torch.all(v.grad[1, :, :5] == 0)  # the pad keys
    assert torch.isfinite(q.grad).all() and q.grad[0].abs().sum() > 0


def test_flash_attention_backend_selection(monkeypatch, no_interpreter):
    calls = count_launches(monkeypatch, A)
    q, k, v, _ = random_qkv(1, 2, 1, 6, 16, torch.float32)
    out = flash_attention(q, k, v)  # CPU without the interpreter: the PyTorch path
    assert not calls
    torch.testing.assert_close(out, attention_reference(q, k, v))
    with pytest.raises(ValueError, match="TRITON_INTERPRET" if fused_kernels.HAS_TRITON else "needs the triton package"):
        flash_attention(q, k, v, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if fused_kernels.HAS_TRITON:
        flash_attention(q, k, v)
        assert calls == [True]
    torch.testing.assert_close(flash_attention(q, k, v, backend="torch"), out)


@pytest.mark.parametrize("make, match", [
    (lambda q, k, v: (q[0], k, v, {}), "shape"),
    (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5], {}), "agree"),
    (lambda q, k, v: (q, k, v[..., :8], {}), "differ in shape"),
    (lambda q, k, v: (q[:, :3], k, v, {}), "divisible"),
    (lambda q, k, v: (q.long(), k.long(), v.long(), {}), "floating point"),
    (lambda q, k, v: (q, k.half(), v, {}), "dtypes differ"),
    (lambda q, k, v: (q, k, v, {"kv_start": torch.tensor([0])}), "kv_start"),
    (lambda q, k, v: (q, k, v, {"kv_start": torch.tensor([0.0, 1.0])}), "integer"),
    (lambda q, k, v: (q, k, v, {"backend": "cuda"}), "backend"),
    (lambda q, k, v: (q.double(), k.double(), v.double(), {"backend": "triton"}), "float16, bfloat16 or float32"),
    (lambda q, k, v: (torch.zeros(1, 2, 3, 300), torch.zeros(1, 2, 3, 300), torch.zeros(1, 2, 3, 300), {}),
     "head dim"),
])
def test_flash_attention_invalid_inputs(interpreted, make, match):
    q, k, v, _ = random_qkv(2, 4, 2, 6, 16, torch.float32)
    q, k, v, kw = make(q.detach(), k.detach(), v.detach())
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **kw)


# ----------------------------------------------------------------------------- cross-entropy

def ce_float64(x, w, t, reduction, z_loss, go):
    """Reference loss, entropy and gradients: logits in the inputs' dtype (as x @ w.T
    gives them), then everything in float64."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    logits = (x @ w.t()).to(F64)
    valid = t != -100
    per = F.cross_entropy(logits, t, ignore_index=-100, reduction="none")
    lse = torch.logsumexp(logits, -1)
    per = (per + z_loss * lse ** 2) * valid
    loss = {"none": per, "sum": per.sum(), "mean": per.sum() / valid.sum().clamp(min=1)}[reduction]
    loss.backward(go.to(F64))
    logp = logits.detach().log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return loss.detach(), entropy, x.grad.to(F64), w.grad.to(F64)


def ce_inputs(N, V, D, dtype, ignored=(1, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.5).to(dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[[i for i in ignored if i < N]] = -100
    return x, w, t


# backend, reduction, z_loss, dtype, N, V, chunk: N never a multiple of the chunk, V never
# of the interpreter's block (32), every reduction with and without z-loss on each backend
CE_CASES = [
    ("triton", "mean", 0.0, torch.float32, 23, 101, 5),
    ("triton", "sum", 1e-2, torch.float32, 23, 101, 5),
    ("triton", "none", 0.0, torch.float32, 17, 70, 4),
    ("triton", "none", 1e-2, torch.float16, 23, 101, 5),
    ("triton", "mean", 1e-2, torch.float16, 9, 33, 2),
    ("triton", "sum", 0.0, torch.float16, 9, 31, 4),
    ("torch", "mean", 1e-2, torch.float32, 23, 101, 5),
    ("torch", "sum", 0.0, torch.float32, 23, 101, 5),
    ("torch", "none", 1e-2, torch.float32, 23, 101, None),
    ("torch", "mean", 0.0, torch.float16, 23, 101, 7),
    ("torch-recompute", "none", 1e-2, torch.float32, 23, 101, 5),
]


@pytest.mark.parametrize("backend,reduction,z_loss,dtype,N,V,chunk", CE_CASES)
def test_fused_ce_matches_float64(interpreted, monkeypatch, backend, reduction, z_loss, dtype, N, V, chunk):
    if backend == "torch-recompute":  # reduction none as on CUDA: logits recomputed in the backward
        monkeypatch.setattr(C, "CPU_KEEPS_DLOGITS", False)
        backend = "torch"
    calls = count_launches(monkeypatch, C)
    x, w, t = ce_inputs(N, V, 16, dtype)
    loss, entropy = fused_linear_cross_entropy(x, w, t, reduction=reduction, z_loss=z_loss, return_entropy=True,
                                               chunk_size=chunk, backend=backend)
    go = torch.randn(N) if reduction == "none" else torch.tensor(1.7)
    loss.backward(go)
    assert (len(calls) > 0) == (backend == "triton")
    assert loss.dtype == torch.float32 and entropy.dtype == torch.float32
    assert loss.shape == ((N,) if reduction == "none" else ())
    assert entropy.shape == (N,) and not entropy.requires_grad
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    want_loss, want_entropy, want_gx, want_gw = ce_float64(x, w, t, reduction, z_loss, go)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(loss.to(F64), want_loss, **tol)
    torch.testing.assert_close(entropy.to(F64), want_entropy, **tol)
    torch.testing.assert_close(x.grad.to(F64), want_gx, **tol)
    torch.testing.assert_close(w.grad.to(F64), want_gw, **tol)
    if reduction == "none":
        assert torch.all(loss[t == -100] == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_ce_all_rows_ignored_gives_zero(interpreted, backend):
    x, w, _ = ce_inputs(6, 40, 16, torch.float32)
    t = torch.full((6,), -100)
    for reduction in ("mean", "sum", "none"):
        x.grad = w.grad = None
        loss = fused_linear_cross_entropy(x, w, t, reduction=reduction, z_loss=1e-3, chunk_size=4, backend=backend)
        assert torch.all(loss == 0) and not torch.isnan(loss).any()
        loss.sum().backward()
        assert torch.all(x.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_ce_no_grad_equals_grad_path_exactly(interpreted, backend):
    """Log-probs from a rollout (no_grad) and from the training forward must be identical:
    PPO's first ratio is exactly 1 only if they are."""
    x, w, t = ce_inputs(23, 101, 16, torch.float32)
    with_grad, ent1 = fused_linear_cross_entropy(x, w, t, reduction="none", return_entropy=True, chunk_size=5,
                                                 backend=backend)
    with torch.no_grad():
        without, ent2 = fused_linear_cross_entropy(x, w, t, reduction="none", return_entropy=True, chunk_size=5,
                                                   backend=backend)
    assert torch.equal(with_grad.detach(), without) and torch.equal(ent1, ent2)


@pytest.mark.parametrize("keep", [True, False])
def test_fused_ce_per_token_backward_twice(monkeypatch, keep):
    """reduction none, backward twice through a retained graph: same gradients each time
    (the kept dlogits are not scaled in place)."""
    monkeypatch.setattr(C, "CPU_KEEPS_DLOGITS", keep)
    x, w, t = ce_inputs(11, 30, 8, torch.float32)
    loss = fused_linear_cross_entropy(x, w, t, reduction="none", chunk_size=4)
    go = torch.randn(11)
    loss.backward(go, retain_graph=True)
    first = (x.grad.clone(), w.grad.clone())
    x.grad = w.grad = None
    loss.backward(go)
    assert torch.equal(first[0], x.grad) and torch.equal(first[1], w.grad)


def test_fused_ce_backends_and_chunk_sizes_agree(interpreted):
    x, w, t = ce_inputs(30, 90, 16, torch.float32)
    ref = None
    for backend, chunk in (("torch", None), ("torch", 1), ("triton", 7), ("triton", 30)):
        x.grad = w.grad = None
        loss = fused_linear_cross_entropy(x, w, t, chunk_size=chunk, backend=backend)
        loss.backward()
        got = (loss.detach(), x.grad.clone(), w.grad.clone())
        if ref is None:
            ref = got
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fused_ce_weight_gradient_accumulates_in_fp32():
    """bf16 inputs, one row per chunk: 256 partial weight gradients. Summed in bf16 they
    would drift (Liger #512); in fp32 the result is as good as its final bf16 rounding."""
    x, w, t = ce_inputs(256, 24, 16, torch.bfloat16, ignored=())
    w.detach().mul_(0.1)
    fused_linear_cross_entropy(x, w, t, reduction="sum", chunk_size=1, backend="torch").backward()
    _, _, _, want = ce_float64(x, w, t, "sum", 0.0, torch.tensor(1.0))
    err = (w.grad.to(F64) - want).abs().max() / want.abs().max()
    assert err < 8e-3, f"relative weight-gradient error {err:.2e}"


def test_fused_ce_bf16_and_autocast_give_fp32_loss():
    x, w, t = ce_inputs(12, 40, 16, torch.bfloat16)
    loss = fused_linear_cross_entropy(x, w, t)
    assert loss.dtype == torch.float32
    want = F.cross_entropy((x @ w.t()).float(), t, ignore_index=-100)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(xf, wf, t)
    loss.backward()
    assert loss.dtype == torch.float32 and wf.grad.dtype == torch.float32
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)  # same bf16 matmul as x @ w.T under autocast


def test_fused_ce_float64_stays_float64():
    x, w, t = ce_inputs(10, 30, 8, F64)
    loss = fused_linear_cross_entropy(x, w, t, reduction="none", chunk_size=3)
    assert loss.dtype == F64
    want = F.cross_entropy(x @ w.t(), t, ignore_index=-100, reduction="none")
    assert (loss - want).abs().max() < 1e-12


def test_fused_ce_backend_selection(monkeypatch, no_interpreter):
    calls = count_launches(monkeypatch, C)
    x, w, t = ce_inputs(8, 20, 16, torch.float32)
    fused_linear_cross_entropy(x, w, t)
    assert not calls  # CPU without the interpreter: the PyTorch path
    with pytest.raises(ValueError, match="TRITON_INTERPRET" if fused_kernels.HAS_TRITON else "needs the triton package"):
        fused_linear_cross_entropy(x, w, t, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if fused_kernels.HAS_TRITON:
        fused_linear_cross_entropy(x, w, t)
        assert calls and all(calls)


@pytest.mark.parametrize("make, match", [
    (lambda x, w, t: (x[0], w, t, {}), r"\(N, D\)"),
    (lambda x, w, t: (x, w[:, :8], t, {}), "features"),
    (lambda x, w, t: (x, w, t[:-1], {}), "targets must have shape"),
    (lambda x, w, t: (x, w, t.float(), {}), "integer"),
    (lambda x, w, t: (x.long(), w, t, {}), "floating point"),
    (lambda x, w, t: (x, w, torch.full_like(t, 20), {}), "outside"),
    (lambda x, w, t: (x, w, t, {"reduction": "avg"}), "reduction"),
    (lambda x, w, t: (x, w, t, {"z_loss": -1.0}), "z_loss"),
    (lambda x, w, t: (x, w, t, {"chunk_size": 0}), "chunk_size"),
    (lambda x, w, t: (x.double(), w.double(), t, {"backend": "triton"}), "float16, bfloat16 or float32"),
])
def test_fused_ce_invalid_inputs(interpreted, make, match):
    x, w, t = ce_inputs(8, 20, 16, torch.float32)
    x, w, t, kw = make(x.detach(), w.detach(), t)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(x, w, t, **kw)


# ----------------------------------------------------------------------------- model.py wiring

def tiny_model(**kw):
    from model import ModelConfig, Transformer
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64,
                                init_std=0.2), **kw})
    return Transformer(cfg).eval()


@pytest.mark.parametrize("kw", [dict(n_head=4, n_kv_head=2),  # GQA, head dim 8 (padded to 16 in the kernel)
                                dict(n_head=2, n_kv_head=2, norm="layernorm", mlp="gelu", pos_emb="learned",
                                     bias=True, tie_embeddings=True)])
def test_model_triton_equals_sdpa_and_eager(interpreted, monkeypatch, kw):
    calls = count_launches(monkeypatch, A)
    m = tiny_model(**kw)
    g = torch.Generator().manual_seed(1)
    B, T = 3, 14
    idx = torch.randint(0, 97, (B, T), generator=g)
    targets = torch.randint(0, 97, (B, T), generator=g)
    kv = torch.tensor([0, 3, 8])
    real = torch.arange(T)[None, :] >= kv[:, None]
    targets[~real] = -100  # as every stage does: no loss on padding
    results = {}
    for impl in ("eager", "sdpa", "triton"):
        m.cfg.attn_impl = impl
        m.zero_grad()
        with torch.no_grad():
            plain, padded = m(idx), m(idx, kv_start=kv)
        loss = m(idx, targets, kv_start=kv)
        loss.backward()
        results[impl] = (plain, padded[real], loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()})
    assert calls and all(calls)
    for impl in ("sdpa", "triton"):
        plain, padded, loss, grads = results[impl]
        torch.testing.assert_close(plain, results["eager"][0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(padded, results["eager"][1], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(loss, results["eager"][2], atol=1e-6, rtol=1e-6)
        for n, gr in grads.items():
            torch.testing.assert_close(gr, results["eager"][3][n], atol=1e-5, rtol=1e-4, msg=n)


def test_model_triton_generate_matches_sdpa(interpreted):
    """Prefill of left-padded prompts through the kernel (kv_start), decoding on SDPA."""
    m = tiny_model()
    prompts = [[5, 6, 7, 8, 9, 10], [1, 2], [40, 41, 42]]
    out = {}
    for impl in ("sdpa", "triton"):
        m.cfg.attn_impl = impl
        out[impl] = m.generate(prompts, 6, pad_id=0, temperature=0)
    assert out["triton"] == out["sdpa"]


def test_model_auto_impl_is_sdpa_on_cpu():
    m = tiny_model(attn_impl="auto")
    assert m._resolved_impl(torch.device("cpu")) == "sdpa"
    assert A.triton_usable("cpu") is False


def test_model_triton_rejects_dense_mask():
    from model import attention
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="kv_start"):
        attention(q, q, q, torch.ones(1, 1, 3, 3, dtype=torch.bool), "triton")


def test_model_loss_uses_fused_cross_entropy(monkeypatch):
    """Every loss and log-prob in model.py goes through fused_kernels.cross_entropy."""
    import model
    seen = []
    real = C.fused_linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs.get("reduction"))
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "fused_linear_cross_entropy", spy)
    model._kernel.cache_clear()
    try:
        m = tiny_model()
        idx = torch.randint(0, 97, (2, 8))
        m(idx, idx, reduction="none")
        m(idx, idx, return_entropy=True)
    finally:
        monkeypatch.undo()
        model._kernel.cache_clear()
    assert seen == ["none", "mean"]



@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gets")
def test_bench_needs_cuda_says_so_in_one_line(capsys):
    from bench import kernels as bench
    with pytest.raises(SystemExit) as e:
        bench.main(["--append", ""])
    message = capsys.readouterr().err
    assert e.value.code == 2 and message.startswith("error: ") and "CUDA" in message and message.count("\n") == 1
