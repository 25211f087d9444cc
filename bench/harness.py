"""Plumbing for run.py: processes, CPU pinning, wrk, the fakes' control routes, statistics.

Nothing here knows what a figure is; run.py composes these pieces.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WRK_DIR = BENCH_DIR / "wrk"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- CPU placement ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Placement:
    """Which CPUs the server under test gets, and which the load generator, fakes and this script share."""

    server: frozenset[int] | None
    tools: frozenset[int] | None

    @classmethod
    def choose(cls, pin: bool) -> "Placement":
        cpus = sorted(os.sched_getaffinity(0))
        if not pin or len(cpus) < 2:
            return cls(None, None)
        return cls(frozenset(cpus[:1]), frozenset(cpus[1:]))

    def describe(self) -> str:
        if self.server is None:
            return "no pinning: every process may run on every CPU"
        return (f"server under test pinned to CPU {_cpus(self.server)}; wrk, the fakes and the orchestrator "
                f"pinned to CPU {_cpus(self.tools)} (taskset-style, via sched_setaffinity)")


def _cpus(cpus: frozenset[int] | None) -> str:
    return ",".join(str(c) for c in sorted(cpus or ()))


# -- processes ------------------------------------------------------------------------

class Proc:
    """A child process with its log file, pinned to ``cpus``, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 cpus: frozenset[int] | None = None, log_path: Path, cwd: Path | None = None,
                 stdout_pipe: bool = False):
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(
            list(argv), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log, stderr=self._log,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_mib(self) -> float:
        return read_rss_kib(self.pid) / 1024

    def cpu_seconds(self) -> float:
        return read_cpu_seconds(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 8.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
        return self.popen.returncode


def read_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def read_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- HTTP for control and readiness --------------------------------------------------------

def http_request(port: int, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def http_json(port: int, method: str, path: str, timeout: float = 5.0) -> Any:
    status, body = http_request(port, method, path, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"{method} {path} on port {port} answered {status}")
    return json.loads(body)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.005) -> float | None:
    """Seconds until ``predicate()`` is truthy, or None after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if predicate():
                return time.monotonic() - started
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(interval)
    return None


class FakeClient:
    """The control routes of a fake from fakes.py."""

    def __init__(self, proc: Proc, port: int):
        self.proc, self.port = proc, port
        self.base = f"http://127.0.0.1:{port}"

    def stats(self) -> dict:
        return http_json(self.port, "GET", "/__stats")

    def reset(self) -> None:
        http_json(self.port, "POST", "/__reset")

    def seen(self, lo: int, hi: int) -> dict[int, float]:
        return {int(k): v for k, v in http_json(self.port, "GET", f"/__seen?lo={lo}&hi={hi}").items()}

    def release(self) -> None:
        http_json(self.port, "POST", "/__release")


def start_fake(kind: str, extra: Sequence[str], cpus: frozenset[int] | None, log_dir: Path) -> FakeClient:
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "fakes.py"), kind, "--port", str(port), *extra]
    proc = Proc(f"fake-{kind}", argv, cpus=cpus, log_path=log_dir / f"fake-{kind}-{port}.log")
    fake = FakeClient(proc, port)
    if wait_until(lambda: fake.stats() is not None, 10.0) is None:
        proc.stop()
        raise RuntimeError(f"fake {kind} did not start:\n{proc.log_tail()}")
    return fake


# -- wrk ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class WrkResult:
    requests: int
    seconds: float
    status_errors: int
    socket_errors: int
    lat_p50_ms: float
    lat_p99_ms: float
    lat_max_ms: float
    cpu_seconds: float  # wrk's own CPU time

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def ok_rate(self) -> float:
        return (self.requests - self.status_errors) / self.seconds if self.seconds else 0.0


def wrk_version() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        return "not installed"
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout
    return out.split("[")[0].strip().removeprefix("wrk ") or "?"


def run_wrk(url: str, script: str, script_args: Iterable[Any], *, connections: int, seconds: float,
            cpus: frozenset[int] | None, threads: int = 1, timeout_s: float = 10.0) -> WrkResult:
    """Run wrk once (it takes whole seconds); a script that prints WRK_LIMIT (counted.lua) is interrupted then."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, math.ceil(seconds))}s", f"--timeout={timeout_s:g}s",
            "-s", str(WRK_DIR / script), url, "--", *[str(a) for a in script_args]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    summary = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("WRK_LIMIT"):
            proc.send_signal(signal.SIGINT)
        elif line.startswith("WRK_JSON "):
            summary = json.loads(line[len("WRK_JSON "):])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if summary is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
    return WrkResult(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        status_errors=summary.get("status_errors", 0),
        socket_errors=sum(summary.get(k, 0) for k in ("connect_errors", "read_errors", "write_errors", "timeouts")),
        lat_p50_ms=summary["lat_p50_us"] / 1000,
        lat_p99_ms=summary["lat_p99_us"] / 1000,
        lat_max_ms=summary.get("lat_max_us", 0) / 1000,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
    )


# -- statistics ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Spread:
    """The median of several runs with their min and max."""

    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread | None":
        values = [v for v in values if v is not None]
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]
