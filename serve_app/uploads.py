"""Reading an uploaded file from a multipart body, bounded in size and in time while it streams.

The size limit is enforced as bytes arrive, so an oversized upload is refused
without being buffered whole (Starlette's own form parsing reads it all first).
A client that stops sending gets 408 once `upload_timeout_s` passes without a
byte, instead of holding the request open for ever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from serve_app.config import UploadLimits
from serve_app.problems import ProblemError

# Multipart framing adds a little beyond the file itself.
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


async def read_upload(request: Request, field: str, limits: UploadLimits) -> bytes:
    """The bytes of file field `field` of a multipart request, within `limits`."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ProblemError(415, "Unsupported media type",
                           f"send the image as a multipart/form-data file field named {field!r} "
                           f"(curl -F {field}=@photo.jpg)", slug="unsupported-media-type")
    max_bytes = limits.max_upload_bytes
    body_limit = max_bytes + _FRAMING_BYTES
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > body_limit:
        raise _too_large(max_bytes)
    parser = _FormParser(request.headers, _bounded(request.stream(), body_limit, limits.upload_timeout_s),
                         max_files=4, max_fields=32)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise _malformed(str(exc)) from exc
    try:
        if not parser.complete:
            raise _malformed("the body ends before the multipart closing boundary: the upload was cut short")
        values = form.getlist(field)
        if len(values) > 1:
            raise ProblemError(422, "More than one image",
                               f"the form has {len(values)} fields named {field!r}; send exactly one image",
                               slug="several-images")
        upload = values[0] if values else None
        if not isinstance(upload, UploadFile):
            detail = (f"the form's field {field!r} is text, not a file" if upload is not None
                      else f"the form has no file field named {field!r}")
            raise ProblemError(422, "Missing image", f"{detail} (curl -F {field}=@photo.jpg)",
                               slug="missing-image")
        data = await upload.read()
    finally:
        await form.close()
    if len(data) > max_bytes:
        raise _too_large(max_bytes)
    return data
