"""Pacing a user's own OpenAI key to the key's own limit, as pure rules. No I/O here; the DynamoDB adapter
(``adapters/dynamo_key_pacer.py``) keeps one small item per key, named by the key's fingerprint (never the
key), and applies these rules with one conditional write per decision.

**What is learned.** OpenAI answers every image request, 200 or 429, with ``x-ratelimit-limit-requests``
(the key's request limit per minute), and a 429 with the time the next request will be admitted
(``retry-after-ms`` / ``retry-after``). The limit is adopted from the latest answer that carried it; a 429
blocks the key's sends until the time it names (every run of the key waits for it, instead of each run
retrying into further 429s), and the refused send stops counting (OpenAI did not count it either). A 429
without a limit header lowers the limit to the sends that did get through in the window. A 200 dates its
send by when it reached OpenAI at the latest (the answer's arrival less ``openai-processing-ms``), since
OpenAI's window runs from there and not from the claim. Until a first
answer has taught the limit, one send per window probes it, and the other runs look again every
``probe_look_ms`` (the answer lands within seconds; a run that slept a whole short wait would leave the
learned slots idle).

**Strict at the door** (the shared key's rule in ``domain/rate_limit.py``, without its queue): a run may
send only by claiming its send right before the request leaves; the claim is granted at ``now`` only if
fewer than ``limit`` recorded sends lie in ``(now - window - margin, now]`` and ``now`` is past any block a
429 set, and it is recorded in the same conditional write. Runs of one key are not ordered among
themselves (they are one user's work): whichever is there when a slot frees takes it, so no slot waits for
a run that is late.

**The window** is OpenAI's: limits are stated per minute. A deployment may state another (the local
stack's emulator scales a minute down to seconds). **The margin** covers the clock offsets between
execution environments plus the time from the claim to the request's arrival; each slot is reused one
``window + margin`` after its send, so a backlog reaches ``window / (window + margin)`` of the cap. A 429
that a granted claim met says the margin was too short for this key's path (a loaded sender, a slow
network): its retry time is how early the send arrived, and that much more (plus ``learned_margin_step_ms``)
is added to the key's margin, at most ``max_learned_margin_ms``, so a key is refused a few times at most.

**Bounded state**: the last ``limit`` sends (at most ``max_tracked_sends``), each a time and a short tag of
its ticket, and one block time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field


class KeyPaceSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    window_s: float = Field(default=60.0, gt=0, description="the window OpenAI's request limit is per")
    margin_ms: int = Field(default=1000, ge=0, description="clock offsets plus claim-to-arrival time")
    # A run woken from a Wait state must be back in the step before its slot frees (whichever run is there
    # takes it): Wait states wake up to 1.5 s late, and Generate's work before the claim takes a while more.
    short_wait_ms: int = Field(default=6000, ge=0, description="the longest a step waits in place")
    wake_lead_ms: int = Field(default=4000, ge=0, description="a waiting run wakes this long before its turn")
    max_tracked_sends: int = Field(
        default=200, ge=1, description="the most sends kept per key (Generate's concurrency is far below)"
    )
    probe_look_ms: int = Field(default=500, ge=1, description="how often runs look for the probe's answer")
    learned_margin_step_ms: int = Field(default=100, ge=0, description="added to the margin past a 429's")
    max_learned_margin_ms: int = Field(default=2000, ge=0, description="the most margin 429s may add")

    @property
    def spacing_ms(self) -> int:
        """A send's slot frees this long after it (as recorded), on a key that was never refused."""
        return max(1, round(self.window_s * 1000)) + self.margin_ms

    def spacing_for(self, state: KeyPace) -> int:
        """A send's slot frees this long after it on this key: the margin plus what its 429s taught."""
        return self.spacing_ms + min(state.extra_margin_ms, self.max_learned_margin_ms)


#: sends allowed per window while a key's limit is unknown: the first answer teaches it
PROBE_LIMIT = 1


def ticket_tag(ticket: str) -> str:
    """What the state keeps of a send's ticket: enough to recognise it, short enough to keep many."""
    return hashlib.sha256(ticket.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class KeyPace:
    """An own key's pacing state (a docstring spares the dataclass computing its signature as one)."""

    limit: int | None = None  # requests per window, as OpenAI last said; None: not learned yet
    sends: tuple[tuple[int, str], ...] = ()  # (claimed at ms, ticket tag), oldest first
    blocked_until_ms: int = 0  # no send before this (a 429's retry time)
    extra_margin_ms: int = 0  # margin learned from 429s that granted claims met


@dataclass(frozen=True)
class PaceAnswer:
    """The pacer's answer to a claim, with the state to write."""

    granted: bool
    start_at_ms: int  # now when granted; otherwise when a send may be possible again
    state: KeyPace
    changed: bool


@dataclass(frozen=True)
class Observation:
    """What one OpenAI answer said about the key's limits."""

    refused: bool  # 429 rate_limit_exceeded
    limit_requests: int | None = None
    remaining_requests: int | None = None
    retry_after_ms: int | None = None
    arrived_by_ms: int | None = None  # the latest the send can have reached OpenAI (a 200's timing)


def effective_limit(state: KeyPace, settings: KeyPaceSettings) -> int:
    if state.limit is None:
        return PROBE_LIMIT
    return max(1, min(state.limit, settings.max_tracked_sends))


def _in_window(state: KeyPace, now_ms: int, settings: KeyPaceSettings) -> list[int]:
    return sorted(at for at, _ in state.sends if at > now_ms - settings.spacing_for(state))


def claim(state: KeyPace, ticket: str, now_ms: int, settings: KeyPaceSettings) -> PaceAnswer:
    """Grant the send of ``ticket`` at ``now_ms`` (and record it), or say when a slot frees."""
    tag = ticket_tag(ticket)
    if any(t == tag for _, t in state.sends):
        return PaceAnswer(True, now_ms, state, changed=False)  # this very send was granted already
    if now_ms < state.blocked_until_ms:
        return PaceAnswer(False, state.blocked_until_ms, state, changed=False)
    limit = effective_limit(state, settings)
    busy = _in_window(state, now_ms, settings)
    if len(busy) < limit:
        kept = max(limit, PROBE_LIMIT)
        sends = tuple(s for s in state.sends if s[0] > now_ms - settings.spacing_for(state))
        granted = replace(state, sends=(*sends, (now_ms, tag))[-kept:])
        return PaceAnswer(True, now_ms, granted, changed=True)
    # the slot that frees first: the oldest of the ``limit`` newest sends, one spacing later
    frees_at = busy[-limit] + settings.spacing_for(state)
    if state.limit is None:  # the probe's answer will teach the limit long before its slot frees: look again
        frees_at = min(frees_at, now_ms + min(settings.probe_look_ms, max(1, settings.short_wait_ms)))
    return PaceAnswer(False, max(frees_at, now_ms + 1), state, changed=False)


def learn(
    state: KeyPace, ticket: str, observation: Observation, now_ms: int, settings: KeyPaceSettings
) -> KeyPace:
    """The state after OpenAI answered the send of ``ticket`` (see the module doc)."""
    limit = state.limit
    if observation.limit_requests is not None and observation.limit_requests > 0:
        limit = min(observation.limit_requests, settings.max_tracked_sends)
    if not observation.refused:
        return replace(state, limit=limit, sends=_arrived(state.sends, ticket, observation.arrived_by_ms))
    tag = ticket_tag(ticket)
    others = tuple(s for s in state.sends if s[1] != tag)  # the refused send did not count
    if observation.limit_requests is None:
        # no word on the limit: the key holds no more than what got through in the window
        limit = max(1, len([at for at, _ in others if at > now_ms - settings.spacing_for(state)]))
    retry_after_ms = observation.retry_after_ms if observation.retry_after_ms is not None else 0
    blocked = max(state.blocked_until_ms, now_ms + retry_after_ms)
    extra = state.extra_margin_ms
    if state.limit is not None and state.limit == limit:
        # the claim was granted on the limit OpenAI states, yet refused: the send arrived early by about the
        # retry time (OpenAI's window counts from arrival), so this key's slots free that much later
        extra = min(settings.max_learned_margin_ms, extra + retry_after_ms + settings.learned_margin_step_ms)
    return KeyPace(limit=limit, sends=others, blocked_until_ms=blocked, extra_margin_ms=extra)


def _arrived(
    sends: tuple[tuple[int, str], ...], ticket: str, arrived_by_ms: int | None
) -> tuple[tuple[int, str], ...]:
    """The sends with this one dated when it reached OpenAI at the latest, rather than when it was claimed:
    OpenAI's window runs from the arrival, which on a loaded sender comes a second or more after the
    claim, so a slot dated by its claim alone frees too early (and the send in it is refused)."""
    tag = ticket_tag(ticket)
    if arrived_by_ms is None:
        return sends
    moved = [(max(at, arrived_by_ms), t) if t == tag else (at, t) for at, t in sends]
    return tuple(sorted(moved))


def wake_at_ms(start_at_ms: int, settings: KeyPaceSettings) -> int:
    """When a Wait state should end: ``wake_lead_ms`` early, since Wait states wake late, never early."""
    return start_at_ms - settings.wake_lead_ms


def key_fingerprint(api_key: str) -> str:
    """The key's name in the pacing table and in logs: one-way, stable, never the key."""
    return hashlib.sha256(b"dalle-plugin/openai-key\x00" + api_key.encode()).hexdigest()[:32]
