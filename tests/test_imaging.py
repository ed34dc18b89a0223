"""serve_app.imaging: decoding, validation, orientation, resizing, compositing, encoding."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from serve_app import imaging
from serve_app.imaging import ImageLimits, ImageRejected, decode_image

# ----------------------------------------------------------------------------- helpers


def pattern(width: int = 48, height: int = 32) -> np.ndarray:
    """An RGB image with smooth gradients: JPEG keeps it within a few levels."""
    y, x = np.mgrid[0:height, 0:width]
    return np.dstack(
        [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)]
    ).astype(np.uint8)


def quadrants(width: int = 64, height: int = 40) -> np.ndarray:
    """Four flat colours, no symmetry: any flip or rotation shows."""
    img = np.empty((height, width, 3), np.uint8)
    h2, w2 = height // 2, width // 2
    img[:h2, :w2] = (230, 20, 20)
    img[:h2, w2:] = (20, 230, 20)
    img[h2:, :w2] = (20, 20, 230)
    img[h2:, w2:] = (240, 240, 40)
    return img


def save(array: np.ndarray, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **options)
    return buf.getvalue()


def save_image(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def rejected(data: bytes, limits: ImageLimits = imaging.DEFAULT_LIMITS) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode_image(data, limits)
    return info.value


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def jpeg_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ----------------------------------------------------------------------------- formats


def test_jpeg_decodes_to_its_pixels():
    rgb = pattern()
    decoded = decode_image(save(rgb, "JPEG", quality=95))
    assert (decoded.format, decoded.width, decoded.height, decoded.alpha) == ("jpeg", 48, 32, None)
    assert decoded.rgb.shape == (32, 48, 3) and decoded.rgb.dtype == np.uint8
    assert decoded.rgb.flags["C_CONTIGUOUS"]
    assert jpeg_error(decoded.rgb, rgb) < 3


def test_progressive_jpeg_decodes():
    rgb = pattern()
    decoded = decode_image(save(rgb, "JPEG", quality=95, progressive=True))
    assert jpeg_error(decoded.rgb, rgb) < 3


@pytest.mark.parametrize("fmt, name, options", [
    ("PNG", "png", {}),
    ("WEBP", "webp", {"lossless": True}),
    ("BMP", "bmp", {}),
    ("TIFF", "tiff", {}),
    ("TIFF", "tiff", {"compression": "tiff_deflate"}),
])
def test_lossless_formats_decode_to_exact_pixels(fmt, name, options):
    rgb = pattern()
    decoded = decode_image(save(rgb, fmt, **options))
    assert decoded.format == name
    assert decoded.alpha is None
    np.testing.assert_array_equal(decoded.rgb, rgb)


def test_format_is_sniffed_from_content_not_taken_on_trust():
    # PNG bytes are PNG whatever the client called them; the decoder never sees a name.
    assert decode_image(save(pattern(), "PNG")).format == "png"


def test_rgba_png_gives_rgb_and_alpha():
    rgba = np.dstack([pattern(), np.tile(np.arange(48, dtype=np.uint8) * 5, (32, 1))])
    decoded = decode_image(save(rgba, "PNG"))
    np.testing.assert_array_equal(decoded.rgb, rgba[..., :3])
    np.testing.assert_array_equal(decoded.alpha, rgba[..., 3])
    assert decoded.alpha.flags["C_CONTIGUOUS"] and decoded.rgb.flags["C_CONTIGUOUS"]


def test_rgba_webp_keeps_alpha():
    rgba = np.dstack([pattern(), np.full((32, 48), 77, np.uint8)])
    decoded = decode_image(save(rgba, "WEBP", lossless=True, exact=True))
    np.testing.assert_array_equal(decoded.alpha, rgba[..., 3])


# ----------------------------------------------------------------------------- modes


def test_grayscale_jpeg_becomes_rgb():
    gray = pattern()[..., 0]
    decoded = decode_image(save(gray, "JPEG", quality=95))
    assert decoded.rgb.shape == (32, 48, 3)
    assert jpeg_error(decoded.rgb[..., 1], gray) < 3
    np.testing.assert_array_equal(decoded.rgb[..., 0], decoded.rgb[..., 2])


def test_grayscale_png_becomes_rgb():
    gray = pattern()[..., 0]
    decoded = decode_image(save(gray, "PNG"))
    np.testing.assert_array_equal(decoded.rgb, np.dstack([gray] * 3))


def test_grayscale_alpha_png_gives_gray_rgb_and_alpha():
    gray, alpha = pattern()[..., 0], pattern()[..., 1]
    decoded = decode_image(save_image(Image.fromarray(np.dstack([gray, alpha]), "LA"), "PNG"))
    np.testing.assert_array_equal(decoded.rgb, np.dstack([gray] * 3))
    np.testing.assert_array_equal(decoded.alpha, alpha)


def test_palette_png_with_transparency_gives_alpha():
    indices = np.zeros((32, 48), np.uint8)
    indices[8:24, 12:36] = 1
    image = Image.fromarray(indices, "P")
    image.putpalette([0, 255, 0, 200, 30, 40] + [0] * 762)
    decoded = decode_image(save_image(image, "PNG", transparency=0))
    assert decoded.alpha is not None
    assert (decoded.alpha[indices == 0] == 0).all() and (decoded.alpha[indices == 1] == 255).all()
    np.testing.assert_array_equal(decoded.rgb[16, 24], (200, 30, 40))


def test_palette_png_without_transparency_has_no_alpha():
    image = Image.fromarray(pattern()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    decoded = decode_image(save_image(image, "PNG"))
    assert decoded.alpha is None
    np.testing.assert_array_equal(decoded.rgb, np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(fmt):
    rgb = pattern()
    decoded = decode_image(save_image(Image.fromarray(rgb).convert("CMYK"), fmt, quality=95))
    assert decoded.rgb.shape == (32, 48, 3)
    assert jpeg_error(decoded.rgb, rgb) < 4


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_gray_is_scaled_not_clipped(fmt):
    wide = (pattern()[..., 0].astype(np.uint16) * 257)  # 0..65535
    decoded = decode_image(save_image(Image.fromarray(wide), fmt))
    np.testing.assert_array_equal(decoded.rgb[..., 0], pattern()[..., 0])


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_16_bit_rgb_is_scaled_to_8_bit(ext):
    rgb = pattern()
    wide = np.minimum(rgb.astype(np.uint32) * 257 + 100, 65535).astype(np.uint16)
    ok, buf = cv2.imencode(ext, cv2.cvtColor(wide, cv2.COLOR_RGB2BGR))
    assert ok
    decoded = decode_image(buf.tobytes())
    assert np.abs(decoded.rgb.astype(int) - rgb).max() <= 1


def test_first_frame_of_an_animated_png():
    first, second = pattern(), 255 - pattern()
    data = save_image(Image.fromarray(first), "PNG", save_all=True,
                      append_images=[Image.fromarray(second)], duration=100)
    np.testing.assert_array_equal(decode_image(data).rgb, first)


def test_first_frame_of_an_animated_webp():
    first, second = pattern(), 255 - pattern()
    data = save_image(Image.fromarray(first), "WEBP", save_all=True, lossless=True,
                      append_images=[Image.fromarray(second)], duration=100)
    np.testing.assert_array_equal(decode_image(data).rgb, first)


# ----------------------------------------------------------------------------- orientation

# What a camera stores for each EXIF orientation, given the upright picture.
_STORED = {
    1: lambda p: p,
    2: lambda p: p[:, ::-1],
    3: lambda p: p[::-1, ::-1],
    4: lambda p: p[::-1],
    5: lambda p: p.transpose(1, 0, 2),
    6: lambda p: np.rot90(p, 1),
    7: lambda p: p[::-1, ::-1].transpose(1, 0, 2),
    8: lambda p: np.rot90(p, -1),
}


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_jpeg_upright(orientation):
    upright = quadrants()
    stored = np.ascontiguousarray(_STORED[orientation](upright))
    data = save(stored, "JPEG", quality=95, exif=exif_bytes(orientation))
    decoded = decode_image(data)
    assert (decoded.width, decoded.height) == (64, 40)
    assert decoded.rgb.shape == upright.shape
    for y, x in [(10, 16), (10, 48), (30, 16), (30, 48)]:  # the middle of each quadrant
        assert np.abs(decoded.rgb[y, x].astype(int) - upright[y, x]).max() <= 8


def test_exif_orientation_in_png_is_applied():
    upright = quadrants()
    data = save(np.ascontiguousarray(_STORED[6](upright)), "PNG", exif=exif_bytes(6))
    np.testing.assert_array_equal(decode_image(data).rgb, upright)


def test_exif_orientation_rotates_alpha_with_colour():
    upright = np.dstack([quadrants(), np.tile(np.arange(64, dtype=np.uint8), (40, 1))])
    data = save(np.ascontiguousarray(_STORED[8](upright)), "PNG", exif=exif_bytes(8))
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded.alpha, upright[..., 3])


def test_image_pixels_counts_the_pixels_from_the_header():
    assert imaging.image_pixels(save(pattern(96, 64), "PNG")) == 96 * 64
    assert imaging.image_pixels(save(pattern(64, 40), "JPEG", exif=exif_bytes(6))) == 64 * 40


def test_image_pixels_needs_only_the_header():
    data = save(pattern(96, 64), "PNG")
    truncated = data[: len(data) // 2]
    assert imaging.image_pixels(truncated) == 96 * 64
    assert rejected(truncated).status == 400  # decoding it still fails


@pytest.mark.parametrize("data, limits, status", [
    (b"", imaging.DEFAULT_LIMITS, 400),
    (b"hello, this is not an image at all\n" * 4, imaging.DEFAULT_LIMITS, 415),
    (b"\xff\xd8\xff" + b"\x13" * 64, imaging.DEFAULT_LIMITS, 400),
    (save(pattern(), "PNG"), ImageLimits(max_pixels=1000), 413),
    (save(pattern(8, 8), "PNG"), imaging.DEFAULT_LIMITS, 422),
])
def test_image_pixels_refuses_what_the_header_shows_as_decoding_does(data, limits, status):
    with pytest.raises(ImageRejected) as info:
        imaging.image_pixels(data, limits)
    assert info.value.status == status == rejected(data, limits).status


# ----------------------------------------------------------------------------- rejections


def test_empty_upload_is_400():
    assert rejected(b"").status == 400


def test_text_is_415_naming_the_accepted_formats():
    error = rejected(b"hello, this is not an image at all\n" * 4)
    assert error.status == 415
    assert "JPEG, PNG, WebP, BMP, TIFF" in error.detail


def test_gif_is_415_and_says_it_is_a_gif():
    error = rejected(save(pattern(), "GIF"))
    assert error.status == 415
    assert "GIF" in error.detail


@pytest.mark.parametrize("fmt, options", [
    ("JPEG", {"quality": 90}),
    ("PNG", {}),
    ("WEBP", {"lossless": True}),
    ("BMP", {}),
    ("TIFF", {}),
])
def test_truncated_file_is_400(fmt, options):
    data = save(pattern(96, 64), fmt, **options)
    error = rejected(data[: len(data) // 2])
    assert error.status == 400
    assert "truncated or corrupt" in error.detail


def test_jpeg_missing_only_its_last_bytes_is_400():
    data = save(pattern(96, 64), "JPEG", quality=90)
    assert rejected(data[:-2]).status == 400


def test_png_with_a_bad_chunk_crc_is_400():
    data = bytearray(save(pattern(), "PNG"))
    idat = data.find(b"IDAT")
    data[idat + 8] ^= 0xFF
    assert rejected(bytes(data)).status == 400


def test_signature_followed_by_garbage_is_400():
    assert rejected(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 8).status == 400
    assert rejected(b"\xff\xd8\xff" + b"\x13" * 64).status == 400


def test_png_declaring_900_megapixels_is_413_before_decoding():
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + png_chunk(b"IEND", b""))
    error = rejected(data)
    assert error.status == 413
    assert "30000x30000" in error.detail and "900 MP" in error.detail and "40 MP" in error.detail


def test_pixel_limit_is_configurable():
    data = save(pattern(), "PNG")  # 48x32 = 1536 px
    assert rejected(data, ImageLimits(max_pixels=1000)).status == 413
    assert decode_image(data, ImageLimits(max_pixels=1536)).width == 48


def test_8x8_image_is_422():
    error = rejected(save(pattern(8, 8), "PNG"))
    assert error.status == 422
    assert "8x8" in error.detail and "16 px" in error.detail


def test_one_short_side_is_enough_to_be_too_small():
    assert rejected(save(pattern(200, 10), "PNG")).status == 422


def test_pillow_truncated_images_stay_refused_globally():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("args, expected", [
    ((4000, 3000, (1024, 1024), None), (1024, 1024)),
    ((500, 300, (1024, 1024), None), (500, 300)),  # within the model's size: the engine enlarges it
    ((1024, 300, (1024, 1024), None), (1024, 300)),
    ((1025, 300, (1024, 1024), None), (1024, 1024)),
    ((4000, 3000, None, 1024), (1024, 768)),
    ((3000, 4000, None, 1024), (768, 1024)),
    ((800, 600, None, 1024), (800, 600)),
    ((4000, 3000, None, None), (4000, 3000)),
    ((5000, 3, None, 1000), (1000, 1)),
])
def test_model_input_size(args, expected):
    assert imaging.model_input_size(*args) == expected


def test_resize_image_returns_the_same_array_when_size_matches():
    rgb = pattern()
    assert imaging.resize_image(rgb, (48, 32)) is rgb


def test_resize_image_shrinks_and_enlarges_to_width_height():
    rgb = pattern(64, 48)
    assert imaging.resize_image(rgb, (32, 16)).shape == (16, 32, 3)
    assert imaging.resize_image(rgb, (128, 100)).shape == (100, 128, 3)


def test_shrinking_averages_instead_of_aliasing():
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: a 2x shrink must give grey, not stripes
    small = imaging.resize_image(stripes, (32, 32))
    assert np.abs(small.astype(int) - 128).max() <= 1


def test_resize_mask_is_bilinear_to_width_height():
    mask = np.zeros((4, 4), np.uint8)
    mask[:, 2:] = 255
    big = imaging.resize_mask(mask, (8, 6))
    assert big.shape == (6, 8)
    assert 0 < big[0, 3] < 255  # the edge is interpolated, not stepped


# ----------------------------------------------------------------------------- compose, crop


def soft_disc(size: int = 96, radius: float = 28.0, feather: float = 8.0) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    distance = np.hypot(x - size / 2, y - size / 2)
    return np.clip((radius + feather / 2 - distance) / feather * 255, 0, 255).astype(np.uint8)


def test_compose_without_background_is_rgba_and_clears_transparent_colour():
    rgb, alpha = pattern(96, 96), soft_disc()
    out = imaging.compose(rgb, alpha)
    assert out.shape == (96, 96, 4)
    np.testing.assert_array_equal(out[..., 3], alpha)
    visible = alpha > 0
    np.testing.assert_array_equal(out[..., :3][visible], rgb[visible])
    assert (out[~visible] == 0).all()


def test_compose_over_bg_color_shows_the_colour_where_transparent():
    rgb, alpha = pattern(96, 96), soft_disc()
    out = imaging.compose(rgb, alpha, bg_color=(10, 200, 30))
    assert out.shape == (96, 96, 3)
    assert (out[alpha == 0] == (10, 200, 30)).all()
    np.testing.assert_array_equal(out[alpha == 255], rgb[alpha == 255])
    half = np.argwhere((alpha > 120) & (alpha < 136))[0]
    a = float(alpha[tuple(half)]) / 255
    expected = rgb[tuple(half)] * a + np.array((10, 200, 30)) * (1 - a)
    assert np.abs(out[tuple(half)] - expected).max() <= 1


@pytest.mark.parametrize("text, colour", [("#FF8000", (255, 128, 0)), ("#00ff7f", (0, 255, 127)),
                                          ("102030", (16, 32, 48))])
def test_parse_hex_color(text, colour):
    assert imaging.parse_hex_color(text) == colour


@pytest.mark.parametrize("text", ["", "#FFF", "#GGGGGG", "red", "#1234567", "#12 456"])
def test_parse_hex_color_refuses_bad_input_with_a_readable_message(text):
    with pytest.raises(ValueError, match="#RRGGBB"):
        imaging.parse_hex_color(text)


def test_crop_box_bounds_the_content():
    alpha = np.zeros((50, 80), np.uint8)
    alpha[10:20, 30:45] = 200
    alpha[0, 0] = 5  # faint noise below the threshold does not count
    assert imaging.crop_box(alpha) == (30, 10, 45, 20)
    assert imaging.crop(alpha, (30, 10, 45, 20)).shape == (10, 15)


def test_crop_box_of_an_empty_mask_is_none():
    assert imaging.crop_box(np.zeros((20, 20), np.uint8)) is None


# ----------------------------------------------------------------------------- refine


def red_on_green(size: int = 160):
    """A red disc composited with a soft edge over green: the edge pixels are red+green mixes."""
    alpha = soft_disc(size, radius=size * 0.3, feather=12)
    a = alpha[..., None].astype(np.float32) / 255
    rgb = (a * np.array((220, 20, 20)) + (1 - a) * np.array((20, 200, 20))).round().astype(np.uint8)
    return rgb, alpha


def test_refine_foreground_removes_the_old_background_from_edges():
    rgb, alpha = red_on_green()
    edge = (alpha > 20) & (alpha < 235)
    refined = imaging.refine_foreground(rgb, alpha)
    raw_green = rgb[..., 1][edge].astype(float).mean()
    refined_green = refined[..., 1][edge].astype(float).mean()
    assert raw_green > 60
    assert refined_green < 0.3 * raw_green
    assert refined[..., 0][edge].mean() > 150  # and they are red


def test_refine_foreground_leaves_opaque_pixels_alone():
    rgb, alpha = pattern(96, 96), soft_disc()
    refined = imaging.refine_foreground(rgb, alpha)
    np.testing.assert_array_equal(refined[alpha == 255], rgb[alpha == 255])


def test_refine_foreground_in_tiles_matches_one_pass(monkeypatch):
    rgb, alpha = red_on_green(320)
    whole = imaging.refine_foreground(rgb, alpha)
    # Tiles of 200x128: two columns, three rows of tiles, uneven at the edges.
    monkeypatch.setattr(imaging, "_REFINE_TILE_MAX_SIDE", 200)
    monkeypatch.setattr(imaging, "_REFINE_TILE_PIXELS", 200 * 128)
    tiled = imaging.refine_foreground(rgb, alpha)
    assert np.abs(whole.astype(int) - tiled).max() <= 1


def test_refine_foreground_handles_images_smaller_than_its_filter():
    rgb, alpha = red_on_green(24)
    assert imaging.refine_foreground(rgb, alpha).shape == (24, 24, 3)


# ----------------------------------------------------------------------------- encoders


def rgba_image() -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)


@pytest.mark.parametrize("channels", [4, 3, 0])
def test_png_round_trips_bit_exact(channels):
    array = rgba_image() if channels == 4 else rgba_image()[..., :3] if channels == 3 else rgba_image()[..., 0]
    data = imaging.encode_png(array)
    back = Image.open(io.BytesIO(data))
    assert back.format == "PNG"
    assert back.mode == {4: "RGBA", 3: "RGB", 0: "L"}[channels]
    np.testing.assert_array_equal(np.asarray(back), array)


@pytest.mark.parametrize("channels", [4, 3])
def test_webp_round_trips_bit_exact(channels):
    array = np.ascontiguousarray(rgba_image()[..., :channels])
    data = imaging.encode_webp(array)
    back = Image.open(io.BytesIO(data))
    assert back.format == "WEBP"
    np.testing.assert_array_equal(np.asarray(back.convert("RGBA" if channels == 4 else "RGB")), array)


def test_png_encodes_a_cropped_view():
    array = rgba_image()
    view = array[5:30, 7:40]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(imaging.encode_png(view)))), view)


# ----------------------------------------------------------------------------- render_cutout


def decoded(rgb: np.ndarray, alpha: np.ndarray | None = None) -> imaging.DecodedImage:
    return imaging.DecodedImage(rgb=rgb, alpha=alpha, format="png", width=rgb.shape[1], height=rgb.shape[0])


def open_result(rendered: imaging.RenderedImage) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(rendered.data)))


def test_render_cutout_png_is_rgba_with_the_mask_as_alpha():
    rgb, mask = pattern(96, 96), soft_disc()
    rendered = imaging.render_cutout(decoded(rgb), mask)
    assert (rendered.media_type, rendered.width, rendered.height) == ("image/png", 96, 96)
    out = open_result(rendered)
    np.testing.assert_array_equal(out[..., 3], mask)


def test_render_cutout_limits_alpha_by_the_inputs_own_alpha():
    rgb, mask = pattern(96, 96), soft_disc()
    own = np.full((96, 96), 255, np.uint8)
    own[:, :48] = 100
    out = open_result(imaging.render_cutout(decoded(rgb, own), mask))
    np.testing.assert_array_equal(out[..., 3], np.minimum(mask, own))


def test_render_cutout_mask_output_is_single_channel():
    mask = soft_disc()
    rendered = imaging.render_cutout(decoded(pattern(96, 96)), mask, output="mask")
    back = Image.open(io.BytesIO(rendered.data))
    assert back.mode == "L"
    np.testing.assert_array_equal(np.asarray(back), mask)


def test_render_cutout_mask_as_webp_is_gray():
    mask = soft_disc()
    rendered = imaging.render_cutout(decoded(pattern(96, 96)), mask, output="mask", format="webp")
    assert rendered.media_type == "image/webp"
    np.testing.assert_array_equal(open_result(rendered)[..., 0], mask)


def test_render_cutout_with_bg_color_is_opaque_rgb():
    rendered = imaging.render_cutout(decoded(pattern(96, 96)), soft_disc(), bg_color=(255, 255, 255))
    out = open_result(rendered)
    assert out.shape == (96, 96, 3)
    assert (out[0, 0] == 255).all()


def test_render_cutout_crop_trims_to_content():
    mask = np.zeros((96, 96), np.uint8)
    mask[20:40, 30:70] = 255
    rendered = imaging.render_cutout(decoded(pattern(96, 96)), mask, crop=True)
    assert (rendered.width, rendered.height) == (40, 20)
    assert (open_result(rendered)[..., 3] == 255).all()


def test_render_cutout_crop_of_nothing_keeps_the_canvas():
    rendered = imaging.render_cutout(decoded(pattern(96, 96)), np.zeros((96, 96), np.uint8), crop=True)
    assert (rendered.width, rendered.height) == (96, 96)


def test_render_cutout_crop_with_refine_matches_refining_the_whole_image():
    rgb, mask = red_on_green(320)
    cropped = open_result(imaging.render_cutout(decoded(rgb), mask, crop=True, refine_foreground=True))
    whole = open_result(imaging.render_cutout(decoded(rgb), mask, refine_foreground=True))
    left, top, right, bottom = imaging.crop_box(mask)
    assert np.abs(cropped.astype(int) - whole[top:bottom, left:right]).max() <= 1


def test_render_cutout_resizes_a_model_sized_mask():
    rendered = imaging.render_cutout(decoded(pattern(96, 64)), np.full((32, 32), 255, np.uint8))
    assert (open_result(rendered)[..., 3] == 255).all()


# ----------------------------------------------------------------------------- cutout_pixels and friends
# (what the rembg and remove.bg compatible routes render with)


def test_compose_over_a_translucent_colour_is_rgba_over_that_opacity():
    rgb, alpha = pattern(96, 96), soft_disc()
    out = imaging.compose(rgb, alpha, bg_color=(0, 0, 255, 128))
    assert out.shape == (96, 96, 4)
    assert (out[alpha == 0] == (0, 0, 255, 128)).all()
    np.testing.assert_array_equal(out[alpha == 255][:, :3], rgb[alpha == 255])
    assert (out[alpha == 255][:, 3] == 255).all()
    half = tuple(np.argwhere((alpha > 120) & (alpha < 136))[0])
    a, b = alpha[half] / 255, 128 / 255
    assert abs(int(out[half][3]) - round((a + b * (1 - a)) * 255)) <= 1


def test_compose_over_a_fully_transparent_colour_is_the_plain_cutout():
    rgb, alpha = pattern(96, 96), soft_disc()
    np.testing.assert_array_equal(imaging.compose(rgb, alpha, bg_color=(9, 9, 9, 0)), imaging.compose(rgb, alpha))


def test_cutout_pixels_color_output_is_the_refined_foreground_everywhere():
    rgb, mask = red_on_green(160)
    colour = imaging.cutout_pixels(decoded(rgb), mask, output="color", refine_foreground=True)
    assert colour.shape == (160, 160, 3)
    np.testing.assert_array_equal(colour, imaging.refine_foreground(rgb, mask))


def test_crop_margin_pads_past_the_image_with_the_background():
    mask = np.zeros((96, 96), np.uint8)
    mask[2:40, 30:70] = 255  # 40 wide, 38 high, 2 px from the top edge

    def ten_px(width, height):
        return (10, 10, 10, 10)

    out = imaging.cutout_pixels(decoded(pattern(96, 96)), mask, crop=True, crop_margin=ten_px)
    assert out.shape == (58, 60, 4)
    assert (out[:10, :, 3] == 0).all() and (out[10:48, 10:50, 3] == 255).all()
    painted = imaging.cutout_pixels(decoded(pattern(96, 96)), mask, crop=True, crop_margin=ten_px,
                                    bg_color=(1, 2, 3))
    assert tuple(painted[0, 0]) == (1, 2, 3)
    alpha = imaging.cutout_pixels(decoded(pattern(96, 96)), mask, output="mask", crop=True, crop_margin=ten_px)
    assert alpha.shape == (58, 60) and alpha[0, 0] == 0 and alpha[20, 20] == 255


def test_crop_margin_is_given_the_subjects_size():
    mask = np.zeros((96, 96), np.uint8)
    mask[20:40, 30:70] = 255
    seen = []

    def margin(width, height):
        seen.append((width, height))
        return (0, 0, 0, 0)

    imaging.cutout_pixels(decoded(pattern(96, 96)), mask, crop=True, crop_margin=margin)
    assert seen == [(40, 20)]


def test_post_process_mask_is_binary_and_drops_specks():
    mask = soft_disc()
    mask[5, 5] = 255  # a one-pixel speck
    out = imaging.post_process_mask(mask)
    assert set(np.unique(out)) == {0, 255}
    assert out[5, 5] == 0
    assert out[48, 48] == 255 and out[0, 0] == 0


def test_jpeg_round_trips_rgb_and_gray_and_refuses_alpha():
    rgb = pattern(64, 48)
    back = np.asarray(Image.open(io.BytesIO(imaging.encode_jpeg(rgb))))
    assert back.shape == (48, 64, 3) and np.abs(back.astype(int) - rgb).max() <= 8
    gray = Image.open(io.BytesIO(imaging.encode_jpeg(rgb[..., 0])))
    assert gray.mode == "L" and gray.size == (64, 48)
    with pytest.raises(ValueError, match="alpha"):
        imaging.encode_jpeg(np.zeros((8, 8, 4), np.uint8))


def test_downscale_to_pixels_keeps_the_aspect_within_the_budget():
    image = decoded(pattern(800, 600), np.full((600, 800), 200, np.uint8))
    small = imaging.downscale_to_pixels(image, 250_000)
    assert small.width * small.height <= 250_000
    assert abs(small.width / small.height - 800 / 600) < 0.01 and small.width >= 575
    assert small.alpha.shape == (small.height, small.width) and small.rgb.shape[:2] == small.alpha.shape
    assert imaging.downscale_to_pixels(image, 480_000) is image
