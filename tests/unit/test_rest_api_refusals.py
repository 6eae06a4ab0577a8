"""The API's refusals, status and body, as the hub and a person see them (dalle_plugin.rest_api), with the
domain behind the routes faked: the sentences the plugin has always given, whichever part of the request
is at fault. The same refusals through the running stack: tests/security (test_fuzz_api, test_openapi)."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest
from dalle_plugin import wiring
from dalle_plugin.domain.api_contract import MAX_PAGE_SIZE
from dalle_plugin.domain.errors import PromptNotFound

from local_stack.template import load_template

GLOBAL_ENV = load_template()["Globals"]["Function"]["Environment"]["Variables"]

SECRET = "a-plugin-secret-of-forty-characters-0123"
PAYLOAD = {
    "projectId": "p",
    "taskId": "t",
    "apiKey": "ango-key",
    "categorySchema": [{"schemaId": "s", "modelClass": "Prompt"}],
    "session": "sess-1",
}
CANCEL_BODY = 'The cancel body must be empty or a JSON object such as {"taskId": "..."}.'
MUST_BE_JSON = "The request body must be JSON (Content-Type: application/json), not text/plain."


@pytest.fixture
def api(monkeypatch):
    """rest_api with its domain calls faked; ``told`` collects what the hub was told of refusals."""
    # Powertools builds the Logger and Metrics from these when rest_api first imports observability: what the
    # template gives Lambda, as every later test of this process (and its handlers on the stack) expects.
    for name in ("POWERTOOLS_SERVICE_NAME", "POWERTOOLS_METRICS_NAMESPACE"):
        monkeypatch.setenv(name, GLOBAL_ENV[name])
    from dalle_plugin import rest_api
    from dalle_plugin.domain import cancel, refusal, sessions

    told: list[str] = []
    settings = SimpleNamespace(max_body_bytes=1_000_000, tasks_per_execution=100, image_prices={})
    monkeypatch.setattr(wiring, "plugin_secret", lambda: SECRET)
    monkeypatch.setattr(wiring, "api_deps", lambda: SimpleNamespace(images=None, batch_progress=None))
    monkeypatch.setattr(wiring, "cancel_deps", lambda: None)
    monkeypatch.setattr(wiring, "session_pages", lambda: None)
    monkeypatch.setattr(wiring, "within_time", lambda deps, context, at_most_s=None: deps)
    monkeypatch.setattr(rest_api, "load_settings", lambda cls: settings)
    # the routes load these from their modules when called (a run's POST never loads the other routes')
    monkeypatch.setattr(refusal, "tell_hub_refused", lambda raw, message, deps: told.append(message))
    monkeypatch.setattr(rest_api, "record_run_accepted", lambda count: None)
    monkeypatch.setattr(rest_api, "record_runs_cancelled", lambda count: None)

    def start(payload, deps, tasks_per_execution):
        if payload.task_id == "no-prompt":
            raise PromptNotFound("No class of the task is mapped to Prompt.")
        run = SimpleNamespace(task_id=payload.task_id, status=SimpleNamespace(value="QUEUED"))
        return SimpleNamespace(session=payload.session, settled=None, storing=(), started=[run], runs=[run])

    monkeypatch.setattr(rest_api, "start_session", start)
    monkeypatch.setattr(
        sessions,
        "session_page",
        lambda session, pages, limit, token, **_: (
            None if session == "gone" else {"session": session, "limit": limit}
        ),
    )
    monkeypatch.setattr(
        cancel,
        "cancel_session",
        lambda session, task_id, deps: (
            [] if session == "gone" else [SimpleNamespace(task_id="t", cancelled=True)]
        ),
    )
    return told


def call(
    method: str,
    path: str,
    body: str | None = None,
    content_type: str | None = "application/json",
    query: dict | None = None,
    secret: str = SECRET,
    **extra,
):
    headers = {"Secret": secret} | ({"Content-Type": content_type} if content_type else {})
    event = {
        "httpMethod": method,
        "path": path,
        "headers": headers,
        "queryStringParameters": query,
        "multiValueQueryStringParameters": None,
        "body": body,
        "isBase64Encoded": False,
    } | extra
    from dalle_plugin import rest_api  # imported by the ``api`` fixture, with the template's environment

    answer = rest_api.handle(event, SimpleNamespace())
    return answer["statusCode"], json.loads(answer["body"])


def refusal(message: str, field: str | None = None) -> dict:
    return {"error": True, "message": message} | ({"field": field} if field else {})


RUN_REFUSALS = [
    (
        None,
        "application/json",
        refusal("The request body is empty: expected the hub's run payload as a JSON object."),
    ),
    (
        "null",
        "application/json",
        refusal("The request body is empty: expected the hub's run payload as a JSON object."),
    ),
    (
        "[1, 2]",
        "application/json",
        refusal("The request body must be a JSON object with the hub's run payload."),
    ),
    (
        "{bad",
        "application/json",
        refusal("The request body is not valid JSON (Expecting property name enclosed in double quotes)."),
    ),
    ('{"a":' * 50_000, None, refusal("The request body is JSON nested too deeply to be a run payload.")),
    (json.dumps(PAYLOAD), "text/plain", refusal(MUST_BE_JSON)),
    ("{}", "application/json", refusal("Payload field 'projectId' is required.", "projectId")),
    (
        json.dumps(PAYLOAD | {"taskId": ""}),
        None,
        refusal("Payload field 'taskId' string should have at least 1 character.", "taskId"),
    ),
    (
        json.dumps(PAYLOAD | {"apiKey": " "}),
        None,
        refusal("Payload field 'apiKey' must not be empty.", "apiKey"),
    ),
]


@pytest.mark.parametrize(("body", "content_type", "expected"), RUN_REFUSALS)
def test_a_refused_run_payload_is_a_400_naming_what_to_fix_and_the_hub_hears_of_it(
    api, body, content_type, expected
):
    assert call("POST", "/plugin", body, content_type) == (400, expected)
    assert api == [expected["message"]]


def test_a_run_payload_not_utf8_is_refused_with_the_decoders_sentence(api):
    encoded = base64.b64encode(b"\xff{").decode()
    status, body = call("POST", "/plugin", encoded, isBase64Encoded=True)
    assert (status, body["message"]) == (
        400,
        "The request body is not valid JSON ('utf-8' codec can't decode byte 0xff in position 0: invalid start byte).",
    )


def test_a_run_payload_is_accepted_and_a_prompt_that_cannot_be_built_is_a_422(api):
    status, body = call("POST", "/plugin/", json.dumps(PAYLOAD), "application/json; charset=utf-8")
    assert (status, body["session"], body["taskId"], body["statusUrl"]) == (
        202,
        "sess-1",
        "t",
        "/sessions/sess-1",
    )
    assert call("POST", "/plugin", json.dumps(PAYLOAD | {"taskId": "no-prompt"})) == (
        422,
        refusal("No class of the task is mapped to Prompt."),
    )
    assert api == ["No class of the task is mapped to Prompt."]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (
            {"limit": "0"},
            refusal("Query parameter 'limit' input should be greater than or equal to 1.", "limit"),
        ),
        (
            {"limit": "x"},
            refusal(
                "Query parameter 'limit' input should be a valid integer, unable to parse string as an integer.",
                "limit",
            ),
        ),
        (
            {"limit": str(MAX_PAGE_SIZE + 1)},
            refusal(
                f"Query parameter 'limit' input should be less than or equal to {MAX_PAGE_SIZE}.", "limit"
            ),
        ),
        (
            {"page": "p" * 1025, "limit": "0"},
            refusal("Query parameter 'page' string should have at most 1024 characters.", "page"),
        ),
    ],
)
def test_a_bad_page_query_is_a_400_naming_the_parameter(api, query, expected):
    assert call("GET", "/sessions/s", query=query) == (400, expected)
    assert api == []  # only a refused run payload is told to the hub


def test_a_session_id_no_session_can_have_and_an_unknown_route_are_404s(api):
    assert call("GET", "/sessions/" + "s" * 257, query={"limit": "0"}) == (404, refusal("No such session."))
    assert call("GET", "/sessions/gone") == (404, refusal("No session 'gone'."))
    assert call("GET", "/sessions/a/b") == (404, refusal("No such route."))
    assert call("DELETE", "/plugin") == (404, refusal("No such route."))
    assert call("GET", "/sessions/s", query={"limit": "7"}) == (200, {"session": "s", "limit": 7})


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (
            '{"taskId": ""}',
            None,
            refusal("Field 'taskId' must be a task id (text of at most 256 characters).", "taskId"),
        ),
        ("[1]", None, refusal(CANCEL_BODY)),
        ("{bad", None, refusal(CANCEL_BODY)),
        ('{"taskId": "t"}', "text/plain", refusal(MUST_BE_JSON)),
    ],
)
def test_a_cancel_body_that_is_not_an_optional_task_is_a_400(api, body, content_type, expected):
    assert call("POST", "/sessions/s/cancel", body, content_type) == (400, expected)


def test_a_cancel_without_a_body_cancels_the_session(api):
    assert call("POST", "/sessions/s/cancel", None, None)[0] == 200
    assert call("POST", "/sessions/gone/cancel", '{"taskId": "t"}') == (
        404,
        refusal("No session 'gone' with task 't'."),
    )


def test_the_secret_and_the_size_are_checked_before_routing(api):
    assert call("POST", "/nowhere", "x", secret="wrong") == (401, refusal("Missing or wrong Secret header."))
    assert call("POST", "/nowhere", "x" * 1_000_001) == (413, refusal("The request body is too large."))
