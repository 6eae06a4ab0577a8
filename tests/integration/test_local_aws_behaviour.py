"""The local stack's Step Functions behaves as AWS's does where a kind one would not: Waits wake late by the
profile's amount and never early, a state above 256 KiB fails with States.DataLimitExceeded that States.ALL
does not catch, an execution past 25,000 history events fails, one past its TimeoutSeconds ends
TIMED_OUT at that moment, and a stopped one's history ends with its ExecutionAborted whatever finishes
after the stop. Each test runs a tiny state machine of its own on the stack's moto server and
waits for conditions, never for a fixed time."""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from local_stack.profiles import Lateness
from local_stack.step_functions import (
    HISTORY_LIMIT_EVENTS,
    PAYLOAD_LIMIT_BYTES,
    TIMEOUT,
    install_late_waits,
    install_status_change_events,
)
from local_stack.template import StatusChangeRule
from tests.conftest import wait_for

pytestmark = pytest.mark.stack

ENDED_WITHIN_S = 120  # a deadline for an execution to end, generous for a busy 2-core machine
_created: list[str] = []  # this module's state machines, deleted after each test


@pytest.fixture(autouse=True)
def _delete_machines(stack):
    """The shared stack keeps no probe machine: a 25,000-event history would make every later scan of the
    stack's executions (the canary's) wait minutes on moto's GetExecutionHistory."""
    yield
    sfn = stack.client("stepfunctions")
    while _created:
        sfn.delete_state_machine(stateMachineArn=_created.pop())


def _start(stack, definition: dict, payload: dict | None = None) -> tuple[str, str]:
    """Create the state machine and start one execution: (name, arn)."""
    sfn = stack.client("stepfunctions")
    name = f"behaviour-{uuid.uuid4().hex[:10]}"
    role = f"arn:aws:iam::123456789012:role/{stack.options.stack_name}-execution"
    machine = sfn.create_state_machine(name=name, definition=json.dumps(definition), roleArn=role)
    _created.append(machine["stateMachineArn"])
    arn = sfn.start_execution(
        stateMachineArn=machine["stateMachineArn"], name=name, input=json.dumps(payload or {})
    )["executionArn"]
    return name, arn


def _run(stack, definition: dict, payload: dict | None = None) -> tuple[str, str, dict]:
    """Create the state machine, start one execution and wait until it ends: (name, arn, description)."""
    sfn = stack.client("stepfunctions")
    name, arn = _start(stack, definition, payload)
    deadline = time.monotonic() + ENDED_WITHIN_S
    while (described := sfn.describe_execution(executionArn=arn))["status"] == "RUNNING":
        assert time.monotonic() < deadline, f"{name} still running after {ENDED_WITHIN_S} s"
        time.sleep(0.05)
    return name, arn, described


def _backend_execution(execution_arn: str):
    """moto's own record of the execution, in this process."""
    from moto.stepfunctions.parser.models import stepfunctions_parser_backends

    account, region = execution_arn.split(":")[4], execution_arn.split(":")[3]
    return stepfunctions_parser_backends[account][region].describe_execution(execution_arn=execution_arn)


def _history(execution_arn: str) -> list[dict]:
    """The execution's history read from moto's backend in this process: moto's GetExecutionHistory ignores
    maxResults and serializes all 25,000 events, which takes minutes on a busy machine."""
    env = _backend_execution(execution_arn).exec_worker.env
    return list(env.event_manager.get_event_history()) if env is not None else []  # None: not begun yet


def _wait_machine() -> dict:
    return {
        "StartAt": "Pause",
        "States": {
            "Pause": {"Type": "Wait", "Seconds": 1, "Next": "Until"},
            "Until": {"Type": "Wait", "TimestampPath": "$.at", "End": True},
        },
    }


def _whole_second_from_now(seconds: int) -> tuple[int, str]:
    target = int(time.time()) + seconds  # whole seconds, as AWS reads timestamps and the plugin writes them
    return target, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(target))


def test_waits_wake_late_by_the_profiles_amount_and_never_early(stack):
    lateness = stack.profile.wait_lateness
    target, at = _whole_second_from_now(3)
    name, arn, described = _run(stack, _wait_machine(), {"at": at})
    assert described["status"] == "SUCCEEDED"

    records = stack.step_functions.waits_of(name)
    assert [r.state for r in records] == ["Pause", "Until"]
    pause, until = records
    assert until.target == target
    for record in records:
        # the drawn lateness is the profile's, and the Wait slept at least that long past its target
        assert lateness.low_ms / 1000 <= record.drawn_lateness <= lateness.high_ms / 1000
        assert record.woke >= record.planned
    # the second Wait began when the first one woke (Seconds count from the state's entry)
    assert until.woke >= pause.woke
    # and the history agrees: each Wait state exited no sooner than its target plus the lowest lateness
    events = stack.client("stepfunctions").get_execution_history(executionArn=arn, maxResults=1000)["events"]
    exits = [e["timestamp"].timestamp() for e in events if e["type"] == "WaitStateExited"]
    assert len(exits) == 2
    for record, exited in zip(records, exits, strict=True):
        assert exited >= record.target + lateness.low_ms / 1000 - 0.001  # history times are to the ms


def test_a_wait_wakes_late_by_exactly_a_configured_constant(stack):
    """A degenerate distribution (low = mode = high) makes the amount exact: the Wait ends 1.5 s after its
    target, not before, whatever the stack's own profile."""
    records = []
    constant = Lateness(low_ms=1500, mode_ms=1500, high_ms=1500)
    undo = install_late_waits(constant, stack.profile.rng(), records.append)
    try:
        target, at = _whole_second_from_now(1)
        name, _, described = _run(
            stack,
            {"StartAt": "Until", "States": {"Until": {"Type": "Wait", "TimestampPath": "$.at", "End": True}}},
            {"at": at},
        )
    finally:
        undo()
    assert described["status"] == "SUCCEEDED"
    [record] = [r for r in records if r.execution == name]
    assert record.target == target and record.planned == target + 1.5
    assert record.woke >= target + 1.5
    assert described["stopDate"].timestamp() >= target + 1.5


def _grow_to(total_bytes: int) -> tuple[dict, dict]:
    """A Pass state whose output, {"a": half, "b": half, "c": odd byte}, is exactly ``total_bytes`` of JSON,
    built at run time from an input of about half that (a 300 KB literal in the definition would make moto's
    ASL parser crawl)."""
    overhead = len('{"a":"","b":"","c":""}')
    half = (total_bytes - overhead) // 2
    odd = total_bytes - overhead - 2 * half
    state = {"Type": "Pass", "Parameters": {"a.$": "$.half", "b.$": "$.half", "c": "x" * odd}, "End": True}
    return state, {"half": "x" * half}


def _caught_by_states_all(inner_state: dict) -> dict:
    return {
        "StartAt": "Fan",
        "States": {
            "Fan": {
                "Type": "Parallel",
                "Branches": [{"StartAt": "Grow", "States": {"Grow": inner_state}}],
                "Catch": [{"ErrorEquals": ["States.ALL"], "Next": "Caught"}],
                "End": True,
            },
            "Caught": {"Type": "Succeed"},
        },
    }


def test_a_300_kb_state_fails_with_data_limit_exceeded_which_states_all_does_not_catch(stack):
    state, payload = _grow_to(300_000)
    _, _, described = _run(stack, _caught_by_states_all(state), payload)
    assert described["status"] == "FAILED"
    assert described["error"] == "States.DataLimitExceeded"


def test_a_state_of_exactly_256_kib_passes_and_one_byte_more_fails(stack):
    state, payload = _grow_to(PAYLOAD_LIMIT_BYTES)
    _, _, at_limit = _run(stack, {"StartAt": "Grow", "States": {"Grow": state}}, payload)
    assert at_limit["status"] == "SUCCEEDED"
    state, payload = _grow_to(PAYLOAD_LIMIT_BYTES + 1)
    _, _, above = _run(stack, {"StartAt": "Grow", "States": {"Grow": state}}, payload)
    assert above["status"] == "FAILED" and above["error"] == "States.DataLimitExceeded"


@pytest.mark.slow
def test_an_execution_past_25000_history_events_fails_as_aws_fails_it(stack):
    # a Pass state looping on itself records two events a round and never ends by itself
    _, arn, described = _run(stack, {"StartAt": "Spin", "States": {"Spin": {"Type": "Pass", "Next": "Spin"}}})
    assert described["status"] == "FAILED"
    assert described["error"] == "States.Runtime"
    limit = HISTORY_LIMIT_EVENTS
    assert described["cause"] == f"The execution reached the maximum number of history events ({limit})."
    events = _history(arn)
    assert len(events) == HISTORY_LIMIT_EVENTS
    assert events[-1]["id"] == HISTORY_LIMIT_EVENTS and events[-1]["type"] == "ExecutionFailed"


def test_an_execution_past_its_timeout_seconds_ends_timed_out_at_once_and_its_end_is_sent(stack):
    """A Lambda task is held in flight past the machine's TimeoutSeconds: the execution is TIMED_OUT while the
    invoke still runs, as AWS reports it, its status change is sent, and the task's late result changes
    nothing."""
    from tests.integration.test_local_lambda import probe_spec

    probe = stack.add_function(probe_spec(f"held{uuid.uuid4().hex[:6]}"))
    timeout_s = 3
    definition = {
        "TimeoutSeconds": timeout_s,
        "StartAt": "Call",
        "States": {
            "Call": {"Type": "Task", "Resource": probe, "Next": "After"},
            "After": {"Type": "Pass", "End": True},
        },
    }
    sent: list[dict] = []
    listening = install_status_change_events(
        [StatusChangeRule(function="Listener", state_machine_arns=(), statuses=("TIMED_OUT",))],
        lambda _function, event: sent.append(event),
        lambda: 1,
    )
    folder = Path(tempfile.mkdtemp(prefix="timeout-"))
    invoked, release = folder / "invoked", folder / "release"
    try:
        _, arn = _start(stack, definition, {"mark": str(invoked), "hold_until_exists": str(release)})
        sfn = stack.client("stepfunctions")
        described = wait_for(
            lambda: (d := sfn.describe_execution(executionArn=arn))["status"] != "RUNNING" and d,
            "the execution ended",
            ENDED_WITHIN_S,
            0.05,
        )
        held = wait_for(invoked.exists, "the probe invoked", ENDED_WITHIN_S, 0.05)
        assert held and not release.exists()  # its invoke is still in flight
        assert described["status"] == "TIMED_OUT" and described["error"] == TIMEOUT
        assert "cause" not in described and described["stopDate"] >= described["startDate"]
        execution = _backend_execution(arn)
        assert (execution.stop_date - execution.start_date).total_seconds() >= timeout_s  # never early
        events = _history(arn)
        assert events[-1]["type"] == "ExecutionTimedOut"
        assert events[-1]["executionTimedOutEventDetails"]["error"] == TIMEOUT

        (event,) = wait_for(
            lambda: [e for e in sent if e["detail"]["executionArn"] == arn], "its end sent", 60
        )
        detail = event["detail"]
        assert detail["status"] == "TIMED_OUT" and detail["error"] == TIMEOUT
        assert detail["stopDate"] == int(execution.stop_date.timestamp() * 1000)

        release.touch()  # the invoke returns: its result comes back to an execution that has ended
        manager = execution.exec_worker.env.event_manager
        wait_for(
            lambda: getattr(manager, "late_events_dropped", 0), "the late result back", ENDED_WITHIN_S, 0.05
        )
        assert sfn.describe_execution(executionArn=arn)["status"] == "TIMED_OUT"
        after = _history(arn)
        assert after == events  # nothing recorded after the end: no result, no next state, no second end
    finally:
        release.touch()
        listening()


def test_an_execution_that_ends_before_its_timeout_seconds_is_not_timed_out(stack):
    definition = {"TimeoutSeconds": 2, "StartAt": "Done", "States": {"Done": {"Type": "Pass", "End": True}}}
    _, arn, described = _run(stack, definition)
    assert described["status"] == "SUCCEEDED"
    timer = _backend_execution(arn)._local_timeout_timer
    assert timer.finished.is_set()  # cancelled when it ended: nothing is left to time it out later


# ---- StopExecution ----------------------------------------------------------------------------------

ENDS = {"ExecutionSucceeded", "ExecutionFailed", "ExecutionAborted", "ExecutionTimedOut"}


def _interpreter_returned(execution) -> bool:
    """moto's interpreter thread for the execution has run to its end (whatever it then recorded or not).
    moto keeps no handle on that thread: it is found by its target, the worker's bound method, which
    ``Thread.run`` lets go of once it returns."""
    worker = execution.exec_worker
    return not any(
        getattr(getattr(thread, "_target", None), "__self__", None) is worker
        for thread in threading.enumerate()
    )


def _assert_ends_aborted_once(events: list[dict]) -> None:
    assert events[-1]["type"] == "ExecutionAborted"
    assert [e["type"] for e in events if e["type"] in ENDS] == ["ExecutionAborted"]
    details = events[-1]["executionAbortedEventDetails"]
    assert details["error"] == "Operator" and details["cause"] == "stopped by a test"


def _held_task(probe: str) -> dict:
    return {"Type": "Task", "Resource": probe, "Next": "After"}


def _in_map(state: dict) -> dict:
    """The state as the one state of an INLINE Map's iteration, over one item that passes the input on."""
    state = {**state, "End": True}
    state.pop("Next")
    return {
        "Type": "Map",
        "ItemsPath": "$.items",
        "ItemSelector": {
            "mark.$": "$.mark",
            "hold_until_exists.$": "$.hold_until_exists",
            "done_mark.$": "$.done_mark",
        },
        "ItemProcessor": {"StartAt": "Call", "States": {"Call": state}},
        "Next": "After",
    }


@pytest.mark.parametrize("where", ["top level", "map iteration"])
def test_a_stopped_execution_s_history_ends_at_the_stop_though_its_task_finishes_later(stack, where):
    """StopExecution while a Lambda task is in flight: the execution is ABORTED with its ExecutionAborted
    there and then, as AWS records it; the invoke runs to its end (its effect happens), and what the
    interpreter reports when it gets back (the result, the next state, its own end) is not recorded."""
    from tests.integration.test_local_lambda import probe_spec

    probe = stack.add_function(probe_spec(f"stopped{uuid.uuid4().hex[:6]}"))
    call = _held_task(probe)
    definition = {
        "StartAt": "Call",
        "States": {
            "Call": call if where == "top level" else _in_map(call),
            "After": {"Type": "Pass", "End": True},
        },
    }
    folder = Path(tempfile.mkdtemp(prefix="stopped-"))
    invoked, release, done = folder / "invoked", folder / "release", folder / "done"
    marks = {"mark": str(invoked), "hold_until_exists": str(release), "done_mark": str(done)}
    try:
        _, arn = _start(stack, definition, {**marks, "items": [1]})
        sfn = stack.client("stepfunctions")
        wait_for(invoked.exists, "the probe invoked", ENDED_WITHIN_S, 0.05)
        sfn.stop_execution(executionArn=arn, error="Operator", cause="stopped by a test")
        described = sfn.describe_execution(executionArn=arn)
        assert described["status"] == "ABORTED" and not release.exists()  # its invoke is still in flight
        at_stop = _history(arn)
        _assert_ends_aborted_once(at_stop)

        release.touch()  # the invoke returns to an execution that has ended
        wait_for(done.exists, "the probe's own effect at its end", ENDED_WITHIN_S, 0.05)
        execution = _backend_execution(arn)
        wait_for(lambda: _interpreter_returned(execution), "the interpreter back", ENDED_WITHIN_S, 0.05)
        assert sfn.describe_execution(executionArn=arn)["status"] == "ABORTED"
        assert execution.exec_worker.env.event_manager.late_events_dropped > 0  # the late result was seen
        after = _history(arn)
        assert after == at_stop  # nothing after ExecutionAborted: no result, no next state, no second end
    finally:
        release.touch()


def test_a_stopped_execution_s_history_ends_at_the_stop_while_it_waits(stack):
    """StopExecution during a Wait: ABORTED with ExecutionAborted last, and the Wait, woken by the stop,
    records neither its exit nor the next state."""
    definition = {
        "StartAt": "Pause",
        "States": {
            "Pause": {"Type": "Wait", "Seconds": 600, "Next": "After"},
            "After": {"Type": "Pass", "End": True},
        },
    }
    _, arn = _start(stack, definition)
    sfn = stack.client("stepfunctions")
    wait_for(
        lambda: any(e["type"] == "WaitStateEntered" for e in _history(arn)),
        "the Wait entered",
        ENDED_WITHIN_S,
        0.05,
    )
    sfn.stop_execution(executionArn=arn, error="Operator", cause="stopped by a test")
    assert sfn.describe_execution(executionArn=arn)["status"] == "ABORTED"
    at_stop = _history(arn)
    _assert_ends_aborted_once(at_stop)
    execution = _backend_execution(arn)
    wait_for(lambda: _interpreter_returned(execution), "the interpreter back", ENDED_WITHIN_S, 0.05)
    assert sfn.describe_execution(executionArn=arn)["status"] == "ABORTED"
    assert execution.exec_worker.env.event_manager.late_events_dropped > 0  # its own end, reported late
    assert _history(arn) == at_stop
