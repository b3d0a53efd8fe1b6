"""Stage 2 end to end on CPU: SFT lowers held-out loss, bad records are counted, errors are
clear, resume is exact, and sample.py --chat answers in the chat template."""
from __future__ import annotations

import json
import os

import pytest

import train_sft
from data import loader
from tasks import suite as tasks
from error_helpers import assert_clean_error

SFT_FAST = ["--batch-size", "8", "--device", "cpu", "--dtype", "float32", "--warmup-steps", "2",
            "--eval-max-new-tokens", "4", "--log-every", "1"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks")
    tasks.write(str(out), sft_per_family=40, prefs_per_family=6, prompts_per_family=6, eval_per_family=4,
                safety_sft_per_family=40, safety_prefs_per_family=6, harmful_prompts=6, borderline_prompts=6,
                benign_prompts=6, everyday_prompts=6, minimal_pairs=6,
                refusal_pairs_per_family=0, degenerate_pairs_per_family=0)
    return out


def metrics(out, key):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def run(args):
    train_sft.main([str(a) for a in args])


def test_short_sft_lowers_heldout_loss_and_writes_an_sft_checkpoint(tiny_pretrained, task_dir, tmp_path, capsys):
    out = tmp_path / "sft"
    run(["--init", tiny_pretrained, "--data", task_dir / "sft.jsonl", "--eval-data", task_dir / "eval.jsonl",
         "--out", out, "--max-steps", 40, "--eval-every", 40, "--lr", 3e-3, *SFT_FAST])
    loss = metrics(out, "heldout_loss")
    assert set(loss) == {0, 40}
    assert loss[40] < loss[0] - 0.5
    accuracy = metrics(out, "accuracy")
    assert 0.0 <= accuracy[40] <= 1.0 and set(metrics(out, "accuracy/arithmetic")) == {0, 40}
    config = json.loads((out / "config.json").read_text())
    assert config["stage"] == "sft" and config["step"] == 40
    with open(os.path.join(tiny_pretrained, "tokenizer.json"), "rb") as f:
        assert (out / "tokenizer.json").read_bytes() == f.read()  # the tokenizer travels with the weights
    text = capsys.readouterr().out
    assert "sft data: 480 conversations from 1 file(s); skipped 0 (none); truncated " in text  # a 96-token model


def test_bad_records_are_counted_and_summarized(tiny_pretrained, task_dir, tmp_path, capsys):
    good = [json.loads(line) for line in open(task_dir / "sft.jsonl")][:20]
    data = tmp_path / "mixed.jsonl"
    with open(data, "wb") as f:
        for rec in good:
            f.write((json.dumps(rec) + "\n").encode())
        f.write(b"{not json\n")
        f.write(b'{"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]}\n')
        f.write(b'{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}\n')
        f.write(b'{"instruction": "say hi"}\n')
        f.write(b'{"prompt": "caf\xe9", "completion": "x"}\n')
        f.write(b'{"conversations": [{"from": "human", "value": "only a question"}]}\n')
        f.write(json.dumps({"instruction": "Say hello.", "output": "hello"}).encode() + b"\n")
    run(["--init", tiny_pretrained, "--data", data, "--eval-data", task_dir / "eval.jsonl", "--out", tmp_path / "o",
         "--max-steps", 1, "--eval-every", 100, *SFT_FAST])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("sft data:"))
    assert line == ("sft data: 21 conversations from 1 file(s); skipped 6 (empty_content 1, invalid_json 1, "
                    "invalid_utf8 1, missing_field 1, no_assistant_turn 1, unknown_role 1); truncated 0")


def test_clear_errors(tiny_pretrained, task_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\nnot json\n')
    cases = {
        "no usable records": ["--init", tiny_pretrained, "--data", bad, "--eval-data", task_dir / "eval.jsonl"],
        "is not a checkpoint": ["--init", tmp_path, "--data", task_dir / "sft.jsonl"],
        "does not exist": ["--init", tiny_pretrained, "--data", tmp_path / "missing.jsonl",
                           "--eval-data", task_dir / "eval.jsonl"],
    }
    for expected, args in cases.items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            run([*args, "--out", tmp_path / "o", "--max-steps", 1, *SFT_FAST])
        assert expected in assert_clean_error(capsys, e)


def test_sft_resume_is_exact(tiny_pretrained, task_dir, tmp_path):
    common = ["--init", tiny_pretrained, "--data", task_dir / "sft.jsonl", "--eval-data", task_dir / "eval.jsonl",
              "--schedule-steps", 6, "--eval-every", 100, *SFT_FAST]
    run([*common, "--out", tmp_path / "full", "--max-steps", 6])
    run([*common, "--out", tmp_path / "part", "--max-steps", 3])
    run([*common, "--out", tmp_path / "part", "--max-steps", 6, "--resume"])
    a, b = metrics(tmp_path / "full", "loss"), metrics(tmp_path / "part", "loss")
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], abs=1e-6)


def test_collate_masks_everything_but_assistant_tokens():
    from data.text.chat import ChatExample
    ex = ChatExample(ids=[10, 11, 12, 13, 14], mask=[0, 0, 0, 1, 1], meta={})
    short = ChatExample(ids=[10, 20, 21], mask=[0, 0, 1], meta={})
    x, y = loader.collate([ex, short], pad_id=99)
    assert x.tolist() == [[10, 11, 12, 13], [10, 20, 99, 99]]
    assert y.tolist() == [[-100, -100, 13, 14], [-100, 21, -100, -100]]


def test_bucketed_batches_cover_each_epoch_once_with_similar_lengths():
    lengths = [5 + (i * 37) % 60 for i in range(400)]
    batches = loader.batches_for_epoch(lengths, rows=8, epoch=0, seed=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(400)) and all(len(b) == 8 for b in batches)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 5  # vs ~50 for random batches: little padding
    assert batches != loader.batches_for_epoch(lengths, rows=8, epoch=1, seed=1)


def test_sample_chat_stops_at_end(tiny_pretrained, task_dir, tmp_path, capsys):
    out = tmp_path / "sft"
    run(["--init", tiny_pretrained, "--data", task_dir / "sft.jsonl", "--eval-data", task_dir / "eval.jsonl",
         "--out", out, "--max-steps", 200, "--eval-every", 1000, "--lr", 1e-2, *SFT_FAST])
    import sample
    capsys.readouterr()
    sample.main(["--ckpt", str(out), "--chat", "--prompt", "What is 2 + 3?", "--num-samples", "2",
                 "--max-new-tokens", "20", "--temperature", "0", "--device", "cpu"])
    text = capsys.readouterr().out
    assert text.count("user: What is 2 + 3?") == 2 and text.count("assistant: ") == 2
    assert "<|" not in text  # special tokens are not printed
    # it stops at <|end|>: the same greedy run without a stop token goes on past it (200
    # steps teach the tiny model to end its short replies), and sample.py prints the reply
    from checkpoint import load_for_inference
    from data.text.chat import encode_prompt
    model, tok, _ = load_for_inference(str(out))
    prompt = encode_prompt(tok, [{"role": "user", "content": "What is 2 + 3?"}])
    unstopped = model.generate([prompt], 20, pad_id=tok.pad_id, temperature=0, stop_tokens=[])[0]
    assert tok.end_id in unstopped[:19], "the SFT model should end its reply within 20 tokens"
    end = unstopped.index(tok.end_id)
    stopped = model.generate([prompt], 20, pad_id=tok.pad_id, temperature=0, stop_tokens=[tok.end_id])[0]
    assert stopped == unstopped[:end + 1]  # the same tokens, and none after the end token
    assert text.count(f"assistant: {tok.decode_reply(stopped)}\n") == 2
