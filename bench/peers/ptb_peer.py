"""Peer 2: python-telegram-bot 22 in webhook mode, answering /start with one sendMessage.

The set-up PTB documents for webhooks: ``Application.builder().token(...)
.base_url(...)`` pointed at the fake, a ``CommandHandler("start", ...)``, and
``run_webhook`` (PTB's own tornado server, which calls getMe and setWebhook
first).  Everything else is PTB's default, including ``concurrent_updates``
(off: one update handled at a time); ``BENCH_PTB_CONCURRENT=N`` raises it.
``BENCH_PTB_RATE_LIMITER=N`` adds PTB's ``AIORateLimiter`` (the
``rate-limiter`` extra) at its defaults, Telegram's 30/s overall and 20/min per
group, retrying a 429 up to N times (its default, 0, never retries).
``run_webhook`` serves only the webhook path, so start-up is timed to its
first HTTP answer (a 405 to GET on that path).
"""

from __future__ import annotations

import os

from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.constants import ParseMode
from telegram.ext import AIORateLimiter, Application, CommandHandler, ContextTypes

from common import ALLOWED_UPDATES, MENU, START_TEXT, prepare_runtime, settings

KEYBOARD = InlineKeyboardMarkup([[InlineKeyboardButton(text, callback_data=data) for text, data in row] for row in MENU])


async def on_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await update.effective_message.reply_text(START_TEXT, parse_mode=ParseMode.HTML, reply_markup=KEYBOARD)


def main() -> None:
    prepare_runtime()
    config = settings()
    builder = Application.builder().token(config.token).base_url(config.api_base + "/bot")
    concurrent = int(os.environ.get("BENCH_PTB_CONCURRENT", "0"))
    if concurrent > 0:
        builder = builder.concurrent_updates(concurrent)
    retries = os.environ.get("BENCH_PTB_RATE_LIMITER", "")
    if retries:
        builder = builder.rate_limiter(AIORateLimiter(max_retries=int(retries)))
    application = builder.build()
    application.add_handler(CommandHandler("start", on_start))
    application.run_webhook(
        listen=config.host,
        port=config.port,
        url_path=config.webhook_path.lstrip("/"),
        webhook_url=config.webhook_url,
        secret_token=config.webhook_secret,
        allowed_updates=ALLOWED_UPDATES,
    )


if __name__ == "__main__":
    main()
