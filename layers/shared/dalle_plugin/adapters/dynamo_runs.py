"""Run records in the sessions table: pk ``SESSION#<session>``, sk ``TASK#<task>``.

The record is stored as one JSON document (``doc``) beside the few attributes DynamoDB needs to see
(status, version, TTL); the sealed secrets are a separate binary attribute, removed when the run ends.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any, Callable

from botocore.exceptions import ClientError

from dalle_plugin.domain.errors import StorageUnavailable
from dalle_plugin.domain.run import RunRecord

MAX_OPTIMISTIC_RETRIES = 8


def _key(session: str, task_id: str) -> dict[str, Any]:
    return {"pk": {"S": f"SESSION#{session}"}, "sk": {"S": f"TASK#{task_id}"}}


class DynamoRunStore:
    def __init__(self, client: Any, table_name: str):
        self._client = client
        self._table = table_name

    # ---- mapping ----------------------------------------------------------------------------------

    @staticmethod
    def _to_item(run: RunRecord, version: int) -> dict[str, Any]:
        doc = run.model_dump(by_alias=True, mode="json", exclude={"sealed_secrets"})
        item = _key(run.session, run.task_id) | {
            "status": {"S": run.status.value},
            "version": {"N": str(version)},
            "doc": {"S": json.dumps(doc, separators=(",", ":"))},
        }
        if run.expires_at:
            item["expiresAt"] = {"N": str(run.expires_at)}
        if run.sealed_secrets:
            item["sealedSecrets"] = {"B": run.sealed_secrets}
        return item

    @staticmethod
    def _from_item(item: dict[str, Any]) -> tuple[RunRecord, int]:
        doc = json.loads(item["doc"]["S"])
        if "sealedSecrets" in item:
            doc["sealedSecrets"] = item["sealedSecrets"]["B"]
        return RunRecord.model_validate(doc), int(item["version"]["N"])

    # ---- RunStore ---------------------------------------------------------------------------------

    def create(self, run: RunRecord) -> tuple[RunRecord, bool]:
        try:
            self._client.put_item(
                TableName=self._table,
                Item=self._to_item(run, version=1),
                ConditionExpression="attribute_not_exists(pk)",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
            return run, True
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise StorageUnavailable(f"Could not store the run: {exc.response['Error']['Code']}") from None
            old = exc.response.get("Item")
            if old:
                return self._from_item(old)[0], False
            existing = self.get(run.session, run.task_id)
            assert existing is not None
            return existing, False

    def _get_versioned(self, session: str, task_id: str) -> tuple[RunRecord, int] | None:
        item = self._client.get_item(TableName=self._table, Key=_key(session, task_id), ConsistentRead=True).get("Item")
        return self._from_item(item) if item else None

    def get(self, session: str, task_id: str) -> RunRecord | None:
        found = self._get_versioned(session, task_id)
        return found[0] if found else None

    def update(self, session: str, task_id: str, mutate: Callable[[RunRecord], None]) -> RunRecord:
        for attempt in range(MAX_OPTIMISTIC_RETRIES):
            if attempt:
                time.sleep(random.uniform(0.005, 0.02) * 2**attempt)  # spread out the writers that collided
            found = self._get_versioned(session, task_id)
            if found is None:
                raise KeyError(f"no run for session {session!r} task {task_id!r}")
            run, version = found
            mutate(run)
            try:
                self._client.put_item(
                    TableName=self._table,
                    Item=self._to_item(run, version + 1),
                    ConditionExpression="version = :v",
                    ExpressionAttributeValues={":v": {"N": str(version)}},
                )
                return run
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
        raise StorageUnavailable(f"The run {session}/{task_id} kept changing under us; try again.")

    def list_session(self, session: str) -> list[RunRecord]:
        runs: list[RunRecord] = []
        kwargs: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "pk = :pk AND begins_with(sk, :task)",
            "ExpressionAttributeValues": {":pk": {"S": f"SESSION#{session}"}, ":task": {"S": "TASK#"}},
            "ConsistentRead": True,
        }
        while True:
            page = self._client.query(**kwargs)
            runs.extend(self._from_item(item)[0] for item in page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return runs
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
