"""A stand-in for OpenAI's images API on 127.0.0.1, for tests and for the local stack.

It speaks the real wire format of ``POST /v1/images/generations`` and ``GET /v1/models[/{id}]`` (bodies,
error shapes, rate-limit headers), so the official ``openai`` client pointed at ``base_url`` behaves as it
would against api.openai.com. It draws a real image of the prompt with Pillow, and it can be scripted to
fail the way OpenAI fails (429s, 5xx, moderation blocks, revoked keys, slow or hung responses) by its
methods and over HTTP (``/_emulator/...``), so a person running the local stack can script it too.

The local stack runs it in a process of its own (``OpenAIEmulatorProcess``, the same methods over that
HTTP control API), so the arrival times it records are when a request reached "OpenAI", whatever the
stack's own process is doing.

API keys are never stored: each request is recorded with a short sha256 fingerprint of its key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from http.server import BaseHTTPRequestHandler
from typing import Any, Literal
from urllib.parse import urlsplit

from PIL import Image, ImageDraw, ImageFont
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from local_stack.http_server import LocalHTTPServer, LocalServer, ServerProcess

__all__ = [
    "Behaviour",
    "BehaviourKind",
    "OpenAIEmulator",
    "OpenAIEmulatorProcess",
    "RecordedRequest",
    "format_reset_duration",
    "key_fingerprint",
    "render_prompt_image",
]

# ---- what the emulated API knows about models ----------------------------------------------------

_GPT_IMAGE_1_SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
_BASE_QUALITIES = ("auto", "low", "medium", "high")
#: the 2.5 variants also take the two extra quality levels the SDK documents for them
_GPT_IMAGE_25_QUALITIES = (*_BASE_QUALITIES, "xhigh", "max")


@dataclass(frozen=True)
class _ModelSpec:
    family: Literal["gpt-image-1", "gpt-image-2"]
    created: int
    qualities: tuple[str, ...] = _BASE_QUALITIES
    shutdown_date: str | None = None


_LIVE_MODELS: dict[str, _ModelSpec] = {
    "gpt-image-1-mini": _ModelSpec("gpt-image-1", 1759276800, shutdown_date="2026-12-01"),
    "gpt-image-1.5": _ModelSpec("gpt-image-1", 1763510400, shutdown_date="2026-12-01"),
    "gpt-image-2": _ModelSpec("gpt-image-2", 1776729600),
    "gpt-image-2-2026-04-21": _ModelSpec("gpt-image-2", 1776729600),
    "gpt-image-2.5-sunburst": _ModelSpec("gpt-image-2", 1788825600, _GPT_IMAGE_25_QUALITIES),
    "gpt-image-2.5-sunburst-2026-09-08": _ModelSpec("gpt-image-2", 1788825600, _GPT_IMAGE_25_QUALITIES),
    "gpt-image-2.5-flare": _ModelSpec("gpt-image-2", 1788825600, _GPT_IMAGE_25_QUALITIES),
    "gpt-image-2.5-flare-2026-09-08": _ModelSpec("gpt-image-2", 1788825600, _GPT_IMAGE_25_QUALITIES),
}

#: the server-side default when a request names no model (why the plugin must always send one)
_DEFAULT_MODEL = "dall-e-2"

_GPT_IMAGE_2_MAX_LONG_EDGE = 3840
_GPT_IMAGE_2_MAX_SHORT_EDGE = 2160
_GPT_IMAGE_2_MIN_EDGE = 16
_PROMPT_MAX_CHARS = 32_000
_AUTO_SIZE = (1024, 1024)
#: what "auto" quality resolves to in the response (the real API reports the quality it used)
_AUTO_QUALITY = "medium"
#: output tokens of a 1024x1024 image by quality (gpt-image pricing tables), scaled by area
_OUTPUT_TOKENS_PER_MEGAPIXEL = {"low": 272, "medium": 1056, "high": 4160, "xhigh": 6240, "max": 8320}

#: every body field the openai SDK can send to this endpoint; anything else is an unknown parameter
_KNOWN_GENERATION_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "n",
        "size",
        "quality",
        "response_format",
        "output_format",
        "output_compression",
        "background",
        "moderation",
        "style",
        "user",
        "safety_identifier",
        "stream",
        "partial_images",
        "complexity",
        "frame_count",
        "frame_duration_ms",
        "svg",
    }
)

#: the limit the rate-limit headers show when no cap is enforced
_NOMINAL_REQUESTS_PER_MINUTE = 500
#: a hung request is dropped after this long even if nobody resets or stops the emulator
_HANG_LIMIT_S = 600.0
_KEYS_PAGE = "You can find your API key at https://platform.openai.com/account/api-keys."

# ---- scripted behaviours ---------------------------------------------------------------------------

BehaviourKind = Literal[
    "ok",
    "rate_limited",
    "server_error",
    "moderation_blocked",
    "invalid_key",
    "permission_denied",
    "model_not_found",
    "insufficient_quota",
    "billing_hard_limit",
    "timeout_hang",
]


class Behaviour(BaseModel):
    """How the emulator answers one valid, authenticated generation request.

    ``latency_s`` is slept before answering, whatever the kind. ``retry_after_s`` sets the retry headers
    of a ``rate_limited`` answer (none are sent when it is None). ``status`` is a ``server_error``'s code.
    A ``timeout_hang`` never answers: its connection is dropped when the emulator is reset or stopped.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: BehaviourKind = "ok"
    latency_s: float = Field(default=0.0, ge=0.0)
    retry_after_s: float | None = Field(default=None, ge=0.0)
    status: Literal[500, 502, 503] = 500
    moderation_stage: Literal["input", "output"] = "input"
    categories: tuple[str, ...] = ("violence",)


#: what the scripting methods accept: a Behaviour, a kind's name, or a Behaviour's JSON object
BehaviourLike = Behaviour | BehaviourKind | Mapping[str, Any]


def _as_behaviour(value: BehaviourLike) -> Behaviour:
    if isinstance(value, Behaviour):
        return value
    if isinstance(value, str):
        return Behaviour(kind=value)
    return Behaviour.model_validate(value)


@dataclass
class _Rule:
    prompt_contains: str
    behaviour: Behaviour
    remaining: int | None = None  # None: for every matching request; else dropped after this many


# ---- the request log --------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One API request as the emulator saw it. ``status`` is None when no answer was sent (a hang).

    ``started_at`` / ``finished_at`` are ``time.time()`` at arrival and just before the answer. The
    body fields are as sent (None when absent or not text), except ``size`` and ``quality``, which are
    the resolved values once a request passed validation ("auto" -> "1024x1024").
    """

    request_id: str
    method: str
    path: str
    started_at: float
    finished_at: float
    key_fingerprint: str | None
    status: int | None
    outcome: str
    model: str | None = None
    prompt: str | None = None
    size: str | None = None
    quality: str | None = None
    n: int | None = None
    output_format: str | None = None
    output_compression: int | None = None
    background: str | None = None

    @property
    def is_generation(self) -> bool:
        return self.method == "POST" and self.path == "/v1/images/generations"


def key_fingerprint(api_key: str) -> str:
    """Short, stable, one-way id of an API key: what the log keeps instead of the key."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:12]


def _mask_key(api_key: str) -> str:
    # The real message shows a few leading and the last four characters; a short key shows less, so the
    # message never spells out the whole of it.
    if len(api_key) > 16:
        return api_key[:6] + "*" * (len(api_key) - 10) + api_key[-4:]
    return api_key[:3] + "*" * max(len(api_key) - 3, 4)


def format_reset_duration(seconds: float) -> str:
    """The ``x-ratelimit-reset-*`` format (Go durations, rounded up to the millisecond):
    250ms, 1.5s, 12s, 1m0s, 1h2m3.5s."""
    total_ms = max(0, math.ceil(round(seconds * 1000, 6)))
    if total_ms == 0:
        return "0s"
    if total_ms < 1000:
        return f"{total_ms}ms"
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


# ---- drawing ------------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Roboto (PyPI font-roboto, in requirements-dev.txt) draws Latin and common punctuation (é, ō, —), which
    Pillow's built-in font shows as boxes; the built-in font stays the fallback should the package be missing."""
    try:
        import font_roboto

        return ImageFont.truetype(font_roboto.font_files["Roboto"], size=size)
    except (ImportError, KeyError, OSError):
        return ImageFont.load_default(size=size)


def _longest_fitting_prefix(word: str, font: Any, max_width: float) -> int:
    low, high = 1, len(word)  # binary search; a single character is always taken
    while low < high:
        middle = (low + high + 1) // 2
        if font.getlength(word[:middle]) <= max_width:
            low = middle
        else:
            high = middle - 1
    return low


def _wrap(text: str, font: Any, max_width: float, max_lines: int) -> list[str]:
    """Greedy word wrap into at most ``max_lines`` lines, ending in "..." when the text does not fit."""
    # No glyph is narrower than about a fifth of the font size, so text beyond this can never show;
    # cutting it first keeps a 32,000-character prompt as quick to lay out as a short one.
    visible_chars = max_lines * (int(max_width / max(1.0, getattr(font, "size", 10) * 0.2)) + 1)
    truncated = len(text) > visible_chars
    lines: list[str] = []
    current = ""
    for word in text[:visible_chars].split():
        candidate = f"{current} {word}" if current else word
        if font.getlength(candidate) <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        rest = word
        while len(lines) < max_lines and len(rest) > 1 and font.getlength(rest) > max_width:
            cut = _longest_fitting_prefix(rest, font, max_width)  # a word wider than the box is cut
            lines.append(rest[:cut])
            rest = rest[cut:]
        current = rest
        if len(lines) >= max_lines:
            truncated = True
            break
    if current and len(lines) < max_lines:
        lines.append(current)
    elif current:
        truncated = True
    if truncated and lines:
        last = lines[-1]
        while last and font.getlength(last + "...") > max_width:
            last = last[:-1]
        lines[-1] = last + "..."
    return lines


def render_prompt_image(
    prompt: str, width: int, height: int, variant: int = 0, transparent: bool = False
) -> Image.Image:
    """A gradient whose colours come from a hash of the prompt (and ``variant``), with the prompt
    written on it. ``transparent`` keeps only the lettering (RGBA)."""
    digest = hashlib.sha256(f"{variant}:{prompt}".encode()).digest()
    start_colour, end_colour = tuple(digest[0:3]), tuple(digest[3:6])
    mask = Image.linear_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    if digest[6] % 2:  # vary the direction too, so similar colours still look different
        mask = mask.transpose(Image.Transpose.ROTATE_90).resize((width, height))
    image = Image.composite(
        Image.new("RGB", (width, height), end_colour), Image.new("RGB", (width, height), start_colour), mask
    )

    margin = max(2, min(width, height) // 16)
    font_size = max(8, min(width, height) // 18)
    font = _font(font_size)
    line_height = int(font_size * 1.3)
    max_lines = max(1, (height - 2 * margin) // line_height)
    lines = _wrap(prompt, font, width - 2 * margin, max_lines)
    mean_luma = sum(0.299 * r + 0.587 * g + 0.114 * b for r, g, b in (start_colour, end_colour)) / 2
    ink = (20, 20, 20) if mean_luma > 140 else (245, 245, 245)

    draw = ImageDraw.Draw(image)
    text_mask = Image.new("L", (width, height), 0) if transparent else None
    mask_draw = ImageDraw.Draw(text_mask) if text_mask is not None else None
    for index, line in enumerate(lines):
        y = margin + index * line_height
        draw.text((margin, y), line, font=font, fill=ink)
        if mask_draw is not None:
            mask_draw.text((margin, y), line, font=font, fill=255)
    if text_mask is not None:
        image.putalpha(text_mask)
    return image


def _encode(image: Image.Image, output_format: str, compression: int | None) -> bytes:
    buffer = io.BytesIO()
    quality = 100 if compression is None else compression
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=1)  # speed over size: this is a test double
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=max(1, quality))
    else:
        image.save(buffer, format="WEBP", quality=quality, method=0)
    return buffer.getvalue()


# ---- request validation -------------------------------------------------------------------------------


class _ApiError(Exception):
    """An error answer in OpenAI's shape: raised while handling a request, sent as the response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        outcome: str = "invalid_request",
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        error = {"message": message, "type": type_, "param": param, "code": code}
        self.body = {"error": {**error, **(extra or {})}}
        self.outcome = outcome
        self.headers = dict(headers or {})


def _model_not_found(model: str) -> _ApiError:
    return _ApiError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        code="model_not_found",
        outcome="model_not_found",
    )


def _bad_param(param: str, code: str, message: str) -> _ApiError:
    return _ApiError(400, message, param=param, code=code)


def _quoted_list(values: Iterable[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    names = {int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return names.get(type(value), "value")


def _require_type(body: Mapping[str, Any], name: str, expected: type, expected_name: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise _bad_param(
            name,
            "invalid_type",
            f"Invalid type for '{name}': expected {expected_name}, but got {_json_type(value)} instead.",
        )


def _require_choice(body: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> None:
    value = body.get(name)
    if value is not None and value not in allowed:
        raise _bad_param(
            name, "invalid_value", f"Invalid value: '{value}'. Supported values are: {_quoted_list(allowed)}."
        )


def _parse_size(size: str, spec: _ModelSpec) -> tuple[int, int]:
    if size == "auto":
        return _AUTO_SIZE
    if spec.family == "gpt-image-1":
        if size not in _GPT_IMAGE_1_SIZES:
            raise _bad_param(
                "size",
                "invalid_value",
                f"Invalid value: '{size}'. Supported values are: {_quoted_list(_GPT_IMAGE_1_SIZES)}.",
            )
        width, height = (int(part) for part in size.split("x"))
        return width, height
    parts = size.split("x")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise _bad_param(
            "size",
            "invalid_value",
            f"Invalid value: '{size}'. Expected 'auto' or 'WIDTHxHEIGHT', for example '1536x864'.",
        )
    width, height = int(parts[0]), int(parts[1])
    long_edge, short_edge = max(width, height), min(width, height)
    problem = None
    if width % 16 or height % 16:
        problem = "width and height must both be divisible by 16"
    elif short_edge < _GPT_IMAGE_2_MIN_EDGE:
        problem = f"width and height must be at least {_GPT_IMAGE_2_MIN_EDGE}"
    elif long_edge > 3 * short_edge:
        problem = "the aspect ratio must be between 1:3 and 3:1"
    elif long_edge > _GPT_IMAGE_2_MAX_LONG_EDGE or short_edge > _GPT_IMAGE_2_MAX_SHORT_EDGE:
        problem = "the maximum supported resolution is 3840x2160"
    if problem:
        raise _bad_param("size", "invalid_value", f"Invalid size '{size}': {problem}.")
    return width, height


@dataclass(frozen=True)
class _GenerationRequest:
    model: str
    prompt: str
    n: int
    size: str
    width: int
    height: int
    quality: str
    output_format: str
    output_compression: int | None
    transparent: bool
    safety_identifier: str | None


def _validate_generation(body: Mapping[str, Any]) -> _GenerationRequest:
    """The checks the real endpoint makes: unknown fields, the model, then each parameter."""
    for name in body:
        if name not in _KNOWN_GENERATION_FIELDS:
            raise _bad_param(name, "unknown_parameter", f"Unknown parameter: '{name}'.")
    if body.get("prompt") is None:
        raise _bad_param("prompt", "missing_required_parameter", "Missing required parameter: 'prompt'.")
    _require_type(body, "model", str, "a string")
    _require_type(body, "prompt", str, "a string")
    model = body.get("model") or _DEFAULT_MODEL
    spec = _LIVE_MODELS.get(model)
    if spec is None:
        raise _model_not_found(model)

    prompt = body["prompt"]
    if not prompt:
        raise _bad_param(
            "prompt",
            "empty_string",
            "Invalid 'prompt': empty string. Expected a string with "
            "minimum length 1, but got an empty string instead.",
        )
    if len(prompt) > _PROMPT_MAX_CHARS:
        raise _bad_param(
            "prompt",
            "string_above_max_length",
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{_PROMPT_MAX_CHARS}, but got a string with length {len(prompt)} instead.",
        )

    _require_type(body, "n", int, "an integer")
    n = 1 if body.get("n") is None else body["n"]
    if n < 1:
        raise _bad_param(
            "n",
            "integer_below_min_value",
            f"Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} instead.",
        )
    if n > 10:
        raise _bad_param(
            "n",
            "integer_above_max_value",
            f"Invalid 'n': integer above maximum value. Expected a value <= 10, but got {n} instead.",
        )

    _require_type(body, "size", str, "a string")
    size = body.get("size") or "auto"
    width, height = _parse_size(size, spec)

    for name in (
        "quality",
        "output_format",
        "background",
        "moderation",
        "response_format",
        "style",
        "complexity",
    ):
        _require_type(body, name, str, "a string")
    _require_choice(body, "quality", spec.qualities)
    _require_choice(body, "output_format", ("png", "jpeg", "webp"))
    _require_choice(body, "background", ("transparent", "opaque", "auto"))
    _require_choice(body, "moderation", ("low", "auto"))
    _require_choice(body, "complexity", ("low", "medium", "high"))
    if body.get("style") is not None:
        raise _bad_param(
            "style",
            "unsupported_parameter",
            f"Unsupported parameter: 'style' is not supported with the model '{model}'.",
        )
    if body.get("response_format") not in (None, "b64_json"):
        raise _bad_param(
            "response_format",
            "unsupported_value",
            f"Unsupported value: 'response_format' does not support '{body['response_format']}' "
            f"with the model '{model}'. Supported values are: 'b64_json'.",
        )
    if body.get("stream"):
        raise _bad_param(
            "stream",
            "unsupported_value",
            "Unsupported value: 'stream' is not supported by this server; ask without streaming.",
        )

    output_format = body.get("output_format") or "png"
    _require_type(body, "output_compression", int, "an integer")
    compression = body.get("output_compression")
    if compression is not None:
        if output_format == "png":
            raise _bad_param(
                "output_compression",
                "unsupported_parameter",
                "Unsupported parameter: 'output_compression' is only supported for the 'jpeg' "
                "and 'webp' output formats.",
            )
        if not 0 <= compression <= 100:
            raise _bad_param(
                "output_compression",
                "invalid_value",
                f"Invalid 'output_compression': expected 0 to 100, got {compression} instead.",
            )
    transparent = body.get("background") == "transparent"
    if transparent and output_format == "jpeg":
        raise _bad_param(
            "background",
            "invalid_value",
            "Transparent background is not supported for the 'jpeg' output format; use 'png' or 'webp'.",
        )

    safety_identifier = body.get("safety_identifier") or body.get("user")
    return _GenerationRequest(
        model=model,
        prompt=prompt,
        n=n,
        size=f"{width}x{height}",
        width=width,
        height=height,
        quality=_AUTO_QUALITY if body.get("quality") in (None, "auto") else body["quality"],
        output_format=output_format,
        output_compression=compression,
        transparent=transparent,
        safety_identifier=safety_identifier if isinstance(safety_identifier, str) else None,
    )


# ---- error answers -------------------------------------------------------------------------------------


def _invalid_key_error(masked_key: str) -> _ApiError:
    return _ApiError(
        401,
        f"Incorrect API key provided: {masked_key}. {_KEYS_PAGE}",
        code="invalid_api_key",
        outcome="invalid_key",
    )


def _retry_headers(seconds: float) -> dict[str, str]:
    milliseconds = math.ceil(round(seconds * 1000, 6))
    return {
        "retry-after": str(math.ceil(milliseconds / 1000)),
        "retry-after-ms": str(milliseconds),
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": format_reset_duration(milliseconds / 1000),
    }


def _rate_limited_error(model: str, limit: int, wait_s: float | None) -> _ApiError:
    wait = f" Please try again in {format_reset_duration(wait_s)}." if wait_s is not None else ""
    message = (
        f"Rate limit reached for {model} in organization org-emulator on requests per min (RPM): "
        f"Limit {limit}, Used {limit}, Requested 1.{wait} "
        "Visit https://platform.openai.com/account/rate-limits to learn more."
    )
    headers = _retry_headers(wait_s) if wait_s is not None else {"x-ratelimit-remaining-requests": "0"}
    return _ApiError(
        429, message, type_="requests", code="rate_limit_exceeded", outcome="rate_limited", headers=headers
    )


_SERVER_ERROR_MESSAGES = {
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway.",
    503: "The server is overloaded or not ready yet.",
}


def _scripted_error(
    behaviour: Behaviour, request: _GenerationRequest, request_id: str, masked_key: str
) -> _ApiError:
    kind = behaviour.kind
    if kind == "rate_limited":
        return _rate_limited_error(request.model, _NOMINAL_REQUESTS_PER_MINUTE, behaviour.retry_after_s)
    if kind == "server_error":
        return _ApiError(
            behaviour.status, _SERVER_ERROR_MESSAGES[behaviour.status], type_="server_error", outcome=kind
        )
    if kind == "moderation_blocked":
        details = {"moderation_stage": behaviour.moderation_stage, "categories": list(behaviour.categories)}
        message = (
            "Your request was rejected by the safety system. If you believe this is an error, contact "
            f"us at help.openai.com and include the request ID {request_id}."
        )
        return _ApiError(
            400,
            message,
            type_="image_generation_user_error",
            code="moderation_blocked",
            outcome=kind,
            extra={"moderation_details": details},
        )
    if kind == "invalid_key":
        return _invalid_key_error(masked_key)
    if kind == "permission_denied":
        return _ApiError(
            403,
            f"Your organization must be verified to use the model `{request.model}`. Please go "
            "to: https://platform.openai.com/settings/organization/general and click on Verify "
            "Organization.",
            outcome=kind,
        )
    if kind == "model_not_found":
        return _model_not_found(request.model)
    if kind == "insufficient_quota":
        return _ApiError(
            429,
            "You exceeded your current quota, please check your plan and billing details. "
            "For more information on this error, read the docs: "
            "https://platform.openai.com/docs/guides/error-codes/api-errors.",
            type_="insufficient_quota",
            code="insufficient_quota",
            outcome=kind,
        )
    if kind == "billing_hard_limit":
        return _ApiError(
            400,
            "Billing hard limit has been reached",
            type_="billing_limit_user_error",
            code="billing_hard_limit_reached",
            outcome=kind,
        )
    raise AssertionError(f"unhandled behaviour kind {kind!r}")


_MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if "
    "you're accessing the API from your browser and are prompted for a username. You can obtain an API key "
    "from https://platform.openai.com/account/api-keys."
)

_BAD_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON. "
    "If you have trouble figuring out how to fix this, please contact us through our help center at "
    "help.openai.com.)"
)


def _control_error(status: int, message: str) -> _Reply:
    return _Reply(
        status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
    )


# ---- request parsing helpers -----------------------------------------------------------------------


def _bearer_key(headers: Mapping[str, str]) -> str | None:
    scheme, _, key = (headers.get("Authorization") or "").partition(" ")
    key = key.strip()
    return key if scheme.lower() == "bearer" and key else None


def _json_object(raw_body: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw_body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return body if isinstance(body, dict) else None


def _parse_json(raw_body: bytes) -> dict[str, Any]:
    body = _json_object(raw_body)
    if body is None:
        raise _ApiError(400, _BAD_JSON_MESSAGE, outcome="invalid_json")
    return body


def _loggable_fields(raw_body: bytes) -> dict[str, Any]:
    """What the log keeps of a generation request's body, as sent (before validation)."""
    body = _json_object(raw_body) or {}

    def text(name: str) -> str | None:
        value = body.get(name)
        return value if isinstance(value, str) else None

    def whole(name: str) -> int | None:
        value = body.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return {
        "model": text("model"),
        "prompt": text("prompt"),
        "size": text("size"),
        "quality": text("quality"),
        "n": whole("n"),
        "output_format": text("output_format"),
        "output_compression": whole("output_compression"),
        "background": text("background"),
    }


def _models_body(model_id: str) -> dict[str, Any]:
    def describe(name: str, spec: _ModelSpec) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": spec.created,
            "owned_by": "system",
            "shutdown_date": spec.shutdown_date,
        }

    if not model_id:
        return {"object": "list", "data": [describe(name, spec) for name, spec in _LIVE_MODELS.items()]}
    spec = _LIVE_MODELS.get(model_id)
    if spec is None:
        raise _model_not_found(model_id)
    return describe(model_id, spec)


# ---- the HTTP plumbing ------------------------------------------------------------------------------


@dataclass
class _Reply:
    status: int
    body: dict[str, Any] | None
    headers: dict[str, str] = field(default_factory=dict)
    #: close the connection without answering (a hung request, released)
    drop: bool = False


@dataclass(frozen=True)
class _RateState:
    limit: int
    remaining: int
    next_slot_in_s: float
    refused: bool = False


class _Hung(Exception):
    """A timeout_hang request was released: drop its connection without answering."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects
    server_version = "openai-emulator"
    timeout = 120  # an idle kept-alive connection does not hold its thread forever
    disable_nagle_algorithm = True  # headers and body are two writes: don't stall 40 ms between them
    server: LocalHTTPServer

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the emulator keeps its own request log

    def _serve(self, method: str) -> None:
        arrived_at, arrived_mono = time.time(), time.monotonic()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        raw_body = self.rfile.read(length) if length > 0 else b""
        try:
            reply = self.server.app._dispatch(
                method, self.path, self.headers, raw_body, arrived_at, arrived_mono
            )
        except Exception as failure:  # noqa: BLE001 - an emulator bug is answered loudly, not left hanging
            error = {
                "message": f"OpenAI emulator failure: {failure!r}",
                "type": "server_error",
                "param": None,
                "code": "emulator_failure",
            }
            reply = _Reply(500, {"error": error})
        if reply.drop:
            self.close_connection = True
            return
        payload = b"" if reply.body is None else json.dumps(reply.body).encode()
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first
            self.close_connection = True


# ---- the emulator -------------------------------------------------------------------------------------


class OpenAIEmulator(LocalServer):
    """OpenAI's images API on ``127.0.0.1:<port>`` (0 picks a free port); also a context manager.

    Order of checks for ``POST /v1/images/generations``: the API key (401), the rate cap if one is set
    (429), the body (400/404). A valid request then gets the first rule whose text is in its prompt,
    else the next queued behaviour (each used once), else the default. Invalid requests consume nothing.
    The local stack runs it in a process of its own through ``OpenAIEmulatorProcess``, so that the
    arrival times it records are taken by a process that does nothing else.
    """

    handler_class = _Handler
    display_name = "OpenAI emulator"

    def __init__(
        self,
        port: int = 0,
        revoked_keys: Iterable[str] = (),
        revoked_key_prefixes: Iterable[str] = ("sk-invalid",),
    ):
        super().__init__(port)
        #: keys answered 401 invalid_api_key: configuration given by the tester, never a request's key
        self.revoked_keys: set[str] = set(revoked_keys)
        self.revoked_key_prefixes = tuple(revoked_key_prefixes)
        self._lock = threading.Lock()
        self._release_hangs = threading.Event()
        self._queue: deque[Behaviour] = deque()
        self._rules: list[_Rule] = []
        self._default = Behaviour()
        self._log: list[RecordedRequest] = []
        self._rate_cap: int | None = None
        self._rate_window_s = 60.0
        self._admitted: dict[str, deque[float]] = {}

    # -- lifecycle --

    def start(self) -> OpenAIEmulator:
        if self.running:
            raise RuntimeError("the OpenAI emulator is already running")
        with self._lock:
            self._release_hangs = threading.Event()
        return super().start()

    def _on_stop(self) -> None:
        self._release_hangs.set()

    @property
    def base_url(self) -> str:
        """What ``openai.OpenAI(base_url=...)`` takes."""
        return f"{self.origin}/v1"

    @property
    def control_url(self) -> str:
        return f"{self.origin}/_emulator"

    def revoke_key(self, api_key: str) -> None:
        """Answer ``api_key`` with 401 invalid_api_key from now on."""
        with self._lock:
            self.revoked_keys.add(api_key)

    # -- scripting --

    def enqueue(self, *behaviours: BehaviourLike) -> None:
        """Behaviours for the next generation requests, one each, in order; then the default applies."""
        parsed = [_as_behaviour(b) for b in behaviours]
        with self._lock:
            self._queue.extend(parsed)

    def set_default(self, behaviour: BehaviourLike) -> None:
        parsed = _as_behaviour(behaviour)
        with self._lock:
            self._default = parsed

    def rule(self, prompt_contains: str, behaviour: BehaviourLike, times: int | None = None) -> None:
        """Every generation request whose prompt contains ``prompt_contains`` (case-sensitive) gets
        ``behaviour``; the first matching rule wins, before the queue. With ``times``, the rule serves that
        many requests and is then dropped (so tests running side by side can each script their own)."""
        if not prompt_contains:
            raise ValueError("prompt_contains must not be empty")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1")
        parsed = _as_behaviour(behaviour)
        with self._lock:
            self._rules.append(_Rule(prompt_contains, parsed, times))

    def set_rate_cap(self, requests_per_minute: int | None, window_s: float = 60.0) -> None:
        """Enforce at most ``requests_per_minute`` generation requests per API key in any ``window_s``
        sliding window (None lifts the cap). Every key's window starts afresh."""
        if requests_per_minute is not None and (
            isinstance(requests_per_minute, bool)
            or not isinstance(requests_per_minute, int)
            or requests_per_minute < 1
        ):
            raise ValueError("requests_per_minute must be a whole number >= 1, or None for no cap")
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        with self._lock:
            self._rate_cap = requests_per_minute
            self._rate_window_s = float(window_s) if requests_per_minute is not None else 60.0
            self._admitted.clear()

    def reset(self) -> None:
        """Forget the log, queue, rules, default, rate cap and windows; drop requests that hang."""
        with self._lock:
            self._queue.clear()
            self._rules.clear()
            self._default = Behaviour()
            self._log.clear()
            self._rate_cap = None
            self._rate_window_s = 60.0
            self._admitted.clear()
            hanging, self._release_hangs = self._release_hangs, threading.Event()
        hanging.set()

    def scripting_state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "queued": [b.model_dump(mode="json") for b in self._queue],
                "rules": [
                    {"prompt_contains": r.prompt_contains, "behaviour": r.behaviour.model_dump(mode="json")}
                    for r in self._rules
                ],
                "default": self._default.model_dump(mode="json"),
                "rate_cap": None
                if self._rate_cap is None
                else {"requests_per_minute": self._rate_cap, "window_s": self._rate_window_s},
            }

    # -- the log --

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._log)

    def generation_starts(self) -> list[float]:
        """Arrival times (epoch seconds, ascending) of every ``POST /v1/images/generations``."""
        return sorted(r.started_at for r in self.requests if r.is_generation)

    # -- request handling (on the server's threads) --

    def _dispatch(
        self,
        method: str,
        raw_path: str,
        headers: Mapping[str, str],
        raw_body: bytes,
        arrived_at: float,
        arrived_mono: float,
    ) -> _Reply:
        path = urlsplit(raw_path).path.rstrip("/") or "/"
        if path.startswith("/_emulator"):
            reply = self._control(method, path, raw_body)
            reply.headers.update(self._common_headers(f"req_{uuid.uuid4().hex}", arrived_mono, None))
            return reply

        request_id = f"req_{uuid.uuid4().hex}"
        api_key = _bearer_key(headers)
        fingerprint = key_fingerprint(api_key) if api_key else None
        fields: dict[str, Any] = {}
        rate: _RateState | None = None
        extra_headers: dict[str, str] = {}
        try:
            if method == "POST" and path == "/v1/images/generations":
                fields = _loggable_fields(raw_body)
                self._authenticate(api_key)  # as the real API: the key is checked before the body
                rate = self._admit(fingerprint, counts=True)
                if rate.refused:
                    model = fields["model"] or _DEFAULT_MODEL
                    raise _rate_limited_error(model, rate.limit, rate.next_slot_in_s)
                generation = _validate_generation(_parse_json(raw_body))
                fields.update(model=generation.model, size=generation.size, quality=generation.quality)
                masked_key = _mask_key(api_key or "")
                status, response_body, outcome = self._generate(generation, request_id, masked_key)
            elif method == "GET" and (path == "/v1/models" or path.startswith("/v1/models/")):
                model_id = path.removeprefix("/v1/models").lstrip("/")
                fields = {"model": model_id or None}
                self._authenticate(api_key)
                status, response_body, outcome = 200, _models_body(model_id), "ok"
            else:
                raise _ApiError(404, f"Invalid URL ({method} {path})", outcome="unknown_route")
        except _ApiError as error:
            status, response_body, outcome = error.status, error.body, error.outcome
            extra_headers = error.headers
        except _Hung:
            self._record(request_id, method, path, arrived_at, fingerprint, None, "timeout_hang", fields)
            return _Reply(0, None, drop=True)

        reply_headers = self._common_headers(
            request_id, arrived_mono, rate or self._admit(fingerprint, counts=False)
        )
        reply_headers.update(extra_headers)
        self._record(request_id, method, path, arrived_at, fingerprint, status, outcome, fields)
        return _Reply(status, response_body, reply_headers)

    def _authenticate(self, api_key: str | None) -> None:
        if not api_key:
            raise _ApiError(401, _MISSING_KEY_MESSAGE, outcome="missing_key")
        if api_key in self.revoked_keys or api_key.startswith(self.revoked_key_prefixes):
            raise _invalid_key_error(_mask_key(api_key))

    def _admit(self, fingerprint: str | None, counts: bool) -> _RateState:
        """The per-key sliding window: admits (and counts) a request, or refuses it when the cap is full.
        ``next_slot_in_s`` is when the oldest counted request leaves the window."""
        with self._lock:
            cap, window = self._rate_cap, self._rate_window_s
            limit = cap if cap is not None else _NOMINAL_REQUESTS_PER_MINUTE
            if fingerprint is None:
                return _RateState(limit, limit, 0.0)
            now = time.monotonic()
            admitted = self._admitted.setdefault(fingerprint, deque())
            while admitted and admitted[0] + window <= now:
                admitted.popleft()
            if counts:
                if cap is not None and len(admitted) >= cap:
                    return _RateState(limit, 0, admitted[0] + window - now, refused=True)
                admitted.append(now)
            next_slot_in_s = admitted[0] + window - now if admitted else 0.0
            return _RateState(limit, max(0, limit - len(admitted)), next_slot_in_s)

    def _choose_behaviour(self, prompt: str) -> tuple[Behaviour, threading.Event]:
        with self._lock:
            hang_release = self._release_hangs
            for rule in self._rules:
                if rule.prompt_contains in prompt:
                    if rule.remaining is not None:
                        rule.remaining -= 1
                        if rule.remaining <= 0:
                            self._rules.remove(rule)
                    return rule.behaviour, hang_release
            if self._queue:
                return self._queue.popleft(), hang_release
            return self._default, hang_release

    def _generate(
        self, request: _GenerationRequest, request_id: str, masked_key: str
    ) -> tuple[int, dict[str, Any], str]:
        behaviour, hang_release = self._choose_behaviour(request.prompt)
        if behaviour.latency_s:
            self._stopping.wait(behaviour.latency_s)
        if behaviour.kind == "timeout_hang":
            hang_release.wait(_HANG_LIMIT_S)
            raise _Hung()
        if behaviour.kind != "ok":
            raise _scripted_error(behaviour, request, request_id, masked_key)

        images = []
        for variant in range(request.n):
            image = render_prompt_image(
                request.prompt, request.width, request.height, variant, request.transparent
            )
            encoded = _encode(image, request.output_format, request.output_compression)
            images.append({"b64_json": base64.b64encode(encoded).decode()})
        text_tokens = max(1, math.ceil(len(request.prompt) / 4))
        megapixels = request.width * request.height / (1024 * 1024)
        output_tokens = request.n * max(1, round(_OUTPUT_TOKENS_PER_MEGAPIXEL[request.quality] * megapixels))
        body: dict[str, Any] = {
            "created": int(time.time()),
            "data": images,
            "background": "transparent" if request.transparent else "opaque",
            "output_format": request.output_format,
            "quality": request.quality,
            "size": request.size,
            "usage": {
                "input_tokens": text_tokens,
                "output_tokens": output_tokens,
                "total_tokens": text_tokens + output_tokens,
                "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
            },
        }
        if request.safety_identifier:
            body["safety_identifier"] = request.safety_identifier
        return 200, body, "ok"

    def _common_headers(
        self, request_id: str, arrived_mono: float, rate: _RateState | None
    ) -> dict[str, str]:
        headers = {
            "x-request-id": request_id,
            "openai-processing-ms": str(max(1, round((time.monotonic() - arrived_mono) * 1000))),
            "openai-version": "2020-10-01",
        }
        if rate is not None:
            headers.update(
                {
                    "x-ratelimit-limit-requests": str(rate.limit),
                    "x-ratelimit-remaining-requests": str(rate.remaining),
                    "x-ratelimit-reset-requests": format_reset_duration(rate.next_slot_in_s),
                }
            )
        return headers

    def _record(
        self,
        request_id: str,
        method: str,
        path: str,
        started_at: float,
        fingerprint: str | None,
        status: int | None,
        outcome: str,
        fields: Mapping[str, Any],
    ) -> None:
        record = RecordedRequest(
            request_id=request_id,
            method=method,
            path=path,
            started_at=started_at,
            finished_at=time.time(),
            key_fingerprint=fingerprint,
            status=status,
            outcome=outcome,
            model=fields.get("model"),
            prompt=fields.get("prompt"),
            size=fields.get("size"),
            quality=fields.get("quality"),
            n=fields.get("n"),
            output_format=fields.get("output_format"),
            output_compression=fields.get("output_compression"),
            background=fields.get("background"),
        )
        with self._lock:
            self._log.append(record)

    # -- the control API (/_emulator/...), so the running stack can be scripted over HTTP --

    def _control(self, method: str, path: str, raw_body: bytes) -> _Reply:
        try:
            if method == "GET" and path == "/_emulator/health":
                return _Reply(200, self.health())
            if method == "POST" and path == "/_emulator/revoked_keys":
                self.revoke_key(str(_parse_json(raw_body)["api_key"]))
                return _Reply(200, {"status": "success"})
            if method == "GET" and path == "/_emulator/requests":
                return _Reply(200, {"object": "list", "data": [asdict(r) for r in self.requests]})
            if method == "GET" and path == "/_emulator/behaviours":
                return _Reply(200, self.scripting_state())
            if method == "POST" and path == "/_emulator/reset":
                self.reset()
                return _Reply(200, self.scripting_state())
            if method == "POST" and path == "/_emulator/behaviours":
                self._apply_behaviour_script(_parse_json(raw_body))
                return _Reply(200, self.scripting_state())
            if method == "POST" and path == "/_emulator/rate_cap":
                body = _parse_json(raw_body)
                self.set_rate_cap(body.get("requests_per_minute"), float(body.get("window_s", 60.0)))
                return _Reply(200, self.scripting_state())
        except _ApiError as error:
            return _Reply(error.status, error.body)
        except (ValidationError, ValueError, TypeError, KeyError) as error:
            return _control_error(400, str(error))
        return _control_error(404, f"Invalid URL ({method} {path})")

    def _apply_behaviour_script(self, body: Mapping[str, Any]) -> None:
        """``{"enqueue": [...], "default": {...}, "rule": {...} | "rules": [...]}``, any of them; a
        behaviour is a kind's name or a Behaviour's JSON object; a rule may say how many ``times``."""
        known = {"enqueue", "default", "rule", "rules"}
        if not body or set(body) - known:
            raise ValueError(f"expected one or more of {sorted(known)}, got {sorted(body)}")

        def as_list(value: Any) -> list[Any]:
            return value if isinstance(value, list) else [value]

        # parse everything first, so a bad entry changes nothing
        queued = [_as_behaviour(b) for b in as_list(body.get("enqueue", []))]
        default = _as_behaviour(body["default"]) if "default" in body else None
        rules = []
        for spec in as_list(body.get("rules", [])) + ([body["rule"]] if "rule" in body else []):
            if not isinstance(spec, dict) or not spec.get("prompt_contains") or "behaviour" not in spec:
                raise ValueError(
                    "a rule is {'prompt_contains': <non-empty text>, 'behaviour': <behaviour>}, "
                    f"got {spec!r}"
                )
            times = spec.get("times")
            if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
                raise ValueError(f"a rule's times must be a whole number >= 1, got {times!r}")
            rules.append(_Rule(str(spec["prompt_contains"]), _as_behaviour(spec["behaviour"]), times))
        with self._lock:
            self._queue.extend(queued)
            if default is not None:
                self._default = default
            self._rules.extend(rules)


class OpenAIEmulatorProcess(ServerProcess):
    """The OpenAI emulator in a child process of its own, with ``OpenAIEmulator``'s scripting and reading
    methods: each one is a request to the child's control API (``/_emulator/...``)."""

    def __init__(
        self, revoked_keys: Iterable[str] = (), revoked_key_prefixes: Iterable[str] = ("sk-invalid",)
    ):
        super().__init__(
            "local_stack.openai_emulator:OpenAIEmulator",
            {
                "revoked_keys": sorted(revoked_keys),
                "revoked_key_prefixes": list(revoked_key_prefixes),
            },
        )

    @property
    def base_url(self) -> str:
        """What ``openai.OpenAI(base_url=...)`` takes."""
        return f"{self.origin}/v1"

    @property
    def control_url(self) -> str:
        return f"{self.origin}/_emulator"

    # -- scripting --

    def enqueue(self, *behaviours: BehaviourLike) -> None:
        self._call("POST", "behaviours", {"enqueue": [_as_json(b) for b in behaviours]})

    def set_default(self, behaviour: BehaviourLike) -> None:
        self._call("POST", "behaviours", {"default": _as_json(behaviour)})

    def rule(self, prompt_contains: str, behaviour: BehaviourLike, times: int | None = None) -> None:
        self._call(
            "POST",
            "behaviours",
            {"rule": {"prompt_contains": prompt_contains, "behaviour": _as_json(behaviour), "times": times}},
        )

    def set_rate_cap(self, requests_per_minute: int | None, window_s: float = 60.0) -> None:
        self._call("POST", "rate_cap", {"requests_per_minute": requests_per_minute, "window_s": window_s})

    def revoke_key(self, api_key: str) -> None:
        self._call("POST", "revoked_keys", {"api_key": api_key})

    def reset(self) -> None:
        self._call("POST", "reset")

    def scripting_state(self) -> dict[str, Any]:
        return self._call("GET", "behaviours")

    # -- the log --

    @property
    def requests(self) -> list[RecordedRequest]:
        return [RecordedRequest(**r) for r in self._call("GET", "requests")["data"]]

    def generation_starts(self) -> list[float]:
        """Arrival times (epoch seconds, ascending, taken by the emulator's process) of every generation."""
        return sorted(r.started_at for r in self.requests if r.is_generation)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        return self.control.call(method, path, body)


def _as_json(behaviour: BehaviourLike) -> dict[str, Any]:
    return _as_behaviour(behaviour).model_dump(mode="json")  # parsed here: a bad behaviour fails the caller


def main() -> None:
    """``python -m local_stack.openai_emulator [--port N]``: serve until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(description="OpenAI images API emulator on 127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with OpenAIEmulator(port=args.port) as emulator:
        print(f"OpenAI images emulator: {emulator.base_url} (control: {emulator.control_url})", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
