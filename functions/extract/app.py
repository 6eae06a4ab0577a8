"""Extract Prompt: build the image prompt from the task (text asset, entity or text classification).

Init imports only the logging (Powertools' Logger); the domain, its pydantic models and the AWS adapters load
on the first event (docs/performance.md, "Cold starts", says what that first event pays)."""

from dalle_plugin.observability import bind_run, lambda_handler, record_prompt_extracted


@lambda_handler
def handler(event: dict, context: object) -> dict:
    from dalle_plugin import wiring
    from dalle_plugin.domain.run import RunRef
    from dalle_plugin.domain.steps.extract import extract_prompt

    ref = RunRef.model_validate(event)
    bind_run(ref.session, ref.task_id, ref.execution_name)
    result = extract_prompt(ref, wiring.within_time(wiring.extract_deps(), context))
    record_prompt_extracted(result)
    return result.dump()
