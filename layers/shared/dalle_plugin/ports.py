"""The small interfaces behind which every outside system sits.

The domain receives these; handlers build the real adapters (``adapters/``) lazily, tests pass fakes or
point the real adapters at the local stack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from dalle_plugin.domain.run import RunRecord


# ---- the hub -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubAsset:
    asset_id: str
    external_id: str
    data_url: str


class HubClient(Protocol):
    """Ango Hub's REST API as the plugin uses it (``/v2/...``), authenticated as the user who ran it."""

    def get_task(self, task_id: str) -> dict[str, Any]:
        """``GET /v2/task/{id}?includeAnswer=true`` -> ``data.task`` (with ``answer`` in read format)."""

    def get_asset(self, project_id: str, asset_id: str) -> HubAsset: ...

    def fetch_text(self, url: str) -> bytes:
        """The raw bytes of a text asset (size-capped, with a timeout); decoding is the domain's job."""

    def upload_file(self, project_id: str, name: str, body: bytes, content_type: str) -> str:
        """``/v2/getUploadUrl`` + PUT; returns the file's permanent URL."""

    def attach_image(self, project_id: str, external_id: str, image_url: str) -> None: ...

    def annotate(self, task_id: str, answer: dict[str, Any]) -> None:
        """Submit the task's answer (write format) and move it to the next workflow stage."""

    def plugin_response(self, session: str, response: Any = None, error: bool = False) -> None: ...

    def plugin_log(self, session: str, message: str, level: str = "INFO", **extra: Any) -> None: ...


# ---- OpenAI ----------------------------------------------------------------------------------------


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
class GeneratedImage:
    #: the first image's bytes, in the requested format (png unless asked otherwise)
    png: bytes
    model: str
    request_id: str | None = None
    revised_prompt: str | None = None
    usage: dict[str, Any] | None = None
    #: the further images of a request with n > 1, in OpenAI's order
    more: tuple[bytes, ...] = ()

    @property
    def bodies(self) -> tuple[bytes, ...]:
        return (self.png,) + self.more


class ImageGenerator(Protocol):
    def generate(self, request: ImageRequest, api_key: str) -> GeneratedImage:
        """Exactly one upstream request. Raises the named errors of ``domain.errors`` (and
        ``UpstreamRateLimited`` with the server's own retry time on a 429 rate limit)."""


# ---- AWS -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str


class ImageStore(Protocol):
    def put_image(self, key: str, body: bytes, content_type: str, metadata: dict[str, str]) -> StoredObject: ...

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    def presigned_url(self, key: str, expires_s: int = 3600) -> str: ...


class SecretVault(Protocol):
    """Seals the user's secrets with the KMS key; the ciphertext is bound to the run by encryption context."""

    def seal(self, secrets: dict[str, str], context: dict[str, str]) -> bytes: ...

    def open(self, sealed: bytes, context: dict[str, str]) -> dict[str, str]: ...


class WorkflowStarter(Protocol):
    def start(self, name: str, run_input: dict[str, Any]) -> str:
        """Start an execution named ``name`` (idempotent: the same name and input start it once)."""

    def stop(self, execution_arn: str, cause: str) -> None: ...

    def arn_of(self, name: str) -> str:
        """The id of the execution named ``name`` (started or not)."""


@dataclass(frozen=True)
class RateDecision:
    """What the global limiter answers a caller.

    ``start_at_ms`` is the epoch millisecond at which the caller may start its request (<= now: at once).
    ``reserved`` tells whether the slot at ``start_at_ms`` is already the caller's (wait, then go without
    asking again) or whether the caller must ask again at that time. ``position`` is how many requests
    start before this one (0 when it may start now). ``calls`` counts the DynamoDB calls it took.
    """

    start_at_ms: int
    reserved: bool
    position: int = 0
    calls: int = 1


class RateLimiter(Protocol):
    def acquire(self, ticket: str, now_ms: int) -> RateDecision: ...

    def release(self, ticket: str, now_ms: int, start_at_ms: int) -> None:
        """Give a booked start back (a cancelled run): the next caller may take it."""


@dataclass(frozen=True)
class AllowanceAnswer:
    """``granted``: the amount is now counted for the ticket (or already was). ``used`` is the counter's
    total after the grant, or, refused, as it stood (what the refusal reports)."""

    granted: bool
    used: int


class AllowanceLedger(Protocol):
    """Counters that may not pass a limit, shared by every Lambda: a session's spending, an organisation's
    images of the day. Each grant is counted once per ticket, atomically, so concurrent runs cannot
    overshoot and a retried step never counts twice."""

    def reserve(self, counter: str, ticket: str, amount: int, limit: int, expires_at: int) -> AllowanceAnswer:
        """Count ``amount`` for ``ticket`` unless the total would pass ``limit``."""

    def release(self, counter: str, ticket: str, amount: int) -> None:
        """Give a ticket's amount back (its request was not billed); a second release does nothing."""


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class RunStore(Protocol):
    """Run records (the sessions table). ``update`` is a read-modify-write with optimistic locking, so a
    cancel and a step never overwrite each other."""

    def create(self, run: "RunRecord") -> tuple["RunRecord", bool]:
        """Store the run unless one exists for (session, task); returns (the stored run, created?)."""

    def get(self, session: str, task_id: str) -> "RunRecord | None": ...

    def update(self, session: str, task_id: str, mutate: "Callable[[RunRecord], None]") -> "RunRecord": ...

    def list_session(self, session: str) -> "list[RunRecord]": ...


class ReusableImages(Protocol):
    """Images paid for by runs that ended without delivering them, offered to the next run of the same task
    with the same prompt and options (``fingerprint``), so a re-run after a failure does not pay again."""

    def offer(self, fingerprint: str, key: str, expires_at: int) -> None:
        """Make the stored image at ``key`` available to the next run with this fingerprint."""

    def claim(self, fingerprint: str) -> str | None:
        """Take the offered image's key (atomically: one claimer wins), or None when there is none."""
