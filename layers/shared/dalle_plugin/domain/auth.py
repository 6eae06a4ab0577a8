"""Who may call the API: whoever sends the plugin's Secret. API Gateway asks the authorizer function, which
asks this, before any request reaches the API function (and the API function checks again)."""

from __future__ import annotations

import hmac
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dalle_plugin.domain.errors import MIN_SECRET_CHARS, PluginSecretTooShort

SECRET_HEADER = "Secret"  # noqa: S105 - the header's name, not a secret


class AuthorizerRequest(BaseModel):
    """The parts of an API Gateway REQUEST authorizer event the decision needs."""

    # built on the authorizer's first request: the other functions import this module but never this model
    model_config = ConfigDict(extra="ignore", populate_by_name=True, defer_build=True)

    method_arn: str = Field(alias="methodArn", min_length=1)
    headers: dict[str, str | None] | None = None

    def header(self, name: str) -> str:
        for key, value in (self.headers or {}).items():
            if key.lower() == name.lower():
                return value or ""
        return ""


def secret_matches(presented: str, expected: str) -> bool:
    """Constant-time comparison; raises ``PluginSecretTooShort`` rather than trust a short Secret."""
    if len(expected) < MIN_SECRET_CHARS:
        raise PluginSecretTooShort(
            f"The plugin Secret is {len(expected)} characters long; at least {MIN_SECRET_CHARS} are required. "
            "Every request is refused until the secret named by PLUGIN_SECRET_ARN is replaced "
            "with a longer one (and registered again in Ango Hub)."
        )
    return hmac.compare_digest(presented.encode(), expected.encode())


def api_wide_resource(method_arn: str) -> str:
    """``arn:...:{api}/{stage}/{METHOD}/{path}`` -> ``arn:...:{api}/{stage}/*``: API Gateway caches the
    answer per Secret for every route, so it must cover every route."""
    api_and_stage = method_arn.split("/", 2)[:2]
    return "/".join(api_and_stage) + "/*"


def authorizer_policy(request: AuthorizerRequest, allowed: bool) -> dict[str, Any]:
    """The IAM policy document API Gateway expects back from a REQUEST authorizer."""
    return {
        "principalId": "ango-hub" if allowed else "unknown",
        "policyDocument": {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Action": "execute-api:Invoke",
                    "Effect": "Allow" if allowed else "Deny",
                    "Resource": api_wide_resource(request.method_arn),
                }
            ],
        },
    }
