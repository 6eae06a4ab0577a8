"""Every file in events/ (what `sam local invoke` uses) validates against its step contract."""

from __future__ import annotations

import json

from dalle_plugin.domain.payload import parse_payload
from dalle_plugin.domain.run import RunRef
from dalle_plugin.domain.step_io.attach import AttachInput
from dalle_plugin.domain.step_io.failure import FailureInput
from dalle_plugin.domain.step_io.generate import GenerateInput
from dalle_plugin.domain.steps.batch_start import BatchStep

from tests.conftest import load_event


def test_step_events_are_run_refs():
    for name in ("extract.json", "generate.json", "attach.json"):
        ref = RunRef.model_validate(load_event(name))
        assert ref.session and ref.task_id


def test_step_events_carry_what_the_step_before_hands_on():
    # so that `sam local invoke` with them takes the usual path (the state machine's Parameters build these)
    generate = GenerateInput.model_validate(load_event("generate.json"))
    assert generate.extracted is not None and generate.image_fingerprint
    attach = AttachInput.model_validate(load_event("attach.json"))
    assert attach.generation is not None and attach.generation.generated is not None
    assert attach.generation.image_key == attach.generation.generated.images[0].key


def test_batch_starter_event_is_a_first_call_of_the_starter():
    # what hand_off starts the starter execution with: so `sam local invoke` stores the runs and starts them
    step = BatchStep.model_validate(load_event("start_batch.json"))
    assert step.attempt == 1 and step.next_chunk == 0 and not step.done and step.error is None
    assert step.request.endswith(f"/{step.digest}.json") and step.own_key is False


def test_record_failure_event_carries_a_step_functions_error():
    failure = FailureInput.model_validate(load_event("record_failure.json"))
    assert failure.error.error == "HubUnavailable"
    assert json.loads(failure.error.cause)["errorType"] == "HubUnavailable"


def test_api_event_carries_a_valid_hub_payload():
    event = load_event("api_post_plugin.json")
    assert event["httpMethod"] == "POST" and event["resource"] == "/plugin"
    payload = parse_payload(event["body"])
    assert payload.prompt_class_ids == ["ent-prompt"] and payload.is_workflow_run


def test_authorizer_event_is_a_request_authorizer_event():
    from dalle_plugin.domain.auth import AuthorizerRequest

    request = AuthorizerRequest.model_validate(load_event("authorizer.json"))
    assert request.header("Secret") and request.method_arn.startswith("arn:aws:execute-api:")
