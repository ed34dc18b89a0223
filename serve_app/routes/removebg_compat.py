"""The remove.bg API v1.0 on Strata: point a remove.bg client's base URL at Strata.

The contract is remove.bg's OpenAPI description (https://www.remove.bg/api,
`https://www.remove.bg/api/swagger.yaml`, as mirrored by APIs.guru's
openapi-directory `APIs/remove.bg/1.0.0`) and its API documentation page:

- `POST /v1.0/removebg`, the body multipart/form-data, application/json or
  application/x-www-form-urlencoded, with exactly one image source:
  `image_file` (a file; multipart only), `image_file_b64` or `image_url`.
- Parameters: `size` (preview = small = regular: at most 0.25 megapixels,
  the default; medium 1.5 MP; hd 4 MP; full = 4k = auto = 50MP: the input's
  resolution), `type` and `type_level` (accepted; see below), `format` (auto:
  PNG when the result has transparency, else JPG; png; jpg; zip: `color.jpg` +
  `alpha.png`), `channels` (rgba: the cutout; alpha: the 8-bit matte),
  `bg_color` (hex without `#` as remove.bg writes it, 3/4/6/8 digits, or a
  colour name), `bg_image_file` (a file; multipart only) or `bg_image_url`
  (a background image, centered and resized to fill the result's canvas,
  aspect kept, unless it has the canvas's size already), `crop`, `crop_margin` ("30px", "10%"; one, two or four values;
  at most 50 % of the subject's size and 500 px a side), `roi` ("x1 y1 x2 y2"
  in px or %), `add_shadow` and `semitransparency` (accepted; remove.bg applies
  them only to cars).
- 200: the image (or ZIP) with `X-Width`, `X-Height`, `X-Credits-Charged`,
  `X-Foreground-Top`, `X-Foreground-Left`, `X-Foreground-Width`,
  `X-Foreground-Height`, and `X-Type` when a `type` was named; with
  `Accept: application/json`, `{"data": {"result_b64", "foreground_top",
  "foreground_left", "foreground_width", "foreground_height"}}`.
- Errors: `{"errors": [{"title", "code", "detail"}]}` with remove.bg's codes
  (`missing_source`, `multiple_sources`, `invalid_size`, `invalid_format`,
  `invalid_channels`, `invalid_bg_color`, `multiple_bg_sources`,
  `invalid_bg_image_url`, `failed_bg_download`, `invalid_crop_margin`,
  `invalid_roi`, `roi_exceeds_bounds`, `roi_region_empty`, `file_too_large`,
  `resolution_too_high`, `invalid_file_type`, `failed_to_read_image`,
  `unknown_foreground`, ...): 400 for bad input, 503 with `Retry-After` when
  busy.

Where Strata differs: nothing is charged (`X-Credits-Charged: 0`); the
foreground type is not detected (`X-Type` echoes a `type` the client named,
and is absent for `auto`); `scale` and `position` are refused with 400
`unsupported_parameter` rather than silently ignored; the segmentation model
is the config's `default_model`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import zipfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import cv2
import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from PIL import ImageColor
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import imaging
from serve_app.config import UploadLimits
from serve_app.problems import ProblemError
from serve_app.schemas import error_responses
from serve_app.service import CurrentService, Matte, StrataService, engine_headers
from serve_app.uploads import is_multipart, read_body, read_form


class RemoveBgError(Exception):
    """An error as remove.bg reports it: one entry of the `errors` array."""

    def __init__(self, status: int, code: str, title: str, detail: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(title)
        self.status, self.code, self.title, self.detail = status, code, title, detail
        self.headers = headers or {}


def _bad(code: str, title: str, detail: str | None = None) -> RemoveBgError:
    return RemoveBgError(400, code, title, detail)


def errors_response(status: int, errors: list[dict[str, str]], headers: dict[str, str] | None = None) -> JSONResponse:
    """`{"errors": [...]}`, remove.bg's error body."""
    return JSONResponse({"errors": errors}, status_code=status, headers=headers or None)


# Strata's problem slugs -> remove.bg's 400 codes and titles for the same failure.
_PROBLEM_CODES = {
    "upload-too-large": ("file_too_large", "File too large"),
    "image-too-large": ("resolution_too_high", "Image resolution too high"),
    "unsupported-image-format": ("invalid_file_type", "Invalid file type"),
    "unsupported-media-type": ("invalid_file_type", "Invalid file type"),
    "image-corrupt": ("failed_to_read_image", "There was an error reading the image."),
    "image-empty": ("failed_to_read_image", "There was an error reading the image."),
    "image-too-small": ("invalid_dimensions", "Image too small"),
    "malformed-multipart": ("invalid_request", "Malformed request body"),
}


def _from_problem(exc: ProblemError) -> JSONResponse:
    code, title = _PROBLEM_CODES.get(exc.slug, (exc.slug.replace("-", "_"), exc.title))
    status = 400 if exc.slug in _PROBLEM_CODES else exc.status
    return errors_response(status, [{"title": title, "code": code, "detail": exc.detail}], exc.headers)


def refusal(request: Request, status: int, title: str, detail: str, headers: dict[str, str]) -> Response:
    """Access refused as remove.bg refuses it (serve_app/access.py calls this for
    /v1.0/): no valid `X-Api-Key` is 403 "Missing API Key" (or "Invalid API
    Key"), a used-up rate limit 429 "Rate limit exceeded" with `Retry-After`."""
    if status == 401:
        presented = request.headers.get("x-api-key") or request.headers.get("authorization")
        title = "Invalid API Key" if presented else "Missing API Key"
        return errors_response(403, [{"title": title, "detail": detail}])
    if status == 429:
        return errors_response(429, [{"title": "Rate limit exceeded", "detail": detail}], headers)
    return errors_response(status, [{"title": title, "detail": detail}], headers)


class RemoveBgErrorRoute(APIRoute):
    """An APIRoute whose errors are remove.bg's `{"errors": [...]}` bodies."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RemoveBgError as exc:
                entry = {"title": exc.title, "code": exc.code}
                if exc.detail:
                    entry["detail"] = exc.detail
                return errors_response(exc.status, [entry], exc.headers)
            except ProblemError as exc:
                return _from_problem(exc)
            except StarletteHTTPException as exc:
                return errors_response(exc.status_code, [{"title": str(exc.detail)}])

        return route


# remove.bg's error body; failures of the input are 400 with remove.bg's codes (_PROBLEM_CODES).
_ERRORS = {"type": "object", "required": ["errors"], "description": '`{"errors": [{"title", "code", "detail"}]}`',
           "properties": {"errors": {"type": "array", "items": {"type": "object"}}}}
router = APIRouter(route_class=RemoveBgErrorRoute, tags=["remove.bg compatible"],
                   responses=error_responses("application/json", _ERRORS))

# ----------------------------------------------------------------------------- parameters

# Largest result per `size` (pixels); None: the input's own resolution.
_SIZES: dict[str, int | None] = {
    "preview": 250_000, "small": 250_000, "regular": 250_000,
    "medium": 1_500_000, "hd": 4_000_000,
    "full": None, "4k": None, "auto": None, "50MP": None,
}
_TYPES = {"auto", "person", "product", "animal", "car", "car_interior", "car_part", "transportation",
          "graphics", "other"}
_TYPE_LEVELS = {"none", "1", "2", "latest"}
_FORMATS = {"auto", "png", "jpg", "zip"}
_CHANNELS = {"rgba", "alpha"}
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}
_UNSUPPORTED = {"scale": "original", "position": "original"}
_BG_SOURCES = ("bg_color", "bg_image_url", "bg_image_file")
_JPEG_MAX_SIDE = 65500  # libjpeg's JPEG_MAX_DIMENSION: a wider JPG cannot be written
_MARGIN_CAP_PX = 500  # remove.bg: at most 500 px (and 50 % of the subject) a side
_LENGTH = re.compile(r"^(\d+(?:\.\d+)?)(px|%)?$")

# A length: (value, relative) where relative means a fraction (0.1 for "10%").
Length = tuple[float, bool]


@dataclass(frozen=True)
class Options:
    """A request's parameters, checked."""

    max_pixels: int | None
    type: str
    type_level: str
    format: str
    channels: str
    bg_color: imaging.Color | None
    bg_image_url: str | None  # a background image to fetch
    bg_image_file: bool  # a background image uploaded with the request
    crop: bool
    crop_margin: tuple[Length, Length, Length, Length]  # top, right, bottom, left
    roi: tuple[Length, Length, Length, Length] | None  # x1, y1, x2, y2


def _choice(values: dict[str, str], name: str, allowed: set[str] | dict, default: str, code: str) -> str:
    value = values.get(name) or default
    if value not in allowed:
        raise _bad(code, f"Invalid value for parameter '{name}'",
                   f"{name} must be one of: {', '.join(sorted(allowed))}; got {value!r}")
    return value


def _flag(values: dict[str, str], name: str, default: bool) -> bool:
    value = (values.get(name) or "").strip().lower()
    if not value:
        return default
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise _bad(f"invalid_{name}", f"Invalid {name} parameter given", f"{name} must be true or false; got {value!r}")


def _lengths(text: str) -> list[Length]:
    lengths = []
    for part in text.split():
        match = _LENGTH.match(part)
        if match is None:
            raise ValueError(part)
        number, unit = float(match.group(1)), match.group(2)
        lengths.append((number / 100, True) if unit == "%" else (number, False))
    return lengths


def _crop_margin(text: str) -> tuple[Length, Length, Length, Length]:
    try:
        lengths = _lengths(text)
    except ValueError:
        lengths = []
    if len(lengths) == 1:
        return (lengths[0],) * 4
    if len(lengths) == 2:  # top/bottom, left/right
        return lengths[0], lengths[1], lengths[0], lengths[1]
    if len(lengths) == 4:
        return tuple(lengths)  # type: ignore[return-value]
    raise _bad("invalid_crop_margin", "Invalid crop_margin parameter given",
               f"crop_margin is one, two or four lengths like 30px or 10%; got {text!r}")


def _roi(text: str) -> tuple[Length, Length, Length, Length]:
    try:
        lengths = _lengths(text)
    except ValueError:
        lengths = []
    if len(lengths) != 4:
        raise _bad("invalid_roi", "Invalid roi parameter given",
                   f"roi is four coordinates x1 y1 x2 y2 in px or %, e.g. '0% 0% 100% 100%'; got {text!r}")
    return tuple(lengths)  # type: ignore[return-value]


def _color(text: str) -> imaging.Color:
    value = text.strip()
    # remove.bg writes hex codes without '#' (81d4fa, fff, 81d4fa77).
    if re.fullmatch(r"[0-9A-Fa-f]{3,4}|[0-9A-Fa-f]{6}|[0-9A-Fa-f]{8}", value):
        value = f"#{value}"
    try:
        return ImageColor.getrgb(value)
    except ValueError:
        raise _bad("invalid_bg_color", "Invalid bg_color parameter given",
                   f"bg_color is a hex colour (81d4fa, fff, 81d4fa77) or a colour name (green); got {text!r}") from None


def parse_options(values: dict[str, str], *, bg_image_file: bool = False) -> Options:
    """remove.bg's parameters from a request's fields, or the 400 remove.bg gives.

    ``bg_image_file`` says whether a background image came as a file (multipart);
    one sent as text is refused: its bytes are not an image's.
    """
    given = [name for name in _BG_SOURCES if values.get(name)]
    if bg_image_file and "bg_image_file" not in given:
        given.append("bg_image_file")
    if len(given) > 1:
        raise _bad("multiple_bg_sources", "Multiple background sources given: Please provide either the "
                   "bg_color, the bg_image_url or the bg_image_file parameter.")
    if values.get("bg_image_file") and not bg_image_file:
        raise _bad("invalid_bg_image_file", "Invalid bg_image_file parameter given",
                   "bg_image_file is a file: send it in a multipart/form-data body "
                   "(curl -F bg_image_file=@background.jpg), or pass its address as bg_image_url")
    for name, default in _UNSUPPORTED.items():
        if (values.get(name) or default) != default:
            raise _bad("unsupported_parameter", f"Parameter '{name}' is not supported by this server",
                       f"Strata does not implement remove.bg's {name}; leave it out")
    size = _choice(values, "size", _SIZES, "preview", "invalid_size")
    _flag(values, "add_shadow", False)
    _flag(values, "semitransparency", True)
    return Options(
        max_pixels=_SIZES[size],
        type=_choice(values, "type", _TYPES, "auto", "invalid_type"),
        type_level=_choice(values, "type_level", _TYPE_LEVELS, "1", "invalid_type_level"),
        format=_choice(values, "format", _FORMATS, "auto", "invalid_format"),
        channels=_choice(values, "channels", _CHANNELS, "rgba", "invalid_channels"),
        bg_color=_color(values["bg_color"]) if values.get("bg_color") else None,
        bg_image_url=values.get("bg_image_url") or None,
        bg_image_file=bg_image_file,
        crop=_flag(values, "crop", False),
        crop_margin=_crop_margin(values.get("crop_margin") or "0"),
        roi=_roi(values["roi"]) if values.get("roi") else None,
    )


# ----------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class RemoveBgRequest:
    """The fields of a request, whatever its content type, and the uploaded
    `image_file` and `bg_image_file`."""

    values: dict[str, str]
    image_file: bytes | None
    bg_image_file: bytes | None = None


def _as_field(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


async def read_request(request: Request, limits: UploadLimits) -> RemoveBgRequest:
    """The request's fields from a multipart, JSON or URL-encoded body, bounded while read."""
    # A base64 image is 4/3 the size of the file.
    max_b64_bytes = limits.max_upload_bytes * 4 // 3 + 4
    if is_multipart(request):
        form = await read_form(request, limits, max_field_bytes=max_b64_bytes)
        upload = form.files.get("image_file")
        background = form.files.get("bg_image_file")
        # An empty file part is what a browser sends for a file input left blank: no background.
        return RemoveBgRequest(dict(form.fields), upload.data if upload else None,
                               background.data if background and background.data else None)
    body = await read_body(request, max_b64_bytes + 64 * 1024, limits.upload_timeout_s)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            fields = json.loads(body or b"{}")
        except ValueError as exc:
            raise _bad("invalid_request", "Malformed JSON body", str(exc)) from exc
        if not isinstance(fields, dict):
            raise _bad("invalid_request", "Malformed JSON body", "the body must be a JSON object")
        return RemoveBgRequest({key: _as_field(value) for key, value in fields.items()}, None)
    if content_type in ("application/x-www-form-urlencoded", ""):
        try:
            pairs = parse_qsl(body.decode("latin-1"), keep_blank_values=True)
        except ValueError as exc:
            raise _bad("invalid_request", "Malformed form body", str(exc)) from exc
        values: dict[str, str] = {}
        for key, value in pairs:
            values.setdefault(key, value)
        return RemoveBgRequest(values, None)
    raise _bad("invalid_request", "Unsupported content type",
               "send multipart/form-data, application/json or application/x-www-form-urlencoded")


def _decode_b64(text: str) -> bytes:
    text = re.sub(r"^data:[^,]*;base64,", "", text.strip())  # tolerate a data: URL
    try:
        return base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise _bad("failed_to_read_image", "There was an error reading the image.",
                   "image_file_b64 is not valid base64") from None


def _image_source(request: RemoveBgRequest) -> str:
    """The one image source the request names, or remove.bg's 400."""
    sources = [name for name, given in (("image_file", request.image_file is not None),
                                        ("image_file_b64", bool(request.values.get("image_file_b64"))),
                                        ("image_url", bool(request.values.get("image_url")))) if given]
    if not sources:
        raise _bad("missing_source", "No image given",
                   "Please provide the source image in the image_url, image_file or image_file_b64 parameter.")
    if len(sources) > 1:
        raise _bad("multiple_sources", "Multiple image sources given: Please provide either the image_url, "
                   "image_file or image_file_b64 parameter.")
    return sources[0]


async def _image_bytes(request: RemoveBgRequest, service: StrataService) -> bytes:
    """The image from the request's one source: uploaded, base64 or fetched."""
    source = _image_source(request)
    if source == "image_file":
        return request.image_file  # type: ignore[return-value]
    if source == "image_file_b64":
        return await run_in_threadpool(_decode_b64, request.values["image_file_b64"])  # CPU work
    url = request.values["image_url"]
    try:
        # Fetched from public addresses only, within the url_inputs limits (serve_app/url_inputs.py).
        return await service.fetch_image_url(url)
    except ProblemError as exc:
        if exc.slug in ("invalid-url", "url-refused"):
            raise _bad("invalid_image_url", "Invalid image_url: Please provide a valid URL.", exc.detail) from exc
        if exc.slug in ("url-fetch-failed", "url-timeout"):
            raise _bad("failed_image_download", f"Failed to download image from given image_url: {url}",
                       exc.detail) from exc
        if exc.slug == "url-too-large":
            raise _bad("file_too_large", "File too large", exc.detail) from exc
        raise


async def _background_bytes(request: RemoveBgRequest, options: Options, service: StrataService) -> bytes | None:
    """The background image's bytes, uploaded or fetched; None when the request names none."""
    if options.bg_image_file:
        return request.bg_image_file
    url = options.bg_image_url
    if url is None:
        return None
    try:
        # The same fetcher as image_url: public addresses only, within the url_inputs limits.
        return await service.fetch_image_url(url)
    except ProblemError as exc:
        if exc.slug in ("invalid-url", "url-refused"):
            raise _bad("invalid_bg_image_url", "Invalid bg_image_url: Please provide a valid URL.",
                       exc.detail) from exc
        if exc.slug in ("url-fetch-failed", "url-timeout"):
            raise _bad("failed_bg_download", f"Failed to download background image from given bg_image_url: {url}",
                       exc.detail) from exc
        if exc.slug == "url-too-large":
            raise _bad("file_too_large", "File too large", f"the background image: {exc.detail}") from exc
        raise


def decode_background(data: bytes, limits: UploadLimits) -> imaging.DecodedImage:
    """The background image, within `limits.max_pixels` (checked from its header before
    decoding), or remove.bg's 400 for it. Any size from 1 px will do: it is resized to
    the result's canvas, so the inputs' `min_side` does not apply."""
    try:
        return imaging.decode_image(data, imaging.ImageLimits(max_pixels=limits.max_pixels, min_side=1))
    except imaging.ImageRejected as exc:
        code, title = _PROBLEM_CODES.get(exc.code, ("failed_to_read_image", "There was an error reading the image."))
        raise _bad(code, title, f"the background image: {exc.detail}") from exc


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Result:
    data: bytes
    media_type: str
    width: int
    height: int
    foreground: tuple[int, int, int, int]  # top, left, width, height in the result


def _pixels(length: Length, extent: int) -> float:
    value, relative = length
    return value * extent if relative else value


def _apply_roi(alpha: np.ndarray, roi: tuple[Length, ...], input_size: tuple[int, int]) -> np.ndarray:
    """The alpha with everything outside the region of interest made background.
    Pixel coordinates refer to the uploaded image (before a `size` downscale)."""
    in_w, in_h = input_size
    x1, y1, x2, y2 = (_pixels(roi[0], in_w), _pixels(roi[1], in_h), _pixels(roi[2], in_w), _pixels(roi[3], in_h))
    if x2 > in_w or y2 > in_h:
        raise _bad("roi_exceeds_bounds", "ROI exceeds image bounds",
                   "The given roi parameter defines a region that exceeds the image bounds")
    if x2 <= x1 or y2 <= y1:
        raise _bad("roi_region_empty", "ROI region is empty", "The given roi parameter defines an empty region")
    height, width = alpha.shape
    sx, sy = width / in_w, height / in_h
    left, top = int(round(x1 * sx)), int(round(y1 * sy))
    right, bottom = int(round(x2 * sx)), int(round(y2 * sy))
    kept = np.zeros_like(alpha)
    kept[top:bottom, left:right] = alpha[top:bottom, left:right]
    return kept


def _margin_px(margin: tuple[Length, ...], width: int, height: int) -> tuple[int, int, int, int]:
    """(top, right, bottom, left) in pixels for a subject of `width` x `height`, capped as remove.bg caps."""
    extents = (height, width, height, width)
    return tuple(int(round(min(_pixels(length, extent), extent / 2, _MARGIN_CAP_PX)))  # type: ignore[return-value]
                 for length, extent in zip(margin, extents))


def _opaque(color: imaging.Color) -> tuple[int, int, int]:
    """A colour flattened onto white (what a JPG can show of a translucent background)."""
    if len(color) == 3:
        return color  # type: ignore[return-value]
    a = color[3] / 255
    return tuple(int(round(c * a + 255 * (1 - a))) for c in color[:3])  # type: ignore[return-value]


def cover(background: imaging.DecodedImage, width: int, height: int) -> np.ndarray:
    """The background at `width` x `height` as remove.bg lays it: centered and resized
    to fill the canvas, aspect kept (the overhang cut off evenly), unless it already has
    that size. RGB, or RGBA when the background has an alpha channel of its own."""
    pixels = imaging.to_rgba(background) if background.alpha is not None else background.rgb
    if (background.width, background.height) == (width, height):
        return pixels
    scale = max(width / background.width, height / background.height)
    # Rounding may leave a side a pixel short of the canvas: never less than the canvas.
    size = (max(width, round(background.width * scale)), max(height, round(background.height * scale)))
    resized = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.ascontiguousarray(resized[top : top + height, left : left + width])


def over(cutout: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The RGBA `cutout` laid over a `background` of its size ("over" compositing): RGB
    for an opaque (RGB) background, RGBA where the background has its own alpha."""
    alpha = cutout[..., 3]
    if background.shape[2] == 3:
        weight = np.multiply(alpha, np.float32(1 / 255), dtype=np.float32)
        return cv2.blendLinear(np.ascontiguousarray(cutout[..., :3]), background, weight, 1.0 - weight)
    a = np.multiply(alpha, np.float32(1 / 255), dtype=np.float32)[..., None]
    below = np.multiply(background[..., 3:], np.float32(1 / 255), dtype=np.float32) * (1 - a)
    out_a = a + below
    colour = (cutout[..., :3] * a + background[..., :3] * below) / np.maximum(out_a, np.float32(1e-6))
    result = np.empty(cutout.shape, np.uint8)
    result[..., :3] = np.rint(np.clip(colour, 0, 255))
    result[..., 3] = np.rint(out_a[..., 0] * 255)
    return result


def _zip(color_jpg: bytes, alpha_png: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("color.jpg", color_jpg)
        archive.writestr("alpha.png", alpha_png)
    return buf.getvalue()


def _too_large_for_jpg(width: int, height: int) -> RemoveBgError:
    return _bad("resolution_too_high", "Image resolution too high for JPG",
                f"the result is {width}x{height}; a JPG holds at most {_JPEG_MAX_SIDE} px a side: "
                "ask for format=png")


def render(matte: Matte, options: Options, background: imaging.DecodedImage | None = None) -> Result:
    """remove.bg's result for a matte: the subject, cropped, over its background (a
    colour or `background`, an image), in the asked format. The background applies to
    `channels=rgba` results; `format=zip` and `channels=alpha` are the subject alone."""
    alpha = matte.alpha if options.roi is None else _apply_roi(matte.alpha, options.roi, matte.input_size)
    box = imaging.crop_box(alpha)
    if box is None:
        raise _bad("unknown_foreground", "Could not identify foreground in image. For details and "
                   "recommendations see https://www.remove.bg/supported-images.")
    left, top, right, bottom = box
    margin = _margin_px(options.crop_margin, right - left, bottom - top) if options.crop else (0, 0, 0, 0)
    foreground = (margin[0], margin[3]) if options.crop else (top, left)
    framing = {"crop": options.crop, "crop_margin": (lambda _w, _h: margin) if options.crop else None}

    def pixels(output: str, bg_color: imaging.Color | None = None) -> np.ndarray:
        return imaging.cutout_pixels(matte.image, alpha, output=output, bg_color=bg_color,
                                     refine_foreground=output != "mask", **framing)

    if options.format == "zip":
        colour = pixels("color")
        if max(colour.shape[:2]) > _JPEG_MAX_SIDE:
            raise _too_large_for_jpg(colour.shape[1], colour.shape[0])
        data, media_type = _zip(imaging.encode_jpeg(colour), imaging.encode_png(pixels("mask"))), "application/zip"
        height, width = colour.shape[:2]
    else:
        if options.channels == "alpha":
            result = pixels("mask")
        elif background is not None:
            cutout = pixels("cutout")
            result = over(cutout, cover(background, cutout.shape[1], cutout.shape[0]))
        elif options.format == "jpg":
            result = pixels("cutout", _opaque(options.bg_color or (255, 255, 255)))
        else:
            result = pixels("cutout", options.bg_color)
        if options.format == "jpg" and result.ndim == 3 and result.shape[2] == 4:
            # A JPG shows a translucent background as it looks on white.
            result = over(result, np.full((*result.shape[:2], 3), 255, np.uint8))
        if options.format == "auto" and result.ndim == 3 and result.shape[2] == 4 and result[..., 3].min() == 255:
            result = np.ascontiguousarray(result[..., :3])  # nothing is transparent: auto gives a JPG
        jpg = options.format == "jpg" or (options.format == "auto" and options.channels == "rgba"
                                          and result.ndim == 3 and result.shape[2] == 3)
        if jpg and max(result.shape[:2]) > _JPEG_MAX_SIDE:
            if options.format == "jpg":
                raise _too_large_for_jpg(result.shape[1], result.shape[0])
            jpg = False  # auto: a PNG holds what a JPG cannot
        data = imaging.encode_jpeg(result) if jpg else imaging.encode_png(result)
        media_type = "image/jpeg" if jpg else "image/png"
        height, width = result.shape[:2]
    return Result(data, media_type, width, height, (*foreground, right - left, bottom - top))


# ----------------------------------------------------------------------------- the route


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "").lower()


@router.post(
    "/v1.0/removebg",
    summary="remove.bg: remove the background of an image",
    response_class=Response,
    responses={200: {"description": "The result image (or ZIP), or JSON with Accept: application/json",
                     "content": {"image/png": {}, "image/jpeg": {}, "application/zip": {},
                                 "application/json": {}}}},
    openapi_extra={"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image_file": {"type": "string", "format": "binary"},
            "bg_image_file": {"type": "string", "format": "binary"},
            **{name: {"type": "string"} for name in (
                "image_file_b64", "image_url", "size", "type", "type_level", "format", "roi", "crop",
                "crop_margin", "channels", "bg_color", "bg_image_url", "add_shadow", "semitransparency")}}}},
        "application/json": {"schema": {"type": "object"}},
        "application/x-www-form-urlencoded": {"schema": {"type": "object"}},
    }}},
)
async def remove_background(request: Request, service: CurrentService) -> Response:
    limits = service.config.limits
    fields = await read_request(request, limits)
    options = parse_options(fields.values, bg_image_file=fields.bg_image_file is not None)
    data = await _image_bytes(fields, service)
    background_data = await _background_bytes(fields, options, service)
    # Decoded before the model runs, so a bad background costs no model call. (In the
    # thread pool: a rare request, not worth sizing up for cpu_steps.)
    background = (None if background_data is None
                  else await run_in_threadpool(decode_background, background_data, limits))
    with service.cpu_steps.request():
        matte = await service.matte(data, service.config.default_model, max_pixels=options.max_pixels)
        result = await service.cpu_steps.run(matte.pixels, render, matte, options, background)
    service.request_metrics.observe("/v1.0/removebg", matte.model, matte.elapsed_ms() / 1000)
    top, left, fg_width, fg_height = result.foreground
    headers = {
        "X-Width": str(result.width),
        "X-Height": str(result.height),
        "X-Credits-Charged": "0",
        "X-Foreground-Top": str(top),
        "X-Foreground-Left": str(left),
        "X-Foreground-Width": str(fg_width),
        "X-Foreground-Height": str(fg_height),
        **engine_headers(matte),
    }
    if options.type != "auto" and options.type_level != "none":
        headers["X-Type"] = options.type
    if _wants_json(request):
        return JSONResponse({"data": {
            "result_b64": base64.b64encode(result.data).decode("ascii"),
            "foreground_top": top, "foreground_left": left,
            "foreground_width": fg_width, "foreground_height": fg_height,
        }}, headers=headers)
    return Response(result.data, media_type=result.media_type, headers=headers)
