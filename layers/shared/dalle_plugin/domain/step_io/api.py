"""The API's view of a run, for the session's summary."""

# No ``from __future__ import annotations``: see dalle_plugin.domain.run.

from dalle_plugin.domain.run import ONE_FUNCTION_ONLY, CamelModel, ModelInfo, RunRecord, RunStatus


class RunTally(CamelModel):
    """What the session's summary needs of one run: its state and what its images cost (the API only)."""

    model_config = ONE_FUNCTION_ONLY

    task_id: str
    status: RunStatus
    model: ModelInfo | None = None
    size: str = ""
    quality: str | None = None
    image_count: int = 0
    max_cost_usd: float | None = None
    created_at_ms: int = 0
    updated_at_ms: int = 0

    @classmethod
    def of(cls, run: RunRecord) -> "RunTally":
        return cls(
            task_id=run.task_id,
            status=run.status,
            model=run.model,
            size=run.size,
            quality=run.quality,
            image_count=len(run.images),
            max_cost_usd=run.max_cost_usd,
            created_at_ms=run.created_at_ms,
            updated_at_ms=run.updated_at_ms,
        )
