"""Reading an uploaded file from a multipart body, bounded while it streams.

The size limit is enforced as bytes arrive, so an oversized upload is refused
without being buffered whole (Starlette's own form parsing reads it all first).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

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


async def read_upload(request: Request, field: str, max_bytes: int) -> bytes:
    """The bytes of file field `field` of a multipart request, at most `max_bytes`."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ProblemError(415, "Unsupported media type",
                           f"send the image as a multipart/form-data file field named {field!r} "
                           f"(curl -F {field}=@photo.jpg)", slug="unsupported-media-type")
    # Multipart framing adds a little beyond the file itself.
    body_limit = max_bytes + 64 * 1024
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > body_limit:
        raise _too_large(max_bytes)
    parser = MultiPartParser(request.headers, _bounded(request.stream(), body_limit),
                             max_files=4, max_fields=32)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ProblemError(400, "Malformed multipart body", str(exc), slug="malformed-multipart") from exc
    try:
        upload = form.get(field)
        if not isinstance(upload, UploadFile):
            raise ProblemError(422, "Missing image", f"the form has no file field named {field!r}",
                               slug="missing-image")
        data = await upload.read()
    finally:
        await form.close()
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return data
