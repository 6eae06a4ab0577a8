"""Instruments a running local stack from the bench process, without touching product code.

Every Lambda execution environment is an OS process of its own (local_stack/lambda_runtime.py), so what the
handlers do is seen from inside them: ``bench_stack_options`` starts every environment with the hook module
bench/env_probe.py, which journals each AWS API call, hub request, OpenAI generation and handler run to
files under .local/bench/probe/. From the bench's own process the probe sees

* when the hub emulator received each request (its own process stamps each one: ``received_at``);
* when each Lambda invocation started and ended, as the runtime saw it (the pipe and the event included);
* what the environments journalled: AWS calls (count, time, DynamoDB consumed capacity, error code), the
  time in hub HTTP calls and in the OpenAI request, and each handler's own start and end.

Everything is undone by ``uninstall`` (or leaving the ``with`` block).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from bench.common import CACHE_DIR
from bench.env_probe import PROBE_DIR_VARIABLE

PROBE_ROOT = CACHE_DIR / "probe"

#: The shared key's queue as deployed (``RateLimit`` 5), its window scaled to 6 s as bench/limiter.py scales
#: it. Not a limit raised so that runs never wait: the queue's state has a slot per allowed request and every
#: run record carries the view it claims from, so a limit of 1,000 made each record about 5 KB larger than a
#: deployment's (8 to 9 write units per run-record write instead of 3 to 4).
SHARED_KEY_AT_BENCH_WINDOW = {"RateWindowSeconds": "6", "RateSkewMarginMs": "600"}
#: the deployed limit those parameters keep (the template's default ``RateLimit``)
SHARED_KEY_LIMIT = 5
#: runs of that queue started this far apart never wait for it: each of its slots takes a send once per window
#: plus margin, and 0.1 s more covers a run's own spread between acceptance and claim
UNQUEUED_RUN_INTERVAL_S = (
    float(SHARED_KEY_AT_BENCH_WINDOW["RateWindowSeconds"])
    + int(SHARED_KEY_AT_BENCH_WINDOW["RateSkewMarginMs"]) / 1000
) / SHARED_KEY_LIMIT + 0.1


class RunPacer:
    """Starts runs no closer than ``UNQUEUED_RUN_INTERVAL_S``, so none waits for the shared key's queue and a
    figure per image is a run's, not a queued run's."""

    def __init__(self, interval_s: float = UNQUEUED_RUN_INTERVAL_S):
        self._interval_s = interval_s
        self._last = -interval_s

    def next_run(self) -> None:
        time.sleep(max(0.0, self._last + self._interval_s - time.monotonic()))
        self._last = time.monotonic()


def bench_stack_options(name: str, **options: Any) -> Any:
    """StackOptions for a bench stack: the probe's hook in every execution environment, journalling into a
    directory of its own (emptied first)."""
    from local_stack.stack import StackOptions

    journal = PROBE_ROOT / f"{name}-{uuid.uuid4().hex[:8]}"
    shutil.rmtree(PROBE_ROOT, ignore_errors=True)  # earlier runs' journals: never read again
    journal.mkdir(parents=True)
    environment = {PROBE_DIR_VARIABLE: str(journal), **options.pop("environment", {})}
    return StackOptions(
        stack_name=name,
        environment=environment,
        hook_modules=("bench.env_probe", *options.pop("hook_modules", ())),
        **options,
    )


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
    tables: tuple[str, ...] = ()  # DynamoDB's: the tables the call names


@dataclass(frozen=True)
class Span:
    kind: str  # "hub" or "openai"
    started: float
    ended: float


@dataclass(frozen=True)
class HandlerRun:
    """A handler's own run inside its environment: the invocation less the runtime's part."""

    function: str  # logical id
    started: float
    ended: float
    session: str
    first: bool = False  # the environment's first invocation: its clients and wiring are built in it


@dataclass
class StackProbe:
    stack: Any
    hub_requests: list[HubRequest] = field(default_factory=list)
    invocations: list[Invocation] = field(default_factory=list)
    _aws_calls: list[AwsCall] = field(default_factory=list)
    _spans: list[Span] = field(default_factory=list)
    _handler_runs: list[HandlerRun] = field(default_factory=list)
    log_bytes: int = 0
    _undo: list[Callable[[], None]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)  # an RLock inside
    _read_up_to: dict[str, int] = field(default_factory=dict)

    # ---- lifecycle --------------------------------------------------------------------------------

    def install(self) -> StackProbe:
        self._watch_hub()
        self._watch_lambdas()
        self._watch_logs()
        if self._journal_dir() is None:
            print(
                "bench probe: this stack has no bench.env_probe hook (build its options with "
                "bench.probes.bench_stack_options): no AWS calls, hub or OpenAI spans will be seen",
                file=sys.stderr,
                flush=True,
            )
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
            self.refresh()  # what is journalled so far is skipped, not counted later
            self.hub_requests.clear()
            self.invocations.clear()
            self._aws_calls.clear()
            self._spans.clear()
            self._handler_runs.clear()
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

    @property
    def aws_calls(self) -> list[AwsCall]:
        self.refresh()
        return self._aws_calls

    @property
    def spans(self) -> list[Span]:
        self.refresh()
        return self._spans

    @property
    def handler_runs(self) -> list[HandlerRun]:
        self.refresh()
        return self._handler_runs

    def aws_counts(self) -> Counter:
        return Counter(f"{c.service}.{c.operation}" for c in self.aws_calls)

    # ---- the environments' journals ----------------------------------------------------------------

    def _journal_dir(self) -> Path | None:
        directory = self.stack.options.environment.get(PROBE_DIR_VARIABLE)
        return Path(directory) if directory else None

    def refresh(self) -> None:
        """Read what the environments appended since the last read (whole lines only). An environment
        writes its records before its handler returns, so after an invocation ended they are all here."""
        directory = self._journal_dir()
        if directory is None:
            return
        with self._changed:
            for path in sorted(directory.glob("*.jsonl")):
                offset = self._read_up_to.get(path.name, 0)
                with open(path, "rb") as journal:
                    journal.seek(offset)
                    chunk = journal.read()
                complete = chunk[: chunk.rfind(b"\n") + 1]
                self._read_up_to[path.name] = offset + len(complete)
                for line in complete.splitlines():
                    self._take(json.loads(line))

    def _take(self, record: dict[str, Any]) -> None:
        kind = record["kind"]
        if kind == "aws":
            self._aws_calls.append(
                AwsCall(
                    record["service"],
                    record["operation"],
                    record["started"],
                    record["ended"],
                    record["error"],
                    record["read_units"],
                    record["write_units"],
                    tuple(record.get("tables", ())),
                )
            )
        elif kind == "span":
            self._spans.append(Span(record["span"], record["started"], record["ended"]))
        elif kind == "handler":
            self._handler_runs.append(
                HandlerRun(
                    record["function"],
                    record["started"],
                    record["ended"],
                    record["session"],
                    record.get("first", False),
                )
            )

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
