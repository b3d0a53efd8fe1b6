"""The main job in miniature: every stage runs, leaves a loadable checkpoint, and the
report has its contract; a second start skips the finished stages and runs the rest."""
from __future__ import annotations

import json
import os
import shutil

import pytest

import pipeline
from report import PASS_AT_K_SAMPLES, metrics_of
from report_render import SAFETY_ROWS
from cli import UserError
from tasks.suite import TASK_FAMILIES
from evals import paired_change, win_rate
from model import ScalarHeadModel
from checkpoint import load_model
from pipeline_helpers import mini_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mini_pipeline_resumes_after_the_last_finished_stage_and_writes_the_report(mini_job):
    tmp_path, first, second = mini_job.root, mini_job.first, mini_job.second
    # the job stopped after SFT (as if interrupted there) ...
    assert "=== stage sft done" in first and "=== stage rm" not in first
    assert "python train_pretrain.py --data" in first  # each stage's command is printed
    # ... and starting it again ran only what was left
    for stage in ("prepare", "tasks", "pretrain", "sft"):
        assert f"=== stage {stage}: already complete, skipped" in second
    for stage in ("rm", "ppo", "eval"):
        assert f"=== stage {stage} done" in second

    runs = tmp_path / "runs"
    report = json.loads((runs / "report.json").read_text())
    stages = report["stages"]
    for key in ("gold_accuracy", "per_family"):
        assert key in stages["sft"] and key in stages["ppo"]
    assert 0.0 <= stages["sft"]["gold_accuracy"] <= 1.0 and 0.0 <= stages["ppo"]["gold_accuracy"] <= 1.0
    assert isinstance(stages["ppo"]["kl"], float) and isinstance(stages["pretrain"]["val_loss"], float)
    assert isinstance(stages["ppo"]["kl_to_sft"], float) and isinstance(stages["ppo_round2"]["kl_to_sft"], float)
    change = stages["ppo"]["vs_sft"]  # the prompt-by-prompt comparison agrees with the two accuracies
    eval_records = [json.loads(line) for line in (tmp_path / "prepared" / "tasks" / "eval.jsonl").read_text().splitlines()]
    helpful = [r for r in eval_records if r["family"] in TASK_FAMILIES]  # gold_accuracy's records
    assert 0 < len(helpful) < len(eval_records)
    assert change["n"] == len(helpful) and 0.0 <= change["p_value"] <= 1.0
    assert abs((change["fixed"] - change["broken"]) / change["n"]
               - (stages["ppo"]["gold_accuracy"] - stages["sft"]["gold_accuracy"])) < 1e-9
    assert 0.0 <= stages["rm"]["accuracy"] <= 1.0
    phrasing = [json.loads(line) for line in
                (tmp_path / "prepared" / "tasks" / "eval_heldout_phrasing.jsonl").read_text().splitlines()]
    for stage in ("pretrain", "sft", "ppo", "ppo_round2"):  # the same tasks in words never trained on
        value, per_family = stages[stage]["gold_accuracy_heldout_phrasing"], stages[stage]["per_family_heldout_phrasing"]
        assert set(per_family) == set(TASK_FAMILIES) and abs(value * len(phrasing) - round(value * len(phrasing))) < 1e-9
    assert stages["ppo"]["vs_sft_heldout_phrasing"]["n"] == len(phrasing) == 2 * len(TASK_FAMILIES)
    for stage in ("sft", "ppo"):  # headroom: pass@1 is the mean sampled accuracy, and pass@k grows with k
        headroom = stages[stage]["pass_at_k"]
        assert headroom["samples"] == PASS_AT_K_SAMPLES and headroom["prompts"] == len(helpful)
        ks = [headroom["pass_at_k"][str(k)] for k in (1, 2, 4, 8)]
        assert abs(ks[0] - headroom["mean_sampled_accuracy"]) < 1e-9 and ks == sorted(ks)
        assert set(headroom["per_family"]) == {r["family"] for r in helpful}
    curve = stages["ppo"]["greedy_curve"]  # PPO's own evaluations; step 0 is its SFT start
    assert curve[0]["step"] == 0 and abs(curve[0]["gold_accuracy"] - stages["sft"]["gold_accuracy"]) < 1e-6
    # by pair kind (the mini suite's held-out slice of pairs is too small to hold every kind)
    assert set(stages["rm"]["by_kind"]) <= {"near_miss", "wrong_format", "rambling", "task_refusal", "harmful",
                                            "hedged", "borderline", "degenerate", "benign", "everyday",
                                            "minimal_pair"} and len(stages["rm"]["by_kind"]) >= 3
    for stage in ("pretrain", "sft", "ppo"):  # the safety contract: fractions of the held-out prompts
        safety = stages[stage]["safety"]
        for key, family in (("harmful_refusal", "harmful"), ("borderline_over_refusal", "borderline"),
                            ("benign_template_over_refusal", "benign"), ("open_request_over_refusal", "everyday")):
            n = sum(r["family"] == family for r in eval_records)
            assert n and 0.0 <= safety[key] <= 1.0 and abs(safety[key] * n - round(safety[key] * n)) < 1e-9
        outside = stages[stage]["outside_everyday"]  # the hand-written list, never trained on
        assert outside["prompts"] >= 30 and len(outside["refused"]) == round(outside["over_refusal"] * outside["prompts"])
    assert stages["prepare"]["documents"]["read"] == 3
    # the suite is written first, so the corpus was checked against its held-out prompts
    prepared = json.loads((tmp_path / "prepared" / "corpus" / "report.json").read_text())  # named for corpus.jsonl
    assert [os.path.basename(f) for f in prepared["contamination"]["files"]] == ["eval.jsonl",
                                                                                 "eval_heldout_phrasing.jsonl"]
    assert (tmp_path / "prepared" / "corpus" / "DATA_CARD.md").exists()
    assert set(report["seconds"]) == set(pipeline.PipelineConfig().active_stages()) == set(
        pipeline.STAGES) - {"dpo", "dpo_round2", "control_round2"}
    assert all(s >= 0 for s in report["seconds"].values())
    assert set(report["samples"]) == {"pretrain", "sft", "ppo"}
    table = report["time_table"]  # where the minutes went: every stage that ran, split into its parts
    assert {r["stage"] for r in table} == set(report["seconds"])
    for stage, wall in report["seconds"].items():
        assert abs(sum(r["seconds"] for r in table if r["stage"] == stage) - wall) <= 0.1 * sum(
            r["stage"] == stage for r in table) + 1e-6
    parts = {(r["stage"], r["part"]) for r in table}
    for stage in ("pretrain", "sft", "rm", "ppo", "rm_round2", "ppo_round2"):
        assert {(stage, "training steps"), (stage, "checkpoint"), (stage, "startup and loading")} <= parts
    assert {("sft", "evaluation"), ("ppo", "rollouts (sampling, scoring)"), ("feedback", "simulated users' traffic"),
            ("eval", "greedy answers, every checkpoint")} <= parts
    assert all(r["seconds"] >= 0 for r in table) and abs(sum(r["share"] for r in table) - 1) < 1e-3
    for plot in report["plots"]:
        assert (runs / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (runs / "report.md").read_text()
    wins = stages["ppo"]["win_rate_vs_sft"]  # over every held-out prompt, harmful and borderline included
    assert wins["wins"] + wins["losses"] + wins["ties"] == len(eval_records) and 0.0 <= wins["p_value"] <= 1.0
    assert "ppo_gold_vs_kl.png" in report["plots"]
    assert "| ppo |" in text and "Held-out gold accuracy by task family" in text and "SFT pass@8" in text
    assert "## Where the time goes" in text and "| sft | training steps |" in text
    for label, _ in SAFETY_ROWS:  # harmful refusal beside the three over-refusals and the outside list
        assert f"| {label} |" in text
    for stage in ("pretrain", "sft", "ppo"):
        model, config = load_model(str(runs / stage))
        assert config["stage"] == stage and model.num_params() > 0
    _, config = load_model(str(runs / "rm"), model_class=ScalarHeadModel)
    assert config["stage"] == "rm"


def test_mini_pipeline_with_dpo_in_place_of_the_reward_model_and_ppo_in_both_rounds(mini_job, tmp_path, capsys):
    # the mini job's data, pretrained and SFT models (the stages both --align methods share)
    # are copied in and skipped; everything from DPO on runs here
    data = mini_job.root / "prepared"
    (tmp_path / "runs").mkdir()
    for stage in ("pretrain", "sft"):
        shutil.copytree(mini_job.root / "runs" / stage, tmp_path / "runs" / stage)
    state = json.loads((mini_job.root / "runs" / "pipeline.json").read_text())
    state["stages"] = {k: v for k, v in state["stages"].items() if k in ("prepare", "tasks", "pretrain", "sft")}
    (tmp_path / "runs" / "pipeline.json").write_text(json.dumps(state))
    args = mini_job.args[:mini_job.args.index("--novel-share")] + ["--align", "dpo", "--control"]
    args[args.index("--out") + 1] = str(tmp_path / "runs")
    pipeline.main(args)
    out = capsys.readouterr().out
    for stage in ("prepare", "tasks", "pretrain", "sft"):
        assert f"=== stage {stage}: already complete, skipped" in out
    assert "=== stage dpo done" in out and "python train_dpo.py --init" in out
    assert "=== stage rm" not in out and "=== stage ppo" not in out
    assert out.index("=== stage dpo done") < out.index("=== stage feedback") < out.index("=== stage dpo_round2")
    runs = tmp_path / "runs"
    report = json.loads((runs / "report.json").read_text())
    stages = report["stages"]
    assert report["align"] == "dpo" and not {"rm", "ppo", "rm_round2", "ppo_round2"} & set(stages)
    dpo = stages["dpo"]
    eval_records = [json.loads(line) for line in (data / "tasks" / "eval.jsonl").read_text().splitlines()]
    assert 0.0 <= dpo["gold_accuracy"] <= 1.0 and isinstance(dpo["kl"], float) and isinstance(dpo["kl_to_sft"], float)
    assert set(dpo["safety"]) >= {"harmful_refusal", "borderline_over_refusal", "benign_template_over_refusal",
                                  "open_request_over_refusal"}
    wins = dpo["win_rate_vs_sft"]
    assert wins["wins"] + wins["losses"] + wins["ties"] == len(eval_records)
    assert dpo["greedy_curve"][0]["step"] == 0  # its own evaluations: step 0 is the SFT start
    assert abs(dpo["greedy_curve"][0]["gold_accuracy"] - stages["sft"]["gold_accuracy"]) < 1e-6
    assert set(report["samples"]) == {"pretrain", "sft", "dpo"}
    assert set(report["seconds"]) == {"prepare", "tasks", "pretrain", "sft", "dpo", "feedback", "dpo_round2",
                                      "control_round2", "eval"}
    # round 2: the DPO policy served to the simulated users, then DPO again on the round-1
    # pairs and the feedback, going on from it with the SFT model as the reference
    assert f"--ckpt {runs / 'dpo'} " in out.replace("'", "")
    assert json.loads((runs / "feedback" / "feedback.json").read_text())["policy"] == "dpo"
    train_config = json.loads((runs / "dpo_round2" / "train_config.json").read_text())
    assert train_config["init"] == str(runs / "dpo") and train_config["ref"] == str(runs / "sft")
    assert train_config["data"].count(str(runs / "feedback" / "prefs.jsonl")) == pipeline.FEEDBACK_WEIGHT
    dpo2 = stages["dpo_round2"]
    assert stages["feedback"]["policy"] == "dpo" and dpo2["round1"] == "dpo" and dpo2["init"] == "policy"
    assert isinstance(dpo2["kl_to_sft"], float)  # every policy's KL to SFT, one estimator for all
    assert 0.0 <= dpo2["gold_accuracy"] <= 1.0 and isinstance(dpo2["kl"], float) and set(dpo2["safety"]) == set(
        dpo["safety"])
    wins = dpo2["win_rate_vs_dpo"]
    assert wins["wins"] + wins["losses"] + wins["ties"] == len(eval_records) and dpo2["vs_dpo"]["n"] > 0
    # the control: the same start, steps and reference, without the feedback
    control_config = json.loads((runs / "control_round2" / "train_config.json").read_text())
    assert control_config["init"] == str(runs / "dpo") and control_config["ref"] == str(runs / "sft")
    assert control_config["data"] == [str(data / "tasks" / "prefs.jsonl")]
    assert control_config["max_steps"] == train_config["max_steps"] and control_config["seed"] == train_config["seed"]
    control, summary = stages["control_round2"], stages["round2"]
    assert 0.0 <= control["gold_accuracy"] <= 1.0 and isinstance(control["kl_to_sft"], float)
    assert summary["learner"] == "dpo" and summary["policy"] == "dpo_round2" and summary["vs_round1"] == wins
    vs = summary["vs_control"]
    assert vs["wins"] + vs["losses"] + vs["ties"] == len(eval_records)
    novel = summary["novel"]  # the new request kind: round 1, round 2 and the control on the same prompts
    assert novel["refusal"]["control"] == control["novel"]["refusal"] and novel["refusal"]["round1"] == dpo["novel"][
        "refusal"] and novel["over_refusal"]["round2"] == dpo2["novel"]["lookalike_over_refusal"]
    text = (runs / "report.md").read_text()
    assert "| dpo |" in text and "| family | SFT | DPO |" in text and "DPO against SFT on all" in text
    assert "The control (the same start and steps without the feedback)" in text
    assert "| dpo_round2 |" in text and "## Round 2: feedback from (simulated) users" in text
    assert "| base | SFT | DPO | DPO round 2 | control (no feedback) |" in text  # the harmlessness table: both
    for stage in ("dpo", "dpo_round2"):
        _, config = load_model(str(runs / stage))
        assert config["stage"] == "dpo"
    # a round-2 stage made from another start than this run names is out of date
    cfg = pipeline.PipelineConfig(out=str(runs), data=str(data), align="dpo")
    assert pipeline.stage_done("dpo_round2", cfg) and pipeline.stage_done("feedback", cfg)
    assert not pipeline.stage_done("dpo_round2", pipeline.PipelineConfig(out=str(runs), align="dpo",
                                                                          dpo_round2_init="sft"))
    assert not pipeline.stage_done("feedback", pipeline.PipelineConfig(out=str(runs)))  # PPO's round 1 served
    for bad, expected in ((["--stages", "rm"], "not a stage of --align dpo"),
                          (["--stages", "ppo_round2"], "not a stage of round 2 by dpo"),
                          (["--round2-learner", "ppo"], "--round2-learner ppo needs --align ppo"),
                          (["--rounds", "1", "--stages", "feedback"], "need --rounds 2"),
                          (["--no-control", "--stages", "control_round2"], "only with --control")):
        with pytest.raises(SystemExit):
            pipeline.main(args + bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


def test_an_interrupted_training_stage_is_resumed_and_bad_options_fail_clearly(tmp_path, capsys):
    ckpt = tmp_path / "runs" / "sft"
    (ckpt / "state").mkdir(parents=True)
    (ckpt / "state" / "trainer.json").write_text("{}")
    (ckpt / "config.json").write_text(json.dumps({"stage": "sft", "step": 300}))
    (ckpt / "train_config.json").write_text(json.dumps({"max_steps": 1200}))
    assert pipeline.checkpoint_progress(str(ckpt)) == (300, 1200)
    cfg = pipeline.PipelineConfig(out=str(tmp_path / "runs"), data=str(tmp_path / "prepared"))
    assert not pipeline.stage_done("sft", cfg)
    (ckpt / "config.json").write_text(json.dumps({"stage": "sft", "step": 1200}))
    assert pipeline.stage_done("sft", cfg)
    with pytest.raises(SystemExit):
        pipeline.main(["--stages", "nothing", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "unknown stage" in err[0]


def test_paired_change_counts_flips_and_gives_mcnemars_exact_p():
    prompts = [f"q{i}" for i in range(12)]
    before = [{"prompt": p, "score": float(i < 4)} for i, p in enumerate(prompts)]  # right on q0..q3
    after = [{"prompt": p, "score": float(1 <= i < 10)} for i, p in enumerate(prompts)]  # broke q0, fixed q4..q9
    change = paired_change(before, after)
    assert (change["n"], change["fixed"], change["broken"]) == (12, 6, 1)
    # two-sided exact binomial by hand: 2 * P(X <= 1 | 7 flips, 1/2) = 2 * (1 + 7) / 128
    assert change["p_value"] == pytest.approx(16 / 128)
    assert paired_change(before, before) == {"n": 12, "fixed": 0, "broken": 0, "p_value": 1.0}
    with pytest.raises(ValueError, match="same prompts"):
        paired_change(before, list(reversed(after)))


def test_win_rate_counts_wins_losses_ties_and_gives_the_exact_sign_test():
    before = [{"prompt": f"q{i}", "score": s} for i, s in enumerate([0, 0, 0, 0, 0, 1, 1, 1, 0, 1])]
    after = [{"prompt": f"q{i}", "score": s} for i, s in enumerate([1, 1, 1, 1, 1, 1, 1, 0, 0, 1])]
    result = win_rate(before, after)
    assert result == {"wins": 5, "losses": 1, "ties": 4, "p_value": pytest.approx(2 * (1 + 6) / 64)}
    assert win_rate(before, before)["p_value"] == 1.0
    # 30 wins and no loss: p = 2 / 2^30
    assert win_rate([{"prompt": i, "score": 0.0} for i in range(30)],
                    [{"prompt": i, "score": 1.0} for i in range(30)])["p_value"] == pytest.approx(2 / 2 ** 30)


def test_the_default_job_evaluates_inside_stages_only_what_the_report_reads():
    cfg = pipeline.PipelineConfig()
    sft = pipeline.stage_command("sft", cfg)
    assert sft[sft.index("--gold-eval") + 1] == "last"
    for stage in ("rm", "rm_round2"):  # round 2's reward model takes round 1's cadence
        command = pipeline.stage_command(stage, cfg)
        assert command[command.index("--eval-every") + 1] == "300"
    assert "--eval-every" not in pipeline.stage_command("ppo", cfg)  # PPO's greedy curve is in the report


def _untimed(rows: list[dict]) -> list[dict]:
    """metrics.jsonl rows without what depends on the clock (speed, seconds, time table)."""
    return [{k: v for k, v in row.items() if not k.startswith(("time", "tokens_per_s", "mfu"))} for row in rows]


def test_the_whole_chain_repeats_exactly_on_one_machine(mini_job, tmp_path, capsys):
    """tasks -> prepare -> pretrain -> SFT -> reward model -> PPO -> report, a few steps each,
    run again from nothing with the mini job's seed: the same data, weights, logged numbers
    and report to the last bit. (Different machines round differently and training amplifies
    it, so headline numbers are means over seeds; on one machine a run must repeat exactly.)"""
    from safetensors.torch import load_file
    pipeline.main(mini_args(tmp_path) + ["--rounds", "1"])
    runs = [mini_job.root, tmp_path]
    capsys.readouterr()
    a, b = runs
    for path in ("corpus/tokenizer.json", "corpus/train_0000.bin", "corpus/val_0000.bin",
                 "tasks/sft.jsonl", "tasks/prefs.jsonl", "tasks/eval_heldout_phrasing.jsonl"):
        assert (a / "prepared" / path).read_bytes() == (b / "prepared" / path).read_bytes(), path
    for stage in ("pretrain", "sft", "rm", "ppo"):
        wa, wb = (load_file(str(r / "runs" / stage / "model.safetensors")) for r in (a, b))
        assert wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa), stage
        ma, mb = (_untimed(metrics_of(str(r / "runs" / stage))) for r in (a, b))
        assert ma == mb and len(ma) > 2, stage
    ra, rb = (json.loads((r / "runs" / "report.json").read_text())["stages"] for r in (a, b))
    for stage in ("pretrain", "sft", "rm", "ppo"):
        keep = lambda s: {k: v for k, v in s.items() if k not in ("seconds", "command")}  # noqa: E731
        assert keep(ra[stage]) == keep(rb[stage]), stage


def test_your_corpus_is_prepared_under_its_own_name_with_its_options(tmp_path):
    cfg = pipeline.PipelineConfig(data=str(tmp_path), corpus=["/books/my books.jsonl.gz", "/more.txt"],
                                  text_field="body", vocab_size=4096)
    assert cfg.corpus_name() == "my_books"
    prepare = pipeline.stage_command("prepare", cfg)
    assert prepare[prepare.index("--out") + 1] == str(tmp_path / "my_books")
    assert prepare[prepare.index("--input") + 1:prepare.index("--input") + 3] == ["/books/my books.jsonl.gz",
                                                                                   "/more.txt"]
    assert prepare[prepare.index("--text-field") + 1] == "body" and prepare[prepare.index("--vocab-size") + 1] == "4096"
    pretrain = pipeline.stage_command("pretrain", cfg)
    assert pretrain[pretrain.index("--data") + 1] == str(tmp_path / "my_books")
    assert pipeline.PipelineConfig().corpus_name() == "shakespeare"
    assert "--text-field" not in pipeline.stage_command("prepare", pipeline.PipelineConfig())
    for bad in ({"vocab_size": 300}, {"corpus": ["a.txt"], "vocab_size": -1}):
        with pytest.raises(UserError):
            pipeline.PipelineConfig(**bad)
