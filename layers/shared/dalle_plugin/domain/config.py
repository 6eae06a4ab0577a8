"""The Config JSON the hub user types, parsed and checked into the options a run uses.

Two steps, because the second needs deployment facts the first does not:

* ``parse_config_json`` checks the text itself: it is a JSON object, every key is known, every value has
  the right type and shape. The result is a ``PluginConfig`` with the hub's documented defaults filled in.
* ``validate_run_options`` checks the combination against the model that will actually run (legacy names
  map to the deployment's successor) and returns the size, quality, output options, prompt limit and
  price per image to use.

Every problem is an ``InvalidConfig`` naming the field, what was given and what is allowed. The user's
OpenAI key never appears in a message: at most as ``sk-...abcd``.
"""

import json
import math
import re
from collections.abc import Callable, Mapping
from datetime import date
from typing import Any, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict, SecretStr, model_validator

from dalle_plugin.domain.errors import InvalidConfig, MalformedConfig
from dalle_plugin.domain.models_catalog import (
    AUTO_SIZE,
    BACKGROUNDS,
    COMPRESSIBLE_FORMATS,
    FORMATS_WITH_ALPHA,
    OUTPUT_FORMATS,
    ImageOptions,
    OutputOptions,
    ResolvedModel,
    check_image_options,
    check_output_options,
    normalize_model_name,
    normalize_size,
    parse_size,
    resolve_model,
    suggest,
)
from dalle_plugin.domain.pricing import DEFAULT_PRICES, estimate_cost_usd
from dalle_plugin.domain.prompt import PromptSource
from dalle_plugin.domain.prompt_template import TemplateProblem, parse_template

PROMPT_SOURCES: tuple[str, ...] = get_args(PromptSource)
DEFAULT_KEY = "default"
MAX_KEY_CHARS = 512
MAX_IMAGES_PER_TASK = 4
#: what Ango Hub takes as an IMAGE attachment (links to JPG or PNG files)
HUB_IMAGE_FORMATS = ("png", "jpeg")
#: a session's spending limit above this is a typo, not a budget
MAX_COST_LIMIT_USD = 10_000

# Names people plausibly type for a field; only ever used to suggest the right name, never accepted.
_LIKELY_MEANT = {
    "model": "model_name",
    "size": "image_size",
    "api_key": "openai_api_key",
    "apikey": "openai_api_key",
    "key": "openai_api_key",
    "openai_key": "openai_api_key",
    "prompt_from": "get_prompt_from",
    "prompt_source": "get_prompt_from",
    "source": "get_prompt_from",
    "resolution": "image_size",
    "template": "prompt_template",
    "n": "images_per_task",
    "images": "images_per_task",
    "format": "output_format",
    "compression": "output_compression",
    "budget": "max_cost_usd",
    "max_cost": "max_cost_usd",
}
_OPENAI_KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_\-]{8,}")
_EXAMPLE = '{"get_prompt_from": "text-annotation", "image_size": "1024x1024"}'


def mask_secret(value: str) -> str:
    """``sk-proj-abc...wxyz`` -> ``sk-...wxyz``: enough to tell two keys apart, useless to anyone else."""
    value = value.strip()
    if len(value) < 16:
        return "***"
    return f"{value[:3]}...{value[-4:]}"


def _mask_key_like(value: Any) -> Any:
    """A key pasted into the wrong field must not be echoed back either."""
    if isinstance(value, str):
        return _OPENAI_KEY_LIKE.sub(lambda m: mask_secret(m.group(0)), value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return f"a JSON {_json_type(value)}"


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _require_string(field: str, value: Any, allowed: str) -> str:
    if not isinstance(value, str):
        hint = "Write the value as a JSON string in quotes."
        raise InvalidConfig(field, _mask_key_like(value), allowed, hint)
    return value


def _require_whole_number(field: str, value: Any, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = "Write it as a number without quotes." if isinstance(value, str) else ""
        raise InvalidConfig(field, _mask_key_like(value), allowed, hint)
    if isinstance(value, float) and not value.is_integer():
        raise InvalidConfig(field, value, allowed, "Write a whole number.")
    return int(value)


def _require_choice(
    field: str, value: Any, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None
) -> str:
    allowed = ", ".join(choices)
    text = _require_string(field, value, allowed).strip().lower()
    text = (aliases or {}).get(text, text)
    if text in choices:
        return text
    guess = suggest(text, choices)
    raise InvalidConfig(field, _mask_key_like(value), allowed, f"Did you mean '{guess}'?" if guess else "")


class PluginConfig(BaseModel):
    """The Config JSON, with the defaults the hub documents for the plugin."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    openai_api_key: SecretStr = SecretStr(DEFAULT_KEY)
    model_name: str = "dall-e-2"
    get_prompt_from: PromptSource = "text-annotation"
    image_size: str = "1024x1024"
    quality: str | None = None
    prompt_template: str | None = None
    images_per_task: int = 1
    output_format: str | None = None
    output_compression: int | None = None
    background: str | None = None
    max_cost_usd: float | None = None

    # The checks (below the class) raise InvalidConfig themselves (pydantic lets non-ValueErrors through), so
    # a direct construction reports problems in the same words as parse_config_json. One validator runs them
    # in the fields' order, each on a field that was given, as a before-validator per field would: each
    # field_validator costs a cold start about 0.07% of the API's floor to create (pydantic inspects it):
    # eleven of them were about two thirds of what the class cost.
    @model_validator(mode="before")
    @classmethod
    def _check_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data  # an instance, which pydantic passes through as it is
        checked = dict(data)
        for name, check in _FIELD_CHECKS.items():
            if name in checked:
                checked[name] = check(checked[name])
        return checked

    @model_validator(mode="after")
    def _check_format_combinations(self) -> "PluginConfig":
        output_format = self.output_format or "png"
        if self.output_compression is not None and output_format not in COMPRESSIBLE_FORMATS:
            raise InvalidConfig(
                "output_compression",
                self.output_compression,
                "only with output_format jpeg",
                f"output_format is {output_format}{'' if self.output_format else ' (the default)'}, which "
                'is not compressed: set "output_format" to "jpeg", or leave out "output_compression".',
            )
        if self.background == "transparent" and output_format not in FORMATS_WITH_ALPHA:
            raise InvalidConfig(
                "background",
                "transparent",
                "transparent only with output_format png",
                f'{output_format} has no transparency: set "output_format" to "png".',
            )
        return self

    @property
    def uses_default_key(self) -> bool:
        return self.openai_api_key.get_secret_value() == DEFAULT_KEY

    @property
    def masked_key(self) -> str:
        """What may be shown of the key in a log or a session: ``default`` or ``sk-...abcd``."""
        return DEFAULT_KEY if self.uses_default_key else mask_secret(self.openai_api_key.get_secret_value())


def _check_key(value: Any) -> SecretStr:
    allowed = '"default" (the shared key) or your own OpenAI API key'
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if not isinstance(value, str):
        shown = mask_secret(str(value)) if isinstance(value, (int, float)) else _mask_key_like(value)
        raise InvalidConfig("openai_api_key", shown, allowed, "Write the key as a JSON string in quotes.")
    key = value.strip()
    if key.lower() == DEFAULT_KEY:
        return SecretStr(DEFAULT_KEY)
    if not key:
        hint = 'Leave it out or write "default" for the shared key.'
        raise InvalidConfig("openai_api_key", "", allowed, hint)
    if len(key) > MAX_KEY_CHARS:  # sealed with KMS, which takes at most 4 KB for the run's secrets
        raise InvalidConfig(
            "openai_api_key",
            mask_secret(key),
            allowed,
            f"That is {len(key)} characters; an OpenAI key has at most {MAX_KEY_CHARS}: paste the key alone.",
        )
    if any(ch.isspace() for ch in key) or not key.isascii() or not key.isprintable():
        raise InvalidConfig(
            "openai_api_key",
            mask_secret(key),
            allowed,
            "An OpenAI key has no spaces or special characters: paste the key alone, without 'Bearer'.",
        )
    return SecretStr(key)


def _check_model_name(value: Any) -> str:
    allowed = "an OpenAI image model name such as gpt-image-2 (dall-e-2 and dall-e-3 are mapped)"
    name = normalize_model_name(_require_string("model_name", value, allowed))
    if not name:
        raise InvalidConfig("model_name", value, allowed, "Leave it out to use the default.")
    return name


def _check_prompt_source(value: Any) -> str:
    allowed = ", ".join(PROMPT_SOURCES)
    text = _require_string("get_prompt_from", value, allowed)
    source = re.sub(r"[\s_]+", "-", text.strip().lower())
    if source in PROMPT_SOURCES:
        return source
    guess = suggest(source, PROMPT_SOURCES)
    raise InvalidConfig(
        "get_prompt_from", _mask_key_like(value), allowed, f"Did you mean '{guess}'?" if guess else ""
    )


def _check_size_shape(value: Any) -> str:
    allowed = "WIDTHxHEIGHT such as 1024x1024 (which sizes depends on the model), or auto"
    size = normalize_size(_require_string("image_size", value, allowed))
    if size != AUTO_SIZE and parse_size(size) is None:
        raise InvalidConfig("image_size", _mask_key_like(value), allowed, 'Write it like "512x512".')
    return size


def _check_quality_shape(value: Any) -> str | None:
    if value is None:
        return None
    allowed = "auto, low, medium, high (DALL-E: standard, hd), or leave it out"
    quality = _require_string("quality", value, allowed).strip().lower()
    if not quality:
        raise InvalidConfig("quality", value, allowed, "Leave it out to use the model's default.")
    return quality


def _check_template(value: Any) -> str | None:
    if value is None:
        return None
    allowed = 'a text with a {prompt} placeholder, e.g. "Studio photo of {prompt}, soft light"'
    text = _require_string("prompt_template", value, allowed)
    try:
        parse_template(text)
    except TemplateProblem as problem:
        shown = _mask_key_like(text if len(text) <= 80 else text[:77] + "...")
        raise InvalidConfig("prompt_template", shown, allowed, str(problem)) from None
    return text


def _check_images_per_task(value: Any) -> int:
    allowed = f"a whole number from 1 to {MAX_IMAGES_PER_TASK}"
    count = _require_whole_number("images_per_task", value, allowed)
    if not 1 <= count <= MAX_IMAGES_PER_TASK:
        raise InvalidConfig(
            "images_per_task", count, allowed, "Each image is paid for; leave it out for one image."
        )
    return count


def _check_output_format(value: Any) -> str | None:
    if value is None:
        return None
    chosen = _require_choice("output_format", value, OUTPUT_FORMATS, {"jpg": "jpeg"})
    if chosen not in HUB_IMAGE_FORMATS:
        raise InvalidConfig(
            "output_format",
            chosen,
            ", ".join(HUB_IMAGE_FORMATS),
            f"OpenAI can write {chosen}, but Ango Hub attaches only JPG or PNG images to an asset.",
        )
    return chosen


def _check_compression(value: Any) -> int | None:
    if value is None:
        return None
    allowed = "a whole number from 0 to 100 (jpeg only)"
    level = _require_whole_number("output_compression", value, allowed)
    if not 0 <= level <= 100:
        raise InvalidConfig("output_compression", level, allowed, "")
    return level


def _check_background(value: Any) -> str | None:
    return None if value is None else _require_choice("background", value, BACKGROUNDS)


def _check_max_cost(value: Any) -> float | None:
    if value is None:
        return None
    allowed = f"an amount in US dollars above 0 and at most {MAX_COST_LIMIT_USD:,}, e.g. 0.5"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = "Write it as a number without quotes or currency sign." if isinstance(value, str) else ""
        raise InvalidConfig("max_cost_usd", _mask_key_like(value), allowed, hint)
    if not math.isfinite(value) or not 0 < value <= MAX_COST_LIMIT_USD:
        raise InvalidConfig(
            "max_cost_usd",
            value if math.isfinite(value) else str(value),
            allowed,
            "Leave it out for no limit.",
        )
    return float(value)


#: each field's check, in the fields' order (``PluginConfig._check_fields``)
_FIELD_CHECKS: dict[str, Callable[[Any], Any]] = {
    "openai_api_key": _check_key,
    "model_name": _check_model_name,
    "get_prompt_from": _check_prompt_source,
    "image_size": _check_size_shape,
    "quality": _check_quality_shape,
    "prompt_template": _check_template,
    "images_per_task": _check_images_per_task,
    "output_format": _check_output_format,
    "output_compression": _check_compression,
    "background": _check_background,
    "max_cost_usd": _check_max_cost,
}

ALLOWED_KEYS: tuple[str, ...] = tuple(PluginConfig.model_fields)


def parse_config_json(raw: str | dict[str, Any] | None) -> PluginConfig:
    """The user's Config JSON (as the hub sends it: a string, or defensively an object) -> ``PluginConfig``.

    Nothing, ``""`` and ``{}`` give every default. A key whose value is ``null`` counts as left out.
    """
    settings = _load_object(raw)
    for key in settings:
        if key not in ALLOWED_KEYS:
            raise _unknown_key(key)
    given = {key: value for key, value in settings.items() if value is not None}
    return PluginConfig(**given)


def _load_object(raw: str | dict[str, Any] | None) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise _not_an_object(raw)
    if not raw.strip():
        return {}
    loaded = _loads(raw)
    if isinstance(loaded, str) and loaded.strip().startswith("{"):
        loaded = _loads(loaded)  # a Config JSON that was JSON-encoded twice on the way
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise _not_an_object(loaded)
    return loaded


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    for key, value in pairs:
        if key in settings:
            shown = _mask_key_like(key)
            raise MalformedConfig(f"Config JSON names '{shown}' more than once; keep one.", field=shown)
        settings[key] = value
    return settings


def _loads(text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates)
    except json.JSONDecodeError as exc:
        raise _not_json(text, exc) from None
    except RecursionError:
        raise MalformedConfig(
            f"Config JSON is nested too deeply: write it as one flat JSON object, e.g. {_EXAMPLE}.",
            allowed="a JSON object",
        ) from None


def _not_json(text: str, exc: json.JSONDecodeError) -> MalformedConfig:
    # The text itself is never quoted back: it may hold the user's key.
    message = (
        f"Config JSON is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} "
        f"(character {exc.pos + 1})."
    )
    stripped = text.strip()
    if not stripped.startswith("{") and _parses_as_object("{" + stripped.rstrip(",") + "}"):
        message += " The braces are missing: wrap the settings in { and }."
    elif "'" in stripped and _parses_as_object(stripped.replace("'", '"')):
        message += ' Use double quotes (") around names and values, not single quotes.'
    elif re.search(r",\s*[}\]]", stripped):
        message += " Remove the comma before the closing brace."
    else:
        message += f" Write it as a JSON object, e.g. {_EXAMPLE}."
    return MalformedConfig(message, allowed="a JSON object")


def _parses_as_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _not_an_object(value: Any) -> MalformedConfig:
    return MalformedConfig(
        f"Config JSON must be a JSON object in braces, e.g. {_EXAMPLE}; got a JSON {_json_type(value)}.",
        allowed="a JSON object",
    )


def _unknown_key(key: str) -> MalformedConfig:
    shown = _mask_key_like(key)
    normalized = re.sub(r"[\s\-]+", "_", key.strip().lower())
    guess = normalized if normalized in ALLOWED_KEYS else _LIKELY_MEANT.get(normalized)
    guess = guess or suggest(normalized, ALLOWED_KEYS)
    message = f"Config JSON has an unknown field '{shown}'; allowed fields: {', '.join(ALLOWED_KEYS)}."
    if guess:
        message += f" Did you mean '{guess}'?"
    return MalformedConfig(message, field=shown, allowed=", ".join(ALLOWED_KEYS))


class RunOptions(NamedTuple):
    """What a run will ask OpenAI for, after the Config JSON met the deployment's model list: derived from
    the validated ``PluginConfig`` and the catalogue, so a NamedTuple like the catalogue's values."""

    model: ResolvedModel
    image: ImageOptions
    max_prompt_chars: int
    get_prompt_from: PromptSource
    uses_default_key: bool
    output: OutputOptions = OutputOptions()
    prompt_template: str | None = None
    max_cost_usd: float | None = None
    #: estimated price of one image as asked (None: the price table does not know the model)
    cost_per_image_usd: float | None = None
    notes: tuple[str, ...] = ()


def validate_run_options(
    config: PluginConfig,
    successors: Mapping[str, str],
    today: date,
    prices: Mapping[str, Mapping[str, float]] = DEFAULT_PRICES,
) -> RunOptions:
    """Resolve the model that runs and check size, quality, output options, the prompt template's length
    and the spending limit against it."""
    resolved = resolve_model(config.model_name, successors, today)
    image = check_image_options(resolved, config.image_size, config.quality)
    output = check_output_options(
        resolved, config.images_per_task, config.output_format, config.output_compression, config.background
    )
    max_chars = resolved.spec.max_prompt_chars
    if config.prompt_template is not None:
        template = parse_template(config.prompt_template)
        if template.room_for_prompt(max_chars) < 1:
            raise InvalidConfig(
                "prompt_template",
                f"a text of {len(config.prompt_template)} characters",
                f"a template that leaves room for the prompt within {resolved.actual}'s {max_chars:,} characters",
                "Shorten the template.",
            )
    cost = estimate_cost_usd(resolved.actual, image.size, image.quality, prices)
    if config.max_cost_usd is not None:
        if cost is None:
            raise InvalidConfig(
                "max_cost_usd",
                config.max_cost_usd,
                "no limit for this model (leave it out)",
                f"This deployment has no price for {resolved.actual}, so it cannot count spending against a limit.",
            )
        per_task = cost * output.images_per_request
        if per_task > config.max_cost_usd:
            raise InvalidConfig(
                "max_cost_usd",
                config.max_cost_usd,
                f"at least ${per_task:.4f} for these settings",
                f"One task's {output.images_per_request} image(s) at {image.size}, quality {image.quality} with "
                f"{resolved.actual} cost about ${per_task:.4f}: raise the limit, or ask for fewer or cheaper images.",
            )
    notes = ((resolved.note,) if resolved.note else ()) + image.notes
    return RunOptions(
        model=resolved,
        image=image,
        max_prompt_chars=max_chars,
        get_prompt_from=config.get_prompt_from,
        uses_default_key=config.uses_default_key,
        output=output,
        prompt_template=config.prompt_template,
        max_cost_usd=config.max_cost_usd,
        cost_per_image_usd=cost,
        notes=notes,
    )
