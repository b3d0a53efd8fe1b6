"""DPO (train_dpo.py): the loss against hand-computed values, answer tokens only, learning
on a small suite, exact resume, torchrun equal to one process, and clear errors."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from checkpoint import load_model
import train_dpo
from tasks import suite as tasks
from data.text.chat import encode_chat
from data.text.tokenizer import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--device", "cpu", "--dtype", "float32", "--log-every", "1", "--warmup-steps", "1",
        "--eval-max-new-tokens", "4", "--kl-prompts", "4"]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    tasks.write(str(out), sft_per_family=2, prefs_per_family=12, prompts_per_family=2, eval_per_family=2,
                safety_sft_per_family=2, safety_prefs_per_family=12, harmful_prompts=2, borderline_prompts=2,
                benign_prompts=2, everyday_prompts=2, minimal_pairs=4, refusal_pairs_per_family=0,
                degenerate_pairs_per_family=0)
    return out


def rows(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run(args):
    train_dpo.main([str(a) for a in args])


def test_the_loss_by_hand():
    pc, pr, rc, rr = (torch.tensor([x], dtype=torch.float64) for x in (-1.0, -2.0, -1.5, -1.5))
    # h = 0.5 * (0.5) - 0.5 * (-0.5) = 0.5
    losses, chosen, rejected = train_dpo.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-12)
    assert (chosen.item(), rejected.item()) == pytest.approx((0.25, -0.25))
    smoothed, _, _ = train_dpo.dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.5)) + 0.1 * math.log1p(math.exp(0.5)))
    # IPO: (h / beta - 1 / (2 beta))^2 with beta 0.25, h = 0.25 -> (1 - 2)^2
    ipo, _, _ = train_dpo.dpo_loss(pc, pr, rc, rr, beta=0.25, loss="ipo")
    assert ipo.item() == pytest.approx(1.0)
    # a pair the policy already separates by more than 1/(2 beta) is pushed back, not further
    far, _, _ = train_dpo.dpo_loss(pc + 5, pr, rc, rr, beta=0.25, loss="ipo")
    assert far.item() > 0


def test_only_the_final_answer_counts(tiny_pretrained):
    """The sequence log-prob equals a float64 sum over the last answer's tokens (and its
    <|end|>) of plain log-softmax: prompt tokens, earlier turns and padding add nothing, so
    they get no gradient."""
    tok = Tokenizer.load(os.path.join(tiny_pretrained, "tokenizer.json"))
    model, _ = load_model(tiny_pretrained, dropout=0.0)
    convs = [[{"role": "user", "content": "Reverse 'cat'."}, {"role": "assistant", "content": "tac"},
              {"role": "user", "content": "And 'dog'?"}, {"role": "assistant", "content": "god"}],
             [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hello there, friend"}]]
    sides = []
    for conv in convs:
        ids, _ = encode_chat(tok, conv)
        sides.append(train_dpo.Side(ids, train_dpo.answer_only(ids, tok.assistant_id)))
    answer_len = [len(tok.encode(c[-1]["content"])) + 1 for c in convs]
    assert [sum(s.mask) for s in sides] == answer_len
    got = train_dpo.sequence_logprobs(model, sides, tok.pad_id, "cpu").double()
    for side, value in zip(sides, got):
        x = torch.tensor([side.ids[:-1]])
        logp = model(x).double().log_softmax(-1)[0]
        want = sum(logp[t - 1, side.ids[t]] for t in range(1, len(side.ids)) if side.mask[t])
        assert value.item() == pytest.approx(want.item(), abs=1e-4)
    # the gradient reaches the answer's positions only
    x = torch.tensor([sides[1].ids[:-1]])
    logits = model(x).double()
    logits.retain_grad()
    logp = logits.log_softmax(-1)
    answer = torch.tensor(sides[1].mask[1:], dtype=torch.bool)
    total = logp[0, torch.arange(len(answer)), torch.tensor(sides[1].ids[1:])][answer].sum()
    total.backward()
    assert logits.grad[0, ~answer].abs().max().item() == 0.0 and logits.grad[0, answer].abs().max().item() > 0


def test_sft_coef_adds_the_chosen_answers_mean_token_nll(tiny_pretrained):
    tok = Tokenizer.load(os.path.join(tiny_pretrained, "tokenizer.json"))
    model, _ = load_model(tiny_pretrained, dropout=0.0)
    sides = []
    for answer in ("Sure, here it is.", "No."):
        ids, _ = encode_chat(tok, [{"role": "user", "content": "Help me."}, {"role": "assistant", "content": answer}])
        sides.append(train_dpo.Side(ids, train_dpo.answer_only(ids, tok.assistant_id)))
    pair, ref = [(sides[0], sides[1], "x", [])], torch.tensor([[-3.0, -2.0]], dtype=torch.float64)
    plain = train_dpo.DPOConfig(init=tiny_pretrained, beta=0.2, sft_coef=0.0)
    rpo = train_dpo.DPOConfig(init=tiny_pretrained, beta=0.2, sft_coef=0.5)
    base, _, _ = train_dpo.pair_batch_loss(model, pair, ref, plain, tok.pad_id, "cpu")
    added, _, _ = train_dpo.pair_batch_loss(model, pair, ref, rpo, tok.pad_id, "cpu")
    chosen = train_dpo.sequence_logprobs(model, [sides[0]], tok.pad_id, "cpu", average=True)
    assert (added - base).item() == pytest.approx(-0.5 * chosen.item(), rel=1e-5)


def test_every_pair_format_loads_with_only_the_final_answer_counted(tiny_pretrained, tmp_path):
    """serve.py's feedback export (round 2's pairs), the suite's strings, message lists and
    Anthropic-HH conversations: the mask covers the final answer and its <|end|>."""
    tok = Tokenizer.load(os.path.join(tiny_pretrained, "tokenizer.json"))
    records = [
        {"prompt": [{"role": "user", "content": "Say 'hi' 2 times."}], "chosen": "hi hi", "rejected": "hi",
         "kind": "feedback_pairwise", "source_ids": ["chatcmpl-a", "chatcmpl-b"]},
        {"prompt": "Reverse 'dog'.", "chosen": "god", "rejected": "I can't help with that.", "kind": "task_refusal"},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there.", "rejected": "\n\nHuman: Hi\n\nAssistant: No."},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = train_dpo.load_dpo_pairs([str(path)], tok, 96)
    assert [p[2] for p in pairs] == ["feedback_pairwise", "task_refusal", "all", "all"]
    answers = [("hi hi", "hi"), ("god", "I can't help with that."), ("Hello!", "Go away."), ("Hello there.", "No.")]
    for (chosen, rejected, _, prompt), texts in zip(pairs, answers):
        for side, text in zip((chosen, rejected), texts):
            answer = [t for t, m in zip(side.ids, side.mask) if m]
            assert answer == tok.encode(text) + [tok.end_id]
        assert prompt[-1]["role"] == "user"


def test_short_dpo_learns_the_pairs(tiny_pretrained, suite, tmp_path):
    out = tmp_path / "dpo"
    run(["--init", tiny_pretrained, "--data", suite / "prefs.jsonl", "--eval-data", suite / "eval.jsonl",
         "--out", out, "--max-steps", 30, "--eval-every", 30, "--batch-size", 8, "--lr", 2e-3, "--sft-coef", 0,
         *FAST])
    evals = {r["step"]: r for r in rows(out) if "val_loss" in r}
    assert set(evals) == {0, 30}
    assert evals[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 0
    assert evals[30]["val_loss"] < evals[0]["val_loss"] and evals[30]["val_reward_accuracy"] > 0.6
    assert evals[0]["kl"] == pytest.approx(0.0, abs=1e-4) and evals[30]["kl"] > evals[0]["kl"]
    assert "accuracy" in evals[30] and "safety/harmful_refusal" in evals[30]
    train = [r for r in rows(out) if "reward_accuracy" in r]
    assert len(train) == 30 and all("reward_margin" in r for r in train)
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "dpo" and config["init"] == tiny_pretrained
    load_model(str(out))  # loads as a language model, like SFT and PPO checkpoints


def test_a_separate_reference_iterative_dpo(tiny_pretrained, suite, tmp_path, capsys):
    """--ref: round 2 goes on from round 1's policy and keeps the first model as the
    reference, so its start is where round 1 ended: the same held-out pair numbers."""
    common = ["--data", suite / "prefs.jsonl", "--eval-data", suite / "eval.jsonl", "--batch-size", 8, "--lr", 2e-3,
              "--sft-coef", 0, *FAST]
    run(["--init", tiny_pretrained, "--out", tmp_path / "round1", "--max-steps", 10, "--eval-every", 10, *common])
    run(["--init", tmp_path / "round1", "--ref", tiny_pretrained, "--out", tmp_path / "round2", "--max-steps", 2,
         "--eval-every", 2, *common])
    end = [r for r in rows(tmp_path / "round1") if "val_loss" in r][-1]
    start = [r for r in rows(tmp_path / "round2") if "val_loss" in r][0]
    assert start["step"] == 0 and end["step"] == 10 and end["val_loss"] < math.log(2) - 0.01
    for key in ("val_loss", "val_reward_accuracy", "val_reward_margin"):
        assert start[key] == pytest.approx(end[key], abs=1e-5)
    assert abs(start["kl"]) > 1e-3  # to the reference (a policy against itself gives 0 at step 0: see above)
    config = json.loads((tmp_path / "round2" / "config.json").read_text())
    assert config["init"] == str(tmp_path / "round1") and config["ref"] == tiny_pretrained
    other = tmp_path / "other-tokenizer"  # a reference with another vocabulary does not compare
    other.mkdir()
    for name in os.listdir(tiny_pretrained):
        if name != "tokenizer.json" and os.path.isfile(os.path.join(tiny_pretrained, name)):
            os.link(os.path.join(tiny_pretrained, name), other / name)
    vocab = json.loads(open(os.path.join(tiny_pretrained, "tokenizer.json")).read())
    (other / "tokenizer.json").write_text(json.dumps({**vocab, "merges": vocab["merges"][:-1]}))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(["--init", tmp_path / "round1", "--ref", other, "--out", tmp_path / "bad", "--max-steps", 1, *common])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another tokenizer" in err[0], err


def test_dpo_resume_is_exact(tiny_pretrained, suite, tmp_path):
    common = ["--init", tiny_pretrained, "--data", suite / "prefs.jsonl", "--eval-data", suite / "eval.jsonl",
              "--eval-every", 100, "--batch-size", 4, "--lr", 1e-3, "--save-every", 3, *FAST]
    run([*common, "--out", tmp_path / "full", "--max-steps", 6])
    run([*common, "--out", tmp_path / "part", "--max-steps", 3])
    run([*common, "--out", tmp_path / "part", "--max-steps", 6, "--resume"])
    loss = lambda out: {r["step"]: r["loss"] for r in rows(out) if "loss" in r}  # noqa: E731
    a, b = loss(tmp_path / "full"), loss(tmp_path / "part")
    assert sorted(b) == list(range(1, 7))
    assert [b[s] for s in range(1, 7)] == pytest.approx([a[s] for s in range(1, 7)], abs=1e-6)


def test_dpo_under_torchrun_matches_one_process(tiny_pretrained, suite, tmp_path):
    common = ["--init", tiny_pretrained, "--data", suite / "prefs.jsonl", "--eval-data", suite / "eval.jsonl",
              "--max-steps", 3, "--eval-every", 3, "--lr", 1e-3, *FAST]
    run([*common, "--out", tmp_path / "one", "--batch-size", 8])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_dpo.py", *map(str, common), "--out", str(tmp_path / "two"), "--batch-size", "4"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    for key in ("loss", "reward_accuracy"):
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], abs=1e-5)
    for key in ("val_loss", "val_reward_accuracy", "accuracy"):
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], abs=1e-5)


def test_bad_input_gets_one_clear_line(tiny_pretrained, suite, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    equal = tmp_path / "equal.jsonl"
    equal.write_text(json.dumps({"id": "p7", "prompt": "Hi", "chosen": "Hello!", "rejected": "Hello!"}) + "\n")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "Hi", "chosen": "word " * 400, "rejected": "no"}) + "\n")
    rm_dir = tmp_path / "rm"
    rm_dir.mkdir()
    cfg = json.loads(open(os.path.join(tiny_pretrained, "config.json")).read())
    (rm_dir / "config.json").write_text(json.dumps({**cfg, "stage": "rm"}))
    cases = {
        "no usable preference pairs": ["--data", empty],
        "p7": ["--data", equal],
        "does not fit": ["--data", long],
        "is a reward model": ["--data", suite / "prefs.jsonl", "--init", rm_dir],
        "--beta": ["--data", suite / "prefs.jsonl", "--beta", "0"],
        "label-smoothing": ["--data", suite / "prefs.jsonl", "--label-smoothing", "0.5"],
    }
    for expected, args in cases.items():
        capsys.readouterr()
        out = tmp_path / f"out-{len(expected)}"
        with pytest.raises(SystemExit) as e:
            run(["--init", tiny_pretrained, "--eval-data", suite / "eval.jsonl", *args, "--out", out,
                 "--max-steps", 1, *FAST])
        assert e.value.code not in (0, None)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], (expected, err)
        assert not os.path.exists(out / "model.safetensors")  # nothing half-written
