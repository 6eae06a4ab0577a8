"""The baseline for the overhead figure: one process doing a run's hub and OpenAI calls in a row.

No API, no state machine, no DynamoDB, no KMS, no S3: the same hub and OpenAI requests the pipeline sends
for the same run, against the same emulators, one after the other: a progress line, get the task (and
fetch the asset's text where the prompt comes from it), a progress line, one while the image is generated
with the openai client, one after, a progress line, upload the image to hub storage, look up the asset,
attach the image, read the task again and submit it with its answer, a last progress line. The overhead
bench checks that the hub saw the same requests from both.
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
    fetch_text: bool = False  # the prompt comes from the asset's text: the pipeline downloads it


class NaiveScript:
    def __init__(
        self,
        hub_base_url: str,
        hub_api_key: str,
        openai_base_url: str,
        openai_api_key: str,
        session: str = "naive-session",
    ):
        import openai

        self.session = session
        self.hub = hub_base_url.rstrip("/")
        self.hub_api_key = hub_api_key
        # one session for the script's life, as a warm Lambda environment keeps its connection pool
        self.http = requests.Session()
        self.http.headers["apikey"] = hub_api_key
        self.storage = requests.Session()  # hub storage is another host: the apikey never goes there
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

    def _log(self, task: NaiveTask, message: str) -> None:
        """A progress line in the hub's Plugin Sessions dialog, as the pipeline sends each of its own."""
        self._hub(
            "POST",
            "/v2/pluginLog",
            json={"taskId": task.task_id, "level": "INFO", "session": self.session, "msg": message},
        )

    def run(self, task: NaiveTask) -> dict[str, float]:
        """One run; returns the seconds spent in hub calls and in the OpenAI call, and how many of each."""
        self.timings = {"hub": 0.0, "openai": 0.0}
        self._log(task, f"Run started: model {task.model}, size {task.size}.")
        self._hub("GET", f"/v2/task/{task.task_id}", params={"includeAnswer": "true"})
        if task.fetch_text:
            self._http("GET", task.data_url)
        self._log(task, f"Prompt: {len(task.prompt)} characters.")
        self._log(task, f"Generating the image with {task.model}.")
        params: dict[str, Any] = {"model": task.model, "prompt": task.prompt, "size": task.size, "n": 1}
        if task.quality:
            params["quality"] = task.quality
        image = self._timed("openai", self.openai.images.generate, **params)
        png = base64.b64decode(image.data[0].b64_json)
        self._log(task, "Image generated.")
        self._log(task, "Uploading the image to the hub.")
        upload = self._hub(
            "GET",
            "/v2/getUploadUrl",
            params={"name": f"naive-{task.task_id}.png", "project": task.project_id, "type": "assets"},
        )
        upload_url = upload["data"]["uploadUrl"]
        # a presigned storage URL: no apikey header, as the pipeline sends it
        self._timed(
            "hub", self.storage.put, upload_url, data=png, headers={"Content-Type": "image/png"}, timeout=30
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
        answer = self._hub("GET", f"/v2/task/{task.task_id}", params={"includeAnswer": "true"})["data"][
            "task"
        ]
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
        self._log(task, "Image attached to the asset.")
        return dict(self.timings)
