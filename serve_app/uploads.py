"""Reading request bodies (a multipart form, its uploaded file, a whole JSON or
URL-encoded body), bounded in size and in time while they stream.

The size limit is enforced as bytes arrive, so an oversized upload is refused
without being buffered whole (Starlette's own form parsing reads it all first).
A client that stops sending gets 408 once `upload_timeout_s` passes without a
byte, instead of holding the request open for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from serve_app.config import UploadLimits
from serve_app.problems import ProblemError

# Multipart framing and small text fields add a little beyond the file itself.
_FRAMING_BYTES = 64 * 1024


def _too_large(max_bytes: int) -> ProblemError:
    return ProblemError(413, "Upload too large",
                        f"the upload exceeds the limit of {max_bytes / (1024 * 1024):g} MB",
                        slug="upload-too-large")


def _malformed(detail: str) -> ProblemError:
    return ProblemError(400, "Malformed multipart body", detail, slug="malformed-multipart")


async def _bounded(stream: AsyncIterator[bytes], max_bytes: int, timeout_s: float) -> AsyncIterator[bytes]:
    """`stream`, refused past `max_bytes` in all or after `timeout_s` without a byte."""
    received = 0
    chunks = aiter(stream)
    while True:
        try:
            chunk = await asyncio.wait_for(anext(chunks), timeout_s)
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11
            # Connection: close, because the rest of this body will never be read.
            raise ProblemError(408, "Upload timed out",
                               f"no bytes of the upload arrived for {timeout_s:g} s; "
                               "send the whole file without pausing",
                               slug="upload-timeout", headers={"Connection": "close"}) from None
        except ClientDisconnect:
            # Nobody will read this answer; it keeps a hang-up out of the error log.
            raise _malformed("the client disconnected before the upload was complete") from None
        received += len(chunk)
        if received > max_bytes:
            raise _too_large(max_bytes)
        yield chunk


class _FormParser(MultiPartParser):
    """Starlette's parser, noting whether the body reached its closing boundary.

    python-multipart calls `on_end` only there; without it a body cut short
    would read as a form that merely lacks its last fields.
    """

    complete = False

    def on_end(self) -> None:
        self.complete = True


@dataclass(frozen=True)
class FormFile:
    """One file field of a multipart form."""

    data: bytes
    filename: str | None
    content_type: str | None


@dataclass(frozen=True)
class MultipartForm:
    """A multipart form: its file fields and its text fields (the first of each text name)."""

    files: dict[str, FormFile]
    fields: dict[str, str]


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def read_form(request: Request, limits: UploadLimits, *, max_field_bytes: int = 1024 * 1024) -> MultipartForm:
    """The fields of a multipart request: files within `limits` each, text fields of
    at most `max_field_bytes` (one of them may carry the image, base64). A file field
    sent twice is refused (422): which one was meant is unknowable."""
    if not is_multipart(request):
        raise ProblemError(415, "Unsupported media type", "send a multipart/form-data body",
                           slug="unsupported-media-type")
    max_bytes = limits.max_upload_bytes
    body_limit = max(max_bytes, max_field_bytes) + _FRAMING_BYTES
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > body_limit:
        raise _too_large(max_bytes)
    parser = _FormParser(request.headers, _bounded(request.stream(), body_limit, limits.upload_timeout_s),
                         max_files=4, max_fields=32, max_part_size=max_field_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise _malformed(str(exc)) from exc
    files: dict[str, FormFile] = {}
    fields: dict[str, str] = {}
    try:
        if not parser.complete:
            raise _malformed("the body ends before the multipart closing boundary: the upload was cut short")
        for name, value in form.multi_items():
            if not isinstance(value, UploadFile):
                fields.setdefault(name, value)
            elif name in files:
                raise ProblemError(422, "More than one image",
                                   f"the form has more than one file field named {name!r}; send exactly one",
                                   slug="several-images")
            else:
                files[name] = FormFile(await value.read(), value.filename, value.content_type)
    finally:
        await form.close()
    if any(len(file.data) > max_bytes for file in files.values()):
        raise _too_large(max_bytes)
    return MultipartForm(files, fields)


async def read_upload(request: Request, field: str, limits: UploadLimits) -> bytes:
    """The bytes of file field `field` of a multipart request, within `limits`."""
    if not is_multipart(request):
        raise ProblemError(415, "Unsupported media type",
                           f"send the image as a multipart/form-data file field named {field!r} "
                           f"(curl -F {field}=@photo.jpg)", slug="unsupported-media-type")
    form = await read_form(request, limits)
    upload = form.files.get(field)
    if upload is None:
        detail = (f"the form's field {field!r} is text, not a file" if field in form.fields
                  else f"the form has no file field named {field!r}")
        raise ProblemError(422, "Missing image", f"{detail} (curl -F {field}=@photo.jpg, or send no body "
                           "and pass image_url)", slug="missing-image")
    return upload.data


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole request body (JSON, a URL-encoded form), refused past `max_bytes` while it
    streams or after `timeout_s` without a byte."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    return b"".join([chunk async for chunk in _bounded(request.stream(), max_bytes, timeout_s)])


def _has_no_body(request: Request) -> bool:
    headers = request.headers
    return ("content-type" not in headers and "transfer-encoding" not in headers
            and headers.get("content-length", "0") == "0")


async def read_image_input(request: Request, field: str, limits: UploadLimits, image_url: str | None,
                           fetch: Callable[[str], Awaitable[bytes]]) -> bytes:
    """The image of a request that takes exactly one of a multipart file field `field`
    (within `limits`) and an `image_url` (fetched with `fetch`); both or neither: 422."""
    if image_url is None:
        if _has_no_body(request):
            raise ProblemError(422, "Missing image", f"send the image as the multipart file field {field!r} "
                               "or name it with the image_url query parameter", slug="missing-image")
        return await read_upload(request, field, limits)
    async for chunk in request.stream():
        if chunk:
            raise ProblemError(422, "Two images", f"image_url was given together with a request body: send the "
                               f"image either as the multipart field {field!r} or as image_url, not both",
                               slug="two-images")
    return await fetch(image_url)
