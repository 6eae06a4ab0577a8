"""Extract Prompt: read the task (and its asset when needed) from the hub and record the prompt to send."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dalle_plugin.domain.errors import PluginError
from dalle_plugin.domain.prompt import as_prompt_source, build_prompt
from dalle_plugin.domain.prompt_template import parse_template
from dalle_plugin.domain.run import PromptInfo, RunRecord, RunRef, RunStatus
from dalle_plugin.domain.step_io.extract import ExtractResult
from dalle_plugin.domain.step_io.extracted import ExtractedPrompt
from dalle_plugin.domain.steps.machinery import (
    StepDeps,
    generating_line,
    hub_log_meanwhile,
    image_fingerprint,
    mark,
    may_spend_first,
    open_active,
    open_hub,
    owned_deps,
    record_extracted,
    required,
)
from dalle_plugin.domain.text_decoding import decode_text

if TYPE_CHECKING:
    from dalle_plugin.ports import HubClient


def _as_sentence(note: str) -> str:
    """Capitalised, unless it starts with a model id: OpenAI spells those in lower case (dall-e-2)."""
    if note.startswith(("dall-e", "gpt-image")):
        return note
    return note[:1].upper() + note[1:]


def extract_prompt(ref: RunRef, deps: StepDeps) -> ExtractResult:
    deps = owned_deps(ref, deps)
    started_ms = deps.clock.now_ms()
    # The step's one write, made first: it is the read (the sealed hub key comes back with it). Its lines
    # are known only after the read, so Generate's first write records them with the prompt.
    run, opened = open_active(ref, deps, started_ms, RunStatus.EXTRACTING, [])
    hub = open_hub(run, deps)
    notes = "".join(f" {_as_sentence(note)}." for note in run.notes)
    started = (
        f"Run started: prompt from {run.prompt_source}, model {run.model.actual}, size {run.size}.{notes}"
    )
    told_hub = hub_log_meanwhile(run, hub, started)  # while the task is read
    try:
        info, message = _read_and_describe(run, hub)
    except PluginError:
        # A step that fails still leaves its start on the timeline.
        deps.runs.change(run, lambda r: mark(r, started_ms, "extract", RunStatus.EXTRACTING, started))
        raise
    finally:
        told_hub()
    extracted = ExtractedPrompt(
        started_ms=started_ms, started=started, prompt=info, at_ms=deps.clock.now_ms(), message=message
    )
    # The line goes out while the prompt is recorded: it says what was extracted, whatever the write meets.
    told_hub = hub_log_meanwhile(run, hub, message)
    try:
        if opened:
            recorded = run.model_copy(deep=True)
            record_extracted(recorded, extracted)  # in memory: what the run's fingerprint is made of
        else:  # a record in the earlier layout: changed as read, in one more write
            recorded = deps.runs.change(run, lambda r: _record_here(r, extracted))
    finally:
        told_hub()
    return ExtractResult(
        prompt_source=info.source,
        prompt_length=info.length,
        truncated=info.truncated,
        image_fingerprint=image_fingerprint(recorded),
        extracted=extracted,  # recorded once: Generate skips what is already on the record
        # what Generate's first write says when it is also its read (the run as this step's write left it)
        spend_line=generating_line(run) if opened and may_spend_first(run) else "",
    )


def _record_here(run: RunRecord, extracted: ExtractedPrompt) -> None:
    mark(run, extracted.started_ms, "extract", RunStatus.EXTRACTING, extracted.started)
    run.prompt = extracted.prompt
    mark(run, extracted.at_ms, "extract", None, extracted.message)


def read_prompt(run: RunRecord, hub: HubClient) -> PromptInfo:
    """The prompt the run would send now, read from the task (and its asset) as the hub holds them."""
    task = hub.get_task(run.task_id)

    def asset_text() -> str:
        url = run.data_url or hub.get_asset(run.project_id, required(run.asset_id, "the asset id")).data_url
        return decode_text(hub.fetch_text(url))

    template = parse_template(run.prompt_template) if run.prompt_template else None
    # The model's limit holds for the prompt as sent: the template's own text leaves less room for the task's.
    room = template.room_for_prompt(run.max_prompt_chars) if template else run.max_prompt_chars
    prompt = build_prompt(
        as_prompt_source(run.prompt_source), task.get("answer"), run.prompt_class_ids, asset_text, room
    )
    text = template.render(prompt.text) if template else prompt.text
    return PromptInfo(
        text=text,
        source=prompt.source,
        length=len(text),
        original_length=prompt.original_length,
        truncated=prompt.truncated,
        notes=list(prompt.notes),
        template=run.prompt_template,
        extracted_length=len(prompt.text) if template else None,
    )


def _read_and_describe(run: RunRecord, hub: HubClient) -> tuple[PromptInfo, str]:
    """The prompt, and the line that says where it came from."""
    info = read_prompt(run, hub)
    template = run.prompt_template
    extracted = info.extracted_length if info.extracted_length is not None else info.length
    shortened = ""
    if info.truncated:
        why = (
            f" so that with the template it fits {run.model.actual}'s {run.max_prompt_chars} characters"
            if template
            else ""
        )
        shortened = f" (shortened from {info.original_length} to {extracted} at a word boundary{why})"
    templated = f", {info.length} with the prompt template" if template else ""
    return info, f"Prompt from {info.source}: {extracted} characters{shortened}{templated}."
