"""The fault suite: every fault the plugin promises to survive, driven on the local stack through the
OpenAI and hub emulators and by crashing handlers after their side effects, all cases side by side.

For each fault it observes the run's final state, the hub's view (attachments, task submissions, plugin
responses, error log lines), the OpenAI requests made, the global-limiter slots taken, and the canary scan
(the case's OpenAI key and Ango apiKey looked for everywhere the stack keeps anything). It rewrites
docs/reliability.md from what it observed, then fails if any row is not as expected.

One test on purpose: the cases share the stack's emulators and must run concurrently to stay fast, and the
table is written from all of them at once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import PLUGIN_SECRET, start_stack
from tests.faults.harness import (
    FAULT_ENVIRONMENT,
    HUB_TIMEOUT_S,
    OPENAI_TIMEOUT_S,
    Case,
    Seams,
    crash,
    installed,
    wait_until,
)
from tests.security import canary as canaries

pytestmark = pytest.mark.stack

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Cases driven side by side: enough to overlap every kind of fault, few enough that a 2-core machine
# under other load still answers each within its budget (concurrency is not what this suite tests).
CASES_AT_ONCE = 4
FINISHED = {"SUCCEEDED", "FAILED", "CANCELLED"}
LATE_EFFECT_S = 6.0  # the hub faults below stall this long, then apply the request anyway


@dataclass
class World:
    stack: Any
    api: Any
    seams: Seams

    def send(self, case: Case, payload: dict) -> requests.Response:
        answer = self.api.run(payload)
        try:
            body: Any = answer.json()
        except ValueError:
            body = answer.text
        case.answers.append((answer.status_code, body))
        return answer

    def run(self, case: Case, own_key: bool = True, workflow: bool = True, timeout_s: float = 600) -> dict:
        answer = self.send(case, case.payload(case.new_session(), own_key=own_key, workflow=workflow))
        assert answer.status_code == 202, answer.text
        return self.finished(case, timeout_s)

    def finished(self, case: Case, timeout_s: float = 600) -> dict:
        # a slow poll: 29 cases polling fast would load the stack more than the faults do
        return self.api.wait_finished(case.session, timeout_s=timeout_s, poll_s=1.0)["runs"][0]


@dataclass
class Fault:
    title: str
    expected: dict[str, Any]
    drive: Callable[[World, Case], dict]  # returns the extra observations this fault is about
    key: str = ""


def _run_plain(world: World, case: Case) -> dict:
    world.run(case)
    return {}


def _openai(kind: str, times: int | None = None, **options: Any) -> Callable[[World, Case], dict]:
    def drive(world: World, case: Case) -> dict:
        from local_stack.openai_emulator import Behaviour

        world.stack.openai.rule(case.marker, Behaviour(kind=kind, **options), times=times)
        world.run(case)
        return {}

    return drive


def _openai_default_key(kind: str, times: int | None, **options: Any) -> Callable[[World, Case], dict]:
    def drive(world: World, case: Case) -> dict:
        from local_stack.openai_emulator import Behaviour

        world.stack.openai.rule(case.marker, Behaviour(kind=kind, **options), times=times)
        world.run(case, own_key=False)
        return {}

    return drive


def _revoked_key(world: World, case: Case) -> dict:
    world.stack.openai.revoke_key(case.canary.openai_key)
    world.run(case)
    return {}


def _openai_slow_once(world: World, case: Case) -> dict:
    from local_stack.openai_emulator import Behaviour

    world.stack.openai.rule(case.marker, Behaviour(latency_s=8.0), times=1)  # past the client's 5 s timeout
    world.run(case)
    wait_until(lambda: _openai_requests(world, case) >= 2, 120)  # the slow one is logged when it answers
    return {}


def _hub_fault(
    prefix: Callable[[Case], str],
    status: int | None,
    times: int,
    latency_s: float = 0.0,
    method: str | None = None,
    body: bool = False,
    editor: bool = False,
) -> Callable[[World, Case], dict]:
    def drive(world: World, case: Case) -> dict:
        world.stack.hub.fail_next(
            prefix(case),
            status,
            times=times,
            latency_s=latency_s,
            method=method,
            body_contains=case.marker if body else None,
        )
        world.run(case, workflow=not editor)
        if latency_s:
            time.sleep(LATE_EFFECT_S)  # let the stalled request land, so the hub's view is final
        return {}

    return drive


def _hub_down_at_attach_then_rerun(world: World, case: Case) -> dict:
    hub = world.stack.hub
    hub.fail_next("/v2/attachments", 503, times=1000, body_contains=case.marker)
    first = world.run(case)
    first_session = case.session
    kept = _image_in_s3(world, first_session, case.task_id)
    hub.clear_faults(path_prefix="/v2/attachments", body_contains=case.marker)
    paid_before = _openai_requests(world, case)
    second = world.run(case)  # what a person does: run the plugin again, a new hub session
    return {
        "first run": _state(first),
        "image kept in S3": kept,
        "re-run paid": _openai_requests(world, case) - paid_before,
        "status": _state(second),
    }


def _crash_after_storing_png(world: World, case: Case) -> dict:
    from dalle_plugin.domain.errors import StorageUnavailable
    from dalle_plugin.domain.run import RunRef

    session = case.new_session()
    name = RunRef(session=session, task_id=case.task_id).execution_name
    world.seams.after_put_png[name] = StorageUnavailable("simulated: the run record could not be written")
    answer = world.send(case, case.payload(session))
    assert answer.status_code == 202, answer.text
    world.finished(case)
    return {}


def _killed_after_storing_png_then_rerun(world: World, case: Case) -> dict:
    from dalle_plugin.domain.run import RunRef

    session = case.new_session()
    world.seams.after_put_png[RunRef(session=session, task_id=case.task_id).execution_name] = crash()
    assert world.send(case, case.payload(session)).status_code == 202
    first = world.finished(case)
    second = world.run(case)  # a person runs the plugin again: a new hub session
    return {"first run": _state(first), "status": _state(second)}


def _crash_after_hub_attached(world: World, case: Case) -> dict:
    world.seams.after_attach[case.external_id] = crash()
    run = world.run(case)
    return {"says check the asset": "check the asset" in (run.get("failure") or {}).get("message", "")}


def _after_handler(function: str, failure: Callable[[], Exception]) -> Callable[[World, Case], dict]:
    def drive(world: World, case: Case) -> dict:
        session = case.new_session()

        world.seams.after_handler[(function, session)] = failure()
        answer = world.send(case, case.payload(session))
        assert answer.status_code == 202, answer.text
        world.finished(case)
        return {}

    return drive


def _storage_unavailable() -> Exception:
    from dalle_plugin.domain.errors import StorageUnavailable

    return StorageUnavailable("simulated: the step's last write failed")


def _api_dies(where: str) -> Callable[[World, Case], dict]:
    def drive(world: World, case: Case) -> dict:
        session = case.new_session()
        if where == "after start":
            world.seams.after_handler[("ApiFunction", session)] = crash()
        else:
            world.seams.before_start[session] = crash()
        payload = case.payload(session)
        first = world.send(case, payload)
        second = world.send(case, payload)  # the hub resends what got no answer
        world.finished(case)
        return {"answers": [first.status_code, second.status_code]}

    return drive


def _duplicates(count: int, at_once: bool) -> Callable[[World, Case], dict]:
    def drive(world: World, case: Case) -> dict:
        payload = case.payload(case.new_session())
        if at_once:
            barrier = threading.Barrier(count)

            def send() -> requests.Response:
                barrier.wait()
                return world.send(case, payload)

            with ThreadPoolExecutor(count) as pool:
                answers = [future.result() for future in [pool.submit(send) for _ in range(count)]]
        else:
            answers = [world.send(case, payload) for _ in range(count)]
        world.finished(case)
        bodies = [a.json() for a in answers]
        return {
            "answers": sorted({a.status_code for a in answers}),
            "same session": all(b["session"] == case.session for b in bodies),
            "requests that started it": sum(1 for b in bodies if not b["duplicate"]),
        }

    return drive


OK = {"status": "SUCCEEDED", "attachments": 1, "openai requests": 1}

FAULTS = [
    Fault("No fault (baseline)", {**OK, "task submissions": 1}, _run_plain),
    Fault(
        "OpenAI refuses the prompt (moderation_blocked)",
        {"status": "FAILED: moderation_blocked", "attachments": 0, "openai requests": 1, "hub told": True},
        _openai("moderation_blocked"),
    ),
    Fault(
        "OpenAI 401 invalid_api_key (the user's key is revoked)",
        {"status": "FAILED: invalid_api_key", "attachments": 0, "openai requests": 1, "hub told": True},
        _revoked_key,
    ),
    Fault(
        "OpenAI 403: key not entitled to the model",
        {"status": "FAILED: model_not_available", "openai requests": 1, "hub told": True},
        _openai("permission_denied"),
    ),
    Fault(
        "OpenAI 429 insufficient_quota (out of credit)",
        {"status": "FAILED: quota_exhausted", "openai requests": 1, "hub told": True},
        _openai("insufficient_quota"),
    ),
    Fault(
        "OpenAI 400 billing_hard_limit_reached",
        {"status": "FAILED: quota_exhausted", "openai requests": 1},
        _openai("billing_hard_limit"),
    ),
    Fault(
        "OpenAI 404 model_not_found (retired model)",
        {"status": "FAILED: model_not_available", "openai requests": 1},
        _openai("model_not_found"),
    ),
    Fault(
        "OpenAI 429 rate_limit_exceeded twice (retry-after 1 s)",
        {**OK, "openai requests": 3},
        _openai("rate_limited", times=2, retry_after_s=1.0),
    ),
    Fault(
        "OpenAI 429 rate_limit_exceeded on every request",
        {"status": "FAILED: openai_rate_limited", "attachments": 0, "openai requests": 5},
        _openai("rate_limited", retry_after_s=0.5),
    ),
    Fault(
        "OpenAI 500 once, shared key",
        {**OK, "openai requests": 2, "a new global slot for each request": True},
        _openai_default_key("server_error", times=1),
    ),
    Fault(
        "OpenAI 503 on every request, shared key",
        {
            "status": "FAILED: openai_unavailable",
            "attachments": 0,
            "openai requests": 4,
            "a new global slot for each request": True,
        },
        _openai_default_key("server_error", times=None, status=503),
    ),
    Fault("OpenAI answers after the client's timeout once", {**OK, "openai requests": 2}, _openai_slow_once),
    Fault("Hub 503 once on GET /v2/task", OK, _hub_fault(lambda c: f"/v2/task/{c.task_id}", 503, 1)),
    Fault(
        "Hub stays down (503) on GET /v2/task",
        {"status": "FAILED: hub_unavailable", "attachments": 0, "openai requests": 0},
        _hub_fault(lambda c: f"/v2/task/{c.task_id}", 503, 1000),
    ),
    Fault(
        "Hub times out once on GET /v2/task",
        OK,
        _hub_fault(lambda c: f"/v2/task/{c.task_id}", None, 1, latency_s=LATE_EFFECT_S),
    ),
    Fault(
        "Hub 503 twice on POST /v2/attachments",
        {**OK, "attach requests": 3},
        _hub_fault(lambda c: "/v2/attachments", 503, 2, body=True),
    ),
    Fault(
        "Hub stays down on POST /v2/attachments; then the plugin is run again",
        {
            "first run": "FAILED: hub_unavailable",
            "image kept in S3": True,
            "status": "SUCCEEDED",
            "re-run paid": 0,
            "openai requests": 1,
            "attachments": 1,
        },
        _hub_down_at_attach_then_rerun,
    ),
    Fault(
        "Hub applies POST /v2/attachments but answers after the client's timeout",
        {
            "status": "FAILED: hub_outcome_unknown",
            "attachments": 1,
            "attach requests": 1,
            "openai requests": 1,
        },
        _hub_fault(lambda c: "/v2/attachments", None, 1, latency_s=LATE_EFFECT_S, body=True),
    ),
    Fault(
        "Hub applies the task submission (annotate) but answers after the client's timeout",
        {"status": "FAILED: hub_outcome_unknown", "attachments": 1, "task submissions": 1},
        _hub_fault(lambda c: f"/v2/annotate/{c.task_id}", None, 1, latency_s=LATE_EFFECT_S),
    ),
    Fault(
        "Hub 503 once on POST /v2/pluginResponse (editor run)",
        {**OK, "plugin responses": 1},
        _hub_fault(lambda c: "/v2/pluginResponse", 503, 1, body=True, editor=True),
    ),
    Fault(
        "Generate fails after storing the PNG, before recording it",
        {**OK, "openai requests": 1},
        _crash_after_storing_png,
    ),
    Fault(
        "Generate dies (process killed) after storing the PNG, before recording it; then run again",
        {
            "first run": "FAILED: internal_error",
            "status": "SUCCEEDED",
            "openai requests": 1,
            "attachments": 1,
        },
        _killed_after_storing_png_then_rerun,
    ),
    Fault(
        "Attach dies (process killed) after the hub took the attachment, before recording it",
        {"status": "FAILED: internal_error", "attachments": 1, "says check the asset": True},
        _crash_after_hub_attached,
    ),
    Fault(
        "Extract fails after its work is recorded (StorageUnavailable, retried)",
        OK,
        _after_handler("ExtractFunction", _storage_unavailable),
    ),
    Fault(
        "Generate fails after its work is recorded (StorageUnavailable, retried)",
        OK,
        _after_handler("GenerateFunction", _storage_unavailable),
    ),
    Fault(
        "Attach dies (process killed) after the run finished",
        {**OK, "task submissions": 1},
        _after_handler("AttachFunction", crash),
    ),
    Fault(
        "API dies after starting the run; the hub resends",
        {**OK, "answers": [502, 202], "executions": 1},
        _api_dies("after start"),
    ),
    Fault(
        "API dies after storing the run, before starting it; the hub resends",
        {**OK, "answers": [502, 202], "executions": 1},
        _api_dies("before start"),
    ),
    Fault(
        "The same request twice",
        {**OK, "answers": [202], "same session": True, "requests that started it": 1, "executions": 1},
        _duplicates(2, at_once=False),
    ),
    Fault(
        "The same request ten times at once",
        {**OK, "answers": [202], "same session": True, "executions": 1},
        _duplicates(10, at_once=True),
    ),
]


# ---- observations ----------------------------------------------------------------------------------


def _state(run: dict) -> str:
    failure = run.get("failure")
    return f"{run['status']}: {failure['reason']}" if failure else run["status"]


def _openai_requests(world: World, case: Case) -> int:
    return sum(
        1 for r in world.stack.openai.requests if r.is_generation and r.prompt and case.marker in r.prompt
    )


def _image_in_s3(world: World, session: str, task_id: str) -> bool:
    from dalle_plugin import wiring

    run = wiring.api_deps().runs.get(session, task_id)
    return bool(run and run.image and wiring.api_deps().images.get(run.image.key))


def _executions(world: World, case: Case) -> int:
    sfn = world.stack.client("stepfunctions")
    names = []
    for page in sfn.get_paginator("list_executions").paginate(stateMachineArn=world.stack.state_machine_arn):
        names += [e["name"] for e in page["executions"]]
    return sum(1 for name in names for session in case.sessions if name.startswith(f"{session}_"))


def observe(world: World, case: Case, extra: dict) -> dict[str, Any]:
    from dalle_plugin.domain.run import RunRef

    hub = world.stack.hub
    view = world.api.session(case.session)
    observed: dict[str, Any] = {"status": _state(view["runs"][0]) if view else "no session"}
    observed["attachments"] = len(hub.attachments(case.external_id))
    observed["attach requests"] = sum(
        1
        for r in hub.requests
        if r["path"] == "/v2/attachments" and case.external_id in json.dumps(r.get("body"))
    )
    observed["task submissions"] = len(hub.annotations(case.task_id))
    observed["plugin responses"] = sum(len(hub.plugin_responses(s)) for s in case.sessions)
    errors = [line for s in case.sessions for line in hub.plugin_logs(s) if line.get("level") == "ERROR"]
    responses = [r for s in case.sessions for r in hub.plugin_responses(s)]
    observed["hub told"] = bool(errors) or any(r.get("error") for r in responses)
    observed["openai requests"] = _openai_requests(world, case)
    # A slot is booked per attempt (ticket "<run>#<attempt>"); a run that woke late books again, so there
    # may be more bookings than requests, never fewer.
    tickets = {
        t
        for s in case.sessions
        for t in world.seams.tickets.get(RunRef(session=s, task_id=case.task_id).execution_name, [])
    }
    observed["global slots booked"] = len(tickets)
    observed["a new global slot for each request"] = 0 < observed["openai requests"] <= len(tickets)
    observed["executions"] = _executions(world, case)
    observed.update(extra)
    return observed


# ---- the table ---------------------------------------------------------------------------------------


def _show(values: dict[str, Any]) -> str:
    return "; ".join(f"{name} {value}" for name, value in values.items())


def write_table(rows: list[tuple[Fault, dict[str, Any], bool]], seconds: float, profile: str) -> Path:
    lines = [
        "# Reliability: faults tried and what was observed",
        "",
        "Regenerated by `make reliability` (the fault suite of `make test` on the local stack's `hostile`",
        "profile: Wait states seconds late, clock offsets of +-500 ms, a cold start on every invoke, a share of",
        "Lambda results lost after the work) from what the local stack did; do not edit by hand. Each fault",
        f"ran on its own hub task and session, {CASES_AT_ONCE} at a time, with the local stack's 1 s retry intervals",
        (
            f"and, for the suite, a {HUB_TIMEOUT_S} s hub timeout and a "
            f"{OPENAI_TIMEOUT_S} s OpenAI timeout (the stalls below last {LATE_EFFECT_S:g} s and 8 s)."
        ),
        "*Observed* lists what the row promises, read back from the hub emulator (attachments, task",
        "submissions, plugin responses, error log lines), the OpenAI emulator (requests with the case's prompt),",
        "the global limiter (slots taken), Step Functions (executions) and the session (`GET /sessions/{id}`).",
        "*canary hits* counts places where the case's OpenAI key or Ango apiKey (as sent, its random core, or",
        "base64 at any alignment) was found: every CloudWatch log event, every execution's input, output and",
        "history, every DynamoDB item, every S3 object and its metadata, the emulators' records, the API's",
        "answers, and the log records of the test process itself.",
        "",
        (
            f"{len(rows)} faults, {sum(ok for _, _, ok in rows)} as expected on the `{profile}` profile; "
            f"the suite took {seconds:.0f} s."
        ),
        "",
        "| Fault | Expected | Observed | As expected |",
        "|---|---|---|---|",
    ]
    for fault, observed, ok in rows:
        shown = {name: observed.get(name) for name in fault.expected} | {
            "canary hits": observed["canary hits"]
        }
        expected = _show(fault.expected | {"canary hits": 0})
        lines.append(f"| {fault.title} | {expected} | {_show(shown)} | {'yes' if ok else '**NO**'} |")
    lines += [
        "",
        "## How the promises are kept",
        "",
        "- **A duplicate never starts twice.** The run record is created with a conditional write and the",
        "  execution name is derived from the session and its tasks, so every copy of a request starts the same",
        "  execution at most once; a request that died between the two is healed by the hub's resend.",
        "- **An image is never paid for twice.** It is stored in S3 under a key derived from the run before the",
        "  run records it, and a retried Generate adopts what it finds there. A run that ends without delivering",
        "  its image offers it (by task, prompt, model, size and quality) to the next run of the same task, so a",
        "  re-run in a new hub session takes it instead of paying again; a delivered image is never offered.",
        "- **An attachment (or a task submission) is never made twice.** Before `POST /v2/attachments` or",
        "  `POST /v2/annotate` the run notes that it is sending; the hub client resends those calls only when",
        "  the hub surely did not act (no connection, or a 500/503 answer). When it may have (a read timeout,",
        "  a dropped connection, a 502/504), or a retried step finds the note without a confirmation, the run",
        "  stops with `hub_outcome_unknown` and says what to check, instead of risking a second attachment.",
        "- **Every run ends readable.** Named errors are retried by the state machine (hub, storage and OpenAI",
        "  outages with backoff; a 429 waits the time OpenAI asks, at most 5 times in a row); the rest fail the",
        "  run at once with a message a person can act on. Record Failure never turns a finished run into a",
        "  failure, and any exception that is not the plugin's own is shown only by its name.",
        "",
        "## Residual risks",
        "",
        "- The hub offers no call to list an asset's attachments, so an attachment whose answer was lost cannot",
        "  be confirmed: the run fails with `hub_outcome_unknown` although the hub most likely has it. The message",
        "  names the image link; a re-run in the same session sends it again (the person checked first).",
        "- A Lambda that dies between an outside call and the write that records it (a few milliseconds) leaves",
        "  the same uncertainty at the hub. The state machine does not retry `Runtime.ExitError` or",
        "  `Sandbox.Timedout`, so such a run ends FAILED (`internal_error`); a PNG it had stored is offered to",
        "  the re-run. Dying between OpenAI's answer and the S3 write loses an image that was billed.",
        "- An OpenAI timeout or 5xx is retried with a new request: if OpenAI had in fact generated (and billed)",
        "  the image, that one is lost. OpenAI offers no idempotency key for image generation.",
        "- Two different hub sessions for the same task running at the same moment each pay for an image: the",
        "  reuse covers re-runs after a failure, not parallel runs the hub was asked for.",
        "- Asset downloads connect to the address the URL guard vetted (DNS pinning) and follow at most 3",
        "  redirects, each checked again. The hub's presigned upload URL is checked the same way. The hub API",
        "  and OpenAI base URLs are deployment settings and are trusted.",
        "",
    ]
    # make test writes the table beside the stack's other local files; make reliability into docs/
    target = (
        Path(os.environ["RELIABILITY_DOC"])
        if os.environ.get("RELIABILITY_DOC") and profile == "hostile"
        else PROJECT_ROOT / ".local" / f"reliability-{profile}.md"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines))
    return target


@pytest.fixture(scope="module", params=["aws", pytest.param("hostile", marks=pytest.mark.hostile)])
def fault_stack(request):
    """A stack of the suite's own per profile: its functions run with the suite's short timeouts."""
    with start_stack(f"dalle-faults-{request.param}", request.param, FAULT_ENVIRONMENT) as running:
        running.hub.load_samples()
        yield running


@pytest.mark.own_stack
@pytest.mark.timeout(2400)
def test_every_fault_ends_as_promised(fault_stack, caplog, capsys):
    from local_stack.runner import PluginApi

    stack = fault_stack
    api = PluginApi(stack.api_url, PLUGIN_SECRET)
    stack.openai.reset()
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="dalle_plugin")
    started = time.monotonic()
    cases = [Case.new(f"fault-{index}") for index in range(len(FAULTS))]
    for case in cases:
        case.seed(stack.hub)
    try:
        with installed(stack) as seams:
            world = World(stack, api, seams)
            with ThreadPoolExecutor(CASES_AT_ONCE) as pool:
                futures = [
                    pool.submit(fault.drive, world, case) for fault, case in zip(FAULTS, cases, strict=True)
                ]
                extras = []
                for future in futures:
                    try:
                        extras.append(future.result())
                    except Exception as exc:  # noqa: BLE001 - a broken case is a row that is not as expected
                        extras.append({"status": f"driver error: {type(exc).__name__}: {exc}"[:300]})
            observed = [observe(world, case, extra) for case, extra in zip(cases, extras, strict=True)]
    finally:
        stack.hub.clear_faults()

    api_answers = [(f"api:{case.key}", case.answers) for case in cases]
    captured = capsys.readouterr()
    logged = [
        ("python-logging", "\n".join(f"{r.name} {r.getMessage()} {r.__dict__}" for r in caplog.records)),
        ("stdout", captured.out),
        ("stderr", captured.err),
    ]
    corpus = canaries.collect(stack, api_answers + logged)
    rows = []
    for fault, case, seen in zip(FAULTS, cases, observed, strict=True):
        seen["canary hits"] = sum(len(corpus.hits(secret)) for secret in case.canary.values)
        ok = seen["canary hits"] == 0 and all(
            seen.get(name) == value for name, value in fault.expected.items()
        )
        rows.append((fault, seen, ok))
    table = write_table(rows, time.monotonic() - started, stack.profile.name)

    wrong = [
        f"{fault.title}: expected {_show(fault.expected)}; observed {_show(seen)}"
        for fault, seen, ok in rows
        if not ok
    ]
    api_failures = [line for line in captured.err.splitlines() if line.startswith("[api]")]
    assert not wrong, "\n".join([f"(table: {table})", *wrong, *api_failures])
    assert len(corpus) > 100  # the scan really read the stack
