"""A backlog on the shared key through the real state machine on the local stack, at a scaled window
(5 per 2 s): every image request start the OpenAI emulator recorded respects the window, in FIFO order.

It runs in its own process (a local stack owns its process), through the same entry point as the
benchmark, so the figure the benchmark reports is the one this test checks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.limiter import max_starts_in_any_window
from local_stack.template import PROJECT_ROOT

pytestmark = [pytest.mark.stack, pytest.mark.slow]


def test_a_backlog_never_puts_more_than_the_limit_in_any_window():
    completed = subprocess.run(
        [sys.executable, "-m", "bench.limiter", "--one", "reservation", "--json",
         "--runs", "12", "--limit", "5", "--window", "2", "--margin-ms", "1000"],
        capture_output=True, text=True, timeout=240, cwd=PROJECT_ROOT,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    starts = result["starts_epoch_s"]
    assert result["succeeded"] == 12 and len(starts) == 12
    assert max_starts_in_any_window(starts, 2.0) <= 5  # never more, however loaded the machine is
    # every start waits for the one five places before it to age out of the window
    ordered = sorted(starts)
    assert all(ordered[i] - ordered[i - 5] >= 2.0 for i in range(5, 12))
    # and the slots are used: twelve starts need three bookings per slot (spacing 3 s), one spare for load
    assert ordered[-1] - ordered[0] < 4 * 3.0 + 1.0


def test_the_window_check_can_fail():
    burst = [0.0, 0.1, 0.2, 0.3, 0.4, 1.9, 2.0, 2.05]
    assert max_starts_in_any_window(burst, 2.0) == 7  # [0.1, 2.1) holds seven
    assert max_starts_in_any_window([0.0, 2.0, 4.0], 2.0) == 1
