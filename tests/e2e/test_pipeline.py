"""The whole state machine on the local stack, for each prompt source, asserted on what the hub received."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from tests.conftest import wait_for

pytestmark = pytest.mark.stack


def _config(**fields) -> str:
    base = {"openai_api_key": "default", "model_name": "dall-e-2", "image_size": "512x512"}
    return json.dumps(base | fields)


def _stored_png(stack, url: str) -> Image.Image:
    body = next(f["body"] for f in stack.hub.stored_files() if f["url"] == url)
    return Image.open(io.BytesIO(body))


@pytest.mark.parametrize(
    ("task_id", "source", "expected_in_prompt"),
    [
        ("task-fox", "entity-annotation", "fox"),
        ("task-lighthouse", "text-annotation", "lighthouse"),
        ("task-market", "full-text-asset", "market"),
    ],
)
def test_each_prompt_source_ends_with_an_image_attached_to_the_asset(
    stack, api, sample_payload, openai_emulator, task_id, source, expected_in_prompt
):
    payload = sample_payload(task_id, configJSON=_config(get_prompt_from=source), workflow=True)
    answer = api.run(payload)
    assert answer.status_code == 202, answer.text
    assert answer.json()["session"] == payload["session"]

    view = api.wait_finished(payload["session"], timeout_s=300)
    run = view["runs"][0]
    assert run["status"] == "SUCCEEDED", run
    assert run["prompt"]["source"] == source
    assert expected_in_prompt in run["prompt"]["text"].lower()
    assert run["model"] == {
        "requested": "dall-e-2",
        "actual": "gpt-image-2",
        "substituted": True,
        "note": run["model"]["note"],
    }
    assert "retired" in run["model"]["note"]
    assert run["estimatedCostUsd"] > 0 and view["estimatedCostUsd"] == run["estimatedCostUsd"]
    assert run["timeline"][0]["step"] == "queued" and run["timeline"][-1]["step"] == "finished"
    assert all(step["durationMs"] is not None for step in run["timeline"])
    # the hub's recommended dall-e-2 size keeps working: the session says what ran instead
    assert run["size"] == "1024x1024" and any("512x512" in note for note in run["notes"])

    # OpenAI was asked once, with the prompt the session shows and the model that actually ran
    calls = [r for r in openai_emulator.requests if r.prompt == run["prompt"]["text"]]
    assert len(calls) == 1 and calls[0].model == "gpt-image-2" and calls[0].size == "1024x1024"

    # The hub got the PNG in its storage and attached it to the asset, as an IMAGE
    attached = [a for a in stack.hub.attachments() if a["value"] == run["image"]["hubUrl"]]
    assert len(attached) == 1 and attached[0]["type"] == "IMAGE"
    assert _stored_png(stack, run["image"]["hubUrl"]).size == (1024, 1024)

    # A workflow run moves the task on with its answer unchanged (read `tools` written as `objects`)
    before = stack.hub.task(task_id)["answer"]
    submitted = list(stack.hub.annotations(task_id))
    assert submitted, "the workflow task was not moved to the next stage"
    assert submitted[-1]["answer"]["objects"] == before["tools"]


def test_editor_run_reports_through_plugin_response(stack, api, sample_payload, openai_emulator):
    payload = sample_payload("task-lighthouse", configJSON=_config(get_prompt_from="text-annotation"))
    payload.pop("workflow", None)
    annotated_before = len(stack.hub.annotations("task-lighthouse"))
    assert api.run(payload).status_code == 202
    view = api.wait_finished(payload["session"], timeout_s=300)
    assert view["runs"][0]["status"] == "SUCCEEDED"
    responses = stack.hub.plugin_responses(payload["session"])
    assert len(responses) == 1 and not responses[0].get("error")
    # the editor keeps the user's annotations: the response carries the task's answer unchanged
    assert responses[0]["response"]["objects"] == stack.hub.task("task-lighthouse")["answer"]["tools"]
    assert len(stack.hub.annotations("task-lighthouse")) == annotated_before  # an editor run never submits
    logs = [line["msg"] for line in stack.hub.plugin_logs(payload["session"])]
    assert any("started" in m for m in logs) and any("attached" in m.lower() for m in logs)


def test_a_refused_prompt_fails_the_run_with_a_reason_and_tells_the_hub(
    stack, api, sample_payload, openai_emulator
):
    from local_stack.openai_emulator import Behaviour

    payload = sample_payload("task-lighthouse", configJSON=_config(get_prompt_from="text-annotation"))
    payload.pop("workflow", None)
    openai_emulator.enqueue(Behaviour(kind="moderation_blocked"))
    assert api.run(payload).status_code == 202
    run = api.wait_finished(payload["session"], timeout_s=300)["runs"][0]
    assert run["status"] == "FAILED"
    assert run["failure"]["reason"] == "moderation_blocked"
    assert "safety system" in run["failure"]["message"]
    # the run is FAILED before Record Failure tells the hub: wait for that
    told = wait_for(lambda: stack.hub.plugin_responses(payload["session"]), "the hub told of the failure")
    assert told[-1]["error"] is True
    assert any(line["level"] == "ERROR" for line in stack.hub.plugin_logs(payload["session"]))


@pytest.mark.parametrize(
    ("config", "status", "field", "words"),
    [
        ('{"image_size": "100x100", "model_name": "gpt-image-2"}', 400, "image_size", "multiples of 16"),
        ('{"modle_name": "dall-e-2"}', 400, "modle_name", "Did you mean 'model_name'"),
        ('{"get_prompt_from": "entity-annotation"}', 422, None, "map Prompt to the entity class"),
    ],
)
def test_bad_config_is_refused_with_a_sentence_and_told_to_the_hub(
    stack, api, sample_payload, config, status, field, words
):
    payload = sample_payload("task-fox", configJSON=config)
    payload.pop("workflow", None)
    if "entity-annotation" in config:
        payload["categorySchema"] = None  # nothing mapped to the plugin's Prompt class
    answer = api.run(payload)
    assert answer.status_code == status
    assert words in answer.json()["message"] and answer.json().get("field") == field
    assert api.session(payload["session"]) is None  # nothing started
    logs = stack.hub.plugin_logs(payload["session"])
    assert len(logs) == 1 and logs[0]["level"] == "ERROR" and words in logs[0]["msg"]
    assert stack.hub.plugin_responses(payload["session"])[-1]["error"] is True
