"""Extract Prompt's output."""

# No ``from __future__ import annotations``: see dalle_plugin.domain.run.

from dalle_plugin.domain.run import ONE_FUNCTION_ONLY, CamelModel
from dalle_plugin.domain.step_io.extracted import ExtractedPrompt


class ExtractResult(CamelModel):
    model_config = ONE_FUNCTION_ONLY
    prompt_source: str
    prompt_length: int
    truncated: bool
    #: what makes the image (a hash, no prompt text): Generate reads an offered image of it with the run
    image_fingerprint: str | None = None
    #: the prompt and the step's lines, for Generate's first write to record (task text, never a secret)
    extracted: ExtractedPrompt | None = None
    #: Generate's "Generating ..." line when its first write may spend the attempt without a read (a run
    #: accepted with no image of its task on offer, never attempted, no grants to take); "" otherwise.
    #: Always present: the state machine's path to it must resolve.
    spend_line: str = ""
