"""The global limit's rules, for any arrival sequence: the window holds, order is FIFO, each booking is the
earliest legal one, a free slot is never refused and a backlog leaves no slot idle.

The arrival times are the fake clock: each caller asks at its own ``now``. "Window" below means the
half-open interval ``[t, t + window)``; the margin widens the spacing the limiter keeps to
``window + skew_margin_ms`` (with a margin of 0 that is exactly the window).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st
from pydantic import ValidationError

from dalle_plugin.domain.rate_limit import (
    LimiterSettings,
    LimiterState,
    may_start,
    queue_position,
    reserve,
    wait_seconds,
)
from dalle_plugin.ports import RateDecision



@dataclass(frozen=True)
class Run:
    settings: LimiterSettings
    arrivals: list[int]
    decisions: list[RateDecision]
    final: LimiterState

    @property
    def starts(self) -> list[int]:
        return [decision.start_at_ms for decision in self.decisions]


def simulate(settings: LimiterSettings, arrivals: list[int]) -> Run:
    state = LimiterState()
    decisions = []
    for index, now in enumerate(arrivals):
        reservation = reserve(state, f"run-{index}#1", now, settings)
        assert reservation.is_new and reservation.ticket_index == index
        decisions.append(reservation.decision)
        state = reservation.state
    return Run(settings, arrivals, decisions, state)


def max_starts_in_any_window(starts: list[int], window_ms: int) -> int:
    # the busiest window begins at some start
    return max((sum(1 for s in starts if t <= s < t + window_ms) for t in starts), default=0)


limiter_settings = st.builds(
    LimiterSettings,
    limit=st.integers(1, 6),
    window_s=st.integers(1, 5000).map(lambda ms: ms / 1000),
    skew_margin_ms=st.sampled_from([0, 0, 1, 37, 250]),
    wait_granularity_ms=st.sampled_from([1, 1, 1, 10, 1000]),
)
exact_settings = st.builds(
    LimiterSettings,
    limit=st.integers(1, 6),
    window_s=st.integers(1, 5000).map(lambda ms: ms / 1000),
    skew_margin_ms=st.sampled_from([0, 0, 1, 37, 250]),
    wait_granularity_ms=st.just(1),
)
# bursts (many callers at the same millisecond), trickles and gaps longer than the window
gaps = st.lists(st.one_of(st.just(0), st.integers(0, 50), st.integers(0, 12_000)), min_size=1, max_size=40)
epochs = st.sampled_from([0, 1_760_000_000_000])


def sorted_arrivals(epoch: int, gap_list: list[int]) -> list[int]:
    return list(accumulate(gap_list, initial=epoch))[1:]


@hypothesis_settings(max_examples=200, deadline=None)
@given(limiter_settings, epochs, gaps)
def test_no_window_ever_holds_more_than_limit_starts(settings, epoch, gap_list):
    run = simulate(settings, sorted_arrivals(epoch, gap_list))
    assert max_starts_in_any_window(run.starts, settings.window_ms) <= settings.limit
    # the margin is kept too: ticket n starts a whole spacing after ticket n - limit
    for later, earlier in zip(run.starts[settings.limit:], run.starts):
        assert later - earlier >= settings.spacing_ms


@hypothesis_settings(max_examples=200, deadline=None)
@given(limiter_settings, epochs, gaps)
def test_starts_are_fifo_and_never_before_arrival(settings, epoch, gap_list):
    run = simulate(settings, sorted_arrivals(epoch, gap_list))
    assert run.starts == sorted(run.starts)
    assert all(start >= now for start, now in zip(run.starts, run.arrivals))
    assert all(decision.reserved for decision in run.decisions)


@hypothesis_settings(max_examples=200, deadline=None)
@given(exact_settings, epochs, gaps)
def test_booked_start_is_the_earliest_legal_one(settings, epoch, gap_list):
    """Told to start at t + r, the caller could not have started at t + r - 1: that millisecond would put
    limit + 1 starts inside one spacing (window + margin; exactly the window when the margin is 0)."""
    run = simulate(settings, sorted_arrivals(epoch, gap_list))
    for index, (now, start) in enumerate(zip(run.arrivals, run.starts)):
        if start == now:
            continue
        one_earlier = start - 1
        earlier_starts = run.starts[:index]
        in_spacing = [s for s in earlier_starts if one_earlier - settings.spacing_ms < s <= one_earlier]
        assert len(in_spacing) + 1 > settings.limit, (index, now, start)
        if settings.skew_margin_ms == 0:
            with_one_earlier = earlier_starts + [one_earlier]
            assert max_starts_in_any_window(with_one_earlier, settings.window_ms) > settings.limit


@hypothesis_settings(max_examples=200, deadline=None)
@given(limiter_settings, epochs, gaps)
def test_booked_starts_are_whole_granules_when_they_wait(settings, epoch, gap_list):
    run = simulate(settings, sorted_arrivals(epoch, gap_list))
    for now, start in zip(run.arrivals, run.starts):
        assert start == now or start % settings.wait_granularity_ms == 0


@hypothesis_settings(max_examples=200, deadline=None)
@given(limiter_settings, epochs, gaps)
def test_a_free_slot_is_never_refused(settings, epoch, gap_list):
    """Nobody booked ahead in the future and fewer than limit starts in the last spacing: start now."""
    run = simulate(settings, sorted_arrivals(epoch, gap_list))
    for index, (now, start) in enumerate(zip(run.arrivals, run.starts)):
        earlier = run.starts[:index]
        nobody_ahead = all(s <= now for s in earlier)
        recent = sum(1 for s in earlier if now - settings.spacing_ms < s <= now)
        if nobody_ahead and recent < settings.limit:
            assert start == now


@hypothesis_settings(max_examples=200, deadline=None)
@given(limiter_settings, epochs, gaps)
def test_a_backlog_leaves_no_slot_idle(settings, epoch, gap_list):
    """A caller that arrived before its slot freed starts the moment it frees (rounded up to a granule)."""
    run = simulate(settings, sorted_arrivals(epoch, gap_list))
    granule = settings.wait_granularity_ms
    for index in range(settings.limit, len(run.starts)):
        frees_at = run.starts[index - settings.limit] + settings.spacing_ms
        if run.arrivals[index] < frees_at:
            assert run.starts[index] == -(-frees_at // granule) * granule
        else:
            # free: now, unless an earlier caller's booking was rounded up past now (FIFO comes first)
            assert run.starts[index] == max(run.arrivals[index], run.starts[index - 1])


@hypothesis_settings(max_examples=200, deadline=None)
@given(exact_settings, epochs, gaps)
def test_queue_position_counts_the_bookings_still_ahead(settings, epoch, gap_list):
    run = simulate(settings, sorted_arrivals(epoch, gap_list))
    for index, (now, decision) in enumerate(zip(run.arrivals, run.decisions)):
        assert decision.position == sum(1 for s in run.starts[:index] if s > now)
        if decision.start_at_ms == now:
            assert decision.position == 0


@hypothesis_settings(max_examples=200, deadline=None)
@given(limiter_settings, epochs, gaps)
def test_queue_position_with_coarse_granules_never_undercounts(settings, epoch, gap_list):
    run = simulate(settings, sorted_arrivals(epoch, gap_list))
    for index, (now, decision) in enumerate(zip(run.arrivals, run.decisions)):
        exact = sum(1 for s in run.starts[:index] if s > now)
        assert exact <= decision.position <= exact + settings.limit


@hypothesis_settings(max_examples=200, deadline=None)
@given(limiter_settings, st.lists(st.integers(0, 20_000), min_size=1, max_size=40))
def test_window_and_fifo_hold_even_when_callers_clocks_disagree(settings, arrivals):
    """Lambdas' clocks differ, so tickets can arrive with earlier ``now`` values than their predecessors."""
    run = simulate(settings, arrivals)
    assert run.starts == sorted(run.starts)
    assert max_starts_in_any_window(run.starts, settings.window_ms) <= settings.limit


@hypothesis_settings(max_examples=200, deadline=None)
@given(limiter_settings, epochs, gaps, st.integers(0, 100_000))
def test_asking_again_with_a_held_ticket_returns_its_booking(settings, epoch, gap_list, later):
    run = simulate(settings, sorted_arrivals(epoch, gap_list))
    first_recent = run.final.first_recent_index
    for index in range(first_recent, run.final.issued):
        again = reserve(run.final, f"run-{index}#1", run.arrivals[-1] + later, settings)
        assert not again.is_new
        assert again.state == run.final
        assert again.ticket_index == index
        assert again.decision.start_at_ms == run.starts[index]


def test_scaled_window_five_per_two_seconds():
    settings = LimiterSettings(limit=5, window_s=2, skew_margin_ms=0)
    run = simulate(settings, [0] * 12)
    assert run.starts == [0] * 5 + [2000] * 5 + [4000] * 2
    assert [d.position for d in run.decisions] == [0] * 5 + [0, 1, 2, 3, 4] + [5, 6]


def test_margin_and_granularity_push_waiting_starts_only():
    settings = LimiterSettings(limit=2, window_s=60, skew_margin_ms=250, wait_granularity_ms=1000)
    run = simulate(settings, [10_100, 10_100, 10_200, 70_400])
    # the free ones start at once; the waiting ones start at ceil(10_100 + 60_000 + 250) to the second
    assert run.starts == [10_100, 10_100, 71_000, 71_000]


def test_state_keeps_only_the_last_limit_bookings():
    settings = LimiterSettings(limit=3, window_s=1, skew_margin_ms=0)
    run = simulate(settings, [0, 0, 0, 0, 0])
    assert run.final.issued == 5
    assert run.final.recent_starts == (0, 1000, 1000)
    assert run.final.recent_tickets == ("run-2#1", "run-3#1", "run-4#1")


def test_position_counts_predecessors_no_longer_stored():
    settings = LimiterSettings(limit=2, window_s=1, skew_margin_ms=0)
    run = simulate(settings, [0] * 9)
    assert run.starts == [0, 0, 1000, 1000, 2000, 2000, 3000, 3000, 4000]
    assert queue_position(run.final, run.final.issued, 0, settings) == 7
    assert queue_position(run.final, run.final.issued, 2500, settings) == 3


def test_may_start_only_inside_half_the_margin_after_the_booking():
    settings = LimiterSettings(limit=5, window_s=60, skew_margin_ms=1000)
    booked = RateDecision(start_at_ms=10_000, reserved=True, position=2)
    assert not may_start(booked, 9_999, settings)
    assert may_start(booked, 10_000, settings)
    assert may_start(booked, 10_500, settings)  # the other half is the request's own way to OpenAI
    assert not may_start(booked, 10_501, settings)
    assert not may_start(RateDecision(start_at_ms=10_000, reserved=False), 10_000, settings)


def test_wait_seconds_never_wakes_early():
    booked = RateDecision(start_at_ms=71_000, reserved=True)
    assert wait_seconds(booked, 10_100) == 61
    assert wait_seconds(booked, 11_000) == 60
    assert wait_seconds(booked, 72_000) == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"limit": 0},
        {"window_s": 0},
        {"window_s": -1},
        {"skew_margin_ms": -1},
        {"wait_granularity_ms": 0},
        {"unknown": 1},
    ],
)
def test_settings_refuse_nonsense(bad):
    with pytest.raises(ValidationError):
        LimiterSettings(**bad)


def test_settings_scale_the_window():
    assert LimiterSettings(window_s=2.5).window_ms == 2500
    assert LimiterSettings(window_s=0.001).window_ms == 1
    assert LimiterSettings().limit == 5 and LimiterSettings().window_ms == 60_000


def test_an_empty_ticket_is_refused():
    with pytest.raises(ValueError):
        reserve(LimiterState(), "", 0, LimiterSettings())


# ---- given-back starts (cancelled runs) ------------------------------------------------------------

@hypothesis_settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(min_value=0, max_value=3_000), min_size=1, max_size=40),
    cancel_every=st.integers(min_value=2, max_value=7),
)
def test_starts_given_back_by_cancelled_runs_are_reused_and_the_window_still_holds(gaps, cancel_every):
    """Cancelled bookings never start; their starts go to later callers; no window ever holds more than
    the limit among the starts that really happen."""
    limits = LimiterSettings(limit=5, window_s=2.0, skew_margin_ms=100, wait_granularity_ms=1)
    state, now, started, cancelled = LimiterState(), 0, [], 0
    for index, gap in enumerate(gaps):
        now += gap
        booked = reserve(state, f"t{index}", now, limits)
        state = booked.state
        start = booked.decision.start_at_ms
        assert start >= now
        if index % cancel_every == 0 and start > now:
            state = LimiterState(state.issued, state.recent_starts, state.recent_tickets,
                                 tuple(sorted(state.released + (start,))))
            cancelled += 1
        else:
            started.append(start)
    started.sort()
    for i in range(len(started)):
        in_window = [s for s in started if started[i] <= s < started[i] + limits.window_ms]
        assert len(in_window) <= limits.limit


def test_the_next_caller_takes_a_given_back_start():
    limits = LimiterSettings(limit=1, window_s=10.0, skew_margin_ms=0, wait_granularity_ms=1)
    first = reserve(LimiterState(), "a", 0, limits)
    second = reserve(first.state, "b", 0, limits)  # booked at 10 000
    assert second.decision.start_at_ms == 10_000
    given_back = LimiterState(second.state.issued, second.state.recent_starts, second.state.recent_tickets,
                              (10_000,))
    third = reserve(given_back, "c", 1_000, limits)
    assert third.reclaimed == 10_000 and third.decision.start_at_ms == 10_000
    assert third.state.released == () and third.state.issued == given_back.issued
    assert reserve(third.state, "d", 1_000, limits).decision.start_at_ms == 20_000
