"""The session summary's counts, read from the ``RunTallies`` index on the real engine (DynamoDB Local),
while steps write: every read counts each run exactly once, and once the writes stop the counts are the
table's, whatever raced (concurrent steps on one run, a duplicate delivery, a retried write)."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from dalle_plugin.adapters.dynamo_runs import DynamoRunStore
from dalle_plugin.domain.run import ImageInfo, RunRecord, RunStatus, TimelineEntry
from dalle_plugin.domain.sessions import session_page

from tests.integration.dynamodb_tables import make_client, queued_run, sessions_shaped_table

pytestmark = pytest.mark.stack

TABLE = "session-tallies"
SESSION = "tallies"
RUNS = 120
WRITERS = 4  # each run's steps are written by two of them at once: a duplicate delivery of every step
STEPS = (RunStatus.EXTRACTING, RunStatus.GENERATING, RunStatus.ATTACHING)


@pytest.fixture(scope="module")
def endpoint():
    with sessions_shaped_table(TABLE) as url:
        yield url


def _final(index: int) -> RunStatus:
    return RunStatus.FAILED if index % 5 == 0 else RunStatus.SUCCEEDED


def _step(store: DynamoRunStore, task_id: str, status: RunStatus, index: int) -> None:
    """One step's write as the steps make it: on a conflict the change is made again on the record as it
    now is, so a step delivered twice writes twice and both land."""

    def mutate(run: RunRecord) -> None:
        run.status = status
        run.updated_at_ms += 1
        run.timeline.append(TimelineEntry(step=status.value.lower(), status=status.value, at_ms=2))
        if status is RunStatus.ATTACHING and run.image is None:
            run.image = ImageInfo(
                key=f"k/{task_id}", sha256="0" * 64, bytes=1, model="gpt-image-2", size="1024x1024"
            )

    store.update(SESSION, task_id, mutate)


def test_every_read_counts_each_run_once_and_the_end_counts_are_the_tables(endpoint):
    seed = DynamoRunStore(make_client(endpoint), TABLE)
    task_ids = [f"t{index:04d}" for index in range(RUNS)]
    seed.create_many([queued_run(SESSION, task_id) for task_id in task_ids])
    stores = [DynamoRunStore(make_client(endpoint), TABLE) for _ in range(WRITERS)]
    reader = DynamoRunStore(make_client(endpoint), TABLE)
    writing = threading.Event()
    writing.set()
    reads: list[Counter[str]] = []

    def read_while_writing() -> None:
        while writing.is_set():
            tallies = reader.tallies(SESSION)
            reads.append(Counter(tally.task_id for tally in tallies))

    def work(writer: int) -> None:
        # writers 2k and 2k+1 take the same runs: every step of a run is written twice, concurrently
        for index in range(writer // 2, RUNS, WRITERS // 2):
            for status in (*STEPS, _final(index)):
                _step(stores[writer], task_ids[index], status, index)
            _step(stores[writer], task_ids[index], _final(index), index)  # a retried last write

    with ThreadPoolExecutor(WRITERS + 1) as pool:
        reading = pool.submit(read_while_writing)
        list(pool.map(work, range(WRITERS)))
        writing.clear()
        reading.result()

    assert len(reads) >= 2, "the reader never overlapped the writers"
    for seen in reads:  # mid-flight: no run missing, none twice
        assert set(seen) == set(task_ids) and set(seen.values()) == {1}
    table = Counter(run.status.value for run in seed.list_session(SESSION))
    summary = session_page(SESSION, DynamoRunStore(make_client(endpoint), TABLE))
    assert summary is not None
    failed = sum(1 for index in range(RUNS) if _final(index) is RunStatus.FAILED)
    assert summary["counts"] == dict(table) == {"FAILED": failed, "SUCCEEDED": RUNS - failed}
    assert summary["progress"] == {
        "total": RUNS,
        "done": RUNS - failed,
        "failed": failed,
        "cancelled": 0,
        "waiting": 0,
        "running": 0,
    }
    assert summary["status"] == "FAILED" and summary["estimatedCostUsd"] > 0
