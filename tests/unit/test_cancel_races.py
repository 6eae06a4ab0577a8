"""A cancel against everything else that may be happening to its run, with in-memory fakes: each grant of
a spending limit or of the organisation's daily quota is given back exactly once, by whoever took it off
the run record; an image paid for is never lost; and whoever loses a race is told what actually happened.

A race is staged by running the other party just before a given write of the run record, after every read
the step made (as a second Lambda would, between this one's read and its write)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from dalle_plugin.domain.cancel import cancel_session
from dalle_plugin.domain.errors import RunCancelled
from dalle_plugin.domain.run import HeldAllowance, RunRecord, RunStatus
from dalle_plugin.domain.spending import spend_counter
from dalle_plugin.domain.step_io.failure import FailureInput, StepError
from dalle_plugin.domain.steps.failure import describe_failure, record_failure
from dalle_plugin.domain.steps.generate import generate_image
from dalle_plugin.domain.steps.machinery import StepDeps, image_fingerprint

from tests.faults.test_step_idempotency import (
    REF,
    SESSION,
    TASK,
    Clock,
    Generator,
    Hub,
    Images,
    Offers,
    Runs,
    Vault,
)
from tests.faults.test_step_idempotency import _run as a_run
from tests.unit.test_spending import MemoryLedger

QUOTA = "QUOTA#ORG#org-1#2026-11-20"


class CountingLedger(MemoryLedger):
    """The ledger's contract, counting every release asked for (the real one would shrug off a second)."""

    def __init__(self) -> None:
        super().__init__()
        self.releases: Counter[tuple[str, str]] = Counter()

    def release(self, counter: str, ticket: str, amount: int) -> None:
        self.releases[(counter, ticket)] += 1
        super().release(counter, ticket, amount)


class RacedRuns(Runs):
    """The run store, where ``meanwhile`` runs once just before the ``at``-th write from now."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: list[tuple[int, Callable[[], Any]]] = []

    def before_write(self, meanwhile: Callable[[], Any], at: int = 1) -> None:
        self._pending.append((at, meanwhile))

    def update(self, session: str, task_id: str, mutate: Callable[[RunRecord], None]) -> RunRecord:
        due = [job for at, job in self._pending if at == 1]
        self._pending = [(at - 1, job) for at, job in self._pending if at > 1]
        for job in due:
            job()
        return super().update(session, task_id, mutate)


class Starter:
    def start(self, name: str, run_input: dict) -> str:
        return name

    def stop(self, execution_arn: str, cause: str) -> None:
        pass

    def arn_of(self, name: str) -> str:
        return name


def _deps(ledger: CountingLedger | None = None) -> StepDeps:
    return StepDeps(
        runs=RacedRuns(),
        clock=Clock(),
        vault=Vault(),
        hub_for=lambda run, key: Hub(),
        images=Images(),
        generator=Generator(),
        reusable_images=Offers(),
        starter=Starter(),
        allowances=ledger,
    )


def _holding(ledger: CountingLedger, **changes: Any) -> RunRecord:
    """A run waiting for its turn on the shared key, holding its two grants (both counted in the ledger)."""
    run = a_run(status=RunStatus.WAITING_FOR_SLOT, max_cost_usd=1.0, cost_per_image_usd=0.04, **changes)
    ticket = f"{run.execution_name}#g0"
    held = [
        HeldAllowance(counter=QUOTA, ticket=ticket, amount=1),
        HeldAllowance(counter=spend_counter(SESSION), ticket=ticket, amount=40_000),
    ]
    for grant in held:
        assert ledger.reserve(grant.counter, grant.ticket, grant.amount, 10**9, 2_000_000_000).granted
    return run.model_copy(update={"held": held})


def _failure(error: str) -> FailureInput:
    return FailureInput(session=SESSION, task_id=TASK, error=StepError(Error=error, Cause="{}"))


def _given_back_once(ledger: CountingLedger) -> bool:
    return (
        set(ledger.releases.values()) == {1} and len(ledger.releases) == 2 and not any(ledger.used.values())
    )


# ---- spending grants: given back exactly once ---------------------------------------------------------


def test_a_cancel_gives_the_grants_back_and_the_failure_it_causes_gives_back_nothing_more():
    ledger = CountingLedger()
    deps = _deps(ledger)
    deps.runs.create(_holding(ledger))
    [outcome] = cancel_session(SESSION, None, deps)
    assert outcome.cancelled and deps.runs.get(SESSION, TASK).held == []
    assert record_failure(_failure("RunCancelled"), deps)["status"] == "CANCELLED"
    assert _given_back_once(ledger)


def test_a_cancel_landing_while_record_failure_gives_back_is_not_a_second_give_back():
    ledger = CountingLedger()
    deps = _deps(ledger)
    deps.runs.create(_holding(ledger))
    deps.runs.before_write(lambda: cancel_session(SESSION, None, deps))
    assert record_failure(_failure("RateLimiterBusy"), deps)["status"] == "CANCELLED"
    assert _given_back_once(ledger)


def test_record_failure_landing_while_a_cancel_gives_back_is_not_a_second_give_back():
    ledger = CountingLedger()
    deps = _deps(ledger)
    deps.runs.create(_holding(ledger))
    deps.runs.before_write(lambda: record_failure(_failure("RateLimiterBusy"), deps))
    [outcome] = cancel_session(SESSION, None, deps)
    assert not outcome.cancelled and deps.runs.get(SESSION, TASK).status is RunStatus.FAILED
    assert _given_back_once(ledger)


def test_grants_taken_as_the_cancel_lands_are_given_back_though_the_execution_is_stopped():
    # Generate reads the run, the cancel lands and stops the execution (no Record Failure will run), then
    # Generate counts the run's request against the session's limit: that grant must not stay counted.
    ledger = CountingLedger()
    deps = _deps(ledger)
    deps.runs.create(a_run(status=RunStatus.EXTRACTING, max_cost_usd=1.0, cost_per_image_usd=0.04))
    deps.runs.before_write(lambda: cancel_session(SESSION, None, deps))
    with pytest.raises(RunCancelled):
        generate_image(REF, deps)
    assert deps.generator.requests == 0
    assert ledger.used == {spend_counter(SESSION): 0}
    assert deps.runs.get(SESSION, TASK).held == []


# ---- the cancel path: no double effects, nothing paid for lost ---------------------------------------


def test_an_image_on_offer_taken_as_the_cancel_lands_stays_on_offer():
    deps = _deps()
    run = a_run(status=RunStatus.EXTRACTING)
    deps.runs.create(run)
    deps.images.objects["images/paid-earlier.png"] = b"\x89PNG paid"
    deps.reusable_images.offer(image_fingerprint(run), "images/paid-earlier.png", 2_000_000_000)
    deps.runs.before_write(lambda: cancel_session(SESSION, None, deps))
    with pytest.raises(RunCancelled):
        generate_image(REF, deps)
    assert deps.reusable_images.items == {image_fingerprint(run): "images/paid-earlier.png"}
    assert deps.runs.get(SESSION, TASK).image is None and deps.generator.requests == 0


def test_two_cancels_at_once_cancel_once_and_the_second_is_told_it_already_was():
    hub = Hub()
    deps = _deps()
    deps.hub_for = lambda run, key: hub
    deps.runs.create(a_run(status=RunStatus.WAITING_FOR_SLOT, workflow=False))
    second: list = []
    deps.runs.before_write(lambda: second.extend(cancel_session(SESSION, None, deps)))
    [first] = cancel_session(SESSION, None, deps)
    [won] = second
    assert won.cancelled and not first.cancelled
    assert first.status == "CANCELLED" and first.why == "Not cancelled: it was already cancelled."
    assert hub.calls.count("plugin_response") == 1


# ---- every end has a sentence -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "says", "reason"),
    [
        ("Lambda.TooManyRequestsException", "too busy", "lambda_throttled"),
        ("Lambda.ServiceException", "AWS Lambda", "lambda_unavailable"),
        ("Lambda.AWSLambdaException", "AWS Lambda", "lambda_unavailable"),
        ("Lambda.SdkClientException", "AWS Lambda", "lambda_unavailable"),
        ("Runtime.ExitError", "stopped before it finished", "internal_error"),
        ("Runtime.OutOfMemory", "stopped before it finished", "internal_error"),
        ("States.DataLimitExceeded", "too large", "internal_error"),
    ],
)
def test_an_ending_whose_cause_is_known_says_it_in_a_sentence(error, says, reason):
    failure = describe_failure(error, '{"errorMessage": "RequestId: 1 Error: internals"}')
    assert says in failure.message and "unexpectedly" not in failure.message
    assert "internals" not in failure.message and failure.reason == reason


def test_a_plugin_error_without_a_message_still_ends_with_a_sentence():
    failure = describe_failure("HubUnavailable", "{}")
    assert failure.message != "HubUnavailable" and "hub" in failure.message.lower()
