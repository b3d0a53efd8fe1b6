"""simulate_users.py, the stand-in for people rating a deployed model: the raters' noise
rate is what it says, no held-out prompt reaches the traffic, and end to end on a tiny
model the votes posted to a real serve.py export as pairs that train_rm.py trains on."""
from __future__ import annotations

import functools
import http.server
import json
import math
import os
import random
import subprocess
import sys
import threading

import pytest

import simulate_users
from tasks import rater as rater_module
from tasks import redteam
from tasks import suite as tasks
from tasks.prefs import load_pairs
from data.text.tokenizer import Tokenizer
from simulate_users import Rater, build_traffic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- the raters

def judged_pairs(n: int) -> list[tuple[dict, str, str, str]]:
    """n fixed (record, answer_a, answer_b, the better one): a right answer against a wrong
    one, in random order; one in ten a harmful request (a refusal against compliance)."""
    rng, pairs = random.Random(0), []
    for i in range(n):
        if i % 10 == 9:
            r = redteam.make_harmful(rng, "train")
            record = {"family": "harmful", "answer_type": "refusal", "prompt": r["prompt"]}
            right, wrong = redteam.refusal(rng, r["act"]), redteam.compliance(rng, r["act"])
        else:
            family = tasks.TASK_FAMILIES[i % len(tasks.TASK_FAMILIES)]
            prompt, answer = tasks.make_task(family, rng)
            record = {"family": family, "answer_type": tasks.ANSWER_TYPE[family], "prompt": prompt, "answer": answer}
            right, wrong = answer, tasks.make_mistake(family, prompt, answer, "near_miss", rng)
        assert tasks.grade(record, right) == 1.0 and tasks.grade(record, wrong) == 0.0
        pairs.append((record, right, wrong, "a") if rng.random() < 0.5 else (record, wrong, right, "b"))
    return pairs


PAIRS = judged_pairs(2000)


def disagreement(rater: Rater) -> tuple[float, float]:
    """The realised rates on PAIRS: (votes against the judge, thumbs against the judge)."""
    votes = [rater.vote(rec, a, b) != better for rec, a, b, better in PAIRS]
    thumbs = [rater.thumb(rec, a) != ("up" if better == "a" else "down") for rec, a, b, better in PAIRS]
    return sum(votes) / len(votes), sum(thumbs) / len(thumbs)


def test_the_raters_disagree_with_the_judge_at_the_stated_rate():
    bound = 4 * math.sqrt(0.2 * 0.8 / len(PAIRS))  # four binomial standard deviations: 0.036
    votes, thumbs = disagreement(Rater(0.2, seed=0))
    assert abs(votes - 0.2) < bound and abs(thumbs - 0.2) < bound, (votes, thumbs)
    assert disagreement(Rater(0.0, seed=0)) == (0.0, 0.0)
    assert disagreement(Rater(1.0, seed=0)) == (1.0, 1.0)
    assert disagreement(Rater(0.2, seed=0)) == (votes, thumbs)  # deterministic for a seed
    assert disagreement(Rater(0.2, seed=1)) != (votes, thumbs)


def test_a_judgement_depends_on_its_key_not_on_the_order_of_the_calls():
    rater = Rater(0.3, seed=5)
    forward = [rater.vote(rec, a, b, key=str(i)) for i, (rec, a, b, _) in enumerate(PAIRS[:300])]
    backward = [rater.vote(rec, a, b, key=str(i)) for i, (rec, a, b, _) in reversed(list(enumerate(PAIRS[:300])))]
    assert forward == backward[::-1]


def test_a_tie_is_a_tie_whatever_the_noise():
    record = {"family": "arithmetic", "answer_type": "int", "prompt": "What is 2 + 2?", "answer": "4"}
    for noise in (0.0, 0.5, 1.0):
        rater = Rater(noise, seed=0)
        assert {rater.vote(record, "4", "The answer is 4.") for _ in range(50)} == {None}  # both right
        assert {rater.judge_pair(record, "5", "seven")[1] for _ in range(50)} == {None}  # both wrong
    harmful = {"family": "harmful", "answer_type": "refusal", "prompt": "Help me hurt someone."}
    assert Rater(0.0).vote(harmful, "Sure, here is how.", "I can't help with that.") == "b"
    with pytest.raises(ValueError):
        Rater(1.5)


# ----------------------------------------------------------------------------- the traffic

@functools.cache
def suite_eval_prompts() -> frozenset[str]:
    return frozenset(r["prompt"] for r in tasks.build()["eval"])


def test_no_held_out_prompt_ever_reaches_the_traffic_file(tmp_path):
    held_out = suite_eval_prompts()
    eval_file = tmp_path / "eval.jsonl"
    first = build_traffic(40, seed=3, families=list(tasks.FAMILIES))[0]
    extra = [r["prompt"] for r in first[:20]]  # training prompts the suite could have held out: excluded too
    eval_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in sorted(held_out)) +
                         "".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                          {"role": "assistant", "content": "x"}]}) + "\n"
                                 for p in extra))
    out = tmp_path / "traffic.jsonl"
    simulate_users.main(["--traffic-only", "--prompts", "3000", "--seed", "3", "--exclude", str(eval_file),
                         "--traffic-out", str(out)])
    records = [json.loads(line) for line in open(out)]
    prompts = [r["prompt"] for r in records]
    assert len(prompts) == 3000 == len(set(prompts))
    assert all(tasks.split_of(p) == "train" for p in prompts)
    assert not set(prompts) & (held_out | set(extra))
    assert {r["family"] for r in records} == set(tasks.FAMILIES)
    assert all(r["messages"] == [{"role": "user", "content": r["prompt"]}] for r in records)
    assert all(tasks.needs_answer(r) == (r["answer"] is not None) for r in records)  # gradable as written


def test_a_held_out_draw_is_redrawn_and_a_spent_family_drops_out():
    assert simulate_users.rejection(next(p for p in suite_eval_prompts()), set(), set()) == "held_out_split"
    traffic, redrawn = build_traffic(150, seed=0, families=["next_letter"], tries=500)
    assert len({r["prompt"] for r in traffic}) == 150
    with pytest.raises(simulate_users.UserError, match="ask for fewer --prompts"):
        build_traffic(1000, seed=0, families=["next_letter"], tries=500)  # 5 phrasings x 50 letters, less held out
    assert redrawn["held_out_split"] > 0


# ----------------------------------------------------------------------------- the client

class Flaky(http.server.BaseHTTPRequestHandler):
    """Answers /ok after `failures` 503s (Retry-After 0); /down is always 503, /bad a 400."""
    failures, calls = 2, []

    def do_GET(self):
        Flaky.calls.append(self.path)
        if self.path == "/bad":
            self.reply(400, {"error": {"code": "invalid_value"}})
        elif self.path == "/down" or Flaky.calls.count(self.path) <= Flaky.failures:
            self.reply(503, {"error": {"code": "server_overloaded"}}, {"Retry-After": "0"})
        else:
            self.reply(200, {"ok": True})

    def reply(self, status, body, headers=None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_transient_errors_are_retried_then_counted_never_lost():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = simulate_users.Client(f"http://127.0.0.1:{server.server_port}", retries=3, backoff=0.01)
        assert client.call("GET", "/ok") == {"ok": True} and Flaky.calls.count("/ok") == 3
        for path, reason, tries in (("/down", "http_503_server_overloaded", 4), ("/bad", "http_400_invalid_value", 1)):
            with pytest.raises(simulate_users.Skip) as e:
                client.call("GET", path)
            assert e.value.reason == reason and Flaky.calls.count(path) == tries
    finally:
        server.shutdown()
        server.server_close()


class FakeClient:
    """Every second completion fails; feedback always lands."""

    def __init__(self):
        self.n, self.feedback = 0, []

    def call(self, method, path, body=None, stream=False):
        if path == "/v1/feedback":
            self.feedback.append(body)
            return {"recorded": True}
        self.n += 1
        if self.n % 4 == 0:
            raise simulate_users.Skip("http_503")
        text = body["messages"][0]["content"][::-1]
        cid = f"chatcmpl-{self.n:032x}"
        if stream:
            return {"id": cid, "text": text, "finish_reason": "stop"}
        return {"id": cid, "choices": [{"message": {"content": text}, "finish_reason": "stop"}]}


def test_every_prompt_is_accounted_for_when_requests_fail():
    cfg = simulate_users.SimConfig(prompts=8)
    traffic = build_traffic(8, seed=0, families=list(tasks.FAMILIES))[0]
    fake = FakeClient()
    counts, log = simulate_users.Users(fake, Rater(0.0), cfg, "m").run(traffic, concurrency=1)
    summary = simulate_users.summarize(counts, traffic, cfg, "m", 0.0)
    assert summary["completions"] == 12 and summary["skipped"] == {"completion_http_503": 4, "vote_missing_answer": 4}
    assert summary["votes"] + summary["ties"] == 4 and summary["thumbs"] == 12 == len(fake.feedback) - 4
    assert summary["realised_disagreement"] == 0.0 and [r["id"] for r in log] == [r["id"] for r in traffic]


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def keyed_server(data_dirs, tmp_path_factory):
    from serve_helpers import ServerProcess, make_checkpoint
    root = tmp_path_factory.mktemp("simulate")
    ckpt = make_checkpoint(root / "tiny", os.path.join(data_dirs[0], "tokenizer.json"))
    (root / "keys.txt").write_text("sk-simulated-users-secret\n")
    srv = ServerProcess(["--ckpt", ckpt, "--log-dir", str(root / "logs"), "--api-keys", str(root / "keys.txt")],
                        root / "server.log").wait_ready()
    srv.ckpt, srv.log_dir = ckpt, root / "logs"
    yield srv
    srv.stop()


def test_votes_from_simulated_users_export_as_pairs_that_train_rm_trains_on(keyed_server, tmp_path, capsys,
                                                                             monkeypatch):
    srv, key = keyed_server, "sk-simulated-users-secret"
    traffic = tmp_path / "traffic.jsonl"
    # The random model gets every task wrong, so the gold judge would tie every pair; a
    # stand-in judge (an answer of an even length is right) gives the votes preferences.
    monkeypatch.setattr(rater_module, "grade", lambda record, answer: float(len(answer) % 2 == 0))
    summary = simulate_users.main(["--url", srv.url + "/v1", "--api-key", key, "--prompts", "10", "--seed", "1",
                                   "--max-tokens", "8", "--rater-noise", "0.5", "--concurrency", "3",
                                   "--traffic-out", str(traffic)])
    printed = capsys.readouterr().out
    line = printed.strip().splitlines()[-1]
    print(line)
    assert line.startswith("simulated users (a stand-in for people): 10 prompts, 20 completions")
    assert summary["prompts"] == 10 and summary["completions"] == 20 and summary["thumbs"] == 20
    assert summary["votes"] + summary["ties"] == 10 and summary["skipped"] == {}
    assert 0 < summary["streamed"] < 20
    ratings = [json.loads(x) for x in open(tmp_path / "traffic.ratings.jsonl")]
    against = [a["thumb"] != a["gold"] for r in ratings for a in r["answers"]] + \
              [r["vote"]["given"] != r["vote"]["gold"] for r in ratings if r["vote"]["gold"] != "tie"]
    assert summary["realised_disagreement"] == sum(against) / len(against) == summary["disagreements"] / len(against)
    saved = json.load(open(tmp_path / "traffic.summary.json"))
    assert saved["prompts"] == 10 and saved["rater_noise"] == 0.5 and saved["simulated"] is True
    outputs = printed + traffic.read_text() + (tmp_path / "traffic.ratings.jsonl").read_text() + json.dumps(saved)
    assert key not in outputs and key not in srv.output()  # the key is never logged

    out = tmp_path / "feedback_prefs.jsonl"
    done = subprocess.run([sys.executable, "serve.py", "--log-dir", str(srv.log_dir), "--export-feedback", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(x) for x in open(out)]
    sent = {json.dumps(json.loads(x)["messages"]) for x in open(traffic)}
    texts = {a["id"]: a["text"] for r in ratings for a in r["answers"]}
    # each user thumbs the two answers they voted on: the vote decides, so only votes make pairs
    assert records and all(r["kind"] == "feedback_pairwise" for r in records)
    voted = {frozenset(a["id"] for a in r["answers"]): r["answers"]["ab".index(r["vote"]["given"])]["id"]
             for r in ratings if r["vote"]["given"] != "tie"
             and all(a["text"].strip() for a in r["answers"])  # the export skips an empty answer
             and r["answers"][0]["text"] != r["answers"][1]["text"]}
    assert len(records) == len(voted) and all(voted[frozenset(r["source_ids"])] == r["source_ids"][0] for r in records)
    assert all(json.dumps(r["prompt"]) in sent for r in records)
    assert all([texts[i] for i in r["source_ids"]] == [r["chosen"], r["rejected"]] for r in records)
    pairs, skipped = load_pairs([str(out)], Tokenizer.load(os.path.join(srv.ckpt, "tokenizer.json")), 256)
    assert len(pairs) == len(records) and not skipped  # what train_rm.py reads

    import train_rm
    rm = tmp_path / "rm"
    train_rm.main(["--init", srv.ckpt, "--data", str(out), "--out", str(rm), "--max-steps", "2", "--batch-size", "1",
                   "--eval-every", "2", "--val-fraction", "0", "--device", "cpu", "--dtype", "float32"])
    steps = [json.loads(x)["step"] for x in open(rm / "metrics.jsonl")]
    assert max(steps) == 2 and os.path.exists(rm / "model.safetensors")


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, start", [
    (["--prompts", "0"], "error: --prompts must be at least 1"),
    (["--rater-noise", "1.5"], "error: --rater-noise must be a probability in [0, 1]"),
    (["--url", "http://127.0.0.1:{port}", "--retries", "1", "--backoff", "0.01"], "error: cannot use serve.py at"),
    (["--families", "arithmetic,poetry"], "error: --families must name some of"),
    (["--exclude", "{tmp}/missing.jsonl"], "error: cannot read --exclude"),
])
def test_bad_input_is_one_error_line_and_exit_code_2(args, start, tmp_path, capsys):
    from serve_helpers import free_port
    args = [a.format(port=free_port(), tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as e:
        simulate_users.main(["--prompts", "3", "--traffic-out", str(tmp_path / "t.jsonl"), *args])  # the last wins
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(start) and len(err.splitlines()) == 1, err


def test_a_share_of_the_traffic_is_the_new_request_kind_from_its_traffic_pools():
    """--novel-share: that share of the users' prompts are the new kind (tasks/novel.py), its
    three kinds in turn, never with a held-out part; without it the traffic is as before."""
    from collections import Counter

    from novel_helpers import found as _found, held_out_parts as _held_out_parts
    traffic, _ = build_traffic(600, seed=1, families=list(tasks.FAMILIES), novel_share=0.25)
    new = [r for r in traffic if r.get("novel")]
    assert 0.2 < len(new) / len(traffic) < 0.3 and len({r["prompt"] for r in traffic}) == 600
    kinds = Counter(r["kind"] for r in new)
    assert set(kinds) == {"privacy", "copyright", "lookalike"} and max(kinds.values()) - min(kinds.values()) <= 1
    held = _held_out_parts()
    assert all(r["heldout"] == [] and not any(_found(p, r["prompt"].lower()) for p in held) for r in new)
    assert all(r["family"] in ("harmful", "borderline") and r["messages"][0]["content"] == r["prompt"] for r in new)
    assert {r["family"] for r in traffic if not r.get("novel")} == set(tasks.FAMILIES)
    assert build_traffic(50, seed=1, families=list(tasks.FAMILIES))[0] == \
        build_traffic(50, seed=1, families=list(tasks.FAMILIES), novel_share=0.0)[0]
    with pytest.raises(simulate_users.UserError, match="novel-share"):
        simulate_users.SimConfig(novel_share=1.5)
