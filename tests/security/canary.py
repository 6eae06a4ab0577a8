"""Canary secrets and the scan that looks for them everywhere the local stack keeps anything.

A canary is a random, recognisable secret (an OpenAI key, an Ango apiKey) that a test hands the plugin
exactly as a hub user would. The scan reads every place a secret could leak to: every CloudWatch log event
of every log group, every Step Functions execution (input, output, every history event), every item of
every DynamoDB table (binary attributes included), every S3 object (body and metadata), everything the hub
and OpenAI emulators recorded, and any extra text a test collected (API answers, Python log records,
stdout). It looks for the canary as sent, for its random core alone, and for its base64 forms at every
alignment (a secret inside a base64 blob is still a secret).
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Canary:
    openai_key: str
    ango_key: str

    @classmethod
    def new(cls) -> Canary:
        return cls(
            openai_key=f"sk-canary-{secrets.token_hex(20)}", ango_key=f"ango-canary-{secrets.token_hex(20)}"
        )

    @property
    def values(self) -> tuple[str, str]:
        return (self.openai_key, self.ango_key)


def needles(secret: str) -> list[bytes]:
    """Byte strings whose presence anywhere means the secret leaked."""
    raw = secret.encode()
    found = {raw, secret.rsplit("-", 1)[-1].encode()}
    for pad in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(b"\0" * pad + raw)
            # Keep only the 4-character groups made of the secret's bytes alone: the first group holds the
            # bytes before it (when not aligned), the last one the bytes after it.
            found.add(encoded[4 if pad else 0 : -4])
    return sorted(found, key=len)


@dataclass
class Corpus:
    """Everything scanned, as (where, bytes) pairs."""

    parts: list[tuple[str, bytes]] = field(default_factory=list)

    def add(self, where: str, data: Any) -> None:
        if isinstance(data, bytes):
            self.parts.append((where, data))
        elif isinstance(data, str):
            self.parts.append((where, data.encode("utf-8", "surrogatepass")))
        else:
            self.parts.append((where, json.dumps(data, default=_json_default).encode()))

    def hits(self, secret: str) -> list[str]:
        marks = needles(secret)
        return [where for where, data in self.parts if any(mark in data for mark in marks)]

    def __len__(self) -> int:
        return len(self.parts)


def _json_default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(bytes(value)).decode() + " " + bytes(value).decode("latin-1")
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return repr(value)


def _pages(client: Any, operation: str, key: str, **kwargs: Any) -> Iterator[Any]:
    for page in client.get_paginator(operation).paginate(**kwargs):
        yield from page.get(key, [])


def collect(stack: Any, extra: Iterable[tuple[str, Any]] = ()) -> Corpus:
    corpus = Corpus()
    logs = stack.client("logs")
    for group in _pages(logs, "describe_log_groups", "logGroups"):
        name = group["logGroupName"]
        for event in _pages(logs, "filter_log_events", "events", logGroupName=name):
            corpus.add(f"logs:{name}", event["message"])

    sfn = stack.client("stepfunctions")
    for machine in _pages(sfn, "list_state_machines", "stateMachines"):
        for execution in _pages(
            sfn, "list_executions", "executions", stateMachineArn=machine["stateMachineArn"]
        ):
            arn = execution["executionArn"]
            corpus.add(f"sfn:{arn}", sfn.describe_execution(executionArn=arn))
            history = list(
                _pages(sfn, "get_execution_history", "events", executionArn=arn, includeExecutionData=True)
            )
            corpus.add(f"sfn-history:{arn}", history)

    dynamodb = stack.client("dynamodb")
    for table in _pages(dynamodb, "list_tables", "TableNames"):
        for item in _pages(dynamodb, "scan", "Items", TableName=table):
            corpus.add(f"dynamodb:{table}", item)

    s3 = stack.client("s3")
    for bucket in s3.list_buckets().get("Buckets", []):
        for obj in _pages(s3, "list_objects_v2", "Contents", Bucket=bucket["Name"]):
            got = s3.get_object(Bucket=bucket["Name"], Key=obj["Key"])
            corpus.add(f"s3:{bucket['Name']}/{obj['Key']}", got["Body"].read())
            corpus.add(f"s3-metadata:{bucket['Name']}/{obj['Key']}", got.get("Metadata", {}))

    corpus.add("hub-emulator:state", stack.hub.state())
    for stored in stack.hub.stored_files():
        corpus.add(f"hub-storage:{stored['url']}", stored["body"])
    if stack.openai is not None:
        corpus.add("openai-emulator:requests", [asdict(r) for r in stack.openai.requests])
    for where, data in extra:
        corpus.add(where, data)
    return corpus
