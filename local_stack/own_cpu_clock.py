"""Time as an execution environment would see it on a machine of its own.

On Lambda each execution environment has its share of a CPU to itself. Here every environment, DynamoDB Local,
moto, the emulators and the tests share two cores with other work, and a loaded machine leaves a runnable
environment waiting for a CPU for seconds at a time (a dozen cold starts at once each get a sixth of a core).
Timing a function's ``Timeout`` on the wall clock would then fail, for this machine's load, runs that Lambda
would finish in a fraction of their time. The local runtime and API Gateway stand-in time them on this clock
instead: wall time less the time the environment's threads spent runnable but not running, which Linux counts
per thread (``/proc/<pid>/task/<tid>/schedstat``, its second field). A handler blocked on a server that hangs
is not runnable, so it still times out on the second; where ``/proc`` is missing this is the wall clock.
"""

from __future__ import annotations

import os
import time


def waited_for_cpu_s(pid: int | str = "self") -> float:
    """Seconds the process's live threads spent runnable but waiting for a CPU (0 where not known)."""
    total_ns = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total_ns += int(stat.read().split()[1])
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
    return total_ns / 1e9


class OwnCpuClock:
    """Seconds since it was made, less the waits for a CPU of the process it follows meanwhile; never runs
    backward (a thread that ends takes its count with it, which only brings the clock closer to the wall's)."""

    def __init__(self, pid: int | str | None = "self"):
        self._start = time.monotonic()
        self._pid: int | str | None = None
        self._waited_at_follow = 0.0
        self._last = 0.0
        if pid is not None:
            self.follow(pid)

    def follow(self, pid: int | str) -> None:
        """From now on, leave out ``pid``'s waits for a CPU (the process doing the timed work, once known)."""
        self._waited_at_follow = waited_for_cpu_s(pid)
        self._pid = pid

    def elapsed_s(self) -> float:
        pid = self._pid
        waited = max(0.0, waited_for_cpu_s(pid) - self._waited_at_follow) if pid is not None else 0.0
        self._last = max(self._last, time.monotonic() - self._start - waited)
        return self._last
