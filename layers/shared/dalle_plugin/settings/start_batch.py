"""The batch starter's settings."""

# No ``from __future__ import annotations``: see dalle_plugin.settings.

from pydantic import Field

from dalle_plugin.settings.rate_limit import RateLimitSettings


class StartBatchSettings(RateLimitSettings):
    """The batch starter's step: stores a large batch's runs and starts their executions."""

    state_machine_arn: str = Field(alias="STATE_MACHINE_ARN", min_length=1)
    # the API's chunk size: both must form the same chunks (docs/batches.md)
    tasks_per_execution: int = Field(default=100, alias="TASKS_PER_EXECUTION", ge=1, le=100)
    # run executions of a session an own-key batch keeps running at once; 0: no cap (docs/batches.md)
    executions_in_flight: int = Field(default=0, alias="OWN_KEY_EXECUTIONS_IN_FLIGHT", ge=0)
    # the starter's own TimeoutSeconds (the template gives it the run executions' ExecutionTimeoutSeconds)
    execution_timeout_s: int = Field(default=172_800, alias="EXECUTION_TIMEOUT_SECONDS", ge=3600)
