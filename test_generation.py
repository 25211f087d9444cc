"""Behaviour of image generation: sections 8 (Kie client), 11 (the dialog) and 12 (jobs) of trt_bot.py.

End-to-end tests drive the bot through its webhook like Telegram does, with
the fake Bot API and the fake Kie.ai from conftest.py on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gc
import hashlib
import hmac
import html
import ipaddress
import itertools
import json
import re
import socket
import sqlite3
import threading
import time
import urllib.parse

import httpx
import pytest
import respx

import trt_bot
from conftest import (ALL_RECORDS, KIE_KEY, PNG_BYTES, SECRETS, TOKEN, DropConnection, FakeBotApi, InstantClock, ManualClock,
                      _dropping, bot_env, bot_text, eventually, formatted, free_port, post_update, query, refuse_rows, says,
                      update_callback, update_message)

_update_ids = itertools.count(10_000)


def gen_env(fake_kie, **more: str) -> dict[str, str]:
    return {"KIE_API_KEY": KIE_KEY, "KIE_API_BASE": fake_kie.base_url, "KIE_UPLOAD_BASE": fake_kie.base_url, **more}


PACING_S = 0.1  # the send pacer's spacing passes at once on a ManualClock (see conftest)


async def order(app, user: int, prompt: str = "кот-космонавт", ratio: str = "16:9", *, model: str = "",
                option: str = "", lang: str = "ru") -> None:
    """What a user does: the create (or model) button, the prompt, the ratio, maybe an option.

    Each step waits for the bot's answer to the one before, as a user does (the next press could
    otherwise come before the question it answers is out of the outbox).
    """
    await answered(app, update_callback(next(_update_ids), user, f"model:{model}" if model else "new", lang))
    await answered(app, update_message(next(_update_ids), user, prompt, lang))
    await answered(app, update_callback(next(_update_ids), user, f"ratio:{ratio}", lang))
    if option:
        await answered(app, update_callback(next(_update_ids), user, f"opt:{option}", lang))


async def answered(app, update: dict) -> None:
    """Post ``update`` and wait until it is handled and its chat's messages have gone out."""
    handled, chat_id = app.pipeline.stats.processed, trt_bot.update_chat_key(update)
    await post_update(app, update)
    await eventually(lambda: app.pipeline.stats.processed > handled and chat_id not in app.role.outbox._chats)


async def kie_calls_back(app, fake_kie, task_id: str, *, token: str | None = None,
                         headers: dict | None = None, body: dict | None = None) -> httpx.Response:
    """POST the finished task (or ``body``) to the bot's callback URL, as Kie does."""
    url = f"http://127.0.0.1:{app.port}/{app.config.kie_callback_path}"
    params = {"token": app.config.kie_callback_token if token is None else token}
    async with httpx.AsyncClient() as client:
        return await client.post(url, params=params, json=fake_kie.callback_body(task_id) if body is None else body,
                                  headers=headers or {})


def signed(key: str, task_id: str, timestamp: int | str) -> dict[str, str]:
    """The headers Kie adds to a callback when a webhook HMAC key is set."""
    signature = base64.b64encode(hmac.new(key.encode(), f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest())
    return {"X-Webhook-Timestamp": str(timestamp), "X-Webhook-Signature": signature.decode()}


async def submitted_job(app, user: int) -> trt_bot.Job:
    """``user``'s job once Kie has its task and the bot knows the task id (a callback before that is unknown)."""
    return await eventually(lambda: next((job for job in app.generations.jobs.values()
                                          if job.user_id == user and job.state == "submitted"), None))


async def another_picture_is_delivered(app, fake_tg, fake_kie, user: int) -> None:
    """A barrier: another user's picture goes the whole way (order, createTask, callback, sendPhoto).

    Work the bot started before has had its turn by then, so a test can
    assert that it did nothing more.
    """
    await order(app, user)
    job = await submitted_job(app, user)
    fake_kie.complete(job.task_id)
    key = app.config.kie_hmac_key
    headers = signed(key, job.task_id, int(time.time())) if key else None
    assert (await kie_calls_back(app, fake_kie, job.task_id, headers=headers)).status_code == 200
    await eventually(lambda: [p for p in fake_tg.calls_of("sendPhoto") if p["chat_id"] == user])


def buttons_of(params: dict) -> list[tuple[str, str]]:
    return [(b["text"], b["callback_data"]) for row in params["reply_markup"]["inline_keyboard"] for b in row]


def new_messages_to(fake_tg, user: int) -> list[tuple[str, dict]]:
    """Every message the bot sent to ``user`` that is new in the chat (edits are not), in order."""
    with fake_tg._cond:
        return [(method, params) for method, params in fake_tg.calls
                if method in ("sendMessage", "sendPhoto", "sendDocument") and params.get("chat_id") == user]


def edits_of(fake_tg, user: int) -> list[dict]:
    return [p for p in fake_tg.calls_of("editMessageText") if p["chat_id"] == user]


def sent_texts(fake_tg, user: int) -> list[str]:
    edits = [p["text"] for p in fake_tg.calls_of("editMessageText") if p["chat_id"] == user]
    return fake_tg.texts_to(user) + edits


###############################################################################
# 8. Kie client
###############################################################################

KIE = "https://api.kie.ai"


def test_kie_envelope_code_is_read_even_on_http_200():
    assert trt_bot.parse_kie_envelope(200, b'{"code":200,"msg":"success","data":{"taskId":"t"}}') == {"taskId": "t"}
    with pytest.raises(trt_bot.KieError) as caught:
        trt_bot.parse_kie_envelope(200, b'{"code":402,"message":"Insufficient Credits"}')
    assert (caught.value.code, caught.value.kind, caught.value.message) == (402, "no_credits", "Insufficient Credits")
    assert not caught.value.retryable
    with pytest.raises(trt_bot.KieError) as caught:
        trt_bot.parse_kie_envelope(502, b"<html>bad gateway</html>")
    assert caught.value.code == 502 and caught.value.retryable


@pytest.mark.parametrize("status, body, code", [
    (400, b"<html>Bad Request</html>", 400),  # not JSON: the HTTP status is the code
    (500, b"", 500),
    (200, b"[]", 500),  # HTTP 200 without a Kie body is still an error
    (400, b'{"code":200,"msg":"success","data":{"taskId":"t"}}', 400),  # a code 200 does not make a 400 a success
    (422, b'{"code":"422","msg":"bad"}', 422),  # a code that is not a number: the HTTP status
])
def test_a_kie_answer_without_a_usable_code_is_an_error_of_its_http_status(status, body, code):
    with pytest.raises(trt_bot.KieError) as caught:
        trt_bot.parse_kie_envelope(status, body)
    assert caught.value.code == code


@pytest.mark.parametrize("code, retryable", [(401, False), (402, False), (422, False), (501, False), (505, False),
                                             (429, True), (455, True), (500, True), (0, True), (503, True)])
def test_kie_errors_are_classified_for_retry(code, retryable):
    assert trt_bot.KieError(code, "x").retryable is retryable


@pytest.mark.parametrize("code", sorted(trt_bot.KIE_CODES))
def test_every_kie_code_tells_the_user_something_and_names_its_incident_for_admins(code):
    row = trt_bot.KIE_CODES[code]
    for lang in ("ru", "en"):
        assert trt_bot.TEXTS[lang][f"fail_{row.user_failure}"]
        assert row.incident == "" or trt_bot.TEXTS[lang][row.incident]
    assert row.kind and row.fix and trt_bot.KieError(code, "x").kind == row.kind


def test_only_a_rejected_key_and_missing_credits_are_incidents_for_admins():
    incidents = {code for code, row in trt_bot.KIE_CODES.items() if row.incident}
    assert incidents == {401, 402}
    assert all(trt_bot.KIE_CODES[code].user_failure == "unavailable" for code in incidents)


@pytest.mark.parametrize("code, kind, retryable", [(503, "server_error", True), (599, "server_error", True),
                                                   (400, "server_error", False), (418, "server_error", False)])
def test_undocumented_kie_codes_are_server_errors_retried_only_when_5xx(code, kind, retryable):
    row = trt_bot.kie_code(code)
    assert (row.kind, row.retryable, row.user_failure) == (kind, retryable, "busy")
    assert trt_bot.KieError(code, "x").retryable is retryable


@pytest.mark.parametrize("data, expected", [
    ({"taskId": "t", "state": "queuing"}, trt_bot.TaskRecord("t", "pending")),
    ({"taskId": "t", "state": "success", "resultJson": '{"resultUrls":["https://cdn/x.png"]}'},
     trt_bot.TaskRecord("t", "success", ("https://cdn/x.png",))),
    ({"taskId": "t", "state": "success", "resultJson": {"resultUrls": ["https://cdn/y.png"]}},
     trt_bot.TaskRecord("t", "success", ("https://cdn/y.png",))),
    ({"task_id": "t", "state": "fail", "failCode": "422", "failMsg": "prohibited content"},
     trt_bot.TaskRecord("t", "fail", (), "prohibited content", "422")),
    ({"taskId": "t", "state": "success", "resultJson": '{"resultUrls":[]}'},
     trt_bot.TaskRecord("t", "fail", (), "the task succeeded without an image URL")),
])
def test_task_records_parse_to_pending_success_or_fail(data, expected):
    assert trt_bot.parse_task_record(data) == expected


def test_result_urls_are_kept_only_when_well_formed_http_with_a_host():
    # http://[::1/x.png used to be kept, and made httpx raise InvalidURL while delivering
    hostile = ["http://[::1/x.png", "ftp://cdn.example/x.png", "https:///x.png", "http://user:pw@cdn.example/x.png",
               "http://cdn.example:99999/x.png", "http://cdn example/x.png", "http://cdn.example/\nx.png",
               "javascript:alert(1)", "https://" + "a" * 2100 + ".example/x.png", 42, None]
    record = trt_bot.parse_task_record({"taskId": "t", "state": "success",
                                        "resultJson": {"resultUrls": [*hostile, "https://cdn.example/ok.png"]}})
    assert record.urls == ("https://cdn.example/ok.png",)
    assert trt_bot.parse_task_record({"taskId": "t", "state": "success",
                                      "resultJson": {"resultUrls": hostile}}).state == "fail"
    for url in ("http://[::1]:8080/x.png", "https://tempfile.aiquickdraw.com/s/abc_0.png?x=1"):
        assert trt_bot.split_result_url(url) is not None


def test_unreadable_task_records_raise_as_server_errors_kie_may_fix():
    for data in (None, {"state": "exploded"}, {"state": "success", "resultJson": "{nope"}):
        with pytest.raises(trt_bot.KieError) as caught:
            trt_bot.parse_task_record(data)
        assert (caught.value.code, caught.value.retryable) == (500, True)


@pytest.mark.parametrize("url, kept", [
    ("https://cdn.example/" + "x" * (2048 - len("https://cdn.example/")), True),  # 2,048 characters
    ("https://cdn.example/" + "x" * (2049 - len("https://cdn.example/")), False),
    ("https://" + ("a" * 63 + ".") * 3 + "a" * 61 + "/x.png", True),  # a host of 253 characters
    ("https://" + ("a" * 63 + ".") * 3 + "a" * 62 + "/x.png", False),  # 254
])
def test_result_urls_and_hosts_are_kept_up_to_their_limits(url, kept):
    assert (trt_bot.split_result_url(url) is not None) is kept


def test_webhook_signature_is_base64_hmac_of_task_id_and_timestamp():
    signature = base64.b64encode(hmac.new(b"k", b"task1.1769670760", hashlib.sha256).digest()).decode()
    now = 1_769_670_760
    assert trt_bot.kie_callback_signed("k", "task1", "1769670760", signature, now)
    assert not trt_bot.kie_callback_signed("k", "task2", "1769670760", signature, now)
    assert not trt_bot.kie_callback_signed("k", "task1", "1769670761", signature, now)
    assert not trt_bot.kie_callback_signed("k", "task1", "", signature, now)


def test_signed_callback_timestamps_are_fresh_only_within_the_window():
    now = 1_769_670_760.4

    def fresh(timestamp: str) -> bool:  # correctly signed, so only the timestamp decides
        signature = signed("k", "task1", timestamp)["X-Webhook-Signature"]
        return trt_bot.kie_callback_signed("k", "task1", timestamp, signature, now)

    assert fresh("1769670760")
    assert fresh(str(int(now) - 299)) and fresh(str(int(now) + 299))
    for stale in ("1", str(int(now) - 301), str(int(now) + 301), "1769670760000", "", "-1769670760", "1769670760.0",
                  "１７６９６７０７６０", "0x6975"):
        assert not fresh(stale), stale  # "1": a replay of a correctly signed callback
    fresh = signed("k", "task1", int(now))
    assert trt_bot.kie_callback_signed("k", "task1", str(int(now)), fresh["X-Webhook-Signature"], now)


@respx.mock
async def test_kie_client_retries_transient_failures_and_not_permanent_ones():
    create = respx.post(f"{KIE}/api/v1/jobs/createTask").mock(side_effect=[
        httpx.ConnectError("refused"),
        httpx.Response(200, json={"code": 455, "msg": "Service Unavailable"}),
        httpx.Response(200, json={"code": 200, "msg": "success", "data": {"taskId": "t9"}}),
    ])
    credit = respx.get(f"{KIE}/api/v1/chat/credit").mock(
        return_value=httpx.Response(200, json={"code": 401, "msg": "You do not have access permissions"}))
    client = trt_bot.KieClient(KIE_KEY, KIE, httpx.AsyncClient(), clock=InstantClock())
    assert await client.create_task("z-image", {"prompt": "p", "aspect_ratio": "1:1"}) == "t9"
    assert create.call_count == 3 and len(client.clock.slept) == 2
    assert all(0 <= wait <= ceiling for wait, ceiling in zip(client.clock.slept, (1.0, 2.0)))  # 1 s, then 2 s, jittered
    assert create.calls.last.request.headers["authorization"] == f"Bearer {KIE_KEY}"
    with pytest.raises(trt_bot.KieError) as caught:
        await client.credits()
    assert credit.call_count == 1 and caught.value.kind == "unauthorized" and KIE_KEY not in str(caught.value)
    assert client.calls["createTask", "network"] == client.calls["createTask", "maintenance"] == 1
    assert client.calls["createTask", "ok"] == client.calls["credit", "unauthorized"] == 1


@respx.mock
async def test_kie_client_gives_up_when_the_retry_budget_is_spent():
    route = respx.get(f"{KIE}/api/v1/jobs/recordInfo").mock(return_value=httpx.Response(500, text="oops"))
    client = trt_bot.KieClient(KIE_KEY, KIE, httpx.AsyncClient(), clock=InstantClock())
    with pytest.raises(trt_bot.KieError) as caught:
        await client.record_info("t1")
    assert caught.value.code == 500 and route.call_count >= 4
    assert sum(client.clock.slept) <= trt_bot.KIE_RETRY_BUDGET_S < sum(client.clock.slept) + trt_bot.KIE_BACKOFF_CAP_S


@respx.mock
async def test_a_kie_call_with_a_zero_budget_is_tried_once():
    route = respx.get(f"{KIE}/api/v1/jobs/recordInfo").mock(return_value=httpx.Response(500, text="oops"))
    client = trt_bot.KieClient(KIE_KEY, KIE, httpx.AsyncClient(), clock=InstantClock())
    with pytest.raises(trt_bot.KieError):
        await client.record_info("t1", budget_s=0)
    assert route.call_count == 1 and client.clock.slept == []


###############################################################################
# 11. Dialog: the z-image flow
###############################################################################

async def test_zimage_flow_end_to_end_completed_by_callback(make_app, fake_tg, fake_kie, database_url):
    """From the menu to the result: three new messages, the ratio question becoming the ⏳ status."""
    app = await make_app(**gen_env(fake_kie), DATABASE_URL=database_url)
    await order(app, 50, "кот-космонавт", "16:9")
    await eventually(lambda: fake_kie.created)
    (task,) = fake_kie.created
    assert task["model"] == "z-image"
    assert task["input"] == {"prompt": "кот-космонавт", "aspect_ratio": "16:9", "nsfw_checker": True}  # Kie's filter on
    callback_url = urllib.parse.urlsplit(task["callBackUrl"])
    token = urllib.parse.parse_qs(callback_url.query)["token"][0]
    assert task["callBackUrl"].startswith("https://bot.example.com/callbacks/kie?token=")
    assert token == app.config.kie_callback_token and all(secret not in token for secret in SECRETS)

    asked_prompt, asked_ratio = fake_tg.calls_of("sendMessage")
    assert says(asked_prompt["text"], "ru", "ask_prompt")
    assert [data for _, data in buttons_of(asked_ratio)][:5] == [f"ratio:{r}" for r in ("1:1", "16:9", "9:16", "4:3", "3:4")]
    (status,) = edits_of(fake_tg, 50)  # the pressed ratio question became the status; only ✖️ is left on it
    assert status["message_id"] == 1
    assert status["text"] == bot_text("ru", "status", details="16:9 · Z-Image", elapsed="0:00")
    assert buttons_of(status) == [(bot_text("ru", "btn_cancel"), "cancel")]
    assert len(fake_tg.calls_of("answerCallbackQuery")) == 2

    fake_kie.complete("task00001", fake_kie.image_url("cat.png"))
    response = await kie_calls_back(app, fake_kie, "task00001")
    assert response.status_code == 200 and response.json() == {"code": 200, "msg": "success"}
    await eventually(lambda: fake_tg.calls_of("sendPhoto"))
    (photo,) = fake_tg.calls_of("sendPhoto")
    assert photo["photo"] == fake_kie.image_url("cat.png")
    assert photo["caption"] == "16:9 · Z-Image\nкот-космонавт\n\n" + bot_text("ru", "left_this_hour", left=19, limit=20)
    assert [text for text, _ in buttons_of(photo)] == [bot_text("ru", f"btn_{key}")
                                                        for key in ("again", "ratio", "edit", "retouch", "file", "new")]
    await eventually(lambda: fake_tg.calls_of("deleteMessage"))
    assert fake_tg.calls_of("deleteMessage")[0]["message_id"] == 1  # the ⏳ message gives way to the result
    assert [method for method, _ in new_messages_to(fake_tg, 50)] == ["sendMessage", "sendMessage", "sendPhoto"]
    assert fake_kie.record_calls == ["task00001"]  # the callback's hint, checked over our own key


async def test_zimage_flow_in_polling_mode_completes_by_polling_alone(make_app, fake_tg, fake_kie, fast_jobs,
                                                                     database_url):
    await make_app(**gen_env(fake_kie), BOT_MODE="polling", WEBHOOK_BASE_URL="", poll_timeout=1,
                   DATABASE_URL=database_url)
    fake_tg.push_updates(update_callback(1, 51, "new", "en"), update_message(2, 51, "a red fox", "en"),
                         update_callback(3, 51, "ratio:1:1", "en"))
    await eventually(lambda: fake_kie.created)
    assert "callBackUrl" not in fake_kie.created[0]  # no public URL, so no callback
    await eventually(lambda: edits_of(fake_tg, 51))
    assert edits_of(fake_tg, 51)[0]["text"] == bot_text("en", "status", details="1:1 · Z-Image", elapsed="0:00")
    fake_kie.complete("task00001")
    await eventually(lambda: fake_tg.calls_of("sendPhoto"))
    (photo,) = fake_tg.calls_of("sendPhoto")
    assert photo["photo"] == fake_kie.image_url()
    assert photo["caption"] == "1:1 · Z-Image\na red fox\n\n" + bot_text("en", "left_this_hour", left=19, limit=20)
    assert [text for text, _ in buttons_of(photo)] == [bot_text("en", f"btn_{key}")
                                                        for key in ("again", "ratio", "edit", "retouch", "file", "new")]
    assert buttons_of(photo)[-1] == (bot_text("en", "btn_new"), "model:zimage")
    assert "task00001" in fake_kie.record_calls


async def test_callback_duplicate_callback_and_poller_racing_deliver_one_photo(make_app, fake_tg, fake_kie, fast_jobs):
    app = await make_app(**gen_env(fake_kie))
    await order(app, 52)
    await submitted_job(app, 52)
    fake_kie.complete("task00001")
    responses = await asyncio.gather(*(kie_calls_back(app, fake_kie, "task00001") for _ in range(3)))
    assert {r.status_code for r in responses} == {200}
    await eventually(lambda: fake_tg.calls_of("sendPhoto"))
    await eventually(lambda: not app.generations.jobs)  # finished: nothing left to poll or to call back about
    assert (await kie_calls_back(app, fake_kie, "task00001")).status_code == 200  # after delivery: still no second
    await another_picture_is_delivered(app, fake_tg, fake_kie, 152)  # the poller and the late callback had their turn
    assert [p["chat_id"] for p in fake_tg.calls_of("sendPhoto")] == [52, 152]


async def test_wrong_callback_token_or_bad_signature_delivers_nothing(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie, KIE_WEBHOOK_HMAC_KEY="hmac-key"))
    await order(app, 53)
    await submitted_job(app, 53)
    fake_kie.complete("task00001")
    assert (await kie_calls_back(app, fake_kie, "task00001", token="guess")).status_code == 401
    assert (await kie_calls_back(app, fake_kie, "task00001", token="")).status_code == 401
    assert (await kie_calls_back(app, fake_kie, "task00001")).status_code == 403  # no signature
    forged = {"X-Webhook-Timestamp": "1769670760", "X-Webhook-Signature": "KxDlpbbq0GDOKqm0+FuJpJWTzY8baHSjhEt4kwElqQI="}
    assert (await kie_calls_back(app, fake_kie, "task00001", headers=forged)).status_code == 403
    timestamp = str(int(time.time()))
    signature = base64.b64encode(hmac.new(b"hmac-key", f"task00001.{timestamp}".encode(), hashlib.sha256).digest())
    signed = {"X-Webhook-Timestamp": timestamp, "X-Webhook-Signature": signature.decode()}
    assert (await kie_calls_back(app, fake_kie, "task00001", headers=signed)).status_code == 200
    await eventually(lambda: fake_tg.calls_of("sendPhoto"))
    assert fake_kie.record_calls == ["task00001"]  # asked Kie once: for the signed callback, for none of the others


async def test_a_signed_callback_outside_the_time_window_is_refused(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie, KIE_WEBHOOK_HMAC_KEY="hmac-key"))
    await order(app, 59)
    await submitted_job(app, 59)
    for stale in ("1", int(time.time()) - 3600, int(time.time()) + 3600):  # "1" used to pass
        response = await kie_calls_back(app, fake_kie, "task00001", headers=signed("hmac-key", "task00001", stale))
        assert response.status_code == 403
    assert fake_kie.record_calls == []
    fake_kie.complete("task00001")
    fresh = signed("hmac-key", "task00001", int(time.time()))
    assert (await kie_calls_back(app, fake_kie, "task00001", headers=fresh)).status_code == 200
    await eventually(lambda: fake_tg.calls_of("sendPhoto"))


async def test_a_callback_is_only_a_hint_the_result_comes_from_record_info(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await order(app, 69)
    await submitted_job(app, 69)
    forged = {"code": 200, "data": {"taskId": "task00001", "state": "success",
                                    "resultJson": '{"resultUrls":["http://127.0.0.1:9/internal-secret"]}'}}
    assert (await kie_calls_back(app, fake_kie, "task00001", body=forged)).status_code == 200
    await eventually(lambda: "task00001" in fake_kie.record_calls)  # asked Kie: still generating
    assert app.generations.jobs and app.generations.jobs[next(iter(app.generations.jobs))].state == "submitted"
    fake_kie.complete("task00001", fake_kie.image_url("real.png"))
    await kie_calls_back(app, fake_kie, "task00001", body=forged)
    await eventually(lambda: fake_tg.calls_of("sendPhoto"))
    assert [p["photo"] for p in fake_tg.calls_of("sendPhoto")] == [fake_kie.image_url("real.png")]


async def test_malformed_callbacks_get_400_and_unknown_tasks_change_nothing(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    url = f"http://127.0.0.1:{app.port}/{app.config.kie_callback_path}?token={app.config.kie_callback_token}"
    async with httpx.AsyncClient() as client:
        assert (await client.post(url, content=b"{not json")).status_code == 400
        assert (await client.post(url, json=[1, 2])).status_code == 400
        assert (await client.post(url, json={"code": 200, "data": {}})).status_code == 400
        unknown = {"code": 200, "data": {"taskId": "nobody", "state": "success",
                                         "resultJson": '{"resultUrls":["https://x/y.png"]}'}}
        assert (await client.post(url, json=unknown)).status_code == 200
    await another_picture_is_delivered(app, fake_tg, fake_kie, 71)
    assert len(fake_tg.calls_of("sendPhoto")) == 1 and fake_kie.record_calls == ["task00001"]  # the later job's only


async def test_kie_500_then_success_is_retried_and_delivered(make_app, fake_tg, fake_kie, fast_jobs):
    fake_kie.script("createTask", 200, {"code": 500, "msg": "Server Error"})
    fake_kie.script("createTask", 502, {"error": "bad gateway"})
    app = await make_app(**gen_env(fake_kie))
    await order(app, 54)
    await eventually(lambda: fake_kie.tasks)
    assert len(fake_kie.created) == 3
    (task_id,) = fake_kie.tasks
    fake_kie.complete(task_id)
    await kie_calls_back(app, fake_kie, task_id)
    await eventually(lambda: fake_tg.calls_of("sendPhoto"))


async def test_a_failed_task_gets_one_explanation_with_a_retry_button(make_app, fake_tg, fake_kie, fast_jobs):
    app = await make_app(**gen_env(fake_kie))
    await order(app, 55, "что-то запретное", "1:1")
    await eventually(lambda: fake_kie.tasks)
    fake_kie.fail_task("task00001", "400", "Your prompt contains prohibited content")
    await kie_calls_back(app, fake_kie, "task00001")
    await eventually(lambda: not app.generations.jobs)  # finished: the poller has nothing left to explain
    (failure,) = [p for p in edits_of(fake_tg, 55) if says(p["text"], "ru", "fail_moderation")]
    assert failure["message_id"] == 1  # the status message, the ratio question before
    (retry, edit, new) = buttons_of(failure)  # after moderation the prompt can be changed, not only sent again
    assert retry[0] == bot_text("ru", "btn_retry") and retry[1].startswith("again:")
    assert new == (bot_text("ru", "btn_new"), "model:zimage")
    assert edit == (bot_text("ru", "btn_edit"), retry[1].replace("again:", "edit:"))
    assert fake_tg.calls_of("sendPhoto") == []
    await post_update(app, update_callback(next(_update_ids), 55, retry[1]))
    await eventually(lambda: len(fake_kie.created) == 2)
    assert fake_kie.created[1]["input"] == {"prompt": "что-то запретное", "aspect_ratio": "1:1", "nsfw_checker": True}
    assert [p for p in fake_tg.calls_of("editMessageText") if says(p["text"], "ru", "fail_moderation")] == [failure]
    # The failure's message becomes the new status (an edit the outbox sends, after the press is handled).
    await eventually(lambda: edits_of(fake_tg, 55)[-1]["text"] == bot_text("ru", "status", details="1:1 · Z-Image",
                                                                               elapsed="0:00"))


async def test_402_for_five_users_tells_each_and_alerts_admins_once(make_app, fake_tg, fake_kie, caplog):
    for _ in range(5):
        fake_kie.script("createTask", 200, {"code": 402, "msg": "Insufficient Credits"})
    app = await make_app(**gen_env(fake_kie, ADMIN_IDS="900, 901"))
    await asyncio.gather(*(order(app, user) for user in range(60, 65)))
    await eventually(lambda: len([p for p in fake_tg.calls_of("editMessageText")
                                  if says(p["text"], "ru", "fail_unavailable")]) == 5)
    # Each failed createTask is logged, then alerts unless an incident is open: five failures, one incident.
    await eventually(lambda: len([r for r in caplog.records if "createTask failed" in r.getMessage()]) == 5)
    assert len([r for r in caplog.records if "[JOB] Kie incident" in r.getMessage()]) == 1

    def alerts() -> list[dict]:
        return [p for p in fake_tg.calls_of("sendMessage") if p["chat_id"] in (900, 901)]

    await eventually(lambda: len(alerts()) == 2)  # the one incident's alert has reached both admins
    assert sorted(p["chat_id"] for p in alerts()) == [900, 901] and "402" in alerts()[0]["text"]
    assert len(fake_kie.created) == 5  # 402 is not retried


@pytest.mark.slow  # seconds of real time under load
async def test_a_generation_that_takes_too_long_is_stopped_and_explained(make_app, fake_tg, fake_kie, fast_jobs):
    app = await make_app(**gen_env(fake_kie, GEN_TIMEOUT_S="1"))
    await order(app, 56)
    await eventually(lambda: [p for p in edits_of(fake_tg, 56) if says(p["text"], "ru", "fail_timeout")], timeout=10)
    fake_kie.complete("task00001")  # too late: changes nothing
    await kie_calls_back(app, fake_kie, "task00001")
    await another_picture_is_delivered(app, fake_tg, fake_kie, 156)
    assert [p["chat_id"] for p in fake_tg.calls_of("sendPhoto")] == [156]
    assert app.generations.finished["timed_out"] == 1


async def test_an_image_telegram_cannot_fetch_is_downloaded_and_uploaded(make_app, fake_tg, fake_kie):
    fake_tg.fail("sendPhoto", 400, {"ok": False, "error_code": 400,
                                    "description": "Bad Request: wrong file identifier/HTTP URL specified"})
    app = await make_app(**gen_env(fake_kie, RESULT_DOWNLOAD_ALLOW_PRIVATE="1"))  # the fake is on 127.0.0.1
    await order(app, 57)
    await eventually(lambda: fake_kie.tasks)
    fake_kie.complete("task00001", fake_kie.image_url("big.png"))
    await kie_calls_back(app, fake_kie, "task00001")
    await eventually(lambda: len(fake_tg.calls_of("sendPhoto")) == 2)
    by_url, uploaded = fake_tg.calls_of("sendPhoto")
    assert by_url["photo"] == fake_kie.image_url("big.png")
    assert uploaded["photo"] == PNG_BYTES and uploaded["caption"].startswith("16:9 · Z-Image\nкот-космонавт\n")


class LosesPhotoAnswers(FakeBotApi):
    """Telegram performs sendPhoto, then the connection drops: the bot never hears the answer."""

    def _handler_class(self):
        return _dropping(super()._handler_class())

    def answer(self, http_method, path, query, headers, body):
        status, payload = super().answer(http_method, path, query, headers, body)
        if path.endswith("/sendPhoto"):
            raise DropConnection
        return status, payload


async def test_a_photo_whose_answer_was_lost_is_not_sent_again_but_offered(fake_kie, tmp_path):
    # Regression: the Bot API client retried the lost answer, so the user could get the photo twice.
    fake = LosesPhotoAnswers()
    app = trt_bot.App(trt_bot.load_config(bot_env(fake, str(tmp_path / "bot.sqlite3"), **gen_env(fake_kie))))
    await app.start()
    try:
        await order(app, 61)
        await eventually(lambda: fake_kie.created)
        fake_kie.complete("task00001")
        await kie_calls_back(app, fake_kie, "task00001")
        offer = await eventually(lambda: [p for p in fake.calls_of("editMessageText")
                                          if says(p["text"], "ru", "maybe_sent")])
        assert [data for _, data in buttons_of(offer[0])][0].startswith("resend:")
        assert len(fake.calls_of("sendPhoto")) == 1
        assert not app.generations.jobs  # the job is finished: delivered, with the offer shown
    finally:
        await app.stop()
        fake.close()


async def test_an_image_too_large_for_a_photo_is_sent_as_a_document(make_app, fake_tg, fake_kie, monkeypatch):
    monkeypatch.setattr(trt_bot, "PHOTO_UPLOAD_MAX_BYTES", len(PNG_BYTES) - 1)
    fake_tg.fail("sendPhoto", 400, {"ok": False, "error_code": 400,
                                    "description": "Bad Request: failed to get HTTP URL content"})
    app = await make_app(**gen_env(fake_kie, RESULT_DOWNLOAD_ALLOW_PRIVATE="1"))
    await order(app, 58)
    await eventually(lambda: fake_kie.tasks)
    fake_kie.complete("task00001", fake_kie.image_url("huge.png"))
    await kie_calls_back(app, fake_kie, "task00001")
    await eventually(lambda: fake_tg.calls_of("sendDocument"))
    (document,) = fake_tg.calls_of("sendDocument")
    assert document["document"] == PNG_BYTES and len(fake_tg.calls_of("sendPhoto")) == 1  # the URL try only


@pytest.mark.parametrize("data", ["ratio:16:9", "opt:high", "model:zimage", "again:0123456789abcdef",
                                  "again:../../etc/passwd", "ratio:", "new:extra", "resend:0123456789abcdef",
                                  "resend:"])
async def test_forged_or_stale_buttons_are_answered_politely_and_start_nothing(make_app, fake_tg, fake_kie, data):
    app = await make_app(**gen_env(fake_kie))
    await post_update(app, update_callback(1, 70, data))
    await eventually(lambda: fake_tg.calls_of("answerCallbackQuery"))
    await post_update(app, update_message(2, 70, "/help"))
    await eventually(lambda: fake_tg.texts_to(70))  # the chat's next update: the button's handling is over
    assert fake_kie.created == [] and app.generations.jobs == {}


async def test_a_ratio_the_model_does_not_offer_is_refused(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    for data in ("new", None, "ratio:21:9", "ratio:1:1"):
        update = (update_message(next(_update_ids), 71, "лес") if data is None
                  else update_callback(next(_update_ids), 71, data))
        await post_update(app, update)
    await eventually(lambda: fake_kie.created)
    answers = [p.get("text", "") for p in fake_tg.calls_of("answerCallbackQuery")]
    assert answers[1] == bot_text("ru", "stale_button") and fake_kie.created[0]["input"]["aspect_ratio"] == "1:1"


async def test_bad_prompts_are_explained_and_the_dialog_waits_for_a_good_one(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await post_update(app, update_callback(1, 72, "new"))
    await post_update(app, update_message(2, 72, "x" * 1001))
    await post_update(app, update_message(3, 72, "   "))
    sticker = update_message(4, 72, "")
    del sticker["message"]["text"]
    sticker["message"]["sticker"] = {"file_id": "s"}
    await post_update(app, sticker)
    await post_update(app, update_message(5, 72, "<b>кот</b> & co"))
    await eventually(lambda: len(fake_tg.texts_to(72)) == 5)
    _, too_long, empty, not_text, ratio = fake_tg.texts_to(72)
    assert too_long == bot_text("ru", "prompt_too_long", model="Z-Image", length=1001, most=1000)
    assert empty == bot_text("ru", "prompt_empty") and not_text == bot_text("ru", "not_text_sticker")
    assert "&lt;b&gt;кот&lt;/b&gt; &amp; co" in ratio and "<b>кот" not in ratio


def edited(update_id: int, chat_id: int, message_id: int, text: str, lang: str = "ru") -> dict:
    """Telegram's update for an edit of message ``message_id``, now reading ``text``."""
    message = update_message(message_id, chat_id, text, lang)["message"]
    return {"update_id": update_id, "edited_message": {**message, "edit_date": message["date"] + 5}}


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_a_new_text_at_the_ratio_step_replaces_the_prompt_and_every_ratio_button_draws_it(
        make_app, fake_tg, fake_kie, lang):
    app = await make_app(**gen_env(fake_kie))
    await post_update(app, update_callback(1, 60, "new", lang))
    await post_update(app, update_message(2, 60, "кот", lang))
    await post_update(app, update_message(3, 60, "собака", lang))
    await eventually(lambda: len(fake_tg.texts_to(60)) == 3)
    assert fake_tg.texts_to(60)[2] == bot_text(lang, "prompt_replaced", prompt="собака")
    question = fake_tg.calls_of("sendMessage")[2]
    assert [data for _, data in buttons_of(question)][:5] == [f"ratio:{r}" for r in trt_bot.Z_IMAGE.ratios]
    await post_update(app, update_callback(4, 60, "ratio:1:1", lang))  # a button of the first question
    await eventually(lambda: fake_kie.created)
    assert fake_kie.created[0]["input"]["prompt"] == "собака"


async def test_an_edited_prompt_is_used_until_the_job_starts_and_other_edits_change_nothing(
        make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await post_update(app, update_callback(1, 61, "new"))
    await post_update(app, update_message(2, 61, "кот"))
    await post_update(app, edited(3, 61, 2, "тигр в джунглях"))
    await post_update(app, edited(4, 61, 1, "чужое сообщение"))  # not the prompt: no answer
    await post_update(app, edited(5, 61, 2, "x" * 1001))  # a bad edit is explained and keeps the prompt
    await eventually(lambda: len(fake_tg.texts_to(61)) == 4)
    _, _, replaced, too_long = fake_tg.texts_to(61)
    assert replaced == bot_text("ru", "prompt_replaced", prompt="тигр в джунглях")
    assert too_long == bot_text("ru", "prompt_too_long", model="Z-Image", length=1001, most=1000)
    await post_update(app, update_callback(6, 61, "ratio:16:9"))
    await eventually(lambda: fake_kie.created)
    await post_update(app, edited(7, 61, 2, "слон"))  # the job has started: too late, nothing happens
    await post_update(app, update_message(8, 61, "/help"))
    await eventually(lambda: "/cancel" in fake_tg.texts_to(61)[-1])
    assert fake_kie.created[0]["input"]["prompt"] == "тигр в джунглях" and len(fake_kie.created) == 1
    assert not any("слон" in text for text in fake_tg.texts_to(61))


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_commands_are_never_prompts_and_an_unknown_one_gets_a_short_help(make_app, fake_tg, fake_kie, lang):
    app = await make_app(**gen_env(fake_kie))
    await post_update(app, update_callback(1, 62, "new", lang))
    for n, text in enumerate(["/foo", "/", "/Paint@trt_test_bot a cat", "кот"], start=2):
        await post_update(app, update_message(n, 62, text, lang))
    await eventually(lambda: len(fake_tg.texts_to(62)) == 5)
    _, *unknowns, ratio = fake_tg.texts_to(62)
    assert unknowns == [bot_text(lang, "unknown_command")] * 3
    assert ratio == bot_text(lang, "ask_ratio", prompt="кот")  # the question stayed open through the commands


@pytest.mark.parametrize("lang, kind, key", [
    ("ru", {"voice": {"file_id": "v", "duration": 2}}, "not_text_voice"),
    ("ru", {"document": {"file_id": "d", "mime_type": "application/pdf"}}, "photo_not_image"),
    ("ru", {"sticker": {"file_id": "s"}}, "not_text_sticker"),
    ("en", {"voice": {"file_id": "v", "duration": 2}}, "not_text_voice"),
    ("en", {"video_note": {"file_id": "n"}}, "not_text_video"),
])
async def test_a_message_without_text_at_the_prompt_step_is_told_what_was_not_understood(
        make_app, fake_tg, fake_kie, lang, kind, key):
    app = await make_app(**gen_env(fake_kie))
    await post_update(app, update_callback(1, 63, "new", lang))
    message = update_message(2, 63, "", lang)
    del message["message"]["text"]
    message["message"].update(kind)
    await post_update(app, message)
    await eventually(lambda: len(fake_tg.texts_to(63)) == 2)
    assert fake_tg.texts_to(63)[1] == bot_text(lang, key)


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_tapping_another_model_while_asked_for_a_prompt_asks_again_with_that_models_limits(
        make_app, fake_tg, fake_kie, lang):
    app = await make_app(**gen_env(fake_kie, SINGLE_MODEL_ONLY="0"))
    await post_update(app, update_callback(1, 64, "new", lang))
    await post_update(app, update_callback(2, 64, "model:flux2pro", lang))
    await post_update(app, update_message(3, 64, "ab", lang))  # enough for Z-Image, too short for Flux 2 Pro
    await post_update(app, update_message(4, 64, "горы", lang))
    await post_update(app, update_callback(5, 64, "ratio:1:1", lang))
    await post_update(app, update_callback(6, 64, "opt:1K", lang))
    await eventually(lambda: fake_kie.created)
    ask_zimage, ask_flux, short, *_ = await eventually(lambda: len(fake_tg.texts_to(64)) >= 3 and fake_tg.texts_to(64))
    assert ask_zimage == bot_text(lang, "ask_prompt", model="Z-Image", limits=bot_text(lang, "limits_up_to", most=1000))
    assert ask_flux == bot_text(lang, "ask_prompt", model="Flux 2 Pro",
                                limits=bot_text(lang, "limits_between", fewest=3, most=5000))
    assert short == bot_text(lang, "prompt_too_short", model="Flux 2 Pro", fewest=3)
    assert fake_kie.created[0]["model"] == "flux-2/pro-text-to-image"
    assert fake_kie.created[0]["input"]["prompt"] == "горы"


async def test_a_dialog_keeps_its_language_when_the_users_app_changes_its_own(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await post_update(app, update_callback(1, 65, "new", "ru"))
    await post_update(app, update_message(2, 65, "кот", "en"))  # the app's language changed mid-dialog
    await post_update(app, update_callback(3, 65, "ratio:1:1", "en"))
    await eventually(lambda: app.generations.jobs)
    ask_prompt, ask_ratio = await eventually(lambda: len(fake_tg.texts_to(65)) == 2 and fake_tg.texts_to(65))
    assert says(ask_prompt, "ru", "ask_prompt") and ask_ratio == bot_text("ru", "ask_ratio", prompt="кот")
    status = await eventually(lambda: [call for call in fake_tg.calls_of("editMessageText")
                                       if call["text"].startswith("⏳")])
    assert buttons_of(status[0]) == [(bot_text("ru", "btn_cancel"), "cancel")]  # the status's ✖️ in Russian
    assert [job.lang for job in app.generations.jobs.values()] == ["ru"]
    await post_update(app, update_message(4, 65, "/start", "en"))  # the dialog is over: the app's language again
    await eventually(lambda: len(fake_tg.texts_to(65)) == 3)
    assert says(fake_tg.texts_to(65)[2], "en", "start")


async def test_choosing_a_language_mid_dialog_switches_the_dialog_too(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await post_update(app, update_callback(1, 66, "new", "ru"))
    await post_update(app, update_callback(2, 66, "lang:en", "ru"))
    await post_update(app, update_message(3, 66, "кот", "ru"))
    await eventually(lambda: len(fake_tg.texts_to(66)) == 3)
    assert fake_tg.texts_to(66)[2] == bot_text("en", "ask_ratio", prompt="кот")


async def test_the_prompt_is_escaped_in_the_caption(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await order(app, 73, "<i>fish</i> & <script>")
    await eventually(lambda: fake_kie.tasks)
    fake_kie.complete("task00001")
    await kie_calls_back(app, fake_kie, "task00001")
    await eventually(lambda: fake_tg.calls_of("sendPhoto"))
    caption = ("16:9 · Z-Image\n&lt;i&gt;fish&lt;/i&gt; &amp; &lt;script&gt;\n\n"
               + bot_text("ru", "left_this_hour", left=19, limit=20))
    assert fake_tg.calls_of("sendPhoto")[0]["caption"] == caption
    assert fake_kie.created[0]["input"]["prompt"] == "<i>fish</i> & <script>"  # Kie gets the text as typed


async def test_catalog_mode_sends_the_chosen_models_own_id_ratio_and_option(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie, SINGLE_MODEL_ONLY="0"))
    await post_update(app, update_message(1, 74, "/start"))
    await eventually(lambda: fake_tg.calls_of("sendMessage"))
    menu = [data for _, data in buttons_of(fake_tg.calls_of("sendMessage")[0])]
    assert menu == ["new", "settings", "help"] and len(trt_bot.CATALOG) >= 5  # one entry point per action
    await order(app, 74, "горы", "21:9", model="seedream45", option="high")
    await eventually(lambda: fake_kie.created)
    assert fake_kie.created[0]["model"] == "seedream/4.5-text-to-image"
    assert fake_kie.created[0]["input"] == {"prompt": "горы", "aspect_ratio": "21:9", "quality": "high",
                                            "nsfw_checker": True}
    option_question, status = edits_of(fake_tg, 74)  # the ratio question became the option question, then the status
    seedream = trt_bot.MODELS_BY_KEY["seedream45"]
    assert option_question["text"] == bot_text("ru", "ask_option", option=seedream.option.title["ru"])
    assert status["text"] == bot_text("ru", "status", details=seedream.details("21:9", "high", "ru"), elapsed="0:00")
    assert [method for method, _ in new_messages_to(fake_tg, 74)] == ["sendMessage"] * 3  # menu, prompt, ratio


async def test_a_model_added_as_one_catalog_row_is_drawn_with_no_other_edit(make_app, fake_tg, fake_kie, monkeypatch):
    """The forker's "add a model": a row with Kie's id, its ratios and inputs; nothing else names models."""
    row = trt_bot.ImageModel("fork", "someone/new-model", "Forked", ("1:1", "5:4"), about=("своя", "its own"),
                             inputs=(("prompt", "prompt"), ("size", "ratio")), fixed_input=(("steps", 8),))
    monkeypatch.setattr(trt_bot, "CATALOG", (*trt_bot.CATALOG, row))  # as if the row were written in CATALOG
    monkeypatch.setitem(trt_bot.MODELS_BY_KEY, row.key, row)
    app = await make_app(**gen_env(fake_kie, SINGLE_MODEL_ONLY="0"))
    await order(app, 73, "лиса в снегу", "5:4", model="fork")
    await eventually(lambda: fake_kie.created)
    assert fake_kie.created[0]["model"] == "someone/new-model"
    assert fake_kie.created[0]["input"] == {"prompt": "лиса в снегу", "size": "5:4", "steps": 8}


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_the_menu_has_one_entry_per_action_and_create_draws_in_the_model_of_settings(make_app, fake_tg, fake_kie,
                                                                                          lang):
    app = await make_app(**gen_env(fake_kie, SINGLE_MODEL_ONLY="0"))
    await answered(app, update_message(next(_update_ids), 5000, "/start", lang))
    await answered(app, press(next(_update_ids), 5000, "settings", 80, lang))  # ⚙️ under the menu
    assert [p for p in fake_tg.calls_of("sendMessage") if p["text"].startswith("⚙️")]
    await answered(app, press(next(_update_ids), 5000, "set:model:grok", 81, lang))
    await answered(app, press(next(_update_ids), 5000, "new", 80, lang))
    grok = trt_bot.MODELS_BY_KEY["grok"]
    assert questions_to(fake_tg, 5000, "ask_prompt", lang, model="Grok Imagine", limits=trt_bot.prompt_limits(grok, lang))


def test_every_catalog_row_is_consistent():
    keys = [model.key for model in trt_bot.CATALOG]
    assert len(set(keys)) == len(keys) and trt_bot.CATALOG[0] is trt_bot.Z_IMAGE
    for model in (*trt_bot.CATALOG, trt_bot.EDIT_MODEL):
        assert all(model.about) and "\n" not in model.described("ru") + model.described("en")  # one line each
    for model in trt_bot.CATALOG:
        assert model.ratios and all(len(f"ratio:{r}".encode()) <= 64 for r in model.ratios)
        if model.option is not None:
            assert all(len(f"opt:{value}".encode()) <= 64 for value, _ in model.option.choices)
            assert all(set(labels) == {"ru", "en"} for _, labels in model.option.choices)
    assert set(trt_bot.TEXTS["ru"]) == set(trt_bot.TEXTS["en"])


def popups(fake_tg, text: str) -> list[dict]:
    return [p for p in fake_tg.calls_of("answerCallbackQuery") if p.get("text") == text]


async def test_one_generation_at_a_time_and_an_hourly_limit_of_delivered_pictures_told_before_the_user_types(
        make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie, GEN_HOURLY_LIMIT="2"))
    busy = trt_bot.render("ru", "busy_user")
    await order(app, 75)
    await answered(app, update_callback(next(_update_ids), 75, "new"))  # 🖼 while the picture is drawn
    await answered(app, update_message(next(_update_ids), 75, "второй"))  # a description while it is drawn
    told = [p for p in fake_tg.calls_of("sendMessage") if p["text"] == busy]
    assert len(told) == 2 and all(buttons_of(p) == [("✖️ Отмена", "stop")] for p in told)
    assert trt_bot.render("ru", "ask_prompt", model="Z-Image", limits=trt_bot.prompt_limits(trt_bot.Z_IMAGE, "ru")) \
        not in fake_tg.texts_to(75)[1:]  # no second prompt question to type into
    assert len(fake_kie.created) == 1
    fake_kie.fail_task("task00001")  # our failure costs the user nothing
    await kie_calls_back(app, fake_kie, "task00001")
    await eventually(lambda: not app.generations.jobs)
    assert app.generations.remaining(75) == (2, 2)
    for n, prompt in ((2, "третий"), (3, "четвёртый")):
        await order(app, 75, prompt)
        await eventually(lambda: len(fake_kie.created) == n)
        fake_kie.complete(f"task0000{n}")
        await kie_calls_back(app, fake_kie, f"task0000{n}")
        await eventually(lambda: not app.generations.jobs)
    assert [p["caption"].split("\n")[-1] for p in fake_tg.calls_of("sendPhoto")] == [
        bot_text("ru", "left_this_hour", left=left, limit=2) for left in (1, 0)]
    fake_tg.clear()
    await answered(app, update_callback(next(_update_ids), 75, "new"))
    await answered(app, update_message(next(_update_ids), 75, "пятый"))
    key, values = app.generations.refusal(75)
    limit = trt_bot.render("ru", key, **values)  # "… Next one in 60 minutes"
    assert fake_tg.texts_to(75) == [limit, limit] and len(fake_kie.created) == 3  # said at once, with the wait


def questions_to(fake_tg, user: int, key: str, lang: str, **values) -> list[dict]:
    text = trt_bot.render(lang, key, **values)
    return [p for p in fake_tg.calls_of("sendMessage") if p["chat_id"] == user and p["text"] == text]


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_any_text_in_a_private_chat_is_a_description_followed_by_the_format_question(
        make_app, fake_tg, fake_kie, lang):
    app = await make_app(**gen_env(fake_kie))
    await answered(app, update_message(next(_update_ids), 4100, "a red fox in snow", lang))
    (question,) = questions_to(fake_tg, 4100, "ask_ratio", lang, prompt="a red fox in snow")
    assert ("16:9", "ratio:16:9") in buttons_of(question)
    await answered(app, update_callback(next(_update_ids), 4100, "ratio:16:9", lang))
    await eventually(lambda: fake_kie.created)
    assert fake_kie.created[0]["input"]["prompt"] == "a red fox in snow"
    assert not [t for t in fake_tg.texts_to(4100) if t == trt_bot.render(lang, "hint")]


def settings_pressed(update_id: int, user: int, data: str, message_id: int, lang: str) -> dict:
    return press(update_id, user, f"set:{data}", message_id, lang)


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_a_default_format_from_settings_draws_a_text_at_once_and_survives_a_restart(
        make_app, fake_tg, fake_kie, database_url, lang):
    env = {**gen_env(fake_kie), "SINGLE_MODEL_ONLY": "0", "DATABASE_URL": database_url}
    app = await make_app(**env)
    await answered(app, update_message(next(_update_ids), 4200, "/settings", lang))
    (screen,) = [p for p in fake_tg.calls_of("sendMessage") if p["chat_id"] == 4200]
    ask = trt_bot.TEXTS[lang]["btn_ask_every_time"]
    assert ("✅ Z-Image", "set:model:zimage") in buttons_of(screen) and (f"✅ {ask}", "set:ratio:") in buttons_of(screen)
    for data in ("model:seedream45", "ratio:16:9", "option:high", "ratio:99:1", "model:nope"):  # the last two forged
        await answered(app, settings_pressed(next(_update_ids), 4200, data, 70, lang))
    assert [p.get("text") for p in fake_tg.calls_of("answerCallbackQuery")][-2:] == [
        trt_bot.TEXTS[lang]["stale_button"]] * 2
    last = edits_of(fake_tg, 4200)[-1]
    assert last["message_id"] == 70 and {("✅ Seedream 4.5", "set:model:seedream45"), ("✅ 16:9", "set:ratio:16:9")} \
        <= set(buttons_of(last))
    await app.stop()
    fake_tg.clear()
    app = await make_app(**env)
    await answered(app, update_message(next(_update_ids), 4200, "a red fox in snow", lang))
    await eventually(lambda: fake_kie.created)
    (task,) = fake_kie.created
    assert task["model"] == "seedream/4.5-text-to-image"
    assert task["input"].items() >= {"prompt": "a red fox in snow", "aspect_ratio": "16:9", "quality": "high"}.items()
    status = await eventually(lambda: [p for p in fake_tg.calls_of("sendMessage") if p["text"].startswith("⏳")])
    assert status[0]["text"].startswith("⏳ 16:9 · Seedream 4.5")
    assert not questions_to(fake_tg, 4200, "ask_ratio", lang, prompt="a red fox in snow")


async def test_group_chatter_is_never_a_description(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await answered(app, in_group(update_message(next(_update_ids), 4300, "a red fox in snow")))
    assert not fake_kie.created and not app.role.states.get((GROUP, 0, 4300))


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_a_description_while_a_picture_is_drawn_says_so_and_its_cancel_stops_the_picture(
        make_app, fake_tg, fake_kie, lang):
    app = await make_app(**gen_env(fake_kie))
    await order(app, 4500, lang=lang)
    job = await submitted_job(app, 4500)
    await answered(app, update_message(next(_update_ids), 4500, "a red fox in snow", lang))
    (busy,) = questions_to(fake_tg, 4500, "busy_user", lang)
    assert buttons_of(busy) == [(trt_bot.TEXTS[lang]["btn_cancel"], "stop")]
    await answered(app, press(next(_update_ids), 4500, "stop", returned_message_id(fake_tg, busy),
                              lang))
    assert job.state == "cancelled" and len(fake_kie.created) == 1
    (status,) = [p for p in edits_of(fake_tg, 4500) if p["message_id"] == 1][-1:]  # the picture's ⏳ says it
    assert status["text"] == trt_bot.TEXTS[lang]["cancelled_job"]
    assert {"chat_id": 4500, "message_id": returned_message_id(fake_tg, busy), "reply_markup": {"inline_keyboard": []}} \
        in fake_tg.calls_of("editMessageReplyMarkup")  # its ✖️ has done its work


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_a_superseded_format_question_loses_its_keyboard(make_app, fake_tg, fake_kie, lang):
    app = await make_app(**gen_env(fake_kie))
    await answered(app, update_message(next(_update_ids), 4600, "a red fox", lang))
    (first,) = questions_to(fake_tg, 4600, "ask_ratio", lang, prompt="a red fox")
    await answered(app, update_message(next(_update_ids), 4600, "a grey wolf", lang))
    assert questions_to(fake_tg, 4600, "prompt_replaced", lang, prompt="a grey wolf")
    (stripped,) = fake_tg.calls_of("editMessageReplyMarkup")
    assert stripped["message_id"] == returned_message_id(fake_tg, first)
    assert stripped["reply_markup"] == {"inline_keyboard": []}


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_double_taps_on_new_picture_and_on_the_original_file_send_one_each(make_app, fake_tg, fake_kie, lang):
    app = await make_app(**gen_env(fake_kie, RESULT_DOWNLOAD_ALLOW_PRIVATE="1"))
    photo = await delivered_picture(app, fake_tg, fake_kie, 4700, lang)
    for data in (button_data(photo, "file"), button_data(photo, "file"), "model:zimage", "model:zimage"):
        await answered(app, press(next(_update_ids), 4700, data, 77, lang))
    asked = questions_to(fake_tg, 4700, "ask_prompt", lang, model="Z-Image",
                         limits=trt_bot.prompt_limits(trt_bot.Z_IMAGE, lang))
    assert len(asked) == 2  # the first from ordering the picture, one for 🖼 New picture
    await another_picture_is_delivered(app, fake_tg, fake_kie, 4701)
    assert len(fake_tg.calls_of("sendDocument")) == 1


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_a_description_too_long_for_the_model_offers_the_models_that_take_it(make_app, fake_tg, fake_kie, lang):
    app = await make_app(**gen_env(fake_kie), SINGLE_MODEL_ONLY="0")
    long_prompt = "a red fox in snow, " * 60  # 1140 characters: Z-Image takes 1000
    await answered(app, update_message(next(_update_ids), 4800, long_prompt, lang))
    (offer,) = questions_to(fake_tg, 4800, "prompt_too_long_models", lang, model="Z-Image", length=1139, most=1000)
    offered = [data for _, data in buttons_of(offer)]
    assert "long:nanobanana" in offered and "long:zimage" not in offered and offered[-1] == "cancel"
    for _ in range(2):  # a second tap changes nothing
        await answered(app, press(next(_update_ids), 4800, "long:nanobanana", returned_message_id(fake_tg, offer), lang))
    shown = html.escape(trt_bot.shorten(long_prompt.strip(), 200))
    assert len(questions_to(fake_tg, 4800, "ask_ratio", lang, prompt=shown)) == 1
    await answered(app, update_callback(next(_update_ids), 4800, "ratio:16:9", lang))
    await eventually(lambda: fake_kie.created)
    assert fake_kie.created[0]["model"] == "google/nano-banana"
    assert fake_kie.created[0]["input"]["prompt"] == long_prompt.strip()


def photo_message(update_id: int, user: int, caption: str = "", lang: str = "ru", **extra) -> dict:
    """A photo as Telegram sends it: its sizes smallest first, the caption if any."""
    update = update_message(update_id, user, "", lang)
    message = update["message"]
    del message["text"]
    message["photo"] = [{"file_id": f"small-{user}", "file_size": 900, "width": 90, "height": 90},
                        {"file_id": f"large-{user}", "file_size": len(PNG_BYTES), "width": 1280, "height": 960}]
    message.update({"caption": caption} if caption else {}, **extra)
    return update


async def edit_task(fake_kie, n: int = 1) -> dict:
    await eventually(lambda: len(fake_kie.created) >= n)
    return fake_kie.created[n - 1]


@pytest.mark.parametrize("lang, caption", [("ru", "сделай в стиле аниме"), ("en", "make it anime style")])
async def test_a_photo_with_a_caption_is_edited_with_the_caption_as_the_instruction(make_app, fake_tg, fake_kie,
                                                                                   lang, caption):
    fake_tg.files["large-4900"] = PNG_BYTES
    app = await make_app(**gen_env(fake_kie))
    await answered(app, photo_message(next(_update_ids), 4900, caption, lang))
    task = await edit_task(fake_kie)
    assert [p["file_id"] for p in fake_tg.calls_of("getFile")] == ["large-4900"]  # the largest size
    (name,) = fake_kie.uploads
    assert fake_kie.uploads[name] == PNG_BYTES
    assert task["model"] == "google/nano-banana-edit"
    assert task["input"] == {"prompt": caption, "image_urls": [f"{fake_kie.base_url}/uploads/{name}"],
                             "output_format": "png", "image_size": "auto"}
    status = await eventually(lambda: [p for p in fake_tg.calls_of("sendMessage") if p["text"].startswith("⏳")])
    assert status[0]["text"] == "⏳ Nano Banana Edit · 0:00"
    fake_kie.complete("task00001")
    await kie_calls_back(app, fake_kie, "task00001")
    (photo,) = await eventually(lambda: fake_tg.calls_of("sendPhoto"))
    assert [data.split(":")[0] for _, data in buttons_of(photo)] == ["again", "edit", "retouch", "file", "model"]
    assert photo["caption"].startswith(f"Nano Banana Edit\n{caption}")


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_a_photo_then_a_text_asks_what_to_change_then_edits_it(make_app, fake_tg, fake_kie, lang):
    fake_tg.files["large-4910"] = PNG_BYTES
    app = await make_app(**gen_env(fake_kie))
    await answered(app, photo_message(next(_update_ids), 4910, lang=lang))
    assert questions_to(fake_tg, 4910, "ask_edit", lang) and not fake_kie.created
    await answered(app, update_message(next(_update_ids), 4910, "add a hat", lang))
    task = await edit_task(fake_kie)
    assert task["model"] == "google/nano-banana-edit" and task["input"]["prompt"] == "add a hat"
    assert len(task["input"]["image_urls"]) == 1


def pressed_under_photo(update_id: int, user: int, data: str, file_id: str, lang: str) -> dict:
    update = press(update_id, user, data, 500, lang)
    update["callback_query"]["message"]["photo"] = [{"file_id": file_id, "file_size": len(PNG_BYTES)}]
    return update


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_retouch_edits_a_result_fetched_again_from_telegram_even_after_kies_copy_expired(
        make_app, fake_tg, fake_kie, lang):
    fake_tg.files["result-4920"] = PNG_BYTES
    app = await make_app(**gen_env(fake_kie))
    photo = await delivered_picture(app, fake_tg, fake_kie, 4920, lang)
    for n, instruction in ((2, "add a hat"), (3, "now a scarf")):
        await answered(app, pressed_under_photo(next(_update_ids), 4920, button_data(photo, "retouch"), "result-4920",
                                                lang))
        await answered(app, update_message(next(_update_ids), 4920, instruction, lang))
        task = await edit_task(fake_kie, n)
        assert task["input"]["prompt"] == instruction
        await eventually(lambda: fake_kie.uploads)
        uploaded = task["input"]["image_urls"][0].rsplit("/", 1)[-1]
        assert fake_kie.uploads.pop(uploaded) == PNG_BYTES  # Kie's copy: gone before the next 🪄 (it expires)
        fake_kie.complete(f"task0000{n}")
        await kie_calls_back(app, fake_kie, f"task0000{n}")
        await eventually(lambda: not app.generations.jobs)
    assert [p["file_id"] for p in fake_tg.calls_of("getFile")] == ["result-4920"] * 2  # fetched anew each time


async def test_a_photo_edit_sends_kie_neither_the_bot_token_nor_a_telegram_file_path_and_logs_neither(
        make_app, fake_tg, fake_kie):
    fake_tg.files["large-4930"] = PNG_BYTES
    seen = len(ALL_RECORDS.records)
    app = await make_app(**gen_env(fake_kie))
    await answered(app, photo_message(next(_update_ids), 4930, "make it blue"))
    await edit_task(fake_kie)
    lines = [formatted(record) for record in ALL_RECORDS.records[seen:]]
    for secret in (TOKEN, TOKEN.split(":")[1], "photos/large-4930", "/file/bot"):
        assert not [request for request in fake_kie.requests if secret in repr(request)], secret
    for secret in (TOKEN, TOKEN.split(":")[1], "photos/large-4930"):
        assert not [line for line in lines if secret in line], secret
    downloads = [line for line in lines if "/file/bot" in line]
    assert downloads and all("/file/bot*** " in line for line in downloads)  # httpx logged it, masked


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_a_photo_over_20_mb_a_non_image_file_and_an_albums_other_photos_are_refused_with_a_sentence(
        make_app, fake_tg, fake_kie, lang):
    fake_tg.files["large-4940"] = PNG_BYTES
    app = await make_app(**gen_env(fake_kie))
    huge = photo_message(next(_update_ids), 4940, "x", lang)
    for size in huge["message"]["photo"]:
        size["file_size"] = 21 * 1024 * 1024
    pdf = update_message(next(_update_ids), 4940, "", lang)
    pdf["message"].update(document={"file_id": "doc", "mime_type": "application/pdf", "file_size": 10})
    del pdf["message"]["text"]
    for update in (huge, pdf, *(photo_message(next(_update_ids), 4940, "make it red" if n == 0 else "", lang,
                                              media_group_id="album-1") for n in range(3))):
        await answered(app, update)
    told = [text for text in fake_tg.texts_to(4940) if not text.startswith("⏳")]
    assert told == [trt_bot.render(lang, "photo_too_large"), trt_bot.render(lang, "photo_not_image"),
                    trt_bot.render(lang, "album_one_photo")]
    assert len(await eventually(lambda: fake_kie.created)) == 1 and not fake_tg.calls_of("getFile")[1:]


async def test_past_the_daily_limit_every_user_is_told_and_the_red_flag_is_raised_once(make_app, fake_tg, fake_kie,
                                                                                      caplog, monkeypatch):
    monkeypatch.setattr(trt_bot, "RED_FLAG_CHECK_S", 0.05)
    app = await make_app(**gen_env(fake_kie, GEN_DAILY_LIMIT="2"))
    await order(app, 81)
    await order(app, 82)  # the failed one counts too: Kie may have spent on it
    fake_kie.fail_task("task00001")
    await kie_calls_back(app, fake_kie, "task00001")
    await order(app, 83, lang="en")
    assert bot_text("en", "daily_limit", limit=2) in fake_tg.texts_to(83)  # told up front, before typing
    assert len(fake_kie.created) == 2
    flagged = await eventually(lambda: [r for r in caplog.records if "GEN_DAILY_LIMIT=2" in r.getMessage()])
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}") as client:
        health = await client.get("/health")
        metrics = (await client.get("/metrics")).text
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert [w["flag"] for w in health.json()["warnings"]] == ["daily_limit"]
    assert 'trt_red_flag{flag="daily_limit"} 1.0' in metrics and len(flagged) == 1


async def test_the_days_pictures_are_counted_again_after_a_restart(make_app, fake_tg, fake_kie):
    first = await make_app(**gen_env(fake_kie, GEN_DAILY_LIMIT="1"))
    await order(first, 84)
    await first.stop()
    second = await make_app(**gen_env(fake_kie, GEN_DAILY_LIMIT="1"))
    await eventually(lambda: second.generations.fairness_loaded)
    await order(second, 85)
    assert bot_text("ru", "daily_limit", limit=1) in fake_tg.texts_to(85)
    assert len(fake_kie.created) == 1


def generations_of(fake_tg, clock: ManualClock, **env: str) -> trt_bot.Generations:
    """A bot's jobs part, built and never started: its limits are counted in memory."""
    return trt_bot.App(trt_bot.load_config(bot_env(fake_tg, "x.sqlite3", **env)), clock=clock).generations


def test_the_daily_limit_counts_starts_for_the_whole_bot_until_the_utc_day_turns(fake_tg):
    clock = ManualClock(start=19_999 * 86400 + 86000)  # 23:53 UTC
    fairness = generations_of(fake_tg, clock, GEN_HOURLY_LIMIT="100", ADMIN_IDS="900", GEN_DAILY_LIMIT="2")
    fairness.note_start()
    assert fairness.refusal(7) is None
    fairness.note_start()
    assert fairness.refusal(8) == fairness.refusal(900) == ("daily_limit", {"limit": 2})
    clock.advance(400)
    assert fairness.refusal(8) is None and fairness.started_today() == 0


async def test_without_a_kie_key_users_get_a_neutral_answer_and_admins_the_details(make_app, fake_tg):
    app = await make_app(ADMIN_IDS="900")
    await post_update(app, update_callback(1, 76, "new"))
    await post_update(app, update_callback(2, 900, "new"))
    await post_update(app, update_callback(3, 78, "new", lang="en"))
    await eventually(lambda: fake_tg.texts_to(76) and fake_tg.texts_to(900) and fake_tg.texts_to(78))
    (user,), (admin,), (english,) = fake_tg.texts_to(76), fake_tg.texts_to(900), fake_tg.texts_to(78)
    assert (user, admin, english) == (bot_text("ru", "not_configured"), bot_text("ru", "not_configured_admin"),
                                      bot_text("en", "not_configured"))
    assert "KIE_API_KEY" in admin and "Kie" not in user and "Kie" not in english  # only admins read what to set


async def test_stats_are_for_admins_only_and_read_in_the_admins_language(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie, ADMIN_IDS="900,901"))
    await order(app, 5)
    await eventually(lambda: fake_kie.created)
    await post_update(app, update_message(1, 900, "/stats"))
    await post_update(app, update_message(2, 77, "/stats"))
    await post_update(app, update_message(3, 901, "/stats", lang="en"))
    await eventually(lambda: fake_tg.texts_to(900) and fake_tg.texts_to(77) and fake_tg.texts_to(901))
    (russian,), (english,) = fake_tg.texts_to(900), fake_tg.texts_to(901)
    assert says(russian, "ru", "stats") and "1234.5" in russian
    assert f'{bot_text("ru", "outcome_in_flight")} 1' in russian
    assert not re.search("[A-Za-z]", russian.replace("Kie.ai", "").replace("<b>", "").replace("</b>", ""))
    assert says(english, "en", "stats") and f'{bot_text("en", "outcome_in_flight")} 1' in english
    assert not says(fake_tg.texts_to(77)[0], "ru", "stats")


async def test_an_admin_alert_without_admins_reads_and_sends_nothing_on_postgresql(make_app, fake_tg, postgres):
    # The admins' languages are read with one IN (...) of their ids: an empty one is an error on PostgreSQL.
    app = await make_app(DATABASE_URL=postgres.new_database_url())
    sent_before = fake_tg.calls_of("sendMessage")
    await app.generations.running.tell_admins(lambda lang: "alert")
    assert app.db.ok and fake_tg.calls_of("sendMessage") == sent_before


@pytest.mark.parametrize("lang", ["ru", "en"])
def test_stats_name_every_job_outcome_in_the_admins_language(lang):
    for outcome in {*trt_bot.OUTCOMES.values(), "in_flight"}:
        shown = trt_bot.stats_values({"jobs_today": {outcome: 2}}, {}, trt_bot.TEXTS[lang])["jobs_today"]
        assert shown == f"{trt_bot.TEXTS[lang][f'outcome_{outcome}']} 2"  # "cancelled" stayed English for RU


def press(update_id: int, user: int, data: str, message_id: int, lang: str = "ru") -> dict:
    """A button press on message ``message_id`` (Telegram says which message carried the button)."""
    update = update_callback(update_id, user, data, lang)
    update["callback_query"]["message"]["message_id"] = message_id
    return update


@pytest.mark.parametrize("lang", ["ru", "en"])
@pytest.mark.parametrize("how", ["/cancel", "✖️"])
async def test_cancel_mid_generation_sends_no_photo_frees_the_user_and_keeps_the_quota(make_app, fake_tg, fake_kie,
                                                                                     tmp_path, lang, how):
    app = await make_app(**gen_env(fake_kie))
    await order(app, 90, lang=lang)
    job = await submitted_job(app, 90)
    cancel = (update_message(next(_update_ids), 90, "/cancel", lang) if how == "/cancel"
              else press(next(_update_ids), 90, "cancel", 1, lang))  # ✖️ under the ⏳ message
    await post_update(app, cancel)
    (told,) = await eventually(lambda: [p for p in edits_of(fake_tg, 90)
                                        if p["text"] == bot_text(lang, "cancelled_job")])
    assert told["message_id"] == 1 and "cancel" not in [data for _, data in buttons_of(told)]  # ⏳ became the answer
    assert app.generations.refusal(90) is None and app.generations.remaining(90) == (20, 20)  # free, nothing counted
    fake_kie.complete(job.task_id)  # Kie cannot cancel: its result comes, and is dropped
    await kie_calls_back(app, fake_kie, job.task_id)
    await another_picture_is_delivered(app, fake_tg, fake_kie, 190)  # the callback and the poller had their turn
    assert [p["chat_id"] for p in fake_tg.calls_of("sendPhoto")] == [190]
    assert app.generations.remaining(90) == (20, 20) and app.generations.finished["cancelled"] == 1
    assert job_states(str(tmp_path / "bot.sqlite3"))[0] == "cancelled"  # a restart does not resume it


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_cancel_says_cancelled_only_when_something_was_open(make_app, fake_tg, fake_kie, lang):
    app = await make_app(**gen_env(fake_kie))
    await post_update(app, update_message(1, 91, "/cancel", lang))
    await post_update(app, update_callback(2, 91, "new", lang))
    await post_update(app, update_message(3, 91, "/cancel", lang))
    await eventually(lambda: len(fake_tg.texts_to(91)) == 3)
    first, _, second = fake_tg.texts_to(91)
    assert (first, second) == (bot_text(lang, "nothing_to_cancel"), bot_text(lang, "cancelled"))


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_a_picture_already_on_its_way_is_not_cancelled_and_the_user_is_told_so(make_app, fake_tg, fake_kie,
                                                                                     lang):
    app = await make_app(**gen_env(fake_kie))
    fake_tg.stall("sendPhoto")
    await order(app, 92, lang=lang)
    job = await submitted_job(app, 92)
    fake_kie.complete(job.task_id)
    await kie_calls_back(app, fake_kie, job.task_id)
    await eventually(lambda: fake_tg.held("sendPhoto") == 1)
    await post_update(app, update_message(next(_update_ids), 92, "/cancel", lang))
    await eventually(lambda: app.role.outbox.depth == 2)  # the answer waits its turn behind the photo
    fake_tg.release("sendPhoto")
    await eventually(lambda: bot_text(lang, "cancel_too_late") in fake_tg.texts_to(92))
    assert fake_tg.calls_of("sendPhoto")
    await eventually(lambda: not app.generations.jobs)
    assert app.generations.remaining(92) == (19, 20)


async def test_the_cancel_button_under_a_new_question_closes_it_and_leaves_the_running_picture(
        make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await order(app, 3000)  # its ⏳ is message 1
    job = await submitted_job(app, 3000)
    await answered(app, press(next(_update_ids), 3000, f"ratios:{job.id}", 7))  # a question while it is drawn
    await answered(app, press(next(_update_ids), 3000, "cancel", 8))  # ✖️ under that question
    (closed,) = [p for p in edits_of(fake_tg, 3000) if p["message_id"] == 8]
    assert closed["text"] == trt_bot.render("ru", "cancelled") and job.state == "submitted"  # it used to stop


GROUP = -1001234567890


def in_group(update: dict) -> dict:
    """``update`` as the same user sends it in a group chat: only the chat differs (message ids included)."""
    body = next(value for value in update.values() if isinstance(value, dict))
    body.get("message", body)["chat"] = {"id": GROUP, "type": "supergroup", "title": "Friends"}
    return update


async def test_cancel_in_a_group_leaves_the_users_private_picture_and_edits_nothing(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await order(app, 3001)
    job = await submitted_job(app, 3001)
    await answered(app, in_group(update_message(next(_update_ids), 3001, "/cancel")))
    assert fake_tg.texts_to(GROUP) == [trt_bot.render("ru", "nothing_to_cancel")]
    assert edits_of(fake_tg, GROUP) == [] and job.state == "submitted"  # used to edit the group's message 1


BOT = {"id": 123456789, "is_bot": True, "first_name": "Test", "username": "trt_test_bot"}  # the fake's getMe


def group_message(update_id: int, user: int, text: str, *, to_bot: int = 0, topic: int = 0, name: str = "U") -> dict:
    """A member's message in GROUP; ``to_bot``: the bot's message it replies to; ``topic``: its forum topic."""
    update = in_group(update_message(update_id, user, text))
    update["message"]["from"]["first_name"] = name
    if to_bot:
        update["message"]["reply_to_message"] = {"message_id": to_bot, "from": BOT, "chat": update["message"]["chat"]}
    if topic:
        update["message"].update(message_thread_id=topic, is_topic_message=True)
    return update


def group_press(update_id: int, user: int, data: str, sent: dict, requester: dict) -> dict:
    """``user`` presses a button of the bot's message ``sent`` (sendMessage's params), a reply to ``requester``."""
    update = in_group(press(update_id, user, data, sent["message_id"]))
    update["callback_query"]["message"]["reply_to_message"] = requester["message"]
    return update


def replies_to(params: dict) -> int:
    return params["reply_parameters"]["message_id"]


def test_a_command_for_another_bot_is_not_ours_and_draw_takes_the_rest_of_the_line():
    assert trt_bot.parse_command("/draw@TRT_test_bot кот", "trt_test_bot") == "/draw"
    assert trt_bot.parse_command("/draw@otherbot кот", "trt_test_bot") == ""
    assert trt_bot.parse_command("/draw@otherbot", "") == "/draw"  # a private chat: only we read it
    assert trt_bot.command_argument("/draw@trt_test_bot  рыжий кот") == "рыжий кот"


async def test_draw_in_a_supergroup_replies_to_the_requester_and_another_members_tap_only_names_whose_it_is(
        make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    ask = group_message(next(_update_ids), 3101, "/draw@trt_test_bot рыжий кот", name="Ann")
    await answered(app, ask)
    (question,) = fake_tg.calls_of("sendMessage")
    assert question["text"] == bot_text("ru", "ask_ratio", prompt="рыжий кот")
    assert replies_to(question) == ask["message"]["message_id"]
    question["message_id"] = 1  # the fake's first message
    await answered(app, group_press(next(_update_ids), 3102, "ratio:1:1", question, ask))  # another member
    assert popups(fake_tg, bot_text("ru", "not_your_picture", name="Ann"))[0]["show_alert"] is True
    assert not app.generations.jobs and edits_of(fake_tg, GROUP) == []
    await answered(app, group_press(next(_update_ids), 3101, "ratio:1:1", question, ask))
    job = await submitted_job(app, 3101)
    assert (job.chat_id, job.prompt, job.ratio) == (GROUP, "рыжий кот", "1:1")


async def test_in_a_group_chatter_and_another_bots_command_get_no_answer_and_a_bare_draw_asks_with_force_reply(
        make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await answered(app, group_message(next(_update_ids), 3103, "/draw@otherbot кот"))
    await answered(app, group_message(next(_update_ids), 3103, "просто болтаем"))
    assert fake_tg.calls_of("sendMessage") == []
    draw = group_message(next(_update_ids), 3103, "/draw")
    await answered(app, draw)
    (question,) = fake_tg.calls_of("sendMessage")
    assert says(question["text"], "ru", "ask_prompt") and replies_to(question) == draw["message"]["message_id"]
    assert question["reply_markup"] == {"force_reply": True, "selective": True}
    await answered(app, group_message(next(_update_ids), 3103, "болтовня мимо"))  # not a reply: not the answer
    await answered(app, group_message(next(_update_ids), 3103, "тигр", to_bot=1))
    assert fake_tg.texts_to(GROUP)[1:] == [bot_text("ru", "ask_ratio", prompt="тигр")]


async def test_forum_topics_keep_their_own_dialogs_and_get_their_answers_in_the_topic(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    for topic in (7, 9):
        await answered(app, group_message(next(_update_ids), 3104, "/draw", topic=topic))
    await answered(app, group_message(next(_update_ids), 3104, "кот", to_bot=1, topic=7))
    tiger = group_message(next(_update_ids), 3104, "тигр", to_bot=2, topic=9)
    await answered(app, tiger)
    *_, cat_question, tiger_question = fake_tg.calls_of("sendMessage")
    for question, topic, prompt in ((cat_question, 7, "кот"), (tiger_question, 9, "тигр")):
        assert (question["message_thread_id"], question["text"]) == (topic, bot_text("ru", "ask_ratio", prompt=prompt))
    await answered(app, group_press(next(_update_ids), 3104, "ratio:1:1", {"message_id": 4}, tiger))
    assert (await submitted_job(app, 3104)).prompt == "тигр"


async def test_a_press_in_a_private_chat_and_a_draw_in_a_group_at_once_start_one_picture(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await answered(app, update_callback(next(_update_ids), 3108, "new"))
    await answered(app, update_message(next(_update_ids), 3108, "кот"))  # the private format question is open
    await answered(app, press(next(_update_ids), 3108, "set:ratio:1:1", 70))  # a group's /draw now starts at once
    fake_tg.stall("answerCallbackQuery")  # the press (queued by its user) waits inside the job's start
    await post_update(app, update_callback(next(_update_ids), 3108, "ratio:1:1"))
    await eventually(lambda: fake_tg.held("answerCallbackQuery"))
    await answered(app, group_message(next(_update_ids), 3108, "/draw тигр"))  # queued by the group: runs meanwhile
    fake_tg.release("answerCallbackQuery")
    await eventually(lambda: app.pipeline.stats.processed >= 5 and not app.role.outbox._chats)
    assert [job.prompt for job in app.generations.jobs.values()] == ["кот"]
    assert fake_tg.texts_to(GROUP) == [bot_text("ru", "busy_user")]


async def test_a_group_that_becomes_a_supergroup_keeps_its_queued_messages_and_jobs(make_app, fake_tg, fake_kie,
                                                                                    tmp_path):
    app = await make_app(**gen_env(fake_kie))
    group, supergroup = {"id": -4001, "type": "group", "title": "Friends"}, -1004001

    def in_old_group(update: dict) -> dict:
        next(value for value in update.values() if isinstance(value, dict)).get("message", {})["chat"] = group
        update.get("callback_query", update).get("message", {})["chat"] = group
        return update

    ask = in_old_group(group_message(next(_update_ids), 3106, "/draw кот"))
    await answered(app, ask)
    question = {"message_id": 1}
    await answered(app, in_old_group(group_press(next(_update_ids), 3106, "ratio:1:1", question, ask)))
    job = await submitted_job(app, 3106)
    moved = {"ok": False, "error_code": 400, "description": "Bad Request: group chat was upgraded to a supergroup chat",
             "parameters": {"migrate_to_chat_id": supergroup}}
    fake_tg.fail("sendMessage", 400, moved)  # Telegram refuses what was queued for the old group, and says where
    await post_update(app, in_old_group(group_message(next(_update_ids), 3106, "/help")))
    await eventually(lambda: fake_tg.texts_to(supergroup) == [bot_text("ru", "help")])
    migrated = in_old_group(group_message(next(_update_ids), 3106, ""))
    del migrated["message"]["text"]
    migrated["message"]["migrate_to_chat_id"] = supergroup
    await answered(app, migrated)
    assert job.chat_id == supergroup
    stored = query(f"sqlite:///{tmp_path / 'bot.sqlite3'}", "SELECT chat_id FROM jobs WHERE id=?", (job.id,))
    assert stored == [(supergroup,)]
    fake_kie.complete(job.task_id)
    await kie_calls_back(app, fake_kie, job.task_id)
    await eventually(lambda: [p for p in fake_tg.calls_of("sendPhoto") if p["chat_id"] == supergroup])


async def test_a_users_dialogs_in_a_private_chat_and_a_group_are_apart(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await answered(app, update_callback(next(_update_ids), 3002, "new"))
    await answered(app, in_group(update_message(next(_update_ids), 3002, "собака")))  # group chatter: not the prompt
    await answered(app, group_message(next(_update_ids), 3002, "/draw"))
    await answered(app, update_message(next(_update_ids), 3002, "/draw кот"))  # /draw works in private chats too
    await answered(app, group_message(next(_update_ids), 3002, "тигр", to_bot=2))
    ask_prompt, group_question = fake_tg.texts_to(GROUP)
    assert says(ask_prompt, "ru", "ask_prompt") and group_question == bot_text("ru", "ask_ratio", prompt="тигр")
    assert fake_tg.texts_to(3002)[1] == bot_text("ru", "ask_ratio", prompt="кот")
    await answered(app, update_callback(next(_update_ids), 3002, "ratio:1:1"))
    job = await submitted_job(app, 3002)
    assert (job.chat_id, job.prompt) == (3002, "кот")


async def test_an_edit_in_another_chat_is_not_the_prompts_even_with_its_message_id(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await answered(app, update_callback(next(_update_ids), 3003, "new"))
    prompt = update_message(next(_update_ids), 3003, "кот")
    await answered(app, prompt)
    await answered(app, in_group(edited(next(_update_ids), 3003, prompt["message"]["message_id"], "тигр")))
    await answered(app, update_callback(next(_update_ids), 3003, "ratio:1:1"))
    assert (await submitted_job(app, 3003)).prompt == "кот" and fake_tg.texts_to(GROUP) == []


async def test_a_pictures_button_pressed_in_another_chat_is_stale(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    photo = await delivered_picture(app, fake_tg, fake_kie, 3004)  # its ⏳ was message 1 of the private chat
    await answered(app, in_group(press(next(_update_ids), 3004, button_data(photo, "again"), 1)))
    assert popups(fake_tg, trt_bot.TEXTS["ru"]["stale_button"]) and edits_of(fake_tg, GROUP) == []
    assert len(fake_kie.created) == 1


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_a_double_tap_on_a_ratio_or_option_starts_one_picture(make_app, fake_tg, fake_kie, lang):
    app = await make_app(**gen_env(fake_kie, SINGLE_MODEL_ONLY="0"))
    await post_update(app, update_callback(1, 93, "model:seedream45", lang))
    await post_update(app, update_message(2, 93, "горы", lang))
    for n, data in enumerate(["ratio:16:9", "ratio:16:9", "opt:basic", "opt:basic"], start=3):
        await post_update(app, press(n, 93, data, 1002, lang))  # the ratio question, sent second
    await eventually(lambda: len(fake_tg.calls_of("answerCallbackQuery")) == 5)
    await eventually(lambda: fake_kie.created)
    stale = trt_bot.TEXTS[lang]["stale_button"]
    assert [p.get("text", "") for p in fake_tg.calls_of("answerCallbackQuery")] == ["", "", stale, "", stale]
    assert len(fake_kie.created) == 1 and len(app.generations.jobs) == 1
    assert [method for method, _ in new_messages_to(fake_tg, 93)] == ["sendMessage", "sendMessage"]
    assert all(p["message_id"] == 1002 for p in edits_of(fake_tg, 93))  # one message evolves


@pytest.mark.parametrize("lang, status", [(lang, bot_text(lang, "status", details="16:9 · Z-Image", elapsed="0:13"))
                                          for lang in ("ru", "en")])
async def test_while_a_picture_is_drawn_the_chat_shows_upload_photo_and_the_elapsed_time(make_app, fake_tg, fake_kie,
                                                                                         lang, status):
    clock = ManualClock(passing_s=PACING_S)
    app = await make_app(**gen_env(fake_kie), clock=clock)

    def actions(user: int) -> list[dict]:
        return [p for p in fake_tg.calls_of("sendChatAction") if p["chat_id"] == user]

    await order(app, 94, lang=lang)
    job = await submitted_job(app, 94)
    clock.advance(1)
    await eventually(lambda: len(actions(94)) == 1)
    assert actions(94)[0]["action"] == "upload_photo" and len(edits_of(fake_tg, 94)) == 1  # only the first status
    clock.advance(5)  # Telegram shows the action ~5 s: it is repeated
    await eventually(lambda: len(actions(94)) == 2)
    clock.advance(7)
    await eventually(lambda: len(edits_of(fake_tg, 94)) == 2)
    assert edits_of(fake_tg, 94)[-1]["text"] == status and buttons_of(edits_of(fake_tg, 94)[-1])[0][1] == "cancel"
    assert len(actions(94)) == 3
    fake_kie.complete(job.task_id)
    await kie_calls_back(app, fake_kie, job.task_id)
    await eventually(lambda: fake_tg.calls_of("sendPhoto"))
    await eventually(lambda: not app.generations.jobs)
    await order(app, 194, lang=lang)  # a barrier: the watch has gone round once the other user's action is out
    await submitted_job(app, 194)
    clock.advance(20)
    await eventually(lambda: actions(194))
    assert len(actions(94)) == 3 and len(edits_of(fake_tg, 94)) == 2  # both stopped when the job ended


def test_every_button_under_a_result_or_a_failure_fits_telegrams_64_bytes_and_names_its_job():
    job_id = "0123456789abcdef"
    keyboards = [trt_bot.result_keyboard(job_id, m.key, lang, True) for m in trt_bot.CATALOG for lang in ("ru", "en")]
    keyboards += [trt_bot.failure_keyboard(job_id, "flux2pro", error, "en") for error in ("moderation", "delivery", "")]
    keyboards.append(trt_bot.keyboard([trt_bot.button(m.title, f"use:{job_id}:{m.key}") for m in trt_bot.CATALOG]))
    data = [b["callback_data"] for markup in keyboards for row in markup["inline_keyboard"] for b in row]
    assert max(len(d.encode()) for d in data) < 64
    assert all(job_id in d or d.startswith("model:") for d in data)
    assert "models" not in str(trt_bot.result_keyboard(job_id, "zimage", "en"))  # one model: no other to offer


async def test_signs_of_life_stop_once_the_picture_is_ready_even_while_it_is_still_being_sent(make_app, fake_tg,
                                                                                              fake_kie):
    clock = ManualClock(passing_s=PACING_S)
    fake_tg.stall("sendPhoto")
    app = await make_app(**gen_env(fake_kie), clock=clock)
    await order(app, 111)
    job = await submitted_job(app, 111)
    fake_kie.complete(job.task_id)
    await kie_calls_back(app, fake_kie, job.task_id)
    await eventually(lambda: fake_tg.held("sendPhoto") == 1)  # the photo is on its way, slowly
    await order(app, 211)  # a barrier: the watch has gone round once the other user's signs of life are out
    await submitted_job(app, 211)
    clock.advance(13)
    await eventually(lambda: [p for p in fake_tg.calls_of("editMessageText") if p["chat_id"] == 211
                              and p["text"].endswith("0:13")])
    assert [p for p in fake_tg.calls_of("sendChatAction") if p["chat_id"] == 111] == []
    assert [p["text"] for p in edits_of(fake_tg, 111)] == [bot_text("ru", "status", details="16:9 · Z-Image",
                                                                     elapsed="0:00")]
    fake_tg.release("sendPhoto")
    await eventually(lambda: job.id not in app.generations.jobs)


def test_a_caption_names_model_and_ratio_and_shortens_the_prompt_to_fit_telegrams_limit():
    model = trt_bot.MODELS_BY_KEY["seedream45"]
    left = trt_bot.left_text((17, 20), "ru")
    caption = trt_bot.result_caption(model, "16:9", "high", "<b>" * 400, "ru", left)
    shown = html.unescape(caption)  # Telegram counts the text as shown, after the entities are parsed
    assert len(shown) <= trt_bot.CAPTION_MAX_CHARS and "<b>" not in caption
    assert shown.startswith(model.details("16:9", "high", "ru") + "\n<b><b>") and "…" in shown
    assert shown.endswith("\n\n" + bot_text("ru", "left_this_hour", left=17, limit=20))
    assert trt_bot.left_text((17, 20), "en") == bot_text("en", "left_this_hour", left=17, limit=20)
    assert trt_bot.left_text(None, "en") == ""


async def delivered_picture(app, fake_tg, fake_kie, user: int, lang: str = "ru", **ordered) -> dict:
    """Order a picture, have Kie finish it, and return the photo the user got."""
    await order(app, user, lang=lang, **ordered)
    job = await submitted_job(app, user)
    fake_kie.complete(job.task_id)
    await kie_calls_back(app, fake_kie, job.task_id)
    await eventually(lambda: not app.generations.jobs)
    return [p for p in fake_tg.calls_of("sendPhoto") if p["chat_id"] == user][-1]


def button_data(params: dict, verb: str) -> str:
    return next(data for _, data in buttons_of(params) if data.startswith(f"{verb}:"))


def returned_message_id(fake_tg, sent: dict) -> int:
    """The message id the fake gave ``sent``: it numbers messages it creates or edits from 1001 on, in order."""
    with fake_tg._cond:
        numbered = [params for method, params in fake_tg.calls
                    if method in ("sendMessage", "sendPhoto", "sendDocument", "editMessageText")]
    return 1001 + next(n for n, params in enumerate(numbered) if params is sent)


@pytest.mark.parametrize("lang, status", [(lang, bot_text(lang, "status", details="16:9 · Z-Image", elapsed="0:00"))
                                          for lang in ("ru", "en")])
async def test_regenerate_under_a_photo_posts_its_own_status_which_gives_way_to_the_result(make_app, fake_tg, fake_kie,
                                                                                          lang, status):
    app = await make_app(**gen_env(fake_kie))
    photo = await delivered_picture(app, fake_tg, fake_kie, 109, lang)
    await post_update(app, press(next(_update_ids), 109, button_data(photo, "again"), 1500, lang))  # on the photo
    (posted,) = await eventually(lambda: [p for p in fake_tg.calls_of("sendMessage") if p["text"] == status])
    assert buttons_of(posted) == [(trt_bot.TEXTS[lang]["btn_cancel"], "cancel")]
    job = await submitted_job(app, 109)
    await eventually(lambda: job.status_message_id == returned_message_id(fake_tg, posted))
    fake_kie.complete(job.task_id)
    await kie_calls_back(app, fake_kie, job.task_id)
    await eventually(lambda: len(fake_tg.calls_of("sendPhoto")) == 2)
    await eventually(lambda: [p for p in fake_tg.calls_of("deleteMessage") if p["message_id"] == job.status_message_id])
    assert not [p for p in fake_tg.calls_of("editMessageText") if p["message_id"] == 1500]  # the photo is left as it is


async def test_a_status_message_held_up_past_the_picture_still_ends_in_the_picture_and_is_removed(make_app, fake_tg,
                                                                                               fake_kie):
    # A long flood wait on the ⏳ message used to cancel the delivery quietly (no photo, the user busy), and the
    # ⏳ message, sent late anyway, stayed in the chat.
    app = await make_app(**gen_env(fake_kie))
    photo = await delivered_picture(app, fake_tg, fake_kie, 112)
    fake_tg.stall("sendMessage")
    await post_update(app, press(next(_update_ids), 112, button_data(photo, "again"), 1500))
    await eventually(lambda: fake_tg.held("sendMessage") == 1)  # the ⏳ message is held up
    job = await submitted_job(app, 112)
    fake_kie.complete(job.task_id)
    await kie_calls_back(app, fake_kie, job.task_id)
    await eventually(lambda: job.state == "sending")
    fake_tg.release("sendMessage")
    await eventually(lambda: len(fake_tg.calls_of("sendPhoto")) == 2)
    (status,) = [p for p in fake_tg.calls_of("sendMessage") if p["text"].startswith("⏳")]
    await eventually(lambda: [p for p in fake_tg.calls_of("deleteMessage")
                              if p["message_id"] == returned_message_id(fake_tg, status)])
    await eventually(lambda: not app.generations.jobs)


async def test_presses_of_original_file_while_it_downloads_join_that_one_download(make_app, fake_tg, fake_kie):
    # Each press used to start a download of its own: 80 presses, 78 downloads at once, RSS 63 MB -> 843 MB.
    app = await make_app(**gen_env(fake_kie, RESULT_DOWNLOAD_ALLOW_PRIVATE="1"))
    photo = await delivered_picture(app, fake_tg, fake_kie, 113)
    fake_kie.images_held = threading.Event()
    handled = app.pipeline.stats.processed
    for _ in range(10):
        await post_update(app, update_callback(next(_update_ids), 113, button_data(photo, "file")))
    await eventually(lambda: app.pipeline.stats.processed == handled + 10)
    fake_kie.images_held.set()
    await eventually(lambda: fake_tg.calls_of("sendDocument"))
    await another_picture_is_delivered(app, fake_tg, fake_kie, 213)
    assert fake_kie.images_asked == 1 and len(fake_tg.calls_of("sendDocument")) == 1


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_another_ratio_draws_the_same_prompt_and_model_in_the_new_ratio(make_app, fake_tg, fake_kie, lang):
    app = await make_app(**gen_env(fake_kie, SINGLE_MODEL_ONLY="0"))
    photo = await delivered_picture(app, fake_tg, fake_kie, 95, lang, model="flux2pro", option="2K")
    assert buttons_of(photo)[-1][1] == "model:flux2pro"  # "new picture" keeps the model last used
    await post_update(app, update_callback(next(_update_ids), 95, button_data(photo, "ratios"), lang))
    await eventually(lambda: len([t for t in fake_tg.texts_to(95) if "кот-космонавт" in t]) == 2)  # same prompt
    await post_update(app, press(next(_update_ids), 95, "ratio:3:2", 1, lang))
    await post_update(app, press(next(_update_ids), 95, "opt:1K", 1, lang))
    await eventually(lambda: len(fake_kie.created) == 2)
    assert fake_kie.created[1]["model"] == "flux-2/pro-text-to-image"
    assert fake_kie.created[1]["input"] == {"prompt": "кот-космонавт", "aspect_ratio": "3:2", "resolution": "1K",
                                            "nsfw_checker": True}


async def test_another_model_draws_the_same_prompt_with_the_chosen_model(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie, SINGLE_MODEL_ONLY="0"))
    photo = await delivered_picture(app, fake_tg, fake_kie, 96, "en")
    models = button_data(photo, "models")
    await post_update(app, update_callback(next(_update_ids), 96, models, "en"))
    offer = await eventually(lambda: [p for p in fake_tg.calls_of("sendMessage") if says(p["text"], "en", "ask_model")])
    choices = buttons_of(offer[0])
    assert len(choices) == len(trt_bot.CATALOG) + 1 and all(len(data.encode()) < 64 for _, data in choices)
    assert ("✅ Z-Image", f"use:{models[7:]}:zimage") in choices and choices[-1] == ("✖️ Cancel", "cancel")
    assert all(f"• {m.described('en')}" in offer[0]["text"] for m in trt_bot.CATALOG)  # a line on each
    await post_update(app, press(next(_update_ids), 96, f"use:{models[7:]}:imagen4fast", 1500, "en"))
    await eventually(lambda: [p for p in edits_of(fake_tg, 96) if p["message_id"] == 1500])  # the offer evolves
    await post_update(app, press(next(_update_ids), 96, "ratio:4:3", 1500, "en"))
    await eventually(lambda: len(fake_kie.created) == 2)
    assert (fake_kie.created[1]["model"], fake_kie.created[1]["input"]) == (
        "google/imagen4-fast", {"prompt": "кот-космонавт", "aspect_ratio": "4:3"})  # no nsfw_checker: not documented


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_change_the_prompt_asks_for_a_new_one_for_the_same_model(make_app, fake_tg, fake_kie, lang):
    app = await make_app(**gen_env(fake_kie, SINGLE_MODEL_ONLY="0"))
    photo = await delivered_picture(app, fake_tg, fake_kie, 97, lang, model="grok")
    await post_update(app, update_callback(next(_update_ids), 97, button_data(photo, "edit"), lang))
    await post_update(app, update_message(next(_update_ids), 97, "кот-водолаз", lang))
    await post_update(app, update_callback(next(_update_ids), 97, "ratio:2:3", lang))
    await eventually(lambda: len(fake_kie.created) == 2)
    assert fake_kie.created[1]["model"] == "grok-imagine/text-to-image"
    assert fake_kie.created[1]["input"]["prompt"] == "кот-водолаз"


async def test_the_original_file_is_sent_as_a_document_with_its_caption_once_per_press(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie, RESULT_DOWNLOAD_ALLOW_PRIVATE="1"))
    photo = await delivered_picture(app, fake_tg, fake_kie, 98)
    await post_update(app, update_callback(next(_update_ids), 98, button_data(photo, "file")))
    (document,) = await eventually(lambda: fake_tg.calls_of("sendDocument"))
    assert document["document"] == PNG_BYTES and document["chat_id"] == "98"
    assert document["caption"] == "16:9 · Z-Image\nкот-космонавт"  # what it is, as under the photo
    await another_picture_is_delivered(app, fake_tg, fake_kie, 198)
    assert len(fake_tg.calls_of("sendDocument")) == 1


async def test_the_original_file_comes_only_from_a_public_address(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))  # the fake's 127.0.0.1 is not public
    photo = await delivered_picture(app, fake_tg, fake_kie, 99, "en")
    await post_update(app, update_callback(next(_update_ids), 99, button_data(photo, "file"), "en"))
    await eventually(lambda: bot_text("en", "original_failed") in fake_tg.texts_to(99))
    assert fake_tg.calls_of("sendDocument") == []


@pytest.mark.parametrize("verb", ["again", "ratios", "models", "edit", "file", "resend"])
async def test_a_button_naming_another_users_picture_is_stale_and_does_nothing(make_app, fake_tg, fake_kie, verb):
    app = await make_app(**gen_env(fake_kie, SINGLE_MODEL_ONLY="0", RESULT_DOWNLOAD_ALLOW_PRIVATE="1"))
    photo = await delivered_picture(app, fake_tg, fake_kie, 100)
    job_id = button_data(photo, "again")[6:]
    fake_tg.clear()
    await post_update(app, update_callback(next(_update_ids), 101, f"{verb}:{job_id}"))  # someone else's job id
    (answer,) = await eventually(lambda: fake_tg.calls_of("answerCallbackQuery"))
    assert answer["text"] == trt_bot.TEXTS["ru"]["stale_button"]
    await another_picture_is_delivered(app, fake_tg, fake_kie, 102)
    assert [method for method, p in fake_tg.calls if p.get("chat_id") == 101] == []
    assert len(fake_kie.created) == 2


async def app_whose_photos_fail(make_app, fake_tg, fake_kie, monkeypatch) -> trt_bot.App:
    """A bot whose every sendPhoto gets 500, with a delivery budget of a second."""
    for _ in range(500):
        fake_tg.fail("sendPhoto", 500, {"ok": False, "error_code": 500, "description": "Internal Server Error"})
    app = await make_app(**gen_env(fake_kie, GEN_TIMEOUT_S="2"))
    app.generations.delivery.budget_s, app.generations.delivery.notice_s = 1.0, 0.5
    return app


@pytest.mark.slow  # seconds of real time under load
@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_after_a_delivery_failure_retry_sends_the_finished_picture_not_a_new_one(make_app, fake_tg, fake_kie,
                                                                                       monkeypatch, lang):
    app = await app_whose_photos_fail(make_app, fake_tg, fake_kie, monkeypatch)
    await order(app, 103, lang=lang)
    job = await submitted_job(app, 103)
    fake_kie.complete(job.task_id)
    await kie_calls_back(app, fake_kie, job.task_id)
    (told,) = await eventually(lambda: [p for p in edits_of(fake_tg, 103) if says(p["text"], lang, "fail_delivery")],
                               timeout=15)
    await eventually(lambda: not app.generations.jobs)
    with fake_tg._cond:
        fake_tg._scripted.clear()  # Telegram works again
    sent_before = len(fake_tg.calls_of("sendPhoto"))
    await post_update(app, update_callback(next(_update_ids), 103, button_data(told, "resend"), lang))
    await eventually(lambda: len(fake_tg.calls_of("sendPhoto")) == sent_before + 1)
    assert fake_tg.calls_of("sendPhoto")[-1]["photo"] == fake_kie.image_url() and len(fake_kie.created) == 1


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_after_a_422_the_prompt_can_be_changed_and_the_new_one_is_drawn(make_app, fake_tg, fake_kie, lang):
    fake_kie.script("createTask", 200, {"code": 422, "msg": "prompt is invalid"})
    app = await make_app(**gen_env(fake_kie))
    await order(app, 104, "ab", lang=lang)
    invalid = trt_bot.TEXTS[lang]["fail_invalid_prompt"]
    (told,) = await eventually(lambda: [p for p in edits_of(fake_tg, 104) if invalid == p["text"]])
    await eventually(lambda: not app.generations.jobs)
    await post_update(app, update_callback(next(_update_ids), 104, button_data(told, "edit"), lang))
    await post_update(app, update_message(next(_update_ids), 104, "a longer prompt", lang))
    await post_update(app, update_callback(next(_update_ids), 104, "ratio:1:1", lang))
    await eventually(lambda: len(fake_kie.created) == 2)
    assert fake_kie.created[1]["input"]["prompt"] == "a longer prompt"


@pytest.mark.parametrize("lang", ["ru", "en"])
@pytest.mark.parametrize("message, failure, buttons", [
    ("aspect_ratio is not supported by this model", "invalid_ratio", ["ratios", "edit", "model"]),
    ("Prompt must be at most 1000 characters", "invalid_prompt", ["again", "edit", "model"]),
    ("validation failed", "invalid", ["again", "edit", "model"])])
async def test_a_422_says_what_to_change_from_the_input_kie_names(make_app, fake_tg, fake_kie, lang, message, failure,
                                                                   buttons):
    fake_kie.script("createTask", 200, {"code": 422, "msg": message})
    app = await make_app(**gen_env(fake_kie))
    await order(app, 4400, lang=lang)
    text = trt_bot.TEXTS[lang][f"fail_{failure}"]
    (told,) = await eventually(lambda: [p for p in edits_of(fake_tg, 4400) if p["text"] == text])
    assert [data.split(":")[0] for _, data in buttons_of(told)] == buttons


@pytest.mark.parametrize("lang", ["ru", "en"])
async def test_kies_408_has_its_own_message(make_app, fake_tg, fake_kie, fast_jobs, lang):
    app = await make_app(**gen_env(fake_kie))
    await order(app, 105, lang=lang)
    job = await submitted_job(app, 105)
    fake_kie.fail_task(job.task_id, "408", "no result for over 10 minutes")
    await kie_calls_back(app, fake_kie, job.task_id)
    await eventually(lambda: [p for p in edits_of(fake_tg, 105) if says(p["text"], lang, "fail_stalled")])
    assert trt_bot.failure_for_record(trt_bot.TaskRecord("t", "fail", (), "", "408")) == "stalled"


KIE_INPUTS = [  # each input named as the model's Kie page names it
    ("zimage", {"prompt": "p", "aspect_ratio": "4:3", "nsfw_checker": True}),
    ("nanobanana", {"prompt": "p", "image_size": "4:3", "output_format": "png"}),  # its ratio is "image_size"
    ("seedream45", {"prompt": "p", "aspect_ratio": "4:3", "quality": "o", "nsfw_checker": True}),
    ("flux2pro", {"prompt": "p", "aspect_ratio": "4:3", "resolution": "o", "nsfw_checker": True}),
    ("grok", {"prompt": "p", "aspect_ratio": "4:3", "nsfw_checker": True}),
    ("imagen4fast", {"prompt": "p", "aspect_ratio": "4:3"}),
]


@pytest.mark.parametrize("key, expected", KIE_INPUTS)
def test_each_catalog_row_fills_the_inputs_its_kie_page_names(key, expected):
    request = trt_bot.MODELS_BY_KEY[key].request("p", "4:3", "o", True)
    assert json.dumps(request) == json.dumps(expected)  # the same fields in the same order


def test_every_catalog_row_has_its_inputs_checked_and_sends_the_prompt():
    assert [key for key, _ in KIE_INPUTS] == [model.key for model in trt_bot.CATALOG]
    assert all(("prompt", "prompt") in model.inputs for model in trt_bot.CATALOG)


def test_an_edit_model_is_a_row_naming_where_the_pictures_go():
    edit = trt_bot.ImageModel("nbedit", "google/nano-banana-edit", "Nano Banana Edit", ("1:1",),
                              inputs=(("prompt", "prompt"), ("image_urls", "image_urls"), ("image_size", "ratio")))
    assert edit.request("p", "1:1", image_urls=("https://a/1", "https://a/2")) == {
        "prompt": "p", "image_urls": ["https://a/1", "https://a/2"], "image_size": "1:1"}
    single = dataclasses.replace(edit, inputs=(("prompt", "prompt"), ("image_url", "image_url")))
    assert single.request("p", "1:1", image_urls=("https://a/1", "https://a/2")) == {
        "prompt": "p", "image_url": "https://a/1"}


async def test_kies_content_filter_is_on_by_default_and_a_setting_turns_it_off(make_app, fake_tg, fake_kie):
    documented = {model.key for model in trt_bot.CATALOG if "nsfw_checker" in dict(model.inputs)}
    assert documented == {"zimage", "seedream45", "flux2pro", "grok"}  # as Kie's model pages list the parameter
    assert trt_bot.load_config(bot_env(fake_tg, "x.sqlite3")).kie_nsfw_checker is True
    with pytest.raises(trt_bot.ConfigError):
        trt_bot.load_config(bot_env(fake_tg, "x.sqlite3", KIE_NSFW_CHECKER="maybe"))
    app = await make_app(**gen_env(fake_kie, KIE_NSFW_CHECKER="0"))
    await order(app, 106)
    await eventually(lambda: fake_kie.created)
    assert fake_kie.created[0]["input"]["nsfw_checker"] is False


async def test_start_shows_what_is_left_this_hour(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie))
    await delivered_picture(app, fake_tg, fake_kie, 107, "en")
    await post_update(app, update_message(next(_update_ids), 107, "/start", "en"))
    left = "\n\n" + bot_text("en", "left_this_hour", left=19, limit=20)
    await eventually(lambda: [t for t in fake_tg.texts_to(107) if says(t, "en", "start") and t.endswith(left)])


async def test_start_shows_what_is_left_when_the_database_is_down(make_app, fake_tg, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    app = await make_app(DATABASE_URL=f"sqlite:///{blocker}/bot.sqlite3")
    await post_update(app, update_message(1, 108, "/start"))
    (start,) = await eventually(lambda: fake_tg.texts_to(108))
    assert start == bot_text("ru", "start") + "\n\n" + bot_text("ru", "left_this_hour", left=20, limit=20)


def test_a_refusal_is_told_in_the_users_words():
    for key, values in (("busy_user", {}), ("hourly_limit", {"limit": 20, "minutes": 5}), ("daily_limit", {"limit": 9})):
        assert all(trt_bot.render(lang, key, **values) for lang in trt_bot.TEXTS)


###############################################################################
# 12. Generation jobs: the state machine (pure, no I/O)
###############################################################################

NOW = 1_700_000_100.0
SAMPLE_EVENTS = {
    "accepted": trt_bot.JobEvent("accepted", "task00042"),
    "refused": trt_bot.JobEvent("refused", trt_bot.KieError(422, "prompt is invalid")),
    "succeeded": trt_bot.JobEvent("succeeded", "https://cdn.example/x.png"),
    "failed": trt_bot.JobEvent("failed", "moderation"),
    "callback": trt_bot.CALLBACK_CAME,
    "expired": trt_bot.EXPIRED,
    "sending": trt_bot.SEND_STARTED,
    "maybe_sent": trt_bot.MAYBE_SENT,
    "delivered": trt_bot.DELIVERED,
    "undeliverable": trt_bot.UNDELIVERABLE,
    "cancel": trt_bot.CANCEL,
}


def job_in(state: str) -> trt_bot.Job:
    return trt_bot.Job("0123456789abcdef", 7, 7, "ru", "zimage", "кот", "1:1", state=state,
                       task_id="task00041" if state != "created" else "", created_at=NOW - 12.0,
                       updated_at=NOW - 1.0)


def test_every_event_has_a_sample_and_every_state_a_row():
    assert set(SAMPLE_EVENTS) == {event.name for event in SAMPLE_EVENTS.values()}
    assert all(set(moves) <= set(SAMPLE_EVENTS) for moves in trt_bot.JOB_TRANSITIONS.values())
    assert all(target in (trt_bot.IGNORED, *trt_bot.JOB_TRANSITIONS) for moves in trt_bot.JOB_TRANSITIONS.values()
               for target in moves.values())
    assert {name for state, moves in trt_bot.JOB_TRANSITIONS.items() for name, target in moves.items()
            if target == state} == set(trt_bot.KEEPING_STATE_EFFECTS)


@pytest.mark.parametrize("state, name", [(state, name) for state, moves in trt_bot.JOB_TRANSITIONS.items()
                                         for name, target in moves.items() if target not in (trt_bot.IGNORED, state)])
def test_every_legal_event_moves_the_job_to_the_state_the_table_names(state, name):
    job = job_in(state)
    before = dataclasses.replace(job)
    changes, effects = trt_bot.apply_event(job, SAMPLE_EVENTS[name], NOW)
    assert job == before  # apply_event only says what changes
    assert changes["state"] == trt_bot.JOB_TRANSITIONS[state][name] and changes["updated_at"] == NOW
    assert (trt_bot.RELEASE_SLOT in effects) is (state == "submitted")
    assert (trt_bot.SAVE in effects) is (name != "sending")  # "sending" is written durably by the deliverer
    assert (trt_bot.DELIVER in effects) is (changes["state"] in trt_bot.OUTCOMES and changes["state"] != "cancelled")


@pytest.mark.parametrize("state, name", [(state, name) for state, moves in trt_bot.JOB_TRANSITIONS.items()
                                         for name in SAMPLE_EVENTS if name not in moves])
def test_an_event_the_table_does_not_list_raises(state, name):
    with pytest.raises(trt_bot.IllegalTransition):
        trt_bot.apply_event(job_in(state), SAMPLE_EVENTS[name], NOW)


@pytest.mark.parametrize("state, name", [(state, name) for state, moves in trt_bot.JOB_TRANSITIONS.items()
                                         for name, target in moves.items() if target == trt_bot.IGNORED])
def test_an_ignorable_event_changes_nothing_and_does_nothing(state, name):
    assert trt_bot.apply_event(job_in(state), SAMPLE_EVENTS[name], NOW) == ({}, [])


def test_a_poll_result_or_a_duplicate_callback_for_a_finished_job_is_ignored():
    for state in ("succeeded", "failed", "timed_out", "sending", "unsure", "delivered"):
        for event in (trt_bot.JobEvent("succeeded", "https://cdn.example/y.png"),
                      trt_bot.JobEvent("failed", "failed"), trt_bot.CALLBACK_CAME):
            assert trt_bot.apply_event(job_in(state), event, NOW) == ({}, [])


def test_a_photo_is_never_sent_for_a_failed_job_nor_a_job_delivered_twice():
    with pytest.raises(trt_bot.IllegalTransition):
        trt_bot.apply_event(job_in("failed"), trt_bot.SEND_STARTED, NOW)
    with pytest.raises(trt_bot.IllegalTransition):
        trt_bot.apply_event(job_in("delivered"), trt_bot.DELIVERED, NOW)


def test_a_callback_for_a_submitted_job_asks_kie_now_and_changes_nothing():
    assert trt_bot.apply_event(job_in("submitted"), trt_bot.CALLBACK_CAME, NOW) == ({}, [trt_bot.POLL_NOW])


def test_a_picture_that_cannot_reach_the_user_changes_what_they_are_told_not_the_state():
    for state in ("succeeded", "sending"):
        assert trt_bot.apply_event(job_in(state), trt_bot.UNDELIVERABLE, NOW) == ({"error": "delivery"}, [])
    assert trt_bot.apply_event(job_in("timed_out"), trt_bot.UNDELIVERABLE, NOW) == ({}, [])  # keeps its reason


def test_an_accepted_task_is_saved_and_watched():
    changes, effects = trt_bot.apply_event(job_in("created"), trt_bot.JobEvent("accepted", "task00042"), NOW)
    assert changes == {"task_id": "task00042", "state": "submitted", "updated_at": NOW}
    assert effects == [trt_bot.SAVE, trt_bot.WATCH_TASK]


def test_a_result_frees_the_slot_counts_the_outcome_and_is_delivered():
    succeeded = trt_bot.JobEvent("succeeded", "https://cdn.example/x.png")
    changes, effects = trt_bot.apply_event(job_in("submitted"), succeeded, NOW)
    assert changes == {"result_url": "https://cdn.example/x.png", "state": "succeeded", "updated_at": NOW,
                       "outcome": "success"}
    assert effects == [trt_bot.RELEASE_SLOT, trt_bot.SAVE, trt_bot.FINISH, trt_bot.DELIVER]
    assert changes["updated_at"] - job_in("submitted").created_at == 12.0  # how long it took, as FINISH observes


def test_a_job_that_expires_before_kie_has_it_holds_no_slot():
    changes, effects = trt_bot.apply_event(job_in("created"), trt_bot.EXPIRED, NOW)
    assert (changes["state"], changes["error"], changes["outcome"]) == ("timed_out", "timeout", "timed_out")
    assert trt_bot.RELEASE_SLOT not in effects and trt_bot.DELIVER in effects


@pytest.mark.parametrize("code, failure, alert", [(402, "unavailable", True), (401, "unavailable", True),
                                                  (429, "busy", False), (422, "invalid", False),
                                                  (None, "failed", False)])
def test_a_refused_task_tells_the_user_from_the_codes_table_and_alerts_admins_on_incidents(code, failure, alert):
    refused = trt_bot.JobEvent("refused", trt_bot.KieError(code, "") if code else None)
    changes, effects = trt_bot.apply_event(job_in("created"), refused, NOW)
    assert (changes["state"], changes["error"]) == ("failed", failure)
    assert (trt_bot.ALERT in effects) is alert


def test_a_cancelled_job_frees_its_slot_is_counted_once_and_forgotten_never_delivered():
    changes, effects = trt_bot.apply_event(job_in("submitted"), trt_bot.CANCEL, NOW)
    assert (changes["state"], changes["outcome"]) == ("cancelled", "cancelled")
    assert effects == [trt_bot.RELEASE_SLOT, trt_bot.SAVE, trt_bot.FINISH, trt_bot.FORGET]
    known = dataclasses.replace(job_in("succeeded"), outcome="success")  # its outcome was counted already
    assert trt_bot.apply_event(known, trt_bot.CANCEL, NOW)[1] == [trt_bot.SAVE, trt_bot.FORGET]


def test_a_photo_on_its_way_cannot_be_cancelled_and_news_after_a_cancel_changes_nothing():
    for state in ("sending", "unsure", "delivered"):
        assert trt_bot.apply_event(job_in(state), trt_bot.CANCEL, NOW) == ({}, [])
    for event in SAMPLE_EVENTS.values():
        if event.name in trt_bot.JOB_TRANSITIONS["cancelled"]:
            assert trt_bot.apply_event(job_in("cancelled"), event, NOW) == ({}, [])


def test_a_delivered_job_is_saved_and_forgotten():
    assert trt_bot.apply_event(job_in("unsure"), trt_bot.DELIVERED, NOW) == (
        {"state": "delivered", "updated_at": NOW}, [trt_bot.SAVE, trt_bot.FORGET])


def test_a_user_is_refused_while_busy_and_past_the_hourly_limit_until_the_hour_turns(fake_tg):
    clock = ManualClock()
    fairness = generations_of(fake_tg, clock, GEN_HOURLY_LIMIT="2", ADMIN_IDS="900")
    fairness.starting.add(7)
    assert fairness.refusal(7) == ("busy_user", {})
    fairness.starting.discard(7)
    for user in (7, 7, 900, 900):
        fairness.note_delivered(user, clock.time())
    clock.advance(60)
    assert fairness.refusal(7) == ("hourly_limit", {"limit": 2, "minutes": 60})
    assert fairness.refusal(900) is None  # admins have no hourly limit
    clock.advance(3540)
    assert fairness.refusal(7) is None
    fairness.forget_idle_users(clock.time())
    assert fairness.refusal(7) is None


@pytest.mark.parametrize("message, failure", [
    ("Content flagged by moderation", "moderation"), ("NSFW content detected", "moderation"),
    ("Your prompt VIOLATES our usage policy", "moderation"), ("internal error", "failed"), ("", "failed")])
def test_a_failed_task_is_explained_as_moderation_only_when_its_message_says_so(message, failure):
    assert trt_bot.failure_for_record(trt_bot.TaskRecord("t", "fail", fail_message=message)) == failure


###############################################################################
# 12. Generation jobs: durability and load
###############################################################################

@pytest.mark.slow  # seconds of real time under load
async def test_start_is_answered_with_200_generations_in_flight(make_app, fake_tg, fake_kie):
    app = await make_app(**gen_env(fake_kie), TELEGRAM_SEND_RATE="1000")  # 800 messages: paid-broadcast speed
    async with httpx.AsyncClient():
        await asyncio.gather(*(order(app, 10_000 + user) for user in range(200)))
    await eventually(lambda: len(app.generations.jobs) == 200, timeout=30)
    await post_update(app, update_message(next(_update_ids), 99, "/start"))
    await eventually(lambda: fake_tg.texts_to(99), timeout=5)
    assert says(fake_tg.texts_to(99)[0], "ru", "start")


def job_states(database: str) -> list[str]:
    """The states of the stored jobs; ``database`` is a DATABASE_URL or a SQLite file's path."""
    return [state for (state,) in query(database if "://" in database else f"sqlite:///{database}",
                                        "SELECT state FROM jobs")]


async def test_a_job_survives_sigkill_and_its_photo_is_delivered_once_after_restart(fake_tg, fake_kie, tmp_path,
                                                                                     bot_processes, database_url):
    database = database_url
    env = {**bot_env(fake_tg, str(tmp_path / "bot.sqlite3"), PORT=str(free_port()), DATABASE_URL=database_url),
           **gen_env(fake_kie)}
    first = bot_processes(env)
    await first.wait_healthy()
    config = trt_bot.load_config(env)
    url = first.base_url + config.webhook_path
    headers = {"X-Telegram-Bot-Api-Secret-Token": config.webhook_secret}
    async with httpx.AsyncClient() as client:
        for update in (update_callback(1, 80, "new"), update_message(2, 80, "маяк"),
                       update_callback(3, 80, "ratio:9:16")):
            assert (await client.post(url, json=update, headers=headers)).status_code == 200
    await eventually(lambda: job_states(database) == ["submitted"], timeout=15)
    first.kill()
    fake_kie.complete("task00001")
    second = bot_processes({**env, "PORT": str(free_port())})
    await second.wait_healthy()
    await eventually(lambda: fake_tg.calls_of("sendPhoto"), timeout=15)
    await eventually(lambda: job_states(database) == ["delivered"])
    assert second.terminate() == 0  # a graceful stop finishes all it started: nothing can come after
    assert len(fake_tg.calls_of("sendPhoto")) == 1 and len(fake_kie.created) == 1
    assert "[JOB] resumed 1 unfinished jobs" in second.log
    assert TOKEN not in second.log and KIE_KEY not in second.log


async def test_jobs_stored_in_a_database_that_was_locked_at_start_resume_when_it_recovers(
        make_app, fake_tg, fake_kie, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_bot, "DB_RETRY_S", 0.1)
    path = str(tmp_path / "bot.sqlite3")
    conn = trt_bot.SqliteFile(path).connect(None)
    job = trt_bot.Job("00112233aabbccdd", 81, 81, "ru", "zimage", "маяк", "1:1", state="succeeded",
                      result_url=fake_kie.image_url(), created_at=time.time(), updated_at=time.time())
    conn.execute("BEGIN")
    trt_bot.jobs_save(conn, [tuple(vars(job).values())])
    conn.execute("COMMIT")
    conn.execute("BEGIN EXCLUSIVE")  # another process holds the file: the bot starts degraded
    app = await make_app(**gen_env(fake_kie))
    assert app.db.ok is False and app.role.may_act()
    await post_update(app, update_message(1, 82, "/start"))
    await eventually(lambda: fake_tg.texts_to(82))  # /start works meanwhile
    assert fake_tg.calls_of("sendPhoto") == []
    conn.execute("ROLLBACK")
    conn.close()
    await eventually(lambda: fake_tg.calls_of("sendPhoto"), timeout=10)
    assert fake_tg.calls_of("sendPhoto")[0]["chat_id"] == 81


async def test_a_prompt_holding_u0000_is_explained_and_never_reaches_kie(make_app, fake_tg, fake_kie, database_url):
    # Used to reach Kie on SQLite, and on PostgreSQL to leave the job in "created" (its row refused) until
    # GEN_TIMEOUT_S, the user told "busy" meanwhile.
    app = await make_app(**gen_env(fake_kie), DATABASE_URL=database_url)
    await answered(app, update_callback(next(_update_ids), 73, "new"))
    await answered(app, update_message(next(_update_ids), 73, "кот\0космонавт"))
    assert fake_tg.texts_to(73)[-1] == trt_bot.TEXTS["ru"]["prompt_nul"]
    await another_picture_is_delivered(app, fake_tg, fake_kie, 74)
    assert [task["input"]["prompt"] for task in fake_kie.created] == ["кот-космонавт"]


def refused_job_told(fake_tg, user: int) -> bool:
    return trt_bot.TEXTS["ru"]["fail_failed"] in "\n".join(sent_texts(fake_tg, user))


async def test_a_job_whose_row_the_database_refuses_fails_alone_and_its_user_is_told(make_app, fake_tg, fake_kie,
                                                                                   database_url):
    app = await make_app(**gen_env(fake_kie), DATABASE_URL=database_url)
    refuse_rows(database_url, "jobs", "prompt", "refuse-me")
    await order(app, 75, "refuse-me")
    await eventually(lambda: refused_job_told(fake_tg, 75) and not app.generations.jobs)
    assert app.generations.refusal(75) is None and app.db.ok  # terminal at once: the user is not "busy"
    await another_picture_is_delivered(app, fake_tg, fake_kie, 76)
    assert [task["input"]["prompt"] for task in fake_kie.created] == ["кот-космонавт"]


async def test_a_kept_job_row_refused_at_recovery_fails_alone_and_later_outages_still_recover(
        make_app, fake_tg, fake_kie, database_url, monkeypatch):
    # The refused row stayed kept for ever and made every recovery raise: the database watcher died at the
    # first one and the bot stayed memory-only through every later outage.
    monkeypatch.setattr(trt_bot, "DB_RETRY_S", 0.05)
    app = await make_app(**gen_env(fake_kie), DATABASE_URL=database_url)
    refuse_rows(database_url, "jobs", "prompt", "refuse-me")
    reopen, down = app.db.dialect.connect, []

    def connect(previous):  # no reopen succeeds while the test holds the database down
        if down:
            raise OSError("down for the test")
        return reopen(previous)

    monkeypatch.setattr(app.db.dialect, "connect", connect)
    for user, prompt in [(77, "refuse-me"), (78, "маяк"), (79, "чайка")]:
        down.append(True)
        with pytest.raises(trt_bot.DatabaseUnavailable):  # a statement it cannot run: unusable until reopened
            await app.db.write(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)"))
        await order(app, user, prompt)  # its job's row is kept in memory
        await submitted_job(app, user)
        down.clear()
        await eventually(lambda: app.db.ok, timeout=10)
    await eventually(lambda: refused_job_told(fake_tg, 77))
    await eventually(lambda: sorted(row[0] for row in query(database_url, "SELECT prompt FROM jobs"))
                     == ["маяк", "чайка"])


async def test_recovery_never_raises_for_a_kept_row_the_database_refuses(database_url):
    # Activation resumes the jobs as the database watcher does (Generations.resume -> load_unfinished): a
    # RowRejected there would end the lease's renewal with the instance still active.  Recovery never raises
    # for one row: it is written alone, refused alone, and its job handed to on_refused.
    db = trt_bot.Database(trt_bot.parse_database_url(database_url))
    assert await db.open()
    refuse_rows(database_url, "jobs", "prompt", "refuse-me")
    refused: list[trt_bot.Job] = []
    book = trt_bot.JobBook(db, on_refused=refused.append)
    jobs = [trt_bot.Job(f"{n:016x}", n, n, "ru", "zimage", prompt, "1:1")
            for n, prompt in enumerate(["refuse-me", "маяк"])]
    with pytest.raises(trt_bot.DatabaseUnavailable):  # a statement it cannot run: unusable until reopened
        await db.write(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)"))
    for job in jobs:
        book.track(job)
        assert not await book.save_durably(job)  # kept for when the database is back
    assert await db.open()
    assert await book.load_unfinished() == [] and await book.load_unfinished() == []  # in memory already
    assert refused == jobs[:1] and book.stored(jobs[1]) and not book.stored(jobs[0])
    assert query(database_url, "SELECT prompt FROM jobs") == [("маяк",)]
    await db.close()


# -- result downloads: public addresses only ---------------------------------------

@pytest.mark.parametrize("address, public", [
    ("93.184.216.34", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("239.255.255.250", False), ("240.0.0.1", False), ("255.255.255.255", False), ("198.18.0.1", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fc00::1", False), ("ff0e::1", False), ("2001:db8::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::127.0.0.1", False),
    ("2002:7f00:1::", False), ("2002:a9fe:a9fe::", False),  # 6to4 around 127.0.0.1 and 169.254.169.254
    ("64:ff9b::7f00:1", False), ("64:ff9b:1::a00:1", False),  # NAT64 to 127.0.0.1 and 10.0.0.1
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo
])
def test_addresses_are_public_only_when_global_and_nothing_internal_is_embedded(address, public):
    assert trt_bot.address_is_public(ipaddress.ip_address(address)) is public


def test_a_name_that_resolves_to_any_internal_address_is_refused():
    assert str(trt_bot.choose_download_address(["93.184.216.34", "2606:4700::1111"], False)) == "93.184.216.34"
    for addresses in (["93.184.216.34", "10.0.0.1"], ["127.0.0.1"], [], ["not-an-address"]):
        with pytest.raises(trt_bot.DownloadError):
            trt_bot.choose_download_address(addresses, False)
    assert str(trt_bot.choose_download_address(["127.0.0.1"], True)) == "127.0.0.1"  # RESULT_DOWNLOAD_ALLOW_PRIVATE


def test_the_download_url_names_the_checked_address():
    parts = urllib.parse.urlsplit("https://cdn.example:8443/a/b%20c.png?sig=1")
    assert trt_bot.pinned_url(parts, ipaddress.ip_address("2606:4700::1111")) == \
        "https://[2606:4700::1111]:8443/a/b%20c.png?sig=1"
    assert trt_bot.pinned_url(urllib.parse.urlsplit("http://cdn.example"), ipaddress.ip_address("93.184.216.34")) == \
        "http://93.184.216.34/"


@respx.mock
async def test_a_download_connects_to_the_address_it_checked_and_follows_no_redirect():
    answers = [["93.184.216.34"], ["127.0.0.1"]]  # a rebinding DNS: public when checked, internal afterwards
    asked = []

    async def rebinding_resolver(host, port):
        asked.append((host, port))
        return answers[len(asked) - 1]

    route = respx.get("https://93.184.216.34/x.png").mock(return_value=httpx.Response(200, content=PNG_BYTES))
    async with httpx.AsyncClient() as http:
        image = await trt_bot.download_bounded(http, "https://cdn.example/x.png", 1000, resolve=rebinding_resolver)
    assert image == PNG_BYTES and asked == [("cdn.example", 443)]
    request = route.calls.last.request
    assert request.headers["host"] == "cdn.example" and request.extensions["sni_hostname"] == "cdn.example"

    answers[1] = ["93.184.216.34"]
    respx.get("http://93.184.216.34/moved.png").mock(
        return_value=httpx.Response(302, headers={"Location": "http://127.0.0.1/secret"}))
    internal = respx.get("http://127.0.0.1/secret").mock(return_value=httpx.Response(200, content=b"secret"))
    async with httpx.AsyncClient(follow_redirects=True) as http:
        with pytest.raises(trt_bot.DownloadError, match="302"):
            await trt_bot.download_bounded(http, "http://cdn.example/moved.png", 1000, resolve=rebinding_resolver)
    assert not internal.called


async def test_a_malformed_unresolvable_or_internal_result_url_is_a_download_error():
    async def no_such_host(host, port):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async with httpx.AsyncClient() as http:
        for url in ("http://[::1/x.png", "http://127.0.0.1:9/x.png", "http://[::ffff:127.0.0.1]:9/x.png"):
            with pytest.raises(trt_bot.DownloadError):  # not httpx.InvalidURL
                await trt_bot.download_bounded(http, url, 1000)
        with pytest.raises(trt_bot.DownloadError, match="cannot resolve"):  # not socket.gaierror
            await trt_bot.download_bounded(http, "http://cdn.example/x.png", 1000, resolve=no_such_host)


async def test_a_result_that_trickles_is_cut_off_at_the_download_deadline():
    stop = asyncio.Event()

    async def trickle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        while not stop.is_set():
            writer.write(b"x")
            await writer.drain()
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except TimeoutError:
                pass
        writer.close()

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/slow.png"
    try:
        async with httpx.AsyncClient() as http:
            with pytest.raises(trt_bot.DownloadError, match="within 0.5s"):
                await trt_bot.download_bounded(http, url, 10_000, deadline_s=0.5, allow_private=True)
    finally:
        stop.set()
        server.close()


def test_private_result_downloads_are_off_unless_asked_for_and_the_setting_is_validated(fake_tg):
    env = bot_env(fake_tg, ":memory:")
    assert trt_bot.load_config(env).result_download_allow_private is False
    assert trt_bot.load_config({**env, "RESULT_DOWNLOAD_ALLOW_PRIVATE": "yes"}).result_download_allow_private is True
    with pytest.raises(trt_bot.ConfigError, match="RESULT_DOWNLOAD_ALLOW_PRIVATE"):
        trt_bot.load_config({**env, "RESULT_DOWNLOAD_ALLOW_PRIVATE": "maybe"})


async def test_a_result_on_an_internal_address_is_never_downloaded_for_upload(make_app, fake_tg, fake_kie):
    # It used to be: Telegram refuses the URL, the bot fetches it from 127.0.0.1 and uploads it to the chat.
    fetched = []
    answer = fake_kie.answer
    fake_kie.answer = lambda method, path, *rest: (fetched.append(path), answer(method, path, *rest))[1]
    fake_tg.fail("sendPhoto", 400, {"ok": False, "error_code": 400,
                                    "description": "Bad Request: wrong file identifier/HTTP URL specified"})
    app = await make_app(**gen_env(fake_kie))
    await order(app, 86)
    await eventually(lambda: fake_kie.tasks)
    fake_kie.complete("task00001", fake_kie.image_url("internal-secret.png"))
    await kie_calls_back(app, fake_kie, "task00001")
    await eventually(lambda: [p for p in fake_tg.calls_of("editMessageText") if says(p["text"], "ru", "fail_delivery")])
    assert not [path for path in fetched if path.startswith("/images/")]
    assert len(fake_tg.calls_of("sendPhoto")) == 1 and fake_tg.calls_of("sendDocument") == []
    await eventually(lambda: not app.generations.jobs)


# -- every job ends, whatever Kie, the result host or Telegram do --------------------

@pytest.fixture
async def unretrieved_task_errors():
    """What asyncio reports about tasks whose exception nobody retrieved (checked after a gc)."""
    loop = asyncio.get_running_loop()
    reports: list[str] = []
    loop.set_exception_handler(lambda loop, context: reports.append(context.get("message", "")))
    yield reports
    loop.set_exception_handler(None)


def never_retrieved(reports: list[str]) -> list[str]:
    gc.collect()
    return [message for message in reports if "never retrieved" in message]


async def test_a_hostile_result_url_ends_the_job_with_an_explanation(make_app, fake_tg, fake_kie,
                                                                    unretrieved_task_errors):
    # http://[::1/x.png used to raise httpx.InvalidURL out of delivery: the job stayed "succeeded",
    # the ⏳ message was never edited, the user stayed busy, and restarts replayed it.
    fake_tg.fail("sendPhoto", 400, {"ok": False, "error_code": 400, "description": "Bad Request: wrong HTTP URL"})
    app = await make_app(**gen_env(fake_kie))
    await order(app, 87)
    await eventually(lambda: fake_kie.tasks)
    fake_kie.complete("task00001", "http://[::1/x.png")
    await kie_calls_back(app, fake_kie, "task00001")
    await eventually(lambda: [p for p in fake_tg.calls_of("editMessageText") if says(p["text"], "ru", "fail_failed")])
    await eventually(lambda: not app.generations.jobs)
    assert app.generations.refusal(87) is None
    assert never_retrieved(unretrieved_task_errors) == []


async def test_an_unexpected_delivery_error_still_tells_the_user_and_is_logged(make_app, fake_tg, fake_kie, monkeypatch,
                                                                               caplog, unretrieved_task_errors):
    def broken(url):
        raise RuntimeError("a bug in delivery")

    monkeypatch.setattr(trt_bot, "image_file_name", broken)
    fake_tg.fail("sendPhoto", 400, {"ok": False, "error_code": 400, "description": "Bad Request: wrong HTTP URL"})
    app = await make_app(**gen_env(fake_kie, RESULT_DOWNLOAD_ALLOW_PRIVATE="1"))
    await order(app, 88)
    await eventually(lambda: fake_kie.tasks)
    fake_kie.complete("task00001")
    await kie_calls_back(app, fake_kie, "task00001")
    await eventually(lambda: [p for p in fake_tg.calls_of("editMessageText") if says(p["text"], "ru", "fail_delivery")])
    await eventually(lambda: not app.generations.jobs)
    (failure,) = [r for r in caplog.records if "delivery failed unexpectedly" in r.getMessage()]
    assert failure.exc_info and "a bug in delivery" in str(failure.exc_info[1])
    assert never_retrieved(unretrieved_task_errors) == []


@pytest.mark.slow  # seconds of real time under load
async def test_an_exception_in_a_job_task_is_logged_not_left_unretrieved(make_app, fake_tg, fake_kie, monkeypatch,
                                                                         caplog, unretrieved_task_errors, fast_jobs):
    app = await make_app(**gen_env(fake_kie, GEN_TIMEOUT_S="1"))

    async def broken_record_info(task_id, budget_s=None):
        raise RuntimeError("a bug in polling")

    monkeypatch.setattr(app.kie, "record_info", broken_record_info)
    await order(app, 89)
    await eventually(lambda: any("a bug in polling" in str(r.exc_info and r.exc_info[1]) for r in caplog.records))
    # Still ends: timed out and told.
    await eventually(lambda: [p for p in fake_tg.calls_of("editMessageText") if says(p["text"], "ru", "fail_timeout")])
    assert never_retrieved(unretrieved_task_errors) == []


async def test_a_job_loop_that_dies_is_logged_at_once(make_app, fake_kie, monkeypatch, caplog):
    def broken(self, jobs, now):
        raise RuntimeError("a bug in the deadline watch")

    monkeypatch.setattr(trt_bot.RunningJobs, "tick", broken)
    await make_app(**gen_env(fake_kie))
    await eventually(lambda: [r for r in caplog.records if r.getMessage() == "[JOB] job-deadlines failed"])


@pytest.mark.slow  # seconds of real time under load
async def test_a_delivery_telegram_keeps_failing_ends_within_the_budget(make_app, fake_tg, fake_kie, monkeypatch,
                                                                       tmp_path):
    # "succeeded" used to have no timeout: sendPhoto was retried every 30 s forever.
    app = await app_whose_photos_fail(make_app, fake_tg, fake_kie, monkeypatch)
    await order(app, 90)
    await eventually(lambda: fake_kie.tasks)
    fake_kie.complete("task00001")
    await kie_calls_back(app, fake_kie, "task00001")
    await eventually(lambda: not app.generations.jobs, timeout=15)
    assert len(fake_tg.calls_of("sendPhoto")) > 1  # it did retry, within the budget
    (told,) = [p for p in fake_tg.calls_of("editMessageText") if says(p["text"], "ru", "fail_delivery")]
    assert [data.split(":")[0] for _, data in buttons_of(told)] == ["resend", "model"]  # the ready picture again
    await eventually(lambda: job_states(str(tmp_path / "bot.sqlite3")) == ["delivered"])


def store_job(database: str, job: trt_bot.Job) -> None:
    """Write a job row as an earlier process would have left it."""
    conn = trt_bot.SqliteFile(database).connect(None)
    conn.execute("BEGIN")
    trt_bot.jobs_save(conn, [dataclasses.astuple(job)])
    conn.execute("COMMIT")
    conn.close()


async def test_a_job_past_its_delivery_budget_at_restart_is_told_and_finished_not_replayed(
        make_app, fake_tg, fake_kie, tmp_path):
    long_ago = time.time() - 86400
    store_job(str(tmp_path / "bot.sqlite3"), trt_bot.Job(
        "00112233aabbcc01", 91, 91, "ru", "zimage", "маяк", "1:1", state="succeeded", outcome="success",
        result_url=fake_kie.image_url(), created_at=long_ago, updated_at=long_ago))
    app = await make_app(**gen_env(fake_kie))
    await eventually(lambda: fake_tg.texts_to(91))
    assert says(fake_tg.texts_to(91)[0], "ru", "fail_delivery") and fake_tg.calls_of("sendPhoto") == []
    await eventually(lambda: job_states(str(tmp_path / "bot.sqlite3")) == ["delivered"])
    assert not app.generations.jobs


async def test_a_failure_already_shown_before_a_restart_is_not_sent_again(make_app, fake_tg, fake_kie, tmp_path):
    # The ⏳ message already said why; re-editing it gets "message is not modified", which used to add a new message.
    store_job(str(tmp_path / "bot.sqlite3"), trt_bot.Job(
        "00112233aabbcc02", 95, 95, "ru", "zimage", "маяк", "1:1", state="failed", outcome="failed", error="busy",
        status_message_id=1003, created_at=time.time(), updated_at=time.time()))
    fake_tg.fail("editMessageText", 400, {"ok": False, "error_code": 400, "description": "Bad Request: message is "
                                          "not modified: specified new message content and reply markup are exactly "
                                          "the same as a current content and reply markup of the message"})
    await make_app(**gen_env(fake_kie))
    await eventually(lambda: job_states(str(tmp_path / "bot.sqlite3")) == ["delivered"])
    assert len(fake_tg.calls_of("editMessageText")) == 1 and fake_tg.texts_to(95) == []


async def test_a_photo_that_may_have_gone_out_before_a_crash_is_offered_not_sent_again(fake_tg, fake_kie, tmp_path,
                                                                                       bot_processes):
    # Killed after sendPhoto reached Telegram but before "delivered" was committed: a restart used to send it again.
    database = str(tmp_path / "bot.sqlite3")
    env = {**bot_env(fake_tg, database, PORT=str(free_port())), **gen_env(fake_kie)}
    config = trt_bot.load_config(env)
    first = bot_processes(env)
    await first.wait_healthy()
    async with httpx.AsyncClient() as client:
        webhook = {"X-Telegram-Bot-Api-Secret-Token": config.webhook_secret}
        for update in (update_callback(1, 92, "new"), update_message(2, 92, "маяк"),
                       update_callback(3, 92, "ratio:9:16")):
            assert (await client.post(first.base_url + config.webhook_path, json=update, headers=webhook)).status_code == 200
        await eventually(lambda: job_states(database) == ["submitted"], timeout=15)

        photo_arrived, photo_answered = threading.Event(), threading.Event()
        answer = fake_tg.answer

        def telegram_slow_to_answer_sendphoto(method, path, *rest):
            if path.endswith("/sendPhoto"):
                photo_arrived.set()
                photo_answered.wait(30)
            return answer(method, path, *rest)

        fake_tg.answer = telegram_slow_to_answer_sendphoto
        fake_kie.complete("task00001")
        callback = f"{first.base_url}/{config.kie_callback_path}?token={config.kie_callback_token}"
        assert (await client.post(callback, json=fake_kie.callback_body("task00001"))).status_code == 200
        await eventually(photo_arrived.is_set, timeout=15)
        first.kill()
        photo_answered.set()  # Telegram delivers the photo although its client is gone
        await eventually(lambda: len(fake_tg.calls_of("sendPhoto")) == 1)
        fake_tg.answer = answer

        second = bot_processes({**env, "PORT": str(free_port())})
        await second.wait_healthy()
        await eventually(lambda: any(says(text, "ru", "maybe_sent") for text in sent_texts(fake_tg, 92)), timeout=15)
        await eventually(lambda: job_states(database) == ["delivered"])
        assert len(fake_tg.calls_of("sendPhoto")) == 1
        (offer,) = [p for p in fake_tg.calls_of("editMessageText") + fake_tg.calls_of("sendMessage")
                    if says(p.get("text", ""), "ru", "maybe_sent")]
        (resend, _) = buttons_of(offer)
        assert resend[0] == bot_text("ru", "btn_resend") and resend[1].startswith("resend:")

        press = update_callback(4, 92, resend[1])
        assert (await client.post(second.base_url + config.webhook_path, json=press, headers=webhook)).status_code == 200
        await eventually(lambda: len(fake_tg.calls_of("sendPhoto")) == 2, timeout=15)
        again = fake_tg.calls_of("sendPhoto")[1]
        assert again["chat_id"] == 92 and again["photo"] == fake_kie.image_url()


async def test_a_delivery_while_the_database_is_unusable_is_not_repeated_when_it_returns(
        make_app, fake_tg, fake_kie, tmp_path, monkeypatch):
    # The row still said "submitted": when the database came back, the job was resumed and its photo sent again.
    monkeypatch.setattr(trt_bot, "DB_RETRY_S", 0.1)
    database = str(tmp_path / "bot.sqlite3")
    app = await make_app(**gen_env(fake_kie))
    await order(app, 93)
    await eventually(lambda: job_states(database) == ["submitted"])
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the file: every write fails
    fake_kie.complete("task00001")
    await kie_calls_back(app, fake_kie, "task00001")
    await eventually(lambda: any(says(text, "ru", "maybe_sent") for text in sent_texts(fake_tg, 93)), timeout=15)
    assert not app.db.ok and fake_tg.calls_of("sendPhoto") == []  # sending now could not be made at most once
    blocker.execute("ROLLBACK")
    blocker.close()
    await eventually(lambda: app.db.ok and job_states(database) == ["delivered"], timeout=15)
    assert fake_tg.calls_of("sendPhoto") == [] and not app.generations.jobs


# -- admin alerts ------------------------------------------------------------------

async def test_admin_alerts_speak_each_admins_language(make_app, fake_tg, fake_kie, tmp_path):
    app = await make_app(**gen_env(fake_kie, ADMIN_IDS="900,901"))
    await post_update(app, update_message(next(_update_ids), 901, "/start", "en-GB"))

    def language_of_901():
        with sqlite3.connect(str(tmp_path / "bot.sqlite3")) as conn:
            return conn.execute("SELECT lang FROM users WHERE user_id=901").fetchone()

    await eventually(language_of_901)
    fake_kie.script("createTask", 200, {"code": 402, "msg": "Insufficient Credits"})
    await order(app, 94)
    await eventually(lambda: fake_tg.texts_to(900) and len(fake_tg.texts_to(901)) == 2)
    (russian,), english = fake_tg.texts_to(900), fake_tg.texts_to(901)[1]
    assert bot_text("ru", "incident_no_credits") in russian and not re.search(r"[A-Za-z]{3,}", russian.replace("Kie.ai", ""))
    assert bot_text("en", "incident_no_credits") in english and not re.search("[а-яА-Я]", english)
