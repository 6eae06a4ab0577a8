"""Nobody without the plugin's Secret gets in: API Gateway's authorizer refuses every endpoint (401 without the
header, 403 with a wrong one), and the refusal costs nothing downstream (the API function never runs: no KMS
call, no DynamoDB read or write, no execution). The API function's own check stays as a second line."""

from __future__ import annotations

import json

import pytest
import requests

from tests.conftest import PLUGIN_SECRET
from tests.security.seams import spending

pytestmark = pytest.mark.stack

WRONG_SECRETS = {
    "missing": None,
    "empty": "",
    "wrong": "not-the-secret",
    "other case": PLUGIN_SECRET.upper(),
    "a prefix": PLUGIN_SECRET[:-1],
    "with a trailing space": PLUGIN_SECRET + " ",
    "twice": PLUGIN_SECRET * 2,
    "non-ASCII": PLUGIN_SECRET[:-1] + "\u00e9",
}


GATEWAY_UNAUTHORIZED = (401, {"message": "Unauthorized"})
GATEWAY_DENIED = (403, {"Message": "User is not authorized to access this resource with an explicit deny"})


def _endpoints(api, payload: dict) -> list[tuple[str, str, bytes | None]]:
    session = payload["session"]
    return [
        ("POST", "/plugin", json.dumps(payload).encode()),
        ("POST", "/plugin", b"x" * 400_000),  # too large, but the secret is checked first
        ("GET", "/heartbeat", None),
        ("GET", f"/sessions/{session}", None),
        ("POST", f"/sessions/{session}/cancel", b"{}"),
    ]


def _send(api, method: str, path: str, body: bytes | None, secret: str | None) -> requests.Response:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["Secret"] = secret.encode("utf-8").decode("latin-1")  # as raw bytes on the wire
    return requests.request(method, api.base_url + path, data=body, headers=headers, timeout=30)


def test_every_endpoint_refuses_a_missing_or_wrong_secret_and_spends_nothing(stack, api, sample_payload):
    payload = sample_payload("task-lighthouse", configJSON=json.dumps({"get_prompt_from": "text-annotation"}))
    # A session that exists: a wrong secret must not see it, nor cancel it.
    existing = sample_payload(
        "task-lighthouse", configJSON=json.dumps({"get_prompt_from": "text-annotation"})
    )
    assert api.run(existing).status_code == 202
    api.wait_finished(existing["session"], timeout_s=300)
    assert api.session(existing["session"]) is not None  # warms the cached plugin secret, too

    with spending(stack) as spent:
        for label, secret in WRONG_SECRETS.items():
            for method, path, body in _endpoints(api, payload) + _endpoints(api, existing)[3:]:
                answer = _send(api, method, path, body, secret)
                # API Gateway's own answers: no (or an empty) header is 401, the authorizer's Deny is 403
                expected = GATEWAY_UNAUTHORIZED if label in ("missing", "empty") else GATEWAY_DENIED
                assert (answer.status_code, answer.json()) == expected, (label, method, path, answer.text)
                assert existing["session"] not in answer.text and "lighthouse" not in answer.text
    assert dict(spent) == {}, "a refused request reached AWS"

    # nothing was stored or started for the refused request
    assert api.session(payload["session"]) is None
    assert api.session(existing["session"])["runs"][0]["status"] == "SUCCEEDED"  # not cancelled


def test_the_right_secret_is_accepted_whatever_the_header_name_case(api):
    for name in ("Secret", "secret", "SECRET"):
        answer = requests.get(api.base_url + "/heartbeat", headers={name: PLUGIN_SECRET}, timeout=30)
        assert answer.status_code == 200 and answer.json() == "ok", name
