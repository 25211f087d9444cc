"""Peer 1: aiogram 3 in webhook mode, answering /start with one sendMessage.

The set-up the aiogram documentation shows for webhooks: an aiohttp
application, ``SimpleRequestHandler(handle_in_background=True)`` on the webhook
path with the secret token, ``setup_application``, and ``set_webhook`` on
start-up; the Bot talks to the fake through
``AiohttpSession(api=TelegramAPIServer.from_base(...))``.  One extra route,
``GET /health``, answers 200 so start-up can be timed like trt_bot's.
"""

from __future__ import annotations

from aiohttp import web
from aiogram import Bot, Dispatcher
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.filters import CommandStart
from aiogram.types import InlineKeyboardButton, InlineKeyboardMarkup, Message
from aiogram.webhook.aiohttp_server import SimpleRequestHandler, setup_application

from common import ALLOWED_UPDATES, MENU, START_TEXT, prepare_runtime, settings

KEYBOARD = InlineKeyboardMarkup(
    inline_keyboard=[[InlineKeyboardButton(text=text, callback_data=data) for text, data in row] for row in MENU]
)


def build_app() -> tuple[web.Application, str, int]:
    config = settings()
    session = AiohttpSession(api=TelegramAPIServer.from_base(config.api_base))
    bot = Bot(config.token, session=session, default=DefaultBotProperties(parse_mode="HTML"))
    dispatcher = Dispatcher()

    @dispatcher.message(CommandStart())
    async def on_start(message: Message) -> None:
        await message.answer(START_TEXT, reply_markup=KEYBOARD)

    async def on_startup(bot: Bot) -> None:
        await bot.set_webhook(config.webhook_url, secret_token=config.webhook_secret, allowed_updates=ALLOWED_UPDATES)

    dispatcher.startup.register(on_startup)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    handler = SimpleRequestHandler(dispatcher=dispatcher, bot=bot, handle_in_background=True,
                                   secret_token=config.webhook_secret)
    handler.register(app, path=config.webhook_path)
    app.router.add_get("/health", health)
    setup_application(app, dispatcher, bot=bot)
    return app, config.host, config.port


def main() -> None:
    prepare_runtime()
    app, host, port = build_app()
    web.run_app(app, host=host, port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
