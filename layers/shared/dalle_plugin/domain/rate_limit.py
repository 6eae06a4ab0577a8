"""The global image-request limit as pure rules: at most ``limit`` request starts in ANY ``window``
(a strict sliding window), for every run on the default OpenAI key. No I/O here; the DynamoDB adapter
(``adapters/dynamo_rate_limiter.py``) stores the state in one item and applies these rules with one
conditional write.

Why reservations rather than grant/deny. A grant/deny limiter answers "not yet, ask again at T"; every
waiter then wakes at T and races the others (a thundering herd, no FIFO, extra calls), and each freed slot
stays idle for the waiter's wake-up latency plus the Wait state's rounding. Here each caller takes a
ticket and is told the exact time its start is booked:

    start(n) = now                                          if that keeps the rules, else
    start(n) = ceil_g(max(start(n - limit) + window + margin, start(n - 1)))

So ticket n goes no earlier than one window (plus margin) after ticket n - limit: any limit + 1 starts
span at least a window. ``start(n - 1)`` keeps the order FIFO even when callers' clocks disagree. A
caller waits (in a Step Functions Wait state) until its start and goes without asking again: FIFO order,
an exact ETA and queue position for the session, one wake-up per waiter, and the next start is booked
at the very moment a slot frees, so no slot idles while runs wait.

``margin`` (``skew_margin_ms``) is added to every start that waits for a slot. It must cover how late a
woken caller really starts plus any disagreement between callers' clocks: a caller may start anywhere in
``[start_at, start_at + margin / 2]`` (``may_start``; the other half covers the way from that check to
the request's arrival, which takes the clocks to agree within a few ms, as
NTP-synced Lambda clocks do) and actual starts stay a window apart, because its successor in the slot was
booked ``window + margin`` after ``start_at``. A caller that wakes later takes a new ticket (its unused
booking only makes the limiter stricter). ``g`` (``wait_granularity_ms``) rounds waiting starts up, so a
Wait state that truncates timestamps to whole seconds wakes exactly at the start, never before it.

The state is the ticket count and the starts of the last ``limit`` tickets (older ones no longer bind).
Tickets are idempotent while they are among those: asking again with the same ticket returns its booking.

A cancelled run gives its booked start back (``released``). Bookings already made stay as they are, but
the next caller takes the earliest given-back start that is still ahead, if it is earlier than the start
it would otherwise be booked: the slot is used, not wasted. The window holds, because that start was a
valid booking for the run that gave it back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from dalle_plugin.ports import RateDecision


class LimiterSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    limit: int = Field(default=5, ge=1, description="request starts allowed in any window")
    window_s: float = Field(default=60.0, gt=0, description="window length in seconds; fractions allowed")
    skew_margin_ms: int = Field(default=1000, ge=0, description="added to every start that waits for a slot")
    wait_granularity_ms: int = Field(default=1, ge=1, description="waiting starts are rounded up to this")

    @property
    def window_ms(self) -> int:
        return max(1, round(self.window_s * 1000))

    @property
    def spacing_ms(self) -> int:
        """Minimum distance between ticket n and ticket n + limit."""
        return self.window_ms + self.skew_margin_ms


@dataclass(frozen=True)
class LimiterState:
    """``issued`` tickets so far; the starts and ticket ids of the last ``min(issued, limit)`` of them,
    oldest first (``recent_starts[-1]`` belongs to ticket ``issued - 1``)."""

    issued: int = 0
    recent_starts: tuple[int, ...] = ()
    recent_tickets: tuple[str, ...] = ()
    released: tuple[int, ...] = ()  # starts given back by cancelled runs, free for the next caller

    def __post_init__(self) -> None:
        if len(self.recent_starts) != len(self.recent_tickets) or len(self.recent_starts) > self.issued:
            raise ValueError(f"inconsistent limiter state: {self}")

    @property
    def first_recent_index(self) -> int:
        return self.issued - len(self.recent_starts)

    def start_of(self, ticket_index: int) -> int | None:
        """The start of ticket ``ticket_index`` if it is among the recent ones."""
        offset = ticket_index - self.first_recent_index
        return self.recent_starts[offset] if 0 <= offset < len(self.recent_starts) else None

    def index_of(self, ticket: str) -> int | None:
        for offset in range(len(self.recent_tickets) - 1, -1, -1):
            if self.recent_tickets[offset] == ticket:
                return self.first_recent_index + offset
        return None

    def with_ticket(self, ticket: str, start_ms: int, limit: int) -> "LimiterState":
        return LimiterState(
            issued=self.issued + 1,
            recent_starts=(self.recent_starts + (start_ms,))[-limit:],
            recent_tickets=(self.recent_tickets + (ticket,))[-limit:],
            released=self.released,
        )


@dataclass(frozen=True)
class Reservation:
    """The answer for one ticket: the decision to hand back, the state to store and where."""

    decision: RateDecision
    ticket_index: int
    state: LimiterState
    is_new: bool
    reclaimed: int | None = None  # the given-back start this booking takes, if it takes one


def _round_up(value: int, granularity: int) -> int:
    return -(-value // granularity) * granularity


def earliest_start(state: LimiterState, now_ms: int, settings: LimiterSettings) -> int:
    """The earliest start for the next ticket that keeps FIFO order and the window (with its margin)."""
    bound = now_ms
    if state.recent_starts:
        bound = max(bound, state.recent_starts[-1])
    slot_owner = state.start_of(state.issued - settings.limit)
    if slot_owner is not None:
        bound = max(bound, slot_owner + settings.spacing_ms)
    return bound if bound <= now_ms else _round_up(bound, settings.wait_granularity_ms)


def queue_position(state: LimiterState, ticket_index: int, now_ms: int, settings: LimiterSettings) -> int:
    """How many tickets before ``ticket_index`` are booked to start after ``now_ms``.

    The last ``limit`` starts are known. Older ones are not stored, but a start that lies in the future
    was booked one step (the spacing, rounded up to the granule) after the start ``limit`` tickets
    earlier, so each recent start implies how many of its predecessors in the same slot are still in the
    future. Exact with agreeing clocks and 1 ms granules; with coarser granules it may count one extra per
    slot during the granule after that slot's last immediate start.
    """
    step = _round_up(settings.spacing_ms, settings.wait_granularity_ms)
    count = 0
    for offset, start in enumerate(state.recent_starts):
        index = state.first_recent_index + offset
        if start <= now_ms:
            continue
        if index < ticket_index:
            count += 1
        # predecessors index - limit, index - 2*limit, ... (all older than the recent ones)
        later_than_now = math.ceil((start - now_ms) / step) - 1
        count += min(later_than_now, index // settings.limit)
    return count


def reserve(state: LimiterState, ticket: str, now_ms: int, settings: LimiterSettings) -> Reservation:
    """Book a start for ``ticket`` (or return its booking if it already holds a recent one)."""
    if not ticket:
        raise ValueError("a rate-limit ticket needs a non-empty id")
    held = state.index_of(ticket)
    if held is not None:
        start = state.start_of(held)
        assert start is not None
        position = queue_position(state, held, now_ms, settings)
        return Reservation(RateDecision(start, True, position, calls=0), held, state, is_new=False)
    start = earliest_start(state, now_ms, settings)
    position = queue_position(state, state.issued, now_ms, settings)
    ahead = sorted(r for r in state.released if r >= now_ms)
    if ahead and ahead[0] < start:
        reclaimed = ahead[0]
        remaining = list(state.released)
        remaining.remove(reclaimed)
        position = sum(1 for s in state.recent_starts if now_ms < s < reclaimed)
        return Reservation(
            RateDecision(start_at_ms=reclaimed, reserved=True, position=position, calls=0),
            ticket_index=-1,
            state=LimiterState(state.issued, state.recent_starts, state.recent_tickets, tuple(remaining)),
            is_new=True,
            reclaimed=reclaimed,
        )
    return Reservation(
        RateDecision(start_at_ms=start, reserved=True, position=position, calls=0),
        ticket_index=state.issued,
        state=state.with_ticket(ticket, start, settings.limit),
        is_new=True,
    )


def may_start(decision: RateDecision, now_ms: int, settings: LimiterSettings) -> bool:
    """Whether a caller holding ``decision`` may send its request at ``now_ms``. Before ``start_at`` it
    must keep waiting; later than half the margin after it, it must take a new ticket (see the module
    doc). The other half is kept for the request's own way from this check to OpenAI's door."""
    if not decision.reserved:
        return False
    return decision.start_at_ms <= now_ms <= decision.start_at_ms + settings.skew_margin_ms // 2


def wait_seconds(decision: RateDecision, now_ms: int) -> int:
    """Whole seconds a Wait state must wait so the caller wakes no earlier than ``start_at``."""
    return max(0, math.ceil((decision.start_at_ms - now_ms) / 1000))
