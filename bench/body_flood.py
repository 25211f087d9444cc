"""Memory of trt_bot under a flood of stalled request bodies.

``python bench/body_flood.py [--connections 300] [--body-bytes 1048576]``

For each scenario a fresh ``trt_bot.py`` process starts (polling mode, the Bot
API unreachable, so it only serves HTTP).  Each of the connections sends the
head of a ``POST`` to the webhook path with ``Content-Length: <body-bytes>``,
then all of the body but its last byte, and stalls: the request never
completes.  Scenarios: a wrong secret, no secret, and the right secret.  The
script prints the bot's resident memory (``VmRSS`` from ``/proc/<pid>/status``)
before the flood and once the bot has taken all it will take, its peak
(``VmHWM``), and how the connections were answered.

Standard library only (plus trt_bot itself, to derive the webhook path).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import trt_bot  # noqa: E402  (after the path is set)

TOKEN = "123456789:AAHbenchTOKENsecretPART_abcdefghijklmn"
SETTLE_S = 3.0  # how long a client keeps pushing its body before the figures are read


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


class Bot:
    """trt_bot.py as a subprocess that serves HTTP only."""

    def __init__(self, workdir: str):
        self.port = free_port()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "KIE_", "WEBHOOK_"))},
            "TELEGRAM_BOT_TOKEN": TOKEN,
            "BOT_MODE": "polling",
            "TELEGRAM_API_BASE": f"http://127.0.0.1:{free_port()}",  # nothing listens there
            "DATABASE_URL": f"sqlite:///{workdir}/bot-{self.port}.sqlite3",
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "LOG_LEVEL": "CRITICAL",
        }
        self.config = trt_bot.load_config(self.env)
        self.process = subprocess.Popen([sys.executable, str(REPO / "trt_bot.py")], env=self.env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.write(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
            if answer.startswith(b"HTTP/1.1 200"):
                return
            await asyncio.sleep(0.05)
        raise SystemExit(f"trt_bot did not answer /health on port {self.port} within {timeout}s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def stalled_post(port: int, head: bytes, body: bytes, outcome: collections.Counter) -> None:
    """Send a head and all but the last byte of its body, then keep the connection open."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as error:
        outcome[f"connect failed ({type(error).__name__})"] += 1
        return
    try:
        writer.write(head)
        writer.write(body)
        answer = await asyncio.wait_for(reader.read(64), SETTLE_S)
        outcome[answer.split(b"\r\n", 1)[0].decode(errors="replace") or "closed without an answer"] += 1
    except asyncio.TimeoutError:
        outcome["no answer yet (body being read or waiting)"] += 1
    except OSError as error:
        outcome[f"reset ({type(error).__name__})"] += 1
    finally:
        writer.transport.abort()


async def scenario(name: str, secret: str | None, connections: int, body_bytes: int, workdir: str) -> None:
    bot = Bot(workdir)
    try:
        await bot.wait_listening()
        before = memory_kib(bot.process.pid)
        secret_line = f"X-Telegram-Bot-Api-Secret-Token: {secret}\r\n" if secret is not None else ""
        head = (f"POST {bot.config.webhook_path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                f"{secret_line}Content-Length: {body_bytes}\r\n\r\n").encode()
        body = b"x" * (body_bytes - 1)
        outcome: collections.Counter = collections.Counter()
        flood = asyncio.gather(*(stalled_post(bot.port, head, body, outcome) for _ in range(connections)))
        await asyncio.sleep(SETTLE_S - 0.5)
        during = memory_kib(bot.process.pid)
        await flood
        after = memory_kib(bot.process.pid)
    finally:
        bot.stop()
    print(f"{name}: {connections} connections x {body_bytes} B bodies, stalled")
    print(f"  VmRSS before {before['VmRSS'] / 1024:.0f} MiB, during {during['VmRSS'] / 1024:.0f} MiB, "
          f"peak (VmHWM) {after['VmHWM'] / 1024:.0f} MiB")
    for answer, count in outcome.most_common():
        print(f"  {count:4d} x {answer}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--body-bytes", type=int, default=1024 * 1024)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="body-flood-") as workdir:
        right = trt_bot.load_config({"TELEGRAM_BOT_TOKEN": TOKEN}).webhook_secret
        for name, secret in (("wrong secret", "wrong"), ("no secret", None), ("right secret", right)):
            await scenario(name, secret, args.connections, args.body_bytes, workdir)


if __name__ == "__main__":
    asyncio.run(main())
