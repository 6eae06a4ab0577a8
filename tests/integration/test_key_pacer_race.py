"""An own key's pacing item racing on the real engine (DynamoDB Local): many pacers (each a cold Lambda
container of its own, with its own client) claim the same key at the same ``now``. Exactly the learned
limit is granted, the rest are told when the first slot frees, and no ticket is granted twice; a 429
learned by one pacer then holds every other back until its retry time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from dalle_plugin.adapters.dynamo_key_pacer import DynamoKeyPacer
from dalle_plugin.domain.key_pacing import KeyPaceSettings, Observation, key_fingerprint

from tests.integration.dynamodb_tables import limiter_shaped_table, make_client

pytestmark = pytest.mark.stack

TABLE = "key-pacing-race"
SETTINGS = KeyPaceSettings(window_s=60, margin_ms=250, short_wait_ms=0)
NOW = 1_760_000_000_000
CALLERS = 24
LIMIT = 5


@pytest.fixture(scope="module")
def endpoint():
    with limiter_shaped_table(TABLE) as url:
        yield url


def _pacer(endpoint: str, now_ms: int) -> DynamoKeyPacer:
    return DynamoKeyPacer(make_client(endpoint), TABLE, SETTINGS, clock=lambda: now_ms, sleep=lambda s: None)


def _race(endpoint: str, key_id: str, now_ms: int, tickets: list[str]) -> dict[str, tuple[bool, int]]:
    pacers = [_pacer(endpoint, now_ms) for _ in tickets]
    together = threading.Barrier(len(tickets))

    def call(pacer: DynamoKeyPacer, ticket: str) -> tuple[str, tuple[bool, int]]:
        together.wait()
        decision = pacer.claim(key_id, ticket)
        return ticket, (decision.granted, decision.start_at_ms)

    with ThreadPoolExecutor(len(tickets)) as pool:
        return dict(pool.map(call, pacers, tickets))


def test_exactly_the_learned_limit_is_granted_when_many_claim_at_once(endpoint) -> None:
    key_id = key_fingerprint("sk-own-race-0001")
    teacher = _pacer(endpoint, NOW - 120_000)
    assert teacher.claim(key_id, "probe").granted
    teacher.learn(
        key_id, "probe", Observation(refused=False, limit_requests=LIMIT, remaining_requests=LIMIT - 1)
    )

    first = _race(endpoint, key_id, NOW, [f"run-{n}#1" for n in range(CALLERS)])
    granted = sorted(t for t, (ok, _) in first.items() if ok)
    assert len(granted) == LIMIT
    assert {start for ok, start in first.values() if not ok} == {NOW + SETTINGS.spacing_ms}

    # the same tickets asked again (a re-delivered step) get the same answers, and nothing more is granted
    again = _race(endpoint, key_id, NOW + 10, [f"run-{n}#1" for n in range(CALLERS)])
    assert sorted(t for t, (ok, _) in again.items() if ok) == granted

    # once the window has passed, the next LIMIT go
    later = _race(endpoint, key_id, NOW + SETTINGS.spacing_ms, [f"run-{n}#2" for n in range(CALLERS)])
    assert sum(ok for ok, _ in later.values()) == LIMIT


def test_a_429_learned_by_one_pacer_holds_every_other_back(endpoint) -> None:
    key_id = key_fingerprint("sk-own-race-0002")
    teacher = _pacer(endpoint, NOW)
    assert teacher.claim(key_id, "probe").granted
    teacher.learn(key_id, "probe", Observation(refused=True, limit_requests=LIMIT, retry_after_ms=7_000))
    held = _race(endpoint, key_id, NOW + 100, [f"run-{n}#1" for n in range(8)])
    assert held and all(not ok and start == NOW + 7_000 for ok, start in held.values())
    freed = _race(endpoint, key_id, NOW + 7_000, [f"run-{n}#1" for n in range(8)])
    assert sum(ok for ok, _ in freed.values()) == LIMIT
