"""Spending limits as rules: a session's max_cost_usd and an organisation's daily images on the shared key."""

from __future__ import annotations

import datetime as dt

import pytest
from dalle_plugin.domain.errors import OrgQuotaReached, SpendingLimitReached
from dalle_plugin.domain.run import HeldAllowance, ModelInfo, RunRecord
from dalle_plugin.domain.spending import (
    OrgQuota,
    QuotaWait,
    next_utc_midnight_ms,
    org_day_counter,
    release,
    spend_counter,
    take_allowances,
)
from dalle_plugin.ports import AllowanceAnswer

NOW = int(dt.datetime(2026, 11, 20, 15, 30, tzinfo=dt.UTC).timestamp() * 1000)


class MemoryLedger:
    """The ledger's contract in memory (the DynamoDB adapter is raced for real in tests/integration)."""

    def __init__(self):
        self.used: dict[str, int] = {}
        self.tickets: dict[str, set[str]] = {}

    def reserve(self, counter, ticket, amount, limit, expires_at):
        tickets = self.tickets.setdefault(counter, set())
        used = self.used.get(counter, 0)
        if ticket in tickets:
            return AllowanceAnswer(granted=True, used=used)
        if used + amount > limit:
            return AllowanceAnswer(granted=False, used=used)
        tickets.add(ticket)
        self.used[counter] = used + amount
        return AllowanceAnswer(granted=True, used=used + amount)

    def release(self, counter, ticket, amount):
        if ticket in self.tickets.get(counter, set()):
            self.tickets[counter].discard(ticket)
            self.used[counter] -= amount


def _run(task: str = "t1", **fields) -> RunRecord:
    base = {
        "session": "s1",
        "task_id": task,
        "execution_name": f"s1_{task}",
        "project_id": "p",
        "prompt_source": "text-annotation",
        "model": ModelInfo(requested="gpt-image-2", actual="gpt-image-2"),
        "size": "1024x1024",
        "quality": "medium",
        "max_prompt_chars": 32000,
        "uses_default_key": True,
        "created_at_ms": NOW,
        "updated_at_ms": NOW,
        "org_id": "org-1",
        "cost_per_image_usd": 0.042,
    }
    return RunRecord(**(base | fields))


def test_no_limit_asks_for_nothing():
    ledger = MemoryLedger()
    assert take_allowances(_run(), ledger, None, NOW) == [] and ledger.used == {}


def test_the_session_limit_counts_every_image_of_a_request_and_refuses_the_run_that_would_pass_it():
    ledger = MemoryLedger()
    first = take_allowances(_run("t1", max_cost_usd=0.2, images_per_task=2), ledger, None, NOW)
    assert first == [HeldAllowance(counter=spend_counter("s1"), ticket="s1_t1#g0", amount=84_000)]
    take_allowances(_run("t2", max_cost_usd=0.2, images_per_task=2), ledger, None, NOW)
    with pytest.raises(SpendingLimitReached) as refused:
        take_allowances(_run("t3", max_cost_usd=0.2, images_per_task=2), ledger, None, NOW)
    message = refused.value.message
    assert "spending limit (max_cost_usd) is $0.2" in message and "about $0.168" in message
    assert "2 images would cost about $0.084 more" in message and "not requested" in message
    assert ledger.used[spend_counter("s1")] == 168_000


def test_a_retried_step_is_not_counted_twice():
    ledger = MemoryLedger()
    run = _run(max_cost_usd=0.1)
    granted = take_allowances(run, ledger, None, NOW)
    assert take_allowances(run, ledger, None, NOW) == granted  # the record was not updated: the ledger knows
    held = run.model_copy(update={"held": granted})
    assert take_allowances(held, ledger, None, NOW) == []  # the record holds it: nothing asked
    assert ledger.used[spend_counter("s1")] == 42_000


def test_a_released_grant_frees_its_room_and_a_second_release_does_nothing():
    ledger = MemoryLedger()
    granted = take_allowances(_run(max_cost_usd=0.05), ledger, None, NOW)
    release(granted, ledger)
    release(granted, ledger)
    assert ledger.used[spend_counter("s1")] == 0
    assert take_allowances(_run("t2", max_cost_usd=0.05), ledger, None, NOW)


def test_the_org_quota_counts_images_per_utc_day_and_waits_for_the_next_day():
    ledger = MemoryLedger()
    quota = OrgQuota(images_per_day=3, when_reached="wait")
    assert take_allowances(_run("t1", images_per_task=2), ledger, quota, NOW)[0].amount == 2
    waiting = take_allowances(_run("t2", images_per_task=2), ledger, quota, NOW)
    assert isinstance(waiting, QuotaWait)
    assert (
        waiting.until_ms
        == next_utc_midnight_ms(NOW)
        == int(dt.datetime(2026, 11, 21, tzinfo=dt.UTC).timestamp() * 1000)
    )
    assert "3 images a day" in waiting.message and "2026-11-21 00:00 UTC" in waiting.message
    assert "waits" in waiting.message
    # the next day has its own counter
    tomorrow = take_allowances(_run("t2", images_per_task=2), ledger, quota, waiting.until_ms)
    assert tomorrow[0].counter == org_day_counter("org-1", dt.date(2026, 11, 21))


def test_the_org_quota_can_end_the_run_instead_and_says_when_to_try_again():
    ledger = MemoryLedger()
    quota = OrgQuota(images_per_day=1, when_reached="fail")
    take_allowances(_run("t1"), ledger, quota, NOW)
    with pytest.raises(OrgQuotaReached) as refused:
        take_allowances(_run("t2"), ledger, quota, NOW)
    assert (
        "used up for 2026-11-20" in refused.value.message
        and "after 2026-11-21 00:00 UTC" in refused.value.message
    )


def test_organisations_are_counted_apart_and_own_keys_are_not_counted():
    ledger = MemoryLedger()
    quota = OrgQuota(images_per_day=1)
    take_allowances(_run("t1", org_id="org-a"), ledger, quota, NOW)
    assert take_allowances(_run("t2", org_id="org-b"), ledger, quota, NOW)
    assert take_allowances(_run("t3", org_id="org-a", uses_default_key=False), ledger, quota, NOW) == []


def test_a_task_larger_than_the_whole_quota_fails_even_when_runs_wait():
    with pytest.raises(OrgQuotaReached, match="more than the organisation's daily quota"):
        take_allowances(_run(images_per_task=4), MemoryLedger(), OrgQuota(images_per_day=3), NOW)


def test_a_spending_refusal_gives_back_the_quota_it_took():
    ledger = MemoryLedger()
    ledger.used[spend_counter("s1")] = 90_000
    ledger.tickets[spend_counter("s1")] = {"other"}
    with pytest.raises(SpendingLimitReached):
        take_allowances(_run(max_cost_usd=0.1), ledger, OrgQuota(images_per_day=5), NOW)
    assert ledger.used[org_day_counter("org-1", dt.date(2026, 11, 20))] == 0
