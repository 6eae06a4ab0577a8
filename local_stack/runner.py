"""``make run`` and ``make serve``: the bundled sample runs through the real pipeline on the local stack."""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import requests

from local_stack.hub_emulator import SampleRun, load_sample_runs
from local_stack.stack import LocalStack, StackOptions
from local_stack.template import PROJECT_ROOT

FINISHED = {"SUCCEEDED", "FAILED", "CANCELLED"}
OUTPUT_DIR = PROJECT_ROOT / ".local" / "images"


class PluginApi:
    """What the hub does: call the plugin's endpoint with its Secret header."""

    def __init__(self, base_url: str, secret: str, timeout_s: float = 60):
        self.base_url = base_url.rstrip("/")
        self._session = requests.Session()
        self._session.headers["Secret"] = secret
        self._timeout = timeout_s

    def run(self, payload: dict[str, Any]) -> requests.Response:
        return self._session.post(f"{self.base_url}/plugin", json=payload, timeout=self._timeout)

    def session_page(
        self, session_id: str, page: str | None = None, limit: int | None = None
    ) -> dict[str, Any] | None:
        """One page of ``GET /sessions/{id}``: the first carries the summary, each one ``next``."""
        params = {key: value for key, value in (("page", page), ("limit", limit)) if value is not None}
        response = self._session.get(
            f"{self.base_url}/sessions/{session_id}", params=params, timeout=self._timeout
        )
        return response.json() if response.status_code == 200 else None

    def session(self, session_id: str) -> dict[str, Any] | None:
        """The summary with every run: the pages followed to the end."""
        view = self.session_page(session_id)
        following = view
        while following and following.get("next"):
            following = self.session_page(session_id, page=following["next"])
            if following is None:
                return None
            view["runs"] += following["runs"]
        return view

    def wait_finished(self, session_id: str, timeout_s: float = 120, poll_s: float = 0.2) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            summary = self.session_page(session_id, limit=1)  # the summary says whether every run ended
            if summary and summary["status"] in FINISHED:
                view = self.session(session_id)
                if view is not None:
                    return view
            time.sleep(poll_s)
        raise TimeoutError(
            f"session {session_id} did not finish within {timeout_s}s: {self.session(session_id)}"
        )


@dataclass
class Progress:
    """One line per change of a session's state, not a wall of logs."""

    out: TextIO
    last: dict[str, str]

    def show(self, title: str, view: dict[str, Any] | None) -> None:
        if not view:
            return
        run = view["runs"][0]
        line = run["status"]
        if run.get("queue"):
            eta = max(0.0, (run["queue"]["startAtMs"] - time.time() * 1000) / 1000)
            line += f" (position {run['queue']['position']} in the queue, about {eta:.0f} s)"
        if run["timeline"] and run["timeline"][-1].get("detail"):
            line += f": {run['timeline'][-1]['detail']}"
        if self.last.get(view["session"]) != line:
            self.last[view["session"]] = line
            print(f"  [{view['session']}] {line}", file=self.out, flush=True)


_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def _save_images(stack: LocalStack, view: dict[str, Any], session: str) -> list[tuple[Path, str]]:
    """Every image of the run as the hub stores it: ``<session>.<ext>``, then ``<session>-2.<ext>``, ..."""
    saved = []
    for index, image in enumerate(view["runs"][0].get("images") or []):
        url = image.get("hubUrl")
        if not url:
            continue
        data = requests.get(url, timeout=30).content  # what the hub stores and shows beside the asset
        OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
        suffix = f"-{index + 1}" if index else ""
        path = OUTPUT_DIR / f"{session}{suffix}.{_EXTENSIONS.get(image.get('format'), 'png')}"
        path.write_bytes(data)
        saved.append((path, url))
    return saved


def run_samples(
    stack: LocalStack, samples: list[SampleRun], out: TextIO = sys.stdout, timeout_s: float = 300
) -> int:
    api = PluginApi(stack.api_url, stack.plugin_secret)
    progress = Progress(out, {})
    pending: dict[str, SampleRun] = {}
    refused = 0
    for sample in samples:
        answer = api.run(sample.payload)
        print(
            f"→ {sample.title}\n  POST /plugin → {answer.status_code} {answer.text.strip()}",
            file=out,
            flush=True,
        )
        if answer.status_code == 202:
            pending[sample.payload["session"]] = sample
        else:
            refused += 1
    finished: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while pending.keys() - finished.keys() and time.monotonic() < deadline:
        for session, sample in pending.items():
            if session in finished:
                continue
            view = api.session_page(session)
            progress.show(sample.title, view)
            if view and view["status"] in FINISHED:
                finished[session] = view
        time.sleep(0.2)

    print("\nResults", file=out)
    succeeded = 0
    for session, sample in pending.items():
        view = finished.get(session) or api.session(session) or {"runs": [{"status": "UNKNOWN"}]}
        run = view["runs"][0]
        print(f"• {sample.title}\n  session {session}: {run['status']}", file=out)
        if run.get("model"):
            model = run["model"]
            note = f" ({model['note']})" if model.get("note") else ""
            print(f"  model: {model['actual']}{note}", file=out)
        if run.get("prompt"):
            prompt = run["prompt"]
            print(
                f"  prompt ({prompt['source']}, {prompt['length']} chars): {prompt['text'][:160]!r}", file=out
            )
        if run["status"] == "SUCCEEDED":
            for path, url in _save_images(stack, view, session):
                print(f"  image: {path} (attached on the hub as {url})", file=out)
            succeeded += 1
        elif run.get("failure"):
            print(f"  why: {run['failure']['message']}", file=out)
    total = len(samples)
    print(f"\n{succeeded} of {total} runs succeeded", file=out, flush=True)
    return 0 if succeeded == total and refused == 0 else 1


def main_run() -> int:
    options = StackOptions.from_environment()
    with LocalStack(options) as stack:
        stack.hub.load_samples()
        where = (
            "the real OpenAI API"
            if options.openai_api_key
            else f"the OpenAI emulator at {stack.openai.base_url}"
        )
        print(
            f"Local stack up (API {stack.api_url}, hub emulator {stack.hub.base_url}, images from {where})\n",
            flush=True,
        )
        return run_samples(stack, load_sample_runs(stack.hub.base_url))


#: ``make serve``'s fixed Secret (on 127.0.0.1 only), so the events/ files can carry it for ``sam local invoke``
SERVE_PLUGIN_SECRET = "local-plugin-secret-of-make-serve-0123456789"


def main_serve(port: int = 3000) -> int:
    from local_stack import sam_local

    options = StackOptions.from_environment()
    options.api_port = port
    options.plugin_secret = options.plugin_secret or SERVE_PLUGIN_SECRET
    with LocalStack(options) as stack:
        stack.hub.load_samples()
        sam_local.seed_event_session(stack)
        sam_local.seed_event_batch()
        env_file = sam_local.write_env_file(stack).relative_to(PROJECT_ROOT)
        sample = load_sample_runs(stack.hub.base_url)[0].payload
        keys = ("projectId", "taskId", "assetId", "categorySchema", "configJSON", "apiKey")
        example = {key: sample[key] for key in keys} | {"session": "my-session-1"}
        print(
            f"""Local stack up. API: {stack.api_url}
  console:         {stack.api_url}/   (sessions, progress, logs and images; start a sample run)
  hub emulator:    {stack.hub.base_url}   (state: GET {stack.hub.base_url}/_emulator/state)
  OpenAI:          {stack.openai.base_url if stack.openai else "the real OpenAI API"}
  plugin Secret:   {stack.plugin_secret}

Try:
  curl -s -X POST {stack.api_url}/plugin -H 'Secret: {stack.plugin_secret}' -H 'Content-Type: application/json' \\
    -d '{_compact(example)}'
  curl -s {stack.api_url}/sessions/my-session-1 -H 'Secret: {stack.plugin_secret}'

sam local invoke (where Docker runs; sessions sess-event-0001 and sess-event-batch are seeded for the events/ files):
  sam build && sam local invoke ExtractFunction -e events/extract.json --env-vars {env_file} --docker-network host
  sam local invoke StartBatchFunction -e events/start_batch.json --env-vars {env_file} --docker-network host

Ctrl-C stops everything.""",
            flush=True,
        )
        # SIGTERM stops as cleanly as Ctrl-C: everything the stack started goes with it
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\nstopping…", flush=True)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean stop short
    raise KeyboardInterrupt


def _compact(value: Any) -> str:
    """JSON on one line, quoted for a single-quoted shell argument."""
    return json.dumps(value, separators=(",", ":")).replace("'", "'\\''")
