"""The spending ledger on the real engine: many runs reserving at once never pass the limit.

Each thread has its own client (a Lambda container of its own) and all reserve against one counter at the
same moment; only as many grants as fit are given, the total never passes the limit, a ticket is counted
once however often it asks, and a release gives exactly its amount back.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from dalle_plugin.adapters.dynamo_allowances import DynamoAllowanceLedger

from tests.integration.dynamodb_tables import make_client, sessions_shaped_table

pytestmark = pytest.mark.stack

TABLE = "allowance-race"
CALLERS = 24


@pytest.fixture(scope="module")
def endpoint():
    with sessions_shaped_table(TABLE) as url:
        yield url


def _race(endpoint: str, counter: str, tickets: list[str], amount: int, limit: int):
    ledgers = [DynamoAllowanceLedger(make_client(endpoint), TABLE) for _ in tickets]
    together = threading.Barrier(len(tickets))

    def reserve(index: int):
        together.wait()
        return tickets[index], ledgers[index].reserve(counter, tickets[index], amount, limit, 2_000_000_000)

    with ThreadPoolExecutor(len(tickets)) as pool:
        return list(pool.map(reserve, range(len(tickets))))


def test_concurrent_reservations_never_pass_the_limit(endpoint):
    # a $0.30 session, runs of 2 images at $0.042: 3 fit (0.252), the 4th would pass
    answers = _race(endpoint, "SPEND#SESSION#race", [f"run-{i}#g0" for i in range(CALLERS)], 84_000, 300_000)
    granted = [ticket for ticket, answer in answers if answer.granted]
    assert len(granted) == 3
    ledger = DynamoAllowanceLedger(make_client(endpoint), TABLE)
    assert ledger.used("SPEND#SESSION#race") == 252_000
    assert all(answer.used <= 300_000 for _, answer in answers)


def test_one_ticket_asking_at_once_from_many_places_is_counted_once(endpoint):
    answers = _race(endpoint, "QUOTA#ORG#o#2026-11-20", ["same#g0"] * 8, 2, 10)
    assert all(answer.granted for _, answer in answers)
    assert DynamoAllowanceLedger(make_client(endpoint), TABLE).used("QUOTA#ORG#o#2026-11-20") == 2


def test_a_release_gives_back_its_amount_once_and_lets_the_next_run_in(endpoint):
    ledger = DynamoAllowanceLedger(make_client(endpoint), TABLE)
    counter = "SPEND#SESSION#release"
    assert ledger.reserve(counter, "a#g0", 60, 100, 2_000_000_000).granted
    refused = ledger.reserve(counter, "b#g0", 60, 100, 2_000_000_000)
    assert not refused.granted and refused.used == 60
    ledger.release(counter, "a#g0", 60)
    ledger.release(counter, "a#g0", 60)  # a retried release
    assert ledger.used(counter) == 0
    assert ledger.reserve(counter, "b#g0", 60, 100, 2_000_000_000).granted
