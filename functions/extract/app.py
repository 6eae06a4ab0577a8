"""Extract Prompt: build the image prompt from the task (text asset, entity or text classification)."""

from dalle_plugin import wiring
from dalle_plugin.domain.run import RunRef
from dalle_plugin.domain.steps import extract_prompt
from dalle_plugin.observability import (
    bind_run,
    log_errors,
    log_metrics,
    logger,
    record_prompt_extracted,
    tracer,
)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@log_metrics
@log_errors
def handler(event: dict, context: object) -> dict:
    ref = RunRef.model_validate(event)
    bind_run(ref.session, ref.task_id, ref.execution_name)
    result = extract_prompt(ref, wiring.extract_deps())
    record_prompt_extracted(result)
    return result.dump()
