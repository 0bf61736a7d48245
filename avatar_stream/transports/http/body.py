"""Reading request bodies with a size limit: raw, JSON objects and multipart forms, each
refused with the right status (413, 415, 400) before more than the limit is read."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from avatar_stream.transports.http.errors import HTTPJSONError

MAX_JSON_BYTES = 64 * 1024  # say, end, and other small JSON bodies
CHUNK = 64 * 1024
FORM_TEXT_BYTES = 4096  # a form's small text fields (a name, a format)


def _size(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MB" if limit >= 1024 * 1024 else f"{limit} bytes"


async def read_limited(source: web.Request | BodyPartReader, limit: int, what: str = "body"
                       ) -> bytes:
    """A request body or one multipart part; 413 past ``limit`` bytes (chunked uploads
    included)."""
    if isinstance(source, web.Request) and source.content_length is not None \
            and source.content_length > limit:
        raise HTTPJSONError(413, f"{what} of {source.content_length} bytes; at most "
                                 f"{_size(limit)}", "too_large")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await (source.read_chunk(CHUNK) if isinstance(source, BodyPartReader)
                       else source.content.read(CHUNK))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise HTTPJSONError(413, f"{what} over {_size(limit)}", "too_large")
        chunks.append(chunk)


async def read_text(request: web.Request, limit: int, what: str) -> str:
    """A text body (SDP, an SDP fragment) in its charset; 400 when it is not text."""
    raw = await read_limited(request, limit)
    try:
        return raw.decode(request.charset or "utf-8")
    except (UnicodeDecodeError, LookupError) as exc:
        raise HTTPJSONError(400, f"{what} is not valid text: {exc}") from exc


async def read_json_object(request: web.Request, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise HTTPJSONError(415, "send application/json")
    body = await read_limited(request, limit)
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise HTTPJSONError(400, f"malformed JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise HTTPJSONError(400, "expected a JSON object")
    return data


async def read_form(request: web.Request, files: dict[str, int]) -> dict[str, bytes]:
    """multipart/form-data fields: files by name with their byte limits, small text fields
    for everything else."""
    if request.content_type != "multipart/form-data":
        raise HTTPJSONError(415, "send multipart/form-data")
    read_limit = sum(files.values()) + (1 << 20)
    if request.content_length is not None and request.content_length > read_limit:
        raise HTTPJSONError(413, f"body of {request.content_length} bytes is too large",
                            "too_large")
    out: dict[str, bytes] = {}
    with _malformed_multipart():
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or not part.name:
                continue
            limit = files.get(part.name, FORM_TEXT_BYTES)
            out[part.name] = await read_limited(part, limit, f"field {part.name!r}")
    return out


@contextlib.contextmanager
def _malformed_multipart() -> Iterator[None]:
    """aiohttp's multipart parser raises for a body without a boundary or with broken part
    headers: that is the client's 400, not a 500."""
    try:
        yield
    except (ValueError, HttpProcessingError) as exc:
        words = getattr(exc, "message", None) or str(exc)  # HttpProcessingError's own words
        raise HTTPJSONError(400, f"malformed multipart/form-data body: {words}") from None


def form_text(form: dict[str, bytes], name: str) -> str | None:
    """A small text field, None when absent or blank."""
    value = form.get(name)
    if value is None:
        return None
    return value.decode("utf-8", "replace").strip() or None


async def read_form_files(request: web.Request, field: str, limit_each: int, max_files: int,
                          max_total: int) -> list[tuple[str, bytes | None]]:
    """The files of one multipart field sent many times (a file picker's many photos), as
    (file name, bytes), in order; None for a file over ``limit_each`` (it is skipped, the
    others are read). 413 past ``max_files`` files or ``max_total`` bytes in all."""
    if request.content_type != "multipart/form-data":
        raise HTTPJSONError(415, "send multipart/form-data")
    if request.content_length is not None and request.content_length > max_total:
        raise HTTPJSONError(413, f"body of {request.content_length} bytes; at most "
                                 f"{_size(max_total)}", "too_large")
    files: list[tuple[str, bytes | None]] = []
    total = 0
    with _malformed_multipart():
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name != field:
                await read_limited(part, FORM_TEXT_BYTES, f"field {part.name!r}")
                continue
            if len(files) == max_files:
                raise HTTPJSONError(413, f"more than {max_files} files", "too_large")
            chunks: list[bytes] | None = []
            size = 0
            while chunk := await part.read_chunk(CHUNK):
                size += len(chunk)
                total += len(chunk)
                if total > max_total:
                    raise HTTPJSONError(413, f"files over {_size(max_total)} in all", "too_large")
                if size > limit_each:
                    chunks = None  # read on to the next file, keep nothing of this one
                elif chunks is not None:
                    chunks.append(chunk)
            files.append((part.filename or f"file {len(files) + 1}",
                          None if chunks is None else b"".join(chunks)))
    return files
