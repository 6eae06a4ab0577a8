"""The exact DynamoDB requests the shared key's queue sends, and how a failed condition's returned item is
used: one conditional UpdateItem per decision, never a read; a claim from an old view is one write."""

from __future__ import annotations

import json
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from dalle_plugin.adapters.dynamo_rate_limiter import DynamoRateLimiter, decode_state, encode_state
from dalle_plugin.domain.errors import StorageUnavailable
from dalle_plugin.domain.rate_limit import (
    LimiterSettings,
    LimiterState,
    claim,
    join,
    leave,
    line_of,
    planned_starts,
    replace,
    state_at_turn,
)
from dalle_plugin.ports import RateClaim

TABLE = "rate-limit"
SETTINGS = LimiterSettings(
    limit=2, window_s=60, skew_margin_ms=250, wake_lead_ms=0, short_wait_ms=0, join_to_claim_ms=0
)
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


def item(state: LimiterState) -> dict[str, Any]:
    """The item as DynamoDB holds it after ``state`` was written."""
    stored = {
        "pk": {"S": "queue"},
        "g": {"N": str(state.grants)},
        "c": {"N": str(state.changes)},
        "n": {"N": str(state.issued)},
    }
    for name, line in state.lines:
        stored[f"i:{name}"] = {"N": str(line.issued)}
        stored[f"s:{name}"] = {"N": str(line.served)}
        rest = [line.since_ms, line.last_grant, [list(r) for r in line.skipped], list(line.returned)]
        stored[f"l:{name}"] = {"S": json.dumps(rest, separators=(",", ":"))}
    for k, slot in enumerate(state.slots):
        if slot is not None:
            stored[f"t{k}"] = {"N": str(slot.at_ms)}
            stored[f"o{k}"] = {"S": f'["{slot.send}","{slot.line}",{slot.grant}]'}
    if state.grants:
        stored["p"] = {"N": str(state.last_turn_ms)}
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


#: a line kept by the grant that emptied it: every ticket served, none skipped or returned
EMPTIED = "(#i = #s AND contains(#l, :nothing_left))"


def make_request(count: int, since_ms: int) -> dict[str, Any]:
    """The write making a line no one waits in (absent, or kept emptied): its tickets from ``n``, ``c``
    counted."""
    return {
        "TableName": TABLE,
        "Key": {"pk": {"S": "queue"}},
        "UpdateExpression": "SET #s = if_not_exists(#n, :zero), #i = if_not_exists(#n, :zero) + :count, "
        "#n = if_not_exists(#n, :zero) + :count, #l = :rest, #g = if_not_exists(#g, :zero) ADD #c :one",
        "ConditionExpression": f"attribute_not_exists(#i) OR {EMPTIED}",
        "ExpressionAttributeNames": {
            "#i": f"i:{LINE}",
            "#s": f"s:{LINE}",
            "#l": f"l:{LINE}",
            "#n": "n",
            "#g": "g",
            "#c": "c",
        },
        "ExpressionAttributeValues": {
            ":count": {"N": str(count)},
            ":nothing_left": {"S": ",[],[]]"},
            ":zero": {"N": "0"},
            ":one": {"N": "1"},
            ":rest": {"S": f"[{since_ms},-1,[],[]]"},
        },
        "ReturnValues": "ALL_NEW",
    }


def test_a_batch_joining_an_empty_queue_makes_its_line_in_one_write(limiter, stubber):
    made = join(LimiterState(), LINE, 3, NOW, SETTINGS).state
    stubber.add_response("update_item", {"Attributes": item(replace(made, changes=1))}, make_request(3, NOW))
    answer = limiter.join("org-1", False, 3)
    assert (answer.first_ticket, answer.admitted, answer.calls) == (0, 3, 1)
    assert answer.positions == (0, 1, 2)


def test_a_batch_joining_a_line_with_runs_waiting_adds_its_tickets_alone_and_older_views_still_claim(
    limiter, stubber, clock
):
    """The write nothing refuses: tickets added to a line leave ``g`` and ``c`` as they were, so the runs
    already waiting claim from their views in one write each."""
    view = join(LimiterState(), LINE, 2, NOW, SETTINGS).state
    limiter._state = view  # the API's environment saw the line before
    grown = join(view, LINE, 3, NOW, SETTINGS).state
    stubber.add_response(
        "update_item",
        {"Attributes": item(replace(grown, changes=view.changes))},
        {
            "TableName": TABLE,
            "Key": {"pk": {"S": "queue"}},
            "UpdateExpression": "ADD #i :count",
            "ConditionExpression": f"attribute_exists(#i) AND NOT {EMPTIED}",
            "ExpressionAttributeNames": {"#i": f"i:{LINE}", "#s": f"s:{LINE}", "#l": f"l:{LINE}"},
            "ExpressionAttributeValues": {":count": {"N": "3"}, ":nothing_left": {"S": ",[],[]]"}},
            "ReturnValues": "ALL_NEW",
        },
    )
    answer = limiter.join("org-1", False, 3)
    assert (answer.first_ticket, answer.admitted, answer.calls) == (2, 3, 1)
    assert answer.positions == (2, 3, 4)
    # ticket 0 claims from the view it had before the batch joined: one write, granted
    waiting = DynamoRateLimiter(limiter._client, TABLE, SETTINGS, clock=clock, sleep=lambda s: None)
    granted = claim(view, LINE, 0, "r0#1", NOW, SETTINGS).state
    request = waiting.write_request(view, granted, LINE)
    assert request["ConditionExpression"] == (
        "#g = :g0 AND #c = :c0 AND #s0 = :s00 AND #l0 = :l00 AND (attribute_not_exists(#t) OR #t <= :cutoff)"
    )
    stubber.add_response("update_item", {}, request)
    decision = waiting.claim(RateClaim("org-1", False, 0, "r0#1", encode_state(view, NOW)))
    assert decision.granted and decision.calls == 1


def test_a_warm_api_whose_last_look_has_its_line_sent_by_now_makes_the_line_first(limiter, stubber, clock):
    """One write for a batch joining an idle queue too: the runs of the environment's last join have sent
    by their plan, so their line is gone and making it is the write that goes through."""
    limiter._state = join(LimiterState(), LINE, 2, NOW, SETTINGS).state
    clock.now = NOW + 3 * SETTINGS.spacing_ms
    made = join(LimiterState(), LINE, 1, clock.now, SETTINGS).state
    stubber.add_response(
        "update_item", {"Attributes": item(replace(made, changes=1))}, make_request(1, clock.now)
    )
    assert limiter.join("org-1", False, 1).calls == 1


def test_a_grant_is_refused_if_another_line_took_tickets_since_it_could_come_first(limiter):
    """Round-robin: tickets added to another organisation's line may take their turn ahead."""
    a, b = LINE, line_of("org-2", False)
    view = join(join(LimiterState(), a, 2, NOW, SETTINGS).state, b, 1, NOW, SETTINGS).state
    granted = claim(view, a, 0, "a0#1", NOW, SETTINGS).state
    request = limiter.write_request(view, granted, a)
    names = request["ExpressionAttributeNames"]
    (guard,) = [n for n, attribute in names.items() if attribute == f"i:{b}"]
    assert f"{guard} = " in request["ConditionExpression"]
    assert f"i:{a}" not in names.values()  # its own line's added tickets queue behind it


def test_a_claim_from_an_old_view_is_one_write_conditioned_on_the_grants_before_it(limiter, stubber, clock):
    view = join(LimiterState(), LINE, 3, NOW, SETTINGS).state
    # tickets 0 and 1 sent at NOW (unknown to ticket 2's view); ticket 2's turn is a window + margin later
    clock.now = NOW + SETTINGS.spacing_ms
    actual = claim(view, LINE, 0, "r0#1", NOW, SETTINGS).state
    actual = claim(actual, LINE, 1, "r1#1", NOW, SETTINGS).state
    granted = claim(actual, LINE, 2, "r2#1", clock.now, SETTINGS).state
    request = limiter.write_request(actual, granted, LINE)
    # its line empties with it in the view, but tickets may have been added to it since: the line is kept,
    # its tickets all served, whatever its next ticket is; ``n`` goes above them
    assert request["ConditionExpression"] == (
        "#g = :g0 AND #c = :c0 AND #s0 = :s00 AND #l0 = :l00 AND (attribute_not_exists(#t) OR #t <= :cutoff)"
    )
    assert "REMOVE" not in request["UpdateExpression"]
    assert request["ExpressionAttributeValues"][":n"] == {"N": "3"}
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
    predicted = state_at_turn(view, LINE, 2, SETTINGS)
    hoped = claim(predicted, LINE, 2, "r2#1", clock.now, SETTINGS).state
    lost(stubber, limiter.write_request(predicted, hoped, LINE), item(actual))
    granted = claim(actual, LINE, 2, "r2#1", clock.now, SETTINGS).state
    stubber.add_response("update_item", {}, limiter.write_request(actual, granted, LINE))
    decision = limiter.claim(RateClaim("org-1", False, 2, "r2#1", encode_state(view, NOW)))
    assert decision.granted and decision.calls == 2


def test_a_run_whose_turn_comes_before_the_one_ahead_claimed_takes_the_next_grant(limiter, stubber, clock):
    """Ticket 0's clock is behind ticket 1's: ticket 1's write hoping ticket 0 had sent loses and brings the
    item back, and its second write grants it ahead: its ticket skipped in its line (ticket 0 keeps its
    place at the head), in the slot its plan gave it (slot 0 stays free for ticket 0), the head's turn
    untouched."""
    view = join(LimiterState(), LINE, 2, NOW, SETTINGS).state
    turns = planned_starts(view, SETTINGS, 2)
    clock.now = turns[1]
    predicted = state_at_turn(view, LINE, 1, SETTINGS)
    hoped = claim(predicted, LINE, 1, "r1#1", clock.now, SETTINGS).state
    lost(stubber, limiter.write_request(predicted, hoped, LINE), item(view))
    ahead = claim(view, LINE, 1, "r1#1", clock.now, SETTINGS)
    line = dict(ahead.state.lines)[LINE]
    assert ahead.granted and next(line.tickets()) == 0 and line.skipped == ((1, 2),)
    request = limiter.write_request(view, ahead.state, LINE)
    assert request["ExpressionAttributeNames"]["#t"] == "t1"
    assert request["ExpressionAttributeValues"][":p"] == {"N": "0"}
    assert planned_starts(ahead.state, SETTINGS, 1) == [turns[0]]
    stubber.add_response("update_item", {}, request)
    decision = limiter.claim(RateClaim("org-1", False, 1, "r1#1", encode_state(view, NOW)))
    assert decision.granted and decision.calls == 2


def test_a_run_that_waited_in_place_claims_as_if_the_runs_ahead_sent_and_is_told_its_recorded_time(
    client, stubber, clock
):
    """Ticket 3's view predates an editor run that joined and sent: its first write loses, the item says
    its turn is 250 ms on, and it waits in place. Then the runs ahead of it, due before it, have most likely
    sent: it claims as if they had (not ahead of them, as the item in hand would have it), and the decision
    carries the time recorded, its turn, not the clock reading after a sleep that overshot."""
    five = LimiterSettings(limit=5, window_s=60, skew_margin_ms=1500, join_to_claim_ms=0)

    def sleep(seconds: float) -> None:
        clock.now += round(seconds * 1000) + 50

    limiter = DynamoRateLimiter(client, TABLE, five, clock=clock, sleep=sleep)
    view = join(LimiterState(), LINE, 4, NOW, five).state
    editor = line_of("org-2", True)
    actual = join(view, editor, 1, NOW, five).state
    actual = claim(actual, editor, view.issued, "e#1", NOW, five).state
    clock.now = planned_starts(view, five, 4)[3]
    predicted = state_at_turn(view, LINE, 3, five)
    hoped = claim(predicted, LINE, 3, "r3#1", clock.now, five).state
    lost(stubber, limiter.write_request(predicted, hoped, LINE), item(actual))
    turn = planned_starts(actual, five, 4)[3]
    assert turn - clock.now == five.grant_gap
    predicted = state_at_turn(actual, LINE, 3, five)
    granted = claim(predicted, LINE, 3, "r3#1", turn + 50, five, clock.now)
    assert granted.granted and granted.start_at_ms == turn
    stubber.add_response("update_item", {}, limiter.write_request(predicted, granted.state, LINE))
    decision = limiter.claim(RateClaim("org-1", False, 3, "r3#1", encode_state(view, NOW)))
    assert decision.granted and decision.calls == 2 and decision.start_at_ms == turn


def test_a_claim_predicting_grants_in_order_is_refused_after_runs_went_ahead(limiter):
    """Ticket 2's old view predicts tickets 0 and 1 sent in order; tickets 1 and 3 went ahead instead and
    ticket 0 still waits: as many grants, other tickets served. The write is conditioned on its line's
    served mark and the rest as predicted, so it cannot mark ticket 0 served: it loses and decides again."""
    five = LimiterSettings(limit=5, window_s=60, skew_margin_ms=1500, join_to_claim_ms=0)
    limiter = DynamoRateLimiter(limiter._client, TABLE, five)
    view = join(LimiterState(), LINE, 4, NOW, five).state
    predicted = state_at_turn(view, LINE, 2, five)
    hoped = claim(predicted, LINE, 2, "r2#1", NOW + five.spacing_ms, five).state
    values = limiter.write_request(predicted, hoped, LINE)["ExpressionAttributeValues"]
    assert values[":s00"] == {"N": "2"}  # tickets 0 and 1 served, as predicted
    turns = planned_starts(view, five, 4)
    actual = view
    for ticket in (1, 3):  # each due, passing ticket 0 (and 3 passing 2), less than a margin after it
        answer = claim(actual, LINE, ticket, f"r{ticket}#1", turns[3], five)
        assert answer.granted
        actual = answer.state
    assert actual.grants == predicted.grants  # the grants' count alone would not tell
    assert item(actual)[f"s:{LINE}"] != values[":s00"] and item(actual)[f"l:{LINE}"] != values[":l00"]


def test_a_redelivered_claim_with_the_same_send_is_granted_and_records_nothing(limiter, stubber, clock):
    state = join(LimiterState(), LINE, 1, NOW, SETTINGS).state
    sent = claim(state, LINE, 0, "r0#1", NOW, SETTINGS).state
    clock.now = NOW + 10
    lost(
        stubber,
        limiter.write_request(state, claim(state, LINE, 0, "r0#1", NOW + 10, SETTINGS).state, LINE),
        item(sent),
    )
    decision = limiter.claim(RateClaim("org-1", False, 0, "r0#1", encode_state(state, NOW)))
    assert decision.granted and decision.calls == 1  # the lost write was the only call


def test_leaving_looks_at_the_item_once_then_writes_a_skipped_range(limiter, stubber):
    state = join(LimiterState(), LINE, 5, NOW, SETTINGS).state
    lost(stubber, None, item(state))  # the state in hand knows none of the tickets: the item is looked at
    stubber.add_response("update_item", {}, limiter.write_request(state, leave(state, LINE, 2, 2, NOW)))
    limiter.leave("org-1", False, 2, 2)
    request = limiter.write_request(state, leave(state, LINE, 2, 2, NOW))
    assert f"i:{LINE}" in request["ExpressionAttributeNames"].values()  # none added since it looked


def test_any_other_dynamodb_error_is_storage_unavailable(limiter, stubber):
    stubber.add_client_error(
        "update_item", service_error_code="ProvisionedThroughputExceededException", http_status_code=400
    )
    with pytest.raises(StorageUnavailable):
        limiter.join("org-1", False, 1)


def test_a_write_emptying_two_lines_sets_the_ticket_mark_once(limiter):
    """A grant that also skips an abandoned head may empty two lines (one removed, its own kept emptied):
    ``n`` goes above both."""
    a, b = LINE, line_of("org-0", False)  # b's head goes first, and never claims
    state = join(join(LimiterState(), b, 1, NOW, SETTINGS).state, a, 1, NOW, SETTINGS).state
    later = NOW + SETTINGS.abandon_after_ms + SETTINGS.join_to_claim_ms + 1
    granted = claim(state, a, dict(state.lines)[a].served, "a#1", later, SETTINGS).state  # b's head skipped
    assert not any(line.waiting for _, line in granted.lines)
    request = limiter.write_request(state, granted, a)
    assert request["UpdateExpression"].count("#n = :n") == 1
    assert request["ExpressionAttributeValues"][":n"] == {"N": "2"}


def test_a_send_before_its_turn_keeps_that_turn_in_its_slot_on_the_item_and_in_the_view(client):
    # the window is checked against the send's clock reading (``t``); the turn the runs behind were told
    # rides in the slot's owner (``o``) and comes back from the item and from a view
    settings = SETTINGS.model_copy(update={"join_to_claim_ms": 3000})
    limiter = DynamoRateLimiter(client, TABLE, settings)
    before = join(LimiterState(), LINE, 3, NOW, settings).state
    early = claim(before, LINE, 0, "run-0#1", NOW + 1000, settings)
    request = limiter.write_request(before, early.state, LINE)
    values = request["ExpressionAttributeValues"]
    assert values[":t"] == {"N": str(NOW + 1000)}
    assert values[":cutoff"] == {"N": str(NOW + 1000 - settings.spacing_ms)}
    assert json.loads(values[":o"]["S"]) == ["run-0#1", LINE, 0, NOW + 3000]
    item = {
        "pk": {"S": "queue"},
        "g": {"N": "1"},
        "c": {"N": "1"},
        "t0": values[":t"],
        "o0": values[":o"],
        f"i:{LINE}": {"N": "3"},
        f"s:{LINE}": {"N": "1"},
        f"l:{LINE}": {"S": json.dumps([0, 0, [], []])},
    }
    slot = limiter.from_item(item).slots[0]
    assert (slot.at_ms, slot.turn_ms) == (NOW + 1000, NOW + 3000)
    view = decode_state(encode_state(early.state))
    assert view.slots == early.state.slots


def test_an_early_head_waits_in_place_the_hold_then_claims_in_one_write(client, stubber, clock):
    # a batch's first run reaches its claim 2 s before the turn its join planned: it waits in the step for
    # ``head_hold`` (not to its turn: its slot is free), then one write grants it
    settings = LimiterSettings(limit=2, window_s=60, skew_margin_ms=1500, join_to_claim_ms=3000)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += round(seconds * 1000)

    limiter = DynamoRateLimiter(client, TABLE, settings, clock=clock, sleep=sleep)
    view = join(LimiterState(), LINE, 3, NOW, settings).state
    clock.now = NOW + 1000
    sent_at = clock.now + settings.head_hold
    granted = claim(view, LINE, 0, "r0#1", sent_at, settings).state
    stubber.add_response("update_item", {}, limiter.write_request(view, granted, LINE))
    decision = limiter.claim(RateClaim("org-1", False, 0, "r0#1", encode_state(view, NOW)))
    assert decision.granted and decision.start_at_ms == sent_at and decision.calls == 1
    assert slept == [settings.head_hold / 1000]
