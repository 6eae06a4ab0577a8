"""What every step shares: its ports (``StepDeps``), the ownership guard that keeps an execution off a run
it does not own, loading the run, opening its secrets and hub client, and writing its progress."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from dalle_plugin.domain.errors import NotRunOwner, PluginError, RunCancelled
from dalle_plugin.domain.pricing import DEFAULT_PRICES
from dalle_plugin.domain.run import ImageInfo, RunRecord, RunRef, RunStatus, TimelineEntry
from dalle_plugin.port_records import StepOpening

if (
    TYPE_CHECKING
):  # the shared key's and own keys' settings: only generate's wiring builds them (a cold start)
    from dalle_plugin.domain.key_pacing import KeyPaceSettings
    from dalle_plugin.domain.rate_limit import LimiterSettings
    from dalle_plugin.domain.spending import OrgQuota
    from dalle_plugin.domain.step_io.extracted import ExtractedPrompt
    from dalle_plugin.domain.step_io.generate import GeneratedImages
    from dalle_plugin.ports import (
        AllowanceLedger,
        BatchProgress,
        BatchRequests,
        Clock,
        HubCaller,
        HubClient,
        ImageGenerator,
        ImageStore,
        KeyPacer,
        RateLimiter,
        ReusableImages,
        RunStore,
        SecretVault,
        SessionPages,
        WorkflowStarter,
    )

ANGO_KEY = "ango"
OPENAI_KEY = "openai"
#: the file name's extension and content type of each output format
FILE_TYPES = {"png": ("png", "image/png"), "jpeg": ("jpg", "image/jpeg"), "webp": ("webp", "image/webp")}


# Only ``__init__`` generated: nothing compares or prints a StepDeps, and each generated method is compiled
# at every cold start (the three of a 23-field dataclass took about 0.8 ms, half of it __repr__ and __eq__).
@dataclass(repr=False, eq=False)
class StepDeps:
    """The ports and deployment values a step works with (wiring builds them)."""

    # The docstring matters at a cold start too: a dataclass without one gets its signature as its doc,
    # which inspect computes and formats for all 23 fields.
    runs: RunStore
    clock: Clock
    vault: SecretVault
    hub_for: Callable[[HubCaller, str], HubClient]  # (run, ango api key) -> client
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
    #: own keys paced to their learned limit (None: off, each run sends at once and waits out a 429)
    key_pacer: KeyPacer | None = None
    key_pace_settings: KeyPaceSettings | None = None
    #: large batches: where the API keeps the accepted request, the starter's progress, and the starter
    #: state machine (None: the API stores every batch itself)
    batch_requests: BatchRequests | None = None
    batch_progress: BatchProgress | None = None
    batch_starter: WorkflowStarter | None = None
    #: the session's run states at a glance, to answer a late duplicate of a large batch (API only)
    session_pages: SessionPages | None = None


# ---- helpers shared by the steps ------------------------------------------------------------------

T = TypeVar("T")


def required(value: T | None, what: str) -> T:
    """What a step cannot do without: a port its wiring must give it, or a part of the run an earlier step
    wrote. None here is a bug (wiring or step order), named rather than met later as an AttributeError."""
    if value is None:
        raise RuntimeError(f"{what} is missing: a bug in the step's wiring or in the order of the steps")
    return value


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


class CarryingRuns:
    """The run store with ``also`` applied before every change a step makes (on the record as written
    again after a conflict too): what an earlier step handed on for this one's first write to record."""

    def __init__(self, runs: RunStore, also: Callable[[RunRecord], object]):
        self._runs = runs
        self._also = also  # what it returns is not used

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runs, name)

    def _with_also(self, mutate: Callable[[RunRecord], None]) -> Callable[[RunRecord], None]:
        def both(run: RunRecord) -> None:
            self._also(run)
            mutate(run)

        return both

    def update(self, session: str, task_id: str, mutate: Callable[[RunRecord], None]) -> RunRecord:
        return self._runs.update(session, task_id, self._with_also(mutate))

    def change(self, run: RunRecord, mutate: Callable[[RunRecord], None]) -> RunRecord:
        return self._runs.change(run, self._with_also(mutate))


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


def load_active(ref: RunRef, deps: StepDeps) -> RunRecord:
    """The run a step works on; a cancelled run goes no further (the Catch path ends its task)."""
    return _active(load_run(ref, deps), ref)


def load_active_with_offer(ref: RunRef, deps: StepDeps, fingerprint: str) -> tuple[RunRecord, bool]:
    """``load_active``, and whether an image is on offer for ``fingerprint``, in one read."""
    run, on_offer = deps.runs.get_with_offer(ref.session, ref.task_id, fingerprint)
    if run is None:
        raise PluginError(f"No run for session {ref.session!r} and task {ref.task_id!r}.")
    return _active(run, ref), on_offer


def open_active(
    ref: RunRef,
    deps: StepDeps,
    now_ms: int,
    status: RunStatus | None,
    entries: list[TimelineEntry],
    also_refused: tuple[RunStatus, ...] = (),
    sets: dict[str, Any] | None = None,
    absent: tuple[str, ...] = (),
    equal: dict[str, Any] | None = None,
) -> tuple[RunRecord, bool]:
    """``load_active`` whose read is the step's first write (``RunStore.open_step``): (the run as written,
    True), or (the run as it is, False) when it is in one of ``also_refused``, has a field of ``absent``
    or a field of ``equal`` at another value, or is in the earlier layout,
    for the step to decide on. Another execution's run and a cancelled run are refused as in ``load_active``."""
    opening = StepOpening(
        caller=ref.caller,
        refused=(RunStatus.CANCELLED, *also_refused),
        updated_at_ms=now_ms,
        status=status,
        entries=tuple(entries),
        sets=sets or {},
        absent=absent,
        equal=equal or {},
    )
    run, opened = deps.runs.open_step(ref.session, ref.task_id, opening)
    if run is None:
        raise PluginError(f"No run for session {ref.session!r} and task {ref.task_id!r}.")
    return (run, True) if opened else (_active(run, ref), False)


def _active(run: RunRecord, ref: RunRef) -> RunRecord:
    check_owner(run, ref.caller)
    if run.status is RunStatus.CANCELLED:
        raise RunCancelled("The run was cancelled before its image was generated.")
    return run


def open_secrets(run: RunRecord, deps: StepDeps) -> dict[str, str]:
    if not run.sealed_secrets:
        raise PluginError("This run's credentials were already removed (the run has ended).")
    return deps.vault.open(run.sealed_secrets, run.encryption_context)


def open_hub(run: RunRecord, deps: StepDeps) -> HubClient:
    return deps.hub_for(run, open_secrets(run, deps)[ANGO_KEY])


def try_open_hub(run: RunRecord, deps: StepDeps) -> HubClient | None:
    """The hub client where the run's secrets can still be opened; None where they cannot (already purged,
    or the vault is down): telling the hub is then skipped, never a reason to fail."""
    try:
        return open_hub(run, deps)
    except PluginError:
        return None


def mark(run: RunRecord, now_ms: int, step: str, status: RunStatus | None, detail: str | None = None) -> None:
    """Append to the timeline (the previous entry's duration is derived from this one's start when read:
    the store appends the new entry without rewriting the others). A cancelled run stays cancelled: a step
    whose write comes after the cancel (it read the run before, then waited on the hub) is refused under the
    run's version lock, or it would reopen a run whose execution the cancel has already stopped."""
    if status not in (None, RunStatus.CANCELLED) and run.status is RunStatus.CANCELLED:
        raise RunCancelled("The run was cancelled before its image was generated.")
    run.timeline.append(
        TimelineEntry(step=step, status=(status or run.status).value, at_ms=now_ms, detail=detail)
    )
    if status is not None:
        run.status = status
    run.updated_at_ms = now_ms


def generating_line(run: RunRecord) -> str:
    """The line Generate writes when it spends an attempt (Extract hands it on for a first spend)."""
    return (
        f"Generating {count_images(run.images_per_task)} with {run.model.actual} "
        f"({run.size}, {run.output_format})."
    )


def may_spend_first(run: RunRecord) -> bool:
    """Whether Generate's first write may spend the run's first attempt without reading the run: nothing it
    would look at before spending can be there (an image, one on offer for its task, a stored image of an
    earlier attempt, a spending limit's grant, a wait)."""
    return (
        run.no_offer_at_accept
        and run.attempt == 0
        and run.image is None
        and run.max_cost_usd is None
        and not run.held
        and run.rate_wait is None
    )


def record_extracted(run: RunRecord, extracted: ExtractedPrompt) -> bool:
    """Extract's prompt and its two lines, once (whether they were added): a write that already carried
    them is not repeated."""
    if any(entry.step == "extract" and entry.at_ms == extracted.started_ms for entry in run.timeline):
        return False
    run.prompt = extracted.prompt
    run.timeline.extend(extracted.entries())
    run.updated_at_ms = max(run.updated_at_ms, extracted.at_ms)
    return True


def record_generated(run: RunRecord, generated: GeneratedImages) -> None:
    """Generate's images, its line, and its grants taken off the record (paid for: they stay counted), once:
    a record that has its image already is left as it is."""
    if run.image is not None:
        return
    run.image, run.more_images = generated.images[0], list(generated.images[1:])
    run.held = []
    run.timeline.append(generated.entry())
    run.updated_at_ms = max(run.updated_at_ms, generated.at_ms)


def progress(
    run: RunRecord,
    deps: StepDeps,
    step: str,
    status: RunStatus | None,
    message: str,
    hub: HubClient | None = None,
    level: str = "INFO",
) -> RunRecord:
    now = deps.clock.now_ms()
    run = deps.runs.change(run, lambda r: mark(r, now, step, status, message))
    hub_log(run, hub, message, level)
    return run


def hub_log(run: RunRecord, hub: HubClient | None, message: str, level: str = "INFO") -> None:
    """Progress lines are best effort: a hub that drops a log line must not fail the run."""
    if hub is None:
        return
    with contextlib.suppress(PluginError):
        hub.plugin_log(run.session, message, level=level, taskId=run.task_id)


def hub_log_meanwhile(
    run: RunRecord, hub: HubClient | None, message: str, level: str = "INFO"
) -> Callable[[], None]:
    """Send a progress line while the step goes on with its work, and return what waits for it. A line is
    best effort, so it need not hold up the step's next call; the caller waits for it before its next
    line (the hub keeps them in order) and before the step returns (a Lambda's threads stop with it)."""
    if hub is None:
        return lambda: None
    sending = threading.Thread(target=hub_log, args=(run, hub, message, level), daemon=True)
    sending.start()
    return sending.join


def image_key(run: RunRecord, index: int = 0) -> str:
    """Deterministic per run and index, so a retried Generate finds the images it already paid for."""
    extension = FILE_TYPES[run.output_format][0]
    made_from = f".{image_fingerprint(run)[:16]}" if run.prompt else ""  # another prompt, another key
    return f"images/{run.execution_name}{made_from}{f'.{index + 1}' if index else ''}.{extension}"


def image_info(
    run: RunRecord,
    key: str,
    body: bytes,
    index: int = 0,
    *,
    model: str | None = None,
    request_id: str | None = None,
    reused: bool = False,
) -> ImageInfo:
    """What the run record keeps of an image stored at ``key``: its digest and size, and the run's options
    it was made with (``model``: the one OpenAI says answered, when it says)."""
    return ImageInfo(
        key=key,
        sha256=hashlib.sha256(body).hexdigest(),
        bytes=len(body),
        model=model or run.model.actual,
        size=run.size,
        quality=run.quality,
        request_id=request_id,
        reused=reused,
        format=run.output_format,
        index=index,
        fingerprint=image_fingerprint(run),
    )


def stored_images(run: RunRecord, images: ImageStore | None) -> list[ImageInfo]:
    """The images an attempt of the run's generation paid for and stored at its keys (first to last, as they
    are stored), whether or not any step recorded them."""
    if run.attempt == 0:  # no attempt spent in any generation: no request was sent, nothing can be stored
        return []
    found = []
    for index in range(run.images_per_task):
        key = image_key(run, index)
        body = required(images, "StepDeps.images").get(key)
        if body is None:
            break
        found.append(image_info(run, key, body, index))
    return found


def to_rfc3339_second(epoch_ms: int) -> str:
    """Rounded UP to the whole second: Step Functions truncates Wait timestamps, and must never wake early."""
    seconds = math.ceil(epoch_ms / 1000)
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def queue_id(run: RunRecord) -> str:
    """The run's place in the shared key's queue: the same for every attempt of this generation."""
    return f"{run.execution_name}#g{run.generation}"


def image_fingerprint(run: RunRecord) -> str:
    """What makes two runs ask OpenAI for the same image: the same task, prompt, model and options."""
    basis: list[str | int | None] = [
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


def count_images(count: int) -> str:
    return "the image" if count == 1 else f"{count} images"


def images_as_subject(count: int) -> str:
    return "Image" if count == 1 else f"{count} images"
