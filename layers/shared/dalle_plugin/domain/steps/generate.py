"""Generate Image: pay for each image once. A stored image is never generated again; spending limits and the
shared key's queue are honoured before the one request is sent; a wait is returned to the state machine."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from dalle_plugin.domain.errors import (
    NotRunOwner,
    OpenAIRateLimitPersisted,
    PluginError,
    QueueTooLong,
    RunCancelled,
    UpstreamRateLimited,
)
from dalle_plugin.domain.key_pacing import Observation
from dalle_plugin.domain.rate_limit import LimiterSettings, wake_at_ms
from dalle_plugin.domain.run import (
    HeldAllowance,
    ImageInfo,
    RateWait,
    RunRecord,
    RunRef,
    RunStatus,
    TimelineEntry,
)
from dalle_plugin.domain.spending import QuotaWait, release, take_allowances
from dalle_plugin.domain.step_io.extracted import ExtractedPrompt
from dalle_plugin.domain.step_io.generate import GeneratedImages, GenerateInput, GenerateOutcome
from dalle_plugin.domain.steps.machinery import (
    ANGO_KEY,
    FILE_TYPES,
    OPENAI_KEY,
    CarryingRuns,
    StepDeps,
    generating_line,
    hub_log,
    hub_log_meanwhile,
    image_fingerprint,
    image_info,
    image_key,
    images_as_subject,
    load_active,
    load_active_with_offer,
    mark,
    open_active,
    open_secrets,
    owned_deps,
    record_extracted,
    record_generated,
    required,
    stored_images,
    to_rfc3339_second,
)
from dalle_plugin.domain.steps.own_key import claim_own_key_send, learn_key_limits
from dalle_plugin.image_generation import GeneratedImage, ImageRequest
from dalle_plugin.port_records import RateClaim, RateDecision

if TYPE_CHECKING:
    from dalle_plugin.ports import HubClient

#: 429 rate_limit_exceeded answers a run takes in a row (waiting the time OpenAI asks each time) before it
#: gives up: a key whose limit stays used up must end the run, not loop it for days
MAX_RATE_LIMITED_ANSWERS = 5


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
        mark(r, now, "wait", RunStatus.WAITING_FOR_SLOT, message)

    run = deps.runs.change(run, mutate)
    hub_log(run, hub, message)
    retry_at = to_rfc3339_second(start_at_ms)
    wait_s = max(0, math.ceil(start_at_ms / 1000) - now // 1000)
    return GenerateOutcome(status="WAIT", retry_at=retry_at, wait_seconds=wait_s, reason=reason)


def _done(run: RunRecord) -> GenerateOutcome:
    image = required(run.image, "the run's image")
    return GenerateOutcome(status="DONE", image_key=image.key, image_count=len(run.images))


def generate_image(ref: RunRef, deps: StepDeps) -> GenerateOutcome:
    deps = owned_deps(ref, deps)
    fingerprint = ref.image_fingerprint if isinstance(ref, GenerateInput) else None
    extracted = ref.extracted if isinstance(ref, GenerateInput) else None
    if extracted is not None:
        # Extract's prompt and lines go with this step's first write (every write: each skips them once
        # they are on the record), and into the run as read, which the checks below look at.
        carried = extracted
        deps = replace(deps, runs=CarryingRuns(deps.runs, lambda r: record_extracted(r, carried)))
    on_offer: bool | None = None  # not looked at: claim to find out
    # the first try only: a retry after an error that followed its spend reads, then spends the next attempt
    spend_line = ref.spend_line if isinstance(ref, GenerateInput) and ref.retry_count == 0 else None
    first = (
        _spend_first(ref, deps, extracted, spend_line)
        if spend_line and extracted is not None and _no_grants_to_take(deps)
        else None
    )
    if isinstance(first, GenerateOutcome):
        return first
    spent = first is not None and first[1]
    if first is not None:  # the first write was the read: no image on offer for the task at acceptance
        run = first[0]
        on_offer = False if run.no_offer_at_accept else None
    elif fingerprint is not None and deps.reusable_images is not None:
        run, on_offer = load_active_with_offer(ref, deps, fingerprint)
    else:
        run = load_active(ref, deps)
    if not spent:
        unwritten = extracted is not None and record_extracted(run, extracted)
        if fingerprint is not None and fingerprint != image_fingerprint(run):
            on_offer = None  # the prompt changed since: the look was at another image
        if run.image is not None:
            if _made_for(run.image, run):
                # a re-run whose image is already here (its delivery failed): the only write is Extract's lines
                return _done(deps.runs.change(run, lambda r: None) if unwritten else run)
            # A re-run after the prompt (or an option) changed: the earlier image is not what is asked now.
            run = deps.runs.change(run, _drop_images)
        stored = stored_images(run, deps.images)
        if stored:
            return _adopt_stored_images(run, stored, deps)

    secrets = open_secrets(run, deps)  # opened once: every call before the request delays a booked start
    hub = deps.hub_for(run, secrets[ANGO_KEY])
    if not spent:
        reused = _reuse_undelivered_image(run, deps, hub, on_offer)
        if reused is not None:
            return reused
    api_key = (
        required(deps.default_openai_key, "StepDeps.default_openai_key")()
        if run.uses_default_key
        else secrets[OPENAI_KEY]
    )
    # Spending limits are counted before the claim: a run refused by them never takes a send, and its
    # Record Failure takes its ticket out of its line.
    held = _hold_allowances(run, deps, hub)
    if isinstance(held, GenerateOutcome):
        return held
    generator = required(deps.generator, "StepDeps.generator")
    generator.prepare(api_key)  # the client is built before the claim: nothing slow stands after it
    if not spent:
        held = _spend(held, deps)
        if isinstance(held, GenerateOutcome):
            return held
    claimed = _claim_request_start(held, deps, hub, api_key)
    if isinstance(claimed, GenerateOutcome):
        return claimed
    run, grant = claimed
    request = ImageRequest(
        model=run.model.actual,
        prompt=required(run.prompt, "the run's prompt").text,
        size=run.size,
        quality=run.quality,
        n=run.images_per_task,
        output_format=None if run.output_format == "png" else run.output_format,
        output_compression=run.output_compression,
        background=run.background,
    )
    if grant is not None and not grant.still_counted(deps):  # the last thing before the request leaves
        return _lost_turn(run, deps, hub)
    started = deps.clock.now_ms()
    # The hub hears "generating" while the request is on its way: a hub call before it would stand
    # between the booked start and the request.
    told_hub = hub_log_meanwhile(run, hub, run.timeline[-1].detail or "")
    try:
        try:
            image = generator.generate(request, api_key)
        finally:
            told_hub()
    except UpstreamRateLimited as exc:
        observed = Observation(True, limit_requests=exc.limit_requests, retry_after_ms=exc.retry_after_ms)
        learn_key_limits(run, deps, api_key, observed)
        given_back: list[HeldAllowance] = []

        def count(r: RunRecord) -> None:
            _count_rate_limited(r)
            given_back[:], r.held = r.held, []  # a 429 is not billed: given back once written

        if run.upstream_rate_limited + 1 >= MAX_RATE_LIMITED_ANSWERS:
            run = deps.runs.change(run, count)
            _give_back(given_back, deps)
            raise OpenAIRateLimitPersisted(
                f"OpenAI answered 429 rate_limit_exceeded {run.upstream_rate_limited} times in a row, each "
                "time after waiting as long as it asked: the key's rate limit is used up by other work. Run the "
                "plugin again later, or raise the key's limits on platform.openai.com."
            ) from None
        # counted in the same write that starts the wait
        waiting = _wait(
            run,
            deps,
            deps.clock.now_ms() + exc.retry_after_ms,
            "openai_rate_limited",
            exc.message,
            hub,
            None,
            also=count,
        )
        _give_back(given_back, deps)
        return waiting
    except PluginError as exc:
        if run.held and not getattr(
            exc, "maybe_billed", False
        ):  # an error answer carries no image to pay for
            taken_off: list[HeldAllowance] = []

            def take_off(r: RunRecord) -> None:
                taken_off[:], r.held = r.held, []

            deps.runs.change(run, take_off)
            _give_back(taken_off, deps)
        raise
    elapsed_s = (deps.clock.now_ms() - started) / 1000
    message = f"{images_as_subject(len(image.bodies[: run.images_per_task]))} generated in {elapsed_s:.1f} s."
    # The line goes out while the images are stored and recorded: it says they were generated (and paid
    # for), which holds whatever the storing meets.
    told_hub = hub_log_meanwhile(run, hub, message)
    try:
        return _keep_images(run, deps, api_key, image, message)
    finally:
        told_hub()


def _keep_images(
    run: RunRecord, deps: StepDeps, api_key: str, image: GeneratedImage, message: str
) -> GenerateOutcome:
    """Store the images a request returned, then record them on the run."""
    if image.limits is not None:
        observed = Observation(
            False,
            image.limits.limit_requests,
            image.limits.remaining_requests,
            arrived_by_ms=image.limits.arrived_by_ms,
        )
        learn_key_limits(run, deps, api_key, observed)
    # Every image is stored before any is recorded: a step that dies in between finds them at their keys.
    content_type = FILE_TYPES[run.output_format][1]
    infos = []
    for index, body in enumerate(image.bodies[: run.images_per_task]):
        key = image_key(run, index)
        info = image_info(run, key, body, index, model=image.model, request_id=image.request_id)
        metadata = {
            "model": image.model,
            "size": run.size,
            "sha256": info.sha256,
            "request-id": image.request_id or "",
        }
        required(deps.images, "StepDeps.images").put_image(key, body, content_type, metadata)
        infos.append(info)
    # Recorded by Attach's first write (with the grants taken off the record: paid for, they stay counted).
    # Until then the run stays GENERATING, which no cancel takes; a step that retries finds the images at
    # their keys, and Record Failure offers or records the images stored and never recorded.
    generated = GeneratedImages(images=infos, at_ms=deps.clock.now_ms(), message=message)
    return GenerateOutcome(status="DONE", image_key=infos[0].key, image_count=len(infos), generated=generated)


def run_as_left(run: RunRecord | None, outcome: GenerateOutcome) -> RunRecord | None:
    """The run as the step left it (``RunStore.recent``), with the images it hands on to Attach."""
    if run is not None and outcome.generated is not None:
        record_generated(run, outcome.generated)
    return run


def _made_for(image: ImageInfo, run: RunRecord) -> bool:
    """Whether the image is what the run asks for now (an image from before fingerprints counts as such)."""
    return image.fingerprint is None or run.prompt is None or image.fingerprint == image_fingerprint(run)


def _drop_images(run: RunRecord) -> None:
    if run.image is not None and not _made_for(run.image, run):
        run.image, run.more_images = None, []


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

    def hold(r: RunRecord) -> None:
        if r.status is RunStatus.CANCELLED:  # its cancel has given back what the record held, not these
            raise RunCancelled("The run was cancelled before its image was generated.")
        r.held.extend(outcome)

    try:
        return deps.runs.change(run, hold)
    except (RunCancelled, NotRunOwner):
        # never on the record, so no one else will give them back (the execution may be stopped)
        _give_back(outcome, deps)
        raise


def _give_back(grants: list[HeldAllowance], deps: StepDeps) -> None:
    """Give back grants this step took off the run record (or never wrote to it): only the writer that
    removed them does, so each is given back once however the step races a cancel or a failure."""
    if grants:
        release(grants, required(deps.allowances, "StepDeps.allowances"))


def _spend_attempt(run: RunRecord) -> None:
    if run.status is RunStatus.CANCELLED:  # decided under the run's version lock: cancel or pay, never both
        raise RunCancelled("The run was cancelled before its image was generated.")
    run.attempt += 1
    run.rate_wait = None


class _TakenByAnotherDelivery(Exception):
    pass


@dataclass(frozen=True)
class _SharedKeyGrant:
    """A send granted on the shared key, to be confirmed right before the request leaves."""

    claim: RateClaim
    decision: RateDecision

    def still_counted(self, deps: StepDeps) -> bool:
        """Whether the send is counted at a recorded time within the tolerance of now (stamped again if the
        step was held up since its grant); False when its slot went to a later send meanwhile."""
        limiter = required(deps.limiter, "StepDeps.limiter")
        return limiter.confirm_send(self.claim, self.decision) is not None


def _lost_turn(run: RunRecord, deps: StepDeps, hub: HubClient) -> GenerateOutcome:
    """The step was held up so long after its grant that its slot went to a later send: nothing was sent;
    its next claim finds its ticket served and takes it back at the head of its line (never demoted)."""
    message = (
        "Its turn on the shared OpenAI key passed while the step was held up before sending (nothing was "
        "sent or paid for); it keeps its place at the head of its line and sends at the next free slot."
    )

    def forget_view(r: RunRecord) -> None:
        r.rate_view = ""

    now = deps.clock.now_ms()
    return _wait(run, deps, now, "rate_slot", message, hub, None, also=forget_view)


def _no_grants_to_take(deps: StepDeps) -> bool:
    """Whether no run of this deployment asks for the organisations' daily quota (a session's spending
    limit is the run's own: Extract hands on a first spend only for a run without one)."""
    return deps.allowances is None or deps.org_quota is None or deps.org_quota.images_per_day <= 0


def _spend_first(
    ref: RunRef, deps: StepDeps, extracted: ExtractedPrompt, line: str
) -> tuple[RunRecord, bool] | GenerateOutcome:
    """The first Generate of a run (never one after a Wait): its first write is its read, and spends the
    run's first attempt with Extract's prompt and lines and the "Generating" line, only while no attempt is
    spent and nothing Generate looks at before spending is there (``may_spend_first``). Refused, the record
    as it is is the read: a spent attempt means another delivery of this very step took it and is sending
    (``_spend``'s fence, without the read), so this one sends nothing; none spent, the step goes on as read."""
    now = deps.clock.now_ms()
    entries = [
        *extracted.entries(),
        TimelineEntry(step="generate", status=RunStatus.GENERATING.value, at_ms=now, detail=line),
    ]
    run, spent = open_active(
        ref,
        deps,
        now,
        RunStatus.GENERATING,
        entries,
        (RunStatus.SUCCEEDED, RunStatus.FAILED),
        sets={"prompt": extracted.prompt, "attempt": 1},
        absent=("image", "rate_wait", "max_cost_usd"),
        equal={"attempt": 0, "no_offer_at_accept": True},
    )
    if not spent and run.attempt != 0:
        return _taken_by_another_delivery(now)
    return run, spent


def _taken_by_another_delivery(now: int) -> GenerateOutcome:
    """Another delivery of this step took the attempt and is sending: look again shortly (its image will be
    there), never send a second request."""
    return GenerateOutcome(
        status="WAIT", retry_at=to_rfc3339_second(now + 5_000), wait_seconds=5, reason="duplicate_delivery"
    )


def _spend(run: RunRecord, deps: StepDeps) -> RunRecord | GenerateOutcome:
    """The attempt spent under the run's version lock: a cancel and a send never both happen, and a second
    delivery of this very step that read the same record finds the attempt taken and sends nothing."""
    expected = run.attempt
    now = deps.clock.now_ms()
    message = generating_line(run)

    def spend(r: RunRecord) -> None:
        if r.attempt != expected:
            raise _TakenByAnotherDelivery()
        _spend_attempt(r)
        mark(r, now, "generate", RunStatus.GENERATING, message)

    try:
        return deps.runs.change(run, spend)  # re-run on the current record if another write came first
    except _TakenByAnotherDelivery:
        return _taken_by_another_delivery(now)


def _claim_request_start(
    run: RunRecord, deps: StepDeps, hub: HubClient, api_key: str
) -> tuple[RunRecord, _SharedKeyGrant | None] | GenerateOutcome:
    """Take this run's turn to send its one image request (its attempt spent), or the Wait outcome while its
    turn lies ahead. On the shared key the send is claimed in the queue: the claim is the last thing before
    the request leaves, and it is checked against the actual sends of the last ``limit`` requests
    (``domain.rate_limit``).
    """
    if not run.uses_default_key:
        key_wait = claim_own_key_send(run, deps, api_key)
        if key_wait is None:
            return run, None
        return _wait(run, deps, key_wait.wake_at_ms, "key_pace", key_wait.message, hub, None)
    return _claim_shared_key_send(run, deps, hub)


def _claim_shared_key_send(
    run: RunRecord, deps: StepDeps, hub: HubClient
) -> tuple[RunRecord, _SharedKeyGrant] | GenerateOutcome:
    """The shared key's queue (``domain.rate_limit``): the run claims its send with the ticket it took at
    acceptance; told its turn lies ahead, it sleeps until then (its session and the hub say where it
    stands), and claims again when it wakes."""
    settings = required(deps.limiter_settings, "StepDeps.limiter_settings")
    limiter = required(deps.limiter, "StepDeps.limiter")
    org, interactive = run.org_id or "", not run.workflow
    if run.rate_refused_ms is not None:
        raise QueueTooLong(_queue_too_long(run.rate_refused_ms, None, settings))
    ticket, view = run.rate_ticket, run.rate_view
    if ticket is None:  # accepted before the queue took tickets at acceptance: join now
        joined = limiter.join(org, interactive, 1)
        if not joined.admitted:
            raise QueueTooLong(
                _queue_too_long(joined.starts_at_ms[0] - deps.clock.now_ms(), joined.positions[0], settings)
            )
        ticket, view = joined.first_ticket, joined.view
    ask = RateClaim(org, interactive, ticket, f"{run.execution_name}#{run.attempt}", view)
    decision = limiter.claim(ask)
    if decision.granted:
        return run, _SharedKeyGrant(ask, decision)
    now = deps.clock.now_ms()
    wait = RateWait(
        ticket=str(decision.ticket),
        start_at_ms=decision.start_at_ms,
        reserved=False,
        position=decision.position,
    )

    def keep_place(r: RunRecord) -> None:
        r.rate_ticket, r.rate_view = decision.ticket, decision.view

    eta = dt.datetime.fromtimestamp(decision.start_at_ms / 1000, tz=dt.UTC).strftime("%H:%M:%S")
    message = (
        f"Waiting for its turn on the shared OpenAI key ({settings.limit} images per "
        f"{settings.window_s:g} s across the hub): {decision.position} runs go before it, "
        f"it starts at {eta} UTC, in about {max(0, math.ceil((decision.start_at_ms - now) / 1000))} s."
    )
    return _wait(
        run,
        deps,
        wake_at_ms(decision.start_at_ms, settings),
        "rate_slot",
        message,
        hub,
        wait,
        also=keep_place,
    )


def _queue_too_long(wait_ms: int, position: int | None, settings: LimiterSettings) -> str:
    wait_min = max(1, round(wait_ms / 60_000))
    cap_min = max(1, round(settings.max_queue_wait_s / 60))
    ahead = f"{position} runs ahead of it, " if position is not None else ""
    return (
        f"The shared OpenAI key is busy: this run would have waited about {wait_min} min for its turn "
        f"({ahead}{settings.limit} images per {settings.window_s:g} s across the hub), more than the "
        f"{cap_min} min this deployment allows, so it was not queued. Run it again later, or bring your own "
        "OpenAI key (the Config JSON's openai_api_key) to skip the shared queue."
    )


def _count_rate_limited(run: RunRecord) -> None:
    run.upstream_rate_limited += 1


def _reuse_undelivered_image(
    run: RunRecord, deps: StepDeps, hub: HubClient, on_offer: bool | None
) -> GenerateOutcome | None:
    """A run of the same task that paid for this very image and then failed to deliver it (a hub that
    stayed down) left it on offer: take it instead of paying again. Single-image runs only. The claim (a
    write) is made only when the step's read saw an offer, or did not look (``on_offer`` None)."""
    if deps.reusable_images is None or run.prompt is None or run.images_per_task != 1 or on_offer is False:
        return None
    key = deps.reusable_images.claim(image_fingerprint(run))
    body = required(deps.images, "StepDeps.images").get(key) if key else None
    if key is None or body is None:  # none on offer, or the bucket's lifecycle rule already removed it
        return None
    message = "Reusing the image an earlier run of this task paid for and could not deliver (no new charge)."
    info = image_info(run, key, body, reused=True)
    now = deps.clock.now_ms()

    def mutate(r: RunRecord) -> None:
        if r.status is RunStatus.CANCELLED:
            raise RunCancelled("The run was cancelled before its image was generated.")
        if r.image is None or not _made_for(r.image, r):
            r.image, r.more_images = info, []
        mark(r, now, "generate", None, message)

    try:
        run = deps.runs.change(run, mutate)
    except (RunCancelled, NotRunOwner):  # it stays on offer for the next run of the task: paid, never lost
        deps.reusable_images.offer(
            image_fingerprint(run), key, run.expires_at or now // 1000 + 86_400, run.offer_scope
        )
        raise
    hub_log(run, hub, message)
    return GenerateOutcome(status="DONE", image_key=required(run.image, "the run's image").key, image_count=1)


def _adopt_stored_images(run: RunRecord, infos: list[ImageInfo], deps: StepDeps) -> GenerateOutcome:
    """A previous attempt paid for and stored the images but died before recording them: use them."""

    def adopt(r: RunRecord) -> None:
        if r.image is None:
            r.image, r.more_images = infos[0], infos[1:]
        r.held = []

    return _done(deps.runs.change(run, adopt))
