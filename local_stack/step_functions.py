"""Step Functions as AWS runs it: patches of moto's ASL interpreter for what a kind local stack hides.

- Wait states wake late, never early: by the profile's ``wait_lateness`` (a distribution), after the exact
  target instant (moto alone computes whole seconds against a naive local clock and wakes up to 1 s early).
- A state's input, a state's output, a Lambda task's input and its result above 256 KiB fail the state
  with ``States.DataLimitExceeded``.
- ``States.ALL`` in a Retry or Catch does not match ``States.DataLimitExceeded`` nor ``States.Runtime``
  (moto alone matches both): they end the execution unless named explicitly.
- An execution may record at most 25,000 history events; the 25,000th is its ``ExecutionFailed``
  (``States.Runtime``) unless it is ``ExecutionSucceeded``.
- A Map iteration or Parallel branch that fails with a ``States.`` error fails its state with that error
  (moto alone turns it into a ``States.Runtime`` about an illegal custom error name).
- StopExecution ends the execution at once (ABORTED, its stop date, the error and cause it was given, one
  ``ExecutionAborted`` history event, its status change sent), as on AWS; moto alone keeps it RUNNING until
  the Lambda invoke in flight returns (up to the function's Timeout), records that invoke's late result
  before its ``ExecutionAborted`` (in a Map iteration, an ``ExecutionFailed``) and drops error and cause.
- An execution still running its definition's top-level ``TimeoutSeconds`` after its start ends there and
  then as TIMED_OUT (its stop date, error ``States.Timeout``, one ``ExecutionTimedOut`` history event, its
  status change sent); moto alone marks it TIMED_OUT on time but with no error, and writes its
  ``ExecutionTimedOut`` event only when the invoke in flight returns, after that invoke's late result.
- Both ends close the history (``end_from_outside``): the invoke in flight runs to its end, but nothing the
  interpreter reports afterwards (its result, the next state, a Map iteration's abort, its own end) is
  recorded, as on AWS.
- An execution that ends sends its "Execution Status Change" event to the functions whose EventBridge rules
  ask for it (template.yaml), asynchronously, twice for a share of them on the hostile profile (moto alone
  sends none).
- JSONPaths are parsed once per path rather than on every evaluation (moto alone spends about 3 ms per
  ``ResultPath``, which on 2 busy cores is most of an execution's time).

Each patch is an ``install_...`` function returning its undo; ``StepFunctionsBehaviour`` installs them all
for one profile, keeps the record of every Wait (target and wake) for tests and lets a test give chosen
executions a TimeoutSeconds of their own (``execution_timeouts``). ``docs/local-stack.md``
gives the figures and where they come from. These patch moto internals: moto is pinned and
tests/integration/test_local_aws_behaviour.py fails loudly if a patch stops taking effect.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from local_stack.profiles import Lateness, Profile

# Maximum input or output size for a task, state or execution: 262,144 bytes of UTF-8 (Step Functions quotas).
PAYLOAD_LIMIT_BYTES = 256 * 1024
# Maximum execution history size of a Standard workflow (a hard quota).
HISTORY_LIMIT_EVENTS = 25_000
DATA_LIMIT_EXCEEDED = "States.DataLimitExceeded"
RUNTIME = "States.Runtime"
#: the error of an execution that ran past its TimeoutSeconds (DescribeExecution, its ExecutionTimedOut event)
TIMEOUT = "States.Timeout"

Undo = Callable[[], None]


@dataclass(frozen=True)
class WaitRecord:
    """One Wait state's wake-up: when the ASL asked to wake and when the local Step Functions woke it."""

    execution: str  # the execution's name
    state: str
    target: float  # epoch seconds the Wait names (entered + Seconds, or the Timestamp)
    planned: float  # target + the lateness drawn from the profile
    woke: float  # when the Wait actually ended (>= planned; later still on a busy machine)

    @property
    def drawn_lateness(self) -> float:
        return self.planned - self.target

    @property
    def lateness(self) -> float:
        return self.woke - self.target


class StepFunctionsBehaviour:
    """Every Step Functions patch for one profile. ``waits`` lists each Wait's wake-up, in order."""

    def __init__(
        self,
        profile: Profile,
        payload_limit_bytes: int = PAYLOAD_LIMIT_BYTES,
        history_limit_events: int = HISTORY_LIMIT_EVENTS,
    ):
        self.profile = profile
        self.payload_limit_bytes = payload_limit_bytes
        self.history_limit_events = history_limit_events
        self.waits: list[WaitRecord] = []
        # A test seam: TimeoutSeconds for the executions whose name starts with a key, over their definition's
        # (as if deployed with a smaller ExecutionTimeoutSeconds, for one case on a stack that others share).
        self.execution_timeouts: dict[str, float] = {}

    def waits_of(self, execution_name: str) -> list[WaitRecord]:
        return [record for record in list(self.waits) if record.execution == execution_name]

    def timeout_of(self, execution_name: str) -> float | None:
        """The seam's TimeoutSeconds for the execution, if a test set one."""
        for prefix, seconds in list(self.execution_timeouts.items()):
            if execution_name.startswith(prefix):
                return seconds
        return None

    def install(self) -> Undo:
        undos = [
            install_late_waits(self.profile.wait_lateness, self.profile.rng(), self.waits.append),
            install_payload_limit(self.payload_limit_bytes),
            install_terminal_errors(),
            install_states_errors_from_branches(),
            install_history_limit(self.history_limit_events),
            install_cached_json_paths(),
            install_unique_execution_names(),
            install_ends_from_outside(),
            install_execution_timeouts(self.timeout_of),
        ]

        def uninstall() -> None:
            while undos:
                undos.pop()()

        return uninstall


# ---- Wait states ------------------------------------------------------------------------------------


def install_late_waits(lateness: Lateness, rng: random.Random, record: Callable[[WaitRecord], None]) -> Undo:
    """Every Wait (Seconds, SecondsPath, Timestamp, TimestampPath) sleeps until its exact target instant plus
    a lateness drawn from ``lateness``, and ``record`` gets a ``WaitRecord`` when it wakes."""
    from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import FailureEventException
    from moto.stepfunctions.parser.asl.component.state.wait.wait_function.timestamp import Timestamp
    from moto.stepfunctions.parser.asl.component.state.wait.wait_function.wait_function import WaitFunction

    original = WaitFunction._eval_body
    draw_lock = threading.Lock()  # one Random shared by every execution's threads

    def target_of(wait: WaitFunction, env: Any) -> float:
        if isinstance(wait, Timestamp):
            wait.string.eval(env=env)
            raw = env.stack.pop()
            # AWS reads the timestamp to the second and drops any fraction, as moto's parser does
            parsed = wait._from_timestamp_string(timestamp=raw)
            if parsed is None:
                raise FailureEventException(wait._create_failure_event(env, raw))
            return parsed.replace(tzinfo=dt.UTC).timestamp()
        # Seconds count from when the state began
        entered = env.states.context_object.context_object_data.get("State", {}).get("EnteredTime")
        began = dt.datetime.fromisoformat(entered).timestamp() if entered else time.time()
        return began + wait._get_wait_seconds(env=env)

    def eval_body(self: WaitFunction, env: Any) -> None:
        target = target_of(self, env)
        with draw_lock:
            planned = target + lateness.draw(rng)
        while env.is_running():
            remaining = planned - time.time()
            if remaining <= 0:
                break
            env.program_state_event.wait(remaining)  # set (and cleared) when the execution stops
        if not env.is_running():
            return
        context = env.states.context_object.context_object_data
        state = context.get("State", {}).get("Name", "")
        record(
            WaitRecord(
                execution=context["Execution"]["Name"],
                state=state,
                target=target,
                planned=planned,
                woke=time.time(),
            )
        )

    WaitFunction._eval_body = eval_body
    return lambda: setattr(WaitFunction, "_eval_body", original)


# ---- payload size -----------------------------------------------------------------------------------


def payload_size(value: Any) -> int:
    """Bytes of the value as Step Functions counts them: its JSON text in UTF-8 (a string with its quotes)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8"))


def _data_limit_exceeded(env: Any, cause: str, lambda_task: bool = False) -> Exception:
    from moto.stepfunctions.parser.api import (
        ExecutionFailedEventDetails,
        HistoryEventType,
        LambdaFunctionFailedEventDetails,
    )
    from moto.stepfunctions.parser.asl.component.common.error_name.failure_event import (
        FailureEvent,
        FailureEventException,
    )
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name import StatesErrorName
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name_type import (
        StatesErrorNameType,
    )
    from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails

    error_type = StatesErrorNameType.StatesStatesDataLimitExceeded
    if lambda_task:
        event_type = HistoryEventType.LambdaFunctionFailed
        details = EventDetails(
            lambdaFunctionFailedEventDetails=LambdaFunctionFailedEventDetails(
                error=error_type.to_name(), cause=cause
            )
        )
    else:
        event_type = HistoryEventType.ExecutionFailed
        details = EventDetails(
            executionFailedEventDetails=ExecutionFailedEventDetails(error=error_type.to_name(), cause=cause)
        )
    return FailureEventException(
        failure_event=FailureEvent(
            env=env, error_name=StatesErrorName(typ=error_type), event_type=event_type, event_details=details
        )
    )


def install_payload_limit(limit_bytes: int = PAYLOAD_LIMIT_BYTES) -> Undo:
    """A state's input (on entering it), its output, a Lambda task's input (after Parameters) and its result
    are each at most ``limit_bytes``; past it the state fails with ``States.DataLimitExceeded``.

    moto checks outputs and Lambda results already, against 256 KiB but refusing exactly 262,144 bytes;
    its check is replaced so the figure and the boundary are AWS's, and the input checks are added."""
    from moto.stepfunctions.parser.asl.component.state import state as state_module
    from moto.stepfunctions.parser.asl.component.state.exec.state_task import state_task_lambda
    from moto.stepfunctions.parser.asl.component.state.exec.state_task.service import state_task_service

    def within(value: Any) -> bool:
        return payload_size(value) <= limit_bytes

    checkers = (state_module, state_task_lambda, state_task_service)
    original_checks = [module.is_within_size_quota for module in checkers]
    for module in checkers:
        module.is_within_size_quota = within

    State = state_module.CommonStateField
    original_state_body = State._eval_body

    def state_body(self: Any, env: Any) -> None:
        size = payload_size(env.states.get_input())
        if size > limit_bytes:
            raise _data_limit_exceeded(
                env,
                f"The state '{self.name}' received an input of {size} bytes, "
                f"above the maximum of {limit_bytes} bytes.",
            )
        original_state_body(self, env)

    StateTaskLambda = state_task_lambda.StateTaskLambda
    original_parameters = StateTaskLambda._eval_parameters

    def lambda_parameters(self: Any, env: Any) -> dict:
        parameters = original_parameters(self, env)
        size = payload_size(parameters["Payload"])
        if size > limit_bytes:
            raise _data_limit_exceeded(
                env,
                f"The task '{self.resource.resource_arn}' was given an input of "
                f"{size} bytes, above the maximum of {limit_bytes} bytes.",
                lambda_task=True,
            )
        return parameters

    original_lambda_check = StateTaskLambda._verify_size_quota

    def lambda_result_check(self: Any, env: Any, value: Any) -> None:
        # moto measures the invoke's whole response ({"Payload": ...}); the quota is on the result itself
        result = value["Payload"] if isinstance(value, dict) and "Payload" in value else value
        original_lambda_check(self, env, result)

    State._eval_body = state_body
    StateTaskLambda._eval_parameters = lambda_parameters
    StateTaskLambda._verify_size_quota = lambda_result_check

    def uninstall() -> None:
        State._eval_body = original_state_body
        StateTaskLambda._eval_parameters = original_parameters
        StateTaskLambda._verify_size_quota = original_lambda_check
        for module, check in zip(checkers, original_checks, strict=True):
            module.is_within_size_quota = check

    return uninstall


# ---- errors States.ALL does not catch ---------------------------------------------------------------


def install_terminal_errors(terminal: tuple[str, ...] = (DATA_LIMIT_EXCEEDED, RUNTIME)) -> Undo:
    """``States.ALL`` in a Retrier or Catcher leaves ``terminal`` errors alone, as on AWS; a Retrier or
    Catcher that names one explicitly still matches it."""
    from moto.stepfunctions.parser.asl.component.common.error_name.error_equals_decl import ErrorEqualsDecl

    original = ErrorEqualsDecl._eval_body

    def eval_body(self: Any, env: Any) -> None:
        error = env.stack[-1] if env.stack else None
        if getattr(error, "error_name", None) in terminal and error not in self.error_names:
            env.stack.pop()
            env.stack.append(False)
            return
        original(self, env)

    ErrorEqualsDecl._eval_body = eval_body
    return lambda: setattr(ErrorEqualsDecl, "_eval_body", original)


def install_states_errors_from_branches() -> Undo:
    """A failed Map iteration or Parallel branch passes a ``States.`` error name on as that error."""
    from moto.stepfunctions.parser.asl.component.common.error_name.custom_error_name import CustomErrorName
    from moto.stepfunctions.parser.asl.component.common.error_name.states_error_name import StatesErrorName
    from moto.stepfunctions.parser.asl.component.state.exec.state_map.iteration import iteration_worker
    from moto.stepfunctions.parser.asl.component.state.exec.state_parallel import branches_decl

    def error_name_of(error_name: str | None) -> Any:
        if error_name is not None and error_name.startswith("States."):
            try:
                return StatesErrorName.from_name(error_name)
            except ValueError:
                pass
        return CustomErrorName(error_name=error_name)

    modules = (iteration_worker, branches_decl)
    for module in modules:
        module.CustomErrorName = error_name_of

    def uninstall() -> None:
        for module in modules:
            module.CustomErrorName = CustomErrorName

    return uninstall


# ---- history size -----------------------------------------------------------------------------------


def install_history_limit(limit: int = HISTORY_LIMIT_EVENTS) -> Undo:
    """An execution's history holds at most ``limit`` events. When it holds ``limit - 1``, the next event is
    kept only if it ends the execution; any other event fails the execution with ``States.Runtime``, whose
    ``ExecutionFailed`` becomes event number ``limit``."""
    from moto.stepfunctions.parser.api import ExecutionFailedEventDetails, HistoryEventType
    from moto.stepfunctions.parser.asl.eval.environment import Environment
    from moto.stepfunctions.parser.asl.eval.event.event_manager import EventManager

    ending = {
        HistoryEventType.ExecutionSucceeded,
        HistoryEventType.ExecutionFailed,
        HistoryEventType.ExecutionAborted,
        HistoryEventType.ExecutionTimedOut,
    }
    history_full = ExecutionFailedEventDetails(
        error=RUNTIME, cause=f"The execution reached the maximum number of history events ({limit})."
    )
    original_init = Environment.__init__
    original_add = EventManager.add_event
    original_set_error = Environment.set_error

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        # A frame (a Map iteration) replaces its manager by its parent's, which keeps the root as owner.
        self.event_manager.history_owner = self
        self.event_manager.history_count = 0
        self.event_manager.history_full = False
        self.event_manager.history_lock = threading.Lock()

    def add_event(self: Any, context: Any, event_type: Any, *args: Any, **kwargs: Any) -> int:
        lock = getattr(self, "history_lock", None)
        if lock is None:  # a manager made before install
            return original_add(self, context, event_type, *args, **kwargs)
        with lock:
            if self.history_full:
                keep, fail_now = event_type == HistoryEventType.ExecutionFailed, False
            elif self.history_count >= limit - 1 and event_type not in ending:
                keep, fail_now = False, True
                self.history_full = True
            else:
                keep, fail_now = True, False
            if keep:
                self.history_count += 1
        if fail_now:
            self.history_owner.set_error(history_full)
        if not keep:
            return self.history_count
        return original_add(self, context, event_type, *args, **kwargs)

    def set_error(self: Any, error: Any) -> None:
        # Once the history is full, whatever else fails on the way out, the execution's error is that.
        if getattr(self.event_manager, "history_full", False):
            error = history_full
        original_set_error(self, error)

    Environment.__init__ = init
    EventManager.add_event = add_event
    Environment.set_error = set_error

    def uninstall() -> None:
        Environment.__init__ = original_init
        EventManager.add_event = original_add
        Environment.set_error = original_set_error

    return uninstall


# ---- execution names ------------------------------------------------------------------------------


def install_unique_execution_names() -> Undo:
    """One execution per name, however many callers start it at once: AWS answers a second StartExecution
    of a name with the running execution (same input) or ``ExecutionAlreadyExists``. moto checks the name,
    then spends a long time copying the state machine before recording the execution, so concurrent starts
    of one name each ran an execution of their own (under one ARN). Starts are serialised here."""
    from moto.stepfunctions.parser.models import StepFunctionsParserBackend

    original = StepFunctionsParserBackend.start_execution
    lock = threading.Lock()

    @functools.wraps(original)
    def start_execution(self: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            return original(self, *args, **kwargs)

    StepFunctionsParserBackend.start_execution = start_execution

    def uninstall() -> None:
        StepFunctionsParserBackend.start_execution = original

    return uninstall


# ---- speed ------------------------------------------------------------------------------------------


def install_cached_json_paths() -> Undo:
    """Parse each JSONPath once: moto's interpreter parses ``ResultPath`` and every input path anew on each
    evaluation. A parsed path is only read afterwards (``find``, ``update_or_create``), so sharing is safe."""
    from moto.stepfunctions.parser.asl.component.common.path import result_path
    from moto.stepfunctions.parser.asl.utils import json_path

    modules = (result_path, json_path)
    originals = [module.parse for module in modules]
    for module, parse in zip(modules, originals, strict=True):
        module.parse = functools.lru_cache(maxsize=1024)(parse)

    def uninstall() -> None:
        for module, parse in zip(modules, originals, strict=True):
            module.parse = parse

    return uninstall


# ---- an end decided outside the interpreter: StopExecution, TimeoutSeconds ---------------------------

#: how long StopExecution waits for a just-started execution's interpreter to build its environment
_ENVIRONMENT_WITHIN_S = 5.0


def end_from_outside(
    execution: Any,
    set_state: Callable[[Any], None],
    event_type: Any,
    event_details: Any,
    error: str | None,
    cause: str | None,
) -> bool | None:
    """End ``execution`` there and then, as AWS does for a stop or a timeout: ``set_state(env)`` moves its
    program (and its frames: Map iterations, Parallel branches) out of running, waking its Waits; its error
    and cause are set; its history is closed with one ``event_type`` event; its end is reported once.

    From then on its history takes nothing more: what the interpreter's thread still reports on its way out
    (a late Lambda result, the next state, a Map iteration's abort, its own end) is dropped and counted in the
    event manager's ``late_events_dropped`` (``install_ends_from_outside``). True when it ended it, False
    when the execution had ended first, None when its interpreter has not built its environment yet."""
    worker = execution.exec_worker
    env = worker.env if worker is not None else None
    if env is None:
        return None
    manager = env.event_manager
    with env._state_mutex:  # decided against the interpreter's own end, which takes the same lock
        if not env.is_running():
            return False
        # set before the interpreter can see the end: it may report it first, and must report this
        execution.error, execution.cause = error, cause
        manager._local_history_closed = True
        set_state(env)
    # written outside the lock: a full history's own end takes it from within add_event
    manager.add_event(
        context=env.event_history_context, event_type=event_type, event_details=event_details, closing=True
    )
    worker._execution_communication.terminated()
    return True


def install_ends_from_outside() -> Undo:
    """StopExecution ends the execution when it is called (ABORTED, its stop date, error and cause, one
    ``ExecutionAborted`` event that ends its history, its end reported once), whatever its interpreter is
    doing; ``end_from_outside`` is the one way such an end is made (the execution's TimeoutSeconds too).

    moto alone kept a stopped execution RUNNING until the Lambda invoke in flight returned (up to the
    function's Timeout), then recorded that invoke's result and only then its ``ExecutionAborted``; in a Map
    iteration the late result crashed the Map state and the history ended with an ``ExecutionFailed``; and it
    dropped StopExecution's ``error`` and ``cause`` (the plugin's cancel names ``RunCancelled``)."""
    from moto.core.responses import ActionResult
    from moto.stepfunctions.parser.api import ExecutionAbortedEventDetails, HistoryEventType
    from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails
    from moto.stepfunctions.parser.asl.eval.event.event_manager import EventManager
    from moto.stepfunctions.parser.backend.execution import BaseExecutionWorkerCommunication, Execution
    from moto.stepfunctions.responses import StepFunctionResponse

    original_stop, original_terminated = Execution.stop, BaseExecutionWorkerCommunication.terminated
    original_add, original_answer = EventManager.add_event, StepFunctionResponse.stop_execution
    once = threading.Lock()

    def add_event(
        self: Any, context: Any, event_type: Any, *args: Any, closing: bool = False, **kwargs: Any
    ) -> Any:
        if getattr(self, "_local_history_closed", False) and not closing:
            self.late_events_dropped = getattr(self, "late_events_dropped", 0) + 1
            return context.last_published_event_id
        return original_add(self, context, event_type, *args, **kwargs)

    def terminated(self: Any) -> None:
        # reported by the end from outside, and again by the interpreter's thread when it gets back
        with once:
            if getattr(self, "_local_terminated", False):
                return
            self._local_terminated = True
        original_terminated(self)

    def stop(self: Any, stop_date: Any, error: str | None, cause: str | None) -> None:
        def set_stopped(env: Any) -> None:
            env.set_stop(stop_date=stop_date, cause=cause, error=error)

        details = EventDetails(
            executionAbortedEventDetails=ExecutionAbortedEventDetails(error=error, cause=cause)
        )
        # A stop within moments of the start may find no environment yet: it waits for it, a moment
        deadline = time.monotonic() + _ENVIRONMENT_WITHIN_S
        while (
            end_from_outside(self, set_stopped, HistoryEventType.ExecutionAborted, details, error, cause)
            is None
        ):
            if time.monotonic() >= deadline:
                original_stop(self, stop_date=stop_date, error=error, cause=cause)  # moto's own answer
                return
            time.sleep(0.01)

    @functools.wraps(original_answer)
    def answer(self: Any) -> Any:
        # moto's own answer stops with error and cause "" whatever the call gave
        execution = self.stepfunction_backend.describe_execution(self._get_param("executionArn"))
        execution.stop(
            stop_date=dt.datetime.now(dt.UTC), error=self._get_param("error"), cause=self._get_param("cause")
        )
        return ActionResult({"stopDate": execution.stop_date})

    Execution.stop, BaseExecutionWorkerCommunication.terminated = stop, terminated
    EventManager.add_event, StepFunctionResponse.stop_execution = add_event, answer

    def uninstall() -> None:
        Execution.stop, BaseExecutionWorkerCommunication.terminated = original_stop, original_terminated
        EventManager.add_event, StepFunctionResponse.stop_execution = original_add, original_answer

    return uninstall


# ---- the execution's TimeoutSeconds ------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def execution_timeout_seconds(definition: str) -> int | None:
    """The top-level ``TimeoutSeconds`` of an ASL definition (None when it sets none)."""
    seconds = json.loads(definition).get("TimeoutSeconds")
    return int(seconds) if seconds is not None else None


def install_execution_timeouts(timeout_of: Callable[[str], float | None] = lambda _name: None) -> Undo:
    """An execution still running ``TimeoutSeconds`` after its start date is timed out at that moment, as AWS
    does: TIMED_OUT, its stop date, error ``States.Timeout``, an ``ExecutionTimedOut`` history event that ends
    its history and its end reported once, by ``end_from_outside`` as for a stop (so
    ``install_ends_from_outside`` must be installed too). A timer per execution sleeps until the deadline and
    is cancelled when the execution ends first (a stop, a success, a failure).

    moto alone joins its interpreter thread for ``TimeoutSeconds`` and then marks the program timed out over
    whatever state it is in, with no error; its ``ExecutionTimedOut`` event is written only when the thread
    returns, after the late result of the invoke that was in flight; DescribeExecution and ListExecutions
    gave no stop date to a TIMED_OUT execution. Its own timeout is switched off so that the timer is the one
    clock. ``timeout_of(name)``, when not None, replaces the definition's figure for that execution (a test
    seam)."""
    from moto.stepfunctions.parser.api import ExecutionTimedOutEventDetails, HistoryEventType
    from moto.stepfunctions.parser.asl.component.eval_component import EvalComponent
    from moto.stepfunctions.parser.asl.component.program.program import Program
    from moto.stepfunctions.parser.asl.eval.event.event_detail import EventDetails
    from moto.stepfunctions.parser.backend.execution import BaseExecutionWorkerCommunication, Execution
    from moto.stepfunctions.responses import StepFunctionResponse

    original_start, original_terminated = Execution.start, BaseExecutionWorkerCommunication.terminated
    original_program_eval = Program.eval
    timers: set[threading.Timer] = set()  # armed and not yet fired or cancelled
    timers_lock = threading.Lock()
    timed_out = EventDetails(executionTimedOutEventDetails=ExecutionTimedOutEventDetails(error=TIMEOUT))

    def arm(execution: Any, delay_s: float) -> None:
        timer = threading.Timer(max(0.0, delay_s), time_out, args=(execution,))
        timer.daemon = True
        with timers_lock:
            timers.add(timer)
        execution._local_timeout_timer = timer
        timer.start()

    def time_out(execution: Any) -> None:
        with timers_lock:
            timers.discard(getattr(execution, "_local_timeout_timer", None))
        ended = end_from_outside(
            execution,
            lambda env: env.set_timed_out(),
            HistoryEventType.ExecutionTimedOut,
            timed_out,
            TIMEOUT,
            None,
        )
        if ended is None:  # its thread has not built its environment yet (a timeout of a moment)
            arm(execution, 0.05)

    def start(self: Any) -> None:
        seconds = timeout_of(self.name)
        if seconds is None:
            seconds = execution_timeout_seconds(self.state_machine.definition)
        if seconds is not None:  # armed first, so that an end however quick finds it to cancel
            elapsed = (dt.datetime.now(dt.UTC) - self.start_date).total_seconds()
            arm(self, seconds - elapsed)
        try:
            original_start(self)
        except BaseException:
            disarm(self)
            raise

    def disarm(execution: Any) -> None:
        timer = getattr(execution, "_local_timeout_timer", None)
        if timer is not None:
            timer.cancel()  # a no-op when it is the timer that ends the execution
            with timers_lock:
                timers.discard(timer)

    def terminated(self: Any) -> None:
        disarm(self.execution)
        original_terminated(self)

    def program_eval(self: Any, env: Any) -> None:
        if self.timeout_seconds is None:  # a branch or iteration, or a machine without a timeout
            original_program_eval(self, env)
            return
        # moto's eval minus its join with a timeout: the timer above is the execution's one clock
        env.next_state_name = self.start_at.start_at_name
        EvalComponent.eval(self, env)

    def with_stop_dates(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
        # moto's DescribeExecution and ListExecutions give a stop date to every end but TIMED_OUT
        @functools.wraps(original)
        def answer(self: Any) -> Any:
            result = original(self)
            listed = result.result.get("executions", [result.result])
            for item in listed:
                if item.get("status") == "TIMED_OUT" and "stopDate" not in item:
                    ended = self.stepfunction_backend.describe_execution(item["executionArn"])
                    item["stopDate"] = ended.stop_date
            return result

        return answer

    original_describe, original_list = (
        StepFunctionResponse.describe_execution,
        StepFunctionResponse.list_executions,
    )
    Execution.start, BaseExecutionWorkerCommunication.terminated = start, terminated
    Program.eval = program_eval
    StepFunctionResponse.describe_execution = with_stop_dates(original_describe)
    StepFunctionResponse.list_executions = with_stop_dates(original_list)

    def uninstall() -> None:
        Execution.start, BaseExecutionWorkerCommunication.terminated = original_start, original_terminated
        Program.eval = original_program_eval
        StepFunctionResponse.describe_execution = original_describe
        StepFunctionResponse.list_executions = original_list
        with timers_lock:
            pending = list(timers)
            timers.clear()
        for timer in pending:
            timer.cancel()

    return uninstall


# ---- EventBridge: an execution's end reported to the rules that ask for it ---------------------------


def status_change_event(execution: Any) -> dict[str, Any]:
    """What Step Functions sends EventBridge when ``execution`` (moto's) ends: the detail carries its input
    as the JSON text it was started with, and its dates in epoch milliseconds."""
    from local_stack.template import ACCOUNT_ID, EXECUTION_STATUS_CHANGE, REGION

    def epoch_ms(when: Any) -> int | None:
        return int(when.timestamp() * 1000) if when is not None else None

    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": EXECUTION_STATUS_CHANGE,
        "source": "aws.states",
        "account": ACCOUNT_ID,
        "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": REGION,
        "resources": [execution.exec_arn],
        "detail": {
            "executionArn": execution.exec_arn,
            "stateMachineArn": execution.state_machine_arn,
            "name": execution.name,
            "status": execution.exec_status.value,
            "startDate": epoch_ms(execution.start_date),
            "stopDate": epoch_ms(execution.stop_date),
            "input": json.dumps(execution.input_data),
            "inputDetails": {"included": True},
            "output": None,
            "outputDetails": None,
            "error": execution.error,
            "cause": execution.cause,
        },
    }


def install_status_change_events(
    rules: list[Any], deliver: Callable[[str, dict[str, Any]], None], copies: Callable[[], int]
) -> Undo:
    """Each execution that ends sends its "Execution Status Change" event to the function of every rule whose
    pattern matches (``StatusChangeRule``), on a thread of its own, as EventBridge invokes a Lambda target
    asynchronously after the execution has ended; ``copies()`` says how many times each delivery is made
    (EventBridge delivers at least once). moto alone sends no event."""
    from moto.stepfunctions.parser.backend.execution import BaseExecutionWorkerCommunication

    original = BaseExecutionWorkerCommunication.terminated
    once = threading.Lock()
    # whose end this install has sent: its own record, so a test may listen beside the stack's rules
    sent: weakref.WeakSet[Any] = weakref.WeakSet()

    def terminated(self: Any) -> None:
        with once:  # a stopped execution's end is reported by StopExecution and again by its own thread
            if self in sent:
                return
            sent.add(self)
        original(self)
        execution = self.execution
        status = execution.exec_status.value if execution.exec_status is not None else None
        for rule in rules:
            arns = rule.state_machine_arns
            if status in rule.statuses and (not arns or execution.state_machine_arn in arns):
                event = status_change_event(execution)
                for _ in range(copies()):
                    threading.Thread(target=deliver, args=(rule.function, event), daemon=True).start()

    BaseExecutionWorkerCommunication.terminated = terminated
    return lambda: setattr(BaseExecutionWorkerCommunication, "terminated", original)
