"""The model catalogue: which models run on a given day, what legacy names turn into, what each accepts."""

from datetime import date

import pytest
from dalle_plugin.domain.errors import InvalidConfig
from dalle_plugin.domain.models_catalog import (
    CATALOG,
    FlexibleSizes,
    ModelFamily,
    check_image_options,
    live_models,
    resolve_model,
)

TODAY = date(2026, 11, 20)
SUCCESSORS = {"dall-e-2": "gpt-image-2", "dall-e-3": "gpt-image-2"}


# ---- the catalogue -------------------------------------------------------------------------------


def test_catalogue_knows_every_model_with_its_prompt_limit():
    limits = {name: spec.max_prompt_chars for name, spec in CATALOG.items()}
    assert limits["dall-e-2"] == 1000
    assert limits["dall-e-3"] == 4000
    for name in (
        "gpt-image-1",
        "gpt-image-1-mini",
        "gpt-image-1.5",
        "gpt-image-2",
        "gpt-image-2-2026-04-21",
        "gpt-image-2.5-sunburst",
        "gpt-image-2.5-flare",
    ):
        assert limits[name] == 32000


def test_dall_e_sizes_and_qualities_are_the_documented_ones():
    assert CATALOG["dall-e-2"].size_rule.choices() == ("256x256", "512x512", "1024x1024")
    assert CATALOG["dall-e-3"].size_rule.choices() == ("1024x1024", "1792x1024", "1024x1792")
    assert CATALOG["dall-e-3"].qualities == ("standard", "hd")
    assert CATALOG["gpt-image-2"].qualities == ("auto", "low", "medium", "high")


@pytest.mark.parametrize(
    ("name", "last_live_day", "first_retired_day"),
    [
        ("dall-e-2", date(2026, 5, 11), date(2026, 5, 12)),
        ("dall-e-3", date(2026, 5, 11), date(2026, 5, 12)),
        ("gpt-image-1", date(2026, 10, 22), date(2026, 10, 23)),
        ("gpt-image-1-mini", date(2026, 11, 30), date(2026, 12, 1)),
        ("gpt-image-1.5", date(2026, 11, 30), date(2026, 12, 1)),
    ],
)
def test_a_model_is_live_until_its_shutdown_day(name, last_live_day, first_retired_day):
    assert CATALOG[name].is_live(last_live_day)
    assert not CATALOG[name].is_live(first_retired_day)


def test_live_models_today_are_gpt_image_2_and_the_models_retiring_next_month():
    live = live_models(TODAY)
    newest = {"gpt-image-2", "gpt-image-2-2026-04-21", "gpt-image-2.5-sunburst", "gpt-image-2.5-flare"}
    assert newest <= set(live)
    assert "gpt-image-1-mini" in live
    assert not {"dall-e-2", "dall-e-3", "gpt-image-1"} & set(live)
    assert "gpt-image-1-mini" not in live_models(date(2026, 12, 1))


# ---- resolve_model -------------------------------------------------------------------------------


def test_a_live_model_runs_as_named():
    resolved = resolve_model("  GPT-Image-2 ", SUCCESSORS, TODAY)
    assert (resolved.requested, resolved.actual, resolved.substituted, resolved.note) == (
        "gpt-image-2",
        "gpt-image-2",
        False,
        None,
    )
    assert resolved.spec.family is ModelFamily.GPT_IMAGE_2


def test_a_retired_legacy_name_runs_its_successor_and_says_so():
    resolved = resolve_model("dall-e-2", SUCCESSORS, TODAY)
    assert resolved.actual == "gpt-image-2"
    assert resolved.substituted
    assert resolved.spec.name == "gpt-image-2"
    assert resolved.note == "dall-e-2 was retired by OpenAI on 2026-05-12; gpt-image-2 ran instead"


def test_before_its_shutdown_a_legacy_model_runs_itself_even_when_a_successor_is_configured():
    resolved = resolve_model("dall-e-2", SUCCESSORS, date(2026, 5, 11))
    assert resolved.actual == "dall-e-2" and not resolved.substituted


def test_gpt_image_1_mini_is_live_before_december_and_substituted_from_then():
    successors = {"gpt-image-1-mini": "gpt-image-2"}
    assert not resolve_model("gpt-image-1-mini", successors, date(2026, 11, 30)).substituted
    after = resolve_model("gpt-image-1-mini", successors, date(2026, 12, 1))
    assert after.actual == "gpt-image-2"
    assert after.note == "gpt-image-1-mini was retired by OpenAI on 2026-12-01; gpt-image-2 ran instead"


def test_a_retired_model_without_successor_names_the_live_models():
    with pytest.raises(InvalidConfig) as caught:
        resolve_model("dall-e-3", {}, TODAY)
    message = caught.value.message
    assert caught.value.field == "model_name"
    assert "dall-e-3 was retired by OpenAI on 2026-05-12" in message
    assert "gpt-image-2" in caught.value.allowed
    assert "dall-e-2" not in caught.value.allowed and "gpt-image-1," not in caught.value.allowed + ","


def test_successor_chains_are_followed_to_a_live_model():
    successors = {"dall-e-3": "gpt-image-1", "gpt-image-1": "gpt-image-2"}
    resolved = resolve_model("dall-e-3", successors, TODAY)
    assert resolved.actual == "gpt-image-2"
    assert resolved.note == "dall-e-3 was retired by OpenAI on 2026-05-12; gpt-image-2 ran instead"


def test_a_successor_that_is_itself_retired_without_a_further_successor_is_refused():
    with pytest.raises(InvalidConfig, match="dall-e-3 was retired"):
        resolve_model("dall-e-3", {"dall-e-3": "gpt-image-1"}, TODAY)


def test_a_successor_cycle_is_refused_instead_of_looping():
    with pytest.raises(InvalidConfig):
        resolve_model("dall-e-2", {"dall-e-2": "dall-e-3", "dall-e-3": "dall-e-2"}, TODAY)


def test_a_successor_that_is_not_an_image_model_is_reported():
    with pytest.raises(InvalidConfig, match="maps dall-e-2 to 'gpt-4o'"):
        resolve_model("dall-e-2", {"dall-e-2": "gpt-4o"}, TODAY)


def test_successor_names_are_matched_case_insensitively():
    assert resolve_model("DALL-E-2", {"Dall-E-2": " GPT-IMAGE-2 "}, TODAY).actual == "gpt-image-2"


def test_an_unknown_model_gets_a_suggestion_and_the_usable_names():
    with pytest.raises(InvalidConfig) as caught:
        resolve_model("gpt-image2", SUCCESSORS, TODAY)
    assert "Did you mean 'gpt-image-2'?" in caught.value.message
    assert "dall-e-2" in caught.value.allowed  # usable through the deployment's mapping


def test_an_api_key_typed_as_model_name_is_not_echoed():
    key = "sk-proj-ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    with pytest.raises(InvalidConfig) as caught:
        resolve_model(key, SUCCESSORS, TODAY)
    assert "ABCDEFGHIJ" not in caught.value.message
    assert "ABCDEFGHIJ" not in repr(caught.value.given)


# ---- sizes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [
        "1024x1024",
        "1536x1024",
        "1024x1536",
        "1792x1024",
        "1024x1792",
        "3840x2160",
        "2160x3840",
        "2048x2048",
        "1024x3072",
        "2160x2160",
        "1024x640",
        "auto",
    ],
)
def test_gpt_image_2_accepts_sizes_within_its_rule(size):
    assert FlexibleSizes().problem(size) is None


@pytest.mark.parametrize(
    ("size", "why"),
    [
        ("1000x1000", "multiples of 16"),
        ("4096x1536", "long edge must be at most 3840"),
        ("3072x1008", "3 times the short edge"),
        ("512x512", "at least 655,360 pixels"),
        ("256x256", "at least 655,360 pixels"),
        ("3840x2176", "short edge must be at most 2160"),
        ("2880x2880", "short edge must be at most 2160"),
        ("0x1024", "above 0"),
        ("big", "WIDTHxHEIGHT"),
    ],
)
def test_gpt_image_2_refuses_sizes_outside_its_rule_and_says_why(size, why):
    assert why in FlexibleSizes().problem(size)


def _resolved(name, today=TODAY, successors=SUCCESSORS):
    return resolve_model(name, successors, today)


@pytest.mark.parametrize("legacy_size", ["256x256", "512x512"])
def test_small_dall_e_2_presets_map_to_1024_square_on_gpt_image_2_with_a_note(legacy_size):
    options = check_image_options(_resolved("dall-e-2"), legacy_size, None)
    assert options.size == "1024x1024"
    assert len(options.notes) == 1
    assert f"image_size {legacy_size} is a dall-e-2 size" in options.notes[0]
    assert "1024x1024 was used instead" in options.notes[0]


@pytest.mark.parametrize("legacy_size", ["1024x1024", "1792x1024", "1024x1792"])
def test_dall_e_3_presets_pass_through_on_gpt_image_2(legacy_size):
    options = check_image_options(_resolved("dall-e-3"), legacy_size, None)
    assert options.size == legacy_size
    assert options.notes == ()


@pytest.mark.parametrize(
    ("legacy_size", "mapped"),
    [("1792x1024", "1536x1024"), ("1024x1792", "1024x1536"), ("1024x1024", "1024x1024")],
)
def test_dall_e_3_presets_map_to_the_nearest_gpt_image_1_size(legacy_size, mapped):
    resolved = _resolved("dall-e-3", successors={"dall-e-3": "gpt-image-1-mini"})
    options = check_image_options(resolved, legacy_size, None)
    assert options.size == mapped
    assert bool(options.notes) == (legacy_size != mapped)


def test_dall_e_2_small_preset_maps_to_the_square_gpt_image_1_size():
    resolved = _resolved("dall-e-2", successors={"dall-e-2": "gpt-image-1.5"})
    assert check_image_options(resolved, "512x512", None).size == "1024x1024"


def test_a_size_neither_model_accepts_is_refused_with_the_running_models_sizes():
    with pytest.raises(InvalidConfig) as caught:
        check_image_options(_resolved("dall-e-2"), "1000x700", None)
    problem = caught.value
    assert problem.field == "image_size"
    assert "gpt-image-2 cannot make 1000x700" in problem.message
    assert "multiples of 16" in problem.allowed
    assert "dall-e-2 was retired" in problem.message  # says why gpt-image-2 is the one that matters


def test_a_live_model_gets_no_legacy_mapping_for_a_size_it_refuses():
    with pytest.raises(InvalidConfig) as caught:
        check_image_options(_resolved("gpt-image-2"), "512x512", None)
    assert "The closest allowed size is 1024x1024." in caught.value.message


def test_gpt_image_1_family_lists_its_fixed_sizes_when_refusing():
    with pytest.raises(InvalidConfig) as caught:
        check_image_options(_resolved("gpt-image-1-mini"), "1792x1024", None)
    assert caught.value.allowed == "1024x1024, 1536x1024, 1024x1536, auto"
    assert "closest allowed size is 1536x1024" in caught.value.message


@pytest.mark.parametrize("written", [" 1024X1024 ", "1024 x 1024", "1024×1024"])
def test_size_spelling_is_forgiven(written):
    assert check_image_options(_resolved("gpt-image-2"), written, None).size == "1024x1024"


def test_no_size_means_the_default_square():
    assert check_image_options(_resolved("gpt-image-2"), None, None).size == "1024x1024"


def test_dall_e_2_runs_its_own_sizes_before_retirement():
    resolved = _resolved("dall-e-2", today=date(2026, 5, 1))
    assert check_image_options(resolved, "512x512", None).size == "512x512"
    with pytest.raises(InvalidConfig):
        check_image_options(resolved, "1792x1024", None)


# ---- quality -------------------------------------------------------------------------------------


def test_no_quality_means_the_running_models_default():
    assert check_image_options(_resolved("dall-e-2"), None, None).quality == "auto"
    before_retirement = _resolved("dall-e-3", today=date(2026, 1, 1))
    assert check_image_options(before_retirement, None, None).quality == "standard"


@pytest.mark.parametrize(("legacy", "modern"), [("standard", "medium"), ("hd", "high"), ("HD", "high")])
def test_dall_e_quality_words_translate_on_gpt_image_models(legacy, modern):
    options = check_image_options(_resolved("dall-e-3"), "1024x1024", legacy)
    assert options.quality == modern
    note = f"quality '{legacy.lower()}' is a DALL-E setting; gpt-image-2 used '{modern}' instead"
    assert options.notes == (note,)


def test_gpt_quality_words_pass_through():
    assert check_image_options(_resolved("gpt-image-2"), "1024x1024", "low").quality == "low"


def test_unknown_quality_is_refused_with_a_suggestion():
    with pytest.raises(InvalidConfig) as caught:
        check_image_options(_resolved("gpt-image-2"), "1024x1024", "hihg")
    assert caught.value.field == "quality"
    assert caught.value.allowed == "auto, low, medium, high"
    assert "Did you mean 'high'?" in caught.value.message


def test_dall_e_2_before_retirement_has_only_standard_quality():
    resolved = _resolved("dall-e-2", today=date(2026, 5, 1))
    assert check_image_options(resolved, "512x512", "standard").quality == "standard"
    with pytest.raises(InvalidConfig):
        check_image_options(resolved, "512x512", "hd")


def test_the_pixel_budget_holds_even_where_the_short_edge_cap_is_relaxed():
    relaxed = FlexibleSizes(max_short_edge=3840)
    assert relaxed.problem("2880x2880") is None  # exactly 8,294,400 pixels
    assert "at most 8,294,400 pixels" in relaxed.problem("2880x2896")
