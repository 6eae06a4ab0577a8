"""API function: the hub's REST connector endpoint. Thin: authenticate, parse, call the domain, answer.

Routes are dispatched on the proxy event's resource and method directly (three routes do not need a
framework, and a dict dispatch keeps each event's state in the call, not in a process-wide router).
"""

from __future__ import annotations

import base64
import hmac
import json
from collections.abc import Callable
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any

from dalle_plugin import wiring
from dalle_plugin.domain.cancel import cancel_session
from dalle_plugin.domain.errors import InvalidRequest, PluginSecretTooShort, PromptNotFound, Unauthorized
from dalle_plugin.domain.payload import parse_payload
from dalle_plugin.domain.refusal import tell_hub_refused
from dalle_plugin.domain.sessions import session_view
from dalle_plugin.domain.steps.start import start_session
from dalle_plugin.observability import (
    bind_run,
    clear_run,
    lambda_handler,
    logger,
    record_run_accepted,
    record_runs_cancelled,
)
from dalle_plugin.settings import ApiSettings, load_settings


def _answer(status: HTTPStatus, body: Any) -> dict[str, Any]:
    return {
        "statusCode": status.value,
        "headers": {"Content-Type": "application/json"},
        "body": json.dumps(body, separators=(",", ":")),
    }


def _error(status: HTTPStatus, message: str, field: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": True, "message": message}
    if field:
        body["field"] = field
    return _answer(status, body)


def _header(event: dict[str, Any], name: str) -> str:
    for key, value in (event.get("headers") or {}).items():
        if key.lower() == name.lower():
            return value or ""
    return ""


def _body(event: dict[str, Any]) -> bytes:
    raw = event.get("body") or ""
    return base64.b64decode(raw) if event.get("isBase64Encoded") else raw.encode()


def _require_secret(event: dict[str, Any]) -> None:
    if not hmac.compare_digest(_header(event, "Secret").encode(), wiring.plugin_secret().encode()):
        raise Unauthorized("Missing or wrong Secret header.")


def heartbeat(event: dict[str, Any]) -> dict[str, Any]:
    return _answer(HTTPStatus.OK, "ok")


def run_plugin(event: dict[str, Any]) -> dict[str, Any]:
    raw = _body(event)
    if len(raw) > load_settings(ApiSettings).max_body_bytes:
        return _error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "The request body is too large.")
    payload = parse_payload(raw)
    bind_run(payload.session, payload.task_id)
    # The keys that arrived (never their values): a payload spelled differently by a hub shows at once.
    logger.info("run requested", extra={"payload_keys": sorted(json.loads(raw).keys())})
    # the hub is called only to list a payload's batches: within the API's hub budget
    started = start_session(
        payload,
        wiring.within_time(wiring.api_deps(), _CONTEXT.get(), wiring.API_HUB_BUDGET_S),
        tasks_per_execution=load_settings(ApiSettings).tasks_per_execution,
    )
    record_run_accepted(len(started.started))
    body: dict[str, Any] = {
        "session": started.session,
        "status": "QUEUED" if started.started else "ALREADY_STARTED",
        "duplicate": not started.started,
        "tasks": [{"taskId": run.task_id, "status": run.status.value} for run in started.runs],
        "statusUrl": f"/sessions/{started.session}",
    }
    if len(started.runs) == 1:
        body["taskId"] = started.runs[0].task_id
    return _answer(HTTPStatus.ACCEPTED, body)


MAX_SESSION_CHARS = 256  # what a payload may name; a longer id cannot exist (nor be a DynamoDB key)


def _known_session(event: dict[str, Any]) -> str | None:
    session = (event.get("pathParameters") or {}).get("session", "")
    return session if 0 < len(session) <= MAX_SESSION_CHARS else None


def _cancel_task_id(raw: bytes) -> str | None:
    """The optional ``{"taskId": "..."}`` body of a cancel."""
    if not raw.strip():
        return None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        body = []
    if not isinstance(body, dict):
        raise InvalidRequest('The cancel body must be empty or a JSON object such as {"taskId": "..."}.')
    task_id = body.get("taskId")
    if task_id is not None and not (isinstance(task_id, str) and 0 < len(task_id) <= 256):
        raise InvalidRequest(
            "Field 'taskId' must be a task id (text of at most 256 characters).", field="taskId"
        )
    return task_id


def get_session(event: dict[str, Any]) -> dict[str, Any]:
    session = _known_session(event)
    if session is None:
        return _error(HTTPStatus.NOT_FOUND, "No such session.")
    bind_run(session)
    runs = wiring.api_deps().runs.list_session(session)
    if not runs:
        return _error(HTTPStatus.NOT_FOUND, f"No session {session!r}.")
    prices = load_settings(ApiSettings).image_prices
    return _answer(HTTPStatus.OK, session_view(session, runs, wiring.api_deps().images, prices))


def cancel(event: dict[str, Any]) -> dict[str, Any]:
    session = _known_session(event)
    if session is None:
        return _error(HTTPStatus.NOT_FOUND, "No such session.")
    task_id = _cancel_task_id(_body(event))
    bind_run(session, task_id)
    outcomes = cancel_session(
        session, task_id, wiring.within_time(wiring.cancel_deps(), _CONTEXT.get(), wiring.API_HUB_BUDGET_S)
    )
    record_runs_cancelled(sum(1 for o in outcomes if o.cancelled))
    if not outcomes:
        which = f" with task {task_id!r}" if task_id else ""
        return _error(HTTPStatus.NOT_FOUND, f"No session {session!r}{which}.")
    status = HTTPStatus.OK if any(o.cancelled for o in outcomes) else HTTPStatus.CONFLICT
    return _answer(status, {"session": session, "tasks": [vars(o) for o in outcomes]})


ROUTES: dict[tuple[str, str], Callable[[dict[str, Any]], dict[str, Any]]] = {
    ("GET", "/heartbeat"): heartbeat,
    ("POST", "/plugin"): run_plugin,
    ("GET", "/sessions/{session}"): get_session,
    ("POST", "/sessions/{session}/cancel"): cancel,
}


#: the invoke's context, for the routes' hub calls (set per invoke; an environment runs one at a time)
_CONTEXT: ContextVar[object] = ContextVar("lambda_context", default=None)


@lambda_handler
def handler(event: dict, context: object) -> dict:
    clear_run()
    _CONTEXT.set(context)
    route = ROUTES.get((event.get("httpMethod", ""), event.get("resource", "")))
    if route is None:
        return _error(HTTPStatus.NOT_FOUND, "No such route.")
    try:
        _require_secret(event)
        return route(event)
    except Unauthorized as exc:
        return _error(HTTPStatus.UNAUTHORIZED, exc.message)
    except PluginSecretTooShort as exc:
        logger.error(exc.message)
        return _error(HTTPStatus.SERVICE_UNAVAILABLE, "The plugin is not configured to accept requests.")
    except InvalidRequest as exc:
        _tell_hub(route, event, exc.message)
        return _error(HTTPStatus.BAD_REQUEST, exc.message, exc.field)
    except PromptNotFound as exc:
        _tell_hub(route, event, exc.message)
        return _error(HTTPStatus.UNPROCESSABLE_ENTITY, exc.message)


def _tell_hub(route: Callable[..., Any], event: dict[str, Any], message: str) -> None:
    if route is run_plugin:
        tell_hub_refused(
            _body(event),
            message,
            wiring.within_time(wiring.api_deps(), _CONTEXT.get(), wiring.API_HUB_BUDGET_S),
        )
