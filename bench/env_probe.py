"""Installed in every Lambda execution environment of a bench stack (``StackOptions.hook_modules``): what
the handlers do, written where the bench process can read it.

Every environment is an OS process of its own (local_stack/lambda_runtime.py), so the bench cannot hook the
handlers' clients from its own process. This module, imported by the environment before its handler,
appends one JSON line per event to ``$BENCH_PROBE_DIR/<pid>.jsonl``:

* ``aws``: every AWS API call (service, operation, start and end, error code, the DynamoDB request units
  it consumed, which DynamoDB reports when asked and asking changes nothing else);
* ``span``: each hub HTTP request and each OpenAI generation, timed around the adapters' methods;
* ``handler``: each invocation of the handler itself, start to end, and whether it was the environment's
  first (its cold start's invocation, which builds the environment's clients and wiring).

Times are ``time.perf_counter()``, which on Linux is the machine's monotonic clock, one for every process
(an environment's offset wall clock does not touch it). Dormant when ``$BENCH_PROBE_DIR`` is unset.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

PROBE_DIR_VARIABLE = "BENCH_PROBE_DIR"
CAPACITY_OPERATIONS = frozenset(
    {
        "GetItem",
        "PutItem",
        "UpdateItem",
        "DeleteItem",
        "Query",
        "Scan",
        "BatchGetItem",
        "BatchWriteItem",
        "TransactGetItems",
        "TransactWriteItems",
    }
)
READ_OPERATIONS = frozenset({"GetItem", "Query", "Scan", "BatchGetItem", "TransactGetItems"})


class _Journal:
    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        self._out = open(os.path.join(directory, f"{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
        self.function = os.environ.get("AWS_LAMBDA_FUNCTION_NAME", "").rsplit("-", 1)[-1]

    def write(self, record: dict[str, Any]) -> None:
        self._out.write(json.dumps({"function": self.function, **record}) + "\n")


def consumed_units(operation: str, parsed: Any) -> tuple[float, float]:
    """(read units, write units) from a DynamoDB answer's ConsumedCapacity."""
    capacity = parsed.get("ConsumedCapacity") if isinstance(parsed, dict) else None
    read = write = 0.0
    for entry in capacity if isinstance(capacity, list) else [capacity] if capacity else []:
        read += float(entry.get("ReadCapacityUnits") or 0)
        write += float(entry.get("WriteCapacityUnits") or 0)
        if not entry.get("ReadCapacityUnits") and not entry.get("WriteCapacityUnits"):
            units = float(entry.get("CapacityUnits") or 0)
            if operation in READ_OPERATIONS:
                read += units
            else:
                write += units
    return read, write


def install() -> None:
    directory = os.environ.get(PROBE_DIR_VARIABLE)
    if not directory:
        return
    journal = _Journal(directory)
    _watch_aws(journal)
    _watch_adapters(journal)
    _watch_handler(journal)


def _watch_aws(journal: _Journal) -> None:
    from botocore.client import BaseClient
    from botocore.exceptions import ClientError

    original = BaseClient._make_api_call

    def make_api_call(self: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
        service = self.meta.service_model.service_name
        if service == "dynamodb" and operation_name in CAPACITY_OPERATIONS:
            api_params = {"ReturnConsumedCapacity": "TOTAL", **api_params}
        started = time.perf_counter()
        parsed: Any = None
        error = None
        try:
            parsed = original(self, operation_name, api_params)
            return parsed
        except ClientError as exc:
            error = exc.response.get("Error", {}).get("Code") or type(exc).__name__
            parsed = exc.response
            raise
        except Exception as exc:
            error = type(exc).__name__
            raise
        finally:
            read, write = consumed_units(operation_name, parsed)
            journal.write(
                {
                    "kind": "aws",
                    "service": service,
                    "operation": operation_name,
                    "started": started,
                    "ended": time.perf_counter(),
                    "error": error,
                    "read_units": read,
                    "write_units": write,
                    "tables": _tables(api_params) if service == "dynamodb" else [],
                }
            )

    BaseClient._make_api_call = make_api_call


def _tables(api_params: dict[str, Any]) -> list[str]:
    """The DynamoDB tables a call names (a batch or a transaction may name several)."""
    named = (
        {api_params["TableName"]} if "TableName" in api_params else set(api_params.get("RequestItems", {}))
    )
    for item in api_params.get("TransactItems", []):
        named.update(part["TableName"] for part in item.values() if "TableName" in part)
    return sorted(named)


def _timed(journal: _Journal, owner: type, name: str, kind: str) -> None:
    original = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            journal.write({"kind": "span", "span": kind, "started": started, "ended": time.perf_counter()})

    setattr(owner, name, timed)


def _watch_adapters(journal: _Journal) -> None:
    # The forkserver has openai imported already: wrapping the generator here costs an environment nothing.
    from dalle_plugin.adapters import hub_http, openai_images

    _timed(journal, hub_http.AngoHubClient, "_send_once", "hub")
    _timed(journal, openai_images.OpenAIImageGenerator, "generate", "openai")


def _watch_handler(journal: _Journal) -> None:
    """The handler's own time, apart from the runtime's (the pipe, the event's JSON, the log lines)."""
    from local_stack import lambda_environment

    load = lambda_environment.load_handler

    def load_handler(code_dir: str, handler: str, module_name: str) -> Any:
        function = load(code_dir, handler, module_name)
        served = 0

        def timed(event: dict, context: Any) -> Any:
            nonlocal served
            served += 1
            started = time.perf_counter()
            failed = True
            try:
                result = function(event, context)
                failed = False
                return result
            finally:
                journal.write(
                    {
                        "kind": "handler",
                        "started": started,
                        "ended": time.perf_counter(),
                        "failed": failed,
                        "first": served == 1,
                        "session": _session_of(event),
                    }
                )

        return timed

    lambda_environment.load_handler = load_handler


def _session_of(event: Any) -> str:
    if not isinstance(event, dict):
        return ""
    if isinstance(event.get("session"), str):
        return event["session"]
    try:
        return json.loads(event.get("body") or "{}").get("session") or ""
    except (ValueError, AttributeError, TypeError):
        return ""
