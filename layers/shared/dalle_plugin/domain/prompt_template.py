"""The Config JSON's ``prompt_template``: a text with a ``{prompt}`` placeholder around the extracted prompt.

The syntax is Python's format-string syntax cut down to one name: ``{prompt}`` (one or more times) is the
extracted prompt, ``{{`` and ``}}`` are literal braces, and anything else in braces is refused. Parsed
here and rendered here, never with ``str.format`` (which would also accept ``{prompt.attr}``).
"""

from __future__ import annotations

import string
from typing import NamedTuple

PLACEHOLDER = "prompt"
#: a template is a short frame around the prompt, not a document
MAX_TEMPLATE_CHARS = 4_000


class TemplateProblem(ValueError):
    """Why a text is not a usable template, in words for the user."""


class PromptTemplate(NamedTuple):
    #: the literal texts between placeholders (one more than the placeholders), braces unescaped
    pieces: tuple[str, ...]

    @property
    def placeholders(self) -> int:
        return len(self.pieces) - 1

    @property
    def fixed_chars(self) -> int:
        """Characters the template adds around the prompt."""
        return sum(len(piece) for piece in self.pieces)

    def room_for_prompt(self, max_chars: int) -> int:
        """The longest extracted prompt that keeps the rendered prompt within ``max_chars``."""
        return (max_chars - self.fixed_chars) // self.placeholders

    def render(self, prompt: str) -> str:
        return prompt.join(self.pieces)


def parse_template(text: str) -> PromptTemplate:
    if not text.strip():
        raise TemplateProblem(
            'The template is empty: leave "prompt_template" out to send the prompt as it is.'
        )
    if len(text) > MAX_TEMPLATE_CHARS:
        raise TemplateProblem(
            f"The template is {len(text)} characters; at most {MAX_TEMPLATE_CHARS} are allowed."
        )
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:
        raise TemplateProblem(
            "A brace is not closed or not opened. Write {prompt} for the prompt, and {{ or }} for a literal brace."
        ) from None
    pieces = [""]
    unknown: list[str] = []
    for literal, name, spec, conversion in parsed:
        pieces[-1] += literal
        if name is None:
            continue
        if name != PLACEHOLDER or spec or conversion:
            whole = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            unknown.append(whole)
            continue
        pieces.append("")
    if unknown:
        raise TemplateProblem(
            f"Unknown placeholder {', '.join(unknown)}: the only placeholder is {{prompt}}. "
            "Write {{ and }} for literal braces."
        )
    if len(pieces) == 1:
        raise TemplateProblem("The template has no {prompt} placeholder: put {prompt} where the prompt goes.")
    return PromptTemplate(pieces=tuple(pieces))
