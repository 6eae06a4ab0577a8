"""Generate's first write is its read (no BatchGetItem first), on the real engine (DynamoDB Local).

A run the API stored with no image of its task on offer (``no_offer_at_accept``) lets the first Generate
spend attempt 1 in the write that reads it, under the condition that no attempt was spent. Deliveries of
that same step, at once or one after another, pay OpenAI once: whichever write is refused finds the attempt
spent and sends nothing (a refused write that went on as a read would spend attempt 2 and pay again). A
task with an image on offer is stored without the flag, and its Generate looks for the offer and takes it.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

import pytest
from dalle_plugin.adapters.dynamo_reusable_images import DynamoReusableImages
from dalle_plugin.adapters.dynamo_runs import DynamoRunStore
from dalle_plugin.domain.run import PromptInfo, RunRecord, RunStatus
from dalle_plugin.domain.step_io.extracted import ExtractedPrompt
from dalle_plugin.domain.step_io.generate import GenerateInput
from dalle_plugin.domain.steps.generate import generate_image
from dalle_plugin.domain.steps.machinery import StepDeps, generating_line, image_fingerprint
from dalle_plugin.image_generation import GeneratedImage

from tests.faults.test_step_idempotency import Clock, Generator, Hub, Images, Vault
from tests.faults.test_step_idempotency import _run as a_run
from tests.integration.dynamodb_tables import make_client, sessions_shaped_table

pytestmark = pytest.mark.stack

TABLE = "generate-first-spend"
DELIVERIES = 4
PROMPT = PromptInfo(text="a lighthouse", source="text-annotation", length=12, original_length=12)


@pytest.fixture(scope="module")
def endpoint():
    with sessions_shaped_table(TABLE) as url:
        yield url


class CountingClient:
    """A DynamoDB client that counts the calls made through it."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        call = getattr(self._client, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return call(*args, **kwargs)

        return counted


class GatedGenerator(Generator):
    """Holds each request until ``gate`` opens: set when a second request arrives (the unsafe outcome),
    or by the test once the other deliveries have answered, so a winner never finishes before they look."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self._lock = threading.Lock()

    def generate(self, request: Any, api_key: str) -> GeneratedImage:
        with self._lock:
            image = super().generate(request, api_key)
            if self.requests > 1:
                self.gate.set()
        assert self.gate.wait(timeout=120), "the gate never opened"
        return image


class Shared:
    """What every delivery shares: the bucket, OpenAI, the offers (each delivery has its own run store,
    as separate Lambda environments do)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.images = Images()
        self.generator = GatedGenerator()
        self.offers = DynamoReusableImages(make_client(endpoint), TABLE)

    def deps(self, client: Any | None = None) -> StepDeps:
        return StepDeps(
            runs=DynamoRunStore(client or make_client(self.endpoint), TABLE),
            clock=Clock(),
            vault=Vault(),
            hub_for=lambda run, key: Hub(),
            images=self.images,
            generator=self.generator,
            reusable_images=self.offers,
        )


def _stored(endpoint: str, task: str) -> RunRecord:
    """A fresh own-key run stored as the API stores it (create_many checks its task's offer marker)."""
    run = a_run(session=f"first-spend-{task}", status=RunStatus.EXTRACTING, prompt=None, task_id=task)
    [(stored, created)] = DynamoRunStore(make_client(endpoint), TABLE).create_many([run])
    assert created
    return stored


def _first_generate(run: RunRecord, spend_line: str) -> GenerateInput:
    """The first Generate's input, as Extract hands it on."""
    extracted = ExtractedPrompt(
        started_ms=100, started="Run started.", prompt=PROMPT, at_ms=110, message="Prompt from text."
    )
    with_prompt = run.model_copy(update={"prompt": PROMPT})
    return GenerateInput(
        session=run.session,
        task_id=run.task_id,
        image_fingerprint=image_fingerprint(with_prompt),
        extracted=extracted,
        spend_line=spend_line,
    )


def _timeline(endpoint: str, run: RunRecord) -> list[str]:
    stored = DynamoRunStore(make_client(endpoint), TABLE).get(run.session, run.task_id)
    assert stored is not None
    return [entry.step for entry in stored.timeline]


def test_a_fresh_run_is_stored_with_no_offer_and_its_first_generate_makes_one_dynamodb_call(endpoint):
    shared = Shared(endpoint)
    run = _stored(endpoint, "one-call")
    assert run.no_offer_at_accept
    shared.generator.gate.set()
    client = CountingClient(make_client(endpoint))
    outcome = generate_image(_first_generate(run, generating_line(run)), shared.deps(client))
    assert outcome.status == "DONE" and shared.generator.requests == 1
    assert client.calls == ["update_item"]  # the write that spent the attempt was the step's read
    assert _timeline(endpoint, run) == [*(e.step for e in run.timeline), "extract", "extract", "generate"]


def test_deliveries_of_the_first_generate_at_once_pay_openai_once(endpoint):
    shared = Shared(endpoint)
    run = _stored(endpoint, "at-once")
    ref = _first_generate(run, generating_line(run))
    together = threading.Barrier(DELIVERIES)

    def deliver(_: int):
        deps = shared.deps()
        together.wait()
        return generate_image(ref, deps)

    with ThreadPoolExecutor(DELIVERIES) as pool:
        futures = [pool.submit(deliver, i) for i in range(DELIVERIES)]
        # the gate opens once every delivery but the one sending has answered, or at a second request
        while not shared.generator.gate.is_set() and sum(f.done() for f in futures) < DELIVERIES - 1:
            wait([f for f in futures if not f.done()], timeout=1, return_when=FIRST_COMPLETED)
        shared.generator.gate.set()
        outcomes = [f.result(timeout=120) for f in futures]
    assert shared.generator.requests == 1
    assert sorted(o.status for o in outcomes) == ["DONE"] + ["WAIT"] * (DELIVERIES - 1)
    assert {o.reason for o in outcomes if o.status == "WAIT"} == {"duplicate_delivery"}
    stored = DynamoRunStore(make_client(endpoint), TABLE).get(run.session, run.task_id)
    assert stored is not None and stored.attempt == 1
    assert _timeline(endpoint, run).count("generate") == 1


def test_a_later_delivery_of_the_first_generate_pays_nothing_and_the_next_generate_adopts_the_image(endpoint):
    shared = Shared(endpoint)
    shared.generator.gate.set()
    run = _stored(endpoint, "later")
    ref = _first_generate(run, generating_line(run))
    assert generate_image(ref, shared.deps()).status == "DONE"
    again = generate_image(ref, shared.deps())  # the same input, delivered again (or retried)
    assert again.status == "WAIT" and again.reason == "duplicate_delivery"
    after_wait = generate_image(ref.model_copy(update={"spend_line": None}), shared.deps())
    assert after_wait.status == "DONE" and after_wait.image_key is not None
    assert shared.generator.requests == 1


def test_a_task_with_an_image_on_offer_is_stored_without_the_flag_and_takes_the_offer(endpoint):
    shared = Shared(endpoint)
    shared.generator.gate.set()
    earlier = a_run(session="first-spend-earlier", prompt=PROMPT, task_id="offered")
    shared.images.objects["images/paid-earlier.png"] = b"\x89PNG paid"
    shared.offers.offer(
        image_fingerprint(earlier), "images/paid-earlier.png", 2_000_000_000, earlier.offer_scope
    )
    run = _stored(endpoint, "offered")
    assert not run.no_offer_at_accept  # the marker of its task refused the check: stored in a second call
    # handed a first-spend line all the same, the write is refused (nothing spent) and the step looks
    outcome = generate_image(_first_generate(run, generating_line(run)), shared.deps())
    assert outcome.status == "DONE" and outcome.image_key == "images/paid-earlier.png"
    assert shared.generator.requests == 0


def test_a_retry_of_the_first_generate_after_an_error_that_followed_its_spend_sends_at_once(endpoint):
    from dalle_plugin.domain.errors import OpenAIUnavailable

    shared = Shared(endpoint)
    shared.generator.gate.set()
    shared.generator.failures = [OpenAIUnavailable("OpenAI answered 503.")]
    run = _stored(endpoint, "retried")
    ref = _first_generate(run, generating_line(run))
    with pytest.raises(OpenAIUnavailable):
        generate_image(ref, shared.deps())
    shared.generator.failures = []
    # the state machine's Retry: the same input, its $$.State.RetryCount 1; as every retried Generate, it
    # reads, spends the next attempt and sends (taking itself for a duplicate would stretch the retries)
    outcome = generate_image(ref.model_copy(update={"retry_count": 1}), shared.deps())
    assert outcome.status == "DONE" and shared.generator.requests == 2
    stored = DynamoRunStore(make_client(endpoint), TABLE).get(run.session, run.task_id)
    assert stored is not None and stored.attempt == 2
