"""What the REST endpoint takes, as pydantic models: the API validates each request's path, query and body
with them (dalle_plugin.http_router), and ``docs/openapi.yaml`` documents them (``make openapi``). The run
payload is ``payload.HubPayload``; what the endpoint answers is ``api_answers`` (loaded only for the
document: each pydantic class costs a cold start to create)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_SESSION_CHARS = 256  # what a payload may name; a longer id cannot exist (nor be a DynamoDB key)
#: tasks per page when the caller names no limit, and the most it may name: one page is also one DynamoDB
#: Query, which stops at 1 MB read, so a page stays far inside Lambda's 6 MB answer whatever the prompts
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: the session routes' models are built on their first request: the API's first is mostly a run's POST
FIRST_USE = ConfigDict(defer_build=True)


class SessionPath(BaseModel):
    """The path of the session routes: an id longer than any session's is refused as no such session."""

    model_config = FIRST_USE
    session: str = Field(min_length=1, max_length=MAX_SESSION_CHARS, description="The hub's session id.")


class SessionQuery(BaseModel):
    model_config = FIRST_USE
    page: str | None = Field(
        default=None, max_length=1024, description="The `next` of the answer before (opaque)."
    )
    limit: int = Field(
        default=DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE, description="Most runs in the page."
    )


class CancelRequest(BaseModel):
    """The optional body of a cancel: one task of the session, or (absent) every task."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, defer_build=True)
    task_id: str | None = Field(default=None, alias="taskId", min_length=1, max_length=256)
