"""Rules that must hold for every input: shortening, JavaScript offsets, entity round trips."""

from dalle_plugin.domain.prompt import build_prompt, shorten_at_word_boundary, slice_utf16, utf16_length
from hypothesis import assume, given, settings
from hypothesis import strategies as st

# Every code point, lone surrogates included: JavaScript strings can hold those too.
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=60)
# Text a decoded asset can hold (a decoder never yields lone surrogates).
asset_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)
# Words and whitespace mixed, so that boundaries are plentiful.
wordy_text = st.lists(
    st.one_of(
        st.text(alphabet="abcdé😀", min_size=1, max_size=12),
        st.sampled_from([" ", "  ", "\n", "\t", "\u00a0"]),
    ),
    max_size=25,
).map("".join)


def js_code_units(text: str) -> list[int]:
    """The UTF-16 code units JavaScript stores for ``text``, computed by hand."""
    units: list[int] = []
    for ch in text:
        code = ord(ch)
        if code > 0xFFFF:
            code -= 0x10000
            units += [0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF)]
        else:
            units.append(code)
    return units


def best_boundary_cut(text: str, max_chars: int) -> int | None:
    """Length of the longest prefix within the limit that ends a word, or None when every cut splits one."""
    best = None
    for end in range(1, min(max_chars, len(text)) + 1):
        at_boundary = end == len(text) or text[end].isspace()
        kept = text[:end].rstrip()
        if at_boundary and kept.strip():
            best = max(best or 0, len(kept))
    return best


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(wordy_text, any_text), max_chars=st.integers(min_value=1, max_value=80))
def test_shortening_is_a_prefix_within_the_limit_that_cuts_no_word_when_avoidable(text, max_chars):
    result = shorten_at_word_boundary(text, max_chars)
    assert text.startswith(result)
    assert len(result) <= max_chars
    if len(text) <= max_chars:
        assert result == text
        return
    best = best_boundary_cut(text, max_chars)
    if best is not None:
        assert len(result) == best
        assert text[len(result)].isspace() or text[len(result) :].strip() == ""
    else:
        assert result == text[:max_chars]


@settings(max_examples=300, deadline=None)
@given(text=any_text, data=st.data())
def test_utf16_slicing_agrees_with_javascript(text, data):
    units = js_code_units(text)
    assert utf16_length(text) == len(units)
    start = data.draw(st.integers(min_value=0, max_value=len(units) + 3))
    end = data.draw(st.integers(min_value=0, max_value=len(units) + 3))
    assert js_code_units(slice_utf16(text, start, end)) == units[start:end]


@settings(max_examples=200, deadline=None)
@given(text=asset_text, data=st.data())
def test_an_entity_at_javascript_offsets_reads_back_exactly_what_was_highlighted(text, data):
    begin = data.draw(st.integers(min_value=0, max_value=len(text)))
    stop = data.draw(st.integers(min_value=begin, max_value=len(text)))
    highlighted = text[begin:stop]
    assume(highlighted.strip())
    start = len(js_code_units(text[:begin]))
    end = start + len(js_code_units(highlighted))
    answer = {
        "tools": [
            {"schemaId": "p", "objectId": "o", "ner": {"start": start, "end": end, "selection": highlighted}}
        ]
    }
    prompt = build_prompt("entity-annotation", answer, ["p"], lambda: text, 10_000)
    assert prompt.text == " ".join(highlighted.split())
    assert prompt.notes == []


@settings(max_examples=200, deadline=None)
@given(
    answers=st.lists(wordy_text, min_size=1, max_size=5),
    max_chars=st.integers(min_value=1, max_value=120),
)
def test_a_built_prompt_never_exceeds_the_limit_and_is_a_prefix_of_the_whole(answers, max_chars):
    assume(any(answer.strip() for answer in answers))
    answer = {"classifications": [{"schemaId": "p", "tool": "text", "answer": a} for a in answers]}
    prompt = build_prompt("text-annotation", answer, ["p"], None, max_chars)
    whole = build_prompt("text-annotation", answer, ["p"], None, 10_000).text
    assert len(prompt.text) <= max_chars
    assert whole.startswith(prompt.text)
    assert prompt.truncated == (len(whole) > max_chars)
    assert prompt.original_length == len(whole)
