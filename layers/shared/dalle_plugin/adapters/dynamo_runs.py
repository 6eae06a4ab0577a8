"""Run records in the sessions table: pk ``SESSION#<session>``, sk ``TASK#<task>``.

Each field of the record is an attribute of its own (named by its camelCase alias), so a step writes only
what it changed: one ``UpdateItem`` with ``SET`` for changed fields and ``list_append`` for the timeline's
new entries, under the condition that the record is still at the version the step read. No read comes
before a write: the step already holds the record. When another writer got there first, the failed write
returns the record as it now is (``ReturnValuesOnConditionCheckFailure``) and the change is made again on
that, so a conflict costs one more write, not a read.

Attributes DynamoDB itself needs are typed (``status`` S, ``version`` N, ``expiresAt`` N for the TTL,
``sealedSecrets`` B); list fields are lists of JSON strings (appendable); every other field is one JSON
string. Records written in the earlier one-document layout (``doc``) are still read.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError, ConnectionError, HTTPClientError
from pydantic import BaseModel

from dalle_plugin.adapters.dynamo_reusable_images import offer_marker_key, offered_image_key
from dalle_plugin.domain.errors import StorageUnavailable
from dalle_plugin.domain.run import RunRecord
from dalle_plugin.port_records import StepOpening

if TYPE_CHECKING:  # the session view is the API's alone: its model loads only there
    from dalle_plugin.domain.step_io.api import RunTally

MAX_OPTIMISTIC_RETRIES = 8
#: puts in one TransactWriteItems (DynamoDB's cap)
TRANSACTION_ITEMS = 100
_KEY_FIELDS = ("session", "task_id")
#: the sessions table's sparse index of the runs (template.yaml: keyed by pk and ``createdAtMs``), and the
#: attributes it carries besides its keys: what a session's summary counts (``RunTally``), nothing larger
TALLY_INDEX = "RunTallies"
TALLY_ATTRIBUTES = ("status", "model", "size", "quality", "image", "moreImages", "maxCostUsd", "updatedAtMs")


class _TransientOnConnectionErrors:
    """The DynamoDB client, with a call that could not reach DynamoDB or timed out after the SDK's own
    retries raised as ``StorageUnavailable``: the state machine retries that step, where the SDK's bare
    exception would have failed the run as unexpected."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._client, name)
        if not callable(call) or name.startswith("get_paginator"):
            return call

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return call(*args, **kwargs)
            except (ConnectionError, HTTPClientError) as exc:
                raise StorageUnavailable(f"Could not reach the run store: {type(exc).__name__}") from exc

        return guarded


def _key(session: str, task_id: str) -> dict[str, Any]:
    return {"pk": {"S": f"SESSION#{session}"}, "sk": {"S": f"TASK#{task_id}"}}


def _alias(field: str) -> str:
    return RunRecord.model_fields[field].alias or field


def _encode(field: str, value: Any) -> dict[str, Any]:
    """One field's DynamoDB attribute value (``value`` as dumped to JSON; never None here)."""
    if field in ("version", "expires_at"):
        return {"N": str(value)}
    if field == "status":
        return {"S": value}
    if field == "sealed_secrets":
        return {"B": value}
    if isinstance(value, list):
        return {"L": [{"S": json.dumps(element, separators=(",", ":"))} for element in value]}
    return {"S": json.dumps(value, separators=(",", ":"))}


def _decode(field: str, attribute: dict[str, Any]) -> Any:
    if "N" in attribute:
        return int(attribute["N"])
    if "B" in attribute:
        return attribute["B"]
    if "L" in attribute:
        return [json.loads(element["S"]) for element in attribute["L"]]
    return attribute["S"] if field == "status" else json.loads(attribute["S"])


def _dumped(run: RunRecord) -> dict[str, Any]:
    """Field name -> JSON-ready value (sealed secrets kept as bytes)."""
    values = run.model_dump(mode="json", exclude={"sealed_secrets"})
    values["sealed_secrets"] = run.sealed_secrets
    return values


def _as_json(value: Any) -> Any:
    """A field's value as ``_dumped`` holds it (models and lists of them dumped to JSON-ready values)."""
    if isinstance(value, list):
        return [_as_json(element) for element in value]
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


_FIELD_OF_ALIAS = {_alias(name): name for name in RunRecord.model_fields}


def _checked(runs: list[RunRecord], room: bool) -> list[RunRecord]:
    """The runs whose store checks the offer marker of their task: all when the transaction has room, the
    first of each task only (a transaction may name an item once)."""
    seen: set[str] = set()
    for run in runs:
        run.no_offer_at_accept = room and run.offer_scope not in seen
        seen.add(run.offer_scope)
    return runs


class DynamoRunStore:
    def __init__(self, client: Any, table_name: str):
        self._client = _TransientOnConnectionErrors(client)
        self._table = table_name
        #: the record as this environment last read or wrote it, per (session, task): a step's own result
        self._recent: dict[tuple[str, str], RunRecord] = {}
        #: records read in the earlier layout: their first change rewrites them whole in the new one
        self._legacy: set[tuple[str, str]] = set()

    # ---- mapping ----------------------------------------------------------------------------------

    @staticmethod
    def _to_item(run: RunRecord) -> dict[str, Any]:
        item = _key(run.session, run.task_id)
        for field, value in _dumped(run).items():
            if field not in _KEY_FIELDS and value is not None:
                item[_alias(field)] = _encode(field, value)
        return item

    def _read(self, item: dict[str, Any]) -> RunRecord:
        run = self._from_item(item)[0]
        if "doc" in item:
            self._legacy.add((run.session, run.task_id))
        return self._remember(run)

    @staticmethod
    def _from_item(item: dict[str, Any]) -> tuple[RunRecord, int]:
        if "doc" in item:  # the earlier layout: one JSON document
            values = json.loads(item["doc"]["S"])
            if "sealedSecrets" in item:
                values["sealedSecrets"] = item["sealedSecrets"]["B"]
            values["version"] = int(item["version"]["N"])
        else:
            values = {
                "session": item["pk"]["S"].removeprefix("SESSION#"),
                "taskId": item["sk"]["S"].removeprefix("TASK#"),
            }
            for name, attribute in item.items():
                field = _FIELD_OF_ALIAS.get(name)
                if field is not None and field not in _KEY_FIELDS:
                    values[name] = _decode(field, attribute)
        run = RunRecord.model_validate(values)
        run.fill_durations()
        return run, run.version

    @staticmethod
    def readable_attributes() -> tuple[str, dict[str, str]]:
        """A projection of everything but the sealed secrets (for listings that must not even read them)."""
        names = {
            f"#a{i}": name
            for i, name in enumerate(["pk", "sk", "doc", *_FIELD_OF_ALIAS])
            if name != _alias("sealed_secrets")
        }
        return ", ".join(names), names

    @staticmethod
    def _changes(before: RunRecord, after: RunRecord, version: int) -> dict[str, Any]:
        """The UpdateItem parameters that turn ``before`` (stored at ``version``) into ``after``."""
        old, new = _dumped(before), _dumped(after)
        sets, removes = [], []
        names: dict[str, str] = {"#version": "version"}
        values: dict[str, Any] = {":version": {"N": str(version)}, ":next": {"N": str(version + 1)}}
        for index, field in enumerate(RunRecord.model_fields):
            if field in _KEY_FIELDS or field == "version" or old[field] == new[field]:
                continue
            name, value = f"#f{index}", new[field]
            names[name] = _alias(field)
            was = old[field]
            if value is None:
                removes.append(name)
            elif isinstance(value, list) and isinstance(was, list) and value[: len(was)] == was:
                # only new entries are sent; if_not_exists covers a field the stored item lacks
                values[f":f{index}"] = _encode(field, value[len(was) :])
                values[":empty"] = {"L": []}
                sets.append(f"{name} = list_append(if_not_exists({name}, :empty), :f{index})")
            else:
                values[f":f{index}"] = _encode(field, value)
                sets.append(f"{name} = :f{index}")
        sets.append("#version = :next")
        expression = "SET " + ", ".join(sets) + (" REMOVE " + ", ".join(removes) if removes else "")
        return {
            "UpdateExpression": expression,
            "ConditionExpression": "#version = :version",
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": values,
        }

    # ---- RunStore ---------------------------------------------------------------------------------

    def create(self, run: RunRecord) -> tuple[RunRecord, bool]:
        run = run.model_copy(update={"version": 1})
        try:
            self._client.put_item(
                TableName=self._table,
                Item=self._to_item(run),
                ConditionExpression="attribute_not_exists(pk)",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
            return self._remember(run), True
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise StorageUnavailable(
                    f"Could not store the run: {exc.response['Error']['Code']}"
                ) from None
            old = exc.response.get("Item")
            if old:
                return self._read(old), False
            existing = self.get(run.session, run.task_id)
            if existing is None:  # the run that refused ours is gone again (expired): the step retries
                raise StorageUnavailable("The run was there and then gone; retrying") from None
            return existing, False

    def create_many(self, runs: list[RunRecord]) -> list[tuple[RunRecord, bool]]:
        """Conditional puts, a hundred to a transaction: the transaction either stores them all, or names
        the ones that exist (with their items), and is sent again without them. A batch of 10,000 new runs
        takes 100 calls; a duplicate of it, 100 refused calls and no more.

        A transaction with room for it (at most 50 runs) also checks, per run, that no image of its task is
        on offer (``offer_marker_key``) and stores the run with ``no_offer_at_accept``: Generate's first try
        then needs no read. A task that has a marker is stored without it, in the next call."""
        found: dict[str, tuple[RunRecord, bool]] = {}
        for start in range(0, len(runs), TRANSACTION_ITEMS):
            chunk = runs[start : start + TRANSACTION_ITEMS]
            pending = _checked(
                [run.model_copy(update={"version": 1}) for run in chunk], len(chunk) * 2 <= TRANSACTION_ITEMS
            )
            for attempt in range(MAX_OPTIMISTIC_RETRIES * 2):
                if not pending:
                    break
                if attempt:
                    time.sleep(random.uniform(0.005, 0.02) * 2 ** min(attempt, 5))
                refused = self._put_all_or_find_existing(pending)
                if refused is None:  # a concurrent request's writes collided with these: again
                    continue
                existing, offered = refused
                if not existing and not offered:
                    found.update({run.task_id: (self._remember(run), True) for run in pending})
                    break
                found.update({run.task_id: (run, False) for run in existing.values()})
                pending = [
                    run.model_copy(update={"no_offer_at_accept": False}) if run.task_id in offered else run
                    for run in pending
                    if run.task_id not in existing
                ]
            else:
                raise StorageUnavailable("Could not store the runs: other writes kept colliding; try again.")
        return [found[run.task_id] for run in runs]

    def _put_all_or_find_existing(
        self, runs: list[RunRecord]
    ) -> tuple[dict[str, RunRecord], set[str]] | None:
        """Store every run in one transaction (({}, set())), or store none and return those already stored
        and the task ids whose offer check failed (None when the transaction was cancelled by a conflicting
        write in flight instead)."""
        items: list[dict[str, Any]] = []
        checked: list[tuple[RunRecord, bool]] = []  # per item: its run, and whether it is the offer check
        for run in runs:
            items.append(
                {
                    "Put": {
                        "TableName": self._table,
                        "Item": self._to_item(run),
                        "ConditionExpression": "attribute_not_exists(pk)",
                        "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                    }
                }
            )
            checked.append((run, False))
            if run.no_offer_at_accept:
                items.append(
                    {
                        "ConditionCheck": {
                            "TableName": self._table,
                            "Key": offer_marker_key(run.offer_scope),
                            "ConditionExpression": "attribute_not_exists(pk)",
                        }
                    }
                )
                checked.append((run, True))
        try:
            self._client.transact_write_items(TransactItems=items)
            return {}, set()
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            reasons = exc.response.get("CancellationReasons") or []
            if code != "TransactionCanceledException" or not reasons:
                raise StorageUnavailable(f"Could not store the runs: {code}") from None
        existing: dict[str, RunRecord] = {}
        offered: set[str] = set()
        for (run, is_check), reason in zip(checked, reasons, strict=True):  # one reason per item
            if reason.get("Code") != "ConditionalCheckFailed":
                continue
            if is_check:
                offered.add(run.task_id)
                continue
            stored = self._read(reason["Item"]) if reason.get("Item") else self.get(run.session, run.task_id)
            if stored is not None:
                existing[run.task_id] = stored
        return (existing, offered) if existing or offered else None

    def get(self, session: str, task_id: str) -> RunRecord | None:
        item = self._client.get_item(
            TableName=self._table, Key=_key(session, task_id), ConsistentRead=True
        ).get("Item")
        return self._read(item) if item else None

    def get_with_offer(self, session: str, task_id: str, fingerprint: str) -> tuple[RunRecord | None, bool]:
        """The run and the offered-image item (``DynamoReusableImages``, same table) in one consistent
        BatchGetItem: Generate then claims an offer (a write) only when there is one."""
        run_key, offer_key = _key(session, task_id), offered_image_key(fingerprint)
        keys, found = [run_key, offer_key], []
        for attempt in range(MAX_OPTIMISTIC_RETRIES):
            if attempt:  # keys DynamoDB left unprocessed (throttled): asked again, after a pause
                time.sleep(random.uniform(0.005, 0.02) * 2**attempt)
            answer = self._client.batch_get_item(
                RequestItems={self._table: {"Keys": keys, "ConsistentRead": True}}
            )
            found += answer.get("Responses", {}).get(self._table, [])
            keys = answer.get("UnprocessedKeys", {}).get(self._table, {}).get("Keys", [])
            if not keys:
                break
        else:
            raise StorageUnavailable("Could not read the run: DynamoDB kept leaving it unprocessed.")
        run_item = next((item for item in found if item["pk"] == run_key["pk"]), None)
        on_offer = any(item["pk"] == offer_key["pk"] for item in found)
        return (self._read(run_item) if run_item else None), on_offer

    def recent(self, session: str, task_id: str) -> RunRecord | None:
        """The record as this store last read or wrote it (no call); read when it has not seen it."""
        known = self._recent.get((session, task_id))
        return known.model_copy(deep=True) if known else self.get(session, task_id)

    def open_step(self, session: str, task_id: str, opening: StepOpening) -> tuple[RunRecord | None, bool]:
        """One UpdateItem under the opening's conditions that answers with the whole record (ALL_NEW), or,
        refused, with the record as it is (ALL_OLD): the step's read and its first write in one call. A
        record in the earlier one-document layout is refused too (the step then changes it as read)."""
        names = {
            "#version": "version",
            "#updated": _alias("updated_at_ms"),
            "#doc": "doc",
        }
        values: dict[str, Any] = {":one": {"N": "1"}, ":updated": {"N": str(opening.updated_at_ms)}}
        sets = ["#version = #version + :one", "#updated = :updated"]
        conditions = ["attribute_exists(pk)", "attribute_not_exists(#doc)"]
        if opening.caller is not None:
            names["#owner"] = _alias("owner")
            values[":caller"] = _encode("owner", opening.caller)
            conditions.append("(attribute_not_exists(#owner) OR #owner = :caller)")
        if opening.refused or opening.status is not None:
            names["#status"] = "status"
        if opening.refused:
            refused = [f":refused{index}" for index in range(len(opening.refused))]
            values |= {
                name: {"S": status.value} for name, status in zip(refused, opening.refused, strict=True)
            }
            conditions.append(f"NOT (#status IN ({', '.join(refused)}))")
        if opening.status is not None:
            values[":status"] = {"S": opening.status.value}
            sets.append("#status = :status")
        for index, (field, value) in enumerate(opening.sets.items()):
            names[f"#s{index}"] = _alias(field)
            values[f":s{index}"] = _encode(field, _as_json(value))
            sets.append(f"#s{index} = :s{index}")
        for index, field in enumerate(opening.absent):
            names[f"#x{index}"] = _alias(field)
            conditions.append(f"attribute_not_exists(#x{index})")
        for index, (field, value) in enumerate(opening.equal.items()):
            names[f"#e{index}"] = _alias(field)
            values[f":e{index}"] = _encode(field, _as_json(value))
            conditions.append(f"#e{index} = :e{index}")
        if opening.entries:
            names["#timeline"] = _alias("timeline")
            values[":entries"] = _encode(
                "timeline", [entry.model_dump(mode="json") for entry in opening.entries]
            )
            values[":empty"] = {"L": []}
            sets.append("#timeline = list_append(if_not_exists(#timeline, :empty), :entries)")
        try:
            item = self._client.update_item(
                TableName=self._table,
                Key=_key(session, task_id),
                UpdateExpression="SET " + ", ".join(sets),
                ConditionExpression=" AND ".join(conditions),
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=values,
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )["Attributes"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            current = exc.response.get("Item")
            return (self._read(current) if current else None), False
        return self._read(item), True

    def update(self, session: str, task_id: str, mutate: Callable[[RunRecord], None]) -> RunRecord:
        """Read the record, then change it (for callers that do not hold it already)."""
        run = self.get(session, task_id)
        if run is None:
            raise KeyError(f"no run for session {session!r} task {task_id!r}")
        return self.change(run, mutate)

    def change(self, run: RunRecord, mutate: Callable[[RunRecord], None]) -> RunRecord:
        """Apply ``mutate`` to the record the caller holds and write only what it changed, in one UpdateItem
        under the version the caller read. ``mutate`` may raise to refuse the change (a condition): on a
        conflict it runs again on the record as it now is."""
        key = (run.session, run.task_id)
        for attempt in range(MAX_OPTIMISTIC_RETRIES):
            if attempt:
                time.sleep(random.uniform(0.005, 0.02) * 2**attempt)  # spread out the writers that collided
            after = run.model_copy(deep=True)
            mutate(after)
            after.version = run.version + 1
            # What is stored at that version, as this store last saw it: changes the caller made in memory
            # before calling are written too.
            known = self._recent.get(key)
            stored = known if known is not None and known.version == run.version else run
            try:
                if key in self._legacy:
                    self._client.put_item(
                        TableName=self._table,
                        Item=self._to_item(after),
                        ConditionExpression="version = :v",
                        ExpressionAttributeValues={":v": {"N": str(run.version)}},
                        ReturnValuesOnConditionCheckFailure="ALL_OLD",
                    )
                    self._legacy.discard(key)
                else:
                    self._client.update_item(
                        TableName=self._table,
                        Key=_key(*key),
                        ReturnValuesOnConditionCheckFailure="ALL_OLD",
                        **self._changes(stored, after, run.version),
                    )
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
                current = exc.response.get("Item")
                if not current:
                    raise KeyError(f"no run for session {run.session!r} task {run.task_id!r}") from None
                run = self._read(current)
                continue
            after.fill_durations()
            return self._remember(after)
        raise StorageUnavailable(f"The run {run.session}/{run.task_id} kept changing under us; try again.")

    def list_session(self, session: str) -> list[RunRecord]:
        runs: list[RunRecord] = []
        kwargs = self._session_query(session)
        while True:
            page = self._client.query(**kwargs)
            runs.extend(self._from_item(item)[0] for item in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return runs
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    # ---- SessionPages -----------------------------------------------------------------------------

    def _session_query(self, session: str) -> dict[str, Any]:
        return {
            "TableName": self._table,
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :task)",
            "ExpressionAttributeValues": {":pk": {"S": f"SESSION#{session}"}, ":task": {"S": "TASK#"}},
            "ConsistentRead": True,
        }

    def tallies(self, session: str) -> list[RunTally]:
        """Every run of the session from the ``RunTallies`` index, whose items hold only what the summary
        counts (200-600 bytes a run): a Query reads whole items, so from the table it would read every
        prompt, chunk and timeline, 1 MB a call. The index is eventually consistent (on AWS it trails a
        write by a fraction of a second); each run is one item there whose key no write changes, so a run
        is never counted twice or missed. Records in the earlier one-document layout are not in it."""
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "IndexName": TALLY_INDEX,
            "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": {"S": f"SESSION#{session}"}},
        }
        tallies: list[RunTally] = []
        while True:
            page = self._client.query(**kwargs)
            tallies.extend(self._tally(item) for item in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return tallies
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    @staticmethod
    def _tally(item: dict[str, Any]) -> RunTally:
        from dalle_plugin.domain.step_io.api import RunTally

        values = {
            name: _decode(_FIELD_OF_ALIAS[name], value)
            for name, value in item.items()
            if name in _FIELD_OF_ALIAS
        }
        images = ([values["image"]] if values.get("image") else []) + (values.get("moreImages") or [])
        return RunTally.model_validate(
            values | {"taskId": item["sk"]["S"].removeprefix("TASK#"), "imageCount": len(images)}
        )

    def page(self, session: str, limit: int, after: str | None) -> tuple[list[RunRecord], str | None]:
        """One Query (so at most 1 MB of records, whatever ``limit``), without the sealed secrets. It asks for
        one run more than ``limit``, so the last page says it is the last."""
        projection, names = self.readable_attributes()
        kwargs = self._session_query(session) | {
            "Limit": limit + 1,
            "ProjectionExpression": projection,
            "ExpressionAttributeNames": names,
        }
        if after is not None:
            kwargs["ExclusiveStartKey"] = _key(session, after)
        page = self._client.query(**kwargs)
        runs = [self._from_item(item)[0] for item in page.get("Items", [])]
        if len(runs) > limit:
            return runs[:limit], runs[limit - 1].task_id
        return runs, (runs[-1].task_id if runs and "LastEvaluatedKey" in page else None)

    def _remember(self, run: RunRecord) -> RunRecord:
        self._recent[(run.session, run.task_id)] = run.model_copy(deep=True)  # the caller's copy may change
        return run
