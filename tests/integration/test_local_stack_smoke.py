"""The local stack's two patches of moto internals still take effect (moto is pinned; if an upgrade
changes them, these fail loudly instead of the pipeline tests failing obscurely)."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.stack


def test_a_lambda_invoked_through_moto_runs_the_real_handler_and_fails_by_exception_name(stack):
    lambda_ = stack.client("lambda")
    name = stack.template.functions()["ExtractFunction"].physical_name
    answer = lambda_.invoke(FunctionName=name, Payload=json.dumps({"session": "no-such", "taskId": "none"}))
    # moto alone would echo the input back with no error; the real handler finds no such run
    assert answer.get("FunctionError") == "Unhandled"
    error = json.loads(answer["Payload"].read())
    assert error["errorType"] == "PluginError" and "No run for session 'no-such'" in error["errorMessage"]


def test_a_wait_on_a_timestamp_never_wakes_early(stack):
    sfn = stack.client("stepfunctions")
    definition = {
        "StartAt": "Wait",
        "States": {"Wait": {"Type": "Wait", "TimestampPath": "$.at", "End": True}},
    }
    machine = sfn.create_state_machine(
        name="smoke-wait",
        definition=json.dumps(definition),
        roleArn="arn:aws:iam::123456789012:role/dalle-test-execution",
    )
    target = int(time.time()) + 2  # a whole second, as the plugin's Wait timestamps are
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(target))
    arn = sfn.start_execution(
        stateMachineArn=machine["stateMachineArn"], name="smoke-wait-1", input=json.dumps({"at": at})
    )["executionArn"]
    while sfn.describe_execution(executionArn=arn)["status"] == "RUNNING":
        time.sleep(0.05)
    ended = sfn.describe_execution(executionArn=arn)["stopDate"].timestamp()
    assert ended >= target  # moto alone truncates to whole seconds against a naive clock: up to 1 s early
