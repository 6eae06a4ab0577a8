"""Malformed payloads and Config JSONs through the real API on the local stack: never a 5xx, every refusal a
4xx with a JSON message, and a refused request starts nothing (no KMS seal, no run record, no execution).

The strategies start from a valid hub payload and break it the ways a hub, a proxy or a person typing a
Config JSON could: wrong types, missing and unknown fields, oversized and odd strings, bodies that are not
JSON objects, deeply nested JSON, Config JSONs that are not objects or name unknown keys and wrong values.
Deterministic (``derandomize``) so ``make test`` is repeatable; a failure found once is replayed first.
"""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.seams import spending

pytestmark = pytest.mark.stack

FIELDS = [
    "projectId",
    "taskId",
    "session",
    "sessionId",
    "apiKey",
    "assetId",
    "dataURL",
    "categorySchema",
    "classMapping",
    "configJSON",
    "orgId",
    "runBy",
    "pluginId",
    "workflow",
    "overwrite",
    "batches",
    "tasks",
    "taskIds",
]
CONFIG_KEYS = ["openai_api_key", "model_name", "get_prompt_from", "image_size", "quality"]
FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
odd_text = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=string.whitespace, max_size=5),
    st.sampled_from(["", " ", "\n", "\x00", "null", "{}", "[]", "default", "sk-", "\u202e", "\ud800"]),
    st.integers(250, 300).map(lambda n: "x" * n),
    st.integers(4000, 5000).map(lambda n: "sk-" + "y" * n),
)


def _config_values(key: str):
    known = {
        "openai_api_key": st.sampled_from(["default", "", " ", "Bearer sk-abc", "sk-\nabc"]) | odd_text,
        "model_name": st.sampled_from(["dall-e-2", "dall-e-3", "gpt-image-2", "", "nope", "DALL E 3"])
        | odd_text,
        "get_prompt_from": st.sampled_from(["text-annotation", "entity annotation", "asset", ""]) | odd_text,
        "image_size": st.sampled_from(["1024x1024", "512x512", "0x0", "99999x99999", "auto", "1024*1024"])
        | odd_text,
        "quality": st.sampled_from(["low", "hd", "standard", "", "ultra"]) | odd_text,
    }
    return known.get(key, json_values) | json_values


config_objects = st.dictionaries(
    st.sampled_from(CONFIG_KEYS) | st.text(max_size=12), st.just(None), max_size=5
).flatmap(lambda keys: st.fixed_dictionaries({key: _config_values(key) for key in keys}))
config_json = st.one_of(
    config_objects.map(json.dumps),
    config_objects,
    odd_text,
    json_values.map(json.dumps),
    st.integers(1, 20_000).map(lambda depth: "[" * depth),
    st.just('{"model_name": "a", "model_name": "b"}'),
    st.just("{'get_prompt_from': 'text-annotation'}"),
)


@st.composite
def broken_payloads(draw, base: dict) -> dict:
    payload = dict(base)
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from(FIELDS) | st.text(max_size=12))
        action = draw(st.sampled_from(["drop", "value", "text", "config"]))
        if action == "drop":
            payload.pop(field, None)
        elif action == "value":
            payload[field] = draw(json_values)
        elif action == "text":
            payload[field] = draw(odd_text)
        else:
            payload["configJSON"] = draw(config_json)
    return payload


bodies = st.one_of(
    st.binary(max_size=64),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.integers(1, 50_000).map(lambda depth: b'{"a":' * depth),
    st.text(max_size=64).map(str.encode),
)


def _check_answer(answer) -> None:
    assert answer.status_code < 500, (answer.status_code, answer.text[:500])
    if answer.status_code >= 400:
        document = answer.json()
        assert document["error"] is True and isinstance(document["message"], str) and document["message"], (
            document
        )


def test_broken_payloads_are_refused_with_a_message_and_start_nothing(stack, api, new_session):
    base = {
        "projectId": "proj-dalle-demo",
        "taskId": "task-lighthouse",
        "assetId": "asset-lighthouse",
        "apiKey": "ango-local-key",
        "categorySchema": [{"schemaId": "cls-desc", "modelClass": "Prompt"}],
        "configJSON": json.dumps({"openai_api_key": "default", "get_prompt_from": "text-annotation"}),
        "orgId": "org",
        "runBy": "user",
        "session": "SESSION",
    }

    @FUZZ
    @given(payload=broken_payloads(base))
    def check(payload):
        if payload.get("session") == "SESSION":  # a fresh one each time, unless the example broke it
            payload = {**payload, "session": new_session("fuzz")}
        with spending(stack) as spent:
            answer = api._session.post(f"{api.base_url}/plugin", data=json.dumps(payload), timeout=60)
        _check_answer(answer)
        if answer.status_code != 202:
            assert (spent["seal"], spent["create"], spent["start"]) == (0, 0, 0), (payload, dict(spent))

    check()


def test_bodies_that_are_not_payloads_are_refused(stack, api):
    @FUZZ
    @given(body=bodies)
    def check(body):
        with spending(stack) as spent:
            answer = api._session.post(f"{api.base_url}/plugin", data=body, timeout=60)
        _check_answer(answer)
        assert answer.status_code in (400, 413, 422), answer.text[:300]
        assert (spent["seal"], spent["create"], spent["start"]) == (0, 0, 0)

    check()


def test_session_routes_take_any_id_and_body(stack, api):
    ids = st.text(
        alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=300
    ) | st.integers(1000, 3000).map(lambda n: "s" * n)

    @settings(FUZZ, max_examples=40)
    @given(session=ids, body=bodies)
    def check(session, body):
        from urllib.parse import quote

        path = quote(session, safe="")
        _check_answer(api._session.get(f"{api.base_url}/sessions/{path}", timeout=60))
        _check_answer(api._session.post(f"{api.base_url}/sessions/{path}/cancel", data=body, timeout=60))

    check()
