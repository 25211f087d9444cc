"""Smoke test: ``python bench/run.py --quick`` runs every figure end to end and writes its table.

Skips (with the reason) when wrk or the peer frameworks are not installed:
``apt-get install -y wrk`` and ``pip install -r bench/requirements.txt``.
Run it with ``python -m pytest bench/test_bench_smoke.py`` (about two minutes).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent
NEEDED = {"aiogram": "aiogram", "telegram": "python-telegram-bot", "tornado": "python-telegram-bot[webhooks]",
          "aiolimiter": "python-telegram-bot[rate-limiter]", "uvloop": "uvloop"}


def missing_tools() -> list[str]:
    missing = [] if shutil.which("wrk") else ["wrk (apt-get install -y wrk)"]
    missing += [f"{package} (pip install -r bench/requirements.txt)"
                for module, package in NEEDED.items() if importlib.util.find_spec(module) is None]
    return missing


def test_quick_run_prints_every_figure(tmp_path: Path) -> None:
    missing = missing_tools()
    if missing:
        pytest.skip("benchmark tools not installed: " + "; ".join(missing))
    if len(os.sched_getaffinity(0)) < 1:
        pytest.skip("no CPU to run on")
    out = tmp_path / "latest.md"
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout  # printed and written alike
    for heading in ("The harness is not the bottleneck", "## 1. End to end", "## 2. Ingest ceiling",
                    "## 3. /start reply latency", "## 4. Footprint", "## 5. Durability cost", "## 6. Flood",
                    "## 7. Overload", "## Targets"):
        assert heading in text, heading
    targets = text.split("## Targets", 1)[1]
    verdicts = re.findall(r"\*\*(PASS|MISS|SKIP)\*\*", targets)
    assert len(verdicts) >= 6, targets
    # Every bot answered something and every figure has numbers, not "n/a", where measured.
    end_to_end = text.split("## 1. End to end", 1)[1].split("## 2.", 1)[0]
    for name in ("trt_bot", "aiogram 3", "PTB 22"):
        row = next(line for line in end_to_end.splitlines() if line.startswith(f"| {name} |"))
        assert re.search(r"\| [1-9][\d,]* ", row), row
    assert "every acknowledged update was on disk" in text
    # The flood figure: every bot answered something in every burst, and the fake's limits bit somewhere
    # (in the quick bursts the peers without a rate limiter get 429s).
    flood = text.split("## 6. Flood", 1)[1].split("## 7.", 1)[0]
    for name in ("trt_bot", "aiogram 3", "PTB 22", "PTB 22 + AIORateLimiter"):
        rows = [line for line in flood.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == 3, (name, flood)
        assert all(re.match(rf"\| {re.escape(name)} \| [1-9][\d,]*/[1-9]", row) for row in rows), rows
    assert re.search(r"\| aiogram 3 \| [\d,]+/[\d,]+ \| [1-9]", flood), flood
    # The overload figure: both bots acknowledged and answered everything they acknowledged.
    overload = text.split("## 7. Overload", 1)[1].split("## Targets", 1)[0]
    for name in ("trt_bot", "aiogram 3"):
        row = next(line for line in overload.splitlines() if line.startswith(f"| {name} |"))
        assert "| all " in row, row
