from dalle_plugin.domain.pricing import DEFAULT_PRICES, estimate_cost_usd
from dalle_plugin.settings import ApiSettings, read_settings

BASE_ENV = {"SESSIONS_TABLE": "sessions", "IMAGES_BUCKET": "images", "KMS_KEY_ID": "k", "HUB_API_URL": "https://hub",
            "STATE_MACHINE_ARN": "arn", "PLUGIN_SECRET_ARN": "arn", "RATE_LIMIT_TABLE": "rate"}


def test_price_by_model_quality_and_area():
    assert estimate_cost_usd("gpt-image-2", "1024x1024", "medium") == DEFAULT_PRICES["gpt-image-2"]["medium"]
    assert estimate_cost_usd("gpt-image-2", "2048x1024", "high") == round(2 * DEFAULT_PRICES["gpt-image-2"]["high"], 4)
    assert estimate_cost_usd("gpt-image-2", "auto", None) == DEFAULT_PRICES["gpt-image-2"]["auto"]


def test_snapshots_take_their_family_price_and_unknown_models_none():
    assert estimate_cost_usd("gpt-image-2-2026-04-21", "1024x1024", "low") == DEFAULT_PRICES["gpt-image-2"]["low"]
    assert estimate_cost_usd("gpt-image-1-mini", "1024x1024", "low") == DEFAULT_PRICES["gpt-image-1-mini"]["low"]
    assert estimate_cost_usd("some-future-model", "1024x1024", "low") is None


def test_the_operator_sets_the_table_in_deployment_settings():
    settings = read_settings(ApiSettings, BASE_ENV | {"IMAGE_PRICES": '{"gpt-image-2": {"medium": 0.5}}'})
    assert estimate_cost_usd("gpt-image-2", "1024x1024", "medium", settings.image_prices) == 0.5
    assert read_settings(ApiSettings, BASE_ENV | {"IMAGE_PRICES": ""}).image_prices == DEFAULT_PRICES
