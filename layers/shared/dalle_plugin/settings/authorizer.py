"""The authorizer's settings."""

# No ``from __future__ import annotations``: see dalle_plugin.settings.

from pydantic import Field

from dalle_plugin.settings import CommonSettings


class AuthorizerSettings(CommonSettings):
    plugin_secret_arn: str = Field(alias="PLUGIN_SECRET_ARN", min_length=1)
