"""Plain text: detect the encoding, normalise newlines, keep paragraphs."""

from __future__ import annotations

import codecs
import re

from engine.errors import ErrorCode
from engine.rag.formats.common import ExtractLimits, FormatError, SectionList
from engine.rag.types import Extracted

# Longest BOMs first: the UTF-32-LE BOM begins with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
# Characters that do not occur in real text: controls other than tab/newline/CR/form feed,
# and U+FFFD, which a lenient decode leaves where bytes made no sense.
_NON_TEXT = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f\ufffd]")
# charset-normalizer cannot tell these single-byte Latin code pages apart on short input
# (it ranks cp1250 first for French text in Latin-1); Western text is far more common, so
# among equally good guesses cp1252 (a superset of Latin-1's printable range) wins.
_WESTERN = ("cp1252", "latin_1", "iso8859_15")
_SAMPLE = 8192


def decode(data: bytes, charset: str | None = None) -> str:
    """Bytes to str: a BOM, then strict UTF-8, then a declared charset, then detection.
    Raises FormatError(unsupported_format) when the bytes are not text."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            # A BOM is deliberate: trust it and replace stray bad sequences.
            return _checked(data[len(bom) :].decode(encoding, errors="replace"))
    try:
        return _checked(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        if exc.reason == "unexpected end of data" and exc.start >= len(data) - 3:
            # UTF-8 cut inside the last character (a truncated upload): drop that character
            # rather than let detection mistake the whole file for a legacy code page.
            return _checked(data[: exc.start].decode("utf-8"))
    if charset:
        try:
            return _checked(data.decode(charset))
        except (LookupError, UnicodeDecodeError):
            pass  # a wrong or unknown declaration: fall through to detection
    if b"\x00" in data[:_SAMPLE]:
        utf16 = _utf16_without_bom(data)
        if utf16 is None:
            raise FormatError("binary data, not text", code=ErrorCode.UNSUPPORTED_FORMAT)
        return _checked(data.decode(utf16, errors="replace"))
    return _checked(_detect(data))


def _utf16_without_bom(data: bytes) -> str | None:
    """UTF-16 without a BOM shows as NULs in every other byte (for Latin scripts)."""
    sample = data[:_SAMPLE]
    half = max(len(sample) // 2, 1)
    even = sample[0::2].count(0) / half
    odd = sample[1::2].count(0) / half
    if odd > 0.3 and even < 0.05:
        return "utf-16-le"
    if even > 0.3 and odd < 0.05:
        return "utf-16-be"
    return None


def _detect(data: bytes) -> str:
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # pragma: no cover - it ships with the server's dependencies
        return data.decode("cp1252", errors="replace")
    matches = list(from_bytes(data))
    if not matches:
        raise FormatError("binary data or unknown text encoding", code=ErrorCode.UNSUPPORTED_FORMAT)
    best = matches[0]
    for match in matches:
        tied = match.chaos <= best.chaos + 0.01 and match.coherence >= best.coherence - 0.01
        if tied and match.encoding in _WESTERN:
            return data.decode("cp1252", errors="replace")
    return str(best)


def _checked(text: str) -> str:
    sample = text[:_SAMPLE]
    if sample and len(_NON_TEXT.findall(sample)) > 0.02 * len(sample):
        raise FormatError("binary data, not text", code=ErrorCode.UNSUPPORTED_FORMAT)
    return text


def extract_text(data: bytes, limits: ExtractLimits, charset: str | None = None) -> Extracted:
    sections = SectionList(limits.max_chars)
    sections.add(decode(data, charset))
    return Extracted(format="text", title=None, sections=sections.sections)
