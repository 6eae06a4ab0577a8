"""template.yaml as the single source of truth for the local stack: tables, bucket, key, secrets,
functions (code, handler, environment), the state machine (ASL file + substitutions) and the API routes
are all read from it, so what runs here cannot drift from what ``sam deploy`` ships."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_PATH = PROJECT_ROOT / "template.yaml"
ACCOUNT_ID = "123456789012"
REGION = "us-east-1"
#: the ``detail-type`` of Step Functions' events about an execution's status
EXECUTION_STATUS_CHANGE = "Step Functions Execution Status Change"


class _CfnLoader(yaml.SafeLoader):
    """Reads the CloudFormation short-form tags (!Ref, !GetAtt, !Sub, ...) as their long form."""


def _construct_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = value.split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    return {name: value}


_CfnLoader.add_multi_constructor("!", _construct_tag)


def load_template(path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_CfnLoader)  # noqa: S506 - a SafeLoader with CFN tags


def table_definition(properties: dict[str, Any]) -> dict[str, Any]:
    """A table's ``CreateTable`` parameters from its template properties: keys, attributes and indexes (the
    rest, TTL included, is set apart or means nothing locally)."""
    definition = {
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": properties["AttributeDefinitions"],
        "KeySchema": properties["KeySchema"],
    }
    if properties.get("GlobalSecondaryIndexes"):
        definition["GlobalSecondaryIndexes"] = properties["GlobalSecondaryIndexes"]
    return definition


def create_table_from_template(client: Any, logical_id: str, name: str) -> str:
    """Create the template's table ``logical_id`` as ``name`` through a DynamoDB ``client``; returns the name."""
    properties = load_template()["Resources"][logical_id]["Properties"]
    client.create_table(TableName=name, **table_definition(properties))
    return name


@dataclass(frozen=True)
class RouteAuthorizer:
    """A Lambda REQUEST authorizer, as the Api's Auth section declares it."""

    function: str  # logical id
    identity_headers: tuple[str, ...]
    ttl_s: int = 300  # ReauthorizeEvery: how long API Gateway caches an answer per identity


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # API Gateway form, e.g. /sessions/{session}
    function: str  # logical id
    authorizer: RouteAuthorizer | None = None

    def match(self, method: str, path: str) -> dict[str, str] | None:
        if method.upper() != self.method:
            return None
        pattern = "^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(self.path)) + "$"
        found = re.match(pattern, path)
        return found.groupdict() if found else None


@dataclass(frozen=True)
class StatusChangeRule:
    """An EventBridge rule on Step Functions' "Execution Status Change" whose target is a function."""

    function: str  # logical id
    state_machine_arns: tuple[str, ...]  # empty: every state machine's
    statuses: tuple[str, ...]


@dataclass
class FunctionSpec:
    logical_id: str
    physical_name: str
    code_dir: Path
    handler: str  # module.function
    timeout_s: int
    memory_mb: int
    environment: dict[str, Any] = field(default_factory=dict)
    reserved_concurrency: int | None = None  # ReservedConcurrentExecutions, where the template sets one

    @property
    def arn(self) -> str:
        return f"arn:aws:lambda:{REGION}:{ACCOUNT_ID}:function:{self.physical_name}"


class LocalTemplate:
    """The template's resources, with every intrinsic resolved to the local stack's physical values."""

    def __init__(
        self,
        stack_name: str = "dalle-local",
        parameters: dict[str, str] | None = None,
        template: dict[str, Any] | None = None,
    ):
        self.stack_name = stack_name
        self.doc = template or load_template()
        self.resources: dict[str, dict[str, Any]] = self.doc["Resources"]
        self.parameters = {
            name: str(spec.get("Default", "")) for name, spec in self.doc.get("Parameters", {}).items()
        }
        unknown = set(parameters or {}) - set(self.parameters)
        if unknown:
            raise KeyError(f"unknown template parameters: {sorted(unknown)}")
        self.parameters.update(parameters or {})
        self.physical: dict[str, str] = {}  # logical id -> what !Ref gives
        self.arns: dict[str, str] = {}  # logical id -> what !GetAtt X.Arn gives

    # ---- listing --------------------------------------------------------------------------------

    def of_type(self, resource_type: str) -> dict[str, dict[str, Any]]:
        return {lid: r for lid, r in self.resources.items() if r["Type"] == resource_type}

    def physical_name(self, logical_id: str) -> str:
        return f"{self.stack_name}-{logical_id}"

    def functions(self) -> dict[str, FunctionSpec]:
        globals_fn = self.doc.get("Globals", {}).get("Function", {})
        specs = {}
        for lid, res in self.of_type("AWS::Serverless::Function").items():
            props = res["Properties"]
            env = dict(globals_fn.get("Environment", {}).get("Variables", {}))
            env.update(props.get("Environment", {}).get("Variables", {}))
            specs[lid] = FunctionSpec(
                logical_id=lid,
                physical_name=self.physical_name(lid),
                code_dir=PROJECT_ROOT / props["CodeUri"],
                handler=props["Handler"],
                timeout_s=int(props.get("Timeout", globals_fn.get("Timeout", 3))),
                memory_mb=int(props.get("MemorySize", globals_fn.get("MemorySize", 128))),
                environment=env,
                reserved_concurrency=self._optional_int(props.get("ReservedConcurrentExecutions")),
            )
        return specs

    def _optional_int(self, value: Any) -> int | None:
        """A number the template may give through an intrinsic (a parameter, a condition)."""
        if value is None:
            return None
        try:
            return int(self.resolve(value))
        except (KeyError, TypeError, ValueError):
            return None

    def layer_dirs(self) -> list[Path]:
        return [
            PROJECT_ROOT / r["Properties"]["ContentUri"]
            for r in self.of_type("AWS::Serverless::LayerVersion").values()
        ]

    def routes(self) -> list[Route]:
        routes = []
        for lid, res in self.of_type("AWS::Serverless::Function").items():
            for event in res["Properties"].get("Events", {}).values():
                if event["Type"] == "Api":
                    props = event["Properties"]
                    routes.append(Route(props["Method"].upper(), props["Path"], lid, self._authorizer(props)))
        return routes

    def _authorizer(self, event_props: dict[str, Any]) -> RouteAuthorizer | None:
        """The route's own ``Auth.Authorizer``, else its Api's ``DefaultAuthorizer``; ``NONE`` is none."""
        api = self.resources.get((event_props.get("RestApiId") or {}).get("Ref", ""), {})
        auth = api.get("Properties", {}).get("Auth", {})
        name = (event_props.get("Auth") or {}).get("Authorizer", auth.get("DefaultAuthorizer"))
        if not name or name == "NONE":
            return None
        spec = auth["Authorizers"][name]
        return RouteAuthorizer(
            function=spec["FunctionArn"]["Fn::GetAtt"][0],
            identity_headers=tuple(spec.get("Identity", {}).get("Headers", [])),
            ttl_s=int(spec.get("Identity", {}).get("ReauthorizeEvery", 300)),
        )

    def status_change_rules(self) -> list[StatusChangeRule]:
        """The functions' EventBridgeRule events on Step Functions executions' status changes, resolved (the
        state machines must be created first: the pattern names their ARNs)."""
        rules = []
        for lid, res in self.of_type("AWS::Serverless::Function").items():
            for event in res["Properties"].get("Events", {}).values():
                pattern = event.get("Properties", {}).get("Pattern", {})
                if event["Type"] != "EventBridgeRule" or pattern.get("source") != ["aws.states"]:
                    continue
                if pattern.get("detail-type") != [EXECUTION_STATUS_CHANGE]:
                    continue
                detail = pattern.get("detail", {})
                rules.append(
                    StatusChangeRule(
                        function=lid,
                        state_machine_arns=tuple(self.resolve(detail.get("stateMachineArn", []))),
                        statuses=tuple(detail.get("status", [])),
                    )
                )
        return rules

    def state_machines(self) -> dict[str, dict[str, Any]]:
        """Every state machine's properties, by logical id."""
        return {lid: res["Properties"] for lid, res in self.of_type("AWS::Serverless::StateMachine").items()}

    def state_machine(self) -> tuple[str, dict[str, Any]]:
        """The machine that runs the tasks (``RunStateMachine``); the only one in a template that has one."""
        machines = self.state_machines()
        lid = "RunStateMachine" if "RunStateMachine" in machines else next(iter(machines))
        return lid, machines[lid]

    # ---- intrinsics -----------------------------------------------------------------------------

    def resolve(self, value: Any) -> Any:
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if set(value) == {"Ref"}:
            return self._ref(value["Ref"])
        if set(value) == {"Fn::GetAtt"}:
            lid, attribute = value["Fn::GetAtt"]
            return self._get_att(lid, attribute)
        if set(value) == {"Fn::Sub"}:
            return self._sub(value["Fn::Sub"])
        return {k: self.resolve(v) for k, v in value.items()}

    def _ref(self, name: str) -> str:
        pseudo = {
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT_ID,
            "AWS::StackName": self.stack_name,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
        }
        if name in pseudo:
            return pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        if name in self.physical:
            return self.physical[name]
        raise KeyError(f"!Ref {name}: resource not created in the local stack yet")

    def _get_att(self, lid: str, attribute: str) -> str:
        if attribute == "Arn" and lid in self.arns:
            return self.arns[lid]
        if attribute == "Name" and lid in self.physical:
            return self.physical[lid].rsplit(":", 1)[-1]
        raise KeyError(f"!GetAtt {lid}.{attribute}: not available in the local stack")

    def _sub(self, template: Any) -> str:
        text, variables = (template, {}) if isinstance(template, str) else (template[0], template[1])

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in variables:
                return str(self.resolve(variables[name]))
            if "." in name:
                lid, attribute = name.split(".", 1)
                return self._get_att(lid, attribute)
            return self._ref(name)

        return re.sub(r"\$\{([^}!]+)\}", replace, text)

    def definition(self, logical_id: str | None = None) -> str:
        """The deployed ASL file with its DefinitionSubstitutions applied, exactly as SAM does (of the run
        state machine unless ``logical_id`` names another)."""
        props = self.state_machines()[logical_id] if logical_id else self.state_machine()[1]
        text = (PROJECT_ROOT / props["DefinitionUri"]).read_text()
        for name, value in props.get("DefinitionSubstitutions", {}).items():
            text = text.replace("${" + name + "}", str(self.resolve(value)))
        json.loads(text)  # fail here, not inside moto, if a substitution is missing
        return text

    def environment(self, spec: FunctionSpec) -> dict[str, str]:
        """The function's variables; an empty one means "not set" (as on Lambda for boto3 and the settings),
        so it is left out rather than override what the local stack sets (its AWS endpoints)."""
        resolved = {name: str(self.resolve(value)) for name, value in spec.environment.items()}
        return {name: value for name, value in resolved.items() if value != ""}
