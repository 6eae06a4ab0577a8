"""docs/openapi.yaml tells the truth: it is a valid OpenAPI 3.1 document, it has exactly the routes
template.yaml deploys, every documented route needs the Secret, and what the running API answers (status
and body) is what the document says, for successes and refusals alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from local_stack.hub_emulator import load_sample_runs
from local_stack.template import LocalTemplate
from tools import openapi as openapi_tool

DOC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


@pytest.fixture(scope="module")
def spec() -> dict:
    document = yaml.safe_load(DOC.read_text())
    validate(document)
    return document


def _schema(spec: dict, schema: dict) -> Draft202012Validator:
    return Draft202012Validator({**schema, "components": spec["components"]})


def _response_schema(spec: dict, path: str, method: str, status: int) -> dict:
    operation = spec["paths"][path][method.lower()]
    assert str(status) in operation["responses"], (
        f"{method} {path} answered {status}, which is not documented"
    )
    response = operation["responses"][str(status)]
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    return response["content"]["application/json"]["schema"]


def test_the_committed_document_is_what_the_code_generates(spec):
    """Compared as parsed documents: formatting does not count, content does (`make openapi` rewrites it)."""
    assert openapi_tool.committed() == openapi_tool.generated(), (
        "docs/openapi.yaml is stale: run `make openapi`"
    )


def test_the_document_has_the_routes_the_template_deploys(spec):
    deployed = {
        (route.method, route.path) for route in LocalTemplate().routes() if route.function == "ApiFunction"
    }
    documented = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert documented == deployed
    assert spec["security"] == [{"pluginSecret": []}]
    assert spec["components"]["securitySchemes"]["pluginSecret"] == {
        **spec["components"]["securitySchemes"]["pluginSecret"],
        "type": "apiKey",
        "in": "header",
        "name": "Secret",
    }
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert "401" in operation["responses"], f"{method} {path} must document the 401"


def test_the_payload_schema_accepts_what_the_hub_sends(spec):
    payload_schema = _schema(spec, {"$ref": "#/components/schemas/HubPayload"})
    for sample in load_sample_runs("http://127.0.0.1:1"):
        payload_schema.validate(sample.payload)
    event = json.loads((DOC.parents[1] / "events" / "api_post_plugin.json").read_text())
    payload_schema.validate(json.loads(event["body"]))


@pytest.mark.stack
def test_what_the_api_answers_is_what_the_document_says(spec, stack, api, sample_payload):
    def check(
        method: str,
        path: str,
        template: str,
        body: object = None,
        secret: bool = True,
        raw: bytes | None = None,
    ) -> requests.Response:
        headers = {"Secret": api._session.headers["Secret"]} if secret else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        answer = requests.request(method, api.base_url + path, data=data, headers=headers, timeout=30)
        _schema(spec, _response_schema(spec, template, method, answer.status_code)).validate(answer.json())
        return answer

    ok = sample_payload("task-lighthouse", configJSON=json.dumps({"get_prompt_from": "text-annotation"}))
    session = ok["session"]
    assert check("POST", "/plugin", "/plugin", ok).status_code == 202
    assert check("POST", "/plugin", "/plugin", ok).json()["duplicate"] is True
    api.wait_finished(session, timeout_s=300)
    first = check("GET", f"/sessions/{session}", "/sessions/{session}")
    assert first.status_code == 200 and first.json()["progress"]["total"] == 1
    assert check("GET", f"/sessions/{session}?limit=1", "/sessions/{session}").json()["next"] is None
    assert check("POST", f"/sessions/{session}/cancel", "/sessions/{session}/cancel", {}).status_code == 409

    refusals = [
        ("POST", "/plugin", "/plugin", ok | {"taskId": ""}, 400),
        ("POST", "/plugin", "/plugin", ok | {"configJSON": "{nope"}, 400),
        ("POST", "/plugin", "/plugin", ok | {"categorySchema": None}, 422),
        ("POST", "/plugin", "/plugin", ok | {"pad": "x" * 4_300_000}, 413),
        ("GET", "/sessions/no-such-session", "/sessions/{session}", None, 404),
        ("GET", f"/sessions/{session}?limit=0", "/sessions/{session}", None, 400),
        ("GET", f"/sessions/{session}?page=not-a-token", "/sessions/{session}", None, 400),
        ("POST", "/sessions/no-such-session/cancel", "/sessions/{session}/cancel", {}, 404),
        ("POST", f"/sessions/{session}/cancel", "/sessions/{session}/cancel", None, 400),
    ]
    for method, path, template, body, status in refusals:
        raw = b"[1, 2]" if (body is None and method == "POST") else None
        assert check(method, path, template, body, raw=raw).status_code == status, (method, path)
    for path, item in spec["paths"].items():
        for method in item:
            concrete = path.replace("{session}", session)
            assert check(method.upper(), concrete, path, {}, secret=False).status_code == 401
    assert check("GET", "/heartbeat", "/heartbeat").json() == "ok"
