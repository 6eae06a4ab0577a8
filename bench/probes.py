"""Instruments a running local stack from the bench process, without touching product code.

The Lambdas run in-process (local_stack/lambda_runtime.py), so the bench can see everything they do:

* when the hub emulator received each request (its own process stamps each one: ``received_at``);
* when each Lambda invocation started and ended;
* every AWS API call the handlers made through ``dalle_plugin.wiring.aws_client`` (botocore event hooks on
  the cached clients: count, time, DynamoDB consumed capacity, error code);
* the time spent in hub HTTP calls and in the OpenAI request, by wrapping the two adapters' methods.

Everything is undone by ``uninstall`` (or leaving the ``with`` block).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

AWS_SERVICES = ("dynamodb", "kms", "s3", "secretsmanager", "stepfunctions")
_CAPACITY_OPERATIONS = {
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


@dataclass(frozen=True)
class HubRequest:
    at: float  # when the hub emulator's process received it, on this process's perf_counter
    method: str
    path: str


@dataclass(frozen=True)
class Invocation:
    function: str  # logical id
    started: float
    ended: float
    failed: bool

    @property
    def duration_s(self) -> float:
        return self.ended - self.started


@dataclass(frozen=True)
class AwsCall:
    service: str
    operation: str
    started: float
    ended: float
    error: str | None
    read_units: float = 0.0
    write_units: float = 0.0


@dataclass(frozen=True)
class Span:
    kind: str  # "hub" or "openai"
    started: float
    ended: float


@dataclass
class StackProbe:
    stack: Any
    hub_requests: list[HubRequest] = field(default_factory=list)
    invocations: list[Invocation] = field(default_factory=list)
    aws_calls: list[AwsCall] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    log_bytes: int = 0
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    # ---- lifecycle --------------------------------------------------------------------------------

    def install(self) -> StackProbe:
        self._watch_hub()
        self._watch_lambdas()
        self._watch_logs()
        self._watch_aws()
        self._watch_adapters()
        return self

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def clear(self) -> None:
        with self._changed:
            self.hub_requests.clear()
            self.invocations.clear()
            self.aws_calls.clear()
            self.spans.clear()
            self.log_bytes = 0

    # ---- waiting ----------------------------------------------------------------------------------

    def wait_for_hub(
        self, method: str, path_prefix: str, since: float, count: int = 1, timeout_s: float = 60.0
    ) -> list[HubRequest]:
        """The first ``count`` hub requests after ``since`` matching method and path, once they arrive."""
        deadline = time.perf_counter() + timeout_s
        with self._changed:
            while True:
                found = [
                    r
                    for r in self.hub_requests
                    if r.at >= since and r.method == method and r.path.startswith(path_prefix)
                ]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{count} x {method} {path_prefix} not seen by the hub within {timeout_s}s "
                        f"(saw {len(found)})"
                    )
                self._changed.wait(remaining)

    def wait_for_invocation(self, function: str, since: float, timeout_s: float = 60.0) -> Invocation:
        """The first finished invocation of ``function`` (logical id) that started after ``since``."""
        deadline = time.perf_counter() + timeout_s
        with self._changed:
            while True:
                for invocation in self.invocations:
                    if invocation.function == function and invocation.started >= since:
                        return invocation
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise TimeoutError(f"no invocation of {function} finished within {timeout_s}s")
                self._changed.wait(remaining)

    # ---- views ------------------------------------------------------------------------------------

    def aws_counts(self) -> Counter:
        return Counter(f"{c.service}.{c.operation}" for c in self.aws_calls)

    # ---- the hooks --------------------------------------------------------------------------------

    def _watch_hub(self) -> None:
        """The hub emulator runs in a process of its own: a thread polls its request log for new entries."""
        hub = self.stack.hub
        stopped = threading.Event()
        seen = len(hub.requests)

        def poll() -> None:
            nonlocal seen
            while not stopped.wait(0.02):
                fresh = hub.requests_since(seen)
                if not fresh:
                    continue
                seen += len(fresh)
                wall_minus_perf = time.time() - time.perf_counter()  # both clocks of one machine
                with self._changed:
                    self.hub_requests.extend(
                        HubRequest(r["received_at"] - wall_minus_perf, r["method"], r["path"]) for r in fresh
                    )
                    self._changed.notify_all()

        poller = threading.Thread(target=poll, name="hub request poller", daemon=True)
        poller.start()
        self._undo.append(lambda: (stopped.set(), poller.join(timeout=5)))

    def _watch_lambdas(self) -> None:
        lambdas = self.stack.lambdas
        original = lambdas.invoke

        def invoke(name_or_arn: str, body: Any, **options: Any) -> tuple[bytes, bool]:
            function = lambdas.spec_for(name_or_arn).logical_id
            started = time.perf_counter()
            failed = True
            try:
                payload, failed = original(name_or_arn, body, **options)
                return payload, failed
            finally:
                with self._changed:
                    self.invocations.append(Invocation(function, started, time.perf_counter(), failed))
                    self._changed.notify_all()

        lambdas.invoke = invoke
        self._undo.append(lambda: vars(lambdas).pop("invoke", None))

    def _watch_logs(self) -> None:
        """What the functions write to CloudWatch Logs (the bytes that would be ingested)."""
        lambdas = self.stack.lambdas
        original = lambdas._log_sink

        def sink(group: str, stream: str, lines: list[str]) -> None:
            with self._changed:
                self.log_bytes += sum(
                    len(line.encode()) + 26 for line in lines
                )  # + CloudWatch's per-event 26 B
            original(group, stream, lines)

        lambdas._log_sink = sink
        self._undo.append(lambda: setattr(lambdas, "_log_sink", original))

    def _watch_aws(self) -> None:
        from dalle_plugin import wiring

        for service in AWS_SERVICES:
            events = wiring.aws_client(service).meta.events
            events.register("before-parameter-build", self._ask_for_capacity)
            events.register("before-call", self._before_call)
            events.register("after-call", self._after_call)

            def unregister(events: Any = events) -> None:
                events.unregister("before-parameter-build", self._ask_for_capacity)
                events.unregister("before-call", self._before_call)
                events.unregister("after-call", self._after_call)

            self._undo.append(unregister)

    @staticmethod
    def _ask_for_capacity(params: dict[str, Any], model: Any, **_: Any) -> None:
        # DynamoDB reports the request units a call consumed only when asked; asking changes nothing else.
        if model.name in _CAPACITY_OPERATIONS and "ReturnConsumedCapacity" in model.input_shape.members:
            params.setdefault("ReturnConsumedCapacity", "TOTAL")

    @staticmethod
    def _before_call(context: dict[str, Any], **_: Any) -> None:
        context["bench_started"] = time.perf_counter()

    def _after_call(self, model: Any, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        started = context.get("bench_started", time.perf_counter())
        error = (parsed.get("Error") or {}).get("Code") if isinstance(parsed, dict) else None
        read_units = write_units = 0.0
        capacity = parsed.get("ConsumedCapacity") if isinstance(parsed, dict) else None
        for entry in capacity if isinstance(capacity, list) else [capacity] if capacity else []:
            read_units += float(entry.get("ReadCapacityUnits") or 0)
            write_units += float(entry.get("WriteCapacityUnits") or 0)
            if not entry.get("ReadCapacityUnits") and not entry.get("WriteCapacityUnits"):
                units = float(entry.get("CapacityUnits") or 0)
                if model.name in ("GetItem", "Query", "Scan", "BatchGetItem", "TransactGetItems"):
                    read_units += units
                else:
                    write_units += units
        call = AwsCall(
            model.service_model.service_name,
            model.name,
            started,
            time.perf_counter(),
            error,
            read_units,
            write_units,
        )
        with self._changed:
            self.aws_calls.append(call)

    def _watch_adapters(self) -> None:
        from dalle_plugin.adapters import hub_http, openai_images

        self._wrap(hub_http.AngoHubClient, "_send_once", "hub")
        self._wrap(openai_images.OpenAIImageGenerator, "generate", "openai")

    def _wrap(self, cls: type, name: str, kind: str) -> None:
        original = cls.__dict__[name]
        probe = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                with probe._changed:
                    probe.spans.append(Span(kind, started, time.perf_counter()))

        setattr(cls, name, timed)
        self._undo.append(lambda: setattr(cls, name, original))


def execution_histories(stack: Any, since_epoch_s: float, name_prefix: str = "") -> list[dict[str, Any]]:
    """Every execution of the run state machine started since ``since_epoch_s`` whose name starts with
    ``name_prefix`` (an execution's name starts with its session), with its history events."""
    sfn = stack.client("stepfunctions")
    found = []
    for page in sfn.get_paginator("list_executions").paginate(stateMachineArn=stack.state_machine_arn):
        for execution in page["executions"]:
            if execution["startDate"].timestamp() + 1 < since_epoch_s or not execution["name"].startswith(
                name_prefix
            ):
                continue
            events = []
            for history in sfn.get_paginator("get_execution_history").paginate(
                executionArn=execution["executionArn"]
            ):
                events.extend(history["events"])
            found.append({"name": execution["name"], "status": execution["status"], "events": events})
    return found


def billed_transitions(events: list[dict[str, Any]]) -> int:
    """Step Functions Standard bills each state entered, and each retry of a Task counts again."""
    entered = sum(1 for e in events if e["type"].endswith("StateEntered"))
    scheduled = sum(1 for e in events if e["type"] == "LambdaFunctionScheduled")
    tasks = sum(1 for e in events if e["type"] == "TaskStateEntered")
    return entered + max(0, scheduled - tasks)
