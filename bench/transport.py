"""CPU per Bot API call: httpx's default transport against trt_bot's StreamCalls.

    python bench/transport.py                 # 3 rounds of 5,000 calls per transport, then start-up and RSS
    python bench/transport.py --calls 1000 --runs 1

Per transport and round, a fresh child process (uvloop, as trt_bot runs)
imports trt_bot (timed), then sends
``--calls`` sendMessage calls with the /start reply through trt_bot's own
TelegramClient to the fake Bot API (bench/fakes.py, another process), from 4
concurrent callers, after a warm-up of 200.  It reports its CPU time (user + system, all threads) over the calls
divided by the calls, the time importing trt_bot took on top of httpx, and its
RSS at the end.  "default" is httpx.AsyncClient as it comes; "streams" is
trt_bot.bot_http_client, the client the bot uses (StreamCalls under httpx).  The
fake runs on another CPU when there are two, as in run.py.

Then trt_bot itself (this tree's, and any --compare PATH) is started the way
run.py starts it: seconds from spawn to the first 200 from /health (and the
CPU time it had used by then, which other load on the machine barely moves),
and RSS once idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import REPO_DIR, Placement, read_rss_kib, start_fake

TRANSPORTS = ("default", "streams")
TOKEN = "123456789:AAbenchmarkTOKEN_for_a_fake_bot_api_0123"
CALLERS = 4
WARMUP_CALLS = 200


def child(transport: str, base: str, calls: int) -> dict:
    """Runs in its own process: nothing of the client stack is imported before it starts timing."""
    import httpx
    import uvloop
    sys.path.insert(0, str(REPO_DIR))
    started = time.perf_counter()
    import trt_bot
    imported_s = time.perf_counter() - started

    def client() -> httpx.AsyncClient:
        if transport == "streams":
            return trt_bot.bot_http_client([base])  # what the bot uses
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        return httpx.AsyncClient(timeout=trt_bot.TELEGRAM_TIMEOUT, limits=limits)

    async def main() -> float:
        async with client() as http:
            # Unpaced (Telegram's 1 message a second per chat would make this bench last an hour): the stack alone.
            telegram = trt_bot.TelegramClient(TOKEN, base, http, send_limits=(1e6, 0.0, 10**9))
            menu = trt_bot.main_menu("en")
            text = trt_bot.TEXTS["en"]["start"]

            async def caller(count: int) -> None:
                for _ in range(count):
                    await telegram.send_message(42, text, menu)

            await asyncio.gather(*(caller(WARMUP_CALLS // CALLERS) for _ in range(CALLERS)))
            cpu_before = time.process_time()
            await asyncio.gather(*(caller(calls // CALLERS) for _ in range(CALLERS)))
            return time.process_time() - cpu_before

    cpu = uvloop.run(main())
    return {"cpu_us_per_call": cpu / (calls // CALLERS * CALLERS) * 1e6, "import_ms": imported_s * 1000,
            "rss_mib": read_rss_kib(os.getpid()) / 1024}


def measure_calls(transport: str, base: str, calls: int, cpus: frozenset[int] | None) -> dict:
    argv = [sys.executable, __file__, "--child", transport, "--base", base, "--calls", str(calls)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    if done.returncode != 0:
        raise RuntimeError(f"{transport} child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_start(bench: Any, key: str) -> dict:  # a run.Bench
    running = bench.start(key)
    try:
        cpu_s = running.proc.cpu_seconds()  # unlike ready_s, barely moved by other load on the machine
        time.sleep(1.0)  # settle: start-up tasks done, the first lease renewal in
        return {"ready_s": running.ready_s, "cpu_s": cpu_s, "rss_mib": running.proc.rss_mib()}
    finally:
        running.stop()


def _median(rows: list[dict], field: str, digits: int = 1) -> str:
    values = [row[field] for row in rows]
    if len(values) == 1:
        return f"{values[0]:,.{digits}f}"
    return f"{statistics.median(values):,.{digits}f} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--compare", action="append", default=[], metavar="PATH",
                        help="another trt_bot.py whose start-up and RSS to show too (repeatable)")
    parser.add_argument("--child", choices=TRANSPORTS, help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.base, args.calls)))
        return 0
    import run  # imports trt_bot, so not in the children
    placement = Placement.choose(pin=True)
    calls: dict[str, list[dict]] = {t: [] for t in TRANSPORTS}
    starts: dict[str, list[dict]] = {}
    with run.Bench(run.parse_args([]), run.QUICK) as bench:
        fake = start_fake("botapi", [], placement.tools, bench.log_dir)
        try:
            for _ in range(args.runs):
                for transport in TRANSPORTS:
                    calls[transport].append(measure_calls(transport, fake.base, args.calls, placement.server))
        finally:
            fake.proc.stop()
        keys = ["trt_bot"]
        for path in args.compare:
            key = f"trt_bot@{path}"
            bench.specs[key] = run.ServerSpec(key, key, (sys.executable, str(Path(path).resolve())), "/health")
            keys.append(key)
        for _ in range(args.runs):
            for key in keys:
                starts.setdefault(key, []).append(measure_start(bench, key))
    print(f"{args.calls} sendMessage calls per round from {CALLERS} callers, median (min-max) of {args.runs}; "
          f"{placement.describe()}\n")
    print("| transport | CPU µs per call | trt_bot import ms | RSS MiB after the calls |")
    print("|---|---|---|---|")
    for transport, rows in calls.items():
        print(f"| {transport} | {_median(rows, 'cpu_us_per_call')} | {_median(rows, 'import_ms')} | "
              f"{_median(rows, 'rss_mib')} |")
    print("\n| bot | spawn -> /health 200 (s) | CPU s by then | RSS idle MiB |")
    print("|---|---|---|---|")
    for key, rows in starts.items():
        print(f"| {key} | {_median(rows, 'ready_s', 2)} | {_median(rows, 'cpu_s', 2)} | {_median(rows, 'rss_mib')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
