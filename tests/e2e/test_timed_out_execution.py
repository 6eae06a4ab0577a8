"""A run's execution timed out as a whole (its TimeoutSeconds) while Generate is held after it paid for and
stored the image, on a stack of its own deployed with a small ``ExecutionTimeoutSeconds``: the local Step
Functions ends the execution TIMED_OUT at its deadline though Generate's invoke is still in flight, and
reports it as EventBridge would; End Stopped Runs ends the run FAILED with its sentence and tells the hub;
the image Generate paid for is recorded and offered, and running the task again takes it without a second
OpenAI request."""

from __future__ import annotations

import pytest

from tests.conftest import PLUGIN_SECRET, start_stack, wait_for
from tests.e2e.stopped_runs import assert_the_paid_image_is_recorded_then_reused
from tests.faults.harness import Case, Hang, Seams

pytestmark = [pytest.mark.stack, pytest.mark.own_stack]

# Room for the API's, Extract's and Generate's cold starts on a loaded machine before Generate stores the
# image; Generate is then held far longer (its Timeout is 300 s), so the execution's deadline strikes there.
EXECUTION_TIMEOUT_S = 60
TIMED_OUT_SENTENCE = "took longer than the plugin allows a run to take"


@pytest.fixture(scope="module")
def timeout_stack():
    # a parameter the local stack takes as given: a deployment needs at least 3600 (MinValue)
    with start_stack(
        "dalle-timeout", parameters={"ExecutionTimeoutSeconds": str(EXECUTION_TIMEOUT_S)}
    ) as running:
        running.hub.load_samples()  # the project the case's task lives in
        yield running


def _execution_of(stack, session: str) -> str | None:
    sfn = stack.client("stepfunctions")
    listed = sfn.list_executions(stateMachineArn=stack.state_machine_arn)["executions"]
    found = [e["executionArn"] for e in listed if e["name"].startswith(f"{session}_")]
    return found[0] if found else None


def test_a_run_whose_execution_times_out_while_generate_is_held_ends_readable_and_its_image_is_reused(
    timeout_stack,
):
    from dalle_plugin.domain.run import RunRef

    from local_stack.runner import PluginApi

    stack = timeout_stack
    api = PluginApi(stack.api_url, PLUGIN_SECRET)
    case = Case.new("timedout")
    case.seed(stack.hub)
    seams = Seams(stack.seams)
    session = case.new_session()
    # Generate hangs right after storing the image it paid for, before anything records it: the execution
    # sits in Generate until its TimeoutSeconds ends it
    held = RunRef(session=session, task_id=case.task_id).execution_name
    seams.after_put_png[held] = Hang()
    try:
        assert api.run(case.payload(session)).status_code == 202
        wait_for(
            lambda: seams.after_put_png.taken(held), "Generate stored the image", EXECUTION_TIMEOUT_S, 0.5
        )
        execution = wait_for(lambda: _execution_of(stack, session), "the run's execution", 60, 0.5)
        first = api.wait_finished(session, timeout_s=300, poll_s=0.5)["runs"][0]
    finally:  # not reached when the test failed early: it must not hold a later run's Generate
        stack.seams.disarm("after_put_png")
    described = stack.client("stepfunctions").describe_execution(executionArn=execution)
    assert described["status"] == "TIMED_OUT" and described["error"] == "States.Timeout"
    took = (described["stopDate"] - described["startDate"]).total_seconds()
    assert took < 300  # ended at its deadline, not when Generate's Timeout gave up its invoke

    assert first["status"] == "FAILED" and first["failure"]["reason"] == "execution_timed_out"
    assert TIMED_OUT_SENTENCE in first["failure"]["message"]
    assert "Run the plugin again" in first["failure"]["message"]
    told = [line for line in stack.hub.plugin_logs(session) if line.get("level") == "ERROR"]
    assert any(TIMED_OUT_SENTENCE in line["msg"] for line in told)  # the hub was told why
    assert_the_paid_image_is_recorded_then_reused(stack, api, case, first)
