"""The OpenAI emulator draws a prompt's accents and dashes, not boxes (the café and Kyōto samples)."""

from __future__ import annotations

from PIL import Image, ImageDraw

from local_stack.openai_emulator import _font


def _drawn(text: str) -> bytes:
    image = Image.new("L", (80, 80))
    ImageDraw.Draw(image).text((10, 10), text, font=_font(40), fill=255)
    return image.tobytes()


def test_the_font_has_the_latin_letters_and_punctuation_of_the_samples():
    missing_glyph = _drawn("\uffff")  # a code point no font maps: the font's box
    for character in "éōü—–’“”…":
        assert _drawn(character) != missing_glyph, character
