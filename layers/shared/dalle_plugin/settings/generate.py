"""Generate's settings: loaded only by Generate (see dalle_plugin.settings for why apart)."""

# No ``from __future__ import annotations``: see dalle_plugin.settings.

from typing import Literal

from pydantic import Field

from dalle_plugin.settings.rate_limit import RateLimitSettings


class GenerateSettings(RateLimitSettings):
    default_openai_key_secret_arn: str = Field(alias="DEFAULT_OPENAI_KEY_SECRET_ARN", min_length=1)
    # Images a day per organisation on the shared key (0: no quota), and what a run over it does.
    org_daily_image_quota: int = Field(default=0, alias="ORG_DAILY_IMAGE_QUOTA", ge=0)
    org_quota_reached: Literal["wait", "fail"] = Field(default="wait", alias="ORG_QUOTA_REACHED")
    openai_base_url: str | None = Field(default=None, alias="OPENAI_BASE_URL")
    openai_timeout_s: float = Field(default=240.0, alias="OPENAI_TIMEOUT_S", gt=0)
    # Own keys paced to the limit OpenAI states for them (per minute, unless a scaled stand-in says
    # otherwise); "off" sends at once and waits out each 429 (kept to measure against).
    own_key_pacing: Literal["on", "off"] = Field(default="on", alias="OWN_KEY_PACING")
    own_key_window_s: float = Field(default=60.0, alias="OWN_KEY_WINDOW_SECONDS", gt=0)
    own_key_pace_margin_ms: int = Field(default=1000, alias="OWN_KEY_PACE_MARGIN_MS", ge=0)
