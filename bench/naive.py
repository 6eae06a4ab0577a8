"""The baseline for the overhead figure: one process doing a run's hub and OpenAI calls in a row.

No API, no state machine, no DynamoDB, no KMS, no S3, no progress lines: get the task, fetch the asset
text, generate the image with the openai client, upload it to hub storage, attach it to the asset and
submit the task, the same requests the pipeline sends for the same run, against the same emulators.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import requests


@dataclass(frozen=True)
class NaiveTask:
    project_id: str
    task_id: str
    asset_id: str
    data_url: str
    prompt: str  # what the pipeline sent for this task, so OpenAI (the emulator) does the same work
    model: str
    size: str
    quality: str | None


class NaiveScript:
    def __init__(self, hub_base_url: str, hub_api_key: str, openai_base_url: str, openai_api_key: str):
        import openai

        self.hub = hub_base_url.rstrip("/")
        self.hub_api_key = hub_api_key
        self.http = requests.Session()
        self.openai = openai.OpenAI(api_key=openai_api_key, base_url=openai_base_url)
        self.timings: dict[str, float] = {}

    def _timed(self, kind: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            self.timings[kind] = self.timings.get(kind, 0.0) + time.perf_counter() - started
            self.timings[f"{kind}_calls"] = self.timings.get(f"{kind}_calls", 0) + 1

    def _http(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        answer = self._timed("hub", self.http.request, method, url, timeout=30, **kwargs)
        answer.raise_for_status()
        return answer

    def _hub(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._http(method, self.hub + path, **kwargs).json()

    def run(self, task: NaiveTask) -> dict[str, float]:
        """One run; returns the seconds spent in hub calls and in the OpenAI call, and how many of each."""
        self.timings = {"hub": 0.0, "openai": 0.0}
        self.http = requests.Session()  # a connection per run, as each of the pipeline's steps opens its own
        self.http.headers["apikey"] = self.hub_api_key
        answer = self._hub("GET", f"/v2/task/{task.task_id}", params={"includeAnswer": "true"})["data"][
            "task"
        ]
        self._http("GET", task.data_url)
        params: dict[str, Any] = {"model": task.model, "prompt": task.prompt, "size": task.size, "n": 1}
        if task.quality:
            params["quality"] = task.quality
        image = self._timed("openai", self.openai.images.generate, **params)
        png = base64.b64decode(image.data[0].b64_json)
        upload = self._hub(
            "GET",
            "/v2/getUploadUrl",
            params={"name": f"naive-{task.task_id}.png", "project": task.project_id, "type": "assets"},
        )
        upload_url = upload["data"]["uploadUrl"]
        # a presigned storage URL: no apikey header, as the pipeline sends it
        self._timed(
            "hub", requests.put, upload_url, data=png, headers={"Content-Type": "image/png"}, timeout=30
        ).raise_for_status()
        assets = self._hub(
            "GET",
            f"/v2/project/{task.project_id}/assets",
            params={"page": "1", "limit": "10", "filters": json.dumps({"_id": task.asset_id})},
        )
        external_id = assets["data"]["assets"][0]["externalId"]
        self._hub(
            "POST",
            "/v2/attachments",
            json={
                "project": task.project_id,
                "attachments": [
                    {
                        "externalId": external_id,
                        "attachments": [{"type": "IMAGE", "value": upload_url.split("?")[0]}],
                    }
                ],
            },
        )
        objects = answer["answer"].get("tools", [])
        self._hub(
            "POST",
            f"/v2/annotate/{task.task_id}",
            params={"nextStage": "true", "isPlugin": "true"},
            json={
                "answer": {
                    "objects": objects,
                    "classifications": answer["answer"].get("classifications", []),
                    "relations": answer["answer"].get("relations", []),
                },
                "brushDataUrl": None,
                "medicalBrushDataUrl": None,
                "duration": 0,
            },
        )
        return dict(self.timings)
