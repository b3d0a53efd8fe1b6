"""Where a serving decode step's time goes, without HTTP: the model's own forward (what the
engine ran before serving/decode.py), the fused step in float32 and with int8 weights, at
1, 8 and 16 rows, against two floors measured the same way — the step's matmuls alone
(the weights streamed from memory once per step) and the step's ops on a model too narrow
for its matmuls to cost anything (dispatch alone, for the model's forward and the fused
step) — and the whole engine loop (sampling, bookkeeping, text) in tokens/s.

    python -m bench.decode --ckpt /tmp/bench_ckpt --threads 1
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from checkpoint import load_for_inference
from cli import entry_point, parse_config, print_config
from model import KVCache, ModelConfig, Transformer
from serving.decode import DecodeStep
from serving.engine import BatchKVCache, Engine, GenRequest


@dataclass
class DecodeBenchConfig:
    ckpt: str = field(default="runs/pretrain", metadata={"help": "checkpoint whose architecture is measured"})
    rows: list[int] = field(default_factory=lambda: [1, 8, 16], metadata={"help": "batch sizes, comma-separated"})
    steps: int = field(default=64, metadata={"help": "decode steps per measurement"})
    repeats: int = field(default=5, metadata={"help": "measurements per cell; the table shows the median"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})
    context: int = field(default=60, metadata={"help": "tokens already in the cache when the steps start"})


def timed(fn, steps: int, repeats: int) -> float:
    """Median milliseconds per call over `repeats` runs of `steps` calls (after a warm-up)."""
    for _ in range(3):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        runs.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(runs)


def step_runner(model, rows: int, context: int, how: str):
    """A zero-argument decode step on a `rows`-row cache holding `context` tokens, rewound
    after each call so every call sees the same cache length."""
    cfg = model.cfg
    cache = BatchKVCache(cfg, rows, "cpu", model.lm_head.weight.dtype)
    pre = KVCache(cfg, rows, context, "cpu")
    with torch.inference_mode():
        model(torch.zeros(rows, context, dtype=torch.long), kv_start=torch.zeros(rows, dtype=torch.long),
              cache=pre, last_only=True)
    for j in range(rows):
        cache.insert(pre, j, context)
    ids = torch.zeros(rows, 1, dtype=torch.long)
    step = DecodeStep(model, how) if how != "model" else None

    def run():
        with torch.inference_mode():
            if step is None:
                model(ids, kv_start=cache.kv_start[:rows], cache=cache, last_only=True)
            else:
                step(ids, cache)
        cache.length = context
    return run


def matmul_floor(model, rows: int):
    """The step's matmuls alone, as the model runs them (float32, one per projection)."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}

    def run():
        with torch.inference_mode():
            for w in weights:
                F.linear(inputs[w.shape[1]], w)
    return run


def engine_rate(model, tok, rows: int, quantization: str, tokens: int = 128) -> float:
    """Generated tokens/s of the engine thread for `rows` requests of `tokens` tokens at once."""
    engine = Engine(model, tok, max_running=max(rows, 1), quantization=quantization).start()
    try:
        prompt = tok.encode("Tell me a story about a king and his three daughters.")
        tokens = min(tokens, model.cfg.max_seq_len - len(prompt))
        engine.generate(GenRequest(prompt=list(prompt), max_tokens=4, moderate=False))  # warm-up
        reqs = [GenRequest(prompt=list(prompt), max_tokens=tokens, ignore_eos=True, moderate=False)
                for _ in range(rows)]
        start = time.perf_counter()
        for r in reqs:
            engine.submit(r)
        for r in reqs:
            engine.wait(r)
        return rows * tokens / (time.perf_counter() - start)
    finally:
        engine.shutdown()


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(DecodeBenchConfig, argv, description=__doc__.split("\n")[0])
    print_config(cfg, "bench config")
    torch.set_num_threads(cfg.threads)
    load = lambda: load_for_inference(cfg.ckpt)[:2]  # noqa: E731 (a fresh copy per variant)
    model, tok = load()
    narrow = Transformer(ModelConfig(**{**model.cfg.to_dict(), "d_model": 32, "d_ff": 32, "vocab_size": 64,
                                        "n_head": 2, "n_kv_head": 1})).eval()
    print(f"{cfg.ckpt}: {model.num_params() / 1e6:.2f}M parameters, {cfg.threads} thread(s), cache {cfg.context} "
          f"tokens, median of {cfg.repeats} x {cfg.steps} steps (ms per decode step)")
    print("| rows | model forward (before) | fused step f32 | fused step int8 | matmuls alone f32 | "
          "ops alone: model forward | ops alone: fused step | engine f32 tok/s | engine int8 tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    int8_model, _ = load()
    for rows in cfg.rows:
        cells = [timed(step_runner(model, rows, cfg.context, "model"), cfg.steps, cfg.repeats),
                 timed(step_runner(model, rows, cfg.context, "none"), cfg.steps, cfg.repeats),
                 timed(step_runner(int8_model, rows, cfg.context, "int8"), cfg.steps, cfg.repeats),
                 timed(matmul_floor(model, rows), cfg.steps, cfg.repeats),
                 timed(step_runner(narrow, rows, cfg.context, "model"), cfg.steps, cfg.repeats),
                 timed(step_runner(narrow, rows, cfg.context, "none"), cfg.steps, cfg.repeats)]
        rates = [engine_rate(load()[0], tok, rows, "none"), engine_rate(load()[0], tok, rows, "int8")]
        print(f"| {rows} | " + " | ".join(f"{c:.2f}" for c in cells) + " | " +
              " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
