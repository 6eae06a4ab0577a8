"""Batches too large for the API to store in its time: the API keeps the accepted request (``hand_off``) and
starts one starter execution for it; the starter's step (``store_batch``) stores the runs and starts their
executions a few chunks at a time, through the same ``store_and_start`` as the API. docs/batches.md."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from dalle_plugin.domain.cancel import cancel_runs
from dalle_plugin.domain.errors import BatchHeldTooLong, PluginError
from dalle_plugin.domain.payload import BatchTask
from dalle_plugin.domain.run import RunRecord, RunStatus
from dalle_plugin.domain.step_io.failure import StepError
from dalle_plugin.domain.steps.failure import describe_failure
from dalle_plugin.domain.steps.machinery import ANGO_KEY, StepDeps, required
from dalle_plugin.domain.steps.start import (
    PARALLEL_CALLS,
    AcceptedRequest,
    _chunks,
    _name,
    session_prefix,
    store_and_start,
)

if TYPE_CHECKING:
    from dalle_plugin.ports import BatchProgress

#: seconds the starter's step keeps in hand when it begins another group of chunks: a group of
#: ``PARALLEL_CALLS`` chunks takes well under this even on DynamoDB Local (about 1 s a chunk there)
GROUP_RESERVE_S = 30.0

#: a starter held by the cap on executions in flight looks again after this many seconds, doubling up to
#: ``HOLD_MAX_S``: soon when executions are short, and few history events when they are long (a look is 9
#: events: 48 hours held are under 6,000 of the 25,000; docs/batches.md)
HOLD_FIRST_S = 5
HOLD_MAX_S = 300


@dataclass(frozen=True)
class InFlightCap:
    """How many run executions of its session an own-key batch keeps running at once (0: no cap), and how
    long its starter may wait for room: a little less than its own execution's ``TimeoutSeconds``, so that
    a starter held that long ends its attempt with a sentence instead of timing out without one."""

    executions: int = 0
    give_up_after_s: float = float("inf")


#: what makes one request's digest: the same tasks and options make the same digest, whatever the time
_VOLATILE = {"sealed_secrets", "created_at_ms", "accepted_at_ms", "updated_at_ms", "expires_at", "timeline"}
_PER_TASK = {"task_id", "asset_id", "data_url", "execution_name", "owner", "chunk"}


class BatchStep(BaseModel):
    """The starter execution's input, and its step's output: which request, which attempt, how far."""

    model_config = ConfigDict(populate_by_name=True)
    session: str
    request: str = Field(description="The accepted request's key in the bucket.")
    digest: str
    attempt: int = Field(ge=1)
    next_chunk: int = Field(default=0, alias="nextChunk", ge=0)
    done: bool = False
    #: when the first call began (the clock of ``give_up_after_s``)
    began_at_ms: int | None = Field(default=None, alias="beganAtMs")
    #: seconds the state machine waits before the next call (0: at once), and how many waits in a row
    hold_seconds: int = Field(default=0, alias="holdSeconds", ge=0)
    holds: int = Field(default=0, ge=0)
    #: whether the request calls OpenAI with its own key (the cap on executions in flight applies), set at
    #: hand-off so a held look counts room without reading and opening the request; None: a step written
    #: before this field, whose first call reads the request to learn it
    own_key: bool | None = Field(default=None, alias="ownKey")
    error: StepError | None = Field(default=None, description="Set by the Catch: the starter failed.")


@dataclass
class HandOff:
    step: BatchStep
    accepted: int
    duplicate: bool  # an attempt at this request was under way, or one stored it all and nothing runs again
    #: a late duplicate's tasks as they stand (task id -> status); None when the starter is at work
    statuses: dict[str, str] | None = None


def request_digest(request: AcceptedRequest) -> str:
    prototype = request.prototype.model_dump(mode="json", exclude=_VOLATILE | _PER_TASK)
    tasks = [task.model_dump(mode="json") for task in request.tasks]
    raw = json.dumps([prototype, tasks], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def starter_name(session: str, digest: str, attempt: int) -> str:
    """One name per (session, request, attempt): a duplicate or concurrent POST, or the hub's resend after
    an API that died, starts the attempt under way (Step Functions starts a name once)."""
    return _name("batch", session, [digest, str(attempt)])


def _encode(request: AcceptedRequest) -> bytes:
    prototype = request.prototype.model_dump(mode="json", by_alias=True, exclude={"sealed_secrets"})
    sealed = base64.b64encode(request.prototype.sealed_secrets or b"").decode()
    tasks = [task.model_dump(mode="json", by_alias=True, exclude_none=True) for task in request.tasks]
    return json.dumps({"prototype": prototype, "sealed": sealed, "tasks": tasks}).encode()


def _decode(body: bytes, deps: StepDeps) -> AcceptedRequest:
    """The request as the API accepted it; the hub key is opened from the sealed secrets, never stored."""
    stored = json.loads(body)
    sealed = base64.b64decode(stored["sealed"])
    prototype = RunRecord.model_validate(stored["prototype"] | {"sealedSecrets": sealed})
    api_key = deps.vault.open(sealed, {"session": prototype.session})[ANGO_KEY]
    tasks = [BatchTask.model_validate(task) for task in stored["tasks"]]
    return AcceptedRequest(prototype=prototype, tasks=tasks, api_key=api_key)


def _settled(request: AcceptedRequest, digest: str, deps: StepDeps) -> dict[str, str] | None:
    """A late duplicate: an attempt stored every task of this request, and none of them failed or was
    cancelled, so sending it again runs nothing (a prompt edited since is run again in a new session, as
    for any batch larger than ``MAX_PROMPT_CHECKS``): its tasks' statuses. Else None. One Query of the
    progress, and only after a finished attempt a read of the session's states."""
    progress = required(deps.batch_progress, "StepDeps.batch_progress")
    session = request.prototype.session
    before = next((b for b in progress.of_session(session) if b.digest == digest), None)
    if before is None or before.ended_by is not None or before.stored < before.accepted:
        return None
    if deps.session_pages is None:
        return None
    wanted = {task.task_id for task in request.tasks}
    statuses = {t.task_id: t.status for t in deps.session_pages.tallies(session) if t.task_id in wanted}
    if len(statuses) < len(wanted) or any(
        s in (RunStatus.FAILED, RunStatus.CANCELLED) for s in statuses.values()
    ):
        return None
    return {task_id: status.value for task_id, status in statuses.items()}


def hand_off(request: AcceptedRequest, deps: StepDeps) -> HandOff:
    """Keep the request and start its starter execution: three writes and one start, whatever its size.

    The request is written before the attempt begins, so a starter always finds it; a duplicate overwrites
    it with the same tasks and options (its own sealed secrets, as good)."""
    session = request.prototype.session
    digest = request_digest(request)
    own_key = not request.prototype.uses_default_key
    key = f"batches/{hashlib.sha256(session.encode()).hexdigest()[:32]}/{digest}.json"
    settled = _settled(request, digest, deps)
    if settled is not None:
        step = BatchStep(session=session, request=key, digest=digest, attempt=1, done=True, own_key=own_key)
        return HandOff(step=step, accepted=len(request.tasks), duplicate=True, statuses=settled)
    required(deps.batch_requests, "StepDeps.batch_requests").put(key, _encode(request))
    progress = required(deps.batch_progress, "StepDeps.batch_progress")
    expires_at = required(request.prototype.expires_at, "the request's expiry")
    state, before = progress.begin(session, digest, len(request.tasks), expires_at)
    step = BatchStep(session=session, request=key, digest=digest, attempt=state.attempt, own_key=own_key)
    required(deps.batch_starter, "StepDeps.batch_starter").start(
        starter_name(session, digest, state.attempt), step.model_dump(by_alias=True, exclude_none=True)
    )
    joined = before is not None and before.attempt == state.attempt
    return HandOff(step=step, accepted=len(request.tasks), duplicate=joined)


def store_batch(
    step: BatchStep,
    deps: StepDeps,
    tasks_per_execution: int,
    seconds_left: Callable[[], float],
    cap: InFlightCap = InFlightCap(),
) -> tuple[BatchStep, int]:
    """Store and start the request's chunks from ``next_chunk``, ``PARALLEL_CALLS`` at a time, while time
    is left and (for an own-key batch) while the cap on executions in flight leaves room; returns how far it
    got and how many tasks it started (for ``RunsAccepted``). Each group is safe to repeat (a retried step,
    a later attempt): stored runs are found, named executions exist.

    A look that finds no room costs the progress Query and the count only: the request (an S3 read and a
    KMS open) is read when chunks will start, or first for a step without ``own_key`` (an older hand-off)."""
    progress = required(deps.batch_progress, "StepDeps.batch_progress")
    if _ended(step, progress):  # cancelled (or failed) before this call: store nothing more
        return step.model_copy(update={"done": True, "hold_seconds": 0}), 0
    began = step.began_at_ms if step.began_at_ms is not None else deps.clock.now_ms()
    request: AcceptedRequest | None = None
    if step.own_key is None:
        request = _read(step, deps)
        if request is None:
            return step.model_copy(update={"done": True, "hold_seconds": 0}), 0
        step = step.model_copy(update={"own_key": not request.prototype.uses_default_key})
    room = _room(step, deps, cap)
    if room == 0:
        if (deps.clock.now_ms() - began) / 1000 > cap.give_up_after_s:
            raise BatchHeldTooLong(
                f"its runs in flight did not make room for the rest within {_hours(cap.give_up_after_s)}"
            )
        hold = min(HOLD_MAX_S, HOLD_FIRST_S * 2**step.holds)
        return step.model_copy(
            update={"began_at_ms": began, "hold_seconds": hold, "holds": step.holds + 1}
        ), 0
    if request is None:
        request = _read(step, deps)
        if request is None:
            return step.model_copy(update={"done": True, "hold_seconds": 0}), 0
    chunks = _chunks(request.tasks, tasks_per_execution)
    last = len(chunks) if room is None else min(len(chunks), step.next_chunk + room)
    index, started = step.next_chunk, 0
    while index < last and (index == step.next_chunk or seconds_left() > GROUP_RESERVE_S):
        end = min(index + PARALLEL_CALLS, last)
        group = [task for chunk in chunks[index:end] for task in chunk]
        outcome = store_and_start(
            AcceptedRequest(prototype=request.prototype, tasks=group, api_key=request.api_key),
            deps,
            tasks_per_execution,
        )
        started += len(outcome.started)
        index = end
        if not progress.stored(step.session, step.digest, step.attempt, sum(map(len, chunks[:index]))):
            # A cancel came while this group was stored: it may have listed the session before these runs
            # existed, so they are cancelled here (those it did see are told they were already).
            cancel_runs(outcome.runs, deps)
            return step.model_copy(update={"next_chunk": index, "done": True, "hold_seconds": 0}), started
    done = index >= len(chunks)
    # Capped, the next count comes after a short wait: the listing may not show what was just started yet.
    hold = HOLD_FIRST_S if room is not None and not done else 0
    after = {"next_chunk": index, "done": done, "began_at_ms": began, "hold_seconds": hold, "holds": 0}
    return step.model_copy(update=after), started


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.0f} hours" if seconds >= 7200 else f"{seconds / 60:.0f} minutes"


def _read(step: BatchStep, deps: StepDeps) -> AcceptedRequest | None:
    """The accepted request, its hub key opened (an S3 GetObject and a KMS Decrypt); None when it expired
    with the bucket's lifecycle (7 days; a starter runs at most ``ExecutionTimeoutSeconds``, 48 h by
    default), so there is nothing left to store."""
    body = required(deps.batch_requests, "StepDeps.batch_requests").get(step.request)
    return None if body is None else _decode(body, deps)


def _room(step: BatchStep, deps: StepDeps, cap: InFlightCap) -> int | None:
    """How many more chunks may start now; None when uncapped. Shared-key batches are not capped: the
    shared key's queue paces their sends, and refuses at once the runs it would hold past its cap, which
    only works if they reach it (a held chunk would wait unrefused). Own-key runs all call OpenAI at once
    and hold Generate's environments, so an own-key batch of thousands would otherwise ask for far more
    invocations than its functions can run (docs/batches.md)."""
    if cap.executions <= 0 or not step.own_key:
        return None
    running = required(deps.starter, "StepDeps.starter").running(session_prefix(step.session))
    return max(0, cap.executions - running)


def _ended(step: BatchStep, progress: BatchProgress) -> bool:
    return any(
        b.digest == step.digest and b.attempt == step.attempt and b.ended_by is not None
        for b in progress.of_session(step.session)
    )


def record_batch_failure(step: BatchStep, deps: StepDeps) -> BatchStep:
    """The starter failed after its retries: end the attempt with a sentence (so the session says what
    happened and a resend begins a new attempt), and tell the hub, as Record Failure does for a run. The
    runs already stored keep going; the resend stores the rest and finds those again."""
    error = required(step.error, "the starter's error")
    progress = required(deps.batch_progress, "StepDeps.batch_progress")
    state = next((b for b in progress.of_session(step.session) if b.digest == step.digest), None)
    stored, accepted = (state.stored, state.accepted) if state else (0, 0)
    why = (
        f"The batch stopped being stored after {stored} of its {accepted} tasks "
        f"({describe_failure(error.error, error.cause).message.rstrip('.')}). The tasks stored keep running; "
        "send the batch again to store and run the rest: no task runs twice."
    )[:1000]
    if progress.end(step.session, step.digest, step.attempt, "failed", why):
        _tell_hub(step, why, deps)
    return step.model_copy(update={"done": True})


def _tell_hub(step: BatchStep, why: str, deps: StepDeps) -> None:
    """Best effort, as every hub call of a failing run: the session shows the sentence either way."""
    try:
        body = required(deps.batch_requests, "StepDeps.batch_requests").get(step.request)
        if body is None:
            return
        request = _decode(body, deps)
        hub = deps.hub_for(request.prototype, request.api_key)
        hub.plugin_log(step.session, why, level="ERROR")
        if not request.prototype.workflow:
            hub.plugin_response(step.session, error=True)
    except PluginError:
        return
