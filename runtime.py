"""What every training stage does the same way, so each train_*.py can tell only its algorithm.

- process groups from torchrun's environment (nccl on CUDA, gloo on CPU); a plain
  single process without torchrun
- FSDP2 (`fully_shard` per block, then the root) when the world has more than one rank;
  bf16 parameters for compute with fp32 gradient reduction on CUDA
- AdamW (fused on CUDA; weight decay on matrices only) and the LR schedule (linear
  warmup, then cosine or warmup-stable-decay)
- checkpoints in the layout of docs/design.md: safetensors weights, JSON configs, resume state;
  every file written under a temporary name and renamed
- rank-0 printing, the progress line, metrics.jsonl, optional wandb
- SIGTERM/SIGINT: finish the step, save, exit cleanly
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NoReturn

import numpy as np
import torch
import torch.distributed as dist

from cli import UserError
from data.files import atomic_write, read_json, write_json  # noqa: F401 (runtime.write_json for the stages)
from model import ModelConfig, ScalarHeadModel, Transformer

if TYPE_CHECKING:
    from data.tokenizer import Tokenizer

# ----------------------------------------------------------------------------- distributed


@dataclass
class Env:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_ENV: Env | None = None


def resolve_device(device: str) -> torch.device:
    """--device auto|cpu|cuda -> the torch device (auto: CUDA when there is one)."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but CUDA is not available")
    return torch.device(device)


def setup(device: str = "auto") -> Env:
    """Join torchrun's process group if there is one; pick the device."""
    global _ENV
    device = resolve_device(device).type
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    _ENV = Env(rank, local_rank, world, dev)
    return _ENV


def teardown() -> bool:
    """Leave the process group (all ranks together). True when it was a gloo group, whose
    worker threads outlive this call (see exit_skipping_finalization)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    gloo = dist.get_backend() == "gloo"
    dist.barrier()
    dist.destroy_process_group()
    return gloo


def exit_skipping_finalization(code: int, message: str | None = None) -> NoReturn:
    """End a process that used a gloo process group: print `message` (if any) to stderr,
    flush stdout and stderr, then os._exit(code), so that the interpreter's finalization
    never runs.

    Why: destroy_process_group() does not stop gloo's worker threads (pt_gloo_runloop).
    They are joined only when the last reference to the ProcessGroup goes, and torch keeps
    references we cannot drop (FSDP2's DeviceMesh inside DTensor's lru caches, default
    arguments of torch.distributed.nn.functional, ...). A worker frees a finished work after
    wait() has already returned on the main thread; when that work holds a tensor Python has
    seen (an all_reduce input; a barrier keeps alive the works it waited for until it is
    freed itself), freeing it takes the GIL. If the main thread is finalizing the interpreter
    by then, CPython ends the worker with pthread_exit inside a noexcept C++ destructor:
    "terminate called without an active exception", SIGABRT, the rank exits -6 after a run
    that succeeded (core dump: runLoop -> ~AsyncBarrierWork -> ~AsyncAllreduceWork ->
    TensorImpl::decref_pyobject -> take_gil -> PyThread_exit_thread). Everything a run writes
    is written and closed before this, so skipping finalization loses nothing."""
    if message is not None:
        print(message, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def print0(*args, **kwargs) -> None:
    if _ENV is None or _ENV.is_main:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def any_rank(flag: bool, device) -> bool:
    """True on every rank if it is true on any rank (keeps ranks in lockstep)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(value: int, device) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum t over ranks in place (a no-op in a single process); returns t."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def rank_share(items: list, rank: int, world: int) -> tuple[list, int]:
    """(this rank's contiguous share of items, the share size every rank pads to)."""
    per_rank = -(-len(items) // world)
    return items[rank * per_rank:(rank + 1) * per_rank], per_rank


def lockstep_batches(mine: list, per_rank: int, batch_size: int, filler: list):
    """Batches of `mine` as (batch, real) pairs, padded with (filler, False) to the number
    of batches a share of per_rank items makes: every rank runs the same number of
    forwards (under FSDP each one is a collective), and filler results are not counted."""
    for i in range(0, per_rank, batch_size):
        chunk = mine[i:i + batch_size]
        yield (chunk, True) if chunk else (filler, False)


def sharded_batches(items: list, batch_size: int, rank: int, world: int):
    """Sharded evaluation: this rank's share of items in lockstep batches (see above);
    reduce the counted results with all_reduce_sum."""
    mine, per_rank = rank_share(items, rank, world)
    return lockstep_batches(mine, per_rank, batch_size, items[:1])


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor concatenated along dim 0, in rank order, on every rank (the
    tensors must have the same shape on each rank)."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------- precision and sharding

def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (where supported), fp32 on CPU."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def autocast(env: Env, dtype: torch.dtype):
    """bf16 autocast for a single process; under FSDP the mixed-precision policy casts."""
    if dtype == torch.float32 or env.distributed:
        return contextlib.nullcontext()
    return torch.autocast(env.device.type, dtype=dtype)


def prepare_model(model: Transformer, env: Env, dtype: torch.dtype, compile: bool = False,
                  grad_checkpointing: bool = False) -> Transformer:
    """Move to the device, shard with FSDP2 when distributed, optionally compile."""
    model.to(env.device)
    model.grad_checkpointing = grad_checkpointing
    if env.distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    if compile:
        for block in model.blocks:  # per block: state-dict keys stay clean, graphs stay small
            block.compile()
    return model


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


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(UserError):
    """A checkpoint directory that cannot be used: missing, truncated, inconsistent, incompatible."""


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def seed_everything(seed: int, rank: int = 0) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def full_state_dict(model: torch.nn.Module) -> dict:
    """Unsharded fp32 weights on CPU (collective under FSDP: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(out: str, model: torch.nn.Module, optimizer, env: Env, *, stage: str, step: int,
                    train_config: dict, trainer_state: dict, tokenizer_path: str, extra_config: dict | None = None) -> None:
    """Write the docs/design.md checkpoint layout into `out` (all ranks call; rank 0 writes)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    weights = full_state_dict(model)
    optim_state = None
    if optimizer is not None:
        optim_state = get_optimizer_state_dict(model, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state_dir = os.path.join(out, "state")
    if env.is_main:
        os.makedirs(state_dir, exist_ok=True)
    barrier()
    # every rank's RNG goes into the state: a resumed run must draw the same numbers
    write_json(os.path.join(state_dir, f"rng_rank{env.rank}.json"), _rng_state())
    if env.is_main:
        if optim_state is not None:
            tmp = os.path.join(state_dir, f"optimizer.pt.tmp{os.getpid()}")
            torch.save(optim_state, tmp)
            os.replace(tmp, os.path.join(state_dir, "optimizer.pt"))
        write_json(os.path.join(state_dir, "trainer.json"), {**trainer_state, "step": step, "world_size": env.world_size})
        # tied weights share storage, which safetensors refuses: store each tensor once
        tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in weights.items()}
        tmp = os.path.join(out, f"model.safetensors.tmp{os.getpid()}")
        save_file(tensors, tmp, metadata={"step": str(step), "stage": stage})
        os.replace(tmp, os.path.join(out, "model.safetensors"))
        if os.path.abspath(tokenizer_path) != os.path.abspath(os.path.join(out, "tokenizer.json")):
            shutil.copyfile(tokenizer_path, os.path.join(out, "tokenizer.json.tmp"))
            os.replace(os.path.join(out, "tokenizer.json.tmp"), os.path.join(out, "tokenizer.json"))
        write_json(os.path.join(out, "train_config.json"), train_config)
        # config.json last: it names the step the weights belong to
        write_json(os.path.join(out, "config.json"),
                   {"model": model_config_of(model).to_dict(), "stage": stage, "step": step, **(extra_config or {})})
    barrier()


def model_config_of(model: torch.nn.Module) -> ModelConfig:
    return getattr(model, "cfg")


def read_checkpoint_config(ckpt: str) -> dict:
    path = os.path.join(ckpt, "config.json")
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"checkpoint directory {ckpt} does not exist")
    config = read_json(path, CheckpointError, f"{ckpt} is not a checkpoint (no config.json)")
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{path} has no model config")
    try:
        ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid model config: {e}") from None
    return config


def load_weights(ckpt: str) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) from DIR/model.safetensors, never unpickling."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open
    path = os.path.join(ckpt, "model.safetensors")
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt} has no model.safetensors")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt: {e}") from None


def load_model(ckpt: str, device="cpu", model_class=Transformer, **overrides) -> tuple[Transformer, dict]:
    """A model with the checkpoint's weights (for --init, sample.py, scoring and evaluation).

    model_class=ScalarHeadModel loads a reward/critic checkpoint, or starts one from a
    language-model checkpoint with a fresh score head; a reward checkpoint loads as a
    plain Transformer by leaving its score head out."""
    config = read_checkpoint_config(ckpt)
    model_cfg = ModelConfig.from_dict({**config["model"], **overrides})
    with torch.device("meta"):
        model = model_class(model_cfg)
    model.to_empty(device=device)
    weights, _ = load_weights(ckpt)
    if model_cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # to_empty gives each name its own tensor: tie them again
        weights.pop("lm_head.weight", None)
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{ckpt}: weights do not match its model config: {str(e).splitlines()[1:2]}") from None
    optional = {"score_head.weight", "score_head.bias"}
    missing = set(result.missing_keys) - optional - ({"lm_head.weight"} if model_cfg.tie_embeddings else set())
    unexpected = set(result.unexpected_keys) - optional
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match its model config "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if "score_head.weight" in result.missing_keys:
        model.init_score_head()
    model.init_rope()
    return model, config


def load_for_inference(ckpt: str, device="cpu", model_class=Transformer,
                       dtype: torch.dtype | None = None) -> tuple[Transformer, "Tokenizer", dict]:
    """(model in eval mode, its tokenizer, config.json) for sampling, evaluation, scoring and
    serving. dtype casts the weights (the rotary tables, buffers, stay fp32)."""
    from data.tokenizer import Tokenizer
    model, config = load_model(ckpt, device=device, model_class=model_class)
    tok = Tokenizer.load(os.path.join(ckpt, "tokenizer.json"))
    if tok.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(f"{ckpt}: tokenizer has {tok.vocab_size} tokens, the model {model.cfg.vocab_size}")
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model.eval(), tok, config


def right_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded, index of each row's last real token)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) - 1 for s in seqs])


class RewardScorer:
    """A scalar-head model (model.ScalarHeadModel) read as a reward: the raw score at a
    sequence's last token, normalized with the mean and std train_rm.py stored in the
    checkpoint (`score_norm`), so held-out responses score mean 0 and std 1 (PPO's
    reward scale). The one scorer of the reward-model stage, PPO and serving's classifier."""

    def __init__(self, model, tok=None, norm: dict | None = None, autocast=contextlib.nullcontext):
        self.model, self.tok, self.autocast = model, tok, autocast
        norm = norm or {"mean": 0.0, "std": 1.0}
        self.mean, self.std = float(norm["mean"]), float(norm["std"])

    @classmethod
    def load(cls, ckpt: str, device="cpu") -> "RewardScorer":
        model, tok, config = load_for_inference(ckpt, device=device, model_class=ScalarHeadModel)
        return cls(model, tok, config.get("score_norm"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw.float() - self.mean) / self.std

    @torch.no_grad()
    def score_ids(self, ids: torch.Tensor, last: torch.Tensor, kv_start: torch.Tensor | None = None,
                  normalize: bool = True) -> torch.Tensor:
        """Scores of a token batch (B, T) read at each row's `last` index; kv_start marks
        left padding (None: no left padding)."""
        with self.autocast():
            raw = self.model(ids.to(self.device), kv_start=None if kv_start is None else kv_start.to(self.device),
                             last_index=last.to(self.device))
        return self.normalize(raw) if normalize else raw.float()

    def score_conversations(self, conversations: list[list[dict]], normalize: bool = True) -> torch.Tensor:
        """Scores of whole conversations (message lists), one right-padded batch. A sequence
        longer than the context keeps its first token (the separator that starts every chat) and its end."""
        from data.chat import encode_chat
        n = self.model.cfg.max_seq_len
        seqs = [encode_chat(self.tok, messages)[0] for messages in conversations]
        seqs = [s[:1] + s[-(n - 1):] if len(s) > n else s for s in seqs]
        ids, last = right_padded(seqs, self.tok.pad_id)
        return self.score_ids(ids, last, normalize=normalize)

    def score(self, prompts: list, responses: list[str], normalize: bool = True) -> torch.Tensor:
        """Scores of responses to prompts (strings or message lists)."""
        from data.chat import prompt_messages
        return self.score_conversations([prompt_messages({"prompt": p}) + [{"role": "assistant", "content": r}]
                                         for p, r in zip(prompts, responses)], normalize)


def load_training_state(out: str, model, optimizer, env: Env) -> dict:
    """Restore weights, optimizer and RNG from `out` (all ranks call). Returns trainer.json."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    state_dir = os.path.join(out, "state")
    try:
        with open(os.path.join(state_dir, "trainer.json"), encoding="utf-8") as f:
            trainer = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"--resume: nothing to resume in {out} (no state/trainer.json)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{state_dir}/trainer.json is unreadable: {e}") from None
    config = read_checkpoint_config(out)
    weights, metadata = load_weights(out)
    if str(trainer.get("step")) != metadata.get("step") or config.get("step") != trainer.get("step"):
        raise CheckpointError(f"{out}: weights (step {metadata.get('step')}), config.json (step {config.get('step')}) "
                              f"and state (step {trainer.get('step')}) disagree; the last save was interrupted")
    if config["model"] != model_config_of(model).to_dict():
        raise CheckpointError(f"{out}: checkpoint model config differs from this run's model config")
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=env.distributed)
    try:
        set_model_state_dict(model, weights if env.is_main else {}, options=opts)
        optim_path = os.path.join(state_dir, "optimizer.pt")
        optim_state = torch.load(optim_path, map_location="cpu", weights_only=True) if env.is_main else {}
        set_optimizer_state_dict(model, optimizer, optim_state_dict=optim_state, options=opts)
    except FileNotFoundError as e:
        raise CheckpointError(f"{out}: missing {e.filename}") from None
    except (RuntimeError, KeyError, ValueError, EOFError) as e:
        raise CheckpointError(f"{out}: cannot restore training state: {str(e).splitlines()[0]}") from None
    rng_path = os.path.join(state_dir, f"rng_rank{env.rank}.json")
    if trainer.get("world_size") == env.world_size and os.path.exists(rng_path):
        with open(rng_path, encoding="utf-8") as f:
            _set_rng_state(json.load(f))
    return trainer


# ----------------------------------------------------------------------------- logging

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


class Trainer:
    """The bookkeeping around a stage's loss: precision, sharding, optimizer, LR schedule,
    gradient sync and clipping, the non-finite guard, logging, checkpoints, resume, signals.

    A stage's loop reads:
        while trainer.step < cfg.max_steps:
            trainer.set_lr()
            for micro in range(accum):
                with trainer.autocast():
                    loss = <the stage's loss>
                trainer.backward(loss, micro, accum)
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

    def backward(self, loss: torch.Tensor, micro: int, accum: int) -> None:
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
