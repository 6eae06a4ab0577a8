"""A board that tests and Lambda execution environments share across processes: faults armed by a test,
taken once by whichever environment reaches the seam first, and records an environment leaves behind.

The handlers run in processes of their own (``local_stack.lambda_runtime``), so a test cannot patch a
class and expect a handler to see it. Instead the stack starts every environment with the test's hook
modules (``StackOptions.hook_modules``), which wrap the seams inside the environment and consult this
board, a directory named by ``$LOCAL_SEAMS_DIR``. Taking a fault is an atomic rename, so exactly one
environment takes it however many race for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

SEAMS_DIR_VARIABLE = "LOCAL_SEAMS_DIR"


def _slug(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class SeamBoard:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def from_environment(cls) -> SeamBoard | None:
        root = os.environ.get(SEAMS_DIR_VARIABLE)
        return cls(root) if root else None

    def _dir(self, table: str) -> Path:
        path = self.root / table
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ---- faults: armed by a test, taken once ------------------------------------------------------

    def arm(self, table: str, key: str, value: Any) -> None:
        target = self._dir(table) / _slug(key)
        staging = target.with_suffix(f".{uuid.uuid4().hex}.tmp")
        staging.write_text(json.dumps(value))
        staging.rename(target)

    def take(self, table: str, key: str) -> Any | None:
        """The value armed for ``key``, once: ``None`` to every other caller."""
        source = self.root / table / _slug(key)
        claimed = source.with_suffix(f".taken.{uuid.uuid4().hex}")
        try:
            source.rename(claimed)
        except FileNotFoundError:
            return None
        value = json.loads(claimed.read_text())
        claimed.unlink()
        return value

    def armed(self, table: str, key: str) -> bool:
        """Whether the fault armed for ``key`` is still there, not yet taken."""
        return (self.root / table / _slug(key)).exists()

    def disarm(self, table: str) -> None:
        for path in (self.root / table).glob("*"):
            path.unlink(missing_ok=True)

    # ---- records: appended by environments, read by the test --------------------------------------

    def record(self, table: str, key: str, value: Any) -> None:
        line = json.dumps({"key": key, "value": value}) + "\n"
        with open(self._dir(table) / "records.jsonl", "a") as out:  # one short append: atomic enough
            out.write(line)

    def records(self, table: str) -> dict[str, list[Any]]:
        found: dict[str, list[Any]] = {}
        path = self.root / table / "records.jsonl"
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    entry = json.loads(line)
                    found.setdefault(entry["key"], []).append(entry["value"])
        return found


def exception_spec(exc: BaseException) -> dict[str, str]:
    """How an exception to raise in an environment is put on the board."""
    kind = type(exc)
    module = kind.__module__
    return {
        "module": ""
        if module in ("builtins", __name__) or kind.__qualname__ != kind.__name__ or "." in kind.__name__
        else module,
        "name": kind.__name__,
        "message": str(exc),
    }


#: armed instead of an exception: the environment that takes it never returns (a call that hangs), so the
#: runtime kills it at the function's Timeout, as Lambda does
HANG = {"hang": "true"}


def raise_spec(spec: dict[str, str]) -> None:
    """Raise the exception ``exception_spec`` described: the class itself where it can be imported, else a
    class of that name (``Runtime.ExitError``, as the Lambda runtime names a process that died).
    ``HANG`` blocks until the runtime kills the environment."""
    if spec.get("hang"):
        import time

        while True:
            time.sleep(60)
    kind: type = type(spec["name"], (Exception,), {})
    if spec.get("module"):
        import importlib

        kind = getattr(importlib.import_module(spec["module"]), spec["name"], kind)
    raise kind(spec["message"])
