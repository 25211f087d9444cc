"""Shared test fixtures: a fake Telegram Bot API on 127.0.0.1 and helpers to run the bot.

The fake is a real HTTP server (stdlib http.server in a thread), so the bot's
httpx client, connection pool and error handling are exercised for real.  It
records every call and can be scripted to fail, stall or hold updates for
getUpdates.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import http.server
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Any, Callable

import httpx
import pytest

import trt_bot

HERE = os.path.dirname(os.path.abspath(__file__))
TOKEN = "123456789:AAHtestTOKENsecretPART_abcdefghijklmno"
KIE_KEY = "kie-test-key-0123456789abcdef"
POSTGRES_PASSWORD = "pg-test-password-5d1f0c"  # the test PostgreSQL server's (see the end of this file)
SECRETS = (TOKEN, TOKEN.split(":")[1], KIE_KEY, POSTGRES_PASSWORD)
DIAG_TOKEN = "diag-secret"
KIE_HMAC_KEY = "hmac-key"


def _derived_secrets() -> tuple[str, ...]:
    """What the bot derives from the secrets (the webhook secret and path, the callback token), the other
    secrets the tests set, and their URL-encoded forms: worked out from the env the tests use."""
    config = trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, "KIE_API_KEY": KIE_KEY, "DIAG_TOKEN": DIAG_TOKEN,
                                  "KIE_WEBHOOK_HMAC_KEY": KIE_HMAC_KEY})
    values = (config.webhook_secret, config.webhook_path.rpartition("/")[2], config.kie_callback_token,
              DIAG_TOKEN, KIE_HMAC_KEY)
    forms = (lambda v: v, lambda v: urllib.parse.quote(v, safe=""), urllib.parse.quote_plus)
    return tuple(dict.fromkeys(form(value) for value in values for form in forms))


DERIVED_SECRETS = _derived_secrets()


# -- the suite-wide log capture that proves no secret is ever logged ----------

class RecordCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


ALL_RECORDS = RecordCollector()


@pytest.fixture(scope="session", autouse=True)
def capture_every_log_record_at_debug():
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.DEBUG)
    root.addHandler(ALL_RECORDS)
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield ALL_RECORDS
    root.removeHandler(ALL_RECORDS)
    root.setLevel(old_level)


def formatted(record: logging.LogRecord) -> str:
    return logging.Formatter("%(name)s %(message)s").format(record)


# -- fakes of Telegram and Kie.ai -------------------------------------------------

class FakeServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 that hands each request to ``answer``.

    ``answer(http_method, path, query, headers, body)`` returns (status, payload):
    a dict goes out as JSON, bytes as an image.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, method: str, path: str, query: dict, headers: Any, body: bytes) -> tuple[int, Any]:
        raise NotImplementedError

    def _handler_class(self):
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def log_message(self, *args: Any) -> None:
                pass

            def _dispatch(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                path, _, query = self.path.partition("?")
                status, payload = fake.answer(self.command, path, dict(urllib.parse.parse_qsl(query)),
                                              self.headers, body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "image/png" if isinstance(payload, bytes) else "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = _dispatch

        return Handler


class FakeBotApi(FakeServer):
    """Answers Bot API methods like Telegram does and records each call.

    ``calls`` holds (method, params) in arrival order.  ``fail(method, status,
    body)`` queues a scripted answer for the next call of that method;
    ``stall(method)`` makes that method hang until ``release(method)``;
    ``held(method)`` counts the calls hanging (recorded once they go on).
    """

    def __init__(self, token: str = TOKEN):
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        self.webhook_info: dict[str, Any] = {"url": "", "pending_update_count": 0, "has_custom_certificate": False}
        self.pending_updates: list[dict] = []
        self.star_transactions: list[dict] = []  # what getStarTransactions pages through, oldest first
        self.commands: dict[str, list[dict]] = {}  # the command menu per language_code ("" = default)
        self._scripted: dict[str, list[tuple[int, dict]]] = {}
        self._stalled: dict[str, threading.Event] = {}
        self._stalled_calls: dict[str, int] = {}
        self._message_id = 1000
        self._edited: dict[tuple, tuple] = {}  # (chat id, message id) -> its text and keyboard after the last edit
        self.files: dict[str, bytes] = {}  # file id -> content, for getFile and /file/bot<token>/<path>
        super().__init__()

    def close(self) -> None:
        for event in self._stalled.values():
            event.set()
        super().close()

    # scripting
    def fail(self, method: str, status: int, body: dict) -> None:
        with self._cond:
            self._scripted.setdefault(method, []).append((status, body))

    def stall(self, method: str) -> None:
        self._stalled[method] = threading.Event()

    def release(self, method: str) -> None:
        self._stalled.pop(method).set()

    def held(self, method: str) -> int:
        with self._cond:
            return self._stalled_calls.get(method, 0)

    def push_updates(self, *updates: dict) -> None:
        with self._cond:
            self.pending_updates.extend(updates)
            self._cond.notify_all()

    # observing
    def calls_of(self, method: str) -> list[dict]:
        with self._cond:
            return [params for name, params in self.calls if name == method]

    def texts_to(self, chat_id: int) -> list[str]:
        return [p.get("text", "") for p in self.calls_of("sendMessage") if p.get("chat_id") == chat_id]

    def clear(self) -> None:
        with self._cond:
            self.calls.clear()

    # serving
    def answer(self, http_method: str, path: str, query: dict, headers: Any, body: bytes) -> tuple[int, Any]:
        prefix = f"/bot{self.token}/"
        if path.startswith(f"/file/bot{self.token}/photos/"):  # a file download, by the path getFile gave
            content = self.files.get(path.rsplit("/", 1)[-1])
            return (200, content) if content is not None else (404, {"ok": False, "error_code": 404})
        if not path.startswith(prefix):
            return 401, {"ok": False, "error_code": 401, "description": "Unauthorized"}
        method = path[len(prefix):]
        params = parse_body(headers.get("Content-Type", ""), body)
        stalled = self._stalled.get(method)
        if stalled is not None:
            with self._cond:
                self._stalled_calls[method] = self._stalled_calls.get(method, 0) + 1
            stalled.wait(60)
        with self._cond:
            if stalled is not None:
                self._stalled_calls[method] -= 1
            self.calls.append((method, params))
            self._cond.notify_all()
            if self._scripted.get(method):
                return self._scripted[method].pop(0)
        if method == "editMessageText" and self._unchanged_by(params):
            return 400, {"ok": False, "error_code": 400,
                         "description": "Bad Request: message is not modified: specified new message content and "
                                        "reply markup are exactly the same as a current content"}
        if method == "getUpdates":
            return 200, {"ok": True, "result": self._get_updates(params)}
        return 200, {"ok": True, "result": self._result(method, params)}

    def _unchanged_by(self, edit: dict) -> bool:
        """Whether an edit would leave its message as it is (Telegram refuses such an edit), remembering it if not."""
        key = (edit.get("chat_id"), edit.get("message_id"))
        content = (edit.get("text"), json.dumps(edit.get("reply_markup"), sort_keys=True))
        with self._cond:
            if self._edited.get(key) == content:
                return True
            self._edited[key] = content
        return False

    def _result(self, method: str, params: dict) -> Any:
        if method in ("sendMessage", "sendPhoto", "sendDocument", "editMessageText"):
            with self._cond:
                self._message_id += 1
                message_id = self._message_id
            chat_id = params.get("chat_id")
            return {"message_id": message_id, "date": int(time.time()), "chat": {"id": chat_id, "type": "private"}}
        if method == "getWebhookInfo":
            return dict(self.webhook_info)
        if method == "setWebhook":
            pending = 0 if params.get("drop_pending_updates") else self.webhook_info.get("pending_update_count", 0)
            self.webhook_info = {"url": params["url"], "pending_update_count": pending,
                                 "allowed_updates": params.get("allowed_updates", []), "max_connections": 40}
            return True
        if method == "deleteWebhook":
            self.webhook_info = {"url": "", "pending_update_count": 0}
            return True
        if method == "setMyCommands":
            self.commands[params.get("language_code", "")] = params["commands"]
            return True
        if method == "getMyCommands":
            return self.commands.get(params.get("language_code", ""), [])
        if method == "getStarTransactions":
            offset, limit = int(params.get("offset") or 0), int(params.get("limit") or 100)
            with self._cond:
                return {"transactions": self.star_transactions[offset:offset + limit]}
        if method == "getFile":
            content = self.files.get(params.get("file_id", ""))
            return None if content is None else {"file_id": params["file_id"], "file_size": len(content),
                                                 "file_path": f"photos/{params['file_id']}"}
        if method == "getMe":
            return {"id": 123456789, "is_bot": True, "first_name": "Test", "username": "trt_test_bot"}
        return True

    def _get_updates(self, params: dict) -> list[dict]:
        offset = int(params.get("offset") or 0)
        deadline = time.monotonic() + min(float(params.get("timeout") or 0), 5.0)
        with self._cond:
            self.pending_updates = [u for u in self.pending_updates if u["update_id"] >= offset]
            while not self.pending_updates and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            return list(self.pending_updates)


PNG_BYTES = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f\x15"
             b"\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\x0f\x00\x00\x01\x01\x00\x05\x18\xd8N\x00\x00\x00\x00IEND\xaeB`\x82")


class FakeKie(FakeServer):
    """The Kie.ai Market API: createTask, recordInfo, credits, and the result images.

    Tasks stay "generating" until ``complete(task_id)`` or ``fail_task(task_id)``.
    ``script(endpoint, status, body)`` queues an answer for the next call of
    ``createTask`` / ``recordInfo`` / ``credit``.
    """

    def __init__(self, key: str = KIE_KEY):
        self.key = key
        self.created: list[dict] = []  # createTask bodies
        self.record_calls: list[str] = []  # task ids asked about
        self.tasks: dict[str, dict] = {}
        self.credits = 1234.5
        self.images_asked = 0  # result image downloads
        self.images_held: threading.Event | None = None  # set: downloads answer once it is set
        self.uploads: dict[str, bytes] = {}  # file name -> content (Kie deletes them within days: clear() it)
        self.requests: list[tuple[str, dict, dict, bytes]] = []  # (path, query, headers, body) of every request
        self._scripted: dict[str, list[tuple[int, dict]]] = {}
        super().__init__()

    def script(self, endpoint: str, status: int, body: dict) -> None:
        with self._cond:
            self._scripted.setdefault(endpoint, []).append((status, body))

    def image_url(self, name: str = "result.png") -> str:
        return f"{self.base_url}/images/{name}"

    def complete(self, task_id: str, url: str | None = None) -> None:
        with self._cond:
            self.tasks[task_id].update(state="success", resultJson=json.dumps({"resultUrls": [url or self.image_url()]}))

    def fail_task(self, task_id: str, code: str = "500", message: str = "internal error") -> None:
        with self._cond:
            self.tasks[task_id].update(state="fail", failCode=code, failMsg=message)

    def callback_body(self, task_id: str) -> dict:
        """What Kie POSTs to callBackUrl once the task is finished."""
        with self._cond:
            record = dict(self.tasks[task_id])
        return {"code": 200 if record["state"] == "success" else 501, "msg": "Playground task completed.",
                "data": record}

    def answer(self, method: str, path: str, query: dict, headers: Any, body: bytes) -> tuple[int, Any]:
        with self._cond:
            self.requests.append((path, query, dict(headers), body))
        if path.startswith("/images/"):
            with self._cond:
                self.images_asked += 1
            if self.images_held is not None:
                self.images_held.wait(30)
            return 200, PNG_BYTES
        if path.startswith("/uploads/"):
            content = self.uploads.get(path.rsplit("/", 1)[-1])
            return (200, content) if content is not None else (404, {"code": 404, "msg": "expired"})
        endpoint = path.rsplit("/", 1)[-1]
        with self._cond:
            if headers.get("Authorization") != f"Bearer {self.key}":
                return 200, {"code": 401, "msg": "You do not have access permissions"}
            if endpoint == "file-stream-upload":  # Kie's File Upload API (KIE_UPLOAD_BASE is this fake too)
                form = parse_body(headers.get("Content-Type", ""), body)
                self.uploads[form["fileName"]] = form["file"]
                return 200, {"success": True, "code": 200, "msg": "File uploaded successfully",
                             "data": {"fileName": form["fileName"], "downloadUrl": f"{self.base_url}/uploads/"
                                                                                   f"{form['fileName']}"}}
            if endpoint == "createTask":
                self.created.append(json.loads(body))
            elif endpoint == "recordInfo":
                self.record_calls.append(query.get("taskId", ""))
            if self._scripted.get(endpoint):
                return self._scripted[endpoint].pop(0)
            if endpoint == "createTask":
                task_id = f"task{len(self.created):05d}"
                request = self.created[-1]
                self.tasks[task_id] = {"taskId": task_id, "model": request["model"], "state": "generating",
                                       "param": json.dumps(request), "resultJson": "", "failCode": "", "failMsg": ""}
                return 200, {"code": 200, "msg": "success", "data": {"taskId": task_id}}
            if endpoint == "recordInfo":
                record = self.tasks.get(query.get("taskId", ""))
                if record is None:
                    return 200, {"code": 404, "msg": "Task not found"}
                return 200, {"code": 200, "message": "success", "data": dict(record)}
            if endpoint == "credit":
                return 200, {"code": 200, "msg": "success", "data": self.credits}
        return 404, {"code": 404, "msg": "no such endpoint"}


def parse_body(content_type: str, body: bytes) -> dict:
    """JSON or multipart/form-data (files come back as bytes) into a dict."""
    if content_type.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        params: dict[str, Any] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            params[name] = payload if part.get_filename() else payload.decode()
        return params
    return json.loads(body) if body else {}


@pytest.fixture
def fake_tg():
    fake = FakeBotApi()
    yield fake
    fake.close()


@pytest.fixture
def fake_kie():
    fake = FakeKie()
    yield fake
    fake.close()


# -- running the bot ------------------------------------------------------------

def bot_env(fake: FakeBotApi, database: str, **overrides: str) -> dict[str, str]:
    env = {
        "TELEGRAM_BOT_TOKEN": TOKEN,
        "TELEGRAM_API_BASE": fake.base_url,
        "BOT_MODE": "webhook",
        "WEBHOOK_BASE_URL": "https://bot.example.com",
        "DATABASE_URL": f"sqlite:///{database}",
        "HOST": "127.0.0.1",
        "PORT": "0",
        "SINGLE_MODEL_ONLY": "1",
        # Replies go at the fakes' speed; the pacing at Telegram's limits has tests of its own.
        "TELEGRAM_SEND_RATE": "1000",
        "TELEGRAM_CHAT_INTERVAL_S": "0",
        "TELEGRAM_GROUP_PER_MINUTE": "0",
    }
    env.update(overrides)
    return env


@pytest.fixture
def fast_jobs(monkeypatch):
    """Poll every 50 ms and retry Kie within 10 ms, so tests need not wait out production pacing.

    Set before ``make_app``: a KieClient takes KIE_RETRY when it is built.
    """
    monkeypatch.setattr(trt_bot, "POLL_SCHEDULE", ((1e9, 0.05),))
    monkeypatch.setattr(trt_bot, "KIE_RETRY", dataclasses.replace(trt_bot.KIE_RETRY, base_s=0.01, cap_s=0.01))


@pytest.fixture
async def make_app(fake_tg, tmp_path):
    """Start in-process bots: ``await make_app(**env, poll_timeout=..., clock=...)``; all stopped at the end."""
    apps: list[trt_bot.App] = []

    async def start(*, poll_timeout: float = trt_bot.POLL_TIMEOUT_S, clock: trt_bot.Clock = trt_bot.SYSTEM_CLOCK,
                    **overrides: str) -> trt_bot.App:
        if isinstance(clock, ManualClock):  # moved by hand, further than a lease is trusted: it outlives the test
            overrides = {"LEASE_TTL_S": "600", **overrides}
        env = bot_env(fake_tg, str(tmp_path / "bot.sqlite3"), **overrides)
        config = trt_bot.load_config(env)
        app = trt_bot.App(config, clock=clock, poll_timeout=poll_timeout)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await stop_within(app, APP_STOP_DEADLINE_S)


APP_STOP_DEADLINE_S = 60.0  # well past SHUTDOWN_GRACE_S: a stop that takes longer is hung


async def stop_within(app: trt_bot.App, seconds: float) -> None:
    """Stop ``app``, or fail with the stack of every task still running: a hung shutdown is a bug."""
    try:
        await asyncio.wait_for(asyncio.shield(app.stop()), seconds)
    except TimeoutError:
        stacks = []
        for task in asyncio.all_tasks():
            frames = "".join(f"\n    {f.f_code.co_filename}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack())
            stacks.append(f"{task.get_name()}{frames}")
        pytest.fail(f"App.stop() did not finish within {seconds}s; tasks:\n" + "\n".join(stacks))


def update_message(update_id: int, chat_id: int, text: str, lang: str = "ru") -> dict:
    user = {"id": chat_id, "is_bot": False, "first_name": "U", "language_code": lang}
    return {"update_id": update_id, "message": {"message_id": update_id, "date": int(time.time()),
                                                "chat": {"id": chat_id, "type": "private"}, "from": user,
                                                "text": text}}


def update_callback(update_id: int, chat_id: int, data: str, lang: str = "ru") -> dict:
    user = {"id": chat_id, "is_bot": False, "first_name": "U", "language_code": lang}
    return {"update_id": update_id, "callback_query": {
        "id": f"cq{update_id}", "from": user, "chat_instance": "1", "data": data,
        "message": {"message_id": 1, "date": int(time.time()), "chat": {"id": chat_id, "type": "private"}}}}


def update_pre_checkout(update_id: int, user_id: int, payload: str, stars: int, currency: str = "XTR") -> dict:
    user = {"id": user_id, "is_bot": False, "first_name": "U", "language_code": "ru"}
    return {"update_id": update_id, "pre_checkout_query": {"id": f"pcq{update_id}", "from": user, "currency": currency,
                                                           "total_amount": stars, "invoice_payload": payload}}


def update_payment(update_id: int, user_id: int, charge_id: str, payload: str, stars: int,
                   field: str = "successful_payment") -> dict:
    """A successful_payment (or with ``field="refunded_payment"`` a refund) in the payer's private chat."""
    update = update_message(update_id, user_id, "")
    del update["message"]["text"]
    update["message"][field] = {"currency": "XTR", "total_amount": stars, "invoice_payload": payload,
                                "telegram_payment_charge_id": charge_id}
    return update


def star_payment(charge_id: str, user_id: int, payload: str, stars: int) -> dict:
    """A StarTransaction of getStarTransactions: a user paying one of our invoices."""
    return {"id": charge_id, "amount": stars, "date": int(time.time()),
            "source": {"type": "user", "transaction_type": "invoice_payment", "invoice_payload": payload,
                       "user": {"id": user_id, "is_bot": False, "first_name": "U"}}}


class ManualClock(trt_bot.Clock):
    """A clock that moves only when a test calls ``advance``; ``sleep`` returns once it has moved far enough.

    ``passing_s``: a sleep at most this long moves the clock on at once (the send pacer's spacing
    between replies, which a test of waits that last seconds need not drive by hand).
    """

    def __init__(self, start: float = 1_800_000_000.0, passing_s: float = 0.0):
        self.now = start
        self.passing_s = passing_s
        self.wall_step = 0.0  # how far the wall clock was set forward (``time`` only: ``monotonic`` never jumps)
        self._sleepers: list[tuple[float, asyncio.Future]] = []

    def time(self) -> float:
        return self.now + self.wall_step

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        if seconds <= self.passing_s:
            self.advance(max(seconds, 0.0))
            await asyncio.sleep(0)
            return
        waker = asyncio.get_running_loop().create_future()
        entry = (self.now + seconds, waker)
        self._sleepers.append(entry)
        try:
            await waker
        finally:
            if entry in self._sleepers:
                self._sleepers.remove(entry)

    @property
    def sleepers(self) -> int:
        """How many coroutines are asleep on this clock (wait for it before advancing)."""
        return len(self._sleepers)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for wake_at, waker in list(self._sleepers):
            if wake_at <= self.now and not waker.done():
                waker.set_result(None)


class InstantClock(ManualClock):
    """A clock whose ``sleep`` moves time on at once and notes how long it was asked to sleep.

    For code that only sleeps between tries (retries, pacing): the test runs
    at full speed, and ``slept`` shows the waits the code chose.
    """

    def __init__(self, start: float = 1_800_000_000.0):
        super().__init__(start)
        self.slept: list[float] = []  # (every sleep passes at once: ``passing_s`` is not used)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(seconds, 0.0))
        await asyncio.sleep(0)


def bot_text(lang: str, key: str, **values: Any) -> str:
    """What the bot says, named by its TEXTS key: tests never repeat the copy, so a forker may change it."""
    return trt_bot.render(lang, key, **values)


def says(message: str, lang: str, key: str) -> bool:
    """Whether ``message`` holds TEXTS[lang][key], whatever values fill its ``{placeholders}``."""
    parts = re.split(r"\{[^{}]*\}", trt_bot.TEXTS[lang][key])
    return re.search(".*?".join(re.escape(part) for part in parts), message, re.DOTALL) is not None


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Wait until predicate() is truthy; fail the test with its last value otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(interval)


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


async def eventually_async(fetch, predicate, timeout: float = 10.0):
    """Like ``eventually`` for a value that needs awaiting: poll ``fetch()`` until ``predicate`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_bot_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "KIE_", "WEBHOOK_", "BOT_"))}
    clean.update(env)
    return subprocess.run([sys.executable, os.path.join(HERE, "trt_bot.py"), *args], env=clean,
                          capture_output=True, text=True, timeout=30)


class BotProcess:
    """trt_bot.py as a real subprocess, its log collected for assertions.

    ``wrapper`` is a command the bot runs under (``unshare ...``); the log goes to ``log_dir``.
    """

    def __init__(self, env: dict[str, str], wrapper: tuple[str, ...] = (), *, log_dir: str):
        self.port = int(env["PORT"])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(log_dir, f"bot-{self.port}.log")
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "KIE_", "WEBHOOK_"))}
        full_env.update(env)
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen([*wrapper, sys.executable, os.path.join(HERE, "trt_bot.py")],
                                            env=full_env, stdout=log_file, stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    async def wait_healthy(self, timeout: float = 15.0) -> None:
        import httpx
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"bot exited with {self.process.returncode}:\n{self.log}")
                try:
                    if (await client.get(self.base_url + "/health")).status_code == 200:
                        return
                except Exception:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"bot not healthy within {timeout}s:\n{self.log}")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        self.process.terminate()
        return self.process.wait(timeout)


@pytest.fixture
def harness_log_masked():
    """This process plays Telegram and Kie: its httpx logs the bots' secret webhook and callback URLs.

    The bots are subprocesses, so no App in this process masks what the
    harness logs; it masks its own records, as any client of the bot would,
    and the suite-wide check still catches a secret logged by the bot's code.
    """
    loggers = [logging.getLogger(name) for name in trt_bot.MASKED_LOGGERS]
    before = {logger.name: list(logger.filters) for logger in loggers}
    config = trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN, "KIE_API_KEY": KIE_KEY})
    trt_bot.install_secret_masking(config.secrets)
    yield
    for logger in loggers:
        logger.filters[:] = before[logger.name]


@pytest.fixture
def bot_processes(tmp_path):
    started: list[BotProcess] = []

    def start(env: dict[str, str], wrapper: tuple[str, ...] = ()) -> BotProcess:
        process = BotProcess(env, wrapper, log_dir=str(tmp_path))
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        for secret in SECRETS + DERIVED_SECRETS:
            assert secret not in process.log, "a secret reached the bot's log output"


SLOW_NAMES = {"postgres", "bot_processes", "run_bot_cli", "subprocess"}  # a PostgreSQL server, a child process


def pytest_collection_modifyitems(items):
    """Marks the slow tests (faults, subprocesses, PostgreSQL; load tests carry the mark themselves).

    The suite-wide secret check reads every record the other tests logged: it runs last.
    """
    for item in items:
        backend = getattr(item, "callspec", None) and item.callspec.params.get("database_url")
        uses = {*item.fixturenames, *item.function.__code__.co_names}  # the fixtures and the names it calls
        if item.path.name == "test_faults.py" or backend == "postgresql" or SLOW_NAMES & uses:
            item.add_marker(pytest.mark.slow)
    last = [item for item in items if item.name == "test_no_log_record_in_the_whole_suite_contains_a_secret"]
    items[:] = [item for item in items if item not in last] + last


###############################################################################
# Fault injection (used by test_faults.py): fakes that fail on purpose, bot
# processes that log outside the database's folder, and the totals printed at
# the end of the run.
###############################################################################

# Imported here, next to their only users, so that this block merges cleanly with changes above it.
import collections  # noqa: E402
import dataclasses  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402


class DropConnection(Exception):
    """Raised by a fake's ``answer``: close the connection without answering."""


_serving = threading.local()  # the connection a fake's handler thread is answering


def _dropping(handler_class: type) -> type:
    class Handler(handler_class):  # type: ignore[misc, valid-type]
        def _dispatch(self) -> None:
            _serving.connection = self.connection
            try:
                super()._dispatch()
            except DropConnection:
                self.close_connection = True

        do_GET = do_POST = _dispatch

    return Handler


def caller_hung_up() -> bool:
    """Whether the client of the request being answered has closed its connection (it gave up waiting).

    A fake that is slow to get to a request (a loaded machine) must not carry it
    out after its caller timed out and moved on: the caller then judges from
    what it saw, and the test from what was performed.
    """
    connection = _serving.connection
    if not select.select([connection], [], [], 0)[0]:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class FaultPlan:
    """Which calls fail and how, reproducibly from a seed.

    A call is named by a key (say "sendMessage:42"); the n-th call with that key
    fails or not by a draw seeded with (seed, key, n), so the same seed injects
    the same faults whatever order concurrent calls arrive in.
    """

    def __init__(self, seed: int, rate: float, kinds: tuple[str, ...]):
        self.seed = seed
        self.rate = rate
        self.kinds = kinds
        self.injected: collections.Counter[str] = collections.Counter()
        self._seen: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def draw(self, key: str) -> str | None:
        with self._lock:
            self._seen[key] += 1
            rng = random.Random(f"{self.seed}|{key}|{self._seen[key]}")
            if rng.random() >= self.rate:
                return None
            kind = rng.choice(self.kinds)
            self.injected[kind] += 1
            return kind


@dataclasses.dataclass(frozen=True)
class Performed:
    """A Bot API call Telegram carried out, and which bot process (life) made it."""

    life: int
    method: str
    params: dict
    at: float = 0.0  # time.monotonic() when it was carried out


class FaultyBotApi(FakeBotApi):
    """The fake Bot API, failing as ``plan`` says, and telling the calls of successive bot processes apart.

    A bot started with ``api_base(life)`` as TELEGRAM_API_BASE calls under
    ``/life<N>``; ``performed`` lists the calls that took effect (failed ones
    never do) with that life.  Faults: "500", "502" (an HTML error page), "429"
    (retry after 1 s), "stall" (no answer for ``stall_s``, then the connection
    drops) and "drop" (the connection closes at once); ``outage(seconds)``
    answers every call 502 for a while.  ``withhold(method)`` keeps such calls
    unanswered, then drops them unperformed at ``give_back(method)``;
    ``hold_answer(predicate)`` performs matching calls but holds their answers.
    """

    def __init__(self, plan: FaultPlan | None = None, token: str = TOKEN, stall_s: float = 2.0):
        self.plan = plan
        self.stall_s = stall_s
        self.delay_s = 0.0  # every call answers this much later (a slow Telegram)
        self.outage_calls = 0
        self._outage_until = 0.0
        self.performed: list[Performed] = []
        self._withheld: dict[str, threading.Event] = {}
        self._held: list[tuple[Callable[[str, dict], bool], threading.Event]] = []
        self._closing = threading.Event()
        super().__init__(token)

    def close(self) -> None:
        self._closing.set()
        for event in [*self._withheld.values(), *(event for _, event in self._held)]:
            event.set()
        super().close()

    def api_base(self, life: int) -> str:
        return f"{self.base_url}/life{life}"

    def outage(self, seconds: float) -> None:
        self._outage_until = time.monotonic() + seconds

    def withhold(self, method: str) -> None:
        self._withheld[method] = threading.Event()

    def give_back(self, method: str) -> None:
        self._withheld.pop(method).set()

    def hold_answer(self, predicate: Callable[[str, dict], bool]) -> threading.Event:
        """Perform calls matching ``predicate(method, params)``; answer them once the returned event is set."""
        event = threading.Event()
        self._held.append((predicate, event))
        return event

    def performed_of(self, *methods: str) -> list[Performed]:
        with self._cond:
            return [call for call in self.performed if call.method in methods]

    def _handler_class(self):
        return _dropping(super()._handler_class())

    def answer(self, http_method: str, path: str, query: dict, headers: Any, body: bytes) -> tuple[int, Any]:
        match = re.fullmatch(r"/life(\d+)(/.*)", path)
        life, path = (int(match[1]), match[2]) if match else (0, path)
        method = path.rsplit("/", 1)[-1]
        if len(body) < int(headers.get("Content-Length") or 0):
            raise DropConnection  # the caller died while sending: Telegram would not act on half a request
        params = parse_body(headers.get("Content-Type", ""), body)
        if self.delay_s:
            self._closing.wait(self.delay_s)
        withheld = self._withheld.get(method)
        if withheld is not None:
            withheld.wait(60)
            raise DropConnection
        if time.monotonic() < self._outage_until:
            with self._cond:
                self.outage_calls += 1
            return 502, b"<html><h1>502 Bad Gateway</h1></html>"
        addressee = params.get("chat_id", params.get("callback_query_id"))
        fault = self.plan.draw(f"{method}:{addressee}") if self.plan else None
        if fault == "stall":
            self._closing.wait(self.stall_s)
        if fault in ("stall", "drop"):
            raise DropConnection
        if fault == "429":
            return 429, {"ok": False, "error_code": 429, "description": "Too Many Requests: retry after 1",
                         "parameters": {"retry_after": 1}}
        if fault in ("500", "502"):
            return int(fault), f"<html><h1>{fault}</h1></html>".encode()
        if caller_hung_up():
            raise DropConnection
        status, payload = super().answer(http_method, path, query, headers, body)
        if status == 200:
            with self._cond:
                self.performed.append(Performed(life, method, params, time.monotonic()))
        for predicate, event in list(self._held):
            if predicate(method, params):
                event.wait(60)
        return status, payload


class FaultyKie(FakeKie):
    """The fake Kie.ai, failing createTask and recordInfo as ``plans[endpoint]`` says.

    Faults: "http500", "http502" (an HTTP error), "code500", "code455" (HTTP 200
    with Kie's error code), "drop" (the connection closes unanswered) and, for
    createTask, "lost_answer" (the task is created, the answer never arrives).
    A prompt in ``refused_prompts`` gets code 422 from createTask.
    """

    KEYS = {"createTask": lambda query, body: json.loads(body)["input"]["prompt"],
            "recordInfo": lambda query, body: query.get("taskId", "")}

    def __init__(self, plans: dict[str, FaultPlan] | None = None, key: str = KIE_KEY):
        self.plans = plans or {}
        self.refused_prompts: set[str] = set()
        super().__init__(key)

    def task_prompts(self) -> dict[str, str]:
        """The prompt of every task created so far, by task id."""
        with self._cond:
            return {task_id: json.loads(task["param"])["input"]["prompt"] for task_id, task in self.tasks.items()}

    def _handler_class(self):
        return _dropping(super()._handler_class())

    def answer(self, method: str, path: str, query: dict, headers: Any, body: bytes) -> tuple[int, Any]:
        endpoint = path.rsplit("/", 1)[-1]
        if path.startswith("/images/") or endpoint not in self.KEYS:
            return super().answer(method, path, query, headers, body)
        key = self.KEYS[endpoint](query, body)
        plan = self.plans.get(endpoint)
        fault = plan.draw(f"{endpoint}:{key}") if plan else None
        if fault == "lost_answer":
            super().answer(method, path, query, headers, body)
            raise DropConnection
        if fault == "drop":
            raise DropConnection
        if fault in ("http500", "http502"):
            return int(fault[4:]), b"<html>upstream error</html>"
        if fault in ("code500", "code455"):
            return 200, {"code": int(fault[4:]), "msg": "Server Error" if fault == "code500" else "Maintenance"}
        if endpoint == "createTask" and key in self.refused_prompts:
            return 200, {"code": 422, "msg": "input.prompt failed validation"}
        return super().answer(method, path, query, headers, body)


@pytest.fixture
def fault_bots(bot_processes):
    """The fault tests' bot processes: bot_processes (their logs in tmp_path, away from the database's folder,
    which the disk tests fill or make read-only)."""
    return bot_processes


# What the fault-injection tests did and found, printed after the run.
FAULT_TOTALS: collections.Counter[str] = collections.Counter()  # rounds, updates, faults, lost, duplicated, ...
FAULT_KINDS: collections.Counter[str] = collections.Counter()  # faults injected, by kind
FAULT_SEEDS: set[int] = set()


def pytest_terminal_summary(terminalreporter) -> None:
    if not FAULT_TOTALS:
        return
    totals = FAULT_TOTALS
    kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(FAULT_KINDS.items()))
    terminalreporter.write_sep("-", "fault injection totals")
    terminalreporter.write_line(
        f"seed {', '.join(map(str, sorted(FAULT_SEEDS)))}: rounds {totals['rounds']}, updates {totals['updates']}, "
        f"jobs {totals['jobs']}, faults injected {sum(FAULT_KINDS.values())}, lost {totals['lost']}, "
        f"duplicated {totals['duplicated']}, replayed after kill -9 {totals['replayed']}, "
        f"sent twice after a cut-off {totals['cut_duplicates']} (in flight at the cut {totals['cut_in_flight']})")
    terminalreporter.write_line(f"faults by kind: {kinds}")


###############################################################################
# A real PostgreSQL server for the tests that run on both storage backends:
# started once per session from the system's binaries (initdb into a temporary
# directory, run as the unprivileged ``postgres`` user when the tests run as
# root), a fresh database per test.  Missing binaries skip those tests, except
# under CI (CI=true), where a missing or failing server fails them.
###############################################################################

import glob  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import tempfile  # noqa: E402

POSTGRES_USER = "trt"
POSTGRES_START_DEADLINE_S = 60.0


def postgres_bin_dir() -> str | None:
    """The folder holding initdb and postgres: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    initdb = shutil.which("initdb")
    candidates = [os.path.dirname(os.path.realpath(initdb))] if initdb else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in candidates:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in ("initdb", "postgres")):
            return folder
    return None


def unavailable(reason: str) -> None:
    """Skip for want of PostgreSQL; under CI the same is a failure (CI must run the PostgreSQL tests)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


class PostgresTestServer:
    """A private PostgreSQL cluster: TCP on a free 127.0.0.1 port, password authentication, its socket in its folder."""

    def __init__(self, bin_dir: str):
        self.bin_dir = bin_dir
        self.root = tempfile.mkdtemp(prefix="trt-pg-")
        self.data, self.log_path = os.path.join(self.root, "data"), os.path.join(self.root, "server.log")
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self._databases = 0
        # The server refuses to run as root: then it runs as the postgres user, which must own its files.
        self._as: dict[str, Any] = (
            {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {})

    def url(self, database: str, password: str = POSTGRES_PASSWORD) -> str:
        return f"postgresql://{POSTGRES_USER}:{password}@127.0.0.1:{self.port}/{database}"

    def initialise(self) -> None:
        password_file = os.path.join(self.root, "password")
        with open(password_file, "w", encoding="ascii") as f:
            f.write(POSTGRES_PASSWORD)
        if self._as:
            shutil.chown(self.root, "postgres")
            shutil.chown(password_file, "postgres")
        subprocess.run([os.path.join(self.bin_dir, "initdb"), "-D", self.data, "-U", POSTGRES_USER,
                        f"--pwfile={password_file}", "-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
                       check=True, capture_output=True, text=True, timeout=120, cwd=self.root, **self._as)

    def start(self) -> None:
        """Start the server and wait until it takes connections (an error, with its log, if it does not)."""
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [os.path.join(self.bin_dir, "postgres"), "-D", self.data, "-p", str(self.port),
                 "-k", self.root, "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300",
                 # A test cluster: the OS crashing is not tested, and its short-lived databases need no
                 # autovacuum (its workers would take CPU from the timing-sensitive tests that run after).
                 "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "autovacuum=off"],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root, **self._as)
        deadline = time.monotonic() + POSTGRES_START_DEADLINE_S
        while not self._accepts_connections():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the PostgreSQL server did not start:\n{self.log}")
            time.sleep(0.05)

    def stop(self, how: signal.Signals = signal.SIGINT) -> None:
        """Fast shutdown (SIGINT): clients are disconnected, as when a managed database restarts."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(how)
            self.process.wait(60)
        self.process = None

    @property
    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _accepts_connections(self) -> bool:
        import psycopg
        try:
            psycopg.connect(self.url("postgres"), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def admin(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run ``sql`` on the maintenance database (CREATE DATABASE, pg_terminate_backend ...)."""
        import psycopg
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def new_database_url(self) -> str:
        """A DATABASE_URL for a database of its own, empty."""
        self._databases += 1
        name = f"test_{os.getpid()}_{self._databases}"
        self.admin(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def terminate_connections(self, database_url: str) -> int:
        """Cut every connection to the URL's database (pg_terminate_backend), as a server restart would."""
        name = urllib.parse.urlsplit(database_url).path.lstrip("/")
        killed = self.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        return len(killed)

    def remove(self) -> None:
        self.stop(signal.SIGQUIT)  # immediate: the cluster is deleted, no checkpoint is worth waiting for
        shutil.rmtree(self.root, ignore_errors=True)


def new_postgres(start: bool = True) -> PostgresTestServer:
    """A new cluster, started unless ``start`` is False; skipped (failed under CI) when the binaries or psycopg
    are missing.  ``remove()`` it at the end."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        unavailable("PostgreSQL server binaries (initdb, postgres) not found: apt-get install postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg is not installed: pip install -r requirements-dev.txt")
    server = PostgresTestServer(bin_dir)
    try:
        server.initialise()
        if start:
            server.start()
    except (OSError, LookupError, RuntimeError, subprocess.SubprocessError) as error:  # LookupError: no postgres user
        server.remove()
        unavailable(f"the PostgreSQL server could not be started: {getattr(error, 'stderr', '') or error}")
    return server


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL server; ``postgres.new_database_url()`` gives each test a database of its own."""
    server = new_postgres()
    yield server
    server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """A fresh DATABASE_URL of each kind: a SQLite file in tmp_path, a new database on the session's server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bot.sqlite3'}"
    return request.getfixturevalue("postgres").new_database_url()


def query(database_url: str, sql: str, params: tuple = ()) -> list[tuple]:
    """Rows of ``sql`` (``?`` placeholders) read straight from the database, as another process would."""
    location = trt_bot.parse_database_url(database_url)
    if location.startswith(trt_bot.POSTGRES_SCHEMES):
        import psycopg
        with psycopg.connect(location, autocommit=True) as conn:
            return [tuple(row) for row in conn.execute(trt_bot.postgres_sql(sql), params).fetchall()]
    conn = sqlite3.connect(location)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()



def refuse_rows(database_url: str, table: str, column: str, marker: str) -> None:
    """Make the database refuse every row of ``table`` whose ``column`` holds ``marker`` (a row error, not an
    outage): a trigger in SQLite, a CHECK constraint in PostgreSQL, as a value it cannot store would be."""
    location = trt_bot.parse_database_url(database_url)
    if location.startswith(trt_bot.POSTGRES_SCHEMES):
        import psycopg
        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute(f"ALTER TABLE {table} ADD CONSTRAINT refuse_{table} "
                         f"CHECK (position('{marker}' in {column}) = 0)")
    else:
        query(database_url, f"CREATE TRIGGER refuse_{table} BEFORE INSERT ON {table} WHEN instr(NEW.{column}, "
                            f"'{marker}') BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
