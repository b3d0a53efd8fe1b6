"""What every training stage does the same way, so each train_*.py can tell only its algorithm:
the `Trainer` (precision, sharding, AdamW with weight decay on matrices only, the LR
schedule: linear warmup then cosine or warmup-stable-decay, gradient sync and clipping, the
non-finite guard, checkpoints and exact resume), the options every stage has
(`TrainConfig`) and SIGTERM/SIGINT handling (finish the step, save, exit cleanly).
Processes and devices are in distributed.py, the checkpoint format in checkpoint.py, the
progress line and metrics.jsonl in progress.py.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from checkpoint import load_training_state, save_checkpoint
from cli import UserError
from distributed import (Env, all_reduce_mean, any_rank, autocast, compute_dtype, exit_skipping_finalization,
                         prepare_model, print0, setup, teardown)
from model import Transformer
from progress import MetricsLogger, PartTimes, Progress

# ----------------------------------------------------------------------------- optimizer and schedule

def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.AdamW:
    """AdamW; decay only on matrices (norm gains and biases are not shrunk toward 0)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def lr_at(step: int, total: int, base_lr: float, warmup: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """LR for optimizer step `step` (0-based) of `total`.

    cosine: linear warmup, then half a cosine down to min_lr_ratio * base_lr.
    wsd: linear warmup, constant, then a linear decay over the last decay_frac of training
    (warmup-stable-decay, Hu et al. 2024 "MiniCPM").
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    min_lr = base_lr * min_lr_ratio
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "wsd":
        decay_start = int(total * (1 - decay_frac))
        if step < decay_start:
            return base_lr
        return base_lr + (min_lr - base_lr) * (step - decay_start) / max(1, total - decay_start)
    if schedule == "constant":
        return base_lr
    raise ValueError(f"unknown schedule {schedule!r}")


# ----------------------------------------------------------------------------- signals

class StopSignal:
    """SIGTERM/SIGINT ask the loop to save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C means now
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nreceived signal {signum}: saving a checkpoint at the end of this step", file=sys.stderr, flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the shared loop

def run_main(config_class, train_fn, argv=None, description: str = "") -> None:
    """Parse the config, join the process group, run train_fn(cfg, env), leave the group.
    Each train script's `main` calls this under cli.entry_point: a user mistake (bad option,
    file, checkpoint or data: a cli.UserError) propagates to it as one error line; any
    other exception is a bug and keeps its traceback."""
    from cli import parse_config
    cfg = parse_config(config_class, argv, description=description)
    error, finished = None, False
    try:
        env = setup(cfg.device)
        train_fn(cfg, env)
        finished = True
    except UserError as e:
        error = e
    finally:
        gloo = teardown()
    if gloo and (finished or error is not None):
        # the one exit outside an entry point: gloo's threads must not meet finalization
        exit_skipping_finalization(0 if finished else 2, None if finished else f"error: {error}")
    if error is not None:
        raise error


@dataclass
class TrainConfig:
    """The options every train script has (docs/design.md); a stage subclasses it, adds its own
    fields and may re-declare a field to change its default."""
    out: str = "runs/out"
    init: str | None = None
    resume: bool = False
    max_steps: int = 100
    batch_size: int = 8
    lr: float = 1e-3
    schedule: str = "cosine"
    schedule_steps: int = 0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    max_nonfinite: int = 5
    eval_every: int = 100
    save_every: int = 100
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    wandb: str = "off"

    help_texts: ClassVar[dict] = {
        "out": "checkpoint directory", "init": "start from this checkpoint", "resume": "continue from the state in --out",
        "batch_size": "sequences per forward pass on each rank", "schedule_steps": "length of the LR schedule (0 = max_steps)",
        "max_nonfinite": "stop after this many non-finite losses in a row", "wandb": "off | offline | online",
        "dtype": "auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16", "device": "auto | cpu | cuda",
        "schedule": "cosine | wsd (warmup-stable-decay) | constant", "compile": "torch.compile each block",
        "grad_checkpointing": "recompute activations in backward to save memory",
        "max_steps": "optimizer steps to train", "lr": "peak learning rate (AdamW)",
        "warmup_steps": "linear warm-up steps before the schedule", "min_lr_ratio": "the schedule's floor, a share of --lr",
        "weight_decay": "AdamW weight decay (matrices only)", "beta1": "AdamW beta1", "beta2": "AdamW beta2",
        "grad_clip": "clip the gradient norm to this", "eval_every": "evaluate every N steps (and at the last)",
        "save_every": "checkpoint every N steps (and at the last)", "log_every": "print and log every N steps",
        "seed": "seed of the data order, sampling and initialization",
        "eval_max_new_tokens": "longest answer generated in the gold evaluation",
        "dropout": "dropout probability while training",
    }

    def __post_init__(self):
        from cli import UserError
        for name in ("batch_size", "max_steps", "eval_every", "save_every", "log_every", "max_nonfinite"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("schedule_steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise UserError("need --lr > 0, --grad-clip > 0 and --weight-decay >= 0")
        choices = {"schedule": ("cosine", "wsd", "constant"), "device": ("auto", "cpu", "cuda"),
                   "dtype": ("auto", "float32", "bfloat16"), "wandb": ("off", "offline", "online")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")



class Trainer:
    """The bookkeeping around a stage's loss: precision, sharding, optimizer, LR schedule,
    gradient sync and clipping, the non-finite guard, logging, checkpoints, resume, signals.

    A stage's loop reads:
        while trainer.step < cfg.max_steps:
            trainer.set_lr()
            for micro in range(accum):
                with trainer.autocast():
                    loss = <the stage's loss>
                trainer.backward(loss, micro=micro, accum=accum)
            if not trainer.optimizer_step(mean_loss, tokens):
                continue
            if trainer.due(cfg.eval_every): <evaluate>
            trainer.maybe_save()
            if trainer.stop_requested(): break
    """

    def __init__(self, cfg: TrainConfig, env: Env, model: Transformer, *, stage: str, tokenizer_path: str,
                 data_state=lambda: {}, extra_config: dict | None = None, before_save=None):
        from cli import config_dict
        self.cfg, self.env, self.stage = cfg, env, stage
        self.dtype = compute_dtype(cfg.dtype, env.device)
        self.n_params = model.num_params()
        self.model_cfg = model.cfg
        self.model = prepare_model(model, env, self.dtype, cfg.compile, cfg.grad_checkpointing)
        self.optimizer = make_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), env.device)
        self.tokenizer_path = tokenizer_path
        self.data_state = data_state
        self.extra_config = extra_config or {}
        self.before_save = before_save  # e.g. PPO saves its critic before the policy
        self.train_config = config_dict(cfg)
        self.step = 0
        self.lr = 0.0
        self.nonfinite_streak = 0
        self.logger = None
        self.stop = None
        self.times = PartTimes()  # the stage's time table: see timed()
        self._loop_start = None

    # -- setup
    def resume(self) -> dict:
        """Restore weights, optimizer, RNG and step from --out; returns the saved trainer state."""
        from cli import UserError
        state = load_training_state(self.cfg.out, self.model, self.optimizer, self.env)
        self.step = state["step"]
        if self.step >= self.cfg.max_steps:
            raise UserError(f"--resume: {self.cfg.out} is already at step {self.step} >= --max-steps {self.cfg.max_steps}")
        print0(f"resumed from {self.cfg.out} at step {self.step}")
        return state

    def start(self, flops_per_token: float = 0.0, project: str | None = None) -> None:
        if self.env.is_main:
            os.makedirs(self.cfg.out, exist_ok=True)
        self.logger = MetricsLogger(self.cfg.out, self.env, self.cfg.wandb, project or self.stage,
                                    config=self.train_config, resume_step=self.step if self.cfg.resume else None)
        self.progress = Progress(self.cfg.max_steps, flops_per_token, self.env)
        self.stop = StopSignal()  # installed only now, and restored by close()
        self.t_last = time.time()
        self.tokens_since = 0
        self.steps_since = 0

    # -- the step
    def autocast(self):
        return autocast(self.env, self.dtype)

    def set_lr(self) -> float:
        cfg = self.cfg
        self.lr = lr_at(self.step, cfg.schedule_steps or cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.schedule,
                        cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        return self.lr

    def backward(self, loss: torch.Tensor, *, micro: int = 0, accum: int = 1) -> None:
        """loss / accum backward; under FSDP the gradients are reduced on the last micro-batch only."""
        if self.env.distributed:  # reduce gradients across ranks only on the last micro-batch
            self.model.set_requires_gradient_sync(micro == accum - 1)
        (loss / accum).backward()

    def optimizer_step(self, loss: torch.Tensor, tokens: int, extra: dict | None = None) -> bool:
        """Average the loss over ranks, clip, and step unless the loss or gradient is not
        finite (then skip the update, and give up after max_nonfinite in a row). Counts
        the step either way; logs every log_every steps. Returns whether it updated."""
        loss = all_reduce_mean(loss.detach())
        grad_norm = self.apply_gradients(bool(torch.isfinite(loss)))
        if grad_norm is None:
            self.step += 1
            return False
        self.end_step(loss.item(), tokens, {"grad_norm": grad_norm, **(extra or {})})
        return True

    def apply_gradients(self, loss_is_finite: bool = True) -> float | None:
        """Clip and apply the accumulated gradients; the gradient norm, or None when the
        loss or the gradient is not finite and the update was skipped. Stages with several
        updates per step (PPO's minibatches) call this, then end_step() once."""
        from cli import UserError
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if not (loss_is_finite and torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)  # the data moves on; the weights do not
            self.nonfinite_streak += 1
            print0(f"step {self.step + 1}: non-finite loss or gradient, update skipped "
                   f"({self.nonfinite_streak} in a row)")
            if self.nonfinite_streak >= self.cfg.max_nonfinite:
                raise UserError(f"{self.nonfinite_streak} non-finite steps in a row: stopping (lower --lr?)")
            return None
        self.nonfinite_streak = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def end_step(self, loss: float, tokens: int, extra: dict | None = None, suffix: str = "") -> None:
        """Count a finished step; every log_every steps print the progress line (plus
        `suffix`) and log loss, lr, speed and `extra` to metrics.jsonl."""
        self.step += 1
        self.tokens_since += tokens
        self.steps_since += 1
        if self.due(self.cfg.log_every):
            if self.env.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.time()
            line, speed = self.progress.line(self.step, loss, self.lr, self.tokens_since, now - self.t_last,
                                             self.steps_since)
            print0(line + suffix)
            self.log({"step": self.step, "loss": loss, "lr": self.lr, **(extra or {}), **speed})
            self.t_last, self.tokens_since, self.steps_since = now, 0, 0

    # -- bookkeeping
    def due(self, every: int) -> bool:
        return self.step % every == 0 or self.step == self.cfg.max_steps

    def log(self, record: dict) -> None:
        self.logger.log(record)

    def pause_clock(self) -> None:
        """Call after evaluation or saving: that time is not training throughput."""
        self.t_last = time.time()

    @contextlib.contextmanager
    def timed(self, part: str):
        """Time a part of the stage that is not a training step (evaluation, checkpoint,
        PPO's rollouts): its seconds go to the stage's time table and not to tokens/s.
        On leaving the `with trainer:` loop, the table is logged to metrics.jsonl as
        {"step", "time_parts": {part: seconds, "training steps": the loop's remainder}}."""
        try:
            with self.times.part(part):
                yield
        finally:
            self.pause_clock()

    def add_time(self, part: str, seconds: float) -> None:
        """Count seconds timed by the stage itself (DPO's reference pass before the trainer
        existed, PPO's rollouts inside a step)."""
        self.times.add(part, seconds)

    def _save(self) -> None:
        if self.before_save is not None:
            self.before_save()
        save_checkpoint(self.cfg.out, self.model, self.optimizer, self.env, stage=self.stage, step=self.step,
                        train_config=self.train_config, trainer_state={"data": self.data_state()},
                        tokenizer_path=self.tokenizer_path, extra_config=self.extra_config)
        print0(f"saved checkpoint at step {self.step} to {self.cfg.out}")

    def save(self) -> None:
        with self.timed("checkpoint"):
            self._save()

    def maybe_save(self) -> None:
        if self.due(self.cfg.save_every):
            self.save()

    def stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM/SIGINT; saves first."""
        if not any_rank(self.stop is not None and self.stop.requested, self.env.device):
            return False
        if not self.due(self.cfg.save_every):
            self.save()
        print0(f"stopped by signal at step {self.step}; continue with --resume")
        return True

    def close(self) -> None:
        if self.stop is not None:
            self.stop.restore()
        if self.logger is not None:
            self.logger.close()

    def log_time_parts(self) -> None:
        """The stage's time table to metrics.jsonl, once, on leaving the `with trainer:` loop."""
        if self._loop_start is None:
            return
        loop_seconds, parts_before = self._loop_start
        in_loop = self.times.total() - parts_before
        parts = {**self.times.seconds, "training steps": time.time() - loop_seconds - in_loop}
        self.log({"step": self.step, "time_parts": {k: round(v, 2) for k, v in parts.items()}})
        self._loop_start = None

    def __enter__(self):
        self._loop_start = (time.time(), self.times.total())
        return self

    def __exit__(self, *exc):
        if self.logger is not None:
            self.log_time_parts()
        self.close()
        return False
