"""Scale-out: two serve.py replicas behind nginx (deploy/nginx.conf) on loopback. nginx runs
as the test's user with its own prefix and config in a temporary directory. Both replicas
take traffic; one is killed with a request in flight: that request ends in an error (never
a hang), and every later request succeeds on the survivor."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest

from test_serve import REPO, ServerProcess, free_port, make_checkpoint, metric, metrics

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


def render_nginx_conf(listen: int, replicas: list[int]) -> str:
    """deploy/nginx.conf with our ports: the listen line and one server line per replica."""
    with open(os.path.join(REPO, "deploy", "nginx.conf")) as f:
        conf = f.read()
    assert "least_conn;" in conf and "proxy_buffering off;" in conf and "max_fails=" in conf
    line = re.search(r"^ *server 127\.0\.0\.1:\d+ (max_fails=.*;)$", conf, re.M)
    servers = "".join(f"        server 127.0.0.1:{p} {line.group(1)}\n" for p in replicas)
    conf = re.sub(r"(^ *server 127\.0\.0\.1:\d+ max_fails=.*;\n)+", servers, conf, count=1, flags=re.M)
    conf = re.sub(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{listen};", conf)
    if os.geteuid() == 0:
        conf = "user root;\n" + conf  # a root master would hand the workers to 'nobody'
    return conf


@pytest.fixture(scope="module")
def cluster(data_dirs, tmp_path_factory):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    root = tmp_path_factory.mktemp("replicas")
    ckpt = make_checkpoint(root / "tiny", os.path.join(data_dirs[0], "tokenizer.json"))
    replicas = [ServerProcess(["--ckpt", ckpt, "--log-dir", str(root / f"logs{i}")], root / f"replica{i}.log")
                for i in range(2)]
    prefix = root / "nginx"
    for d in ("logs", "tmp"):
        (prefix / d).mkdir(parents=True)
    port = free_port()
    (prefix / "nginx.conf").write_text(render_nginx_conf(port, [r.port for r in replicas]))
    proxy = subprocess.Popen([nginx, "-p", str(prefix), "-e", "logs/error.log", "-c", str(prefix / "nginx.conf"),
                              "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for r in replicas:
            r.wait_ready()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proxy.poll() is None, proxy.stderr.read().decode()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "nginx did not come up"
            time.sleep(0.2)
        yield url, replicas
    finally:
        proxy.send_signal(signal.SIGQUIT)
        try:
            proxy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
        for r in replicas:
            r.stop()


def served(replica) -> float:
    return metric(metrics(replica.url), "serve:request_success_total")


def test_kill_a_replica_in_flight_errors_then_all_requests_succeed(cluster):
    url, replicas = cluster
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    ask = dict(model=model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=8,
               temperature=0)
    first = [client.chat.completions.create(**ask).choices[0].message.content for _ in range(4)]
    assert len(set(first)) == 1  # same weights, same greedy answer, whichever replica served
    assert all(served(r) >= 1 for r in replicas)  # least_conn spread the load over both

    # a stream in flight: read its first chunk, then kill the replica that is generating it
    outcome = {}
    started = threading.Event()

    def long_stream():
        try:
            stream = client.chat.completions.create(**{**ask, "max_tokens": 1000}, stream=True,
                                                    extra_body={"ignore_eos": True})
            n = 0
            for _ in stream:
                n += 1
                started.set()
            outcome["result"] = f"completed after {n} chunks"
        except (openai.APIError, httpx.HTTPError) as e:
            outcome["result"] = e
        finally:
            started.set()

    t = threading.Thread(target=long_stream, daemon=True)
    t.start()
    assert started.wait(60)
    busy = [r for r in replicas if metric(metrics(r.url), "serve:num_requests_running") == 1]
    assert len(busy) == 1, "the stream should be running on exactly one replica"
    victim, survivor = busy[0], next(r for r in replicas if r is not busy[0])
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
