"""The shared key's queue racing on the real engine: DynamoDB Local, many processes and threads at once.

Every thread has its own limiter (a cold Lambda container of its own). Runs joining at once get distinct
consecutive tickets, none lost, none twice; all of them claiming at the same ``now`` get exactly ``limit``
sends, and those are the first tickets (the acceptance order), not the race's winners; when the slots
free, the next ``limit`` tickets are granted. A send held up after its grant is recorded again before it
leaves, or, once its slot was reused, does not leave. The naive fixed-window counter (bench/baselines),
raced the same way, lets ``2 * limit`` through around a window boundary.
"""

from __future__ import annotations

import multiprocessing
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any

import pytest
from dalle_plugin.adapters.dynamo_rate_limiter import DynamoRateLimiter, decode_state
from dalle_plugin.domain.rate_limit import LimiterSettings
from dalle_plugin.ports import RateClaim

from bench.baselines.fixed_window import FixedWindowRateLimiter
from local_stack.dynamodb_local import DynamoDBLocal
from local_stack.dynamodb_local import local_client as make_client

pytestmark = pytest.mark.stack

TABLE = "rate-limit-race"
SETTINGS = LimiterSettings(limit=5, window_s=60, skew_margin_ms=250, wake_lead_ms=0, short_wait_ms=0)
PROCESSES = 8
THREADS = 5
NOW = 1_760_000_000_000


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


def _caller_process(endpoint, kind, key, calls, now_ms, ready, results) -> None:
    client = make_client(endpoint)
    start_together = threading.Barrier(len(calls))

    def call(name_and_ticket):
        name, ticket = name_and_ticket
        if kind == "fixed":
            limiter = FixedWindowRateLimiter(client, TABLE, SETTINGS, key=key)
            start_together.wait()
            return name, asdict(limiter.acquire(name, now_ms))
        limiter = DynamoRateLimiter(client, TABLE, SETTINGS, key=key, clock=lambda: now_ms)
        start_together.wait()
        if kind == "join":
            return name, limiter.join("org", False, 1)._asdict()
        return name, limiter.claim(RateClaim("org", False, ticket, f"{name}#1"))._asdict()

    try:
        ready.wait(timeout=30)  # every process has its client: go
        with ThreadPoolExecutor(len(calls)) as threads:
            results.put(list(threads.map(call, calls)))
    except BaseException as error:  # noqa: BLE001 - surface the failure in the parent instead of hanging it
        results.put(repr(error))


def race(
    endpoint: str, kind: str, key: str, bursts: list[tuple[int, list[tuple[str, int]]]]
) -> dict[str, dict]:
    """One process per burst (its calls on threads), all released at once; name -> answer."""
    context = multiprocessing.get_context("fork")
    ready = context.Barrier(len(bursts))
    results = context.Queue()
    processes = [
        context.Process(target=_caller_process, args=(endpoint, kind, key, calls, now_ms, ready, results))
        for now_ms, calls in bursts
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
    return {name: answer for outcome in collected for name, answer in outcome}


def stored_state(endpoint: str, key: str, settings: LimiterSettings = SETTINGS) -> Any:
    stored = make_client(endpoint).get_item(TableName=TABLE, Key={"pk": {"S": key}}, ConsistentRead=True)
    return DynamoRateLimiter(None, TABLE, settings).from_item(stored["Item"])


def test_runs_joining_at_once_get_distinct_tickets_and_claims_at_once_are_served_in_ticket_order(endpoint):
    runs = [f"p{p}-t{t}" for p in range(PROCESSES) for t in range(THREADS)]
    joined = race(
        endpoint, "join", "global", [(NOW, [(r, 0) for r in runs[p::PROCESSES]]) for p in range(PROCESSES)]
    )
    tickets = {run: answer["first_ticket"] for run, answer in joined.items()}
    assert sorted(tickets.values()) == list(range(len(runs)))  # none lost, none twice

    # everyone claims at the same moment (cold containers, no view), again and again as told: never more
    # than `limit` sends, and always the first tickets (a ticket sends only after the ones before it)
    claims = [(run, tickets[run]) for run in runs]
    random.Random(11).shuffle(claims)  # who asks first has nothing to do with the order
    granted: list[int] = []
    for _ in range(SETTINGS.limit + 1):
        asking = [(run, ticket) for run, ticket in claims if ticket not in granted]
        answers = race(endpoint, "claim", "global", [(NOW, asking[p::PROCESSES]) for p in range(PROCESSES)])
        granted += [tickets[run] for run, answer in answers.items() if answer["granted"]]
        assert sorted(granted) == list(range(len(granted))) and len(granted) <= SETTINGS.limit
        if len(granted) == SETTINGS.limit:
            break
    assert sorted(granted) == list(range(SETTINGS.limit))
    for run, answer in answers.items():
        if not answer["granted"]:  # told the runs ahead of it when it asked
            assert tickets[run] - SETTINGS.limit <= answer["position"] <= tickets[run]
    state = stored_state(endpoint, "global")
    assert state.grants == SETTINGS.limit

    # When the slots free, everyone still waiting claims at once: the next `limit` tickets send.
    later = NOW + SETTINGS.spacing_ms
    waiting = [(run, ticket) for run, ticket in claims if ticket >= SETTINGS.limit]
    now_granted: list[int] = []
    for _ in range(SETTINGS.limit + 1):
        asking = [(run, ticket) for run, ticket in waiting if ticket not in now_granted]
        second = race(endpoint, "claim", "global", [(later, asking[p::PROCESSES]) for p in range(PROCESSES)])
        now_granted += [tickets[run] for run, answer in second.items() if answer["granted"]]
        if len(now_granted) >= SETTINGS.limit:
            break
    assert sorted(now_granted) == list(range(SETTINGS.limit, 2 * SETTINGS.limit))
    state = stored_state(endpoint, "global")
    assert dict(state.lines)["w:org"].served == 2 * SETTINGS.limit


def test_a_redelivered_claim_is_granted_again_and_records_nothing(endpoint):
    client = make_client(endpoint)
    first = DynamoRateLimiter(client, TABLE, SETTINGS, key="again", clock=lambda: NOW)
    joined = first.join("org", False, 2)
    claim = RateClaim("org", False, joined.first_ticket, "run-x#1", joined.view)
    assert first.claim(claim).granted
    again = DynamoRateLimiter(client, TABLE, SETTINGS, key="again", clock=lambda: NOW + 7).claim(claim)
    assert again.granted
    state = stored_state(endpoint, "again")
    assert state.grants == 1 and [s.send for s in state.slots if s] == ["run-x#1"]


def test_a_batchs_last_run_claims_from_its_batchs_view_in_one_write_though_more_runs_joined_since(endpoint):
    """The last ticket in a view empties its line there, but tickets added since queue behind it: its grant
    keeps the line, whatever its next ticket is, instead of a removal that loses to the added tickets."""
    client = make_client(endpoint)
    first = DynamoRateLimiter(client, TABLE, SETTINGS, key="last-of-batch", clock=lambda: NOW)
    joined = first.join("org", False, 2)
    later = DynamoRateLimiter(client, TABLE, SETTINGS, key="last-of-batch", clock=lambda: NOW)
    assert later.join("org", False, 3).first_ticket == joined.first_ticket + 2
    for index, ticket in enumerate((joined.first_ticket, joined.first_ticket + 1)):
        at = joined.starts_at_ms[index]
        limiter = DynamoRateLimiter(client, TABLE, SETTINGS, key="last-of-batch", clock=lambda at=at: at)
        decision = limiter.claim(RateClaim("org", False, ticket, f"run-{ticket}#1", joined.view))
        assert decision.granted and decision.calls == 1
    line = stored_state(endpoint, "last-of-batch").line("w:org")
    assert line is not None and list(line.tickets()) == [2, 3, 4]


def test_a_line_its_last_grant_emptied_is_made_anew_above_its_tickets_and_removed_by_the_next_write(endpoint):
    client, key = make_client(endpoint), "emptied-line"
    joined = DynamoRateLimiter(client, TABLE, SETTINGS, key=key, clock=lambda: NOW).join("org", False, 2)
    for index, ticket in enumerate((joined.first_ticket, joined.first_ticket + 1)):
        at = joined.starts_at_ms[index]
        limiter = DynamoRateLimiter(client, TABLE, SETTINGS, key=key, clock=lambda at=at: at)
        assert limiter.claim(RateClaim("org", False, ticket, f"run-{ticket}#1", joined.view)).granted
    kept = stored_state(endpoint, key).line("w:org")
    assert kept is not None and not kept.waiting  # kept by the grant that emptied it
    # a warm API whose last look had runs waiting in it would add tickets to it: refused (a line made anew
    # is counted in ``c``, an addition is not), so it makes the line, one write later
    warm = DynamoRateLimiter(client, TABLE, SETTINGS, key=key, clock=lambda: NOW)  # its runs not due yet
    warm._state = decode_state(joined.view)
    remade = warm.join("org", False, 1)
    assert remade.calls == 2 and remade.first_ticket == 2
    assert stored_state(endpoint, key).changes == 2
    limiter = DynamoRateLimiter(client, TABLE, SETTINGS, key=key, clock=lambda: remade.starts_at_ms[0])
    assert limiter.claim(RateClaim("org", False, 2, "run-2#1", remade.view)).granted
    # a cold API (nothing in hand) makes it anew in one write, its tickets above the served ones
    again = DynamoRateLimiter(client, TABLE, SETTINGS, key=key, clock=lambda: NOW + 9000).join(
        "org", False, 1
    )
    assert again.calls == 1 and again.first_ticket == 3 and again.positions == (0,)
    assert stored_state(endpoint, key).changes == 3
    # the next grant's write drops a line kept emptied: the state holds the lines with runs waiting
    solo = DynamoRateLimiter(client, TABLE, SETTINGS, key="emptied-then-other", clock=lambda: NOW)
    first = solo.join("org", False, 1)
    solo = DynamoRateLimiter(
        client, TABLE, SETTINGS, key="emptied-then-other", clock=lambda: first.starts_at_ms[0]
    )
    assert solo.claim(RateClaim("org", False, first.first_ticket, "solo#1", first.view)).granted
    assert "w:org" in dict(stored_state(endpoint, "emptied-then-other").lines)
    behind = solo.join("other-org", False, 1)
    late = DynamoRateLimiter(
        client, TABLE, SETTINGS, key="emptied-then-other", clock=lambda: behind.starts_at_ms[0]
    )
    assert late.claim(RateClaim("other-org", False, behind.first_ticket, "b#1", behind.view)).granted
    assert [name for name, _ in stored_state(endpoint, "emptied-then-other").lines] == ["w:other-org"]


def test_a_run_behind_one_due_that_never_claims_is_told_to_wait_not_that_the_queue_is_busy(endpoint):
    """Polling in place behind a run that is due and silent (it failed and its Record Failure has not left
    the line yet) uses up the call's attempts without any write lost: that is waiting, so the step is told
    its turn and sleeps; RateLimiterBusy is for writes lost to other runs."""
    client, clock = make_client(endpoint), Clock(NOW)
    waits = LimiterSettings(limit=5, window_s=60, skew_margin_ms=600, wake_lead_ms=0, short_wait_ms=60_000)

    def sleep(seconds: float) -> None:
        clock.now += max(1, round(seconds * 1000))

    behind = DynamoRateLimiter(client, TABLE, waits, key="silent", clock=clock, sleep=sleep, max_attempts=10)
    joined = behind.join("org", False, 2)  # ticket 0 is due and never claims
    # later than a margin past the head's turn: it is away, not a clock behind this one's, so it keeps its
    # place (within the margin the run behind would go first)
    clock.now = joined.starts_at_ms[0] + waits.skew_margin_ms
    told = behind.claim(RateClaim("org", False, joined.first_ticket + 1, "run-b#1", joined.view))
    assert not told.granted and told.position == 1 and told.ticket == joined.first_ticket + 1
    # it polled in place, and gave up before a skip
    assert joined.starts_at_ms[0] < clock.now < joined.starts_at_ms[0] + waits.abandon_after_ms


def test_a_run_whose_turn_came_goes_before_one_due_less_than_a_margin_ago(endpoint):
    """The run ahead has not claimed, but its turn came less than a margin ago (its clock may be behind
    this one's): the run behind takes the next grant in one write after learning the item, and the run
    ahead takes the one after it when it comes."""
    client, clock = make_client(endpoint), Clock(NOW)
    settings = LimiterSettings(limit=5, window_s=60, skew_margin_ms=600, wake_lead_ms=0, short_wait_ms=0)
    limiter = DynamoRateLimiter(client, TABLE, settings, key="early", clock=clock)
    joined = limiter.join("org", False, 2)
    clock.now = joined.starts_at_ms[1]
    second = limiter.claim(RateClaim("org", False, joined.first_ticket + 1, "run-b#1", joined.view))
    assert second.granted and second.start_at_ms == joined.starts_at_ms[1]
    clock.now += 1
    first = limiter.claim(RateClaim("org", False, joined.first_ticket, "run-a#1", joined.view))
    assert first.granted
    state = stored_state(endpoint, "early")
    assert state.grants == 2 and not any(line.waiting for _, line in state.lines)


#: one send per window, so a send's slot is the one the next grant checks
ONE = LimiterSettings(limit=1, window_s=60, skew_margin_ms=600, wake_lead_ms=0, short_wait_ms=0)


class Clock:
    def __init__(self, now: int):
        self.now = now

    def __call__(self) -> int:
        return self.now


def test_a_send_held_up_after_its_grant_is_recorded_again_before_it_leaves(endpoint):
    """The window is checked against the time a send leaves, not the grant's earlier clock reading: a send
    held up past the tolerance is stamped again, and the next grant waits for one window after that."""
    client, clock = make_client(endpoint), Clock(NOW)
    first = DynamoRateLimiter(client, TABLE, ONE, key="late", clock=clock)
    joined = first.join("org", False, 2)
    ask = RateClaim("org", False, joined.first_ticket, "run-a#1", joined.view)
    granted = first.claim(ask)
    assert granted.granted and granted.start_at_ms == NOW
    calls = first.calls
    clock.now = NOW + ONE.send_tolerance
    assert first.confirm_send(ask, granted) == NOW and first.calls == calls  # on time: nothing written
    clock.now = NOW + 10_000  # the step starved of CPU between its grant and its request
    assert first.confirm_send(ask, granted) == NOW + 10_000
    assert stored_state(endpoint, "late", ONE).slots[0].at_ms == NOW + 10_000

    clock.now = NOW + ONE.spacing_ms  # a window after the grant's reading, not after the send
    second = DynamoRateLimiter(client, TABLE, ONE, key="late", clock=clock)
    ask_b = RateClaim("org", False, joined.first_ticket + 1, "run-b#1")
    told = second.claim(ask_b)
    assert not told.granted and told.start_at_ms == NOW + 10_000 + ONE.spacing_ms
    clock.now = told.start_at_ms
    assert second.claim(RateClaim("org", False, told.ticket, "run-b#1", told.view)).granted


def test_a_send_held_up_until_its_slot_was_reused_does_not_leave(endpoint):
    client, clock = make_client(endpoint), Clock(NOW)
    first = DynamoRateLimiter(client, TABLE, ONE, key="reused", clock=clock)
    joined = first.join("org", False, 2)
    ask = RateClaim("org", False, joined.first_ticket, "run-a#1", joined.view)
    granted = first.claim(ask)
    assert granted.granted
    clock.now = NOW + ONE.spacing_ms  # run A still has not sent; by its grant's time the slot is free
    second = DynamoRateLimiter(client, TABLE, ONE, key="reused", clock=clock)
    assert second.claim(RateClaim("org", False, joined.first_ticket + 1, "run-b#1")).granted
    clock.now += 1
    assert first.confirm_send(ask, granted) is None  # its send is no longer counted: it must not leave
    state = stored_state(endpoint, "reused", ONE)
    assert state.grants == 2 and [s.send for s in state.slots if s] == ["run-b#1"]


def test_fixed_window_counter_lets_twice_the_limit_through_across_a_boundary(endpoint):
    window = SETTINGS.window_ms
    boundary = (NOW // window + 1) * window
    half = PROCESSES // 2
    bursts = [(boundary - 1, [(f"a{p}-{t}", 0) for t in range(THREADS)]) for p in range(half)]
    bursts += [(boundary, [(f"b{p}-{t}", 0) for t in range(THREADS)]) for p in range(half)]

    fixed = race(endpoint, "fixed", "fixed", bursts)
    fixed_granted = sorted(d["start_at_ms"] for d in fixed.values() if d["reserved"])
    # atomic per window (exactly limit on each side), yet 2 * limit starts inside 1 ms
    assert fixed_granted == [boundary - 1] * SETTINGS.limit + [boundary] * SETTINGS.limit

    # the queue, raced the same way around the boundary, lets `limit` through; the rest wait a window
    names = [name for _, calls in bursts for name, _ in calls]
    joined = race(
        endpoint, "join", "boundary", [(boundary - 1, [(n, 0) for n in names[p::half]]) for p in range(half)]
    )
    calls = [[(n, joined[n]["first_ticket"]) for n, _ in burst] for _, burst in bursts]
    sent = 0
    for _ in range(SETTINGS.limit + 1):
        queue = race(
            endpoint, "claim", "boundary", [(at, c) for (at, _), c in zip(bursts, calls, strict=True)]
        )
        sent += sum(1 for d in queue.values() if d["granted"])
        calls = [[(n, t) for n, t in burst if not queue[n]["granted"]] for burst in calls]
        if sent >= SETTINGS.limit:
            break
    assert sent == SETTINGS.limit
