"""The shared key's queue in one DynamoDB item (table key ``pk`` (S) only).

Item ``{pk, g: N, c: N, n: N, q: S, t0..t{limit-1}: N, o0..o{limit-1}: S}``: ``g`` counts the grants,
``c`` the joins, leaves, skips and returns, ``n`` the tickets issued (a line made anew starts there), ``q`` is the compact JSON of the lines with runs waiting, and slot ``k`` holds the
last send granted in it (``t``: its clock reading, ``o``: its send ticket and line). The item stays small
whatever the history (``domain.rate_limit``).

Every decision is one conditional UpdateItem, never a read: ``g`` and ``c`` must still be what the decision
was computed from, and a grant also requires, in the condition itself, that the send ``limit`` grants
earlier lies ``window + margin`` behind (strict at the door whatever the caller believed). A write that
loses returns the current item (``ReturnValuesOnConditionCheckFailure=ALL_OLD``), from which the decision
is computed again.

A claim made from an older view (the run slept since) needs no read either: the order is a pure function
of the state, so if nothing but grants happened since the view (``c`` unchanged), the run knows which
grants came before its turn and writes the state that follows them, conditioned on ``g`` being the view's
plus that many. The slot it takes is fixed by its grant number, and its time is checked by the condition.
In a backlog that is one write per grant; a join, leave or skip since the view costs one more write.

A turn at most ``short_wait_ms`` away is waited for here, then claimed the same way: as if the runs ahead
in the state in hand had sent meanwhile, by one write that grants or brings the item back (it never
writes once to learn the state and again to claim). The write a join or leave since the view costs is
the one left above one write per grant: ``python -m bench.limiter``'s backlog, whose batches joined after
most runs had first looked, shows it (see ``docs/performance.md``).

A grant records the clock reading taken before its write. Right before the request leaves, the sender
asks ``confirm_send``: if more than ``send_tolerance_ms`` passed since that reading (a slow write, a step
starved of CPU), the send's slot is stamped again with the time now, by a write conditioned on the slot
still holding this send. Once the grant ``limit`` later has reused the slot, the send is no longer counted,
so it must not leave: the run claims again, and its ticket is returned to the head of its line. So the
recorded time a later grant is checked against is never more than the tolerance before the actual send.
The client is built before the claim, so a send leaves within the tolerance and the confirmation is a
look at the clock, not a write; the re-stamp is for a step held up in between (counted by the bench).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from dalle_plugin.domain.errors import RateLimiterBusy, StorageUnavailable
from dalle_plugin.domain.rate_limit import (
    LimiterSettings,
    LimiterState,
    Line,
    Slot,
    claim,
    join,
    leave,
    line_of,
    planned_starts,
    restamp,
    state_at_turn,
)
from dalle_plugin.ports import RateClaim, RateDecision, RateJoin

CONDITION_FAILED = "ConditionalCheckFailedException"
#: times a send late for its recorded time is stamped again before it gives its grant up (each stamp is a
#: write whose own round trip may make it late again on a starved machine)
MAX_RESTAMPS = 3


def _slot_owner(send: str, line: str) -> str:
    """A slot's ``o``: the send ticket and line of the grant it holds."""
    return json.dumps([send, line], separators=(",", ":"))


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
    """The whole state as a compact string (what a run keeps as its view), with when it was seen."""
    slots = [[s.at_ms, s.send, s.line] if s else None for s in state.slots]
    return json.dumps(
        {
            "g": state.grants,
            "c": state.changes,
            "n": state.issued,
            "s": slots,
            "q": json.loads(encode_lines(state)),
            "at": seen_ms,
        },
        separators=(",", ":"),
    )


def view_seen_ms(text: str) -> int:
    return int(json.loads(text).get("at", 0)) if text else 0


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
        slots=tuple(Slot(int(s[0]), s[1], s[2]) if s else None for s in raw["s"]),
        lines=_lines(raw["q"]),
    )


class DynamoRateLimiter:
    """``RateLimiter`` over one item (see the module doc)."""

    def __init__(
        self,
        client: Any,
        table_name: str,
        settings: LimiterSettings,
        key: str = "global",
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
        self._granted_slot = -1  # the slot of the last grant written from a predicted state
        #: DynamoDB calls made by this instance (the benchmark's writes-per-grant figure)
        self.calls = 0
        #: of them, sends stamped again because they were held up past the tolerance before leaving
        self.restamps = 0

    # ---- the port ------------------------------------------------------------------------------------

    def join(self, org_id: str, interactive: bool, count: int, may_refuse: bool = True) -> RateJoin:
        line = line_of(org_id, interactive)
        calls = 0
        for attempt in range(self._max_attempts):
            joined = join(self._state, line, count, self._clock(), self._settings, may_refuse)
            if joined.admitted == 0 and attempt > 0:  # refused on a state this call saw: nothing to write
                break
            calls += 1
            if self._write(self._state, joined.state):
                break
            if attempt > 0:
                self._back_off(attempt)
        else:
            raise RateLimiterBusy("Too many runs joined the shared key's queue at once; try again shortly.")
        return RateJoin(
            joined.first_ticket,
            joined.admitted,
            joined.starts_at_ms,
            joined.positions,
            encode_state(joined.state, self._clock()),
            calls,
        )

    def claim(self, ask: RateClaim) -> RateDecision:
        line = line_of(ask.org_id, ask.interactive)
        ticket, calls, waited_ms, contended = ask.ticket, 0, 0, 0
        confirmed = False  # whether the state in hand was seen by a write of this call
        stale = False  # whether this call slept in place since it last saw the state
        view = decode_state(ask.view) if ask.view else self._state
        predicted = state_at_turn(view, line, ticket, self._settings.limit)
        if predicted is not None and predicted.grants > view.grants:
            # the runs ahead in the view send no earlier than the view plans: wait for that, then claim as
            # if they had sent
            ahead = predicted.grants - view.grants
            turn = planned_starts(view, view_seen_ms(ask.view), self._settings, ahead + 1)[ahead]
            early_ms = turn - self._clock()
            if 0 < early_ms <= self._settings.short_wait_ms:
                self._sleep(early_ms / 1000)
                waited_ms += early_ms
            hoped = claim(predicted, line, ticket, ask.send, self._clock(), self._settings)
            if hoped.granted and early_ms <= self._settings.short_wait_ms:
                calls += 1
                if self._write(predicted, hoped.state):
                    self._state = LimiterState()  # the slots of the grants before it are not known here
                    return RateDecision(True, hoped.start_at_ms, 0, ticket, ask.view, calls, hoped.slot)
                confirmed = True
        if not confirmed:
            self._state = view
        attempts = 0
        while True:
            now = self._clock()
            answer = claim(self._state, line, ticket, ask.send, now, self._settings)
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
            if answer.changed:
                calls += 1
                stale = False
                if not self._write(self._state, answer.state):
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
            if stale:
                # slept in place since the state was seen: claim as if the runs ahead had sent meanwhile,
                # which is one write that either grants or brings the item back (never a read)
                calls += 1
                confirmed, stale = True, False
                if self._claim_after_those_ahead(line, ticket, ask.send, now):
                    self._state = LimiterState()  # the slots of the grants before it are not known here
                    return RateDecision(True, now, 0, ticket, ask.view, calls, self._granted_slot)
                continue
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

    def _claim_after_those_ahead(self, line: str, ticket: int, send: str, now_ms: int) -> bool:
        """The grant written on the state at ``ticket``'s turn if the runs ahead in the state in hand have
        sent; on losing, the item is in hand. A write either way (the item itself checks the window)."""
        predicted = state_at_turn(self._state, line, ticket, self._settings.limit)
        hoped = claim(predicted, line, ticket, send, now_ms, self._settings) if predicted else None
        if predicted is None or hoped is None or not hoped.granted:
            self._learn()
            return False
        self._granted_slot = hoped.slot
        return self._write(predicted, hoped.state)

    def _restamp(self, ask: RateClaim, slot: int, now_ms: int) -> bool:
        """The send in slot ``slot`` recorded at ``now_ms``, if the slot still holds it."""
        self.calls += 1
        self.restamps += 1
        try:
            self._client.update_item(
                TableName=self._table,
                Key={"pk": {"S": self._key}},
                UpdateExpression="SET #t = :t",
                ConditionExpression="#o = :o",
                ExpressionAttributeNames={"#t": f"t{slot}", "#o": f"o{slot}"},
                ExpressionAttributeValues={
                    ":t": {"N": str(now_ms)},
                    ":o": {"S": _slot_owner(ask.send, line_of(ask.org_id, ask.interactive))},
                },
            )
        except ClientError as error:
            if not _is_condition_failure(error):
                raise _storage_error(error) from error
            return False
        except BotoCoreError as error:
            raise _storage_error(error) from error
        return True

    def leave(self, org_id: str, interactive: bool, first_ticket: int, count: int = 1) -> None:
        line = line_of(org_id, interactive)
        fresh = False
        for attempt in range(self._max_attempts):
            remaining = leave(self._state, line, first_ticket, count, self._clock())
            if remaining == self._state and fresh:
                return
            if self._write(self._state, remaining):
                return
            fresh = True
            if attempt > 0:
                self._back_off(attempt)
        raise RateLimiterBusy("The image request queue was too busy to take the run out; try again shortly.")

    # ---- one conditional write -----------------------------------------------------------------------

    def _write(self, before: LimiterState, after: LimiterState) -> bool:
        """One conditional write taking the item from ``before`` to ``after``; on losing, take the item."""
        self.calls += 1
        try:
            self._client.update_item(**self.write_request(before, after))
        except ClientError as error:
            if not _is_condition_failure(error):
                raise _storage_error(error) from error
            self._state = self.from_item(error.response.get("Item"))
            return False
        except BotoCoreError as error:
            raise _storage_error(error) from error
        self._state = after
        return True

    def _learn(self) -> None:
        """The current item, by a conditional write that cannot succeed (it returns the item; no read)."""
        self.calls += 1
        try:
            self._client.update_item(
                TableName=self._table,
                Key={"pk": {"S": self._key}},
                UpdateExpression="SET #g = :never",
                ConditionExpression="#g = :never",
                ExpressionAttributeNames={"#g": "g"},
                ExpressionAttributeValues={":never": {"N": "-1"}},
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as error:
            if not _is_condition_failure(error):
                raise _storage_error(error) from error
            self._state = self.from_item(error.response.get("Item"))
        except BotoCoreError as error:
            raise _storage_error(error) from error

    def _back_off(self, attempt: int) -> None:
        ceiling_ms = min(self._backoff_cap_ms, self._backoff_base_ms * 2 ** (attempt - 1))
        self._sleep(self._jitter() * ceiling_ms / 1000)

    # ---- wire format ---------------------------------------------------------------------------------

    def write_request(self, before: LimiterState, after: LimiterState) -> dict[str, Any]:
        names = {"#g": "g", "#c": "c", "#q": "q", "#n": "n"}
        values: dict[str, Any] = {
            ":g1": {"N": str(after.grants)},
            ":c1": {"N": str(after.changes)},
            ":q": {"S": encode_lines(after)},
            ":n": {"N": str(after.issued)},
        }
        sets = ["#g = :g1", "#c = :c1", "#q = :q", "#n = :n"]
        if before.grants == 0 and before.changes == 0:
            conditions = ["attribute_not_exists(#g)"]
        else:
            conditions = ["#g = :g0", "#c = :c0"]
            values[":g0"] = {"N": str(before.grants)}
            values[":c0"] = {"N": str(before.changes)}
        if after.grants > before.grants:  # a grant: its slot, and the window checked by the item itself
            limit = self._settings.limit
            k = before.grants % limit
            slot = after.slots[k]
            if slot is None:
                raise ValueError("a grant's state has no slot for it")  # a bug in decide(), never the wire
            names["#t"], names["#o"] = f"t{k}", f"o{k}"
            values[":t"] = {"N": str(slot.at_ms)}
            values[":o"] = {"S": _slot_owner(slot.send, slot.line)}
            values[":cutoff"] = {"N": str(slot.at_ms - self._settings.spacing_ms)}
            sets += ["#t = :t", "#o = :o"]
            conditions.append("(attribute_not_exists(#t) OR #t <= :cutoff)")
        return {
            "TableName": self._table,
            "Key": {"pk": {"S": self._key}},
            "UpdateExpression": "SET " + ", ".join(sets),
            "ConditionExpression": " AND ".join(conditions),
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
            "ReturnValues": "NONE",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }

    def from_item(self, item: dict[str, Any] | None) -> LimiterState:
        if not item or "g" not in item:
            return LimiterState()
        limit = self._settings.limit
        slots: list[Slot | None] = []
        for k in range(limit):
            if f"t{k}" in item:
                send, line = json.loads(item[f"o{k}"]["S"])
                slots.append(Slot(int(item[f"t{k}"]["N"]), send, line))
            else:
                slots.append(None)
        return LimiterState(
            grants=int(item["g"]["N"]),
            issued=int(item.get("n", {}).get("N", 0)),
            changes=int(item["c"]["N"]),
            slots=tuple(slots),
            lines=_lines(json.loads(item["q"]["S"])),
        )


def item_bytes(state: LimiterState, key: str = "global") -> int:
    """Roughly what DynamoDB bills for the item: attribute names and values."""
    slots = sum(2 + 13 + len(json.dumps([s.send, s.line])) for s in state.slots if s)
    return len("pk") + len(key) + 3 * (1 + 8) + 1 + len(encode_lines(state).encode()) + slots
