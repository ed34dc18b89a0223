"""Reading request bodies (a multipart form, its uploaded file, a whole JSON or
URL-encoded body), bounded while they stream.

The size limit is enforced as bytes arrive, so an oversized upload is refused
without being buffered whole (Starlette's own form parsing reads it all first).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from serve_app.problems import ProblemError


def _too_large(max_bytes: int) -> ProblemError:
    return ProblemError(413, "Upload too large",
                        f"the upload exceeds the limit of {max_bytes / (1024 * 1024):g} MB",
                        slug="upload-too-large")


async def _bounded(stream: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > max_bytes:
            raise _too_large(max_bytes)
        yield chunk


@dataclass(frozen=True)
class FormFile:
    """One file field of a multipart form."""

    data: bytes
    filename: str | None
    content_type: str | None


@dataclass(frozen=True)
class MultipartForm:
    """A multipart form: its file fields and its text fields (the first of each name)."""

    files: dict[str, FormFile]
    fields: dict[str, str]


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def read_form(request: Request, max_bytes: int, *, max_field_bytes: int = 1024 * 1024) -> MultipartForm:
    """The fields of a multipart request: files of at most `max_bytes` each, text
    fields of at most `max_field_bytes` (one of them may carry the image, base64)."""
    if not is_multipart(request):
        raise ProblemError(415, "Unsupported media type", "send a multipart/form-data body",
                           slug="unsupported-media-type")
    # Multipart framing and small text fields add a little beyond the image itself.
    body_limit = max(max_bytes, max_field_bytes) + 64 * 1024
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > body_limit:
        raise _too_large(max_bytes)
    parser = MultiPartParser(request.headers, _bounded(request.stream(), body_limit),
                             max_files=4, max_fields=32, max_part_size=max_field_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ProblemError(400, "Malformed multipart body", str(exc), slug="malformed-multipart") from exc
    files: dict[str, FormFile] = {}
    fields: dict[str, str] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in files:
                    files[name] = FormFile(await value.read(), value.filename, value.content_type)
            else:
                fields.setdefault(name, value)
    finally:
        await form.close()
    if any(len(file.data) > max_bytes for file in files.values()):
        raise _too_large(max_bytes)
    return MultipartForm(files, fields)


async def read_upload(request: Request, field: str, max_bytes: int) -> bytes:
    """The bytes of file field `field` of a multipart request, at most `max_bytes`."""
    if not is_multipart(request):
        raise ProblemError(415, "Unsupported media type",
                           f"send the image as a multipart/form-data file field named {field!r} "
                           f"(curl -F {field}=@photo.jpg)", slug="unsupported-media-type")
    upload = (await read_form(request, max_bytes)).files.get(field)
    if upload is None:
        raise ProblemError(422, "Missing image", f"the form has no file field named {field!r} "
                           "(or send no body and pass image_url)", slug="missing-image")
    return upload.data


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole request body (JSON, a URL-encoded form), refused past `max_bytes` while it streams."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    return b"".join([chunk async for chunk in _bounded(request.stream(), max_bytes)])


def _has_no_body(request: Request) -> bool:
    headers = request.headers
    return ("content-type" not in headers and "transfer-encoding" not in headers
            and headers.get("content-length", "0") == "0")


async def read_image_input(request: Request, field: str, max_bytes: int, image_url: str | None,
                           fetch: Callable[[str], Awaitable[bytes]]) -> bytes:
    """The image of a request that takes exactly one of a multipart file field `field`
    (at most `max_bytes`) and an `image_url` (fetched with `fetch`); both or neither: 422."""
    if image_url is None:
        if _has_no_body(request):
            raise ProblemError(422, "Missing image", f"send the image as the multipart file field {field!r} "
                               "or name it with the image_url query parameter", slug="missing-image")
        return await read_upload(request, field, max_bytes)
    async for chunk in request.stream():
        if chunk:
            raise ProblemError(422, "Two images", f"image_url was given together with a request body: send the "
                               f"image either as the multipart field {field!r} or as image_url, not both",
                               slug="two-images")
    return await fetch(image_url)
