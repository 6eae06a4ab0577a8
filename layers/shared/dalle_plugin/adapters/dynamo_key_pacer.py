"""Own keys' pacing state in the rate-limit table (key ``pk`` (S) only), one item per key.

Item ``{pk: "key#<fingerprint>", v: N, pace: S}``: the fingerprint is ``domain.key_pacing.key_fingerprint``
(one-way; the key itself is never stored or logged), ``v`` counts the writes and ``pace`` is the compact
JSON of ``domain.key_pacing.KeyPace`` (the limit, the last ``limit`` sends, a block time, a learned margin):
small and bounded whatever the history.

As for the shared key's queue (``adapters/dynamo_rate_limiter.py``), every decision is one conditional
UpdateItem (``SET`` only if ``v`` is still the version it was computed from) and never a read: the last
item seen is kept per key in this instance (one per Lambda container), and a write from a stale view fails
and returns the current item (``ReturnValuesOnConditionCheckFailure=ALL_OLD``), from which the decision is
made again. A claim is the write itself. A wait is only answered from a state confirmed by this call (so
no run sleeps on a stale view): a view not yet confirmed is confirmed by writing it back under its
version.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from dalle_plugin.domain.errors import RateLimiterBusy, StorageUnavailable
from dalle_plugin.domain.key_pacing import KeyPace, KeyPaceSettings, Observation, claim, learn
from dalle_plugin.image_generation import PaceDecision

CONDITION_FAILED = "ConditionalCheckFailedException"
#: keys whose state one instance keeps (a warm Lambda mostly serves one key at a time)
_KEYS_KEPT = 8


def encode_pace(state: KeyPace) -> str:
    raw = {
        "l": state.limit,
        "b": state.blocked_until_ms,
        "m": state.extra_margin_ms,
        "s": [[at, tag] for at, tag in state.sends],
    }
    return json.dumps(raw, separators=(",", ":"))


def decode_pace(text: str) -> KeyPace:
    raw = json.loads(text)
    return KeyPace(
        limit=raw.get("l"),
        sends=tuple((int(at), str(tag)) for at, tag in raw.get("s", [])),
        blocked_until_ms=int(raw.get("b", 0)),
        extra_margin_ms=int(raw.get("m", 0)),
    )


def _storage_error(error: Exception) -> StorageUnavailable:
    return StorageUnavailable(
        f"The own key's pacing state could not be reached ({type(error).__name__}); the run will try again."
    )


class DynamoKeyPacer:
    """``KeyPacer`` over one item per key (see the module doc)."""

    def __init__(
        self,
        client: Any,
        table_name: str,
        settings: KeyPaceSettings,
        *,
        clock: Callable[[], int] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
        max_attempts: int = 60,
        backoff_base_ms: float = 20.0,
        backoff_cap_ms: float = 400.0,
    ):
        self._client = client
        self._table = table_name
        self._settings = settings
        self._clock = clock or (lambda: time.time_ns() // 1_000_000)
        self._sleep = sleep
        self._jitter = jitter
        self._max_attempts = max_attempts
        self._backoff_base_ms = backoff_base_ms
        self._backoff_cap_ms = backoff_cap_ms
        self._seen: dict[str, tuple[int, KeyPace]] = {}
        #: DynamoDB calls made by this instance
        self.calls = 0

    def claim(self, key_id: str, ticket: str) -> PaceDecision:
        calls = contended = 0
        fresh = False  # whether the state in hand was confirmed by this call
        waited_ms = 0
        for _ in range(self._max_attempts):
            now = self._clock()
            _, state = self._seen.get(key_id, (0, KeyPace()))
            answer = claim(state, ticket, now, self._settings)
            if answer.granted and not answer.changed:
                return PaceDecision(True, now, calls)
            if answer.granted or not fresh:
                calls += 1
                if not self._write(key_id, answer.state):
                    if fresh:  # a fresh view that loses met real contention: spread out
                        contended += 1
                        self._back_off(contended)
                    fresh = True
                    continue
                fresh = True
                if answer.granted:
                    return PaceDecision(True, now, calls)
            wait_ms = answer.start_at_ms - now
            if wait_ms <= self._settings.short_wait_ms and waited_ms < 2 * self._settings.short_wait_ms:
                self._sleep(wait_ms / 1000)  # the slot is close: wait for it here rather than in a Wait state
                waited_ms += wait_ms
                fresh = False
                continue
            return PaceDecision(False, answer.start_at_ms, calls)
        raise RateLimiterBusy(
            "Too many runs of this OpenAI key asked at the same moment; the run will try again."
        )

    def learn(self, key_id: str, ticket: str, observation: Observation) -> None:
        for attempt in range(1, self._max_attempts + 1):
            _, state = self._seen.get(key_id, (0, KeyPace()))
            learned = learn(state, ticket, observation, self._clock(), self._settings)
            if learned == state and key_id in self._seen:
                return  # nothing new (a stale view only misses what another answer already taught)
            if self._write(key_id, learned):
                return
            if attempt > 1:
                self._back_off(attempt - 1)
        raise RateLimiterBusy("Too many runs of this OpenAI key wrote at the same moment.")

    def _write(self, key_id: str, state: KeyPace) -> bool:
        """One conditional write of ``state`` over the version in hand; on losing, take the current item."""
        version, _ = self._seen.get(key_id, (0, KeyPace()))
        self.calls += 1
        try:
            self._client.update_item(**self.write_request(key_id, version, state))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != CONDITION_FAILED:
                raise _storage_error(error) from error
            self._keep(key_id, *self.from_item(error.response.get("Item")))
            return False
        except BotoCoreError as error:
            raise _storage_error(error) from error
        self._keep(key_id, version + 1, state)
        return True

    def _keep(self, key_id: str, version: int, state: KeyPace) -> None:
        self._seen.pop(key_id, None)
        self._seen[key_id] = (version, state)
        while len(self._seen) > _KEYS_KEPT:
            self._seen.pop(next(iter(self._seen)))

    def _back_off(self, attempt: int) -> None:
        ceiling_ms = min(self._backoff_cap_ms, self._backoff_base_ms * 2 ** (attempt - 1))
        self._sleep(self._jitter() * ceiling_ms / 1000)

    # ---- wire format ---------------------------------------------------------------------------------

    def write_request(self, key_id: str, version: int, state: KeyPace) -> dict[str, Any]:
        names = {"#v": "v", "#pace": "pace"}
        values = {":next": {"N": str(version + 1)}, ":pace": {"S": encode_pace(state)}}
        if version == 0:
            condition = "attribute_not_exists(#pk)"
            names["#pk"] = "pk"
        else:
            condition = "#v = :version"
            values[":version"] = {"N": str(version)}
        return {
            "TableName": self._table,
            "Key": {"pk": {"S": f"key#{key_id}"}},
            "UpdateExpression": "SET #v = :next, #pace = :pace",
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
            "ReturnValues": "NONE",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }

    @staticmethod
    def from_item(item: dict[str, Any] | None) -> tuple[int, KeyPace]:
        if not item or "pace" not in item:
            return 0, KeyPace()
        return int(item["v"]["N"]), decode_pace(item["pace"]["S"])
