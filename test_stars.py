"""Selling pictures for Telegram Stars: storage's credits ledger (section 5), the pipeline's pre-checkout
answer (section 9), the dialog's shop (section 11) and jobs returning credits (section 12).

End-to-end tests drive the bot through its webhook like Telegram does, with the fake Bot API and
the fake Kie.ai from conftest.py on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import itertools
import sqlite3
import time

import httpx

import trt_bot
from conftest import (bot_env, eventually, free_port, post_update, query, star_payment, update_callback,
                      update_message, update_payment, update_pre_checkout)
from test_generation import answered, gen_env, kie_calls_back, order

_update_ids = itertools.count(50_000)
PACK = "pack:10:50"


def rendered(lang: str, key: str, **values) -> str:
    return trt_bot.render(lang, key, **values)


def offers(fake_tg, chat_id: int) -> list[dict]:
    """The messages to ``chat_id`` that carry ⭐ pack buttons."""
    return [p for p in fake_tg.calls_of("sendMessage") if p.get("chat_id") == chat_id
            and "buy:" in str(p.get("reply_markup"))]


async def draw(app, fake_kie, user: int, prompt: str, succeed: bool = True) -> None:
    """Order a picture and let Kie finish it (or fail it); return once the job is over."""
    before = len(fake_kie.created)
    await order(app, user, prompt)
    await eventually(lambda: len(fake_kie.created) == before + 1)
    task_id = f"task{before + 1:05d}"
    (fake_kie.complete if succeed else fake_kie.fail_task)(task_id)
    await kie_calls_back(app, fake_kie, task_id)
    await eventually(lambda: not app.generations.jobs)


def ledger(database: str) -> list[tuple]:
    with sqlite3.connect(database) as conn:
        return conn.execute("SELECT entry, user_id, credits FROM credits ORDER BY at").fetchall()


###############################################################################
# 1. Configuration
###############################################################################

def test_stars_packs_are_credits_and_stars_pairs_and_empty_sells_nothing():
    assert trt_bot.load_config({"TELEGRAM_BOT_TOKEN": "123:" + "a" * 35}).stars_packs == ()
    config = trt_bot.load_config({"TELEGRAM_BOT_TOKEN": "123:" + "a" * 35, "STARS_PACKS": "10:50, 50:200"})
    assert config.stars_packs == ((10, 50), (50, 200))
    for bad in ("10", "10:0", "a:b", "10:50:1", "0:5"):
        try:
            trt_bot.load_config({"TELEGRAM_BOT_TOKEN": "123:" + "a" * 35, "STARS_PACKS": bad})
        except trt_bot.ConfigError as error:
            assert "STARS_PACKS" in str(error)
        else:
            raise AssertionError(f"STARS_PACKS={bad!r} was accepted")


###############################################################################
# 5. Storage: the credits ledger
###############################################################################

async def test_each_ledger_change_is_made_once_and_a_refund_takes_only_what_is_left(database_url):
    db = trt_bot.Database(trt_bot.parse_database_url(database_url))
    await db.open()
    try:
        async def write(*changes: tuple) -> list[tuple]:
            return (await db.write(trt_bot.ledger_write, list(changes)))[0]

        assert await write(("paid", "c1", 75, 10, 50), ("paid", "c1", 75, 10, 50)) == [("paid", "c1", 75, 10, 50)]
        assert not await write(("spent", "job-a", 75, 11))  # more than the balance
        assert await write(("spent", "job-a", 75, 4)) and not await write(("spent", "job-a", 75, 4))
        assert not await write(("returned", "job-b"))  # it spent nothing
        assert await write(("returned", "job-a"), ("returned", "job-a")) == [("returned", "job-a", 75, 4, 0)]
        await write(("spent", "job-c", 75, 3))
        assert await write(("refunded", "c1"), ("refunded", "c1")) == [("refunded", "c1", 75, -7, 0)]
        assert not await write(("refunded", "never-paid"))
        assert await db.read(trt_bot.ledger_balance, 75) == 0 and await db.read(trt_bot.ledger_balances) == {75: 0}
    finally:
        await db.close()


async def test_credits_of_a_paid_job_that_ended_undelivered_before_a_kill_9_are_returned_at_start(
        make_app, tmp_path):
    database = str(tmp_path / "bot.sqlite3")
    db = trt_bot.Database(database)
    await db.open()
    ended = [trt_bot.Job("f" * 16, 75, 75, "ru", "zimage", "p", "1:1", state="delivered", outcome="failed"),
             trt_bot.Job("c" * 16, 75, 75, "ru", "zimage", "p", "1:1", state="cancelled", outcome="cancelled"),
             trt_bot.Job("d" * 16, 75, 75, "ru", "zimage", "p", "1:1", state="delivered", outcome="success")]
    await db.write(trt_bot.jobs_save, [dataclasses.astuple(job) for job in ended])
    await db.write(trt_bot.ledger_write, [("paid", "c1", 75, 10, 50)] + [("spent", job.id, 75, 2) for job in ended])
    await db.close()
    app = await make_app(STARS_PACKS="10:50")
    await eventually(lambda: app.generations.balance(75) == 8)  # the delivered one's 2 stay spent
    assert sorted(entry for entry, *_ in ledger(database) if entry.startswith("returned")) == [
        "returned:" + "c" * 16, "returned:" + "f" * 16]


###############################################################################
# 9. Update pipeline: the pre-checkout answer
###############################################################################

def test_a_pre_checkout_is_accepted_only_for_a_pack_on_sale_at_its_price():
    packs = ((10, 50), (50, 200))
    query = {"currency": "XTR", "total_amount": 50, "invoice_payload": PACK}
    assert trt_bot.pre_checkout_refusal(query, packs) is None
    for stale in ({"invoice_payload": "pack:10:40", "total_amount": 40}, {"invoice_payload": "gift"},
                  {"total_amount": 49}, {"currency": "USD"}, {"invoice_payload": None}):
        assert trt_bot.pre_checkout_refusal({**query, **stale}, packs) == "pay_stale"


async def test_pre_checkout_is_answered_in_under_a_second_while_300_other_updates_wait(make_app, fake_tg):
    app = await make_app(STARS_PACKS="10:50", UPDATE_QUEUE_SIZE="20", UPDATE_QUEUE_WORKERS="1")
    fake_tg.stall("answerCallbackQuery")  # the one worker hangs on the first press; the rest wait
    async with httpx.AsyncClient() as client:
        for n in range(300):
            assert (await post_update(app, update_callback(next(_update_ids), 600 + n % 3, "help"), client)
                    ).status_code == 200
        await eventually(lambda: fake_tg.held("answerCallbackQuery") == 1)
        assert app.pipeline.backlog >= 290
        started = time.monotonic()
        await post_update(app, update_pre_checkout(next(_update_ids), 75, PACK, 50), client)
        (answer,) = await eventually(lambda: fake_tg.calls_of("answerPreCheckoutQuery"))
        assert time.monotonic() - started < 1.0
    assert answer["ok"] is True and answer["pre_checkout_query_id"].startswith("pcq")
    fake_tg.release("answerCallbackQuery")


async def test_pre_checkout_is_refused_with_a_reason_for_a_stale_pack_or_a_passive_instance(make_app, fake_tg):
    app = await make_app(STARS_PACKS="10:50")
    await post_update(app, update_pre_checkout(next(_update_ids), 75, "pack:10:40", 40))
    (stale,) = await eventually(lambda: fake_tg.calls_of("answerPreCheckoutQuery"))
    assert stale == {"pre_checkout_query_id": stale["pre_checkout_query_id"], "ok": False,
                     "error_message": trt_bot.TEXTS["ru"]["pay_stale"]}
    app.role.may_act = lambda: False  # a standby (the mode switch says no): it could not record the payment
    await post_update(app, update_pre_checkout(next(_update_ids), 75, PACK, 50))
    await eventually(lambda: len(fake_tg.calls_of("answerPreCheckoutQuery")) == 2)
    passive = fake_tg.calls_of("answerPreCheckoutQuery")[1]
    assert passive["ok"] is False and passive["error_message"] == trt_bot.TEXTS["ru"]["pay_unavailable"]


async def test_pre_checkout_is_refused_while_the_database_cannot_record_the_payment(make_app, fake_tg):
    app = await make_app(STARS_PACKS="10:50")
    app.db.ok = False  # memory-only mode, as after a failed write (the watcher reopens it within a second)
    await post_update(app, update_pre_checkout(next(_update_ids), 75, PACK, 50))
    (answer,) = await eventually(lambda: fake_tg.calls_of("answerPreCheckoutQuery"))
    assert answer["ok"] is False and answer["error_message"] == trt_bot.TEXTS["ru"]["pay_unavailable"]


###############################################################################
# 11. Dialog: the shop
###############################################################################

async def test_a_full_stars_purchase_credits_once_returns_a_failed_pictures_credit_refunds_and_counts(
        make_app, fake_tg, fake_kie, fast_jobs, tmp_path):
    app = await make_app(**gen_env(fake_kie, GEN_HOURLY_LIMIT="1", STARS_PACKS="10:50,50:200", ADMIN_IDS="900"))
    await draw(app, fake_kie, 75, "первая")  # the free picture of this hour
    await answered(app, update_callback(next(_update_ids), 75, "new"))  # at the limit: told at once, with ⭐ packs
    (offer,) = await eventually(lambda: offers(fake_tg, 75))
    assert rendered("ru", "hourly_limit", limit=1, minutes=60) in offer["text"] and len(fake_kie.created) == 1
    assert [row[0]["callback_data"] for row in offer["reply_markup"]["inline_keyboard"]] == ["buy:10:50", "buy:50:200"]

    await answered(app, update_callback(next(_update_ids), 75, "buy:10:50"))
    (invoice,) = fake_tg.calls_of("sendInvoice")
    assert (invoice["currency"], invoice["provider_token"], invoice["prices"][0]["amount"]) == ("XTR", "", 50)
    await post_update(app, update_pre_checkout(next(_update_ids), 75, invoice["payload"], 50))
    (checkout,) = await eventually(lambda: fake_tg.calls_of("answerPreCheckoutQuery"))
    assert checkout["ok"] is True
    for _ in range(2):  # Telegram delivers the same payment twice
        await answered(app, update_payment(next(_update_ids), 75, "charge-1", invoice["payload"], 50))
    paid = rendered("ru", "paid", credits=10, balance=10)
    assert fake_tg.texts_to(75).count(paid) == 1 and app.generations.balance(75) == 10

    await draw(app, fake_kie, 75, "вторая", succeed=False)  # a paid picture that fails gives its credit back
    await eventually(lambda: app.generations.balance(75) == 10)
    database = str(tmp_path / "bot.sqlite3")
    assert [(entry.split(":")[0], credits) for entry, _, credits in ledger(database)] == [
        ("paid", 10), ("spent", -1), ("returned", 1)]
    await draw(app, fake_kie, 75, "третья")  # a paid picture delivered costs its credit
    assert app.generations.balance(75) == 9
    assert rendered("ru", "balance", balance=9) in fake_tg.calls_of("sendPhoto")[-1]["caption"]

    await answered(app, update_message(next(_update_ids), 75, "/paysupport"))
    assert fake_tg.texts_to(75)[-1] == trt_bot.TEXTS["ru"]["paysupport"]
    await answered(app, update_message(next(_update_ids), 75, "/refund charge-1"))  # not an admin
    assert not fake_tg.calls_of("refundStarPayment")
    await answered(app, update_message(next(_update_ids), 900, "/refund charge-1"))
    assert fake_tg.calls_of("refundStarPayment") == [{"user_id": 75, "telegram_payment_charge_id": "charge-1"}]
    assert fake_tg.texts_to(900)[-1] == rendered("ru", "refund_done", user=75, removed=9)
    await eventually(lambda: rendered("ru", "refunded", removed=9, balance=0) in fake_tg.texts_to(75))
    await answered(app, update_payment(next(_update_ids), 75, "charge-1", PACK, 50, field="refunded_payment"))
    assert fake_tg.texts_to(75).count(rendered("ru", "refunded", removed=9, balance=0)) == 1  # refunded once

    await answered(app, update_payment(next(_update_ids), 75, "charge-2", "pack:50:200", 200))
    await answered(app, update_payment(next(_update_ids), 75, "charge-2", "pack:50:200", 200, "refunded_payment"))
    assert fake_tg.texts_to(75)[-1] == rendered("ru", "refunded", removed=50, balance=0)
    await answered(app, update_message(next(_update_ids), 75, "/balance"))
    assert fake_tg.texts_to(75)[-1] == rendered("ru", "balance", balance=0)

    await answered(app, update_message(next(_update_ids), 900, "/stats"))
    assert fake_tg.texts_to(900)[-1].endswith(rendered("ru", "stats_stars", payments=2, stars=250, refunds=2,
                                                       sold=60, spent=2, returned=1))
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(f"http://127.0.0.1:{app.port}/metrics")).text
    for line in ('trt_ledger_entries_total{kind="paid"} 2', 'trt_ledger_entries_total{kind="refunded"} 2',
                 'trt_credits_total{kind="paid"} 60', 'trt_credits_total{kind="spent"} 2',
                 'trt_credits_total{kind="returned"} 1', 'trt_credits_total{kind="refunded"} 59'):
        assert line in metrics


async def test_a_cancelled_paid_picture_gives_its_credits_back(make_app, fake_tg, fake_kie, fast_jobs):
    app = await make_app(**gen_env(fake_kie, GEN_HOURLY_LIMIT="1", STARS_PACKS="10:50"))
    await answered(app, update_payment(next(_update_ids), 75, "charge-c", PACK, 50))
    await draw(app, fake_kie, 75, "первая")  # free
    await order(app, 75, "вторая")  # paid
    await eventually(lambda: app.generations.balance(75) == 9 and len(fake_kie.created) == 2)
    await answered(app, update_message(next(_update_ids), 75, "/cancel"))
    await eventually(lambda: app.generations.balance(75) == 10)
    assert not app.generations.jobs


async def test_invoices_are_sent_only_in_private_chats_and_only_while_packs_are_on_sale(make_app, fake_tg):
    app = await make_app(STARS_PACKS="10:50")
    group = update_message(next(_update_ids), 75, "/buy")
    group["message"]["chat"] = {"id": -1001, "type": "supergroup"}
    await answered(app, group)
    assert fake_tg.texts_to(-1001) == [trt_bot.TEXTS["ru"]["buy_in_private"]]
    await answered(app, update_callback(next(_update_ids), 75, "buy:10:40"))  # a pack not on sale
    await answered(app, update_message(next(_update_ids), 75, "/buy", lang="en"))
    assert offers(fake_tg, 75)[0]["text"] == rendered("en", "buy_offer", balance=0)
    assert not fake_tg.calls_of("sendInvoice")


async def test_without_packs_buy_is_an_unknown_command(make_app, fake_tg):
    app = await make_app()
    await answered(app, update_message(next(_update_ids), 75, "/buy"))
    assert fake_tg.texts_to(75) == [trt_bot.TEXTS["ru"]["unknown_command"]]


async def test_a_payment_acknowledged_before_a_kill_9_is_credited_once_after_the_restart(fake_tg, tmp_path,
                                                                                         bot_processes, database_url):
    env = bot_env(fake_tg, str(tmp_path / "bot.sqlite3"), PORT=str(free_port()), STARS_PACKS="10:50",
                  DATABASE_URL=database_url)
    fake_tg.stall("answerCallbackQuery")  # the chat's earlier press hangs: the payment waits behind it
    first = bot_processes(env)
    await first.wait_healthy()
    config = trt_bot.load_config(env)
    headers = {"X-Telegram-Bot-Api-Secret-Token": config.webhook_secret}
    async with httpx.AsyncClient() as client:
        for update in (update_callback(1, 75, "help"), update_payment(2, 75, "charge-9", PACK, 50)):
            assert (await client.post(first.base_url + config.webhook_path, json=update, headers=headers)
                    ).status_code == 200
        await eventually(lambda: fake_tg.held("answerCallbackQuery") == 1)
        first.kill()
        fake_tg.release("answerCallbackQuery")
        second = bot_processes({**env, "PORT": str(free_port())})
        await second.wait_healthy()
        paid = rendered("ru", "paid", credits=10, balance=10)
        await eventually(lambda: paid in fake_tg.texts_to(75), timeout=20)
        redelivered = update_payment(3, 75, "charge-9", PACK, 50)  # Telegram sends it again: still once
        assert (await client.post(second.base_url + config.webhook_path, json=redelivered, headers=headers)
                ).status_code == 200
    await eventually(lambda: query(database_url, "SELECT COUNT(*) FROM inbox WHERE done_at IS NULL") == [(0,)])
    assert query(database_url, "SELECT entry, user_id, credits FROM credits") == [("paid:charge-9", 75, 10)]
    assert fake_tg.texts_to(75).count(paid) == 1


###############################################################################
# 14. Application: reconciliation with Telegram's Star transactions
###############################################################################

def test_star_transactions_give_our_invoices_payments_and_the_refunds():
    transactions = [
        star_payment("c1", 75, PACK, 50),
        star_payment("c2", 76, "someone else's payload", 5),
        {"id": "c1", "amount": 50, "date": 1, "receiver": {"type": "user", "user": {"id": 75}}},
        {"id": "w1", "amount": 500, "date": 2, "receiver": {"type": "fragment"}},
        "garbage", {"id": 7},
    ]
    assert trt_bot.star_transactions(transactions) == ([("c1", 75, (10, 50))], ["c1"])


async def test_a_payment_dropped_by_the_startup_flush_is_found_by_reconciliation_and_credited_once(
        make_app, fake_tg, tmp_path):
    fake_tg.webhook_info["pending_update_count"] = 500  # a stuck backlog: the start-up flush drops it
    fake_tg.star_transactions = [star_payment(f"old-{n}", 80, PACK, 50) for n in range(100)]  # credited before
    fake_tg.star_transactions.append(star_payment("dropped", 75, "pack:50:200", 200))
    database = str(tmp_path / "bot.sqlite3")
    db = trt_bot.Database(database)
    await db.open()
    await db.write(trt_bot.ledger_write, [("paid", f"old-{n}", 80, 10, 50) for n in range(100)])
    await db.close()
    app = await make_app(STARS_PACKS="10:50,50:200")
    paid = rendered("ru", "paid", credits=50, balance=50)
    await eventually(lambda: paid in fake_tg.texts_to(75))
    assert fake_tg.calls_of("setWebhook")[0]["drop_pending_updates"] is True
    assert [p["offset"] for p in fake_tg.calls_of("getStarTransactions")] == [0, 100]
    assert app.generations.balance(75) == 50 and app.generations.balance(80) == 1000
    await answered(app, update_payment(next(_update_ids), 75, "dropped", "pack:50:200", 200))  # it comes after all
    assert fake_tg.texts_to(75) == [paid] and ledger(database).count(("paid:dropped", 75, 50)) == 1
    assert not fake_tg.texts_to(80)
