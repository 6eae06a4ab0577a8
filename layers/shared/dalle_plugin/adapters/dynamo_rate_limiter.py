"""The shared key's queue in one DynamoDB item (table key ``pk`` (S) only).

Item ``{pk: <key>, v: N, state: S}``: ``v`` counts the writes, ``state`` is the compact JSON of
``domain.rate_limit.LimiterState`` (the last ``limit`` sends and the runs waiting, about 60 bytes each),
so the item stays small whatever the history: a cancelled or finished run leaves nothing behind.

Every decision is one conditional UpdateItem (``SET v, state`` only if ``v`` is still the version the
decision was computed from; ``attribute_not_exists(pk)`` for the first), and never a read: the last item
seen is kept per adapter instance (one per Lambda container), and a write from a stale view fails and
returns the current item (``ReturnValuesOnConditionCheckFailure=ALL_OLD``), from which the decision is
computed again and written. A claim is therefore the write itself: it is granted only if the window
allowed it in the state it replaced. A write from the fresh item that still loses means real contention:
the caller backs off with jitter, so a burst spreads out instead of hammering the item in lockstep.

A turn at most ``short_wait_ms`` away is waited for here, then claimed, with no write in between once
the run is in the stored queue. A longer wait (the caller goes to sleep in a Wait state) or a refusal is
only answered from a state confirmed by this call (a successful write, or the item a failed one
returned), so no run sleeps on a stale view.
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
    Ask,
    LimiterSettings,
    LimiterState,
    Send,
    Waiter,
    decide,
    leave,
)
from dalle_plugin.ports import RateAsk, RateDecision

CONDITION_FAILED = "ConditionalCheckFailedException"


def _storage_error(error: Exception) -> StorageUnavailable:
    return StorageUnavailable(
        f"The image request queue could not be reached ({type(error).__name__}); the run will try again."
    )


def _is_condition_failure(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") == CONDITION_FAILED


def encode_state(state: LimiterState) -> str:
    sends = [[s.at_ms, s.ticket, s.org, int(s.interactive)] for s in state.sends]
    queue = [[w.run_id, w.accepted_ms, w.org, int(w.interactive), w.eta_ms] for w in state.queue]
    return json.dumps({"s": sends, "q": queue}, separators=(",", ":"))


def decode_state(text: str) -> LimiterState:
    raw = json.loads(text)
    return LimiterState(
        sends=tuple(Send(int(at), ticket, org, bool(i)) for at, ticket, org, i in raw.get("s", [])),
        queue=tuple(
            Waiter(run_id, int(acc), org, bool(i), int(eta)) for run_id, acc, org, i, eta in raw.get("q", [])
        ),
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
        self._version = 0
        self._state = LimiterState()
        #: DynamoDB calls made by this instance (the benchmark's writes-per-grant figure)
        self.calls = 0

    def acquire(self, ask: RateAsk) -> RateDecision:
        rule_ask = Ask(
            ask.run_id, ask.ticket, ask.accepted_ms, ask.org_id or "", ask.interactive, ask.may_refuse
        )
        calls = contended = 0
        fresh = False  # whether the state in hand was confirmed by this call
        waited_ms = 0
        joined = False  # whether the stored queue is known to hold this run
        for _ in range(self._max_attempts):
            now = self._clock()
            answer = decide(self._state, rule_ask, now, self._settings)
            short = (
                not (answer.granted or answer.refused)
                and answer.start_at_ms - now <= self._settings.short_wait_ms
            )
            joined = joined or (fresh and any(w.run_id == ask.run_id for w in self._state.queue))
            # A grant is always written (it is the claim). A short wait in place needs no write once the run
            # is in the stored queue: it decides again after it. A long wait or a refusal is only given
            # from a confirmed state, so no run sleeps on a stale view.
            must_write = answer.granted or (not joined if short else (answer.changed or not fresh))
            if must_write and (answer.changed or not fresh):
                calls += 1
                if not self._write(answer.state):
                    # a stale view is expected to lose once; a fresh one that loses met real contention
                    if fresh:
                        contended += 1
                        self._back_off(contended)
                    fresh = True
                    continue
                fresh = True
            if answer.granted or answer.refused:
                return RateDecision(
                    answer.granted, answer.start_at_ms, answer.position, answer.refused, calls
                )
            wait_ms = answer.start_at_ms - now
            if short and waited_ms < 2 * self._settings.short_wait_ms:
                self._sleep(wait_ms / 1000)  # the turn is close: wait for it here rather than in a Wait state
                waited_ms += wait_ms
                fresh = False
                continue
            return RateDecision(False, answer.start_at_ms, answer.position, False, calls)
        raise RateLimiterBusy(
            "Too many runs asked for the shared key at the same moment; the run will try again shortly."
        )

    def leave(self, run_id: str) -> None:
        fresh = False
        for _ in range(self._max_attempts):
            remaining = leave(self._state, run_id)
            if remaining == self._state and fresh:
                return
            if self._write(remaining):
                return
            fresh = True
        raise RateLimiterBusy("The image request queue was too busy to take the run out; try again shortly.")

    def _write(self, state: LimiterState) -> bool:
        """One conditional write of ``state`` over the version in hand; on losing, take the current item."""
        self.calls += 1
        try:
            self._client.update_item(**self.write_request(self._version, state))
        except ClientError as error:
            if not _is_condition_failure(error):
                raise _storage_error(error) from error
            self._version, self._state = self.from_item(error.response.get("Item"))
            return False
        except BotoCoreError as error:
            raise _storage_error(error) from error
        self._version, self._state = self._version + 1, state
        return True

    def _back_off(self, attempt: int) -> None:
        ceiling_ms = min(self._backoff_cap_ms, self._backoff_base_ms * 2 ** (attempt - 1))
        self._sleep(self._jitter() * ceiling_ms / 1000)

    # ---- wire format ---------------------------------------------------------------------------------

    def write_request(self, version: int, state: LimiterState) -> dict[str, Any]:
        names = {"#v": "v", "#state": "state"}
        values = {":next": {"N": str(version + 1)}, ":state": {"S": encode_state(state)}}
        if version == 0:
            condition = "attribute_not_exists(#pk)"
            names["#pk"] = "pk"
        else:
            condition = "#v = :version"
            values[":version"] = {"N": str(version)}
        return {
            "TableName": self._table,
            "Key": {"pk": {"S": self._key}},
            "UpdateExpression": "SET #v = :next, #state = :state",
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
            "ReturnValues": "NONE",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }

    @staticmethod
    def from_item(item: dict[str, Any] | None) -> tuple[int, LimiterState]:
        if not item:
            return 0, LimiterState()
        return int(item["v"]["N"]), decode_state(item["state"]["S"])


def item_bytes(state: LimiterState, key: str = "global") -> int:
    """Roughly what DynamoDB bills for the item: attribute names and values."""
    return len("pk") + len(key) + len("v") + 8 + len("state") + len(encode_state(state).encode())
