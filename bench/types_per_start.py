"""Lists the named types (classes of trt_bot.py) one /start passes through, from the socket to the reply.

Run: .venv/bin/python -m pytest -q -s -p no:cacheprovider bench/types_per_start.py

A profiler hook records every call while a second /start goes through a started bot (the first warms it
up) and the fake Bot API takes the reply; a type counts when one of its methods runs or an instance of it
is built (a NamedTuple's too).  The bot runs at Telegram's default send rate, as deployed, and the request is prepared before the
hook is set (the harness reading the webhook path would count Config).  Work a timer happens to start
meanwhile (a renewal, a refill) may add a type now and then.
"""

import inspect
import json
import sys
import threading

import httpx

import trt_bot
from conftest import eventually, post_update, secret_header, update_message


async def test_types_one_start_passes_through(make_app, fake_tg):
    app = await make_app()
    await post_update(app, update_message(1, 500, "/start", "en"))
    await eventually(lambda: fake_tg.texts_to(500))
    # The start-up's one-off set-up calls (webhook, command menus) end on their own time: not the /start's work.
    await eventually(lambda: not any(task.get_name().endswith("setup") for task in app._background.running))
    seen: dict[str, str] = {}

    def record(frame, event, arg):
        if event != "call":
            return
        owner = frame.f_locals.get("self")
        if owner is not None and type(owner).__module__ == "trt_bot":
            seen.setdefault(type(owner).__name__, frame.f_code.co_qualname)
        built = frame.f_locals.get("_cls")  # a NamedTuple's __new__ has no ``self``
        if frame.f_code.co_filename == "<string>" and getattr(built, "__module__", "") == "trt_bot":
            seen.setdefault(built.__name__, f"{built.__name__}.__new__")
        if frame.f_code.co_filename == trt_bot.__file__:
            head = frame.f_code.co_qualname.split(".")[0]
            if inspect.isclass(getattr(trt_bot, head, None)):
                seen.setdefault(head, frame.f_code.co_qualname)

    url = f"http://127.0.0.1:{app.port}{app.config.webhook_path}"
    body = json.dumps(update_message(2, 501, "/start", "en"))
    client = httpx.AsyncClient(verify=False)  # plain HTTP
    request = client.build_request("POST", url, content=body,
                                   headers={**secret_header(app), "Content-Type": "application/json"})
    sys.setprofile(record)
    threading.setprofile(record)
    try:
        await client.send(request)
        await eventually(lambda: fake_tg.texts_to(501))
        await app.pipeline.idle()  # its done mark is committed too
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        await client.aclose()
    for name in sorted(seen):
        print(f"{name:24} first seen in {seen[name]}")
    print(f"{len(seen)} named types")
    assert seen  # the hook saw the /start go through
