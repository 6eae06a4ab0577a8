"""API Gateway stand-in: turns HTTP requests into REST API (v1) Lambda proxy events for the function
that template.yaml routes them to, and the function's proxy response back into HTTP. moto does not
invoke Lambda proxy integrations, so this plays that part on 127.0.0.1.

With API Gateway's limits and its own answers to them: a request body above 10 MB is refused with 413, an
integration that has not answered in 29 s (on its environment's own CPU clock, as the Lambda runtime times
the function: local_stack.own_cpu_clock) gets the client a 504 (the Lambda runs on, as on AWS), and a
Lambda proxy response above 6 MB, a failed invoke or a malformed proxy response is a 502.
``docs/local-stack.md`` gives the figures and where they come from."""

from __future__ import annotations

import base64
import fnmatch
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from local_stack.lambda_runtime import POLL_S, LambdaRefused
from local_stack.own_cpu_clock import OwnCpuClock
from local_stack.ports import free_port
from local_stack.template import ACCOUNT_ID, REGION, LocalTemplate, Route

STAGE = "v1"

# REST API quotas: integration timeout (default, and the maximum unless raised for Regional or private APIs)
INTEGRATION_TIMEOUT_S = 29.0
REQUEST_LIMIT_BYTES = 10 * 1024 * 1024  # payload size: 10 MB
# A synchronous Lambda invoke's response: 6 MB (Lambda quotas); past it API Gateway answers 502.
RESPONSE_LIMIT_BYTES = 6 * 1024 * 1024

# API Gateway's own bodies for these answers (its default gateway responses)
TIMED_OUT_BODY = b'{"message": "Endpoint request timed out"}'
INTERNAL_ERROR_BODY = b'{"message": "Internal server error"}'


class Lambdas(Protocol):
    def invoke(
        self,
        name_or_arn: str,
        body: bytes | str | None,
        *,
        on_environment: Callable[[int], None] | None = None,
    ) -> tuple[bytes, bool]:
        """The function's response payload, and whether the invocation failed (a function error);
        ``on_environment`` hears the pid of the process that runs it, whose own clock times the integration."""


# Extra pages served beside the API (the local console): path -> (content type, body factory)
ExtraRoute = Callable[[str, dict[str, str]], tuple[int, str, bytes] | None]


def proxy_event(
    method: str,
    path: str,
    route_path: str,
    params: dict[str, str],
    query: str,
    headers: dict[str, str],
    body: bytes,
) -> dict[str, Any]:
    pairs = parse_qsl(query, keep_blank_values=True)
    multi_query: dict[str, list[str]] = {}
    for key, value in pairs:
        multi_query.setdefault(key, []).append(value)
    try:
        text, is_base64 = body.decode("utf-8"), False
    except UnicodeDecodeError:
        text, is_base64 = base64.b64encode(body).decode(), True
    return {
        "resource": route_path,
        "path": path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {k: [v] for k, v in headers.items()},
        "queryStringParameters": dict(pairs) or None,
        "multiValueQueryStringParameters": multi_query or None,
        "pathParameters": params or None,
        "stageVariables": None,
        "requestContext": {
            "resourcePath": route_path,
            "httpMethod": method,
            "path": f"/{STAGE}{path}",
            "stage": STAGE,
            "accountId": ACCOUNT_ID,
            "requestId": str(uuid.uuid4()),
            "requestTimeEpoch": int(time.time() * 1000),
            "identity": {"sourceIp": "127.0.0.1", "userAgent": headers.get("User-Agent", "")},
            "domainName": headers.get("Host", "127.0.0.1"),
            "apiId": "local",
        },
        "body": text if body else None,
        "isBase64Encoded": is_base64,
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the hub may send a burst of runs at once (the default backlog is 5)


class ApiGatewayServer:
    def __init__(
        self,
        template: LocalTemplate,
        lambdas: Lambdas,
        port: int | None = None,
        integration_timeout_s: float = INTEGRATION_TIMEOUT_S,
        request_limit_bytes: int = REQUEST_LIMIT_BYTES,
        response_limit_bytes: int = RESPONSE_LIMIT_BYTES,
    ):
        self.routes = template.routes()
        self.functions = template.functions()
        self.lambdas = lambdas
        self.port = port or free_port()
        self.integration_timeout_s = integration_timeout_s
        self.request_limit_bytes = request_limit_bytes
        self.response_limit_bytes = response_limit_bytes
        self.extra_routes: list[ExtraRoute] = []
        self._lock = threading.Lock()
        self._authorizer_cache: dict[tuple, tuple[float, dict[str, Any]]] = {}
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiGatewayServer:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet: the console shows what matters
                pass

            def _serve(self) -> None:
                gateway._handle(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _serve

        self._server = _Server(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="api-gateway", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        split = urlsplit(request.path)
        length = int(request.headers.get("Content-Length") or 0)
        if length > self.request_limit_bytes:
            _drain(request, length)  # read it all first, so the client sees the answer rather than a reset
            message = f"HTTP content length exceeded {self.request_limit_bytes} bytes."
            return self._send(
                request, 413, {"Content-Type": "application/json"}, json.dumps({"message": message}).encode()
            )
        body = request.rfile.read(length) if length else b""
        headers = dict(request.headers.items())
        for route in self.routes:
            params = route.match(request.command, split.path)
            if params is not None:
                event = proxy_event(
                    request.command, split.path, route.path, params, split.query, headers, body
                )
                refused = self._authorize(route, event)
                if refused:
                    return self._send(request, refused[0], {"Content-Type": "application/json"}, refused[1])
                status, out_headers, data = self._integrate(route.function, json.dumps(event))
                return self._send(request, status, out_headers, data)
        for extra in self.extra_routes:
            answer = extra(request.command, {"path": split.path, "query": split.query})
            if answer is not None:
                status, content_type, data = answer
                return self._send(request, status, {"Content-Type": content_type}, data)
        known = any(route.match(m, split.path) is not None for route in self.routes for m in ("GET", "POST"))
        status = 403 if not known else 405
        # API Gateway's own answer for a path or method no route matches
        self._send(
            request,
            status,
            {"Content-Type": "application/json"},
            b'{"message": "Missing Authentication Token"}',
        )

    def _integrate(self, function: str, event: str) -> tuple[int, dict[str, str], bytes]:
        """Invoke the function as a Lambda proxy integration: (status, headers, body) for the client."""
        answered = threading.Event()
        outcome: dict[str, Any] = {}
        clock = OwnCpuClock(pid=None)  # the wall's until the environment is known, then the environment's

        def invoke() -> None:
            try:
                outcome["result"] = self.lambdas.invoke(
                    self.functions[function].physical_name, event, on_environment=clock.follow
                )
            except BaseException as exc:  # noqa: BLE001 - an invoke that could not be made is an integration failure
                outcome["error"] = exc
            finally:
                answered.set()

        threading.Thread(target=invoke, name=f"api-integration-{function}", daemon=True).start()
        json_headers = {"Content-Type": "application/json"}
        while not answered.wait(POLL_S) and clock.elapsed_s() < self.integration_timeout_s:
            pass
        if not answered.is_set():
            print(
                f"[api] {function} did not answer within {self.integration_timeout_s:g} s: 504",
                file=sys.stderr,
                flush=True,
            )
            return 504, json_headers, TIMED_OUT_BODY
        if isinstance(outcome.get("error"), LambdaRefused):  # throttled or lost: API Gateway says 500
            print(
                f"[api] {function} refused by Lambda: {outcome['error'].code}: 500",
                file=sys.stderr,
                flush=True,
            )
            return 500, json_headers, INTERNAL_ERROR_BODY
        if "error" in outcome:
            print(f"[api] {function} could not be invoked: {outcome['error']!r}", file=sys.stderr, flush=True)
            return 502, json_headers, INTERNAL_ERROR_BODY
        payload, failed = outcome["result"]
        if failed:  # API Gateway answers 502 when the integration itself fails
            try:
                error = json.loads(payload)
                print(
                    f"[api] {function} failed: {error.get('errorType', 'Lambda.Unknown')}: {error['errorMessage']}\n"
                    + "".join(error.get("stackTrace", [])),
                    file=sys.stderr,
                    flush=True,
                )
            except (ValueError, KeyError, TypeError):
                print(f"[api] {function} failed: {payload[:200]!r}", file=sys.stderr, flush=True)
            return 502, json_headers, INTERNAL_ERROR_BODY
        if len(payload) > self.response_limit_bytes:
            print(
                f"[api] {function} answered {len(payload)} bytes, above {self.response_limit_bytes}: 502",
                file=sys.stderr,
                flush=True,
            )
            return 502, json_headers, INTERNAL_ERROR_BODY
        try:
            response = json.loads(payload)
            status = int(response.get("statusCode", 200))
            out = response.get("body") or ""
            data = base64.b64decode(out) if response.get("isBase64Encoded") else out.encode()
        except (ValueError, TypeError, AttributeError):
            print(f"[api] {function} returned a malformed proxy response: 502", file=sys.stderr, flush=True)
            return 502, json_headers, INTERNAL_ERROR_BODY
        out_headers = dict(response.get("headers") or {})
        for name, values in (response.get("multiValueHeaders") or {}).items():
            out_headers[name] = ", ".join(values)
        return status, out_headers, data

    def _authorize(self, route: Route, event: dict[str, Any]) -> tuple[int, bytes] | None:
        """What API Gateway does before the integration of a route with a Lambda REQUEST authorizer: a missing
        or empty identity header is 401 without asking it, its Deny (or an Allow not covering the request)
        is 403, its failure 500 (401 if it raised "Unauthorized"). On Allow, the integration's event gets
        the authorizer's principal and context. API Gateway caches the answer per header value for the authorizer's ReauthorizeEvery.)"""
        if route.authorizer is None:
            return None
        unauthorized = (401, b'{"message":"Unauthorized"}')
        headers = {name.lower(): value for name, value in event["headers"].items()}
        if not all(headers.get(name.lower()) for name in route.authorizer.identity_headers):
            return unauthorized
        method_arn = (
            f"arn:aws:execute-api:{REGION}:{ACCOUNT_ID}:{event['requestContext']['apiId']}/{STAGE}"
            f"/{event['httpMethod']}{event['path']}"
        )
        identity = (
            route.authorizer.function,
            *(headers.get(name.lower()) for name in route.authorizer.identity_headers),
        )
        with self._lock:
            cached = self._authorizer_cache.get(identity)
        if cached and cached[0] > time.monotonic():
            answer = cached[1]
        else:
            try:
                payload, failed = self.lambdas.invoke(
                    self.functions[route.authorizer.function].physical_name,
                    json.dumps(dict(event, type="REQUEST", methodArn=method_arn)),
                )
            except LambdaRefused:
                return 500, b'{"message":null}'
            answer = json.loads(payload)
            if failed:
                return (
                    unauthorized
                    if answer.get("errorMessage") == "Unauthorized"
                    else (500, b'{"message":null}')
                )
            with self._lock:  # API Gateway caches the policy per identity for ReauthorizeEvery seconds
                self._authorizer_cache[identity] = (time.monotonic() + route.authorizer.ttl_s, answer)

        def covers(statement: dict[str, Any]) -> bool:
            resources = statement.get("Resource", [])
            resources = [resources] if isinstance(resources, str) else resources
            return any(fnmatch.fnmatchcase(method_arn, resource) for resource in resources)

        statements = [s for s in answer.get("policyDocument", {}).get("Statement", []) if covers(s)]
        if not statements or any(s.get("Effect") != "Allow" for s in statements):
            return 403, b'{"Message":"User is not authorized to access this resource with an explicit deny"}'
        event["requestContext"]["authorizer"] = {
            "principalId": answer.get("principalId"),
            **(answer.get("context") or {}),
        }
        return None

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, headers: dict[str, str], data: bytes) -> None:
        request.send_response(status)
        for name, value in headers.items():
            if name.lower() not in ("content-length", "connection", "transfer-encoding"):
                request.send_header(name, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


def _drain(request: BaseHTTPRequestHandler, length: int, chunk: int = 1 << 20) -> None:
    while length > 0:
        read = request.rfile.read(min(chunk, length))
        if not read:
            return
        length -= len(read)
