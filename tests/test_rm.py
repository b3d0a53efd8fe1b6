"""Stage 3a: the reward model reads its score at the right token whatever the padding,
batching changes nothing, the loss is Bradley-Terry, HH conversations split at their
divergence, bad pairs are counted, and scores are normalized on the reference set."""
from __future__ import annotations

import json
import math

import pytest
import torch

import checkpoint
import train_rm
from tasks.prefs import load_pairs, parse_hh_text, split_at_divergence
from data.text.tokenizer import Tokenizer
from model import ModelConfig, ScalarHeadModel


@pytest.fixture(scope="module")
def tok():
    text = "What is two plus three? It is five. Reverse the word apple. elppa. Hello there, how are you? " * 20
    return Tokenizer.train([text], vocab_size=320)


@pytest.fixture(scope="module")
def rm(tok):
    torch.manual_seed(0)
    return ScalarHeadModel(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=1, d_model=32,
                                       max_seq_len=64, init_std=0.2)).eval()


def test_score_is_read_at_the_last_token_whatever_the_padding(tok, rm):
    seqs = [[tok.eot_id, tok.user_id, 5, 6, 7, tok.end_id, tok.assistant_id, 9, tok.end_id],
            [tok.eot_id, tok.user_id, 8, tok.end_id, tok.assistant_id, 10, 11, 12, 13, tok.end_id],
            [tok.eot_id, tok.user_id, 4, tok.end_id, tok.assistant_id, 3, tok.end_id]]
    alone = torch.stack([rm.score(torch.tensor([s]), torch.tensor([len(s) - 1]))[0] for s in seqs])
    ids, last = checkpoint.right_padded(seqs, tok.pad_id)
    right = rm.score(ids, last)
    width = max(map(len, seqs))
    left = torch.full((3, width), tok.pad_id)
    for i, s in enumerate(seqs):
        left[i, width - len(s):] = torch.tensor(s)
    pads = torch.tensor([width - len(s) for s in seqs])
    left_scores = rm.score(left, torch.full((3,), width - 1), pads)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(left_scores, alone, atol=1e-5, rtol=0)
    # reading at the wrong token (the pad after a short row) gives a different number
    assert not torch.allclose(rm.score(ids, torch.full((3,), width - 1)), alone, atol=1e-3)


def test_scorer_api_left_and_right_padding_and_normalization(tok, rm, tmp_path):
    import checkpoint
    from distributed import Env
    ckpt = tmp_path / "rm"
    ckpt.mkdir()
    tok.save(str(ckpt / "tokenizer.json"))
    env = Env(0, 0, 1, torch.device("cpu"))
    checkpoint.save_checkpoint(str(ckpt), rm, None, env, stage="rm", step=1, train_config={}, trainer_state={},
                            tokenizer_path=str(ckpt / "tokenizer.json"),
                            extra_config={"score_norm": {"mean": 0.5, "std": 2.0}})
    scorer = checkpoint.RewardScorer.load(str(ckpt))
    prompts, responses = ["What is two plus three?", "Reverse the word apple."], ["It is five.", "elppa"]
    raw = scorer.score(prompts, responses, normalize=False)
    normalized = scorer.score(prompts, responses)
    torch.testing.assert_close(normalized, (raw - 0.5) / 2.0)
    single = torch.cat([scorer.score([p], [r], normalize=False) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(raw, single, atol=1e-5, rtol=0)  # batched == alone
    from data.text.chat import encode_chat
    seqs = [encode_chat(tok, [{"role": "user", "content": p}, {"role": "assistant", "content": r}])[0]
            for p, r in zip(prompts, responses)]
    width = max(map(len, seqs))
    left = torch.tensor([[tok.pad_id] * (width - len(s)) + s for s in seqs])
    pads = torch.tensor([width - len(s) for s in seqs])
    left_raw = scorer.score_ids(left, torch.full((len(seqs),), width - 1), kv_start=pads, normalize=False)
    torch.testing.assert_close(left_raw, raw, atol=1e-5, rtol=0)


def test_bradley_terry_loss_and_accuracy_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([1.0, 1.5, -3.0])
    margin = torch.tensor([0.0, 0.0, 1.0])
    expected = -(math.log(1 / (1 + math.exp(-1.0))) + math.log(1 / (1 + math.exp(1.0)))
                 + math.log(1 / (1 + math.exp(-1.0)))) / 3
    assert train_rm.bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(expected, abs=1e-6)
    centered = train_rm.bradley_terry_loss(chosen, rejected, margin, center_coef=0.01).item()
    assert centered == pytest.approx(expected + 0.01 * (9 + 4 + 16) / 3, abs=1e-6)
    assert (chosen > rejected).float().mean().item() == pytest.approx(2 / 3)


def test_hh_conversations_split_at_the_divergence():
    chosen = parse_hh_text("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and you?\n\nAssistant: fine, thanks")
    rejected = parse_hh_text("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and you?\n\nAssistant: go away")
    prompt, c, r = split_at_divergence(chosen, rejected)
    assert [m["content"] for m in prompt] == ["hi", "hello", "and you?"]
    assert c == [{"role": "assistant", "content": "fine, thanks"}]
    assert r == [{"role": "assistant", "content": "go away"}]


def test_pairs_load_every_format_and_count_bad_records(tok, tmp_path):
    path = tmp_path / "prefs.jsonl"
    lines = [
        {"prompt": "What is two plus three?", "chosen": "five", "rejected": "six", "kind": "near_miss"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go"}], "margin": 1.5},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: no"},
        {"prompt": "x", "chosen": "y"},  # missing rejected
        {"prompt": "x", "chosen": " ", "rejected": "z"},  # empty
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"},  # no divergence
        {"prompt": "x", "chosen": "y", "rejected": "z", "margin": "big"},  # margin not a number
    ]
    with open(path, "wb") as f:
        for rec in lines:
            f.write((json.dumps(rec) + "\n").encode())
        f.write(b"{broken\n")
        f.write(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    pairs, skipped = load_pairs([str(path)], tok, 64)
    assert len(pairs) == 3
    assert dict(skipped) == {"missing_field": 2, "empty_content": 1, "no_divergence": 1, "invalid_json": 1,
                             "invalid_utf8": 1}
    assert pairs[1].margin == 1.5 and pairs[0].kind == "near_miss"
    for p in pairs:  # both sides end where the score is read
        assert p.chosen[-1] == tok.end_id and p.rejected[-1] == tok.end_id


def test_short_rm_training_learns_and_normalizes(tiny_pretrained, tmp_path, capsys):
    from tasks import suite as tasks
    data = tmp_path / "tasks"
    tasks.write(str(data), sft_per_family=2, prefs_per_family=30, prompts_per_family=2, eval_per_family=2,
                safety_sft_per_family=2, safety_prefs_per_family=30, harmful_prompts=2, borderline_prompts=2,
                refusal_pairs_per_family=0, degenerate_pairs_per_family=0, minimal_pairs=0)
    out = tmp_path / "rm"
    train_rm.main(["--init", tiny_pretrained, "--data", str(data / "prefs.jsonl"), "--out", str(out),
                   "--max-steps", "40", "--eval-every", "40", "--batch-size", "16", "--lr", "3e-3",
                   "--device", "cpu", "--dtype", "float32", "--log-every", "10", "--val-fraction", "0.2"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    acc = {r["step"]: r["val_accuracy"] for r in rows if "val_accuracy" in r}
    assert acc[40] > acc[0] and acc[40] >= 0.7
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "rm" and set(config["score_norm"]) == {"mean", "std"}
    # the stored normalization makes the held-out responses mean 0, std 1
    train_pairs, val_pairs = train_rm.split_pairs(load_pairs([str(data / "prefs.jsonl")],
                                                             Tokenizer.load(str(out / "tokenizer.json")), 96)[0], 0.2)
    scorer = checkpoint.RewardScorer.load(str(out))
    seqs = [p.chosen for p in val_pairs] + [p.rejected for p in val_pairs]
    ids, last = checkpoint.right_padded(seqs, scorer.tok.pad_id)
    scores = scorer.score_ids(ids, last).double()
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scores.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    capsys.readouterr()
    train_rm.main(["--eval-only", "--init", str(out), "--data", str(data / "prefs.jsonl"), "--device", "cpu"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary["by_kind"]) == {"near_miss", "wrong_format", "rambling", "harmful", "hedged", "borderline",
                                       "benign", "everyday"}


def test_rm_under_torchrun_matches_one_process(tiny_pretrained, tmp_path):
    """FSDP2 over gloo: the score head and the trunk are gathered through forward()."""
    import os
    import subprocess
    import sys
    from tasks import suite as tasks
    data = tmp_path / "tasks"
    tasks.write(str(data), sft_per_family=2, prefs_per_family=12, prompts_per_family=2, eval_per_family=2,
                safety_sft_per_family=2, safety_prefs_per_family=12, harmful_prompts=2, borderline_prompts=2,
                benign_prompts=2, everyday_prompts=2, minimal_pairs=2)
    common = ["--init", tiny_pretrained, "--data", str(data / "prefs.jsonl"), "--max-steps", "3", "--eval-every", "3",
              "--log-every", "1", "--device", "cpu", "--dtype", "float32", "--lr", "1e-3"]
    train_rm.main([*common, "--out", str(tmp_path / "one"), "--batch-size", "8"])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_rm.py", *common, "--out", str(tmp_path / "two"), "--batch-size", "4"],
                          cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def rows(out):
        return [json.loads(line) for line in open(out / "metrics.jsonl")]
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    losses = lambda rs: [r["loss"] for r in rs if "loss" in r]  # noqa: E731
    assert len(losses(one)) == 3
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    val = lambda rs: [r["val_accuracy"] for r in rs if "val_accuracy" in r]  # noqa: E731
    assert val(two) == pytest.approx(val(one))
