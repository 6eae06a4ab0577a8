"""Record Failure's input: the run, and what the Catch put at ``$.error``."""

# No ``from __future__ import annotations``: see dalle_plugin.domain.run.

from pydantic import ConfigDict, Field

from dalle_plugin.domain.run import ONE_FUNCTION_ONLY, CamelModel, RunRef


class StepError(CamelModel):
    """What a Catch puts at ``$.error``: Step Functions' own ``Error`` and ``Cause`` fields."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore", defer_build=True)
    error: str = Field(alias="Error")
    cause: str | None = Field(default=None, alias="Cause")


class FailureInput(RunRef):
    model_config = ONE_FUNCTION_ONLY
    error: StepError
