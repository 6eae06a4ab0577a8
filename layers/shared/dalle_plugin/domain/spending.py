"""Spending limits: a session's ``max_cost_usd`` and, on the shared key, an organisation's daily images.

Both are counted before the request is sent, in an ``AllowanceLedger`` (one conditional write per grant),
so concurrent runs cannot overshoot: a run takes its grant, or is told how much is used. The grant is
held on the run record until the request is billed (kept) or surely not (given back). A request whose
outcome is unknown (a timeout) keeps its grant: a limit may be under-used, never passed.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import TYPE_CHECKING, Literal, NamedTuple

from dalle_plugin.domain.errors import OrgQuotaReached, SpendingLimitReached
from dalle_plugin.domain.run import HeldAllowance, RunRecord

if TYPE_CHECKING:
    from dalle_plugin.ports import AllowanceLedger

MICROS_PER_USD = 1_000_000
DAY_MS = 86_400_000
QuotaMode = Literal["wait", "fail"]


class OrgQuota(NamedTuple):
    """The deployment's daily image quota per organisation on the shared key (``OrgDailyImageQuota``)."""

    images_per_day: int
    when_reached: QuotaMode = "wait"


def spend_counter(session: str) -> str:
    return f"SPEND#SESSION#{session}"


def org_day_counter(org_id: str | None, day: dt.date) -> str:
    return f"QUOTA#ORG#{org_id or '-'}#{day.isoformat()}"


def utc_day(now_ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(now_ms / 1000, tz=dt.UTC).date()


def next_utc_midnight_ms(now_ms: int) -> int:
    return (now_ms // DAY_MS + 1) * DAY_MS


def request_ticket(run: RunRecord) -> str:
    """One grant per run and generation: every attempt at the same request shares it."""
    return f"{run.execution_name}#g{run.generation}"


def usd(micros: int) -> str:
    return f"${micros / MICROS_PER_USD:.4f}".rstrip("0").rstrip(".") if micros else "$0"


def request_cost_micros(run: RunRecord) -> int:
    return math.ceil((run.cost_per_image_usd or 0.0) * run.images_per_task * MICROS_PER_USD)


class QuotaWait(NamedTuple):
    """The organisation's quota is used up for today and runs wait: until ``until_ms``."""

    until_ms: int
    message: str


def take_allowances(
    run: RunRecord, ledger: AllowanceLedger, quota: OrgQuota | None, now_ms: int
) -> list[HeldAllowance] | QuotaWait:
    """The grants this run's next request needs (those it already holds are not asked again).

    Returns what was newly granted (to record on the run), or the wait when the organisation's quota is
    used up and the deployment waits. Raises ``SpendingLimitReached`` / ``OrgQuotaReached``; on a refusal
    nothing stays granted.
    """
    held = {h.counter for h in run.held}
    ticket = request_ticket(run)
    granted: list[HeldAllowance] = []
    # A quota-held grant may date from an earlier day (the run waited): it still stands for this request.
    has_quota_grant = any(counter.startswith("QUOTA#") for counter in held)
    if quota is not None and quota.images_per_day > 0 and run.uses_default_key and not has_quota_grant:
        outcome = _take_org_images(run, ledger, quota, ticket, now_ms)
        if isinstance(outcome, QuotaWait):
            return outcome
        granted.append(outcome)
    counter = spend_counter(run.session)
    if run.max_cost_usd is not None and counter not in held:
        amount = request_cost_micros(run)
        limit = math.floor(run.max_cost_usd * MICROS_PER_USD)
        answer = ledger.reserve(
            counter, ticket, amount, limit, run.expires_at or now_ms // 1000 + 30 * 86_400
        )
        if not answer.granted:
            release(granted, ledger)
            raise SpendingLimitReached(
                f"This session's spending limit (max_cost_usd) is {usd(limit)}; its runs have already spent "
                f"or reserved about {usd(answer.used)}, and this task's {_images(run)} would cost about "
                f"{usd(amount)} more, so {'they were' if run.images_per_task > 1 else 'it was'} not requested. "
                "Raise max_cost_usd and run the plugin again to generate it."
            )
        granted.append(HeldAllowance(counter=counter, ticket=ticket, amount=amount))
    return granted


def _take_org_images(
    run: RunRecord, ledger: AllowanceLedger, quota: OrgQuota, ticket: str, now_ms: int
) -> HeldAllowance | QuotaWait:
    day = utc_day(now_ms)
    counter = org_day_counter(run.org_id, day)
    amount = run.images_per_task
    midnight_ms = next_utc_midnight_ms(now_ms)
    tomorrow = dt.datetime.fromtimestamp(midnight_ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if amount > quota.images_per_day:
        raise OrgQuotaReached(
            f"This task asks for {_images(run)}, more than the organisation's daily quota of "
            f"{quota.images_per_day} on the shared OpenAI key. Lower images_per_task, or use your own OpenAI key."
        )
    answer = ledger.reserve(counter, ticket, amount, quota.images_per_day, midnight_ms // 1000 + 2 * 86_400)
    if answer.granted:
        return HeldAllowance(counter=counter, ticket=ticket, amount=amount)
    used = (
        f"The organisation's daily quota on the shared OpenAI key ({quota.images_per_day} images a day) is "
        f"used up for {day.isoformat()} ({answer.used} generated or reserved)."
    )
    if quota.when_reached == "fail":
        raise OrgQuotaReached(
            f"{used} This deployment ends such runs: run the plugin again after {tomorrow}, "
            "or use your own OpenAI key."
        )
    return QuotaWait(
        until_ms=midnight_ms, message=f"{used} This run waits and starts by itself at {tomorrow}."
    )


def release(held: list[HeldAllowance], ledger: AllowanceLedger) -> None:
    for grant in held:
        ledger.release(grant.counter, grant.ticket, grant.amount)


def _images(run: RunRecord) -> str:
    return "1 image" if run.images_per_task == 1 else f"{run.images_per_task} images"
