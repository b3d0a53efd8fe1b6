"""Stage 3 (alternative): Direct Preference Optimization on the preference pairs.

DPO (Rafailov et al. 2023) skips the reward model and the sampling of PPO: the policy
itself is trained on the pairs, with its log-probability ratio to a frozen reference (the
SFT model) as an implicit reward, r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)):

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))

Steps:
1. Pairs: the files train_rm.py reads (all its formats, serve.py's export included); the
   log-probabilities are summed over the final answer's tokens only (its <|end|>
   included), the prompt is masked as in SFT.
2. Reference: the --init weights frozen (or --ref: iterative DPO goes on from the last
   round's policy and keeps the SFT model as the reference); its log-probabilities of
   every training pair are computed once, before the first step. The reference never
   changes, so this is exact, and it costs one forward per pair instead of one per pair
   per visit (TRL's precompute_ref_log_probs); the frozen reference stays loaded for the
   KL measurement of step 4.
3. Update: --loss sigmoid (DPO), with --label-smoothing eps the conservative DPO of
   Mitchell (2023) for noisy raters, (1 - eps) * loss(h) + eps * loss(-h); or --loss ipo
   (Azar et al. 2023), (h / beta - 1 / (2 beta))^2 on length-averaged log-probabilities
   (as TRL computes it), which stops pushing once a pair is separated by 1 / (2 beta).
   Plus --sft-coef times the chosen answer's mean token NLL (RPO; default 1): plain DPO
   lowers the chosen answers with the rejected ones on near-miss pairs, and held-out
   helpfulness fell from 39.1% to 23.7% in 1,000 steps; with the term it held 38.7% at
   600 (docs/results.md).
4. Evaluate every --eval-every steps: the held-out pairs' loss, implicit-reward accuracy
   and margin; the gold evaluation of SFT and PPO (held-out helpfulness, refusal and
   over-refusal rates of the greedy answers); and the KL to the reference, sum over tokens
   of log pi - log pi_ref on answers sampled from the policy at temperature 1 (a Monte
   Carlo estimate of KL(pi || pi_ref), the number PPO's penalty controls).

    python train_dpo.py                                   # runs/sft on the task suite's prefs.jsonl
    python train_dpo.py --init runs/sft --data prefs.jsonl feedback.jsonl --beta 0.1 --out runs/dpo
    python train_dpo.py --loss ipo --beta 0.5
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from checkpoint import load_model, read_checkpoint_config
from cli import UserError, entry_point, print_config
from data.files import read_json
from data.loader import EpochCursor, collate
from data.text.chat import Side, answer_only, encode_chat, iter_jsonl, truncate
from data.text.tokenizer import Tokenizer
from distributed import Env, all_reduce_sum, compute_dtype, print0, seed_everything, sharded_batches
from evals import (accuracy_metrics, format_accuracy, format_samples, load_task_records, sampled_kl, task_accuracy,
                   task_files)
from tasks.prefs import pair_messages, split_pairs
from train_ppo import load_frozen
from trainer import TrainConfig, Trainer, run_main

REPO = os.path.dirname(os.path.abspath(__file__))


@dataclass
class DPOConfig(TrainConfig):
    out: str = field(default=os.path.join(REPO, "runs", "dpo"), metadata={"help": "checkpoint directory"})
    init: str = field(default=os.path.join(REPO, "runs", "sft"), metadata={"help": "SFT checkpoint: the policy's "
                      "start and, without --ref, the frozen reference"})
    ref: str = field(default="", metadata={"help": "the frozen reference, if not --init (iterative DPO: start from "
                     "the last round's policy, keep the SFT model as the reference)"})
    data: list[str] = field(default_factory=list, metadata={"nargs": True,
                            "help": "preference JSONL files, any format train_rm.py reads (default: the task suite's)"})
    eval_data: str = field(default="", metadata={"help": "held-out task records for the gold evaluation "
                           "(default: the suite's eval.jsonl)"})
    val_fraction: float = field(default=0.1, metadata={"help": "held-out share of pairs (split by prompt)"})
    beta: float = field(default=0.1, metadata={"help": "strength of the implicit KL constraint"})
    loss: str = field(default="sigmoid", metadata={"choices": ["sigmoid", "ipo"], "help": "sigmoid: DPO; ipo: IPO"})
    label_smoothing: float = field(default=0.0, metadata={"help": "assumed share of flipped labels (cDPO), in [0, 0.5)"})
    sft_coef: float = field(default=1.0, metadata={"help": "weight of the chosen answers' mean token NLL added "
                            "to the loss (RPO, Pang et al. 2024; TRL's rpo_alpha; 0 = plain DPO): keeps their "
                            "likelihood from falling with the rejected ones'"})
    kl_prompts: int = field(default=64, metadata={"help": "held-out prompts sampled for the KL estimate (spread "
                            "evenly over the eval file)"})
    eval_max_new_tokens: int = 32
    max_steps: int = 600
    batch_size: int = 16
    lr: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 200
    save_every: int = 200

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5 or not 0 <= self.val_fraction < 1:
            raise UserError("need --beta > 0, 0 <= --label-smoothing < 0.5 and 0 <= --val-fraction < 1")
        if self.kl_prompts < 0 or self.sft_coef < 0:
            raise UserError("--kl-prompts and --sft-coef must be >= 0")


# ----------------------------------------------------------------------------- the loss

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair losses and implicit rewards (chosen, rejected) from sequence log-probs."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    h = chosen_reward - rejected_reward
    if loss == "ipo":
        losses = (h / beta - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, chosen_reward.detach(), rejected_reward.detach()


# ----------------------------------------------------------------------------- the pairs

def load_dpo_pairs(paths: list[str], tok, max_len: int) -> list[tuple[Side, Side, str, list]]:
    """(chosen, rejected, kind, prompt messages) per record. Raises UserError on a pair whose
    answers are equal or that does not fit the context (the prompt is cut from the start
    when only it is too long, as in SFT and RM), and when no record is usable."""
    pairs, skipped = [], Counter()
    for rec, (chosen, rejected, _) in iter_jsonl(paths, pair_messages, skipped):
        if chosen[-1]["content"] == rejected[-1]["content"]:
            raise UserError(f"pair {rec.get('id', len(pairs) + 1)!r}: chosen and rejected answers are equal")
        sides = []
        for conv in (chosen, rejected):
            fitted = truncate(*encode_chat(tok, conv), max_len, "truncate")
            if fitted is None or tok.assistant_id not in fitted[0]:
                raise UserError(f"pair {rec.get('id', len(pairs) + 1)!r}: the answer does not fit the "
                                f"model's context of {max_len} tokens")
            sides.append(Side(fitted[0], answer_only(fitted[0], tok.assistant_id)))
        pairs.append((sides[0], sides[1], str(rec.get("kind", "all")), chosen[:-1]))
    if skipped:
        print0(f"dpo data: skipped {sum(skipped.values())} record(s) "
                       f"({', '.join(f'{k} {v}' for k, v in sorted(skipped.items()))})")
    if not pairs:
        raise UserError(f"no usable preference pairs in {' '.join(paths)}")
    return pairs


class PromptOf:  # split_pairs hashes `.prompt`
    def __init__(self, i: int, prompt: list):
        self.i, self.prompt = i, prompt


def sequence_logprobs(model, sides: list[Side], pad_id: int, device, average: bool = False,
                      with_counts: bool = False):
    """Sum (or mean) of the log-probabilities of each side's answer tokens; with_counts
    also returns the number of answer tokens of each side."""
    x, y = collate(sides, pad_id)
    logp = -model(x.to(device), y.to(device), reduction="none")
    total, counts = logp.sum(-1), (y != -100).sum(-1).to(device).clamp(min=1)
    value = total / counts if average else total
    return (value, counts) if with_counts else value


@torch.no_grad()
def reference_logprobs(reference, pairs: list, cfg: DPOConfig, pad_id: int, env) -> torch.Tensor:
    """[n, 2] reference log-probs of every pair's chosen and rejected answer, each rank
    computing its share (in lockstep: under FSDP a forward is a collective)."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=env.device)
    for chunk, real in sharded_batches(list(range(len(pairs))), cfg.batch_size, env.rank, env.world_size):
        sides = [pairs[i][0] for i in chunk] + [pairs[i][1] for i in chunk]
        logp = sequence_logprobs(reference, sides, pad_id, env.device, cfg.loss == "ipo").double()
        if real:
            out[chunk] = torch.stack([logp[:len(chunk)], logp[len(chunk):]], dim=1)
    return all_reduce_sum(out)


def pair_batch_loss(policy, pairs: list, ref: torch.Tensor, cfg: DPOConfig, pad_id: int, device):
    """Losses and implicit rewards of a batch of pairs (ref: their rows of the reference's
    log-probs); with --sft-coef a, each loss adds a times the chosen answer's mean token NLL."""
    logp, counts = sequence_logprobs(policy, [p[0] for p in pairs] + [p[1] for p in pairs], pad_id, device,
                                     with_counts=True)
    n = len(pairs)
    seq = logp / counts if cfg.loss == "ipo" else logp
    losses, rc, rr = dpo_loss(seq[:n], seq[n:], ref[:, 0].to(logp.dtype), ref[:, 1].to(logp.dtype), cfg.beta,
                              cfg.loss, cfg.label_smoothing)
    if cfg.sft_coef:
        losses = losses - cfg.sft_coef * logp[:n] / counts[:n]
    return losses, rc, rr


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_pairs(policy, pairs: list, ref: torch.Tensor, cfg: DPOConfig, pad_id: int, env) -> dict:
    """Held-out loss, implicit-reward accuracy and margin, overall and by kind."""
    policy.eval()
    kinds = sorted({p[2] for p in pairs})
    stats = torch.zeros(len(kinds), 4, dtype=torch.float64, device=env.device)  # loss, right, margin, count
    for chunk, real in sharded_batches(list(range(len(pairs))), cfg.batch_size, env.rank, env.world_size):
        losses, rc, rr = pair_batch_loss(policy, [pairs[i] for i in chunk], ref[chunk], cfg, pad_id, env.device)
        if real:
            for i, loss, c, r in zip(chunk, losses.double(), rc.double(), rr.double()):
                stats[kinds.index(pairs[i][2])] += torch.stack([loss, (c > r).double(), c - r, torch.ones_like(c)])
    all_reduce_sum(stats)
    policy.train()
    total = stats.sum(0)
    n = total[3].clamp(min=1)
    return {"loss": float(total[0] / n), "accuracy": float(total[1] / n), "margin": float(total[2] / n),
            "by_kind": {k: float(s[1] / s[3]) for k, s in zip(kinds, stats) if s[3] > 0}}


# ----------------------------------------------------------------------------- training

@entry_point
def main(argv=None) -> None:
    run_main(DPOConfig, train, argv, description=__doc__.split("\n")[0])


def load_models(cfg: DPOConfig, env):
    """The policy (from --init, trained) and the reference (--ref, or the same weights as
    the policy; frozen)."""
    init_config = read_checkpoint_config(cfg.init)
    ref = cfg.ref or cfg.init
    for path, config in ((cfg.init, init_config), (ref, read_checkpoint_config(ref))):
        if config.get("stage") == "rm":
            raise UserError(f"{path} is a reward model; DPO's policy and reference are language models (SFT)")
    if ref != cfg.init and tokenizer_of(cfg.init) != tokenizer_of(ref):
        raise UserError(f"--ref {ref} has another tokenizer than --init {cfg.init}: their log-probs do not compare")
    policy, _ = load_model(cfg.init)
    reference, _ = load_frozen(ref, env, compute_dtype(cfg.dtype, env.device))
    return policy, reference, init_config


def tokenizer_of(ckpt: str):
    """A checkpoint's tokenizer.json, parsed (the vocabulary, merges and special tokens)."""
    return read_json(os.path.join(ckpt, "tokenizer.json"), UserError, f"{ckpt} has no tokenizer.json")


def batch_metrics(chosen: torch.Tensor, rejected: torch.Tensor, env) -> dict:
    """TRL's names: implicit-reward accuracy and margin, mean rewards, over the global batch."""
    sums = torch.stack([(chosen > rejected).double().sum(), (chosen - rejected).double().sum(),
                        chosen.double().sum(), rejected.double().sum(),
                        torch.tensor(float(len(chosen)), dtype=torch.float64, device=chosen.device)])
    correct, margin, c, r, n = all_reduce_sum(sums).tolist()
    return {"reward_accuracy": correct / n, "reward_margin": margin / n, "rewards/chosen": c / n,
            "rewards/rejected": r / n}


def train(cfg: DPOConfig, env: Env) -> None:
    if env.is_main:
        print_config(cfg, "dpo config")
    data_files, eval_file = task_files(cfg.data, "prefs.jsonl", cfg.eval_data)
    policy, reference, init_config = load_models(cfg, env)
    tokenizer_path = os.path.join(cfg.init, "tokenizer.json")
    tok = Tokenizer.load(tokenizer_path)
    pairs = load_dpo_pairs(data_files, tok, policy.cfg.max_seq_len)
    train_idx, val_idx = split_pairs([PromptOf(i, p[3]) for i, p in enumerate(pairs)], cfg.val_fraction)
    train_pairs, val_pairs = [pairs[p.i] for p in train_idx], [pairs[p.i] for p in val_idx]
    rows = cfg.batch_size * env.world_size
    if len(train_pairs) < rows:
        raise UserError(f"{len(train_pairs)} training pairs are fewer than one global batch of {rows}")
    eval_records = load_task_records(eval_file) if eval_file else []
    print0(f"dpo data: {len(train_pairs)} training pairs, {len(val_pairs)} held out, from "
                   f"{len(data_files)} file(s); {len(eval_records)} gold-evaluation records")

    t_reference = time.time()
    ref_train = reference_logprobs(reference, train_pairs, cfg, tok.pad_id, env)
    ref_val = reference_logprobs(reference, val_pairs, cfg, tok.pad_id, env)
    t_reference = time.time() - t_reference
    seed_everything(cfg.seed, env.rank)
    cursor = EpochCursor(len(train_pairs), rows, cfg.seed)
    trainer = Trainer(cfg, env, policy, stage="dpo", tokenizer_path=tokenizer_path,
                              data_state=cursor.state_dict,
                              extra_config={"init": cfg.init, "ref": cfg.ref or cfg.init,
                                            "base_stage": init_config.get("stage")})
    policy = trainer.model
    trainer.add_time("reference log-probs", t_reference)
    if cfg.resume:
        cursor.load_state_dict(trainer.resume()["data"])
    trainer.start()

    def evaluate() -> None:
        with trainer.timed("evaluation"):
            held = evaluate_pairs(policy, val_pairs, ref_val, cfg, tok.pad_id, env) if val_pairs else None
            record, line = {"step": trainer.step}, f"eval step {trainer.step}:"
            if held:
                record.update({"val_loss": held["loss"], "val_reward_accuracy": held["accuracy"],
                               "val_reward_margin": held["margin"],
                               **{f"val_reward_accuracy/{k}": v for k, v in held["by_kind"].items()}})
                line += (f" held-out pairs loss {held['loss']:.4f}, implicit-reward accuracy "
                         f"{100 * held['accuracy']:.1f}%, margin {held['margin']:.3f};")
            if eval_records:
                result = task_accuracy(policy, tok, eval_records, env.rank, env.world_size, cfg.eval_max_new_tokens)
                record.update(accuracy_metrics(result))
                line += f" gold accuracy {format_accuracy(result)}"
                kl = sampled_kl(policy, reference, tok, eval_records, cfg.kl_prompts, cfg.eval_max_new_tokens,
                                cfg.batch_size, cfg.seed, env.rank, env.world_size)
                if kl is not None:
                    record["kl"] = kl
                    line += f"; KL to the reference {kl:.3f}"
                line += format_samples(result["samples"], 3)
            print0(line)
            trainer.log(record)

    if trainer.step == 0:
        evaluate()
    with trainer:
        while trainer.step < cfg.max_steps:
            trainer.set_lr()
            ids = cursor.next()[env.rank * cfg.batch_size:(env.rank + 1) * cfg.batch_size]
            batch = [train_pairs[i] for i in ids]
            with trainer.autocast():
                losses, rc, rr = pair_batch_loss(policy, batch, ref_train[ids], cfg, tok.pad_id, env.device)
                loss = losses.mean()
            trainer.backward(loss)
            extra = batch_metrics(rc, rr, env)
            tokens = sum(len(p[0].ids) + len(p[1].ids) for p in batch) * env.world_size
            if not trainer.optimizer_step(loss, tokens=tokens, extra=extra):
                continue
            if trainer.due(cfg.eval_every):
                evaluate()
            trainer.maybe_save()
            if trainer.stop_requested():
                break


if __name__ == "__main__":
    main()
