"""Attach Image: upload the PNG to the hub, attach it to the asset, and finish the run on the hub.

Init imports only the logging (Powertools' Logger); the domain, its pydantic models and the AWS adapters load
on the first event (docs/performance.md, "Cold starts", says what that first event pays)."""

from dalle_plugin.observability import bind_run, lambda_handler, record_run_succeeded


@lambda_handler
def handler(event: dict, context: object) -> dict:
    from dalle_plugin import wiring
    from dalle_plugin.domain.step_io.attach import AttachInput
    from dalle_plugin.domain.steps.attach import attach_image

    ref = AttachInput.model_validate(event)
    bind_run(ref.session, ref.task_id, ref.execution_name)
    result = attach_image(ref, wiring.within_time(wiring.attach_deps(), context))
    record_run_succeeded(result)
    return result.dump()
