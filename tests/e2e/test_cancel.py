"""POST /sessions/{id}/cancel stops a run that has not generated yet and tells the hub; a run whose image
is already paid for is left to deliver it."""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.conftest import PLUGIN_SECRET

pytestmark = pytest.mark.stack


def _cancel(api, session: str, body: dict | None = None) -> requests.Response:
    return requests.post(
        f"{api.base_url}/sessions/{session}/cancel",
        headers={"Secret": PLUGIN_SECRET},
        data=json.dumps(body) if body else None,
        timeout=30,
    )


def _wait_for_status(api, session: str, status: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = api.session(session)
        if view and view["runs"][0]["status"] == status:
            return view
        time.sleep(0.1)
    raise AssertionError(f"{session} never reached {status}: {api.session(session)}")


def test_cancel_stops_a_waiting_run_and_tells_the_hub(stack, api, sample_payload, openai_emulator):
    from local_stack.openai_emulator import Behaviour

    # OpenAI says "rate limited, come back in 30 s": the run waits in the state machine.
    openai_emulator.enqueue(Behaviour(kind="rate_limited", retry_after_s=30))
    payload = sample_payload("task-lighthouse")
    payload.pop("workflow", None)
    assert api.run(payload).status_code == 202
    _wait_for_status(api, payload["session"], "WAITING_FOR_SLOT")

    answer = _cancel(api, payload["session"])
    assert answer.status_code == 200, answer.text
    assert answer.json()["tasks"] == [
        {"task_id": "task-lighthouse", "cancelled": True, "status": "CANCELLED", "why": None}
    ]
    run = api.session(payload["session"])["runs"][0]
    assert run["status"] == "CANCELLED" and run["timeline"][-1]["step"] == "cancelled"

    # the hub hears it, the execution is stopped at once (not after the 30 s wait), nothing more is paid
    assert stack.hub.plugin_responses(payload["session"])[-1]["error"] is True
    assert any("cancelled" in line["msg"].lower() for line in stack.hub.plugin_logs(payload["session"]))
    sfn = stack.client("stepfunctions")
    arn = [
        e
        for e in sfn.list_executions(stateMachineArn=stack.state_machine_arn)["executions"]
        if e["name"].startswith(payload["session"][:40].replace(".", "-"))
    ]
    # stopped, not left sleeping out its Wait (AWS says ABORTED; moto 5.2.5 reports a Map stopped
    # mid-iteration as FAILED)
    assert arn and sfn.describe_execution(executionArn=arn[0]["executionArn"])["status"] in (
        "ABORTED",
        "FAILED",
    )
    assert len(openai_emulator.requests) == 1


def test_a_run_that_already_has_its_image_is_not_cancelled(stack, api, sample_payload, openai_emulator):
    payload = sample_payload("task-fox")
    assert api.run(payload).status_code == 202
    api.wait_finished(payload["session"], timeout_s=300)
    answer = _cancel(api, payload["session"])
    assert answer.status_code == 409
    assert "already ended" in answer.json()["tasks"][0]["why"]
    assert api.session(payload["session"])["runs"][0]["status"] == "SUCCEEDED"


def test_cancel_needs_the_secret_and_a_known_session(stack, api):
    assert requests.post(f"{api.base_url}/sessions/nope/cancel", timeout=10).status_code == 401
    assert _cancel(api, "no-such-session").status_code == 404
