"""Extract Prompt's settings."""

# No ``from __future__ import annotations``: see dalle_plugin.settings.

from pydantic import Field

from dalle_plugin.settings import CommonSettings


class ExtractSettings(CommonSettings):
    max_asset_bytes: int = Field(default=1_000_000, alias="MAX_ASSET_BYTES", gt=0)
