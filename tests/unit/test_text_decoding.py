"""decode_text: every encoding text assets really come in, offsets kept as the browser counts them."""

import codecs

import pytest
from dalle_plugin.domain.errors import AssetUnreadable
from dalle_plugin.domain.prompt import slice_utf16
from dalle_plugin.domain.text_decoding import decode_text

SAMPLE = "Naïve café, “quoted” – 5€.\r\nSecond line"
ASCII_SAMPLE = "A red barn at sunset.\nA small dog in the grass."


def test_empty_bytes_are_empty_text():
    assert decode_text(b"") == ""


def test_utf8_without_bom():
    assert decode_text(SAMPLE.encode("utf-8")) == SAMPLE


def test_utf8_with_emoji_and_cjk():
    text = "Prompt: 😀 一只猫 in the rain"
    assert decode_text(text.encode("utf-8")) == text


def test_utf8_bom_is_dropped_so_offset_zero_is_the_first_visible_character():
    text = decode_text(codecs.BOM_UTF8 + b"Sunset over hills")
    assert text == "Sunset over hills"
    assert slice_utf16(text, 0, 6) == "Sunset"


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_with_bom(encoding):
    bom = codecs.BOM_UTF16_LE if encoding.endswith("le") else codecs.BOM_UTF16_BE
    assert decode_text(bom + SAMPLE.encode(encoding)) == SAMPLE


def test_utf16_as_python_writes_it():
    assert decode_text(SAMPLE.encode("utf-16")) == SAMPLE


@pytest.mark.parametrize("encoding", ["utf-32-le", "utf-32-be"])
def test_utf32_with_bom(encoding):
    bom = codecs.BOM_UTF32_LE if encoding.endswith("le") else codecs.BOM_UTF32_BE
    assert decode_text(bom + SAMPLE.encode(encoding)) == SAMPLE


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_bom_is_recognised_by_its_nul_bytes(encoding):
    assert decode_text(SAMPLE.encode(encoding)) == SAMPLE
    assert decode_text(ASCII_SAMPLE.encode(encoding)) == ASCII_SAMPLE


def test_windows_1252_fallback_reads_smart_quotes_dashes_and_euro():
    raw = SAMPLE.encode("cp1252")
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    assert decode_text(raw) == SAMPLE


def test_latin1_text_reads_as_latin1():
    text = "Crème brûlée à la française"
    assert decode_text(text.encode("latin-1")) == text


def test_bytes_windows_1252_leaves_undefined_read_like_browsers_do():
    # 0x81, 0x8D, 0x8F, 0x90, 0x9D have no character in cp1252; browsers map them to the C1 controls.
    assert decode_text(b"caf\xe9 \x81 ok") == "café \x81 ok"


def test_fallback_keeps_one_character_per_byte_so_offsets_stay_in_step():
    raw = "été à Paris".encode("cp1252")
    assert len(decode_text(raw)) == len(raw)


def test_crlf_newlines_are_kept_so_offsets_after_them_do_not_shift():
    text = decode_text(b"line one\r\nline two\r\nthe prompt")
    assert text == "line one\r\nline two\r\nthe prompt"
    assert slice_utf16(text, 20, 30) == "the prompt"


def test_a_utf8_character_cut_off_by_the_size_cap_is_dropped_not_misread():
    raw = "Ünïcödé text ends with é".encode()[:-1]
    assert decode_text(raw) == "Ünïcödé text ends with "


def test_a_utf16_file_cut_to_an_odd_length_loses_only_the_half_character():
    raw = codecs.BOM_UTF16_LE + "Hello world".encode("utf-16-le")
    assert decode_text(raw[:-1]) == "Hello worl"


def test_invalid_utf8_in_the_middle_falls_back_to_windows_1252():
    raw = b"price: 10\x80 per unit, caf\xe9"
    assert decode_text(raw) == "price: 10€ per unit, café"


def test_tabs_and_form_feeds_are_text():
    assert decode_text(b"col1\tcol2\fpage") == "col1\tcol2\fpage"


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "PDF"),
        (b"PK\x03\x04\x14\x00\x06\x00", "ZIP"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "PNG"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00\x00", "Microsoft Office"),
    ],
)
def test_known_binary_formats_are_refused_by_name(raw, kind):
    with pytest.raises(AssetUnreadable, match=kind):
        decode_text(raw)


def test_bytes_full_of_nuls_are_refused():
    raw = bytes(range(256)) * 8
    with pytest.raises(AssetUnreadable, match=r"not plain text|does not look like text"):
        decode_text(raw)


def test_a_text_with_a_few_nuls_but_no_utf16_pattern_is_refused():
    with pytest.raises(AssetUnreadable, match="NUL"):
        decode_text(b"abc\x00def ghi jkl mno pqr")


def test_mostly_control_characters_are_refused():
    raw = bytes([1, 2, 3, 4, 5, 6, 7, 8, 14, 15, 16, 17, 18, 19]) * 20 + b"some words"
    with pytest.raises(AssetUnreadable, match="control characters"):
        decode_text(raw)


def test_an_error_message_tells_the_user_what_to_do():
    with pytest.raises(AssetUnreadable) as caught:
        decode_text(b"PK\x03\x04rest")
    assert ".txt" in caught.value.message
