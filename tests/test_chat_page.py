"""The chat page's compare flow in headless Chromium, through nginx in front of two serve.py
replicas that share one store: two answers to one message side by side, a vote for the
better one (or a tie), recorded whichever replica served the answers and the vote.

CHAT_COMPARE_PNG=docs/chat_compare.png also saves the screenshot of the compare view that
docs/serving.md shows."""
from __future__ import annotations

import os
import shutil

import pytest

from serve_helpers import chromium, nginx_cluster
from serve_helpers import make_checkpoint, metric, metrics

SCREENSHOT_SIZE = (1000, 380)


@pytest.fixture(scope="module")
def shared_cluster(data_dirs, tmp_path_factory):
    """(url, replicas, log_dir): two replicas behind nginx, one store in log_dir/serve.db."""
    root = tmp_path_factory.mktemp("chat_page")
    ckpt = make_checkpoint(root / "tiny", os.path.join(data_dirs[0], "tokenizer.json"))
    with nginx_cluster(ckpt, root, log_dir=root / "logs") as (url, replicas):
        yield url, replicas, root / "logs"


def test_compare_two_answers_and_vote_through_nginx_and_two_replicas(shared_cluster, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from serving.store import SQLiteStore
    url, replicas, log_dir = shared_cluster
    shot = tmp_path / "chat_compare.png"
    browser = chromium(tmp_path / "profile", SCREENSHOT_SIZE)
    shown = []  # per comparison: (ids of A and B, their texts, the confirmation shown)
    try:
        browser.get(url + "/")
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "model").text == "tiny-step7")
        box = browser.find_element(By.ID, "max_tokens")
        box.clear()
        box.send_keys("24")
        assert browser.find_element(By.ID, "temperature").get_attribute("value") == "0.7"  # sampled: answers differ
        for n, (prompt, vote) in enumerate((("Which play is the best?", "vote-a"), ("Who wrote it?", "vote-tie"))):
            browser.find_element(By.ID, "input").send_keys(prompt)
            browser.find_element(By.ID, "compare").click()
            done = WebDriverWait(browser, 90).until(
                lambda b: b.find_elements(By.CSS_SELECTOR, ".compare[data-done]")[n:])[0]
            assert done.get_attribute("data-done") == "1", done.text
            answers = [done.find_element(By.CSS_SELECTOR, f".answer-{x}") for x in "ab"]
            assert [a.find_element(By.TAG_NAME, "h3").text for a in answers] == ["Answer A", "Answer B"]
            ids = [a.get_attribute("data-completion-id") for a in answers]
            texts = [a.find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent") for a in answers]
            buttons = done.find_elements(By.CSS_SELECTOR, ".vote button")
            assert [b.text for b in buttons] == ["\u25c0 A is better", "= Tie", "\u25b6 B is better"]
            assert all(b.get_attribute("textContent").strip() for b in buttons)
            done.find_element(By.CSS_SELECTOR, "." + vote).click()
            status = done.find_element(By.CSS_SELECTOR, ".vote .status")
            WebDriverWait(browser, 30).until(lambda b: status.text.startswith("recorded:"))
            assert all(not b.is_enabled() for b in buttons)  # one vote per comparison
            shown.append((ids, texts, status.text))
            if n == 0:
                assert browser.save_screenshot(str(shot))
    finally:
        browser.quit()

    store = SQLiteStore(str(log_dir / "serve.db"))
    try:
        votes = [r for r in store.feedback_records() if r["type"] == "pairwise"]
        served, status = store.served_chats(), store.request_status()
    finally:
        store.close()
    (ids_a, texts_a, said_a), (ids_b, texts_b, said_b) = shown
    assert [(v["ids"], v["preferred"]) for v in votes] == [(ids_a, ids_a[0]), (ids_b, None)]
    assert said_a == f"recorded: A is better ({votes[0]['feedback_id']})"
    assert said_b == f"recorded: Tie ({votes[1]['feedback_id']})"
    for ids, texts, prompt in ((ids_a, texts_a, "Which play is the best?"), (ids_b, texts_b, "Who wrote it?")):
        assert ids[0] != ids[1] and all(status[i] == "complete" for i in ids)
        assert [served[i]["completion"] for i in ids] == texts  # the page showed what the store kept
        assert all(served[i]["messages"][-1] == {"role": "user", "content": prompt} for i in ids)
    assert served[ids_b[0]]["messages"][:-1] == [{"role": "user", "content": "Which play is the best?"},
                                                 {"role": "assistant", "content": texts_a[0]}]  # A won: kept
    snaps = [metrics(r.url) for r in replicas]
    assert all(metric(s, "serve:request_success_total") >= 1 for s in snaps)  # both replicas served
    assert sum(metric(s, "serve:feedback_total", rating="pairwise") for s in snaps) == 1
    assert sum(metric(s, "serve:feedback_total", rating="tie") for s in snaps) == 1

    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000
    if os.environ.get("CHAT_COMPARE_PNG"):
        shutil.copyfile(shot, os.environ["CHAT_COMPARE_PNG"])
