"""The shared key's queue as rules, for every interleaving of acceptances, late wake-ups, clock offsets,
claim-to-arrival delays, cancels, crashes and re-delivered steps: never more than ``limit`` requests
arrive in any window, every run that is not cancelled sends (no starvation), FIFO within an organisation
and kind, editor runs first, organisations in turns, and the state stays bounded.

The simulation is an event loop over one in-memory state (a DynamoDB conditional write is atomic, so one
decision at a time is what the item sees). "Window" means the half-open interval ``[t, t + window)``.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from dalle_plugin.domain.rate_limit import (
    LimiterSettings,
    LimiterState,
    claim,
    join,
    leave,
    line_of,
    planned_starts,
    restamp,
    runs_ahead,
    service_order,
    state_at_turn,
    wake_at_ms,
)
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

MAX_OFFSET_MS = 40  # clocks of the deciding environments are off by up to this
MAX_DELAY_MS = 20  # from the clock reading before a claim to the request's arrival

# CI: the same examples on every run (derandomized), a few seconds a test. HYPOTHESIS_PROFILE=fuzz: fresh
# random examples, fifty times as many, for exploring locally (``--hypothesis-seed=N`` replays a seed).
FUZZING = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"


def rules_checked(examples: int) -> hypothesis_settings:
    """Hypothesis settings for a property test worth ``examples`` examples in CI."""
    return hypothesis_settings(
        max_examples=examples * (50 if FUZZING else 1),
        derandomize=not FUZZING,
        database=None,
        # a backstop far above an example's cost (milliseconds; the step bound is the real one), so a
        # loaded machine does not fail it
        deadline=timedelta(seconds=10),
        suppress_health_check=[HealthCheck.too_slow],
        # shrinking a failure can take minutes: CI reports the example as found, fuzzing shrinks it
        phases=tuple(Phase) if FUZZING else (Phase.explicit, Phase.reuse, Phase.generate),
        print_blob=True,
    )


@dataclass
class SimRun:
    org: str
    interactive: bool
    accepted_ms: int
    generate_after_ms: int = 0  # Extract and a cold start between acceptance and the first claim
    offset_ms: int = 0
    lateness_ms: list[int] = field(default_factory=list)  # how late each wake-up is (drawn in turn)
    cancel_at_ms: int | None = None
    crash_after_claim: bool = False  # the first claimed send dies before its request: a retry claims again
    duplicate: bool = False  # the granting claim is delivered twice
    held_up_ms: list[int] = field(default_factory=list)  # between its first grants and their sends

    @property
    def line(self) -> str:
        return line_of(self.org, self.interactive)


@dataclass
class Outcome:
    arrivals: dict[int, list[int]]  # run -> when its requests reached OpenAI
    told: dict[int, list[int]]  # run -> every start it was told (true time)
    refused: set[int]
    cancelled: set[int]
    rejoined: set[int]  # told their ticket is gone and joined again at the back (never, by the rules)
    order: list[int]  # runs in the order their sends were granted
    max_lines: int
    max_ranges: int
    granted_while_editor_waited: int = 0
    lost_grants: int = 0  # sends held up until their slot was reused: not sent, queued again
    steps: int = 0  # events handled
    # granted once, but the send never left (a crash after the claim, a slot lost while held up): run ->
    # how many grants had been given when its retry claimed again (its ticket back at the head of its line)
    returned_at: dict[int, int] = field(default_factory=dict)
    # a grant that went before runs ahead of it in the order: (the run granted, the run passed, how long
    # the passed one had been due by its plan at that moment, the granted run's clock)
    passed: list[tuple[int, int, int]] = field(default_factory=list)


def simulate(settings: LimiterSettings, runs: list[SimRun], delay_ms: int = 0) -> Outcome:
    state = LimiterState()
    events: list[tuple[int, int, int, str]] = []
    for index, run in enumerate(runs):
        heapq.heappush(events, (run.accepted_ms, 0, index, "accept"))
        if run.cancel_at_ms is not None:
            heapq.heappush(events, (run.cancel_at_ms, 1, index, "cancel"))
    tickets: dict[int, int] = {}
    attempt = dict.fromkeys(range(len(runs)), 1)
    wakes = dict.fromkeys(range(len(runs)), 0)
    grants = dict.fromkeys(range(len(runs)), 0)
    pending: dict[int, tuple[str, int, int]] = {}  # run -> its granted send, slot and recorded time
    asked: dict[int, int] = {}  # run -> when its step began to claim (its clock): it waits in place since
    done: set[int] = set()
    out = Outcome(
        {i: [] for i in range(len(runs))}, {i: [] for i in range(len(runs))}, set(), set(), set(), [], 0, 0
    )
    steps = 0
    # generous (runs polling behind every overdue run ahead take a few dozen steps each), yet bounded in
    # time: a livelock fails in well under a second instead of running for minutes
    max_steps = 50 * len(runs) ** 2 + 200
    while events:
        steps += 1
        assert steps <= max_steps, "the simulation does not end: someone starves"
        now, _, index, action = heapq.heappop(events)
        run = runs[index]
        if index in done:
            continue
        local = now + run.offset_ms
        if action == "accept":
            joined = join(state, run.line, 1, local, settings)
            state = joined.state
            if not joined.admitted:
                done.add(index)
                out.refused.add(index)
                continue
            tickets[index] = joined.first_ticket
            heapq.heappush(events, (now + run.generate_after_ms, 2, index, "claim"))
            continue
        if action == "cancel":
            state = leave(state, run.line, tickets[index], 1, local)
            done.add(index)
            out.cancelled.add(index)
            continue
        if action == "send":  # the last look at the clock before the request leaves
            send, slot, stamped = pending.pop(index)
            if local - stamped > settings.send_tolerance:
                restamped = restamp(state, slot, send, local)
                if restamped is None:  # its slot went to a later send: it must not leave, it claims again
                    out.lost_grants += 1
                    attempt[index] += 1
                    heapq.heappush(events, (now + 1, 2, index, "claim"))
                    continue
                state = restamped
            out.arrivals[index].append(now + delay_ms)
            done.add(index)
            continue
        send = f"run-{index}#{attempt[index]}"
        if index in out.order and index not in out.returned_at:
            out.returned_at[index] = len(out.order)  # its retry after a grant that never sent
        before = state
        asked.setdefault(index, local)
        answer = claim(state, run.line, tickets[index], send, local, settings, asked[index])
        state = answer.state
        lines = dict(state.lines)
        out.max_lines = max(out.max_lines, len(lines))
        out.max_ranges = max(out.max_ranges, sum(len(line.skipped) for line in lines.values()))
        if answer.gone:  # its ticket unknown to its line: it would join again at the back (a demotion)
            joined = join(state, run.line, 1, local, settings, may_refuse=False)
            state, tickets[index] = joined.state, joined.first_ticket
            out.rejoined.add(index)
            heapq.heappush(events, (now + 1, 2, index, "claim"))
            continue
        if answer.granted and answer.changed:
            _note_passed(before, settings, run.line, tickets[index], local, tickets, runs, out)
        if answer.granted:
            asked.pop(index)  # a claim again (a retry, a slot lost while held up) is a step of its own
            if not run.interactive and any(name.startswith("e:") for name in lines):
                out.granted_while_editor_waited += 1
            if run.duplicate:
                again = claim(state, run.line, tickets[index], send, local + 1, settings)
                assert again.granted and not again.changed  # the same send never claims twice
            out.order.append(index)
            if run.crash_after_claim:
                run.crash_after_claim = False
                attempt[index] += 1
                heapq.heappush(events, (now + 1, 2, index, "claim"))  # the state machine retries the step
                continue
            # hold-ups are transient: its first grants are held up as drawn, the later ones leave at once
            held_up = run.held_up_ms[grants[index]] if grants[index] < len(run.held_up_ms) else 0
            grants[index] += 1
            pending[index] = (send, answer.slot, answer.start_at_ms)
            heapq.heappush(events, (now + held_up, 3, index, "send"))
            continue
        out.told[index].append(answer.start_at_ms - run.offset_ms)
        wake = answer.start_at_ms - run.offset_ms
        if wake - now > settings.short_wait_ms:  # a Wait state: woken early by the lead, then late
            late = run.lateness_ms[wakes[index] % len(run.lateness_ms)] if run.lateness_ms else 0
            wakes[index] += 1
            wake = wake_at_ms(wake, settings) + late
            asked.pop(index)  # woken from the Wait state: a new step
        heapq.heappush(events, (max(now + 1, wake), 2, index, "claim"))
    out.steps = steps
    return out


def _note_passed(
    state: LimiterState,
    settings: LimiterSettings,
    line: str,
    ticket: int,
    now_ms: int,
    tickets: dict[int, int],
    runs: list[SimRun],
    out: Outcome,
) -> None:
    """Every run ahead of ``ticket`` in the order when it is granted: passed, and how long it was due."""
    ahead = runs_ahead(state, line, ticket, settings.limit)
    if ahead is None:
        return  # a ticket given back by this claim (its grant never sent): it goes first by that
    starts = planned_starts(state, settings, len(ahead))
    granted = next(i for i, t in tickets.items() if t == ticket and runs[i].line == line)
    for (name, waiting), start in zip(ahead, starts, strict=True):
        passed = next(i for i, t in tickets.items() if t == waiting and runs[i].line == name)
        out.passed.append((granted, passed, now_ms - start))


def max_in_any_window(times: list[int], window_ms: int) -> int:
    return max((sum(1 for s in times if t <= s < t + window_ms) for t in times), default=0)


queue_settings = st.builds(
    lambda limit, window_ms, lead, extra, abandon: LimiterSettings(
        limit=limit,
        window_s=window_ms / 1000,
        skew_margin_ms=2 * MAX_OFFSET_MS + MAX_DELAY_MS,
        max_queue_wait_s=10_000.0,
        wake_lead_ms=lead,
        short_wait_ms=lead + extra,
        abandon_after_ms=abandon,
    ),
    st.integers(1, 5),
    st.integers(200, 3000),
    st.sampled_from([0, 300, 3000]),
    st.sampled_from([0, 500]),
    st.sampled_from([2_000, 600_000]),
)


@st.composite
def sim_runs(draw, max_runs: int = 12, hostile: bool = True) -> list[SimRun]:
    count = draw(st.integers(1, max_runs))
    clock = 0
    runs = []
    for _ in range(count):
        clock += draw(st.one_of(st.just(0), st.integers(1, 50), st.integers(1, 4000)))
        runs.append(
            SimRun(
                org=draw(st.sampled_from(["org-a", "org-b", "org-c"])),
                interactive=draw(st.booleans()),
                accepted_ms=clock,
                generate_after_ms=draw(st.integers(0, 3000)),
                offset_ms=draw(st.integers(-MAX_OFFSET_MS, MAX_OFFSET_MS)),
                lateness_ms=draw(
                    st.lists(st.one_of(st.just(0), st.integers(0, 3000)), min_size=1, max_size=3)
                )
                if hostile
                else [],
                cancel_at_ms=draw(st.one_of(st.none(), st.integers(clock, clock + 8000)))
                if hostile
                else None,
                crash_after_claim=draw(st.booleans()) if hostile else False,
                duplicate=draw(st.booleans()),
            )
        )
    return runs


@rules_checked(60)
@given(queue_settings, sim_runs(), st.integers(0, MAX_DELAY_MS))
def test_never_more_than_the_limit_arrive_in_any_window_and_no_one_starves(settings, runs, delay):
    out = simulate(settings, runs, delay_ms=delay)
    arrivals = sorted(t for times in out.arrivals.values() for t in times)
    assert max_in_any_window(arrivals, settings.window_ms) <= settings.limit
    for index in range(len(runs)):  # every run that was not cancelled sent exactly one request
        if index not in out.cancelled:
            assert len(out.arrivals[index]) == 1, index
    # bounded by the lines waiting, and skipped ranges by the runs waiting, whatever the history
    assert out.max_lines <= 6 and out.max_ranges <= len(runs)


@rules_checked(60)
@given(queue_settings, sim_runs(), st.integers(0, MAX_DELAY_MS), st.data())
def test_a_send_held_up_after_its_grant_is_recorded_again_or_does_not_leave(settings, runs, delay, data):
    """A step held up between its grant and its request (a slow write, a starved CPU), for any time up to
    a few windows, interleaved with everyone else's claims: still never more than the limit in any window
    by arrival, and every run not cancelled sends exactly once (a lost grant claims again, its ticket back at the head of its line)."""
    tolerance = 30
    settings = settings.model_copy(
        update={"skew_margin_ms": settings.skew_margin_ms + tolerance, "send_tolerance_ms": tolerance}
    )
    spacing = settings.spacing_ms
    for run in runs:
        run.held_up_ms = data.draw(
            st.lists(
                st.one_of(st.integers(0, tolerance), st.integers(0, 3 * spacing), st.just(spacing)),
                min_size=1,
                max_size=3,
            )
        )
    out = simulate(settings, runs, delay_ms=delay)
    arrivals = sorted(t for times in out.arrivals.values() for t in times)
    assert max_in_any_window(arrivals, settings.window_ms) <= settings.limit
    for index in range(len(runs)):
        if index not in out.cancelled:
            assert len(out.arrivals[index]) == 1, index


@rules_checked(60)
@given(queue_settings, sim_runs(hostile=False))
def test_first_come_first_served_within_an_organisation_and_a_kind(settings, runs):
    """One line (a batch, and runs joining behind it), the clocks in step and every run there from its
    acceptance on: sends are granted in acceptance order, exactly, whoever wakes first. Ranked by the grant
    that sent. (Runs of other lines reorder the plans as the organisations take turns, so a run may then
    pass one of its line due by less than the margin: the next test.)"""
    for run in runs:
        run.org, run.interactive, run.offset_ms, run.generate_after_ms = "org-a", False, 0, 0
    out = simulate(settings.model_copy(update={"abandon_after_ms": 600_000}), runs)
    assert not out.rejoined and not out.passed
    rank = {index: position for position, index in enumerate(out.order)}
    for a, rank_a in rank.items():
        for b, rank_b in rank.items():
            # runs accepted at the same moment are ordered by ticket, i.e. by list order here
            if runs[a].line == runs[b].line and (runs[a].accepted_ms, a) < (runs[b].accepted_ms, b):
                assert rank_a < rank_b, (a, b)


@rules_checked(60)
@given(queue_settings, sim_runs())
def test_a_run_goes_first_only_past_runs_of_its_line_due_less_than_a_margin(settings, runs):
    """With clocks apart, late wake-ups and crashes, a run whose turn has come goes before runs ahead of it
    only while they are of its line and due by less than the margin (their clocks may be that far behind
    its own); one away longer keeps its place (those behind wait for it). No run is away past
    ``abandon_after`` here, so none may be skipped and join again (a bug that skips runs would otherwise
    hide as rejoins). A run whose granted send died before leaving (a crash after the claim) is never
    demoted: once its retry claims again it goes before every run of its line accepted after it; only
    those granted while its step was dead went first, or within the margin."""
    settings = settings.model_copy(update={"abandon_after_ms": 600_000})
    out = simulate(settings, runs)
    assert not out.rejoined
    for granted, passed, due_ms in out.passed:
        assert due_ms < settings.skew_margin_ms, (granted, passed, due_ms)
        assert runs[granted].line == runs[passed].line, (granted, passed)
    went_first = {(granted, passed) for granted, passed, _ in out.passed}
    rank = {index: position for position, index in enumerate(out.order)}  # the last grant of each
    for a, rank_a in rank.items():
        for b, rank_b in rank.items():
            if runs[a].line == runs[b].line and (runs[a].accepted_ms, a) < (runs[b].accepted_ms, b):
                assert rank_a < rank_b or rank_b < out.returned_at.get(a, -1) or (b, a) in went_first, (a, b)


@rules_checked(40)
@given(queue_settings, sim_runs(hostile=False))
def test_editor_runs_go_first(settings, runs):
    """On time (no run away past its turn), no workflow send is granted while an editor run waits."""
    settings = settings.model_copy(update={"abandon_after_ms": 600_000})
    assert simulate(settings, runs).granted_while_editor_waited == 0


@rules_checked(40)
@given(st.integers(1, 5), st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_organisations_take_turns(limit, runs_per_org):
    """A backlog of several organisations' workflow runs: sent in rounds, each round one per organisation
    that still waits, FIFO within each."""
    # every run claims as soon as it joins (no Extract before it): plans made at the joins hold
    settings = LimiterSettings(
        limit=limit, window_s=1, skew_margin_ms=10, abandon_after_ms=600_000, join_to_claim_ms=0
    )
    runs = [
        SimRun(org=f"org-{o}", interactive=False, accepted_ms=o * 10 + k * 100)
        for o, count in enumerate(runs_per_org)
        for k in range(count)
    ]
    # every run accepted before the first claim: the order is decided on the whole backlog
    for run in runs:
        run.generate_after_ms = 1000 - run.accepted_ms
    out = simulate(settings, runs)
    expected = [
        o for turn in range(max(runs_per_org)) for o, count in enumerate(runs_per_org) if turn < count
    ]
    assert [runs[index].org for index in out.order] == [f"org-{o}" for o in expected]


def test_editor_runs_of_another_organisation_wait_at_most_one_window_behind_a_batch():
    settings = LimiterSettings(limit=5, window_s=6, skew_margin_ms=100, abandon_after_ms=600_000)
    batch = [SimRun(org="org-a", interactive=False, accepted_ms=k) for k in range(40)]
    editors = [SimRun(org="org-b", interactive=True, accepted_ms=1000 + 3000 * k) for k in range(3)]
    out = simulate(settings, batch + editors)
    for offset, editor in enumerate(editors):
        sent = out.arrivals[len(batch) + offset][0]
        assert sent - editor.accepted_ms <= settings.spacing_ms


def test_two_sends_held_up_past_a_window_each_still_send_once_the_hold_ups_end():
    """Each reuses the slot of the other's held-up send, so both lose their first grants; hold-ups that
    never ended would repeat this for ever (no rule can both keep the limit by arrival and not wait on a
    dead sender), which is why the model's hold-ups are transient."""
    settings = LimiterSettings(
        limit=1, window_s=1, skew_margin_ms=130, send_tolerance_ms=30, wake_lead_ms=0, short_wait_ms=0
    )
    held_up = [3 * settings.spacing_ms]
    out = simulate(
        settings, [SimRun("a", False, 0, held_up_ms=held_up), SimRun("b", False, 0, held_up_ms=held_up)]
    )
    assert out.lost_grants >= 1 and all(len(times) == 1 for times in out.arrivals.values())


def test_a_run_that_wakes_late_keeps_its_place_and_those_behind_wait_for_it():
    settings = LimiterSettings(limit=1, window_s=1, skew_margin_ms=50, wake_lead_ms=0, short_wait_ms=0)
    runs = [
        SimRun("org-a", False, 0),
        SimRun("org-a", False, 10, lateness_ms=[2000]),
        SimRun("org-a", False, 30),
    ]
    out = simulate(settings, runs)
    assert out.order == [0, 1, 2] and not out.rejoined
    assert out.arrivals[2][0] >= out.arrivals[1][0] + settings.spacing_ms


def test_the_eta_of_a_backlog_is_exact_when_everyone_is_on_time():
    settings = LimiterSettings(limit=5, window_s=6, skew_margin_ms=100, wake_lead_ms=0, short_wait_ms=0)
    runs = [SimRun("org-a", False, k) for k in range(30)]
    out = simulate(settings, runs)
    for index, told in out.told.items():
        if told:
            assert told[-1] == out.arrivals[index][0]
    # the first five claim as they are accepted; then each slot is reused as soon as the window allows (the
    # slots already spread the sends: no gap is added between them, so nothing adds up over the backlog)
    assert [out.arrivals[k][0] for k in range(5)] == list(range(5))
    for k in range(5, 30):
        assert out.arrivals[k][0] == out.arrivals[k - 5][0] + settings.spacing_ms
    assert out.arrivals[29][0] == 4 + 5 * settings.spacing_ms


def test_a_head_that_sends_before_its_turn_leaves_the_turns_told_to_the_runs_behind_it():
    # a batch's first run out of Extract sooner than the join planned: it sends early (here as soon as it
    # asks; a step waits at most the hold, below), and the runs behind it keep the turns the join told them
    # (the next send of its slot included), so a run waking on its old view finds the plan it slept on and
    # the runs behind it do not take it for away
    settings = LimiterSettings(limit=5, window_s=60, skew_margin_ms=1500)
    line = line_of("org-a", False)
    joined = join(LimiterState(), line, 10, 0, settings)
    first = claim(joined.state, line, 0, "r0#1", 1000, settings)
    assert first.granted and first.start_at_ms == 1000  # the window is kept by when it sent
    assert planned_starts(first.state, settings, 9) == list(joined.starts_at_ms[1:])
    assert joined.starts_at_ms[5] == settings.join_to_claim_ms + settings.spacing_ms
    # with no run of its line behind it nothing was told from its turn: its slot is planned by the window
    alone = join(LimiterState(), line, 1, 0, settings)
    sent = claim(alone.state, line, 0, "a0#1", 1000, settings)
    later = join(sent.state, line, 5, 2000, settings)
    assert later.starts_at_ms[-1] == 1000 + settings.spacing_ms


def test_an_early_head_waits_in_place_for_its_turn_at_most_the_hold():
    # a batch's first run out of Extract before the join planned: sending at once would idle its slot's next
    # send of the line from the send's window to the turn it was told, so it waits as much of its earliness
    # as a run may wait while a slot is free (under the margin), and its slot keeps the turn
    settings = LimiterSettings(limit=5, window_s=60, skew_margin_ms=1500)
    line = line_of("org-a", False)
    joined = join(LimiterState(), line, 10, 0, settings)
    turn = joined.starts_at_ms[0]
    assert turn == settings.join_to_claim_ms and settings.head_hold == 1250
    # early by less than the hold: it waits for its turn and is recorded at it
    near = claim(joined.state, line, 0, "r0#1", turn - 1000, settings, turn - 1000)
    assert not near.granted and near.position == 0 and near.start_at_ms == turn and not near.changed
    on_time = claim(joined.state, line, 0, "r0#1", turn, settings, turn - 1000)
    assert on_time.granted and on_time.start_at_ms == turn
    assert planned_starts(on_time.state, settings, 9) == list(joined.starts_at_ms[1:])
    # early by more: it waits the hold, then sends; the runs behind keep the turns they were told
    asked = turn - 2000
    held = claim(joined.state, line, 0, "r0#1", asked, settings, asked)
    assert not held.granted and held.start_at_ms == asked + settings.head_hold
    sent = claim(joined.state, line, 0, "r0#1", asked + settings.head_hold, settings, asked)
    assert sent.granted and sent.start_at_ms == asked + settings.head_hold
    assert planned_starts(sent.state, settings, 9) == list(joined.starts_at_ms[1:])
    # the hold never lets a head send before the window allows
    full = LimiterSettings(limit=1, window_s=60, skew_margin_ms=1500, join_to_claim_ms=0)
    one = join(LimiterState(), line, 2, 0, full)
    first = claim(one.state, line, 0, "r0#1", 0, full, 0)
    assert first.granted
    waits = claim(first.state, line, 1, "r1#1", 10_000, full, 10_000)
    assert not waits.granted and waits.start_at_ms == full.spacing_ms


def test_a_batch_past_the_cap_is_admitted_up_to_the_cap_and_the_rest_told_their_wait():
    settings = LimiterSettings(limit=1, window_s=60, skew_margin_ms=1000, max_queue_wait_s=150)
    joined = join(LimiterState(), line_of("org", False), 5, 0, settings)
    assert joined.first_ticket == 0 and joined.admitted == 3
    # the first run's turn comes once the steps before its claim can have run (join_to_claim_ms)
    assert joined.starts_at_ms == (3_000, 64_000, 125_000, 186_000, 247_000)
    assert dict(joined.state.lines)[line_of("org", False)].issued == 3
    # a run joining again after being skipped is never refused
    assert join(joined.state, line_of("org", False), 1, 0, settings, may_refuse=False).admitted == 1


def test_a_cancelled_run_leaves_a_range_and_the_runs_behind_move_up():
    settings = LimiterSettings(limit=1, window_s=60, skew_margin_ms=1000)
    line = line_of("org", False)
    state = join(LimiterState(), line, 3, 0, settings).state
    # r0 sends at once, before the turn the join planned for it (join_to_claim_ms later): the slot's next
    # send is planned from that turn, as r1 and r2 were told at the join
    turn = settings.join_to_claim_ms
    state = claim(state, line, 0, "r0#1", 0, settings).state
    behind = claim(state, line, 2, "r2#1", 10, settings)
    assert behind.position == 1 and behind.start_at_ms == turn + 2 * 61_000
    state = leave(state, line, 1, 1, 11)
    moved = claim(state, line, 2, "r2#1", 12, settings)
    assert moved.position == 0 and moved.start_at_ms == turn + 61_000
    assert list(service_order(moved.state, 1)) == [(line, 2)]


def test_a_dead_head_is_skipped_after_the_abandon_time_and_comes_back_at_the_head_of_its_line():
    settings = LimiterSettings(limit=1, window_s=1, skew_margin_ms=10, abandon_after_ms=5_000)
    line = line_of("org", False)
    state = join(LimiterState(), line, 3, 0, settings).state
    state = claim(state, line, 0, "r0#1", 0, settings).state
    early = claim(state, line, 2, "r2#1", 2_000, settings)
    assert not early.granted and early.position == 1
    late = claim(state, line, 2, "r2#1", 20_000, settings)
    assert late.granted and not any(line.waiting for _, line in late.state.lines)
    state = join(late.state, line, 1, 20_500, settings).state  # a newcomer, behind it by acceptance
    back = claim(state, line, 1, "r1#1", 21_000, settings)
    assert not back.gone and back.position == 0 and next(service_order(back.state, 1)) == (line, 1)


def test_a_claim_from_an_old_view_predicts_the_state_at_its_turn():
    """What the adapter writes without a read: the grants ahead in the view, applied in order, are the
    state at the run's turn, if nothing else happened."""
    settings = LimiterSettings(limit=2, window_s=1, skew_margin_ms=10)
    a, b = line_of("a", False), line_of("b", False)
    of_a = join(LimiterState(), a, 2, 0, settings)
    of_b = join(of_a.state, b, 2, 0, settings)
    view, a0, b0 = of_b.state, of_a.first_ticket, of_b.first_ticket
    assert b0 == a0 + 2  # a line made anew takes tickets above every ticket issued so far
    actual = view
    for line, ticket, at in [(a, a0, 0), (b, b0, 1), (a, a0 + 1, 1011)]:
        actual = claim(actual, line, ticket, f"{line}{ticket}", at, settings).state
    predicted = state_at_turn(view, b, b0 + 1, settings)
    assert (predicted.grants, predicted.changes, predicted.lines) == (
        actual.grants,
        actual.changes,
        actual.lines,
    )
    assert [s.line for s in predicted.slots] == [s.line for s in actual.slots]


def test_state_stays_bounded_whatever_the_history():
    settings = LimiterSettings(limit=5, window_s=1, skew_margin_ms=10)
    line = line_of("org", False)
    state = LimiterState()
    for k in range(3000):
        joined = join(state, line, 3, k * 10, settings)
        state = leave(joined.state, line, joined.first_ticket, 3, k * 10)
    assert not state.lines and state.grants == 0


@pytest.mark.parametrize(
    ("field", "value"), [("skew_margin_ms", 0), ("limit", 0), ("window_s", 0), ("max_queue_wait_s", 0)]
)
def test_settings_refuse_nonsense(field, value):
    with pytest.raises(ValidationError):
        LimiterSettings(**{field: value})
