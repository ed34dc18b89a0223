"""ZIP, PSD and manifest exports of layer results (layer 1 = bottom)."""

from __future__ import annotations

import io
import json
import zipfile
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

from serve_app.exports import (
    build_manifest,
    layer_bbox,
    layer_filename,
    layer_info,
    layers_psd,
    layers_zip,
)

H, W = 36, 52


def _png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _stack() -> tuple[list[np.ndarray], list[str]]:
    """Background (opaque, noisy), a half-transparent patch, a soft-edged patch, an empty layer."""
    rng = np.random.default_rng(7)
    background = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    background[..., 3] = 255
    patch = np.zeros((H, W, 4), np.uint8)
    patch[4:20, 6:30, :3] = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    patch[4:20, 6:30, 3] = rng.integers(1, 256, (16, 24), dtype=np.uint8)
    soft = np.zeros((H, W, 4), np.uint8)
    soft[18:33, 30:49] = (250, 20, 120, 255)
    soft[18, 30:49, 3] = 40  # anti-aliased top edge
    empty = np.zeros((H, W, 4), np.uint8)
    return [background, patch, soft, empty], ["Background", "Patch", "Soft", "Empty"]


def _over(layers: list[np.ndarray]) -> np.ndarray:
    """Straight-alpha "over" of the stack, bottom first, as float RGBA 0..255."""
    color = np.zeros((H, W, 3), np.float64)
    alpha = np.zeros((H, W, 1), np.float64)
    for layer in layers:
        a = layer[..., 3:4] / 255.0
        color = layer[..., :3] * a + color * (1 - a)
        alpha = a + alpha * (1 - a)
    out_color = np.divide(color, alpha, out=np.zeros_like(color), where=alpha > 0)
    return np.concatenate([out_color, alpha * 255], axis=2)


def _canvas_from_psd_layer(layer) -> np.ndarray:
    """A psd-tools layer placed back on the full canvas, as RGBA uint8."""
    canvas = np.zeros((H, W, 4), np.uint8)
    if layer.width and layer.height:
        pixels = np.asarray(layer.topil().convert("RGBA"))
        canvas[layer.top : layer.top + layer.height, layer.left : layer.left + layer.width] = pixels
    return canvas


# ------------------------------------------------------------------ bounding boxes


def test_layer_bbox_is_the_extent_of_nonzero_alpha():
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[5:9, 10:21, :3] = 255  # colour without alpha is not content
    rgba[7, 12, 3] = 1
    rgba[11, 30, 3] = 200
    assert layer_bbox(rgba) == [12, 7, 19, 5]


def test_layer_bbox_of_an_empty_layer_is_none():
    assert layer_bbox(np.zeros((H, W, 4), np.uint8)) is None


# ------------------------------------------------------------------ ZIP


def test_zip_holds_one_png_per_layer_in_order():
    layers, _ = _stack()
    data = layers_zip([_png(layer) for layer in layers])
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist() == ["layer_01.png", "layer_02.png", "layer_03.png", "layer_04.png"]
        for name, layer in zip(zf.namelist(), layers):
            decoded = np.asarray(Image.open(io.BytesIO(zf.read(name))).convert("RGBA"))
            assert decoded.shape == (H, W, 4)  # full canvas size
            np.testing.assert_array_equal(decoded, layer)


def test_zip_carries_the_manifest_after_the_layers_when_given():
    layers, names = _stack()
    manifest = build_manifest(
        job_id="j1", layers=layer_info(layers, names), width=W, height=H,
        model="classic", engine="classic-palette", params={"layers": 4},
    )
    data = layers_zip([_png(layer) for layer in layers], manifest=manifest)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.namelist()[-1] == "manifest.json"
        assert json.loads(zf.read("manifest.json")) == manifest


def test_layer_file_names_count_from_one():
    assert [layer_filename(i) for i in (1, 2, 10)] == ["layer_01.png", "layer_02.png", "layer_10.png"]
    with pytest.raises(ValueError):
        layer_filename(0)


# ------------------------------------------------------------------ PSD


def test_psd_has_one_named_pixel_layer_per_layer_in_order():
    from psd_tools import PSDImage

    layers, names = _stack()
    psd = PSDImage.open(io.BytesIO(layers_psd(layers, names)))
    assert psd.size == (W, H)
    assert [layer.name for layer in psd] == names  # psd[0] is the bottom
    assert all(layer.kind == "pixel" and layer.visible for layer in psd)
    for psd_layer, layer in zip(psd, layers):
        back = _canvas_from_psd_layer(psd_layer)
        np.testing.assert_array_equal(back[..., 3], layer[..., 3])
        # Fully transparent pixels have no colour; every other pixel keeps its own.
        visible = layer[..., 3] > 0
        np.testing.assert_array_equal(back[visible][:, :3], layer[visible][:, :3])


def test_psd_layers_are_cropped_to_their_content_at_its_offset():
    from psd_tools import PSDImage

    layers, names = _stack()
    psd = PSDImage.open(io.BytesIO(layers_psd(layers, names)))
    for psd_layer, layer in zip(psd, layers):
        bbox = layer_bbox(layer)
        if bbox is None:
            assert (psd_layer.width, psd_layer.height) == (0, 0)
        else:
            assert [psd_layer.left, psd_layer.top, psd_layer.width, psd_layer.height] == bbox


def test_psd_merged_image_shows_the_stack_with_transparency():
    from psd_tools import PSDImage

    layers, names = _stack()
    # Without the opaque background, so the merged image has transparent parts.
    psd = PSDImage.open(io.BytesIO(layers_psd(layers[1:], names[1:])))
    assert psd.has_preview()
    merged = np.asarray(psd.topil()).astype(np.float64)
    assert merged.shape == (H, W, 4)
    expected = _over(layers[1:])
    np.testing.assert_allclose(merged[..., 3], expected[..., 3], atol=1)
    # Compared premultiplied: 8-bit straight colour is coarse where alpha is tiny.
    premultiplied = merged[..., :3] * merged[..., 3:] / 255
    np.testing.assert_allclose(premultiplied, expected[..., :3] * expected[..., 3:] / 255, atol=1.5)


def test_psd_keeps_names_in_any_script():
    from psd_tools import PSDImage

    layers, _ = _stack()
    names = ["Hintergrund", "Schrift ü", "背景の花", "🙂"]
    psd = PSDImage.open(io.BytesIO(layers_psd(layers, names)))
    assert [layer.name for layer in psd] == names


def test_psd_reads_the_same_in_an_independent_reader():
    """Pillow's PSD reader (not psd-tools) sees the same layers, bottom first."""
    layers, names = _stack()
    image = Image.open(io.BytesIO(layers_psd(layers, names)))
    assert image.mode == "RGBA" and image.size == (W, H)
    seen = [(name, bbox) for name, _mode, bbox, _tile in image.layers]
    expected = [
        (name, (b[0], b[1], b[0] + b[2], b[1] + b[3]) if (b := layer_bbox(layer)) else (0, 0, 0, 0))
        for layer, name in zip(layers, names)
    ]
    assert seen == expected


def test_exports_refuse_layers_of_different_sizes():
    layers, names = _stack()
    layers[2] = np.zeros((H + 1, W, 4), np.uint8)
    with pytest.raises(ValueError):
        layers_psd(layers, names)
    with pytest.raises(ValueError):
        layer_info(layers, names)


# ------------------------------------------------------------------ manifest


def test_manifest_describes_each_layer_bottom_first():
    layers, names = _stack()
    created = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    manifest = build_manifest(
        job_id="abc",
        layers=layer_info(layers, names),
        width=W,
        height=H,
        model="qwen-image-layered",
        engine="diffusers",
        params={"layers": 4, "seed": 1},
        created_at=created,
        timings={"model_ms": 1234.5},
    )
    json.dumps(manifest)  # JSON-ready as it is
    assert manifest["order"] == "bottom_to_top"
    assert manifest["canvas"] == {"width": W, "height": H}
    assert (manifest["model"], manifest["engine"]) == ("qwen-image-layered", "diffusers")
    assert manifest["params"] == {"layers": 4, "seed": 1}
    assert manifest["timings"] == {"model_ms": 1234.5}
    assert manifest["created_at"] == "2030-01-02T03:04:05+00:00"
    assert [entry["index"] for entry in manifest["layers"]] == [1, 2, 3, 4]
    assert [entry["name"] for entry in manifest["layers"]] == names
    assert [entry["file"] for entry in manifest["layers"]] == [layer_filename(i) for i in (1, 2, 3, 4)]
    assert [entry["bbox"] for entry in manifest["layers"]] == [layer_bbox(layer) for layer in layers]
    assert all((entry["width"], entry["height"]) == (W, H) for entry in manifest["layers"])
