"""An execution stopped from outside (StopExecution, not the plugin's cancel) between Generate and Attach, on
the local stack: the local Step Functions reports its end as EventBridge would, End Stopped Runs ends the
run FAILED with a sentence, the image Generate paid for is recorded and offered, and running the task
again takes it without a second OpenAI request."""

from __future__ import annotations

import json

import pytest

from tests.conftest import wait_for
from tests.e2e.stopped_runs import assert_the_paid_image_is_recorded_then_reused
from tests.faults.harness import Case, Hang, Seams

pytestmark = pytest.mark.stack


def _running_execution(stack, session: str) -> str | None:
    sfn = stack.client("stepfunctions")
    listed = sfn.list_executions(stateMachineArn=stack.state_machine_arn, statusFilter="RUNNING")
    for execution in listed["executions"]:
        described = sfn.describe_execution(executionArn=execution["executionArn"])
        if json.loads(described["input"]).get("session") == session:
            return execution["executionArn"]
    return None


def _image_stored(stack, session: str, task_id: str) -> bool:
    from dalle_plugin.domain.run import RunRef

    s3 = stack.client("s3")
    bucket = stack.template.physical["ImagesBucket"]
    prefix = f"images/{RunRef(session=session, task_id=task_id).execution_name}"
    return bool(s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount"))


def test_a_run_stopped_between_generate_and_attach_ends_readable_and_its_image_is_reused(stack, api):
    stack.openai.reset()
    case = Case.new("stopped")
    case.seed(stack.hub)
    seams = Seams(stack.seams)
    session = case.new_session()
    # Attach is held as it is invoked: Generate has paid for the image, stored it and handed it on through
    # the state, and nothing has recorded it yet; the execution sits there until it is stopped
    held = ("AttachFunction", session)
    seams.before_handler[held] = Hang()
    try:
        assert api.run(case.payload(session)).status_code == 202
        wait_for(lambda: seams.before_handler.taken(held), "Attach invoked with the stored image", 300, 0.5)
        assert _image_stored(stack, session, case.task_id)
        execution = wait_for(lambda: _running_execution(stack, session), "the run's execution", 60, 0.5)
        sfn = stack.client("stepfunctions")
        sfn.stop_execution(executionArn=execution, cause="stopped by an operator")
        # ended there and then, as on AWS, though Attach's invoke is still in flight: its history too
        assert sfn.describe_execution(executionArn=execution)["status"] == "ABORTED"
        last = sfn.get_execution_history(executionArn=execution)["events"][-1]
        assert last["type"] == "ExecutionAborted"
        assert last["executionAbortedEventDetails"]["cause"] == "stopped by an operator"

        first = api.wait_finished(session, timeout_s=300, poll_s=0.5)["runs"][0]
    finally:  # not reached when the test failed early: it must not hold a later run's Attach
        stack.seams.disarm("before_handler")
    assert first["status"] == "FAILED" and first["failure"]["reason"] == "execution_stopped"
    assert "stopped from outside the plugin" in first["failure"]["message"]
    assert_the_paid_image_is_recorded_then_reused(stack, api, case, first)
