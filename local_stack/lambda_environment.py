"""One Lambda execution environment, as a process of its own: what runs inside it.

The parent (``local_stack.lambda_runtime``) forks it from a forkserver that has the third-party packages
already imported (their pages are shared between environments, which keeps a hundred environments within a
few GiB); everything of the function's own (the layer's package, the handler module, the settings it reads at
init) is imported here, so a new environment pays the function's real cold start. Like Lambda, it has the
function's own environment variables, its own module state, its own clock (offset by a few milliseconds, or
by hundreds on the hostile profile) and handles one event at a time.

The protocol over the pipe: the environment sends ``("ready", init_s)`` once, then for every
``(request_id, event_json, remaining_ms, log_stream)`` it answers ``(ok, payload_json, log_lines)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from local_stack.own_cpu_clock import OwnCpuClock

# Imported by the forkserver before it forks any environment: what every function's cold start would
# otherwise re-import (and hold in memory once per environment).
PRELOADED = (
    "boto3",
    "botocore.session",
    "pydantic",
    "requests",
    "aws_lambda_powertools",
    "aws_lambda_powertools.logging",
    "aws_lambda_powertools.metrics",
    "openai",
)


@dataclass(frozen=True)
class EnvironmentSetup:
    logical_id: str
    function_name: str
    function_arn: str
    memory_mb: int
    code_dir: str
    handler: str  # module.function
    environ: dict[str, str]
    layer_dirs: tuple[str, ...] = ()
    clock_offset_s: float = 0.0
    # Modules whose ``install()`` runs in the environment before the handler is imported (test seams).
    hook_modules: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class LambdaContext:
    function_name: str
    invoked_function_arn: str
    memory_limit_in_mb: int
    aws_request_id: str
    log_group_name: str
    log_stream_name: str
    deadline: float  # on ``clock``, when the function times out
    function_version: str = "$LATEST"
    #: the clock the runtime times the function on (``time.monotonic`` for handlers called directly)
    clock: Callable[[], float] = time.monotonic

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - self.clock()) * 1000))


class _LineCollector(io.TextIOBase):
    """The environment's stdout: what the handler prints goes to its CloudWatch log stream."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def drain(self) -> list[str]:
        lines = "".join(self.parts).splitlines()
        self.parts.clear()
        return lines


def _offset_clock(offset_s: float) -> None:
    """This environment's wall clock is ``offset_s`` off the machine's (the monotonic clock is not)."""
    if not offset_s:
        return
    real_time, real_time_ns = time.time, time.time_ns
    offset_ns = int(offset_s * 1e9)
    time.time = lambda: real_time() + offset_s
    time.time_ns = lambda: real_time_ns() + offset_ns


def load_handler(code_dir: str, handler: str, module_name: str) -> Callable[[dict, Any], Any]:
    module_file, function = handler.rsplit(".", 1)
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(code_dir, f"{module_file}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function)


def _before_hooks(modules: list[Any]) -> list[Callable[[str, dict], None]]:
    return [module.before_handler for module in modules if hasattr(module, "before_handler")]


def _after_hooks(modules: list[Any]) -> list[Callable[[str, dict, Any], None]]:
    return [module.after_handler for module in modules if hasattr(module, "after_handler")]


def error_payload(exc: BaseException, request_id: str) -> dict[str, Any]:
    """The Lambda runtime's own contract: an exception is a function error named by its class."""
    return {
        "errorMessage": str(exc),
        "errorType": type(exc).__name__,
        "requestId": request_id,
        "stackTrace": traceback.format_tb(exc.__traceback__)[-5:],
    }


def serve(conn: Connection, setup: EnvironmentSetup) -> None:
    """The environment's whole life: init, then one event at a time until the parent goes away."""
    started = time.perf_counter()
    os.environ.clear()
    os.environ.update(setup.environ)
    _offset_clock(setup.clock_offset_s)
    for layer in setup.layer_dirs:  # what Lambda does with a layer's /opt/python
        if layer not in sys.path:
            sys.path.append(layer)
    sys.path.insert(0, setup.code_dir)  # /var/task comes first
    stdout = _LineCollector()
    sys.stdout = stdout
    hooks = [importlib.import_module(name) for name in setup.hook_modules]
    for module in hooks:
        module.install()
    before, after = _before_hooks(hooks), _after_hooks(hooks)
    try:
        handler = load_handler(setup.code_dir, setup.handler, f"lambda_{setup.logical_id}")
    except BaseException as exc:  # noqa: BLE001 - an init error: reported on the first invoke, as Lambda does
        conn.send(("init_error", json.dumps(error_payload(exc, "init")), stdout.drain()))
        return
    conn.send(("ready", time.perf_counter() - started, stdout.drain()))

    while True:
        try:
            request_id, event_json, remaining_ms, log_stream = conn.recv()
        except (EOFError, OSError):  # the runtime went away: so does the environment
            return
        event = json.loads(event_json)
        context = LambdaContext(
            function_name=setup.function_name,
            invoked_function_arn=setup.function_arn,
            memory_limit_in_mb=setup.memory_mb,
            aws_request_id=request_id,
            log_group_name=f"/aws/lambda/{setup.function_name}",
            log_stream_name=log_stream,
            deadline=remaining_ms / 1000,
            clock=OwnCpuClock().elapsed_s,  # the runtime's, so the handler's budgets end with its timeout
        )
        try:
            for before_hook in before:
                before_hook(setup.logical_id, event)
            result = handler(event, context)
            for hook in after:
                hook(setup.logical_id, event, result)
            answer = (True, json.dumps(result))
        except Exception as exc:  # noqa: BLE001 - any exception is a function error
            answer = (False, json.dumps(error_payload(exc, request_id)))
        conn.send((*answer, stdout.drain()))
