"""Smoke test: ``python bench/run.py --quick`` runs every figure end to end and writes its table.

Before it, the flood figure's yardsticks are checked on their own (no I/O): the
fake Bot API's flood control and the ideal drain a burst is measured against.

Skips (with the reason) when wrk or the peer frameworks are not installed:
``apt-get install -y wrk`` and ``pip install -r bench/requirements.txt``.
Run it with ``python -m pytest bench/test_bench_smoke.py`` (a few minutes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fakes import FakeBotApi, FloodControl, FloodRules
import pgserver

BENCH = Path(__file__).resolve().parent
NEEDED = {"aiogram": "aiogram", "telegram": "python-telegram-bot", "tornado": "python-telegram-bot[webhooks]",
          "aiolimiter": "python-telegram-bot[rate-limiter]", "uvloop": "uvloop"}


def missing_tools() -> list[str]:
    missing = [] if shutil.which("wrk") else ["wrk (apt-get install -y wrk)"]
    missing += [f"{package} (pip install -r bench/requirements.txt)"
                for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]
    return missing


def send(api: FakeBotApi, method: str, chat_id: int) -> tuple[int, dict]:
    body = b'{"chat_id":%d,"text":"hi"}' % chat_id
    status, payload, _, _ = api.handle(b"POST", f"/bot1:x/{method}".encode(), b"", body)
    return status, json.loads(payload)


def test_flood_control_takes_thirty_sends_a_second_then_pauses_every_send_for_retry_after() -> None:
    flood = FloodControl(FloodRules())
    assert [flood.admit(chat, chat / 100) for chat in range(1, 31)] == [0] * 30
    assert flood.admit(31, 0.30) == 2  # the 31st within a second
    assert flood.admit(32, 1.5) == 1  # another chat, later, inside the pause: the pause is the bot's
    assert flood.admit(32, 2.31) == 0
    assert (flood.rejected, flood.pauses) == (2, 1)


def test_flood_control_allows_one_send_a_second_in_a_private_chat_and_twenty_a_minute_in_a_group() -> None:
    private = FloodControl(FloodRules())
    assert private.admit(7, 0.0) == 0
    assert private.admit(7, 0.5) == 2
    assert private.admit(7, 2.5) == 0
    group = FloodControl(FloodRules())
    assert [group.admit(-7, n * 2.0) for n in range(20)] == [0] * 20
    assert group.admit(-7, 40.0) == 2  # the 21st inside the minute
    assert group.admit(-7, 60.0) == 0  # a minute after the first


def test_flood_control_windows_leave_a_grace_for_the_fakes_own_scheduling_jitter() -> None:
    flood = FloodControl(FloodRules(grace_s=0.1))
    assert flood.admit(7, 0.0) == 0
    assert flood.admit(7, 0.95) == 0  # paced a second apart, stamped 50 ms early by a stalled fake
    assert [flood.admit(chat, 1.0 + chat / 1000) for chat in range(100, 130)] == [0] * 29 + [2]


def test_fake_bot_api_answers_429_with_retry_after_and_exempts_answer_callback_query() -> None:
    api = FakeBotApi(FloodRules(per_second=1))
    assert send(api, "sendMessage", 5)[0] == 200
    status, payload = send(api, "editMessageText", 6)
    assert (status, payload["error_code"], payload["parameters"]) == (429, 429, {"retry_after": 2})
    assert send(api, "answerCallbackQuery", 6)[0] == 200
    assert send(api, "sendMessage", 6)[0] == 429
    assert (api.answered, api.flood.rejected) == ({5: 1}, 2)


def test_flood_ideal_is_the_rate_bound_or_the_per_chat_bound_whichever_is_longer() -> None:
    from run import FloodScenario

    rules = FloodRules()
    assert FloodScenario("chats", 300, 1).ideal(rules) == (10.0, "300 / 30/s")
    assert FloodScenario("per_chat", 20, 10).ideal(rules) == pytest.approx((9 + 20 / 30, "1/s per chat"))
    assert FloodScenario("groups", 10, 25, group=True).ideal(rules) == pytest.approx((60 + 50 / 30, "20/min per group"))
    assert FloodScenario("groups", 60, 5, group=True).ideal(rules) == (10.0, "300 / 30/s")


def test_benchmark_postgres_server_flushes_every_commit_like_sqlite_synchronous_full() -> None:
    reason = pgserver.unavailable_reason()
    if reason:
        pytest.skip(reason)
    server = pgserver.BenchPostgres(pgserver.bin_dir(), None)
    try:
        server.start()
        url = server.new_database_url()
        settings = {name: server.admin(f"SHOW {name}")[0][0]
                    for name in ("fsync", "synchronous_commit", "full_page_writes")}
        assert settings == {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
        server.drop(url)
        assert server.admin("SELECT count(*) FROM pg_database WHERE datname = 'trt_bench_1'") == [(0,)]
    finally:
        server.remove()
    assert not os.path.exists(server.root)


def test_quick_run_prints_every_figure(tmp_path: Path) -> None:
    missing = missing_tools()
    if missing:
        pytest.skip("benchmark tools not installed: " + "; ".join(missing))
    if len(os.sched_getaffinity(0)) < 1:
        pytest.skip("no CPU to run on")
    out = tmp_path / "latest.md"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout  # printed and written alike
    for heading in ("The harness is not the bottleneck", "## 1. End to end", "## 2. Ingest ceiling",
                    "## 3. /start reply latency", "## 4. Footprint", "## 5. Durability cost", "## 6. Flood",
                    "## 7. Overload", "## Targets"):
        assert heading in text, heading
    targets = text.split("## Targets", 1)[1]
    verdicts = re.findall(r"\*\*(PASS|MISS|SKIP)\*\*", targets)
    assert len(verdicts) >= 6, targets
    # Every bot answered something and every figure has numbers, not "n/a", where measured.
    end_to_end = text.split("## 1. End to end", 1)[1].split("## 2.", 1)[0]
    for name in ("trt_bot", "aiogram 3", "PTB 22"):
        row = next(line for line in end_to_end.splitlines() if line.startswith(f"| {name} |"))
        assert re.search(r"\| [1-9][\d,]* ", row), row
    assert "every acknowledged update was on disk" in text
    # trt_bot on PostgreSQL beside SQLite in figures 1 and 2, or the reason it was not measured.
    postgres_unavailable = pgserver.unavailable_reason()
    ingest = text.split("## 2. Ingest ceiling", 1)[1].split("## 3.", 1)[0]
    for figure in (end_to_end, ingest):
        if postgres_unavailable:
            assert f"trt_bot (PostgreSQL): not measured — {postgres_unavailable}" in figure, figure
        else:
            row = next(line for line in figure.splitlines() if line.startswith("| trt_bot (PostgreSQL) |"))
            assert re.search(r"\| [1-9][\d,]* ", row), row
            assert "PostgreSQL / SQLite: " in figure, figure
    assert postgres_unavailable or "acks on PostgreSQL" in ingest
    # The flood figure: every bot answered something in every burst, and the fake's limits bit somewhere
    # (in the quick bursts the peers without a rate limiter get 429s).
    flood = text.split("## 6. Flood", 1)[1].split("## 7.", 1)[0]
    for name in ("trt_bot", "aiogram 3", "PTB 22", "PTB 22 + AIORateLimiter"):
        rows = [line for line in flood.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == 3, (name, flood)
        assert all(re.match(rf"\| {re.escape(name)} \| [1-9][\d,]*/[1-9]", row) for row in rows), rows
    assert re.search(r"\| aiogram 3 \| [\d,]+/[\d,]+ \| [1-9]", flood), flood
    # The overload figure: both bots acknowledged and answered everything they acknowledged.
    overload = text.split("## 7. Overload", 1)[1].split("## Targets", 1)[0]
    for name in ("trt_bot", "aiogram 3"):
        row = next(line for line in overload.splitlines() if line.startswith(f"| {name} |"))
        assert "| all " in row, row
