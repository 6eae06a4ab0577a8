"""The OpenAI image models the plugin knows, which of them still run, and what each accepts.

Pure data and rules: no I/O, no clock. "Today" is always a parameter so a retirement date can be tested on
both sides, and legacy names (the hub's saved presets still say ``dall-e-2``) are turned into the live model
the deployment names as their successor. Every size, quality and prompt-length check is made against the
model that actually runs, never the one the user typed.

The catalogue and what the checks return are NamedTuples, not pydantic models: they are the plugin's own
static table and the values derived from it, never input to validate (the Config JSON that names them is
validated by ``config.PluginConfig``), and building six pydantic schemas for them was paid by every cold
start of the API (about 2% of its floor under callgrind).
"""

import math
import re
from collections.abc import Mapping
from datetime import date
from enum import StrEnum
from typing import NamedTuple

from dalle_plugin.domain.errors import InvalidConfig

AUTO_SIZE = "auto"
DEFAULT_SIZE = "1024x1024"
_SIZE_PATTERN = re.compile(r"^(\d{1,6})x(\d{1,6})$")
_MODEL_NAME_SHAPE = re.compile(r"[a-z0-9][a-z0-9._:\-]{0,63}")
# The words DALL-E used for quality, and the gpt-image word that asks for the same thing.
LEGACY_QUALITY_WORDS = {"standard": "medium", "hd": "high"}


class ModelFamily(StrEnum):
    DALL_E_2 = "dall-e-2"
    DALL_E_3 = "dall-e-3"
    GPT_IMAGE_1 = "gpt-image-1"
    GPT_IMAGE_2 = "gpt-image-2"


def normalize_size(size: str) -> str:
    """``" 512X512 "``, ``"512 x 512"`` and ``"512×512"`` all mean ``512x512``; ``AUTO`` means ``auto``."""
    cleaned = re.sub(r"\s+", "", size).lower().replace("×", "x").replace("*", "x")
    return cleaned


def parse_size(size: str) -> tuple[int, int] | None:
    """``(width, height)`` of a ``WxH`` size, or None for ``auto`` or anything that is not ``WxH``."""
    match = _SIZE_PATTERN.match(normalize_size(size))
    if not match:
        return None
    return int(match.group(1)), int(match.group(2))


def _closeness(candidate: tuple[int, int], wanted: tuple[int, int]) -> tuple[float, float]:
    """Order candidates by aspect ratio first (the picture's shape matters most), then by area."""
    cw, ch = candidate
    ww, wh = wanted
    aspect_gap = abs(math.log((cw / ch) / (ww / wh)))
    area_gap = abs(math.log((cw * ch) / (ww * wh)))
    return round(aspect_gap, 9), round(area_gap, 9)


class FixedSizes(NamedTuple):
    """A model that accepts only a short list of sizes (DALL-E, gpt-image-1)."""

    sizes: tuple[str, ...]
    allows_auto: bool = False

    def choices(self) -> tuple[str, ...]:
        return self.sizes + ((AUTO_SIZE,) if self.allows_auto else ())

    def problem(self, size: str) -> str | None:
        """Why ``size`` is refused, or None when it is allowed."""
        size = normalize_size(size)
        if size in self.choices():
            return None
        return f"this model accepts only {', '.join(self.choices())}"

    def describe(self) -> str:
        return ", ".join(self.choices())

    def nearest(self, size: str) -> str:
        wanted = parse_size(size)
        if wanted is None or not all(wanted):
            return self.sizes[0]
        sized = [(parsed, s) for s in self.sizes if (parsed := parse_size(s)) is not None]
        return min(sized, key=lambda pair: _closeness(pair[0], wanted))[1]


class FlexibleSizes(NamedTuple):
    """gpt-image-2 and later: any ``WxH`` within these limits, or ``auto``.

    OpenAI's limits: both edges multiples of 16, long edge at most 3840, long:short at most 3:1, and a total
    pixel count between 655,360 and 8,294,400 (3840x2160). The pixel floor means 256x256 and 512x512, the
    DALL-E 2 presets, are refused even though they are multiples of 16. The short edge is also held to
    2160 (the documented "up to 3840x2160"): stricter than the pixel budget alone, which would allow a
    2880x2880 square, so that every size accepted here is accepted upstream.
    """

    multiple_of: int = 16
    max_long_edge: int = 3840
    max_short_edge: int = 2160
    max_aspect_ratio: float = 3.0
    min_pixels: int = 655_360
    max_pixels: int = 8_294_400
    allows_auto: bool = True
    # OpenAI's own examples: what a legacy size is mapped to when it does not fit the rule.
    examples: tuple[str, ...] = (
        "1024x1024",
        "1536x1024",
        "1024x1536",
        "2048x2048",
        "2048x1152",
        "1152x2048",
        "3840x2160",
        "2160x3840",
    )

    def choices(self) -> tuple[str, ...]:
        return self.examples + ((AUTO_SIZE,) if self.allows_auto else ())

    def problem(self, size: str) -> str | None:
        size = normalize_size(size)
        if size == AUTO_SIZE:
            return None if self.allows_auto else "this model does not accept auto"
        parsed = parse_size(size)
        if parsed is None:
            return "a size is written WIDTHxHEIGHT, e.g. 1024x1024"
        width, height = parsed
        if width == 0 or height == 0:
            return "width and height must be above 0"
        if width % self.multiple_of or height % self.multiple_of:
            return f"width and height must both be multiples of {self.multiple_of}"
        long_edge, short_edge = max(width, height), min(width, height)
        if long_edge > self.max_long_edge:
            return f"the long edge must be at most {self.max_long_edge}"
        if short_edge > self.max_short_edge:
            return f"the short edge must be at most {self.max_short_edge}"
        if long_edge / short_edge > self.max_aspect_ratio:
            return f"the long edge may be at most {self.max_aspect_ratio:g} times the short edge"
        pixels = width * height
        if pixels < self.min_pixels:
            return f"an image must have at least {self.min_pixels:,} pixels, {width}x{height} has {pixels:,}"
        if pixels > self.max_pixels:
            return f"an image may have at most {self.max_pixels:,} pixels, {width}x{height} has {pixels:,}"
        return None

    def describe(self) -> str:
        return (
            f"auto, or WIDTHxHEIGHT with both edges multiples of {self.multiple_of}, long edge at most "
            f"{self.max_long_edge}, short edge at most {self.max_short_edge}, aspect between "
            f"1:{self.max_aspect_ratio:g} and {self.max_aspect_ratio:g}:1, "
            f"{self.min_pixels:,} to {self.max_pixels:,} pixels (e.g. {', '.join(self.examples[:3])})"
        )

    def nearest(self, size: str) -> str:
        if self.problem(size) is None:
            return normalize_size(size)
        wanted = parse_size(size)
        if wanted is None or not all(wanted):
            return self.examples[0]
        sized = [(parsed, s) for s in self.examples if (parsed := parse_size(s)) is not None]
        return min(sized, key=lambda pair: _closeness(pair[0], wanted))[1]


SizeRule = FixedSizes | FlexibleSizes


OUTPUT_FORMATS = ("png", "jpeg", "webp")
BACKGROUNDS = ("auto", "opaque", "transparent")
_GPT_OUTPUT_FORMATS = OUTPUT_FORMATS
_GPT_BACKGROUNDS = BACKGROUNDS
#: formats that carry an alpha channel (what a transparent background needs)
FORMATS_WITH_ALPHA = ("png", "webp")
#: formats whose encoder takes a compression level
COMPRESSIBLE_FORMATS = ("jpeg", "webp")


class ModelSpec(NamedTuple):
    name: str
    family: ModelFamily
    max_prompt_chars: int
    size_rule: SizeRule
    qualities: tuple[str, ...]
    default_quality: str
    #: first day on which OpenAI no longer serves the model; None while no date is announced
    shutdown_date: date | None = None
    #: how many images one request may ask for (``n``)
    max_images_per_request: int = 10
    output_formats: tuple[str, ...] = _GPT_OUTPUT_FORMATS
    #: the ``background`` values the model takes; empty: the parameter is not accepted at all
    backgrounds: tuple[str, ...] = _GPT_BACKGROUNDS

    def is_live(self, today: date) -> bool:
        return self.shutdown_date is None or today < self.shutdown_date

    @property
    def is_gpt_image(self) -> bool:
        return self.family in (ModelFamily.GPT_IMAGE_1, ModelFamily.GPT_IMAGE_2)

    @property
    def default_size(self) -> str:
        return DEFAULT_SIZE


_GPT_QUALITIES = ("auto", "low", "medium", "high")
_GPT_IMAGE_1_SIZES = FixedSizes(sizes=("1024x1024", "1536x1024", "1024x1536"), allows_auto=True)


def _gpt_image_1(name: str, shutdown: date) -> ModelSpec:
    return ModelSpec(
        name=name,
        family=ModelFamily.GPT_IMAGE_1,
        max_prompt_chars=32_000,
        size_rule=_GPT_IMAGE_1_SIZES,
        qualities=_GPT_QUALITIES,
        default_quality="auto",
        shutdown_date=shutdown,
    )


def _gpt_image_2(name: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        family=ModelFamily.GPT_IMAGE_2,
        max_prompt_chars=32_000,
        size_rule=FlexibleSizes(),
        qualities=_GPT_QUALITIES,
        default_quality="auto",
    )


_DALL_E_SHUTDOWN = date(2026, 5, 12)

CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="dall-e-2",
            family=ModelFamily.DALL_E_2,
            max_prompt_chars=1_000,
            size_rule=FixedSizes(sizes=("256x256", "512x512", "1024x1024")),
            qualities=("standard",),
            default_quality="standard",
            shutdown_date=_DALL_E_SHUTDOWN,
            output_formats=("png",),
            backgrounds=(),
        ),
        ModelSpec(
            name="dall-e-3",
            family=ModelFamily.DALL_E_3,
            max_prompt_chars=4_000,
            size_rule=FixedSizes(sizes=("1024x1024", "1792x1024", "1024x1792")),
            qualities=("standard", "hd"),
            default_quality="standard",
            shutdown_date=_DALL_E_SHUTDOWN,
            max_images_per_request=1,
            output_formats=("png",),
            backgrounds=(),
        ),
        _gpt_image_1("gpt-image-1", date(2026, 10, 23)),
        _gpt_image_1("gpt-image-1-mini", date(2026, 12, 1)),
        _gpt_image_1("gpt-image-1.5", date(2026, 12, 1)),
        _gpt_image_1("chatgpt-image-latest", date(2026, 12, 1)),
        _gpt_image_2("gpt-image-2"),
        _gpt_image_2("gpt-image-2-2026-04-21"),
        _gpt_image_2("gpt-image-2.5-sunburst"),
        _gpt_image_2("gpt-image-2.5-flare"),
    )
}


def normalize_model_name(name: str) -> str:
    return name.strip().lower()


def _shown_model_name(name: str) -> str:
    """What of a wrong model name may be echoed: an API key pasted into the wrong field must not be."""
    cleaned = normalize_model_name(name)
    if _MODEL_NAME_SHAPE.fullmatch(cleaned) and not cleaned.startswith("sk-"):
        return cleaned
    return "a value that is not a model name"


def live_models(today: date) -> list[str]:
    return [name for name, spec in CATALOG.items() if spec.is_live(today)]


def suggest(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The closest of ``choices`` to a mistyped ``word``, if any is close enough to be a likely typo."""
    import difflib  # a refusal's hint only: a valid Config JSON never loads it

    matches = difflib.get_close_matches(word.strip().lower(), list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


class ResolvedModel(NamedTuple):
    """The model the user asked for and the one that will run."""

    requested: str
    actual: str
    spec: ModelSpec
    substituted: bool
    note: str | None = None


def resolve_model(requested: str, successors: Mapping[str, str], today: date) -> ResolvedModel:
    """Turn the Config JSON's ``model_name`` into the live model that will run.

    ``successors`` is the deployment's mapping of legacy names to live models. It is consulted only for a
    retired model (a live model always runs as named) and is followed through chains (dall-e-3 ->
    gpt-image-1 -> gpt-image-2) so an outdated mapping still ends on a live model.
    """
    name = normalize_model_name(requested)
    mapping = {normalize_model_name(k): normalize_model_name(v) for k, v in successors.items()}
    live = live_models(today)
    spec = CATALOG.get(name)
    if spec is None:
        usable = live + [legacy for legacy in mapping if legacy in CATALOG and legacy not in live]
        guess = suggest(name, list(CATALOG))
        hint = f"Did you mean '{guess}'?" if guess else "Use one of the names OpenAI's image API accepts."
        raise InvalidConfig("model_name", _shown_model_name(requested), ", ".join(usable), hint)
    if spec.shutdown_date is None or spec.is_live(today):
        return ResolvedModel(requested=name, actual=name, spec=spec, substituted=False)
    retired_on = spec.shutdown_date.isoformat()

    retired = spec
    current = spec
    seen = {name}
    while not current.is_live(today):
        successor = mapping.get(current.name)
        if successor is None or successor in seen or successor not in CATALOG:
            hint = f"{retired.name} was retired by OpenAI on {retired_on}."
            if successor is not None and successor not in CATALOG:
                hint += f" This deployment maps {current.name} to '{successor}', which is not an image model."
            hint += ' Set "model_name" to one of the live models.'
            raise InvalidConfig("model_name", name, ", ".join(live), hint)
        seen.add(successor)
        current = CATALOG[successor]
    note = f"{retired.name} was retired by OpenAI on {retired_on}; {current.name} ran instead"
    return ResolvedModel(requested=name, actual=current.name, spec=current, substituted=True, note=note)


class ImageOptions(NamedTuple):
    """Size and quality as they will be sent for the model that runs; ``notes`` say what was changed."""

    size: str
    quality: str
    notes: tuple[str, ...] = ()


def check_image_options(resolved: ResolvedModel, size: str | None, quality: str | None) -> ImageOptions:
    """Check size and quality against the model that runs, keeping legacy presets working.

    A size the user's (retired) model accepted but its successor does not is mapped to the successor's
    closest size, with a note. Any other size the running model refuses is an ``InvalidConfig``. A DALL-E
    quality word on a gpt-image model is translated (standard -> medium, hd -> high).
    """
    spec = resolved.spec
    notes: list[str] = []
    checked_size = _check_size(resolved, size, notes)
    checked_quality = _check_quality(spec, quality, notes)
    return ImageOptions(size=checked_size, quality=checked_quality, notes=tuple(notes))


def _check_size(resolved: ResolvedModel, size: str | None, notes: list[str]) -> str:
    spec = resolved.spec
    if size is None:
        return spec.default_size
    wanted = normalize_size(size)
    problem = spec.size_rule.problem(wanted)
    if problem is None:
        return wanted
    if resolved.substituted:
        legacy = CATALOG[resolved.requested].size_rule
        if legacy.problem(wanted) is None:
            mapped = spec.size_rule.nearest(wanted)
            notes.append(
                f"image_size {wanted} is a {resolved.requested} size that {spec.name} cannot make, "
                f"so {mapped} was used instead ({problem})"
            )
            return mapped
    hint = f"{spec.name} cannot make {wanted}: {problem}."
    if resolved.substituted:
        hint += f" ({spec.name} runs because {resolved.note}.)"
    if parse_size(wanted) is not None:
        hint += f" The closest allowed size is {spec.size_rule.nearest(wanted)}."
    raise InvalidConfig("image_size", size, spec.size_rule.describe(), hint)


def _check_quality(spec: ModelSpec, quality: str | None, notes: list[str]) -> str:
    if quality is None:
        return spec.default_quality
    wanted = quality.strip().lower()
    if wanted in spec.qualities:
        return wanted
    if spec.is_gpt_image and wanted in LEGACY_QUALITY_WORDS:
        translated = LEGACY_QUALITY_WORDS[wanted]
        notes.append(f"quality '{wanted}' is a DALL-E setting; {spec.name} used '{translated}' instead")
        return translated
    guess = suggest(wanted, spec.qualities)
    hint = f"Did you mean '{guess}'?" if guess else 'Leave "quality" out to use the model\'s default.'
    allowed = ", ".join(spec.qualities)
    raise InvalidConfig("quality", quality, allowed, f"{spec.name} does not offer it. {hint}")


class OutputOptions(NamedTuple):
    """How many images one request asks for, and how they are encoded, for the model that runs."""

    images_per_request: int = 1
    output_format: str = "png"
    output_compression: int | None = None
    background: str | None = None


def check_output_options(
    resolved: ResolvedModel,
    images: int,
    output_format: str | None,
    compression: int | None,
    background: str | None,
) -> OutputOptions:
    """What the model that runs cannot do is refused, naming that model (as for sizes)."""
    spec = resolved.spec
    because = f" ({spec.name} runs because {resolved.note}.)" if resolved.substituted else ""
    if images > spec.max_images_per_request:
        raise InvalidConfig(
            "images_per_task",
            images,
            f"1 to {spec.max_images_per_request} for {spec.name}",
            f"{spec.name} makes at most {spec.max_images_per_request} image(s) per request.{because}",
        )
    if output_format is not None and output_format not in spec.output_formats:
        raise InvalidConfig(
            "output_format",
            output_format,
            ", ".join(spec.output_formats),
            f"{spec.name} cannot write {output_format}.{because}",
        )
    if background is not None and background not in spec.backgrounds:
        allowed = ", ".join(spec.backgrounds) or "nothing: leave it out"
        raise InvalidConfig(
            "background", background, allowed, f"{spec.name} does not take a background setting.{because}"
        )
    return OutputOptions(
        images_per_request=images,
        output_format=output_format or "png",
        output_compression=compression,
        background=background,
    )
