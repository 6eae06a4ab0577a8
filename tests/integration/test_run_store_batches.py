"""Runs stored a hundred to a transaction, on the real engine (DynamoDB Local): a transaction refused
because some of its runs exist names them, with their items, and the rest are stored by the next one; a
repeated request stores nothing and reads back what the first stored; requests racing over the same runs
create each run exactly once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from dalle_plugin.adapters.dynamo_runs import DynamoRunStore
from dalle_plugin.domain.run import RunRecord

from tests.integration.dynamodb_tables import make_client, queued_run, sessions_shaped_table

pytestmark = pytest.mark.stack

TABLE = "run-store-batches"


@pytest.fixture(scope="module")
def endpoint():
    with sessions_shaped_table(TABLE) as url:
        yield url


def _run(session: str, task_id: str, owner: str) -> RunRecord:
    return queued_run(session, task_id, owner)


def _runs(session: str, task_ids: list[str], owner: str) -> list[RunRecord]:
    return [_run(session, task_id, owner) for task_id in task_ids]


def test_a_repeated_request_is_refused_whole_and_reads_back_the_first_requests_runs(endpoint):
    store = DynamoRunStore(make_client(endpoint), TABLE)
    ids = [f"t{n:03d}" for n in range(250)]  # three transactions: 100, 100, 50
    first = store.create_many(_runs("repeat", ids, "first-owner"))
    assert [created for _, created in first] == [True] * 250

    again = DynamoRunStore(make_client(endpoint), TABLE).create_many(_runs("repeat", ids, "second-owner"))
    assert [created for _, created in again] == [False] * 250
    assert [run.task_id for run, _ in again] == ids  # in the request's order
    assert {run.owner for run, _ in again} == {"first-owner"}  # the stored runs, not the refused ones
    assert all(run.version == 1 and run.sealed_secrets == b"sealed" for run, _ in again)


def test_a_transaction_with_some_runs_stored_stores_the_others(endpoint):
    store = DynamoRunStore(make_client(endpoint), TABLE)
    ids = [f"t{n:03d}" for n in range(150)]
    stored_before = set(ids[::3])  # scattered through both transactions
    store.create_many(_runs("partial", sorted(stored_before), "earlier"))

    answers = DynamoRunStore(make_client(endpoint), TABLE).create_many(_runs("partial", ids, "later"))
    for task_id, (run, created) in zip(ids, answers, strict=True):
        assert run.task_id == task_id
        assert created is (task_id not in stored_before)
        assert run.owner == ("earlier" if task_id in stored_before else "later")
    assert len(store.list_session("partial")) == 150


def test_requests_racing_over_the_same_runs_create_each_run_once(endpoint):
    writers = 4
    ids = [f"t{n:03d}" for n in range(200)]
    stores = [DynamoRunStore(make_client(endpoint), TABLE) for _ in range(writers)]
    together = threading.Barrier(writers)

    def create(index: int) -> list[tuple[RunRecord, bool]]:
        together.wait()
        return stores[index].create_many(_runs("race", ids, f"owner-{index}"))

    with ThreadPoolExecutor(writers) as pool:
        answers = list(pool.map(create, range(writers)))
    for position, task_id in enumerate(ids):
        seen = [answer[position] for answer in answers]
        assert sum(created for _, created in seen) == 1, task_id  # exactly one request created it
        assert len({run.owner for run, _ in seen}) == 1  # and every request sees that one's run
    assert len(stores[0].list_session("race")) == 200
