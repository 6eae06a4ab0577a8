"""A batch of 10,000 tasks: stored and started in a bounded number of AWS calls, split into executions each
well inside Step Functions' history and payload limits (docs/batches.md has the same sums)."""

from __future__ import annotations

import contextlib
import json

from dalle_plugin.domain.payload import MAX_BATCH_TASKS, parse_payload
from dalle_plugin.domain.run import RunStatus
from dalle_plugin.domain.steps.start import TASKS_PER_EXECUTION, start_session
from dalle_plugin.ports import HubTaskRef

from local_stack.step_functions import HISTORY_LIMIT_EVENTS, PAYLOAD_LIMIT_BYTES, payload_size
from tests.unit.test_run_ownership import CONFIG, TODAY, _deps, _payload

#: history events one task adds to its execution at most, with room for waits: 36 for extract, generate and
#: attach (counted on the local stack), 9 for each Wait-and-Generate-again loop, 20 loops allowed
EVENTS_PER_TASK = 36 + 9 * 20


class CountingRuns:
    """The fake run store, counting the calls a real store would make."""

    def __init__(self, runs) -> None:
        self._runs, self.calls = runs, 0

    def __getattr__(self, name):
        return getattr(self._runs, name)

    def create_many(self, runs):
        self.calls += 1
        return self._runs.create_many(runs)

    def create(self, run):
        self.calls += 1
        return self._runs.create(run)


def test_a_batch_of_10000_tasks_is_stored_and_started_in_a_few_hundred_calls_within_every_limit():
    deps = _deps()
    deps.runs = CountingRuns(deps.runs)
    tasks = [f"{i:05d}".ljust(256, "t") for i in range(MAX_BATCH_TASKS)]  # the longest ids a payload allows
    started = start_session(_payload("s1", tasks), deps, TODAY)
    assert len(started.started) == MAX_BATCH_TASKS
    executions = deps.starter.executions
    assert len(executions) == MAX_BATCH_TASKS // TASKS_PER_EXECUTION == 100
    assert deps.runs.calls == 100 and deps.starter.calls == 100  # one write and one start per 100 tasks
    for run_input in executions.values():
        assert payload_size(run_input) < PAYLOAD_LIMIT_BYTES / 8  # under 32 KiB of 256 KiB
        assert len(run_input["tasks"]) * EVENTS_PER_TASK < HISTORY_LIMIT_EVENTS
    assert sorted(t["taskId"] for i in executions.values() for t in i["tasks"]) == sorted(tasks)


def test_a_duplicate_of_a_10000_task_batch_starts_nothing_new():
    deps = _deps()
    tasks = [f"t{i:05d}" for i in range(MAX_BATCH_TASKS)]
    start_session(_payload("s1", tasks), deps, TODAY)
    again = start_session(_payload("s1", tasks), deps, TODAY)
    assert again.started == [] and len(deps.starter.executions) == 100


def test_small_chunks_split_a_batch_into_executions_that_each_own_their_tasks():
    deps = _deps()
    tasks = [f"t{i:03d}" for i in range(300)]
    start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=7)
    assert len(deps.starter.executions) == 43  # 42 of 7 and one of 6
    for name, run_input in deps.starter.executions.items():
        assert all(deps.runs.get("s1", t["taskId"]).owner == name for t in run_input["tasks"])


class ListingHub:
    def __init__(self, tasks: list[str]) -> None:
        self.tasks, self.asked = tasks, []

    def list_batch_tasks(self, project_id, batches, at_most):
        self.asked.append((project_id, batches))
        return [HubTaskRef(task, f"asset-{task}") for task in self.tasks][:at_most]


def _batches_payload(session: str, batches: list[str]):
    body = {"projectId": "proj", "session": session, "apiKey": "k", "configJSON": CONFIG, "batches": batches}
    return parse_payload(json.dumps(body))


def test_batches_are_expanded_into_their_tasks_through_the_hubs_listing():
    hub = ListingHub(["c", "a", "b"])
    deps = _deps()
    deps.hub_for = lambda caller, key: hub
    started = start_session(_batches_payload("s1", ["batch-1"]), deps, TODAY)
    assert hub.asked == [("proj", ["batch-1"])]
    assert started.started == ["a", "b", "c"]  # in id order: a duplicate forms the same executions
    assert deps.runs.get("s1", "a").asset_id == "asset-a"


def test_batches_holding_more_tasks_than_a_run_takes_are_refused_with_a_sentence():
    import pytest
    from dalle_plugin.domain.errors import InvalidRequest

    deps = _deps()
    deps.hub_for = lambda caller, key: ListingHub([f"t{i}" for i in range(MAX_BATCH_TASKS + 5)])
    with pytest.raises(InvalidRequest) as refused:
        start_session(_batches_payload("s1", ["huge"]), deps, TODAY)
    assert refused.value.field == "batches" and "fewer batches" in refused.value.message


def test_a_resend_naming_only_some_of_a_dead_requests_chunk_starts_the_chunk_whole():
    from tests.unit.test_run_ownership import Starter

    deps = _deps(Starter(fail_first=1))  # the first request stores its runs and dies before starting
    tasks = [f"t{i}" for i in range(5)]
    with contextlib.suppress(TimeoutError):
        start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    assert deps.starter.executions == {}

    start_session(_payload("s1", tasks[:2]), deps, TODAY, tasks_per_execution=5)
    [(name, run_input)] = deps.starter.executions.items()
    assert [t["taskId"] for t in run_input["tasks"]] == tasks  # not only the two this request named
    assert {deps.runs.get("s1", t).owner for t in tasks} == {name}


def test_a_resend_naming_only_some_of_a_dead_requests_reruns_starts_them_all():
    from tests.unit.test_run_ownership import Starter

    deps = _deps()
    tasks = [f"t{i}" for i in range(4)]
    start_session(_payload("s1", tasks), deps, TODAY)
    for task in tasks:  # every run failed: the hub sends the batch again to re-run them
        deps.runs.update("s1", task, lambda r: setattr(r, "status", RunStatus.FAILED))
    deps.starter = Starter(fail_first=1)
    with contextlib.suppress(TimeoutError):
        start_session(_payload("s1", tasks), deps, TODAY)
    start_session(_payload("s1", tasks[:1]), deps, TODAY)
    [(name, run_input)] = deps.starter.executions.items()
    assert [t["taskId"] for t in run_input["tasks"]] == tasks
    assert {deps.runs.get("s1", t).owner for t in tasks} == {name}
