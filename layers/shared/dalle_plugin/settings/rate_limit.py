"""The shared key's limit, which Generate, the API, the batch starter and Record Failure share."""

# No ``from __future__ import annotations``: see dalle_plugin.settings.

from pydantic import Field

from dalle_plugin.settings import CommonSettings


class RateLimitSettings(CommonSettings):
    """The global limit on the shared key: Generate books slots, the API gives cancelled ones back."""

    rate_limit_table: str = Field(alias="RATE_LIMIT_TABLE", min_length=3)
    rate_limit: int = Field(default=5, alias="RATE_LIMIT", ge=1)
    rate_window_s: float = Field(default=60.0, alias="RATE_WINDOW_SECONDS", gt=0)
    rate_skew_margin_ms: int = Field(default=1500, alias="RATE_SKEW_MARGIN_MS", ge=1)
    rate_queue_max_wait_s: float = Field(default=1800, alias="RATE_QUEUE_MAX_WAIT_SECONDS", gt=0)
