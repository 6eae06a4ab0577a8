"""The Config JSON: defaults as the hub documents them, every field's messages, and the key never leaking."""

import json
from datetime import date

import pytest
from dalle_plugin.domain.config import (
    ALLOWED_KEYS,
    PluginConfig,
    mask_secret,
    parse_config_json,
    validate_run_options,
)
from dalle_plugin.domain.errors import InvalidConfig, InvalidRequest, MalformedConfig

TODAY = date(2026, 11, 20)
SUCCESSORS = {"dall-e-2": "gpt-image-2", "dall-e-3": "gpt-image-2"}
KEY = "sk-proj-Zq8vN3xW7tY2uR5eA1sD4fG6hJ9kL0mB"
KEY_SECRET_PART = "Zq8vN3xW7tY2uR5eA1sD4"


def _error(raw) -> InvalidConfig:
    with pytest.raises(InvalidConfig) as caught:
        parse_config_json(raw)
    return caught.value


# ---- defaults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, "", "   ", "{}", " { } ", {}, "null"])
def test_nothing_given_means_the_hubs_documented_defaults(raw):
    config = parse_config_json(raw)
    assert config.openai_api_key.get_secret_value() == "default"
    assert config.uses_default_key
    assert config.model_name == "dall-e-2"
    assert config.get_prompt_from == "text-annotation"
    assert config.image_size == "1024x1024"
    assert config.quality is None


def test_the_hubs_default_preset_text_parses_to_the_defaults():
    preset = (
        '{\n  "openai_api_key": "default",\n  "model_name": "dall-e-2",\n'
        '  "get_prompt_from": "text-annotation",\n  "image_size": "1024x1024"\n}'
    )
    assert parse_config_json(preset) == parse_config_json(None)


def test_fields_left_out_keep_their_defaults():
    config = parse_config_json('{"get_prompt_from": "full-text-asset"}')
    assert config.get_prompt_from == "full-text-asset"
    assert config.model_name == "dall-e-2" and config.image_size == "1024x1024" and config.uses_default_key


def test_a_null_value_counts_as_left_out():
    config = parse_config_json('{"model_name": null, "quality": null, "openai_api_key": null}')
    assert config.model_name == "dall-e-2" and config.quality is None and config.uses_default_key


def test_an_object_is_accepted_as_well_as_a_string():
    assert parse_config_json({"image_size": "512x512"}).image_size == "512x512"


def test_json_encoded_twice_is_unwrapped():
    assert parse_config_json(json.dumps('{"model_name": "dall-e-3"}')).model_name == "dall-e-3"


# ---- not JSON, not an object ---------------------------------------------------------------------


def test_text_that_is_not_json_is_refused_with_its_position():
    problem = _error('{"model_name": "dall-e-3" "image_size": "512x512"}')
    assert isinstance(problem, MalformedConfig)
    assert "Config JSON is not valid JSON" in problem.message
    assert "line 1, column 27" in problem.message


def test_a_position_on_a_later_line_is_reported_by_line():
    problem = _error('{\n  "model_name": "dall-e-3",\n  "image_size": 512x512\n}')
    assert "line 3" in problem.message


def test_missing_braces_get_their_own_hint():
    problem = _error('"model_name": "dall-e-3", "image_size": "512x512"')
    assert "The braces are missing" in problem.message


def test_single_quotes_get_their_own_hint():
    assert "double quotes" in _error("{'model_name': 'dall-e-3'}").message


def test_a_trailing_comma_gets_its_own_hint():
    assert "Remove the comma" in _error('{"model_name": "dall-e-3",}').message


@pytest.mark.parametrize(
    ("raw", "kind"),
    [("[1, 2]", "list"), ("42", "number"), ('"hello"', "string"), ("true", "boolean"), (["a"], "list")],
)
def test_json_that_is_not_an_object_is_refused(raw, kind):
    problem = _error(raw)
    assert isinstance(problem, MalformedConfig)
    assert f"got a JSON {kind}" in problem.message


def test_a_field_written_twice_is_refused():
    assert "names 'model_name' more than once" in _error('{"model_name": "a", "model_name": "b"}').message


def test_config_errors_are_invalid_requests_with_the_config_reason():
    problem = _error("[]")
    assert isinstance(problem, InvalidRequest)
    assert problem.reason == "invalid_config"


# ---- unknown keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "meant"),
    [
        ("modle_name", "model_name"),
        ("image-size", "image_size"),
        ("Model_Name", "model_name"),
        ("size", "image_size"),
        ("model", "model_name"),
        ("api_key", "openai_api_key"),
        ("get_prompt_form", "get_prompt_from"),
        ("qualty", "quality"),
    ],
)
def test_an_unknown_key_is_named_with_a_suggestion_and_the_allowed_keys(key, meant):
    problem = _error({key: "x"})
    assert isinstance(problem, MalformedConfig)
    assert f"unknown field '{key}'" in problem.message
    assert f"Did you mean '{meant}'?" in problem.message
    for allowed in ALLOWED_KEYS:
        assert allowed in problem.message


def test_an_unknown_key_without_a_likely_meaning_gets_no_guess():
    problem = _error('{"colour": "blue"}')
    assert "unknown field 'colour'" in problem.message
    assert "Did you mean" not in problem.message


def test_allowed_keys_are_exactly_the_documented_ones_plus_quality_and_the_options_beyond_them():
    assert ALLOWED_KEYS == (
        "openai_api_key",
        "model_name",
        "get_prompt_from",
        "image_size",
        "quality",
        "prompt_template",
        "images_per_task",
        "output_format",
        "output_compression",
        "background",
        "max_cost_usd",
    )


# ---- wrong types and values, field by field ------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "field", "shown"),
    [
        ({"model_name": 2}, "model_name", "got 2;"),
        ({"model_name": ""}, "model_name", "got '';"),
        ({"image_size": 512}, "image_size", "got 512;"),
        ({"image_size": [512, 512]}, "image_size", "got 'a JSON list';"),
        ({"image_size": "big"}, "image_size", "got 'big';"),
        ({"image_size": "512"}, "image_size", "got '512';"),
        ({"get_prompt_from": "entity"}, "get_prompt_from", "got 'entity';"),
        ({"get_prompt_from": True}, "get_prompt_from", "got True;"),
        ({"quality": 5}, "quality", "got 5;"),
        ({"quality": ""}, "quality", "got '';"),
        ({"openai_api_key": ""}, "openai_api_key", "got '';"),
        ({"openai_api_key": {"key": "x"}}, "openai_api_key", "got 'a JSON object';"),
    ],
)
def test_a_wrong_value_names_the_field_what_was_given_and_what_is_allowed(settings, field, shown):
    problem = _error(settings)
    assert problem.field == field
    assert problem.message.startswith(f"Config JSON field '{field}': {shown} allowed: ")
    assert problem.allowed


def test_get_prompt_from_lists_the_three_sources_and_guesses():
    problem = _error({"get_prompt_from": "entity-anotation"})
    assert problem.allowed == "text-annotation, entity-annotation, full-text-asset"
    assert "Did you mean 'entity-annotation'?" in problem.message


@pytest.mark.parametrize(
    ("written", "meant"),
    [("Entity_Annotation", "entity-annotation"), (" full text asset ", "full-text-asset")],
)
def test_get_prompt_from_spelling_is_forgiven(written, meant):
    assert parse_config_json({"get_prompt_from": written}).get_prompt_from == meant


def test_values_are_normalised():
    config = parse_config_json({"model_name": " DALL-E-3 ", "image_size": "1792X1024", "quality": " HD "})
    assert (config.model_name, config.image_size, config.quality) == ("dall-e-3", "1792x1024", "hd")


def test_constructing_the_model_directly_reports_in_the_same_words():
    with pytest.raises(InvalidConfig, match="Config JSON field 'image_size'"):
        PluginConfig(image_size="huge")


# ---- the API key ---------------------------------------------------------------------------------


@pytest.mark.parametrize("written", ["default", "DEFAULT", " Default "])
def test_default_means_the_shared_key(written):
    assert parse_config_json({"openai_api_key": written}).uses_default_key


def test_an_own_key_is_kept_secret_and_shown_masked():
    config = parse_config_json({"openai_api_key": f"  {KEY}  "})
    assert not config.uses_default_key
    assert config.openai_api_key.get_secret_value() == KEY
    assert config.masked_key == "sk-...L0mB"
    for shown in (repr(config), str(config), config.model_dump_json(), str(config.model_dump())):
        assert KEY_SECRET_PART not in shown


def test_mask_secret_shows_at_most_the_prefix_and_last_four():
    assert mask_secret(KEY) == "sk-...L0mB"
    assert mask_secret("short-key") == "***"


@pytest.mark.parametrize(
    "raw",
    [
        {"openai_api_key": f"Bearer {KEY}"},
        {"openai_api_key": KEY + "é"},
        {"model_name": KEY},
        {"image_size": KEY},
        {"get_prompt_from": KEY},
        {"quality": KEY},
        {KEY: "x"},
        '{"openai_api_key": "' + KEY + '" "model_name": "dall-e-3"}',
        "{'openai_api_key': '" + KEY + "'}",
        '{"openai_api_key": "' + KEY + '", "openai_api_key": "' + KEY + '"}',
    ],
)
def test_no_message_ever_carries_the_key(raw):
    def parse_and_validate() -> None:
        validate_run_options(parse_config_json(raw), SUCCESSORS, TODAY)

    with pytest.raises(InvalidConfig) as caught:
        parse_and_validate()
    problem = caught.value
    assert KEY_SECRET_PART not in problem.message
    assert KEY_SECRET_PART not in str(problem)
    assert KEY_SECRET_PART not in repr(problem.given)
    assert KEY_SECRET_PART not in str(problem.field)


def test_a_key_with_spaces_inside_is_refused_with_a_masked_echo():
    problem = _error({"openai_api_key": f"Bearer {KEY}"})
    assert problem.field == "openai_api_key"
    assert "without 'Bearer'" in problem.message
    assert "...L0mB" in problem.message


# ---- validate_run_options ------------------------------------------------------------------------


def test_the_default_preset_runs_gpt_image_2_and_says_why():
    options = validate_run_options(parse_config_json(None), SUCCESSORS, TODAY)
    assert options.model.requested == "dall-e-2"
    assert options.model.actual == "gpt-image-2"
    assert options.image.size == "1024x1024"
    assert options.image.quality == "auto"
    assert options.max_prompt_chars == 32000
    assert options.get_prompt_from == "text-annotation"
    assert options.uses_default_key
    assert options.notes == ("dall-e-2 was retired by OpenAI on 2026-05-12; gpt-image-2 ran instead",)


def test_the_seeds_recommended_512_with_a_dall_e_2_preset_works():
    options = validate_run_options(parse_config_json('{"image_size": "512x512"}'), SUCCESSORS, TODAY)
    assert options.model.actual == "gpt-image-2"
    assert options.image.size == "1024x1024"
    assert any("512x512 is a dall-e-2 size" in note for note in options.notes)


def test_dall_e_3_hd_wide_preset_maps_quality_and_keeps_the_size():
    config = parse_config_json({"model_name": "dall-e-3", "image_size": "1792x1024", "quality": "hd"})
    options = validate_run_options(config, SUCCESSORS, TODAY)
    assert (options.image.size, options.image.quality) == ("1792x1024", "high")
    assert len(options.notes) == 2


def test_a_size_the_running_model_refuses_lists_what_it_allows():
    config = parse_config_json({"model_name": "gpt-image-1-mini", "image_size": "1792x1024"})
    with pytest.raises(InvalidConfig) as caught:
        validate_run_options(config, SUCCESSORS, TODAY)
    assert caught.value.field == "image_size"
    assert caught.value.allowed == "1024x1024, 1536x1024, 1024x1536, auto"


def test_a_retired_model_the_deployment_does_not_map_is_refused():
    with pytest.raises(InvalidConfig) as caught:
        validate_run_options(parse_config_json(None), {}, TODAY)
    assert caught.value.field == "model_name"
    assert "gpt-image-2" in caught.value.allowed


def test_an_unknown_model_is_refused_at_validation_with_a_suggestion():
    with pytest.raises(InvalidConfig, match="Did you mean 'dall-e-3'"):
        validate_run_options(parse_config_json({"model_name": "dalle-3"}), SUCCESSORS, TODAY)


def test_a_wrong_quality_for_the_running_model_is_refused():
    with pytest.raises(InvalidConfig) as caught:
        validate_run_options(parse_config_json({"quality": "ultra"}), SUCCESSORS, TODAY)
    assert caught.value.field == "quality"


def test_before_retirement_dall_e_2_runs_itself_with_its_own_limits():
    config = parse_config_json('{"image_size": "512x512"}')
    options = validate_run_options(config, SUCCESSORS, date(2026, 5, 1))
    assert options.model.actual == "dall-e-2"
    assert options.image.size == "512x512"
    assert options.max_prompt_chars == 1000
    assert options.notes == ()


def test_an_own_key_is_reported_as_not_default():
    options = validate_run_options(parse_config_json({"openai_api_key": KEY}), SUCCESSORS, TODAY)
    assert not options.uses_default_key
    assert KEY_SECRET_PART not in repr(options)


# ---- prompt_template, images_per_task, output format, spending limit ----------------------------


def _options(raw: dict):
    return validate_run_options(parse_config_json(json.dumps(raw)), SUCCESSORS, TODAY)


def _refusal(raw: dict) -> InvalidConfig:
    with pytest.raises(InvalidConfig) as caught:
        _options(raw)
    return caught.value


def test_the_new_options_have_defaults_that_change_nothing():
    options = _options({})
    assert options.output.images_per_request == 1 and options.output.output_format == "png"
    assert options.output.output_compression is None and options.output.background is None
    assert options.prompt_template is None and options.max_cost_usd is None


def test_a_full_set_of_new_options_is_accepted():
    options = _options(
        {
            "model_name": "gpt-image-2",
            "prompt_template": "Studio photo of {prompt}, {{soft}} light",
            "images_per_task": 3,
            "output_format": "JPG",
            "output_compression": 70,
            "background": "opaque",
            "max_cost_usd": 1,
        }
    )
    assert options.prompt_template == "Studio photo of {prompt}, {{soft}} light"
    assert options.output.images_per_request == 3 and options.output.output_format == "jpeg"
    assert options.output.output_compression == 70 and options.output.background == "opaque"
    assert options.max_cost_usd == 1.0 and options.cost_per_image_usd > 0


@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ({"prompt_template": "A photo"}, "prompt_template", "no {prompt} placeholder"),
        (
            {"prompt_template": "A {style} photo of {prompt}"},
            "prompt_template",
            "Unknown placeholder {style}",
        ),
        ({"prompt_template": "A {} photo of {prompt}"}, "prompt_template", "Unknown placeholder {}"),
        ({"prompt_template": "A {prompt.upper} photo"}, "prompt_template", "Unknown placeholder"),
        ({"prompt_template": "A {prompt:>9} photo"}, "prompt_template", "Unknown placeholder"),
        ({"prompt_template": "A {prompt"}, "prompt_template", "{{ or }} for a literal brace"),
        ({"prompt_template": "A } {prompt}"}, "prompt_template", "{{ or }} for a literal brace"),
        ({"prompt_template": "   "}, "prompt_template", "empty"),
        ({"prompt_template": 3}, "prompt_template", "JSON string"),
        ({"prompt_template": "x" * 4001 + "{prompt}"}, "prompt_template", "at most 4000"),
        ({"images_per_task": 0}, "images_per_task", "1 to 4"),
        ({"images_per_task": 5}, "images_per_task", "1 to 4"),
        ({"images_per_task": 1.5}, "images_per_task", "whole number"),
        ({"images_per_task": "2"}, "images_per_task", "without quotes"),
        ({"images_per_task": True}, "images_per_task", "1 to 4"),
        ({"output_format": "gif"}, "output_format", "png, jpeg, webp"),
        ({"output_format": "webp"}, "output_format", "Ango Hub attaches only JPG or PNG"),
        ({"output_format": "jepg"}, "output_format", "Did you mean 'jpeg'?"),
        ({"output_compression": 50}, "output_compression", "output_format is png (the default)"),
        (
            {"output_format": "png", "output_compression": 50},
            "output_compression",
            "only with output_format jpeg",
        ),
        ({"output_format": "jpeg", "output_compression": 101}, "output_compression", "0 to 100"),
        ({"output_format": "jpeg", "output_compression": -1}, "output_compression", "0 to 100"),
        ({"output_format": "jpeg", "output_compression": "high"}, "output_compression", "without quotes"),
        ({"background": "clear"}, "background", "auto, opaque, transparent"),
        ({"background": "transparent", "output_format": "jpeg"}, "background", "jpeg has no transparency"),
        ({"max_cost_usd": 0}, "max_cost_usd", "above 0"),
        ({"max_cost_usd": -2}, "max_cost_usd", "above 0"),
        ({"max_cost_usd": "$5"}, "max_cost_usd", "without quotes or currency sign"),
        ({"max_cost_usd": 1e9}, "max_cost_usd", "at most 10,000"),
        ({"max_cost_usd": False}, "max_cost_usd", "above 0"),
    ],
)
def test_each_new_option_refuses_a_wrong_value_with_a_sentence(raw, field, words):
    problem = _refusal(raw)
    assert problem.field == field
    assert problem.message.startswith(f"Config JSON field '{field}': got ")
    assert words in problem.message and "allowed:" in problem.message


def test_a_spending_limit_below_one_tasks_images_is_refused_at_once():
    problem = _refusal(
        {"model_name": "gpt-image-2", "quality": "high", "images_per_task": 2, "max_cost_usd": 0.2}
    )
    assert (
        problem.field == "max_cost_usd" and "2 image(s)" in problem.message and "$0.4220" in problem.message
    )


def test_a_spending_limit_needs_a_price_for_the_model():
    config = parse_config_json('{"model_name": "gpt-image-2", "max_cost_usd": 5}')
    with pytest.raises(InvalidConfig) as caught:
        validate_run_options(config, SUCCESSORS, TODAY, prices={})
    assert caught.value.field == "max_cost_usd" and "no price for gpt-image-2" in caught.value.message


def test_a_template_too_long_for_the_model_is_refused():
    from dalle_plugin.domain import models_catalog

    spec = models_catalog.CATALOG["gpt-image-2"]._replace(max_prompt_chars=20)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models_catalog.CATALOG, "gpt-image-2", spec)
        problem = _refusal(
            {"model_name": "gpt-image-2", "prompt_template": "A much longer frame around: {prompt}"}
        )
    assert problem.field == "prompt_template" and "leaves room for the prompt" in problem.message


def test_what_the_running_model_cannot_do_is_refused_naming_it():
    from dalle_plugin.domain import models_catalog

    spec = models_catalog.CATALOG["gpt-image-2"]._replace(
        max_images_per_request=1, output_formats=("png",), backgrounds=()
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(models_catalog.CATALOG, "gpt-image-2", spec)
        many = _refusal({"model_name": "dall-e-2", "images_per_task": 2})
        webp = _refusal({"model_name": "gpt-image-2", "output_format": "jpeg"})
        background = _refusal({"model_name": "gpt-image-2", "background": "opaque"})
    assert (
        "gpt-image-2 makes at most 1" in many.message and "runs because dall-e-2 was retired" in many.message
    )
    assert webp.field == "output_format" and "gpt-image-2 cannot write jpeg" in webp.message
    assert background.field == "background" and "does not take a background" in background.message


@pytest.mark.parametrize("typo", ["template", "n", "format", "budget"])
def test_likely_names_for_the_new_fields_get_a_suggestion(typo):
    problem = _error({typo: 1})
    assert "Did you mean" in problem.message
