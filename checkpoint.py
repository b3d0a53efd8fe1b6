"""Checkpoints in the layout of docs/design.md: safetensors weights, JSON configs and the
resume state (optimizer, trainer step, every rank's RNG), each file written under a
temporary name and renamed, config.json last. Loading for training (`load_model`, `--init`)
and for inference (`load_for_inference`: the model in eval mode with its tokenizer), and
`RewardScorer`, the one reader of a reward model's score. Inference code (serving, sampling,
evaluation, conversion) imports this module and `distributed`, never the trainer.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from typing import TYPE_CHECKING

import numpy as np
import torch

from cli import UserError
from data.files import read_json, write_json
from distributed import Env, barrier
from model import ModelConfig, ScalarHeadModel, Transformer

if TYPE_CHECKING:
    from data.text.tokenizer import Tokenizer

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
    from data.text.tokenizer import Tokenizer
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
            raw = self.model.score(ids.to(self.device), last.to(self.device),
                                   None if kv_start is None else kv_start.to(self.device))
        return self.normalize(raw) if normalize else raw.float()

    def score_conversations(self, conversations: list[list[dict]], normalize: bool = True) -> torch.Tensor:
        """Scores of whole conversations (message lists), one right-padded batch. A sequence
        longer than the context keeps its first token (the separator that starts every chat) and its end."""
        from data.text.chat import encode_chat
        n = self.model.cfg.max_seq_len
        seqs = [encode_chat(self.tok, messages)[0] for messages in conversations]
        seqs = [s[:1] + s[-(n - 1):] if len(s) > n else s for s in seqs]
        ids, last = right_padded(seqs, self.tok.pad_id)
        return self.score_ids(ids, last, normalize=normalize)

    def score(self, prompts: list, responses: list[str], normalize: bool = True) -> torch.Tensor:
        """Scores of responses to prompts (strings or message lists)."""
        from data.text.chat import prompt_messages
        return self.score_conversations([prompt_messages({"prompt": p}) + [{"role": "assistant", "content": r}]
                                         for p, r in zip(prompts, responses)], normalize)


def load_training_state(out: str, model, optimizer, env: Env) -> dict:
    """Restore weights, optimizer and RNG from `out` (all ranks call). Returns trainer.json."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
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
