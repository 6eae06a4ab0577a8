"""Bytes of a text asset -> the text the hub user sees.

Entity offsets are positions the hub's web editor counted in a JavaScript string (UTF-16 code units) over
the text as the browser decoded it. So the decoded text must keep every character the browser keeps:

* Newlines are NOT normalised. A browser string keeps ``\\r\\n`` as two code units, so turning it into
  ``\\n`` would shift every entity after the first Windows line end. (Collapsing whitespace is the prompt
  builder's job, after slicing.)
* A byte-order mark is dropped, as the browser's decoder drops it, so offset 0 is the first visible
  character.
* Bytes that are not UTF-8 are read as Windows-1252 as browsers define it (the five bytes that code page
  leaves undefined map to the C1 controls, like Latin-1). That gives one character per byte, the same count
  a browser's UTF-8 decoder gives when it replaces each stray byte with U+FFFD, so offsets stay in step
  while the characters come out right.

Binary files (many NULs or control bytes, or a known binary signature such as PDF, ZIP/.docx, PNG) are
refused with ``AssetUnreadable`` rather than turned into a nonsense prompt.
"""

from __future__ import annotations

import codecs
import functools
import unicodedata

from dalle_plugin.domain.errors import AssetUnreadable

_SAMPLE_BYTES = 8192
# Share of NUL bytes in one byte lane (even or odd offsets) above which text without a BOM is UTF-16:
# ASCII-heavy UTF-16 has a NUL in nearly every high byte, real text in another encoding has none.
_UTF16_LANE_NULS = 0.3
_UTF16_OTHER_LANE_NULS = 0.05
# Control characters a text file may hold (tab, line feed, vertical tab, form feed, carriage return, escape).
_TEXT_CONTROLS = {"\t", "\n", "\x0b", "\x0c", "\r", "\x1b"}
_MAX_CONTROL_SHARE = 0.05

_BINARY_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (a .docx, .xlsx or .zip file?)"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Microsoft Office document (.doc?)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"{\\rtf", "an RTF document"),
)

_BOMS: tuple[tuple[bytes, str], ...] = (
    # UTF-32 first: its little-endian BOM begins with UTF-16's.
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)


def decode_text(raw: bytes) -> str:
    """Decode a text asset the way a browser shows it (see the module docstring for what is kept)."""
    if not raw:
        return ""
    _refuse_known_binary(raw)
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            return _checked(_decode_tolerant(raw[len(bom) :], encoding), encoding)
    utf16 = _utf16_without_bom(raw)
    if utf16:
        return _checked(_decode_tolerant(raw, utf16), utf16)
    if b"\x00" in raw[:_SAMPLE_BYTES]:
        raise AssetUnreadable(
            "The asset's file holds NUL bytes, so it is not plain text. The plugin reads .txt assets; "
            "export the document as plain text (UTF-8) and upload that."
        )
    text = _utf8(raw)
    if text is None:
        text = _windows_1252(raw)
        return _checked(text, "windows-1252")
    return _checked(text, "utf-8")


def _refuse_known_binary(raw: bytes) -> None:
    for signature, what in _BINARY_SIGNATURES:
        if raw.startswith(signature):
            raise AssetUnreadable(
                f"The asset's file is {what}, not plain text. The plugin reads .txt assets; "
                'use "full-text-asset" or entity prompts only on text assets.'
            )


def _utf16_without_bom(raw: bytes) -> str | None:
    """``utf-16-le`` / ``utf-16-be`` when the NULs fall in one byte lane, as they do in UTF-16 text."""
    sample = raw[:_SAMPLE_BYTES]
    pairs = len(sample) // 2
    if pairs < 2:
        return None
    even_nuls = sample[0 : pairs * 2 : 2].count(0) / pairs
    odd_nuls = sample[1 : pairs * 2 : 2].count(0) / pairs
    if odd_nuls >= _UTF16_LANE_NULS and even_nuls <= _UTF16_OTHER_LANE_NULS:
        return "utf-16-le"
    if even_nuls >= _UTF16_LANE_NULS and odd_nuls <= _UTF16_OTHER_LANE_NULS:
        return "utf-16-be"
    return None


def _decode_tolerant(body: bytes, encoding: str) -> str:
    """Decode an encoding the file declared (BOM) or clearly shows; a file cut short by the download's
    size cap loses its last partial character instead of failing."""
    width = 4 if encoding.startswith("utf-32") else 2 if encoding.startswith("utf-16") else 1
    body = body[: len(body) - len(body) % width]
    if encoding == "utf-8":
        text = _utf8(body)
        return text if text is not None else body.decode("utf-8", errors="replace")
    return body.decode(encoding, errors="replace")


def _utf8(raw: bytes) -> str | None:
    """Strict UTF-8, forgiving only a multi-byte character cut off at the very end; None if not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data" and exc.end == len(raw) and len(raw) - exc.start < 4:
            return raw[: exc.start].decode("utf-8")
        return None


@functools.cache
def _windows_1252_high_half() -> dict[int, str]:
    """0x80-0x9F as browsers' windows-1252 decodes them (Python's cp1252 refuses five of those bytes)."""
    table: dict[int, str] = {}
    for byte in range(0x80, 0xA0):
        try:
            table[byte] = bytes([byte]).decode("cp1252")
        except UnicodeDecodeError:
            table[byte] = chr(byte)
    return table


def _windows_1252(raw: bytes) -> str:
    latin1 = raw.decode("latin-1")
    return latin1.translate(_windows_1252_high_half())


def _checked(text: str, encoding: str) -> str:
    """Refuse text that decoded but is mostly control characters: a binary file in disguise."""
    sample = text[:_SAMPLE_BYTES]
    if not sample:
        return text
    controls = sum(
        1 for ch in sample if ch not in _TEXT_CONTROLS and unicodedata.category(ch) == "Cc" and ch < "\x80"
    )
    if controls / len(sample) > _MAX_CONTROL_SHARE:
        raise AssetUnreadable(
            f"The asset's file does not look like text: {controls} of its first {len(sample)} characters "
            f"(read as {encoding}) are control characters. The plugin reads plain-text (.txt) assets."
        )
    return text
