"""The only logger, tracer and metrics of the plugin (Powertools). Service name and namespace come from
the standard POWERTOOLS_* variables set in template.yaml Globals."""

from aws_lambda_powertools import Logger, Metrics, Tracer

logger = Logger()
tracer = Tracer()
metrics = Metrics()


def bind_run(session: str | None, task_id: str | None, execution: str | None = None) -> None:
    """Every line after this carries the run's ids, so one Logs Insights query tells a session's story."""
    logger.append_keys(session=session, task_id=task_id, execution=execution)
