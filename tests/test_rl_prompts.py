"""RL prompts: fresh instances never shown in SFT nor held out, and the frontier filter."""
from __future__ import annotations

import json

import pytest
import torch

from evals import estimate_pass_rates
from tasks.rl_prompts import fresh_task_prompts, frontier, prompt_texts
from tasks.suite import TASK_FAMILIES, build, grade, split_of


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """A small task suite written as files: (sft path, eval path, its records)."""
    out = build(sft_per_family=120, prefs_per_family=10, eval_per_family=40, safety_sft_per_family=5,
                safety_prefs_per_family=5, harmful_prompts=5, borderline_prompts=5,
                benign_prompts=5, everyday_prompts=5, minimal_pairs=5)
    root = tmp_path_factory.mktemp("suite")
    for name in ("sft", "eval"):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out[name]))
    return str(root / "sft.jsonl"), str(root / "eval.jsonl"), out


def test_fresh_prompts_are_never_an_sft_demonstration_nor_held_out(suite):
    sft, held_out, out = suite
    exclude = prompt_texts([sft, held_out])
    shown = {r["messages"][0]["content"] for r in out["sft"]}
    assert shown <= exclude and {r["prompt"] for r in out["eval"]} <= exclude
    records = fresh_task_prompts(list(TASK_FAMILIES), 60, seed=3, exclude=exclude)
    prompts = [r["prompt"] for r in records]
    assert len(prompts) == len(set(prompts)) and not set(prompts) & exclude
    assert all(split_of(p) == "train" for p in prompts)
    by_family = {f: sum(r["family"] == f for r in records) for f in TASK_FAMILIES}
    assert all(0 < n <= 60 for n in by_family.values()) and by_family["arithmetic"] == 60
    for r in records:  # the grader accepts the generator's answer and rejects another
        assert grade(r, r["answer"]) == 1.0 and grade(r, r["answer"] + "9") == 0.0
    assert fresh_task_prompts(["count"], 20, seed=3, exclude=exclude) == \
        fresh_task_prompts(["count"], 20, seed=3, exclude=exclude)  # seeded


def test_prompt_files_that_cannot_be_read_whole_are_refused(tmp_path):
    from cli import UserError
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "Reverse 'abc'."}) + "\n\n" + json.dumps(
        {"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]}) + "\n")
    assert prompt_texts([str(good)]) == {"Reverse 'abc'.", "What is 2 + 2?"}
    (tmp_path / "no_prompt.jsonl").write_text(json.dumps({"family": "count"}) + "\n")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    for name, message in (("no_prompt", "--sft no_prompt.jsonl:1: a record with no prompt"),
                          ("broken", "is not JSONL"), ("missing", "cannot read --sft")):
        with pytest.raises(UserError, match=message.replace("--sft ", "--sft .*")):
            prompt_texts([str(good), str(tmp_path / f"{name}.jsonl")], label="--sft ")


def test_a_family_that_runs_out_gives_fewer_and_bad_families_are_refused():
    everything = {r["prompt"] for r in fresh_task_prompts(["next_letter"], 10_000, seed=0, exclude=set())}
    assert fresh_task_prompts(["next_letter"], 10, seed=1, exclude=everything) == []
    with pytest.raises(ValueError, match="harmful"):
        fresh_task_prompts(["harmful"], 5, seed=0, exclude=set())


def test_frontier_keeps_only_prompts_the_policy_sometimes_gets_right():
    records = [{"prompt": str(i)} for i in range(5)]
    assert frontier(records, [0.0, 0.5, 1.0, 0.25, 1.0]) == [records[1], records[3]]
    assert frontier(records, [0.0, 1.0, 1.0, 0.0, 0.0]) == records  # nothing in between: keep all
    with pytest.raises(ValueError):
        frontier(records, [0.5])


def test_pass_rates_grade_k_samples_per_prompt(monkeypatch):
    import evals
    records = [{"family": "arithmetic", "answer_type": "int", "prompt": "What is 2 + 2?", "answer": "4"},
               {"family": "reverse", "answer_type": "text", "prompt": "Reverse 'abc'.", "answer": "cba"}]
    seen = []

    def replies(model, tok, convs, max_new_tokens, batch_size, temperature, generator):
        seen.append((len(convs), temperature, generator.initial_seed()))
        return ["4", "5", "4", "4", "abc", "abc", "abc", "abc"]

    monkeypatch.setattr(evals, "chat_responses", replies)
    rates = estimate_pass_rates(torch.nn.Linear(1, 1), None, records, samples=4, temperature=0.7, seed=9)
    assert rates == [0.75, 0.0] and seen == [(8, 0.7, 9)]
    assert frontier(records, rates) == records[:1]
    with pytest.raises(ValueError):
        estimate_pass_rates(torch.nn.Linear(1, 1), None, records, samples=0)


@pytest.mark.parametrize("args, start", [
    (["--steps", "0"], "error: --steps, --prompts-per-step and --prompts-per-family must be at least 1"),
    (["--samples-per-prompt", "1"], "error: --steps, --prompts-per-step"),
    (["--lr", "0"], "error: --lr must be > 0"),
    (["--init", "/nonexistent/sft"], "error: /nonexistent/sft does not exist"),
])
def test_the_peer_benchmark_refuses_bad_options_in_one_line(args, start, capsys):
    from bench import trl_grpo  # imports no TRL until its run starts
    with pytest.raises(SystemExit) as e:
        trl_grpo.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(start) and len(err.splitlines()) == 1, err
