"""Builds the real adapters from settings, lazily and once per cold start (a cached factory per port).

Handlers call these; tests call the domain with fakes or point these at the local stack through botocore's
own ``AWS_ENDPOINT_URL_*`` variables.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

import botocore.session
from botocore.config import Config

from dalle_plugin.adapters.aws import (
    CachedSecrets,
    KmsSecretVault,
    S3BatchRequests,
    S3ImageStore,
    StepFunctionsStarter,
)
from dalle_plugin.adapters.dynamo_allowances import DynamoAllowanceLedger
from dalle_plugin.adapters.dynamo_batches import DynamoBatchProgress
from dalle_plugin.adapters.dynamo_reusable_images import DynamoReusableImages
from dalle_plugin.adapters.dynamo_runs import DynamoRunStore
from dalle_plugin.domain.errors import MIN_SECRET_CHARS, PluginSecretTooShort
from dalle_plugin.domain.steps.machinery import StepDeps
from dalle_plugin.port_records import SystemClock
from dalle_plugin.settings import CommonSettings, load_settings

if TYPE_CHECKING:
    from dalle_plugin.ports import HubCaller, HubClient, SessionPages
    from dalle_plugin.settings.generate import GenerateSettings
    from dalle_plugin.settings.rate_limit import RateLimitSettings

# Standard retry mode with a few attempts: AWS throttling is retried in place, anything longer is the
# state machine's job.
_BOTO_CONFIG = Config(retries={"mode": "standard", "max_attempts": 4}, connect_timeout=5, read_timeout=20)


@cache
def aws_client(service: str) -> Any:
    # A session per client: creating clients from a shared session is not thread-safe. botocore's own
    # session, not boto3's: the adapters use low-level clients only, and boto3 (its resource API and its
    # S3 transfer manager) cost every cold start about a tenth of its floor to import for nothing.
    return botocore.session.Session().create_client(service, config=_BOTO_CONFIG)


def _hub_factory(settings: CommonSettings) -> Callable[[HubCaller, str], HubClient]:
    def hub_for(run: HubCaller, api_key: str) -> HubClient:
        # loaded by the first hub call, not with the ports: the API accepts a run without calling the hub
        from dalle_plugin.adapters.hub_http import AngoHubClient
        from dalle_plugin.adapters.url_guard import UrlGuard

        # a guard holds its settings only: one per client
        guard = UrlGuard(allowed_private_hosts=settings.allowed_private_hosts)
        return AngoHubClient(
            settings.hub_api_url,
            api_key,
            plugin_id=run.plugin_id or "",
            org_id=run.org_id or "",
            run_by=run.run_by or "",
            timeout_s=settings.hub_timeout_s,
            retries=settings.hub_retries,
            max_text_bytes=getattr(settings, "max_asset_bytes", 1_000_000),
            url_guard=guard,
        )

    return hub_for


#: what a step keeps of its Lambda's time to record a failure after its last hub call gave up
RECORDING_RESERVE_S = 5.0
#: the API answers within API Gateway's 29 s and its own timeout: its hub calls (telling the hub of a
#: refusal or a cancel) are courtesy, never worth more than this
API_HUB_BUDGET_S = 4.0


def within_time(deps: StepDeps, context: Any, at_most_s: float | None = None) -> StepDeps:
    """The step's ports with every hub call, retries included, ending before the Lambda must: its remaining
    time less ``RECORDING_RESERVE_S`` (at most a quarter of it), and at most ``at_most_s``. The arithmetic
    per function is in docs/time-budgets.md."""
    remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
    if remaining_ms is None:
        return deps
    remaining_s = remaining_ms() / 1000
    budget_s = remaining_s - min(RECORDING_RESERVE_S, remaining_s / 4)
    if at_most_s is not None:
        budget_s = min(budget_s, at_most_s)
    deadline_at = time.monotonic() + max(0.0, budget_s)
    make_hub = deps.hub_for

    def hub_for(run: Any, api_key: str) -> HubClient:
        hub = make_hub(run, api_key)
        if hasattr(hub, "deadline_at"):
            hub.deadline_at = deadline_at
        return hub

    return dataclasses.replace(deps, hub_for=hub_for)


def _common(settings: CommonSettings) -> dict[str, Any]:
    return {
        "runs": DynamoRunStore(aws_client("dynamodb"), settings.sessions_table),
        "clock": SystemClock(),
        "vault": KmsSecretVault(aws_client("kms"), settings.kms_key_id),
        "hub_for": _hub_factory(settings),
        "images": S3ImageStore(aws_client("s3"), settings.images_bucket),
        "reusable_images": DynamoReusableImages(aws_client("dynamodb"), settings.sessions_table),
        "allowances": DynamoAllowanceLedger(aws_client("dynamodb"), settings.sessions_table),
        "run_ttl_days": settings.run_ttl_days,
    }


def _batches(settings: CommonSettings) -> dict[str, Any]:
    return {
        "batch_requests": S3BatchRequests(aws_client("s3"), settings.images_bucket),
        "batch_progress": DynamoBatchProgress(aws_client("dynamodb"), settings.sessions_table),
    }


@cache
def api_deps() -> StepDeps:
    """The API's ports, with the shared key's queue: runs join it when accepted, and leave it cancelled."""
    from dalle_plugin.settings.api import ApiSettings

    settings = load_settings(ApiSettings)
    batch_starter = None
    if settings.start_batch_state_machine_arn:
        batch_starter = StepFunctionsStarter(
            aws_client("stepfunctions"), settings.start_batch_state_machine_arn
        )
    return StepDeps(
        **_common(settings),
        **_batches(settings),
        starter=StepFunctionsStarter(aws_client("stepfunctions"), settings.state_machine_arn),
        batch_starter=batch_starter,
        session_pages=session_pages(),
        model_successors=settings.model_successors,
        image_prices=settings.image_prices,
        **_shared_key_queue(settings),
    )


@cache
def start_batch_deps() -> StepDeps:
    """The starter's ports, with the shared key's queue: the runs it stores join it, as the API's do."""
    from dalle_plugin.settings.start_batch import StartBatchSettings

    settings = load_settings(StartBatchSettings)
    return StepDeps(
        **_common(settings),
        **_batches(settings),
        starter=StepFunctionsStarter(aws_client("stepfunctions"), settings.state_machine_arn),
        **_shared_key_queue(settings),
    )


@cache
def cancel_deps() -> StepDeps:
    """What a cancel needs: the API's ports (the shared key's queue among them, to leave it)."""
    return api_deps()


@cache
def secrets_reader(max_age_s: int) -> CachedSecrets:
    """Secrets as stored now: each re-read once older than ``max_age_s`` (the calling function's
    ``secret_max_age_s``, a setting, so a test can see a rotation reach warm environments quickly). The
    caller passes its own settings' value: loading ``CommonSettings`` for it would build and validate a
    second settings model on the first request."""
    return CachedSecrets(aws_client("secretsmanager"), max_age_s=max_age_s)


def plugin_secret() -> str:
    """The plugin Secret as stored now (re-read within ``secret_max_age_s`` of a rotation); one shorter than
    ``MIN_SECRET_CHARS`` (an empty or short one would let anyone in) is refused, so no request is ever
    compared with it."""
    from dalle_plugin.settings.api import ApiSettings

    settings = load_settings(ApiSettings)
    secret = secrets_reader(settings.secret_max_age_s).read(settings.plugin_secret_arn)
    if len(secret) < MIN_SECRET_CHARS:
        raise PluginSecretTooShort(
            f"The plugin Secret is shorter than {MIN_SECRET_CHARS} characters, so the plugin refuses "
            "every request. Store a longer Secret in Secrets Manager and in the hub's plugin settings."
        )
    return secret


def authorizer_secret() -> str:
    """The Secret the authorizer compares with, as stored now (re-read within ``SECRET_MAX_AGE_S``)."""
    from dalle_plugin.settings.authorizer import AuthorizerSettings

    settings = load_settings(AuthorizerSettings)
    return secrets_reader(settings.secret_max_age_s).read(settings.plugin_secret_arn)


@cache
def session_pages() -> SessionPages:
    """The sessions table read a page at a time, for ``GET /sessions/{id}``."""
    from dalle_plugin.settings.api import ApiSettings

    return DynamoRunStore(aws_client("dynamodb"), load_settings(ApiSettings).sessions_table)


@cache
def extract_deps() -> StepDeps:
    from dalle_plugin.settings.extract import ExtractSettings

    return StepDeps(**_common(load_settings(ExtractSettings)))


def _shared_key_queue(settings: RateLimitSettings) -> dict[str, Any]:
    """The shared key's queue (``domain.rate_limit``) on the rate-limit table, with its settings."""
    from dalle_plugin.adapters.dynamo_rate_limiter import DynamoRateLimiter

    limiter_settings = _limiter_settings(settings)
    limiter = DynamoRateLimiter(aws_client("dynamodb"), settings.rate_limit_table, limiter_settings)
    return {"limiter": limiter, "limiter_settings": limiter_settings}


def _limiter_settings(settings: RateLimitSettings) -> Any:
    from dalle_plugin.domain.rate_limit import LimiterSettings

    return LimiterSettings(
        limit=settings.rate_limit,
        window_s=settings.rate_window_s,
        skew_margin_ms=settings.rate_skew_margin_ms,
        max_queue_wait_s=settings.rate_queue_max_wait_s,
    )


def _key_pacing(settings: GenerateSettings) -> tuple[Any, Any]:
    """Own keys' pacer and its settings, or (None, None) when pacing is off."""
    if settings.own_key_pacing == "off":
        return None, None
    from dalle_plugin.adapters.dynamo_key_pacer import DynamoKeyPacer
    from dalle_plugin.domain.key_pacing import KeyPaceSettings

    pace_settings = KeyPaceSettings(
        window_s=settings.own_key_window_s, margin_ms=settings.own_key_pace_margin_ms
    )
    pacer = DynamoKeyPacer(
        aws_client("dynamodb"), settings.rate_limit_table, pace_settings, clock=SystemClock().now_ms
    )
    return pacer, pace_settings


@cache
def generate_deps() -> StepDeps:
    from dalle_plugin.adapters.openai_images import OpenAIImageGenerator  # the heavy import, here only
    from dalle_plugin.domain.spending import OrgQuota
    from dalle_plugin.settings.generate import GenerateSettings

    settings = load_settings(GenerateSettings)
    secrets = secrets_reader(settings.secret_max_age_s)

    quota = (
        OrgQuota(settings.org_daily_image_quota, settings.org_quota_reached)
        if settings.org_daily_image_quota > 0
        else None
    )
    key_pacer, key_pace_settings = _key_pacing(settings)
    return StepDeps(
        **_common(settings),
        key_pacer=key_pacer,
        key_pace_settings=key_pace_settings,
        org_quota=quota,
        generator=OpenAIImageGenerator(settings.openai_base_url, settings.openai_timeout_s),
        **_shared_key_queue(settings),
        default_openai_key=lambda: secrets.read(settings.default_openai_key_secret_arn),
    )


@cache
def attach_deps() -> StepDeps:
    from dalle_plugin.settings.attach import AttachSettings

    return StepDeps(**_common(load_settings(AttachSettings)))


@cache
def record_failure_deps() -> StepDeps:
    """Attach's ports and the shared key's queue: a failed run leaves its line, or the runs behind it wait
    until it is skipped as abandoned (``abandon_after_ms``, a minute by default)."""
    from dalle_plugin.settings.rate_limit import RateLimitSettings

    settings = load_settings(RateLimitSettings)
    return StepDeps(**_common(settings), **_shared_key_queue(settings))
