"""The Config JSON options beyond the seed, end to end on the local stack: a prompt template, several
images from one request in JPEG, and a session's spending limit stopping the run that would pass it."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

pytestmark = pytest.mark.stack


def test_two_jpeg_candidates_from_one_request_through_a_template_are_both_attached_in_order(
    stack, api, sample_payload, openai_emulator
):
    payload = sample_payload("task-lighthouse", workflow=True)
    marker = payload["session"]
    payload["configJSON"] = json.dumps(
        {
            "model_name": "gpt-image-2",
            "get_prompt_from": "text-annotation",
            "prompt_template": f"Studio photo of {{prompt}}, soft light {{{{{marker}}}}}",
            "images_per_task": 2,
            "output_format": "jpeg",
            "output_compression": 80,
        }
    )
    assert api.run(payload).status_code == 202
    view = api.wait_finished(payload["session"], timeout_s=300)
    run = view["runs"][0]
    assert run["status"] == "SUCCEEDED", run

    # the template framed the extracted text, literal braces kept
    prompt = run["prompt"]
    assert prompt["text"].startswith("Studio photo of ") and prompt["text"].endswith(
        f"soft light {{{marker}}}"
    )
    assert "lighthouse" in prompt["text"].lower() and prompt["template"] is not None
    assert run["output"] == {
        "imagesPerTask": 2,
        "format": "jpeg",
        "compression": 80,
        "background": None,
        "promptTemplate": prompt["template"],
    }

    # ONE request to OpenAI, asking for both images in JPEG
    calls = [r for r in openai_emulator.requests if r.is_generation and r.prompt and marker in r.prompt]
    assert len(calls) == 1
    assert (calls[0].n, calls[0].output_format, calls[0].output_compression) == (2, "jpeg", 80)

    # both listed, both counted, both attached in order as .jpg files the hub stores as JPEG
    images = run["images"]
    assert len(images) == 2 and all(i["attached"] and i["format"] == "jpeg" for i in images)
    assert run["image"] == images[0] and images[0]["sha256"] != images[1]["sha256"]
    single = run["estimatedCostUsd"] / 2
    assert single > 0 and view["estimatedCostUsd"] == run["estimatedCostUsd"]
    urls = [i["hubUrl"] for i in images]
    attached = [a["value"] for a in stack.hub.attachments() if a["value"] in urls]
    assert attached == urls and all(url.endswith(".jpg") for url in urls)
    stored = {f["url"]: f for f in stack.hub.stored_files() if f["url"] in urls}
    for url in urls:
        assert stored[url]["content_type"] == "image/jpeg"
        assert Image.open(io.BytesIO(stored[url]["body"])).format == "JPEG"
    logs = [line["msg"] for line in stack.hub.plugin_logs(payload["session"])]
    assert any("2 images attached" in m for m in logs)


def test_the_spending_limit_stops_the_run_that_would_pass_it(stack, api, new_session, openai_emulator):
    session = new_session("budget")
    # gpt-image-2 at 1024x1024 costs about $0.053 an image: $0.12 pays for two of the three tasks
    config = {
        "model_name": "gpt-image-2",
        "get_prompt_from": "full-text-asset",
        "image_size": "1024x1024",
        "prompt_template": f"{{prompt}} ({session})",
        "max_cost_usd": 0.12,
    }
    payload = {
        "projectId": "proj-dalle-demo",
        "session": session,
        "apiKey": "ango-local-key",
        "workflow": True,
        "configJSON": json.dumps(config),
        "tasks": [
            {"taskId": "task-fox", "assetId": "asset-fox"},
            {"taskId": "task-lighthouse", "assetId": "asset-lighthouse"},
            {"taskId": "task-market", "assetId": "asset-market"},
        ],
    }
    assert api.run(payload).status_code == 202
    view = api.wait_finished(session, timeout_s=300)
    outcomes = [(run["taskId"], run["status"], run.get("failure")) for run in view["runs"]]
    assert view["progress"]["done"] == 2 and view["progress"]["failed"] == 1, outcomes
    assert view["maxCostUsd"] == 0.12 and view["estimatedCostUsd"] <= 0.12
    (stopped,) = [run for run in view["runs"] if run["status"] == "FAILED"]
    assert stopped["failure"]["reason"] == "spending_limit_reached"
    message = stopped["failure"]["message"]
    assert (
        "spending limit (max_cost_usd) is $0.12" in message
        and "already spent or reserved about $0.106" in message
    )
    assert "image" not in stopped and stopped["estimatedCostUsd"] == 0.0
    # the stopped run was never sent: OpenAI saw two requests from this session
    assert (
        len([r for r in openai_emulator.requests if r.is_generation and r.prompt and session in r.prompt])
        == 2
    )
