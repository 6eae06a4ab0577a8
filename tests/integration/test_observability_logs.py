"""A session's story in CloudWatch Logs, as the SessionStoryQuery reads it: the five functions' log groups
(moto, written by the local stack per invocation), every line with the run's ids, and the EMF metrics."""

from __future__ import annotations

import json
import time

import pytest
from dalle_plugin.domain.run import RunRef

from tests.conftest import PLUGIN_SECRET

pytestmark = pytest.mark.stack

SECRETS = (PLUGIN_SECRET, "ango-local-key", "sk-local-shared-default-key")


def _streams(stack, session: str) -> dict[str, list[tuple[str, list[dict]]]]:
    """Per function logical id, the invocations (log streams) that logged a line of ``session``."""
    logs = stack.client("logs")
    found: dict[str, list[tuple[str, list[dict]]]] = {}
    for lid, spec in stack.template.functions().items():
        group = f"/aws/lambda/{spec.physical_name}"
        try:
            events = logs.filter_log_events(logGroupName=group)["events"]
        except logs.exceptions.ResourceNotFoundException:
            continue
        # A stream is an execution environment's, holding its invocations one after the other: split it by
        # the request id Powertools puts on each line (an EMF line belongs to the invocation it follows).
        by_invocation: dict[tuple[str, str], list[dict]] = {}
        current: dict[str, str] = {}
        for event in events:
            if not event["message"].startswith("{"):  # Lambda's own lines ("Task timed out after ...")
                continue
            line, stream = json.loads(event["message"]), event["logStreamName"]
            request = line.get("function_request_id") or current.get(stream, "")
            current[stream] = request
            by_invocation.setdefault((stream, request), []).append(line)
        for (stream, _), lines in by_invocation.items():
            if any(line.get("session") == session for line in lines):
                found.setdefault(lid, []).append((stream, lines))
    return found


def _wait_for_lines(stack, session: str, last_function: str) -> dict[str, list[tuple[str, list[dict]]]]:
    # an invocation's lines are written when it returns, a moment after the session shows the end
    deadline = time.monotonic() + 120
    while True:
        streams = _streams(stack, session)
        if last_function in streams or time.monotonic() > deadline:
            return streams
        time.sleep(0.2)


def _metrics(streams: list[tuple[str, list[dict]]]) -> list[dict]:
    return [line for _, lines in streams for line in lines if "_aws" in line]


def test_a_sessions_story_reads_in_order_with_every_line_carrying_the_runs_ids(
    stack, api, sample_payload, openai_emulator
):
    payload = sample_payload("task-fox")
    assert api.run(payload).status_code == 202
    assert api.wait_finished(payload["session"], timeout_s=300)["runs"][0]["status"] == "SUCCEEDED"
    streams = _wait_for_lines(stack, payload["session"], "AttachFunction")

    execution = RunRef(session=payload["session"], task_id="task-fox").execution_name
    story = []
    for lid, invocations in streams.items():
        for _, lines in invocations:
            for line in lines:
                if "_aws" in line:
                    continue
                # every line of an invocation about this run carries its ids, whatever logged it
                assert (line.get("session"), line.get("task_id"), line.get("execution")) == (
                    payload["session"],
                    "task-fox",
                    execution,
                ), line
                story.append((line["timestamp"], lid, line["message"]))
    # what `filter session = ... | sort @timestamp asc` shows
    assert [(lid, message) for _, lid, message in sorted(story)] == [
        ("ApiFunction", "run requested"),
        ("ApiFunction", "runs accepted"),
        ("ExtractFunction", "prompt extracted"),
        ("GenerateFunction", "image generated"),
        ("AttachFunction", "run succeeded: image attached"),
    ]

    assert [m["RunsAccepted"] for m in _metrics(streams["ApiFunction"]) if "RunsAccepted" in m] == [[1.0]]
    (generated,) = [m for m in _metrics(streams["GenerateFunction"]) if "ImagesGenerated" in m]
    assert generated["ImagesGenerated"] == [1.0] and generated["GenerationLatency"][0] > 0
    assert generated["EstimatedCost"][0] > 0 and generated["RateSlotWaitTime"][0] >= 0
    assert generated["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "DallePlugin"
    assert [m["RunsSucceeded"] for m in _metrics(streams["AttachFunction"])] == [[1.0]]

    everything = json.dumps(streams)
    assert not [secret for secret in SECRETS if secret in everything]


def test_a_failed_run_logs_its_error_with_the_ids_and_counts_its_reason(
    stack, api, sample_payload, openai_emulator
):
    # the fox task has no text classification: asking for one ends in prompt_not_found
    config = {"openai_api_key": "default", "model_name": "gpt-image-2", "get_prompt_from": "text-annotation"}
    payload = sample_payload("task-fox", configJSON=json.dumps(config))
    assert api.run(payload).status_code == 202
    assert api.wait_finished(payload["session"], timeout_s=300)["runs"][0]["status"] == "FAILED"
    streams = _wait_for_lines(stack, payload["session"], "RecordFailureFunction")

    extract_lines = [line for _, lines in streams["ExtractFunction"] for line in lines]
    (warning,) = [line for line in extract_lines if line.get("level") == "WARNING"]
    assert warning["session"] == payload["session"] and warning["error"] == "PromptNotFound"
    assert warning["reason"] == "prompt_not_found" and "Prompt class" in warning["message"]

    failed = [m for m in _metrics(streams["RecordFailureFunction"]) if "RunsFailed" in m]
    dimension_sets = sorted(
        sorted(dims) for m in failed for dims in m["_aws"]["CloudWatchMetrics"][0]["Dimensions"]
    )
    assert dimension_sets == [["Reason", "service"], ["service"]]
    assert [m["Reason"] for m in failed if "Reason" in m] == ["prompt_not_found"]
    assert "GenerateFunction" not in streams
