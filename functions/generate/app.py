"""Generate Image: take a global rate slot (shared key only), call OpenAI once, keep the PNG in S3."""

from dalle_plugin import wiring
from dalle_plugin.domain.run import RunRef
from dalle_plugin.domain.steps import generate_image
from dalle_plugin.observability import bind_run, logger, metrics, tracer


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict, context: object) -> dict:
    ref = RunRef.model_validate(event)
    bind_run(ref.session, ref.task_id, ref.execution_name)
    return generate_image(ref, wiring.generate_deps()).dump()
