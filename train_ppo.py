"""Stage 3b: PPO against a reward model, with a per-token KL penalty to the frozen SFT model.

InstructGPT's third step (Ouyang et al. 2022; Ziegler et al. 2019 before it), with the
per-prompt baselines that give a small model a usable signal (RLOO: Ahmadian et al. 2024;
GRPO: Shao et al. 2024). Each step:

1. Rollout: the policy samples --samples-per-prompt responses to each prompt of a batch
   (a group shares one prompt pass through the KV cache), stopping at <|end|>. With
   --refresh-every N the prompts are, from every N-th step on, the frontier of freshly
   drawn helpfulness instances: those the current policy answers right sometimes but not
   always (tasks/rl_prompts.py), so RL practises where it can still learn, as it moves.
2. Score: the reward model's normalized score of each response (--reward rm: a model of
   the preference data, the RLHF setting); or the task grader's 0/1 (--reward task, a
   verifiable reward); or, the default, both (--reward mix, as Tulu 3 mixes them): the
   grader on the helpfulness prompts it can check, the reward model on every other prompt.
   Harmful and borderline prompts are always scored by the reward model alone, because the
   gold judge measures, it never rewards. A response that never stops loses
   --missing-eos-penalty.
3. Per-token reward: r_t = -beta * (log pi(y_t) - log pi_ref(y_t)), plus the score on the
   last token. The KL term keeps the policy near the SFT model (the reference), which is
   what stops it from exploiting the reward model's blind spots. beta is fixed or adapted
   toward a target KL (Ziegler et al.'s controller).
4. Advantages. --advantage rloo: a response's score minus the mean score of the other
   responses to its prompt (leave-one-out); grpo: minus the group's mean (optionally over
   its std); both then add the KL penalty still to come, token by token (no critic). gae:
   a critic predicts each prefix's value, generalized advantage estimation (Schulman et al.
   2016) turns rewards and values into advantages, whitened over the batch. A group whose
   scores are all equal teaches nothing: --drop-equal-groups leaves it out (DAPO).
5. Update: --ppo-epochs passes over minibatches with PPO's clipped surrogate (Schulman et
   al. 2017), optionally plus --ptx-coef times the language-model loss on a batch of
   demonstrations (InstructGPT's PPO-ptx, meant to keep what SFT taught while the policy
   moves; off by default, see README's results); with gae also a clipped squared error
   for the critic, which alone learns during the first --critic-warmup-steps steps so its
   values mean something before the policy relies on them.
6. Log: TRL's metric names; every --eval-every steps the held-out gold accuracy, refusal
   and over-refusal rates, and the reward model's mean score on the greedy answers.

The log-probs of step 5 must reproduce those of step 1 exactly on the first minibatch
(ratio 1): same padding, positions and temperature (docs/design.md pitfalls).

    python train_ppo.py                       # runs/sft + runs/rm on the task suite, the defaults below
    python train_ppo.py --advantage gae --critic-warmup-steps 10 --samples-per-prompt 1
    python train_ppo.py --init runs/sft --reward-model runs/rm --prompts my_prompts.jsonl --out runs/ppo
"""
from __future__ import annotations

import dataclasses
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from checkpoint import RewardScorer, load_model, read_checkpoint_config
from cli import UserError, entry_point, print_config
from data.loader import BucketLoader, EpochCursor
from data.text.chat import encode_chat, encode_prompt, iter_jsonl, load_chat_jsonl, prompt_messages
from data.text.tokenizer import Tokenizer
from distributed import (Env, all_reduce_mean, all_reduce_sum, compute_dtype, gather_rows, lockstep_batches,
                         max_over_ranks, prepare_model, print0, rank_share, seed_everything)
from evals import (accuracy_metrics, estimate_pass_rates, format_accuracy, format_samples, load_task_records,
                   task_accuracy, task_files)
from model import ScalarHeadModel, Transformer
from tasks import rl_prompts
from tasks import suite as tasks
from trainer import TrainConfig, Trainer, run_main

REPO = os.path.dirname(os.path.abspath(__file__))


@dataclass
class PPOConfig(TrainConfig):
    out: str = field(default=os.path.join(REPO, "runs", "ppo"), metadata={"help": "checkpoint directory"})
    init: str = field(default=os.path.join(REPO, "runs", "sft"), metadata={"help": "SFT checkpoint: policy and reference"})
    reward_model: str = field(default=os.path.join(REPO, "runs", "rm"), metadata={"help": "reward-model checkpoint"})
    critic_init: str = field(default="", metadata={"help": "gae: critic start (default: the reward model with --reward "
                                                   "rm, else the SFT model with a zero value head)"})
    prompts: list[str] = field(default_factory=list, metadata={"nargs": True,
                               "help": "JSONL with `prompt` or `messages` (default: the task suite's prompts.jsonl)"})
    eval_data: str = field(default="", metadata={"help": "held-out task records (default: the suite's eval.jsonl)"})
    reward: str = field(default="mix", metadata={"choices": ["rm", "task", "mix"],
                        "help": "rm: reward-model score; task: the task grader on helpfulness prompts (0/1); "
                                "mix: task_weight * grader where the grader applies, the reward model elsewhere"})
    task_weight: float = field(default=1.0, metadata={"help": "weight of the grader's 0/1 in --reward mix"})
    advantage: str = field(default="rloo", metadata={"choices": ["rloo", "grpo", "gae"],
                           "help": "baseline: leave-one-out group mean, group mean, or a critic with GAE"})
    samples_per_prompt: int = field(default=4, metadata={"help": "k: responses sampled per prompt (a group)"})
    grpo_std: bool = field(default=False, metadata={"help": "grpo: divide by the group's score std"})
    drop_equal_groups: bool = field(default=True, metadata={"help": "leave out groups whose scores are all equal"})
    critic_warmup_steps: int = field(default=0, metadata={"help": "gae: the first N steps train only the critic"})
    max_steps: int = field(default=30, metadata={"help": "PPO steps (each: one rollout batch, then the updates)"})
    batch_size: int = field(default=32, metadata={"help": "prompts per rollout on each rank"})
    minibatch_size: int = field(default=32, metadata={"help": "responses per gradient update on each rank"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    lr: float = 5e-5
    critic_lr: float = field(default=0.0, metadata={"help": "critic learning rate (0 = --lr)"})
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of rollouts (and of their log-probs)"})
    max_new_tokens: int = field(default=32, metadata={"help": "longest response"})
    missing_eos_penalty: float = field(default=1.0, metadata={"help": "subtracted from the score of a response that never stops"})
    kl_coef: float = field(default=0.1, metadata={"help": "beta: weight of the per-token KL penalty (initial, if adaptive)"})
    target_kl: float = field(default=0.0, metadata={"help": "adapt beta toward this KL per response (0 = fixed beta)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive controller horizon, in rollouts"})
    gamma: float = 1.0
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    cliprange: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip around the rollout's values"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    ptx_coef: float = field(default=0.0, metadata={"help": "PPO-ptx: weight of the language-model loss on --ptx-data "
                                                  "added to every policy update (0 = plain PPO)"})
    ptx_data: list[str] = field(default_factory=list, metadata={"nargs": True,
                                "help": "conversations (any SFT format) for PPO-ptx (default: the suite's ptx.jsonl, "
                                        "its helpfulness demonstrations)"})
    ptx_batch_size: int = field(default=8, metadata={"help": "PPO-ptx conversations per policy update on each rank"})
    refresh_every: int = field(default=0, metadata={"help": "every N steps from the start, the RL prompts become the "
                               "frontier of freshly drawn helpfulness instances: those where the current policy's "
                               "samples disagree (tasks/rl_prompts.py; 0 = the --prompts files throughout)"})
    fresh_per_family: int = field(default=100, metadata={"help": "--refresh-every: fresh instances drawn per "
                                  "helpfulness family at each refresh"})
    pass_samples: int = field(default=8, metadata={"help": "--refresh-every: answers sampled per fresh instance to "
                              "estimate its pass rate"})
    exclude: list[str] = field(default_factory=list, metadata={"nargs": True, "help": "--refresh-every: task files "
                               "whose prompts are never drawn (default: the suite's sft.jsonl and the --eval-data file)"})
    eval_every: int = 10
    save_every: int = 30
    log_every: int = 5
    eval_max_new_tokens: int = 32
    eval_samples: int = field(default=3, metadata={"help": "completions printed at each evaluation"})

    def __post_init__(self):
        super().__post_init__()
        k = self.samples_per_prompt
        if k < 1 or (self.advantage in ("rloo", "grpo") and k < 2):
            raise UserError(f"--samples-per-prompt must be >= 1 (>= 2 for --advantage {self.advantage}), got {k}")
        if self.minibatch_size <= 0 or (self.batch_size * k) % self.minibatch_size:
            raise UserError(f"--minibatch-size must divide the {self.batch_size * k} responses of a rollout "
                            f"(--batch-size x --samples-per-prompt), got {self.minibatch_size}")
        if self.advantage != "gae" and (self.critic_warmup_steps or self.critic_init):
            raise UserError("--critic-warmup-steps and --critic-init are for --advantage gae (the others have no critic)")
        if not 0 <= self.critic_warmup_steps < self.max_steps:
            raise UserError(f"need 0 <= --critic-warmup-steps < --max-steps, got {self.critic_warmup_steps}")
        if self.ppo_epochs <= 0 or self.max_new_tokens <= 0 or self.kl_horizon <= 0:
            raise UserError("need --ppo-epochs, --max-new-tokens and --kl-horizon > 0")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0 for PPO rollouts, got {self.temperature}")
        if min(self.kl_coef, self.target_kl, self.critic_lr, self.vf_coef, self.ptx_coef) < 0:
            raise UserError("need --kl-coef, --target-kl, --critic-lr, --vf-coef and --ptx-coef >= 0")
        if self.ptx_batch_size <= 0:
            raise UserError(f"--ptx-batch-size must be > 0, got {self.ptx_batch_size}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1) or self.cliprange <= 0 or self.cliprange_value <= 0:
            raise UserError("need 0 <= --gamma, --lam <= 1 and --cliprange, --cliprange-value > 0")
        if self.refresh_every < 0 or (self.refresh_every and (self.fresh_per_family < 1 or self.pass_samples < 2)):
            raise UserError("need --refresh-every >= 0, and with it --fresh-per-family >= 1 and --pass-samples >= 2 "
                            "(one sample cannot tell a prompt the policy sometimes gets right)")


# ----------------------------------------------------------------------------- the algorithm's pieces

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the positions where mask is 1; padding neither counts nor changes."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return ((x - mean) * torch.rsqrt(var + eps)) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalized advantage estimation over response tokens (B, R), right-padded.

    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0: the episode ends),
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V (the critic's targets)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
    return advantages, advantages + values


def token_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, beta: float):
    """Per-token rewards: -beta * KL_t everywhere, plus the score on each row's last token.
    Returns (rewards, kl) with kl_t = logp_t - ref_logp_t (the sampled-token estimate)."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = mask.sum(dim=1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def combine_scores(rm_score: torch.Tensor | None, graded: torch.Tensor | None, gradable: torch.Tensor,
                   eos: torch.Tensor, task_weight: float, missing_eos_penalty: float) -> torch.Tensor:
    """The score of each response, minus the penalty for one that never stopped: the reward
    model's; or the grader's 0/1; or, with both (--reward mix), task_weight times the
    grader's 0/1 where the grader applies (`gradable`) and the reward model's elsewhere."""
    if rm_score is not None and graded is not None:
        scores = torch.where(gradable, task_weight * graded, rm_score)
    else:
        scores = rm_score if rm_score is not None else graded
    return scores - missing_eos_penalty * (~eos).float()


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: int, n: int) -> float:
    """Ziegler et al.'s proportional controller: beta grows when KL is above target."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)


def group_advantages(scores: torch.Tensor, k: int, estimator: str, scale_by_std: bool = False) -> torch.Tensor:
    """Each response's score against its group (the k responses to one prompt, consecutive).

    rloo: minus the mean of the other k-1 scores, an unbiased baseline (Ahmadian et al.
    2024); grpo: minus the group mean, optionally divided by the group's std (Shao et al.
    2024). Either way a prompt that is always or never solved gives zero, not noise."""
    groups = scores.view(-1, k)
    if estimator == "rloo":
        baseline = (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)
    elif estimator == "grpo":
        baseline = groups.mean(dim=1, keepdim=True)
    else:
        raise ValueError(f"unknown group estimator {estimator!r}")
    advantages = groups - baseline
    if estimator == "grpo" and scale_by_std:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + 1e-6)
    return advantages.reshape(-1)


def equal_groups(scores: torch.Tensor, k: int, tol: float = 1e-6) -> torch.Tensor:
    """(B/k,) True where every score of the group is the same: no signal to learn from."""
    groups = scores.view(-1, k)
    return (groups.max(dim=1).values - groups.min(dim=1).values) <= tol


def kl_penalty_to_go(kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """sum over t' >= t of -beta * kl_t': the per-token KL penalty each token is still
    answerable for (the return of the KL rewards alone, gamma 1)."""
    penalty = -beta * kl * mask
    return penalty.flip(1).cumsum(1).flip(1) * mask


def policy_loss(logp, old_logp, advantages, mask, cliprange: float, n_tokens: float):
    """PPO's clipped surrogate, summed over real tokens / n_tokens.

    n_tokens is the number of response tokens in the whole (global) minibatch, so ranks
    holding different numbers of tokens still add up to the single-process mean."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    with torch.no_grad():  # token averages with the same normalizer: they add up over ranks too
        stats = {"policy/approxkl": 0.5 * (logp - old_logp) ** 2,
                 "policy/clipfrac": ((ratio - 1).abs() > cliprange).float(), "val/ratio": ratio}
        stats = {k: (v * mask).sum() / n_tokens for k, v in stats.items()}
    return (pg * mask).sum() / n_tokens, stats


def value_loss(values, old_values, returns, mask, cliprange_value: float, n_tokens: float):
    """The critic's clipped squared error (the larger of clipped and unclipped), as policy_loss."""
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_unclipped, vf_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    vf = 0.5 * torch.max(vf_unclipped, vf_clipped)
    with torch.no_grad():
        stats = {"val/clipfrac": ((vf_clipped > vf_unclipped).float() * mask).sum() / n_tokens}
    return (vf * mask).sum() / n_tokens, stats


# ----------------------------------------------------------------------------- rollout tensors

def pack(prompts: list[list[int]], responses: list[list[int]], width_p: int, width_r: int, pad_id: int):
    """One (B, width_p + width_r) tensor: prompts left-padded, responses right-padded with
    <|pad|> (never the stop token). Returns (ids, kv_start = left padding, response mask)."""
    ids = torch.full((len(prompts), width_p + width_r), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width_r)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, width_p - len(p):width_p] = torch.tensor(p)
        ids[i, width_p:width_p + len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    kv_start = torch.tensor([width_p - len(p) for p in prompts])
    return ids, kv_start, mask


def response_logprobs(model, ids, kv_start, mask, width_p: int, temperature: float, entropy: bool = False):
    """log pi(y_t | prefix) of each response token (B, R) at the sampling temperature (0 on
    padding), through the model's fused cross-entropy; with entropy, also each position's."""
    targets = ids[:, 1:].clone()
    targets[:, :width_p - 1] = -100
    targets[:, width_p - 1:][mask == 0] = -100
    out = model(ids[:, :-1], targets=targets, kv_start=kv_start, reduction="none", temperature=temperature,
                return_entropy=entropy)
    nll, ent = out if entropy else (out, None)
    logp = -nll[:, width_p - 1:] * mask
    return (logp, ent[:, width_p - 1:] * mask) if entropy else logp


def response_values(critic, ids, kv_start, mask, width_p: int):
    """The critic's value of each response position: read where the token is predicted."""
    return critic.values(ids[:, :-1], kv_start=kv_start)[:, width_p - 1:] * mask


# ----------------------------------------------------------------------------- data and models

def graded_by_task(rec: dict) -> bool:
    """Whether the task grader scores a prompt: it has an answer and is not harmful or
    borderline (those the reward model alone scores: the gold judge only measures them)."""
    return ("answer" in rec and rec.get("family") not in tasks.SAFETY_FAMILIES
            and (rec.get("family") in tasks.TASK_FAMILIES or "answer_type" in rec))


def load_prompts(paths: list[str], tok, max_prompt_len: int, reward: str):
    """(records, encoded prompts, skipped-reason Counter). A prompt that leaves no room
    for a response is skipped as too_long; with --reward task, one the grader cannot score
    too (safety_family, no_answer)."""
    records, prompts, skipped = [], [], Counter()
    for rec, messages in iter_jsonl(paths, prompt_messages, skipped):
        ids = encode_prompt(tok, messages)
        if len(ids) > max_prompt_len:
            skipped["too_long"] += 1
        elif reward == "task" and rec.get("family") in tasks.SAFETY_FAMILIES:
            skipped["safety_family"] += 1
        elif reward == "task" and not graded_by_task(rec):
            skipped["no_answer"] += 1
        else:
            records.append(rec)
            prompts.append(ids)
    return records, prompts, skipped


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return a.token_bytes == b.token_bytes and (a.eot_id, a.pad_id, a.end_id) == (b.eot_id, b.pad_id, b.end_id)


def load_frozen(ckpt: str, env, dtype, model_class=Transformer):
    """A model that is only evaluated: no dropout, no gradients, sharded like the others."""
    model, config = load_model(ckpt, model_class=model_class, dropout=0.0)
    model.requires_grad_(False)
    model.eval()
    return prepare_model(model, env, dtype), config


class Critic:
    """The value model of --advantage gae: a transformer with a scalar head and its own
    optimizer, saved in OUT/critic at the policy's step. It starts on the reward's scale:
    from the reward model, its head rescaled to the normalized score, when the reward is
    the reward model's alone; otherwise from the SFT model with a zero value head."""

    def __init__(self, cfg: PPOConfig, env: Env, norm: dict, tokenizer_path: str):
        self.init = cfg.critic_init or (cfg.reward_model if cfg.reward == "rm" else cfg.init)
        torch.manual_seed(cfg.seed)  # a fresh value head is the same on every rank
        model, _ = load_model(self.init, model_class=ScalarHeadModel, dropout=0.0)
        if not cfg.critic_init:
            with torch.no_grad():
                if self.init == cfg.reward_model:  # raw reward-model scores -> the normalized ones
                    model.score_head.weight /= norm["std"]
                    model.score_head.bias.sub_(norm["mean"]).div_(norm["std"])
                else:  # values 0 at first: on the scale of 0/1 and normalized scores alike
                    model.score_head.weight.zero_()
                    model.score_head.bias.zero_()
        self.vf_coef, self.cliprange_value = cfg.vf_coef, cfg.cliprange_value
        critic_cfg = dataclasses.replace(cfg, out=os.path.join(cfg.out, "critic"), lr=cfg.critic_lr or cfg.lr)
        self.trainer = Trainer(critic_cfg, env, model, stage="critic", tokenizer_path=tokenizer_path,
                                       extra_config={"init": self.init})
        self.model = self.trainer.model

    def values(self, ids, kv_start, mask, width_p: int) -> torch.Tensor:
        return response_values(self.model, ids, kv_start, mask, width_p)

    def learn(self, values, old_values, returns, mask, n_tokens: float, world_size: int) -> tuple[torch.Tensor, dict]:
        """One gradient step on the clipped value loss of a minibatch."""
        loss, stats = value_loss(values, old_values, returns, mask, self.cliprange_value, n_tokens)
        self.trainer.backward(self.vf_coef * loss * world_size)  # ranks' gradients are averaged
        self.trainer.apply_gradients(bool(torch.isfinite(loss)))
        return loss.detach(), stats

    def save_at(self, step: int) -> None:
        """Save with the policy (its before_save), at the policy's step."""
        self.trainer.step = step
        self.trainer.save()

    def resume_at(self, step: int) -> None:
        self.trainer.resume()
        if self.trainer.step != step:
            raise UserError(f"--resume: the critic in {self.trainer.cfg.out} is at step {self.trainer.step}, "
                            f"the policy at {step}; the last save was interrupted")


# ----------------------------------------------------------------------------- the steps

@dataclass
class Rollout:
    """One step's batch from rollout to update. rollout() fills in this rank's responses,
    k per prompt, group after group, each packed as left-padded prompt | right-padded
    response; score() adds their scores and the log-probs (and values) every later step
    needs; gather() makes it the global batch on every rank; advantages() adds the rest."""
    rows: list[int]  # the prompt index of each response (this rank's)
    ids: torch.Tensor
    kv_start: torch.Tensor
    mask: torch.Tensor  # (B, R): 1 on response tokens
    width_p: int
    texts: list[str]
    eos: torch.Tensor  # the response stopped at <|end|>
    scores: torch.Tensor | None = None
    logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # False for the groups --drop-equal-groups leaves out

    @property
    def update_mask(self) -> torch.Tensor:
        return self.mask * self.keep[:, None]


def rollout(policy, trainer, prompts: list[list[int]], rows: list[int], cfg: PPOConfig, env, tok) -> Rollout:
    """1. k responses to each of this rank's prompts. Each response has its own generator,
    seeded by its place in the global batch: the samples do not depend on how many ranks
    share the batch. A group's prompt goes through the model once (generate's num_samples)."""
    k = cfg.samples_per_prompt
    batch_prompts = [prompts[i] for i in rows]
    first = cfg.seed * 1_000_003 + trainer.step * cfg.batch_size * env.world_size * k + env.rank * cfg.batch_size * k
    generators = [torch.Generator(device=env.device).manual_seed(first + i) for i in range(len(rows) * k)]
    width_p = max_over_ranks(max(map(len, batch_prompts)), env.device)
    policy.eval()
    with trainer.autocast():
        responses = policy.generate(batch_prompts, cfg.max_new_tokens, tok.pad_id, cfg.temperature,
                                    stop_tokens=[tok.end_id], generator=generators, min_width=width_p, num_samples=k)
    policy.train()
    width_r = max_over_ranks(max(map(len, responses)), env.device)
    repeated = [p for p in batch_prompts for _ in range(k)]
    ids, kv_start, mask = (t.to(env.device) for t in pack(repeated, responses, width_p, width_r, tok.pad_id))
    eos = torch.tensor([bool(r) and r[-1] == tok.end_id for r in responses], device=env.device)
    texts = [tok.decode_reply(r) for r in responses]
    return Rollout([i for i in rows for _ in range(k)], ids, kv_start, mask, width_p, texts, eos)


@torch.no_grad()
def score(batch: Rollout, run: "PPORun", cfg: PPOConfig) -> None:
    """2. Each response's score: the reward model's, the grader's 0/1 (helpfulness prompts
    with answers), or the grader's where it applies and the reward model's elsewhere; a
    response that never stopped is penalized. Then the forwards every later step needs:
    the policy's and the reference's log-probs of the responses (and the critic's values)."""
    rm_score = graded = None
    records, device = run.records, batch.ids.device
    gradable = torch.tensor([graded_by_task(records[i]) for i in batch.rows], device=device)
    with run.trainer.autocast():
        if cfg.reward in ("rm", "mix"):
            last = batch.width_p + batch.mask.sum(dim=1).long() - 1
            rm_score = run.scorer.score_ids(batch.ids, last, batch.kv_start)
        if cfg.reward in ("task", "mix"):
            graded = torch.tensor([tasks.grade(records[i], text) if graded_by_task(records[i]) else 0.0
                                   for i, text in zip(batch.rows, batch.texts)], device=device)
        batch.scores = combine_scores(rm_score, graded, gradable, batch.eos, cfg.task_weight, cfg.missing_eos_penalty)
        batch.logp, batch.entropy = response_logprobs(run.policy, batch.ids, batch.kv_start, batch.mask,
                                                      batch.width_p, cfg.temperature, entropy=True)
        batch.ref_logp = response_logprobs(run.reference, batch.ids, batch.kv_start, batch.mask, batch.width_p,
                                           cfg.temperature)
        if run.critic:
            batch.values = run.critic.values(batch.ids, batch.kv_start, batch.mask, batch.width_p)


def gather(batch: Rollout) -> Rollout:
    """Every rank gets the whole batch (groups stay whole, in rank order): advantages and
    minibatches are then exactly those of a single process."""
    g = {name: gather_rows(getattr(batch, name)) for name in
         ("ids", "kv_start", "mask", "logp", "ref_logp", "scores", "entropy")}
    eos = gather_rows(batch.eos.float())
    values = gather_rows(batch.values) if batch.values is not None else None
    return Rollout([], g["ids"], g["kv_start"], g["mask"], batch.width_p, [], eos, g["scores"], g["logp"],
                   g["ref_logp"], g["entropy"], values)


def advantages(batch: Rollout, beta: float, cfg: PPOConfig) -> None:
    """3 and 4. Per-token rewards (the KL penalty, the score on the last token), then the
    advantages of the chosen estimator (and with gae the critic's returns); the per-token
    KL, and the rows kept (--drop-equal-groups leaves out groups whose scores are equal)."""
    k, scores, mask = cfg.samples_per_prompt, batch.scores, batch.mask
    keep = torch.ones(len(scores), dtype=torch.bool, device=scores.device)
    if cfg.drop_equal_groups and k > 1:
        keep = ~equal_groups(scores, k).repeat_interleave(k)
    rewards, kl = token_rewards(batch.logp, batch.ref_logp, scores, mask, beta)
    if cfg.advantage == "gae":
        adv, batch.returns = gae(rewards, batch.values, mask, cfg.gamma, cfg.lam)
        batch.advantages = masked_whiten(adv, mask * keep[:, None])
    else:
        sequence = group_advantages(scores, k, cfg.advantage, cfg.grpo_std)
        batch.advantages = (sequence[:, None] + kl_penalty_to_go(kl, mask, beta)) * mask
    batch.kl, batch.keep = kl, keep


def ptx_loss(policy, ptx, pad_id: int, env) -> torch.Tensor:
    """PPO-ptx's term: this rank's share of the mean next-token loss over the assistant
    tokens of one global batch of --ptx-data conversations (the shares sum to the mean)."""
    x, y = ptx.next_batch(pad_id)
    x, y = x.to(env.device), y.to(env.device)
    n_tokens = (y != -100).sum().double()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(n_tokens)
    return policy(x, y, reduction="none").sum() / n_tokens.clamp(min=1).float()


def update(trainer, critic: Critic | None, batch: Rollout, cfg: PPOConfig, env, learn_policy: bool,
           ptx=None, pad_id: int = 0) -> dict:
    """5. --ppo-epochs passes over minibatches of the global batch, each rank computing its
    slice: the clipped surrogate for the policy (unless the critic is warming up), plus with
    PPO-ptx --ptx-coef times the language-model loss on a batch of demonstrations, and the
    clipped value loss for the critic. Returns the minibatches' mean statistics."""
    policy, world = trainer.model, env.world_size
    ids, kv_start, mask, width_p = batch.ids, batch.kv_start, batch.update_mask, batch.width_p
    mb_global = cfg.minibatch_size * world
    sums, n_updates = Counter(), 0  # this rank's shares of each minibatch's averages
    for epoch in range(cfg.ppo_epochs):
        shuffle = torch.randperm(len(ids), generator=torch.Generator().manual_seed(
            cfg.seed + 7919 * trainer.step + epoch)).to(env.device)
        for start in range(0, len(ids), mb_global):
            mb = shuffle[start:start + mb_global]
            n_tokens = float(mask[mb].sum())
            if n_tokens == 0:  # only left-out groups: nothing to learn (every rank sees the same)
                continue
            mine = mb[env.rank * cfg.minibatch_size:(env.rank + 1) * cfg.minibatch_size]
            m, stats = mask[mine], {}
            if learn_policy:
                with trainer.autocast():
                    new_logp = response_logprobs(policy, ids[mine], kv_start[mine], m, width_p, cfg.temperature)
                    pg, stats = policy_loss(new_logp, batch.logp[mine], batch.advantages[mine], m,
                                            cfg.cliprange, n_tokens)
                    loss = pg
                    if ptx is not None:
                        lm = ptx_loss(policy, ptx, pad_id, env)
                        loss = pg + cfg.ptx_coef * lm
                        stats["loss/ptx"] = lm.detach()
                trainer.backward(loss * world)  # ranks' gradients are averaged: scale to the global mean
                trainer.apply_gradients(bool(torch.isfinite(loss)))
                stats["loss/policy"] = pg.detach()
            if critic is not None:
                with trainer.autocast():
                    new_values = critic.values(ids[mine], kv_start[mine], m, width_p)
                vf, value_stats = critic.learn(new_values, batch.values[mine], batch.returns[mine], m, n_tokens,
                                               world)
                stats.update(value_stats)
                stats["loss/value"] = vf
            for key, value in stats.items():
                sums[key] += value.item()
            n_updates += 1
    return {key: world * all_reduce_mean(torch.tensor(value / n_updates, device=env.device)).item()
            for key, value in sums.items()}


def step_metrics(batch: Rollout, beta: float, cfg: PPOConfig, times: dict) -> dict:
    """6. TRL's names for the step's numbers (plus the groups left out)."""
    mask, scores, kl = batch.mask, batch.scores, batch.kl
    metrics = {
        "objective/kl": kl.sum(dim=1).mean().item(),
        "objective/entropy": batch.entropy.sum(dim=1).mean().item(),
        "objective/scores": scores.mean().item(),
        "objective/rlhf_reward": (scores - beta * kl.sum(dim=1)).mean().item(),
        "objective/kl_coef": beta,
        "tokens/response_len": mask.sum(dim=1).mean().item(),
        "eos_fraction": batch.eos.float().mean().item(),
        "groups/dropped": int((~batch.keep).sum().item()) // cfg.samples_per_prompt,
        **times,
    }
    if batch.returns is not None:
        residual = (batch.returns - batch.values) * mask
        var_returns = masked_mean((batch.returns - masked_mean(batch.returns, mask)) ** 2, mask)
        metrics["val/var_explained"] = 1 - (masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
                                            / var_returns.clamp(min=1e-8)).item()
    return metrics


@torch.no_grad()
def evaluate(policy, tok, eval_records, scorer: RewardScorer, cfg: PPOConfig, env, max_len: int) -> dict:
    """Held-out gold accuracy and refusal rates of the greedy answers, and the reward
    model's mean score on them: the two sides of Gao et al.'s over-optimization picture.
    Each rank scores its share in the same number of forwards (a sharded forward is a
    collective)."""
    result = task_accuracy(policy, tok, eval_records, env.rank, env.world_size, cfg.eval_max_new_tokens)
    samples = result["samples"]
    _, per_rank = rank_share(eval_records, env.rank, env.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    filler = [{"prompt": eval_records[0]["prompt"], "response": ""}]
    for chunk, real in lockstep_batches(samples, per_rank, cfg.batch_size, filler):
        seqs = [encode_chat(tok, [{"role": "user", "content": s["prompt"]},
                                  {"role": "assistant", "content": s["response"]}])[0][-max_len:] for s in chunk]
        ids, kv_start, _ = pack(seqs, [[]] * len(seqs), max(map(len, seqs)), 0, tok.pad_id)
        scores = scorer.score_ids(ids.to(env.device), torch.full((len(seqs),), ids.shape[1] - 1, device=env.device),
                                  kv_start.to(env.device))
        if real:
            total += torch.stack([scores.double().sum(), torch.tensor(float(len(chunk)), dtype=torch.float64,
                                                                      device=env.device)])
    all_reduce_sum(total)
    result["rm_score"] = float(total[0] / total[1].clamp(min=1))
    return result


# ----------------------------------------------------------------------------- training

@entry_point
def main(argv=None) -> None:
    run_main(PPOConfig, train, argv, description=__doc__.split("\n")[0])


@dataclass
class PPORun:
    """What the loop works with: the models, the prompts, the trainers and the position."""
    tok: Tokenizer
    policy: Transformer  # the trainer's (possibly sharded) model
    reference: Transformer
    scorer: RewardScorer
    critic: Critic | None
    trainer: Trainer
    records: list[dict]
    prompts: list[list[int]]
    eval_records: list[dict]
    eval_file: str
    ptx: BucketLoader | None
    cursor: EpochCursor
    kl_coef: float
    excluded: set[str] = field(default_factory=set)  # --refresh-every: prompts never drawn
    refreshed: list[dict] | None = None  # --refresh-every: the current frontier (saved for --resume)


def load_models(cfg: PPOConfig, env: Env):
    """The policy (it learns) from --init; the frozen reference (also --init) and reward model."""
    init_config = read_checkpoint_config(cfg.init)
    rm_config = read_checkpoint_config(cfg.reward_model)
    if rm_config.get("stage") != "rm":
        raise UserError(f"--reward-model {cfg.reward_model} is a {rm_config.get('stage')!r} checkpoint, "
                        "not a reward model (train one with train_rm.py)")
    tok = Tokenizer.load(os.path.join(cfg.init, "tokenizer.json"))
    if not same_tokenizer(tok, Tokenizer.load(os.path.join(cfg.reward_model, "tokenizer.json"))):
        raise UserError(f"the reward model {cfg.reward_model} uses a different tokenizer from the policy {cfg.init}")
    policy, _ = load_model(cfg.init, dropout=0.0)
    dtype = compute_dtype(cfg.dtype, env.device)
    reference, _ = load_frozen(cfg.init, env, dtype)
    reward_model, _ = load_frozen(cfg.reward_model, env, dtype, ScalarHeadModel)
    return tok, policy, reference, reward_model, rm_config.get("score_norm"), init_config


def load_data(cfg: PPOConfig, env: Env, tok: Tokenizer, max_len: int):
    """The RL prompts, the held-out records and, with PPO-ptx, the demonstrations."""
    prompt_files, eval_file = task_files(cfg.prompts, "prompts.jsonl", cfg.eval_data)
    records, prompts, skipped = load_prompts(prompt_files, tok, max_len - cfg.max_new_tokens, cfg.reward)
    print0(f"ppo prompts: {len(prompts)} from {len(prompt_files)} file(s); skipped {sum(skipped.values())} "
                   f"({', '.join(f'{k} {v}' for k, v in sorted(skipped.items())) or 'none'})")
    rows_per_step = cfg.batch_size * env.world_size
    if len(prompts) < rows_per_step:
        raise UserError(f"{len(prompts)} usable prompts in {' '.join(prompt_files)}: fewer than one rollout "
                        f"batch of {rows_per_step} (lower --batch-size or --max-new-tokens)")
    ptx = None
    if cfg.ptx_coef > 0:  # PPO-ptx (InstructGPT): keep the demonstrated skills while the policy moves
        ptx_files, _ = task_files(cfg.ptx_data, "ptx.jsonl", None)
        examples, ptx_skipped, _ = load_chat_jsonl(ptx_files, tok, max_len)
        print0(f"ptx data: {len(examples)} conversations from {len(ptx_files)} file(s); skipped "
                       f"{sum(ptx_skipped.values())}, weight {cfg.ptx_coef}")
        ptx = BucketLoader(examples, cfg.ptx_batch_size * env.world_size, env.rank, env.world_size, cfg.seed)
    return records, prompts, load_task_records(eval_file), eval_file, ptx


def setup_run(cfg: PPOConfig, env: Env) -> PPORun:
    """Models, data and trainers (the critic saves into OUT/critic just before the policy
    saves into OUT), resumed from --out with --resume."""
    tok, policy, reference, reward_model, norm, init_config = load_models(cfg, env)
    records, prompts, eval_records, eval_file, ptx = load_data(cfg, env, tok, policy.cfg.max_seq_len)
    seed_everything(cfg.seed, env.rank)
    norm = norm or {"mean": 0.0, "std": 1.0}
    tokenizer_path = os.path.join(cfg.init, "tokenizer.json")
    critic = Critic(cfg, env, norm, tokenizer_path) if cfg.advantage == "gae" else None
    cursor = EpochCursor(len(prompts), cfg.batch_size * env.world_size, cfg.seed)
    run = None
    trainer = Trainer(cfg, env, policy, stage="ppo", tokenizer_path=tokenizer_path,
                              data_state=lambda: {**run.cursor.state_dict(), "kl_coef": run.kl_coef,
                                                  **({"ptx": ptx.state_dict()} if ptx else {}),
                                                  **({"refreshed": run.refreshed} if run.refreshed else {})},
                              before_save=(lambda: critic.save_at(trainer.step)) if critic else None,
                              extra_config={"init": cfg.init, "reward_model": cfg.reward_model,
                                            "base_stage": init_config.get("stage"), "reward": cfg.reward,
                                            "advantage": cfg.advantage, "samples_per_prompt": cfg.samples_per_prompt})
    scorer = RewardScorer(reward_model, tok, norm, autocast=trainer.autocast)
    run = PPORun(tok, trainer.model, reference, scorer, critic, trainer, records, prompts, eval_records, eval_file,
                 ptx, cursor, cfg.kl_coef)
    if cfg.refresh_every:
        run.excluded = excluded_prompts(cfg, eval_file)
    if cfg.resume:
        data = trainer.resume()["data"]
        if data.get("refreshed"):  # the frontier chosen at the last refresh, and the position in it
            use_prompts(run, cfg, env, data["refreshed"], trainer.step // cfg.refresh_every)
        run.cursor.load_state_dict(data)
        run.kl_coef = data["kl_coef"]
        if ptx and "ptx" in data:
            ptx.load_state_dict(data["ptx"])
        if critic:
            critic.resume_at(trainer.step)
    trainer.start(flops_per_token=run.policy.flops_per_token(policy.cfg.max_seq_len))
    return run


def excluded_prompts(cfg: PPOConfig, eval_file: str | None) -> set[str]:
    """--refresh-every: the prompts never to draw, from --exclude or the suite's SFT
    demonstrations and the held-out file."""
    files = cfg.exclude or [f for f in (os.path.join(os.path.dirname(eval_file), "sft.jsonl") if eval_file else None,
                                        eval_file) if f and os.path.isfile(f)]
    excluded = rl_prompts.prompt_texts(files, label="--exclude " if cfg.exclude else "")
    print0(f"refresh: fresh prompts never include the {len(excluded)} prompts of "
                   f"{' '.join(files) or 'no file (give --exclude)'}")
    return excluded


def use_prompts(run: PPORun, cfg: PPOConfig, env: Env, records: list[dict], refresh: int) -> None:
    """Make `records` the RL prompts, visited in an order of their own."""
    run.refreshed = records
    run.records = records
    run.prompts = [encode_prompt(run.tok, [{"role": "user", "content": r["prompt"]}]) for r in records]
    run.cursor = EpochCursor(len(records), cfg.batch_size * env.world_size, cfg.seed + refresh)


@torch.no_grad()
def refresh_prompts(run: PPORun, cfg: PPOConfig, env: Env) -> None:
    """--refresh-every: draw fresh helpfulness instances (never an excluded prompt, never a
    held-out one), estimate the current policy's pass rate on each from --pass-samples
    answers at the rollout temperature, and train on the frontier (0 < pass rate < 1). When
    the frontier is smaller than a rollout batch, other drawn prompts, at random, fill it. Every rank draws and estimates the same prompts with the same seed (a
    sharded policy needs every rank in every forward)."""
    refresh = run.trainer.step // cfg.refresh_every
    seed = cfg.seed + refresh
    drawn = rl_prompts.fresh_task_prompts(list(tasks.TASK_FAMILIES), cfg.fresh_per_family, seed, run.excluded)
    rates = estimate_pass_rates(run.policy, run.tok, drawn, cfg.pass_samples, cfg.temperature, seed,
                                           cfg.max_new_tokens)
    chosen = rl_prompts.frontier(drawn, rates)
    rows = cfg.batch_size * env.world_size
    if len(chosen) < rows:  # too few on the frontier: other fresh prompts, chosen at random, fill the batch
        taken = {r["id"] for r in chosen}
        rest = [r for r in drawn if r["id"] not in taken]
        chosen = chosen + random.Random(seed).sample(rest, min(len(rest), rows - len(chosen)))
    if len(chosen) < rows:
        raise UserError(f"--refresh-every: only {len(drawn)} fresh prompts could be drawn, fewer than one rollout "
                        f"batch of {rows} (raise --fresh-per-family)")
    use_prompts(run, cfg, env, chosen, refresh)
    frontier = sum(0 < p < 1 for p in rates)
    mean_pass = sum(rates) / len(rates)
    print0(f"refresh at step {run.trainer.step}: {len(drawn)} fresh prompts, mean pass rate {mean_pass:.3f}, "
                   f"{frontier} on the frontier; training on {len(chosen)}")
    run.trainer.log({"step": run.trainer.step, "refresh/drawn": len(drawn), "refresh/frontier": frontier,
                     "refresh/mean_pass_rate": mean_pass})


def run_eval(run: PPORun, cfg: PPOConfig, env: Env, kl: float) -> dict | None:
    """Held-out evaluation, printed, logged and kept in the checkpoint's config."""
    trainer = run.trainer
    if not run.eval_records:
        print0(f"eval step {trainer.step}: no gradable records in {run.eval_file}, skipped")
        return None
    with trainer.timed("evaluation"):
        result = evaluate(run.policy, run.tok, run.eval_records, run.scorer, cfg, env, run.policy.cfg.max_seq_len)
        print0(f"eval step {trainer.step}: held-out task accuracy {format_accuracy(result)}, "
                       f"mean reward-model score {result['rm_score']:+.3f}" + format_samples(result["samples"],
                                                                                          cfg.eval_samples))
        trainer.log({"step": trainer.step, "eval/rm_score": result["rm_score"], "eval/kl": kl,
                     **accuracy_metrics(result, "eval/")})
    summary = {"accuracy": result["task_accuracy"], "per_family": result["per_family"],
               "safety": result["safety"], "rm_score": result["rm_score"], "kl": kl}
    trainer.extra_config["eval"] = summary
    return summary


def ppo_step(run: PPORun, cfg: PPOConfig, env: Env) -> dict:
    """One PPO iteration, steps 1-6 of the module docstring; returns the step's metrics."""
    trainer, critic = run.trainer, run.critic
    trainer.set_lr()
    if critic:
        critic.trainer.step = trainer.step  # the critic follows the policy's schedule
        critic.trainer.set_lr()
    t0 = time.time()
    rows = run.cursor.next()[env.rank * cfg.batch_size:(env.rank + 1) * cfg.batch_size]
    local = rollout(run.policy, trainer, run.prompts, rows, cfg, env, run.tok)  # 1. rollout
    score(local, run, cfg)  # 2. score, and the log-probs and values every later step needs
    batch = gather(local)
    beta = run.kl_coef
    advantages(batch, beta, cfg)  # 3. and 4. per-token rewards and advantages
    t_rollout = time.time() - t0
    trainer.add_time("rollouts (sampling, scoring)", t_rollout)  # the rest of the step: the updates
    learn_policy = trainer.step >= cfg.critic_warmup_steps  # 5. update
    losses = update(trainer, critic, batch, cfg, env, learn_policy, run.ptx, run.tok.pad_id)
    metrics = {**step_metrics(batch, beta, cfg, {"time/generation": t_rollout,  # 6. log, adapt beta
                                                 "time/training": time.time() - t0 - t_rollout}), **losses}
    if cfg.target_kl:
        run.kl_coef = adaptive_kl_coef(beta, metrics["objective/kl"], cfg.target_kl, cfg.kl_horizon, len(batch.ids))
    loss = losses.get("loss/policy", 0.0) + cfg.vf_coef * losses.get("loss/value", 0.0)
    trainer.end_step(loss, int((batch.ids != run.tok.pad_id).sum()), metrics,
                     suffix=f" | score {metrics['objective/scores']:+.3f} | kl {metrics['objective/kl']:.3f}"
                            f" | len {metrics['tokens/response_len']:.1f}"
                            + (f" | dropped {metrics['groups/dropped']}/{len(rows) * env.world_size} groups"
                               if cfg.drop_equal_groups and cfg.samples_per_prompt > 1 else "")
                            + ("" if learn_policy else " | critic warm-up"))
    return metrics


def train(cfg: PPOConfig, env: Env) -> None:
    if env.is_main:
        print_config(cfg, "ppo config")
    run = setup_run(cfg, env)
    if run.trainer.step == 0:
        run.trainer.extra_config["eval_start"] = run_eval(run, cfg, env, 0.0)  # the SFT starting point
    with run.trainer:
        while run.trainer.step < cfg.max_steps:
            if cfg.refresh_every and run.trainer.step % cfg.refresh_every == 0:
                with run.trainer.timed("prompt refresh"):
                    refresh_prompts(run, cfg, env)
            metrics = ppo_step(run, cfg, env)
            if run.trainer.due(cfg.eval_every):
                run_eval(run, cfg, env, metrics["objective/kl"])
            run.trainer.maybe_save()
            if run.trainer.stop_requested():
                break


if __name__ == "__main__":
    main()
