"""The small interfaces behind which every outside system sits.

The domain receives these; handlers build the real adapters (``adapters/``) lazily, tests pass fakes or
point the real adapters at the local stack.

The interfaces are ``Protocol`` classes, for the type checker only: the plugin's modules import them under
``TYPE_CHECKING``, so no cold start creates them (each costs about a tenth of a percent of a floor). The
values that cross a port, which the adapters and the domain do create, live in ``port_records`` (and are
named here too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from dalle_plugin.port_records import (
    AllowanceAnswer,
    BatchState,
    HubAsset,
    HubTaskRef,
    RateClaim,
    RateDecision,
    RateJoin,
    StepOpening,
    StoredObject,
)

if TYPE_CHECKING:
    from dalle_plugin.domain.run import RunRecord
    from dalle_plugin.domain.step_io.api import RunTally
    from dalle_plugin.image_generation import GeneratedImage, ImageRequest, PaceDecision


# ---- the hub -------------------------------------------------------------------------------------


class HubClient(Protocol):
    """Ango Hub's REST API as the plugin uses it (``/v2/...``), authenticated as the user who ran it."""

    def get_task(self, task_id: str) -> dict[str, Any]:
        """``GET /v2/task/{id}?includeAnswer=true`` -> ``data.task`` (with ``answer`` in read format)."""

    def get_asset(self, project_id: str, asset_id: str) -> HubAsset: ...

    def list_batch_tasks(self, project_id: str, batches: list[str], at_most: int) -> list[HubTaskRef]:
        """The project's tasks in any of ``batches``, at most ``at_most`` of them."""

    def fetch_text(self, url: str) -> bytes:
        """The raw bytes of a text asset (size-capped, with a timeout); decoding is the domain's job."""

    def upload_file(self, project_id: str, name: str, body: bytes, content_type: str) -> str:
        """``/v2/getUploadUrl`` + PUT; returns the file's permanent URL."""

    def attach_image(self, project_id: str, external_id: str, image_url: str) -> None: ...

    def annotate(self, task_id: str, answer: dict[str, Any]) -> None:
        """Submit the task's answer (write format) and move it to the next workflow stage."""

    def plugin_response(self, session: str, response: Any = None, error: bool = False) -> None: ...

    def plugin_log(self, session: str, message: str, level: str = "INFO", **extra: Any) -> None: ...


# ---- OpenAI (what the requests and answers carry: image_generation.py) ------------------------------


class HubCaller(Protocol):
    """Whom a hub client speaks for: the plugin, the organisation and the user who started the run."""

    @property
    def plugin_id(self) -> str | None: ...
    @property
    def org_id(self) -> str | None: ...
    @property
    def run_by(self) -> str | None: ...


class ImageGenerator(Protocol):
    def generate(self, request: ImageRequest, api_key: str) -> GeneratedImage:
        """Exactly one upstream request. Raises the named errors of ``domain.errors`` (and
        ``UpstreamRateLimited`` with the server's own retry time on a 429 rate limit)."""

    def prepare(self, api_key: str) -> None:
        """Build the client for ``api_key`` now, so that nothing slow stands between a claimed send on
        the shared key and its request."""


# ---- AWS -------------------------------------------------------------------------------------------


class ImageStore(Protocol):
    def put_image(
        self, key: str, body: bytes, content_type: str, metadata: dict[str, str]
    ) -> StoredObject: ...

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

    def running(self, name_prefix: str) -> int:
        """How many executions whose names begin with ``name_prefix`` are running. Step Functions lists
        them eventually consistently: one started a moment ago may not be counted yet."""


class RateLimiter(Protocol):
    def join(self, org_id: str, interactive: bool, count: int, may_refuse: bool = True) -> RateJoin:
        """Give ``count`` runs of one organisation and kind consecutive tickets, in acceptance order."""

    def claim(self, claim: RateClaim) -> RateDecision:
        """Claim the send now, waiting in place for a turn that is at most a short while away; otherwise
        keep the run queued and say when its turn comes."""

    def confirm_send(self, claim: RateClaim, granted: RateDecision) -> int | None:
        """Right before the granted request leaves: its send's recorded time, stamped again at now if the
        grant's was older than the tolerance; None if the send is no longer counted (its slot was reused
        while the step was held up): the request must not leave, the run claims again."""

    def leave(self, org_id: str, interactive: bool, first_ticket: int, count: int = 1) -> None:
        """Take runs out of their line (cancelled or failed): the runs behind them move up."""


class AllowanceLedger(Protocol):
    """Counters that may not pass a limit, shared by every Lambda: a session's spending, an organisation's
    images of the day. Each grant is counted once per ticket, atomically, so concurrent runs cannot
    overshoot and a retried step never counts twice."""

    def reserve(self, counter: str, ticket: str, amount: int, limit: int, expires_at: int) -> AllowanceAnswer:
        """Count ``amount`` for ``ticket`` unless the total would pass ``limit``."""

    def release(self, counter: str, ticket: str, amount: int) -> None:
        """Give a ticket's amount back (its request was not billed); a second release does nothing."""


class KeyPacer(Protocol):
    """Paces the runs of one own OpenAI key to the key's limit, learned from OpenAI's answers
    (``domain.key_pacing``). ``key_id`` is the key's fingerprint, never the key."""

    def claim(self, key_id: str, ticket: str) -> PaceDecision:
        """Claim this send now, waiting in place for a slot at most a short while away."""

    def learn(self, key_id: str, ticket: str, observation: Any) -> None:
        """Take in what OpenAI answered to the send of ``ticket`` (a ``domain.key_pacing.Observation``)."""


class Clock(Protocol):
    def now_ms(self) -> int: ...


class RunStore(Protocol):
    """Run records (the sessions table). Every write is optimistically locked on the record's version, so
    a cancel and a step never overwrite each other; ``mutate`` may raise to refuse a change, and runs again
    on the current record when another writer came first."""

    def create(self, run: RunRecord) -> tuple[RunRecord, bool]:
        """Store the run unless one exists for (session, task); returns (the stored run, created?)."""

    def create_many(self, runs: list[RunRecord]) -> list[tuple[RunRecord, bool]]:
        """``create`` for each run, in order, in a bounded number of calls (a batch of thousands is stored
        in seconds)."""

    def get(self, session: str, task_id: str) -> RunRecord | None: ...

    def get_with_offer(self, session: str, task_id: str, fingerprint: str) -> tuple[RunRecord | None, bool]:
        """The run and, in the same read, whether an undelivered image is on offer for ``fingerprint``
        (``ReusableImages``: the offers live in the same table)."""

    def open_step(self, session: str, task_id: str, opening: StepOpening) -> tuple[RunRecord | None, bool]:
        """Make a step's first write in one call with no read before it: (the record as written, True), or
        (the record as it is, False) when the write's conditions refused it, or (None, False) with no run."""

    def update(self, session: str, task_id: str, mutate: Callable[[RunRecord], None]) -> RunRecord:
        """Read the record, then ``change`` it."""

    def change(self, run: RunRecord, mutate: Callable[[RunRecord], None]) -> RunRecord:
        """Change a record the caller holds (as read or written at its ``version``) without reading it again:
        only what ``mutate`` changed is written."""

    def recent(self, session: str, task_id: str) -> RunRecord | None:
        """The record as this store last read or wrote it, or read when it has not seen it."""

    def list_session(self, session: str) -> list[RunRecord]: ...


class SessionPages(Protocol):
    """A session read in parts, so one answer stays small whatever the session's size."""

    def tallies(self, session: str) -> list[RunTally]:
        """Every run of the session, as little of each as its summary needs."""

    def page(self, session: str, limit: int, after: str | None) -> tuple[list[RunRecord], str | None]:
        """At most ``limit`` runs in task-id order after task ``after`` (one storage read), and the last
        task id read when more may follow (else None)."""


class ReusableImages(Protocol):
    """Images paid for by runs that ended without delivering them, offered to the next run of the same task
    with the same prompt and options (``fingerprint``), so a re-run after a failure does not pay again."""

    def offer(self, fingerprint: str, key: str, expires_at: int, scope: str) -> None:
        """Make the stored image at ``key`` available to the next run with this fingerprint, and mark its task
        (``RunRecord.offer_scope``) as having one, for the API to see when it accepts the task again."""

    def claim(self, fingerprint: str) -> str | None:
        """Take the offered image's key (atomically: one claimer wins), or None when there is none."""


# ---- batches handed to the batch starter ---------------------------------------------------------


class BatchRequests(Protocol):
    """Accepted requests too large for a DynamoDB item or an execution's input (a 10,000-task list is about
    600 KB), kept where the batch starter reads them."""

    def put(self, key: str, body: bytes) -> None: ...

    def get(self, key: str) -> bytes | None: ...


class BatchProgress(Protocol):
    """One record per (session, request): which attempt at storing it runs, and how far it got."""

    def begin(
        self, session: str, digest: str, accepted: int, expires_at: int
    ) -> tuple[BatchState, BatchState | None]:
        """A new attempt when none is under way (the last one stored every task or ended, or there was none):
        (its state, the attempt before it or None). Else the attempt under way, unchanged: (it, it)."""

    def stored(self, session: str, digest: str, attempt: int, stored: int) -> bool:
        """Record that ``stored`` tasks of that attempt are stored (never lowers the count); False when the
        attempt was ended meanwhile (a cancel), so its starter stops."""

    def end(self, session: str, digest: str, attempt: int, ended_by: str, why: str) -> bool:
        """End that attempt while it is under way (a cancel, or its starter failed): True if this did."""

    def of_session(self, session: str) -> list[BatchState]: ...
