"""lm-evaluation-harness against serve.py: a small multiple-choice task scored by
`lm_eval --model local-completions` through the server's /v1/completions (echo, logprobs,
token-id prompts, lists of prompts) and lm-eval's remote tokenizer (/tokenize), next to the
same task scored directly with the model (the sum of each choice's token log-probs given
the context, argmax). The two accuracies must be equal.

    python -m bench.lm_eval_check                         # pretrains a tiny model on prepared/shakespeare
    python -m bench.lm_eval_check --ckpt runs/pretrain --docs 200

The task (a cloze, `shakespeare_cloze`): a passage of --context-words words from the data's
validation split, and four continuations of --choice-words words: the true one and three
taken from elsewhere. lm-eval is a check-only dependency: pip install "lm-eval[api]".
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from serving.launch import ServeProcess
from cli import UserError, entry_point, parse_config, print_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "shakespeare_cloze"


@dataclass
class CheckConfig:
    ckpt: str = field(default="", metadata={"help": "checkpoint to serve (empty: pretrain a tiny one on --data)"})
    data: str = field(default=os.path.join(REPO, "prepared", "shakespeare"),
                      metadata={"help": "prepared data (data/prepare.py): the task's text, and the tiny model's"})
    pretrain_steps: int = field(default=300, metadata={"help": "steps of the tiny model (without --ckpt)"})
    docs: int = field(default=100, metadata={"help": "questions in the task"})
    context_words: int = 24
    choice_words: int = 4
    batch_size: int = field(default=8, metadata={"help": "lm-eval --batch_size: prompts per request"})
    seed: int = 0
    work_dir: str = field(default="", metadata={"help": "where the task, logs and results go (empty: a temp dir)"})

    def __post_init__(self):
        if self.docs < 1 or self.context_words < 1 or self.choice_words < 1 or self.batch_size < 1:
            raise UserError("--docs, --context-words, --choice-words and --batch-size must be positive")


def make_task(cfg: CheckConfig, tok, out: str) -> list[dict]:
    """The cloze documents (written as JSONL) and the lm-eval task YAML, under `out`."""
    import numpy as np
    with open(os.path.join(cfg.data, "meta.json")) as f:
        meta = json.load(f)
    val = np.fromfile(os.path.join(cfg.data, meta["splits"]["val"][0]), dtype=meta["dtype"])[:200_000]
    words = tok.decode([int(t) for t in val if t < len(tok.token_bytes)]).split()
    need = cfg.context_words + cfg.choice_words
    if len(words) < 4 * need:
        raise UserError(f"{cfg.data}'s validation split is too short for the task")
    rng = random.Random(cfg.seed)
    docs = []
    for _ in range(cfg.docs):
        i = rng.randrange(len(words) - need)
        context = " ".join(words[i:i + cfg.context_words])
        true = " ".join(words[i + cfg.context_words:i + need])
        others = [" ".join(words[j:j + cfg.choice_words]) for j in rng.sample(range(len(words) - need), 3)]
        gold = rng.randrange(4)
        choices = others[:gold] + [true] + others[gold:]
        docs.append({"context": context, "choices": choices, "gold": gold})
    path = os.path.join(out, "cloze.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
    with open(os.path.join(out, f"{TASK}.yaml"), "w") as f:
        f.write(f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
                "test_split: test\noutput_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\n"
                "doc_to_target: gold\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
                "    higher_is_better: true\n")
    return docs


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into context and continuation ids (TemplateAPI._encode_pair)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def direct_scores(model, tok, docs: list[dict]) -> list[list[float]]:
    """Each choice's log-likelihood as lm-eval computes it (" " + choice after the context,
    the same ids), with the model in this process: per question, per choice."""
    import torch
    out = []
    for d in docs:
        scores = []
        for choice in d["choices"]:
            ctx, cont = encode_pair(tok, d["context"], " " + choice)
            ids = (ctx + cont)[-model.cfg.max_seq_len:]
            with torch.no_grad():
                lp = model(torch.tensor([ids])).float().log_softmax(-1)[0]
            n = len(ids)
            scores.append(sum(float(lp[p - 1, ids[p]]) for p in range(n - len(cont), n)))
        out.append(scores)
    return out


def accuracy(scores: list[list[float]], docs: list[dict]) -> float:
    """The argmax choice is the gold one (ties: the first, as lm-eval's acc)."""
    return sum(max(range(len(s)), key=s.__getitem__) == d["gold"] for s, d in zip(scores, docs)) / len(docs)


def pretrain(cfg: CheckConfig, out: str) -> str:
    ckpt = os.path.join(out, "tiny")
    args = [sys.executable, os.path.join(REPO, "train_pretrain.py"), "--data", cfg.data, "--out", ckpt,
            "--max-steps", str(cfg.pretrain_steps), "--n-layer", "2", "--d-model", "64", "--n-head", "4",
            "--n-kv-head", "2", "--seq-len", "128", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "10",
            "--eval-every", str(10 * cfg.pretrain_steps), "--device", "cpu", "--dtype", "float32"]
    print(f"pretraining a tiny model for {cfg.pretrain_steps} steps -> {ckpt}", flush=True)
    done = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise UserError(f"train_pretrain.py failed:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    return ckpt


def run_lm_eval(cfg: CheckConfig, url: str, model_id: str, context: int, eot: int,
                out: str) -> tuple[float, dict, list]:
    """lm-eval's accuracy on the task through the server, its log-likelihoods ({doc_id:
    [per choice]}, from --log_samples) and the command that ran."""
    model_args = (f"base_url={url}/v1/completions,model={model_id},tokenizer_backend=remote,"
                  f"max_length={context},custom_prefix_token_id={eot},max_retries=1")
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
           "--tasks", TASK, "--include_path", out, "--batch_size", str(cfg.batch_size),
           "--output_path", os.path.join(out, "results"), "--log_samples"]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    with open(os.path.join(out, "lm_eval.log"), "w") as f:
        f.write(done.stdout + done.stderr)
    found = sorted(glob.glob(os.path.join(out, "results", "**", "results_*.json"), recursive=True))
    if done.returncode or not found:
        raise UserError(f"lm_eval failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    with open(found[-1]) as f:
        acc = json.load(f)["results"][TASK]["acc,none"]
    scores = {}
    for path in glob.glob(os.path.join(os.path.dirname(found[-1]), f"samples_{TASK}_*.jsonl")):
        with open(path) as f:
            for line in f:
                sample = json.loads(line)
                scores[sample["doc_id"]] = [float(r[0]) for r in sample["filtered_resps"]]
    return acc, scores, cmd


@entry_point
def main(argv=None) -> None:
    cfg = parse_config(CheckConfig, argv, description=" ".join(__doc__.split("\n\n")[0].split()))
    print_config(cfg, "lm-eval check config")
    if importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("httpx") is None:
        raise UserError('bench.lm_eval_check needs lm-eval and httpx: pip install "lm-eval[api]" httpx')
    import httpx
    from checkpoint import load_model
    from data.text.tokenizer import Tokenizer
    out = cfg.work_dir or tempfile.mkdtemp(prefix="lm_eval_check_")
    os.makedirs(out, exist_ok=True)
    if not os.path.exists(os.path.join(cfg.data, "meta.json")):
        raise UserError(f"no prepared data at {cfg.data} (python -m data.prepare ...)")
    ckpt = cfg.ckpt or pretrain(cfg, out)
    model, _ = load_model(ckpt)
    model.eval()
    tok = Tokenizer.load(os.path.join(ckpt, "tokenizer.json"))
    docs = make_task(cfg, tok, out)
    server = ServeProcess(["--ckpt", ckpt, "--log-dir", os.path.join(out, "serve_logs"), "--no-request-log",
                           "--rate-limit-rpm", "0", "--rate-limit-tpm", "0", "--no-moderation", "--device", "cpu"],
                          os.path.join(out, "serve.log"))
    url = server.url
    try:
        model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        started = time.perf_counter()
        served, served_scores, cmd = run_lm_eval(cfg, url, model_id, model.cfg.max_seq_len, tok.eot_id, out)
        seconds = time.perf_counter() - started
    finally:
        server.stop()
    scores = direct_scores(model, tok, docs)
    direct = accuracy(scores, docs)
    if sorted(served_scores) != list(range(len(docs))):
        raise UserError("lm-eval's samples do not cover every question")
    diff = max(abs(a - b) for i, s in enumerate(scores) for a, b in zip(s, served_scores[i]))
    print("lm-eval command:", " ".join(cmd[2:]).replace(url, "http://127.0.0.1:PORT").replace(out, "WORK"))
    print(f"{TASK}: {len(docs)} questions, 4 choices, model {model_id} ({ckpt}); chance 0.25")
    print(f"  lm-eval through serve.py: acc {served:.4f}  ({seconds:.1f} s)")
    print(f"  direct (model in-process): acc {direct:.4f}")
    print(f"  max |log-likelihood difference| over {4 * len(docs)} choices: {diff:.2e}")
    print(f"  {'equal' if abs(served - direct) < 1e-9 else 'DIFFERENT'}; work dir {out}")
    if abs(served - direct) >= 1e-9 or diff > 1e-3:
        raise UserError("lm-eval through the server and the direct scoring disagree")


if __name__ == "__main__":
    main()
