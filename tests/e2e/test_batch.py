"""Batch runs: one request naming many tasks is one session through the Map state; one task's failure
does not fail the others; a re-run of the same batch does only what failed."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.stack

CONFIG = json.dumps(
    {
        "openai_api_key": "default",
        "model_name": "gpt-image-2",
        "get_prompt_from": "full-text-asset",
        "image_size": "1024x1024",
    }
)


def _batch(stack, session: str) -> dict:
    return {
        "projectId": "proj-dalle-demo",
        "session": session,
        "apiKey": "ango-local-key",
        "workflow": True,
        "configJSON": CONFIG,
        "tasks": [
            {"taskId": "task-fox", "assetId": "asset-fox"},
            {"taskId": "task-lighthouse", "assetId": "asset-lighthouse"},
            {"taskId": "task-market", "assetId": "asset-market"},
        ],
    }


def test_a_batch_is_one_session_and_a_rerun_does_only_what_failed(stack, api, new_session, openai_emulator):
    from local_stack.openai_emulator import Behaviour

    openai_emulator.rule("lighthouse", Behaviour(kind="moderation_blocked"))
    session = new_session("batch")
    answer = api.run(_batch(stack, session))
    assert answer.status_code == 202, answer.text
    assert [t["taskId"] for t in answer.json()["tasks"]] == ["task-fox", "task-lighthouse", "task-market"]

    view = api.wait_finished(session, timeout_s=300)
    by_task = {run["taskId"]: run for run in view["runs"]}
    assert view["progress"] == {
        "total": 3,
        "done": 2,
        "failed": 1,
        "cancelled": 0,
        "waiting": 0,
        "running": 0,
    }
    assert by_task["task-lighthouse"]["failure"]["reason"] == "moderation_blocked"
    assert by_task["task-fox"]["status"] == by_task["task-market"]["status"] == "SUCCEEDED"
    requests_before = len(openai_emulator.requests)

    # The same batch again, once the prompt is acceptable: only the failed task runs (and pays) again.
    openai_emulator.reset()
    again = api.run(_batch(stack, session))
    assert again.status_code == 202 and again.json()["duplicate"] is False
    view = api.wait_finished(session, timeout_s=300)
    assert view["progress"]["done"] == 3
    assert [r.prompt for r in openai_emulator.requests] == [by_task["task-lighthouse"]["prompt"]["text"]]
    assert requests_before == 3

    # And once everything is done, the same request starts nothing.
    third = api.run(_batch(stack, session))
    assert third.json()["duplicate"] is True and third.json()["status"] == "ALREADY_STARTED"


def test_a_batch_request_sent_twice_at_once_starts_each_task_once(stack, api, new_session, openai_emulator):
    import threading

    session = new_session("batch-dup")
    answers = []
    senders = [
        threading.Thread(target=lambda: answers.append(api.run(_batch(stack, session)))) for _ in range(4)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert sorted(a.status_code for a in answers) == [202] * 4
    assert {a.json()["session"] for a in answers} == {session}
    view = api.wait_finished(session, timeout_s=300)
    assert view["progress"]["done"] == 3
    assert len(openai_emulator.requests) == 3  # one image per task, however often the hub asked
