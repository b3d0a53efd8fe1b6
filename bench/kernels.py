"""GPU benchmarks of the kernels against PyTorch; prints tables and appends them to BENCHMARKS.md.

    python -m bench.kernels [--append BENCHMARKS.md] [--only attention|ce] [--sweep]
    python -m bench.kernels --cpu-loss [--append BENCHMARKS.md]     (the one CPU benchmark)
    python -m bench.kernels --compile-check                          (no GPU needed)

Attention: causal, bf16, grouped-query (4 query heads per K/V head), head dim 64 and
128, T = 1k..8k at 16k tokens per batch. Forward and forward+backward TFLOP/s of
`fused_kernels.attention.flash_attention` against PyTorch SDPA restricted to its flash
backend and against the eager formula (model.py's attn_impl="eager", which runs out of
memory at long T: reported as such). FLOPs: 4 B H T^2 D / 2 for the causal forward
(two matmuls, half the score matrix); forward+backward counts 3.5x that (the backward
is 2.5x: five matmuls, one of them the recomputed scores). Each row also reports the
largest difference from SDPA in the output and the gradients: the bf16 check the CPU
interpreter cannot do.

Cross-entropy: `fused_kernels.cross_entropy.fused_linear_cross_entropy` against the naive
path (logits = x @ W.T, then F.cross_entropy on them in fp32), forward+backward, bf16
x and W, for V in {32k, 128k}, N in {8k, 16k}, D in {768, 4096}: time and the peak
memory allocated beyond the inputs.

--cpu-loss compares, on the CPU, model.lm_loss's former plain path (fp32 logits, then
F.cross_entropy) with fused_kernels.cross_entropy's PyTorch path at the tiny preset's sizes
(V 8192, D 256): every loss of every stage now goes through the latter.

--compile-check compiles each kernel's first-choice launch configuration for sm_90 (H100)
with triton's bundled ptxas, no GPU needed, and prints what the cubin uses: registers,
spill (stack) bytes, shared memory, wgmma (HGMMA) instructions. Evidence that a
configuration fits and uses the tensor cores as Hopper wants, not a timing.

--sweep times every launch configuration of the attention kernels (fused_kernels/attention.py
_CUDA_CONFIGS) at T=4096 so the defaults can be replaced by measured ones.
Times are medians of triton.testing.do_bench (CUDA events, L2 flushed between runs).
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cli import UserError, entry_point, parse_config, print_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class BenchConfig:
    append: str = field(default=os.path.join(REPO, "BENCHMARKS.md"),
                        metadata={"help": "markdown file to append the results to ('' to only print)"})
    only: str | None = field(default=None, metadata={"choices": ["attention", "ce"],
                                                     "help": "run only one of the two GPU benchmarks"})
    sweep: bool = field(default=False, metadata={"help": "also time every attention launch configuration"})
    cpu_loss: bool = field(default=False, metadata={
        "help": "instead: the CPU loss path, plain (former lm_loss) vs fused_kernels.cross_entropy"})
    compile_check: bool = field(default=False, metadata={
        "help": "instead: compile the kernels for sm_90 and print their resource use (no GPU needed)"})

    def __post_init__(self):
        if self.only not in (None, "attention", "ce"):  # a --config file is not checked by argparse
            raise UserError(f"--only {self.only!r}: choose attention or ce")

TOKENS = 16384
DTYPE = torch.bfloat16
ATTN_SHAPES = [  # (head dim, query heads, K/V heads)
    (64, 32, 8),
    (128, 16, 4),
]
SEQ_LENS = [1024, 2048, 4096, 8192]
CE_SHAPES = [(V, N, D) for D in (768, 4096) for V in (32768, 131072) for N in (8192, 16384)]


def bench_ms(fn, grad_to_none=None) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def eager_attention(q, k, v):
    from model import attention
    return attention(q, k, v, None, "eager")


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except (RuntimeError, TypeError):  # a build whose flash backend lacks GQA: repeat K/V
            group = q.shape[1] // k.shape[1]
            return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                  is_causal=True)


def ours(q, k, v):
    from fused_kernels.attention import flash_attention
    return flash_attention(q, k, v, causal=True, backend="triton")


def time_attention(fn, q, k, v, do):
    """(forward ms, forward+backward ms), or None for a function that runs out of memory."""
    try:
        fwd = bench_ms(lambda: fn(q, k, v))
        fwd_bwd = bench_ms(lambda: fn(q, k, v).backward(do), grad_to_none=[q, k, v])
        return fwd, fwd_bwd
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def attention_table() -> list[str]:
    rows = ["| D | heads (q/kv) | T | batch | ours fwd | SDPA flash fwd | eager fwd | ours fwd+bwd | SDPA flash "
            "fwd+bwd | eager fwd+bwd | ours / SDPA fwd+bwd | max abs diff vs SDPA (out, dq, dk, dv) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for D, H, H_kv in ATTN_SHAPES:
        for T in SEQ_LENS:
            B = max(1, TOKENS // T)
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(B, H, T, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_()
            k = torch.randn(B, H_kv, T, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_()
            v = torch.randn(B, H_kv, T, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_()
            do = torch.randn(B, H, T, D, device="cuda", dtype=DTYPE, generator=g)
            diffs = []
            for fn in (ours, sdpa_flash):
                q.grad = k.grad = v.grad = None
                out = fn(q, k, v)
                out.backward(do)
                diffs.append([out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()])
            err = ", ".join(f"{(a - b).abs().max().item():.1e}" for a, b in zip(*diffs))
            del diffs
            flops = 4 * B * H * T * T * D / 2
            times = {name: time_attention(fn, q, k, v, do)
                     for name, fn in (("ours", ours), ("sdpa", sdpa_flash), ("eager", eager_attention))}

            def tflops(name, i, mult):
                t = times[name]
                return "OOM" if t is None else f"{flops * mult / (t[i] * 1e-3) / 1e12:.0f}"

            ratio = "" if times["sdpa"] is None else f"{times['sdpa'][1] / times['ours'][1]:.2f}x"
            row = (f"| {D} | {H}/{H_kv} | {T} | {B} | {tflops('ours', 0, 1)} | {tflops('sdpa', 0, 1)} | "
                   f"{tflops('eager', 0, 1)} | {tflops('ours', 1, 3.5)} | {tflops('sdpa', 1, 3.5)} | "
                   f"{tflops('eager', 1, 3.5)} | {ratio} | {err} |")
            print(row, flush=True)
            rows.append(row)
            del q, k, v, do
            torch.cuda.empty_cache()
    return rows


def naive_ce(x, w, t):
    return F.cross_entropy((x @ w.t()).float(), t, ignore_index=-100)


def fused_ce(x, w, t):
    from fused_kernels.cross_entropy import fused_linear_cross_entropy
    return fused_linear_cross_entropy(x, w, t, backend="triton")


def measure_ce(fn, x, w, t):
    """(ms, peak bytes beyond the inputs, loss, grads) for forward+backward, or None on OOM."""
    try:
        x.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = fn(x, w, t)
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        result = (loss.detach().float(), x.grad.float(), w.grad.float())
        x.grad = w.grad = None
        ms = bench_ms(lambda: fn(x, w, t).backward(), grad_to_none=[x, w])
        return ms, peak, result
    except torch.cuda.OutOfMemoryError:
        x.grad = w.grad = None
        torch.cuda.empty_cache()
        return None


def ce_table() -> list[str]:
    rows = ["| V | N | D | naive fwd+bwd | fused fwd+bwd | time ratio | naive peak | fused peak | memory ratio | "
            "max abs diff (loss, dx, dW) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for V, N, D in CE_SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = (torch.randn(N, D, device="cuda", generator=g) / math.sqrt(D)).to(DTYPE).requires_grad_()
        w = (torch.randn(V, D, device="cuda", generator=g)).to(DTYPE).requires_grad_()
        t = torch.randint(0, V, (N,), device="cuda", generator=g)
        naive = measure_ce(naive_ce, x, w, t)
        fused = measure_ce(fused_ce, x, w, t)
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        if naive is None:
            row = f"| {V} | {N} | {D} | OOM | {fused[0]:.1f} ms | | OOM | {gib(fused[1])} | | |"
        else:
            err = ", ".join(f"{(a - b).abs().max().item():.1e}" for a, b in zip(naive[2], fused[2]))
            row = (f"| {V} | {N} | {D} | {naive[0]:.1f} ms | {fused[0]:.1f} ms | {fused[0] / naive[0]:.2f}x | "
                   f"{gib(naive[1])} | {gib(fused[1])} | {fused[1] / naive[1]:.2f}x | {err} |")
        print(row, flush=True)
        rows.append(row)
        del x, w, t, naive, fused
        torch.cuda.empty_cache()
    return rows


def sweep() -> list[str]:
    """Time each attention launch configuration at T=4096 (causal, bf16, GQA)."""
    import fused_kernels.attention as A
    rows = ["| kernel | D | (BLOCK_M, BLOCK_N, warps, stages) | ms |", "|---|---|---|---|"]
    for D, H, H_kv in ATTN_SHAPES:
        T = 4096
        B = TOKENS // T
        q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(B, H_kv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(B, H_kv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)
        for kind in ("fwd", "dkdv", "dq"):
            for cfg in A._CUDA_CONFIGS[(kind, D)]:
                A.CONFIG_OVERRIDE.clear()
                A.CONFIG_OVERRIDE[kind] = cfg
                try:
                    if kind == "fwd":
                        ms = bench_ms(lambda: ours(q, k, v))
                    else:
                        out = ours(q, k, v)
                        ms = bench_ms(lambda: out.backward(do, retain_graph=True), grad_to_none=[q, k, v])
                    cell = f"{ms:.3f}"
                except Exception as e:  # a configuration that does not fit: say so and go on
                    cell = type(e).__name__
                row = f"| {kind} | {D} | {cfg} | {cell} |"
                print(row, flush=True)
                rows.append(row)
    A.CONFIG_OVERRIDE.clear()
    return rows


def plain_lm_loss(x, w, t, reduction):
    """model.lm_loss before fused_kernels/cross_entropy.py existed."""
    per = F.cross_entropy((x @ w.t()).float(), t, ignore_index=-100, reduction="none")
    return per if reduction == "none" else per.sum() / (t != -100).sum().clamp(min=1)


def cpu_loss_table(repeats: int = 7) -> list[str]:
    """Plain vs fused loss on the CPU, A/B interleaved, best of `repeats` (a shared machine
    disturbs single runs far more than it speeds any up)."""
    import time
    from fused_kernels.cross_entropy import fused_linear_cross_entropy
    V, D = 8192, 256
    rows = ["| rows N | what | plain | fused (PyTorch path) | fused / plain |", "|---|---|---|---|---|"]
    cases = {"train step (mean, fwd+bwd)": ("mean", True), "eval (none, no grad)": ("none", False),
             "log-probs (none, fwd+bwd)": ("none", True)}
    for N in (1024, 4096, 8192):
        torch.manual_seed(0)
        x = torch.randn(N, D, requires_grad=True)
        w = (torch.randn(V, D) * 0.02).requires_grad_()
        t = torch.randint(0, V, (N,))
        for name, (reduction, grad) in cases.items():
            times = {"plain": [], "fused": []}
            for _ in range(repeats):
                for label in times:
                    fn = plain_lm_loss if label == "plain" else (
                        lambda x, w, t, r: fused_linear_cross_entropy(x, w, t, reduction=r))
                    x.grad = w.grad = None
                    t0 = time.perf_counter()
                    with torch.set_grad_enabled(grad):
                        out = fn(x, w, t, reduction)
                        if grad:
                            out.sum().backward()
                    times[label].append(time.perf_counter() - t0)
            p, f = min(times["plain"]) * 1e3, min(times["fused"]) * 1e3
            row = f"| {N} | {name} | {p:.0f} ms | {f:.0f} ms | {f / p:.2f}x |"
            print(row, flush=True)
            rows.append(row)
    return rows


def compile_check() -> list[str]:
    """Compile the attention and cross-entropy kernels for sm_90 and report resources."""
    import re
    import subprocess
    import tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import fused_kernels.attention as A
    import fused_kernels.cross_entropy as C
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    target = GPUTarget("cuda", 90, 32)
    floats = {"qk_scale", "sm_scale", "z_loss"}

    def build(jit, ptrs: dict, consts: dict, warps: int, stages: int) -> str:
        sig, attrs = {}, {}
        for i, n in enumerate(jit.arg_names):
            sig[n] = "constexpr" if n in consts else ptrs.get(n, "fp32" if n in floats else "i32")
            if n in ptrs or n.startswith("stride"):  # as the launcher specializes them: 16-aligned
                attrs[(i,)] = [["tt.divisibility", 16]]
        k = triton.compile(ASTSource(fn=jit, signature=sig, constexprs=consts, attrs=attrs), target=target,
                           options=dict(num_warps=warps, num_stages=stages))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            use = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+)", use)
        return f"{m.group(1)} | {m.group(2)} | {k.metadata.shared // 1024} KiB | {sass.count('HGMMA')}"

    rows = ["| kernel | dtype | D | (BLOCK_M, BLOCK_N, warps, stages) | registers | spill (stack) bytes | shared | HGMMA |",
            "|---|---|---|---|---|---|---|---|"]
    kernels = {"fwd": A._FWD[0], "dkdv": A._DKDV[0], "dq": A._DQ[0]}
    for dt in ("bf16", "fp32"):
        ptrs = {n: f"*{dt}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
        ptrs.update(LSE="*fp32", DELTA="*fp32", KV_START="*i32")
        for D in (64, 128):
            for kind, jit in kernels.items():
                cfg = A._CUDA_CONFIGS_FP32[kind][0] if dt == "fp32" else A._CUDA_CONFIGS[(kind, D)][0]
                bm, bn, warps, stages = cfg
                consts = dict(HEAD_DIM=D, BLOCK_D=D, EVEN_D=True, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True,
                              HAS_KV_START=True, PRECISION="tf32" if dt == "fp32" else None)
                row = f"| attention {kind} | {dt} | {D} | {cfg} | {build(jit, ptrs, consts, warps, stages)} |"
                print(row, flush=True)
                rows.append(row)
    for dt in ("bf16", "fp32"):
        ptrs = dict(LOGITS=f"*{dt}", TARGETS="*i64", LOSS="*fp32", ENTROPY="*fp32", SCALE="*fp32")
        consts = dict(WRITE_GRAD=True, HAS_SCALE=True, BLOCK_V=4096)
        row = f"| cross-entropy rows | {dt} | | (BLOCK_V 4096, 8 warps) | {build(C._CE_ROWS[0], ptrs, consts, 8, 1)} |"
        print(row, flush=True)
        rows.append(row)
    return rows


@entry_point
def main(argv=None) -> None:
    args = parse_config(BenchConfig, argv, description=__doc__.split("\n")[0])
    print_config(args, "bench config")
    if args.compile_check:
        compile_check()
        return
    if args.cpu_loss:
        import platform
        header = (f"Machine: CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, "
                  f"{torch.get_num_threads()} threads, torch {torch.__version__}. "
                  "Command: `python -m bench.kernels --cpu-loss`. V 8192, D 256, fp32, best of 7 A/B runs.")
        print(header)
        rows = cpu_loss_table()
        if args.append:
            with open(args.append, "a") as f:
                f.write(f"\n\n## Kernels: the CPU loss path — {datetime.date.today().isoformat()}\n\n{header}\n\n"
                        + "\n".join(rows) + "\n")
            print(f"appended to {args.append}")
        return
    if not torch.cuda.is_available():
        raise UserError("bench.kernels needs a CUDA GPU (torch.cuda.is_available() is False); "
                        "on the CPU the kernels are checked by tests/test_fused_kernels.py instead")
    from fused_kernels import HAS_TRITON
    if not HAS_TRITON:
        raise UserError("bench.kernels needs triton (pip install triton)")
    import triton
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    header = (f"Machine: {name}, torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}. "
              f"Command: `python -m bench.kernels{' --only ' + args.only if args.only else ''}"
              f"{' --sweep' if args.sweep else ''}`.")
    print(header)
    sections = []
    if args.only in (None, "attention"):
        print("\nattention, causal bf16, TFLOP/s")
        sections.append(("Attention, causal, bf16, TFLOP/s (16k tokens per batch)", attention_table()))
    if args.only in (None, "ce"):
        print("\nfused linear cross-entropy, bf16, forward+backward")
        sections.append(("Fused linear cross-entropy, bf16, forward+backward", ce_table()))
    if args.sweep:
        print("\nattention launch configurations, T=4096")
        sections.append(("Attention launch configurations, T=4096, causal bf16 GQA", sweep()))
    if args.append:
        with open(args.append, "a") as f:
            f.write(f"\n\n## Kernels (GPU) — {datetime.date.today().isoformat()}\n\n{header}\n")
            for title, rows in sections:
                f.write(f"\n{title}:\n\n" + "\n".join(rows) + "\n")
        print(f"\nappended to {args.append}")


if __name__ == "__main__":
    main()
