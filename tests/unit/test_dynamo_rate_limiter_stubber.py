"""The exact DynamoDB requests the shared key's queue sends, and how a failed condition's returned item is
used: one conditional UpdateItem per decision, never a read."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from dalle_plugin.adapters.dynamo_rate_limiter import DynamoRateLimiter, encode_state
from dalle_plugin.domain.errors import RateLimiterBusy, StorageUnavailable
from dalle_plugin.domain.rate_limit import LimiterSettings, LimiterState, Send, Waiter
from dalle_plugin.ports import RateAsk, RateDecision

TABLE = "rate-limit"
SETTINGS = LimiterSettings(limit=2, window_s=60, skew_margin_ms=250, short_wait_ms=0)
NOW = 1_760_000_000_000
ASK = RateAsk(run_id="run-a#g0", ticket="run-a#1", accepted_ms=NOW - 5_000, org_id="org-1", interactive=True)


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


class Clock:
    def __init__(self, now: int = NOW):
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def naps(clock) -> list[float]:
    return []


@pytest.fixture
def limiter(client, naps, clock) -> DynamoRateLimiter:
    def sleep(seconds: float) -> None:
        naps.append(seconds)
        clock.now += round(seconds * 1000)

    return DynamoRateLimiter(client, TABLE, SETTINGS, clock=clock, sleep=sleep, jitter=lambda: 0.5)


def write(version: int, state: LimiterState) -> dict[str, Any]:
    names = {"#v": "v", "#state": "state"}
    values = {":next": {"N": str(version + 1)}, ":state": {"S": encode_state(state)}}
    if version == 0:
        condition = "attribute_not_exists(#pk)"
        names["#pk"] = "pk"
    else:
        condition = "#v = :version"
        values[":version"] = {"N": str(version)}
    return {
        "TableName": TABLE,
        "Key": {"pk": {"S": "global"}},
        "UpdateExpression": "SET #v = :next, #state = :state",
        "ConditionExpression": condition,
        "ExpressionAttributeNames": names,
        "ExpressionAttributeValues": values,
        "ReturnValues": "NONE",
        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    }


def item(version: int, state: LimiterState) -> dict[str, Any]:
    return {"pk": {"S": "global"}, "v": {"N": str(version)}, "state": {"S": encode_state(state)}}


def lost(stubber: Stubber, expected: dict[str, Any], current: dict[str, Any] | None) -> None:
    response: dict[str, Any] = {"Error": {"Code": "ConditionalCheckFailedException", "Message": "lost"}}
    if current is not None:
        response["Item"] = current
    stubber.add_client_error(
        "update_item",
        service_error_code="ConditionalCheckFailedException",
        service_message="lost",
        http_status_code=400,
        expected_params=expected,
        response_meta=None,
        modeled_fields={"Item": current} if current else None,
    )


def granted_to_a(at: int = NOW) -> LimiterState:
    return LimiterState(sends=(Send(at, "run-a#1", "org-1", True),))


def test_the_first_claim_creates_the_item_with_one_write(limiter, stubber):
    stubber.add_response("update_item", {}, write(0, granted_to_a()))
    assert limiter.acquire(ASK) == RateDecision(granted=True, start_at_ms=NOW, position=0, calls=1)


def test_the_item_written_is_small_and_readable():
    state = LimiterState(
        sends=(Send(NOW, "run-a#1", "org-1", True),),
        queue=(Waiter("run-b#g0", NOW - 1, "org-2", False, NOW + 60_250),),
    )
    assert encode_state(state) == (
        '{"s":[[1760000000000,"run-a#1","org-1",1]],"q":[["run-b#g0",1759999999999,"org-2",0,1760000060250]]}'
    )


def test_a_stale_view_loses_once_and_the_claim_is_made_from_the_returned_item(limiter, stubber):
    other = LimiterState(sends=(Send(NOW - 10, "run-x#1", "org-2", False),))
    lost(stubber, write(0, granted_to_a()), item(7, other))
    after = LimiterState(sends=other.sends + granted_to_a().sends)
    stubber.add_response("update_item", {}, write(7, after))
    assert limiter.acquire(ASK) == RateDecision(granted=True, start_at_ms=NOW, position=0, calls=2)


def test_a_full_window_queues_the_run_and_says_when_its_turn_comes(limiter, stubber):
    full = LimiterState(
        sends=(Send(NOW - 2_000, "x#1", "org-2", True), Send(NOW - 1_000, "y#1", "org-2", True))
    )
    lost(stubber, write(0, granted_to_a()), item(3, full))
    turn = NOW - 2_000 + 60_250
    queued = LimiterState(sends=full.sends, queue=(Waiter("run-a#g0", NOW - 5_000, "org-1", True, turn),))
    stubber.add_response("update_item", {}, write(3, queued))
    assert limiter.acquire(ASK) == RateDecision(granted=False, start_at_ms=turn, position=0, calls=2)


def test_a_turn_a_short_while_away_is_waited_for_in_place_then_claimed(client, stubber, clock, naps):
    limiter = DynamoRateLimiter(
        client,
        TABLE,
        SETTINGS.model_copy(update={"short_wait_ms": 3_000}),
        clock=clock,
        sleep=lambda s: (naps.append(s), setattr(clock, "now", clock.now + round(s * 1000))),
    )
    full = LimiterState(
        sends=(Send(NOW - 60_000, "x#1", "org-2", True), Send(NOW - 59_000, "y#1", "org-2", True))
    )
    lost(stubber, write(0, granted_to_a()), item(3, full))
    turn = NOW - 60_000 + 60_250
    queued = LimiterState(sends=full.sends, queue=(Waiter("run-a#g0", NOW - 5_000, "org-1", True, turn),))
    stubber.add_response("update_item", {}, write(3, queued))
    claimed = LimiterState(sends=(full.sends[1], Send(turn, "run-a#1", "org-1", True)))
    stubber.add_response("update_item", {}, write(4, claimed))  # from the view it wrote: no read
    assert limiter.acquire(ASK) == RateDecision(granted=True, start_at_ms=turn, position=0, calls=3)
    assert naps == [0.25]


def test_a_redelivered_claim_with_the_same_ticket_claims_nothing_more(limiter, stubber):
    stubber.add_response("update_item", {}, write(0, granted_to_a()))
    assert limiter.acquire(ASK).granted
    stubber.add_response("update_item", {}, write(1, granted_to_a()))  # confirms, changes nothing
    assert limiter.acquire(ASK) == RateDecision(granted=True, start_at_ms=NOW, position=0, calls=1)


def test_a_run_past_the_cap_is_refused_without_joining(client, stubber, clock):
    limiter = DynamoRateLimiter(
        client, TABLE, SETTINGS.model_copy(update={"max_queue_wait_s": 30}), clock=clock
    )
    full = LimiterState(
        sends=(Send(NOW - 2_000, "x#1", "org-2", True), Send(NOW - 1_000, "y#1", "org-2", True))
    )
    lost(stubber, write(0, granted_to_a()), item(3, full))
    decision = limiter.acquire(ASK)  # refused on the item the lost write returned: nothing written
    assert decision.refused and not decision.granted and decision.start_at_ms == NOW - 2_000 + 60_250
    assert decision.calls == 1


def test_leaving_removes_the_run_with_one_write(limiter, stubber):
    waiting = LimiterState(
        sends=granted_to_a().sends, queue=(Waiter("run-b#g0", NOW, "org-2", False, NOW + 9),)
    )
    lost(stubber, write(0, LimiterState()), item(5, waiting))
    stubber.add_response("update_item", {}, write(5, LimiterState(sends=waiting.sends)))
    limiter.leave("run-b#g0")


def test_leaving_a_queue_the_run_is_not_in_writes_nothing_more(limiter, stubber):
    lost(stubber, write(0, LimiterState()), item(5, granted_to_a()))
    limiter.leave("run-b#g0")


def test_a_fresh_view_that_keeps_losing_backs_off_then_gives_up(client, stubber, naps):
    limiter = DynamoRateLimiter(
        client, TABLE, SETTINGS, clock=lambda: NOW, sleep=naps.append, jitter=lambda: 0.5, max_attempts=3
    )
    other = LimiterState(sends=(Send(NOW - 10, "run-x#1", "org-2", False),))
    after = LimiterState(sends=other.sends + granted_to_a().sends)
    lost(stubber, write(0, granted_to_a()), item(7, other))
    lost(stubber, write(7, after), item(7, other))  # (a rival wrote the same version number: contention)
    lost(stubber, write(7, after), item(7, other))
    with pytest.raises(RateLimiterBusy):
        limiter.acquire(ASK)
    assert naps == [0.01, 0.02]


def test_any_other_dynamodb_error_is_storage_unavailable(limiter, stubber):
    stubber.add_client_error(
        "update_item", service_error_code="ProvisionedThroughputExceededException", http_status_code=400
    )
    with pytest.raises(StorageUnavailable):
        limiter.acquire(ASK)
