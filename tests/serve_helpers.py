"""Helpers shared by the serving tests: serve.py as a subprocess (serving/launch.py's
ServeProcess, started without waiting so replicas start together), the /metrics reader, a
tiny random checkpoint, and for the tests that run more than one process: replicas behind
nginx (deploy/nginx.conf) on loopback, and headless Chromium through Selenium."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager

import pytest

from serving.launch import ServeProcess, free_port  # noqa: F401 (free_port for the tests)

httpx = pytest.importorskip("httpx")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGES = [{"role": "user", "content": "Tell me a story."}]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


class ServerProcess(ServeProcess):
    """`python serve.py --host 127.0.0.1 --port P ARGS` until stop(); output in a log file.
    It returns at once: wait_ready() waits for /health."""

    def __init__(self, args: list[str], log_path, port: int | None = None):
        super().__init__(args, str(log_path), timeout_s=120.0, port=port, wait=False)

    def output(self, tail: int | None = None) -> str:
        return super().output(tail)

    def client(self, key: str = "none", timeout: float = 120.0):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=timeout)


def metrics(url: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample on /metrics."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(snapshot: dict, name: str, **labels) -> float:
    """The sum over samples of `name` whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in snapshot.items() if n == name and want <= ls)


def make_checkpoint(out, tokenizer_path: str, step: int = 7, max_seq_len: int = 1024) -> str:
    """A randomly initialized model saved as a checkpoint. Wide init (std 0.2) so greedy text
    is varied rather than one repeated token, and a long context so streams can run long."""
    import torch

    import checkpoint

    import distributed
    from data.text.tokenizer import Tokenizer
    from model import ModelConfig, Transformer
    tok = Tokenizer.load(tokenizer_path)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                                    max_seq_len=max_seq_len, init_std=0.2))
    os.makedirs(out, exist_ok=True)
    checkpoint.save_checkpoint(str(out), model, None, distributed.Env(0, 0, 1, torch.device("cpu")), stage="test", step=step,
                            train_config={}, trainer_state={}, tokenizer_path=tokenizer_path)
    return str(out)


def render_nginx_conf(listen: int, replicas: list[int]) -> str:
    """deploy/nginx.conf with our ports (the listen line, one server line per replica) and
    an X-Upstream response header naming the replica that answered."""
    with open(os.path.join(REPO, "deploy", "nginx.conf")) as f:
        conf = f.read()
    assert "least_conn;" in conf and "proxy_buffering off;" in conf and "max_fails=" in conf
    line = re.search(r"^ *server 127\.0\.0\.1:\d+ (max_fails=.*;)$", conf, re.M)
    servers = "".join(f"        server 127.0.0.1:{p} {line.group(1)}\n" for p in replicas)
    conf = re.sub(r"(^ *server 127\.0\.0\.1:\d+ max_fails=.*;\n)+", servers, conf, count=1, flags=re.M)
    conf = re.sub(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{listen};", conf)
    conf = conf.replace("proxy_pass http://serve_replicas;",
                        "proxy_pass http://serve_replicas;\n            add_header X-Upstream $upstream_addr always;")
    if os.geteuid() == 0:
        conf = "user root;\n" + conf  # a root master would hand the workers to 'nobody'
    return conf


def start_nginx(prefix, replicas: list[ServerProcess]):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    for d in ("logs", "tmp"):
        (prefix / d).mkdir(parents=True)
    port = free_port()
    (prefix / "nginx.conf").write_text(render_nginx_conf(port, [r.port for r in replicas]))
    proxy = subprocess.Popen([nginx, "-p", str(prefix), "-e", "logs/error.log", "-c", str(prefix / "nginx.conf"),
                              "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proxy, f"http://127.0.0.1:{port}"


def stop_nginx(proxy) -> None:
    proxy.send_signal(signal.SIGQUIT)  # graceful: let open streams finish
    try:
        proxy.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proxy.kill()
        proxy.wait()


def wait_for(proxy, url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proxy.poll() is None, proxy.stderr.read().decode()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "nginx did not come up"
        time.sleep(0.2)


@contextmanager
def nginx_cluster(ckpt: str, root, n: int = 2, log_dir=None, args: tuple = ()):
    """(url, replicas): `n` serve.py replicas of `ckpt` behind nginx, which runs as the
    test's user with its prefix and config under `root`. With `log_dir` the replicas share
    it, and so one store (LOG_DIR/serve.db); without, each has its own."""
    if not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        pytest.skip("nginx is not installed (apt-get install -y nginx)")
    replicas = [ServerProcess(["--ckpt", ckpt, "--log-dir", str(log_dir or root / f"logs{i}"), *args],
                              root / f"replica{i}.log") for i in range(n)]
    proxy, url = start_nginx(root / "nginx", replicas)
    try:
        for r in replicas:
            r.wait_ready()
        wait_for(proxy, url)
        yield url, replicas
    finally:
        stop_nginx(proxy)
        for r in replicas:
            r.stop()


def chromium(profile_dir, window_size: tuple[int, int] = (1000, 700)):
    """A headless Chromium driven by Selenium with a `window_size` viewport (skips the test
    when either is missing); the caller quits it."""
    browser = shutil.which("chromium")
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if browser is None or not os.path.exists(driver_path):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile_dir}", "--window-size={},{}".format(*window_size),
                                  "--hide-scrollbars"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    width, height = window_size  # the page's viewport exactly, so screenshots have this size
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    return driver
