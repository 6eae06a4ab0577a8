"""Counters with a limit in the sessions table: pk ``<counter>``, sk ``ALLOWANCE``.

One conditional UpdateItem per grant: ``used`` grows by the amount only while it stays within the limit
(the condition compares with ``limit - amount``, computed here, since conditions cannot add), and the
ticket joins the item's ``tickets`` set in the same write, so a retried step finds its grant instead of
counting it twice. A release takes the amount back and the ticket out, on condition the ticket is there.

The sessions table rather than the rate-limit table: its TTL removes spent day counters by itself, and the
rate-limit table's items belong to the limiter's own design.
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from dalle_plugin.domain.errors import StorageUnavailable
from dalle_plugin.port_records import AllowanceAnswer

SORT_KEY = "ALLOWANCE"


def _key(counter: str) -> dict[str, Any]:
    return {"pk": {"S": counter}, "sk": {"S": SORT_KEY}}


class DynamoAllowanceLedger:
    def __init__(self, client: Any, table_name: str):
        self._client = client
        self._table = table_name

    def reserve(self, counter: str, ticket: str, amount: int, limit: int, expires_at: int) -> AllowanceAnswer:
        try:
            answer = self._client.update_item(
                TableName=self._table,
                Key=_key(counter),
                UpdateExpression="ADD used :amount, tickets :tickets SET expiresAt = if_not_exists(expiresAt, :expires)",
                ConditionExpression="(attribute_not_exists(used) OR used <= :room) AND NOT contains(tickets, :ticket)",
                ExpressionAttributeValues={
                    ":amount": {"N": str(amount)},
                    ":tickets": {"SS": [ticket]},
                    ":ticket": {"S": ticket},
                    ":room": {"N": str(limit - amount)},
                    ":expires": {"N": str(expires_at)},
                },
                ReturnValues="UPDATED_NEW",
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise StorageUnavailable(
                    f"Could not count against a limit: {exc.response['Error']['Code']}"
                ) from None
            old = exc.response.get("Item") or {}
            used = int(old.get("used", {}).get("N", "0"))
            return AllowanceAnswer(granted=ticket in old.get("tickets", {}).get("SS", []), used=used)
        return AllowanceAnswer(granted=True, used=int(answer["Attributes"]["used"]["N"]))

    def release(self, counter: str, ticket: str, amount: int) -> None:
        try:
            self._client.update_item(
                TableName=self._table,
                Key=_key(counter),
                UpdateExpression="ADD used :minus DELETE tickets :tickets",
                ConditionExpression="contains(tickets, :ticket)",
                ExpressionAttributeValues={
                    ":minus": {"N": str(-amount)},
                    ":tickets": {"SS": [ticket]},
                    ":ticket": {"S": ticket},
                },
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":  # already given back
                raise StorageUnavailable(
                    f"Could not give back a reservation: {exc.response['Error']['Code']}"
                ) from None

    def used(self, counter: str) -> int:
        """The counter's total (0 when nothing was ever counted)."""
        item = (
            self._client.get_item(TableName=self._table, Key=_key(counter), ConsistentRead=True).get("Item")
            or {}
        )
        return int(item.get("used", {}).get("N", "0"))
