"""The API's settings: loaded only by the API, so that no other function's cold start creates the class
(each pydantic class costs about half a percent of a function's floor to create, built or not)."""

# No ``from __future__ import annotations``: see dalle_plugin.settings.

import json
from typing import Annotated

from pydantic import BeforeValidator, Field

from dalle_plugin.domain.pricing import DEFAULT_PRICES
from dalle_plugin.settings.rate_limit import RateLimitSettings

DEFAULT_SUCCESSORS = {"dall-e-2": "gpt-image-2", "dall-e-3": "gpt-image-2", "gpt-image-1": "gpt-image-2"}


def _parse_json(value: object) -> object:
    return json.loads(value) if isinstance(value, str) else value


#: a JSON object in an environment variable (a validator in the annotation: see settings.HostPorts)
FromJson = BeforeValidator(_parse_json)


class ApiSettings(RateLimitSettings):
    state_machine_arn: str = Field(alias="STATE_MACHINE_ARN", min_length=1)
    # the batch starter, for a batch larger than the API stores in its time (empty: the API stores every one)
    start_batch_state_machine_arn: str | None = Field(default=None, alias="START_BATCH_STATE_MACHINE_ARN")
    plugin_secret_arn: str = Field(alias="PLUGIN_SECRET_ARN", min_length=1)
    model_successors: Annotated[dict[str, str], FromJson] = Field(
        default_factory=lambda: dict(DEFAULT_SUCCESSORS), alias="MODEL_SUCCESSORS"
    )
    # 10,000 tasks with their asset ids fit (about 60 bytes each), and stay under Lambda's 6 MB request
    max_body_bytes: int = Field(default=4_194_304, alias="MAX_BODY_BYTES", gt=0)
    # Tasks an execution runs (docs/batches.md); smaller only to see many executions with few tasks (tests)
    tasks_per_execution: int = Field(default=100, alias="TASKS_PER_EXECUTION", ge=1, le=100)
    # USD per 1024x1024 image by model and quality, for the session's cost estimate; empty: built-in table
    image_prices: Annotated[dict[str, dict[str, float]], FromJson] = Field(
        default_factory=lambda: dict(DEFAULT_PRICES), alias="IMAGE_PRICES"
    )
