"""A DynamoDB Local of a test module's own, with one table shaped as the sessions table (pk, sk), for the
race tests of the adapters that write to it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import boto3

from local_stack.dynamodb_local import DynamoDBLocal


def make_client(endpoint: str):
    return boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )


@contextmanager
def sessions_shaped_table(name: str) -> Iterator[str]:
    """DynamoDB Local with the table ``name``; yields its endpoint."""
    with DynamoDBLocal() as dynamodb:
        make_client(dynamodb.endpoint_url).create_table(
            TableName=name,
            KeySchema=[
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        yield dynamodb.endpoint_url
