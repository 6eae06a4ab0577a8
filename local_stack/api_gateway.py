"""API Gateway stand-in: turns HTTP requests into REST API (v1) Lambda proxy events for the function
that template.yaml routes them to, and the function's proxy response back into HTTP. moto does not
invoke Lambda proxy integrations, so this plays that part on 127.0.0.1."""

from __future__ import annotations

import base64
import fnmatch
import sys
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

from local_stack.lambda_runtime import InProcessLambdas
from local_stack.ports import free_port
from local_stack.template import ACCOUNT_ID, REGION, LocalTemplate, Route

STAGE = "v1"

# Extra pages served beside the API (the local console): path -> (content type, body factory)
ExtraRoute = Callable[[str, dict[str, str]], tuple[int, str, bytes] | None]


def proxy_event(method: str, path: str, route_path: str, params: dict[str, str], query: str,
                headers: dict[str, str], body: bytes) -> dict[str, Any]:
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
    def __init__(self, template: LocalTemplate, lambdas: InProcessLambdas, port: int | None = None):
        self.routes = template.routes()
        self.functions = template.functions()
        self.lambdas = lambdas
        self.port = port or free_port()
        self.extra_routes: list[ExtraRoute] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ApiGatewayServer":
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
        body = request.rfile.read(length) if length else b""
        headers = {k: v for k, v in request.headers.items()}
        for route in self.routes:
            params = route.match(request.command, split.path)
            if params is not None:
                event = proxy_event(request.command, split.path, route.path, params, split.query, headers, body)
                refused = self._authorize(route, event)
                if refused:
                    return self._send(request, refused[0], {"Content-Type": "application/json"}, refused[1])
                payload, failed = self.lambdas.invoke(self.functions[route.function].physical_name,
                                                      json.dumps(event))
                if failed:  # API Gateway answers 502 when the integration itself fails
                    error = json.loads(payload)
                    print(f"[api] {route.function} failed: {error['errorType']}: {error['errorMessage']}\n"
                          + "".join(error.get("stackTrace", [])), file=sys.stderr, flush=True)
                    return self._send(request, 502, {"Content-Type": "application/json"},
                                      b'{"message": "Internal server error"}')
                response = json.loads(payload)
                out = response.get("body") or ""
                data = base64.b64decode(out) if response.get("isBase64Encoded") else out.encode()
                out_headers = dict(response.get("headers") or {})
                for name, values in (response.get("multiValueHeaders") or {}).items():
                    out_headers[name] = ", ".join(values)
                return self._send(request, int(response.get("statusCode", 200)), out_headers, data)
        for extra in self.extra_routes:
            answer = extra(request.command, {"path": split.path, "query": split.query})
            if answer is not None:
                status, content_type, data = answer
                return self._send(request, status, {"Content-Type": content_type}, data)
        known = any(route.match(m, split.path) is not None for route in self.routes for m in ("GET", "POST"))
        status = 403 if not known else 405
        # API Gateway's own answer for a path or method no route matches
        self._send(request, status, {"Content-Type": "application/json"},
                   b'{"message": "Missing Authentication Token"}')

    def _authorize(self, route: Route, event: dict[str, Any]) -> tuple[int, bytes] | None:
        """What API Gateway does before the integration of a route with a Lambda REQUEST authorizer: a missing
        or empty identity header is 401 without asking it, its Deny (or an Allow not covering the request)
        is 403, its failure 500 (401 if it raised "Unauthorized"). On Allow, the integration's event gets
        the authorizer's principal and context. (API Gateway would also cache the answer per header value.)"""
        if route.authorizer is None:
            return None
        unauthorized = (401, b'{"message":"Unauthorized"}')
        headers = {name.lower(): value for name, value in event["headers"].items()}
        if not all(headers.get(name.lower()) for name in route.authorizer.identity_headers):
            return unauthorized
        method_arn = (f"arn:aws:execute-api:{REGION}:{ACCOUNT_ID}:{event['requestContext']['apiId']}/{STAGE}"
                      f"/{event['httpMethod']}{event['path']}")
        payload, failed = self.lambdas.invoke(self.functions[route.authorizer.function].physical_name,
                                              json.dumps(dict(event, type="REQUEST", methodArn=method_arn)))
        answer = json.loads(payload)
        if failed:
            return unauthorized if answer.get("errorMessage") == "Unauthorized" else (500, b'{"message":null}')

        def covers(statement: dict[str, Any]) -> bool:
            resources = statement.get("Resource", [])
            resources = [resources] if isinstance(resources, str) else resources
            return any(fnmatch.fnmatchcase(method_arn, resource) for resource in resources)

        statements = [s for s in answer.get("policyDocument", {}).get("Statement", []) if covers(s)]
        if not statements or any(s.get("Effect") != "Allow" for s in statements):
            return 403, b'{"Message":"User is not authorized to access this resource with an explicit deny"}'
        event["requestContext"]["authorizer"] = {"principalId": answer.get("principalId"),
                                                 **(answer.get("context") or {})}
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
