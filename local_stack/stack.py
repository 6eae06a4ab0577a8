"""The local stack: one process brings up everything on 127.0.0.1 and stops it all cleanly.

DynamoDB Local (a child Java process), moto in server mode (S3, KMS, Secrets Manager, CloudWatch Logs,
IAM, Lambda and Step Functions executing the deployed ASL with the real handlers in-process), the hub
emulator, the OpenAI images emulator (unless a real OPENAI_API_KEY is given) and the API Gateway stand-in.
Resources are created from template.yaml; boto3 reaches them through its own AWS_ENDPOINT_URL_* variables.
"""

from __future__ import annotations

import io
import logging
import json
import os
import secrets
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any

import boto3
import requests

from local_stack.api_gateway import ApiGatewayServer
from local_stack.console import console_routes
from local_stack.dynamodb_local import DynamoDBLocal
from local_stack.hub_emulator import HubEmulator
from local_stack.lambda_runtime import InProcessLambdas, install, install_exact_timestamp_waits
from local_stack.openai_emulator import OpenAIEmulator
from local_stack.ports import free_port
from local_stack.template import REGION, LocalTemplate

LOCAL_HUB_API_KEY = "ango-local-key"


@dataclass
class StackOptions:
    stack_name: str = "dalle-local"
    parameters: dict[str, str] = field(default_factory=dict)
    plugin_secret: str | None = None
    openai_api_key: str | None = None  # a real key: use the real OpenAI API instead of the emulator
    openai_base_url: str | None = None
    api_port: int | None = None

    @classmethod
    def from_environment(cls) -> "StackOptions":
        return cls(openai_api_key=os.environ.get("OPENAI_API_KEY") or None,
                   openai_base_url=os.environ.get("OPENAI_BASE_URL") or None)


class LocalStack:
    def __init__(self, options: StackOptions | None = None):
        self.options = options or StackOptions()
        self.plugin_secret = self.options.plugin_secret or secrets.token_urlsafe(32)
        self.dynamodb = DynamoDBLocal()
        self.hub = HubEmulator()
        self.openai: OpenAIEmulator | None = None if self.options.openai_api_key else OpenAIEmulator()
        self.moto_port = free_port()
        self._moto = None
        self._undo: list[Any] = []
        self._saved_env: dict[str, str | None] = {}
        self.template: LocalTemplate | None = None
        self.lambdas: InProcessLambdas | None = None
        self.api: ApiGatewayServer | None = None

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "LocalStack":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.dynamodb.start()
        self._undo.append(self.dynamodb.stop)
        self.hub.start()
        self._undo.append(self.hub.stop)
        if self.openai:
            self.openai.start()
            self._undo.append(self.openai.stop)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log drowns the progress lines
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self._moto.start()
        self._undo.append(self._moto.stop)
        self._set_env({
            "AWS_ACCESS_KEY_ID": "local",
            "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_SESSION_TOKEN": None,
            "AWS_PROFILE": None,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.moto_url,
            "AWS_ENDPOINT_URL_DYNAMODB": self.dynamodb.endpoint_url,
            "MOTO_PORT": str(self.moto_port),
            "POWERTOOLS_TRACE_DISABLED": "true",
            "POWERTOOLS_DEV": "false",
            "ALLOW_PRIVATE_URLS": "true",
        })
        requests.post(f"{self.moto_url}/moto-api/config", json={
            "stepfunctions": {"execute_state_machine": True}, "lambda": {"use_docker": False},
        }, timeout=10).raise_for_status()
        self._create_resources()
        self._undo.append(install_exact_timestamp_waits())
        self._undo.append(install(self.lambdas))
        self.api = ApiGatewayServer(self.template, self.lambdas, port=self.options.api_port).start()
        self.api.extra_routes.append(console_routes(self))  # the local console at the API's root
        self._undo.append(self.api.stop)

    def stop(self) -> None:
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except BaseException:  # keep stopping the rest, even on a second Ctrl-C: no orphans
                pass
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()

    def __enter__(self) -> "LocalStack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what clients need ----------------------------------------------------------------------

    @property
    def moto_url(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    @property
    def api_url(self) -> str:
        return self.api.base_url

    def client(self, service: str) -> Any:
        return boto3.client(service, region_name=REGION)

    # ---- resources from template.yaml -----------------------------------------------------------

    def _set_env(self, values: dict[str, str | None]) -> None:
        for name, value in values.items():
            self._saved_env.setdefault(name, os.environ.get(name))
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def _parameters(self) -> dict[str, str]:
        params = {"HubApiUrl": self.hub.base_url, "HubRetryIntervalSeconds": "1", "OpenAIRetryIntervalSeconds": "1"}
        if self.openai:
            params["OpenAIBaseUrl"] = self.openai.base_url
        else:
            params["OpenAIBaseUrl"] = self.options.openai_base_url or ""
        params.update(self.options.parameters)
        return params

    def _create_resources(self) -> None:
        t = self.template = LocalTemplate(self.options.stack_name, self._parameters())
        dynamodb, s3, kms = self.client("dynamodb"), self.client("s3"), self.client("kms")
        secretsmanager, iam = self.client("secretsmanager"), self.client("iam")
        lambda_, sfn = self.client("lambda"), self.client("stepfunctions")

        for lid, res in t.of_type("AWS::DynamoDB::Table").items():
            props = res["Properties"]
            name = t.physical_name(lid)
            dynamodb.create_table(TableName=name, BillingMode="PAY_PER_REQUEST",
                                  AttributeDefinitions=props["AttributeDefinitions"], KeySchema=props["KeySchema"])
            ttl = props.get("TimeToLiveSpecification")
            if ttl:
                dynamodb.update_time_to_live(TableName=name, TimeToLiveSpecification=ttl)
            t.physical[lid] = name
        for lid in t.of_type("AWS::S3::Bucket"):
            name = t.physical_name(lid).lower()
            s3.create_bucket(Bucket=name)
            t.physical[lid] = name
        for lid, res in t.of_type("AWS::KMS::Key").items():
            key = kms.create_key(Description=res["Properties"].get("Description", lid))["KeyMetadata"]
            t.physical[lid], t.arns[lid] = key["KeyId"], key["Arn"]
        for lid in t.of_type("AWS::SecretsManager::Secret"):
            arn = secretsmanager.create_secret(Name=t.physical_name(lid), SecretString=self._secret_value(lid))["ARN"]
            t.physical[lid] = t.arns[lid] = arn

        role = iam.create_role(RoleName=f"{t.stack_name}-execution", AssumeRolePolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow",
                           "Principal": {"Service": ["lambda.amazonaws.com", "states.amazonaws.com"]},
                           "Action": "sts:AssumeRole"}]}))["Role"]["Arn"]
        functions = t.functions()
        for lid, spec in functions.items():
            lambda_.create_function(FunctionName=spec.physical_name, Runtime="python3.11", Role=role,
                                    Handler=spec.handler, Code={"ZipFile": _placeholder_zip()}, Timeout=spec.timeout_s)
            t.physical[lid], t.arns[lid] = spec.physical_name, spec.arn

        sm_id, _ = t.state_machine()
        sm_arn = sfn.create_state_machine(name=t.physical_name(sm_id), definition=t.definition(), roleArn=role,
                                          type="STANDARD")["stateMachineArn"]
        t.physical[sm_id], t.arns[sm_id] = sm_arn, sm_arn

        union_env: dict[str, str] = {}
        for spec in functions.values():
            for name, value in t.environment(spec).items():
                if union_env.get(name, value) != value:
                    raise ValueError(f"functions disagree on {name}: the in-process Lambdas share one environment")
                union_env[name] = value
        self._set_env(union_env)
        self.lambdas = InProcessLambdas(functions, self._put_logs, t.layer_dirs())

    def _secret_value(self, logical_id: str) -> str:
        if logical_id == "PluginSecret":
            return self.plugin_secret
        if logical_id == "DefaultOpenAIKeySecret":
            return self.options.openai_api_key or "sk-local-shared-default-key"
        return secrets.token_urlsafe(24)

    def _put_logs(self, group: str, stream: str, lines: list[str]) -> None:
        if not lines:
            return
        logs = self.client("logs")
        try:
            logs.create_log_group(logGroupName=group)
        except logs.exceptions.ResourceAlreadyExistsException:
            pass
        logs.create_log_stream(logGroupName=group, logStreamName=stream)
        now = int(time.time() * 1000)
        logs.put_log_events(logGroupName=group, logStreamName=stream,
                            logEvents=[{"timestamp": now, "message": line} for line in lines])

    # ---- helpers for runs, tests and the console ------------------------------------------------

    @property
    def state_machine_arn(self) -> str:
        return self.template.physical[self.template.state_machine()[0]]

    def table_name(self, logical_id: str) -> str:
        return self.template.physical[logical_id]


def _placeholder_zip() -> bytes:
    """moto wants a code package; the real code runs in-process from the project tree."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("app.py", "def handler(event, context):\n    return event\n")
    return buffer.getvalue()
