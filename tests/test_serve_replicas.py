"""Scale-out: two serve.py replicas behind nginx (deploy/nginx.conf) on loopback, sharing one
store: once the SQLite file of a shared --log-dir, once a PostgreSQL database (--db, on
tests/pg_server.py's throwaway server). nginx runs as the test's user with its own prefix
and config in a temporary directory, and tells the test which replica answered (an
X-Upstream header added to the rendered config only).

Whichever replica served a completion, a vote on it is accepted through either and
exported; a key's request limit holds across both replicas; a key blocked through one is
blocked on the other; text the API accepts round-trips exactly; a replica killed with a
request in flight leaves that request's row 'incomplete', every other row intact, and
every later request succeeds on the survivor."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from serve_helpers import REPO, ServerProcess, make_checkpoint, metric, metrics, start_nginx, stop_nginx, wait_for

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

RPM = 40  # --rate-limit-rpm: requests per minute per key, on both replicas together
KEYS = {name: f"sk-replicas-{name}" for name in ("votes", "odd", "rate", "abuse", "kill")}
PASSWORD = "hunter2-replicas"  # in the PostgreSQL URL (trust authentication ignores it); never printed
ODD = ("nul\x00 emoji 😀👩\u200d👩\u200d👧 rtl שלום \u200fمرحبا combining e\u0301a\u0327 "
       "noncharacters \uffff\U0010ffff controls \x01\x7f \u2028 quotes \" \\ end")


class Cluster:
    """The nginx URL, the replicas, and how to reach their shared store."""

    def __init__(self, kind: str, url: str, replicas: list[ServerProcess], store_args: list[str]):
        self.kind, self.url, self.replicas, self.store_args = kind, url, replicas, store_args

    def store(self):
        from serving.store import open_store
        args = dict(zip(self.store_args[::2], self.store_args[1::2]))
        return open_store(args.get("--db", ""), args["--log-dir"])

    def client(self, key: str, url: str | None = None):
        return openai.OpenAI(base_url=(url or self.url) + "/v1", api_key=KEYS[key], max_retries=0, timeout=120)

    def post(self, path: str, key: str, body, url: str | None = None) -> httpx.Response:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        return httpx.post((url or self.url) + path, headers={"Authorization": f"Bearer {KEYS[key]}",
                                                             "Content-Type": "application/json"}, timeout=120, **kw)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cluster(request, data_dirs, tmp_path_factory):
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    root = tmp_path_factory.mktemp(f"replicas-{request.param}")
    if request.param == "sqlite":  # one --log-dir, so one serve.db
        store_args = [["--log-dir", str(root / "logs")]] * 2
    else:  # one database; each replica's own --log-dir, so nothing is shared through files
        db = request.getfixturevalue("postgres").new_database(password=PASSWORD)
        store_args = [["--db", db, "--log-dir", str(root / f"logs{i}")] for i in range(2)]
    ckpt = make_checkpoint(root / "tiny", os.path.join(data_dirs[0], "tokenizer.json"))
    (root / "keys.txt").write_text("\n".join(KEYS.values()) + "\n")
    common = ["--ckpt", ckpt, "--api-keys", str(root / "keys.txt"), "--rate-limit-rpm", str(RPM),
              "--abuse-max-flags", "2", "--threads", "1"]
    replicas = [ServerProcess(common + store_args[i], root / f"replica{i}.log") for i in range(2)]
    proxy = None
    try:
        for r in replicas:
            r.wait_ready()
        proxy, url = start_nginx(root / "nginx", replicas)
        wait_for(proxy, url)
        yield Cluster(request.param, url, replicas, store_args[0])
    finally:
        if proxy is not None:
            stop_nginx(proxy)
        for r in replicas:
            r.stop()


def served(replica) -> float:
    return metric(metrics(replica.url), "serve:request_success_total")


def upstream(r: httpx.Response) -> str:
    """The replica (host:port) that answered through nginx."""
    return r.headers["x-upstream"].split(",")[-1].strip()


def chat(cluster, key: str, messages: list[dict], **params) -> tuple[dict, str]:
    """(the chat completion, the replica that served it), through nginx."""
    r = cluster.post("/v1/chat/completions", key, {"model": cluster.model, "messages": messages, **params})
    assert r.status_code == 200, r.text
    return r.json(), upstream(r)


@pytest.fixture(scope="module", autouse=True)
def model_name(cluster):
    cluster.model = cluster.client("votes").models.list().data[0].id


# ----------------------------------------------------------------------------- the tests (in this order)

def test_votes_count_whichever_replica_served_and_all_are_exported(cluster, tmp_path):
    if cluster.kind == "postgres":  # the URL's password is in neither replica's output
        assert all("hunter2" not in r.output() and ":***@" in r.output() for r in cluster.replicas)
    prompts = [[{"role": "user", "content": f"Which play is the best, {who}?"}]
               for who in ("Ann", "Bob", "Cy", "Di", "Ed", "Flo")]
    answers, by = [], {}
    for p in prompts:
        pair = []
        for seed in (5, 6):
            body, replica = chat(cluster, "votes", p, temperature=1.0, seed=seed, max_tokens=12, ignore_eos=True)
            pair.append(body)
            by[body["id"]] = replica
        texts = [c["choices"][0]["message"]["content"] for c in pair]
        assert texts[0] != texts[1] and all(t.strip() for t in texts)
        answers.append(pair)
    assert len(set(by.values())) == 2, by  # both replicas served completions

    votes = [{"ids": [a["id"], b["id"]], "preferred": b["id"]} for a, b in answers[:4]]
    for a, b in answers[4:]:
        votes += [{"id": a["id"], "rating": "up"}, {"id": b["id"], "rating": "down", "comment": "meh"}]
    crossed = 0
    for vote in votes:
        r = cluster.post("/v1/feedback", "votes", vote)
        assert r.status_code == 200 and r.json()["recorded"], r.text
        crossed += any(by[i] != upstream(r) for i in vote.get("ids", [vote.get("id")]))
    assert crossed >= 2  # votes on completions that the other replica served

    out = tmp_path / "prefs.jsonl"
    done = subprocess.run([sys.executable, "serve.py", *cluster.store_args, "--export-feedback", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout + done.stderr
    records = [json.loads(line) for line in open(out)]
    text = lambda c: c["choices"][0]["message"]["content"]  # noqa: E731
    want = {(json.dumps(p), text(b), text(a), "feedback_pairwise") for p, (a, b) in zip(prompts[:4], answers[:4])}
    want |= {(json.dumps(p), text(a), text(b), "feedback_thumbs") for p, (a, b) in zip(prompts[4:], answers[4:])}
    assert len(records) == 6
    assert {(json.dumps(r["prompt"]), r["chosen"], r["rejected"], r["kind"]) for r in records} == want


def test_odd_text_round_trips_through_the_api_and_lone_surrogates_are_refused(cluster, tmp_path):
    messages = [{"role": "system", "content": ODD}, {"role": "user", "content": ODD[::-1].replace("\u200d", "")}]
    pair = [chat(cluster, "odd", messages, temperature=1.0, seed=s, max_tokens=16, ignore_eos=True)[0]
            for s in (3, 4)]
    ids = [c["id"] for c in pair]
    vote = {"ids": ids, "preferred": ids[0], "comment": ODD * 20}
    assert cluster.post("/v1/feedback", "odd", vote).status_code == 200
    store = cluster.store()
    try:
        chats = store.served_chats()
        for c in pair:
            assert chats[c["id"]]["messages"] == messages
            assert chats[c["id"]]["completion"] == c["choices"][0]["message"]["content"]
        assert [f for f in store.feedback_records() if f.get("ids") == ids][0]["comment"] == ODD * 20
        rows = len(store.request_status())
        for path, raw in (("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": '
                                                    b'"a \\ud800 b"}]}' % cluster.model.encode()),
                          ("/v1/feedback", b'{"id": "%s", "rating": "up", "comment": "\\udfff"}' % ids[0].encode())):
            r = cluster.post(path, "odd", raw)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_unicode", r.text
        assert len(store.request_status()) == rows  # refused at the door: no row
    finally:
        store.close()
    out = tmp_path / "prefs.jsonl"
    done = subprocess.run([sys.executable, "serve.py", *cluster.store_args, "--export-feedback", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    mine = [r for r in map(json.loads, open(out, encoding="utf-8")) if r["source_ids"] == ids]
    assert len(mine) == 1 and mine[0]["prompt"] == messages
    assert mine[0]["chosen"] == pair[0]["choices"][0]["message"]["content"]


def test_a_key_gets_its_request_limit_across_both_replicas(cluster):
    """3 x RPM requests from 4 threads, spread by nginx over both replicas: RPM of them pass,
    plus what the bucket refills (RPM/60 a second) while they run."""
    before = [metric(metrics(r.url), "serve:rate_limited_requests_total", reason="requests")
              for r in cluster.replicas]
    codes: list[int] = []
    lock = threading.Lock()

    def ask(n):
        with httpx.Client(headers={"Authorization": f"Bearer {KEYS['rate']}"}, timeout=60) as c:
            for _ in range(n):
                status = c.get(cluster.url + "/v1/models").status_code
                with lock:
                    codes.append(status)
    start = time.monotonic()
    threads = [threading.Thread(target=ask, args=(3 * RPM // 4,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    refill = int(elapsed * RPM / 60)
    assert len(codes) == 3 * RPM and set(codes) <= {200, 429}
    assert RPM <= codes.count(200) <= RPM + refill, (codes.count(200), elapsed)
    assert refill <= 2, f"the burst took {elapsed:.1f} s: too slow to test the limit tightly"
    after = [metric(metrics(r.url), "serve:rate_limited_requests_total", reason="requests")
             for r in cluster.replicas]
    assert all(a > b for a, b in zip(after, before))  # both replicas refused some


def test_a_key_blocked_through_one_replica_is_blocked_on_the_other(cluster):
    first, other = cluster.replicas
    for _ in range(2):  # --abuse-max-flags 2
        with pytest.raises(openai.BadRequestError) as e:
            cluster.client("abuse", first.url).chat.completions.create(
                model=cluster.model, messages=[{"role": "user", "content": "you are a fucking idiot"}])
        assert e.value.code == "content_filter"
    for url in (other.url, cluster.url):
        with pytest.raises(openai.RateLimitError) as e:  # blocked, even for a clean request
            cluster.client("abuse", url).chat.completions.create(
                model=cluster.model, messages=[{"role": "user", "content": "Hello"}], max_tokens=2)
        assert e.value.code == "key_blocked" and int(e.value.response.headers["retry-after"]) > 60
    assert metric(metrics(other.url), "serve:rate_limited_requests_total", reason="blocked") >= 1


def snapshot(cluster) -> tuple[dict, dict]:
    store = cluster.store()
    try:
        return store.request_status(), store.served_chats()
    finally:
        store.close()


def test_kill_a_replica_in_flight_leaves_its_row_incomplete_and_the_rest_intact(cluster):
    """Last: it kills a replica."""
    replicas = cluster.replicas
    client = cluster.client("kill")
    ask = dict(model=cluster.model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=8,
               temperature=0)
    first = [client.chat.completions.create(**ask).choices[0].message.content for _ in range(4)]
    assert len(set(first)) == 1  # same weights, same greedy answer, whichever replica served

    # a stream in flight: read its first chunk, then kill the replica that is generating it
    outcome = {}
    started = threading.Event()

    def long_stream():
        try:
            stream = client.chat.completions.create(**{**ask, "max_tokens": 1000}, stream=True,
                                                    extra_body={"ignore_eos": True})
            n = 0
            for chunk in stream:
                outcome.setdefault("id", chunk.id)
                n += 1
                started.set()
            outcome["result"] = f"completed after {n} chunks"
        except (openai.APIError, httpx.HTTPError) as e:
            outcome["result"] = e
        finally:
            started.set()

    t = threading.Thread(target=long_stream, daemon=True)
    t.start()
    assert started.wait(60) and "id" in outcome
    busy = [r for r in replicas if metric(metrics(r.url), "serve:num_requests_running") == 1]
    assert len(busy) == 1, "the stream should be running on exactly one replica"
    victim, survivor = busy[0], next(r for r in replicas if r is not busy[0])
    status_before, chats_before = snapshot(cluster)
    assert status_before[outcome["id"]] == "incomplete"
    victim.proc.kill()  # SIGKILL: no graceful shutdown
    victim.proc.wait()
    t.join(timeout=90)
    assert not t.is_alive(), "the in-flight request hung"
    assert isinstance(outcome["result"], Exception), outcome["result"]
    assert not isinstance(outcome["result"], (openai.APITimeoutError, httpx.TimeoutException))

    before = served(survivor)
    later = []
    for i in range(6):
        if i % 2:
            chunks = list(client.chat.completions.create(**ask, stream=True))
            later.append("".join(c.choices[0].delta.content or "" for c in chunks))
        else:
            later.append(client.chat.completions.create(**ask).choices[0].message.content)
    assert later == first[:1] * 6
    assert served(survivor) - before == 6

    status_after, chats_after = snapshot(cluster)
    assert status_after[outcome["id"]] == "incomplete"  # the killed request: admitted, never finished
    assert {k: v for k, v in status_after.items() if k in status_before} == status_before  # the rest unchanged
    assert {k: v for k, v in chats_after.items() if k in chats_before} == chats_before
    new = set(status_after) - set(status_before)
    assert len(new) == 6 and all(status_after[k] == "complete" for k in new)
    if cluster.kind == "sqlite":
        import sqlite3
        with sqlite3.connect(os.path.join(cluster.store_args[1], "serve.db")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
