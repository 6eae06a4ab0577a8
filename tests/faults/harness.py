"""What the fault suite needs around the local stack: one isolated case per fault (its own hub task, asset,
prompt marker, session and canary keys, so cases run side by side without seeing each other), the seams
that inject faults (the emulators' scripts, crashes after a handler's side effects), and what is observed.

Crashes are injected in-process, where the handlers run: ``after_hooks`` of the local Lambda runtime
(after a handler returned, all its side effects done) and wrappers around an adapter's method (after the
outside system took the call, before the step recorded it). Each seam dispatches by the case's own ids.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from tests.security.canary import Canary

PROJECT = "proj-dalle-demo"
PROMPT_CLASS = "cls-desc"
HUB_TIMEOUT_S = "3"  # the suite's hub faults stall 6 s: past this, well short of the default 10 s
OPENAI_TIMEOUT_S = "5"


def crash(name: str = "Runtime.ExitError", message: str = "simulated: the process died") -> Exception:
    """An exception the Lambda runtime reports under ``name``, as AWS names a process that died."""
    return type(name, (Exception,), {})(message)


@dataclass
class Case:
    """One fault's own world: a hub task whose text-annotation prompt carries ``marker``."""

    key: str
    marker: str
    task_id: str
    asset_id: str
    external_id: str
    canary: Canary = field(default_factory=Canary.new)
    sessions: list[str] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)  # every API answer (status, body) the case got

    @classmethod
    def new(cls, key: str) -> "Case":
        marker = f"fault{secrets.token_hex(5)}"
        return cls(key=key, marker=marker, task_id=f"task-{marker}", asset_id=f"asset-{marker}",
                   external_id=f"{marker}.txt")

    def new_session(self) -> str:
        session = f"{self.marker}-s{len(self.sessions)}"
        self.sessions.append(session)
        return session

    @property
    def session(self) -> str:
        return self.sessions[-1]

    @property
    def prompt(self) -> str:
        return f"A lighthouse on a cliff in a storm, painted in oils ({self.marker})"

    def seed(self, hub: Any) -> None:
        hub.add_asset(PROJECT, self.asset_id, self.external_id, self.external_id, b"A short story.\n")
        answer = {"classifications": [{"schemaId": PROMPT_CLASS, "tool": "text", "title": "Image description",
                                       "answer": self.prompt, "classifications": []}]}
        hub.add_task(PROJECT, self.task_id, self.asset_id, answer)
        hub.api_keys.add(self.canary.ango_key)

    def payload(self, session: str, own_key: bool = True, workflow: bool = True) -> dict[str, Any]:
        config = {"openai_api_key": self.canary.openai_key if own_key else "default",
                  "model_name": "gpt-image-2", "get_prompt_from": "text-annotation", "image_size": "1024x1024"}
        payload = {
            "projectId": PROJECT, "taskId": self.task_id, "assetId": self.asset_id,
            "categorySchema": [{"schemaId": PROMPT_CLASS, "modelClass": "Prompt"}],
            "configJSON": json.dumps(config), "apiKey": self.canary.ango_key,
            "orgId": "org-faults", "runBy": "user-faults", "session": session,
        }
        if workflow:
            payload["workflow"] = True
        return payload


class Seams:
    """Per-case fault hooks at the points where a step has done something outside and not yet recorded it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.after_handler: dict[tuple[str, str], Callable[[dict, Any], None]] = {}  # (function, session)
        self.after_put_png: dict[str, Exception] = {}        # execution name -> raise once after storing
        self.after_attach: dict[str, Exception] = {}         # asset externalId -> raise once after attaching
        self.before_start: dict[str, Exception] = {}         # session -> raise once before StartExecution
        self.tickets: dict[str, list[str]] = defaultdict(list)  # execution name -> rate-limiter tickets

    def take(self, table: dict[str, Exception], key: str) -> Exception | None:
        with self._lock:
            return table.pop(key, None)


def _session_of(event: dict) -> str | None:
    if "session" in event:
        return event["session"]
    try:  # an API Gateway event: the hub payload is the body
        return json.loads(event.get("body") or "{}").get("session")
    except (ValueError, AttributeError):
        return None


@contextmanager
def installed(stack: Any) -> Iterator[Seams]:
    """Short hub and OpenAI timeouts (fresh settings and clients), and the seams, for the suite's duration."""
    from dalle_plugin import settings, wiring
    from dalle_plugin.adapters import aws, dynamo_rate_limiter, hub_http

    seams = Seams()
    saved_env = {name: os.environ.get(name) for name in ("HUB_TIMEOUT_S", "OPENAI_TIMEOUT_S")}
    os.environ.update(HUB_TIMEOUT_S=HUB_TIMEOUT_S, OPENAI_TIMEOUT_S=OPENAI_TIMEOUT_S)

    def clear_caches() -> None:
        settings.load_settings.cache_clear()
        for value in vars(wiring).values():
            if hasattr(value, "cache_clear"):
                value.cache_clear()

    clear_caches()
    originals = {
        (aws.S3ImageStore, "put_png"): aws.S3ImageStore.put_png,
        (hub_http.AngoHubClient, "attach_image"): hub_http.AngoHubClient.attach_image,
        (aws.StepFunctionsStarter, "start"): aws.StepFunctionsStarter.start,
        (dynamo_rate_limiter.DynamoRateLimiter, "acquire"): dynamo_rate_limiter.DynamoRateLimiter.acquire,
    }

    def put_png(self, key, body, metadata):  # noqa: ANN001
        stored = originals[(aws.S3ImageStore, "put_png")](self, key, body, metadata)
        failure = seams.take(seams.after_put_png, key.removeprefix("images/").removesuffix(".png"))
        if failure:
            raise failure
        return stored

    def attach_image(self, project_id, external_id, image_url):  # noqa: ANN001
        originals[(hub_http.AngoHubClient, "attach_image")](self, project_id, external_id, image_url)
        failure = seams.take(seams.after_attach, external_id)
        if failure:
            raise failure

    def start(self, name, run_input):  # noqa: ANN001
        failure = seams.take(seams.before_start, run_input.get("session", ""))
        if failure:
            raise failure
        return originals[(aws.StepFunctionsStarter, "start")](self, name, run_input)

    def acquire(self, ask):  # noqa: ANN001
        with seams._lock:
            seams.tickets[ask.ticket.rsplit("#", 1)[0]].append(ask.ticket)
        return originals[(dynamo_rate_limiter.DynamoRateLimiter, "acquire")](self, ask)

    replacements = {"put_png": put_png, "attach_image": attach_image, "start": start, "acquire": acquire}
    for (owner, name) in originals:
        setattr(owner, name, replacements[name])

    saved_hooks = dict(stack.lambdas.after_hooks)

    def hook_for(function: str) -> Callable[[dict, Any], None]:
        def hook(event: dict, result: Any) -> None:
            with seams._lock:
                action = seams.after_handler.pop((function, _session_of(event) or ""), None)
            if action:
                action(event, result)
        return hook

    for function in ("ApiFunction", "ExtractFunction", "GenerateFunction", "AttachFunction"):
        stack.lambdas.after_hooks[function] = hook_for(function)
    try:
        yield seams
    finally:
        stack.lambdas.after_hooks.clear()
        stack.lambdas.after_hooks.update(saved_hooks)
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        clear_caches()


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()
