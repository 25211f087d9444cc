"""What an fsync per commit costs the webhook ack: SQLite's synchronous=NORMAL against FULL (and PostgreSQL).

    python bench/durability.py                      # 3 rounds of 10 s per mode and connection count
    python bench/durability.py --seconds 3 --rounds 1 --dir /var/data
    python bench/durability.py --postgres postgresql://user:password@127.0.0.1:5432/postgres

With --postgres, a third mode stores the inbox in a fresh database on that
server (the role must be allowed to CREATE DATABASE), in the same run.

trt_bot runs as a subprocess in webhook mode with its SQLite inbox in --dir (a
fresh folder per run; by default under the system's temporary folder: point it
at the disk you deploy on, fsync costs what that disk makes it cost), against
bench/fakes.py's fake Bot API.  Keep-alive clients in this process post
edited_message updates, which trt_bot stores and handles without a Bot API call;
each connection sends its next update as soon as the previous one is
acknowledged.  Printed per mode: acks per second and the ack latency (p50, p99)
for 1 connection (every ack waits for a commit of its own) and for 40
(Telegram's default max_connections, where group commit shares one fsync among
the acks that arrive together).  Modes alternate round by round, so a noisy
machine hurts both alike; the inbox is counted afterwards to show every ack
was persisted.  The server gets CPU 0, this process the others (as run.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from harness import REPO_DIR, Placement, Proc, free_port, http_request, percentile, start_fake, wait_until
from probe import _read_response

sys.path.insert(0, str(REPO_DIR))
import trt_bot  # noqa: E402  (for load_config: the webhook path and secret the bot derives)

TOKEN = "123456789:AAbenchmarkTOKEN_for_a_fake_bot_api_0123"
MODES = ("NORMAL", "FULL")
# trt_bot's own main(), with the synchronous setting under test.
LAUNCH = "import sys, trt_bot; trt_bot.SQLITE_SYNCHRONOUS = sys.argv[1]; sys.exit(trt_bot.main([]))"
POSTGRES_MODE = "postgresql"  # DATABASE_URL on the --postgres server; SQLite's setting is then unused


def new_postgres_database(server_url: str) -> str:
    """A DATABASE_URL for a new, empty database on the server at ``server_url``."""
    import psycopg
    name = f"trt_bench_{os.getpid()}_{time.monotonic_ns()}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(server_url)._replace(path="/" + name))


def stored_updates(database_url: str) -> int:
    location = trt_bot.parse_database_url(database_url)
    if location.startswith(trt_bot.POSTGRES_SCHEMES):
        import psycopg
        with psycopg.connect(location) as conn:
            return conn.execute("SELECT count(*) FROM inbox").fetchone()[0]
    with sqlite3.connect(location) as conn:
        return conn.execute("SELECT count(*) FROM inbox").fetchone()[0]


def edited_update(update_id: int) -> bytes:
    chat = 1_000_000 + update_id % 10_000
    user = {"id": chat, "is_bot": False, "first_name": "Bench", "language_code": "en"}
    return json.dumps({"update_id": update_id, "edited_message": {
        "message_id": update_id, "from": user, "chat": {"id": chat, "type": "private"}, "date": int(time.time()),
        "edit_date": int(time.time()), "text": "a prompt, edited"}}, separators=(",", ":")).encode()


async def post_for(port: int, path: str, secret: str, connections: int, seconds: float,
                   first_id: int) -> tuple[int, list[float], int]:
    """Keep ``connections`` clients posting for ``seconds``: (acks, latencies in seconds, next free id)."""
    latencies: list[float] = []
    ids = iter(range(first_id, first_id + 10**9))
    deadline = time.monotonic() + seconds
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"X-Telegram-Bot-Api-Secret-Token: {secret}\r\nContent-Length: %d\r\n\r\n")

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                body = edited_update(next(ids))
                started = time.perf_counter()
                writer.write((head % len(body)).encode() + body)
                status = await _read_response(reader)
                if status != 200:
                    raise RuntimeError(f"the webhook answered {status}")
                latencies.append(time.perf_counter() - started)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))
    return len(latencies), latencies, next(ids)


def run_once(mode: str, connections: int, seconds: float, root: Path, botapi_base: str,
             placement: Placement, postgres: str | None = None) -> dict[str, float]:
    port = free_port()
    work_dir = Path(tempfile.mkdtemp(prefix=f"durability-{mode}-", dir=root))
    database_url = (new_postgres_database(postgres) if mode == POSTGRES_MODE
                    else f"sqlite:///{work_dir / 'trt_bot.sqlite3'}")
    env = {"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_BASE": botapi_base, "BOT_MODE": "webhook",
           "WEBHOOK_BASE_URL": "https://bench.example.com", "HOST": "127.0.0.1", "PORT": str(port),
           "DATABASE_URL": database_url, "SINGLE_MODEL_ONLY": "1", "LOG_LEVEL": "WARNING",
           "SHUTDOWN_GRACE_S": "1", "PYTHONPATH": str(REPO_DIR)}
    config = trt_bot.load_config(env)
    synchronous = "FULL" if mode == POSTGRES_MODE else mode
    proc = Proc(f"trt_bot-{mode}", [sys.executable, "-c", LAUNCH, synchronous], env=env, cpus=placement.server,
                cwd=work_dir, log_path=work_dir / "trt_bot.log")
    try:
        if wait_until(lambda: b'"status":"ok"' in http_request(port, "GET", "/health")[1], timeout=30.0) is None:
            raise RuntimeError(f"trt_bot did not become healthy:\n{proc.log_tail()}")
        run = asyncio.run(post_for(port, config.webhook_path, config.webhook_secret, connections, 1.0, 1))  # warm-up
        acks, latencies, _ = asyncio.run(post_for(port, config.webhook_path, config.webhook_secret, connections,
                                                  seconds, run[2]))
    finally:
        proc.stop()
    stored = stored_updates(database_url)
    if stored < run[0] + acks:
        raise RuntimeError(f"{run[0] + acks} acks but only {stored} updates in the inbox")
    return {"acks_per_s": acks / seconds, "p50_ms": percentile(latencies, 50) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 40])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the databases go")
    parser.add_argument("--no-pin", action="store_true", help="let every process run on every CPU")
    parser.add_argument("--keep", action="store_true", help="keep the databases and logs (they are deleted)")
    parser.add_argument("--postgres", metavar="URL", help="also measure PostgreSQL: a server URL that may create "
                                                          "databases (each run gets a new one)")
    args = parser.parse_args(argv)
    modes = MODES + (POSTGRES_MODE,) if args.postgres else MODES
    placement = Placement.choose(pin=not args.no_pin)
    if placement.tools:
        os.sched_setaffinity(0, placement.tools)
    root = Path(tempfile.mkdtemp(prefix="trt-durability-", dir=args.dir))
    botapi = start_fake("botapi", [], placement.tools, root)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for round_no in range(args.rounds):
            for connections in args.connections:
                for mode in modes if round_no % 2 == 0 else modes[::-1]:
                    result = run_once(mode, connections, args.seconds, root, botapi.base, placement, args.postgres)
                    results.setdefault((mode, connections), []).append(result)
                    print(f"round {round_no + 1}: {mode:6} {connections:3} connections: {result['acks_per_s']:8,.0f}"
                          f" acks/s, p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms", file=sys.stderr)
    finally:
        botapi.proc.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\ndatabase       connections  acks/s (median of {args.rounds})  ack p50 ms  ack p99 ms   "
          f"({placement.describe()}; databases in {args.dir})")
    for (mode, connections), runs in sorted(results.items(), key=lambda item: (item[0][1], item[0][0])):
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        label = mode if mode == POSTGRES_MODE else f"SQLite {mode}"
        print(f"{label:13}  {connections:11}  {median['acks_per_s']:24,.0f}  {median['p50_ms']:10.2f}  "
              f"{median['p99_ms']:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
