"""What each step of a run does: start (API), extract, generate, attach, and record a failure.

Each function takes the step's input contract and a ``StepDeps`` of ports, and returns the step's output
contract. They hold the rules that make a run safe to retry: a stored image is never generated again, an
upload or attachment already made is never made again, and every end leaves a readable state.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from dalle_plugin.domain.config import parse_config_json, validate_run_options
from dalle_plugin.domain.errors import (
    HubDeliveryUnknown,
    HubOutcomeUnknown,
    NotRunOwner,
    OpenAIRateLimitPersisted,
    OrgQuotaReached,
    PluginError,
    PromptNotFound,
    QueueTooLong,
    RateLimiterBusy,
    RunCancelled,
    SpendingLimitReached,
    UpstreamRateLimited,
)
from dalle_plugin.domain.hub_answer import answer_to_write_format
from dalle_plugin.domain.payload import HubPayload
from dalle_plugin.domain.pricing import DEFAULT_PRICES
from dalle_plugin.domain.prompt import build_prompt
from dalle_plugin.domain.prompt_template import parse_template
from dalle_plugin.domain.rate_limit import LimiterSettings, wake_at_ms
from dalle_plugin.domain.run import (
    AttachResult,
    ExtractResult,
    Failure,
    FailureInput,
    GenerateOutcome,
    ImageInfo,
    ModelInfo,
    PromptInfo,
    RateWait,
    RunRecord,
    RunRef,
    RunStatus,
    TimelineEntry,
)
from dalle_plugin.domain.spending import OrgQuota, QuotaWait, release, take_allowances
from dalle_plugin.domain.text_decoding import decode_text
from dalle_plugin.ports import (
    AllowanceLedger,
    Clock,
    HubClient,
    ImageGenerator,
    ImageRequest,
    ImageStore,
    RateAsk,
    RateDecision,
    RateLimiter,
    ReusableImages,
    RunStore,
    SecretVault,
    WorkflowStarter,
)

ANGO_KEY = "ango"
OPENAI_KEY = "openai"
#: 429 rate_limit_exceeded answers a run takes in a row (waiting the time OpenAI asks each time) before it
#: gives up: a key whose limit stays used up must end the run, not loop it for days
MAX_RATE_LIMITED_ANSWERS = 5
#: the file name's extension and content type of each output format
FILE_TYPES = {"png": ("png", "image/png"), "jpeg": ("jpg", "image/jpeg"), "webp": ("webp", "image/webp")}
#: failures raised before the image request was sent: their grants are given back
_FAILED_BEFORE_SENDING = {
    RateLimiterBusy.__name__,
    QueueTooLong.__name__,
    RunCancelled.__name__,
    SpendingLimitReached.__name__,
    OrgQuotaReached.__name__,
}


@dataclass
class StepDeps:
    runs: RunStore
    clock: Clock
    vault: SecretVault
    hub_for: Callable[[RunRecord, str], HubClient] = None  # (run, ango api key) -> client
    starter: WorkflowStarter | None = None
    images: ImageStore | None = None
    generator: ImageGenerator | None = None
    limiter: RateLimiter | None = None
    default_openai_key: Callable[[], str] | None = None
    model_successors: dict[str, str] = field(default_factory=dict)
    run_ttl_days: int = 30
    limiter_settings: LimiterSettings | None = None
    reusable_images: ReusableImages | None = None
    allowances: AllowanceLedger | None = None
    #: the deployment's daily image quota per organisation on the shared key (None: off)
    org_quota: OrgQuota | None = None
    image_prices: dict[str, dict[str, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))


# ---- helpers shared by the steps ------------------------------------------------------------------


class OwnedRuns:
    """The run store as a step sees it: every write it makes holds only while the calling execution still
    owns the run (checked inside the write, under the run's version lock), so an execution that lost the
    run (cancelled, then started again by a new request) can change nothing, and so pays for nothing."""

    def __init__(self, runs: RunStore, caller: str | None):
        self._runs = runs
        self._caller = caller

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runs, name)

    def _guarded(self, mutate: Callable[[RunRecord], None]) -> Callable[[RunRecord], None]:
        def guarded(run: RunRecord) -> None:
            check_owner(run, self._caller)
            mutate(run)

        return guarded

    def update(self, session: str, task_id: str, mutate: Callable[[RunRecord], None]) -> RunRecord:
        return self._runs.update(session, task_id, self._guarded(mutate))

    def change(self, run: RunRecord, mutate: Callable[[RunRecord], None]) -> RunRecord:
        # the write holds under the run's version: a claim by a new owner in between fails it, and the
        # check then runs again on the record as it is now
        return self._runs.change(run, self._guarded(mutate))


def check_owner(run: RunRecord, caller: str | None) -> None:
    """Raise ``NotRunOwner`` unless ``caller`` (an execution's name) owns the run. A call from outside the
    state machine (no caller) and a record from before ownership existed (no owner) pass."""
    if caller is not None and run.owner is not None and run.owner != caller:
        raise NotRunOwner(
            f"The run of task {run.task_id!r} belongs to another execution; this one leaves it."
        )


def owned_deps(ref: RunRef, deps: StepDeps) -> StepDeps:
    """The step's ports with the run store guarded by the caller's ownership."""
    if ref.caller is None or isinstance(deps.runs, OwnedRuns):
        return deps
    return replace(deps, runs=OwnedRuns(deps.runs, ref.caller))


def load_run(ref: RunRef, deps: StepDeps) -> RunRecord:
    """The run a step works on, if the calling execution owns it."""
    run = deps.runs.get(ref.session, ref.task_id)
    if run is None:
        raise PluginError(f"No run for session {ref.session!r} and task {ref.task_id!r}.")
    check_owner(run, ref.caller)
    return run


def _load_active(ref: RunRef, deps: StepDeps) -> RunRecord:
    """The run a step works on; a cancelled run goes no further (the Catch path ends its task)."""
    run = load_run(ref, deps)
    if run.status is RunStatus.CANCELLED:
        raise RunCancelled("The run was cancelled before its image was generated.")
    return run


def _secrets(run: RunRecord, deps: StepDeps) -> dict[str, str]:
    if not run.sealed_secrets:
        raise PluginError("This run's credentials were already removed (the run has ended).")
    return deps.vault.open(run.sealed_secrets, run.encryption_context)


def _hub(run: RunRecord, deps: StepDeps) -> HubClient:
    return deps.hub_for(run, _secrets(run, deps)[ANGO_KEY])


def _mark(
    run: RunRecord, now_ms: int, step: str, status: RunStatus | None, detail: str | None = None
) -> None:
    """Append to the timeline (the previous entry's duration is derived from this one's start when read:
    the store appends the new entry without rewriting the others)."""
    run.timeline.append(
        TimelineEntry(step=step, status=(status or run.status).value, at_ms=now_ms, detail=detail)
    )
    if status is not None:
        run.status = status
    run.updated_at_ms = now_ms


def _progress(
    run: RunRecord,
    deps: StepDeps,
    step: str,
    status: RunStatus | None,
    message: str,
    hub: HubClient | None = None,
    level: str = "INFO",
) -> RunRecord:
    now = deps.clock.now_ms()
    run = deps.runs.change(run, lambda r: _mark(r, now, step, status, message))
    _hub_log(run, hub, message, level)
    return run


def _hub_log(run: RunRecord, hub: HubClient | None, message: str, level: str = "INFO") -> None:
    """Progress lines are best effort: a hub that drops a log line must not fail the run."""
    if hub is None:
        return
    try:
        hub.plugin_log(run.session, message, level=level, taskId=run.task_id)
    except PluginError:
        pass


def image_key(run: RunRecord, index: int = 0) -> str:
    """Deterministic per run and index, so a retried Generate finds the images it already paid for."""
    extension = FILE_TYPES[run.output_format][0]
    made_from = f".{image_fingerprint(run)[:16]}" if run.prompt else ""  # another prompt, another key
    return f"images/{run.execution_name}{made_from}{f'.{index + 1}' if index else ''}.{extension}"


def to_rfc3339_second(epoch_ms: int) -> str:
    """Rounded UP to the whole second: Step Functions truncates Wait timestamps, and must never wake early."""
    seconds = math.ceil(epoch_ms / 1000)
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- API: start a run ------------------------------------------------------------------------------


@dataclass
class SessionStart:
    session: str
    runs: list[RunRecord]
    started: list[str]  # task ids this request started (empty for a duplicate of a running request)
    execution_arn: str | None = None


def _requeue(run: RunRecord, sealed: bytes, now: int) -> None:
    """A re-run of a failed or cancelled task: a new generation, the same stored image (never paid twice),
    and no owner yet: the request that requeued it claims it for the execution it starts."""
    if run.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
        return
    run.generation += 1
    run.status = RunStatus.QUEUED
    run.owner = None
    run.failure = None
    run.rate_wait = None
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
            detail=f"Run again (attempt {run.generation + 1}).",
        )
    )


#: tasks one execution runs: its history (about 40 events a task) and input stay far inside Step Functions'
#: 25,000 events and 256 KiB (100 task ids of at most 256 characters are 30 KB)
TASKS_PER_EXECUTION = 100


def _name(kind: str, session: str, identity: list[str]) -> str:
    digest = hashlib.sha256("\x00".join([kind, session] + sorted(identity)).encode()).hexdigest()[:24]
    readable = re.sub(r"[^A-Za-z0-9_-]", "-", session[:40])
    return f"{readable}_{kind[0]}{len(identity)}_{digest}"


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


class _Owned(Exception):
    pass


def _claim(owner: str) -> Callable[[RunRecord], None]:
    def claim(run: RunRecord) -> None:
        if run.status is not RunStatus.QUEUED or run.owner is not None:
            raise _Owned(run.owner or "")
        run.owner = owner

    return claim


def start_session(
    payload: HubPayload,
    deps: StepDeps,
    today: dt.date | None = None,
    tasks_per_execution: int = TASKS_PER_EXECUTION,
) -> SessionStart:
    """Validate everything that can be validated before money is spent, seal the secrets, and see that
    every task needing a run is owned by exactly one execution, and that execution started.

    Ownership comes first, by conditional writes; starting comes after and is idempotent (the owner's name
    is deterministic), so a duplicate request, a concurrent one, or one after an API that died anywhere in
    between, starts nothing twice: at worst it starts the owner the dead request never got to start."""
    config = parse_config_json(payload.config_json)
    options = validate_run_options(
        config, deps.model_successors, today or dt.datetime.now(dt.UTC).date(), deps.image_prices
    )
    tasks = payload.batch_tasks()
    needs_class = config.get_prompt_from in ("entity-annotation", "text-annotation")
    if needs_class and not payload.prompt_class_ids:
        kind = "entity" if config.get_prompt_from == "entity-annotation" else "text classification"
        raise PromptNotFound(
            f"get_prompt_from is '{config.get_prompt_from}' but no class is mapped to the plugin's Prompt class. "
            f"In the plugin settings, map Prompt to the {kind} class that holds the prompt."
        )

    now = deps.clock.now_ms()
    secrets = {ANGO_KEY: payload.api_key.get_secret_value()}
    if not config.uses_default_key:
        secrets[OPENAI_KEY] = config.openai_api_key.get_secret_value()
    sealed = deps.vault.seal(secrets, {"session": payload.session})
    runs: list[RunRecord] = []
    started: list[str] = []  # created or requeued by this request: what it, and only it, counts as accepted
    for chunk in _chunks(tasks, tasks_per_execution):
        owner = creation_owner(payload.session, [task.task_id for task in chunk])
        for task in chunk:
            record = _new_record(payload, task, config, options, sealed, now, deps, owner)
            stored, created = deps.runs.create(record)
            if not created and stored.status in (RunStatus.FAILED, RunStatus.CANCELLED):
                requeued = [
                    False
                ]  # set by the write that counted (a concurrent request may requeue it first)

                def requeue(r: RunRecord) -> None:
                    requeued[0] = r.status in (RunStatus.FAILED, RunStatus.CANCELLED)
                    _requeue(r, sealed, now)

                stored = deps.runs.update(stored.session, stored.task_id, requeue)
                created = requeued[0]
            if created:
                started.append(stored.task_id)
            runs.append(stored)
    # Requeued runs (and any an earlier request requeued and died before claiming) get a new owner.
    unowned = [run for run in runs if run.status is RunStatus.QUEUED and run.owner is None]
    by_task = {run.task_id: index for index, run in enumerate(runs)}
    for chunk in _chunks(unowned, tasks_per_execution):
        owner = execution_name(payload.session, chunk)
        for run in chunk:
            try:
                runs[by_task[run.task_id]] = deps.runs.update(run.session, run.task_id, _claim(owner))
            except _Owned:  # a concurrent request claimed it first: its execution runs it
                runs[by_task[run.task_id]] = deps.runs.get(run.session, run.task_id) or run
    # Start every owner with queued runs. Its name is fixed, so starting it again is harmless: the execution
    # exists (Step Functions answers with it, or ExecutionAlreadyExists), or a request died before starting it.
    waiting: dict[str, list[str]] = {}
    for run in runs:
        if run.status is RunStatus.QUEUED and run.owner:
            waiting.setdefault(run.owner, []).append(run.task_id)
    arn = None
    for owner, task_ids in waiting.items():
        arn = deps.starter.start(
            owner, {"session": payload.session, "tasks": [{"taskId": t} for t in task_ids]}
        )
    return SessionStart(session=payload.session, runs=runs, started=started, execution_arn=arn)


def _new_record(
    payload: HubPayload,
    task: Any,
    config: Any,
    options: Any,
    sealed: bytes,
    now: int,
    deps: StepDeps,
    owner: str,
) -> RunRecord:
    ref = RunRef(session=payload.session, task_id=task.task_id)
    return RunRecord(
        session=ref.session,
        task_id=ref.task_id,
        execution_name=ref.execution_name,
        owner=owner,
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


# ---- Extract Prompt --------------------------------------------------------------------------------


def _as_sentence(note: str) -> str:
    """Capitalised, unless it starts with a model id: OpenAI spells those in lower case (dall-e-2)."""
    if note.startswith(("dall-e", "gpt-image")):
        return note
    return note[:1].upper() + note[1:]


def extract_prompt(ref: RunRef, deps: StepDeps) -> ExtractResult:
    deps = owned_deps(ref, deps)
    run = _load_active(ref, deps)
    hub = _hub(run, deps)
    notes = "".join(f" {_as_sentence(note)}." for note in run.notes)
    started = (
        f"Run started: prompt from {run.prompt_source}, model {run.model.actual}, size {run.size}.{notes}"
    )
    started_ms = deps.clock.now_ms()
    _hub_log(run, hub, started)
    try:
        return _extract(
            run, deps, hub, lambda r: _mark(r, started_ms, "extract", RunStatus.EXTRACTING, started)
        )
    except PluginError:
        # The step's one write is its result; a step that fails still leaves its start on the timeline.
        deps.runs.change(run, lambda r: _mark(r, started_ms, "extract", RunStatus.EXTRACTING, started))
        raise


def _extract(
    run: RunRecord, deps: StepDeps, hub: HubClient, mark_started: Callable[[RunRecord], None]
) -> ExtractResult:
    task = hub.get_task(run.task_id)

    def asset_text() -> str:
        url = run.data_url or hub.get_asset(run.project_id, run.asset_id).data_url
        return decode_text(hub.fetch_text(url))

    template = parse_template(run.prompt_template) if run.prompt_template else None
    # The model's limit holds for the prompt as sent: the template's own text leaves less room for the task's.
    room = template.room_for_prompt(run.max_prompt_chars) if template else run.max_prompt_chars
    prompt = build_prompt(run.prompt_source, task.get("answer"), run.prompt_class_ids, asset_text, room)
    text = template.render(prompt.text) if template else prompt.text
    info = PromptInfo(
        text=text,
        source=prompt.source,
        length=len(text),
        original_length=prompt.original_length,
        truncated=prompt.truncated,
        notes=list(prompt.notes),
        template=run.prompt_template,
        extracted_length=len(prompt.text) if template else None,
    )
    shortened = ""
    if info.truncated:
        why = (
            f" so that with the template it fits {run.model.actual}'s {run.max_prompt_chars} characters"
            if template
            else ""
        )
        shortened = f" (shortened from {info.original_length} to {len(prompt.text)} at a word boundary{why})"
    templated = f", {info.length} with the prompt template" if template else ""
    message = f"Prompt from {info.source}: {len(prompt.text)} characters{shortened}{templated}."
    now = deps.clock.now_ms()

    def extracted(r: RunRecord) -> None:
        mark_started(r)
        r.prompt = info
        _mark(r, now, "extract", None, message)

    run = deps.runs.change(run, extracted)
    _hub_log(run, hub, message)
    return ExtractResult(prompt_source=info.source, prompt_length=info.length, truncated=info.truncated)


# ---- Generate Image --------------------------------------------------------------------------------


def _wait(
    run: RunRecord,
    deps: StepDeps,
    start_at_ms: int,
    reason: str,
    message: str,
    hub: HubClient | None,
    rate_wait: RateWait | None,
    also: Callable[[RunRecord], None] | None = None,
) -> GenerateOutcome:
    now = deps.clock.now_ms()

    def mutate(r: RunRecord) -> None:
        if also is not None:
            also(r)
        r.rate_wait = rate_wait
        _mark(r, now, "wait", RunStatus.WAITING_FOR_SLOT, message)

    run = deps.runs.change(run, mutate)
    _hub_log(run, hub, message)
    retry_at = to_rfc3339_second(start_at_ms)
    wait_s = max(0, math.ceil(start_at_ms / 1000) - now // 1000)
    return GenerateOutcome(status="WAIT", retry_at=retry_at, wait_seconds=wait_s, reason=reason)


def _done(run: RunRecord) -> GenerateOutcome:
    return GenerateOutcome(status="DONE", image_key=run.image.key, image_count=len(run.images))


def generate_image(ref: RunRef, deps: StepDeps) -> GenerateOutcome:
    deps = owned_deps(ref, deps)
    run = _load_active(ref, deps)
    if run.image is not None:
        if _made_for(run.image, run):
            return _done(run)
        # A re-run after the prompt (or an option) changed: the earlier image is not what is asked now.
        run = deps.runs.update(run.session, run.task_id, _drop_images)
    stored = _stored_images(run, deps)
    if stored:
        return _adopt_stored_images(run, stored, deps)

    secrets = _secrets(run, deps)  # opened once: every call before the request delays a booked start
    hub = deps.hub_for(run, secrets[ANGO_KEY])
    reused = _reuse_undelivered_image(run, deps, hub)
    if reused is not None:
        return reused
    api_key = deps.default_openai_key() if run.uses_default_key else secrets[OPENAI_KEY]
    # Spending limits are counted before the queue is joined: a run refused by them takes no place in it.
    held = _hold_allowances(run, deps, hub)
    if isinstance(held, GenerateOutcome):
        return held
    deps.generator.prepare(api_key)  # the client is built before the claim: nothing slow stands after it
    claimed = _claim_request_start(held, deps, hub)
    if isinstance(claimed, GenerateOutcome):
        return claimed
    run = claimed
    request = ImageRequest(
        model=run.model.actual,
        prompt=run.prompt.text,
        size=run.size,
        quality=run.quality,
        n=run.images_per_task,
        output_format=None if run.output_format == "png" else run.output_format,
        output_compression=run.output_compression,
        background=run.background,
    )
    started = deps.clock.now_ms()
    # The hub hears "generating" while the request is on its way: a hub call before it would stand
    # between the booked start and the request.
    telling_hub = threading.Thread(target=_hub_log, args=(run, hub, run.timeline[-1].detail), daemon=True)
    telling_hub.start()
    try:
        try:
            image = deps.generator.generate(request, api_key)
        finally:
            telling_hub.join()
    except UpstreamRateLimited as exc:
        release(run.held, deps.allowances)  # a 429 is not billed

        def count(r: RunRecord) -> None:
            _count_rate_limited(r)
            r.held = []

        if run.upstream_rate_limited + 1 >= MAX_RATE_LIMITED_ANSWERS:
            run = deps.runs.change(run, count)
            raise OpenAIRateLimitPersisted(
                f"OpenAI answered 429 rate_limit_exceeded {run.upstream_rate_limited} times in a row, each "
                "time after waiting as long as it asked: the key's rate limit is used up by other work. Run the "
                "plugin again later, or raise the key's limits on platform.openai.com."
            ) from None
        # counted in the same write that starts the wait
        return _wait(
            run,
            deps,
            deps.clock.now_ms() + exc.retry_after_ms,
            "openai_rate_limited",
            exc.message,
            hub,
            None,
            also=count,
        )
    except PluginError as exc:
        if run.held and not getattr(
            exc, "maybe_billed", False
        ):  # an error answer carries no image to pay for
            release(run.held, deps.allowances)
            deps.runs.change(run, lambda r: setattr(r, "held", []))
        raise
    # Every image is stored before any is recorded: a step that dies in between finds them at their keys.
    content_type = FILE_TYPES[run.output_format][1]
    infos = []
    for index, body in enumerate(image.bodies[: run.images_per_task]):
        key = image_key(run, index)
        digest = hashlib.sha256(body).hexdigest()
        metadata = {
            "model": image.model,
            "size": run.size,
            "sha256": digest,
            "request-id": image.request_id or "",
        }
        deps.images.put_image(key, body, content_type, metadata)
        infos.append(
            ImageInfo(
                key=key,
                sha256=digest,
                bytes=len(body),
                model=image.model,
                size=run.size,
                quality=run.quality,
                request_id=image.request_id,
                format=run.output_format,
                index=index,
                fingerprint=image_fingerprint(run),
            )
        )
    elapsed_s = (deps.clock.now_ms() - started) / 1000
    message = f"{_images_as_subject(len(infos))} generated in {elapsed_s:.1f} s."

    def mutate(r: RunRecord) -> None:
        r.image, r.more_images = infos[0], infos[1:]
        r.held = []  # paid for: the grants stay counted
        _mark(r, deps.clock.now_ms(), "generate", None, message)

    run = deps.runs.change(run, mutate)
    _hub_log(run, hub, message)
    return _done(run)


def _made_for(image: ImageInfo, run: RunRecord) -> bool:
    """Whether the image is what the run asks for now (an image from before fingerprints counts as such)."""
    return image.fingerprint is None or run.prompt is None or image.fingerprint == image_fingerprint(run)


def _drop_images(run: RunRecord) -> None:
    if run.image is not None and not _made_for(run.image, run):
        run.image, run.more_images = None, []


def _count_images(count: int) -> str:
    return "the image" if count == 1 else f"{count} images"


def _images_as_subject(count: int) -> str:
    return "Image" if count == 1 else f"{count} images"


def _hold_allowances(run: RunRecord, deps: StepDeps, hub: HubClient) -> RunRecord | GenerateOutcome:
    """Count this run's next request against the session's spending limit and the organisation's daily
    quota (shared key), or the Wait outcome until the next UTC day when the quota is used up."""
    if deps.allowances is None:
        return run
    outcome = take_allowances(run, deps.allowances, deps.org_quota, deps.clock.now_ms())
    if isinstance(outcome, QuotaWait):
        return _wait(run, deps, outcome.until_ms, "org_quota", outcome.message, hub, None)
    if not outcome:
        return run
    return deps.runs.change(run, lambda r: r.held.extend(outcome))


def _spend_attempt(run: RunRecord) -> None:
    if run.status is RunStatus.CANCELLED:  # decided under the run's version lock: cancel or pay, never both
        raise RunCancelled("The run was cancelled before its image was generated.")
    run.attempt += 1
    run.rate_wait = None


class _TakenByAnotherDelivery(Exception):
    pass


def queue_id(run: RunRecord) -> str:
    """The run's place in the shared key's queue: the same for every attempt of this generation."""
    return f"{run.execution_name}#g{run.generation}"


def _claim_request_start(run: RunRecord, deps: StepDeps, hub: HubClient) -> RunRecord | GenerateOutcome:
    """Take this run's turn to send its one image request, or the Wait outcome while its turn lies ahead.

    The attempt is spent first, under the run's version lock (a cancel and a send never both happen, and
    a second delivery of this very step finds the attempt taken and sends nothing). On the shared key the
    send is then claimed in the queue: the claim is the last thing before the request leaves, and it
    is checked against the actual sends of the last ``limit`` requests (``domain.rate_limit``).
    """
    message = (
        f"Generating {_count_images(run.images_per_task)} with {run.model.actual} "
        f"({run.size}, {run.output_format})."
    )
    expected, joining = run.attempt, run.rate_wait is None
    now = deps.clock.now_ms()

    def spend(r: RunRecord) -> None:
        if r.attempt != expected:
            raise _TakenByAnotherDelivery()
        _spend_attempt(r)
        _mark(r, now, "generate", RunStatus.GENERATING, message)

    try:
        run = deps.runs.change(run, spend)  # re-run on the current record if another write came first
    except _TakenByAnotherDelivery:
        # Another delivery of this step took the attempt and is sending: look again shortly (its image
        # will be there), never send a second request.
        return GenerateOutcome(
            status="WAIT",
            retry_at=to_rfc3339_second(now + 5_000),
            wait_seconds=5,
            reason="duplicate_delivery",
        )
    if not run.uses_default_key:
        return run
    decision = deps.limiter.acquire(
        RateAsk(
            run_id=queue_id(run),
            ticket=f"{run.execution_name}#{run.attempt}",
            accepted_ms=run.accepted_at_ms or run.created_at_ms,
            org_id=run.org_id or "",
            interactive=not run.workflow,
            may_refuse=joining,
        )
    )
    if decision.granted:
        return run
    settings = deps.limiter_settings
    now = deps.clock.now_ms()
    if decision.refused:
        raise QueueTooLong(_queue_too_long(decision, now, settings))
    wait = RateWait(
        ticket=queue_id(run), start_at_ms=decision.start_at_ms, reserved=False, position=decision.position
    )
    eta = dt.datetime.fromtimestamp(decision.start_at_ms / 1000, tz=dt.UTC).strftime("%H:%M:%S")
    message = (
        f"Waiting for its turn on the shared OpenAI key ({settings.limit} images per "
        f"{settings.window_s:g} s across the hub): position {decision.position} in the queue, "
        f"starts at {eta} UTC, in about {max(0, math.ceil((decision.start_at_ms - now) / 1000))} s."
    )
    return _wait(run, deps, wake_at_ms(decision.start_at_ms, settings), "rate_slot", message, hub, wait)


def _queue_too_long(decision: RateDecision, now_ms: int, settings: LimiterSettings) -> str:
    wait_min = max(1, round((decision.start_at_ms - now_ms) / 60_000))
    cap_min = max(1, round(settings.max_queue_wait_s / 60))
    return (
        f"The shared OpenAI key is busy: this run would have waited about {wait_min} min for its turn "
        f"({decision.position} runs ahead of it, {settings.limit} images per {settings.window_s:g} s "
        f"across the hub), more than the {cap_min} min this deployment allows, so it was not queued. "
        "Run it again later, or bring your own OpenAI key (the Config JSON's openai_api_key) to skip "
        "the shared queue."
    )


def _count_rate_limited(run: RunRecord) -> None:
    run.upstream_rate_limited += 1


def image_fingerprint(run: RunRecord) -> str:
    """What makes two runs ask OpenAI for the same image: the same task, prompt, model and options."""
    basis = [
        run.project_id,
        run.task_id,
        run.asset_id,
        run.model.actual,
        run.size,
        run.quality,
        run.prompt.text if run.prompt else None,
    ]
    if (run.output_format, run.output_compression, run.background) != ("png", None, None):
        basis += [run.output_format, run.output_compression, run.background]
    return hashlib.sha256(json.dumps(basis).encode()).hexdigest()


def _reuse_undelivered_image(run: RunRecord, deps: StepDeps, hub: HubClient) -> GenerateOutcome | None:
    """A run of the same task that paid for this very image and then failed to deliver it (a hub that
    stayed down) left it on offer: take it instead of paying again. Single-image runs only."""
    if deps.reusable_images is None or run.prompt is None or run.images_per_task != 1:
        return None
    key = deps.reusable_images.claim(image_fingerprint(run))
    body = deps.images.get(key) if key else None
    if body is None:  # none on offer, or the bucket's lifecycle rule already removed it
        return None
    message = "Reusing the image an earlier run of this task paid for and could not deliver (no new charge)."
    info = ImageInfo(
        key=key,
        sha256=hashlib.sha256(body).hexdigest(),
        bytes=len(body),
        model=run.model.actual,
        size=run.size,
        quality=run.quality,
        reused=True,
        format=run.output_format,
        fingerprint=image_fingerprint(run),
    )
    now = deps.clock.now_ms()

    def mutate(r: RunRecord) -> None:
        if r.image is None or not _made_for(r.image, r):
            r.image, r.more_images = info, []
        _mark(r, now, "generate", None, message)

    run = deps.runs.change(run, mutate)
    _hub_log(run, hub, message)
    return GenerateOutcome(status="DONE", image_key=run.image.key)


def _stored_images(run: RunRecord, deps: StepDeps) -> list[tuple[str, bytes]]:
    """The images an earlier attempt stored at this run's keys, in order (they are stored first to last)."""
    found = []
    for index in range(run.images_per_task):
        key = image_key(run, index)
        body = deps.images.get(key)
        if body is None:
            break
        found.append((key, body))
    return found


def _adopt_stored_images(run: RunRecord, stored: list[tuple[str, bytes]], deps: StepDeps) -> GenerateOutcome:
    """A previous attempt paid for and stored the images but died before recording them: use them."""
    infos = [
        ImageInfo(
            key=key,
            sha256=hashlib.sha256(body).hexdigest(),
            bytes=len(body),
            model=run.model.actual,
            size=run.size,
            quality=run.quality,
            format=run.output_format,
            index=index,
            fingerprint=image_fingerprint(run),
        )
        for index, (key, body) in enumerate(stored)
    ]

    def adopt(r: RunRecord) -> None:
        if r.image is None:
            r.image, r.more_images = infos[0], infos[1:]
        r.held = []

    return _done(deps.runs.change(run, adopt))


# ---- Attach Image ----------------------------------------------------------------------------------


def _finished_result(run: RunRecord) -> AttachResult:
    return AttachResult(image_url=run.image.hub_url, finished_as="workflow" if run.workflow else "editor")


def _send_once(
    run: RunRecord,
    deps: StepDeps,
    mark: Callable[[RunRecord, int | None], None],
    send: Callable[[], None],
    unconfirmed: str,
    pending: list[Callable[[RunRecord], None]],
) -> RunRecord:
    """Send a change the hub must not get twice: note the intent first, then send. If the hub surely did
    not take it, the note is cleared so a retry sends it again; if it may have, the run stops with
    ``unconfirmed`` (sending again could make it twice, and the hub cannot be asked). The step's progress
    not yet written (``pending``) goes in the same write as the intent."""
    now = deps.clock.now_ms()
    run = deps.runs.change(run, lambda r: [*(apply(r) for apply in pending), mark(r, now)])
    pending.clear()
    try:
        send()
    except HubDeliveryUnknown:
        raise HubOutcomeUnknown(unconfirmed) from None
    except PluginError:
        deps.runs.change(run, lambda r: mark(r, None))
        raise
    return run


def _unconfirmed_attachment(image: ImageInfo) -> str:
    return (
        f"Ango Hub did not confirm the attachment of the generated image ({image.hub_url}), so the "
        "plugin did not send it again, to never attach it twice. Check the asset's attachments: if the "
        "image is missing, attach that link by hand or run the plugin again."
    )


def _unconfirmed_submission(run: RunRecord) -> str:
    return (
        "The image is attached, but Ango Hub did not confirm the task's submission, so the plugin did "
        "not submit it again, to never move the task on twice. If the task is still in the plugin "
        "stage, submit it by hand."
    )


def _attach_sent_setter(index: int) -> Callable[[RunRecord, int | None], None]:
    def mark(run: RunRecord, at_ms: int | None) -> None:
        run.image_at(index).attach_sent_at_ms = at_ms

    return mark


def _set_finish_sent(run: RunRecord, at_ms: int | None) -> None:
    run.finish_sent_at_ms = at_ms


def attach_image(ref: RunRef, deps: StepDeps) -> AttachResult:
    deps = owned_deps(ref, deps)
    run = _load_active(ref, deps)
    if run.status is RunStatus.SUCCEEDED:
        return _finished_result(run)  # a retry of a step that finished: nothing left to do
    hub = _hub(run, deps)
    count = len(run.images)
    uploading = f"Uploading {_count_images(count)} to the hub."
    uploading_ms = deps.clock.now_ms()
    _hub_log(run, hub, uploading)
    # What the step has done and not yet written: written with the next intent (or the finish), one write each.
    pending: list[Callable[[RunRecord], None]] = [
        lambda r: _mark(r, uploading_ms, "attach", RunStatus.ATTACHING, uploading)
    ]
    for index in range(count):
        image = run.image_at(index)
        if not image.hub_url:
            body = deps.images.get(image.key)
            extension, content_type = FILE_TYPES[image.format]
            name = f"dalle-{run.task_id}-{image.sha256[:12]}.{extension}"
            url = hub.upload_file(
                run.project_id, name, body, content_type
            )  # a repeat only leaves a spare file
            run = run.model_copy(deep=True)  # the URL is only in memory until the next write takes it
            pending.append(lambda r, i=index, u=url: setattr(r.image_at(i), "hub_url", u))
            pending[-1](run)
    if not all(image.attached for image in run.images):
        asset = hub.get_asset(run.project_id, run.asset_id) if run.asset_id else None
        external_id = asset.external_id if asset else run.task_id
        for index in range(count):  # in order: the hub lists attachments as they came
            image = run.image_at(index)
            if image.attached:
                continue
            if image.attach_sent_at_ms is not None:  # an earlier attempt sent it and never heard back
                raise HubOutcomeUnknown(_unconfirmed_attachment(image))
            run = _send_once(
                run,
                deps,
                _attach_sent_setter(index),
                lambda u=image.hub_url: hub.attach_image(run.project_id, external_id, u),
                _unconfirmed_attachment(image),
                pending,
            )
            pending.append(lambda r, i=index: setattr(r.image_at(i), "attached", True))
        # Delivered: a later re-run wants a new image. Only a re-run can find its own image still on offer
        # (Generate claimed any offer before paying); an offer another session makes in between stays.
        if deps.reusable_images is not None and run.prompt is not None and run.generation > 0:
            deps.reusable_images.claim(image_fingerprint(run))

    # The answer handed back is the task's current one, unchanged, so no annotation is ever wiped.
    answer = answer_to_write_format(hub.get_task(run.task_id).get("answer") or {})
    if run.workflow:
        if run.finish_sent_at_ms is not None:
            raise HubOutcomeUnknown(_unconfirmed_submission(run))
        run = _send_once(
            run,
            deps,
            _set_finish_sent,
            lambda: hub.annotate(run.task_id, answer),
            _unconfirmed_submission(run),
            pending,
        )
    else:
        hub.plugin_response(run.session, response=answer)  # a repeat is harmless: the same answer again
    elapsed_s = (deps.clock.now_ms() - run.created_at_ms) / 1000
    message = f"{_images_as_subject(count)} attached to the asset. Finished in {elapsed_s:.1f} s."
    now = deps.clock.now_ms()

    def finish(r: RunRecord) -> None:
        for apply in pending:
            apply(r)
        _mark(r, now, "finished", RunStatus.SUCCEEDED, message)
        r.timeline[-1].duration_ms = 0
        r.sealed_secrets = None

    # The hub's log has the whole story by the time the session says SUCCEEDED (a retried step may say it twice).
    _hub_log(run, hub, message)
    run = deps.runs.change(run, finish)
    return _finished_result(run)


# ---- Record Failure --------------------------------------------------------------------------------


#: how Step Functions names a Lambda that ran out of time (no error type: Lambda.Unknown)
LAMBDA_TIMED_OUT = ("Lambda.Unknown", "Sandbox.Timedout")


def describe_failure(error: str, cause: str | None) -> Failure:
    """Turn Step Functions' ``Error``/``Cause`` into a reason and a sentence a person can act on."""
    message = None
    if cause:
        try:
            parsed = json.loads(cause)
            message = parsed.get("errorMessage") if isinstance(parsed, dict) else None
        except ValueError:
            message = cause
    reason_of = {cls.__name__: cls.reason for cls in _all_subclasses(PluginError)}
    if error == "States.Timeout":
        message = "The run took longer than allowed and was stopped. Run the plugin again."
    elif error in LAMBDA_TIMED_OUT:
        message = (
            "A step of the run ran out of time (the hub or OpenAI answered too slowly) and was not "
            "retried, so that nothing is paid for or attached twice. Run the plugin again; if it "
            "keeps happening, check that Ango Hub is reachable, then tell the plugin's owner."
        )
    elif error not in reason_of:
        # Only the plugin's own errors are written for people; any other exception's text could quote
        # anything (a header value, a request), so it stays in the execution's history, not the session.
        message = (
            f"The plugin failed unexpectedly ({error}). Run it again; if it keeps failing, tell the "
            "plugin's owner."
        )
    reason = "step_timed_out" if error in LAMBDA_TIMED_OUT else reason_of.get(error, "internal_error")
    return Failure(reason=reason, message=(message or error)[:1000], error=error)


def _all_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def record_failure(inp: FailureInput, deps: StepDeps) -> dict[str, Any]:
    failure = describe_failure(inp.error.error, inp.error.cause)
    deps = owned_deps(inp, deps)
    run = deps.runs.get(inp.session, inp.task_id)
    if run is None:
        return {"status": RunStatus.FAILED.value, "reason": failure.reason}
    try:
        check_owner(run, inp.caller)
    except NotRunOwner:  # another execution owns this generation: its own steps say how it ends
        return {"status": "NOT_OWNER", "reason": None}
    if run.status is RunStatus.SUCCEEDED:
        # A crash after the run finished (its last write done) must not turn a delivered image into a failure.
        return {"status": RunStatus.SUCCEEDED.value, "reason": None}
    if run.status is RunStatus.CANCELLED:  # the cancel already told the hub and purged the secrets
        if run.image is None and run.held and deps.allowances is not None:
            release(run.held, deps.allowances)  # counted by a Generate that raced the cancel, never sent
        return {"status": RunStatus.CANCELLED.value, "reason": RunCancelled.reason}
    unconfirmed = [i for i in run.images if not i.attached and i.attach_sent_at_ms is not None]
    if unconfirmed and failure.error != HubOutcomeUnknown.__name__:
        # The step died between sending the attachment and hearing back: say what to check.
        failure.message = (
            f"{failure.message} The image ({unconfirmed[0].hub_url}) was sent to the asset but the "
            "hub never confirmed it: check the asset's attachments before running again."
        )[:1000]
    give_back = run.held if run.image is None and failure.error in _FAILED_BEFORE_SENDING else []
    if give_back and deps.allowances is not None:
        release(give_back, deps.allowances)
    hub = None
    try:
        hub = _hub(run, deps)
    except PluginError:
        pass
    now = deps.clock.now_ms()

    def fail(r: RunRecord) -> None:
        if give_back:
            r.held = []
        r.failure = failure
        _mark(r, now, "failed", RunStatus.FAILED, failure.message)
        r.timeline[-1].duration_ms = 0
        r.sealed_secrets = None

    run = deps.runs.change(run, fail)
    # Paid for and surely not on the hub: a re-run of the task (in a new session too) takes it, not a new one.
    undelivered = any(not i.attached and i.attach_sent_at_ms is None for i in run.images)
    # A step that died between storing its PNG and recording it leaves the image at its key, unrecorded:
    # offered too (a re-run checks that the object exists before it takes it).
    unrecorded = run.image is None and run.attempt > 0
    reusable = deps.reusable_images is not None and run.prompt is not None and run.images_per_task == 1
    if (undelivered or unrecorded) and reusable:
        key = run.image.key if run.image else image_key(run)
        deps.reusable_images.offer(image_fingerprint(run), key, run.expires_at or now // 1000 + 86_400)
    kept_what = "image is" if len(run.images) == 1 else "images are"
    kept_it = "it" if len(run.images) == 1 else "them"
    kept = (
        f" The generated {kept_what} kept, so running again will not pay for {kept_it} twice."
        if undelivered
        else ""
    )
    _hub_log(run, hub, f"Run failed: {failure.message}{kept}", level="ERROR")
    if hub is not None and not run.workflow:
        try:
            hub.plugin_response(run.session, error=True)
        except PluginError:
            pass
    return {"status": RunStatus.FAILED.value, "reason": failure.reason}
