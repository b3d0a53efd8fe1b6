"""Throughput of train_pretrain.py against a minimal plain-PyTorch loop, side by side.

    python -m bench.pretrain [--steps 40] [--append BENCHMARKS.md]

The minimal loop is the least a training step can do: the same Transformer and batch
shape, AdamW, forward, backward, step; no schedule, clipping, guards, logging or data
mixture. train_pretrain.py runs as a subprocess with evaluation and saving pushed past
the end, and its own tokens/s (metrics.jsonl) is compared. Both are timed over the same
intervals of `--warmup` steps after a warm-up interval, and each run reports its median
interval (robust to a background hiccup). Runs alternate A, B, A, B so drift hits both.
On CUDA it also reports MFU for the preset (add --compile to compare).
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cli import UserError, entry_point, parse_config, print_config
from data.shards import load_split
from data.text.tokenizer import Tokenizer
from model import PRESETS, ModelConfig, Transformer
from progress import peak_flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "prepared", "shakespeare")


@dataclass
class BenchConfig:
    preset: str = field(default="tiny", metadata={"help": "model preset (model.PRESETS)"})
    batch_size: int = field(default=4, metadata={"help": "sequences per step (of the preset's context length)"})
    steps: int = field(default=40, metadata={"help": "timed steps per run"})
    warmup: int = field(default=5, metadata={"help": "warm-up steps, and the length of each timed interval"})
    repeats: int = field(default=2, metadata={"help": "alternating runs of each side"})
    compile: bool = field(default=False, metadata={"help": "pass --compile to train_pretrain.py"})
    append: str = field(default="", metadata={"help": "append a results section to this markdown file"})

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise UserError(f"--preset {self.preset!r}: choose one of {', '.join(PRESETS)}")


def minimal_loop(preset: str, batch: int, steps: int, warmup: int, device: str, dtype: torch.dtype) -> float:
    vocab = Tokenizer.load(os.path.join(DATA, "tokenizer.json")).vocab_size
    cfg = ModelConfig(vocab_size=vocab, **PRESETS[preset])
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device == "cuda")
    tokens = load_split(DATA, "train")[0]
    T = cfg.max_seq_len
    rng = np.random.default_rng(0)
    rates = []
    t0 = None
    for step in range(warmup + steps + 1):
        if step >= warmup and (step - warmup) % warmup == 0:  # intervals of `warmup` steps, as logged below
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if t0 is not None:
                rates.append(warmup * batch * T / (now - t0))
            t0 = now
        if step == warmup + steps:
            break
        starts = rng.integers(0, len(tokens) - T - 1, size=batch)
        xy = torch.from_numpy(np.stack([tokens[s:s + T + 1].astype(np.int64) for s in starts])).to(device)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return float(np.median(rates))


def pipeline_run(preset: str, batch: int, steps: int, warmup: int, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "train_pretrain.py", "--out", out, "--preset", preset, "--batch-size", str(batch),
               "--max-steps", str(warmup + steps), "--log-every", str(warmup), "--eval-every", "1000000",
               "--save-every", "1000000", "--warmup-steps", "1", *extra]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise UserError(f"train_pretrain.py failed (exit code {proc.returncode}); its output is above")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if '"tokens_per_s"' in line]
    # intervals after the first (warm-up); each is the rate over `warmup` steps
    later = [r["tokens_per_s"] for r in rows if r["step"] > warmup]
    return float(np.median(later))


@entry_point
def main(argv=None) -> None:
    args = parse_config(BenchConfig, argv, description=__doc__.split("\n")[0])
    print_config(args, "bench config")
    if not os.path.exists(os.path.join(DATA, "meta.json")):
        raise UserError("run `python -m data.prepare` first")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_num_threads(os.cpu_count() or 1)
    extra = ["--compile"] if args.compile else []
    plain, ours = [], []
    for _ in range(args.repeats):
        plain.append(minimal_loop(args.preset, args.batch_size, args.steps, args.warmup, device, dtype))
        ours.append(pipeline_run(args.preset, args.batch_size, args.steps, args.warmup, extra))
        print(f"minimal loop {plain[-1]:,.0f} tok/s | train_pretrain.py {ours[-1]:,.0f} tok/s")
    ratio = np.mean(ours) / np.mean(plain)
    vocab = Tokenizer.load(os.path.join(DATA, "tokenizer.json")).vocab_size
    model_cfg = ModelConfig(vocab_size=vocab, **PRESETS[args.preset])
    with torch.device("meta"):
        fpt = Transformer(model_cfg).flops_per_token(model_cfg.max_seq_len)
    peak = peak_flops(torch.device(device)) if device == "cuda" else None
    mfu = f", MFU {100 * np.mean(ours) * fpt / peak:.1f}%" if peak else ""
    summary = (f"{args.preset} batch {args.batch_size}x{model_cfg.max_seq_len} on {device}: train_pretrain.py "
               f"{np.mean(ours):,.0f} tok/s vs minimal loop {np.mean(plain):,.0f} tok/s = {ratio:.2f}x{mfu}")
    print(summary)
    if args.append:
        name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
        with open(args.append, "a", encoding="utf-8") as f:
            f.write(f"\n## Stage 1 (pretraining throughput) — {datetime.date.today().isoformat()}\n\n"
                    f"Machine: {name}, torch {torch.__version__}. Command: `python -m bench.pretrain "
                    f"{' '.join(sys.argv[1:] if argv is None else argv)}`.\n\n"
                    f"| preset | batch | minimal loop | train_pretrain.py | ratio |\n|---|---|---|---|---|\n"
                    f"| {args.preset} | {args.batch_size} x {model_cfg.max_seq_len} | {np.mean(plain):,.0f} tok/s "
                    f"| {np.mean(ours):,.0f} tok/s{mfu} | {ratio:.2f}x |\n\n"
                    f"Each figure is the mean over {args.repeats} alternating runs of each run's median "
                    f"{args.warmup}-step interval ({args.steps} timed steps after {args.warmup} warm-up steps).\n")
        print(f"appended to {args.append}")


if __name__ == "__main__":
    main()
