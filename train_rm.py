"""Stage 3a: a reward model trained on preference pairs (which of two responses is better).

InstructGPT's second step (Ouyang et al. 2022, following Stiennon et al. 2020): the SFT
model's trunk plus a scalar head scores (prompt, response); training pushes the chosen
response's score above the rejected one's with the Bradley-Terry loss

    loss = -log sigmoid(r_chosen - r_rejected - margin)

(plus, optionally, a small penalty on (r_chosen + r_rejected)^2 that keeps scores centred
at 0: Eisenstein et al. 2023). Chosen and rejected go through the model in one batch.
Evaluation: held-out pairwise accuracy and mean margin, overall and by mistake kind.
After training, the mean and std of the scores of the held-out responses are stored in
the checkpoint, and `score()` returns normalized scores (what PPO consumes).

    python train_rm.py                                   # from runs/sft on the task suite's prefs.jsonl
    python train_rm.py --init runs/sft --data hh.jsonl --out runs/rm
    python train_rm.py --eval-only --init runs/rm --data prepared/tasks/prefs.jsonl
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import runtime
from cli import UserError, print_config
from data.chat import encode_chat, prompt_messages
from data.prefs import load_pairs
from data.tokenizer import Tokenizer
from evals import task_files
from model import ScalarHeadModel

REPO = os.path.dirname(os.path.abspath(__file__))
TASKS_DIR = os.path.join(REPO, "prepared", "tasks")


@dataclass
class RMConfig(runtime.TrainConfig):
    out: str = field(default=os.path.join(REPO, "runs", "rm"), metadata={"help": "checkpoint directory"})
    init: str = field(default=os.path.join(REPO, "runs", "sft"), metadata={"help": "SFT checkpoint (or a reward model)"})
    data: list[str] = field(default_factory=list, metadata={"nargs": True,
                            "help": "preference JSONL files (default: the task suite's prefs.jsonl)"})
    val_fraction: float = field(default=0.15, metadata={"help": "held-out share of pairs (split by prompt)"})
    center_coef: float = field(default=0.0, metadata={"help": "weight of the reward-centering term (r_c + r_r)^2"})
    eval_only: bool = field(default=False, metadata={"help": "score --data with the --init reward model and exit"})
    max_steps: int = 300
    batch_size: int = 16
    lr: float = 5e-4
    warmup_steps: int = 10
    eval_every: int = 100
    save_every: int = 300

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.val_fraction < 1 or self.center_coef < 0:
            raise UserError("need 0 <= --val-fraction < 1 and --center-coef >= 0")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor,
                       center_coef: float = 0.0) -> torch.Tensor:
    loss = -F.logsigmoid(chosen - rejected - margin).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


def right_padded(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) right-padded, index of each row's last real token)."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) - 1 for s in seqs])


def pair_scores(model, pairs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and the rejected side of each pair, in one forward pass."""
    ids, last = right_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    scores = model.score(ids.to(device), last.to(device))
    return scores[:len(pairs)], scores[len(pairs):]


@torch.no_grad()
def evaluate_pairs(model, pairs, pad_id, env, batch_size: int, autocast) -> dict:
    """Pairwise accuracy and mean margin, overall and by kind; also every score (for normalization)."""
    model.eval()
    per_rank = -(-len(pairs) // env.world_size)
    mine = pairs[env.rank * per_rank:(env.rank + 1) * per_rank]
    kinds = sorted({p.kind for p in pairs})
    stats = torch.zeros(len(kinds), 3, dtype=torch.float64, device=env.device)  # correct, margin sum, count
    moments = torch.zeros(3, dtype=torch.float64, device=env.device)  # n, sum, sum of squares of all scores
    for i in range(0, per_rank, batch_size):
        chunk = mine[i:i + batch_size]
        real = bool(chunk)
        chunk = chunk or pairs[:1]  # every rank runs the same number of forwards
        with autocast():
            rc, rr = pair_scores(model, chunk, pad_id, env.device)
        if not real:
            continue
        for p, c, r in zip(chunk, rc.double(), rr.double()):
            stats[kinds.index(p.kind)] += torch.stack([(c > r).double(), c - r, torch.ones((), device=env.device,
                                                                                          dtype=torch.float64)])
        both = torch.cat([rc, rr]).double()
        moments += torch.stack([torch.tensor(float(len(both)), device=env.device, dtype=torch.float64),
                                both.sum(), (both ** 2).sum()])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(stats)
        torch.distributed.all_reduce(moments)
    model.train()
    total = stats.sum(0)
    n, s, sq = moments.tolist()
    mean = s / max(n, 1)
    return {"accuracy": float(total[0] / total[2].clamp(min=1)), "margin": float(total[1] / total[2].clamp(min=1)),
            "by_kind": {k: {"accuracy": float(a / c), "margin": float(m / c)} for k, (a, m, c) in
                        zip(kinds, stats.tolist()) if c},
            "score_mean": mean, "score_std": max(1e-6, (sq / max(n, 1) - mean ** 2)) ** 0.5}


def format_eval(result: dict) -> str:
    return (f"accuracy {100 * result['accuracy']:.1f}%, margin {result['margin']:.3f} ("
            + ", ".join(f"{k} {100 * v['accuracy']:.0f}%" for k, v in result["by_kind"].items()) + ")")


# ----------------------------------------------------------------------------- scoring API

class RewardScorer:
    """Load a reward checkpoint once; score (prompt, response) pairs or token batches.

    Scores are normalized with the mean and std stored at the end of training, so the
    held-out responses score mean 0 and std 1 (PPO's reward scale)."""

    def __init__(self, ckpt: str, device="cpu"):
        self.model, config = runtime.load_model(ckpt, device=device, model_class=ScalarHeadModel)
        self.model.eval()
        self.tok = Tokenizer.load(os.path.join(ckpt, "tokenizer.json"))
        norm = config.get("score_norm") or {"mean": 0.0, "std": 1.0}
        self.mean, self.std = float(norm["mean"]), float(norm["std"])
        self.device = device

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.mean) / self.std

    @torch.no_grad()
    def score_tokens(self, ids: torch.Tensor, padding: str = "right", lengths: torch.Tensor | None = None,
                     normalize: bool = True) -> torch.Tensor:
        """Scores of token batches (B, T) that end in <|end|>: right padding needs the real
        lengths; left padding needs none (every row ends at T - 1)."""
        ids = ids.to(self.device)
        if padding == "right":
            if lengths is None:
                raise ValueError("right-padded scoring needs the lengths")
            raw = self.model.score(ids, lengths.to(self.device) - 1)
        elif padding == "left":
            pads = (ids == self.tok.pad_id).long().cumprod(dim=1).sum(dim=1)  # leading pad tokens
            raw = self.model.score(ids, torch.full((ids.shape[0],), ids.shape[1] - 1, device=self.device), pads)
        else:
            raise ValueError("padding must be 'left' or 'right'")
        return self.normalize(raw) if normalize else raw

    def score(self, prompts: list, responses: list[str], normalize: bool = True) -> torch.Tensor:
        """Scores for prompts (strings or message lists) and their responses, in one batch."""
        seqs = [encode_chat(self.tok, prompt_messages({"prompt": p}) + [{"role": "assistant", "content": r}])[0]
                for p, r in zip(prompts, responses)]
        ids, last = right_padded(seqs, self.tok.pad_id)
        return self.score_tokens(ids, "right", last + 1, normalize)


# ----------------------------------------------------------------------------- training

def split_pairs(pairs, fraction: float):
    """Held-out pairs chosen by a hash of the prompt, so one prompt is never on both sides."""
    def held_out(p) -> bool:
        key = json.dumps(p.prompt, sort_keys=True).encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") / 2**64 < fraction
    val = [p for p in pairs if held_out(p)]
    return [p for p in pairs if not held_out(p)], val


def main(argv=None) -> None:
    runtime.run_main(RMConfig, train, argv, description=__doc__.split("\n")[0])


def train(cfg: RMConfig, env: runtime.Env) -> None:
    if env.is_main:
        print_config(cfg, "rm config")
    data_files, _ = task_files(cfg.data, "prefs.jsonl", None, TASKS_DIR)
    init_config = runtime.read_checkpoint_config(cfg.init)
    torch.manual_seed(cfg.seed)  # the fresh score head is the same on every rank and every run
    model, _ = runtime.load_model(cfg.init, model_class=ScalarHeadModel)
    tokenizer_path = os.path.join(cfg.init, "tokenizer.json")
    tok = Tokenizer.load(tokenizer_path)
    pairs, skipped = load_pairs(data_files, tok, model.cfg.max_seq_len)
    runtime.print0(f"rm data: {len(pairs)} pairs from {len(data_files)} file(s); skipped {sum(skipped.values())} "
                   f"({', '.join(f'{k} {v}' for k, v in sorted(skipped.items())) or 'none'})")
    if not pairs:
        raise UserError(f"no usable preference pairs in {' '.join(data_files)}")

    if cfg.eval_only:
        model.to(env.device)
        result = evaluate_pairs(model, pairs, tok.pad_id, env, cfg.batch_size, lambda: runtime.autocast(
            env, runtime.compute_dtype(cfg.dtype, env.device)))
        runtime.print0(f"eval-only {cfg.init} on {len(pairs)} pairs: {format_eval(result)}")
        if env.is_main:
            print(json.dumps({"accuracy": result["accuracy"], "margin": result["margin"], "by_kind": result["by_kind"]}))
        return

    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction)
    if not val_pairs:
        val_pairs = train_pairs[-max(1, len(train_pairs) // 10):]
        train_pairs = train_pairs[:-len(val_pairs)] or val_pairs
    rows = cfg.batch_size * env.world_size
    if len(train_pairs) < rows:
        raise UserError(f"{len(train_pairs)} training pairs are fewer than one global batch of {rows}")
    runtime.seed_everything(cfg.seed, env.rank)
    position = {"epoch": 0, "index": 0}
    trainer = runtime.Trainer(cfg, env, model, stage="rm", tokenizer_path=tokenizer_path,
                              data_state=lambda: dict(position),
                              extra_config={"init": cfg.init, "base_stage": init_config.get("stage")})
    model = trainer.model
    if cfg.resume:
        position.update(trainer.resume()["data"])
    trainer.start()

    def order(epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(cfg.seed + epoch)
        return torch.randperm(len(train_pairs), generator=g).tolist()

    def evaluate() -> dict:
        result = evaluate_pairs(model, val_pairs, tok.pad_id, env, cfg.batch_size, trainer.autocast)
        runtime.print0(f"eval step {trainer.step}: held-out {format_eval(result)}")
        trainer.log({"step": trainer.step, "val_accuracy": result["accuracy"], "val_margin": result["margin"],
                     **{f"val_accuracy/{k}": v["accuracy"] for k, v in result["by_kind"].items()}})
        trainer.pause_clock()
        return result

    if trainer.step == 0:
        evaluate()
    perm = order(position["epoch"])
    with trainer:
        while trainer.step < cfg.max_steps:
            trainer.set_lr()
            if position["index"] + rows > len(perm):
                position.update(epoch=position["epoch"] + 1, index=0)
                perm = order(position["epoch"])
            batch_ids = perm[position["index"]:position["index"] + rows]
            position["index"] += rows
            batch = [train_pairs[i] for i in batch_ids[env.rank * cfg.batch_size:(env.rank + 1) * cfg.batch_size]]
            with trainer.autocast():
                rc, rr = pair_scores(model, batch, tok.pad_id, env.device)
                margin = torch.tensor([p.margin for p in batch], device=env.device)
                loss = bradley_terry_loss(rc, rr, margin, cfg.center_coef)
            trainer.backward(loss, 0, 1)
            accuracy = (rc > rr).float().mean().item()
            if not trainer.optimizer_step(loss, tokens=sum(len(p.chosen) + len(p.rejected) for p in batch),
                                          extra={"train_accuracy": accuracy}):
                continue
            final = trainer.step == cfg.max_steps
            if trainer.due(cfg.eval_every):
                result = evaluate()
                if final:  # the normalization PPO relies on: held-out responses score mean 0, std 1
                    trainer.extra_config["score_norm"] = {"mean": result["score_mean"], "std": result["score_std"]}
                    trainer.extra_config["eval"] = {"accuracy": result["accuracy"], "margin": result["margin"],
                                                    "by_kind": result["by_kind"]}
            trainer.maybe_save()
            if trainer.stop_requested():
                break


if __name__ == "__main__":
    main()
