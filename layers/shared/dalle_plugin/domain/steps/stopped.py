"""End Stopped Runs: the runs of an execution that ended without its Catch path.

An execution stopped from outside (StopExecution by an operator), timed out as a whole (``TimeoutSeconds``)
or failed past its Catch (a history or payload limit) runs no Record Failure, so its runs would stay in
their last status for good: the session never finishes, the hub is never told, and images Generate paid
for and handed to Attach through the state stay unseen at their keys. Step Functions reports every such
end on EventBridge; this ends each run the execution still owned and left unfinished, as Record Failure
would have, with a sentence that says what happened. EventBridge delivers at least once, and a run its
own steps (or the plugin's cancel) ended is left as it is, so a second delivery changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from dalle_plugin.domain.cancel import CANCELLABLE
from dalle_plugin.domain.errors import ExecutionFailed, ExecutionStopped, ExecutionTimedOut, NotRunOwner
from dalle_plugin.domain.run import CamelModel, HeldAllowance, RunRecord, RunRef, RunStatus
from dalle_plugin.domain.spending import release
from dalle_plugin.domain.step_io.failure import FailureInput, StepError
from dalle_plugin.domain.steps.failure import record_failure
from dalle_plugin.domain.steps.machinery import StepDeps, check_owner

if TYPE_CHECKING:
    from dalle_plugin.ports import RunStore

#: the execution statuses whose runs may be stranded (SUCCEEDED and RUNNING never are)
STRANDING_STATUSES = ("TIMED_OUT", "ABORTED", "FAILED")
#: runs of one execution ended side by side: each waits on the hub (a log line, an editor's response)
RUNS_AT_ONCE = 8


class ExecutionTask(CamelModel):
    task_id: str = Field(min_length=1, max_length=256)


class ExecutionInput(CamelModel):
    """What the API starts a run execution with (``start.py``): the session and its chunk of tasks."""

    session: str = Field(min_length=1, max_length=256)
    tasks: list[ExecutionTask] = Field(default_factory=list)


class ExecutionEnded(CamelModel):
    """The ``detail`` of Step Functions' "Execution Status Change" event (times in epoch milliseconds; the
    execution's input as the JSON text it was started with)."""

    execution_arn: str
    name: str = ""
    status: str
    input: str | None = None
    start_date: int | None = None
    stop_date: int | None = None
    error: str | None = None
    cause: str | None = None

    @property
    def minutes(self) -> int | None:
        if self.start_date is None or self.stop_date is None:
            return None
        return max(1, round((self.stop_date - self.start_date) / 60_000))

    def execution_input(self) -> ExecutionInput | None:
        """The runs the execution was started with; None when the event did not carry its input."""
        if not self.input:
            return None
        try:
            return ExecutionInput.model_validate(json.loads(self.input))
        except ValueError:
            return None


class ExecutionStatusChange(BaseModel):
    """The EventBridge event around it (only what is read)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")
    id: str = ""
    detail_type: str = Field(default="", alias="detail-type")
    detail: ExecutionEnded


def stranded_failure(ended: ExecutionEnded) -> StepError:
    """What the execution's end means for a run that was still going: a named error and the sentence a
    person reads, in the form a step's error takes (``Error`` and ``Cause``), for Record Failure's words."""
    if ended.status == "TIMED_OUT":
        minutes = ended.minutes
        after = f" after {minutes} minute{'' if minutes == 1 else 's'}" if minutes else ""
        name = ExecutionTimedOut.__name__
        message = (
            f"The run took longer than the plugin allows a run to take and was stopped{after}, before it "
            "finished. Run the plugin again; if runs keep taking this long, tell the plugin's owner (the "
            "shared OpenAI key's queue or an organisation's daily quota may be holding them up)."
        )
    elif ended.status == "ABORTED":
        name = ExecutionStopped.__name__
        message = (
            "The run was stopped from outside the plugin (in AWS, by the plugin's operators) before it "
            "finished. Run the plugin again if its image is still wanted; ask the plugin's owner why it "
            "was stopped if it happens again."
        )
    else:
        what = f" ({ended.error})" if ended.error else ""
        name = ExecutionFailed.__name__
        message = (
            f"The run's workflow failed{what} before the run could finish or record why. Run the plugin "
            "again; if it keeps happening, tell the plugin's owner."
        )
    return StepError(error=name, cause=json.dumps({"errorMessage": message}))


class _AlreadyEnded(Exception):
    """Refuses the ending write: the run finished since it was read (its own step, or a cancel)."""


class _EndingRuns:
    """The run store as ending a stranded run sees it. A write holds only on a run that has not finished: a
    step invoked before the execution stopped runs on to its end and may finish the run meanwhile, and a
    second delivery of the event finds it ended. The same write takes off the grants of a request that was
    never sent (the run had not reached its send), for the caller to give back: only the writer that
    removed them gives them back, as with a cancel."""

    def __init__(self, runs: RunStore):
        self._runs = runs
        self.given_back: list[HeldAllowance] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runs, name)

    def _ending(self, mutate: Callable[[RunRecord], None]) -> Callable[[RunRecord], None]:
        def ending(run: RunRecord) -> None:
            if run.status.finished:
                raise _AlreadyEnded()
            unsent = run.status in CANCELLABLE
            mutate(run)
            self.given_back = list(run.held) if unsent and run.image is None else []
            if self.given_back:
                run.held = []

        return ending

    def update(self, session: str, task_id: str, mutate: Callable[[RunRecord], None]) -> RunRecord:
        return self._runs.update(session, task_id, self._ending(mutate))

    def change(self, run: RunRecord, mutate: Callable[[RunRecord], None]) -> RunRecord:
        return self._runs.change(run, self._ending(mutate))


def end_stranded_run(ref: RunRef, error: StepError, deps: StepDeps) -> str | None:
    """End one run the execution ``ref.caller`` left unfinished, as Record Failure would have: its reason
    when this call ended it, None when there was nothing to end (finished, cancelled, another's run)."""
    run = deps.runs.get(ref.session, ref.task_id)
    if run is None or run.status.finished:
        return None
    try:
        check_owner(run, ref.caller)
    except NotRunOwner:  # started again by another execution since: its own steps end it
        return None
    ending = _EndingRuns(deps.runs)
    failure = FailureInput(session=ref.session, task_id=ref.task_id, execution=ref.execution, error=error)
    try:
        result = record_failure(failure, replace(deps, runs=ending))
    except _AlreadyEnded:
        return None
    if ending.given_back and deps.allowances is not None:
        release(ending.given_back, deps.allowances)
    return result["reason"] if result["status"] == RunStatus.FAILED.value else None


def end_stranded_runs(ended: ExecutionEnded, deps: StepDeps) -> list[str]:
    """End every run ``ended`` left unfinished: the reasons of those this call ended (one per run)."""
    if ended.status not in STRANDING_STATUSES:
        return []
    started_with = ended.execution_input()
    if started_with is None:
        return []
    error = stranded_failure(ended)
    refs = [
        RunRef(session=started_with.session, task_id=task.task_id, execution=ended.execution_arn)
        for task in started_with.tasks
    ]
    with ThreadPoolExecutor(max(1, min(RUNS_AT_ONCE, len(refs)))) as pool:
        reasons = list(pool.map(lambda ref: end_stranded_run(ref, error, deps), refs))
    return [reason for reason in reasons if reason is not None]
