"""A batch larger than the API stores in its time is handed to the batch starter: the POST makes a fixed
number of calls whatever the batch's size, and the starter's step stores the runs and starts one execution
per chunk, a group of chunks at a time, safely repeated (docs/batches.md)."""

from __future__ import annotations

import json

from dalle_plugin.domain.cancel import cancel_session
from dalle_plugin.domain.errors import BatchHeldTooLong
from dalle_plugin.domain.run import RunStatus
from dalle_plugin.domain.sessions import session_page
from dalle_plugin.domain.step_io.api import RunTally
from dalle_plugin.domain.step_io.failure import StepError
from dalle_plugin.domain.steps.batch_start import (
    BatchStep,
    InFlightCap,
    record_batch_failure,
    starter_name,
    store_batch,
)
from dalle_plugin.domain.steps.start import start_session
from dalle_plugin.ports import BatchState

from tests.faults.test_step_idempotency import Hub, Vault
from tests.unit.test_batches import CountingRuns
from tests.unit.test_run_ownership import TODAY, Starter, _deps, _payload


class Requests:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.puts = 0
        self.gets = 0

    def put(self, key: str, body: bytes) -> None:
        self.puts += 1
        self.objects[key] = body

    def get(self, key: str) -> bytes | None:
        self.gets += 1
        return self.objects.get(key)


class CountingVault(Vault):
    """The vault, counting how often sealed secrets are opened (a KMS Decrypt each in the stack)."""

    def __init__(self) -> None:
        self.opens = 0

    def open(self, sealed: bytes, context: dict[str, str]) -> dict[str, str]:
        self.opens += 1
        return super().open(sealed, context)


class Progress:
    """The progress record's rules, in memory: a new attempt only when none is under way."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], BatchState] = {}

    def begin(self, session, digest, accepted, expires_at):
        before = self.states.get((session, digest))
        if before is not None and before.under_way:
            return before, before
        fresh = BatchState(digest, (before.attempt if before else 0) + 1, accepted, 0)
        self.states[(session, digest)] = fresh
        return fresh, before

    def stored(self, session, digest, attempt, stored):
        state = self.states[(session, digest)]
        if state.attempt == attempt and state.ended_by is not None:
            return False
        if state.attempt == attempt and state.stored < stored:
            self.states[(session, digest)] = state._replace(stored=stored)
        return True

    def end(self, session, digest, attempt, ended_by, why):
        state = self.states[(session, digest)]
        if state.attempt != attempt or not state.under_way:
            return False
        self.states[(session, digest)] = state._replace(ended_by=ended_by, ended_why=why)
        return True

    def of_session(self, session):
        return [state for (s, _), state in self.states.items() if s == session]


def _starter_deps():
    deps = _deps()
    deps.runs = CountingRuns(deps.runs)
    deps.batch_requests, deps.batch_progress, deps.batch_starter = Requests(), Progress(), Starter()
    deps.vault = CountingVault()
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


class Pages:
    """The session's run states at a glance, over the fake run store."""

    def __init__(self, runs) -> None:
        self._runs = runs

    def tallies(self, session):
        return [RunTally.of(run) for run in self._runs.list_session(session)]

    def page(self, session, limit, after):
        runs = sorted(self._runs.list_session(session), key=lambda run: run.task_id)
        return [run for run in runs if after is None or run.task_id > after][:limit], None


class TellingHub(Hub):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[str, str]] = []

    def plugin_log(self, session, message, level="INFO", **extra):
        self.logged.append((level, message))


def _all(deps, session: str, status: RunStatus) -> None:
    for run in deps.runs.list_session(session):
        deps.runs.update(session, run.task_id, lambda r: setattr(r, "status", status))


def test_a_late_duplicate_with_nothing_to_run_again_is_answered_as_a_duplicate_and_starts_nothing():
    deps = _starter_deps()
    deps.session_pages = Pages(deps.runs)
    tasks = [f"t{i:03d}" for i in range(20)]
    start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    _run_starter(deps, 5)
    _all(deps, "s1", RunStatus.SUCCEEDED)
    deps.runs.update("s1", "t003", lambda run: setattr(run, "status", RunStatus.GENERATING))
    late = start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    assert late.duplicate and late.storing == []
    assert late.settled == {t: "GENERATING" if t == "t003" else "SUCCEEDED" for t in tasks}
    assert len(deps.batch_starter.executions) == 1 and deps.batch_requests.puts == 1
    # one task failed since: the resend runs it again, through a new attempt
    deps.runs.update("s1", "t004", lambda run: setattr(run, "status", RunStatus.FAILED))
    again = start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    assert not again.duplicate and again.settled is None and len(deps.batch_starter.executions) == 2


def test_a_session_cancelled_while_the_starter_stores_it_stores_no_more_and_a_resend_runs_the_rest():
    deps = _starter_deps()
    tasks = [f"t{i:03d}" for i in range(100)]  # 20 chunks of 5: three calls of 8, 8 and 4 chunks
    start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    (step_input,) = deps.batch_starter.executions.values()
    step, _ = store_batch(BatchStep.model_validate(step_input), deps, 5, lambda: 0.0)
    assert len(deps.runs.list_session("s1")) == 40

    outcomes = cancel_session("s1", None, deps)
    assert len(outcomes) == 40 and all(o.cancelled for o in outcomes)
    step, started = store_batch(step, deps, 5, lambda: 0.0)
    assert step.done and started == 0 and len(deps.runs.list_session("s1")) == 40  # nothing more stored
    view = session_page("s1", Pages(deps.runs), batches=deps.batch_progress)
    assert view["counts"] == {"CANCELLED": 40} and "storing" not in view
    (stopped,) = view["storingStopped"]
    assert stopped.startswith("Cancelled while the batch was being stored: 40 of 100 tasks")

    again = start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    assert not again.duplicate
    _run_starter(deps, 5)
    assert all(run.status is RunStatus.QUEUED for run in deps.runs.list_session("s1"))
    assert len(deps.runs.list_session("s1")) == 100
    assert "storingStopped" not in session_page("s1", Pages(deps.runs), batches=deps.batch_progress)


def test_a_group_stored_as_the_cancel_came_is_cancelled_by_the_starter_itself():
    deps = _starter_deps()
    tasks = [f"t{i:03d}" for i in range(100)]
    start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    (step_input,) = deps.batch_starter.executions.values()
    step = BatchStep.model_validate(step_input)
    start = deps.starter.start

    def cancel_lands(name, run_input):  # the cancel marks the attempt after the starter checked it, and
        if not deps.batch_progress.of_session("s1")[0].ended_by:  # lists the session before the group exists
            cancel_session("s1", None, deps)
        return start(name, run_input)

    deps.starter.start = cancel_lands
    step, _ = store_batch(step, deps, 5, lambda: 1000.0)
    assert step.done and step.next_chunk == 8  # it stopped after the group it was storing
    runs = deps.runs.list_session("s1")
    assert len(runs) == 40 and {run.status for run in runs} == {RunStatus.CANCELLED}


def test_a_starter_that_fails_ends_its_attempt_with_a_sentence_tells_the_hub_and_a_resend_begins_anew():
    deps = _starter_deps()
    hub = TellingHub()
    deps.hub_for = lambda run, key: hub
    tasks = [f"t{i:03d}" for i in range(100)]
    start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    (step_input,) = deps.batch_starter.executions.values()
    step, _ = store_batch(BatchStep.model_validate(step_input), deps, 5, lambda: 0.0)
    # the next call fails after its retries: the Catch puts the error at $.error
    caught = step.model_copy(update={"error": StepError(error="StorageUnavailable", cause=None)})
    assert record_batch_failure(caught, deps).done
    assert record_batch_failure(caught, deps).done  # a retried failure step ends nothing twice
    (state,) = deps.batch_progress.of_session("s1")
    assert state.ended_by == "failed" and not state.under_way
    assert state.ended_why.startswith("The batch stopped being stored after 40 of its 100 tasks (")
    assert "storage did not answer" in state.ended_why and "send the batch again" in state.ended_why
    assert [level for level, _ in hub.logged] == ["ERROR"]
    view = session_page("s1", Pages(deps.runs), batches=deps.batch_progress)
    assert view["storingStopped"] == [state.ended_why] and view["progress"]["total"] == 40

    again = start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    assert not again.duplicate and len(deps.batch_starter.executions) == 2
    before = dict(deps.starter.executions)
    _run_starter(deps, 5)
    assert len(deps.starter.executions) == 20 and all(
        deps.starter.executions[n] == i for n, i in before.items()
    )


def _held_starter(tasks: list[str], payload=_payload):
    deps = _starter_deps()
    start_session(payload("s1", tasks), deps, TODAY, tasks_per_execution=5)
    (step_input,) = deps.batch_starter.executions.values()
    return deps, BatchStep.model_validate(step_input)


def test_an_own_key_batch_keeps_at_most_the_cap_of_its_executions_running_and_starts_the_next_as_one_ends():
    deps, step = _held_starter([f"t{i:03d}" for i in range(30)])  # 6 chunks
    cap = InFlightCap(executions=2)
    most_running, waits = 0, []
    while not step.done:
        step, _ = store_batch(step, deps, 5, lambda: 1000.0, cap)
        running = deps.starter.running("s1_")
        most_running = max(most_running, running)
        if step.hold_seconds:
            waits.append(step.hold_seconds)
        if running == 2 and step.holds == 3:  # held three times in a row: the oldest execution ends
            deps.starter.ended.add(next(n for n in deps.starter.executions if n not in deps.starter.ended))
    assert most_running == 2 and len(deps.starter.executions) == 6
    # started 2, then held 5, 10, 20 s until one ended; each start is followed by a short wait to count again
    assert waits[:4] == [5, 5, 10, 20] and max(waits) == 20
    assert sorted(t["taskId"] for i in deps.starter.executions.values() for t in i["tasks"]) == [
        f"t{i:03d}" for i in range(30)
    ]


def test_a_long_hold_waits_at_most_five_minutes_between_looks_and_gives_up_with_a_sentence():
    deps, step = _held_starter([f"t{i:03d}" for i in range(20)])
    cap = InFlightCap(executions=1, give_up_after_s=3600)
    step, _ = store_batch(step, deps, 5, lambda: 1000.0, cap)
    holds: list[int] = []

    def held_until_it_gives_up() -> BatchHeldTooLong | None:
        nonlocal step
        for _ in range(100):  # the state machine: wait as told, call again
            deps.clock.ms += step.hold_seconds * 1000
            try:
                step, _ = store_batch(step, deps, 5, lambda: 1000.0, cap)
            except BatchHeldTooLong as exc:
                return exc
            holds.append(step.hold_seconds)
        return None

    held = held_until_it_gives_up()
    assert held is not None and 3600 < (deps.clock.ms - step.began_at_ms) / 1000 < 3600 + 300
    assert holds[:8] == [5, 10, 20, 40, 80, 160, 300, 300] and max(holds) == 300
    assert len(holds) < 20  # an hour held is a few looks, each 9 history events
    caught = step.model_copy(
        update={"error": StepError(error="BatchHeldTooLong", cause=json.dumps({"errorMessage": str(held)}))}
    )
    record_batch_failure(caught, deps)
    (state,) = deps.batch_progress.of_session("s1")
    assert state.ended_why.startswith("The batch stopped being stored after 5 of its 20 tasks (its runs in ")
    assert "did not make room for the rest within 60 minutes" in state.ended_why


def _shared_key(session, tasks):
    payload = _payload(session, tasks)
    config = json.loads(payload.config_json)
    del config["openai_api_key"]
    return payload.model_copy(update={"config_json": json.dumps(config)})


def test_a_shared_key_batch_is_not_held_its_queue_paces_it_and_refuses_in_time():
    deps, step = _held_starter([f"t{i:03d}" for i in range(30)], _shared_key)
    step, _ = store_batch(step, deps, 5, lambda: 1000.0, InFlightCap(executions=1))
    assert step.done and step.hold_seconds == 0 and len(deps.starter.executions) == 6


def _reads(deps) -> tuple[int, int]:
    return deps.batch_requests.gets, deps.vault.opens


def test_a_held_look_reads_no_request_and_opens_no_secrets_it_only_counts_room():
    deps, step = _held_starter([f"t{i:03d}" for i in range(20)])
    assert step.own_key is True  # recorded at hand-off, from the request's own key
    cap = InFlightCap(executions=1)
    step, _ = store_batch(step, deps, 5, lambda: 1000.0, cap)  # starts one chunk: reads the request once
    assert _reads(deps) == (1, 1) and len(deps.starter.executions) == 1
    for _ in range(5):
        step, started = store_batch(step, deps, 5, lambda: 1000.0, cap)
        assert started == 0 and step.hold_seconds > 0
    assert _reads(deps) == (1, 1)  # five held looks: no S3 read, no vault open
    deps.starter.ended.update(deps.starter.executions)  # room again: the look that starts reads it
    step, started = store_batch(step, deps, 5, lambda: 1000.0, cap)
    assert started == 5 and _reads(deps) == (2, 2)


def test_a_step_handed_off_before_own_key_was_recorded_reads_the_request_once_to_learn_it():
    deps, step = _held_starter([f"t{i:03d}" for i in range(20)])
    legacy = BatchStep.model_validate(step.model_dump(by_alias=True, exclude={"own_key"}))
    assert legacy.own_key is None
    cap = InFlightCap(executions=1)
    deps.starter.start("s1_editor", {})  # one of the session's executions already runs: no room
    step, started = store_batch(legacy, deps, 5, lambda: 1000.0, cap)
    assert started == 0 and step.hold_seconds == 5 and _reads(deps) == (1, 1)
    # its answer carries what it learnt: the next looks are as cheap as a new step's
    assert step.model_dump(by_alias=True)["ownKey"] is True
    step, _ = store_batch(step, deps, 5, lambda: 1000.0, cap)
    assert _reads(deps) == (1, 1)
    deps.starter.ended.add("s1_editor")
    while not step.done:
        step, _ = store_batch(step, deps, 5, lambda: 1000.0, cap)
        deps.starter.ended.update(deps.starter.executions)
    assert len(deps.starter.executions) == 5  # the editor's and the batch's 4 chunks


def test_a_shared_key_step_handed_off_before_own_key_was_recorded_is_still_not_held():
    deps, step = _held_starter([f"t{i:03d}" for i in range(30)], _shared_key)
    assert step.own_key is False
    legacy = BatchStep.model_validate(step.model_dump(by_alias=True, exclude={"own_key"}))
    step, _ = store_batch(legacy, deps, 5, lambda: 1000.0, InFlightCap(executions=1))
    assert step.done and step.hold_seconds == 0 and len(deps.starter.executions) == 6
    assert _reads(deps) == (1, 1)
