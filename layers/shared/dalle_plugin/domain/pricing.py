"""Estimated OpenAI cost of a run, from a price table in the deployment settings.

Prices are USD per 1024x1024 image by model and quality; other sizes scale with their pixel area (how
OpenAI's per-token image pricing behaves to first order). It is an estimate for people reading a
session, not a bill: the table is the operator's to keep current (``ImagePriceTable`` parameter).
"""

from __future__ import annotations

from collections.abc import Mapping

# List prices per 1024x1024 image (USD). Each figure, with its source and date, is also in bench/prices.json
# ("openai_per_image_1024"), and a test keeps the two equal.
# - gpt-image-2 (and 2.x): billed per token, $30 per 1M image output tokens; OpenAI's per-image calculator
#   at the model's launch (2026-04-21) gives $0.006 / $0.053 / $0.211 for low / medium / high. "auto" is
#   estimated as medium. (The earlier 0.011 / 0.042 / 0.167 were gpt-image-1's figures.)
# - gpt-image-1 family: OpenAI's per-image price table (model pages, as of 2026-11).
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gpt-image-2": {"low": 0.006, "medium": 0.053, "high": 0.211, "auto": 0.053},
    "gpt-image-1.5": {"low": 0.009, "medium": 0.034, "high": 0.133, "auto": 0.034},
    "gpt-image-1-mini": {"low": 0.005, "medium": 0.011, "high": 0.036, "auto": 0.011},
    "gpt-image-1": {"low": 0.011, "medium": 0.042, "high": 0.167, "auto": 0.042},
}
PRICED_AREA = 1024 * 1024


def _family(model: str, prices: Mapping[str, Mapping[str, float]]) -> Mapping[str, float] | None:
    """The longest price-table name the model starts with (snapshots and variants share their family's)."""
    matches = [name for name in prices if model == name or model.startswith((name + "-", name + "."))]
    return prices[max(matches, key=len)] if matches else None


def estimate_cost_usd(
    model: str, size: str, quality: str | None, prices: Mapping[str, Mapping[str, float]] = DEFAULT_PRICES
) -> float | None:
    """None when the table has no price for the model (the session then shows no estimate)."""
    table = _family(model, prices)
    if table is None:
        return None
    price = table.get(quality or "auto", table.get("auto"))
    if price is None:
        return None
    try:
        width, height = (int(part) for part in size.lower().split("x"))
    except ValueError:
        width = height = 1024  # "auto"
    return round(price * (width * height) / PRICED_AREA, 4)
