"""Batches too large for the API to store in its time: the API keeps the accepted request (``hand_off``) and
starts one starter execution for it; the starter's step (``store_batch``) stores the runs and starts their
executions a few chunks at a time, through the same ``store_and_start`` as the API. docs/batches.md."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from dalle_plugin.domain.payload import BatchTask
from dalle_plugin.domain.run import RunRecord
from dalle_plugin.domain.steps.machinery import ANGO_KEY, StepDeps, required
from dalle_plugin.domain.steps.start import (
    PARALLEL_CALLS,
    AcceptedRequest,
    _chunks,
    _name,
    store_and_start,
)

#: chunks the API stores and starts itself (the editor's single run, a small batch): about a second on
#: DynamoDB Local; a larger request goes to the batch starter, so the POST's time does not grow with it
DIRECT_CHUNKS = 1
#: seconds the starter's step keeps in hand when it begins another group of chunks: a group of
#: ``PARALLEL_CALLS`` chunks takes well under this even on DynamoDB Local (about 1 s a chunk there)
GROUP_RESERVE_S = 30.0

#: what makes one request's digest: the same tasks and options make the same digest, whatever the time
_VOLATILE = {"sealed_secrets", "created_at_ms", "accepted_at_ms", "updated_at_ms", "expires_at", "timeline"}
_PER_TASK = {"task_id", "asset_id", "data_url", "execution_name", "owner", "chunk"}


def goes_to_starter(request: AcceptedRequest, tasks_per_execution: int) -> bool:
    return len(request.tasks) > DIRECT_CHUNKS * tasks_per_execution


class BatchStep(BaseModel):
    """The starter execution's input, and its step's output: which request, which attempt, how far."""

    model_config = ConfigDict(populate_by_name=True)
    session: str
    request: str = Field(description="The accepted request's key in the bucket.")
    digest: str
    attempt: int = Field(ge=1)
    next_chunk: int = Field(default=0, alias="nextChunk", ge=0)
    done: bool = False


@dataclass
class HandOff:
    step: BatchStep
    accepted: int
    duplicate: bool  # an attempt at this request was already under way


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


def hand_off(request: AcceptedRequest, deps: StepDeps) -> HandOff:
    """Keep the request and start its starter execution: three writes and one start, whatever its size.

    The request is written before the attempt begins, so a starter always finds it; a duplicate overwrites
    it with the same tasks and options (its own sealed secrets, as good)."""
    session = request.prototype.session
    digest = request_digest(request)
    key = f"batches/{hashlib.sha256(session.encode()).hexdigest()[:32]}/{digest}.json"
    required(deps.batch_requests, "StepDeps.batch_requests").put(key, _encode(request))
    progress = required(deps.batch_progress, "StepDeps.batch_progress")
    expires_at = required(request.prototype.expires_at, "the request's expiry")
    state, fresh = progress.begin(session, digest, len(request.tasks), expires_at)
    step = BatchStep(session=session, request=key, digest=digest, attempt=state.attempt)
    required(deps.batch_starter, "StepDeps.batch_starter").start(
        starter_name(session, digest, state.attempt), step.model_dump(by_alias=True)
    )
    return HandOff(step=step, accepted=len(request.tasks), duplicate=not fresh)


def store_batch(
    step: BatchStep, deps: StepDeps, tasks_per_execution: int, seconds_left: Callable[[], float]
) -> tuple[BatchStep, int]:
    """Store and start the request's chunks from ``next_chunk``, ``PARALLEL_CALLS`` at a time, while time
    is left; returns how far it got and how many tasks it started (for ``RunsAccepted``). Each group is
    safe to repeat (a retried step, a later attempt): stored runs are found, named executions exist."""
    body = required(deps.batch_requests, "StepDeps.batch_requests").get(step.request)
    if body is None:  # expired with the bucket's lifecycle: nothing left to store
        return step.model_copy(update={"done": True}), 0
    request = _decode(body, deps)
    progress = required(deps.batch_progress, "StepDeps.batch_progress")
    chunks = _chunks(request.tasks, tasks_per_execution)
    index, started = step.next_chunk, 0
    while index < len(chunks) and (index == step.next_chunk or seconds_left() > GROUP_RESERVE_S):
        group = [task for chunk in chunks[index : index + PARALLEL_CALLS] for task in chunk]
        outcome = store_and_start(
            AcceptedRequest(prototype=request.prototype, tasks=group, api_key=request.api_key),
            deps,
            tasks_per_execution,
        )
        started += len(outcome.started)
        index = min(index + PARALLEL_CALLS, len(chunks))
        progress.stored(step.session, step.digest, step.attempt, sum(map(len, chunks[:index])))
    return step.model_copy(update={"next_chunk": index, "done": index >= len(chunks)}), started
