"""A 90-task batch through the batch starter on a stack of its own, with chunks of 10 tasks
(``TASKS_PER_EXECUTION``): the POST hands the batch on (duplicate and concurrent POSTs start the starter
once), the session shows it being stored, and then every chunk is one execution, at most
``OwnKeyExecutionsInFlight`` of them running at once, every task one paid OpenAI request and one attachment,
every run SUCCEEDED (docs/batches.md)."""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from collections import Counter

import pytest
import requests
from dalle_plugin.domain.steps.start import session_prefix

from tests.conftest import PLUGIN_SECRET, start_stack, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.own_stack, pytest.mark.slow]

PROJECT = "proj-batch-starter"
CHUNK = 10
TASKS = 90  # 9 chunks
IN_FLIGHT = 3  # run executions of the session at once: the 9 chunks start in at least three rounds
FINISHED = {"SUCCEEDED", "FAILED", "CANCELLED"}


@pytest.fixture(scope="module")
def starter_stack():
    with start_stack(
        "dalle-batchstarter",
        environment={"TASKS_PER_EXECUTION": str(CHUNK)},
        parameters={"OwnKeyExecutionsInFlight": str(IN_FLIGHT)},
    ) as running:
        running.hub.add_project(PROJECT, {})
        yield running


def _post(stack, payload: dict) -> requests.Response:
    return requests.post(
        f"{stack.api_url}/plugin", json=payload, headers={"Secret": PLUGIN_SECRET}, timeout=60
    )


#: how long each session GET took (printed at the end: what a person polling the session would wait)
GET_SECONDS: list[float] = []


def _first_page(stack, session: str) -> dict | None:
    """The session's first page, or None while the engine, busy with 9 executions, cannot answer yet."""
    began = time.monotonic()
    try:
        answer = requests.get(
            f"{stack.api_url}/sessions/{session}", headers={"Secret": PLUGIN_SECRET}, timeout=60
        )
    except requests.exceptions.RequestException:
        return None
    finally:
        GET_SECONDS.append(time.monotonic() - began)
    return answer.json() if answer.status_code == 200 else None


def _failures(stack, session: str) -> list[dict]:
    """Every run of the session that did not succeed, with the reason and sentence it ended with."""
    answer = requests.get(
        f"{stack.api_url}/sessions/{session}",
        params={"limit": 1000},
        headers={"Secret": PLUGIN_SECRET},
        timeout=60,
    )
    return [
        {"taskId": run.get("taskId"), "status": run.get("status"), "failure": run.get("failure")}
        for run in answer.json().get("runs", [])
        if run.get("status") != "SUCCEEDED"
    ]


def _executions(stack, arn: str, session: str) -> list[dict]:
    pages = stack.client("stepfunctions").get_paginator("list_executions").paginate(stateMachineArn=arn)
    return [e for page in pages for e in page["executions"] if e["name"].startswith(session_prefix(session))]


def most_at_once(executions: list[dict]) -> int:
    """The most executions running at one moment, from their start and stop dates (a stop at the moment of
    another's start is not an overlap: the starter saw the first one end before starting the next). One still
    running has no stop date: it runs on."""
    never = dt.datetime.max.replace(tzinfo=dt.UTC)
    edges = sorted(
        [(e["startDate"], 1) for e in executions] + [(e.get("stopDate", never), -1) for e in executions],
        key=lambda edge: (edge[0], edge[1]),
    )
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


@pytest.mark.timeout(3000)
def test_a_multi_chunk_batch_runs_through_the_starter_once_per_chunk_and_once_per_task(starter_stack):
    stack, marker, session = starter_stack, "starter90", "starter90-s"
    tasks = []
    for n in range(TASKS):
        task_id, asset_id = f"task-{marker}-{n:03d}", f"asset-{marker}-{n:03d}"
        text = f"A windmill at dusk, painted in oils ({marker} {n:03d})"
        stack.hub.add_asset(PROJECT, asset_id, f"{marker}-{n:03d}.txt", f"{asset_id}.txt", text.encode())
        stack.hub.add_task(PROJECT, task_id, asset_id)
        tasks.append({"taskId": task_id, "assetId": asset_id})
    config = {
        "openai_api_key": "sk-own-starter",
        "model_name": "gpt-image-2",
        "get_prompt_from": "full-text-asset",
    }
    payload = {
        "projectId": PROJECT,
        "session": session,
        "apiKey": "ango-local-key",
        "workflow": True,
        "configJSON": json.dumps(config),
        "tasks": tasks,
    }

    answers: list[requests.Response] = []
    senders = [threading.Thread(target=lambda: answers.append(_post(stack, payload))) for _ in range(3)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert [a.status_code for a in answers] == [202] * 3, [a.text[:300] for a in answers]
    assert all(a.json()["storing"] == TASKS for a in answers)
    assert sum(not a.json()["duplicate"] for a in answers) == 1  # one began the attempt, the others joined it

    def finished() -> dict | None:
        view = _first_page(stack, session)
        done = view and "storing" not in view and view["progress"]["total"] == TASKS
        return view if done and view["status"] in FINISHED else None

    view = wait_for(finished, f"the {TASKS}-task batch finished", timeout_s=2700, poll_s=2.0)
    ordered = sorted(GET_SECONDS)
    print(
        f"\nsession GETs: {len(ordered)}, median {ordered[len(ordered) // 2]:.1f} s, slowest {ordered[-1]:.1f} s"
    )
    assert view["counts"] == {"SUCCEEDED": TASKS}, (view["counts"], _failures(stack, session))
    late = _post(stack, payload)  # a duplicate after the end: nothing to run again, nothing started
    assert late.status_code == 202 and late.json()["duplicate"] and "storing" not in late.json(), late.text
    assert {t["status"] for t in late.json()["tasks"]} == {"SUCCEEDED"}

    starters = _executions(stack, stack.start_batch_state_machine_arn, session)
    assert len(starters) == 1, starters  # the attempt the three POSTs shared
    runs = _executions(stack, stack.state_machine_arn, session)
    assert len(runs) == TASKS // CHUNK and {e["status"] for e in runs} == {"SUCCEEDED"}
    assert most_at_once(runs) == IN_FLIGHT  # the cap, reached and never passed
    history = stack.client("stepfunctions").get_execution_history(
        executionArn=starters[0]["executionArn"], maxResults=1000
    )["events"]
    waits = [e for e in history if e.get("stateEnteredEventDetails", {}).get("name") == "Wait For Room"]
    assert len(waits) >= 3, len(waits)  # the starter waited for room between its rounds
    paid = Counter(
        int(re.search(rf"{marker} (\d+)", r.prompt).group(1))
        for r in stack.openai.requests
        if r.prompt and marker in r.prompt and r.status == 200
    )
    assert paid == Counter(range(TASKS))  # one paid request per task
    attached = Counter(a["externalId"] for a in stack.hub.attachments() if a["externalId"].startswith(marker))
    assert len(attached) == TASKS and set(attached.values()) == {1}
