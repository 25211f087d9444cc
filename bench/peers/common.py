"""What every peer bot shares: its settings from the environment and the reply to /start.

The reply is trt_bot's own English /start text with the same two-button inline
keyboard and HTML parse mode, so every bot sends the same bytes to the fake
Bot API.  Settings use trt_bot's variable names where one exists.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

START_TEXT = (
    "👋 <b>Hi!</b> I draw pictures from a description.\n\n"
    "Tap “🖼 Create a picture”, describe what you want to see, pick a format, "
    "and in half a minute you get the image."
)
MENU = [[("🖼 Create a picture", "new")], [("ℹ️ Help", "help")]]  # (text, callback_data) rows
ALLOWED_UPDATES = ["message", "callback_query"]


@dataclass(frozen=True)
class PeerSettings:
    token: str
    api_base: str
    host: str
    port: int
    webhook_path: str  # "/webhook/<hex>", the same path trt_bot serves
    webhook_secret: str
    webhook_url: str


def settings() -> PeerSettings:
    env = os.environ
    path = env["BENCH_WEBHOOK_PATH"]
    return PeerSettings(
        token=env["TELEGRAM_BOT_TOKEN"],
        api_base=env["TELEGRAM_API_BASE"].rstrip("/"),
        host=env.get("HOST", "127.0.0.1"),
        port=int(env["PORT"]),
        webhook_path=path,
        webhook_secret=env["BENCH_WEBHOOK_SECRET"],
        webhook_url=env.get("WEBHOOK_BASE_URL", "https://bench.example.com").rstrip("/") + path,
    )


def prepare_runtime() -> None:
    """WARNING-level logs (aiogram logs every update at INFO) and, unless
    BENCH_UVLOOP=0, uvloop: the event loop trt_bot runs on, so the comparison
    is between frameworks rather than loops."""
    logging.basicConfig(level=logging.WARNING)
    if os.environ.get("BENCH_UVLOOP", "1") != "0":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
