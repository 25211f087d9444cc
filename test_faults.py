"""Fault injection, end to end: kill -9, a failing Telegram, a misbehaving Kie.ai, a failing disk.

Each test drives the bot through its webhook socket like Telegram does (a chat's
next update only once the last one was acknowledged, again until it is), lets
the fakes in conftest.py fail on purpose, and checks the promises that must
survive: every acknowledged update is handled, in its chat's order; no job is
delivered twice; every job ends with one photo or one clear failure.

Randomness is seeded (FAULT_SEED, default 1; printed with the totals at the end
of the run), so a failure reproduces with the same seed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import itertools
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import time
from typing import Any, Callable

import httpx
import pytest

import trt_bot
from conftest import (ALL_RECORDS, FAULT_KINDS, FAULT_SEEDS, FAULT_TOTALS, KIE_KEY, POSTGRES_PASSWORD, FaultPlan,
                      FaultyBotApi, FaultyKie, Performed, bot_env, eventually, free_port, new_postgres, post_update,
                      refuse_rows, update_callback, update_message)

SEED = int(os.environ.get("FAULT_SEED", "1"))
TEXTS = trt_bot.TEXTS["ru"]
PROMPT_MAX_CHARS = trt_bot.Z_IMAGE.prompt_chars[1]  # "create" asks for a Z-Image prompt
RESULT_METHODS = ("sendPhoto", "sendDocument", "editMessageText", "sendMessage")  # how a job's outcome reaches a user
PHOTO_METHODS = ("sendPhoto", "sendDocument")
_update_ids = itertools.count(1)


@pytest.fixture(autouse=True)
def seed_in_totals():
    FAULT_SEEDS.add(SEED)


@pytest.fixture
def faulty_tg():
    fake = FaultyBotApi()
    yield fake
    fake.close()


@pytest.fixture
def fake_tg(faulty_tg):
    """In-process bots (conftest's make_app) talk to the faulty fake here, so its records are the same."""
    return faulty_tg


@pytest.fixture
def faulty_kie():
    fake = FaultyKie()
    yield fake
    fake.close()


@pytest.fixture
async def client():
    async with httpx.AsyncClient(timeout=10.0) as http:
        yield http


@pytest.fixture(autouse=True)
def harness_log_masked_here(harness_log_masked):
    """Every test here runs bot subprocesses while this process plays Telegram and Kie."""


###############################################################################
# What a chat sends and what it must get back
###############################################################################

def too_long(n: int) -> str:
    """A prompt n characters over the limit: its answer names its length, so each reply is told apart."""
    return "x" * (PROMPT_MAX_CHARS + 1 + n)


def opening(key: str) -> str:
    """A pattern for the fixed start of a text (up to its first placeholder)."""
    return "^" + re.escape(TEXTS[key].split("{")[0])


# A reply to a chat, shortened to what it answers.
REPLY_TOKENS: tuple[tuple[str, Callable[[re.Match], str]], ...] = (
    (opening("ask_prompt"), lambda m: "ask_prompt"),
    (opening("prompt_too_long") + r"(\d+)", lambda m: f"long{int(m[1]) - PROMPT_MAX_CHARS - 1}"),
    (opening("ask_ratio") + r"(.*)»", lambda m: f"ask_ratio:{m[1]}"),
    # The pressed ratio question becomes the ⏳ status (later edits show more elapsed time: not replies).
    (r"^⏳ .* · 0:00$", lambda m: "generating"),
    (opening("start"), lambda m: "start"),
    (opening("help"), lambda m: "help"),
)


def reply_token(text: str) -> str:
    for pattern, token in REPLY_TOKENS:
        match = re.search(pattern, text)
        if match:
            return token(match)
    return text[:40]


@dataclasses.dataclass
class Chat:
    """One user's updates in the order Telegram sends them, and the reply each one must get."""

    chat_id: int
    updates: list[dict] = dataclasses.field(default_factory=list)
    expected: list[str] = dataclasses.field(default_factory=list)
    acked: int = 0  # Telegram sends the next update only once this many were acknowledged
    prompt: str = ""  # a generation's prompt

    def add(self, update: dict, token: str) -> None:
        self.updates.append(update)
        self.expected.append(token)

    def press(self, data: str, token: str) -> None:
        self.add(update_callback(next(_update_ids), self.chat_id, data), token)

    def say(self, text: str, token: str) -> None:
        self.add(update_message(next(_update_ids), self.chat_id, text), token)

    def too_long_prompts(self, count: int) -> None:
        """"Create" (the bot asks for a prompt), then prompts it refuses as too long, each answered by its length."""
        self.press("new", "ask_prompt")
        sent = sum(token.startswith("long") for token in self.expected)
        for n in range(sent, sent + count):
            self.say(too_long(n), f"long{n}")

    def generate(self, prompt: str) -> None:
        self.prompt = prompt
        self.press("new", "ask_prompt")
        self.say(prompt, f"ask_ratio:{prompt}")
        self.press("ratio:1:1", "generating")

    @property
    def all_acked(self) -> bool:
        return self.acked == len(self.updates)

    @property
    def button_presses(self) -> list[str]:
        """The callback query ids of this chat's button presses (each one must be answered)."""
        return [update["callback_query"]["id"] for update in self.updates if "callback_query" in update]


def follow(expected: list[str], runs: list[list[str]]) -> tuple[int, int, str]:
    """Match each bot process's replies to a chat (``runs``, oldest process first) to ``expected``.

    A process handles the chat's unfinished updates in order, from the first one
    not marked done, which is at or before where the previous process got (kill -9
    can come between a reply and its done mark): its replies are a contiguous
    slice of ``expected`` that starts no later than the end of what was sent before.
    Returns (lost, replayed, problem): updates never answered, replies sent again
    after a kill, and what broke the order ('' if nothing).
    """
    reached = replayed = 0
    for life, run in enumerate(runs, 1):
        starts = [s for s in range(min(reached, len(expected) - len(run)), -1, -1) if expected[s:s + len(run)] == run]
        if not starts:
            return len(expected) - reached, replayed, f"process {life} sent {run} after {expected[:reached]}"
        replayed += min(reached, starts[0] + len(run)) - starts[0]
        reached = max(reached, starts[0] + len(run))
    return len(expected) - reached, replayed, ""


def unanswered(chats: list[Chat], performed: list[Performed]) -> dict[int, str]:
    """Chats with an acknowledged update not answered yet (or answered out of order): what is wrong with each."""
    waiting = {}
    for chat in chats:
        runs = replies_by_process(performed, chat.chat_id)
        lost, _, problem = follow(chat.expected, runs)
        if lost or problem:
            waiting[chat.chat_id] = problem or f"{lost} unanswered; expected {chat.expected}, got {runs}"
    return waiting


async def all_answered(chats: list[Chat], performed: Callable[[], list[Performed]], timeout: float) -> None:
    """Wait until every chat has all its replies, in order; fail at once when a reply comes out of order."""
    deadline = time.monotonic() + timeout
    while waiting := unanswered(chats, performed()):
        if any(problem.startswith("process") for problem in waiting.values()):
            raise AssertionError(f"seed {SEED}: replies out of order: {waiting}")
        if time.monotonic() > deadline:
            raise AssertionError(f"seed {SEED}: not all answered within {timeout}s: {waiting}")
        await asyncio.sleep(0.05)


def button_job_id(params: dict, action: str) -> str:
    """The job id in a message's ``action`` button: "again" on job results (photo or failure), "resend" on the offer."""
    markup = params.get("reply_markup") or {}
    if isinstance(markup, str):
        markup = json.loads(markup)
    for row in markup.get("inline_keyboard", []):
        for button in row:
            if str(button.get("callback_data", "")).startswith(f"{action}:"):
                return button["callback_data"][len(action) + 1:]
    return ""


def again_job_id(params: dict) -> str:
    return button_job_id(params, "again")


def is_status(call: Performed) -> bool:
    """The edit that turns a pressed ratio question into the ⏳ status: the ratio press's reply."""
    return call.method == "editMessageText" and reply_token(call.params.get("text", "")) == "generating"


def reply_calls_by_process(performed: list[Performed], chat_id: int) -> list[list[Performed]]:
    runs: dict[int, list[Performed]] = collections.defaultdict(list)
    for call in performed:
        if int(call.params.get("chat_id") or 0) != chat_id:
            continue
        if (call.method == "sendMessage" and not again_job_id(call.params)) or is_status(call):
            runs[call.life].append(call)
    return [runs[life] for life in sorted(runs)]


def replies_by_process(performed: list[Performed], chat_id: int) -> list[list[str]]:
    return [[reply_token(call.params["text"]) for call in run] for run in reply_calls_by_process(performed, chat_id)]


def sent_again(chat: Chat, performed: list[Performed]) -> list[tuple[int, Performed]]:
    """(update id, the first process's send) of each reply a second process sent again (see ``follow``)."""
    runs = reply_calls_by_process(performed, chat.chat_id)
    if len(runs) != 2:
        return []
    first, second = runs[0], [reply_token(call.params["text"]) for call in runs[1]]
    starts = [s for s in range(min(len(first), len(chat.expected) - len(second)), -1, -1)
              if chat.expected[s:s + len(second)] == second]
    return [(chat.updates[index]["update_id"], first[index]) for index in range(starts[0], len(first))] if starts else []


def job_outcomes(performed: list[Performed]) -> dict[str, collections.Counter]:
    """Per job id, what reached the user: 'photo' (sendPhoto / sendDocument), 'failure' and re-send 'offer' messages."""
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for call in performed:
        if call.method not in RESULT_METHODS:
            continue
        if job_id := again_job_id(call.params):
            outcomes[job_id]["photo" if call.method in PHOTO_METHODS else "failure"] += 1
        elif job_id := button_job_id(call.params, "resend"):
            outcomes[job_id]["offer"] += 1
    return outcomes


def delivery_problem(got: collections.Counter, killed: bool) -> str:
    """What is wrong with how a job ended for its user ('' if nothing).

    One photo, one failure, or the re-send offer when the photo's answer was
    lost.  After kill -9 the photo may have gone out just before the kill: the
    offer then follows it ("if it is not above"), and may be made again.
    """
    photos, failures, offers = got["photo"], got["failure"], got["offer"]
    if photos + failures + offers == 0:
        return "the user got neither a photo, a failure nor the re-send offer"
    if photos + failures > 1 or (offers and failures) or (not killed and offers and (photos or offers > 1)):
        return f"the user got {dict(got)}"
    return ""


@dataclasses.dataclass
class Tally:
    """What one test injected and found; added to the run's totals, then asserted."""

    updates: int = 0
    jobs: int = 0
    lost: int = 0
    duplicated: int = 0
    replayed: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)

    def check_chats(self, chats: list[Chat], performed: list[Performed], killed: bool) -> None:
        """Every update answered, in order; a reply sent again counts as replayed after a kill, else duplicated."""
        for chat in chats:
            runs = replies_by_process(performed, chat.chat_id)
            lost, replayed, problem = follow(chat.expected, runs)
            self.lost += lost
            extra = collections.Counter(itertools.chain(*runs)) - collections.Counter(chat.expected)
            if killed:
                self.replayed += replayed
            elif extra:
                self.duplicated += sum(extra.values())
                self.problems.append(f"chat {chat.chat_id}: replies sent twice: {dict(extra)}")
            if lost:
                self.problems.append(f"chat {chat.chat_id}: {lost} acknowledged updates never answered")
            if problem:
                self.problems.append(f"chat {chat.chat_id}: order broken: {problem}; expected {chat.expected}")
        self.updates += sum(len(chat.updates) for chat in chats)

    def check_jobs(self, outcomes: dict[str, collections.Counter], job_ids: list[str], killed: bool = False) -> None:
        self.jobs += len(job_ids)
        for job_id in job_ids:
            problem = delivery_problem(outcomes[job_id], killed)
            if not sum(outcomes[job_id].values()):
                self.lost += 1
            elif problem:
                self.duplicated += sum(outcomes[job_id].values()) - 1
            if problem:
                self.problems.append(f"job {job_id}: {problem}")

    def report(self, rounds: int = 0) -> None:
        FAULT_TOTALS.update(rounds=rounds, updates=self.updates, jobs=self.jobs, lost=self.lost,
                            duplicated=self.duplicated, replayed=self.replayed)
        assert not self.problems, f"seed {SEED}:\n" + "\n".join(self.problems)


###############################################################################
# Playing Telegram and Kie.ai against the bot
###############################################################################

@dataclasses.dataclass
class Target:
    """The bot process now running, as Telegram and Kie reach it."""

    base_url: str
    config: trt_bot.Config

    @property
    def webhook_url(self) -> str:
        return self.base_url + self.config.webhook_path

    @property
    def callback_url(self) -> str:
        return f"{self.base_url}/{self.config.kie_callback_path}?token={self.config.kie_callback_token}"


async def post_json(client: httpx.AsyncClient, url: str, body: dict, headers: dict | None = None) -> int | None:
    """The status, or None when the bot did not answer (killed, not listening yet)."""
    try:
        return (await client.post(url, json=body, headers=headers or {})).status_code
    except httpx.HTTPError:
        return None


async def send_updates(client: httpx.AsyncClient, target: Callable[[], Target], chat: Chat) -> None:
    """What Telegram does for one chat: post each update until it is acknowledged, in order."""
    while not chat.all_acked:
        bot = target()
        headers = {"X-Telegram-Bot-Api-Secret-Token": bot.config.webhook_secret}
        if await post_json(client, bot.webhook_url, chat.updates[chat.acked], headers) == 200:
            chat.acked += 1
        else:
            await asyncio.sleep(0.05)  # Telegram retries later


async def send_all(client: httpx.AsyncClient, target: Callable[[], Target], chats: list[Chat]) -> None:
    await asyncio.gather(*(send_updates(client, target, chat) for chat in chats))


def callback_body(task_id: str, state: str, url: str = "") -> dict:
    """A Kie callback saying ``state`` whatever the task really did (a stale, stray or replayed one)."""
    data = {"taskId": task_id, "state": state, "resultJson": json.dumps({"resultUrls": [url]}) if url else "",
            "failCode": "500" if state == "fail" else "", "failMsg": "internal error" if state == "fail" else ""}
    return {"code": 200 if state == "success" else 501, "msg": "Playground task completed.", "data": data}


class KiePlayer:
    """Kie.ai's side: finishes every task created at the fake as ``script(player, task_id, prompt)`` says.

    A script is a coroutine function that calls ``finish`` and ``call_back`` as
    its scenario needs; tasks are picked up as they appear.
    """

    def __init__(self, kie: FaultyKie, client: httpx.AsyncClient, target: Callable[[], Target],
                 script: Callable[[KiePlayer, str, str], Any], telegram: FaultyBotApi | None = None):
        self.kie = kie
        self.telegram = telegram
        self.client = client
        self.target = target
        self.script = script
        self._scripts: dict[str, asyncio.Task] = {}

    def result_url(self, task_id: str) -> str:
        return f"https://tempfile.example.com/{task_id}.png"

    def finish(self, task_id: str, success: bool) -> None:
        if success:
            self.kie.complete(task_id, self.result_url(task_id))
        else:
            self.kie.fail_task(task_id, "500", "internal error")

    async def call_back(self, task_id: str, body: dict | None = None) -> int | None:
        return await post_json(self.client, self.target().callback_url, body or self.kie.callback_body(task_id))

    async def run(self) -> None:
        while True:
            for task_id, prompt in self.kie.task_prompts().items():
                if task_id not in self._scripts:
                    self._scripts[task_id] = asyncio.create_task(self.script(self, task_id, prompt))
            await asyncio.sleep(0.02)

    @property
    def idle(self) -> bool:
        return all(task.done() for task in self._scripts.values())

    async def stop(self, runner: asyncio.Task) -> None:
        runner.cancel()
        for task in [runner, *self._scripts.values()]:
            task.cancel()
        results = await asyncio.gather(runner, *self._scripts.values(), return_exceptions=True)
        errors = [r for r in results if isinstance(r, Exception) and not isinstance(r, asyncio.CancelledError)]
        assert not errors, errors


class Lives:
    """Bot processes on one database, one after the other; each calls the fake Bot API under /life<N>."""

    def __init__(self, start_process: Callable[[dict[str, str]], Any], fake_tg: FaultyBotApi, env: dict[str, str]):
        self.start_process = start_process
        self.fake_tg = fake_tg
        self.env = env
        self.config = trt_bot.load_config(env)
        self.count = 0
        self.current: Any = None

    def start(self):
        self.count += 1
        self.current = self.start_process({**self.env, "PORT": str(free_port()),
                                           "TELEGRAM_API_BASE": self.fake_tg.api_base(self.count)})
        return self.current

    def target(self) -> Target:
        return Target(self.current.base_url, self.config)

    async def health(self, client: httpx.AsyncClient) -> dict:
        try:
            return (await client.get(self.current.base_url + "/health")).json()
        except httpx.HTTPError:
            return {}


async def until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    """Wait for an async ``condition()`` to hold, checking every 50 ms; fail saying ``what`` did not happen."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"seed {SEED}: {what} within {timeout}s")
        await asyncio.sleep(0.05)


async def settled(missing: Callable[[], list[str]], timeout: float) -> None:
    """Wait until ``missing()`` is empty; fail listing what still is."""
    deadline = time.monotonic() + timeout
    while what := missing():
        if time.monotonic() > deadline:
            raise AssertionError(f"seed {SEED}: after {timeout}s still " + "\n".join(what))
        await asyncio.sleep(0.05)


def jobs_in(database: str) -> list[tuple[str, int, str, str]]:
    """(id, chat_id, prompt, state) of every job in the SQLite file."""
    with contextlib.closing(sqlite3.connect(database, timeout=10)) as conn:
        return conn.execute("SELECT id, chat_id, prompt, state FROM jobs ORDER BY created_at").fetchall()


###############################################################################
# 1. kill -9 at random moments of a mixed load
###############################################################################

KILL_ROUNDS = 24


async def kie_at_random(player: KiePlayer, task_id: str, prompt: str) -> None:
    """Kie finishes the task a little later, mostly well; calls back zero, one or two times."""
    rng = random.Random(f"{SEED}|{task_id}")
    success, callbacks = rng.random() < 0.85, rng.choice((0, 1, 1, 2))
    await asyncio.sleep(rng.uniform(0.05, 0.6))
    player.finish(task_id, success)
    FAULT_KINDS["kie callback missing" if callbacks == 0 else "kie callback duplicated" if callbacks == 2
                else "kie callback on time"] += 1
    for _ in range(callbacks):
        await player.call_back(task_id)


async def test_kill_9_at_random_moments_of_a_mixed_load_loses_nothing_and_delivers_each_job_once(
        tmp_path, fault_bots, faulty_tg, faulty_kie, client):
    """Chats whose replies do not depend on the dialog's state must get every reply, in order.

    A generation's dialog is not replay-safe: an update handled when the kill
    came, but not marked done, is handled again against the dialog it already
    moved on (a prompt then gets the hint).  For those chats every button press
    must still be answered, a user told "⏳" must have a job, and every job must
    end with exactly one photo or failure.
    """
    rng = random.Random(SEED)
    database = str(tmp_path / "bot.sqlite3")
    # A killed holder is provably gone, so each successor takes over at once whatever the TTL; a longer one keeps
    # a renewal made late by a loaded machine from lapsing the lease's trust, which is not the fault tried here.
    env = bot_env(faulty_tg, database, KIE_API_KEY=KIE_KEY, KIE_API_BASE=faulty_kie.base_url, GEN_TIMEOUT_S="60",
                  LEASE_TTL_S="6")
    lives = Lives(fault_bots, faulty_tg, env)
    prompters = [Chat(1000 + n) for n in range(6)]  # too-long prompts: each reply tells its update apart
    starters = [Chat(2000 + n) for n in range(4)]  # /start and the help button
    generators: list[Chat] = []
    player = KiePlayer(faulty_kie, client, lives.target, kie_at_random)
    kie_runner = asyncio.create_task(player.run())
    try:
        for _ in range(KILL_ROUNDS):
            for chat in rng.sample(prompters, 3):
                chat.too_long_prompts(rng.randint(1, 4))
            for chat in rng.sample(starters, 2):
                if rng.random() < 0.6:
                    chat.say("/start", "start")
                else:
                    chat.press("help", "help")
            for _ in range(rng.choice((0, 1, 1, 2))):
                generators.append(Chat(3000 + len(generators)))
                generators[-1].generate(f"маяк {len(generators)}")
            bot = lives.start()
            sending = asyncio.create_task(send_all(client, lives.target, prompters + starters + generators))
            await asyncio.sleep(rng.uniform(0.05, 0.9))  # from the start-up to well after the load is in
            bot.kill()
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            FAULT_KINDS["kill -9"] += 1
        await lives.start().wait_healthy()  # the last one is left to finish
        stateless = prompters + starters
        await asyncio.wait_for(send_all(client, lives.target, stateless + generators), 60)

        def still_missing() -> list[str]:
            waiting = unanswered(stateless, faulty_tg.performed)
            out_of_order = {chat_id: what for chat_id, what in waiting.items() if what.startswith("process")}
            assert not out_of_order, f"seed {SEED}: replies out of order: {out_of_order}"
            twice = {job_id: dict(got) for job_id, got in job_outcomes(faulty_tg.performed).items()
                     if got["photo"] + got["failure"] > 1}
            assert not twice, f"seed {SEED}: jobs delivered more than once: {twice}"
            return ([f"chat {chat_id}: {what}" for chat_id, what in waiting.items()]
                    + generation_problems(generators, faulty_tg, jobs_in(database)))

        await settled(still_missing, timeout=60)
        await eventually(lambda: player.idle, timeout=10)
        assert await asyncio.to_thread(lives.current.terminate) == 0  # a barrier: nothing is sent after this
    finally:
        await player.stop(kie_runner)
    tally = Tally()
    tally.check_chats(stateless, faulty_tg.performed, killed=True)
    jobs = jobs_in(database)
    tally.check_jobs(job_outcomes(faulty_tg.performed), [job_id for job_id, *_ in jobs], killed=True)
    tally.problems += generation_problems(generators, faulty_tg, jobs)
    tally.updates += sum(len(chat.updates) for chat in generators)
    tally.report(rounds=KILL_ROUNDS)


def generation_problems(generators: list[Chat], fake_tg: FaultyBotApi, jobs: list[tuple]) -> list[str]:
    """Presses not answered, users told "⏳" without a job, jobs not delivered or delivered other than once."""
    answered = {call.params["callback_query_id"] for call in fake_tg.performed_of("answerCallbackQuery")}
    chats_with_jobs = {chat_id for _, chat_id, _, _ in jobs}
    outcomes = job_outcomes(fake_tg.performed_of(*RESULT_METHODS))
    told = {int(call.params["chat_id"]) for call in fake_tg.performed_of("editMessageText") if is_status(call)}
    return ([f"chat {chat.chat_id}: presses {sorted(set(chat.button_presses) - answered)} not answered"
             for chat in generators if set(chat.button_presses) - answered]
            + [f"chat {chat_id} was told ⏳ but has no job" for chat_id in sorted(told - chats_with_jobs)]
            + [f"job {job_id} {state}, outcomes {dict(outcomes[job_id])}" for job_id, _, _, state in jobs
               if state != "delivered" or delivery_problem(outcomes[job_id], killed=True)])


async def test_kill_9_while_telegram_answers_the_generating_message_still_makes_the_picture(
        tmp_path, fault_bots, faulty_tg, faulty_kie, client):
    """The press is replayed after the restart: the dialog must still be at the ratio step, not cleared."""
    database = str(tmp_path / "bot.sqlite3")
    env = bot_env(faulty_tg, database, KIE_API_KEY=KIE_KEY, KIE_API_BASE=faulty_kie.base_url, LEASE_TTL_S="2")
    lives = Lives(fault_bots, faulty_tg, env)
    answer = faulty_tg.hold_answer(lambda method, params: method == "editMessageText"
                                   and reply_token(params.get("text", "")) == "generating")
    chat = Chat(4000)
    chat.generate("маяк в тумане")
    bot = lives.start()
    await send_all(client, lives.target, [chat])
    await eventually(lambda: any(is_status(call) for call in faulty_tg.performed_of("editMessageText")))
    bot.kill()
    answer.set()
    FAULT_KINDS["kill -9"] += 1

    async def succeed(player: KiePlayer, task_id: str, prompt: str) -> None:
        player.finish(task_id, success=True)
        await player.call_back(task_id)

    def not_delivered() -> list[str]:
        if [state for *_, state in jobs_in(database)] == ["delivered"]:
            return []
        answers = [call.params.get("text") for call in faulty_tg.performed_of("answerCallbackQuery")]
        return [f"jobs {jobs_in(database)}; the presses were answered {answers}"]

    player = KiePlayer(faulty_kie, client, lives.target, succeed)
    kie_runner = asyncio.create_task(player.run())
    try:
        await lives.start().wait_healthy()
        await settled(not_delivered, timeout=20)
        await eventually(lambda: player.idle)
        assert await asyncio.to_thread(lives.current.terminate) == 0
    finally:
        await player.stop(kie_runner)
    tally = Tally()
    tally.check_jobs(job_outcomes(faulty_tg.performed), [job_id for job_id, *_ in jobs_in(database)], killed=True)
    tally.report()
    assert [call.params["caption"].split("\n")[1] for call in faulty_tg.performed_of("sendPhoto")] == ["маяк в тумане"]


###############################################################################
# 2. Telegram answering 5xx, timeouts, dropped connections and 429
###############################################################################

async def test_every_reply_is_sent_once_and_in_order_while_telegram_fails_30_percent_of_calls(
        tmp_path, faulty_kie, client):
    plan = FaultPlan(SEED, 0.3, ("500", "502", "429", "stall", "drop"))
    fake_tg = FaultyBotApi(plan, stall_s=1.0)
    database = str(tmp_path / "bot.sqlite3")
    env = bot_env(fake_tg, database, KIE_API_KEY=KIE_KEY, KIE_API_BASE=faulty_kie.base_url, UPDATE_QUEUE_WORKERS="8")
    # A stall is cut by the read timeout, then retried: short here so the test stays short.
    http = httpx.AsyncClient(timeout=httpx.Timeout(connect=2.0, read=0.5, write=2.0, pool=5.0))
    app = trt_bot.App(trt_bot.load_config(env), http=http)
    app.telegram.retry = dataclasses.replace(trt_bot.TELEGRAM_RETRY, base_s=0.02, cap_s=0.25)

    async def succeed(player: KiePlayer, task_id: str, prompt: str) -> None:
        player.finish(task_id, success=True)
        await player.call_back(task_id)

    chats = [Chat(5000 + n) for n in range(24)]
    for chat in chats:
        chat.too_long_prompts(16)
    generators = [Chat(5100 + n) for n in range(4)]
    for chat in generators:
        chat.generate(f"закат {chat.chat_id}")
    everybody = chats + generators
    await app.start()
    target = Target(f"http://127.0.0.1:{app.port}", app.config)
    player = KiePlayer(faulty_kie, client, lambda: target, succeed)
    kie_runner = asyncio.create_task(player.run())
    sending = asyncio.create_task(send_all(client, lambda: target, everybody))
    try:
        await eventually(lambda: len(fake_tg.performed_of("sendMessage")) >= 50, timeout=30)
        fake_tg.outage(4.0)  # and in the middle, a few seconds when every call fails
        await sending
        await all_answered(everybody, lambda: fake_tg.performed, timeout=60)
        # A photo whose answer was lost is not sent again: its user gets the offer to have it re-sent.
        await eventually(lambda: len(jobs_in(database)) == len(generators) and player.idle
                         and all(state == "delivered" for *_, state in jobs_in(database)), timeout=30)
        photos_before_presses = job_outcomes(fake_tg.performed)
        offered = sorted(job_id for job_id, got in photos_before_presses.items() if got["offer"])
        for job_id in offered:
            await press_resend_until_photo(client, target, app, fake_tg, job_id)
    finally:
        sending.cancel()
        await player.stop(kie_runner)
        await app.stop()  # a barrier: nothing is sent after this
        fake_tg.close()
    FAULT_KINDS.update({f"telegram {kind}": count for kind, count in plan.injected.items()},
                       **{"telegram outage 502": fake_tg.outage_calls})
    tally = Tally()
    tally.check_chats(everybody, fake_tg.performed, killed=False)
    job_ids = [job_id for job_id, *_ in jobs_in(database)]
    tally.check_jobs(photos_before_presses, job_ids)  # one photo or the offer, never both
    photos = job_outcomes(fake_tg.performed_of(*PHOTO_METHODS))
    tally.problems += [f"job {job_id}: {photos[job_id]['photo']} photos in the end" for job_id in job_ids
                       if photos[job_id]["photo"] != 1]
    assert sum(plan.injected.values()) > 50  # the faults really happened
    tally.report()


class SteppedClock(trt_bot.Clock):
    """The system's clock with its wall time set forward by ``step`` seconds, as an operator or NTP might."""

    step = 0.0

    def time(self) -> float:
        return time.time() + self.step


async def test_a_wall_clock_step_forward_loses_no_queued_reply_no_pending_button_press_and_no_picture(
        make_app, faulty_tg, faulty_kie, fast_jobs):
    # All were measured on the wall clock: a step of two hours dropped every queued reply as "expired after
    # 3600 s", every button press still waiting as too old for Telegram to answer, and timed out every job.
    clock = SteppedClock()
    app = await make_app(KIE_API_KEY=KIE_KEY, KIE_API_BASE=faulty_kie.base_url, UPDATE_QUEUE_WORKERS="8", clock=clock)
    drawer, chats = 6100, range(6000, 6005)
    for update in (update_callback(next(_update_ids), drawer, "new"),
                   update_message(next(_update_ids), drawer, "маяк"),
                   update_callback(next(_update_ids), drawer, "ratio:1:1")):
        await post_update(app, update)
    (task_id,) = await eventually(lambda: list(faulty_kie.tasks))
    await eventually(lambda: len(faulty_tg.calls_of("answerCallbackQuery")) == 2)  # the drawer's two presses
    faulty_tg.stall("sendMessage")
    faulty_tg.stall("answerCallbackQuery")
    for chat in chats:
        await post_update(app, update_message(next(_update_ids), chat, "/start"))
        for _ in range(2):  # the second waits in the pipeline while the first's answer hangs
            await post_update(app, update_callback(next(_update_ids), chat, "help"))
    await eventually(lambda: faulty_tg.held("answerCallbackQuery") == len(chats))
    clock.step = 2 * 3600.0
    FAULT_KINDS["wall clock set 2 h forward"] += 1
    faulty_tg.release("answerCallbackQuery")
    faulty_tg.release("sendMessage")
    await eventually(lambda: len(faulty_tg.calls_of("answerCallbackQuery")) == 2 + 2 * len(chats), timeout=30)
    await eventually(lambda: app.role.outbox.depth == 0, timeout=30)
    assert not app.role.outbox.dropped and app.pipeline.stats.dropped == 0
    assert all(faulty_tg.texts_to(chat) for chat in chats)
    faulty_kie.complete(task_id)
    await eventually(lambda: [p for p in faulty_tg.calls_of("sendPhoto") if int(p["chat_id"]) == drawer])
    assert [job.state for job in app.generations.jobs.values()] in ([], ["sending"])


RESEND_PRESSES_MAX = 6  # a press whose photo is lost to a fault again is pressed again, up to this many times


async def press_resend_until_photo(client: httpx.AsyncClient, target: Target, app: trt_bot.App,
                                   fake_tg: FaultyBotApi, job_id: str) -> None:
    """The user presses "📥" until the photo comes; a press again only once the last one was handled."""
    chat_id = next(job[1] for job in jobs_in(app.config.database) if job[0] == job_id)
    headers = {"X-Telegram-Bot-Api-Secret-Token": target.config.webhook_secret}

    def photo_came() -> bool:
        return job_outcomes(fake_tg.performed_of(*PHOTO_METHODS))[job_id]["photo"] > 0

    for _ in range(RESEND_PRESSES_MAX):
        press = update_callback(next(_update_ids), chat_id, f"resend:{job_id}")
        while await post_json(client, target.webhook_url, press, headers) != 200:
            await asyncio.sleep(0.05)  # Telegram retries later
        async with asyncio.timeout(40):
            # Every update handled, this press too (a count of handled updates can be reached by the
            # previous press finishing after its photo came, and this one then pressed twice).
            await app.pipeline.idle()
        if photo_came():
            return
    raise AssertionError(f"seed {SEED}: job {job_id}: no photo after {RESEND_PRESSES_MAX} presses of re-send")


###############################################################################
# 3. Kie.ai: flaky createTask / recordInfo; duplicated, late, out-of-order and missing callbacks
###############################################################################

KIE_GENERATING_S = 0.3  # how long the fake Kie takes to draw where a scenario needs the poller to ask first
# scenario -> what the user must get
KIE_SCENARIOS = {"missing": "photo", "duplicated": "photo", "late": "photo", "fail_after_success": "photo",
                 "success_after_fail": "failure", "task_fails": "failure", "refused": "failure"}


async def kie_scenario(player: KiePlayer, task_id: str, prompt: str) -> None:
    """What Kie does with a task, by the scenario named at the start of its prompt (see KIE_SCENARIOS)."""
    scenario = prompt.split("-")[0]
    FAULT_KINDS[f"kie {scenario.replace('_', ' ')}"] += 1
    if scenario == "missing":  # no callback ever comes: the poller finds the result
        await asyncio.sleep(KIE_GENERATING_S)  # while the poller asks (and sometimes fails)
        player.finish(task_id, success=True)
    elif scenario == "duplicated":
        player.finish(task_id, success=True)
        await asyncio.gather(*(player.call_back(task_id) for _ in range(3)))
    elif scenario == "late":  # the poller has delivered when the callback comes
        await asyncio.sleep(KIE_GENERATING_S)
        player.finish(task_id, success=True)
        chat_id = int(prompt.split("-")[1])
        await eventually(lambda: any(int(call.params["chat_id"]) == chat_id
                                     for call in player.telegram.performed_of(*PHOTO_METHODS)), timeout=20)
        await player.call_back(task_id)
    elif scenario == "fail_after_success":  # a stale "fail" follows the success
        player.finish(task_id, success=True)
        await player.call_back(task_id)
        await player.call_back(task_id, callback_body(task_id, "fail"))
    elif scenario == "success_after_fail":  # a stray "success" follows the real failure
        player.finish(task_id, success=False)
        await player.call_back(task_id)
        await player.call_back(task_id, callback_body(task_id, "success", player.result_url(task_id)))
    elif scenario == "task_fails":
        player.finish(task_id, success=False)
        await asyncio.gather(*(player.call_back(task_id) for _ in range(2)))


async def test_each_job_gets_one_photo_or_one_failure_whatever_kie_does(make_app, fake_tg, client, fast_jobs,
                                                                         monkeypatch):
    monkeypatch.setattr(trt_bot, "KIE_CREATE_PACE", (1000, 1.0))  # retries and lost answers need more than 20 per 10 s
    plans = {"createTask": FaultPlan(SEED, 0.3, ("http500", "http502", "code500", "code455", "drop", "lost_answer")),
             "recordInfo": FaultPlan(SEED, 0.3, ("http500", "http502", "code500", "code455", "drop"))}
    kie = FaultyKie(plans)
    users = {6000 + n: scenario for n, scenario in enumerate(list(KIE_SCENARIOS) * 3)}
    chats = []
    for user, scenario in users.items():
        chats.append(Chat(user))
        chats[-1].generate(f"{scenario}-{user}")
        if scenario == "refused":
            kie.refused_prompts.add(chats[-1].prompt)
    app = await make_app(KIE_API_KEY=KIE_KEY, KIE_API_BASE=kie.base_url)
    target = Target(f"http://127.0.0.1:{app.port}", app.config)
    player = KiePlayer(kie, client, lambda: target, kie_scenario, telegram=fake_tg)
    kie_runner = asyncio.create_task(player.run())

    def outcomes_by_chat() -> dict[int, collections.Counter]:
        by_chat: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
        for call in fake_tg.performed_of(*RESULT_METHODS):
            if again_job_id(call.params):
                by_chat[int(call.params["chat_id"])]["photo" if call.method in PHOTO_METHODS else "failure"] += 1
        return by_chat

    try:
        await send_all(client, lambda: target, chats)
        await eventually(lambda: len(outcomes_by_chat()) == len(users) and player.idle, timeout=60)
    finally:
        await player.stop(kie_runner)
        await app.stop()  # a barrier: nothing is sent after this
        kie.close()
    FAULT_KINDS.update({f"kie {endpoint} {kind}": n
                        for endpoint, plan in plans.items() for kind, n in plan.injected.items()})
    tally = Tally(updates=sum(len(chat.updates) for chat in chats), jobs=len(users))
    for user, scenario in users.items():
        got = outcomes_by_chat()[user]
        if sum(got.values()) != 1 or not got[KIE_SCENARIOS[scenario]]:
            tally.problems.append(f"user {user} ({scenario}): got {dict(got)}, expected one {KIE_SCENARIOS[scenario]}")
            tally.lost += not got
            tally.duplicated += max(0, sum(got.values()) - 1)
    assert plans["createTask"].injected and plans["recordInfo"].injected  # the faults really happened
    tally.report()


###############################################################################
# 4. Disk: full, read-only, the file deleted, locked
###############################################################################

@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs of its own, unmounted at the end."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a full or read-only disk needs a tmpfs of its own, and mount failed: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill_up(folder) -> str:
    """Take every free byte of ``folder``'s file system; returns the filler file to delete to free them."""
    path = os.path.join(folder, "filler")
    with open(path, "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    return path


def remount(folder, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", "-o", ",".join(("remount", *options)), str(folder)], capture_output=True, text=True)


def disk_env(fake_tg: FaultyBotApi, database: str) -> dict[str, str]:
    # A small queue and a slow Telegram: updates wait in memory and spill to the inbox when the disk fails.
    fake_tg.delay_s = 0.02
    # Kie is configured (the dialog needs it) but never called.
    return bot_env(fake_tg, database, UPDATE_QUEUE_SIZE="3", LEASE_TTL_S="2", KIE_API_KEY=KIE_KEY,
                   KIE_API_BASE="http://127.0.0.1:9")


FAULT_LASTS_S = 2.0  # how long a fault lasts while Telegram keeps sending


async def phase(client: httpx.AsyncClient, lives: Lives, chats: list[Chat], per_chat: int = 3,
                fault: Callable[[], Any] | None = None, repair: Callable[[], Any] | None = None) -> None:
    """Each chat: "create", then too-long prompts; all acknowledged, then all answered.

    ``fault()`` runs once a third of them are acknowledged, while the earlier
    ones still wait in memory or in the inbox; ``repair()`` FAULT_LASTS_S
    later (or once all are acknowledged), not after every acknowledgement:
    while the database is unusable, a chat with updates stored in the inbox
    gets 503 (a memory-only update would overtake them), and Telegram keeps
    resending it until the database is back.
    """
    for chat in chats:
        chat.too_long_prompts(per_chat)
    start = sum(chat.acked for chat in chats)
    a_third = start + (sum(len(chat.updates) for chat in chats) - start) / 3
    sending = asyncio.create_task(send_all(client, lives.target, chats))
    try:
        if fault is not None:
            await eventually(lambda: sum(chat.acked for chat in chats) >= a_third or sending.done(), timeout=30)
            fault()
        if repair is not None:
            await asyncio.wait([sending], timeout=FAULT_LASTS_S)
            repair()
        await asyncio.wait_for(sending, 30)
    finally:
        sending.cancel()
    await all_answered(chats, lambda: lives.fake_tg.performed, timeout=30)


async def health_is(client: httpx.AsyncClient, lives: Lives, status: str, timeout: float) -> None:
    async def reached() -> bool:
        return (await lives.health(client)).get("status") == status

    await until(reached, timeout, f"/health did not say {status!r}")


async def durable_again(client: httpx.AsyncClient, lives: Lives, chats: list[Chat]) -> None:
    """Updates acknowledged now and unanswered at a kill -9 are answered by the next process, in order."""
    await health_is(client, lives, "ok", timeout=15)
    lives.fake_tg.withhold("sendMessage")
    for chat in chats:
        chat.too_long_prompts(2)
    await asyncio.wait_for(send_all(client, lives.target, chats), 30)
    lives.current.kill()
    lives.fake_tg.give_back("sendMessage")
    FAULT_KINDS["kill -9"] += 1
    await lives.start().wait_healthy()
    await all_answered(chats, lambda: lives.fake_tg.performed, timeout=30)
    assert await asyncio.to_thread(lives.current.terminate) == 0  # a barrier: nothing is sent after this


def tally_disk_test(chats: list[Chat], fake_tg: FaultyBotApi) -> None:
    tally = Tally()
    tally.check_chats(chats, fake_tg.performed, killed=True)
    tally.report()


async def test_a_full_disk_degrades_then_the_bot_is_durable_again_in_order(small_disk, fault_bots, faulty_tg, client):
    lives = Lives(fault_bots, faulty_tg, disk_env(faulty_tg, str(small_disk / "bot.sqlite3")))
    chats = [Chat(7000 + n) for n in range(4)]
    await lives.start().wait_healthy()
    fillers: list[str] = []
    await phase(client, lives, chats, per_chat=12, fault=lambda: fillers.append(fill_up(small_disk)),
                repair=lambda: os.remove(fillers[0]))
    FAULT_KINDS["disk full"] += 1
    assert "[DB] unusable" in lives.current.log  # the full disk was noticed
    await durable_again(client, lives, chats)
    tally_disk_test(chats, faulty_tg)


async def test_a_read_only_disk_degrades_then_the_bot_is_durable_again_in_order(small_disk, fault_bots, faulty_tg,
                                                                                client):
    lives = Lives(fault_bots, faulty_tg, disk_env(faulty_tg, str(small_disk / "bot.sqlite3")))
    chats = [Chat(7100 + n) for n in range(4)]
    await lives.start().wait_healthy()
    await phase(client, lives, chats)
    assert await asyncio.to_thread(lives.current.terminate) == 0
    # Linux remounts a file system read-only only while no file on it is open for writing (else EBUSY),
    # so the disk turns read-only between two processes, and writable again under the second one.
    made_read_only = remount(small_disk, "ro")
    assert made_read_only.returncode == 0, made_read_only.stderr
    FAULT_KINDS["disk read-only"] += 1
    await lives.start().wait_healthy()
    await health_is(client, lives, "degraded", timeout=5)
    await phase(client, lives, chats, per_chat=6, fault=lambda: remount(small_disk, "rw").check_returncode())
    await durable_again(client, lives, chats)
    tally_disk_test(chats, faulty_tg)


async def test_a_deleted_database_file_is_noticed_and_the_bot_is_durable_again_in_order(tmp_path, fault_bots,
                                                                                        faulty_tg, client):
    database = tmp_path / "data" / "bot.sqlite3"
    lives = Lives(fault_bots, faulty_tg, disk_env(faulty_tg, str(database)))
    chats = [Chat(7200 + n) for n in range(4)]
    await lives.start().wait_healthy()

    def delete_the_database() -> None:
        for suffix in ("", "-wal", "-shm"):
            os.remove(f"{database}{suffix}")

    await phase(client, lives, chats, per_chat=6, fault=delete_the_database)
    FAULT_KINDS["database file deleted"] += 1

    async def a_database_is_on_disk_again() -> bool:
        return database.exists() and (await lives.health(client)).get("status") == "ok"

    await until(a_database_is_on_disk_again, 15, "the bot did not write to a database file on disk again")
    await phase(client, lives, chats)
    await durable_again(client, lives, chats)
    tally_disk_test(chats, faulty_tg)


async def test_a_locked_database_degrades_then_the_bot_is_durable_again_in_order(tmp_path, fault_bots, faulty_tg,
                                                                                 client):
    database = str(tmp_path / "bot.sqlite3")
    lives = Lives(fault_bots, faulty_tg, disk_env(faulty_tg, database))
    chats = [Chat(7300 + n) for n in range(4)]
    await lives.start().wait_healthy()
    locker = sqlite3.connect(database, isolation_level=None, timeout=10)
    try:
        for _ in range(2):
            # another process takes the write lock, then lets it go, each while updates are coming in
            await phase(client, lives, chats, per_chat=9, fault=lambda: locker.execute("BEGIN EXCLUSIVE"),
                        repair=lambda: locker.execute("ROLLBACK"))
            FAULT_KINDS["database locked"] += 1
            assert "[DB] unusable" in lives.current.log  # the lock was noticed
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()
    await durable_again(client, lives, chats)
    tally_disk_test(chats, faulty_tg)


###############################################################################
# 5. PostgreSQL: down at start, restarted, its connections cut
###############################################################################

@pytest.fixture
def postgres_of_its_own():
    """A PostgreSQL cluster for one test, initialised but not started: the test starts and stops it."""
    server = new_postgres(start=False)
    yield server
    server.remove()


async def test_postgresql_down_at_start_restarted_and_cut_off_degrades_then_the_bot_is_durable_again_in_order(
        postgres_of_its_own, tmp_path, fault_bots, faulty_tg, client):
    server = postgres_of_its_own
    env = disk_env(faulty_tg, str(tmp_path / "unused.sqlite3"))
    lives = Lives(fault_bots, faulty_tg, {**env, "DATABASE_URL": server.url("postgres")})
    chats = [Chat(7400 + n) for n in range(4)]
    await lives.start().wait_healthy()  # the server is not running yet: the bot starts anyway
    await health_is(client, lives, "degraded", timeout=10)
    health = await lives.health(client)
    assert "refused" in health["database_error"] and POSTGRES_PASSWORD not in health["database_error"]
    await phase(client, lives, chats, per_chat=3)  # answered from memory meanwhile
    await asyncio.to_thread(server.start)
    await health_is(client, lives, "ok", timeout=15)  # durable once it answers, without a restart
    FAULT_KINDS["postgresql down at start"] += 1
    # a restart of the server (fast shutdown: every connection closed), then every connection cut
    await phase(client, lives, chats, per_chat=9, fault=server.stop, repair=server.start)
    FAULT_KINDS["postgresql restarted"] += 1
    await health_is(client, lives, "ok", timeout=15)
    await phase(client, lives, chats, per_chat=6, fault=lambda: server.terminate_connections(server.url("postgres")))
    FAULT_KINDS["postgresql connections terminated"] += 1
    # Each outage was noticed and ended by itself (the last one's recovery may still be on its way).
    await eventually(lambda: lives.current.log.count("INFO trt_bot: [DB] recovered") >= 3, timeout=15)
    await durable_again(client, lives, chats)
    tally_disk_test(chats, faulty_tg)


###############################################################################
# 6. Rows the database refuses (text it cannot store, a value out of range)
###############################################################################

REFUSED_MARK = "refuse-me"
REFUSED_ROWS = (("jobs", "prompt"), ("outbox", "params"))  # the prompt is in each: a job's, the ratio question's


async def test_rows_the_database_refuses_fail_alone_and_nothing_else_is_lost(make_app, faulty_tg, fake_kie, client,
                                                                            fast_jobs, database_url):
    # Some users' prompts carry what the database refuses, in the ratio question's outbox row and in their job's
    # row: those jobs end with one failure, and everything else goes through untouched.
    app = await make_app(KIE_API_KEY=KIE_KEY, KIE_API_BASE=fake_kie.base_url, DATABASE_URL=database_url)
    faulty_tg.delay_s = 0.2  # replies are still unsent when their update's done mark is written (a reply sent is not)
    for table, column in REFUSED_ROWS:
        refuse_rows(database_url, table, column, REFUSED_MARK)
    chats = [Chat(7000 + n) for n in range(16)]
    refused = {chat.chat_id for chat in chats[::4]}
    for chat in chats:
        chat.generate(f"{REFUSED_MARK}-{chat.chat_id}" if chat.chat_id in refused else f"маяк-{chat.chat_id}")
        chat.say("/help", "help")
        chat.say("/start", "start")  # (a description now, while the picture is drawn, is told to wait)
    target = Target(f"http://127.0.0.1:{app.port}", app.config)
    first_record = len(ALL_RECORDS.records)
    await send_all(client, lambda: target, chats)
    await eventually(lambda: len(fake_kie.created) == len(chats) - len(refused), timeout=30)
    for task_id in list(fake_kie.tasks):
        fake_kie.complete(task_id)
    await all_answered(chats, lambda: faulty_tg.performed, timeout=30)
    await eventually(lambda: not app.generations.jobs, timeout=30)
    await app.stop()  # a barrier: nothing is sent after this
    refusals = [record.getMessage().split()[1] for record in ALL_RECORDS.records[first_record:]
                if "refused a row" in record.getMessage()]  # "[DB] <the write> refused a row ..."
    assert len(set(refusals)) == len(REFUSED_ROWS)  # each table refused rows
    FAULT_KINDS["database refused a row"] += len(refusals)
    tally = Tally()
    tally.check_chats(chats, faulty_tg.performed, killed=False)
    outcomes = job_outcomes(faulty_tg.performed)
    tally.check_jobs(outcomes, list(outcomes))
    by_chat = collections.Counter((int(call.params["chat_id"]), "failure" if call.method not in PHOTO_METHODS
                                   else "photo") for call in faulty_tg.performed
                                  if call.method in RESULT_METHODS and again_job_id(call.params))
    for chat in chats:
        expected = "failure" if chat.chat_id in refused else "photo"
        if by_chat[chat.chat_id, expected] != 1:
            tally.problems.append(f"chat {chat.chat_id}: {by_chat[chat.chat_id, expected]} times {expected}, not once")
            tally.lost += 1
    assert not any(REFUSED_MARK in task["input"]["prompt"] for task in fake_kie.created)
    tally.report()


###############################################################################
# 7. The active instance paused (SIGSTOP) while a second takes over, then woken
###############################################################################

# A sent reply's row goes in the next group commit: with PostgreSQL on a loaded machine, up to this long after.
ROW_DELETE_LAG_S = 0.25


async def test_an_active_bot_paused_past_its_lease_sends_nothing_once_woken_and_nothing_is_lost(
        postgres, tmp_path, fault_bots, faulty_tg, client):
    """Telegram has no idempotency key: a send in flight at the pause may land and be sent again by the
    successor, but the woken bot must start no send, and every update must be answered.  In flight, as the
    outbox's essay says: sent, and its update's done mark or its row's delete not yet committed.  So a reply
    sent again is one whose update the successor handled again (its done mark after the cut), or one sent
    just before the cut (its row's delete in flight)."""
    faulty_tg.delay_s = 0.02  # answers take a while: sends are in flight when the pause comes
    # A TTL long enough that a successor starved of CPU (a loaded machine) does not lapse its own lease's trust.
    env = bot_env(faulty_tg, str(tmp_path / "unused.sqlite3"), DATABASE_URL=postgres.new_database_url(),
                  LEASE_TTL_S="4", KIE_API_KEY=KIE_KEY, KIE_API_BASE="http://127.0.0.1:9")
    lives = Lives(fault_bots, faulty_tg, env)
    paused = lives.start()
    await paused.wait_healthy()
    successor = lives.start()
    await successor.wait_healthy()
    lives.current = paused  # Telegram reaches the active one first
    chats = [Chat(7500 + n) for n in range(6)]
    for chat in chats:
        chat.too_long_prompts(8)
    async with httpx.AsyncClient(timeout=2.0) as quick:  # a post to the paused bot is given up and sent again
        sending = asyncio.create_task(send_all(quick, lives.target, chats))
        await eventually(lambda: len(faulty_tg.performed_of("sendMessage")) >= 12, timeout=30)
        os.kill(paused.process.pid, signal.SIGSTOP)
        cut, cut_wall = time.monotonic(), time.time()
        lives.current = successor
        FAULT_KINDS["process paused past its lease"] += 1
        try:
            await asyncio.wait_for(sending, 60)
            await all_answered(chats, lambda: faulty_tg.performed, timeout=30)
        finally:
            os.kill(paused.process.pid, signal.SIGCONT)
    woken = time.monotonic()
    await eventually(lambda: "[LOCK] passive" in paused.log, timeout=15)  # woken, it found the lease taken
    for bot in (paused, successor):
        assert await asyncio.to_thread(bot.terminate) == 0  # a barrier: nothing is sent after this
    in_flight = [call for call in faulty_tg.performed if call.life == 1 and cut - 0.01 <= call.at <= woken]
    after_waking = [call for call in faulty_tg.performed if call.life == 1 and call.at > woken]
    tally = Tally()
    tally.check_chats(chats, faulty_tg.performed, killed=True)  # sent again by the successor: "replayed"
    FAULT_TOTALS.update(cut_in_flight=len(in_flight), cut_duplicates=tally.replayed)
    tally.problems += [f"the woken bot started {call.method} to {call.params.get('chat_id')}" for call in after_waking]
    import psycopg  # (the postgres fixture has it)
    again = [replay for chat in chats for replay in sent_again(chat, faulty_tg.performed)]
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        done_at = dict(conn.execute("SELECT update_id, done_at FROM inbox WHERE update_id = ANY(%s)",
                                    ([update_id for update_id, _ in again],)).fetchall())
    tally.problems += [f"update {update_id}'s reply, sent {cut - call.at:.3f} s before the cut and marked done "
                       "before it, was sent again" for update_id, call in again
                       if done_at[update_id] < cut_wall and call.at < cut - ROW_DELETE_LAG_S]
    tally.replayed = 0  # counted above as sent twice after a cut-off, not as replays after kill -9
    tally.report()
