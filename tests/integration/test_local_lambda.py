"""The local Lambda runtime behaves as Lambda does: environments are processes of their own (own module
state, own clock), reused while warm, bounded per function (throttled past it), killed at their Timeout
and reported as AWS reports it, limited to 6 MB answers, and, on the profile's share, lose a result
after the work was done. Each behaviour is checked against the runtime itself, and the ones the state
machine must handle also through Step Functions on the running stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from local_stack.lambda_runtime import LambdaService, ResultLost, TooManyRequests
from local_stack.profiles import AWS
from local_stack.template import FunctionSpec
from tests.conftest import wait_for

PROBE_DIR = Path(__file__).resolve().parent / "lambda_probe"


def probe_spec(name: str, timeout_s: int = 30, concurrency: int | None = None) -> FunctionSpec:
    return FunctionSpec(
        logical_id=name,
        physical_name=f"probe-{name}",
        code_dir=PROBE_DIR,
        handler="app.handler",
        timeout_s=timeout_s,
        memory_mb=128,
        reserved_concurrency=concurrency,
    )


@pytest.fixture
def runtime_of():
    """A Lambda runtime of its own, with the probe functions and the given profile."""
    started: list[LambdaService] = []

    def make(*specs: FunctionSpec, profile=AWS) -> LambdaService:
        service = LambdaService(
            {s.logical_id: s for s in specs},
            lambda *_: None,
            profile=profile,
            environ=lambda spec: {"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1"},
        )
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


def call(
    service: LambdaService, spec: FunctionSpec, event: dict | None = None, **kwargs
) -> tuple[dict, bool]:
    payload, failed = service.invoke(spec.physical_name, json.dumps(event or {}), **kwargs)
    return json.loads(payload), failed


def test_a_warm_environment_is_reused_and_keeps_its_module_state(runtime_of):
    spec = probe_spec("warm")
    service = runtime_of(spec)
    first, _ = call(service, spec)
    second, _ = call(service, spec)
    assert first["pid"] == second["pid"] != os.getpid()
    assert (first["invokes"], second["invokes"]) == (1, 2)
    assert [i.cold for i in service.invocations] == [True, False]


def test_two_environments_of_one_function_are_two_processes_that_share_no_module_state(runtime_of, tmp_path):
    spec = probe_spec("pair")
    service = runtime_of(spec)
    release = tmp_path / "release"
    answers: list[dict] = []
    busy = threading.Thread(
        target=lambda: answers.append(
            call(service, spec, {"hold_until_exists": str(release), "mark": str(tmp_path / "m")})[0]
        )
    )
    busy.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "m").exists() and time.monotonic() < deadline:  # the first one is surely busy
        time.sleep(0.02)
    second, _ = call(service, spec)  # the busy one can't take it: a second environment
    release.touch()
    busy.join(60)
    assert second["pid"] != answers[0]["pid"]
    assert second["invokes"] == answers[0]["invokes"] == 1


def test_each_environment_has_its_own_clock_offset_within_the_profile(runtime_of):
    spec = probe_spec("clock")
    profile = AWS.model_copy(update={"clock_offset_ms": 400, "cold_start_every_invoke": True, "seed": 7})
    service = runtime_of(spec, profile=profile)
    offsets = []
    for _ in range(4):
        before = time.time()
        answer, _ = call(service, spec)
        after = time.time()
        # the environment read its clock between before and after, shifted by its offset: however long the
        # call took, its answer lies within the offset of that span
        offsets.append((answer["time"] - before, answer["time"] - after))
    assert all(
        since_before >= -0.4 - 0.01 and since_after <= 0.4 + 0.01 for since_before, since_after in offsets
    )
    assert len({e.setup.clock_offset_s for e in service.environments}) == 4
    assert all(abs(e.setup.clock_offset_s) <= 0.4 for e in service.environments)


def test_past_its_timeout_an_environment_is_killed_and_the_error_has_no_type(runtime_of):
    spec = probe_spec("slow", timeout_s=1)
    service = runtime_of(spec)
    error, failed = call(service, spec, {"sleep_s": 30})
    assert failed and "errorType" not in error
    assert "Task timed out after 1.00 seconds" in error["errorMessage"]
    environment = service.environments[0]
    environment.process.join(10)
    assert not environment.process.is_alive()
    again, failed = call(service, spec)  # the next invoke gets a fresh environment
    assert not failed and again["pid"] != environment.pid


def test_a_function_starved_of_cpu_by_this_machine_is_not_timed_out_for_it(runtime_of):
    """The timeout runs on the environment's own CPU clock (local_stack.own_cpu_clock): pinned to one core
    beside three processes that spin on it, a function needing 1 s of CPU takes several seconds of wall
    time, past its 2 s timeout, and still finishes, its context's remaining time counted the same way."""
    spec = probe_spec("starved", timeout_s=2)
    service = runtime_of(spec)
    call(service, spec)  # its environment exists and is warm: pin it
    environment = service.environments[0]
    core = min(os.sched_getaffinity(environment.pid))
    os.sched_setaffinity(environment.pid, {core})
    spin = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(3)]
    try:
        started = time.monotonic()
        answer, failed = call(service, spec, {"cpu_s": 1.0})
        took_s = time.monotonic() - started
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert took_s > spec.timeout_s  # it was starved past its timeout on the wall clock: the case at hand
    assert not failed and answer["pid"] == environment.pid and answer["remaining_ms"] > 0


def test_past_its_reserved_concurrency_an_invoke_is_throttled(runtime_of, tmp_path):
    spec = probe_spec("one", concurrency=1)
    service = runtime_of(spec)
    release = tmp_path / "release"
    busy = threading.Thread(
        target=call, args=(service, spec, {"hold_until_exists": str(release), "mark": str(tmp_path / "m")})
    )
    busy.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "m").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(TooManyRequests):
        call(service, spec)
    release.touch()
    busy.join(60)
    assert not call(service, spec)[1]  # free again


def test_an_answer_above_6_mb_fails_as_lambda_fails_it(runtime_of):
    spec = probe_spec("big")
    service = runtime_of(spec)
    error, failed = call(service, spec, {"answer_bytes": 6 * 1024 * 1024 + 1})
    assert failed and error["errorType"] == "Function.ResponseSizeTooLarge"


def test_a_lost_result_comes_after_the_work_was_done(runtime_of, tmp_path):
    spec = probe_spec("lossy")
    service = runtime_of(spec, profile=AWS.model_copy(update={"service_exception_share": 1.0}))
    mark = tmp_path / "done"
    with pytest.raises(ResultLost):
        call(service, spec, {"mark": str(mark)}, may_lose_result=True)
    assert mark.exists()  # the handler ran; only its answer was lost
    assert not call(service, spec)[1]  # only Step Functions' invokes are lost, never a direct call


# ---- through Step Functions on the running stack --------------------------------------------------


def _machine(stack, definition: dict) -> str:
    return stack.client("stepfunctions").create_state_machine(
        name=f"probe-{uuid.uuid4().hex[:8]}",
        definition=json.dumps(definition),
        roleArn=f"arn:aws:iam::123456789012:role/{stack.template.stack_name}-execution",
    )["stateMachineArn"]


def _start(stack, machine: str, item: dict) -> str:
    return stack.client("stepfunctions").start_execution(
        stateMachineArn=machine, name=f"run-{uuid.uuid4().hex[:10]}", input=json.dumps(item)
    )["executionArn"]


def _finished(stack, arns: list[str]) -> list[dict]:
    sfn = stack.client("stepfunctions")

    def described():
        found = [sfn.describe_execution(executionArn=arn) for arn in arns]
        return found if all(d["status"] != "RUNNING" for d in found) else None

    return wait_for(described, "the probe executions finished", timeout_s=240)


@pytest.mark.stack
def test_the_state_machine_sees_a_timed_out_lambda_as_lambda_unknown(stack):
    arn = stack.add_function(probe_spec(f"timeout{uuid.uuid4().hex[:6]}", timeout_s=1))
    definition = {
        "StartAt": "Call",
        "States": {
            "Call": {
                "Type": "Task",
                "Resource": arn,
                "End": True,
                "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Caught"}],
            },
            "Caught": {"Type": "Pass", "End": True},
        },
    }
    (done,) = _finished(stack, [_start(stack, _machine(stack, definition), {"sleep_s": 20})])
    error = json.loads(done["output"])["error"]
    assert error["Error"] == "Lambda.Unknown"
    assert "Task timed out after 1.00 seconds" in error["Cause"]


@pytest.mark.stack
def test_a_throttled_invoke_is_retried_by_the_state_machine(stack, tmp_path):
    spec = probe_spec(f"throttle{uuid.uuid4().hex[:6]}", concurrency=1)
    arn = stack.add_function(spec)
    definition = {
        "StartAt": "Call",
        "States": {
            "Call": {
                "Type": "Task",
                "Resource": arn,
                "End": True,
                "Retry": [
                    {
                        "ErrorEquals": ["Lambda.TooManyRequestsException"],
                        "IntervalSeconds": 1,
                        "MaxAttempts": 30,
                        "BackoffRate": 1.0,
                    }
                ],
            }
        },
    }
    machine = _machine(stack, definition)
    release, holding = tmp_path / "release", tmp_path / "holding"
    first = _start(stack, machine, {"hold_until_exists": str(release), "mark": str(holding)})
    wait_for(holding.exists, "the first execution holds the function's only environment", timeout_s=240)
    second = _start(stack, machine, {})

    def throttled() -> bool:
        return any(
            i.function == spec.logical_id and i.outcome == "throttled" for i in stack.lambdas.invocations
        )

    try:
        wait_for(throttled, "the second execution's invoke was throttled", timeout_s=240)
    finally:
        release.touch()
    described = _finished(stack, [first, second])
    assert [d["status"] for d in described] == ["SUCCEEDED", "SUCCEEDED"]
    outcomes = [i.outcome for i in stack.lambdas.invocations if i.function == spec.logical_id]
    assert outcomes.count("ok") == 2
