"""The batch starter's progress record on DynamoDB Local: the one place its rules are conditions that a
fake cannot check (an attempt begun once by concurrent POSTs, a count that never goes back, an attempt ended
by a cancel or a failure, after which a resend begins the next one). docs/batches.md."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from dalle_plugin.adapters.dynamo_batches import DynamoBatchProgress

from tests.integration.dynamodb_tables import make_client, sessions_shaped_table

TABLE = "sessions-batch-progress"
EXPIRES = 2_000_000_000


@pytest.fixture(scope="module")
def progress():
    with sessions_shaped_table(TABLE) as endpoint:
        yield DynamoBatchProgress(make_client(endpoint), TABLE)


def test_concurrent_posts_begin_one_attempt_and_a_resend_after_it_stored_everything_begins_the_next(progress):
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = list(pool.map(lambda _: progress.begin("s1", "d1", 30, EXPIRES), range(6)))
    begun = [state for state, before in answers if before is None]
    assert len(begun) == 1 and {state.attempt for state, _ in answers} == {1}
    assert all(before == state for state, before in answers if before is not None)  # joined it

    assert progress.stored("s1", "d1", 1, 20) and progress.stored("s1", "d1", 1, 10)  # a retried step
    assert [(b.attempt, b.stored) for b in progress.of_session("s1")] == [(1, 20)]
    assert progress.begin("s1", "d1", 30, EXPIRES)[1].attempt == 1  # still under way: joined
    assert progress.stored("s1", "d1", 1, 30)
    state, before = progress.begin("s1", "d1", 30, EXPIRES)
    assert (state.attempt, state.stored, before.attempt, before.stored) == (2, 0, 1, 30)


def test_an_ended_attempt_stops_its_starter_and_a_resend_begins_the_next_without_the_old_sentence(progress):
    progress.begin("s2", "d1", 30, EXPIRES)
    progress.stored("s2", "d1", 1, 10)
    assert progress.end("s2", "d1", 1, "cancelled", "Cancelled while the batch was being stored.")
    assert not progress.end("s2", "d1", 1, "failed", "a second ending")  # the first one stands
    (state,) = progress.of_session("s2")
    assert (state.ended_by, state.ended_why, state.under_way) == (
        "cancelled",
        "Cancelled while the batch was being stored.",
        False,
    )
    assert not progress.stored("s2", "d1", 1, 20)  # the starter is told to stop
    state, before = progress.begin("s2", "d1", 30, EXPIRES)
    assert state.attempt == 2 and before.ended_by == "cancelled"
    (now,) = progress.of_session("s2")
    assert now.under_way and now.ended_by is None and now.ended_why is None
    assert not progress.end("s2", "d1", 1, "failed", "the old attempt's late failure")  # ends nothing new
    assert progress.stored("s2", "d1", 2, 30) and not progress.end("s2", "d1", 2, "failed", "stored in full")
