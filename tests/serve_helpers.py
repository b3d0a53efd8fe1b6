"""Helpers for the serving tests that run more than one process: serve.py replicas behind
nginx (deploy/nginx.conf) on loopback, and headless Chromium through Selenium."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import pytest

from test_serve import CHROMIUM_FLAGS, ServerProcess

httpx = pytest.importorskip("httpx")


@contextmanager
def nginx_cluster(ckpt: str, root, n: int = 2, log_dir=None, args: tuple = ()):
    """(url, replicas): `n` serve.py replicas of `ckpt` behind nginx, which runs as the
    test's user with its prefix and config under `root`. With `log_dir` the replicas share
    it, and so one store (LOG_DIR/serve.db); without, each has its own."""
    from test_serve_replicas import start_nginx, stop_nginx, wait_for
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
