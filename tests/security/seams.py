"""Counters around what the API may spend: a KMS seal, a run record, an execution, and every AWS call the
API function makes. In-process, where the local stack runs the handlers."""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

SERVICES = ("dynamodb", "kms", "stepfunctions", "s3", "secretsmanager")


@contextmanager
def spending(stack: Any) -> Iterator[Counter]:
    """Counts ``seal``, ``create`` and ``start`` (whoever calls them: only the API does) and, as
    ``aws:<Operation>``, every AWS call made while the API function runs."""
    from dalle_plugin import wiring
    from dalle_plugin.adapters import aws, dynamo_runs

    counts: Counter = Counter()
    lock = threading.Lock()
    inside_api = threading.local()

    def count(name: str) -> None:
        with lock:
            counts[name] += 1

    def counting(owner: type, method: str, name: str) -> Any:
        original = getattr(owner, method)

        def wrapper(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
            count(name)
            return original(self, *args, **kwargs)

        setattr(owner, method, wrapper)
        return original

    originals = {
        (aws.KmsSecretVault, "seal"): counting(aws.KmsSecretVault, "seal", "seal"),
        (dynamo_runs.DynamoRunStore, "create"): counting(dynamo_runs.DynamoRunStore, "create", "create"),
        (aws.StepFunctionsStarter, "start"): counting(aws.StepFunctionsStarter, "start", "start"),
    }

    def on_call(model: Any, **_: Any) -> None:
        if getattr(inside_api, "active", False):
            count(f"aws:{model.name}")

    clients = [wiring.aws_client(service) for service in SERVICES]
    for client in clients:
        client.meta.events.register("before-call", on_call)

    invoke = stack.lambdas.invoke

    def invoke_marked(name_or_arn: str, body: Any) -> Any:
        api = stack.lambdas.spec_for(name_or_arn).logical_id == "ApiFunction"
        inside_api.active = api
        try:
            return invoke(name_or_arn, body)
        finally:
            inside_api.active = False

    stack.lambdas.invoke = invoke_marked
    try:
        yield counts
    finally:
        del stack.lambdas.invoke  # back to the class's method
        for client in clients:
            client.meta.events.unregister("before-call", on_call)
        for (owner, method), original in originals.items():
            setattr(owner, method, original)
