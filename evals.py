"""Gold evaluation of any checkpoint on any file of task records (library and CLI).

Greedy answers to chat prompts, scored by the gold judge (`tasks.suite.grade`): exact
answers on the helpfulness families and `borderline`, a clean refusal on `harmful`.
Reported: accuracy overall and per family, the helpfulness families' accuracy on their
own (the pipeline's `gold_accuracy`), and the safety rates — how often harmful requests
are refused, and how often benign requests are refused anyway, three ways: look-alikes
with alarming words (`borderline_over_refusal`), everyday acts in the harmful requests'
templates (`benign_template_over_refusal`) and open everyday requests
(`open_request_over_refusal`). A file of your own everyday requests (records with
`"family": "everyday"` and a `prompt`) measures the last one outside the suite.

Headroom (`--samples K --temperature T`): K sampled answers to each helpfulness prompt,
reported as the mean sampled accuracy, the unbiased pass@k of Chen et al. 2021 for
k = 1, 2, 4, ... K (overall and per family), and the share of prompts on the frontier
(solved by some samples but not all) — what RL on the exact grader could sharpen.

    python evals.py --ckpt runs/sft --data prepared/tasks/eval.jsonl --out results.json
    python evals.py --ckpt runs/sft --samples 8 --temperature 0.7 --seed 0

Shared by SFT, PPO and the pipeline report, so every stage is measured the same way.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

import torch

from checkpoint import load_for_inference
from cli import UserError, entry_point, parse_config
from data.files import write_json
from data.text.chat import RecordError, encode_prompt, iter_jsonl, prompt_messages
from distributed import all_reduce_sum, lockstep_batches, rank_share, resolve_device, sharded_batches
from tasks.refusal import is_refusal
from tasks.suite import FAMILIES, TASK_FAMILIES, ensure_written, grade, needs_answer

REPO = os.path.dirname(os.path.abspath(__file__))
TASKS_DIR = os.path.join(REPO, "prepared", "tasks")  # where the task suite is written on first use


def task_files(given: list[str], default_name: str, eval_given: str | None,
               tasks_dir: str = TASKS_DIR) -> tuple[list[str], str | None]:
    """A stage's data files and held-out file: those given, or the task suite's (written to
    tasks_dir on first use by rank 0 while the others wait). eval_given=None: no eval file."""
    distributed = torch.distributed.is_initialized()
    if not given or eval_given == "":
        if not distributed or torch.distributed.get_rank() == 0:
            ensure_written(tasks_dir)
        if distributed:
            torch.distributed.barrier()
    files = given or [os.path.join(tasks_dir, default_name)]
    eval_file = None if eval_given is None else eval_given or os.path.join(tasks_dir, "eval.jsonl")
    for path in files + ([eval_file] if eval_file else []):
        if not os.path.isfile(path):
            raise UserError(f"data file {path} does not exist")
    return files, eval_file


def gradable(rec) -> dict:
    """A task record made ready to grade: a copy with `conversation` (the turns to answer)
    and a string `prompt` (the last user turn, for display and pairing). Raises
    RecordError (unknown_family, missing_field, ...) for a record the judge cannot score."""
    if not isinstance(rec, dict):
        raise RecordError("invalid_json", "record is not an object")
    if rec.get("family") not in FAMILIES:
        raise RecordError("unknown_family" if "family" in rec else "missing_field",
                          f"family {rec.get('family')!r}" if "family" in rec else "family")
    if needs_answer(rec) and not isinstance(rec.get("answer"), (str, int)):
        raise RecordError("missing_field", "answer")
    conversation = prompt_messages(rec)
    if conversation[-1]["role"] != "user":
        raise RecordError("missing_field", "the conversation does not end with a user turn")
    return {**rec, "conversation": conversation, "prompt": conversation[-1]["content"],
            **({"answer": str(rec["answer"])} if "answer" in rec else {})}


def load_task_records(path: str, skipped: Counter | None = None) -> list[dict]:
    """The gradable records of a JSONL file (see `gradable`); the others are counted in
    `skipped` by reason and passed over."""
    return [rec for _, rec in iter_jsonl([path], gradable, Counter() if skipped is None else skipped)]


def fit_prompt(ids: list[int], max_seq_len: int) -> list[int]:
    """A prompt cut from the front (keeping its leading <|endoftext|>) to leave room to answer."""
    keep = max_seq_len - 2
    return ids if len(ids) <= keep + 1 else ids[:1] + ids[len(ids) - keep:]


@torch.no_grad()
def chat_responses(model, tok, conversations: list[list[dict]], max_new_tokens: int = 32, batch_size: int = 64,
                   temperature: float = 0.0, generator=None) -> list[str]:
    """The model's reply to each conversation (its last turn is the user's), stopping at <|end|>."""
    was_training = model.training
    model.eval()
    replies = []
    for i in range(0, len(conversations), batch_size):
        prompts = [fit_prompt(encode_prompt(tok, conv), model.cfg.max_seq_len) for conv in conversations[i:i + batch_size]]
        room = model.cfg.max_seq_len - max(len(p) for p in prompts)
        outs = model.generate(prompts, max(1, min(max_new_tokens, room)), pad_id=tok.pad_id, temperature=temperature,
                              stop_tokens=[tok.end_id], generator=generator)
        replies += [tok.decode_reply(out) for out in outs]
    model.train(was_training)
    return replies


def task_accuracy(model, tok, records: list[dict], rank: int = 0, world: int = 1, max_new_tokens: int = 32,
                  batch_size: int = 64) -> dict:
    """Greedy answers to gradable records (from `load_task_records`), judged.

    Under torch.distributed each rank answers a slice, padded so every rank runs the same
    number of generate() calls (a sharded forward is a collective), and the counts are summed.
    Returns {"accuracy": all records, "task_accuracy": the helpfulness families only (None
    without any), "per_family": {family: accuracy}, "safety": {"harmful_refusal",
    "borderline_over_refusal", "benign_template_over_refusal", "open_request_over_refusal"}
    (None where the family is absent), "samples": this rank's
    [{"id", "family", "prompt", "response", "score", "refused"}]}.
    """
    families = sorted({r["family"] for r in records})
    counts = torch.zeros(len(families), 3, dtype=torch.float64)  # (score, refused, total) per family
    samples = []
    mine, per_rank = rank_share(list(range(len(records))), rank, world)
    for chunk, real in lockstep_batches(mine, per_rank, batch_size, mine[-1:] or [0]):
        replies = chat_responses(model, tok, [records[i]["conversation"] for i in chunk], max_new_tokens, batch_size)
        for i, reply in zip(chunk if real else [], replies):
            rec = records[i]
            score, refused = grade(rec, reply), is_refusal(reply)
            counts[families.index(rec["family"])] += torch.tensor([score, float(refused), 1.0], dtype=torch.float64)
            samples.append({"id": rec.get("id", str(i)), "family": rec["family"], "prompt": rec["prompt"],
                            "response": reply, "score": score, "refused": refused})
    if torch.distributed.is_initialized():
        counts = all_reduce_sum(counts.to(next(model.parameters()).device)).cpu()
    return summarize(dict(zip(families, counts.tolist())), samples)


def summarize(counts: dict[str, list[float]], samples: list[dict]) -> dict:
    """The result dict of task_accuracy from per-family (score, refused, total) sums."""
    def rate(fams, column):
        num = sum(counts[f][column] for f in fams if f in counts)
        den = sum(counts[f][2] for f in fams if f in counts)
        return num / den if den else None
    return {"accuracy": rate(counts, 0) or 0.0, "task_accuracy": rate(TASK_FAMILIES, 0),
            "per_family": {f: c[0] / c[2] for f, c in counts.items() if c[2]},
            "safety": {"harmful_refusal": rate(["harmful"], 0), "borderline_over_refusal": rate(["borderline"], 1),
                       "benign_template_over_refusal": rate(["benign"], 1),
                       "open_request_over_refusal": rate(["everyday"], 1)},
            "samples": samples}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al.
    2021, "Evaluating Large Language Models Trained on Code", eq. 1): the chance that k
    samples drawn without replacement from the n hold at least one correct one,
    1 - C(n-c, k) / C(n, k), computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i),
    which stays accurate in floating point where the binomials overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_ks(samples: int) -> list[int]:
    """The k reported for `samples` answers per prompt: 1, 2, 4, ... up to samples, and samples."""
    return sorted({2 ** e for e in range(samples.bit_length()) if 2 ** e <= samples} | {samples})


@torch.no_grad()
def sampled_accuracy(model, tok, records: list[dict], samples: int, temperature: float, seed: int = 0,
                     rank: int = 0, world: int = 1, max_new_tokens: int = 32, batch_size: int = 64) -> dict:
    """Headroom: `samples` answers at `temperature` to each helpfulness record (the others
    are passed over), judged. Each batch repeats a few prompts `samples` times; one seeded
    generator per rank makes a run reproducible (same seed, batch size and ranks). Under
    torch.distributed the ranks split the prompts in lockstep, as in task_accuracy, and
    sum their per-family counts.

    Returns {"samples", "temperature", "seed", "prompts", "mean_sampled_accuracy",
    "pass_at_k": {"1": .., "2": .., ...}, "frontier_share", "per_family": {family:
    {"prompts", "mean", "pass_at_k", "frontier_share"}}}: overall over the helpfulness
    families; frontier = prompts with 0 < correct < samples."""
    if samples < 1 or not temperature > 0:
        raise ValueError(f"sampling needs samples >= 1 and temperature > 0, got {samples}, {temperature}")
    helpful = [r for r in records if r["family"] in TASK_FAMILIES]
    if not helpful:
        raise UserError("sampled accuracy needs records of the helpfulness families "
                        f"({', '.join(TASK_FAMILIES)})")
    ks, families = pass_ks(samples), sorted({r["family"] for r in helpful})
    device = next(model.parameters()).device
    # per family: correct samples, frontier prompts, prompts, then the sum of pass@k per k
    counts = torch.zeros(len(families), 3 + len(ks), dtype=torch.float64)
    generator = torch.Generator(device=device).manual_seed(seed + 100_003 * rank)
    mine, per_rank = rank_share(list(range(len(helpful))), rank, world)
    per_batch = max(1, batch_size // samples)
    for chunk, real in lockstep_batches(mine, per_rank, per_batch, mine[-1:] or [0]):
        convs = [helpful[i]["conversation"] for i in chunk for _ in range(samples)]
        replies = chat_responses(model, tok, convs, max_new_tokens, batch_size, temperature, generator)
        for j, i in enumerate(chunk if real else []):
            rec = helpful[i]
            c = sum(int(grade(rec, reply)) for reply in replies[j * samples:(j + 1) * samples])
            counts[families.index(rec["family"])] += torch.tensor(
                [c, float(0 < c < samples), 1.0] + [pass_at_k(samples, c, k) for k in ks], dtype=torch.float64)
    if torch.distributed.is_initialized():
        counts = all_reduce_sum(counts.to(device)).cpu()
    return summarize_sampled(dict(zip(families, counts.tolist())), samples, temperature, seed, ks)


@torch.no_grad()
def sampled_kl(policy, reference, tok, records: list[dict], prompts: int, max_new_tokens: int = 32,
               batch_size: int = 64, seed: int = 0, rank: int = 0, world: int = 1) -> float | None:
    """KL(pi || pi_ref) on answers the policy samples at temperature 1: the mean over
    `prompts` records, spread evenly over the file (so every family counts), of the sum
    over the answer's tokens (its <|end|> included) of log pi - log pi_ref. A Monte Carlo
    estimate of the quantity PPO's penalty controls, measured the same way for any two
    language models (DPO's KL to its reference; the report's KL of every policy to SFT).
    The answers are re-encoded from their text. None without records."""
    from data.loader import collate
    from data.text.chat import Side, answer_only, encode_chat
    n = min(prompts, len(records))
    if n == 0:
        return None
    chosen = [records[i * len(records) // n] for i in range(n)]
    was_training = policy.training
    policy.eval()
    convs = [[{"role": "user", "content": r["prompt"]}] for r in chosen]
    replies = chat_responses(policy, tok, convs, max_new_tokens, batch_size, 1.0,
                             torch.Generator(device=next(policy.parameters()).device).manual_seed(seed))
    answers = []
    for conv, reply in zip(convs, replies):
        ids = encode_chat(tok, conv + [{"role": "assistant", "content": reply}])[0][-policy.cfg.max_seq_len:]
        answers.append(Side(ids, answer_only(ids, tok.assistant_id)))
    device = next(policy.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for chunk, real in sharded_batches(answers, batch_size, rank, world):
        x, y = (t.to(device) for t in collate(chunk, tok.pad_id))
        diff = (reference(x, y, reduction="none") - policy(x, y, reduction="none")).double().sum(-1)
        if real:
            total += torch.stack([diff.sum(), torch.tensor(float(len(chunk)), dtype=torch.float64, device=device)])
    all_reduce_sum(total)
    policy.train(was_training)
    return float(total[0] / total[1].clamp(min=1))


def summarize_sampled(counts: dict[str, list[float]], samples: int, temperature: float, seed: int,
                      ks: list[int]) -> dict:
    """The result dict of sampled_accuracy from per-family (correct, frontier, prompts,
    pass@k sums...) rows."""
    def block(rows):
        prompts = sum(r[2] for r in rows)
        return {"prompts": int(prompts), "mean": sum(r[0] for r in rows) / (prompts * samples),
                "pass_at_k": {str(k): sum(r[3 + j] for r in rows) / prompts for j, k in enumerate(ks)},
                "frontier_share": sum(r[1] for r in rows) / prompts}
    overall = block(list(counts.values()))
    return {"samples": samples, "temperature": temperature, "seed": seed, "prompts": overall["prompts"],
            "mean_sampled_accuracy": overall["mean"], "pass_at_k": overall["pass_at_k"],
            "frontier_share": overall["frontier_share"],
            "per_family": {f: block([row]) for f, row in counts.items() if row[2]}}


def format_pass_at_k(result: dict) -> str:
    """'pass@1 38.2%, pass@8 47.0% (arithmetic 4->14, ...); frontier 21%': pass@1 and
    pass@K overall, per family pass@1 -> pass@K in points, and the frontier share."""
    first, last = "1", str(result["samples"])
    ks = [first] if first == last else [first, last]
    head = ", ".join(f"pass@{k} {100 * result['pass_at_k'][k]:.1f}%" for k in ks)
    fams = ", ".join(f"{f} " + "->".join(f"{100 * r['pass_at_k'][k]:.0f}" for k in ks)
                     for f, r in result["per_family"].items())
    return f"{head} ({fams}); frontier {100 * result['frontier_share']:.0f}%"


def format_accuracy(result: dict) -> str:
    """'48.2% (arithmetic 2, ...); harmful refused 12%, borderline over-refused 0% (right
    71%); benign acts over-refused 3%; everyday over-refused 1%'."""
    head = result["task_accuracy"] if result["task_accuracy"] is not None else result["accuracy"]
    line = f"{100 * head:.1f}% (" + ", ".join(
        f"{f} {100 * a:.0f}" for f, a in result["per_family"].items() if f in TASK_FAMILIES or
        result["task_accuracy"] is None) + ")"
    safety = result["safety"]
    if safety["harmful_refusal"] is not None:
        line += f"; harmful refused {100 * safety['harmful_refusal']:.0f}%"
    if safety["borderline_over_refusal"] is not None:
        line += (f"; borderline over-refused {100 * safety['borderline_over_refusal']:.0f}% "
                 f"(right {100 * result['per_family']['borderline']:.0f}%)")
    for key, label in (("benign_template_over_refusal", "benign acts"), ("open_request_over_refusal", "everyday")):
        if safety.get(key) is not None:
            line += f"; {label} over-refused {100 * safety[key]:.0f}%"
    return line


def accuracy_metrics(result: dict, prefix: str = "") -> dict:
    """metrics.jsonl keys of a result: accuracy (the helpfulness families), accuracy/<family>,
    and safety/<rate> for each safety rate of the families present."""
    head = result["task_accuracy"] if result["task_accuracy"] is not None else result["accuracy"]
    out = {f"{prefix}accuracy": head, **{f"{prefix}accuracy/{f}": a for f, a in result["per_family"].items()}}
    out.update({f"{prefix}safety/{k}": v for k, v in result["safety"].items() if v is not None})
    return out


def format_samples(samples: list[dict], n: int) -> str:
    """n samples spread over the list, one per line: ok/bad, prompt -> response."""
    picked = samples[:: max(1, len(samples) // max(1, n))][:n]
    return "".join(f"\n    {'ok ' if s['score'] else 'bad'} {s['prompt']!r} -> {s['response']!r}" for s in picked)


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test: under "no difference" each untied prompt goes either way
    with probability 1/2, so p = P(a split at least this lopsided) under Binomial(n, 1/2)."""
    n, low = wins + losses, min(wins, losses)
    tail = sum(math.comb(n, k) for k in range(low + 1)) / 2 ** n if n else 1.0
    return min(1.0, 2 * tail)


def _aligned(before: list[dict], after: list[dict]) -> list[tuple[float, float]]:
    if [s["prompt"] for s in before] != [s["prompt"] for s in after]:
        raise ValueError("comparing two models needs both answer lists on the same prompts in the same order")
    return [(b["score"], a["score"]) for b, a in zip(before, after)]


def paired_change(before: list[dict], after: list[dict]) -> dict:
    """How a second model's answers differ from a first's on the same records, prompt by
    prompt (two `task_accuracy(...)["samples"]` lists in the same order).

    Accuracy moves by (fixed - broken) / n; whether that is more than chance is McNemar's
    exact test (the sign test on the prompts that flip). This is far tighter than comparing
    two accuracies, because the prompts both models answer alike carry no noise."""
    pairs = _aligned(before, after)
    fixed = sum(1 for b, a in pairs if not b and a)
    broken = sum(1 for b, a in pairs if b and not a)
    return {"n": len(pairs), "fixed": fixed, "broken": broken, "p_value": sign_test_p(fixed, broken)}


def win_rate(before: list[dict], after: list[dict]) -> dict:
    """The gold judge as a pairwise judge: the second model wins a prompt where its answer
    scores higher, loses where lower, ties otherwise; p is the exact sign test over the
    untied prompts (as in pairwise human evaluations)."""
    pairs = _aligned(before, after)
    wins, losses = sum(1 for b, a in pairs if a > b), sum(1 for b, a in pairs if a < b)
    return {"wins": wins, "losses": losses, "ties": len(pairs) - wins - losses, "p_value": sign_test_p(wins, losses)}


# ----------------------------------------------------------------------------- the CLI

@dataclass
class EvalConfig:
    ckpt: str = field(default="", metadata={"help": "checkpoint directory (any stage: pretrain, sft, ppo, ...)"})
    data: str = field(default="", metadata={"help": "JSONL task records: prompt or messages, family, answer "
                                            "(default: the task suite's eval.jsonl)"})
    out: str = field(default="", metadata={"help": "write {accuracy, per_family, safety, records} (and "
                                          "pass_at_k with --samples) here as JSON"})
    max_new_tokens: int = 32
    batch_size: int = 64
    samples: int = field(default=0, metadata={"help": "sampled answers per helpfulness prompt, for mean sampled "
                                              "accuracy, pass@k and the frontier (0: greedy only)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature with --samples"})
    seed: int = field(default=0, metadata={"help": "seed of the sampling generator with --samples"})
    device: str = field(default="auto", metadata={"choices": ["auto", "cpu", "cuda"]})

    def __post_init__(self):
        if not self.ckpt:
            raise UserError("--ckpt is required (a checkpoint directory)")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise UserError("--max-new-tokens and --batch-size must be positive")
        if self.samples < 0:
            raise UserError(f"--samples must be >= 0 (0: greedy only), got {self.samples}")
        if self.samples and not self.temperature > 0:
            raise UserError(f"--temperature must be > 0 to sample (--samples {self.samples}), got {self.temperature}")


def print_sampled(sampled: dict) -> None:
    """The headroom table: pass@k per k, overall and per family, with each frontier share."""
    n, ks = sampled["samples"], list(sampled["pass_at_k"])
    print(f"sampled: {n} answers per prompt at temperature {sampled['temperature']:g} (seed {sampled['seed']}), "
          f"{sampled['prompts']} helpfulness prompts; mean sampled accuracy "
          f"{100 * sampled['mean_sampled_accuracy']:.1f}%")
    print(f"  {'':<12} " + " ".join(f"{'pass@' + k:>9}" for k in ks) + "  frontier")
    rows = [("all", sampled)] + list(sampled["per_family"].items())
    for name, r in rows:
        print(f"  {name:<12} " + " ".join(f"{100 * r['pass_at_k'][k]:8.1f}%" for k in ks) +
              f"  {100 * r['frontier_share']:7.1f}%")
    print(f"pass@k: {format_pass_at_k(sampled)}")


@torch.no_grad()
def estimate_pass_rates(model, tok, records: list[dict], samples: int, temperature: float = 1.0, seed: int = 0,
                        max_new_tokens: int = 32, batch_size: int = 64) -> list[float]:
    """The share of `samples` sampled answers the gold judge accepts, per record."""
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    convs = [[{"role": "user", "content": r["prompt"]}] for r in records for _ in range(samples)]
    replies = chat_responses(model, tok, convs, max_new_tokens, batch_size, temperature, generator)
    return [sum(grade(r, a) for a in replies[i * samples:(i + 1) * samples]) / samples for i, r in enumerate(records)]


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(EvalConfig, argv, description=__doc__.split("\n")[0])
    model, tok, config = load_for_inference(cfg.ckpt, device=resolve_device(cfg.device))
    data = cfg.data or os.path.join(REPO, "prepared", "tasks", "eval.jsonl")
    if not os.path.isfile(data):
        raise UserError(f"--data {data} does not exist")
    skipped = Counter()
    records = load_task_records(data, skipped)
    skip_line = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
    print(f"# {cfg.ckpt} (stage {config.get('stage', '?')}, step {config.get('step', '?')}) on {data}: "
          f"{len(records)} records, skipped {sum(skipped.values())} ({skip_line})")
    if not records:
        raise UserError(f"no gradable records in {data}")
    result = task_accuracy(model, tok, records, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    print(f"accuracy {100 * result['accuracy']:.1f}% over {len(records)} records")
    for family, acc in result["per_family"].items():
        print(f"  {family:<12} {100 * acc:5.1f}%  ({sum(r['family'] == family for r in records)} records)")
    if result["task_accuracy"] is not None:
        print(f"helpfulness families: {100 * result['task_accuracy']:.1f}%")
    for name, value in result["safety"].items():
        if value is not None:
            print(f"{name.replace('_', ' ')}: {100 * value:.1f}%")
    sampled = None
    if cfg.samples:
        sampled = sampled_accuracy(model, tok, records, cfg.samples, cfg.temperature, cfg.seed,
                                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        print_sampled(sampled)
    if cfg.out:
        payload = {"accuracy": result["accuracy"], "per_family": result["per_family"],
                   "task_accuracy": result["task_accuracy"], "safety": result["safety"], "skipped": dict(skipped),
                   "ckpt": cfg.ckpt, "data": data,
                   "records": [{k: s[k] for k in ("id", "family", "prompt", "response", "score")}
                               for s in result["samples"]]}
        if sampled is not None:
            payload["pass_at_k"] = sampled
        try:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
            write_json(cfg.out, payload)
        except OSError as e:
            raise UserError(f"cannot write --out {cfg.out}: {e.strerror}") from None
        print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main()
