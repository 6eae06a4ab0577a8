"""The only logger and metrics of the plugin (Powertools). Service name and namespace come from
the standard POWERTOOLS_* variables set in template.yaml Globals.

Handlers call one domain function, then one ``record_*`` helper here with what the domain returned, so the
metrics stay out of the domain and the handlers stay thin. Metric names are PascalCase; every metric has
the ``service`` dimension, and ``RunsFailed`` is also published per ``Reason``.
"""

from __future__ import annotations

import functools
import io
import sys
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, NamedTuple, TypeVar, cast

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit, single_metric

from dalle_plugin.domain.errors import PluginError, Transient
from dalle_plugin.domain.pricing import estimate_cost_usd

if TYPE_CHECKING:  # the run's pydantic models load with the domain on a first event, not at init
    from dalle_plugin.domain.run import RunRecord
    from dalle_plugin.domain.step_io.attach import AttachResult
    from dalle_plugin.domain.step_io.extract import ExtractResult
    from dalle_plugin.domain.step_io.generate import GenerateOutcome


class _CurrentStdout(io.TextIOBase):
    """Writes to whatever ``sys.stdout`` is now. On Lambda that never changes; the local stack swaps it to
    route each invocation's lines to its function's log group, whenever this module was first imported."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


# a TextIOBase is the text stream Logger wants; typeshed types TextIOBase apart from IO[str]
logger = Logger(stream=cast(IO[str], _CurrentStdout()))
metrics = Metrics()
# Tracing is Lambda's own active tracing (template.yaml: Tracing: Active), which records each invocation's
# segment (init, invocation, overhead) within the execution's trace from Step Functions. No X-Ray SDK: it
# was the largest import of every cold start (about 115 ms) and brought its own botocore into the layer.

Handler = TypeVar("Handler", bound=Callable[..., Any])

RUNS_ACCEPTED = "RunsAccepted"
DUPLICATE_RUN_REQUESTS = "DuplicateRunRequests"
RUNS_SUCCEEDED = "RunsSucceeded"
RUNS_FAILED = "RunsFailed"
RUNS_CANCELLED = "RunsCancelled"
IMAGES_GENERATED = "ImagesGenerated"
GENERATION_LATENCY = "GenerationLatency"
RATE_SLOT_WAIT_TIME = "RateSlotWaitTime"
OPENAI_RATE_LIMITED = "OpenAIRateLimited"
ESTIMATED_COST = "EstimatedCost"
PROMPTS_TRUNCATED = "PromptsTruncated"


# ---- logs ------------------------------------------------------------------------------------------


def bind_run(session: str | None, task_id: str | None = None, execution: str | None = None) -> None:
    """Every line after this carries the run's ids, so one Logs Insights query tells a session's story.

    The ids replace the previous ones (a warm container's next invocation never carries the last run's ids)
    and are kept per thread: the local stack runs many invocations at once in one process.
    """
    if execution is None and session and task_id:
        from dalle_plugin.domain.run import RunRef

        execution = RunRef(session=session, task_id=task_id).execution_name
    keys = {"session": session, "task_id": task_id, "execution": execution}
    logger.thread_safe_clear_keys()
    logger.thread_safe_append_keys(**{name: value for name, value in keys.items() if value})


def clear_run() -> None:
    """For invocations about no run (a heartbeat): drop the ids a previous invocation bound."""
    logger.thread_safe_clear_keys()


def log_errors(handler: Handler) -> Handler:
    """Logs a handler's exception with the run's ids before the Lambda runtime reports it (the runtime's
    own error line carries no ids, so a session's story would miss it). Named errors are the plugin's
    contract and their messages never carry a secret: a warning; anything else: an error with its trace."""

    @functools.wraps(handler)
    def wrapper(event: Any, context: Any) -> Any:
        try:
            return handler(event, context)
        except PluginError as exc:
            transient = " (transient)" if isinstance(exc, Transient) else ""
            logger.warning(
                "%s: %s%s",
                type(exc).__name__,
                exc.message,
                transient,
                extra={"error": type(exc).__name__, "reason": exc.reason},
            )
            raise
        except Exception:
            logger.exception("unexpected error")
            raise

    return wrapper  # type: ignore[return-value]


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


# ---- what each handler records -----------------------------------------------------------------------
# Each handler calls one of these after its domain call: one log line for the session's story, and the
# run's metrics. Step contracts carry ids and counts only, never a prompt or a secret.


def lambda_handler(handler: Handler) -> Handler:
    """What every function's handler wears: the Lambda context and run ids on each log line, the metrics it
    counted, and its exception logged before the runtime reports it (the trace is Lambda's own)."""
    return logger.inject_lambda_context(log_metrics(log_errors(handler)))


def record_run_accepted(started: int) -> None:
    """API, on 202: ``started`` runs (tasks) were started. A request that started none (the hub sent the
    same session again) is counted as a duplicate, not as runs."""
    if started:
        logger.info("runs accepted", extra={"started": started})
        metrics.add_metric(name=RUNS_ACCEPTED, unit=MetricUnit.Count, value=started)
    else:
        logger.info("duplicate request: its runs already exist")
        metrics.add_metric(name=DUPLICATE_RUN_REQUESTS, unit=MetricUnit.Count, value=1)


def record_runs_cancelled(cancelled: int) -> None:
    """API, on a cancel: the runs it stopped (none when they had all finished or paid already)."""
    logger.info("runs cancelled", extra={"cancelled": cancelled})
    if cancelled:
        metrics.add_metric(name=RUNS_CANCELLED, unit=MetricUnit.Count, value=cancelled)


def record_prompt_extracted(result: ExtractResult) -> None:
    # the prompt handed on to Generate is the task's text: the log keeps to its length and source
    outcome = result.model_dump(by_alias=True, mode="json", exclude_none=True, exclude={"extracted"})
    logger.info("prompt extracted", extra={"outcome": outcome})
    if result.truncated:
        metrics.add_metric(name=PROMPTS_TRUNCATED, unit=MetricUnit.Count, value=1)


def record_run_succeeded(result: AttachResult) -> None:
    logger.info("run succeeded: image attached", extra={"outcome": result.dump()})
    metrics.add_metric(name=RUNS_SUCCEEDED, unit=MetricUnit.Count, value=1)


def record_run_failed(reason: str) -> None:
    """Once in total (for the failure rate) and once per ``Reason`` (for "why runs fail"). The per-reason
    one is its own EMF document, so the ``Reason`` dimension never leaks onto another metric."""
    logger.info("run failed", extra={"reason": reason})
    metrics.add_metric(name=RUNS_FAILED, unit=MetricUnit.Count, value=1)
    with single_metric(
        name=RUNS_FAILED, unit=MetricUnit.Count, value=1, namespace=metrics.namespace
    ) as metric:
        metric.add_dimension(name="Reason", value=reason or "unknown")


class GenerationFacts(NamedTuple):
    """What one newly generated image cost in time and money."""

    latency_ms: int
    #: from the built-in price table (None for a model it does not price)
    estimated_cost_usd: float | None
    #: the whole wait for slots on the shared key; None for a run on the user's own key
    slot_wait_s: float | None


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
        estimated_cost_usd=estimate_cost_usd(run.image.model, run.image.size, run.image.quality),
        slot_wait_s=slot_wait_s,
    )


def record_generation(
    outcome: GenerateOutcome, read_run: Callable[[], RunRecord | None], since_ms: int
) -> None:
    """Generate Image. A wait on OpenAI's own limit is counted when it happens; an image is counted (with
    its latency, estimated cost and the run's whole rate-slot wait) only by the invocation that made it,
    so a retried Generate that finds its image never counts it twice. ``read_run`` is only called for a
    DONE outcome."""
    if outcome.status == "WAIT":
        logger.info("waiting", extra={"outcome": outcome.dump()})
        if outcome.reason == "openai_rate_limited":
            metrics.add_metric(name=OPENAI_RATE_LIMITED, unit=MetricUnit.Count, value=1)
        return
    run = read_run()
    facts = generation_facts(run, since_ms) if run is not None else None
    # the images handed on to Attach are on the run record once it writes them: the log names the first key
    outcome = outcome.model_copy(update={"generated": None})
    if facts is None:
        logger.info("image already stored: nothing generated", extra={"outcome": outcome.dump()})
        return
    logger.info(
        "image generated",
        extra={
            "outcome": outcome.dump(),
            "generation_ms": facts.latency_ms,
            "slot_wait_s": facts.slot_wait_s,
        },
    )
    metrics.add_metric(name=IMAGES_GENERATED, unit=MetricUnit.Count, value=1)
    metrics.add_metric(name=GENERATION_LATENCY, unit=MetricUnit.Milliseconds, value=facts.latency_ms)
    if facts.estimated_cost_usd is not None:
        metrics.add_metric(name=ESTIMATED_COST, unit=MetricUnit.NoUnit, value=facts.estimated_cost_usd)
    if facts.slot_wait_s is not None:
        metrics.add_metric(name=RATE_SLOT_WAIT_TIME, unit=MetricUnit.Seconds, value=facts.slot_wait_s)
