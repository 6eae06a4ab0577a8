"""The shared key's queue as pure rules: at most ``limit`` requests in ANY ``window`` by actual send, the
runs waiting served first come first served, interactive first and fair between organisations. No I/O
here; the DynamoDB adapter (``adapters/dynamo_rate_limiter.py``) keeps the state in one item and applies
these rules with one conditional write per decision.

**Tickets, not a list of waiters.** Runs wait in *lines*, one per organisation and kind (editor or
workflow). A run joins its line once, when the hub's request is accepted: a batch of N takes N
consecutive tickets in one write, so the order within a line is the acceptance order by construction. A
line is three numbers and a few ranges: ``issued`` (the next ticket), ``served`` (every ticket below it
was sent or skipped) and the ``skipped`` ranges still ahead of ``served`` (a cancelled batch is one
range). A line with no one waiting is dropped, but not by the grant that empties it: that run claims from
the view it was told its turn in, and tickets added to its line since queue behind it without a write the
claim depends on, so its one write keeps the line, every ticket served, whether tickets were added or not;
the next decision's write drops it if it is still empty. The state is the lines with runs waiting (and
the one a last grant kept) plus the last ``limit`` sends: bounded by the limit and the organisations
waiting, whatever the history.

**Order.** A pure function of the state (``service_order``): editor lines first (someone waits at the
screen), then workflow lines; within a kind, organisations take turns, the one served least recently
first (a line remembers its last send while it has runs waiting, and the last ``limit`` sends are
remembered besides; never served goes first); within a line, ticket order. So every
waiting run's position and start time follow from the state alone, and no race decides who goes first.

**Strict at the door.** Every send is recorded in one of ``limit`` slots, and a slot takes a new send only
``window + margin`` after its last one (as recorded): ``limit`` slots then hold at most ``limit`` sends in
any window, whichever slot each send took. A run may send only by *claiming*, right before its request
leaves (the OpenAI client is already built): the claim is granted at ``now`` only if its turn has come
(below) and the slot its plan gives it (``free_slots``: the ``k``-th run in the order on the ``k``-th slot
to free) lies ``window + margin`` or more behind the time it records; the send is recorded in the same
conditional write, which checks that slot itself. Nothing is booked ahead: a run that wakes late loses
nothing, it claims when it is there.

**Whose turn.** The head of the order claims once the window lets it and its turn has come, or once it
has waited ``head_hold`` in its step (``The early head``, below), whichever is first. A run behind it claims at its
planned turn, before runs ahead of it that have not claimed yet, if they are of its own line and due by
less than the margin: sends due together are planned a gap apart, each in its claimer's clock, and with
clocks further apart than that (``hostile``: +-500 ms) runs wake out of order; the one ahead, when it
comes, finds the slot its plan gave it still free, so neither moves. A run due longer than the margin is
away (its step late, or dead): it keeps its place, and those behind wait for it, looking again a gap and
then a margin later, until it claims or is skipped as abandoned. Other lines are never passed: their order is
the round-robin promise itself. So within a line sends follow the acceptance order up to the margin, which
is also all that clocks that far apart can tell.

**The plan, and what a grant records.** Every run's turn follows from the state alone
(``planned_starts``): each slot reused ``window + margin`` after its last send, never before the run ahead
(a millisecond after it), sends the window leaves free at one moment (a backlog's first ``limit``, slots
long free) ``grant_gap`` apart, the head of a line no earlier than its ``since_ms`` (a batch's line is made
with it ``join_to_claim_ms`` after the join: its first run claims only after the steps before it). The gap
is not added where the slots already spread the sends, so two runs that came out of order and left their
slots close together move no later send. A grant claimed at most ``record_slack`` (half the tolerance)
after its turn is recorded *at* it, otherwise at the claimer's clock reading before its write; a head that
sends before its turn (its slot was free) is recorded at its clock, and the state keeps the turn it was
planned for, from which the turns after it follow (a run told its turn is never found due earlier, passed
while it sleeps). While runs of its line wait behind it, its slot keeps that turn as well (``Slot.turn_ms``):
the slot's next send of that line is planned from the turn, as the runs behind were told, while a run of
another line takes the slot by the window (``window + margin`` after the send's clock reading). So a write's round trip or a thread waking a few ms late moves no later send: the
schedule, and the plan every waiting run was told, hold; views seen at different times plan the same
times, which is what lets a run claim from an old view in one write.
The last thing before the request leaves, the sender looks at the clock again, and if more than
``send_tolerance`` passed since the recorded time (a slow write, a step starved of CPU), it records its
send again at the time now (``restamp``), or, if the grant ``limit`` later already reused its slot, does
not send and claims again. So a recorded send is never more than the tolerance before the actual one.
Two senders held up past a window at every grant would take each other's slot for ever: the rule is live
only because hold-ups end (the property tests draw them finite).

**Never demoted.** A run whose claim finds its ticket served did not send on it: its grant's send never
left (its step died after the claim, or its slot went to a later send while it was held up), or it was
skipped as abandoned and came back. Its ticket is *returned*: it waits again below every other ticket of
its line, so it is that line's next send, ahead of every run accepted after it. The grant it had, if any,
stays counted at its recorded time (the request may have left before the step died: counting it keeps the
limit whatever happened). A line made anew starts its tickets at ``issued``, above every ticket handed out
before, so a returned ticket is never another run's.

**What the margin covers** (``skew_margin_ms``, the deployment's ``RateSkewMarginMs``, at least 1 ms: the
template's ``MinValue`` refuses 0 at deploy time). A send is recorded at the claimer's clock reading taken
before its write; the request reaches OpenAI ``d`` later (the conditional write's round trip plus the
request's own way out), and the claimer's clock is off by ``o``. For sends ``k`` and ``k + limit`` the
arrivals are at least ``window + margin - (o[k+limit] - o[k]) - d[k]`` apart, so the margin must cover
``2 * max|o| + max d``, where ``d`` is at most ``send_tolerance`` (a sixth of the margin unless set) plus
the request's way out after the sender's last look at the clock:

* clock offsets between execution environments: +-500 ms on the local stack's ``hostile`` profile (a few
  ms between NTP-synced Lambdas), so 1000 ms;
* claim to arrival: from the send's recorded time to the OpenAI emulator's arrival stamp (at most the
  record slack before the claim, then the write, then the request's way out). Before the sender looked
  at the clock again, the recorded time was the reading before the granting write, and
  ``python -m bench.limiter`` (DynamoDB Local and the emulator on a 2-core machine shared with six other
  workers, load average about 20) saw a median of 85 ms but a p99 of 7.7 s when the machine starved the
  sender of CPU: one window of the 60-run backlog then held 6 arrivals at a limit of 5. A send held up
  that long now records its time again (or, its slot reused, does not leave), so only the tolerance
  (250 ms of the default margin) and the request's way out after the last look remain: the full bench
  at load 15 to 24 measured a maximum of 308 ms (median 24 ms in the backlog), 35 sends stamped again and
  8 grants given up (their tickets returned to the head of their lines) out of 118 sends, and no window
  above the limit in any scenario. The backlog alone on the same machine: a maximum of 165 ms, nothing
  stamped again or given up. With grants recorded at their planned times and the scenarios run one after
  another on a quiet machine: a maximum of 19 ms at the scaled window and 79 ms at the real one (with runs
  going ahead of others on their planned slots: 20 ms and 19 ms; alone, 143 ms at the real one), nothing
  stamped again or given up. The default keeps 500 ms for this part: ample on Lambda (a
  conditional write answers in under 10 ms, the request leaves at once).

So the default is 1500 ms: 2.5 % of a 60 s window, which is what a backlog's makespan pays over the
ideal (each slot is reused one ``window + margin`` later), plus the first sends' gaps (4 x 250 ms once).

What the clocks' offsets cost besides: sends due together are planned a gap (250 ms) apart, each in its
claimer's clock, so at +-500 ms about one neighbour in four wakes before the run ahead of it. It then goes
first on its own slot (``Whose turn``), and neither moves; but its first write, predicting the run ahead
had sent, loses and brings the item back, and so does the run ahead's: two writes more per such pair, which
only writes that do not depend on whether the neighbour has claimed would save (a record of each send that
a neighbour's write leaves alone, and counters added to rather than set: a new layout of the item). A
traced run (1.78 writes per grant: 60 grants, 11 join writes, 36 claims that lost) found 17 claims that
predicted the run ahead had sent and 19 of runs passed by a later one: with clocks this far apart, the
order within a burst of five sends 250 ms apart is close to random. ``python -m bench.limiter
--only backlog60/queue`` (60-run backlog, 60 s window, the full run's draws, two busy processes beside it):
1.7 to 1.9 writes per grant, where the same backlog with the ``aws`` profile's clocks (+-20 ms) takes 1.18:
its 6 batches of 10 runs join in 6 writes, 5 more when a cold API guesses the line is empty. It took 1.27
while the last run of each batch, claiming from its batch's view, removed its line and lost to the batches
that joined since (``Tickets``: the line is kept now). The scaled window's grant gap is 100 ms, so on a
machine that starves threads longer than that, runs wake out of order as with far clocks: the 6 s backlog
measured 1.18 beside two busy processes, and 2.07 and 2.2 beside heavier load.

Which part of the ETA error is whose: a told time is the teller's clock reading of the plan and the send
happens when the sender's clock reads it; teller and sender are different environments, so the error is
their offset difference plus what the queue moved. With +-500 ms offsets drawn uniformly the first part
alone has a p95 of about 0.78 s (measured 0.79 s); the queue's own part (the send against the plan, both in
the plan's clock) had a p95 of 1.1 s, because a batch's first run out of Extract up to 2 s before its planned
turn freed its slot from that earlier time in the state while every run told before its grant planned from
the turn, so runs behind the slot's next run took it for away and waited a margin, and that lateness was
recorded and carried on slot by slot. With the slot keeping the turn (``The plan``) it is 55 ms: makespan
1.0307 -> 1.029, ETA error p95 1.39 -> 0.79 s, writes per grant 2.15 -> 1.88 on the same draws and load,
clocks in step unchanged (1.0275, 0.04 s, 1.27).

**The early head.** What a head that sends before its turn still costs: its slot idles from its send's
window to its turn, and the backlog's first arrival comes that much before the plan. A batch's line is
planned from ``join_to_claim_ms`` (3 s) after the join, the slow end of Extract and a cold start, so its
first run comes early by up to that less the fastest (the bench draws 1 to 3 s: up to 2 s early). Sent at
once, its slot idled that long plus the clocks' difference between the teller and the slot's next sender
(up to 1 s at +-500 ms), and past the margin a run waited on a free slot: on the full run's draws the first
run came out of Extract 1.10 s after the join, sent 1.80 s before its turn, and its slot idled 2.04 s
(``backlog60/queue``: one stall, makespan 1.029). So a head early for its turn waits for it in its step,
but at most ``head_hold`` (the margin less the tolerance: 1250 ms) from when the step began to claim,
which keeps its own wait on a free slot under the margin. Its slot then idles its earliness less the hold
plus the clocks' difference: on the same draws 0.56 s early, 1.24 s idle; at most 2 s - 1.25 s + 1 s =
1.75 s, past the margin only when the first run comes out of Extract within about 0.25 s of the fastest
and the clocks lie far apart the wrong way (drawn as the bench draws them: about one backlog in 800,
against one in four before). ``python -m bench.limiter --only backlog60/queue`` (two processes, a quiet
machine): stalls 1 -> 0, makespan 1.029 -> 1.0278, ETA error p95 0.80 -> 0.78 s, writes per grant 1.93 ->
1.87; clocks in step: makespan 1.0276 -> 1.0264 (its first run sends at its turn), ETA 0.05 -> 0.04 s.
The runs behind the head are unchanged: they claim at their turns, from the plan they were told.

**Never stalled, never demoted.** A waiting run sleeps (a Wait state) until ``wake_lead_ms`` before its
turn; Wait states wake late, never early, so the lead must be at least the lateness the deployment
expects (5 s on the ``hostile`` profile). Awake, it claims; if its turn is at most ``short_wait_ms`` away
it waits in the step and claims again; if the queue moved (a run ahead cancelled, an editor run arrived)
it is told its new turn and sleeps again. A run keeps its ticket while away; only when the head of the
order has not claimed ``abandon_after_ms`` past its turn (its step crashed and its execution ended) does
the next claimer skip it, and if it comes back after all its ticket is returned (above). Cancel and
Record Failure leave the line (a skipped range). A claim asked again with the same send ticket after it
was granted answers "granted" and records nothing (a re-delivered claim never sends twice).

**Sends due at one moment** (a backlog's first ``limit``, or slots freed together) are planned
``grant_gap_ms`` apart (a sixth of the margin unless set): each run sleeps to its own planned time and,
clocks in step, finds the one before it written, so its one conditional write grants, instead of all of
them writing at once and all but one losing. The gap holds the head for at most ``head_hold`` (a run that
finds its slot free waits no longer, ``The early head``) and it does not add up: each slot is still reused ``window + margin`` after its
last send, so a backlog pays it at most ``limit - 1`` times in all (1 s of a 60 s window's 12-minute
backlog).

**Saying no in time.** A run whose start would come more than ``max_queue_wait_s`` after it joins is not
given a ticket: ``join`` admits the batch's runs up to the last one within the cap, and says what wait
the others would have had.
"""

from collections.abc import Iterator
from itertools import islice
from typing import Any, NamedTuple, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

_Record = TypeVar("_Record", bound=tuple)


def replace(record: _Record, **changes: Any) -> _Record:
    """``record`` with ``changes``: the state's records are NamedTuples, not frozen dataclasses (each of those
    compiles six methods at import, and the API, Generate and Record Failure import this on a cold start)."""
    return cast("_Record", record._replace(**changes))  # type: ignore[attr-defined]


EDITOR, WORKFLOW = "e", "w"


class LimiterSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    limit: int = Field(default=5, ge=1, description="requests allowed in any window")
    window_s: float = Field(default=60.0, gt=0, description="window length in seconds; fractions allowed")
    skew_margin_ms: int = Field(default=1500, ge=1, description="clock offsets plus claim-to-arrival time")
    max_queue_wait_s: float = Field(default=1800.0, gt=0, description="longest wait a run may be queued for")
    wake_lead_ms: int = Field(
        default=6000, ge=0, description="a waiting run wakes this long before its turn: its Wait's lateness"
    )
    short_wait_ms: int = Field(
        default=8000, ge=0, description="the longest a step waits in place for its turn"
    )
    join_to_claim_ms: int = Field(
        default=3000,
        ge=0,
        description="a run reaches its first claim this long after it joins (the steps before it, a cold "
        "start): plans made at a join start then",
    )
    abandon_after_ms: int = Field(
        default=60_000, ge=1, description="the head of the order unclaimed this long past its turn is skipped"
    )
    send_tolerance_ms: int | None = Field(
        default=None,
        ge=1,
        description="a granted send leaves at most this long after its recorded time (else it is recorded "
        "again): the part of the margin the claim's own write and hold-ups before the send may take; "
        "by default a sixth of the margin",
    )

    grant_gap_ms: int | None = Field(
        default=None,
        ge=1,
        description="sends due at one moment are planned this far apart, each after the one before it is "
        "written (a conditional write's round trip and the spread of the clocks); by default a sixth of the "
        "margin",
    )

    @model_validator(mode="after")
    def _awake_runs_wait_in_place(self) -> "LimiterSettings":
        # a run woken ``wake_lead_ms`` early must wait the rest in the step, not sleep again (a busy loop)
        if self.short_wait_ms < self.wake_lead_ms:
            raise ValueError("short_wait_ms must be at least wake_lead_ms")
        if self.send_tolerance_ms is not None and self.send_tolerance_ms >= self.skew_margin_ms:
            raise ValueError("send_tolerance_ms must leave part of skew_margin_ms for the clocks' offsets")
        return self

    @property
    def window_ms(self) -> int:
        return max(1, round(self.window_s * 1000))

    @property
    def send_tolerance(self) -> int:
        """How long after its recorded time a granted send may still leave (250 ms of a 1500 ms margin)."""
        return self.send_tolerance_ms or max(1, self.skew_margin_ms // 6)

    @property
    def grant_gap(self) -> int:
        """How far apart sends due at one moment are planned, and how often a run polls behind one due."""
        return self.grant_gap_ms or max(1, self.skew_margin_ms // 6)

    @property
    def record_slack(self) -> int:
        """How late a claim may come after its turn and still be recorded at it (half the tolerance)."""
        return self.send_tolerance // 2

    @property
    def head_hold(self) -> int:
        """How long a head whose slot is free before its planned turn waits in place for that turn, at most,
        from when it asked: less than the margin (a run waiting longer while a slot is free is stalled) by
        the tolerance its claim's own write and way out may take (1250 ms of a 1500 ms margin); never longer
        than a step waits in place (a hold across Wait states would start again at every wake-up)."""
        return min(self.skew_margin_ms - self.send_tolerance, self.short_wait_ms)

    @property
    def spacing_ms(self) -> int:
        """A send's slot frees this long after it (as recorded)."""
        return self.window_ms + self.skew_margin_ms


def line_of(org: str, interactive: bool) -> str:
    """The line a run waits in: its kind and organisation."""
    return f"{EDITOR if interactive else WORKFLOW}:{org}"


class Line(NamedTuple):
    issued: int = 0  # the next ticket
    served: int = 0  # every ticket below was sent or skipped; kept at a ticket still waiting
    skipped: tuple[tuple[int, int], ...] = ()  # [lo, hi) ranges above ``served``, sorted and apart
    since_ms: int = 0  # when its head became the head by a join, a skip or a return (0: by a grant)
    last_grant: int = -1  # the grant number of its last send (organisations take turns by it)
    returned: tuple[int, ...] = ()  # tickets below ``served`` waiting again (their grant never sent), sorted

    @property
    def waiting(self) -> bool:
        return self.served < self.issued or bool(self.returned)

    def holds(self, ticket: int) -> bool:
        """Whether ``ticket`` is still waiting in this line."""
        if ticket in self.returned:
            return True
        return self.served <= ticket < self.issued and not any(lo <= ticket < hi for lo, hi in self.skipped)

    def tickets(self) -> Iterator[int]:
        yield from self.returned  # below every other ticket: the head of the line
        ticket, ranges = self.served, list(self.skipped)
        while ticket < self.issued:
            if ranges and ranges[0][0] <= ticket:
                ticket = max(ticket, ranges.pop(0)[1])
                continue
            yield ticket
            ticket += 1


def _normal(line: Line) -> Line:
    """``served`` moved past the skipped ranges it reached; ranges below it dropped."""
    served = line.served
    ranges: list[tuple[int, int]] = []
    for lo, hi in sorted(line.skipped):
        if lo <= served:
            served = max(served, hi)
        elif ranges and lo <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], hi))
        else:
            ranges.append((lo, hi))
    served = min(served, line.issued)
    return replace(line, served=served, skipped=tuple(r for r in ranges if r[0] < line.issued))


class Slot(NamedTuple):
    at_ms: int  # the granted send's clock reading (what the window is checked against)
    send: str  # the send ticket (a claim asked again with it answers "granted")
    line: str
    grant: int = -1  # its grant number (organisations take turns by it)
    turn_ms: int | None = None  # a head that sent before its turn (its slot free early): that turn

    @property
    def planned_ms(self) -> int:
        """The time the slot's next send is planned from: the turn every view planned this send at, when it
        came earlier (see ``free_slots``)."""
        return self.at_ms if self.turn_ms is None else max(self.at_ms, self.turn_ms)


class LimiterState(NamedTuple):
    grants: int = 0  # sends granted so far (a grant's number: organisations take turns by it)
    issued: int = 0  # tickets issued so far by every line: a line made anew starts here, so no ticket recurs
    changes: int = 0  # joins, leaves and skips so far (what a claim made from an older view cannot predict)
    slots: tuple[Slot | None, ...] = ()  # ``limit`` of them (fewer before the first sends)
    lines: tuple[tuple[str, Line], ...] = ()  # the lines with runs waiting, by name
    # when the last grant to the head of the order was due (its turn, or its send if later): the run behind
    # it goes no earlier. A head that sent before its turn (its slot free) moves no later run's turn earlier
    # than it was told, and a run that went ahead of the head is not part of this chain.
    last_turn_ms: int = 0

    def line(self, name: str) -> Line | None:
        return dict(self.lines).get(name)

    def slot(self, grant: int) -> Slot | None:
        """The send of grant ``grant`` if it is among the last ``limit``."""
        return next((slot for slot in self.slots if slot is not None and slot.grant == grant), None)


def _with_line(
    state: LimiterState, name: str, line: Line, keep_emptied: bool = False
) -> tuple[tuple[str, Line], ...]:
    """The lines with ``line`` as ``name``. A line no one waits in is dropped, and so are those a grant kept
    after emptying them, unless this is that grant (``keep_emptied``: ``Tickets`` in the module doc)."""
    lines = {other: kept for other, kept in state.lines if kept.waiting}
    if line.waiting or keep_emptied:
        lines[name] = line
    else:
        lines.pop(name, None)
    return tuple(sorted(lines.items()))


def line_made_at(now_ms: int, settings: LimiterSettings) -> Line:
    """What a line made by a join at ``now_ms`` keeps besides its tickets: its first run claims only after
    the steps before it, so its turn is planned from ``join_to_claim_ms`` later."""
    return Line(since_ms=now_ms + settings.join_to_claim_ms)


def _new_line(state: LimiterState) -> Line:
    """A line with no one waiting, whose tickets start above every ticket issued so far."""
    return Line(issued=state.issued, served=state.issued)


def service_order(state: LimiterState, limit: int) -> Iterator[tuple[str, int]]:
    """Every waiting (line, ticket) in the order they are served (see the module doc)."""
    last: dict[str, int] = {name: line.last_grant for name, line in state.lines}
    for slot in state.slots:  # lines that emptied and came back
        if slot is not None:
            last[slot.line] = max(slot.grant, last.get(slot.line, -1))
    counter = state.grants
    for kind in (EDITOR, WORKFLOW):
        cursors = {name: line.tickets() for name, line in state.lines if name.startswith(kind + ":")}
        heads: dict[str, int] = {}
        for name, cursor in cursors.items():
            head = next(cursor, None)
            if head is not None:
                heads[name] = head
        turn = sorted((last.get(name, -1), name) for name in heads)
        while turn:
            _, name = turn.pop(0)
            yield name, heads[name]
            following = next(cursors[name], None)
            if following is not None:
                heads[name] = following
                turn.append((counter, name))  # served just now: behind every other line of its kind
            counter += 1


def free_slots(state: LimiterState, settings: LimiterSettings) -> list[tuple[int, int]]:
    """Every slot as (when it frees, its index), the earliest first: the ``k``-th run in the order is planned
    on the ``k``-th (0: free at once). Which slot a send takes does not matter to the limit, only that each
    slot's sends lie ``window + margin`` apart (``limit`` slots then hold at most ``limit`` sends in any
    window); taking the one its plan gave it lets a run that goes ahead of another leave that one's slot
    free for it, so neither moves."""
    slots = list(state.slots) + [None] * (settings.limit - len(state.slots))
    return sorted(
        (slot.planned_ms + settings.spacing_ms if slot is not None else 0, index)
        for index, slot in enumerate(slots)
    )


def frees_for_ms(state: LimiterState, settings: LimiterSettings, index: int, line: str) -> int:
    """When slot ``index`` is planned to take a send of ``line``: from the turn of a send of that line that came
    before it (the runs of its line were told their turns from it), otherwise by the window."""
    slot = state.slots[index] if index < len(state.slots) else None
    if slot is None:
        return 0
    return (slot.planned_ms if slot.line == line else slot.at_ms) + settings.spacing_ms


def window_frees_ms(state: LimiterState, settings: LimiterSettings, index: int) -> int:
    """When slot ``index`` takes a new send by the window: ``window + margin`` after its send's clock
    reading, which for a send that came before its turn is before its plan frees it."""
    slot = state.slots[index] if index < len(state.slots) else None
    return slot.at_ms + settings.spacing_ms if slot is not None else 0


def planned_starts(state: LimiterState, settings: LimiterSettings, upto: int) -> list[int]:
    """When the first ``upto`` runs in the order send if each claims at its turn: each at least ``window +
    margin`` after the send ``limit`` grants before it, never before the one ahead of it, the head of a line
    no earlier than its ``since_ms`` (a batch's first claim comes after the steps before it), and sends the
    window leaves free at one moment (a backlog's first ``limit``, slots long free) ``grant_gap`` apart. A
    pure function of the state, never of the clock: every run planning from the same state plans the same
    times. A time in the past is a run due since then.

    The gap is only for sends the window does not already spread: a send whose slot frees after the one
    ahead of it is planned at that moment (a millisecond after it at least), not a gap after it, so two
    sends that came out of order (clocks apart) and left their slots close together push no later send
    back."""
    starts: list[int] = []
    frees = free_slots(state, settings)
    heads: set[str] = set()
    for k, (name, _) in enumerate(islice(service_order(state, settings.limit), upto)):
        free = (
            starts[k - settings.limit] + settings.spacing_ms
            if k >= settings.limit
            else frees_for_ms(state, settings, frees[k][1], name)
        )
        previous = starts[-1] if starts else (state.last_turn_ms if state.grants else None)
        if previous is None:
            behind = 0
        elif free <= previous - settings.grant_gap:
            behind = previous + settings.grant_gap  # free since before the send ahead: spread them
        else:
            behind = previous + 1  # after the one ahead: their order is the plan's, not a race's
        line = state.line(name)
        since = line.since_ms if line is not None and name not in heads else 0
        heads.add(name)
        starts.append(max(free, behind, since))
    return starts


def head_turn_ms(state: LimiterState, settings: LimiterSettings, head_line: str) -> int:
    """Since when the head of the order could have sent: the window allowed it, the run before it had sent
    and its line had it at the head."""
    line = state.line(head_line)
    return max(
        frees_for_ms(state, settings, free_slots(state, settings)[0][1], head_line),
        state.last_turn_ms,
        line.since_ms if line is not None else 0,
    )


class Joined(NamedTuple):
    state: LimiterState
    first_ticket: int
    admitted: int  # the first ``admitted`` runs got tickets first_ticket, first_ticket + 1, ...
    starts_at_ms: tuple[int, ...]  # for every run asked for, admitted or not: when its turn comes
    positions: tuple[int, ...]  # runs that send before it


def join(
    state: LimiterState,
    line: str,
    count: int,
    now_ms: int,
    settings: LimiterSettings,
    may_refuse: bool = True,
) -> Joined:
    """``count`` runs of one line join it, in acceptance order. Runs whose turn would come past the cap are
    refused (not given tickets) when ``may_refuse``; the admitted ones are the first."""
    if count < 1:
        raise ValueError("a join needs at least one run")
    current = state.line(line)
    before = current if current is not None and current.waiting else _new_line(state)
    first = before.issued
    since = before.since_ms if before.waiting else line_made_at(now_ms, settings).since_ms
    grown = replace(before, issued=first + count, since_ms=since)
    trial = replace(
        state,
        lines=_with_line(state, line, grown),
        changes=state.changes + 1,
        issued=max(state.issued, grown.issued),
    )
    at, positions = placement(trial, line, first, count, now_ms, settings)
    admitted = count
    if may_refuse:
        admitted = admissible(at, now_ms, settings)
    if admitted == 0:
        new_state = state
    elif admitted < count:
        kept = replace(grown, issued=first + admitted)
        new_state = replace(trial, lines=_with_line(state, line, kept), issued=max(state.issued, kept.issued))
    else:
        new_state = trial
    return Joined(new_state, first, admitted, at, positions)


def placement(
    state: LimiterState, line: str, first: int, count: int, now_ms: int, settings: LimiterSettings
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """When tickets ``first .. first + count - 1`` of ``line`` send, and how many runs send before each."""
    mine = set(range(first, first + count))
    positions: dict[int, int] = {}
    for position, (name, ticket) in enumerate(service_order(state, settings.limit)):
        if name == line and ticket in mine:
            positions[ticket] = position
            if len(positions) == count:
                break
    starts = planned_starts(state, settings, max(positions.values()) + 1)
    tickets = range(first, first + count)
    return tuple(max(now_ms, starts[positions[t]]) for t in tickets), tuple(positions[t] for t in tickets)


def admissible(starts: tuple[int, ...], now_ms: int, settings: LimiterSettings) -> int:
    """How many of a batch's runs, planned to start at ``starts``, come within the queue's cap."""
    cap_ms = settings.max_queue_wait_s * 1000
    return next((i for i, start in enumerate(starts) if start - now_ms > cap_ms), len(starts))


def leave(state: LimiterState, line: str, first: int, count: int = 1, now_ms: int = 0) -> LimiterState:
    """The state with tickets ``first .. first + count - 1`` of ``line`` skipped (cancelled or failed runs);
    the same state when none of them is waiting."""
    current = state.line(line)
    if current is None or not any(current.holds(t) for t in range(first, first + count)):
        return state
    head = next(current.tickets(), None)
    returned = tuple(t for t in current.returned if not first <= t < first + count)
    shrunk = _normal(replace(current, skipped=(*current.skipped, (first, first + count)), returned=returned))
    if next(shrunk.tickets(), None) != head:
        shrunk = replace(shrunk, since_ms=now_ms)  # a new head: its turn starts now at the earliest
    return replace(state, lines=_with_line(state, line, shrunk), changes=state.changes + 1)


class Answer(NamedTuple):
    granted: bool
    start_at_ms: int  # now when granted; its turn otherwise
    position: int  # runs that will send before it
    state: LimiterState  # the state to store
    changed: bool  # whether ``state`` differs from the state asked about
    gone: bool = False  # the ticket no longer waits (skipped or left): join again
    slot: int = -1  # granted: the slot its send is recorded in (``start_at_ms`` is the recorded time)


def _granted(
    state: LimiterState,
    line: str,
    ticket: int,
    send: str,
    now_ms: int,
    settings: LimiterSettings,
    position: int,
    slot: int,
    turn_ms: int,
) -> LimiterState:
    """``ticket``, at ``position`` in the order, granted its send at ``now_ms`` in slot ``slot`` (its plan's)."""
    current = state.line(line) or Line()
    head = next(current.tickets(), None)
    if ticket in current.returned:  # a returned ticket: the tickets above it keep their places
        advanced = replace(current, returned=tuple(t for t in current.returned if t != ticket))
    elif ticket == current.served:
        advanced = _normal(replace(current, served=ticket + 1))
    else:  # sent before a ticket ahead of it that was not there yet: that one keeps its place
        advanced = _normal(replace(current, skipped=(*current.skipped, (ticket, ticket + 1))))
    advanced = replace(advanced, last_grant=state.grants)
    if ticket == head:
        advanced = replace(advanced, since_ms=0)  # the next head became the head by a grant
    slots = list(state.slots) + [None] * (settings.limit - len(state.slots))
    # a send that comes before its turn (a head whose slot was free early) while runs of its line wait behind
    # it keeps that turn: they were told their turns from it, so the slot's next send of the line is planned
    # from it as before (a later plan from the earlier send would find them due before their told turns and
    # have the runs behind them wait as if they were away). The window lets the slot go from ``now_ms`` on.
    kept = turn_ms if turn_ms > now_ms and advanced.waiting else None
    slots[slot] = Slot(now_ms, send, line, state.grants, kept)
    return replace(
        state,
        grants=state.grants + 1,
        slots=tuple(slots),
        lines=_with_line(state, line, advanced, keep_emptied=True),
        last_turn_ms=max(turn_ms, now_ms) if position == 0 else state.last_turn_ms,
    )


def state_at_turn(
    view: LimiterState, line: str, ticket: int, settings: LimiterSettings
) -> LimiterState | None:
    """The state at ``ticket``'s turn if nothing but the grants ahead of it happens after ``view``: those
    grants in order (the order is a pure function of the state), each recorded at its planned start. The
    item checks only the slot a claim reuses, against its actual time, so a plan that did not hold costs
    the claim its write, never the limit. None if the ticket does not wait in the view."""
    ahead = runs_ahead(view, line, ticket, settings.limit)
    if ahead is None:
        return None
    starts = planned_starts(view, settings, len(ahead))
    state = view
    for (name, served), at in zip(ahead, starts, strict=True):
        state = _granted(state, name, served, "", at, settings, 0, free_slots(state, settings)[0][1], at)
    return state


def _returned(state: LimiterState, line: str, ticket: int, now_ms: int) -> LimiterState | None:
    """The state with ``ticket`` back at the head of ``line``: it was served (granted, or skipped as
    abandoned) but its run claims again, so its send never left (its step died after the grant, its slot
    went to a later send while it was held up, or it came back after being skipped). The send granted
    before, if any, stays counted at its recorded time. None if the ticket was never issued there."""
    current = state.line(line) or _new_line(state)
    if ticket >= current.issued or current.holds(ticket):
        return None
    head = next(current.tickets(), None)
    back = replace(current, returned=tuple(sorted((*current.returned, ticket))))
    if head is None or ticket < head:
        back = replace(back, since_ms=now_ms)  # the head by a return: its turn starts now at the earliest
    return replace(state, lines=_with_line(state, line, back), changes=state.changes + 1)


def runs_ahead(state: LimiterState, line: str, ticket: int, limit: int) -> list[tuple[str, int]] | None:
    """The (line, ticket) entries served before ``ticket`` of ``line``, in order; None if it does not wait."""
    ahead: list[tuple[str, int]] = []
    for entry in service_order(state, limit):
        if entry == (line, ticket):
            return ahead
        ahead.append(entry)
    return None


def claim(
    state: LimiterState,
    line: str,
    ticket: int,
    send: str,
    now_ms: int,
    settings: LimiterSettings,
    asked_ms: int | None = None,
) -> Answer:
    """Grant ticket ``ticket`` of ``line`` its send ``send`` at ``now_ms``, or say when its turn comes.
    ``asked_ms``: when this step began to claim (it has waited in place since); a head early for its turn
    waits for it at most ``head_hold`` from then. Without it, a head sends as soon as the window lets it."""
    if not send:
        raise ValueError("a claim needs a send ticket")
    for index, slot in enumerate(state.slots):
        if slot is not None and slot.send == send:  # this very send was granted already, at its recorded time
            return Answer(True, slot.at_ms, 0, state, changed=False, slot=index)
    current = state.line(line)
    working = state
    if current is None or not current.holds(ticket):
        back = _returned(state, line, ticket, now_ms)
        if back is None:  # never issued in this line (a record from before the queue): join again
            return Answer(False, now_ms, 0, state, changed=False, gone=True)
        working = back
    head = next(service_order(working, settings.limit))
    if (
        head != (line, ticket)
        and now_ms - head_turn_ms(working, settings, head[0]) > settings.abandon_after_ms
    ):
        working = leave(working, head[0], head[1], 1, now_ms)  # its step is gone: skip it, it may rejoin
    ahead = runs_ahead(working, line, ticket, settings.limit)
    if ahead is None:
        raise ValueError(f"ticket {ticket} is not waiting in line {line}")
    position, frees = len(ahead), free_slots(working, settings)
    starts = planned_starts(working, settings, position + 1)
    turn = starts[position]
    release = turn
    if position == 0:
        # the head sends once the window lets it and its turn has come, or once it has waited ``head_hold``
        # in place: the gap and a line's since are plans, and a slot free longer than the margin while the
        # head waits is a stall. Sending before its turn idles its slot's next send of the line from the
        # send's window to the turn (``The plan``), so it waits as much of its earliness as it may.
        window = window_frees_ms(working, settings, frees[0][1])
        release = window if asked_ms is None else max(window, min(turn, asked_ms + settings.head_hold))
        due = release <= now_ms
    else:
        # a run whose turn has come goes before those ahead that have not claimed while they are of its own
        # line and due by less than the margin (their clocks may be that far behind this one's): they take
        # the next grants when they come. One later than that is away and keeps its place (those behind
        # wait for it), and other lines are never passed: their turns are the round-robin promise itself.
        due = (
            position < settings.limit  # on a slot of its own, free by its turn
            and turn <= now_ms
            and now_ms - starts[0] < settings.skew_margin_ms
            and all(name == line for name, _ in ahead)
        )
    if due:
        at = turn if now_ms - settings.record_slack <= turn <= now_ms else now_ms
        taken = frees[position][1]
        granted = _granted(working, line, ticket, send, at, settings, position, taken, turn)
        return Answer(True, at, 0, granted, True, slot=taken)
    eta = max(now_ms, turn if asked_ms is None else release)
    if position > 0 and eta - now_ms < settings.grant_gap:
        # a run ahead it may not pass is due and has not claimed: look again shortly (a gap while it is just
        # due, a margin once it is away), never in a busy loop, until it claims or is skipped as abandoned
        poll = settings.grant_gap if now_ms - starts[0] < settings.skew_margin_ms else settings.skew_margin_ms
        eta = max(eta, min(starts[0] + settings.abandon_after_ms + 1, now_ms + poll))
    return Answer(False, eta, position, working, changed=working != state)


def restamp(state: LimiterState, slot: int, send: str, now_ms: int) -> LimiterState | None:
    """The state with send ``send`` (held up after its grant) recorded at ``now_ms`` instead, or None when
    ``slot`` holds another send by now: the grant ``limit`` later reused it, so this send is no longer
    counted and must not leave."""
    held = state.slots[slot] if 0 <= slot < len(state.slots) else None
    if held is None or held.send != send:
        return None
    slots = list(state.slots)
    slots[slot] = replace(held, at_ms=now_ms)
    return replace(state, slots=tuple(slots))


def wake_at_ms(eta_ms: int, settings: LimiterSettings) -> int:
    """When the Wait state should end: ``wake_lead_ms`` before the turn, so a late wake-up is still early
    (the step waits the rest in place)."""
    return eta_ms - settings.wake_lead_ms
