"""End Stopped Runs: EventBridge's "Execution Status Change" of a run execution that was stopped, timed out
or failed past its Catch. Each run the execution left unfinished ends FAILED with a sentence, its paid
images recorded and offered, its grants and queue place given back, the hub told, its secrets purged.

Init imports only the logging, as Record Failure's does; the domain and the AWS adapters load on the first
event."""

from dalle_plugin.observability import bind_run, lambda_handler, record_run_failed


@lambda_handler
def handler(event: dict, context: object) -> dict:
    from dalle_plugin import wiring
    from dalle_plugin.domain.steps.stopped import ExecutionStatusChange, end_stranded_runs

    change = ExecutionStatusChange.model_validate(event)
    bind_run(None, None, change.detail.name)
    reasons = end_stranded_runs(change.detail, wiring.within_time(wiring.record_failure_deps(), context))
    for reason in reasons:
        record_run_failed(reason)
    return {"status": change.detail.status, "ended": len(reasons)}
