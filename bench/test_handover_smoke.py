"""Smoke test: ``python bench/handover.py --rounds 1 --ttl 2`` measures every case and prints its table.

Run it with ``python -m pytest bench/test_handover_smoke.py`` (about half a minute).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def test_one_round_prints_a_time_for_every_case() -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "handover.py"), "--rounds", "1", "--ttl", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    times = dict(re.findall(r"^(sigterm|kill -9, \w+ namespace) +(\d+) +\d+$", proc.stdout, re.MULTILINE))
    assert {"sigterm", "kill -9, same namespace"} <= set(times), proc.stdout
    assert len(times) == 3 or "kill -9, other namespace: not measured" in proc.stdout, proc.stdout
