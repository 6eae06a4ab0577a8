"""Lambda as Lambda runs it: every execution environment a process of its own.

moto (server mode, ``use_docker: False``) only echoes a Lambda's input; ``install`` replaces
``LambdaSimpleBackend.invoke`` so Step Functions' Lambda tasks reach ``LambdaService``, which runs the
function's real handler (CodeUri + Handler from template.yaml) in an execution environment
(``local_stack.lambda_environment``) and answers as the Lambda service does:

- an environment handles one event at a time; an idle one is reused while warm (reaped after the profile's
  ``warm_idle_s``), a busy function gets a new one, which pays the function's cold start;
- each function runs at most ``reserved_concurrency`` environments (``ReservedConcurrentExecutions`` from
  the template, else the profile's); past it the invoke is throttled (``TooManyRequestsException``);
- the function's ``Timeout`` is enforced: the environment is killed and the invoke answers as Lambda does
  for a timed-out function (a function error whose payload has no ``errorType``, which Step Functions
  reports as ``Lambda.Unknown``); it is timed on the environment's own CPU clock
  (``local_stack.own_cpu_clock``: a handler that hangs times out on the second, one starved of CPU by
  this machine's other work is not failed for it);
- a result above 6 MB fails (``Function.ResponseSizeTooLarge``), a request above 6 MB is refused;
- on the profile's share of Step Functions' invokes, the result is lost after the handler ran
  (``ServiceException``), as AWS warns it can be.

Step Functions names a Lambda service error ``Lambda.<code>``; moto's parser names them all ``Exception``,
so ``install`` also patches that naming. Both are moto internals: moto is pinned and
tests/integration/test_local_stack_smoke.py fails loudly if a patch stops taking effect.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from local_stack.lambda_environment import PRELOADED, EnvironmentSetup, load_handler, serve
from local_stack.own_cpu_clock import OwnCpuClock
from local_stack.profiles import Profile
from local_stack.template import FunctionSpec

PAYLOAD_LIMIT_BYTES = 6 * 1024 * 1024  # synchronous invoke, request and response each
INIT_BUDGET_S = 10.0  # Lambda gives an environment's init phase 10 s before the invoke's own timeout
POLL_S = 0.25  # how often a wait on an environment looks at its clock (local_stack.own_cpu_clock)


class LambdaRefused(Exception):
    """The Lambda service itself refused or lost the invoke (not a function error): an AWS error code."""

    code = "ServiceException"
    status = 500


class TooManyRequests(LambdaRefused):
    code, status = "TooManyRequestsException", 429


class RequestTooLarge(LambdaRefused):
    code, status = "RequestTooLargeException", 413


class ResultLost(LambdaRefused):
    code, status = "ServiceException", 500


@dataclass
class Invocation:
    function: str  # logical id
    duration_s: float
    cold: bool
    outcome: str  # ok | error | timeout | throttled | lost


class Environment:
    """The runtime's handle on one execution environment process."""

    def __init__(self, context: Any, setup: EnvironmentSetup):
        self.setup = setup
        self.conn, child_end = context.Pipe()
        self.process = context.Process(
            target=serve, args=(child_end, setup), daemon=True, name=f"lambda-{setup.logical_id}"
        )
        self.process.start()
        child_end.close()
        self.log_stream = f"{time.strftime('%Y/%m/%d')}/[$LATEST]{uuid.uuid4().hex}"
        self.last_used = time.monotonic()
        self.init_s: float | None = None
        self.ready = False  # init finished: the environment can take events
        self.invokes = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _receive(self, timeout_s: float) -> tuple | None:
        """The environment's next message, or None once ``timeout_s`` passed on its own CPU's clock."""
        clock = OwnCpuClock(self.pid)
        while (left := timeout_s - clock.elapsed_s()) > 0:
            if self.conn.poll(min(left, POLL_S)):
                try:
                    return self.conn.recv()
                except (EOFError, OSError):
                    return ("died",)
        return None

    def initialise(self, budget_s: float) -> tuple[bool, str | None, list[str]]:
        """Wait for init. Returns (ok, error payload, log lines)."""
        answer = self._receive(budget_s)
        if answer is None:
            return (
                False,
                json.dumps(
                    {
                        "errorType": "Runtime.InitTimeout",
                        "errorMessage": f"Init did not finish within {budget_s:g} s",
                    }
                ),
                [],
            )
        if answer[0] == "ready":
            self.init_s = answer[1]
            self.ready = True
            return True, None, answer[2]
        if answer[0] == "init_error":
            return False, answer[1], answer[2]
        return (
            False,
            json.dumps({"errorType": "Runtime.ExitError", "errorMessage": "Runtime exited during init"}),
            [],
        )

    def invoke(self, request_id: str, body: str, timeout_s: float) -> tuple[str, str, list[str]]:
        """Returns (outcome, payload, log lines); outcome is ok, error, timeout or died."""
        self.invokes += 1
        try:
            self.conn.send((request_id, body, int(timeout_s * 1000), self.log_stream))
        except (OSError, ValueError):
            return "died", _exit_error(request_id), []
        answer = self._receive(timeout_s)
        self.last_used = time.monotonic()
        if answer is None:
            return "timeout", "", []
        if answer[0] == "died":
            return "died", _exit_error(request_id), []
        ok, payload, lines = answer
        return ("ok" if ok else "error"), payload, lines

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        # the stack's stop and an invoke's end may both kill an environment stuck in a call
        with contextlib.suppress(OSError):
            self.conn.close()


def _exit_error(request_id: str) -> str:
    return json.dumps(
        {
            "errorType": "Runtime.ExitError",
            "errorMessage": f"RequestId: {request_id} Error: Runtime exited with error: signal: killed",
        }
    )


class _Pool:
    """One function's environments: idle (warm) ones and how many are in use."""

    def __init__(self, limit: int):
        self.limit = limit
        self.idle: list[Environment] = []
        self.busy: set[Environment] = set()


class LambdaService:
    def __init__(
        self,
        functions: dict[str, FunctionSpec],
        log_sink: Callable[[str, str, list[str]], None],
        *,
        profile: Profile,
        environ: Callable[[FunctionSpec], dict[str, str]],
        layer_dirs: list[Any] = (),
        hook_modules: tuple[str, ...] = (),
    ):
        self._by_name = {spec.physical_name: spec for spec in functions.values()}
        self._profile = profile
        self._environ = environ
        self._layer_dirs = tuple(str(d) for d in layer_dirs)
        self._hook_modules = tuple(hook_modules)
        self._log_sink = log_sink
        self._lock = threading.Lock()
        self._rng = profile.rng()
        self._pools = {
            spec.logical_id: _Pool(spec.reserved_concurrency or profile.reserved_concurrency)
            for spec in functions.values()
        }
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(PRELOADED))
        # For tests and benchmarks, bounded: a long `make serve` on the hostile profile starts one per invoke.
        self.invocations: deque[Invocation] = deque(maxlen=100_000)
        self.environments: deque[Environment] = deque(maxlen=10_000)  # environments started, in order
        self._stopped = False

    # ---- what callers use -------------------------------------------------------------------------

    def add_function(self, spec: FunctionSpec) -> None:
        """A function beside the template's (tests of the runtime itself)."""
        with self._lock:
            self._by_name[spec.physical_name] = spec
            self._pools[spec.logical_id] = _Pool(
                spec.reserved_concurrency or self._profile.reserved_concurrency
            )

    def spec_for(self, name_or_arn: str) -> FunctionSpec:
        name = name_or_arn.split(":function:")[-1].split(":")[0]
        return self._by_name[name]

    def handler(self, spec: FunctionSpec) -> Callable[[dict, Any], Any]:
        """The handler loaded into the calling process, for tests that call a handler directly."""
        return load_handler(str(spec.code_dir), spec.handler, f"direct_{spec.logical_id}_{uuid.uuid4().hex}")

    def invoke(
        self,
        name_or_arn: str,
        body: bytes | str | None,
        *,
        may_lose_result: bool = False,
        on_environment: Callable[[int], None] | None = None,
    ) -> tuple[bytes, bool]:
        """A synchronous invoke: (payload, function error?). Raises ``LambdaRefused`` where Lambda would
        answer with an error of its own. ``on_environment`` hears the pid of the environment that runs it."""
        spec = self.spec_for(name_or_arn)
        text = body.decode() if isinstance(body, bytes) else (body or "{}")
        if len(text.encode()) > PAYLOAD_LIMIT_BYTES:
            raise RequestTooLarge(
                f"Request must be smaller than {PAYLOAD_LIMIT_BYTES} bytes for the InvokeFunction operation"
            )
        request_id = str(uuid.uuid4())
        started = time.perf_counter()
        environment, cold = self._acquire(spec)
        if on_environment is not None and environment.pid is not None:
            on_environment(environment.pid)
        outcome, payload, lines = "died", "", []
        try:
            if cold:
                # Lambda gives init 10 s, then runs it again within the invoke's own timeout
                ok, init_error, lines = environment.initialise(INIT_BUDGET_S + spec.timeout_s)
                if not ok:
                    outcome, payload = "init_failed", init_error
            if environment.ready:
                outcome, payload, more = environment.invoke(request_id, text, spec.timeout_s)
                lines = lines + more
        finally:
            self._release(spec, environment, healthy=environment.ready and outcome in ("ok", "error"))
        if outcome == "init_failed":
            outcome = "error"
        if outcome == "timeout":
            lines.append(f"{_iso_now()} {request_id} Task timed out after {spec.timeout_s:.2f} seconds")
            payload = json.dumps(
                {"errorMessage": lines[-1]}
            )  # no errorType: Step Functions says Lambda.Unknown
        elif outcome == "ok" and len(payload.encode()) > PAYLOAD_LIMIT_BYTES:
            outcome, payload = (
                "error",
                json.dumps(
                    {
                        "errorType": "Function.ResponseSizeTooLarge",
                        "errorMessage": f"Response payload size exceeded maximum allowed payload size "
                        f"({PAYLOAD_LIMIT_BYTES} bytes).",
                    }
                ),
            )
        self._log_sink(f"/aws/lambda/{spec.physical_name}", environment.log_stream, lines)
        lost = outcome == "ok" and may_lose_result and self._draw() < self._profile.service_exception_share
        self.invocations.append(
            Invocation(spec.logical_id, time.perf_counter() - started, cold, "lost" if lost else outcome)
        )
        if lost:
            raise ResultLost("simulated: the Lambda service lost the result after the function ran")
        return payload.encode(), outcome != "ok"

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            environments = [e for pool in self._pools.values() for e in (*pool.idle, *pool.busy)]
            for pool in self._pools.values():
                pool.idle.clear()
        for environment in environments:
            environment.kill()

    # ---- environments -----------------------------------------------------------------------------

    def _draw(self) -> float:
        with self._lock:
            return self._rng.random()

    def _acquire(self, spec: FunctionSpec) -> tuple[Environment, bool]:
        reaped: list[Environment] = []
        with self._lock:
            pool = self._pools[spec.logical_id]
            now = time.monotonic()
            for idle in list(pool.idle):
                if now - idle.last_used > self._profile.warm_idle_s or not idle.process.is_alive():
                    pool.idle.remove(idle)
                    reaped.append(idle)
            environment = pool.idle.pop() if pool.idle else None
            if environment is None and len(pool.busy) >= pool.limit:
                self.invocations.append(Invocation(spec.logical_id, 0.0, False, "throttled"))
                raise TooManyRequests(
                    f"Rate Exceeded. ({spec.physical_name} is at its concurrency of {pool.limit})"
                )
            if environment is None:
                offset = self._rng.uniform(-1, 1) * self._profile.clock_offset_ms / 1000
            else:
                pool.busy.add(environment)
        for old in reaped:
            old.kill()
        if environment is not None:
            return environment, False
        environment = Environment(self._context, self._setup(spec, offset))
        with self._lock:
            pool.busy.add(environment)
            self.environments.append(environment)
        return environment, True

    def _release(self, spec: FunctionSpec, environment: Environment, healthy: bool) -> None:
        keep = healthy and not self._profile.cold_start_every_invoke
        with self._lock:
            pool = self._pools[spec.logical_id]
            pool.busy.discard(environment)
            if keep and not self._stopped:
                pool.idle.append(environment)
                return
        environment.kill()

    def _setup(self, spec: FunctionSpec, clock_offset_s: float) -> EnvironmentSetup:
        environ = self._environ(spec) | {
            "AWS_LAMBDA_FUNCTION_NAME": spec.physical_name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.physical_name}",
        }
        return EnvironmentSetup(
            logical_id=spec.logical_id,
            function_name=spec.physical_name,
            function_arn=spec.arn,
            memory_mb=spec.memory_mb,
            code_dir=str(spec.code_dir),
            handler=spec.handler,
            environ=environ,
            layer_dirs=self._layer_dirs,
            clock_offset_s=clock_offset_s,
            hook_modules=self._hook_modules,
        )


def _iso_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


def install(service: LambdaService) -> Callable[[], None]:
    """Route moto's Lambda invocations to ``service`` and name Lambda's errors as Step Functions does;
    returns a function that undoes both."""
    from moto.awslambda_simple.models import LambdaSimpleBackend
    from moto.core.exceptions import JsonRESTError
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import lambda_eval_utils
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.state_task_lambda import (
        StateTaskLambda,
    )

    original_invoke = LambdaSimpleBackend.invoke
    original_from_error = StateTaskLambda._from_error
    original_client_for = lambda_eval_utils.boto_client_for
    clients: dict[tuple[str, str], Any] = {}
    clients_lock = threading.Lock()

    def client_for(region, service, state_credentials=None):
        # moto builds a new boto3 client for every Lambda task (tens of ms of the engine's one GIL each:
        # a seventh of its time in a 2,000-task batch); a client is thread-safe, so one per service does
        with clients_lock:
            if (region, service) not in clients:
                clients[(region, service)] = original_client_for(region, service, state_credentials)
            return clients[(region, service)]

    def invoke(self, function_name, qualifier, body, headers, response_headers):
        try:
            payload, failed = service.invoke(function_name, body, may_lose_result=True)
        except LambdaRefused as refused:
            error = JsonRESTError(refused.code, str(refused))
            error.code = refused.status
            raise error from None
        if failed:
            response_headers["x-amz-function-error"] = "Unhandled"
        return payload

    def from_error(self, env, ex):
        from botocore.exceptions import ClientError

        event = original_from_error(self, env, ex)
        details = event.event_details.get("lambdaFunctionFailedEventDetails") if event.event_details else None
        if details is None:
            return event
        if isinstance(ex, ClientError):
            name = f"Lambda.{ex.response['Error']['Code']}"
        elif (
            isinstance(ex, lambda_eval_utils.LambdaFunctionErrorException) and '"errorType"' not in ex.payload
        ):
            name = "Lambda.Unknown"
            details["cause"] = (
                "The cause could not be determined because Lambda did not return an error "
                f"type. Returned payload: {ex.payload}"
            )
        else:
            return event
        details["error"] = name
        return type(event)(
            env=env,
            error_name=_custom_error(name),
            event_type=event.event_type,
            event_details=event.event_details,
        )

    LambdaSimpleBackend.invoke = invoke
    StateTaskLambda._from_error = from_error
    lambda_eval_utils.boto_client_for = client_for

    def uninstall() -> None:
        LambdaSimpleBackend.invoke = original_invoke
        StateTaskLambda._from_error = original_from_error
        lambda_eval_utils.boto_client_for = original_client_for

    return uninstall


def _custom_error(name: str) -> Any:
    from moto.stepfunctions.parser.asl.component.common.error_name.custom_error_name import CustomErrorName

    return CustomErrorName(name)
