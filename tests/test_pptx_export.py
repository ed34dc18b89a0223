"""PPTX export of layer results: one slide, one full-canvas picture per layer,
bottom first, read back with python-pptx."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pptx import Presentation
from pptx.enum.shapes import MSO_SHAPE_TYPE

from serve_app.exports import layers_pptx

H, W = 36, 52
EMU_PER_PX = 9525  # 914400 EMU per inch / 96 px per inch


def _png(rgba: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _layers(width: int = W, height: int = H) -> tuple[list[np.ndarray], list[str]]:
    """An opaque noisy background, a half-transparent patch, a soft patch, an empty layer."""
    rng = np.random.default_rng(11)
    background = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    background[..., 3] = 255
    patch = np.zeros((height, width, 4), np.uint8)
    patch[2:12, 3:20, :3] = rng.integers(0, 256, (10, 17, 3), dtype=np.uint8)
    patch[2:12, 3:20, 3] = rng.integers(1, 256, (10, 17), dtype=np.uint8)
    soft = np.zeros((height, width, 4), np.uint8)
    soft[10:30, 25:45] = (250, 20, 120, 255)
    soft[10, 25:45, 3] = 40
    empty = np.zeros((height, width, 4), np.uint8)
    return [background, patch, soft, empty], ["Layer 1 (background)", "Layer 2", "Layer 3", "Layer 4"]


def _read(data: bytes):
    deck = Presentation(io.BytesIO(data))
    return deck, list(deck.slides)


def test_the_deck_has_one_slide_with_one_picture_per_layer():
    layers, names = _layers()
    _, slides = _read(layers_pptx([_png(layer) for layer in layers], names, W, H))
    assert len(slides) == 1
    shapes = list(slides[0].shapes)
    assert len(shapes) == len(layers)
    assert all(shape.shape_type == MSO_SHAPE_TYPE.PICTURE for shape in shapes)


def test_the_slide_is_the_canvas_at_96_pixels_per_inch():
    width, height = 480, 288
    layers, names = _layers(width, height)
    deck, _ = _read(layers_pptx([_png(layer) for layer in layers], names, width, height))
    assert (deck.slide_width, deck.slide_height) == (width * EMU_PER_PX, height * EMU_PER_PX)


def test_a_small_slide_keeps_the_canvas_aspect():
    layers, names = _layers()
    deck, _ = _read(layers_pptx([_png(layer) for layer in layers], names, W, H))
    assert deck.slide_height == 914400  # the 36 px side becomes PowerPoint's smallest, one inch
    assert deck.slide_width == round(914400 * W / H)


def test_every_picture_covers_the_whole_slide():
    layers, names = _layers()
    deck, slides = _read(layers_pptx([_png(layer) for layer in layers], names, W, H))
    for shape in slides[0].shapes:
        assert (shape.left, shape.top) == (0, 0)
        assert (shape.width, shape.height) == (deck.slide_width, deck.slide_height)
        assert (shape.crop_left, shape.crop_top, shape.crop_right, shape.crop_bottom) == (0, 0, 0, 0)


def test_pictures_are_stacked_bottom_first_and_named_as_the_layers():
    layers, names = _layers()
    _, slides = _read(layers_pptx([_png(layer) for layer in layers], names, W, H))
    # A slide's shape tree is its z-order: the first shape is drawn first (bottom).
    assert [shape.name for shape in slides[0].shapes] == names


def test_the_embedded_images_are_the_layer_pngs_pixel_for_pixel():
    layers, names = _layers()
    pngs = [_png(layer) for layer in layers]
    _, slides = _read(layers_pptx(pngs, names, W, H))
    for shape, png, layer in zip(slides[0].shapes, pngs, layers):
        assert shape.image.content_type == "image/png"
        assert shape.image.blob == png
        embedded = np.asarray(Image.open(io.BytesIO(shape.image.blob)))
        assert embedded.shape == (H, W, 4) and np.array_equal(embedded, layer)


def test_identical_layers_each_keep_their_picture():
    empty = _png(np.zeros((H, W, 4), np.uint8))
    _, slides = _read(layers_pptx([empty, empty], ["A", "B"], W, H))
    assert [shape.name for shape in slides[0].shapes] == ["A", "B"]
    assert all(shape.image.blob == empty for shape in slides[0].shapes)


def test_a_canvas_wider_than_56_inches_is_scaled_down_keeping_its_aspect():
    width, height = 6000, 3000  # 62.5 x 31.25 inches at 96 px per inch
    layer = np.zeros((height, width, 4), np.uint8)
    deck, slides = _read(layers_pptx([_png(layer)], ["Only"], width, height))
    assert deck.slide_width == 56 * 914400
    assert deck.slide_height == 28 * 914400
    shape = slides[0].shapes[0]
    assert (shape.width, shape.height) == (deck.slide_width, deck.slide_height)


def test_an_aspect_beyond_56_to_1_stays_within_powerpoints_slide_limits():
    width, height = 6000, 16
    layer = np.zeros((height, width, 4), np.uint8)
    deck, _ = _read(layers_pptx([_png(layer)], ["Only"], width, height))
    assert (deck.slide_width, deck.slide_height) == (56 * 914400, 914400)


def test_unicode_names_are_kept_and_control_characters_dropped():
    layers, _ = _layers()
    pngs = [_png(layer) for layer in layers[:3]]
    _, slides = _read(layers_pptx(pngs, ["Hintergrund – Ü", "天空", "bad\x00\x07name"], W, H))
    assert [shape.name for shape in slides[0].shapes] == ["Hintergrund – Ü", "天空", "badname"]


def test_a_layer_of_another_size_than_the_canvas_is_refused():
    layers, names = _layers()
    pngs = [_png(layer) for layer in layers]
    pngs[2] = _png(np.zeros((H, W + 1, 4), np.uint8))
    with pytest.raises(ValueError, match="layer 3 is 53x36"):
        layers_pptx(pngs, names, W, H)


def test_names_must_match_the_layers():
    layers, names = _layers()
    with pytest.raises(ValueError, match="4 layers but 3 names"):
        layers_pptx([_png(layer) for layer in layers], names[:3], W, H)


def test_no_layers_is_refused():
    with pytest.raises(ValueError, match="no layers"):
        layers_pptx([], [], W, H)
