"""Stage 3b: PPO against a reward, with a per-token KL penalty to the frozen SFT model.

InstructGPT's third step (Ouyang et al. 2022; Ziegler et al. 2019 before it). Each step:

1. Rollout: the policy (initialized from SFT) samples a response to a batch of prompts,
   stopping at <|end|>. A response that never stops is penalized.
2. Score: the reward model scores each (prompt, response), or the task grader checks the
   answer (--reward task, a verifiable reward), or both (--reward mix).
3. Per-token reward: r_t = -beta * (log pi(y_t) - log pi_ref(y_t)), plus the score on the
   last token. The KL term keeps the policy near the frozen SFT model (the reference),
   which is what stops it from exploiting the reward model's blind spots. beta is fixed
   or adapted toward a target KL (Ziegler et al.'s controller).
4. Advantages: a critic (initialized from the reward model) predicts the value of each
   prefix; generalized advantage estimation (Schulman et al. 2016) turns rewards and
   values into advantages and returns; advantages are whitened over the batch.
5. Update: a few epochs over minibatches of the rollout with PPO's clipped surrogate
   (Schulman et al. 2017) for the policy and a clipped squared error for the critic.

The log-probs of step 5 must reproduce those of the rollout exactly on the first
minibatch (ratio 1): same padding, positions and temperature (DESIGN.md pitfalls).
Metric names follow TRL's PPOTrainer so curves can be compared.

    python train_ppo.py                    # runs/sft + runs/rm on the task suite, reward = the task grader (0/1)
    python train_ppo.py --reward rm        # reward = the reward model's score (the classic RLHF setting)
    python train_ppo.py --init runs/sft --reward-model runs/rm --prompts my_prompts.jsonl --reward rm --out runs/ppo

The default reward is the grader because the default reward model, trained on synthetic
mistakes, does not rank this policy's own mistakes well: optimizing it alone lowers the
gold accuracy (README, results), the over-optimization Gao et al. (2022) describe.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

import runtime
from cli import UserError, print_config
from data import tasks
from data.chat import encode_chat, encode_prompt, iter_jsonl, prompt_messages
from data.tokenizer import Tokenizer
from evals import accuracy_metrics, format_accuracy, format_samples, load_task_records, task_accuracy, task_files
from model import ScalarHeadModel, Transformer

REPO = os.path.dirname(os.path.abspath(__file__))
TASKS_DIR = os.path.join(REPO, "prepared", "tasks")


@dataclass
class PPOConfig(runtime.TrainConfig):
    out: str = field(default=os.path.join(REPO, "runs", "ppo"), metadata={"help": "checkpoint directory"})
    init: str = field(default=os.path.join(REPO, "runs", "sft"), metadata={"help": "SFT checkpoint: policy and reference"})
    reward_model: str = field(default=os.path.join(REPO, "runs", "rm"), metadata={"help": "reward-model checkpoint"})
    critic_init: str = field(default="", metadata={"help": "critic start (default: the reward model)"})
    prompts: list[str] = field(default_factory=list, metadata={"nargs": True,
                               "help": "JSONL with `prompt` or `messages` (default: the task suite's prompts.jsonl)"})
    eval_data: str = field(default="", metadata={"help": "held-out task records with answers (default: the suite's eval.jsonl)"})
    reward: str = field(default="task", metadata={"choices": ["rm", "task", "mix"],
                        "help": "rm: reward-model score; task: the task grader (needs answers); mix: rm + task_weight * task"})
    task_weight: float = field(default=1.0, metadata={"help": "weight of the grader's 0/1 in --reward mix"})
    max_steps: int = field(default=100, metadata={"help": "PPO steps (each: one rollout batch, then the updates)"})
    batch_size: int = field(default=64, metadata={"help": "prompts per rollout on each rank"})
    minibatch_size: int = field(default=16, metadata={"help": "rollouts per gradient update on each rank"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    lr: float = 3e-5
    critic_lr: float = field(default=0.0, metadata={"help": "critic learning rate (0 = --lr)"})
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of rollouts (and of their log-probs)"})
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
    eval_every: int = 25
    save_every: int = 50
    log_every: int = 5
    eval_max_new_tokens: int = 32
    eval_samples: int = field(default=3, metadata={"help": "completions printed at each evaluation"})

    def __post_init__(self):
        super().__post_init__()
        if self.minibatch_size <= 0 or self.batch_size % self.minibatch_size:
            raise UserError(f"--minibatch-size must divide --batch-size ({self.batch_size}), got {self.minibatch_size}")
        if self.ppo_epochs <= 0 or self.max_new_tokens <= 0 or self.kl_horizon <= 0:
            raise UserError("need --ppo-epochs, --max-new-tokens and --kl-horizon > 0")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be > 0 for PPO rollouts, got {self.temperature}")
        if self.kl_coef < 0 or self.target_kl < 0 or self.critic_lr < 0 or self.vf_coef < 0:
            raise UserError("need --kl-coef, --target-kl, --critic-lr and --vf-coef >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1) or self.cliprange <= 0 or self.cliprange_value <= 0:
            raise UserError("need 0 <= --gamma, --lam <= 1 and --cliprange, --cliprange-value > 0")


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


def combine_scores(rm_score: torch.Tensor | None, graded: torch.Tensor | None, eos: torch.Tensor,
                   task_weight: float, missing_eos_penalty: float) -> torch.Tensor:
    """The score of each response: the reward model's, the grader's 0/1 (weighted when
    added to the reward model's), minus the penalty for a response that never stopped."""
    scores = torch.zeros(len(eos), device=eos.device)
    if rm_score is not None:
        scores += rm_score
    if graded is not None:
        scores += graded if rm_score is None else task_weight * graded
    return scores - missing_eos_penalty * (~eos).float()


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: int, n: int) -> float:
    """Ziegler et al.'s proportional controller: beta grows when KL is above target."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n / horizon)


def ppo_losses(logp, old_logp, advantages, values, old_values, returns, mask, cliprange: float,
               cliprange_value: float, n_tokens: float):
    """Clipped surrogate and clipped value losses, summed over real tokens / n_tokens.

    n_tokens is the number of response tokens in the whole (global) minibatch, so ranks
    holding different numbers of tokens still add up to the single-process mean."""
    ratio = torch.exp(logp - old_logp)
    pg = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange))
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_unclipped, vf_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    vf = 0.5 * torch.max(vf_unclipped, vf_clipped)
    pg_loss = (pg * mask).sum() / n_tokens
    vf_loss = (vf * mask).sum() / n_tokens
    with torch.no_grad():  # token averages with the same normalizer: they add up over ranks too
        stats = {"policy/approxkl": 0.5 * (logp - old_logp) ** 2,
                 "policy/clipfrac": ((ratio - 1).abs() > cliprange).float(),
                 "val/clipfrac": (vf_clipped > vf_unclipped).float(),
                 "val/ratio": ratio}
        stats = {k: (v * mask).sum() / n_tokens for k, v in stats.items()}
    return pg_loss, vf_loss, stats


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
    return critic(ids[:, :-1], kv_start=kv_start, all_scores=True)[:, width_p - 1:] * mask


# ----------------------------------------------------------------------------- data

def load_prompts(paths: list[str], tok, max_prompt_len: int, need_answers: bool):
    """(records, encoded prompts, skipped-reason Counter). A prompt that leaves no room
    for a response is skipped as too_long; with need_answers, one without an answer too."""
    records, prompts, skipped = [], [], Counter()
    for rec, messages in iter_jsonl(paths, prompt_messages, skipped):
        ids = encode_prompt(tok, messages)
        if len(ids) > max_prompt_len:
            skipped["too_long"] += 1
        elif need_answers and not ("answer" in rec and ("family" in rec or "answer_type" in rec)):
            skipped["no_answer"] += 1
        else:
            records.append(rec)
            prompts.append(ids)
    return records, prompts, skipped


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    return a.token_bytes == b.token_bytes and (a.eot_id, a.pad_id, a.end_id) == (b.eot_id, b.pad_id, b.end_id)


def load_frozen(ckpt: str, env, dtype, model_class=Transformer):
    """A model that is only evaluated: no dropout, no gradients, sharded like the others."""
    model, config = runtime.load_model(ckpt, model_class=model_class, dropout=0.0)
    model.requires_grad_(False)
    model.eval()
    return runtime.prepare_model(model, env, dtype), config


# ----------------------------------------------------------------------------- training

def main(argv=None) -> None:
    runtime.run_main(PPOConfig, train, argv, description=__doc__.split("\n")[0])


def train(cfg: PPOConfig, env: runtime.Env) -> None:
    if env.is_main:
        print_config(cfg, "ppo config")
    prompt_files, eval_file = task_files(cfg.prompts, "prompts.jsonl", cfg.eval_data, TASKS_DIR)

    # ---- four models: policy and critic learn; reference and reward model are frozen
    init_config = runtime.read_checkpoint_config(cfg.init)
    rm_config = runtime.read_checkpoint_config(cfg.reward_model)
    if rm_config.get("stage") != "rm":
        raise UserError(f"--reward-model {cfg.reward_model} is a {rm_config.get('stage')!r} checkpoint, "
                        "not a reward model (train one with train_rm.py)")
    norm = rm_config.get("score_norm") or {"mean": 0.0, "std": 1.0}
    tokenizer_path = os.path.join(cfg.init, "tokenizer.json")
    tok = Tokenizer.load(tokenizer_path)
    if not same_tokenizer(tok, Tokenizer.load(os.path.join(cfg.reward_model, "tokenizer.json"))):
        raise UserError(f"the reward model {cfg.reward_model} uses a different tokenizer from the policy {cfg.init}")
    policy, _ = runtime.load_model(cfg.init, dropout=0.0)
    critic_init = cfg.critic_init or cfg.reward_model
    torch.manual_seed(cfg.seed)  # a fresh value head (critic from a language model) is the same on every rank
    critic, _ = runtime.load_model(critic_init, model_class=ScalarHeadModel, dropout=0.0)
    if critic.cfg.vocab_size != policy.cfg.vocab_size:
        raise UserError(f"the critic {critic_init} has a different vocabulary from the policy {cfg.init}")
    if not cfg.critic_init:  # put the reward model's raw head on the normalized scale the rewards use
        with torch.no_grad():
            critic.score_head.weight /= norm["std"]
            critic.score_head.bias.sub_(norm["mean"]).div_(norm["std"])
    dtype = runtime.compute_dtype(cfg.dtype, env.device)
    reference, _ = load_frozen(cfg.init, env, dtype)
    reward_model, _ = load_frozen(cfg.reward_model, env, dtype, ScalarHeadModel)
    max_len = policy.cfg.max_seq_len

    # ---- prompts
    need_answers = cfg.reward in ("task", "mix")
    records, prompts, skipped = load_prompts(prompt_files, tok, max_len - cfg.max_new_tokens, need_answers)
    runtime.print0(f"ppo prompts: {len(prompts)} from {len(prompt_files)} file(s); skipped {sum(skipped.values())} "
                   f"({', '.join(f'{k} {v}' for k, v in sorted(skipped.items())) or 'none'})")
    rows = cfg.batch_size * env.world_size
    if len(prompts) < rows:
        raise UserError(f"{len(prompts)} usable prompts in {' '.join(prompt_files)}: fewer than one rollout "
                        f"batch of {rows} (lower --batch-size or --max-new-tokens)")
    eval_records = load_task_records(eval_file)

    # ---- trainers: the critic saves into OUT/critic, just before the policy saves into OUT
    runtime.seed_everything(cfg.seed, env.rank)
    state = {"epoch": 0, "index": 0, "kl_coef": cfg.kl_coef}
    critic_cfg = dataclasses.replace(cfg, out=os.path.join(cfg.out, "critic"), lr=cfg.critic_lr or cfg.lr)
    critic_trainer = runtime.Trainer(critic_cfg, env, critic, stage="critic", tokenizer_path=tokenizer_path,
                                     extra_config={"init": critic_init})
    trainer = runtime.Trainer(cfg, env, policy, stage="ppo", tokenizer_path=tokenizer_path,
                              data_state=lambda: dict(state), before_save=critic_trainer.save,
                              extra_config={"init": cfg.init, "reward_model": cfg.reward_model,
                                            "base_stage": init_config.get("stage"), "reward": cfg.reward})
    policy, critic = trainer.model, critic_trainer.model
    if cfg.resume:
        state.update(trainer.resume()["data"])
        critic_trainer.resume()
        if critic_trainer.step != trainer.step:
            raise UserError(f"--resume: the critic in {critic_cfg.out} is at step {critic_trainer.step}, "
                            f"the policy at {trainer.step}; the last save was interrupted")
    trainer.start(flops_per_token=policy.flops_per_token(max_len))

    def order(epoch: int) -> list[int]:
        return torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()

    @torch.no_grad()
    def rm_scores(ids, kv_start, last) -> torch.Tensor:
        """Normalized reward-model scores, read at each row's last response token."""
        with trainer.autocast():
            raw = reward_model(ids, kv_start=kv_start, last_index=last)
        return (raw.float() - norm["mean"]) / norm["std"]

    @torch.no_grad()
    def evaluate() -> dict | None:
        if not eval_records:
            runtime.print0(f"eval step {trainer.step}: no gradable records in {eval_file}, skipped")
            return None
        result = task_accuracy(policy, tok, eval_records, env.rank, env.world_size, cfg.eval_max_new_tokens)
        # the reward model's view of the same greedy answers: each rank scores its share in
        # the same number of forwards (a sharded forward is a collective)
        samples = result["samples"]
        per_rank = -(-len(eval_records) // env.world_size)
        total = torch.zeros(2, dtype=torch.float64, device=env.device)
        for i in range(0, per_rank, cfg.batch_size):
            chunk = samples[i:i + cfg.batch_size] or [{"prompt": eval_records[0]["prompt"], "response": ""}]
            seqs = [encode_chat(tok, [{"role": "user", "content": s["prompt"]},
                                      {"role": "assistant", "content": s["response"]}])[0] for s in chunk]
            seqs = [s[-max_len:] for s in seqs]
            ids, kv_start, _ = pack(seqs, [[]] * len(seqs), max(map(len, seqs)), 0, tok.pad_id)
            scores = rm_scores(ids.to(env.device), kv_start.to(env.device),
                               torch.full((len(seqs),), ids.shape[1] - 1, device=env.device))
            if samples[i:i + cfg.batch_size]:
                total += torch.stack([scores.double().sum(), torch.tensor(len(chunk), dtype=torch.float64,
                                                                          device=env.device)])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        result["rm_score"] = float(total[0] / total[1].clamp(min=1))
        line = (f"eval step {trainer.step}: held-out task accuracy {format_accuracy(result)}, "
                f"mean reward-model score {result['rm_score']:+.3f}")
        line += format_samples(samples, cfg.eval_samples)
        runtime.print0(line)
        trainer.log({"step": trainer.step, "eval/rm_score": result["rm_score"], **accuracy_metrics(result, "eval/")})
        trainer.pause_clock()
        return result

    first = evaluate() if trainer.step == 0 else None  # the SFT starting point
    if first:
        trainer.extra_config["eval_start"] = {"accuracy": first["task_accuracy"], "per_family": first["per_family"],
                                              "safety": first["safety"], "rm_score": first["rm_score"]}
    perm = order(state["epoch"])
    with trainer:
        while trainer.step < cfg.max_steps:
            trainer.set_lr()
            critic_trainer.set_lr()
            t0 = time.time()
            # ---- 1. rollout: this rank's share of the global batch of prompts
            if state["index"] + rows > len(perm):
                state.update(epoch=state["epoch"] + 1, index=0)
                perm = order(state["epoch"])
            batch_rows = perm[state["index"]:state["index"] + rows][env.rank * cfg.batch_size:
                                                                    (env.rank + 1) * cfg.batch_size]
            state["index"] += rows
            batch_prompts = [prompts[i] for i in batch_rows]
            # a generator per rollout, seeded by its place in the global batch: the samples
            # do not depend on how many ranks share the batch
            generators = [torch.Generator(device=env.device).manual_seed(
                cfg.seed * 1_000_003 + trainer.step * rows + env.rank * cfg.batch_size + i)
                for i in range(len(batch_prompts))]
            width_p = runtime.max_over_ranks(max(map(len, batch_prompts)), env.device)
            policy.eval()
            with trainer.autocast():
                responses = policy.generate(batch_prompts, cfg.max_new_tokens, tok.pad_id, cfg.temperature,
                                            stop_tokens=[tok.end_id], generator=generators, min_width=width_p)
            width_r = runtime.max_over_ranks(max(map(len, responses)), env.device)
            ids, kv_start, mask = (t.to(env.device) for t in pack(batch_prompts, responses, width_p, width_r, tok.pad_id))
            eos = torch.tensor([bool(r) and r[-1] == tok.end_id for r in responses], device=env.device)

            # ---- 2. scores, log-probs of policy and reference, values
            with torch.no_grad(), trainer.autocast():
                logp, entropy = response_logprobs(policy, ids, kv_start, mask, width_p, cfg.temperature, entropy=True)
                ref_logp = response_logprobs(reference, ids, kv_start, mask, width_p, cfg.temperature)
                values = response_values(critic, ids, kv_start, mask, width_p)
                rm_score = graded = None
                if cfg.reward in ("rm", "mix"):
                    rm_score = rm_scores(ids, kv_start, width_p + mask.sum(dim=1).long() - 1)
                if cfg.reward in ("task", "mix"):
                    texts = [tok.decode([t for t in r if t != tok.end_id]) for r in responses]
                    graded = torch.tensor([tasks.grade(records[i], text) for i, text in zip(batch_rows, texts)],
                                          device=env.device)
                scores = combine_scores(rm_score, graded, eos, cfg.task_weight, cfg.missing_eos_penalty)
            policy.train()
            beta = state["kl_coef"]
            rewards, kl = token_rewards(logp, ref_logp, scores, mask, beta)

            # ---- 3. every rank gets the whole batch: advantages are whitened over all of
            # it, and minibatches mix rows from every rank exactly as one process would
            gathered = [runtime.gather_rows(t) for t in (ids, kv_start, mask, logp, values, rewards, kl, scores,
                                                         entropy, eos.float())]
            ids, kv_start, mask, logp, values, rewards, kl, scores, entropy, eos_f = gathered
            advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, mask)
            t_rollout = time.time() - t0

            # ---- 4. PPO epochs over minibatches
            mb_global = cfg.minibatch_size * env.world_size
            sums, n_updates = Counter(), 0  # this rank's shares of each minibatch's averages
            for epoch in range(cfg.ppo_epochs):
                shuffle = torch.randperm(len(ids), generator=torch.Generator().manual_seed(
                    cfg.seed + 7919 * trainer.step + epoch)).to(env.device)
                for start in range(0, len(ids), mb_global):
                    mb = shuffle[start:start + mb_global]
                    n_tokens = float(mask[mb].sum().clamp(min=1))
                    mine = mb[env.rank * cfg.minibatch_size:(env.rank + 1) * cfg.minibatch_size]
                    m = mask[mine]
                    with trainer.autocast():
                        new_logp = response_logprobs(policy, ids[mine], kv_start[mine], m, width_p, cfg.temperature)
                        new_values = response_values(critic, ids[mine], kv_start[mine], m, width_p)
                        pg_loss, vf_loss, stats = ppo_losses(new_logp, logp[mine], advantages[mine], new_values,
                                                             values[mine], returns[mine], m, cfg.cliprange,
                                                             cfg.cliprange_value, n_tokens)
                    # ranks' gradients are averaged: scale so they add up to the global mean
                    trainer.backward(pg_loss * env.world_size, 0, 1)
                    critic_trainer.backward(cfg.vf_coef * vf_loss * env.world_size, 0, 1)
                    trainer.apply_gradients(bool(torch.isfinite(pg_loss)))
                    critic_trainer.apply_gradients(bool(torch.isfinite(vf_loss)))
                    for k, v in {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(), **stats}.items():
                        sums[k] += v.item()
                    n_updates += 1
            t_train = time.time() - t0 - t_rollout

            # ---- 5. metrics (TRL's names) and the KL controller
            kl_per_response = kl.sum(dim=1).mean().item()
            if cfg.target_kl:
                state["kl_coef"] = adaptive_kl_coef(beta, kl_per_response, cfg.target_kl, cfg.kl_horizon, len(ids))
            residual = (returns - values) * mask
            var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
            metrics = {
                "objective/kl": kl_per_response,
                "objective/entropy": entropy.sum(dim=1).mean().item(),
                "objective/scores": scores.mean().item(),
                "objective/rlhf_reward": (scores - beta * kl.sum(dim=1)).mean().item(),
                "objective/kl_coef": beta,
                **{k: env.world_size * runtime.all_reduce_mean(torch.tensor(v / n_updates, device=env.device)).item()
                   for k, v in sums.items()},
                "val/var_explained": 1 - (masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
                                          / var_returns.clamp(min=1e-8)).item(),
                "tokens/response_len": mask.sum(dim=1).mean().item(),
                "eos_fraction": eos_f.mean().item(),
                "time/generation": t_rollout, "time/training": t_train,
            }
            critic_trainer.step += 1
            loss = metrics["loss/policy"] + cfg.vf_coef * metrics["loss/value"]
            trainer.end_step(loss, int((ids != tok.pad_id).sum()), metrics,
                             suffix=f" | score {metrics['objective/scores']:+.3f} | kl {kl_per_response:.3f}"
                                    f" | len {metrics['tokens/response_len']:.1f}")
            result = evaluate() if trainer.due(cfg.eval_every) else None
            if result:
                trainer.extra_config["eval"] = {"accuracy": result["task_accuracy"], "per_family": result["per_family"],
                                                "safety": result["safety"], "rm_score": result["rm_score"],
                                                "kl": kl_per_response}
            trainer.maybe_save()
            if trainer.stop_requested():
                break


if __name__ == "__main__":
    main()
