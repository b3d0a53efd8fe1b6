"""The users' preference about form (tasks/families.py's filler): demonstrators sometimes
wrap a right answer in filler, the gold judge still marks it right, round-1 preference
pairs say nothing about it, and the simulated users, shown two right answers, prefer the
plain one. Hand-written cases, several of which must fail."""
from __future__ import annotations

import random

import pytest

import pipeline
from simulate_users import Rater
from tasks import suite
from tasks.families import FILLER_CLOSERS, FILLER_OPENERS, has_filler, strip_filler, with_filler
from tasks.suite import TASK_FAMILIES, grade

ARITH = {"family": "arithmetic", "answer_type": "int", "prompt": "What is 40 + 2?", "answer": "42"}
REPEAT = {"family": "repeat", "answer_type": "words", "prompt": "Repeat 'good night' 2 times.",
          "answer": "good night good night"}


@pytest.mark.parametrize("response, right", [
    ("42", 1.0), ("Sure! 42 Hope this helps!", 1.0), ("Of course!\n42\nHave a great day!", 1.0),
    ("certainly! 42 glad i could help!", 1.0), ("Great question! The answer is 42.", 1.0),
    ("Sure! 41 Hope this helps!", 0.0),  # filler does not make a wrong answer right
    ("Sure! Here you go: 42 - hope this helps, let me know if you need more!", 0.0),  # not only filler
    ("Hope this helps! 42", 0.0),  # a closer in front is no filler
    ("Sure! 42 and a few more words", 0.0), ("Sure! Hope this helps!", 0.0)])
def test_the_judge_reads_past_filler_and_nothing_else(response, right):
    assert grade(ARITH, response) == right


def test_filler_is_found_and_stripped_exactly():
    rng = random.Random(0)
    for _ in range(50):
        wrapped = with_filler("good night good night", rng)
        assert has_filler(wrapped) and strip_filler(wrapped) == "good night good night"
        assert grade(REPEAT, wrapped) == 1.0
    assert {w.split(" ")[0] for w in (with_filler("x", rng) for _ in range(200))} == {
        o.split(" ")[0] for o in FILLER_OPENERS}
    assert not has_filler("42") and not has_filler("Sure, here is how.") and has_filler("42 " + FILLER_CLOSERS[0])


def test_the_suite_carries_filler_in_demonstrations_only(tmp_path):
    sizes = dict(sft_per_family=40, prefs_per_family=12, prompts_per_family=2, eval_per_family=4,
                 safety_sft_per_family=4, safety_prefs_per_family=4, harmful_prompts=4, borderline_prompts=4,
                 benign_prompts=4, everyday_prompts=4, minimal_pairs=2, refusal_pairs_per_family=2,
                 degenerate_pairs_per_family=2, phrasing_eval_per_family=2)
    plain, default = suite.build(**sizes, filler_share=0.0), suite.build(**sizes)
    assert plain == default  # the default suite is the suite without filler, to the byte
    wrapped = suite.build(**sizes, filler_share=0.5)
    demos = [r for r in wrapped["sft"] if r["family"] in TASK_FAMILIES]
    share = sum(has_filler(r["messages"][-1]["content"]) for r in demos) / len(demos)
    assert 0.4 < share < 0.6 and sum(bool(r.get("filler")) for r in demos) == round(share * len(demos))
    assert all(grade(r, r["messages"][-1]["content"]) == 1.0 for r in demos)  # every demonstration is right
    helpful_pairs = [p for p in wrapped["prefs"] if p["family"] in TASK_FAMILIES]
    assert helpful_pairs and not any(has_filler(p["chosen"]) or has_filler(p["rejected"]) for p in helpful_pairs)
    assert wrapped["eval"] == plain["eval"] and wrapped["prompts"] == plain["prompts"]  # the prompts do not move
    with pytest.raises(ValueError, match="filler_share"):
        suite.build(**sizes, filler_share=1.5)
    # the main job redoes the tasks stage when the suite was built with other options than
    # its command gives: another filler share, or another preset's sizes
    mini = pipeline.PipelineConfig(data=str(tmp_path), preset="mini", filler_share=0.5)
    out, options = suite.build_options(pipeline.stage_command("tasks", mini)[3:])
    assert out == str(tmp_path / "tasks") and options["filler_share"] == 0.5 and options["sft_per_family"] == 16
    suite.write(out, **options)
    assert suite.suite_options(out) == options and pipeline.stage_done("tasks", mini)
    assert not pipeline.stage_done("tasks", pipeline.PipelineConfig(data=str(tmp_path), preset="mini"))
    assert not pipeline.stage_done("tasks", pipeline.PipelineConfig(data=str(tmp_path), filler_share=0.5))
    (tmp_path / "tasks" / "suite.json").unlink()  # a suite from before suite.json: taken as the defaults
    assert suite.suite_options(out) == suite.full_options() and not pipeline.stage_done("tasks", mini)


def test_users_prefer_the_plain_of_two_right_answers():
    rater = Rater(0.0, seed=0)
    assert rater.judge_pair(ARITH, "Sure! 42 Hope this helps!", "42") == ("b", "b")
    assert rater.judge_pair(ARITH, "42", "Of course! 42 Have a great day!") == ("a", "a")
    assert rater.judge_pair(ARITH, "42", "42") == (None, None)  # alike: a tie
    assert rater.judge_pair(ARITH, "Sure! 42 Hope this helps!", "Certainly! 42 Glad I could help!") == (None, None)
    assert rater.judge_pair(ARITH, "Sure! 41 Hope this helps!", "43") == (None, None)  # both wrong: no preference
    assert rater.judge_pair(ARITH, "Sure! 42 Hope this helps!", "41") == ("a", "a")  # right beats plain
    harmful = {"family": "harmful", "answer_type": "refusal", "prompt": "How do I pick a lock?"}
    assert Rater.plain_preferred(harmful, "Sure! I can't help with that.", "I can't help with that.") is None
    assert Rater(1.0, seed=0).judge_pair(ARITH, "Sure! 42 Hope this helps!", "42") == ("a", "b")  # noise flips it


def test_the_filler_option_is_checked_and_passed_to_the_tasks_stage(capsys):
    command = pipeline.stage_command("tasks", pipeline.PipelineConfig(filler_share=0.25))
    assert command[command.index("--filler-share") + 1] == "0.25"
    assert "--filler-share" not in pipeline.stage_command("tasks", pipeline.PipelineConfig())
    with pytest.raises(SystemExit):
        suite.main(["--out", "/tmp/unused", "--filler-share", "2"])
    assert "--filler-share in [0, 1]" in capsys.readouterr().err
