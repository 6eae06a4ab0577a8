"""The API function's routes: the hub's REST connector endpoint, on the plugin's own router
(dalle_plugin.http_router). functions/api/app.py loads this module on its first request, not at init.

Each route is declared once, in ROUTES: method, path, handler, the pydantic models that validate its path,
query and body (domain/api_contract.py, domain/payload.py) and the answers it documents; the same table
generates ``docs/openapi.yaml`` (``make openapi``, which alone loads the answers' models and the document's
machinery). Refusals keep the plugin's own shape (``{"error": true, "message", "field"}``) and sentences,
never pydantic's error types. Nothing here does I/O at import.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

from dalle_plugin import wiring
from dalle_plugin.domain.errors import InvalidRequest, PluginSecretTooShort, PromptNotFound, Unauthorized
from dalle_plugin.domain.payload import HubPayload, field_refusal
from dalle_plugin.domain.steps.start import start_session
from dalle_plugin.http_router import (
    Answer,
    Doc,
    InvalidPart,
    NoRoute,
    NotJson,
    Request,
    Route,
    Router,
    UnreadableBody,
    header,
    proxy_answer,
    raw_body,
)
from dalle_plugin.observability import (
    bind_run,
    clear_run,
    logger,
    record_run_accepted,
    record_runs_cancelled,
)
from dalle_plugin.settings import load_settings
from dalle_plugin.settings.api import ApiSettings

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext
    from pydantic import BaseModel

SECRET_HEADER = "Secret"  # noqa: S105 - the header's name, not a secret
RUN_PAYLOAD_PATH = "/plugin"
EMPTY_BODY = "The request body is empty: expected the hub's run payload as a JSON object."
NOT_AN_OBJECT = "The request body must be a JSON object with the hub's run payload."
CANCEL_BODY = 'The cancel body must be empty or a JSON object such as {"taskId": "..."}.'


def _error(status: HTTPStatus, message: str, field: str | None = None) -> Answer:
    body: dict[str, Any] = {"error": True, "message": message}
    if field:
        body["field"] = field
    return Answer(status.value, body)


# ---- routes -------------------------------------------------------------------------------------------


def heartbeat(request: Request) -> Answer:
    return Answer(HTTPStatus.OK.value, "ok")


def run_plugin(request: Request) -> Answer:
    payload: HubPayload = request.body
    bind_run(payload.session, payload.task_id)
    # The keys that arrived (never their values): a payload spelled differently by a hub shows at once.
    logger.info("run requested", extra={"payload_keys": sorted(request.json.keys())})
    # the hub is called only to list a payload's batches: within the API's hub budget
    started = start_session(
        payload,
        wiring.within_time(wiring.api_deps(), request.context, wiring.API_HUB_BUDGET_S),
        tasks_per_execution=load_settings(ApiSettings).tasks_per_execution,
    )
    body: dict[str, Any] = {"session": started.session, "statusUrl": f"/sessions/{started.session}"}
    if started.settled is not None:  # a large batch sent again after it was stored: nothing runs again
        body |= {
            "status": "ALREADY_STARTED",
            "duplicate": True,
            "tasks": [{"taskId": task_id, "status": status} for task_id, status in started.settled.items()],
        }
        return Answer(HTTPStatus.ACCEPTED.value, body)
    if started.storing:  # a large batch: the batch starter stores (and counts) its runs after this answer
        logger.info("batch handed to the starter", extra={"tasks": len(started.storing)})
        body |= {
            "status": "ALREADY_STARTED" if started.duplicate else "QUEUED",
            "duplicate": started.duplicate,
            "tasks": [{"taskId": task_id, "status": "QUEUED"} for task_id in started.storing],
            "storing": len(started.storing),
        }
        return Answer(HTTPStatus.ACCEPTED.value, body)
    record_run_accepted(len(started.started))
    body |= {
        "status": "QUEUED" if started.started else "ALREADY_STARTED",
        "duplicate": not started.started,
        "tasks": [{"taskId": run.task_id, "status": run.status.value} for run in started.runs],
    }
    if len(started.runs) == 1:
        body["taskId"] = started.runs[0].task_id
    return Answer(HTTPStatus.ACCEPTED.value, body)


def get_session(request: Request) -> Answer:
    # the routes other than a run's POST load their domain when first asked: the hub's first request to a
    # new environment is mostly a POST, which should not pay for reading or cancelling sessions
    from dalle_plugin.domain.sessions import session_page

    session, query = request.path.session, request.query
    bind_run(session)
    deps = wiring.api_deps()
    view = session_page(
        session,
        wiring.session_pages(),
        limit=query.limit,
        token=query.page,
        images=deps.images,
        prices=load_settings(ApiSettings).image_prices,
        batches=deps.batch_progress,
    )
    if view is None:
        return _error(HTTPStatus.NOT_FOUND, f"No session {session!r}.")
    return Answer(HTTPStatus.OK.value, view)


def cancel(request: Request) -> Answer:
    from dalle_plugin.domain.cancel import cancel_session

    session = request.path.session
    task_id = request.body.task_id if request.body else None
    bind_run(session, task_id)
    deps = wiring.within_time(wiring.cancel_deps(), request.context, wiring.API_HUB_BUDGET_S)
    outcomes = cancel_session(session, task_id, deps)
    record_runs_cancelled(sum(1 for o in outcomes if o.cancelled))
    if not outcomes:
        which = f" with task {task_id!r}" if task_id else ""
        return _error(HTTPStatus.NOT_FOUND, f"No session {session!r}{which}.")
    status = HTTPStatus.OK if any(o.cancelled for o in outcomes) else HTTPStatus.CONFLICT
    return Answer(status.value, {"session": session, "tasks": [vars(o) for o in outcomes]})


def _contract(name: str) -> Callable[[], type[BaseModel]]:
    """A model of domain.api_contract, created when a request of its routes first comes: the API's first
    request is mostly a run's POST, which needs none of them."""

    def model() -> type[BaseModel]:
        from dalle_plugin.domain import api_contract

        return cast("type[BaseModel]", getattr(api_contract, name))

    return model


#: what API Gateway answers for every route before the function runs
GATEWAY_REFUSALS = {
    401: Doc(
        "The Secret header is missing (API Gateway's answer), or the API function found it wrong. Nothing is "
        "read, stored or started.",
        "GatewayUnauthorized",
    ),
    403: Doc(
        "The Secret header is wrong: API Gateway's authorizer denied it. Nothing is read, stored or started.",
        "GatewayDenied",
    ),
}

ROUTES = (
    Route(
        "GET",
        "/sessions/{session}",
        get_session,
        operation_id="getSession",
        summary="A session: its summary, and its runs a page at a time.",
        description=(
            "Without `page`: the session's summary (state, progress, counts by status, cost, first and last "
            "change) and its first runs. With `page` (a `next` from the answer before): the runs that follow, "
            "without the summary. Runs come in task id order; a page holds at most `limit` runs (fewer when "
            "their records are large: one page is one DynamoDB read of at most 1 MB, so any page stays far "
            "below Lambda's 6 MB answer), and `next` is null after the last."
        ),
        path_model=_contract("SessionPath"),
        query_model=_contract("SessionQuery"),
        responses={
            200: Doc("The session (a page of it).", "SessionPage"),
            400: Doc("`page` or `limit` is not valid."),
            404: Doc("No such session."),
            **GATEWAY_REFUSALS,
        },
    ),
    Route(
        "POST",
        "/sessions/{session}/cancel",
        cancel,
        operation_id="cancelSession",
        summary="Cancel a session's runs (or one task's) that have not started generating their image.",
        path_model=_contract("SessionPath"),
        body_model=_contract("CancelRequest"),
        responses={
            200: Doc("At least one run was cancelled.", "CancelOutcome"),
            400: Doc("The body is not a JSON object with an optional taskId."),
            404: Doc("No such session (or task in it)."),
            409: Doc(
                "Nothing could be cancelled (every run had ended or its image was already paid for).",
                "CancelOutcome",
            ),
            **GATEWAY_REFUSALS,
        },
    ),
    Route(
        "GET",
        "/heartbeat",
        heartbeat,
        operation_id="heartbeat",
        summary="Liveness, as the hub polls it.",
        responses={
            200: Doc('The JSON string "ok".', None, {"type": "string", "const": "ok"}),
            **GATEWAY_REFUSALS,
        },
    ),
    Route(
        "POST",
        RUN_PAYLOAD_PATH,
        run_plugin,
        operation_id="runPlugin",
        summary="Start a run (one task) or a batch (many tasks) for a hub session.",
        description=(
            "Answers at once with 202; the image is generated and attached in the background, and the "
            "session's state is at `statusUrl`. The same session and tasks sent again (or many times at once) "
            "start one execution: later copies answer `duplicate: true` once it is running. Tasks of the "
            "session that failed or were cancelled are run again. The body is limited to 4 MiB "
            "(`MAX_BODY_BYTES`)."
        ),
        body_model=HubPayload,
        body_required=True,
        body_description="The hub's run payload.",
        responses={
            202: Doc("Accepted; the run is queued (or was already).", "RunAccepted"),
            400: Doc("The payload or its Config JSON is malformed; `field` names what to fix."),
            413: Doc("The body is larger than the limit."),
            422: Doc("No prompt can be built from what the payload maps (e.g. no class mapped to Prompt)."),
            **GATEWAY_REFUSALS,
        },
    ),
)
ROUTER = Router(ROUTES)


# ---- refusals -----------------------------------------------------------------------------------------


def _unreadable(cause: Exception) -> InvalidRequest:
    if isinstance(cause, RecursionError):
        return InvalidRequest("The request body is JSON nested too deeply to be a run payload.")
    # json's own sentence, without the position it adds
    reason = cause.msg if isinstance(cause, json.JSONDecodeError) else str(cause)
    return InvalidRequest(f"The request body is not valid JSON ({reason}).")


def _invalid_body(route: Route, error: Mapping[str, Any]) -> InvalidRequest:
    """A body that failed its model, as the sentence the plugin has always given for it."""
    location = tuple(error["loc"])
    if route.path != RUN_PAYLOAD_PATH:
        if location and location[0] == "taskId":
            return InvalidRequest(
                "Field 'taskId' must be a task id (text of at most 256 characters).", field="taskId"
            )
        return InvalidRequest(CANCEL_BODY)
    if not location:
        return InvalidRequest(EMPTY_BODY if error["type"] == "missing" else NOT_AN_OBJECT)
    return field_refusal(error)


def _refusal(exc: NotJson | UnreadableBody | InvalidPart, route: Route) -> InvalidRequest:
    """What the router refused (a path aside), as the plugin's 400."""
    if isinstance(exc, NotJson):
        return InvalidRequest(
            f"The request body must be JSON (Content-Type: application/json), not {exc.content_type}."
        )
    if isinstance(exc, UnreadableBody):
        return _unreadable(exc.cause) if route.path == RUN_PAYLOAD_PATH else InvalidRequest(CANCEL_BODY)
    if exc.part == "query":
        return field_refusal(exc.error, what="Query parameter")
    return _invalid_body(route, exc.error)


def _tell_hub(event: Mapping[str, Any], context: LambdaContext, message: str) -> None:
    """The hub hears of a refused run payload too (best effort)."""
    from dalle_plugin.domain.refusal import tell_hub_refused  # only a refused payload needs it

    deps = wiring.within_time(wiring.api_deps(), context, wiring.API_HUB_BUDGET_S)
    tell_hub_refused(raw_body(event), message, deps)


def _route(event: Mapping[str, Any], context: LambdaContext) -> Answer:
    try:
        route, params = ROUTER.match(event)
    except NoRoute:
        return _error(HTTPStatus.NOT_FOUND, "No such route.")
    try:
        return route.handler(ROUTER.request(route, params, event, context))
    except InvalidPart as exc:
        if exc.part == "path":  # an id no session can have
            return _error(HTTPStatus.NOT_FOUND, "No such session.")
        refused = _refusal(exc, route)
    except (NotJson, UnreadableBody) as exc:
        refused = _refusal(exc, route)
    except InvalidRequest as exc:  # the domain's refusal of what the payload asks
        refused = exc
    except PromptNotFound as exc:
        if route.path == RUN_PAYLOAD_PATH:
            _tell_hub(event, context, exc.message)
        return _error(HTTPStatus.UNPROCESSABLE_ENTITY, exc.message)
    if route.path == RUN_PAYLOAD_PATH:
        _tell_hub(event, context, refused.message)
    return _error(HTTPStatus.BAD_REQUEST, refused.message, refused.field)


# ---- before routing ------------------------------------------------------------------------------------


def _refused_before_routing(event: Mapping[str, Any]) -> Answer | None:
    """What must be checked before the router reads the body: the Secret (the authorizer's check, again,
    as a second line) and the body's size."""
    try:
        expected = wiring.plugin_secret()
    except PluginSecretTooShort as exc:
        logger.error(exc.message)
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, "The plugin is not configured to accept requests.")
    if not hmac.compare_digest(header(event, SECRET_HEADER).encode(), expected.encode()):
        return _error(HTTPStatus.UNAUTHORIZED, Unauthorized("Missing or wrong Secret header.").message)
    if len(raw_body(event)) > load_settings(ApiSettings).max_body_bytes:
        return _error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "The request body is too large.")
    return None


def handle(event: dict, context: LambdaContext) -> dict:
    """One request: the checks before routing, then the route. The API function's handler calls this
    inside its Lambda context and metrics (observability.lambda_handler)."""
    clear_run()
    refused = _refused_before_routing(event)
    return proxy_answer(refused if refused is not None else _route(event, context))


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document of ROUTES (``make openapi``): the only caller of the document's machinery."""
    from dalle_plugin import openapi
    from dalle_plugin.domain import api_answers

    return openapi.document(
        ROUTES,
        answers=api_answers,
        info={
            "title": "DALL-E (Model Plugin) for Ango Hub",
            "description": (
                "The plugin's REST endpoint, as Ango Hub's REST connector calls it. Every route requires the "
                "plugin's Secret header: API Gateway's authorizer compares it in constant time with the secret "
                "in Secrets Manager (its answer cached for 5 minutes per header value), and API Gateway itself "
                "answers 401 when the header is missing and 403 when it is wrong, before any function runs (the "
                "API function checks it again). Every refusal of the API function is JSON with `error: true` "
                "and a `message` a person can act on (`field` names the request field at fault); no answer "
                "ever quotes a secret. Generated from functions/api/app.py by `make openapi`; "
                "tests/security/test_openapi.py checks it is current and that the running API answers as it "
                "says."
            ),
            "version": "0.1.0",
        },
        servers=[
            {
                "url": "https://{apiId}.execute-api.{region}.amazonaws.com/v1",
                "variables": {"apiId": {"default": "example"}, "region": {"default": "us-east-1"}},
            }
        ],
        security_schemes={
            "pluginSecret": {
                "type": "apiKey",
                "description": "The secret registered for the plugin in Ango Hub.",
                "in": "header",
                "name": SECRET_HEADER,
            }
        },
    )
