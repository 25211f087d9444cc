"""A small asyncio webhook client for what wrk cannot do: timed probes and multi-step dialogs.

* ``probe_start_latency`` posts /start updates from fresh chats at a fixed,
  low rate and notes the moment each was written (``time.monotonic()``); the
  fake Bot API notes when that chat's sendMessage arrives.  The difference is
  the reply latency a user sees, queueing and the Bot API call included.
* ``start_generations`` walks users through the generation dialog
  (button ``new`` -> prompt text -> button ``ratio:1:1``) so that the bot
  starts one Kie task per user.

Requests go over a few keep-alive connections; the load they add is tiny
next to wrk's, and they run in the orchestrator's process on the tools CPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Iterable

from harness import FakeClient, percentile


def start_update(update_id: int, chat_id: int) -> dict:
    user = {"id": chat_id, "is_bot": False, "first_name": "Probe", "language_code": "en"}
    return {"update_id": update_id, "message": {
        "message_id": update_id % 1_000_000 + 1, "from": user, "chat": {"id": chat_id, "first_name": "Probe", "type": "private"},
        "date": int(time.time()), "text": "/start", "entities": [{"offset": 0, "length": 6, "type": "bot_command"}]}}


def text_update(update_id: int, chat_id: int, text: str) -> dict:
    update = start_update(update_id, chat_id)
    update["message"]["text"] = text
    del update["message"]["entities"]
    return update


def callback_update(update_id: int, chat_id: int, data: str) -> dict:
    user = {"id": chat_id, "is_bot": False, "first_name": "Probe", "language_code": "en"}
    message = {"message_id": 1, "date": int(time.time()), "chat": {"id": chat_id, "type": "private"}, "text": "menu"}
    return {"update_id": update_id, "callback_query": {
        "id": f"cb{update_id}", "from": user, "message": message, "chat_instance": "bench", "data": data}}


class WebhookClient:
    """Posts updates to one webhook over ``connections`` keep-alive connections."""

    def __init__(self, port: int, path: str, secret: str, connections: int = 8):
        self.port, self.path, self.secret = port, path, secret
        self.size = connections
        self._idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self.statuses: dict[int, int] = {}

    async def __aenter__(self) -> "WebhookClient":
        for _ in range(self.size):
            self._idle.put_nowait(await asyncio.open_connection("127.0.0.1", self.port))
        return self

    async def __aexit__(self, *exc: object) -> None:
        while not self._idle.empty():
            _, writer = self._idle.get_nowait()
            writer.close()

    async def post(self, update: dict) -> tuple[int, float]:
        """(HTTP status, monotonic time the request was written)."""
        body = json.dumps(update, separators=(",", ":")).encode()
        head = (f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"X-Telegram-Bot-Api-Secret-Token: {self.secret}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        reader, writer = await self._idle.get()
        try:
            sent_at = time.monotonic()
            writer.write(head + body)
            status = await _read_response(reader)
        except BaseException:
            writer.close()
            self._idle.put_nowait(await asyncio.open_connection("127.0.0.1", self.port))
            raise
        self._idle.put_nowait((reader, writer))
        self.statuses[status] = self.statuses.get(status, 0) + 1
        return status, sent_at


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


@dataclasses.dataclass
class LatencyResult:
    sent: int
    answered: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    bad_status: int


async def _post_paced(client: WebhookClient, updates: list[tuple[int, dict]], rate: float) -> dict[int, float]:
    sent_at: dict[int, float] = {}
    start = time.monotonic()

    async def one(index: int, chat_id: int, update: dict) -> None:
        await asyncio.sleep(max(0.0, start + index / rate - time.monotonic()))
        status, at = await client.post(update)
        if status == 200:
            sent_at[chat_id] = at

    await asyncio.gather(*(one(i, chat, u) for i, (chat, u) in enumerate(updates)))
    return sent_at


def probe_start_latency(port: int, path: str, secret: str, fake: FakeClient, *, rate: float, seconds: float,
                        chat_base: int, update_base: int, settle_s: float = 10.0) -> LatencyResult:
    """Post ``rate * seconds`` /start updates from new chats and time each reply at the fake."""
    count = max(1, int(rate * seconds))
    updates = [(chat_base + i, start_update(update_base + i, chat_base + i)) for i in range(count)]

    async def run() -> tuple[dict[int, float], int]:
        async with WebhookClient(port, path, secret, connections=4) as client:
            sent = await _post_paced(client, updates, rate)
            return sent, sum(n for s, n in client.statuses.items() if s != 200)

    sent_at, bad = asyncio.run(run())
    deadline = time.monotonic() + settle_s
    seen: dict[int, float] = {}
    while time.monotonic() < deadline:
        seen = fake.seen(chat_base, chat_base + count)
        if len(seen) >= len(sent_at):
            break
        time.sleep(0.05)
    latencies = [(seen[c] - t) * 1000 for c, t in sent_at.items() if c in seen]
    return LatencyResult(
        sent=len(sent_at), answered=len(latencies), bad_status=bad,
        p50_ms=percentile(latencies, 50), p99_ms=percentile(latencies, 99),
        max_ms=max(latencies) if latencies else float("nan"),
    )


def start_generations(port: int, path: str, secret: str, users: Iterable[int], update_base: int,
                      concurrency: int = 25, step_pause_s: float = 0.05) -> dict[int, int]:
    """Each user presses "new", sends a prompt, presses "ratio:1:1"; returns HTTP status counts."""

    async def run() -> dict[int, int]:
        async with WebhookClient(port, path, secret, connections=concurrency) as client:
            next_id = iter(range(update_base, update_base + 10_000_000))
            limit = asyncio.Semaphore(concurrency)

            async def dialog(user: int) -> None:
                async with limit:
                    for update in (callback_update(next(next_id), user, "new"),
                                   text_update(next(next_id), user, f"a lighthouse in a storm, bench prompt {user}"),
                                   callback_update(next(next_id), user, "ratio:1:1")):
                        await client.post(update)
                        await asyncio.sleep(step_pause_s)  # a person pauses; also lets the bot keep order

            await asyncio.gather(*(dialog(u) for u in users))
            return dict(client.statuses)

    return asyncio.run(run())
