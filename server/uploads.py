"""multipart/form-data uploads read as a stream, with limits enforced while reading.

Litestar's own form parsing reads the whole body before a handler sees it, under one
body-size cap for the route. Uploads of several documents need a limit per file instead:
`read_multipart` feeds `request.stream()` to python-multipart's streaming parser, counts
each part's bytes as they arrive and raises a 413 the moment one file passes its limit, so
the rest of the body is never read, let alone buffered. The number of files, the number of
plain fields and each field's size are bounded too, so the whole request is bounded by
`max_files * max_file_bytes` plus a little; the route itself runs with Litestar's
`request_max_body_size=None`.

What is accepted is exactly what a form would send: parts with a `Content-Disposition:
form-data; name=...` header; a part with a `filename` is a file. Field names outside the
ones the caller lists are refused (400 naming the field), so a typo is not silently
ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from litestar import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from engine.errors import ErrorCode, InvalidRequest, PayloadTooLarge

if TYPE_CHECKING:  # a TypedDict the library declares for type checkers only
    from python_multipart.multipart import MultipartCallbacks

MULTIPART = b"multipart/form-data"
# RFC 2046 §5.1.1: a boundary is 1 to 70 characters.
MAX_BOUNDARY = 70


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int
    max_files: int = 100
    max_field_bytes: int = 64 * 1024
    max_fields: int = 32


@dataclass(frozen=True)
class FilePart:
    field: str
    filename: str
    content_type: str | None
    data: bytes


@dataclass
class MultipartForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: list[FilePart] = field(default_factory=list)


def describe_bytes(n: float) -> str:
    """A byte count for messages: '10 MB', '50 KB', '512 bytes' (decimal units)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{int(n)} bytes"


def multipart_boundary(content_type: str | None) -> bytes:
    """The boundary of a multipart/form-data Content-Type; 400 for anything else."""
    kind, options = parse_options_header(content_type or "")
    if kind != MULTIPART:
        shown = kind.decode("latin-1") or "none"
        raise InvalidRequest(
            f"the request body must be multipart/form-data, not {shown}",
            code=ErrorCode.UNSUPPORTED_CONTENT_TYPE,
        )
    boundary = options.get(b"boundary", b"")
    if not 0 < len(boundary) <= MAX_BOUNDARY:
        raise InvalidRequest(
            "multipart/form-data needs a boundary of 1 to 70 characters in its Content-Type",
            code=ErrorCode.UNSUPPORTED_CONTENT_TYPE,
        )
    return boundary


async def read_multipart(
    request: Request[Any, Any, Any],
    limits: UploadLimits,
    *,
    file_fields: frozenset[str],
    text_fields: frozenset[str],
) -> MultipartForm:
    """Read the request's multipart body as it streams in (see the module doc).

    Raises InvalidRequest (400) for a malformed body or an unexpected field and
    PayloadTooLarge (413) as soon as a limit is passed.
    """
    boundary = multipart_boundary(request.headers.get("content-type"))
    collector = _Collector(limits, file_fields, text_fields)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in request.stream():
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidRequest(f"malformed multipart/form-data body: {exc}") from None
    if not collector.complete:
        raise InvalidRequest("the multipart/form-data body ended before its closing boundary")
    return collector.form


class _Collector:
    """python-multipart's callbacks: gathers headers and data of each part in turn."""

    def __init__(
        self, limits: UploadLimits, file_fields: frozenset[str], text_fields: frozenset[str]
    ) -> None:
        self.limits = limits
        self.file_fields = file_fields
        self.text_fields = text_fields
        self.form = MultipartForm()
        self.complete = False
        self._headers: dict[bytes, bytes] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._data = bytearray()
        self._name = ""
        self._filename: str | None = None
        self._limit = 0
        self._fields_seen = 0

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers = {}
        self._header_field.clear()
        self._header_value.clear()
        self._data = bytearray()
        self._name = ""
        self._filename = None

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_field).strip().lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        name = _text(options.get(b"name"))
        if disposition != b"form-data" or not name:
            raise InvalidRequest(
                "every multipart part needs 'Content-Disposition: form-data; name=...'"
            )
        self._name = name
        raw_filename = options.get(b"filename")
        if name in self.file_fields:
            if raw_filename is None:
                raise InvalidRequest(
                    f"'{name}' must be a file part (with a filename), not a plain field",
                    param="files",
                )
            self._filename = _base_name(_text(raw_filename))
            if not self._filename:
                raise InvalidRequest(f"a '{name}' part has an empty filename", param="files")
            if len(self.form.files) >= self.limits.max_files:
                raise PayloadTooLarge(
                    f"too many files: at most {self.limits.max_files} per request",
                    param="files",
                )
            self._limit = self.limits.max_file_bytes
        elif name in self.text_fields:
            if raw_filename is not None:
                raise InvalidRequest(f"'{name}' must be a plain field, not a file", param=name)
            self._fields_seen += 1
            if self._fields_seen > self.limits.max_fields:
                raise InvalidRequest(
                    f"too many form fields: at most {self.limits.max_fields} besides the files"
                )
            self._limit = self.limits.max_field_bytes
        else:
            expected = ", ".join(sorted(self.file_fields | self.text_fields))
            raise InvalidRequest(
                f"unknown form field '{name}' (expected: {expected})",
                param=name,
                code=ErrorCode.UNKNOWN_FIELD,
            )

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._data += data[start:end]
        if len(self._data) > self._limit:
            limit = describe_bytes(self._limit)
            if self._filename is not None:
                raise PayloadTooLarge(
                    f"file '{self._filename}' exceeds the limit of {limit} per file",
                    param="files",
                )
            raise PayloadTooLarge(
                f"form field '{self._name}' exceeds the limit of {limit}", param=self._name
            )

    def _part_end(self) -> None:
        if not self._name:  # the parser's part_end before any part began
            return
        if self._filename is not None:
            content_type = _text(self._headers.get(b"content-type")).strip() or None
            self.form.files.append(
                FilePart(self._name, self._filename, content_type, bytes(self._data))
            )
        else:
            if self._name in self.form.fields:
                raise InvalidRequest(f"form field '{self._name}' is given twice", param=self._name)
            try:
                self.form.fields[self._name] = self._data.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(
                    f"form field '{self._name}' is not valid UTF-8", param=self._name
                ) from None
        self._name = ""
        self._data = bytearray()

    def _end(self) -> None:
        self.complete = True


def _text(raw: bytes | None) -> str:
    """A header value's bytes as text: UTF-8 as browsers send it, else Latin-1 (HTTP's)."""
    if raw is None:
        return ""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _base_name(filename: str) -> str:
    """The file's own name: a client may send a path (`C:\\docs\\a.pdf`, `docs/a.pdf`)."""
    return PurePosixPath(filename.replace("\\", "/")).name.strip()
