"""The rules that make a retried step safe, at the domain level with in-memory fakes (fast, every branch):
an attachment or a task submission the hub may have taken is never sent again, a finished run stays
finished, a paid image that was never delivered is reused by the next run of the task, a key whose rate
limit stays used up ends the run, and a failure message never quotes an unexpected exception."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from dalle_plugin.domain.errors import (
    HubDeliveryUnknown,
    HubOutcomeUnknown,
    HubUnavailable,
    OpenAIRateLimitPersisted,
    UpstreamRateLimited,
)
from dalle_plugin.domain.run import ImageInfo, ModelInfo, PromptInfo, RunRecord, RunRef, RunStatus
from dalle_plugin.domain.step_io.failure import FailureInput, StepError
from dalle_plugin.domain.steps.attach import attach_image
from dalle_plugin.domain.steps.failure import describe_failure, record_failure
from dalle_plugin.domain.steps.generate import generate_image
from dalle_plugin.domain.steps.machinery import StepDeps, image_fingerprint, image_key
from dalle_plugin.image_generation import GeneratedImage
from dalle_plugin.ports import HubAsset, StepOpening, StoredObject

SESSION, TASK = "sess-1", "task-1"


class Runs:
    def __init__(self) -> None:
        self.items: dict[tuple[str, str], RunRecord] = {}

    def create(self, run: RunRecord) -> tuple[RunRecord, bool]:
        key = (run.session, run.task_id)
        if key in self.items:
            return copy.deepcopy(self.items[key]), False
        self.items[key] = copy.deepcopy(run)
        return copy.deepcopy(run), True

    def create_many(self, runs: list[RunRecord]) -> list[tuple[RunRecord, bool]]:
        return [self.create(run) for run in runs]

    def get(self, session: str, task_id: str) -> RunRecord | None:
        found = self.items.get((session, task_id))
        return copy.deepcopy(found) if found else None

    def get_with_offer(self, session: str, task_id: str, fingerprint: str) -> tuple[RunRecord | None, bool]:
        return self.get(session, task_id), True  # the offers are Offers' own: the step's claim looks

    def open_step(self, session: str, task_id: str, opening: StepOpening) -> tuple[RunRecord | None, bool]:
        run = self.get(session, task_id)
        if run is None:
            return None, False
        mine = opening.caller is None or run.owner is None or run.owner == opening.caller
        present = any(getattr(run, name) not in (None, []) for name in opening.absent)
        unequal = any(getattr(run, name) != value for name, value in opening.equal.items())
        if not mine or run.status in opening.refused or present or unequal:
            return run, False
        run.status = opening.status or run.status
        for name, value in opening.sets.items():
            setattr(run, name, copy.deepcopy(value))
        run.timeline.extend(opening.entries)
        run.updated_at_ms = opening.updated_at_ms
        run.version += 1
        self.items[(session, task_id)] = copy.deepcopy(run)
        return run, True

    def update(self, session: str, task_id: str, mutate: Callable[[RunRecord], None]) -> RunRecord:
        run = copy.deepcopy(self.items[(session, task_id)])
        mutate(run)
        self.items[(session, task_id)] = copy.deepcopy(run)
        return run

    def change(self, run: RunRecord, mutate: Callable[[RunRecord], None]) -> RunRecord:
        return self.update(run.session, run.task_id, mutate)

    def recent(self, session: str, task_id: str) -> RunRecord | None:
        return self.get(session, task_id)

    def list_session(self, session: str) -> list[RunRecord]:
        return [copy.deepcopy(r) for (s, _), r in self.items.items() if s == session]


class Vault:
    def seal(self, secrets: dict[str, str], context: dict[str, str]) -> bytes:
        return json.dumps(secrets).encode()

    def open(self, sealed: bytes, context: dict[str, str]) -> dict[str, str]:
        return json.loads(sealed)


class Clock:
    def __init__(self) -> None:
        self.ms = 1_800_000_000_000

    def now_ms(self) -> int:
        self.ms += 10
        return self.ms


class Images:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_image(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> StoredObject:
        self.objects[key] = body
        return StoredObject(bucket="images", key=key)

    def get(self, key: str) -> bytes | None:
        return self.objects.get(key)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        return f"https://s3.example/{key}"


class Offers:
    def __init__(self) -> None:
        self.items: dict[str, str] = {}

    def offer(self, fingerprint: str, key: str, expires_at: int, scope: str = "") -> None:
        self.items[fingerprint] = key

    def claim(self, fingerprint: str) -> str | None:
        return self.items.pop(fingerprint, None)


@dataclass
class Hub:
    """Scripted answers per call name: an exception to raise once, in order; records every call."""

    failures: dict[str, list[Exception]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        queue = self.failures.get(name) or []
        if queue:
            raise queue.pop(0)

    def get_task(self, task_id: str) -> dict[str, Any]:
        self._call("get_task")
        return {"answer": {"tools": [], "classifications": [], "relations": []}}

    def get_asset(self, project_id: str, asset_id: str) -> HubAsset:
        self._call("get_asset")
        return HubAsset(asset_id=asset_id, external_id="story.txt", data_url="https://hub.example/story.txt")

    def fetch_text(self, url: str) -> bytes:
        return b"text"

    def upload_file(self, project_id: str, name: str, body: bytes, content_type: str) -> str:
        self._call("upload_file")
        return f"https://storage.example/{name}"

    def attach_image(self, project_id: str, external_id: str, image_url: str) -> None:
        self._call("attach_image")

    def annotate(self, task_id: str, answer: dict[str, Any]) -> None:
        self._call("annotate")

    def plugin_response(self, session: str, response: Any = None, error: bool = False) -> None:
        self._call("plugin_response")

    def plugin_log(self, session: str, message: str, level: str = "INFO", **extra: Any) -> None:
        pass


class Generator:
    def __init__(self, failures: list[Exception] | None = None, more: tuple[bytes, ...] = ()) -> None:
        self.failures = failures or []
        self.more = more  # the further images of a request for more than one
        self.requests = 0

    def prepare(self, api_key: str) -> None:
        pass

    def generate(self, request: Any, api_key: str) -> GeneratedImage:
        self.requests += 1
        if self.failures:
            raise self.failures.pop(0) if len(self.failures) > 1 else self.failures[0]
        return GeneratedImage(png=b"\x89PNG fake", model=request.model, request_id="req_1", more=self.more)


def _run(session: str = SESSION, workflow: bool = True, **changes: Any) -> RunRecord:
    ref = RunRef(session=session, task_id=TASK)
    run = RunRecord(
        session=session,
        task_id=TASK,
        execution_name=ref.execution_name,
        project_id="proj",
        asset_id="asset-1",
        workflow=workflow,
        prompt_source="text-annotation",
        model=ModelInfo(requested="gpt-image-2", actual="gpt-image-2"),
        size="1024x1024",
        max_prompt_chars=32_000,
        uses_default_key=False,
        sealed_secrets=json.dumps({"ango": "ango-key", "openai": "sk-own"}).encode(),
        created_at_ms=1,
        updated_at_ms=1,
        status=RunStatus.GENERATING,
        prompt=PromptInfo(text="a lighthouse", source="text-annotation", length=12, original_length=12),
    )
    return run.model_copy(update=changes)


def _image(**changes: Any) -> ImageInfo:
    return ImageInfo(
        key="images/x.png", sha256="ab" * 32, bytes=9, model="gpt-image-2", size="1024x1024"
    ).model_copy(update=changes)


def _bucket_with_the_image() -> Images:
    """The bucket as Generate leaves it: the image ``_image()`` records is stored at its key."""
    images = Images()
    images.objects[_image().key] = b"\x89PNG-bytes"
    return images


def _deps(hub: Hub, generator: Generator | None = None) -> StepDeps:
    return StepDeps(
        runs=Runs(),
        clock=Clock(),
        vault=Vault(),
        hub_for=lambda run, key: hub,
        images=_bucket_with_the_image(),
        generator=generator or Generator(),
        reusable_images=Offers(),
    )


def _stored(deps: StepDeps, session: str = SESSION) -> RunRecord:
    return deps.runs.get(session, TASK)


REF = RunRef(session=SESSION, task_id=TASK)


# ---- Attach Image: never twice ----------------------------------------------------------------------


def test_an_attachment_the_hub_may_have_taken_is_never_sent_again():
    hub = Hub(failures={"attach_image": [HubDeliveryUnknown("timed out after sending")]})
    deps = _deps(hub)
    deps.runs.create(_run(image=_image()))
    with pytest.raises(HubOutcomeUnknown, match="did not confirm the attachment"):
        attach_image(REF, deps)
    assert _stored(deps).image.attach_sent_at_ms is not None
    with pytest.raises(HubOutcomeUnknown):  # the state machine's retry, or any later attempt
        attach_image(REF, deps)
    assert hub.calls.count("attach_image") == 1
    assert _stored(deps).image.attached is False


def test_an_attachment_the_hub_surely_refused_is_sent_again_on_retry():
    hub = Hub(failures={"attach_image": [HubUnavailable("503, not applied")]})
    deps = _deps(hub)
    deps.runs.create(_run(image=_image()))
    with pytest.raises(HubUnavailable):
        attach_image(REF, deps)
    assert _stored(deps).image.attach_sent_at_ms is None  # the intent was cleared
    attach_image(REF, deps)
    assert hub.calls.count("attach_image") == 2 and _stored(deps).image.attached
    assert _stored(deps).status is RunStatus.SUCCEEDED


def test_a_hub_that_fails_the_asset_look_up_has_been_sent_nothing_and_is_tried_again():
    hub = Hub(failures={"get_asset": [HubUnavailable("never answered")]})
    deps = _deps(hub)
    deps.runs.create(_run(image=_image()))
    with pytest.raises(HubUnavailable):  # retried by the state machine, not "outcome unknown"
        attach_image(REF, deps)
    assert _stored(deps).image.attach_sent_at_ms is None
    attach_image(REF, deps)
    assert hub.calls.count("attach_image") == 1 and _stored(deps).status is RunStatus.SUCCEEDED


def test_a_task_submission_the_hub_may_have_taken_is_never_sent_again():
    hub = Hub(failures={"annotate": [HubDeliveryUnknown("timed out after sending")]})
    deps = _deps(hub)
    deps.runs.create(_run(image=_image()))
    with pytest.raises(HubOutcomeUnknown, match="submission"):
        attach_image(REF, deps)
    with pytest.raises(HubOutcomeUnknown):
        attach_image(REF, deps)
    assert hub.calls.count("annotate") == 1 and hub.calls.count("attach_image") == 1


def test_a_retry_after_the_run_finished_touches_nothing():
    hub = Hub()
    deps = _deps(hub)
    deps.runs.create(_run(image=_image()))
    first = attach_image(REF, deps)
    calls = list(hub.calls)
    assert attach_image(REF, deps) == first
    assert hub.calls == calls  # no second upload, attachment or submission


# ---- Record Failure: readable, never overwriting a success -----------------------------------------


def _failure(error: str, message: str = "boom") -> FailureInput:
    return FailureInput(
        session=SESSION,
        task_id=TASK,
        error=StepError(Error=error, Cause=json.dumps({"errorMessage": message})),
    )


def test_a_crash_after_the_run_finished_leaves_it_succeeded():
    deps = _deps(Hub())
    deps.runs.create(_run(image=_image(attached=True), status=RunStatus.SUCCEEDED, sealed_secrets=None))
    assert record_failure(_failure("Runtime.ExitError"), deps)["status"] == "SUCCEEDED"
    assert _stored(deps).status is RunStatus.SUCCEEDED and _stored(deps).failure is None


def test_an_undelivered_paid_image_is_offered_and_a_sent_one_is_not():
    deps = _deps(Hub())
    deps.runs.create(_run(image=_image()))
    record_failure(_failure("HubUnavailable", "Ango Hub did not answer"), deps)
    assert deps.reusable_images.items == {image_fingerprint(_stored(deps)): "images/x.png"}

    sent = _deps(Hub())
    sent.runs.create(_run(image=_image(hub_url="https://storage.example/x.png", attach_sent_at_ms=5)))
    record_failure(_failure("Runtime.ExitError", "killed"), sent)
    assert sent.reusable_images.items == {}
    assert "check the asset's attachments" in _stored(sent).failure.message

    # died between storing the PNG and recording it: the image's key is offered all the same
    unrecorded = _deps(Hub())
    unrecorded.runs.create(_run(attempt=1))
    record_failure(_failure("Runtime.ExitError", "killed"), unrecorded)
    assert list(unrecorded.reusable_images.items.values()) == [image_key(_stored(unrecorded))]


def test_images_an_ended_execution_paid_for_and_never_recorded_are_kept_for_a_rerun():
    # Generate hands its images to Attach through the state: an execution that fails before Attach's first
    # write leaves them only at their keys, where Record Failure finds every one and records them.
    generator = Generator(more=(b"\x89PNG second", b"\x89PNG third"))
    deps = _deps(Hub(), generator)
    deps.runs.create(_run(images_per_task=3))
    assert generate_image(REF, deps).image_count == 3 and _stored(deps).image is None
    record_failure(_failure("Runtime.ExitError", "killed"), deps)  # Attach died before its first write
    failed = _stored(deps)
    assert [i.key for i in failed.images] == [image_key(failed, n) for n in range(3)]
    assert [i.sha256 for i in failed.images] == [
        hashlib.sha256(deps.images.objects[i.key]).hexdigest() for i in failed.images
    ]

    def rerun(r: RunRecord) -> None:  # as a re-run of the task in its session leaves the record
        r.generation, r.status, r.failure = r.generation + 1, RunStatus.GENERATING, None

    deps.runs.update(SESSION, TASK, rerun)
    assert generate_image(REF, deps).image_count == 3 and generator.requests == 1  # none paid twice


def test_an_unexpected_exception_is_named_but_its_text_never_shown():
    failure = describe_failure(
        "ValueError", json.dumps({"errorMessage": "Invalid header value b'secret\\n'"})
    )
    assert (
        failure.reason == "internal_error"
        and "secret" not in failure.message
        and "ValueError" in failure.message
    )
    assert (
        describe_failure("ImageRefused", json.dumps({"errorMessage": "Edit the prompt."})).message
        == "Edit the prompt."
    )


# ---- Generate Image: never paid twice ------------------------------------------------------------


def test_a_rerun_in_a_new_session_takes_the_image_a_failed_run_paid_for():
    generator = Generator()
    deps = _deps(Hub(), generator)
    deps.runs.create(_run(session="first"))
    generate_image(RunRef(session="first", task_id=TASK), deps)
    record_failure(FailureInput(session="first", task_id=TASK, error=StepError(Error="HubUnavailable")), deps)

    deps.runs.create(_run(session="second"))
    outcome = generate_image(RunRef(session="second", task_id=TASK), deps)
    assert outcome.status == "DONE" and generator.requests == 1
    assert _stored(deps, "second").image.reused and deps.reusable_images.items == {}

    attach_image(RunRef(session="second", task_id=TASK), deps)
    deps.runs.create(_run(session="third"))
    generate_image(RunRef(session="third", task_id=TASK), deps)
    assert generator.requests == 2  # once delivered, a later run asks for a new image


def test_a_key_whose_rate_limit_stays_used_up_ends_the_run_after_five_answers():
    generator = Generator([UpstreamRateLimited("429", retry_after_ms=1000)])
    deps = _deps(Hub(), generator)
    deps.runs.create(_run())
    for _ in range(4):
        assert generate_image(REF, deps).status == "WAIT"
    with pytest.raises(OpenAIRateLimitPersisted, match="5 times in a row"):
        generate_image(REF, deps)
    assert generator.requests == 5


def test_a_first_attempt_does_not_look_for_images_no_request_could_have_stored():
    deps = _deps(Hub(), Generator())
    looked: list[str] = []
    get = deps.images.get
    deps.images.get = lambda key: looked.append(key) or get(key)
    deps.runs.create(_run())
    first = generate_image(RunRef(session=SESSION, task_id=TASK), deps)
    assert looked == []  # attempt 0: nothing sent yet in any generation, so nothing at the run's keys

    # handed on to Attach, which never recorded it (it died): a later attempt finds the image and adopts it
    assert _stored(deps).image is None
    outcome = generate_image(RunRef(session=SESSION, task_id=TASK), deps)
    assert (
        looked == [first.image_key]
        and outcome.status == "DONE"
        and _stored(deps).image.key == first.image_key
    )
