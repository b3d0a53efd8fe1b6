"""Stage 3b: PPO's pieces against hand computations (GAE, the KL controller, the losses),
log-prob reconstruction (ratio exactly 1 with padding and temperature), padding that never
counts, the missing-stop penalty, and end to end: KL 0 before the first update, exact
resume, torchrun equal to one process, a loadable checkpoint, and clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import train_ppo
from tasks import suite as tasks
from data.text.chat import encode_prompt
from data.text.tokenizer import Tokenizer
from model import ScalarHeadModel
from checkpoint import load_model
from train_ppo import (adaptive_kl_coef, combine_scores, equal_groups, gae, group_advantages, kl_penalty_to_go,
                       masked_whiten, pack, policy_loss, response_logprobs, token_rewards, value_loss)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- the algorithm's pieces

def test_gae_and_returns_match_a_hand_computed_example():
    # one row of 3 tokens, gamma 1, lambda 0.5:
    #   t=2: delta = 1 + 0 - 0.4 = 0.6             A2 = 0.6
    #   t=1: delta = 0 + 0.4 - 0.2 = 0.2           A1 = 0.2 + 0.5 * 0.6 = 0.5
    #   t=0: delta = 0 + 0.2 - 0.5 = -0.3          A0 = -0.3 + 0.5 * 0.5 = -0.05
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2, 0.4]], dtype=torch.float64)
    adv, ret = gae(rewards, values, torch.ones(1, 3, dtype=torch.float64), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([-0.05, 0.5, 0.6])
    assert ret[0].tolist() == pytest.approx([0.45, 0.7, 1.0])
    # gamma discounts the next value: gamma 0.5, lambda 1 -> A2 = 0.6, A1 = 0 + 0.5*0.4 - 0.2 + 0.5*0.6 = 0.3,
    # A0 = 0 + 0.5*0.2 - 0.5 + 0.5*0.3 = -0.25
    adv, _ = gae(rewards, values, torch.ones(1, 3, dtype=torch.float64), gamma=0.5, lam=1.0)
    assert adv[0].tolist() == pytest.approx([-0.25, 0.3, 0.6])
    # the same row right-padded with garbage, next to a longer row: same numbers, zeros on padding
    rewards2 = torch.tensor([[0.0, 0.0, 1.0, 9.0, 9.0], [1.0, 2.0, 3.0, 4.0, 5.0]], dtype=torch.float64)
    values2 = torch.tensor([[0.5, 0.2, 0.4, 7.0, 7.0], [0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    mask2 = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    adv, ret = gae(rewards2, values2, mask2, gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([-0.05, 0.5, 0.6, 0.0, 0.0])
    assert ret[0].tolist() == pytest.approx([0.45, 0.7, 1.0, 0.0, 0.0])
    # lambda 1, gamma 1, values 0: the advantage is the sum of the rewards still to come
    assert adv[1].tolist() == pytest.approx([1 + 0.5 * (2 + 0.5 * (3 + 0.5 * (4 + 0.5 * 5))),
                                             2 + 0.5 * (3 + 0.5 * (4 + 0.5 * 5)), 3 + 0.5 * (4 + 0.5 * 5),
                                             4 + 0.5 * 5, 5])


def test_token_rewards_put_the_score_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-0.5, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards, kl = token_rewards(logp, ref, torch.tensor([2.0, -1.0]), mask, beta=0.1)
    assert kl.flatten().tolist() == pytest.approx([0.5, 0.0, -1.0, -0.5, 0.0, 0.0])
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.0, 0.1 + 2.0, 0.05 - 1.0, 0.0, 0.0])


def test_adaptive_kl_controller_follows_its_formula():
    # beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon
    assert adaptive_kl_coef(0.1, kl=6.6, target=6.0, horizon=100, n=10) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert adaptive_kl_coef(0.1, kl=60.0, target=6.0, horizon=100, n=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, kl=0.0, target=6.0, horizon=100, n=10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert adaptive_kl_coef(0.1, kl=6.0, target=6.0, horizon=100, n=10) == pytest.approx(0.1)


def test_missing_stop_penalty_and_score_mixing():
    eos = torch.tensor([True, False, True])
    rm = torch.tensor([0.5, 0.5, -1.0])
    graded = torch.tensor([1.0, 1.0, 0.0])
    gradable = torch.tensor([True, True, False])  # the third prompt is, say, a harmful request
    assert combine_scores(rm, None, gradable, eos, 2.0, 1.5).tolist() == pytest.approx([0.5, -1.0, -1.0])
    assert combine_scores(None, graded, gradable, eos, 2.0, 1.5).tolist() == pytest.approx([1.0, -0.5, 0.0])
    # mix: the weighted grader where it applies, the reward model elsewhere
    assert combine_scores(rm, graded, gradable, eos, 2.0, 1.5).tolist() == pytest.approx([2.0, 0.5, -1.0])


def test_padding_never_changes_whitening_or_losses():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    garbage = x.clone()
    garbage[mask == 0] = 1e3
    real = x[mask == 1]
    expected = (real - real.mean()) / real.var(unbiased=False).sqrt()
    for version in (x, garbage):
        white = masked_whiten(version, mask)
        assert white[mask == 1].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
        assert (white[mask == 0] == 0).all()

    def losses(fill):
        tensors = [torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)) for i in range(5)]
        tensors = [torch.where(mask == 1, t, torch.full_like(t, fill)) for t in tensors]
        logp = tensors[0].clone().requires_grad_(True)
        values = tensors[3].clone().requires_grad_(True)
        pg, _ = policy_loss(logp, tensors[1], tensors[2], mask, 0.2, float(mask.sum()))
        vf, _ = value_loss(values, tensors[4], tensors[2], mask, 0.2, float(mask.sum()))
        (pg + vf).backward()
        return pg.item(), vf.item(), logp.grad, values.grad
    a, b = losses(0.0), losses(123.0)
    assert a[0] == pytest.approx(b[0]) and a[1] == pytest.approx(b[1])
    for ga, gb in zip(a[2:], b[2:]):
        assert torch.allclose(ga, gb) and (ga[mask == 0] == 0).all()


def test_clipped_surrogate_matches_a_hand_example():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1 against old log-prob 0
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, -2.0]])
    mask = torch.ones(1, 3)
    values, old_values, returns = torch.tensor([[1.0, 0.0, 0.0]]), torch.zeros(1, 3), torch.tensor([[2.0, 0.0, 0.0]])
    pg, stats = policy_loss(logp, old, adv, mask, 0.2, 3.0)
    vf, value_stats = value_loss(values, old_values, returns, mask, 0.5, 3.0)
    # max(-A r, -A clip(r)): 1.5 -> max(-1.5, -1.2) = -1.2; 0.5 with A<0 -> max(0.5, 0.8) = 0.8; 1.1 -> 2.2
    assert pg.item() == pytest.approx((-1.2 + 0.8 + 2.2) / 3)
    # value 1.0 clipped to 0.5 around 0: max((1-2)^2, (0.5-2)^2) = 2.25
    assert vf.item() == pytest.approx(0.5 * 2.25 / 3)
    assert stats["policy/clipfrac"].item() == pytest.approx(2 / 3)
    assert value_stats["val/clipfrac"].item() == pytest.approx(1 / 3)


def test_rloo_and_grpo_advantages_match_hand_computed_groups():
    # two groups of k = 3: scores (1, 0, 0) and (2, 2, 5)
    scores = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 5.0], dtype=torch.float64)
    # RLOO: minus the mean of the other two -> 1 - 0, 0 - 0.5, 0 - 0.5 | 2 - 3.5, 2 - 3.5, 5 - 2
    assert group_advantages(scores, 3, "rloo").tolist() == pytest.approx([1.0, -0.5, -0.5, -1.5, -1.5, 3.0])
    # GRPO: minus the group mean 1/3 | 3
    assert group_advantages(scores, 3, "grpo").tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, -1.0, -1.0, 2.0])
    # ... over the group's (sample) std: sqrt(1/3) | sqrt(3)
    scaled = group_advantages(scores, 3, "grpo", scale_by_std=True)
    assert scaled.tolist() == pytest.approx([(2 / 3) / 3 ** -0.5, (-1 / 3) / 3 ** -0.5, (-1 / 3) / 3 ** -0.5,
                                             -1 / 3 ** 0.5, -1 / 3 ** 0.5, 2 / 3 ** 0.5], rel=1e-5)
    # RLOO's advantage is k/(k-1) times GRPO's (unscaled)
    assert torch.allclose(group_advantages(scores, 3, "rloo"), 1.5 * group_advantages(scores, 3, "grpo"))
    # a group that is always right (or always wrong) gives zero, whatever its level
    assert group_advantages(torch.tensor([1.0, 1.0, 7.0, 7.0]), 2, "rloo").tolist() == [0.0, 0.0, 0.0, 0.0]
    assert equal_groups(torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 3.0, 3.0, 3.0]), 3).tolist() == [True, False, True]
    with pytest.raises(ValueError):
        group_advantages(scores, 3, "gae")


def test_kl_penalty_to_go_sums_the_penalties_still_to_come():
    kl = torch.tensor([[0.5, 0.0, -1.0, 9.0], [2.0, 1.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    # beta 0.1: row 0 -> -0.1 * (0.5 + 0 - 1), -0.1 * (0 - 1), -0.1 * (-1), 0 (padding)
    assert kl_penalty_to_go(kl, mask, 0.1).flatten().tolist() == pytest.approx(
        [0.05, 0.1, 0.1, 0.0, -0.3, -0.1, 0.0, 0.0])


# ----------------------------------------------------------------------------- log-probs of a real model

@pytest.fixture(scope="module")
def policy_and_tok(tiny_pretrained):
    model, _ = load_model(tiny_pretrained)
    return model, Tokenizer.load(os.path.join(tiny_pretrained, "tokenizer.json"))


def test_logprobs_are_reconstructed_exactly_with_padding_and_temperature(policy_and_tok):
    model, tok = policy_and_tok
    temperature = 0.7
    prompts = [encode_prompt(tok, [{"role": "user", "content": text}]) for text in
               ("What is 3 + 4?", "Reverse the word candle, please, and say nothing else.", "Hi")]
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    responses = model.generate(prompts, 12, tok.pad_id, temperature, stop_tokens=[tok.end_id], generator=generators)
    assert len({len(r) for r in responses} | {len(p) for p in prompts}) > 2  # real padding on both sides
    width_p, width_r = max(map(len, prompts)), max(map(len, responses))
    ids, kv_start, mask = pack(prompts, responses, width_p, width_r, tok.pad_id)
    assert (ids[:, width_p:][mask == 0] == tok.pad_id).all()  # padded with <|pad|>, never the stop token
    model.eval()
    with torch.no_grad():
        old = response_logprobs(model, ids, kv_start, mask, width_p, temperature)
    # reference: each sequence alone, unpadded, logits / T, log-softmax
    for i, (p, r) in enumerate(zip(prompts, responses)):
        seq = torch.tensor([p + r])
        with torch.no_grad():
            logits = model(seq[:, :-1]).double() / temperature
        expected = logits.log_softmax(-1)[0, len(p) - 1:].gather(-1, torch.tensor(r)[:, None])[:, 0]
        assert old[i, :len(r)].double().tolist() == pytest.approx(expected.tolist(), abs=1e-4)
        assert (old[i, len(r):] == 0).all()
    # the first minibatch of the first epoch (a subset, in train mode, with gradients): ratio 1
    model.train()
    rows = torch.tensor([2, 0])
    new = response_logprobs(model, ids[rows], kv_start[rows], mask[rows], width_p, temperature)
    ratio = torch.exp(new - old[rows])[mask[rows] == 1]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), ratio
    # an other temperature would not reconstruct them
    other = response_logprobs(model, ids[rows], kv_start[rows], mask[rows], width_p, 1.0)
    assert not torch.allclose(other, old[rows], atol=1e-3)


def test_groups_from_one_prompt_pass_give_ratio_one_on_the_first_minibatch(policy_and_tok):
    """k samples per prompt through one shared prompt pass are the samples k separate
    prompts would give, and their log-probs are reconstructed exactly (ratio 1)."""
    model, tok = policy_and_tok
    k, temperature = 3, 0.9
    prompts = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in ("What is 3 + 4?", "Reverse 'candle'.")]
    gens = lambda: [torch.Generator().manual_seed(40 + i) for i in range(len(prompts) * k)]  # noqa: E731
    grouped = model.generate(prompts, 10, tok.pad_id, temperature, stop_tokens=[tok.end_id], generator=gens(),
                             num_samples=k)
    repeated = [p for p in prompts for _ in range(k)]
    assert grouped == model.generate(repeated, 10, tok.pad_id, temperature, stop_tokens=[tok.end_id],
                                     generator=gens())
    assert len(set(map(tuple, grouped[:k]))) > 1  # the samples of a group differ
    width_p = max(map(len, prompts))
    ids, kv_start, mask = pack(repeated, grouped, width_p, max(map(len, grouped)), tok.pad_id)
    model.eval()
    with torch.no_grad():
        old = response_logprobs(model, ids, kv_start, mask, width_p, temperature)
    model.train()
    rows = torch.tensor([4, 1, 3])  # a minibatch mixing both groups
    new = response_logprobs(model, ids[rows], kv_start[rows], mask[rows], width_p, temperature)
    ratio = torch.exp(new - old[rows])[mask[rows] == 1]
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5), ratio


def test_kl_is_zero_when_policy_equals_reference(policy_and_tok, tiny_pretrained):
    model, tok = policy_and_tok
    reference, _ = load_model(tiny_pretrained)
    prompts = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in ("Count to three.", "Sort 3, 1, 2.")]
    responses = model.generate(prompts, 8, tok.pad_id, 1.0, stop_tokens=[tok.end_id],
                               generator=torch.Generator().manual_seed(0))
    ids, kv_start, mask = pack(prompts, responses, max(map(len, prompts)), max(map(len, responses)), tok.pad_id)
    with torch.no_grad():
        logp = response_logprobs(model, ids, kv_start, mask, max(map(len, prompts)), 1.0)
        ref = response_logprobs(reference, ids, kv_start, mask, max(map(len, prompts)), 1.0)
    _, kl = token_rewards(logp, ref, torch.zeros(2), mask, 0.1)
    assert (kl == 0).all()


def test_ppo_grades_the_same_text_the_evaluation_grades(policy_and_tok, monkeypatch):
    """The text PPO's reward reads and the text evals.py judges come from one decode
    (Tokenizer.decode_reply): for the same generated ids they are equal, with special
    tokens (a role marker a policy emits mid-answer, the stop token) dropped, not shown."""
    import contextlib
    from types import SimpleNamespace

    from evals import chat_responses
    model, tok = policy_and_tok
    word = tok.encode(" 42")
    outputs = [word + [tok.user_id] + word + [tok.end_id], word + [tok.assistant_id], [tok.end_id], word]
    monkeypatch.setattr(model, "generate", lambda prompts, *a, **k: [list(o) for o in outputs[:len(prompts)]])
    conversations = [[{"role": "user", "content": f"What is {i} + 40?"}] for i in range(len(outputs))]
    graded = chat_responses(model, tok, conversations)
    prompts = [encode_prompt(tok, conv) for conv in conversations]
    trainer = SimpleNamespace(step=0, autocast=contextlib.nullcontext)
    env = SimpleNamespace(device=torch.device("cpu"), rank=0, world_size=1)
    cfg = SimpleNamespace(samples_per_prompt=1, seed=0, batch_size=len(prompts), max_new_tokens=8, temperature=1.0)
    rewarded = train_ppo.rollout(model, trainer, prompts, list(range(len(prompts))), cfg, env, tok).texts
    assert rewarded == graded == [" 42 42", " 42", "", " 42"]


def test_per_row_generators_make_samples_independent_of_the_batch(policy_and_tok):
    model, tok = policy_and_tok
    prompts = [encode_prompt(tok, [{"role": "user", "content": t}]) for t in ("Say hello.", "A much longer prompt here.")]
    both = model.generate(prompts, 8, tok.pad_id, 1.0, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    alone = model.generate(prompts[1:], 8, tok.pad_id, 1.0, generator=[torch.Generator().manual_seed(6)])
    assert both[1] == alone[0]


def test_ptx_loss_is_the_mean_loss_over_assistant_tokens(policy_and_tok, tmp_path):
    """PPO-ptx's term is the SFT loss of a batch of demonstrations: the mean next-token loss
    over the assistant's tokens only, the prompt's tokens ignored."""
    from types import SimpleNamespace

    from data.text.chat import load_chat_jsonl
    from data.loader import BucketLoader
    model, tok = policy_and_tok
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in [("What is 2 + 2?", "4"), ("Reverse 'cat'.", "tac"),
                                                ("Say hi three times, please.", "hi hi hi")]))
    examples, skipped, _ = load_chat_jsonl([str(path)], tok, 64)
    assert len(examples) == 3 and not skipped
    loader = BucketLoader(examples, 3, 0, 1, seed=0)
    with torch.no_grad():
        got = train_ppo.ptx_loss(model, loader, tok.pad_id, SimpleNamespace(device=torch.device("cpu")))
    # by hand: each conversation's assistant tokens (content and <|end|>), scored one by one
    total, count = 0.0, 0
    for e in examples:
        ids = torch.tensor(e.ids)
        with torch.no_grad():
            logits = model(ids[None, :-1])[0].double()
        for t in range(1, len(e.ids)):
            if e.mask[t]:
                total -= torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
                count += 1
    assert count == sum(len(tok.encode(a)) + 1 for a in ("4", "tac", "hi hi hi"))
    assert got.item() == pytest.approx(total / count, rel=1e-5)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def setup(tiny_pretrained, tmp_path_factory):
    """Task files, and a reward model trained for a few steps from the tiny pretrained model."""
    import train_rm
    root = tmp_path_factory.mktemp("ppo")
    data = root / "tasks"
    tasks.write(str(data), sft_per_family=2, prefs_per_family=8, prompts_per_family=4, eval_per_family=2,
                safety_sft_per_family=2, safety_prefs_per_family=8, harmful_prompts=4, borderline_prompts=4,
                benign_prompts=4, everyday_prompts=4, minimal_pairs=4,
                refusal_pairs_per_family=0, degenerate_pairs_per_family=0)
    rm = root / "rm"
    train_rm.main(["--init", tiny_pretrained, "--data", str(data / "prefs.jsonl"), "--out", str(rm), "--max-steps", "4",
                   "--eval-every", "4", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu", "--dtype", "float32"])
    return {"sft": tiny_pretrained, "rm": str(rm), "prompts": str(data / "prompts.jsonl"),
            "eval": str(data / "eval.jsonl"), "ptx": str(data / "ptx.jsonl"), "root": root}


def ppo_args(setup, out, **overrides):
    options = {"init": setup["sft"], "reward-model": setup["rm"], "prompts": setup["prompts"],
               "eval-data": setup["eval"], "ptx-data": setup["ptx"], "out": str(out), "max-steps": 2, "batch-size": 8,
               "minibatch-size": 4, "max-new-tokens": 8, "eval-every": 100, "log-every": 1, "lr": 1e-3, "device": "cpu",
               "dtype": "float32", "eval-max-new-tokens": 4, **overrides}
    return [str(x) for k, v in options.items() for x in (f"--{k}", v)]


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if "objective/kl" in line]


def test_ppo_run_logs_trl_metrics_saves_a_chat_checkpoint_and_resumes_exactly(setup, tmp_path, capsys):
    """With a critic (gae) and PPO-ptx, so their checkpoint and resume are covered too."""
    full = tmp_path / "full"
    gae_options = {"advantage": "gae", "samples-per-prompt": 2, "minibatch-size": 8, "ptx-coef": 0.5}
    train_ppo.main(ppo_args(setup, full, **{"max-steps": 4, "save-every": 2, "target-kl": 0.5, "kl-horizon": 20,
                                            "reward": "mix", **gae_options}))
    rows = metrics(full)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    names = ["objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward", "objective/kl_coef",
             "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/ratio", "val/clipfrac",
             "val/var_explained", "tokens/response_len", "eos_fraction", "time/generation", "time/training"]
    assert all(name in rows[0] for name in names)
    assert rows[0]["objective/kl"] == 0.0  # the first rollout comes from the unchanged policy
    assert rows[1]["objective/kl"] != 0.0  # then the policy has moved
    for prev, cur in zip(rows, rows[1:]):  # the adaptive controller, with n = 8 x 2 rollouts per step
        assert cur["objective/kl_coef"] == pytest.approx(adaptive_kl_coef(prev["objective/kl_coef"],
                                                                           prev["objective/kl"], 0.5, 20, 16), abs=2e-6)
    config = json.loads((full / "config.json").read_text())
    assert config["stage"] == "ppo" and "eval_start" in config
    assert json.loads((full / "critic" / "config.json").read_text())["stage"] == "critic"
    import sample
    capsys.readouterr()
    sample.main(["--ckpt", str(full), "--chat", "--prompt", "What is 2 + 2?", "--max-new-tokens", "4", "--device", "cpu"])
    assert capsys.readouterr().out.strip()

    # resume: 2 steps, then 2 more from the checkpoint == 4 steps in one go
    part = tmp_path / "part"
    options = {"save-every": 2, "target-kl": 0.5, "kl-horizon": 20, "reward": "mix", **gae_options}
    train_ppo.main(ppo_args(setup, part, **{"max-steps": 2, **options}))
    train_ppo.main(ppo_args(setup, part, **{"max-steps": 4, **options}) + ["--resume"])
    resumed = metrics(part)
    for key in ("loss", "objective/kl", "objective/scores", "objective/kl_coef", "loss/ptx"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in rows], abs=1e-6)
    a, b = load_model(str(full))[0].state_dict(), load_model(str(part))[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_rloo_loads_no_critic_and_drops_groups_with_equal_scores(setup, tmp_path, capsys, monkeypatch):
    """RLOO and GRPO need no value model: none is built or saved. With the task grader on a
    model that never answers right, every group scores 0: each is left out, and the policy
    does not move at all (no optimizer step on an empty update)."""
    def no_critic(*args, **kwargs):
        raise AssertionError("a critic was built for a group estimator")
    monkeypatch.setattr(train_ppo, "Critic", no_critic)
    for estimator in ("rloo", "grpo"):
        out = tmp_path / estimator
        train_ppo.main(ppo_args(setup, out, **{"advantage": estimator, "reward": "rm", "max-steps": 1}))
        assert not (out / "critic").exists()
        row = metrics(out)[0]
        assert "loss/policy" in row and "loss/value" not in row and "val/var_explained" not in row
    capsys.readouterr()
    out = tmp_path / "task"
    train_ppo.main(ppo_args(setup, out, **{"reward": "task", "max-steps": 2, "max-new-tokens": 3,
                                           "missing-eos-penalty": 0.0}))
    text = capsys.readouterr().out
    assert "dropped 8/8 groups" in text
    rows = metrics(out)
    assert [r["groups/dropped"] for r in rows] == [8, 8] and all(r["objective/scores"] == 0.0 for r in rows)
    assert rows[1]["objective/kl"] == 0.0  # the second rollout still comes from the SFT model
    a, b = load_model(str(out))[0].state_dict(), load_model(setup["sft"])[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def saved_frontier(out) -> list[dict]:
    with open(os.path.join(out, "state", "trainer.json")) as f:
        return json.load(f)["data"]["refreshed"]


def test_refresh_trains_on_the_frontier_of_fresh_prompts(setup, tmp_path, monkeypatch, capsys):
    """--refresh-every: at steps 0 and 2 fresh helpfulness instances are drawn, never a
    held-out prompt or an SFT demonstration's; the RL prompts become those whose estimated
    pass rate is strictly between 0 and 1 (here a stand-in estimate, so the frontier is
    known), and the estimate sees the policy as it is at that step."""
    from tasks.rl_prompts import prompt_texts
    from tasks.suite import split_of
    seen_steps, calls, drawn = [], [], []
    real_estimate = train_ppo.estimate_pass_rates

    def estimate(model, tok, records, samples, temperature, seed, max_new_tokens):
        calls.append((len(records), samples, temperature, seed))
        drawn.append(records)
        seen_steps.append(sum(p.double().sum().item() for p in model.parameters()))
        real_estimate(model, tok, records[:2], samples, temperature, seed, max_new_tokens)  # it runs on the policy
        if len(calls) == 1:  # a frontier of 16
            return [(0.0, 0.5, 1.0, 0.25)[i % 4] for i in range(len(records))]
        # then only 3: 5 other drawn prompts fill the batch of 8
        return [0.5 if i in (4, 9, 30) else float(i % 2) for i in range(len(records))]
    monkeypatch.setattr(train_ppo, "estimate_pass_rates", estimate)
    out = tmp_path / "refresh"
    options = {"reward": "rm", "max-steps": 4, "refresh-every": 2, "fresh-per-family": 4, "pass-samples": 3,
               "save-every": 4, "temperature": 0.9}
    train_ppo.main(ppo_args(setup, out, **options))
    sft_file = os.path.join(os.path.dirname(setup["eval"]), "sft.jsonl")
    assert f"prompts of {sft_file} {setup['eval']}" in capsys.readouterr().out  # what is excluded is said
    assert [c[:3] for c in calls] == [(32, 3, 0.9)] * 2 and calls[0][3] != calls[1][3]
    assert seen_steps[0] != seen_steps[1]  # the second estimate saw the trained policy
    with open(out / "metrics.jsonl") as f:
        refreshes = [json.loads(line) for line in f if "refresh/drawn" in line]
    assert [(r["step"], r["refresh/drawn"], r["refresh/frontier"]) for r in refreshes] == [(0, 32, 16), (2, 32, 3)]
    frontier = saved_frontier(out)  # the second refresh's: its frontier first, then 5 others
    assert frontier[:3] == [drawn[1][i] for i in (4, 9, 30)]
    assert len({r["id"] for r in frontier}) == 8 and all(r in drawn[1] for r in frontier[3:])
    assert len({r["prompt"] for r in drawn[0]}) == 32
    never = prompt_texts([setup["eval"], sft_file])
    assert all(r["prompt"] not in never and split_of(r["prompt"]) == "train" for r in drawn[0] + drawn[1])
    assert {r["family"] for r in drawn[0]} == set(tasks.TASK_FAMILIES)


def test_refresh_resumes_exactly(setup, tmp_path):
    """With the real estimate: 2 steps then 2 more after --resume (the saved frontier is
    used until the next refresh) equal 4 steps in one go. The reward model scores them (the
    tiny policy never answers right, so the grader would give every group 0 and nothing
    would move)."""
    options = {"reward": "rm", "refresh-every": 3, "fresh-per-family": 2, "pass-samples": 2, "save-every": 2,
               "max-new-tokens": 4}
    full, part = tmp_path / "full", tmp_path / "part"
    train_ppo.main(ppo_args(setup, full, **{"max-steps": 4, **options}))
    train_ppo.main(ppo_args(setup, part, **{"max-steps": 2, **options}))
    train_ppo.main(ppo_args(setup, part, **{"max-steps": 4, **options}) + ["--resume"])
    rows = metrics(full)
    assert rows[-1]["objective/kl"] != 0.0  # the policy moved
    for key in ("loss", "objective/kl", "objective/scores"):
        assert [r[key] for r in metrics(part)] == pytest.approx([r[key] for r in rows], abs=1e-6)
    assert saved_frontier(part) == saved_frontier(full)
    a, b = load_model(str(full))[0].state_dict(), load_model(str(part))[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_critic_warmup_trains_the_critic_and_leaves_the_policy_unchanged(setup, tmp_path):
    out = tmp_path / "warm"
    train_ppo.main(ppo_args(setup, out, **{"advantage": "gae", "samples-per-prompt": 1, "critic-warmup-steps": 2,
                                           "max-steps": 3, "reward": "rm"}))
    rows = metrics(out)
    # steps 2 and 3 sample from a policy that is still exactly the SFT model: KL 0
    assert [r["objective/kl"] for r in rows] == [0.0, 0.0, 0.0]
    assert ["loss/policy" in r for r in rows] == [False, False, True]
    assert all("loss/value" in r for r in rows)
    critic, _ = load_model(str(out / "critic"), model_class=ScalarHeadModel)
    start, _ = load_model(setup["rm"], model_class=ScalarHeadModel)
    assert not torch.equal(critic.blocks[0].attn.wq.weight, start.blocks[0].attn.wq.weight)  # the critic learned
    policy, sft = load_model(str(out))[0].state_dict(), load_model(setup["sft"])[0].state_dict()
    assert not all(torch.equal(policy[k], sft[k]) for k in policy)  # and the policy moved at step 3


def test_ppo_under_torchrun_matches_one_process(setup, tmp_path):
    """Groups of k = 4 (RLOO) and PPO-ptx: each rank samples whole groups, and the gathered
    batch, its baselines, its minibatches and the ptx batches are those of one process."""
    options = {"reward": "rm", "samples-per-prompt": 4, "advantage": "rloo", "ptx-coef": 0.5}
    train_ppo.main(ppo_args(setup, tmp_path / "one", **{"batch-size": 8, "minibatch-size": 8, "ptx-batch-size": 8,
                                                        **options}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_ppo.py", *ppo_args(setup, tmp_path / "two", **{"batch-size": 4, "minibatch-size": 4,
                                                                                 "ptx-batch-size": 4, **options})],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("loss", "objective/kl", "objective/scores", "tokens/response_len", "loss/policy", "loss/ptx",
                "val/ratio", "groups/dropped"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-5), key
    # the second step's numbers above already come from the updated weights; the weights
    # themselves agree up to Adam's amplification of float noise in near-zero gradients
    # (rarely seen embedding rows), far below one step of lr 1e-3
    a, b = load_model(str(tmp_path / "one"))[0].state_dict(), load_model(str(tmp_path / "two"))[0].state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 5e-4


def test_refresh_under_torchrun_matches_one_process(setup, tmp_path):
    """--refresh-every with two ranks: both draw and estimate the same fresh prompts (the
    sharded policy answers them in lockstep), so the frontier and the steps are one
    process's."""
    options = {"reward": "rm", "refresh-every": 1, "fresh-per-family": 2, "pass-samples": 2, "max-new-tokens": 4}
    train_ppo.main(ppo_args(setup, tmp_path / "one", **{"batch-size": 8, "minibatch-size": 8, **options}))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_ppo.py", *ppo_args(setup, tmp_path / "two", **{"batch-size": 4, "minibatch-size": 4,
                                                                                 **options})],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert saved_frontier(tmp_path / "two") == saved_frontier(tmp_path / "one")
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for key in ("loss", "objective/kl", "objective/scores", "tokens/response_len"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-5), key


def test_bad_input_fails_clearly_or_is_counted(setup, tmp_path, capsys, data_dirs):
    # a reward model with another tokenizer
    other = tmp_path / "other_rm"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((open(os.path.join(setup["rm"], name), "rb")).read())
    Tokenizer.train(["a completely different tokenizer " * 50], vocab_size=300).save(str(other / "tokenizer.json"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text("".join(json.dumps({"prompt": "word " * 200}) + "\n" for _ in range(3)))
    cases = {
        "different tokenizer": {"reward-model": str(other)},
        "0 usable prompts": {"prompts": str(empty)},
        "skipped 3": {"prompts": str(long_prompts)},
        "not a reward model": {"reward-model": setup["sft"]},
        "must divide": {"minibatch-size": 3},
        ">= 2 for --advantage rloo": {"samples-per-prompt": 1},
        "are for --advantage gae": {"critic-warmup-steps": 1},
        "--pass-samples >= 2": {"refresh-every": 2, "pass-samples": 1},
        "cannot read --exclude": {"refresh-every": 2, "exclude": str(tmp_path / "missing.jsonl")},
        "fewer than one rollout batch of 9": {"refresh-every": 2, "fresh-per-family": 1, "batch-size": 9},
    }
    for expected, overrides in cases.items():
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            train_ppo.main(ppo_args(setup, tmp_path / "x", **overrides))
        assert e.value.code not in (0, None)
        out = capsys.readouterr()
        err = out.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
        assert expected in err[0] or expected in out.out, (expected, err[0])
    # too-long prompts mixed with good ones are skipped and counted, and the run goes on
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(open(setup["prompts"]).read() + long_prompts.read_text() + "not json\n")
    ungradable = tmp_path / "ungradable.jsonl"  # held-out records without answers: evaluation is skipped, said so
    ungradable.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    capsys.readouterr()
    train_ppo.main(ppo_args(setup, tmp_path / "mixed", **{"prompts": str(mixed), "max-steps": 1,
                                                          "eval-data": str(ungradable)}))
    out = capsys.readouterr().out
    assert "skipped 4 (invalid_json 1, too_long 3)" in out and "no gradable records" in out
    # --reward task needs answers: prompts without one are counted
    capsys.readouterr()
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(open(setup["prompts"]).read() + json.dumps({"prompt": "Tell me a story."}) + "\n")
    train_ppo.main(ppo_args(setup, tmp_path / "task", **{"prompts": str(no_answer), "max-steps": 1, "reward": "task"}))
    # ... and the grader never scores harmful or borderline prompts (the reward model alone does)
    assert "skipped 17 (no_answer 1, safety_family 16)" in capsys.readouterr().out  # harmful, borderline, benign, everyday: 4 each
