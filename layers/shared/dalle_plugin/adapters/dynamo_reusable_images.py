"""Undelivered paid images in the sessions table: pk ``IMAGE#<fingerprint>``, sk ``REUSABLE``.

An item exists only while an image is on offer: a failed run that had paid for its image puts it, the next
run with the same fingerprint deletes it as it takes it (``ReturnValues=ALL_OLD``: of two runs racing for it,
exactly one gets the key). The item expires with the run records (TTL), before the bucket's lifecycle rule
removes the image itself.

Each offer also puts a marker for its task (pk ``IMAGE#<offer scope>``, sk ``OFFERED``, expiring with it):
the API's transaction that stores a new run checks that no marker exists, so Generate's first try of a run
accepted without one need not look for an offer (``DynamoRunStore.create_many``).
"""

from __future__ import annotations

from typing import Any

from botocore.exceptions import ClientError

from dalle_plugin.domain.errors import StorageUnavailable


def offered_image_key(fingerprint: str) -> dict[str, Any]:
    return {"pk": {"S": f"IMAGE#{fingerprint}"}, "sk": {"S": "REUSABLE"}}


def offer_marker_key(scope: str) -> dict[str, Any]:
    return {"pk": {"S": f"IMAGE#{scope}"}, "sk": {"S": "OFFERED"}}


class DynamoReusableImages:
    def __init__(self, client: Any, table_name: str):
        self._client = client
        self._table = table_name

    def offer(self, fingerprint: str, key: str, expires_at: int, scope: str) -> None:
        item = offered_image_key(fingerprint) | {"imageKey": {"S": key}, "expiresAt": {"N": str(expires_at)}}
        marker = offer_marker_key(scope) | {"expiresAt": {"N": str(expires_at)}}
        try:
            # The marker first: an offer is never there without it (a run accepted in between looks anyway).
            self._client.put_item(TableName=self._table, Item=marker)
            self._client.put_item(TableName=self._table, Item=item)
        except ClientError as exc:
            code = exc.response["Error"]["Code"]
            raise StorageUnavailable(f"Could not keep the image for a re-run: {code}") from None

    def claim(self, fingerprint: str) -> str | None:
        try:
            old = self._client.delete_item(
                TableName=self._table, Key=offered_image_key(fingerprint), ReturnValues="ALL_OLD"
            )
        except ClientError as exc:
            raise StorageUnavailable(
                f"Could not look for a reusable image: {exc.response['Error']['Code']}"
            ) from None
        attributes = old.get("Attributes") or {}
        return attributes["imageKey"]["S"] if "imageKey" in attributes else None
