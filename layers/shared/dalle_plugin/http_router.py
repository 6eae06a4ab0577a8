"""A small router for API Gateway REST proxy events: each route is declared once (method, path template,
handler, the pydantic models of its path, query and body, the answers it documents); this module matches an
event to its route and validates the request with those models. ``dalle_plugin.openapi`` renders the same
routes as an OpenAPI document (``make openapi`` only).

Why not Powertools' event handler: importing it loads every resolver it has (AppSync's with asyncio among
them) and its OpenAPI machinery, most of what kept the API's cold start above 1.5x its floor
(docs/performance.md, "Cold starts"). Matching and validating four routes takes a few dozen lines.

A refused request raises one of the named errors below; the routes' module turns them into its answers.
"""

import base64
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from pydantic import BaseModel, ValidationError

#: what a path parameter may hold: one segment as API Gateway passes it (not percent-decoded); the same
#: characters Powertools' resolver matched, so no id that reached a route before is refused now
_SEGMENT = r"[-._~()'!*:@,;=+&$%<> \[\]{}|^\w]+"
_PARAMETER = re.compile(r"\{(\w+)\}")
JSON_TYPE = "application/json"


class Doc(NamedTuple):
    """An answer a route documents. ``model`` names a model of the answers' module, which only the
    document loads (serving never creates those classes); ``schema`` is a JSON schema given as it is."""

    description: str
    model: str | None = "ErrorBody"
    schema: Mapping[str, Any] | None = None


class Request(NamedTuple):
    """A matched request, validated: ``path``, ``query`` and ``body`` are instances of the route's models
    (``body`` None when an optional body is absent); ``json`` is the body as it was parsed."""

    event: Mapping[str, Any]
    context: Any
    route: "Route"
    path: Any
    query: Any
    body: Any
    json: Any


class Answer(NamedTuple):
    status: int
    body: Any


#: a route's model, or a function that returns it: a model only other routes use is then created when a
#: request of theirs first comes (a pydantic class costs a cold start to create, built or not)
ModelRef = type[BaseModel] | Callable[[], type[BaseModel]] | None


def model_of(ref: ModelRef) -> type[BaseModel] | None:
    return ref if ref is None or isinstance(ref, type) else ref()


class Route(NamedTuple):
    method: str
    path: str  # an OpenAPI path template: /sessions/{session}
    handler: Callable[[Request], Answer]
    operation_id: str
    summary: str
    responses: Mapping[int, Doc]
    description: str | None = None
    path_model: ModelRef = None
    query_model: ModelRef = None
    body_model: ModelRef = None
    body_required: bool = False
    body_description: str | None = None


class NoRoute(Exception):
    """No route has this method and path."""


class NotJson(Exception):
    """A route's body came with a Content-Type that is not JSON."""

    def __init__(self, content_type: str):
        super().__init__(content_type)
        self.content_type = content_type


class UnreadableBody(Exception):
    """The body is not UTF-8, not JSON, or JSON nested deeper than Python parses: ``cause`` says which."""

    def __init__(self, cause: UnicodeDecodeError | ValueError | RecursionError):
        super().__init__(str(cause))
        self.cause = cause


class InvalidPart(Exception):
    """A part of the request (``path``, ``query`` or ``body``) failed its model: pydantic's first error,
    ``loc`` inside that part."""

    def __init__(self, part: str, error: Mapping[str, Any]):
        super().__init__(f"{part}: {error.get('msg')}")
        self.part = part
        self.error = error


def header(event: Mapping[str, Any], name: str) -> str:
    """A request header, whatever the case of its name."""
    for key, value in (event.get("headers") or {}).items():
        if key.lower() == name.lower():
            return value or ""
    return ""


def raw_body(event: Mapping[str, Any]) -> bytes:
    raw = event.get("body") or ""
    return base64.b64decode(raw) if event.get("isBase64Encoded") else raw.encode()


def proxy_answer(answer: Answer) -> dict[str, Any]:
    """An answer as a REST API proxy integration returns it."""
    return {
        "statusCode": answer.status,
        "multiValueHeaders": {"Content-Type": [JSON_TYPE]},
        "body": json.dumps(answer.body, separators=(",", ":")),
        "isBase64Encoded": False,
    }


class Router:
    def __init__(self, routes: Sequence[Route]):
        self.routes = tuple(routes)
        # each route's pattern is compiled when a request of its method first meets it: a cold start's
        # first request does not compile the other methods' patterns
        self._patterns: dict[str, re.Pattern[str]] = {}

    def _compiled(self, route: Route) -> re.Pattern[str]:
        pattern = self._patterns.get(route.path)
        if pattern is None:
            # trailing slashes are the same route, as API Gateway's stand-ins and Powertools treated them
            pattern = self._patterns[route.path] = re.compile(f"^{_pattern(route.path)}/*$")
        return pattern

    def match(self, event: Mapping[str, Any]) -> tuple[Route, dict[str, str]]:
        """The event's route and its path parameters (raw, as matched)."""
        method = str(event.get("httpMethod") or "").upper()
        path = str(event.get("path") or "")
        for route in self.routes:
            found = self._compiled(route).match(path) if route.method == method else None
            if found:
                return route, found.groupdict()
        raise NoRoute(f"{method} {path}")

    @staticmethod
    def request(route: Route, params: Mapping[str, str], event: Mapping[str, Any], context: Any) -> Request:
        """The request's parts, validated. A body that cannot be read is refused before the path and query
        are looked at (as Powertools' validation did); then the path, the query and the body, in that order."""
        parsed = _json_body(event) if route.body_model else None
        query_model = model_of(route.query_model)
        return Request(
            event=event,
            context=context,
            route=route,
            path=_validated("path", model_of(route.path_model), params),
            query=_validated("query", query_model, _query(event, query_model)),
            body=_body(route, parsed),
            json=parsed,
        )


def _pattern(template: str) -> str:
    parts = _PARAMETER.split(template)  # static, name, static, name, ...
    return "".join(
        f"(?P<{part}>{_SEGMENT})" if index % 2 else re.escape(part) for index, part in enumerate(parts)
    )


def _json_body(event: Mapping[str, Any]) -> Any:
    """The body as JSON; None when there is none (whatever its Content-Type then)."""
    raw = event.get("body")
    if not raw:
        return None
    content_type = header(event, "content-type").strip()
    if content_type and not content_type.lower().startswith(JSON_TYPE):
        raise NotJson(content_type)
    try:
        text = base64.b64decode(raw).decode() if event.get("isBase64Encoded") else raw
        return json.loads(text) if text else None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UnreadableBody(exc) from None


def _query(event: Mapping[str, Any], model: type[BaseModel] | None) -> dict[str, Any]:
    """The model's query parameters: a name given several times is a list (which a one-value field then
    refuses), else its one value."""
    if model is None:
        return {}
    single = event.get("queryStringParameters") or {}
    multi = event.get("multiValueQueryStringParameters") or {}
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        alias = field.alias or name
        given = multi.get(alias) or ([single[alias]] if alias in single else [])
        if given:
            values[alias] = given if len(given) > 1 else given[0]
    return values


def _validated(part: str, model: type[BaseModel] | None, values: Any) -> Any:
    if model is None:
        return None
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise InvalidPart(part, exc.errors()[0]) from None


def _body(route: Route, parsed: Any) -> Any:
    if route.body_model is None:
        return None
    if parsed is None:
        if route.body_required:
            raise InvalidPart("body", {"type": "missing", "loc": (), "msg": "Field required"})
        return None
    return _validated("body", model_of(route.body_model), parsed)
