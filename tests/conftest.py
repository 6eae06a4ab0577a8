"""Shared fixtures. The local stack is started once per test process (each xdist worker has its own)."""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import pytest

EVENTS = Path(__file__).resolve().parent.parent / "events"
PLUGIN_SECRET = "test-plugin-secret-long-enough-for-the-authorizer"


def wait_for(condition, what: str, timeout_s: float = 300, poll_s: float = 0.1):
    """``condition()``'s first truthy value, polled until the deadline (a deadline, not a wait)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"never happened: {what}")


def load_event(name: str) -> dict:
    return json.loads((EVENTS / name).read_text())


def start_stack(
    name: str,
    profile: str | None = None,
    environment: dict[str, str] | None = None,
    parameters: dict[str, str] | None = None,
):
    """A local stack for tests: a seam board of its own, the test seams in every execution environment."""
    from local_stack.profiles import profile_named
    from local_stack.seams import SEAMS_DIR_VARIABLE
    from local_stack.stack import LocalStack, StackOptions

    # A real OPENAI_API_KEY in a developer's shell must not turn the test suite into paid calls.
    os.environ.pop("OPENAI_API_KEY", None)
    board = tempfile.mkdtemp(prefix=f"{name}-seams-")
    # A generous limit: tests of the global limit itself run their own scaled window.
    options = StackOptions(
        plugin_secret=PLUGIN_SECRET,
        stack_name=name,
        parameters={"RateLimit": "1000", **(parameters or {})},
        profile=profile_named(profile),
        environment={SEAMS_DIR_VARIABLE: board, **(environment or {})},
        hook_modules=("tests.env_hooks",),
    )
    return _FreshPluginState(LocalStack(options))


class _FreshPluginState:
    """The stack, with the plugin's cached settings and clients of this process dropped when it starts and
    stops: tests call handlers in this process too, and a cached client would still point at a stack that
    is gone (a worker may run the fault suite's stacks beside the shared one)."""

    def __init__(self, stack):
        self._stack = stack

    def __enter__(self):
        running = self._stack.__enter__()
        _clear_plugin_caches()
        return running

    def __exit__(self, *exc):
        try:
            return self._stack.__exit__(*exc)
        finally:
            _clear_plugin_caches()


def _clear_plugin_caches() -> None:
    from dalle_plugin import settings, wiring

    settings.load_settings.cache_clear()
    for value in vars(wiring).values():
        if hasattr(value, "cache_clear"):
            value.cache_clear()


@pytest.fixture(scope="session")
def stack():
    with start_stack("dalle-test") as running:
        running.hub.load_samples()
        yield running


@pytest.fixture
def openai_emulator(stack):
    stack.openai.reset()
    yield stack.openai
    stack.openai.reset()


@pytest.fixture
def api(stack):
    from local_stack.runner import PluginApi

    return PluginApi(stack.api_url, PLUGIN_SECRET)


_counter = itertools.count()


@pytest.fixture
def new_session():
    """A fresh hub session id per call, so tests on the shared stack never see each other's runs."""
    return lambda prefix="sess": f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sample_payload(stack, new_session):
    from local_stack.hub_emulator import load_sample_runs

    samples = {s.payload["taskId"]: s.payload for s in load_sample_runs(stack.hub.base_url)}

    def make(task_id: str, **overrides) -> dict:
        payload = dict(samples[task_id])
        payload["session"] = new_session(task_id)
        payload.update(overrides)
        return payload

    return make
