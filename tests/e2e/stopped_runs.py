"""What every execution ended from outside the plugin (stopped, timed out) must leave behind: the image it
paid for recorded on the run, and a re-run in a new hub session that reuses it instead of paying again."""

from __future__ import annotations

from typing import Any

from tests.faults.harness import Case


def openai_requests(stack: Any, case: Case) -> int:
    return sum(1 for r in stack.openai.requests if r.is_generation and r.prompt and case.marker in r.prompt)


def assert_the_paid_image_is_recorded_then_reused(stack: Any, api: Any, case: Case, ended: dict) -> None:
    paid = ended["image"]  # recorded: the session shows the image paid for, never attached
    assert paid["sha256"] and paid["attached"] is False
    assert openai_requests(stack, case) == 1

    second = case.new_session()  # a person runs the plugin again: a new hub session
    assert api.run(case.payload(second)).status_code == 202
    rerun = api.wait_finished(second, timeout_s=300, poll_s=0.5)["runs"][0]
    assert rerun["status"] == "SUCCEEDED"
    assert rerun["image"]["sha256"] == paid["sha256"] and openai_requests(stack, case) == 1  # reused
    assert len(stack.hub.attachments(case.external_id)) == 1
    delivered = [d for d in stack.event_deliveries if d[0] == "EndStoppedRunsFunction"]
    assert delivered and not any(failed for _, _, failed in delivered)
