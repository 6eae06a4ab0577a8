"""Baseline: the naive fixed-window counter (one item per window index), for the benchmark and the race
test. Not used by the product."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from bench.baselines.reservation_limiter import (
    LimiterSettings,
    RateDecision,
    _is_condition_failure,
    _storage_error,
)


class FixedWindowRateLimiter:
    """The naive per-window counter (one item per window index, ``ADD count`` while ``count < limit``).

    Kept only as the baseline the benchmark compares against: it lets ``2 * limit`` requests through
    around a window boundary (``limit`` at the end of one window, ``limit`` at the start of the next).
    A denial says to ask again when the next window begins (``reserved=False``).
    """

    def __init__(self, client: Any, table_name: str, settings: LimiterSettings, key: str = "fixed-window"):
        self._client = client
        self._table = table_name
        self._settings = settings
        self._key = key

    def request(self, window_index: int) -> dict[str, Any]:
        window_ms = self._settings.window_ms
        return {
            "TableName": self._table,
            "Key": {"pk": {"S": f"{self._key}#{window_index}"}},
            "UpdateExpression": "SET #expires = :expires ADD #count :one",
            "ConditionExpression": "attribute_not_exists(#count) OR #count < :limit",
            "ExpressionAttributeNames": {"#count": "count", "#expires": "expires_at"},
            "ExpressionAttributeValues": {
                ":one": {"N": "1"},
                ":limit": {"N": str(self._settings.limit)},
                # for a TTL rule: gone a window after its window ended
                ":expires": {"N": str((window_index + 2) * window_ms // 1000 + 1)},
            },
            "ReturnValues": "NONE",
        }

    def release(self, ticket: str, now_ms: int, start_at_ms: int) -> None:
        """Nothing to give back: a fixed window books nothing ahead."""

    def acquire(self, ticket: str, now_ms: int) -> RateDecision:
        window_index = now_ms // self._settings.window_ms
        try:
            self._client.update_item(**self.request(window_index))
        except ClientError as error:
            if not _is_condition_failure(error):
                raise _storage_error(error) from error
            next_window_ms = (window_index + 1) * self._settings.window_ms
            return RateDecision(start_at_ms=next_window_ms, reserved=False, position=0, calls=1)
        except BotoCoreError as error:
            raise _storage_error(error) from error
        return RateDecision(start_at_ms=now_ms, reserved=True, position=0, calls=1)
