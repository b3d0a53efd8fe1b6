"""Stage 3a: a reward model trained on preference pairs (which of two responses is better).

InstructGPT's second step (Ouyang et al. 2022, following Stiennon et al. 2020): the SFT
model's trunk plus a scalar head scores (prompt, response); training pushes the chosen
response's score above the rejected one's with the Bradley-Terry loss

    loss = -log sigmoid(r_chosen - r_rejected - margin)

(plus, optionally, a small penalty on (r_chosen + r_rejected)^2 that keeps scores centred
at 0: Eisenstein et al. 2023). Chosen and rejected go through the model in one batch.
Evaluation: held-out pairwise accuracy and mean margin, overall and by mistake kind.
On-policy evaluation (`on_policy_pairs`, `on_policy_accuracy`): a policy answers each
held-out prompt twice at its rollout temperature, the gold judge labels the pair without
noise, and a reward model is right where it scores the judge's preferred answer higher,
the pairs a reward model meets during PPO (pipeline.py reports it for both rounds).
After training, the mean and std of the scores of the held-out responses are stored in
the checkpoint, and `RewardScorer` returns normalized scores (what PPO consumes).

    python train_rm.py                                   # from runs/sft on the task suite's prefs.jsonl
    python train_rm.py --init runs/sft --data hh.jsonl --out runs/rm
    python train_rm.py --eval-only --init runs/rm --data prepared/tasks/prefs.jsonl
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from checkpoint import load_model, read_checkpoint_config, right_padded
from cli import UserError, entry_point, print_config
from data.loader import EpochCursor
from data.text.tokenizer import Tokenizer
from distributed import Env, all_reduce_sum, autocast, compute_dtype, print0, seed_everything, sharded_batches
from evals import task_files
from model import ScalarHeadModel
from tasks.prefs import load_pairs, split_pairs
from trainer import TrainConfig, Trainer, run_main

REPO = os.path.dirname(os.path.abspath(__file__))


@dataclass
class RMConfig(TrainConfig):
    out: str = field(default=os.path.join(REPO, "runs", "rm"), metadata={"help": "checkpoint directory"})
    init: str = field(default=os.path.join(REPO, "runs", "sft"), metadata={"help": "SFT checkpoint (or a reward model)"})
    data: list[str] = field(default_factory=list, metadata={"nargs": True,
                            "help": "preference JSONL files (default: the task suite's prefs.jsonl)"})
    val_fraction: float = field(default=0.15, metadata={"help": "held-out share of pairs (split by prompt)"})
    center_coef: float = field(default=0.0, metadata={"help": "weight of the reward-centering term (r_c + r_r)^2"})
    eval_only: bool = field(default=False, metadata={"help": "score --data with the --init reward model and exit"})
    max_steps: int = 600
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


def pair_scores(model, pairs, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and the rejected side of each pair, in one forward pass."""
    ids, last = right_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    scores = model.score(ids.to(device), last.to(device))
    return scores[:len(pairs)], scores[len(pairs):]


@torch.no_grad()
def evaluate_pairs(model, pairs, pad_id, env, batch_size: int, autocast) -> dict:
    """Pairwise accuracy and mean margin, overall and by kind; also every score (for normalization)."""
    model.eval()
    kinds = sorted({p.kind for p in pairs})
    stats = torch.zeros(len(kinds), 3, dtype=torch.float64, device=env.device)  # correct, margin sum, count
    moments = torch.zeros(3, dtype=torch.float64, device=env.device)  # n, sum, sum of squares of all scores
    for chunk, real in sharded_batches(pairs, batch_size, env.rank, env.world_size):
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
    all_reduce_sum(stats)
    all_reduce_sum(moments)
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


# ----------------------------------------------------------------------------- training

@entry_point
def main(argv=None) -> None:
    run_main(RMConfig, train, argv, description=__doc__.split("\n")[0])


def load_model_and_pairs(cfg: RMConfig) -> tuple[ScalarHeadModel, Tokenizer, list, dict]:
    """The SFT trunk with a fresh score head (or a reward model to go on from), its
    tokenizer, the preference pairs that fit its context, and --init's config."""
    data_files, _ = task_files(cfg.data, "prefs.jsonl", None)
    init_config = read_checkpoint_config(cfg.init)
    torch.manual_seed(cfg.seed)  # the fresh score head is the same on every rank and every run
    model, _ = load_model(cfg.init, model_class=ScalarHeadModel)
    tok = Tokenizer.load(os.path.join(cfg.init, "tokenizer.json"))
    pairs, skipped = load_pairs(data_files, tok, model.cfg.max_seq_len)
    print0(f"rm data: {len(pairs)} pairs from {len(data_files)} file(s); skipped {sum(skipped.values())} "
                   f"({', '.join(f'{k} {v}' for k, v in sorted(skipped.items())) or 'none'})")
    if not pairs:
        raise UserError(f"no usable preference pairs in {' '.join(data_files)}")
    return model, tok, pairs, init_config


def evaluate_only(model, tok, pairs, cfg: RMConfig, env: Env) -> None:
    """--eval-only: the accuracy of --init on every pair, printed (and as JSON)."""
    model.to(env.device)
    result = evaluate_pairs(model, pairs, tok.pad_id, env, cfg.batch_size, lambda: autocast(
        env, compute_dtype(cfg.dtype, env.device)))
    print0(f"eval-only {cfg.init} on {len(pairs)} pairs: {format_eval(result)}")
    if env.is_main:
        print(json.dumps({"accuracy": result["accuracy"], "margin": result["margin"], "by_kind": result["by_kind"]}))


def train_and_held_out(pairs, cfg: RMConfig, rows: int) -> tuple[list, list]:
    """The pairs split by prompt (at least one held out), with a global batch to train on."""
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_fraction)
    if not val_pairs:
        val_pairs = train_pairs[-max(1, len(train_pairs) // 10):]
        train_pairs = train_pairs[:-len(val_pairs)] or val_pairs
    if len(train_pairs) < rows:
        raise UserError(f"{len(train_pairs)} training pairs are fewer than one global batch of {rows}")
    return train_pairs, val_pairs


def train(cfg: RMConfig, env: Env) -> None:
    if env.is_main:
        print_config(cfg, "rm config")
    model, tok, pairs, init_config = load_model_and_pairs(cfg)
    if cfg.eval_only:
        return evaluate_only(model, tok, pairs, cfg, env)
    train_pairs, val_pairs = train_and_held_out(pairs, cfg, cfg.batch_size * env.world_size)
    seed_everything(cfg.seed, env.rank)
    cursor = EpochCursor(len(train_pairs), cfg.batch_size * env.world_size, cfg.seed)
    trainer = Trainer(cfg, env, model, stage="rm", tokenizer_path=os.path.join(cfg.init, "tokenizer.json"),
                              data_state=cursor.state_dict,
                              extra_config={"init": cfg.init, "base_stage": init_config.get("stage")})
    model = trainer.model
    if cfg.resume:
        cursor.load_state_dict(trainer.resume()["data"])
    trainer.start()

    def evaluate() -> dict:
        with trainer.timed("evaluation"):
            result = evaluate_pairs(model, val_pairs, tok.pad_id, env, cfg.batch_size, trainer.autocast)
            print0(f"eval step {trainer.step}: held-out {format_eval(result)}")
            trainer.log({"step": trainer.step, "val_accuracy": result["accuracy"], "val_margin": result["margin"],
                         **{f"val_accuracy/{k}": v["accuracy"] for k, v in result["by_kind"].items()}})
        return result

    if trainer.step == 0:
        evaluate()
    with trainer:
        while trainer.step < cfg.max_steps:
            trainer.set_lr()
            batch_ids = cursor.next()
            batch = [train_pairs[i] for i in batch_ids[env.rank * cfg.batch_size:(env.rank + 1) * cfg.batch_size]]
            with trainer.autocast():
                rc, rr = pair_scores(model, batch, tok.pad_id, env.device)
                margin = torch.tensor([p.margin for p in batch], device=env.device)
                loss = bradley_terry_loss(rc, rr, margin, cfg.center_coef)
            trainer.backward(loss)
            accuracy = (rc > rr).float().mean().item()
            if not trainer.optimizer_step(loss, tokens=sum(len(p.chosen) + len(p.rejected) for p in batch),
                                          extra={"train_accuracy": accuracy}):
                continue
            if trainer.due(cfg.eval_every):
                result = evaluate()
                if trainer.step == cfg.max_steps:  # the normalization PPO relies on: held-out scores mean 0, std 1
                    trainer.extra_config["score_norm"] = {"mean": result["score_mean"], "std": result["score_std"]}
                    trainer.extra_config["eval"] = {"accuracy": result["accuracy"], "margin": result["margin"],
                                                    "by_kind": result["by_kind"]}
            trainer.maybe_save()
            if trainer.stop_requested():
                break


if __name__ == "__main__":
    main()
