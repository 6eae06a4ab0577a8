"""Request bodies have a size limit and fields have length limits: the API refuses what is past them with a
4xx naming the field (never echoing a secret), before anything is sealed, stored or started."""

from __future__ import annotations

import json

import pytest
from dalle_plugin.domain.errors import InvalidRequest
from dalle_plugin.domain.payload import parse_payload

from tests.security.seams import spending

CONFIG = json.dumps({"get_prompt_from": "text-annotation"})


def _valid(**overrides) -> dict:
    payload = {
        "projectId": "p",
        "taskId": "t",
        "session": "s",
        "apiKey": "ango-key",
        "configJSON": CONFIG,
        "categorySchema": [{"schemaId": "c", "modelClass": "Prompt"}],
    }
    return payload | overrides


@pytest.mark.parametrize(
    ("field", "at_limit", "past_limit"),
    [
        ("projectId", "p" * 256, "p" * 257),
        ("taskId", "t" * 256, "t" * 257),
        ("session", "s" * 256, "s" * 257),
        ("assetId", "a" * 256, "a" * 257),
        ("dataURL", "https://h/" + "d" * 4086, "https://h/" + "d" * 4087),
        ("apiKey", "k" * 512, "k" * 513),
        ("configJSON", json.dumps({"get_prompt_from": "text-annotation"}).ljust(16_384), "{}".ljust(16_385)),
        ("orgId", "o" * 256, "o" * 257),
        ("runBy", "r" * 256, "r" * 257),
        ("batches", ["b"] * 1000, ["b"] * 1001),
        (
            "categorySchema",
            [{"schemaId": "c", "modelClass": "Prompt"}] * 500,
            [{"schemaId": "c", "modelClass": "Prompt"}] * 501,
        ),
    ],
)
def test_each_field_is_accepted_at_its_limit_and_refused_past_it(field, at_limit, past_limit):
    assert parse_payload(json.dumps(_valid(**{field: at_limit})))
    with pytest.raises(InvalidRequest) as refused:
        parse_payload(json.dumps(_valid(**{field: past_limit})))
    assert refused.value.field.startswith(field)
    assert field in refused.value.message


@pytest.mark.parametrize(
    "api_key",
    ["zq\nsecret", "zq\r\nX-Injected: 1", "zq\x00secret", "zq secret", "zq\u00e4secret", "zq\tsecret"],
)
def test_an_api_key_that_cannot_be_an_http_header_is_refused_without_echoing_it(api_key):
    with pytest.raises(InvalidRequest) as refused:
        parse_payload(json.dumps(_valid(apiKey=api_key)))
    assert refused.value.field == "apiKey"
    assert "zq" not in refused.value.message


@pytest.mark.stack
def test_the_api_refuses_past_the_limits_before_spending_anything(stack, api, sample_payload):
    base = sample_payload("task-lighthouse", configJSON=CONFIG)
    long_key = "sk-" + "x" * 5000  # longer than KMS can seal: refused as config, not a 5xx
    cases = [
        (413, None, json.dumps(base | {"padding": "x" * 4_300_000})),
        (400, "taskId", json.dumps(base | {"taskId": "t" * 257})),
        (400, "apiKey", json.dumps(base | {"apiKey": "ango\nkey"})),
        (400, "openai_api_key", json.dumps(base | {"configJSON": json.dumps({"openai_api_key": long_key})})),
        (400, "configJSON", json.dumps(base | {"configJSON": "{}".ljust(16_385)})),
        (400, "body", "[" * 100_000),  # deeply nested JSON
        (400, "configJSON", json.dumps(base | {"configJSON": "[" * 10_000})),
        (400, "body", b"\xff\xfe not utf-8"),
    ]
    with spending(stack) as spent:
        for status, field, body in cases:
            data = body if isinstance(body, bytes) else body.encode()
            answer = api._session.post(f"{api.base_url}/plugin", data=data, timeout=30)
            assert answer.status_code == status, (field, answer.status_code, answer.text[:300])
            document = answer.json()
            assert document["error"] is True and document["message"]
            if field and field != "body":
                assert document.get("field", "").startswith(field) or field in document["message"]
            assert "x" * 50 not in answer.text and "ango\nkey" not in answer.text
    assert (spent["seal"], spent["create"], spent["start"]) == (0, 0, 0)
    assert api.session(base["session"]) is None
