"""The API function's routes: the hub's REST connector endpoint, on Powertools' event handler for REST API
proxy events. functions/api/app.py loads this module on its first request, not at init: Powertools' event
handler is the largest import of the API, beyond what every function imports (docs/performance.md, "Cold
starts").

Routes validate their paths, queries and bodies with pydantic (``enable_validation``), and the same
declarations generate ``docs/openapi.yaml`` (``make openapi``). The document's own settings (title, servers,
security scheme) are Powertools' OpenAPI models, the largest import of the event handler: they are built
only when the document is asked for, never to serve. Refusals keep the plugin's own shape
(``{"error": true, "message", "field"}``) and sentences: Powertools' default 422 names pydantic's error
types, not what a person should fix. The resolver is built when this module is imported (no I/O; each
execution environment is a process of its own, so no state is shared between invokes of different
environments).
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Annotated, Any, Literal

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)
from aws_lambda_powertools.event_handler.openapi.params import Body, Path, Query
from aws_lambda_powertools.event_handler.openapi.types import OpenAPIResponse
from aws_lambda_powertools.utilities.typing import LambdaContext

from dalle_plugin import wiring
from dalle_plugin.domain.api_contract import (
    CancelOutcome,
    CancelRequest,
    ErrorBody,
    GatewayDenied,
    GatewayUnauthorized,
    RunAccepted,
    SessionPage,
)
from dalle_plugin.domain.cancel import cancel_session
from dalle_plugin.domain.errors import InvalidRequest, PluginSecretTooShort, PromptNotFound, Unauthorized
from dalle_plugin.domain.payload import HubPayload, field_refusal
from dalle_plugin.domain.refusal import tell_hub_refused
from dalle_plugin.domain.sessions import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, session_page
from dalle_plugin.domain.steps.start import start_session
from dalle_plugin.observability import (
    bind_run,
    clear_run,
    logger,
    record_run_accepted,
    record_runs_cancelled,
)
from dalle_plugin.settings import load_settings
from dalle_plugin.settings.api import ApiSettings

SECRET_HEADER = "Secret"  # noqa: S105 - the header's name, not a secret
MAX_SESSION_CHARS = 256  # what a payload may name; a longer id cannot exist (nor be a DynamoDB key)
RUN_PAYLOAD_RESOURCE = "/plugin"
EMPTY_BODY = "The request body is empty: expected the hub's run payload as a JSON object."
NOT_AN_OBJECT = "The request body must be a JSON object with the hub's run payload."
CANCEL_BODY = 'The cancel body must be empty or a JSON object such as {"taskId": "..."}.'

app = APIGatewayRestResolver(enable_validation=True)


def _configure_openapi() -> None:
    """The document's settings. Serving never reads them; their models cost a cold start ~0.5 s under load."""
    from aws_lambda_powertools.event_handler.openapi.models import APIKey, APIKeyIn, Server, ServerVariable

    app.configure_openapi(
        title="DALL-E (Model Plugin) for Ango Hub",
        version="0.1.0",
        description=(
            "The plugin's REST endpoint, as Ango Hub's REST connector calls it. Every route requires the "
            "plugin's Secret header: API Gateway's authorizer compares it in constant time with the secret "
            "in Secrets Manager (its answer cached for 5 minutes per header value), and API Gateway itself "
            "answers 401 when the header is missing and 403 when it is wrong, before any function runs (the "
            "API function checks it again). Every refusal of the API function is JSON with `error: true` and "
            "a `message` a person can act on (`field` names the request field at fault); no answer ever "
            "quotes a secret. Generated from functions/api/app.py by `make openapi`; "
            "tests/security/test_openapi.py checks it is current and that the running API answers as it "
            "says."
        ),
        servers=[
            Server(
                url="https://{apiId}.execute-api.{region}.amazonaws.com/v1",
                variables={
                    "apiId": ServerVariable(default="example"),
                    "region": ServerVariable(default="us-east-1"),
                },
            )
        ],
        security=[{"pluginSecret": []}],
        security_schemes={
            "pluginSecret": APIKey(
                name=SECRET_HEADER,
                in_=APIKeyIn.header,
                description="The secret registered for the plugin in Ango Hub.",
            )
        },
    )


def _doc(description: str, model: Any = None) -> OpenAPIResponse:
    return {"description": description, "content": {"application/json": {"model": model or ErrorBody}}}


#: what API Gateway answers for every route before the function runs
GATEWAY_REFUSALS: dict[int, OpenAPIResponse] = {
    401: _doc(
        "The Secret header is missing (API Gateway's answer), or the API function found it wrong. Nothing is "
        "read, stored or started.",
        GatewayUnauthorized,
    ),
    403: _doc(
        "The Secret header is wrong: API Gateway's authorizer denied it. Nothing is read, stored or started.",
        GatewayDenied,
    ),
}

SessionId = Annotated[
    str, Path(min_length=1, max_length=MAX_SESSION_CHARS, description="The hub's session id.")
]


def _answer(status: HTTPStatus, body: Any) -> Response:
    return Response(
        status_code=status.value,
        content_type="application/json",
        body=json.dumps(body, separators=(",", ":")),
    )


def _error(status: HTTPStatus, message: str, field: str | None = None) -> Response:
    body: dict[str, Any] = {"error": True, "message": message}
    if field:
        body["field"] = field
    return _answer(status, body)


def _raw_body(event: Mapping[str, Any]) -> bytes:
    raw = event.get("body") or ""
    return base64.b64decode(raw) if event.get("isBase64Encoded") else raw.encode()


# ---- routes -------------------------------------------------------------------------------------------


@app.get(
    "/heartbeat",
    operation_id="heartbeat",
    summary="Liveness, as the hub polls it.",
    responses={200: _doc('The JSON string "ok".', Literal["ok"]), **GATEWAY_REFUSALS},
)
def heartbeat() -> Response[Any]:
    return _answer(HTTPStatus.OK, "ok")


@app.post(
    "/plugin",
    operation_id="runPlugin",
    summary="Start a run (one task) or a batch (many tasks) for a hub session.",
    description=(
        "Answers at once with 202; the image is generated and attached in the background, and the session's "
        "state is at `statusUrl`. The same session and tasks sent again (or many times at once) start one "
        "execution: later copies answer `duplicate: true` once it is running. Tasks of the session that "
        "failed or were cancelled are run again. The body is limited to 4 MiB (`MAX_BODY_BYTES`)."
    ),
    responses={
        202: _doc("Accepted; the run is queued (or was already).", RunAccepted),
        400: _doc("The payload or its Config JSON is malformed; `field` names what to fix."),
        413: _doc("The body is larger than the limit."),
        422: _doc("No prompt can be built from what the payload maps (e.g. no class mapped to Prompt)."),
        **GATEWAY_REFUSALS,
    },
)
def run_plugin(payload: Annotated[HubPayload, Body(description="The hub's run payload.")]) -> Response[Any]:
    bind_run(payload.session, payload.task_id)
    # The keys that arrived (never their values): a payload spelled differently by a hub shows at once.
    logger.info("run requested", extra={"payload_keys": sorted(app.current_event.json_body.keys())})
    # the hub is called only to list a payload's batches: within the API's hub budget
    started = start_session(
        payload,
        wiring.within_time(wiring.api_deps(), app.lambda_context, wiring.API_HUB_BUDGET_S),
        tasks_per_execution=load_settings(ApiSettings).tasks_per_execution,
    )
    body: dict[str, Any] = {"session": started.session, "statusUrl": f"/sessions/{started.session}"}
    if started.settled is not None:  # a large batch sent again after it was stored: nothing runs again
        body |= {
            "status": "ALREADY_STARTED",
            "duplicate": True,
            "tasks": [{"taskId": task_id, "status": status} for task_id, status in started.settled.items()],
        }
        return _answer(HTTPStatus.ACCEPTED, body)
    if (
        started.storing
    ):  # a large batch: the batch starter stores its runs (and counts them) after this answer
        logger.info("batch handed to the starter", extra={"tasks": len(started.storing)})
        body |= {
            "status": "ALREADY_STARTED" if started.duplicate else "QUEUED",
            "duplicate": started.duplicate,
            "tasks": [{"taskId": task_id, "status": "QUEUED"} for task_id in started.storing],
            "storing": len(started.storing),
        }
        return _answer(HTTPStatus.ACCEPTED, body)
    record_run_accepted(len(started.started))
    body |= {
        "status": "QUEUED" if started.started else "ALREADY_STARTED",
        "duplicate": not started.started,
        "tasks": [{"taskId": run.task_id, "status": run.status.value} for run in started.runs],
    }
    if len(started.runs) == 1:
        body["taskId"] = started.runs[0].task_id
    return _answer(HTTPStatus.ACCEPTED, body)


@app.get(
    "/sessions/<session>",
    operation_id="getSession",
    summary="A session: its summary, and its runs a page at a time.",
    description=(
        "Without `page`: the session's summary (state, progress, counts by status, cost, first and last "
        "change) and its first runs. With `page` (a `next` from the answer before): the runs that follow, "
        "without the summary. Runs come in task id order; a page holds at most `limit` runs (fewer when their "
        "records are large: one page is one DynamoDB read of at most 1 MB, so any page stays far below "
        "Lambda's 6 MB answer), and `next` is null after the last."
    ),
    responses={
        200: _doc("The session (a page of it).", SessionPage),
        400: _doc("`page` or `limit` is not valid."),
        404: _doc("No such session."),
        **GATEWAY_REFUSALS,
    },
)
def get_session(
    session: SessionId,
    page: Annotated[
        str | None, Query(max_length=1024, description="The `next` of the answer before (opaque).")
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_PAGE_SIZE, description="Most runs in the page.")
    ] = DEFAULT_PAGE_SIZE,
) -> Response[Any]:
    bind_run(session)
    deps = wiring.api_deps()
    view = session_page(
        session,
        wiring.session_pages(),
        limit=limit,
        token=page,
        images=deps.images,
        prices=load_settings(ApiSettings).image_prices,
        batches=deps.batch_progress,
    )
    if view is None:
        return _error(HTTPStatus.NOT_FOUND, f"No session {session!r}.")
    return _answer(HTTPStatus.OK, view)


@app.post(
    "/sessions/<session>/cancel",
    operation_id="cancelSession",
    summary="Cancel a session's runs (or one task's) that have not started generating their image.",
    responses={
        200: _doc("At least one run was cancelled.", CancelOutcome),
        400: _doc("The body is not a JSON object with an optional taskId."),
        404: _doc("No such session (or task in it)."),
        409: _doc(
            "Nothing could be cancelled (every run had ended or its image was already paid for).",
            CancelOutcome,
        ),
        **GATEWAY_REFUSALS,
    },
)
def cancel(session: SessionId, body: Annotated[CancelRequest | None, Body()] = None) -> Response[Any]:
    task_id = body.task_id if body else None
    bind_run(session, task_id)
    deps = wiring.within_time(wiring.cancel_deps(), app.lambda_context, wiring.API_HUB_BUDGET_S)
    outcomes = cancel_session(session, task_id, deps)
    record_runs_cancelled(sum(1 for o in outcomes if o.cancelled))
    if not outcomes:
        which = f" with task {task_id!r}" if task_id else ""
        return _error(HTTPStatus.NOT_FOUND, f"No session {session!r}{which}.")
    status = HTTPStatus.OK if any(o.cancelled for o in outcomes) else HTTPStatus.CONFLICT
    return _answer(status, {"session": session, "tasks": [vars(o) for o in outcomes]})


# ---- refusals -----------------------------------------------------------------------------------------


def _is_run_payload() -> bool:
    return app.current_event.resource == RUN_PAYLOAD_RESOURCE


def _refuse(exc: InvalidRequest) -> Response:
    """A 400 with the plugin's sentence; the hub hears of a refused run payload too (best effort)."""
    if _is_run_payload():
        _tell_hub(exc.message)
    return _error(HTTPStatus.BAD_REQUEST, exc.message, exc.field)


def _body_refusal(error: Mapping[str, Any]) -> InvalidRequest:
    """A validation error of the request body as the sentence the plugin has always given for it."""
    content_type = (app.current_event.headers.get("content-type") or "").strip()
    if content_type and not content_type.lower().startswith("application/json"):
        return InvalidRequest(
            f"The request body must be JSON (Content-Type: application/json), not {content_type}."
        )
    location = tuple(error["loc"][1:])
    if not _is_run_payload():
        if location and location[0] == "taskId":
            return InvalidRequest(
                "Field 'taskId' must be a task id (text of at most 256 characters).", field="taskId"
            )
        return InvalidRequest(CANCEL_BODY)
    if error["type"] == "json_invalid":
        return InvalidRequest(f"The request body is not valid JSON ({error.get('ctx', {}).get('error')}).")
    if not location:
        return InvalidRequest(EMPTY_BODY if error["type"] == "missing" else NOT_AN_OBJECT)
    return field_refusal({**error, "loc": location})


@app.exception_handler(RequestValidationError)
def _invalid_request(exc: RequestValidationError) -> Response:
    error = exc.errors()[0]
    where = error["loc"][0] if error["loc"] else "body"
    if where == "path":  # an id no session can have
        return _error(HTTPStatus.NOT_FOUND, "No such session.")
    if where == "query":
        return _refuse(field_refusal({**error, "loc": error["loc"][1:]}, what="Query parameter"))
    return _refuse(_body_refusal(error))


@app.exception_handler(RequestUnsupportedContentType)
def _not_json(exc: RequestUnsupportedContentType) -> Response:
    return _refuse(_body_refusal({"loc": ("body",), "type": "unsupported_content_type"}))


@app.exception_handler([UnicodeDecodeError, RecursionError])
def _unreadable_body(exc: Exception) -> Response:
    if not _is_run_payload():
        return _refuse(InvalidRequest(CANCEL_BODY))
    if isinstance(exc, RecursionError):
        return _refuse(InvalidRequest("The request body is JSON nested too deeply to be a run payload."))
    return _refuse(InvalidRequest(f"The request body is not valid JSON ({exc})."))


@app.exception_handler(InvalidRequest)
def _invalid(exc: InvalidRequest) -> Response:
    return _refuse(exc)


@app.exception_handler(PromptNotFound)
def _no_prompt(exc: PromptNotFound) -> Response:
    if _is_run_payload():
        _tell_hub(exc.message)
    return _error(HTTPStatus.UNPROCESSABLE_ENTITY, exc.message)


@app.not_found
def _no_route(exc: Exception) -> Response:
    return _error(HTTPStatus.NOT_FOUND, "No such route.")


def _tell_hub(message: str) -> None:
    deps = wiring.within_time(wiring.api_deps(), app.lambda_context, wiring.API_HUB_BUDGET_S)
    tell_hub_refused(_raw_body(app.current_event.raw_event), message, deps)


# ---- before routing ------------------------------------------------------------------------------------


def _header(event: Mapping[str, Any], name: str) -> str:
    for key, value in (event.get("headers") or {}).items():
        if key.lower() == name.lower():
            return value or ""
    return ""


def _refused_before_routing(event: Mapping[str, Any]) -> Response | None:
    """What must be checked before the router reads the body: the Secret (the authorizer's check, again,
    as a second line) and the body's size. Powertools validates a request before any middleware runs, so
    these live here, not in a middleware."""
    try:
        expected = wiring.plugin_secret()
    except PluginSecretTooShort as exc:
        logger.error(exc.message)
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, "The plugin is not configured to accept requests.")
    if not hmac.compare_digest(_header(event, SECRET_HEADER).encode(), expected.encode()):
        return _error(HTTPStatus.UNAUTHORIZED, Unauthorized("Missing or wrong Secret header.").message)
    if len(_raw_body(event)) > load_settings(ApiSettings).max_body_bytes:
        return _error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "The request body is too large.")
    return None


def handle(event: dict, context: LambdaContext) -> dict:
    """One request: the checks before routing, then the route. The API function's handler calls this
    inside its Lambda context and metrics (observability.lambda_handler)."""
    clear_run()
    refused = _refused_before_routing(event)
    if refused is not None:
        return {
            "statusCode": refused.status_code,
            "headers": {"Content-Type": "application/json"},
            "body": refused.body,
        }
    return app.resolve(event, context)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of these routes. Powertools documents its own 422 for a request that fails
    validation; this API answers those with its 400 (or 404 for an impossible session id) instead, so that
    answer and its schemas are left out."""
    _configure_openapi()
    document: dict[str, Any] = json.loads(app.get_openapi_json_schema())
    for item in document["paths"].values():
        for operation in item.values():
            default = operation["responses"].get("422", {})
            if "HTTPValidationError" in json.dumps(default):
                del operation["responses"]["422"]
    schemas = document["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError", "ResponseValidationError"):
        schemas.pop(name, None)
    return document
