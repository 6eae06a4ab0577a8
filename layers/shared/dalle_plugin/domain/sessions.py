"""What ``GET /sessions/{id}`` shows: the session's runs as a person reads them. Never a secret."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dalle_plugin.domain.pricing import DEFAULT_PRICES, estimate_cost_usd
from dalle_plugin.domain.run import ImageInfo, RunRecord, RunStatus
from dalle_plugin.ports import ImageStore


def run_view(
    run: RunRecord,
    images: ImageStore | None = None,
    prices: Mapping[str, Mapping[str, float]] = DEFAULT_PRICES,
) -> dict[str, Any]:
    view: dict[str, Any] = {
        "taskId": run.task_id,
        "status": run.status.value,
        "workflow": run.workflow,
        "model": run.model.dump(),
        "size": run.size,
        "quality": run.quality,
        "promptSource": run.prompt_source,
        "notes": run.notes,
        "prompt": run.prompt.dump() if run.prompt else None,
        "createdAtMs": run.created_at_ms,
        "updatedAtMs": run.updated_at_ms,
        "timeline": [entry.dump() for entry in run.timeline],
    }
    if run.status is RunStatus.WAITING_FOR_SLOT and run.rate_wait:
        view["queue"] = {"position": run.rate_wait.position, "startAtMs": run.rate_wait.start_at_ms}
    view["output"] = {
        "imagesPerTask": run.images_per_task,
        "format": run.output_format,
        "compression": run.output_compression,
        "background": run.background,
        "promptTemplate": run.prompt_template,
    }
    if run.max_cost_usd is not None:
        view["maxCostUsd"] = run.max_cost_usd
    if run.images:
        view["images"] = [_image_view(image, images) for image in run.images]
        view["image"] = view["images"][0]  # the first, as before several images per task existed
    if run.failure:
        view["failure"] = run.failure.dump()
    # paid once the images exist (a cancelled or refused run costs nothing); every image of the request counts
    per_image = estimate_cost_usd(run.model.actual, run.size, run.quality, prices)
    view["estimatedCostUsd"] = (
        (None if per_image is None else round(per_image * len(run.images), 4)) if run.images else 0.0
    )
    return view


def _image_view(image: ImageInfo, store: ImageStore | None) -> dict[str, Any]:
    shown: dict[str, Any] = {
        "hubUrl": image.hub_url,
        "attached": image.attached,
        "sha256": image.sha256,
        "bytes": image.bytes,
        "model": image.model,
        "format": image.format,
    }
    if store is not None:
        shown["downloadUrl"] = store.presigned_url(image.key)
    return shown


def session_view(
    session: str,
    runs: list[RunRecord],
    images: ImageStore | None = None,
    prices: Mapping[str, Mapping[str, float]] = DEFAULT_PRICES,
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status.value] = counts.get(run.status.value, 0) + 1
    if all(run.status is RunStatus.SUCCEEDED for run in runs):
        status = RunStatus.SUCCEEDED.value
    elif all(run.status.finished for run in runs):
        any_failed = any(r.status is RunStatus.FAILED for r in runs)
        status = (RunStatus.FAILED if any_failed else RunStatus.CANCELLED).value
    else:
        status = "RUNNING" if len(runs) > 1 else runs[0].status.value
    views = [
        run_view(run, images, prices) for run in sorted(runs, key=lambda r: (r.created_at_ms, r.task_id))
    ]
    waiting = sum(1 for run in runs if run.status in (RunStatus.QUEUED, RunStatus.WAITING_FOR_SLOT))
    return {
        "session": session,
        "status": status,
        "progress": {
            "total": len(runs),
            "done": counts.get(RunStatus.SUCCEEDED.value, 0),
            "failed": counts.get(RunStatus.FAILED.value, 0),
            "cancelled": counts.get(RunStatus.CANCELLED.value, 0),
            "waiting": waiting,
            "running": len(runs) - waiting - sum(1 for run in runs if run.status.finished),
        },
        "counts": counts,
        "estimatedCostUsd": round(sum(view["estimatedCostUsd"] or 0.0 for view in views), 4),
        "maxCostUsd": next((run.max_cost_usd for run in runs if run.max_cost_usd is not None), None),
        "runs": views,
    }
