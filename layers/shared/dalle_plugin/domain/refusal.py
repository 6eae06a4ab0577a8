"""A request refused before anything runs (bad Config JSON, nothing mapped to Prompt) is also told to the
hub's Plugin Sessions dialog, where the user looks, not only in the HTTP answer the hub may not show."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from dalle_plugin.domain.errors import PluginError
from dalle_plugin.domain.steps.machinery import StepDeps


class _Caller(NamedTuple):
    """Whom the hub is told for (a ``HubCaller``), read from a request that never became a run."""

    plugin_id: str | None
    org_id: str | None
    run_by: str | None


def tell_hub_refused(raw_body: bytes, message: str, deps: StepDeps) -> bool:
    """Best effort, from whatever of the payload could be read; returns whether the hub was told."""
    try:
        body: Any = json.loads(raw_body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(body, dict):
        return False
    session = body.get("session") or body.get("sessionId")
    api_key = body.get("apiKey")
    if not (isinstance(session, str) and session and isinstance(api_key, str) and api_key):
        return False
    caller = _Caller(
        plugin_id=_text(body.get("pluginId")),
        org_id=_text(body.get("orgId")),
        run_by=_text(body.get("runBy")),
    )
    try:
        hub = deps.hub_for(caller, api_key)
        hub.plugin_log(session, f"Run refused: {message}", level="ERROR")
        if not body.get("workflow"):
            hub.plugin_response(session, error=True)
    except PluginError:
        return False
    return True


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
