"""Benchmark trt_bot against aiogram 3, python-telegram-bot 22 (also with AIORateLimiter) and a bare asyncio server.

    python bench/run.py            # the full suite (about half an hour)
    python bench/run.py --quick    # every figure, briefly (a few minutes; the smoke test runs this)

Everything runs on 127.0.0.1 and is started here: a fake Telegram Bot API and a
fake Kie API (bench/fakes.py), each bot as a real subprocess in webhook mode,
and wrk (the Debian package) as the load generator, posting distinct updates
through bench/wrk/updates.lua: a new update_id on every request, /start from
many chats.  The table is printed and written to bench/results/latest.md.

What each figure measures, and why it is a fair comparison
------------------------------------------------------------
1. End to end.  Burst: wrk posts N /start updates over 40 keep-alive
   connections, each connection sending again as soon as it is acknowledged,
   and each bot answers every one with one sendMessage.  answered/s is N over
   the time from the first post to the last sendMessage reaching the fake Bot
   API, so a bot that acknowledges first and answers later is charged for the
   backlog it builds (counting replies inside a fixed window would instead
   measure how a flooded bot splits its CPU between taking and answering;
   that is shown beside it, as answered/s while posting, with the server's
   CPU per answered update, acks included).
   Ack latency is wrk's, request to webhook 200, while it posts.  Paced: every
   bot gets the same offered rate (3/4 of aiogram's burst answered/s by
   default, so aiogram is busy but keeping up) for a fixed window; this is
   where ack latencies compare like for like.
   trt_bot (PostgreSQL) is the same trt_bot with DATABASE_URL on a fresh
   database of a PostgreSQL server this script starts (bench/pgserver.py:
   initdb into a temporary folder, Debian's binaries; fsync, synchronous_commit
   and full_page_writes on, so a commit is on disk before the 200, as with
   SQLite's synchronous=FULL).  The server shares CPU 0 with the bot: the
   storage gets the same core as SQLite on the bot's own thread.  Without the
   binaries or psycopg those rows are skipped with the reason printed.
2. Ingest ceiling.  The same load, but edited_message updates: trt_bot stores
   each one in its SQLite inbox before the 200 and its handler makes no Bot
   API call (Conversation.handle ignores edits), so this is the cost of the
   durable ack path alone.  The reference is a bare asyncio.start_server that
   answers 200 without parsing: what the loop and the kernel allow.  The rows
   in trt_bot's inbox are counted afterwards to show the acks were persisted.
   trt_bot (PostgreSQL) as in figure 1: the same load into its PostgreSQL inbox.
3. /start under generation load.  A few /start updates a second from new
   chats; latency is from writing the request to the sendMessage reaching the
   fake (both stamped with the system-wide monotonic clock).  The baseline
   runs with no other load.  Then 500 users walk through the generation
   dialog (new -> prompt -> ratio:1:1) against a slow fake Kie that holds
   every task in "generating", and the probe runs while all 500 jobs are in
   flight (accepted and not delivered, as trt_bot's /health counts them).
   trt_bot paces createTask at Kie's documented 20 per 10 s, so most of
   them are still waiting for their turn at Kie: just as with real users.
4. Footprint.  RSS (VmRSS) once idle, and after N distinct chats have each
   sent /start and been answered; time from spawning the process to the first
   200 from GET /health (trt_bot, aiogram with a one-line /health route) or to
   the first HTTP answer of PTB's run_webhook server (it serves only the
   webhook path).
5. Durability cost.  Figure 1's trt_bot run again with the inbox in
   ``sqlite:///:memory:``: still SQLite on its thread with group commits, but
   no file, WAL or page cache, so the difference is the disk.
6. Flood.  A second fake Bot API enforces Telegram's limits (30 sends/s
   across chats, 1/s in a private chat, 20/min in a group; past any of them
   every send gets 429 with retry_after 2 s, bot-wide; answerCallbackQuery is
   exempt).  trt_bot, aiogram, PTB and PTB with its ``AIORateLimiter`` each take
   the same bursts of /start, posted at once: from many private chats (the
   global rate binds), from groups with more than 20 each (the 20/min rule
   binds: the 21st reply in a group may go a minute after the first), and
   several from each of a few chats (1/s per chat binds).  Columns: answered
   of expected, 429s received, drain (first post -> last reply) against the
   ideal the limits allow.  A bot that, once the ideal time has passed,
   neither answers nor gets a 429 for a while has given up; what it has not
   answered is lost.
7. Overload.  trt_bot's capacity (/start answered per second, a figure-1
   burst), then trt_bot and aiogram are each offered twice that for a window
   on a fixed schedule (bench/wrk/scheduled.lua: Telegram's way, 40
   connections, each waiting for its slot); ack latency and acks/s while the
   load lasts, then every acknowledged update must be answered once it stops.

Fairness: every server gets the same fake, the same wrk script, the same
connection count and the same machine, in the same run, interleaved round by
round; each run starts a fresh process (and a fresh database) and discards a
warm-up (a burst of N/5, or a window of the same load).  All run on uvloop
(trt_bot's loop) with logging at WARNING for the peers (aiogram logs every
update at INFO; trt_bot logs none).  On two CPUs the server under test gets
CPU 0 to itself, and wrk, the fakes and this script share CPU 1; the fakes'
and wrk's own ceilings are measured and printed, with their CPU use during
the runs, so a reader can check they are not the bottleneck.  Medians of
several runs are shown with their min-max.

Options worth knowing: --no-generation (figure 3 without the load), --profile (py-spy on trt_bot, summarised by code area), --trt-env
KEY=VALUE (try trt_bot settings), --only 1,4 (some figures; 6 flood, 7 overload), --no-pin,
--ptb-limiter-retries N (AIORateLimiter's max_retries in figure 6, default 3).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from harness import (BENCH_DIR, REPO_DIR, FakeClient, Placement, Proc, Spread, WrkResult, free_port, http_json,
                     http_request, run_wrk, start_fake, wait_until, wrk_version)
from fakes import FloodRules
from pgserver import BenchPostgres
import pgserver
import probe
import report

sys.path.insert(0, str(REPO_DIR))
import trt_bot  # noqa: E402  (only for load_config: the webhook path and secret the bot derives)

TOKEN = "123456789:AAbenchmarkTOKEN_for_a_fake_bot_api_0123"
KIE_KEY = "bench-kie-key-0123456789"
WEBHOOK_BASE_URL = "https://bench.example.com"
LOAD_CHAT_BASE = 1_000_000
LOAD_CHATS = 10_000
FOOTPRINT_CHAT_BASE = 100_000_000
PROBE_CHAT_BASE = 500_000_000
GENERATION_USER_BASE = 700_000_000
FLOOD_CHAT_BASE = 800_000_000  # + a fresh million per scenario run; group chats are the negatives
FLOOD_USER_OFFSET = 500_000  # group members' user ids: the scenario's block + this + the update's index
MB_PER_MIB = 1.048576


# -- the plan ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FloodScenario:
    """A burst of /start: ``per_chat`` from each of ``chats`` chats (groups if ``group``), all at once."""

    key: str
    chats: int
    per_chat: int
    group: bool = False

    @property
    def updates(self) -> int:
        return self.chats * self.per_chat

    def describe(self) -> str:
        where = "groups" if self.group else "private chats"
        each = f" × {self.per_chat} /start each" if self.per_chat > 1 else ", one /start each"
        return f"{self.chats:,} {where}{each}"

    def ideal(self, rules: FloodRules) -> tuple[float, str]:
        """The shortest drain Telegram's limits allow, and which limit sets it.

        Across chats, N sends take N / rate.  In one chat the sends go in
        rounds: one a second in a private chat, 20 a minute in a group, so the
        last round starts (rounds - 1) periods after the first and its sends,
        one per chat, take (chats / rate).  The larger bound binds.
        """
        overall = self.updates / rules.per_second
        per_round, period, chat_rule = ((rules.group_per_minute, 60.0, f"{rules.group_per_minute}/min per group")
                                        if self.group else
                                        (rules.private_per_second, 1.0, f"{rules.private_per_second}/s per chat"))
        rounds = math.ceil(self.per_chat / per_round)
        last_round = self.chats * (self.per_chat - (rounds - 1) * per_round)
        in_chat = (rounds - 1) * period + last_round / rules.per_second
        if in_chat > overall:
            return in_chat, chat_rule
        return overall, f"{self.updates:,} / {rules.per_second}/s"


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    runs: int  # rounds of each load figure
    warmup_s: float
    measure_s: float
    footprint_chats: int
    startup_runs: int
    probe_rate: float  # /start probes per second
    probe_s: float
    generations: int
    ceiling_s: float
    drain_timeout_s: float
    burst: int  # /start updates per end-to-end burst
    flood: tuple[FloodScenario, ...]  # figure 6's bursts
    flood_quiet_s: float  # figure 6: no answer and no 429 for this long means a bot has given up
    connections: int = 40


FULL = Plan("full", runs=3, warmup_s=2.0, measure_s=10.0, footprint_chats=100_000, startup_runs=5,
            probe_rate=40, probe_s=5.0, generations=500, ceiling_s=4.0, drain_timeout_s=240.0, burst=10_000,
            flood=(FloodScenario("chats", 300, 1), FloodScenario("groups", 10, 25, group=True),
                   FloodScenario("per_chat", 20, 10)),
            flood_quiet_s=8.0)
QUICK = Plan("quick", runs=1, warmup_s=0, measure_s=1, footprint_chats=3_000, startup_runs=1,
             probe_rate=40, probe_s=1.0, generations=50, ceiling_s=1.0, drain_timeout_s=30.0, burst=1_000,
             flood=(FloodScenario("chats", 60, 1), FloodScenario("groups", 12, 5, group=True),
                    FloodScenario("per_chat", 5, 3)),
             flood_quiet_s=3.0)


# -- servers under test --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ServerSpec:
    key: str
    label: str
    argv: tuple[str, ...]
    ready_path: str  # polled with GET until it answers one of ready_statuses
    ready_statuses: tuple[int, ...] = (200,)
    env: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass
class Running:
    spec: ServerSpec
    proc: Proc
    port: int
    ready_s: float  # spawn -> first answer on ready_path
    ok_s: float | None  # trt_bot: spawn -> /health says "ok" (database open)
    work_dir: Path

    def stop(self, keep_files: bool = False) -> None:
        """Stop the process; delete its database unless asked to keep it."""
        self.proc.stop(timeout=4.0)
        if not keep_files:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


class Bench:
    """Shared state of one benchmark run: the fakes, the plan, ids, logs."""

    def __init__(self, args: argparse.Namespace, plan: Plan):
        self.args, self.plan = args, plan
        self.placement = Placement.choose(pin=not args.no_pin)
        self.results_dir = BENCH_DIR / "results"
        self.log_dir = self.results_dir / "logs"
        self.work_root = self.results_dir / "work"
        shutil.rmtree(self.log_dir, ignore_errors=True)
        shutil.rmtree(self.work_root, ignore_errors=True)
        self.botapi: FakeClient | None = None
        self.kie: FakeClient | None = None
        self.config = trt_bot.load_config(self._trt_env(port=1, database="sqlite:///:memory:"))
        self.path, self.secret = self.config.webhook_path, self.config.webhook_secret
        self._ids = 0
        self._runs = 0
        self.specs = self._specs()
        self.postgres: BenchPostgres | None = None
        self.postgres_skipped: str | None = None  # why the PostgreSQL rows are not measured

    # -- set-up -------------------------------------------------------------

    def __enter__(self) -> "Bench":
        if self.placement.tools:
            os.sched_setaffinity(0, self.placement.tools)
        self.botapi = start_fake("botapi", [], self.placement.tools, self.log_dir)
        kie_args = ["--create-ms", str(self.args.kie_create_ms), "--poll-ms", str(self.args.kie_poll_ms),
                    "--api-key", KIE_KEY]
        self.kie = start_fake("kie", kie_args, self.placement.tools, self.log_dir)
        return self

    def __exit__(self, *exc: object) -> None:
        for fake in (self.botapi, self.kie):
            if fake is not None:
                fake.proc.stop()
        if self.postgres is not None:
            self.postgres.remove()

    def start_postgres(self) -> None:
        """Start the PostgreSQL server for the trt_bot (PostgreSQL) rows, or note why they are skipped.

        It shares the CPU of the server under test: trt_bot's storage gets the
        same core whether it is SQLite on the bot's thread or a server beside it.
        """
        self.postgres_skipped = pgserver.unavailable_reason()
        if self.postgres_skipped is None:
            server = BenchPostgres(pgserver.bin_dir(), self.placement.server)
            try:
                server.start()
                self.postgres = server
            except (OSError, LookupError, RuntimeError, subprocess.SubprocessError) as error:
                server.remove()  # LookupError: no postgres user to run it as
                self.postgres_skipped = f"the PostgreSQL server did not start: {getattr(error, 'stderr', '') or error}"
        if self.postgres_skipped:
            _progress(f"trt_bot (PostgreSQL) rows skipped: {self.postgres_skipped}")

    def database_for(self, key: str) -> tuple[str, str | None]:
        """(which server to start, its DATABASE_URL or None for a fresh SQLite file) for a row's key."""
        if key == "trt_bot_memory":
            return "trt_bot", "sqlite:///:memory:"
        if key == "trt_bot_postgres":
            return "trt_bot", self.postgres.new_database_url()
        return key, None

    def postgres_of(self, database: str | None) -> BenchPostgres | None:
        """The benchmark's PostgreSQL server when ``database`` is one of its databases."""
        return self.postgres if database and database.startswith(trt_bot.POSTGRES_SCHEMES) else None

    def trt_rows(self) -> list[str]:
        """trt_bot's rows in figures 1 and 2: its SQLite file, and PostgreSQL when the server runs."""
        return ["trt_bot", "trt_bot_postgres"] if self.postgres else ["trt_bot"]

    def _specs(self) -> dict[str, ServerSpec]:
        python = sys.executable
        peers = BENCH_DIR / "peers"
        ptb_env = (("BENCH_PTB_CONCURRENT", str(self.args.ptb_concurrent)),)
        return {
            # As the image runs it: the module from its cached bytecode, not the script compiled at every start.
            "trt_bot": ServerSpec("trt_bot", f"trt_bot {trt_bot.__version__}", (python, "-m", "trt_bot"), "/health",
                                  env=(("PYTHONPATH", str(REPO_DIR)),)),
            "aiogram": ServerSpec("aiogram", f"aiogram {_version('aiogram')}", (python, str(peers / "aiogram_peer.py")),
                                  "/health"),
            "ptb": ServerSpec("ptb", f"PTB {_version('python-telegram-bot')}", (python, str(peers / "ptb_peer.py")),
                              self.path, (405,), ptb_env),
            "ptb_limiter": ServerSpec("ptb_limiter", f"PTB {_version('python-telegram-bot')} + AIORateLimiter",
                                      (python, str(peers / "ptb_peer.py")), self.path, (405,),
                                      ptb_env + (("BENCH_PTB_RATE_LIMITER", str(self.args.ptb_limiter_retries)),)),
            "bare": ServerSpec("bare", "bare asyncio server", (python, str(peers / "bare_server.py")), "/health"),
        }

    def _trt_env(self, port: int, database: str, api_base: str | None = None) -> dict[str, str]:
        env = {
            "TELEGRAM_BOT_TOKEN": TOKEN,
            "TELEGRAM_API_BASE": api_base or (self.botapi.base if self.botapi else "http://127.0.0.1:1"),
            "BOT_MODE": "webhook", "WEBHOOK_BASE_URL": WEBHOOK_BASE_URL,
            "HOST": "127.0.0.1", "PORT": str(port), "DATABASE_URL": database,
            "KIE_API_KEY": KIE_KEY, "KIE_API_BASE": self.kie.base if self.kie else "http://127.0.0.1:1",
            "SINGLE_MODEL_ONLY": "1", "LOG_LEVEL": "INFO", "SHUTDOWN_GRACE_S": "1",
        }
        if api_base is None:
            # The shared fake enforces no Telegram limits and the peers pace nothing: trt_bot sends at its
            # highest setting (paid broadcasts), no spacing per chat, so these figures measure the bot.
            env.update({"TELEGRAM_SEND_RATE": "1000", "TELEGRAM_CHAT_INTERVAL_S": "0",
                        "TELEGRAM_GROUP_PER_MINUTE": "0"})
        for item in self.args.trt_env:
            key, _, value = item.partition("=")
            env[key] = value
        return env

    def trt_settings(self) -> str:
        config = trt_bot.load_config(self._trt_env(port=1, database="sqlite:///x"))
        return f"UPDATE_QUEUE_SIZE={config.queue_size}, UPDATE_QUEUE_WORKERS={config.queue_workers}"

    # -- ids -------------------------------------------------------------

    def id_base(self) -> int:
        """A fresh block of update ids (wrk threads take 5,000,000 each); stays below 2**31."""
        self._ids = self._ids % 100 + 1
        return self._ids * 20_000_000

    # -- servers -----------------------------------------------------------

    def start(self, key: str, database: str | None = None, api_base: str | None = None) -> Running:
        """Start ``key`` afresh; ``api_base``: another fake Bot API than the shared one."""
        spec = self.specs[key]
        self._runs += 1
        os.sync()  # the previous run's database writes reach the disk now, not during this run
        port = free_port()
        work_dir = self.work_root / f"{key}-{self._runs}"
        work_dir.mkdir(parents=True)
        env = dict(os.environ)
        env.update(self._trt_env(port, database or f"sqlite:///{work_dir / 'trt_bot.sqlite3'}", api_base))
        env.update({"BENCH_WEBHOOK_PATH": self.path, "BENCH_WEBHOOK_SECRET": self.secret,
                    "BENCH_UVLOOP": "0" if self.args.peers_stock_loop else "1", **dict(spec.env)})
        proc = Proc(key, spec.argv, env=env, cpus=self.placement.server, cwd=work_dir,
                    log_path=self.log_dir / f"{key}-{self._runs}.log")
        if wait_until(lambda: http_request(port, "GET", spec.ready_path, timeout=1.0)[0] in spec.ready_statuses,
                      timeout=30.0, interval=0.002) is None:
            proc.stop()
            raise RuntimeError(f"{spec.label} did not become ready:\n{proc.log_tail()}")
        ready = time.monotonic() - proc.started  # from the spawn, interpreter start included
        ok = None
        if key == "trt_bot":
            ok = wait_until(lambda: http_json(port, "GET", "/health")["status"] == "ok", timeout=15.0)
            ok = None if ok is None else time.monotonic() - proc.started
        return Running(spec, proc, port, ready, ok, work_dir)

    def url(self, running: Running) -> str:
        return f"http://127.0.0.1:{running.port}"

    def wrk_updates(self, running: Running, kind: str, seconds: float, *, script: str = "updates.lua",
                    chats: int = LOAD_CHATS, chat_base: int = LOAD_CHAT_BASE, arg: float = 0) -> WrkResult:
        args = [self.path, self.secret, kind, self.id_base(), chats, chat_base, arg]
        return run_wrk(self.url(running), script, args, connections=self.plan.connections, seconds=seconds,
                       cpus=self.placement.tools)


# -- figure 0: the harness's own ceilings --------------------------------------------------

def measure_harness(bench: Bench) -> dict[str, Any]:
    """wrk straight at each fake (sharing CPU 1 with wrk, as in the real runs: a lower bound)."""
    menu = {"inline_keyboard": [[{"text": "Create a picture", "callback_data": "new"}],
                                [{"text": "Help", "callback_data": "help"}]]}
    body = json.dumps({"chat_id": 42, "text": "Hi! I draw pictures from a description. " * 5, "parse_mode": "HTML",
                       "reply_markup": menu})  # about the size of the /start reply
    fake_tg = start_fake("botapi", [], bench.placement.tools, bench.log_dir)
    fake_kie = start_fake("kie", [], bench.placement.tools, bench.log_dir)
    try:
        tg = run_wrk(fake_tg.base, "static_post.lua", ["POST", f"/bot{TOKEN}/sendMessage", "application/json", body],
                     connections=bench.plan.connections, seconds=bench.plan.ceiling_s, cpus=bench.placement.tools)
        kie = run_wrk(fake_kie.base, "static_post.lua", ["GET", "/api/v1/jobs/recordInfo?taskId=bench-task-1", "", ""],
                      connections=bench.plan.connections, seconds=bench.plan.ceiling_s, cpus=bench.placement.tools)
    finally:
        fake_tg.proc.stop()
        fake_kie.proc.stop()
    return {"fake_botapi": tg.ok_rate, "fake_kie": kie.rate}


# -- figures 1 and 5: end to end -----------------------------------------------------------------

@dataclasses.dataclass
class LoadRun:
    acked_rate: float  # webhook 200s per second while wrk posted
    answered_rate: float  # sendMessage per second at the fake (burst: all of them / time to the last one)
    ack_p50_ms: float
    ack_p99_ms: float
    errors: int  # non-2xx answers, socket errors and timeouts
    cpu_server: float  # share of one CPU over the measured time
    cpu_fake: float
    cpu_wrk: float
    total_acked: int  # warm-up included
    seconds: float = 0.0  # burst: first post -> last reply
    answered_while_posting: float = 0.0  # burst: sendMessage per second while wrk posted
    complete: bool = True  # burst: every acknowledged update was answered before the time limit


class CpuMeter:
    """CPU time used by the server, the fake Bot API and wrk between start() and the reading.

    With ``database`` (trt_bot on PostgreSQL) the server's share includes the
    PostgreSQL server's, as SQLite's work is inside trt_bot's own process.
    """

    def __init__(self, running: Running, fake: FakeClient, database: BenchPostgres | None = None):
        self.procs = (running.proc, fake.proc) + ((database,) if database else ())
        self.before = [p.cpu_seconds() for p in self.procs]

    def shares(self, seconds: float) -> tuple[float, float]:
        used = [p.cpu_seconds() - b for p, b in zip(self.procs, self.before)]
        return (used[0] + sum(used[2:])) / seconds, used[1] / seconds


def _wait_answered(bench: Bench, before: int, count: int) -> bool:
    return wait_until(lambda: bench.botapi.stats()["send_message"] - before >= count,
                      timeout=bench.plan.drain_timeout_s, interval=0.05) is not None


def measure_burst(bench: Bench, key: str, *, database: str | None = None,
                  on_running: Callable[[Running, float], Any] | None = None) -> LoadRun:
    """Post ``plan.burst`` /start updates as fast as they are acked, then wait for every reply.

    answered/s = updates / (first post -> last sendMessage at the fake): the rate a
    bot sustains when it has to both take updates in and answer them, whatever
    share of the CPU it gives each (an ack-first bot builds a backlog while
    wrk floods it, then drains it).
    """
    plan = bench.plan
    running = bench.start(key, database)
    try:
        warm_acked = 0
        if plan.warmup_s > 0:
            sent = bench.botapi.stats()["send_message"]
            warm = bench.wrk_updates(running, "start", 600, script="counted.lua", arg=plan.burst // 5)
            warm_acked = warm.requests - warm.status_errors
            _wait_answered(bench, sent, warm_acked)
        before = bench.botapi.stats()["send_message"]
        meter = CpuMeter(running, bench.botapi, bench.postgres_of(database))
        if on_running:
            on_running(running, plan.burst / 1000)
        started = time.monotonic()
        result = bench.wrk_updates(running, "start", 600, script="counted.lua", arg=plan.burst)
        answered_while_posting = (bench.botapi.stats()["send_message"] - before) / result.seconds
        acked = result.requests - result.status_errors
        complete = _wait_answered(bench, before, acked)
        stats = bench.botapi.stats()
        seconds = (stats["last_send"] if complete else time.monotonic()) - started
        cpu_server, cpu_fake = meter.shares(seconds)
        return LoadRun(
            acked_rate=result.ok_rate, answered_rate=(stats["send_message"] - before) / seconds,
            ack_p50_ms=result.lat_p50_ms, ack_p99_ms=result.lat_p99_ms,
            errors=result.status_errors + result.socket_errors, cpu_server=cpu_server, cpu_fake=cpu_fake,
            cpu_wrk=result.cpu_seconds / seconds, total_acked=warm_acked + acked, seconds=seconds, complete=complete,
            answered_while_posting=answered_while_posting,
        )
    finally:
        running.stop()


def measure_window(bench: Bench, key: str, kind: str, *, delay_ms: float = 0, keep_files: bool = False,
                   database: str | None = None,
                   on_running: Callable[[Running, float], Any] | None = None) -> tuple[LoadRun, Running]:
    """Start ``key`` fresh, warm it up, then count acks and replies during one window of wrk load."""
    plan = bench.plan
    running = bench.start(key, database)
    try:
        script = "paced.lua" if delay_ms else "updates.lua"
        warm = bench.wrk_updates(running, kind, plan.warmup_s, script=script, arg=delay_ms) if plan.warmup_s else None
        before = bench.botapi.stats()["send_message"]
        meter = CpuMeter(running, bench.botapi, bench.postgres_of(database))
        if on_running:
            on_running(running, plan.measure_s)
        result = bench.wrk_updates(running, kind, plan.measure_s, script=script, arg=delay_ms)
        cpu_server, cpu_fake = meter.shares(result.seconds)
        answered = bench.botapi.stats()["send_message"] - before
        run = LoadRun(
            acked_rate=result.ok_rate, answered_rate=answered / result.seconds,
            ack_p50_ms=result.lat_p50_ms, ack_p99_ms=result.lat_p99_ms,
            errors=result.status_errors + result.socket_errors, cpu_server=cpu_server, cpu_fake=cpu_fake,
            cpu_wrk=result.cpu_seconds / result.seconds,
            total_acked=(warm.requests - warm.status_errors if warm else 0) + result.requests - result.status_errors,
            seconds=result.seconds,
        )
        return run, running
    finally:
        running.stop(keep_files)


BOTS = ("trt_bot", "aiogram", "ptb")


def figure_end_to_end(bench: Bench) -> dict[str, Any]:
    """Bursts for the three bots, trt_bot on PostgreSQL and with an in-memory inbox; then paced windows."""
    keys = [*bench.trt_rows(), *BOTS[1:], "trt_bot_memory"]
    burst: dict[str, list[LoadRun]] = {k: [] for k in keys}
    for round_no in range(bench.plan.runs):
        for key in keys:
            server, database = bench.database_for(key)
            run = measure_burst(bench, server, database=database)
            if key == "trt_bot_postgres":
                bench.postgres.drop(database)
            burst[key].append(run)
            _progress(f"e2e burst {key} round {round_no + 1}: {run.answered_rate:,.0f} answered/s, "
                      f"{run.acked_rate:,.0f} acked/s, ack p99 {run.ack_p99_ms:.1f} ms")
    rate = bench.args.paced_rate or _paced_rate(burst["aiogram"])
    delay_ms = bench.plan.connections * 1000 / rate
    paced: dict[str, list[LoadRun]] = {k: [] for k in BOTS}
    for round_no in range(bench.plan.runs):
        for key in BOTS:
            run, _ = measure_window(bench, key, "start", delay_ms=delay_ms)
            paced[key].append(run)
            _progress(f"e2e paced {key} round {round_no + 1}: {run.acked_rate:,.0f} acked/s, "
                      f"{run.answered_rate:,.0f} answered/s, ack p99 {run.ack_p99_ms:.2f} ms")
    return {"burst": burst, "paced": paced, "paced_rate": rate, "postgres_skipped": bench.postgres_skipped}


def _paced_rate(aiogram_runs: list[LoadRun]) -> float:
    """Three quarters of aiogram's answered/s (busy but keeping up), in steps of 50, at least 50/s."""
    return max(50.0, (0.75 * Spread.of([r.answered_rate for r in aiogram_runs]).median) // 50 * 50)


# -- figure 2: ingest ceiling -----------------------------------------------------------------------

def figure_ingest(bench: Bench) -> dict[str, Any]:
    runs: dict[str, list[LoadRun]] = {k: [] for k in (*bench.trt_rows(), "bare")}
    # Per trt_bot row: (rows in the inbox, updates acknowledged) of each run.
    persisted: dict[str, list[tuple[int, int]]] = {k: [] for k in bench.trt_rows()}
    for round_no in range(bench.plan.runs):
        for key in runs:
            server, database = bench.database_for(key)
            run, running = measure_window(bench, server, "edited", keep_files=True, database=database)
            runs[key].append(run)
            if key == "trt_bot":
                persisted[key].append((_inbox_rows(running.work_dir / "trt_bot.sqlite3"), run.total_acked))
            elif key == "trt_bot_postgres":
                persisted[key].append((bench.postgres.inbox_rows(database), run.total_acked))
                bench.postgres.drop(database)
            shutil.rmtree(running.work_dir, ignore_errors=True)
            _progress(f"ingest {key} round {round_no + 1}: {run.acked_rate:,.0f} acked/s, "
                      f"ack p99 {run.ack_p99_ms:.2f} ms")
    return {"runs": runs, "persisted": persisted, "postgres_skipped": bench.postgres_skipped}


def _inbox_rows(path: Path) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT count(*) FROM inbox").fetchone()[0]


# -- figure 3: /start reply latency ------------------------------------------------------------------

def figure_reply_latency(bench: Bench) -> dict[str, Any]:
    baseline = {key: _probe_once(bench, key) for key in ("trt_bot", "aiogram", "ptb")}
    loaded = None if bench.args.no_generation else _probe_under_generation(bench)
    return {"baseline": baseline, "loaded": loaded}


def _probe(bench: Bench, running: Running) -> probe.LatencyResult:
    chat_base = PROBE_CHAT_BASE + bench.id_base() // 20
    return probe.probe_start_latency(running.port, bench.path, bench.secret, bench.botapi,
                                     rate=bench.plan.probe_rate, seconds=bench.plan.probe_s,
                                     chat_base=chat_base, update_base=bench.id_base())


def _probe_once(bench: Bench, key: str) -> probe.LatencyResult:
    running = bench.start(key)
    try:
        result = _probe(bench, running)
    finally:
        running.stop()
    _progress(f"reply latency {key}: p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms")
    return result


def _probe_under_generation(bench: Bench) -> dict[str, Any]:
    wanted = bench.plan.generations
    running = bench.start("trt_bot")
    kie = bench.kie
    try:
        kie.reset()
        users = range(GENERATION_USER_BASE, GENERATION_USER_BASE + wanted)
        statuses = probe.start_generations(running.port, bench.path, bench.secret, users, bench.id_base())

        def in_flight() -> int:
            return http_json(running.port, "GET", "/health")["jobs_in_flight"]

        reached = wait_until(lambda: in_flight() >= wanted, timeout=30.0 + wanted / 20, interval=0.1)
        before = kie.stats()
        jobs_before = in_flight()
        result = _probe(bench, running) if reached is not None else None
        after = kie.stats()
        jobs_after = in_flight()
    finally:
        kie.release()
        running.stop()
    seconds = max(1e-9, after["now"] - before["now"])
    return {"wanted": wanted, "created": after["created"], "in_flight_min": min(jobs_before, jobs_after),
            "polls_per_s": (after["polls"] - before["polls"]) / seconds, "unauthorized": after["unauthorized"],
            "statuses": statuses, "result": result}


# -- figure 4: footprint ----------------------------------------------------------------------------

def figure_footprint(bench: Bench) -> dict[str, Any]:
    """Start-up and idle RSS over several starts (the loaded run's own start is one of them), then RSS after N chats."""
    python_alone = _python_alone(bench)  # first, on a quiet CPU
    startup: dict[str, list[float]] = {k: [] for k in BOTS}
    startup_ok: list[float] = []
    idle: dict[str, list[float]] = {k: [] for k in BOTS}

    def note_start(running: Running) -> None:
        startup[running.spec.key].append(running.ready_s)
        if running.ok_s is not None:
            startup_ok.append(running.ok_s)
        time.sleep(1.0)
        idle[running.spec.key].append(running.proc.rss_mib() * MB_PER_MIB)

    for _ in range(bench.plan.startup_runs - 1):
        for key in BOTS:
            running = bench.start(key)
            try:
                note_start(running)
            finally:
                running.stop()
    loaded = {key: _rss_after_chats(bench, key, note_start) for key in BOTS}
    return {"startup": startup, "startup_ok": startup_ok, "idle": idle, "loaded": loaded,
            "python_alone": python_alone}


def _rss_after_chats(bench: Bench, key: str, note_start: Callable[[Running], None]) -> dict[str, Any]:
    chats = bench.plan.footprint_chats
    running = bench.start(key)
    try:
        note_start(running)
        before = bench.botapi.stats()["send_message"]
        started = time.monotonic()
        result = bench.wrk_updates(running, "start", 3600, script="counted.lua", chats=0,
                                   chat_base=FOOTPRINT_CHAT_BASE, arg=chats)
        drained = _wait_answered(bench, before, result.requests - result.status_errors)
        answered = bench.botapi.stats()["send_message"] - before
        elapsed = time.monotonic() - started
        time.sleep(1.0)
        rss = running.proc.rss_mib() * MB_PER_MIB
        files = list(running.work_dir.glob("trt_bot.sqlite3*"))
        db_mb = sum(p.stat().st_size for p in files) / 1e6 if files else None
    finally:
        running.stop()
    _progress(f"footprint {key}: {rss:.1f} MB after {answered:,} chats answered in {elapsed:.1f} s")
    return {"rss_mb": rss, "answered": answered, "chats": chats, "drained": drained, "seconds": elapsed,
            "db_mb": db_mb}


def _python_alone(bench: Bench) -> float:
    times = []
    for _ in range(max(3, bench.plan.startup_runs)):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True, preexec_fn=_pin(bench.placement.server))
        times.append(time.monotonic() - started)
    return Spread.of(times).median


# -- figure 6: flood: replies at Telegram's limits -------------------------------------------------

FLOOD_BOTS = ("trt_bot", "aiogram", "ptb", "ptb_limiter")


@dataclasses.dataclass
class FloodRun:
    expected: int  # /start updates posted
    acked: int  # webhook 200s among them
    answered: int  # replies the fake took, at most per_chat per chat
    too_many: int  # 429s the fake gave
    pauses: int  # bot-wide flood pauses those 429s started
    ideal_s: float
    bound: str  # which limit sets ideal_s
    drain_s: float | None  # first post -> last answer; None when some were never answered
    waited_s: float  # first post -> when the run was judged finished (all answered, or gave up)

    @property
    def ratio(self) -> float | None:
        return self.drain_s / self.ideal_s if self.drain_s is not None and self.ideal_s else None


def flood_update(update_id: int, chat_id: int, user_id: int, group: bool) -> dict:
    update = probe.start_update(update_id, chat_id)
    message = update["message"]
    message["from"]["id"] = user_id
    if group:
        message["chat"] = {"id": chat_id, "title": "Bench group", "type": "group"}
    return update


def _post_all(port: int, path: str, secret: str, updates: list[dict], connections: int) -> dict[int, int]:
    """Post every update at once over ``connections`` keep-alive connections; HTTP status counts (0: failed)."""

    async def run() -> dict[int, int]:
        async with probe.WebhookClient(port, path, secret, connections=connections) as client:
            outcomes = await asyncio.gather(*(client.post(u) for u in updates), return_exceptions=True)
            failed = sum(1 for o in outcomes if isinstance(o, BaseException))
            return {**client.statuses, **({0: failed} if failed else {})}

    return asyncio.run(run())


def flood_once(bench: Bench, running: Running, fake: FakeClient, scenario: FloodScenario,
               rules: FloodRules) -> FloodRun:
    """One burst of ``scenario`` into a running bot; waits until all are answered or the bot has gone quiet."""
    fake.reset()
    block = FLOOD_CHAT_BASE + bench.id_base() // 20
    sign = -1 if scenario.group else 1
    chats = [sign * (block + i) for i in range(scenario.chats)]
    first_id = bench.id_base()
    updates = [flood_update(first_id + n, chat, block + FLOOD_USER_OFFSET + n if scenario.group else abs(chat),
                            scenario.group)
               for n, chat in enumerate(c for _ in range(scenario.per_chat) for c in chats)]
    ideal, bound = scenario.ideal(rules)
    started = time.monotonic()
    statuses = _post_all(running.port, bench.path, bench.secret, updates, min(bench.plan.connections, len(updates)))

    def answered() -> int:
        counts = http_json(fake.port, "GET", "/__answered")
        return sum(min(counts.get(str(c), 0), scenario.per_chat) for c in chats)

    # A pacing bot may rightly send nothing for most of a minute (a group's 21st reply), so silence counts as
    # giving up only once the ideal drain time has passed.
    deadline, judge_from = started + 2 * ideal + 30, started + ideal
    last_change, last_seen = time.monotonic(), None
    while time.monotonic() < deadline:
        stats = fake.stats()
        seen = (answered(), stats["too_many_requests"], stats["requests"])
        if seen[0] >= scenario.updates:
            break
        now = time.monotonic()
        if seen != last_seen:
            last_change, last_seen = now, seen
        elif now > judge_from and now - max(last_change, judge_from) >= bench.plan.flood_quiet_s:
            break
        time.sleep(0.1)
    waited = time.monotonic() - started
    stats, done = fake.stats(), answered()
    return FloodRun(expected=scenario.updates, acked=statuses.get(200, 0), answered=done,
                    too_many=stats["too_many_requests"], pauses=stats["flood_pauses"], ideal_s=ideal, bound=bound,
                    drain_s=stats["last_send"] - started if done >= scenario.updates else None, waited_s=waited)


def figure_flood(bench: Bench) -> dict[str, Any]:
    """Each bot in turn, started once against a fake Bot API enforcing Telegram's limits, takes every scenario."""
    rules = FloodRules()
    fake = start_fake("botapi", ["--telegram-limits"], bench.placement.tools, bench.log_dir)
    runs: dict[str, dict[str, FloodRun]] = {}
    try:
        for key in FLOOD_BOTS:
            running = bench.start(key, api_base=fake.base)
            try:
                runs[key] = {}
                for scenario in bench.plan.flood:
                    run = flood_once(bench, running, fake, scenario, rules)
                    runs[key][scenario.key] = run
                    drain = f"drain {run.drain_s:.1f} s" if run.drain_s is not None else "not drained"
                    _progress(f"flood {scenario.key} {key}: {run.answered}/{run.expected} answered, "
                              f"{run.too_many} 429s, {drain} (ideal {run.ideal_s:.1f} s)")
            finally:
                running.stop()
    finally:
        fake.proc.stop()
    return {"runs": runs, "rules": dataclasses.asdict(rules),
            "scenarios": {s.key: s.describe() for s in bench.plan.flood},
            "trt_paced": any(setting.name == "TELEGRAM_SEND_RATE" for setting in trt_bot.SETTINGS)}


# -- figure 7: overload: acknowledgements at twice the processing capacity -------------------------

OVERLOAD_BOTS = ("trt_bot", "aiogram")


@dataclasses.dataclass
class OverloadRun:
    offered_rate: float  # webhook requests per second wrk made during the window (the schedule's, if it kept up)
    acked_rate: float  # of which answered 200
    ack_p50_ms: float
    ack_p99_ms: float
    errors: int  # non-2xx answers, socket errors and timeouts
    answered_rate: float  # replies per second during the window
    expected: int  # updates acknowledged (200) in the window
    answered: int  # replies once the load stopped and the bot had drained
    drain_s: float | None  # load stopped -> last reply; None if not all answered within the deadline
    cpu_server: float  # share of one CPU during the window


def overload_once(bench: Bench, key: str, rate: float) -> OverloadRun:
    running = bench.start(key)
    try:
        before = bench.botapi.stats()["send_message"]
        meter = CpuMeter(running, bench.botapi)
        result = bench.wrk_updates(running, "start", bench.plan.measure_s, script="scheduled.lua", arg=rate)
        stopped = time.monotonic()
        cpu_server, _ = meter.shares(result.seconds)
        in_window = bench.botapi.stats()["send_message"] - before
        expected = result.requests - result.status_errors
        complete = _wait_answered(bench, before, expected)
        stats = bench.botapi.stats()
    finally:
        running.stop()
    return OverloadRun(
        offered_rate=result.rate, acked_rate=result.ok_rate, ack_p50_ms=result.lat_p50_ms,
        ack_p99_ms=result.lat_p99_ms, errors=result.status_errors + result.socket_errors,
        answered_rate=in_window / result.seconds, expected=expected, answered=stats["send_message"] - before,
        drain_s=max(0.0, stats["last_send"] - stopped) if complete else None, cpu_server=cpu_server)


def figure_overload(bench: Bench) -> dict[str, Any]:
    """trt_bot's capacity (a figure-1 burst), then both bots offered twice that for a window, then drained."""
    capacity = measure_burst(bench, "trt_bot").answered_rate
    rate = 2 * capacity
    _progress(f"overload: trt_bot answers {capacity:,.0f} /start per second; offering {rate:,.0f}/s")
    runs: dict[str, list[OverloadRun]] = {k: [] for k in OVERLOAD_BOTS}
    for round_no in range(bench.plan.runs):
        for key in OVERLOAD_BOTS:
            run = overload_once(bench, key, rate)
            runs[key].append(run)
            _progress(f"overload {key} round {round_no + 1}: {run.acked_rate:,.0f} acked/s, ack p99 "
                      f"{run.ack_p99_ms:.1f} ms, {run.answered:,}/{run.expected:,} answered")
    return {"capacity": capacity, "rate": rate, "runs": runs}


# -- profiling (optional) ------------------------------------------------------------------------------

def profile_trt_bot(bench: Bench) -> dict[str, Path]:
    """py-spy record on trt_bot during one burst and one ingest window (extra runs, not in the figures)."""
    outputs: dict[str, Path] = {}
    spies: list[subprocess.Popen] = []

    def attach(out: Path) -> Callable[[Running, float], None]:
        def start(running: Running, seconds: float) -> None:
            argv = [_py_spy(), "record", "--pid", str(running.proc.pid), "--rate", "250", "--format", "raw",
                    "--threads", "--nonblocking", "--output", str(out)]
            spies.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          preexec_fn=_pin(bench.placement.tools)))
            time.sleep(0.3)  # let it attach
        return start

    outputs["e2e"] = bench.results_dir / "profile-e2e.txt"
    run = measure_burst(bench, "trt_bot", on_running=attach(outputs["e2e"]))
    _progress(f"profiled trt_bot e2e burst: {run.answered_rate:,.0f} answered/s")
    outputs["ingest"] = bench.results_dir / "profile-ingest.txt"
    run, _ = measure_window(bench, "trt_bot", "edited", on_running=attach(outputs["ingest"]))
    _progress(f"profiled trt_bot ingest: {run.acked_rate:,.0f} acked/s")
    for spy in spies:  # py-spy writes its file when the process it watches exits
        try:
            spy.wait(15)
        except subprocess.TimeoutExpired:
            spy.terminate()
    return outputs


def _py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"


def _pin(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


# -- main ------------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """JSON for the raw results file: dataclasses as dicts, paths as strings."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def _progress(message: str) -> None:
    print(f"  · {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark trt_bot against aiogram, PTB and a bare asyncio server.")
    parser.add_argument("--quick", action="store_true", help="a short run of every figure (a few minutes)")
    parser.add_argument("--no-generation", action="store_true",
                        help="figure 3 without the 500 generations in flight (the idle probe only)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "latest.md",
                        help="where to write the table (the raw numbers go beside it, as .json)")
    parser.add_argument("--runs", type=int, help="rounds per load figure (default 3, quick 1)")
    parser.add_argument("--seconds", type=int, help="measured seconds per load run, whole seconds (default 10, quick 1)")
    parser.add_argument("--burst", type=int, help="/start updates per end-to-end burst (default 10,000, quick 1,000)")
    parser.add_argument("--paced-rate", type=float, default=0,
                        help="offered updates/s for the paced run (default: half the slowest bot's answered/s)")
    parser.add_argument("--only", default="", help="comma-separated figures to run, e.g. 1,4 (default: all)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--peers-stock-loop", action="store_true",
                        help="run the peers and the bare server on asyncio's default loop instead of uvloop")
    parser.add_argument("--ptb-concurrent", type=int, default=0,
                        help="PTB concurrent_updates (default 0: PTB's default, one update at a time)")
    parser.add_argument("--ptb-limiter-retries", type=int, default=3,
                        help="figure 6: AIORateLimiter max_retries for the PTB + AIORateLimiter peer (PTB's default: 0)")
    parser.add_argument("--trt-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for trt_bot, e.g. UPDATE_QUEUE_WORKERS=8 (repeatable)")
    parser.add_argument("--kie-create-ms", type=float, default=300, help="fake Kie: createTask answer delay")
    parser.add_argument("--kie-poll-ms", type=float, default=150, help="fake Kie: recordInfo answer delay")
    parser.add_argument("--profile", action="store_true",
                        help="also run py-spy on trt_bot (e2e and ingest) and summarise where its CPU goes")
    return parser.parse_args(argv)


def check_tools(profile: bool) -> list[str]:
    """What is missing to run at all (looked up, not imported: aiogram alone would add 150 MB to this process)."""
    missing = [] if shutil.which("wrk") else ["wrk (apt-get install -y wrk)"]
    if profile and not Path(_py_spy()).exists() and shutil.which("py-spy") is None:
        missing.append("py-spy (pip install py-spy)")
    for module, package in (("aiogram", "aiogram"), ("telegram", "python-telegram-bot"), ("tornado", "tornado"),
                            ("aiolimiter", "python-telegram-bot[rate-limiter]"), ("uvloop", "uvloop")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"{package} (pip install -r bench/requirements.txt)")
    return missing


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = check_tools(args.profile)
    if missing:
        print("bench: missing " + "; ".join(missing), file=sys.stderr)
        return 2
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(plan, runs=args.runs or plan.runs, measure_s=args.seconds or plan.measure_s,
                               burst=args.burst or plan.burst)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    wanted = lambda figure: not only or figure in only  # noqa: E731
    started = time.monotonic()
    results: dict[str, Any] = {}
    with Bench(args, plan) as bench:
        _progress(f"{plan.name} run; {bench.placement.describe()}")
        if wanted("1") or wanted("2"):
            bench.start_postgres()
        results["harness"] = measure_harness(bench)
        if wanted("1") or wanted("5"):
            results["e2e"] = figure_end_to_end(bench)
        if wanted("2"):
            results["ingest"] = figure_ingest(bench)
        if wanted("3"):
            results["latency"] = figure_reply_latency(bench)
        if wanted("4"):
            results["footprint"] = figure_footprint(bench)
        if wanted("6"):
            results["flood"] = figure_flood(bench)
        if wanted("7"):
            results["overload"] = figure_overload(bench)
        if args.profile:
            results["profile"] = profile_trt_bot(bench)
        context = report.Context(
            plan=plan, args=args, placement=bench.placement.describe(), trt_settings=bench.trt_settings(),
            versions={"trt_bot": trt_bot.__version__, "aiogram": _version("aiogram"),
                      "python-telegram-bot": _version("python-telegram-bot"), "uvloop": _version("uvloop"),
                      "wrk": wrk_version()},
            elapsed_s=time.monotonic() - started, when=datetime.datetime.now().astimezone(),
            machine=f"{os.cpu_count()} CPUs ({_cpu_model()}), "
                    f"Linux {platform.release()}, Python {platform.python_version()}",
        )
    text = report.render(results, context)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, default=_plain, indent=1))
    print(f"\n(written to {args.out.relative_to(REPO_DIR) if args.out.is_relative_to(REPO_DIR) else args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
