"""trt_bot: a Telegram bot that turns a text prompt into an image through Kie.ai.

Quick edits: each is one place, in section 0 unless said; run ``pytest -m "not slow" -n 2`` after.
   change a text     TEXTS: Russian and English side by side; then accept the copy
                     (ACCEPT_TEXTS=1 pytest -q -k the_copy_is_the_accepted_copy)
   add a model       CATALOG: one ImageModel row, its Kie inputs and credit cost as data
   add a command     COMMAND_MENUS for Telegram's "/" menu; what it does: Conversation.commands (section 11)
   change a limit    SETTINGS (section 1): one row per environment variable, as README's table

One file, read top-down: what a forker changes, then the engine in the order data flows through
it; sections 5, 9, 12 and 13 open with a theory of operation.  Grep for a banner (``#####``):

   0. What a forker changes  TEXTS, CATALOG, COMMAND_MENUS, the result buttons
   1. Configuration        SETTINGS: environment variables -> a frozen Config
   2. Logging              the log format; every secret masked in every record
   3. HTTP parsing         bytes -> Request, a pure state machine (no sockets)
   4. HTTP server          asyncio.start_server, a deadline per connection phase, bounds
   5. Storage              one thread, two dialects (SQLite, PostgreSQL): schema, group commit, inbox, dialogs
   6. Retry and pacing     one retry policy for every retried call; rate limiters
   7. Telegram client      raw Bot API over httpx, typed errors, every sending method paced at Telegram's limits
   8. Kie client           createTask / recordInfo / credits / uploads, KIE_CODES, result URLs
   9. Update pipeline      durable ack, one state per update, ordered workers, watchdog
  10. Texts and keyboards  rendering section 0's tables: plural forms, menus and buttons
  11. Dialog               what a user's update means
  12. Generation jobs      a pure job state machine and the drivers of its effects
  13. Outbox               the one sender: durable messages in order per chat, signs of life, paced
  14. Application          lease and role, set-up and polling, routes, diagnostics, main()

Run it with ``python trt_bot.py`` (see README.md for the environment).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import collections
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import enum
import functools
import gc
import hashlib
import heapq
import hmac
import html
import importlib
import importlib.util
import ipaddress
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
import ssl
import sys
import time
import urllib.parse
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Iterable, Iterator, Mapping, NamedTuple

import certifi
import httpx

__version__ = "1.0.0"

log = logging.getLogger("trt_bot")


###############################################################################
# 0. What a forker changes
#    The copy (TEXTS, in Russian and English), the model catalog (CATALOG: one
#    row a model, its Kie inputs as data), the command menus (COMMAND_MENUS)
#    and the buttons under a result (RESULT_BUTTONS, FAILURE_BUTTONS).  The
#    engine below reads these tables; nothing else needs editing for the
#    common changes.  Limits are environment variables, each one a row of
#    SETTINGS (section 1) and of README's table; the ones most changed:
#      GEN_HOURLY_LIMIT  pictures per user per hour     GEN_DAILY_LIMIT  per day, the whole bot
#      SINGLE_MODEL_ONLY Z-Image alone, or the catalog  ADMIN_IDS        who sees /stats and alerts
#      GEN_TIMEOUT_S     when a picture is given up     KIE_CREDITS_LOW  when the owner is warned
###############################################################################

TEXTS: dict[str, dict[str, str]] = {
    "ru": {
        "start": "👋 <b>Привет!</b> Я рисую картинки по описанию.\n\n"
                 "Напишите, что хотите увидеть, и выберите формат — картинка придёт сюда же, в чат. "
                 "Формат и модель по умолчанию — в /settings.",
        "help": "ℹ️ <b>Как пользоваться</b>\n"
                "1. Опишите картинку одним сообщением.\n"
                "2. Выберите формат — картинка придёт в этот чат. "
                "Формат, выбранный в /settings, не спрашивается: картинка рисуется сразу.\n\n"
                "Пока формат не выбран, описание можно поправить: пришлите новое или отредактируйте своё.\n\n"
                "/start — меню, /settings — настройки, /cancel — отменить, /language — язык, /help — эта справка.",
        "cancelled": "Отменено. Меню — ниже.",
        "hint": "Чтобы нарисовать картинку, напишите, что нарисовать.",
        "settings": "⚙️ <b>Настройки</b>\nМодель: {model}\nФормат: {ratio}{option}\n\n"
                    "С выбранным форматом любое описание рисуется сразу, без вопросов.",
        "settings_option": "\n{title}: {value}",
        "settings_ask": "спрашивать каждый раз",
        "btn_ask_every_time": "❓ Спрашивать каждый раз",
        "stale_button": "Эта кнопка больше не действует.",
        "not_your_picture": "Это картинка {name}: кнопки под ней — для {name}. Своя — /draw и описание.",
        "ask_prompt": "🎨 Модель: <b>{model}</b>\n\n✍️ Опишите картинку одним сообщением ({limits}).\n"
                      "Например: <i>кот-космонавт, акварель</i>",
        "prompt_empty": "Описание пустое. Напишите словами, что нарисовать.",
        "prompt_too_long": "Слишком длинное описание: {length:символ|символа|символов}, а {model} принимает "
                           "не больше {most:символа|символов|символов}. Сократите и пришлите снова.",
        "prompt_not_text": "Пришлите описание текстом: словами, что нарисовать.",
        "prompt_nul": "В описании есть невидимый символ U+0000, его не сохранить. Пришлите описание без него.",
        "ask_ratio": "Выберите формат для «{prompt}»:",
        "ask_option": "Выберите {option}:",
        "busy_user": "⏳ Предыдущая картинка ещё рисуется. Дождитесь её — и можно следующую.",
        "hourly_limit": "Можно не больше {limit:картинки|картинок|картинок} в час. Следующую — через {minutes:минуту|минуты|минут}.",
        "not_configured": "🛠 Рисовать пока не получится: бот ещё не до конца настроен. Загляните попозже.",
        "fail_moderation": "🚫 Запрос отклонён модерацией. Попробуйте описать иначе.",
        "fail_busy": "😮‍💨 Сервис сейчас перегружен. Попробуйте ещё раз через минуту.",
        "fail_timeout": "⌛ Генерация заняла слишком много времени и была остановлена.",
        "fail_unavailable": "🛠 Генерация временно недоступна. Мы уже разбираемся.",
        "fail_invalid": "Сервис не принял запрос. Измените описание или выберите другой формат.",
        "fail_invalid_prompt": "✏️ Сервис не принял описание. Перепишите его — короче или другими словами.",
        "fail_invalid_ratio": "📐 Сервис не принял этот формат для этой модели. Выберите другой.",
        "fail_invalid_image": "🖼 Сервис не принял фото. Пришлите другое: JPEG, PNG или WebP.",
        "fail_failed": "😔 Не получилось нарисовать картинку.",
        "fail_delivery": "Картинка готова, но отправить её не удалось.",
        "maybe_sent": "🖼 Картинка готова. Если её нет выше — нажмите кнопку, и я пришлю её ещё раз.",
        "fail_stalled": "⌛ Сервис не выдал картинку за 10 минут и прекратил попытку. Попробуйте ещё раз.",
        "status": "⏳ {details} · {elapsed}",
        "left_this_hour": "Осталось {left} из {limit} на этот час.",
        "cancelled_job": "✖️ Отменено: эту картинку я не пришлю, и в часовой лимит она не засчитана.",
        "cancel_too_late": "Картинка уже готова и отправляется — отменить её нельзя.",
        "nothing_to_cancel": "Отменять нечего. Меню — ниже.",
        "ask_model": "Какой моделью нарисовать «{prompt}»?\n\n{models}",
        "original_failed": "Исходный файл сейчас недоступен. Попробуйте позже.",
        "btn_create": "🖼 Создать картинку",
        "btn_help": "ℹ️ Помощь",
        "btn_settings": "⚙️ Настройки",
        "btn_cancel": "✖️ Отмена",
        "btn_again": "🔁 Ещё вариант",
        "btn_new": "🖼 Новая картинка",
        "btn_retry": "🔁 Попробовать снова",
        "btn_resend": "📥 Прислать картинку",
        "btn_ratio": "📐 Другой формат",
        "btn_model": "🎨 Другая модель",
        "btn_edit": "✏️ Изменить описание",
        "btn_file": "📎 Исходный файл",
        "btn_retouch": "🪄 Изменить фото",
        "ask_edit": "🪄 Что изменить на фото? Напишите одним сообщением.\nНапример: <i>сделай в стиле аниме</i>",
        "photo_too_large": "Это фото больше 20 МБ — столько я скачать не могу. Пришлите его поменьше.",
        "photo_not_image": "📎 Такой файл я не открываю. Пришлите фото (JPEG, PNG, WebP) — я его изменю.",
        "album_one_photo": "Я меняю по одному фото: взял первое из альбома.",
        "admin_alert": "⚠️ Kie.ai: {reason}. Пользователи видят «временно недоступно», пока это не исправлено.",
        "incident_key_rejected": "ключ API отклонён (401)",
        "incident_no_credits": "на аккаунте закончились кредиты (402)",
        "admin_credits_low": "⚠️ Kie.ai: осталось {credits} кредитов (меньше KIE_CREDITS_LOW = {low}). "
                             "Пополните баланс, пока Kie не начал отказывать (402).",
        "daily_limit": "На сегодня картинки закончились: бот рисует не больше {limit:картинки|картинок|картинок} "
                       "в день. Приходите завтра!",
        "stats": "📊 <b>Статистика</b>\n"
                 "Пользователей: {users} (заблокировали бота: {blocked})\n"
                 "Картинок за сегодня: {jobs_today}\n"
                 "Рисуется сейчас: {in_flight}\n"
                 "Входящие сообщения: получено {received}, обработано {processed}, с ошибкой {errors}; "
                 "ждут обработки: {queue_depth} в памяти, {backlog} в базе\n"
                 "Кредиты Kie.ai: {credits}",
        "limits_up_to": "до {most:символа|символов|символов}",
        "limits_between": "от {fewest} до {most:символа|символов|символов}",
        "prompt_too_long_models": "Слишком длинное описание: {length:символ|символа|символов}, а {model} принимает "
                                  "не больше {most:символа|символов|символов}. Сократите его — или нарисуйте "
                                  "моделью, которая примет его целиком:",
        "prompt_too_short": "Слишком короткое описание: {model} нужно хотя бы {fewest:символ|символа|символов}. "
                            "Допишите подробнее.",
        "prompt_replaced": "✏️ Описание заменено. Выберите формат для «{prompt}»:",
        "prompt_replaced_option": "✏️ Описание заменено: «{prompt}». Выберите {option}:",
        "not_text_voice": "🎤 Голосовые я пока не слушаю. Напишите описание текстом.",
        "not_text_sticker": "Стикеры я не читаю 🙂 Опишите картинку словами.",
        "not_text_video": "🎬 Видео я не смотрю. Опишите картинку словами.",
        "not_text_file": "📎 Файлы я не открываю. Опишите картинку словами.",
        "unknown_command": "Такой команды нет. /start — меню, /help — справка, /language — язык.",
        "not_configured_admin": "🛠 Генерация не настроена: не задан ключ Kie.ai. "
                                "Укажите KIE_API_KEY в окружении бота и перезапустите его.",
        "choose_language": "🌐 Выберите язык:",
        "language_set": "Готово: теперь я говорю по-русски.",
        "outcome_success": "готово",
        "outcome_failed": "не удалось",
        "outcome_timed_out": "не успели",
        "outcome_in_flight": "в работе",
        "buy_offer": "⭐ Сверх бесплатных — за кредиты: картинка = кредит (некоторые модели дороже). У вас: {balance}.",
        "btn_pack": "⭐ {credits:кредит|кредита|кредитов} — {stars} ⭐",
        "buy_in_private": "Кредиты покупаются в личном чате с ботом: откройте его и отправьте /buy.",
        "invoice_description": "{credits:картинка|картинки|картинок} сверх бесплатных в час. Кредиты не сгорают.",
        "paid": "✅ Оплата получена: +{credits:кредит|кредита|кредитов}. Всего: {balance}.",
        "balance": "💎 У вас {balance:кредит|кредита|кредитов}.",
        "paysupport": "💬 <b>Вопросы об оплате</b>\nНапишите, что случилось, и номер платежа (он есть в чеке) "
                      "администратору бота. Кредиты за картинку, которая не пришла, возвращаются сами.",
        "pay_stale": "Это предложение устарело. Отправьте /buy, чтобы увидеть актуальные.",
        "pay_unavailable": "Оплата сейчас не принимается. Попробуйте через минуту.",
        "refunded": "↩️ Платёж возвращён, списано {removed:кредит|кредита|кредитов}. Осталось: {balance}.",
        "refund_unknown": "Такого платежа нет или он уже возвращён. Формат: /refund <номер платежа>",
        "refund_done": "Возврат выполнен: у пользователя {user} списано {removed:кредит|кредита|кредитов}.",
        "refund_failed": "Telegram не выполнил возврат: {reason}",
        "stats_stars": "\nЗвёзды: платежей {payments} на {stars} ⭐, возвратов {refunds}; кредитов продано {sold}, "
                       "потрачено {spent}, возвращено за неудачные картинки {returned}",
        "outcome_cancelled": "отменено",
    },
    "en": {
        "start": "👋 <b>Hi!</b> I draw pictures from a description.\n\n"
                 "Write what you’d like to see and pick a format: the picture will arrive right here in the "
                 "chat. The default format and model are in /settings.",
        "help": "ℹ️ <b>How to use</b>\n"
                "1. Describe the picture in one message.\n"
                "2. Pick a format, and the picture will arrive in this chat. "
                "With a format chosen in /settings there is no question: the picture is drawn at once.\n\n"
                "Until you pick a format you can still change the description: send a new one or edit yours.\n\n"
                "/start — menu, /settings — settings, /cancel — cancel, /language — language, /help — this help.",
        "cancelled": "Cancelled. The menu is below.",
        "hint": "To draw a picture, write what to draw.",
        "settings": "⚙️ <b>Settings</b>\nModel: {model}\nFormat: {ratio}{option}\n\n"
                    "With a format chosen, any description is drawn at once, without questions.",
        "settings_option": "\n{title}: {value}",
        "settings_ask": "ask every time",
        "btn_ask_every_time": "❓ Ask every time",
        "stale_button": "This button no longer works.",
        "not_your_picture": "This is {name}’s picture: its buttons are for {name}. Yours: /draw and a description.",
        "ask_prompt": "🎨 Model: <b>{model}</b>\n\n✍️ Describe the picture in one message ({limits}).\n"
                      "For example: <i>an astronaut cat, watercolour</i>",
        "prompt_empty": "The description is empty. Tell me in words what to draw.",
        "prompt_too_long": "That description is {length:character|characters} long, and {model} takes at most "
                           "{most}. Please shorten it and send it again.",
        "prompt_not_text": "Please send the description as text: tell me in words what to draw.",
        "prompt_nul": "The description holds an invisible U+0000 character that cannot be stored. Send it without.",
        "ask_ratio": "Pick a format for “{prompt}”:",
        "ask_option": "Pick the {option}:",
        "busy_user": "⏳ Your previous picture is still being drawn. Wait for it, then ask for the next one.",
        "hourly_limit": "You can make up to {limit:picture|pictures} an hour. Next one in {minutes:minute|minutes}.",
        "not_configured": "🛠 I can’t draw just yet: the bot isn’t fully set up. Please check back later.",
        "fail_moderation": "🚫 The request was rejected by moderation. Try describing it differently.",
        "fail_busy": "😮‍💨 The service is overloaded right now. Try again in a minute.",
        "fail_timeout": "⌛ Generation took too long and was stopped.",
        "fail_unavailable": "🛠 Generation is temporarily unavailable. We are on it.",
        "fail_invalid": "The service did not accept the request. Change the description or pick another format.",
        "fail_invalid_prompt": "✏️ The service did not accept the description. Rewrite it: shorter, or in other "
                               "words.",
        "fail_invalid_ratio": "📐 The service did not accept this format for this model. Pick another one.",
        "fail_invalid_image": "🖼 The service did not accept the photo. Send another one: JPEG, PNG or WebP.",
        "fail_failed": "😔 The picture could not be generated.",
        "fail_delivery": "The picture is ready but could not be sent.",
        "maybe_sent": "🖼 Your picture is ready. If it is not above, tap the button and I will send it again.",
        "fail_stalled": "⌛ The service produced no picture within 10 minutes and gave up. Please try again.",
        "status": "⏳ {details} · {elapsed}",
        "left_this_hour": "{left} of {limit} left this hour.",
        "cancelled_job": "✖️ Cancelled: this picture will not be sent, and it does not count towards your hourly "
                         "limit.",
        "cancel_too_late": "The picture is ready and on its way; it is too late to cancel it.",
        "nothing_to_cancel": "There is nothing to cancel. The menu is below.",
        "ask_model": "Which model should draw “{prompt}”?\n\n{models}",
        "original_failed": "The original file is not available right now. Please try later.",
        "btn_create": "🖼 Create a picture",
        "btn_help": "ℹ️ Help",
        "btn_settings": "⚙️ Settings",
        "btn_cancel": "✖️ Cancel",
        "btn_again": "🔁 Regenerate",
        "btn_new": "🖼 New picture",
        "btn_retry": "🔁 Try again",
        "btn_resend": "📥 Send the picture",
        "btn_ratio": "📐 Another ratio",
        "btn_model": "🎨 Another model",
        "btn_edit": "✏️ Change the prompt",
        "btn_file": "📎 Original file",
        "btn_retouch": "🪄 Edit",
        "ask_edit": "🪄 What should change in the photo? Tell me in one message.\n"
                    "For example: <i>make it anime style</i>",
        "photo_too_large": "That photo is over 20 MB, more than I can download. Please send a smaller one.",
        "photo_not_image": "📎 I don’t open files like that. Send a photo (JPEG, PNG, WebP) and I’ll edit it.",
        "album_one_photo": "I edit one photo at a time: I took the first one of the album.",
        "admin_alert": "⚠️ Kie.ai: {reason}. Users see “temporarily unavailable” until this is fixed.",
        "incident_key_rejected": "the API key was rejected (401)",
        "incident_no_credits": "the account is out of credits (402)",
        "admin_credits_low": "⚠️ Kie.ai: {credits} credits left (under KIE_CREDITS_LOW = {low}). "
                             "Top them up before Kie starts refusing pictures (402).",
        "daily_limit": "That's all the pictures for today: the bot draws up to {limit:picture|pictures} a day. "
                       "Come back tomorrow!",
        "stats": "📊 <b>Stats</b>\n"
                 "Users: {users} ({blocked} blocked the bot)\n"
                 "Pictures today: {jobs_today}\n"
                 "Being drawn now: {in_flight}\n"
                 "Incoming updates: {received} received, {processed} handled, {errors} failed; "
                 "waiting: {queue_depth} in memory, {backlog} in the database\n"
                 "Kie.ai credits: {credits}",
        "limits_up_to": "up to {most:character|characters}",
        "limits_between": "{fewest} to {most:character|characters}",
        "prompt_too_long_models": "That description is {length:character|characters} long, and {model} takes at "
                                  "most {most}. Shorten it, or draw it with a model that takes it whole:",
        "prompt_too_short": "That description is too short: {model} needs at least {fewest:character|characters}. "
                            "Please add a little more.",
        "prompt_replaced": "✏️ Description updated. Pick a format for “{prompt}”:",
        "prompt_replaced_option": "✏️ Description updated: “{prompt}”. Pick the {option}:",
        "not_text_voice": "🎤 I can’t listen to voice messages yet. Please type the description.",
        "not_text_sticker": "I can’t read stickers 🙂 Please describe the picture in words.",
        "not_text_video": "🎬 I can’t watch videos. Please describe the picture in words.",
        "not_text_file": "📎 I don’t open files. Please describe the picture in words.",
        "unknown_command": "I don’t know that command. /start — menu, /help — help, /language — language.",
        "not_configured_admin": "🛠 Generation is not set up: there is no Kie.ai key. "
                                "Set KIE_API_KEY in the bot’s environment and restart it.",
        "choose_language": "🌐 Choose your language:",
        "language_set": "Done: I’ll speak English from now on.",
        "outcome_success": "done",
        "outcome_failed": "failed",
        "outcome_timed_out": "timed out",
        "outcome_in_flight": "in progress",
        "buy_offer": "⭐ Past the free hourly ones, a picture costs a credit (some models more). You have {balance}.",
        "btn_pack": "⭐ {credits:credit|credits} for {stars} ⭐",
        "buy_in_private": "Credits are sold in a private chat with the bot: open it and send /buy.",
        "invoice_description": "{credits:picture|pictures} past the free hourly ones. Credits never expire.",
        "paid": "✅ Payment received: +{credits:credit|credits}. You have {balance}.",
        "balance": "💎 You have {balance:credit|credits}.",
        "paysupport": "💬 <b>Payment questions</b>\nWrite to the bot's admin what happened, with the payment id "
                      "(it is on the receipt). Credits for a picture that did not arrive come back by themselves.",
        "pay_stale": "This offer has expired. Send /buy to see the current ones.",
        "pay_unavailable": "Payments cannot be taken right now. Please try again in a minute.",
        "refunded": "↩️ Payment refunded, {removed:credit|credits} removed. You have {balance}.",
        "refund_unknown": "No such payment, or it was refunded already. Usage: /refund <payment id>",
        "refund_done": "Refunded: {removed:credit|credits} removed from user {user}.",
        "refund_failed": "Telegram did not refund: {reason}",
        "stats_stars": "\nStars: {payments} payments for {stars} ⭐, {refunds} refunds; credits sold {sold}, spent "
                       "{spent}, returned for failed pictures {returned}",
        "outcome_cancelled": "cancelled",
    },
}


@dataclasses.dataclass(frozen=True)
class ModelOption:
    """A required choice a model adds after the ratio (quality, resolution); its row's ``inputs`` names its field."""

    title: dict[str, str]  # per language
    choices: tuple[tuple[str, dict[str, str]], ...]  # (value sent to Kie, label per language)

    def label(self, value: str, lang: str) -> str:
        return dict(self.choices)[value][lang]


TEXT_TO_IMAGE = (("prompt", "prompt"), ("aspect_ratio", "ratio"))  # the inputs most models take


@dataclasses.dataclass(frozen=True)
class ImageModel:
    """A Kie Market model: adding one is adding a row to CATALOG, its inputs named as its Kie page names them."""

    key: str  # short id used in button data
    kie_model: str  # the ``model`` sent to createTask
    title: str
    ratios: tuple[str, ...]
    option: ModelOption | None = None
    inputs: tuple[tuple[str, str], ...] = TEXT_TO_IMAGE  # (Kie's field, the choice in it: any key of request's dict)
    fixed_input: tuple[tuple[str, Any], ...] = ()  # sent as they are, after the chosen ones
    prompt_chars: tuple[int, int] = (1, 1000)  # (fewest, most) characters Kie accepts in the prompt
    credits: int = 1  # Stars credits a picture costs past the free hourly ones (Kie's prices differ by model)
    about: tuple[str, str] = ("", "")  # what it is good at, in one line: (Russian, English)

    @property
    def edits(self) -> bool:
        """Whether it changes a photo (it takes the photo's URL) rather than drawing from words."""
        return any(name.startswith("image_url") for _, name in self.inputs)

    def described(self, lang: str) -> str:
        """"Seedream 4.5 — detailed pictures in 2K or 4K"."""
        return f"{self.title} — {self.about[lang == 'en']}"

    def request(self, prompt: str, ratio: str, option: str = "", nsfw_checker: bool = True,
                image_urls: tuple[str, ...] = ()) -> dict[str, Any]:
        chosen = {"prompt": prompt, "ratio": ratio, "option": option, "nsfw_checker": nsfw_checker,  # KIE_NSFW_CHECKER
                  "image_urls": list(image_urls), "image_url": image_urls[0] if image_urls else ""}  # to edit
        return {**{field: chosen[name] for field, name in self.inputs}, **dict(self.fixed_input)}

    def details(self, ratio: str, option: str, lang: str) -> str:
        """What a picture was made with, as the user chose it: "16:9 · Seedream 4.5 · High (4K)"."""
        chosen = [ratio, self.title] if ratio else [self.title]
        if self.option is not None and option in dict(self.option.choices):
            chosen.append(self.option.label(option, lang))
        return " · ".join(chosen)


FILTERED = TEXT_TO_IMAGE + (("nsfw_checker", "nsfw_checker"),)  # Kie's content filter, where the model documents it

Z_IMAGE = ImageModel("zimage", "z-image", "Z-Image", ("1:1", "16:9", "9:16", "4:3", "3:4"), inputs=FILTERED,
                     about=("быстрая и недорогая, умеет писать текст на картинке",
                            "fast and cheap, writes text in pictures well"))

# Ratios, options, prompt lengths and inputs as Kie's model pages list them for text-to-image.
CATALOG: tuple[ImageModel, ...] = (
    Z_IMAGE,
    ImageModel("nanobanana", "google/nano-banana", "Nano Banana",
               ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9"), inputs=(("prompt", "prompt"),
               ("image_size", "ratio")), fixed_input=(("output_format", "png"),), prompt_chars=(1, 5000),
               about=("от Google: точно следует длинным описаниям", "Google's: follows long descriptions closely")),
    ImageModel("seedream45", "seedream/4.5-text-to-image", "Seedream 4.5",
               ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9"),
               ModelOption({"ru": "качество", "en": "quality"},
                           (("basic", {"ru": "Обычное (2K)", "en": "Basic (2K)"}),
                            ("high", {"ru": "Высокое (4K)", "en": "High (4K)"}))),
               TEXT_TO_IMAGE + (("quality", "option"), ("nsfw_checker", "nsfw_checker")), prompt_chars=(1, 3000),
               about=("подробные картинки в 2K или 4K", "detailed pictures in 2K or 4K")),
    ImageModel("flux2pro", "flux-2/pro-text-to-image", "Flux 2 Pro",
               ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3"),
               ModelOption({"ru": "разрешение", "en": "resolution"},
                           (("1K", {"ru": "1K", "en": "1K"}), ("2K", {"ru": "2K", "en": "2K"}))),
               TEXT_TO_IMAGE + (("resolution", "option"), ("nsfw_checker", "nsfw_checker")), prompt_chars=(3, 5000),
               about=("фотореализм в 1K или 2K", "photorealism in 1K or 2K")),
    ImageModel("grok", "grok-imagine/text-to-image", "Grok Imagine", ("1:1", "16:9", "9:16", "3:2", "2:3"),
               inputs=FILTERED, prompt_chars=(1, 5000),
               about=("от xAI: смелый, яркий стиль", "xAI's: a bold, vivid style")),
    ImageModel("imagen4fast", "google/imagen4-fast", "Imagen 4 Fast", ("1:1", "16:9", "9:16", "4:3", "3:4"),
               prompt_chars=(1, 5000), about=("от Google: быстрые фотореалистичные картинки",
                                              "Google's: fast photorealistic pictures")),
)

# Edit models take the user's photo (the bot's own upload of it to Kie) and keep its proportions: no ratio.
EDIT_MODEL = ImageModel("nanobananaedit", "google/nano-banana-edit", "Nano Banana Edit", (),
                        inputs=(("prompt", "prompt"), ("image_urls", "image_urls")),
                        fixed_input=(("output_format", "png"), ("image_size", "auto")), prompt_chars=(1, 5000),
                        about=("меняет ваше фото по описанию", "changes your photo as you describe"))

MODELS_BY_KEY = {model.key: model for model in (*CATALOG, EDIT_MODEL)}

# Shown when building the real menu fails: no lookups, nothing that can raise.
FALLBACK_MENU = {"inline_keyboard": [[{"text": "🖼 Создать картинку", "callback_data": "new"}]]}

RU_LANGUAGES = frozenset({"ru", "uk", "be", "kk"})

LANGUAGES = {"ru": "🇷🇺 Русский", "en": "🇬🇧 English"}  # what /language offers, each named in itself

# The menu Telegram shows behind the "/" button, per language_code ("" is everyone
# without a menu of their own): English, as the replies to a language the bot does not
# speak; Russian for the languages answered in Russian.  /stats is for admins and stays out of it.
RUSSIAN_MENU = [{"command": "start", "description": "Меню и новая картинка"},
                {"command": "draw", "description": "Нарисовать: /draw и описание (и в группах)"},
                {"command": "settings", "description": "Модель и формат по умолчанию"},
                {"command": "help", "description": "Как пользоваться"},
                {"command": "cancel", "description": "Отменить"},
                {"command": "language", "description": "Язык / Language"}]

COMMAND_MENUS: dict[str, list[dict[str, str]]] = {
    "": [{"command": "start", "description": "Menu and a new picture"},
         {"command": "draw", "description": "Draw: /draw and a description (in groups too)"},
         {"command": "settings", "description": "Default model and format"},
         {"command": "help", "description": "How to use"},
         {"command": "cancel", "description": "Cancel"},
         {"command": "language", "description": "Language / Язык"}],
    **{language: RUSSIAN_MENU for language in sorted(RU_LANGUAGES)},
}

# Buttons under a result or a failure, by name: (TEXTS key, callback verb).  The
# data carries the job id, so a press names the picture it is about; another
# user's or an unknown id is refused as a stale button.
RESULT_BUTTONS = {
    "again": ("btn_again", "again"), "retry": ("btn_retry", "again"), "ratio": ("btn_ratio", "ratios"),
    "model": ("btn_model", "models"), "edit": ("btn_edit", "edit"), "file": ("btn_file", "file"),
    "resend": ("btn_resend", "resend"), "retouch": ("btn_retouch", "retouch"),
}

# Which buttons follow a failure (Job.error): fix the prompt after moderation or
# validation, re-send a picture that is ready, else try the same again.
FAILURE_BUTTONS = {"moderation": ("retry", "edit"), "invalid": ("retry", "edit"), "invalid_prompt": ("retry", "edit"),
                   "invalid_ratio": ("ratio", "edit"), "delivery": ("resend",)}


class TrtError(Exception):
    """Base of the errors this module raises on purpose; each section defines its own below."""


class Clock:
    """Time as the bot sees it, passed to every part that waits or stamps, so tests can drive it by hand:
    ``time()`` is wall time (stored timestamps), ``monotonic()`` measures deadlines and intervals."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def steady(self) -> "Clock":
        """This clock, with a wall time that a step of the system clock does not move: ``time()`` now plus the
        monotonic time since.  For parts whose stored stamps are also what they measure (a job's age): a row
        loaded at start is judged by the wall clock, anything later by the monotonic one."""
        offset = self.time() - self.monotonic()
        steady = Clock()
        steady.monotonic, steady.sleep = self.monotonic, self.sleep  # type: ignore[method-assign]
        steady.time = lambda: self.monotonic() + offset  # type: ignore[method-assign]
        return steady


SYSTEM_CLOCK = Clock()


class OwnedTasks:
    """The tasks one part starts: kept until they end, each failure logged under ``tag`` when its task ends
    (not as "Task exception was never retrieved" when collected, if at all), none left to the GC."""

    def __init__(self, tag: str):
        self.tag = tag
        self.running: set[asyncio.Task] = set()

    def start(self, coro: Awaitable[Any], name: str | None = None) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self.running.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Task) -> None:
        self.running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s %s failed", self.tag, task.get_name(), exc_info=task.exception())

    async def cancel_all(self) -> None:
        tasks = list(self.running)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


###############################################################################
# 1. Configuration
#    Owns reading the environment once, validating it and deriving secrets.
#    SETTINGS is the one list of variables: their defaults, how each is read,
#    the Config field it fills and the README's line for it.
###############################################################################

TOKEN_PATTERN = re.compile(r"[0-9]{3,20}:[A-Za-z0-9_-]{30,100}")
SECRET_TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,256}")
MIN_SECRET_CHARS = 8  # a shorter secret is guessable, and masking it in logs would hide ordinary words
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
DEFAULT_DATABASE_URL = "sqlite:///./data/trt_bot.sqlite3"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
DEFAULT_CALLBACK_PATH = "callbacks/kie"
# Unreserved URL characters only (RFC 3986), so the path routes exactly as written.
CALLBACK_PATH_PATTERN = re.compile(r"[A-Za-z0-9._~-]{1,100}(?:/[A-Za-z0-9._~-]{1,100}){0,9}")
# Routes the bot serves itself (section 14), which KIE_CALLBACK_PATH must not shadow;
# True: everything under the route too.
BUILTIN_ROUTES = {"/": False, "/health": False, "/metrics": False, "/diag": True, "/webhook": True}


class ConfigError(TrtError):
    """A setting the operator must fix; main() prints it and exits with code 2."""


# (variable name, its value stripped, or the default when empty) -> the Config value, or ConfigError.
SettingParser = Callable[[str, str], Any]


class Setting(NamedTuple):
    """One environment variable: the Config field it fills, its default, how it is read, the README's line."""

    name: str
    field: str
    default: str  # as an operator would write it; "" is empty
    parse: SettingParser
    help: str  # the README's "meaning" column, word for word
    secret: bool = False  # never shown; masked in every log line (Config.secrets)
    shown_default: str = ""  # the README's "default" column when it is not the default itself


def _text(name: str, raw: str) -> str:
    return raw


def _integer(low: int, high: int) -> SettingParser:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer from {low} to {high}, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be an integer from {low} to {high}, got {value}")
        return value
    return parse


def _seconds(low: int, high: int) -> SettingParser:
    whole = _integer(low, high)
    return lambda name, raw: float(whole(name, raw))


def _fractional_seconds(low: float, high: float) -> SettingParser:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not low <= value <= high:  # also refuses nan, and what is not a number at all
            raise ConfigError(f"{name} must be a number of seconds from {low:g} to {high:g}, got {raw!r}")
        return value
    return parse


def _flag(name: str, raw: str) -> bool:
    if raw.lower() not in TRUE_WORDS | FALSE_WORDS:
        raise ConfigError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {raw.lower()!r}")
    return raw.lower() in TRUE_WORDS


def _url(name: str, raw: str) -> str:
    value = raw.rstrip("/")
    if not value.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must start with http:// or https://, got {value!r}")
    return value


def _secret(name: str, raw: str) -> str:
    if raw and len(raw) < MIN_SECRET_CHARS:
        raise ConfigError(f"{name} must be at least {MIN_SECRET_CHARS} characters (a shorter secret is guessable); "
                          "generate one with: openssl rand -hex 16")
    return raw


def _bot_token(name: str, raw: str) -> str:
    if not raw:
        raise ConfigError(f"{name} is not set: create a bot with @BotFather "
                          f"(https://t.me/BotFather) and export {name}=<its token>")
    if not TOKEN_PATTERN.fullmatch(raw):
        raise ConfigError(f"{name} is malformed: expected '<digits>:<secret>' exactly as "
                          "@BotFather shows it (check for quotes or spaces)")
    return raw


def _one_of(*words: str) -> Callable[[str, str], str]:
    """A reader of one of ``words``, in any case ("" among them: the variable may be left empty)."""
    def read(name: str, raw: str) -> str:
        if raw.lower() not in (known := {word.lower(): word for word in words}):
            raise ConfigError(f"{name} must be one of {', '.join(filter(None, words))}; got {raw!r}")
        return known[raw.lower()]
    return read


def _webhook_secret(name: str, raw: str) -> str:
    # A base64 value (Render's generateValue makes one) is used in its URL-safe form:
    # Telegram allows only A-Z a-z 0-9 _ - in a secret token.
    secret = raw.replace("+", "-").replace("/", "_").rstrip("=")
    if secret and (not SECRET_TOKEN_PATTERN.fullmatch(secret) or len(secret) < MIN_SECRET_CHARS):
        raise ConfigError(f"{name} may hold only A-Z a-z 0-9 _ - (or base64), {MIN_SECRET_CHARS} to 256 characters")
    return secret


def parse_database_url(url: str) -> str:
    """Where the database is: a SQLite file's path (from ``sqlite:///<path>``), or a PostgreSQL URL
    (``postgresql://`` or Render's ``postgres://``, with ``?sslmode=`` and the like) checked and kept whole."""
    prefix = "sqlite:///"
    if not url.startswith(POSTGRES_SCHEMES):
        if not url.startswith(prefix) or len(url) == len(prefix):
            raise ConfigError(f"DATABASE_URL must look like {DEFAULT_DATABASE_URL} or postgresql://user:password@"
                              f"host:5432/database, got a URL starting with {url.split(':', 1)[0]!r}")
        return url[len(prefix):]
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 -- raises on a port that is not a number
    except ValueError:
        raise ConfigError("DATABASE_URL has a port that is not a number") from None
    if not parts.path.strip("/"):
        raise ConfigError("DATABASE_URL names no database: end it with /<database name>")
    for password in database_passwords(url):
        if len(password) < MIN_SECRET_CHARS:
            raise ConfigError(f"DATABASE_URL's password must be at least {MIN_SECRET_CHARS} characters "
                              "(a shorter one is guessable, and masking it in logs would hide ordinary words)")
    if importlib.util.find_spec("psycopg") is None:
        raise ConfigError("a PostgreSQL DATABASE_URL needs psycopg: pip install -r requirements.txt")
    return url


def database_passwords(location: str) -> set[str]:
    """The passwords a PostgreSQL URL carries (in its user part or a ``?password=``), decoded; none for SQLite."""
    if not location.startswith(POSTGRES_SCHEMES):
        return set()
    parts = urllib.parse.urlsplit(location)
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True).get("password", [])
    return {urllib.parse.unquote(password) for password in [parts.password or "", *query] if password}


def _callback_path(name: str, raw: str) -> str:
    path = raw.strip("/")
    route = "/" + path
    for builtin, with_subtree in BUILTIN_ROUTES.items():
        if route == builtin or (with_subtree and route.startswith(builtin + "/")):
            shadowed = builtin + ("/..." if with_subtree else "")
            raise ConfigError(f"{name} {raw!r} collides with the bot's own route {shadowed}: "
                              f"pick another, for example {DEFAULT_CALLBACK_PATH}")
    if not CALLBACK_PATH_PATTERN.fullmatch(path) or {".", ".."} & set(path.split("/")):
        raise ConfigError(f"{name} may hold only A-Z a-z 0-9 . _ ~ - in up to 10 segments separated "
                          f"by /, none of them . or .., got {raw!r}")
    return path


def _admin_ids(name: str, raw: str) -> frozenset[int]:
    try:
        return frozenset(int(part) for part in raw.replace(" ", "").split(",") if part)
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated Telegram user ids, got {raw!r}") from None


def _stars_packs(name: str, raw: str) -> tuple[tuple[int, int], ...]:
    """"10:50,50:200" -> ((10, 50), (50, 200)): credits and their price in Stars, in the order offered."""
    packs = [part for part in raw.replace(" ", "").split(",") if part]
    if not all(re.fullmatch(r"[1-9][0-9]{0,5}:[1-9][0-9]{0,4}", pack) for pack in packs):
        raise ConfigError(f"{name} must be comma-separated credits:stars pairs (up to 999999 credits for up to "
                          f"99999 Stars), for example 10:50,50:200; got {raw!r}")
    return tuple((int(pack.split(":")[0]), int(pack.split(":")[1])) for pack in packs)


DERIVED_FROM_TOKEN = "derived from the bot token"

# Every variable the bot reads, in the README's order.  load_config reads them in this order, so a
# missing token is reported before anything else.
SETTINGS = (
    Setting("TELEGRAM_BOT_TOKEN", "telegram_token", "", _bot_token, "the token @BotFather gave you",
            secret=True, shown_default="required"),
    Setting("KIE_API_KEY", "kie_api_key", "", _secret,
            "Kie.ai key; without it the bot runs and says generation is not configured", secret=True),
    Setting("BOT_MODE", "bot_mode", "", _one_of("", "webhook", "polling"), "`webhook` or `polling`",
            shown_default="`webhook` if a base URL is known, else `polling`"),
    Setting("WEBHOOK_BASE_URL", "webhook_base_url", "", _text,
            "public `https://` base URL; the webhook is `<base>/webhook/<secret path>`",
            shown_default="`RENDER_EXTERNAL_URL` if set"),
    Setting("WEBHOOK_SECRET_TOKEN", "webhook_secret", "", _webhook_secret,
            "checked against `X-Telegram-Bot-Api-Secret-Token`; `A-Z a-z 0-9 _ -`, 8 to 256 (a base64 value is "
            "used in its URL-safe form)", secret=True, shown_default=DERIVED_FROM_TOKEN),
    Setting("PORT", "port", "10000", _integer(0, 65535), "listen address (Render sets `PORT`)"),
    Setting("HOST", "host", "0.0.0.0", _text, "listen address (Render sets `PORT`)"),
    Setting("DATABASE_URL", "database", DEFAULT_DATABASE_URL, lambda name, url: parse_database_url(url),
            "`sqlite:///relative/path`, `sqlite:////absolute/path`, `sqlite:///:memory:`, or PostgreSQL: "
            "`postgresql://user:password@host:5432/database` (`postgres://` and `?sslmode=` too)"),
    Setting("SINGLE_MODEL_ONLY", "single_model_only", "0", _flag, "`1`/`true`/`yes`: z-image only"),
    Setting("UPDATE_QUEUE_SIZE", "queue_size", "100", _integer(1, 1_000_000),
            "updates held in memory; more wait in the SQLite inbox"),
    Setting("UPDATE_QUEUE_WORKERS", "queue_workers", "3", _integer(1, 1000),
            "updates handled at once (one chat's updates never run in parallel)"),
    Setting("KIE_CALLBACK_PATH", "kie_callback_path", DEFAULT_CALLBACK_PATH, _callback_path,
            "path of the Kie.ai completion callback: `A-Z a-z 0-9 . _ ~ -` in up to 10 `/`-separated segments; "
            "one of the bot's own routes (`/`, `/health`, `/metrics`, anything under `/diag/` or `/webhook/`) "
            "is refused"),
    Setting("KIE_CALLBACK_TOKEN", "kie_callback_token", "", _secret, "the `?token=` in the callback URL",
            secret=True, shown_default=DERIVED_FROM_TOKEN),
    Setting("KIE_WEBHOOK_HMAC_KEY", "kie_hmac_key", "", _secret,
            "when set, Kie callbacks must carry a valid `X-Webhook-Signature` over an `X-Webhook-Timestamp` "
            "within 5 minutes of now (else 403)", secret=True),
    Setting("TELEGRAM_API_BASE", "telegram_api_base", "https://api.telegram.org", _url,
            "a self-hosted Bot API server, or a test fake"),
    Setting("KIE_API_BASE", "kie_api_base", "https://api.kie.ai", _url, "a test fake"),
    Setting("KIE_UPLOAD_BASE", "kie_upload_base", "https://kieai.redpandaai.co", _url,
            "Kie's File Upload API, where the bot puts its own copy of a photo to edit; or a test fake"),
    Setting("ADMIN_IDS", "admin_ids", "", _admin_ids,
            "comma-separated Telegram user ids: `/stats`, and alerts when Kie rejects the key (401) or runs out "
            "of credits (402)"),
    Setting("DIAG_TOKEN", "diag_token", "", _secret,
            "when set, `/diag/*` and `/metrics` need `Authorization: Bearer <token>` (or `?token=`, URL-encoded)",
            secret=True),
    Setting("GEN_TIMEOUT_S", "gen_timeout_s", "300", _seconds(1, 86400),
            "give up on one generation after this many seconds"),
    Setting("GEN_HOURLY_LIMIT", "gen_hourly_limit", "20", _integer(1, 100_000),
            "pictures delivered per user per hour (failed, timed-out and cancelled ones do not count; admins are "
            "exempt)"),
    Setting("GEN_DAILY_LIMIT", "gen_daily_limit", "0", _integer(0, 10_000_000),
            "pictures started per day (UTC) by the whole bot, whatever became of them: a cap on what a day can "
            "spend; past it users are told to come back tomorrow; `0`: no cap"),
    Setting("KIE_NSFW_CHECKER", "kie_nsfw_checker", "1", _flag,
            "`0`: turn off Kie's content filter (`nsfw_checker`) for the models that document it; on by default, "
            "as fits a public bot"),
    Setting("KIE_MAX_CONCURRENT_TASKS", "kie_max_tasks", "100", _integer(1, 10_000),
            "tasks at Kie at once, for all users; more wait their turn"),
    Setting("KIE_CREDITS_LOW", "kie_credits_low", "100", _integer(0, 10**9),
            "under this many Kie.ai credits (read every 10 minutes) a red flag is raised and the admins are "
            "alerted once, before Kie refuses pictures (402); `0`: never"),
    Setting("WEBHOOK_FLUSH_PENDING_OVER", "flush_pending_over", "10", _integer(-1, 10**9),
            "at start, drop Telegram's backlog if more are pending (a smaller one is always kept); `-1` never "
            "drops"),
    Setting("SHUTDOWN_GRACE_S", "shutdown_grace_s", "25", _seconds(1, 3600),
            "seconds to finish in-flight work after SIGTERM (keep it under the platform's kill delay)"),
    Setting("LEASE_TTL_S", "lease_ttl_s", "15", _seconds(2, 600),
            "lifetime of the single-active-instance lease; the holder renews it every third of that"),
    Setting("LOG_LEVEL", "log_level", "INFO", _one_of("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
            "`DEBUG`, `INFO`, `WARNING`, `ERROR`"),
    Setting("RESULT_DOWNLOAD_ALLOW_PRIVATE", "result_download_allow_private", "0", _flag,
            "`1`: result downloads may reach loopback and private addresses (for tests whose fakes run on "
            "127.0.0.1; never in production)"),
    Setting("TELEGRAM_SEND_RATE", "telegram_send_rate", "30", _integer(1, 1000),
            "messages per second across all chats (Telegram's limit is about 30; up to 1000 with paid broadcasts)"),
    Setting("TELEGRAM_CHAT_INTERVAL_S", "telegram_chat_interval_s", "1", _fractional_seconds(0, 60),
            "seconds between two messages to one chat, a group too (Telegram: about one per second)"),
    Setting("TELEGRAM_GROUP_PER_MINUTE", "telegram_group_per_minute", "20", _integer(0, 1000),
            "messages to one group in any minute (Telegram: 20), besides the spacing of any chat; `0`: no limit"),
    Setting("OUTBOX_MAX_WAIT_S", "outbox_max_wait_s", "3600", _seconds(1, 7 * 86400),
            "a reply still unsent after this many seconds (Telegram down, a long flood wait) is dropped and "
            "logged"),
    Setting("STARS_PACKS", "stars_packs", "", _stars_packs,
            "credits sold for Telegram Stars, `credits:stars` pairs (`10:50,50:200`); empty: nothing is sold"),
)

# Settings that, left empty, are derived from the bot token (the value names what the secret is for).
TOKEN_DERIVED_SECRETS = {"webhook_secret": "webhook-secret", "kie_callback_token": "kie-callback"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the bot reads from its environment, validated; build it with load_config.

    Its fields are SETTINGS' ``field``s in their order: each entry there says what its field holds (the
    value its parser returns), its default and the variable it is read from.
    """

    __annotations__ = {setting.field: Any for setting in SETTINGS}

    @property
    def webhook_path_secret(self) -> str:
        """The secret part of the path Telegram posts to: a digest of the secret token, so a changed secret
        changes the URL and ``ensure_webhook`` notices (getWebhookInfo never returns the secret)."""
        return hashlib.sha256(b"trt-webhook-path:" + self.webhook_secret.encode()).hexdigest()[:32]

    @property
    def webhook_path(self) -> str:
        return "/webhook/" + self.webhook_path_secret

    @property
    def webhook_url(self) -> str:
        return self.webhook_base_url.rstrip("/") + self.webhook_path

    @property
    def send_limits(self) -> tuple[float, float, int]:
        """The Telegram client's pacing (TelegramClient)."""
        return self.telegram_send_rate, self.telegram_chat_interval_s, self.telegram_group_per_minute

    @property
    def secrets(self) -> list[str]:
        """Values that must never reach a log line, response or error: every secret setting, everything
        derived from one, and their URL-encoded forms (a callback URL's ``?token=``); longest first."""
        values = {getattr(self, setting.field) for setting in SETTINGS if setting.secret}
        values |= {self.telegram_token.partition(":")[2], self.webhook_path_secret, *database_passwords(self.database)}
        values -= {""}
        encoded = {quote(value) for value in values
                   for quote in (functools.partial(urllib.parse.quote, safe=""), urllib.parse.quote_plus)}
        return sorted(values | encoded, key=lambda value: (-len(value), value))  # see install_secret_masking

    def describe(self) -> list[str]:
        """``NAME=value`` for every setting, secrets as *** (``python trt_bot.py check`` prints them)."""
        return [f"{setting.name}={_shown(getattr(self, setting.field), setting.secret)}" for setting in SETTINGS]


def _shown(value: Any, secret: bool) -> str:
    if value == "" or value == frozenset():
        return "(empty)"
    if secret:
        return "***"
    if isinstance(value, frozenset):
        return ",".join(map(str, sorted(value)))
    return str(int(value)) if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def load_config(env: Mapping[str, str]) -> Config:
    """Build a Config from environment variables or raise ConfigError naming what to fix."""
    values = {setting.field: setting.parse(setting.name, env.get(setting.name, "").strip() or setting.default)
              for setting in SETTINGS}
    values["webhook_base_url"] = values["webhook_base_url"] or env.get("RENDER_EXTERNAL_URL", "").strip()
    values["bot_mode"] = values["bot_mode"] or ("webhook" if values["webhook_base_url"] else "polling")
    if values["bot_mode"] == "webhook" and not values["webhook_base_url"].startswith("https://"):
        raise ConfigError("BOT_MODE=webhook needs WEBHOOK_BASE_URL (or RENDER_EXTERNAL_URL) "
                          "starting with https://, for example https://my-bot.onrender.com")
    token = values["telegram_token"].encode()
    for field, purpose in TOKEN_DERIVED_SECRETS.items():  # stable, and revealing nothing about the token
        values[field] = values[field] or hmac.new(token, purpose.encode(), hashlib.sha256).hexdigest()
    return Config(**values)


###############################################################################
# 2. Logging
#    Owns the log format and the filter that keeps every secret (Config.secrets)
#    out of every log record, httpx's request lines included.
###############################################################################

# Loggers that may format a request URL (which carries the bot token, the
# webhook path or the callback token) or an exception mentioning one.  httpx
# logs every request URL at INFO.
MASKED_LOGGERS = ("trt_bot", "httpx", "httpcore.connection", "httpcore.http11",
                  "httpcore.http2", "httpcore.proxy", "asyncio", "psycopg")


# A Telegram file URL (/file/bot<token>/<path>): the path is masked with the token, since the two fetch the file.
TELEGRAM_FILE_URL = re.compile(r"/file/bot[^\s\"']*")


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return TELEGRAM_FILE_URL.sub("/file/bot***", text)


def _mask_record(secrets: list[str], record: logging.LogRecord) -> bool:
    """The masking filter: rewrites a record's message and traceback with every secret replaced by ***.
    It sits on the loggers that emit records (not on handlers), so every handler, pytest's capture too,
    sees the masked record."""
    message = record.getMessage()
    masked = mask_secrets(message, secrets)
    if masked != message or record.args:
        record.msg, record.args = masked, ()
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = mask_secrets(record.exc_text, secrets)
    return True


def install_secret_masking(secrets: Iterable[str]) -> None:
    """Attach (or refresh) the masking filter on every logger that can leak; secrets masked before are kept."""
    known = set(secrets)
    for name in MASKED_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if getattr(f, "func", None) is _mask_record]:
            known.update(old.args[0])
            logger.removeFilter(old)
    # Longest first: masking a short secret never leaves part of a longer one showing.
    masking = functools.partial(_mask_record, sorted({s for s in known if s}, key=lambda s: (-len(s), s)))
    for name in MASKED_LOGGERS:
        logging.getLogger(name).addFilter(masking)


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
_REQUEST_LINE = re.compile(rb"(" + _TOKEN_CHARS + rb") ([!-~]+) HTTP/([0-9])\.([0-9])")  # RFC 9112: ASCII only
_HEADER_BLOCK = re.compile(rb"(?:" + _TOKEN_CHARS + rb":" + _VALUE_CHARS + rb"\r\n)*")  # every line at once
_HEADER_NAME = re.compile(_TOKEN_CHARS)
_BAD_VALUE_CHARS = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 2.2 lets a server accept a bare LF as a line end; we refuse it at once
# rather than wait for a CRLF CRLF that never comes (the client would get 408 10 s later).
_BARE_LF = re.compile(rb"(?<!\r)\n")
_DIGITS = re.compile(r"[0-9]{1,18}")

# Every status's reason phrase; 413's as RFC 9110 names it (Python's before 3.13 is the older name).
STATUS_REASONS = {status.value: status.phrase for status in HTTPStatus} | {413: "Content Too Large"}


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
    content_length: int = 0  # what the head announced; ``body`` holds it once the request is complete

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> dict[str, str]:
        """The query string's fields; %-escapes that are not UTF-8 come out as U+FFFD, never an error."""
        return dict(urllib.parse.parse_qsl(self.target.partition("?")[2]))


class RequestParser:
    """Incremental HTTP/1.1 request parser: ``feed()`` bytes as they arrive.

    ``next_head()`` returns the request now arriving as soon as its head (request line and headers) is
    complete, so the server can judge it before reading the body; ``next_request()`` returns the same
    Request once its body is complete too.  Both return None when more bytes are needed and raise HttpError
    for a malformed head; pipelined requests come out one per call.  After an HttpError the connection must
    be closed: the parser cannot know where the next request starts.
    """

    def __init__(self, max_head: int = MAX_HEAD_BYTES, max_body: int = MAX_BODY_BYTES):
        self.max_head = max_head
        self.max_body = max_body
        self._buffer = bytearray()
        self._head: Request | None = None  # the request whose body is still arriving
        self._scanned = 0  # bytes of an unfinished head already searched for its end and for bare LFs

    @property
    def has_partial_request(self) -> bool:
        return bool(self._buffer) or self._head is not None

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_head(self) -> Request | None:
        if self._head is None:
            self._head = self._parse_head()
        return self._head

    def next_request(self) -> Request | None:
        request = self.next_head()
        if request is None or len(self._buffer) < request.content_length:
            return None
        if request.content_length:
            request.body = bytes(self._buffer[: request.content_length])
            del self._buffer[: request.content_length]
        self._head = None
        return request

    def _parse_head(self) -> Request | None:
        # RFC 9112 2.2: a server SHOULD ignore empty lines before a request line.
        while self._buffer[:2] == b"\r\n":
            del self._buffer[:2]
            self._scanned = 0
        if self._buffer[:1] in (b"\x16", b"\x00"):
            raise HttpError(400, "not HTTP (TLS or binary data on a plain-text port)")
        end = self._buffer.find(b"\r\n\r\n", max(0, self._scanned - 3))
        if _BARE_LF.search(self._buffer, self._scanned, len(self._buffer) if end < 0 else end):
            raise HttpError(400, "bare LF: lines must end with CRLF")
        if (len(self._buffer) if end < 0 else end) > self.max_head:
            raise HttpError(431, "request headers too large")
        if end < 0:
            self._scanned = len(self._buffer)
            return None
        head = bytes(self._buffer[: end + 2])  # the request line and header lines, each with its CRLF
        del self._buffer[: end + 4]
        self._scanned = 0
        return self._parse_head_bytes(head)

    def _parse_head_bytes(self, head: bytes) -> Request:
        line_end = head.find(b"\r\n")
        match = _REQUEST_LINE.fullmatch(head, 0, line_end)
        if not match:
            raise HttpError(400, "malformed request line")
        method, target, major, minor = match.groups()
        if major != b"1":
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        if not (target.startswith(b"/") or target == b"*"):
            raise HttpError(400, "request target must be a path")
        if not _HEADER_BLOCK.fullmatch(head, line_end + 2):  # which rule it broke (the slow path, bad requests only)
            for line in head[line_end + 2:].split(b"\r\n"):
                name, colon, value = line.partition(b":")
                if line and (not colon or not _HEADER_NAME.fullmatch(name)):
                    raise HttpError(400, "malformed header line")
                if _BAD_VALUE_CHARS.search(value):
                    raise HttpError(400, "invalid character in header value")
            raise HttpError(400, "malformed header line")
        headers: dict[str, str] = {}
        for line in head[line_end + 2: -2].decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip(" \t")
        headers.pop("", None)  # the empty line of a request without headers
        content_length = self._body_length_from(headers, head)
        # RFC 9112 3.2: exactly one Host in HTTP/1.1 (HTTP/1.0 may omit it), else 400.
        hosts = head.lower().count(b"\nhost:")
        if hosts > 1 or (hosts == 0 and minor != b"0"):
            raise HttpError(400, "an HTTP/1.1 request needs exactly one Host header")
        version = f"1.{minor.decode()}"
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection if version == "1.1" else "keep-alive" in connection
        return Request(method.decode("ascii"), target.decode("ascii"), version, headers, b"", keep_alive,
                       content_length)

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


class Response(NamedTuple):
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
#    Owns sockets: reading and writing under a deadline in every phase of a
#    connection, bounding connections (evicting idle and stalled ones first),
#    pipelining and the request bodies held in memory.  What a request means is
#    the application's business (section 14); it judges each request's head
#    before the body is read.
###############################################################################

READ_CHUNK = 64 * 1024
RETRY_LATER = (("Retry-After", "5"),)

RequestHandler = Callable[[Request], Awaitable[Response]]
HeadCheck = Callable[[Request], Response | None]

# A connection's phases; HttpServer says who enforces their deadlines, and _admit which a newcomer may evict.
PHASES = IDLE, READING, HANDLING, WRITING, CLOSING = "idle", "reading", "handling", "writing", "closing"


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """The server's bounds, each default with why; tests pass smaller ones."""

    idle_timeout: float = 75.0  # keep-alive connections Telegram reuses; nginx's default is 75 s
    request_timeout: float = 10.0  # a whole request head and body must arrive within this (slowloris)
    handler_timeout: float = 60.0  # longer than every handler's own deadlines (a Bot API read times out at 30 s)
    write_timeout: float = 10.0  # a stalled response must drain within this (nginx's send_timeout is 60 s)
    linger: float = 1.0  # a closing connection's time for its last bytes to leave, a turned-away one's to read its 503
    max_connections: int = 1000  # Telegram uses at most 100 (max_connections); the rest is ops and Kie
    max_unsent: int = 64 * 1024  # per connection; past it no further request is read until the peer reads
    max_buffered_body: int = 32 * 1024 * 1024  # every connection's bodies together: 32 of the largest allowed
    max_head: int = MAX_HEAD_BYTES
    max_body: int = MAX_BODY_BYTES


class HttpServer:
    """HTTP/1.1 with keep-alive and pipelining on asyncio.start_server.

    ``check_head`` judges a request from its head alone: a Response it returns
    is sent at once and the body is never read (if one was announced, the
    connection then closes: the body may still be on its way).  ``handler``
    turns a complete Request into a Response; if it raises, the client gets a
    500 with no detail and the error is logged; if it takes over
    ``handler_timeout``, a 503.

    Every phase of a connection has a deadline (PHASES); one sweeper task cuts
    the connections whose deadline passed, so a read or a write costs no timer
    of its own.  At ``max_connections`` a newcomer evicts another (``_admit``).
    Request bodies held in memory total at most ``max_buffered_body`` bytes; a
    request that would pass that gets 503.
    """

    def __init__(self, handler: RequestHandler, *, check_head: HeadCheck | None = None,
                 limits: HttpLimits = HttpLimits(), clock: Clock = SYSTEM_CLOCK):
        self.handler = handler
        self.check_head = check_head
        self.limits = limits
        self.clock = clock
        self.buffered_body = 0  # body bytes reserved by the requests being read or handled
        self.closing = False
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task | None = None
        # A served connection is its writer: its task, its phase and the deadline by which that must end.
        self._writers: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._phases: dict[asyncio.StreamWriter, str] = {}  # in the order they entered their phase, oldest first
        self._deadlines: dict[asyncio.StreamWriter, float] = {}
        self._placed: set[asyncio.StreamWriter] = set()  # those holding one of the max_connections places

    @property
    def open_connections(self) -> int:
        return len(self._placed)

    def phase_counts(self) -> dict[str, int]:
        """How many connections are in each phase (every phase listed)."""
        return dict.fromkeys(PHASES, 0) | collections.Counter(self._phases.values())

    async def start(self, host: str, port: int) -> int:
        """Listen and return the bound port (useful with port 0)."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=READ_CHUNK, backlog=1024)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="http-deadlines")
        return self._server.sockets[0].getsockname()[1]

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; close idle connections; give the others ``grace`` seconds, then cut them.

        Every connection has ended when this returns, so the event loop's
        shutdown finds none to cancel.
        """
        self.closing = True
        if self._server is not None:
            self._server.close()
        for writer in [w for w, phase in self._phases.items() if phase == IDLE]:
            self._cut(writer)
        if self._writers:
            _, pending = await asyncio.wait(set(self._writers), timeout=grace)
            for task in pending:
                self._writers[task].transport.abort()
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers[asyncio.current_task()] = writer  # type: ignore[index]
        self._phases[writer] = IDLE  # not evictable (by _admit) before it has a place
        self._deadlines[writer] = math.inf
        try:
            try:
                if not self._admit(writer):
                    await self._turn_away(writer)
                    return
                if (sock := writer.get_extra_info("socket")) is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                writer.transport.set_write_buffer_limits(high=self.limits.max_unsent)
                parser = RequestParser(self.limits.max_head, self.limits.max_body)
                while await self._serve_one(reader, parser, writer):
                    pass
            finally:  # unsent bytes have until the closing phase's deadline to leave, then the sweeper resets
                if self._phases[writer] != CLOSING:
                    self._enter(writer, CLOSING, self.limits.linger)
                writer.close()
                await writer.wait_closed()
        except (OSError, asyncio.CancelledError):
            pass  # the peer went away, or the server is shutting down: nothing to report
        finally:
            self._placed.discard(writer)
            del self._phases[writer], self._deadlines[writer], self._writers[asyncio.current_task()]  # type: ignore

    def _enter(self, writer: asyncio.StreamWriter, phase: str, timeout: float) -> None:
        del self._phases[writer]  # and put back last: the longest in its phase comes first
        self._phases[writer] = phase
        self._deadlines[writer] = self.clock.monotonic() + timeout

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Give ``writer`` a place if one is free, or can be freed by evicting a closing
        connection, else the one idle or stalled longest; False when every place is mid-request."""
        if len(self._placed) >= self.limits.max_connections:
            leaving = (w for w, phase in self._phases.items() if phase == CLOSING and w in self._placed)
            stalled = (w for w, phase in self._phases.items() if phase in (IDLE, WRITING) and w is not writer)
            victim = next(leaving, None) or next(stalled, None)
            if victim is None:
                return False
            self._cut(victim, evict=True)
        self._placed.add(writer)
        return True

    def _cut(self, writer: asyncio.StreamWriter, evict: bool = False) -> None:
        """End a connection whose deadline passed, or evict one; either way its place is free at once.

        A request that trickled in too slowly gets a 408 first.  An evicted connection, one stalled writing
        or one still closing is reset: a polite close would wait for the peer to read.
        """
        if evict or self._phases[writer] in (WRITING, CLOSING):
            writer.transport.abort()
        else:
            if self._phases[writer] == READING:
                writer.write(render_response(text_response(408, "request not received in time"), keep_alive=False))
            writer.close()  # the pending read sees end of stream and the connection ends
        self._placed.discard(writer)
        self._enter(writer, CLOSING, self.limits.linger)

    async def _sweep_forever(self) -> None:
        limits = self.limits
        interval = min(4.0, limits.request_timeout, limits.idle_timeout, limits.write_timeout, limits.linger) / 4
        while True:
            await self.clock.sleep(interval)
            now = self.clock.monotonic()
            for writer in [w for w, deadline in self._deadlines.items() if deadline < now]:
                self._cut(writer)

    async def _serve_one(self, reader: asyncio.StreamReader, parser: RequestParser,
                         writer: asyncio.StreamWriter) -> bool:
        """Read, judge, handle and answer one request; False when the connection is done."""
        if parser.has_partial_request:
            self._enter(writer, READING, self.limits.request_timeout)
        else:
            self._enter(writer, IDLE, self.limits.idle_timeout)
        try:
            head = await self._read(reader, parser, parser.next_head, writer)
        except HttpError as error:
            writer.write(render_response(text_response(error.status, error.reason), keep_alive=False))
            return False
        if head is None:
            return False
        # The answer a request earns from its head alone, or None to read its body and handle it:
        refusal = self.check_head(head) if self.check_head is not None else None
        if refusal is None and head.content_length > self.limits.max_buffered_body - self.buffered_body:
            refusal = text_response(503, "too many request bodies in flight", RETRY_LATER)
        if refusal is not None:
            if head.content_length:  # unread, perhaps still arriving: answer and close
                writer.write(render_response(refusal, keep_alive=False))
                return False
            parser.next_request()  # a head without a body is the whole request
            return await self._respond(writer, head, refusal)
        self.buffered_body += head.content_length
        try:
            request = await self._read(reader, parser, parser.next_request, writer)
            if request is None:
                return False
            response = await self._handle(request, writer)
        finally:
            self.buffered_body -= head.content_length
        return await self._respond(writer, request, response)

    async def _read(self, reader: asyncio.StreamReader, parser: RequestParser,
                    step: Callable[[], Request | None], writer: asyncio.StreamWriter) -> Request | None:
        """step()'s first answer, reading as needed; None when the peer closed or the connection was cut."""
        while (result := step()) is None:
            if self._phases[writer] == IDLE and self.closing:
                return None
            data = await reader.read(READ_CHUNK)
            if not data or self._phases[writer] == CLOSING:
                return None
            if self._phases[writer] == IDLE:
                self._enter(writer, READING, self.limits.request_timeout)
            parser.feed(data)
        return result

    async def _handle(self, request: Request, writer: asyncio.StreamWriter) -> Response:
        self._enter(writer, HANDLING, math.inf)  # bounded by the handler's own timer, below
        handler_timeout = self.limits.handler_timeout
        deadline = asyncio.timeout(handler_timeout)
        try:
            async with deadline:
                return await self.handler(request)
        except Exception:
            if deadline.expired():
                log.warning("[HTTP] handler for %s %s took over %gs", request.method, request.path, handler_timeout)
                return text_response(503, "the answer took too long", RETRY_LATER)
            log.exception("[HTTP] handler failed for %s %s", request.method, request.path)
            return text_response(500, "internal error")

    async def _respond(self, writer: asyncio.StreamWriter, request: Request, response: Response) -> bool:
        """Send a response; True when the connection stays open for the next request.

        While more than ``max_unsent`` bytes wait for the peer to read, no
        further request is read; they must drain within ``write_timeout``.
        """
        if writer.transport.is_closing():
            return False  # the peer is gone; pipelined requests still parsed get no answer
        keep_alive = request.keep_alive and not self.closing
        writer.write(render_response(response, keep_alive, request.method == "HEAD"))
        if not keep_alive:
            self._enter(writer, CLOSING, self.limits.write_timeout)  # the last bytes get it too
            return False
        if writer.transport.get_write_buffer_size() > self.limits.max_unsent:
            self._enter(writer, WRITING, self.limits.write_timeout)
            await writer.drain()
            return self._phases[writer] == WRITING  # not cut meanwhile
        return True

    async def _turn_away(self, writer: asyncio.StreamWriter) -> None:
        """503 for a connection over the bound, closed after ``linger`` without reading anything.

        Closing at once would reset the request the client is sending, and the reset can reach it before
        the 503; nothing is read, so waiting costs no memory.
        """
        writer.transport.pause_reading()
        writer.write(render_response(text_response(503, "too many connections", RETRY_LATER), keep_alive=False))
        writer.write_eof()
        self._enter(writer, CLOSING, self.limits.linger)
        await writer.wait_closed()  # the sweeper closes it at the deadline


###############################################################################
# 5. Storage
#    Owns the database: the schema and its versions, the one thread every
#    query runs on, the two dialects, group commits, the update inbox,
#    dialogs and choices, and the credits ledger.
#
# Theory of operation (storage and the lease; the lease's code is in section 14)
#
# Tables.  inbox: every update by update_id, done_at set once handled (kept INBOX_KEEP_DONE_S so a redelivery is
# known); outbox: the dialog's replies not yet taken by Telegram; jobs: a generation's row, saved as its state
# changes; credits: the Stars ledger (below); topic_dialogs, user_languages, user_settings, users; lease.
# What is durable when: an update is committed to the inbox before its 200 is sent (else Telegram keeps it and
# sends it again); a handler's replies are in the outbox before its update's done mark (both with group commits:
# one transaction and one fsync for many acks).
#
# Dialects.  A SQLite file (the default): WAL mode, synchronous=FULL, written under BEGIN IMMEDIATE, every commit
# vouched for by the file's inode: a file deleted or replaced under the bot is reopened, and the rows only the
# lost one held (unhandled updates, open jobs, dialogs, the outbox) copied into the new one.  PostgreSQL when
# DATABASE_URL says postgresql://: shared by instances on several hosts, the same SQL (? becomes %s), READ
# COMMITTED, the lease on the server's clock.  MIGRATIONS only add (a table, an index, a column with a default),
# so the bot before runs on the new schema during a deploy or a rollback; a change it could not live with
# writes its version into schema_readers, and older bots refuse to start on it.
#
# The lease.  One process on a database acts: it handles updates, sends and runs jobs; the others are passive
# (they acknowledge updates into the inbox for it).  Role.may_act() is the only answer: this process claimed the
# lease row, and trusts it for 2/3 of the TTL after the claim was *sent*, on the monotonic clock; the row expires
# a TTL after the claim, so a holder paused or cut off stops acting before another may take over.  The holder
# renews every TTL/3; a passive instance claims every PASSIVE_RETRY_S and peeks every LEASE_PEEK_S, taking over
# at once from a holder that released the lease or is provably gone (kill -9: its pid no longer runs, in our PID
# namespace and boot), else after the row expires (SIGSTOP, another host).  Every Bot API send must end within
# the trust left (fencing), so a woken holder sends nothing; its next claim finds another holder, it forgets the
# stored work, and its running handlers' results are void.  Taking over loads the dialogs, then the outbox and
# the jobs; replies of updates not marked done are dropped, as those updates are handled again.
#
# The database going down: Database.ok turns False, the error is logged once, and every call raises
# DatabaseUnavailable at once.  Updates are then acknowledged from memory, dialogs and replies held there
# (degraded, /health says so), by the holder while its lease is trusted (its claims fail meanwhile: another
# instance may still reach the database) or by a process that never reached one; a passive one answers 503.
# The database is reopened every DB_RETRY_S; back, the lease is claimed first, then what memory queued is
# written.  A row the database refuses (RowRejected) fails alone, and is not retried.
#
# A kill -9 ... before an update's commit: no 200, Telegram sends it again.  After it: the next holder handles
# the update from the inbox, in order per chat; a reply already sent may go again (its send and the deletion of
# its row, or its update's done mark, are not one step).  Mid-job: the job resumes from its row; credits a job
# spent and ended without a picture are returned when the next holder takes over (ledger_unreturned).  Nothing
# is reported written before COMMIT returns.
###############################################################################

# Longer than this counts as "locked too long": the write fails and the ack goes to memory (degraded).
# The webhook's ack budget is ~100 ms; SQLite's busy handler retries within it, so another process holding
# the lock for a few tens of milliseconds is waited out.
SQLITE_BUSY_TIMEOUT_MS = 100
# Opening waits longer (no ack waits on it): a live holder's commit, slow on a busy machine, must not make a
# starting instance count its database as never usable and act beside the holder (Role.acting_left).
SQLITE_OPEN_BUSY_TIMEOUT_S = 1.0
# FULL: an acknowledged update survives an OS crash or power loss too, not only a kill (NORMAL would not, in WAL
# mode); bench/durability.py measures what the fsync per commit costs.
SQLITE_SYNCHRONOUS = "FULL"
INBOX_KEEP_DONE_S = 26 * 3600  # Telegram redelivers for up to 24 h; keep ids to drop duplicates

# Each entry upgrades the schema by one version (SQLite's PRAGMA user_version, PostgreSQL's schema_version table).
# Append new versions, additive only (see above); never edit a released one.  Types INTEGER, REAL, TEXT, BLOB
# only: PostgreSQL gets them translated.  A change older bots could not live with adds
# "INSERT INTO schema_readers(oldest) VALUES (<its version>)".
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
    [  # 2: generation jobs (columns mirror the Job dataclass in section 12)
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
    [  # 3: the lease that makes one process on this database the active one (section 14)
        """CREATE TABLE lease (
               name        TEXT PRIMARY KEY,
               owner       TEXT NOT NULL,
               acquired_at REAL NOT NULL,
               expires_at  REAL NOT NULL)""",
    ],
    [  # 4: the language a user chose with /language (without a row: Telegram's language_code decides)
        """CREATE TABLE user_languages (
               user_id   INTEGER PRIMARY KEY,
               lang      TEXT NOT NULL,
               chosen_at REAL NOT NULL)""",
    ],
    [  # 5: a chat's unhandled updates, found without reading the others' (inbox_unhandled_before)
        "CREATE INDEX inbox_chat_pending ON inbox(chat_key, update_id) WHERE done_at IS NULL",
    ],
    [  # 6: messages the dialog queued and Telegram has not taken yet (section 13)
        """CREATE TABLE outbox (
               id        INTEGER PRIMARY KEY,
               chat_id   INTEGER NOT NULL,
               method    TEXT NOT NULL,
               params    TEXT NOT NULL,
               queued_at REAL NOT NULL,
               update_id INTEGER)""",
    ],
    [  # 7: dialogs by (chat, user), replacing conversations (by user: a row becomes the user's private chat)
        """CREATE TABLE dialogs (
               chat_id    INTEGER NOT NULL,
               user_id    INTEGER NOT NULL,
               state      TEXT NOT NULL,
               updated_at REAL NOT NULL,
               PRIMARY KEY (chat_id, user_id))""",
        "CREATE INDEX dialogs_idle ON dialogs(updated_at)",
        "INSERT INTO dialogs SELECT user_id, user_id, state, updated_at FROM conversations",
    ],
    [  # 8: the Stars credits ledger: every change of a user's credits, keyed by what caused it
        """CREATE TABLE credits (
               entry   TEXT PRIMARY KEY,
               kind    TEXT NOT NULL,
               user_id INTEGER NOT NULL,
               credits INTEGER NOT NULL,
               stars   INTEGER NOT NULL,
               at      REAL NOT NULL)""",
        "CREATE INDEX credits_user ON credits(user_id)",
    ],
    [  # 9: a user's /settings, a JSON object (without a row: the defaults, "ask every time")
        """CREATE TABLE user_settings (
               user_id    INTEGER PRIMARY KEY,
               settings   TEXT NOT NULL,
               updated_at REAL NOT NULL)""",
    ],
    [  # 10: the Telegram file id of the photo an edit job changes ('' for a picture drawn from words)
        "ALTER TABLE jobs ADD COLUMN image TEXT NOT NULL DEFAULT ''",
    ],
    [  # 11: dialogs by (chat, forum topic, user) beside the table of 7, which bots before 11 go on writing
        """CREATE TABLE topic_dialogs (
               chat_id    INTEGER NOT NULL,
               thread_id  INTEGER NOT NULL,
               user_id    INTEGER NOT NULL,
               state      TEXT NOT NULL,
               updated_at REAL NOT NULL,
               PRIMARY KEY (chat_id, thread_id, user_id))""",
        "CREATE INDEX topic_dialogs_idle ON topic_dialogs(updated_at)",
        "INSERT INTO topic_dialogs SELECT chat_id, 0, user_id, state, updated_at FROM dialogs",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)


class DatabaseUnavailable(TrtError):
    """The database cannot be used right now; callers fall back to memory."""


class RowRejected(TrtError):
    """The database refused a row for what it holds (a number out of range, text it cannot encode); it is fine."""


DATABASE_FILE_SUFFIXES = ("", "-wal", "-shm")  # the files SQLite writes in WAL mode, through handles it keeps open


def fits_sqlite_integer(value: object) -> bool:
    return isinstance(value, int) and -(2**63) <= value < 2**63  # INTEGER is a signed 64-bit number


def file_identity(path: str) -> tuple | None:
    """(st_dev, st_ino) of the database file and its -wal and -shm (None for ``:memory:``): a changed identity
    is how a file deleted or replaced under the bot is noticed."""
    if path == ":memory:":
        return None
    return tuple(_inode(path + suffix) for suffix in DATABASE_FILE_SUFFIXES)


def _inode(path: str) -> tuple[int, int] | str | None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:  # cannot see the file, so cannot vouch for it
        return f"unreadable ({error.strerror})"
    return status.st_dev, status.st_ino


def _switch_to_wal(conn: sqlite3.Connection, deadline: float) -> sqlite3.Cursor:
    # While another connection writes a file not yet in WAL mode (instances opening a new file together do),
    # SQLite answers "locked" at once here, skipping its busy handler (the wait could deadlock): retried.
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.OperationalError):
            return conn.execute("PRAGMA journal_mode=WAL")
        time.sleep(0.002)  # on the database thread (Database._on_thread): the event loop goes on
    return conn.execute("PRAGMA journal_mode=WAL")  # the last try: its error is the one reported


def migrate(conn: Any, dialect: SqliteFile | PostgresServer) -> None:
    """In a transaction, apply the dialect's ``migrations`` the schema lacks (a newer schema is left as it is);
    TrtError when the stored schema needs a bot that knows a newer version."""
    known = len(dialect.migrations)
    version = dialect.schema_version(conn)
    conn.execute(dialect.ddl("CREATE TABLE IF NOT EXISTS schema_readers (oldest INTEGER NOT NULL)"))
    oldest_reader = conn.execute("SELECT coalesce(max(oldest), 1) FROM schema_readers").fetchone()[0]
    if oldest_reader > known:
        raise TrtError(f"database schema v{version} needs a bot that knows schema v{oldest_reader} or newer; "
                       f"this one knows v{known}")
    for number in range(version + 1, known + 1):
        for statement in dialect.migrations[number - 1]:
            conn.execute(dialect.ddl(statement))
        dialect.set_schema_version(conn, number)


def in_transaction(conn: Any, dialect: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(conn, *args)`` inside one transaction, committed only once the dialect vouches for it."""
    conn.execute(dialect.begin)
    try:
        result = fn(conn, *args)
        dialect.vouch(conn)  # before COMMIT: what is reported written is where a restart will read it
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


# What must outlive the database file being deleted or replaced under us, read from the old file (still open);
# rows the new file already has are kept.
SALVAGED_ROWS = (("inbox", "done_at IS NULL"), ("jobs", "state != 'delivered'"), ("topic_dialogs", "1"),
                 ("outbox", "1"))


def restore_rows(conn: sqlite3.Connection, salvage: dict[str, list[tuple]]) -> int:
    for table, rows in salvage.items():
        if rows:
            marks = ",".join("?" * len(rows[0]))
            conn.executemany(f"INSERT INTO {table} VALUES ({marks}) ON CONFLICT DO NOTHING", rows)
    return sum(map(len, salvage.values()))


class SqliteFile:
    """The SQLite dialect: one file on this host (see the essay above)."""

    begin = "BEGIN IMMEDIATE"
    # Errors about the values of a row, not about the database.  Anything else from SQLite (locked, disk I/O,
    # read-only, full, not a database) makes the database unusable until it is reopened.
    row_errors = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.DataError, sqlite3.ProgrammingError,
                  ValueError, OverflowError, TypeError)
    failures = (sqlite3.Error,)
    fix = "check DATABASE_URL and that its folder exists and is writable (a mounted disk on Render)"

    def __init__(self, path: str, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS, migrations: list = MIGRATIONS):
        self.path = self.where = path
        self.busy_timeout_ms, self.migrations = busy_timeout_ms, migrations
        self._identity: tuple | None = None  # file_identity() when opened
        self._salvage: dict[str, list[tuple]] | None = None  # rows of a lost file, until a new one takes them

    @staticmethod
    def schema_version(conn: sqlite3.Connection) -> int:
        return conn.execute("PRAGMA user_version").fetchone()[0]

    @staticmethod
    def set_schema_version(conn: sqlite3.Connection, number: int) -> None:
        conn.execute(f"PRAGMA user_version={int(number)}")

    ddl = staticmethod(str)  # SQLite takes the migrations as they are written

    def connect(self, previous: sqlite3.Connection | None) -> sqlite3.Connection:
        """Open and migrate the file at ``path``, closing ``previous``; a new file takes what only the lost one held."""
        if previous is not None:
            identity = file_identity(self.path)
            if identity != self._identity:
                self._salvage = self._read_salvage(previous)  # now: the old file is gone once its connection closes
            previous.close()
            if identity is not None and identity[0] != self._identity[0]:  # type: ignore[index]
                self._remove_stale_companions()
        if self.path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        timeout = max(self.busy_timeout_ms / 1000, SQLITE_OPEN_BUSY_TIMEOUT_S)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=timeout)
        try:
            _switch_to_wal(conn, time.monotonic() + timeout)
            conn.execute(f"PRAGMA synchronous={SQLITE_SYNCHRONOUS}")
            self._identity = None  # the new file's, once migrating has made its -wal and -shm
            in_transaction(conn, self, migrate, self)
            conn.execute(f"PRAGMA busy_timeout={self.busy_timeout_ms}")  # every later write: the ack's budget
            self._identity = file_identity(self.path)
            if self._salvage:
                restored = in_transaction(conn, self, restore_rows, self._salvage)
                log.warning("[DB] %d unhandled updates, open jobs and dialogs of the lost file copied into %s",
                            restored, self.path)
        except BaseException:
            conn.close()
            raise
        self._salvage = None
        return conn

    def vouch(self, conn: sqlite3.Connection) -> None:
        if self._identity is not None and file_identity(self.path) != self._identity:
            raise DatabaseUnavailable(f"{self.path} was deleted or replaced: commits to it would not survive a restart")

    check = vouch  # between transactions: the same question

    server_time = staticmethod(lambda conn: None)  # no clock of its own: every process on the file shares this host's

    def _read_salvage(self, conn: sqlite3.Connection) -> dict[str, list[tuple]]:
        try:
            return {table: conn.execute(f"SELECT * FROM {table} WHERE {where}").fetchall()
                    for table, where in SALVAGED_ROWS}
        except sqlite3.Error as error:
            log.error("[DB] the lost database file cannot be read any more (%s); what only it held is gone", error)
            return {}

    def _remove_stale_companions(self) -> None:
        """Delete a -wal or -shm the lost file left (another process on it keeps them alive): paired with a new
        file at ``path``, SQLite would take the old file's pages for the new one's."""
        for suffix, identity in zip(DATABASE_FILE_SUFFIXES[1:], self._identity[1:]):  # type: ignore[index]
            if identity is not None and _inode(self.path + suffix) == identity:
                os.unlink(self.path + suffix)


# -- PostgreSQL: the same SQL, spelled for psycopg --------------------------------

# Set unless DATABASE_URL sets them.  A server that stops answering without closing the connection (a dead host,
# a dropped route) is noticed within seconds by the keepalives and tcp_user_timeout, not after the kernel's two
# hours, so writes fail over to memory instead of hanging.  A transaction a paused process left open ends after
# 5 s: its row locks must not hold up the instance taking over.
POSTGRES_CONNECTION_DEFAULTS = {
    "connect_timeout": "5", "keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2",
    "keepalives_count": "2", "tcp_user_timeout": "5000", "application_name": "trt_bot",
    "options": "-c idle_in_transaction_session_timeout=5000",
}
POSTGRES_MIGRATION_LOCK = 0x7472745F626F74  # pg_advisory_xact_lock key ("trt_bot"): instances migrate one at a time
POSTGRES_TYPES = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION", "BLOB": "BYTEA"}
SQL_TYPE_NAME = re.compile(r"\b(INTEGER|REAL|BLOB)\b", re.IGNORECASE)
SQL_QUOTED = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")""")  # a string literal or a quoted name


@functools.lru_cache(maxsize=1024)
def postgres_sql(sql: str) -> str:
    """SQLite's ``?`` placeholders as psycopg's ``%s``, outside quoted text; every literal ``%`` doubled."""
    parts = SQL_QUOTED.split(sql.replace("%", "%%"))
    return "".join(part if index % 2 else part.replace("?", "%s") for index, part in enumerate(parts))


def postgres_ddl(statement: str) -> str:
    """A migration's column types as PostgreSQL names them (INTEGER is 64-bit in SQLite)."""
    parts = SQL_QUOTED.split(statement)
    return "".join(part if index % 2 else SQL_TYPE_NAME.sub(lambda m: POSTGRES_TYPES[m[1].upper()], part)
                   for index, part in enumerate(parts))


class PostgresServer:
    """The PostgreSQL dialect, through psycopg 3 (imported only here: SQLite alone needs nothing installed), and
    the one connection to it: ``connect`` returns the server itself, which takes the storage functions' SQL
    (``?`` placeholders) as they are, in autocommit mode (transactions are ``in_transaction``'s BEGIN ... COMMIT)."""

    begin = "BEGIN"
    fix = ("check DATABASE_URL (host, port, user, password, database name) and that the server accepts "
           "connections from here")

    def __init__(self, url: str, migrations: list = MIGRATIONS):
        self.psycopg = importlib.import_module("psycopg")
        self.url, self.migrations = url, migrations
        parts = urllib.parse.urlsplit(url)
        self.where = f"postgresql://{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path}"  # no secrets
        # A value out of range, text PostgreSQL cannot hold (NUL), a duplicate key, or one psycopg cannot
        # send.  Anything else (the connection lost, a missing table, no rights) makes it unusable until reopened.
        self.row_errors = (self.psycopg.DataError, self.psycopg.IntegrityError, ValueError, OverflowError, TypeError)
        self.failures = (self.psycopg.Error,)
        status = self.psycopg.pq.TransactionStatus
        self._open_states = {status.INTRANS, status.INERROR}
        self._conn: Any = None  # psycopg's

    @staticmethod
    def schema_version(conn: PostgresServer) -> int:
        conn.execute("SELECT pg_advisory_xact_lock(?)", (POSTGRES_MIGRATION_LOCK,))  # held until COMMIT
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        return conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]

    @staticmethod
    def set_schema_version(conn: PostgresServer, number: int) -> None:
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version(version) VALUES (?)", (number,))

    ddl = staticmethod(postgres_ddl)

    def connect(self, previous: PostgresServer | None) -> PostgresServer:
        if previous is not None:
            previous.close()
        given = self.psycopg.conninfo.conninfo_to_dict(self.url)
        defaults = {key: value for key, value in POSTGRES_CONNECTION_DEFAULTS.items() if key not in given}
        self._conn = self.psycopg.connect(self.url, autocommit=True, **defaults)
        try:
            in_transaction(self, self, migrate, self)
        except BaseException:
            self.close()
            raise
        return self

    def execute(self, sql: str, params: Iterable[Any] = ()) -> Any:
        # A bool would go out as PostgreSQL's boolean, which an INTEGER (BIGINT) column refuses.
        values = [int(value) if isinstance(value, bool) else value for value in params]
        try:
            return self._conn.execute(postgres_sql(sql), values)
        except self.psycopg.ProgrammingError as error:
            if error.sqlstate is not None:  # the server's: a statement it cannot run (a missing table, no rights)
                raise
            raise TypeError(f"a value psycopg cannot send: {error}") from error  # a row's fault, as in SQLite

    def executemany(self, sql: str, rows: Iterable[Iterable[Any]]) -> None:
        # One statement at a time, not psycopg's pipeline: a process stopped mid-pipeline (before its Sync) leaves
        # its session waiting with no idle-in-transaction timeout armed, its row locks blocking the next holder.
        for row in rows:
            self.execute(sql, row)

    @property
    def in_transaction(self) -> bool:
        return self._conn.info.transaction_status in self._open_states

    def close(self) -> None:
        self._conn.close()

    vouch = staticmethod(lambda conn: None)  # nothing to check: the server reports COMMIT once it is durable

    @staticmethod
    def check(conn: PostgresServer) -> None:
        conn.execute("SELECT 1")  # a lost connection is noticed without traffic, then reopened

    @staticmethod
    def server_time(conn: PostgresServer) -> float:
        return float(conn.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0])


class Database:
    """The one database connection, used only from its own thread, so the event loop never waits on the disk, the
    network or a lock.  ``write`` runs ``fn(conn, *args)`` inside one transaction, ``read`` outside one; storage
    functions call only ``conn.execute`` and ``conn.executemany`` and work on both dialects.

    Group commit: items many coroutines ``submit`` (a future gets the item's result) or ``add`` with the same
    ``write_batch(conn, items)`` (a result per item) share transactions.  While one batch is written new items gather
    into the next, so under load one commit (one fsync, one thread hop) serves many.  A row the database refuses fails
    alone: the batch is split in halves until it is found (RowRejected).  ``batched`` sets who hears of each batch.
    """

    def __init__(self, location: str, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS, migrations: list = MIGRATIONS):
        # parse_database_url's answer: a PostgreSQL URL or a SQLite file's path
        self.dialect: SqliteFile | PostgresServer = (PostgresServer(location, migrations)
                                                     if location.startswith(POSTGRES_SCHEMES)
                                                     else SqliteFile(location, busy_timeout_ms, migrations))
        self.where = self.dialect.where  # the file's path or the server's address and database, no credentials
        self.ok = self.opened = False  # opened: usable once, so possibly shared with another instance
        self.last_error = "not opened yet"
        self.tried = asyncio.Event()  # set once the first open has succeeded or failed
        self._passwords = database_passwords(location)  # kept out of last_error and the log
        self._conn: Any = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="trt-db")
        # Group commit, by write function: items waiting, the task writing them, (on_batch, max_batch), batches done.
        self._pending: dict[Callable, list[tuple[Any, asyncio.Future | None]]] = collections.defaultdict(list)
        self._writers: dict[Callable, asyncio.Task] = {}
        self._batching: dict[Callable, tuple[Callable | None, int]] = collections.defaultdict(lambda: (None, 500))
        self.batches: collections.Counter[Callable] = collections.Counter()

    async def open(self) -> bool:
        """Open or reopen; on failure log loudly and stay unavailable (never raise)."""
        try:
            return await self._on_thread(self._open)
        finally:
            self.tried.set()

    async def verify(self) -> bool:
        """Whether the database is still there and still the one written; if not, it turns unusable."""
        try:
            await self.read(self.dialect.check)
        except DatabaseUnavailable:
            return False
        return True

    async def write(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.read(in_transaction, self.dialect, fn, *args)

    async def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        if not self.ok:  # calls already queued fail at once too, without waiting on a lock
            raise DatabaseUnavailable(self.last_error)
        return await self._on_thread(self._with_connection, fn, *args)

    async def close(self) -> None:
        try:
            await self._on_thread(self._close)
        finally:
            self._thread.shutdown(wait=False)

    async def _on_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _with_connection(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._conn is None or not self.ok:  # queued behind the call that failed
            raise DatabaseUnavailable(self.last_error)
        try:
            return fn(self._conn, *args)
        except self.dialect.row_errors as error:
            raise RowRejected(f"{type(error).__name__}: {error}") from error
        except (*self.dialect.failures, DatabaseUnavailable) as error:
            self._mark_broken(error)
            raise DatabaseUnavailable(self.last_error) from error

    def _open(self) -> bool:
        previous, self._conn = self._conn, None
        try:
            self._conn = self.dialect.connect(previous)
        except (*self.dialect.failures, OSError, TrtError) as error:
            self._mark_broken(error)
            return False
        self.ok, self.last_error, self.opened = True, "", True
        return True

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _mark_broken(self, error: BaseException) -> None:
        message = mask_secrets(str(error).strip() or type(error).__name__, self._passwords)
        if self.ok or self.last_error == "not opened yet":
            log.error("[DB] unusable, running degraded (memory only): %s", message)
        self.ok, self.last_error = False, message

    def batched(self, write_batch: Callable[[Any, list], list],
                on_batch: Callable[[list, BaseException | None], None] | None = None, max_batch: int = 500) -> None:
        self._batching[write_batch] = on_batch, max_batch

    def submit(self, write_batch: Callable[[Any, list], list], item: Any) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.add(write_batch, item, future)
        return future

    def add(self, write_batch: Callable[[Any, list], list], item: Any, future: asyncio.Future | None = None) -> None:
        self._pending[write_batch].append((item, future))
        if write_batch not in self._writers:
            self._writers[write_batch] = asyncio.create_task(self._write_pending(write_batch))

    async def settled(self, write_batch: Callable[[Any, list], list], timeout: float) -> None:
        """Wait at most ``timeout`` seconds for what ``write_batch`` has queued so far to be written (or fail)."""
        if write_batch in self._writers:
            await asyncio.wait({self._writers[write_batch]}, timeout=timeout)

    async def _write_pending(self, write_batch: Callable) -> None:
        pending, max_batch = self._pending[write_batch], self._batching[write_batch][1]
        try:
            while pending:
                batch, pending[:] = pending[:max_batch], pending[max_batch:]
                await self._write_batch(write_batch, batch)
        finally:
            del self._writers[write_batch]

    async def _write_batch(self, write_batch: Callable, batch: list[tuple[Any, asyncio.Future | None]]) -> None:
        items = [item for item, _ in batch]
        error: BaseException | None = None
        try:
            results = await self.write(write_batch, items)
        except RowRejected as refused:
            if len(batch) > 1:
                for half in (batch[:len(batch) // 2], batch[len(batch) // 2:]):
                    await self._write_batch(write_batch, half)
                return
            log.error("[DB] %s refused a row, the rest of its batch is written: %s", write_batch.__name__, refused)
            error = refused
        except Exception as failed:
            error = failed
        else:
            self.batches[write_batch] += 1
        for index, (_, future) in enumerate(batch):
            if future is not None and not future.done():
                if error is None:
                    future.set_result(results[index])
                else:
                    future.set_exception(error)
        on_batch = self._batching[write_batch][0]
        if on_batch is not None:
            on_batch(items, error)


@dataclasses.dataclass(slots=True)
class InboxItem:
    """One update on its way from the webhook to a handler; once handled (``done``), it is written as its done mark."""

    update_id: int
    chat_key: int
    update: dict
    body: bytes
    received_at: float  # wall clock, for the row
    arrived: float | None = None  # on the monotonic clock, when this process took it (None: read from the table)
    durable: bool = True
    # Set for an update about to go straight to the workers: its insert also reads into ``older`` the ids of
    # its chat's older unhandled updates, which another instance may have stored.
    ask_older: bool = False
    older: tuple[int, ...] = ()
    queued_after: int = 0  # how many updates had been left to the inbox (Inbox.leaves) when it was queued
    done: bool = False  # handled: written as a done mark, not inserted
    user_id: int = 0  # its sender and their language, remembered in ``users`` with the done mark
    lang: str = ""
    blocked: bool = False  # our reply found the sender blocking the bot


INBOX_INSERT_ROWS = 200  # updates per INSERT statement: 800 parameters, well under SQLite's limit (32766)


def inbox_insert(conn: Any, items: list[InboxItem]) -> list[bool]:
    """Insert updates; per item, True if new, False if the update_id was seen (or came earlier in ``items``).

    One statement per INBOX_INSERT_ROWS updates, not one per update: on PostgreSQL each statement is a network round
    trip inside the ack's commit.  Rows go in update_id order: instances inserting the same ids at once take their
    locks in one order, so neither waits on the other in a cycle (PostgreSQL would abort one as a deadlock).
    """
    ordered = sorted(range(len(items)), key=lambda index: items[index].update_id)
    inserted: set[int] = set()
    for start in range(0, len(ordered), INBOX_INSERT_ROWS):
        chunk = [items[index] for index in ordered[start:start + INBOX_INSERT_ROWS]]
        rows = ",".join(["(?,?,?,?)"] * len(chunk))
        values = [value for item in chunk for value in (item.update_id, item.chat_key, item.body, item.received_at)]
        inserted.update(update_id for (update_id,) in conn.execute(
            f"INSERT INTO inbox(update_id, chat_key, body, received_at) VALUES {rows} "
            "ON CONFLICT(update_id) DO NOTHING RETURNING update_id", values).fetchall())
    results = []
    for item in items:
        results.append(item.update_id in inserted)
        inserted.discard(item.update_id)  # a second copy in the same batch is a duplicate
    return results


def inbox_mark_done(conn: sqlite3.Connection, marks: list[InboxItem]) -> list[None]:
    now = time.time()
    conn.executemany("UPDATE inbox SET done_at=? WHERE update_id=?", [(now, m.update_id) for m in marks])
    # last_seen is kept to the hour, so most updates of a known user write nothing.
    conn.executemany("""INSERT INTO users(user_id, lang, first_seen, last_seen, blocked) VALUES (?,?,?,?,?)
           ON CONFLICT(user_id) DO UPDATE SET last_seen=excluded.last_seen, blocked=excluded.blocked,
               lang=CASE WHEN excluded.lang='' THEN users.lang ELSE excluded.lang END
           WHERE users.blocked != excluded.blocked OR users.last_seen < excluded.last_seen - 3600
               OR (excluded.lang != '' AND users.lang != excluded.lang)""",
                     [(m.user_id, m.lang, now, now, int(m.blocked)) for m in marks if m.user_id])
    return [None] * len(marks)


def inbox_write_reading_older(conn: sqlite3.Connection, entries: list) -> list:
    """Updates, the outbox's writes and done marks in one transaction: per entry, is-new for an update, else None.

    A handler's replies go in before its update's mark (never the mark without them).  Each new update that
    ``ask_older`` gets in ``older`` its chat's older unhandled ids, read in the same transaction (no round trip).
    """
    marks = [entry for entry in entries if isinstance(entry, InboxItem) and entry.done]
    news = iter(inbox_insert(conn, [entry for entry in entries if isinstance(entry, InboxItem) and not entry.done]))
    outbox_write(conn, [entry for entry in entries if isinstance(entry, (OutboxMessage, tuple))])
    if marks:
        inbox_mark_done(conn, marks)
    results = [next(news) if isinstance(entry, InboxItem) and not entry.done else None for entry in entries]
    for entry, is_new in zip(entries, results):
        if is_new and entry.ask_older:
            entry.older = tuple(inbox_unhandled_before(conn, entry.chat_key, entry.update_id))
    return results


def inbox_pending(conn: sqlite3.Connection, limit: int) -> list[tuple[int, int, bytes, float]]:
    return conn.execute("SELECT update_id, chat_key, body, received_at FROM inbox WHERE done_at IS NULL "
                        "ORDER BY update_id LIMIT ?", (limit,)).fetchall()


def inbox_unhandled(conn: sqlite3.Connection) -> list[tuple[int, int]]:
    return conn.execute("SELECT update_id, chat_key FROM inbox WHERE done_at IS NULL").fetchall()


def inbox_unhandled_before(conn: sqlite3.Connection, chat_key: int, update_id: int) -> list[int]:
    """The ids of the chat's unhandled updates older than ``update_id`` (this instance's or another's)."""
    return [row[0] for row in conn.execute("SELECT update_id FROM inbox WHERE done_at IS NULL AND update_id < ? "
                                           "AND chat_key = ?", (update_id, chat_key)).fetchall()]


def inbox_prune(conn: sqlite3.Connection, older_than: float) -> int:
    return conn.execute("DELETE FROM inbox WHERE done_at IS NOT NULL AND done_at < ?", (older_than,)).rowcount


def store_choice(conn: sqlite3.Connection, table: str, user_id: int, value: str | dict) -> None:
    """A user's /language (``table`` user_languages) or /settings (user_settings, a dict stored as JSON)."""
    column, at = ("lang", "chosen_at") if table == "user_languages" else ("settings", "updated_at")
    conn.execute(f"""INSERT INTO {table}(user_id, {column}, {at}) VALUES (?,?,?)
                     ON CONFLICT(user_id) DO UPDATE SET {column}=excluded.{column}, {at}=excluded.{at}""",
                 (user_id, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False), time.time()))


# A dialog untouched this long is abandoned: it leaves memory and the database (its buttons answer as stale).
DIALOG_IDLE_S = 24 * 3600.0
DIALOGS_MAX = 50_000  # beyond this the longest untouched dialog goes first: each can hold a prompt of a few KB
DialogKey = tuple[int, int, int]  # (chat id, forum topic or 0, user id): a user's dialogs in two chats are apart


def dialogs_load(conn: sqlite3.Connection, since: float) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """The dialogs written since ``since`` (the oldest first), and every user's language and /settings."""
    return (conn.execute("SELECT chat_id, thread_id, user_id, updated_at, state FROM topic_dialogs "
                         "WHERE updated_at > ? ORDER BY updated_at", (since,)).fetchall(),
            conn.execute("SELECT user_id, lang FROM user_languages").fetchall(),
            conn.execute("SELECT user_id, settings FROM user_settings").fetchall())


def dialogs_save(conn: sqlite3.Connection, items: list[tuple[DialogKey, dict | None, float]]) -> list[None]:
    """Each dialog's new state (None: ended) as of when it was set; abandoned ones go."""
    for key, state, at in items:
        if state is None:
            conn.execute("DELETE FROM topic_dialogs WHERE chat_id=? AND thread_id=? AND user_id=?", key)
        else:
            conn.execute("""INSERT INTO topic_dialogs VALUES (?,?,?,?,?) ON CONFLICT(chat_id, thread_id, user_id)
                            DO UPDATE SET state=excluded.state, updated_at=excluded.updated_at""",
                         (*key, json.dumps(state, ensure_ascii=False), at))
    conn.execute("DELETE FROM topic_dialogs WHERE updated_at <= ?", (items[-1][2] - DIALOG_IDLE_S,))
    return [None] * len(items)


# -- the Stars credits ledger ----------------------------------------------------
#
# A row per change of a user's credits, keyed by its cause, so each is made once however often asked for: "paid:
# <charge id>" (+ a pack), "spent:<job id>" (- a picture's cost), "returned:<job id>" (+ what a job that delivered
# no picture spent), "refunded:<charge id>" (- what is left of the pack).  A balance is the sum of a user's rows.

LEDGER_KINDS = ("paid", "spent", "returned", "refunded")


def ledger_balance(conn: sqlite3.Connection, user_id: int) -> int:
    return int(conn.execute("SELECT COALESCE(SUM(credits), 0) FROM credits WHERE user_id=?", (user_id,)).fetchone()[0])


def ledger_entry(conn: sqlite3.Connection, entry: str) -> tuple[int, int] | None:
    return conn.execute("SELECT user_id, credits FROM credits WHERE entry=?", (entry,)).fetchone()


def _ledger_row(conn: sqlite3.Connection, kind: str, key: str, *args: int) -> tuple[int, int, int] | None:
    """(user, credits, stars) of the change ``kind:key``; None when it changes nothing."""
    match kind, args:
        case "paid", (user_id, credits, stars):
            return user_id, credits, stars
        case "spent", (user_id, cost):
            return (user_id, -cost, 0) if ledger_balance(conn, user_id) >= cost else None
        case "returned", ():
            spent = ledger_entry(conn, f"spent:{key}")
            return None if spent is None else (spent[0], -spent[1], 0)
        case "refunded", ():
            paid = ledger_entry(conn, f"paid:{key}")
            return None if paid is None else (paid[0], -max(0, min(paid[1], ledger_balance(conn, paid[0]))), 0)
    raise ValueError(f"not a ledger change: {kind} {args}")


def ledger_write(conn: sqlite3.Connection, changes: list[tuple]) -> tuple[list[tuple], dict[int, int]]:
    """Make the changes (kind, key, *arguments) not made before: the rows written and their users' new balances."""
    written = []
    for kind, key, *args in changes:
        row = _ledger_row(conn, kind, key, *args)
        if row is not None and conn.execute("INSERT INTO credits VALUES (?,?,?,?,?,?) ON CONFLICT(entry) DO NOTHING",
                                            (f"{kind}:{key}", kind, *row, time.time())).rowcount == 1:
            written.append((kind, key, *row))
    return written, {user_id: ledger_balance(conn, user_id) for _, _, user_id, *_ in written}


def ledger_unreturned(conn: sqlite3.Connection) -> list[str]:
    """Jobs that spent credits, ended without a picture delivered, and got nothing back (a kill -9 came between)."""
    return [row[0] for row in conn.execute("""SELECT j.id FROM credits c JOIN jobs j ON c.entry = 'spent:' || j.id
        WHERE (j.state = 'cancelled' OR (j.state = 'delivered' AND (j.outcome != 'success' OR j.error = 'delivery')))
          AND NOT EXISTS (SELECT 1 FROM credits r WHERE r.entry = 'returned:' || j.id)""").fetchall()]


def ledger_balances(conn: sqlite3.Connection) -> dict[int, int]:
    rows = conn.execute("SELECT user_id, SUM(credits) FROM credits GROUP BY user_id").fetchall()
    return {user_id: int(total) for user_id, total in rows}


###############################################################################
# 6. Retry and pacing
#    Owns how a failing call is tried again (which failures, how long to back
#    off, for how long in all) and how calls are spaced out to keep under a
#    service's rate limit.  The services' own rules live with their clients.
###############################################################################

@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """When a failed call is tried again: transient failures, with backoff, within a time budget.

    ``retry_on`` are the exception types the policy judges (anything else propagates at once) and
    ``transient`` says which of those can get better by asking again.  A failure may say how long to wait
    (``retry_after``, e.g. a 429's); otherwise the wait backs off exponentially from ``base_s`` up to
    ``cap_s``, with full jitter so calls that failed together do not come back together (``jittered=False``:
    exactly 1, 2, 4 ... ``cap_s``).  A wait that would end past ``budget_s`` means giving up: ``0`` is one
    try, ``math.inf`` never gives up.
    """

    budget_s: float = math.inf
    base_s: float = 1.0
    cap_s: float = 60.0
    retry_on: tuple[type[Exception], ...] = (Exception,)
    transient: Callable[[Exception], bool] = lambda error: True
    retry_after: Callable[[Exception], float | None] = lambda error: None
    jittered: bool = True

    def delay(self, error: Exception, retry: int, remaining_s: float,
              jitter: Callable[[float, float], float] = random.uniform) -> float | None:
        """Seconds to wait before retry number ``retry`` (1, 2, ...); None: raise ``error`` now."""
        if not self.transient(error) or remaining_s <= 0:
            return None
        wait = self.retry_after(error)
        if wait is None:
            ceiling = min(self.cap_s, self.base_s * 2 ** (retry - 1))
            wait = jitter(0.0, ceiling) if self.jittered else ceiling
        return wait if wait <= remaining_s else None


ONE_TRY = RetryPolicy(budget_s=0)  # a failure is reported, not waited out (``python trt_bot.py check``)


async def call_with_retries(attempt: Callable[[], Awaitable[Any]], policy: RetryPolicy, *, clock: Clock = SYSTEM_CLOCK,
                            on_retry: Callable[[Exception, int, float], None] = lambda error, retry, wait: None) -> Any:
    """``await attempt()`` until it succeeds or ``policy`` says to give up, then raise its last error;
    ``on_retry(error, retry number, seconds)`` runs before each wait (to log it)."""
    deadline = clock.monotonic() + policy.budget_s
    for retry in itertools.count(1):
        try:
            return await attempt()
        except policy.retry_on as error:
            wait = policy.delay(error, retry, deadline - clock.monotonic())
            if wait is None:
                raise
            on_retry(error, retry, wait)
        await clock.sleep(wait)


class RateLimiter:
    """At most ``calls`` acquisitions per ``period`` seconds, shared by every caller."""

    def __init__(self, calls: int, period: float, clock: Clock = SYSTEM_CLOCK):
        self.period = period
        self.clock = clock
        self._stamps: collections.deque[float] = collections.deque(maxlen=calls)  # the last ``calls`` acquisitions
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while len(self._stamps) == self._stamps.maxlen:  # the next may go a period after the oldest of them
                if (wait := self._stamps[0] + self.period - self.clock.monotonic()) <= 0:
                    break
                await self.clock.sleep(wait)
            self._stamps.append(self.clock.monotonic())


###############################################################################
# 7. Telegram client
#    Owns talking to the Bot API: one shared httpx client (its Bot API and Kie
#    calls carried by StreamCalls, our HTTP/1.1 over asyncio streams), response
#    parsing, which failures are retried (TELEGRAM_RETRY), sends paced at
#    Telegram's limits.  The token lives only in request URLs.
###############################################################################

TELEGRAM_TIMEOUT = httpx.Timeout(connect=5.0, read=30.0, write=30.0, pool=10.0)


class StreamCalls(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio streams for the Bot API and Kie calls: httpx builds each request and decodes each
    answer (Content-Encoding too), this carries the bytes, for a fraction of the CPU of httpx's own transport.

    Invariants: at most ``max_connections`` open, a slot each (an idle one of another origin is closed to free
    one).  A connection is pooled again only once its answer was read to the end without ``Connection: close``;
    any other end (an error, a cancellation) closes it; a pooled one whose EOF has come is dropped before use.
    Every wait has its timeout (the whole answer: the read one), every answer a bound.  UNSENT_REQUEST_ERRORS
    only before the first byte of the request is written; after that, a lost answer: ReadError,
    RemoteProtocolError, ReadTimeout or WriteTimeout."""

    MAX_ANSWER_BYTES = 64 * 2**20

    def __init__(self, max_connections: int, tls: ssl.SSLContext):
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[str, str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._tls = tls

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        url = request.url
        origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        reader, writer = await self._connection(origin, timeout)
        reusable = False
        try:
            body = await request.aread()  # a multipart upload too: httpx built it, with its Content-Length
            if "transfer-encoding" in request.headers:  # a stream of unknown length: sent as one chunk
                body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
            head = b"".join(b"%s: %s\r\n" % header for header in request.headers.raw)  # Host among them
            writer.write(b"%s %s HTTP/1.1\r\n%s\r\n%s" % (request.method.encode(), url.raw_path, head, body))
            if writer.transport.get_write_buffer_size():  # (else it all went out at once)
                try:
                    async with asyncio.timeout(timeout.get("write")):
                        await writer.drain()
                except TimeoutError:
                    raise httpx.WriteTimeout("the request was not sent within the write timeout") from None
            async with asyncio.timeout(timeout.get("read")):
                status, headers, content, reusable = await self._read_answer(reader, request.method)
        except TimeoutError:  # (an OSError: caught first)
            raise httpx.ReadTimeout("no whole answer within the read timeout") from None
        except (OSError, EOFError) as error:
            raise httpx.ReadError(str(error) or type(error).__name__) from error  # it may have gone out
        except (ValueError, asyncio.LimitOverrunError) as error:
            raise httpx.RemoteProtocolError(f"not an HTTP answer: {error}") from error
        finally:
            if reusable:
                self._idle.setdefault(origin, []).append((reader, writer))
            else:
                self._close(writer)
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content), request=request)

    async def _connection(self, origin: tuple[str, str, int], timeout: Mapping[str, float | None]
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An idle connection to ``origin`` the server has not closed, else a new one."""
        idle = self._idle.get(origin, [])
        while idle:
            reader, writer = idle.pop()
            if not reader.at_eof():
                return reader, writer
            self._close(writer)
        if self._slots.locked() and (other := next((pool for pool in self._idle.values() if pool), None)):
            self._close(other.pop(0)[1])
        try:
            async with asyncio.timeout(timeout.get("pool")):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no connection free within the pool timeout") from None
        scheme, host, port = origin
        try:
            async with asyncio.timeout(timeout.get("connect")):
                return await asyncio.open_connection(host, port, ssl=self._tls if scheme == "https" else None,
                                                     server_hostname=host if scheme == "https" else None)
        except BaseException as error:
            self._slots.release()
            if isinstance(error, TimeoutError):
                raise httpx.ConnectTimeout(f"no connection to {host} within the connect timeout") from None
            if isinstance(error, OSError):
                raise httpx.ConnectError(str(error)) from error
            raise

    async def _read_answer(self, reader: asyncio.StreamReader, method: str
                           ) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
        """Status, headers, body, and whether the connection may carry another call; 1xx answers skipped."""
        status = 100
        while 100 <= status < 200:
            lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[:-2]
            version, status_text = lines[0].split(b" ", 2)[:2]
            status = int(status_text) if version.startswith(b"HTTP/1.") else -1
            if status < 100:
                raise ValueError(lines[0][:80])
        headers = [(name.strip(), value.strip()) for name, value in (line.split(b":", 1) for line in lines[1:])]
        fields = {name.lower(): value.lower() for name, value in headers}
        keep_alive = version == b"HTTP/1.1" and b"close" not in fields.get(b"connection", b"")
        if method == "HEAD" or status in (204, 304):
            return status, headers, b"", keep_alive
        if b"chunked" in fields.get(b"transfer-encoding", b""):
            body = bytearray()
            while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
                body += (await reader.readexactly(self._bounded(size, len(body)) + 2))[:-2]
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, not kept
                pass
            return status, headers, bytes(body), keep_alive
        if b"content-length" in fields:
            return status, headers, await reader.readexactly(self._bounded(int(fields[b"content-length"]))), keep_alive
        body = bytearray()  # neither: the body ends with the connection
        while part := await reader.read(2**16):
            self._bounded(len(part), len(body))
            body += part
        return status, headers, bytes(body), False

    def _bounded(self, size: int, so_far: int = 0) -> int:
        if not 0 <= size <= self.MAX_ANSWER_BYTES - so_far:
            raise httpx.RemoteProtocolError(f"an answer body over {self.MAX_ANSWER_BYTES} bytes")
        return size

    def _close(self, writer: asyncio.StreamWriter) -> None:
        writer.close()
        self._slots.release()

    async def aclose(self) -> None:
        for pool in self._idle.values():
            while pool:
                self._close(pool.pop()[1])


def bot_http_client(api_bases: Iterable[str]) -> httpx.AsyncClient:
    """The bot's httpx client: calls to ``api_bases`` (the Bot API, Kie) over StreamCalls; everything else
    (result downloads, with their pinned address and SNI) over httpx's own transport."""
    tls = ssl.create_default_context(cafile=certifi.where())  # the CA bundle loaded once, for both transports
    calls = StreamCalls(max_connections=100, tls=tls)
    mounts = {f"{part.scheme}://{part.netloc}": calls for part in map(urllib.parse.urlsplit, api_bases)}
    return httpx.AsyncClient(timeout=TELEGRAM_TIMEOUT, verify=tls, mounts=mounts)


class TelegramError(TrtError):
    """The Bot API refused a call (``error_code`` as Telegram gives it, or the HTTP status)."""

    maybe_performed = False  # only a lost answer (TelegramNetworkError) leaves the call perhaps carried out

    def __init__(self, method: str, error_code: int, description: str, retry_after: float | None = None,
                 moved_to: int | None = None):
        super().__init__(f"{method}: {error_code} {description}")
        self.method = method
        self.error_code = error_code
        self.description = description
        self.retry_after = retry_after
        self.moved_to = moved_to  # the group became this supergroup (migrate_to_chat_id)

    @property
    def retryable(self) -> bool:
        return self.error_code == 429 or self.error_code >= 500


# Failures before the request left us: Telegram cannot have performed the call.
UNSENT_REQUEST_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class TelegramNetworkError(TelegramError):
    """The call did not get an answer (connection refused, timeout, reset).  ``maybe_performed``: the request
    may have reached Telegram and been carried out, only its answer lost (a read timeout, a dropped connection)."""

    def __init__(self, method: str, cause: BaseException):
        super().__init__(method, 599, f"network error ({type(cause).__name__})")
        self.maybe_performed = not isinstance(cause, UNSENT_REQUEST_ERRORS)


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
    parameters = payload.get("parameters") if isinstance(payload.get("parameters"), dict) else {}
    retry_after, moved_to = parameters.get("retry_after"), parameters.get("migrate_to_chat_id")
    if isinstance(retry_after, bool) or not isinstance(retry_after, (int, float)) or not retry_after >= 0:
        retry_after = None
    raise TelegramError(method, error_code if isinstance(error_code, int) else status_code,
                        str(payload.get("description", "")), retry_after,
                        moved_to if isinstance(moved_to, int) and not isinstance(moved_to, bool) else None)


# Answers that refuse the token itself (revoked, or never valid), whatever the method.
TOKEN_REJECTED_CODES = (401, 404)


def _telegram_wait_asked(error: TelegramError) -> float | None:
    """A 429 waits what Telegram asks (a second if its answer did not say); other failures back off."""
    if error.error_code != 429:
        return None
    return float(error.retry_after if error.retry_after is not None else 1)


# 429, 5xx, network errors and timeouts are transient; anything else (400, 403, 404, ...) cannot get
# better by asking again.  20 s is long enough to ride out a Bot API hiccup or a short flood wait; short
# enough that a reply's retries end inside the 30 s handler timeout, and a 429 asking for more is raised,
# not slept through.  Backoff: first retry within 0.5 s, then 1, 2, 4, never more than 8 s between tries.
TELEGRAM_RETRY = RetryPolicy(budget_s=20.0, base_s=0.5, cap_s=8.0, retry_on=(TelegramError,),
                             transient=lambda error: error.retryable, retry_after=_telegram_wait_asked)


# Methods that put something into a chat, paced at Telegram's limits.  sendChatAction and
# deleteMessage are paced too: Telegram floods them like messages, and a 429 on any call stops
# the whole bot.  answerCallbackQuery is exempt (Telegram does not count it, and a button's
# spinner must stop at once); so is everything that reads or configures.
PACED_METHODS = frozenset({
    "sendMessage", "sendPhoto", "sendDocument", "sendMediaGroup", "sendChatAction", "copyMessage",
    "forwardMessage", "editMessageText", "editMessageCaption", "editMessageMedia", "editMessageReplyMarkup",
    "deleteMessage",
})


PACER_PRUNE_AT = 1024  # chats remembered before those whose spacing has passed are forgotten
GROUP_WINDOW_S = 60.0  # Telegram counts a group's messages per minute
# A send the loop woke late, by up to this, keeps its place in the schedule: else each late wake is lost, which at
# 1,000 sends/s took an eighth of the rate.  Any second then holds at most rate * (1 + PACE_SLACK_S) + 1 sends.
PACE_SLACK_S = 0.01


class TelegramClient:
    """Calls Bot API methods, retrying transient failures as ``retry`` says.

    400/403/404 are raised at once as TelegramError: retrying cannot help.
    A call whose answer was lost (a timeout, a dropped connection) is sent
    again although Telegram may have performed it: a message can then arrive
    twice, but is never lost (the pipeline's promise too).  With
    ``repeatable=False`` (a photo, which must arrive at most once) such a
    loss is raised at once instead, for the caller to decide.

    Every attempt of a PACED_METHODS call first waits its turn under ``send_limits`` (Telegram's by default):
    sends a second across all chats, seconds between two sends to one chat, and sends to one group
    (``chat_id < 0``) in any GROUP_WINDOW_S, a sliding window as Telegram counts (0: no limit of its own).
    A 429 on any call pauses every send for its ``retry_after`` (a flood wait applies to the bot, not to one
    call); then sends resume one spacing apart, not in a burst.  The pacing is arithmetic on the time it is
    given (``chat_wait`` to ``pause_sends``); a chat is remembered only while its spacing or window runs, so
    memory follows the send rate, not the number of chats ever served.
    """

    def __init__(self, token: str, api_base: str, http: httpx.AsyncClient, retry: RetryPolicy = TELEGRAM_RETRY,
                 clock: Clock = SYSTEM_CLOCK, send_limits: tuple[float, float, int] = (30, 1.0, 20),
                 acting_left: Callable[[], float] = lambda: math.inf):
        self._url = f"{api_base}/bot{token}/"
        self.acting_left = acting_left  # a send must end within these seconds (the Role's answer)
        self._file_url = f"{api_base}/file/bot{token}/"  # carries the token: requested here only, never passed on
        self.http = http
        self.retry = retry
        self.clock = clock
        rate, self.chat_interval_s, self.group_per_minute = send_limits
        self.interval_s = 1.0 / rate
        self.paused_until = -math.inf
        self.pauses = 0  # flood pauses begun (a 429 during a pause extends it)
        self._next_send = -math.inf
        self._next_in_chat: dict[Any, float] = {}
        self._group_sends: dict[int, collections.deque[float]] = {}  # a group's last ``group_per_minute`` sends
        self._prune_at = PACER_PRUNE_AT
        self._turns = asyncio.Lock()  # the queue for the shared spacing (_wait_turn)
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()  # (method, outcome)
        # What the latest answer says of the Bot API as a whole: "unreachable", "token_rejected", or "" (it
        # works).  A red flag (section 14) says it once.
        self.trouble = ""

    async def call(self, method: str, params: dict | None = None, files: dict | None = None,
                   timeout: float | None = None, repeatable: bool = True) -> Any:
        policy = self.retry
        if not repeatable:  # an answer lost on the way back is raised: the call may have been performed
            transient = policy.transient
            policy = dataclasses.replace(policy, transient=lambda error: transient(error) and not error.maybe_performed)

        def log_retry(error: Exception, retry: int, wait: float) -> None:
            level = logging.DEBUG if self.trouble else logging.WARNING  # its red flag speaks for every retry
            log.log(level, "[TG] %s failed (%s), retry %d in %.1fs", method, error.description, retry, wait)

        def attempt(params: dict) -> Awaitable[Any]:
            return call_with_retries(lambda: self._call_once(method, params, files, timeout), policy,
                                     clock=self.clock, on_retry=log_retry)

        try:
            return await attempt(params or {})
        except TelegramError as error:  # the group became a supergroup: what was meant for it goes there
            if error.moved_to is None or (params or {}).get("chat_id") in (None, error.moved_to):
                raise
            log.info("[TG] %s: chat %s is now supergroup %d", method, params.get("chat_id"), error.moved_to)
            return await attempt({**params, "chat_id": error.moved_to})

    async def _call_once(self, method: str, params: dict, files: dict | None, timeout: float | None) -> Any:
        if method in PACED_METHODS:
            await self._wait_turn(params.get("chat_id"))
        left = self.acting_left() if method in PACED_METHODS else math.inf
        if left <= 0:
            raise TelegramError(method, 503, "this instance may not act now (the lease)")
        try:
            async with asyncio.timeout(left):
                result = await self._post(method, params, files, timeout)
        except TimeoutError as cut:  # the lease would lapse first: the request may have gone out
            raise TelegramNetworkError(method, cut) from None
        except TelegramError as error:
            self.calls[method, str(error.error_code)] += 1
            rejected = "token_rejected" if error.error_code in TOKEN_REJECTED_CODES else ""
            self.trouble = "unreachable" if isinstance(error, TelegramNetworkError) else rejected
            if error.error_code == 429:
                self.pause_sends(self.clock.monotonic(), _telegram_wait_asked(error))  # type: ignore[arg-type]
            raise
        self.calls[method, "ok"] += 1
        self.trouble = ""
        return result

    async def _wait_turn(self, chat_id: Any) -> None:
        """Wait until the send limits let a send to ``chat_id`` go, and take that send.

        A sender waits out its own chat's spacing alone, then queues (first come, first served) for the
        shared spacing: one sleeper wakes per send, and a chat waiting on its spacing holds up no other.
        """
        while True:
            while (wait := self.chat_wait(self.clock.monotonic(), chat_id)) > 0:
                await self.clock.sleep(wait)
            async with self._turns:
                while (wait := self.send_wait(self.clock.monotonic())) > 0:
                    await self.clock.sleep(wait)
                now = self.clock.monotonic()
                if self.chat_wait(now, chat_id) <= 0:  # another send to this chat may have gone meanwhile
                    self.take_send(now, chat_id)
                    return

    def chat_wait(self, now: float, chat_id: Any) -> float:
        """Seconds until ``chat_id`` may be sent to, as far as its own limits and a flood pause go."""
        sends = self._group_sends.get(chat_id)
        window = sends[0] + GROUP_WINDOW_S - now if sends and len(sends) == self.group_per_minute else 0.0
        return max(0.0, self._next_in_chat.get(chat_id, -math.inf) - now, window, self.paused_until - now)

    def send_wait(self, now: float) -> float:
        """Seconds until the next send to any chat may go."""
        return max(0.0, self._next_send - now, self.paused_until - now)

    def take_send(self, now: float, chat_id: Any) -> None:
        """A send goes out now (callers check ``send_wait`` and ``chat_wait`` first)."""
        on_time = now - self._next_send <= PACE_SLACK_S  # else idle before, or too late to catch up
        self._next_send = (self._next_send if on_time else now) + self.interval_s
        if chat_id is None:
            return
        if self.chat_interval_s > 0:
            self._next_in_chat[chat_id] = now + self.chat_interval_s
        if self.group_per_minute and isinstance(chat_id, int) and chat_id < 0:
            self._group_sends.setdefault(chat_id, collections.deque(maxlen=self.group_per_minute)).append(now)
        if self.chats_remembered >= self._prune_at:
            self._next_in_chat = {chat: at for chat, at in self._next_in_chat.items() if at > now}
            self._group_sends = {chat: sends for chat, sends in self._group_sends.items()
                                 if sends[-1] + GROUP_WINDOW_S > now}
            self._prune_at = max(PACER_PRUNE_AT, 2 * self.chats_remembered)

    def pause_sends(self, now: float, seconds: float) -> None:
        """Hold every send for ``seconds`` from ``now``."""
        if now >= self.paused_until:
            self.pauses += 1
        self.paused_until = max(self.paused_until, now + seconds)
        self._next_send = max(self._next_send, self.paused_until)

    @property
    def chats_remembered(self) -> int:
        return len(self._next_in_chat) + len(self._group_sends)

    async def _post(self, method: str, params: dict, files: dict | None, timeout: float | None) -> Any:
        extra = {} if timeout is None else {"timeout": httpx.Timeout(timeout, connect=5.0)}
        try:
            if files:
                data = {key: value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                        for key, value in params.items()}
                response = await self.http.post(self._url + method, data=data, files=files, **extra)
            else:
                body = json.dumps(params, ensure_ascii=False, separators=(",", ":")).encode()
                headers = {"Content-Type": "application/json"}
                response = await self.http.post(self._url + method, content=body, headers=headers, **extra)
        except httpx.HTTPError as error:
            raise TelegramNetworkError(method, error) from None
        return parse_bot_api_response(method, response.status_code, response.content)

    async def download_file(self, file_id: str, limit: int) -> tuple[bytes, str]:
        """A file a user sent, by its id: (its bytes, its extension); getFile, then at most ``limit`` bytes.
        DownloadError (naming neither the URL nor the file's path) when it cannot be had."""
        found = await self.call("getFile", {"file_id": file_id})
        path = found.get("file_path") if isinstance(found, dict) else None
        if not isinstance(path, str) or not path:
            raise DownloadError("Telegram gave no file path")
        try:
            async with asyncio.timeout(RESULT_DOWNLOAD_DEADLINE_S):
                async with self.http.stream("GET", self._file_url + path, timeout=KIE_TIMEOUT) as response:
                    data = await read_bounded(response, limit)
        except TimeoutError:
            raise DownloadError(f"not finished within {RESULT_DOWNLOAD_DEADLINE_S:g}s") from None
        except httpx.HTTPError as error:
            raise DownloadError(type(error).__name__) from None
        return data, os.path.splitext(path)[1].lower()

    async def send_message(self, chat_id: int, text: str, reply_markup: dict | None = None, **extra: Any) -> Any:
        params: dict[str, Any] = {"chat_id": chat_id, "text": text, "parse_mode": "HTML", **extra}
        if reply_markup is not None:
            params["reply_markup"] = reply_markup
        return await self.call("sendMessage", params)

    async def answer_callback(self, callback_query_id: str, text: str = "", show_alert: bool = False) -> None:
        params: dict[str, Any] = {"callback_query_id": callback_query_id}
        if text:
            params["text"] = text
        if show_alert:
            params["show_alert"] = True
        try:
            await self.call("answerCallbackQuery", params)
        except TelegramError as error:
            # A query older than ~15 minutes cannot be answered; the rest of the handling still matters.
            log.info("[TG] answerCallbackQuery: %s", error.description)


###############################################################################
# 8. Kie client
#    Owns talking to Kie.ai: the {code, msg, data} envelope, task records and
#    their result URLs, callback signatures, typed errors, which failures are
#    retried (KIE_RETRY) and the pace Kie allows.
###############################################################################

KIE_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
KIE_RETRY_BUDGET_S = 60.0  # total time one call may spend retrying
KIE_BACKOFF_BASE_S = 1.0  # first retry within 1 s, then 2, 4, 8 s ...
KIE_BACKOFF_CAP_S = 20.0  # ... never more than 20 s between two tries
KIE_CREATE_PACE = (20, 10.0)  # createTask: Kie allows 20 per 10 s per account
KIE_RECORD_PACE = (8, 1.0)  # recordInfo: Kie allows 10 per second per key; keep headroom
# Kie signs the moment it sends a callback (Unix seconds); a signed callback
# older or newer than this is a replay or a badly wrong clock.
KIE_CALLBACK_WINDOW_S = 300.0
KIE_UPLOAD_PATH = "trt-bot"  # the folder Kie's File Upload API keeps the bot's photos in
RESULT_URL_MAX_CHARS = 2048  # Kie's CDN URLs are ~150; more is not a result URL
HOST_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
URL_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # printable ASCII: no spaces or control characters

@dataclasses.dataclass(frozen=True)
class KieCode:
    """Everything the bot knows about one Kie error code, from the client's retry to the operator's fix."""

    kind: str  # a name for logs, metrics and /stats
    retryable: bool  # the same call may succeed if made again
    user_failure: str  # what the user is told: fail_<user_failure> in TEXTS
    incident: str = ""  # TEXTS key naming it for admins when it stops every generation, else ""
    fix: str = "Kie.ai is failing; try again later"  # what ``trt_bot check`` tells the operator


# The one table of Kie error codes.  Kie answers HTTP 200 with an error in ``code``;
# these are the codes it documents, plus 0 for a network failure.
KIE_CODES: dict[int, KieCode] = {
    0: KieCode("network", True, "busy", fix="{api_base} did not answer: check the network or KIE_API_BASE"),
    401: KieCode("unauthorized", False, "unavailable", "incident_key_rejected",  # bad key
                 "the key was rejected: copy KIE_API_KEY again from your Kie.ai dashboard"),
    402: KieCode("no_credits", False, "unavailable", "incident_no_credits",
                 "the account has no credits: top them up in your Kie.ai dashboard"),
    404: KieCode("not_found", False, "failed"),
    408: KieCode("no_result", False, "stalled"),  # Kie had no result for over 10 minutes and gave up
    422: KieCode("invalid", False, "invalid"),  # the request failed validation
    429: KieCode("rate_limited", True, "busy"),
    433: KieCode("key_limit", False, "unavailable"),  # a sub-key's usage cap
    455: KieCode("maintenance", True, "busy"),
    500: KieCode("server_error", True, "busy"),
    501: KieCode("generation_failed", False, "failed"),
    505: KieCode("disabled", False, "unavailable"),
}
UNDOCUMENTED_SERVER_CODE = KieCode("server_error", True, "busy")  # another 5xx: a passing fault
UNDOCUMENTED_CODE = KieCode("server_error", False, "busy")  # another code: asking again will not help


def kie_code(code: int) -> KieCode:
    return KIE_CODES.get(code) or (UNDOCUMENTED_SERVER_CODE if code >= 500 else UNDOCUMENTED_CODE)


class KieError(TrtError):
    """Kie refused or failed a call; ``code`` is Kie's (or the HTTP status, 0 for network), see KIE_CODES."""

    def __init__(self, code: int, message: str):
        super().__init__(f"Kie {code}: {message}")
        self.code = code
        self.message = message
        self.kind = kie_code(code).kind  # for logs, metrics and /stats
        self.retryable = kie_code(code).retryable


@dataclasses.dataclass(frozen=True)
class TaskRecord:
    """What Kie says about a task: pending, success (with URLs) or fail."""

    task_id: str
    state: str  # "pending" | "success" | "fail"
    urls: tuple[str, ...] = ()
    fail_message: str = ""
    fail_code: str = ""  # Kie's ``failCode``, as Kie writes it (a string)


KIE_PENDING_STATES = frozenset({"waiting", "queuing", "generating"})


def parse_kie_envelope(status_code: int, content: bytes) -> Any:
    """``data`` of a Kie answer, or KieError (``code`` is read even on HTTP 200)."""
    try:
        payload = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict):
        raise KieError(status_code if status_code >= 400 else 500, f"HTTP {status_code} without a Kie body")
    code = payload["code"] if isinstance(payload.get("code"), int) else status_code
    if code != 200 or status_code >= 400:  # Kie's code first: it says more than the HTTP status
        raise KieError(code if code != 200 else status_code, str(payload.get("msg") or payload.get("message") or ""))
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
        return TaskRecord(task_id, "fail", (), str(data.get("failMsg") or ""), str(data.get("failCode") or ""))
    if state == "success":
        result = data.get("resultJson")
        if isinstance(result, str):
            try:
                result = json.loads(result) if result else {}
            except ValueError:
                raise KieError(500, "resultJson is not valid JSON") from None
        urls = (result or {}).get("resultUrls") if isinstance(result, dict) else None
        urls = tuple(u for u in urls if split_result_url(u) is not None) if isinstance(urls, list) else ()
        if not urls:
            return TaskRecord(task_id, "fail", (), "the task succeeded without an image URL")
        return TaskRecord(task_id, "success", urls)
    raise KieError(500, f"unknown task state {state!r}")


def split_result_url(url: Any) -> urllib.parse.SplitResult | None:
    """``url`` split into parts if it is a well-formed http(s) URL with a host and no credentials, else None.

    Result URLs come from outside (Kie's record), so anything an HTTP client
    could choke on (``http://[::1/x.png``) or misread is refused here, once.
    """
    if not isinstance(url, str) or len(url) > RESULT_URL_MAX_CHARS or not URL_CHARACTERS.fullmatch(url):
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises ValueError unless the port is a number from 0 to 65535
    except ValueError:
        return None
    host = parts.hostname or ""
    is_host = _is_ip_literal(host) or len(host) <= 253 and HOST_NAME_PATTERN.fullmatch(host) is not None
    if parts.scheme not in ("http", "https") or "@" in parts.netloc or not is_host:
        return None
    return parts


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def kie_callback_signed(key: str, task_id: str, timestamp: str, signature: str, now: float) -> bool:
    """Kie's X-Webhook-Signature, base64(HMAC-SHA256(key, taskId + "." + X-Webhook-Timestamp)), with the timestamp
    (Unix seconds) within KIE_CALLBACK_WINDOW_S of ``now``: a replay is refused once out of the window."""
    digest = hmac.new(key.encode(), f"{task_id}.{timestamp}".encode(), hashlib.sha256).digest()
    signed = hmac.compare_digest(base64.b64encode(digest), signature.encode())  # always computed: constant time
    fresh = timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12
    return fresh and abs(int(timestamp) - now) <= KIE_CALLBACK_WINDOW_S and signed


# Network errors, HTTP 5xx and Kie's transient codes (KieError.retryable) are tried again.
KIE_RETRY = RetryPolicy(budget_s=KIE_RETRY_BUDGET_S, base_s=KIE_BACKOFF_BASE_S, cap_s=KIE_BACKOFF_CAP_S,
                        retry_on=(KieError,), transient=lambda error: error.retryable)


class KieClient:
    """createTask, recordInfo and credits, with transient failures (KIE_CODES) retried within a budget."""

    def __init__(self, api_key: str, api_base: str, http: httpx.AsyncClient, retry: RetryPolicy | None = None,
                 clock: Clock = SYSTEM_CLOCK, upload_base: str = "https://kieai.redpandaai.co"):
        self.api_base = api_base
        self.upload_base = upload_base
        self.http = http
        self.retry = KIE_RETRY if retry is None else retry  # read when built, so tests can shorten KIE_RETRY
        self.clock = clock
        self.configured = bool(api_key)
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.create_pace = RateLimiter(*KIE_CREATE_PACE, clock=clock)
        self.record_pace = RateLimiter(*KIE_RECORD_PACE, clock=clock)
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()  # (endpoint, outcome)

    async def create_task(self, model: str, inputs: dict, callback_url: str = "") -> str:
        body: dict[str, Any] = {"model": model, "input": inputs}
        if callback_url:
            body["callBackUrl"] = callback_url
        data = await self._request("POST", "/api/v1/jobs/createTask", self.create_pace,
                                   content=json.dumps(body, ensure_ascii=False).encode())
        task_id = data.get("taskId") if isinstance(data, dict) else None
        if not task_id:
            raise KieError(500, "createTask answered without a taskId")
        return str(task_id)

    async def record_info(self, task_id: str, budget_s: float | None = None) -> TaskRecord:
        """The task's record; ``budget_s=0`` tries once (a poller asks again later anyway)."""
        data = await self._request("GET", "/api/v1/jobs/recordInfo", self.record_pace, budget_s,
                                   params={"taskId": task_id})
        return parse_task_record(data)

    async def upload(self, data: bytes, name: str) -> str:
        """Kie's own copy of a photo to edit (its File Upload API; Kie deletes it within days): its URL.
        ``name`` must be unique: Kie overwrites a file of the same name."""
        answer = await self._request("POST", "/api/file-stream-upload", self.create_pace,
                                     data={"uploadPath": KIE_UPLOAD_PATH, "fileName": name},
                                     files={"file": (name, data, "application/octet-stream")})
        url = answer.get("downloadUrl") if isinstance(answer, dict) else None
        if split_result_url(url) is None:
            raise KieError(500, "the upload answered without a download URL")
        return url

    async def credits(self, budget_s: float | None = None) -> float:
        data = await self._request("GET", "/api/v1/chat/credit", None, budget_s)
        if not isinstance(data, (int, float)) or isinstance(data, bool):
            raise KieError(500, "credit answer is not a number")
        return data

    async def _request(self, method: str, path: str, pace: RateLimiter | None, budget_s: float | None = None,
                       **request: Any) -> Any:
        """``data`` of one call, paced, retried (KIE_RETRY) and counted; ``request`` is httpx's arguments."""
        endpoint = path.rsplit("/", 1)[-1]
        policy = self.retry if budget_s is None else dataclasses.replace(self.retry, budget_s=budget_s)
        if "files" in request:  # multipart, to the upload host
            url, headers = self.upload_base + path, {"Authorization": self._headers["Authorization"]}
        else:
            url, headers = self.api_base + path, self._headers

        async def paced_attempt() -> Any:
            if pace is not None:
                await pace.acquire()
            try:
                try:
                    response = await self.http.request(method, url, headers=headers, timeout=KIE_TIMEOUT, **request)
                except httpx.HTTPError as error:
                    raise KieError(0, f"network error ({type(error).__name__})") from None
                data = parse_kie_envelope(response.status_code, response.content)
            except KieError as error:
                self.calls[endpoint, error.kind] += 1
                raise
            self.calls[endpoint, "ok"] += 1
            return data

        def log_retry(error: Exception, retry: int, wait: float) -> None:
            log.warning("[KIE] %s failed (%s); retrying in %.1fs", endpoint, error, wait)

        return await call_with_retries(paced_attempt, policy, clock=self.clock, on_retry=log_retry)


###############################################################################
# 9. Update pipeline
#    Owns an update from the moment it arrives until a handler is done with it.
#
# Theory of operation
#
# States (UpdateState, kept by the Inbox).  ingest marks an update ADMITTING while its inbox row commits; then it goes
# to the workers (QUEUED) or stays in the inbox (spilled: memory full, others stored before it, or this instance may
# not act) until Inbox.refill queues it.  A worker takes it (HANDLING), or PARKS it behind its chat's update in hand;
# when the handler ends, its InboxItem goes to the group commit as its done mark (AWAITING_DONE); once committed the
# update is done and no longer held.  A pre-checkout query is answered at once, not stored: Telegram waits only 10 s.
# Durable when: the inbox row is committed before the 200 (else Telegram keeps the update and sends it again); the
# handler's unsent replies are written in its done mark's transaction (never the mark without them).  A done mark
# that fails to commit is kept, with its replies, until the database is back.
# Order: a chat's updates run one at a time, in arrival order.  Only one worker is on a chat (the others park its
# updates with it).  While anything waits in the inbox (``spilling``) new updates are stored behind it, and the
# refill reads the inbox in update_id order; an update going straight to the workers first learns, in its insert's
# transaction, of older ones of its chat that another instance stored, and if any waits behind them.
# Memory only: with the database down, updates are kept in memory (availability over durability) while there is
# room; duplicates are known among the last RECENT_MEMORY_IDS only; one whose chat has stored updates is refused
# (CHAT_BEHIND, it would overtake them), and so is everything while passive or shutting down.  A memory-only update
# is lost if the process dies before it is handled.  Telegram retries every refusal but INVALID.
# Who may act: only while Role.may_act() (the lease held, its trust not lapsed) does the pipeline take updates from
# the inbox.  A handler begun while it could not act, or before a hand-over of the lease, is void (Role.void()): it
# is not run (voided mid-way, its replies are not sent) and its update is left in the inbox, to the lease's holder.
# Every durable update queued before then follows it there (Inbox.leaves), its chat's later ones among them:
# a lapse of the lease's trust for one moment must not let them overtake it.
# kill -9: before the commit, Telegram still has the update; after it, the row is handled at the next start (a
# redelivery is a duplicate); during a handler, the update runs again (replies it had sent may repeat); after the
# done mark, its replies are in the outbox and are sent.
# Acks first within a budget: while a webhook's ack is owed, handlers use at most HANDLERS_SHARE of each
# ACK_FIRST_WINDOW_S window's CPU; the rest is the acks'.  A handler past its timeout is cut by its worker's check
# (<= 1 s).
# A /start passes through these 18 named types, socket to reply (as bench/types_per_start.py lists them):
# HttpServer, RequestParser, Request, Response, Clock, UpdatePipeline, ChatWorkers, InboxItem, Inbox, Database,
# Role, Conversation, Context, Generations, Outbox, OutboxMessage, TelegramClient, StreamCalls (which carries the
# reply).  Along the way it reads Config's fields, ingest answers with an Admission member, and a timer may add
# OwnedTasks.
###############################################################################

CALLBACK_QUERY_TTL_S = 150.0  # Telegram refuses to answer older callback queries
INBOX_MAX_BACKLOG = 100_000  # beyond this the webhook answers 503 and Telegram keeps the update
REFILL_INTERVAL_S = 1.0  # also how soon updates stored by another instance get picked up
FIRST_OPEN_WAIT_S = 5.0  # an update arriving before the database first opens waits this long for it
PRUNE_INTERVAL_S = 600.0
BACKLOG_RECOUNT_S = 30.0  # the count is kept in memory; recounting picks up other instances' updates
RECENT_MEMORY_IDS = 10_000  # duplicates remembered while the database is down

# Update kinds keyed by their chat, and kinds keyed by the user who sent them
# (callback queries are keyed by the user, as Telegram orders them).
CHAT_KEYED = ("message", "edited_message", "channel_post", "edited_channel_post", "business_message",
              "my_chat_member", "chat_member", "chat_join_request", "message_reaction")
USER_KEYED = ("callback_query", "inline_query", "chosen_inline_result", "shipping_query",
              "pre_checkout_query", "poll_answer", "chat_boost")


LANGUAGE_CODE_MAX = 35  # an IETF language tag; anything longer is not one and is not stored


def update_chat_key(update: dict) -> int:
    """The key whose updates must be handled one at a time, in order (always fits SQLite's INTEGER)."""
    for kind in CHAT_KEYED:
        chat = (update.get(kind) or {}).get("chat") if isinstance(update.get(kind), dict) else None
        if isinstance(chat, dict) and fits_sqlite_integer(chat.get("id")):
            return chat["id"]
    for kind in USER_KEYED:
        body = update.get(kind)
        if isinstance(body, dict):
            user = body.get("from") or body.get("user") or {}
            if isinstance(user, dict) and fits_sqlite_integer(user.get("id")):
                return user["id"]
    return ~update.get("update_id", 0)  # unkeyed: no other update shares it (~ stays in INTEGER's range)


def update_sender(update: dict) -> tuple[int, str]:
    """(user id, language code) of whoever caused the update; (0, '') if nobody."""
    for body in update.values():
        if isinstance(body, dict) and isinstance(body.get("from"), dict):
            sender = body["from"]
            if fits_sqlite_integer(sender.get("id")):
                lang = sender.get("language_code")
                return sender["id"], lang if isinstance(lang, str) and len(lang) <= LANGUAGE_CODE_MAX else ""
    return 0, ""


# JSON may escape a UTF-16 surrogate alone ("\ud800"); Python keeps it, but UTF-8 (so SQLite, and the Bot API's
# JSON) cannot hold it.  Bodies without such an escape, nearly all of them, are not walked.
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_lone_surrogates(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_without_lone_surrogates(key): _without_lone_surrogates(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    return value


def parse_json_object(body: bytes) -> dict:
    """The JSON object a request body holds, fit to be stored (lone surrogates replaced), or HttpError(400)."""
    try:
        value = json.loads(body)
        if SURROGATE_ESCAPE.search(body):
            value = _without_lone_surrogates(value)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise HttpError(400, "body is not valid JSON") from None
    if not isinstance(value, dict):
        raise HttpError(400, "body must be a JSON object")
    return value


def parse_update(body: bytes) -> dict:
    """The update in a webhook body, fit to be stored, or HttpError(400)."""
    update = parse_json_object(body)
    if not fits_sqlite_integer(update.get("update_id")) or isinstance(update["update_id"], bool):
        raise HttpError(400, "update_id must be an integer in the signed 64-bit range")
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


async def wait_for_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` passes; True if it was set.

    Not ``asyncio.wait_for(event.wait(), timeout)``: on Python 3.11 that swallows a cancellation arriving as the event
    fires (CPython gh-86296), and a loop built on it outlives its own cancellation, hanging shutdown."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


class Admission(enum.Enum):
    """What ``ingest`` did with an update: kept, known already, or not kept and why."""

    ADMITTED = ("committed to the inbox, or held in memory while the database is down", False)
    DUPLICATE = ("an update id seen before: acknowledged, not handled again", False)
    BACKLOG_FULL = ("the inbox holds too many unhandled updates", True)
    MEMORY_FULL = ("memory is full and the database is down", True)
    CHAT_BEHIND = ("its chat has updates waiting in the inbox, which it would overtake", True)
    PASSIVE = ("another instance holds the lease and the database is down", True)
    SHUTTING_DOWN = ("shutting down", True)
    INVALID = ("SQLite refused what it holds: sending it again would not help", False)

    def __init__(self, meaning: str, retry_later: bool):
        self.retry_later = retry_later  # not kept, and Telegram should send it again (a 503)


# -- where each update is ------------------------------------------------------

class UpdateState(enum.Enum):
    """Where an update the pipeline holds is.  One it does not hold is in the inbox only, or done."""

    ADMITTING = ("admitting", False)  # its insert is being committed; a refill must not take it
    QUEUED = ("queued", True)  # in memory, waiting for a worker
    PARKED = ("parked", True)  # waiting behind an update of its chat that a worker has in hand
    HANDLING = ("handling", True)  # a handler runs it
    AWAITING_DONE = ("awaiting_done", False)  # handled; its done mark is not committed yet

    def __init__(self, label: str, in_memory: bool):  # the label keeps the values apart
        self.in_memory = in_memory  # counts against the memory bound (queue_size)


WATCHDOG_INTERVAL_S = 1.0  # how late a handler's cut may land
# While acks are owed, handlers may run HANDLERS_SHARE of each window: acks get the rest, handlers are never starved.
ACK_FIRST_WINDOW_S = 0.01
HANDLERS_SHARE = 0.5


class ChatWorkers:
    """A fixed pool of workers on the inbox's queue: a chat's updates run one by one, in order (parked with its worker).

    Workers watch their own handlers: one check a second cuts those past ``timeout`` (an asyncio.timeout per update
    costs microseconds each).  A cut is a cancel withdrawn (``uncancel``) when the handler ends, so a shutdown's
    cancel is still told apart from it.
    """

    def __init__(self, inbox: Inbox, process: Callable[[InboxItem], Awaitable[None]], count: int,
                 timeout: float = 30.0, clock: Clock = SYSTEM_CLOCK):
        self.inbox = inbox
        self.count = count
        self.timeout = timeout
        self.clock = clock
        self.acks_owed = 0  # from the webhook's having an update until its answer is decided
        self.deferred = 0  # handler starts that gave way to acks owed
        # The current window, and the handlers' CPU seconds in it: the event loop thread's CPU time while one ran,
        # so a handler waiting on the disk or Telegram while nothing else runs is not charged for the idle CPU.
        self._window_ends, self._spent = 0.0, 0.0
        self.active = 0  # workers running a handler now
        self._process = process
        self._parked: dict[int, collections.deque[InboxItem]] = {}  # chat key -> waiting behind the one in hand
        self._deadlines: dict[asyncio.Task, float] = {}  # worker -> when its handler is overdue
        self._cut: set[asyncio.Task] = set()  # workers whose handler was cancelled for running over

    def start(self) -> list[asyncio.Task]:
        return [asyncio.create_task(self._work(), name=f"worker-{n}") for n in range(self.count)]

    @contextlib.contextmanager
    def ack_owed(self) -> Iterator[None]:
        self.acks_owed += 1
        try:
            yield
        finally:
            self.acks_owed -= 1

    async def _give_way(self) -> None:
        """Yield one loop turn (acks whose commit landed go on); past the handlers' share, wait for the window's end.
        (Waiting while any ack was owed, up to 50 ms, all but stopped handling during a burst.)"""
        self.deferred += 1
        await asyncio.sleep(0)
        while self.acks_owed and self._spent >= HANDLERS_SHARE * ACK_FIRST_WINDOW_S:
            now = time.perf_counter()
            if now >= self._window_ends:
                self._window_ends, self._spent = now + ACK_FIRST_WINDOW_S, 0.0
            else:
                await asyncio.sleep(self._window_ends - now)

    async def _work(self) -> None:
        task: asyncio.Task = asyncio.current_task()  # type: ignore[assignment]
        while True:
            item: InboxItem | None = await self.inbox.queue.get()
            key = item.chat_key  # type: ignore[union-attr]
            parked = self._parked.get(key)
            if parked is not None:  # another worker is on this chat; it takes this one next
                self.inbox.move(item.update_id, UpdateState.PARKED)  # type: ignore[union-attr]
                parked.append(item)  # type: ignore[arg-type]
                continue
            self._parked[key] = parked = collections.deque()
            try:
                while item is not None:
                    if self.acks_owed:
                        await self._give_way()
                    self.inbox.move(item.update_id, UpdateState.HANDLING)
                    self.active += 1
                    started = time.thread_time()
                    self.watch(task, self.clock.monotonic())
                    try:
                        await self._process(item)
                    finally:
                        self.release(task)
                        self.active -= 1
                        self._spent += time.thread_time() - started
                    item = parked.popleft() if parked else None
            finally:
                del self._parked[key]

    # -- the handlers' timeout ------------------------------------------------

    def watch(self, task: asyncio.Task, started: float) -> None:
        self._deadlines[task] = started + self.timeout

    def cut_alone(self, task: asyncio.Task) -> bool:
        """Whether the cancel ``task`` is raising came from a cut only (not also from shutdown)."""
        return task in self._cut and task.cancelling() <= 1

    def release(self, task: asyncio.Task) -> None:
        """The handler ended: stop watching it, and withdraw a cut, landed or swallowed."""
        del self._deadlines[task]
        if task in self._cut:
            self._cut.discard(task)
            task.uncancel()

    def stuck(self) -> int:
        """Handlers still running a whole timeout after their cut: they ignore it, and only a restart ends them."""
        now = self.clock.monotonic()
        return sum(1 for task in self._cut if now > self._deadlines.get(task, now) + self.timeout)

    def cut_overdue(self) -> None:
        now = self.clock.monotonic()
        for task, deadline in self._deadlines.items():
            if deadline < now and task not in self._cut:
                self._cut.add(task)
                task.cancel()

    async def watch_handlers(self) -> None:
        while True:
            await self.clock.sleep(WATCHDOG_INTERVAL_S)
            self.cut_overdue()


class Inbox:
    """Where each update is: one state per update the pipeline holds (UpdateState), and what waits in the inbox table.

    ``in_memory`` (queued, parked, handling; at most ``capacity``) is kept as states change: the ack path never walks
    the map.  ``stored_by_chat``, each chat's updates waiting in the inbox, is never too low (a later update of the
    chat could overtake them), too high only until the inbox is next read to its end.  The group commit writes the
    table; every REFILL_INTERVAL_S, and at once when woken, ``run`` recounts the backlog (picking up what a previous
    run, another instance or a lost database file left), queues the oldest stored updates while there is room, and
    prunes done rows.
    """

    def __init__(self, db: Database, capacity: int, stats: PipelineStats, may_take: Callable[[], bool],
                 clock: Clock = SYSTEM_CLOCK, max_backlog: int = INBOX_MAX_BACKLOG):
        self.db = db
        self.capacity = capacity
        self.stats = stats
        self.may_take = may_take  # whether this instance may take updates now
        self.clock = clock
        db.batched(inbox_write_reading_older, on_batch=self._on_written)
        self._failed: list[InboxItem | OutboxMessage] = []
        self.wakeup = asyncio.Event()  # set: look at the inbox now
        self.queue: asyncio.Queue[InboxItem] = asyncio.Queue(maxsize=capacity)  # updates QUEUED for the workers
        self.states: dict[int, UpdateState] = {}
        self.in_memory = 0
        self.leaves = 0  # updates left to the inbox: each takes along every update queued before it was left
        self.max_backlog = max_backlog
        self.backlog = 0  # the inbox's unhandled rows (what /health shows, and the bound on admission)
        self.spilling = False  # whether any update might wait in the inbox
        self.recount_due = True
        self.marks = 0  # mark_stored() calls so far: a refill that saw none during its read saw everything
        self.stored_by_chat: collections.Counter[int] = collections.Counter()
        self.changed = asyncio.Event()  # an update moved, or what waits in the inbox may have changed
        self._waiters = 0  # wait_until calls under way: with none, nobody needs to hear of a change

    def holds(self, update_id: int) -> bool:
        """Whether the update is admitted, in memory or awaiting its done mark: a refill must not take it."""
        return update_id in self.states

    def room(self) -> int:
        return self.capacity - self.in_memory

    def admit(self, update_id: int) -> bool:
        """Mark the update as being committed; False if it was already held (then its state stays)."""
        if update_id in self.states:
            return False
        self.states[update_id] = UpdateState.ADMITTING
        return True

    def enqueue(self, item: InboxItem) -> None:
        item.queued_after = self.leaves
        self.move(item.update_id, UpdateState.QUEUED)
        self.queue.put_nowait(item)  # never full: it holds at most in_memory items

    def move(self, update_id: int, state: UpdateState) -> None:
        before = self.states.get(update_id)
        self.states[update_id] = state
        if state.in_memory != (before is not None and before.in_memory):
            self.in_memory += 1 if state.in_memory else -1
            if self._waiters:
                self.changed.set()

    def drop(self, update_id: int, only_if: UpdateState | None = None) -> None:
        """Stop holding the update (only while it is in state ``only_if``, when given)."""
        state = self.states.get(update_id)
        if state is None or (only_if is not None and state is not only_if):
            return
        del self.states[update_id]
        if state.in_memory:
            self.in_memory -= 1
        if self._waiters:
            self.changed.set()

    async def wait_until(self, condition: Callable[[], bool], seconds: float | None = None) -> None:
        """Return once ``condition()`` holds (or ``seconds`` pass), checked as updates move in memory or the map."""
        self._waiters += 1
        try:
            async with asyncio.timeout(seconds):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pass
        finally:
            self._waiters -= 1

    def mark_stored(self, chat_key: int) -> None:
        """An update of ``chat_key`` waits in the inbox: later ones wait behind it until a refill reads it."""
        self.spilling = True
        self.stored_by_chat[chat_key] += 1
        self.marks += 1
        self.wakeup.set()

    def mark_done(self, entries: list[InboxItem | OutboxMessage]) -> None:
        """Handled updates, each after the replies it holds: each is written as its done mark."""
        for entry in entries:
            if isinstance(entry, InboxItem):
                entry.done = True
                self.move(entry.update_id, UpdateState.AWAITING_DONE)
            self.db.add(inbox_write_reading_older, entry)

    def _on_written(self, entries: list[InboxItem | OutboxMessage], error: BaseException | None) -> None:
        marks = [entry for entry in entries if isinstance(entry, InboxItem) and entry.done]
        if not marks:
            return
        if isinstance(error, RowRejected):
            # Only the sender's details can be refused (the id was checked on the way in): mark it done without.
            self.mark_done([dataclasses.replace(mark, user_id=0) for mark in marks if mark.user_id])
        elif error is not None:
            ids = {mark.update_id for mark in marks}  # kept with their replies, out of refill until it is back
            self._failed += [entry for entry in entries if isinstance(entry, OutboxMessage) and entry.update_id in ids]
            self._failed += marks  # after the replies: a retry never writes a mark before them
            self.changed.set()
        else:
            for mark in marks:
                self.drop(mark.update_id, only_if=UpdateState.AWAITING_DONE)
            self.backlog = max(0, self.backlog - len(marks))

    async def run(self) -> None:
        last_prune = last_count = self.clock.monotonic()
        while True:
            await wait_for_event(self.wakeup, REFILL_INTERVAL_S)
            self.wakeup.clear()
            if not self.db.ok:
                continue
            if self._failed:
                retry, self._failed = self._failed, []
                self.mark_done(retry)
            if self.recount_due or self.clock.monotonic() - last_count > BACKLOG_RECOUNT_S:
                last_count = self.clock.monotonic()
                await self.recount()
            if self.may_take():
                await self.refill()
            if self.clock.monotonic() - last_prune > PRUNE_INTERVAL_S:
                last_prune = self.clock.monotonic()
                with contextlib.suppress(DatabaseUnavailable):
                    await self.db.write(inbox_prune, self.clock.time() - INBOX_KEEP_DONE_S)

    async def recount(self) -> None:
        """Count the inbox's unhandled updates, and learn which chats have some waiting outside memory."""
        try:
            rows = await self.db.read(inbox_unhandled)
        except DatabaseUnavailable:
            return
        self.recount_due = False
        self.backlog = len(rows)
        waiting = collections.Counter(chat_key for update_id, chat_key in rows if not self.holds(update_id))
        for chat_key, count in waiting.items():  # never lower: what spilled during the read is not in it
            self.stored_by_chat[chat_key] = max(self.stored_by_chat[chat_key], count)
        if waiting:
            self.spilling = True

    async def refill(self) -> None:
        """Move the oldest stored updates into memory while there is room."""
        room = self.room()
        if room <= 0:
            return
        limit = room + len(self.states)
        marks_before = self.marks
        try:
            rows = await self.db.read(inbox_pending, limit)
        except DatabaseUnavailable:
            return
        taken, more_left = 0, len(rows) == limit
        for update_id, chat_key, body, received_at in rows:
            if taken == room:
                more_left = True
                break
            if self.holds(update_id):  # checked now, not before the read: ids change hands while we wait
                continue
            self.stored_by_chat[chat_key] -= 1
            if self.stored_by_chat[chat_key] <= 0:
                del self.stored_by_chat[chat_key]
            try:
                self.enqueue(InboxItem(update_id, chat_key, parse_update(body), body, received_at))
                taken += 1
            except HttpError:  # unreadable: dropped, and marked done
                self.stats.dropped += 1
                self.mark_done([InboxItem(update_id, chat_key, {}, body, received_at)])
        if more_left:
            self.spilling = True
        elif self.marks == marks_before:  # read to its end, and nothing marked since: nothing waits outside memory
            self.spilling = False
            self.stored_by_chat.clear()
        self.changed.set()


class UpdatePipeline:
    """Durable, ordered delivery of updates to ``handler`` (see the section's notes)."""

    def __init__(
        self,
        db: Database,
        handler: Callable[[dict], Awaitable[None]],
        *,
        queue_size: int = 100,
        workers: int = 3,
        handler_timeout: float = 30.0,
        max_backlog: int = INBOX_MAX_BACKLOG,
        on_handled: Callable[[float], None] = lambda seconds: None,
        clock: Clock = SYSTEM_CLOCK,
        mode: Role | None = None,
        answer_pre_checkout: Callable[[dict, bool], Awaitable[None]] | None = None,
        outbox: Outbox | None = None,  # its replies are written with their update's done mark
    ):
        self.db = db
        self.handler = handler
        self.outbox = outbox
        self.answer_pre_checkout = answer_pre_checkout  # (query, whether this instance may record the payment)
        self._answering = OwnedTasks("[QUEUE]")
        self.on_handled = on_handled  # hears how long each handler ran
        self.clock = clock
        self.mode = mode or Role()
        self.stats = PipelineStats()
        self.inbox = Inbox(db, queue_size, self.stats, self._may_take, clock, max_backlog)
        self.workers = ChatWorkers(self.inbox, self._process, workers, handler_timeout, clock)
        self._recent_memory_ids: collections.OrderedDict[int, None] = collections.OrderedDict()  # degraded dedup
        self._tasks: list[asyncio.Task] = []
        self._accepting = True

    def _may_take(self) -> bool:
        return self._accepting and self.mode.may_act()

    # -- the ack path -------------------------------------------------------

    async def ingest(self, update: dict, body: bytes) -> Admission:
        """Keep ``update`` (``body`` is its JSON) before Telegram hears that it arrived."""
        update_id = update["update_id"]
        item = InboxItem(update_id, update_chat_key(update), update, body, self.clock.time(), self.clock.monotonic())
        if not self.db.ok and not self.db.tried.is_set():
            # Start-up: the port is bound before the database opens; an update arriving in
            # between waits for it rather than being kept in memory only.
            await wait_for_event(self.db.tried, FIRST_OPEN_WAIT_S)
        if "pre_checkout_query" in update and self.answer_pre_checkout is not None:
            return self._answer_at_once(update["pre_checkout_query"])
        if not self.db.ok:
            return self._ingest_in_memory(item)
        if self.inbox.backlog >= self.inbox.max_backlog:
            self.stats.rejected += 1
            return Admission.BACKLOG_FULL
        admitting = self.inbox.admit(update_id)
        item.ask_older = self._may_take() and not self.inbox.spilling  # else it waits in the inbox anyway
        try:
            is_new = await self.db.submit(inbox_write_reading_older, item)
        except DatabaseUnavailable:
            pass  # fall through to memory
        except RowRejected:
            return Admission.INVALID  # logged by Database; storing it again would fail again
        else:
            return self._inserted(item) if is_new else self._stored_before(item)
        finally:
            if admitting:
                self.inbox.drop(update_id, only_if=UpdateState.ADMITTING)
        return self._ingest_in_memory(item)

    def _answer_at_once(self, query: Any) -> Admission:
        """A pre-checkout query changes nothing (the payment that follows does): it is answered, not stored."""
        self.stats.received += 1
        self.stats.processed += 1
        if isinstance(query, dict):
            self._answering.start(self.answer_pre_checkout(query, self.db.ok and self._may_take()), "pre-checkout")
        return Admission.ADMITTED

    def _inserted(self, item: InboxItem) -> Admission:
        self.stats.received += 1
        self.inbox.backlog += 1
        # Older updates of its chat that another instance stored (a standby, at a deploy): it waits behind them.
        behind_stored = not all(self.inbox.holds(update_id) for update_id in item.older)
        if self._may_take() and not self.inbox.spilling and self.inbox.room() > 0 and not behind_stored:
            self.inbox.enqueue(item)
        else:
            self.stats.spilled += 1
            self.inbox.mark_stored(item.chat_key)
        return Admission.ADMITTED

    def _stored_before(self, item: InboxItem) -> Admission:
        self.stats.duplicates += 1
        if self.inbox.states.get(item.update_id) in (None, UpdateState.ADMITTING):
            # Perhaps stored by a run that died before handling it, and skipped by a refill
            # that read it while this insert was under way: the inbox must be read again.
            self.inbox.mark_stored(item.chat_key)
        return Admission.DUPLICATE

    def _ingest_in_memory(self, item: InboxItem) -> Admission:
        if item.update_id in self._recent_memory_ids:
            self.stats.duplicates += 1
            return Admission.DUPLICATE
        refusal = self._memory_refusal(item.chat_key)
        if refusal is not None:
            self.stats.rejected += 1
            return refusal
        self._recent_memory_ids[item.update_id] = None
        if len(self._recent_memory_ids) > RECENT_MEMORY_IDS:
            self._recent_memory_ids.popitem(last=False)
        item.durable = False
        self.stats.received += 1
        self.stats.memory_only += 1
        self.inbox.enqueue(item)
        return Admission.ADMITTED

    def _memory_refusal(self, chat_key: int) -> Admission | None:
        if not self._accepting:
            return Admission.SHUTTING_DOWN
        if not self.mode.may_act():
            return Admission.PASSIVE
        if self.inbox.room() <= 0:
            return Admission.MEMORY_FULL
        return Admission.CHAT_BEHIND if self.inbox.stored_by_chat[chat_key] else None

    # -- handling one update --------------------------------------------------

    async def _process(self, item: InboxItem) -> None:
        started = self.clock.monotonic()
        follows = item.queued_after < self.inbox.leaves  # an update of its chat might have been left before it
        acting = not item.durable or (self.mode.may_act() and not follows)
        HANDLING_SINCE.set(self.mode.handovers if acting else -1)
        if item.durable and self.outbox is not None:
            self.outbox.hold_replies(item.update_id)
        try:
            if self._expired(item):
                self.stats.dropped += 1
            elif not self.mode.void():
                await self.handler(item.update)
        except asyncio.CancelledError:
            if not self.workers.cut_alone(asyncio.current_task()):  # type: ignore[arg-type]
                raise  # shutdown, not (only) the timeout's cut
            self.stats.errors += 1
            log.error("[QUEUE] update %d: handler timed out after %.0fs", item.update_id, self.workers.timeout)
        except TelegramError as error:
            item.blocked = error.error_code == 403  # the user has blocked the bot
            if item.blocked:
                self.stats.blocked += 1
                log.info("[QUEUE] update %d: the user blocked the bot", item.update_id)
            else:
                self.stats.errors += 1
                log.error("[QUEUE] update %d: Telegram refused: %s", item.update_id, error)
        except Exception:
            self.stats.errors += 1
            log.exception("[QUEUE] update %d: handler failed", item.update_id)
        finally:
            self._handled(item, started)

    def _expired(self, item: InboxItem) -> bool:
        """A callback query too old for Telegram to accept its answer (by the wall clock only if read back)."""
        age = self.clock.time() - item.received_at if item.arrived is None else self.clock.monotonic() - item.arrived
        return "callback_query" in item.update and age > CALLBACK_QUERY_TTL_S

    def _handled(self, item: InboxItem, started: float) -> None:
        self.stats.processed += 1
        self.on_handled(self.clock.monotonic() - started)
        replies = self.outbox.held_replies(item.update_id) if self.outbox is not None else []
        if item.durable and self.mode.void():  # left in the inbox, to whoever holds the lease
            if item.queued_after == self.inbox.leaves:  # the first left since it was queued: the rest follow
                self.inbox.leaves += 1
            self.inbox.drop(item.update_id)
            self.inbox.mark_stored(item.chat_key)
        elif item.durable:
            item.user_id, item.lang = update_sender(item.update)
            self.inbox.mark_done([*replies, item])
        else:
            self.inbox.drop(item.update_id)
        if self.inbox.spilling and self.inbox.room() >= max(1, self.inbox.capacity // 4):
            self.inbox.wakeup.set()

    # -- start, stop and what /health shows ---------------------------------

    async def start(self) -> None:
        await self.inbox.recount()
        self._tasks = [*self.workers.start(),
                       asyncio.create_task(self.inbox.run(), name="inbox-refill"),
                       asyncio.create_task(self.workers.watch_handlers(), name="handler-watchdog")]
        log.info("[QUEUE] Workers started: %d workers, queue max %d, inbox backlog %d",
                 self.workers.count, self.inbox.capacity, self.backlog)

    def wake(self) -> None:
        """Look at the inbox now (after the database recovers or the lease is won)."""
        self.inbox.recount_due = True
        self.inbox.wakeup.set()

    async def idle(self) -> None:
        """Return once no update is held (admitted, in memory, awaiting its done mark) or known to be stored."""
        await self.inbox.wait_until(lambda: not self.inbox.states and not self.inbox.spilling)

    async def stop(self, grace: float) -> None:
        """Finish what is in memory within ``grace`` seconds; the rest stays in the inbox."""
        self._accepting = False
        await self.inbox.wait_until(lambda: self.inbox.in_memory == 0, grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._answering.cancel_all()
        lost = sum(1 for update_id, state in self.inbox.states.items()
                   if state.in_memory and update_id in self._recent_memory_ids)
        if lost:
            log.error("[QUEUE] %d memory-only updates were not handled before shutdown", lost)
        awaiting = UpdateState.AWAITING_DONE
        await self.inbox.wait_until(lambda: not self.db.ok or awaiting not in self.inbox.states.values(), 2.0)

    @property
    def backlog(self) -> int:
        return self.inbox.backlog

    @property
    def workers_alive(self) -> bool:
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    def snapshot(self) -> dict:
        stats = self.stats
        return {
            **{f"total_{name}": getattr(stats, name) for name in ("received", "processed", "dropped", "errors")},
            "workers_active": self.workers.active,
            "queue_depth": self.inbox.in_memory - self.workers.active,
            "queue_max": self.inbox.capacity,
            "drop_rate": round(100.0 * stats.dropped / stats.received, 2) if stats.received else 0.0,
            **{name: getattr(stats, name) for name in ("duplicates", "spilled", "memory_only", "rejected")},
            "inbox_backlog": self.backlog,
            "handling_deferred": self.workers.deferred,
        }


###############################################################################
# 10. Texts and keyboards
#    Owns turning section 0's tables into what the user sees, for both the
#    dialog and the jobs: texts with their values, menus and keyboards.
###############################################################################

CAPTION_MAX_CHARS = 1024  # Telegram's photo caption limit


def plural_form(count: int, forms: tuple[str, ...]) -> str:
    """The form of a noun that agrees with ``count``: three forms follow Russian rules, two English ones.

    Russian: 1, 21, 101 -> one (символ); 2-4, 22-24 -> few (символа); 0, 5-20,
    11-14, 25-30, 111 -> many (символов).  English: 1 -> one, else the other.
    """
    if len(forms) == 2:
        return forms[0] if count == 1 else forms[1]
    tens, units = count % 100, count % 10
    if units == 1 and tens != 11:
        return forms[0]
    if 2 <= units <= 4 and not 12 <= tens <= 14:
        return forms[1]
    return forms[2]


COUNTED_NOUN = re.compile(r"\{(\w+):([^{}]*\|[^{}]*)\}")  # "{n:картинка|картинки|картинок}": a number's noun forms


def render(lang: str, key: str, **values: Any) -> str:
    """TEXTS[lang][key] filled in; any text may give a number its noun ("{n:картинка|картинки|картинок}" ->
    "5 картинок") without the caller knowing which texts do."""
    def counted(field: re.Match) -> str:
        count = values[field[1]]
        return f"{count} {plural_form(count, tuple(field[2].split('|')))}"
    return COUNTED_NOUN.sub(counted, TEXTS[lang][key]).format(**values)


def user_language(user: dict | None) -> str:
    """'ru' for Russian-reading users and when Telegram does not say; 'en' otherwise."""
    code = str((user or {}).get("language_code") or "").split("-")[0].lower()
    return "ru" if not code or code in RU_LANGUAGES else "en"


def button(text: str, data: str) -> dict:
    return {"text": text, "callback_data": data}


def keyboard(*rows: list[dict]) -> dict:
    return {"inline_keyboard": [row for row in rows if row]}


def in_rows(items: list, per_row: int) -> list[list]:
    return [items[i:i + per_row] for i in range(0, len(items), per_row)]


def main_menu(lang: str) -> dict:
    """One button per action: draw (in the model of /settings), settings, help."""
    t = TEXTS[lang]
    return keyboard([button(t["btn_create"], "new")],
                    [button(t["btn_settings"], "settings"), button(t["btn_help"], "help")])


def cancel_row(lang: str, data: str = "cancel") -> list[dict]:
    return [button(TEXTS[lang]["btn_cancel"], data)]


def ratio_keyboard(model: ImageModel, lang: str) -> dict:
    ratios = [button(ratio, f"ratio:{ratio}") for ratio in model.ratios]
    return keyboard(*in_rows(ratios, 3), cancel_row(lang))


def option_keyboard(option: ModelOption, lang: str) -> dict:
    choices = [button(labels[lang], f"opt:{value}") for value, labels in option.choices]
    return keyboard(choices, cancel_row(lang))


def marked(label: str, chosen: bool) -> str:
    return f"✅ {label}" if chosen else label


def user_defaults(settings: Mapping[str, Any], models: tuple[ImageModel, ...]) -> tuple[ImageModel, str, str]:
    """A user's /settings as (model, ratio or "" to ask every time, option), each one ``models`` still offer."""
    model = next((m for m in models if m.key == settings.get("model")), models[0])
    ratio = settings.get("ratio") if settings.get("ratio") in model.ratios else ""
    choices = [value for value, _ in model.option.choices] if model.option is not None else [""]
    option = settings.get("option") if settings.get("option") in choices else choices[0]
    return model, ratio, option


def settings_screen(settings: Mapping[str, Any], models: tuple[ImageModel, ...], lang: str) -> tuple[str, dict]:
    """/settings as one message, edited in place on each press: its text and its keyboard."""
    t = TEXTS[lang]
    model, ratio, option = user_defaults(settings, models)
    rows = in_rows([button(marked(m.title, m is model), f"set:model:{m.key}") for m in models], 2)
    rows = rows if len(models) > 1 else []
    rows += in_rows([button(marked(r, r == ratio), f"set:ratio:{r}") for r in model.ratios], 4)
    rows.append([button(marked(t["btn_ask_every_time"], not ratio), "set:ratio:")])
    extra = ""
    if model.option is not None:
        rows.append([button(marked(labels[lang], value == option), f"set:option:{value}")
                     for value, labels in model.option.choices])
        extra = render(lang, "settings_option", title=model.option.title[lang].capitalize(),
                       value=model.option.label(option, lang))
    return (render(lang, "settings", model=model.described(lang), ratio=ratio or t["settings_ask"], option=extra),
            keyboard(*rows))


def prompt_limits(model: ImageModel, lang: str) -> str:
    """How long ``model``'s prompt may be, in words: "до 1000 символов", "3 to 5000 characters"."""
    fewest, most = model.prompt_chars
    return render(lang, "limits_up_to" if fewest <= 1 else "limits_between", fewest=fewest, most=most)


def job_keyboard(rows: Iterable[Iterable[str]], job_id: str, model_key: str, lang: str) -> dict:
    """Rows of RESULT_BUTTONS naming the job, then "New picture", which keeps the model last used (after an edit:
    the default one)."""
    edit = model_key in MODELS_BY_KEY and MODELS_BY_KEY[model_key].edits
    buttons = [[button(TEXTS[lang][RESULT_BUTTONS[name][0]], f"{RESULT_BUTTONS[name][1]}:{job_id}") for name in row]
               for row in rows]
    return keyboard(*buttons, [button(TEXTS[lang]["btn_new"], f"model:{Z_IMAGE.key if edit else model_key}")])


def result_keyboard(job_id: str, model_key: str, lang: str, catalog: bool = False) -> dict:
    names = ["again", "ratio", "model", "edit", "retouch", "file"] if catalog else [
        "again", "ratio", "edit", "retouch", "file"]
    if model_key in MODELS_BY_KEY and MODELS_BY_KEY[model_key].edits:  # an edit keeps the photo's proportions
        names = ["again", "edit", "retouch", "file"]
    return job_keyboard(in_rows(names, 2), job_id, model_key, lang)


def failure_keyboard(job_id: str, model_key: str, error: str, lang: str) -> dict:
    return job_keyboard([FAILURE_BUTTONS.get(error, ("retry",))], job_id, model_key, lang)


def status_text(model: ImageModel, ratio: str, option: str, lang: str, elapsed_s: float) -> str:
    """The ⏳ message a picture's question becomes: "⏳ 16:9 · Z-Image · 0:12"."""
    seconds = max(0, int(elapsed_s))
    return TEXTS[lang]["status"].format(details=model.details(ratio, option, lang),
                                        elapsed=f"{seconds // 60}:{seconds % 60:02d}")


def left_text(remaining: tuple[int, int] | None, lang: str, credits: int = 0) -> str:
    """"17 of 20 left this hour" and the Stars credits the user has; "" for a user without either."""
    hourly = "" if remaining is None else render(lang, "left_this_hour", left=remaining[0], limit=remaining[1])
    return " ".join(filter(None, (hourly, render(lang, "balance", balance=credits) if credits > 0 else "")))


def result_caption(model: ImageModel, ratio: str, option: str, prompt: str, lang: str, left: str = "") -> str:
    """"model · ratio", the prompt (shortened to fit), and what is left: within Telegram's caption limit, which
    counts the text as shown, so the prompt is shortened before it is escaped."""
    head = html.escape(model.details(ratio, option, lang))
    tail = f"\n\n{left}" if left else ""
    room = CAPTION_MAX_CHARS - len(model.details(ratio, option, lang)) - len(left) - 3
    return f"{head}\n{html.escape(shorten(prompt, max(room, 1)))}{tail}"


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


###############################################################################
# 11. Dialog
#    Owns the conversation with a user: commands, dialog steps and button
#    presses, turning what the jobs answer into messages.  A dialog belongs to
#    (chat, forum topic, user), so a user's private chat and a group never share
#    one and two members of a group draw at once; a job belongs to its chat, and
#    a button, /cancel or an edit acts only there.  In a group the bot answers
#    only what is addressed to it, always replying to the requester's message
#    (a member's tap on another's buttons only names whose they are).
###############################################################################

def check_prompt(text: str, model: ImageModel = Z_IMAGE) -> tuple[str, dict[str, Any]] | None:
    """None if the prompt is usable for ``model``, else (text key, format values) explaining why not."""
    prompt = text.strip()
    fewest, most = model.prompt_chars
    if not prompt:
        return "prompt_empty", {}
    if "\0" in prompt:  # PostgreSQL cannot store it: the job's row would be refused
        return "prompt_nul", {}
    if len(prompt) < fewest:
        return "prompt_too_short", {"model": model.title, "fewest": fewest}
    if len(prompt) > most:
        return "prompt_too_long", {"model": model.title, "length": len(prompt), "most": most}
    return None


# What a message holds instead of text, and the answer naming it (the first match wins:
# an animation also carries a document).
NOT_TEXT_ANSWERS: tuple[tuple[str, str], ...] = (
    ("voice", "not_text_voice"), ("video_note", "not_text_video"), ("video", "not_text_video"),
    ("animation", "not_text_video"), ("sticker", "not_text_sticker"),
    ("audio", "not_text_file"), ("document", "not_text_file"),
)


def not_text_answer(message: dict) -> str:
    """The text key answering a message that carries no text where a description was expected."""
    return next((key for field, key in NOT_TEXT_ANSWERS if field in message), "prompt_not_text")


def photo_to_edit(message: dict) -> tuple[str, str]:
    """(file id, "") of the photo a message carries, its largest size a bot may download; ("", text key) when
    it carries one the bot refuses; ("", "") when it carries none.  A document counts if it is an image."""
    sizes, document = message.get("photo"), message.get("document")
    if isinstance(sizes, list) and sizes:
        fitting = [size for size in sizes if isinstance(size, dict) and isinstance(size.get("file_id"), str)
                   and (size.get("file_size") or 0) <= PHOTO_DOWNLOAD_MAX_BYTES]
        return (fitting[-1]["file_id"], "") if fitting else ("", "photo_too_large")  # Telegram lists smallest first
    if not isinstance(document, dict) or "animation" in message:
        return "", ""
    if not str(document.get("mime_type") or "").startswith("image/") or not isinstance(document.get("file_id"), str):
        return "", "photo_not_image"
    return ("", "photo_too_large") if (document.get("file_size") or 0) > PHOTO_DOWNLOAD_MAX_BYTES else (
        document["file_id"], "")


def parse_command(text: str, bot: str = "") -> str | None:
    """'/start@MyBot payload' -> '/start'; None when the text is not a command, '' when it is addressed to
    another bot than ``bot`` (our username; '' takes any: only we read a private chat)."""
    if not text.startswith("/"):
        return None
    command, _, to = text.split(maxsplit=1)[0].partition("@")
    return command.lower() if not (bot and to) or to.lower() == bot.lower() else ""


def command_argument(text: str) -> str:
    """'/draw@MyBot a red fox' -> 'a red fox'."""
    return (text.split(maxsplit=1) + [""])[1]


def for_the_bot(message: dict, bot: str) -> bool:
    """Whether a group message is addressed to the bot (``bot``: its username): a reply to one of its messages
    or a mention.  Commands are told apart by parse_command; any other group chatter is not for the bot."""
    replied_to = (message.get("reply_to_message") or {}).get("from") or {}
    text = message.get("text") or message.get("caption") or ""
    return bool(bot) and (str(replied_to.get("username", "")).lower() == bot.lower()
                          or f"@{bot.lower()}" in str(text).lower())


def group_reply(chat: dict, requester_message: dict) -> dict[str, Any]:
    """sendMessage's placement for an answer in a group: a reply to the requester's message, in its forum topic
    (so the requester's ForceReply and a member's button find their picture); nothing in a private chat."""
    if chat.get("type") == "private" or not isinstance(requester_message.get("message_id"), int):
        return {}
    placement: dict[str, Any] = {"reply_parameters": {"message_id": requester_message["message_id"],
                                                      "allow_sending_without_reply": True}}
    if requester_message.get("is_topic_message") and isinstance(requester_message.get("message_thread_id"), int):
        placement["message_thread_id"] = requester_message["message_thread_id"]
    return placement


ALBUMS_REMEMBERED = 10_000  # albums whose first photo was taken, kept so their others are told apart
PRESSES_REMEMBERED = 10_000  # dialogs whose last press is kept to tell a double tap
ADMIN_COMMANDS = frozenset({"/stats", "/refund"})  # to anyone else, answered with the hint


@dataclasses.dataclass
class Context:
    """Who an update came from, where to answer, and the answers, through the outbox (section 13): a handler
    never waits for Telegram.

    The dialog has one open question: each new one (or the dialog's end) takes the keyboard off the one before.
    A question edited into a pressed message is known at once; a sent one's id comes back from the outbox once
    Telegram has it (memory only: after a restart an old question may keep its buttons, which answer as stale).
    """

    chat_id: int
    user_id: int
    lang: str
    outbox: Outbox
    conversation: Conversation  # keeps the dialog's state
    callback_id: str = ""
    answered: bool = False
    message_id: int = 0  # the message whose button was pressed: it evolves instead of a new one being sent
    photo: str = ""  # the file id of the photo under the pressed button (a result's)
    repeated: bool = False  # the dialog's previous press was this one, with no message between: a double tap
    placement: dict[str, Any] = dataclasses.field(default_factory=dict)  # group_reply: {} in a private chat

    @property
    def dialog(self) -> DialogKey:
        return self.chat_id, self.placement.get("message_thread_id", 0), self.user_id

    @property
    def state(self) -> dict:
        return self.conversation.get(self.dialog) or {}

    @property
    def settings(self) -> dict:
        return self.conversation.user_settings.get(self.user_id, {})

    async def answer(self, text: str = "", alert: bool = False) -> None:
        """Answer the button press, once: a popup with ``text`` (a box to close when ``alert``), or nothing shown."""
        answered, self.answered = self.answered, True
        if self.callback_id and not answered:  # (a message, not a press: nothing to answer)
            await self.outbox.telegram.answer_callback(self.callback_id, text, show_alert=alert)

    async def send(self, key: str, markup: dict | None = None, **values: Any) -> None:
        await self.outbox.send_message(self.chat_id, render(self.lang, key, **values), markup, **self.placement)

    async def send_hint(self) -> None:
        await self.send("hint", main_menu(self.lang))

    async def edit(self, message_id: int, text: str, markup: dict | None = None) -> None:
        """Turn one of our messages into ``text``: the dialog's messages evolve rather than pile up."""
        params = {"chat_id": self.chat_id, "message_id": message_id, "text": text, "parse_mode": "HTML",
                  "reply_markup": markup or {"inline_keyboard": []}}
        try:
            await self.outbox.call("editMessageText", params)
        except TelegramError as error:  # gone, too old or unchanged: the dialog goes on without it
            log.info("[BOT] could not edit message %d: %s", message_id, error.description)

    async def reply(self, key: str, markup: dict | None = None, **values: Any) -> None:
        if self.message_id:
            await self.edit(self.message_id, render(self.lang, key, **values), markup)
        else:
            await self.send(key, markup, **values)

    async def ask(self, state: dict, key: str, markup: dict, message_id: int = 0, **values: Any) -> None:
        """The dialog's next question, with ``state``: sent, or ``message_id`` edited into it."""
        question = secrets.token_hex(4)
        await self.set_state({**state, "question": question, "question_id": message_id}, keep=message_id)
        if message_id:
            await self.edit(message_id, render(self.lang, key, **values), markup)
        else:
            await self.outbox.send_message(self.chat_id, render(self.lang, key, **values), markup,
                                           **self.placement, on_sent=functools.partial(self._asked, question))

    def _asked(self, question: str, message: Any) -> None:
        state = self.state
        if state.get("question") == question and isinstance(message, dict):
            state["question_id"] = message.get("message_id") or 0  # memory; stored with the dialog's next change

    async def set_state(self, state: dict | None, keep: int = 0) -> None:
        """Change the dialog; its open question loses its keyboard unless it is ``keep`` or the pressed message
        (each is edited into what comes next)."""
        old = self.state.get("question_id")
        await self.conversation.set(self.dialog, state)
        if old and old not in (keep, self.message_id):
            await self.retire(old)

    async def retire(self, message_id: int) -> None:
        """Take the keyboard off a message whose buttons no longer mean anything."""
        await self.outbox.call("editMessageReplyMarkup", {"chat_id": self.chat_id, "message_id": message_id,
                                                          "reply_markup": {"inline_keyboard": []}})


def stats_values(usage: dict, queue: dict, t: dict[str, str]) -> dict[str, Any]:
    """The figures /stats shows, by the names its text uses: the jobs' usage and the pipeline's counts."""
    jobs_today = ", ".join(f"{t.get(f'outcome_{outcome}', outcome)} {n}"
                           for outcome, n in sorted(usage["jobs_today"].items())) or "0"
    return {**usage, "jobs_today": jobs_today, "received": queue.get("total_received"),
            "processed": queue.get("total_processed"), "errors": queue.get("total_errors"),
            "queue_depth": queue.get("queue_depth"), "backlog": queue.get("inbox_backlog")}


class PictureSteps:
    """The dialog's steps toward a picture: the description, the ratio, the option, and the job's start.

    A description outside a question starts a picture (at once in the user's default format).  A new or edited
    description before the job starts replaces the old one and the open question is asked again (the old one loses
    its keyboard).  A description too long for the model is kept, with the models that take it offered.  A photo
    in a private chat is an edit: with a caption it starts at once, else the user is asked what to change; an
    album's first photo is taken, its others are told so once.
    """

    def __init__(self, conversation: Conversation):
        self.dialog = conversation
        self.generations = conversation.generations
        self.models_by_key = conversation.models_by_key
        self.albums: dict[str, int] = {}  # album (media group) id -> its photos seen, the latest last

    async def may_draw(self, ctx: Context) -> bool:
        """Whether a picture may be asked for now; if not, the user is told why before typing or tapping more."""
        if not self.generations.kie.configured:  # only admins can fix it, so only they read how
            await ctx.send("not_configured_admin" if ctx.user_id in self.dialog.config.admin_ids else "not_configured")
            return False
        return not await self.refused(ctx)

    async def refused(self, ctx: Context, cost: int = 1, popup: bool = False) -> bool:
        """Whether the jobs refuse the user a picture of ``cost`` credits now, the user told why: past the hourly
        limit with the ⭐ packs that lift it, else in a popup (a press that would start it) or a message."""
        refusal = self.generations.refusal(ctx.user_id, cost)
        if refusal is None:
            return False
        key, values = refusal
        if key == "hourly_limit" and self.dialog.stars.selling(ctx):
            await ctx.answer()
            await self.dialog.stars.offer(ctx, render(ctx.lang, key, **values) + "\n\n")
        elif popup:
            await ctx.answer(render(ctx.lang, key, **values), alert=key != "busy_user")
        else:
            await ctx.send(key, keyboard(cancel_row(ctx.lang, "stop")) if key == "busy_user" else None, **values)
        return True

    async def ask_for(self, ctx: Context, model: ImageModel) -> None:
        """Asks for a description; a question already open is replaced (the dialog starts over, in this model)."""
        await ctx.answer()
        if ctx.repeated or not await self.may_draw(ctx):
            return  # (a second tap on the same button: the question is out already)
        # In a group the answer must reach the bot under privacy mode: a reply, which a selective ForceReply
        # opens for the requester alone (the question replies to them); /cancel closes it.
        cancel = keyboard(cancel_row(ctx.lang)) if not ctx.placement else {"force_reply": True, "selective": True}
        await ctx.ask({"step": "prompt", "model": model.key, "lang": ctx.lang}, "ask_prompt", cancel,
                      model=model.title, limits=prompt_limits(model, ctx.lang))

    async def on_draw_command(self, ctx: Context, message: dict) -> None:
        description = command_argument(message.get("text", ""))
        if description:
            await self.draw(ctx, description, message.get("message_id"))
        else:
            await self.on_create_button(ctx, "")

    async def on_settings(self, ctx: Context, message: dict) -> None:
        """The user's default model, format and quality.  With a default format a description is drawn at once;
        without one ("ask every time", the default) the format question follows it."""
        text, markup = settings_screen(ctx.settings, self.dialog.models, ctx.lang)
        await self.dialog.outbox.send_message(ctx.chat_id, text, markup, **ctx.placement)

    async def on_settings_button(self, ctx: Context, argument: str) -> None:
        """A choice on the /settings screen: remembered durably, and the screen edited to show it."""
        name, _, value = argument.partition(":")
        model, ratio, option = user_defaults({**ctx.settings, name: value}, self.dialog.models)
        settings = {"model": model.key, "ratio": ratio, "option": option}
        if settings.get(name) != value:
            return  # a forged button, or one for a model no longer offered: answered as stale
        await ctx.answer()
        await self.dialog.choose("user_settings", ctx.user_id, settings)
        await ctx.edit(ctx.message_id, *settings_screen(settings, self.dialog.models, ctx.lang))

    async def draw(self, ctx: Context, text: str, message_id: Any) -> None:
        """A description: drawn at once in the user's default format (/settings), else the format question."""
        settings = ctx.settings
        model, ratio, option = user_defaults({**settings, "model": ctx.state.get("model", settings.get("model"))},
                                             self.dialog.models)
        if not await self.may_draw(ctx):
            return
        if not ratio:
            await self.dialog.set(ctx.dialog, {"step": "prompt", "model": model.key, "lang": ctx.lang})
            await self.take(ctx, text, message_id)
        elif not await self.refuse(ctx, model, text):
            await self.generate(ctx, model, text.strip(), ratio, option, 0)

    async def on_long_prompt_button(self, ctx: Context, key: str) -> None:
        """A model offered for a description too long for the one chosen: the description goes on with it."""
        state = ctx.state
        model, prompt = self.models_by_key.get(key), state.get("prompt", "")
        if state.get("step") != "prompt" or model is None or not prompt or check_prompt(prompt, model) is not None:
            return  # stale, forged, or tapped twice
        await ctx.answer()
        await ctx.set_state({"step": "prompt", "model": model.key, "lang": ctx.lang})
        await self.draw(dataclasses.replace(ctx, message_id=0), prompt, 0)

    async def take(self, ctx: Context, text: str, message_id: Any) -> None:
        """The answer to the prompt question, or a new description while a ratio or option question is open."""
        state = ctx.state
        step = state.get("step")
        model = self.models_by_key.get(state.get("model", ""), Z_IMAGE if step == "prompt" else None)
        if model is None:  # (a saved dialog can outlive a catalog change)
            await ctx.send_hint()
            return
        if await self.refuse(ctx, model, text):
            return
        prompt = text.strip()
        state = {**state, "step": "ratio" if step == "prompt" else step, "model": model.key, "prompt": prompt,
                 "prompt_message_id": message_id if isinstance(message_id, int) else 0}
        shown = html.escape(shorten(prompt, 200))
        if step == "option" and model.option is not None:
            await ctx.ask(state, "prompt_replaced_option", option_keyboard(model.option, ctx.lang), prompt=shown,
                          option=model.option.title[ctx.lang])
        else:
            key = "ask_ratio" if step == "prompt" else "prompt_replaced"
            await ctx.ask(state, key, ratio_keyboard(model, ctx.lang), prompt=shown)

    async def on_edit(self, message: dict) -> None:
        """Only an edit of the message that gave the prompt counts; other edits get no answer."""
        ctx = self.dialog.message_context(message)
        text, message_id = message.get("text"), message.get("message_id")
        if (ctx is not None and ctx.state.get("step") in ("ratio", "option") and isinstance(message_id, int)
                and message_id == ctx.state.get("prompt_message_id")
                and isinstance(text, str) and parse_command(text) is None):
            await self.take(ctx, text, message_id)

    async def refuse(self, ctx: Context, model: ImageModel, text: str) -> bool:
        """Tells the user why ``text`` cannot be ``model``'s prompt; False if it can."""
        problem = check_prompt(text, model)
        takers = [m for m in self.models_by_key.values() if check_prompt(text, m) is None]
        if problem is not None and problem[0] == "prompt_too_long" and takers:
            offer = keyboard(*in_rows([button(m.title, f"long:{m.key}") for m in takers], 2), cancel_row(ctx.lang))
            await ctx.ask({"step": "prompt", "model": model.key, "lang": ctx.lang, "prompt": text.strip()},
                          "prompt_too_long_models", offer, **problem[1])
        elif problem is not None:
            await ctx.send(problem[0], **problem[1])
        return problem is not None

    async def on_create_button(self, ctx: Context, argument: str) -> None:
        await self.ask_for(ctx, user_defaults(ctx.settings, self.dialog.models)[0])

    async def on_model_button(self, ctx: Context, key: str) -> None:
        model = self.models_by_key.get(key)
        if model is not None:
            await self.ask_for(ctx, model)

    async def on_ratio_button(self, ctx: Context, ratio: str) -> None:
        state = ctx.state
        model = self.models_by_key.get(state.get("model", ""))
        if state.get("step") != "ratio" or model is None or ratio not in model.ratios:
            return  # a stale or forged button, or a second tap: answered as stale, nothing changes
        if model.option is None:
            await self.generate(ctx, model, state["prompt"], ratio)
            return
        await ctx.answer()
        await self.dialog.set(ctx.dialog, {**state, "step": "option", "ratio": ratio})
        await ctx.reply("ask_option", option_keyboard(model.option, ctx.lang), option=model.option.title[ctx.lang])

    async def on_option_button(self, ctx: Context, value: str) -> None:
        state = ctx.state
        model = self.models_by_key.get(state.get("model", ""))
        if state.get("step") != "option" or model is None or model.option is None:
            return  # (a saved dialog can outlive a catalog change)
        if value in dict(model.option.choices):
            await self.generate(ctx, model, state["prompt"], state["ratio"], value)

    async def generate(self, ctx: Context, model: ImageModel, prompt: str, ratio: str, option: str = "",
                       status_message_id: int | None = None, image: str = "") -> None:
        """Start the picture; the pressed message (or ``status_message_id``) becomes its ⏳ status.  With 0 (no
        text message to evolve, as under a photo) the job posts its own status message."""
        if await self.refused(ctx, model.credits, popup=True):
            return
        # A user's presses and group messages run in different queues (by user, by chat): from the check to
        # the job the user counts as busy, so two at once never both start.
        self.generations.starting.add(ctx.user_id)
        try:
            await ctx.answer()
            status_message_id = ctx.message_id if status_message_id is None else status_message_id
            if status_message_id:
                await ctx.edit(status_message_id, status_text(model, ratio, option, ctx.lang, 0),
                               keyboard(cancel_row(ctx.lang)))
            # The dialog ends only once the job is stored, so a press replayed after kill -9
            # never finds the dialog over and no job to show for it.
            await self.generations.start(ctx.user_id, ctx.chat_id, ctx.lang, model, prompt, ratio, option,
                                         status_message_id, image)
        finally:
            self.generations.starting.discard(ctx.user_id)
        await ctx.set_state(None, keep=status_message_id)

    async def on_photo(self, ctx: Context, message: dict) -> None:
        photo, refusal = photo_to_edit(message)
        if refusal:
            await ctx.send(refusal)
        elif not await self.album_seen(ctx, message.get("media_group_id")):
            caption = message.get("caption")
            if isinstance(caption, str) and caption.strip():
                await self.start_edit(ctx, photo, caption)
            elif await self.may_draw(ctx):
                await self.ask_what(ctx, photo)

    async def album_seen(self, ctx: Context, album: Any) -> bool:
        """Whether an album's earlier photo was taken already (each comes in its own message; one is edited)."""
        if not isinstance(album, str):
            return False
        seen = self.albums.pop(album, 0)
        self.albums[album] = seen + 1
        if len(self.albums) > ALBUMS_REMEMBERED:
            del self.albums[next(iter(self.albums))]
        if seen == 1:
            await ctx.send("album_one_photo")
        return seen > 0

    async def ask_what(self, ctx: Context, photo: str) -> None:
        state = {"step": "edit", "model": EDIT_MODEL.key, "lang": ctx.lang, "image": photo}
        await ctx.ask(state, "ask_edit", keyboard(cancel_row(ctx.lang)))

    async def start_edit(self, ctx: Context, photo: str, text: str) -> None:
        if not await self.may_draw(ctx):
            return
        problem = check_prompt(text, EDIT_MODEL)
        if problem is not None:
            await ctx.send(problem[0], **problem[1])
        else:
            await self.generate(ctx, EDIT_MODEL, text.strip(), "", "", 0, image=photo)


class Conversation:
    """Routes each update to a handler: commands, dialog steps and buttons by table; keeps each open dialog, each
    user's language and /settings in memory, written through (reads never touch the database: /start needs none).

    A dialog's state, per (chat, topic, user), is {"step": "prompt" | "ratio" | "option" | "edit" | "model",
    "model": key, "lang": ..., "prompt": ..., "prompt_message_id": ..., "ratio": ..., "image": an edit's
    photo, "question"/"question_id": see Context}.  In a private chat any text is a description and a photo an
    edit.  A dialog speaks the language it started in.  Button data is untrusted: a value not in the tables or
    not matching the user's step is answered politely and changes nothing.
    """

    def __init__(self, config: Config, outbox: Outbox, db: Database, generations: Generations, *,
                 clock: Clock = SYSTEM_CLOCK, queue_stats: Callable[[], dict] = dict):
        self.config = config
        self.outbox = outbox
        self.db = db
        self.clock = clock
        self.generations = generations
        self.dialogs: dict[DialogKey, tuple[float, dict]] = {}  # key -> (written at, wall clock: it is stored)
        self.languages: dict[int, str] = {}  # user id -> their /language
        self.user_settings: dict[int, dict] = {}  # user id -> their /settings
        self.models = (Z_IMAGE,) if config.single_model_only else CATALOG
        self.models_by_key = {model.key: model for model in self.models}
        self.queue_stats = queue_stats  # the pipeline's snapshot, for /stats
        # Each dialog's last press (message id, data) since its last message, to tell a double tap (memory only).
        self.presses: dict[DialogKey, tuple[int, Any]] = {}
        self.username = ""  # the bot's, from getMe: a group's commands and mentions are told by it
        self.steps = PictureSteps(self)
        self.stars = StarsShop(self)
        self.commands: dict[str, Callable[[Context, dict], Awaitable[None]]] = {
            "/start": self.on_start, "/cancel": self.on_cancel, "/stats": self.on_stats,
            "/settings": self.steps.on_settings, "/draw": self.steps.on_draw_command, **self.stars.commands,
            "/help": lambda ctx, _: ctx.send("help", main_menu(ctx.lang)),
            "/language": lambda ctx, _: ctx.send("choose_language", keyboard(
                [button(name, f"lang:{lang}") for lang, name in LANGUAGES.items()]))}
        self.buttons: dict[str, Callable[[Context, str], Awaitable[None]]] = {
            "new": self.steps.on_create_button, "model": self.steps.on_model_button,
            "ratio": self.steps.on_ratio_button, "opt": self.steps.on_option_button,
            "long": self.steps.on_long_prompt_button, "lang": self.on_language_button,
            "set": self.steps.on_settings_button, "buy": self.stars.on_pack_button, **JobButtons(self).handlers(),
            **{verb: functools.partial(self.on_menu_button, f"/{verb}") for verb in ("cancel", "help", "settings")}}

    async def handle(self, update: dict) -> None:
        REPLYING_TO.set(update.get("update_id"))
        for kind, handler in (("message", self.on_message), ("edited_message", self.steps.on_edit),
                              ("callback_query", self.on_callback_query)):
            if isinstance(update.get(kind), dict):
                return await handler(update[kind])

    # -- dialogs, languages and settings: in memory, written through -------------

    async def load(self) -> int:
        """Read the open dialogs, every language and /settings (on taking over): from then on only writes wait for
        the database.  The number of dialogs."""
        rows, languages, settings = await self.db.read(dialogs_load, self.clock.time() - DIALOG_IDLE_S)
        self.dialogs = {(chat, topic, user): (at, json.loads(state))
                        for chat, topic, user, at, state in rows[-DIALOGS_MAX:]}
        self.languages = dict(languages)
        self.user_settings = {user_id: json.loads(chosen) for user_id, chosen in settings}
        return len(self.dialogs)

    def get(self, key: DialogKey) -> dict | None:
        """A dialog's state; None when there is none or it was abandoned (DIALOG_IDLE_S)."""
        at, state = self.dialogs.get(key, (0.0, None))
        return state if self.clock.time() - at < DIALOG_IDLE_S else None

    async def set(self, key: DialogKey, state: dict | None) -> None:
        """Replace a dialog's state (None ends it) and store it; abandoned dialogs go meanwhile.  A write that fails
        is logged and the state kept in memory: the dialog goes on, it would just not survive a restart."""
        now = self.clock.time()
        if self.dialogs.pop(key, None) is None and state is None:
            return
        if state is not None:
            self.dialogs[key] = now, state  # last: the dialogs are in the order written, abandoned ones first
        while self.dialogs and (len(self.dialogs) > DIALOGS_MAX
                                or now - next(iter(self.dialogs.values()))[0] >= DIALOG_IDLE_S):
            del self.dialogs[next(iter(self.dialogs))]
        if self.db.ok:
            with contextlib.suppress(DatabaseUnavailable, RowRejected):  # logged there
                await self.db.submit(dialogs_save, (key, state, now))

    async def choose(self, table: str, user_id: int, value: str | dict) -> None:
        """A user's /language (``table`` user_languages) or /settings (user_settings), held in memory until a
        restart when the database cannot take it."""
        (self.languages if table == "user_languages" else self.user_settings)[user_id] = value
        try:
            await self.db.write(store_choice, table, user_id, value)
        except DatabaseUnavailable:
            pass  # Database logged why
        except RowRejected as error:
            log.warning("[DB] a choice of %d not stored: %s", user_id, error)

    def language(self, user_id: int, user: dict) -> str:
        chosen = self.languages.get(user_id, "")
        return chosen if chosen in TEXTS else user_language(user)

    def context(self, chat: dict, user_id: int, user: dict, requester: dict, callback_id: str = "") -> Context:
        """Who and where (in a group, the ``requester``'s message is replied to); an open dialog keeps its
        language even if the user's app changes its own."""
        ctx = Context(chat["id"], user_id, "", self.outbox, self, callback_id, placement=group_reply(chat, requester))
        lang = ctx.state.get("lang")
        ctx.lang = lang if lang in TEXTS else self.language(user_id, user)
        return ctx

    def message_context(self, message: dict) -> Context | None:
        chat, user = message.get("chat") or {}, message.get("from") or {}
        if not isinstance(chat.get("id"), int):
            return None
        return self.context(chat, user.get("id") or chat["id"], user, message)

    async def bot_username(self) -> str:
        """The bot's username (getMe, asked once it answers): '' while Telegram cannot say."""
        if not self.username:
            try:
                self.username = str((await self.outbox.telegram.call("getMe") or {}).get("username") or "")
            except TelegramError as error:
                log.warning("[BOT] getMe failed: %s", error.description)
        return self.username

    async def on_message(self, message: dict) -> None:
        ctx = self.message_context(message)
        if ctx is None:
            return
        self.presses.pop(ctx.dialog, None)  # a press after a message is no repeat of the one before
        text = message.get("text")
        private = (message.get("chat") or {}).get("type") == "private"
        bot = "" if private else await self.bot_username()
        command = parse_command(text, bot) if isinstance(text, str) else None
        step = ctx.state.get("step")
        service = next((field for field in self.stars.services if isinstance(message.get(field), dict)), None)
        if service is not None:  # a payment's news: never a prompt or a step of the dialog
            await self.stars.services[service](ctx, message[service])
        elif fits_sqlite_integer(message.get("migrate_to_chat_id")):  # (queued messages follow: TelegramClient.call)
            await self.generations.move_chat(ctx.chat_id, message["migrate_to_chat_id"])
        elif not (private or command or for_the_bot(message, bot)):
            return  # group chatter, or another bot's command: not ours to answer
        elif command in ADMIN_COMMANDS and ctx.user_id not in self.config.admin_ids:
            await ctx.send_hint()
        elif command in self.commands:
            await self.commands[command](ctx, message)
        elif command is not None:  # never a prompt; an open dialog stays open
            await ctx.send("unknown_command")
        elif private and any(photo_to_edit(message)):
            await self.steps.on_photo(ctx, message)
        elif not isinstance(text, str):
            await (ctx.send(not_text_answer(message)) if step else ctx.send_hint())
        elif step == "edit":
            await self.steps.start_edit(ctx, ctx.state.get("image", ""), text)
        elif step in ("ratio", "option"):
            await self.steps.take(ctx, text, message.get("message_id"))
        elif step == "prompt" or private:  # in a private chat any text is a description (in a group, /draw's)
            await self.steps.draw(ctx, text, message.get("message_id"))
        else:
            await ctx.send_hint()

    async def on_callback_query(self, query: dict) -> None:
        user, pressed = query.get("from") or {}, query.get("message") or {}
        chat = pressed["chat"] if (pressed.get("chat") or {}).get("id") else {"id": user.get("id")}
        requester = pressed.get("reply_to_message") or {}  # in a group, our messages reply to the requester's
        ctx = self.context(chat, user.get("id") or 0, user, requester, str(query.get("id", "")))
        message_id = pressed.get("message_id")
        ctx.message_id = message_id if isinstance(message_id, int) and fits_sqlite_integer(message_id) else 0
        ctx.photo = photo_to_edit(pressed)[0]
        owner = requester.get("from") or {}
        if ctx.placement and owner.get("id") not in (None, ctx.user_id):  # a member's picture: theirs to steer
            name = shorten(str(owner.get("first_name", "")), 64)  # (a pop-up holds 200 characters)
            return await ctx.answer(render(ctx.lang, "not_your_picture", name=name), alert=True)
        data = query.get("data")
        ctx.repeated = bool(ctx.message_id) and self.presses.pop(ctx.dialog, None) == (ctx.message_id, data)
        self.presses[ctx.dialog] = ctx.message_id, data
        if len(self.presses) > PRESSES_REMEMBERED:
            del self.presses[next(iter(self.presses))]
        verb, _, argument = data.partition(":") if isinstance(data, str) else ("", "", "")
        handler = self.buttons.get(verb)
        try:
            if handler is not None and isinstance(ctx.chat_id, int) and ctx.user_id:
                await handler(ctx, argument)
        finally:
            if not ctx.answered:  # every query gets an answer, forged and failing ones too
                await ctx.answer(TEXTS[ctx.lang]["stale_button"])

    # -- commands -----------------------------------------------------------

    async def on_menu_button(self, command: str, ctx: Context, argument: str) -> None:
        """A menu button does what its command does, the press answered first."""
        await ctx.answer()
        await self.commands[command](ctx, {})

    async def on_start(self, ctx: Context, message: dict) -> None:
        """Must answer whatever else is broken: no database read, a fallback menu."""
        try:
            lang = self.language(ctx.user_id, message.get("from") or {})  # /start ends the dialog and its language
            menu = main_menu(lang)
            text = TEXTS[lang]["start"]
            left = left_text(self.generations.remaining(ctx.user_id), lang,  # from memory: no database read
                             self.generations.balance(ctx.user_id))
            text += f"\n\n{left}" if left else ""
        except Exception:
            log.exception("[BOT] main menu failed; sending the fallback")
            menu, text = FALLBACK_MENU, TEXTS["ru"]["start"]
        try:
            await ctx.set_state(None)
        except Exception:
            log.exception("[BOT] could not reset the dialog of %d", ctx.user_id)
        await self.outbox.send_message(ctx.chat_id, text, menu, **ctx.placement)

    async def on_cancel(self, ctx: Context, message: dict | None = None) -> None:
        """Close the open question or stop the running picture, and say truthfully which it was."""
        had_question = bool(ctx.state)
        await ctx.set_state(None)
        menu = main_menu(ctx.lang)
        outcome, job = await self.generations.cancel(ctx.user_id, ctx.chat_id, ctx.message_id)
        if outcome == "cancelled" and job is not None and job.status_message_id:  # the ⏳ message says it
            await ctx.edit(job.status_message_id, TEXTS[ctx.lang]["cancelled_job"], menu)
        elif outcome == "cancelled":
            await ctx.reply("cancelled_job", menu)
        elif outcome == "too_late":
            await ctx.send("cancel_too_late")
        else:
            await ctx.reply("cancelled" if had_question else "nothing_to_cancel", menu)

    async def on_stats(self, ctx: Context, message: dict) -> None:
        usage = await self.generations.book.usage(self.generations.kie, self.generations.clock.time())
        values = stats_values(usage, self.queue_stats(), TEXTS[ctx.lang])
        await self.outbox.send_message(ctx.chat_id, render(ctx.lang, "stats", **values) + await self.stars.stats(ctx),
                                       **ctx.placement)

    async def on_language_button(self, ctx: Context, lang: str) -> None:
        """The user's choice of RU or EN, remembered, and applied to an open dialog."""
        if lang not in LANGUAGES:
            return  # a forged button: answered as stale
        await ctx.answer()
        await self.choose("user_languages", ctx.user_id, lang)
        state = ctx.state
        if state and state.get("lang") != lang:  # a choice made on purpose applies at once
            await self.set(ctx.dialog, {**state, "lang": lang})
        await dataclasses.replace(ctx, lang=lang).send("language_set", main_menu(lang))



PACK_PAYLOAD = re.compile(r"pack:([0-9]{1,7}):([0-9]{1,6})")  # an invoice's payload: its credits and its Stars
PRE_CHECKOUT_ANSWER_S = 8.0  # Telegram cancels the payment unless the answer arrives within 10 s
STAR_TRANSACTIONS_MAX = 10_000  # transactions a reconciliation reads at most (getStarTransactions: 100 a page)


def paid_pack(payload: Any) -> tuple[int, int] | None:
    """(credits, stars) an invoice payload names; None for one this bot never wrote."""
    match = PACK_PAYLOAD.fullmatch(payload) if isinstance(payload, str) else None
    return (int(match[1]), int(match[2])) if match else None


def pre_checkout_refusal(query: dict, packs: tuple[tuple[int, int], ...]) -> str | None:
    """None when a pre-checkout query pays for a pack on sale now, at its price; else the TEXTS key saying why not."""
    pack = paid_pack(query.get("invoice_payload"))
    on_sale = pack in packs and query.get("currency") == "XTR" and query.get("total_amount") == pack[1]
    return None if on_sale else "pay_stale"


def star_transactions(transactions: list) -> tuple[list[tuple[str, int, tuple[int, int]]], list[str]]:
    """getStarTransactions' answer -> payments for our invoices (charge id, payer, pack), and refunded charge ids
    (a payment's transaction id is its telegram_payment_charge_id, a refund's that of the payment it returns)."""
    payments, refunds = [], []
    for transaction in (t for t in transactions if isinstance(t, dict) and isinstance(t.get("id"), str)):
        source, receiver = transaction.get("source") or {}, transaction.get("receiver") or {}
        payer, pack = (source.get("user") or {}).get("id"), paid_pack(source.get("invoice_payload"))
        if source.get("type") == "user" and pack is not None and isinstance(payer, int):
            payments.append((transaction["id"], payer, pack))
        elif receiver.get("type") == "user":
            refunds.append(transaction["id"])
    return payments, refunds


class StarsShop:
    """Credits for Telegram Stars: /buy and the ⭐ buttons, invoices, the pre-checkout answer, payments, refunds.

    Invoices go to private chats only, in XTR with no provider token, the payload naming the pack.  The pipeline
    has the pre-checkout query answered at once (Telegram cancels the payment after 10 s)."""

    def __init__(self, conversation: Conversation):
        self.dialog = conversation
        self.packs = conversation.config.stars_packs
        self.generations = conversation.generations
        self.commands: dict[str, Callable[[Context, dict], Awaitable[None]]] = {
            "/buy": lambda ctx, message: self.offer(ctx), "/refund": self.on_refund,
            "/balance": lambda ctx, _: ctx.send("balance", balance=self.generations.balance(ctx.user_id)),
            "/paysupport": lambda ctx, message: ctx.send("paysupport")}
        self.services = {  # what a payment's service message carries, and who handles it
            "successful_payment": self.on_payment,
            "refunded_payment": lambda ctx, refund: self.refunded(str(refund.get("telegram_payment_charge_id", "")),
                                                                  ctx.lang)}

    def selling(self, ctx: Context) -> bool:
        return bool(self.packs) and ctx.chat_id == ctx.user_id  # a private chat's id is its user's

    async def offer(self, ctx: Context, lead: str = "") -> None:
        """The packs as ⭐ buttons under ``lead``, in a private chat; elsewhere, where to buy them."""
        if not self.selling(ctx):
            await ctx.send("buy_in_private" if self.packs else "unknown_command")
            return
        text = lead + render(ctx.lang, "buy_offer", balance=self.generations.balance(ctx.user_id))
        packs = [[button(render(ctx.lang, "btn_pack", credits=credits, stars=stars), f"buy:{credits}:{stars}")]
                 for credits, stars in self.packs]
        await self.dialog.outbox.send_message(ctx.chat_id, text, keyboard(*packs))

    async def on_pack_button(self, ctx: Context, argument: str) -> None:
        """⭐ pressed: the invoice for that pack, if it is still on sale (else the press is stale)."""
        pack = paid_pack(f"pack:{argument}")
        if pack not in self.packs or not self.selling(ctx):
            return
        await ctx.answer()
        title = render(ctx.lang, "btn_pack", credits=pack[0], stars=pack[1])
        await self.dialog.outbox.call("sendInvoice", {
            "chat_id": ctx.chat_id, "title": title, "payload": "pack:{}:{}".format(*pack), "provider_token": "",
            "description": render(ctx.lang, "invoice_description", credits=pack[0]), "currency": "XTR",
            "prices": [{"label": title, "amount": pack[1]}]})

    async def answer_pre_checkout(self, query: dict, may_record: bool) -> None:
        """Yes for a pack on sale at its price while this instance can record the payment durably; else no, and why."""
        user = query.get("from") if isinstance(query.get("from"), dict) else {}
        refusal = pre_checkout_refusal(query, self.packs) if may_record else "pay_unavailable"
        params: dict[str, Any] = {"pre_checkout_query_id": str(query.get("id", "")), "ok": refusal is None}
        if refusal is not None:
            params["error_message"] = TEXTS[self.dialog.language(user.get("id") or 0, user)][refusal]
            log.info("[STARS] checkout of user %s refused: %s", user.get("id"), refusal)
        async with asyncio.timeout(PRE_CHECKOUT_ANSWER_S):
            await self.dialog.outbox.telegram.call("answerPreCheckoutQuery", params)

    async def on_payment(self, ctx: Context, payment: dict) -> None:
        pack, charge_id = paid_pack(payment.get("invoice_payload")), payment.get("telegram_payment_charge_id")
        if pack is None or not isinstance(charge_id, str) or not charge_id:
            log.error("[STARS] a payment of user %d names no pack of ours: %r", ctx.user_id, payment)
            return
        # A database that cannot record it raises (logged); the next start's reconciliation credits it.
        if await self.generations.write_ledger(("paid", charge_id, ctx.user_id, *pack)):
            log.info("[STARS] user %d paid %d Stars for %d credits (%s)", ctx.user_id, pack[1], pack[0], charge_id)
            await ctx.send("paid", credits=pack[0], balance=self.generations.balance(ctx.user_id))

    async def refunded(self, charge_id: str, lang: str = "") -> list[tuple]:
        """Take what is left of a refunded pack, once, and tell its buyer; the ledger rows written."""
        written = await self.generations.write_ledger(("refunded", charge_id))
        for _, _, user_id, removed, _ in written:
            await self.tell(user_id, "refunded", lang, removed=-removed, balance=self.generations.balance(user_id))
        return written

    async def on_refund(self, ctx: Context, message: dict) -> None:
        """An admin's ``/refund <charge id>``: Telegram returns the Stars, the ledger takes what is left of the pack."""
        words = str(message.get("text", "")).split()
        paid = await self.dialog.db.read(ledger_entry, f"paid:{words[1]}") if len(words) == 2 else None
        if paid is None:
            await ctx.send("refund_unknown")
            return
        try:
            await self.dialog.outbox.telegram.call(
                "refundStarPayment", {"user_id": paid[0], "telegram_payment_charge_id": words[1]})
        except TelegramError as error:
            await ctx.send("refund_failed", reason=html.escape(error.description))
            return
        for _, _, user_id, removed, _ in await self.refunded(words[1]):
            await ctx.send("refund_done", user=user_id, removed=-removed)

    async def stats(self, ctx: Context) -> str:
        """The ledger's totals for /stats; "" when nothing was ever sold (or the database cannot say)."""
        query = "SELECT kind, COUNT(*), ABS(SUM(credits)), SUM(stars) FROM credits GROUP BY kind"
        try:
            rows = await self.dialog.db.read(lambda conn: conn.execute(query).fetchall())
        except DatabaseUnavailable:
            return ""
        totals = collections.defaultdict(lambda: (0, 0, 0), {kind: tuple(map(int, row)) for kind, *row in rows})
        (payments, sold, stars), refunds = totals["paid"], totals["refunded"][0]
        return render(ctx.lang, "stats_stars", payments=payments, stars=stars, refunds=refunds, sold=sold,
                      spent=totals["spent"][1], returned=totals["returned"][1]) if payments else ""

    async def tell(self, user_id: int, key: str, lang: str = "", **values: Any) -> None:
        """A message to a user in their private chat, in ``lang`` or else the language they chose."""
        text = render(lang or self.dialog.language(user_id, {}), key, **values)
        await self.dialog.outbox.send_message(user_id, text)

    async def reconcile(self) -> None:
        """Credit the payments Telegram lists and the ledger lacks (a flushed backlog dropped their updates),
        and apply the refunds it lists; each user hears of what changed."""
        transactions: list = []
        while len(transactions) < STAR_TRANSACTIONS_MAX:
            page = (await self.dialog.outbox.telegram.call(
                "getStarTransactions", {"offset": len(transactions), "limit": 100}) or {}).get("transactions") or []
            transactions += page
            if len(page) < 100:
                break
        payments, refunds = star_transactions(transactions)
        written = await self.generations.write_ledger(*(("paid", charge_id, payer, *pack)
                                                         for charge_id, payer, pack in payments))
        for _, charge_id, user_id, credits, _ in written:
            log.warning("[STARS] reconciliation credited %s of user %d (its update was lost)", charge_id, user_id)
            await self.tell(user_id, "paid", credits=credits, balance=self.generations.balance(user_id))
        for charge_id in refunds:
            await self.refunded(charge_id)


class JobButtons:
    """The buttons under a result or a failure; each names its job, which must be the presser's in this chat.
    Anything else (another user's job, an unknown or malformed id, a model no longer offered) is answered as a
    stale button and changes nothing."""

    def __init__(self, conversation: Conversation):
        self.dialog = conversation
        self.generations = conversation.generations
        self.models_by_key = {**conversation.models_by_key, EDIT_MODEL.key: EDIT_MODEL}  # an edit's buttons too

    def handlers(self) -> dict[str, Callable[[Context, str], Awaitable[None]]]:
        by_job = {"again": self.on_again, "models": self.on_models, "edit": self.on_edit, "file": self.on_file,
                  "resend": self.on_resend, "retouch": self.on_retouch,
                  # the ratio question again, for the same prompt: in that model, or one chosen from on_models' list
                  "ratios": lambda ctx, job, _: self.ask_ratio(ctx, self.models_by_key.get(job.model), job.prompt),
                  "use": lambda ctx, job, key: self.ask_ratio(ctx, self.dialog.models_by_key.get(key), job.prompt,
                                                              ctx.message_id)}
        return {"stop": self.on_stop, **{verb: self.with_job(handler) for verb, handler in by_job.items()}}

    def with_job(self, handler: Callable[[Context, Job, str], Awaitable[None]]
                 ) -> Callable[[Context, str], Awaitable[None]]:
        """The handler of "verb:job id[:choice]", given the job when it is the presser's in this chat."""
        async def on_button(ctx: Context, argument: str) -> None:
            job_id, _, choice = argument.partition(":")
            job = await self.generations.book.find(job_id) if JOB_ID_PATTERN.fullmatch(job_id) else None
            if job is not None and (job.user_id, job.chat_id) == (ctx.user_id, ctx.chat_id):
                await handler(ctx, job, choice)
        return on_button

    async def on_again(self, ctx: Context, job: Job, _: str) -> None:
        """The same picture again; a failure's own message becomes the new status."""
        model = self.models_by_key.get(job.model)
        if model is not None:
            status = ctx.message_id if ctx.message_id == job.status_message_id else 0
            await self.dialog.steps.generate(ctx, model, job.prompt, job.ratio, job.option, status, job.image)

    async def on_models(self, ctx: Context, job: Job, _: str) -> None:
        """Offer the other models for the same prompt (catalog mode)."""
        if len(self.dialog.models) < 2:
            return
        await ctx.answer()
        choices = [button(marked(m.title, m.key == job.model), f"use:{job.id}:{m.key}") for m in self.dialog.models]
        await ctx.ask({"step": "model", "lang": ctx.lang}, "ask_model",
                      keyboard(*in_rows(choices, 2), cancel_row(ctx.lang)),
                      prompt=html.escape(shorten(job.prompt, 200)),
                      models="\n".join(f"• {m.described(ctx.lang)}" for m in self.dialog.models))

    async def ask_ratio(self, ctx: Context, model: ImageModel | None, prompt: str, message_id: int = 0) -> None:
        if model is not None:  # (else a model no longer offered: stale)
            await ctx.answer()
            await ctx.ask({"step": "ratio", "model": model.key, "prompt": prompt}, "ask_ratio",
                          ratio_keyboard(model, ctx.lang), message_id, prompt=html.escape(shorten(prompt, 200)))

    async def on_edit(self, ctx: Context, job: Job, _: str) -> None:
        """Ask for a new prompt for the same model (for an edit: a new instruction for the same photo)."""
        model = self.models_by_key.get(job.model)
        if model is not None and job.image:
            await ctx.answer()
            await self.dialog.steps.ask_what(ctx, job.image)
        elif model is not None:
            await self.dialog.steps.ask_for(ctx, model)

    async def on_retouch(self, ctx: Context, job: Job, _: str) -> None:
        """🪄 under a result: edit that picture, fetched again from Telegram by the photo's file id."""
        if ctx.photo:
            await ctx.answer()
            if not ctx.repeated and await self.dialog.steps.may_draw(ctx):
                await self.dialog.steps.ask_what(ctx, ctx.photo)

    async def on_stop(self, ctx: Context, argument: str) -> None:
        """✖️ under "still drawing": stops the running picture, as /cancel does."""
        await ctx.answer()
        await ctx.retire(ctx.message_id)
        await self.dialog.on_cancel(dataclasses.replace(ctx, message_id=0))

    async def on_file(self, ctx: Context, job: Job, _: str) -> None:
        """The finished picture as a file, uncompressed: one send per press."""
        if job.result_url and job.outcome == "success":
            await ctx.answer()
            if not ctx.repeated:  # a double tap sends one
                self.generations.delivery.send_original(job)

    async def on_resend(self, ctx: Context, job: Job, _: str) -> None:
        if job.state == "delivered" and job.outcome == "success":
            await ctx.answer()
            await self.generations.delivery.resend(job)


###############################################################################
# 12. Generation jobs
#
# Theory of operation.  A job is one picture, from the button press to the photo: a row of the ``jobs`` table,
# and while unfinished an object in memory, the authority inside the process.  apply_event is its pure state
# machine (JOB_TRANSITIONS: an event in, changes and effects out); Generations.apply alone carries the effects
# out, with RunningJobs (createTask, recordInfo, signs of life, admin alerts) and Delivery (the user's messages).
#   created -> submitted (createTask accepted) | failed (refused) | timed_out | cancelled
#   submitted -> succeeded | failed (Kie's record) | timed_out (GEN_TIMEOUT_S) | cancelled
#   succeeded -> sending -> delivered, or -> unsure (maybe sent: the user gets a re-send button) -> delivered
#   failed, timed_out -> delivered (the user was told);  delivered and cancelled end the job.
# News that comes late or twice (a second callback, a poll after the timeout) is IGNORED: one photo goes out
# however often Kie answers.
# Durable when: a new job's row is committed (the database working) before its update counts as handled, and only
# then are paid credits spent (a kill -9 between the two gives a picture away, never charges twice); "sending" is
# committed before sendPhoto, a cancel before it is answered.  Other changes go by group commit; rows a database
# that is down could not take are written when it comes back.  After a kill -9, resume() goes by the rows:
# "created" is submitted again (killed between createTask's answer and the commit of "submitted", Kie draws it
# twice); "submitted" is polled at once (its callback may have come meanwhile), then on POLL_SCHEDULE;
# "succeeded", "failed", "timed_out" and "unsure" are delivered (a failure told twice edits the same message);
# "sending" becomes "unsure", never sent again blindly.
# A callback is only a hint: the App checks its token (and signature), then the bot asks recordInfo over its own
# key, so a forged one can do no more than that, and a late one for a finished task changes nothing.
# Who acts: the lease holder, between resume() and pause() (the App's Role).  The deadline watch asks
# Role.may_act() every second; the submitters, the poller and deliveries do not: they stop on pause().
# Faults: Kie's network errors, 429, 455, 500 and undocumented 5xx are retried within KIE_RETRY; other codes fail
# the job in KIE_CODES's words (401 and 402 also alert the admins, once until a createTask succeeds).  A failed
# recordInfo waits for the next poll.  Telegram refusing the photo by URL gets it uploaded (as a document if not
# as a photo); a download refused (not a public address, too large, too slow) or a spent DELIVERY_BUDGET_S tells
# the user instead.  Limits: one job per user; GEN_HOURLY_LIMIT delivered pictures an hour (past it, paid with
# credits); GEN_DAILY_LIMIT started a day by the whole bot.  A paid picture that does not reach its user gives
# its credits back.
###############################################################################

SUBMITTERS = 2  # createTask calls in flight at once (they are paced to 20 per 10 s anyway)
POLLS_AT_ONCE = 8  # recordInfo calls in flight at once (paced to 8 per second)
POLL_SCHEDULE = ((30.0, 3.0), (120.0, 6.0), (600.0, 15.0), (math.inf, 30.0))  # (job younger than, poll every) s
DEADLINE_CHECK_S = 1.0  # how often overdue jobs are timed out and signs of life shown: a job ends within 1 s
USAGE_PRUNE_S = 600.0  # how often idle users' hourly-limit stamps are dropped; they are small
CHAT_ACTION_EVERY_S = 5.0  # Telegram shows "sending a photo…" for about 5 s after each sendChatAction
# The ⏳ message's elapsed time is edited this often: each edit counts against the chat's send rate.
STATUS_EDIT_EVERY_S = 12.0
RUNNING_STATES = ("created", "submitted")  # Kie is drawing (or about to): the user sees signs of life
DELIVERY_BUDGET_S = 120.0  # after GEN_TIMEOUT_S: a few retries of a failing Telegram and one download fit
DELIVERY_NOTICE_S = 15.0  # the budget's last seconds, kept for telling the user it failed: every job ends by then
RESULT_DOWNLOAD_DEADLINE_S = 60.0  # one whole download, however slowly the host sends it
PHOTO_UPLOAD_MAX_BYTES = 10 * 1024 * 1024  # Bot API limit for photos sent as files
PHOTO_DOWNLOAD_MAX_BYTES = 20 * 1024 * 1024  # Bot API limit for files a bot downloads
DOCUMENT_UPLOAD_MAX_BYTES = 50 * 1024 * 1024  # ... and for documents
UNSAVED_JOB_ROWS_MAX = 10_000  # job rows kept for a database that comes back; beyond it the oldest go
JOB_ID_PATTERN = re.compile(r"[0-9a-f]{16}")

MODERATION_WORDS = ("moderat", "prohibit", "nsfw", "sensitive", "safety", "policy", "violat", "inappropriate")


def failure_for_record(record: TaskRecord) -> str:
    """Why a failed task failed, in user terms: 'stalled' (Kie's 408), 'moderation' or 'failed'."""
    if record.fail_code == "408":
        return kie_code(408).user_failure
    message = record.fail_message.lower()
    return "moderation" if any(word in message for word in MODERATION_WORDS) else "failed"


# What a 422 (Kie's validation) asks the user to change: the first input its message names.
INVALID_INPUTS = (("image", "invalid_image"), ("aspect", "invalid_ratio"), ("ratio", "invalid_ratio"),
                  ("prompt", "invalid_prompt"))


def refusal_failure(error: KieError | None) -> str:
    """Why createTask refused a job, in user terms: KIE_CODES's answer, and for a 422 what to change."""
    if error is None:  # the job's model left the catalog
        return "failed"
    if error.code == 422:
        return next((failure for word, failure in INVALID_INPUTS if word in error.message.lower()), "invalid")
    return kie_code(error.code).user_failure


def poll_interval(age_s: float) -> float:
    return next(every for younger_than, every in POLL_SCHEDULE if age_s < younger_than)


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
    outcome: str = ""  # success | failed | timed_out | cancelled, once known
    task_id: str = ""
    result_url: str = ""
    error: str = ""  # failure kind shown to the user (fail_<error> in TEXTS)
    status_message_id: int = 0  # the ⏳ message
    created_at: float = 0.0
    updated_at: float = 0.0
    image: str = ""  # an edit's photo: its Telegram file id (fetched again for each job; Kie's copies expire)


# -- the job state machine: pure, no I/O ------------------------------------------

class IllegalTransition(TrtError):
    """An event the job's state does not allow: a bug in the caller, never dropped quietly."""


@dataclasses.dataclass(frozen=True)
class JobEvent:
    """What happened to a job: ``name`` is a column of JOB_TRANSITIONS, ``value`` what the event carries."""

    name: str
    value: Any = None


# The events that carry a value, and the job fields each sets from it besides the state.
EVENT_CHANGES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "accepted": lambda task_id: {"task_id": task_id},  # createTask gave the task id
    # createTask failed with this KieError (KIE_CODES), or None: the job's model left the catalog
    "refused": lambda error: {"error": refusal_failure(error)},
    "succeeded": lambda url: {"result_url": url},  # Kie's record says the task finished with this result URL
    # Kie's record says the task failed, or the database refuses the job's row: what the user is told
    "failed": lambda failure: {"error": failure},
    "expired": lambda _: {"error": "timeout"}, "undeliverable": lambda _: {"error": "delivery"}}
CALLBACK_CAME = JobEvent("callback")  # an authenticated Kie callback named the job's task: ask Kie now
EXPIRED = JobEvent("expired")  # GEN_TIMEOUT_S passed before Kie said how the job ended
SEND_STARTED = JobEvent("sending")  # the photo is about to go out (the deliverer writes this durably itself)
MAYBE_SENT = JobEvent("maybe_sent")  # unknown whether it went out: a lost answer, an unwritable intent, a restart
DELIVERED = JobEvent("delivered")  # the user has the photo or the explanation, or was told nothing more comes
UNDELIVERABLE = JobEvent("undeliverable")  # the picture cannot reach the user: tell them so instead
UNSTORABLE = JobEvent("failed", "failed")  # the database refuses the job's row for what it holds
CANCEL = JobEvent("cancel")  # the user cancelled: nothing more is sent (Kie cannot stop a task; its result is dropped)

# The state machine: state -> event -> next state.  An event not listed raises
# IllegalTransition; IGNORED marks one that may come late or twice and changes nothing.
IGNORED = ""
_LATE_NEWS = {"accepted": IGNORED, "refused": IGNORED, "succeeded": IGNORED, "failed": IGNORED,
              "callback": IGNORED, "expired": IGNORED}
JOB_TRANSITIONS: dict[str, dict[str, str]] = {
    "created": {"accepted": "submitted", "refused": "failed", "expired": "timed_out",  # waiting for a slot, createTask
                "failed": "failed", "cancel": "cancelled"},
    "submitted": {"succeeded": "succeeded", "failed": "failed", "expired": "timed_out",  # Kie has the task id
                  "callback": "submitted", "cancel": "cancelled"},
    # Result URL known; delivered directly when the budget ran out before sending.
    "succeeded": {**_LATE_NEWS, "sending": "sending", "delivered": "delivered", "undeliverable": "succeeded",
                  "cancel": "cancelled"},
    # Committed before sendPhoto: after a crash the photo may be out, so it is not sent again blindly.
    # Too late to cancel: the photo is on its way.
    "sending": {**_LATE_NEWS, "delivered": "delivered", "maybe_sent": "unsure", "undeliverable": "sending",
                "cancel": IGNORED},
    # The user gets a button to have it re-sent.
    "unsure": {**_LATE_NEWS, "delivered": "delivered", "undeliverable": IGNORED, "cancel": IGNORED},
    # Failure known, user not told yet.
    "failed": {**_LATE_NEWS, "delivered": "delivered", "undeliverable": IGNORED, "cancel": "cancelled"},
    "timed_out": {**_LATE_NEWS, "delivered": "delivered", "undeliverable": IGNORED, "cancel": "cancelled"},
    "delivered": {**_LATE_NEWS, "cancel": IGNORED},  # the user has the photo or the explanation
    # Ended by the user: whatever Kie, a delivery under way or the user do now changes nothing.
    "cancelled": {**_LATE_NEWS, "delivered": IGNORED, "undeliverable": IGNORED, "cancel": IGNORED},
}
OUTCOMES = {"succeeded": "success", "failed": "failed", "timed_out": "timed_out", "cancelled": "cancelled"}
ENDED_STATES = ("delivered", "cancelled")  # the job is over: forgotten in memory, never resumed


# Effects: what the driver (Generations.apply) does after a transition.
SAVE = "save"  # write the job's row (group commit: memory stays the authority)
RELEASE_SLOT = "release_slot"  # the job no longer holds one of the ``kie_max_tasks`` slots
WATCH_TASK = "watch_task"  # find the job by its task id from now on, and poll Kie about it
POLL_NOW = "poll_now"  # ask Kie about the job at once
FINISH = "finish"  # the outcome is known: count it and observe how long it took
DELIVER = "deliver"  # send the user the photo or the failure
ALERT = "alert"  # createTask's refusal stops every generation: tell the admins
FORGET = "forget"  # the job is over: drop it from memory
KEEPING_STATE_EFFECTS = {"callback": [POLL_NOW], "undeliverable": []}  # of the events that leave the state as it is


def apply_event(job: Job, event: JobEvent, now: float) -> tuple[dict[str, Any], list[str]]:
    """The changes ``event`` makes to ``job`` at ``now``, and the effects to carry out; ``job`` is not touched."""
    moves = JOB_TRANSITIONS[job.state]
    if event.name not in moves:
        raise IllegalTransition(f"job {job.id}: {event.name!r} is not allowed in state {job.state!r}")
    state = moves[event.name]
    if state == IGNORED:
        return {}, []
    changes = EVENT_CHANGES[event.name](event.value) if event.name in EVENT_CHANGES else {}
    if state == job.state:
        return changes, list(KEEPING_STATE_EFFECTS[event.name])
    changes.update(state=state, updated_at=now)
    effects = [RELEASE_SLOT] if job.state == "submitted" else []
    if event != SEND_STARTED:
        effects.append(SAVE)
    if event.name == "accepted":
        effects.append(WATCH_TASK)
    if state in OUTCOMES:
        changes["outcome"] = OUTCOMES[state]
        if not job.outcome:  # a job cancelled after its outcome was known has been counted
            effects.append(FINISH)
        if state != "cancelled":
            effects.append(DELIVER)
    if event.name == "refused" and event.value is not None and kie_code(event.value.code).incident:
        effects.append(ALERT)
    if state in ENDED_STATES:
        effects.append(FORGET)
    return changes, effects


JOB_COLUMNS = tuple(field.name for field in dataclasses.fields(Job))


def jobs_save(conn: sqlite3.Connection, rows: list[tuple]) -> list[None]:
    columns = ",".join(JOB_COLUMNS)
    marks = ",".join("?" * len(JOB_COLUMNS))
    changes = ",".join(f"{column}=excluded.{column}" for column in JOB_COLUMNS if column != "id")
    conn.executemany(f"INSERT INTO jobs({columns}) VALUES ({marks}) ON CONFLICT(id) DO UPDATE SET {changes}", rows)
    return [None] * len(rows)


def jobs_delivered_since(conn: sqlite3.Connection, since: float, created_since: float) -> list[tuple[int, float]]:
    """(user, when) of each picture that reached its user since ``since``: what the hourly limit counts
    (``created_since`` bounds the rows read: a job is delivered within its timeout and budget of its creation)."""
    return conn.execute("SELECT user_id, updated_at FROM jobs WHERE created_at >= ? AND state = 'delivered' "
                        "AND outcome = 'success' AND error != 'delivery' AND updated_at >= ? ORDER BY updated_at",
                        (created_since, since)).fetchall()


def usage_counts(conn: sqlite3.Connection, since: float) -> dict[str, Any]:
    users, blocked = conn.execute("SELECT count(*), coalesce(sum(blocked), 0) FROM users").fetchone()
    outcomes = conn.execute("SELECT outcome, count(*) FROM jobs WHERE created_at >= ? GROUP BY outcome",
                            (since,)).fetchall()
    return {"users": users, "blocked": blocked, "jobs_today": {outcome or "in_flight": n for outcome, n in outcomes}}


# -- result downloads: public addresses only ------------------------------------

class DownloadError(TrtError):
    """The result image could not be fetched for upload (refused address, HTTP error, too large, too slow)."""


# Prefixes whose addresses carry an IPv4 address that the traffic really goes to.
NAT64_PREFIXES = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def address_is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether a download may connect to ``address``: globally routable, and so is any IPv4 address it embeds
    (``is_global`` alone is True for multicast, and for 6to4 or NAT64 addresses that lead to 127.0.0.1)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None and not address_is_public(embedded):
            return False
    return address.is_global and not (address.is_private or address.is_loopback or address.is_link_local
                                      or address.is_multicast or address.is_reserved or address.is_unspecified)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address
    if any(address in prefix for prefix in NAT64_PREFIXES) or int(address) >> 32 == 0:  # NAT64, IPv4-compatible
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


def choose_download_address(addresses: Iterable[str],
                            allow_private: bool) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address to connect to, from what the host name resolved to; DownloadError unless all are public
    (all: a name that resolves to a public and an internal address is refused, whichever a client would pick)."""
    try:
        resolved = [ipaddress.ip_address(text) for text in addresses]
    except ValueError:
        raise DownloadError("the host resolved to an unreadable address") from None
    if not resolved:
        raise DownloadError("the host has no address")
    if not allow_private and not all(address_is_public(address) for address in resolved):
        raise DownloadError("the host resolves to a non-public address")
    return resolved[0]


def pinned_url(parts: urllib.parse.SplitResult, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The URL with its host replaced by ``address``, so the connection goes where the check said."""
    host = f"[{address}]" if address.version == 6 else str(address)
    port = f":{parts.port}" if parts.port is not None else ""
    return urllib.parse.urlunsplit((parts.scheme, host + port, parts.path or "/", parts.query, ""))


async def resolve_host(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def download_bounded(http: httpx.AsyncClient, url: str, limit: int, *,
                           deadline_s: float = RESULT_DOWNLOAD_DEADLINE_S, allow_private: bool = False,
                           resolve: Callable[[str, int], Awaitable[list[str]]] = resolve_host) -> bytes:
    """GET ``url`` into memory: at most ``limit`` bytes, within ``deadline_s`` in all, from public addresses only.

    The host is resolved once and the request goes to the address that was checked, with the name kept in the
    Host header and TLS SNI (so the certificate is still verified for it): a DNS answer that changes in between
    cannot point it elsewhere.  Redirects are not followed, and the connection is not reused for another name.
    Every failure is a DownloadError.
    """
    parts = split_result_url(url)
    if parts is None:
        raise DownloadError("not a well-formed http(s) URL")
    host = parts.hostname or ""
    sni = {"sni_hostname": host} if parts.scheme == "https" and not _is_ip_literal(host) else {}
    try:
        async with asyncio.timeout(deadline_s):
            resolved = await resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
            address = choose_download_address(resolved, allow_private)
            headers = {"Host": parts.netloc, "Connection": "close"}
            async with http.stream("GET", pinned_url(parts, address), headers=headers, extensions=sni,
                                   timeout=KIE_TIMEOUT, follow_redirects=False) as response:
                return await read_bounded(response, limit)
    except TimeoutError:
        raise DownloadError(f"not finished within {deadline_s:g}s") from None
    except OSError as error:  # the name did not resolve
        raise DownloadError(f"cannot resolve the host ({type(error).__name__})") from None
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        raise DownloadError(type(error).__name__) from None


async def read_bounded(response: httpx.Response, limit: int) -> bytes:
    if response.status_code != 200:
        raise DownloadError(f"HTTP {response.status_code}")
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            raise DownloadError(f"image larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def image_file_name(url: str) -> tuple[str, str]:
    extension = os.path.splitext(urllib.parse.urlsplit(url).path)[1].lower()
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(extension, "image/png")
    return "image" + (extension if extension in (".jpg", ".jpeg", ".webp", ".png") else ".png"), mime


class JobBook:
    """The unfinished jobs of this process, found by id, task and user, written through to the database.
    Rows it could not take are kept and written when it comes back, so it never resurrects a stale state;
    a row it refuses for what it holds (it would refuse it again) is not kept: its job goes to ``on_refused``."""

    def __init__(self, db: Database, on_refused: Callable[[Job], None] = lambda job: None):
        self.db, self.on_refused = db, on_refused
        self.jobs: dict[str, Job] = {}
        self._by_task: dict[str, str] = {}
        self._active_by_user: dict[int, str] = {}
        self._stored: set[str] = set()  # unfinished jobs the database has a row of
        self._unsaved: dict[str, tuple] = {}  # job id -> latest row the database failed to take
        db.batched(jobs_save, on_batch=self._on_rows_written)

    def track(self, job: Job) -> None:
        self.jobs[job.id] = job
        self._active_by_user[job.user_id] = job.id
        self.watch_task(job)

    def watch_task(self, job: Job) -> None:
        if job.task_id:
            self._by_task[job.task_id] = job.id

    def by_task(self, task_id: str) -> Job | None:
        return self.jobs.get(self._by_task.get(task_id, ""))

    def active(self, user_id: int) -> Job | None:
        return self.jobs.get(self._active_by_user.get(user_id, ""))

    def forget(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        self._by_task.pop(job.task_id, None)
        self._stored.discard(job.id)
        if self._active_by_user.get(job.user_id) == job.id:
            del self._active_by_user[job.user_id]

    def clear(self) -> None:
        for container in (self.jobs, self._by_task, self._active_by_user, self._stored, self._unsaved):
            container.clear()

    def save(self, job: Job) -> None:
        """Write the job's current state; failures are logged by Database, memory stays authoritative."""
        self.db.add(jobs_save, dataclasses.astuple(job))

    async def save_durably(self, job: Job) -> bool:
        """Write the job's state and wait for the commit; False when the database is unusable or refuses it."""
        try:
            await self.db.submit(jobs_save, dataclasses.astuple(job))
        except (DatabaseUnavailable, RowRejected):
            return False
        return True

    def stored(self, job: Job) -> bool:
        return job.id in self._stored

    def _on_rows_written(self, rows: list[tuple], error: BaseException | None) -> None:
        """Note which jobs the database holds; keep the rows it could not take for when it comes back."""
        for row in rows:
            job_id = row[0]
            self._unsaved.pop(job_id, None)
            if isinstance(error, RowRejected):
                if job_id in self.jobs:
                    self.on_refused(self.jobs[job_id])
            elif error is not None:
                self._unsaved[job_id] = row
            elif job_id in self.jobs:
                self._stored.add(job_id)
        while len(self._unsaved) > UNSAVED_JOB_ROWS_MAX:
            dropped = self._unsaved.pop(next(iter(self._unsaved)))
            log.warning("[JOB] %s: its latest state is lost (more than %d jobs changed while the database "
                        "was unusable)", dropped[0], UNSAVED_JOB_ROWS_MAX)

    async def load_unfinished(self) -> list[Job]:
        """Write the rows kept while the database was unusable, then read unfinished jobs not in memory."""
        rows = list(self._unsaved.values())
        if rows:  # through the group commit, so a row the database refuses fails alone
            await asyncio.gather(*(self.db.submit(jobs_save, row) for row in rows), return_exceptions=True)
            log.info("[JOB] wrote %d job states kept while the database was unusable", len(rows))
        query = f"SELECT {','.join(JOB_COLUMNS)} FROM jobs WHERE state != 'delivered' AND state != 'cancelled'"
        rows = await self.db.read(lambda conn: conn.execute(query).fetchall())
        jobs = [Job(*row) for row in rows if row[0] not in self.jobs]
        for job in jobs:
            self.track(job)
            self._stored.add(job.id)
        return jobs

    async def usage(self, kie: KieClient, now: float) -> dict[str, Any]:
        """Users, today's jobs by outcome (UTC day), jobs in flight and Kie credits."""
        try:
            counts = await self.db.read(usage_counts, now // 86400 * 86400)
        except DatabaseUnavailable:
            counts = {"users": "?", "blocked": "?", "jobs_today": {}}
        try:
            credits: Any = await kie.credits() if kie.configured else "—"
        except KieError as error:
            credits = f"— ({error.kind})"
        return {**counts, "in_flight": len(self.jobs), "credits": credits}

    async def find(self, job_id: str) -> Job | None:
        """A job in memory or, finished, in the database; None if unknown."""
        job = self.jobs.get(job_id)
        if job is not None:
            return job
        try:
            row = await self.db.read(lambda conn: conn.execute(
                f"SELECT {','.join(JOB_COLUMNS)} FROM jobs WHERE id=?", (job_id,)).fetchone())
        except DatabaseUnavailable:
            row = None
        return Job(*row) if row else None


# Why the jobs refuse a user a new picture: the TEXTS key telling them, and its values.  "busy_user": their
# previous job is not finished; "hourly_limit": they got ``limit`` pictures in the last hour, the next may start
# in ``minutes``; "daily_limit": the bot started ``limit`` today (GEN_DAILY_LIMIT), the next after 00:00 UTC.
Refusal = tuple[str, dict[str, int]]


class RunningJobs:
    """Jobs while Kie draws them: createTask in order within ``kie_max_tasks`` slots, recordInfo on a schedule
    by age and at once on a callback, signs of life for the user, and the admins told once per Kie incident."""

    def __init__(self, generations: Generations, outbox: Outbox):
        self.generations = generations  # applies the events, runs one-off work
        self.outbox = outbox
        self.clock = generations.clock
        config = generations.config
        self.callback_url = ""  # where Kie posts a task's callback; none without a public URL: the poller alone then
        if config.webhook_base_url:
            self.callback_url = (f"{config.webhook_base_url.rstrip('/')}/{config.kie_callback_path}?"
                                 + urllib.parse.urlencode({"token": config.kie_callback_token}))
        self.in_kie = 0  # slots taken: by createTask calls under way and by "submitted" jobs
        self.incident: int | None = None  # Kie error code of an ongoing incident
        self._slot_freed = asyncio.Event()
        self.queue: asyncio.Queue[Job] = asyncio.Queue()  # created jobs, in order
        self._due: list[tuple[float, int, Job]] = []  # polls, a heap of (when, sequence, job)
        self._sequence = itertools.count()
        self._wakeup = asyncio.Event()
        self._polling: set[str] = set()
        self._rechecks: set[str] = set()  # polled when a callback came: ask again, the answer may predate it
        self._action_due: dict[str, float] = {}  # job id -> when the chat action is due again
        self._edit_due: dict[str, float] = {}  # job id -> when the ⏳ message's elapsed time is due again

    def clear(self) -> None:
        self.in_kie = 0
        self.queue = asyncio.Queue()
        self._due.clear()
        self._action_due.clear()
        self._edit_due.clear()

    def forget(self, job: Job) -> None:
        self._action_due.pop(job.id, None)
        self._edit_due.pop(job.id, None)

    # -- createTask ------------------------------------------------------------

    def release_slot(self) -> None:
        self.in_kie -= 1
        self._slot_freed.set()

    async def submit_forever(self) -> None:
        while True:
            job = await self.queue.get()
            if job.state != "created":
                continue
            while self.in_kie >= self.generations.config.kie_max_tasks:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            self.in_kie += 1
            await self._submit(job)

    async def _submit(self, job: Job) -> None:
        model = MODELS_BY_KEY.get(job.model)
        if model is None:  # a stored job of a model since removed from CATALOG
            self.release_slot()
            self.generations.apply(job, JobEvent("refused", None))
            return
        try:
            image_urls = (await self._upload_photo(job),) if model.edits else ()
            inputs = model.request(job.prompt, job.ratio, job.option, self.generations.config.kie_nsfw_checker,
                                   image_urls)
            task_id = await self.generations.kie.create_task(model.kie_model, inputs, self.callback_url)
        except KieError as error:
            self.release_slot()
            log.warning("[JOB] %s: createTask failed: %s", job.id, error)
            self.generations.apply(job, JobEvent("refused", error))
            return
        if self.incident is not None:
            log.warning("[JOB] Kie works again; incident %d over", self.incident)
            self.incident = None
        self.generations.apply(job, JobEvent("accepted", task_id))
        if job.state != "submitted":  # it timed out while createTask ran; Kie's task runs out on its own
            self.release_slot()

    async def _upload_photo(self, job: Job) -> str:
        """Kie's own copy of the job's photo, fetched from Telegram now (a copy made earlier may have expired)."""
        try:
            data, extension = await self.outbox.telegram.download_file(job.image, PHOTO_DOWNLOAD_MAX_BYTES)
        except (TelegramError, DownloadError) as error:
            raise KieError(422, f"image could not be fetched from Telegram ({type(error).__name__})") from None
        return await self.generations.kie.upload(data, f"{job.id}-{secrets.token_hex(4)}{extension or '.jpg'}")

    def alert(self, code: int) -> None:
        """Tell the admins of a Kie incident, unless one is under way already (they were told)."""
        if self.incident is not None:
            return
        self.incident = code
        reason = kie_code(code).incident
        admins = len(self.generations.config.admin_ids)
        log.error("[JOB] Kie incident: %s; alerting %d admins", TEXTS["en"][reason], admins)
        self.generations.run_in_background(
            self.tell_admins(lambda lang: render(lang, "admin_alert", reason=TEXTS[lang][reason])))

    async def tell_admins(self, text: Callable[[str], str]) -> None:
        """Send every admin ``text(language)``, in the language their Telegram app last said (else Russian)."""
        admin_ids = sorted(self.generations.config.admin_ids)
        if not admin_ids:  # (an empty IN () is an error on PostgreSQL)
            return
        sql = f"SELECT user_id, lang FROM users WHERE user_id IN ({','.join('?' * len(admin_ids))})"
        try:
            languages = dict(await self.generations.book.db.read(lambda conn: conn.execute(sql, admin_ids).fetchall()))
        except DatabaseUnavailable:
            languages = {}
        for admin_id in admin_ids:
            lang = user_language({"language_code": languages.get(admin_id, "")})
            await self.outbox.send_message(admin_id, text(lang))

    # -- recordInfo ------------------------------------------------------------

    def schedule_poll(self, job: Job, when: float) -> None:
        heapq.heappush(self._due, (when, next(self._sequence), job))
        self._wakeup.set()

    def poll_now(self, job: Job) -> None:
        if job.id in self._polling:
            self._rechecks.add(job.id)
            return
        self._polling.add(job.id)
        self.generations.run_in_background(self._poll(job))

    async def poll_due_forever(self) -> None:
        while True:
            now = self.clock.time()
            while self._due and self._due[0][0] <= now and len(self._polling) < POLLS_AT_ONCE:
                job = heapq.heappop(self._due)[2]
                if job.state == "submitted" and job.id not in self._polling:
                    self.poll_now(job)
            delay = 1.0  # also picks up a clock that jumped
            if self._due and len(self._polling) < POLLS_AT_ONCE:
                delay = min(delay, max(0.0, self._due[0][0] - now))
            self._wakeup.clear()
            await wait_for_event(self._wakeup, delay)

    async def _poll(self, job: Job) -> None:
        """Ask Kie about the job, again if a callback came meanwhile; a finished record is the job's outcome."""
        record = None
        try:
            while job.state == "submitted":
                self._rechecks.discard(job.id)
                try:
                    record = await self.generations.kie.record_info(job.task_id, budget_s=0)
                except KieError as error:
                    log.warning("[JOB] %s: recordInfo failed: %s", job.id, error)
                    record = None
                if (record is not None and record.state != "pending") or job.id not in self._rechecks:
                    break
        finally:
            self._polling.discard(job.id)
            self._rechecks.discard(job.id)
            self._wakeup.set()
        if job.state != "submitted":
            return
        if record is not None and record.state == "success":
            self.generations.apply(job, JobEvent("succeeded", record.urls[0]))
        elif record is not None and record.state == "fail":
            self.generations.apply(job, JobEvent("failed", failure_for_record(record)))
        else:
            now = self.clock.time()
            self.schedule_poll(job, now + poll_interval(now - job.created_at))

    # -- signs of life -----------------------------------------------------------

    async def watch_deadlines_forever(self) -> None:
        """Time out overdue jobs, show running ones are alive, forget idle users' delivery stamps."""
        generations = self.generations
        last_prune = self.clock.time()
        while True:
            now = self.clock.time()
            jobs = list(generations.jobs.values()) if generations.mode.may_act() else []  # else another may hold them
            for job in jobs:
                if job.state in RUNNING_STATES and now - job.created_at > generations.config.gen_timeout_s:
                    generations.apply(job, EXPIRED)
            self.tick(jobs, now)
            if now - last_prune > USAGE_PRUNE_S:
                last_prune = now
                generations.forget_idle_users(now)
            await self.clock.sleep(DEADLINE_CHECK_S)

    def tick(self, jobs: Iterable[Job], now: float) -> None:
        """The upload_photo chat action and the ⏳ message's elapsed time, when due; the outbox drops one
        that a result follows, so none overwrites it."""
        for job in jobs:
            if job.state not in RUNNING_STATES:
                continue
            if now >= self._action_due.get(job.id, 0.0):
                self._action_due[job.id] = now + CHAT_ACTION_EVERY_S
                self.outbox.show("action", "sendChatAction", {"chat_id": job.chat_id, "action": "upload_photo"})
            if job.status_message_id and now >= self._edit_due.get(job.id, job.created_at + STATUS_EDIT_EVERY_S):
                self._edit_due[job.id] = now + STATUS_EDIT_EVERY_S
                text = status_text(job_model(job), job.ratio, job.option, job.lang, now - job.created_at)
                self.outbox.show(job.id, "editMessageText", {"chat_id": job.chat_id, "text": text,
                                                             "message_id": job.status_message_id,
                                                             "reply_markup": keyboard(cancel_row(job.lang))})

    def post_status(self, job: Job) -> None:
        """Post the ⏳ message of a job started from a photo's button (there was no text message to evolve); a job
        that has left the running states once it is out (its result or failure queued after it) deletes it."""
        elapsed_s = self.clock.time() - job.created_at
        text = status_text(job_model(job), job.ratio, job.option, job.lang, elapsed_s)
        posted = self.outbox.deliver("sendMessage", {"chat_id": job.chat_id, "text": text,
                                                     "reply_markup": keyboard(cancel_row(job.lang))})
        posted.add_done_callback(lambda answer: self._posted(job, answer))

    def _posted(self, job: Job, answer: asyncio.Future) -> None:
        if answer.cancelled() or answer.exception() is not None:  # cancelled: another instance took over
            log.info("[JOB] %s: the ⏳ message was not posted (%s)", job.id, answer.cancelled() or answer.exception())
            return
        message_id = answer.result().get("message_id") if isinstance(answer.result(), dict) else None
        if isinstance(message_id, int) and job.state in RUNNING_STATES:
            job.status_message_id = message_id
            self.generations.book.save(job)
        elif isinstance(message_id, int):
            self.outbox.deliver("deleteMessage", {"chat_id": job.chat_id, "message_id": message_id})


def job_model(job: Job) -> ImageModel:
    """The job's catalog row; a stand-in naming its key when the model has left the catalog."""
    return MODELS_BY_KEY.get(job.model) or ImageModel(job.model, job.model, job.model, (job.ratio,))


class Delivery:
    """Carries each finished job to its user once, through the outbox (which retries a failing Telegram), within
    ``budget_s`` after GEN_TIMEOUT_S: the photo, the failure or the re-send offer; and what users ask for again."""

    def __init__(self, generations: Generations, outbox: Outbox, http: httpx.AsyncClient):
        self.generations = generations  # applies the events, runs one-off work, knows the hourly limit
        self.outbox = outbox
        self.http = http
        self.budget_s = DELIVERY_BUDGET_S
        self.notice_s = DELIVERY_NOTICE_S
        self._delivering: set[str] = set()
        self._originals: set[str] = set()  # jobs whose original file is on its way

    async def deliver(self, job: Job) -> None:
        """Send the photo, the failure or the re-send offer once; whatever happens, the job ends in time."""
        if job.id in self._delivering or job.state not in ("succeeded", "unsure", "failed", "timed_out"):
            return
        self._delivering.add(job.id)
        try:
            await self._attempt(job, self._send_result if job.state == "succeeded" else self._tell_outcome)
        finally:
            self._delivering.discard(job.id)
        self.generations.apply(job, DELIVERED)

    async def _attempt(self, job: Job, step: Callable[[Job], Awaitable[None]]) -> None:
        clock = self.generations.clock
        give_up_at = job.created_at + self.generations.config.gen_timeout_s + self.budget_s - self.notice_s
        try:
            if clock.time() >= give_up_at:
                raise TimeoutError
            async with self._within(give_up_at - clock.time()):
                await step(job)
            return
        except TelegramError as error:
            if not error.retryable:
                log.warning("[JOB] %s: cannot deliver (%s)", job.id, error.description)
                return
            reason = f"Telegram keeps failing: {error}"  # the outbox tried until the deadline
        except TimeoutError:
            reason = "its delivery budget ran out"
        except Exception:
            log.exception("[JOB] %s: delivery failed unexpectedly", job.id)
            reason = "an unexpected error"
        log.warning("[JOB] %s: giving up delivery (%s); telling the user", job.id, reason)
        self.generations.apply(job, UNDELIVERABLE)
        try:  # within the notice time: why nothing more is coming, or the re-send offer
            async with self._within(self.notice_s):
                await self._tell_outcome(job)
        except Exception as error:
            log.warning("[JOB] %s: could not tell the user either (%s)", job.id, type(error).__name__)

    def _within(self, seconds: float) -> asyncio.Timeout:
        """The deadline of a delivery step, for its downloads and the messages it queues (SEND_BY) alike."""
        SEND_BY.set(self.generations.clock.monotonic() + seconds)
        return asyncio.timeout(seconds)

    async def _send_result(self, job: Job) -> None:
        book = self.generations.book
        if job.state == "succeeded":  # "sending" is committed first, so a restart never sends it again blindly
            self.generations.apply(job, SEND_STARTED)
            # Unless the database already holds a row of the job: it still says "succeeded", and sending now
            # could be repeated.
            if not await book.save_durably(job) and book.stored(job):
                self.generations.apply(job, MAYBE_SENT)
                await self._tell_outcome(job)
                return
        try:
            await self.send_photo(job)
        except DownloadError as error:
            log.warning("[JOB] %s: could not download the result: %s", job.id, error)
            instead = UNDELIVERABLE
        except TelegramNetworkError as error:
            if not error.maybe_performed:
                raise
            # Telegram may have the photo already; sending it again could show it twice.
            log.warning("[JOB] %s: the answer to %s was lost; offering to re-send", job.id, error.method)
            instead = MAYBE_SENT
        else:
            if job.status_message_id:  # the photo is out: the ⏳ message goes
                try:
                    await self.outbox.deliver("deleteMessage", {"chat_id": job.chat_id,
                                                                "message_id": job.status_message_id})
                except TelegramError as error:
                    log.info("[JOB] %s: could not remove the ⏳ message: %s", job.id, error.description)
            return
        self.generations.apply(job, instead)
        await self._tell_outcome(job)

    async def send_photo(self, job: Job, counting: bool = True) -> None:
        """The result with its caption and buttons; ``counting`` when this delivery is about to count."""
        left = left_text(self.generations.remaining(job.user_id, 1 if counting else 0), job.lang,
                         self.generations.balance(job.user_id))
        params = {
            "chat_id": job.chat_id,
            "caption": result_caption(job_model(job), job.ratio, job.option, job.prompt, job.lang, left),
            "parse_mode": "HTML",
            "reply_markup": result_keyboard(job.id, job.model, job.lang, not self.generations.config.single_model_only),
        }
        try:
            await self.outbox.deliver("sendPhoto", {**params, "photo": job.result_url})
        except TelegramError as error:
            if error.error_code != 400:
                raise
            log.info("[JOB] %s: Telegram could not fetch the image (%s); uploading it", job.id, error.description)
            await self._upload_result(job, params)

    async def _download(self, job: Job) -> tuple[bytes, str, str]:
        """The result's bytes, file name and MIME type; result downloads may reach loopback or private hosts
        only when configured to (tests' fakes)."""
        image = await download_bounded(self.http, job.result_url, DOCUMENT_UPLOAD_MAX_BYTES,
                                       allow_private=self.generations.config.result_download_allow_private)
        return image, *image_file_name(job.result_url)

    async def _upload_result(self, job: Job, params: dict) -> None:
        image, name, mime = await self._download(job)
        if len(image) <= PHOTO_UPLOAD_MAX_BYTES:
            try:
                await self.outbox.deliver("sendPhoto", params, files={"photo": (name, image, mime)})
                return
            except TelegramError as error:
                if error.error_code != 400:  # e.g. PHOTO_INVALID_DIMENSIONS: a document still works
                    raise
        await self.outbox.deliver("sendDocument", params, files={"document": (name, image, mime)})

    async def resend(self, job: Job) -> None:
        """Send a finished job's picture again, because its user asked (see "unsure" and "delivery")."""
        try:
            await self.send_photo(job, counting=False)
        except DownloadError as error:
            log.warning("[JOB] %s: could not download the result to re-send it: %s", job.id, error)
            await self._say(job, TEXTS[job.lang]["fail_delivery"],
                            failure_keyboard(job.id, job.model, "failed", job.lang))

    def send_original(self, job: Job) -> None:
        """Send the original file; a press while it is on its way joins it (one download per job at a time)."""
        if job.id not in self._originals:
            self._originals.add(job.id)
            self.generations.run_in_background(self._send_original(job)).add_done_callback(
                lambda task: self._originals.discard(job.id))

    async def _send_original(self, job: Job) -> None:
        """The stored result as a document, byte for byte (Telegram recompresses photos); once, never retried."""
        try:
            image, name, mime = await self._download(job)
            caption = result_caption(job_model(job), job.ratio, job.option, job.prompt, job.lang)
            params = {"chat_id": job.chat_id, "caption": caption, "parse_mode": "HTML"}
            await self.outbox.deliver("sendDocument", params, files={"document": (name, image, mime)})
        except (DownloadError, TelegramError) as error:
            log.warning("[JOB] %s: could not send the original file: %s", job.id, error)
            await self._say(job, TEXTS[job.lang]["original_failed"])

    async def _tell_outcome(self, job: Job) -> None:
        """Turn the ⏳ message into the re-send offer of a job that may have been sent ("unsure"), else into why
        it failed; or send that when the message is gone."""
        unsure = job.state == "unsure"
        text = TEXTS[job.lang]["maybe_sent" if unsure else f"fail_{job.error or 'failed'}"]
        markup = failure_keyboard(job.id, job.model, "delivery" if unsure else job.error, job.lang)
        if job.status_message_id:
            try:
                await self.outbox.deliver("editMessageText", {"chat_id": job.chat_id, "text": text,
                                                              "message_id": job.status_message_id,
                                                              "parse_mode": "HTML", "reply_markup": markup})
                return
            except TelegramError as error:
                if error.error_code != 400:
                    raise
                if "not modified" in error.description:  # told already, before a restart
                    return
        await self._say(job, text, markup)

    async def _say(self, job: Job, text: str, markup: dict | None = None) -> None:
        params = {"chat_id": job.chat_id, "text": text, "parse_mode": "HTML"}
        await self.outbox.deliver("sendMessage", params if markup is None else {**params, "reply_markup": markup})


class Generations:
    """Every job of this process, from creation to delivery: the one driver of the job state machine
    (``apply``), and the fairness limits, which only delivered pictures count towards the hour."""

    def __init__(self, config: Config, db: Database, outbox: Outbox, kie: KieClient,
                 http: httpx.AsyncClient, *, on_finished: Callable[[float], None] = lambda seconds: None,
                 clock: Clock = SYSTEM_CLOCK, mode: Role | None = None):
        self.config = config
        self.mode = mode or Role()
        self.kie = kie
        self.clock = clock
        self.on_finished = on_finished  # how long Kie took
        self.book = JobBook(db, on_refused=lambda job: self.apply(job, UNSTORABLE))
        self.jobs = self.book.jobs  # unfinished jobs by id
        self.created = 0
        self.finished: collections.Counter[str] = collections.Counter()  # outcome -> count
        # Each user's credits, mirrored for /start from the ledger: the truth, which makes each change once.
        self.balances: dict[int, int] = {}
        self.ledger_counts: collections.Counter[str] = collections.Counter()  # entries and credits (by kind)
        self.running = RunningJobs(self, outbox)
        self.delivery = Delivery(self, outbox, http)
        self.starting: set[int] = set()  # users whose job a handler is starting: busy already (Conversation.generate)
        self.daily_limit = config.gen_daily_limit  # pictures the whole bot may start a UTC day (0: no cap)
        self.fairness_loaded = False  # the last hour's deliveries and today's starts were read from the database
        self._delivered: dict[int, collections.deque[float]] = {}  # user -> when pictures reached them, oldest first
        self._today = (0, 0)  # (UTC day number, pictures started that day)
        self._tasks = OwnedTasks("[JOB]")  # one-off work: polls, deliveries, alerts, original files
        self._loops = OwnedTasks("[JOB]")  # the submitters, the poller, the deadline watch

    # -- the driver ------------------------------------------------------------

    def apply(self, job: Job, event: JobEvent) -> None:
        """Apply ``event`` to ``job`` and carry out its effects; IllegalTransition if the table forbids it."""
        changes, effects = apply_event(job, event, self.clock.time())
        for name, value in changes.items():
            setattr(job, name, value)
        for effect in effects:
            if effect == SAVE:
                self.book.save(job)
            elif effect == RELEASE_SLOT:
                self.running.release_slot()
            elif effect == WATCH_TASK:
                self.book.watch_task(job)
                self.running.schedule_poll(job, self.clock.time() + poll_interval(0.0))
            elif effect == POLL_NOW:
                self.running.poll_now(job)
            elif effect == FINISH:
                self.finished[job.outcome] += 1
                seconds = job.updated_at - job.created_at
                if job.outcome != "cancelled":  # how long Kie took: a cancelled job never said
                    self.on_finished(seconds)
                log.info("[JOB] %s %s after %.1fs%s", job.id, job.state, seconds,
                         f" ({job.error})" if job.error else "")
            elif effect == DELIVER:
                self.run_in_background(self.delivery.deliver(job))
            elif effect == ALERT:
                self.running.alert(event.value.code)
            elif effect == FORGET:
                if job.state == "delivered" and job.outcome == "success" and job.error != "delivery":
                    self.note_delivered(job.user_id, job.updated_at)  # only pictures the user got count
                elif job.user_id in self.balances:  # a paid picture the user did not get costs nothing
                    self.run_in_background(self.write_ledger(("returned", job.id)))
                self.book.forget(job)
                self.running.forget(job)

    def balance(self, user_id: int) -> int:
        return self.balances.get(user_id, 0)

    async def write_ledger(self, *changes: tuple) -> list[tuple]:
        """Make the ledger changes (see ledger_write) at once; the rows (kind, key, user, credits, stars) written."""
        written, balances = await self.book.db.write(ledger_write, list(changes))
        self.balances.update(balances)
        for kind, _, _, credits, _ in written:
            self.ledger_counts.update({kind: 1, f"credits_{kind}": abs(credits)})
        return written

    def run_in_background(self, coro: Awaitable[None]) -> asyncio.Task:
        """Run one-off work as a task that ``stop`` waits for and whose failure is logged."""
        return self._tasks.start(coro)

    # -- lifecycle -----------------------------------------------------------

    async def resume(self) -> None:
        """Load unfinished jobs not yet in memory (on becoming active, and when the database comes back: what
        jobs in memory became meanwhile is written first), and run the submitters, the poller and the deadline watch."""
        try:
            jobs = await self.book.load_unfinished()
            await self._load_counts()
        except DatabaseUnavailable:
            jobs = []
        with contextlib.suppress(DatabaseUnavailable):  # (paid pictures wait for the database anyway)
            await self.write_ledger(*(("returned", job_id) for job_id in await self.book.db.read(ledger_unreturned)))
            self.balances = await self.book.db.read(ledger_balances)  # what jobs ended meanwhile spent came back
        for job in jobs:
            if job.state == "created":
                self.running.queue.put_nowait(job)
            elif job.state == "submitted":
                self.running.in_kie += 1  # its slot, whatever the limit: Kie has its task already
                self.running.schedule_poll(job, 0.0)  # callbacks may have come while we were down
            else:
                if job.state == "sending":  # the photo may be out already: offer it, do not send it blindly
                    self.apply(job, MAYBE_SENT)
                self.run_in_background(self.delivery.deliver(job))
        if jobs:
            log.info("[JOB] resumed %d unfinished jobs", len(jobs))
        if not self._loops.running:
            for n in range(SUBMITTERS):
                self._loops.start(self.running.submit_forever(), f"submitter-{n}")
            self._loops.start(self.running.poll_due_forever(), "job-poller")
            self._loops.start(self.running.watch_deadlines_forever(), "job-deadlines")

    async def _load_counts(self) -> None:
        """Count the last hour's deliveries and today's starts once: later ones are noted as they happen."""
        if self.fairness_loaded:
            return
        since = self.clock.time() - 3600
        created_since = since - self.config.gen_timeout_s - DELIVERY_BUDGET_S
        for user_id, delivered_at in await self.book.db.read(jobs_delivered_since, since, created_since):
            self.note_delivered(user_id, delivered_at)
        day = self.clock.time() // 86400
        self._today = (day, sum((await self.book.db.read(usage_counts, day * 86400))["jobs_today"].values()))
        self.fairness_loaded = True

    async def stop(self, grace: float = 5.0) -> None:
        """Stop submitting and polling; let deliveries under way finish within ``grace`` (what is cut short
        resumes on the next start)."""
        await self._loops.cancel_all()
        if self._tasks.running:
            await asyncio.wait(set(self._tasks.running), timeout=grace)
        await self._tasks.cancel_all()

    async def pause(self) -> None:
        """Stop and forget every job: another instance became active and resumes them."""
        await self.stop(grace=5.0)
        for part in (self.book, self.balances, self.running, self._delivered):
            part.clear()
        self._today = (0, 0)
        self.fairness_loaded = False

    # -- fairness: one job per user, GEN_HOURLY_LIMIT an hour (not for admins), GEN_DAILY_LIMIT a day --------

    def refusal(self, user_id: int, cost: int = 1) -> Refusal | None:
        """Why ``user_id`` may not start a picture costing ``cost`` credits now (past the free ones, paid), or None."""
        if self.book.active(user_id) is not None or user_id in self.starting:
            return "busy_user", {}
        refusal = self._over_limit(user_id)
        key = refusal[0] if refusal else ""
        return None if key == "hourly_limit" and self.book.db.ok and self.balance(user_id) >= cost else refusal

    def _over_limit(self, user_id: int) -> Refusal | None:
        if self.daily_limit and self.started_today() >= self.daily_limit:
            return "daily_limit", {"limit": self.daily_limit}
        stamps, limit = self._last_hour(user_id), self.config.gen_hourly_limit
        if user_id not in self.config.admin_ids and len(stamps) >= limit:
            minutes = max(1, int((stamps[0] + 3600 - self.clock.time()) / 60) + 1)
            return "hourly_limit", {"limit": limit, "minutes": minutes}
        return None

    def remaining(self, user_id: int, extra: int = 0) -> tuple[int, int] | None:
        """(pictures left this hour, the limit) once ``extra`` more are counted, from memory; None for admins."""
        if user_id in self.config.admin_ids:
            return None
        limit = self.config.gen_hourly_limit
        return max(0, limit - len(self._last_hour(user_id)) - extra), limit

    def _last_hour(self, user_id: int) -> collections.deque[float]:
        stamps = self._delivered.get(user_id, collections.deque())
        now = self.clock.time()
        while stamps and now - stamps[0] >= 3600:
            stamps.popleft()
        return stamps

    def note_delivered(self, user_id: int, delivered_at: float) -> None:
        self._delivered.setdefault(user_id, collections.deque()).append(delivered_at)

    def forget_idle_users(self, now: float) -> None:
        """Drop stamps older than an hour, so idle users cost no memory."""
        for user_id in [u for u, stamps in self._delivered.items() if not stamps or now - stamps[-1] >= 3600]:
            del self._delivered[user_id]

    def started_today(self) -> int:
        day, count = self._today
        return count if day == self.clock.time() // 86400 else 0

    def note_start(self) -> None:
        self._today = (self.clock.time() // 86400, self.started_today() + 1)

    # -- what the dialog asks --------------------------------------------------

    async def start(self, user_id: int, chat_id: int, lang: str, model: ImageModel, prompt: str, ratio: str,
                    option: str = "", status_message_id: int = 0, image: str = "") -> Job:
        """Create a job (durably when the database works) and queue it; returns at once.  Without a status
        message (the dialog had none to turn into one) the job posts its own."""
        now = self.clock.time()
        job = Job(secrets.token_hex(8), user_id, chat_id, lang, model.key, prompt, ratio, option,
                  status_message_id=status_message_id, created_at=now, updated_at=now, image=image)
        self.book.track(job)
        self.created += 1
        self.note_start()
        await self.book.save_durably(job)  # before the update counts as handled; else memory keeps it
        # Spent after the job is stored: a kill -9 between the two gives a picture away, never takes credits twice.
        if self._over_limit(user_id) is not None:  # past the free pictures: paid with credits
            try:
                spent = await self.write_ledger(("spent", job.id, user_id, model.credits))
            except (DatabaseUnavailable, RowRejected):  # (logged by Database)
                spent = []
            if not spent:
                log.warning("[JOB] %s: its credits could not be spent; it is drawn for free", job.id)
        log.info("[JOB] %s created: user %d, %s %s", job.id, job.user_id, model.kie_model, ratio)
        self.running.queue.put_nowait(job)
        if not status_message_id:
            self.running.post_status(job)
        return job

    async def cancel(self, user_id: int, chat_id: int, message_id: int = 0) -> tuple[str, Job | None]:
        """("cancelled", job): the user is free at once; ("too_late", job): its photo is on its way; ("none", None)
        when the user has no job in ``chat_id``, or ✖️ was pressed under a message (``message_id``) not its ⏳."""
        job = self.book.active(user_id)
        if job is None or job.chat_id != chat_id or message_id not in (0, job.status_message_id):
            return "none", None
        self.apply(job, CANCEL)
        if job.state != "cancelled":
            return "too_late", job
        await self.book.save_durably(job)  # so a restart does not resume and deliver it
        log.info("[JOB] %s cancelled by its user", job.id)
        return "cancelled", job

    async def move_chat(self, group: int, supergroup: int) -> None:
        """A group became a supergroup: its jobs, unfinished and finished (their buttons), go on there."""
        for job in self.jobs.values():
            if job.chat_id == group:
                job.chat_id = supergroup
        with contextlib.suppress(DatabaseUnavailable):  # (logged by Database; unfinished jobs are saved again)
            await self.book.db.write(lambda conn: conn.execute(
                "UPDATE jobs SET chat_id=? WHERE chat_id=?", (supergroup, group)))

    def on_callback(self, task_id: str) -> None:
        """A Kie callback (authenticated, its body never trusted) is a hint: ask recordInfo now, over our key."""
        job = self.book.by_task(task_id)
        if job is None or job.state != "submitted":
            log.info("[JOB] callback for a task that is unknown or finished: %r", shorten(task_id, 64))
            return
        self.apply(job, CALLBACK_CAME)

###############################################################################
# 13. Outbox
#    Theory of operation.  The Outbox is the one sender: every message to a chat goes through it (only
#    answerCallbackQuery goes straight out).  Three kinds, all in one per-chat queue:
#    - a dialog's reply (``call``, ``send_message``): durable.  Inside a handler it is held (``hold_replies``)
#      and written to the ``outbox`` table in the transaction of its update's done mark (``held_replies``), so
#      the update counts as handled only with its replies safe; outside one, in the next group commit.
#      One Telegram took before that transaction is never written.  Once sent (or ended), its row is deleted
#      in the next group commit, shared under load with the inbox's.
#    - a job's message (``deliver``: ⏳, results, explanations): in memory only, the job row being what survives
#      (the job sends it again); its future gives Telegram's answer or the TelegramError it ended with.
#    - a sign of life (``show``: chat action, elapsed time): never stored, one waiting per key (a newer one
#      replaces it), and it gives way to any durable message queued behind it in its chat.
#    Order and pacing: a chat's messages go in queue order, one at a time; ``senders`` tasks share all chats.
#    The TelegramClient paces every send at Telegram's limits (30/s overall, 1/s per chat, 20/min per group);
#    a chat waiting on its spacing is set aside so it holds up no other, and a 429 pauses every send.
#    Fencing: the client sends only while the lease's trust lasts (Role.acting_left; else 503, retried as
#    below); a reply whose handler's update was handed over is dropped (``mode.void``).  ``pause`` (the lease
#    lost) forgets all in memory, the rows staying for the new holder, and cancels a job's futures.
#    Retries and deadlines: 400, 403 (any error not retryable) end a message as refused; a 403 from a private chat
#    marks its user blocked.  A retryable one (429, 5xx, no answer; after the client's own retries) sets the chat
#    aside 1, 2, 4 ... 60 s; a photo or document whose answer was lost ends instead (sent at most once), as does a
#    sign of life that fails.  A message still unsent at its deadline (SEND_BY, else OUTBOX_MAX_WAIT_S after it was
#    queued, on the monotonic clock) ends as expired.  All ends are logged and counted.
#    kill -9: a stored reply whose update is not marked done is dropped at take-over (``outbox_take_up``):
#    the update is handled again and queues it again.  Every other row is sent, so at most what was in
#    flight (sent, its row's delete or its update's done mark not yet committed) is sent twice.
#    Database down: replies are sent from memory; those still queued or sent are written or deleted when it
#    is back (``resume``), before the table is read again.
###############################################################################

OUTBOX_MAX_MESSAGES = 100_000  # held in memory; one more is dropped (logged): ~an hour of sending at 30/s
# Senders in flight at once: enough to keep the rate while each waits a Bot API round trip (~0.25 s).
SEND_ROUND_TRIP_S = 0.25
MIN_SENDERS = 4
OUTBOX_RETRY_BASE_S = 1.0  # a message Telegram could not take (after the client's own retries) waits 1, 2, 4 ...
OUTBOX_RETRY_CAP_S = 60.0  # ... at most 60 s before its chat is tried again


@dataclasses.dataclass(slots=True)
class OutboxMessage:
    """One Bot API call waiting to be made; ``id`` orders a chat's messages (and the table's rows)."""

    id: int
    chat_id: int
    method: str
    params: dict
    queued_at: float  # wall clock, for the row: its age after a restart
    update_id: int | None  # the update whose handler queued it
    since: float  # when it was queued, and when it ends unsent: on the monotonic clock
    expires_at: float
    stored: bool = False  # its row is written, or on its way (the sent mark must then delete it)
    attempts: int = 0
    result: asyncio.Future | None = None  # a job's (``deliver``): Telegram's answer, or why it ended unsent
    files: dict | None = None  # uploads of ``deliver``
    sign_of_life: str = ""  # its key: a newer sign with the same key replaces it; never stored
    on_sent: Callable[[Any], None] | None = None  # given Telegram's answer once sent (memory only)
    over: bool = False  # sent or dropped: a row not written yet is then not written at all


def outbox_write(conn: sqlite3.Connection, entries: list[OutboxMessage | tuple[str, int]]) -> list[None]:
    """In queued order: new messages (not one already over), ``("sent", id)`` (a message is over: its row goes)
    and ``("blocked", user_id)`` (Telegram said the user blocked the bot: remembered in ``users``)."""
    now = time.time()
    for entry in entries:
        if isinstance(entry, tuple) and entry[0] == "sent":
            conn.execute("DELETE FROM outbox WHERE id=?", (entry[1],))
        elif isinstance(entry, tuple):
            conn.execute("""INSERT INTO users(user_id, lang, first_seen, last_seen, blocked) VALUES (?,'',?,?,1)
                            ON CONFLICT(user_id) DO UPDATE SET blocked=1""", (entry[1], now, now))
        elif not entry.over:
            conn.execute("""INSERT INTO outbox(id, chat_id, method, params, queued_at, update_id)
                            VALUES (?,?,?,?,?,?) ON CONFLICT(id) DO NOTHING""",
                         (entry.id, entry.chat_id, entry.method, json.dumps(entry.params, ensure_ascii=False),
                          entry.queued_at, entry.update_id))
    return [None] * len(entries)


def outbox_pending(conn: sqlite3.Connection) -> list[tuple[int, int, str, str, float, int | None]]:
    return conn.execute("SELECT id, chat_id, method, params, queued_at, update_id FROM outbox ORDER BY id").fetchall()


def outbox_take_up(conn: sqlite3.Connection, sent_ids: list[int], unstored: list[OutboxMessage],
                   taking_over: bool) -> list[tuple[int, int, str, str, float, int | None]]:
    """The rows to send, once the ends of ``sent_ids`` and the ``unstored`` (queued while the database was down)
    are written.  Taking over, a row whose update is not done goes (see above), not after an outage of this run's."""
    outbox_write(conn, [("sent", message_id) for message_id in sent_ids] + unstored)
    if taking_over:
        conn.execute("DELETE FROM outbox WHERE update_id IN (SELECT update_id FROM inbox WHERE done_at IS NULL)")
    return outbox_pending(conn)


# The update the running handler answers (set by the dialog for each): the messages it queues carry its id.
REPLYING_TO: contextvars.ContextVar[int | None] = contextvars.ContextVar("replying_to", default=None)
# When (monotonic) the messages a job's driver queues must have gone, else they are dropped (None: max_wait_s).
SEND_BY: contextvars.ContextVar[float | None] = contextvars.ContextVar("send_by", default=None)
# Sent at most once: an answer lost on the way back ends the message (the job offers to re-send).
SENT_ONCE_METHODS = frozenset({"sendPhoto", "sendDocument"})


def outbox_senders(rate: int) -> int:
    return max(MIN_SENDERS, math.ceil(rate * SEND_ROUND_TRIP_S))


class Outbox:
    """The one way to Telegram (the theory of operation above)."""

    def __init__(self, db: Database, telegram: TelegramClient, *, senders: int = MIN_SENDERS,
                 max_wait_s: float = 3600.0, clock: Clock = SYSTEM_CLOCK, mode: Role | None = None):
        self.db = db
        self.telegram = telegram
        self.mode = mode or Role()
        self.senders = senders
        self.max_wait_s = max_wait_s
        self.clock = clock
        self.sent: collections.Counter[str] = collections.Counter()  # by method
        self.dropped: collections.Counter[str] = collections.Counter()  # by reason: refused, expired, full
        self._chats: dict[int, collections.deque[OutboxMessage]] = {}
        self._ready: asyncio.Queue[int] = asyncio.Queue()  # chats whose first message may be tried now
        self._ids: set[int] = set()
        self._last_id = 0
        self._held: dict[int, list[OutboxMessage]] = {}  # update id -> replies written with its done mark
        # Stored messages over while the database was down: their rows go when it is back (``resume``).
        self._unrecorded: collections.deque[int] = collections.deque(maxlen=OUTBOX_MAX_MESSAGES)
        self._tasks = OwnedTasks("[OUTBOX]")  # senders, and chats set aside until their time
        self._emptied = asyncio.Event()  # set while nothing is queued
        self._emptied.set()

    async def send_message(self, chat_id: int, text: str, reply_markup: dict | None = None, *,
                           on_sent: Callable[[Any], None] | None = None, **extra: Any) -> None:
        params: dict[str, Any] = {"chat_id": chat_id, "text": text, "parse_mode": "HTML", **extra}
        if reply_markup is not None:
            params["reply_markup"] = reply_markup
        await self.call("sendMessage", params, on_sent)

    async def call(self, method: str, params: dict, on_sent: Callable[[Any], None] | None = None) -> None:
        """Queue a dialog's reply to ``params["chat_id"]``; ``on_sent`` gets Telegram's answer if this process
        sends it.  Returns once it is held for its update's done mark, or written, or kept in memory."""
        if self.mode.void():  # its handler's update was handed over: the holder answers it
            return
        message = self._queue(method, params, on_sent=on_sent)
        if message is None or not self.db.ok:
            return
        if message.update_id in self._held:
            self._held[message.update_id].append(message)
            return
        message.stored = True
        try:
            await self.db.submit(inbox_write_reading_older, message)  # the inbox's: one commit serves both
        except (DatabaseUnavailable, RowRejected):
            message.stored = False  # logged by Database; sent from memory, written when it is back

    def deliver(self, method: str, params: dict, files: dict | None = None) -> asyncio.Future:
        """Queue a job's message: the future gives Telegram's answer (TelegramError if it ended unsent).
        Cancelling the future does not cancel the message; it ends by SEND_BY at the latest."""
        message = self._queue(method, params, files=files, result=asyncio.get_running_loop().create_future())
        if message is None:
            raise TelegramError(method, 503, "the outbox is full")
        answer = asyncio.shield(message.result)  # the shield reads the result even if the caller stops waiting
        answer.add_done_callback(lambda ended: ended.cancelled() or ended.exception())  # read if unawaited
        return answer

    def show(self, key: str, method: str, params: dict) -> None:
        """A sign of life: replaces a waiting one with the same ``key`` in its chat."""
        queue = self._chats.get(params["chat_id"], ())
        waiting = next((m for m in itertools.islice(queue, 1, None) if m.sign_of_life == key), None)
        if waiting is not None:
            waiting.params = params
        else:
            self._queue(method, params, sign_of_life=key)

    def _queue(self, method: str, params: dict, **fields: Any) -> OutboxMessage | None:
        now, since = self.clock.time(), self.clock.monotonic()
        self._last_id = max(self._last_id + 1, int(now * 1_000_000))
        return self._push(OutboxMessage(self._last_id, params["chat_id"], method, params, now, REPLYING_TO.get(),
                                        since, SEND_BY.get() or since + self.max_wait_s, **fields))

    def _push(self, message: OutboxMessage) -> OutboxMessage | None:
        """``message`` at the end of its chat's queue; None if the outbox is full (it is dropped)."""
        if len(self._ids) >= OUTBOX_MAX_MESSAGES:
            self.dropped["full"] += 1
            log.error("[OUTBOX] full (%d messages): a %s to %d is dropped", len(self._ids), message.method,
                      message.chat_id)
            return None
        self._ids.add(message.id)
        self._emptied.clear()
        queue = self._chats.setdefault(message.chat_id, collections.deque())
        queue.append(message)
        if len(queue) == 1:
            self._ready.put_nowait(message.chat_id)
        return message

    def hold_replies(self, update_id: int) -> None:
        """The update's handler starts: its replies wait for its done mark's transaction, not a commit of their own."""
        self._held[update_id] = []

    def held_replies(self, update_id: int) -> list[OutboxMessage]:
        """The handler ended: its replies still queued, to be written with its done mark (those sent are not)."""
        replies = [message for message in self._held.pop(update_id, ()) if not message.over]
        for message in replies:
            message.stored = True
        return replies

    async def _send_forever(self) -> None:
        while True:
            chat_id = await self._ready.get()
            if (wait := self.telegram.chat_wait(self.clock.monotonic(), chat_id)) > 0:
                self._set_aside(chat_id, wait)  # a sender waiting on one chat's spacing would idle
            else:
                await self._send_first(chat_id)

    async def _send_first(self, chat_id: int) -> None:
        queue = self._chats[chat_id]
        message = queue[0]
        if message.sign_of_life and any(not later.sign_of_life for later in itertools.islice(queue, 1, None)):
            self._end(message, None)  # gives way to a durable message; a newer sign comes soon
            return
        try:
            if self.clock.monotonic() >= message.expires_at:
                raise TimeoutError
            async with asyncio.timeout(message.expires_at - self.clock.monotonic()):
                result = await self.telegram.call(message.method, message.params, message.files,
                                                  repeatable=message.method not in SENT_ONCE_METHODS)
        except TimeoutError:
            self._end(message, TelegramError(message.method, 504, "expired in the outbox"), "expired")
        except TelegramError as error:
            once = message.sign_of_life or message.method in SENT_ONCE_METHODS and error.maybe_performed
            if error.retryable and not once:
                message.attempts += 1
                wait = min(OUTBOX_RETRY_CAP_S, OUTBOX_RETRY_BASE_S * 2 ** (message.attempts - 1))
                log.warning("[OUTBOX] %s to %d failed (%s), tried again in %.0fs", message.method, chat_id,
                            error.description, wait)
                self._set_aside(chat_id, wait)
                return
            if error.error_code == 403 and chat_id > 0 and self.db.ok:
                self.db.add(inbox_write_reading_older, ("blocked", chat_id))
            self._end(message, error, "refused")
        else:
            self.sent[message.method] += 1
            if message.on_sent is not None:
                message.on_sent(result)
            self._end(message, result)

    def _end(self, message: OutboxMessage, outcome: Any, dropped_as: str = "") -> None:
        """The chat's first message is over (``outcome``: Telegram's answer, or why not): its chat's next goes."""
        if dropped_as:
            self.dropped[dropped_as] += 1
            log.warning("[OUTBOX] %s to %d %s: %d %s", message.method, message.chat_id, dropped_as,
                        outcome.error_code, outcome.description)
        if message.result is not None and not message.result.done():
            if isinstance(outcome, TelegramError):
                message.result.set_exception(outcome)
            else:
                message.result.set_result(outcome)
        queue = self._chats[message.chat_id]
        queue.popleft()
        message.over = True
        self._ids.discard(message.id)
        if not self._ids:
            self._emptied.set()
        if message.stored and self.db.ok:
            self._write_sent(message.id)
        elif message.stored:
            self._unrecorded.append(message.id)
        if queue:
            self._ready.put_nowait(message.chat_id)
        else:
            del self._chats[message.chat_id]

    def _write_sent(self, message_id: int) -> None:
        written = self.db.submit(inbox_write_reading_older, ("sent", message_id))
        written.add_done_callback(lambda done: done.exception() is None or self._unrecorded.append(message_id))

    def _set_aside(self, chat_id: int, seconds: float) -> None:
        async def ready_after() -> None:
            await self.clock.sleep(seconds)
            self._ready.put_nowait(chat_id)

        self._tasks.start(ready_after(), f"outbox-chat-{chat_id}")

    async def resume(self, taking_over: bool = False) -> None:
        """Take up the stored rows (on becoming active, and when the database is back), not those in memory."""
        sent_ids, held = list(self._unrecorded), set(self._ids)  # held now: sent from memory, even if over meanwhile
        unstored = [message for queue in self._chats.values() for message in queue
                    if not message.stored and message.result is None and not message.sign_of_life]
        try:
            rows = await self.db.write(outbox_take_up, sent_ids, unstored, taking_over)  # raises if it is down
        except (DatabaseUnavailable, RowRejected):
            rows = []
        else:
            for _ in sent_ids:
                self._unrecorded.popleft()
            for message in unstored:
                message.stored = True
                if message.id not in self._ids:  # over while its row was written: the row goes
                    self._write_sent(message.id)
        loaded = 0
        for message_id, chat_id, method, params, queued_at, update_id in rows:
            if message_id not in held and message_id not in self._ids:
                self._last_id = max(self._last_id, message_id)
                since = self.clock.monotonic() - max(0.0, self.clock.time() - queued_at)  # the row outlived its run
                loaded += self._push(OutboxMessage(message_id, chat_id, method, json.loads(params), queued_at,
                                                   update_id, since, since + self.max_wait_s, stored=True)) is not None
        if loaded:
            log.info("[OUTBOX] %d queued messages taken up", loaded)
        if not any(task.get_name().startswith("outbox-sender") for task in self._tasks.running):
            for number in range(self.senders):
                self._tasks.start(self._send_forever(), f"outbox-sender-{number}")

    async def pause(self) -> None:
        """Stop sending and forget what is queued: another instance has the lease and takes the stored rows."""
        await self._tasks.cancel_all()
        for message in itertools.chain.from_iterable(self._chats.values()):
            if message.result is not None:
                message.result.cancel()
        self._chats.clear()
        self._ids.clear()
        self._emptied.set()
        self._ready = asyncio.Queue()

    async def stop(self, grace: float) -> None:
        """Send what is queued within ``grace`` seconds; what is left stays stored for the next run."""
        if self._tasks.running:
            await wait_for_event(self._emptied, grace)
        await self._tasks.cancel_all()
        await self.db.settled(inbox_write_reading_older, 2.0)  # the ends of sent messages get 2 s to be written

    @property
    def depth(self) -> int:
        return len(self._ids)

    def oldest_wait_s(self) -> float:
        oldest = min((queue[0].since for queue in self._chats.values()), default=None)  # a chat's first is its oldest
        return 0.0 if oldest is None else max(0.0, self.clock.monotonic() - oldest)

    def snapshot(self) -> dict:
        return {
            "depth": self.depth,
            "oldest_wait_s": round(self.oldest_wait_s(), 3),
            "sent": sum(self.sent.values()),
            "dropped": dict(self.dropped),
            "flood_pauses": self.telegram.pauses,
            "flood_paused_for_s": round(max(0.0, self.telegram.paused_until - self.clock.monotonic()), 3),
            "telegram_429s": sum(n for (_, outcome), n in self.telegram.calls.items() if outcome == "429"),
        }


###############################################################################
# 14. Application
#    Owns wiring the sections together and their start-up and shutdown order:
#    the single-active-instance lease (its SQL too) and the role it gives,
#    webhook and command-menu set-up or long polling, HTTP routes and
#    diagnostics (/health and its red flags, /diag/*), /metrics, database
#    recovery, ``check`` and main().
###############################################################################

# Adding a kind here is enough for running bots: set-up finds the webhook's list differs and
# sets it again, and getUpdates asks with it on every call.
ALLOWED_UPDATES = ["message", "edited_message", "callback_query", "pre_checkout_query"]
POLL_TIMEOUT_S = 50  # getUpdates long-poll; Telegram allows up to 50 s
DIAG_CACHE_S = 5.0  # getWebhookInfo answers reused by /diag/webhook and the red-flag check
DB_RETRY_S = 1.0  # how often the database file is checked, and an unusable database reopened
PASSIVE_RETRY_S = 1.0  # how often a passive instance tries for the lease (an expired one is taken this fast)
# How often a passive instance looks (a read, no lock) whether the lease was released or its holder has
# provably exited: a holder stopping on SIGTERM hands over this fast; the claims, writes, stay a second apart.
LEASE_PEEK_S = 0.1
# Bot API calls the bot cannot work without: tried until they succeed, 1, 2, 4 ... 60 s apart.
UNTIL_DONE = RetryPolicy(cap_s=60.0, retry_on=(TelegramError,), jittered=False)
PENDING_UPDATES_FLAG_OVER = 50  # Telegram holding more: it cannot reach us, or we acknowledge too slowly
BACKLOG_GROWTH_FLAG_CHECKS = 6  # the inbox backlog grew at this many checks in a row: workers do not keep up
RED_FLAG_CHECK_S = 10.0  # how often the backlog is sampled; 6 checks span two of the pipeline's recounts
WEBHOOK_CHECK_S = 60.0  # how often getWebhookInfo is asked for the pending count (webhook mode)
OUTBOX_STUCK_FLAG_S = 180.0  # the oldest reply waited this long: stuck (a group's 20/min spreads a burst this far)
WEBHOOK_ERROR_RECENT_S = 600.0  # a webhook error younger than this, with updates still pending, is current
KIE_CREDITS_CHECK_S = 600.0  # how often the active instance reads Kie's credit balance
# /health answers 503 while the event loop runs a 1 s timer this late (a loop blocked for good answers nothing).
LOOP_BEAT_S, LOOP_LAG_FAIL_S = 1.0, 5.0


# -- webhook and command-menu set-up, long polling -----------------------------

def plan_webhook(info: dict, url: str, allowed_updates: list[str], flush_over: int) -> tuple[str, str]:
    """What ensure_webhook should do: ('keep' | 'set' | 'flush', why, with the counts).  Only the backlog's size
    decides a flush: Telegram reports the last error long after a deploy gap, whose updates are worth keeping."""
    pending = info.get("pending_update_count") or 0
    last_error = info.get("last_error_message") or ""
    if flush_over >= 0 and pending > flush_over:
        return "flush", f"{pending} pending updates, over WEBHOOK_FLUSH_PENDING_OVER={flush_over}"
    limit = "WEBHOOK_FLUSH_PENDING_OVER=-1 never drops" if flush_over < 0 else f"at most {flush_over}"
    kept = f"kept {pending} pending updates, {limit}"
    if last_error:
        kept += f" (the last error, {last_error!r}, is no reason to drop them)"
    if info.get("url") != url:
        return "set", f"URL differs; {kept}"
    if sorted(info.get("allowed_updates") or []) != sorted(allowed_updates):
        return "set", f"allowed updates differ; {kept}"
    return "keep", f"webhook already matches; {kept}"


def mask_webhook_url(url: str) -> str:
    """https://host/webhook/<secret> -> https://host/webhook/***"""
    return re.sub(r"/webhook/[^/?#]+", "/webhook/***", url)


async def ensure_webhook(telegram: TelegramClient, config: Config) -> str:
    """Make Telegram's webhook match ours, flushing a stuck backlog; returns the action taken."""
    info = await telegram.call("getWebhookInfo") or {}
    action, reason = plan_webhook(info, config.webhook_url, ALLOWED_UPDATES, config.flush_pending_over)
    if action != "keep":
        await telegram.call("setWebhook", {
            "url": config.webhook_url, "secret_token": config.webhook_secret, "allowed_updates": ALLOWED_UPDATES,
            "drop_pending_updates": action == "flush"})
    if action == "flush":
        log.warning("[WEBHOOK] flushed: dropped %s", reason)
    log.info("[WEBHOOK] configured %s (%s: %s)", mask_webhook_url(config.webhook_url), action, reason)
    return action


def _command_pairs(commands: Any) -> list[tuple[Any, Any]]:
    listed = commands if isinstance(commands, list) else []
    return [(c.get("command"), c.get("description")) for c in listed if isinstance(c, dict)]


async def ensure_commands(telegram: TelegramClient) -> list[str]:
    """Make the command menu match COMMAND_MENUS, setting only the languages whose menu differs (returned)."""
    changed = []
    for language, commands in COMMAND_MENUS.items():
        scope = {"language_code": language} if language else {}
        if _command_pairs(await telegram.call("getMyCommands", scope)) != _command_pairs(commands):
            await telegram.call("setMyCommands", {"commands": commands, **scope})
            changed.append(language or "default")
    log.info("[COMMANDS] menu %s", f"set for: {', '.join(changed)}" if changed else "already up to date")
    return changed


async def until_done(what: str, attempt: Callable[[], Awaitable[Any]], telegram: TelegramClient, clock: Clock,
                     failing: dict[str, str]) -> Any:
    """A Bot API step the bot cannot work without, tried until it succeeds; ``failing`` holds its latest error
    meanwhile (a red flag)."""

    def report(error: Exception, retry: int, wait: float) -> None:
        failing[what] = str(error)
        level = logging.DEBUG if telegram.trouble else logging.ERROR  # its red flag says it once
        log.log(level, "[%s] set-up failed (%s); retrying in %.0fs", what, error, wait)

    result = await call_with_retries(attempt, UNTIL_DONE, clock=clock, on_retry=report)
    failing.pop(what, None)
    return result


async def long_poll(telegram: TelegramClient, pipeline: UpdatePipeline, role: Role, clock: Clock,
                    poll_timeout: float) -> None:
    """Polling mode: delete the webhook (Telegram refuses getUpdates while one is set), then, while active, poll
    getUpdates into the same inbox the webhook feeds, for the life of the process."""
    # Backs off 1, 2, 4 ... 30 s while getUpdates fails; stops retrying when the instance turns passive.
    policy = dataclasses.replace(UNTIL_DONE, cap_s=30.0, transient=lambda error: role.may_act())

    def report(error: Exception, retry: int, wait: float) -> None:
        if isinstance(error, TelegramError) and error.error_code == 409:
            log.warning("[POLL] 409 Conflict: another process polls this bot or a webhook is set; "
                        "retrying in %.0fs", wait)
        else:
            log.log(logging.DEBUG if telegram.trouble else logging.WARNING,
                    "[POLL] getUpdates failed (%s); retrying in %.0fs", error, wait)

    while not role.may_act():
        await clock.sleep(PASSIVE_RETRY_S)
    await until_done("POLL", lambda: telegram.call("deleteWebhook", {"drop_pending_updates": False}),
                     telegram, clock, {})
    log.info("[POLL] polling getUpdates")
    offset = None
    while True:
        if not role.may_act():
            await clock.sleep(PASSIVE_RETRY_S)
            continue
        params = {"timeout": poll_timeout, "allowed_updates": ALLOWED_UPDATES}
        if offset is not None:
            params["offset"] = offset
        try:
            updates = await call_with_retries(lambda: telegram.call("getUpdates", params, timeout=poll_timeout + 10),
                                              policy, clock=clock, on_retry=report)
        except TelegramError:
            continue  # turned passive meanwhile
        offset = await ingest_polled(pipeline, clock, updates or [], offset)


async def ingest_polled(pipeline: UpdatePipeline, clock: Clock, updates: list, offset: int | None) -> int | None:
    """Feed a batch to the pipeline; returns the offset to ask from next (a full pipeline ends the batch)."""
    for update in updates:
        if not isinstance(update, dict) or not isinstance(update.get("update_id"), int):
            continue
        body = json.dumps(update, separators=(",", ":")).encode()  # ASCII: a lone surrogate is escaped
        try:
            outcome = await pipeline.ingest(parse_update(body), body)  # checked as a webhook's
        except HttpError as error:
            log.warning("[POLL] update %d skipped: %s", update["update_id"], error.reason)
            outcome = Admission.INVALID
        if outcome.retry_later:
            await clock.sleep(1.0)  # full: ask again later from this update on
            break
        offset = update["update_id"] + 1
    return offset


# -- role: the lease that makes one process on a database the active one --------

PID_MAX_LIMIT = 4_194_304  # Linux's ceiling for pid_max; a larger "pid" is garbage, not a process


@dataclasses.dataclass(frozen=True)
class ProcessIdentity:
    """Who holds the lease, so another process can tell whether it has exited: a pid means something only in its
    PID namespace until a reboot, and is reused, so the namespace, boot and start time go with it ('' if unknown)."""

    host: str
    pid: int
    instance: str  # tells two Apps in one process apart
    pid_namespace: str = ""  # the inode of /proc/self/ns/pid
    boot_id: str = ""  # /proc/sys/kernel/random/boot_id
    start_time: str = ""  # /proc/<pid>/stat field 22: clock ticks after boot

    def owner(self) -> str:
        return ":".join((self.host, str(self.pid), self.instance, self.pid_namespace, self.boot_id, self.start_time))

    @classmethod
    def parse(cls, owner: str) -> ProcessIdentity | None:
        """The identity in an owner string, or None (an older format, or garbage)."""
        parts = owner.rsplit(":", 5)  # a hostname is the only part that might hold a ':'
        if len(parts) != 6 or not parts[1].isdigit() or not 0 < int(parts[1]) <= PID_MAX_LIMIT:
            return None
        return cls(parts[0], int(parts[1]), *parts[2:])


def probe_pid(pid: int) -> tuple[bool, str]:
    """(runs, start time) of ``pid`` in this PID namespace (a zombie has exited); start time "" when unreadable."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, ""
    except OSError:
        pass  # it exists but belongs to another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()  # the name in parentheses may hold anything
    except OSError:
        return True, ""
    if len(fields) < 20:
        return True, ""
    if fields[0] in (b"Z", b"X"):
        return False, ""
    return True, fields[19].decode("ascii", "replace")  # field 22; fields[0] is field 3


def current_process_identity(instance: str) -> ProcessIdentity:
    """This process's identity; the /proc parts stay empty where /proc cannot vouch for them."""
    pid = os.getpid()
    pid_namespace = boot_id = start_time = ""
    try:
        # A /proc mounted for another PID namespace would answer for other processes.
        if os.readlink("/proc/self") == str(pid):
            pid_namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:[").removesuffix("]")
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                boot_id = f.read().strip()
            start_time = probe_pid(pid)[1]
    except OSError:
        pid_namespace = boot_id = start_time = ""
    return ProcessIdentity(socket.gethostname(), pid, instance, pid_namespace, boot_id, start_time)


def lease_owner_is_gone(holder: str, me: str, probe: Callable[[int], tuple[bool, str]] = probe_pid) -> bool:
    """Whether the process that wrote ``holder`` has provably exited, judged by ``me``: only one in my PID namespace
    during this boot can be (its pid gone, or a process started at another time).  Any other may be alive: two
    containers on one host can both be pid 1."""
    theirs, mine = ProcessIdentity.parse(holder), ProcessIdentity.parse(me)
    if theirs is None or mine is None or not mine.pid_namespace or not mine.boot_id:
        return False
    if (theirs.pid_namespace, theirs.boot_id) != (mine.pid_namespace, mine.boot_id):
        return False
    runs, start_time = probe(theirs.pid)
    return not runs or bool(start_time and theirs.start_time and start_time != theirs.start_time)


LEASE_ROW = "SELECT owner, acquired_at, expires_at FROM lease WHERE name='active'"


def lease_claim(conn: sqlite3.Connection, owner: str, ttl: float, now: float) -> tuple[bool, str, float]:
    """Take or renew the lease if it is free, expired, ours or its holder is gone: (held, owner, expires_at).

    A compare-and-set: on PostgreSQL (READ COMMITTED) two instances may read the same expired row, and the
    upsert's row lock lets the second see the first's win and write nothing.
    """
    row = conn.execute(LEASE_ROW).fetchone()
    if row is not None and row[0] != owner and row[2] > now and not lease_owner_is_gone(row[0], owner):
        return False, row[0], row[2]
    acquired_at = row[1] if row is not None and row[0] == owner else now
    read_owner, read_expiry = (row[0], row[2]) if row is not None else (None, None)  # no row: insert only
    written = conn.execute(
        """INSERT INTO lease(name, owner, acquired_at, expires_at) VALUES ('active',?,?,?)
           ON CONFLICT(name) DO UPDATE SET owner=excluded.owner, acquired_at=excluded.acquired_at,
               expires_at=excluded.expires_at
           WHERE lease.owner=? AND lease.expires_at=?""",
        (owner, acquired_at, now + ttl, read_owner, read_expiry)).rowcount
    if written != 1:
        winner = conn.execute(LEASE_ROW).fetchone()  # None: released since; it is tried for again soon
        return (False, winner[0], winner[2]) if winner is not None else (False, "", now)
    return True, owner, now + ttl


def lease_release(conn: sqlite3.Connection, owner: str) -> None:
    conn.execute("DELETE FROM lease WHERE name='active' AND owner=?", (owner,))


def lease_holder(conn: sqlite3.Connection) -> str | None:
    """Who holds the lease, or None when it was released (or never taken); an expired one still has its row."""
    row = conn.execute(LEASE_ROW).fetchone()
    return None if row is None else row[0]


def iso_utc(timestamp: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp)) if timestamp else None


# The hand-overs counted when the running handler began (-1: where it might not act); moved since, its work is void.
HANDLING_SINCE: contextvars.ContextVar[int | None] = contextvars.ContextVar("handling_since", default=None)


class Role:
    """The one answer to "may this instance act now?" (``may_act``: nobody keeps a copy), the lease that gives it
    (section 5's essay), and taking up or letting go the stored work as the lease is won or lost.  Without a
    database (``Role()``, a part on its own) it always acts.
    """

    def __init__(self, db: Database | None = None, ttl: float = 0.0, clock: Clock = SYSTEM_CLOCK):
        self.db, self.ttl, self.clock = db, ttl, clock
        self.owner = current_process_identity(secrets.token_hex(4)).owner()
        self.held = False  # the last claim's answer
        self.continued = False  # that claim renewed the lease with no other holder since ours (or none at all)
        self.holder = ""  # who holds it, as last seen
        self.expires_at = self.last_check = 0.0
        self.answered = False  # a claim got an answer (held or not)
        self._trusted_until = -math.inf  # monotonic
        self.holding, self.handovers = False, 0  # holding: the stored work is taken up in memory
        self._settling = asyncio.Lock()  # the lease loop and the database watch both settle

    def serve(self, states: Conversation, generations: Generations, outbox: Outbox, set_up: Callable[[], None],
              wake: Callable[[], None]) -> None:
        self.states, self.generations, self.outbox, self.set_up, self.wake = states, generations, outbox, set_up, wake

    def trust_left(self) -> float:
        """Seconds this process may still act on the lease (0 when it does not hold it, or may have lost it)."""
        return max(0.0, self._trusted_until - self.clock.monotonic()) if self.held else 0.0

    def acting_left(self) -> float:
        """Seconds this instance may still act, by its monotonic clock: every send must end within them.  Until a
        claim is first answered, a database never usable shares nothing: this instance serves from memory; one
        that opened may be shared, so it waits for that answer."""
        if self.db is None or not (self.answered or self.db.opened):
            return math.inf
        return self.trust_left() if self.holding else 0.0

    def may_act(self) -> bool:
        return self.acting_left() > 0

    def void(self) -> bool:
        """Whether the running handler began where it might not act, or before the last hand-over."""
        return HANDLING_SINCE.get() not in (None, self.handovers)

    async def wait_for_turn(self) -> None:
        """Wait until the next claim is due; a passive one is due early once a peek finds the lease free."""
        if self.held:
            await self.clock.sleep(self.ttl / 3)
            return
        due = self.clock.monotonic() + min(PASSIVE_RETRY_S, self.ttl / 3)
        while self.clock.monotonic() < due:
            await self.clock.sleep(min(LEASE_PEEK_S, due - self.clock.monotonic()))
            try:
                holder = await self.db.read(lease_holder)  # type: ignore[union-attr]
            except DatabaseUnavailable:
                continue  # the claim, when due, reports it
            if holder is None or lease_owner_is_gone(holder, self.owner):
                return

    async def claim(self) -> bool | None:
        """Take or renew the lease (a write): True if we hold it now, False if another live process does,
        None if the database is unusable."""
        sent = self.clock.monotonic()
        try:
            held, holder, expires_at, ours_before = await self.db.write(self._claim, self.clock.time())  # type: ignore
        except DatabaseUnavailable:
            return None
        was_held, first = self.held, not self.answered
        self.held, self.holder, self.expires_at, self.continued = held, holder, expires_at, held and ours_before
        self._trusted_until = sent + self.ttl * 2 / 3
        self.last_check, self.answered = self.clock.time(), True
        if held and not was_held:
            log.info("[LOCK] acquired by %s", self.owner)
        elif not held and (was_held or first):
            log.info("[LOCK] passive: %s holds the lease until %s", holder, iso_utc(expires_at))
        return held

    def _claim(self, conn: Any, local_now: float) -> tuple[bool, str, float, bool]:
        """On the database thread: the claim at the server's time if it has a clock (else every process shares this
        host's), and whether no other process held the lease before it (a missing row: a new database file)."""
        server_now = self.db.dialect.server_time(conn)  # type: ignore[union-attr]
        ours_before = lease_holder(conn) in (None, self.owner)
        return *lease_claim(conn, self.owner, self.ttl, local_now if server_now is None else server_now), ours_before

    async def release(self) -> None:
        if not self.held:
            return
        with contextlib.suppress(DatabaseUnavailable):  # else it expires by itself
            await self.db.write(lease_release, self.owner)  # type: ignore[union-attr]
            self.held = False
            log.info("[LOCK] released by %s", self.owner)

    async def settle(self, recovered: bool = False) -> None:
        """Claim the lease and follow its answer; ``recovered``: the database is back after an outage."""
        async with self._settling:
            first, held = not self.answered, await self.claim()
            if held is None:
                if first:  # no database since the start: serve from memory
                    await self._run()
                return
            if (self.holding and not self.continued) or (first and not held):
                # Hand over: forget the stored work memory holds, the holder takes it up from the database.
                self.holding = False
                self.handovers += 1
                await self.generations.pause()
                await self.outbox.pause()
            if held and not self.holding:
                # Take over: the dialogs first (a step taken while they loaded would be overwritten), then the rest.
                with contextlib.suppress(DatabaseUnavailable):
                    log.info("[DB] %d open dialogs loaded", await self.states.load())
                await self._run(taking_over=True)
                self.wake()
            elif held and recovered:  # what memory queued meanwhile is written, then the rest taken up
                await self._run()

    async def _run(self, taking_over: bool = False) -> None:
        await self.outbox.resume(taking_over)  # taking over: before a handler queues a reply overtaking a stored one
        self.holding = self.holding or taking_over
        await self.generations.resume()
        self.set_up, set_up = lambda: None, self.set_up  # only when this process first becomes active
        set_up()

    async def hold(self, stopping: asyncio.Event) -> None:
        """Renew the lease (or try for it) until the release at shutdown, the drain included: a drain longer
        than the TTL must not be taken for a dead holder (its successor would handle again what this still does)."""
        while True:
            await self.wait_for_turn()
            if not stopping.is_set():
                await self.settle()
            elif self.held:
                await self.claim()


# -- metrics: the Prometheus text exposition format ---------------------------

Sample = tuple[str, dict[str, str], float]  # (name suffix, labels, value)
Family = tuple[str, str, str, list[Sample]]  # (name, type, help, samples)
# The histograms /metrics shows: name -> (bucket bounds, help).
HISTOGRAMS: dict[str, tuple[tuple[float, ...], str]] = {
    "trt_webhook_ack_seconds": ((0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
                                "Webhook request handling time up to the acknowledgement."),
    "trt_update_handling_seconds": ((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
                                    "Time a handler took per update."),
    "trt_generation_seconds": ((5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0),
                               "Time from job creation to its outcome."),
}
# By name: a count per bucket (values over every bound counted last), then the sum of the values.
Histograms = dict[str, list[float]]


def new_histograms() -> Histograms:
    return {name: [0.0] * (len(bounds) + 2) for name, (bounds, _) in HISTOGRAMS.items()}


def observe(histograms: Histograms, name: str, value: float) -> None:
    counts = histograms[name]
    counts[bisect.bisect_left(HISTOGRAMS[name][0], value)] += 1
    counts[-1] += value


def histogram_family(name: str, counts: list[float]) -> Family:
    """A histogram as Prometheus expects it: its buckets cumulative."""
    cumulative = list(itertools.accumulate(counts[:-1]))
    bounds = [repr(bound) for bound in HISTOGRAMS[name][0]] + ["+Inf"]
    samples: list[Sample] = [("_bucket", {"le": bound}, n) for bound, n in zip(bounds, cumulative)]
    return name, "histogram", HISTOGRAMS[name][1], samples + [("_sum", {}, counts[-1]), ("_count", {}, cumulative[-1])]


_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})  # in a label value, as the format asks


def exposition(families: list[Family]) -> bytes:
    """(name, type, help, samples) per metric family -> Prometheus text format 0.0.4."""
    lines = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for suffix, labels, value in samples:
            label_text = ",".join(f'{key}="{str(v).translate(_LABEL_ESCAPES)}"' for key, v in labels.items())
            lines.append(f"{name}{suffix}{{{label_text}}} {float(value)!r}" if labels
                         else f"{name}{suffix} {float(value)!r}")
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


def metric_families(app: App) -> list[Family]:
    """/metrics: every part's counters and gauges, and the histograms, as Prometheus metric families."""
    return (_counter_families(app) + _gauge_families(app) + _red_flag_families(app.diagnostics)
            + [histogram_family(name, counts) for name, counts in app.histograms.items()])


def _counter_families(app: App) -> list[Family]:
    stats, jobs, outbox = dataclasses.asdict(app.pipeline.stats), app.generations, app.role.outbox
    return [(f"trt_updates_{name}_total", "counter", help_text, [("", {}, stats[name])])
            for name, help_text in UPDATE_COUNTERS] + [
        ("trt_telegram_calls_total", "counter", "Bot API calls by method and outcome (ok or error code).",
         [("", {"method": m, "outcome": o}, n) for (m, o), n in sorted(app.telegram.calls.items())]),
        ("trt_kie_calls_total", "counter", "Kie.ai calls by endpoint and outcome (ok or error kind).",
         [("", {"endpoint": e, "outcome": o}, n) for (e, o), n in sorted(jobs.kie.calls.items())]),
        ("trt_jobs_created_total", "counter", "Generation jobs created.", [("", {}, jobs.created)]),
        ("trt_jobs_finished_total", "counter", "Generation jobs finished, by outcome.",
         [("", {"outcome": o}, jobs.finished[o]) for o in ("success", "failed", "timed_out", "cancelled")]),
        ("trt_ledger_entries_total", "counter", "Credit ledger entries: paid (Stars payments), spent, returned "
         "(undelivered paid pictures), refunded.", [("", {"kind": k}, jobs.ledger_counts[k]) for k in LEDGER_KINDS]),
        ("trt_credits_total", "counter", "Credits moved by those entries (paid: sold).",
         [("", {"kind": k}, jobs.ledger_counts[f"credits_{k}"]) for k in LEDGER_KINDS]),
        ("trt_outbox_sent_total", "counter", "Queued messages Telegram took, by method.",
         [("", {"method": m}, n) for m, n in sorted(outbox.sent.items())]),
        ("trt_outbox_dropped_total", "counter", "Queued messages ended unsent: refused (400/403), expired, full.",
         [("", {"reason": r}, outbox.dropped[r]) for r in ("refused", "expired", "full")]),
        ("trt_telegram_429_total", "counter", "Bot API answers 429 (flood control), any method.",
         [("", {}, sum(n for (_, outcome), n in app.telegram.calls.items() if outcome == "429"))]),
        ("trt_telegram_flood_pauses_total", "counter", "Pauses of every send that a 429 began.",
         [("", {}, app.telegram.pauses)]),
    ]


def _gauge_families(app: App) -> list[Family]:
    server, queue = app.server, app.pipeline.snapshot()
    gauges = (
        ("trt_queue_depth", "Updates in memory waiting for a worker.", queue["queue_depth"]),
        ("trt_inbox_backlog", "Unhandled updates in the SQLite inbox.", queue["inbox_backlog"]),
        ("trt_workers_busy", "Workers handling an update now.", queue["workers_active"]),
        ("trt_jobs_in_flight", "Generation jobs not yet delivered.", len(app.generations.jobs)),
        ("trt_outbox_depth", "Messages queued for Telegram, not yet sent.", app.role.outbox.depth),
        ("trt_outbox_oldest_wait_seconds", "How long the oldest queued message has waited.",
         app.role.outbox.oldest_wait_s()),
        ("trt_active", "1 if this instance processes updates, 0 if passive.", app.role.may_act()),
        ("trt_database_ok", "1 if the database is usable, 0 in degraded mode.", app.db.ok),
        ("trt_open_connections", "Open HTTP connections.", server.open_connections),
        ("trt_uptime_seconds", "Seconds since start.", app.diagnostics.uptime()),
    )
    return [(name, "gauge", help_text, [("", {}, value)]) for name, help_text, value in gauges] + [
        ("trt_http_connections", "gauge", "HTTP connections by phase (writing: waiting for the client to read).",
         [("", {"phase": phase}, n) for phase, n in server.phase_counts().items()])]


def _red_flag_families(d: Diagnostics) -> list[Family]:
    webhook, credits = d.seen.get("webhook", {}), d.seen.get("credits")
    error_at = webhook.get("last_error_date") if webhook.get("last_error_message") else None
    return [
        ("trt_red_flag", "gauge", "1 while a red flag is raised (/health's warnings say why), by flag.",
         [("", {"flag": flag}, flag in d.raised) for flag in RED_FLAGS]),
        ("trt_telegram_pending_updates", "gauge", "Updates Telegram holds for the webhook, at the last check.",
         [("", {}, webhook["pending_update_count"])] if "pending_update_count" in webhook else []),
        ("trt_webhook_last_error_age_seconds", "gauge", "Seconds since Telegram's last webhook error.",
         [("", {}, d.clock.time() - error_at)] if isinstance(error_at, (int, float)) else []),
        ("trt_kie_credits", "gauge", "Kie.ai's credit balance, read every 10 minutes.",
         [("", {}, credits)] if credits is not None else []),
    ]


# -- HTTP routes and diagnostics ------------------------------------------------

class SharedCall:
    """At most one call in flight; every caller that comes meanwhile waits for it and gets its outcome (one that
    gives up does not cancel it for the others).  A success is reused for ``max_age`` seconds, a failure not."""

    def __init__(self, call: Callable[[], Awaitable[Any]], max_age: float, clock: Clock = SYSTEM_CLOCK):
        self.call = call
        self.max_age = max_age
        self.clock = clock
        self.calls = 0
        self._fresh: tuple[float, Any] | None = None  # (when, value)
        self._in_flight: asyncio.Task | None = None

    async def get(self) -> Any:
        if self._fresh is not None and self.clock.monotonic() - self._fresh[0] <= self.max_age:
            return self._fresh[1]
        if self._in_flight is None:
            self._in_flight = asyncio.create_task(self._call_once(), name="shared-call")
            # Every caller may have given up by the time it fails: retrieve the error here.
            self._in_flight.add_done_callback(lambda task: task.cancelled() or task.exception())
        return await asyncio.shield(self._in_flight)

    def cancel(self) -> None:
        if self._in_flight is not None:
            self._in_flight.cancel()

    async def _call_once(self) -> Any:
        self.calls += 1
        try:
            value = await self.call()
            self._fresh = (self.clock.monotonic(), value)
            return value
        finally:
            self._in_flight = None


# Each red flag: "failing" while users get no answers (or none soon), else "degraded"; and what to do.
RED_FLAGS: dict[str, tuple[str, str]] = {
    "telegram_unreachable": ("failing", "check the network and TELEGRAM_API_BASE; the bot keeps retrying"),
    "token_rejected": ("failing", "it was revoked or is wrong: copy TELEGRAM_BOT_TOKEN again from @BotFather"),
    "webhook_error": ("failing", "see /diag/webhook"),  # the fix depends on the error: WEBHOOK_ERROR_FIXES
    "setup_failing": ("failing", "see the [WEBHOOK] and [COMMANDS] lines in the log; is WEBHOOK_BASE_URL right?"),
    "outbox_stuck": ("failing", "Telegram does not take the replies: see the [TG] and [OUTBOX] lines in the log"),
    "pending_updates": ("degraded", "Telegram cannot reach the bot, or acknowledgements are slow: see /diag/webhook"),
    "inbox_backlog": ("degraded", "the workers do not keep up: raise UPDATE_QUEUE_WORKERS, or find slow handlers"),
    "kie_credits_low": ("degraded", "top them up in your Kie.ai dashboard before Kie refuses pictures (402)"),
    "daily_limit": ("degraded", "new pictures are refused until 00:00 UTC; raise GEN_DAILY_LIMIT to allow more"),
}
# What a webhook error Telegram reports means, by a phrase in it (the first match wins).
WEBHOOK_ERROR_FIXES = (
    ("401", "the bot refused Telegram's secret token: another deployment registered this webhook, or "
            "WEBHOOK_SECRET_TOKEN changed since; give every instance the same WEBHOOK_SECRET_TOKEN and restart"),
    ("503", "the bot answered 503 (its inbox or memory full, or shutting down): see /health"),
    ("SSL", "Telegram does not trust the certificate of WEBHOOK_BASE_URL"),
    ("", "Telegram cannot reach WEBHOOK_BASE_URL: check the URL, its DNS, and that the service is up"),
)


def webhook_problem(info: dict, now: float, since: float = 0.0) -> tuple[str, str] | None:
    """(reason, fix) when getWebhookInfo's last error is current: newer than ``since`` and
    WEBHOOK_ERROR_RECENT_S, with updates still pending (a deploy gap's error outlives the gap)."""
    message, date = info.get("last_error_message") or "", info.get("last_error_date")
    if not (message and isinstance(date, (int, float)) and date >= max(since, now - WEBHOOK_ERROR_RECENT_S)
            and info.get("pending_update_count")):
        return None
    fix = next(fix for phrase, fix in WEBHOOK_ERROR_FIXES if phrase in message)
    return f"Telegram could not deliver an update {now - date:.0f} s ago: {message}", fix


class Diagnostics:
    """What the bot tells its operator: /health, /diag/webhook, /diag/lock, and red flags (RED_FLAGS) in the log;
    /diag/webhook requests arriving together and the red-flag check share one getWebhookInfo."""

    def __init__(self, app: App):
        self.app = app  # built last: it reports on every other part
        self.clock = clock = app.clock
        self.webhook_info = SharedCall(self._get_webhook_info, DIAG_CACHE_S, clock)
        self.kie_credits = SharedCall(lambda: app.generations.kie.credits(budget_s=0), KIE_CREDITS_CHECK_S, clock)
        self.raised: dict[str, dict[str, str]] = {}  # each red flag raised -> its warning, with the latest figures
        self._backlog: int | None = None
        self._growth = 0  # checks in a row at which the backlog grew
        self.set_up_failing: dict[str, str] = {}  # a set-up step -> its latest error, while it keeps failing
        self.started_at = int(clock.time())  # a webhook error before it is not this process's (whole seconds)
        self._started = clock.monotonic()
        self.seen: dict[str, Any] = {}  # the latest getWebhookInfo answer ("webhook") and credit balance ("credits")
        self._beat = (math.inf, 0.0)  # (the event loop's last beat, how late it came): none before it starts

    async def on_health(self, request: Request) -> Response:
        """200 whatever a restart cannot fix (``status`` and ``warnings`` say it); 503 when one would help."""
        stopping, failure = self.app.stopping.is_set(), self._cannot_work()
        severities = {RED_FLAGS[flag][0] for flag in self.raised} | (set() if self.app.db.ok else {"degraded"})
        payload = {
            "status": "stopping" if stopping else "failing" if failure or "failing" in severities
            else "degraded" if severities else "ok",
            "uptime": int(self.uptime()),
            "active": self.app.role.may_act(),
            "webhook_mode": self.app.config.bot_mode == "webhook",
            "lock_acquired": self.app.role.trust_left() > 0,
            "db_schema_ready": self.app.db.ok,
            "queue": self.app.pipeline.snapshot(),
            "jobs_in_flight": len(self.app.generations.jobs),
            "outbox": self.app.role.outbox.snapshot(),
            "warnings": list(self.raised.values()),
            "version": __version__,
        }
        if failure:
            payload["failure"] = failure
        if not self.app.db.ok:
            payload["database_error"] = mask_secrets(self.app.db.last_error, self.app.config.secrets)
        return json_response(payload, 503 if stopping or failure else 200)

    def _cannot_work(self) -> str:
        """Why this process cannot do its job at all, which a restart ends; "" when it can."""
        beat, late = self._beat
        lag = max(late, time.monotonic() - beat - LOOP_BEAT_S)
        if not self.app.pipeline.workers_alive:
            return "the update workers have died"
        if self.app.pipeline.workers.stuck() >= self.app.pipeline.workers.count:
            return "every update worker is stuck in a handler that ignores its timeout"
        return f"the event loop runs {lag:.1f} s late" if lag > LOOP_LAG_FAIL_S else ""

    def uptime(self) -> float:
        return self.clock.monotonic() - self._started

    async def beat_forever(self) -> None:
        """How late a short sleep ends is how long every request waits (real time: ``clock`` is no loop's)."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(LOOP_BEAT_S)
            self._beat = (time.monotonic(), time.monotonic() - before - LOOP_BEAT_S)

    async def _get_webhook_info(self) -> dict:
        info = await self.app.telegram.call("getWebhookInfo")
        return info if isinstance(info, dict) else {}

    async def on_diag_webhook(self, request: Request) -> Response:
        try:
            info = await self.webhook_info.get()
        except TelegramError as error:
            return json_response({"error": mask_secrets(str(error), self.app.config.secrets)}, 502)
        return json_response({
            "url": mask_secrets(mask_webhook_url(info.get("url") or ""), self.app.config.secrets),
            "pending_update_count": info.get("pending_update_count", 0),
            "last_error_message": mask_secrets(info.get("last_error_message") or "", self.app.config.secrets),
            "last_error_date": info.get("last_error_date"),
            "max_connections": info.get("max_connections"),
        })

    async def on_diag_lock(self, request: Request) -> Response:
        role = self.app.role
        return json_response({
            "active": role.may_act(),
            "lock_acquired": role.trust_left() > 0,  # an expired lease, or one that may be, is not held
            "last_check": iso_utc(role.last_check),
            "instance_id": role.owner,
            "owner": role.holder or None,
            "expires_at": iso_utc(role.expires_at),
            "ttl_s": role.ttl,
            "database_ok": self.app.db.ok,
        })

    async def watch_red_flags(self) -> None:
        """Look at this process every check, at Telegram and Kie.ai less often; log each incident once."""
        last_webhook_check = self.clock.monotonic()
        while True:
            await self.clock.sleep(RED_FLAG_CHECK_S)
            self._observe_here()
            webhook_due = self.clock.monotonic() >= last_webhook_check + WEBHOOK_CHECK_S
            if self.app.config.bot_mode == "webhook" and webhook_due:
                last_webhook_check = self.clock.monotonic()
                await self._observe_webhook()
            if self.app.role.may_act() and self.app.generations.kie.configured and self.app.config.kie_credits_low:
                await self._observe_credits()

    def _observe_here(self) -> None:
        trouble, outbox, fairness = self.app.telegram.trouble, self.app.role.outbox, self.app.generations
        waited, started, failing = outbox.oldest_wait_s(), fairness.started_today(), self.set_up_failing
        for flag, reason, all_clear in (
            ("telegram_unreachable", trouble == "unreachable" and f"the Bot API at {self.app.config.telegram_api_base} "
             "cannot be reached", "the Bot API answers again"),
            ("token_rejected", trouble == "token_rejected" and "Telegram rejects the bot token",
             "Telegram accepts the bot token again"),
            ("setup_failing", not trouble and failing and "set-up keeps failing: " + "; ".join(failing.values()),
             "set-up succeeded"),
            ("outbox_stuck", waited > OUTBOX_STUCK_FLAG_S and f"the oldest of {outbox.depth} replies has waited "
             f"{waited:.0f} s (over {OUTBOX_STUCK_FLAG_S:.0f} s)", "the outbox moves again"),
            ("daily_limit", 0 < fairness.daily_limit <= started and f"{started} pictures started today, "
             f"GEN_DAILY_LIMIT={fairness.daily_limit}", "a new day: pictures may start again"),
        ):
            self.flag(flag, reason or None, all_clear)
        self.observe_backlog(self.app.pipeline.backlog)

    async def _observe_webhook(self) -> None:
        try:
            info = self.seen["webhook"] = await self.webhook_info.get()
        except TelegramError:
            return  # the Telegram client's trouble says why; these flags stay as they were
        pending = info.get("pending_update_count")
        self.observe_pending(pending if isinstance(pending, int) else 0)
        reason, fix = webhook_problem(info, self.clock.time(), self.started_at) or (None, "")
        masked = reason and mask_secrets(reason, self.app.config.secrets)
        self.flag("webhook_error", masked, "Telegram delivers again", fix)

    async def _observe_credits(self) -> None:
        try:
            credits = self.seen["credits"] = await self.kie_credits.get()
        except KieError:
            return  # counted in trt_kie_calls_total; the flag stays as it was
        low, shown = self.app.config.kie_credits_low, f"{credits:g}"
        reason = f"Kie.ai has {shown} credits left (under KIE_CREDITS_LOW={low})" if credits < low else None
        change = self.flag("kie_credits_low", reason, f"Kie.ai has {shown} credits")
        if change is not None and change[0] == "raised":
            await self.app.generations.running.tell_admins(
                lambda lang: render(lang, "admin_credits_low", credits=shown, low=low))

    def flag(self, flag: str, reason: str | None, all_clear: str, fix: str = "") -> tuple[str, str, str] | None:
        """Raise ``flag`` (RED_FLAGS) for ``reason`` (None: it is not, as ``all_clear`` says).  Logged once when its
        condition starts and once when it ends, however many checks see it between: ('raised' | 'cleared', flag,
        text) then, else None."""
        if reason is None:
            if self.raised.pop(flag, None) is None:
                return None
            log.info("[FLAG] cleared: %s", all_clear)
            return "cleared", flag, all_clear
        first = flag not in self.raised
        self.raised[flag] = {"flag": flag, "reason": reason, "fix": fix or RED_FLAGS[flag][1]}
        if not first:
            return None
        text = f"{reason}; {self.raised[flag]['fix']}"
        log.log(logging.ERROR if RED_FLAGS[flag][0] == "failing" else logging.WARNING, "[FLAG] %s", text)
        return "raised", flag, text

    def observe_pending(self, pending: int) -> tuple[str, str, str] | None:
        held, most = f"Telegram holds {pending} pending updates", PENDING_UPDATES_FLAG_OVER
        return self.flag("pending_updates", f"{held} (over {most})" if pending > most else None,
                         f"{held} (at most {most})")

    def observe_backlog(self, backlog: int) -> tuple[str, str, str] | None:
        previous, self._backlog = self._backlog, backlog
        self._growth = self._growth + 1 if previous is not None and backlog > previous else 0
        if self._growth >= BACKLOG_GROWTH_FLAG_CHECKS:
            return self.flag("inbox_backlog", f"the inbox backlog grew at {self._growth} checks in a row, "
                             f"to {backlog} updates", "")
        if backlog == 0 or (previous is not None and backlog < previous):
            return self.flag("inbox_backlog", None, f"the inbox backlog is going down ({backlog} updates)")
        return None


def diag_token_given(request: Request) -> str:
    authorization = request.headers.get("authorization", "")
    return authorization[7:] if authorization.lower().startswith("bearer ") else request.query.get("token", "")


# Path -> (its method, its handler, its guard: what a request must carry, as (a function reading the token it
# gives, the token expected, the refusal's reason and headers), or None).
Routes = dict[str, tuple[str, RequestHandler, tuple | None]]


def http_routes(app: App) -> Routes:
    """What the bot serves over HTTP; path, method and guard are judged from a request's head, before its body."""
    config, diagnostics = app.config, app.diagnostics
    diag_guard = (diag_token_given, config.diag_token, "diagnostics need DIAG_TOKEN",
                  (("WWW-Authenticate", "Bearer"),)) if config.diag_token else None
    return {
        config.webhook_path: ("POST", functools.partial(on_webhook, app), (
            lambda request: request.headers.get("x-telegram-bot-api-secret-token", ""), config.webhook_secret,
            "wrong secret token", ())),
        "/" + config.kie_callback_path: ("POST", functools.partial(on_kie_callback, app), (
            lambda request: request.query.get("token", ""), config.kie_callback_token, "wrong callback token", ())),
        "/health": ("GET", diagnostics.on_health, None),
        "/diag/webhook": ("GET", diagnostics.on_diag_webhook, diag_guard),
        "/diag/lock": ("GET", diagnostics.on_diag_lock, diag_guard),
        "/metrics": ("GET", functools.partial(on_metrics, app), diag_guard),
        "/": ("GET", on_root, None),
    }


def refusal_of_head(routes: Routes, request: Request) -> Response | None:
    """HttpServer's judge of a request head, before the body is read: the refusal its path, method or token
    earns, or None."""
    if request.path not in routes:
        if request.path.startswith("/webhook/"):
            return text_response(401, "wrong webhook secret")
        return text_response(404, "not found")
    method, _, guard = routes[request.path]
    if request.method not in (method, "HEAD" if method == "GET" else method):
        return text_response(405, "method not allowed", (("Allow", "GET, HEAD" if method == "GET" else method),))
    if guard is not None:
        given, expected, reason, headers = guard
        if not hmac.compare_digest(given(request).encode(), expected.encode()):
            return text_response(401, reason, headers)
    return None


async def handle_request(routes: Routes, request: Request) -> Response:
    """A request whose head HttpServer let through; an HttpError its handler raises becomes the response."""
    try:
        return await routes[request.path][1](request)
    except HttpError as error:
        return text_response(error.status, error.reason)


async def on_webhook(app: App, request: Request) -> Response:
    started = app.clock.monotonic()
    update = parse_update(request.body)
    if app.stopping.is_set():
        return text_response(503, "shutting down", RETRY_LATER)
    with app.pipeline.workers.ack_owed():  # handlers give way while it is owed
        outcome = await app.pipeline.ingest(update, request.body)
    observe(app.histograms, "trt_webhook_ack_seconds", app.clock.monotonic() - started)
    if outcome.retry_later:
        return text_response(503, "busy, retry later", RETRY_LATER)
    if outcome is Admission.INVALID:
        return text_response(400, "update cannot be stored")
    return Response(200, b'{"ok":true}', "application/json")


async def on_kie_callback(app: App, request: Request) -> Response:
    """Kie's completion callback, a hint to ask recordInfo.  Its URL token was checked from the head; a fresh
    signature is checked here when KIE_WEBHOOK_HMAC_KEY is set."""
    body = parse_json_object(request.body)
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    task_id = str(body.get("taskId") or data.get("taskId") or data.get("task_id") or "")
    if not task_id:
        raise HttpError(400, "no taskId in the callback")
    if app.config.kie_hmac_key and not kie_callback_signed(
            app.config.kie_hmac_key, task_id, request.headers.get("x-webhook-timestamp", ""),
            request.headers.get("x-webhook-signature", ""), app.clock.time()):
        return text_response(403, "bad or stale webhook signature")
    # A passive instance knows no jobs; the active one's poller finds the result.
    app.generations.on_callback(task_id)
    return json_response({"code": 200, "msg": "success"})


async def on_metrics(app: App, request: Request) -> Response:
    return Response(200, exposition(metric_families(app)), "text/plain; version=0.0.4; charset=utf-8")


async def on_root(request: Request) -> Response:
    return text_response(200, f"trt_bot {__version__}")


class App:
    """The running bot: builds every part, hands each its collaborators, starts and stops them in order."""

    def __init__(self, config: Config, http: httpx.AsyncClient | None = None, *, clock: Clock = SYSTEM_CLOCK,
                 poll_timeout: float = POLL_TIMEOUT_S):
        self.config = config
        self.clock = clock
        self.port: int | None = None
        self.stopping = asyncio.Event()
        self._background = OwnedTasks("[APP]")
        self._lease_loop = OwnedTasks("[LOCK]")  # renewed until the release, after the drain
        self.db = Database(config.database)
        self.role = Role(self.db, config.lease_ttl_s, clock)
        self.http = http or bot_http_client((config.telegram_api_base, config.kie_api_base, config.kie_upload_base))
        self.telegram = TelegramClient(config.telegram_token, config.telegram_api_base, self.http, clock=clock,
                                       send_limits=config.send_limits, acting_left=self.role.acting_left)
        self.kie = KieClient(config.kie_api_key, config.kie_api_base, self.http, clock=clock,
                             upload_base=config.kie_upload_base)
        self.histograms = histograms = new_histograms()
        outbox = Outbox(self.db, self.telegram, senders=outbox_senders(config.telegram_send_rate),
                        max_wait_s=config.outbox_max_wait_s, clock=clock, mode=self.role)
        self.generations = Generations(config, self.db, outbox, self.kie, self.http,
                                       on_finished=functools.partial(observe, histograms, "trt_generation_seconds"),
                                       clock=clock.steady(), mode=self.role)
        # The lambda looks ``self.pipeline`` up when the dialog's /stats asks: it is built after the dialog.
        conversation = Conversation(config, outbox, self.db, self.generations, clock=clock,
                                    queue_stats=lambda: self.pipeline.snapshot())
        self.pipeline = UpdatePipeline(self.db, conversation.handle, queue_size=config.queue_size,
                                       workers=config.queue_workers, clock=clock, mode=self.role,
                                       on_handled=functools.partial(observe, histograms, "trt_update_handling_seconds"),
                                       answer_pre_checkout=conversation.stars.answer_pre_checkout, outbox=outbox)
        self.stars = conversation.stars
        self.role.serve(conversation, self.generations, outbox, self._set_up_bot, self.pipeline.wake)
        self.diagnostics = Diagnostics(self)
        self.routes = http_routes(self)
        self.server = HttpServer(functools.partial(handle_request, self.routes),
                                 check_head=functools.partial(refusal_of_head, self.routes), clock=clock)
        self.poll_timeout = poll_timeout

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        install_secret_masking(self.config.secrets)
        # Bind first: Render marks a deploy failed when the port opens late.
        self.port = await self.server.start(self.config.host, self.config.port)
        log.info("[HTTP] listening on %s:%d", self.config.host, self.port)
        if await self.db.open():
            log.info("[DB] ready at %s (schema v%d)", self.db.where, SCHEMA_VERSION)
        await self.role.settle()  # the holder loads the dialogs before the workers start
        await self.pipeline.start()
        # The loops that run for the life of the process (the lease's until its release).
        for name, loop in (("db-watch", self._watch_database), ("red-flags", self.diagnostics.watch_red_flags),
                           ("loop-beat", self.diagnostics.beat_forever)):
            self._background.start(loop(), name)
        if self.config.bot_mode == "polling":
            self._background.start(long_poll(self.telegram, self.pipeline, self.role, self.clock, self.poll_timeout),
                                   "polling")
        self._lease_loop.start(self.role.hold(self.stopping), "lease")

    async def stop(self) -> None:
        """Graceful shutdown within config.shutdown_grace_s (Render waits 30 s by default)."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        deadline = self.clock.monotonic() + self.config.shutdown_grace_s
        log.info("[APP] shutting down")
        await self.server.close(grace=min(5.0, self.config.shutdown_grace_s / 4))
        self.diagnostics.webhook_info.cancel()
        self.diagnostics.kie_credits.cancel()
        await self._background.cancel_all()
        await self.pipeline.stop(grace=max(0.0, deadline - self.clock.monotonic()))
        # Deliveries under way get half of what is left (the outbox sends their messages), the replies the rest;
        # unsent replies stay stored, unfinished jobs in their table.
        await self.generations.stop(grace=max(0.0, deadline - self.clock.monotonic()) / 2)
        await self.role.outbox.stop(grace=max(0.0, deadline - self.clock.monotonic()))
        await self._lease_loop.cancel_all()
        await self.role.release()  # last: the successor never takes an update this process still handles
        await self.http.aclose()
        await self.db.close()
        log.info("[APP] stopped")

    def _set_up_bot(self) -> None:
        """The webhook (then the payments a flush of its backlog dropped) and the command menu made to match ours,
        each in the background until it succeeds: start-up never waits for the Bot API."""
        self._background.start(self._set_up_webhook_then_payments(), "webhook-setup")
        self._background.start(until_done("COMMANDS", lambda: ensure_commands(self.telegram), self.telegram,
                                          self.clock, self.diagnostics.set_up_failing), "commands-setup")

    async def _set_up_webhook_then_payments(self) -> None:
        failing = self.diagnostics.set_up_failing
        if self.config.bot_mode == "webhook":
            await until_done("WEBHOOK", lambda: ensure_webhook(self.telegram, self.config), self.telegram, self.clock,
                             failing)
        if self.config.stars_packs:
            await until_done("STARS", self.stars.reconcile, self.telegram, self.clock, failing)

    async def _watch_database(self) -> None:
        """Notice the database file being deleted or replaced, even with no traffic, and reopen an
        unusable database (a new file if the old one is gone) to return to durable mode."""
        while True:
            await self.clock.sleep(DB_RETRY_S)
            if self.db.ok:
                await self.db.verify()
            if not self.db.ok and await self.db.open():
                log.info("[DB] recovered; back to durable mode")
                await self.role.settle(recovered=True)  # the lease first: another may have taken over meanwhile
                self.pipeline.wake()


async def run_check(config: Config, out: Callable[[str], None] = print) -> int:
    """``python trt_bot.py check``: a line per check of the configuration, the database, Telegram and Kie.ai,
    problems with what to do; the exit code is 1 when something needs fixing."""
    problems = 0

    def report(status: str, subject: str, detail: str) -> None:
        nonlocal problems
        problems += status == "FAIL"
        out(mask_secrets(f"[{status:>4}] {subject}: {detail}", config.secrets))

    where = mask_webhook_url(config.webhook_url) if config.bot_mode == "webhook" else "getUpdates long polling"
    database = Database(config.database)
    report("ok", "configuration", f"{config.bot_mode} mode ({where}), database {database.where}, "
                                  f"{'z-image only' if config.single_model_only else f'{len(CATALOG)} models'}")
    for line in config.describe():
        out(mask_secrets(f"       {line}", config.secrets))
    if await database.open():
        report("ok", "database", f"opened, schema v{SCHEMA_VERSION}")
    else:
        report("FAIL", "database", f"cannot open {database.where} ({database.last_error}): {database.dialect.fix}")
    await database.close()
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0)) as http:
        telegram = TelegramClient(config.telegram_token, config.telegram_api_base, http, ONE_TRY)
        try:
            me = await telegram.call("getMe") or {}
            report("ok", "Telegram", f"token accepted: @{me.get('username')} (id {me.get('id')})")
            await _check_webhook(config, telegram, report)
        except TelegramError as error:
            if error.error_code in TOKEN_REJECTED_CODES:
                report("FAIL", "Telegram", f"the bot token was rejected ({error.error_code} {error.description}): "
                                           "copy TELEGRAM_BOT_TOKEN again from @BotFather (/token)")
            else:
                report("FAIL", "Telegram", f"{config.telegram_api_base} did not answer getMe ({error.description}): "
                                           "check the network or TELEGRAM_API_BASE")
        await _check_kie(config, KieClient(config.kie_api_key, config.kie_api_base, http, ONE_TRY), report)
    out("all good" if not problems else f"{problems} problem(s) to fix")
    return 1 if problems else 0


async def _check_webhook(config: Config, telegram: TelegramClient, report: Callable[[str, str, str], None]) -> None:
    info = await telegram.call("getWebhookInfo") or {}
    url = mask_webhook_url(info.get("url") or "") or "none"
    pending, error = info.get("pending_update_count") or 0, info.get("last_error_message") or ""
    status = "ok" if not error else "warn"
    detail = f"{url}, {pending} pending" + (f", last error: {error}" if error else "")
    if (problem := webhook_problem(info, time.time())) is not None:
        status, detail = "FAIL", f"{url}, {pending} pending; {problem[0]}: {problem[1]}"
    elif config.bot_mode == "webhook" and info.get("url") != config.webhook_url:
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
        report("FAIL", "Kie.ai", f"{error}: {kie_code(error.code).fix.format(api_base=config.kie_api_base)}")
        return
    report("ok" if credits > 0 else "FAIL", "Kie.ai", f"key accepted, {credits:g} credits"
           + ("" if credits > 0 else ": top them up in your Kie.ai dashboard"))


def freeze_start_up_objects() -> None:
    """Keep what start-up built (the modules, the app) out of every later full garbage collection.

    None of it is garbage, yet a full collection walks all of it, stalling the event
    loop and every ack with it (11 ms, bench/gc_pauses.py); frozen, under 0.5 ms.
    """
    gc.collect()
    gc.freeze()


async def serve(config: Config) -> int:
    app = App(config)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await app.start()
    freeze_start_up_objects()
    await stop.wait()
    await app.stop()
    return 0


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
    try:
        import uvloop
    except ImportError:
        uvloop = None
    with asyncio.Runner(loop_factory=uvloop and uvloop.new_event_loop) as runner:
        return runner.run(run_check(config) if args == ["check"] else serve(config))


if __name__ == "__main__":
    sys.exit(main())
