"""GET /sessions/{id} in pages: a summary counted from every run, runs a page at a time through opaque
tokens, and the page arithmetic that keeps any answer far below Lambda's 6 MB with 10,000 long prompts."""

from __future__ import annotations

import json

import pytest
from dalle_plugin.domain.errors import InvalidRequest
from dalle_plugin.domain.run import ModelInfo, RunRecord, RunStatus
from dalle_plugin.domain.sessions import page_token, session_page, session_view, task_after
from dalle_plugin.domain.step_io.api import RunTally


def _run(task: str, status: RunStatus = RunStatus.SUCCEEDED, prompt_chars: int = 10) -> RunRecord:
    from dalle_plugin.domain.run import PromptInfo

    return RunRecord(
        session="s",
        task_id=task,
        execution_name="e",
        project_id="p",
        prompt_source="text-annotation",
        model=ModelInfo(requested="gpt-image-2", actual="gpt-image-2"),
        size="1024x1024",
        quality="low",
        max_prompt_chars=32_000,
        uses_default_key=True,
        status=status,
        created_at_ms=1000 + len(task),
        updated_at_ms=2000 + len(task),
        prompt=PromptInfo(
            text="é" * prompt_chars, source="text-annotation", length=prompt_chars, original_length=1
        ),
    )


class Pages:
    """The sessions table in memory, read as DynamoDB reads it: task-id order, ``limit`` items or 1 MB."""

    def __init__(self, runs: list[RunRecord]):
        self.runs = sorted(runs, key=lambda r: r.task_id)
        self.page_reads = 0

    def tallies(self, session: str) -> list[RunTally]:
        return [RunTally.of(run) for run in self.runs if run.session == session]

    def page(self, session: str, limit: int, after: str | None) -> tuple[list[RunRecord], str | None]:
        self.page_reads += 1
        rest = [r for r in self.runs if r.session == session and (after is None or r.task_id > after)]
        taken, size = [], 0
        for run in rest[:limit]:
            size += len(json.dumps(run.model_dump(mode="json", exclude={"sealed_secrets"})))
            taken.append(run)
            if size >= 1_000_000:  # Query stops after 1 MB read
                break
        more = len(taken) < len(rest)
        return taken, (taken[-1].task_id if taken and more else None)


def test_pages_walk_every_run_once_and_the_summary_counts_them_all():
    runs = [_run(f"t{i:03}", RunStatus.FAILED if i % 7 == 0 else RunStatus.SUCCEEDED) for i in range(250)]
    pages = Pages(runs)
    first = session_page("s", pages, limit=100)
    assert first["progress"]["total"] == 250 and first["counts"] == {"FAILED": 36, "SUCCEEDED": 214}
    assert first["status"] == "FAILED" and first["createdAtMs"] == 1004 and first["updatedAtMs"] == 2004
    seen = [run["taskId"] for run in first["runs"]]
    token = first["next"]
    while token:
        page = session_page("s", pages, limit=100, token=token)
        assert "progress" not in page  # the summary only on the first page
        seen += [run["taskId"] for run in page["runs"]]
        token = page["next"]
    assert seen == sorted(run.task_id for run in runs)
    assert pages.page_reads == 3


def test_the_summary_matches_the_whole_view_of_a_small_session():
    runs = [_run("a"), _run("b", RunStatus.GENERATING), _run("c", RunStatus.QUEUED)]
    whole = session_view("s", runs)
    first = session_page("s", Pages(runs))
    assert {k: v for k, v in first.items() if k != "runs"} == {k: v for k, v in whole.items() if k != "runs"}


def test_long_prompts_come_in_pages_far_below_six_megabytes():
    """A page is one Query: at most 1 MB read, whatever the session's size (10,000 tasks are 10,000 / limit
    pages or more), so the answer's size is bounded by the records of 1 MB, JSON-escaped."""
    runs = [_run(f"task-{i:05}", prompt_chars=32_000) for i in range(200)]
    pages = Pages(runs)
    token, largest, count = None, 0, 0
    while True:
        page = session_page("s", pages, limit=1000, token=token)
        largest = max(largest, len(json.dumps(page, separators=(",", ":")).encode()))
        count += len(page["runs"])
        token = page["next"]
        if not token:
            break
    assert count == 200
    assert largest < 4 * 1024 * 1024, largest  # every character escaped as \\u00e9 and still far under 6 MB


def test_an_unknown_session_has_no_first_page():
    assert session_page("nope", Pages([_run("a")])) is None


@pytest.mark.parametrize("token", ["", "zzz", page_token("x")[:-2], "eyJhZnRlciI6IDV9", "W10"])
def test_a_token_that_is_not_a_page_is_refused_naming_the_parameter(token):
    if token and token == page_token("x")[:-2]:
        token = token + "!!"
    with pytest.raises(InvalidRequest) as refused:
        task_after(token)
    assert refused.value.field == "page"


def test_tokens_round_trip_any_task_id():
    for task in ["t", "task with spaces/and=signs", "é" * 200]:
        assert task_after(page_token(task)) == task
