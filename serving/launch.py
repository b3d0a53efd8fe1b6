"""serve.py (or llama.cpp's llama-server) as a subprocess, for the main job's feedback stage
and the benchmarks and checks that talk to it over HTTP: started on a free loopback port
with the options given, ready once /health answers. Standard library only (no httpx): the
main job needs nothing beyond requirements.txt."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

from cli import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python serve.py --host 127.0.0.1 --port P ARGS...`, its output in `log_path`;
    the constructor returns once /health answers 200 (UserError if it exits or takes
    longer than `timeout_s`). `stop()` ends it. `command` replaces serve.py with another
    server that takes --host/--port and answers /health (LlamaServerProcess)."""

    name = "serve.py"

    def __init__(self, args: list[str], log_path: str, timeout_s: float = 300.0, command: list[str] | None = None,
                 port: int | None = None, wait: bool = True):
        """With wait=False it returns at once: start several, then wait_ready() on each."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = str(log_path)
        self.timeout_s = timeout_s
        command = command or [sys.executable, os.path.join(REPO, "serve.py")]
        self.command = [*command, "--host", "127.0.0.1", "--port", str(self.port), *args]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout_s: float | None = None) -> "ServeProcess":
        """Return once /health answers 200; UserError if the server exits or takes longer."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise UserError(f"{self.name} exited with {self.proc.returncode}: {self.output()}")
            try:
                with opener.open(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:  # not listening yet, or a 503 while loading (HTTPError is an OSError)
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"{self.name} did not start within {timeout_s:.0f} s: {self.output()}")
            time.sleep(0.3)

    def output(self, tail: int | None = 2000) -> str:
        """What the server printed (its last `tail` characters; None: all of it)."""
        with open(self.log, errors="replace") as f:
            text = f.read()
        return text if tail is None else text[-tail:]

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class LlamaServerProcess(ServeProcess):
    """llama.cpp's `llama-server -m GGUF` on CPU (-ngl 0) with `slots` parallel sequences of
    `context` tokens each (continuous batching on), the GGUF's chat template (--jinja)."""

    name = "llama-server"

    def __init__(self, binary: str, gguf: str, log_path: str, context: int, slots: int = 1, threads: int = 2,
                 timeout_s: float = 120.0):
        super().__init__(["-m", gguf, "-c", str(context * slots), "-np", str(slots), "--cont-batching",
                          "--threads", str(threads), "--jinja", "-ngl", "0"], log_path, timeout_s, command=[binary])
