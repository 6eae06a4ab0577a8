"""What ``GET /sessions/{id}`` shows: a summary of the session and pages of its runs as a person reads them.
Never a secret.

A session may hold 10,000 tasks with long prompts, far past Lambda's 6 MB answer, so the runs come in pages
(each one DynamoDB Query page: at most 1 MB read) and the summary is counted from a few small attributes of
every run (``RunTally``), never from the whole records."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dalle_plugin.domain.api_contract import DEFAULT_PAGE_SIZE
from dalle_plugin.domain.errors import InvalidRequest
from dalle_plugin.domain.pricing import DEFAULT_PRICES, estimate_cost_usd
from dalle_plugin.domain.run import ImageInfo, RunRecord, RunStatus
from dalle_plugin.domain.step_io.api import RunTally

if TYPE_CHECKING:
    from dalle_plugin.ports import BatchProgress, ImageStore, SessionPages


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
    view["estimatedCostUsd"] = _cost(RunTally.of(run), prices)
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


def session_summary(
    session: str,
    tallies: list[RunTally],
    prices: Mapping[str, Mapping[str, float]] = DEFAULT_PRICES,
) -> dict[str, Any]:
    """The session as a whole: its state, progress, counts by status, cost and when it began and last moved."""
    counts: dict[str, int] = {}
    for run in tallies:
        counts[run.status.value] = counts.get(run.status.value, 0) + 1
    if all(run.status is RunStatus.SUCCEEDED for run in tallies):
        status = RunStatus.SUCCEEDED.value
    elif all(run.status.finished for run in tallies):
        any_failed = any(r.status is RunStatus.FAILED for r in tallies)
        status = (RunStatus.FAILED if any_failed else RunStatus.CANCELLED).value
    else:
        status = "RUNNING" if len(tallies) > 1 else tallies[0].status.value
    waiting = sum(1 for run in tallies if run.status in (RunStatus.QUEUED, RunStatus.WAITING_FOR_SLOT))
    return {
        "session": session,
        "status": status,
        "progress": {
            "total": len(tallies),
            "done": counts.get(RunStatus.SUCCEEDED.value, 0),
            "failed": counts.get(RunStatus.FAILED.value, 0),
            "cancelled": counts.get(RunStatus.CANCELLED.value, 0),
            "waiting": waiting,
            "running": len(tallies) - waiting - sum(1 for run in tallies if run.status.finished),
        },
        "counts": counts,
        "estimatedCostUsd": round(sum(_cost(run, prices) or 0.0 for run in tallies), 4),
        "maxCostUsd": next((run.max_cost_usd for run in tallies if run.max_cost_usd is not None), None),
        "createdAtMs": min(run.created_at_ms for run in tallies),
        "updatedAtMs": max(run.updated_at_ms for run in tallies),
    }


def _cost(run: RunTally, prices: Mapping[str, Mapping[str, float]]) -> float | None:
    """Paid once the images exist (a cancelled or refused run costs nothing); every image counts."""
    if not run.image_count:
        return 0.0
    per_image = estimate_cost_usd(run.model.actual, run.size, run.quality, prices) if run.model else None
    return None if per_image is None else round(per_image * run.image_count, 4)


def session_view(
    session: str,
    runs: list[RunRecord],
    images: ImageStore | None = None,
    prices: Mapping[str, Mapping[str, float]] = DEFAULT_PRICES,
) -> dict[str, Any]:
    """A small session whole: its summary and every run, oldest first (for tools and tests)."""
    ordered = sorted(runs, key=lambda r: (r.created_at_ms, r.task_id))
    return session_summary(session, [RunTally.of(run) for run in runs], prices) | {
        "runs": [run_view(run, images, prices) for run in ordered],
        "next": None,
    }


def page_token(after_task_id: str) -> str:
    """An opaque token for the page that follows task ``after_task_id``."""
    raw = json.dumps({"after": after_task_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def task_after(token: str) -> str:
    """The task a ``page_token`` continues after; a token that is not one is the caller's mistake."""
    try:
        after = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))["after"]
    except (ValueError, TypeError, KeyError, RecursionError):
        after = None
    if not isinstance(after, str) or not 0 < len(after) <= 256:
        raise InvalidRequest(
            "Query parameter 'page' is not a page of this session: pass the 'next' of the answer before.",
            field="page",
        )
    return after


def session_page(
    session: str,
    pages: SessionPages,
    limit: int = DEFAULT_PAGE_SIZE,
    token: str | None = None,
    images: ImageStore | None = None,
    prices: Mapping[str, Mapping[str, float]] = DEFAULT_PRICES,
    batches: BatchProgress | None = None,
) -> dict[str, Any] | None:
    """The first page (no ``token``): the session's summary and its first ``limit`` runs; a later page: its
    runs only. ``next`` names the page after, or is None at the end (a page may hold fewer than ``limit``
    runs, even none). None when the session has no runs."""
    after = task_after(token) if token is not None else None
    runs, last = pages.page(session, limit, after)
    if after is None:
        tallies = pages.tallies(session)
        requests = batches.of_session(session) if batches else []
        storing = [b for b in requests if b.under_way]
        ended = [b for b in requests if b.ended_by is not None]
        if not tallies and not storing and not ended:
            return None
        view: dict[str, Any] = {"session": session, "status": "STORING"}  # before the starter's first run
        if tallies:
            view = session_summary(session, tallies, prices)
        elif not storing:  # every attempt ended before it stored a run
            view["status"] = "FAILED" if any(b.ended_by == "failed" for b in ended) else "CANCELLED"
        if storing:  # the batch starter is still at work: more runs will appear
            view["storing"] = {
                "accepted": sum(b.accepted for b in storing),
                "stored": sum(b.stored for b in storing),
            }
        if ended:  # a starter that failed or was cancelled: what happened, and what to do
            view["storingStopped"] = [b.ended_why or "" for b in ended]
    else:
        view = {"session": session}
    view["runs"] = [run_view(run, images, prices) for run in runs]
    view["next"] = page_token(last) if last else None
    return view
