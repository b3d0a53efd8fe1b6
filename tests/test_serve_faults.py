"""serve.py when its store fails, and who may do what: real `python serve.py` processes on
127.0.0.1 with faults injected from the test — the SQLite file locked by another
connection (BEGIN IMMEDIATE, as `sqlite3 serve.db` would), a full file system (a tmpfs of a
few hundred KB, where the test may mount one), a server killed right after it acknowledged
votes — and clients that rate other keys' completions, change their vote, or send
X-Forwarded-For headers to pick their own identity."""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import threading
import time
import uuid

import pytest

from serve_helpers import MESSAGES, ServerProcess, make_checkpoint, metric, metrics

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "tiny-step7"


@pytest.fixture(scope="module")
def ckpt(data_dirs, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("faults") / "tiny", os.path.join(data_dirs[0], "tokenizer.json"))


def chat(url: str, key: str = "none", **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60)


def vote(url: str, key: str, body: dict) -> httpx.Response:
    return httpx.post(url + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def store_rows(log_dir, sql: str, params=()) -> list[tuple]:
    conn = sqlite3.connect(os.path.join(log_dir, "serve.db"), timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


class HeldLock:
    """The serving store's write lock, taken by another connection (BEGIN IMMEDIATE) until
    release(): what an operator's `sqlite3 serve.db` in a transaction does to the server."""

    def __init__(self, log_dir):
        self.conn = sqlite3.connect(os.path.join(log_dir, "serve.db"), isolation_level=None, timeout=30)
        self.conn.execute("BEGIN IMMEDIATE")
        self.held = True

    def release(self) -> None:
        if self.held:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.held = False


# ----------------------------------------------------------------------------- a locked store

@pytest.fixture(scope="module")
def srv(ckpt, tmp_path_factory):
    """An open server whose store calls give up after half a second."""
    root = tmp_path_factory.mktemp("locked")
    s = ServerProcess(["--ckpt", ckpt, "--log-dir", str(root / "logs"), "--store-timeout-s", "0.5",
                       "--threads", "1"], root / "server.log").wait_ready()
    s.log_dir = root / "logs"
    yield s
    s.stop()


def test_a_locked_store_fails_only_what_needs_it_and_readiness_follows(srv):
    assert httpx.get(srv.url + "/ready", timeout=30).status_code == 200
    first = chat(srv.url)
    assert first.status_code == 200
    lock = HeldLock(srv.log_dir)
    try:
        # Several requests that need the store at once, and liveness beside them. Before the
        # store went off the event loop, the first of them froze the whole replica for the
        # database's 30 s busy timeout, /health included (the 10 s timeouts here failed).
        answers = {}

        def ask(name, call):
            try:
                answers[name] = call()
            except httpx.HTTPError as e:
                answers[name] = e
        calls = {"chat": lambda: chat(srv.url), "feedback": lambda: vote(srv.url, "none", {
                     "id": first.json()["id"], "rating": "up"}),
                 "ready": lambda: httpx.get(srv.url + "/ready", timeout=10)}
        threads = [threading.Thread(target=ask, args=item) for item in calls.items()]
        for t in threads:
            t.start()
        health = [httpx.get(srv.url + "/health", timeout=10) for _ in range(3)]
        for t in threads:
            t.join(60)
        assert lock.held  # every answer came while the database was still locked
        assert [h.status_code for h in health] == [200] * 3
        for name in ("chat", "feedback"):
            r = answers[name]
            assert isinstance(r, httpx.Response) and r.status_code == 503, (name, r)
            assert r.json()["error"]["code"] == "store_unavailable" and int(r.headers["retry-after"]) >= 1
        assert answers["ready"].status_code == 503 and answers["ready"].json()["status"] == "store unavailable"
        models = httpx.get(srv.url + "/v1/models", timeout=10)  # needs the rate-limit bucket: 503 too
        assert models.status_code == 503
    finally:
        lock.release()
    deadline = time.monotonic() + 30  # and back, without a restart
    while httpx.get(srv.url + "/ready", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "readiness did not come back"
        time.sleep(0.2)
    assert chat(srv.url).status_code == 200


def test_a_stream_whose_final_write_fails_ends_with_an_error_event_then_done(srv):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 900, "ignore_eos": True, "stream": True}
    lock = None
    try:
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            events = []
            for line in filter(None, r.iter_lines()):
                events.append(line)
                if lock is None:  # generating: now the store goes away under the stream
                    lock = HeldLock(srv.log_dir)
        cid = json.loads(events[0][len("data: "):])["id"]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][len("data: "):])
        assert error["error"]["code"] == "store_unavailable" and "choices" not in error
        assert not any('"finish_reason":"length"' in e.replace(" ", "") for e in events)  # never told it completed
        assert lock.held  # the error came while the lock was held
    finally:
        if lock is not None:
            lock.release()
    deadline = time.monotonic() + 30  # once the store answers again, the row says why
    while True:
        rows = store_rows(srv.log_dir, "SELECT status, record FROM requests WHERE id = ?", (cid,))
        if rows and rows[0][0] != "incomplete":
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    status, record = rows[0]
    assert status == "error" and json.loads(record)["error"].startswith("store_unavailable")


def test_the_openai_client_sees_the_cut_stream_as_an_error(srv):
    client = srv.client()
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=900, stream=True,
                                            extra_body={"ignore_eos": True})
    lock = None
    try:
        with pytest.raises(openai.APIError, match="could not be recorded"):
            for _ in stream:
                if lock is None:
                    lock = HeldLock(srv.log_dir)
    finally:
        if lock is not None:
            lock.release()


def test_a_non_streamed_completion_is_not_delivered_unrecorded(srv):
    """The final row fails: 503, never a 200 whose request the store does not hold."""
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 900, "ignore_eos": True}
    result = {}
    t = threading.Thread(target=lambda: result.update(r=httpx.post(srv.url + "/v1/chat/completions", json=body,
                                                                   timeout=60)))
    t.start()
    deadline = time.monotonic() + 30
    while metric(metrics(srv.url), "serve:num_requests_running") < 1:  # admitted: its row is written
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lock = HeldLock(srv.log_dir)
    try:
        t.join(60)
        assert lock.held
    finally:
        lock.release()
    assert result["r"].status_code == 503 and result["r"].json()["error"]["code"] == "store_unavailable"


# ----------------------------------------------------------------------------- durability

def _mount_tmpfs(path, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def test_no_acknowledged_vote_is_lost_when_the_disk_fills(ckpt, tmp_path):
    """Votes posted while the file system under the store fills up: each gets a 200 or a 503,
    and every 200 is in the store afterwards (read from a fresh connection, the server gone)."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "640k"):
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    srv = None
    try:
        srv = ServerProcess(["--ckpt", ckpt, "--log-dir", str(disk / "logs"), "--store-timeout-s", "2",
                             "--threads", "1", "--rate-limit-rpm", "0", "--rate-limit-tpm", "0"],
                            tmp_path / "server.log").wait_ready()
        ids = [chat(srv.url).json()["id"] for _ in range(4)]
        acked, refused, filler, full = [], 0, 0, False
        for i in range(400):
            r = vote(srv.url, "none", {"id": ids[i % len(ids)], "rating": "up" if i % 2 else "down",
                                       "comment": f"vote {i} " + "x" * 300})
            assert r.status_code in (200, 503), r.text
            if r.status_code == 200:
                acked.append(r.json()["id"])
            else:
                assert r.json()["error"]["code"] == "store_unavailable"
                refused += 1
            if not full:  # eat the free space a block at a time
                try:
                    with open(disk / f"filler{filler}", "wb") as f:
                        f.write(os.urandom(16384))
                    filler += 1
                except OSError:
                    full = True
            if full and refused >= 5:
                break
        assert full and refused >= 5, (full, refused)  # the fault really hit
        assert acked  # and some votes went in before it did
    finally:
        if srv is not None:
            srv.stop()
    try:
        stored = {json.loads(r)["feedback_id"] for (r,) in store_rows(disk / "logs", "SELECT record FROM feedback")}
        assert set(acked) <= stored, f"{len(set(acked) - stored)} acknowledged votes lost"
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_no_acknowledged_vote_is_lost_when_the_server_is_killed(ckpt, tmp_path):
    srv = ServerProcess(["--ckpt", ckpt, "--log-dir", str(tmp_path / "logs"), "--threads", "1",
                         "--rate-limit-rpm", "0"], tmp_path / "server.log").wait_ready()
    try:
        cid = chat(srv.url).json()["id"]
        acked = [vote(srv.url, "none", {"id": cid, "rating": "up"}).json()["id"] for _ in range(20)]
        srv.proc.kill()  # SIGKILL right after the last 200: no shutdown, no flush
        srv.proc.wait()
    finally:
        srv.stop()
    stored = {json.loads(r)["feedback_id"] for (r,) in store_rows(tmp_path / "logs", "SELECT record FROM feedback")}
    assert set(acked) <= stored
    mode = stat.S_IMODE(os.stat(tmp_path / "logs" / "serve.db").st_mode)
    assert mode == 0o600, oct(mode)  # every prompt and completion is in it: the owner's only


# ----------------------------------------------------------------------------- whose feedback

@pytest.fixture(scope="module")
def keyed(ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("owners")
    (root / "keys.txt").write_text("sk-alice\nsk-bob\n")
    s = ServerProcess(["--ckpt", ckpt, "--log-dir", str(root / "logs"), "--api-keys", str(root / "keys.txt"),
                       "--threads", "1"], root / "server.log").wait_ready()
    s.log_dir = root / "logs"
    yield s
    s.stop()


def test_feedback_belongs_to_the_key_that_got_the_completion(keyed, tmp_path):
    a1, a2 = (chat(keyed.url, "sk-alice", temperature=1.0, max_tokens=8).json()["id"] for _ in range(2))
    r = vote(keyed.url, "sk-bob", {"id": a1, "rating": "down"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"
    r = vote(keyed.url, "sk-bob", {"ids": [a1, a2], "preferred": a1})
    assert r.status_code == 403
    # alice changes her mind: the later vote on the same two completions replaces the first
    assert vote(keyed.url, "sk-alice", {"ids": [a1, a2], "preferred": a1}).status_code == 200
    assert vote(keyed.url, "sk-alice", {"ids": [a2, a1], "preferred": a2}).status_code == 200
    texts = dict(store_rows(keyed.log_dir, "SELECT id, record FROM requests WHERE id IN (?, ?)", (a1, a2)))
    completion = {cid: json.loads(rec)["completion"] for cid, rec in texts.items()}
    out = tmp_path / "pairs.jsonl"
    done = subprocess.run([os.sys.executable, "serve.py", "--log-dir", str(keyed.log_dir), "--export-feedback",
                           str(out)], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    # the tiny model samples at temperature 1: an empty or repeated answer is a counted skip, not a pair
    if "" in completion.values():
        assert pairs == [] and "empty_completion 1" in done.stdout
    elif completion[a1] == completion[a2]:
        assert pairs == [] and "same_text 1" in done.stdout
    else:
        assert [(p["chosen"], p["rejected"]) for p in pairs] == [(completion[a2], completion[a1])]
    assert "replaced_by_a_later_vote 1" in done.stdout


def test_feedback_on_what_cannot_be_exported_is_refused(keyed):
    text = httpx.post(keyed.url + "/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 3},
                      headers={"Authorization": "Bearer sk-alice"}, timeout=60)
    r = vote(keyed.url, "sk-alice", {"id": text.json()["id"], "rating": "up"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "completion_not_rateable"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", keyed.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": "Bearer sk-alice"}, timeout=60) as s:
        cid = json.loads(next(s.iter_lines())[len("data: "):])["id"]
    deadline = time.monotonic() + 30  # the client left: the row ends as aborted
    while store_rows(keyed.log_dir, "SELECT status FROM requests WHERE id = ?", (cid,)) != [("aborted",)]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = vote(keyed.url, "sk-alice", {"id": cid, "rating": "up"})
    assert r.status_code == 409 and "aborted" in r.json()["error"]["message"]
    unknown = vote(keyed.url, "sk-alice", {"id": "chatcmpl-" + uuid.uuid4().hex, "rating": "up"})
    assert unknown.status_code == 404


def test_aborted_rows_and_the_abort_metric_agree(keyed):
    before = metric(metrics(keyed.url), "serve:request_success_total", finished_reason="abort")
    rows_before = len(store_rows(keyed.log_dir, "SELECT id FROM requests WHERE status = 'aborted'"))
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 40, "stream": True, "ignore_eos": True}
    for _ in range(6):  # some leave while generating, some as it ends
        with httpx.stream("POST", keyed.url + "/v1/chat/completions", json=body,
                          headers={"Authorization": "Bearer sk-bob"}, timeout=60) as s:
            next(s.iter_lines())
    deadline = time.monotonic() + 30
    while True:
        rows = len(store_rows(keyed.log_dir, "SELECT id FROM requests WHERE status = 'aborted'")) - rows_before
        counted = metric(metrics(keyed.url), "serve:request_success_total", finished_reason="abort") - before
        running = metric(metrics(keyed.url), "serve:num_requests_running")
        if rows == counted and running == 0 and rows > 0:
            break
        assert time.monotonic() < deadline, (rows, counted)
        time.sleep(0.1)


# ----------------------------------------------------------------------------- identity

def test_forwarded_headers_count_only_from_trusted_proxies(ckpt, tmp_path):
    untrusted = ServerProcess(["--ckpt", ckpt, "--log-dir", str(tmp_path / "a"), "--rate-limit-rpm", "3",
                               "--threads", "1"], tmp_path / "a.log")
    trusted = ServerProcess(["--ckpt", ckpt, "--log-dir", str(tmp_path / "b"), "--rate-limit-rpm", "3",
                             "--threads", "1", "--forwarded-allow-ips", "127.0.0.1"], tmp_path / "b.log")
    try:
        for srv in (untrusted.wait_ready(), trusted.wait_ready()):
            srv.codes = [httpx.get(srv.url + "/v1/models", headers={"X-Forwarded-For": f"203.0.113.{i}"},
                                   timeout=30).status_code for i in range(6)]
        assert untrusted.codes == [200] * 3 + [429] * 3  # one identity, whatever the header says
        assert trusted.codes == [200] * 6  # behind a proxy it trusts, each client its own
        keys = {k for (k,) in store_rows(tmp_path / "b", "SELECT name FROM buckets")}
        assert len(keys) == 6 and not any("203.0.113" in k for k in keys)
    finally:
        untrusted.stop()
        trusted.stop()


# ----------------------------------------------------------------------------- small things

def test_request_shapes_the_openai_spec_allows_and_refuses(srv):
    r = chat(srv.url, max_completion_tokens=None, max_tokens=3, ignore_eos=True)  # a null newer name: the older counts
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r = chat(srv.url, stream=True, stream_options=[])
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    card = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]
    assert card["root"] == "tiny" and "/" not in json.dumps(card)  # no filesystem path


def test_the_chat_page_leaves_out_the_oldest_turns_when_the_context_is_full(data_dirs, tmp_path):
    """A model with a 160-token context and the page's 64-token replies: by the third long
    message the whole history no longer fits, and the page sends the newest turns instead
    of showing context_length_exceeded."""
    from serve_helpers import chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    small = make_checkpoint(tmp_path / "small", os.path.join(data_dirs[0], "tokenizer.json"), max_seq_len=160)
    srv = ServerProcess(["--ckpt", small, "--log-dir", str(tmp_path / "logs"), "--threads", "1"],
                        tmp_path / "server.log").wait_ready()
    browser = chromium(tmp_path / "profile")
    try:
        browser.get(srv.url + "/")
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "model").text == "small-step7")
        box = browser.find_element(By.ID, "temperature")
        box.clear()
        box.send_keys("0")
        message = "Tell me about the king and the queen and the castle by the sea, and the long winter there."
        for turn in range(1, 5):
            browser.find_element(By.ID, "input").send_keys(f"{turn}. {message}")
            browser.find_element(By.ID, "send").click()
            WebDriverWait(browser, 60).until(
                lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1'], .assistant.error")) == turn)
        errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".assistant.error")]
        assert not errors, errors
        notes = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".assistant .meta .info")]
        assert "left out to fit the context" not in notes[0] and "left out to fit the context" in notes[-1], notes
    finally:
        browser.quit()
        srv.stop()
    rows = [json.loads(r) for (r,) in store_rows(tmp_path / "logs", "SELECT record FROM requests ORDER BY created")]
    assert len(rows[-1]["messages"]) < 2 * 4 - 1 and rows[-1]["messages"][-1]["content"].startswith("4. ")
