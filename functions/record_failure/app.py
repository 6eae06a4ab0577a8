"""Record Failure: the Catch path. The session says why, the hub is told, the secrets are purged.

Init imports only the logging (Powertools' Logger); the domain, its pydantic models and the AWS adapters load
on the first event (docs/performance.md, "Cold starts", says what that first event pays)."""

from dalle_plugin.observability import bind_run, lambda_handler, record_run_failed


@lambda_handler
def handler(event: dict, context: object) -> dict:
    from dalle_plugin import wiring
    from dalle_plugin.domain.step_io.failure import FailureInput
    from dalle_plugin.domain.steps.failure import record_failure

    failure = FailureInput.model_validate(event)
    bind_run(failure.session, failure.task_id, failure.execution_name)
    result = record_failure(failure, wiring.within_time(wiring.record_failure_deps(), context))
    if result["status"] == "FAILED":  # a run that had finished, was cancelled or is not this execution's: no
        record_run_failed(result["reason"])
    return result
