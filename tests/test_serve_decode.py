"""The serving engine's fused decode step (serving/decode.py) against the model's own forward:
the same logits for every architecture the model supports (GQA and MHA, RMSNorm and
LayerNorm, SwiGLU and GELU, rotary and learned positions, biases, tied embeddings) on a
continuously batched, left-padded cache with rows leaving; int8 weights within their
rounding of a float reference; and `serve.py --quantization int8` answering a real client."""
from __future__ import annotations

import os

import pytest
import torch

from model import KVCache, ModelConfig, Transformer
from serving.decode import DecodeStep, quantize_int8
from serving.engine import BatchKVCache

CONFIGS = {
    "llama (gqa, rmsnorm, swiglu, rope)": dict(n_head=4, n_kv_head=2),
    "gpt2 (mha, layernorm, gelu, learned positions, biases, tied)": dict(
        n_head=3, n_kv_head=3, d_model=48, norm="layernorm", mlp="gelu", pos_emb="learned", bias=True,
        tie_embeddings=True),
    "qwen (qkv bias, one kv head)": dict(n_head=4, n_kv_head=1, qkv_bias=True),
}


def tiny(dtype=torch.float64, **overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, n_layer=2, d_model=64, d_ff=88, max_seq_len=64, init_std=0.3, attn_impl="sdpa")
    model = Transformer(ModelConfig(**{**cfg, **overrides})).to(dtype).eval()
    with torch.no_grad():  # biases and norm gains away from 0 and 1, so a dropped term would show
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def prefilled(model, prompts: list[list[int]], dtype) -> BatchKVCache:
    """A batch cache holding `prompts` as left-padded rows (what Engine._prefill builds)."""
    width = max(map(len, prompts))
    idx = torch.zeros(len(prompts), width, dtype=torch.long)
    for j, p in enumerate(prompts):
        idx[j, width - len(p):] = torch.tensor(p)
    pre = KVCache(model.cfg, len(prompts), width, "cpu")
    model(idx, kv_start=torch.tensor([width - len(p) for p in prompts]), cache=pre, last_only=True)
    cache = BatchKVCache(model.cfg, 4, "cpu", dtype)
    for j, p in enumerate(prompts):
        cache.insert(pre, j, len(p))
    return cache


PROMPTS = [[5, 9, 2, 40, 7, 7, 1], [3], [11, 12, 13, 14], [60, 61]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_step_computes_the_models_forward(name):
    model = tiny(**CONFIGS[name])
    step = DecodeStep(model)
    with torch.inference_mode():
        ours, theirs = prefilled(model, PROMPTS, torch.float64), prefilled(model, PROMPTS, torch.float64)
        ids = torch.tensor([[4], [8], [15], [16]])
        for t in range(9):
            if t == 4:  # a row leaves mid-generation; the last row moves into its place
                for cache in (ours, theirs):
                    cache.remove(1)
                ids = ids[[0, 3, 2]]
            n = ids.shape[0]
            want = model(ids, kv_start=theirs.kv_start[:n], cache=theirs, last_only=True)
            got = step(ids, ours)
            assert got.dtype == torch.float32  # logits for sampling, whatever the model's dtype
            torch.testing.assert_close(got.double(), want.float().double(), rtol=0, atol=1e-6)
            assert ours.length == theirs.length
            torch.testing.assert_close(ours.k[:, :n, :, :ours.length], theirs.k[:, :n, :, :theirs.length],
                                       rtol=0, atol=1e-12)
            ids = want.argmax(-1, keepdim=True)


def test_fused_step_in_float32_gives_the_same_greedy_ids():
    model = tiny(torch.float32, **CONFIGS["llama (gqa, rmsnorm, swiglu, rope)"])
    step = DecodeStep(model)
    with torch.inference_mode():
        ours, theirs = prefilled(model, PROMPTS, torch.float32), prefilled(model, PROMPTS, torch.float32)
        a = b = torch.tensor([[4], [8], [15], [16]])
        for _ in range(20):
            a = model(a, kv_start=theirs.kv_start[:4], cache=theirs, last_only=True).argmax(-1, keepdim=True)
            b = step(b, ours).argmax(-1, keepdim=True)
            assert torch.equal(a, b)


def test_int8_quantization_is_symmetric_per_row_and_within_half_a_step():
    w = torch.randn(37, 53) * torch.linspace(0.01, 3, 37)[:, None]  # rows of very different scales
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (37,)
    assert int(q.abs().max()) == 127 and (q.abs().amax(1) == 127).all()  # each row uses its full range
    assert ((w - q.float() * scale[:, None]).abs() <= scale[:, None] / 2 + 1e-7).all()
    zero_q, zero_scale = quantize_int8(torch.zeros(2, 5))
    assert (zero_q == 0).all() and torch.isfinite(zero_scale).all()


def bf16_rounding_linears(model, step: DecodeStep) -> None:
    """Make the model's projections compute what PyTorch's int8 kernel computes: the input
    rounded to bfloat16, times the int8-rounded weight, the output rounded to bfloat16."""
    def rounded(module):
        def forward(x):
            y = torch.nn.functional.linear(x.bfloat16().double(), module.weight.double())
            return y.bfloat16().float() + (0 if module.bias is None else module.bias)
        module.forward = forward
    for block in model.blocks:
        for module in (block.attn.wq, block.attn.wk, block.attn.wv, block.attn.wo, block.mlp.w1, block.mlp.w2) + \
                ((block.mlp.w3,) if block.mlp.swiglu else ()):
            rounded(module)
    rounded(model.lm_head)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_int8_step_matches_a_reference_with_the_kernels_rounding(name):
    model = tiny(torch.float32, **{**CONFIGS[name], "d_ff": 96})  # widths the int8 kernel takes (multiples of 16)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    step = DecodeStep(model, "int8")
    step.apply_to_model()  # the model (the prefill) now holds the weights the int8 kernel multiplies by
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert any("wq" in k for k in changed) and any("w2" in k for k in changed)
    for k in changed:  # each weight moved by at most half a quantization step
        torch.testing.assert_close(model.state_dict()[k], original[k], rtol=0,
                                   atol=float(original[k].abs().max()) / 127)
    with torch.inference_mode():
        ours, theirs = prefilled(model, PROMPTS, torch.float32), prefilled(model, PROMPTS, torch.float32)
        bf16_rounding_linears(model, step)
        ids = torch.tensor([[4], [8], [15], [16]])
        for _ in range(6):
            want = model(ids, kv_start=theirs.kv_start[:4], cache=theirs, last_only=True)
            got = step(ids, ours)
            # equal but for where the kernel's float32 sums round to the other side of a bfloat16
            assert float((got - want).abs().max()) < 0.01 * float(want.abs().max())
            ids = want.argmax(-1, keepdim=True)


def test_int8_falls_back_to_float_where_the_kernel_cannot_go():
    model = tiny(torch.float32, d_ff=88)  # w2 reads 88 inputs: not a multiple of 16
    step = DecodeStep(model, "int8")
    _, _, _, _, _, w2, _ = step.layers[0]
    assert w2.weight is not None and torch.equal(w2.weight, w2.dequantized())
    with torch.inference_mode():
        cache = prefilled(model, PROMPTS, torch.float32)
        assert torch.isfinite(step(torch.tensor([[4], [8], [15], [16]]), cache)).all()


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization"):
        DecodeStep(tiny(torch.float32), "int4")


def test_serve_with_int8_weights_answers_the_openai_client(data_dirs, tmp_path):
    openai = pytest.importorskip("openai")
    from serve_helpers import ServerProcess, make_checkpoint
    ckpt = make_checkpoint(tmp_path / "tiny", os.path.join(data_dirs[0], "tokenizer.json"))
    server = ServerProcess(["--ckpt", ckpt, "--log-dir", str(tmp_path / "logs"), "--quantization", "int8"],
                           tmp_path / "server.log").wait_ready()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}],
                                               max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"
        chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=6, temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # text was streamed
    finally:
        server.stop()


def test_decode_benchmark_prints_its_profile_table(data_dirs, tmp_path, capsys):
    from bench import decode as bench_decode
    from serve_helpers import make_checkpoint
    ckpt = make_checkpoint(tmp_path / "tiny", os.path.join(data_dirs[0], "tokenizer.json"), max_seq_len=128)
    bench_decode.main(["--ckpt", ckpt, "--rows", "1,2", "--steps", "2", "--repeats", "1", "--context", "8"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1 |") or
            line.startswith("| 2 |")]
    assert len(rows) == 2
    for line in rows:  # rows, six step times in ms, two engine rates: all positive numbers
        cells = [float(c) for c in line.strip("|").split("|")]
        assert len(cells) == 9 and min(cells) > 0


@pytest.mark.parametrize("args, message", [(["--repeats", "0"], "must be positive"),
                                           (["--llama-server", "/nonexistent/llama-server"], "not an executable"),
                                           (["--quantization", "int4"], "invalid choice")])
def test_serving_benchmark_refuses_bad_options(args, message):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "bench.serve", *args], cwd=root, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
