"""A backlog on the shared key through the whole local stack at a scaled window (5 per 4 s): the OpenAI
emulator's arrival stamps never hold more than the limit in any window, and every run gets through.

The stack runs in its own process (a local stack owns its process), once on each local AWS profile: on
``hostile`` Waits wake seconds late, clocks disagree by up to 500 ms and every invoke is a cold start.
Only the emulator's arrival stamps are asserted on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.limiter import max_starts_in_any_window
from local_stack.template import PROJECT_ROOT

pytestmark = [pytest.mark.stack, pytest.mark.slow]

LIMIT, WINDOW_S, RUNS = 5, 4.0, 12


@pytest.mark.parametrize("profile", ["aws", pytest.param("hostile", marks=pytest.mark.hostile)])
@pytest.mark.timeout(1200)
def test_a_backlog_never_puts_more_than_the_limit_at_openais_door(profile):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.limiter_stack",
            "--runs",
            str(RUNS),
            "--limit",
            str(LIMIT),
            "--window",
            str(WINDOW_S),
        ],
        capture_output=True,
        text=True,
        timeout=1100,
        cwd=PROJECT_ROOT,
        env=os.environ | {"LOCAL_AWS_PROFILE": profile},
        check=False,  # the return code is asserted below, with the output
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    print(completed.stderr[-3000:])  # the POSTs the hub stand-in sent again, if any (seen with -s)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    arrivals = result["arrivals_epoch_s"]
    assert result["succeeded"] == RUNS and len(arrivals) == RUNS
    assert max_starts_in_any_window(arrivals, WINDOW_S) <= LIMIT  # however loaded the machine is
    ordered = sorted(arrivals)
    assert all(ordered[i] - ordered[i - LIMIT] >= WINDOW_S for i in range(LIMIT, RUNS))


def test_the_window_check_can_fail():
    burst = [0.0, 0.1, 0.2, 0.3, 0.4, 1.9, 2.0, 2.05]
    assert max_starts_in_any_window(burst, 2.0) == 7  # [0.1, 2.1) holds seven
    assert max_starts_in_any_window([0.0, 2.0, 4.0], 2.0) == 1
