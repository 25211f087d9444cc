"""Turns run.py's measurements into the Markdown table it prints and saves.

Every number shown here comes from ``results``; the only constants are the
targets' goals.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from harness import Spread

NAMES = {"trt_bot": "trt_bot", "aiogram": "aiogram 3", "ptb": "PTB 22", "bare": "bare asyncio server",
         "trt_bot_memory": "trt_bot, inbox :memory:", "ptb_limiter": "PTB 22 + AIORateLimiter",
         "trt_bot_postgres": "trt_bot (PostgreSQL)"}
POSTGRES_ROWS = ("trt_bot (PostgreSQL): the same trt_bot with DATABASE_URL on a fresh database of a PostgreSQL "
                 "server started by the benchmark, fsync, synchronous_commit and full_page_writes on (every ack "
                 "durable, as SQLite's synchronous=FULL), the server on the same CPU as the bot; its CPU is counted "
                 "in CPU server, as SQLite's is inside the bot's process.")


@dataclasses.dataclass
class Context:
    plan: Any
    args: Any
    placement: str
    trt_settings: str
    versions: dict[str, str]
    elapsed_s: float
    when: datetime.datetime
    machine: str


# -- formatting -----------------------------------------------------------------------------

def num(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return num(value, 2 if value < 10 else 1)


def spread(values: Iterable[float | None], fmt: Callable[[float], str] = num) -> str:
    result = Spread.of(list(values))
    if result is None:
        return "n/a"
    if result.runs == 1 or result.low == result.high:
        return fmt(result.median)
    return f"{fmt(result.median)} ({fmt(result.low)}–{fmt(result.high)})"


def median(values: Iterable[float | None]) -> float | None:
    result = Spread.of(list(values))
    return result.median if result else None


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


# -- sections -------------------------------------------------------------------------------

def header(ctx: Context) -> list[str]:
    plan = ctx.plan
    versions = ", ".join(f"{k} {v}" for k, v in ctx.versions.items())
    rounds = "1 round" if plan.runs == 1 else f"{plan.runs} rounds, servers interleaved; median (min–max) of the rounds"
    quick = ["", "_Quick run: one short round per figure, to check that everything works. Its numbers are "
                 "indicative only; use the full run for conclusions._"] if plan.name == "quick" else []
    return [
        "# trt_bot benchmark",
        *quick,
        "",
        f"- Run: {ctx.when:%Y-%m-%d %H:%M %Z}, {plan.name} (`python bench/run.py{' --quick' if plan.name == 'quick' else ''}`), "
        f"took {duration(ctx.elapsed_s)}",
        f"- Machine: {ctx.machine}",
        f"- Software: {versions}",
        f"- Placement: {ctx.placement}",
        f"- Load: wrk, 1 thread, {plan.connections} keep-alive connections, every update a new update_id, /start from "
        f"10,000 chat ids; every run starts the server afresh; bursts of {plan.burst:,} updates"
        f"{f' after a {plan.burst // 5:,}-update warm-up burst' if plan.warmup_s else ''}, windows of "
        f"{plan.measure_s:g} s{f' after a {plan.warmup_s:g} s warm-up' if plan.warmup_s else ''}; {rounds}",
        f"- trt_bot: {ctx.trt_settings}, SQLite file on disk (WAL, synchronous=FULL: fsynced before the 200), uvloop; "
        "trt_bot (PostgreSQL) rows: DATABASE_URL on a PostgreSQL server the benchmark starts, fsync on",
        f"- Peers: {'asyncio default loop' if ctx.args.peers_stock_loop else 'uvloop'}, logging at WARNING; aiogram "
        f"`SimpleRequestHandler(handle_in_background=True)`; PTB `run_webhook`, concurrent_updates "
        f"{ctx.args.ptb_concurrent or 'off (PTB default)'}",
    ]


def harness_section(results: dict[str, Any]) -> list[str]:
    h = results["harness"]
    e2e = results.get("e2e", {})
    bot_runs = [r for part in ("burst", "paced") for runs in e2e.get(part, {}).values() for r in runs]
    peak_answered = max((r.answered_rate for r in bot_runs), default=None)
    peak_acked = max((r.acked_rate for r in bot_runs), default=None)
    peak_fake_cpu = max((r.cpu_fake for r in bot_runs), default=None)
    peak_wrk_cpu = max((r.cpu_wrk for r in bot_runs), default=None)
    bare = median(r.acked_rate for r in results.get("ingest", {}).get("runs", {}).get("bare", []))
    rows = [
        ["fake Bot API, sendMessage", f"{num(h['fake_botapi'])} req/s",
         f"at most {num(peak_answered)} sendMessage/s; its CPU at most {pct(peak_fake_cpu)} of a core"],
        ["fake Kie, recordInfo (no delay)", f"{num(h['fake_kie'])} req/s",
         "figure 3 under load only (answers delayed on purpose there)"],
        ["wrk + updates.lua", f"≥ {num(bare)} req/s (its rate against the bare server)" if bare else "not measured",
         f"at most {num(peak_acked)} req/s to a bot; its CPU at most {pct(peak_wrk_cpu)} of a core"],
    ]
    return ["", "## The harness is not the bottleneck", "",
            "Ceilings measured with wrk straight at each fake, wrk and fake sharing CPU 1 as in the real runs (so "
            "they are lower bounds); uses are the peaks over every bot run below.", ""] + table(
            ["part", "ceiling", "busiest use in the bot runs"], rows)


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.0f}%"


def cpu_per_update(run: Any, acked: bool = False) -> float | None:
    """Server CPU milliseconds per update answered (or acknowledged)."""
    rate = run.acked_rate if acked else run.answered_rate
    return run.cpu_server / rate * 1000 if rate else None


def _load_row(name: str, runs: list[Any], burst: bool) -> list[str]:
    row = [name, spread(r.answered_rate for r in runs), spread(r.acked_rate for r in runs),
           spread((r.ack_p50_ms for r in runs), ms), spread((r.ack_p99_ms for r in runs), ms)]
    if burst:
        row.insert(2, spread(r.answered_while_posting for r in runs))
        incomplete = sum(1 for r in runs if not r.complete)
        row.append(spread((r.seconds for r in runs), lambda v: num(v, 1)) + (f" ({incomplete} cut off)" if incomplete else ""))
    row.append(f"{pct(median(r.cpu_server for r in runs))} / {pct(median(r.cpu_fake for r in runs))} / "
               f"{pct(median(r.cpu_wrk for r in runs))}")
    row.append(spread((cpu_per_update(r) for r in runs), lambda v: num(v, 2)))
    row.append(num(sum(r.errors for r in runs)))
    return row


LOAD_HEADER = ["answered/s", "acked/s", "ack p50 ms", "ack p99 ms"]
CPU_HEADER = ["CPU server / fake / wrk", "server CPU ms per answer", "errors"]


def postgres_note(figure: dict[str, Any], runs: dict[str, list[Any]], rate: Callable[[Any], float]) -> list[str]:
    """What the PostgreSQL row is and how it compares with SQLite's, or why it is missing."""
    if figure.get("postgres_skipped"):
        return ["", f"trt_bot (PostgreSQL): not measured — {figure['postgres_skipped']}."]
    if "trt_bot_postgres" not in runs:
        return []
    postgres, sqlite = median(map(rate, runs["trt_bot_postgres"])), median(map(rate, runs["trt_bot"]))
    share = f"{num(postgres / sqlite * 100)}%" if postgres and sqlite else "n/a"
    return ["", f"{POSTGRES_ROWS} PostgreSQL / SQLite: {share} of the rate (medians)."]


def e2e_section(results: dict[str, Any], plan: Any) -> list[str]:
    e2e = results.get("e2e")
    if not e2e:
        return []
    burst_rows = [_load_row(NAMES[k], runs, True) for k, runs in e2e["burst"].items() if k != "trt_bot_memory"]
    paced_rows = [_load_row(NAMES[k], runs, False) for k, runs in e2e["paced"].items()]
    rate = e2e["paced_rate"]
    return ["", "## 1. End to end: /start answered with one sendMessage", "",
            f"Burst: {num(plan.burst)} /start updates from 10,000 chats, posted over {plan.connections} connections "
            "as fast as each is acknowledged; answered/s = updates / (first post → last sendMessage at the fake), "
            "so a bot that acks first and answers later is charged for its backlog. acked/s and ack latency "
            "(request → webhook 200) are wrk's, while it posted; answered/s while posting counts the replies that "
            "reached the fake while wrk posted (a bot whose handlers stall during a burst shows it here). CPU is a "
            "share of one core over the burst; CPU per answer includes the acks.", ""] + table(
            ["server", "answered/s", "answered/s while posting", *LOAD_HEADER[1:], "burst s", *CPU_HEADER],
            burst_rows) + postgres_note(
            e2e, e2e["burst"], lambda r: r.answered_rate) + [
            "", f"Paced: the same offered load for every bot, about {num(rate)} updates/s for {plan.measure_s:g} s "
            f"({plan.connections} connections each waiting ~{plan.connections * 1000 / rate:.0f} ms between "
            "requests; by default 3/4 of aiogram's burst answered/s, so aiogram is busy but keeping up). answered/s "
            "here counts replies during the window; below acked/s means a backlog is growing.", ""] + table(
            ["server", "answered/s", "acked/s (offered)", "ack p50 ms", "ack p99 ms", *CPU_HEADER], paced_rows)


def ingest_section(results: dict[str, Any]) -> list[str]:
    ingest = results.get("ingest")
    if not ingest:
        return []
    runs = ingest["runs"]
    rows = [[NAMES[k], spread(r.acked_rate for r in rs), spread((r.ack_p50_ms for r in rs), ms),
             spread((r.ack_p99_ms for r in rs), ms),
             f"{pct(median(r.cpu_server for r in rs))} / {pct(median(r.cpu_wrk for r in rs))}",
             spread((cpu_per_update(r, acked=True) * 1000 for r in rs), lambda v: num(v, 0)),
             num(sum(r.errors for r in rs))] for k, rs in runs.items()]
    bare_wrk = median(r.cpu_wrk for r in runs.get("bare", []))
    saturated = ([f"wrk itself used {pct(bare_wrk)} of its CPU against the bare server, so that row is the load "
                  "generator's limit as much as the server's: the bare ceiling is at least that, and trt_bot's share "
                  "of it at most what the targets show.", ""] if bare_wrk and bare_wrk > 0.85 else [])
    checks = [f"{num(rows_)} rows for {num(acked)} acks" + ("" if key == "trt_bot" else " on PostgreSQL")
              for key, counts in ingest["persisted"].items() for rows_, acked in counts]
    every = all(rows_ >= acked for counts in ingest["persisted"].values() for rows_, acked in counts)
    return ["", "## 2. Ingest ceiling: updates that need no reply (edited_message)", "",
            "trt_bot commits each update to its SQLite inbox before the 200; its handler ignores edits, so no Bot "
            "API call follows. The bare server answers 200 without parsing anything.", ""] + table(
            ["server", "acked/s", "ack p50 ms", "ack p99 ms", "CPU server / wrk", "server CPU µs per ack", "errors"],
            rows) + postgres_note(ingest, runs, lambda r: r.acked_rate) + [""] + saturated + [
            f"Persisted: trt_bot's inbox after each run held {'; '.join(checks)} (warm-up included) — "
            f"{'every acknowledged update was on disk' if every else 'SOME ACKNOWLEDGED UPDATES ARE MISSING'}."]


def latency_section(results: dict[str, Any], plan: Any) -> list[str]:
    lat = results.get("latency")
    if not lat:
        return []
    rows = [["idle", NAMES[k], num(r.sent), num(r.answered), ms(r.p50_ms), ms(r.p99_ms), ms(r.max_ms)]
            for k, r in lat["baseline"].items()]
    loaded = lat["loaded"]
    notes = []
    if loaded is None:
        rows.append([f"{plan.generations} generations in flight", "trt_bot", "—", "—", "—", "—", "—"])
        notes.append("Not run (--no-generation).")
    else:
        r = loaded["result"]
        label = f"{loaded['in_flight_min']} generations in flight"
        if r is None:
            rows.append([label, "trt_bot", "—", "—", "—", "—", "—"])
            notes.append(f"The bot never had {loaded['wanted']} jobs in flight (webhook statuses "
                         f"{loaded['statuses']}), so the probe did not run.")
        else:
            rows.append([label, "trt_bot", num(r.sent), num(r.answered), ms(r.p50_ms), ms(r.p99_ms), ms(r.max_ms)])
            notes.append(f"Each user pressed 🖼, sent a prompt and picked 1:1; the fake Kie holds every task in "
                         f"`generating`. Jobs in flight (trt_bot's /health) at the probe's start and end, the lower "
                         f"shown. By its end {loaded['created']} had reached Kie (createTask is paced at Kie's 20 per "
                         f"10 s; the rest wait their turn in the bot), and the bot polled recordInfo "
                         f"{num(loaded['polls_per_s'], 1)} times/s; {loaded['unauthorized']} calls refused for a bad key.")
    return ["", "## 3. /start reply latency (update posted → sendMessage seen at the fake)", "",
            f"{num(plan.probe_rate)} /start updates per second from new chats for {plan.probe_s:g} s; nothing else "
            "runs unless stated.", ""] + table(
            ["condition", "server", "sent", "answered", "p50 ms", "p99 ms", "max ms"], rows) + [""] + notes


def footprint_section(results: dict[str, Any], plan: Any) -> list[str]:
    fp = results.get("footprint")
    if not fp:
        return []
    rows = []
    for key in ("trt_bot", "aiogram", "ptb"):
        loaded = fp["loaded"][key]
        answered = "" if loaded["drained"] else f" (only {num(loaded['answered'])} answered)"
        ready = "first HTTP answer" if key == "ptb" else "/health 200"
        rows.append([NAMES[key], f"{spread(fp['startup'][key], lambda v: num(v, 3))} ({ready})",
                     spread(fp["idle"][key], lambda v: num(v, 1)), num(loaded["rss_mb"], 1) + answered,
                     f"{num(loaded['seconds'], 1)} s"])
    trt = fp["loaded"]["trt_bot"]
    notes = [f"RSS is VmRSS in MB (10^6 bytes). For scale: `python -c pass` alone takes "
             f"{num(fp['python_alone'], 3)} s to start here."]
    if fp["startup_ok"]:
        notes.append(f"trt_bot's /health says \"ok\" (database open) {spread(fp['startup_ok'], lambda v: num(v, 3))} s "
                     "after spawning.")
    if trt.get("db_mb") is not None:
        notes.append(f"trt_bot's SQLite files after {num(trt['answered'])} chats: {num(trt['db_mb'], 1)} MB on disk.")
    return ["", "## 4. Footprint: memory and start-up", "",
            f"Start-up: spawn → ready, {plan.startup_runs} start(s) each. RSS idle: 1 s after ready. "
            f"Then {num(plan.footprint_chats)} distinct chats each send /start (wrk, 40 connections) and RSS is read "
            "1 s after the last reply reached the fake.", ""] + table(
            ["server", "start-up s", "RSS idle MB", f"RSS after {num(plan.footprint_chats)} chats MB",
             "time to answer them"], rows) + [""] + [" ".join(notes)]


def durability_section(results: dict[str, Any]) -> list[str]:
    e2e = results.get("e2e")
    if not e2e:
        return []
    burst = e2e["burst"]
    rows = [_load_row(label, burst[key], True) for key, label in
            (("trt_bot", "SQLite file (as shipped)"), ("trt_bot_memory", "sqlite:///:memory:"))]
    disk = median(r.answered_rate for r in burst["trt_bot"])
    memory = median(r.answered_rate for r in burst["trt_bot_memory"])
    cost = f"{(1 - disk / memory) * 100:.0f}%" if disk and memory else "n/a"
    return ["", "## 5. Durability cost: inbox on disk vs in memory (figure 1's burst)", ""] + table(
        ["trt_bot inbox", *LOAD_HEADER, "burst s", *CPU_HEADER], rows) + [
        "", f"Throughput given up for the file: {cost} (median answered/s, disk vs :memory:; a negative share means "
            "the file run was faster, i.e. the difference is noise). Both are SQLite on its own thread with group "
            "commits; :memory: only removes the file, the WAL and fsync-free page writes."]


def _drain(run: Any) -> str:
    if run.drain_s is not None:
        return num(run.drain_s, 1)
    return f"— ({num(run.expected - run.answered)} lost)" if run.answered < run.expected else "—"


def flood_section(results: dict[str, Any]) -> list[str]:
    flood = results.get("flood")
    if not flood:
        return []
    rules = flood["rules"]
    lines = ["", "## 6. Flood: a burst of /start against Telegram's limits", "",
             f"A fake Bot API that enforces Telegram's limits: {rules['per_second']} sends/s across chats, "
             f"{rules['private_per_second']}/s in a private chat, {rules['group_per_minute']}/min in a group "
             f"(sliding windows, each {rules['grace_s'] * 1000:.0f} ms shorter for the fake's own scheduling "
             f"jitter). A send past any of them gets 429 with retry_after = {rules['retry_after_s']} s, and "
             "the wait applies to the whole bot: every send until it ends gets 429 too; answerCallbackQuery is "
             "exempt. Each bot is started once and takes every burst (all updates posted at once over up to "
             "40 connections). Drain: first post → last reply taken by the fake; ideal: the shortest drain the "
             "limits allow (N / rate, or the per-chat / per-group bound when that is longer). A bot that, once the "
             "ideal time has passed, answers nothing new and receives no 429 for a few seconds has given up: its "
             "missing replies are lost.",
             "", "trt_bot " + ("paces its sends (it has `TELEGRAM_SEND_RATE`)." if flood["trt_paced"] else
                               "was measured before its paced outbox: it has no `TELEGRAM_SEND_RATE` setting, and "
                               "each 429 is retried by the call that got it.")]
    for key, description in flood["scenarios"].items():
        rows = []
        for bot, by_scenario in flood["runs"].items():
            run = by_scenario[key]
            refused = f" ({num(run.expected - run.acked)} not acknowledged)" if run.acked < run.expected else ""
            rows.append([NAMES[bot], f"{num(run.answered)}/{num(run.expected)}{refused}", num(run.too_many),
                         num(run.pauses), _drain(run), f"{num(run.ideal_s, 1)} ({run.bound})",
                         num(run.ratio, 2) + "×" if run.ratio is not None else "—"])
        lines += ["", f"**{key}**: {description}", ""] + table(
            ["bot", "answered", "429s received", "flood pauses", "drain s", "ideal s", "drain / ideal"], rows)
    return lines


def _lost(runs: list[Any]) -> int:
    return sum(max(0, r.expected - r.answered) for r in runs)


def _answered_after_drain(runs: list[Any]) -> str:
    """Requests still in flight when wrk stops are handled too, so a bot may answer more than wrk saw acked."""
    expected, answered, lost = sum(r.expected for r in runs), sum(r.answered for r in runs), _lost(runs)
    if lost:
        return f"{num(answered)}/{num(expected)} ({num(lost)} missing)"
    return f"all {num(expected)}" + (f" (+{num(answered - expected)} in flight at the cut)" if answered > expected else "")


def overload_section(results: dict[str, Any]) -> list[str]:
    over = results.get("overload")
    if not over:
        return []
    rows = []
    for key, runs in over["runs"].items():
        rows.append([NAMES[key], spread(r.offered_rate for r in runs), spread(r.acked_rate for r in runs),
                     spread((r.ack_p50_ms for r in runs), ms), spread((r.ack_p99_ms for r in runs), ms),
                     spread(r.answered_rate for r in runs),
                     _answered_after_drain(runs),
                     spread((r.drain_s for r in runs), lambda v: num(v, 1)), pct(median(r.cpu_server for r in runs)),
                     num(sum(r.errors for r in runs))])
    return ["", "## 7. Overload: offered twice what trt_bot can process", "",
            f"trt_bot's processing capacity, measured first as in figure 1's burst: {num(over['capacity'])} /start "
            f"answered per second. Then each bot is offered {num(over['rate'])}/s for the window (wrk on a fixed "
            "schedule over 40 connections, as Telegram would offer them: a free connection waits for its slot, a "
            "late one sends at once; offered/s falls short only when all 40 are waiting for acks). Acks are wrk's "
            "(request → webhook 200). After the load stops the bot drains: every acknowledged update must be "
            "answered (nothing lost); drain is load stopped → last reply.", ""] + table(
            ["server", "offered/s", "acked/s", "ack p50 ms", "ack p99 ms", "answered/s in window",
             "answered after drain", "drain s", "CPU server", "errors"], rows)


# -- targets ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    name: str
    goal: str
    measured: str
    passed: bool | None  # None: not measured
    informational: bool = False  # shown for context, not one of the targets

    @property
    def verdict(self) -> str:
        word = "SKIP" if self.passed is None else "PASS" if self.passed else "MISS"
        return f"context: {word.lower()}" if self.informational else f"**{word}**"


def targets(results: dict[str, Any], plan: Any) -> list[Target]:
    out: list[Target] = []
    e2e = results.get("e2e")
    if e2e:
        for what, figure, goal in (("answered/s over the burst", lambda r: r.answered_rate, 1.0),
                                   ("answered/s while posting", lambda r: r.answered_while_posting, 0.5),
                                   ("server CPU per answer", cpu_per_update, -0.5)):  # negative: at most
            trt = median(map(figure, e2e["burst"]["trt_bot"]))
            aio = median(map(figure, e2e["burst"]["aiogram"]))
            ratio = trt / aio if trt and aio else None
            out.append(Target(f"{what} vs aiogram", f"{'≥' if goal > 0 else '≤'} {abs(goal):g}×",
                              f"{num(trt, 2)} vs {num(aio, 2)} = {num(ratio, 2)}×",
                              ratio is not None and (ratio >= goal if goal > 0 else ratio <= -goal)))
        trt99 = median(r.ack_p99_ms for r in e2e["paced"]["trt_bot"])
        aio99 = median(r.ack_p99_ms for r in e2e["paced"]["aiogram"])
        share = trt99 / aio99 if trt99 and aio99 else None
        out.append(Target(f"ack p99 vs aiogram at the same offered load ({num(e2e['paced_rate'])}/s)", "≤ 1/10",
                          f"{ms(trt99)} vs {ms(aio99)} ms = 1/{num(1 / share, 1) if share else 'n/a'}",
                          share is not None and share <= 0.1))
        burst_trt99 = median(r.ack_p99_ms for r in e2e["burst"]["trt_bot"])
        burst_aio99 = median(r.ack_p99_ms for r in e2e["burst"]["aiogram"])
        if burst_trt99 and burst_aio99:
            share = burst_trt99 / burst_aio99
            out.append(Target("ack p99 vs aiogram during the burst (40 connections flat out; rates differ)", "≤ 1/10",
                              f"{ms(burst_trt99)} vs {ms(burst_aio99)} ms = 1/{num(1 / share, 1)}", share <= 0.1,
                              informational=True))
    ingest = results.get("ingest")
    if ingest:
        trt = median(r.acked_rate for r in ingest["runs"]["trt_bot"])
        bare = median(r.acked_rate for r in ingest["runs"]["bare"])
        share = trt / bare if trt and bare else None
        out.append(Target("ingest acks/s vs the bare server", "≥ 50%",
                          f"{num(trt)} vs {num(bare)} = {num(share * 100 if share else None)}%",
                          share is not None and share >= 0.5))
    lat = results.get("latency")
    if lat is not None:
        loaded = lat["loaded"]
        name = f"/start p99 with {plan.generations} generations in flight"
        if loaded is None or loaded["result"] is None:
            reason = "not run (--no-generation)" if loaded is None else "the jobs never were all in flight"
            out.append(Target(name, "< 50 ms", reason, None if loaded is None else False))
        else:
            p99 = loaded["result"].p99_ms
            out.append(Target(name, "< 50 ms", f"{ms(p99)} ms", p99 < 50))
    out += flood_targets(results) + overload_targets(results)
    fp = results.get("footprint")
    if fp:
        idle = median(fp["idle"]["trt_bot"])
        out.append(Target("trt_bot RSS idle", "< 60 MB", f"{num(idle, 1)} MB", idle is not None and idle < 60))
        start = median(fp["startup"]["trt_bot"])
        out.append(Target("trt_bot start-up to /health 200", "< 0.5 s", f"{num(start, 3)} s",
                          start is not None and start < 0.5))
    return out


def flood_targets(results: dict[str, Any]) -> list[Target]:
    flood = results.get("flood")
    if not flood:
        return []
    out = []
    for key, run in flood["runs"]["trt_bot"].items():
        measured = (f"{num(run.answered)}/{num(run.expected)}, {num(run.too_many)} 429s, "
                    f"drain {num(run.ratio, 2) + '×' if run.ratio is not None else 'not reached'}")
        passed = run.answered == run.expected and run.too_many <= 3 and run.ratio is not None and run.ratio <= 1.1
        out.append(Target(f"flood {key}: all answered, ≤ 3 429s, drain ≤ 1.1× ideal", "all, ≤ 3, ≤ 1.1×",
                          measured, passed))
    return out


def overload_targets(results: dict[str, Any]) -> list[Target]:
    over = results.get("overload")
    if not over:
        return []
    runs = over["runs"]["trt_bot"]
    p99 = median(r.ack_p99_ms for r in runs)
    lost = _lost(runs)
    return [Target(f"ack p99 offered 2× capacity ({num(over['rate'])}/s)", "≤ 10 ms", f"{ms(p99)} ms",
                   p99 is not None and p99 <= 10),
            Target("nothing lost once the overload stops", "all answered", _answered_after_drain(runs), lost <= 0)]


def targets_section(results: dict[str, Any], plan: Any) -> list[str]:
    rows = [[t.name, t.goal, t.measured, t.verdict] for t in targets(results, plan)]
    return ["", "## Targets (ratios from this run)", ""] + table(["target", "goal", "measured", "result"], rows)


# -- profile --------------------------------------------------------------------------------------

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def trt_sections(source: Path) -> list[tuple[int, str]]:
    """(first line, "§N Title") for each banner in trt_bot.py, so profile lines map to its sections."""
    sections = []
    for number, line in enumerate(source.read_text().splitlines(), 1):
        match = re.match(r"# (\d+)\. (\S.*)$", line)
        if match:
            sections.append((number, f"trt_bot §{match.group(1)} {match.group(2).strip()}"))
    return sections


def _where(frame: str, sections: list[tuple[int, str]]) -> tuple[str, str]:
    """(function label, code area) of one py-spy frame."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip(), "other"
    func, file, line = match.group("func"), match.group("file"), match.group("line")
    if file.endswith("trt_bot.py"):
        area = next((title for first, title in reversed(sections) if line and int(line) >= first), "trt_bot")
        return f"{func} (trt_bot.py)", area
    short = file.rsplit("site-packages/", 1)[-1].rsplit("python3.11/", 1)[-1]
    if func == "Runner.run":
        return "Runner.run (asyncio/runners.py)", "event loop internals (uvloop, C)"
    if "importlib" in short:
        return f"{func} ({short})", "imports at run time"
    package = short.split("/", 1)[0].removesuffix(".py")
    area = {"httpx": "httpx stack", "httpcore": "httpx stack", "h11": "httpx stack", "anyio": "httpx stack"}.get(
        package, f"stdlib {package}" if "/" in short or short.endswith(".py") else package)
    return f"{func} ({short})", area


def summarize_profile(path: Path, source: Path, top: int = 10) -> list[str]:
    """Where trt_bot's CPU went, from py-spy's raw (collapsed) output: by thread, by code area
    (self time), the hottest functions (self time) and trt_bot's own functions (inclusive)."""
    if not path.exists():
        return [f"(no profile at {path.name}: py-spy failed?)"]
    sections = trt_sections(source)
    by_thread, by_area, by_self, inclusive = (collections.Counter() for _ in range(4))
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames.pop(0).split(": ", 1)[-1] if frames[0].startswith("thread") else "?"
        by_thread[thread] += count
        total += count
        placed = [_where(f, sections) for f in frames]
        if not placed:
            continue
        func, area = placed[-1]
        by_self[func] += count
        by_area[area] += count
        for name in {f for f, a in placed if a.startswith("trt_bot")}:
            inclusive[name] += count
    if not total:
        return ["(empty profile)"]

    def share(counter: collections.Counter, n: int) -> list[str]:
        return [f"| {c * 100 / total:.1f} | `{name}` |" for name, c in counter.most_common(n)]

    return ([f"{total:,} samples of busy threads: " + ", ".join(f"{t} {c * 100 / total:.0f}%"
                                                              for t, c in by_thread.most_common(4)), "",
             "| self % | code area |", "|---|---|"] + share(by_area, top) +
            ["", "| self % | function |", "|---|---|"] + share(by_self, top) +
            ["", "| inclusive % | trt_bot function |", "|---|---|"] + share(inclusive, top))


def profile_section(results: dict[str, Any]) -> list[str]:
    profiles = results.get("profile")
    if not profiles:
        return []
    source = Path(__file__).resolve().parent.parent / "trt_bot.py"
    lines = ["", "## Profile of trt_bot (py-spy, extra runs not counted above)", "",
             "py-spy record --rate 250 --nonblocking --threads on trt_bot during one figure-1 burst and one figure-2 "
             "window; raw stacks in bench/results/profile-*.txt. Self time is the innermost frame; C code (uvloop, "
             "SQLite) counts against the Python frame that called it."]
    for name, path in profiles.items():
        lines += ["", f"### {name}", ""] + summarize_profile(path, source)
    return lines


def render(results: dict[str, Any], ctx: Context) -> str:
    plan = ctx.plan
    lines = header(ctx) + harness_section(results) + e2e_section(results, plan) + ingest_section(results)
    lines += latency_section(results, plan) + footprint_section(results, plan) + durability_section(results)
    lines += flood_section(results) + overload_section(results)
    lines += targets_section(results, plan) + profile_section(results)
    return "\n".join(lines) + "\n"
