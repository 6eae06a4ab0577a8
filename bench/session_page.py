"""The first page of ``GET /sessions/{id}`` for a large session: its time, its DynamoDB calls and the bytes
they carried, on DynamoDB Local with the sessions table as template.yaml defines it.

``python -m bench.session_page [--runs 2000] [--prompt-chars 60] [--repeats 3]`` seeds one session's runs
through the project's own store (``DynamoRunStore.create_many``, as the batch starter writes them: each
with its chunk's 100 task ids, sealed secrets and a timeline; a third of them finished with an image), then
asks ``session_page`` for the first page as the API does. Prints one JSON line; writes nothing tracked.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any

from dalle_plugin.adapters.dynamo_runs import DynamoRunStore
from dalle_plugin.domain.run import (
    ImageInfo,
    ModelInfo,
    PromptInfo,
    RunRecord,
    RunStatus,
    TimelineEntry,
)
from dalle_plugin.domain.sessions import session_page

from local_stack.dynamodb_local import DynamoDBLocal, local_client
from local_stack.template import create_table_from_template

SESSION = "bench-big-session"
CHUNK = 100


def seeded_run(n: int, runs: int, prompt_chars: int) -> RunRecord:
    """Run ``n`` of a ``runs``-task batch, as it stands part way through: finished, failed or queued."""
    first = n - n % CHUNK
    chunk = [f"task-big-{i:05d}" for i in range(first, min(first + CHUNK, runs))]
    run = RunRecord(
        session=SESSION,
        task_id=f"task-big-{n:05d}",
        execution_name=f"{SESSION}_task-big-{n:05d}",
        owner=f"{SESSION}_c{first // CHUNK}",
        chunk=chunk,
        project_id="project-big",
        asset_id=f"asset-big-{n:05d}",
        org_id="org-1",
        run_by="someone@example.com",
        prompt_source="full-text-asset",
        model=ModelInfo(requested="gpt-image-2", actual="gpt-image-2"),
        size="1024x1024",
        quality="low",
        max_prompt_chars=32_000,
        uses_default_key=False,
        sealed_secrets=b"\x01" * 420,  # a KMS ciphertext of two keys is about this size
        created_at_ms=1_000_000 + n,
        updated_at_ms=1_000_000 + n,
        timeline=[TimelineEntry(step="queued", status="QUEUED", at_ms=1_000_000 + n)],
    )
    if n % 3 == 0:  # a third finished: the prompt read, the image made and attached
        run.status = RunStatus.SUCCEEDED
        run.prompt = PromptInfo(
            text=("A lighthouse on a cliff, painted in oils. " * 1000)[:prompt_chars],
            source="full-text-asset",
            length=prompt_chars,
            original_length=prompt_chars,
        )
        run.image = ImageInfo(
            key=f"images/{SESSION}/task-big-{n:05d}/0.png",
            sha256="ab" * 32,
            bytes=1_500_000,
            model="gpt-image-2",
            size="1024x1024",
            quality="low",
            hub_url=f"https://hub.example/attachments/{n}",
            attached=True,
        )
        steps = ["extracting", "generating", "attaching", "succeeded"]
        run.timeline += [
            TimelineEntry(step=step, status=step.upper(), at_ms=1_000_100 + n, duration_ms=100)
            for step in steps
        ]
        run.updated_at_ms = 1_000_500 + n
    elif n % 50 == 1:
        run.status = RunStatus.FAILED
        run.updated_at_ms = 1_000_400 + n
    return run


class CallCounter:
    """Every DynamoDB call the client makes, the bytes of its answers, and the bytes it read as DynamoDB
    bills them (its consumed capacity: a read unit is 4 KB read consistently, 8 KB eventually)."""

    def __init__(self, client: Any) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes = 0
        self.read_bytes = 0
        self._eventually = False
        client.meta.events.register("provide-client-params.dynamodb.Query", self._ask_capacity)
        client.meta.events.register("after-call.dynamodb", self._after)

    def _ask_capacity(self, params: dict[str, Any], **_: Any) -> None:
        params["ReturnConsumedCapacity"] = "TOTAL"
        self._eventually = "IndexName" in params  # an index is read eventually consistent: 8 KB a unit

    def _after(self, http_response: Any, parsed: dict[str, Any], model: Any, **_: Any) -> None:
        self.calls[model.name] += 1
        self.bytes += len(http_response.content or b"")
        units = parsed.get("ConsumedCapacity", {}).get("CapacityUnits", 0.0)
        self.read_bytes += int(units * 4096 * (2 if self._eventually else 1))

    def clear(self) -> None:
        self.calls.clear()
        self.bytes = self.read_bytes = 0


def measure(endpoint: str, runs: int, prompt_chars: int, repeats: int) -> dict[str, Any]:
    client = local_client(endpoint)
    table = create_table_from_template(client, "SessionsTable", "bench-sessions")
    store = DynamoRunStore(client, table)
    started = time.perf_counter()
    records = [seeded_run(n, runs, prompt_chars) for n in range(runs)]
    for start in range(0, runs, 1000):
        store.create_many(records[start : start + 1000])
    seeded_s = time.perf_counter() - started
    counter = CallCounter(client)
    times, view = [], None
    for _ in range(repeats):
        counter.clear()
        store = DynamoRunStore(client, table)  # a fresh API container's store: nothing remembered
        started = time.perf_counter()
        view = session_page(SESSION, store)
        times.append(time.perf_counter() - started)
    assert view is not None and view["progress"]["total"] == runs, view and view.get("progress")
    return {
        "runs": runs,
        "prompt_chars": prompt_chars,
        "seed_s": round(seeded_s, 1),
        "first_page_s": [round(t, 2) for t in times],
        "calls": dict(counter.calls),
        "answer_bytes": counter.bytes,
        "read_bytes": counter.read_bytes,
        "progress": view["progress"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.session_page", description=__doc__)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--prompt-chars", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with DynamoDBLocal() as dynamodb:
        result = measure(dynamodb.endpoint_url, args.runs, args.prompt_chars, args.repeats)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
