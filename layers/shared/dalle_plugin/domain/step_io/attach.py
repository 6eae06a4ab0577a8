"""Attach Image's input and output."""

# No ``from __future__ import annotations``: see dalle_plugin.domain.run.

from typing import Literal

from dalle_plugin.domain.run import ONE_FUNCTION_ONLY, CamelModel, RunRef
from dalle_plugin.domain.step_io.generate import GenerateOutcome


class AttachInput(RunRef):
    """Attach's input: the run, and Generate's outcome (how many images, and those it generated and did not
    record), so the step's first write (its "Uploading" line, and Generate's images) is also its read.
    Deferred: built at import, it would build GenerateOutcome's and GeneratedImages' schemas within its own
    in every function's cold start."""

    model_config = ONE_FUNCTION_ONLY

    generation: GenerateOutcome | None = None


class AttachResult(CamelModel):
    model_config = ONE_FUNCTION_ONLY
    image_url: str
    finished_as: Literal["workflow", "editor"]
