"""What the image-generation ports carry (ports.ImageGenerator, ports.KeyPacer): only Generate builds these
values, so they live apart from ports.py, which every function imports (each frozen dataclass costs a cold
start the compiling of its generated methods)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ImageRequest:
    model: str
    prompt: str
    size: str
    quality: str | None = None
    #: images asked for in this one request (OpenAI's ``n``)
    n: int = 1
    #: None: the parameter is not sent (the model's default, png)
    output_format: str | None = None
    output_compression: int | None = None
    background: str | None = None


@dataclass(frozen=True)
class KeyLimits:
    """What an OpenAI answer's ``x-ratelimit-*-requests`` headers said about the key (None: not sent)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_ms: int | None = None
    #: the latest the request can have reached OpenAI (answer in hand less openai-processing-ms), epoch ms
    arrived_by_ms: int | None = None


@dataclass(frozen=True)
class GeneratedImage:
    #: the first image's bytes, in the requested format (png unless asked otherwise)
    png: bytes
    model: str
    request_id: str | None = None
    revised_prompt: str | None = None
    usage: dict[str, Any] | None = None
    #: the further images of a request with n > 1, in OpenAI's order
    more: tuple[bytes, ...] = ()
    #: the answer's rate-limit headers (what an own key is paced by)
    limits: KeyLimits | None = None

    @property
    def bodies(self) -> tuple[bytes, ...]:
        return (self.png, *self.more)


@dataclass(frozen=True)
class PaceDecision:
    """An own key's answer to a claim: ``granted`` (the request may leave now; its send is recorded), or
    the earliest time a send may be possible (``start_at_ms``, epoch ms). ``calls`` counts DynamoDB calls."""

    granted: bool
    start_at_ms: int
    calls: int = 1
