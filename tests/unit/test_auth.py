"""The authorizer's decision: the Secret compared in constant time, a short deployment Secret refused."""

from __future__ import annotations

import pytest
from dalle_plugin.domain.auth import (
    MIN_SECRET_CHARS,
    AuthorizerRequest,
    PluginSecretTooShort,
    api_wide_resource,
    authorizer_policy,
    secret_matches,
)

SECRET = "s" * MIN_SECRET_CHARS
METHOD_ARN = "arn:aws:execute-api:us-east-1:123456789012:abc123/v1/POST/sessions/sess-1/cancel"


def test_only_the_exact_secret_matches():
    assert secret_matches(SECRET, SECRET)
    for wrong in ("", SECRET[:-1], SECRET + " ", SECRET.upper(), SECRET[:-1] + "\u00e9"):
        assert not secret_matches(wrong, SECRET), wrong


def test_a_short_deployment_secret_refuses_everyone_and_says_so_without_quoting_it():
    short = "short-secret-123"
    with pytest.raises(PluginSecretTooShort) as raised:
        secret_matches(short, short)
    assert f"at least {MIN_SECRET_CHARS}" in raised.value.message and short not in raised.value.message


def test_the_policy_covers_every_route_of_the_stage_because_api_gateway_caches_it_per_secret():
    assert api_wide_resource(METHOD_ARN) == "arn:aws:execute-api:us-east-1:123456789012:abc123/v1/*"
    request = AuthorizerRequest.model_validate(
        {"type": "REQUEST", "methodArn": METHOD_ARN, "headers": {"secret": SECRET}}
    )
    assert request.header("Secret") == SECRET
    allowed, denied = authorizer_policy(request, True), authorizer_policy(request, False)
    assert allowed["policyDocument"]["Statement"][0]["Effect"] == "Allow"
    assert denied["policyDocument"]["Statement"][0]["Effect"] == "Deny"
    assert allowed["policyDocument"]["Statement"][0]["Resource"].endswith("/v1/*")


def test_a_request_without_headers_has_an_empty_secret():
    assert AuthorizerRequest.model_validate({"methodArn": METHOD_ARN, "headers": None}).header("Secret") == ""
