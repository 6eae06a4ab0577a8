"""A run's spending grants given back on the real engine (DynamoDB Local), while two cancels and a Record
Failure race over it, each a Lambda of its own: whichever wins, each grant is given back exactly once
(one release asked for, not merely one that counted) and the counters end where they began."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from dalle_plugin.adapters.dynamo_allowances import DynamoAllowanceLedger
from dalle_plugin.adapters.dynamo_runs import DynamoRunStore
from dalle_plugin.domain.cancel import cancel_session
from dalle_plugin.domain.errors import PluginError
from dalle_plugin.domain.run import HeldAllowance, RunStatus
from dalle_plugin.domain.step_io.failure import FailureInput, StepError
from dalle_plugin.domain.steps.failure import record_failure
from dalle_plugin.domain.steps.machinery import StepDeps

from tests.integration.dynamodb_tables import make_client, queued_run, sessions_shaped_table

pytestmark = pytest.mark.stack

TABLE = "cancel-give-back-race"
SESSION = "give-back"
SPEND = f"SPEND#SESSION#{SESSION}"
QUOTA = "QUOTA#ORG#org-1#2026-11-20"


@pytest.fixture(scope="module")
def endpoint():
    with sessions_shaped_table(TABLE) as url:
        yield url


class CountedLedger(DynamoAllowanceLedger):
    def __init__(self, client, table_name: str, releases: Counter):
        super().__init__(client, table_name)
        self._releases = releases

    def release(self, counter: str, ticket: str, amount: int) -> None:
        self._releases[(counter, ticket)] += 1
        super().release(counter, ticket, amount)


class NoVault:
    """Secrets that cannot be opened: the hub is not told (best effort), nothing else changes."""

    def seal(self, secrets, context):
        raise PluginError("no vault here")

    def open(self, sealed, context):
        raise PluginError("no vault here")


class Clock:
    def now_ms(self) -> int:
        return 1_000


class Starter:
    def start(self, name, run_input):
        return name

    def stop(self, execution_arn, cause):
        pass

    def arn_of(self, name):
        return name


def _deps(endpoint: str, releases: Counter) -> StepDeps:
    client = make_client(endpoint)
    return StepDeps(
        runs=DynamoRunStore(client, TABLE),
        clock=Clock(),
        vault=NoVault(),
        hub_for=lambda run, key: None,
        starter=Starter(),
        allowances=CountedLedger(client, TABLE, releases),
    )


@pytest.mark.parametrize("round_", range(5))
def test_two_cancels_and_a_record_failure_give_each_grant_back_once(endpoint, round_):
    task = f"task-{round_}"
    ticket = f"{SESSION}_{task}#g0"
    grants = [
        HeldAllowance(counter=QUOTA, ticket=ticket, amount=1),
        HeldAllowance(counter=SPEND, ticket=ticket, amount=42_000),
    ]
    ledger = DynamoAllowanceLedger(make_client(endpoint), TABLE)
    before = {grant.counter: ledger.used(grant.counter) for grant in grants}
    for grant in grants:
        assert ledger.reserve(grant.counter, grant.ticket, grant.amount, 10**9, 2_000_000_000).granted
    run = queued_run(SESSION, task).model_copy(update={"held": grants, "status": RunStatus.WAITING_FOR_SLOT})
    DynamoRunStore(make_client(endpoint), TABLE).create(run)

    releases: Counter = Counter()
    parties = [
        lambda deps: cancel_session(SESSION, task, deps),
        lambda deps: record_failure(
            FailureInput(session=SESSION, task_id=task, error=StepError(Error="RateLimiterBusy", Cause="{}")),
            deps,
        ),
        lambda deps: cancel_session(SESSION, task, deps),
    ]
    deps = [_deps(endpoint, releases) for _ in parties]
    together = threading.Barrier(len(parties))

    def go(index: int):
        together.wait()
        return parties[index](deps[index])

    with ThreadPoolExecutor(len(parties)) as pool:
        list(pool.map(go, range(len(parties))))

    final = DynamoRunStore(make_client(endpoint), TABLE).get(SESSION, task)
    assert final.status in (RunStatus.CANCELLED, RunStatus.FAILED) and final.held == []
    assert releases == Counter({(grant.counter, grant.ticket): 1 for grant in grants})
    assert {grant.counter: ledger.used(grant.counter) for grant in grants} == before
