"""A batch larger than the API stores in its time is handed to the batch starter: the POST makes a fixed
number of calls whatever the batch's size, and the starter's step stores the runs and starts one execution
per chunk, a group of chunks at a time, safely repeated (docs/batches.md)."""

from __future__ import annotations

import json

from dalle_plugin.domain.run import RunStatus
from dalle_plugin.domain.steps.batch_start import BatchStep, starter_name, store_batch
from dalle_plugin.domain.steps.start import start_session
from dalle_plugin.ports import BatchState

from tests.unit.test_batches import CountingRuns
from tests.unit.test_run_ownership import TODAY, Starter, _deps, _payload


class Requests:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts = 0

    def put(self, key: str, body: bytes) -> None:
        self.puts += 1
        self.objects[key] = body

    def get(self, key: str) -> bytes | None:
        return self.objects.get(key)


class Progress:
    """The progress record's rules, in memory: a new attempt only when none is under way."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], BatchState] = {}

    def begin(self, session, digest, accepted, expires_at):
        state = self.states.get((session, digest))
        if state is not None and state.stored < state.accepted:
            return state, False
        fresh = BatchState(digest, (state.attempt if state else 0) + 1, accepted, 0)
        self.states[(session, digest)] = fresh
        return fresh, True

    def stored(self, session, digest, attempt, stored):
        state = self.states[(session, digest)]
        if state.attempt == attempt and state.stored < stored:
            self.states[(session, digest)] = BatchState(digest, attempt, state.accepted, stored)

    def of_session(self, session):
        return [state for (s, _), state in self.states.items() if s == session]


def _starter_deps():
    deps = _deps()
    deps.runs = CountingRuns(deps.runs)
    deps.batch_requests, deps.batch_progress, deps.batch_starter = Requests(), Progress(), Starter()
    return deps


def _run_starter(deps, tasks_per_execution: int, seconds_left=lambda: 1000.0) -> int:
    """The starter state machine: each started starter's step, called until done; returns the calls."""
    calls = 0
    for name, step_input in list(deps.batch_starter.executions.items()):
        step = BatchStep.model_validate(step_input)
        while not step.done:
            step, _ = store_batch(step, deps, tasks_per_execution, seconds_left)
            calls += 1
        deps.batch_starter.executions[name] = step.model_dump(by_alias=True) | {"finished": True}
    return calls


def test_a_10000_task_post_makes_the_same_few_calls_as_a_200_task_one_and_stores_nothing_itself():
    for size in (200, 10_000):
        deps = _starter_deps()
        answer = start_session(_payload("s1", [f"t{i:05d}" for i in range(size)]), deps, TODAY)
        assert answer.runs == [] and len(answer.storing) == size and not answer.duplicate
        assert deps.runs.calls == 0 and deps.starter.calls == 0  # no run stored, no run execution started
        assert deps.batch_requests.puts == 1 and deps.batch_starter.calls == 1
        assert len(json.loads(next(iter(deps.batch_requests.objects.values())))["tasks"]) == size


def test_one_chunk_is_still_stored_and_started_by_the_api_itself():
    deps = _starter_deps()
    answer = start_session(_payload("s1", [f"t{i}" for i in range(5)]), deps, TODAY, tasks_per_execution=5)
    assert answer.started == [f"t{i}" for i in range(5)] and deps.batch_starter.calls == 0
    assert len(deps.starter.executions) == 1


def test_the_starter_stores_every_run_and_starts_one_execution_per_chunk():
    deps = _starter_deps()
    tasks = [f"t{i:03d}" for i in range(250)]
    start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=7)
    # a step with little time left still does one group of chunks, so the state machine always moves on
    calls = _run_starter(deps, 7, seconds_left=lambda: 0.0)
    assert calls == 5  # 36 chunks, 8 a call
    assert len(deps.starter.executions) == 36  # 35 of 7 and one of 5
    for name, run_input in deps.starter.executions.items():
        assert all(deps.runs.get("s1", t["taskId"]).owner == name for t in run_input["tasks"])
    assert sorted(t["taskId"] for i in deps.starter.executions.values() for t in i["tasks"]) == tasks
    assert all(deps.runs.get("s1", t).status is RunStatus.QUEUED for t in tasks)
    assert [(s.accepted, s.stored) for s in deps.batch_progress.of_session("s1")] == [(250, 250)]


def test_the_same_chunks_as_the_api_would_form_so_a_resend_through_either_path_starts_nothing_new():
    direct, handed = _deps(), _starter_deps()
    tasks = [f"t{i:03d}" for i in range(30)]
    start_session(_payload("s1", tasks), direct, TODAY, tasks_per_execution=7)
    start_session(_payload("s1", tasks), handed, TODAY, tasks_per_execution=7)
    _run_starter(handed, 7)
    assert direct.starter.executions == handed.starter.executions


def test_duplicate_posts_while_the_starter_works_start_it_once_and_a_step_repeated_starts_nothing_twice():
    deps = _starter_deps()
    tasks = [f"t{i:03d}" for i in range(40)]
    first = start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    again = start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    assert not first.duplicate and again.duplicate
    assert len(deps.batch_starter.executions) == 1
    (step_input,) = deps.batch_starter.executions.values()
    step = BatchStep.model_validate(step_input)
    store_batch(step, deps, 5, lambda: 0.0)  # a step whose answer was lost: Step Functions calls it again
    store_batch(step, deps, 5, lambda: 0.0)
    _run_starter(deps, 5)
    # the starter itself then runs from the start again: each chunk asked three times, started once
    assert len(deps.starter.executions) == 8 and deps.starter.calls == 24


def test_a_resend_after_the_starter_finished_begins_a_new_attempt_that_reruns_only_the_cancelled_task():
    deps = _starter_deps()
    tasks = [f"t{i:03d}" for i in range(20)]
    start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    _run_starter(deps, 5)
    for task in tasks:
        deps.runs.update("s1", task, lambda run: setattr(run, "status", RunStatus.SUCCEEDED))
    deps.runs.update("s1", "t007", lambda run: setattr(run, "status", RunStatus.CANCELLED))
    again = start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    assert not again.duplicate
    (digest,) = {s.digest for s in deps.batch_progress.of_session("s1")}
    assert set(deps.batch_starter.executions) == {starter_name("s1", digest, n) for n in (1, 2)}
    before = set(deps.starter.executions)
    _run_starter(deps, 5)
    (rerun,) = set(deps.starter.executions) - before
    assert [t["taskId"] for t in deps.starter.executions[rerun]["tasks"]] == ["t007"]
    assert deps.runs.get("s1", "t007").owner == rerun
