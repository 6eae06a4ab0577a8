"""The shared key's queue as rules, for every interleaving of arrivals, late wake-ups, clock offsets,
claim-to-arrival delays, cancels, crashes and re-delivered steps: never more than ``limit`` requests
arrive in any window, every run that is not cancelled sends (no starvation), FIFO within an organisation
and kind, editor runs first, organisations in turns, and the state stays bounded.

The simulation is an event loop over one in-memory state (a DynamoDB conditional write is atomic, so one
decision at a time is what the item sees). "Window" means the half-open interval ``[t, t + window)``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import pytest
from dalle_plugin.domain.rate_limit import (
    Ask,
    LimiterSettings,
    LimiterState,
    decide,
    leave,
    service_order,
    wake_at_ms,
)
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

MAX_OFFSET_MS = 40  # clocks of the deciding environments are off by up to this
MAX_DELAY_MS = 20  # from the clock reading before a claim to the request's arrival


@dataclass
class SimRun:
    org: str
    interactive: bool
    arrival_ms: int
    offset_ms: int = 0
    lateness_ms: list[int] = field(default_factory=list)  # how late each wake-up is (drawn in turn)
    cancel_at_ms: int | None = None
    crash_after_claim: bool = False  # the first claimed send dies before its request: a retry claims again
    duplicate: bool = False  # the granting step is delivered twice


@dataclass
class Outcome:
    arrivals: dict[int, list[int]]  # run -> when its requests reached OpenAI
    told: dict[int, list[int]]  # run -> every ETA it was told
    refused: set[int]
    cancelled: set[int]
    order: list[int]  # runs in the order their (last) request was sent
    max_state: int
    first_claim: dict[int, int] = field(default_factory=dict)  # run -> when its first send was granted


def simulate(settings: LimiterSettings, runs: list[SimRun], delay_ms: int = 0) -> Outcome:
    state = LimiterState()
    events: list[tuple[int, int, int, str]] = []
    for index, run in enumerate(runs):
        heapq.heappush(events, (run.arrival_ms, 0, index, "ask"))
        if run.cancel_at_ms is not None:
            heapq.heappush(events, (run.cancel_at_ms, 1, index, "cancel"))
    attempt = dict.fromkeys(range(len(runs)), 1)
    wakes = dict.fromkeys(range(len(runs)), 0)
    done: set[int] = set()
    outcome = Outcome(
        {i: [] for i in range(len(runs))}, {i: [] for i in range(len(runs))}, set(), set(), [], 0
    )
    steps = 0
    while events:
        steps += 1
        assert steps < 20_000, "the simulation does not end: someone starves"
        now, _, index, action = heapq.heappop(events)
        run = runs[index]
        if index in done:
            continue
        if action == "cancel":
            state = leave(state, f"run-{index}")
            done.add(index)
            outcome.cancelled.add(index)
            continue
        ticket = f"run-{index}#{attempt[index]}"
        ask = Ask(
            f"run-{index}", ticket, run.arrival_ms, run.org, run.interactive, may_refuse=wakes[index] == 0
        )
        answer = decide(state, ask, now + run.offset_ms, settings)
        state = answer.state
        outcome.max_state = max(outcome.max_state, len(state.sends) + len(state.queue))
        assert len(state.sends) <= settings.limit
        if answer.refused:
            done.add(index)
            outcome.refused.add(index)
            continue
        if answer.granted:
            outcome.first_claim.setdefault(index, now)
            if run.duplicate:
                again = decide(state, ask, now + run.offset_ms + 1, settings)
                assert again.granted and not again.changed  # the same ticket never claims twice
            if run.crash_after_claim:
                run.crash_after_claim = False
                attempt[index] += 1
                heapq.heappush(events, (now + 1, 2, index, "ask"))  # the state machine retries the step
                continue
            outcome.arrivals[index].append(now + delay_ms)
            outcome.order.append(index)
            done.add(index)
            continue
        outcome.told[index].append(answer.start_at_ms - run.offset_ms)
        late = run.lateness_ms[wakes[index] % len(run.lateness_ms)] if run.lateness_ms else 0
        wakes[index] += 1
        # waits long enough for a Wait state wake early by the lead; short ones are waited in place
        wake = answer.start_at_ms - run.offset_ms
        if wake - now > settings.short_wait_ms:
            wake = wake_at_ms(wake, settings) + late
        heapq.heappush(events, (max(now + 1, wake), 2, index, "ask"))
    return outcome


def max_in_any_window(times: list[int], window_ms: int) -> int:
    return max((sum(1 for s in times if t <= s < t + window_ms) for t in times), default=0)


queue_settings = st.builds(
    LimiterSettings,
    limit=st.integers(1, 5),
    window_s=st.integers(200, 3000).map(lambda ms: ms / 1000),
    skew_margin_ms=st.just(2 * MAX_OFFSET_MS + MAX_DELAY_MS),
    max_queue_wait_s=st.just(10_000.0),
    wake_lead_ms=st.sampled_from([0, 300]),
    short_wait_ms=st.sampled_from([0, 500]),
    abandon_after_ms=st.just(600_000),
)


@st.composite
def sim_runs(draw, max_runs: int = 12) -> list[SimRun]:
    count = draw(st.integers(1, max_runs))
    clock = 0
    runs = []
    for _ in range(count):
        # distinct acceptance times: runs accepted in the same millisecond are ordered by whoever asks first
        clock += draw(st.one_of(st.just(1), st.integers(1, 50), st.integers(1, 4000)))
        runs.append(
            SimRun(
                org=draw(st.sampled_from(["org-a", "org-b", "org-c"])),
                interactive=draw(st.booleans()),
                arrival_ms=clock,
                offset_ms=draw(st.integers(-MAX_OFFSET_MS, MAX_OFFSET_MS)),
                lateness_ms=draw(
                    st.lists(st.one_of(st.just(0), st.integers(0, 3000)), min_size=1, max_size=3)
                ),
                cancel_at_ms=draw(st.one_of(st.none(), st.integers(clock, clock + 8000))),
                crash_after_claim=draw(st.booleans()),
                duplicate=draw(st.booleans()),
            )
        )
    return runs


@hypothesis_settings(max_examples=30, deadline=None)
@given(queue_settings, sim_runs(), st.integers(0, MAX_DELAY_MS))
def test_never_more_than_the_limit_arrive_in_any_window_and_no_one_starves(settings, runs, delay):
    outcome = simulate(settings, runs, delay_ms=delay)
    arrivals = sorted(t for times in outcome.arrivals.values() for t in times)
    assert max_in_any_window(arrivals, settings.window_ms) <= settings.limit
    for index in range(len(runs)):  # every run that was not cancelled sent exactly one request
        if index not in outcome.cancelled:
            assert len(outcome.arrivals[index]) == 1, index
    assert outcome.max_state <= settings.limit + len(runs)


@hypothesis_settings(max_examples=30, deadline=None)
@given(queue_settings, sim_runs())
def test_first_come_first_served_within_an_organisation_and_a_kind(settings, runs):
    """Within a line, a run is never sent after a later-accepted one by more than the margin, unless it
    overslept its own turn (and the later one went no earlier than that turn)."""
    outcome = simulate(settings, runs)
    # a run that died after its claim spent that slot (its request may have left): its claim is its turn
    sent_at = outcome.first_claim
    for a in sent_at:
        for b in sent_at:
            same_line = runs[a].org == runs[b].org and runs[a].interactive == runs[b].interactive
            if (
                same_line
                and runs[a].arrival_ms < runs[b].arrival_ms
                and sent_at[a] > sent_at[b] + settings.skew_margin_ms
            ):
                # runs whose turns come together may send in either order within the margin; a later run
                # never takes an earlier one's slot, nor passes it while it is away: it went at the
                # earlier one's turn, which that one then missed by oversleeping
                assert outcome.told[a] and sent_at[b] >= min(outcome.told[a]) - settings.skew_margin_ms, (
                    a,
                    b,
                )
                assert any(runs[a].lateness_ms), (a, b)


@hypothesis_settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_organisations_take_turns(limit, runs_per_org):
    """A backlog of several organisations, all waiting before the first slot frees (editor runs of
    another organisation fill the window first): the workflow runs are sent in rounds, each round one
    per organisation that still waits, FIFO within each."""
    settings = LimiterSettings(
        limit=limit, window_s=1, skew_margin_ms=10, abandon_after_ms=600_000, max_queue_wait_s=10_000
    )
    # slots free one at a time (the editor runs sent 5 ms apart), so no two runs' turns coincide
    fillers = [SimRun(org="filler", interactive=True, arrival_ms=5 * k) for k in range(limit)]
    runs = [
        SimRun(org=f"org-{o}", interactive=False, arrival_ms=30 + o * 10 + k * 100)
        for o, count in enumerate(runs_per_org)
        for k in range(count)
    ]
    outcome = simulate(settings, fillers + runs)
    sent = [fillers_and_runs for fillers_and_runs in outcome.order if fillers_and_runs >= limit]
    expected_orgs = [
        o for turn in range(max(runs_per_org)) for o, count in enumerate(runs_per_org) if turn < count
    ]
    assert [runs[index - limit].org for index in sent] == [f"org-{o}" for o in expected_orgs]
    for o in range(len(runs_per_org)):
        mine = [index for index in sent if runs[index - limit].org == f"org-{o}"]
        assert mine == sorted(mine)


def test_editor_runs_go_before_a_batch_of_another_organisation():
    settings = LimiterSettings(limit=5, window_s=6, skew_margin_ms=100, abandon_after_ms=600_000)
    batch = [SimRun(org="org-a", interactive=False, arrival_ms=k) for k in range(40)]
    editors = [SimRun(org="org-b", interactive=True, arrival_ms=1000 + 3000 * k) for k in range(3)]
    outcome = simulate(settings, batch + editors)
    for offset, editor in enumerate(editors):
        sent = outcome.arrivals[len(batch) + offset][0]
        assert sent - editor.arrival_ms <= settings.spacing_ms


def test_a_run_that_wakes_late_keeps_its_place():
    """The head of the queue oversleeps by 2 s: runs of another organisation behind it use the free slot
    after the margin; it sends as soon as a slot frees once it is there, before anyone accepted after it
    in its own line."""
    settings = LimiterSettings(
        limit=1, window_s=1, skew_margin_ms=50, wake_lead_ms=0, short_wait_ms=0, abandon_after_ms=600_000
    )
    runs = [
        SimRun("org-a", False, 0),
        SimRun("org-a", False, 10, lateness_ms=[2000]),
        SimRun("org-b", False, 20),
        SimRun("org-a", False, 30),
    ]
    outcome = simulate(settings, runs)
    assert outcome.order.index(1) < outcome.order.index(3)
    assert outcome.order.index(2) < outcome.order.index(1)  # org-b did not idle behind the late run
    assert outcome.arrivals[1][0] <= 2010 + settings.spacing_ms


def test_the_eta_of_a_backlog_is_exact_when_everyone_is_on_time():
    settings = LimiterSettings(
        limit=5, window_s=6, skew_margin_ms=100, wake_lead_ms=0, short_wait_ms=0, abandon_after_ms=600_000
    )
    runs = [SimRun("org-a", False, k) for k in range(30)]
    outcome = simulate(settings, runs)
    for index, told in outcome.told.items():
        if told:
            assert told[-1] == outcome.arrivals[index][0]
    assert outcome.arrivals[29][0] == 4 + 5 * settings.spacing_ms  # no slot idles


def test_a_run_whose_turn_is_past_the_cap_is_refused_and_not_queued():
    settings = LimiterSettings(limit=1, window_s=60, skew_margin_ms=1000, max_queue_wait_s=150)
    state = LimiterState()
    for k in range(3):
        state = decide(state, Ask(f"r{k}", f"r{k}#1", k, "org"), k, settings).state
    answer = decide(state, Ask("r3", "r3#1", 3, "org"), 3, settings)
    assert answer.refused and not answer.changed and answer.start_at_ms == 3 * 61_000
    assert answer.position == 2
    # a run already queued is never refused, even when its turn moved past the cap
    assert not decide(state, Ask("r2", "r2#1", 2, "org"), 4, settings).refused


def test_a_cancelled_run_leaves_nothing_behind_and_the_runs_behind_move_up():
    settings = LimiterSettings(limit=1, window_s=60, skew_margin_ms=1000)
    state = LimiterState()
    for k in range(3):
        state = decide(state, Ask(f"r{k}", f"r{k}#1", k, "org"), k, settings).state
    behind = decide(state, Ask("r2", "r2#1", 2, "org"), 10, settings)
    assert behind.position == 1 and behind.start_at_ms == 2 * 61_000
    state = leave(state, "r1")
    moved = decide(state, Ask("r2", "r2#1", 2, "org"), 11, settings)
    assert moved.position == 0 and moved.start_at_ms == 61_000
    assert [w.run_id for w in service_order(moved.state)] == ["r2"]


def test_a_dead_run_is_dropped_after_the_abandon_time():
    settings = LimiterSettings(limit=1, window_s=1, skew_margin_ms=10, abandon_after_ms=5_000)
    state = decide(LimiterState(), Ask("r0", "r0#1", 0, "org"), 0, settings).state
    state = decide(state, Ask("dead", "dead#1", 1, "org"), 1, settings).state
    late = decide(state, Ask("r2", "r2#1", 2, "org"), 20_000, settings)
    assert late.granted and [w.run_id for w in late.state.queue] == []


def test_state_stays_bounded_whatever_the_history():
    settings = LimiterSettings(limit=5, window_s=1, skew_margin_ms=10)
    state = LimiterState()
    for k in range(3000):
        state = decide(state, Ask(f"r{k}", f"r{k}#1", k * 10, "org"), k * 10, settings).state
        state = leave(state, f"r{k}")
    assert len(state.sends) <= 5 and len(state.queue) == 0


@pytest.mark.parametrize(
    ("field", "value"), [("skew_margin_ms", 0), ("limit", 0), ("window_s", 0), ("max_queue_wait_s", 0)]
)
def test_settings_refuse_nonsense(field, value):
    with pytest.raises(ValidationError):
        LimiterSettings(**{field: value})
