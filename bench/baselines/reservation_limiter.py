"""Baseline: the reservation limiter the shared key used before the queue of issue 11, kept verbatim
(rules and adapter in one module) so the benchmark can run it side by side with the queue. Not used by
the product.

The rules:
The global image-request limit as pure rules: at most ``limit`` request starts in ANY ``window``
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

The adapter:
The global rate limiter in one DynamoDB item (table key ``pk`` (S) only).

Item ``{pk: <key>, issued: N, start_<j>: N, ticket_<j>: S}`` for slots ``j = 0 .. limit-1``: ticket ``m``
lives in slot ``m mod limit`` until ticket ``m + limit`` overwrites it, so the item always holds the last
``limit`` bookings, which is all the rules in ``domain.rate_limit`` need. The slot layout depends on the
limit: changing the limit needs a new ``key``.

One conditional UpdateItem per booking, no reads: it writes the ticket's slot and bumps ``issued`` only if
``issued`` is still what the caller computed from (``attribute_not_exists(pk)`` for the very first one).
If another caller got there first, the failed write returns the current item
(``ReturnValuesOnConditionCheckFailure=ALL_OLD``); the booking is recomputed from it and written again.
The last item seen is kept per adapter instance (one per Lambda container), so a booking costs 1 call when
no other container wrote in between and 2 otherwise (the failed first write doubles as the read). A write
made from the fresh item that still loses means real contention: the caller sleeps with jittered
exponential back-off (then writes once more from its now stale view, which fetches the item again), so a
burst of runs spreads out instead of hammering the item in lockstep. Measured on DynamoDB Local with cold
callers all asking in the same instant: about 3 calls each at 5-way and 8 at 40-way contention.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from dalle_plugin.domain.errors import RateLimiterBusy, StorageUnavailable
from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class RateDecision:
    """What the reservation limiter answered (the ports' type of the time)."""

    start_at_ms: int
    reserved: bool
    position: int = 0
    calls: int = 1


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

    def with_ticket(self, ticket: str, start_ms: int, limit: int) -> LimiterState:
        return LimiterState(
            issued=self.issued + 1,
            recent_starts=(*self.recent_starts, start_ms)[-limit:],
            recent_tickets=(*self.recent_tickets, ticket)[-limit:],
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


CONDITION_FAILED = "ConditionalCheckFailedException"


def _storage_error(error: Exception) -> StorageUnavailable:
    return StorageUnavailable(
        f"The image request queue could not be reached ({type(error).__name__}); the run will try again."
    )


def _is_condition_failure(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == CONDITION_FAILED


class DynamoRateLimiter:
    """``RateLimiter`` over one item: a strict sliding window with FIFO bookings (see the module doc)."""

    def __init__(
        self,
        client: Any,
        table_name: str,
        settings: LimiterSettings,
        key: str = "global",
        *,
        max_attempts: int = 100,
        backoff_base_ms: float = 20.0,
        backoff_cap_ms: float = 400.0,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
        clock: Callable[[], int] | None = None,
    ):
        self._client = client
        self._clock = clock
        self._table = table_name
        self._settings = settings
        self._key = key
        self._max_attempts = max_attempts
        self._backoff_base_ms = backoff_base_ms
        self._backoff_cap_ms = backoff_cap_ms
        self._sleep = sleep
        self._jitter = jitter
        self._last_seen = LimiterState()

    def acquire(self, ticket: str, now_ms: int) -> RateDecision:
        state = self._last_seen
        calls = 0
        contended = 0
        slept = False
        for _ in range(self._max_attempts):
            if self._clock is not None:
                # Each attempt books for the moment it is made, on the one clock every caller reads: a
                # caller that lost a race must not book "in the past" behind one that booked later.
                now_ms = max(now_ms, self._clock())
            reservation = reserve(state, ticket, now_ms, self._settings)
            if not reservation.is_new:
                return replace(reservation.decision, calls=calls)
            calls += 1
            try:
                self._client.update_item(**self.booking_request(state, reservation, ticket))
            except ClientError as error:
                if not _is_condition_failure(error):
                    raise _storage_error(error) from error
                state = self.state_from_item(error.response.get("Item"))
                self._last_seen = state
                # A write from a stale view (the first one, or one made after sleeping) is expected to
                # fail: retry at once with the fresh item. A fresh write that lost means real contention:
                # sleep, so the racers spread out.
                slept = calls > 1 and not slept
                if slept:
                    contended += 1
                    # the booking is for when it is made: the time spent backing off moves "now" on
                    now_ms += self._back_off(contended)
                continue
            except BotoCoreError as error:
                raise _storage_error(error) from error
            self._last_seen = reservation.state
            return replace(reservation.decision, calls=calls)
        raise RateLimiterBusy(
            "Too many runs asked for an image slot at the same moment; the run will try again shortly."
        )

    def _back_off(self, attempt: int) -> int:
        """Sleep with full jitter; returns the milliseconds slept."""
        ceiling_ms = min(self._backoff_cap_ms, self._backoff_base_ms * 2 ** (attempt - 1))
        pause_ms = self._jitter() * ceiling_ms
        self._sleep(pause_ms / 1000)
        return math.ceil(pause_ms)

    # ---- wire format ---------------------------------------------------------------------------------

    def release(self, ticket: str, now_ms: int, start_at_ms: int) -> None:
        """Give a cancelled run's booked start back, for the next caller (one ADD to a number set)."""
        if start_at_ms <= now_ms:
            return
        try:
            self._client.update_item(
                TableName=self._table,
                Key={"pk": {"S": self._key}},
                UpdateExpression="ADD #released :start",
                ConditionExpression="attribute_exists(#pk)",
                ExpressionAttributeNames={"#released": "released", "#pk": "pk"},
                ExpressionAttributeValues={":start": {"NS": [str(start_at_ms)]}},
            )
        except ClientError as error:
            if not _is_condition_failure(error):
                raise _storage_error(error) from error

    def booking_request(self, state: LimiterState, reservation: Reservation, ticket: str) -> dict[str, Any]:
        if reservation.reclaimed is not None:
            # Take a given-back start: remove it from the set, only if no one else took it first.
            return {
                "TableName": self._table,
                "Key": {"pk": {"S": self._key}},
                "UpdateExpression": "DELETE #released :start",
                "ConditionExpression": "contains(#released, :one)",
                "ExpressionAttributeNames": {"#released": "released"},
                "ExpressionAttributeValues": {
                    ":start": {"NS": [str(reservation.reclaimed)]},
                    ":one": {"N": str(reservation.reclaimed)},
                },
                "ReturnValues": "NONE",
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
        slot = reservation.ticket_index % self._settings.limit
        names = {"#issued": "issued", "#start": f"start_{slot}", "#ticket": f"ticket_{slot}"}
        values = {
            ":issued_after": {"N": str(state.issued + 1)},
            ":start": {"N": str(reservation.decision.start_at_ms)},
            ":ticket": {"S": ticket},
        }
        if state.issued == 0:
            condition = "attribute_not_exists(#pk)"
            names["#pk"] = "pk"
        else:
            condition = "#issued = :issued_before"
            values[":issued_before"] = {"N": str(state.issued)}
        return {
            "TableName": self._table,
            "Key": {"pk": {"S": self._key}},
            "UpdateExpression": "SET #issued = :issued_after, #start = :start, #ticket = :ticket",
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
            "ReturnValues": "NONE",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }

    def state_from_item(self, item: dict[str, Any] | None) -> LimiterState:
        if not item:
            return LimiterState()
        limit = self._settings.limit
        issued = int(item["issued"]["N"])
        starts: list[int] = []
        tickets: list[str] = []
        for index in range(max(0, issued - limit), issued):
            slot = index % limit
            try:
                starts.append(int(item[f"start_{slot}"]["N"]))
                tickets.append(item[f"ticket_{slot}"]["S"])
            except KeyError as missing:
                raise ValueError(
                    f"rate-limit item {self._key!r} has no {missing}: was the limit changed? use a new key"
                ) from None
        released = tuple(sorted(int(v) for v in item.get("released", {}).get("NS", [])))
        return LimiterState(
            issued=issued, recent_starts=tuple(starts), recent_tickets=tuple(tickets), released=released
        )
