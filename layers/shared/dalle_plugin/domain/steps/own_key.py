"""Generate's own-key branch: pace the run's own OpenAI key to the key's own limit (``domain.key_pacing``).

The key is named by its fingerprint only. A claim is the last thing before the request leaves; what OpenAI
answers (its rate-limit headers, a 429's retry time) is handed back to the key's pacer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from dataclasses import dataclass

from dalle_plugin.domain.errors import PluginError
from dalle_plugin.domain.key_pacing import Observation, key_fingerprint, wake_at_ms
from dalle_plugin.domain.run import RunRecord
from dalle_plugin.domain.steps.machinery import StepDeps, required


@dataclass(frozen=True)
class KeyWait:
    """The run waits for a slot of its key: until ``wake_at_ms`` in a Wait state, then claims again."""

    wake_at_ms: int
    message: str


def send_ticket(run: RunRecord) -> str:
    return f"{run.execution_name}#{run.attempt}"


def claim_own_key_send(run: RunRecord, deps: StepDeps, api_key: str) -> KeyWait | None:
    """Claim this send on the run's own key, or say how long to wait (None: send now, or pacing is off).
    The attempt is already spent: a run that waits spends a new one when it comes back."""
    if deps.key_pacer is None:
        return None
    decision = deps.key_pacer.claim(key_fingerprint(api_key), send_ticket(run))
    if decision.granted:
        return None
    now = deps.clock.now_ms()
    eta = dt.datetime.fromtimestamp(decision.start_at_ms / 1000, tz=dt.UTC).strftime("%H:%M:%S")
    message = (
        "Waiting for a free request on this OpenAI key (paced to the key's own rate limit): starts at "
        f"{eta} UTC, in about {max(0, math.ceil((decision.start_at_ms - now) / 1000))} s."
    )
    return KeyWait(
        max(now, wake_at_ms(decision.start_at_ms, required(deps.key_pace_settings, "key pace settings"))),
        message,
    )


def learn_key_limits(run: RunRecord, deps: StepDeps, api_key: str, observation: Observation) -> None:
    """Tell the own key's pacer what OpenAI answered. Best effort: the answer is already in hand, and the
    next answer teaches the same."""
    if deps.key_pacer is None or run.uses_default_key:
        return
    with contextlib.suppress(PluginError):
        deps.key_pacer.learn(key_fingerprint(api_key), send_ticket(run), observation)
