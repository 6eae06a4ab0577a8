"""An own key's pacing as rules: the limit learned from OpenAI's headers and 429s, never more sends than
the learned cap in any window, a 429's retry time honoured by every run of the key, bounded state."""

from __future__ import annotations

from dalle_plugin.domain.key_pacing import (
    PROBE_LIMIT,
    KeyPace,
    KeyPaceSettings,
    Observation,
    claim,
    effective_limit,
    key_fingerprint,
    learn,
    ticket_tag,
)
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

SETTINGS = KeyPaceSettings(window_s=5, margin_ms=200, short_wait_ms=3500)
SPACING = SETTINGS.spacing_ms


def test_an_unknown_limit_lets_one_probe_through_and_the_others_look_again_soon() -> None:
    first = claim(KeyPace(), "run-a#1", 1_000, SETTINGS)
    assert first.granted and first.state.sends == ((1_000, ticket_tag("run-a#1")),)
    second = claim(first.state, "run-b#1", 1_010, SETTINGS)
    assert not second.granted
    # the probe's answer will teach the limit within moments: look again then, not a whole short wait later
    assert second.start_at_ms == 1_010 + SETTINGS.probe_look_ms


def test_the_limit_is_adopted_from_the_answer_and_then_fills_the_window() -> None:
    state = claim(KeyPace(), "t0", 0, SETTINGS).state
    state = learn(
        state, "t0", Observation(refused=False, limit_requests=3, remaining_requests=2), 50, SETTINGS
    )
    assert state.limit == 3
    for n, at in enumerate((100, 200)):
        answer = claim(state, f"t{n + 1}", at, SETTINGS)
        assert answer.granted
        state = answer.state
    full = claim(state, "t3", 300, SETTINGS)
    assert not full.granted and full.start_at_ms == 0 + SPACING  # the oldest send's slot frees first
    assert claim(state, "t3", SPACING, SETTINGS).granted


def test_a_claim_asked_again_with_its_ticket_is_granted_without_a_second_send() -> None:
    state = learn(KeyPace(), "x", Observation(False, limit_requests=1), 0, SETTINGS)
    granted = claim(state, "run#1", 10, SETTINGS)
    again = claim(granted.state, "run#1", 20, SETTINGS)
    assert again.granted and not again.changed and again.state == granted.state


def test_a_429_blocks_every_run_of_the_key_until_its_retry_time_and_frees_the_refused_send() -> None:
    state = learn(KeyPace(), "x", Observation(False, limit_requests=2), 0, SETTINGS)
    state = claim(state, "a", 100, SETTINGS).state
    state = claim(state, "b", 150, SETTINGS).state
    refused = learn(state, "b", Observation(True, limit_requests=2, retry_after_ms=900), 200, SETTINGS)
    assert [tag for _, tag in refused.sends] == [ticket_tag("a")]
    assert refused.blocked_until_ms == 1_100
    assert not claim(refused, "c", 1_099, SETTINGS).granted
    assert claim(refused, "c", 1_099, SETTINGS).start_at_ms == 1_100
    assert claim(refused, "c", 1_100, SETTINGS).granted


def test_a_429_on_a_claim_granted_within_the_stated_limit_widens_that_keys_margin_by_its_lateness() -> None:
    state = learn(KeyPace(), "x", Observation(False, limit_requests=1), 0, SETTINGS)
    state = claim(state, "a", 100, SETTINGS).state
    state = claim(
        state, "b", 100 + SPACING, SETTINGS
    ).state  # OpenAI saw "a" arrive later than it was claimed
    refused = learn(
        state, "b", Observation(True, limit_requests=1, retry_after_ms=80), 150 + SPACING, SETTINGS
    )
    assert refused.extra_margin_ms == 80 + SETTINGS.learned_margin_step_ms
    assert SETTINGS.spacing_for(refused) == SPACING + 180
    # the refused send is retried when OpenAI said; the slot it then takes frees one widened spacing later
    retried = claim(refused, "b2", 230 + SPACING, SETTINGS)
    assert retried.granted
    assert claim(retried.state, "c", 240 + SPACING, SETTINGS).start_at_ms == 230 + 2 * SPACING + 180
    # however many such 429s, the margin stays bounded
    for n in range(100):
        refused = learn(refused, "a", Observation(True, limit_requests=1, retry_after_ms=900), n, SETTINGS)
    assert SETTINGS.spacing_for(refused) == SPACING + SETTINGS.max_learned_margin_ms


def test_a_served_send_is_dated_by_when_it_reached_openai_so_its_slot_frees_a_window_after_that() -> None:
    state = learn(KeyPace(), "x", Observation(False, limit_requests=2), 0, SETTINGS)
    state = claim(state, "a", 100, SETTINGS).state
    state = claim(state, "b", 200, SETTINGS).state
    # "a" left a loaded sender late: OpenAI had it by 900 at the latest (answered at 1_000 after 100 ms)
    state = learn(state, "a", Observation(False, limit_requests=2, arrived_by_ms=900), 1_000, SETTINGS)
    assert state.sends == ((200, ticket_tag("b")), (900, ticket_tag("a")))
    assert claim(state, "c", 1_100, SETTINGS).start_at_ms == 200 + SPACING
    # a timing that says less than the claim never dates a send earlier
    assert learn(state, "b", Observation(False, 2, arrived_by_ms=50), 1_000, SETTINGS).sends == state.sends


def test_a_429_while_the_limit_is_unknown_or_changes_teaches_no_margin() -> None:
    probe = claim(KeyPace(), "a", 0, SETTINGS).state
    assert (
        learn(
            probe, "a", Observation(True, limit_requests=2, retry_after_ms=500), 10, SETTINGS
        ).extra_margin_ms
        == 0
    )
    known = learn(KeyPace(), "x", Observation(False, limit_requests=3), 0, SETTINGS)
    lowered = learn(known, "x", Observation(True, limit_requests=2, retry_after_ms=500), 10, SETTINGS)
    assert lowered.extra_margin_ms == 0


def test_a_429_without_a_limit_lowers_the_limit_to_what_got_through() -> None:
    state = learn(KeyPace(), "x", Observation(False, limit_requests=5), 0, SETTINGS)
    for ticket, at in (("a", 10), ("b", 20), ("c", 30)):
        state = claim(state, ticket, at, SETTINGS).state
    lowered = learn(state, "c", Observation(True, retry_after_ms=500), 40, SETTINGS)
    assert lowered.limit == 2
    # and the next answer that states the limit restores it
    assert learn(lowered, "d", Observation(False, limit_requests=5), 600, SETTINGS).limit == 5


def test_a_huge_limit_keeps_the_state_bounded() -> None:
    settings = KeyPaceSettings(window_s=60, max_tracked_sends=20)
    state = learn(KeyPace(), "x", Observation(False, limit_requests=10_000), 0, settings)
    assert effective_limit(state, settings) == 20
    for n in range(100):
        answer = claim(state, f"t{n}", n, settings)
        state = answer.state
    assert len(state.sends) <= 20


def test_the_fingerprint_never_contains_the_key() -> None:
    key = "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"
    fingerprint = key_fingerprint(key)
    assert key not in fingerprint and key[-8:] not in fingerprint
    assert fingerprint == key_fingerprint(key) != key_fingerprint(key + "x")


@st.composite
def _histories(draw):
    limit = draw(st.integers(1, 6))
    steps = draw(
        st.lists(
            st.tuples(
                st.integers(0, 2_000),  # time to the next event
                st.sampled_from(["claim", "answer", "refuse", "refuse_bare"]),
                st.integers(0, 3_000),  # retry-after of a refusal
            ),
            min_size=1,
            max_size=80,
        )
    )
    return limit, steps


@hypothesis_settings(max_examples=200, deadline=None)
@given(_histories())
def test_sends_in_any_window_never_pass_the_learned_cap(history) -> None:
    """Whatever OpenAI answers, in whatever order: no send is granted while ``limit`` counted sends lie in
    the window before it (the limit in force then), none inside a 429's block, and the state stays within
    the limit."""
    true_limit, steps = history
    state, now = KeyPace(), 0
    counted: dict[str, int] = {}  # ticket -> granted at, while OpenAI counts it
    pending: list[str] = []
    for n, (gap, event, retry_after) in enumerate(steps):
        now += gap
        if event == "claim":
            before = state
            answer = claim(state, f"t{n}", now, SETTINGS)
            if answer.granted:
                recent = [at for at in counted.values() if at > now - SPACING]
                assert len(recent) < effective_limit(before, SETTINGS)
                assert now >= before.blocked_until_ms
                counted[f"t{n}"] = now
                pending.append(f"t{n}")
            else:
                assert answer.start_at_ms > now
            state = answer.state
        elif pending:
            ticket = pending.pop(0)
            refused = event != "answer"
            limit = None if event == "refuse_bare" else true_limit
            state = learn(state, ticket, Observation(refused, limit, None, retry_after), now, SETTINGS)
            if refused:
                del counted[ticket]  # OpenAI did not count it, and neither does the state
                assert all(tag != ticket_tag(ticket) for _, tag in state.sends)
                assert state.blocked_until_ms >= now + retry_after
        assert len(state.sends) <= max(effective_limit(state, SETTINGS), true_limit, PROBE_LIMIT)


def test_the_answers_rate_limit_headers_are_read_as_openai_sends_them() -> None:
    from dalle_plugin.adapters.openai_images import key_limits

    headers = {
        "x-ratelimit-limit-requests": "50",
        "x-ratelimit-remaining-requests": "49",
        "x-ratelimit-reset-requests": "1.2s",
    }
    limits = key_limits(headers)
    assert (limits.limit_requests, limits.remaining_requests, limits.reset_requests_ms) == (50, 49, 1200)
    assert limits.arrived_by_ms is None  # no timing without the time the answer was in hand
    timed = key_limits(headers | {"openai-processing-ms": "250"}, answered_at_ms=10_000)
    assert timed.arrived_by_ms == 9_750
    assert key_limits({}).limit_requests is None
    assert key_limits({"x-ratelimit-limit-requests": "lots"}).limit_requests is None


def test_the_pacing_item_is_named_by_the_fingerprint_and_written_under_its_version() -> None:
    from dalle_plugin.adapters.dynamo_key_pacer import DynamoKeyPacer, decode_pace, encode_pace

    pacer = DynamoKeyPacer(client=None, table_name="rate", settings=SETTINGS)
    state = KeyPace(limit=3, sends=((5, "abc"),), blocked_until_ms=9, extra_margin_ms=120)
    first = pacer.write_request("f1", 0, state)
    assert first["Key"] == {"pk": {"S": "key#f1"}}
    assert first["ConditionExpression"] == "attribute_not_exists(#pk)"
    assert first["ReturnValuesOnConditionCheckFailure"] == "ALL_OLD"
    later = pacer.write_request("f1", 4, state)
    assert later["ConditionExpression"] == "#v = :version"
    assert later["ExpressionAttributeValues"][":version"] == {"N": "4"}
    assert decode_pace(encode_pace(state)) == state
