"""Named exceptions: the error contract between the Lambdas and the state machine.

A Lambda that raises one of these fails its task with the class name as the Step Functions error name,
so the ASL retries only the ``Transient`` ones by name and catches the rest into Record Failure. Every
message is written for the hub user who reads it in the Plugin Sessions dialog: what went wrong and
what to do about it. No message ever carries a secret.
"""


class PluginError(Exception):
    """Base of every error this plugin reports on purpose."""

    #: short machine-readable reason, used in metrics and in the session's ``failure.reason``
    reason = "plugin_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


# ---- bad input: refused at the API with a 4xx, before anything runs --------------------------------


class InvalidRequest(PluginError):
    """The hub payload cannot be understood (missing or malformed field)."""

    reason = "invalid_request"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class InvalidConfig(InvalidRequest):
    """The Config JSON names an unknown key, a wrong value or a wrong combination."""

    reason = "invalid_config"

    def __init__(self, field: str, given: object, allowed: str, hint: str = ""):
        shown = given if isinstance(given, (int, float, bool)) or given is None else repr(given)
        message = f"Config JSON field '{field}': got {shown}; allowed: {allowed}."
        if hint:
            message += f" {hint}"
        super().__init__(message, field=field)
        self.given = given
        self.allowed = allowed


class Unauthorized(PluginError):
    """The request did not carry the plugin's Secret header (or carried a wrong one)."""

    reason = "unauthorized"


# ---- terminal failures of a run: never retried -----------------------------------------------------


#: a Secret shorter than this is guessable; the plugin refuses every caller until it is replaced. Here, not
#: in domain.auth: the API checks it on every request, and importing auth would create the authorizer's model
MIN_SECRET_CHARS = 32


class PluginSecretTooShort(PluginError):
    """The deployment's plugin Secret is too short (``MIN_SECRET_CHARS``) to keep anyone out: every request
    is refused."""

    reason = "plugin_secret_too_short"


class PromptNotFound(PluginError):
    """No prompt could be built from the task: says where we looked and how to fix it."""

    reason = "prompt_not_found"


class AssetUnreadable(PluginError):
    """The asset's text could not be fetched or decoded."""

    reason = "asset_unreadable"


class ImageRefused(PluginError):
    """OpenAI's safety system refused the prompt or the image."""

    reason = "moderation_blocked"


class OpenAIKeyInvalid(PluginError):
    reason = "invalid_api_key"


class ModelNotAvailable(PluginError):
    """Retired model, or a key that is not entitled to it."""

    reason = "model_not_available"


class QuotaExhausted(PluginError):
    """The key's OpenAI account is out of credit or hit its spend cap."""

    reason = "quota_exhausted"


class ImageRequestRejected(PluginError):
    """OpenAI refused the request's parameters (should have been caught by validation)."""

    reason = "invalid_image_request"


class HubRequestRejected(PluginError):
    """The hub answered a 4xx: a wrong id, a revoked Ango API key, a missing permission."""

    reason = "hub_rejected"


class SpendingLimitReached(PluginError):
    """The session's next images would pass its ``max_cost_usd``: they are not requested."""

    reason = "spending_limit_reached"


class OrgQuotaReached(PluginError):
    """The organisation's daily image quota on the shared key is used up, and the deployment ends such runs."""

    reason = "org_quota_reached"


class RunCancelled(PluginError):
    reason = "cancelled"


class NotRunOwner(PluginError):
    """The execution calling a step does not own the run (a duplicate start, or the run was cancelled and
    started again under a new execution): the step does nothing, and the state machine ends that branch."""

    reason = "not_run_owner"


# ---- transient failures: the state machine retries these by name with backoff ----------------------


class Transient(PluginError):
    """Base of the errors worth retrying."""

    reason = "transient"


class OpenAIUnavailable(Transient):
    """5xx, timeout or connection error from OpenAI."""

    reason = "openai_unavailable"
    #: the request may have been served (and billed) all the same: its spending grant is kept
    maybe_billed: bool = False


class UpstreamRateLimited(Transient):
    """OpenAI answered 429 rate_limit_exceeded: wait for the time its own headers give, then try again."""

    reason = "openai_rate_limited"

    def __init__(self, message: str, retry_after_ms: int, limit_requests: int | None = None):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
        #: the key's request limit, when the answer said it (what an own key's pacing learns)
        self.limit_requests = limit_requests


class HubUnavailable(Transient):
    """5xx, timeout or connection error from the hub."""

    reason = "hub_unavailable"


class StorageUnavailable(Transient):
    reason = "storage_unavailable"


class MalformedConfig(InvalidConfig):
    """The Config JSON as a whole is not understood: not a JSON object, or a field the plugin does not have.

    Same reason and handling as ``InvalidConfig``; only the message is written whole, since there is no
    single field value to quote (and the raw text may hold the user's key, so it is never echoed).
    """

    def __init__(self, message: str, field: str = "configJSON", allowed: str = ""):
        InvalidRequest.__init__(self, message, field=field)
        self.given = None
        self.allowed = allowed


class RateLimiterBusy(Transient):
    """Too many runs raced for the global image slot at once and this one kept losing; retry shortly."""

    reason = "rate_limiter_busy"


class HubDeliveryUnknown(HubUnavailable):
    """A call that must not be made twice may have reached the hub: it timed out after the request was sent,
    or the connection dropped before the answer. The hub client never resends such a call by itself."""

    reason = "hub_unavailable"


class HubOutcomeUnknown(PluginError):
    """The hub did not confirm a change the plugin sent (an attachment, a task submission), and sending it
    again could make it twice: the run stops and says what to check on the hub."""

    reason = "hub_outcome_unknown"


class QueueTooLong(PluginError):
    """The shared key's queue would have held the run longer than the deployment allows: it was not
    queued, and the message gives the wait it would have had and the way around it (an own key)."""

    reason = "shared_key_queue_full"


class BatchHeldTooLong(PluginError):
    """The batch starter waited for its batch's runs in flight to make room so long that it would outlive
    its own execution: it stops storing, and the attempt ends with how far it got."""

    reason = "batch_held_too_long"


class OpenAIRateLimitPersisted(PluginError):
    """OpenAI kept answering 429 rate_limit_exceeded, request after request, past the run's budget."""

    reason = "openai_rate_limited"


# ---- an execution's end that no step saw: named by End Stopped Runs, never raised by a step -----------


class ExecutionStopped(PluginError):
    """The run's execution was stopped from outside the plugin (StopExecution), not by its cancel."""

    reason = "execution_stopped"


class ExecutionTimedOut(PluginError):
    """The run's execution ran past its ``TimeoutSeconds`` and Step Functions stopped it."""

    reason = "execution_timed_out"


class ExecutionFailed(PluginError):
    """The run's execution failed past every Catch (a history or payload limit), leaving the run going."""

    reason = "execution_failed"
