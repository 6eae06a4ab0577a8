"""Build the image prompt from a task, the way the Config JSON's ``get_prompt_from`` says.

* ``full-text-asset``: the asset's whole text.
* ``entity-annotation``: the text highlighted with the class mapped to the plugin's Prompt class.
* ``text-annotation``: what was typed into the text classification mapped to the Prompt class.

Pure: the asset's text arrives through a callable, called only by the sources that need it.

Choices, and why:

* Offsets. ``ner.start``/``ner.end`` are positions the hub's editor counted in a JavaScript string, i.e.
  UTF-16 code units, so an emoji before an entity counts 2. They are sliced with ``slice_utf16``, never with
  Python's code-point indexing.
* Entity prompts fetch the text and cross-check it with ``ner.selection`` when the hub recorded one. The
  selection is what the user saw highlighted, so when the slice disagrees the selection wins, and its
  position is looked for (end inclusive, then the occurrence nearest ``ner.start``) only to keep the text
  order. When the text cannot be read but every entity has a selection, the selections are used alone.
* Entities are read in text order. Entities that overlap or touch (only whitespace between them) are read
  as one passage from the text, so nothing is repeated; separate passages, like several typed answers,
  are joined with ``". "``, or with a plain space when the previous one already ends in punctuation.
* Whitespace inside every part is collapsed to single spaces: line breaks carry no meaning to an image
  model and would only eat into the prompt limit. Lengths are counted in characters (code points).
* Text classifications are read top-level first, then those nested inside each annotation, each list in
  the order the hub returned it, following nested classifications depth-first.
* A prompt longer than the model's limit is cut at a word boundary and the run goes on, with a note.
"""

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

from pydantic import BaseModel, ConfigDict

from dalle_plugin.domain.errors import AssetUnreadable, PromptNotFound

# Here rather than in config.py: Extract needs the prompt's sources, not the plugin config's models and the
# models catalog that parsing a config builds (the API's work).
PromptSource = Literal["text-annotation", "entity-annotation", "full-text-asset"]

PROMPT_CLASS = "prompt"
_SENTENCE_END = tuple(".!?;:,…。！？")
_MAP_IN_SETTINGS = "in the plugin settings (Class Mapping)"


class Prompt(BaseModel):
    # built when Extract first builds a prompt: the API imports this module for the payload's class ids only
    model_config = ConfigDict(defer_build=True)

    text: str
    source: PromptSource
    #: length in characters of the whole prompt before any shortening
    original_length: int
    truncated: bool
    #: the pieces the prompt was joined from, in order, before shortening
    parts: list[str]
    notes: list[str]


# ---- UTF-16 offsets, as JavaScript counts them ------------------------------------------------------


def utf16_length(text: str) -> int:
    """``text.length`` in JavaScript: characters above U+FFFF count twice."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def slice_utf16(text: str, start: int, end: int) -> str:
    """JavaScript's ``text.slice(start, end)`` for non-negative offsets in UTF-16 code units.

    Offsets beyond the end are clamped and ``start >= end`` gives ``""``, as in JavaScript. An offset inside
    a surrogate pair yields a lone surrogate, as it would in JavaScript.
    """
    return _Utf16Text(text).slice(start, end)


class _Utf16Text:
    """A text with its UTF-16 encoding kept, so several slices cost one encoding."""

    def __init__(self, text: str):
        self.text = text
        self._units = text.encode("utf-16-le", "surrogatepass")

    def __len__(self) -> int:
        return len(self._units) // 2

    def slice(self, start: int, end: int) -> str:
        if start < 0 or end < 0:
            raise ValueError("UTF-16 offsets must not be negative")
        start, end = min(start, len(self)), min(end, len(self))
        if start >= end:
            return ""
        return self._units[2 * start : 2 * end].decode("utf-16-le", "surrogatepass")

    def nearest_occurrence(self, needle: str, near: int) -> int | None:
        """UTF-16 offset of the occurrence of ``needle`` whose start is closest to ``near``.

        Offsets are accumulated from one occurrence to the next, so a common word in a long text costs one
        pass, not one pass per occurrence.
        """
        best: int | None = None
        index, offset, previous = self.text.find(needle), 0, 0
        while index != -1:
            offset += utf16_length(self.text[previous:index])
            previous = index
            if best is None or abs(offset - near) < abs(best - near):
                best = offset
            elif offset > near:
                break  # occurrences only get further away from here on
            index = self.text.find(needle, index + 1)
        return best


# ---- the class mapping ---------------------------------------------------------------------------


def prompt_class_ids(category_schema: list[Any] | dict[str, Any] | str | None) -> list[str]:
    """The project schemaIds mapped to the plugin's Prompt class, in mapping order, without repeats.

    The hub sends ``[{"schemaId": ..., "modelClass": "Prompt"}, ...]``. Defensively also accepted: one such
    entry alone, a dict ``{schemaId: "Prompt"}`` or ``{"Prompt": schemaId or [schemaIds]}``, and the same
    as a JSON string.
    """
    if isinstance(category_schema, str):
        try:
            category_schema = json.loads(category_schema)
        except ValueError:
            return []
    if isinstance(category_schema, dict):
        if "schemaId" in category_schema or "modelClass" in category_schema:
            entries: Iterable[Any] = [category_schema]
        else:
            entries = _entries_from_mapping(category_schema)
    elif isinstance(category_schema, list):
        entries = category_schema
    else:
        return []
    ids: list[str] = []
    for raw in entries:
        entry = raw.model_dump(by_alias=True) if isinstance(raw, BaseModel) else raw  # already parsed
        if not isinstance(entry, dict):
            continue
        schema_id, model_class = entry.get("schemaId"), entry.get("modelClass")
        if not isinstance(model_class, str) or model_class.strip().casefold() != PROMPT_CLASS:
            continue
        if not isinstance(schema_id, (str, int)) or isinstance(schema_id, bool):
            continue
        cleaned = str(schema_id).strip()
        if cleaned and cleaned not in ids:
            ids.append(cleaned)
    return ids


def _entries_from_mapping(mapping: dict[str, Any]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, str) and value.strip().casefold() == PROMPT_CLASS:
            entries.append({"schemaId": key, "modelClass": value})
        elif str(key).strip().casefold() == PROMPT_CLASS:
            schema_ids = value if isinstance(value, list) else [value]
            entries.extend({"schemaId": schema_id, "modelClass": key} for schema_id in schema_ids)
    return entries


# ---- building the prompt -------------------------------------------------------------------------


_PROMPT_SOURCES: dict[str, PromptSource] = {source: source for source in get_args(PromptSource)}


def as_prompt_source(value: str) -> PromptSource:
    """A prompt source read back as a plain string (a run record's), checked to be one the plugin knows."""
    try:
        return _PROMPT_SOURCES[value]
    except KeyError:
        raise ValueError(f"unknown prompt source {value!r}") from None


def build_prompt(
    source: PromptSource,
    answer: dict[str, Any] | None,
    prompt_schema_ids: list[str],
    asset_text: Callable[[], str] | None,
    max_chars: int,
) -> Prompt:
    """The prompt for one task; raises ``PromptNotFound`` saying where it looked and how to fix it."""
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    notes: list[str] = []
    if source == "full-text-asset":
        parts = _from_full_text(asset_text)
    elif source == "entity-annotation":
        parts = _from_entities(answer, prompt_schema_ids, asset_text, notes)
    elif source == "text-annotation":
        parts = _from_text_classifications(answer, prompt_schema_ids, notes)
    else:
        raise ValueError(f"unknown prompt source {source!r}")
    parts = [cleaned for part in parts if (cleaned := _clean(part))]
    text = join_parts(parts)
    if not text:
        raise PromptNotFound(
            f"The prompt is empty: the {_describe_source(source)} holds only whitespace. "
            "Put some words there and run the plugin again."
        )
    shortened = shorten_at_word_boundary(text, max_chars)
    truncated = shortened != text
    if truncated:
        notes.append(
            f"The prompt was shortened from {len(text)} to {len(shortened)} characters to fit the model's "
            f"limit of {max_chars} characters."
        )
    return Prompt(
        text=shortened,
        source=source,
        original_length=len(text),
        truncated=truncated,
        parts=parts,
        notes=notes,
    )


def _describe_source(source: str) -> str:
    return {
        "full-text-asset": "asset's text",
        "entity-annotation": "highlighted text of the Prompt entities",
        "text-annotation": "text typed into the Prompt text classification",
    }.get(source, source)


def _clean(part: str) -> str:
    """Single spaces, no lone surrogates (a slice through an emoji), no outer whitespace."""
    without_lone = "".join(ch for ch in part if not "\ud800" <= ch <= "\udfff")
    return " ".join(without_lone.split())


def join_parts(parts: list[str]) -> str:
    text = ""
    for part in parts:
        if not text:
            text = part
        elif text.endswith(_SENTENCE_END):
            text = f"{text} {part}"
        else:
            text = f"{text}. {part}"
    return text


def shorten_at_word_boundary(text: str, max_chars: int) -> str:
    """A prefix of ``text`` of at most ``max_chars`` characters that does not end inside a word.

    Only a single word longer than the whole limit is cut through, since there is no boundary to cut at.
    """
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    if text[max_chars].isspace():
        kept = head.rstrip()
    else:
        last_space = max((i for i, ch in enumerate(head) if ch.isspace()), default=-1)
        kept = head[:last_space].rstrip() if last_space > 0 else ""
    return kept or head


# ---- full-text-asset -----------------------------------------------------------------------------


def _from_full_text(asset_text: Callable[[], str] | None) -> list[str]:
    if asset_text is None:
        raise AssetUnreadable('The asset\'s text is not available, so "full-text-asset" cannot be used.')
    text = asset_text()
    if not text.strip():
        raise PromptNotFound(
            "The asset's text is empty, so there is no prompt to send. Use a text asset with some words in "
            'it, or set "get_prompt_from" to "text-annotation" and type the prompt into a text '
            "classification."
        )
    return [text]


# ---- entity-annotation ---------------------------------------------------------------------------


class _EntityRef(NamedTuple):  # NamedTuples, not dataclasses: cheaper to create at a cold start (ports.py)
    object_id: str
    start: int | None
    end: int | None
    selection: str | None


class _Span(NamedTuple):
    text: str
    order: float
    start: int | None = None
    end: int | None = None


def _from_entities(
    answer: dict[str, Any] | None,
    prompt_ids: list[str],
    asset_text: Callable[[], str] | None,
    notes: list[str],
) -> list[str]:
    if not prompt_ids:
        raise PromptNotFound(
            "No class is mapped to the plugin's Prompt class, so no highlighted text can be the prompt. "
            f"Map the plugin's Prompt class to your entity class {_MAP_IN_SETTINGS}, then run it again; "
            'or set "get_prompt_from" to "full-text-asset" to send the whole text.'
        )
    tools = _tools(answer)
    entities = [ref for tool in tools if (ref := _entity_ref(tool, prompt_ids)) is not None]
    if not entities:
        raise PromptNotFound(_no_entities_message(tools, prompt_ids))

    doc = _read_text_for_entities(entities, asset_text, notes)
    spans = [_locate(entity, doc, notes) for entity in entities]
    spans.sort(key=lambda span: (span.order, span.end if span.end is not None else 0))
    if doc is not None:
        spans = _merge_touching(spans, doc, notes)
    return [span.text for span in spans]


def _tools(answer: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not isinstance(answer, dict):
        return []
    tools = answer.get("tools")
    if tools is None:
        tools = answer.get("objects")  # the write format's name for the same list
    return [tool for tool in tools or [] if isinstance(tool, dict)]


def _as_offset(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _entity_ref(tool: dict[str, Any], prompt_ids: list[str]) -> _EntityRef | None:
    if str(tool.get("schemaId", "")).strip() not in prompt_ids:
        return None
    ner = tool.get("ner")
    if not isinstance(ner, dict):
        return None
    start, end = _as_offset(ner.get("start")), _as_offset(ner.get("end"))
    selection = ner.get("selection")
    selection = selection if isinstance(selection, str) and selection.strip() else None
    if (start is None or end is None) and selection is None:
        return None
    return _EntityRef(str(tool.get("objectId", "?")), start, end, selection)


def _no_entities_message(tools: list[dict[str, Any]], prompt_ids: list[str]) -> str:
    entity_count = sum(1 for tool in tools if isinstance(tool.get("ner"), dict))
    mapped = [tool for tool in tools if str(tool.get("schemaId", "")).strip() in prompt_ids]
    message = (
        f"Found no highlighted text of the class mapped to the plugin's Prompt class "
        f"(schemaId {', '.join(prompt_ids)}). The task has {entity_count} "
        f"entit{'y' if entity_count == 1 else 'ies'} and "
        f"{len(tools)} annotation{'' if len(tools) == 1 else 's'}"
    )
    if mapped:
        message += f"; {len(mapped)} of the mapped class, none with highlighted text (no 'ner' offsets)"
    else:
        message += ", none of the mapped class"
    return message + (
        ". Highlight the prompt in the text with that class and run the plugin again, or map the Prompt "
        f"class to the entity class you used {_MAP_IN_SETTINGS}."
    )


def _read_text_for_entities(
    entities: list[_EntityRef], asset_text: Callable[[], str] | None, notes: list[str]
) -> _Utf16Text | None:
    all_selected = all(entity.selection is not None for entity in entities)
    if asset_text is None:
        if all_selected:
            return None
        raise AssetUnreadable(
            "The asset's text is not available, so the highlighted entities cannot be read."
        )
    try:
        return _Utf16Text(asset_text())
    except AssetUnreadable as problem:
        if not all_selected:
            raise
        notes.append(
            f"The asset's text could not be read ({problem.message}); "
            "used the highlighted text the hub recorded."
        )
        return None


def _same(a: str, b: str) -> bool:
    return a == b or " ".join(a.split()) == " ".join(b.split())


def _locate(entity: _EntityRef, doc: _Utf16Text | None, notes: list[str]) -> _Span:
    """The entity's text and its place in the text, cross-checked with the recorded selection."""
    start, end, selection = entity.start, entity.end, entity.selection
    order = float(start) if start is not None else float("inf")
    if doc is None:
        # Without the text, _read_text_for_entities made sure every entity has a selection.
        return _Span(selection or "", order)

    label = f"Entity {entity.object_id}"
    if start is not None and end is not None and 0 <= start <= end <= len(doc):
        sliced = doc.slice(start, end)
        if selection is None or _same(sliced, selection):
            return _Span(sliced, order, start, end)
        if end + 1 <= len(doc) and _same(doc.slice(start, end + 1), selection):
            notes.append(f"{label}: its end offset counts the last character (end inclusive); read it so.")
            return _Span(doc.slice(start, end + 1), order, start, end + 1)
    if selection is None:
        raise PromptNotFound(
            f"{label} has offsets {start}-{end}, which do not fit the asset's text ({len(doc)} characters), "
            "and the hub recorded no highlighted text for it. The asset may have changed since it was "
            "annotated: highlight the prompt again and run the plugin again."
        )
    found = doc.nearest_occurrence(selection, start or 0)
    if found is not None:
        found_end = found + utf16_length(selection)
        where = f"offsets {start}-{end}" if start is not None else "no usable offsets"
        notes.append(
            f"{label}: {where} did not match its highlighted text; used the highlighted text found at "
            f"{found}-{found_end}."
        )
        return _Span(doc.slice(found, found_end), float(found), found, found_end)
    notes.append(
        f"{label}: offsets {start}-{end} do not match the asset's text and its highlighted text does not "
        "occur in it; used the highlighted text the hub recorded."
    )
    return _Span(selection, order)


def _merge_touching(spans: list[_Span], doc: _Utf16Text, notes: list[str]) -> list[_Span]:
    """Overlapping entities, or ones with only whitespace between them, become one passage of the text."""
    merged: list[_Span] = []
    joined = 0
    for span in spans:
        previous = merged[-1] if merged else None
        if (
            previous is not None
            and previous.end is not None
            and span.start is not None
            and span.end is not None
            and previous.start is not None
            and (span.start <= previous.end or not doc.slice(previous.end, span.start).strip())
        ):
            new_end = max(previous.end, span.end)
            merged[-1] = _Span(doc.slice(previous.start, new_end), previous.order, previous.start, new_end)
            joined += 1
            continue
        merged.append(span)
    if joined:
        notes.append(
            f"{joined} entit{'y' if joined == 1 else 'ies'} overlapping or touching the one before "
            f"{'was' if joined == 1 else 'were'} read together with it as one passage."
        )
    return merged


# ---- text-annotation -----------------------------------------------------------------------------


@dataclass(repr=False, eq=False)  # only __init__ compiled at import: nothing compares or prints one
class _ClassificationSearch:
    """What the walk over the classifications found, and what it saw on the way (for the error message)."""

    prompt_ids: list[str]
    found: list[str] = field(default_factory=list)
    top_level: int = 0
    nested: int = 0
    mapped: int = 0
    empty: int = 0
    other_kinds: set[str] = field(default_factory=set)


def _from_text_classifications(
    answer: dict[str, Any] | None, prompt_ids: list[str], notes: list[str]
) -> list[str]:
    if not prompt_ids:
        raise PromptNotFound(
            "No class is mapped to the plugin's Prompt class, so no typed text can be the prompt. "
            f"Map the plugin's Prompt class to your text classification {_MAP_IN_SETTINGS}, "
            "then run it again; "
            'or set "get_prompt_from" to "full-text-asset" to send the whole text.'
        )
    search = _ClassificationSearch(prompt_ids=prompt_ids)
    top = answer.get("classifications") if isinstance(answer, dict) else None
    _walk(top, search, nested=False)
    for tool in _tools(answer):
        _walk(tool.get("classifications"), search, nested=True)
    if not search.found:
        raise PromptNotFound(_no_typed_text_message(search))
    if search.empty:
        notes.append(f"{search.empty} empty Prompt text classification(s) were skipped.")
    return search.found


def _walk(classifications: Any, search: _ClassificationSearch, nested: bool) -> None:
    if not isinstance(classifications, list):
        return
    for item in classifications:
        if not isinstance(item, dict):
            continue
        if nested:
            search.nested += 1
        else:
            search.top_level += 1
        if str(item.get("schemaId", "")).strip() in search.prompt_ids:
            search.mapped += 1
            kind = str(item.get("tool") or "").strip().lower()
            typed = item.get("answer")
            if kind in ("text", "") and isinstance(typed, str):
                if typed.strip():
                    search.found.append(typed)
                else:
                    search.empty += 1
            elif kind not in ("text", ""):
                search.other_kinds.add(kind)
            else:
                search.empty += 1
        _walk(item.get("classifications"), search, nested=True)


def _no_typed_text_message(search: _ClassificationSearch) -> str:
    message = (
        f"Found no typed text in the text classification mapped to the plugin's Prompt class "
        f"(schemaId {', '.join(search.prompt_ids)}). The task has {search.top_level} classification(s) and "
        f"{search.nested} nested inside annotations or other classifications"
    )
    if not search.mapped:
        message += ", none of the mapped class"
    else:
        message += f"; {search.mapped} of the mapped class"
        if search.empty:
            message += f", {search.empty} of them empty"
        if search.other_kinds:
            kinds = "/".join(sorted(search.other_kinds))
            message += f", and the mapped class is a {kinds} classification, not text"
    return message + (
        ". Type the prompt into that text classification and run the plugin again, or map the Prompt "
        f"class to the text classification you used {_MAP_IN_SETTINGS}."
    )
