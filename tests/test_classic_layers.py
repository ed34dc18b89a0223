"""The classic (weights-free) layer engine on synthetic flat graphics."""

from __future__ import annotations


import numpy as np
import pytest

from tests.images import flat_design, product_photo

from deployments.classic import ClassicLayerEngine
from deployments.engine import DecompositionCancelled, LayerParams

# flat_design's shapes, back to front.
CIRCLE, RECTANGLE, TRIANGLE, TEXT = range(4)


@pytest.fixture(scope="module")
def engine() -> ClassicLayerEngine:
    engine = ClassicLayerEngine()
    engine.load()
    return engine


def opaque(rgb: np.ndarray) -> np.ndarray:
    return np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])


def stack(layers: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Alpha-over composite, first layer at the bottom: (premultiplied RGB, alpha),
    both float in 0..255."""
    colour = np.zeros(layers[0].shape[:2] + (3,))
    alpha = np.zeros(layers[0].shape[:2] + (1,))
    for layer in layers:
        a = layer[..., 3:4] / 255.0
        colour = layer[..., :3] * a + colour * (1 - a)
        alpha = 255.0 * a + alpha * (1 - a)
    return colour, alpha[..., 0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def iou(alpha: np.ndarray, truth: np.ndarray) -> float:
    chosen = alpha >= 128
    return (chosen & truth).sum() / (chosen | truth).sum()


def layer_of_each_shape(
    layers: list[np.ndarray], masks: list[np.ndarray]
) -> list[tuple[int, float]]:
    """(index of the best-matching layer, its IoU) for each true shape mask."""
    matches = []
    for mask in masks:
        scores = [iou(layer[..., 3], mask) for layer in layers]
        matches.append((int(np.argmax(scores)), max(scores)))
    return matches


@pytest.fixture(scope="module")
def design():
    """(rgb, masks, layers, progress calls): flat_design in 5 layers, one per colour."""
    rgb, masks = flat_design(512, 384, seed=0)
    calls = []

    def on_step(step, total):
        calls.append((step, total))
        return True

    layers = ClassicLayerEngine().decompose(opaque(rgb), LayerParams(layers=5), on_step)
    return rgb, masks, layers, calls


def test_engine_describes_itself_as_classic_on_cpu():
    info = ClassicLayerEngine.info
    assert (info.engine, info.device, info.dtype) == ("classic", "cpu", "uint8")


def test_returns_the_requested_number_of_rgba_layers_of_the_input_size(design):
    rgb, _, layers, _ = design
    assert len(layers) == 5
    for layer in layers:
        assert layer.shape == rgb.shape[:2] + (4,) and layer.dtype == np.uint8


def test_layers_stack_back_into_the_input(design):
    rgb, _, layers, _ = design
    colour, alpha = stack(layers)
    assert np.allclose(alpha, 255)
    assert psnr(colour, rgb) >= 40


def test_first_layer_is_the_opaque_background(design):
    rgb, _, layers, _ = design
    background = layers[0]
    assert (background[..., 3] == 255).all()
    # The background colour, behind the shapes too (but for faint edge pixels,
    # under 4% of a shape's colour, that count as background).
    off = np.abs(background[..., :3].astype(int) - rgb[0, 0]).max(axis=2)
    assert (off <= 3).mean() >= 0.999 and off.max() <= 16


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_shape_sits_in_its_own_layer(engine, seed):
    rgb, masks = flat_design(320, 240, seed=seed)
    layers = engine.decompose(opaque(rgb), LayerParams(layers=5))
    matches = layer_of_each_shape(layers, masks)
    assert all(score >= 0.9 for _, score in matches), matches
    assert len({index for index, _ in matches}) == len(masks), matches
    assert 0 not in {index for index, _ in matches}, matches


def test_shapes_lying_on_others_come_later(design):
    _, masks, layers, _ = design
    index = [layer for layer, _ in layer_of_each_shape(layers, masks)]
    assert index[CIRCLE] < index[RECTANGLE] < index[TRIANGLE]
    assert index[CIRCLE] < index[TEXT]


def test_anti_aliased_edges_become_partial_alpha_of_the_upper_layer(design):
    rgb, masks, layers, _ = design
    circle = layers[layer_of_each_shape(layers, masks)[CIRCLE][0]]
    alpha = circle[..., 3]
    partial = (alpha > 0) & (alpha < 255)
    # A circle 104 pixels across has hundreds of edge pixels; unmixed, they carry
    # the circle's own colour, not a blend with the background.
    assert partial.sum() >= 300
    red = np.array((214, 64, 52))
    assert np.median(np.abs(circle[partial][:, :3].astype(int) - red).max(axis=1)) <= 6


def test_on_step_counts_up_to_its_total(design):
    *_, calls = design
    assert len(calls) >= 2
    steps = [step for step, _ in calls]
    assert steps == list(range(1, len(calls) + 1))
    assert {total for _, total in calls} == {steps[-1]}


def test_on_step_returning_false_at_step_one_cancels(engine):
    rgb, _ = flat_design(160, 120, seed=0)
    calls = []

    def on_step(step, total):
        calls.append(step)
        return False

    with pytest.raises(DecompositionCancelled):
        engine.decompose(opaque(rgb), LayerParams(layers=4), on_step)
    assert calls == [1]


def test_fewer_colours_than_layers_leaves_the_top_layers_transparent(engine):
    rgb, masks = flat_design(320, 240, seed=1)
    layers = engine.decompose(opaque(rgb), LayerParams(layers=8))
    assert len(layers) == 8
    assert all(layer[..., 3].any() for layer in layers[:5])
    assert all(not layer[..., 3].any() for layer in layers[5:])
    assert psnr(stack(layers)[0], rgb) >= 40
    assert min(score for _, score in layer_of_each_shape(layers, masks)) >= 0.9


def test_a_single_colour_gives_one_opaque_layer_and_transparent_ones(engine):
    rgb = np.full((40, 60, 3), (12, 140, 200), np.uint8)
    layers = engine.decompose(opaque(rgb), LayerParams(layers=3))
    assert np.array_equal(layers[0], opaque(rgb))
    assert not layers[1][..., 3].any() and not layers[2][..., 3].any()


@pytest.mark.parametrize("count", [1, 2, 3])
def test_more_colours_than_layers_still_stacks_back(engine, count):
    rgb, masks = flat_design(320, 240, seed=2)
    layers = engine.decompose(opaque(rgb), LayerParams(layers=count))
    assert len(layers) == count
    assert (layers[0][..., 3] == 255).all()
    assert psnr(stack(layers)[0], rgb) >= 40
    if count == 3:  # the largest shape keeps its own layer; the rest share the top
        matches = layer_of_each_shape(layers, masks)
        assert matches[CIRCLE][0] == 1 and matches[CIRCLE][1] >= 0.9, matches
        assert {index for index, _ in matches[RECTANGLE:]} == {2}, matches


def test_many_colours_and_noise_still_stack_back(engine):
    rng = np.random.default_rng(0)
    swatches = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    mosaic = np.kron(swatches, np.ones((30, 30, 1), np.uint8))  # 48 colours
    photo, _ = product_photo(240, 180, background="gradient")  # shading, noise, JPEG
    for rgb in (mosaic, photo):
        layers = engine.decompose(opaque(rgb), LayerParams(layers=4))
        assert len(layers) == 4 and (layers[0][..., 3] == 255).all()
        assert psnr(stack(layers)[0], rgb) >= 40


def test_gradient_background_stays_one_layer(engine):
    rgb, masks = flat_design(320, 240, seed=0, background="gradient")
    layers = engine.decompose(opaque(rgb), LayerParams(layers=5))
    matches = layer_of_each_shape(layers, masks)
    assert [index for index, _ in matches] == [1, 2, 3, 4], matches
    assert min(score for _, score in matches) >= 0.9
    assert psnr(stack(layers)[0], rgb) >= 40


def test_transparent_areas_of_an_rgba_input_stay_transparent(engine):
    rgb, masks = flat_design(320, 240, seed=0)
    rgba = opaque(rgb)
    rgba[:, :40, 3] = 0  # a transparent strip
    rgba[:, 40:56, 3] = np.linspace(0, 255, 16).astype(np.uint8)  # fading in
    rgba[rgba[..., 3] == 0, :3] = 0
    layers = engine.decompose(rgba, LayerParams(layers=5))
    for layer in layers:
        assert not layer[:, :40, 3].any()
    assert (layers[0][:, 56:, 3] == 255).all()  # opaque wherever the input is
    colour, alpha = stack(layers)
    assert np.abs(alpha - rgba[..., 3]).max() <= 1
    premultiplied = rgba[..., :3] * (rgba[..., 3:] / 255.0)
    assert psnr(colour, premultiplied) >= 40
    shown = [mask & (rgba[..., 3] >= 128) for mask in masks]
    assert min(score for _, score in layer_of_each_shape(layers, shown)) >= 0.9


def test_same_image_gives_the_same_layers(engine, design):
    rgb, _, layers, _ = design
    again = engine.decompose(opaque(rgb), LayerParams(layers=5, seed=123))
    assert all(np.array_equal(a, b) for a, b in zip(layers, again))


def test_fewer_than_one_layer_is_a_value_error(engine):
    with pytest.raises(ValueError):
        engine.decompose(opaque(np.zeros((8, 8, 3), np.uint8)), LayerParams(layers=0))


def test_a_1024_pixel_design_keeps_each_shape_in_its_own_layer(engine):
    rgb, masks = flat_design(1024, 1024, seed=1)
    layers = engine.decompose(opaque(rgb), LayerParams(layers=5))
    assert min(score for _, score in layer_of_each_shape(layers, masks)) >= 0.9
