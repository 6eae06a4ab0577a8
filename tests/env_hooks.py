"""Installed in every Lambda execution environment of the test stacks (``StackOptions.hook_modules``): the
seams where the fault suite crashes a step after its side effects, and the counters the security tests
read, all dormant until a test arms them on the seam board (``local_stack.seams``).

Each wrapper sits where a step has done something outside and not yet recorded it."""

from __future__ import annotations

import json
import os
from typing import Any

from local_stack.seams import SeamBoard, raise_spec

SPENDING = "spending"
SPENDING_ACTIVE = "spending-active"


def _board() -> SeamBoard:
    return SeamBoard.from_environment()


def session_of(event: dict) -> str:
    if "session" in event:
        return event["session"]
    try:  # an API Gateway event: the hub payload is the body
        return json.loads(event.get("body") or "{}").get("session") or ""
    except (
        ValueError,
        AttributeError,
        RecursionError,
    ):  # whatever the fuzzer sends, the seam stays out of it
        return ""


def _is_api() -> bool:
    return os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "").endswith("-ApiFunction")


def _spending_active(board: SeamBoard) -> bool:
    return (board.root / SPENDING_ACTIVE).exists()


def _count(board: SeamBoard, name: str) -> None:
    if _spending_active(board):
        board.record(SPENDING, name, 1)


def install() -> None:
    board = _board()
    if board is None:
        return
    from botocore.client import BaseClient
    from dalle_plugin.adapters import aws, dynamo_rate_limiter, dynamo_runs, hub_http

    def wrap(owner: type, name: str, make: Any) -> None:
        setattr(owner, name, make(getattr(owner, name)))

    def put_image(original: Any) -> Any:
        def wrapper(self, key, body, content_type, metadata):
            stored = original(self, key, body, content_type, metadata)
            # images/<execution name>.<prompt fingerprint>[.<n>].<extension>: the seam is keyed by the run
            spec = board.take("after_put_png", key.removeprefix("images/").split(".", 1)[0])
            if spec:
                raise_spec(spec)
            return stored

        return wrapper

    def attach_image(original: Any) -> Any:
        def wrapper(self, project_id, external_id, image_url):
            original(self, project_id, external_id, image_url)
            spec = board.take("after_attach", external_id)
            if spec:
                raise_spec(spec)

        return wrapper

    def start(original: Any) -> Any:
        def wrapper(self, name, run_input):
            _count(board, "start")
            spec = board.take("before_start", run_input.get("session", ""))
            if not spec and "tasks" in run_input:  # a chunk's run execution (the batch starter's has none)
                spec = board.take("before_run_start", run_input.get("session", ""))
            if spec:
                raise_spec(spec)
            return original(self, name, run_input)

        return wrapper

    def claim(original: Any) -> Any:
        def wrapper(self, ask, *args, **kwargs):
            board.record("tickets", ask.send.rsplit("#", 1)[0], ask.send)
            return original(self, ask, *args, **kwargs)

        return wrapper

    def counted(name: str) -> Any:
        def make(original: Any) -> Any:
            def wrapper(self, *args, **kwargs):
                _count(board, name)
                return original(self, *args, **kwargs)

            return wrapper

        return make

    def api_call(original: Any) -> Any:
        def wrapper(self, operation_name, api_params):
            if _is_api():
                _count(board, f"aws:{operation_name}")
            return original(self, operation_name, api_params)

        return wrapper

    wrap(aws.S3ImageStore, "put_image", put_image)
    wrap(hub_http.AngoHubClient, "attach_image", attach_image)
    wrap(aws.StepFunctionsStarter, "start", start)
    wrap(dynamo_rate_limiter.DynamoRateLimiter, "claim", claim)
    wrap(aws.KmsSecretVault, "seal", counted("seal"))
    wrap(dynamo_runs.DynamoRunStore, "create", counted("create"))
    wrap(BaseClient, "_make_api_call", api_call)


def before_handler(function: str, event: dict) -> None:
    """A fault as the handler is invoked, before it does anything: a step held at its start."""
    _take_handler_fault("before_handler", function, event)


def after_handler(function: str, event: dict, result: Any) -> None:
    """A crash after the handler returned, all its side effects done."""
    _take_handler_fault("after_handler", function, event)


def _take_handler_fault(table: str, function: str, event: dict) -> None:
    board = _board()
    if board is None or not any((board.root / table).glob("*")):  # nothing armed: stay out of it
        return
    spec = board.take(table, f"{function}|{session_of(event)}")
    if spec:
        raise_spec(spec)
