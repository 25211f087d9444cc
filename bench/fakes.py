"""Fast fake servers for the benchmark: a Telegram Bot API and a Kie.ai API.

Run one per process, e.g. ``python bench/fakes.py botapi --port 18080``; the
process prints ``READY <port>`` once it listens.

Both are a raw ``asyncio.Protocol`` on uvloop (when installed) with HTTP/1.1
keep-alive, so they cost the machine far less per request than the bots under
test: ``run.py`` measures their ceiling with wrk and prints it next to the
results.  They understand just enough HTTP for the clients in the benchmark
(httpx, aiohttp, wrk): a request head, then a Content-Length or chunked body.

Fake Bot API
    ``POST /bot<token>/<method>``: every method answers ``ok``.  ``sendMessage``
    returns a real-looking Message (aiogram and PTB validate it) and is counted;
    the moment a chat's reply is seen is kept (``time.monotonic()``, the
    system-wide CLOCK_MONOTONIC, so other processes can compare their own
    timestamps with it).  ``chat_id`` is found in JSON, urlencoded and
    multipart bodies alike (trt_bot, PTB and aiogram send one of each).

Fake Kie
    ``POST /api/v1/jobs/createTask`` -> a new taskId; ``GET
    /api/v1/jobs/recordInfo?taskId=`` -> ``generating`` while the task is held,
    ``success`` with one image URL once released.  Answers can be delayed
    (``--create-ms``, ``--poll-ms``) to play a slow upstream without using CPU.

Fake Bot API with Telegram's limits (``--telegram-limits``)
    Telegram's flood control as its documentation and bots' experience
    describe it: at most 30 sends in any second across chats, one per second
    in a private chat, 20 per minute in a group (``chat_id < 0``).  A send
    past any of them gets ``429`` with ``parameters.retry_after`` = 2, and the
    wait applies to the whole bot: every send until it ends gets 429 too (with
    the seconds still left).  Sends are the methods that post or change a
    message (``send*``, ``edit*``, ``copy*``, ``forward*``);
    ``answerCallbackQuery`` and the rest are exempt, as in Telegram.  The
    limits are flags, so a test can shrink them.  Each window is 100 ms
    shorter than its span (``--grace-ms``): the fake stamps a send when its
    process reaches it, and on a busy machine a stall of the fake bunches
    sends that a bot paced apart.  Only accepted sends count
    against a window; the fake counts answered sends per chat, the 429s it
    gave, the flood pauses, and the time of the last answer.

Control routes (both fakes): ``GET /__stats``, ``POST /__reset``; Bot API:
``GET /__seen?lo=A&hi=B`` (reply times of chats A..B-1), ``GET /__answered``
(answered sends per chat); Kie: ``POST /__release`` (finish every held task).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import math
import re
import socket
import struct
import sys
import time
import urllib.parse
import zlib

CHAT_ID = re.compile(rb'chat_id(?:"\s*:\s*"?|=|"\r\n(?:[^\r\n]*\r\n)*\r\n)(-?\d+)')


def tiny_png() -> bytes:
    """A valid 1x1 PNG, the "generated image" the fake Kie serves."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00\xff\x80\x00")) + chunk(b"IEND", b"")


PNG_1PX = tiny_png()
REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found", 429: b"Too Many Requests"}


def render(status: int, body: bytes, content_type: bytes = b"application/json", keep_alive: bool = True) -> bytes:
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
        status, REASONS.get(status, b"OK"), content_type, len(body))
    if not keep_alive:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


def json_body(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


# -- HTTP/1.1 on a raw Protocol ------------------------------------------------

class HttpProtocol(asyncio.Protocol):
    """Splits the byte stream into requests and hands each to ``app.handle``.

    ``app.handle(method, target, headers_lower, body)`` returns
    ``(status, body, content_type, delay_s)``.
    """

    def __init__(self, app: "FakeApp"):
        self.app = app
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None:
            request = self._next_request()
            if request is None:
                return
            self._answer(*request)

    def _next_request(self) -> tuple[bytes, bytes, bytes, bytes] | None:
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buf[:end]).lower()
        start = end + 4
        if b"transfer-encoding: chunked" in head:
            decoded = _dechunk(buf, start)
            if decoded is None:
                return None
            body, consumed = decoded
        else:
            length = _content_length(head)
            if len(buf) < start + length:
                return None
            body, consumed = bytes(buf[start:start + length]), start + length
        request_line = bytes(buf[:buf.find(b"\r\n")])
        del buf[:consumed]
        method, target, _ = request_line.split(b" ", 2)
        return method, target, head, body

    def _answer(self, method: bytes, target: bytes, head: bytes, body: bytes) -> None:
        keep_alive = b"\r\nconnection: close" not in head
        status, payload, content_type, delay = self.app.handle(method, target, head, body)
        response = render(status, payload, content_type, keep_alive)
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._write, response, keep_alive)
        else:
            self._write(response, keep_alive)

    def _write(self, response: bytes, keep_alive: bool) -> None:
        if self.transport is None:
            return
        self.transport.write(response)
        if not keep_alive:
            self.transport.close()


def _content_length(head: bytes) -> int:
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    line_end = head.find(b"\r\n", at + 2)
    return int(head[at + 17: line_end if line_end > 0 else len(head)])


def _dechunk(buf: bytearray, pos: int) -> tuple[bytes, int] | None:
    body = bytearray()
    while True:
        line_end = buf.find(b"\r\n", pos)
        if line_end < 0:
            return None
        size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
        pos = line_end + 2
        if size == 0:
            trailer_end = buf.find(b"\r\n", pos)
            return (bytes(body), trailer_end + 2) if trailer_end >= 0 else None
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos:pos + size]
        pos += size + 2


class FakeApp:
    def handle(self, method: bytes, target: bytes, head: bytes, body: bytes) -> tuple[int, bytes, bytes, float]:
        raise NotImplementedError


# -- Telegram's flood control ---------------------------------------------------------

PACED_PREFIXES = (b"send", b"edit", b"copy", b"forward")  # methods that post or change a message


@dataclasses.dataclass(frozen=True)
class FloodRules:
    """Telegram's documented limits (core.telegram.org/bots/faq, "broadcasting to users")."""

    per_second: int = 30  # sends per second across all chats
    private_per_second: int = 1  # sends per second in one private chat
    group_per_minute: int = 20  # sends per minute in one group (chat_id < 0)
    retry_after_s: int = 2  # what a 429 asks; Telegram says whole seconds
    # Each window is this much shorter than its limit says: the fake stamps a send when its process gets to it,
    # and a stall of the fake's process (the machine is shared) bunches sends that were paced apart.
    grace_s: float = 0.1


class FloodControl:
    """Decides, send by send, whether Telegram would take it: sans-I/O, the caller passes the time.

    Each window holds the times of accepted sends within its span, so it never
    holds more than its limit; chats are forgotten on ``FakeBotApi.reset``.
    """

    def __init__(self, rules: FloodRules):
        self.rules = rules
        self.recent: collections.deque[float] = collections.deque()  # accepted sends in the last second
        self.by_chat: dict[int, collections.deque[float]] = {}
        self.paused_until = 0.0
        self.rejected = 0
        self.pauses = 0

    def admit(self, chat_id: int, now: float) -> int:
        """0 if the send is taken, else the retry_after its 429 carries."""
        if now < self.paused_until:
            self.rejected += 1
            return max(1, math.ceil(self.paused_until - now))
        limit, span = ((self.rules.group_per_minute, 60.0) if chat_id < 0 else (self.rules.private_per_second, 1.0))
        chat = self.by_chat.setdefault(chat_id, collections.deque())
        _forget_before(self.recent, now - 1.0 + self.rules.grace_s)
        _forget_before(chat, now - span + self.rules.grace_s)
        if len(self.recent) >= self.rules.per_second or len(chat) >= limit:
            self.paused_until = now + self.rules.retry_after_s
            self.rejected += 1
            self.pauses += 1
            return self.rules.retry_after_s
        self.recent.append(now)
        chat.append(now)
        return 0


def _forget_before(times: collections.deque[float], cutoff: float) -> None:
    while times and times[0] <= cutoff:
        times.popleft()


def too_many_requests(retry_after: int) -> bytes:
    return json_body({"ok": False, "error_code": 429, "description": f"Too Many Requests: retry after {retry_after}",
                      "parameters": {"retry_after": retry_after}})


# -- the fake Bot API ------------------------------------------------------------

class FakeBotApi(FakeApp):
    def __init__(self, rules: FloodRules | None = None) -> None:
        self.started = time.monotonic()
        self.rules = rules
        self.reset()

    def reset(self) -> None:
        self.flood = FloodControl(self.rules) if self.rules else None
        self.answered: collections.Counter[int] = collections.Counter()  # accepted sends per chat
        self.requests = 0
        self.methods: collections.Counter[str] = collections.Counter()
        self.send_message = 0
        self.seen: dict[int, float] = {}  # chat id -> when its latest reply arrived
        self.last_send = 0.0
        self.message_id = 0

    def handle(self, method: bytes, target: bytes, head: bytes, body: bytes) -> tuple[int, bytes, bytes, float]:
        if target.startswith(b"/__"):
            return self._control(target, body)
        self.requests += 1
        name = target.rsplit(b"/", 1)[-1].split(b"?", 1)[0]
        if name.startswith(PACED_PREFIXES):
            match = CHAT_ID.search(body)
            chat_id = int(match.group(1)) if match else 0
            retry_after = self.flood.admit(chat_id, time.monotonic()) if self.flood else 0
            if retry_after:
                return 429, too_many_requests(retry_after), b"application/json", 0.0
            self.answered[chat_id] += 1
            self.last_send = time.monotonic()
        if name == b"sendMessage":
            return 200, self._send_message(body), b"application/json", 0.0
        text = name.decode(errors="replace")
        self.methods[text] += 1
        return 200, json_body({"ok": True, "result": self._result(text)}), b"application/json", 0.0

    def _send_message(self, body: bytes) -> bytes:
        self.send_message += 1
        self.message_id += 1
        match = CHAT_ID.search(body)
        chat_id = int(match.group(1)) if match else 0
        self.seen[chat_id] = self.last_send = time.monotonic()
        kind = b"group" if chat_id < 0 else b"private"
        return b'{"ok":true,"result":{"message_id":%d,"date":%d,"chat":{"id":%d,"type":"%s"},"text":"ok"}}' % (
            self.message_id, int(time.time()), chat_id, kind)

    @staticmethod
    def _result(method: str) -> object:
        if method == "getMe":
            return {"id": 100000001, "is_bot": True, "first_name": "Bench", "username": "bench_bot",
                    "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}
        if method == "getWebhookInfo":
            return {"url": "", "has_custom_certificate": False, "pending_update_count": 0}
        if method == "getUpdates":
            return []
        return True

    def _control(self, target: bytes, body: bytes) -> tuple[int, bytes, bytes, float]:
        path, _, query = target.decode().partition("?")
        if path == "/__stats":
            flood = self.flood
            stats = {"requests": self.requests, "send_message": self.send_message, "methods": dict(self.methods),
                     "chats": len(self.seen), "last_send": self.last_send, "now": time.monotonic(),
                     "too_many_requests": flood.rejected if flood else 0, "flood_pauses": flood.pauses if flood else 0}
            return 200, json_body(stats), b"application/json", 0.0
        if path == "/__reset":
            self.reset()
            return 200, b"{}", b"application/json", 0.0
        if path == "/__seen":
            args = urllib.parse.parse_qs(query)
            lo, hi = int(args["lo"][0]), int(args["hi"][0])
            seen = {str(c): t for c, t in self.seen.items() if lo <= c < hi}
            return 200, json_body(seen), b"application/json", 0.0
        if path == "/__answered":
            return 200, json_body({str(c): n for c, n in self.answered.items()}), b"application/json", 0.0
        return 404, b"{}", b"application/json", 0.0


# -- the fake Kie --------------------------------------------------------------------

class FakeKie(FakeApp):
    def __init__(self, create_s: float = 0.0, poll_s: float = 0.0, api_key: str = "") -> None:
        self.create_s, self.poll_s, self.api_key = create_s, poll_s, api_key
        self.reset()

    def reset(self) -> None:
        self.created = 0
        self.polls = 0
        self.released = 0
        self.unauthorized = 0
        self.held: set[str] = set()
        self.done: set[str] = set()

    def handle(self, method: bytes, target: bytes, head: bytes, body: bytes) -> tuple[int, bytes, bytes, float]:
        path, _, query = target.decode().partition("?")
        if path.startswith("/__"):
            return self._control(path)
        if path.startswith("/files/"):
            return 200, PNG_1PX, b"image/png", 0.0
        if self.api_key and b"authorization: bearer " + self.api_key.lower().encode() not in head:
            self.unauthorized += 1
            return 401, json_body({"code": 401, "msg": "You do not have access permissions"}), b"application/json", 0.0
        if path == "/api/v1/jobs/createTask" and method == b"POST":
            return 200, self._create(), b"application/json", self.create_s
        if path == "/api/v1/jobs/recordInfo":
            task_id = urllib.parse.parse_qs(query).get("taskId", [""])[0]
            return 200, self._record_info(task_id), b"application/json", self.poll_s
        return 404, json_body({"code": 404, "msg": "not found"}), b"application/json", 0.0

    def _create(self) -> bytes:
        self.created += 1
        task_id = f"bench-task-{self.created}"
        self.held.add(task_id)
        return json_body({"code": 200, "msg": "success", "data": {"taskId": task_id}})

    def _record_info(self, task_id: str) -> bytes:
        self.polls += 1
        data: dict[str, object] = {"taskId": task_id, "model": "z-image", "state": "generating"}
        if task_id in self.done:
            data["state"] = "success"
            data["resultJson"] = json.dumps({"resultUrls": [f"{self.public_base}/files/{task_id}.png"]})
        elif task_id not in self.held:
            return json_body({"code": 404, "msg": "task not found", "data": None})
        return json_body({"code": 200, "msg": "success", "data": data})

    public_base = "http://127.0.0.1"

    def _control(self, path: str) -> tuple[int, bytes, bytes, float]:
        if path == "/__stats":
            stats = {"created": self.created, "polls": self.polls, "in_flight": len(self.held),
                     "released": self.released, "unauthorized": self.unauthorized, "now": time.monotonic()}
            return 200, json_body(stats), b"application/json", 0.0
        if path == "/__release":
            self.released += len(self.held)
            self.done |= self.held
            self.held = set()
            return 200, b"{}", b"application/json", 0.0
        if path == "/__reset":
            self.reset()
            return 200, b"{}", b"application/json", 0.0
        return 404, b"{}", b"application/json", 0.0


# -- main ------------------------------------------------------------------------------

async def serve(app: FakeApp, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpProtocol(app), host, port, backlog=1024, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    if isinstance(app, FakeKie):
        app.public_base = f"http://{host}:{bound}"
    print(f"READY {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["botapi", "kie"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--create-ms", type=float, default=0.0, help="Kie: delay of each createTask answer")
    parser.add_argument("--poll-ms", type=float, default=0.0, help="Kie: delay of each recordInfo answer")
    parser.add_argument("--api-key", default="", help="Kie: the Bearer key to require (none: accept any)")
    defaults = FloodRules()
    parser.add_argument("--telegram-limits", action="store_true", help="Bot API: enforce Telegram's flood limits")
    parser.add_argument("--per-second", type=int, default=defaults.per_second, help="limit: sends/s across chats")
    parser.add_argument("--private-per-second", type=int, default=defaults.private_per_second,
                        help="limit: sends/s in one private chat")
    parser.add_argument("--group-per-minute", type=int, default=defaults.group_per_minute,
                        help="limit: sends/min in one group")
    parser.add_argument("--retry-after", type=int, default=defaults.retry_after_s, help="seconds a 429 asks to wait")
    parser.add_argument("--grace-ms", type=float, default=defaults.grace_s * 1000,
                        help="each window is this much shorter, for the fake's own scheduling jitter")
    args = parser.parse_args(argv)
    rules = FloodRules(args.per_second, args.private_per_second, args.group_per_minute,
                       args.retry_after, args.grace_ms / 1000) if args.telegram_limits else None
    app: FakeApp = FakeBotApi(rules) if args.kind == "botapi" else FakeKie(
        args.create_ms / 1000, args.poll_ms / 1000, args.api_key)
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        try:
            runner.run(serve(app, args.host, args.port))
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
