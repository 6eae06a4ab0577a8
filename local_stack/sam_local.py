"""What ``sam local invoke`` needs to run a function against ``make serve``: an ``--env-vars`` file holding
the running stack's values, and the session that the ``events/`` files name.

SAM resolves a function's ``!Ref`` variables to logical ids and overrides only the variables the template
declares, so the file gives every declared variable of every function its local value (the AWS endpoints
included: template.yaml declares them empty for this). The step events name session ``sess-event-0001``,
task ``task-fox``; ``seed_event_session`` starts that run without an execution, so each step can be invoked
by hand, in the order the state machine would. ``events/start_batch.json`` names a batch of its own
(session ``sess-event-batch``), which ``seed_event_batch`` hands to the batch starter without starting it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from local_stack.template import PROJECT_ROOT, FunctionSpec

if TYPE_CHECKING:
    from local_stack.stack import LocalStack

EVENTS_DIR = PROJECT_ROOT / "events"
ENV_FILE = PROJECT_ROOT / ".local" / "sam-local-env.json"


class _NoExecution:
    """A starter that starts nothing: the seeded run waits for its steps to be invoked by hand."""

    def start(self, name: str, run_input: dict[str, Any]) -> str:
        return f"arn:aws:states:us-east-1:123456789012:execution:sam-local:{name}"

    def stop(self, execution_arn: str, cause: str) -> None:
        pass


#: the batch of ``events/start_batch.json``: the bundled samples' tasks that have a Prompt entity (what the
#: event's Config JSON reads), in a session of its own so that storing it leaves sess-event-0001's run alone
BATCH_SESSION = "sess-event-batch"
BATCH_TASKS = [
    {"taskId": "task-cafe", "assetId": "asset-cafe"},
    {"taskId": "task-fox", "assetId": "asset-fox"},
    {"taskId": "task-lighthouse", "assetId": "asset-lighthouse"},
]


def _api_event_body() -> dict[str, Any]:
    """The hub payload of ``events/api_post_plugin.json``: what every seeded request is made from."""
    body: dict[str, Any] = json.loads(json.loads((EVENTS_DIR / "api_post_plugin.json").read_text())["body"])
    return body


def seed_event_session(stack: LocalStack, starter: Any = None) -> Any:
    """Starts the run of ``events/api_post_plugin.json`` (session sess-event-0001, task task-fox), its asset
    served by the hub emulator. The same session sent again changes nothing."""
    from dalle_plugin import wiring
    from dalle_plugin.domain.payload import parse_payload
    from dalle_plugin.domain.steps.start import start_session

    body = _api_event_body()
    body["dataURL"] = f"{stack.hub.base_url}/files/proj-dalle-demo/fox-in-snow.txt"
    deps = dataclasses.replace(wiring.api_deps(), starter=starter or _NoExecution())
    return start_session(parse_payload(body), deps)


def seed_event_batch(batch_starter: Any = None) -> Any:
    """Hands the batch of ``events/start_batch.json`` to the batch starter as the API hands a large one
    (``hand_off``: the accepted request kept in the bucket, its progress begun), without starting the
    starter: invoking StartBatchFunction with the event then stores its runs and starts their execution.
    The API hands on only batches of more than one chunk (``TASKS_PER_EXECUTION``, 100); this one is a
    chunk of three of the samples' tasks, so the step is quick to invoke and its execution quick to run. The
    tasks carry no data URL (the hub's batch listing gives none), so the step's digest does not depend on
    the emulator's port."""
    from dalle_plugin import wiring
    from dalle_plugin.domain.payload import parse_payload
    from dalle_plugin.domain.steps.batch_start import hand_off
    from dalle_plugin.domain.steps.start import accept_request

    single = ("taskId", "assetId", "dataURL")
    body = {key: value for key, value in _api_event_body().items() if key not in single}
    body |= {"session": BATCH_SESSION, "tasks": BATCH_TASKS}
    deps = dataclasses.replace(wiring.api_deps(), batch_starter=batch_starter or _NoExecution())
    return hand_off(accept_request(parse_payload(body), deps), deps)


def env_vars(stack: LocalStack) -> dict[str, dict[str, str]]:
    """Per function (logical id): each variable the template declares for it, with the value the local
    stack's own in-process functions run with."""
    return {
        lid: {name: os.environ.get(name, "") for name in spec.environment}
        for lid, spec in stack.template.functions().items()
    }


def write_env_file(stack: LocalStack, path: Path = ENV_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(env_vars(stack), indent=2) + "\n")
    return path


def as_sam_local_gives_it(
    spec: FunctionSpec, template_values: dict[str, str], env_file: dict[str, dict[str, str]]
) -> dict[str, str]:
    """The environment ``sam local invoke <function> --env-vars <file>`` gives the function: the template's
    declared variables (``template_values``, with ``!Ref`` as SAM resolves it), each overridden by the file's
    ``Parameters`` section, then by the function's own section; a variable the template does not declare
    is never passed."""
    env = {name: template_values.get(name, "") for name in spec.environment}
    for section in (env_file.get("Parameters", {}), env_file.get(spec.logical_id, {})):
        env.update({name: value for name, value in section.items() if name in env})
    return env
