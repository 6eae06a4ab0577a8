"""Each handler with its events/ file, on the local stack's real DynamoDB Local, S3 and KMS, run in the order
the state machine would run them (the execution itself is not started here, so the handlers are the only
ones touching the run)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid

import pytest
from dalle_plugin import wiring
from dalle_plugin.adapters.dynamo_rate_limiter import QUEUE_KEY
from dalle_plugin.domain.payload import parse_payload
from dalle_plugin.domain.rate_limit import line_of
from dalle_plugin.domain.run import RunStatus
from dalle_plugin.domain.steps.batch_start import starter_name
from dalle_plugin.domain.steps.start import creation_owner, session_prefix, start_session
from dalle_plugin.settings import load_settings
from dalle_plugin.settings.rate_limit import RateLimitSettings

from local_stack import sam_local
from local_stack.lambda_environment import LambdaContext
from tests.conftest import PLUGIN_SECRET, load_event, wait_for

pytestmark = pytest.mark.stack


class RecordingStarter:
    def __init__(self):
        self.started: list[tuple[str, dict]] = []

    def start(self, name: str, run_input: dict) -> str:
        self.started.append((name, run_input))
        return f"arn:aws:states:us-east-1:123456789012:execution:test:{name}"

    def stop(self, execution_arn: str, cause: str) -> None:
        pass

    def arn_of(self, name: str) -> str:
        return f"arn:aws:states:us-east-1:123456789012:execution:test:{name}"


def _invoke(stack, logical_id: str, event: dict):
    spec = stack.template.functions()[logical_id]
    context = LambdaContext(
        spec.physical_name,
        spec.arn,
        spec.memory_mb,
        str(uuid.uuid4()),
        f"/aws/lambda/{spec.physical_name}",
        "local",
        time.monotonic() + spec.timeout_s,
    )
    return stack.lambdas.handler(spec)(event, context)


def test_step_handlers_with_their_events(stack, openai_emulator):
    # the session `make serve` seeds for `sam local invoke`, the same way
    starter = RecordingStarter()
    started = sam_local.seed_event_session(stack, starter)
    assert started.started == ["task-fox"]
    assert starter.started[0][1] == {"session": "sess-event-0001", "tasks": [{"taskId": "task-fox"}]}

    # Each step's event carries what the step before hands on, so `sam local invoke` with it takes the usual
    # path: Extract's prompt and lines for Generate, Generate's images for Attach. Only times and ids differ.
    extracted = _invoke(stack, "ExtractFunction", load_event("extract.json"))
    assert {k: extracted[k] for k in ("promptSource", "promptLength", "truncated")} == {
        "promptSource": "entity-annotation",
        "promptLength": 57,
        "truncated": False,
    }
    generate_event = load_event("generate.json")
    assert extracted["imageFingerprint"] == generate_event["imageFingerprint"]
    assert {k: v for k, v in extracted["extracted"].items() if k not in ("startedMs", "atMs")} == {
        k: v for k, v in generate_event["extracted"].items() if k not in ("startedMs", "atMs")
    }

    generated = _invoke(stack, "GenerateFunction", generate_event)
    assert generated["status"] == "DONE" and generated["imageKey"].endswith(".png")
    assert len(openai_emulator.requests) == 1
    attach_event = load_event("attach.json")
    handed_on, in_event = generated.pop("generated"), attach_event["generation"].pop("generated")
    assert generated == attach_event["generation"]
    assert [{k: v for k, v in i.items() if k != "requestId"} for i in handed_on["images"]] == [
        {k: v for k, v in i.items() if k != "requestId"} | {"attached": False, "reused": False}
        for i in in_event["images"]
    ]
    # (a retried Generate never pays again: tests/faults/test_step_idempotency.py, and the fault suite)

    attached = _invoke(stack, "AttachFunction", load_event("attach.json"))
    assert attached["finishedAs"] == "workflow"
    assert [a["value"] for a in stack.hub.attachments()].count(attached["imageUrl"]) == 1

    session_event = load_event("api_get_session.json")
    session_event["headers"]["Secret"] = PLUGIN_SECRET
    answer = _invoke(stack, "ApiFunction", session_event)
    assert answer["statusCode"] == 200
    view = json.loads(answer["body"])
    assert view["runs"][0]["status"] == "SUCCEEDED"
    timeline = view["runs"][0]["timeline"]
    assert [step["step"] for step in timeline][:2] == ["queued", "extract"]
    # Attach's first write recorded the lines handed on (Generate's success makes no write of its own)
    assert in_event["message"] in [step.get("detail") for step in timeline]


def test_batch_starter_handler_with_its_event(stack):
    # the batch `make serve` hands to the starter for `sam local invoke`, the same way: the event is the step
    # hand_off gave the starter (its request kept, its progress begun), and no starter ran it
    batch_starter = RecordingStarter()
    handed = sam_local.seed_event_batch(batch_starter)
    event = load_event("start_batch.json")
    assert handed.step.model_dump(by_alias=True, exclude_none=True) == event
    assert batch_starter.started == [
        (starter_name(event["session"], event["digest"], event["attempt"]), event)
    ]

    # The step stores the runs and starts their execution, as the starter's first call would: one chunk.
    answer = _invoke(stack, "StartBatchFunction", event)
    assert answer | {"beganAtMs": 0} == event | {"nextChunk": 1, "done": True, "beganAtMs": 0}
    session, task_ids = event["session"], [task["taskId"] for task in sam_local.BATCH_TASKS]
    owner = creation_owner(session, task_ids)
    deps = wiring.start_batch_deps()
    stored = {t: (r.owner, r.chunk) if (r := deps.runs.get(session, t)) else None for t in task_ids}
    assert stored == dict.fromkeys(task_ids, (owner, task_ids))  # one chunk, its runs owned by its execution
    progress = [(b.digest, b.attempt, b.accepted, b.stored) for b in deps.batch_progress.of_session(session)]
    assert progress == [(event["digest"], 1, len(task_ids), len(task_ids))]  # the batch shows as stored
    sfn = stack.client("stepfunctions")
    executions = [
        e
        for page in sfn.get_paginator("list_executions").paginate(stateMachineArn=stack.state_machine_arn)
        for e in page["executions"]
        if e["name"].startswith(session_prefix(session))
    ]
    assert [e["name"] for e in executions] == [owner]
    arn = executions[0]["executionArn"]
    assert json.loads(sfn.describe_execution(executionArn=arn)["input"]) == {
        "session": session,
        "tasks": [{"taskId": task_id} for task_id in task_ids],
    }
    # and the execution runs them the usual way (waited for, so that none of it runs into the next test)
    ended = wait_for(
        lambda: (status := sfn.describe_execution(executionArn=arn)["status"]) != "RUNNING" and status,
        "the batch's execution ends",
    )
    assert ended == "SUCCEEDED"
    assert {deps.runs.get(session, t).status for t in task_ids} == {RunStatus.SUCCEEDED}


def test_record_failure_handler_with_its_event(stack):
    body = json.loads(load_event("api_post_plugin.json")["body"]) | {"session": "sess-event-failure"}
    deps = dataclasses.replace(wiring.api_deps(), starter=RecordingStarter())
    start_session(parse_payload(body), deps)
    queued = deps.runs.get("sess-event-failure", "task-fox")
    line = line_of(queued.org_id, not queued.workflow)
    assert _waiting_in_line(deps, line, queued.rate_ticket)  # the shared key's run joined when accepted

    event = load_event("record_failure.json") | {"session": "sess-event-failure"}
    assert _invoke(stack, "RecordFailureFunction", event) == {"status": "FAILED", "reason": "hub_unavailable"}
    run = deps.runs.get("sess-event-failure", "task-fox")
    assert run.failure.message.startswith("The hub answered 503")
    assert run.sealed_secrets is None  # secrets are purged when the run ends
    # and it left its line: the runs behind it move up now, not once it is skipped as abandoned
    assert not _waiting_in_line(deps, line, queued.rate_ticket)


def _waiting_in_line(deps, line: str, ticket: int) -> bool:
    table = load_settings(RateLimitSettings).rate_limit_table
    item = wiring.aws_client("dynamodb").get_item(TableName=table, Key={"pk": {"S": QUEUE_KEY}})
    waiting = deps.limiter.from_item(item.get("Item")).line(line)
    return waiting is not None and waiting.holds(ticket)


def test_api_handler_refuses_a_wrong_secret_before_doing_anything(stack):
    event = load_event("api_post_plugin.json")
    event["headers"]["Secret"] = "not-the-secret"
    body = json.loads(event["body"]) | {"session": "sess-event-unauthorized"}
    event["body"] = json.dumps(body)
    answer = _invoke(stack, "ApiFunction", event)
    assert answer["statusCode"] == 401
    assert wiring.api_deps().runs.get("sess-event-unauthorized", "task-fox") is None


def test_authorizer_handler_with_its_event(stack):
    event = load_event("authorizer.json")
    event["headers"]["Secret"] = PLUGIN_SECRET
    allowed = _invoke(stack, "AuthorizerFunction", event)
    assert allowed["policyDocument"]["Statement"] == [
        {
            "Action": "execute-api:Invoke",
            "Effect": "Allow",
            "Resource": "arn:aws:execute-api:us-east-1:123456789012:local/v1/*",
        }
    ]
    event["headers"]["Secret"] = PLUGIN_SECRET[:-1]
    assert _invoke(stack, "AuthorizerFunction", event)["policyDocument"]["Statement"][0]["Effect"] == "Deny"


def test_the_sam_local_env_file_gives_every_function_the_local_stacks_environment(stack, tmp_path):
    """`sam local invoke --env-vars` with the file `make serve` writes: every variable the template declares
    gets the value the stack's own functions run with (none is left as the logical id SAM would put there),
    so the handlers above, run here with the events/ files, run the same in SAM's container."""
    path = sam_local.write_env_file(stack, tmp_path / "env.json")
    env_file = json.loads(path.read_text())
    for lid, spec in stack.template.functions().items():
        as_sam_resolves_refs = {name: lid_or_value(value) for name, value in spec.environment.items()}
        env = sam_local.as_sam_local_gives_it(spec, as_sam_resolves_refs, env_file)
        assert env == {name: os.environ.get(name, "") for name in spec.environment}, lid
        assert env["SESSIONS_TABLE"] == stack.table_name("SessionsTable")
        assert env["AWS_ENDPOINT_URL"] and env["AWS_ENDPOINT_URL_DYNAMODB"], (
            "the container must reach the stack"
        )
        assert not set(env.values()) & set(stack.template.resources), f"{lid} keeps a logical id"


def lid_or_value(value):
    """What SAM puts in a variable: a !Ref to a resource becomes its logical id."""
    return value["Ref"] if isinstance(value, dict) and "Ref" in value else str(value)
