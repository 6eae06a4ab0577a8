"""Extract Prompt: build the image prompt from the task (text asset, entity or text classification)."""

from dalle_plugin import wiring
from dalle_plugin.domain.run import RunRef
from dalle_plugin.domain.steps import extract_prompt
from dalle_plugin.observability import bind_run, logger, metrics, tracer


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict, context: object) -> dict:
    ref = RunRef.model_validate(event)
    bind_run(ref.session, ref.task_id, ref.execution_name)
    return extract_prompt(ref, wiring.extract_deps()).dump()
