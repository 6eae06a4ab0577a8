"""One run, one execution, one payment: the ownership rules with in-memory fakes. A run is owned by one
execution's name, written before any execution starts; a step called by any other execution does nothing."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from dalle_plugin.domain.errors import HubUnavailable, NotRunOwner, RunCancelled
from dalle_plugin.domain.payload import parse_payload
from dalle_plugin.domain.run import RunRef, RunStatus
from dalle_plugin.domain.step_io.attach import AttachInput, AttachResult
from dalle_plugin.domain.step_io.failure import FailureInput, StepError
from dalle_plugin.domain.step_io.generate import GenerateInput, GenerateOutcome
from dalle_plugin.domain.steps.attach import attach_image
from dalle_plugin.domain.steps.extract import extract_prompt
from dalle_plugin.domain.steps.failure import record_failure
from dalle_plugin.domain.steps.generate import generate_image
from dalle_plugin.domain.steps.machinery import StepDeps, image_fingerprint, record_generated
from dalle_plugin.domain.steps.start import start_session

from tests.faults.test_step_idempotency import Clock, Generator, Hub, Images, Offers, Runs, Vault

TODAY = dt.date(2026, 1, 15)
CONFIG = json.dumps(
    {
        "openai_api_key": "sk-own-key-for-tests",
        "model_name": "gpt-image-1",
        "get_prompt_from": "full-text-asset",
        "image_size": "1024x1024",
    }
)
MACHINE = "arn:aws:states:us-east-1:123456789012:execution:RunPlugin"


class Starter:
    """Step Functions' StartExecution as far as names go: a name starts one execution, ever."""

    def __init__(self, fail_first: int = 0) -> None:
        self.executions: dict[str, dict] = {}
        self.ended: set[str] = set()  # executions that are no longer running
        self.calls = 0
        self.fail_first = fail_first

    def start(self, name: str, run_input: dict) -> str:
        self.calls += 1
        if self.calls <= self.fail_first:
            raise TimeoutError("the API Lambda died here")
        self.executions.setdefault(name, run_input)
        return self.arn_of(name)

    def stop(self, execution_arn: str, cause: str) -> None:
        pass

    def arn_of(self, name: str) -> str:
        return f"{MACHINE}:{name}"

    def running(self, name_prefix: str) -> int:
        return sum(n.startswith(name_prefix) and n not in self.ended for n in self.executions)


def _payload(session: str, tasks: list[str], workflow: bool = True) -> object:
    return parse_payload(
        json.dumps(
            {
                "projectId": "proj",
                "session": session,
                "apiKey": "ango-key",
                "workflow": workflow,
                "configJSON": CONFIG,
                "tasks": [{"taskId": task, "dataURL": f"https://hub.example/{task}.txt"} for task in tasks],
            }
        ).encode()
    )


def _deps(starter: Starter | None = None, generator: Generator | None = None) -> StepDeps:
    return StepDeps(
        runs=Runs(),
        clock=Clock(),
        vault=Vault(),
        hub_for=lambda run, key: Hub(),
        images=Images(),
        generator=generator or Generator(),
        reusable_images=Offers(),
        starter=starter or Starter(),
    )


def _ref(deps: StepDeps, task: str, session: str = "s1") -> RunRef:
    owner = deps.runs.get(session, task).owner
    return RunRef(session=session, task_id=task, execution=deps.starter.arn_of(owner))


def _extract(ref: RunRef, deps: StepDeps) -> GenerateInput:
    """Extract Prompt, and Generate's input as the state machine hands it on (the extracted prompt with it)."""
    result = extract_prompt(ref, deps)
    return GenerateInput(
        **ref.model_dump(), image_fingerprint=result.image_fingerprint, extracted=result.extracted
    )


def _attach(ref: RunRef, generation: GenerateOutcome, deps: StepDeps) -> AttachResult:
    """Attach Image with Generate's outcome, as the state machine hands it on."""
    return attach_image(AttachInput(**ref.model_dump(), generation=generation), deps)


def test_a_duplicate_request_starts_nothing_new_and_counts_nothing():
    deps = _deps()
    first = start_session(_payload("s1", ["a", "b", "c"]), deps, TODAY)
    second = start_session(_payload("s1", ["a", "b", "c"]), deps, TODAY)
    assert first.started == ["a", "b", "c"] and second.started == []
    assert len(deps.starter.executions) == 1
    assert {run.owner for run in deps.runs.items.values()} == set(deps.starter.executions)


def test_a_request_that_died_before_starting_is_started_by_its_duplicate_under_the_same_name():
    deps = _deps(Starter(fail_first=1))
    with pytest.raises(TimeoutError):
        start_session(_payload("s1", ["a", "b"]), deps, TODAY)
    again = start_session(_payload("s1", ["a", "b"]), deps, TODAY)
    assert again.started == []  # the dead request created them; this one only started their owner
    [(name, run_input)] = deps.starter.executions.items()
    assert {run.owner for run in deps.runs.items.values()} == {name}
    assert [t["taskId"] for t in run_input["tasks"]] == ["a", "b"]


def test_a_big_batch_is_split_into_executions_of_bounded_size_each_owning_its_chunk():
    deps = _deps()
    tasks = [f"t{i:04d}" for i in range(250)]
    start_session(_payload("s1", tasks), deps, TODAY, tasks_per_execution=100)
    sizes = sorted(len(run_input["tasks"]) for run_input in deps.starter.executions.values())
    assert sizes == [50, 100, 100]
    for name, run_input in deps.starter.executions.items():
        assert all(deps.runs.get("s1", t["taskId"]).owner == name for t in run_input["tasks"])


def test_cancel_then_resend_gives_the_run_to_a_new_execution_and_the_old_one_does_nothing():
    from dalle_plugin.domain.cancel import cancel_session

    deps = _deps()
    start_session(_payload("s1", ["a", "b"]), deps, TODAY)
    old = _ref(deps, "a")
    cancel_session("s1", "a", deps)
    resent = start_session(_payload("s1", ["a", "b"]), deps, TODAY)
    assert resent.started == ["a"] and len(deps.starter.executions) == 2
    new = _ref(deps, "a")
    assert new.caller != old.caller
    # the old execution wakes up for "a": no prompt read, no payment, no attachment, no failure recorded
    for step in (extract_prompt, generate_image, attach_image):
        with pytest.raises(NotRunOwner):
            step(old, deps)
    assert deps.generator.requests == 0
    gone = record_failure(
        FailureInput(
            session="s1", task_id="a", execution=old.execution, error=StepError(Error="NotRunOwner")
        ),
        deps,
    )
    assert gone["status"] == "NOT_OWNER" and deps.runs.get("s1", "a").status is RunStatus.QUEUED
    # the new one runs it, once
    assert generate_image(_extract(new, deps), deps).status == "DONE" and deps.generator.requests == 1


def test_a_write_by_an_execution_that_lost_the_run_midway_is_refused():
    deps = _deps()
    start_session(_payload("s1", ["a"]), deps, TODAY)
    old = _ref(deps, "a")
    handed = _extract(old, deps)
    # cancelled and sent again between this execution's read and its write: the write does not happen
    from dalle_plugin.domain.cancel import cancel_session

    cancel_session("s1", "a", deps)
    start_session(_payload("s1", ["a"]), deps, TODAY)
    with pytest.raises((NotRunOwner, RunCancelled)):
        generate_image(handed, deps)
    assert deps.generator.requests == 0


def test_a_rerun_after_the_prompt_changed_generates_anew_and_the_same_prompt_does_not():
    deps = _deps()
    start_session(_payload("s1", ["a"]), deps, TODAY)
    ref = _ref(deps, "a")
    done = generate_image(_extract(ref, deps), deps)
    deps.runs.update("s1", "a", lambda r: record_generated(r, done.generated))  # as Attach's first write does
    first = deps.runs.get("s1", "a").image
    assert first.fingerprint == image_fingerprint(deps.runs.get("s1", "a"))
    assert generate_image(ref, deps).image_key == first.key and deps.generator.requests == 1
    deps.runs.update("s1", "a", lambda r: setattr(r.prompt, "text", "an edited prompt"))
    again = generate_image(ref, deps)
    assert deps.generator.requests == 2 and again.image_key != first.key


def test_the_prompt_handed_on_is_recorded_by_generate_even_when_it_finds_its_image():
    """Extract writes before it reads the hub, so its prompt and lines are written by Generate; a Generate
    that finds the image already there (a re-run after a failed delivery) writes them alone, once."""
    deps = _deps()
    start_session(_payload("s1", ["a"]), deps, TODAY)
    ref = _ref(deps, "a")
    done = generate_image(_extract(ref, deps), deps)
    deps.runs.update("s1", "a", lambda r: record_generated(r, done.generated))  # as Attach's first write does
    handed = _extract(ref, deps)
    for _ in range(2):  # the second is a redelivery: nothing is added twice
        assert generate_image(handed, deps).image_key == done.image_key and deps.generator.requests == 1
    lines = [entry for entry in deps.runs.get("s1", "a").timeline if entry.step == "extract"]
    assert [entry.at_ms for entry in lines[-2:]] == [handed.extracted.started_ms, handed.extracted.at_ms]
    assert len(lines) == 4 and lines[-1].detail.startswith("Prompt from")


class EditableHub(Hub):
    """The hub fake whose asset text (the prompt, with ``full-text-asset``) a person can edit."""

    text = b"A lighthouse in a storm"

    def fetch_text(self, url: str) -> bytes:
        return EditableHub.text


def _run_to_the_end(deps: StepDeps, session: str, task: str) -> None:
    ref = _ref(deps, task, session)
    done = generate_image(_extract(ref, deps), deps)
    assert done.status == "DONE"
    _attach(ref, done, deps)
    assert deps.runs.get(session, task).status is RunStatus.SUCCEEDED


def test_a_succeeded_task_sent_again_runs_again_only_when_its_prompt_was_edited_on_the_hub(monkeypatch):
    monkeypatch.setattr(EditableHub, "text", b"A lighthouse in a storm")
    deps = _deps()
    deps.hub_for = lambda run, key: EditableHub()
    start_session(_payload("s1", ["a", "b"]), deps, TODAY)
    for task in ("a", "b"):
        _run_to_the_end(deps, "s1", task)
    first_owner = deps.runs.get("s1", "a").owner

    unchanged = start_session(_payload("s1", ["a", "b"]), deps, TODAY)
    assert unchanged.started == [] and len(deps.starter.executions) == 1  # a duplicate starts nothing

    EditableHub.text = b"A lighthouse in a storm, at night"  # the person edits the prompt, then runs again
    edited = start_session(_payload("s1", ["a"]), deps, TODAY)
    again = start_session(_payload("s1", ["a"]), deps, TODAY)  # and the hub resends that request
    assert edited.started == ["a"] and again.started == []
    assert len(deps.starter.executions) == 2  # one new execution, owning the run alone
    new_owner = deps.runs.get("s1", "a").owner
    assert new_owner != first_owner and [
        t["taskId"] for t in deps.starter.executions[new_owner]["tasks"]
    ] == ["a"]
    with pytest.raises(NotRunOwner):  # the first execution can no longer touch it
        extract_prompt(RunRef(session="s1", task_id="a", execution=deps.starter.arn_of(first_owner)), deps)
    _run_to_the_end(deps, "s1", "a")
    run = deps.runs.get("s1", "a")
    assert deps.generator.requests == 3 and run.prompt.text.endswith("at night")
    assert run.image.fingerprint == image_fingerprint(run)
    assert deps.runs.get("s1", "b").generation == 0  # sent in the same session, but not edited


def test_a_hub_that_cannot_be_read_leaves_a_succeeded_task_as_it_is():
    deps = _deps()
    start_session(_payload("s1", ["a"]), deps, TODAY)
    _run_to_the_end(deps, "s1", "a")
    silent = Hub(failures={"get_task": [HubUnavailable("The hub did not answer.")]})
    deps.hub_for = lambda run, key: silent
    assert start_session(_payload("s1", ["a"]), deps, TODAY).started == []
    assert deps.runs.get("s1", "a").status is RunStatus.SUCCEEDED and len(deps.starter.executions) == 1


def test_an_attachment_confirmed_before_the_hub_stopped_answering_is_not_taken_for_unconfirmed():
    hub = Hub(failures={"plugin_response": [HubUnavailable("The hub did not answer.")]})
    deps = _deps()
    deps.hub_for = lambda run, key: hub
    start_session(_payload("s1", ["a"], workflow=False), deps, TODAY)
    ref = _ref(deps, "a")
    done = generate_image(_extract(ref, deps), deps)
    with pytest.raises(HubUnavailable):  # attached, then the plugin response got no answer
        _attach(ref, done, deps)
    assert deps.runs.get("s1", "a").image.attached
    _attach(ref, done, deps)  # the state machine's retry: only the response is sent again
    assert hub.calls.count("attach_image") == 1 and hub.calls.count("plugin_response") == 2
    assert deps.runs.get("s1", "a").status is RunStatus.SUCCEEDED


# ---- the state machine's side of the contract ---------------------------------------------------------


def _asl_states() -> dict:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "statemachine" / "run_plugin.asl.json").read_text()
    machine = json.loads(re.sub(r"\$\{\w+\}", "1", text))
    return machine["States"]["Run Each Task"]["ItemProcessor"]["States"]


def test_every_step_gets_the_calling_execution_and_a_non_owner_ends_quietly():
    states = _asl_states()
    for name in (
        "Extract Prompt",
        "Generate Image",
        "Generate Image Again",
        "Attach Image",
        "Record Failure",
    ):
        assert states[name]["Parameters"]["execution.$"] == "$.execution"
    for name in ("Extract Prompt", "Generate Image", "Generate Image Again", "Attach Image"):
        first = states[name]["Catch"][0]
        assert first["ErrorEquals"] == ["NotRunOwner"] and states[first["Next"]]["Type"] == "Succeed"


def test_a_timed_out_lambda_is_retried_only_where_running_again_cannot_pay_or_attach_twice():
    states = _asl_states()

    def retried(name: str) -> set[str]:
        return {error for retrier in states[name]["Retry"] for error in retrier["ErrorEquals"]}

    for name in ("Extract Prompt", "Attach Image", "Record Failure"):
        assert {"Lambda.Unknown", "Sandbox.Timedout"} <= retried(name)
    assert not {"Lambda.Unknown", "Sandbox.Timedout"} & (
        retried("Generate Image") | retried("Generate Image Again")
    )


def test_a_timed_out_step_ends_the_run_with_a_sentence_a_person_can_act_on():
    from dalle_plugin.domain.steps.failure import describe_failure

    cause = json.dumps({"errorMessage": "2026-01-01T00:00:00Z abc Task timed out after 300.00 seconds"})
    failure = describe_failure("Lambda.Unknown", cause)
    assert failure.reason == "step_timed_out" and "ran out of time" in failure.message
    assert "Run the plugin again" in failure.message


def test_secrets_are_read_again_after_their_cache_lifetime():
    """A secret is kept for its max age, then read again: a rotation is seen."""
    from dalle_plugin.adapters.aws import CachedSecrets

    from tests.conftest import wait_for

    class Client:
        value, reads = "v1", 0

        def get_secret_value(self, SecretId: str) -> dict:
            Client.reads += 1
            return {"SecretString": Client.value}

    reader = CachedSecrets(Client(), max_age_s=1)
    assert reader.read("s") == "v1"
    Client.value = "v2"  # rotated
    assert reader.read("s") in ("v1", "v2")  # within the lifetime: no read, unless a slow machine passed it
    wait_for(lambda: reader.read("s") == "v2", timeout_s=30, what="the rotated secret")
    assert Client.reads >= 2


@pytest.mark.parametrize("hub_answers", [True, False], ids=["hub answers late", "hub gives up"])
def test_a_cancel_while_extract_waits_on_the_hub_ends_the_run_cancelled(hub_answers):
    """The cancel lands while Extract waits for the task (a hub that is slow or never answers): no write
    after the wait (Extract's start on the timeline, or Generate's first write with the prompt) may make
    the run EXTRACTING again, or the cancelled (and stopped) execution leaves it unfinished for ever."""
    from dalle_plugin.domain.cancel import cancel_session

    deps = _deps()
    start_session(_payload("s1", ["a"]), deps, TODAY)
    ref = _ref(deps, "a")

    class CancelledWhileWaiting(Hub):
        def get_task(self, task_id: str) -> dict:
            assert cancel_session("s1", "a", deps)[0].cancelled
            if not hub_answers:
                raise HubUnavailable("The hub did not answer in time.")
            return super().get_task(task_id)

    deps.hub_for = lambda run, key: CancelledWhileWaiting()
    if hub_answers:  # Extract's one write came before the wait: the next step is refused instead
        handed = _extract(ref, deps)
        with pytest.raises(RunCancelled):
            generate_image(handed, deps)
        assert deps.generator.requests == 0
    else:
        with pytest.raises(RunCancelled):
            extract_prompt(ref, deps)
    assert deps.runs.get("s1", "a").status is RunStatus.CANCELLED
    ended = record_failure(
        FailureInput(
            session="s1", task_id="a", execution=ref.execution, error=StepError(Error="RunCancelled")
        ),
        deps,
    )
    assert ended["status"] == "CANCELLED" and deps.runs.get("s1", "a").status is RunStatus.CANCELLED


def _first_generate(session: str, flagged: bool) -> tuple[StepDeps, GenerateInput]:
    """A run stored as the API stores it (``flagged``: its task had no image on offer), extracted, and the
    first Generate's input with Extract's first-spend line."""
    deps = _deps()
    start_session(_payload(session, ["a"]), deps, TODAY)
    deps.runs.items[(session, "a")].no_offer_at_accept = flagged
    ref = _ref(deps, "a", session)
    result = extract_prompt(ref, deps)
    first = GenerateInput(
        **ref.model_dump(),
        image_fingerprint=result.image_fingerprint,
        extracted=result.extracted,
        spend_line=result.spend_line,
    )
    return deps, first


def test_the_first_generate_spends_in_its_first_write_only_for_its_owner_and_writes_the_same_timeline():
    deps, first = _first_generate("s1", flagged=True)
    assert first.spend_line and first.spend_line.startswith("Generating the image with")
    another = first.model_copy(update={"execution": deps.starter.arn_of("another-execution")})
    with pytest.raises(NotRunOwner):
        generate_image(another, deps)
    assert deps.generator.requests == 0 and deps.runs.get("s1", "a").attempt == 0
    assert generate_image(first, deps).status == "DONE" and deps.generator.requests == 1
    # the session reads the same as when Generate reads first (a run accepted with its task's image on offer)
    read_first, no_line = _first_generate("s2", flagged=False)
    assert no_line.spend_line == ""
    assert generate_image(no_line, read_first).status == "DONE"

    def lines(runs: Runs, session: str) -> list[tuple[str, str, str | None]]:
        return [(e.step, e.status, e.detail) for e in runs.get(session, "a").timeline]

    assert lines(deps.runs, "s1") == lines(read_first.runs, "s2")
    spent, read = deps.runs.get("s1", "a"), read_first.runs.get("s2", "a")
    assert (spent.status, spent.attempt, spent.prompt) == (read.status, read.attempt, read.prompt)
