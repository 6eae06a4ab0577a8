"""The operator's daily image quota per organisation on the shared key, end to end on a stack deployed with
``OrgDailyImageQuota=1`` (and the default ``OrgQuotaReached=wait``): the organisation's first run of the
day generates, the next one is not sent and waits for the next UTC day, and its session says so and when.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tests.conftest import PLUGIN_SECRET, start_stack, wait_for

pytestmark = [pytest.mark.stack, pytest.mark.own_stack]


@pytest.fixture(scope="module")
def quota_stack():
    with start_stack("dalle-quota", parameters={"OrgDailyImageQuota": "1"}) as running:
        running.hub.load_samples()
        yield running


def test_an_organisation_over_its_daily_quota_waits_for_the_next_day_and_is_told_when(quota_stack):
    from local_stack.hub_emulator import load_sample_runs
    from local_stack.runner import PluginApi

    api = PluginApi(quota_stack.api_url, PLUGIN_SECRET)
    template = next(
        s.payload
        for s in load_sample_runs(quota_stack.hub.base_url)
        if s.payload["taskId"] == "task-lighthouse"
    )
    config = json.dumps(
        {"openai_api_key": "default", "model_name": "gpt-image-2", "get_prompt_from": "text-annotation"}
    )
    first = template | {
        "session": "quota-first",
        "orgId": "org-quota",
        "configJSON": config,
        "workflow": True,
    }
    assert api.run(first).status_code == 202
    assert api.wait_finished("quota-first", timeout_s=300)["runs"][0]["status"] == "SUCCEEDED"

    second = first | {"session": "quota-second"}
    assert api.run(second).status_code == 202

    def waiting_for_tomorrow():
        view = api.session("quota-second")
        run = view and view["runs"][0]
        detail = run and run["timeline"][-1].get("detail", "")
        return (
            run if run and run["status"] == "WAITING_FOR_SLOT" and "starts by itself at" in detail else None
        )

    run = wait_for(waiting_for_tomorrow, "the second run waits for the next UTC day", poll_s=0.5)
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%d 00:00 UTC")
    detail = run["timeline"][-1]["detail"]
    assert "daily quota on the shared OpenAI key (1 images a day) is used up" in detail
    assert tomorrow in detail or dt.datetime.now(dt.UTC).hour == 23  # at midnight's edge, either day
    # the organisation's quota was spent once: the waiting run sent nothing to OpenAI
    assert sum(1 for r in quota_stack.openai.requests if r.is_generation) == 1

    # a person can still stop it; the hub hears it
    answer = api._session.post(f"{api.base_url}/sessions/quota-second/cancel", json={}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert api.session("quota-second")["runs"][0]["status"] == "CANCELLED"
