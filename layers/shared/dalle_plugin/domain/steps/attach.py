"""Attach Image: upload the images to the hub, attach them and finish the task, each change sent once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

from dalle_plugin.domain.errors import HubDeliveryUnknown, HubOutcomeUnknown, PluginError, StorageUnavailable
from dalle_plugin.domain.hub_answer import answer_to_write_format
from dalle_plugin.domain.run import ImageInfo, RunRecord, RunRef, RunStatus, TimelineEntry
from dalle_plugin.domain.step_io.attach import AttachInput, AttachResult
from dalle_plugin.domain.step_io.generate import GeneratedImages
from dalle_plugin.domain.steps.machinery import (
    FILE_TYPES,
    CarryingRuns,
    StepDeps,
    count_images,
    hub_log,
    image_fingerprint,
    images_as_subject,
    load_active,
    mark,
    open_active,
    open_hub,
    owned_deps,
    record_generated,
    required,
)


def _finished_result(run: RunRecord) -> AttachResult:
    image_url = required(required(run.image, "the run's image").hub_url, "the image's hub URL")
    return AttachResult(image_url=image_url, finished_as="workflow" if run.workflow else "editor")


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


def _hub_url_setter(index: int, url: str) -> Callable[[RunRecord], None]:
    def note(run: RunRecord) -> None:
        run.image_at(index).hub_url = url

    return note


def _apply(changes: list[Callable[[RunRecord], None]]) -> Callable[[RunRecord], None]:
    def apply(run: RunRecord) -> None:
        for change in changes:
            change(run)

    return apply


def _note_intents(to_attach: list[int], submit: bool, at_ms: int | None) -> Callable[[RunRecord], None]:
    """Note (``at_ms``) or clear (None) the intent to send each attachment and the submission: every change
    the hub must not get twice is noted in one write before the first is sent. A retry that finds one noted
    and not confirmed stops with HubOutcomeUnknown rather than send it again."""

    def note(run: RunRecord) -> None:
        for index in to_attach:
            run.image_at(index).attach_sent_at_ms = at_ms
        if submit:
            run.finish_sent_at_ms = at_ms

    return note


def _confirm_attached(indexes: list[int]) -> Callable[[RunRecord], None]:
    def note(run: RunRecord) -> None:
        for index in indexes:
            run.image_at(index).attached = True

    return note


class _Opening(NamedTuple):
    entries: tuple[TimelineEntry, ...] = ()
    sets: dict[str, Any] | None = None
    absent: tuple[str, ...] = ()


def _opening_with(generated: GeneratedImages | None) -> _Opening:
    """What of Generate's outcome the opening write records: its images, its line and its grants taken off
    the record, all under the condition that the run has no image yet."""
    if generated is None:
        return _Opening()
    images = generated.images
    return _Opening(
        entries=(generated.entry(),),
        sets={"image": images[0], "more_images": list(images[1:]), "held": []},
        absent=("image",),
    )


def attach_image(ref: RunRef, deps: StepDeps) -> AttachResult:
    deps = owned_deps(ref, deps)
    uploading_ms = deps.clock.now_ms()
    generation = ref.generation if isinstance(ref, AttachInput) else None
    announced = generation.image_count if generation is not None else None
    generated = generation.generated if generation is not None else None
    opened = False
    if announced is not None:
        # The step's first write is its read: its "Uploading" line, after the images Generate handed on
        # (recorded only on a record without an image: a retry finds them there and writes them no more).
        line = TimelineEntry(
            step="attach",
            status=RunStatus.ATTACHING.value,
            at_ms=uploading_ms,
            detail=f"Uploading {count_images(announced)} to the hub.",
        )
        opening = _opening_with(generated)
        run, opened = open_active(
            ref,
            deps,
            uploading_ms,
            RunStatus.ATTACHING,
            [*opening.entries, line],
            (RunStatus.SUCCEEDED,),
            sets=opening.sets,
            absent=opening.absent,
        )
    else:
        run = load_active(ref, deps)
    if run.status is RunStatus.SUCCEEDED:
        return _finished_result(run)  # a retry of a step that finished: nothing left to do
    if generated is not None and run.image is None:
        # not recorded by the opening (a record in the earlier layout): the step's next write has them
        carried = generated
        deps = replace(deps, runs=CarryingRuns(deps.runs, lambda r: record_generated(r, carried)))
        run = run.model_copy(deep=True)
        record_generated(run, generated)
    hub = open_hub(run, deps)
    count = len(run.images)
    uploading = f"Uploading {count_images(count)} to the hub."
    hub_log(run, hub, uploading)
    # What the step has done and not yet written: written with the next intent (or the finish), one write each.
    pending: list[Callable[[RunRecord], None]] = []
    if not opened:
        pending.append(lambda r: mark(r, uploading_ms, "attach", RunStatus.ATTACHING, uploading))
    for index in range(count):
        image = run.image_at(index)
        if not image.hub_url:
            body = required(deps.images, "StepDeps.images").get(image.key)
            if body is None:  # stored by Generate, so gone only if the bucket lost it: a retry may find it
                raise StorageUnavailable(f"The generated image {image.key} is not in the bucket.")
            extension, content_type = FILE_TYPES[image.format]
            name = f"dalle-{run.task_id}-{image.sha256[:12]}.{extension}"
            url = hub.upload_file(
                run.project_id, name, body, content_type
            )  # a repeat only leaves a spare file
            run = run.model_copy(deep=True)  # the URL is only in memory until the next write takes it
            pending.append(_hub_url_setter(index, url))
            pending[-1](run)
    to_attach = [index for index in range(count) if not run.image_at(index).attached]
    for index in to_attach:  # an earlier attempt sent it and never heard back
        if run.image_at(index).attach_sent_at_ms is not None:
            raise HubOutcomeUnknown(_unconfirmed_attachment(run.image_at(index)))
    if run.workflow and run.finish_sent_at_ms is not None:
        raise HubOutcomeUnknown(_unconfirmed_submission(run))
    # Looked up before any intent is noted: a hub that fails the look-up has surely been sent nothing.
    asset = hub.get_asset(run.project_id, run.asset_id) if to_attach and run.asset_id else None
    external_id = asset.external_id if asset else run.task_id
    # One write notes every send still to come (with the progress not yet written); each outcome is then
    # written with the finish, or with the failure that stops the step.
    if to_attach or run.workflow:
        intents = _note_intents(to_attach, run.workflow, deps.clock.now_ms())
        run = deps.runs.change(run, _apply([*pending, intents]))
        pending = []
    confirmed: list[int] = []
    if to_attach:
        for position, index in enumerate(to_attach):  # in order: the hub lists attachments as they came
            image = run.image_at(index)
            try:
                hub.attach_image(run.project_id, external_id, required(image.hub_url, "the image's hub URL"))
            except HubDeliveryUnknown:
                raise HubOutcomeUnknown(_unconfirmed_attachment(image)) from None
            except PluginError:
                # surely not taken: the sends that did not happen are cleared, so a retry makes them
                not_sent = _note_intents(to_attach[position:], run.workflow, None)
                deps.runs.change(run, _apply([_confirm_attached(confirmed), not_sent]))
                raise
            confirmed.append(index)
        # Delivered: a later re-run wants a new image. Only a re-run can find its own image still on offer
        # (Generate claimed any offer before paying); an offer another session makes in between stays.
        if deps.reusable_images is not None and run.prompt is not None and run.generation > 0:
            deps.reusable_images.claim(image_fingerprint(run))
    pending.append(_confirm_attached(confirmed))

    submitted = False
    try:
        # The answer handed back is the task's current one, unchanged, so no annotation is ever wiped.
        answer = answer_to_write_format(hub.get_task(run.task_id).get("answer") or {})
        if run.workflow:
            submitted = True  # from here on the hub may have taken it
            try:
                hub.annotate(run.task_id, answer)
            except HubDeliveryUnknown:
                raise HubOutcomeUnknown(_unconfirmed_submission(run)) from None
            except PluginError:
                submitted = False
                raise
        else:
            hub.plugin_response(run.session, response=answer)  # a repeat is harmless: the same answer again
    except PluginError:
        # What was delivered is recorded before the step gives up: a retry then sends only what is left,
        # and an attachment the hub confirmed never looks unconfirmed to it.
        if not submitted and run.workflow:
            pending.append(_note_intents([], True, None))
        deps.runs.change(run, _apply(pending))
        raise
    elapsed_s = (deps.clock.now_ms() - run.created_at_ms) / 1000
    message = f"{images_as_subject(count)} attached to the asset. Finished in {elapsed_s:.1f} s."
    now = deps.clock.now_ms()

    def finish(r: RunRecord) -> None:
        for apply in pending:
            apply(r)
        mark(r, now, "finished", RunStatus.SUCCEEDED, message)
        r.timeline[-1].duration_ms = 0
        r.sealed_secrets = None

    # The hub's log has the whole story by the time the session says SUCCEEDED (a retried step may say it twice).
    hub_log(run, hub, message)
    run = deps.runs.change(run, finish)
    return _finished_result(run)
