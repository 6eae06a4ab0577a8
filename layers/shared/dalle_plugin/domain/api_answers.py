"""What the REST endpoint answers, as pydantic models, for ``docs/openapi.yaml`` only (``make openapi``):
the answers themselves are built by the domain (``sessions.py``, ``cancel.py``) and the API as plain JSON,
so serving never creates these classes (each costs a cold start, built or not)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dalle_plugin.domain.run import RunStatus


class ErrorBody(BaseModel):
    """Every refusal of the API function: a sentence a person can act on, never quoting a secret."""

    error: Literal[True] = True
    message: str = Field(min_length=1)
    field: str | None = Field(default=None, description="The request field at fault, when one is.")


class GatewayUnauthorized(BaseModel):
    """API Gateway's own answer when the Secret header is missing or empty."""

    message: str = Field(min_length=1)


class GatewayDenied(BaseModel):
    """API Gateway's own answer when the authorizer denied the Secret header."""

    model_config = ConfigDict(populate_by_name=True)
    message: str = Field(alias="Message", min_length=1)


class TaskState(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    task_id: str = Field(alias="taskId")
    status: RunStatus


class RunAccepted(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    session: str
    status: Literal["QUEUED", "ALREADY_STARTED"]
    duplicate: bool = Field(description="True when every task of the request was already running.")
    task_id: str | None = Field(default=None, alias="taskId", description="The task, for a one-task run.")
    tasks: list[TaskState]
    status_url: str = Field(alias="statusUrl")
    storing: int | None = Field(
        default=None,
        description="A large batch: its tasks are stored and started after this answer (the session's "
        "`storing` shows how far); absent when every run was stored before it.",
    )


class Storing(BaseModel):
    """A large batch's requests of the session, as far as they are stored."""

    accepted: int = Field(description="Tasks the session's large batch requests named.")
    stored: int = Field(description="Of them, stored (their executions started).")


class CancelledTask(BaseModel):
    task_id: str
    cancelled: bool
    status: str
    why: str | None = None


class CancelOutcome(BaseModel):
    session: str
    tasks: list[CancelledTask]


class Progress(BaseModel):
    total: int = Field(ge=0)
    done: int = Field(ge=0)
    failed: int = Field(ge=0)
    cancelled: int = Field(ge=0)
    waiting: int = Field(ge=0)
    running: int = Field(ge=0)


class ImageView(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")
    hub_url: str | None = Field(default=None, alias="hubUrl")
    attached: bool = False
    sha256: str | None = None
    bytes: int | None = None
    model: str | None = None
    format: Literal["png", "jpeg", "webp"] = "png"
    download_url: str | None = Field(
        default=None, alias="downloadUrl", description="A presigned S3 link, valid for an hour."
    )


class RunView(BaseModel):
    """One task's run as a person reads it: state, queue position, prompt, images, timings, failure."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")
    task_id: str = Field(alias="taskId")
    status: RunStatus
    workflow: bool = False
    model: dict[str, Any] = Field(description="requested, actual, substituted, note")
    size: str
    quality: str | None = None
    prompt_source: str = Field(alias="promptSource")
    notes: list[str] = []
    prompt: dict[str, Any] | None = Field(
        default=None, description="text, source, length, originalLength, truncated, template"
    )
    created_at_ms: int = Field(alias="createdAtMs")
    updated_at_ms: int = Field(alias="updatedAtMs")
    timeline: list[dict[str, Any]] = Field(description="step, status, atMs, durationMs, detail")
    queue: dict[str, int] | None = Field(default=None, description="position, startAtMs (shared key only)")
    output: dict[str, Any] | None = None
    max_cost_usd: float | None = Field(default=None, alias="maxCostUsd")
    image: ImageView | None = Field(default=None, description="The first image (as images[0]).")
    images: list[ImageView] | None = None
    failure: dict[str, Any] | None = Field(
        default=None,
        description="reason (e.g. moderation_blocked, invalid_api_key, quota_exhausted, hub_unavailable, "
        "spending_limit_reached, org_quota_reached), message, error",
    )
    estimated_cost_usd: float | None = Field(default=None, alias="estimatedCostUsd", ge=0)


class SessionPage(BaseModel):
    """The first page (no ``page`` asked) carries the session's summary; every page carries runs, in task id
    order, and ``next``, the token of the page after (null at the end)."""

    model_config = ConfigDict(populate_by_name=True)
    session: str
    status: str | None = Field(
        default=None,
        description="First page: SUCCEEDED, FAILED or CANCELLED when every run ended; RUNNING for a batch "
        "still at work; else the one run's status.",
    )
    progress: Progress | None = None
    counts: dict[str, int] | None = Field(default=None, description="Runs by status.")
    estimated_cost_usd: float | None = Field(default=None, alias="estimatedCostUsd", ge=0)
    max_cost_usd: float | None = Field(default=None, alias="maxCostUsd", description="Config JSON's limit.")
    created_at_ms: int | None = Field(default=None, alias="createdAtMs")
    updated_at_ms: int | None = Field(default=None, alias="updatedAtMs")
    storing: Storing | None = Field(
        default=None,
        description="First page, while a large batch is still being stored: runs appear as they are.",
    )
    storing_stopped: list[str] | None = Field(
        default=None,
        alias="storingStopped",
        description="First page: for each large batch whose storing stopped before the end (its starter "
        "failed, or the session was cancelled), what happened and what to do. Runs stored keep going.",
    )
    runs: list[RunView]
    next: str | None = Field(description="Pass as `page` for the next runs; null when there are no more.")
