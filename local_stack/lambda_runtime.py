"""Runs the real Lambda handlers in-process, as moto's Lambda backend when Step Functions invokes them.

moto (server mode, ``use_docker: False``) only echoes a Lambda's input; ``install`` replaces
``LambdaSimpleBackend.invoke`` so the function's handler (CodeUri + Handler from template.yaml, loaded by
file path) really runs. An exception becomes the Lambda error payload with ``x-amz-function-error``, so the
ASL's Retry and Catch match on the exception's class name, as on AWS. Each invocation's stdout lines (the
Powertools JSON logs and EMF metrics) go to the function's CloudWatch log group in moto.

This patches a moto internal: moto is pinned and tests/integration/test_local_stack_smoke.py fails loudly
if the patch stops taking effect.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import threading
import time
import traceback
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

from local_stack.template import FunctionSpec

_current = threading.local()


class RoutingStdout(io.TextIOBase):
    """sys.stdout stand-in: lines written by a thread that is running a handler are captured for that
    invocation; everything else goes to the real stdout."""

    def __init__(self, real: Any):
        self.real = real

    def write(self, text: str) -> int:
        buffer = getattr(_current, "buffer", None)
        if buffer is None:
            return self.real.write(text)
        buffer.append(text)
        return len(text)

    def flush(self) -> None:
        if getattr(_current, "buffer", None) is None:
            self.real.flush()


@dataclass
class LambdaContext:
    function_name: str
    invoked_function_arn: str
    memory_limit_in_mb: int
    aws_request_id: str
    log_group_name: str
    log_stream_name: str
    deadline: float
    function_version: str = "$LATEST"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


class InProcessLambdas:
    def __init__(self, functions: dict[str, FunctionSpec], log_sink: Callable[[str, str, list[str]], None],
                 layer_dirs: list[Path] = ()):
        # What Lambda does with a layer's content (/opt/python): put it on the import path.
        for layer in layer_dirs:
            if str(layer) not in sys.path:
                sys.path.append(str(layer))
        self._by_name = {spec.physical_name: spec for spec in functions.values()}
        self._idle: dict[str, list[ModuleType]] = {}
        self._loaded = 0
        self._lock = threading.Lock()
        self.cold_starts: list[str] = []
        self._log_sink = log_sink
        self.invocations: list[tuple[str, float]] = []  # (function, duration_s): for tests and benchmarks
        # Hooks a test may set to crash a handler (after its side effects) by function logical id.
        self.after_hooks: dict[str, Callable[[dict, Any], None]] = {}

    def spec_for(self, name_or_arn: str) -> FunctionSpec:
        name = name_or_arn.split(":function:")[-1].split(":")[0]
        return self._by_name[name]

    def _load(self, spec: FunctionSpec) -> ModuleType:
        """A new execution environment: the handler module loaded afresh (its own module-level state)."""
        with self._lock:
            self._loaded += 1
            name = f"lambda_{spec.logical_id}_{self._loaded}"
        module_name, _ = spec.handler.rsplit(".", 1)
        loaded = importlib.util.spec_from_file_location(name, spec.code_dir / f"{module_name}.py")
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
        self.cold_starts.append(spec.logical_id)
        return module

    @contextmanager
    def environment(self, spec: FunctionSpec) -> Iterator[Callable[[dict, Any], Any]]:
        """Like Lambda, one event at a time per execution environment: a busy function gets another one
        (a cold start), an idle one is reused (warm)."""
        with self._lock:
            idle = self._idle.setdefault(spec.logical_id, [])
            module = idle.pop() if idle else None
        if module is None:
            module = self._load(spec)
        try:
            yield getattr(module, spec.handler.rsplit(".", 1)[1])
        finally:
            with self._lock:
                self._idle[spec.logical_id].append(module)

    def handler(self, spec: FunctionSpec) -> Callable[[dict, Any], Any]:
        """A handler for direct calls from tests (a warm environment of its own, never shared)."""
        return getattr(self._load(spec), spec.handler.rsplit(".", 1)[1])

    def invoke(self, name_or_arn: str, body: bytes | str | None) -> tuple[bytes, bool]:
        """Returns (payload, failed)."""
        spec = self.spec_for(name_or_arn)
        event = json.loads(body or "{}")
        request_id = str(uuid.uuid4())
        stream = f"{time.strftime('%Y/%m/%d')}/[$LATEST]{request_id.replace('-', '')}"
        context = LambdaContext(
            function_name=spec.physical_name,
            invoked_function_arn=spec.arn,
            memory_limit_in_mb=spec.memory_mb,
            aws_request_id=request_id,
            log_group_name=f"/aws/lambda/{spec.physical_name}",
            log_stream_name=stream,
            deadline=time.monotonic() + spec.timeout_s,
        )
        if not isinstance(sys.stdout, RoutingStdout):  # something (pytest's capture) put its own back
            sys.stdout = RoutingStdout(sys.stdout)
        _current.buffer = []
        started = time.perf_counter()
        try:
            with self.environment(spec) as handler:
                result = handler(event, context)
            hook = self.after_hooks.get(spec.logical_id)
            if hook:
                hook(event, result)
            payload, failed = json.dumps(result).encode(), False
        except Exception as exc:  # the Lambda runtime's own contract: any exception is a function error
            payload = json.dumps({
                "errorMessage": str(exc),
                "errorType": type(exc).__name__,
                "requestId": request_id,
                "stackTrace": traceback.format_tb(exc.__traceback__)[-5:],
            }).encode()
            failed = True
        finally:
            lines = "".join(_current.buffer).splitlines()
            _current.buffer = None
            self.invocations.append((spec.logical_id, time.perf_counter() - started))
        self._log_sink(context.log_group_name, stream, lines)
        return payload, failed


def install(lambdas: InProcessLambdas) -> Callable[[], None]:
    """Route moto's Lambda invocations to ``lambdas``; returns a function that undoes it."""
    from moto.awslambda_simple.models import LambdaSimpleBackend

    original = LambdaSimpleBackend.invoke

    def invoke(self, function_name, qualifier, body, headers, response_headers):  # noqa: ANN001
        payload, failed = lambdas.invoke(function_name, body)
        if failed:
            response_headers["x-amz-function-error"] = "Unhandled"
        return payload

    LambdaSimpleBackend.invoke = invoke
    if not isinstance(sys.stdout, RoutingStdout):
        sys.stdout = RoutingStdout(sys.stdout)

    def uninstall() -> None:
        LambdaSimpleBackend.invoke = original
        if isinstance(sys.stdout, RoutingStdout):
            sys.stdout = sys.stdout.real

    return uninstall

