"""The batch starter's progress in the sessions table: pk ``BATCH#<session>``, sk ``REQUEST#<digest>``, in a
partition of its own so that a session's run queries never meet it."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from dalle_plugin.port_records import BatchState

#: attribute names ("stored" is one of DynamoDB's reserved words)
_NAMES = {"#attempt": "attempt", "#accepted": "accepted", "#stored": "stored"}
_ENDED = {"#endedBy": "endedBy", "#endedWhy": "endedWhy"}


def _key(session: str, digest: str) -> dict[str, Any]:
    return {"pk": {"S": f"BATCH#{session}"}, "sk": {"S": f"REQUEST#{digest}"}}


def _state(item: dict[str, Any]) -> BatchState:
    return BatchState(
        digest=item["sk"]["S"].removeprefix("REQUEST#"),
        attempt=int(item["attempt"]["N"]),
        accepted=int(item["accepted"]["N"]),
        stored=int(item["stored"]["N"]),
        ended_by=item.get("endedBy", {}).get("S"),
        ended_why=item.get("endedWhy", {}).get("S"),
    )


def _refused(exc: ClientError) -> bool:
    return exc.response["Error"]["Code"] == "ConditionalCheckFailedException"


class DynamoBatchProgress:
    def __init__(self, client: Any, table_name: str):
        self._client = client
        self._table = table_name

    def begin(
        self, session: str, digest: str, accepted: int, expires_at: int
    ) -> tuple[BatchState, BatchState | None]:
        # A new attempt only when none is under way: the condition and the increment are one write, so of
        # concurrent requests one begins it and the others join it.
        try:
            old = self._client.update_item(
                TableName=self._table,
                Key=_key(session, digest),
                UpdateExpression=(
                    "SET #attempt = if_not_exists(#attempt, :zero) + :one, #accepted = :accepted, "
                    "#stored = :zero, #expires = :expires REMOVE #endedBy, #endedWhy"
                ),
                ConditionExpression=(
                    "attribute_not_exists(pk) OR #stored >= #accepted OR attribute_exists(#endedBy)"
                ),
                ExpressionAttributeNames=_NAMES | _ENDED | {"#expires": "expiresAt"},
                ExpressionAttributeValues={
                    ":zero": {"N": "0"},
                    ":one": {"N": "1"},
                    ":accepted": {"N": str(accepted)},
                    ":expires": {"N": str(expires_at)},
                },
                ReturnValues="ALL_OLD",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            ).get("Attributes")
        except ClientError as exc:
            if not _refused(exc) or "Item" not in exc.response:
                raise
            under_way = _state(exc.response["Item"])
            return under_way, under_way
        before = _state(old) if old else None
        attempt = (before.attempt if before else 0) + 1
        return BatchState(digest=digest, attempt=attempt, accepted=accepted, stored=0), before

    def stored(self, session: str, digest: str, attempt: int, stored: int) -> bool:
        try:
            self._client.update_item(
                TableName=self._table,
                Key=_key(session, digest),
                UpdateExpression="SET #stored = :stored",
                ConditionExpression="#attempt = :attempt AND #stored < :stored AND attribute_not_exists(#endedBy)",
                # only the names the expressions use: DynamoDB refuses any other
                ExpressionAttributeNames={"#attempt": "attempt", "#stored": "stored", "#endedBy": "endedBy"},
                ExpressionAttributeValues={":stored": {"N": str(stored)}, ":attempt": {"N": str(attempt)}},
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if not _refused(exc):
                raise
            # a retried step that already recorded as much, or a later attempt, goes on; an ended one stops
            now = _state(exc.response["Item"]) if "Item" in exc.response else None
            return now is None or now.attempt != attempt or now.ended_by is None
        return True

    def end(self, session: str, digest: str, attempt: int, ended_by: str, why: str) -> bool:
        try:
            self._client.update_item(
                TableName=self._table,
                Key=_key(session, digest),
                UpdateExpression="SET #endedBy = :by, #endedWhy = :why",
                ConditionExpression=(
                    "#attempt = :attempt AND #stored < #accepted AND attribute_not_exists(#endedBy)"
                ),
                ExpressionAttributeNames=_NAMES | _ENDED,
                ExpressionAttributeValues={
                    ":attempt": {"N": str(attempt)},
                    ":by": {"S": ended_by},
                    ":why": {"S": why},
                },
            )
        except ClientError as exc:
            if not _refused(exc):
                raise
            return False  # stored in full meanwhile, ended already, or a later attempt under way
        return True

    def of_session(self, session: str) -> list[BatchState]:
        page = self._client.query(
            TableName=self._table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": f"BATCH#{session}"}},
            ConsistentRead=True,
        )
        return [_state(item) for item in page.get("Items", [])]
