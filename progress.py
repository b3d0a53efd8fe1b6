"""What a long job reports while it runs: the rank-0 progress line (step/total, loss, LR,
tokens/s, ETA; MFU on CUDA), metrics.jsonl (and wandb when asked), and the seconds spent in
each named part of a stage (the main job's time table).
"""
from __future__ import annotations

import contextlib
import json
import os
import time

import torch

from cli import UserError
from data.files import atomic_write
from distributed import Env


class MetricsLogger:
    """metrics.jsonl on rank 0 (always), wandb when asked (imported only then)."""

    def __init__(self, out: str, env: Env, wandb_mode: str = "off", project: str = "pipeline",
                 run_name: str | None = None, config: dict | None = None, resume_step: int | None = None):
        """A fresh run starts a new metrics.jsonl; a resumed one keeps the records up to
        `resume_step` (those logged after the last checkpoint are logged again)."""
        self.env = env
        self.path = os.path.join(out, "metrics.jsonl")
        self.wandb = None
        if not env.is_main:
            return
        os.makedirs(out, exist_ok=True)
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        atomic_write(self.path, "".join(kept))
        resume = resume_step is not None
        if wandb_mode != "off":
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=project, name=run_name, config=config, mode=wandb_mode,
                                    dir=out, resume="allow" if resume else None)

    def log(self, record: dict) -> None:
        if not self.env.is_main:
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


# Dense bf16 peak FLOP/s for MFU, by device name (NVIDIA datasheets).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def format_seconds(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """The rank-0 progress line: step/total, loss, lr, tokens/s, ETA, MFU on CUDA."""

    def __init__(self, total_steps: int, flops_per_token: float, env: Env):
        self.total = total_steps
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(env.device)
        self.world = env.world_size
        self.steps_timed = 0
        self.seconds = 0.0

    def line(self, step: int, loss: float, lr: float, tokens: int, dt: float, steps: int) -> tuple[str, dict]:
        """`tokens` processed in `steps` optimizer steps over `dt` seconds since the last line."""
        tok_s = tokens / max(dt, 1e-9)
        self.steps_timed += steps
        self.seconds += dt
        eta = (self.total - step) * self.seconds / max(1, self.steps_timed)
        parts = [f"step {step}/{self.total}", f"loss {loss:.4f}", f"lr {lr:.2e}", f"{tok_s:,.0f} tok/s",
                 f"eta {format_seconds(eta)}"]
        stats = {"tokens_per_s": tok_s}
        if self.peak:
            mfu = tok_s * self.flops_per_token / (self.peak * self.world)
            parts.append(f"mfu {100 * mfu:.1f}%")
            stats["mfu"] = mfu
        return " | ".join(parts), stats


class PartTimes:
    """Seconds per named part of a stage (evaluation, checkpoint, ...): its time table."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] = self.seconds.get(part, 0.0) + seconds

    @contextlib.contextmanager
    def part(self, name: str):
        t = time.time()
        try:
            yield
        finally:
            self.add(name, time.time() - t)

    def total(self) -> float:
        return sum(self.seconds.values())
