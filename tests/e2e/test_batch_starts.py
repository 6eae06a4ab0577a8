"""A batch of several executions started exactly once through the API of a stack of its own, with chunks of
5 tasks (``TASKS_PER_EXECUTION``) so a 12-task batch is three executions: duplicate and concurrent POSTs, an
API Lambda that dies between starting one chunk and the next and the hub's resend, and a task cancelled
mid-batch then the batch sent again. Each chunk is one execution, each task one paid OpenAI request and
one attachment."""

from __future__ import annotations

import json
import re
import secrets
import threading
from collections import Counter

import pytest
import requests

from tests.conftest import PLUGIN_SECRET, start_stack, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.own_stack, pytest.mark.slow]

PROJECT = "proj-batch-starts"
CHUNK = 5
TASKS = 12  # chunks of 5, 5 and 2
FINISHED = {"SUCCEEDED", "FAILED", "CANCELLED"}


@pytest.fixture(scope="module")
def chunk_stack():
    with start_stack("dalle-batchstarts", environment={"TASKS_PER_EXECUTION": str(CHUNK)}) as running:
        running.hub.add_project(PROJECT, {})
        yield running


class Batch:
    """A batch of its own: tasks whose asset texts (the prompts) carry the batch's marker and their number."""

    def __init__(self, stack, name: str) -> None:
        self.stack = stack
        self.marker = f"{name}{secrets.token_hex(4)}"
        self.session = f"{self.marker}-s"
        self.tasks = []
        for n in range(TASKS):
            task_id, asset_id = f"task-{self.marker}-{n:02d}", f"asset-{self.marker}-{n:02d}"
            text = f"A lighthouse in a storm, painted in oils ({self.marker} {n:02d})"
            stack.hub.add_asset(
                PROJECT, asset_id, f"{self.marker}-{n:02d}.txt", f"{asset_id}.txt", text.encode()
            )
            stack.hub.add_task(PROJECT, task_id, asset_id)
            self.tasks.append({"taskId": task_id, "assetId": asset_id})

    def payload(self) -> dict:
        config = {
            "openai_api_key": f"sk-own-{self.marker}",
            "model_name": "gpt-image-2",
            "get_prompt_from": "full-text-asset",
            "image_size": "1024x1024",
        }
        return {
            "projectId": PROJECT,
            "session": self.session,
            "apiKey": "ango-local-key",
            "workflow": True,
            "configJSON": json.dumps(config),
            "tasks": self.tasks,
        }

    def send(self) -> requests.Response:
        return requests.post(
            f"{self.stack.api_url}/plugin", json=self.payload(), headers={"Secret": PLUGIN_SECRET}, timeout=60
        )

    def send_until_accepted(self, attempts: int = 5) -> list[int]:
        """As the hub does: the request again while the API fails (on a loaded machine an API Lambda may
        time out); the statuses it got, the last 202."""
        statuses = []
        for _ in range(attempts):
            statuses.append(self.send().status_code)
            if statuses[-1] == 202:
                return statuses
        raise AssertionError(f"the API never accepted {self.session}: {statuses}")

    def view(self) -> dict | None:
        answer = requests.get(
            f"{self.stack.api_url}/sessions/{self.session}", headers={"Secret": PLUGIN_SECRET}, timeout=60
        )
        return answer.json() if answer.status_code == 200 else None

    def finished(self) -> dict:
        def done() -> dict | None:
            view = self.view()
            # a resend's runs are requeued by the starter after its answer: done only once it is stored
            runs = view["runs"] if view and "storing" not in view else []
            return view if len(runs) == TASKS and all(r["status"] in FINISHED for r in runs) else None

        return wait_for(done, f"the batch {self.session} finished", timeout_s=1200, poll_s=1.0)

    def executions(self) -> list[str]:
        prefix = re.sub(r"[^A-Za-z0-9_-]", "-", self.session[:40]) + "_"
        sfn = self.stack.client("stepfunctions")
        pages = sfn.get_paginator("list_executions").paginate(stateMachineArn=self.stack.state_machine_arn)
        return [e["name"] for page in pages for e in page["executions"] if e["name"].startswith(prefix)]

    def paid_requests(self) -> Counter:
        """Answered (paid) OpenAI requests per task number."""
        return Counter(
            int(re.search(rf"{self.marker} (\d\d)", r.prompt).group(1))
            for r in self.stack.openai.requests
            if r.prompt and self.marker in r.prompt and r.status == 200
        )

    def attachments(self) -> Counter:
        return Counter(
            a["externalId"] for a in self.stack.hub.attachments() if a["externalId"].startswith(self.marker)
        )

    def assert_each_task_once(self, executions: int = 3) -> None:
        view = self.finished()
        assert Counter(r["status"] for r in view["runs"]) == Counter({"SUCCEEDED": TASKS}), view
        assert self.paid_requests() == Counter(range(TASKS))  # one paid request per task
        assert set(self.attachments().values()) == {1} and len(self.attachments()) == TASKS
        assert len(self.executions()) == executions, self.executions()


def test_duplicate_and_concurrent_posts_start_each_chunk_once(chunk_stack):
    batch = Batch(chunk_stack, "dup")
    answers: list[list[int]] = []
    senders = [threading.Thread(target=lambda: answers.append(batch.send_until_accepted())) for _ in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert len(answers) == 4, answers  # each accepted, at once or when sent again
    assert batch.send().status_code == 202  # and once more, later
    batch.assert_each_task_once()


def test_an_api_killed_between_chunks_is_completed_by_the_hubs_resend(chunk_stack):
    from tests.faults.harness import Seams, crash

    batch = Batch(chunk_stack, "kill")
    Seams(chunk_stack.seams).before_start[batch.session] = crash()  # the first StartExecution dies
    first = batch.send()
    assert first.status_code == 502, first.text  # the hub sees the API fail...
    assert len(batch.executions()) < 3
    batch.send_until_accepted()  # ...and sends the request again
    batch.assert_each_task_once()


def test_a_task_cancelled_mid_batch_then_the_batch_sent_again_runs_once_more_and_is_paid_once(chunk_stack):
    from local_stack.openai_emulator import Behaviour

    batch = Batch(chunk_stack, "cancel")
    held = batch.tasks[7]  # in the second chunk
    # OpenAI asks that task to come back in a minute: it waits, unpaid, when the cancel comes
    chunk_stack.openai.rule(f"{batch.marker} 07", Behaviour(kind="rate_limited", retry_after_s=60), times=1)
    batch.send_until_accepted()

    def waiting() -> bool:
        view = batch.view()
        return bool(view) and any(
            r["taskId"] == held["taskId"] and r["status"] == "WAITING_FOR_SLOT" for r in view["runs"]
        )

    wait_for(waiting, "the held task waits for OpenAI", timeout_s=600, poll_s=1.0)
    cancelled = requests.post(
        f"{chunk_stack.api_url}/sessions/{batch.session}/cancel",
        json={"taskId": held["taskId"]},
        headers={"Secret": PLUGIN_SECRET},
        timeout=60,
    )
    assert cancelled.status_code == 200, cancelled.text
    view = batch.finished()
    assert [r["status"] for r in view["runs"] if r["taskId"] == held["taskId"]] == ["CANCELLED"]

    # the hub runs the batch again: only the cancelled task runs, in an execution of its own
    batch.send_until_accepted()
    batch.assert_each_task_once(executions=4)


def test_a_starter_that_fails_says_so_in_the_session_and_the_hubs_resend_runs_the_rest_once(chunk_stack):
    from tests.faults.harness import Seams, crash

    batch = Batch(chunk_stack, "fail")
    # the starter's process dies as it starts a chunk's execution: not retried (it may have done work), caught
    Seams(chunk_stack.seams).before_run_start[batch.session] = crash()
    assert batch.send().status_code == 202

    def stopped() -> dict | None:
        view = batch.view()
        return view if view and view.get("storingStopped") else None

    view = wait_for(stopped, "the failed starter recorded", timeout_s=600, poll_s=1.0)
    (sentence,) = view["storingStopped"]
    assert sentence.startswith("The batch stopped being stored after 0 of its 12 tasks"), sentence
    assert "storing" not in view  # not under way: a resend begins a new attempt
    batch.send_until_accepted()
    batch.assert_each_task_once()
    sfn = chunk_stack.client("stepfunctions")
    pages = sfn.get_paginator("list_executions").paginate(
        stateMachineArn=chunk_stack.start_batch_state_machine_arn
    )
    starters = [
        e["status"] for page in pages for e in page["executions"] if e["name"].startswith(batch.marker)
    ]
    assert sorted(starters) == ["FAILED", "SUCCEEDED"], starters
