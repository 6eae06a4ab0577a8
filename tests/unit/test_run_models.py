"""The run's models keep their list fields apart: they default to ``[]`` (cheaper to build at a cold start
than ``default_factory=list``), which is safe only because pydantic copies such a default per instance."""

from __future__ import annotations

import pytest
from dalle_plugin.domain.run import ModelInfo, PromptInfo, RunRecord, TimelineEntry
from dalle_plugin.ports import StepOpening


def _record(task: str) -> RunRecord:
    return RunRecord.model_validate(
        {
            "session": "s",
            "taskId": task,
            "executionName": f"s_{task}",
            "projectId": "p",
            "promptSource": "text",
            "model": ModelInfo(requested="gpt-image-2", actual="gpt-image-2"),
            "size": "1024x1024",
            "maxPromptChars": 100,
            "usesDefaultKey": True,
            "createdAtMs": 1,
            "updatedAtMs": 1,
        }
    )


def test_a_runs_list_defaults_are_its_own():
    first, second = _record("a"), _record("b")
    first.timeline.append(TimelineEntry(step="extract", status="EXTRACTING", at_ms=1))
    first.notes.append("adapted")
    first.chunk.append("a")
    assert (second.timeline, second.notes, second.chunk) == ([], [], [])
    assert _record("c").timeline == []


def test_a_prompts_notes_are_its_own():
    first = PromptInfo(text="t", source="text", length=1, original_length=1)
    first.notes.append("truncated")
    assert PromptInfo(text="u", source="text", length=1, original_length=1).notes == []


def test_a_step_opening_sets_nothing_unless_told_and_its_default_cannot_change():
    opening = StepOpening(caller=None, refused=(), updated_at_ms=1)
    assert dict(opening.sets) == {}
    with pytest.raises(TypeError):
        opening.sets["status"] = "x"  # type: ignore[index]
    assert dict(StepOpening(caller=None, refused=(), updated_at_ms=2).sets) == {}
