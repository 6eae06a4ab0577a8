"""The only logger, tracer and metrics of the plugin (Powertools). Service name and namespace come from
the standard POWERTOOLS_* variables set in template.yaml Globals.

Handlers call one domain function, then one ``record_*`` helper here with what the domain returned, so the
metrics stay out of the domain and the handlers stay thin. Metric names are PascalCase; every metric has
the ``service`` dimension, and ``RunsFailed`` is also published per ``Reason``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit, single_metric

from dalle_plugin.domain.models_catalog import parse_size
from dalle_plugin.domain.run import GenerateOutcome, RunRecord, RunRef

logger = Logger()
tracer = Tracer()
metrics = Metrics()

Handler = TypeVar("Handler", bound=Callable[..., Any])

RUNS_ACCEPTED = "RunsAccepted"
DUPLICATE_RUN_REQUESTS = "DuplicateRunRequests"
RUNS_SUCCEEDED = "RunsSucceeded"
RUNS_FAILED = "RunsFailed"
IMAGES_GENERATED = "ImagesGenerated"
GENERATION_LATENCY = "GenerationLatency"
RATE_SLOT_WAIT_TIME = "RateSlotWaitTime"
OPENAI_RATE_LIMITED = "OpenAIRateLimited"
ESTIMATED_COST = "EstimatedCost"

# USD per 1024x1024 image by quality (OpenAI's per-image list prices for the gpt-image-1 family); other
# sizes scale with their pixel count. An estimate for the dashboard, not a bill.
PRICE_PER_MEGAPIXEL_IMAGE_USD = {"low": 0.011, "medium": 0.042, "high": 0.167}
_REFERENCE_PIXELS = 1024 * 1024


# ---- logs ------------------------------------------------------------------------------------------


def bind_run(session: str | None, task_id: str | None = None, execution: str | None = None) -> None:
    """Every line after this carries the run's ids, so one Logs Insights query tells a session's story.

    The ids replace the previous ones (a warm container's next invocation never carries the last run's ids)
    and are kept per thread: the local stack runs many invocations at once in one process.
    """
    if execution is None and session and task_id:
        execution = RunRef(session=session, task_id=task_id).execution_name
    keys = {"session": session, "task_id": task_id, "execution": execution}
    logger.thread_safe_clear_keys()
    logger.thread_safe_append_keys(**{name: value for name, value in keys.items() if value})


def clear_run() -> None:
    """For invocations about no run (a heartbeat): drop the ids a previous invocation bound."""
    logger.thread_safe_clear_keys()


# ---- metrics: publishing ---------------------------------------------------------------------------


def log_metrics(handler: Handler) -> Handler:
    """Powertools' ``log_metrics`` without its "No application metrics to publish" warning: an invocation
    that has nothing to count (a heartbeat, a step that only waited) publishes nothing."""

    @functools.wraps(handler)
    def wrapper(event: Any, context: Any) -> Any:
        try:
            return handler(event, context)
        finally:
            if metrics.metric_set:
                metrics.flush_metrics()

    return wrapper  # type: ignore[return-value]


# ---- metrics: what each handler records --------------------------------------------------------------


def record_run_accepted(created: bool) -> None:
    """API, on 202. A duplicate (the hub sent the same session + task again) is not a new run."""
    metrics.add_metric(name=RUNS_ACCEPTED if created else DUPLICATE_RUN_REQUESTS, unit=MetricUnit.Count, value=1)


def record_run_succeeded() -> None:
    metrics.add_metric(name=RUNS_SUCCEEDED, unit=MetricUnit.Count, value=1)


def record_run_failed(reason: str) -> None:
    """Once in total (for the failure rate) and once per ``Reason`` (for "why runs fail"). The per-reason
    one is its own EMF document, so the ``Reason`` dimension never leaks onto another metric."""
    metrics.add_metric(name=RUNS_FAILED, unit=MetricUnit.Count, value=1)
    with single_metric(name=RUNS_FAILED, unit=MetricUnit.Count, value=1,
                       namespace=metrics.namespace) as metric:
        metric.add_dimension(name="Reason", value=reason or "unknown")


@dataclass(frozen=True)
class GenerationFacts:
    """What one newly generated image cost in time and money."""

    latency_ms: int
    estimated_cost_usd: float
    #: the whole wait for slots on the shared key; None for a run on the user's own key
    slot_wait_s: float | None


def estimated_cost_usd(size: str, quality: str | None) -> float:
    price = PRICE_PER_MEGAPIXEL_IMAGE_USD.get(quality or "", PRICE_PER_MEGAPIXEL_IMAGE_USD["medium"])
    dimensions = parse_size(size)  # None for "auto": priced as the reference size
    pixels = dimensions[0] * dimensions[1] if dimensions else _REFERENCE_PIXELS
    return round(price * pixels / _REFERENCE_PIXELS, 6)


def generation_facts(run: RunRecord, since_ms: int) -> GenerationFacts | None:
    """The facts of the image generated by the invocation that started at ``since_ms``, read from the run's
    timeline; None when that invocation generated nothing (the image was already there).

    A generation leaves two ``generate`` entries: "Generating ..." when the request starts and "Image
    generated ..." when the PNG is stored, so the first one's span is the generation's latency.
    """
    generating = [entry for entry in run.timeline if entry.step == "generate" and entry.at_ms >= since_ms]
    if run.image is None or len(generating) < 2:
        return None
    slot_wait_s = None
    if run.uses_default_key:
        waited_ms = sum(entry.duration_ms or 0 for entry in run.timeline if entry.step == "wait")
        slot_wait_s = waited_ms / 1000
    return GenerationFacts(
        latency_ms=generating[-1].at_ms - generating[0].at_ms,
        estimated_cost_usd=estimated_cost_usd(run.image.size, run.image.quality),
        slot_wait_s=slot_wait_s,
    )


def record_generation(outcome: GenerateOutcome, read_run: Callable[[], RunRecord | None], since_ms: int) -> None:
    """Generate Image. A wait on OpenAI's own limit is counted when it happens; an image is counted (with
    its latency, estimated cost and the run's whole rate-slot wait) only by the invocation that made it,
    so a retried Generate that finds its image never counts it twice. ``read_run`` is only called for a
    DONE outcome."""
    if outcome.status == "WAIT":
        if outcome.reason == "openai_rate_limited":
            metrics.add_metric(name=OPENAI_RATE_LIMITED, unit=MetricUnit.Count, value=1)
        return
    run = read_run()
    facts = generation_facts(run, since_ms) if run is not None else None
    if facts is None:
        return
    metrics.add_metric(name=IMAGES_GENERATED, unit=MetricUnit.Count, value=1)
    metrics.add_metric(name=GENERATION_LATENCY, unit=MetricUnit.Milliseconds, value=facts.latency_ms)
    metrics.add_metric(name=ESTIMATED_COST, unit=MetricUnit.NoUnit, value=facts.estimated_cost_usd)
    if facts.slot_wait_s is not None:
        metrics.add_metric(name=RATE_SLOT_WAIT_TIME, unit=MetricUnit.Seconds, value=facts.slot_wait_s)
