"""A throwaway PostgreSQL server for the benchmark, with fsync on: durability comparable to SQLite's synchronous=FULL.

The tests' server (conftest.py's PostgresTestServer) turns fsync and
full_page_writes off to save time, and conftest imports pytest, which the
benchmark's environment need not have; so this is a small equivalent with the
server's durable defaults.  It runs Debian's binaries (or the ones on PATH),
initdb into a temporary folder, as the ``postgres`` user when this runs as root
(the server refuses to run as root), TCP on a free 127.0.0.1 port, password
authentication.  Each trt_bot run gets a database of its own.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from typing import Any

from harness import CLOCK_TICKS, free_port

USER = "trt_bench"
PASSWORD = "bench-postgres-password-7c2e91"  # a throwaway cluster's, on 127.0.0.1 only
START_DEADLINE_S = 60.0  # initdb'd clusters start in about a second; a slow disk may take much longer
STOP_DEADLINE_S = 60.0
# The server's durability settings, stated rather than left to defaults: every commit is flushed (fsync) before
# it is reported, and torn pages are protected, as SQLite's synchronous=FULL in WAL mode flushes before the 200.
DURABLE = ("fsync=on", "synchronous_commit=on", "full_page_writes=on")


def bin_dir() -> str | None:
    """The folder holding initdb and postgres: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    initdb = shutil.which("initdb")
    candidates = [os.path.dirname(os.path.realpath(initdb))] if initdb else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in ("initdb", "postgres")):
            return folder
    return None


def unavailable_reason() -> str | None:
    """Why the PostgreSQL rows cannot run here, or None when they can."""
    if bin_dir() is None:
        return "PostgreSQL server binaries (initdb, postgres) not found: apt-get install postgresql"
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed: pip install 'psycopg[binary]'"
    return None


class BenchPostgres:
    """One cluster for a benchmark run: ``start()``, ``new_database_url()`` per trt_bot run, ``remove()``."""

    def __init__(self, binaries: str, cpus: frozenset[int] | None):
        self.binaries, self.cpus = binaries, cpus
        self.root = tempfile.mkdtemp(prefix="trt-bench-pg-")
        self.data, self.log_path = os.path.join(self.root, "data"), os.path.join(self.root, "server.log")
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self._databases = 0
        self._as: dict[str, Any] = (
            {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {})

    def url(self, database: str) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """initdb, then start the server and wait until it takes connections (an error, with its log, if not)."""
        password_file = os.path.join(self.root, "password")
        with open(password_file, "w", encoding="ascii") as f:
            f.write(PASSWORD)
        if self._as:
            shutil.chown(self.root, "postgres")
            shutil.chown(password_file, "postgres")
        subprocess.run([os.path.join(self.binaries, "initdb"), "-D", self.data, "-U", USER,
                        f"--pwfile={password_file}", "-A", "scram-sha-256", "-E", "UTF8", "--locale=C"],
                       check=True, capture_output=True, text=True, timeout=120, cwd=self.root, **self._as)
        settings = [arg for setting in DURABLE for arg in ("-c", setting)]
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [os.path.join(self.binaries, "postgres"), "-D", self.data, "-p", str(self.port), "-k", self.root,
                 "-c", "listen_addresses=127.0.0.1", *settings],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root,
                preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None, **self._as)
        deadline = time.monotonic() + START_DEADLINE_S
        while not self._accepts_connections():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the PostgreSQL server did not start:\n{self.log()[-2000:]}")
            time.sleep(0.05)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _accepts_connections(self) -> bool:
        import psycopg
        try:
            psycopg.connect(self.url("postgres"), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole server so far: the postmaster, its live processes (backends,
        WAL writer, checkpointer ...) and, through the postmaster's children times, those that have exited."""
        total = 0
        for stat_path in glob.glob("/proc/[0-9]*/stat"):
            try:
                with open(stat_path) as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it exited meanwhile
            pid, parent = int(stat_path.split("/")[2]), int(fields[1])
            if pid == self.process.pid:
                total += sum(int(f) for f in fields[11:15])
            elif parent == self.process.pid:
                total += int(fields[11]) + int(fields[12])
        return total / CLOCK_TICKS

    def admin(self, sql: str, database: str = "postgres") -> list[tuple]:
        import psycopg
        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def new_database_url(self) -> str:
        """A DATABASE_URL for a new, empty database; the cluster is checkpointed first, so the previous run's
        dirty pages are written now and not during this run (as run.py syncs the disk before each start)."""
        self._databases += 1
        name = f"trt_bench_{self._databases}"
        self.admin(f'CREATE DATABASE "{name}"')
        self.admin("CHECKPOINT")
        return self.url(name)

    def inbox_rows(self, database_url: str) -> int:
        return self.admin("SELECT count(*) FROM inbox", urllib.parse.urlsplit(database_url).path.lstrip("/"))[0][0]

    def drop(self, database_url: str) -> None:
        name = urllib.parse.urlsplit(database_url).path.lstrip("/")
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def remove(self) -> None:
        """Stop at once (SIGQUIT: the cluster is deleted, no checkpoint is worth waiting for) and delete it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_DEADLINE_S)
        self.process = None
        shutil.rmtree(self.root, ignore_errors=True)
