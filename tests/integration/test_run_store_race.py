"""Run records written without a read, racing on the real engine (DynamoDB Local).

Many writers (each a store of its own, as separate Lambda environments are) all hold the record at the
same version and append at once: every entry lands exactly once, nothing is overwritten, and the version
counts every write. A cancel racing a step that spends its attempt ends with exactly one of them.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from dalle_plugin.adapters.dynamo_runs import DynamoRunStore
from dalle_plugin.domain.run import RunRecord, RunStatus, TimelineEntry

from tests.integration.dynamodb_tables import make_client, queued_run, sessions_shaped_table

pytestmark = pytest.mark.stack

TABLE = "run-store-race"
WRITERS = 6  # far more than ever write one run at once (a step, a cancel, a redelivered step)


@pytest.fixture(scope="module")
def endpoint():
    with sessions_shaped_table(TABLE) as url:
        yield url


def _run(task_id: str) -> RunRecord:
    return queued_run("race", task_id)


def test_concurrent_appends_all_land_once(endpoint):
    created, _ = DynamoRunStore(make_client(endpoint), TABLE).create(_run("appends"))
    stores = [DynamoRunStore(make_client(endpoint), TABLE) for _ in range(WRITERS)]
    together = threading.Barrier(WRITERS)

    def append(index: int) -> None:
        together.wait()
        stores[index].change(
            created,
            lambda r: r.timeline.append(
                TimelineEntry(step=f"writer-{index}", status="QUEUED", at_ms=10 + index)
            ),
        )

    with ThreadPoolExecutor(WRITERS) as pool:
        list(pool.map(append, range(WRITERS)))
    final = DynamoRunStore(make_client(endpoint), TABLE).get("race", "appends")
    steps = [entry.step for entry in final.timeline]
    assert sorted(steps[1:]) == sorted(f"writer-{i}" for i in range(WRITERS))
    assert final.version == 1 + WRITERS and final.sealed_secrets == b"sealed"


class _Refused(Exception):
    pass


@pytest.mark.parametrize("round_", range(4))
def test_a_cancel_and_a_spent_attempt_never_both_win(endpoint, round_):
    task = f"cancel-{round_}"
    created, _ = DynamoRunStore(make_client(endpoint), TABLE).create(_run(task))
    together = threading.Barrier(2)

    def spend(run: RunRecord) -> None:
        if run.status is RunStatus.CANCELLED:
            raise _Refused
        run.attempt += 1
        run.status = RunStatus.GENERATING

    def cancel(run: RunRecord) -> None:
        if run.status is not RunStatus.QUEUED:
            raise _Refused
        run.status = RunStatus.CANCELLED
        run.sealed_secrets = None

    def race(mutate) -> bool:
        store = DynamoRunStore(make_client(endpoint), TABLE)
        together.wait()
        try:
            store.change(created, mutate)
            return True
        except _Refused:
            return False

    with ThreadPoolExecutor(2) as pool:
        spent, cancelled = pool.map(race, [spend, cancel])
    final = DynamoRunStore(make_client(endpoint), TABLE).get("race", task)
    assert spent != cancelled
    assert final.status is (RunStatus.GENERATING if spent else RunStatus.CANCELLED)
    assert final.attempt == (1 if spent else 0)
    assert (final.sealed_secrets is None) == cancelled
