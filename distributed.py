"""Processes and devices, shared by training and inference: torchrun's process group (nccl
on CUDA, gloo on CPU; a plain single process without torchrun), rank helpers (rank-0
printing, reductions, each rank's share of a list and the lockstep batches every rank
steps through together), precision (bf16 autocast, the compute dtype) and FSDP2 sharding
(`fully_shard` per block, then the root; bf16 parameters with fp32 gradient reduction).
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist

from cli import UserError
from model import Transformer

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
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        for method in getattr(model, "FORWARD_METHODS", ()):  # entry points besides forward (the scalar head's)
            register_fsdp_forward_method(model, method)
    if compile:
        for block in model.blocks:  # per block: state-dict keys stay clean, graphs stay small
            block.compile()
    return model


def seed_everything(seed: int, rank: int = 0) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)
