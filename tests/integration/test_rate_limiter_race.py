"""The global limiter racing on the real engine: DynamoDB Local, many processes and threads at once.

Every thread has its own limiter (a cold Lambda container of its own) and all of them ask at the same
``now``: exactly ``limit`` may start at once and everyone else gets a later booking, one spacing per
``limit`` callers, with no gaps and no duplicates. The naive fixed-window counter, raced the same way,
lets ``2 * limit`` through around a window boundary.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import boto3
import pytest

from dalle_plugin.adapters.dynamo_rate_limiter import DynamoRateLimiter, FixedWindowRateLimiter
from dalle_plugin.domain.rate_limit import LimiterSettings
from local_stack.dynamodb_local import DynamoDBLocal

pytestmark = pytest.mark.stack

TABLE = "rate-limit-race"
SETTINGS = LimiterSettings(limit=5, window_s=60, skew_margin_ms=250)
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


def _caller_process(endpoint, kind, key, tickets, now_ms, ready, results) -> None:
    client = make_client(endpoint)
    limiter_class = DynamoRateLimiter if kind == "sliding" else FixedWindowRateLimiter
    limiters = [limiter_class(client, TABLE, SETTINGS, key=key) for _ in tickets]
    start_together = threading.Barrier(len(tickets))

    def call(limiter, ticket):
        start_together.wait()
        return ticket, asdict(limiter.acquire(ticket, now_ms))

    try:
        ready.wait(timeout=30)  # every process has its client and limiters: go
        with ThreadPoolExecutor(len(tickets)) as threads:
            results.put(list(threads.map(call, limiters, tickets)))
    except BaseException as error:  # surface the failure in the parent instead of hanging it
        results.put(repr(error))


def race(endpoint: str, kind: str, key: str, bursts: list[tuple[int, list[str]]]) -> dict[str, dict]:
    """One process per burst (its tickets on threads), all released at once; ticket -> decision."""
    context = multiprocessing.get_context("fork")
    ready = context.Barrier(len(bursts))
    results = context.Queue()
    processes = [
        context.Process(target=_caller_process, args=(endpoint, kind, key, tickets, now_ms, ready, results))
        for now_ms, tickets in bursts
    ]
    for process in processes:
        process.start()
    try:
        collected = [results.get(timeout=60) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=10)
    failures = [outcome for outcome in collected if isinstance(outcome, str)]
    assert not failures, failures
    return {ticket: decision for outcome in collected for ticket, decision in outcome}


def same_now_bursts(round_no: int, now_ms: int) -> list[tuple[int, list[str]]]:
    return [(now_ms, [f"r{round_no}-p{p}-t{t}#1" for t in range(THREADS)]) for p in range(PROCESSES)]


def test_concurrent_callers_get_exactly_limit_immediate_starts_and_back_to_back_bookings(endpoint):
    callers = PROCESSES * THREADS
    spacing = SETTINGS.spacing_ms
    all_starts: list[int] = []
    for round_no in range(3):
        now_ms = NOW + round_no * 10_000_000  # past the previous round's whole backlog
        decisions = race(endpoint, "sliding", "global", same_now_bursts(round_no, now_ms))
        assert len(decisions) == callers

        starts = sorted(d["start_at_ms"] for d in decisions.values())
        # exactly `limit` go at once (at the moment each booking was made: a caller that backed off
        # under contention books for when it got through, a few hundred ms at most)
        assert all(now_ms <= s < now_ms + 5_000 for s in starts[: SETTINGS.limit])
        assert starts[SETTINGS.limit] >= starts[0] + spacing
        # then limit per spacing, back to back: no slot lost, none handed out twice
        for k in range(SETTINGS.limit, callers):
            assert starts[k] == max(starts[k - SETTINGS.limit] + spacing, starts[k - 1]), k
        # (positions are exact in the pure rules' property tests; here each caller's "now" moved on by
        # its own back-off, so they are only checked to say that the last one waits behind others)
        assert max(decisions.values(), key=lambda d: d["start_at_ms"])["position"] > 0
        assert all(d["reserved"] and d["calls"] >= 1 for d in decisions.values())
        all_starts += starts

    for index, start in enumerate(all_starts):
        in_window = [s for s in all_starts if start <= s < start + SETTINGS.window_ms]
        assert len(in_window) <= SETTINGS.limit, index

    stored = make_client(endpoint).get_item(TableName=TABLE, Key={"pk": {"S": "global"}}, ConsistentRead=True)
    assert stored["Item"]["issued"] == {"N": str(3 * callers)}


def test_a_cold_container_books_with_two_calls_and_a_retried_ticket_is_not_booked_twice(endpoint):
    client = make_client(endpoint)
    DynamoRateLimiter(client, TABLE, SETTINGS, key="cold").acquire("first#1", NOW)

    cold = DynamoRateLimiter(client, TABLE, SETTINGS, key="cold")
    booked = cold.acquire("run-x#1", NOW + 5)
    assert (booked.start_at_ms, booked.calls) == (NOW + 5, 2)  # the failed first write returned the item
    assert cold.acquire("run-y#1", NOW + 6).calls == 1  # warm: nobody wrote in between

    retried = DynamoRateLimiter(client, TABLE, SETTINGS, key="cold").acquire("run-x#1", NOW + 7)
    assert retried.start_at_ms == booked.start_at_ms and retried.calls == 1
    stored = client.get_item(TableName=TABLE, Key={"pk": {"S": "cold"}}, ConsistentRead=True)
    assert stored["Item"]["issued"] == {"N": "3"}


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

    sliding = race(endpoint, "sliding", "boundary", bursts)
    # the sliding window lets `limit` through around the boundary, the rest a window later
    first_window = [d for d in sliding.values() if d["start_at_ms"] < boundary - 1 + SETTINGS.window_ms]
    assert len(first_window) == SETTINGS.limit


def test_a_start_given_back_by_a_cancelled_run_goes_to_exactly_one_next_caller(endpoint):
    limits = LimiterSettings(limit=1, window_s=10.0, skew_margin_ms=0, wait_granularity_ms=1)
    client = make_client(endpoint)
    first, waiting = (DynamoRateLimiter(client, TABLE, limits, key="release") for _ in range(2))
    assert first.acquire("a", 0).start_at_ms == 0
    booked = waiting.acquire("b", 0)
    assert booked.start_at_ms == 10_000
    waiting.release("b", 1_000, booked.start_at_ms)  # run b was cancelled while it waited

    # Several fresh callers race for it: one takes 10 000, the others queue after it as usual.
    racers = [DynamoRateLimiter(make_client(endpoint), TABLE, limits, key="release") for _ in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        starts = sorted(pool.map(lambda pair: pair[1].acquire(f"c{pair[0]}", 2_000).start_at_ms, enumerate(racers)))
    assert starts.count(10_000) == 1
    assert starts[1:] == [20_000, 30_000, 40_000]
