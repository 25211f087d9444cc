"""Behaviour of trt_bot, grouped by the section of trt_bot.py each group covers.

End-to-end tests go through a real socket into the bot's HTTP server and real
HTTP out to the fake Bot API in conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
import respx

import trt_bot
from conftest import (HERE, SECRETS, TOKEN, ALL_RECORDS, FakeBotApi, bot_env, eventually, formatted, free_port,
                      update_callback, update_message)

_real_sleep = asyncio.sleep


async def _fast_sleep(seconds: float) -> None:
    """Patched over asyncio.sleep where a test must not wait out real backoffs."""
    await _real_sleep(min(seconds, 0.01))


def secret_header(app: trt_bot.App) -> dict[str, str]:
    return {"X-Telegram-Bot-Api-Secret-Token": app.config.webhook_secret}


async def post_update(app: trt_bot.App, update: dict, client: httpx.AsyncClient | None = None,
                      headers: dict | None = None) -> httpx.Response:
    url = f"http://127.0.0.1:{app.port}{app.config.webhook_path}"
    headers = secret_header(app) if headers is None else headers
    if client is not None:
        return await client.post(url, json=update, headers=headers)
    async with httpx.AsyncClient(verify=False) as own:  # plain HTTP: skip loading CA certificates (~20 ms)
        return await own.post(url, json=update, headers=headers)


async def raw_exchange(port: int, data: bytes, *, chunk: int | None = None, read_until_close: bool = True) -> bytes:
    """Send raw bytes (optionally ``chunk`` bytes per write) and return what the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
    try:
        if read_until_close:
            return await asyncio.wait_for(reader.read(), 5)
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


###############################################################################
# 1. Configuration
###############################################################################

def run_bot_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "KIE_", "WEBHOOK_", "BOT_"))}
    clean.update(env)
    return subprocess.run([sys.executable, os.path.join(HERE, "trt_bot.py"), *args], env=clean,
                          capture_output=True, text=True, timeout=30)


def test_missing_token_exits_2_with_one_line_saying_how_to_get_one():
    result = run_bot_cli({})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TELEGRAM_BOT_TOKEN" in lines[0] and "BotFather" in lines[0]


@pytest.mark.parametrize("env, names", [
    ({"TELEGRAM_BOT_TOKEN": "not-a-token"}, "TELEGRAM_BOT_TOKEN"),
    ({"TELEGRAM_BOT_TOKEN": TOKEN, "PORT": "eighty"}, "PORT"),
    ({"TELEGRAM_BOT_TOKEN": TOKEN, "BOT_MODE": "carrier-pigeon"}, "BOT_MODE"),
    ({"TELEGRAM_BOT_TOKEN": TOKEN, "DATABASE_URL": "postgres://db/x"}, "DATABASE_URL"),
    ({"TELEGRAM_BOT_TOKEN": TOKEN, "BOT_MODE": "webhook"}, "WEBHOOK_BASE_URL"),
])
def test_bad_setting_exits_2_naming_what_to_fix(env, names):
    result = run_bot_cli(env)
    assert result.returncode == 2
    assert names in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert TOKEN not in result.stderr


def test_derived_secrets_are_stable_url_safe_and_not_the_token():
    config = trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, "RENDER_EXTERNAL_URL": "https://x.onrender.com"})
    again = trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, "RENDER_EXTERNAL_URL": "https://x.onrender.com"})
    assert config.bot_mode == "webhook"  # a known base URL means webhook mode
    assert config.webhook_secret == again.webhook_secret and config.kie_callback_token == again.kie_callback_token
    assert trt_bot.SECRET_TOKEN_PATTERN.fullmatch(config.webhook_secret)
    for derived in (config.webhook_secret, config.kie_callback_token, config.webhook_url):
        for secret in SECRETS[:2]:
            assert secret not in derived
    assert config.webhook_url.startswith("https://x.onrender.com/webhook/")


def test_without_a_base_url_the_bot_polls_and_uses_the_default_database():
    config = trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN})
    assert config.bot_mode == "polling"
    assert config.database_path == "./data/trt_bot.sqlite3"
    assert trt_bot.parse_database_url("sqlite:////var/data/bot.db") == "/var/data/bot.db"
    assert trt_bot.parse_database_url("sqlite:///:memory:") == ":memory:"


###############################################################################
# 2. Errors: secrets never reach a log record
###############################################################################

def test_masking_filter_hides_token_in_message_args_and_traceback():
    logger = logging.getLogger("trt_bot")
    trt_bot.install_secret_masking(SECRETS)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record)

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("calling %s", f"https://api.telegram.org/bot{TOKEN}/getMe")
        try:
            raise RuntimeError(f"boom {TOKEN}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(formatted(r) for r in seen)
    assert "bot***" in text and "boom ***" in text
    assert all(secret not in text for secret in SECRETS)


###############################################################################
# 3. HTTP parsing (no sockets)
###############################################################################

GOOD = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}"


def parse_all(data: bytes, *, bytewise: bool = False, **limits) -> list[trt_bot.Request]:
    parser = trt_bot.RequestParser(**limits)
    requests = []
    for piece in ([data[i:i + 1] for i in range(len(data))] if bytewise else [data]):
        parser.feed(piece)
        while (request := parser.next_request()) is not None:
            requests.append(request)
    return requests


BAD_REQUESTS = [
    # (label, bytes, status)
    ("garbage request line", b"HELLO\r\n\r\n", 400),
    ("missing version", b"GET /\r\n\r\n", 400),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    ("absolute-form target", b"GET http://x/ HTTP/1.1\r\n\r\n", 400),
    ("TLS handshake on plain port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
    ("NUL first byte", b"\x00GET / HTTP/1.1\r\n\r\n", 400),
    ("header without colon", b"GET / HTTP/1.1\r\nHost a\r\n\r\n", 400),
    ("whitespace before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    ("obs-fold continuation", b"GET / HTTP/1.1\r\nX: a\r\n  b\r\n\r\n", 400),
    ("NUL in header value", b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    ("bare LF in header value", b"GET / HTTP/1.1\r\nX: a\nb: c\r\n\r\n", 400),
    ("CR in header name", b"GET / HTTP/1.1\r\nX\rY: a\r\n\r\n", 400),
    ("Content-Length not a number", b"POST / HTTP/1.1\r\nContent-Length: asdf\r\n\r\n", 400),
    ("Content-Length with junk", b"POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", 400),
    ("Content-Length of 21 digits", b"POST / HTTP/1.1\r\nContent-Length: " + b"1" * 21 + b"\r\n\r\n", 400),
    ("negative Content-Length", b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    ("conflicting Content-Length", b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    ("conflicting Content-Length list", b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400),
    ("Content-Length and Transfer-Encoding",
     b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ("chunked body", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
    ("unknown transfer coding", b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ("body over the limit", b"POST / HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n", 413),
    ("headers over the limit, head complete", b"GET / HTTP/1.1\r\nX: " + b"a" * 17000 + b"\r\n\r\n", 431),
    ("headers over the limit, head unfinished", b"GET / HTTP/1.1\r\nX: " + b"a" * 17000, 431),
]


@pytest.mark.parametrize("label, data, status", BAD_REQUESTS, ids=[row[0] for row in BAD_REQUESTS])
@pytest.mark.parametrize("how", ["whole", "bytewise", "with trailing data"])
def test_bad_request_gets_its_status(label, data, status, how):
    if how == "with trailing data":
        data += GOOD
    with pytest.raises(trt_bot.HttpError) as caught:
        parse_all(data, bytewise=how == "bytewise")
    assert caught.value.status == status


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_request_parses_whole_or_one_byte_at_a_time(how):
    (request,) = parse_all(GOOD, bytewise=how == "bytewise")
    assert (request.method, request.path, request.body, request.keep_alive) == ("POST", "/x", b"{}", True)
    assert request.headers["host"] == "a"


def test_pipelined_requests_come_out_one_per_call_and_partial_body_waits():
    requests = parse_all(GOOD + b"GET /h?token=abc HTTP/1.0\r\n\r\n" + GOOD[:-1])
    assert [r.path for r in requests] == ["/x", "/h"]
    assert requests[1].query == {"token": "abc"} and requests[1].keep_alive is False


def test_leading_empty_lines_and_repeated_equal_content_length_are_accepted():
    (request,) = parse_all(b"\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi")
    assert request.body == b"hi"


def test_connection_close_and_http10_keep_alive_are_honoured():
    (close,) = parse_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
    (keep,) = parse_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert close.keep_alive is False and keep.keep_alive is True


def test_limits_are_parameters():
    with pytest.raises(trt_bot.HttpError) as caught:
        parse_all(b"POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", max_body=10)
    assert caught.value.status == 413


def test_head_response_has_the_get_length_but_no_body():
    response = trt_bot.text_response(200, "hello")
    head = trt_bot.render_response(response, head_only=True)
    assert head.endswith(b"\r\n\r\n") and b"Content-Length: 6" in head


###############################################################################
# 4. HTTP server (real sockets)
###############################################################################

async def test_two_pipelined_requests_on_one_connection_are_both_answered(make_app):
    app = await make_app()
    data = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = await raw_exchange(app.port, data)
    assert answer.count(b"HTTP/1.1 200 OK") == 2 and b"trt_bot" in answer


async def test_request_split_into_one_byte_writes_is_served(make_app):
    app = await make_app()
    answer = await raw_exchange(app.port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", chunk=1)
    assert answer.startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("data, status", [
    (b"BREW /coffee HTTP/1.1\r\nConnection: close\r\n\r\n", b"404"),
    (b"DELETE /health HTTP/1.1\r\nConnection: close\r\n\r\n", b"405"),
    (b"GET /x HTTP/1.1\r\nContent-Length: zz\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nContent-Length: 9999999\r\n\r\n", b"413"),
    (b"GET / HTTP/1.1\r\nX: " + b"y" * 20000 + b"\r\n\r\n", b"431"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"411"),
])
async def test_bad_input_over_a_socket_gets_its_status_without_a_traceback(make_app, data, status):
    app = await make_app()
    answer = await raw_exchange(app.port, data)
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == status
    assert b"Traceback" not in answer


async def test_wrong_method_lists_allowed_ones_and_head_mirrors_get(make_app):
    app = await make_app()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}") as client:
        wrong = await client.delete("/health")
        head = await client.head("/health")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0


async def say_hi(request: trt_bot.Request) -> trt_bot.Response:
    return trt_bot.text_response(200, "hi")


@contextlib.asynccontextmanager
async def running_server(handler=say_hi, **limits):
    """A bare HttpServer on a free port, for the server's own limits."""
    server = trt_bot.HttpServer(handler, **limits)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.close()


async def test_slowloris_client_is_cut_off_with_408():
    async with running_server(request_timeout=0.3, idle_timeout=5) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nX-Slow: ")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 408")


async def test_idle_keep_alive_connection_is_closed_after_the_timeout():
    async with running_server(idle_timeout=0.2) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"hi\n"), 5)
        rest = await asyncio.wait_for(reader.read(), 5)  # EOF once the idle timeout passes
        assert first.startswith(b"HTTP/1.1 200") and rest == b""


async def test_connections_over_the_bound_get_503():
    async with running_server(max_connections=2) as (server, port):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await eventually(lambda: server.open_connections == 2)
        answer = await raw_exchange(port, b"GET / HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503")
        for _, writer in held:
            writer.close()


async def test_a_handler_that_raises_gives_500_without_a_traceback():
    async def broken(request):
        raise ValueError(f"secret detail {TOKEN}")

    async with running_server(broken) as (_, port):
        answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 500") and b"secret detail" not in answer


###############################################################################
# 5. Storage
###############################################################################

async def test_schema_is_versioned_and_migrating_twice_is_harmless(tmp_path):
    path = str(tmp_path / "x.sqlite3")
    trt_bot.open_sqlite(path).close()
    conn = trt_bot.open_sqlite(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == trt_bot.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_concurrent_inserts_share_commits_and_duplicates_are_detected(tmp_path):
    db = trt_bot.Database(str(tmp_path / "x.sqlite3"))
    assert await db.open()
    inserts = trt_bot.GroupCommit(db, trt_bot.inbox_insert)
    items = [trt_bot.InboxItem(n % 150, 1, {}, b"{}", time.time()) for n in range(300)]
    results = await asyncio.gather(*(inserts.submit(item) for item in items))
    assert sum(results) == 150  # each id is new exactly once
    assert inserts.batches < 50  # grouped, not one commit per insert
    await db.close()


async def test_conversation_state_survives_a_reopen(tmp_path):
    path = str(tmp_path / "x.sqlite3")
    db = trt_bot.Database(path)
    await db.open()
    store = trt_bot.ConversationStore(db)
    await store.set(7, {"step": "prompt"})
    await store.set(8, {"step": "ratio"})
    await store.set(8, None)
    await db.close()
    db = trt_bot.Database(path)
    await db.open()
    reloaded = trt_bot.ConversationStore(db)
    assert await reloaded.load() == 1 and reloaded.get(7) == {"step": "prompt"} and reloaded.get(8) is None
    await db.close()


async def test_an_unopenable_database_is_reported_not_raised(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    db = trt_bot.Database(str(blocker / "bot.sqlite3"))
    assert await db.open() is False and not db.ok and db.last_error
    with pytest.raises(trt_bot.DatabaseUnavailable):
        await db.read(trt_bot.inbox_backlog)
    await db.close()


###############################################################################
# 6. Telegram client
###############################################################################

API = "https://api.telegram.org"


def bot_api_error(code: int, description: str, retry_after: int | None = None) -> httpx.Response:
    body: dict = {"ok": False, "error_code": code, "description": description}
    if retry_after is not None:
        body["parameters"] = {"retry_after": retry_after}
    return httpx.Response(code, json=body)


@pytest.fixture
def telegram():
    async def make():
        return trt_bot.TelegramClient(TOKEN, API, httpx.AsyncClient())
    return make


@respx.mock
async def test_429_waits_retry_after_then_succeeds(telegram, monkeypatch):
    slept: list[float] = []

    async def fake_sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(trt_bot.asyncio, "sleep", fake_sleep)
    route = respx.post(f"{API}/bot{TOKEN}/sendMessage").mock(side_effect=[
        bot_api_error(429, "Too Many Requests: retry after 3", retry_after=3),
        httpx.Response(200, json={"ok": True, "result": {"message_id": 5}}),
    ])
    client = await telegram()
    assert await client.send_message(1, "hi") == {"message_id": 5}
    assert route.call_count == 2 and slept == [3.0]


@respx.mock
async def test_502_and_network_errors_are_retried(telegram, monkeypatch):
    monkeypatch.setattr(trt_bot.asyncio, "sleep", _fast_sleep)
    route = respx.post(f"{API}/bot{TOKEN}/getMe").mock(side_effect=[
        httpx.Response(502, text="<html>Bad Gateway</html>"),
        httpx.ConnectError("refused"),
        httpx.Response(200, json={"ok": True, "result": {"id": 1}}),
    ])
    client = await telegram()
    assert await client.call("getMe") == {"id": 1} and route.call_count == 3


@respx.mock
async def test_transient_failures_are_retried_until_the_budget_is_spent_not_a_fixed_count(telegram, monkeypatch):
    monkeypatch.setattr(trt_bot.asyncio, "sleep", _fast_sleep)
    failures = [httpx.Response(502, text="<html>Bad Gateway</html>"), httpx.ConnectError("refused"),
                httpx.ReadTimeout("stalled"), httpx.RemoteProtocolError("dropped"),
                bot_api_error(500, "Internal Server Error"), bot_api_error(429, "Too Many Requests", retry_after=0)]
    route = respx.post(f"{API}/bot{TOKEN}/sendMessage").mock(
        side_effect=failures + [httpx.Response(200, json={"ok": True, "result": {"message_id": 5}})])
    client = await telegram()
    assert await client.send_message(1, "hi") == {"message_id": 5} and route.call_count == 7
    route.side_effect = itertools.repeat(httpx.Response(503, text="down"))
    client.retry = trt_bot.RetryPolicy(budget_s=0.3, base_s=0.01, cap_s=0.05)
    with pytest.raises(trt_bot.TelegramError) as caught:
        await client.send_message(1, "hi")
    assert caught.value.error_code == 503 and route.call_count > 7 + 2  # retried, then given up at the budget


@respx.mock
async def test_a_429_asking_for_longer_than_the_budget_left_is_raised_at_once(telegram, monkeypatch):
    slept: list[float] = []

    async def fake_sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(trt_bot.asyncio, "sleep", fake_sleep)
    route = respx.post(f"{API}/bot{TOKEN}/sendMessage").mock(
        return_value=bot_api_error(429, "Too Many Requests: retry after 40", retry_after=40))
    client = trt_bot.TelegramClient(TOKEN, API, httpx.AsyncClient(), trt_bot.RetryPolicy(budget_s=30))
    with pytest.raises(trt_bot.TelegramError) as caught:
        await client.send_message(1, "hi")
    assert (caught.value.error_code, caught.value.retry_after, route.call_count, slept) == (429, 40, 1, [])


@respx.mock
async def test_a_429_with_an_unreadable_retry_after_waits_a_second(telegram, monkeypatch):
    slept: list[float] = []

    async def fake_sleep(seconds):
        slept.append(seconds)

    monkeypatch.setattr(trt_bot.asyncio, "sleep", fake_sleep)
    route = respx.post(f"{API}/bot{TOKEN}/sendMessage").mock(side_effect=[
        bot_api_error(429, "Too Many Requests", retry_after="soon"),  # type: ignore[arg-type]
        httpx.Response(200, json={"ok": True, "result": {"message_id": 5}}),
    ])
    client = await telegram()
    assert await client.send_message(1, "hi") == {"message_id": 5}
    assert route.call_count == 2 and slept == [1.0]


@respx.mock
async def test_a_send_whose_answer_was_lost_is_sent_again_at_least_once(telegram, monkeypatch):
    """Telegram may have shown the first one: a reply can arrive twice, but is never lost."""
    monkeypatch.setattr(trt_bot.asyncio, "sleep", _fast_sleep)
    route = respx.post(f"{API}/bot{TOKEN}/sendMessage").mock(side_effect=[
        httpx.ReadTimeout("the answer did not come"),
        httpx.Response(200, json={"ok": True, "result": {"message_id": 5}}),
    ])
    client = await telegram()
    assert await client.send_message(1, "hi") == {"message_id": 5} and route.call_count == 2


def test_retry_policy_backs_off_exponentially_with_jitter_inside_the_budget():
    policy = trt_bot.RetryPolicy(budget_s=20.0, base_s=0.5, cap_s=8.0)
    server_error = trt_bot.TelegramError("sendMessage", 502, "Bad Gateway")
    longest = [policy.delay(server_error, retry, 20.0, jitter=lambda low, high: high) for retry in range(1, 8)]
    assert longest == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert policy.delay(server_error, 3, 20.0, jitter=lambda low, high: low) == 0.0
    assert policy.delay(server_error, 5, 7.9, jitter=lambda low, high: high) is None  # past the budget: give up
    network = trt_bot.TelegramNetworkError("sendMessage", httpx.ReadTimeout("x"))
    assert policy.delay(network, 1, 20.0, jitter=lambda low, high: high) == 0.5
    flood = trt_bot.TelegramError("sendMessage", 429, "Too Many Requests", retry_after=3)
    assert policy.delay(flood, 1, 20.0) == 3.0 and policy.delay(flood, 1, 2.5) is None
    for code in (400, 401, 403, 404, 409):
        assert policy.delay(trt_bot.TelegramError("sendMessage", code, "no"), 1, 20.0) is None


@respx.mock
@pytest.mark.parametrize("code", [400, 403, 404])
async def test_client_errors_are_not_retried(telegram, code):
    route = respx.post(f"{API}/bot{TOKEN}/sendMessage").mock(
        return_value=bot_api_error(code, "Forbidden: bot was blocked by the user"))
    client = await telegram()
    with pytest.raises(trt_bot.TelegramError) as caught:
        await client.send_message(1, "hi")
    assert caught.value.error_code == code and route.call_count == 1
    assert TOKEN not in str(caught.value)


@respx.mock
async def test_files_go_as_multipart_with_json_encoded_fields(telegram):
    route = respx.post(f"{API}/bot{TOKEN}/sendPhoto").mock(
        return_value=httpx.Response(200, json={"ok": True, "result": {"message_id": 9}}))
    client = await telegram()
    await client.call("sendPhoto", {"chat_id": 5, "reply_markup": {"inline_keyboard": []}},
                      files={"photo": ("p.png", b"\x89PNG", "image/png")})
    request = route.calls.last.request
    assert request.headers["content-type"].startswith("multipart/form-data")
    assert b'{"inline_keyboard": []}' in request.content and b"\x89PNG" in request.content


def test_bot_api_answers_parse_to_result_or_typed_error():
    assert trt_bot.parse_bot_api_response("m", 200, b'{"ok":true,"result":[1]}') == [1]
    with pytest.raises(trt_bot.TelegramError) as caught:
        trt_bot.parse_bot_api_response("m", 429, b'{"ok":false,"error_code":429,"description":"slow",'
                                                 b'"parameters":{"retry_after":7}}')
    assert (caught.value.error_code, caught.value.retry_after, caught.value.retryable) == (429, 7, True)
    with pytest.raises(trt_bot.TelegramError) as caught:
        trt_bot.parse_bot_api_response("m", 502, b"<html>")
    assert caught.value.error_code == 502 and caught.value.retryable
    for unreadable in (b'"soon"', b'-1', b'true', b'null'):
        with pytest.raises(trt_bot.TelegramError) as caught:
            trt_bot.parse_bot_api_response("m", 429, b'{"ok":false,"error_code":429,"parameters":{"retry_after":'
                                                     + unreadable + b'}}')
        assert caught.value.retry_after is None


###############################################################################
# 7. Update pipeline (end to end through the webhook)
###############################################################################

async def test_start_update_is_acknowledged_and_answered_with_the_menu(make_app, fake_tg):
    app = await make_app()
    response = await post_update(app, update_message(1, 42, "/start"))
    assert response.status_code == 200
    await eventually(lambda: fake_tg.calls_of("sendMessage"))
    (sent,) = fake_tg.calls_of("sendMessage")
    assert sent["chat_id"] == 42 and "Привет" in sent["text"]
    buttons = [b["text"] for row in sent["reply_markup"]["inline_keyboard"] for b in row]
    assert "🖼 Создать картинку" in buttons and "ℹ️ Помощь" in buttons


@pytest.mark.parametrize("headers", [{}, {"X-Telegram-Bot-Api-Secret-Token": "wrong"}])
async def test_wrong_or_missing_secret_is_rejected_and_not_processed(make_app, fake_tg, headers):
    app = await make_app()
    response = await post_update(app, update_message(1, 42, "/start"), headers=headers)
    assert response.status_code == 401
    await asyncio.sleep(0.2)
    assert fake_tg.calls_of("sendMessage") == [] and app.pipeline.stats.received == 0


async def test_wrong_path_secret_is_401_and_invalid_updates_are_400(make_app):
    app = await make_app()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}", headers=secret_header(app)) as client:
        assert (await client.post("/webhook/guess", json={"update_id": 1})).status_code == 401
        assert (await client.post(app.config.webhook_path, content=b"{nope")).status_code == 400
        assert (await client.post(app.config.webhook_path, json={"update_id": "1"})).status_code == 400
        assert (await client.post(app.config.webhook_path, json=[1])).status_code == 400


async def test_same_update_id_twice_is_answered_once(make_app, fake_tg):
    app = await make_app()
    update = update_message(7, 42, "/start")
    assert (await post_update(app, update)).status_code == 200
    assert (await post_update(app, update)).status_code == 200
    await eventually(lambda: app.pipeline.stats.processed == 1)
    await asyncio.sleep(0.2)
    assert len(fake_tg.calls_of("sendMessage")) == 1 and app.pipeline.stats.duplicates == 1


async def test_300_updates_over_30_chats_are_answered_in_each_chats_order(make_app, fake_tg):
    app = await make_app(UPDATE_QUEUE_WORKERS="3")
    updates = [update_message(n, 1000 + n % 30, f"/start {n}") for n in range(1, 301)]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=40)) as client:
        for batch in range(0, 300, 40):  # 40 concurrent posts, like Telegram's max_connections
            results = await asyncio.gather(*(post_update(app, u, client) for u in updates[batch:batch + 40]))
            assert {r.status_code for r in results} == {200}
    await eventually(lambda: len(fake_tg.calls_of("sendMessage")) == 300, timeout=30)
    assert app.pipeline.stats.errors == 0
    for chat in range(1000, 1030):
        # Replies carry no payload, so order is checked on arrival of the update ids at the handler.
        replies = [p for p in fake_tg.calls_of("sendMessage") if p["chat_id"] == chat]
        assert len(replies) == 10


async def test_each_chats_updates_are_handled_one_at_a_time_in_arrival_order(make_app):
    app = await make_app(UPDATE_QUEUE_WORKERS="3", UPDATE_QUEUE_SIZE="20")
    seen: dict[int, list[int]] = {}
    running: set[int] = set()
    overlaps: list[int] = []

    async def recording_handler(update: dict) -> None:
        chat = update["message"]["chat"]["id"]
        if chat in running:
            overlaps.append(chat)
        running.add(chat)
        await asyncio.sleep(0.001 * (update["update_id"] % 3))
        seen.setdefault(chat, []).append(update["update_id"])
        running.discard(chat)

    app.pipeline.handler = recording_handler
    async with httpx.AsyncClient() as client:
        for batch in range(1, 301, 40):
            await asyncio.gather(*(post_update(app, update_message(n, 2000 + n % 30, "x"), client)
                                   for n in range(batch, min(batch + 40, 301))))
    await eventually(lambda: sum(map(len, seen.values())) == 300, timeout=30)
    assert overlaps == []
    assert app.pipeline.stats.spilled > 0  # queue of 20 overflowed into the inbox and was refilled
    for chat, ids in seen.items():
        # Posts of one batch race each other, so order is checked between batches of 40.
        batches = [(i - 1) // 40 for i in ids]
        assert batches == sorted(batches), chat


async def test_a_full_queue_spills_to_the_inbox_and_loses_nothing(make_app):
    app = await make_app(UPDATE_QUEUE_WORKERS="1", UPDATE_QUEUE_SIZE="2")
    release = asyncio.Event()
    handled: list[int] = []

    async def slow_handler(update: dict) -> None:
        await release.wait()
        handled.append(update["update_id"])

    app.pipeline.handler = slow_handler
    for n in range(1, 21):
        assert (await post_update(app, update_message(n, 3000, "x"))).status_code == 200
    assert app.pipeline.stats.spilled == 18 and app.pipeline.backlog == 20
    release.set()
    await eventually(lambda: len(handled) == 20)
    assert handled == list(range(1, 21)) and app.pipeline.stats.dropped == 0


async def test_a_raising_handler_is_counted_and_the_worker_goes_on(make_app):
    app = await make_app(UPDATE_QUEUE_WORKERS="1")
    handled: list[int] = []

    async def flaky(update: dict) -> None:
        if update["update_id"] == 1:
            raise RuntimeError("boom")
        handled.append(update["update_id"])

    app.pipeline.handler = flaky
    for n in (1, 2):
        await post_update(app, update_message(n, 5, "x"))
    await eventually(lambda: handled == [2])
    assert app.pipeline.stats.errors == 1 and app.pipeline.stats.processed == 2


async def test_a_hanging_handler_is_cut_by_the_timeout(make_app):
    app = await make_app(UPDATE_QUEUE_WORKERS="1")
    app.pipeline.handler_timeout = 0.2
    handled: list[int] = []

    async def hangs_once(update: dict) -> None:
        if update["update_id"] == 1:
            await asyncio.sleep(3600)
        handled.append(update["update_id"])

    app.pipeline.handler = hangs_once
    for n in (1, 2):
        await post_update(app, update_message(n, 5, "x"))
    await eventually(lambda: handled == [2], timeout=5)
    assert app.pipeline.stats.errors == 1


async def test_expired_callback_query_is_dropped_not_answered(make_app, fake_tg):
    app = await make_app()
    item = trt_bot.InboxItem(9, 5, update_callback(9, 5, "help"), b"{}", time.time() - 200, durable=False)
    app.pipeline._enqueue(item)
    await eventually(lambda: app.pipeline.stats.dropped == 1)
    assert fake_tg.calls_of("answerCallbackQuery") == []


async def test_start_answers_when_the_database_cannot_be_opened(make_app, fake_tg, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    app = await make_app(DATABASE_URL=f"sqlite:///{blocker}/bot.sqlite3")
    assert (await post_update(app, update_message(1, 42, "/start"))).status_code == 200
    await eventually(lambda: fake_tg.texts_to(42))
    async with httpx.AsyncClient() as client:
        health = (await client.get(f"http://127.0.0.1:{app.port}/health")).json()
    assert health["status"] == "degraded" and health["db_schema_ready"] is False
    assert health["queue"]["memory_only"] == 1


async def test_a_database_locked_too_long_degrades_then_recovers(make_app, fake_tg, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_bot, "DB_RETRY_S", 0.1)
    app = await make_app()
    locker = sqlite3.connect(str(tmp_path / "bot.sqlite3"), isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another process hogging the write lock
    try:
        assert (await post_update(app, update_message(1, 42, "/start"))).status_code == 200
        await eventually(lambda: fake_tg.texts_to(42))
        assert app.db.ok is False and app.pipeline.stats.memory_only == 1
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await eventually(lambda: app.db.ok, timeout=5)
    assert (await post_update(app, update_message(2, 43, "/start"))).status_code == 200
    await eventually(lambda: fake_tg.texts_to(43))
    assert app.pipeline.stats.memory_only == 1  # the second one was durable again


async def test_acknowledged_updates_survive_sigkill_and_are_answered_after_restart(fake_tg, tmp_path, bot_processes):
    fake_tg.stall("sendMessage")  # the bot acknowledges but cannot answer yet
    env = bot_env(fake_tg, str(tmp_path / "bot.sqlite3"), PORT=str(free_port()))
    first = bot_processes(env)
    await first.wait_healthy()
    headers = {"X-Telegram-Bot-Api-Secret-Token": trt_bot.load_config(env).webhook_secret}
    url = first.base_url + trt_bot.load_config(env).webhook_path
    async with httpx.AsyncClient() as client:
        for n in range(1, 21):
            response = await client.post(url, json=update_message(n, 500 + n, "/start"), headers=headers)
            assert response.status_code == 200
    first.kill()
    fake_tg.release("sendMessage")
    await asyncio.sleep(0.3)  # let the killed process's stalled calls drain out of the fake
    fake_tg.clear()
    second = bot_processes({**env, "PORT": str(free_port())})
    await second.wait_healthy()
    await eventually(lambda: {p["chat_id"] for p in fake_tg.calls_of("sendMessage")} >= set(range(501, 521)),
                     timeout=20)
    assert len(fake_tg.calls_of("sendMessage")) == 20


###############################################################################
# 8. Conversation
###############################################################################

async def test_english_speakers_get_english_and_unknown_language_gets_russian(make_app, fake_tg):
    app = await make_app()
    await post_update(app, update_message(1, 1, "/start", lang="en"))
    await post_update(app, update_message(2, 2, "/start", lang="uk"))
    await post_update(app, update_message(3, 3, "/start", lang=""))
    await eventually(lambda: len(fake_tg.calls_of("sendMessage")) == 3)
    assert "Hi!" in fake_tg.texts_to(1)[0]
    assert "Привет" in fake_tg.texts_to(2)[0] and "Привет" in fake_tg.texts_to(3)[0]


async def test_help_cancel_and_free_text_get_answers_with_the_menu(make_app, fake_tg):
    app = await make_app()
    for n, text in enumerate(["/help", "/cancel", "просто текст", "/start@trt_test_bot"], start=1):
        await post_update(app, update_message(n, 9, text))
    await eventually(lambda: len(fake_tg.texts_to(9)) == 4)
    help_text, cancelled, hint, start = fake_tg.texts_to(9)
    assert "/cancel" in help_text and "Отменено" in cancelled and "Создать картинку" in hint and "Привет" in start
    assert all("reply_markup" in p for p in fake_tg.calls_of("sendMessage"))


@pytest.mark.parametrize("data", ["help", "nonsense", "ratio:99:99", "", "new:" + "x" * 60])
async def test_every_callback_query_is_answered(make_app, fake_tg, data):
    app = await make_app()
    await post_update(app, update_callback(1, 9, data))
    await eventually(lambda: fake_tg.calls_of("answerCallbackQuery"))
    assert fake_tg.calls_of("answerCallbackQuery")[0]["callback_query_id"] == "cq1"


async def test_start_uses_the_fallback_menu_when_building_the_menu_fails(make_app, fake_tg, monkeypatch):
    app = await make_app()
    monkeypatch.setattr(trt_bot, "main_menu", lambda lang: 1 / 0)
    await post_update(app, update_message(1, 9, "/start"))
    await eventually(lambda: fake_tg.calls_of("sendMessage"))
    assert fake_tg.calls_of("sendMessage")[0]["reply_markup"] == trt_bot.FALLBACK_MENU


async def test_a_user_who_blocked_the_bot_is_marked_not_counted_as_an_error(make_app, fake_tg, tmp_path):
    app = await make_app()
    fake_tg.fail("sendMessage", 403, {"ok": False, "error_code": 403,
                                      "description": "Forbidden: bot was blocked by the user"})
    await post_update(app, update_message(1, 77, "/start"))
    await eventually(lambda: app.pipeline.stats.blocked == 1)
    assert app.pipeline.stats.errors == 0

    def blocked():
        with sqlite3.connect(str(tmp_path / "bot.sqlite3")) as conn:
            row = conn.execute("SELECT blocked FROM users WHERE user_id=77").fetchone()
        return row and row[0] == 1
    await eventually(blocked)


###############################################################################
# 9. Application: webhook set-up, polling, diagnostics, shutdown
###############################################################################

@pytest.mark.parametrize("info, action", [
    ({"url": "U", "pending_update_count": 0, "allowed_updates": trt_bot.ALLOWED_UPDATES}, "keep"),
    ({"url": "U", "pending_update_count": 0, "allowed_updates": trt_bot.ALLOWED_UPDATES,
      "last_error_message": "Read timeout expired"}, "flush"),
    ({"url": "U", "pending_update_count": 125, "allowed_updates": trt_bot.ALLOWED_UPDATES}, "flush"),
    ({"url": "U", "pending_update_count": 10, "allowed_updates": trt_bot.ALLOWED_UPDATES}, "keep"),
    ({"url": "https://old.example.com/hook", "pending_update_count": 0}, "set"),
    ({"url": "U", "pending_update_count": 0, "allowed_updates": ["message"]}, "set"),
])
def test_plan_webhook_decides_from_webhook_info(info, action):
    assert trt_bot.plan_webhook(info, "U", trt_bot.ALLOWED_UPDATES, 10)[0] == action


def test_flush_can_be_disabled():
    info = {"url": "U", "pending_update_count": 500, "last_error_message": "x",
            "allowed_updates": trt_bot.ALLOWED_UPDATES}
    assert trt_bot.plan_webhook(info, "U", trt_bot.ALLOWED_UPDATES, -1)[0] == "keep"


async def test_ensure_webhook_leaves_a_matching_webhook_alone(make_app, fake_tg):
    config = trt_bot.load_config(bot_env(fake_tg, ":memory:"))
    fake_tg.webhook_info = {"url": config.webhook_url, "pending_update_count": 0,
                            "allowed_updates": trt_bot.ALLOWED_UPDATES}
    await make_app()
    await eventually(lambda: fake_tg.calls_of("getWebhookInfo"))
    await asyncio.sleep(0.2)
    assert fake_tg.calls_of("setWebhook") == []


@pytest.mark.parametrize("info, dropped", [
    ({"url": "https://other.example.com/x", "pending_update_count": 0}, False),
    ({"url": "SAME", "pending_update_count": 11, "allowed_updates": trt_bot.ALLOWED_UPDATES}, True),
    ({"url": "SAME", "pending_update_count": 0, "last_error_message": "Read timeout expired",
      "allowed_updates": trt_bot.ALLOWED_UPDATES}, True),
])
async def test_ensure_webhook_registers_or_flushes_without_leaking_the_token(make_app, fake_tg, info, dropped):
    config = trt_bot.load_config(bot_env(fake_tg, ":memory:"))
    fake_tg.webhook_info = {**info, "url": config.webhook_url if info["url"] == "SAME" else info["url"]}
    app = await make_app()
    await eventually(lambda: fake_tg.calls_of("setWebhook"))
    (registered,) = fake_tg.calls_of("setWebhook")
    assert registered["drop_pending_updates"] is dropped
    assert registered["url"] == app.config.webhook_url and registered["secret_token"] == app.config.webhook_secret
    for secret in SECRETS[:2]:
        assert secret not in registered["url"] and secret not in registered["secret_token"]


async def test_polling_mode_feeds_the_inbox_advances_offsets_and_survives_409(make_app, fake_tg, monkeypatch):
    monkeypatch.setattr(trt_bot.asyncio, "sleep", _fast_sleep)
    fake_tg.fail("getUpdates", 409, {"ok": False, "error_code": 409,
                                     "description": "Conflict: terminated by other getUpdates request"})
    fake_tg.push_updates(update_message(10, 1, "/start"), update_message(11, 2, "/start"))
    app = await make_app(BOT_MODE="polling", WEBHOOK_BASE_URL="")
    app.poll_timeout = 1
    await eventually(lambda: len(fake_tg.calls_of("sendMessage")) == 2)
    fake_tg.push_updates(update_message(12, 3, "/help"))
    await eventually(lambda: fake_tg.texts_to(3))
    offsets = [p.get("offset") for p in fake_tg.calls_of("getUpdates")]
    assert 12 in offsets and 13 in offsets
    assert fake_tg.calls_of("deleteWebhook")[0]["drop_pending_updates"] is False
    assert fake_tg.calls_of("setWebhook") == []
    assert app.pipeline.stats.duplicates == 0


async def test_health_has_the_documented_shape(make_app):
    app = await make_app()
    async with httpx.AsyncClient() as client:
        health = (await client.get(f"http://127.0.0.1:{app.port}/health")).json()
    assert {"status", "uptime", "active", "webhook_mode", "lock_acquired", "db_schema_ready", "queue"} <= set(health)
    assert set(health["queue"]) >= {"total_received", "total_processed", "total_dropped", "total_errors",
                                    "workers_active", "queue_depth", "queue_max", "drop_rate"}
    assert health["status"] == "ok" and health["webhook_mode"] is True and health["queue"]["queue_max"] == 100


async def test_diag_webhook_masks_the_url_and_caches(make_app, fake_tg):
    app = await make_app()
    await eventually(lambda: fake_tg.calls_of("setWebhook"))
    fake_tg.webhook_info["last_error_message"] = "Wrong response from the webhook: 502 Bad Gateway"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}") as client:
        first = (await client.get("/diag/webhook")).json()
        await client.get("/diag/webhook")
    assert first["url"] == "https://bot.example.com/webhook/***"
    assert first["last_error_message"].startswith("Wrong response") and first["max_connections"] == 40
    assert len(fake_tg.calls_of("getWebhookInfo")) == 2  # ensure_webhook's + one for both diag calls


async def test_sigterm_drains_in_flight_work_and_exits_0(fake_tg, tmp_path, bot_processes):
    env = bot_env(fake_tg, str(tmp_path / "bot.sqlite3"), PORT=str(free_port()))
    bot = bot_processes(env)
    await bot.wait_healthy()
    config = trt_bot.load_config(env)
    fake_tg.stall("sendMessage")
    async with httpx.AsyncClient() as client:
        for n in range(1, 6):
            await client.post(bot.base_url + config.webhook_path, json=update_message(n, 600 + n, "/start"),
                              headers={"X-Telegram-Bot-Api-Secret-Token": config.webhook_secret})
    await eventually(lambda: bot.process.poll() is None)
    bot.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    fake_tg.release("sendMessage")  # the drain can finish now
    assert await asyncio.to_thread(bot.process.wait, 30) == 0
    assert {p["chat_id"] for p in fake_tg.calls_of("sendMessage")} == set(range(601, 606))
    assert "[APP] stopped" in bot.log and "[QUEUE] Workers started" in bot.log and "[WEBHOOK] configured" in bot.log


def test_no_log_record_in_the_whole_suite_contains_a_secret():
    # Runs last in this file: every record the suite produced, at DEBUG, httpx's included.
    assert len(ALL_RECORDS.records) > 100
    assert any(r.name == "httpx" for r in ALL_RECORDS.records)
    leaked = [formatted(r) for r in ALL_RECORDS.records if any(s in formatted(r) for s in SECRETS)]
    assert leaked == []
