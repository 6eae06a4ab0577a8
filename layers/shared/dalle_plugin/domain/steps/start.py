"""The API's step: validate a hub request, create (or requeue) its runs, and start the execution that owns
them, exactly once however often the request arrives."""

import datetime as dt
import hashlib
import re
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NamedTuple

from dalle_plugin.domain.config import parse_config_json, validate_run_options
from dalle_plugin.domain.errors import InvalidRequest, PluginError, PromptNotFound
from dalle_plugin.domain.payload import MAX_BATCH_TASKS, BatchTask, HubPayload
from dalle_plugin.domain.run import ModelInfo, RunRecord, RunRef, RunStatus, TimelineEntry
from dalle_plugin.domain.steps.machinery import ANGO_KEY, OPENAI_KEY, StepDeps, image_fingerprint, required
from dalle_plugin.port_records import RateJoin


class SessionStart(NamedTuple):  # records are NamedTuples: a dataclass compiles its methods at import
    session: str
    runs: list[RunRecord]
    started: list[str]  # task ids this request started (empty for a duplicate of a running request)
    execution_arn: str | None = None
    #: task ids handed to the batch starter, to be stored and started after the answer
    storing: tuple[str, ...] | list[str] = ()
    duplicate: bool = False  # handed to a starter that was already at work on the same request
    #: a large batch sent again after it was stored, with nothing to run again: its tasks' statuses
    settled: dict[str, str] | None = None


class _Requeue:
    """The write that runs a task again, if it still may be (a concurrent request may have done it first);
    ``done`` says whether this write was the one that did, so that only one request counts it."""

    def __init__(
        self,
        may_rerun: Callable[[RunRecord], bool],
        sealed: bytes,
        now: int,
        place: Callable[[RunRecord], RunRecord],
        why: str = "",
    ):
        self.may_rerun, self.sealed, self.now, self.place, self.why = may_rerun, sealed, now, place, why
        self.done = False

    def __call__(self, run: RunRecord) -> None:
        self.done = self.may_rerun(run)
        if self.done:
            _requeue(run, self.sealed, self.now, self.why)
            # a new generation: a new place in the shared key's queue, at the back of its line
            self.place(run)


def _ended_unsuccessfully(run: RunRecord) -> bool:
    return run.status in (RunStatus.FAILED, RunStatus.CANCELLED)


def _requeue(run: RunRecord, sealed: bytes, now: int, why: str) -> None:
    """A re-run of a task: a new generation, the same stored image (never paid twice, and kept when the
    prompt turns out unchanged), and no owner yet: the request that requeued it claims it for the execution
    it starts."""
    run.generation += 1
    run.status = RunStatus.QUEUED
    run.owner = None
    run.chunk = []
    run.failure = None
    run.rate_wait = None
    run.rate_ticket = run.rate_refused_ms = None
    run.rate_view = ""
    run.no_offer_at_accept = False  # its task may have an image on offer now: Generate looks
    run.execution_arn = None
    run.sealed_secrets = sealed
    run.updated_at_ms = now
    run.accepted_at_ms = now
    run.upstream_rate_limited = 0
    run.held = []  # the earlier generation's grants were spent or given back; this one asks afresh
    # The person re-running was told to when the hub did not confirm a change: send it again this time.
    run.finish_sent_at_ms = None
    if run.image is not None and not run.image.attached:
        run.image.attach_sent_at_ms = None
    run.timeline.append(
        TimelineEntry(
            step="queued",
            status=RunStatus.QUEUED.value,
            at_ms=now,
            detail=f"Run again (attempt {run.generation + 1}){why}.",
        )
    )


#: tasks one execution runs: its history (about 40 events a task) and input stay far inside Step Functions'
#: 25,000 events and 256 KiB (100 task ids of at most 256 characters are 30 KB); docs/batches.md
TASKS_PER_EXECUTION = 100
#: chunks the API stores and starts itself (the editor's single run, a small batch): about a second on
#: DynamoDB Local; a larger request goes to the batch starter (``batch_start``), so the POST's time does
#: not grow with it
DIRECT_CHUNKS = 1
#: AWS calls a request has in flight at once: a 10,000-task batch is 100 writes and 100 starts, so about
#: 13 round trips each way instead of 200
PARALLEL_CALLS = 8


def session_prefix(session: str) -> str:
    """What the name of every execution of ``session`` begins with (sessions sharing their first 40
    characters share it)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", session[:40]) + "_"


def _name(kind: str, session: str, identity: list[str]) -> str:
    digest = hashlib.sha256("\x00".join([kind, session, *sorted(identity)]).encode()).hexdigest()[:24]
    return f"{session_prefix(session)}{kind[0]}{len(identity)}_{digest}"


def execution_name(session: str, runs: list[RunRecord]) -> str:
    """The execution that claims these requeued runs: named after each run's (task, generation), a pair
    claimed at most once ever, so the name is never reused for other work. Within 80 characters."""
    return _name("rerun", session, [f"{r.task_id}\x00{r.generation}" for r in runs])


def creation_owner(session: str, task_ids: list[str]) -> str:
    """The execution that owns the runs a request creates, written with each run as it is created:
    deterministic, so a duplicate of the request (at once or later) names the same execution."""
    return _name("new", session, task_ids)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _in_parallel(call: Callable[[Any], Any], items: list) -> list:
    """``call`` over ``items``, a few at a time, results in order (the first error is raised)."""
    if len(items) <= 1:
        return [call(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor  # a batch's: one run's request never starts a thread

    with ThreadPoolExecutor(max_workers=min(PARALLEL_CALLS, len(items))) as pool:
        return list(pool.map(call, items))


def _listed_tasks(payload: HubPayload, deps: StepDeps) -> list[BatchTask]:
    """The tasks of the payload's ``batches``, as the hub lists them (none when it names no batch)."""
    if not payload.batches:
        return []
    caller = SimpleNamespace(plugin_id=payload.plugin_id, org_id=payload.org_id, run_by=payload.run_by)
    hub = deps.hub_for(caller, payload.api_key.get_secret_value())
    try:
        listed = hub.list_batch_tasks(payload.project_id, payload.batches, MAX_BATCH_TASKS + 1)
    except PluginError as exc:
        raise InvalidRequest(
            f"Could not list the tasks of the batches {', '.join(payload.batches)}: {exc.message}",
            field="batches",
        ) from None
    if len(listed) > MAX_BATCH_TASKS:
        raise InvalidRequest(
            f"The batches {', '.join(payload.batches)} hold more than {MAX_BATCH_TASKS} tasks, more than one "
            "run may take: run the plugin on fewer batches at a time.",
            field="batches",
        )
    # in task id order: a duplicate of the request forms the same chunks, so names the same executions
    return sorted(
        (BatchTask(task_id=t.task_id, asset_id=t.asset_id) for t in listed), key=lambda t: t.task_id
    )


#: finished runs a request re-reads the prompt of: a same-session re-run is a person's, of a few tasks;
#: the reads stay within the API's hub budget (a larger batch is re-run in a new session)
MAX_PROMPT_CHECKS = 100


def _prompt_changed(run: RunRecord, api_key: str, deps: StepDeps) -> bool:
    """Whether the task's prompt on the hub now asks for another image than the one the run delivered.
    A hub that cannot be read in the API's budget leaves the run as it is: the person can run it again."""
    if run.image is None or run.image.fingerprint is None:
        return False
    # Extract's reading of the prompt, loaded only here: a request that re-runs no delivered task never
    # reads a prompt
    from dalle_plugin.domain.steps.extract import read_prompt

    try:
        prompt = read_prompt(run, deps.hub_for(run, api_key))
    except PluginError:
        return False
    return image_fingerprint(run.model_copy(update={"prompt": prompt})) != run.image.fingerprint


class _Owned(Exception):
    pass


def _claim(owner: str, chunk: list[str]) -> Callable[[RunRecord], None]:
    def claim(run: RunRecord) -> None:
        if run.status is not RunStatus.QUEUED or run.owner is not None:
            raise _Owned(run.owner or "")
        run.owner = owner
        run.chunk = chunk

    return claim


class AcceptedRequest(NamedTuple):
    """A request validated, its tasks listed and its secrets sealed: what storing its runs needs, whether the
    API stores them itself or hands them to the batch starter (``batch_start``)."""

    prototype: RunRecord  # every run of the request is this record with its own task
    tasks: list[BatchTask]
    api_key: str  # the hub key, to re-read the prompt of a delivered task sent again


def accept_request(payload: HubPayload, deps: StepDeps, today: dt.date | None = None) -> AcceptedRequest:
    """Validate everything that can be validated before money is spent, list the batches' tasks and seal
    the secrets. Nothing is stored yet."""
    config = parse_config_json(payload.config_json)
    options = validate_run_options(
        config, deps.model_successors, today or dt.datetime.now(dt.UTC).date(), deps.image_prices
    )
    needs_class = config.get_prompt_from in ("entity-annotation", "text-annotation")
    if needs_class and not payload.prompt_class_ids:
        kind = "entity" if config.get_prompt_from == "entity-annotation" else "text classification"
        raise PromptNotFound(
            f"get_prompt_from is '{config.get_prompt_from}' but no class is mapped to the plugin's Prompt class. "
            f"In the plugin settings, map Prompt to the {kind} class that holds the prompt."
        )

    tasks = payload.batch_tasks(_listed_tasks(payload, deps))
    now = deps.clock.now_ms()
    secrets = {ANGO_KEY: payload.api_key.get_secret_value()}
    if not config.uses_default_key:
        secrets[OPENAI_KEY] = config.openai_api_key.get_secret_value()
    sealed = deps.vault.seal(secrets, {"session": payload.session})
    prototype = _new_record(payload, tasks[0], config, options, sealed, now, deps, owner="", chunk=[])
    return AcceptedRequest(prototype=prototype, tasks=tasks, api_key=payload.api_key.get_secret_value())


def goes_to_starter(request: AcceptedRequest, tasks_per_execution: int) -> bool:
    return len(request.tasks) > DIRECT_CHUNKS * tasks_per_execution


def start_session(
    payload: HubPayload,
    deps: StepDeps,
    today: dt.date | None = None,
    tasks_per_execution: int = TASKS_PER_EXECUTION,
) -> SessionStart:
    """Accept the request and see that every task needing a run is owned by exactly one execution, and that
    execution started (``store_and_start``): here, for a request of at most ``DIRECT_CHUNKS`` chunks; a
    larger one is handed to the batch starter (when the deployment has one), so the POST's time and AWS
    calls do not grow with the batch."""
    request = accept_request(payload, deps, today)
    if deps.batch_starter is not None and goes_to_starter(request, tasks_per_execution):
        # loaded for a large batch only: a run or a small batch never needs the starter's module
        from dalle_plugin.domain.steps.batch_start import hand_off

        handed = hand_off(request, deps)
        return SessionStart(
            session=handed.step.session,
            runs=[],
            started=[],
            storing=[] if handed.statuses is not None else [task.task_id for task in request.tasks],
            duplicate=handed.duplicate,
            settled=handed.statuses,
        )
    return store_and_start(request, deps, tasks_per_execution)


def run_of(prototype: RunRecord, task: BatchTask, owner: str, chunk: list[str]) -> RunRecord:
    """The request's run for one task: the prototype with the task's ids and its owner."""
    ref = RunRef(session=prototype.session, task_id=task.task_id)
    return prototype.model_copy(
        update={
            "task_id": task.task_id,
            "execution_name": ref.execution_name,
            "asset_id": task.asset_id,
            "data_url": task.data_url,
            "owner": owner,
            "chunk": chunk,
        },
        deep=True,
    )


def store_and_start(
    request: AcceptedRequest, deps: StepDeps, tasks_per_execution: int = TASKS_PER_EXECUTION
) -> SessionStart:
    """Store the request's runs (or requeue those that may run again), give each an owner, and start every
    owner with queued runs. The one place runs are stored, whether by the API or by the batch starter.

    Ownership comes first, by conditional writes; starting comes after and is idempotent (the owner's name
    is deterministic), so a duplicate request, a concurrent one, or one after an API that died anywhere in
    between, starts nothing twice: at worst it starts the owner the dead request never got to start."""
    prototype, tasks = request.prototype, request.tasks
    session = prototype.session
    sealed = required(prototype.sealed_secrets, "the request's sealed secrets")
    now = required(prototype.accepted_at_ms, "the request's acceptance time")
    runs: list[RunRecord] = []
    started: list[str] = []  # created or requeued by this request: what it, and only it, counts as accepted
    queue = join_shared_queue(prototype, [task.task_id for task in tasks], deps, now)

    def create(chunk: list[BatchTask]) -> list[tuple[RunRecord, bool]]:
        members = [task.task_id for task in chunk]
        owner = creation_owner(session, members)
        return deps.runs.create_many([queue.place(run_of(prototype, task, owner, members)) for task in chunk])

    for created_chunk in _in_parallel(create, _chunks(tasks, tasks_per_execution)):
        for record, is_new in created_chunk:
            stored, created = record, is_new
            if not is_new and _ended_unsuccessfully(record):
                requeue = _Requeue(_ended_unsuccessfully, sealed, now, queue.place)
                stored = deps.runs.update(record.session, record.task_id, requeue)
                created = requeue.done
            if created:
                started.append(stored.task_id)
            runs.append(stored)
    # A task sent again in the same session after it succeeded runs again only if its prompt was edited:
    # the same prompt is a duplicate (its image is delivered), so nothing is started for it.
    delivered = [run for run in runs if run.status is RunStatus.SUCCEEDED][:MAX_PROMPT_CHECKS]
    api_key = request.api_key
    changed = _in_parallel(lambda run: _prompt_changed(run, api_key, deps), delivered)
    by_task = {run.task_id: index for index, run in enumerate(runs)}
    for run in (run for run, edited in zip(delivered, changed, strict=True) if edited):

        def unchanged_since_read(r: RunRecord, read: RunRecord = run) -> bool:
            """Unless the run moved on since it was read (a concurrent request requeued it first)."""
            return r.status is RunStatus.SUCCEEDED and r.generation == read.generation

        requeue = _Requeue(
            unchanged_since_read,
            sealed,
            now,
            queue.place,
            ": the prompt changed on the hub",
        )
        runs[by_task[run.task_id]] = deps.runs.update(run.session, run.task_id, requeue)
        if requeue.done:
            started.append(run.task_id)
    # tickets of tasks this request neither created nor requeued go back to the line
    queue.give_back_unused(set(started))
    # Requeued runs (and any an earlier request requeued and died before claiming) get a new owner.
    unowned = [run for run in runs if run.status is RunStatus.QUEUED and run.owner is None]
    for chunk in _chunks(unowned, tasks_per_execution):
        owner = execution_name(session, chunk)
        members = [run.task_id for run in chunk]
        for run in chunk:
            try:
                runs[by_task[run.task_id]] = deps.runs.update(
                    run.session, run.task_id, _claim(owner, members)
                )
            except _Owned:  # a concurrent request claimed it first: its execution runs it
                runs[by_task[run.task_id]] = deps.runs.get(run.session, run.task_id) or run
    # Start every owner with queued runs. Its name is fixed, so starting it again is harmless: the execution
    # exists (Step Functions answers with it, or ExecutionAlreadyExists), or a request died before starting it.
    # It starts with the members stored with its runs, not with this request's tasks: a request that names
    # only some of them (after one that died before starting it) must not leave the others queued for ever.
    waiting: dict[str, list[str]] = {}
    for run in runs:
        if run.status is RunStatus.QUEUED and run.owner:
            if run.chunk:
                waiting[run.owner] = run.chunk
            else:  # stored before runs recorded their owner's members
                waiting.setdefault(run.owner, []).append(run.task_id)

    def start(owner_and_tasks: tuple[str, list[str]]) -> str:
        owner, task_ids = owner_and_tasks
        return required(deps.starter, "StepDeps.starter").start(
            owner, {"session": session, "tasks": [{"taskId": t} for t in task_ids]}
        )

    arns = _in_parallel(start, list(waiting.items()))
    return SessionStart(session=session, runs=runs, started=started, execution_arn=arns[-1] if arns else None)


class SharedQueuePlaces:
    """The tickets a request's shared-key runs took in their line at acceptance (``domain.rate_limit``):
    one join for the whole batch, in task order; tickets of tasks this request did not create go back."""

    def __init__(
        self,
        line: tuple[str, bool] | None,
        task_ids: list[str],
        joined: RateJoin | None,
        now_ms: int,
        leave: Callable[[str, bool, int, int], None] | None = None,
    ):
        self._line, self._joined, self._now, self._leave = line, joined, now_ms, leave
        self._index = {task_id: i for i, task_id in enumerate(task_ids)}

    def place(self, run: RunRecord) -> RunRecord:
        if self._joined is None or run.task_id not in self._index:
            return run
        i = self._index[run.task_id]
        if i < self._joined.admitted:
            run.rate_ticket, run.rate_view = self._joined.first_ticket + i, self._joined.view
        else:
            run.rate_refused_ms = max(0, self._joined.starts_at_ms[i] - self._now)
        return run

    def give_back_unused(self, started: set[str]) -> None:
        """Tickets of tasks that already had a run this request did not start again (a duplicate request, a
        delivered image whose prompt is unchanged): out of the line, as ranges."""
        if self._line is None or self._leave is None or self._joined is None:
            return
        admitted = self._joined.admitted
        unused = sorted(
            self._joined.first_ticket + i
            for task_id, i in self._index.items()
            if i < admitted and task_id not in started
        )
        for first, count in _ranges(unused):
            self._leave(self._line[0], self._line[1], first, count)


def _ranges(tickets: list[int]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for ticket in tickets:
        if ranges and ranges[-1][0] + ranges[-1][1] == ticket:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + 1)
        else:
            ranges.append((ticket, 1))
    return ranges


def join_shared_queue(
    prototype: RunRecord, task_ids: list[str], deps: StepDeps, now_ms: int
) -> SharedQueuePlaces:
    """The batch's runs join their line of the shared key's queue in one write, in task order (first come,
    first served by the hub's acceptance); those whose turn would pass the cap get no ticket. A batch the
    starter stores joins once per group of chunks it stores."""
    if not prototype.uses_default_key or deps.limiter is None or not task_ids:
        return SharedQueuePlaces(None, task_ids, None, now_ms)
    line = (prototype.org_id or "", not prototype.workflow)
    joined = deps.limiter.join(line[0], line[1], len(task_ids))
    return SharedQueuePlaces(line, task_ids, joined, now_ms, deps.limiter.leave)


def _new_record(
    payload: HubPayload,
    task: Any,
    config: Any,
    options: Any,
    sealed: bytes,
    now: int,
    deps: StepDeps,
    owner: str,
    chunk: list[str],
) -> RunRecord:
    ref = RunRef(session=payload.session, task_id=task.task_id)
    return RunRecord(
        session=ref.session,
        task_id=ref.task_id,
        execution_name=ref.execution_name,
        owner=owner,
        chunk=chunk,
        project_id=payload.project_id,
        asset_id=task.asset_id,
        data_url=task.data_url,
        workflow=payload.is_workflow_run,
        org_id=payload.org_id,
        run_by=payload.run_by,
        plugin_id=payload.plugin_id,
        prompt_class_ids=payload.prompt_class_ids,
        prompt_source=config.get_prompt_from,
        model=ModelInfo(
            requested=options.model.requested,
            actual=options.model.actual,
            substituted=options.model.substituted,
            note=options.model.note,
        ),
        size=options.image.size,
        quality=options.image.quality,
        max_prompt_chars=options.max_prompt_chars,
        uses_default_key=config.uses_default_key,
        notes=list(options.notes),
        prompt_template=options.prompt_template,
        images_per_task=options.output.images_per_request,
        output_format=options.output.output_format,
        output_compression=options.output.output_compression,
        background=options.output.background,
        max_cost_usd=options.max_cost_usd,
        cost_per_image_usd=options.cost_per_image_usd,
        sealed_secrets=sealed,
        created_at_ms=now,
        accepted_at_ms=now,
        updated_at_ms=now,
        expires_at=now // 1000 + deps.run_ttl_days * 86_400,
        timeline=[TimelineEntry(step="queued", status=RunStatus.QUEUED.value, at_ms=now)],
    )
