"""A step's first write is its read (``RunStore.open_step``), on the real engine (DynamoDB Local): the write
holds only for the run's owner and a run in none of the refused statuses, answers with the whole record
(sealed secrets and all) when it holds, and with the record untouched when it does not. A cancel racing an
opening ends with the run cancelled, whichever comes first."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from dalle_plugin.adapters.dynamo_runs import DynamoRunStore
from dalle_plugin.domain.run import RunStatus, TimelineEntry
from dalle_plugin.ports import StepOpening

from tests.integration.dynamodb_tables import make_client, queued_run, sessions_shaped_table

pytestmark = pytest.mark.stack

TABLE = "run-store-opening"
OWNER = "execution-1"


@pytest.fixture(scope="module")
def endpoint():
    with sessions_shaped_table(TABLE) as url:
        yield url


def _opening(caller: str | None = OWNER, *refused: RunStatus) -> StepOpening:
    line = TimelineEntry(step="attach", status="ATTACHING", at_ms=2_000, detail="Uploading the image.")
    return StepOpening(
        caller=caller,
        refused=(RunStatus.CANCELLED, *refused),
        updated_at_ms=2_000,
        status=RunStatus.ATTACHING,
        entries=(line,),
    )


def _store(endpoint: str) -> DynamoRunStore:
    return DynamoRunStore(make_client(endpoint), TABLE)


def test_an_opening_writes_and_answers_with_the_whole_record(endpoint):
    created, _ = _store(endpoint).create(queued_run("open", "held", owner=OWNER))
    run, opened = _store(endpoint).open_step("open", "held", _opening())
    assert opened and run.status is RunStatus.ATTACHING and run.version == created.version + 1
    assert run.sealed_secrets == b"sealed" and run.updated_at_ms == 2_000
    assert [entry.detail for entry in run.timeline][-1] == "Uploading the image."
    assert _store(endpoint).get("open", "held") == run
    # the next write of the step holds at the version the opening answered with: no read in between
    after = _store(endpoint).change(run, lambda r: setattr(r, "attempt", 3))
    assert after.version == run.version + 1 and _store(endpoint).get("open", "held").attempt == 3


@pytest.mark.parametrize(
    ("caller", "status", "refused"),
    [
        ("execution-2", RunStatus.QUEUED, ()),  # another execution's run
        (OWNER, RunStatus.CANCELLED, ()),  # a cancelled run is never moved
        (OWNER, RunStatus.SUCCEEDED, (RunStatus.SUCCEEDED,)),  # a status the step decides on itself
    ],
    ids=["not the owner", "cancelled", "refused status"],
)
def test_a_refused_opening_changes_nothing_and_answers_with_the_record_as_it_is(
    endpoint, caller, status, refused
):
    task = f"refused-{caller}-{status.value}"
    created, _ = _store(endpoint).create(queued_run("open", task, owner=OWNER))
    if status is not RunStatus.QUEUED:
        created = _store(endpoint).change(created, lambda r: setattr(r, "status", status))
    run, opened = _store(endpoint).open_step("open", task, _opening(caller, *refused))
    assert not opened and run == created and _store(endpoint).get("open", task) == created


def test_an_opening_of_no_run_answers_none(endpoint):
    assert _store(endpoint).open_step("open", "missing", _opening()) == (None, False)


def test_a_run_without_an_owner_is_opened_by_any_caller(endpoint):
    _store(endpoint).create(queued_run("open", "ownerless"))
    assert _store(endpoint).open_step("open", "ownerless", _opening("anyone"))[1]


def test_a_cancel_racing_an_opening_leaves_the_run_cancelled(endpoint):
    """Each side is one conditional write under the same item: the opening never moves a run the cancel
    has already cancelled, and a cancel after the opening wins as it does over any step's write."""
    for round_ in range(6):
        task = f"race-{round_}"
        created, _ = _store(endpoint).create(queued_run("open", task, owner=OWNER))
        together = threading.Barrier(2)

        def cancel(task: str = task, together: threading.Barrier = together) -> None:
            together.wait()
            _store(endpoint).update("open", task, lambda r: setattr(r, "status", RunStatus.CANCELLED))

        def open_(task: str = task, together: threading.Barrier = together) -> tuple:
            together.wait()
            return _store(endpoint).open_step("open", task, _opening())

        with ThreadPoolExecutor(2) as pool:
            cancelled, opening = pool.submit(cancel), pool.submit(open_)
            cancelled.result()
            run, opened = opening.result()
        final = _store(endpoint).get("open", task)
        assert final.status is RunStatus.CANCELLED
        assert opened or run.status is RunStatus.CANCELLED  # refused only by the cancel
        assert final.version == created.version + 1 + int(opened)


def test_an_opening_records_handed_on_images_only_on_a_run_without_one(endpoint):
    """Attach's opening records Generate's images (and takes its grants off the record) under the condition
    that the run has no image: a retried Attach, which finds them there, neither writes them again nor
    appends their line twice."""
    from dalle_plugin.domain.run import HeldAllowance, ImageInfo

    image = ImageInfo(key="images/a.png", sha256="ab" * 32, bytes=9, model="gpt-image-2", size="1024x1024")
    grant = HeldAllowance(counter="session#open", ticket="t", amount=1)
    created, _ = _store(endpoint).create(queued_run("open", "images", owner=OWNER))
    _store(endpoint).change(created, lambda r: r.held.append(grant))
    generated = TimelineEntry(step="generate", status="GENERATING", at_ms=1_900, detail="Image generated.")
    opening = StepOpening(
        caller=OWNER,
        refused=(RunStatus.CANCELLED,),
        updated_at_ms=2_000,
        status=RunStatus.ATTACHING,
        entries=(generated,),
        sets={"image": image, "more_images": [], "held": []},
        absent=("image",),
    )
    run, opened = _store(endpoint).open_step("open", "images", opening)
    assert opened and run.image == image and run.held == [] and run.timeline[-1] == generated
    again, opened_again = _store(endpoint).open_step("open", "images", opening)
    assert not opened_again and again == run and _store(endpoint).get("open", "images") == run
