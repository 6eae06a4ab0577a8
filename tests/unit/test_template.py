"""template.yaml and the ASL file: lint-clean, and consistent with the code's error contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dalle_plugin.domain import errors

from local_stack.template import PROJECT_ROOT, LocalTemplate

CFN_LINT = Path(sys.executable).parent / "cfn-lint"


def _definition() -> dict:
    template = LocalTemplate()
    for lid in template.of_type("AWS::Serverless::Function"):
        template.arns[lid] = f"arn:aws:lambda:us-east-1:123456789012:function:{lid}"
    return json.loads(template.definition())


def test_cfn_lint_passes_on_the_template():
    result = subprocess.run(
        [str(CFN_LINT), str(PROJECT_ROOT / "template.yaml")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _task_states() -> dict:
    """The states each task of a request runs through (inside the Map)."""
    return _definition()["States"]["Run Each Task"]["ItemProcessor"]["States"]


def test_a_request_runs_its_tasks_in_a_bounded_map():
    run_each = _definition()["States"]["Run Each Task"]
    assert run_each["Type"] == "Map" and run_each["ItemsPath"] == "$.tasks"
    assert run_each["MaxConcurrency"] == 10
    assert run_each["ItemSelector"] == {
        "session.$": "$.session",
        "taskId.$": "$$.Map.Item.Value.taskId",
        "execution.$": "$$.Execution.Id",
    }


def test_the_state_machine_retries_only_named_transient_errors():
    states = _task_states()
    transient = {cls.__name__ for cls in [errors.Transient, *errors.Transient.__subclasses__()]}
    lambda_service = {
        "Lambda.ServiceException",
        "Lambda.AWSLambdaException",
        "Lambda.SdkClientException",
        "Lambda.TooManyRequestsException",
    }
    timed_out = {"Lambda.Unknown", "Sandbox.Timedout"}  # only where a step may safely run again
    for name, state in states.items():
        for retry in state.get("Retry", []):
            assert "States.ALL" not in retry["ErrorEquals"], name
            unknown = (
                set(retry["ErrorEquals"])
                - transient
                - lambda_service
                - (timed_out if not name.startswith("Generate Image") else set())
            )
            assert not unknown, f"{name} retries errors the code never raises: {unknown}"
            assert isinstance(retry["BackoffRate"], float)


def test_every_task_is_caught_into_record_failure():
    states = _task_states()
    for name, state in states.items():
        if state["Type"] == "Task" and name != "Record Failure":
            assert state["Catch"] == [
                {"ErrorEquals": ["NotRunOwner"], "ResultPath": None, "Next": "Not This Execution's Run"},
                {"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Record Failure"},
            ]
    # and a failure to record a failure still ends only that task, never the batch
    assert states["Record Failure"]["Catch"][0]["Next"] == "Task Failed"
    assert states["Task Failed"] == {
        "Type": "Pass",
        "Comment": states["Task Failed"]["Comment"],
        "OutputPath": None,
        "End": True,
    }


def test_every_iteration_ends_with_an_empty_output_and_executions_can_time_out():
    states = _task_states()
    ends = [name for name, state in states.items() if state["Type"] == "Succeed" or state.get("End")]
    assert all(states[name]["OutputPath"] is None for name in ends) and len(ends) == 3
    assert _definition()["TimeoutSeconds"] >= 36 * 3600  # docs/batches.md: the longest legitimate run


def test_the_rate_wait_uses_the_exact_timestamp_from_generate():
    states = _task_states()
    wait = states["Wait For Rate Slot"]
    assert wait == {
        "Comment": wait["Comment"],
        "Type": "Wait",
        "TimestampPath": "$.generation.retryAt",
        "Next": "Generate Image Again",
    }
    assert states["Image Ready?"]["Choices"][0]["Next"] == "Wait For Rate Slot"


def test_only_the_first_generate_gets_extracts_first_spend_line():
    # a Generate after a Wait, or retried, with the line would take its own spent attempt for a second
    # delivery's and wait for ever: only the state entered once per run carries it
    states = _task_states()
    first, again = states["Generate Image"], states["Generate Image Again"]
    assert first["Parameters"].pop("spendLine.$") == "$.extract.spendLine"
    # its retries read first: an error after its spend must not make the retry take itself for a duplicate
    assert first["Parameters"].pop("retryCount.$") == "$$.State.RetryCount"
    assert "spendLine.$" not in again["Parameters"]
    assert {k: v for k, v in again.items() if k != "Comment"} == {
        k: v for k, v in first.items() if k != "Comment"
    }
    assert states["Generate Image Again"]["Next"] == "Image Ready?"


def test_every_substitution_in_the_asl_is_defined_in_the_template():
    # definition() raises if a ${...} is left over after SAM's substitution
    assert _definition()["StartAt"] == "Run Each Task"
    assert _task_states()["Extract Prompt"]["Next"] == "Generate Image"


@pytest.mark.parametrize(
    "logical_id",
    ["ExtractFunction", "GenerateFunction", "AttachFunction", "RecordFailureFunction", "ApiFunction"],
)
def test_each_function_has_its_code_and_handler(logical_id):
    spec = LocalTemplate().functions()[logical_id]
    module, function = spec.handler.split(".")
    source = (spec.code_dir / f"{module}.py").read_text()
    assert f"def {function}(" in source


def test_openai_is_imported_only_by_the_function_that_generates():
    for folder in ("api", "extract", "attach", "record_failure"):
        assert "openai" not in (PROJECT_ROOT / "functions" / folder / "app.py").read_text()
    assert (PROJECT_ROOT / "functions" / "generate" / "requirements.txt").read_text().startswith("openai==")


def test_the_run_tallies_index_carries_what_the_summary_counts_and_the_api_may_read_it():
    """The index projects every record attribute a RunTally is made of (its keys aside), its sort key is an
    attribute only run records have and always as a string (a key of another type would refuse the run's
    write), and the API's role may query it."""
    from dalle_plugin.adapters.dynamo_runs import TALLY_ATTRIBUTES, TALLY_INDEX, DynamoRunStore
    from dalle_plugin.domain.run import RunRecord
    from dalle_plugin.domain.step_io.api import RunTally

    from tests.integration.dynamodb_tables import queued_run

    resources = LocalTemplate().resources
    table = resources["SessionsTable"]["Properties"]
    (index,) = table["GlobalSecondaryIndexes"]
    sort_key = index["KeySchema"][1]["AttributeName"]
    assert index["IndexName"] == TALLY_INDEX and sort_key == "createdAtMs"
    assert index["Projection"]["NonKeyAttributes"] == list(TALLY_ATTRIBUTES)
    counted = {
        RunRecord.model_fields[name].alias or name
        for name in RunTally.model_fields
        if name in RunRecord.model_fields
    }
    assert counted - {"taskId"} <= {*TALLY_ATTRIBUTES, sort_key}
    assert {"image", "moreImages"} <= set(TALLY_ATTRIBUTES)  # image_count is counted from them
    assert {"AttributeName": sort_key, "AttributeType": "S"} in table["AttributeDefinitions"]
    assert DynamoRunStore._to_item(queued_run("s", "t"))[sort_key].keys() == {"S"}
    statements = [
        statement
        for policy in resources["ApiFunction"]["Properties"]["Policies"]
        for statement in policy.get("Statement", [])
    ]
    resources_read = [json.dumps(statement["Resource"]) for statement in statements]
    assert any(f"/index/{TALLY_INDEX}" in resource for resource in resources_read)
