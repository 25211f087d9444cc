"""Operating the bot: section 14 of trt_bot.py (the lease, deploys, /diag/lock, /metrics, ``check``) and the
deploy files (Dockerfile, the Render Blueprints render.yaml and render.postgres.yaml).

Two-instance tests run real bot processes on one database; the deploy tests post to both, as Render's proxy does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import glob
import inspect
import itertools
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

import trt_bot
from conftest import (DIAG_TOKEN, HERE, KIE_KEY, SECRETS, TOKEN, ManualClock, bot_env, eventually, eventually_async,
                      free_port, post_update, run_bot_cli, stop_within, update_callback, update_message)

SCHEMA_PATH = os.path.join(HERE, "..", "shared", "render-blueprint.schema.json")


async def get_json(base_url: str, path: str, **headers: str) -> dict:
    async with httpx.AsyncClient(verify=False) as client:
        return (await client.get(base_url + path, headers=headers)).json()


###############################################################################
# 14. The lease: one active instance per database
###############################################################################

@pytest.fixture
def lease_db(database_url):
    """A connection to a fresh database of each kind, migrated, outside any transaction."""
    conn = trt_bot.Database(trt_bot.parse_database_url(database_url)).dialect.connect(None)
    yield conn
    conn.close()


def test_a_free_or_expired_lease_is_taken_and_a_live_one_is_not(lease_db):
    me, other = "hostA:1:aaa", "hostB:2:bbb"
    assert trt_bot.lease_claim(lease_db, other, 15, now=1000) == (True, other, 1015)
    assert trt_bot.lease_claim(lease_db, me, 15, now=1010) == (False, other, 1015)  # live holder: never stolen
    assert trt_bot.lease_claim(lease_db, other, 15, now=1012) == (True, other, 1027)  # the holder renews
    assert trt_bot.lease_claim(lease_db, me, 15, now=1028) == (True, me, 1043)  # expired: taken
    trt_bot.lease_release(lease_db, other)  # releasing someone else's lease does nothing
    assert trt_bot.lease_claim(lease_db, other, 15, now=1030)[0] is False
    trt_bot.lease_release(lease_db, me)
    assert trt_bot.lease_claim(lease_db, other, 15, now=1031)[0] is True


ME = trt_bot.ProcessIdentity("web", 1, "me", "4026531836", "boot-a", "500").owner()


def holder(pid: int = 7, namespace: str = "4026531836", boot: str = "boot-a", start: str = "400") -> str:
    return trt_bot.ProcessIdentity("web", pid, "it", namespace, boot, start).owner()


@pytest.mark.parametrize("label, holder_owner, me, probed, gone", [
    ("its pid no longer runs", holder(), ME, (False, ""), True),
    ("its pid runs a process started later", holder(), ME, (True, "900"), True),
    ("an earlier process that had my pid", holder(pid=1), ME, (True, "500"), True),
    ("it runs, started when it said", holder(), ME, (True, "400"), False),
    ("it runs, start time unreadable", holder(), ME, (True, ""), False),
    ("another App in my process", holder(pid=1, start="500"), ME, (True, "500"), False),
    ("another PID namespace, same pid (two containers)", holder(pid=1, namespace="4026532179"), ME, (False, ""), False),
    ("another boot", holder(boot="boot-b"), ME, (False, ""), False),
    ("it could not read its namespace", holder(namespace=""), ME, (False, ""), False),
    ("I cannot read mine", holder(namespace=""), holder(pid=2, namespace=""), (False, ""), False),
    ("it did not record its start time", holder(start=""), ME, (True, "900"), False),
    ("an owner written by an older version", "web:7:abcdef-0001", ME, (False, ""), False),
    ("garbage", "web:99999999999999999999:x:4026531836:boot-a:1", ME, (False, ""), False),
])
def test_a_holder_is_taken_for_gone_only_when_provably_gone(label, holder_owner, me, probed, gone):
    asked = []

    def probe(pid: int) -> tuple[bool, str]:
        asked.append(pid)
        return probed

    assert trt_bot.lease_owner_is_gone(holder_owner, me, probe) is gone, label
    assert all(pid == trt_bot.ProcessIdentity.parse(holder_owner).pid for pid in asked)


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        return f.read().rpartition(")")[2].split()[0]


def test_probe_tells_a_running_process_from_an_exited_or_zombie_one():
    runs, start_time = trt_bot.probe_pid(os.getpid())
    assert runs and start_time == trt_bot.current_process_identity("me").start_time
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exited but not reaped until wait()
    try:
        deadline = time.monotonic() + 10
        while process_state(zombie.pid) != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        assert trt_bot.probe_pid(zombie.pid) == (False, "")
    finally:
        zombie.wait()
    assert trt_bot.probe_pid(zombie.pid) == (False, "")


def test_a_dead_holder_in_my_pid_namespace_is_not_waited_out(lease_db):
    me = trt_bot.current_process_identity("me")
    assert me.pid_namespace and me.boot_id and me.start_time, "this test needs Linux's /proc"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trt_bot.lease_claim(lease_db, dataclasses.replace(me, pid=dead.pid, instance="dead").owner(), 15, now=1000)
    assert trt_bot.lease_claim(lease_db, me.owner(), 15, now=1001)[0] is True
    # an earlier process that had my pid (a restarted container) is gone too
    trt_bot.lease_release(lease_db, me.owner())
    trt_bot.lease_claim(lease_db, dataclasses.replace(me, instance="old", start_time="1").owner(), 15, now=1002)
    assert trt_bot.lease_claim(lease_db, me.owner(), 15, now=1003)[0] is True
    # but another instance in this very process is alive
    trt_bot.lease_claim(lease_db, dataclasses.replace(me, instance="other").owner(), 15, now=1100)
    assert trt_bot.lease_claim(lease_db, me.owner(), 15, now=1101)[0] is False
    # and so is a holder with my pid in another PID namespace, until its lease expires
    other_container = dataclasses.replace(me, instance="twin", pid_namespace="1", start_time="1").owner()
    trt_bot.lease_claim(lease_db, other_container, 15, now=1200)
    assert trt_bot.lease_claim(lease_db, me.owner(), 15, now=1201)[0] is False
    assert trt_bot.lease_claim(lease_db, me.owner(), 15, now=1216)[0] is True


def open_lease(database_url: str, clock: trt_bot.Clock = trt_bot.SYSTEM_CLOCK) -> trt_bot.Role:
    return trt_bot.Role(trt_bot.Database(trt_bot.parse_database_url(database_url), busy_timeout_ms=10_000),
                        ttl=15, clock=clock)


def expire_the_lease(conn) -> None:
    conn.execute("UPDATE lease SET owner='web:7:killed', expires_at=0")


async def test_two_instances_racing_for_a_free_or_expired_lease_never_both_win(database_url):
    # Each instance claims on its own connection and thread, at the same moment, round after round;
    # the lease is freed between rounds as if its holder had been killed.
    leases = [open_lease(database_url), open_lease(database_url)]
    assert all([await lease.db.open() for lease in leases])
    for _ in range(60):
        held = await asyncio.gather(*(lease.claim() for lease in leases))
        assert sorted(held) == [False, True], held  # never both, never neither
        await leases[0].db.write(expire_the_lease)
    for lease in leases:
        await lease.db.close()


async def test_on_postgresql_the_lease_runs_on_the_servers_clock_not_the_hosts(postgres):
    url = postgres.new_database_url()
    late_host, early_host = ManualClock(time.time() - 3600), ManualClock(time.time() + 3600)  # an hour off each way
    holder, other = open_lease(url, late_host), open_lease(url, early_host)
    assert await holder.db.open() and await other.db.open()
    assert await holder.claim() is True
    assert abs(holder.expires_at - (time.time() + 15)) < 5  # the server's now, not the holder's clock
    assert await other.claim() is False  # by its own clock the lease expired an hour ago; by the server's it lives
    await holder.db.write(expire_the_lease)
    assert await other.claim() is True
    await holder.db.close()
    await other.db.close()


async def test_the_role_follows_the_lease_on_each_apps_own_clock(fake_tg, tmp_path):
    # Two apps on one database, each with a clock of its own: only the clock moves the lease, and the role
    # (and with it whether the pipeline processes) follows the lease both ways.
    config = trt_bot.load_config(bot_env(fake_tg, str(tmp_path / "shared.sqlite3"), LEASE_TTL_S="3"))
    first_clock, second_clock = ManualClock(), ManualClock()
    first, second = trt_bot.App(config, clock=first_clock), trt_bot.App(config, clock=second_clock)
    try:
        await first.start()
        await second.start()
        assert first.role.may_act()
        assert not second.role.may_act()
        await eventually(lambda: second_clock.sleepers >= 3)  # the lease, database and red-flag loops wait
        second_clock.advance(3.5)  # the first's lease has expired on the second's clock: taken
        await eventually(lambda: second.role.may_act())
        assert first.role.may_act()  # its clock stands still: it has not looked since
        await eventually(lambda: first_clock.sleepers >= 3)
        first_clock.advance(1.0)  # the holder's renewal finds the lease taken: it turns passive
        await eventually(lambda: not first.role.may_act())
    finally:
        await stop_within(first, 60)
        await stop_within(second, 60)


async def test_a_standby_takes_a_released_lease_at_its_next_peek(fake_tg, tmp_path):
    # The holder stops (SIGTERM) and releases the lease: the standby must not wait for its next claim.
    config = trt_bot.load_config(bot_env(fake_tg, str(tmp_path / "shared.sqlite3"), LEASE_TTL_S="60"))
    first, standby_clock = trt_bot.App(config), ManualClock(start=time.time())  # the lease is in wall time
    standby = trt_bot.App(config, clock=standby_clock)
    try:
        await first.start()
        await standby.start()
        assert (first.role.may_act(), standby.role.may_act()) == (True, False)
        await stop_within(first, 60)
        await eventually(lambda: standby_clock.sleepers >= 3)  # the lease, database and red-flag loops wait
        standby_clock.advance(trt_bot.LEASE_PEEK_S)  # a tenth of the time between its claims
        await eventually(lambda: standby.role.may_act())
    finally:
        await stop_within(first, 60)
        await stop_within(standby, 60)


async def test_a_standby_takes_the_lease_of_a_holder_that_exited_at_its_next_peek(fake_tg, tmp_path):
    database = str(tmp_path / "shared.sqlite3")
    standby_clock = ManualClock(start=time.time())  # the lease is in wall time
    standby = trt_bot.App(trt_bot.load_config(bot_env(fake_tg, database, LEASE_TTL_S="60")), clock=standby_clock)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = dataclasses.replace(trt_bot.current_process_identity("holder"), pid=holder.pid,
                                       start_time=trt_bot.probe_pid(holder.pid)[1])
        with contextlib.closing(trt_bot.SqliteFile(database).connect(None)) as conn, conn:
            assert trt_bot.lease_claim(conn, identity.owner(), 60, time.time())[0]
        await standby.start()
        assert not standby.role.may_act()  # the holder runs
        holder.kill()
        holder.wait()
        await eventually(lambda: standby_clock.sleepers >= 3)
        standby_clock.advance(trt_bot.LEASE_PEEK_S)  # a tenth of the time between its claims
        await eventually(lambda: standby.role.may_act())
    finally:
        holder.kill()
        holder.wait()
        await stop_within(standby, 60)


async def test_a_holder_renews_its_lease_while_shutdown_finishes_its_work_then_hands_over(fake_tg, tmp_path):
    # Used to: shutdown stopped renewing before finishing the updates in hand; a drain longer than the lease
    # let the standby take over while the old holder still handled them (each could be answered twice).
    config = trt_bot.load_config(bot_env(fake_tg, str(tmp_path / "shared.sqlite3"), LEASE_TTL_S="3"))
    holder_clock, standby_clock = ManualClock(start=time.time()), ManualClock(start=time.time())
    holder, standby = trt_bot.App(config, clock=holder_clock), trt_bot.App(config, clock=standby_clock)
    handler_may_end, handling = asyncio.Event(), asyncio.Event()

    async def slow_handler(update: dict) -> None:
        handling.set()
        await handler_may_end.wait()

    try:
        await holder.start()
        await standby.start()
        holder.pipeline.handler = slow_handler
        assert (await post_update(holder, update_message(1, 9, "/start"))).status_code == 200
        await handling.wait()
        stopping = asyncio.create_task(holder.stop())

        def renewal_asleep() -> bool:  # started, so it sleeps on the clock before the clock moves
            renewal = [t for t in asyncio.all_tasks() if t.get_name() == "lease"]
            return bool(renewal) and inspect.getcoroutinestate(renewal[0].get_coro()) == inspect.CORO_SUSPENDED

        await eventually(renewal_asleep)
        for _ in range(4):  # 4 s of drain, past the 3 s lease; the holder renews every second of it
            renewed_until = holder.role.expires_at
            await eventually(lambda: holder_clock.sleepers >= 1 and standby_clock.sleepers >= 3)
            holder_clock.advance(1.0)
            await eventually(lambda: holder.role.expires_at > renewed_until)
            checked = standby.role.last_check
            standby_clock.advance(1.0)
            await eventually(lambda: standby.role.last_check > checked)
            assert not standby.role.may_act()
        handler_may_end.set()
        await asyncio.wait_for(stopping, 60)
        with contextlib.closing(sqlite3.connect(tmp_path / "shared.sqlite3")) as conn:
            assert conn.execute("SELECT done_at IS NOT NULL FROM inbox").fetchall() == [(1,)]  # none left for the next
        await eventually(lambda: standby_clock.sleepers >= 3)
        standby_clock.advance(trt_bot.LEASE_PEEK_S)  # released once the work was done: taken at the next peek
        await eventually(lambda: standby.role.may_act())
    finally:
        handler_may_end.set()
        await stop_within(holder, 60)
        await stop_within(standby, 60)


ALIVE_ELSEWHERE = "otherhost:7:holder:4026531999:another-boot:1"  # in another PID namespace: may be alive


def stored_work_of_a_live_holder(path: str, photo_url: str) -> None:
    """The lease of a holder that may be alive, one reply it queued and one finished job it has to deliver."""
    with contextlib.closing(trt_bot.SqliteFile(path).connect(None)) as conn, conn:
        assert trt_bot.lease_claim(conn, ALIVE_ELSEWHERE, 600, time.time())[0]
        conn.execute("INSERT INTO outbox(id, chat_id, method, params, queued_at, update_id) VALUES (1, 91, "
                     "'sendMessage', ?, ?, NULL)", (json.dumps({"chat_id": 91, "text": "the holder's"}), time.time()))
        job = trt_bot.Job("00112233aabbccdd", 91, 91, "ru", "zimage", "маяк", "1:1", state="succeeded",
                          result_url=photo_url, created_at=time.time(), updated_at=time.time())
        trt_bot.jobs_save(conn, [tuple(vars(job).values())])


async def test_a_bot_started_without_its_database_claims_the_lease_before_resuming_anything_stored(
        make_app, fake_tg, fake_kie, tmp_path, monkeypatch):
    # Used to: it served from memory as if active, and when the database came back it sent the holder's
    # queued reply and delivered its job before its claim found the lease taken: the user got both twice.
    monkeypatch.setattr(trt_bot, "DB_RETRY_S", 0.1)
    path = str(tmp_path / "bot.sqlite3")
    stored_work_of_a_live_holder(path, fake_kie.image_url())
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the database is unusable when the bot starts
    app = await make_app(KIE_API_KEY=KIE_KEY, KIE_API_BASE=fake_kie.base_url)
    assert not app.db.ok
    await post_update(app, update_message(1, 92, "/start"))
    await eventually(lambda: fake_tg.texts_to(92))  # /start is answered from memory meanwhile
    locker.execute("ROLLBACK")
    locker.close()
    await eventually(lambda: app.db.ok and app.role.handovers == 1)  # the claim found the holder: it let go
    await app.role.outbox.stop(grace=0)  # a barrier: no sender is left to send anything
    assert not app.role.may_act()
    assert fake_tg.texts_to(91) == [] and fake_tg.calls_of("sendPhoto") == []


async def test_an_instance_whose_database_locks_before_its_first_claim_is_answered_does_not_act(tmp_path):
    # Used to: a new instance whose first claim met a lock held past the busy timeout counted its database as
    # never usable and acted from memory beside the holder (seen in a deploy on a loaded machine).
    db = trt_bot.Database(str(tmp_path / "bot.sqlite3"))
    assert await db.open()
    role = trt_bot.Role(db, 15)
    locker = sqlite3.connect(tmp_path / "bot.sqlite3", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the holder's long transaction
    try:
        assert await role.claim() is None and not db.ok
        assert not role.may_act()
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        await db.close()


async def test_a_database_another_instance_holds_for_a_moment_still_opens(tmp_path):
    # Used to: an open meeting a holder's commit slower than the 100 ms busy timeout failed, and the new
    # instance, its database never usable, acted from memory beside the holder.
    path = tmp_path / "bot.sqlite3"
    first = trt_bot.Database(str(path))
    assert await first.open()
    await first.close()
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(0.3, lambda: (locker.execute("ROLLBACK"), locker.close()))
    release.start()
    db = trt_bot.Database(str(path))
    try:
        assert await db.open() and db.ok
        assert not trt_bot.Role(db, 15).may_act()  # shared: it waits for its claim's answer
    finally:
        release.join()
        await db.close()


async def test_a_holder_cut_off_from_its_database_stops_acting_before_its_lease_can_expire(make_app, fake_tg,
                                                                                         tmp_path):
    # Used to: it kept answering from memory after its lease expired, while another instance took over.
    clock = ManualClock(start=time.time(), passing_s=0.01)  # the send pacer's spacing passes at once
    app = await make_app(clock=clock, LEASE_TTL_S="3")
    assert app.role.may_act()
    locker = sqlite3.connect(tmp_path / "bot.sqlite3", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another process holds the file: no write, no renewal
    try:
        assert (await post_update(app, update_message(1, 93, "/start"))).status_code == 200  # from memory
        await eventually(lambda: fake_tg.texts_to(93))
        clock.advance(2.1)  # past two thirds of the 3 s lease since the last claim was sent
        assert app.role.acting_left() == 0 and not app.role.may_act()
        assert (await post_update(app, update_message(2, 93, "/help"))).status_code == 503  # Telegram sends it again
        lock = await get_json(f"http://127.0.0.1:{app.port}", "/diag/lock")
        assert (lock["active"], lock["lock_acquired"]) == (False, False)
        app.telegram.retry = trt_bot.ONE_TRY  # else it tries again until its budget: the lease may be renewed
        with pytest.raises(trt_bot.TelegramError, match="may not act"):
            await app.telegram.send_message(93, "late")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert len(fake_tg.texts_to(93)) == 1


async def test_a_handler_still_running_when_the_lease_is_lost_queues_no_reply_and_leaves_its_update(
        make_app, fake_tg, tmp_path):
    # Used to: the hand-over paused the outbox, then the handler queued its reply (stored, and sent by a later
    # take-over) and marked its update done, so the new holder might never answer it.
    app = await make_app(LEASE_TTL_S="3")
    entered, may_end, handle = asyncio.Event(), asyncio.Event(), app.pipeline.handler

    async def slow_handler(update: dict) -> None:
        entered.set()
        await may_end.wait()
        await handle(update)

    app.pipeline.handler = slow_handler
    assert (await post_update(app, update_message(1, 95, "/start"))).status_code == 200
    await entered.wait()
    with contextlib.closing(sqlite3.connect(tmp_path / "bot.sqlite3")) as conn, conn:
        conn.execute("UPDATE lease SET owner=?, expires_at=?", (ALIVE_ELSEWHERE, time.time() + 600))
    await eventually(lambda: app.role.handovers == 1)  # its next renewal found the lease taken
    may_end.set()
    await app.pipeline.stop(grace=10)  # a barrier: the handler ended and any done mark is written
    with contextlib.closing(sqlite3.connect(tmp_path / "bot.sqlite3")) as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)
        assert conn.execute("SELECT done_at FROM inbox").fetchall() == [(None,)]  # the holder answers it
    assert fake_tg.texts_to(95) == []


async def start_pair(fake_tg, tmp_path, bot_processes, **overrides: str):
    """Two bot processes on one database (DATABASE_URL in ``overrides``, else a SQLite file), the first active."""
    env = bot_env(fake_tg, str(tmp_path / "shared.sqlite3"), PORT=str(free_port()), **{"LEASE_TTL_S": "3", **overrides})
    first = bot_processes(env)
    await first.wait_healthy()
    second = bot_processes({**env, "PORT": str(free_port())})
    await second.wait_healthy()
    return first, second, trt_bot.load_config(env)


async def post_to(bot, config, update: dict) -> int:
    async with httpx.AsyncClient(verify=False) as client:
        response = await client.post(bot.base_url + config.webhook_path, json=update,
                                     headers={"X-Telegram-Bot-Api-Secret-Token": config.webhook_secret})
    return response.status_code


async def test_two_processes_on_one_database_process_each_update_once(fake_tg, tmp_path, bot_processes, database_url):
    first, second, config = await start_pair(fake_tg, tmp_path, bot_processes, DATABASE_URL=database_url)
    lock_first, lock_second = await get_json(first.base_url, "/diag/lock"), await get_json(second.base_url, "/diag/lock")
    assert (lock_first["active"], lock_first["lock_acquired"]) == (True, True)
    assert (lock_second["active"], lock_second["lock_acquired"]) == (False, False)
    assert lock_second["owner"] == lock_first["instance_id"] != lock_second["instance_id"]
    health_second = await get_json(second.base_url, "/health")
    assert (health_second["active"], health_second["lock_acquired"]) == (False, False)
    for n in range(1, 41):  # Telegram's posts land on either instance
        assert await post_to(first if n % 2 else second, config, update_message(n, 700 + n, "/start")) == 200
    await eventually(lambda: len(fake_tg.calls_of("sendMessage")) >= 40, timeout=15)
    assert second.terminate() == 0 and first.terminate() == 0  # each finishes all it started: nothing comes after
    chats = [p["chat_id"] for p in fake_tg.calls_of("sendMessage")]
    assert sorted(chats) == list(range(701, 741))  # every reply once, the passive one's posts included
    assert "[LOCK] acquired" in first.log and "INFO trt_bot: [LOCK] passive" in second.log  # a deploy's, not a fault
    assert "[COMMANDS] menu" in first.log and "[COMMANDS]" not in second.log  # only the active one sets the menu


async def test_when_the_active_process_is_killed_the_passive_one_takes_over(fake_tg, tmp_path, bot_processes,
                                                                            database_url):
    first, second, config = await start_pair(fake_tg, tmp_path, bot_processes, DATABASE_URL=database_url)
    first.kill()
    for n in range(1, 6):  # arrive while nobody is active yet: stored, not lost
        assert await post_to(second, config, update_message(n, 800 + n, "/start")) == 200
    await eventually(lambda: fake_tg.calls_of("sendMessage"), timeout=5)  # within the 3 s lease and a retry
    await eventually(lambda: len(fake_tg.calls_of("sendMessage")) == 5)
    lock = await get_json(second.base_url, "/diag/lock")
    assert (lock["active"], lock["lock_acquired"], lock["owner"]) == (True, True, lock["instance_id"])
    assert (await get_json(second.base_url, "/health"))["active"] is True


async def test_when_the_active_process_stops_gracefully_the_other_takes_over_at_once(fake_tg, tmp_path,
                                                                                      bot_processes):
    first, second, config = await start_pair(fake_tg, tmp_path, bot_processes, LEASE_TTL_S="60")
    assert first.terminate() == 0
    assert "[LOCK] released" in first.log

    async def second_is_active():
        return (await get_json(second.base_url, "/diag/lock"))["active"]

    await eventually_async(second_is_active, bool, timeout=5)  # far less than the 60 s lease
    assert await post_to(second, config, update_message(1, 900, "/start")) == 200
    await eventually(lambda: fake_tg.texts_to(900))


UNSHARE_PID = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")


def why_separate_pid_namespaces_are_unavailable() -> str:
    """The reason a process cannot be started in a PID namespace of its own here, or ""."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    tried = subprocess.run([*UNSHARE_PID, "true"], capture_output=True, text=True, timeout=10)
    if tried.returncode != 0:
        return f"unshare --pid is not permitted here: {tried.stderr.strip()}"
    return ""


async def test_two_processes_that_are_both_pid_1_on_one_host_are_never_both_active(fake_tg, tmp_path, bot_processes):
    # Regression: two containers with one hostname, each the pid 1 of its own PID namespace, took each
    # other for a dead holder and stole the lease at every renewal: 20 updates got 40 replies.
    reason = why_separate_pid_namespaces_are_unavailable()
    if reason:
        pytest.skip(reason)
    env = bot_env(fake_tg, str(tmp_path / "shared.sqlite3"), PORT=str(free_port()), LEASE_TTL_S="3")
    first = bot_processes(env, UNSHARE_PID)
    await first.wait_healthy()
    second = bot_processes({**env, "PORT": str(free_port())}, UNSHARE_PID)
    await second.wait_healthy()
    config = trt_bot.load_config(env)
    ids = [(await get_json(bot.base_url, "/diag/lock"))["instance_id"] for bot in (first, second)]
    assert all(instance.startswith(f"{socket.gethostname()}:1:") for instance in ids)  # same host, same pid
    for n in range(1, 21):
        assert await post_to(first if n % 2 else second, config, update_message(n, 1100 + n, "/start")) == 200
    await eventually(lambda: len(fake_tg.calls_of("sendMessage")) >= 20, timeout=15)
    renewed_after = trt_bot.iso_utc(time.time() + 3 * 1.0)  # three renewals: three chances to steal the lease

    async def both_checked_since() -> bool:
        locks = [await get_json(bot.base_url, "/diag/lock") for bot in (first, second)]
        return all(lock["last_check"] > renewed_after for lock in locks)

    await eventually_async(both_checked_since, bool, timeout=10)  # both renewed or tried for the lease since
    locks = [await get_json(bot.base_url, "/diag/lock") for bot in (first, second)]
    assert [lock["active"] for lock in locks] == [True, False]
    assert sorted(p["chat_id"] for p in fake_tg.calls_of("sendMessage")) == list(range(1101, 1121))
    assert "[LOCK] acquired" not in second.log


###############################################################################
# 14. Deploys: the new instance starts beside the old one, then the old one gets SIGTERM
###############################################################################

DEPLOY_LEASE_TTL_S = 10  # far longer than a handover: a SIGTERM handover must not wait for the lease to expire
TEXTS = trt_bot.TEXTS["ru"]
PROMPT_MAX_CHARS = trt_bot.Z_IMAGE.prompt_chars[1]  # "new" asks for a Z-Image prompt


def reply_token(text: str) -> str:
    """A reply shortened to what it answers: a too-long prompt's reply names the prompt's length."""
    too_long = re.match(re.escape(TEXTS["prompt_too_long"].split("{")[0]) + r"(\d+)", text)
    if too_long:
        return f"long{int(too_long[1]) - PROMPT_MAX_CHARS - 1}"
    for key in ("ask_prompt", "ask_ratio"):
        if text.startswith(TEXTS[key].split("{")[0]):
            return key
    return text[:40]


class RenderProxy:
    """Telegram behind Render's proxy during a deploy: each update goes to the live instances in turn, and again
    (to the next one) until one acknowledges it; a chat's next update only once its last one was acknowledged."""

    def __init__(self, client: httpx.AsyncClient, config: trt_bot.Config):
        self.client = client
        self.config = config
        self.instances: list = []
        self.acked_by: collections.Counter[int] = collections.Counter()  # port -> updates it acknowledged
        self._turn = itertools.count()

    async def deliver(self, update: dict) -> None:
        headers = {"X-Telegram-Bot-Api-Secret-Token": self.config.webhook_secret}
        while True:
            bot = self.instances[next(self._turn) % len(self.instances)]
            try:
                response = await self.client.post(bot.base_url + self.config.webhook_path, json=update,
                                                   headers=headers)
            except httpx.HTTPError:
                response = None  # that instance no longer listens
            if response is not None and response.status_code == 200:
                self.acked_by[bot.port] += 1
                return
            await asyncio.sleep(0.02)  # Telegram retries later

    async def call_back(self, bot, task_id: str, body: dict) -> int:
        url = f"{bot.base_url}/{self.config.kie_callback_path}?token={self.config.kie_callback_token}"
        return (await self.client.post(url, json=body)).status_code


class ChatStream:
    """One chat sending, one after another until stopped, prompts the bot refuses as too long: each reply
    names its prompt's length, so the replies show whether each update was answered once, in order."""

    def __init__(self, chat_id: int, update_ids: Iterable[int]):
        self.chat_id = chat_id
        self.update_ids = update_ids
        self.expected = ["ask_prompt"]
        self.stop = asyncio.Event()

    async def run(self, proxy: RenderProxy) -> None:
        await proxy.deliver(update_callback(next(self.update_ids), self.chat_id, "new"))
        while not self.stop.is_set():
            n = len(self.expected) - 1
            await proxy.deliver(update_message(next(self.update_ids), self.chat_id,
                                               "x" * (PROMPT_MAX_CHARS + 1 + n)))
            self.expected.append(f"long{n}")
            await asyncio.sleep(0.01)  # a user's pace: the stream spans the whole deploy

    def replies(self, fake_tg) -> list[str]:
        return [reply_token(text) for text in fake_tg.texts_to(self.chat_id)]


async def lock_of(client: httpx.AsyncClient, bot) -> dict:
    try:
        return (await client.get(bot.base_url + "/diag/lock")).json()
    except httpx.HTTPError:
        return {}


async def seconds_until_active(client: httpx.AsyncClient, bot, since: float, timeout: float) -> float:
    """How long after ``since`` (time.monotonic) ``bot`` reports itself active, checked every 10 ms."""
    deadline = since + timeout
    while not (await lock_of(client, bot)).get("active"):
        assert time.monotonic() < deadline, f"not active within {timeout}s"
        await asyncio.sleep(0.01)
    return time.monotonic() - since


async def test_a_deploy_answers_every_update_once_in_order_and_delivers_the_job_in_flight(
        fake_tg, fake_kie, tmp_path, bot_processes, database_url, harness_log_masked):
    env = bot_env(fake_tg, str(tmp_path / "bot.db"), DATABASE_URL=database_url, PORT=str(free_port()),
                  KIE_API_KEY=KIE_KEY, KIE_API_BASE=fake_kie.base_url, LEASE_TTL_S=str(DEPLOY_LEASE_TTL_S))
    update_ids = itertools.count(1)
    chats = [ChatStream(5000 + n, update_ids) for n in range(6)]
    async with httpx.AsyncClient(timeout=10.0) as client:
        proxy = RenderProxy(client, trt_bot.load_config(env))
        old = bot_processes(env)
        await old.wait_healthy()
        proxy.instances.append(old)
        for update in (update_callback(next(update_ids), 4000, "new"),  # a generation: new, a prompt, a ratio
                       update_message(next(update_ids), 4000, "маяк"),
                       update_callback(next(update_ids), 4000, "ratio:1:1")):
            await proxy.deliver(update)
        await eventually(lambda: fake_kie.created)  # the job is at Kie
        streams = [asyncio.create_task(chat.run(proxy)) for chat in chats]
        try:
            await eventually(lambda: sum(proxy.acked_by.values()) >= 30)
            new = bot_processes({**env, "PORT": str(free_port())})
            await new.wait_healthy()
            proxy.instances.append(new)  # Render routes to both while the new one is live
            await eventually(lambda: proxy.acked_by[new.port] >= 20)  # the standby stores them for the holder
            assert not (await lock_of(client, new))["active"]
            sigterm_at = time.monotonic()
            old.process.terminate()
            handover_s = await seconds_until_active(client, new, sigterm_at, DEPLOY_LEASE_TTL_S)
            assert await asyncio.to_thread(old.process.wait, 30) == 0
            acked_after = sum(proxy.acked_by.values())
            await eventually(lambda: sum(proxy.acked_by.values()) >= acked_after + 30)  # the new one alone now
        finally:
            for chat in chats:
                chat.stop.set()
            await asyncio.gather(*streams)
        (task_id,) = fake_kie.tasks
        fake_kie.complete(task_id)
        assert await proxy.call_back(new, task_id, fake_kie.callback_body(task_id)) == 200
        await eventually(lambda: fake_tg.calls_of("sendPhoto"))
        await eventually(lambda: all(len(chat.replies(fake_tg)) >= len(chat.expected) for chat in chats), timeout=20)
        assert await asyncio.to_thread(new.terminate) == 0  # it finishes what it started: nothing comes after
    print(f"\nhandover after SIGTERM: {handover_s * 1000:.0f} ms (LEASE_TTL_S={DEPLOY_LEASE_TTL_S}); "
          f"updates acknowledged by the old instance {proxy.acked_by[old.port]}, by the new {proxy.acked_by[new.port]}")
    for chat in chats:
        assert chat.replies(fake_tg) == chat.expected, f"chat {chat.chat_id}"
    assert [p["caption"].split("\n")[1] for p in fake_tg.calls_of("sendPhoto")] == ["маяк"]  # under "1:1 · Z-Image"
    assert [reply_token(text) for text in fake_tg.texts_to(4000)] == ["ask_prompt", "ask_ratio"]
    assert [edit["text"] for edit in fake_tg.calls_of("editMessageText")
            if int(edit["chat_id"]) == 4000][0] == "⏳ 1:1 · Z-Image · 0:00"  # the ratio question became the status
    assert "[LOCK] released" in old.log and "[LOCK] acquired" in new.log


async def test_a_photo_on_its_way_at_sigterm_is_sent_once_by_the_old_instance_before_it_hands_over(
        fake_tg, fake_kie, tmp_path, bot_processes, database_url, harness_log_masked):
    env = bot_env(fake_tg, str(tmp_path / "bot.db"), DATABASE_URL=database_url, PORT=str(free_port()),
                  KIE_API_KEY=KIE_KEY, KIE_API_BASE=fake_kie.base_url, LEASE_TTL_S=str(DEPLOY_LEASE_TTL_S))
    update_ids = itertools.count(1)
    async with httpx.AsyncClient(timeout=10.0) as client:
        proxy = RenderProxy(client, trt_bot.load_config(env))
        old = bot_processes(env)
        await old.wait_healthy()
        proxy.instances.append(old)
        for update in (update_callback(next(update_ids), 4100, "new"),
                       update_message(next(update_ids), 4100, "маяк"),
                       update_callback(next(update_ids), 4100, "ratio:1:1")):
            await proxy.deliver(update)
        await eventually(lambda: fake_kie.created)
        new = bot_processes({**env, "PORT": str(free_port())})
        await new.wait_healthy()
        proxy.instances.append(new)
        fake_tg.stall("sendPhoto")
        (task_id,) = fake_kie.tasks
        fake_kie.complete(task_id)
        assert await proxy.call_back(old, task_id, fake_kie.callback_body(task_id)) == 200
        await eventually(lambda: fake_tg.held("sendPhoto") == 1)  # the photo is on its way
        old.process.terminate()
        await eventually(lambda: "[APP] shutting down" in old.log)
        checked_after = trt_bot.iso_utc(time.time() + 1.0)  # the standby claims every second, and peeks between
        lock = await eventually_async(lambda: lock_of(client, new), lambda lock: lock["last_check"] > checked_after)
        assert not lock["active"]  # the old one holds the lease until the photo it is sending is out
        fake_tg.release("sendPhoto")
        await seconds_until_active(client, new, time.monotonic(), DEPLOY_LEASE_TTL_S)
        assert await asyncio.to_thread(old.process.wait, 30) == 0
        assert await asyncio.to_thread(new.terminate) == 0  # it finishes what it started: nothing comes after
    assert [p["caption"].split("\n")[1] for p in fake_tg.calls_of("sendPhoto")] == ["маяк"]  # under "1:1 · Z-Image"
    assert [reply_token(text) for text in fake_tg.texts_to(4100)] == ["ask_prompt", "ask_ratio"]  # then the status


KILL_LEASE_TTL_S = 3


@pytest.mark.parametrize("wrapper", [(), UNSHARE_PID], ids=["one PID namespace", "a PID namespace each"])
async def test_a_killed_holder_is_replaced_within_the_lease_ttl_and_nothing_sent_meanwhile_is_lost(
        fake_tg, tmp_path, bot_processes, database_url, harness_log_masked, wrapper):
    # In its own PID namespace (another container, as on Render) the standby cannot see the holder is gone:
    # it waits out the lease.  In one namespace it sees it at its next peek.
    if wrapper and (reason := why_separate_pid_namespaces_are_unavailable()):
        pytest.skip(reason)
    env = bot_env(fake_tg, str(tmp_path / "bot.db"), DATABASE_URL=database_url, PORT=str(free_port()),
                  LEASE_TTL_S=str(KILL_LEASE_TTL_S))
    async with httpx.AsyncClient(timeout=10.0) as client:
        proxy = RenderProxy(client, trt_bot.load_config(env))
        holder = bot_processes(env, wrapper)
        await holder.wait_healthy()
        standby = bot_processes({**env, "PORT": str(free_port())}, wrapper)
        await standby.wait_healthy()
        assert (await lock_of(client, holder))["active"] and not (await lock_of(client, standby))["active"]
        killed_at = time.monotonic()
        holder.kill()
        proxy.instances.append(standby)
        for n in range(1, 6):  # arrive while nobody is active: stored, answered once the standby takes over
            await proxy.deliver(update_message(n, 6000 + n, "/start"))
        takeover_s = await seconds_until_active(client, standby, killed_at,
                                                KILL_LEASE_TTL_S + trt_bot.PASSIVE_RETRY_S + 1.0)

        async def processed() -> int:
            return (await client.get(standby.base_url + "/health")).json()["queue"]["total_processed"]

        # (unshare does not pass SIGTERM on: the standby cannot be stopped gracefully to show nothing comes after)
        await eventually_async(processed, lambda count: count >= 5)
    print(f"\ntakeover after kill -9 ({'a PID namespace each' if wrapper else 'one PID namespace'}): "
          f"{takeover_s * 1000:.0f} ms (LEASE_TTL_S={KILL_LEASE_TTL_S})")
    # Handled, then sent from the outbox: every reply goes, once.
    await eventually(lambda: len(fake_tg.calls_of("sendMessage")) >= 5)
    assert sorted(p["chat_id"] for p in fake_tg.calls_of("sendMessage")) == list(range(6001, 6006))


###############################################################################
# 14. /metrics and DIAG_TOKEN
###############################################################################

def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return values


async def test_metrics_parse_as_prometheus_text_and_move_with_traffic(make_app, fake_tg):
    app = await make_app(DIAG_TOKEN=DIAG_TOKEN)
    base = f"http://127.0.0.1:{app.port}"
    bearer = {"Authorization": f"Bearer {DIAG_TOKEN}"}
    async with httpx.AsyncClient(base_url=base, verify=False) as client:
        before = metric_values((await client.get("/metrics", headers=bearer)).text)
        await post_update(app, update_message(1, 42, "/start"))
        await eventually(lambda: fake_tg.calls_of("sendMessage"))
        # Handled, and its reply over: a handler returns before its reply is sent (the outbox sends it).
        await eventually(lambda: app.pipeline.stats.processed == 1 and app.role.outbox.depth == 0)
        response = await client.get("/metrics", headers=bearer)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    after = metric_values(response.text)
    assert after["trt_updates_received_total", ()] == before["trt_updates_received_total", ()] + 1
    assert after["trt_updates_processed_total", ()] == 1
    assert after["trt_telegram_calls_total", (("method", "sendMessage"), ("outcome", "ok"))] == 1
    assert after["trt_webhook_ack_seconds_count", ()] == 1 and after["trt_update_handling_seconds_count", ()] == 1
    assert after["trt_webhook_ack_seconds_bucket", (("le", "+Inf"),)] == 1
    assert after["trt_active", ()] == 1 and after["trt_database_ok", ()] == 1
    assert ("trt_jobs_finished_total", (("outcome", "success"),)) in after


@pytest.mark.parametrize("path", ["/metrics", "/diag/lock", "/diag/webhook"])
async def test_diag_token_guards_diagnostics_but_not_health(make_app, path):
    app = await make_app(DIAG_TOKEN=DIAG_TOKEN)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}", verify=False) as client:
        assert (await client.get(path)).status_code == 401
        assert (await client.get(path, headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await client.get(path, headers={"Authorization": f"Bearer {DIAG_TOKEN}"})).status_code == 200
        assert (await client.get(path, params={"token": DIAG_TOKEN})).status_code == 200
        assert (await client.get("/health")).status_code == 200


def test_histogram_buckets_are_cumulative_and_labels_escaped(monkeypatch):
    monkeypatch.setitem(trt_bot.HISTOGRAMS, "x_seconds", ((0.1, 1.0), "h"))
    histograms = trt_bot.new_histograms()
    for value in (0.05, 0.1, 0.5, 7.0):
        trt_bot.observe(histograms, "x_seconds", value)
    text = trt_bot.exposition([trt_bot.histogram_family("x_seconds", histograms["x_seconds"]),
                               ("y_total", "counter", "c", [("", {"m": 'a"b\\c'}, 2)])]).decode()
    assert 'x_seconds_bucket{le="0.1"} 2.0' in text and 'x_seconds_bucket{le="1.0"} 3.0' in text
    assert 'x_seconds_bucket{le="+Inf"} 4.0' in text and "x_seconds_sum 7.65" in text
    assert 'y_total{m="a\\"b\\\\c"} 2.0' in text
    assert {f.name for f in text_string_to_metric_families(text)} == {"x_seconds", "y"}


###############################################################################
# 14. Red flags: Telegram's pending count and a growing inbox backlog
###############################################################################

async def test_a_pending_count_over_the_limit_is_raised_once_and_cleared_once(make_app):
    flags = (await make_app()).diagnostics
    changes = [flags.observe_pending(n) for n in (10, 51, 80, 60, 50, 40, 90)]
    assert [change and change[0] for change in changes] == [None, "raised", None, None, "cleared", None, "raised"]
    (warning,) = flags.raised.values()
    assert warning["flag"] == "pending_updates" and warning["reason"] == "Telegram holds 90 pending updates (over 50)"
    assert warning["fix"] == trt_bot.RED_FLAGS["pending_updates"][1] and warning["reason"] in changes[-1][2]
    assert changes[4][1:] == ("pending_updates", "Telegram holds 50 pending updates (at most 50)")


async def test_a_backlog_growing_check_after_check_is_raised_until_it_goes_down(make_app, monkeypatch):
    monkeypatch.setattr(trt_bot, "BACKLOG_GROWTH_FLAG_CHECKS", 3)
    flags = (await make_app()).diagnostics
    backlogs = (0, 5, 10, 20, 30, 30, 40, 35, 36, 37, 0)
    changes = [flags.observe_backlog(n) for n in backlogs]
    assert [change and change[0] for change in changes] == [None, None, None, "raised", None, None, None, "cleared",
                                                            None, None, None]
    assert changes[3][2].startswith("the inbox backlog grew at 3 checks in a row, to 20 updates; the workers do not")
    assert changes[7][2] == "the inbox backlog is going down (35 updates)" and not flags.raised


async def health_of(app) -> dict:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{app.port}/health")).json()


def flag_records(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("[FLAG]") and text in r.getMessage()]


@pytest.fixture
def quick_red_flags(monkeypatch):
    monkeypatch.setattr(trt_bot, "RED_FLAG_CHECK_S", 0.05)
    monkeypatch.setattr(trt_bot, "WEBHOOK_CHECK_S", 0.05)
    monkeypatch.setattr(trt_bot, "DIAG_CACHE_S", 0.0)
    monkeypatch.setattr(trt_bot, "BACKLOG_GROWTH_FLAG_CHECKS", 3)


async def test_telegram_holding_over_50_updates_is_warned_once_and_shown_in_health(make_app, fake_tg, caplog,
                                                                                   quick_red_flags):
    app = await make_app()
    await eventually(lambda: fake_tg.calls_of("setWebhook"))
    fake_tg.webhook_info["pending_update_count"] = 73
    await eventually(lambda: flag_records(caplog, "Telegram holds 73"))
    asked = len(fake_tg.calls_of("getWebhookInfo"))
    await eventually(lambda: len(fake_tg.calls_of("getWebhookInfo")) >= asked + 3)  # checked again, still over
    assert len(flag_records(caplog, "pending updates")) == 1
    assert [w for w in (await health_of(app))["warnings"] if w["reason"] == "Telegram holds 73 pending updates (over 50)"]
    fake_tg.webhook_info["pending_update_count"] = 2
    await eventually(lambda: flag_records(caplog, "cleared"))
    asked = len(fake_tg.calls_of("getWebhookInfo"))
    await eventually(lambda: len(fake_tg.calls_of("getWebhookInfo")) >= asked + 3)
    assert flag_records(caplog, "cleared") == ["[FLAG] cleared: Telegram holds 2 pending updates (at most 50)"]
    assert (await health_of(app))["warnings"] == [] and (await health_of(app))["status"] == "ok"


async def test_an_inbox_backlog_that_keeps_growing_is_warned_once_and_cleared_when_it_drains(make_app, caplog,
                                                                                           quick_red_flags, monkeypatch):
    app = await make_app(UPDATE_QUEUE_WORKERS="1", UPDATE_QUEUE_SIZE="1")
    unstuck = asyncio.Event()

    async def stuck(method: str, params: dict, on_sent: object = None) -> None:
        await unstuck.wait()
    monkeypatch.setattr(app.role.outbox, "call", stuck)  # the one worker is stuck: every update waits in the inbox
    async with httpx.AsyncClient() as client:
        for n in range(1, 1000):
            await post_update(app, update_message(n, 2000 + n, "/start"), client)
            if flag_records(caplog, "the inbox backlog grew"):
                break
            await asyncio.sleep(0.02)  # a few updates between checks, so each check sees it grow
    assert (await health_of(app))["warnings"][0]["reason"].startswith("the inbox backlog grew at ")
    unstuck.set()
    await eventually(lambda: flag_records(caplog, "cleared: the inbox backlog is going down"))
    await eventually(lambda: app.pipeline.backlog == 0)
    assert len(flag_records(caplog, "the inbox backlog grew")) == 1
    assert (await health_of(app))["warnings"] == []


async def health_and_metrics(app) -> tuple[int, dict, dict]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}") as client:
        health = await client.get("/health")
        return health.status_code, health.json(), metric_values((await client.get("/metrics")).text)


def raised_flag_records(caplog, flag: str) -> list[logging.LogRecord]:
    """The log records raising ``flag``: its reason's first words are in each."""
    return [r for r in caplog.records if r.getMessage().startswith("[FLAG]") and "cleared" not in r.getMessage()
            and flag in r.getMessage()]


async def flagged_once_everywhere(app, caplog, flag: str, says: str, checks: Callable[[], int]) -> dict:
    """``flag`` is raised, logged once (while ``checks`` shows the condition seen again), in /health with HTTP
    200 and a fix, and 1 in /metrics; returns its warning."""
    await eventually(lambda: raised_flag_records(caplog, says))
    seen = checks()
    await eventually(lambda: checks() >= seen + 3)
    (record,) = raised_flag_records(caplog, says)
    status, health, metrics = await health_and_metrics(app)
    (warning,) = [w for w in health["warnings"] if w["flag"] == flag]
    assert status == 200 and says in warning["reason"] and warning["fix"] and health["status"] != "ok"
    assert metrics["trt_red_flag", (("flag", flag),)] == 1
    assert record.levelno == (logging.ERROR if trt_bot.RED_FLAGS[flag][0] == "failing" else logging.WARNING)
    return warning


async def test_a_revoked_token_is_flagged_once_as_failing_and_cleared_when_accepted(make_app, fake_tg, caplog,
                                                                                   quick_red_flags):
    app = await make_app()
    await eventually(lambda: fake_tg.calls_of("setWebhook"))
    token, fake_tg.token = fake_tg.token, "987654321:AAHrevokedTOKENrevokedTOKENrevokedXY"
    warning = await flagged_once_everywhere(app, caplog, "token_rejected", "Telegram rejects the bot token",
                                            lambda: app.telegram.calls["getWebhookInfo", "401"])
    assert "TELEGRAM_BOT_TOKEN" in warning["fix"] and (await health_of(app))["status"] == "failing"
    fake_tg.token = token
    await eventually(lambda: flag_records(caplog, "cleared: Telegram accepts the bot token again"))
    assert (await health_and_metrics(app))[2]["trt_red_flag", (("flag", "token_rejected"),)] == 0


async def test_a_current_webhook_error_is_flagged_with_its_fix_and_its_age_and_pending_count_are_gauges(
        make_app, fake_tg, caplog, quick_red_flags):
    app = await make_app()
    await eventually(lambda: fake_tg.calls_of("setWebhook"))
    fake_tg.webhook_info.update(last_error_message="Wrong response from the webhook: 401 Unauthorized",
                                last_error_date=int(time.time()), pending_update_count=3)
    warning = await flagged_once_everywhere(app, caplog, "webhook_error", "401 Unauthorized",
                                            lambda: len(fake_tg.calls_of("getWebhookInfo")))
    assert "WEBHOOK_SECRET_TOKEN" in warning["fix"]
    metrics = (await health_and_metrics(app))[2]
    assert metrics["trt_telegram_pending_updates", ()] == 3 and 0 <= metrics["trt_webhook_last_error_age_seconds", ()] < 60
    fake_tg.webhook_info["pending_update_count"] = 0  # Telegram delivered them: the error is history
    await eventually(lambda: flag_records(caplog, "cleared: Telegram delivers again"))


async def test_a_webhook_error_from_before_the_bot_started_is_not_flagged(make_app, fake_tg, caplog, quick_red_flags):
    fake_tg.webhook_info.update(last_error_message="Connection refused", last_error_date=int(time.time()) - 30,
                                pending_update_count=3)
    app = await make_app()
    await eventually(lambda: len(fake_tg.calls_of("getWebhookInfo")) >= 4)
    assert not flag_records(caplog, "Connection refused") and (await health_of(app))["warnings"] == []


async def test_webhook_set_up_failing_in_a_loop_is_flagged_once_until_it_succeeds(make_app, fake_tg, caplog,
                                                                                quick_red_flags, monkeypatch):
    monkeypatch.setattr(trt_bot, "UNTIL_DONE", dataclasses.replace(trt_bot.UNTIL_DONE, base_s=0.05, cap_s=0.05))
    for _ in range(30):
        fake_tg.fail("setWebhook", 400, {"ok": False, "error_code": 400,
                                         "description": "Bad Request: bad webhook: HTTPS url must be provided"})
    app = await make_app()
    warning = await flagged_once_everywhere(app, caplog, "setup_failing", "HTTPS url must be provided",
                                            lambda: app.telegram.calls["setWebhook", "400"])
    assert "WEBHOOK_BASE_URL" in warning["fix"]
    await eventually(lambda: flag_records(caplog, "cleared: set-up succeeded"))
    assert (await health_of(app))["status"] == "ok"


async def test_a_stuck_outbox_is_flagged_once_as_failing(make_app, fake_tg, caplog, quick_red_flags, monkeypatch):
    monkeypatch.setattr(trt_bot, "OUTBOX_STUCK_FLAG_S", 0.5)
    app = await make_app()
    fake_tg.stall("sendMessage")
    try:
        await post_update(app, update_message(1, 4242, "/start"))
        await flagged_once_everywhere(app, caplog, "outbox_stuck", "the oldest of 1 replies has waited",
                                      lambda: int(app.role.outbox.oldest_wait_s() * 10))
        assert (await health_of(app))["status"] == "failing"
    finally:
        fake_tg.release("sendMessage")
    await eventually(lambda: flag_records(caplog, "cleared: the outbox moves again"))


async def test_low_kie_credits_are_flagged_once_and_the_admins_alerted_once(make_app, fake_tg, fake_kie, caplog,
                                                                          quick_red_flags, monkeypatch):
    monkeypatch.setattr(trt_bot, "KIE_CREDITS_CHECK_S", 0.05)
    app = await make_app(KIE_API_KEY=KIE_KEY, KIE_API_BASE=fake_kie.base_url, KIE_CREDITS_LOW="2000",
                         ADMIN_IDS="900")
    await flagged_once_everywhere(app, caplog, "kie_credits_low", "Kie.ai has 1234.5 credits left",
                                  lambda: app.kie.calls["credit", "ok"])
    assert (await health_and_metrics(app))[2]["trt_kie_credits", ()] == 1234.5
    (alert,) = await eventually(lambda: fake_tg.texts_to(900))
    assert alert == trt_bot.render("ru", "admin_credits_low", credits="1234.5", low=2000)
    fake_kie.credits = 5000
    await eventually(lambda: flag_records(caplog, "cleared: Kie.ai has 5000 credits"))


async def test_polling_without_the_bot_api_says_so_once_at_error_and_retries_quietly(make_app, caplog,
                                                                                      quick_red_flags):
    app = await make_app(BOT_MODE="polling", TELEGRAM_API_BASE=f"http://127.0.0.1:{free_port()}")

    def failed_calls() -> int:
        return sum(n for (method, outcome), n in app.telegram.calls.items() if outcome == "599")

    await flagged_once_everywhere(app, caplog, "telegram_unreachable", "cannot be reached", failed_calls)
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
            and not r.getMessage().startswith("[FLAG]")]
    assert loud == [] and {method for method, _ in app.telegram.calls} >= {"deleteWebhook", "getMyCommands"}


async def test_a_worker_stuck_in_a_handler_that_ignores_its_timeout_makes_health_answer_503(make_app, monkeypatch):
    monkeypatch.setattr(trt_bot, "WATCHDOG_INTERVAL_S", 0.05)
    app = await make_app(UPDATE_QUEUE_WORKERS="1")
    app.pipeline.workers.timeout = 0.2
    freed = asyncio.Event()

    async def stubborn(method: str, params: dict, on_sent: object = None) -> None:
        while not freed.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await freed.wait()
    monkeypatch.setattr(app.role.outbox, "call", stubborn)
    await post_update(app, update_message(1, 4343, "/start"))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}") as client:
        try:
            stuck = await eventually_async(lambda: client.get("/health"), lambda r: r.status_code == 503)
            assert stuck.json()["status"] == "failing" and "stuck" in stuck.json()["failure"]
        finally:
            freed.set()
        await eventually_async(lambda: client.get("/health"), lambda r: r.status_code == 200)


async def test_an_event_loop_running_late_makes_health_answer_503_until_it_keeps_time(make_app, monkeypatch):
    monkeypatch.setattr(trt_bot, "LOOP_BEAT_S", 0.05)
    monkeypatch.setattr(trt_bot, "LOOP_LAG_FAIL_S", 0.3)
    app = await make_app()
    hogging = True

    async def hog() -> None:  # blocks the loop 0.5 s at a time, letting it breathe in between
        while hogging:
            time.sleep(0.5)
            await asyncio.sleep(0.02)
    hogger = asyncio.create_task(hog())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}", timeout=30) as client:
            late = await eventually_async(lambda: client.get("/health"), lambda r: r.status_code == 503, timeout=30)
            assert "the event loop runs" in late.json()["failure"]
            hogging = False
            await hogger
            await eventually_async(lambda: client.get("/health"), lambda r: r.status_code == 200)
    finally:
        hogging = False
        await hogger


###############################################################################
# 14. python trt_bot.py check
###############################################################################

def check_env(fake_tg, fake_kie, tmp_path, **overrides: str) -> dict[str, str]:
    env = {**bot_env(fake_tg, str(tmp_path / "bot.sqlite3")), "KIE_API_KEY": KIE_KEY, "KIE_API_BASE": fake_kie.base_url}
    env.update(overrides)
    return env


def test_check_reports_all_good_and_exits_0(fake_tg, fake_kie, tmp_path):
    result = run_bot_cli(check_env(fake_tg, fake_kie, tmp_path), "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "@trt_test_bot" in result.stdout and "1234.5 credits" in result.stdout
    assert "https://bot.example.com/webhook/***" in result.stdout and result.stdout.strip().endswith("all good")
    shown = {line.strip().partition("=")[0] for line in result.stdout.splitlines() if line.startswith("       ")}
    assert shown == {setting.name for setting in trt_bot.SETTINGS}  # the configuration it validated, every setting
    assert "       KIE_API_KEY=***" in result.stdout
    assert all(secret not in result.stdout + result.stderr for secret in SECRETS)


@pytest.mark.parametrize("overrides, problem", [
    ({"TELEGRAM_BOT_TOKEN": "987654321:AAHotherTOKENwhichTelegramDoesNotKnowXYZ"}, "TELEGRAM_BOT_TOKEN"),
    ({"KIE_API_KEY": "kie-wrong-key-000000000000"}, "Kie.ai"),
])
def test_check_names_the_problem_and_exits_1(fake_tg, fake_kie, tmp_path, overrides, problem):
    result = run_bot_cli(check_env(fake_tg, fake_kie, tmp_path, **overrides), "check")
    assert result.returncode == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("[FAIL]")]
    assert len(failures) == 1 and problem in failures[0] and "rejected" in failures[0]
    output = result.stdout + result.stderr
    assert all(secret not in output for secret in (*SECRETS, *overrides.values(), "AAHotherTOKEN"))


def test_check_fails_on_a_recent_webhook_401_and_names_the_secret_token(fake_tg, fake_kie, tmp_path):
    env = check_env(fake_tg, fake_kie, tmp_path)
    fake_tg.webhook_info.update(url=trt_bot.load_config(env).webhook_url, pending_update_count=2,
                                last_error_message="Wrong response from the webhook: 401 Unauthorized",
                                last_error_date=int(time.time()) - 5)
    result = run_bot_cli(env, "check")
    assert result.returncode == 1
    (failure,) = [line for line in result.stdout.splitlines() if line.startswith("[FAIL]")]
    assert failure.startswith("[FAIL] webhook:") and "401 Unauthorized" in failure
    assert "WEBHOOK_SECRET_TOKEN" in failure and all(secret not in result.stdout for secret in SECRETS)


def test_check_reports_an_unusable_database(fake_tg, fake_kie, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run_bot_cli(check_env(fake_tg, fake_kie, tmp_path, DATABASE_URL=f"sqlite:///{blocker}/x.db"), "check")
    assert result.returncode == 1 and "[FAIL] database" in result.stdout


@pytest.mark.parametrize("problem, says", [
    ("wrong password", "password authentication failed"),
    ("missing database", 'database "no_such_database" does not exist'),
])
def test_check_says_what_is_wrong_with_postgresql_without_the_password(fake_tg, fake_kie, tmp_path, postgres,
                                                                       problem, says):
    wrong = "Wrong-Password-42"
    url = postgres.url("postgres", password=wrong) if problem == "wrong password" else postgres.url("no_such_database")
    result = run_bot_cli(check_env(fake_tg, fake_kie, tmp_path, DATABASE_URL=url), "check")
    assert result.returncode == 1
    (failure,) = [line for line in result.stdout.splitlines() if line.startswith("[FAIL]")]
    assert failure.startswith(f"[FAIL] database: cannot open postgresql://127.0.0.1:{postgres.port}/") and says in failure
    assert "check DATABASE_URL (host, port, user, password, database name)" in failure
    output = result.stdout + result.stderr
    assert wrong not in output and all(secret not in output for secret in SECRETS)
    assert f"DATABASE_URL=postgresql://trt:***@127.0.0.1:{postgres.port}/" in output  # the URL shown, masked


def test_check_opens_a_postgresql_database_and_migrates_it(fake_tg, fake_kie, tmp_path, postgres):
    result = run_bot_cli(check_env(fake_tg, fake_kie, tmp_path, DATABASE_URL=postgres.new_database_url()), "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"[  ok] database: opened, schema v{trt_bot.SCHEMA_VERSION}" in result.stdout
    assert all(secret not in result.stdout + result.stderr for secret in SECRETS)


###############################################################################
# Deploy files
###############################################################################

BLUEPRINTS = sorted(os.path.basename(path) for path in glob.glob(os.path.join(HERE, "render*.yaml")))


def load_blueprint(name: str) -> dict:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_there_is_a_blueprint_with_a_disk_and_one_with_render_postgres():
    assert BLUEPRINTS == ["render.postgres.yaml", "render.yaml"]


@pytest.mark.parametrize("blueprint", BLUEPRINTS)
def test_each_blueprint_validates_against_renders_blueprint_schema(blueprint):
    if not os.path.exists(SCHEMA_PATH):
        pytest.skip(f"Render's Blueprint schema is not at {SCHEMA_PATH}")
    import jsonschema
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        validator = jsonschema.Draft202012Validator(json.load(f))
    spec = load_blueprint(blueprint)
    assert list(validator.iter_errors(spec)) == []
    broken = json.loads(json.dumps(spec))
    broken["services"][0]["plan"] = "enormous"
    assert list(validator.iter_errors(broken)), "the schema must catch a bad plan (so the check can fail)"


@pytest.mark.parametrize("blueprint", BLUEPRINTS)
def test_each_blueprint_matches_the_bot(blueprint):
    spec = load_blueprint(blueprint)
    (service,) = spec["services"]
    env = {var["key"]: var for var in service["envVars"]}
    assert service["healthCheckPath"] == "/health" and service["runtime"] == "docker"
    for secret in ("TELEGRAM_BOT_TOKEN", "KIE_API_KEY", "WEBHOOK_SECRET_TOKEN"):
        assert env[secret].get("sync") is False or env[secret].get("generateValue") is True
        assert "value" not in env[secret]
    grace = int(env["SHUTDOWN_GRACE_S"]["value"])
    assert grace < service["maxShutdownDelaySeconds"] <= grace + 10  # Render waits for the drain, then some
    database = env["DATABASE_URL"]
    if "fromDatabase" in database:  # Render Postgres: no disk, which would turn zero-downtime deploys off
        assert "disk" not in service
        (postgres,) = spec["databases"]
        assert database["fromDatabase"] == {"name": postgres["name"], "property": "connectionString"}
    else:  # SQLite on the service's disk: one instance
        assert os.path.dirname(trt_bot.parse_database_url(database["value"])) == service["disk"]["mountPath"]
        assert service.get("numInstances", 1) == 1 and "scaling" not in service
    config = trt_bot.load_config({var: spec["value"] for var, spec in env.items() if "value" in spec}
                                 | {"TELEGRAM_BOT_TOKEN": TOKEN, "RENDER_EXTERNAL_URL": "https://x.onrender.com",
                                    "WEBHOOK_SECRET_TOKEN": "q1+/Zx3w9Y0abcDEF/ghIJ+klmNOPqrSTuvWXyz0123="})
    assert config.bot_mode == "webhook" and trt_bot.SECRET_TOKEN_PATTERN.fullmatch(config.webhook_secret)


def test_the_blueprints_differ_only_in_where_the_database_is():
    def service_apart_from_its_database(blueprint: str) -> dict:
        (service,) = load_blueprint(blueprint)["services"]
        service = {key: value for key, value in service.items() if key not in ("disk", "numInstances")}
        service["envVars"] = [var for var in service["envVars"] if var["key"] != "DATABASE_URL"]
        return service

    assert service_apart_from_its_database("render.yaml") == service_apart_from_its_database("render.postgres.yaml")


def dockerfile_instructions() -> list[tuple[str, str]]:
    with open(os.path.join(HERE, "Dockerfile"), encoding="utf-8") as f:
        text = re.sub(r"\\\n", " ", f.read())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_runs_trt_bot_as_non_root_with_an_exec_form_cmd():
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.12-slim")
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    (cmd,) = [arg for op, arg in instructions if op == "CMD"]
    assert json.loads(cmd) == ["python", "-m", "trt_bot"]  # the bytecode compiled at build, not the source each start
    assert any(op == "RUN" and arg == "python -m compileall -q trt_bot.py" for op, arg in instructions)
    env = " ".join(arg for op, arg in instructions if op == "ENV")
    assert "PYTHONUNBUFFERED=1" in env and "sqlite:////var/data/" in env
    assert any(op == "RUN" and "--no-cache-dir" in arg for op, arg in instructions)


def test_the_image_user_writes_only_var_data_and_the_readme_advises_nothing_else():
    instructions = dockerfile_instructions()
    assert [arg for op, arg in instructions if op == "COPY" and "--chown" in arg] == []  # the code stays root's
    (writable,) = re.findall(r"chown bot:bot (\S+)", " ".join(arg for op, arg in instructions if op == "RUN"))
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        advised = re.findall(r"DATABASE_URL=(sqlite:///\S+?)`", f.read().split("## Deploying on Render")[1])
    assert advised and all(os.path.dirname(trt_bot.parse_database_url(url)) == writable for url in advised)


def test_pytest_says_why_each_test_was_skipped():
    import configparser
    parser = configparser.ConfigParser()
    parser.read(os.path.join(HERE, "pytest.ini"))
    assert "s" in parser["pytest"]["addopts"].split("-r", 1)[1].split()[0]


async def test_dockerfile_healthcheck_probes_health_without_curl(make_app):
    (healthcheck,) = [arg for op, arg in dockerfile_instructions() if op == "HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    assert command[0] == "python" and "curl" not in healthcheck
    app = await make_app()

    def probe(port: int) -> int:
        return subprocess.run(command, env={**os.environ, "PORT": str(port)}, capture_output=True, timeout=10).returncode

    assert await asyncio.to_thread(probe, app.port) == 0
    assert await asyncio.to_thread(probe, free_port()) != 0  # nothing listening: unhealthy
