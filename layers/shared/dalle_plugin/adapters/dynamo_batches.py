"""The batch starter's progress in the sessions table: pk ``BATCH#<session>``, sk ``REQUEST#<digest>``, in a
partition of its own so that a session's run queries never meet it."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from dalle_plugin.ports import BatchState

#: attribute names ("stored" is one of DynamoDB's reserved words)
_NAMES = {"#attempt": "attempt", "#accepted": "accepted", "#stored": "stored"}


def _key(session: str, digest: str) -> dict[str, Any]:
    return {"pk": {"S": f"BATCH#{session}"}, "sk": {"S": f"REQUEST#{digest}"}}


def _state(item: dict[str, Any]) -> BatchState:
    return BatchState(
        digest=item["sk"]["S"].removeprefix("REQUEST#"),
        attempt=int(item["attempt"]["N"]),
        accepted=int(item["accepted"]["N"]),
        stored=int(item["stored"]["N"]),
    )


class DynamoBatchProgress:
    def __init__(self, client: Any, table_name: str):
        self._client = client
        self._table = table_name

    def begin(self, session: str, digest: str, accepted: int, expires_at: int) -> tuple[BatchState, bool]:
        # A new attempt only when none is under way: the condition and the increment are one write, so of
        # concurrent requests one begins it and the others join it.
        try:
            item = self._client.update_item(
                TableName=self._table,
                Key=_key(session, digest),
                UpdateExpression=(
                    "SET #attempt = if_not_exists(#attempt, :zero) + :one, #accepted = :accepted, "
                    "#stored = :zero, #expires = :expires"
                ),
                ConditionExpression="attribute_not_exists(pk) OR #stored >= #accepted",
                ExpressionAttributeNames=_NAMES | {"#expires": "expiresAt"},
                ExpressionAttributeValues={
                    ":zero": {"N": "0"},
                    ":one": {"N": "1"},
                    ":accepted": {"N": str(accepted)},
                    ":expires": {"N": str(expires_at)},
                },
                ReturnValues="ALL_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )["Attributes"]
            return _state(item), True
        except ClientError as exc:
            if (
                exc.response["Error"]["Code"] != "ConditionalCheckFailedException"
                or "Item" not in exc.response
            ):
                raise
            return _state(exc.response["Item"]), False

    def stored(self, session: str, digest: str, attempt: int, stored: int) -> None:
        try:
            self._client.update_item(
                TableName=self._table,
                Key=_key(session, digest),
                UpdateExpression="SET #stored = :stored",
                ConditionExpression="#attempt = :attempt AND #stored < :stored",
                ExpressionAttributeNames=_NAMES,
                ExpressionAttributeValues={":stored": {"N": str(stored)}, ":attempt": {"N": str(attempt)}},
            )
        except ClientError as exc:  # a retried step that already recorded as much, or a later attempt
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    def of_session(self, session: str) -> list[BatchState]:
        page = self._client.query(
            TableName=self._table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": f"BATCH#{session}"}},
            ConsistentRead=True,
        )
        return [_state(item) for item in page.get("Items", [])]
