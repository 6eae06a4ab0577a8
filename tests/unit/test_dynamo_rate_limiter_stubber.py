"""The exact DynamoDB requests the limiters send, and how a failed condition's returned item is used."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from dalle_plugin.adapters.dynamo_rate_limiter import DynamoRateLimiter, FixedWindowRateLimiter
from dalle_plugin.domain.errors import RateLimiterBusy, StorageUnavailable
from dalle_plugin.domain.rate_limit import LimiterSettings
from dalle_plugin.ports import RateDecision

TABLE = "rate-limit"
SETTINGS = LimiterSettings(limit=5, window_s=60, skew_margin_ms=250)
UPDATE = "SET #issued = :issued_after, #start = :start, #ticket = :ticket"
NOW = 1_760_000_000_000


@pytest.fixture
def client():
    return boto3.client(
        "dynamodb", region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )


@pytest.fixture
def stubber(client):
    with Stubber(client) as stub:
        yield stub
        stub.assert_no_pending_responses()


@pytest.fixture
def naps() -> list[float]:
    return []


@pytest.fixture
def limiter(client, naps) -> DynamoRateLimiter:
    return DynamoRateLimiter(client, TABLE, SETTINGS, sleep=naps.append, jitter=lambda: 0.5)


def booking(slot: int, issued_before: int, start: int, ticket: str, key: str = "global") -> dict[str, Any]:
    request = {
        "TableName": TABLE,
        "Key": {"pk": {"S": key}},
        "UpdateExpression": UPDATE,
        "ExpressionAttributeNames": {
            "#issued": "issued",
            "#start": f"start_{slot}",
            "#ticket": f"ticket_{slot}",
        },
        "ExpressionAttributeValues": {
            ":issued_after": {"N": str(issued_before + 1)},
            ":start": {"N": str(start)},
            ":ticket": {"S": ticket},
        },
        "ReturnValues": "NONE",
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }
    if issued_before == 0:
        request["ConditionExpression"] = "attribute_not_exists(#pk)"
        request["ExpressionAttributeNames"]["#pk"] = "pk"
    else:
        request["ConditionExpression"] = "#issued = :issued_before"
        request["ExpressionAttributeValues"][":issued_before"] = {"N": str(issued_before)}
    return request


def item(issued: int, starts: dict[int, int], key: str = "global") -> dict[str, Any]:
    """A stored item whose ticket ``m`` is named ``t<m>`` and starts at ``starts[m]``."""
    stored: dict[str, Any] = {"pk": {"S": key}, "issued": {"N": str(issued)}}
    for index, start in starts.items():
        stored[f"start_{index % 5}"] = {"N": str(start)}
        stored[f"ticket_{index % 5}"] = {"S": f"t{index}"}
    return stored


def condition_failed(stubber: Stubber, expected: dict[str, Any], returned_item: dict[str, Any] | None):
    stubber.add_client_error(
        "update_item",
        service_error_code="ConditionalCheckFailedException",
        service_message="The conditional request failed",
        http_status_code=400,
        modeled_fields={"Item": returned_item} if returned_item is not None else None,
        expected_params=expected,
    )


def test_first_booking_ever_creates_the_item(limiter, stubber):
    stubber.add_response("update_item", {}, booking(slot=0, issued_before=0, start=NOW, ticket="run-a#1"))
    decision = limiter.acquire("run-a#1", NOW)
    assert decision == RateDecision(start_at_ms=NOW, reserved=True, position=0, calls=1)


def test_a_warm_container_books_with_one_call_from_what_it_last_wrote(limiter, stubber):
    stubber.add_response("update_item", {}, booking(0, 0, NOW, "run-a#1"))
    stubber.add_response("update_item", {}, booking(1, 1, NOW + 5, "run-b#1"))
    limiter.acquire("run-a#1", NOW)
    assert limiter.acquire("run-b#1", NOW + 5).calls == 1


def test_a_cold_container_learns_the_item_from_its_failed_first_write(limiter, stubber, naps):
    # Seven tickets so far; tickets 2..6 all started at NOW - 1000: the window is full until
    # NOW - 1000 + 60_000 + 250, which ticket 7 (slot 2, the slot of ticket 2) gets.
    stored = item(7, {m: NOW - 1000 for m in range(2, 7)})
    condition_failed(stubber, booking(0, 0, NOW, "run-c#1"), stored)
    stubber.add_response("update_item", {}, booking(2, 7, NOW + 59_250, "run-c#1"))
    decision = limiter.acquire("run-c#1", NOW)
    assert decision == RateDecision(start_at_ms=NOW + 59_250, reserved=True, position=0, calls=2)
    assert naps == []  # a stale view is not contention: no back-off


def test_a_conflicting_writer_makes_it_recompute_from_the_fresh_item(limiter, stubber, naps):
    stubber.add_response("update_item", {}, booking(0, 0, NOW, "t0"))
    limiter.acquire("t0", NOW)
    # meanwhile other containers booked tickets 1..5; ticket 5 already waits for ticket 0's slot
    fresh = item(6, {1: NOW, 2: NOW, 3: NOW, 4: NOW, 5: NOW + 60_250})
    condition_failed(stubber, booking(1, 1, NOW + 10, "t6"), fresh)
    stubber.add_response("update_item", {}, booking(1, 6, NOW + 60_250, "t6"))
    decision = limiter.acquire("t6", NOW + 10)
    assert decision == RateDecision(start_at_ms=NOW + 60_250, reserved=True, position=1, calls=2)


def test_only_a_fresh_write_that_loses_backs_off_with_jitter(limiter, stubber, naps):
    condition_failed(stubber, booking(0, 0, NOW, "t5"), item(1, {0: NOW}))  # stale first view: no sleep
    condition_failed(stubber, booking(1, 1, NOW, "t5"), item(2, {0: NOW, 1: NOW}))  # lost: sleep
    # the 10 ms slept move "now" on: the booking is for when it is made
    condition_failed(stubber, booking(2, 2, NOW + 10, "t5"), item(3, {0: NOW, 1: NOW, 2: NOW}))  # stale: slept
    condition_failed(stubber, booking(3, 3, NOW + 10, "t5"), item(4, {0: NOW, 1: NOW, 2: NOW, 3: NOW}))  # lost
    condition_failed(stubber, booking(4, 4, NOW + 30, "t5"), item(5, {m: NOW for m in range(5)}))  # stale
    stubber.add_response("update_item", {}, booking(0, 5, NOW + 60_250, "t5"))
    assert limiter.acquire("t5", NOW).calls == 6
    assert naps == [0.010, 0.020]  # jitter 0.5 of 20 ms, then of 40 ms


def test_a_ticket_already_booked_is_returned_not_booked_twice(limiter, stubber):
    # A Lambda retry of the same ticket: the failed write shows the ticket already holds ticket 3's slot.
    stored = item(4, {0: NOW, 1: NOW, 2: NOW, 3: NOW + 7})
    condition_failed(stubber, booking(0, 0, NOW + 9, "t3"), stored)
    decision = limiter.acquire("t3", NOW + 9)
    assert decision == RateDecision(start_at_ms=NOW + 7, reserved=True, position=0, calls=1)
    # and now that the container knows, asking again costs no call at all
    assert limiter.acquire("t3", NOW + 9).calls == 0


def test_an_item_that_vanished_is_created_again(limiter, stubber):
    stubber.add_response("update_item", {}, booking(0, 0, NOW, "t0"))
    limiter.acquire("t0", NOW)
    condition_failed(stubber, booking(1, 1, NOW, "t1"), None)  # the item was deleted meanwhile
    stubber.add_response("update_item", {}, booking(0, 0, NOW, "t1"))
    assert limiter.acquire("t1", NOW).calls == 2


def test_the_key_names_the_item(client, stubber):
    limiter = DynamoRateLimiter(client, TABLE, SETTINGS, key="bench-7")
    stubber.add_response("update_item", {}, booking(0, 0, NOW, "t0", key="bench-7"))
    limiter.acquire("t0", NOW)


def test_endless_conflicts_give_up_with_a_retryable_error(client, stubber, naps):
    limiter = DynamoRateLimiter(client, TABLE, SETTINGS, max_attempts=3, sleep=naps.append, jitter=lambda: 0.5)
    for issued, slept_ms in zip(range(3), (0, 0, 10)):
        stored = item(issued + 1, {m: NOW for m in range(issued + 1)})
        condition_failed(stubber, booking(issued, issued, NOW + slept_ms, "late"), stored)
    with pytest.raises(RateLimiterBusy):
        limiter.acquire("late", NOW)


def test_other_dynamodb_errors_are_storage_errors(limiter, stubber):
    stubber.add_client_error(
        "update_item", service_error_code="ProvisionedThroughputExceededException", http_status_code=400
    )
    with pytest.raises(StorageUnavailable):
        limiter.acquire("t0", NOW)


def test_an_item_written_for_another_limit_is_refused_clearly(limiter, stubber):
    stored = {"pk": {"S": "global"}, "issued": {"N": "9"}, "start_0": {"N": "1"}, "ticket_0": {"S": "x"}}
    condition_failed(stubber, booking(0, 0, NOW, "t9"), stored)
    with pytest.raises(ValueError, match="limit"):
        limiter.acquire("t9", NOW)


# ---- the naive baseline ----------------------------------------------------------------------------------


def fixed_request(window_index: int) -> dict[str, Any]:
    return {
        "TableName": TABLE,
        "Key": {"pk": {"S": f"fixed-window#{window_index}"}},
        "UpdateExpression": "SET #expires = :expires ADD #count :one",
        "ConditionExpression": "attribute_not_exists(#count) OR #count < :limit",
        "ExpressionAttributeNames": {"#count": "count", "#expires": "expires_at"},
        "ExpressionAttributeValues": {
            ":one": {"N": "1"},
            ":limit": {"N": "5"},
            ":expires": {"N": str((window_index + 2) * 60 + 1)},
        },
        "ReturnValues": "NONE",
    }


def test_fixed_window_counts_per_window_index(client, stubber):
    limiter = FixedWindowRateLimiter(client, TABLE, SETTINGS)
    window_index = NOW // 60_000
    stubber.add_response("update_item", {}, fixed_request(window_index))
    assert limiter.acquire("t0", NOW) == RateDecision(start_at_ms=NOW, reserved=True, calls=1)


def test_fixed_window_denial_says_ask_again_at_the_next_window(client, stubber):
    limiter = FixedWindowRateLimiter(client, TABLE, SETTINGS)
    window_index = NOW // 60_000
    stubber.add_client_error(
        "update_item",
        service_error_code="ConditionalCheckFailedException",
        http_status_code=400,
        expected_params=fixed_request(window_index),
    )
    decision = limiter.acquire("t5", NOW)
    assert decision == RateDecision(start_at_ms=(window_index + 1) * 60_000, reserved=False, calls=1)
