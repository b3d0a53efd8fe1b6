"""serve.py as a subprocess, for the benchmarks and checks that talk to it over HTTP:
started on a free loopback port with the options given, ready once /health answers."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from cli import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python serve.py --host 127.0.0.1 --port P ARGS...`, its output in `log_path`;
    the constructor returns once /health answers 200 (UserError if it exits or takes
    longer than `timeout_s`). `stop()` ends it."""

    def __init__(self, args: list[str], log_path: str, timeout_s: float = 300.0):
        import httpx
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = log_path
        with open(log_path, "w") as out:
            self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), "--host", "127.0.0.1",
                                          "--port", self.url.rsplit(":", 1)[1], *args],
                                         stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise UserError(f"serve.py exited: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"serve.py did not start within {timeout_s:.0f} s")
            time.sleep(0.3)

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()[-2000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
