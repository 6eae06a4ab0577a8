"""The API Gateway stand-in answers as API Gateway does at its limits: 504 past the integration timeout,
413 above a 10 MB request, 502 for a Lambda proxy response above 6 MB. A fake stands in for the Lambdas,
so the limits are tested without the stack (and the timeout with a small value instead of 29 s)."""

from __future__ import annotations

import json
import threading

import pytest
import requests

from local_stack.api_gateway import REQUEST_LIMIT_BYTES, RESPONSE_LIMIT_BYTES, ApiGatewayServer
from local_stack.template import LocalTemplate

SECRET = {"Secret": "a-secret-the-fake-authorizer-allows-0123"}


class FakeLambdas:
    """Answers every invoke with ``respond(event)``; ``release`` lets a held invoke finish."""

    def __init__(self, respond):
        self.respond = respond
        self.release = threading.Event()
        self.invoked = threading.Event()

    def invoke(self, name_or_arn: str, body: bytes | str | None, on_environment=None) -> tuple[bytes, bool]:
        event = json.loads(body)
        if event.get("type") == "REQUEST":  # the routes' authorizer: let the request through
            return json.dumps(
                {
                    "principalId": "hub",
                    "policyDocument": {
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Action": "execute-api:Invoke",
                                "Resource": event["methodArn"],
                            }
                        ]
                    },
                }
            ).encode(), False
        self.invoked.set()
        return self.respond(event), False


def proxy_response(body: str, status: int = 200) -> bytes:
    headers = {"Content-Type": "application/json"}
    return json.dumps({"statusCode": status, "headers": headers, "body": body}).encode()


@pytest.fixture
def gateway():
    servers = []

    def start(lambdas, **limits) -> str:
        server = ApiGatewayServer(LocalTemplate("dalle-test"), lambdas, **limits).start()
        servers.append(server)
        return server.base_url

    yield start
    for server in servers:
        server.stop()


def test_an_ordinary_request_reaches_the_function_and_its_answer_the_client(gateway):
    base = gateway(FakeLambdas(lambda event: proxy_response(json.dumps({"path": event["path"]}), status=201)))
    answer = requests.get(f"{base}/heartbeat", headers=SECRET, timeout=30)
    assert answer.status_code == 201 and answer.json() == {"path": "/heartbeat"}


def test_an_integration_past_its_timeout_gets_the_client_a_504_while_the_function_runs_on(gateway):
    lambdas = FakeLambdas(lambda event: (lambdas.release.wait(60), proxy_response("{}"))[1])
    base = gateway(lambdas, integration_timeout_s=0.2)
    try:
        answer = requests.get(f"{base}/heartbeat", headers=SECRET, timeout=30)
    finally:
        lambdas.release.set()
    assert answer.status_code == 504
    assert answer.json() == {"message": "Endpoint request timed out"}
    assert lambdas.invoked.is_set()


def test_a_request_above_10_mb_is_refused_with_413_before_any_function_runs(gateway):
    lambdas = FakeLambdas(lambda event: proxy_response("{}"))
    base = gateway(lambdas)
    answer = requests.post(
        f"{base}/plugin", headers=SECRET, data=b"x" * (REQUEST_LIMIT_BYTES + 1), timeout=60
    )
    assert answer.status_code == 413
    assert answer.json() == {"message": f"HTTP content length exceeded {REQUEST_LIMIT_BYTES} bytes."}
    assert not lambdas.invoked.is_set()


def test_a_request_of_exactly_10_mb_goes_through(gateway):
    base = gateway(FakeLambdas(lambda event: proxy_response(json.dumps({"size": len(event["body"])}))))
    answer = requests.post(f"{base}/plugin", headers=SECRET, data=b"x" * REQUEST_LIMIT_BYTES, timeout=60)
    assert answer.status_code == 200 and answer.json() == {"size": REQUEST_LIMIT_BYTES}


def test_a_lambda_proxy_response_above_6_mb_is_a_502(gateway):
    base = gateway(FakeLambdas(lambda event: proxy_response("y" * RESPONSE_LIMIT_BYTES)))
    answer = requests.get(f"{base}/heartbeat", headers=SECRET, timeout=60)
    assert answer.status_code == 502
    assert answer.json() == {"message": "Internal server error"}


def test_a_malformed_proxy_response_is_a_502(gateway):
    base = gateway(FakeLambdas(lambda event: b"not json"))
    answer = requests.get(f"{base}/heartbeat", headers=SECRET, timeout=30)
    assert answer.status_code == 502
