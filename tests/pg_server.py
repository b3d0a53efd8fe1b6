"""A throwaway PostgreSQL server for the serving store's tests (tests/conftest.py's
`postgres` fixture): initdb into a fresh temporary directory, listen on one loopback port
(127.0.0.1 only; the unix socket in that directory too), trust authentication for one test
role, fsync off. Stopped (pg_ctl stop -m fast) and deleted at the end of the session.

PostgreSQL refuses to run as root, and CI runs as root: then initdb and pg_ctl run as the
`postgres` system user (`runuser -u postgres --`) in a directory it owns. That directory is
made with tempfile under /tmp, not under pytest's per-user tmp root, which is private (0700)
to root. Debian's `postgresql` package (.ci/run installs it) puts the binaries under
/usr/lib/postgresql/VERSION/bin; elsewhere they are found on PATH."""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time

ROLE = "serve_test"


def find_bin() -> str | None:
    """The directory holding initdb and pg_ctl (the newest Debian version first), or None."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda d: [int(p) if p.isdigit() else 0 for p in d.split("/")[-2].split(".")], reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    for d in candidates:
        if all(os.access(os.path.join(d, exe), os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def why_unavailable() -> str | None:
    """None when a server can be started here, otherwise the reason it cannot."""
    if importlib.util.find_spec("psycopg") is None:
        return 'psycopg is not installed (pip install "psycopg[binary]": requirements-dev.txt)'
    if find_bin() is None:
        return "PostgreSQL is not installed (apt-get install -y postgresql; .ci/run does)"
    if os.geteuid() == 0:
        import pwd
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root without runuser (util-linux) to run PostgreSQL as 'postgres'"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """start() -> a running server; url(db) -> a psycopg URL; new_database() -> the URL of an
    empty database; stop() -> stopped and its directory removed (stop_server() and
    start_server() stop and restart the process alone, as a database outage would)."""

    def __init__(self):
        self.bin = find_bin()
        self.root = tempfile.mkdtemp(prefix="pgtest-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self.port = 0
        self.as_root = os.geteuid() == 0
        self.databases = 0
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, exe: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [os.path.join(self.bin, exe), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, cwd=self.root, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = open(self.log, errors="replace").read()[-2000:] if os.path.exists(self.log) else ""
            raise RuntimeError(f"{exe} {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}{log}")
        return done

    def start(self) -> "PostgresServer":
        self._run("initdb", "-D", self.data, "-U", ROLE, "--auth=trust", "--encoding=UTF8", "--locale=C",
                  "--no-sync")
        for attempt in range(3):  # the port is free when picked; another process may take it first
            self.port = _free_port()
            try:
                self.start_server()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                time.sleep(0.5)
        return self

    def start_server(self) -> None:
        """Start (or restart, on the same port) the server process."""
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "60", "start")

    def stop_server(self) -> None:
        """Stop the server process, keeping its data (start_server() brings it back)."""
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")

    def url(self, db: str = "postgres", password: str = "") -> str:
        auth = f"{ROLE}:{password}" if password else ROLE
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def new_database(self, password: str = "") -> str:
        """A fresh, empty database on this server: its URL (with `password` in it, which trust
        authentication ignores: for tests that it is never printed)."""
        import psycopg
        self.databases += 1
        name = f"serve{self.databases}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name, password)

    def stop(self) -> None:
        try:
            self.stop_server()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
