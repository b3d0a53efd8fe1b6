"""Our Triton kernels, each with a plain-PyTorch path that computes the same thing.

The package is not called `kernels`: that import name is Hugging Face's `kernels`
(a dependency of transformers), and a folder of ours by that name would shadow it.

- `fused_kernels.attention.flash_attention`: FlashAttention-2 forward and backward, causal
  or not, grouped-query attention without repeating K/V, left padding via `kv_start`.
- `fused_kernels.cross_entropy.fused_linear_cross_entropy`: the lm-head matmul and the
  cross-entropy in chunks of rows, so the (N, V) logits never exist at once.
- GPU benchmarks against PyTorch live in `bench/kernels.py` (`python -m bench.kernels`).

Which code runs (`backend="auto"`, the default of both functions), decided per call:

| tensors | TRITON_INTERPRET=1 in the environment at call time | runs |
|---|---|---|
| CUDA | no | the compiled Triton kernels |
| any | yes | the same Triton kernels, run by Triton's CPU interpreter (tests) |
| CPU | no | the plain-PyTorch path |

Triton's interpreter is normally chosen once, when triton is imported: its own library
functions (tl.max, tl.sum, tl.zeros, ...) are then built compiled or interpreted.
`launch` swaps interpreted versions of them in for the duration of an interpreted launch,
so the interpreter works whenever the variable is set, before or after the import.

`backend="triton"` insists on the kernels (a clear ValueError when they cannot run:
CPU tensors outside the interpreter, triton not installed, an unsupported dtype);
`backend="torch"` always takes the PyTorch path. Both variants of every kernel (compiled
and interpreted) are built when the module is imported, so the environment variable is
read at each call, not at import: a test can switch the interpreter on for itself
(`monkeypatch.setenv`) without changing what every other test in the process runs.
Importing these modules never needs triton; it is imported only if installed.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

try:  # optional: CPU users need not install it
    import triton  # noqa: F401
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None
    InterpretedFunction = JITFunction = None
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")


def interpret_requested() -> bool:
    """True when TRITON_INTERPRET=1 is set now (read at every call, not cached)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_backend(device: torch.device, backend: str, what: str, kernel_dtypes_ok: bool = True) -> str:
    """'compiled', 'interpret' or 'torch' for tensors on `device` (see the module docstring).
    kernel_dtypes_ok is False when the inputs' dtype has no kernel (e.g. float64): auto
    then takes the PyTorch path, and backend='triton' is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"{what}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    interpret = interpret_requested()
    possible = HAS_TRITON and kernel_dtypes_ok and (device.type == "cuda" or interpret)
    if backend == "auto":
        if not possible:
            return "torch"
        return "interpret" if interpret else "compiled"
    # backend == "triton": say exactly why it cannot run
    if not HAS_TRITON:
        raise ValueError(f"{what}: backend='triton' needs the triton package (pip install triton)")
    if not kernel_dtypes_ok:
        raise ValueError(f"{what}: the Triton kernels take float16, bfloat16 or float32 inputs")
    if not interpret and device.type != "cuda":
        raise ValueError(f"{what}: the Triton kernels need CUDA tensors (got {device.type}); "
                         "set TRITON_INTERPRET=1 to run them on the CPU through Triton's interpreter")
    return "interpret" if interpret else "compiled"


def kernel_pair(fn):
    """(compiled, interpreted) Triton kernels from one undecorated kernel function.
    @triton.jit alone would pick one of the two from TRITON_INTERPRET at import time.
    Kernels built this way must not call other @triton.jit helpers (a helper would be
    one kind or the other); ours are written inline."""
    if not HAS_TRITON:
        return None, None
    return JITFunction(fn), InterpretedFunction(fn)


_STDLIB_INTERPRETED: dict = {}  # name -> InterpretedFunction of triton.language's jit function


@contextmanager
def _interpretable_stdlib():
    """Swap triton.language's @jit library functions (tl.max, tl.sum, tl.zeros, ...) for
    interpreted ones while an interpreted kernel runs; restore them afterwards."""
    swapped = []
    for name, obj in list(vars(tl).items()):
        if isinstance(obj, JITFunction):
            if name not in _STDLIB_INTERPRETED:
                _STDLIB_INTERPRETED[name] = InterpretedFunction(obj.fn)
            setattr(tl, name, _STDLIB_INTERPRETED[name])
            swapped.append((name, obj))
    try:
        yield
    finally:
        for name, obj in swapped:
            setattr(tl, name, obj)


def launch(pair, interpret: bool, grid, *args, **kwargs):
    """Run kernel `pair` (from kernel_pair) on `grid`, compiled or interpreted."""
    compiled, interpreted = pair
    if not interpret:
        return compiled[grid](*args, **kwargs)
    with _interpretable_stdlib():
        return interpreted[grid](*args, **kwargs)
