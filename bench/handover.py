"""How long a standby takes to become the active instance: after SIGTERM of the holder, and after kill -9.

    python bench/handover.py                     # 5 rounds per case, LEASE_TTL_S=15 (the default)
    python bench/handover.py --rounds 3 --ttl 6
    python bench/handover.py --database-url postgresql://user:password@127.0.0.1/trt_bot

Two trt_bot processes in webhook mode share one database (a fresh SQLite file
per round unless --database-url is given), against bench/fakes.py's fake Bot
API.  The first one becomes active; once the second is healthy (a standby),
the first is stopped and the time until the second's /diag/lock says
"active" is measured, polled every 5 ms.  Cases:

  sigterm          a deploy: SIGTERM; the holder finishes its work and releases
                   the lease, which the standby's next peek finds
  kill -9, same    the holder killed; the standby is in its PID namespace and
  namespace        sees that the holder's process is gone at its next claim
  kill -9, other   the holder killed in a PID namespace of its own (another
  namespace        container, as on Render): the standby cannot tell it is
                   gone and waits for the lease to expire (at most LEASE_TTL_S
                   and a claim interval; the holder renews every third of it)

The last case needs ``unshare --pid`` (util-linux, and the permission to use
it); it is left out, with the reason, when that fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import REPO_DIR, Proc, free_port, http_request, start_fake, wait_until

sys.path.insert(0, str(REPO_DIR))
import trt_bot  # noqa: E402  (for PASSIVE_RETRY_S)

TOKEN = "123456789:AAbenchmarkTOKEN_for_a_fake_bot_api_0123"
UNSHARE_PID = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")
START_TIMEOUT_S = 30.0


def lock(port: int) -> dict:
    status, body = http_request(port, "GET", "/diag/lock", timeout=1.0)
    return json.loads(body) if status == 200 else {}


def start_bot(env: dict[str, str], work_dir: Path, wrapper: tuple[str, ...], name: str) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(name, [*wrapper, sys.executable, str(REPO_DIR / "trt_bot.py")], env={**env, "PORT": str(port)},
                cwd=work_dir, log_path=work_dir / f"{name}.log")
    if wait_until(lambda: http_request(port, "GET", "/health")[0] == 200, START_TIMEOUT_S) is None:
        proc.stop()
        raise RuntimeError(f"{name} did not become healthy:\n{proc.log_tail()}")
    return proc, port


def run_round(case: str, env: dict[str, str], work_dir: Path, ttl: float) -> float:
    """Seconds from stopping the holder to the standby reporting itself active."""
    wrapper = UNSHARE_PID if case == "kill -9, other namespace" else ()
    holder, holder_port = start_bot(env, work_dir, wrapper, "holder")
    standby = None
    try:
        if wait_until(lambda: lock(holder_port).get("active"), ttl + START_TIMEOUT_S) is None:
            raise RuntimeError(f"the first instance never became active:\n{holder.log_tail()}")
        standby, standby_port = start_bot(env, work_dir, wrapper, "standby")
        if lock(standby_port).get("active"):
            raise RuntimeError("both instances are active")
        holder.popen.send_signal(signal.SIGTERM if case == "sigterm" else signal.SIGKILL)
        took = wait_until(lambda: lock(standby_port).get("active"), ttl + 10.0)
        if took is None:
            raise RuntimeError(f"the standby did not take over:\n{standby.log_tail()}")
        return took
    finally:
        holder.stop()
        if standby is not None:
            standby.stop()


def why_other_namespaces_are_unavailable() -> str:
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    tried = subprocess.run([*UNSHARE_PID, "true"], capture_output=True, text=True, timeout=10)
    return "" if tried.returncode == 0 else f"unshare --pid is not permitted here: {tried.stderr.strip()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ttl", type=float, default=15.0, help="LEASE_TTL_S")
    parser.add_argument("--database-url", default="", help="a shared database (default: a fresh SQLite file per round)")
    args = parser.parse_args(argv)
    cases = ["sigterm", "kill -9, same namespace", "kill -9, other namespace"]
    unavailable = why_other_namespaces_are_unavailable()
    if unavailable:
        cases.pop()
    root = Path(tempfile.mkdtemp(prefix="trt-handover-"))
    botapi = start_fake("botapi", [], None, root)
    results: dict[str, list[float]] = {case: [] for case in cases}
    try:
        for round_no in range(args.rounds):
            for case in cases:
                work_dir = Path(tempfile.mkdtemp(prefix="round-", dir=root))
                env = {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_BASE": botapi.base, "BOT_MODE": "webhook",
                       "WEBHOOK_BASE_URL": "https://bench.example.com", "HOST": "127.0.0.1", "LOG_LEVEL": "WARNING",
                       "DATABASE_URL": args.database_url or f"sqlite:///{work_dir / 'trt_bot.sqlite3'}",
                       "LEASE_TTL_S": f"{args.ttl:g}", "SINGLE_MODEL_ONLY": "1", "PYTHONPATH": str(REPO_DIR)}
                took = run_round(case, env, work_dir, args.ttl)
                results[case].append(took)
                print(f"round {round_no + 1}: {case:25} {took * 1000:8.0f} ms", file=sys.stderr)
    finally:
        botapi.proc.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nstandby active after (LEASE_TTL_S={args.ttl:g}, claims every {trt_bot.PASSIVE_RETRY_S:g} s, "
          f"peeks every {trt_bot.LEASE_PEEK_S:g} s; {args.database_url.partition(':')[0] or 'sqlite'}; "
          f"{args.rounds} rounds)")
    print(f"{'case':25}  {'median ms':>9}  {'max ms':>8}")
    for case, times in results.items():
        print(f"{case:25}  {statistics.median(times) * 1000:9.0f}  {max(times) * 1000:8.0f}")
    if unavailable:
        print(f"kill -9, other namespace: not measured ({unavailable})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
