"""A DynamoDB Local of a test module's own, with one table shaped as the sessions table (as template.yaml
defines it) or the rate-limit table (pk), for the race tests of the adapters that write to them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

from dalle_plugin.domain.run import ModelInfo, RunRecord, TimelineEntry

from local_stack.dynamodb_local import DynamoDBLocal
from local_stack.dynamodb_local import local_client as make_client
from local_stack.template import create_table_from_template


@contextmanager
def table_on_dynamodb_local(name: str, keys: tuple[str, ...] = ("pk", "sk")) -> Iterator[str]:
    """DynamoDB Local with the table ``name`` keyed by ``keys`` (hash, then range); yields its endpoint."""
    with DynamoDBLocal() as dynamodb:
        make_client(dynamodb.endpoint_url).create_table(
            TableName=name,
            KeySchema=[
                {"AttributeName": key, "KeyType": kind}
                for key, kind in zip(keys, ("HASH", "RANGE"), strict=False)
            ],
            AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"} for key in keys],
            BillingMode="PAY_PER_REQUEST",
        )
        yield dynamodb.endpoint_url


@contextmanager
def sessions_shaped_table(name: str) -> Iterator[str]:
    """DynamoDB Local with the sessions table as template.yaml defines it (its index included), named
    ``name``; yields its endpoint."""
    with DynamoDBLocal() as dynamodb:
        create_table_from_template(make_client(dynamodb.endpoint_url), "SessionsTable", name)
        yield dynamodb.endpoint_url


def limiter_shaped_table(name: str) -> contextlib.AbstractContextManager[str]:
    return table_on_dynamodb_local(name, ("pk",))


def queued_run(session: str, task_id: str, owner: str | None = None) -> RunRecord:
    """A freshly queued shared-key run of ``session``, as the API stores it, for the run-store tests."""
    return RunRecord(
        session=session,
        task_id=task_id,
        execution_name=f"{session}_{task_id}",
        owner=owner,
        project_id="p",
        prompt_source="asset",
        model=ModelInfo(requested="gpt-image-2", actual="gpt-image-2"),
        size="1024x1024",
        max_prompt_chars=32000,
        uses_default_key=True,
        created_at_ms=1,
        updated_at_ms=1,
        sealed_secrets=b"sealed",
        timeline=[TimelineEntry(step="queued", status="QUEUED", at_ms=1)],
    )
