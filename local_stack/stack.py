"""The local stack: one command brings up everything on 127.0.0.1 and stops it all cleanly.

DynamoDB Local (a child Java process); moto in server mode (S3, KMS, Secrets Manager, CloudWatch Logs, IAM,
Lambda and Step Functions executing the deployed ASL, with Step Functions' limits and late Waits); the
Lambda runtime, every execution environment a process of its own; the hub emulator and the OpenAI images
emulator (unless a real OPENAI_API_KEY is given), each in a process of its own; the API Gateway stand-in.
The profile (``aws`` or ``hostile``) sets how unkind it is; docs/local-stack.md describes it all. Resources
are created from template.yaml; boto3 reaches them through its own AWS_ENDPOINT_URL_* variables.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import boto3
import requests
from botocore.exceptions import ClientError
from dalle_plugin.domain.errors import MIN_SECRET_CHARS

from local_stack.api_gateway import ApiGatewayServer
from local_stack.console import console_routes
from local_stack.dynamodb_local import DynamoDBLocal
from local_stack.hub_emulator import HubEmulatorProcess
from local_stack.lambda_runtime import LambdaRefused, LambdaService, install
from local_stack.openai_emulator import OpenAIEmulatorProcess
from local_stack.ports import free_port
from local_stack.profiles import Profile, profile_named
from local_stack.seams import SEAMS_DIR_VARIABLE, SeamBoard
from local_stack.step_functions import StepFunctionsBehaviour, install_status_change_events
from local_stack.template import ACCOUNT_ID, REGION, LocalTemplate, table_definition

LOCAL_HUB_API_KEY = "ango-local-key"
#: times Lambda tries an asynchronous invoke again after the function failed (its default)
ASYNC_INVOKE_RETRIES = 2


@dataclass
class StackOptions:
    stack_name: str = "dalle-local"
    # template parameters over their defaults, taken as given: MinValue and AllowedValues are CloudFormation's
    # checks at deploy (a test may set ExecutionTimeoutSeconds to seconds where a deployment needs 3600)
    parameters: dict[str, str] = field(default_factory=dict)
    plugin_secret: str | None = None
    openai_api_key: str | None = None  # a real key: use the real OpenAI API instead of the emulator
    openai_base_url: str | None = None
    api_port: int | None = None
    profile: Profile = field(default_factory=profile_named)
    # Set on every function, over the template's own (what an operator could set on a deployed function).
    environment: dict[str, str] = field(default_factory=dict)
    # Modules every execution environment imports and ``install()``s before its handler (test seams).
    hook_modules: tuple[str, ...] = ()

    @classmethod
    def from_environment(cls) -> StackOptions:
        return cls(
            openai_api_key=os.environ.get("OPENAI_API_KEY") or None,
            openai_base_url=os.environ.get("OPENAI_BASE_URL") or None,
        )


class LocalStack:
    _running: str | None = None  # the stack this process runs, if any

    def __init__(self, options: StackOptions | None = None):
        self.options = options or StackOptions()
        if self.options.plugin_secret is not None and len(self.options.plugin_secret) < MIN_SECRET_CHARS:
            # as a deployment's would be: a short Secret is refused before anything starts
            raise ValueError(
                f"The plugin Secret must be at least {MIN_SECRET_CHARS} characters long "
                f"(got {len(self.options.plugin_secret)})."
            )
        self.plugin_secret = self.options.plugin_secret or secrets.token_urlsafe(32)
        self.dynamodb = DynamoDBLocal()
        self.hub = HubEmulatorProcess()
        self.openai = None if self.options.openai_api_key else OpenAIEmulatorProcess()
        self.moto_port = free_port()
        self._moto = None
        self._undo: list[Any] = []
        self._saved_env: dict[str, str | None] = {}
        self.template: LocalTemplate | None = None
        self.lambdas: LambdaService | None = None
        self._runtime_env: dict[str, str] = {}
        self.api: ApiGatewayServer | None = None
        self.step_functions = StepFunctionsBehaviour(self.profile)  # .waits: each Wait's target and wake
        self._logs: Any = None  # the CloudWatch Logs client the Lambda runtime writes through
        self._log_streams: dict[str, set[str]] = {}  # group -> streams created
        self._logs_lock = threading.Lock()
        # every EventBridge delivery to a function: (logical id, the event's id, whether the function failed)
        self.event_deliveries: list[tuple[str, str, bool]] = []
        self._event_rng = self.profile.rng()

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> LocalStack:
        if LocalStack._running is not None:  # moto's backends and the runtime's patches are process-wide
            raise RuntimeError(
                f"the local stack {LocalStack._running!r} already runs in this process: "
                "a local stack owns its process"
            )
        LocalStack._running = self.options.stack_name
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
        self._undo.append(_install_listed_moto_modules())
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=self.moto_port, verbose=False)
        self._moto.start()
        self._undo.append(self._moto.stop)
        self._set_env(
            self._runtime(
                {
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
                    "ALLOWED_PRIVATE_HOSTS": self._emulator_hosts(),
                }
            )
        )
        requests.post(
            f"{self.moto_url}/moto-api/config",
            json={
                "stepfunctions": {"execute_state_machine": True},
                "lambda": {"use_docker": False},
            },
            timeout=10,
        ).raise_for_status()
        self._create_resources()
        self._undo.append(self.step_functions.install())
        self._undo.append(self.lambdas.stop)
        self._undo.append(install(self.lambdas))
        self._undo.append(
            install_status_change_events(
                self.template.status_change_rules(), self._deliver_event, self._event_copies
            )
        )
        self.api = ApiGatewayServer(self.template, self.lambdas, port=self.options.api_port).start()
        self.api.extra_routes.append(console_routes(self))  # the local console at the API's root
        self._undo.append(self.api.stop)

    def stop(self) -> None:
        while self._undo:
            undo = self._undo.pop()
            # keep stopping the rest, even on a second Ctrl-C: no orphans
            with contextlib.suppress(BaseException):
                undo()
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()
        if LocalStack._running == self.options.stack_name:
            LocalStack._running = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what clients need ----------------------------------------------------------------------

    @property
    def profile(self) -> Profile:
        return self.options.profile

    @property
    def moto_url(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    @property
    def api_url(self) -> str:
        return self.api.base_url

    def client(self, service: str) -> Any:
        return boto3.client(service, region_name=REGION)

    # ---- resources from template.yaml -----------------------------------------------------------

    @property
    def seams(self) -> SeamBoard | None:
        """The board the test seams share with the execution environments, when the stack has one."""
        root = self.options.environment.get(SEAMS_DIR_VARIABLE)
        return SeamBoard(root) if root else None

    def _runtime(self, values: dict[str, str | None]) -> dict[str, str | None]:
        """What the local stack sets for AWS's clients: this process's and every execution environment's."""
        self._runtime_env.update({k: v for k, v in values.items() if v is not None})
        return values

    def _function_environ(self, spec: Any) -> dict[str, str]:
        """An execution environment's whole environment: the process basics, the local endpoints, the
        function's own variables from the template and the stack's overrides; nothing of other functions."""
        basics = {name: os.environ[name] for name in _INHERITED if name in os.environ}
        return basics | self._runtime_env | self.template.environment(spec) | self.options.environment

    def _set_env(self, values: dict[str, str | None]) -> None:
        for name, value in values.items():
            self._saved_env.setdefault(name, os.environ.get(name))
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def _emulator_hosts(self) -> str:
        """The URL guard's allow-list: exactly the emulators this stack started, and nothing else."""
        emulators = [self.hub] + ([self.openai] if self.openai else [])
        return ",".join(f"127.0.0.1:{emulator.port}" for emulator in emulators)

    def _parameters(self) -> dict[str, str]:
        params = {
            "HubApiUrl": self.hub.base_url,
            "HubRetryIntervalSeconds": "1",
            "OpenAIRetryIntervalSeconds": "1",
        }
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
            dynamodb.create_table(TableName=name, **table_definition(props))
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
            arn = secretsmanager.create_secret(
                Name=t.physical_name(lid), SecretString=self._secret_value(lid)
            )["ARN"]
            t.physical[lid] = t.arns[lid] = arn

        role = iam.create_role(
            RoleName=f"{t.stack_name}-execution",
            AssumeRolePolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Principal": {"Service": ["lambda.amazonaws.com", "states.amazonaws.com"]},
                            "Action": "sts:AssumeRole",
                        }
                    ],
                }
            ),
        )["Role"]["Arn"]
        functions = t.functions()
        for lid, spec in functions.items():
            lambda_.create_function(
                FunctionName=spec.physical_name,
                Runtime="python3.11",
                Role=role,
                Handler=spec.handler,
                Code={"ZipFile": _placeholder_zip()},
                Timeout=spec.timeout_s,
            )
            t.physical[lid], t.arns[lid] = spec.physical_name, spec.arn

        for sm_id in t.state_machines():
            sm_arn = sfn.create_state_machine(
                name=t.physical_name(sm_id), definition=t.definition(sm_id), roleArn=role, type="STANDARD"
            )["stateMachineArn"]
            t.physical[sm_id], t.arns[sm_id] = sm_arn, sm_arn

        # Tests and benchmarks call handlers in this process too: give it every function's variables.
        union_env: dict[str, str] = {}
        for spec in functions.values():
            union_env.update(t.environment(spec))
        self._set_env(union_env | self.options.environment)
        self.lambdas = LambdaService(
            functions,
            self._put_logs,
            profile=self.profile,
            environ=self._function_environ,
            layer_dirs=t.layer_dirs(),
            hook_modules=self.options.hook_modules,
        )

    def _event_copies(self) -> int:
        return 2 if self._event_rng.random() < self.profile.duplicate_event_share else 1

    def _deliver_event(self, function: str, event: dict[str, Any]) -> None:
        """EventBridge's asynchronous invoke of a Lambda target: a failed invoke is tried twice more, as
        Lambda does (a minute and two apart on AWS; seconds here)."""
        for attempt in range(1 + ASYNC_INVOKE_RETRIES):
            if attempt:
                time.sleep(attempt)
            try:
                _, failed = self.lambdas.invoke(self.template.arns[function], json.dumps(event))
            except LambdaRefused:
                failed = True
            except Exception:  # noqa: BLE001 - the stack is stopping: the event is lost with it
                return
            self.event_deliveries.append((function, event["id"], failed))
            if not failed:
                return

    def _secret_value(self, logical_id: str) -> str:
        if logical_id == "PluginSecret":
            return self.plugin_secret
        if logical_id == "DefaultOpenAIKeySecret":
            return self.options.openai_api_key or "sk-local-shared-default-key"
        return secrets.token_urlsafe(24)

    def _put_logs(self, group: str, stream: str, lines: list[str]) -> None:
        if not lines:
            return
        # Every invoke lands here, on the engine's one GIL: one client for the stack's life (building one
        # costs tens of milliseconds) and each group and stream created once, so an invoke costs one call.
        with self._logs_lock:
            if self._logs is None:
                self._logs = self.client("logs")
            logs = self._logs
            new_group = group not in self._log_streams
            new_stream = new_group or stream not in self._log_streams[group]
        if new_group:
            _unless_it_exists(lambda: logs.create_log_group(logGroupName=group))
        # one stream per execution environment, as Lambda writes them
        if new_stream:
            _unless_it_exists(lambda: logs.create_log_stream(logGroupName=group, logStreamName=stream))
            with self._logs_lock:
                self._log_streams.setdefault(group, set()).add(stream)
        now = int(time.time() * 1000)
        logs.put_log_events(
            logGroupName=group,
            logStreamName=stream,
            logEvents=[{"timestamp": now, "message": line} for line in lines],
        )

    # ---- helpers for runs, tests and the console ------------------------------------------------

    @property
    def state_machine_arn(self) -> str:
        return self.template.physical[self.template.state_machine()[0]]

    @property
    def start_batch_state_machine_arn(self) -> str:
        return self.template.physical["StartBatchStateMachine"]

    def add_function(self, spec: Any) -> str:
        """A function beside the template's, invocable by Step Functions (tests of the stack itself)."""
        self.client("lambda").create_function(
            FunctionName=spec.physical_name,
            Runtime="python3.11",
            Handler=spec.handler,
            Role=f"arn:aws:iam::{ACCOUNT_ID}:role/{self.template.stack_name}-execution",
            Code={"ZipFile": _placeholder_zip()},
            Timeout=spec.timeout_s,
        )
        self.lambdas.add_function(spec)
        return spec.arn

    def table_name(self, logical_id: str) -> str:
        return self.template.physical[logical_id]


# What an execution environment keeps of the machine's environment (Lambda sets its own basics).
_INHERITED = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "PYTHONDONTWRITEBYTECODE",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "PYTHONHASHSEED",
)


def _install_listed_moto_modules() -> Any:
    """moto's server lists its package directory (a stat per service, over a hundred) on every request to
    find the backend for a Host header: a fifth of the engine process's time serving the Lambdas' AWS calls
    in a batch (sampled). The listing never changes while the process runs, so it is read once."""
    import moto.backends as backends

    original = backends.list_of_moto_modules
    listed = tuple(original())
    backends.list_of_moto_modules = lambda: listed

    def uninstall() -> None:
        backends.list_of_moto_modules = original

    return uninstall


def _placeholder_zip() -> bytes:
    """moto wants a code package; the real code runs in-process from the project tree."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("app.py", "def handler(event, context):\n    return event\n")
    return buffer.getvalue()


def _unless_it_exists(create: Callable[[], Any]) -> None:
    """Create a log group or stream that two first invokes at once may both create: the second is told it
    exists (matched by its error code: a concurrent invoke's answer was seen to escape the modeled class)."""
    try:
        create()
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "ResourceAlreadyExistsException":
            raise
