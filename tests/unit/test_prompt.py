"""build_prompt and prompt_class_ids over the answer shapes the hub really returns."""

import pytest
from dalle_plugin.domain.errors import AssetUnreadable, PromptNotFound
from dalle_plugin.domain.prompt import (
    build_prompt,
    join_parts,
    prompt_class_ids,
    shorten_at_word_boundary,
    slice_utf16,
    utf16_length,
)

PROMPT_ENTITY = "6f1c0a-entity-prompt"
PROMPT_TEXT = "9a2b3c-text-prompt"
OTHER = "other-class"
LIMIT = 32000


def js_units(text: str) -> int:
    """JavaScript's length, counted independently of the code under test."""
    return sum(2 if ord(ch) > 0xFFFF else 1 for ch in text)


def js_span(text: str, part: str, occurrence: int = 0) -> tuple[int, int]:
    index = -1
    for _ in range(occurrence + 1):
        index = text.index(part, index + 1)
    start = js_units(text[:index])
    return start, start + js_units(part)


def entity(object_id, start, end, selection=None, schema_id=PROMPT_ENTITY, **extra):
    ner = {"start": start, "end": end}
    if selection is not None:
        ner["selection"] = selection
    return {
        "schemaId": schema_id,
        "objectId": object_id,
        "title": "Prompt",
        "ner": ner,
        "classifications": [],
        **extra,
    }


def text_classification(answer, schema_id=PROMPT_TEXT, nested=None, tool="text"):
    return {
        "schemaId": schema_id,
        "tool": tool,
        "title": "Prompt",
        "answer": answer,
        "classifications": nested or [],
    }


class CountingText:
    """The asset-text callable, counting how often it is asked for."""

    def __init__(self, text: str):
        self.text, self.calls = text, 0

    def __call__(self) -> str:
        self.calls += 1
        return self.text


def build(source, answer=None, ids=(PROMPT_ENTITY, PROMPT_TEXT), text=None, max_chars=LIMIT):
    asset = CountingText(text) if isinstance(text, str) else text
    return build_prompt(source, answer, list(ids), asset, max_chars)


# ---- prompt_class_ids ----------------------------------------------------------------------------


def test_class_ids_are_the_entries_mapped_to_prompt():
    schema = [
        {"schemaId": "a", "modelClass": "Prompt"},
        {"schemaId": "b", "modelClass": "Background"},
        {"schemaId": "c", "modelClass": " prompt "},
        {"schemaId": "a", "modelClass": "PROMPT"},
    ]
    assert prompt_class_ids(schema) == ["a", "c"]


@pytest.mark.parametrize("schema", [None, [], "", "not json", 42, [None, "x", {"modelClass": "Prompt"}]])
def test_nothing_usable_means_no_ids(schema):
    assert prompt_class_ids(schema) == []


def test_class_ids_accept_the_mapping_forms_defensively():
    assert prompt_class_ids({"a": "Prompt", "b": "Other"}) == ["a"]
    assert prompt_class_ids({"Prompt": ["a", "b"]}) == ["a", "b"]
    assert prompt_class_ids({"prompt": "a"}) == ["a"]
    assert prompt_class_ids({"schemaId": "a", "modelClass": "Prompt"}) == ["a"]
    assert prompt_class_ids('[{"schemaId": "a", "modelClass": "Prompt"}]') == ["a"]
    assert prompt_class_ids([{"schemaId": 17, "modelClass": "Prompt"}]) == ["17"]


# ---- full-text-asset -----------------------------------------------------------------------------


def test_full_text_is_the_whole_text_with_whitespace_collapsed():
    asset = CountingText("  A red barn\r\n\r\nat   sunset.\t ")
    prompt = build_prompt("full-text-asset", None, [], asset, LIMIT)
    assert prompt.text == "A red barn at sunset."
    assert (prompt.source, prompt.truncated, prompt.original_length) == ("full-text-asset", False, 21)
    assert asset.calls == 1


def test_full_text_needs_no_class_mapping():
    assert build("full-text-asset", None, ids=(), text="hello there").text == "hello there"


def test_an_empty_asset_is_not_a_prompt():
    with pytest.raises(PromptNotFound, match="asset's text is empty"):
        build("full-text-asset", text=" \n\t ")


def test_full_text_without_a_text_source_is_unreadable():
    with pytest.raises(AssetUnreadable):
        build("full-text-asset", text=None)


def test_a_long_asset_is_shortened_at_a_word_boundary_and_the_run_goes_on():
    text = "one two three four five six seven"
    prompt = build("full-text-asset", text=text, max_chars=16)
    assert prompt.text == "one two three"
    assert prompt.truncated
    assert prompt.original_length == len(text)
    assert prompt.notes == [
        "The prompt was shortened from 33 to 13 characters to fit the model's limit of 16 characters."
    ]


# ---- entity-annotation ---------------------------------------------------------------------------


STORY = "Once upon a time there was a red barn. At sunset a tiny dog ran through the golden wheat."


def test_entities_are_read_in_text_order_whatever_order_the_hub_lists_them():
    answer = {
        "tools": [
            entity("o3", *js_span(STORY, "golden wheat")),
            entity("o1", *js_span(STORY, "red barn")),
            entity("o2", *js_span(STORY, "tiny dog")),
        ],
        "classifications": [],
        "relations": [],
    }
    prompt = build("entity-annotation", answer, text=STORY)
    assert prompt.parts == ["red barn", "tiny dog", "golden wheat"]
    assert prompt.text == "red barn. tiny dog. golden wheat"
    assert prompt.source == "entity-annotation"


def test_a_part_ending_in_punctuation_is_joined_with_a_space():
    answer = {
        "tools": [entity("o1", *js_span(STORY, "a red barn.")), entity("o2", *js_span(STORY, "tiny dog"))]
    }
    assert build("entity-annotation", answer, text=STORY).text == "a red barn. tiny dog"
    assert join_parts(["Stop!", "Go"]) == "Stop! Go"


def test_entities_of_other_classes_are_ignored():
    answer = {
        "tools": [
            entity("o1", *js_span(STORY, "red barn")),
            entity("o2", *js_span(STORY, "tiny dog"), schema_id=OTHER),
        ]
    }
    assert build("entity-annotation", answer, text=STORY).text == "red barn"


def test_an_emoji_and_accents_before_an_entity_do_not_shift_it():
    text = "Café ☕ and 😀🎉 then: a lighthouse in a storm"
    start, end = js_span(text, "a lighthouse")
    assert start == text.index("a lighthouse") + 2  # two astral characters count two units each in JS
    answer = {"tools": [entity("o1", start, end)]}
    assert build("entity-annotation", answer, text=text).text == "a lighthouse"


def test_offsets_are_those_node_reports_for_this_text():
    # node -e 't="Café 😀 a red barn"; console.log(t.indexOf("a red"), t.length)' prints 8 18
    text = "Café 😀 a red barn"
    assert utf16_length(text) == 18
    answer = {"tools": [entity("o1", 8, 18, "a red barn")]}
    prompt = build("entity-annotation", answer, text=text)
    assert prompt.text == "a red barn" and prompt.notes == []


def test_a_matching_selection_with_exclusive_end_needs_no_note():
    start, end = js_span(STORY, "red barn")
    prompt = build("entity-annotation", {"tools": [entity("o1", start, end, "red barn")]}, text=STORY)
    assert prompt.text == "red barn"
    assert prompt.notes == []


def test_an_end_inclusive_entity_is_read_whole_with_a_note():
    start, end = js_span(STORY, "red barn")
    prompt = build("entity-annotation", {"tools": [entity("o1", start, end - 1, "red barn")]}, text=STORY)
    assert prompt.text == "red barn"
    assert prompt.notes == [
        "Entity o1: its end offset counts the last character (end inclusive); read it so."
    ]


def test_offsets_shifted_by_crlf_line_ends_are_corrected_by_the_selection():
    text = "Title\r\nSubtitle\r\nThe prompt: a castle on a cliff"
    start, end = js_span(text, "a castle")
    shifted = (start - 2, end - 2)  # counted as if each \r\n were one character
    prompt = build("entity-annotation", {"tools": [entity("o1", *shifted, "a castle")]}, text=text)
    assert prompt.text == "a castle"
    assert prompt.notes == [
        (
            f"Entity o1: offsets {shifted[0]}-{shifted[1]} did not match its highlighted text; used the "
            f"highlighted text found at {start}-{end}."
        )
    ]


def test_the_occurrence_nearest_the_offsets_is_used_to_order_entities():
    text = "a dog here. a cat there. a dog again at the end"
    second_dog = js_span(text, "a dog", occurrence=1)
    cat = js_span(text, "a cat")
    answer = {
        "tools": [entity("o1", second_dog[0] + 3, second_dog[1] + 3, "a dog"), entity("o2", *cat, "a cat")]
    }
    prompt = build("entity-annotation", answer, text=text)
    assert prompt.parts == ["a cat", "a dog"]


def test_a_selection_absent_from_the_text_wins_over_offsets_that_disagree():
    start, end = js_span(STORY, "red barn")
    prompt = build("entity-annotation", {"tools": [entity("o1", start, end, "blue house")]}, text=STORY)
    assert prompt.text == "blue house"
    assert "used the highlighted text the hub recorded" in prompt.notes[0]


def test_offsets_outside_the_text_use_the_selection():
    prompt = build("entity-annotation", {"tools": [entity("o1", 500, 510, "red barn")]}, text=STORY)
    assert prompt.text == "red barn"
    assert prompt.notes and "found at" in prompt.notes[0]


def test_offsets_outside_the_text_without_selection_are_prompt_not_found():
    expected = rf"offsets 500-510, which do not fit the asset's text \({len(STORY)} characters\)"
    with pytest.raises(PromptNotFound, match=expected):
        build("entity-annotation", {"tools": [entity("o1", 500, 510)]}, text=STORY)


def test_overlapping_and_touching_entities_are_read_as_one_passage():
    text = "We see a red barn at sunset near the river."
    answer = {
        "tools": [
            entity("o1", *js_span(text, "a red barn")),
            entity("o2", *js_span(text, "at sunset")),
            entity("o3", *js_span(text, "barn at")),
        ]
    }
    prompt = build("entity-annotation", answer, text=text)
    assert prompt.text == "a red barn at sunset"
    assert prompt.notes == [
        "2 entities overlapping or touching the one before were read together with it as one passage."
    ]


def test_entities_in_the_write_format_objects_list_are_found_too():
    answer = {"objects": [entity("o1", *js_span(STORY, "tiny dog"))]}
    assert build("entity-annotation", answer, text=STORY).text == "tiny dog"


def test_offsets_sent_as_strings_are_understood():
    start, end = js_span(STORY, "tiny dog")
    answer = {"tools": [entity("o1", str(start), str(end))]}
    assert build("entity-annotation", answer, text=STORY).text == "tiny dog"


def test_the_text_is_fetched_once_for_entities_and_never_for_text_classifications():
    asset = CountingText(STORY)
    answer = {
        "tools": [entity("o1", *js_span(STORY, "red barn")), entity("o2", *js_span(STORY, "tiny dog"))],
        "classifications": [text_classification("typed prompt")],
    }
    build_prompt("entity-annotation", answer, [PROMPT_ENTITY], asset, LIMIT)
    assert asset.calls == 1
    build_prompt("text-annotation", answer, [PROMPT_TEXT], asset, LIMIT)
    assert asset.calls == 1


def test_the_text_is_not_fetched_when_no_entity_is_mapped():
    asset = CountingText(STORY)
    with pytest.raises(PromptNotFound):
        build_prompt("entity-annotation", {"tools": []}, [PROMPT_ENTITY], asset, LIMIT)
    assert asset.calls == 0


def test_unreadable_text_falls_back_to_selections_when_every_entity_has_one():
    def unreadable() -> str:
        raise AssetUnreadable("The asset's file is a PDF document, not plain text.")

    answer = {"tools": [entity("o2", 40, 48, "tiny dog"), entity("o1", 29, 37, "red barn")]}
    prompt = build_prompt("entity-annotation", answer, [PROMPT_ENTITY], unreadable, LIMIT)
    assert prompt.parts == ["red barn", "tiny dog"]
    assert "could not be read" in prompt.notes[0]

    answer["tools"].append(entity("o3", 50, 60))
    with pytest.raises(AssetUnreadable):
        build_prompt("entity-annotation", answer, [PROMPT_ENTITY], unreadable, LIMIT)


def test_without_any_text_source_selections_alone_are_used():
    answer = {"tools": [entity("o1", 29, 37, "red barn")]}
    assert build_prompt("entity-annotation", answer, [PROMPT_ENTITY], None, LIMIT).text == "red barn"
    with pytest.raises(AssetUnreadable):
        build_prompt("entity-annotation", {"tools": [entity("o1", 29, 37)]}, [PROMPT_ENTITY], None, LIMIT)


def test_entity_prompt_without_a_mapped_class_says_how_to_map_it():
    with pytest.raises(PromptNotFound) as caught:
        build("entity-annotation", {"tools": [entity("o1", 0, 4)]}, ids=(), text=STORY)
    assert "Map the plugin's Prompt class to your entity class in the plugin settings (Class Mapping)" in (
        caught.value.message
    )


def test_entity_prompt_mapped_but_absent_says_where_it_looked():
    answer = {"tools": [entity("o1", 0, 4, schema_id=OTHER), entity("o2", 5, 9, schema_id=OTHER)]}
    with pytest.raises(PromptNotFound) as caught:
        build("entity-annotation", answer, ids=(PROMPT_ENTITY,), text=STORY)
    message = caught.value.message
    assert PROMPT_ENTITY in message
    assert "The task has 2 entities and 2 annotations, none of the mapped class" in message


def test_a_mapped_class_without_ner_offsets_is_reported():
    answer = {"tools": [{"schemaId": PROMPT_ENTITY, "objectId": "o1", "bounding-box": {}}]}
    with pytest.raises(PromptNotFound, match="1 of the mapped class, none with highlighted text"):
        build("entity-annotation", answer, ids=(PROMPT_ENTITY,), text=STORY)


def test_a_task_without_annotations_is_prompt_not_found():
    with pytest.raises(PromptNotFound, match="0 entities"):
        build("entity-annotation", None, ids=(PROMPT_ENTITY,), text=STORY)


def test_an_entity_of_only_whitespace_gives_an_empty_prompt_error():
    text = "word     word"
    with pytest.raises(PromptNotFound, match="prompt is empty"):
        build("entity-annotation", {"tools": [entity("o1", 4, 9)]}, text=text)


def test_an_entity_slice_through_an_emoji_drops_the_half_character():
    text = "x😀 dragon"
    answer = {"tools": [entity("o1", 2, 10)]}  # starts on the emoji's second code unit
    assert build("entity-annotation", answer, text=text).text == "dragon"


# ---- text-annotation -----------------------------------------------------------------------------


def test_typed_text_is_read_top_level_first_then_nested_in_annotations_recursively():
    answer = {
        "tools": [
            entity(
                "o1",
                0,
                4,
                schema_id=OTHER,
                classifications=[
                    text_classification("a lighthouse", nested=[text_classification("in a storm")]),
                ],
            ),
        ],
        "classifications": [
            text_classification("Oil painting"),
            {
                "schemaId": OTHER,
                "tool": "radio",
                "answer": "opt-1",
                "classifications": [text_classification("dramatic light")],
            },
        ],
        "relations": [],
    }
    prompt = build("text-annotation", answer, ids=(PROMPT_TEXT,))
    assert prompt.parts == ["Oil painting", "dramatic light", "a lighthouse", "in a storm"]
    assert prompt.text == "Oil painting. dramatic light. a lighthouse. in a storm"
    assert prompt.source == "text-annotation"


def test_empty_typed_answers_are_skipped_with_a_note():
    answer = {"classifications": [text_classification("   "), text_classification("A fox\n in snow ")]}
    prompt = build("text-annotation", answer, ids=(PROMPT_TEXT,))
    assert prompt.text == "A fox in snow"
    assert prompt.notes == ["1 empty Prompt text classification(s) were skipped."]


def test_text_classifications_of_other_classes_are_ignored():
    answer = {
        "classifications": [text_classification("not this", schema_id=OTHER), text_classification("this")]
    }
    assert build("text-annotation", answer, ids=(PROMPT_TEXT,)).text == "this"


def test_text_prompt_without_a_mapped_class_says_how_to_map_it():
    with pytest.raises(PromptNotFound) as caught:
        build("text-annotation", {"classifications": [text_classification("x")]}, ids=())
    expected = (
        "Map the plugin's Prompt class to your text classification in the plugin settings (Class Mapping)"
    )
    assert expected in caught.value.message


def test_text_prompt_mapped_but_absent_says_where_it_looked():
    answer = {
        "classifications": [text_classification("x", schema_id=OTHER)],
        "tools": [entity("o1", 0, 4, schema_id=OTHER, classifications=[text_classification("y", OTHER)])],
    }
    with pytest.raises(PromptNotFound) as caught:
        build("text-annotation", answer, ids=(PROMPT_TEXT,))
    message = caught.value.message
    assert PROMPT_TEXT in message
    assert "The task has 1 classification(s) and 1 nested inside annotations" in message
    assert "none of the mapped class" in message


def test_text_prompt_all_empty_says_so():
    with pytest.raises(PromptNotFound, match="1 of the mapped class, 1 of them empty"):
        build("text-annotation", {"classifications": [text_classification("")]}, ids=(PROMPT_TEXT,))


def test_a_prompt_class_mapped_to_a_radio_classification_is_explained():
    answer = {"classifications": [text_classification("opt-1", tool="radio")]}
    with pytest.raises(PromptNotFound, match="the mapped class is a radio classification, not text"):
        build("text-annotation", answer, ids=(PROMPT_TEXT,))


def test_text_prompt_on_a_task_without_answer():
    with pytest.raises(PromptNotFound, match="0 classification"):
        build("text-annotation", None, ids=(PROMPT_TEXT,))


def test_a_long_typed_prompt_is_shortened_to_the_limit():
    words = "word " * 300
    prompt = build("text-annotation", {"classifications": [text_classification(words)]}, max_chars=1000)
    assert len(prompt.text) <= 1000
    assert prompt.text.endswith("word") and prompt.truncated
    assert prompt.original_length == 1499


def test_an_unknown_source_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown prompt source"):
        build("everything", {}, text="x")


# ---- shortening and slicing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("short", 10, "short"),
        ("exactly ten", 11, "exactly ten"),
        ("hello world", 5, "hello"),
        ("hello world", 6, "hello"),
        ("hello world", 8, "hello"),
        ("supercalifragilistic", 5, "super"),
        ("a supercalifragilistic", 5, "a"),
    ],
)
def test_shortening_cuts_at_the_last_word_boundary(text, limit, expected):
    assert shorten_at_word_boundary(text, limit) == expected


def test_slicing_follows_javascript_for_astral_characters():
    text = "a😀b"
    assert utf16_length(text) == 4
    assert slice_utf16(text, 0, 1) == "a"
    assert slice_utf16(text, 1, 3) == "😀"
    assert slice_utf16(text, 3, 4) == "b"
    assert slice_utf16(text, 1, 2) == "\ud83d"  # what JavaScript gives: a lone high surrogate
    assert slice_utf16(text, 3, 99) == "b"
    assert slice_utf16(text, 3, 1) == ""


def test_the_nearest_of_many_occurrences_is_found_past_astral_characters():
    text = "😀 fox. " * 2000  # every "fox" sits 8 JavaScript units after the previous one
    target = 8 * 1234 + 3
    answer = {
        "tools": [entity("o1", target + 1, target + 4, "fox"), entity("o2", 8 * 1235 + 3, 8 * 1235 + 6)]
    }
    prompt = build("entity-annotation", answer, text=text)
    assert prompt.parts == ["fox", "fox"]
    assert f"found at {target}-{target + 3}" in prompt.notes[0]


def test_class_ids_accept_already_parsed_mapping_entries():
    from pydantic import BaseModel, Field

    class Mapping(BaseModel):
        schema_id: str = Field(alias="schemaId")
        model_class: str = Field(alias="modelClass")

    entries = [Mapping(schemaId="a", modelClass="Prompt"), Mapping(schemaId="b", modelClass="Other")]
    assert prompt_class_ids(entries) == ["a"]
