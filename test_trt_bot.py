"""Behaviour of trt_bot, grouped by the section of trt_bot.py each group covers.

End-to-end tests go through a real socket into the bot's HTTP server and real
HTTP out to the fake Bot API in conftest.py.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import gc
import gzip
import inspect
import itertools
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import string
import subprocess
import sys
import threading
import time
import urllib.parse

import httpx
import pytest
import respx

import trt_bot
from conftest import (DERIVED_SECRETS, HERE, KIE_KEY, POSTGRES_PASSWORD, SECRETS, TOKEN, ALL_RECORDS, InstantClock,
                      ManualClock, bot_env, bot_text, eventually, eventually_async, formatted, free_port, post_update,
                      run_bot_cli, says, secret_header, update_callback, update_message)

_real_sleep = asyncio.sleep


async def _fast_sleep(seconds: float) -> None:
    """Patched over asyncio.sleep where a test must not wait out real backoffs."""
    await _real_sleep(min(seconds, 0.01))


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

def test_missing_token_exits_2_with_one_line_saying_how_to_get_one():
    result = run_bot_cli({})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TELEGRAM_BOT_TOKEN" in lines[0] and "BotFather" in lines[0]


@pytest.mark.parametrize("env, names", [
    ({"TELEGRAM_BOT_TOKEN": "not-a-token"}, "TELEGRAM_BOT_TOKEN"),
    ({"TELEGRAM_BOT_TOKEN": TOKEN, "PORT": "eighty"}, "PORT"),
    ({"TELEGRAM_BOT_TOKEN": TOKEN, "BOT_MODE": "carrier-pigeon"}, "BOT_MODE"),
    ({"TELEGRAM_BOT_TOKEN": TOKEN, "DATABASE_URL": "mysql://db/x"}, "DATABASE_URL"),
    ({"TELEGRAM_BOT_TOKEN": TOKEN, "BOT_MODE": "webhook"}, "WEBHOOK_BASE_URL"),
    ({"TELEGRAM_BOT_TOKEN": TOKEN, "KIE_CALLBACK_PATH": "health"}, "KIE_CALLBACK_PATH"),
    ({"TELEGRAM_BOT_TOKEN": TOKEN, "DIAG_TOKEN": "short"}, "DIAG_TOKEN"),
])
def test_bad_setting_exits_2_naming_what_to_fix(env, names):
    result = run_bot_cli(env)
    assert result.returncode == 2
    assert names in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert TOKEN not in result.stderr


@pytest.mark.parametrize("name, raw", [
    ("TELEGRAM_SEND_RATE", "0"), ("TELEGRAM_SEND_RATE", "1001"), ("TELEGRAM_SEND_RATE", "fast"),
    ("TELEGRAM_CHAT_INTERVAL_S", "-1"), ("TELEGRAM_CHAT_INTERVAL_S", "nan"), ("TELEGRAM_CHAT_INTERVAL_S", "61"),
    ("TELEGRAM_GROUP_PER_MINUTE", "soon"), ("TELEGRAM_GROUP_PER_MINUTE", "-1"), ("TELEGRAM_GROUP_PER_MINUTE", "2.5"),
    ("OUTBOX_MAX_WAIT_S", "0"),
])
def test_every_send_limit_setting_is_validated_and_a_bad_value_exits_2(name, raw):
    result = run_bot_cli({"TELEGRAM_BOT_TOKEN": TOKEN, name: raw})
    assert result.returncode == 2
    assert name in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_send_limits_may_be_shrunk_for_tests_and_raised_for_paid_broadcasts():
    config = trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_SEND_RATE": "1000",
                                  "TELEGRAM_CHAT_INTERVAL_S": "0.05", "TELEGRAM_GROUP_PER_MINUTE": "0"})
    pacer = trt_bot.TelegramClient(TOKEN, API, httpx.AsyncClient(), send_limits=config.send_limits)
    assert pacer.interval_s == 0.001 and pacer.chat_interval_s == 0.05 and pacer.group_per_minute == 0


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


@pytest.mark.parametrize("path, says", [
    ("health", "collides with the bot's own route /health"),
    ("/metrics/", "collides with the bot's own route /metrics"),
    ("/", "collides with the bot's own route /"),
    ("diag", "collides with the bot's own route /diag/..."),
    ("diag/kie", "collides with the bot's own route /diag/..."),
    ("webhook/kie", "collides with the bot's own route /webhook/..."),
    ("webhook", "collides with the bot's own route /webhook/..."),
    ("callbacks/kie?x=1", "may hold only"),
    ("callbacks/k%69e", "may hold only"),
    ("callbacks//kie", "may hold only"),
    ("callbacks/../health", "may hold only"),
    ("кие", "may hold only"),
    ("a" * 101, "may hold only"),
])
def test_a_callback_path_that_shadows_a_builtin_route_or_has_odd_characters_is_refused(path, says):
    with pytest.raises(trt_bot.ConfigError, match="KIE_CALLBACK_PATH") as refused:
        trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, "KIE_CALLBACK_PATH": path})
    assert says in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("path, route", [
    ("", "callbacks/kie"), ("/kie/done/", "kie/done"), ("health-kie", "health-kie"), ("webhooks/kie", "webhooks/kie"),
    ("k.i~e_1-2", "k.i~e_1-2"),
])
def test_a_callback_path_of_its_own_is_accepted_without_its_slashes(path, route):
    assert trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, "KIE_CALLBACK_PATH": path}).kie_callback_path == route


@pytest.mark.parametrize("name", ["WEBHOOK_SECRET_TOKEN", "KIE_CALLBACK_TOKEN", "DIAG_TOKEN", "KIE_WEBHOOK_HMAC_KEY",
                                  "KIE_API_KEY"])
def test_a_secret_setting_shorter_than_8_characters_is_refused(name):
    with pytest.raises(trt_bot.ConfigError, match=name):
        trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, name: "abc1234"})
    assert trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, name: "abcd1234"})


def test_without_a_base_url_the_bot_polls_and_uses_the_default_database():
    config = trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN})
    assert config.bot_mode == "polling"
    assert config.database == "./data/trt_bot.sqlite3"
    assert trt_bot.parse_database_url("sqlite:////var/data/bot.db") == "/var/data/bot.db"
    assert trt_bot.parse_database_url("sqlite:///:memory:") == ":memory:"
    render = "postgres://bot:a-long-password@dpg-x.oregon-postgres.render.com/bot?sslmode=require"
    assert trt_bot.parse_database_url(render) == render  # Render's form, kept whole for libpq


def readme_settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for each variable in README.md's table; a `A` / `B` row gives two."""
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
        rows = [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in readme
                if line.startswith("| `")]
    table = []
    for cells in (row for row in rows if len(row) == 3 and row[0].strip("`").isupper()):
        names, defaults = cells[0].split(" / "), cells[1].split(" / ")
        defaults = defaults if len(defaults) == len(names) else [cells[1]] * len(names)
        table += [(name.strip("`"), default, cells[2]) for name, default in zip(names, defaults)]
    return table


def test_the_readme_lists_every_setting_with_its_default_and_nothing_else():
    documented = readme_settings_table()
    in_code = [(s.name, s.shown_default or (f"`{s.default}`" if s.default else "empty"), s.help)
               for s in trt_bot.SETTINGS]
    assert [row for row in in_code if row not in documented] == []  # a setting the README lacks or misstates
    assert [row for row in documented if row not in in_code] == []  # a README row no setting backs
    assert [f.name for f in dataclasses.fields(trt_bot.Config)] == [s.field for s in trt_bot.SETTINGS]


def test_every_setting_default_is_a_value_its_own_parser_accepts():
    config = trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN})
    for setting in trt_bot.SETTINGS[1:]:
        if setting.default:
            assert getattr(config, setting.field) == setting.parse(setting.name, setting.default)


@pytest.mark.parametrize("name, raw", [
    ("SINGLE_MODEL_ONLY", "maybe"), ("UPDATE_QUEUE_WORKERS", "0"), ("LEASE_TTL_S", "1"), ("LOG_LEVEL", "LOUD"),
    ("TELEGRAM_API_BASE", "api.telegram.org"), ("ADMIN_IDS", "1,two"), ("WEBHOOK_SECRET_TOKEN", "has space!"),
    ("DATABASE_URL", "postgresql://bot:longpassword@db:5432"), ("DATABASE_URL", "postgres://bot:short@db/x"),
    ("DATABASE_URL", "postgresql://db/x?password=short"), ("DATABASE_URL", "postgresql://db:port/x"),
])
def test_every_kind_of_bad_value_is_refused_naming_its_variable(name, raw):
    with pytest.raises(trt_bot.ConfigError, match=name):
        trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, name: raw})


@pytest.mark.parametrize("name, raw, field, value", [  # each limit itself is allowed
    ("TELEGRAM_CHAT_INTERVAL_S", "60", "telegram_chat_interval_s", 60.0),
    ("TELEGRAM_CHAT_INTERVAL_S", "0", "telegram_chat_interval_s", 0.0),
    ("WEBHOOK_FLUSH_PENDING_OVER", "0", "flush_pending_over", 0),
    ("WEBHOOK_FLUSH_PENDING_OVER", "-1", "flush_pending_over", -1),
    ("KIE_API_KEY", "12345678", "kie_api_key", "12345678"),
    ("SINGLE_MODEL_ONLY", "Yes", "single_model_only", True), ("SINGLE_MODEL_ONLY", "off", "single_model_only", False),
    ("DATABASE_URL", "postgresql://bot:12345678@db/x", "database", "postgresql://bot:12345678@db/x"),
    ("DATABASE_URL", "postgresql://db/x?password=12345678", "database", "postgresql://db/x?password=12345678"),
])
def test_a_value_at_a_settings_limit_is_accepted(name, raw, field, value):
    assert getattr(trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, name: raw}), field) == value


@pytest.mark.parametrize("name, raw", [
    ("TELEGRAM_CHAT_INTERVAL_S", "60.001"), ("WEBHOOK_FLUSH_PENDING_OVER", "-2"), ("KIE_API_KEY", "1234567"),
    ("DATABASE_URL", "postgresql://bot:1234567@db/x"),
])
def test_a_value_just_past_a_settings_limit_is_refused(name, raw):
    with pytest.raises(trt_bot.ConfigError, match=name):
        trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, name: raw})


def test_a_database_url_of_another_kind_is_refused_naming_its_scheme():
    with pytest.raises(trt_bot.ConfigError, match="starting with 'mysql'"):
        trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, "DATABASE_URL": "mysql://bot:12345678@db/x"})


###############################################################################
# 2. Logging: secrets never reach a log record
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


def test_every_secret_and_what_is_derived_from_one_is_masked_in_its_url_encoded_forms_too():
    config = trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, "WEBHOOK_BASE_URL": "https://bot.example.com",
                                  "KIE_API_KEY": KIE_KEY, "KIE_CALLBACK_TOKEN": "cb/token+with=marks",
                                  "DIAG_TOKEN": "diag token&more", "KIE_WEBHOOK_HMAC_KEY": "hmac-key-0123"})
    callback_url = "https://bot.example.com/callbacks/kie?" + urllib.parse.urlencode({"token": "cb/token+with=marks"})
    lines = [config.webhook_url, config.webhook_secret, callback_url, "cb/token+with=marks",
             urllib.parse.quote("cb/token+with=marks", safe=""), "Bearer diag token&more",
             "/metrics?" + urllib.parse.urlencode({"token": "diag token&more"}), "hmac-key-0123", TOKEN, KIE_KEY]
    masked = [trt_bot.mask_secrets(line, config.secrets) for line in lines]
    assert masked[0] == "https://bot.example.com/webhook/***" and masked[2].endswith("?token=***")
    for line in masked:
        assert "***" in line
        for secret in ("cb/token", "token+with", "cb%2Ftoken", "diag token", "diag+token", "hmac-key-0123",
                       config.webhook_secret, config.webhook_path_secret, *SECRETS):
            assert secret not in line


async def test_a_handler_error_on_the_webhook_path_logs_the_path_masked(make_app, caplog, monkeypatch):
    # Regression: the traceback line named the secret-derived webhook path.
    app = await make_app()

    async def broken(update: dict, body: bytes) -> trt_bot.Admission:
        raise RuntimeError("ingest broke")

    monkeypatch.setattr(app.pipeline, "ingest", broken)
    assert (await post_update(app, update_message(1, 42, "/start"))).status_code == 500
    failures = [formatted(r) for r in caplog.records if r.levelno >= logging.ERROR]
    assert [line for line in failures if "ingest broke" in line and "/webhook/***" in line]
    assert not [line for line in failures if app.config.webhook_path_secret in line]


async def test_a_kie_error_echoing_the_callback_url_is_logged_with_the_token_masked(make_app, fake_tg, fake_kie,
                                                                                    caplog):
    # Regression: Kie echoed callBackUrl in an error message and the log showed token=<callback token>.
    app = await make_app(KIE_API_KEY=KIE_KEY, KIE_API_BASE=fake_kie.base_url, KIE_CALLBACK_TOKEN="cb/token+with=marks")
    callback_url = "https://bot.example.com/callbacks/kie?" + urllib.parse.urlencode({"token": "cb/token+with=marks"})
    fake_kie.script("createTask", 200, {"code": 422, "msg": f"callBackUrl {callback_url} is not allowed"})
    await post_update(app, update_callback(1, 77, "new"))
    await post_update(app, update_message(2, 77, "a cat"))
    await post_update(app, update_callback(3, 77, "ratio:1:1"))
    echoed = await eventually(lambda: [formatted(r) for r in caplog.records if "is not allowed" in r.getMessage()])
    assert all("callbacks/kie?token=*** is not allowed" in line for line in echoed)
    assert not [r for r in caplog.records if "token%2B" in formatted(r) or "cb/token" in formatted(r)]


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


LINE = "malformed request line"
HEADER = "malformed header line"
BAD_LENGTH = "invalid Content-Length"
ONE_HOST = "exactly one Host header"
BARE_LF = "bare LF"
# Each case has its Host, so it fails for its own reason, not for a missing Host.
BAD_REQUESTS = [
    # (label, bytes, status, reason)
    ("garbage request line", b"HELLO\r\nHost: a\r\n\r\n", 400, LINE),
    ("missing version", b"GET /\r\nHost: a\r\n\r\n", 400, LINE),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "only HTTP/1.0 and HTTP/1.1"),
    ("absolute-form target", b"GET http://x/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "target must be a path"),
    ("TLS handshake on plain port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "not HTTP"),
    ("NUL first byte", b"\x00GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "not HTTP"),
    ("header without colon", b"GET / HTTP/1.1\r\nHost: a\r\nX a\r\n\r\n", 400, HEADER),
    ("header without colon, then a bad value", b"GET / HTTP/1.1\r\nHost: a\r\nXa\r\nY: a\x00b\r\n\r\n", 400, HEADER),
    ("space before the first header, then a bad value", b"GET / HTTP/1.1\r\n X: a\r\nY: \x00\r\nHost: a\r\n\r\n", 400,
     HEADER),
    ("whitespace before colon", b"GET / HTTP/1.1\r\nHost: a\r\nX : a\r\n\r\n", 400, HEADER),
    ("obs-fold continuation", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n  b\r\n\r\n", 400, HEADER),
    ("NUL in header value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400, "invalid character"),
    ("bare LF in header value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nb: c\r\n\r\n", 400, BARE_LF),
    ("CR in header name", b"GET / HTTP/1.1\r\nHost: a\r\nX\rY: a\r\n\r\n", 400, HEADER),
    ("Content-Length not a number", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: asdf\r\n\r\n", 400, BAD_LENGTH),
    ("Content-Length with junk", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1x\r\n\r\n", 400, BAD_LENGTH),
    ("Content-Length of 21 digits",
     b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"1" * 21 + b"\r\n\r\n", 400, BAD_LENGTH),
    ("negative Content-Length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400, BAD_LENGTH),
    ("empty Content-Length", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", 400, BAD_LENGTH),
    ("conflicting Content-Length",
     b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400, "conflicting"),
    ("conflicting Content-Length list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\n", 400,
     "conflicting"),
    ("Content-Length and Transfer-Encoding",
     b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
     "both Content-Length and Transfer-Encoding"),
    ("chunked body", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, "chunked"),
    ("unknown transfer coding", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
     "unsupported Transfer-Encoding"),
    ("body over the limit", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1048577\r\n\r\n", 413, "too large"),
    ("headers over the limit, head complete", b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 17000 + b"\r\n\r\n",
     431, "headers too large"),
    ("headers over the limit, head unfinished", b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 17000, 431,
     "headers too large"),
    # These used to raise UnicodeDecodeError (no answer, a traceback in the log) or wait 10 s for a 408.
    ("non-ASCII byte in the target", b"GET /health\xff HTTP/1.1\r\nHost: a\r\n\r\n", 400, LINE),
    ("non-ASCII byte in the method", b"G\xc9T / HTTP/1.1\r\nHost: a\r\n\r\n", 400, LINE),
    ("bare LF request line", b"GET / HTTP/1.1\n\n", 400, BARE_LF),
    ("bare LF after a header", b"GET / HTTP/1.1\r\nHost: a\n\r\n", 400, BARE_LF),
    ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\nX: a\r\n\r\n", 400, ONE_HOST),
    ("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", 400, ONE_HOST),
]


@pytest.mark.parametrize("label, data, status, reason", BAD_REQUESTS, ids=[row[0] for row in BAD_REQUESTS])
@pytest.mark.parametrize("how", ["whole", "bytewise", "with trailing data"])
def test_bad_request_gets_its_status_and_reason(label, data, status, reason, how):
    if how == "with trailing data":
        data += GOOD
    with pytest.raises(trt_bot.HttpError) as caught:
        parse_all(data, bytewise=how == "bytewise")
    assert (caught.value.status, reason in caught.value.reason) == (status, True), caught.value.reason


@pytest.mark.parametrize("lengths", [b" 2, 2", b" 2,2", b"2,2", b" 2\r\nContent-Length: 2", b"2\r\nContent-Length:2"])
def test_repeated_content_lengths_that_agree_are_one_length(lengths):
    (request,) = parse_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length:" + lengths + b"\r\n\r\n{}")
    assert request.body == b"{}"


@pytest.mark.parametrize("length, status", [(1024 * 1024, None), (1024 * 1024 + 1, 413)])
def test_a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_413(length, status):
    parser = trt_bot.RequestParser()
    parser.feed(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % length)
    if status is None:
        assert parser.next_request() is None  # waiting for the body
    else:
        with pytest.raises(trt_bot.HttpError) as caught:
            parser.next_request()
        assert caught.value.status == status


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_request_parses_whole_or_one_byte_at_a_time(how):
    (request,) = parse_all(GOOD, bytewise=how == "bytewise")
    assert (request.method, request.path, request.body, request.keep_alive) == ("POST", "/x", b"{}", True)
    assert request.headers == {"host": "a", "content-length": "2"}


def test_a_one_letter_header_name_first_is_a_header_like_any_other():
    (request,) = parse_all(b"GET / HTTP/1.1\r\nX: 1\r\nHost: a\r\n\r\n")
    assert request.headers == {"x": "1", "host": "a"}


@pytest.mark.parametrize("data", [
    b"\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # after an empty line, which is skipped
    GOOD + b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # at the start of the next request on the connection
])
def test_a_bare_lf_first_is_refused_as_a_bare_lf(data):
    with pytest.raises(trt_bot.HttpError) as caught:
        parse_all(data)
    assert "bare LF" in caught.value.reason


def test_a_head_of_exactly_the_limit_is_read_and_one_byte_more_is_431():
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX: "
    head += b"a" * (100 - len(head) - 4) + b"\r\n\r\n"  # 100 bytes, the blank line's included
    (request,) = parse_all(head, max_head=100 - 4)  # the limit counts the head before its blank line
    assert request.headers["x"].startswith("a")
    for unfinished in (head[:96], head[:97]):  # no blank line yet: up to the limit it is waited for, then refused
        parser = trt_bot.RequestParser(max_head=96)
        parser.feed(unfinished)
        if len(unfinished) <= 96:
            assert parser.next_request() is None
        else:
            with pytest.raises(trt_bot.HttpError) as caught:
                parser.next_request()
            assert caught.value.status == 431
    with pytest.raises(trt_bot.HttpError) as caught:
        parse_all(head, max_head=100 - 5)
    assert caught.value.status == 431


def test_bare_lf_is_refused_as_soon_as_it_arrives_not_after_a_blank_line():
    parser = trt_bot.RequestParser()
    parser.feed(b"GET / HTTP/1.1\r")
    assert parser.next_head() is None
    parser.feed(b"\nHost: a\n")
    with pytest.raises(trt_bot.HttpError) as caught:
        parser.next_head()
    assert caught.value.status == 400


def test_http10_request_may_omit_host():
    (request,) = parse_all(b"GET / HTTP/1.0\r\n\r\n")
    assert request.version == "1.0"


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_head_comes_out_before_its_body_and_the_request_once_the_body_is_complete(how):
    parser = trt_bot.RequestParser()
    head, heads = GOOD[:-2], []
    for piece in ([head[i:i + 1] for i in range(len(head))] if how == "bytewise" else [head]):
        parser.feed(piece)
        heads.append(parser.next_head())
    assert heads[-1] is not None and not any(heads[:-1])
    assert (heads[-1].path, heads[-1].content_length, heads[-1].body) == ("/x", 2, b"")
    assert parser.next_request() is None
    parser.feed(b"{}")
    assert parser.next_request() is heads[-1] and heads[-1].body == b"{}"


def test_undecodable_query_escapes_never_raise():
    (request,) = parse_all(b"GET /x?token=%ff%fe&%=&a=%zz&&b HTTP/1.1\r\nHost: a\r\n\r\n")
    assert request.query == {"token": "\ufffd\ufffd", "a": "%zz"}


def test_pipelined_requests_come_out_one_per_call_and_partial_body_waits():
    requests = parse_all(GOOD + b"GET /h?token=abc HTTP/1.0\r\n\r\n" + GOOD[:-1])
    assert [r.path for r in requests] == ["/x", "/h"]
    assert requests[1].query == {"token": "abc"} and requests[1].keep_alive is False


def test_leading_empty_lines_and_repeated_equal_content_length_are_accepted():
    (request,) = parse_all(b"\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi")
    assert request.body == b"hi"


def test_connection_close_and_http10_keep_alive_are_honoured():
    (close,) = parse_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
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
    answer = await raw_exchange(app.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", chunk=1)
    assert answer.startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("data, status", [
    (b"BREW /coffee HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"404"),
    (b"DELETE /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"405"),
    (b"GET /x HTTP/1.1\r\nContent-Length: zz\r\n\r\n", b"400"),
    (b"POST / HTTP/1.1\r\nContent-Length: 9999999\r\n\r\n", b"413"),
    (b"GET / HTTP/1.1\r\nX: " + b"y" * 20000 + b"\r\n\r\n", b"431"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"411"),
    (b"GET /health\xff HTTP/1.1\r\nHost: x\r\n\r\n", b"400"),  # used to get no answer and log a traceback
    (b"GET / HTTP/1.1\n\n", b"400"),  # used to wait 10 s for a 408
    (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
])
async def test_bad_input_over_a_socket_gets_its_status_without_a_traceback(make_app, data, status):
    app = await make_app()
    seen = len(ALL_RECORDS.records)
    answer = await raw_exchange(app.port, data)
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == status
    assert b"Traceback" not in answer
    assert not [formatted(r) for r in ALL_RECORDS.records[seen:] if r.levelno >= logging.ERROR]


async def test_wrong_method_lists_allowed_ones_and_head_mirrors_get(make_app):
    app = await make_app()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}") as client:
        wrong = await client.delete("/health")
        head = await client.head("/health")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, HEAD"
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0


HEAD_REFUSALS = [
    # (request target, extra header lines, status); each head announces a 1 MiB body that never comes
    ("{webhook}", "", b"401"),
    ("{webhook}", "X-Telegram-Bot-Api-Secret-Token: wrong\r\n", b"401"),
    ("{webhook}", "X-Telegram-Bot-Api-Secret-Token: \u00ff\r\n", b"401"),
    ("/webhook/guess", "", b"401"),
    ("/nowhere", "", b"404"),
    ("/health", "", b"405"),
    ("/callbacks/kie?token=wrong", "", b"401"),
    ("/callbacks/kie?token=%ff%fe", "", b"401"),
]


@pytest.mark.parametrize("target, headers, status", HEAD_REFUSALS)
async def test_a_wrong_route_or_secret_is_answered_from_the_head_without_reading_the_body(
        make_app, target, headers, status):
    app = await make_app()
    head = (f"POST {target.format(webhook=app.config.webhook_path)} HTTP/1.1\r\nHost: x\r\n{headers}"
            f"Content-Length: 1048576\r\n\r\n")
    answer = await raw_exchange(app.port, head.encode())  # used to wait for the body, then 408
    assert answer.split(b" ", 2)[1] == status and b"Connection: close" in answer


async def test_diagnostics_with_a_wrong_or_undecodable_token_get_401(make_app):
    app = await make_app(DIAG_TOKEN="diag-token-0123456789")
    for head in (b"GET /diag/lock?token=%ff%fe HTTP/1.1\r\nHost: x\r\n",
                 b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xe9t\xe9\r\n"):
        answer = await raw_exchange(app.port, head + b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401") and b"WWW-Authenticate: Bearer" in answer
    answer = await raw_exchange(app.port, b"GET /diag/lock?token=diag-token-0123456789 HTTP/1.1\r\nHost: x\r\n"
                                          b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")


async def say_hi(request: trt_bot.Request) -> trt_bot.Response:
    return trt_bot.text_response(200, "hi")


def held_handler(answer: str) -> tuple[list, asyncio.Event, trt_bot.RequestHandler]:
    """A handler that records each request it gets and answers ``answer`` once the event is set."""
    entered: list[trt_bot.Request] = []
    release = asyncio.Event()

    async def handler(request: trt_bot.Request) -> trt_bot.Response:
        entered.append(request)
        await release.wait()
        return trt_bot.text_response(200, answer)

    return entered, release, handler


@contextlib.asynccontextmanager
async def running_server(handler=say_hi, **limits):
    """A bare HttpServer on a free port, for the server's own limits."""
    server = trt_bot.HttpServer(handler, limits=trt_bot.HttpLimits(**limits))
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, port
    finally:
        await server.close()


async def open_non_reading_client(port: int, requests: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A client with a tiny receive window that sends ``requests`` (pipelined) and never reads the answers."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(requests)
    return reader, writer


async def read_until_closed(reader: asyncio.StreamReader) -> int:
    """How many bytes arrive before the server closes or resets the connection."""
    received = 0
    with contextlib.suppress(ConnectionResetError):
        while data := await reader.read(1 << 20):
            received += len(data)
    return received


async def test_slowloris_client_is_cut_off_with_408():
    async with running_server(request_timeout=0.3, idle_timeout=5) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nX-Slow: ")
        answer = await asyncio.wait_for(reader.read(), 5)
        assert answer.startswith(b"HTTP/1.1 408")


async def test_idle_keep_alive_connection_is_closed_after_the_timeout():
    async with running_server(idle_timeout=0.2) as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"hi\n"), 5)
        rest = await asyncio.wait_for(reader.read(), 5)  # EOF once the idle timeout passes
        assert first.startswith(b"HTTP/1.1 200") and rest == b""


async def test_a_client_that_does_not_read_is_cut_after_the_write_timeout():
    handled = []

    async def large(request: trt_bot.Request) -> trt_bot.Response:
        handled.append(request)
        return trt_bot.Response(200, b"x" * 256 * 1024)

    async with running_server(large, write_timeout=0.3, request_timeout=60, idle_timeout=60) as (server, port):
        reader, writer = await open_non_reading_client(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 100)
        await eventually(lambda: server.phase_counts()["writing"] == 1)
        assert len(handled) < 100  # no further request is read while answers pile up unread
        await eventually(lambda: server.open_connections == 0)  # used to wait in drain() forever
        received = await asyncio.wait_for(read_until_closed(reader), 10)
        assert received < 100 * 256 * 1024
        writer.close()


async def test_clients_that_do_not_read_cannot_starve_the_webhook(make_app, fake_tg):
    app = await make_app()
    app.server.limits = trt_bot.HttpLimits(max_connections=3, max_unsent=1024)
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    clients = [await open_non_reading_client(app.port, health * 20000) for _ in range(3)]
    await eventually(lambda: app.server.phase_counts()["writing"] == 3)  # each stalled on answers it does not read
    response = await post_update(app, update_message(1, 42, "/start"))  # used to get 503: no place left
    assert response.status_code == 200
    for _, writer in clients:
        writer.transport.abort()


async def test_a_newcomer_to_a_full_server_evicts_the_longest_idle_connection():
    async with running_server(max_connections=2) as (_, port):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for reader, writer in held:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"hi\n"), 5)
        answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200")  # used to be 503
        (oldest_reader, _), (newer_reader, newer_writer) = held
        assert await asyncio.wait_for(oldest_reader.read(), 5) == b""
        newer_writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(newer_reader.readuntil(b"hi\n"), 5)).startswith(b"HTTP/1.1 200")
        for _, writer in held:
            writer.close()


async def test_a_full_server_refuses_with_503_only_when_every_connection_is_mid_request():
    entered, release, slow = held_handler("late")
    async with running_server(slow, max_connections=2) as (_, port):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for _, writer in held:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await eventually(lambda: len(entered) == 2)
        answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: " in answer
        release.set()
        for reader, writer in held:
            assert (await asyncio.wait_for(reader.readuntil(b"late\n"), 5)).startswith(b"HTTP/1.1 200")
            writer.close()


async def test_request_bodies_held_in_memory_are_bounded_across_connections():
    post = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n"
    async with running_server(max_buffered_body=100) as (server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post + b"\r\n")  # its body is still to come
        await eventually(lambda: server.buffered_body == 60)
        answer = await raw_exchange(port, post + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: " in answer
        writer.write(b"x" * 60)
        assert (await asyncio.wait_for(reader.readuntil(b"hi\n"), 5)).startswith(b"HTTP/1.1 200")
        await eventually(lambda: server.buffered_body == 0)
        answer = await raw_exchange(port, post + b"Connection: close\r\n\r\n" + b"x" * 60)
        assert answer.startswith(b"HTTP/1.1 200")
        writer.close()


async def test_closing_the_server_ends_every_connection_quietly():
    entered, _, stuck = held_handler("never")  # never released

    seen = len(ALL_RECORDS.records)
    server = trt_bot.HttpServer(stuck, limits=trt_bot.HttpLimits(max_connections=1))
    port = await server.start("127.0.0.1", 0)
    _, busy = await asyncio.open_connection("127.0.0.1", port)
    busy.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await eventually(lambda: entered)
    tasks_before = len(asyncio.all_tasks())
    _, refused = await asyncio.open_connection("127.0.0.1", port)  # over the bound, sends nothing
    await eventually(lambda: len(asyncio.all_tasks()) > tasks_before)
    await server.close(grace=0.2)
    # What the event loop's shutdown does to tasks still running: used to log CancelledError tracebacks.
    leftovers = asyncio.all_tasks() - {asyncio.current_task()}
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)
    await asyncio.sleep(0)
    assert not [formatted(r) for r in ALL_RECORDS.records[seen:] if r.levelno >= logging.ERROR]
    assert not leftovers
    busy.close()
    refused.close()


async def test_a_handler_that_raises_gives_500_without_a_traceback():
    async def broken(request):
        raise ValueError(f"secret detail {TOKEN}")

    async with running_server(broken) as (_, port):
        answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 500") and b"secret detail" not in answer


async def test_a_handler_that_overruns_its_deadline_gets_503():
    async def hanging(request):
        await asyncio.Event().wait()

    async with running_server(hanging, handler_timeout=0.2) as (_, port):
        answer = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: " in answer


async def test_an_idle_connection_is_closed_when_the_servers_clock_passes_its_deadline():
    clock = ManualClock()
    server = trt_bot.HttpServer(say_hi, limits=trt_bot.HttpLimits(idle_timeout=10), clock=clock)
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"hi\n"), 5)
        await eventually(lambda: clock.sleepers == 1)  # the sweeper waits on this clock, not on real time
        clock.advance(11)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert server.open_connections == 0
        writer.close()
    finally:
        await server.close()


###############################################################################
# 5. Storage
###############################################################################

async def test_schema_is_versioned_and_migrating_twice_is_harmless(tmp_path):
    path = str(tmp_path / "x.sqlite3")
    trt_bot.SqliteFile(path).connect(None).close()
    conn = trt_bot.SqliteFile(path).connect(None)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == trt_bot.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_commits_are_fsynced_before_they_are_reported(tmp_path):
    # NORMAL (1) in WAL mode loses the last commits when the machine loses power.
    conn = trt_bot.SqliteFile(str(tmp_path / "x.sqlite3")).connect(None)
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    conn.close()


def open_database(database_url: str, **options) -> trt_bot.Database:
    return trt_bot.Database(trt_bot.parse_database_url(database_url), **options)


async def test_migrating_twice_is_harmless_and_instances_opening_at_once_migrate_once(database_url):
    # Instances starting together on one empty database: each must find the schema complete, none fail.
    databases = [open_database(database_url, busy_timeout_ms=10_000) for _ in range(4)]
    assert await asyncio.gather(*(db.open() for db in databases)) == [True] * 4, [db.last_error for db in databases]
    await databases[0].close()
    again = open_database(database_url)
    assert await again.open() and await again.read(trt_bot.inbox_unhandled) == []
    for db in [again, *databases[1:]]:
        await db.close()


# "The next version" of the bot: one more migration, additive as every migration must be.
NEWER_MIGRATIONS = [*trt_bot.MIGRATIONS, [
    "CREATE TABLE stickers (file_id TEXT PRIMARY KEY, chat_id INTEGER NOT NULL)",
    "ALTER TABLE inbox ADD COLUMN source TEXT NOT NULL DEFAULT ''",
]]
NEWER_VERSION = len(NEWER_MIGRATIONS)


def inbox_item(update_id: int) -> trt_bot.InboxItem:
    return trt_bot.InboxItem(update_id, update_id, {}, b"{}", time.time())


async def test_the_old_bot_keeps_working_on_a_newer_bots_additive_schema_in_a_deploy_and_a_rollback(database_url):
    # The old instance of a zero-downtime deploy used to stop at its next reconnect ("schema is newer than this bot").
    old = open_database(database_url)
    assert await old.open()
    await old.write(trt_bot.inbox_insert, [inbox_item(1)])
    new = open_database(database_url, migrations=NEWER_MIGRATIONS)
    assert await new.open()  # the new instance migrates while the old one still runs
    assert await old.open(), old.last_error  # the old one reconnects (a lost connection, a restart)
    assert await old.write(trt_bot.inbox_insert, [inbox_item(2)]) == [True]  # into a table the migration changed
    assert await new.read(trt_bot.inbox_unhandled) == [(1, 1), (2, 2)]
    await new.close()
    await old.close()
    rolled_back = open_database(database_url)  # the new version rolled back: the old one starts again
    assert await rolled_back.open(), rolled_back.last_error
    assert await rolled_back.write(trt_bot.inbox_insert, [inbox_item(3)]) == [True]
    assert await rolled_back.read(rolled_back.dialect.schema_version) == NEWER_VERSION  # left as it is
    await rolled_back.close()


async def test_a_bot_refuses_clearly_a_schema_that_needs_a_newer_bot(database_url):
    # A change older bots cannot live with (a column renamed, say) records that they must refuse the database.
    needs_newer = [*trt_bot.MIGRATIONS, [*NEWER_MIGRATIONS[-1],
                                         f"INSERT INTO schema_readers(oldest) VALUES ({NEWER_VERSION})"]]
    newest = open_database(database_url, migrations=needs_newer)
    assert await newest.open()
    await newest.close()
    old = open_database(database_url)
    assert await old.open() is False and not old.ok
    assert (f"needs a bot that knows schema v{NEWER_VERSION} or newer; "
            f"this one knows v{trt_bot.SCHEMA_VERSION}") in old.last_error
    await old.close()
    newest = open_database(database_url, migrations=needs_newer)
    assert await newest.open()  # the bot that needs it still runs on it
    await newest.close()


def test_psycopg_is_imported_only_for_a_postgresql_url(tmp_path):
    script = ("import sys, trt_bot; config = trt_bot.load_config({'TELEGRAM_BOT_TOKEN': sys.argv[1], "
              "'DATABASE_URL': sys.argv[2]}); trt_bot.Database(config.database); print('psycopg' in sys.modules)")
    imported = [subprocess.run([sys.executable, "-c", script, TOKEN, url], capture_output=True, text=True, cwd=HERE,
                               check=True).stdout.strip()
                for url in (f"sqlite:///{tmp_path}/x.sqlite3", "postgresql://bot@db.example.com/bot")]
    assert imported == ["False", "True"]


def test_storage_sql_is_spelled_for_postgresql_placeholders_percent_signs_and_types():
    assert trt_bot.postgres_sql("SELECT a FROM t WHERE b=? AND c LIKE '%?' AND \"d?\"=?") == (
        "SELECT a FROM t WHERE b=%s AND c LIKE '%%?' AND \"d?\"=%s")
    assert trt_bot.postgres_ddl("CREATE TABLE t (a INTEGER, b REAL, c BLOB, d TEXT DEFAULT 'REAL')") == (
        "CREATE TABLE t (a BIGINT, b DOUBLE PRECISION, c BYTEA, d TEXT DEFAULT 'REAL')")


async def test_concurrent_inserts_share_commits_and_duplicates_are_detected(database_url):
    db = open_database(database_url)
    assert await db.open()
    items = [trt_bot.InboxItem(n % 150, 1, {}, b"{}", time.time()) for n in range(300)]
    results = await asyncio.gather(*(db.submit(trt_bot.inbox_insert, item) for item in items))
    assert sum(results) == 150  # each id is new exactly once
    assert db.batches[trt_bot.inbox_insert] < 50  # grouped, not one commit per insert
    await db.close()


async def test_two_instances_inserting_the_same_updates_at_once_store_each_once(database_url, monkeypatch):
    # Telegram may redeliver an update to the other instance while the first still commits it.  One row per
    # statement widens the window in which the two instances' row locks could cross (a deadlock).
    monkeypatch.setattr(trt_bot, "INBOX_INSERT_ROWS", 1)
    first, second = open_database(database_url, busy_timeout_ms=10_000), open_database(database_url,
                                                                                       busy_timeout_ms=10_000)
    assert await first.open() and await second.open()
    ids = list(range(1, 201))
    orders = [random.Random(seed).sample(ids, len(ids)) for seed in (1, 2)]
    for db in (first, second):
        db.batched(trt_bot.inbox_insert, max_batch=20)
    results = await asyncio.gather(*(db.submit(trt_bot.inbox_insert, trt_bot.InboxItem(n, n, {}, b"{}", time.time()))
                                     for db, order in zip((first, second), orders) for n in order))
    new_ids = sorted(n for n, new in zip([n for order in orders for n in order], results) if new)
    assert new_ids == ids and first.ok and second.ok  # each id new exactly once, nobody degraded
    await first.close()
    await second.close()


async def test_handled_updates_are_pruned_after_the_redelivery_window_and_unhandled_ones_never(database_url):
    db = open_database(database_url)
    assert await db.open()
    now = time.time()
    items = [trt_bot.InboxItem(n, n, {}, b"{}", now) for n in (1, 2, 3)]
    await db.write(trt_bot.inbox_insert, items)
    await db.write(trt_bot.inbox_mark_done, items[:2])
    assert await db.write(trt_bot.inbox_prune, now - trt_bot.INBOX_KEEP_DONE_S) == 0  # within the window: kept
    assert await db.write(trt_bot.inbox_prune, time.time() + 1) == 2
    assert await db.read(trt_bot.inbox_unhandled) == [(3, 3)]
    await db.close()


def dialogs(db: trt_bot.Database, clock: trt_bot.Clock = trt_bot.SYSTEM_CLOCK) -> trt_bot.Conversation:
    """A conversation with nowhere to send: what it keeps of the dialogs is all these tests read."""
    config = trt_bot.load_config({"TELEGRAM_BOT_TOKEN": "123:" + "a" * 35})
    return trt_bot.Conversation(config, None, db, None, clock=clock)


async def test_conversation_state_survives_a_reopen(database_url):
    path = trt_bot.parse_database_url(database_url)
    db = trt_bot.Database(path)
    await db.open()
    store = dialogs(db)
    await store.set((7, 0, 7), {"step": "prompt"})
    await store.set((8, 0, 8), {"step": "ratio"})
    await store.set((8, 0, 8), None)
    await db.close()
    db = trt_bot.Database(path)
    await db.open()
    reloaded = dialogs(db)
    assert await reloaded.load() == 1 and reloaded.get((7, 0, 7)) == {"step": "prompt"} and reloaded.get((8, 0, 8)) is None
    await db.close()


async def test_a_users_dialogs_in_two_chats_and_two_forum_topics_are_stored_apart(database_url):
    db = open_database(database_url)
    await db.open()
    store = dialogs(db)
    await store.set((7, 0, 7), {"step": "prompt"})
    await store.set((-100, 0, 7), {"step": "ratio"})
    await store.set((-100, 5, 7), {"step": "option"})  # another topic of the same group
    await store.set((-100, 0, 7), None)
    reloaded = dialogs(db)
    assert await reloaded.load() == 2 and reloaded.get((-100, 0, 7)) is None
    assert reloaded.get((7, 0, 7)) == {"step": "prompt"} and reloaded.get((-100, 5, 7)) == {"step": "option"}
    await db.close()


async def dialogs_kept(store: trt_bot.Conversation, db: trt_bot.Database) -> tuple[int, int]:
    """How many dialogs the store holds in memory, and how many rows the database has."""
    rows = await db.read(lambda conn: conn.execute("SELECT count(*) FROM topic_dialogs").fetchone()[0])
    return len(store.dialogs), rows


async def test_an_abandoned_dialog_leaves_memory_and_the_database_after_its_idle_time(database_url):
    clock = ManualClock()
    db = open_database(database_url)
    await db.open()
    store = dialogs(db, clock)
    await store.set((7, 0, 7), {"step": "prompt"})  # the user never answers
    clock.advance(trt_bot.DIALOG_IDLE_S - 1)
    assert store.get((7, 0, 7)) == {"step": "prompt"}
    clock.advance(1)
    assert store.get((7, 0, 7)) is None  # its buttons are stale from now on
    await store.set((8, 0, 8), {"step": "prompt"})  # any write sweeps the abandoned ones out
    assert await dialogs_kept(store, db) == (1, 1)
    clock.advance(trt_bot.DIALOG_IDLE_S)
    reloaded = dialogs(db, clock)
    assert await reloaded.load() == 0  # nor does a restart bring one back
    await db.close()


async def test_dialogs_beyond_the_bound_go_longest_untouched_first(database_url, monkeypatch):
    monkeypatch.setattr(trt_bot, "DIALOGS_MAX", 2)
    clock = ManualClock()
    db = open_database(database_url)
    await db.open()
    store = dialogs(db, clock)
    for user in (1, 2, 3):
        await store.set((user, 0, user), {"step": "prompt"})
        clock.advance(1)
    await store.set((1, 0, 1), {"step": "ratio"})  # touched again: now the newest
    assert [store.get((user, 0, user)) is not None for user in (1, 2, 3)] == [True, False, True]
    reloaded = dialogs(db, clock)
    assert await reloaded.load() == 2 and reloaded.get((2, 0, 2)) is None
    await db.close()


async def test_a_dialog_stored_before_dialogs_had_chats_goes_on_in_the_users_private_chat(make_app, fake_tg,
                                                                                        tmp_path):
    conn = sqlite3.connect(tmp_path / "bot.sqlite3")  # the database as the bot of schema v6 left it
    for statement in itertools.chain(*trt_bot.MIGRATIONS[:6]):
        conn.execute(statement)
    state = {"step": "prompt", "model": "z-image", "lang": "en"}
    conn.execute("INSERT INTO conversations VALUES (42, ?, ?)", (json.dumps(state), time.time()))
    conn.execute("PRAGMA user_version = 6")
    conn.commit()
    conn.close()
    app = await make_app(KIE_API_KEY=KIE_KEY)
    await post_update(app, update_message(1, 42, "a cat", lang="ru"))
    (question,) = await eventually(lambda: fake_tg.texts_to(42))
    assert question == trt_bot.render("en", "ask_ratio", prompt="a cat")


async def test_an_unopenable_database_is_reported_not_raised(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    db = trt_bot.Database(str(blocker / "bot.sqlite3"))
    assert await db.open() is False and not db.ok and db.last_error
    with pytest.raises(trt_bot.DatabaseUnavailable):
        await db.read(trt_bot.inbox_unhandled)
    await db.close()


async def test_a_row_the_database_refuses_fails_alone_and_the_rest_of_its_batch_is_written(database_url):
    # Used to fail every item of the shared commit, with the database still "ok".
    db = open_database(database_url)
    assert await db.open()
    items = [trt_bot.InboxItem(n, 2**70 if n == 13 else n, {}, b"{}", time.time()) for n in range(40)]
    first_record = len(ALL_RECORDS.records)
    results = await asyncio.gather(*(db.submit(trt_bot.inbox_insert, item) for item in items), return_exceptions=True)
    assert isinstance(results[13], trt_bot.RowRejected)
    assert results[:13] + results[14:] == [True] * 39 and db.ok
    assert len(await db.read(trt_bot.inbox_unhandled)) == 39
    refusals = [r for r in ALL_RECORDS.records[first_record:] if "refused" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.ERROR
    await db.close()


def hold_write_lock(path: str) -> sqlite3.Connection:
    """Another connection (as another process would) holding SQLite's write lock until it rolls back."""
    locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    locker.execute("BEGIN EXCLUSIVE")
    return locker


async def test_a_lock_held_briefly_by_another_connection_is_waited_out_not_degraded(tmp_path):
    path = str(tmp_path / "x.sqlite3")
    db = trt_bot.Database(path)
    assert await db.open()
    locker = hold_write_lock(path)
    threading.Timer(0.05, locker.execute, ("ROLLBACK",)).start()
    assert await db.write(trt_bot.inbox_insert, [trt_bot.InboxItem(1, 1, {}, b"{}", time.time())]) == [True]
    assert db.ok
    locker.close()
    await db.close()


async def test_a_new_file_another_connection_writes_before_it_is_in_wal_mode_is_waited_for_not_degraded(tmp_path):
    # SQLite skips its busy handler when turning such a file to WAL: instances opening a new database together
    # used to fail at random with "database is locked".
    path = str(tmp_path / "x.sqlite3")
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("CREATE TABLE another_bots (n INTEGER)")  # its write lock, still in the rollback journal mode
    threading.Timer(0.05, writer.execute, ("COMMIT",)).start()
    db = trt_bot.Database(path, busy_timeout_ms=10_000)
    assert await db.open(), db.last_error
    writer.close()
    await db.close()


async def test_a_deleted_database_file_is_noticed_and_a_new_file_takes_over_what_it_held(tmp_path):
    path = str(tmp_path / "x.sqlite3")
    db = trt_bot.Database(path)
    assert await db.open()
    items = [trt_bot.InboxItem(n, n, {}, b"{}", time.time()) for n in (1, 2, 3)]
    await db.write(trt_bot.inbox_insert, items)
    await db.write(trt_bot.inbox_mark_done, items[:1])
    for suffix in ("", "-wal", "-shm"):
        os.unlink(path + suffix)
    assert await db.verify() is False and not db.ok and "deleted or replaced" in db.last_error
    assert await db.open()
    with sqlite3.connect(path) as fresh:  # the file now on disk holds the unhandled updates
        assert fresh.execute("SELECT update_id FROM inbox WHERE done_at IS NULL").fetchall() == [(2,), (3,)]
    await db.close()


async def test_a_write_into_a_file_deleted_under_us_fails_instead_of_being_acknowledged(tmp_path):
    path = str(tmp_path / "x.sqlite3")
    db = trt_bot.Database(path)
    assert await db.open()
    os.unlink(path)
    with pytest.raises(trt_bot.DatabaseUnavailable):
        await db.write(trt_bot.inbox_insert, [trt_bot.InboxItem(1, 1, {}, b"{}", time.time())])
    assert not db.ok
    await db.close()


def test_an_insert_that_asks_reads_its_chats_older_unhandled_updates_in_the_same_transaction():
    def item(update_id: int, chat_key: int, ask: bool = False, done: bool = False) -> trt_bot.InboxItem:
        return trt_bot.InboxItem(update_id, chat_key, {}, b"{}", time.time(), ask_older=ask, done=done)

    with contextlib.closing(trt_bot.SqliteFile(":memory:").connect(None)) as conn:
        trt_bot.inbox_insert(conn, [item(1, 7), item(2, 8), item(3, 7), item(4, 7)])
        trt_bot.inbox_mark_done(conn, [item(3, 7)])
        asking, again, silent = item(5, 7, ask=True), item(4, 7, ask=True), item(6, 7)
        assert trt_bot.inbox_write_reading_older(conn, [asking, again, silent, item(2, 8, done=True)]) == [
            True, False, True, None]
        assert (asking.older, again.older, silent.older) == ((1, 4), (), ())  # not 3 (done), 2 (another chat)
        statements: list[str] = []
        conn.set_trace_callback(statements.append)
        assert trt_bot.inbox_unhandled_before(conn, 7, 9) == [1, 4, 5, 6]
        conn.set_trace_callback(None)
        plan = " ".join(str(row) for row in conn.execute("EXPLAIN QUERY PLAN " + statements[-1]))
        assert "inbox_chat_pending" in plan  # the chat's own rows, not every unhandled one


async def test_a_value_the_driver_cannot_send_is_a_rejected_row_but_a_statement_the_database_refuses_degrades(
        database_url):
    # A missing table or missing rights is the database's state, not the row's: it must not turn every
    # update into a "bad update" that Telegram is told to drop.
    db = open_database(database_url)
    assert await db.open()
    with pytest.raises(trt_bot.RowRejected):
        await db.write(lambda conn: conn.execute("INSERT INTO users(user_id, first_seen, last_seen) VALUES (?,?,?)",
                                                 (object(), 0.0, 0.0)))
    assert db.ok
    with pytest.raises(trt_bot.DatabaseUnavailable):
        await db.write(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (?)", (1,)))
    assert not db.ok
    assert await db.open() and await db.read(trt_bot.inbox_unhandled) == []
    await db.close()


async def test_a_lost_postgresql_connection_degrades_and_a_reopen_recovers_it(postgres):
    url = postgres.new_database_url()
    db = open_database(url)
    assert await db.open()
    await db.write(trt_bot.inbox_insert, [trt_bot.InboxItem(1, 1, {}, b"{}", time.time())])
    assert postgres.terminate_connections(url) == 1  # the server ends our backend, as a restart would
    assert await db.verify() is False and not db.ok and db.last_error
    with pytest.raises(trt_bot.DatabaseUnavailable):
        await db.write(trt_bot.inbox_insert, [trt_bot.InboxItem(2, 2, {}, b"{}", time.time())])
    assert await db.open() and db.ok
    assert await db.write(trt_bot.inbox_insert, [trt_bot.InboxItem(2, 2, {}, b"{}", time.time())]) == [True]
    assert await db.read(trt_bot.inbox_unhandled) == [(1, 1), (2, 2)]
    await db.close()


@pytest.mark.parametrize("problem, says", [
    ("wrong password", "password authentication failed"),
    ("missing database", "does not exist"),
    ("nothing listening", "refused"),
])
async def test_a_postgresql_that_refuses_us_is_named_in_last_error_without_the_password(postgres, problem, says):
    wrong = "Wrong-Password-42"
    url = {"wrong password": postgres.url("postgres", password=wrong),
           "missing database": postgres.url("no_such_database"),
           "nothing listening": postgres.url("postgres").replace(f":{postgres.port}/", f":{free_port()}/")}[problem]
    db = open_database(url)
    assert await db.open() is False and not db.ok
    assert says in db.last_error and wrong not in db.last_error and POSTGRES_PASSWORD not in db.last_error
    assert POSTGRES_PASSWORD not in db.where and db.where.startswith("postgresql://127.0.0.1:")
    await db.close()


###############################################################################
# 6. Retry and pacing
###############################################################################

class Hiccup(Exception):
    """A failure a test scripts: transient or not, maybe saying how long to wait."""

    def __init__(self, transient: bool = True, wait: float | None = None):
        super().__init__(f"hiccup transient={transient} wait={wait}")
        self.transient, self.wait = transient, wait


def scripted(*outcomes):
    """An attempt that raises or returns ``outcomes`` in turn; ``attempt.calls`` counts the tries."""
    queue = list(outcomes)

    async def attempt():
        attempt.calls += 1
        outcome = queue.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    attempt.calls = 0
    return attempt


def hiccup_policy(**fields) -> trt_bot.RetryPolicy:
    return trt_bot.RetryPolicy(retry_on=(Hiccup,), transient=lambda error: error.transient,
                               retry_after=lambda error: error.wait, **fields)


async def test_a_call_is_retried_with_doubling_waits_until_it_succeeds():
    clock, retries = InstantClock(), []
    attempt = scripted(Hiccup(), Hiccup(), Hiccup(), "done")
    policy = hiccup_policy(budget_s=100.0, base_s=1.0, cap_s=60.0, jittered=False)
    result = await trt_bot.call_with_retries(attempt, policy, clock=clock,
                                             on_retry=lambda error, retry, wait: retries.append((retry, wait)))
    assert (result, attempt.calls, clock.slept) == ("done", 4, [1.0, 2.0, 4.0])
    assert retries == [(1, 1.0), (2, 2.0), (3, 4.0)]


async def test_an_unbounded_policy_keeps_trying_at_its_cap():
    """The shape of a set-up step that must succeed in the end: 1, 2, 4 ... 60, 60 s."""
    clock = InstantClock()
    attempt = scripted(*[Hiccup(transient=False)] * 9, "done")  # even a 400 is tried again: transient by default
    policy = trt_bot.RetryPolicy(retry_on=(Hiccup,), cap_s=60.0, jittered=False)
    assert await trt_bot.call_with_retries(attempt, policy, clock=clock) == "done"
    assert clock.slept == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]


def test_the_backoff_is_fully_jittered_below_a_doubling_ceiling():
    policy, ranges = trt_bot.RetryPolicy(base_s=1.0, cap_s=20.0), []

    def jitter(low: float, high: float) -> float:
        ranges.append((low, high))
        return (low + high) / 2

    assert [policy.delay(Hiccup(), retry, math.inf, jitter=jitter) for retry in (1, 2, 6)] == [0.5, 1.0, 10.0]
    assert ranges == [(0.0, 1.0), (0.0, 2.0), (0.0, 20.0)]  # anywhere from 0 up to the ceiling


async def test_a_failure_that_is_not_transient_is_raised_at_once_without_waiting():
    clock = InstantClock()
    attempt = scripted(Hiccup(transient=False), "never reached")
    with pytest.raises(Hiccup):
        await trt_bot.call_with_retries(attempt, hiccup_policy(), clock=clock)
    assert (attempt.calls, clock.slept) == (1, [])


async def test_an_error_the_policy_does_not_judge_propagates_untouched():
    clock = InstantClock()
    attempt = scripted(ValueError("a bug, not a hiccup"), "never reached")
    with pytest.raises(ValueError):
        await trt_bot.call_with_retries(attempt, hiccup_policy(), clock=clock)
    assert (attempt.calls, clock.slept) == (1, [])


async def test_a_zero_budget_means_one_try():
    clock = InstantClock()
    attempt = scripted(Hiccup(wait=0.0), "never reached")
    with pytest.raises(Hiccup):
        await trt_bot.call_with_retries(attempt, hiccup_policy(budget_s=0.0), clock=clock)
    assert (attempt.calls, clock.slept) == (1, [])


async def test_the_wait_a_failure_asks_for_is_honoured_unless_it_ends_past_the_budget():
    clock = InstantClock()
    attempt = scripted(Hiccup(wait=3.0), Hiccup(wait=20.0), "never reached")
    with pytest.raises(Hiccup) as caught:
        await trt_bot.call_with_retries(attempt, hiccup_policy(budget_s=10.0), clock=clock)
    assert (caught.value.wait, attempt.calls, clock.slept) == (20.0, 2, [3.0])


async def test_retries_stop_when_the_next_wait_would_end_past_the_budget():
    clock = InstantClock()
    attempt = scripted(*[Hiccup()] * 10)
    with pytest.raises(Hiccup):
        await trt_bot.call_with_retries(attempt, hiccup_policy(budget_s=10.0, cap_s=4.0, jittered=False), clock=clock)
    assert (attempt.calls, clock.slept) == (4, [1.0, 2.0, 4.0])  # a 4th wait of 4 s would end at 11 s


async def test_a_retry_waits_on_the_clock_it_is_given():
    clock = ManualClock()
    attempt = scripted(Hiccup(), "done")
    call = asyncio.create_task(trt_bot.call_with_retries(attempt, hiccup_policy(jittered=False), clock=clock))
    await eventually(lambda: clock.sleepers == 1)  # asleep on this clock, not on the event loop's
    assert attempt.calls == 1
    clock.advance(1.0)
    assert await call == "done" and attempt.calls == 2


async def test_rate_limiter_admits_at_most_its_calls_per_period():
    clock = InstantClock()
    limiter = trt_bot.RateLimiter(20, 10.0, clock=clock)
    stamps = []
    for _ in range(45):
        await limiter.acquire()
        stamps.append(clock.monotonic())
    for i in range(len(stamps) - 20):
        assert stamps[i + 20] - stamps[i] >= 10.0  # any 21 calls span at least one period
    assert stamps[19] == stamps[0]  # the first 20 go at once


def paced_client(rate: int = 30, chat_interval_s: float = 0.0, group_per_minute: int = 20,
                 clock: trt_bot.Clock = trt_bot.SYSTEM_CLOCK) -> trt_bot.TelegramClient:
    """A client whose sends are paced at these limits; its pacing is plain arithmetic on the times it is given."""
    return trt_bot.TelegramClient(TOKEN, API, httpx.AsyncClient(), clock=clock,
                                  send_limits=(rate, chat_interval_s, group_per_minute))


def test_the_pacer_spaces_sends_at_the_global_rate_whatever_the_chat():
    pacer = paced_client(rate=10, chat_interval_s=0, group_per_minute=0)
    assert pacer.send_wait(100.0) == 0
    pacer.take_send(100.0, 1)
    assert pacer.send_wait(100.0) == pytest.approx(0.1) and pacer.send_wait(100.05) == pytest.approx(0.05)
    assert pacer.chat_wait(100.0, 2) == 0  # the shared spacing is ``send_wait``'s, not a chat's
    pacer.take_send(100.1, 2)
    assert pacer.send_wait(100.1) == pytest.approx(0.1)


def test_a_sender_woken_late_keeps_its_place_so_the_rate_holds_and_no_second_holds_more():
    pacer = paced_client(rate=1000, chat_interval_s=0, group_per_minute=0)
    now, stamps = 0.0, []
    for _ in range(3000):  # every wake 0.3 ms late, as a busy event loop wakes its timers
        now += pacer.send_wait(now) + 0.0003
        pacer.take_send(now, 1)
        stamps.append(now)
    assert stamps[-1] - stamps[0] < 3.0  # at the rate: 3,000 in 3 s (without the slack: 3.9 s)
    most = max(bisect.bisect_left(stamps, stamp + 1.0) - i for i, stamp in enumerate(stamps))
    assert most <= 1000 * (1 + trt_bot.PACE_SLACK_S) + 1
    pacer.take_send(now + 1.0, 1)  # after a second without sends: a full spacing, nothing to catch up
    assert pacer.send_wait(now + 1.0) == pytest.approx(0.001)


def test_the_pacer_spaces_one_chat_by_its_interval_and_holds_a_group_to_20_in_any_minute():
    pacer = paced_client(rate=1000, chat_interval_s=1.0, group_per_minute=20)
    pacer.take_send(0.0, 5)
    assert pacer.chat_wait(0.5, 5) == pytest.approx(0.5)
    assert pacer.chat_wait(0.5, 6) == 0  # another chat is not held up
    assert pacer.chat_wait(1.0, 5) == 0
    for second in range(20):  # a group: one a second, like any chat ...
        assert pacer.chat_wait(float(second), -100) == 0
        pacer.take_send(float(second), -100)
    assert pacer.chat_wait(20.0, -100) == pytest.approx(40.0)  # ... and the 21st a minute after the first
    pacer.take_send(60.0, -100)
    assert pacer.chat_wait(61.0, -100) == 0  # the window slid: the second send is a minute old


def test_a_flood_pause_holds_every_chat_and_then_sends_resume_at_the_rate_not_in_a_burst():
    pacer = paced_client(rate=10, chat_interval_s=0, group_per_minute=0)
    pacer.pause_sends(50.0, 2.0)
    pacer.pause_sends(51.0, 0.5)  # a 429 during the pause: the same pause
    assert pacer.pauses == 1
    assert pacer.send_wait(51.0) == pytest.approx(1.0) and pacer.chat_wait(51.0, 7) == pytest.approx(1.0)
    assert pacer.send_wait(52.0) == 0
    pacer.take_send(52.0, 7)
    assert pacer.send_wait(52.0) == pytest.approx(0.1)
    pacer.pause_sends(60.0, 1.0)
    assert pacer.pauses == 2


def test_a_flood_pause_that_starts_as_the_last_one_ends_is_a_new_pause():
    pacer = paced_client(rate=10, chat_interval_s=0, group_per_minute=0)
    pacer.pause_sends(50.0, 2.0)
    pacer.pause_sends(51.5, 1.0)  # a 429 during the pause lengthens it
    assert pacer.pauses == 1 and pacer.send_wait(52.0) == 0.5
    pacer.pause_sends(52.5, 1.0)  # exactly when the last one ended
    assert pacer.pauses == 2 and pacer.send_wait(52.5) == 1.0


def test_a_pause_of_0_seconds_holds_nothing_back():
    pacer = paced_client(rate=10, chat_interval_s=0, group_per_minute=0)
    pacer.pause_sends(50.0, 0)  # a 429 with retry_after 0
    assert pacer.send_wait(50.0) == 0 and pacer.chat_wait(50.0, 7) == 0


def test_the_pacer_forgets_chats_whose_spacing_has_passed():
    pacer = paced_client(rate=1000, chat_interval_s=1.0, group_per_minute=20)
    for n in range(20_000):  # 20,000 chats, ten a second
        pacer.take_send(n / 10, n)
    assert pacer.chats_remembered <= trt_bot.PACER_PRUNE_AT
    assert pacer.chat_wait(1999.95, 19_999) > 0  # the recent ones are still spaced


def test_the_pacer_forgets_a_chat_the_moment_its_spacing_ends_and_prunes_when_its_memory_doubles():
    prune_at = trt_bot.PACER_PRUNE_AT
    pacer = paced_client(rate=10**6, chat_interval_s=1.0, group_per_minute=0)
    for chat in range(prune_at):
        pacer.take_send(0.0, chat)
    assert pacer.chats_remembered == prune_at  # pruned at the limit, but every spacing still runs
    for chat in range(prune_at, 2 * prune_at):
        pacer.take_send(1.0, chat)  # the first chats' spacing ends now
        assert pacer.chats_remembered == (chat + 1 if chat + 1 < 2 * prune_at else prune_at)  # next prune: at double


def test_a_group_is_forgotten_the_moment_its_minute_ends():
    prune_at = trt_bot.PACER_PRUNE_AT
    pacer = paced_client(rate=10**6, chat_interval_s=0, group_per_minute=20)
    for chat in range(1, prune_at + 1):
        pacer.take_send(0.0, -chat)
    for chat in range(prune_at + 1, 2 * prune_at + 1):
        pacer.take_send(trt_bot.GROUP_WINDOW_S, -chat)
    assert pacer.chats_remembered == prune_at  # the first groups' minute is over


def test_without_a_spacing_a_private_chat_is_not_remembered_and_has_no_group_limit():
    pacer = paced_client(rate=10**6, chat_interval_s=0, group_per_minute=2)
    for _ in range(3):
        pacer.take_send(0.0, 5)
    assert pacer.chats_remembered == 0 and pacer.chat_wait(0.0, 5) == 0


###############################################################################
# 7. Telegram client
###############################################################################

API = "https://api.telegram.org"


def bot_api_error(code: int, description: str, retry_after: int | None = None) -> httpx.Response:
    body: dict = {"ok": False, "error_code": code, "description": description}
    if retry_after is not None:
        body["parameters"] = {"retry_after": retry_after}
    return httpx.Response(code, json=body)


@pytest.fixture
def telegram():
    """A client whose retries wait on an InstantClock: ``client.clock.slept`` lists the waits it chose."""
    async def make(retry: trt_bot.RetryPolicy = trt_bot.TELEGRAM_RETRY):
        return trt_bot.TelegramClient(TOKEN, API, httpx.AsyncClient(), retry, clock=InstantClock())
    return make


@pytest.mark.parametrize("retry_after, waited", [(3, 3.0), ("soon", 1.0)])  # unreadable: a second
@respx.mock
async def test_429_waits_retry_after_then_succeeds(telegram, retry_after, waited):
    route = respx.post(f"{API}/bot{TOKEN}/sendMessage").mock(side_effect=[
        bot_api_error(429, "Too Many Requests: retry after 3", retry_after=retry_after),
        httpx.Response(200, json={"ok": True, "result": {"message_id": 5}}),
    ])
    client = await telegram()
    assert await client.send_message(1, "hi") == {"message_id": 5}
    assert route.call_count == 2 and client.clock.slept == [waited]


@respx.mock
async def test_502_and_network_errors_are_retried(telegram):
    route = respx.post(f"{API}/bot{TOKEN}/getMe").mock(side_effect=[
        httpx.Response(502, text="<html>Bad Gateway</html>"),
        httpx.ConnectError("refused"),
        httpx.Response(200, json={"ok": True, "result": {"id": 1}}),
    ])
    client = await telegram()
    assert await client.call("getMe") == {"id": 1} and route.call_count == 3
    assert client.calls["getMe", "502"] == client.calls["getMe", "599"] == client.calls["getMe", "ok"] == 1


@respx.mock
async def test_a_call_that_must_not_repeat_is_retried_only_when_it_never_reached_telegram(telegram):
    ok = httpx.Response(200, json={"ok": True, "result": {"message_id": 9}})
    route = respx.post(f"{API}/bot{TOKEN}/sendPhoto").mock(side_effect=[httpx.ConnectError("refused"), ok])
    client = await telegram()
    assert await client.call("sendPhoto", {"chat_id": 1}, repeatable=False) == {"message_id": 9}
    assert route.call_count == 2  # refused before it was sent: safe to send again

    route.side_effect = [httpx.ReadTimeout("no answer"), ok]
    route.reset()
    with pytest.raises(trt_bot.TelegramNetworkError) as lost:
        await client.call("sendPhoto", {"chat_id": 1}, repeatable=False)
    assert lost.value.maybe_performed and route.call_count == 1  # Telegram may have it: not sent twice


@pytest.mark.parametrize("budget_s, tries", [(20.0, 6), (40.0, 8)])
@respx.mock
async def test_transient_failures_are_retried_until_the_budget_is_spent_not_a_fixed_count(telegram, budget_s, tries):
    failures = [httpx.Response(502, text="<html>Bad Gateway</html>"), httpx.ConnectError("refused"),
                httpx.ReadTimeout("stalled"), httpx.RemoteProtocolError("dropped"),
                bot_api_error(500, "Internal Server Error"), bot_api_error(429, "Too Many Requests", retry_after=0)]
    route = respx.post(f"{API}/bot{TOKEN}/sendMessage").mock(
        side_effect=failures + [httpx.Response(200, json={"ok": True, "result": {"message_id": 5}})])
    # Without jitter each wait is its ceiling, so the test is the same on every run (it once failed 1 run in 75).
    client = await telegram(dataclasses.replace(trt_bot.TELEGRAM_RETRY, budget_s=budget_s, jittered=False))
    assert await client.send_message(1, "hi") == {"message_id": 5} and route.call_count == 7
    route.side_effect = itertools.repeat(httpx.Response(503, text="down"))
    client.clock.slept.clear()
    with pytest.raises(trt_bot.TelegramError) as caught:
        await client.send_message(1, "hi")
    assert caught.value.error_code == 503 and route.call_count == 7 + tries  # retried, then given up at the budget
    assert client.clock.slept[:3] == [1.0, 0.5, 0.5]  # the chat's spacing, then 0.5 s and the spacing's rest
    assert client.clock.slept[3:] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0][:tries - 2]  # doubling up to 8 s
    assert sum(client.clock.slept) + 8.0 > budget_s >= sum(client.clock.slept)  # one more wait would pass the budget


@respx.mock
async def test_a_429_asking_for_longer_than_the_budget_left_is_raised_at_once(telegram):
    route = respx.post(f"{API}/bot{TOKEN}/sendMessage").mock(
        return_value=bot_api_error(429, "Too Many Requests: retry after 40", retry_after=40))
    client = await telegram(dataclasses.replace(trt_bot.TELEGRAM_RETRY, budget_s=30))
    with pytest.raises(trt_bot.TelegramError) as caught:
        await client.send_message(1, "hi")
    assert (caught.value.error_code, caught.value.retry_after, route.call_count, client.clock.slept) == (429, 40, 1, [])


@respx.mock
async def test_a_send_whose_answer_was_lost_is_sent_again_at_least_once(telegram):
    """Telegram may have shown the first one: a reply can arrive twice, but is never lost."""
    route = respx.post(f"{API}/bot{TOKEN}/sendMessage").mock(side_effect=[
        httpx.ReadTimeout("the answer did not come"),
        httpx.Response(200, json={"ok": True, "result": {"message_id": 5}}),
    ])
    client = await telegram()
    assert await client.send_message(1, "hi") == {"message_id": 5} and route.call_count == 2


def test_telegram_retry_policy_backs_off_exponentially_with_jitter_inside_the_budget():
    policy = trt_bot.TELEGRAM_RETRY
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
    with pytest.raises(trt_bot.TelegramError) as caught:  # 0 is an answer: retry at once, not "a second"
        trt_bot.parse_bot_api_response("m", 429, b'{"ok":false,"error_code":429,"parameters":{"retry_after":0}}')
    assert caught.value.retry_after == 0 and trt_bot._telegram_wait_asked(caught.value) == 0.0
    assert trt_bot._telegram_wait_asked(trt_bot.TelegramError("m", 429, "slow")) == 1.0  # not said: a second
    for unreadable in (b'"soon"', b'-1', b'true', b'null'):
        with pytest.raises(trt_bot.TelegramError) as caught:
            trt_bot.parse_bot_api_response("m", 429, b'{"ok":false,"error_code":429,"parameters":{"retry_after":'
                                                     + unreadable + b'}}')
        assert caught.value.retry_after is None


async def test_bot_api_calls_go_over_stream_calls_and_other_urls_over_httpxs_own_transport_which_respx_sees(fake_tg):
    async with trt_bot.bot_http_client([fake_tg.base_url]) as http, respx.mock() as mock:
        download = mock.get("https://93.184.216.34/x.png").mock(return_value=httpx.Response(200, content=b"png"))
        telegram = trt_bot.TelegramClient(TOKEN, fake_tg.base_url, http)
        assert (await telegram.send_message(42, "hi"))["chat"]["id"] == 42
        assert (await http.get("https://93.184.216.34/x.png")).content == b"png"
        assert download.call_count == 1 and len(mock.calls) == 1  # respx never saw the Bot API call ...
    assert [p["text"] for p in fake_tg.calls_of("sendMessage")] == ["hi"]  # ... which reached the fake


async def serve_answers(*answers: bytes) -> tuple[asyncio.AbstractServer, str, list[bytes]]:
    """A server answering each request (its head, then its Content-Length body) with the next of ``answers`` on
    whatever connection it came; an answer ending in b"<close>" is followed by closing the connection.  It returns
    the requests it read, and notes b"<connection>" for each connection accepted."""
    requests: list[bytes] = []
    queue = list(answers)

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(b"<connection>")
        try:
            while queue:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                requests.append(head + await reader.readexactly(int(length[1]) if length else 0))
                answer = queue.pop(0)
                writer.write(answer.removesuffix(b"<close>"))
                await writer.drain()
                if answer.endswith(b"<close>"):
                    break
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", requests


OK_JSON = b'{"ok":true,"result":{"message_id":1}}'
CONTENT_LENGTH_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(OK_JSON), OK_JSON)
CHUNKED_ANSWER = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"5;ext=1\r\n%s\r\n%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n" % (OK_JSON[:5], len(OK_JSON) - 5,
                                                                            OK_JSON[5:]))


async def test_stream_calls_keep_a_connection_alive_across_calls_and_read_length_and_chunked_bodies():
    server, base, requests = await serve_answers(CONTENT_LENGTH_ANSWER, CHUNKED_ANSWER, CONTENT_LENGTH_ANSWER)
    try:
        async with trt_bot.bot_http_client([base]) as http:
            telegram = trt_bot.TelegramClient(TOKEN, base, http, trt_bot.ONE_TRY)
            for text in ("one", "two", "three"):
                assert await telegram.call("sendMessage", {"chat_id": 1, "text": text}) == {"message_id": 1}
    finally:
        server.close()
    assert requests[0] == b"<connection>" and len(requests) == 4  # one connection carried the three calls
    head, body = requests[1].split(b"\r\n\r\n", 1)
    assert head.startswith(b"POST /bot%s/sendMessage HTTP/1.1\r\n" % TOKEN.encode())
    assert f"host: {base.removeprefix('http://')}".encode() in head.lower() and json.loads(body)["text"] == "one"


async def test_stream_calls_decode_a_gzip_answer_and_reconnect_after_connection_close():
    zipped = gzip.compress(OK_JSON)
    gzip_answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        len(zipped), zipped)
    until_close = b"HTTP/1.0 200 OK\r\n\r\n%s<close>" % OK_JSON  # neither length nor chunks: read to the end
    server, base, requests = await serve_answers(gzip_answer, until_close, CONTENT_LENGTH_ANSWER)
    try:
        async with trt_bot.bot_http_client([base]) as http:
            telegram = trt_bot.TelegramClient(TOKEN, base, http, trt_bot.ONE_TRY)
            for _ in range(3):
                assert await telegram.call("getMe") == {"message_id": 1}
    finally:
        server.close()
    assert requests.count(b"<connection>") == 3  # "Connection: close" and an answer ended by closing were honoured


async def test_stream_calls_refuse_an_answer_over_their_bound_as_a_lost_answer():
    huge = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (trt_bot.StreamCalls.MAX_ANSWER_BYTES + 1)
    server, base, _ = await serve_answers(huge)
    try:
        async with trt_bot.bot_http_client([base]) as http:
            with pytest.raises(httpx.RemoteProtocolError, match="over"):
                await http.post(f"{base}/bot{TOKEN}/getMe")
    finally:
        server.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="makes its certificate with openssl")
async def test_stream_calls_speak_tls_and_check_the_servers_name(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost"], check=True, capture_output=True)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    requests: list[bytes] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(CONTENT_LENGTH_ANSWER)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=served)
    port = server.sockets[0].getsockname()[1]
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        async with httpx.AsyncClient(transport=trt_bot.StreamCalls(2, trusting)) as http:
            assert (await http.post(f"https://localhost:{port}/bot{TOKEN}/getMe")).json()["ok"] is True
            with pytest.raises(httpx.ConnectError):  # the certificate names localhost, not 127.0.0.1
                await http.post(f"https://127.0.0.1:{port}/bot{TOKEN}/getMe")
    finally:
        server.close()
    assert requests[0].startswith(b"POST /bot")


async def test_stream_calls_time_out_a_slow_answer_as_a_read_timeout():
    server, base = await serve_raw(never_answer)
    try:
        async with trt_bot.bot_http_client([base]) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post(f"{base}/bot{TOKEN}/getMe", timeout=0.2)
    finally:
        server.close()


async def serve_raw(answer) -> tuple[asyncio.AbstractServer, str]:
    """A server that reads one request head, then lets ``answer(writer)`` do what it will."""
    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await answer(writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def close_at_once(writer: asyncio.StreamWriter) -> None:
    pass


async def reset(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


async def half_an_answer(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"ok\":")
    await writer.drain()


async def not_http(writer: asyncio.StreamWriter) -> None:
    writer.write(b"garbage\r\n\r\n")
    await writer.drain()


async def never_answer(writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(5)


@pytest.mark.parametrize("answer", [close_at_once, reset, half_an_answer, not_http, never_answer])
async def test_a_bot_api_call_that_went_out_and_lost_its_answer_may_have_been_performed(answer):
    server, base = await serve_raw(answer)
    try:
        async with trt_bot.bot_http_client([base]) as http:
            telegram = trt_bot.TelegramClient(TOKEN, base, http, trt_bot.ONE_TRY)
            with pytest.raises(trt_bot.TelegramNetworkError) as caught:
                await telegram.call("sendPhoto", {"chat_id": 1}, timeout=0.3, repeatable=False)
    finally:
        server.close()
    assert caught.value.maybe_performed, caught.value


async def test_an_upload_the_server_does_not_read_ends_at_the_calls_timeout():
    server, base = await serve_raw(never_answer)  # reads the head only: the body stalls in the socket buffers
    try:
        async with trt_bot.bot_http_client([base]) as http:
            telegram = trt_bot.TelegramClient(TOKEN, base, http, trt_bot.ONE_TRY)
            document = {"document": ("a.png", b"x" * 2**25, "image/png")}  # more than the socket buffers hold
            upload = telegram.call("sendDocument", {"chat_id": 1}, files=document, timeout=0.3, repeatable=False)
            with pytest.raises(trt_bot.TelegramNetworkError) as caught:
                await asyncio.wait_for(upload, 4)  # the server holds the connection for 5 s
    finally:
        server.close()
    assert caught.value.maybe_performed


async def test_a_bot_api_call_that_could_not_connect_was_not_performed():
    base = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with trt_bot.bot_http_client([base]) as http:
        with pytest.raises(trt_bot.TelegramNetworkError) as caught:
            await trt_bot.TelegramClient(TOKEN, base, http, trt_bot.ONE_TRY).call("sendPhoto", repeatable=False)
    assert not caught.value.maybe_performed and "ConnectError" in caught.value.description


async def test_a_message_whose_connection_closed_mid_answer_may_have_been_sent():
    server, base = await serve_raw(half_an_answer)
    try:
        async with trt_bot.bot_http_client([base]) as http:
            telegram = trt_bot.TelegramClient(TOKEN, base, http, trt_bot.ONE_TRY)
            with pytest.raises(trt_bot.TelegramNetworkError) as caught:
                await telegram.call("sendMessage", {"chat_id": 1, "text": "hi"}, repeatable=False)
    finally:
        server.close()
    assert caught.value.maybe_performed and "ReadError" in caught.value.description


async def test_a_bot_api_call_that_waited_too_long_for_a_connection_was_not_performed():
    holding = asyncio.Event()

    async def hold(writer: asyncio.StreamWriter) -> None:
        holding.set()
        await asyncio.sleep(5)

    server, base = await serve_raw(hold)
    try:
        async with httpx.AsyncClient(transport=trt_bot.StreamCalls(1, ssl.create_default_context())) as http:
            telegram = trt_bot.TelegramClient(TOKEN, base, http, trt_bot.ONE_TRY)
            first = asyncio.ensure_future(telegram.call("getMe", timeout=5.0))  # takes the only connection
            await asyncio.wait_for(holding.wait(), 5)
            with pytest.raises(trt_bot.TelegramNetworkError) as caught:
                await telegram.call("sendPhoto", timeout=0.3, repeatable=False)
            first.cancel()
            await asyncio.wait([first])
    finally:
        server.close()
    assert not caught.value.maybe_performed and "PoolTimeout" in caught.value.description


async def advance_until(clock: ManualClock, done, step: float, timeout: float = 10.0) -> None:
    """Move ``clock`` on by ``step`` whenever something sleeps on it, until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        await eventually(lambda: done() or clock.sleepers, timeout=max(0.1, deadline - time.monotonic()))
        if not done():
            clock.advance(step)
            await asyncio.sleep(0.001)  # let the woken tasks run before the clock moves again




def recording(sent: list, clock: ManualClock, first: httpx.Response | None = None):
    """A respx side effect noting (chat, method, when) of each call; ``first`` answers the first one."""
    def answer(request: httpx.Request) -> httpx.Response:
        params = json.loads(request.content or b"{}")
        sent.append((params.get("chat_id"), request.url.path.rsplit("/", 1)[1], clock.now))
        if first is not None and len(sent) == 1:
            return first
        return httpx.Response(200, json={"ok": True, "result": {"message_id": len(sent)}})
    return answer


@respx.mock
async def test_a_429_on_one_chat_pauses_every_send_then_they_go_one_spacing_apart():
    clock, sent = ManualClock(), []
    respx.post(url__startswith=f"{API}/bot{TOKEN}/").mock(
        side_effect=recording(sent, clock, bot_api_error(429, "Too Many Requests: retry after 5", retry_after=5)))
    client = paced_client(rate=10, clock=clock)
    started = clock.now
    sends = [asyncio.create_task(client.send_message(1, "flooded"))]
    await eventually(lambda: clock.sleepers == 1)  # the 429's retry waits
    sends += [asyncio.create_task(client.send_message(chat, "other chat")) for chat in (2, 3)]
    await eventually(lambda: clock.sleepers == 3)  # chats 2 and 3 wait out the pause
    assert [chat for chat, _, _ in sent] == [1]
    await advance_until(clock, lambda: all(task.done() for task in sends), 0.05)
    await asyncio.gather(*sends)
    after = sorted(when for _, _, when in sent[1:])
    assert len(after) == 3 and after[0] >= started + 5  # nothing went during the pause
    assert all(later - earlier >= 0.1 - 1e-6 for earlier, later in zip(after, after[1:]))  # then at the rate
    assert client.pauses == 1 and client.calls["sendMessage", "429"] == 1


@respx.mock
async def test_answer_callback_query_is_not_delayed_by_a_flood_pause_or_waiting_sends():
    clock, sent = ManualClock(), []
    respx.post(url__startswith=f"{API}/bot{TOKEN}/").mock(
        side_effect=recording(sent, clock, bot_api_error(429, "Too Many Requests: retry after 10", retry_after=10)))
    client = paced_client(clock=clock)
    sends = [asyncio.create_task(client.send_message(chat, "hi")) for chat in range(1, 6)]
    await eventually(lambda: client.pauses == 1 and clock.sleepers)  # the sends wait out the pause
    await asyncio.wait_for(client.answer_callback("q1"), 5)  # the clock never moves: it did not wait
    assert [method for _, method, _ in sent] == ["sendMessage", "answerCallbackQuery"]
    for task in sends:
        task.cancel()
    await asyncio.gather(*sends, return_exceptions=True)


@respx.mock
async def test_edits_and_deletions_wait_their_chats_turn_like_messages():
    clock, sent = ManualClock(), []
    respx.post(url__startswith=f"{API}/bot{TOKEN}/").mock(side_effect=recording(sent, clock))
    client = paced_client(chat_interval_s=1.0, clock=clock)
    calls = [client.call("editMessageText", {"chat_id": 4, "message_id": 1, "text": "x"}),
             client.call("deleteMessage", {"chat_id": 4, "message_id": 1}), client.call("getMe")]
    tasks = [asyncio.create_task(call) for call in calls]
    await eventually(lambda: len(sent) == 2 and clock.sleepers == 1)  # getMe is not paced
    assert {method for _, method, _ in sent} == {"editMessageText", "getMe"}
    await advance_until(clock, lambda: all(task.done() for task in tasks), 0.25)
    (_, _, edited), (_, _, deleted) = [entry for entry in sent if entry[0] == 4]
    assert deleted - edited >= 1.0 - 1e-6


###############################################################################
# 9. Update pipeline (end to end through the webhook)
###############################################################################

async def test_a_loop_waiting_on_an_event_ends_when_cancelled_as_the_event_fires():
    # Regression: asyncio.wait_for on Python 3.11 returned the event's result and
    # swallowed the cancel, so the job poller outlived App.stop() and shutdown hung.
    event = asyncio.Event()

    async def wake_up_forever() -> None:
        while True:
            await trt_bot.wait_for_event(event, 5.0)
            event.clear()

    task = asyncio.create_task(wake_up_forever())
    await asyncio.sleep(0)  # the loop is now waiting on the event
    event.set()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5.0)
    assert done and task.cancelled()


async def test_start_update_is_acknowledged_and_answered_with_the_menu(make_app, fake_tg, database_url):
    app = await make_app(DATABASE_URL=database_url)
    response = await post_update(app, update_message(1, 42, "/start"))
    assert response.status_code == 200
    await eventually(lambda: fake_tg.calls_of("sendMessage"))
    (sent,) = fake_tg.calls_of("sendMessage")
    assert sent["chat_id"] == 42 and says(sent["text"], "ru", "start")
    buttons = [b["text"] for row in sent["reply_markup"]["inline_keyboard"] for b in row]
    assert bot_text("ru", "btn_create") in buttons and bot_text("ru", "btn_help") in buttons


@pytest.mark.parametrize("headers", [{}, {"X-Telegram-Bot-Api-Secret-Token": "wrong"}])
async def test_wrong_or_missing_secret_is_rejected_and_not_processed(make_app, fake_tg, headers):
    app = await make_app()
    response = await post_update(app, update_message(1, 42, "/start"), headers=headers)
    assert response.status_code == 401
    assert (await post_update(app, update_message(2, 43, "/start"))).status_code == 200
    await eventually(lambda: fake_tg.texts_to(43))  # the update after it has been handled
    assert fake_tg.texts_to(42) == [] and app.pipeline.stats.received == 1


async def test_wrong_path_secret_is_401_and_invalid_updates_are_400(make_app):
    app = await make_app()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}", headers=secret_header(app)) as client:
        assert (await client.post("/webhook/guess", json={"update_id": 1})).status_code == 401
        assert (await client.post(app.config.webhook_path, content=b"{nope")).status_code == 400
        assert (await client.post(app.config.webhook_path, json={"update_id": "1"})).status_code == 400
        assert (await client.post(app.config.webhook_path, json=[1])).status_code == 400


async def test_same_update_id_twice_is_answered_once(make_app, fake_tg, database_url):
    app = await make_app(DATABASE_URL=database_url)
    update = update_message(7, 42, "/start")
    assert (await post_update(app, update)).status_code == 200
    assert (await post_update(app, update)).status_code == 200
    await asyncio.wait_for(app.pipeline.idle(), 10)  # the duplicate, had it been queued, would be handled by now
    assert len(fake_tg.calls_of("sendMessage")) == 1 and app.pipeline.stats.duplicates == 1


@pytest.mark.slow  # seconds of real time under load
async def test_300_updates_over_30_chats_are_answered_in_each_chats_order(make_app, fake_tg, database_url):
    app = await make_app(UPDATE_QUEUE_WORKERS="3", DATABASE_URL=database_url)
    handled: dict[int, list[int]] = {}
    handle, go = app.pipeline.handler, asyncio.Event()

    async def recording_handler(update: dict) -> None:
        handled.setdefault(update["message"]["chat"]["id"], []).append(update["update_id"])
        await go.wait()
        await handle(update)

    app.pipeline.handler = recording_handler
    updates = [update_message(n, 1000 + n % 30, f"/start {n}") for n in range(1, 301)]
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=30)) as client:
        # 30 concurrent posts, one per chat: a chat's next update is posted once its last one is acknowledged,
        # so each chat's order is defined.  They pile up (queued, parked, spilled) behind 3 held workers.
        for batch in range(0, 300, 30):
            results = await asyncio.gather(*(post_update(app, u, client) for u in updates[batch:batch + 30]))
            assert {r.status_code for r in results} == {200}
    go.set()
    await eventually(lambda: len(fake_tg.calls_of("sendMessage")) == 300, timeout=30)
    assert app.pipeline.stats.errors == 0
    for chat in range(1000, 1030):
        # Replies carry no payload, so order is checked on arrival of the update ids at the handler.
        assert handled[chat] == [n for n in range(1, 301) if 1000 + n % 30 == chat]
        assert len([p for p in fake_tg.calls_of("sendMessage") if p["chat_id"] == chat]) == 10


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


async def test_a_full_queue_spills_to_the_inbox_and_loses_nothing(make_app, database_url):
    app = await make_app(UPDATE_QUEUE_WORKERS="1", UPDATE_QUEUE_SIZE="2", DATABASE_URL=database_url)
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
    app.pipeline.workers.timeout = 0.2
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
    app.pipeline.inbox.enqueue(item)
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


async def test_a_wrong_postgresql_password_is_named_by_health_without_it_and_start_still_answers(make_app, fake_tg,
                                                                                                 postgres):
    wrong = "Wrong-Password-42"
    app = await make_app(DATABASE_URL=postgres.url("postgres", password=wrong))
    assert (await post_update(app, update_message(1, 42, "/start"))).status_code == 200
    await eventually(lambda: fake_tg.texts_to(42))
    async with httpx.AsyncClient() as client:
        body = (await client.get(f"http://127.0.0.1:{app.port}/health")).text
    health = json.loads(body)
    assert health["status"] == "degraded" and "password authentication failed" in health["database_error"]
    assert wrong not in body and wrong not in "".join(formatted(r) for r in ALL_RECORDS.records)


async def test_a_locked_database_degrades_within_the_ack_budget_then_recovers(make_app, fake_tg, tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(trt_bot, "DB_RETRY_S", 0.1)
    app = await make_app()
    first_record = len(ALL_RECORDS.records)
    locker = hold_write_lock(str(tmp_path / "bot.sqlite3"))
    released = threading.Event()

    def release() -> None:
        released.set()  # before the rollback: an ack seen while this is unset came while the lock was held
        locker.execute("ROLLBACK")

    # Held for less than the one-second busy timeout acks used to wait out: such an ack came after the release.
    holder = threading.Timer(0.8, release)
    holder.start()
    response = await post_update(app, update_message(1, 42, "/start"))
    acked_while_locked = not released.is_set()
    holder.cancel()
    holder.join()
    if not released.is_set():
        release()
    assert response.status_code == 200 and acked_while_locked
    await eventually(lambda: fake_tg.texts_to(42))
    assert app.pipeline.stats.memory_only == 1
    await eventually(lambda: app.db.ok, timeout=5)
    assert (await post_update(app, update_message(2, 43, "/start"))).status_code == 200
    await eventually(lambda: fake_tg.texts_to(43))
    assert app.pipeline.stats.memory_only == 1  # the second one was durable again
    incidents = [r for r in ALL_RECORDS.records[first_record:] if r.name == "trt_bot" and r.levelno >= logging.ERROR]
    assert len(incidents) == 1, [r.getMessage() for r in incidents]  # one line, not one per retry
    locker.close()


async def test_a_chats_order_holds_across_a_switch_to_degraded_mode_and_back(make_app, tmp_path, monkeypatch):
    # Used to run a spilled update after a later one of the same chat accepted in memory-only mode.
    monkeypatch.setattr(trt_bot, "DB_RETRY_S", 0.1)
    app = await make_app(UPDATE_QUEUE_WORKERS="1", UPDATE_QUEUE_SIZE="2")
    first_done = asyncio.Event()
    handled: list[tuple[int, int]] = []

    async def recording_handler(update: dict) -> None:
        if update["update_id"] == 1:
            await first_done.wait()
        handled.append((update["message"]["chat"]["id"], update["update_id"]))

    app.pipeline.handler = recording_handler
    for update_id, chat in ((1, 7), (2, 8), (3, 7)):  # 1 is being handled, 2 waits in memory, 3 spills
        assert (await post_update(app, update_message(update_id, chat, "x"))).status_code == 200
    assert app.pipeline.stats.spilled == 1
    locker = hold_write_lock(str(tmp_path / "bot.sqlite3"))
    try:
        await post_update(app, update_message(4, 9, "x"))  # finds the database locked: degraded from here
        assert not app.db.ok
        first_done.set()
        await eventually(lambda: len(handled) == 2)  # 1 and 2 from memory; 3 is out of reach in the inbox
        later = await post_update(app, update_message(5, 7, "x"))
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert later.status_code == 503 and later.headers["Retry-After"]  # Telegram keeps it and sends it again
    await eventually(lambda: app.db.ok, timeout=5)
    assert (await post_update(app, update_message(5, 7, "x"))).status_code == 200
    await eventually(lambda: len(handled) == 4)
    assert [update_id for chat, update_id in handled if chat == 7] == [1, 3, 5]


async def test_an_update_arriving_before_the_database_opens_waits_for_it_and_is_stored(fake_tg, tmp_path):
    # Used to be kept in memory only (the port is bound before the database opens), so a kill right after
    # start-up lost it, and a worker handled it while the dialogs were still loading.
    database = str(tmp_path / "bot.sqlite3")
    app = trt_bot.App(trt_bot.load_config(bot_env(fake_tg, database)))
    gate, real_open = asyncio.Event(), app.db.open

    async def open_when_let(*args):
        await gate.wait()
        return await real_open(*args)

    app.db.open = open_when_let
    starting = asyncio.create_task(app.start())
    try:
        await eventually(lambda: app.port)
        posting = asyncio.create_task(post_update(app, update_message(1, 71, "/start")))
        await eventually(lambda: app.server.phase_counts()["handling"] == 1)  # the webhook is in ingest
        gate.set()
        await starting
        assert (await posting).status_code == 200
        assert app.pipeline.stats.memory_only == 0
        with contextlib.closing(sqlite3.connect(database)) as conn:
            assert conn.execute("SELECT update_id FROM inbox").fetchall() == [(1,)]
        await eventually(lambda: fake_tg.texts_to(71))
    finally:
        gate.set()
        await starting
        await app.stop()


async def test_a_redelivered_update_read_by_a_refill_mid_insert_keeps_its_chats_order(fake_tg, tmp_path):
    # Used to: a killed run stored update 1 but Telegram never got its 200 and sent it again just as the new
    # run's refill read the inbox. The refill skipped 1 (its insert was under way), concluded nothing waited,
    # and the chat's next update ran first.
    database = str(tmp_path / "bot.sqlite3")
    first, second = update_message(1, 7, "first"), update_message(2, 7, "second")
    conn = trt_bot.SqliteFile(database).connect(None)
    trt_bot.inbox_insert(conn, [trt_bot.InboxItem(1, 7, first, json.dumps(first).encode(), time.time())])
    conn.close()
    app = trt_bot.App(trt_bot.load_config(bot_env(fake_tg, database)))
    handled: list[int] = []

    async def recording_handler(update: dict) -> None:
        handled.append(update["update_id"])

    real_read = app.db.read
    redelivery: list[asyncio.Task] = []

    async def read_while_update_1_comes_again(fn, *args):
        if fn is trt_bot.inbox_pending and not redelivery:
            redelivery.append(asyncio.create_task(app.pipeline.ingest(first, json.dumps(first).encode())))
            await asyncio.sleep(0)  # the redelivery's insert is under way while the inbox is read
        return await real_read(fn, *args)

    app.pipeline.handler = recording_handler
    app.db.read = read_while_update_1_comes_again
    await app.start()
    try:
        await eventually(lambda: redelivery)
        assert await redelivery[0] == trt_bot.Admission.DUPLICATE
        assert await app.pipeline.ingest(second, json.dumps(second).encode()) == trt_bot.Admission.ADMITTED
        await eventually(lambda: len(handled) == 2)
        assert handled == [1, 2]
    finally:
        await app.stop()


async def test_an_update_another_instance_stored_is_not_overtaken_by_its_chats_next_one(make_app, tmp_path):
    # Used to: during a deploy a standby stored a chat's update; the chat's next one reached the active
    # instance, went straight to its workers and was answered before the stored one was read back.
    app = await make_app()
    handled: list[int] = []

    async def recording_handler(update: dict) -> None:
        handled.append(update["update_id"])

    app.pipeline.handler = recording_handler
    await eventually(lambda: not app.pipeline.inbox.recount_due)  # its start-up look at the inbox is over
    first, second = update_message(1, 8, "first"), update_message(2, 8, "second")
    with contextlib.closing(trt_bot.SqliteFile(str(tmp_path / "bot.sqlite3")).connect(None)) as standby:
        with standby:
            trt_bot.inbox_insert(standby, [trt_bot.InboxItem(1, 8, first, json.dumps(first).encode(), time.time())])
    assert (await post_update(app, second)).status_code == 200
    await eventually(lambda: len(handled) == 2)
    assert handled == [1, 2]


async def test_a_lone_surrogate_in_an_update_fails_nothing_else_and_is_not_retried(make_app, fake_tg, tmp_path):
    # Used to fail every shared commit the sender's language joined, every second, forever.
    app = await make_app()
    poisoned = update_message(1, 61, "/start")
    poisoned["message"]["from"]["language_code"] = "\ud800"
    url = f"http://127.0.0.1:{app.port}{app.config.webhook_path}"
    async with httpx.AsyncClient(headers=secret_header(app)) as client:
        bad = client.post(url, content=json.dumps(poisoned).encode())  # JSON's "\ud800" escape
        others = [post_update(app, update_message(n, 60 + n, "/start"), client) for n in range(2, 22)]
        responses = await asyncio.gather(bad, *others)
    assert [r.status_code for r in responses] == [200] * 21
    await eventually(lambda: {p["chat_id"] for p in fake_tg.calls_of("sendMessage")} >= set(range(61, 82)))

    def unhandled() -> int:
        with contextlib.closing(sqlite3.connect(str(tmp_path / "bot.sqlite3"))) as conn:
            return conn.execute("SELECT count(*) FROM inbox WHERE done_at IS NULL").fetchone()[0]

    await eventually(lambda: unhandled() == 0)  # every update marked done: none is handled again after a restart


async def test_an_update_id_outside_sqlites_integer_range_is_400(make_app):
    app = await make_app()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}", headers=secret_header(app)) as client:
        for update_id in (2**70, -2**70, 2**63):
            response = await client.post(app.config.webhook_path, content=b'{"update_id":%d}' % update_id)
            assert response.status_code == 400, update_id
    assert app.pipeline.stats.received == 0


async def test_acknowledged_updates_survive_sigkill_and_are_answered_after_restart(fake_tg, tmp_path, bot_processes,
                                                                                  database_url):
    fake_tg.stall("sendMessage")  # the bot acknowledges but cannot answer yet
    # Telegram's own rate: fewer senders than updates, so each holds one and the rest wait in the outbox.
    env = bot_env(fake_tg, str(tmp_path / "bot.sqlite3"), PORT=str(free_port()), DATABASE_URL=database_url,
                  TELEGRAM_SEND_RATE="30")
    first = bot_processes(env)
    await first.wait_healthy()
    headers = {"X-Telegram-Bot-Api-Secret-Token": trt_bot.load_config(env).webhook_secret}
    url = first.base_url + trt_bot.load_config(env).webhook_path
    async with httpx.AsyncClient() as client:
        for n in range(1, 21):
            response = await client.post(url, json=update_message(n, 500 + n, "/start"), headers=headers)
            assert response.status_code == 200
    senders = trt_bot.outbox_senders(trt_bot.load_config(env).telegram_send_rate)
    await eventually(lambda: fake_tg.held("sendMessage") == senders)  # every sender waits on Telegram: none on its way
    first.kill()
    fake_tg.release("sendMessage")
    await eventually(lambda: fake_tg.held("sendMessage") == 0)  # the killed process's held calls are recorded
    fake_tg.clear()
    second = bot_processes({**env, "PORT": str(free_port())})
    await second.wait_healthy()
    await eventually(lambda: {p["chat_id"] for p in fake_tg.calls_of("sendMessage")} >= set(range(501, 521)),
                     timeout=20)
    assert len(fake_tg.calls_of("sendMessage")) == 20


async def test_a_database_file_deleted_at_runtime_is_noticed_and_nothing_acknowledged_is_lost(fake_tg, tmp_path,
                                                                                             bot_processes):
    # Used to go unnoticed: /health said ok, and after kill -9 none of the acknowledged updates was answered.
    fake_tg.stall("sendMessage")
    database = tmp_path / "bot.sqlite3"
    env = bot_env(fake_tg, str(database), PORT=str(free_port()), TELEGRAM_SEND_RATE="30")  # fewer senders than updates
    first = bot_processes(env)
    await first.wait_healthy()
    config = trt_bot.load_config(env)
    headers = {"X-Telegram-Bot-Api-Secret-Token": config.webhook_secret}
    async with httpx.AsyncClient(base_url=first.base_url, headers=headers) as client:

        async def status() -> dict:
            return (await client.get("/health")).json()

        async def post(update_ids: range) -> None:
            for n in update_ids:
                response = await client.post(config.webhook_path, json=update_message(n, 700 + n, "/start"))
                assert response.status_code == 200

        await post(range(1, 6))
        for suffix in ("", "-wal", "-shm"):
            os.unlink(f"{database}{suffix}")
        database.mkdir()  # keeps a new file from being created until it goes
        health = await eventually_async(status, lambda h: h["status"] == "degraded", timeout=10)
        assert health["database_error"] and "was deleted or replaced" in first.log
        database.rmdir()
        await eventually_async(status, lambda h: h["status"] == "ok", timeout=10)
        await post(range(6, 11))
    assert database.is_file()
    senders = trt_bot.outbox_senders(trt_bot.load_config(env).telegram_send_rate)
    await eventually(lambda: fake_tg.held("sendMessage") == senders)  # every sender waits on Telegram: none on its way
    first.kill()
    fake_tg.release("sendMessage")
    await eventually(lambda: fake_tg.held("sendMessage") == 0)  # the killed process's held calls are recorded
    fake_tg.clear()
    second = bot_processes({**env, "PORT": str(free_port())})
    await second.wait_healthy()
    await eventually(lambda: {p["chat_id"] for p in fake_tg.calls_of("sendMessage")} >= set(range(701, 711)),
                     timeout=20)


@pytest.mark.parametrize("update, key", [
    (update_message(1, 42, "x"), 42),
    (update_callback(2, 77, "help"), 77),  # by the user who pressed, though its message names a chat
    ({"update_id": 3, "poll_answer": {"poll_id": "p", "user": {"id": 9}}}, 9),
    ({"update_id": 4, "message": {"chat": {"id": 2**63}}, "callback_query": {"from": {"id": 8}}}, 8),
    ({"update_id": 5, "message": "not an object"}, ~5),
    ({"update_id": 6, "poll": {"id": "p"}}, ~6),  # nobody's: shares its key with no other update
])
def test_update_chat_key_is_the_chat_else_the_sender_else_the_update_alone(update, key):
    assert trt_bot.update_chat_key(update) == key


def test_only_an_update_sqlite_refuses_is_not_worth_sending_again():
    kept = (trt_bot.Admission.ADMITTED, trt_bot.Admission.DUPLICATE)
    not_again = [outcome for outcome in trt_bot.Admission if outcome not in kept and not outcome.retry_later]
    assert not_again == [trt_bot.Admission.INVALID]


async def nothing(update: dict) -> None:
    pass


async def test_ingest_says_admitted_duplicate_or_rejected_because_the_backlog_is_full(tmp_path):
    db = trt_bot.Database(str(tmp_path / "bot.sqlite3"))
    assert await db.open()
    pipeline = trt_bot.UpdatePipeline(db, nothing, max_backlog=2)
    one, two, three = (update_message(n, 42, "x") for n in (1, 2, 3))
    try:
        assert await pipeline.ingest(one, json.dumps(one).encode()) == trt_bot.Admission.ADMITTED
        assert await pipeline.ingest(one, json.dumps(one).encode()) == trt_bot.Admission.DUPLICATE
        assert await pipeline.ingest(two, json.dumps(two).encode()) == trt_bot.Admission.ADMITTED
        assert await pipeline.ingest(three, json.dumps(three).encode()) == trt_bot.Admission.BACKLOG_FULL
    finally:
        await db.close()


async def test_ingest_without_a_database_says_why_memory_cannot_take_an_update(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    db = trt_bot.Database(str(blocker / "bot.sqlite3"))
    assert not await db.open()
    pipeline = trt_bot.UpdatePipeline(db, nothing, queue_size=1)
    updates = [update_message(n, 40 + n, "x") for n in range(1, 5)]

    async def ingest(update: dict) -> trt_bot.Admission:
        return await pipeline.ingest(update, json.dumps(update).encode())

    assert await ingest(updates[0]) == trt_bot.Admission.ADMITTED
    assert await ingest(updates[0]) == trt_bot.Admission.DUPLICATE
    assert await ingest(updates[1]) == trt_bot.Admission.MEMORY_FULL
    pipeline.mode = trt_bot.Role(db, 15)
    pipeline.mode.answered = True  # the lease was claimed: another instance holds it
    assert await ingest(updates[2]) == trt_bot.Admission.PASSIVE
    await pipeline.stop(grace=0)
    assert await ingest(updates[3]) == trt_bot.Admission.SHUTTING_DOWN
    assert pipeline.stats.rejected == 3


class LapsingRole(trt_bot.Role):
    """The lease held, but its trust lapses for the next ``lapses`` looks (a renewal late on a loaded machine)."""

    lapses = 0

    def acting_left(self) -> float:
        if self.lapses:
            self.lapses -= 1
            return 0.0
        return math.inf


async def test_an_update_left_to_the_inbox_in_a_lapse_is_not_overtaken_by_its_chats_next_one(tmp_path):
    db = trt_bot.Database(str(tmp_path / "bot.sqlite3"))
    assert await db.open()
    role, handled, go = LapsingRole(), [], asyncio.Event()

    async def handler(update: dict) -> None:
        handled.append(update["update_id"])
        if update["update_id"] == 1:
            await go.wait()  # updates 2 and 3 of the chat are in memory behind it
            role.lapses = 1  # the worker goes straight on to update 2: that look finds the trust lapsed

    pipeline = trt_bot.UpdatePipeline(db, handler, workers=1, mode=role)
    await pipeline.start()
    try:
        for update in (update_message(n, 42, "x") for n in (1, 2, 3)):
            assert await pipeline.ingest(update, json.dumps(update).encode()) == trt_bot.Admission.ADMITTED
        go.set()
        await eventually(lambda: len(handled) == 3 and not pipeline.inbox.states)
        assert handled == [1, 2, 3]  # 2 went back to the inbox, and 3 with it: the refill gives them back in order
    finally:
        await pipeline.stop(grace=1)
        await db.close()


def memory_inbox(capacity: int) -> trt_bot.Inbox:
    """An inbox whose table is never opened: the workers take updates from its queue and move them through its
    states."""
    return trt_bot.Inbox(trt_bot.Database(":memory:"), capacity, trt_bot.PipelineStats(), lambda: True)


def queued_item(update_id: int, chat: int) -> trt_bot.InboxItem:
    update = update_message(update_id, chat, "x")
    return trt_bot.InboxItem(update_id, chat, update, json.dumps(update).encode(), 0.0)


@contextlib.asynccontextmanager
async def one_worker(handled: list[int]):
    """ChatWorkers with one worker that notes the update ids it handles; the worker is stopped on exit."""
    async def process(item: trt_bot.InboxItem) -> None:
        handled.append(item.update_id)

    workers = trt_bot.ChatWorkers(memory_inbox(10), process, 1)
    (worker,) = workers.start()
    try:
        yield workers
    finally:
        worker.cancel()
        await asyncio.wait([worker])


async def test_while_an_ack_is_owed_a_worker_lets_the_ready_acks_run_first_then_starts_its_handler():
    order: list[str] = []
    handled: list[int] = []
    async with one_worker(handled) as workers:
        with workers.ack_owed():
            workers.inbox.enqueue(queued_item(1, 42))
            asyncio.get_running_loop().call_soon(lambda: order.append(f"ack ran, handled {handled}"))
            await eventually(lambda: handled == [1])  # no timed wait: the ack is still owed
        assert order == ["ack ran, handled []"] and workers.deferred == 1


async def test_a_worker_never_waits_for_an_ack_still_owed_and_starts_handler_after_handler():
    handled: list[int] = []
    async with one_worker(handled) as workers:
        deadline = time.monotonic() + 1.0  # a 50 ms wait before each handler would take 2.5 s
        with workers.ack_owed():  # owed all along: the acks wait on the disk, the CPU has room
            for batch in range(5):
                for update_id in range(batch * 10 + 1, batch * 10 + 11):
                    workers.inbox.enqueue(queued_item(update_id, 42))
                await eventually(lambda: len(handled) == batch * 10 + 10, timeout=deadline - time.monotonic())
        assert handled == list(range(1, 51)) and workers.deferred == 50 and workers.acks_owed == 0


async def test_while_acks_are_owed_handlers_run_at_most_their_share_of_each_window_and_are_never_starved():
    handled: list[int] = []
    busy: list[float] = []

    async def process(item: trt_bot.InboxItem) -> None:
        started = time.thread_time()  # CPU time, as the share is counted: another process's turns are not the handler's
        while time.thread_time() - started < 0.003:  # a handler that uses the CPU for 3 ms
            pass
        busy.append(time.thread_time() - started)
        handled.append(item.update_id)

    workers = trt_bot.ChatWorkers(memory_inbox(50), process, 2)
    tasks = workers.start()
    try:
        with workers.ack_owed():  # owed all along: a steady stream of acks
            started = time.perf_counter()
            for update_id in range(1, 41):
                workers.inbox.enqueue(queued_item(update_id, update_id))
            await eventually(lambda: len(handled) == 40, timeout=20)  # handled all the same
            elapsed = time.perf_counter() - started
        assert elapsed >= 1.25 * sum(busy)  # handlers had at most their share (one may finish past it): acks the rest
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


async def test_the_webhook_owes_an_ack_until_the_update_is_stored(make_app):
    app = await make_app()
    release = threading.Event()
    try:
        blocker = asyncio.ensure_future(app.db.write(lambda conn: release.wait(10)))  # holds the database thread
        posted = asyncio.ensure_future(post_update(app, update_message(1, 42, "x")))
        await eventually(lambda: app.pipeline.workers.acks_owed == 1)
        release.set()
        assert (await posted).status_code == 200
        await blocker
        assert app.pipeline.workers.acks_owed == 0
        assert (await post_update(app, update_message(1, 42, "x"))).status_code == 200  # a duplicate
        assert (await post_update(app, {"update_id": 2**70})).status_code == 400
        assert app.pipeline.workers.acks_owed == 0  # settled on every answer
    finally:
        release.set()


@pytest.mark.slow  # seconds of real time under load
async def test_updates_posted_while_handlers_give_way_to_acks_are_each_handled_exactly_once(make_app):
    app = await make_app(UPDATE_QUEUE_WORKERS="3", UPDATE_QUEUE_SIZE="20")
    handled: list[int] = []

    async def recording_handler(update: dict) -> None:
        handled.append(update["update_id"])
        await asyncio.sleep(0)

    app.pipeline.handler = recording_handler
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=20)) as client:
        results = await asyncio.gather(*(post_update(app, update_message(n, 5000 + n % 50, "x"), client)
                                         for n in range(1, 401)))
    assert {r.status_code for r in results} == {200}
    await asyncio.wait_for(app.pipeline.idle(), 30)
    assert sorted(handled) == list(range(1, 401))  # none lost, none twice
    assert app.pipeline.workers.deferred > 0 and app.pipeline.workers.acks_owed == 0


async def test_the_watchdog_cuts_a_handler_only_past_its_deadline_and_withdraws_the_cut_after():
    clock = ManualClock()
    watchdog = trt_bot.ChatWorkers(memory_inbox(1), nothing, 0, timeout=30.0, clock=clock)
    seen: list[tuple[str, object]] = []

    async def handler_run() -> None:
        task = asyncio.current_task()
        watchdog.watch(task, clock.monotonic())
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append(("cut alone", watchdog.cut_alone(task)))
        finally:
            watchdog.release(task)
        seen.append(("cancel requests left", task.cancelling()))

    alone, with_shutdown = asyncio.create_task(handler_run()), asyncio.create_task(handler_run())
    await asyncio.sleep(0)  # both are watched now
    clock.advance(29.5)
    watchdog.cut_overdue()
    assert (alone.cancelling(), with_shutdown.cancelling()) == (0, 0)
    clock.advance(1.0)
    watchdog.cut_overdue()
    with_shutdown.cancel()  # a shutdown's cancel on top of the cut
    await asyncio.wait([alone, with_shutdown], timeout=5)
    assert seen == [("cut alone", True), ("cancel requests left", 0),  # the cut was withdrawn
                    ("cut alone", False), ("cancel requests left", 1)]  # the shutdown's cancel stands


async def test_idle_returns_once_every_update_is_handled_and_marked_done(make_app):
    app = await make_app(UPDATE_QUEUE_WORKERS="1", UPDATE_QUEUE_SIZE="2")
    gate = asyncio.Event()
    app.pipeline.handler = lambda update: gate.wait()
    statuses = [(await post_update(app, update_message(n, 3100, "x"))).status_code for n in range(1, 7)]
    idle = asyncio.create_task(app.pipeline.idle())
    await asyncio.sleep(0)  # idle is now waiting: one update is in hand, one queued, four stored
    gate.set()
    await asyncio.wait_for(idle, 10)
    stats = app.pipeline.stats
    assert statuses == [200] * 6 and (stats.processed, stats.spilled, app.pipeline.backlog) == (6, 4, 0)


###############################################################################
# 10-11. Texts, keyboards and the dialog
###############################################################################

ZIMAGE, FLUX = trt_bot.Z_IMAGE, trt_bot.MODELS_BY_KEY["flux2pro"]


@pytest.mark.parametrize("model, text, refusal", [
    (ZIMAGE, "a red fox", None),
    (ZIMAGE, "", ("prompt_empty", {})),
    (ZIMAGE, " \n\t ", ("prompt_empty", {})),
    (ZIMAGE, "x", None),
    (ZIMAGE, "x" * 1000, None),
    (ZIMAGE, " " + "x" * 1000 + "\n", None),  # what is sent is the stripped text
    (ZIMAGE, "x" * 1001, ("prompt_too_long", {"model": "Z-Image", "length": 1001, "most": 1000})),
    (FLUX, "x" * 5000, None),
    (FLUX, "x" * 5001, ("prompt_too_long", {"model": "Flux 2 Pro", "length": 5001, "most": 5000})),
    (FLUX, "ab", ("prompt_too_short", {"model": "Flux 2 Pro", "fewest": 3})),
    (FLUX, "  ab  ", ("prompt_too_short", {"model": "Flux 2 Pro", "fewest": 3})),
    (FLUX, "abc", None),
])
def test_a_prompt_is_refused_when_blank_or_outside_its_models_limits_and_says_why(model, text, refusal):
    assert trt_bot.check_prompt(text, model) == refusal


def test_every_catalog_row_carries_its_own_prompt_limits_as_kie_documents_them():
    limits = {model.kie_model: model.prompt_chars for model in trt_bot.CATALOG}
    assert limits["z-image"] == (1, 1000) and limits["flux-2/pro-text-to-image"] == (3, 5000)
    assert limits["seedream/4.5-text-to-image"] == (1, 3000)
    assert all(1 <= fewest < most for fewest, most in limits.values())


@pytest.mark.parametrize("count, form", [
    (1, "символ"), (2, "символа"), (5, "символов"), (11, "символов"), (21, "символ"), (22, "символа"),
    (25, "символов"), (111, "символов"), (0, "символов"), (4, "символа"), (12, "символов"), (14, "символов"),
    (101, "символ"), (112, "символов"), (1004, "символа"),
])
def test_a_russian_noun_takes_the_form_its_number_needs(count, form):
    assert trt_bot.plural_form(count, ("символ", "символа", "символов")) == form


@pytest.mark.parametrize("count, form", [(1, "character"), (0, "characters"), (2, "characters"), (21, "characters")])
def test_an_english_noun_is_singular_only_for_one(count, form):
    assert trt_bot.plural_form(count, ("character", "characters")) == form


@pytest.mark.parametrize("count, words", [
    (1, "1 минуту"), (2, "2 минуты"), (5, "5 минут"), (11, "11 минут"), (21, "21 минуту"), (22, "22 минуты"),
    (25, "25 минут"), (111, "111 минут"),
])
def test_a_text_writes_a_counted_noun_after_its_number(count, words, monkeypatch):
    monkeypatch.setitem(trt_bot.TEXTS["ru"], "probe", "{n:минуту|минуты|минут}/{n}/{n:>4}")
    assert trt_bot.render("ru", "probe", n=count) == f"{words}/{count}/{count:>4}"


COPY_SNAPSHOT = os.path.join(HERE, "texts_snapshot.json")


def leaves(tree: object, path: str = "") -> dict[str, object]:
    """{'TEXTS["ru"]["start"]': "👋 …", ...}: each text of a nested dict under the path that reaches it."""
    if not isinstance(tree, dict):
        return {path: tree}
    return {leaf: value for key, child in tree.items() for leaf, value in leaves(child, f"{path}[{key!r}]").items()}


def test_the_copy_is_the_accepted_copy():
    """The one test that holds the bot's words (TEXTS and the command menus, Russian and English): every other
    test names a text by its key, so a changed text fails here alone, saying how to accept it."""
    copy = {"TEXTS": trt_bot.TEXTS, "COMMAND_MENUS": trt_bot.COMMAND_MENUS}
    if os.environ.get("ACCEPT_TEXTS") == "1":
        with open(COPY_SNAPSHOT, "w", encoding="utf-8") as snapshot:
            snapshot.write(json.dumps(copy, ensure_ascii=False, indent=1) + "\n")
    with open(COPY_SNAPSHOT, encoding="utf-8") as snapshot:
        accepted = json.load(snapshot)
    now, then = leaves(copy), leaves(accepted)
    changed = [path for path in {*now, *then} if now.get(path) != then.get(path)]
    assert not changed, (f"the copy differs from texts_snapshot.json in {', '.join(sorted(changed))}. "
                         "If you meant to change it, accept the new copy: "
                         "ACCEPT_TEXTS=1 .venv/bin/python -m pytest -q -k the_copy_is_the_accepted_copy")


QUICK_EDITS = {"change a text": "TEXTS", "add a model": "CATALOG", "add a command": "COMMAND_MENUS",
               "change a limit": "SETTINGS"}


@pytest.mark.parametrize("edit, place", QUICK_EDITS.items())
def test_each_quick_edit_in_the_docstring_names_a_place_that_is_there(edit, place):
    """The docstring's index sends a forker to one place per edit; what a forker changes comes before the engine."""
    (line,) = [line for line in trt_bot.__doc__.splitlines() if line.strip().startswith(edit)]
    assert line.split()[len(edit.split())].rstrip(":") == place and hasattr(trt_bot, place)
    source = inspect.getsource(trt_bot)
    defined_at = source.index(f"\n{place}:") if f"\n{place}:" in source else source.index(f"\n{place} =")
    surface = place != "SETTINGS"  # limits are environment variables: SETTINGS is the configuration section's
    assert (defined_at < source.index("\nclass TrtError")) == surface


def test_a_text_agrees_its_nouns_with_the_numbers_in_both_languages(monkeypatch):
    monkeypatch.setitem(trt_bot.TEXTS["ru"], "said", "{length:символ|символа|символов}, не больше {most:символа|символов|"
                                                     "символов}, {model}")
    monkeypatch.setitem(trt_bot.TEXTS["en"], "said", "{length:character|characters}, {most}, {model}")
    assert trt_bot.render("ru", "said", length=1001, most=1000, model=7) == "1001 символ, не больше 1000 символов, 7"
    assert trt_bot.render("ru", "said", length=1002, most=21, model=7) == "1002 символа, не больше 21 символа, 7"
    assert trt_bot.render("en", "said", length=1, most=1000, model=True) == "1 character, 1000, True"  # a bool is no count
    assert trt_bot.render("en", "said", length=3, most=2, model=None) == "3 characters, 2, None"


def test_every_text_has_both_languages_with_the_same_values_and_nouns_in_each_languages_forms():
    """What a forker must keep when changing a text: its {values}, and 3 Russian or 2 English noun forms."""
    fields = {lang: {key: [(name, spec) for _, name, spec, _ in string.Formatter().parse(text) if name is not None]
                     for key, text in texts.items()} for lang, texts in trt_bot.TEXTS.items()}
    assert fields["ru"].keys() == fields["en"].keys()
    for key in fields["ru"]:
        assert {name for name, _ in fields["ru"][key]} == {name for name, _ in fields["en"][key]}, key
        for lang, forms in (("ru", 3), ("en", 2)):
            assert all(spec.count("|") in (0, forms - 1) for _, spec in fields[lang][key]), (lang, key)


def test_prompt_limits_name_the_models_own_bounds():
    assert trt_bot.prompt_limits(ZIMAGE, "ru") == bot_text("ru", "limits_up_to", most=1000)
    assert trt_bot.prompt_limits(FLUX, "en") == bot_text("en", "limits_between", fewest=3, most=5000)


def without_text(**content) -> dict:
    return {"message_id": 1, "chat": {"id": 1}, **content}


@pytest.mark.parametrize("content, key", [
    ({"voice": {}}, "not_text_voice"),
    ({"photo": [{}]}, "prompt_not_text"),  # (in a private chat a photo is an edit, before this is asked)
    ({"sticker": {}}, "not_text_sticker"),
    ({"video_note": {}}, "not_text_video"),
    ({"video": {}}, "not_text_video"),
    ({"animation": {}, "document": {}}, "not_text_video"),  # a GIF also carries a document
    ({"document": {}}, "not_text_file"),
    ({"audio": {}}, "not_text_file"),
    ({"location": {}}, "prompt_not_text"),
])
def test_a_message_without_text_is_answered_by_what_it_holds(content, key):
    assert trt_bot.not_text_answer(without_text(**content)) == key


@pytest.mark.parametrize("text, command", [
    ("/start", "/start"),
    ("/start payload from a link", "/start"),
    ("/START@TrtBot", "/start"),
    ("/help@TrtBot extra", "/help"),
    ("/", "/"),
    ("start", None),
    (" /start", None),
    ("a cat on /mars", None),
])
def test_a_command_is_the_first_word_without_the_bot_name_in_lower_case(text, command):
    assert trt_bot.parse_command(text) == command


@pytest.mark.parametrize("user, language", [
    ({"language_code": "en"}, "en"),
    ({"language_code": "en-GB"}, "en"),
    ({"language_code": "de"}, "en"),
    ({"language_code": "ru"}, "ru"),
    ({"language_code": "uk-UA"}, "ru"),
    ({"language_code": "BE"}, "ru"),
    ({"language_code": "kk"}, "ru"),
    ({"language_code": ""}, "ru"),
    ({"language_code": None}, "ru"),
    ({}, "ru"),
    (None, "ru"),
])
def test_russian_reading_users_and_users_of_unknown_language_get_russian_the_rest_english(user, language):
    assert trt_bot.user_language(user) == language


async def test_english_speakers_get_english_and_unknown_language_gets_russian(make_app, fake_tg):
    app = await make_app()
    await post_update(app, update_message(1, 1, "/start", lang="en"))
    await post_update(app, update_message(2, 2, "/start", lang="uk"))
    await post_update(app, update_message(3, 3, "/start", lang=""))
    await eventually(lambda: len(fake_tg.calls_of("sendMessage")) == 3)
    assert says(fake_tg.texts_to(1)[0], "en", "start")
    assert says(fake_tg.texts_to(2)[0], "ru", "start") and says(fake_tg.texts_to(3)[0], "ru", "start")


async def test_a_language_chosen_with_the_language_command_is_kept_across_restarts(make_app, fake_tg):
    first = await make_app()
    await post_update(first, update_message(1, 30, "/language"))  # a Russian app
    await eventually(lambda: fake_tg.texts_to(30))
    choice = fake_tg.calls_of("sendMessage")[0]["reply_markup"]["inline_keyboard"]
    assert [b["callback_data"] for row in choice for b in row] == ["lang:ru", "lang:en"]
    await post_update(first, update_callback(2, 30, "lang:de"))  # forged: a pop-up only
    await post_update(first, update_callback(3, 30, "lang:en"))
    await post_update(first, update_message(4, 30, "/start"))
    await eventually(lambda: len(fake_tg.texts_to(30)) == 3)
    _, done, start = fake_tg.texts_to(30)
    assert done == bot_text("en", "language_set") and says(start, "en", "start")
    popups = [p.get("text") for p in fake_tg.calls_of("answerCallbackQuery")]
    assert popups == [bot_text("ru", "stale_button"), None]
    await first.stop()
    fake_tg.clear()
    second = await make_app()
    await post_update(second, update_message(5, 30, "/start"))
    await post_update(second, update_message(6, 31, "/start"))  # someone who never chose: their app's language
    await eventually(lambda: fake_tg.texts_to(30) and fake_tg.texts_to(31))
    assert says(fake_tg.texts_to(30)[0], "en", "start") and says(fake_tg.texts_to(31)[0], "ru", "start")


async def test_a_language_chosen_while_the_database_is_unusable_holds_in_memory(make_app, fake_tg, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    app = await make_app(DATABASE_URL=f"sqlite:///{blocker}/bot.sqlite3")
    await post_update(app, update_callback(1, 44, "lang:en"))
    await post_update(app, update_message(2, 44, "/start"))
    await eventually(lambda: len(fake_tg.texts_to(44)) == 2)
    assert fake_tg.texts_to(44)[0] == bot_text("en", "language_set") and says(fake_tg.texts_to(44)[1], "en", "start")


async def test_help_cancel_and_free_text_get_answers(make_app, fake_tg):
    app = await make_app()
    for n, text in enumerate(["/help", "/cancel", "просто текст", "/start@trt_test_bot"], start=1):
        await post_update(app, update_message(n, 9, text))
    await eventually(lambda: len(fake_tg.texts_to(9)) == 4)
    help_text, cancelled, described, start = fake_tg.texts_to(9)
    assert (help_text, cancelled, described) == tuple(bot_text("ru", key) for key in ("help", "nothing_to_cancel",
                                                                                     "not_configured"))
    assert says(start, "ru", "start")  # free text is a description: without a key, the bot says it is not set up
    assert all("reply_markup" in p for p in fake_tg.calls_of("sendMessage") if p["text"] != described)


@pytest.mark.parametrize("data", ["help", "nonsense", "ratio:99:99", "", "new:" + "x" * 60])
async def test_every_callback_query_is_answered(make_app, fake_tg, data):
    app = await make_app()
    await post_update(app, update_callback(1, 9, data))
    await eventually(lambda: fake_tg.calls_of("answerCallbackQuery"))
    assert fake_tg.calls_of("answerCallbackQuery")[0]["callback_query_id"] == "cq1"


async def test_start_uses_the_fallback_menu_when_building_the_menu_fails(make_app, fake_tg, monkeypatch, caplog):
    app = await make_app()

    def failing_menu(lang: str, models: tuple = (trt_bot.Z_IMAGE,)) -> dict:  # main_menu's own signature
        raise ZeroDivisionError("the menu cannot be built")

    monkeypatch.setattr(trt_bot, "main_menu", failing_menu)
    await post_update(app, update_message(1, 9, "/start"))
    await eventually(lambda: fake_tg.calls_of("sendMessage"))
    assert fake_tg.calls_of("sendMessage")[0]["reply_markup"] == trt_bot.FALLBACK_MENU
    (failure,) = [r for r in caplog.records if "[BOT] main menu failed" in r.getMessage()]
    assert failure.exc_info[0] is ZeroDivisionError  # the menu's own failure, not a call that does not fit it


###############################################################################
# 13. Outbox
###############################################################################

@pytest.fixture
async def database(tmp_path):
    db = trt_bot.Database(str(tmp_path / "outbox.sqlite3"))
    assert await db.open()
    yield db
    await db.close()


@respx.mock
async def test_a_chats_replies_keep_their_order_under_pacing_and_do_not_hold_up_other_chats(database):
    clock, sent = ManualClock(), []
    respx.post(url__startswith=f"{API}/bot{TOKEN}/").mock(side_effect=recording(sent, clock))
    outbox = trt_bot.Outbox(database, paced_client(chat_interval_s=1.0, clock=clock), clock=clock)
    for chat, text in ((1, "a1"), (1, "a2"), (1, "a3"), (2, "b1"), (2, "b2")):
        await outbox.send_message(chat, text)
    assert outbox.depth == 5 and len(await database.read(trt_bot.outbox_pending)) == 5  # queued durably
    await outbox.resume()
    await advance_until(clock, lambda: len(sent) == 5, 0.1)
    texts = [json.loads(call.request.content)["text"] for call in respx.calls]
    assert [t for t in texts if t[0] == "a"] == ["a1", "a2", "a3"] and [t for t in texts if t[0] == "b"] == ["b1", "b2"]
    assert texts.index("b1") < texts.index("a2")  # chat 2 went while chat 1 waited for its spacing
    stamps = [when for chat, _, when in sent if chat == 1]
    assert all(later - earlier >= 1.0 - 1e-6 for earlier, later in zip(stamps, stamps[1:]))
    await eventually_async(lambda: database.read(trt_bot.outbox_pending), lambda rows: rows == [])  # sent: gone
    assert outbox.sent["sendMessage"] == 5 and outbox.depth == 0
    await outbox.stop(1.0)


async def test_a_message_sent_while_the_outbox_takes_up_its_table_is_not_sent_again(database, fake_tg):
    # Used to: the take-up read the row of a message that ended meanwhile, and queued it again.
    async with httpx.AsyncClient() as http:
        outbox = trt_bot.Outbox(database, trt_bot.TelegramClient(TOKEN, fake_tg.base_url, http))
        await outbox.resume()
        fake_tg.stall("sendMessage")
        await outbox.send_message(5, "once")  # stored, and on its way
        await eventually(lambda: fake_tg.held("sendMessage") == 1)
        database_free = threading.Event()
        busy = asyncio.ensure_future(database.write(lambda conn: database_free.wait(10)))  # holds the database
        taking_up = asyncio.ensure_future(outbox.resume())  # as when the database comes back
        fake_tg.release("sendMessage")
        await eventually(lambda: outbox.depth == 0)  # sent while the take-up waits for the database
        database_free.set()
        await busy
        await taking_up
        await outbox.stop(grace=5)  # a barrier: what is queued is sent
    assert fake_tg.texts_to(5) == ["once"]
    assert await database.read(trt_bot.outbox_pending) == []


async def test_a_take_up_while_the_database_is_still_down_leaves_replies_held_in_memory_to_be_written(tmp_path,
                                                                                                   fake_tg):
    # Used to: a take-up with the database down counted as done: it marked the replies held only in memory as
    # stored, so they were never written once the database came back (and a kill -9 then lost them).
    blocker = tmp_path / "not-yet-a-folder"
    blocker.write_text("")
    db = trt_bot.Database(str(blocker / "outbox.sqlite3"))
    assert not await db.open()
    async with httpx.AsyncClient() as http:
        outbox = trt_bot.Outbox(db, trt_bot.TelegramClient(TOKEN, fake_tg.base_url, http))
        fake_tg.stall("sendMessage")
        await outbox.send_message(5, "kept")  # held in memory only
        await outbox.resume()  # the database still down
        await eventually(lambda: fake_tg.held("sendMessage") == 1)
        blocker.unlink()
        assert await db.open()
        await outbox.resume()  # as when the database comes back
        assert [row[3] for row in await db.read(trt_bot.outbox_pending)] == ['{"chat_id": 5, "text": "kept", '
                                                                              '"parse_mode": "HTML"}']
        fake_tg.release("sendMessage")
        await outbox.stop(grace=5)
    await db.close()
    assert fake_tg.texts_to(5) == ["kept"]


@respx.mock
async def test_a_chat_waiting_for_its_spacing_does_not_hold_up_the_sender(database):
    clock, sent = ManualClock(), []
    respx.post(url__startswith=f"{API}/bot{TOKEN}/").mock(side_effect=recording(sent, clock))
    outbox = trt_bot.Outbox(database, paced_client(chat_interval_s=1.0, clock=clock), senders=1, clock=clock)
    await outbox.resume()
    await outbox.send_message(1, "a1")
    await eventually(lambda: len(sent) == 1)
    await outbox.send_message(1, "a2")  # chat 1 must wait a second
    await eventually(lambda: clock.sleepers == 1)
    await outbox.send_message(2, "b1")
    await advance_until(clock, lambda: len(sent) == 2, 0.05)
    assert sent[1][0] == 2 and sent[1][2] < sent[0][2] + 0.5  # the one sender was free: chat 2 did not wait
    await advance_until(clock, lambda: len(sent) == 3, 0.1)
    await outbox.stop(1.0)


@respx.mock
async def test_a_reply_refused_for_good_ends_and_its_chat_goes_on(database):
    clock, sent = ManualClock(), []
    respx.post(url__startswith=f"{API}/bot{TOKEN}/").mock(
        side_effect=recording(sent, clock, bot_api_error(400, "Bad Request: chat not found")))
    outbox = trt_bot.Outbox(database, paced_client(clock=clock), clock=clock)
    await outbox.resume()
    await outbox.send_message(3, "refused")
    await outbox.send_message(3, "next")
    await advance_until(clock, lambda: len(sent) == 2, 0.1)
    await eventually(lambda: outbox.depth == 0)
    assert outbox.dropped["refused"] == 1 and outbox.sent["sendMessage"] == 1
    await outbox.stop(1.0)


@respx.mock
async def test_a_reply_telegram_cannot_take_waits_and_one_older_than_outbox_max_wait_ends(database):
    clock, sent = ManualClock(), []
    respx.post(url__startswith=f"{API}/bot{TOKEN}/").mock(
        side_effect=lambda request: sent.append(clock.now) or httpx.Response(502, text="Bad Gateway"))
    outbox = trt_bot.Outbox(database, paced_client(clock=clock), max_wait_s=600, clock=clock)
    await outbox.resume()
    await outbox.send_message(5, "stuck")
    await advance_until(clock, lambda: clock.now - sent[0] > 60 if sent else False, 1.0)
    assert outbox.depth == 1 and not outbox.dropped  # still waiting: no drop after N attempts
    await advance_until(clock, lambda: outbox.depth == 0, 5.0, timeout=30)
    assert outbox.dropped["expired"] == 1 and clock.now - sent[0] >= 600
    await outbox.stop(1.0)


@respx.mock
async def test_a_wall_clock_step_forward_does_not_expire_a_queued_reply(database):
    # A reply's age was read off the wall clock: setting it an hour forward dropped the reply at once.
    clock, sent = ManualClock(), []
    respx.post(url__startswith=f"{API}/bot{TOKEN}/").mock(side_effect=recording(sent, clock))
    outbox = trt_bot.Outbox(database, paced_client(clock=clock), max_wait_s=600, clock=clock)
    await outbox.send_message(5, "queued before the step")
    clock.wall_step = 3600.0
    await outbox.resume()
    await eventually(lambda: outbox.depth == 0)
    assert outbox.sent["sendMessage"] == 1 and not outbox.dropped
    await outbox.stop(1.0)


async def test_handling_goes_on_while_a_flood_pause_holds_the_replies(make_app, fake_tg):
    # Telegram asks for an hour: the replies wait, the dialog moves on and button presses are still answered.
    fake_tg.fail("sendMessage", 429, {"ok": False, "error_code": 429, "description": "Too Many Requests",
                                      "parameters": {"retry_after": 3600}})
    app = await make_app(KIE_API_KEY=KIE_KEY, SHUTDOWN_GRACE_S="1")
    await post_update(app, update_message(1, 42, "/start"))
    await eventually(lambda: app.telegram.pauses == 1)
    await post_update(app, update_callback(2, 42, "new"))
    await eventually(lambda: (app.role.states.get((42, 0, 42)) or {}).get("step") == "prompt")  # handled meanwhile
    await eventually(lambda: fake_tg.calls_of("answerCallbackQuery"))  # exempt: not held by the pause
    await eventually(lambda: app.role.outbox.depth == 2)  # the question is queued once the dialog's state is stored
    assert len(fake_tg.calls_of("sendMessage")) == 1
    assert app.pipeline.stats.processed == 2
    async with httpx.AsyncClient() as client:
        health = (await client.get(f"http://127.0.0.1:{app.port}/health")).json()
        metrics = (await client.get(f"http://127.0.0.1:{app.port}/metrics")).text
    assert health["outbox"]["depth"] == 2 and health["outbox"]["flood_pauses"] == 1
    assert health["outbox"]["telegram_429s"] == 1
    for line in ("trt_outbox_depth 2.0", "trt_telegram_429_total 1.0", "trt_telegram_flood_pauses_total 1.0"):
        assert line in metrics.splitlines()
    assert "trt_outbox_oldest_wait_seconds" in metrics


async def test_a_user_who_blocked_the_bot_is_marked_not_counted_as_an_error(make_app, fake_tg, tmp_path):
    app = await make_app()
    fake_tg.fail("sendMessage", 403, {"ok": False, "error_code": 403,
                                      "description": "Forbidden: bot was blocked by the user"})
    fake_tg.stall("sendMessage")  # Telegram answers once the update is marked done (its mark says "not blocked")

    def user_row() -> tuple | None:
        with contextlib.closing(sqlite3.connect(str(tmp_path / "bot.sqlite3"))) as conn:
            return conn.execute("SELECT blocked FROM users WHERE user_id=77").fetchone()
    await post_update(app, update_message(1, 77, "/start"))
    await eventually(lambda: user_row() == (0,))
    fake_tg.release("sendMessage")
    await eventually(lambda: app.role.outbox.dropped["refused"] == 1)
    assert app.pipeline.stats.errors == 0
    await eventually(lambda: user_row() == (1,))


async def test_a_reply_waiting_in_the_outbox_survives_kill_9(fake_tg, tmp_path, bot_processes):
    fake_tg.stall("sendMessage")  # the reply is queued, Telegram has not taken it
    database = tmp_path / "bot.sqlite3"
    env = bot_env(fake_tg, str(database), PORT=str(free_port()))
    first = bot_processes(env)
    await first.wait_healthy()
    config = trt_bot.load_config(env)
    async with httpx.AsyncClient() as client:
        response = await client.post(first.base_url + config.webhook_path, json=update_message(1, 901, "/start"),
                                     headers={"X-Telegram-Bot-Api-Secret-Token": config.webhook_secret})
        assert response.status_code == 200

    def update_done() -> bool:
        with contextlib.closing(sqlite3.connect(str(database))) as conn:
            return conn.execute("SELECT done_at FROM inbox WHERE update_id=1").fetchone()[0] is not None
    await eventually(update_done)  # handled: only the outbox still holds the reply
    await eventually(lambda: fake_tg.held("sendMessage") == 1)
    first.kill()
    fake_tg.release("sendMessage")
    await eventually(lambda: fake_tg.held("sendMessage") == 0)
    fake_tg.clear()
    second = bot_processes({**env, "PORT": str(free_port())})
    await second.wait_healthy()
    await eventually(lambda: [p["chat_id"] for p in fake_tg.calls_of("sendMessage")] == [901], timeout=20)


async def test_one_commit_per_update_a_reply_rides_with_its_done_mark_and_one_sent_before_is_never_written(
        make_app, fake_tg):
    fake_tg.stall("sendMessage")  # the reply waits in the outbox
    app = await make_app()
    outbox_rows = lambda conn: conn.execute("SELECT update_id FROM outbox").fetchall()  # noqa: E731
    shared = trt_bot.inbox_write_reading_older  # the outbox's writes share the inbox's commits
    before = app.db.batches[shared]
    assert (await post_update(app, update_message(1, 901, "/start"))).status_code == 200
    await asyncio.wait_for(app.pipeline.idle(), 10)  # handled and marked done
    assert await app.db.read(outbox_rows) == [(1,)]
    assert app.db.batches[shared] == before + 2  # the ack's insert, then the reply with the done mark
    fake_tg.release("sendMessage")
    await eventually_async(lambda: app.db.read(outbox_rows), lambda rows: rows == [])  # sent: its row goes

    sent_in_handler, before = app.pipeline.handler, app.db.batches[shared]

    async def handler_waiting_for_its_reply(update: dict) -> None:
        await sent_in_handler(update)
        await eventually(lambda: len(fake_tg.calls_of("sendMessage")) == 2)  # Telegram took it before the mark

    app.pipeline.handler = handler_waiting_for_its_reply
    assert (await post_update(app, update_message(2, 901, "/start"))).status_code == 200
    await asyncio.wait_for(app.pipeline.idle(), 10)
    assert await app.db.read(outbox_rows) == [] and app.db.batches[shared] == before + 2  # never written, nor deleted


###############################################################################
# 14. Application: webhook set-up, polling, diagnostics, shutdown
###############################################################################

MATCHING = {"url": "U", "allowed_updates": trt_bot.ALLOWED_UPDATES}


@pytest.mark.parametrize("info, action, says", [
    ({**MATCHING, "pending_update_count": 0}, "keep", "kept 0 pending updates, at most 10"),
    ({**MATCHING, "pending_update_count": 125}, "flush", "125 pending updates, over WEBHOOK_FLUSH_PENDING_OVER=10"),
    ({**MATCHING, "pending_update_count": 10}, "keep", "kept 10 pending updates"),
    ({"url": "https://old.example.com/hook", "pending_update_count": 3}, "set", "URL differs; kept 3 pending"),
    ({"url": "U", "pending_update_count": 0, "allowed_updates": ["message"]}, "set", "allowed updates differ"),
    # Regression: any last error (every deploy gap leaves one) used to drop the backlog.
    ({**MATCHING, "pending_update_count": 0, "last_error_message": "Read timeout expired"}, "keep",
     "kept 0 pending updates, at most 10 (the last error, 'Read timeout expired', is no reason to drop them)"),
    ({**MATCHING, "pending_update_count": 3, "last_error_message": "Connection refused"}, "keep",
     "kept 3 pending updates"),
    ({**MATCHING, "pending_update_count": 11, "last_error_message": "Connection refused"}, "flush", "11 pending"),
])
def test_plan_webhook_drops_only_a_backlog_over_the_threshold_and_says_why(info, action, says):
    assert trt_bot.plan_webhook(info, "U", trt_bot.ALLOWED_UPDATES, 10)[0] == action
    assert says in trt_bot.plan_webhook(info, "U", trt_bot.ALLOWED_UPDATES, 10)[1]


@pytest.mark.parametrize("pending, action, says", [(0, "keep", "kept 0 pending updates, at most 0"),
                                                   (1, "flush", "1 pending updates, over WEBHOOK_FLUSH_PENDING_OVER=0")])
def test_a_threshold_of_0_keeps_an_empty_backlog_and_drops_any_other(pending, action, says):
    info = {**MATCHING, "pending_update_count": pending}
    assert trt_bot.plan_webhook(info, "U", trt_bot.ALLOWED_UPDATES, 0)[0] == action
    assert says in trt_bot.plan_webhook(info, "U", trt_bot.ALLOWED_UPDATES, 0)[1]


def test_flush_can_be_disabled():
    info = {**MATCHING, "pending_update_count": 500, "last_error_message": "x"}
    assert trt_bot.plan_webhook(info, "U", trt_bot.ALLOWED_UPDATES, -1) == (
        "keep", "webhook already matches; kept 500 pending updates, WEBHOOK_FLUSH_PENDING_OVER=-1 never drops "
                "(the last error, 'x', is no reason to drop them)")


async def test_ensure_webhook_leaves_a_matching_webhook_alone(make_app, fake_tg, caplog):
    config = trt_bot.load_config(bot_env(fake_tg, ":memory:"))
    fake_tg.webhook_info = {"url": config.webhook_url, "pending_update_count": 0,
                            "allowed_updates": trt_bot.ALLOWED_UPDATES}
    await make_app()
    (done,) = await eventually(lambda: [r for r in caplog.records if "[WEBHOOK] configured" in r.getMessage()])
    assert "(keep: " in done.getMessage() and fake_tg.calls_of("setWebhook") == []


async def test_a_deploy_gaps_backlog_and_last_error_are_kept_and_the_log_says_so(make_app, fake_tg, caplog):
    # Regression: a last error, which every deploy gap leaves, flushed the 3 updates users sent meanwhile.
    config = trt_bot.load_config(bot_env(fake_tg, ":memory:"))
    fake_tg.webhook_info = {"url": config.webhook_url, "pending_update_count": 3, "allowed_updates":
                            trt_bot.ALLOWED_UPDATES, "last_error_message": "Connection refused"}
    await make_app()
    configured = await eventually(lambda: [r.getMessage() for r in caplog.records if "[WEBHOOK] configured" in
                                           r.getMessage()])
    assert fake_tg.calls_of("setWebhook") == [] and fake_tg.webhook_info["pending_update_count"] == 3
    assert "(keep: webhook already matches; kept 3 pending updates, at most 10 (the last error" in configured[0]
    assert not [r for r in caplog.records if "[WEBHOOK] flushed" in r.getMessage()]


@pytest.mark.parametrize("info, dropped", [
    ({"url": "https://other.example.com/x", "pending_update_count": 0}, False),
    ({"url": "SAME", "pending_update_count": 11, "allowed_updates": trt_bot.ALLOWED_UPDATES}, True),
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


async def test_telegram_is_asked_for_edited_messages_by_the_webhook_and_by_polling(make_app, fake_tg):
    fake_tg.webhook_info = {"url": "https://bot.example.com/old", "allowed_updates": ["message", "callback_query"]}
    webhook_mode = await make_app()
    await eventually(lambda: fake_tg.calls_of("setWebhook"))
    assert "edited_message" in fake_tg.calls_of("setWebhook")[0]["allowed_updates"]
    await webhook_mode.stop()  # (it holds the lease: a second bot on its database would stay passive)
    await make_app(BOT_MODE="polling", WEBHOOK_BASE_URL="", poll_timeout=0)
    await eventually(lambda: fake_tg.calls_of("getUpdates"))
    assert "edited_message" in fake_tg.calls_of("getUpdates")[0]["allowed_updates"]


async def test_polling_mode_feeds_the_inbox_advances_offsets_and_survives_409(make_app, fake_tg, caplog):
    fake_tg.fail("getUpdates", 409, {"ok": False, "error_code": 409,
                                     "description": "Conflict: terminated by other getUpdates request"})
    fake_tg.push_updates(update_message(10, 1, "/start"), update_message(11, 2, "/start"))
    clock = ManualClock()
    app = await make_app(BOT_MODE="polling", WEBHOOK_BASE_URL="", poll_timeout=1, clock=clock)
    await eventually(lambda: [r for r in caplog.records if "[POLL] 409 Conflict" in r.getMessage()])
    await eventually(lambda: clock.sleepers >= 4)  # the database, lease and red-flag loops, and the 409's backoff
    assert len(fake_tg.calls_of("getUpdates")) == 1  # asleep on the clock: it asks again once the clock moves
    clock.advance(1.0)  # the backoff is over: polling goes on
    await advance_until(clock, lambda: len(fake_tg.calls_of("sendMessage")) == 2, 0.05)  # replies are spaced
    fake_tg.push_updates(update_message(12, 3, "/help"))
    def offsets() -> list:
        return [p.get("offset") for p in fake_tg.calls_of("getUpdates")]
    # The reply and the next poll (past update 12) go their own ways: wait for both.
    await advance_until(clock, lambda: fake_tg.texts_to(3) and 13 in offsets(), 0.05)
    assert 12 in offsets()
    assert fake_tg.calls_of("deleteWebhook")[0]["drop_pending_updates"] is False
    assert fake_tg.calls_of("setWebhook") == []
    assert app.pipeline.stats.duplicates == 0


async def test_health_has_the_documented_shape(make_app):
    app = await make_app()
    async with httpx.AsyncClient() as client:
        health = (await client.get(f"http://127.0.0.1:{app.port}/health")).json()
    assert {"status", "uptime", "active", "webhook_mode", "lock_acquired", "db_schema_ready", "queue"} <= set(health)
    assert set(health["queue"]) >= {"total_received", "total_processed", "total_dropped", "total_errors",
                                    "workers_active", "queue_depth", "queue_max", "drop_rate", "handling_deferred"}
    assert health["status"] == "ok" and health["webhook_mode"] is True and health["queue"]["queue_max"] == 100
    assert health["warnings"] == []


async def test_every_builtin_route_is_refused_as_the_callback_path(make_app):
    app = await make_app()
    for path in app.routes.keys() - {"/" + app.config.kie_callback_path}:
        with pytest.raises(trt_bot.ConfigError, match="collides with the bot's own route"):
            trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, "KIE_CALLBACK_PATH": path})


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
    assert "Wrong response" in first["last_error_message"]


def count_requests(app: trt_bot.App, monkeypatch) -> list[int]:
    """How many requests have reached the app's router so far, as a one-item list the test can read."""
    entered, route = [0], app.server.handler

    async def counted(request: trt_bot.Request) -> trt_bot.Response:
        entered[0] += 1
        return await route(request)

    monkeypatch.setattr(app.server, "handler", counted)
    return entered


async def get_many(app: trt_bot.App, path: str, n: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.port}", limits=limits, timeout=30) as client:
        return await asyncio.gather(*(client.get(path) for _ in range(n)))


async def test_50_concurrent_diag_webhook_requests_make_one_getwebhookinfo_call(make_app, fake_tg, monkeypatch):
    # Regression: each request called getWebhookInfo itself while the first was in flight (50 -> 50 calls).
    app = await make_app()
    await eventually(lambda: fake_tg.calls_of("setWebhook"))
    before = len(fake_tg.calls_of("getWebhookInfo"))
    entered = count_requests(app, monkeypatch)
    fake_tg.stall("getWebhookInfo")
    requests = asyncio.ensure_future(get_many(app, "/diag/webhook", 50))
    await eventually(lambda: entered[0] == 50)  # every request is waiting for Telegram now
    fake_tg.release("getWebhookInfo")
    responses = await requests
    assert [r.status_code for r in responses] == [200] * 50
    assert {r.json()["url"] for r in responses} == {"https://bot.example.com/webhook/***"}
    assert len(fake_tg.calls_of("getWebhookInfo")) == before + 1


async def test_a_failed_getwebhookinfo_reaches_every_waiter_and_is_not_cached(make_app, fake_tg, monkeypatch):
    app = await make_app()
    await eventually(lambda: fake_tg.calls_of("setWebhook"))
    before = len(fake_tg.calls_of("getWebhookInfo"))
    entered = count_requests(app, monkeypatch)
    fake_tg.fail("getWebhookInfo", 400, {"ok": False, "error_code": 400, "description": "Bad Request: nope"})
    fake_tg.stall("getWebhookInfo")
    requests = asyncio.ensure_future(get_many(app, "/diag/webhook", 10))
    await eventually(lambda: entered[0] == 10)
    fake_tg.release("getWebhookInfo")
    failed = await requests
    assert {(r.status_code, r.json()["error"]) for r in failed} == {(502, "getWebhookInfo: 400 Bad Request: nope")}
    assert len(fake_tg.calls_of("getWebhookInfo")) == before + 1
    (again,) = await get_many(app, "/diag/webhook", 1)  # the failure was not kept: Telegram is asked again
    assert again.status_code == 200 and len(fake_tg.calls_of("getWebhookInfo")) == before + 2


async def test_a_waiter_that_gives_up_does_not_cancel_the_shared_call():
    release, started = asyncio.Event(), []

    async def slow() -> str:
        started.append(1)
        await release.wait()
        return "info"

    shared = trt_bot.SharedCall(slow, max_age=5)
    impatient, patient = asyncio.ensure_future(shared.get()), asyncio.ensure_future(shared.get())
    await eventually(lambda: started)
    impatient.cancel()
    release.set()
    assert await patient == "info" and await shared.get() == "info"
    assert impatient.cancelled() and shared.calls == 1


async def test_the_command_menu_is_english_by_default_and_russian_for_russian_reading_languages_set_once(
        make_app, fake_tg, caplog):
    fake_tg.commands = {"ru": [{"command": "start", "description": "an old menu"}]}
    first = await make_app()
    await eventually(lambda: [r for r in caplog.records if "[COMMANDS] menu" in r.getMessage()])
    menus = {p.get("language_code", ""): p["commands"] for p in fake_tg.calls_of("setMyCommands")}
    assert sorted(menus) == ["", "be", "kk", "ru", "uk"]
    assert all([c["command"] for c in menu] == ["start", "draw", "settings", "help", "cancel", "language"]
               for menu in menus.values())
    assert menus[""] == trt_bot.COMMAND_MENUS[""]  # English: a German user reads the menu the replies speak
    assert menus["uk"] == menus["ru"] == trt_bot.RUSSIAN_MENU != menus[""]
    await first.stop()
    fake_tg.clear()
    await make_app()  # a restart finds the menu in place and leaves it alone
    await eventually(lambda: [r for r in caplog.records if "[COMMANDS] menu already up to date" in r.getMessage()])
    assert fake_tg.calls_of("setMyCommands") == []


async def test_a_failing_command_menu_set_up_is_retried_without_holding_up_start(make_app, fake_tg, caplog):
    fake_tg.fail("getMyCommands", 502, {"ok": False, "error_code": 502, "description": "Bad Gateway"})
    fake_tg.fail("setMyCommands", 400, {"ok": False, "error_code": 400, "description": "Bad Request: try later"})
    app = await make_app()
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"http://127.0.0.1:{app.port}/health")).status_code == 200
    await eventually(lambda: [r for r in caplog.records if "[COMMANDS] set-up failed" in r.getMessage()])
    await eventually(lambda: set(fake_tg.commands) == {"", "be", "kk", "ru", "uk"})


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
    await eventually(lambda: fake_tg.held("sendMessage") == 5)  # every reply is in a sender, waiting on Telegram
    bot.process.send_signal(signal.SIGTERM)

    async def refuses_connections() -> bool:
        try:
            async with httpx.AsyncClient() as client:
                await client.get(bot.base_url + "/health")
        except httpx.ConnectError:
            return True
        return False

    await eventually_async(refuses_connections, bool)  # its server is closed: the shutdown has reached the drain
    assert "[APP] shutting down" in bot.log
    assert bot.process.poll() is None  # still draining: it waits for the replies Telegram holds up
    fake_tg.release("sendMessage")  # the drain can finish now
    assert await asyncio.to_thread(bot.process.wait, 30) == 0
    assert {p["chat_id"] for p in fake_tg.calls_of("sendMessage")} == set(range(601, 606))
    assert "[APP] stopped" in bot.log and "[QUEUE] Workers started" in bot.log and "[WEBHOOK] configured" in bot.log


def test_no_log_record_in_the_whole_suite_contains_a_secret():
    # Runs last in this file: every record the suite produced, at DEBUG, httpx's included.
    assert len(ALL_RECORDS.records) > 100
    assert any(r.name == "httpx" for r in ALL_RECORDS.records)
    leaked = [formatted(r) for r in ALL_RECORDS.records if any(s in formatted(r) for s in SECRETS + DERIVED_SECRETS)]
    assert leaked == []


def test_start_up_objects_are_kept_out_of_later_full_collections():
    gc.unfreeze()
    try:
        trt_bot.freeze_start_up_objects()
        assert gc.get_freeze_count() > 1000  # every module's objects, not a handful
    finally:
        gc.unfreeze()
