"""How long the garbage collector stops trt_bot's event loop, with and without gc.freeze().

    python bench/gc_pauses.py              # 4,000 sendMessage calls per case

Each case is a fresh child process that imports trt_bot, optionally runs
trt_bot.freeze_start_up_objects() as serve() does after start-up, then sends
the /start reply 4,000 times from 4 concurrent callers through the bot's
client to the fake Bot API.  gc.callbacks time every collection; the table
shows, per generation, how many ran and the longest and total pause (one
slow full collection can be the machine's other load), then the median time
of 5 full collections run by hand afterwards, and how many objects such a
collection walks.  Every pause stops the event loop, and every webhook ack
waiting on it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import statistics
import subprocess
import sys
import time

from harness import REPO_DIR, Placement, start_fake

CASES = (("streams", False), ("streams", True))  # the bot's client: StreamCalls under httpx
CALLS = 4000
FULL_COLLECTIONS = 5  # after the calls, timed one by one: what each full collection costs the loop
CALLERS = 4
TOKEN = "123456789:AAbenchmarkTOKEN_for_a_fake_bot_api_0123"


def child(transport: str, freeze: bool, base: str) -> dict:
    sys.path.insert(0, str(REPO_DIR))
    import uvloop
    import trt_bot

    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started = [0.0]

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started[0])

    async def main() -> None:
        async with trt_bot.bot_http_client([base]) as http:
            if freeze:
                trt_bot.freeze_start_up_objects()
            gc.callbacks.append(timed)
            telegram = trt_bot.TelegramClient(TOKEN, base, http)
            menu, text = trt_bot.main_menu("en"), trt_bot.TEXTS["en"]["start"]

            async def caller() -> None:
                for _ in range(CALLS // CALLERS):
                    await telegram.send_message(42, text, menu)

            await asyncio.gather(*(caller() for _ in range(CALLERS)))
            gc.callbacks.remove(timed)
            full.extend(_timed_full_collection() for _ in range(FULL_COLLECTIONS))

    full: list[float] = []
    uvloop.run(main())
    return {"pauses": {str(g): [len(p), max(p, default=0) * 1000, sum(p) * 1000] for g, p in pauses.items()},
            "full_ms": statistics.median(full) * 1000, "tracked": len(gc.get_objects())}


def _timed_full_collection() -> float:
    started = time.perf_counter()
    gc.collect()
    return time.perf_counter() - started


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], sys.argv[3] == "1", sys.argv[4])))
        return 0
    placement = Placement.choose(pin=True)
    from run import Bench, QUICK, parse_args  # imports trt_bot, so not in the children
    with Bench(parse_args([]), QUICK) as bench:
        fake = start_fake("botapi", [], placement.tools, bench.log_dir)
        try:
            rows = []
            for transport, freeze in CASES:
                argv = [sys.executable, __file__, "--child", transport, "1" if freeze else "0", fake.base]
                done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=True)
                rows.append((transport, freeze, json.loads(done.stdout.strip().splitlines()[-1])))
        finally:
            fake.proc.stop()
    print(f"{CALLS} sendMessage calls from {CALLERS} callers per case; per generation: collections, "
          "longest pause ms, total ms\n")
    print("| transport | gc.freeze() | gen 0 | gen 1 | gen 2 | a full collection, ms | objects it walks |")
    print("|---|---|---|---|---|---|---|")
    for transport, freeze, result in rows:
        cells = [f"{n}, {longest:.1f}, {total:.1f}" for n, longest, total in result["pauses"].values()]
        print(f"| {transport} | {'yes' if freeze else 'no'} | " + " | ".join(cells)
              + f" | {result['full_ms']:.1f} | {result['tracked']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
