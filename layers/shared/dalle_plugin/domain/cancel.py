"""Cancelling a session (or one of its tasks): stop what has not generated yet, tell the hub, leave the queue.

A run can be cancelled until its image request starts: after that the image is paid for, so the run is
left to finish and deliver it. The decision is taken under the run's version lock, against the same
check the Generate step makes before it pays, so a run is either cancelled or paid for, never both.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from dalle_plugin.domain.errors import PluginError
from dalle_plugin.domain.run import HeldAllowance, RunRecord, RunStatus
from dalle_plugin.domain.spending import release
from dalle_plugin.domain.steps.machinery import StepDeps, hub_log, mark, required, try_open_hub

CANCELLABLE = (RunStatus.QUEUED, RunStatus.EXTRACTING, RunStatus.WAITING_FOR_SLOT)


@dataclass
class CancelOutcome:
    task_id: str
    cancelled: bool
    status: str
    why: str | None = None


class _NotCancellable(Exception):
    def __init__(self, run: RunRecord):
        super().__init__(run.status.value)
        self.status = run.status.value
        self.why = f"Not cancelled: {_why_not(run)}."


def _why_not(run: RunRecord) -> str:
    if run.status is RunStatus.CANCELLED:
        return "it was already cancelled"
    if run.status.finished:
        return f"it has already ended ({run.status.value.lower()})"
    if run.image is not None:
        return "its image was already generated (and paid for), so it will be delivered"
    return "its image request has started (and is paid for), so it will be delivered"


def cancel_session(session: str, task_id: str | None, deps: StepDeps) -> list[CancelOutcome]:
    if task_id is None:
        _stop_storing(session, deps)  # first: runs a starter stores after this are its own to cancel
    runs = [r for r in deps.runs.list_session(session) if task_id is None or r.task_id == task_id]
    outcomes = cancel_runs(runs, deps)
    _stop_finished_executions(session, deps)
    return outcomes


def cancel_runs(runs: list[RunRecord], deps: StepDeps) -> list[CancelOutcome]:
    return [_cancel_run(run, deps) for run in runs]


def _stop_storing(session: str, deps: StepDeps) -> None:
    """A session cancelled while the batch starter stores it: its attempt ends here, and the starter stores
    no more (it checks before each group of chunks, and cancels a group it stored as the cancel came)."""
    if deps.batch_progress is None:
        return
    for batch in deps.batch_progress.of_session(session):
        if batch.under_way:
            why = (
                f"Cancelled while the batch was being stored: {batch.stored} of {batch.accepted} tasks had "
                f"been stored (those not yet generating are cancelled), the other {batch.accepted - batch.stored} "
                "were never started. Send the batch again to run them."
            )
            deps.batch_progress.end(session, batch.digest, batch.attempt, "cancelled", why)


def _cancel_run(run: RunRecord, deps: StepDeps) -> CancelOutcome:
    if run.status not in CANCELLABLE or run.image is not None:
        return CancelOutcome(run.task_id, False, run.status.value, f"Not cancelled: {_why_not(run)}.")
    hub = try_open_hub(run, deps)  # opened before the secrets are purged, to tell the hub
    now = deps.clock.now_ms()
    given_back: list[HeldAllowance] = []

    def cancel(r: RunRecord) -> None:
        if r.status not in CANCELLABLE or r.image is not None:
            raise _NotCancellable(r)
        mark(r, now, "cancelled", RunStatus.CANCELLED, "Cancelled before the image was generated.")
        r.timeline[-1].duration_ms = 0
        r.sealed_secrets = None
        # The grants leave the record in the write that cancels: only the writer that removed them gives
        # them back, so a Record Failure or a second cancel racing this one cannot give them back again.
        given_back[:] = r.held
        r.held = []

    try:
        cancelled = deps.runs.update(run.session, run.task_id, cancel)
    except _NotCancellable as exc:
        return CancelOutcome(run.task_id, False, exc.status, exc.why)
    if given_back and deps.allowances is not None:
        release(given_back, deps.allowances)  # counted for a request that will never be sent
    if run.uses_default_key and run.rate_ticket is not None and deps.limiter is not None:
        # the runs behind it in the shared key's queue move up
        deps.limiter.leave(run.org_id or "", not run.workflow, run.rate_ticket)
    hub_log(
        cancelled, hub, "Run cancelled before the image was generated; nothing was paid for.", level="WARNING"
    )
    if hub is not None and not cancelled.workflow:
        with contextlib.suppress(PluginError):  # best effort: the run is cancelled either way
            hub.plugin_response(cancelled.session, error=True)
    return CancelOutcome(run.task_id, True, RunStatus.CANCELLED.value)


def _stop_finished_executions(session: str, deps: StepDeps) -> None:
    """An execution whose every task has ended is stopped at once, rather than sleeping out a Wait."""
    starter = required(deps.starter, "StepDeps.starter")
    runs = deps.runs.list_session(session)
    executions: dict[str, list[RunRecord]] = {}
    for run in runs:
        arn = starter.arn_of(run.owner) if run.owner else run.execution_arn
        if arn:
            executions.setdefault(arn, []).append(run)
    for arn, owned in executions.items():
        if all(r.status.finished for r in owned):
            starter.stop(arn, "Every task of this request was cancelled or had ended.")
