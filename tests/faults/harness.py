"""What the fault suite needs around the local stack: one isolated case per fault (its own hub task, asset,
prompt marker, session and canary keys, so cases run side by side without seeing each other), the seams
that inject faults (the emulators' scripts, crashes after a handler's side effects), and what is observed.

Crashes are injected where the handlers run, inside their execution environments (``tests.env_hooks``):
after a handler returned, all its side effects done, and around an adapter's method (after the outside
system took the call, before the step recorded it). The test arms them on the stack's seam board; each
seam dispatches by the case's own ids.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from local_stack.seams import HANG, SeamBoard, exception_spec
from tests.security.canary import Canary

PROJECT = "proj-dalle-demo"
PROMPT_CLASS = "cls-desc"
HUB_TIMEOUT_S = "3"  # the suite's hub faults stall 6 s: past this, well short of the default 10 s
OPENAI_TIMEOUT_S = "5"
SECRET_MAX_AGE_S = "3"  # a rotated Secret or key reaches warm environments this soon (deployed: 120 s)
# What the fault suite's stack sets on every function.
FAULT_ENVIRONMENT = {
    "HUB_TIMEOUT_S": HUB_TIMEOUT_S,
    "OPENAI_TIMEOUT_S": OPENAI_TIMEOUT_S,
    "SECRET_MAX_AGE_S": SECRET_MAX_AGE_S,
}


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
    siblings: list[Case] = field(default_factory=list)  # the other tasks of a batch this case sends
    edits: int = 0  # times the prompt was edited on the hub

    @classmethod
    def new(cls, key: str) -> Case:
        marker = f"fault{secrets.token_hex(5)}"
        return cls(
            key=key,
            marker=marker,
            task_id=f"task-{marker}",
            asset_id=f"asset-{marker}",
            external_id=f"{marker}.txt",
        )

    def new_session(self) -> str:
        session = f"{self.marker}-s{len(self.sessions)}"
        self.sessions.append(session)
        return session

    @property
    def session(self) -> str:
        return self.sessions[-1]

    @property
    def prompt(self) -> str:
        edited = f", edit {self.edits}" if self.edits else ""
        return f"A lighthouse on a cliff in a storm, painted in oils ({self.marker}{edited})"

    def batch_of(self, count: int, hub: Any) -> list[Case]:
        """This case and ``count - 1`` more tasks of its own, seeded: one batch (``batch_payload``)."""
        self.siblings = [Case.new(f"{self.key}-task{index}") for index in range(1, count)]
        for sibling in self.siblings:
            sibling.canary = self.canary  # one hub user runs the whole batch
            sibling.seed(hub)
        return [self, *self.siblings]

    def batch_payload(self, session: str) -> dict[str, Any]:
        payload = self.payload(session)
        del payload["taskId"], payload["assetId"]
        payload["tasks"] = [{"taskId": c.task_id, "assetId": c.asset_id} for c in [self, *self.siblings]]
        return payload

    def seed(self, hub: Any) -> None:
        hub.add_asset(PROJECT, self.asset_id, self.external_id, self.external_id, b"A short story.\n")
        answer = {
            "classifications": [
                {
                    "schemaId": PROMPT_CLASS,
                    "tool": "text",
                    "title": "Image description",
                    "answer": self.prompt,
                    "classifications": [],
                }
            ]
        }
        hub.add_task(PROJECT, self.task_id, self.asset_id, answer)
        hub.add_api_key(self.canary.ango_key)

    def payload(self, session: str, own_key: bool = True, workflow: bool = True) -> dict[str, Any]:
        config = {
            "openai_api_key": self.canary.openai_key if own_key else "default",
            "model_name": "gpt-image-2",
            "get_prompt_from": "text-annotation",
            "image_size": "1024x1024",
        }
        payload = {
            "projectId": PROJECT,
            "taskId": self.task_id,
            "assetId": self.asset_id,
            "categorySchema": [{"schemaId": PROMPT_CLASS, "modelClass": "Prompt"}],
            "configJSON": json.dumps(config),
            "apiKey": self.canary.ango_key,
            "orgId": "org-faults",
            "runBy": "user-faults",
            "session": session,
        }
        if workflow:
            payload["workflow"] = True
        return payload


class Hang:
    """Armed instead of an exception: the environment that takes it never returns, and the runtime kills it
    at the function's Timeout (``Sandbox.Timedout``)."""


class _Armed:
    """``table[key] = exception``: armed on the seam board, raised once by the environment that gets there
    (``Hang()``: it hangs there instead)."""

    def __init__(self, board: SeamBoard, table: str, key_of: Callable[[Any], str] = str):
        self._board, self._table, self._key_of = board, table, key_of

    def __setitem__(self, key: Any, failure: Exception | Hang) -> None:
        spec = HANG if isinstance(failure, Hang) else exception_spec(failure)
        self._board.arm(self._table, self._key_of(key), spec)

    def taken(self, key: Any) -> bool:
        """Whether an environment has reached the seam armed for ``key`` (and took its fault)."""
        return not self._board.armed(self._table, self._key_of(key))


class Seams:
    """Per-case fault hooks at the points where a step has done something outside and not yet recorded it.
    They fire inside the Lambda execution environments (``tests.env_hooks``), keyed by the case's own ids."""

    def __init__(self, board: SeamBoard) -> None:
        self._board = board
        self.after_handler = _Armed(
            board, "after_handler", lambda key: f"{key[0]}|{key[1]}"
        )  # (function, session)
        # (function, session) -> raise once (or hang) as the handler is invoked, before it does anything
        self.before_handler = _Armed(board, "before_handler", lambda key: f"{key[0]}|{key[1]}")
        self.after_put_png = _Armed(board, "after_put_png")  # execution name -> raise once after storing
        self.after_attach = _Armed(board, "after_attach")  # asset externalId -> raise once after attaching
        self.before_start = _Armed(board, "before_start")  # session -> raise once before StartExecution
        self.before_run_start = _Armed(board, "before_run_start")  # the same, for a chunk's run execution

    @property
    def tickets(self) -> dict[str, list[str]]:
        """Execution name -> the rate-limiter tickets its steps used."""
        return self._board.records("tickets")

    def clear(self) -> None:
        for table in (
            "before_handler",
            "after_handler",
            "after_put_png",
            "after_attach",
            "before_start",
            "before_run_start",
            "tickets",
        ):
            self._board.disarm(table)


@contextmanager
def installed(stack: Any) -> Iterator[Seams]:
    """The seams, for the suite's duration (the stack's functions already run with the suite's short hub and
    OpenAI timeouts: ``FAULT_ENVIRONMENT``)."""
    seams = Seams(stack.seams)
    seams.clear()
    try:
        yield seams
    finally:
        seams.clear()


def wait_until(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()
