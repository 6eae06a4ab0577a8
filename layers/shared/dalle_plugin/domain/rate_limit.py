"""The shared key's queue as pure rules: at most ``limit`` requests in ANY ``window`` by actual send, the
runs waiting served first come first served, interactive first and fair between organisations. No I/O
here; the DynamoDB adapter (``adapters/dynamo_rate_limiter.py``) keeps the state in one item and applies
these rules with one conditional write per decision.

**Strict at the door.** The state holds the actual send times of the last ``limit`` requests and the runs
waiting. A run may send only by *claiming* its send, right before the request leaves (the OpenAI client
is already built): the claim is granted at ``now`` only if fewer than ``limit`` recorded sends lie in
``(now - window - margin, now]``, and is recorded in the same conditional write. Nothing is booked minutes
ahead: a run that wakes late does not lose a booking, it claims when it is there.

**What the margin covers** (``skew_margin_ms``, the deployment's ``RateSkewMarginMs``, at least 1 ms).
A send is recorded at the claimer's clock reading taken before its write; the request reaches OpenAI
``d`` later (the conditional write's round trip plus the request's own way out), and the claimer's clock
is off by ``o``. For sends ``k`` and ``k + limit`` the arrivals are at least
``window + margin - (o[k+limit] - o[k]) - d[k]`` apart, so the margin must cover ``2 * max|o| + max d``:

* clock offsets between execution environments: +-500 ms on the local stack's ``hostile`` profile (a few
  ms between NTP-synced Lambdas), so 1000 ms;
* claim to arrival: from the clock reading before the granting write to the OpenAI emulator's arrival
  stamp (``python -m bench.limiter``, DynamoDB Local and the emulator on a 2-core machine at a load
  average of 10 to 13): median 28 ms, but p99 2.3 s when the machine starves the sender of CPU; with the
  client built before the claim, what stands between them is the conditional write's answer and the
  request's own way out. The default keeps 500 ms for it: enough on Lambda (a write takes under 10 ms),
  not on a machine that overloaded, where the margin would have to be raised.

So the default is 1500 ms: 2.5 % of a 60 s window, which is what a backlog's makespan pays over the
ideal (each slot is reused one ``window + margin`` later).

**Never stalled, never demoted.** A waiting run is told when its turn comes (its ETA); it sleeps in a
Wait state until ``wake_lead_ms`` before it (Wait states wake late, never early) and, once awake, waits
the last short stretch (at most ``short_wait_ms``) inside the step and claims at its turn. A run keeps
its place in the queue while it is away: the slot that frees for it is held for it until ``margin`` after
its ETA; only then may a run behind it of *another* organisation or kind use it (a slot is not left idle
for a run that is late), and the late run claims the next one that frees. A run of its own organisation
and kind never takes its slot, and never sends before it while it is away (more than ``margin`` from its
ETA): within a line, sends keep the acceptance order to within the margin (FIFO). A run away ``abandon_after_ms`` past its ETA (a crashed step whose
execution ended) is dropped from the queue; if it comes back after all, it rejoins at the place its
acceptance time gives it.

**Order.** Editor runs (someone waits at the screen) go before workflow and batch runs. Within a kind,
organisations take turns: each round gives every organisation with waiting runs one send, the one
served least recently (among the last ``limit`` sends) first; within one organisation and kind, the run
whose hub request was accepted first goes first. The order depends only on the state, never on which
step wins a race.

**Saying no in time.** A run that joins the queue with an ETA more than ``max_queue_wait_s`` away is
refused at once (it is not queued), with the wait it would have had.

The state is bounded by ``limit`` sends plus the runs actually waiting; a cancelled run leaves nothing.
Asking again with the same send ticket after it was granted answers "granted" and records nothing (a
re-delivered claim never sends twice).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field


class LimiterSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    limit: int = Field(default=5, ge=1, description="requests allowed in any window")
    window_s: float = Field(default=60.0, gt=0, description="window length in seconds; fractions allowed")
    skew_margin_ms: int = Field(default=1500, ge=1, description="clock offsets plus claim-to-arrival time")
    max_queue_wait_s: float = Field(default=1800.0, gt=0, description="longest wait a run may be queued for")
    wake_lead_ms: int = Field(default=2000, ge=0, description="a waiting run wakes this long before its turn")
    short_wait_ms: int = Field(
        default=3500, ge=0, description="the longest a step waits in place for its turn"
    )
    abandon_after_ms: int = Field(
        default=30_000, ge=1, description="a run away this long past its ETA leaves"
    )

    @property
    def window_ms(self) -> int:
        return max(1, round(self.window_s * 1000))

    @property
    def spacing_ms(self) -> int:
        """A send's slot frees this long after it (as recorded)."""
        return self.window_ms + self.skew_margin_ms


@dataclass(frozen=True)
class Send:
    at_ms: int
    ticket: str
    org: str
    interactive: bool


@dataclass(frozen=True)
class Waiter:
    run_id: str
    accepted_ms: int
    org: str
    interactive: bool
    eta_ms: int  # when it was last told its turn comes


@dataclass(frozen=True)
class LimiterState:
    sends: tuple[Send, ...] = ()  # the last ``limit`` sends, oldest first
    queue: tuple[Waiter, ...] = ()  # the runs waiting, in no particular order


@dataclass(frozen=True)
class Ask:
    """One run asking to send now. ``run_id`` is its place in the queue (the same across its attempts);
    ``ticket`` names this one send (a new one per attempt)."""

    run_id: str
    ticket: str
    accepted_ms: int
    org: str = ""
    interactive: bool = False
    may_refuse: bool = True  # only when joining: a run already queued is never refused


@dataclass(frozen=True)
class Answer:
    granted: bool
    start_at_ms: int  # now when granted; its ETA otherwise
    position: int  # runs that will send before it
    state: LimiterState  # the state to store
    changed: bool  # whether ``state`` differs from the state asked about
    refused: bool = False


def service_order(state: LimiterState) -> list[Waiter]:
    """The waiting runs in the order they are served (see the module doc)."""
    last_served: dict[tuple[bool, str], int] = {}
    for send in state.sends:
        key = (send.interactive, send.org)
        last_served[key] = max(last_served.get(key, send.at_ms), send.at_ms)
    order: list[Waiter] = []
    for interactive in (True, False):
        by_org: dict[str, list[Waiter]] = {}
        for waiter in state.queue:
            if waiter.interactive is interactive:
                by_org.setdefault(waiter.org, []).append(waiter)
        for runs in by_org.values():
            runs.sort(key=lambda w: (w.accepted_ms, w.run_id))
        orgs = sorted(
            by_org,
            key=lambda org: (
                last_served.get((interactive, org), -1),
                by_org[org][0].accepted_ms,
                by_org[org][0].run_id,
            ),
        )
        rounds = max((len(runs) for runs in by_org.values()), default=0)
        for turn in range(rounds):
            order.extend(by_org[org][turn] for org in orgs if turn < len(by_org[org]))
    return order


def free_slots(state: LimiterState, now_ms: int, settings: LimiterSettings) -> int:
    """How many requests may be sent at ``now_ms`` without breaking the window."""
    busy = sum(1 for send in state.sends if send.at_ms > now_ms - settings.spacing_ms)
    return max(0, settings.limit - busy)


def planned_starts(
    state: LimiterState, order: list[Waiter], now_ms: int, settings: LimiterSettings
) -> list[int]:
    """When each run in ``order`` will send if every one claims at its turn: each takes the slot that frees
    first (a slot frees ``spacing`` after its last send)."""
    frees = [send.at_ms + settings.spacing_ms for send in state.sends[-settings.limit :]]
    frees += [now_ms] * (settings.limit - len(frees))
    heapq.heapify(frees)
    starts = []
    for _ in order:
        start = max(now_ms, heapq.heappop(frees))
        starts.append(start)
        heapq.heappush(frees, start + settings.spacing_ms)
    return starts


def _holds_a_slot(ahead: Waiter, now_ms: int, settings: LimiterSettings) -> bool:
    """Whether a run ahead (of another organisation or kind) keeps a slot: while it is not late past the
    margin."""
    return now_ms <= ahead.eta_ms + settings.skew_margin_ms


def _delays_no_one_ahead(
    before: LimiterState, after: LimiterState, holders: list[Waiter], now_ms: int, settings: LimiterSettings
) -> bool:
    """Whether sending now leaves every run ahead that holds a slot a start no later than it has without
    this send, or than the ETA it sleeps until."""
    without = planned_starts(before, holders, now_ms, settings)
    with_send = planned_starts(after, holders, now_ms, settings)
    return all(
        late <= max(entitled, w.eta_ms) for w, entitled, late in zip(holders, without, with_send, strict=True)
    )


def decide(state: LimiterState, ask: Ask, now_ms: int, settings: LimiterSettings) -> Answer:
    """Grant ``ask`` its send at ``now_ms``, or queue it (or keep it queued) and say when its turn comes."""
    if not ask.ticket or not ask.run_id:
        raise ValueError("a rate-limit ask needs a run id and a ticket")
    if any(send.ticket == ask.ticket for send in state.sends):
        return Answer(True, now_ms, 0, state, changed=False)  # this very send was granted already
    queue = tuple(
        w for w in state.queue if w.run_id == ask.run_id or now_ms <= w.eta_ms + settings.abandon_after_ms
    )
    mine = next((w for w in queue if w.run_id == ask.run_id), None)
    joining = mine is None
    if mine is None:
        mine = Waiter(ask.run_id, ask.accepted_ms, ask.org, ask.interactive, eta_ms=now_ms)
        queue += (mine,)
    current = replace(state, queue=queue)
    order = service_order(current)
    position = order.index(mine)
    sends = (*current.sends, Send(now_ms, ask.ticket, ask.org, ask.interactive))[-settings.limit :]
    granted = LimiterState(sends=sends, queue=tuple(w for w in queue if w.run_id != ask.run_id))
    ahead = order[:position]
    line_ahead = [w for w in ahead if w.org == mine.org and w.interactive is mine.interactive]
    # never pass a run of one's own line that is away (late, or asleep until later): FIFO
    passes_no_one_away = all(abs(now_ms - w.eta_ms) <= settings.skew_margin_ms for w in line_ahead)
    holders = [w for w in ahead if w in line_ahead or _holds_a_slot(w, now_ms, settings)]
    if (
        passes_no_one_away
        and free_slots(current, now_ms, settings) > 0
        and _delays_no_one_ahead(current, granted, holders, now_ms, settings)
    ):
        return Answer(True, now_ms, 0, granted, changed=True)
    eta = planned_starts(current, order, now_ms, settings)[position]
    if eta <= now_ms:  # its slot is free but held for a run ahead that may still come: look again soon
        eta = now_ms + min(settings.skew_margin_ms, 250)
    if joining and ask.may_refuse and eta - now_ms > settings.max_queue_wait_s * 1000:
        return Answer(False, eta, position, state, changed=False, refused=True)
    waiting = replace(mine, eta_ms=eta)
    queue = tuple(waiting if w.run_id == ask.run_id else w for w in queue)
    updated = LimiterState(sends=state.sends, queue=queue)
    return Answer(False, eta, position, updated, changed=updated != state)


def leave(state: LimiterState, run_id: str) -> LimiterState:
    """The state without ``run_id`` in the queue (a cancelled run)."""
    return replace(state, queue=tuple(w for w in state.queue if w.run_id != run_id))


def wake_at_ms(eta_ms: int, settings: LimiterSettings) -> int:
    """When the Wait state should end: ``wake_lead_ms`` before the turn, so a late wake-up is still early
    (the step waits the rest in place)."""
    return eta_ms - settings.wake_lead_ms
