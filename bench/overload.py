"""Acknowledgements under overload: trt_bot and aiogram offered twice what they can answer.

    python bench/overload.py              # 3 rounds, 10 s of overload each (about 5 minutes)
    python bench/overload.py --runs 1 --seconds 3 --burst 1500   # a quick look

Same machinery as run.py (the fake Bot API, each bot a real process in webhook
mode, wrk posting distinct /start updates from many chats).  Per bot and round:

1. Capacity: a fresh process gets a burst of /start updates as fast as it
   acknowledges them; capacity is the burst over the time from the first post
   to the last sendMessage reaching the fake (run.py's answered/s).  The CPU
   time the process used over the burst, divided by the replies, is its CPU
   per handled /start: ack path, handler and the Bot API call together.
2. Overload: a fresh process is offered twice that capacity for --seconds
   through paced.lua (100 connections, Telegram's maximum, each waiting
   100 * 1000 / rate ms between posts, so the offered rate barely depends on
   the server while acks stay fast).  wrk reports the ack latencies and acks/s.
3. Drain: the load stops; every acknowledged update must get its reply
   (counted at the fake) within --drain seconds, else the run says how many
   are missing.

Figures are medians over the rounds with min-max; the machine's other load
makes single runs noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from harness import Spread, wait_until
import run

BOTS = ("trt_bot", "aiogram")
CONNECTIONS = 100  # Telegram opens at most 100 connections to one webhook


@dataclasses.dataclass
class Round:
    capacity: float  # answered /start per second in a burst
    cpu_us_per_start: float  # process CPU over the burst / replies
    offered: float  # the rate paced.lua aimed at
    acked_rate: float
    ack_p50_ms: float
    ack_p99_ms: float
    ack_max_ms: float
    errors: int
    unanswered: int  # acknowledged but never answered (after the drain)
    drain_s: float  # end of the load -> last reply


def measure_capacity(bench: run.Bench, key: str, burst: int) -> tuple[float, float]:
    running = bench.start(key)
    try:
        warm_before = bench.botapi.stats()["send_message"]
        warm = bench.wrk_updates(running, "start", 600, script="counted.lua", arg=burst // 5)
        _drain(bench, warm_before, warm.requests - warm.status_errors, 120.0)
        before = bench.botapi.stats()["send_message"]
        cpu_before = running.proc.cpu_seconds()
        started = time.monotonic()
        result = bench.wrk_updates(running, "start", 600, script="counted.lua", arg=burst)
        acked = result.requests - result.status_errors
        if _drain(bench, before, acked, 120.0) is None:
            raise RuntimeError(f"{key}: the capacity burst was not answered within 120 s")
        stats = bench.botapi.stats()
        answered = stats["send_message"] - before
        cpu = running.proc.cpu_seconds() - cpu_before
        return answered / (stats["last_send"] - started), cpu / answered * 1e6
    finally:
        running.stop()


def measure_overload(bench: run.Bench, key: str, rate: float, seconds: int, drain_s: float) -> dict:
    running = bench.start(key)
    delay_ms = CONNECTIONS * 1000 / rate
    try:
        before = bench.botapi.stats()["send_message"]
        result = bench.wrk_updates(running, "start", seconds, script="paced.lua", arg=delay_ms)
        stopped = time.monotonic()
        acked = result.requests - result.status_errors
        waited = _drain(bench, before, acked, drain_s)
        answered = bench.botapi.stats()["send_message"] - before
        return {"acked_rate": result.ok_rate, "ack_p50_ms": result.lat_p50_ms, "ack_p99_ms": result.lat_p99_ms,
                "ack_max_ms": result.lat_max_ms, "errors": result.status_errors + result.socket_errors,
                "unanswered": max(0, acked - answered),
                "drain_s": (bench.botapi.stats()["last_send"] - stopped) if waited is not None else float("nan")}
    finally:
        running.stop()


def _drain(bench: run.Bench, before: int, count: int, timeout: float) -> float | None:
    return wait_until(lambda: bench.botapi.stats()["send_message"] - before >= count, timeout=timeout, interval=0.05)


def _spread(rounds: list[Round], field: str) -> str:
    values = [getattr(r, field) for r in rounds]
    spread = Spread.of(values)
    if spread is None:
        return "-"
    if spread.runs == 1:
        return f"{spread.median:,.1f}"
    return f"{spread.median:,.1f} ({spread.low:,.1f}-{spread.high:,.1f})"


COLUMNS = (("capacity /s", "capacity"), ("CPU µs per /start", "cpu_us_per_start"), ("offered /s", "offered"),
           ("acks/s", "acked_rate"), ("ack p50 ms", "ack_p50_ms"), ("ack p99 ms", "ack_p99_ms"),
           ("ack max ms", "ack_max_ms"), ("errors", "errors"), ("unanswered", "unanswered"),
           ("drain s", "drain_s"))


def render(results: dict[str, list[Round]], args: argparse.Namespace, placement: str) -> str:
    load = f"{args.rate:,.0f} updates/s" if args.rate else f"{args.factor:g}x capacity"
    lines = [f"Overload at {load}, {args.seconds} s, {CONNECTIONS} connections, "
             f"median (min-max) of {args.runs} round(s); {placement}", ""]
    lines.append("| " + " | ".join(["bot", *[title for title, _ in COLUMNS]]) + " |")
    lines.append("|" + "---|" * (len(COLUMNS) + 1))
    for key, rounds in results.items():
        lines.append("| " + " | ".join([key, *[_spread(rounds, field) for _, field in COLUMNS]]) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="seconds of overload per round")
    parser.add_argument("--burst", type=int, default=5000, help="/start updates in the capacity burst")
    parser.add_argument("--factor", type=float, default=2.0, help="offered load as a multiple of capacity")
    parser.add_argument("--rate", type=float, default=0,
                        help="offer this many updates/s to every bot instead (like for like across versions)")
    parser.add_argument("--drain", type=float, default=120.0, help="seconds to wait for every reply")
    parser.add_argument("--bots", default=",".join(BOTS), help="which bots, comma-separated (default: both)")
    parser.add_argument("--compare", action="append", default=[], metavar="PATH",
                        help="another trt_bot.py (e.g. an older version) run in the same rounds (repeatable)")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--trt-env", action="append", default=[], metavar="KEY=VALUE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench_args = run.parse_args(["--no-pin"] if args.no_pin else [])
    bench_args.trt_env = args.trt_env
    plan = dataclasses.replace(run.FULL, connections=CONNECTIONS)
    results: dict[str, list[Round]] = {key: [] for key in args.bots.split(",")}
    with run.Bench(bench_args, plan) as bench:
        for path in args.compare:
            key = f"trt_bot@{path}"
            bench.specs[key] = run.ServerSpec(key, key, (sys.executable, str(Path(path).resolve())), "/health")
            results[key] = []
        for round_no in range(args.runs):
            for key in results:
                capacity, cpu_us = measure_capacity(bench, key, args.burst)
                offered = args.rate or capacity * args.factor
                overload = measure_overload(bench, key, offered, args.seconds, args.drain)
                results[key].append(Round(capacity, cpu_us, offered, **overload))
                print(f"  · round {round_no + 1} {key}: {results[key][-1]}", file=sys.stderr, flush=True)
        print(render(results, args, bench.placement.describe()))
    lost = sum(r.unanswered for rounds in results.values() for r in rounds)
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
