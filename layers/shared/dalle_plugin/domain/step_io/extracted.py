"""What Extract hands Generate through the state: a module of its own, so that a function that never passes
it on (the API, Record Failure) does not create its class at a cold start (domain/run.py says why)."""

# No ``from __future__ import annotations``: see dalle_plugin.domain.run.

from dalle_plugin.domain.run import CamelModel, PromptInfo, RunStatus, TimelineEntry


class ExtractedPrompt(CamelModel):
    """What Extract learned, handed to Generate through the state (task text, never a secret) so that
    Generate's first write records it: Extract's one write is its read, made before the hub is read."""

    #: the "Run started" line, at the step's start
    started_ms: int
    started: str
    prompt: PromptInfo
    #: the "Prompt from ..." line
    at_ms: int
    message: str

    def entries(self) -> list[TimelineEntry]:
        status = RunStatus.EXTRACTING.value
        return [
            TimelineEntry(step="extract", status=status, at_ms=self.started_ms, detail=self.started),
            TimelineEntry(step="extract", status=status, at_ms=self.at_ms, detail=self.message),
        ]
