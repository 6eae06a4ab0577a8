from dalle_plugin.domain.pricing import DEFAULT_PRICES, estimate_cost_usd
from dalle_plugin.settings import read_settings
from dalle_plugin.settings.api import ApiSettings

BASE_ENV = {
    "SESSIONS_TABLE": "sessions",
    "IMAGES_BUCKET": "images",
    "KMS_KEY_ID": "k",
    "HUB_API_URL": "https://hub",
    "STATE_MACHINE_ARN": "arn",
    "PLUGIN_SECRET_ARN": "arn",
    "RATE_LIMIT_TABLE": "rate",
}


def test_price_by_model_quality_and_area():
    assert estimate_cost_usd("gpt-image-2", "1024x1024", "medium") == DEFAULT_PRICES["gpt-image-2"]["medium"]
    assert estimate_cost_usd("gpt-image-2", "2048x1024", "high") == round(
        2 * DEFAULT_PRICES["gpt-image-2"]["high"], 4
    )
    assert estimate_cost_usd("gpt-image-2", "auto", None) == DEFAULT_PRICES["gpt-image-2"]["auto"]


def test_snapshots_take_their_family_price_and_unknown_models_none():
    assert (
        estimate_cost_usd("gpt-image-2-2026-04-21", "1024x1024", "low")
        == DEFAULT_PRICES["gpt-image-2"]["low"]
    )
    assert (
        estimate_cost_usd("gpt-image-1-mini", "1024x1024", "low") == DEFAULT_PRICES["gpt-image-1-mini"]["low"]
    )
    assert estimate_cost_usd("some-future-model", "1024x1024", "low") is None


def test_the_operator_sets_the_table_in_deployment_settings():
    settings = read_settings(ApiSettings, BASE_ENV | {"IMAGE_PRICES": '{"gpt-image-2": {"medium": 0.5}}'})
    assert estimate_cost_usd("gpt-image-2", "1024x1024", "medium", settings.image_prices) == 0.5
    assert read_settings(ApiSettings, BASE_ENV | {"IMAGE_PRICES": ""}).image_prices == DEFAULT_PRICES


def test_the_built_in_prices_agree_with_the_bench_price_table_which_cites_each_figure():
    import json
    from pathlib import Path

    table = json.loads((Path(__file__).parents[2] / "bench" / "prices.json").read_text())
    cited = table["openai_per_image_1024"]
    assert set(DEFAULT_PRICES) == {model for model in cited if not model.startswith("_")}
    for model, prices in DEFAULT_PRICES.items():
        assert prices == {q: cited[model][q] for q in prices}, model
        assert cited[model]["source"] and cited[model]["as_of"]
    openai = table["openai"]
    assert openai["per_image"] == DEFAULT_PRICES[openai["model"]][openai["quality"]]
    assert set(table["aws_sources"]) == set(table["aws_us_east_1"])
    assert all(figure["source"] and figure["as_of"] for figure in table["aws_sources"].values())
