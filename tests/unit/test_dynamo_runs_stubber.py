"""The exact DynamoDB requests the run store sends: a step's progress is one UpdateItem of what changed
(SET, list_append for new timeline entries) under the version it read, with no read before it; a conflict
is retried on the record the failed write returned, not on a new read."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import ANY, Stubber
from dalle_plugin.adapters.dynamo_runs import DynamoRunStore
from dalle_plugin.domain.run import ModelInfo, RunRecord, RunStatus, TimelineEntry

TABLE = "sessions"
KEY = {"pk": {"S": "SESSION#s1"}, "sk": {"S": "TASK#t1"}}


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


def _run(**overrides) -> RunRecord:
    values = {
        "session": "s1",
        "task_id": "t1",
        "execution_name": "s1_t1_x",
        "project_id": "p1",
        "prompt_source": "asset",
        "model": ModelInfo(requested="gpt-image-2", actual="gpt-image-2"),
        "size": "1024x1024",
        "max_prompt_chars": 32000,
        "uses_default_key": True,
        "created_at_ms": 1000,
        "updated_at_ms": 1000,
        "sealed_secrets": b"sealed",
        "expires_at": 99,
        "version": 3,
        "timeline": [TimelineEntry(step="queued", status="QUEUED", at_ms=1000)],
    }
    return RunRecord(**(values | overrides))


def _mark_extracting(run: RunRecord) -> None:
    run.status = RunStatus.EXTRACTING
    run.updated_at_ms = 2000
    run.timeline.append(TimelineEntry(step="extract", status="EXTRACTING", at_ms=2000, detail="Run started."))


PROGRESS = {
    "TableName": TABLE,
    "Key": KEY,
    "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
    "UpdateExpression": ANY,
    "ConditionExpression": "#version = :version",
    "ExpressionAttributeNames": ANY,
    "ExpressionAttributeValues": ANY,
}


def test_a_progress_line_is_one_update_of_what_changed_with_no_read(client, stubber):
    store = DynamoRunStore(client, TABLE)
    stubber.add_response("update_item", {}, PROGRESS)
    run = store.change(_run(), _mark_extracting)  # any other call (a read) would fail: nothing stubbed for it
    assert run.version == 4 and run.status is RunStatus.EXTRACTING
    assert run.timeline[0].duration_ms == 1000  # derived from the next entry's start, never written


def test_the_update_sets_only_changed_fields_and_appends_the_new_timeline_entry(client):
    params = DynamoRunStore._changes(
        _run(),
        _run(
            status=RunStatus.EXTRACTING,
            updated_at_ms=2000,
            timeline=[
                TimelineEntry(step="queued", status="QUEUED", at_ms=1000),
                TimelineEntry(step="extract", status="EXTRACTING", at_ms=2000, detail="Run started."),
            ],
        ),
        3,
    )
    names, values = params["ExpressionAttributeNames"], params["ExpressionAttributeValues"]
    by_attribute = {names[token]: token for token in names}
    assert set(by_attribute) == {"version", "status", "updatedAtMs", "timeline"}
    timeline = by_attribute["timeline"]
    assert f"{timeline} = list_append(if_not_exists({timeline}, :empty), " in params["UpdateExpression"]
    appended = [v for k, v in values.items() if k not in (":version", ":next", ":empty") and "L" in v]
    assert appended == [
        {
            "L": [
                {
                    "S": '{"step":"extract","status":"EXTRACTING","at_ms":2000,"duration_ms":null,'
                    '"detail":"Run started."}'
                }
            ]
        }
    ]
    assert values[":version"] == {"N": "3"} and values[":next"] == {"N": "4"}
    assert params["ConditionExpression"] == "#version = :version"
    assert "REMOVE" not in params["UpdateExpression"]


def test_ending_a_run_removes_its_sealed_secrets(client):
    params = DynamoRunStore._changes(_run(), _run(sealed_secrets=None), 3)
    names = params["ExpressionAttributeNames"]
    removed = params["UpdateExpression"].split(" REMOVE ")[1]
    assert [names[token] for token in removed.split(", ")] == ["sealedSecrets"]


def test_a_conflict_is_retried_on_the_returned_record_without_a_read(client, stubber):
    store = DynamoRunStore(client, TABLE)
    current = DynamoRunStore._to_item(_run(version=4, status=RunStatus.CANCELLED))
    stubber.add_client_error(
        "update_item",
        "ConditionalCheckFailedException",
        http_status_code=400,
        expected_params=PROGRESS,
        response_meta={},
        modeled_fields={"Item": current},
    )
    seen: list[RunStatus] = []

    def refuse_if_cancelled(run: RunRecord) -> None:
        seen.append(run.status)
        if run.status is RunStatus.CANCELLED:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        store.change(_run(), refuse_if_cancelled)
    assert seen == [RunStatus.QUEUED, RunStatus.CANCELLED]


def test_a_record_round_trips_through_its_item(client):
    run = _run(notes=["a note"], rate_wait=None)
    item = DynamoRunStore._to_item(run)
    assert item["status"] == {"S": "QUEUED"} and item["version"] == {"N": "3"}
    assert item["expiresAt"] == {"N": "99"} and item["sealedSecrets"] == {"B": b"sealed"}
    assert "rateWait" not in item  # None is not stored
    assert DynamoRunStore._from_item(item)[0] == run


def test_a_record_in_the_earlier_one_document_layout_is_still_read(client):
    run = _run()
    legacy = KEY | {
        "status": {"S": "QUEUED"},
        "version": {"N": "3"},
        "doc": {"S": run.model_dump_json(by_alias=True, exclude={"sealed_secrets", "version"})},
        "sealedSecrets": {"B": b"sealed"},
    }
    assert DynamoRunStore._from_item(legacy)[0] == run


def test_a_page_of_a_session_is_one_query_after_the_last_task_without_the_sealed_secrets(client, stubber):
    store = DynamoRunStore(client, TABLE)
    items = [DynamoRunStore._to_item(_run(task_id=f"t{i}")) for i in (3, 4, 5)]
    expected = {
        "TableName": TABLE,
        "KeyConditionExpression": "pk = :pk AND begins_with(sk, :task)",
        "ExpressionAttributeValues": {":pk": {"S": "SESSION#s1"}, ":task": {"S": "TASK#"}},
        "ConsistentRead": True,
        "Limit": 3,  # one more than asked: the last page knows it is the last
        "ProjectionExpression": ANY,
        "ExpressionAttributeNames": ANY,
        "ExclusiveStartKey": {"pk": {"S": "SESSION#s1"}, "sk": {"S": "TASK#t2"}},
    }
    stubber.add_response("query", {"Items": items, "LastEvaluatedKey": items[-1]}, expected)
    stubber.add_response("query", {"Items": items[:1]}, {**expected, "ExclusiveStartKey": ANY})
    runs, last = store.page("s1", 2, "t2")
    assert [run.task_id for run in runs] == ["t3", "t4"] and last == "t4"
    runs, last = store.page("s1", 2, "t4")  # fewer than asked and no LastEvaluatedKey: the end
    assert [run.task_id for run in runs] == ["t3"] and last is None
    assert "sealedSecrets" not in DynamoRunStore.readable_attributes()[1].values()


def test_a_summary_reads_only_what_it_counts(client, stubber):
    store = DynamoRunStore(client, TABLE)
    item = DynamoRunStore._to_item(_run(task_id="t1"))
    kept = {
        name: value
        for name, value in item.items()
        if name in ("sk", "status", "model", "size", "createdAtMs")
    }
    expected = {
        "TableName": TABLE,
        "IndexName": "RunTallies",  # not the table: it would read every prompt and chunk whole
        "KeyConditionExpression": "pk = :pk",
        "ExpressionAttributeValues": {":pk": {"S": "SESSION#s1"}},
    }
    stubber.add_response("query", {"Items": [kept]}, expected)
    (tally,) = store.tallies("s1")
    assert tally.task_id == "t1" and tally.image_count == 0 and tally.model is not None


def test_a_call_that_times_out_after_the_sdks_retries_is_a_transient_storage_error():
    """The state machine retries StorageUnavailable; the SDK's own exception would fail the run."""
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError
    from dalle_plugin.adapters.dynamo_runs import DynamoRunStore
    from dalle_plugin.domain.errors import StorageUnavailable

    class Unreachable:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def get_item(self, **_: object) -> dict:
            raise self.error

    for error in (
        ReadTimeoutError(endpoint_url="http://d"),
        EndpointConnectionError(endpoint_url="http://d"),
    ):
        with pytest.raises(StorageUnavailable):
            DynamoRunStore(Unreachable(error), "sessions").get("s", "t")


OFFER_KEY = {"pk": {"S": "IMAGE#fp1"}, "sk": {"S": "REUSABLE"}}


@pytest.mark.parametrize("offered", [False, True])
def test_generate_reads_the_run_and_any_offered_image_in_one_consistent_batch(client, stubber, offered):
    store = DynamoRunStore(client, TABLE)
    items = [DynamoRunStore._to_item(_run())]
    if offered:
        items.append(OFFER_KEY | {"imageKey": {"S": "images/x.png"}, "expiresAt": {"N": "99"}})
    stubber.add_response(
        "batch_get_item",
        {"Responses": {TABLE: items}},
        {"RequestItems": {TABLE: {"Keys": [KEY, OFFER_KEY], "ConsistentRead": True}}},
    )
    run, on_offer = store.get_with_offer("s1", "t1", "fp1")
    assert run is not None and run.version == 3 and on_offer is offered


def test_keys_left_unprocessed_are_asked_for_again(client, stubber):
    store = DynamoRunStore(client, TABLE)
    stubber.add_response(
        "batch_get_item",
        {"Responses": {TABLE: []}, "UnprocessedKeys": {TABLE: {"Keys": [KEY], "ConsistentRead": True}}},
    )
    stubber.add_response(
        "batch_get_item",
        {"Responses": {TABLE: [DynamoRunStore._to_item(_run())]}},
        {"RequestItems": {TABLE: {"Keys": [KEY], "ConsistentRead": True}}},
    )
    run, on_offer = store.get_with_offer("s1", "t1", "fp1")
    assert run is not None and not on_offer


def test_a_steps_first_write_is_its_read_one_conditional_update_answering_with_the_record(client, stubber):
    from dalle_plugin.ports import StepOpening

    run = _run(owner="exec-1")
    line = TimelineEntry(step="attach", status="ATTACHING", at_ms=2000, detail="Uploading the image.")
    written = run.model_copy(
        update={
            "status": RunStatus.ATTACHING,
            "version": 4,
            "updated_at_ms": 2000,
            "timeline": [*run.timeline, line],
        }
    )
    stubber.add_response(
        "update_item",
        {"Attributes": DynamoRunStore._to_item(written)},
        {
            "TableName": TABLE,
            "Key": KEY,
            "UpdateExpression": "SET #version = #version + :one, #updated = :updated, #status = :status, "
            "#timeline = list_append(if_not_exists(#timeline, :empty), :entries)",
            "ConditionExpression": "attribute_exists(pk) AND attribute_not_exists(#doc) AND "
            "(attribute_not_exists(#owner) OR #owner = :caller) AND NOT (#status IN (:refused0, :refused1))",
            "ExpressionAttributeNames": ANY,
            "ExpressionAttributeValues": ANY,
            "ReturnValues": "ALL_NEW",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        },
    )
    stubber.add_client_error(
        "update_item",
        "ConditionalCheckFailedException",
        http_status_code=400,
        response_meta={},
        modeled_fields={"Item": DynamoRunStore._to_item(written)},
    )
    opening = StepOpening(
        caller="exec-1",
        refused=(RunStatus.CANCELLED, RunStatus.SUCCEEDED),
        updated_at_ms=2000,
        status=RunStatus.ATTACHING,
        entries=(line,),
    )
    store = DynamoRunStore(client, TABLE)
    as_read = DynamoRunStore._from_item(DynamoRunStore._to_item(written))[0]
    assert store.open_step("s1", "t1", opening) == (as_read, True)
    assert store.open_step("s1", "t1", opening) == (as_read, False)  # refused: the record as it is, no read


def _put(run: RunRecord) -> dict:
    return {
        "Put": {
            "TableName": TABLE,
            "Item": DynamoRunStore._to_item(run),
            "ConditionExpression": "attribute_not_exists(pk)",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        }
    }


def test_a_small_batch_is_stored_with_a_check_per_run_that_no_image_of_its_task_is_on_offer(client, stubber):
    from dalle_plugin.adapters.dynamo_reusable_images import offer_marker_key

    fresh, offered = _run(version=1), _run(task_id="t2", version=1)
    checked = [run.model_copy(update={"no_offer_at_accept": True}) for run in (fresh, offered)]
    check = {"ConditionExpression": "attribute_not_exists(pk)", "TableName": TABLE}
    stubber.add_client_error(
        "transact_write_items",
        "TransactionCanceledException",
        response_meta={},
        modeled_fields={
            # the second task's marker: an image of it is on offer
            "CancellationReasons": [{"Code": "None"}] * 3 + [{"Code": "ConditionalCheckFailed"}]
        },
        expected_params={
            "TransactItems": [
                _put(checked[0]),
                {"ConditionCheck": check | {"Key": offer_marker_key(fresh.offer_scope)}},
                _put(checked[1]),
                {"ConditionCheck": check | {"Key": offer_marker_key(offered.offer_scope)}},
            ]
        },
    )
    # sent again: the second run without the flag and without its check (its Generate looks for the offer)
    stubber.add_response(
        "transact_write_items",
        {},
        {
            "TransactItems": [
                _put(checked[0]),
                {"ConditionCheck": check | {"Key": offer_marker_key(fresh.offer_scope)}},
                _put(offered),
            ]
        },
    )
    stored = DynamoRunStore(client, TABLE).create_many([fresh, offered])
    assert [(run.no_offer_at_accept, created) for run, created in stored] == [(True, True), (False, True)]


def test_a_transaction_with_no_room_for_the_checks_stores_the_runs_without_the_flag(client, stubber):
    runs = [_run(task_id=f"t{i}", version=1) for i in range(100)]
    stubber.add_response("transact_write_items", {}, {"TransactItems": [_put(run) for run in runs]})
    stored = DynamoRunStore(client, TABLE).create_many(runs)
    assert not any(run.no_offer_at_accept for run, _ in stored) and all(created for _, created in stored)


def test_generates_first_spend_holds_only_while_no_attempt_is_spent_and_the_run_had_no_offer(client, stubber):
    from dalle_plugin.ports import StepOpening

    run = _run(owner="exec-1", no_offer_at_accept=True)
    written = run.model_copy(update={"status": RunStatus.GENERATING, "attempt": 1, "version": 4})
    stubber.add_response(
        "update_item",
        {"Attributes": DynamoRunStore._to_item(written)},
        {
            "TableName": TABLE,
            "Key": KEY,
            "UpdateExpression": "SET #version = #version + :one, #updated = :updated, #status = :status, "
            "#s0 = :s0",
            "ConditionExpression": "attribute_exists(pk) AND attribute_not_exists(#doc) AND "
            "(attribute_not_exists(#owner) OR #owner = :caller) AND NOT (#status IN (:refused0)) AND "
            "attribute_not_exists(#x0) AND #e0 = :e0 AND #e1 = :e1",
            "ExpressionAttributeNames": {
                "#version": "version",
                "#updated": "updatedAtMs",
                "#doc": "doc",
                "#owner": "owner",
                "#status": "status",
                "#s0": "attempt",
                "#x0": "image",
                "#e0": "attempt",
                "#e1": "noOfferAtAccept",
            },
            "ExpressionAttributeValues": ANY,
            "ReturnValues": "ALL_NEW",
            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
        },
    )
    opening = StepOpening(
        caller="exec-1",
        refused=(RunStatus.CANCELLED,),
        updated_at_ms=2000,
        status=RunStatus.GENERATING,
        sets={"attempt": 1},
        absent=("image",),
        equal={"attempt": 0, "no_offer_at_accept": True},
    )
    run_after, opened = DynamoRunStore(client, TABLE).open_step("s1", "t1", opening)
    assert opened and run_after.attempt == 1
