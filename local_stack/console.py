"""The local console: a page at the local API's root that shows every session as it runs.

Served by the API Gateway stand-in beside the real routes (``ApiGatewayServer.extra_routes``), on 127.0.0.1
only. It lists the sessions from the sessions table (the same summary and first page of runs that
``GET /sessions/{id}`` gives: never a secret), the hub's Plugin Sessions log lines for each, and the generated images from the hub's storage,
and it can start a bundled sample run through the real ``POST /plugin`` (the Secret is added here, on the
server: the page never sees it).

Routes: ``GET /`` (the page), ``GET /_console/<file>`` (its script and style), ``GET /_console/sessions``,
``GET /_console/samples``, ``POST /_console/runs?sample=<index>&token=<token>``. The token is handed to
the page inside it, so another site open in the same browser cannot start runs.
"""

from __future__ import annotations

import hmac
import json
import secrets
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import requests
from dalle_plugin.adapters.dynamo_runs import DynamoRunStore
from dalle_plugin.domain.sessions import session_page

from local_stack.api_gateway import ExtraRoute
from local_stack.hub_emulator import SampleRun, load_sample_runs

if TYPE_CHECKING:
    from local_stack.stack import LocalStack

STATIC_DIR = Path(__file__).resolve().parent / "console"
STATIC_FILES = {
    "/_console/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/_console/console.css": ("console.css", "text/css; charset=utf-8"),
}
MAX_SESSIONS = 30
RUNS_SHOWN = 50  # runs shown per session: the first page of GET /sessions/{id}
# What a hub log line may show: the message and where it belongs, not who ran it or the plugin's ids.
LOG_FIELDS = ("level", "msg", "taskId")

Answer = tuple[int, str, bytes]


def _json(status: int, body: Any) -> Answer:
    return status, "application/json; charset=utf-8", json.dumps(body, separators=(",", ":")).encode()


class Console:
    def __init__(self, stack: LocalStack):
        self.stack = stack
        self.token = secrets.token_urlsafe(18)

    # ---- routing ------------------------------------------------------------------------------------

    def route(self, method: str, request: dict[str, str]) -> Answer | None:
        path, query = request["path"], parse_qs(request.get("query") or "")
        if method == "GET" and path in ("/", "/index.html"):
            page = (STATIC_DIR / "index.html").read_text(encoding="utf-8").replace("{{token}}", self.token)
            return 200, "text/html; charset=utf-8", page.encode()
        if method == "GET" and path in STATIC_FILES:
            name, content_type = STATIC_FILES[path]
            return 200, content_type, (STATIC_DIR / name).read_bytes()
        if method == "GET" and path == "/_console/sessions":
            return _json(200, {"sessions": self.sessions()})
        if method == "GET" and path == "/_console/samples":
            return _json(
                200,
                {
                    "samples": [
                        {"index": i, "title": s.title, "taskId": s.payload["taskId"]}
                        for i, s in enumerate(self.samples())
                    ]
                },
            )
        if method == "POST" and path == "/_console/runs":
            given = (query.get("token") or [""])[0]
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return _json(403, {"message": "Start runs from the console page."})
            return self.start_sample((query.get("sample") or [""])[0])
        return None

    # ---- what the page shows ------------------------------------------------------------------------

    def samples(self) -> list[SampleRun]:
        return load_sample_runs(self.stack.hub.base_url)

    def _newest_sessions(self) -> list[str]:
        """The sessions with the newest runs, from two small attributes of every run record (the table also
        holds spending counters and images on offer for a re-run: only run records are read)."""
        client = self.stack.client("dynamodb")
        kwargs: dict[str, Any] = {
            "TableName": self.stack.table_name("SessionsTable"),
            "ProjectionExpression": "#pk, #created, #doc",
            "FilterExpression": "begins_with(sk, :task)",
            "ExpressionAttributeNames": {"#pk": "pk", "#created": "createdAtMs", "#doc": "doc"},
            "ExpressionAttributeValues": {":task": {"S": "TASK#"}},
        }
        newest: dict[str, int] = {}
        while True:
            page = client.scan(**kwargs)
            for item in page.get("Items", []):
                session = item["pk"]["S"].removeprefix("SESSION#")
                created = (
                    json.loads(item["doc"]["S"])["createdAtMs"]
                    if "doc" in item
                    else json.loads(item["createdAtMs"]["S"])
                )
                newest[session] = max(newest.get(session, 0), int(created))
            if "LastEvaluatedKey" not in page:
                break
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]
        return sorted(newest, key=lambda session: newest[session], reverse=True)[:MAX_SESSIONS]

    def sessions(self) -> list[dict[str, Any]]:
        """The newest sessions first, each as ``GET /sessions/{id}``'s first page shows it plus the hub's
        log lines."""
        store = DynamoRunStore(self.stack.client("dynamodb"), self.stack.table_name("SessionsTable"))
        views = []
        for session in self._newest_sessions():
            view = session_page(session, store, limit=RUNS_SHOWN)
            if view is None:
                continue
            view["logs"] = [
                {field: line.get(field) for field in LOG_FIELDS}
                for line in self.stack.hub.plugin_logs(session)
            ]
            views.append(view)
        return views

    # ---- starting a sample run ----------------------------------------------------------------------

    def start_sample(self, index: str) -> Answer:
        samples = self.samples()
        if not index.isdigit() or int(index) >= len(samples):
            return _json(400, {"message": f"sample must be 0 to {len(samples) - 1}"})
        payload = dict(samples[int(index)].payload)
        payload["session"] = f"console-{payload['taskId']}-{uuid.uuid4().hex[:8]}"
        # What the hub does: the real endpoint, with the plugin Secret in the header.
        answer = requests.post(
            f"{self.stack.api_url}/plugin",
            json=payload,
            headers={"Secret": self.stack.plugin_secret},
            timeout=30,
        )
        try:
            body = answer.json()
        except ValueError:
            body = {"message": answer.text}
        return _json(answer.status_code, {"session": payload["session"], "answer": body})


def console_routes(stack: LocalStack) -> ExtraRoute:
    return Console(stack).route
