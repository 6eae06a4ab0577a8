"""Generate Image: take a global rate slot (shared key only), call OpenAI once, keep the PNG in S3.

Init imports only the logging (Powertools' Logger); the domain, its pydantic models, the AWS adapters and
openai load on the first event (docs/performance.md, "Cold starts", says what that first event pays)."""

from dalle_plugin.observability import bind_run, lambda_handler, record_generation


@lambda_handler
def handler(event: dict, context: object) -> dict:
    from dalle_plugin import wiring
    from dalle_plugin.domain.step_io.generate import GenerateInput
    from dalle_plugin.domain.steps.generate import generate_image, run_as_left

    ref = GenerateInput.model_validate(event)
    bind_run(ref.session, ref.task_id, ref.execution_name)
    deps = wiring.within_time(wiring.generate_deps(), context)
    started_ms = deps.clock.now_ms()
    outcome = generate_image(ref, deps)
    # the run as the step left it (no read: the step's own last write, with the images it hands on)
    record_generation(
        outcome, lambda: run_as_left(deps.runs.recent(ref.session, ref.task_id), outcome), started_ms
    )
    return outcome.dump()
