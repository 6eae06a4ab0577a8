"""An Ango Hub stand-in for the local stack and the tests: the REST calls the plugin makes, on 127.0.0.1.

It holds projects (with their ontology), assets (whose files it serves itself, raw bytes in any encoding),
tasks (answers in the hub's read format) and a presigned-PUT style file storage. It records every request
it receives (the ``apikey`` header only as a fingerprint), offers typed views of what the plugin did
(attachments, annotations, plugin responses and log lines, stored files), and can be told to fail or
stall the next matching requests. Everything it answers follows the wire format of the official SDK
(``imerit_ango``): see docs/hub-protocol.md and tests/unit/test_hub_sdk_contract.py.

The local stack runs it in a process of its own through ``HubEmulatorProcess``, whose methods are requests
to these control endpoints (no auth, JSON): ``GET /_emulator/health`` (pid, port), ``GET /_emulator/state``,
``POST /_emulator/reset``, ``POST /_emulator/faults`` (``{"path_prefix", "status", "times", "latency_s",
"method", "body_contains", "drip_s"}``, or a list of them), ``DELETE /_emulator/faults[?path_prefix=&body_contains=]``,
``POST /_emulator/{api_keys,samples,projects,assets,tasks,nagle}`` and ``GET /_emulator/{requests[?since=N],
attachments,annotations,plugin_responses,plugin_logs,stored_files,task}``.

Run it alone with ``python -m local_stack.hub_emulator --port 8081`` (loads the bundled samples).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import hashlib
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from local_stack.http_server import LocalHTTPServer, LocalServer, ServerProcess

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
DEFAULT_API_KEY = "ango-local-key"

# the ``type`` values of /v2/getUploadUrl (the SDK's StorageFileTypes)
STORAGE_FILE_TYPES = frozenset({"assets", "brushes", "medicalBrushes", "exports", "instructions"})
ATTACHMENT_TYPES = frozenset({"IMAGE", "TEXT", "VIDEO"})
IMAGE_CONTENT_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg"})
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_WORKFLOW = ("Start", "Plugin", "Complete")
SUPPORTED_ASSET_FILTERS = frozenset({"_id", "externalId"})
S3_DEFAULT_CONTENT_TYPE = "binary/octet-stream"  # what S3 stores when a PUT names no Content-Type


def api_key_fingerprint(api_key: str) -> str:
    """How recorded requests show an ``apikey`` header: comparable, never the key itself."""
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


class _HubFailure(Exception):
    """Becomes the hub's error body ``{"status": "fail"|"error", "message": ...}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Reply:
    status: int
    body: bytes = b""
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    drip_s: float = 0.0  # > 0: the body goes out one byte at a time, this long apart


@dataclass
class _Exchange:
    method: str
    path: str
    query: dict[str, Any]
    headers: dict[str, str]
    body: bytes
    received_at: float = 0.0  # time.time() when the request line was read, by the emulator's process

    def json(self) -> Any:
        if not self.body:
            raise _HubFailure(400, "Request body must be JSON")
        try:
            return json.loads(self.body)
        except ValueError:
            raise _HubFailure(400, "Request body is not valid JSON") from None


@dataclass
class _Fault:
    path_prefix: str
    status: int | None
    remaining: int
    latency_s: float
    method: str | None
    body_contains: str | None = None
    drip_s: float = 0.0

    def matches(self, method: str, path: str, body: bytes = b"", query: str = "") -> bool:
        # ``body_contains`` looks at the whole request: a GET carries its ids in the path or the query
        return (
            path.startswith(self.path_prefix)
            and (self.method is None or self.method == method)
            and (
                self.body_contains is None
                or any(self.body_contains.encode() in part for part in (body, path.encode(), query.encode()))
            )
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "path_prefix": self.path_prefix,
            "status": self.status,
            "remaining": self.remaining,
            "latency_s": self.latency_s,
            "method": self.method,
            "body_contains": self.body_contains,
            "drip_s": self.drip_s,
        }


@dataclass(frozen=True)
class SampleRun:
    """One bundled payload for ``make run``: a display title and the payload exactly as the hub sends it."""

    title: str
    payload: dict[str, Any]


def _json_reply(status: int, document: Any) -> _Reply:
    return _Reply(status, json.dumps(document).encode())


def _hub_error(status: int, message: str) -> _Reply:
    return _json_reply(status, {"status": "error" if status >= 500 else "fail", "message": message})


def _success(data: Any) -> _Reply:
    return _json_reply(200, {"status": "success", "data": data})


def _s3_error(status: int, code: str, message: str) -> _Reply:
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return _Reply(status, xml.encode(), "application/xml")


def _flatten_query(raw_query: str) -> dict[str, Any]:
    parsed = parse_qs(raw_query, keep_blank_values=True)
    return {key: values[0] if len(values) == 1 else values for key, values in parsed.items()}


def _is_true(value: Any) -> bool:
    # the SDK sends Python's str(bool) ("True") in some calls and "true" in others
    return isinstance(value, str) and value.lower() == "true"


def _to_read_format(write_answer: dict[str, Any]) -> dict[str, Any]:
    return {
        "tools": copy.deepcopy(write_answer.get("objects") or []),
        "classifications": copy.deepcopy(write_answer.get("classifications") or []),
        "relations": copy.deepcopy(write_answer.get("relations") or []),
    }


class HubEmulator(LocalServer):
    """A threaded HTTP server on 127.0.0.1 speaking the hub's ``/v2`` calls the plugin uses.

    Seed it with ``add_project`` / ``add_asset`` / ``add_task`` or ``load_samples()``; asset ``data`` URLs
    are rendered with the running server's address, so they are absolute once ``start()`` has run.
    The local stack runs it in a process of its own through ``HubEmulatorProcess``, which has the same
    methods.
    """

    display_name = "hub emulator"

    def __init__(self, port: int = 0, api_keys: Iterable[str] | None = None):
        super().__init__(port)
        self.api_keys: set[str] = set(api_keys) if api_keys is not None else {DEFAULT_API_KEY}
        self._lock = threading.RLock()
        self._projects: dict[str, dict[str, Any]] = {}
        self._assets: dict[str, dict[str, Any]] = {}  # asset _id -> asset (``file_path`` instead of a URL)
        self._asset_files: dict[str, tuple[bytes, str]] = {}  # /files/... path -> (bytes, content type)
        self._tasks: dict[str, dict[str, Any]] = {}
        self._seeded_tasks: dict[str, dict[str, Any]] = {}
        self._reset_records()

    @property
    def base_url(self) -> str:
        return self.origin

    def add_api_key(self, api_key: str) -> None:
        """Accept ``api_key`` from now on, besides the keys already accepted."""
        with self._lock:
            self.api_keys.add(api_key)

    # ---- seeding ------------------------------------------------------------------------------------

    def add_project(
        self,
        project_id: str,
        category_schema: dict[str, Any],
        *,
        name: str | None = None,
        workflow: tuple[str, ...] | list[str] = DEFAULT_WORKFLOW,
    ) -> dict[str, Any]:
        schema = {"tools": [], "classifications": [], "relations": [], **copy.deepcopy(category_schema)}
        project = {
            "_id": project_id,
            "name": name or project_id,
            "type": "ango",
            "batches": [],
            "categorySchema": schema,
            "workflow": list(workflow),
        }
        with self._lock:
            self._projects[project_id] = project
        return copy.deepcopy(project)

    def add_asset(
        self,
        project_id: str,
        asset_id: str,
        external_id: str,
        filename: str,
        body: bytes,
        content_type: str = "text/plain",
        *,
        batches: tuple[str, ...] | list[str] = (),
    ) -> dict[str, Any]:
        file_path = f"/files/{quote(project_id, safe='')}/{quote(filename, safe='')}"
        with self._lock:
            self._require_project(project_id)
            self._asset_files[unquote(file_path)] = (bytes(body), content_type)
            self._assets[asset_id] = {
                "_id": asset_id,
                "externalId": external_id,
                "project": project_id,
                "file_path": file_path,
                "batches": list(batches),
                "isPreLabeled": False,
            }
            return self._render_asset(self._assets[asset_id])

    def add_task(
        self,
        project_id: str,
        task_id: str,
        asset_id: str,
        answer: dict[str, Any] | None = None,
        *,
        stage: str = "Plugin",
    ) -> dict[str, Any]:
        with self._lock:
            self._require_project(project_id)
            asset = self._assets.get(asset_id)
            if asset is None or asset["project"] != project_id:
                raise KeyError(f"asset {asset_id!r} is not in project {project_id!r}")
            task = {
                "_id": task_id,
                "project": project_id,
                "asset": asset_id,
                "externalId": asset["externalId"],
                "stage": stage,
                "status": "TODO",
                "brushDataUrl": None,
                "medicalBrushDataUrl": None,
                "answer": {
                    "tools": [],
                    "classifications": [],
                    "relations": [],
                    **copy.deepcopy(answer or {}),
                },
            }
            self._tasks[task_id] = task
            self._seeded_tasks[task_id] = copy.deepcopy(task)
            return copy.deepcopy(task)

    def load_samples(self, path: Path | None = None) -> None:
        """Seed from ``samples/hub_seed.json`` (asset texts are stored encoded with their ``encoding``)."""
        seed = json.loads((path or SAMPLES_DIR / "hub_seed.json").read_text(encoding="utf-8"))
        for project in seed["projects"]:
            project_id = project["projectId"]
            self.add_project(project_id, project["categorySchema"], name=project.get("name"))
            for asset in project["assets"]:
                body = asset["text"].encode(asset.get("encoding", "utf-8"))
                self.add_asset(
                    project_id,
                    asset["assetId"],
                    asset["externalId"],
                    asset["filename"],
                    body,
                    asset.get("contentType", "text/plain"),
                )
            for task in project["tasks"]:
                self.add_task(
                    project_id,
                    task["taskId"],
                    task["assetId"],
                    task.get("answer"),
                    stage=task.get("stage", "Plugin"),
                )

    # ---- fault injection ----------------------------------------------------------------------------

    def fail_next(
        self,
        path_prefix: str,
        status: int | None = 503,
        times: int = 1,
        latency_s: float = 0.0,
        method: str | None = None,
        body_contains: str | None = None,
        drip_s: float = 0.0,
    ) -> None:
        """The next ``times`` requests whose path starts with ``path_prefix`` (and whose body contains
        ``body_contains``, if given) wait ``latency_s`` and then answer ``status`` with the hub's error body
        (``status=None``: answered normally after the wait). ``drip_s`` > 0 sends the answer's body one byte
        every ``drip_s`` seconds: each read gets a byte before any per-read timeout, so only a deadline on
        the whole answer ends the call."""
        if times < 1:
            raise ValueError("times must be at least 1")
        if status is None and latency_s <= 0 and drip_s <= 0:
            raise ValueError("a fault needs a status, a latency, a drip, or a mix")
        with self._lock:
            self._faults.append(
                _Fault(
                    path_prefix,
                    status,
                    times,
                    float(latency_s),
                    method.upper() if method else None,
                    body_contains,
                    float(drip_s),
                )
            )

    def clear_faults(self, path_prefix: str | None = None, body_contains: str | None = None) -> None:
        """Drop every pending fault, or only those set with this ``path_prefix`` / ``body_contains``."""
        with self._lock:
            self._faults = [
                fault
                for fault in self._faults
                if (path_prefix is not None and fault.path_prefix != path_prefix)
                or (body_contains is not None and fault.body_contains != body_contains)
            ]

    def reset(self) -> None:
        """Forget every recorded request, fault and stored file; put tasks back as they were seeded."""
        with self._lock:
            self._reset_records()
            self._tasks = copy.deepcopy(self._seeded_tasks)

    # ---- what the plugin did ------------------------------------------------------------------------

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every request received, in order; ``received_at`` is ``time.time()`` at its arrival."""
        with self._lock:
            return copy.deepcopy(self._requests)

    def requests_since(self, first: int) -> list[dict[str, Any]]:
        """``requests[first:]``, without copying the rest (a poller's view)."""
        with self._lock:
            return copy.deepcopy(self._requests[first:])

    def set_nagle(self, on: bool) -> None:
        """Nagle's algorithm on this process's hub connections accepted from now on (shipped: off)."""
        _HubRequestHandler.disable_nagle_algorithm = not on

    def attachments(self, external_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                dict(a) for a in self._attachments if external_id is None or a["externalId"] == external_id
            ]

    def annotations(self, task_id: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(a) for a in self._annotations if task_id is None or a["task_id"] == task_id]

    def plugin_responses(self, session: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(r)
                for r in self._plugin_responses
                if session is None or r.get("session") == session
            ]

    def plugin_logs(self, session: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [
                copy.deepcopy(r) for r in self._plugin_logs if session is None or r.get("session") == session
            ]

    def stored_files(self) -> list[dict[str, Any]]:
        """Files PUT into hub storage: ``url`` (permanent, no query), ``content_type``, ``size``, ``body``."""
        with self._lock:
            return [
                {"url": self._absolute(key), "content_type": ctype, "size": len(body), "body": body}
                for key, (body, ctype) in self._storage.items()
            ]

    def task(self, task_id: str) -> dict[str, Any]:
        """The task as the hub holds it now (answer in read format, current stage)."""
        with self._lock:
            return copy.deepcopy(self._tasks[task_id])

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "attachments": self.attachments(),
                "annotations": self.annotations(),
                "plugin_responses": self.plugin_responses(),
                "plugin_logs": self.plugin_logs(),
                "stored_files": [{k: v for k, v in f.items() if k != "body"} for f in self.stored_files()],
                "tasks": copy.deepcopy(list(self._tasks.values())),
                "faults": [fault.as_dict() for fault in self._faults],
            }

    # ---- request handling (called from the server's threads) ----------------------------------------

    def _reset_records(self) -> None:
        self._requests: list[dict[str, Any]] = []
        self._attachments: list[dict[str, Any]] = []
        self._annotations: list[dict[str, Any]] = []
        self._plugin_responses: list[dict[str, Any]] = []
        self._plugin_logs: list[dict[str, Any]] = []
        self._storage: dict[str, tuple[bytes, str]] = {}  # /storage/... path -> (bytes, content type)
        self._upload_signatures: dict[str, str] = {}  # issued upload path -> its signature
        self._faults: list[_Fault] = []

    def _dispatch(self, exchange: _Exchange) -> _Reply:
        if exchange.path.startswith("/_emulator/"):
            return self._control(exchange)
        record = self._record(exchange)
        fault = self._take_fault(exchange.method, exchange.path, exchange.body, json.dumps(exchange.query))
        if fault is not None:
            if fault.latency_s > 0:
                self._stopping.wait(fault.latency_s)
            if fault.status is not None:
                with self._lock:
                    record["fault"] = fault.status
                return _hub_error(fault.status, f"Injected fault: HTTP {fault.status}")
        reply = self._answer(exchange)
        if fault is not None and fault.drip_s > 0:
            with self._lock:
                record["fault"] = f"drip {fault.drip_s:g} s/byte"
            reply.drip_s = fault.drip_s
        return reply

    def _answer(self, exchange: _Exchange) -> _Reply:
        try:
            if exchange.path.startswith("/v2/"):
                self._authenticate(exchange)
                return self._v2(exchange)
            if exchange.path.startswith("/files/") and exchange.method == "GET":
                return self._serve_asset_file(exchange)
            if exchange.path.startswith("/storage/"):
                return self._storage_call(exchange)
            raise _HubFailure(404, f"Cannot {exchange.method} {exchange.path}")
        except _HubFailure as failure:
            return _hub_error(failure.status, failure.message)

    def _record(self, exchange: _Exchange) -> dict[str, Any]:
        headers: dict[str, Any] = {}
        if "content-type" in exchange.headers:
            headers["content-type"] = exchange.headers["content-type"]
        if "apikey" in exchange.headers:
            headers["apikey"] = api_key_fingerprint(exchange.headers["apikey"])
        body: Any = None
        if exchange.path.startswith("/storage/"):
            body = {"bytes": len(exchange.body)} if exchange.body else None
        elif exchange.body:
            try:
                body = json.loads(exchange.body)
            except ValueError:
                body = {"unparsed_bytes": len(exchange.body)}
        record = {
            "received_at": exchange.received_at,
            "method": exchange.method,
            "path": exchange.path,
            "query": copy.deepcopy(exchange.query),
            "headers": headers,
            "body": body,
        }
        with self._lock:
            self._requests.append(record)
        return record

    def _take_fault(self, method: str, path: str, body: bytes = b"", query: str = "") -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path, body, query):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _authenticate(self, exchange: _Exchange) -> None:
        api_key = exchange.headers.get("apikey")
        if not api_key:
            raise _HubFailure(401, "Unauthorized: the apikey header is missing")
        if api_key not in self.api_keys:
            raise _HubFailure(401, "Unauthorized: invalid API key")

    # ---- /v2 ----------------------------------------------------------------------------------------

    def _v2(self, exchange: _Exchange) -> _Reply:
        for method, pattern, route in self._routes():
            match = pattern.fullmatch(exchange.path)
            if match and method == exchange.method:
                return route(exchange, *(unquote(group) for group in match.groups()))
        raise _HubFailure(404, f"Cannot {exchange.method} {exchange.path}")

    def _routes(self) -> list[tuple[str, re.Pattern[str], Callable[..., _Reply]]]:
        return [
            ("GET", re.compile(r"/v2/task/([^/]+)"), self._get_task),
            ("GET", re.compile(r"/v2/project/([^/]+)/assets"), self._get_assets),
            ("GET", re.compile(r"/v2/project/([^/]+)/tasks"), self._get_tasks),
            ("GET", re.compile(r"/v2/project/([^/]+)"), self._get_project),
            ("GET", re.compile(r"/v2/getUploadUrl"), self._get_upload_url),
            ("GET", re.compile(r"/v2/getSignedUrl"), self._get_signed_url),
            ("POST", re.compile(r"/v2/attachments"), self._post_attachments),
            ("POST", re.compile(r"/v2/annotate/([^/]+)"), self._annotate),
            ("POST", re.compile(r"/v2/pluginResponse"), self._plugin_response),
            ("POST", re.compile(r"/v2/pluginLog"), self._plugin_log),
        ]

    def _get_task(self, exchange: _Exchange, task_id: str) -> _Reply:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                raise _HubFailure(404, f"Task {task_id} not found")
            shown = copy.deepcopy(task)
            shown["data"] = self._absolute(self._assets[task["asset"]]["file_path"])
        if not _is_true(exchange.query.get("includeAnswer")):
            shown.pop("answer")  # like the real hub: the answer only on request
        return _success({"task": shown})

    def _get_assets(self, exchange: _Exchange, project_id: str) -> _Reply:
        try:
            page = int(exchange.query.get("page", "1"))
            limit = int(exchange.query.get("limit", "10"))
        except ValueError:
            raise _HubFailure(400, "page and limit must be integers") from None
        if page < 1 or limit < 1:
            raise _HubFailure(400, "page and limit must be at least 1")
        try:
            filters = json.loads(exchange.query.get("filters") or "{}")
        except ValueError:
            raise _HubFailure(400, "filters must be a JSON object") from None
        if not isinstance(filters, dict):
            raise _HubFailure(400, "filters must be a JSON object")
        unsupported = set(filters) - SUPPORTED_ASSET_FILTERS
        if unsupported:
            raise _HubFailure(400, f"Unsupported asset filter(s): {', '.join(sorted(unsupported))}")
        with self._lock:
            self._require_project(project_id)
            matching = [
                a
                for a in self._assets.values()
                if a["project"] == project_id and all(a.get(key) == value for key, value in filters.items())
            ]
            shown = [self._render_asset(a) for a in matching[(page - 1) * limit : page * limit]]
        return _success({"assets": shown, "total": len(matching)})

    def _get_tasks(self, exchange: _Exchange, project_id: str) -> _Reply:
        """The SDK's ``get_tasks(project_id, page, limit, batches=[...])``: a project's tasks, a page at a
        time, those of assets in any of ``batches`` (a JSON list) when it is given."""
        try:
            page = int(exchange.query.get("page", "1"))
            limit = int(exchange.query.get("limit", "10"))
            batches = json.loads(exchange.query["batches"]) if "batches" in exchange.query else None
        except ValueError:
            raise _HubFailure(400, "page and limit must be integers, batches a JSON list") from None
        if page < 1 or not 1 <= limit <= 1000:
            raise _HubFailure(400, "page must be at least 1 and limit between 1 and 1000")
        if batches is not None and not (
            isinstance(batches, list) and all(isinstance(b, str) for b in batches)
        ):
            raise _HubFailure(400, "batches must be a JSON list of batch ids")
        with self._lock:
            self._require_project(project_id)
            matching = [
                t
                for t in self._tasks.values()
                if t["project"] == project_id
                and (batches is None or set(batches) & set(self._assets[t["asset"]]["batches"]))
            ]
            shown = [copy.deepcopy(t) for t in matching[(page - 1) * limit : page * limit]]
        if not _is_true(exchange.query.get("includeAnswer")):
            for task in shown:
                task.pop("answer", None)
        return _success({"tasks": shown, "total": len(matching)})

    def _get_project(self, exchange: _Exchange, project_id: str) -> _Reply:
        with self._lock:
            return _success({"project": copy.deepcopy(self._require_project(project_id))})

    def _get_upload_url(self, exchange: _Exchange) -> _Reply:
        name, project_id = self._storage_query(exchange)
        upload_path = f"/storage/{quote(project_id, safe='')}/{uuid.uuid4().hex}-{quote(name, safe='')}"
        signature = secrets.token_hex(16)
        with self._lock:
            self._upload_signatures[unquote(upload_path)] = signature
        upload_url = (
            f"{self.base_url}{upload_path}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=3600"
            f"&X-Amz-Signature={signature}"
        )
        return _success({"uploadUrl": upload_url})

    def _get_signed_url(self, exchange: _Exchange) -> _Reply:
        url, _ = self._storage_query(exchange)
        separator = "&" if "?" in url else "?"
        return _success(
            {"signedUrl": f"{url}{separator}X-Amz-Expires=3600&X-Amz-Signature={secrets.token_hex(16)}"}
        )

    def _storage_query(self, exchange: _Exchange) -> tuple[str, str]:
        name = exchange.query.get("name")
        project_id = exchange.query.get("project")
        file_type = exchange.query.get("type")
        if not isinstance(name, str) or not name:
            raise _HubFailure(400, "name is required")
        if not isinstance(project_id, str) or not project_id:
            raise _HubFailure(400, "project is required")
        if file_type not in STORAGE_FILE_TYPES:
            raise _HubFailure(400, f"type must be one of {', '.join(sorted(STORAGE_FILE_TYPES))}")
        with self._lock:
            self._require_project(project_id)
        return name, project_id

    def _post_attachments(self, exchange: _Exchange) -> _Reply:
        body = exchange.json()
        if not isinstance(body, dict) or not isinstance(body.get("attachments"), list):
            raise _HubFailure(400, "Body must be {project, attachments: [...]}")
        project_id = body.get("project")
        accepted: list[dict[str, Any]] = []
        with self._lock:
            self._require_project(project_id)
            for entry in body["attachments"]:
                if not isinstance(entry, dict) or not isinstance(entry.get("attachments"), list):
                    raise _HubFailure(400, "Each item needs externalId and an attachments list")
                external_id = entry.get("externalId")
                asset_ids = [
                    a["_id"]
                    for a in self._assets.values()
                    if a["project"] == project_id and a["externalId"] == external_id
                ]
                if not asset_ids:
                    raise _HubFailure(
                        404, f"No asset with externalId {external_id!r} in project {project_id}"
                    )
                for attachment in entry["attachments"]:
                    self._validate_attachment(attachment)
                    accepted.append(
                        {
                            "project": project_id,
                            "externalId": external_id,
                            "asset_ids": asset_ids,
                            "type": attachment["type"],
                            "value": attachment["value"],
                        }
                    )
            self._attachments.extend(accepted)
        return _success({"attachments": len(accepted)})

    def _validate_attachment(self, attachment: Any) -> None:
        if not isinstance(attachment, dict) or attachment.get("type") not in ATTACHMENT_TYPES:
            raise _HubFailure(400, f"Attachment type must be one of {', '.join(sorted(ATTACHMENT_TYPES))}")
        value = attachment.get("value")
        if not isinstance(value, str) or not value:
            raise _HubFailure(400, "Attachment value is required")
        if attachment["type"] != "IMAGE":
            return
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https"):
            raise _HubFailure(400, "IMAGE attachments must be links to a JPG or PNG file")
        own_storage = f"{parts.scheme}://{parts.netloc}" == self.base_url and parts.path.startswith(
            "/storage/"
        )
        if own_storage:
            stored = self._storage.get(unquote(parts.path))
            if stored is None:
                raise _HubFailure(
                    400, f"IMAGE attachment links to a file that was never uploaded: {parts.path}"
                )
            content_type = stored[1].split(";")[0].strip().lower()
            if content_type not in IMAGE_CONTENT_TYPES and not parts.path.lower().endswith(IMAGE_SUFFIXES):
                raise _HubFailure(400, f"IMAGE attachment is not a JPG or PNG file (stored as {stored[1]})")
        elif not parts.path.lower().endswith(IMAGE_SUFFIXES):
            raise _HubFailure(400, "IMAGE attachments must be links to a JPG or PNG file")

    def _annotate(self, exchange: _Exchange, task_id: str) -> _Reply:
        body = exchange.json()
        answer = body.get("answer") if isinstance(body, dict) else None
        if not isinstance(answer, dict):
            raise _HubFailure(400, "Body must carry an answer object")
        for key in ("objects", "classifications", "relations"):
            if not isinstance(answer.get(key, []), list):
                raise _HubFailure(400, f"answer.{key} must be a list")
        next_stage = _is_true(exchange.query.get("nextStage"))
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                raise _HubFailure(404, f"Task {task_id} not found")
            stage_before = task["stage"]
            task["answer"] = _to_read_format(answer)
            task["brushDataUrl"] = body.get("brushDataUrl")
            task["medicalBrushDataUrl"] = body.get("medicalBrushDataUrl")
            if next_stage:
                workflow = self._projects[task["project"]]["workflow"]
                position = workflow.index(stage_before) if stage_before in workflow else len(workflow) - 2
                task["stage"] = workflow[min(position + 1, len(workflow) - 1)]
            self._annotations.append(
                {
                    "task_id": task_id,
                    "answer": copy.deepcopy(answer),
                    "next_stage": next_stage,
                    "is_plugin": _is_true(exchange.query.get("isPlugin")),
                    "stage_before": stage_before,
                    "stage_after": task["stage"],
                    "duration": body.get("duration"),
                }
            )
        return _success({"task": {"_id": task_id, "stage": task["stage"]}})

    def _plugin_response(self, exchange: _Exchange) -> _Reply:
        body = exchange.json()
        if not isinstance(body, dict) or not isinstance(body.get("session"), str) or not body["session"]:
            raise _HubFailure(400, "session is required")
        with self._lock:
            self._plugin_responses.append(copy.deepcopy(body))
        return _success({})

    def _plugin_log(self, exchange: _Exchange) -> _Reply:
        body = exchange.json()
        if not isinstance(body, dict) or not body.get("session") or "msg" not in body:
            raise _HubFailure(400, "session and msg are required")
        with self._lock:
            self._plugin_logs.append(copy.deepcopy(body))
        return _success({})

    # ---- files and storage --------------------------------------------------------------------------

    def _serve_asset_file(self, exchange: _Exchange) -> _Reply:
        with self._lock:
            stored = self._asset_files.get(unquote(exchange.path))
        if stored is None:
            return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
        return _Reply(200, stored[0], stored[1])

    def _storage_call(self, exchange: _Exchange) -> _Reply:
        key = unquote(exchange.path)
        if exchange.method == "PUT":
            signature = exchange.query.get("X-Amz-Signature")
            if not signature:
                return _s3_error(403, "AccessDenied", "Anonymous PUT is not allowed: use the upload URL")
            with self._lock:
                if self._upload_signatures.get(key) != signature:
                    return _s3_error(403, "SignatureDoesNotMatch", "The signature does not match this key")
                content_type = exchange.headers.get("content-type") or S3_DEFAULT_CONTENT_TYPE
                self._storage[key] = (exchange.body, content_type)
            etag = hashlib.md5(exchange.body, usedforsecurity=False).hexdigest()  # S3 ETags are MD5s
            return _Reply(200, b"", "text/plain", {"ETag": f'"{etag}"'})
        if exchange.method == "GET":
            with self._lock:
                stored = self._storage.get(key)
            if stored is None:
                return _s3_error(404, "NoSuchKey", "The specified key does not exist.")
            return _Reply(200, stored[0], stored[1])
        return _s3_error(405, "MethodNotAllowed", f"{exchange.method} is not allowed on storage")

    # ---- control endpoints --------------------------------------------------------------------------

    def _control(self, exchange: _Exchange) -> _Reply:
        try:
            route = self._control_routes().get((exchange.method, exchange.path.removeprefix("/_emulator/")))
            if route is None:
                return _hub_error(404, f"Cannot {exchange.method} {exchange.path}")
            return _json_reply(200, route(exchange))
        except _HubFailure as failure:
            return _hub_error(failure.status, failure.message)
        except (KeyError, TypeError, ValueError) as exc:
            return _hub_error(400, f"Bad control request: {type(exc).__name__}: {exc}")

    def _control_routes(self) -> dict[tuple[str, str], Callable[[_Exchange], Any]]:
        """What ``HubEmulatorProcess`` (and a person with curl) can do: every seeding, scripting and
        reading method of the emulator, as JSON; file bodies travel as ``body_base64``."""

        def query(exchange: _Exchange, name: str) -> Any:
            return exchange.query.get(name) or None

        def done(_: Any = None) -> dict[str, str]:
            return {"status": "success"}

        return {
            ("GET", "health"): lambda ex: self.health(),
            ("GET", "state"): lambda ex: self.state(),
            ("POST", "reset"): lambda ex: done(self.reset()),
            ("POST", "api_keys"): lambda ex: done(self.add_api_key(str(ex.json()["api_key"]))),
            ("POST", "samples"): lambda ex: done(self.load_samples()),
            ("POST", "projects"): lambda ex: self.add_project(**ex.json()),
            ("POST", "assets"): lambda ex: self.add_asset(**_decoded_body(ex.json())),
            ("POST", "tasks"): lambda ex: self.add_task(**ex.json()),
            ("POST", "faults"): self._control_add_faults,
            ("DELETE", "faults"): lambda ex: done(
                self.clear_faults(query(ex, "path_prefix"), query(ex, "body_contains"))
            ),
            ("GET", "requests"): lambda ex: self.requests_since(int(ex.query.get("since") or 0)),
            ("POST", "nagle"): lambda ex: done(self.set_nagle(bool(ex.json()["on"]))),
            ("GET", "attachments"): lambda ex: self.attachments(query(ex, "external_id")),
            ("GET", "annotations"): lambda ex: self.annotations(query(ex, "task_id")),
            ("GET", "plugin_responses"): lambda ex: self.plugin_responses(query(ex, "session")),
            ("GET", "plugin_logs"): lambda ex: self.plugin_logs(query(ex, "session")),
            ("GET", "stored_files"): lambda ex: [_encoded_body(f) for f in self.stored_files()],
            ("GET", "task"): lambda ex: self._control_task(query(ex, "task_id")),
        }

    def _control_add_faults(self, exchange: _Exchange) -> dict[str, Any]:
        body = exchange.json()
        for fault in body if isinstance(body, list) else [body]:
            self.fail_next(
                fault["path_prefix"],
                fault.get("status", 503),
                int(fault.get("times", 1)),
                float(fault.get("latency_s", 0.0)),
                fault.get("method"),
                fault.get("body_contains"),
                float(fault.get("drip_s", 0.0)),
            )
        return {"status": "success", "faults": self.state()["faults"]}

    def _control_task(self, task_id: str | None) -> dict[str, Any]:
        try:
            return self.task(task_id or "")
        except KeyError:
            raise _HubFailure(404, f"Task {task_id} not found") from None

    # ---- helpers ------------------------------------------------------------------------------------

    def _require_project(self, project_id: Any) -> dict[str, Any]:
        project = self._projects.get(project_id) if isinstance(project_id, str) else None
        if project is None:
            raise _HubFailure(404, f"Project {project_id} not found")
        return project

    def _absolute(self, path: str) -> str:
        return f"{self.base_url}{path}" if self.running else path

    def _render_asset(self, asset: dict[str, Any]) -> dict[str, Any]:
        shown = {k: copy.deepcopy(v) for k, v in asset.items() if k != "file_path"}
        shown["data"] = self._absolute(asset["file_path"])
        return shown


def _encoded_body(document: dict[str, Any]) -> dict[str, Any]:
    """A document with a bytes ``body`` as JSON can carry it: ``body_base64``."""
    shown = {k: v for k, v in document.items() if k != "body"}
    shown["body_base64"] = base64.b64encode(document["body"]).decode()
    return shown


def _decoded_body(document: dict[str, Any]) -> dict[str, Any]:
    shown = {k: v for k, v in document.items() if k != "body_base64"}
    shown["body"] = base64.b64decode(document["body_base64"])
    return shown


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a client's connection pool is exercised as in production
    # Headers and body are two sends: with Nagle's algorithm on, the body waits ~40 ms for the client's
    # delayed ACK on every call (bench/overhead.py measures it).
    disable_nagle_algorithm = True
    server: LocalHTTPServer

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read .requests
        pass

    def _handle(self) -> None:
        received_at = time.time()
        try:
            parts = urlsplit(self.path)
            exchange = _Exchange(
                method=self.command,
                path=parts.path,
                query=_flatten_query(parts.query),
                headers={name.lower(): value for name, value in self.headers.items()},
                body=self._read_body(),
                received_at=received_at,
            )
            try:
                reply = self.server.app._dispatch(exchange)
            except Exception as exc:  # noqa: BLE001 - an emulator bug must still answer, not hang the client
                reply = _hub_error(500, f"hub emulator error: {type(exc).__name__}: {exc}")
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if reply.drip_s > 0:
                self._drip(reply)
            else:
                self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (timeout test): nothing to answer

    def _drip(self, reply: _Reply) -> None:
        for index in range(len(reply.body)):
            self.wfile.write(reply.body[index : index + 1])
            self.wfile.flush()
            if self.server.app._stopping.wait(reply.drip_s):
                self.close_connection = True
                return

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


HubEmulator.handler_class = _HubRequestHandler  # defined after the emulator, which it serves


class HubEmulatorProcess(ServerProcess):
    """The hub emulator in a child process of its own, with ``HubEmulator``'s methods: each one is a
    request to the child's control API (``/_emulator/...``). What the methods return are copies."""

    def __init__(self, api_keys: Iterable[str] | None = None):
        options = {} if api_keys is None else {"api_keys": sorted(api_keys)}
        super().__init__("local_stack.hub_emulator:HubEmulator", options)

    @property
    def base_url(self) -> str:
        return self.origin

    # ---- seeding ------------------------------------------------------------------------------------

    def add_api_key(self, api_key: str) -> None:
        self._call("POST", "api_keys", {"api_key": api_key})

    def add_project(
        self,
        project_id: str,
        category_schema: dict[str, Any],
        *,
        name: str | None = None,
        workflow: tuple[str, ...] | list[str] = DEFAULT_WORKFLOW,
    ) -> dict[str, Any]:
        return self._call(
            "POST",
            "projects",
            {
                "project_id": project_id,
                "category_schema": category_schema,
                "name": name,
                "workflow": list(workflow),
            },
        )

    def add_asset(
        self,
        project_id: str,
        asset_id: str,
        external_id: str,
        filename: str,
        body: bytes,
        content_type: str = "text/plain",
    ) -> dict[str, Any]:
        return self._call(
            "POST",
            "assets",
            _encoded_body(
                {
                    "project_id": project_id,
                    "asset_id": asset_id,
                    "external_id": external_id,
                    "filename": filename,
                    "body": body,
                    "content_type": content_type,
                }
            ),
        )

    def add_task(
        self,
        project_id: str,
        task_id: str,
        asset_id: str,
        answer: dict[str, Any] | None = None,
        *,
        stage: str = "Plugin",
    ) -> dict[str, Any]:
        return self._call(
            "POST",
            "tasks",
            {
                "project_id": project_id,
                "task_id": task_id,
                "asset_id": asset_id,
                "answer": answer,
                "stage": stage,
            },
        )

    def load_samples(self) -> None:
        """The bundled samples (``samples/hub_seed.json``), read by the child."""
        self._call("POST", "samples")

    # ---- fault injection ----------------------------------------------------------------------------

    def fail_next(
        self,
        path_prefix: str,
        status: int | None = 503,
        times: int = 1,
        latency_s: float = 0.0,
        method: str | None = None,
        body_contains: str | None = None,
        drip_s: float = 0.0,
    ) -> None:
        self._call(
            "POST",
            "faults",
            {
                "path_prefix": path_prefix,
                "status": status,
                "times": times,
                "latency_s": latency_s,
                "method": method,
                "body_contains": body_contains,
                "drip_s": drip_s,
            },
        )

    def clear_faults(self, path_prefix: str | None = None, body_contains: str | None = None) -> None:
        self._call("DELETE", "faults", query={"path_prefix": path_prefix, "body_contains": body_contains})

    def reset(self) -> None:
        self._call("POST", "reset")

    # ---- what the plugin did ------------------------------------------------------------------------

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self._call("GET", "requests")

    def requests_since(self, first: int) -> list[dict[str, Any]]:
        return self._call("GET", "requests", query={"since": first})

    def set_nagle(self, on: bool) -> None:
        self._call("POST", "nagle", {"on": on})

    def attachments(self, external_id: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "attachments", query={"external_id": external_id})

    def annotations(self, task_id: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "annotations", query={"task_id": task_id})

    def plugin_responses(self, session: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "plugin_responses", query={"session": session})

    def plugin_logs(self, session: str | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "plugin_logs", query={"session": session})

    def stored_files(self) -> list[dict[str, Any]]:
        return [_decoded_body(f) for f in self._call("GET", "stored_files")]

    def task(self, task_id: str) -> dict[str, Any]:
        return self._call("GET", "task", query={"task_id": task_id})

    def state(self) -> dict[str, Any]:
        return self._call("GET", "state")

    def _call(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None) -> Any:
        return self.control.call(method, path, body, query)


def load_sample_runs(hub_base_url: str, path: Path | None = None) -> list[SampleRun]:
    """The bundled run payloads, with ``{hub}`` in ``dataURL`` set to the emulator's address and the
    display-only keys (``title``, anything starting with ``_``) taken out of what the hub would send."""
    document = json.loads((path or SAMPLES_DIR / "runs.json").read_text(encoding="utf-8"))
    runs = []
    for entry in document["runs"]:
        payload = {
            key: copy.deepcopy(value)
            for key, value in entry.items()
            if key != "title" and not key.startswith("_")
        }
        if isinstance(payload.get("dataURL"), str):
            payload["dataURL"] = payload["dataURL"].replace("{hub}", hub_base_url.rstrip("/"))
        runs.append(SampleRun(title=entry.get("title", payload.get("session", "")), payload=payload))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the Ango Hub emulator on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--empty", action="store_true", help="do not load the bundled samples")
    args = parser.parse_args(argv)
    emulator = HubEmulator(port=args.port)
    if not args.empty:
        emulator.load_samples()
    with emulator:
        print(f"Ango Hub emulator on {emulator.base_url} (Ctrl-C stops it)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
