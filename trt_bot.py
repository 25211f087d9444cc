"""trt_bot: a Telegram bot that turns a text prompt into an image through Kie.ai.

One file, read top-down in the order data flows through it.  Find a section by
grepping for its banner (``#####``):

   1. Configuration        environment variables -> a frozen Config
   2. Logging              the log format; secrets masked in every record
   3. HTTP parsing         bytes -> Request, a pure state machine (no sockets)
   4. HTTP server          asyncio.start_server, timeouts, connection limits
   5. Storage              SQLite on its own thread: schema, inbox, dialog state
   6. Telegram client      raw Bot API over httpx, retries, typed errors
   7. Kie client           createTask / recordInfo / credits, backoff, pacing
   8. Update pipeline      durable ack, spill, ordered workers
   9. Conversation         model catalog, texts, keyboards, the dialog
  10. Generation jobs      job state machine, submit, callback + poller, delivery
  11. Application          routes, webhook set-up, polling, main()

Run it with ``python trt_bot.py`` (see README.md for the environment).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import concurrent.futures
import dataclasses
import hashlib
import heapq
import hmac
import html
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import sqlite3
import sys
import time
import urllib.parse
from typing import Any, Awaitable, Callable, Iterable, Mapping

import httpx

__version__ = "1.0.0"

log = logging.getLogger("trt_bot")


class TrtError(Exception):
    """Base of the errors this module raises on purpose; each section defines its own below."""


###############################################################################
# 1. Configuration
#    Owns reading the environment once, validating it and deriving secrets.
###############################################################################

TOKEN_PATTERN = re.compile(r"[0-9]{3,20}:[A-Za-z0-9_-]{30,100}")
SECRET_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,256}")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
DEFAULT_DATABASE_URL = "sqlite:///./data/trt_bot.sqlite3"


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the bot reads from its environment, validated."""

    telegram_token: str
    kie_api_key: str = ""
    bot_mode: str = "polling"
    webhook_base_url: str = ""
    webhook_secret: str = ""
    port: int = 10000
    host: str = "0.0.0.0"
    database_path: str = ":memory:"
    single_model_only: bool = False
    queue_size: int = 100
    queue_workers: int = 3
    kie_callback_path: str = "callbacks/kie"
    kie_callback_token: str = ""
    kie_hmac_key: str = ""
    telegram_api_base: str = "https://api.telegram.org"
    kie_api_base: str = "https://api.kie.ai"
    admin_ids: frozenset[int] = frozenset()
    diag_token: str = ""
    gen_timeout_s: float = 300.0
    gen_hourly_limit: int = 20
    kie_max_tasks: int = 100
    flush_pending_over: int = 10
    log_level: str = "INFO"
    shutdown_grace_s: float = 25.0
    handler_timeout_s: float = 30.0
    lease_ttl_s: float = 15.0

    @property
    def webhook_path(self) -> str:
        """The secret-bearing path Telegram posts to.

        It is a digest of the secret token, so a changed secret changes the URL
        and ``ensure_webhook`` notices (getWebhookInfo never returns the secret).
        """
        digest = hashlib.sha256(b"trt-webhook-path:" + self.webhook_secret.encode())
        return "/webhook/" + digest.hexdigest()[:32]

    @property
    def webhook_url(self) -> str:
        return self.webhook_base_url.rstrip("/") + self.webhook_path

    @property
    def secrets(self) -> list[str]:
        """Values that must never reach a log line, response or error."""
        values = [self.telegram_token, self.telegram_token.partition(":")[2], self.kie_api_key]
        return [v for v in values if len(v) >= 8]


class ConfigError(TrtError):
    """A setting the operator must fix; main() prints it and exits with code 2."""


def derive_secret(token: str, purpose: str) -> str:
    """A stable secret for ``purpose`` that reveals nothing about the bot token."""
    return hmac.new(token.encode(), purpose.encode(), hashlib.sha256).hexdigest()


def load_config(env: Mapping[str, str]) -> Config:
    """Build a Config from environment variables or raise ConfigError."""
    token = env.get("TELEGRAM_BOT_TOKEN", "").strip()
    if not token:
        raise ConfigError(
            "TELEGRAM_BOT_TOKEN is not set: create a bot with @BotFather "
            "(https://t.me/BotFather) and export TELEGRAM_BOT_TOKEN=<its token>"
        )
    if not TOKEN_PATTERN.fullmatch(token):
        raise ConfigError(
            "TELEGRAM_BOT_TOKEN is malformed: expected '<digits>:<secret>' exactly as "
            "@BotFather shows it (check for quotes or spaces)"
        )
    base_url = (env.get("WEBHOOK_BASE_URL") or env.get("RENDER_EXTERNAL_URL") or "").strip()
    mode = (env.get("BOT_MODE") or ("webhook" if base_url else "polling")).strip().lower()
    if mode not in ("webhook", "polling"):
        raise ConfigError(f"BOT_MODE must be 'webhook' or 'polling', got {mode!r}")
    if mode == "webhook" and not base_url.startswith("https://"):
        raise ConfigError(
            "BOT_MODE=webhook needs WEBHOOK_BASE_URL (or RENDER_EXTERNAL_URL) "
            "starting with https://, for example https://my-bot.onrender.com"
        )
    # A base64 value (Render's generateValue makes one) is used in its URL-safe form:
    # Telegram allows only A-Z a-z 0-9 _ - in a secret token.
    secret = env.get("WEBHOOK_SECRET_TOKEN", "").strip().replace("+", "-").replace("/", "_").rstrip("=")
    secret = secret or derive_secret(token, "webhook-secret")
    if not SECRET_TOKEN_PATTERN.fullmatch(secret):
        raise ConfigError("WEBHOOK_SECRET_TOKEN may hold only A-Z a-z 0-9 _ - (or base64) and at most 256 characters")
    return Config(
        telegram_token=token,
        kie_api_key=env.get("KIE_API_KEY", "").strip(),
        bot_mode=mode,
        webhook_base_url=base_url,
        webhook_secret=secret,
        port=_int_setting(env, "PORT", 10000, 0, 65535),
        host=env.get("HOST", "0.0.0.0").strip() or "0.0.0.0",
        database_path=parse_database_url(env.get("DATABASE_URL", "").strip() or DEFAULT_DATABASE_URL),
        single_model_only=env.get("SINGLE_MODEL_ONLY", "0").strip().lower() in TRUE_WORDS,
        queue_size=_int_setting(env, "UPDATE_QUEUE_SIZE", 100, 1, 1_000_000),
        queue_workers=_int_setting(env, "UPDATE_QUEUE_WORKERS", 3, 1, 1000),
        kie_callback_path=env.get("KIE_CALLBACK_PATH", "callbacks/kie").strip().strip("/") or "callbacks/kie",
        kie_callback_token=env.get("KIE_CALLBACK_TOKEN", "").strip() or derive_secret(token, "kie-callback"),
        kie_hmac_key=env.get("KIE_WEBHOOK_HMAC_KEY", "").strip(),
        telegram_api_base=_url_setting(env, "TELEGRAM_API_BASE", "https://api.telegram.org"),
        kie_api_base=_url_setting(env, "KIE_API_BASE", "https://api.kie.ai"),
        admin_ids=_admin_ids(env.get("ADMIN_IDS", "")),
        diag_token=env.get("DIAG_TOKEN", "").strip(),
        gen_timeout_s=float(_int_setting(env, "GEN_TIMEOUT_S", 300, 1, 86400)),
        gen_hourly_limit=_int_setting(env, "GEN_HOURLY_LIMIT", 20, 1, 100_000),
        kie_max_tasks=_int_setting(env, "KIE_MAX_CONCURRENT_TASKS", 100, 1, 10_000),
        flush_pending_over=_int_setting(env, "WEBHOOK_FLUSH_PENDING_OVER", 10, -1, 10**9),
        log_level=_log_level(env.get("LOG_LEVEL", "INFO")),
        shutdown_grace_s=float(_int_setting(env, "SHUTDOWN_GRACE_S", 25, 1, 3600)),
        lease_ttl_s=float(_int_setting(env, "LEASE_TTL_S", 15, 2, 600)),
    )


def parse_database_url(url: str) -> str:
    """``sqlite:///relative/path``, ``sqlite:////absolute/path`` or ``sqlite:///:memory:``."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise ConfigError(
            f"DATABASE_URL must look like {DEFAULT_DATABASE_URL} (only SQLite is supported), "
            f"got a URL starting with {url.split(':', 1)[0]!r}"
        )
    return url[len(prefix):]


def _int_setting(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, got {value}")
    return value


def _url_setting(env: Mapping[str, str], name: str, default: str) -> str:
    value = (env.get(name, "").strip() or default).rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must start with http:// or https://, got {value!r}")
    return value


def _admin_ids(raw: str) -> frozenset[int]:
    try:
        return frozenset(int(part) for part in raw.replace(" ", "").split(",") if part)
    except ValueError:
        raise ConfigError(f"ADMIN_IDS must be comma-separated Telegram user ids, got {raw!r}") from None


def _log_level(raw: str) -> str:
    level = raw.strip().upper() or "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {raw!r}")
    return level


###############################################################################
# 2. Logging
#    Owns the log format and the filter that keeps the bot token and the Kie
#    key out of every log record, httpx's request lines included.
###############################################################################

# Loggers that may format a request URL (which carries the bot token) or an
# exception mentioning it.  httpx logs every request URL at INFO.
MASKED_LOGGERS = (
    "trt_bot",
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "asyncio",
)


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


class SecretMaskingFilter(logging.Filter):
    """Rewrites a record's message and traceback with every secret replaced by ***.

    It sits on the loggers that emit records (not on handlers), so every handler,
    pytest's capture included, sees the masked record.
    """

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message, self.secrets)
        if masked != message or record.args:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text, self.secrets)
        return True


def install_secret_masking(secrets: Iterable[str]) -> SecretMaskingFilter:
    """Attach (or refresh) the masking filter on every logger that can leak."""
    masking = SecretMaskingFilter(secrets)
    for name in MASKED_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, SecretMaskingFilter)]:
            masking.secrets = list(dict.fromkeys(masking.secrets + old.secrets))
            logger.removeFilter(old)
    for name in MASKED_LOGGERS:
        logging.getLogger(name).addFilter(masking)
    return masking


def configure_logging(config: Config) -> None:
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.log_level != "DEBUG":
        # One line per Bot API request is noise at INFO; the URLs are masked either way.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    install_secret_masking(config.secrets)



###############################################################################
# 3. HTTP parsing
#    Owns turning bytes into requests and responses into bytes.  No sockets:
#    the server feeds bytes in and writes bytes out (the sans-I/O style of h11).
###############################################################################

# Limits, with what other servers do.  They are parameters so tests can shrink them.
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; h11 uses 16 KiB, nginx 8 KiB per line
MAX_BODY_BYTES = 1024 * 1024  # Telegram updates are a few KiB; Kie callbacks smaller

_TOKEN_CHARS = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_VALUE_CHARS = rb"[\t\x20-\x7e\x80-\xff]*"  # RFC 9110 field-value: VCHAR, SP, HTAB, obs-text
_REQUEST_LINE = re.compile(rb"(" + _TOKEN_CHARS + rb") ([^\x00-\x20\x7f]+) HTTP/([0-9])\.([0-9])")
_HEADER_BLOCK = re.compile(rb"(?:" + _TOKEN_CHARS + rb":" + _VALUE_CHARS + rb"\r\n)*")  # every line at once
_HEADER_NAME = re.compile(_TOKEN_CHARS)
_BAD_VALUE_CHARS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]{1,18}")

STATUS_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class HttpError(TrtError):
    """A request we refuse; ``status`` is the answer, ``reason`` goes in the body."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclasses.dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes = b""
    keep_alive: bool = True

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.target.partition("?")[2]))


class RequestParser:
    """Incremental HTTP/1.1 request parser.

    ``feed()`` bytes as they arrive; ``next_request()`` returns a complete
    Request, or None when more bytes are needed, or raises HttpError.  Several
    pipelined requests in one feed come out one per call.  After an HttpError
    the connection must be closed: the parser cannot know where the next
    request starts.
    """

    def __init__(self, max_head: int = MAX_HEAD_BYTES, max_body: int = MAX_BODY_BYTES):
        self.max_head = max_head
        self.max_body = max_body
        self._buffer = bytearray()
        self._head: tuple[str, str, str, dict[str, str], bool] | None = None
        self._body_length = 0

    @property
    def has_partial_request(self) -> bool:
        return bool(self._buffer) or self._head is not None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_request(self) -> Request | None:
        if self._head is None and not self._parse_head():
            return None
        if len(self._buffer) < self._body_length:
            return None
        method, target, version, headers, keep_alive = self._head  # type: ignore[misc]
        body = bytes(self._buffer[: self._body_length])
        del self._buffer[: self._body_length]
        self._head = None
        return Request(method, target, version, headers, body, keep_alive)

    def _parse_head(self) -> bool:
        # RFC 9112 2.2: a server SHOULD ignore empty lines before a request line.
        while self._buffer[:2] == b"\r\n":
            del self._buffer[:2]
        if self._buffer[:1] in (b"\x16", b"\x00"):
            raise HttpError(400, "not HTTP (TLS or binary data on a plain-text port)")
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > self.max_head:
                raise HttpError(431, "request headers too large")
            return False
        if end > self.max_head:
            raise HttpError(431, "request headers too large")
        head = bytes(self._buffer[: end + 2])  # the request line and header lines, each with its CRLF
        del self._buffer[: end + 4]
        self._head = self._parse_head_bytes(head)
        return True

    def _parse_head_bytes(self, head: bytes) -> tuple[str, str, str, dict[str, str], bool]:
        line_end = head.find(b"\r\n")
        match = _REQUEST_LINE.fullmatch(head, 0, line_end)
        if not match:
            raise HttpError(400, "malformed request line")
        method, target, major, minor = match.groups()
        if major != b"1":
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        if not (target.startswith(b"/") or target == b"*"):
            raise HttpError(400, "request target must be a path")
        if not _HEADER_BLOCK.fullmatch(head, line_end + 2):
            raise _header_error(head[line_end + 2:])
        headers: dict[str, str] = {}
        for line in head[line_end + 2: -2].decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip(" \t")
        headers.pop("", None)  # the empty line of a request without headers
        self._body_length = self._body_length_from(headers, head)
        version = "1.1" if minor == b"1" else f"1.{minor.decode()}"
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection if version == "1.1" else "keep-alive" in connection
        return method.decode("ascii"), target.decode("ascii"), version, headers, keep_alive

    def _body_length_from(self, headers: dict[str, str], head: bytes) -> int:
        length_text = headers.get("content-length")
        if "transfer-encoding" in headers:
            if length_text is not None:
                raise HttpError(400, "both Content-Length and Transfer-Encoding")
            if headers["transfer-encoding"].lower() == "chunked":
                raise HttpError(411, "chunked bodies are not accepted: send Content-Length")
            raise HttpError(501, "unsupported Transfer-Encoding")
        if length_text is None:
            return 0
        if "," in length_text or head.lower().count(b"\ncontent-length:") > 1:
            # Repeated Content-Length (as headers or a list) is fine only if every value agrees.
            values = {value.strip(" \t") for line in head.decode("latin-1").split("\r\n")
                      if line.lower().startswith("content-length:") for value in line[15:].split(",")}
            if len(values) > 1:
                raise HttpError(400, "conflicting Content-Length values")
            length_text = values.pop()
        if not _DIGITS.fullmatch(length_text):
            raise HttpError(400, "invalid Content-Length")
        length = int(length_text)
        if length > self.max_body:
            raise HttpError(413, "request body too large")
        return length


def _header_error(block: bytes) -> HttpError:
    """Which rule a header block broke (the slow path, only for bad requests)."""
    for line in block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if line and (not colon or not _HEADER_NAME.fullmatch(name)):
            return HttpError(400, "malformed header line")
        if _BAD_VALUE_CHARS.search(value):
            return HttpError(400, "invalid character in header value")
    return HttpError(400, "malformed header line")


@dataclasses.dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(payload: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(status, body, "application/json", headers)


def text_response(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, (text + "\n").encode(), "text/plain; charset=utf-8", headers)


def render_response(response: Response, keep_alive: bool = True, head_only: bool = False) -> bytes:
    """Serialize a response; for HEAD the length is the GET body's, the body is left out."""
    lines = [
        f"HTTP/1.1 {response.status} {STATUS_REASONS.get(response.status, 'Unknown')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
    ]
    lines += [f"{name}: {value}" for name, value in response.headers]
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


###############################################################################
# 4. HTTP server
#    Owns sockets: reading with timeouts, bounding connections, writing
#    responses.  What a request means is the application's business (section 9).
###############################################################################

IDLE_TIMEOUT_S = 75.0  # keep-alive connections Telegram reuses; nginx's default is 75 s
REQUEST_TIMEOUT_S = 10.0  # a whole request head and body must arrive within this (slowloris)
MAX_CONNECTIONS = 1000  # Telegram uses at most 100 (max_connections); the rest is ops and Kie
READ_CHUNK = 64 * 1024

RequestHandler = Callable[[Request], Awaitable[Response]]


class _Connection:
    """A served connection's read deadline, enforced by HttpServer's sweeper."""

    __slots__ = ("writer", "deadline", "idle")

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.deadline = math.inf  # no deadline while a handler runs
        self.idle = True  # between requests (as opposed to in the middle of one)

    def expire(self) -> None:
        """Cut the connection; a request that trickled in too slowly gets a 408 first."""
        self.deadline = math.inf
        if not self.idle:
            self.writer.write(render_response(text_response(408, "request not received in time"), keep_alive=False))
        self.writer.close()  # the pending read sees end of stream and the connection ends


class HttpServer:
    """HTTP/1.1 with keep-alive and pipelining on asyncio.start_server.

    ``handler`` turns a Request into a Response; if it raises, the client gets
    a 500 with no detail and the error is logged.  One sweeper task enforces
    every connection's read deadline (idle between requests, or a request that
    trickles in), so a read costs no timer of its own.
    """

    def __init__(
        self,
        handler: RequestHandler,
        *,
        idle_timeout: float = IDLE_TIMEOUT_S,
        request_timeout: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        max_head: int = MAX_HEAD_BYTES,
        max_body: int = MAX_BODY_BYTES,
    ):
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_head = max_head
        self.max_body = max_body
        self.open_connections = 0
        self.closing = False
        self._server: asyncio.base_events.Server | None = None
        self._connections: dict[asyncio.Task, _Connection] = {}
        self._sweeper: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen and return the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=READ_CHUNK, backlog=1024)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="http-deadlines")
        return self._server.sockets[0].getsockname()[1]

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; close idle connections; give busy ones ``grace`` seconds, then cut them."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in self._connections.values():
            if connection.idle:
                connection.writer.close()
        if self._connections:
            _, pending = await asyncio.wait(set(self._connections), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)

    async def _sweep_forever(self) -> None:
        interval = min(1.0, self.request_timeout / 4, self.idle_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for connection in [c for c in self._connections.values() if c.deadline < now]:
                connection.expire()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self.open_connections >= self.max_connections:
            await self._refuse(reader, writer)
            return
        self.open_connections += 1
        connection = self._connections[task] = _Connection(writer)  # type: ignore[index]
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self._serve_requests(reader, writer, connection)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open_connections -= 1
            del self._connections[task]  # type: ignore[arg-type]
            await _close_writer(writer)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """503 for a connection over the bound.  The request is read first (briefly):
        closing a socket with unread data makes the kernel send RST, and the
        client would see a reset instead of the 503."""
        try:
            async with asyncio.timeout(1.0):
                await reader.read(READ_CHUNK)
        except (TimeoutError, ConnectionError):
            pass
        writer.write(render_response(text_response(503, "too many connections"), keep_alive=False))
        await _close_writer(writer)

    async def _serve_requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              connection: _Connection) -> None:
        parser = RequestParser(self.max_head, self.max_body)
        while True:
            try:
                request = await self._read_request(reader, parser, connection)
            except HttpError as error:
                writer.write(render_response(text_response(error.status, error.reason), keep_alive=False))
                return
            if request is None:
                return
            try:
                response = await self.handler(request)
            except Exception:
                log.exception("[HTTP] handler failed for %s %s", request.method, request.path)
                response = text_response(500, "internal error")
            keep_alive = request.keep_alive and not self.closing
            writer.write(render_response(response, keep_alive, request.method == "HEAD"))
            if writer.transport.get_write_buffer_size() > READ_CHUNK:
                await writer.drain()
            if not keep_alive:
                await writer.drain()
                return

    async def _read_request(self, reader: asyncio.StreamReader, parser: RequestParser,
                            connection: _Connection) -> Request | None:
        """The next request, or None when the peer closed or the sweeper cut the connection."""
        connection.idle = not parser.has_partial_request
        timeout = self.idle_timeout if connection.idle else self.request_timeout
        connection.deadline = time.monotonic() + timeout
        while (request := parser.next_request()) is None:
            if connection.idle and self.closing:
                return None
            data = await reader.read(READ_CHUNK)
            if not data:
                return None  # closed (by the peer or the sweeper), possibly mid-request
            if connection.idle:
                connection.idle = False
                connection.deadline = time.monotonic() + self.request_timeout
            parser.feed(data)
        connection.idle, connection.deadline = False, math.inf
        return request


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (ConnectionError, TimeoutError, asyncio.CancelledError, OSError):
        pass


###############################################################################
# 5. Storage
#    Owns the SQLite file: the schema and its versions, the one thread every
#    query runs on, group commits, the update inbox and conversation state.
###############################################################################

SQLITE_BUSY_TIMEOUT_MS = 1000  # longer than this counts as "locked too long": go degraded
INBOX_KEEP_DONE_S = 26 * 3600  # Telegram redelivers for up to 24 h; keep ids to drop duplicates

# Each entry upgrades the schema by one version (PRAGMA user_version).
# Append new versions; never edit a released one.
MIGRATIONS: list[list[str]] = [
    [  # 1: the update inbox, conversation state, users
        """CREATE TABLE inbox (
               update_id   INTEGER PRIMARY KEY,
               chat_key    INTEGER NOT NULL,
               body        BLOB NOT NULL,
               received_at REAL NOT NULL,
               done_at     REAL)""",
        "CREATE INDEX inbox_pending ON inbox(update_id) WHERE done_at IS NULL",
        "CREATE INDEX inbox_done ON inbox(done_at) WHERE done_at IS NOT NULL",
        """CREATE TABLE conversations (
               user_id    INTEGER PRIMARY KEY,
               state      TEXT NOT NULL,
               updated_at REAL NOT NULL)""",
        """CREATE TABLE users (
               user_id    INTEGER PRIMARY KEY,
               lang       TEXT NOT NULL DEFAULT '',
               first_seen REAL NOT NULL,
               last_seen  REAL NOT NULL,
               blocked    INTEGER NOT NULL DEFAULT 0)""",
    ],
    [  # 2: generation jobs (columns mirror the Job dataclass in section 10)
        """CREATE TABLE jobs (
               id                TEXT PRIMARY KEY,
               user_id           INTEGER NOT NULL,
               chat_id           INTEGER NOT NULL,
               lang              TEXT NOT NULL,
               model             TEXT NOT NULL,
               prompt            TEXT NOT NULL,
               ratio             TEXT NOT NULL,
               option            TEXT NOT NULL,
               state             TEXT NOT NULL,
               outcome           TEXT NOT NULL,
               task_id           TEXT NOT NULL,
               result_url        TEXT NOT NULL,
               error             TEXT NOT NULL,
               status_message_id INTEGER NOT NULL,
               created_at        REAL NOT NULL,
               updated_at        REAL NOT NULL)""",
        "CREATE INDEX jobs_open ON jobs(state) WHERE state != 'delivered'",
        "CREATE INDEX jobs_user_time ON jobs(user_id, created_at)",
        "CREATE INDEX jobs_time ON jobs(created_at)",
    ],
    [  # 3: the lease that makes one process on this database the active one (section 11)
        """CREATE TABLE lease (
               name        TEXT PRIMARY KEY,
               owner       TEXT NOT NULL,
               acquired_at REAL NOT NULL,
               expires_at  REAL NOT NULL)""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


class DatabaseUnavailable(TrtError):
    """The database cannot be used right now; callers fall back to memory."""


def open_sqlite(path: str, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """Open (creating the folder if needed) and migrate the database at ``path``."""
    if path != ":memory:":
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000)
    try:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the process being killed; only
        # an OS crash or power loss can lose the last commits (no fsync each).
        conn.execute("PRAGMA synchronous=NORMAL")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION; safe when two processes race to do it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise TrtError(f"database schema v{version} is newer than this bot (v{SCHEMA_VERSION})")
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION


class Database:
    """The one SQLite connection, used only from its own thread.

    Every query runs on that thread, so the event loop never waits on the disk
    or a lock.  ``write`` runs a function inside BEGIN IMMEDIATE ... COMMIT;
    ``read`` runs it outside a transaction.  When SQLite fails, ``ok`` turns
    False, the error is logged once, and callers get DatabaseUnavailable until
    ``reopen`` succeeds.
    """

    def __init__(self, path: str, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS):
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self.ok = False
        self.last_error = "not opened yet"
        self._conn: sqlite3.Connection | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="trt-sqlite")

    async def open(self) -> bool:
        """Open or reopen; on failure log loudly and stay unavailable (never raise)."""
        try:
            await self._on_thread(self._reopen)
        except (sqlite3.Error, OSError, TrtError) as error:
            self._mark_broken(error)
            return False
        self.ok, self.last_error = True, ""
        return True

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._call(self._in_transaction, fn, *args)

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._call(fn, *args)

    async def close(self) -> None:
        try:
            await self._on_thread(self._close)
        finally:
            self._thread.shutdown(wait=False)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if not self.ok:
            raise DatabaseUnavailable(self.last_error)
        try:
            return await self._on_thread(self._with_connection, fn, *args)
        except sqlite3.Error as error:
            self._mark_broken(error)
            raise DatabaseUnavailable(str(error)) from error

    async def _on_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _with_connection(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._conn is None:
            raise sqlite3.OperationalError("database is closed")
        return fn(self._conn, *args)

    @staticmethod
    def _in_transaction(conn: sqlite3.Connection, fn: Callable[..., Any], *args: Any) -> Any:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _reopen(self) -> None:
        self._close()
        self._conn = open_sqlite(self.path, self.busy_timeout_ms)

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _mark_broken(self, error: BaseException) -> None:
        if self.ok or self.last_error == "not opened yet":
            log.error("[DB] unusable, running degraded (memory only): %s", error)
        self.ok, self.last_error = False, str(error) or type(error).__name__


class GroupCommit:
    """Writes items from many coroutines in shared transactions.

    ``submit(item)`` returns a future for that item's result; ``add(item)`` is
    fire-and-forget, and ``on_batch(items, error)`` hears how each batch went.
    While one batch is being written, new items gather into the next one, so
    under load one commit (and one thread hop) serves many requests.
    ``write_batch(conn, items)`` returns one result per item.
    """

    def __init__(self, db: Database, write_batch: Callable[[sqlite3.Connection, list], list],
                 on_batch: Callable[[list, BaseException | None], None] | None = None, max_batch: int = 500):
        self.db = db
        self.write_batch = write_batch
        self.on_batch = on_batch
        self.max_batch = max_batch
        self.batches = 0
        self._pending: list[tuple[Any, asyncio.Future | None]] = []
        self._writer: asyncio.Task | None = None

    def submit(self, item: Any) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._queue(item, future)
        return future

    def add(self, item: Any) -> None:
        self._queue(item, None)

    def _queue(self, item: Any, future: asyncio.Future | None) -> None:
        self._pending.append((item, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all())

    async def _write_all(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
                items = [item for item, _ in batch]
                try:
                    results = await self.db.write(self.write_batch, items)
                except Exception as error:
                    for _, future in batch:
                        if future is not None and not future.done():
                            future.set_exception(error)
                    if self.on_batch is not None:
                        self.on_batch(items, error)
                    continue
                self.batches += 1
                for (_, future), result in zip(batch, results):
                    if future is not None and not future.done():
                        future.set_result(result)
                if self.on_batch is not None:
                    self.on_batch(items, None)
        finally:
            self._writer = None


@dataclasses.dataclass(slots=True)
class InboxItem:
    """One update on its way from the webhook to a handler."""

    update_id: int
    chat_key: int
    update: dict
    body: bytes
    received_at: float
    durable: bool = True


def inbox_insert(conn: sqlite3.Connection, items: list[InboxItem]) -> list[bool]:
    """Insert updates; per item, True if new, False if the update_id was seen."""
    insert = "INSERT OR IGNORE INTO inbox(update_id, chat_key, body, received_at) VALUES (?,?,?,?)"
    results = []
    for item in items:
        cursor = conn.execute(insert, (item.update_id, item.chat_key, item.body, item.received_at))
        results.append(cursor.rowcount == 1)
    return results


@dataclasses.dataclass(frozen=True, slots=True)
class DoneMark:
    """An update handled; who sent it, and whether our reply found them blocking the bot."""

    update_id: int
    user_id: int = 0
    lang: str = ""
    blocked: bool = False


def inbox_mark_done(conn: sqlite3.Connection, marks: list[DoneMark]) -> list[None]:
    """Mark updates handled and remember their senders in ``users``."""
    now = time.time()
    conn.executemany("UPDATE inbox SET done_at=? WHERE update_id=?", [(now, m.update_id) for m in marks])
    # last_seen is kept to the hour, so most updates of a known user write nothing.
    conn.executemany(
        """INSERT INTO users(user_id, lang, first_seen, last_seen, blocked) VALUES (?,?,?,?,?)
           ON CONFLICT(user_id) DO UPDATE SET last_seen=excluded.last_seen, blocked=excluded.blocked,
               lang=CASE WHEN excluded.lang='' THEN users.lang ELSE excluded.lang END
           WHERE users.blocked != excluded.blocked OR users.last_seen < excluded.last_seen - 3600
               OR (excluded.lang != '' AND users.lang != excluded.lang)""",
        [(m.user_id, m.lang, now, now, int(m.blocked)) for m in marks if m.user_id],
    )
    return [None] * len(marks)


def inbox_write(conn: sqlite3.Connection, entries: list[InboxItem | DoneMark]) -> list[bool | None]:
    """New updates and done marks in one transaction: per entry, is-new for an update, None for a mark.

    Under load the marks of handled updates ride along with the commit of
    arriving ones: one transaction and one thread hop for both.
    """
    marks = [entry for entry in entries if isinstance(entry, DoneMark)]
    news = iter(inbox_insert(conn, [entry for entry in entries if isinstance(entry, InboxItem)]))
    if marks:
        inbox_mark_done(conn, marks)
    return [None if isinstance(entry, DoneMark) else next(news) for entry in entries]


def inbox_pending(conn: sqlite3.Connection, limit: int) -> list[tuple[int, int, bytes, float]]:
    """The oldest unhandled updates, in update_id (arrival) order."""
    return conn.execute(
        "SELECT update_id, chat_key, body, received_at FROM inbox WHERE done_at IS NULL ORDER BY update_id LIMIT ?",
        (limit,),
    ).fetchall()


def inbox_backlog(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM inbox WHERE done_at IS NULL").fetchone()[0]


def inbox_prune(conn: sqlite3.Connection, older_than: float) -> int:
    return conn.execute("DELETE FROM inbox WHERE done_at IS NOT NULL AND done_at < ?", (older_than,)).rowcount


PROCESS_TOKEN = secrets.token_hex(3)  # tells this process from an earlier one that had the same pid


def lease_owner_is_gone(holder: str, me: str) -> bool:
    """Whether ``holder`` (host:pid:suffix) is a process on this host that no longer runs.

    A crashed or killed holder need not be waited out.  Owners on other hosts
    are assumed alive until their lease expires.
    """
    host, pid_text, suffix = (holder.split(":") + ["", "", ""])[:3]
    if host != me.split(":")[0] or not pid_text.isdigit():
        return False
    if int(pid_text) == os.getpid():
        # Our pid: another App in this process is alive; an earlier process
        # with the same pid (a restarted container) is not.
        return suffix.split("-")[0] != PROCESS_TOKEN
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def lease_claim(conn: sqlite3.Connection, owner: str, ttl: float, now: float) -> tuple[bool, str, float]:
    """Take or renew the lease if it is free, expired, ours or its holder is gone: (held, owner, expires_at).

    Runs inside BEGIN IMMEDIATE, so two processes cannot both win.  A live
    holder's lease is never taken.
    """
    row = conn.execute("SELECT owner, acquired_at, expires_at FROM lease WHERE name='active'").fetchone()
    if row is not None and row[0] != owner and row[2] > now and not lease_owner_is_gone(row[0], owner):
        return False, row[0], row[2]
    acquired_at = row[1] if row is not None and row[0] == owner else now
    conn.execute("INSERT OR REPLACE INTO lease(name, owner, acquired_at, expires_at) VALUES ('active',?,?,?)",
                 (owner, acquired_at, now + ttl))
    return True, owner, now + ttl


def lease_release(conn: sqlite3.Connection, owner: str) -> None:
    conn.execute("DELETE FROM lease WHERE name='active' AND owner=?", (owner,))


class ConversationStore:
    """Where each user is in a dialog: a dict in memory, written through to SQLite.

    Reads never touch the disk.  A write that fails (database down) is logged
    and kept in memory: the dialog goes on, it just would not survive a restart.
    """

    def __init__(self, db: Database):
        self.db = db
        self._states: dict[int, dict] = {}
        self._writes = GroupCommit(db, self._write_states)

    async def load(self) -> int:
        rows = await self.db.read(lambda conn: conn.execute("SELECT user_id, state FROM conversations").fetchall())
        self._states = {user_id: json.loads(state) for user_id, state in rows}
        return len(self._states)

    def get(self, user_id: int) -> dict | None:
        return self._states.get(user_id)

    async def set(self, user_id: int, state: dict | None) -> None:
        """Replace a user's state (None ends the dialog) and persist it."""
        if state is None and user_id not in self._states:
            return
        if state is None:
            del self._states[user_id]
        else:
            self._states[user_id] = state
        if not self.db.ok:
            return
        try:
            await self._writes.submit((user_id, state))
        except DatabaseUnavailable:
            pass  # already logged by Database; memory stays authoritative

    @staticmethod
    def _write_states(conn: sqlite3.Connection, items: list[tuple[int, dict | None]]) -> list[None]:
        now = time.time()
        for user_id, state in items:
            if state is None:
                conn.execute("DELETE FROM conversations WHERE user_id=?", (user_id,))
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO conversations(user_id, state, updated_at) VALUES (?,?,?)",
                    (user_id, json.dumps(state, ensure_ascii=False), now),
                )
        return [None] * len(items)


###############################################################################
# 6. Telegram client
#    Owns talking to the Bot API: one shared httpx client, response parsing,
#    the retry policy.  The token lives only in request URLs.
###############################################################################

TELEGRAM_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=10.0)
# Long enough to ride out a Bot API hiccup or a short flood wait; short enough that a reply's
# retries end inside the 30 s handler timeout, and a 429 asking for more is raised, not slept through.
TELEGRAM_RETRY_BUDGET_S = 20.0
TELEGRAM_BACKOFF_BASE_S = 0.5  # first retry within 0.5 s, then 1, 2, 4 s ...
TELEGRAM_BACKOFF_CAP_S = 8.0  # ... never more than 8 s between two tries


class TelegramError(TrtError):
    """The Bot API refused a call (``error_code`` as Telegram gives it, or the HTTP status)."""

    def __init__(self, method: str, error_code: int, description: str, retry_after: float | None = None):
        super().__init__(f"{method}: {error_code} {description}")
        self.method = method
        self.error_code = error_code
        self.description = description
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.error_code == 429 or self.error_code >= 500


class TelegramNetworkError(TelegramError):
    """The call did not get an answer (connection refused, timeout, reset)."""

    def __init__(self, method: str, cause: BaseException):
        super().__init__(method, 599, f"network error ({type(cause).__name__})")


def parse_bot_api_response(method: str, status_code: int, content: bytes) -> Any:
    """The ``result`` of a Bot API answer, or TelegramError with what Telegram said."""
    try:
        payload = json.loads(content)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise TelegramError(method, status_code, f"HTTP {status_code} without a Bot API body")
    if payload.get("ok") is True:
        return payload.get("result")
    error_code = payload.get("error_code")
    parameters = payload.get("parameters") or {}
    retry_after = parameters.get("retry_after") if isinstance(parameters, dict) else None
    if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)) or not retry_after >= 0:
        retry_after = None
    return_code = error_code if isinstance(error_code, int) else status_code
    raise TelegramError(method, return_code, str(payload.get("description", "")), retry_after)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When a failed Bot API call is tried again: transient failures, with backoff, within a time budget.

    429, 5xx, network errors and timeouts are transient; anything else (400,
    403, 404, ...) cannot get better by asking again.  A 429 waits what
    Telegram asks; the others back off exponentially with full jitter, so
    calls that failed together do not come back together.
    """

    budget_s: float = TELEGRAM_RETRY_BUDGET_S
    base_s: float = TELEGRAM_BACKOFF_BASE_S
    cap_s: float = TELEGRAM_BACKOFF_CAP_S

    def delay(self, error: TelegramError, retry: int, remaining_s: float,
              jitter: Callable[[float, float], float] = random.uniform) -> float | None:
        """Seconds to wait before retry number ``retry`` (1, 2, ...); None: raise ``error`` now.

        A wait that would end after the budget (``remaining_s``) means giving up.
        """
        if not error.retryable:
            return None
        if error.error_code == 429:
            wait = float(error.retry_after if error.retry_after is not None else 1)
        else:
            wait = jitter(0.0, min(self.cap_s, self.base_s * 2 ** (retry - 1)))
        return wait if wait <= remaining_s else None


def _encode_form_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class TelegramClient:
    """Calls Bot API methods, retrying transient failures as ``retry`` says.

    400/403/404 are raised at once as TelegramError: retrying cannot help.
    A call whose answer was lost (a timeout, a dropped connection) is sent
    again although Telegram may have performed it: a message can then arrive
    twice, but is never lost.  That is the pipeline's promise too (an update
    handled when the process died is handled again after the restart).
    """

    def __init__(self, token: str, api_base: str, http: httpx.AsyncClient, retry: RetryPolicy = RetryPolicy()):
        self._url = f"{api_base}/bot{token}/"
        self.http = http
        self.retry = retry
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()  # (method, outcome)

    async def call(
        self,
        method: str,
        params: dict | None = None,
        files: dict[str, tuple[str, bytes, str]] | None = None,
        timeout: float | None = None,
    ) -> Any:
        deadline = time.monotonic() + self.retry.budget_s
        retries = 0
        while True:
            try:
                result = await self._call_once(method, params or {}, files, timeout)
            except TelegramError as error:
                self.calls[method, str(error.error_code)] += 1
                retries += 1
                wait = self.retry.delay(error, retries, deadline - time.monotonic())
                if wait is None:
                    raise
                log.warning("[TG] %s failed (%s), retry %d in %.1fs", method, error.description, retries, wait)
                await asyncio.sleep(wait)
            else:
                self.calls[method, "ok"] += 1
                return result

    async def _call_once(self, method: str, params: dict, files: dict | None, timeout: float | None) -> Any:
        extra = {} if timeout is None else {"timeout": httpx.Timeout(timeout, connect=5.0)}
        try:
            if files:
                data = {key: _encode_form_value(value) for key, value in params.items()}
                response = await self.http.post(self._url + method, data=data, files=files, **extra)
            else:
                body = json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode()
                headers = {"Content-Type": "application/json"}
                response = await self.http.post(self._url + method, content=body, headers=headers, **extra)
        except httpx.HTTPError as error:
            raise TelegramNetworkError(method, error) from None
        return parse_bot_api_response(method, response.status_code, response.content)

    async def send_message(self, chat_id: int, text: str, reply_markup: dict | None = None, **extra: Any) -> Any:
        params: dict[str, Any] = {"chat_id": chat_id, "text": text, "parse_mode": "HTML", **extra}
        if reply_markup is not None:
            params["reply_markup"] = reply_markup
        return await self.call("sendMessage", params)

    async def answer_callback(self, callback_query_id: str, text: str = "") -> None:
        params: dict[str, Any] = {"callback_query_id": callback_query_id}
        if text:
            params["text"] = text
        try:
            await self.call("answerCallbackQuery", params)
        except TelegramError as error:
            # A query older than ~15 minutes cannot be answered; the rest of the handling still matters.
            log.info("[TG] answerCallbackQuery: %s", error.description)


###############################################################################
# 7. Kie client
#    Owns talking to Kie.ai: the {code, msg, data} envelope, task records,
#    typed errors, retries with backoff and jitter, and request pacing.
###############################################################################

KIE_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
KIE_RETRY_BUDGET_S = 60.0  # total time one call may spend retrying
KIE_CREATE_PACE = (20, 10.0)  # createTask: Kie allows 20 per 10 s per account
KIE_RECORD_PACE = (8, 1.0)  # recordInfo: Kie allows 10 per second per key; keep headroom

# Kie answers HTTP 200 with an error in ``code``; these are the codes it documents.
KIE_ERROR_KINDS = {
    401: "unauthorized",  # bad key
    402: "no_credits",
    404: "not_found",
    422: "invalid",  # the request failed validation
    429: "rate_limited",
    433: "key_limit",  # a sub-key's usage cap
    455: "maintenance",
    500: "server_error",
    501: "generation_failed",
    505: "disabled",
}
KIE_RETRYABLE_CODES = frozenset({429, 455, 500})


class KieError(TrtError):
    """Kie refused or failed a call; ``code`` is Kie's (or the HTTP status, 0 for network)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"Kie {code}: {message}")
        self.code = code
        self.message = message

    @property
    def kind(self) -> str:
        return KIE_ERROR_KINDS.get(self.code, "network" if self.code == 0 else "server_error")

    @property
    def retryable(self) -> bool:
        return self.code == 0 or self.code in KIE_RETRYABLE_CODES or self.code >= 500 and self.code not in (501, 505)


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """What Kie says about a task: pending, success (with URLs) or fail."""

    task_id: str
    state: str  # "pending" | "success" | "fail"
    urls: tuple[str, ...] = ()
    fail_code: str = ""
    fail_message: str = ""


KIE_PENDING_STATES = frozenset({"waiting", "queuing", "generating"})


def parse_kie_envelope(status_code: int, content: bytes) -> Any:
    """``data`` of a Kie answer, or KieError (``code`` is read even on HTTP 200)."""
    try:
        payload = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict):
        raise KieError(status_code if status_code >= 400 else 500, f"HTTP {status_code} without a Kie body")
    code = payload.get("code", status_code)
    message = str(payload.get("msg") or payload.get("message") or "")
    if not isinstance(code, int):
        code = status_code
    if code != 200:
        raise KieError(code, message)
    if status_code >= 400:
        raise KieError(status_code, message)
    return payload.get("data")


def parse_task_record(data: Any) -> TaskRecord:
    """A recordInfo ``data`` (or a callback's) as a TaskRecord; KieError if unreadable."""
    if not isinstance(data, dict):
        raise KieError(500, "task record is not an object")
    task_id = str(data.get("taskId") or data.get("task_id") or "")
    state = str(data.get("state") or "")
    if state in KIE_PENDING_STATES:
        return TaskRecord(task_id, "pending")
    if state == "fail":
        return TaskRecord(task_id, "fail", (), str(data.get("failCode") or ""), str(data.get("failMsg") or ""))
    if state == "success":
        result = data.get("resultJson")
        if isinstance(result, str):
            try:
                result = json.loads(result) if result else {}
            except ValueError:
                raise KieError(500, "resultJson is not valid JSON") from None
        urls = (result or {}).get("resultUrls") if isinstance(result, dict) else None
        urls = tuple(u for u in urls or () if isinstance(u, str) and u.startswith(("http://", "https://")))
        if not urls:
            return TaskRecord(task_id, "fail", (), "no_result", "the task succeeded without an image URL")
        return TaskRecord(task_id, "success", urls)
    raise KieError(500, f"unknown task state {state!r}")


def kie_signature_valid(key: str, task_id: str, timestamp: str, signature: str) -> bool:
    """Kie's X-Webhook-Signature: base64(HMAC-SHA256(key, taskId + "." + X-Webhook-Timestamp))."""
    digest = hmac.new(key.encode(), f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest()
    return bool(timestamp) and hmac.compare_digest(base64.b64encode(digest), signature.encode())


def backoff_delays(base: float = 1.0, cap: float = 20.0) -> Iterable[float]:
    """Exponential backoff with full jitter: 0..1 s, 0..2 s, 0..4 s, ... up to ``cap``."""
    attempt = 0
    while True:
        yield random.uniform(0, min(cap, base * 2**attempt))
        attempt += 1


class RateLimiter:
    """At most ``calls`` acquisitions per ``period`` seconds, shared by every caller."""

    def __init__(self, calls: int, period: float):
        self.calls = calls
        self.period = period
        self._stamps: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                while self._stamps and now - self._stamps[0] >= self.period:
                    self._stamps.popleft()
                if len(self._stamps) < self.calls:
                    self._stamps.append(now)
                    return
                await asyncio.sleep(self._stamps[0] + self.period - now)


class KieClient:
    """createTask, recordInfo and credits, with transient failures retried within a budget.

    Network errors, timeouts, HTTP 5xx and codes 429/455/500 are retried;
    401/402/422/501/505 raise KieError at once.
    """

    def __init__(self, api_key: str, api_base: str, http: httpx.AsyncClient, budget_s: float = KIE_RETRY_BUDGET_S):
        self.api_base = api_base
        self.http = http
        self.budget_s = budget_s
        self.configured = bool(api_key)
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.create_pace = RateLimiter(*KIE_CREATE_PACE)
        self.record_pace = RateLimiter(*KIE_RECORD_PACE)
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()  # (endpoint, outcome)

    async def create_task(self, model: str, inputs: dict, callback_url: str = "") -> str:
        body: dict[str, Any] = {"model": model, "input": inputs}
        if callback_url:
            body["callBackUrl"] = callback_url
        data = await self._request("POST", "/api/v1/jobs/createTask", self.create_pace, json_body=body)
        task_id = (data or {}).get("taskId") if isinstance(data, dict) else None
        if not task_id:
            raise KieError(500, "createTask answered without a taskId")
        return str(task_id)

    async def record_info(self, task_id: str, budget_s: float | None = None) -> TaskRecord:
        """The task's record; ``budget_s=0`` tries once (a poller asks again later anyway)."""
        data = await self._request("GET", "/api/v1/jobs/recordInfo", self.record_pace, params={"taskId": task_id},
                                   budget_s=budget_s)
        return parse_task_record(data)

    async def credits(self) -> float:
        data = await self._request("GET", "/api/v1/chat/credit", None)
        if not isinstance(data, (int, float)) or isinstance(data, bool):
            raise KieError(500, "credit answer is not a number")
        return data

    async def _request(self, method: str, path: str, pace: RateLimiter | None, *, json_body: dict | None = None,
                       params: dict | None = None, budget_s: float | None = None) -> Any:
        endpoint = path.rsplit("/", 1)[-1]
        deadline = time.monotonic() + (self.budget_s if budget_s is None else budget_s)
        for delay in backoff_delays():
            if pace is not None:
                await pace.acquire()
            try:
                data = await self._request_once(method, path, json_body, params)
            except KieError as error:
                self.calls[endpoint, error.kind] += 1
                if not error.retryable or time.monotonic() + delay > deadline:
                    raise
                log.warning("[KIE] %s failed (%s); retrying in %.1fs", endpoint, error, delay)
                await asyncio.sleep(delay)
                continue
            self.calls[endpoint, "ok"] += 1
            return data
        raise AssertionError("unreachable: backoff_delays never ends")

    async def _request_once(self, method: str, path: str, json_body: dict | None, params: dict | None) -> Any:
        content = json.dumps(json_body, ensure_ascii=False).encode() if json_body is not None else None
        try:
            response = await self.http.request(method, self.api_base + path, content=content, params=params,
                                               headers=self._headers, timeout=KIE_TIMEOUT)
        except httpx.HTTPError as error:
            raise KieError(0, f"network error ({type(error).__name__})") from None
        return parse_kie_envelope(response.status_code, response.content)


###############################################################################
# 8. Update pipeline
#    Owns an update from the moment it arrives until a handler is done with it:
#    the durable ack, duplicates, spilling to the inbox when memory is full,
#    the ordered workers, timeouts and the counters /health shows.
###############################################################################

CALLBACK_QUERY_TTL_S = 150.0  # Telegram refuses to answer older callback queries
INBOX_MAX_BACKLOG = 100_000  # beyond this the webhook answers 503 and Telegram keeps the update
REFILL_INTERVAL_S = 1.0  # also how soon updates stored by another instance get picked up
PRUNE_INTERVAL_S = 600.0
BACKLOG_RECOUNT_S = 30.0  # the count is kept in memory; recounting picks up other instances' updates
RECENT_MEMORY_IDS = 10_000  # duplicates remembered while the database is down

# Update kinds keyed by their chat, and kinds keyed by the user who sent them
# (callback queries are keyed by the user, as Telegram orders them).
CHAT_KEYED = ("message", "edited_message", "channel_post", "edited_channel_post", "business_message",
              "my_chat_member", "chat_member", "chat_join_request", "message_reaction")
USER_KEYED = ("callback_query", "inline_query", "chosen_inline_result", "shipping_query",
              "pre_checkout_query", "poll_answer", "chat_boost")


def update_chat_key(update: dict) -> int:
    """The key whose updates must be handled one at a time, in order."""
    for kind in CHAT_KEYED:
        chat = (update.get(kind) or {}).get("chat") if isinstance(update.get(kind), dict) else None
        if isinstance(chat, dict) and isinstance(chat.get("id"), int):
            return chat["id"]
    for kind in USER_KEYED:
        body = update.get(kind)
        if isinstance(body, dict):
            user = body.get("from") or body.get("user") or {}
            if isinstance(user, dict) and isinstance(user.get("id"), int):
                return user["id"]
    return -abs(update.get("update_id", 0)) - 1  # unkeyed: no other update shares it


def update_sender(update: dict) -> tuple[int, str]:
    """(user id, language code) of whoever caused the update; (0, '') if nobody."""
    for body in update.values():
        if isinstance(body, dict) and isinstance(body.get("from"), dict):
            sender = body["from"]
            if isinstance(sender.get("id"), int):
                return sender["id"], str(sender.get("language_code") or "")
    return 0, ""


def parse_update(body: bytes) -> dict:
    """The update in a webhook body, or HttpError(400)."""
    try:
        update = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "body is not valid JSON") from None
    if not isinstance(update, dict):
        raise HttpError(400, "update must be a JSON object")
    update_id = update.get("update_id")
    if not isinstance(update_id, int) or isinstance(update_id, bool):
        raise HttpError(400, "update_id must be an integer")
    return update


@dataclasses.dataclass
class PipelineStats:
    received: int = 0  # new updates accepted
    processed: int = 0  # handled (including those that raised)
    dropped: int = 0  # discarded on purpose: expired or unreadable
    errors: int = 0  # handlers that raised or timed out
    duplicates: int = 0  # redeliveries acknowledged without processing
    spilled: int = 0  # stored while memory was full; picked up later
    memory_only: int = 0  # accepted while the database was down
    rejected: int = 0  # answered 503 (backlog or memory full)
    blocked: int = 0  # replies refused because the user blocked the bot


UpdateHandler = Callable[[dict], Awaitable[None]]


class UpdatePipeline:
    """Durable, ordered delivery of updates to ``handler``.

    ``ingest`` returns the HTTP status for the webhook: 200 once the update is
    committed to the inbox (or, with the database down, held in memory), 503
    when it cannot be kept.  Workers take updates from a bounded asyncio.Queue;
    updates of one chat never run at once and run in arrival order.
    """

    def __init__(
        self,
        db: Database,
        handler: UpdateHandler,
        *,
        queue_size: int = 100,
        workers: int = 3,
        handler_timeout: float = 30.0,
        max_backlog: int = INBOX_MAX_BACKLOG,
    ):
        self.db = db
        self.handler = handler
        self.queue_size = queue_size
        self.worker_count = workers
        self.handler_timeout = handler_timeout
        self.max_backlog = max_backlog
        self.should_process = True  # False while another instance holds the lease
        self.stats = PipelineStats()
        self.backlog = 0  # unhandled rows in the inbox
        self.workers_active = 0
        self.on_handled: Callable[[float], None] = lambda seconds: None
        self._queue: asyncio.Queue[InboxItem] = asyncio.Queue(maxsize=queue_size)
        self._inbox = GroupCommit(db, inbox_write, on_batch=self._on_inbox_written)
        self._in_memory: set[int] = set()  # queued, parked or being handled
        self._admitting: set[int] = set()  # being committed by ingest; refill must not take them
        self._awaiting_done: set[int] = set()  # handled, done mark not committed yet
        self._unmarked: list[DoneMark] = []  # done marks that failed to commit
        self._recent_memory_ids: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._busy_chats: dict[int, collections.deque[InboxItem]] = {}
        self._deadlines: dict[asyncio.Task, float] = {}  # worker -> when its handler is overdue
        self._overdue: set[asyncio.Task] = set()  # workers whose handler we cancelled
        self._spilling = False
        self._refill_wakeup = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._accepting = True

    # -- the ack path -------------------------------------------------------

    async def ingest(self, update: dict, body: bytes) -> int:
        update_id = update["update_id"]
        item = InboxItem(update_id, update_chat_key(update), update, body, time.time())
        if self.db.ok:
            if self.backlog >= self.max_backlog:
                self.stats.rejected += 1
                return 503
            self._admitting.add(update_id)
            try:
                is_new = await self._inbox.submit(item)
            except DatabaseUnavailable:
                pass  # fall through to memory
            else:
                if not is_new:
                    self.stats.duplicates += 1
                    return 200
                self.stats.received += 1
                self.backlog += 1
                self._admit(item)
                return 200
            finally:
                self._admitting.discard(update_id)
        return self._ingest_in_memory(item)

    def _admit(self, item: InboxItem) -> None:
        if self._accepting and self.should_process and not self._spilling and self._has_room():
            self._enqueue(item)
        else:
            self._spilling = True
            self.stats.spilled += 1
            self._refill_wakeup.set()

    def _ingest_in_memory(self, item: InboxItem) -> int:
        """Degraded mode: availability over durability, as long as memory has room."""
        if item.update_id in self._recent_memory_ids:
            self.stats.duplicates += 1
            return 200
        if not (self._accepting and self.should_process and self._has_room()):
            self.stats.rejected += 1
            return 503
        self._recent_memory_ids[item.update_id] = None
        if len(self._recent_memory_ids) > RECENT_MEMORY_IDS:
            self._recent_memory_ids.popitem(last=False)
        item.durable = False
        self.stats.received += 1
        self.stats.memory_only += 1
        self._enqueue(item)
        return 200

    def _has_room(self) -> bool:
        return len(self._in_memory) < self.queue_size

    def _enqueue(self, item: InboxItem) -> None:
        self._in_memory.add(item.update_id)
        self._queue.put_nowait(item)  # never full: it holds at most len(_in_memory) items

    # -- workers ----------------------------------------------------------

    async def start(self) -> None:
        if self.db.ok:
            try:
                self.backlog = await self.db.read(inbox_backlog)
            except DatabaseUnavailable:
                pass
        self._spilling = self.backlog > 0
        self._tasks = [asyncio.create_task(self._worker(), name=f"worker-{n}") for n in range(self.worker_count)]
        self._tasks.append(asyncio.create_task(self._refill_forever(), name="inbox-refill"))
        log.info("[QUEUE] Workers started: %d workers, queue max %d, inbox backlog %d",
                 self.worker_count, self.queue_size, self.backlog)

    async def _worker(self) -> None:
        while True:
            item: InboxItem | None = await self._queue.get()
            key = item.chat_key
            parked = self._busy_chats.get(key)
            if parked is not None:  # another worker is on this chat; it takes this one next
                parked.append(item)
                continue
            self._busy_chats[key] = parked = collections.deque()
            try:
                while item is not None:
                    await self._process(item)
                    item = parked.popleft() if parked else None
            finally:
                del self._busy_chats[key]

    async def _process(self, item: InboxItem) -> None:
        self.workers_active += 1
        started = time.monotonic()
        blocked = False
        task = asyncio.current_task()
        self._deadlines[task] = started + self.handler_timeout  # type: ignore[index]
        try:
            if "callback_query" in item.update and time.time() - item.received_at > CALLBACK_QUERY_TTL_S:
                self.stats.dropped += 1
            else:
                await self.handler(item.update)
        except asyncio.CancelledError:
            if task not in self._overdue or task.cancelling() > 1:  # type: ignore[union-attr]
                raise  # shutdown, not (only) our cut
            self.stats.errors += 1
            log.error("[QUEUE] update %d: handler timed out after %.0fs", item.update_id, self.handler_timeout)
        except TelegramError as error:
            if error.error_code == 403:
                blocked = True
                self.stats.blocked += 1
                log.info("[QUEUE] update %d: the user blocked the bot", item.update_id)
            else:
                self.stats.errors += 1
                log.error("[QUEUE] update %d: Telegram refused: %s", item.update_id, error)
        except Exception:
            self.stats.errors += 1
            log.exception("[QUEUE] update %d: handler failed", item.update_id)
        finally:
            del self._deadlines[task]  # type: ignore[arg-type]
            if task in self._overdue:  # withdraw our cancel request, landed or swallowed
                self._overdue.discard(task)  # type: ignore[arg-type]
                task.uncancel()  # type: ignore[union-attr]
            self.workers_active -= 1
            self.stats.processed += 1
            self.on_handled(time.monotonic() - started)
            self._in_memory.discard(item.update_id)
            if item.durable:
                user_id, lang = update_sender(item.update)
                self._submit_done_marks([DoneMark(item.update_id, user_id, lang, blocked)])
            if self._spilling and self.queue_size - len(self._in_memory) >= max(1, self.queue_size // 4):
                self._refill_wakeup.set()

    async def _write_quietly(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            await self.db.write(fn, *args)
        except DatabaseUnavailable:
            pass

    def _submit_done_marks(self, marks: list[DoneMark]) -> None:
        for mark in marks:
            self._awaiting_done.add(mark.update_id)
            self._inbox.add(mark)

    def _on_inbox_written(self, entries: list[InboxItem | DoneMark], error: BaseException | None) -> None:
        marks = [entry for entry in entries if isinstance(entry, DoneMark)]
        if not marks:
            return
        if error is not None:
            self._unmarked.extend(marks)  # kept out of refill until the database is back
            return
        self._awaiting_done.difference_update(mark.update_id for mark in marks)
        self.backlog = max(0, self.backlog - len(marks))

    # -- the inbox ---------------------------------------------------------

    async def _refill_forever(self) -> None:
        last_prune = last_count = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._refill_wakeup.wait(), REFILL_INTERVAL_S)
            except TimeoutError:
                pass
            self._refill_wakeup.clear()
            self._cut_overdue_handlers()
            if not self.db.ok:
                continue
            if self._unmarked:
                retry, self._unmarked = self._unmarked, []
                self._submit_done_marks(retry)
            if self._accepting and self.should_process:
                await self._refill()
            if time.monotonic() - last_count > BACKLOG_RECOUNT_S:  # counts what other instances stored too
                last_count = time.monotonic()
                try:
                    self.backlog = await self.db.read(inbox_backlog)
                except DatabaseUnavailable:
                    pass
            if time.monotonic() - last_prune > PRUNE_INTERVAL_S:
                last_prune = time.monotonic()
                await self._write_quietly(inbox_prune, time.time() - INBOX_KEEP_DONE_S)

    def _cut_overdue_handlers(self) -> None:
        """Cancel handlers past ``handler_timeout``.

        One check a second for all workers instead of a timer per update (an
        asyncio.timeout costs a few microseconds on every update); the cut
        lands at most a second late.
        """
        now = time.monotonic()
        for task, deadline in self._deadlines.items():
            if deadline < now and task not in self._overdue:
                self._overdue.add(task)
                task.cancel()

    async def _refill(self) -> None:
        """Move the oldest stored updates into memory while there is room."""
        room = self.queue_size - len(self._in_memory)
        if room <= 0:
            return
        limit = room + len(self._in_memory) + len(self._awaiting_done) + len(self._admitting)
        try:
            rows = await self.db.read(inbox_pending, limit)
        except DatabaseUnavailable:
            return
        taken, more_left = 0, len(rows) == limit
        for update_id, chat_key, body, received_at in rows:
            if taken == room:
                more_left = True
                break
            # Checked now, not before the read: ids change hands while we wait.
            if update_id in self._in_memory or update_id in self._awaiting_done or update_id in self._admitting:
                continue
            try:
                update = json.loads(body)
            except ValueError:
                self.stats.dropped += 1
                self._submit_done_marks([DoneMark(update_id)])
                continue
            self._enqueue(InboxItem(update_id, chat_key, update, body, received_at))
            taken += 1
        self._spilling = more_left

    def wake(self) -> None:
        """Look at the inbox now (after the database recovers or the lease is won)."""
        self._refill_wakeup.set()

    # -- shutdown and metrics ------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Finish what is in memory within ``grace`` seconds; the rest stays in the inbox."""
        self._accepting = False
        deadline = time.monotonic() + grace
        while self._in_memory and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        lost = sum(1 for uid in self._in_memory if uid in self._recent_memory_ids)
        if lost:
            log.error("[QUEUE] %d memory-only updates were not handled before shutdown", lost)
        deadline = time.monotonic() + 2.0
        while self._awaiting_done and self.db.ok and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    @property
    def workers_alive(self) -> bool:
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    @property
    def queue_depth(self) -> int:
        return len(self._in_memory) - self.workers_active

    def snapshot(self) -> dict:
        stats = self.stats
        return {
            "total_received": stats.received,
            "total_processed": stats.processed,
            "total_dropped": stats.dropped,
            "total_errors": stats.errors,
            "workers_active": self.workers_active,
            "queue_depth": self.queue_depth,
            "queue_max": self.queue_size,
            "drop_rate": round(100.0 * stats.dropped / stats.received, 2) if stats.received else 0.0,
            "duplicates": stats.duplicates,
            "spilled": stats.spilled,
            "memory_only": stats.memory_only,
            "rejected": stats.rejected,
            "inbox_backlog": self.backlog,
        }


###############################################################################
# 9. Conversation
#    Owns what the user sees: the model catalog, texts in both languages,
#    keyboards, and the handlers for commands, messages and button presses.
###############################################################################

PROMPT_MAX_CHARS = 1000  # z-image's limit; the catalog's other models accept more
CAPTION_MAX_CHARS = 1024  # Telegram's photo caption limit
RU_LANGUAGES = frozenset({"ru", "uk", "be", "kk"})


@dataclasses.dataclass(frozen=True)
class ModelOption:
    """A required choice a model adds after the ratio (quality, resolution)."""

    field: str
    title: dict[str, str]  # per language
    choices: tuple[tuple[str, dict[str, str]], ...]  # (value sent to Kie, label per language)

    def label(self, value: str, lang: str) -> str:
        return dict(self.choices)[value][lang]


@dataclasses.dataclass(frozen=True)
class ImageModel:
    """A Kie Market text-to-image model: adding one is adding a row to CATALOG."""

    key: str  # short id used in button data
    kie_model: str  # the ``model`` sent to createTask
    title: str
    ratios: tuple[str, ...]
    option: ModelOption | None = None
    fixed_input: tuple[tuple[str, Any], ...] = ()

    def inputs(self, prompt: str, ratio: str, option: str = "") -> dict[str, Any]:
        data: dict[str, Any] = {"prompt": prompt, "aspect_ratio": ratio, **dict(self.fixed_input)}
        if self.option is not None:
            data[self.option.field] = option
        return data


Z_IMAGE = ImageModel("zimage", "z-image", "Z-Image", ("1:1", "16:9", "9:16", "4:3", "3:4"))

# Ratios and options as Kie's model pages list them for text-to-image.
CATALOG: tuple[ImageModel, ...] = (
    Z_IMAGE,
    ImageModel("nanobanana", "google/nano-banana", "Nano Banana",
               ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9"), fixed_input=(("output_format", "png"),)),
    ImageModel("seedream45", "seedream/4.5-text-to-image", "Seedream 4.5",
               ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9"),
               ModelOption("quality", {"ru": "качество", "en": "quality"},
                           (("basic", {"ru": "Обычное (2K)", "en": "Basic (2K)"}),
                            ("high", {"ru": "Высокое (4K)", "en": "High (4K)"})))),
    ImageModel("flux2pro", "flux-2/pro-text-to-image", "Flux 2 Pro",
               ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"),
               ModelOption("resolution", {"ru": "разрешение", "en": "resolution"},
                           (("1K", {"ru": "1K", "en": "1K"}), ("2K", {"ru": "2K", "en": "2K"})))),
    ImageModel("grok", "grok-imagine/text-to-image", "Grok Imagine", ("1:1", "16:9", "9:16", "3:2", "2:3")),
    ImageModel("imagen4fast", "google/imagen4-fast", "Imagen 4 Fast", ("1:1", "16:9", "9:16", "4:3", "3:4")),
)

MODELS_BY_KEY = {model.key: model for model in CATALOG}

TEXTS: dict[str, dict[str, str]] = {
    "ru": {
        "start": "👋 <b>Привет!</b> Я рисую картинки по описанию.\n\n"
                 "Нажмите «🖼 Создать картинку», опишите, что хотите увидеть, выберите формат — "
                 "и через полминуты пришлю результат.",
        "start_catalog": "\n\nИли сначала выберите модель ниже.",
        "help": "ℹ️ <b>Как пользоваться</b>\n"
                "1. Нажмите «🖼 Создать картинку».\n"
                "2. Опишите картинку одним сообщением (до 1000 символов).\n"
                "3. Выберите формат — и ждите картинку.\n\n"
                "/start — меню, /cancel — отменить, /help — эта справка.",
        "cancelled": "Отменено. Меню — ниже.",
        "hint": "Чтобы нарисовать картинку, нажмите «🖼 Создать картинку».",
        "stale_button": "Эта кнопка больше не действует.",
        "ask_prompt": "🎨 Модель: <b>{model}</b>\n\n✍️ Опишите картинку одним сообщением (до {limit} символов).\n"
                      "Например: <i>кот-космонавт, акварель</i>",
        "prompt_empty": "Описание пустое. Напишите словами, что нарисовать.",
        "prompt_too_long": "Слишком длинное описание: {length} символов, а можно до {limit}. "
                           "Сократите и пришлите снова.",
        "prompt_not_text": "Пришлите описание текстом — картинки и стикеры я не понимаю.",
        "ask_ratio": "Выберите формат для «{prompt}»:",
        "ask_option": "Выберите {option}:",
        "generating": "⏳ Генерирую…",
        "busy_user": "⏳ Предыдущая картинка ещё рисуется. Дождитесь её — и можно следующую.",
        "hourly_limit": "Можно не больше {limit} картинок в час. Следующую — через {minutes} мин.",
        "not_configured": "Генерация пока не настроена: администратору нужно указать ключ Kie.ai.",
        "fail_moderation": "🚫 Запрос отклонён модерацией. Попробуйте описать иначе.",
        "fail_busy": "😮‍💨 Сервис сейчас перегружен. Попробуйте ещё раз через минуту.",
        "fail_timeout": "⌛ Генерация заняла слишком много времени и была остановлена.",
        "fail_unavailable": "🛠 Генерация временно недоступна. Мы уже разбираемся.",
        "fail_invalid": "Сервис не принял запрос. Попробуйте изменить описание.",
        "fail_failed": "😔 Не получилось нарисовать картинку.",
        "fail_delivery": "Картинка готова, но отправить её не удалось.",
        "btn_create": "🖼 Создать картинку",
        "btn_help": "ℹ️ Помощь",
        "btn_cancel": "✖️ Отмена",
        "btn_again": "🔁 Ещё вариант",
        "btn_new": "🖼 Новая картинка",
        "btn_retry": "🔁 Попробовать снова",
        "admin_alert": "⚠️ Kie.ai: {reason}. Пользователи видят «временно недоступно», пока это не исправлено.",
        "stats": "📊 <b>Статистика</b>\n"
                 "Пользователей: {users} (заблокировали бота: {blocked})\n"
                 "Генераций сегодня: {jobs_today}\n"
                 "Сейчас в работе: {in_flight}\n"
                 "Апдейты: получено {received}, обработано {processed}, ошибок {errors}, "
                 "в очереди {queue_depth}, в инбоксе {backlog}\n"
                 "Кредиты Kie.ai: {credits}",
    },
    "en": {
        "start": "👋 <b>Hi!</b> I draw pictures from a description.\n\n"
                 "Tap “🖼 Create a picture”, describe what you want to see, pick a format, "
                 "and in half a minute you get the image.",
        "start_catalog": "\n\nOr pick a model below first.",
        "help": "ℹ️ <b>How to use</b>\n"
                "1. Tap “🖼 Create a picture”.\n"
                "2. Describe the picture in one message (up to 1000 characters).\n"
                "3. Pick a format and wait for the picture.\n\n"
                "/start — menu, /cancel — cancel, /help — this help.",
        "cancelled": "Cancelled. The menu is below.",
        "hint": "To draw a picture, tap “🖼 Create a picture”.",
        "stale_button": "This button no longer works.",
        "ask_prompt": "🎨 Model: <b>{model}</b>\n\n✍️ Describe the picture in one message (up to {limit} characters).\n"
                      "For example: <i>an astronaut cat, watercolour</i>",
        "prompt_empty": "The description is empty. Tell me in words what to draw.",
        "prompt_too_long": "That description is {length} characters long; the limit is {limit}. "
                           "Please shorten it and send it again.",
        "prompt_not_text": "Please send the description as text; I cannot read pictures or stickers.",
        "ask_ratio": "Pick a format for “{prompt}”:",
        "ask_option": "Pick the {option}:",
        "generating": "⏳ Generating…",
        "busy_user": "⏳ Your previous picture is still being drawn. Wait for it, then ask for the next one.",
        "hourly_limit": "You can make up to {limit} pictures an hour. Next one in {minutes} min.",
        "not_configured": "Generation is not set up yet: the admin needs to add a Kie.ai key.",
        "fail_moderation": "🚫 The request was rejected by moderation. Try describing it differently.",
        "fail_busy": "😮‍💨 The service is overloaded right now. Try again in a minute.",
        "fail_timeout": "⌛ Generation took too long and was stopped.",
        "fail_unavailable": "🛠 Generation is temporarily unavailable. We are on it.",
        "fail_invalid": "The service did not accept the request. Try changing the description.",
        "fail_failed": "😔 The picture could not be generated.",
        "fail_delivery": "The picture is ready but could not be sent.",
        "btn_create": "🖼 Create a picture",
        "btn_help": "ℹ️ Help",
        "btn_cancel": "✖️ Cancel",
        "btn_again": "🔁 Another variant",
        "btn_new": "🖼 New picture",
        "btn_retry": "🔁 Try again",
        "admin_alert": "⚠️ Kie.ai: {reason}. Users see “temporarily unavailable” until this is fixed.",
        "stats": "📊 <b>Stats</b>\n"
                 "Users: {users} (blocked the bot: {blocked})\n"
                 "Generations today: {jobs_today}\n"
                 "In flight: {in_flight}\n"
                 "Updates: received {received}, processed {processed}, errors {errors}, "
                 "queued {queue_depth}, in inbox {backlog}\n"
                 "Kie.ai credits: {credits}",
    },
}

# Shown when building the real menu fails: no lookups, nothing that can raise.
FALLBACK_MENU = {"inline_keyboard": [[{"text": "🖼 Создать картинку", "callback_data": "new"}]]}


def user_language(user: dict | None) -> str:
    """'ru' for Russian-reading users and when Telegram does not say; 'en' otherwise."""
    code = str((user or {}).get("language_code") or "").split("-")[0].lower()
    return "ru" if not code or code in RU_LANGUAGES else "en"


def button(text: str, data: str) -> dict:
    return {"text": text, "callback_data": data}


def keyboard(*rows: list[dict]) -> dict:
    return {"inline_keyboard": [row for row in rows if row]}


def in_rows(buttons: list[dict], per_row: int) -> list[list[dict]]:
    return [buttons[i:i + per_row] for i in range(0, len(buttons), per_row)]


def main_menu(lang: str, models: tuple[ImageModel, ...] = (Z_IMAGE,)) -> dict:
    t = TEXTS[lang]
    model_rows = in_rows([button(f"🎨 {m.title}", f"model:{m.key}") for m in models], 2) if len(models) > 1 else []
    return keyboard([button(t["btn_create"], "new")], *model_rows, [button(t["btn_help"], "help")])


def ratio_keyboard(model: ImageModel, lang: str) -> dict:
    ratios = [button(ratio, f"ratio:{ratio}") for ratio in model.ratios]
    return keyboard(*in_rows(ratios, 3), [button(TEXTS[lang]["btn_cancel"], "cancel")])


def option_keyboard(option: ModelOption, lang: str) -> dict:
    choices = [button(labels[lang], f"opt:{value}") for value, labels in option.choices]
    return keyboard(choices, [button(TEXTS[lang]["btn_cancel"], "cancel")])


def result_keyboard(job_id: str, lang: str, failed: bool = False) -> dict:
    t = TEXTS[lang]
    again = button(t["btn_retry"] if failed else t["btn_again"], f"again:{job_id}")
    return keyboard([again], [button(t["btn_new"], "new")])


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_prompt(text: str) -> tuple[str, dict[str, Any]] | None:
    """None if the prompt is usable, else (text key, format values) explaining why not."""
    if not text.strip():
        return "prompt_empty", {}
    if len(text) > PROMPT_MAX_CHARS:
        return "prompt_too_long", {"length": len(text), "limit": PROMPT_MAX_CHARS}
    return None


def parse_command(text: str) -> str | None:
    """'/start@MyBot payload' -> '/start'; None when the text is not a command."""
    if not text.startswith("/"):
        return None
    return text.split(maxsplit=1)[0].split("@", 1)[0].lower()


@dataclasses.dataclass
class Context:
    """Who an update came from, where to answer, and whether a button press was answered."""

    chat_id: int
    user_id: int
    lang: str
    t: dict[str, str]
    callback_id: str = ""
    answered: bool = False


class Conversation:
    """Routes each update to a handler: commands, dialog steps and buttons by table.

    The dialog state per user is {"step": "prompt" | "ratio" | "option",
    "model": key, "prompt": ..., "ratio": ...}.  Button data is untrusted: a
    value not in the tables or not matching the user's step is answered
    politely and changes nothing.
    """

    def __init__(self, config: Config, telegram: TelegramClient, states: ConversationStore,
                 generations: Generations):
        self.config = config
        self.telegram = telegram
        self.states = states
        self.generations = generations
        self.models = (Z_IMAGE,) if config.single_model_only else CATALOG
        self.models_by_key = {model.key: model for model in self.models}
        self.queue_stats: Callable[[], dict] = dict  # set by App to the pipeline's snapshot
        self.commands: dict[str, Callable[[Context, dict], Awaitable[None]]] = {
            "/start": self.on_start,
            "/help": self.on_help,
            "/cancel": self.on_cancel,
            "/stats": self.on_stats,
        }
        self.buttons: dict[str, Callable[[Context, str], Awaitable[None]]] = {
            "new": self.on_create_button,
            "model": self.on_model_button,
            "ratio": self.on_ratio_button,
            "opt": self.on_option_button,
            "again": self.on_again_button,
            "cancel": self.on_cancel_button,
            "help": self.on_help_button,
        }

    async def handle(self, update: dict) -> None:
        if isinstance(update.get("message"), dict):
            await self.on_message(update["message"])
        elif isinstance(update.get("callback_query"), dict):
            await self.on_callback_query(update["callback_query"])

    async def on_message(self, message: dict) -> None:
        chat, user = message.get("chat") or {}, message.get("from") or {}
        if not isinstance(chat.get("id"), int):
            return
        lang = user_language(user)
        ctx = Context(chat["id"], user.get("id") or chat["id"], lang, TEXTS[lang])
        text = message.get("text")
        command = parse_command(text) if isinstance(text, str) else None
        if command in self.commands:
            await self.commands[command](ctx, message)
        elif (self.states.get(ctx.user_id) or {}).get("step") == "prompt":
            await self.on_prompt(ctx, text)
        else:
            await self.send_hint(ctx)

    async def on_callback_query(self, query: dict) -> None:
        user = query.get("from") or {}
        chat_id = ((query.get("message") or {}).get("chat") or {}).get("id") or user.get("id")
        lang = user_language(user)
        ctx = Context(chat_id, user.get("id") or 0, lang, TEXTS[lang], str(query.get("id", "")))
        data = query.get("data")
        verb, _, argument = data.partition(":") if isinstance(data, str) else ("", "", "")
        handler = self.buttons.get(verb)
        try:
            if handler is not None and isinstance(chat_id, int) and ctx.user_id:
                await handler(ctx, argument)
        finally:
            if not ctx.answered:  # every query gets an answer, forged and failing ones too
                await self.answer(ctx, ctx.t["stale_button"])

    async def answer(self, ctx: Context, text: str = "") -> None:
        ctx.answered = True
        await self.telegram.answer_callback(ctx.callback_id, text)

    async def send(self, ctx: Context, key: str, markup: dict | None = None, **values: Any) -> None:
        await self.telegram.send_message(ctx.chat_id, ctx.t[key].format(**values), markup)

    # -- commands -----------------------------------------------------------

    async def on_start(self, ctx: Context, message: dict) -> None:
        """Must answer whatever else is broken: no database read, a fallback menu."""
        try:
            menu = main_menu(ctx.lang, self.models)
            text = ctx.t["start"] + (ctx.t["start_catalog"] if len(self.models) > 1 else "")
        except Exception:
            log.exception("[BOT] main menu failed; sending the fallback")
            menu, text = FALLBACK_MENU, TEXTS["ru"]["start"]
        try:
            await self.states.set(ctx.user_id, None)
        except Exception:
            log.exception("[BOT] could not reset the dialog of %d", ctx.user_id)
        await self.telegram.send_message(ctx.chat_id, text, menu)

    async def on_help(self, ctx: Context, message: dict) -> None:
        await self.send(ctx, "help", main_menu(ctx.lang, self.models))

    async def on_cancel(self, ctx: Context, message: dict | None = None) -> None:
        await self.states.set(ctx.user_id, None)
        await self.send(ctx, "cancelled", main_menu(ctx.lang, self.models))

    async def on_stats(self, ctx: Context, message: dict) -> None:
        if ctx.user_id not in self.config.admin_ids:
            await self.send_hint(ctx)
            return
        usage = await self.generations.usage()
        queue = self.queue_stats()
        jobs_today = ", ".join(f"{outcome} {n}" for outcome, n in sorted(usage["jobs_today"].items())) or "0"
        await self.send(ctx, "stats", **{**usage, "jobs_today": jobs_today}, received=queue.get("total_received"),
                        processed=queue.get("total_processed"), errors=queue.get("total_errors"),
                        queue_depth=queue.get("queue_depth"), backlog=queue.get("inbox_backlog"))

    async def send_hint(self, ctx: Context) -> None:
        await self.send(ctx, "hint", main_menu(ctx.lang, self.models))

    # -- the dialog ---------------------------------------------------------

    async def on_create_button(self, ctx: Context, argument: str) -> None:
        await self.ask_prompt(ctx, Z_IMAGE)

    async def on_model_button(self, ctx: Context, key: str) -> None:
        model = self.models_by_key.get(key)
        if model is not None:
            await self.ask_prompt(ctx, model)

    async def ask_prompt(self, ctx: Context, model: ImageModel) -> None:
        await self.answer(ctx)
        if not self.generations.kie.configured:
            await self.send(ctx, "not_configured")
            return
        await self.states.set(ctx.user_id, {"step": "prompt", "model": model.key})
        cancel = keyboard([button(ctx.t["btn_cancel"], "cancel")])
        await self.send(ctx, "ask_prompt", cancel, model=model.title, limit=PROMPT_MAX_CHARS)

    async def on_prompt(self, ctx: Context, text: Any) -> None:
        if not isinstance(text, str):
            await self.send(ctx, "prompt_not_text")
            return
        problem = check_prompt(text)
        if problem is not None:
            await self.send(ctx, problem[0], **problem[1])
            return
        state = self.states.get(ctx.user_id) or {}
        model = self.models_by_key.get(state.get("model", ""), Z_IMAGE)
        await self.states.set(ctx.user_id, {"step": "ratio", "model": model.key, "prompt": text.strip()})
        await self.send(ctx, "ask_ratio", ratio_keyboard(model, ctx.lang), prompt=html.escape(shorten(text.strip(), 200)))

    async def on_ratio_button(self, ctx: Context, ratio: str) -> None:
        state = self.states.get(ctx.user_id) or {}
        model = self.models_by_key.get(state.get("model", ""))
        if state.get("step") != "ratio" or model is None or ratio not in model.ratios:
            return  # a stale or forged button: answered as stale, nothing changes
        await self.answer(ctx)
        if model.option is None:
            await self.generate(ctx, model, state["prompt"], ratio)
            return
        await self.states.set(ctx.user_id, {**state, "step": "option", "ratio": ratio})
        await self.send(ctx, "ask_option", option_keyboard(model.option, ctx.lang), option=model.option.title[ctx.lang])

    async def on_option_button(self, ctx: Context, value: str) -> None:
        state = self.states.get(ctx.user_id) or {}
        model = self.models_by_key.get(state.get("model", ""))
        if state.get("step") != "option" or model is None or model.option is None:
            return  # (a saved dialog can outlive a catalog change)
        if value not in dict(model.option.choices):
            return
        await self.answer(ctx)
        await self.generate(ctx, model, state["prompt"], state["ratio"], value)

    async def on_again_button(self, ctx: Context, job_id: str) -> None:
        job = await self.generations.find(job_id, ctx.user_id)
        model = self.models_by_key.get(job.model) if job is not None else None
        if job is None or model is None:
            return
        await self.answer(ctx)
        await self.generate(ctx, model, job.prompt, job.ratio, job.option)

    async def generate(self, ctx: Context, model: ImageModel, prompt: str, ratio: str, option: str = "") -> None:
        refusal = self.generations.refusal(ctx.user_id)
        if refusal is not None:
            await self.send(ctx, refusal[0], **refusal[1])
            return
        # The dialog ends only once the job is stored, so a press replayed after kill -9
        # never finds the dialog over and no job to show for it.
        await self.generations.start(ctx, model, prompt, ratio, option)
        await self.states.set(ctx.user_id, None)

    async def on_cancel_button(self, ctx: Context, argument: str) -> None:
        await self.answer(ctx)
        await self.on_cancel(ctx)

    async def on_help_button(self, ctx: Context, argument: str) -> None:
        await self.answer(ctx)
        await self.send(ctx, "help", main_menu(ctx.lang, self.models))


###############################################################################
# 10. Generation jobs
#    Owns a generation from the button press to the photo: the job table and
#    its state machine, submitting to Kie under the fairness limits, the
#    callback and the paced poller, delivery, and admin alerts.
###############################################################################

SUBMITTERS = 2  # createTask calls in flight at once (they are paced to 20 per 10 s anyway)
POLLS_AT_ONCE = 8  # recordInfo calls in flight at once (paced to 8 per second)
POLL_SCHEDULE = ((30.0, 3.0), (120.0, 6.0), (600.0, 15.0))  # (job younger than, poll every) seconds
POLL_EVERY_AFTERWARDS = 30.0
DELIVERY_RETRY_S = 30.0
PHOTO_UPLOAD_MAX_BYTES = 10 * 1024 * 1024  # Bot API limit for photos sent as files
DOCUMENT_UPLOAD_MAX_BYTES = 50 * 1024 * 1024  # ... and for documents
JOB_ID_PATTERN = re.compile(r"[0-9a-f]{16}")

# The state machine: a transition not listed here is refused, which is what
# makes a callback, a duplicate callback and the poller deliver one photo.
JOB_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "created": ("submitted", "failed", "timed_out"),  # waiting for a Kie slot and createTask
    "submitted": ("succeeded", "failed", "timed_out"),  # Kie has the task id
    "succeeded": ("delivered",),  # result URL known, photo not sent yet
    "failed": ("delivered",),  # failure known, user not told yet
    "timed_out": ("delivered",),
    "delivered": (),  # the user has the photo or the explanation
}
OUTCOMES = {"succeeded": "success", "failed": "failed", "timed_out": "timed_out"}

# What the user is told, by Kie error kind (see KIE_ERROR_KINDS).
FAILURE_BY_KIE_KIND = {
    "unauthorized": "unavailable", "no_credits": "unavailable", "disabled": "unavailable", "key_limit": "unavailable",
    "rate_limited": "busy", "maintenance": "busy", "server_error": "busy", "network": "busy",
    "invalid": "invalid", "generation_failed": "failed", "not_found": "failed",
}
INCIDENT_CODES = {401: "the Kie API key was rejected (401)", 402: "the Kie account is out of credits (402)"}
MODERATION_WORDS = ("moderat", "prohibit", "nsfw", "sensitive", "safety", "policy", "violat", "inappropriate")


def failure_for_record(record: TaskRecord) -> str:
    """Why a failed task failed, in user terms: 'moderation' or 'failed'."""
    message = record.fail_message.lower()
    return "moderation" if any(word in message for word in MODERATION_WORDS) else "failed"


def poll_interval(age_s: float) -> float:
    for younger_than, every in POLL_SCHEDULE:
        if age_s < younger_than:
            return every
    return POLL_EVERY_AFTERWARDS


@dataclasses.dataclass
class Job:
    """One generation; its fields are the columns of the ``jobs`` table."""

    id: str
    user_id: int
    chat_id: int
    lang: str
    model: str  # ImageModel.key
    prompt: str
    ratio: str
    option: str = ""
    state: str = "created"
    outcome: str = ""  # success | failed | timed_out, once known
    task_id: str = ""
    result_url: str = ""
    error: str = ""  # failure kind shown to the user (fail_<error> in TEXTS)
    status_message_id: int = 0  # the ⏳ message
    created_at: float = 0.0
    updated_at: float = 0.0


JOB_COLUMNS = tuple(field.name for field in dataclasses.fields(Job))


def jobs_save(conn: sqlite3.Connection, rows: list[tuple]) -> list[None]:
    columns = ",".join(JOB_COLUMNS)
    marks = ",".join("?" * len(JOB_COLUMNS))
    conn.executemany(f"INSERT OR REPLACE INTO jobs({columns}) VALUES ({marks})", rows)
    return [None] * len(rows)


def jobs_unfinished(conn: sqlite3.Connection) -> list[tuple]:
    return conn.execute(f"SELECT {','.join(JOB_COLUMNS)} FROM jobs WHERE state != 'delivered'").fetchall()


def jobs_created_since(conn: sqlite3.Connection, since: float) -> list[tuple[int, float]]:
    return conn.execute("SELECT user_id, created_at FROM jobs WHERE created_at >= ? ORDER BY created_at",
                        (since,)).fetchall()


def job_row(conn: sqlite3.Connection, job_id: str) -> tuple | None:
    return conn.execute(f"SELECT {','.join(JOB_COLUMNS)} FROM jobs WHERE id=?", (job_id,)).fetchone()


def usage_counts(conn: sqlite3.Connection, since: float) -> dict[str, Any]:
    users, blocked = conn.execute("SELECT count(*), coalesce(sum(blocked), 0) FROM users").fetchone()
    outcomes = conn.execute("SELECT outcome, count(*) FROM jobs WHERE created_at >= ? GROUP BY outcome",
                            (since,)).fetchall()
    return {"users": users, "blocked": blocked, "jobs_today": {outcome or "in_flight": n for outcome, n in outcomes}}


class DownloadError(TrtError):
    """The result image could not be fetched for upload (HTTP error or too large)."""


async def download_bounded(http: httpx.AsyncClient, url: str, limit: int) -> bytes:
    """GET ``url`` into memory, refusing more than ``limit`` bytes."""
    try:
        async with http.stream("GET", url, timeout=KIE_TIMEOUT) as response:
            if response.status_code != 200:
                raise DownloadError(f"HTTP {response.status_code}")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise DownloadError(f"image larger than {limit} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as error:
        raise DownloadError(type(error).__name__) from None
    return b"".join(chunks)


def image_file_name(url: str) -> tuple[str, str]:
    """A file name and MIME type for an uploaded result, from the URL's extension."""
    extension = os.path.splitext(urllib.parse.urlsplit(url).path)[1].lower()
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(extension, "image/png")
    return "image" + (extension if extension in (".jpg", ".jpeg", ".webp", ".png") else ".png"), mime


class Generations:
    """Every job of this process, from creation to delivery.

    Jobs are held in memory (the authority inside the process, so transitions
    are atomic) and written through to SQLite, from which ``resume`` reloads
    unfinished ones after a restart.
    """

    def __init__(self, config: Config, db: Database, telegram: TelegramClient, kie: KieClient,
                 http: httpx.AsyncClient):
        self.config = config
        self.db = db
        self.telegram = telegram
        self.kie = kie
        self.http = http
        self.callback_url = (
            f"{config.webhook_base_url.rstrip('/')}/{config.kie_callback_path}?"
            + urllib.parse.urlencode({"token": config.kie_callback_token})
            if config.webhook_base_url else ""
        )
        self.jobs: dict[str, Job] = {}  # unfinished jobs
        self.created = 0
        self.finished: collections.Counter[str] = collections.Counter()  # outcome -> count
        self.on_finished: Callable[[Job, float], None] = lambda job, seconds: None
        self.in_kie = 0  # jobs holding one of config.kie_max_tasks slots
        self._by_task: dict[str, str] = {}
        self._active_by_user: dict[int, str] = {}
        self._recent_by_user: dict[int, collections.deque[float]] = {}
        self._usage_loaded = False
        self._submissions: asyncio.Queue[str] = asyncio.Queue()
        self._slot_freed = asyncio.Event()
        self._poll_heap: list[tuple[float, int, str]] = []
        self._poll_sequence = 0
        self._poll_wakeup = asyncio.Event()
        self._polling: set[str] = set()
        self._delivering: set[str] = set()
        self._redeliver_at: dict[str, float] = {}
        self._incident: int | None = None  # Kie error code of an ongoing incident
        self._writes = GroupCommit(db, jobs_save)
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []

    # -- lifecycle -----------------------------------------------------------

    async def resume(self) -> None:
        """Load unfinished jobs not yet in memory, and run the submitters and the poller.

        Called on becoming active, and again when the database comes back
        after being unusable; jobs already in memory are left as they are.
        """
        try:
            rows = await self.db.read(jobs_unfinished)
            if not self._usage_loaded:  # once: later jobs are counted as they are created
                for user_id, created_at in await self.db.read(jobs_created_since, time.time() - 3600):
                    self._recent_by_user.setdefault(user_id, collections.deque()).append(created_at)
                self._usage_loaded = True
        except DatabaseUnavailable:
            rows = []
        for row in rows:
            job = Job(*row)
            if job.id in self.jobs:
                continue
            self._track(job)
            if job.state == "created":
                self._submissions.put_nowait(job.id)
            elif job.state == "submitted":
                self.in_kie += 1
                self._schedule_poll(job, 0.0)  # callbacks may have come while we were down
            else:
                self._spawn(self._deliver(job))
        if rows:
            log.info("[JOB] resumed %d unfinished jobs", len(rows))
        if self._loops:
            return
        self._loops = [asyncio.create_task(self._submit_forever(), name=f"submitter-{n}") for n in range(SUBMITTERS)]
        self._loops.append(asyncio.create_task(self._poll_forever(), name="job-poller"))

    async def stop(self, grace: float = 5.0) -> None:
        """Stop submitting and polling; let deliveries under way finish within ``grace``.

        Whatever is cut short stays in the jobs table and resumes on the next start.
        """
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def pause(self) -> None:
        """Stop and forget every job: another instance became active and resumes them."""
        await self.stop(grace=5.0)
        for container in (self.jobs, self._by_task, self._active_by_user, self._recent_by_user, self._redeliver_at):
            container.clear()
        self._poll_heap.clear()
        self._submissions = asyncio.Queue()
        self.in_kie = 0
        self._usage_loaded = False

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- starting a job ----------------------------------------------------

    def refusal(self, user_id: int) -> tuple[str, dict[str, Any]] | None:
        """Why ``user_id`` may not start a generation now (text key, values), or None."""
        if user_id in self._active_by_user:
            return "busy_user", {}
        if user_id in self.config.admin_ids:
            return None
        stamps = self._recent_by_user.get(user_id)
        now = time.time()
        while stamps and now - stamps[0] >= 3600:
            stamps.popleft()
        if stamps and len(stamps) >= self.config.gen_hourly_limit:
            minutes = max(1, int((stamps[0] + 3600 - now) / 60) + 1)
            return "hourly_limit", {"limit": self.config.gen_hourly_limit, "minutes": minutes}
        return None

    async def start(self, ctx: Context, model: ImageModel, prompt: str, ratio: str, option: str) -> Job:
        """Create a job (durably) and queue it; the handler returns at once."""
        status = await self.telegram.send_message(ctx.chat_id, ctx.t["generating"])
        now = time.time()
        job = Job(secrets.token_hex(8), ctx.user_id, ctx.chat_id, ctx.lang, model.key, prompt, ratio, option,
                  status_message_id=(status or {}).get("message_id", 0) if isinstance(status, dict) else 0,
                  created_at=now, updated_at=now)
        self._track(job)
        self.created += 1
        self._recent_by_user.setdefault(job.user_id, collections.deque()).append(now)
        try:
            await self._writes.submit(dataclasses.astuple(job))  # durable before the update counts as handled
        except DatabaseUnavailable:
            pass  # memory keeps it; it just will not survive a restart
        log.info("[JOB] %s created: user %d, %s %s", job.id, job.user_id, model.kie_model, ratio)
        self._submissions.put_nowait(job.id)
        return job

    async def find(self, job_id: str, user_id: int) -> Job | None:
        """A job of ``user_id`` by id (for "🔁"), None if unknown or someone else's."""
        if not JOB_ID_PATTERN.fullmatch(job_id):
            return None
        job = self.jobs.get(job_id)
        if job is None:
            try:
                row = await self.db.read(job_row, job_id)
            except DatabaseUnavailable:
                row = None
            job = Job(*row) if row else None
        return job if job is not None and job.user_id == user_id else None

    def _track(self, job: Job) -> None:
        self.jobs[job.id] = job
        self._active_by_user[job.user_id] = job.id
        if job.task_id:
            self._by_task[job.task_id] = job.id

    def _forget(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        self._by_task.pop(job.task_id, None)
        self._redeliver_at.pop(job.id, None)
        if self._active_by_user.get(job.user_id) == job.id:
            del self._active_by_user[job.user_id]

    def _save(self, job: Job) -> None:
        """Write the job's current state; failures are logged by Database, memory stays authoritative."""
        self._writes.add(dataclasses.astuple(job))

    def _move(self, job: Job, state: str, **changes: Any) -> bool:
        """Apply a transition if JOB_TRANSITIONS allows it; False (and no change) otherwise."""
        if state not in JOB_TRANSITIONS[job.state]:
            return False
        if job.state == "submitted":
            self._release_slot()
        job.state = state
        for name, value in changes.items():
            setattr(job, name, value)
        job.updated_at = time.time()
        if state in OUTCOMES:
            job.outcome = OUTCOMES[state]
            self.finished[job.outcome] += 1
            self.on_finished(job, job.updated_at - job.created_at)
            log.info("[JOB] %s %s after %.1fs%s", job.id, state, job.updated_at - job.created_at,
                     f" ({job.error})" if job.error else "")
        self._save(job)
        return True

    # -- submitting ----------------------------------------------------------

    def _release_slot(self) -> None:
        self.in_kie -= 1
        self._slot_freed.set()

    async def _submit_forever(self) -> None:
        while True:
            job = self.jobs.get(await self._submissions.get())
            if job is None or job.state != "created":
                continue
            while self.in_kie >= self.config.kie_max_tasks:  # the global bound on tasks at Kie
                self._slot_freed.clear()
                await self._slot_freed.wait()
            self.in_kie += 1
            await self._submit(job)

    async def _submit(self, job: Job) -> None:
        model = MODELS_BY_KEY[job.model]
        try:
            task_id = await self.kie.create_task(model.kie_model, model.inputs(job.prompt, job.ratio, job.option),
                                                 self.callback_url)
        except KieError as error:
            self._release_slot()
            log.warning("[JOB] %s: createTask failed: %s", job.id, error)
            if self._move(job, "failed", error=FAILURE_BY_KIE_KIND.get(error.kind, "failed")):
                self._spawn(self._deliver(job))
            if error.code in INCIDENT_CODES:
                await self._alert_admins(error.code)
            return
        if self._incident is not None:
            log.warning("[JOB] Kie works again; incident %d over", self._incident)
            self._incident = None
        if not self._move(job, "submitted", task_id=task_id):  # timed out while createTask ran
            self._release_slot()
            return
        self._by_task[task_id] = job.id
        self._schedule_poll(job, time.time() + poll_interval(0.0))

    async def _alert_admins(self, code: int) -> None:
        """One alert per incident: the next successful createTask ends it."""
        if self._incident is not None:
            return
        self._incident = code
        log.error("[JOB] Kie incident: %s; alerting %d admins", INCIDENT_CODES[code], len(self.config.admin_ids))
        for admin_id in sorted(self.config.admin_ids):
            try:
                await self.telegram.send_message(admin_id, TEXTS["ru"]["admin_alert"].format(reason=INCIDENT_CODES[code]))
            except TelegramError as error:
                log.warning("[JOB] could not alert admin %d: %s", admin_id, error.description)

    # -- completion: callback and poller --------------------------------------

    def on_callback(self, task_id: str, data: Any) -> None:
        """A Kie callback (already authenticated): apply it, or poll when it is unreadable."""
        job = self.jobs.get(self._by_task.get(task_id, ""))
        if job is None:
            log.info("[JOB] callback for a task that is unknown or finished: %s", task_id)
            return
        try:
            record = parse_task_record(data)
        except KieError:
            self._schedule_poll(job, 0.0)
            return
        self._apply(job, record)

    def _apply(self, job: Job, record: TaskRecord) -> None:
        if record.state == "success":
            moved = self._move(job, "succeeded", result_url=record.urls[0])
        elif record.state == "fail":
            moved = self._move(job, "failed", error=failure_for_record(record))
        else:
            return
        if moved:
            self._spawn(self._deliver(job))

    def _schedule_poll(self, job: Job, when: float) -> None:
        self._poll_sequence += 1
        heapq.heappush(self._poll_heap, (when, self._poll_sequence, job.id))
        self._poll_wakeup.set()

    async def _poll_forever(self) -> None:
        last_prune = time.time()
        while True:
            now = time.time()
            self._expire_overdue(now)
            self._retry_deliveries(now)
            if now - last_prune > 600:
                last_prune = now
                self._forget_old_usage(now)
            while self._poll_heap and self._poll_heap[0][0] <= now and len(self._polling) < POLLS_AT_ONCE:
                job = self.jobs.get(heapq.heappop(self._poll_heap)[2])
                if job is not None and job.state == "submitted" and job.id not in self._polling:
                    self._polling.add(job.id)
                    self._spawn(self._poll(job))
            delay = 1.0
            if self._poll_heap and len(self._polling) < POLLS_AT_ONCE:
                delay = min(delay, max(0.0, self._poll_heap[0][0] - now))
            self._poll_wakeup.clear()
            try:
                await asyncio.wait_for(self._poll_wakeup.wait(), delay)
            except TimeoutError:
                pass

    async def _poll(self, job: Job) -> None:
        try:
            record = await self.kie.record_info(job.task_id, budget_s=0)
        except KieError as error:
            log.warning("[JOB] %s: recordInfo failed: %s", job.id, error)
            record = None
        finally:
            self._polling.discard(job.id)
            self._poll_wakeup.set()
        if job.state != "submitted":
            return
        if record is not None and record.state != "pending":
            self._apply(job, record)
        else:
            self._schedule_poll(job, time.time() + poll_interval(time.time() - job.created_at))

    def _forget_old_usage(self, now: float) -> None:
        """Drop hourly-limit stamps older than an hour, so idle users cost no memory."""
        for user_id in [u for u, stamps in self._recent_by_user.items() if not stamps or now - stamps[-1] >= 3600]:
            del self._recent_by_user[user_id]

    def _expire_overdue(self, now: float) -> None:
        for job in list(self.jobs.values()):
            if job.state in ("created", "submitted") and now - job.created_at > self.config.gen_timeout_s:
                if self._move(job, "timed_out", error="timeout"):
                    self._spawn(self._deliver(job))

    # -- delivery --------------------------------------------------------------

    def _retry_deliveries(self, now: float) -> None:
        for job_id, when in list(self._redeliver_at.items()):
            job = self.jobs.get(job_id)
            if when <= now and job is not None:
                del self._redeliver_at[job_id]
                self._spawn(self._deliver(job))

    async def _deliver(self, job: Job) -> None:
        """Send the photo or the failure once; the state machine guards against twice."""
        if job.id in self._delivering or job.state not in OUTCOMES:
            return
        self._delivering.add(job.id)
        try:
            if job.state == "succeeded":
                await self._send_result(job)
            else:
                await self._send_failure(job)
        except TelegramError as error:
            if error.retryable:
                log.warning("[JOB] %s: delivery failed (%s); retrying in %.0fs", job.id, error, DELIVERY_RETRY_S)
                self._redeliver_at[job.id] = time.time() + DELIVERY_RETRY_S
                return
            log.warning("[JOB] %s: cannot deliver (%s)", job.id, error.description)
        finally:
            self._delivering.discard(job.id)
        self._move(job, "delivered")
        self._forget(job)

    async def _send_result(self, job: Job) -> None:
        params = {
            "chat_id": job.chat_id,
            "caption": html.escape(shorten(job.prompt, CAPTION_MAX_CHARS)),
            "parse_mode": "HTML",
            "reply_markup": result_keyboard(job.id, job.lang),
        }
        try:
            try:
                await self.telegram.call("sendPhoto", {**params, "photo": job.result_url})
            except TelegramError as error:
                if error.error_code != 400:
                    raise
                log.info("[JOB] %s: Telegram could not fetch the image (%s); uploading it", job.id, error.description)
                await self._upload_result(job, params)
        except DownloadError as error:
            log.warning("[JOB] %s: could not download the result: %s", job.id, error)
            job.error = "delivery"
            await self._send_failure(job)
            return
        await self._delete_status_message(job)

    async def _upload_result(self, job: Job, params: dict) -> None:
        image = await download_bounded(self.http, job.result_url, DOCUMENT_UPLOAD_MAX_BYTES)
        name, mime = image_file_name(job.result_url)
        if len(image) <= PHOTO_UPLOAD_MAX_BYTES:
            try:
                await self.telegram.call("sendPhoto", params, files={"photo": (name, image, mime)})
                return
            except TelegramError as error:
                if error.error_code != 400:  # e.g. PHOTO_INVALID_DIMENSIONS: a document still works
                    raise
        await self.telegram.call("sendDocument", params, files={"document": (name, image, mime)})

    async def _send_failure(self, job: Job) -> None:
        text = TEXTS[job.lang][f"fail_{job.error or 'failed'}"]
        markup = result_keyboard(job.id, job.lang, failed=True)
        if job.status_message_id:
            try:
                await self.telegram.call("editMessageText", {"chat_id": job.chat_id, "text": text,
                                                             "message_id": job.status_message_id,
                                                             "parse_mode": "HTML", "reply_markup": markup})
                return
            except TelegramError as error:
                if error.error_code != 400:
                    raise
        await self.telegram.send_message(job.chat_id, text, markup)

    async def _delete_status_message(self, job: Job) -> None:
        if not job.status_message_id:
            return
        try:
            await self.telegram.call("deleteMessage", {"chat_id": job.chat_id, "message_id": job.status_message_id})
        except TelegramError as error:
            log.info("[JOB] %s: could not remove the ⏳ message: %s", job.id, error.description)

    # -- reporting -------------------------------------------------------------

    async def usage(self) -> dict[str, Any]:
        """Users, today's jobs by outcome (UTC day), jobs in flight and Kie credits, for /stats."""
        midnight = time.time() // 86400 * 86400
        try:
            counts = await self.db.read(usage_counts, midnight)
        except DatabaseUnavailable:
            counts = {"users": "?", "blocked": "?", "jobs_today": {}}
        try:
            credits: Any = await self.kie.credits() if self.kie.configured else "—"
        except KieError as error:
            credits = f"— ({error.kind})"
        return {**counts, "in_flight": len(self.jobs), "credits": credits}

###############################################################################
# 11. Application
#    Owns wiring the sections together: the single-active-instance lease,
#    HTTP routes and diagnostics (/health, /diag/*, /metrics), webhook set-up
#    or polling, database recovery, start-up and shutdown order, ``check``
#    and main().
###############################################################################

ALLOWED_UPDATES = ["message", "callback_query"]
POLL_TIMEOUT_S = 50  # getUpdates long-poll; Telegram allows up to 50 s
DIAG_CACHE_S = 5.0
DB_RETRY_S = 2.0
OK_BODY = b'{"ok":true}'
PASSIVE_RETRY_S = 1.0  # how often a passive instance tries for the lease (a released one is taken this fast)


def plan_webhook(info: dict, url: str, allowed_updates: list[str], flush_over: int) -> tuple[str, str]:
    """What ensure_webhook should do: ('keep' | 'set' | 'flush', why)."""
    pending = info.get("pending_update_count") or 0
    last_error = info.get("last_error_message") or ""
    if flush_over >= 0 and last_error:
        return "flush", f"last error: {last_error}"
    if flush_over >= 0 and pending > flush_over:
        return "flush", f"{pending} pending updates (over {flush_over})"
    if info.get("url") != url:
        return "set", "URL differs"
    if sorted(info.get("allowed_updates") or []) != sorted(allowed_updates):
        return "set", "allowed updates differ"
    return "keep", "webhook already matches"


def mask_webhook_url(url: str) -> str:
    """https://host/webhook/<secret> -> https://host/webhook/***"""
    return re.sub(r"/webhook/[^/?#]+", "/webhook/***", url)


async def ensure_webhook(telegram: TelegramClient, config: Config) -> str:
    """Make Telegram's webhook match ours, flushing a stuck backlog; returns the action taken."""
    info = await telegram.call("getWebhookInfo") or {}
    action, reason = plan_webhook(info, config.webhook_url, ALLOWED_UPDATES, config.flush_pending_over)
    if action != "keep":
        params = {
            "url": config.webhook_url,
            "secret_token": config.webhook_secret,
            "allowed_updates": ALLOWED_UPDATES,
            "drop_pending_updates": action == "flush",
        }
        await telegram.call("setWebhook", params)
    if action == "flush":
        log.warning("[WEBHOOK] flushed %d pending updates (%s)", info.get("pending_update_count") or 0, reason)
    log.info("[WEBHOOK] configured %s (%s: %s)", mask_webhook_url(config.webhook_url), action, reason)
    return action


def iso_utc(timestamp: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp)) if timestamp else None


class InstanceLease:
    """Which process on this database is the active one, decided by a lease row.

    ``check()`` takes the lease if it is free or expired and renews it if it is
    ours; it never takes a live holder's.  The holder renews every third of the
    TTL; others retry every PASSIVE_RETRY_S, so a released lease changes hands
    within a second and a dead holder's within the TTL and a second.
    """

    def __init__(self, db: Database, ttl: float):
        self.db = db
        self.ttl = ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{PROCESS_TOKEN}-{secrets.token_hex(2)}"
        self.held = False
        self.holder = ""  # who holds it, as last seen
        self.expires_at = 0.0
        self.last_check = 0.0
        self._checked = False

    @property
    def interval(self) -> float:
        return self.ttl / 3 if self.held else min(PASSIVE_RETRY_S, self.ttl / 3)

    async def check(self) -> bool | None:
        """True if we hold the lease, False if another live process does, None if the database is unusable."""
        try:
            held, holder, expires_at = await self.db.write(lease_claim, self.owner, self.ttl, time.time())
        except DatabaseUnavailable:
            return None
        was_held, first = self.held, not self._checked
        self.held, self.holder, self.expires_at = held, holder, expires_at
        self.last_check, self._checked = time.time(), True
        if held and not was_held:
            log.info("[LOCK] acquired by %s", self.owner)
        elif not held and (was_held or first):
            log.warning("[LOCK] passive: %s holds the lease until %s", holder, iso_utc(expires_at))
        return held

    async def release(self) -> None:
        if not self.held:
            return
        try:
            await self.db.write(lease_release, self.owner)
        except DatabaseUnavailable:
            return  # it expires by itself
        self.held = False
        log.info("[LOCK] released by %s", self.owner)


# -- metrics: the Prometheus text exposition format ---------------------------

ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
HANDLING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
GENERATION_BUCKETS = (5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0)

Sample = tuple[str, dict[str, str], float]  # (name suffix, labels, value)


class Histogram:
    """Observations counted into fixed buckets, rendered cumulatively as Prometheus expects."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.buckets):
            self.counts[index] += 1
        self.count += 1
        self.sum += value

    def samples(self) -> list[Sample]:
        cumulative = list(itertools.accumulate(self.counts))
        rows: list[Sample] = [("_bucket", {"le": repr(bound)}, n) for bound, n in zip(self.buckets, cumulative)]
        return rows + [("_bucket", {"le": "+Inf"}, self.count), ("_sum", {}, self.sum), ("_count", {}, self.count)]


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(families: list[tuple[str, str, str, list[Sample]]]) -> bytes:
    """(name, type, help, samples) per metric family -> Prometheus text format 0.0.4."""
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for suffix, labels, value in samples:
            label_text = ",".join(f'{key}="{_label_value(str(v))}"' for key, v in labels.items())
            lines.append(f"{name}{suffix}{{{label_text}}} {float(value)!r}" if labels else f"{name}{suffix} {float(value)!r}")
    return ("\n".join(lines) + "\n").encode()


# Pipeline counters exported as trt_updates_<name>_total.
UPDATE_COUNTERS = (
    ("received", "Updates accepted (new update ids)."),
    ("processed", "Updates handled, including those whose handler failed."),
    ("duplicates", "Redelivered updates acknowledged without processing."),
    ("spilled", "Updates stored while memory was full, handled later."),
    ("dropped", "Updates discarded on purpose (expired or unreadable)."),
    ("errors", "Handlers that raised or timed out."),
    ("memory_only", "Updates accepted while the database was unusable."),
    ("rejected", "Updates answered 503 (inbox or memory full)."),
    ("blocked", "Replies refused because the user blocked the bot."),
)


class App:
    """The running bot: one HTTP server, one database, one pipeline, one Bot API client.

    It is *active* (processes updates, polls, runs jobs) while it holds the
    lease, or when the database is unusable from the start (then nothing is
    shared to coordinate through).  A passive instance still stores webhook
    updates in the shared inbox for the active one.
    """

    def __init__(self, config: Config, http: httpx.AsyncClient | None = None):
        self.config = config
        self.started_at = time.monotonic()
        self.port: int | None = None
        self.stopping = False
        self.active = False
        self.poll_timeout = POLL_TIMEOUT_S
        self.db = Database(config.database_path)
        self.lease = InstanceLease(self.db, config.lease_ttl_s)
        self.http = http or httpx.AsyncClient(
            timeout=TELEGRAM_TIMEOUT, limits=httpx.Limits(max_connections=100, max_keepalive_connections=100)
        )
        self.telegram = TelegramClient(config.telegram_token, config.telegram_api_base, self.http)
        self.kie = KieClient(config.kie_api_key, config.kie_api_base, self.http)
        self.states = ConversationStore(self.db)
        self.generations = Generations(config, self.db, self.telegram, self.kie, self.http)
        self.conversation = Conversation(config, self.telegram, self.states, self.generations)
        self.pipeline = UpdatePipeline(
            self.db,
            self.conversation.handle,
            queue_size=config.queue_size,
            workers=config.queue_workers,
            handler_timeout=config.handler_timeout_s,
        )
        self.conversation.queue_stats = self.pipeline.snapshot
        self.ack_seconds = Histogram(ACK_BUCKETS)
        self.handling_seconds = Histogram(HANDLING_BUCKETS)
        self.generation_seconds = Histogram(GENERATION_BUCKETS)
        self.pipeline.on_handled = self.handling_seconds.observe
        self.generations.on_finished = lambda job, seconds: self.generation_seconds.observe(seconds)
        self.server = HttpServer(self.handle_request)
        self.routes: dict[str, dict[str, RequestHandler]] = {
            config.webhook_path: {"POST": self.on_webhook},
            "/" + config.kie_callback_path: {"POST": self.on_kie_callback},
            "/health": {"GET": self.on_health},
            "/diag/webhook": {"GET": self.guarded(self.on_diag_webhook)},
            "/diag/lock": {"GET": self.guarded(self.on_diag_lock)},
            "/metrics": {"GET": self.guarded(self.on_metrics)},
            "/": {"GET": self.on_root},
        }
        self._webhook_secret = config.webhook_secret.encode()
        self._webhook_info: tuple[float, dict] | None = None
        self._webhook_setup: asyncio.Task | None = None
        self._background: list[asyncio.Task] = []

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        install_secret_masking(self.config.secrets)
        # Bind first: Render marks a deploy failed when the port opens late.
        self.port = await self.server.start(self.config.host, self.config.port)
        log.info("[HTTP] listening on %s:%d", self.config.host, self.port)
        if await self.db.open():
            log.info("[DB] ready at %s (schema v%d)", self.config.database_path, SCHEMA_VERSION)
        role = await self.lease.check()
        self.pipeline.should_process = role is not False
        await self.pipeline.start()
        if role is not False:
            await self._activate()
        self._spawn(self._watch_database(), "db-watch")
        self._spawn(self._hold_lease(), "lease")
        if self.config.bot_mode == "polling":
            self._spawn(self._poll_forever(), "polling")

    async def stop(self) -> None:
        """Graceful shutdown within config.shutdown_grace_s (Render waits 30 s by default).

        The lease is released last, after in-memory work is finished, so the
        successor never picks up an update this process is still handling.
        """
        if self.stopping:
            return
        self.stopping = True
        deadline = time.monotonic() + self.config.shutdown_grace_s
        log.info("[APP] shutting down")
        await self.server.close(grace=min(5.0, self.config.shutdown_grace_s / 4))
        tasks = [*self._background, *([self._webhook_setup] if self._webhook_setup else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.pipeline.stop(grace=max(0.0, deadline - time.monotonic()))
        await self.generations.stop(grace=max(0.0, deadline - time.monotonic()))
        await self.lease.release()
        await self.http.aclose()
        await self.db.close()
        log.info("[APP] stopped")

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        self._background.append(asyncio.create_task(coro, name=name))  # type: ignore[arg-type]

    async def _activate(self) -> None:
        """Become the processing instance: fresh state from the database, jobs, the webhook."""
        self.active = True
        self.pipeline.should_process = True
        if self.db.ok:
            try:
                log.info("[DB] %d open dialogs loaded", await self.states.load())
            except DatabaseUnavailable:
                pass
        await self.generations.resume()
        self.pipeline.wake()
        if self.config.bot_mode == "webhook" and self._webhook_setup is None:
            self._webhook_setup = asyncio.create_task(self._configure_webhook(), name="webhook-setup")

    async def _deactivate(self) -> None:
        self.active = False
        self.pipeline.should_process = False
        await self.generations.pause()

    async def _hold_lease(self) -> None:
        """Renew the lease (or try for it) for the life of the process.

        When the database is unusable the role stays as it was: a process that
        cannot read the shared inbox or jobs cannot handle them twice, and
        /start keeps working from memory.
        """
        while True:
            await asyncio.sleep(self.lease.interval)
            role = await self.lease.check()
            if role is True and not self.active:
                await self._activate()
            elif role is False and self.active:
                await self._deactivate()

    async def _watch_database(self) -> None:
        """Reopen an unusable database every few seconds and return to durable mode."""
        while True:
            await asyncio.sleep(DB_RETRY_S)
            if not self.db.ok and await self.db.open():
                log.warning("[DB] recovered; back to durable mode")
                self.pipeline.wake()
                if self.active:
                    await self.generations.resume()

    async def _configure_webhook(self) -> None:
        delay = 1.0
        while True:
            try:
                await ensure_webhook(self.telegram, self.config)
                return
            except TelegramError as error:
                log.error("[WEBHOOK] set-up failed (%s); retrying in %.0fs", error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    async def _poll_forever(self) -> None:
        """Long-poll getUpdates into the same inbox the webhook feeds (only while active)."""
        while not self.active:
            await asyncio.sleep(PASSIVE_RETRY_S)
        await self._retry_until_done("deleteWebhook", {"drop_pending_updates": False})
        log.info("[POLL] polling getUpdates")
        offset, delay = None, 1.0
        while True:
            if not self.active:
                await asyncio.sleep(PASSIVE_RETRY_S)
                continue
            params = {"timeout": self.poll_timeout, "allowed_updates": ALLOWED_UPDATES}
            if offset is not None:
                params["offset"] = offset
            try:
                updates = await self.telegram.call("getUpdates", params, timeout=self.poll_timeout + 10)
            except TelegramError as error:
                if error.error_code == 409:
                    log.warning("[POLL] 409 Conflict: another process polls this bot or a webhook is set; "
                                "retrying in %.0fs", delay)
                else:
                    log.warning("[POLL] getUpdates failed (%s); retrying in %.0fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            delay = 1.0
            for update in updates or []:
                if not isinstance(update, dict) or not isinstance(update.get("update_id"), int):
                    continue
                body = json.dumps(update, ensure_ascii=False, separators=(",", ":")).encode()
                if await self.pipeline.ingest(update, body) != 200:
                    await asyncio.sleep(1.0)  # full: ask again later from this update on
                    break
                offset = update["update_id"] + 1

    async def _retry_until_done(self, method: str, params: dict) -> Any:
        delay = 1.0
        while True:
            try:
                return await self.telegram.call(method, params)
            except TelegramError as error:
                log.error("[TG] %s failed (%s); retrying in %.0fs", method, error, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    # -- HTTP routes -----------------------------------------------------------

    async def handle_request(self, request: Request) -> Response:
        """Route a request; the one place an HttpError becomes a response."""
        methods = self.routes.get(request.path)
        if methods is None:
            if request.path.startswith("/webhook/"):
                return text_response(401, "wrong webhook secret")
            return text_response(404, "not found")
        handler = methods.get("GET" if request.method == "HEAD" and "GET" in methods else request.method)
        if handler is None:
            allow = ", ".join(sorted({*methods, *(("HEAD",) if "GET" in methods else ())}))
            return text_response(405, "method not allowed", (("Allow", allow),))
        try:
            return await handler(request)
        except HttpError as error:
            return text_response(error.status, error.reason)

    def guarded(self, handler: RequestHandler) -> RequestHandler:
        """With DIAG_TOKEN set, require it as a Bearer token or ?token=."""
        if not self.config.diag_token:
            return handler
        expected = self.config.diag_token.encode()

        async def check_token(request: Request) -> Response:
            authorization = request.headers.get("authorization", "")
            given = authorization[7:] if authorization.lower().startswith("bearer ") else request.query.get("token", "")
            if not hmac.compare_digest(given.encode(), expected):
                return text_response(401, "diagnostics need DIAG_TOKEN", (("WWW-Authenticate", "Bearer"),))
            return await handler(request)

        return check_token

    async def on_webhook(self, request: Request) -> Response:
        started = time.perf_counter()
        given = request.headers.get("x-telegram-bot-api-secret-token", "").encode()
        if not hmac.compare_digest(given, self._webhook_secret):
            return text_response(401, "wrong secret token")
        update = parse_update(request.body)
        if self.stopping:
            return text_response(503, "shutting down", (("Retry-After", "5"),))
        status = await self.pipeline.ingest(update, request.body)
        self.ack_seconds.observe(time.perf_counter() - started)
        if status == 200:
            return Response(200, OK_BODY, "application/json")
        return text_response(503, "busy, retry later", (("Retry-After", "5"),))

    async def on_kie_callback(self, request: Request) -> Response:
        """Kie's completion callback: the URL token always, the HMAC signature when configured."""
        token = request.query.get("token", "").encode()
        if not hmac.compare_digest(token, self.config.kie_callback_token.encode()):
            return text_response(401, "wrong callback token")
        try:
            body = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            raise HttpError(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "callback must be a JSON object")
        data = body.get("data") if isinstance(body.get("data"), dict) else {}
        task_id = str(body.get("taskId") or data.get("taskId") or data.get("task_id") or "")
        if not task_id:
            raise HttpError(400, "no taskId in the callback")
        if self.config.kie_hmac_key and not kie_signature_valid(
                self.config.kie_hmac_key, task_id, request.headers.get("x-webhook-timestamp", ""),
                request.headers.get("x-webhook-signature", "")):
            return text_response(403, "bad webhook signature")
        # A passive instance knows no jobs; the active one's poller finds the result.
        self.generations.on_callback(task_id, data)
        return json_response({"code": 200, "msg": "success"})

    async def on_health(self, request: Request) -> Response:
        workers_dead = not self.pipeline.workers_alive
        status = "stopping" if self.stopping else "ok" if self.db.ok else "degraded"
        payload = {
            "status": status,
            "uptime": int(time.monotonic() - self.started_at),
            "active": self.active,
            "webhook_mode": self.config.bot_mode == "webhook",
            "lock_acquired": self.lease.held,
            "db_schema_ready": self.db.ok,
            "queue": self.pipeline.snapshot(),
            "jobs_in_flight": len(self.generations.jobs),
            "version": __version__,
        }
        if not self.db.ok:
            payload["database_error"] = mask_secrets(self.db.last_error, self.config.secrets)
        return json_response(payload, 503 if self.stopping or workers_dead else 200)

    async def on_diag_webhook(self, request: Request) -> Response:
        now = time.monotonic()
        if self._webhook_info is None or now - self._webhook_info[0] > DIAG_CACHE_S:
            try:
                info = await self.telegram.call("getWebhookInfo") or {}
            except TelegramError as error:
                return json_response({"error": mask_secrets(str(error), self.config.secrets)}, 502)
            self._webhook_info = (now, info)
        info = self._webhook_info[1]
        return json_response({
            "url": mask_secrets(mask_webhook_url(info.get("url") or ""), self.config.secrets),
            "pending_update_count": info.get("pending_update_count", 0),
            "last_error_message": info.get("last_error_message") or "",
            "last_error_date": info.get("last_error_date"),
            "max_connections": info.get("max_connections"),
        })

    async def on_diag_lock(self, request: Request) -> Response:
        lease = self.lease
        return json_response({
            "active": self.active,
            "should_process": self.pipeline.should_process,
            "lock_acquired": lease.held,
            "last_check": iso_utc(lease.last_check),
            "instance_id": lease.owner,
            "owner": lease.holder or None,
            "expires_at": iso_utc(lease.expires_at),
            "ttl_s": lease.ttl,
            "database_ok": self.db.ok,
        })

    async def on_metrics(self, request: Request) -> Response:
        return Response(200, exposition(self.metric_families()), "text/plain; version=0.0.4; charset=utf-8")

    def metric_families(self) -> list[tuple[str, str, str, list[Sample]]]:
        stats = dataclasses.asdict(self.pipeline.stats)
        families: list[tuple[str, str, str, list[Sample]]] = [
            (f"trt_updates_{name}_total", "counter", help_text, [("", {}, stats[name])])
            for name, help_text in UPDATE_COUNTERS
        ]
        families += [
            ("trt_telegram_calls_total", "counter", "Bot API calls by method and outcome (ok or error code).",
             [("", {"method": m, "outcome": o}, n) for (m, o), n in sorted(self.telegram.calls.items())]),
            ("trt_kie_calls_total", "counter", "Kie.ai calls by endpoint and outcome (ok or error kind).",
             [("", {"endpoint": e, "outcome": o}, n) for (e, o), n in sorted(self.kie.calls.items())]),
            ("trt_jobs_created_total", "counter", "Generation jobs created.", [("", {}, self.generations.created)]),
            ("trt_jobs_finished_total", "counter", "Generation jobs finished, by outcome.",
             [("", {"outcome": o}, self.generations.finished[o]) for o in ("success", "failed", "timed_out")]),
            ("trt_queue_depth", "gauge", "Updates in memory waiting for a worker.",
             [("", {}, self.pipeline.queue_depth)]),
            ("trt_inbox_backlog", "gauge", "Unhandled updates in the SQLite inbox.", [("", {}, self.pipeline.backlog)]),
            ("trt_workers_busy", "gauge", "Workers handling an update now.", [("", {}, self.pipeline.workers_active)]),
            ("trt_jobs_in_flight", "gauge", "Generation jobs not yet delivered.", [("", {}, len(self.generations.jobs))]),
            ("trt_active", "gauge", "1 if this instance processes updates, 0 if passive.", [("", {}, self.active)]),
            ("trt_database_ok", "gauge", "1 if SQLite is usable, 0 in degraded mode.", [("", {}, self.db.ok)]),
            ("trt_open_connections", "gauge", "Open HTTP connections.", [("", {}, self.server.open_connections)]),
            ("trt_uptime_seconds", "gauge", "Seconds since start.", [("", {}, time.monotonic() - self.started_at)]),
            ("trt_webhook_ack_seconds", "histogram", "Webhook request handling time up to the acknowledgement.",
             self.ack_seconds.samples()),
            ("trt_update_handling_seconds", "histogram", "Time a handler took per update.",
             self.handling_seconds.samples()),
            ("trt_generation_seconds", "histogram", "Time from job creation to its outcome.",
             self.generation_seconds.samples()),
        ]
        return families

    async def on_root(self, request: Request) -> Response:
        return text_response(200, f"trt_bot {__version__}")


CHECK_TIMEOUT = httpx.Timeout(10.0, connect=5.0)


async def run_check(config: Config, out: Callable[[str], None] = print) -> int:
    """``python trt_bot.py check``: the configuration, the database, Telegram and Kie.ai.

    Prints one line per check, problems with what to do; returns the exit
    code: 0 when all is well, 1 when something needs fixing.
    """
    problems = 0

    def report(status: str, subject: str, detail: str) -> None:
        nonlocal problems
        problems += status == "FAIL"
        out(mask_secrets(f"[{status:>4}] {subject}: {detail}", config.secrets))

    where = mask_webhook_url(config.webhook_url) if config.bot_mode == "webhook" else "getUpdates long polling"
    report("ok", "configuration", f"{config.bot_mode} mode ({where}), database {config.database_path}, "
                                  f"{'z-image only' if config.single_model_only else f'{len(CATALOG)} models'}")
    try:
        await asyncio.to_thread(lambda: open_sqlite(config.database_path).close())
        report("ok", "database", f"opened, schema v{SCHEMA_VERSION}")
    except (sqlite3.Error, OSError, TrtError) as error:
        report("FAIL", "database", f"cannot open {config.database_path} ({error}): check DATABASE_URL and that "
                                   "its folder exists and is writable (a mounted disk on Render)")
    async with httpx.AsyncClient(timeout=CHECK_TIMEOUT) as http:
        telegram = TelegramClient(config.telegram_token, config.telegram_api_base, http, RetryPolicy(budget_s=0))
        try:
            me = await telegram.call("getMe") or {}
            report("ok", "Telegram", f"token accepted: @{me.get('username')} (id {me.get('id')})")
            await _check_webhook(config, telegram, report)
        except TelegramError as error:
            if error.error_code in (401, 404):
                report("FAIL", "Telegram", f"the bot token was rejected ({error.error_code} {error.description}): "
                                           "copy TELEGRAM_BOT_TOKEN again from @BotFather (/token)")
            else:
                report("FAIL", "Telegram", f"{config.telegram_api_base} did not answer getMe ({error.description}): "
                                           "check the network or TELEGRAM_API_BASE")
        await _check_kie(config, KieClient(config.kie_api_key, config.kie_api_base, http, budget_s=0), report)
    out("all good" if not problems else f"{problems} problem(s) to fix")
    return 1 if problems else 0


async def _check_webhook(config: Config, telegram: TelegramClient, report: Callable[[str, str, str], None]) -> None:
    info = await telegram.call("getWebhookInfo") or {}
    url = mask_webhook_url(info.get("url") or "") or "none"
    pending, error = info.get("pending_update_count") or 0, info.get("last_error_message") or ""
    status = "ok" if not error else "warn"
    detail = f"{url}, {pending} pending" + (f", last error: {error}" if error else "")
    if config.bot_mode == "webhook" and info.get("url") != config.webhook_url:
        status, detail = "warn", detail + "; the bot will register its own URL when it starts"
    elif config.bot_mode == "polling" and info.get("url"):
        status, detail = "warn", detail + "; polling mode deletes this webhook when it starts"
    report(status, "webhook", detail)


async def _check_kie(config: Config, kie: KieClient, report: Callable[[str, str, str], None]) -> None:
    if not kie.configured:
        report("warn", "Kie.ai", "KIE_API_KEY is not set: the bot runs, generation answers 'not configured'")
        return
    try:
        credits = await kie.credits()
    except KieError as error:
        fixes = {
            401: "the key was rejected: copy KIE_API_KEY again from your Kie.ai dashboard",
            402: "the account has no credits: top them up in your Kie.ai dashboard",
            0: f"{config.kie_api_base} did not answer: check the network or KIE_API_BASE",
        }
        report("FAIL", "Kie.ai", f"{error}: {fixes.get(error.code, 'Kie.ai is failing; try again later')}")
        return
    report("ok" if credits > 0 else "FAIL", "Kie.ai", f"key accepted, {credits:g} credits"
           + ("" if credits > 0 else ": top them up in your Kie.ai dashboard"))


async def serve(config: Config) -> int:
    """Run the bot until SIGTERM or SIGINT, then shut down gracefully."""
    app = App(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await app.start()
    await stop.wait()
    await app.stop()
    return 0


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["check"]):
        print("usage: python trt_bot.py [check]", file=sys.stderr)
        return 2
    try:
        config = load_config(os.environ)
    except ConfigError as error:
        print(f"trt_bot: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(config)
    with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
        return runner.run(run_check(config) if args == ["check"] else serve(config))


if __name__ == "__main__":
    sys.exit(main())
