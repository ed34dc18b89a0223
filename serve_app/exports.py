"""Layer-decomposition results as files: ZIP, PSD and manifest.json.

Layers are numbered back to front from 1 (1 = bottom, drawn first). Every layer
is an RGBA uint8 array of the full canvas size (HxWx4, straight alpha).

- :func:`layers_zip`: ``layer_01.png``, ``layer_02.png``, ... in stacking order,
  then ``manifest.json`` when one is given (so a downloaded ZIP says by itself
  which file is which layer, its name and where its content is).
- :func:`layers_psd`: an RGBA PSD with one named pixel layer per layer, bottom
  first (PSD stores layer records bottom to top; psd-tools lists ``psd[0]`` as
  the bottom), each cropped to its content's bounding box at the matching offset,
  plus a merged image with transparency for viewers that read only that.
- :func:`layers_pptx`: a PowerPoint deck of one slide with the canvas's aspect,
  each layer a full-slide picture (its PNG, unchanged), bottom first, named, as
  the Qwen-Image-Layered reference app exports them.
- :func:`layer_info` / :func:`build_manifest`: the JSON description.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np

__all__ = [
    "MANIFEST_NAME",
    "PSD_MAX_SIDE",
    "build_manifest",
    "layer_bbox",
    "layer_filename",
    "layer_info",
    "layers_pptx",
    "layers_psd",
    "layers_zip",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "strata.layers/v1"
_MAX_PSD_NAME = 255  # PSD's Unicode layer-name limit
PSD_MAX_SIDE = 30_000  # a PSD's largest width or height (psd-tools refuses more)
# A slide is sized at 96 pixels per inch (the reference app's choice), within the
# 1 to 56 inch sides PowerPoint accepts (ECMA-376 ST_SlideSizeCoordinate).
_EMU_PER_INCH = 914_400
_PPTX_DPI = 96
_MIN_SLIDE_EMU, _MAX_SLIDE_EMU = 914_400, 51_206_400


def layer_filename(index: int) -> str:
    """``layer_01.png`` for layer 1 (the bottom)."""
    if index < 1:
        raise ValueError("layers are numbered from 1")
    return f"layer_{index:02d}.png"


def _check_layers(layers: Sequence[np.ndarray], names: Sequence[str] | None = None) -> tuple[int, int]:
    if not layers:
        raise ValueError("no layers")
    if names is not None and len(names) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(names)} names")
    first = layers[0]
    for i, layer in enumerate(layers, 1):
        if layer.dtype != np.uint8 or layer.ndim != 3 or layer.shape[2] != 4:
            raise ValueError(f"layer {i} must be HxWx4 uint8 RGBA, got {layer.dtype} {layer.shape}")
        if layer.shape != first.shape:
            raise ValueError(f"layer {i} is {layer.shape[1]}x{layer.shape[0]}, the canvas {first.shape[1]}x{first.shape[0]}")
    height, width = first.shape[:2]
    return width, height


def layer_bbox(rgba: np.ndarray) -> list[int] | None:
    """``[x, y, w, h]`` of the pixels with alpha > 0; None for an empty layer."""
    alpha = rgba[..., 3]
    rows = np.flatnonzero(alpha.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(alpha.any(axis=0))
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    return [x0, y0, x1 - x0, y1 - y0]


def layer_info(layers: Sequence[np.ndarray], names: Sequence[str]) -> list[dict[str, Any]]:
    """One entry per layer, bottom first: ``index`` (1 = bottom), ``name``,
    ``file``, ``width``, ``height`` (the canvas) and ``bbox`` (``[x, y, w, h]`` of
    the content, or None when the layer is empty). The job's ``result.layers``
    is this plus a ``url``."""
    _check_layers(layers, names)
    return [
        {
            "index": i,
            "name": name,
            "file": layer_filename(i),
            "width": int(layer.shape[1]),
            "height": int(layer.shape[0]),
            "bbox": layer_bbox(layer),
        }
        for i, (layer, name) in enumerate(zip(layers, names), 1)
    ]


def layers_zip(pngs: Sequence[bytes], *, manifest: Mapping[str, Any] | None = None) -> bytes:
    """A ZIP of ``layer_01.png``, ``layer_02.png``, ... (bottom first, in that
    order), then ``manifest.json`` when given. PNGs are stored, not deflated
    again (they are compressed already)."""
    if not pngs:
        raise ValueError("no layers")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, png in enumerate(pngs, 1):
            zf.writestr(layer_filename(i), png)
        if manifest is not None:
            zf.writestr(
                MANIFEST_NAME,
                json.dumps(manifest, indent=2, ensure_ascii=False, default=_json_default),
                compress_type=zipfile.ZIP_DEFLATED,
            )
    return buf.getvalue()


def layers_psd(layers: Sequence[np.ndarray], names: Sequence[str]) -> bytes:
    """An 8-bit RGBA PSD: one named pixel layer per layer, layer 1 at the bottom,
    each cropped to its content's bounding box at the right offset (an empty
    layer is kept as an empty layer), RLE-compressed like Photoshop's own files,
    with a merged image (with transparency) of the whole stack."""
    from psd_tools import PSDImage  # noqa: PLC0415 -- a heavy import, needed only here
    from psd_tools.api.layers import PixelLayer  # noqa: PLC0415
    from psd_tools.constants import Compression  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    width, height = _check_layers(layers, names)
    psd = PSDImage.new("RGBA", (width, height), color=(0, 0, 0, 0))
    for layer, name in zip(layers, names):
        bbox = layer_bbox(layer)
        if bbox is None:
            x, y, crop = 0, 0, Image.new("RGBA", (0, 0))
        else:
            x, y, w, h = bbox
            crop = Image.fromarray(np.ascontiguousarray(layer[y : y + h, x : x + w]), "RGBA")
        # frompil puts the new layer on top of the document's stack (psd-tools >= 1.26).
        added = PixelLayer.frompil(crop, psd, name="Layer", top=y, left=x, compression=Compression.RLE)
        # The setter, unlike frompil, also writes the Unicode name (non-Latin names
        # would fail frompil's Mac Roman encoding) and a legacy fallback.
        added.name = _psd_name(name)
        # ... which is "?" for a name Mac Roman cannot spell; keep what it can
        # for readers of the legacy name only (Pillow, old tools).
        added._record.name = _psd_name(name).encode("mac_roman", "replace").decode("mac_roman")
    # A negative layer count tells readers (Photoshop, psd-tools, Preview) that
    # the merged image's extra channel is its transparency, not a spare alpha.
    psd._merged_alpha = True
    psd._record.layer_and_mask_information.layer_info.layer_count = -len(layers)
    buf = io.BytesIO()
    psd.save(buf)  # composites the merged image from the layers
    return buf.getvalue()


def layers_pptx(layers: Sequence[bytes], names: Sequence[str], width: int, height: int) -> bytes:
    """A PPTX with one blank slide of the canvas's aspect holding one picture per
    layer, layer 1 (the bottom) first so later layers draw over it, each covering
    the whole slide and named as its layer.

    :param layers: the layers' full-canvas RGBA PNGs, bottom first; they are
        embedded as they are, so the deck holds the same pixels.
    :param width, height: the canvas in pixels; each PNG must be this size.

    The slide is ``width`` x ``height`` at 96 px per inch, scaled as a whole when a
    side would fall outside PowerPoint's 1 to 56 inches (an aspect beyond 56:1 is
    clamped: PowerPoint has no slide that shape).
    """
    from pptx import Presentation  # noqa: PLC0415 -- needed only here
    from pptx.util import Emu  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    if not layers:
        raise ValueError("no layers")
    if len(names) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(names)} names")
    for i, png in enumerate(layers, 1):
        with Image.open(io.BytesIO(png)) as image:  # reads the header only
            if image.size != (width, height):
                raise ValueError(f"layer {i} is {image.width}x{image.height}, the canvas {width}x{height}")
    slide_w, slide_h = _slide_size(width, height)
    deck = Presentation()
    deck.slide_width, deck.slide_height = Emu(slide_w), Emu(slide_h)
    slide = deck.slides.add_slide(deck.slide_layouts[6])  # the default template's "Blank"
    for png, name in zip(layers, names):
        picture = slide.shapes.add_picture(io.BytesIO(png), 0, 0, width=Emu(slide_w), height=Emu(slide_h))
        picture.name = _pptx_name(name)
    buf = io.BytesIO()
    deck.save(buf)
    return buf.getvalue()


def _slide_size(width: int, height: int) -> tuple[int, int]:
    """The slide's sides in EMU for a ``width`` x ``height`` pixel canvas."""
    if width < 1 or height < 1:
        raise ValueError(f"a {width}x{height} canvas has no area")
    emu_w, emu_h = width * _EMU_PER_INCH / _PPTX_DPI, height * _EMU_PER_INCH / _PPTX_DPI
    scale = min(1.0, _MAX_SLIDE_EMU / max(emu_w, emu_h))
    scale = max(scale, _MIN_SLIDE_EMU / min(emu_w, emu_h))

    def clamp(emu: float) -> int:
        return min(_MAX_SLIDE_EMU, max(_MIN_SLIDE_EMU, round(emu * scale)))

    return clamp(emu_w), clamp(emu_h)


def _pptx_name(name: str) -> str:
    # XML 1.0 cannot hold most control characters; lxml refuses them.
    name = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", name).strip()
    return name or "Layer"


def _psd_name(name: str) -> str:
    name = name.replace("\x00", "").strip() or "Layer"
    return name[:_MAX_PSD_NAME]


def build_manifest(
    *,
    job_id: str,
    layers: Sequence[Mapping[str, Any]],
    width: int,
    height: int,
    model: str,
    engine: str,
    params: Mapping[str, Any],
    kind: str = "layers",
    created_at: datetime | None = None,
    started_at: datetime | None = None,
    finished_at: datetime | None = None,
    timings: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``manifest.json`` of a finished layer job (JSON-ready: times become
    ISO 8601 strings).

    :param layers: :func:`layer_info` entries (extra keys, e.g. ``url``, are kept).
    :param timings: durations in milliseconds, e.g. ``{"queue_ms": .., "model_ms": ..}``.
    """
    ordered = sorted((dict(entry) for entry in layers), key=lambda entry: entry["index"])
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "job_id": job_id,
        "kind": kind,
        "model": model,
        "engine": engine,
        "canvas": {"width": int(width), "height": int(height)},
        "order": "bottom_to_top",
        "layer_count": len(ordered),
        "layers": ordered,
        "params": dict(params),
        "created_at": _iso(created_at),
        "started_at": _iso(started_at),
        "finished_at": _iso(finished_at),
        "timings": {k: float(v) for k, v in (timings or {}).items()},
    }
    if extra:
        manifest.update(extra)
    return manifest


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
