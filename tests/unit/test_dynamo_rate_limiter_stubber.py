"""The exact DynamoDB requests the shared key's queue sends, and how a failed condition's returned item is
used: one conditional UpdateItem per decision, never a read; a claim from an old view is one write."""

from __future__ import annotations

from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from dalle_plugin.adapters.dynamo_rate_limiter import DynamoRateLimiter, encode_state
from dalle_plugin.domain.errors import StorageUnavailable
from dalle_plugin.domain.rate_limit import (
    LimiterSettings,
    LimiterState,
    claim,
    join,
    leave,
    line_of,
    state_at_turn,
)
from dalle_plugin.ports import RateClaim

TABLE = "rate-limit"
SETTINGS = LimiterSettings(limit=2, window_s=60, skew_margin_ms=250, wake_lead_ms=0, short_wait_ms=0)
NOW = 1_760_000_000_000
LINE = line_of("org-1", False)


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
def limiter(client, clock) -> DynamoRateLimiter:
    return DynamoRateLimiter(client, TABLE, SETTINGS, clock=clock, sleep=lambda s: None, jitter=lambda: 0.5)


def item(limiter: DynamoRateLimiter, state: LimiterState) -> dict[str, Any]:
    """The item as DynamoDB holds it after ``state`` was written."""
    request = limiter.write_request(LimiterState(), state)
    values = request["ExpressionAttributeValues"]
    stored = {
        "pk": {"S": "global"},
        "g": values[":g1"],
        "c": values[":c1"],
        "n": values[":n"],
        "q": values[":q"],
    }
    for k, slot in enumerate(state.slots):
        if slot is not None:
            stored[f"t{k}"] = {"N": str(slot.at_ms)}
            stored[f"o{k}"] = {"S": f'["{slot.send}","{slot.line}"]'}
    return stored


def lost(stubber: Stubber, expected: dict[str, Any], current: dict[str, Any] | None) -> None:
    stubber.add_client_error(
        "update_item",
        service_error_code="ConditionalCheckFailedException",
        service_message="lost",
        http_status_code=400,
        expected_params=expected,
        modeled_fields={"Item": current} if current else None,
    )


def test_a_batch_joins_its_line_with_one_write_that_creates_the_item(limiter, stubber):
    joined = join(LimiterState(), LINE, 3, NOW, SETTINGS)
    stubber.add_response("update_item", {}, limiter.write_request(LimiterState(), joined.state))
    answer = limiter.join("org-1", False, 3)
    assert (answer.first_ticket, answer.admitted, answer.calls) == (0, 3, 1)
    request = limiter.write_request(LimiterState(), joined.state)
    assert request["ConditionExpression"] == "attribute_not_exists(#g)"
    assert request["ExpressionAttributeValues"][":q"] == {"S": f'[["{LINE}",3,0,{NOW},-1,[]]]'}


def test_a_claim_from_an_old_view_is_one_write_conditioned_on_the_grants_before_it(limiter, stubber, clock):
    view = join(LimiterState(), LINE, 3, NOW, SETTINGS).state
    # tickets 0 and 1 sent at NOW (unknown to ticket 2's view); ticket 2's turn is a window + margin later
    clock.now = NOW + SETTINGS.spacing_ms
    actual = claim(view, LINE, 0, "r0#1", NOW, SETTINGS).state
    actual = claim(actual, LINE, 1, "r1#1", NOW, SETTINGS).state
    granted = claim(actual, LINE, 2, "r2#1", clock.now, SETTINGS).state
    request = limiter.write_request(actual, granted)
    assert request["ConditionExpression"] == (
        "#g = :g0 AND #c = :c0 AND (attribute_not_exists(#t) OR #t <= :cutoff)"
    )
    assert request["ExpressionAttributeValues"][":g0"] == {"N": "2"}
    assert request["ExpressionAttributeValues"][":cutoff"] == {"N": str(NOW)}
    stubber.add_response("update_item", {}, request)
    decision = limiter.claim(RateClaim("org-1", False, 2, "r2#1", encode_state(view, NOW)))
    assert decision.granted and decision.calls == 1


def test_a_claim_that_loses_decides_again_from_the_returned_item(limiter, stubber, clock):
    view = join(LimiterState(), LINE, 3, NOW, SETTINGS).state
    actual = claim(view, LINE, 0, "r0#1", NOW, SETTINGS).state
    actual = claim(actual, LINE, 1, "r1#1", NOW + 5, SETTINGS).state  # sent later than ticket 2 hoped
    clock.now = NOW + SETTINGS.spacing_ms
    predicted = state_at_turn(view, LINE, 2, SETTINGS.limit)
    hoped = claim(predicted, LINE, 2, "r2#1", clock.now, SETTINGS).state
    lost(stubber, limiter.write_request(predicted, hoped), item(limiter, actual))
    granted = claim(actual, LINE, 2, "r2#1", clock.now, SETTINGS).state
    stubber.add_response("update_item", {}, limiter.write_request(actual, granted))
    decision = limiter.claim(RateClaim("org-1", False, 2, "r2#1", encode_state(view, NOW)))
    assert decision.granted and decision.calls == 2


def test_a_redelivered_claim_with_the_same_send_is_granted_and_records_nothing(limiter, stubber, clock):
    state = join(LimiterState(), LINE, 1, NOW, SETTINGS).state
    sent = claim(state, LINE, 0, "r0#1", NOW, SETTINGS).state
    clock.now = NOW + 10
    lost(
        stubber,
        limiter.write_request(state, claim(state, LINE, 0, "r0#1", NOW + 10, SETTINGS).state),
        item(limiter, sent),
    )
    decision = limiter.claim(RateClaim("org-1", False, 0, "r0#1", encode_state(state, NOW)))
    assert decision.granted and decision.calls == 1  # the lost write was the only call


def test_leaving_writes_a_skipped_range_once(limiter, stubber):
    state = join(LimiterState(), LINE, 5, NOW, SETTINGS).state
    lost(stubber, limiter.write_request(LimiterState(), LimiterState()), item(limiter, state))
    stubber.add_response("update_item", {}, limiter.write_request(state, leave(state, LINE, 2, 2, NOW)))
    limiter.leave("org-1", False, 2, 2)


def test_any_other_dynamodb_error_is_storage_unavailable(limiter, stubber):
    stubber.add_client_error(
        "update_item", service_error_code="ProvisionedThroughputExceededException", http_status_code=400
    )
    with pytest.raises(StorageUnavailable):
        limiter.join("org-1", False, 1)
