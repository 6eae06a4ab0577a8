"""Store Runs And Start Chunks: the batch starter's step. Stores a large batch's runs and starts their
executions a few chunks at a time, while its Lambda has time; the state machine calls it again until done.
Called with the Catch's ``error`` (Record Batch Failure), it ends the attempt with a sentence instead."""

from dalle_plugin import wiring
from dalle_plugin.domain.steps.batch_start import BatchStep, InFlightCap, record_batch_failure, store_batch
from dalle_plugin.observability import bind_run, lambda_handler, record_run_accepted
from dalle_plugin.settings import load_settings
from dalle_plugin.settings.start_batch import StartBatchSettings

#: a held starter gives up this long before its execution's TimeoutSeconds: a wait of at most 5 minutes,
#: a call of at most 2 (its Timeout) and that call's retries (about 2) end inside it
GIVE_UP_MARGIN_S = 900


@lambda_handler
def handler(event: dict, context: object) -> dict:
    step = BatchStep.model_validate(event)
    bind_run(step.session)
    if step.error is not None:
        return record_batch_failure(step, wiring.start_batch_deps()).model_dump(
            by_alias=True, exclude_none=True
        )
    remaining_ms = getattr(context, "get_remaining_time_in_millis", lambda: 0)
    settings = load_settings(StartBatchSettings)
    after, started = store_batch(
        step,
        wiring.start_batch_deps(),
        settings.tasks_per_execution,
        seconds_left=lambda: remaining_ms() / 1000,
        cap=InFlightCap(settings.executions_in_flight, settings.execution_timeout_s - GIVE_UP_MARGIN_S),
    )
    if started:
        record_run_accepted(started)
    return after.model_dump(by_alias=True, exclude_none=True)
