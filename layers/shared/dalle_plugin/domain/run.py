"""A run: one hub task sent to the plugin once. Its record is the session's state; its step contracts are
what travels through the state machine (ids only: never a secret, never the image)."""

# No ``from __future__ import annotations`` here: pydantic reads these models' annotations as objects
# instead of evaluating each as a string when it builds them, on every function's first event.

import hashlib
import json
import re
from enum import StrEnum
from itertools import pairwise
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def camel_alias(name: str) -> str:
    """``attach_sent_at_ms`` -> ``attachSentAtMs``: what pydantic's ``to_camel`` makes of these fields' names
    (tests/unit/test_run_aliases.py holds them equal), with string methods instead of its four regular
    expressions per name (about 0.4% of a floor over the run's models at each cold start)."""
    titled = name.title().replace("_", "")  # as to_camel: a letter after a digit is capitalised too
    return titled[:1].lower() + titled[1:]


class CamelModel(BaseModel):
    """Step contracts are camelCase on the wire, like everything else in Step Functions and the hub."""

    # A list field defaults to ``[]``, not ``Field(default_factory=list)``: pydantic copies an unhashable
    # default for each instance, and a factory that is a builtin makes it read the factory's signature from
    # its text (the tokenizer's regex compiled at each cold start, about 5 ms of a floor of about 110).
    model_config = ConfigDict(alias_generator=camel_alias, populate_by_name=True, extra="ignore")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)


class RunStatus(StrEnum):
    QUEUED = "QUEUED"
    EXTRACTING = "EXTRACTING"
    WAITING_FOR_SLOT = "WAITING_FOR_SLOT"
    GENERATING = "GENERATING"
    ATTACHING = "ATTACHING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)


class RunRef(CamelModel):
    """The execution input: which run. Everything else is read from the run record."""

    session: str = Field(min_length=1, max_length=256)
    task_id: str = Field(min_length=1, max_length=256)
    #: the calling execution's id (``$$.Execution.Id``); None outside the state machine (tests, tools)
    execution: str | None = Field(default=None, max_length=2048)

    @property
    def caller(self) -> str | None:
        """The calling execution's name: an execution's id (its ARN) ends with ``:<name>``."""
        return self.execution.rsplit(":", 1)[-1] if self.execution else None

    @property
    def execution_name(self) -> str:
        """The run's stable id (session + task): names its image in S3 and its rate-limit tickets.
        Readable prefix + hash, within Step Functions' 80-character name limit."""
        digest = hashlib.sha256(f"{self.session}\x00{self.task_id}".encode()).hexdigest()[:24]
        readable = re.sub(r"[^A-Za-z0-9_-]", "-", f"{self.session[:24]}_{self.task_id[:24]}")
        return f"{readable}_{digest}"

    @property
    def run_id(self) -> str:
        return self.execution_name


class PromptInfo(CamelModel):
    text: str
    source: str
    length: int
    original_length: int
    truncated: bool = False
    notes: list[str] = []
    #: the Config JSON's prompt_template, when the extracted text was put into one
    template: str | None = None
    #: the extracted text's length before the template was applied
    extracted_length: int | None = None


class ModelInfo(CamelModel):
    requested: str
    actual: str
    substituted: bool = False
    note: str | None = None


class ImageInfo(CamelModel):
    key: str
    sha256: str
    bytes: int
    model: str
    size: str
    quality: str | None = None
    request_id: str | None = None
    hub_url: str | None = None
    attached: bool = False
    #: when POST /v2/attachments was sent; set and not ``attached``: the hub may or may not have it
    attach_sent_at_ms: int | None = None
    #: the image was paid for by an earlier run of the same task that never delivered it
    reused: bool = False
    #: png, jpeg or webp: names the attached file and its content type
    format: str = "png"
    #: its place among the images of one request (0 for the first)
    index: int = 0
    #: what it was generated from (task, prompt, model, options): a re-run whose prompt changed makes anew
    fingerprint: str | None = None


class RateWait(CamelModel):
    ticket: str
    start_at_ms: int
    reserved: bool
    position: int = 0


class HeldAllowance(CamelModel):
    """A grant counted for this run's next request (session spending, the organisation's daily images):
    given back if the request is not billed, kept once the images are paid for."""

    counter: str
    ticket: str
    amount: int


class Failure(CamelModel):
    reason: str
    message: str
    error: str | None = None


class TimelineEntry(CamelModel):
    step: str
    status: str
    at_ms: int
    duration_ms: int | None = None
    detail: str | None = None


# ---- between states ----------------------------------------------------------------------------------
# Each function's own step contracts live in domain/step_io/, one module per function: a pydantic class
# costs a cold start about half a percent of its floor to create even when its build is deferred, so no
# function creates another's. The session view's ``RunTally`` lives with the API's sessions, and what
# Extract hands Generate (``ExtractedPrompt``) in step_io/extracted.py.

#: the config of a model only one function uses: built on its first use
ONE_FUNCTION_ONLY = ConfigDict(defer_build=True)


class RunRecord(CamelModel):
    """The run's state, one DynamoDB item per (session, task). Secrets are only ever held sealed (KMS
    ciphertext bound to this run by encryption context) and are removed when the run ends."""

    session: str
    task_id: str
    execution_name: str
    project_id: str
    asset_id: str | None = None
    data_url: str | None = None
    workflow: bool = False
    org_id: str | None = None
    run_by: str | None = None
    plugin_id: str | None = None
    prompt_class_ids: list[str] = []
    prompt_source: str
    model: ModelInfo
    size: str
    quality: str | None = None
    max_prompt_chars: int
    uses_default_key: bool
    #: what was adapted from the Config JSON (a retired model's successor, a legacy size), said to the user
    notes: list[str] = []
    prompt_template: str | None = None
    images_per_task: int = 1
    output_format: str = "png"
    output_compression: int | None = None
    background: str | None = None
    #: the session's spending limit (USD), and the estimated price of one image as asked
    max_cost_usd: float | None = None
    cost_per_image_usd: float | None = None
    held: list[HeldAllowance] = []
    sealed_secrets: bytes | None = None
    status: RunStatus = RunStatus.QUEUED
    created_at_ms: int
    updated_at_ms: int
    #: when the hub's request that (re)started this run was accepted: its place in the shared key's queue
    accepted_at_ms: int | None = None
    execution_arn: str | None = None
    #: the name of the one execution that may work on this generation of the run (None: not yet claimed,
    #: or a record from before ownership existed). Set once per generation, by a conditional write.
    owner: str | None = None
    #: the task ids of the owner's execution (its input), written with ``owner``: whichever request starts
    #: the owner starts it with all of them, even one that names only some (docs/batches.md)
    chunk: list[str] = []
    #: how many times the hub re-ran this task in this session after it failed or was cancelled
    generation: int = 0
    attempt: int = 0
    prompt: PromptInfo | None = None
    rate_wait: RateWait | None = None
    #: its place in the shared key's queue, taken when the hub's request was accepted (None: not joined)
    rate_ticket: int | None = None
    #: the queue as the run last saw it (a claim from it needs no read)
    rate_view: str = ""
    #: refused at acceptance: the wait (ms) it would have had past the queue cap
    rate_refused_ms: int | None = None
    #: stored by the API in the same transaction that found no image of its task on offer (no offer marker,
    #: ``offer_scope``): Generate's first try need not look for one. Cleared when the run is requeued.
    no_offer_at_accept: bool = False
    #: the first image (the only one unless images_per_task > 1)
    image: ImageInfo | None = None
    #: the further images of the same request, in order
    more_images: list[ImageInfo] = []
    failure: Failure | None = None
    timeline: list[TimelineEntry] = []
    expires_at: int | None = None
    #: when the run's result was sent to the hub (a workflow task's submission); cleared if surely not taken
    finish_sent_at_ms: int | None = None
    #: 429 rate_limit_exceeded answers from OpenAI in a row, in this generation
    upstream_rate_limited: int = 0
    #: the store's optimistic-lock counter: a change is written only onto the version it was made from
    version: int = 0

    def fill_durations(self) -> None:
        """An entry lasts until the next one begins: its duration is derived, not written (a step appends
        its entry without rewriting the one before)."""
        for entry, following in pairwise(self.timeline):
            if entry.duration_ms is None:
                entry.duration_ms = max(0, following.at_ms - entry.at_ms)

    @property
    def images(self) -> list[ImageInfo]:
        return ([self.image] if self.image else []) + self.more_images

    def image_at(self, index: int) -> ImageInfo:
        return self.images[index]

    @property
    def ref(self) -> RunRef:
        return RunRef(session=self.session, task_id=self.task_id)

    @property
    def offer_scope(self) -> str:
        """The task an offered image belongs to (its fingerprint less prompt and options): known at
        acceptance, before the prompt is read, so the API can ask whether any image of it is on offer."""
        basis = json.dumps([self.project_id, self.task_id, self.asset_id])
        return hashlib.sha256(basis.encode()).hexdigest()

    @property
    def encryption_context(self) -> dict[str, str]:
        """The sealed secrets belong to the session (one KMS call seals them for every task of a batch)."""
        return {"session": self.session}
