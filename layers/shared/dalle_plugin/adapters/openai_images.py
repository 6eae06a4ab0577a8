"""OpenAI's images API through the official client: exactly one upstream request per call.

The client is built with ``max_retries=0`` (the state machine owns retrying, and one granted rate slot must
be one request) and a timeout below the Lambda's. Every OpenAI error is classified into the named errors
the state machine understands; the user's key never reaches a message or a log line.
"""

from __future__ import annotations

import base64
import math
import re
import time
from collections.abc import Callable
from typing import Any

import openai

from dalle_plugin.domain.errors import (
    ImageRefused,
    ImageRequestRejected,
    ModelNotAvailable,
    OpenAIKeyInvalid,
    OpenAIUnavailable,
    PluginError,
    QuotaExhausted,
    UpstreamRateLimited,
)
from dalle_plugin.image_generation import GeneratedImage, ImageRequest, KeyLimits

DEFAULT_RATE_LIMIT_WAIT_MS = 20_000
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset_duration_ms(value: str | None) -> int | None:
    """OpenAI's ``x-ratelimit-reset-requests`` format: "1s", "6m0s", "250ms", "1h2m3.5s"."""
    if not value:
        return None
    parts = _DURATION_PART.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    scale = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
    return math.ceil(sum(float(number) * scale[unit] for number, unit in parts))


def retry_after_ms(headers: Any) -> int:
    """The server's own word on when to retry: retry-after-ms, then retry-after, then the reset header."""
    if headers is not None:
        raw_ms = headers.get("retry-after-ms")
        if raw_ms:
            try:
                return max(0, math.ceil(float(raw_ms)))
            except ValueError:
                pass
        raw_s = headers.get("retry-after")
        if raw_s:
            try:
                return max(0, math.ceil(float(raw_s) * 1000))
            except ValueError:
                pass
        reset = parse_reset_duration_ms(headers.get("x-ratelimit-reset-requests"))
        if reset is not None:
            return reset
    return DEFAULT_RATE_LIMIT_WAIT_MS


def _header_int(headers: Any, name: str) -> int | None:
    raw = headers.get(name) if headers is not None else None
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


def key_limits(headers: Any, answered_at_ms: int | None = None) -> KeyLimits:
    """The ``x-ratelimit-*-requests`` headers of an answer (what an own key is paced by) and, given when the
    answer was in hand, the latest the request can have reached OpenAI (less ``openai-processing-ms``)."""
    reset = headers.get("x-ratelimit-reset-requests") if headers is not None else None
    processing_ms = _header_int(headers, "openai-processing-ms")
    return KeyLimits(
        limit_requests=_header_int(headers, "x-ratelimit-limit-requests"),
        remaining_requests=_header_int(headers, "x-ratelimit-remaining-requests"),
        reset_requests_ms=parse_reset_duration_ms(reset),
        arrived_by_ms=answered_at_ms - processing_ms
        if answered_at_ms is not None and processing_ms is not None
        else None,
    )


def _error_fields(exc: openai.APIStatusError) -> tuple[str, str, str]:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)
    if not isinstance(error, dict):
        error = {}
    return (
        str(error.get("code") or exc.code or ""),
        str(error.get("type") or ""),
        str(error.get("message") or ""),
    )


def _safe(message: str) -> str:
    """OpenAI echoes part of a wrong key in its message ("Incorrect API key provided: sk-ab***cd"): drop it."""
    return re.sub(r"sk-[A-Za-z0-9_\-*]+", "sk-…", message)[:500]


def classify(exc: Exception, model: str) -> PluginError:
    """Map an openai exception to the plugin's error contract (see docs/openai-images.md)."""
    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        error = OpenAIUnavailable(f"OpenAI could not be reached ({type(exc).__name__}); the run will retry.")
        # A request that timed out may have been served (and billed): its spending grant is kept.
        error.maybe_billed = isinstance(exc, openai.APITimeoutError)
        return error
    if not isinstance(exc, openai.APIStatusError):
        return OpenAIUnavailable(f"Unexpected error talking to OpenAI: {type(exc).__name__}")
    code, kind, message = _error_fields(exc)
    status = exc.status_code
    request = f" (OpenAI request id {exc.request_id})" if exc.request_id else ""
    if code in ("moderation_blocked", "content_policy_violation") or kind == "image_generation_user_error":
        details = (
            (exc.body or {}).get("error", {}).get("moderation_details", {})
            if isinstance(exc.body, dict)
            else {}
        )
        stage = details.get("moderation_stage", "input")
        what = "the generated image" if stage == "output" else "the prompt"
        return ImageRefused(
            f"OpenAI's safety system refused {what}. Edit the prompt and run the plugin again{request}."
        )
    if status == 401:
        return OpenAIKeyInvalid(
            "OpenAI rejected the API key (invalid or revoked). Check openai_api_key in the Config JSON, "
            f'or use "default"{request}.'
        )
    if status == 403:
        return ModelNotAvailable(
            f"This OpenAI key is not allowed to use {model}: {_safe(message) or 'permission denied'}{request}."
        )
    if status == 404 or code == "model_not_found":
        return ModelNotAvailable(
            f"OpenAI does not serve {model} to this key (retired model, or a key without access to it). "
            f"Pick a model the key can use in model_name{request}."
        )
    if status == 429 and (code == "insufficient_quota" or kind == "insufficient_quota"):
        return QuotaExhausted(
            f"The OpenAI account behind this key is out of credit (insufficient_quota){request}."
        )
    if code == "billing_hard_limit_reached":
        return QuotaExhausted(f"The OpenAI account behind this key reached its spend limit{request}.")
    if status == 429:
        headers = exc.response.headers
        wait_ms = retry_after_ms(headers)
        return UpstreamRateLimited(
            f"OpenAI rate limit reached; retrying in {wait_ms / 1000:.1f} s{request}.",
            wait_ms,
            key_limits(headers).limit_requests,
        )
    if status >= 500 or status in (408, 409):
        return OpenAIUnavailable(f"OpenAI answered {status}; the run will retry{request}.")
    return ImageRequestRejected(f"OpenAI refused the request: {_safe(message) or status}{request}.")


class OpenAIImageGenerator:
    def __init__(
        self, base_url: str | None, timeout_s: float, client_factory: Callable[..., Any] | None = None
    ):
        self._base_url = base_url
        self._timeout_s = timeout_s
        self._client_factory = client_factory or openai.OpenAI
        self._clients: dict[str, Any] = {}

    def _client(self, api_key: str) -> Any:
        # One client per key, so a warm Lambda reuses connections; keyed in memory only.
        client = self._clients.get(api_key)
        if client is None:
            client = self._client_factory(
                api_key=api_key, base_url=self._base_url, max_retries=0, timeout=self._timeout_s
            )
            self._clients = {api_key: client}  # keep one: a warm Lambda serves one key at a time
        return client

    def prepare(self, api_key: str) -> None:
        self._client(api_key)

    def generate(self, request: ImageRequest, api_key: str) -> GeneratedImage:
        params: dict[str, Any] = {
            "model": request.model,
            "prompt": request.prompt,
            "size": request.size,
            "n": request.n,
        }
        optional = {
            "quality": request.quality,
            "output_format": request.output_format,
            "output_compression": request.output_compression,
            "background": request.background,
        }
        params.update({name: value for name, value in optional.items() if value is not None})
        try:
            raw = self._client(api_key).images.with_raw_response.generate(**params)
            answered_at_ms = time.time_ns() // 1_000_000
            result = raw.parse()
        except openai.OpenAIError as exc:
            raise classify(exc, request.model) from None
        if not result.data or not all(item.b64_json for item in result.data):
            error = OpenAIUnavailable("OpenAI answered without an image; the run will retry.")
            error.maybe_billed = True  # a 200 answer: the request was served
            raise error
        usage = result.usage.model_dump() if getattr(result, "usage", None) else None
        bodies = [base64.b64decode(item.b64_json) for item in result.data]
        return GeneratedImage(
            png=bodies[0],
            more=tuple(bodies[1:]),
            model=request.model,
            request_id=raw.headers.get("x-request-id"),
            revised_prompt=getattr(result.data[0], "revised_prompt", None),
            usage=usage,
            limits=key_limits(raw.headers, answered_at_ms),
        )
