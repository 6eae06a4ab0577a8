"""The shared key's queue racing on the real engine: DynamoDB Local, many processes and threads at once.

Every thread has its own limiter (a cold Lambda container of its own) and all of them ask at the same
``now``: exactly ``limit`` are granted and everyone else is queued, none lost, none twice; when the slots
free, the next ``limit`` granted are the first ones by acceptance time, not the winners of the race. The
naive fixed-window counter (bench/baselines), raced the same way, lets ``2 * limit`` through around a
window boundary.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import boto3
import pytest
from dalle_plugin.adapters.dynamo_rate_limiter import DynamoRateLimiter
from dalle_plugin.domain.rate_limit import LimiterSettings
from dalle_plugin.ports import RateAsk

from bench.baselines.fixed_window import FixedWindowRateLimiter
from local_stack.dynamodb_local import DynamoDBLocal

pytestmark = pytest.mark.stack

TABLE = "rate-limit-race"
SETTINGS = LimiterSettings(limit=5, window_s=60, skew_margin_ms=250, short_wait_ms=0)
PROCESSES = 8
THREADS = 5
NOW = 1_760_000_000_000


def make_client(endpoint: str) -> Any:
    return boto3.client(
        "dynamodb",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )


@pytest.fixture(scope="module")
def endpoint():
    with DynamoDBLocal() as dynamodb:
        make_client(dynamodb.endpoint_url).create_table(
            TableName=TABLE,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        yield dynamodb.endpoint_url


def _caller_process(endpoint, kind, key, tickets, now_ms, accepted, ready, results) -> None:
    client = make_client(endpoint)
    if kind == "fixed":
        limiters = [FixedWindowRateLimiter(client, TABLE, SETTINGS, key=key) for _ in tickets]
    else:
        limiters = [
            DynamoRateLimiter(client, TABLE, SETTINGS, key=key, clock=lambda: now_ms) for _ in tickets
        ]
    start_together = threading.Barrier(len(tickets))

    def call(limiter, ticket):
        start_together.wait()
        if kind == "fixed":
            return ticket, asdict(limiter.acquire(ticket, now_ms))
        ask = RateAsk(
            run_id=ticket.split("#")[0], ticket=ticket, accepted_ms=accepted.get(ticket, now_ms), org_id="org"
        )
        return ticket, asdict(limiter.acquire(ask))

    try:
        ready.wait(timeout=30)  # every process has its client and limiters: go
        with ThreadPoolExecutor(len(tickets)) as threads:
            results.put(list(threads.map(call, limiters, tickets)))
    except BaseException as error:  # noqa: BLE001 - surface the failure in the parent instead of hanging it
        results.put(repr(error))


def race(
    endpoint: str,
    kind: str,
    key: str,
    bursts: list[tuple[int, list[str]]],
    accepted: dict[str, int] | None = None,
) -> dict[str, dict]:
    """One process per burst (its tickets on threads), all released at once; ticket -> decision."""
    context = multiprocessing.get_context("fork")
    ready = context.Barrier(len(bursts))
    results = context.Queue()
    accepted = accepted or {}
    processes = [
        context.Process(
            target=_caller_process, args=(endpoint, kind, key, tickets, now_ms, accepted, ready, results)
        )
        for now_ms, tickets in bursts
    ]
    for process in processes:
        process.start()
    try:
        collected = [results.get(timeout=90) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=10)
    failures = [outcome for outcome in collected if isinstance(outcome, str)]
    assert not failures, failures
    return {ticket: decision for outcome in collected for ticket, decision in outcome}


def stored_state(endpoint: str, key: str) -> dict[str, Any]:
    stored = make_client(endpoint).get_item(TableName=TABLE, Key={"pk": {"S": key}}, ConsistentRead=True)
    return json.loads(stored["Item"]["state"]["S"])


def test_concurrent_claimers_get_exactly_limit_sends_and_the_rest_queue_in_acceptance_order(endpoint):
    runs = [f"p{p}-t{t}" for p in range(PROCESSES) for t in range(THREADS)]
    accepted_order = runs[:]
    random.Random(11).shuffle(accepted_order)  # acceptance order has nothing to do with who wins the race
    accepted = {f"{run}#1": NOW - 100_000 + rank for rank, run in enumerate(accepted_order)}
    bursts = [(NOW, [f"p{p}-t{t}#1" for t in range(THREADS)]) for p in range(PROCESSES)]

    first = race(endpoint, "queue", "global", bursts, accepted)
    granted = [t for t, d in first.items() if d["granted"]]
    assert len(granted) == SETTINGS.limit  # exactly: not one more, whatever the interleaving
    state = stored_state(endpoint, "global")
    assert sorted(s[1] for s in state["s"]) == sorted(granted)
    waiting = sorted(w[0] for w in state["q"])
    assert waiting == sorted(t.split("#")[0] for t in first if t not in granted)  # none lost, none twice

    # When the slots free, everyone still waiting asks at once: the next `limit` sends are the ones
    # accepted first among them, not the race's winners.
    later = NOW + SETTINGS.spacing_ms
    queued = [f"{run}#1" for run in runs if f"{run}#1" not in granted]
    bursts = [(later, queued[i::PROCESSES]) for i in range(PROCESSES)]
    second = race(endpoint, "queue", "global", bursts, accepted)
    now_granted = {t.split("#")[0] for t, d in second.items() if d["granted"]}
    expected = [run for run in accepted_order if f"{run}#1" in queued][: SETTINGS.limit]
    assert now_granted == set(expected)
    # each told position counts the runs ahead at that moment: its final rank plus those of the first
    # `limit` that had not sent yet
    remaining = [run for run in accepted_order if f"{run}#1" in queued][SETTINGS.limit :]
    for rank, run in enumerate(remaining):
        assert rank <= second[f"{run}#1"]["position"] <= rank + SETTINGS.limit
    state = stored_state(endpoint, "global")
    assert len(state["s"]) == SETTINGS.limit and len(state["q"]) == len(queued) - SETTINGS.limit


def test_a_cold_container_claims_with_two_calls_and_a_redelivered_claim_is_not_granted_twice(endpoint):
    client = make_client(endpoint)
    ask = RateAsk(run_id="run-x", ticket="run-x#1", accepted_ms=NOW, org_id="org")
    DynamoRateLimiter(client, TABLE, SETTINGS, key="cold", clock=lambda: NOW).acquire(
        RateAsk(run_id="first", ticket="first#1", accepted_ms=NOW, org_id="org")
    )
    cold = DynamoRateLimiter(client, TABLE, SETTINGS, key="cold", clock=lambda: NOW + 5)
    claimed = cold.acquire(ask)
    assert (claimed.granted, claimed.calls) == (True, 2)  # the failed first write returned the item
    again = DynamoRateLimiter(client, TABLE, SETTINGS, key="cold", clock=lambda: NOW + 7).acquire(ask)
    assert again.granted
    assert [s[1] for s in stored_state(endpoint, "cold")["s"]] == ["first#1", "run-x#1"]


def test_fixed_window_counter_lets_twice_the_limit_through_across_a_boundary(endpoint):
    window = SETTINGS.window_ms
    boundary = (NOW // window + 1) * window
    half = PROCESSES // 2
    bursts = [(boundary - 1, [f"a{p}-{t}" for t in range(THREADS)]) for p in range(half)]
    bursts += [(boundary, [f"b{p}-{t}" for t in range(THREADS)]) for p in range(half)]

    fixed = race(endpoint, "fixed", "fixed", bursts)
    fixed_granted = sorted(d["start_at_ms"] for d in fixed.values() if d["reserved"])
    # atomic per window (exactly limit on each side), yet 2 * limit starts inside 1 ms
    assert fixed_granted == [boundary - 1] * SETTINGS.limit + [boundary] * SETTINGS.limit
    denied = [d for d in fixed.values() if not d["reserved"]]
    assert {d["start_at_ms"] for d in denied} <= {boundary, boundary + window}

    queue = race(endpoint, "queue", "boundary", bursts)
    # the queue lets `limit` through around the boundary; the rest wait a window
    assert sum(1 for d in queue.values() if d["granted"]) == SETTINGS.limit
