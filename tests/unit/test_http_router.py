"""The plugin's router (dalle_plugin.http_router) on REST proxy events: which route an event reaches, and
how its path, query and body are read and validated, without the stack."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dalle_plugin.http_router import (
    Answer,
    InvalidPart,
    NoRoute,
    NotJson,
    Route,
    Router,
    UnreadableBody,
    proxy_answer,
)
from pydantic import BaseModel, Field


class ItemPath(BaseModel):
    item: str = Field(max_length=5)


class ItemQuery(BaseModel):
    page: str | None = None
    limit: int = Field(default=10, ge=1)


class ItemBody(BaseModel):
    name: str


def _answer(request) -> Answer:
    return Answer(200, "ok")


ROUTER = Router(
    [
        Route("GET", "/items/{item}", _answer, "getItem", "", {}, path_model=ItemPath, query_model=ItemQuery),
        Route(
            "POST",
            "/items/{item}/rename",
            _answer,
            "rename",
            "",
            {},
            path_model=ItemPath,
            body_model=ItemBody,
        ),
        Route("POST", "/items", _answer, "add", "", {}, body_model=ItemBody, body_required=True),
        Route("GET", "/health", _answer, "health", "", {}),
    ]
)


def event(method: str, path: str, body=None, headers=None, query=None, multi=None, b64=False) -> dict:
    return {
        "httpMethod": method,
        "path": path,
        "headers": headers or {},
        "queryStringParameters": query,
        "multiValueQueryStringParameters": multi,
        "body": body,
        "isBase64Encoded": b64,
    }


def request(ev: dict):
    route, params = ROUTER.match(ev)
    return ROUTER.request(route, params, ev, context=None)


@pytest.mark.parametrize(
    ("method", "path", "operation", "params"),
    [
        ("GET", "/health", "health", {}),
        ("GET", "/health//", "health", {}),
        ("get", "/health", "health", {}),
        ("GET", "/items/a%2Fb", "getItem", {"item": "a%2Fb"}),  # as API Gateway passes it: not decoded
        ("GET", "/items/é", "getItem", {"item": "é"}),
        ("POST", "/items/x/rename/", "rename", {"item": "x"}),
    ],
)
def test_an_event_reaches_its_route_with_its_path_parameters(method, path, operation, params):
    route, found = ROUTER.match(event(method, path))
    assert (route.operation_id, found) == (operation, params)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/health"),
        ("HEAD", "/health"),
        ("GET", "/items"),
        ("GET", "/items/a/b"),
        ("GET", '/items/a"b'),
    ],
)
def test_no_route_for_another_method_or_a_path_no_template_matches(method, path):
    with pytest.raises(NoRoute):
        ROUTER.match(event(method, path))


def test_path_and_query_are_validated_by_their_models():
    ok = request(event("GET", "/items/x", query={"limit": "3"}))
    assert (ok.path.item, ok.query.limit, ok.query.page) == ("x", 3, None)
    with pytest.raises(InvalidPart) as long_id:
        request(event("GET", "/items/toolong", query={"limit": "0"}))
    assert long_id.value.part == "path"  # the path is judged before the query
    with pytest.raises(InvalidPart) as bad_limit:
        request(event("GET", "/items/x", query={"limit": "0"}))
    assert (bad_limit.value.part, bad_limit.value.error["loc"]) == ("query", ("limit",))


def test_a_query_parameter_given_twice_is_a_list_and_a_comma_stays_in_its_value():
    twice = event("GET", "/items/x", query={"limit": "2"}, multi={"limit": ["1", "2"]})
    with pytest.raises(InvalidPart) as refused:
        request(twice)
    assert refused.value.error["type"] == "int_type"
    comma = request(event("GET", "/items/x", query={"page": "a,b"}))
    assert comma.query.page == "a,b"


def test_the_body_is_json_validated_by_its_model_and_kept_as_parsed():
    ok = request(event("POST", "/items", json.dumps({"name": "n", "extra": 1})))
    assert (ok.body.name, ok.json) == ("n", {"name": "n", "extra": 1})
    encoded = base64.b64encode(b'{"name": "b"}').decode()
    assert request(event("POST", "/items", encoded, b64=True)).body.name == "b"
    with pytest.raises(InvalidPart) as missing:
        request(event("POST", "/items", ""))
    assert (missing.value.part, missing.value.error["type"], missing.value.error["loc"]) == (
        "body",
        "missing",
        (),
    )
    with pytest.raises(InvalidPart) as not_object:
        request(event("POST", "/items", "[1]"))
    assert not_object.value.error["loc"] == ()


def test_an_optional_body_may_be_absent_or_null():
    assert request(event("POST", "/items/x/rename", None)).body is None
    assert request(event("POST", "/items/x/rename", "null")).body is None


@pytest.mark.parametrize(
    ("body", "b64", "cause"),
    [
        ("{bad", False, json.JSONDecodeError),
        ('{"a":' * 50_000, False, RecursionError),
        (base64.b64encode(b"\xff{").decode(), True, UnicodeDecodeError),
        ('{"a": ' + "1" * 5000 + "}", False, ValueError),  # past Python's digit limit for an int
    ],
)
def test_an_unreadable_body_is_refused_before_the_path_is_judged(body, b64, cause):
    with pytest.raises(UnreadableBody) as refused:
        request(event("POST", "/items/much-too-long/rename", body, b64=b64))
    assert isinstance(refused.value.cause, cause)


@pytest.mark.parametrize(
    "content_type", ["application/json", "Application/JSON", "application/json; charset=utf-8"]
)
def test_a_json_content_type_in_any_case_is_json(content_type):
    ev = event("POST", "/items", '{"name": "n"}', headers={"content-TYPE": content_type})
    assert request(ev).body.name == "n"


def test_a_body_of_another_content_type_is_refused_but_no_body_is_no_body():
    with pytest.raises(NotJson) as refused:
        request(
            event("POST", "/items", "name=n", headers={"Content-Type": "application/x-www-form-urlencoded"})
        )
    assert refused.value.content_type == "application/x-www-form-urlencoded"
    assert (
        request(event("POST", "/items/x/rename", None, headers={"Content-Type": "text/plain"})).body is None
    )


def test_an_answer_is_a_rest_proxy_response_with_compact_json():
    assert proxy_answer(Answer(202, {"a": [1, None]})) == {
        "statusCode": 202,
        "multiValueHeaders": {"Content-Type": ["application/json"]},
        "body": '{"a":[1,null]}',
        "isBase64Encoded": False,
    }


def test_serving_the_api_loads_neither_powertools_event_handler_nor_the_openapi_document():
    """What the API's first request imports (a fresh interpreter): the document's machinery and the answers'
    models are for ``make openapi`` only, and Powertools' event handler is not needed at all."""
    probe = (
        "import sys, dalle_plugin.rest_api; "
        "print(sorted(m for m in sys.modules if m.startswith(('aws_lambda_powertools.event_handler', "
        "'dalle_plugin.openapi', 'dalle_plugin.domain.api_answers', 'asyncio'))))"
    )
    root = Path(__file__).resolve().parents[2]
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(root / "layers" / "shared")},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert loaded.strip() == "[]"
