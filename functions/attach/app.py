"""Attach Image: upload the PNG to the hub, attach it to the asset, and finish the run on the hub."""

from dalle_plugin import wiring
from dalle_plugin.domain.run import RunRef
from dalle_plugin.domain.steps import attach_image
from dalle_plugin.observability import bind_run, logger, metrics, tracer


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict, context: object) -> dict:
    ref = RunRef.model_validate(event)
    bind_run(ref.session, ref.task_id, ref.execution_name)
    return attach_image(ref, wiring.attach_deps()).dump()
