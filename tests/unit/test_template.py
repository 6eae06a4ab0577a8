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
    result = subprocess.run([str(CFN_LINT), str(PROJECT_ROOT / "template.yaml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_state_machine_retries_only_named_transient_errors():
    states = _definition()["States"]
    transient = {cls.__name__ for cls in [errors.Transient, *errors.Transient.__subclasses__()]}
    lambda_service = {"Lambda.ServiceException", "Lambda.AWSLambdaException", "Lambda.SdkClientException",
                      "Lambda.TooManyRequestsException"}
    for name, state in states.items():
        for retry in state.get("Retry", []):
            assert "States.ALL" not in retry["ErrorEquals"], name
            unknown = set(retry["ErrorEquals"]) - transient - lambda_service
            assert not unknown, f"{name} retries errors the code never raises: {unknown}"
            assert isinstance(retry["BackoffRate"], float)


def test_every_task_is_caught_into_record_failure():
    states = _definition()["States"]
    for name, state in states.items():
        if state["Type"] == "Task" and name != "Record Failure":
            assert state["Catch"] == [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.error", "Next": "Record Failure"}]


def test_the_rate_wait_uses_the_exact_timestamp_from_generate():
    states = _definition()["States"]
    wait = states["Wait For Rate Slot"]
    assert wait == {"Comment": wait["Comment"], "Type": "Wait", "TimestampPath": "$.generation.retryAt",
                    "Next": "Generate Image"}
    assert states["Image Ready?"]["Choices"][0]["Next"] == "Wait For Rate Slot"


def test_every_substitution_in_the_asl_is_defined_in_the_template():
    # definition() raises if a ${...} is left over after SAM's substitution
    assert _definition()["StartAt"] == "Extract Prompt"


@pytest.mark.parametrize("logical_id", ["ExtractFunction", "GenerateFunction", "AttachFunction",
                                        "RecordFailureFunction", "ApiFunction"])
def test_each_function_has_its_code_and_handler(logical_id):
    spec = LocalTemplate().functions()[logical_id]
    module, function = spec.handler.split(".")
    source = (spec.code_dir / f"{module}.py").read_text()
    assert f"def {function}(" in source


def test_openai_is_imported_only_by_the_function_that_generates():
    for folder in ("api", "extract", "attach", "record_failure"):
        assert "openai" not in (PROJECT_ROOT / "functions" / folder / "app.py").read_text()
    assert (PROJECT_ROOT / "functions" / "generate" / "requirements.txt").read_text().startswith("openai==")
