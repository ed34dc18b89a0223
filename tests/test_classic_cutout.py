"""The classic (weights-free) cutout engine on synthetic product shots."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

# Plain `images` (not `tests.images`) so both `pytest` and `python -m pytest` find it.
from tests.images import backdrop_photo, product_photo

from deployments.classic import ClassicCutoutEngine


@pytest.fixture(scope="module")
def engine() -> ClassicCutoutEngine:
    engine = ClassicCutoutEngine()
    engine.load()
    return engine


@pytest.fixture(scope="module")
def plain_cutout(engine):
    """(photo, true mask, alpha) for the default product shot on a plain backdrop."""
    rgb, truth = product_photo(background="plain")
    return rgb, truth, engine.predict([rgb])[0]


def iou(alpha: np.ndarray, truth: np.ndarray) -> float:
    chosen = alpha >= 128
    return (chosen & truth).sum() / (chosen | truth).sum()


def shrink(mask: np.ndarray, pixels: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.erode(mask.astype(np.uint8), kernel) > 0


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def assert_clean_cutout(alpha: np.ndarray, truth: np.ndarray) -> None:
    assert iou(alpha, truth) >= 0.95
    assert (alpha[shrink(truth, 5)] == 255).all(), "interior must be opaque"
    assert (alpha[~grow(truth, 5)] == 0).all(), "backdrop away from the object must be clear"


def test_engine_describes_itself_as_classic_on_cpu():
    info = ClassicCutoutEngine.info
    assert (info.engine, info.device, info.dtype) == ("classic", "cpu", "uint8")
    assert info.max_side == 1024 and info.input_size is None


def test_object_on_plain_background_is_cut_out(plain_cutout):
    rgb, truth, alpha = plain_cutout
    assert alpha.shape == truth.shape and alpha.dtype == np.uint8
    assert_clean_cutout(alpha, truth)


def test_gradient_background_is_removed(engine):
    rgb, truth = product_photo(background="gradient", seed=3)
    assert_clean_cutout(engine.predict([rgb])[0], truth)


def test_edges_are_anti_aliased(plain_cutout):
    _, truth, alpha = plain_cutout
    boundary = grow(truth, 1) & ~shrink(truth, 1)
    partial = (alpha[boundary] > 0) & (alpha[boundary] < 255)
    assert partial.mean() >= 0.5


def test_hole_in_object_shows_background(plain_cutout):
    _, truth, alpha = plain_cutout
    # The handle's hole: the background that does not reach the frame.
    _, labels = cv2.connectedComponents((~truth).astype(np.uint8), connectivity=4)
    outer = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    hole = ~truth & ~np.isin(labels, outer)
    assert hole.sum() > 5000
    assert (alpha[shrink(hole, 3)] == 0).all()


def test_object_touching_the_border_is_cut_out(engine):
    rgb, truth = product_photo(background="gradient", seed=1)
    # Crop so the mug runs off the top and left edges.
    rgb, truth = np.ascontiguousarray(rgb[330:, 420:]), truth[330:, 420:]
    assert truth[0].any() and truth[:, 0].any()
    alpha = engine.predict([rgb])[0]
    assert_clean_cutout(alpha, truth)
    solid = shrink(truth, 5)
    assert solid[0].any() and (alpha[0, solid[0]] == 255).all(), "opaque up to the top edge"
    assert solid[:, 0].any() and (alpha[solid[:, 0], 0] == 255).all(), "opaque up to the left edge"


@pytest.mark.parametrize(
    "image",
    [
        np.full((768, 1024, 3), 200, np.uint8),
        np.zeros((480, 640, 3), np.uint8),
        backdrop_photo(1024, 768, "plain", seed=5),
    ],
    ids=["constant", "black", "noisy-grey"],
)
def test_uniform_image_has_no_foreground(engine, image):
    assert not engine.predict([image])[0].any()


def test_empty_gradient_backdrop_has_no_foreground(engine):
    assert not engine.predict([backdrop_photo(1024, 768, "gradient", seed=2)])[0].any()


def test_dust_specks_on_the_backdrop_are_dropped(engine):
    rgb, truth = product_photo(background="plain", seed=2)
    rgb = rgb.copy()
    specks = [(60, 80), (700, 120), (900, 650), (150, 700)]
    for x, y in specks:
        cv2.circle(rgb, (x, y), 3, (60, 55, 50), -1, cv2.LINE_AA)
    alpha = engine.predict([rgb])[0]
    for x, y in specks:
        assert not alpha[y - 6 : y + 7, x - 6 : x + 7].any()
    assert iou(alpha, truth) >= 0.95


@pytest.mark.parametrize(
    "height, width", [(1, 1), (2, 3), (16, 16), (3, 500), (500, 3), (16, 1024), (1024, 8)]
)
def test_tiny_and_thin_images_get_a_mask_of_their_size(engine, height, width):
    photo, _ = product_photo(640, 480, seed=4)
    image = cv2.resize(photo, (width, height), interpolation=cv2.INTER_AREA)
    mask = engine.predict([image])[0]
    assert mask.shape == (height, width) and mask.dtype == np.uint8


def test_batch_of_different_sizes(engine):
    shots = [
        product_photo(1024, 768, "plain", seed=0),
        product_photo(480, 640, "gradient", seed=1),
        product_photo(1280, 960, "gradient", seed=2),  # above max_side
    ]
    tiny = np.full((16, 16, 3), 128, np.uint8)
    masks = engine.predict([rgb for rgb, _ in shots] + [tiny])
    assert len(masks) == 4
    for (rgb, truth), mask in zip(shots, masks):
        assert mask.shape == rgb.shape[:2] and mask.dtype == np.uint8
        assert iou(mask, truth) >= 0.95
    assert masks[3].shape == (16, 16)


def test_empty_batch_gives_no_masks(engine):
    assert engine.predict([]) == []


def test_same_image_gets_the_same_mask(engine):
    rgb, _ = product_photo(512, 384, "gradient", seed=3)
    first, second = engine.predict([rgb, rgb])
    assert np.array_equal(first, second)


def test_image_that_is_not_rgb_uint8_is_rejected(engine):
    with pytest.raises(ValueError):
        engine.predict([np.zeros((32, 32), np.uint8)])
    with pytest.raises(ValueError):
        engine.predict([np.zeros((32, 32, 3), np.float32)])


def test_product_photo_is_deterministic():
    first, first_truth = product_photo(320, 240, "gradient", seed=7)
    second, second_truth = product_photo(320, 240, "gradient", seed=7)
    assert np.array_equal(first, second) and np.array_equal(first_truth, second_truth)
    assert first.dtype == np.uint8 and first.shape == (240, 320, 3)
    assert first_truth.dtype == bool and 0.1 < first_truth.mean() < 0.3
