"""The shared key's queue in one DynamoDB item (table key ``pk`` (S) only).

Item ``{pk, g: N, c: N, n: N, p: N, t0..t{limit-1}: N, o0..o{limit-1}: S}`` and, for each line with runs
waiting, ``i:<line>: N`` (its next ticket), ``s:<line>: N`` (every ticket below is served) and ``l:<line>:
S`` (compact JSON of the rest: since, last grant, skipped ranges, returned tickets). ``g`` counts the
grants, ``c`` the changes a claim made from an older view cannot predict (a line made, a leave, a skip, a
return), ``n`` the ticket a line made anew starts at, ``p`` when the last grant to the head of the order
was due, and slot ``k`` holds the last send granted in it (``t``: its clock reading, ``o``: its send
ticket, line and grant number, and for a head that sent before its turn with runs of its line behind it,
that turn). The item stays small whatever the history (``domain.rate_limit``): a line
no one waits in is removed, by the next write after the grant that emptied it (that grant keeps it, its
``i`` equal to its ``s``, and ``n`` at least its ``i``).

**A join is one write that nothing refuses.** A batch joining a line with runs waiting adds to that line's
``i`` alone (``ADD``); one joining a line no one waits in, absent or kept emptied, makes it (its tickets
from ``n``, ``c`` counted). An addition is refused on a line kept emptied: made anew, a line is counted in
``c``, which every claim's write checks, so no run plans past its runs without knowing them.
Either way the write answers with the item as it is after, from which the batch's places and start times
follow. A run's claim does not depend on its own line's ``i``: tickets added to its line queue behind it.
So a batch accepted while a backlog is served costs the runs already waiting nothing.

Every other decision is one conditional UpdateItem, never a read: ``g`` and ``c`` must still be what the
decision was computed from, and so must ``i`` of every line a grant could find ahead of it (tickets added
to another line may take their turn first) and of every line it changes other than its own; a grant also
requires, in the condition itself, that the send ``limit`` grants earlier lies ``window + margin`` behind
(strict at the door whatever the caller believed). A write that loses returns the current item
(``ReturnValuesOnConditionCheckFailure=ALL_OLD``), from which the decision is computed again.

A claim made from an older view (the run slept since) needs no read either: the order is a pure function
of the state, so if nothing but grants happened since the view, the run knows which grants came before its
turn and writes the state that follows them, conditioned on ``g`` being the view's plus that many. The slot
it takes is fixed by its place in the plan, and its time is checked by the condition. The grants ahead are
taken as sent at their planned times, and a grant made at most ``record_slack`` after its own planned time
is recorded at it, so in a backlog the plan holds and the claim's one write grants.

A turn at most ``short_wait_ms`` away is waited for here, then claimed the same way: as if the runs ahead
in the state in hand had sent meanwhile, by one write that grants or brings the item back (it never
writes once to learn the state and again to claim), even where that state would let it go ahead of them:
they were due first, so by now they have most likely sent. So is the turn of a head whose slot is free
before it, for at most ``head_hold`` from the call's start (``domain.rate_limit``: an early head idles its
slot later).

A grant records a clock reading at most ``record_slack`` before its write. Right before the request leaves,
the sender asks ``confirm_send``: if more than ``send_tolerance_ms`` passed since that reading (a slow
write, a step starved of CPU), the send's slot is stamped again with the time now, by a write conditioned
on the slot still holding this send. Once the grant ``limit`` later has reused the slot, the send is no
longer counted, so it must not leave: the run claims again, and its ticket is returned to the head of its
line. So the recorded time a later grant is checked against is never more than the tolerance before the
actual send. The client is built before the claim, so a send leaves within the tolerance and the
confirmation is a look at the clock, not a write; the re-stamp is for a step held up in between (counted
by the bench).

The item's key is ``queue``: an item of the earlier one-attribute layout (key ``global``) is left alone,
and a run holding a ticket of it is told its ticket is gone and joins again.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from dalle_plugin.domain.errors import RateLimiterBusy, StorageUnavailable
from dalle_plugin.domain.rate_limit import (
    Answer,
    LimiterSettings,
    LimiterState,
    Line,
    Slot,
    admissible,
    claim,
    leave,
    line_made_at,
    line_of,
    placement,
    planned_starts,
    replace,
    restamp,
    runs_ahead,
    state_at_turn,
)
from dalle_plugin.port_records import RateClaim, RateDecision, RateJoin

CONDITION_FAILED = "ConditionalCheckFailedException"
#: what only the ``l:`` attribute of a line with no ticket skipped or returned contains (``_rest``)
NOTHING_LEFT = ",[],[]]"
#: the queue item's key (the earlier one-attribute layout was kept under ``global``)
QUEUE_KEY = "queue"
#: times a send late for its recorded time is stamped again before it gives its grant up (each stamp is a
#: write whose own round trip may make it late again on a starved machine)
MAX_RESTAMPS = 3


def _slot_owner(send: str, line: str, grant: int, turn: int | None = None) -> str:
    """A slot's ``o``: the send ticket, line and grant number of the grant it holds, and the turn of a send
    that came before it."""
    return json.dumps([send, line, grant, *([turn] if turn is not None else [])], separators=(",", ":"))


def _slot_owned_by(send: str, line: str) -> str:
    """What every ``o`` of a grant of ``send`` (of ``line``) begins with, whatever its grant number."""
    return _slot_owner(send, line, 0).rsplit(",", 1)[0] + ","


def _storage_error(error: Exception) -> StorageUnavailable:
    return StorageUnavailable(
        f"The image request queue could not be reached ({type(error).__name__}); the run will try again."
    )


def _is_condition_failure(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == CONDITION_FAILED


def encode_lines(state: LimiterState) -> str:
    lines = [
        [
            name,
            line.issued,
            line.served,
            line.since_ms,
            line.last_grant,
            [list(r) for r in line.skipped],
            *([list(line.returned)] if line.returned else []),
        ]
        for name, line in state.lines
    ]
    return json.dumps(lines, separators=(",", ":"))


def encode_state(state: LimiterState, seen_ms: int = 0) -> str:
    """The whole state as a compact string (what a run keeps as its view), with when it was seen: the time
    plans made from it start (a join's view: when its runs can first claim)."""
    slots = [
        [s.at_ms, s.send, s.line, s.grant, *([s.turn_ms] if s.turn_ms is not None else [])] if s else None
        for s in state.slots
    ]
    return json.dumps(
        {
            "g": state.grants,
            "c": state.changes,
            "n": state.issued,
            "s": slots,
            "p": state.last_turn_ms,
            "q": json.loads(encode_lines(state)),
            "at": seen_ms,
        },
        separators=(",", ":"),
    )


def view_seen_ms(text: str) -> int:
    return int(json.loads(text).get("at", 0)) if text else 0


def _slot(raw: list) -> Slot:
    """A slot from ``[time, send, line, grant]`` and, for a send that came before its turn, that turn."""
    at, send, line, grant, *turn = raw
    return Slot(int(at), send, line, int(grant), int(turn[0]) if turn else None)


def _line(raw: list) -> tuple[str, Line]:
    name, issued, served, since, last, skipped, *returned = raw
    return name, Line(
        int(issued),
        int(served),
        tuple((int(lo), int(hi)) for lo, hi in skipped),
        int(since),
        int(last),
        tuple(int(t) for t in returned[0]) if returned else (),
    )


def _lines(raw: list) -> tuple[tuple[str, Line], ...]:
    return tuple(_line(entry) for entry in raw)


def decode_state(text: str) -> LimiterState:
    if not text:
        return LimiterState()
    raw = json.loads(text)
    return LimiterState(
        grants=int(raw["g"]),
        issued=int(raw.get("n", 0)),
        changes=int(raw["c"]),
        slots=tuple(_slot(s) if s else None for s in raw["s"]),
        lines=_lines(raw["q"]),
        last_turn_ms=int(raw.get("p", 0)),
    )


class DynamoRateLimiter:
    """``RateLimiter`` over one item (see the module doc)."""

    def __init__(
        self,
        client: Any,
        table_name: str,
        settings: LimiterSettings,
        key: str = QUEUE_KEY,
        *,
        clock: Callable[[], int] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
        max_attempts: int = 100,
        backoff_base_ms: float = 20.0,
        backoff_cap_ms: float = 400.0,
    ):
        self._client = client
        self._table = table_name
        self._settings = settings
        self._key = key
        self._clock = clock or (lambda: time.time_ns() // 1_000_000)
        self._sleep = sleep
        self._jitter = jitter
        self._max_attempts = max_attempts
        self._backoff_base_ms = backoff_base_ms
        self._backoff_cap_ms = backoff_cap_ms
        self._state = LimiterState()
        #: DynamoDB calls made by this instance (the benchmark's writes-per-grant figure)
        self.calls = 0
        #: of them, sends stamped again because they were held up past the tolerance before leaving
        self.restamps = 0

    # ---- the port ------------------------------------------------------------------------------------

    def join(self, org_id: str, interactive: bool, count: int, may_refuse: bool = True) -> RateJoin:
        line = line_of(org_id, interactive)
        if count < 1:
            raise ValueError("a join needs at least one run")
        make = self._line_served_by(line, self._clock())  # a guess: the item says which it is
        calls = 0
        for _ in range(self._max_attempts):
            calls += 1
            if self._add_tickets(line, count, make):
                break
            make = not make  # made or emptied since the state in hand was seen
        else:
            raise RateLimiterBusy("Too many runs joined the shared key's queue at once; try again shortly.")
        now = self._clock()
        joined = self._state.line(line)
        if joined is None:  # the write answers with the item as it is after, the line in it
            raise ValueError(f"the item came back without line {line}")
        first = joined.issued - count
        starts, positions = placement(self._state, line, first, count, now, self._settings)
        admitted = admissible(starts, now, self._settings) if may_refuse else count
        if admitted < count:  # past the cap: those tickets are skipped at once, their runs refused
            before = self.calls
            self.leave(org_id, interactive, first + admitted, count - admitted)
            calls += self.calls - before
        return RateJoin(first, admitted, starts, positions, encode_state(self._state, now), calls)

    def _line_served_by(self, line: str, now_ms: int) -> bool:
        """Whether the state in hand (this environment's last look) may have ``line`` empty by ``now_ms``: no
        one waiting in it then, or its last ticket able to have sent by then (the window allowing, whenever
        its runs reached their claims). A warm API's last look is often its own last join, whose runs have
        sent since."""
        current = self._state.line(line)
        if current is None or not current.waiting:
            return True
        *_, last = current.tickets()
        lead = self._settings.join_to_claim_ms  # its runs may have claimed as soon as they joined
        soonest = replace(
            self._state,
            lines=tuple((name, replace(ln, since_ms=ln.since_ms - lead)) for name, ln in self._state.lines),
            last_turn_ms=self._state.last_turn_ms - lead,  # a head that sent early was due at its since
        )
        starts, _ = placement(soonest, line, last, 1, 0, self._settings)
        return starts[0] < now_ms

    def _add_tickets(self, line: str, count: int, make: bool) -> bool:
        """``count`` tickets added to ``line`` by one write, the item as it is after in hand: to a line with
        runs waiting (``make`` False), or making the line from ``n`` (True). False when the line turned out
        to be the other kind."""
        names = {"#i": f"i:{line}", "#s": f"s:{line}", "#l": f"l:{line}", "#n": "n", "#g": "g", "#c": "c"}
        # a line kept by the grant that emptied it: every ticket served, none skipped or returned
        emptied = "(#i = #s AND contains(#l, :nothing_left))"
        values: dict[str, Any] = {":count": {"N": str(count)}, ":nothing_left": {"S": NOTHING_LEFT}}
        if make:
            names_used = names
            values[":zero"] = {"N": "0"}
            values[":one"] = {"N": "1"}
            values[":rest"] = {"S": _rest(line_made_at(self._clock(), self._settings))}
            update = (
                "SET #s = if_not_exists(#n, :zero), #i = if_not_exists(#n, :zero) + :count, "
                "#n = if_not_exists(#n, :zero) + :count, #l = :rest, #g = if_not_exists(#g, :zero) "
                "ADD #c :one"
            )
            condition = f"attribute_not_exists(#i) OR {emptied}"
        else:
            names_used = {key: names[key] for key in ("#i", "#s", "#l")}
            update, condition = "ADD #i :count", f"attribute_exists(#i) AND NOT {emptied}"
        went, answer = self._update(
            {
                "UpdateExpression": update,
                "ConditionExpression": condition,
                "ExpressionAttributeNames": names_used,
                "ExpressionAttributeValues": values,
                "ReturnValues": "ALL_NEW",
            }
        )
        if went:
            self._state = self.from_item(answer.get("Attributes"))
        return went

    def claim(self, ask: RateClaim) -> RateDecision:
        line = line_of(ask.org_id, ask.interactive)
        ticket, calls, waited_ms, contended = ask.ticket, 0, 0, 0
        confirmed = False  # whether the state in hand was seen by a write of this call
        stale = False  # whether this call slept in place since it last saw the state
        asked = self._clock()  # a head early for its turn waits for it at most ``head_hold`` from here
        view = decode_state(ask.view) if ask.view else self._state
        predicted = state_at_turn(view, line, ticket, self._settings)
        if predicted is not None and predicted.grants > view.grants:
            # the runs ahead in the view send no earlier than the view plans: wait for that, then claim as
            # if they had sent as planned
            ahead = predicted.grants - view.grants
            turn = planned_starts(view, self._settings, ahead + 1)[ahead]
            early_ms = turn - self._clock()
            if 0 < early_ms <= self._settings.short_wait_ms:
                self._sleep(early_ms / 1000)
                waited_ms += early_ms
            hoped = claim(predicted, line, ticket, ask.send, self._clock(), self._settings, asked)
            if hoped.granted and early_ms <= self._settings.short_wait_ms:
                calls += 1
                if self._write(predicted, hoped.state, line):
                    self._state = LimiterState()  # the slots of the grants before it are not known here
                    return RateDecision(True, hoped.start_at_ms, 0, ticket, ask.view, calls, hoped.slot)
                confirmed = True
        if not confirmed:
            self._state = view
        attempts = 0
        while True:
            now = self._clock()
            answer = claim(self._state, line, ticket, ask.send, now, self._settings, asked)
            attempts += 1
            if attempts > self._max_attempts and not answer.granted:
                if contended * 2 >= self._max_attempts:
                    raise RateLimiterBusy(
                        "Too many runs asked for the shared key at the same moment; the run will try again "
                        "shortly."
                    )
                # The attempts went to polling in place behind a run that is due and has not claimed (one that
                # failed, before its Record Failure left the line): waiting, not contention, so the step
                # sleeps and claims again, the run ahead skipped once ``abandon_after_ms`` past its turn.
                break
            if answer.gone and confirmed:  # a ticket never issued in its line (a record from before): join
                joined = self.join(ask.org_id, ask.interactive, 1, may_refuse=False)
                calls += joined.calls
                ticket = joined.first_ticket
                continue
            if stale and (
                runs_ahead(self._state, line, ticket, self._settings.limit)
                if answer.granted
                else not answer.changed
            ):
                # slept in place since the state was seen, so the runs ahead, due before it, have most likely
                # sent: claim as if they had, which is one write that either grants or brings the item back
                # (never a read). Going ahead of them on the state in hand would bet on the reverse.
                calls += 1
                confirmed, stale = True, False
                granted = self._claim_after_those_ahead(line, ticket, ask.send, now, asked)
                if granted is not None:
                    self._state = LimiterState()  # the slots of the grants before it are not known here
                    return RateDecision(True, granted.start_at_ms, 0, ticket, ask.view, calls, granted.slot)
                continue
            if answer.changed:
                calls += 1
                stale = False
                if not self._write(self._state, answer.state, line):
                    contended += 1 if confirmed else 0
                    confirmed = True
                    if contended > 1:
                        self._back_off(contended - 1)
                    continue
                confirmed = True
            if answer.granted:
                granted_view = encode_state(answer.state, self._clock())
                return RateDecision(True, answer.start_at_ms, 0, ticket, granted_view, calls, answer.slot)
            wait_ms = answer.start_at_ms - now
            if (
                not answer.gone
                and wait_ms <= self._settings.short_wait_ms
                and waited_ms < 2 * self._settings.short_wait_ms
            ):
                self._sleep(max(0, wait_ms) / 1000)  # the turn is close: wait for it here
                waited_ms += max(1, wait_ms)
                stale = True
                continue
            # never send a run to sleep on a view older than a short wait (a run ahead may have left since)
            if not confirmed and now - view_seen_ms(ask.view) > self._settings.short_wait_ms:
                calls += 1
                self._learn()
                confirmed = True
                continue
            break  # its turn lies ahead: the step sleeps until then
        seen = now if confirmed else view_seen_ms(ask.view)
        return RateDecision(
            False, answer.start_at_ms, answer.position, ticket, encode_state(answer.state, seen), calls
        )

    def confirm_send(self, ask: RateClaim, granted: RateDecision) -> int | None:
        stamped = granted.start_at_ms
        for attempt in range(MAX_RESTAMPS + 1):
            now = self._clock()
            if now - stamped <= self._settings.send_tolerance:
                return stamped
            if attempt == MAX_RESTAMPS or not self._restamp(ask, granted.slot, now):
                return None
            stamped = now
            self._state = restamp(self._state, granted.slot, ask.send, now) or self._state
        return None

    def _claim_after_those_ahead(
        self, line: str, ticket: int, send: str, now_ms: int, asked_ms: int
    ) -> Answer | None:
        """The grant written on the state at ``ticket``'s turn if the runs ahead in the state in hand have
        sent (its answer: the recorded time may be the turn, not ``now_ms``); on losing, None and the item in
        hand. A write either way (the item itself checks the window)."""
        predicted = state_at_turn(self._state, line, ticket, self._settings)
        hoped = claim(predicted, line, ticket, send, now_ms, self._settings, asked_ms) if predicted else None
        if predicted is None or hoped is None or not hoped.granted:
            self._learn()
            return None
        return hoped if self._write(predicted, hoped.state, line) else None

    def _restamp(self, ask: RateClaim, slot: int, now_ms: int) -> bool:
        """The send in slot ``slot`` recorded at ``now_ms``, if the slot still holds it."""
        self.restamps += 1
        went, _ = self._update(
            {
                "UpdateExpression": "SET #t = :t",
                "ConditionExpression": "begins_with(#o, :o)",
                "ExpressionAttributeNames": {"#t": f"t{slot}", "#o": f"o{slot}"},
                "ExpressionAttributeValues": {
                    ":t": {"N": str(now_ms)},
                    ":o": {"S": _slot_owned_by(ask.send, line_of(ask.org_id, ask.interactive))},
                },
            }
        )
        return went

    def leave(self, org_id: str, interactive: bool, first_ticket: int, count: int = 1) -> None:
        line = line_of(org_id, interactive)
        fresh = False
        for attempt in range(self._max_attempts):
            remaining = leave(self._state, line, first_ticket, count, self._clock())
            if remaining == self._state:
                if fresh:  # none of them waits in the item
                    return
                self._learn()  # the state in hand may predate the tickets: see the item before saying so
                fresh = True
                continue
            if self._write(self._state, remaining):
                return
            fresh = True
            if attempt > 0:
                self._back_off(attempt)
        raise RateLimiterBusy("The image request queue was too busy to take the run out; try again shortly.")

    # ---- one conditional write -----------------------------------------------------------------------

    def _write(self, before: LimiterState, after: LimiterState, claimer: str | None = None) -> bool:
        """One conditional write taking the item from ``before`` to ``after`` (a claim of ``claimer``'s);
        on losing, take the item."""
        went, answer = self._update(self.write_request(before, after, claimer))
        self._state = after if went else self.from_item(answer.get("Item"))
        return went

    def _learn(self) -> None:
        """The current item, by a conditional write that cannot succeed (it returns the item; no read)."""
        _, answer = self._update(
            {
                "UpdateExpression": "SET #g = :never",
                "ConditionExpression": "#g = :never",
                "ExpressionAttributeNames": {"#g": "g"},
                "ExpressionAttributeValues": {":never": {"N": "-1"}},
                "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
            }
        )
        self._state = self.from_item(answer.get("Item"))

    def _update(self, request: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """One UpdateItem on the queue's item: whether its condition held, and DynamoDB's answer (on a failed
        condition, the error's, which carries the item when it was asked for)."""
        self.calls += 1
        try:
            return True, self._client.update_item(
                **{"TableName": self._table, "Key": {"pk": {"S": self._key}}} | request
            )
        except ClientError as error:
            if not _is_condition_failure(error):
                raise _storage_error(error) from error
            return False, error.response
        except BotoCoreError as error:
            raise _storage_error(error) from error

    def _back_off(self, attempt: int) -> None:
        ceiling_ms = min(self._backoff_cap_ms, self._backoff_base_ms * 2 ** (attempt - 1))
        self._sleep(self._jitter() * ceiling_ms / 1000)

    # ---- wire format ---------------------------------------------------------------------------------

    def write_request(
        self, before: LimiterState, after: LimiterState, claimer: str | None = None
    ) -> dict[str, Any]:
        """The conditional UpdateItem taking the item from ``before`` to ``after`` (see the module doc);
        ``claimer``: the line of the run claiming, whose added tickets queue behind it."""
        names = {"#g": "g", "#c": "c"}
        values: dict[str, Any] = {":g1": {"N": str(after.grants)}, ":c1": {"N": str(after.changes)}}
        sets, removes = ["#g = :g1", "#c = :c1"], []
        if before.grants == 0 and before.changes == 0:
            conditions = ["attribute_not_exists(#g)"]
        else:
            conditions = ["#g = :g0", "#c = :c0"]
            values[":g0"] = {"N": str(before.grants)}
            values[":c0"] = {"N": str(before.changes)}
        granting = after.grants > before.grants
        was_lines, now_lines = dict(before.lines), dict(after.lines)
        dropped: list[int] = []
        for k, name in enumerate(sorted(set(was_lines) | set(now_lines))):
            was, now = was_lines.get(name), now_lines.get(name)
            i, served, rest = f"#i{k}", f"#s{k}", f"#l{k}"
            names.update({i: f"i:{name}", served: f"s:{name}", rest: f"l:{name}"})
            if granting and name == claimer and was is not None:
                # its own line as the decision saw it: a run of it may have gone ahead of the run before it
                # since (the same number of grants, other tickets served), which the order counts on
                conditions += [f"{served} = :s{k}0", f"{rest} = :l{k}0"]
                values[f":s{k}0"] = {"N": str(was.served)}
                values[f":l{k}0"] = {"S": _rest(was)}
            if was is None:  # made anew by a return
                conditions.append(f"attribute_not_exists({i})")
            elif now is None or ((now != was or granting) and name != claimer):
                # emptied (no tickets added since), changed on the issued it was computed from, or a line
                # a grant could find ahead of it: no tickets added since
                conditions.append(f"{i} = :i{k}")
                values[f":i{k}"] = {"N": str(was.issued)}
            if now is None and was is not None:
                removes += [i, served, rest]
                dropped.append(was.issued)  # a line made anew by this name starts above its tickets
            elif now is not None and not now.waiting and (was is None or was.waiting):
                dropped.append(now.issued)  # kept by the grant that emptied it: made anew above it too
            if now is not None and (was is None or now != was):
                if was is not None and now.issued != was.issued:
                    raise ValueError("only a join adds tickets")  # a bug in the domain, never the wire
                sets += [f"{served} = :s{k}", f"{rest} = :l{k}"]
                values[f":s{k}"] = {"N": str(now.served)}
                values[f":l{k}"] = {"S": _rest(now)}
                if was is None:
                    sets.append(f"{i} = :i{k}")
                    values[f":i{k}"] = {"N": str(now.issued)}
        if dropped:
            names["#n"] = "n"
            sets.append("#n = :n")
            values[":n"] = {"N": str(max(after.issued, *dropped))}
        if granting:  # a grant: its slot, and the window checked by the item itself
            (k,) = [
                k
                for k, slot in enumerate(after.slots)
                if slot != (before.slots + (None,) * len(after.slots))[k]
            ]
            slot = after.slots[k]
            if slot is None:
                raise ValueError("a grant's state has no slot for it")  # a bug in claim(), never the wire
            names["#t"], names["#o"] = f"t{k}", f"o{k}"
            values[":t"] = {"N": str(slot.at_ms)}
            values[":o"] = {"S": _slot_owner(slot.send, slot.line, slot.grant, slot.turn_ms)}
            values[":cutoff"] = {"N": str(slot.at_ms - self._settings.spacing_ms)}
            names["#p"] = "p"
            values[":p"] = {"N": str(after.last_turn_ms)}
            sets += ["#t = :t", "#o = :o", "#p = :p"]
            conditions.append("(attribute_not_exists(#t) OR #t <= :cutoff)")
        update = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        condition = " AND ".join(conditions)
        used = set(re.findall(r"#\w+", update + " " + condition))  # DynamoDB refuses names left unused
        return {
            "TableName": self._table,
            "Key": {"pk": {"S": self._key}},
            "UpdateExpression": update,
            "ConditionExpression": condition,
            "ExpressionAttributeNames": {k: v for k, v in names.items() if k in used},
            "ExpressionAttributeValues": values,
            "ReturnValues": "NONE",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }

    def from_item(self, item: dict[str, Any] | None) -> LimiterState:
        if not item:
            return LimiterState()
        limit = self._settings.limit
        slots: list[Slot | None] = []
        for k in range(limit):
            if f"t{k}" in item:
                slots.append(_slot([item[f"t{k}"]["N"], *json.loads(item[f"o{k}"]["S"])]))
            else:
                slots.append(None)
        lines = []
        for attribute, value in item.items():
            if attribute.startswith("i:"):
                name = attribute[2:]
                since, last, skipped, returned = json.loads(item[f"l:{name}"]["S"])
                issued, served = int(value["N"]), int(item[f"s:{name}"]["N"])
                skipped = tuple((int(lo), int(hi)) for lo, hi in skipped)
                returned = tuple(int(t) for t in returned)
                lines.append((name, Line(issued, served, skipped, int(since), int(last), returned)))
        issued = int(item.get("n", {}).get("N", 0))
        return LimiterState(
            grants=int(item.get("g", {}).get("N", 0)),
            issued=max([issued, *(line.issued for _, line in lines)]),
            changes=int(item.get("c", {}).get("N", 0)),
            slots=tuple(slots),
            lines=tuple(sorted(lines)),
            last_turn_ms=int(item.get("p", {}).get("N", 0)),
        )


def _rest(line: Line) -> str:
    """A line's ``l:`` attribute: what is neither its next ticket nor its served mark."""
    skipped = [list(r) for r in line.skipped]
    return json.dumps([line.since_ms, line.last_grant, skipped, list(line.returned)], separators=(",", ":"))
