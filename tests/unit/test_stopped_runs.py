"""End Stopped Runs at the domain level, with in-memory fakes: an execution stopped from outside, timed out
or failed past its Catch ends each run it left going (FAILED, with a sentence), keeps the images it paid
for and offers them to a re-run, gives back only grants whose request was never sent, and changes nothing
on a second delivery of the event, on a run its cancel or its own step ended, or on another execution's."""

from __future__ import annotations

import json
from typing import Any

from dalle_plugin.domain.cancel import cancel_session
from dalle_plugin.domain.run import HeldAllowance, RunRecord, RunRef, RunStatus
from dalle_plugin.domain.spending import spend_counter
from dalle_plugin.domain.steps.machinery import StepDeps, image_fingerprint, image_key
from dalle_plugin.domain.steps.stopped import ExecutionEnded, ExecutionStatusChange, end_stranded_runs

from tests.conftest import load_event
from tests.faults.test_step_idempotency import SESSION, TASK, Clock, Hub, Images, Offers, Vault
from tests.faults.test_step_idempotency import _run as a_run
from tests.unit.test_cancel_races import CountingLedger, RacedRuns, Starter

EXECUTION = RunRef(session=SESSION, task_id=TASK).execution_name
ARN = f"arn:aws:states:us-east-1:123456789012:execution:dalle-RunStateMachine:{EXECUTION}"


def _deps(hub: Hub, ledger: CountingLedger | None = None) -> StepDeps:
    return StepDeps(
        runs=RacedRuns(),
        clock=Clock(),
        vault=Vault(),
        hub_for=lambda run, key: hub,
        images=Images(),
        reusable_images=Offers(),
        starter=Starter(),
        allowances=ledger,
    )


def _ended(status: str = "ABORTED", minutes: int = 2, tasks: tuple[str, ...] = (TASK,)) -> ExecutionEnded:
    started = 1_795_164_000_000
    return ExecutionEnded(
        execution_arn=ARN,
        name=EXECUTION,
        status=status,
        start_date=started,
        stop_date=started + minutes * 60_000,
        input=json.dumps({"session": SESSION, "tasks": [{"taskId": task} for task in tasks]}),
    )


def _paid_and_handed_to_attach(deps: StepDeps, **changes: Any) -> RunRecord:
    """A run whose Generate paid for its image and stored it, then handed it to Attach through the state:
    the record says GENERATING, holds its grants, and has no image."""
    run = a_run(owner=EXECUTION, attempt=1, workflow=False, **changes)
    deps.images.objects[image_key(run)] = b"\x89PNG paid for"
    deps.runs.create(run)
    return run


def _holding(ledger: CountingLedger, **changes: Any) -> RunRecord:
    run = a_run(**{"owner": EXECUTION, "status": RunStatus.WAITING_FOR_SLOT, **changes})
    held = [HeldAllowance(counter=spend_counter(SESSION), ticket=f"{run.execution_name}#g0", amount=40_000)]
    for grant in held:
        assert ledger.reserve(grant.counter, grant.ticket, grant.amount, 10**9, 2_000_000_000).granted
    return run.model_copy(update={"held": held})


def test_a_run_stopped_between_generate_and_attach_ends_failed_with_its_paid_image_kept_and_offered():
    hub = Hub()
    deps = _deps(hub)
    run = _paid_and_handed_to_attach(deps)
    assert end_stranded_runs(_ended("ABORTED"), deps) == ["execution_stopped"]
    ended = deps.runs.get(SESSION, TASK)
    assert ended.status is RunStatus.FAILED and ended.failure.reason == "execution_stopped"
    assert "stopped from outside the plugin" in ended.failure.message
    assert ended.image is not None and ended.image.key == image_key(run)  # recorded: seen and reusable
    assert deps.reusable_images.items == {image_fingerprint(run): image_key(run)}
    assert ended.sealed_secrets is None
    assert hub.calls == ["plugin_response"]  # the editor is told the run ended


def test_a_second_delivery_of_the_event_changes_nothing():
    hub = Hub()
    deps = _deps(hub)
    _paid_and_handed_to_attach(deps)
    end_stranded_runs(_ended(), deps)
    first = deps.runs.get(SESSION, TASK)
    assert end_stranded_runs(_ended(), deps) == []
    assert deps.runs.get(SESSION, TASK) == first and hub.calls == ["plugin_response"]


def test_a_timed_out_execution_says_after_how_long_and_gives_back_grants_never_sent():
    ledger = CountingLedger()
    deps = _deps(Hub(), ledger)
    deps.runs.create(_holding(ledger))
    assert end_stranded_runs(_ended("TIMED_OUT", minutes=2880), deps) == ["execution_timed_out"]
    ended = deps.runs.get(SESSION, TASK)
    assert "stopped after 2880 minutes" in ended.failure.message and ended.held == []
    assert set(ledger.releases.values()) == {1} and not any(ledger.used.values())
    end_stranded_runs(_ended("TIMED_OUT", minutes=2880), deps)  # again: nothing given back twice
    assert set(ledger.releases.values()) == {1}


def test_grants_of_a_request_that_may_have_been_sent_stay_counted():
    ledger = CountingLedger()
    deps = _deps(Hub(), ledger)
    deps.runs.create(_holding(ledger, status=RunStatus.GENERATING, attempt=1))  # stopped while sending
    end_stranded_runs(_ended(), deps)
    assert deps.runs.get(SESSION, TASK).status is RunStatus.FAILED
    assert not ledger.releases and any(ledger.used.values())


def test_a_run_the_plugins_cancel_ended_is_left_as_it_is():
    ledger = CountingLedger()
    hub = Hub()
    deps = _deps(hub, ledger)
    deps.runs.create(_holding(ledger))
    [outcome] = cancel_session(SESSION, None, deps)  # the cancel stops the execution: ABORTED
    assert outcome.cancelled
    cancelled = deps.runs.get(SESSION, TASK)
    calls = list(hub.calls)
    assert end_stranded_runs(_ended("ABORTED"), deps) == []
    assert deps.runs.get(SESSION, TASK) == cancelled and hub.calls == calls
    assert set(ledger.releases.values()) == {1}


def test_finished_runs_and_another_executions_run_are_left_as_they_are():
    deps = _deps(Hub())
    deps.runs.create(a_run(owner=EXECUTION, status=RunStatus.SUCCEEDED))
    deps.runs.create(a_run(task_id="task-2", owner="a-later-execution"))
    assert end_stranded_runs(_ended("FAILED", tasks=(TASK, "task-2")), deps) == []
    assert deps.runs.get(SESSION, TASK).status is RunStatus.SUCCEEDED
    assert deps.runs.get(SESSION, "task-2").status is RunStatus.GENERATING


def test_a_step_that_finishes_the_run_as_it_is_ended_keeps_its_result():
    """An invocation in flight when the execution stopped runs to its end: its last write wins the race."""
    deps = _deps(Hub())
    _paid_and_handed_to_attach(deps)

    def attach_finishes() -> None:
        deps.runs.items[(SESSION, TASK)].status = RunStatus.SUCCEEDED

    deps.runs.before_write(attach_finishes)
    assert end_stranded_runs(_ended(), deps) == []
    assert deps.runs.get(SESSION, TASK).status is RunStatus.SUCCEEDED


def test_a_failed_execution_is_the_backstop_and_other_statuses_are_ignored():
    deps = _deps(Hub())
    deps.runs.create(a_run(owner=EXECUTION, status=RunStatus.QUEUED))
    assert end_stranded_runs(_ended("SUCCEEDED"), deps) == []
    failed = _ended("FAILED").model_copy(update={"error": "States.Runtime"})
    assert end_stranded_runs(failed, deps) == ["execution_failed"]
    assert "(States.Runtime)" in deps.runs.get(SESSION, TASK).failure.message


def test_the_sample_event_is_what_eventbridge_sends():
    change = ExecutionStatusChange.model_validate(load_event("end_stopped_runs.json"))
    assert change.detail_type == "Step Functions Execution Status Change"
    assert change.detail.status == "ABORTED" and change.detail.minutes == 2
    started_with = change.detail.execution_input()
    assert started_with is not None and [t.task_id for t in started_with.tasks] == ["task-fox"]
