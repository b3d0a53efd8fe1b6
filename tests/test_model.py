"""Tests for model.py: the decoder-only transformer (attention paths, an independent float64
reference forward, KV cache, left-padded batched generation, sampling, loss, gradients,
GPT-2-style variant, init, counting, config validation, length limits, causality)."""
from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import KVCache, ModelConfig, PRESETS, Transformer, apply_rope, attention, lm_loss, sample_next

V = 97
F64 = torch.float64


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one intra-op thread is as fast, and far faster when the
    CPU is shared with other processes (oversubscribed OpenMP threads spin)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64, init_std=0.2)
    base.update(kw)
    return ModelConfig(**base)


def make_model(seed: int = 0, dtype=torch.float32, **kw) -> Transformer:
    """A small model in eval mode. init_std 0.2 (not 0.02) so attention is far from uniform
    and greedy generation does not collapse onto one token."""
    torch.manual_seed(seed)
    m = Transformer(make_cfg(**kw)).eval()
    return m.to(dtype)


GPT2_KW = dict(norm="layernorm", mlp="gelu", pos_emb="learned", bias=True, tie_embeddings=True)
VARIANTS = {
    "mha": dict(n_head=4, n_kv_head=4),
    "gqa": dict(n_head=4, n_kv_head=2),
    "mqa": dict(n_head=4, n_kv_head=1),
    "gpt2": dict(n_head=4, n_kv_head=4, **GPT2_KW, init_std=0.5),  # 0.2 collapses greedy output here
}


@contextmanager
def attn_impl(model: Transformer, impl: str):
    old = model.cfg.attn_impl
    model.cfg.attn_impl = impl
    try:
        yield
    finally:
        model.cfg.attn_impl = old


def logits_with(model, impl, idx, **kw):
    with attn_impl(model, impl), torch.no_grad():
        return model(idx, **kw)


def rand_idx(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def left_pad(rows: list[list[int]], pad_id: int):
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r)
    kv_start = torch.tensor([T - len(r) for r in rows])
    return idx, kv_start


def greedy_no_cache(model, prompt: list[int], n: int) -> list[int]:
    """The obvious greedy loop: full forward on the growing sequence, argmax of the last logits."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


def unused_token(*seqs) -> int:
    used = set().union(*map(set, seqs))
    return next(t for t in range(V - 1, -1, -1) if t not in used)


# ----------------------------------------------------------------------------- independent reference

def reference_logits(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """A naive float64 re-implementation of the forward pass (no padding, no cache), from the
    model's parameters with explicit per-row, per-head, per-query loops. RoPE uses the model's
    cos/sin tables (documented as computed in fp32; their formula is checked separately)."""
    cfg = model.cfg
    P = {n: p.detach().to(F64) for n, p in model.named_parameters()}
    head_w = P["tok_emb.weight"] if cfg.tie_embeddings else P["lm_head.weight"]
    B, T = idx.shape
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    per_group = H // Hkv
    half = D // 2
    cos, sin = model.rope_cos.to(F64), model.rope_sin.to(F64)

    def norm(x, name):
        w = P[name + ".weight"]
        if cfg.norm == "rmsnorm":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(var + cfg.norm_eps) * w
        return y + P[name + ".bias"] if cfg.bias else y

    def linear(x, name):
        y = x @ P[name + ".weight"].T
        return y + P[name + ".bias"] if cfg.bias else y

    def rotate(vec, pos):  # pairs (i, i + D/2) rotated by angle pos * inv_freq[i]
        a, b = vec[:half], vec[half:]
        c, s = cos[pos], sin[pos]
        return torch.cat([a * c - b * s, a * s + b * c])

    x = P["tok_emb.weight"][idx]
    if cfg.pos_emb == "learned":
        x = x + P["pos_emb.weight"][:T][None]
    for layer in range(cfg.n_layer):
        pre = f"blocks.{layer}."
        h = norm(x, pre + "norm1")
        q = linear(h, pre + "attn.wq").view(B, T, H, D)
        k = linear(h, pre + "attn.wk").view(B, T, Hkv, D)
        v = linear(h, pre + "attn.wv").view(B, T, Hkv, D)
        att = torch.zeros(B, T, H, D, dtype=F64)
        for b in range(B):
            for g in range(Hkv):
                keys = torch.stack([rotate(k[b, j, g], j) if cfg.pos_emb == "rope" else k[b, j, g]
                                    for j in range(T)])
                for hq in range(g * per_group, (g + 1) * per_group):  # query heads sharing kv head g
                    for i in range(T):
                        qi = rotate(q[b, i, hq], i) if cfg.pos_emb == "rope" else q[b, i, hq]
                        scores = keys[: i + 1] @ qi / math.sqrt(D)
                        e = torch.exp(scores - scores.max())
                        att[b, i, hq] = (e / e.sum()) @ v[b, : i + 1, g]
        x = x + linear(att.reshape(B, T, H * D), pre + "attn.wo")
        h = norm(x, pre + "norm2")
        if cfg.mlp == "swiglu":
            a = linear(h, pre + "mlp.w1")
            m = (a / (1 + torch.exp(-a))) * linear(h, pre + "mlp.w3")
        else:
            a = linear(h, pre + "mlp.w1")
            m = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
        x = x + linear(m, pre + "mlp.w2")
    return norm(x, "norm_f") @ head_w.T


# ----------------------------------------------------------------------------- 1. eager vs sdpa

def assert_close_to_scale(actual, expected, tol=1e-5):
    """fp32 rounding error grows with the logits' magnitude (the gpt2 variant's reach ~10):
    the tolerance is tol times the largest logit, never less than tol."""
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "gpt2"])
def test_eager_equals_sdpa_plain(variant):
    m = make_model(**VARIANTS[variant])
    idx = rand_idx(2, 24)
    le, ls = logits_with(m, "eager", idx), logits_with(m, "sdpa", idx)
    assert le.shape == (2, 24, V)
    assert_close_to_scale(le, ls)
    with attn_impl(m, "auto"), torch.no_grad():  # auto is sdpa on CPU
        torch.testing.assert_close(m(idx), ls, atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "gpt2"])
def test_eager_equals_sdpa_left_padded(variant):
    m = make_model(**VARIANTS[variant])
    idx = rand_idx(3, 20, seed=2)
    kv_start = torch.tensor([0, 5, 13])
    le = logits_with(m, "eager", idx, kv_start=kv_start)
    ls = logits_with(m, "sdpa", idx, kv_start=kv_start)
    assert_close_to_scale(le, ls)


@pytest.mark.parametrize("variant", ["mha", "gqa", "gpt2"])
@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_matches_full_forward_both_impls(variant, padded):
    """Prefill then continue in chunks of 1, 1, 3, 1 tokens: every chunk's logits equal the
    full-sequence forward at those positions, in eager and in sdpa."""
    m = make_model(**VARIANTS[variant])
    B, T = 3, 16
    idx = rand_idx(B, T, seed=3)
    kv_start = torch.tensor([0, 4, 9]) if padded else None
    full = {impl: logits_with(m, impl, idx, kv_start=kv_start) for impl in ("eager", "sdpa")}
    torch.testing.assert_close(full["eager"], full["sdpa"], atol=1e-5, rtol=1e-5)
    for impl in ("eager", "sdpa"):
        cache = KVCache(m.cfg, B, m.cfg.max_seq_len, "cpu")
        pieces, start = [], 0
        for end in (10, 11, 12, 15, 16):
            pieces.append(logits_with(m, impl, idx[:, start:end], kv_start=kv_start, cache=cache))
            start = end
        assert cache.length == T
        torch.testing.assert_close(torch.cat(pieces, dim=1), full[impl], atol=1e-5, rtol=1e-5)


def test_eager_equals_sdpa_float64_tight():
    """In float64 both paths should agree to float64 round-off, not float32's."""
    worst = 0.0
    for variant in ("mha", "gqa"):
        m = make_model(dtype=F64, **VARIANTS[variant])
        idx = rand_idx(2, 20)
        for kv in (None, torch.tensor([0, 6])):
            d = (logits_with(m, "eager", idx, kv_start=kv) - logits_with(m, "sdpa", idx, kv_start=kv)).abs().max()
            worst = max(worst, float(d))
    assert worst < 1e-10, f"eager vs sdpa differ by {worst:.3g} in float64"


# ----------------------------------------------------------------------------- 2. float64 reference

def test_rope_tables_formula():
    cfg = make_cfg(d_model=64, n_head=4, n_kv_head=2)
    cos, sin = M.rope_tables(cfg)
    half = cfg.head_dim // 2
    inv = 1.0 / cfg.rope_theta ** (torch.arange(half, dtype=F64) * 2 / cfg.head_dim)
    ang = torch.arange(cfg.max_seq_len, dtype=F64)[:, None] * inv[None]
    assert cos.shape == sin.shape == (cfg.max_seq_len, half)
    torch.testing.assert_close(cos.to(F64), ang.cos(), atol=2e-5, rtol=0)
    torch.testing.assert_close(sin.to(F64), ang.sin(), atol=2e-5, rtol=0)


def test_apply_rope_is_half_split_rotation():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 5, 8)
    ang = torch.randn(5, 4)
    y = apply_rope(x, ang.cos()[None, None], ang.sin()[None, None])
    for t in range(5):
        for i in range(4):
            a, b, th = x[0, 0, t, i], x[0, 0, t, i + 4], ang[t, i]
            torch.testing.assert_close(y[0, 0, t, i], a * th.cos() - b * th.sin())
            torch.testing.assert_close(y[0, 0, t, i + 4], a * th.sin() + b * th.cos())
    # a rotation keeps the norm of each pair
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "gpt2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_reference_forward_float32_level(variant, impl):
    """The naive reference agrees with the model at float32 precision: the formulas match."""
    m = make_model(dtype=F64, **VARIANTS[variant])
    idx = rand_idx(2, 16, seed=5)
    torch.testing.assert_close(logits_with(m, impl, idx), reference_logits(m, idx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gqa", "gpt2"])
def test_reference_forward_float64_exact(variant):
    """In float64 the model should match the float64 reference to ~1e-9 (sdpa path)."""
    m = make_model(dtype=F64, **VARIANTS[variant])
    idx = rand_idx(2, 16, seed=5)
    diff = (logits_with(m, "sdpa", idx) - reference_logits(m, idx)).abs().max().item()
    assert diff < 1e-9, f"float64 model differs from the float64 reference by {diff:.3g}"


@pytest.mark.parametrize("component", ["rmsnorm", "apply_rope", "eager_attention", "lm_loss"])
def test_float64_inputs_are_not_rounded_to_float32(component):
    """Pieces that upcast to fp32 'for bf16' must not downcast float64 inputs."""
    torch.manual_seed(0)
    if component == "rmsnorm":
        x = torch.randn(4, 32, dtype=F64)
        got = M.RMSNorm(32, 1e-5).to(F64)(x)
        want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    elif component == "apply_rope":
        x = torch.randn(1, 2, 6, 8, dtype=F64)
        ang = torch.randn(1, 1, 6, 4, dtype=F64)
        c, s = ang.cos(), ang.sin()
        got = apply_rope(x, c, s)
        x1, x2 = x[..., :4], x[..., 4:]
        want = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    elif component == "eager_attention":
        q, k, v = (torch.randn(1, 2, 7, 8, dtype=F64) for _ in range(3))
        got = attention(q, k, v, None, "eager")
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        h, w = torch.randn(6, 16, dtype=F64), torch.randn(11, 16, dtype=F64)
        t = torch.randint(0, 11, (6,))
        got = lm_loss(h, w, t)
        want = F.cross_entropy(h @ w.T, t)
        assert got.dtype == F64, f"lm_loss returned {got.dtype} for float64 inputs"
    assert got.dtype == F64
    diff = (got - want).abs().max().item()
    assert diff < 1e-12, f"{component}: float64 result off by {diff:.3g} (float32 round-off)"


# ----------------------------------------------------------------------------- 3. greedy: cache vs no cache

@pytest.mark.parametrize("variant", ["gqa", "mha", "gpt2"])
def test_greedy_generate_with_cache_equals_no_cache_loop(variant):
    m = make_model(**VARIANTS[variant])
    prompts = [[5], [1, 2, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], rand_idx(1, 20, seed=9)[0].tolist()]
    for p in prompts:
        want = greedy_no_cache(m, p, 12)
        assert len(set(want)) > 2, "degenerate model output makes this test weak"
        pad = unused_token(want, p)
        assert m.generate([p], 12, pad_id=pad, temperature=0) == [want]
        with attn_impl(m, "eager"):
            assert m.generate([p], 12, pad_id=pad, temperature=0) == [want]


def test_generate_keeps_generated_tokens_equal_to_pad_id():
    """pad_id is an ordinary vocabulary id; a row that did not stop must come back full length
    even when the tokens it generated at the end happen to equal pad_id."""
    m = make_model()
    prompt = [1, 2, 3]
    want = greedy_no_cache(m, prompt, 10)
    pad = want[-1]  # the last generated token doubles as the pad id
    assert m.generate([prompt], 10, pad_id=pad, temperature=0) == [want]


# ----------------------------------------------------------------------------- 4. left-padded batches

@pytest.mark.parametrize("variant", ["gqa", "mqa", "gpt2"])
def test_batched_left_padded_generate_equals_single(variant):
    m = make_model(**VARIANTS[variant])
    prompts = [[7], [3, 1, 4, 1, 5, 9, 2, 6], [10, 20, 30], rand_idx(1, 14, seed=11)[0].tolist(), [8, 8]]
    singles = [greedy_no_cache(m, p, 9) for p in prompts]
    pad = unused_token(*singles, *prompts)
    for p, s in zip(prompts, singles):
        assert m.generate([p], 9, pad_id=pad, temperature=0) == [s]
    assert m.generate(prompts, 9, pad_id=pad, temperature=0) == singles
    # the pad id must not matter, even one that occurs in the prompts
    assert m.generate(prompts, 9, pad_id=prompts[1][0], temperature=0) == singles


@pytest.mark.parametrize("variant", ["gqa", "mha", "gpt2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_left_padded_forward_equals_unpadded(variant, impl):
    m = make_model(**VARIANTS[variant])
    rows = [rand_idx(1, n, seed=20 + n)[0].tolist() for n in (12, 5, 9, 1)]
    idx, kv_start = left_pad(rows, pad_id=0)
    batch = logits_with(m, impl, idx, kv_start=kv_start)
    for i, r in enumerate(rows):
        alone = logits_with(m, impl, torch.tensor([r]))[0]
        torch.testing.assert_close(batch[i, kv_start[i]:], alone, atol=1e-5, rtol=1e-5)
    # and the padding really is masked: different pad ids give the same real-position logits
    idx2, _ = left_pad(rows, pad_id=50)
    batch2 = logits_with(m, impl, idx2, kv_start=kv_start)
    for i in range(len(rows)):
        torch.testing.assert_close(batch2[i, kv_start[i]:], batch[i, kv_start[i]:], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- 5. stop tokens, limits, errors

def test_stop_token_stops_only_its_row():
    m = make_model()
    prompts = [[1, 2, 3], [60, 61], [9, 8, 7, 6]]
    n = 12
    free = [greedy_no_cache(m, p, n) for p in prompts]
    pad = unused_token(*free, *prompts)
    # a stop token that row 0 produces at some position j > 0 and rows 1 and 2 never produce
    stop = j = None
    for pos, tok in enumerate(free[0]):
        if pos > 0 and tok not in free[1] and tok not in free[2] and tok not in free[0][:pos]:
            stop, j = tok, pos
            break
    assert stop is not None, "test setup: no usable stop token"
    out = m.generate(prompts, n, pad_id=pad, temperature=0, stop_tokens=[stop])
    assert out[0] == free[0][: j + 1] and out[0][-1] == stop
    assert out[1] == free[1] and out[2] == free[2]
    assert all(len(r) == n for r in out[1:])


def test_stop_tokens_all_rows_stop_early():
    m = make_model()
    prompts = [[1, 2, 3], [60, 61]]
    free = [greedy_no_cache(m, p, 15) for p in prompts]
    pad = unused_token(*free, *prompts)
    stops = {free[0][2], free[1][4]}
    out = m.generate(prompts, 15, pad_id=pad, temperature=0, stop_tokens=stops)
    for r, f in zip(out, free):
        first = next(i for i, t in enumerate(f) if t in stops)
        assert r == f[: first + 1]
        assert r[-1] in stops


def test_max_new_tokens_respected_and_clipped_by_max_seq_len():
    m = make_model()
    for n in (1, 4, 17):
        out = m.generate([[1, 2], [3, 4, 5, 6]], n, pad_id=96, temperature=1.0,
                         generator=torch.Generator().manual_seed(n))
        assert [len(r) for r in out] == [n, n]
    # room left under max_seq_len = 64 - 60 = 4 tokens
    long = rand_idx(1, 60, seed=4)[0].tolist()
    out = m.generate([long, [1]], 50, pad_id=96, temperature=0)
    assert [len(r) for r in out] == [4, 4]


def test_generate_errors():
    m = make_model()
    with pytest.raises(ValueError):
        m.generate([], 5, pad_id=0)
    with pytest.raises(ValueError):
        m.generate([[]], 5, pad_id=0)
    with pytest.raises(ValueError):
        m.generate([[1, 2], []], 5, pad_id=0)
    with pytest.raises(ValueError):
        m.generate([[1] * m.cfg.max_seq_len], 5, pad_id=0)
    with pytest.raises(ValueError):
        m.generate([[1, 2], [1] * (m.cfg.max_seq_len + 3)], 5, pad_id=0)


# ----------------------------------------------------------------------------- 6. sample_next

def test_sample_temperature_zero_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    assert torch.equal(sample_next(logits, 0.0, None, None), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0.0, 5, 0.5), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_sample_top_k_one_is_argmax(temperature):
    torch.manual_seed(1)
    logits = torch.randn(8, 40)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert torch.equal(sample_next(logits, temperature, 1, None, g), logits.argmax(-1))


@pytest.mark.parametrize("k", [2, 5])
def test_sample_top_k_only_k_largest(k):
    torch.manual_seed(2)
    base = torch.randn(3, 30)
    reps = 1000
    logits = base.repeat(reps, 1)
    g = torch.Generator().manual_seed(0)
    s = sample_next(logits, 3.0, k, None, g).view(reps, 3)
    top = base.topk(k, dim=-1).indices
    for row in range(3):
        drawn = set(s[:, row].tolist())
        assert drawn <= set(top[row].tolist())
        assert drawn == set(top[row].tolist())  # at temperature 3 every kept token shows up


@pytest.mark.parametrize("top_p, keep", [(0.7, {0, 1}), (0.85, {0, 1, 2}), (0.4, {0}), (0.99, {0, 1, 2, 3})])
def test_sample_top_p_nucleus(top_p, keep):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # scatter them over a permuted vocabulary so that sorting and unsorting are exercised
    perm = torch.tensor([3, 0, 5, 1])  # token id for rank r
    logits_row = torch.full((6,), -float("inf"))
    logits_row[perm] = probs.log()
    reps = 4000
    g = torch.Generator().manual_seed(0)
    s = sample_next(logits_row.repeat(reps, 1), 1.0, None, top_p, g)
    want_ids = {int(perm[r]) for r in keep}
    assert set(s.tolist()) == want_ids
    kept = probs[sorted(keep)]
    kept = kept / kept.sum()
    for r, p in zip(sorted(keep), kept.tolist()):
        freq = (s == perm[r]).float().mean().item()
        assert abs(freq - p) < 0.03, (r, freq, p)


def test_sample_frequencies_match_softmax():
    torch.manual_seed(3)
    base = torch.randn(1, 8)
    n = 20000
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 0.5):
        s = sample_next(base.repeat(n, 1), temperature, None, None, g)
        freq = torch.bincount(s, minlength=8).double() / n
        p = (base[0].double() / temperature).softmax(-1)
        assert (freq - p).abs().max().item() < 0.015, (temperature, freq, p)


def test_sample_seeded_generator_reproducible():
    torch.manual_seed(4)
    logits = torch.randn(16, 97)
    a = sample_next(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(123))
    b = sample_next(logits, 1.0, 20, 0.9, torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    m = make_model()
    prompts = [[1, 2, 3], [4, 5]]
    o1 = m.generate(prompts, 20, pad_id=0, temperature=1.0, generator=torch.Generator().manual_seed(7))
    o2 = m.generate(prompts, 20, pad_id=0, temperature=1.0, generator=torch.Generator().manual_seed(7))
    o3 = m.generate(prompts, 20, pad_id=0, temperature=1.0, generator=torch.Generator().manual_seed(8))
    assert o1 == o2
    assert o1 != o3


# ----------------------------------------------------------------------------- 7. lm_loss

@pytest.fixture
def loss_inputs():
    torch.manual_seed(5)
    h = torch.randn(3, 5, 16)
    w = torch.randn(11, 16)
    t = torch.randint(0, 11, (3, 5))
    t[0, 1] = t[2, 4] = t[1, 0] = -100
    return h, w, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lm_loss_equals_cross_entropy(loss_inputs, reduction):
    h, w, t = loss_inputs
    got = lm_loss(h, w, t, reduction)
    want = F.cross_entropy((h @ w.T).reshape(-1, 11), t.reshape(-1), reduction=reduction)
    if reduction == "none":
        want = want.view(3, 5)
        assert got.shape == t.shape
    torch.testing.assert_close(got, want)


def test_ce_impl_torch_keeps_the_kernel_out_and_gives_the_same_loss(loss_inputs, monkeypatch):
    """ModelConfig.ce_impl = "torch" (train_pretrain.py --ce-impl torch): the loss never
    goes through fused_kernels, and equals the kernel path's (here its CPU path) and the
    plain cross-entropy."""
    import model as model_module
    h, w, t = loss_inputs
    fused = lm_loss(h, w, t, "none", return_entropy=True)
    calls = []
    real = model_module._kernel
    def spy(module, name):
        if module == "cross_entropy":
            calls.append(name)
        return real(module, name)
    monkeypatch.setattr(model_module, "_kernel", spy)
    plain = lm_loss(h, w, t, "none", return_entropy=True, impl="torch")
    assert calls == []
    torch.testing.assert_close(plain[0], fused[0])
    torch.testing.assert_close(plain[1], fused[1])
    cfg = ModelConfig(vocab_size=11, n_layer=1, n_head=2, n_kv_head=1, d_model=16, max_seq_len=8, ce_impl="torch")
    torch.manual_seed(0)
    net = Transformer(cfg)
    idx = torch.randint(0, 11, (2, 8))
    net(idx, idx)
    assert calls == []  # the model's loss took the plain path too
    assert ModelConfig.from_dict(cfg.to_dict()).ce_impl == "torch"
    with pytest.raises(ValueError, match="ce_impl"):
        ModelConfig(vocab_size=11, ce_impl="triton")


def test_lm_loss_ignore_index(loss_inputs):
    h, w, t = loss_inputs
    per = lm_loss(h, w, t, "none")
    ignored = t == -100
    assert torch.all(per[ignored] == 0)
    assert torch.all(per[~ignored] > 0)
    torch.testing.assert_close(lm_loss(h, w, t, "mean"), per[~ignored].mean())
    torch.testing.assert_close(lm_loss(h, w, t, "sum"), per.sum())


def test_lm_loss_skipping_ignored_rows_keeps_gradients_and_entropy(loss_inputs):
    h, w, t = (x.double() if x.is_floating_point() else x for x in loss_inputs)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    weights = torch.linspace(0.5, 2.0, t.numel(), dtype=torch.float64).view(t.shape)
    per, entropy = lm_loss(h1, w1, t, "none", temperature=0.7, return_entropy=True)
    (per * weights).sum().backward()
    logits = (h2 @ w2.T) / 0.7
    want = F.cross_entropy(logits.reshape(-1, 11), t.reshape(-1), reduction="none").view(t.shape)
    (want * weights).sum().backward()
    torch.testing.assert_close(per, want)
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)
    logp = logits.detach().log_softmax(-1)
    want_entropy = -(logp.exp() * logp).sum(-1) * (t != -100)  # ignored rows are not computed: 0
    torch.testing.assert_close(entropy, want_entropy)


def test_lm_loss_all_ignored_is_zero_with_zero_grads():
    torch.manual_seed(6)
    h = torch.randn(2, 4, 16, requires_grad=True)
    w = torch.randn(11, 16, requires_grad=True)
    t = torch.full((2, 4), -100)
    for reduction in ("mean", "sum"):
        loss = lm_loss(h, w, t, reduction)
        assert loss.item() == 0.0 and not torch.isnan(loss)
        h.grad = w.grad = None
        loss.backward()
        for g in (h.grad, w.grad):
            assert g is not None and torch.isfinite(g).all() and torch.all(g == 0)
    m = make_model()
    loss = m(rand_idx(2, 8), torch.full((2, 8), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and torch.all(p.grad == 0) for p in m.parameters())


@pytest.mark.parametrize("variant", ["gqa", "gpt2"])
def test_model_loss_equals_loss_from_logits(variant):
    m = make_model(**VARIANTS[variant])
    idx = rand_idx(2, 12)
    targets = rand_idx(2, 12, seed=7)
    targets[0, :3] = -100
    with torch.no_grad():
        logits = m(idx)
        for reduction in ("mean", "sum", "none"):
            want = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction=reduction)
            got = m(idx, targets, reduction=reduction)
            torch.testing.assert_close(got, want.view(2, 12) if reduction == "none" else want)
        kv = torch.tensor([0, 4])
        torch.testing.assert_close(
            m(idx, targets, kv_start=kv),
            F.cross_entropy(m(idx, kv_start=kv).reshape(-1, V), targets.reshape(-1)))


# ----------------------------------------------------------------------------- 8. gradients

@pytest.mark.parametrize("variant", ["gqa", "gpt2"])
def test_gradients_match_finite_differences(variant):
    """Central differences on a few scalar entries in float64. The tolerance allows the
    model's internal float32 steps (see the float64 precision tests); a wrong or missing
    gradient term is off by far more."""
    m = make_model(dtype=F64, n_layer=2, d_model=16, n_head=2, n_kv_head=1 if variant == "gqa" else 2,
                   **({} if variant == "gqa" else GPT2_KW))
    m.cfg.attn_impl = "sdpa"
    idx = rand_idx(2, 8, seed=12)
    targets = rand_idx(2, 8, seed=13)

    def loss_fn():
        logits = m(idx)
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), reduction="sum")

    m.zero_grad()
    loss_fn().backward()
    params = dict(m.named_parameters())
    picks = [("blocks.0.attn.wq.weight", (1, 3)), ("blocks.0.attn.wk.weight", (2, 5)),
             ("blocks.1.attn.wv.weight", (0, 7)), ("blocks.0.attn.wo.weight", (4, 1)),
             ("blocks.1.mlp.w1.weight", (5, 2)), ("blocks.0.mlp.w2.weight", (3, 6)),
             ("blocks.1.norm1.weight", (2,)), ("norm_f.weight", (0,)),
             ("tok_emb.weight", (int(idx[0, 0]), 3))]
    if variant == "gqa":
        picks.append(("blocks.0.mlp.w3.weight", (1, 1)))
    else:
        picks += [("pos_emb.weight", (2, 4)), ("blocks.0.attn.wq.bias", (3,)), ("blocks.1.norm2.bias", (5,))]
    eps = 3e-3
    for name, where in picks:
        p = params[name]
        analytic = p.grad[where].item()
        with torch.no_grad():
            orig = p[where].item()
            p[where] = orig + eps
            up = loss_fn().item()
            p[where] = orig - eps
            down = loss_fn().item()
            p[where] = orig
        numeric = (up - down) / (2 * eps)
        assert abs(analytic - numeric) <= 1e-4 + 1e-3 * abs(numeric), (name, analytic, numeric)


@pytest.mark.parametrize("variant", ["gqa", "gpt2"])
def test_eager_and_sdpa_gradients_agree(variant):
    m = make_model(**VARIANTS[variant])
    idx = rand_idx(3, 14)
    targets = rand_idx(3, 14, seed=8)
    kv = torch.tensor([0, 3, 8])
    grads = {}
    for impl in ("eager", "sdpa"):
        m.zero_grad()
        with attn_impl(m, impl):
            m(idx, targets, kv_start=kv).backward()
        grads[impl] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for n in grads["eager"]:
        torch.testing.assert_close(grads["eager"][n], grads["sdpa"][n], atol=1e-5, rtol=1e-4, msg=n)
    assert any(g.abs().sum() > 0 for n, g in grads["sdpa"].items() if "attn.wq" in n)


# ----------------------------------------------------------------------------- 9. GPT-2 variant

def test_gpt2_variant_structure_forward_backward_generate():
    m = make_model(**VARIANTS["gpt2"])
    assert m.lm_head.weight is m.tok_emb.weight
    assert isinstance(m.blocks[0].norm1, torch.nn.LayerNorm) and m.blocks[0].norm1.bias is not None
    assert m.pos_emb is not None and not hasattr(m.blocks[0].mlp, "w3")
    assert m.blocks[0].attn.wq.bias is not None and m.blocks[0].mlp.w2.bias is not None
    m.train()
    idx, targets = rand_idx(2, 10), rand_idx(2, 10, seed=3)
    loss = m(idx, targets)
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    # the tied matrix gets gradient from both the lookup and the head: rows of unseen tokens too
    unseen = sorted(set(range(V)) - set(idx.flatten().tolist()))[0]
    assert m.tok_emb.weight.grad[unseen].abs().sum() > 0
    m.eval()
    out = m.generate([[1, 2, 3], [4]], 6, pad_id=0, temperature=0.8, top_k=10,
                     generator=torch.Generator().manual_seed(0))
    assert [len(r) for r in out] == [6, 6] and all(0 <= t < V for r in out for t in r)
    # learned positions have a hard limit too
    with pytest.raises(ValueError):
        m(torch.zeros(1, m.cfg.max_seq_len + 1, dtype=torch.long))


def test_untied_lm_head_is_separate():
    m = make_model()
    assert m.lm_head.weight is not m.tok_emb.weight
    assert m.pos_emb is None


# ----------------------------------------------------------------------------- 10. init

@pytest.mark.parametrize("variant", ["gqa", "gpt2"])
def test_init_statistics(variant):
    torch.manual_seed(0)
    L, std = 4, 0.02
    m = Transformer(make_cfg(**{**VARIANTS[variant], "d_model": 256, "n_layer": L, "init_std": std}))
    resid = std / math.sqrt(2 * L)
    n_matrix = 0
    for name, p in m.named_parameters():
        if p.ndim == 1:
            if name.endswith(("norm1.weight", "norm2.weight", "norm_f.weight")):
                assert torch.all(p == 1), name
            else:
                assert name.endswith("bias") and torch.all(p == 0), name
            continue
        n_matrix += 1
        want = resid if name.endswith(("attn.wo.weight", "mlp.w2.weight")) else std
        assert abs(p.std().item() - want) < 0.05 * want, (name, p.std().item(), want)
        assert abs(p.mean().item()) < 5 * want / math.sqrt(p.numel()), name
    assert n_matrix > 0
    if variant == "gpt2":
        assert any(n.endswith("bias") for n, _ in m.named_parameters())
    # init_std is honoured
    torch.manual_seed(0)
    m2 = Transformer(make_cfg(d_model=256, n_layer=L, init_std=0.05))
    assert abs(m2.blocks[0].attn.wq.weight.std().item() - 0.05) < 0.0025
    assert abs(m2.blocks[0].mlp.w2.weight.std().item() - 0.05 / math.sqrt(2 * L)) < 0.05 * 0.05 / math.sqrt(2 * L)


# ----------------------------------------------------------------------------- 11. counting and presets

def expected_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, matmul weights) counted from the config by hand."""
    d, H, Hkv, hd, L, Vv, f = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_layer, cfg.vocab_size, cfg.d_ff
    b = 1 if cfg.bias else 0
    attn = d * H * hd + 2 * d * Hkv * hd + H * hd * d + b * (H * hd + 2 * Hkv * hd + d)
    mlp = (3 * d * f + b * (2 * f + d)) if cfg.mlp == "swiglu" else (2 * d * f + b * (f + d))
    norm = d * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    block = attn + mlp + 2 * norm
    emb = Vv * d
    pos = cfg.max_seq_len * d if cfg.pos_emb == "learned" else 0
    head = 0 if cfg.tie_embeddings else Vv * d
    total = emb + pos + L * block + norm + head
    matmul = total - pos - (0 if cfg.tie_embeddings else emb)
    return total, matmul


@pytest.mark.parametrize("variant", ["mha", "gqa", "mqa", "gpt2"])
def test_num_params_and_flops(variant):
    m = make_model(**VARIANTS[variant])
    unique = {id(p): p.numel() for p in m.parameters()}
    total, matmul = expected_params(m.cfg)
    assert m.num_params() == sum(unique.values()) == total
    assert m.num_params(exclude_embedding=True) == matmul
    if m.cfg.tie_embeddings:  # counted once although lm_head and tok_emb both hold it
        assert m.num_params() < sum(p.numel() for _, p in m.named_parameters(remove_duplicate=False))
    for T in (1, 17, 64):
        assert m.flops_per_token(T) == 6 * m.num_params(exclude_embedding=True) + 12 * m.cfg.n_layer * m.cfg.d_model * T


@pytest.mark.parametrize("name", ["tiny", "gpt2-124m", "350m"])
def test_presets_build_valid_configs(name):
    cfg = ModelConfig(vocab_size=8192, **PRESETS[name])
    assert cfg.d_model % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0
    assert cfg.head_dim % 2 == 0
    assert cfg.d_ff % 64 == 0 and cfg.d_ff >= 8 * cfg.d_model / 3
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    total, _ = expected_params(cfg)
    if name == "gpt2-124m":
        assert cfg.n_kv_head == cfg.n_head and cfg.n_layer == 12 and cfg.d_model == 768
    if name == "350m":
        assert 250e6 < total < 450e6


def test_tiny_preset_instantiates():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=8192, **PRESETS["tiny"]))
    n = m.num_params()
    assert 3_000_000 <= n <= 10_000_000
    assert n == expected_params(m.cfg)[0]
    with torch.no_grad():
        assert m(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 8192)


@pytest.mark.parametrize("d_model", [32, 64, 96, 100, 256, 768, 1000, 1024])
def test_d_ff_derivation(d_model):
    swi = ModelConfig(d_model=d_model, n_head=2, n_kv_head=2)
    assert swi.d_ff % 64 == 0
    assert 8 * d_model / 3 <= swi.d_ff < 8 * d_model / 3 + 64
    gelu = ModelConfig(d_model=d_model, n_head=2, n_kv_head=2, mlp="gelu")
    assert gelu.d_ff == 4 * d_model
    assert ModelConfig(d_model=d_model, n_head=2, n_kv_head=2, d_ff=123).d_ff == 123


# ----------------------------------------------------------------------------- 12. config validation

@pytest.mark.parametrize("kw", [
    dict(d_model=30, n_head=4),
    dict(n_head=4, n_kv_head=3),
    dict(norm="batchnorm"),
    dict(mlp="relu"),
    dict(attn_impl="flash"),
    dict(pos_emb="alibi"),
    dict(d_model=24, n_head=8, n_kv_head=8),  # head_dim 3: odd, rope impossible
])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ValueError):
        make_cfg(**kw)


def test_config_odd_head_dim_allowed_with_learned_positions():
    cfg = make_cfg(d_model=24, n_head=8, n_kv_head=8, pos_emb="learned")
    assert cfg.head_dim == 3


def test_config_dict_round_trip_and_unknown_keys():
    cfg = make_cfg(**GPT2_KW, norm_eps=1e-6, rope_theta=5e5, dropout=0.1)
    d = cfg.to_dict()
    assert d["norm"] == "layernorm" and d["d_ff"] == 128
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict({}) == ModelConfig()
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**d, "bogus": 1})


# ----------------------------------------------------------------------------- 13. length limits

def test_sequence_longer_than_max_seq_len_raises():
    m = make_model()
    m(torch.zeros(1, 64, dtype=torch.long))  # exactly max_seq_len is fine
    with pytest.raises(ValueError):
        m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError):
        m(torch.zeros(2, 65, dtype=torch.long), kv_start=torch.tensor([0, 3]))


def test_kv_cache_past_max_seq_len_raises():
    m = make_model()
    cache = KVCache(m.cfg, 1, m.cfg.max_seq_len, "cpu")
    with torch.no_grad():
        m(torch.zeros(1, 60, dtype=torch.long), cache=cache)
        m(torch.zeros(1, 4, dtype=torch.long), cache=cache)  # exactly 64
        assert cache.length == 64
        with pytest.raises(ValueError):
            m(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    cache = KVCache(m.cfg, 1, m.cfg.max_seq_len, "cpu")
    with torch.no_grad():
        m(torch.zeros(1, 62, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError):
            m(torch.zeros(1, 3, dtype=torch.long), cache=cache)


# ----------------------------------------------------------------------------- 14. causality

@pytest.mark.parametrize("variant", ["gqa", "gpt2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_causality(variant, impl, padded):
    m = make_model(**VARIANTS[variant])
    idx = rand_idx(2, 20, seed=14)
    kv = torch.tensor([0, 5]) if padded else None
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % V
    a = logits_with(m, impl, idx, kv_start=kv)
    b = logits_with(m, impl, changed, kv_start=kv)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=1e-6, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().amax(dim=(1, 2)).min() > 1e-3  # the change does reach later positions


def test_kv_cache_takes_the_dtype_of_the_keys():
    # under autocast or FSDP mixed precision the keys are bf16 while the weights are fp32
    cfg = ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, d_model=16, max_seq_len=16)
    cache = KVCache(cfg, 1, 16, "cpu")
    k = torch.randn(1, 1, 3, 8, dtype=torch.bfloat16)
    keys, values = cache.update(0, k, k)
    assert cache.k.dtype == torch.bfloat16 and keys.dtype == torch.bfloat16
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate([[1, 2, 3]], 4, pad_id=0, temperature=0)
    assert len(out[0]) == 4
