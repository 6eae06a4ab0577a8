"""Record Failure: turn the state machine's error into a sentence a person can act on, give back what was
not spent, keep a paid-for image for a re-run, and end the run."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from dalle_plugin.domain.errors import (
    HubOutcomeUnknown,
    NotRunOwner,
    OrgQuotaReached,
    PluginError,
    QueueTooLong,
    RateLimiterBusy,
    RunCancelled,
    SpendingLimitReached,
)
from dalle_plugin.domain.run import Failure, HeldAllowance, ImageInfo, RunRecord, RunStatus
from dalle_plugin.domain.spending import release
from dalle_plugin.domain.step_io.failure import FailureInput
from dalle_plugin.domain.steps.machinery import (
    StepDeps,
    check_owner,
    hub_log,
    image_fingerprint,
    image_key,
    mark,
    owned_deps,
    required,
    stored_images,
    try_open_hub,
)

#: failures raised before the image request was sent: their grants are given back
_FAILED_BEFORE_SENDING = {
    RateLimiterBusy.__name__,
    QueueTooLong.__name__,
    RunCancelled.__name__,
    SpendingLimitReached.__name__,
    OrgQuotaReached.__name__,
}


#: how Step Functions names a Lambda that ran out of time (no error type: Lambda.Unknown)
LAMBDA_TIMED_OUT = ("Lambda.Unknown", "Sandbox.Timedout")

_AGAIN = "Run the plugin again; if it keeps happening, tell the plugin's owner."

#: errors from AWS rather than from the plugin whose cause is known: (reason, sentence)
_KNOWN_CAUSES = {
    "Lambda.TooManyRequestsException": (
        "lambda_throttled",
        (
            "The plugin was too busy to run a step of this run (AWS Lambda refused it for lack of "
            "concurrency), even after waiting and trying again. Run the plugin again in a few minutes; if it "
            "keeps happening, tell the plugin's owner (the account's Lambda concurrency may be too small)."
        ),
    ),
    "Lambda.ServiceException": ("lambda_unavailable", None),
    "Lambda.AWSLambdaException": ("lambda_unavailable", None),
    "Lambda.SdkClientException": ("lambda_unavailable", None),
    "States.DataLimitExceeded": (
        "internal_error",
        "A step's result was too large for the workflow to carry, so the run stopped. Tell the plugin's owner.",
    ),
}
_LAMBDA_UNAVAILABLE = f"AWS Lambda could not run a step of this run, even after trying again (a problem on AWS's side). {_AGAIN}"
#: the process running a step ended before the step did (killed, out of memory): kept as internal_error
_STEP_CRASHED = (
    "A step of the run stopped before it finished (its process ended: out of memory or a crash), and was "
    f"not tried again, so that nothing is paid for or attached twice. {_AGAIN}"
)
#: a plugin error that came without its message (an empty Cause): what each transient one means
_WITHOUT_MESSAGE = {
    "hub_unavailable": f"Ango Hub did not answer, even after several tries. {_AGAIN}",
    "openai_unavailable": f"OpenAI did not answer, even after several tries. {_AGAIN}",
    "storage_unavailable": f"The plugin's storage did not answer, even after several tries. {_AGAIN}",
    "rate_limiter_busy": f"The shared OpenAI key's queue stayed too busy to take this run. {_AGAIN}",
}


def describe_failure(error: str, cause: str | None) -> Failure:
    """Turn Step Functions' ``Error``/``Cause`` into a reason and a sentence a person can act on."""
    message = None
    if cause:
        try:
            parsed = json.loads(cause)
            message = parsed.get("errorMessage") if isinstance(parsed, dict) else None
        except ValueError:
            message = cause
    reason_of = {cls.__name__: cls.reason for cls in _all_subclasses(PluginError)}
    if error == "States.Timeout":
        message = "The run took longer than allowed and was stopped. Run the plugin again."
    elif error in LAMBDA_TIMED_OUT:
        message = (
            "A step of the run ran out of time (the hub or OpenAI answered too slowly) and was not "
            "retried, so that nothing is paid for or attached twice. Run the plugin again; if it "
            "keeps happening, check that Ango Hub is reachable, then tell the plugin's owner."
        )
    elif error in _KNOWN_CAUSES:
        reason, sentence = _KNOWN_CAUSES[error]
        return Failure(reason=reason, message=sentence or _LAMBDA_UNAVAILABLE, error=error)
    elif error.startswith("Runtime."):  # Runtime.ExitError, Runtime.OutOfMemory: the text is the runtime's
        message = _STEP_CRASHED
    elif error not in reason_of:
        # Only the plugin's own errors are written for people; any other exception's text could quote
        # anything (a header value, a request), so it stays in the execution's history, not the session.
        message = (
            f"The plugin failed unexpectedly ({error}). Run it again; if it keeps failing, tell the "
            "plugin's owner."
        )
    reason = "step_timed_out" if error in LAMBDA_TIMED_OUT else reason_of.get(error, "internal_error")
    if not message:
        message = _WITHOUT_MESSAGE.get(reason, f"The run stopped ({reason.replace('_', ' ')}). {_AGAIN}")
    return Failure(reason=reason, message=message[:1000], error=error)


def _all_subclasses(cls: type[PluginError]) -> list[type[PluginError]]:
    found: list[type[PluginError]] = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


def _ended_by_cancel(run: RunRecord, deps: StepDeps) -> dict[str, Any]:
    """A cancelled run's grants are given back by the write that takes them off its record: the cancel's
    own, or here, for a run cancelled before its cancel did so."""
    given_back: list[HeldAllowance] = []

    def take_off(r: RunRecord) -> None:
        given_back[:] = r.held if r.image is None else []  # a paid request's grants stay counted
        r.held = [] if given_back else r.held

    if run.held and run.image is None:
        deps.runs.change(run, take_off)
    if given_back and deps.allowances is not None:
        release(given_back, deps.allowances)
    return {"status": RunStatus.CANCELLED.value, "reason": RunCancelled.reason}


def _paid_but_unrecorded(run: RunRecord, deps: StepDeps) -> list[ImageInfo]:
    """The images an attempt paid for and stored that no write recorded: Generate hands them to Attach
    through the state, so an execution that fails before Attach's first write leaves them only at their
    keys. Empty when the storage does not answer (the run still fails: it must end readable)."""
    if run.image is not None or deps.images is None:
        return []
    try:
        return stored_images(run, deps.images)
    except PluginError:
        return []


def record_failure(inp: FailureInput, deps: StepDeps) -> dict[str, Any]:
    failure = describe_failure(inp.error.error, inp.error.cause)
    deps = owned_deps(inp, deps)
    run = deps.runs.get(inp.session, inp.task_id)
    if run is None:
        return {"status": RunStatus.FAILED.value, "reason": failure.reason}
    try:
        check_owner(run, inp.caller)
    except NotRunOwner:  # another execution owns this generation: its own steps say how it ends
        return {"status": "NOT_OWNER", "reason": None}
    if run.status is RunStatus.SUCCEEDED:
        # A crash after the run finished (its last write done) must not turn a delivered image into a failure.
        return {"status": RunStatus.SUCCEEDED.value, "reason": None}
    if run.status is RunStatus.CANCELLED:  # the cancel already told the hub and purged the secrets
        return _ended_by_cancel(run, deps)
    unconfirmed = [i for i in run.images if not i.attached and i.attach_sent_at_ms is not None]
    if unconfirmed and failure.error != HubOutcomeUnknown.__name__:
        # The step died between sending the attachment and hearing back: say what to check.
        failure.message = (
            f"{failure.message} The image ({unconfirmed[0].hub_url}) was sent to the asset but the "
            "hub never confirmed it: check the asset's attachments before running again."
        )[:1000]
    hub = try_open_hub(run, deps)
    unrecorded = _paid_but_unrecorded(run, deps)
    now = deps.clock.now_ms()
    given_back: list[HeldAllowance] = []

    def fail(r: RunRecord) -> None:
        if r.image is None and unrecorded:  # recorded now: a re-run of the run takes them, not new ones
            r.image, r.more_images = unrecorded[0], unrecorded[1:]
        r.failure = failure
        mark(r, now, "failed", RunStatus.FAILED, failure.message)
        r.timeline[-1].duration_ms = 0
        r.sealed_secrets = None
        # Decided on the record this write replaces, not the one read: a cancel in between has taken the
        # grants off it (and given them back) already.
        given_back[:] = r.held if r.image is None and failure.error in _FAILED_BEFORE_SENDING else []
        if given_back:
            r.held = []

    try:
        run = deps.runs.change(run, fail)
    except RunCancelled:  # cancelled since it was read: the cancel has told the hub and purged the secrets
        return _ended_by_cancel(required(deps.runs.get(run.session, run.task_id), "the run"), deps)
    if given_back and deps.allowances is not None:
        release(given_back, deps.allowances)
    if run.uses_default_key and run.rate_ticket is not None and deps.limiter is not None:
        # out of the shared key's queue (a no-op if its send was granted): the runs behind it move up
        # a failed leave costs nothing lasting: a run away past its turn is skipped by the next claimer
        with contextlib.suppress(PluginError):
            deps.limiter.leave(run.org_id or "", not run.workflow, run.rate_ticket)
    # Paid for and surely not on the hub: a re-run of the task (in a new session too) takes it, not a new one.
    undelivered = any(not i.attached and i.attach_sent_at_ms is None for i in run.images)
    # Stored images the storage could not be asked about are offered at their key all the same (a re-run
    # checks that the object exists before it takes it).
    unlooked = run.image is None and run.attempt > 0
    offers = deps.reusable_images
    reusable = run.prompt is not None and run.images_per_task == 1
    if (undelivered or unlooked) and reusable and offers is not None:
        key = run.image.key if run.image else image_key(run)
        offers.offer(image_fingerprint(run), key, run.expires_at or now // 1000 + 86_400, run.offer_scope)
    kept_what = "image is" if len(run.images) == 1 else "images are"
    kept_it = "it" if len(run.images) == 1 else "them"
    kept = (
        f" The generated {kept_what} kept, so running again will not pay for {kept_it} twice."
        if undelivered
        else ""
    )
    hub_log(run, hub, f"Run failed: {failure.message}{kept}", level="ERROR")
    if hub is not None and not run.workflow:
        with contextlib.suppress(PluginError):  # best effort, as every hub call of a failing run
            hub.plugin_response(run.session, error=True)
    return {"status": RunStatus.FAILED.value, "reason": failure.reason}
