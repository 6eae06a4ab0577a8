"""The values that cross a port (``ports``): immutable ``NamedTuple`` records, not frozen dataclasses (a
frozen dataclass compiles six generated methods when its module is imported, and every function creates
these at its cold start), and the system clock. Apart from the ports' ``Protocol`` classes, which only the
type checker needs.
"""

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from dalle_plugin.domain.run import RunStatus, TimelineEntry


class HubAsset(NamedTuple):
    asset_id: str
    external_id: str
    data_url: str


class HubTaskRef(NamedTuple):
    """A task as the hub lists it: its id, and its asset's when the listing names it."""

    task_id: str
    asset_id: str | None = None


class StoredObject(NamedTuple):
    bucket: str
    key: str


class RateClaim(NamedTuple):
    """A run claiming its send on the shared key now.

    ``ticket`` is its place in its line (organisation and kind), taken once when the hub's request was
    accepted; ``send`` names this one send (a new one per attempt: claiming again with it never claims a
    second send). ``view`` is the queue as the run last saw it (opaque, ``""`` for none): a claim made from
    it needs no read.
    """

    org_id: str
    interactive: bool
    ticket: int
    send: str
    view: str = ""


class RateDecision(NamedTuple):
    """What the queue answers: ``granted`` (the request may leave now, and its send is recorded), or the
    run's place: ``position`` runs send before it, its turn comes at ``start_at_ms`` (epoch ms, as exact
    as the runs ahead are on time). ``ticket`` is the run's ticket from now on (a new one if it had been
    skipped and joined again), ``view`` the queue as this answer saw it, ``calls`` the DynamoDB calls it
    took. Granted, ``start_at_ms`` is the send's recorded time and ``slot`` where it is recorded."""

    granted: bool
    start_at_ms: int
    position: int = 0
    ticket: int = 0
    view: str = ""
    calls: int = 1
    slot: int = -1


class RateJoin(NamedTuple):
    """Runs joining their line at acceptance: the first ``admitted`` got tickets ``first_ticket``,
    ``first_ticket + 1``, ...; the others would have waited past the cap and were not queued.
    ``starts_at_ms`` and ``positions`` are given for every run asked for."""

    first_ticket: int
    admitted: int
    starts_at_ms: tuple[int, ...]
    positions: tuple[int, ...]
    view: str = ""
    calls: int = 1


class AllowanceAnswer(NamedTuple):
    """``granted``: the amount is now counted for the ticket (or already was). ``used`` is the counter's
    total after the grant, or, refused, as it stood (what the refusal reports)."""

    granted: bool
    used: int


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class StepOpening(NamedTuple):
    """A step's first write, made without reading the run first: it is the read (the record comes back as
    written). It holds only while ``caller`` owns the run (or no one does) and the run is in none of the
    ``refused`` statuses, has none of the fields in ``absent`` and each field of ``equal`` at its value; it
    sets ``status`` (when given) and the fields in ``sets`` (by field name, as the record holds them),
    appends ``entries`` to the timeline and stamps ``updated_at_ms``."""

    caller: str | None
    refused: "tuple[RunStatus, ...]"
    updated_at_ms: int
    status: "RunStatus | None" = None
    entries: "tuple[TimelineEntry, ...]" = ()
    sets: Mapping[str, Any] = MappingProxyType({})
    absent: tuple[str, ...] = ()
    equal: Mapping[str, Any] = MappingProxyType({})


class BatchState(NamedTuple):
    """How far the batch starter got with one request of a session."""

    digest: str
    attempt: int
    accepted: int  # tasks the request named
    stored: int  # of them, stored (their executions started)
    ended_by: str | None = None  # "failed" or "cancelled": the attempt stopped before storing every task
    ended_why: str | None = None  # what happened, in a sentence for the person who ran the batch

    @property
    def under_way(self) -> bool:
        return self.stored < self.accepted and self.ended_by is None
