"""Attach Image: upload the images to the hub, attach them and finish the task, each change sent once."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

from dalle_plugin.domain.errors import HubDeliveryUnknown, HubOutcomeUnknown, PluginError, StorageUnavailable
from dalle_plugin.domain.hub_answer import answer_to_write_format
from dalle_plugin.domain.run import AttachResult, ImageInfo, RunRecord, RunRef, RunStatus
from dalle_plugin.domain.steps.machinery import (
    FILE_TYPES,
    StepDeps,
    count_images,
    hub_log,
    hub_log_meanwhile,
    image_fingerprint,
    images_as_subject,
    load_active,
    mark,
    open_hub,
    owned_deps,
    required,
)
from dalle_plugin.ports import HubClient


def _finished_result(run: RunRecord) -> AttachResult:
    image_url = required(required(run.image, "the run's image").hub_url, "the image's hub URL")
    return AttachResult(image_url=image_url, finished_as="workflow" if run.workflow else "editor")


def _send_once(
    run: RunRecord,
    deps: StepDeps,
    mark: Callable[[RunRecord, int | None], None],
    send: Callable[[], object],
    unconfirmed: str,
    pending: list[Callable[[RunRecord], None]],
) -> RunRecord:
    """Send a change the hub must not get twice: note the intent first, then send. If the hub surely did
    not take it, the note is cleared so a retry sends it again; if it may have, the run stops with
    ``unconfirmed`` (sending again could make it twice, and the hub cannot be asked). The step's progress
    not yet written (``pending``) goes in the same write as the intent."""
    now = deps.clock.now_ms()

    def note_intent(r: RunRecord) -> None:
        for apply in pending:
            apply(r)
        mark(r, now)

    run = deps.runs.change(run, note_intent)
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


def _hub_url_setter(index: int, url: str) -> Callable[[RunRecord], None]:
    def note(run: RunRecord) -> None:
        run.image_at(index).hub_url = url

    return note


def _attached_setter(index: int) -> Callable[[RunRecord], None]:
    def note(run: RunRecord) -> None:
        run.image_at(index).attached = True

    return note


def _attach_sent_setter(index: int) -> Callable[[RunRecord, int | None], None]:
    def mark(run: RunRecord, at_ms: int | None) -> None:
        run.image_at(index).attach_sent_at_ms = at_ms

    return mark


def _set_finish_sent(run: RunRecord, at_ms: int | None) -> None:
    run.finish_sent_at_ms = at_ms


def attach_image(ref: RunRef, deps: StepDeps) -> AttachResult:
    deps = owned_deps(ref, deps)
    run = load_active(ref, deps)
    if run.status is RunStatus.SUCCEEDED:
        return _finished_result(run)  # a retry of a step that finished: nothing left to do
    with ThreadPoolExecutor(max_workers=2) as meanwhile:
        # Reads only, each needing nothing but the run: side by side with the steps that need the secrets.
        first = next((i for i, image in enumerate(run.images) if not image.hub_url), None)
        first_body = None if first is None else meanwhile.submit(_stored_body, run, deps, first)
        hub = open_hub(run, deps)
        asset = (
            meanwhile.submit(hub.get_asset, run.project_id, run.asset_id)
            if run.asset_id and not all(image.attached for image in run.images)
            else None
        )
        run, pending = _upload(run, deps, hub, first, first_body)
        if not all(image.attached for image in run.images):
            external_id = asset.result().external_id if asset else run.task_id
            run = _attach(run, deps, hub, external_id, pending)
    return _finish(run, deps, hub, pending)


def _stored_body(run: RunRecord, deps: StepDeps, index: int) -> bytes:
    image = run.image_at(index)
    body = required(deps.images, "StepDeps.images").get(image.key)
    if body is None:  # stored by Generate, so gone only if the bucket lost it: a retry may find it
        raise StorageUnavailable(f"The generated image {image.key} is not in the bucket.")
    return body


def _upload(
    run: RunRecord, deps: StepDeps, hub: HubClient, first: int | None, first_body: Future[bytes] | None
) -> tuple[RunRecord, list[Callable[[RunRecord], None]]]:
    """Upload each image the hub does not have yet; returns the run with their URLs (in memory) and the
    step's progress not yet written."""
    count = len(run.images)
    uploading = f"Uploading {count_images(count)} to the hub."
    uploading_ms = deps.clock.now_ms()
    told_hub = hub_log_meanwhile(run, hub, uploading)  # while the first image is read and uploaded
    # What the step has done and not yet written: written with the next intent (or the finish), one write each.
    pending: list[Callable[[RunRecord], None]] = [
        lambda r: mark(r, uploading_ms, "attach", RunStatus.ATTACHING, uploading)
    ]
    try:
        for index in range(count):
            image = run.image_at(index)
            if not image.hub_url:
                body = (
                    first_body.result() if first_body and index == first else _stored_body(run, deps, index)
                )
                extension, content_type = FILE_TYPES[image.format]
                name = f"dalle-{run.task_id}-{image.sha256[:12]}.{extension}"
                url = hub.upload_file(
                    run.project_id, name, body, content_type
                )  # a repeat only leaves a spare file
                run = run.model_copy(deep=True)  # the URL is only in memory until the next write takes it
                pending.append(_hub_url_setter(index, url))
                pending[-1](run)
    finally:
        told_hub()
    return run, pending


def _attach(
    run: RunRecord,
    deps: StepDeps,
    hub: HubClient,
    external_id: str,
    pending: list[Callable[[RunRecord], None]],
) -> RunRecord:
    """Attach each image not yet attached, in order, each sent once."""
    for index in range(len(run.images)):  # in order: the hub lists attachments as they came
        image = run.image_at(index)
        if image.attached:
            continue
        if image.attach_sent_at_ms is not None:  # an earlier attempt sent it and never heard back
            raise HubOutcomeUnknown(_unconfirmed_attachment(image))
        run = _send_once(
            run,
            deps,
            _attach_sent_setter(index),
            partial(
                hub.attach_image,
                run.project_id,
                external_id,
                required(image.hub_url, "the image's hub URL"),
            ),
            _unconfirmed_attachment(image),
            pending,
        )
        pending.append(_attached_setter(index))
    # Delivered: a later re-run wants a new image. Only a re-run can find its own image still on offer
    # (Generate claimed any offer before paying); an offer another session makes in between stays.
    if deps.reusable_images is not None and run.prompt is not None and run.generation > 0:
        deps.reusable_images.claim(image_fingerprint(run))
    return run


def _finish(
    run: RunRecord, deps: StepDeps, hub: HubClient, pending: list[Callable[[RunRecord], None]]
) -> AttachResult:
    """Hand the task's answer back (submitting it in a workflow), then record the run as finished."""
    count = len(run.images)
    try:
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
    except PluginError:
        # What was delivered is recorded before the step gives up: a retry then sends only what is left,
        # and an attachment the hub confirmed never looks unconfirmed to it.
        if pending:

            def record_delivered(r: RunRecord) -> None:
                for apply in pending:
                    apply(r)

            deps.runs.change(run, record_delivered)
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
