"""API function: the hub's REST connector endpoint. Thin: authenticate, parse, call the domain, answer."""

from __future__ import annotations

import hmac
from http import HTTPStatus

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.logging import correlation_paths

from dalle_plugin.domain.errors import InvalidRequest, PluginError, PromptNotFound, Unauthorized
from dalle_plugin.domain.payload import parse_payload
from dalle_plugin.domain.sessions import session_view
from dalle_plugin.domain.steps import start_run
from dalle_plugin.observability import bind_run, logger, metrics, tracer
from dalle_plugin.settings import ApiSettings, load_settings
from dalle_plugin import wiring

app = APIGatewayRestResolver()


def _error(status: HTTPStatus, message: str, field: str | None = None) -> Response:
    body = {"error": True, "message": message}
    if field:
        body["field"] = field
    return Response(status_code=status.value, content_type=content_types.APPLICATION_JSON, body=body)


def _require_secret() -> None:
    given = app.current_event.headers.get("Secret") or app.current_event.headers.get("secret") or ""
    if not hmac.compare_digest(given.encode(), wiring.plugin_secret().encode()):
        raise Unauthorized("Missing or wrong Secret header.")


@app.exception_handler(Unauthorized)
def _unauthorized(exc: Unauthorized) -> Response:
    return _error(HTTPStatus.UNAUTHORIZED, exc.message)


@app.exception_handler(InvalidRequest)
def _invalid(exc: InvalidRequest) -> Response:
    return _error(HTTPStatus.BAD_REQUEST, exc.message, exc.field)


@app.exception_handler(PromptNotFound)
def _unprocessable(exc: PromptNotFound) -> Response:
    return _error(HTTPStatus.UNPROCESSABLE_ENTITY, exc.message)


@app.get("/heartbeat")
def heartbeat() -> Response:
    _require_secret()
    return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body="ok")


@app.post("/plugin")
def run_plugin() -> Response:
    _require_secret()
    raw = app.current_event.body or ""
    if len(raw.encode()) > load_settings(ApiSettings).max_body_bytes:
        return _error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "The request body is too large.")
    payload = parse_payload(raw)
    bind_run(payload.session, payload.task_id)
    logger.info("run requested", extra={"payload_keys": sorted(app.current_event.json_body.keys())})
    run, created = start_run(payload, wiring.api_deps())
    return Response(
        status_code=HTTPStatus.ACCEPTED.value,
        content_type=content_types.APPLICATION_JSON,
        body={
            "session": run.session,
            "taskId": run.task_id,
            "status": run.status.value,
            "duplicate": not created,
            "statusUrl": f"/sessions/{run.session}",
        },
    )


@app.get("/sessions/<session>")
def get_session(session: str) -> Response:
    _require_secret()
    runs = wiring.api_deps().runs.list_session(session)
    if not runs:
        return _error(HTTPStatus.NOT_FOUND, f"No session {session!r}.")
    return Response(status_code=200, content_type=content_types.APPLICATION_JSON,
                    body=session_view(session, runs, wiring.api_deps().images))


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict, context: object) -> dict:
    return app.resolve(event, context)
