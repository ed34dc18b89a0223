"""A corpus of hostile and odd uploads, generated in code, each with the answer a correct service gives.

Every entry is one HTTP request to a route that takes an image (multipart field
`image`): broken and truncated files of every accepted format, decompression
bombs, huge metadata, animations, unusual pixel formats, tiny and thin images,
EXIF orientations, polyglot files, lying content types and file names,
malformed multipart bodies, oversized and slow uploads. Nothing binary is
committed: the files are made here with Pillow, OpenCV, zlib and struct, and
the lies (a header claiming 30000x30000 pixels, a bad checksum) are written
into real files byte by byte.

An entry's `expected` is either a result (`status` 200, the upright size of
the result image) or a refusal (a 4xx status). `build_corpus(limits)` makes the
list; the limits are the service's (`limits` of the config under test).
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image

# The base picture: not square, so a missed or wrong EXIF rotation shows in the size.
W, H = 64, 48


@dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body."""

    data: bytes
    field: str = "image"
    filename: str | None = "upload.bin"  # None: a plain form field, not a file
    content_type: str | None = "application/octet-stream"


@dataclass(frozen=True)
class Expected:
    """A correct answer: `status` 200 with a result of `size` (width, height), or a 4xx `status`."""

    status: int
    size: tuple[int, int] | None = None

    @property
    def is_result(self) -> bool:
        return self.status == 200


def result(width: int = W, height: int = H) -> Expected:
    return Expected(200, (width, height))


def refused(status: int) -> Expected:
    assert 400 <= status < 500
    return Expected(status)


Delivery = Literal["whole", "chunked", "trickle", "stall"]


@dataclass(frozen=True)
class HostileInput:
    """One request: a multipart body made of `parts`, or `raw_body` sent as it is.

    `delivery`: `whole` sends the body at once with a Content-Length; `chunked`
    streams it with chunked transfer encoding (no length known up front);
    `trickle` sends it in small pieces with pauses, slower than any client should
    be but never stopping; `stall` sends half of it and then nothing more.
    """

    name: str
    expected: Expected
    parts: tuple[Part, ...] = ()
    raw_body: bytes | None = None
    content_type: str | None = None  # only with raw_body: the request's Content-Type
    delivery: Delivery = "whole"

    def body_and_content_type(self, boundary: str = "strata-hostile-boundary") -> tuple[bytes, str | None]:
        if self.raw_body is not None:
            return self.raw_body, self.content_type
        return multipart_body(self.parts, boundary), f"multipart/form-data; boundary={boundary}"


def multipart_body(parts: tuple[Part, ...], boundary: str) -> bytes:
    """The multipart/form-data encoding of `parts` (written here so it can carry odd names and types)."""
    out = bytearray()
    for part in parts:
        disposition = f'form-data; name="{part.field}"'
        if part.filename is not None:
            escaped = part.filename.replace("\\", "\\\\").replace('"', "%22")
            disposition += f'; filename="{escaped}"'
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if part.content_type is not None:
            out += f"Content-Type: {part.content_type}\r\n".encode()
        out += b"\r\n" + part.data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


@dataclass(frozen=True)
class Limits:
    """The limits of the service under test (`limits` in its config)."""

    max_upload_mb: float
    max_pixels: int
    min_side: int


# --------------------------------------------------------------------------- pictures


def picture(width: int = W, height: int = H) -> np.ndarray:
    """RGB uint8: a red disc on a grey gradient (the tiny test model calls red foreground)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.dstack([96 + 64 * x // max(width, 1), 110 + 40 * y // max(height, 1), np.full_like(x, 128)])
    rgb = rgb.astype(np.uint8)
    disc = (x - width / 2) ** 2 + (y - height / 2) ** 2 <= (min(width, height) / 3) ** 2
    rgb[disc] = (220, 20, 30)
    return rgb


def picture_rgba(width: int = W, height: int = H) -> np.ndarray:
    """RGBA uint8: the picture with a transparent border and a soft edge."""
    rgba = np.dstack([picture(width, height), np.full((height, width), 255, np.uint8)])
    rgba[:4, :, 3] = 0
    rgba[-4:, :, 3] = 0
    rgba[:, :4, 3] = 0
    rgba[:, -4:, 3] = 128
    return rgba


def save(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def jpeg(width: int = W, height: int = H, **options) -> bytes:
    return save(picture(width, height), "JPEG", quality=90, **options)


def png(width: int = W, height: int = H, **options) -> bytes:
    return save(picture(width, height), "PNG", **options)


def webp(width: int = W, height: int = H, **options) -> bytes:
    return save(picture(width, height), "WEBP", **options)


def bmp(width: int = W, height: int = H) -> bytes:
    return save(picture(width, height), "BMP")


def tiff(width: int = W, height: int = H, **options) -> bytes:
    return save(picture(width, height), "TIFF", **options)


def cv2_encode(ext: str, array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, array)
    assert ok, ext
    return buf.tobytes()


def wide(array: np.ndarray) -> np.ndarray:
    """uint8 -> uint16 spanning the full 16-bit range."""
    return array.astype(np.uint16) * 257


# --------------------------------------------------------------------------- byte surgery


def png_chunk(kind: bytes, payload: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + payload) if crc is None else crc
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk of a well-formed PNG."""
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return chunks


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(png_chunk(kind, payload) for kind, payload in chunks)


def png_raw(width: int, height: int, rows: bytes, *, depth: int = 8, colour: int = 2) -> bytes:
    """A PNG from raw scanlines (each starting with its filter byte): pixel layouts Pillow cannot write."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return png_from_chunks([(b"IHDR", ihdr), (b"IDAT", zlib.compress(rows)), (b"IEND", b"")])


def png_interlaced() -> bytes:
    """An Adam7-interlaced PNG (OpenCV cannot write one; Pillow can't either: built from scanlines)."""
    rgb = picture()
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    rows = bytearray()
    for x0, y0, dx, dy in passes:
        sub = rgb[y0::dy, x0::dx]
        if sub.size:
            for line in sub:
                rows += b"\0" + line.tobytes()
    ihdr = struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 1)
    return png_from_chunks([(b"IHDR", ihdr), (b"IDAT", zlib.compress(bytes(rows))), (b"IEND", b"")])


def png_header_bomb(width: int, height: int, *, depth: int = 8, colour: int = 2) -> bytes:
    """A ~100-byte PNG whose header claims width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return png_from_chunks([(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\0" * 64)), (b"IEND", b"")])


def png_compressible(width: int, height: int) -> bytes:
    """A real, complete grayscale PNG of width x height black pixels: ~1000x smaller than its pixels."""
    row = b"\0" * (width + 1)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return png_from_chunks([(b"IHDR", ihdr), (b"IDAT", idat), (b"IEND", b"")])


def replace_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    return png_from_chunks([(k, payload if k == kind else p) for k, p in png_chunks(data)])


def insert_chunks_after_ihdr(data: bytes, extra: list[tuple[bytes, bytes]]) -> bytes:
    chunks = png_chunks(data)
    return png_from_chunks(chunks[:1] + extra + chunks[1:])


def jpeg_sof_offset(data: bytes) -> int:
    """Offset of the SOF0/SOF1/SOF2 marker of a JPEG."""
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        index = data.find(marker)
        if index > 0:
            return index
    raise ValueError("no SOF marker")


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header claiming width x height."""
    sof = jpeg_sof_offset(data)
    patched = bytearray(data)
    patched[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(patched)


def jpeg_insert_segments(data: bytes, segments: list[tuple[int, bytes]]) -> bytes:
    """The JPEG with marker segments (marker byte, payload) inserted right after SOI."""
    inserted = b"".join(b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload
                        for marker, payload in segments)
    return data[:2] + inserted + data[2:]


def bmp_with_header(data: bytes, **fields: int) -> bytes:
    """The BMP with fields of its BITMAPINFOHEADER replaced (width, height, bpp, compression, ...)."""
    layout = {"data_offset": (10, "<I"), "header_size": (14, "<I"), "width": (18, "<i"), "height": (22, "<i"),
              "planes": (26, "<H"), "bpp": (28, "<H"), "compression": (30, "<I"), "colours_used": (46, "<I")}
    patched = bytearray(data)
    for name, value in fields.items():
        offset, fmt = layout[name]
        patched[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(patched)


def bmp_raw(width: int, height: int, bpp: int, pixels: bytes, *, compression: int = 0,
            palette: bytes = b"", masks: bytes = b"") -> bytes:
    """A BMP with a BITMAPINFOHEADER from raw pixel data: layouts Pillow cannot write (16-bit, RLE)."""
    header_size = 40
    offset = 14 + header_size + len(masks) + len(palette)
    info = struct.pack("<IiiHHIIiiII", header_size, width, height, 1, bpp, compression, len(pixels),
                       2835, 2835, len(palette) // 4, 0)
    file_header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    return file_header + info + masks + palette + pixels


def tiff_raw(width: int, height: int, *, pixels: bytes | None = None, strip_offset: int | None = None,
             strip_bytes: int | None = None, bits: int = 8, samples: int = 1, compression: int = 1,
             rows_per_strip: int | None = None, next_ifd: int = 0, ifd_offset: int = 8,
             drop: tuple[int, ...] = (), extra: tuple[tuple[int, int, int], ...] = ()) -> bytes:
    """A little-endian grayscale TIFF written field by field, so any field can lie.

    One strip; every value fits its IFD entry (so `samples` > 1 means a lie too).
    `drop` leaves tags out; `extra` adds (tag, type, value) entries.
    """
    pixels = bytes(width * height) if pixels is None else pixels
    tags = {256: (4, width), 257: (4, height), 258: (3, bits), 259: (3, compression), 262: (3, 1),
            273: (4, 0), 277: (3, samples), 278: (4, height if rows_per_strip is None else rows_per_strip),
            279: (4, len(pixels) if strip_bytes is None else strip_bytes)}
    for tag, kind, value in extra:
        tags[tag] = (kind, value)
    for tag in drop:
        tags.pop(tag, None)
    ifd_size = 2 + 12 * len(tags) + 4
    data_offset = ifd_offset + ifd_size
    if 273 in tags:
        tags[273] = (4, data_offset if strip_offset is None else strip_offset)
    ifd = struct.pack("<H", len(tags))
    for tag in sorted(tags):
        kind, value = tags[tag]
        packed = struct.pack("<H", value) + b"\0\0" if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    ifd += struct.pack("<I", next_ifd)
    header = b"II*\0" + struct.pack("<I", ifd_offset)
    return header + bytes(max(0, ifd_offset - 8)) + ifd + pixels


def webp_patch(data: bytes, offset: int, value: bytes) -> bytes:
    patched = bytearray(data)
    patched[offset:offset + len(value)] = value
    return bytes(patched)


def exif_bytes(**tags: int) -> bytes:
    exif = Image.Exif()
    names = {"orientation": 0x0112}
    for name, value in tags.items():
        exif[names[name]] = value
    return exif.tobytes()


def exif_with_description(text: str) -> bytes:
    exif = Image.Exif()
    exif[0x010E] = text
    return exif.tobytes()


def exif_loop() -> bytes:
    """EXIF whose IFD0 links an Exif sub-IFD that is IFD0 itself, and whose next IFD is IFD0 again."""
    ifd = struct.pack("<H", 2)
    ifd += struct.pack("<HHII", 0x0112, 3, 1, 6)  # Orientation 6
    ifd += struct.pack("<HHII", 0x8769, 4, 1, 8)  # Exif IFD -> offset 8 (this IFD)
    ifd += struct.pack("<I", 8)  # next IFD -> this IFD
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd


def exif_many_entries(count: int) -> bytes:
    """EXIF with one IFD of `count` entries (ImageDescription-like ASCII tags pointing nowhere useful)."""
    entries = [struct.pack("<HHII", 0x9000 + i, 7, 4, 0x41414141) for i in range(count)]
    ifd = struct.pack("<H", count) + b"".join(entries) + struct.pack("<I", 0)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd


def exif_orientation_far_away() -> bytes:
    """EXIF whose Orientation is a LONG array of a million values stored past the end of the data."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 4, 1_000_000, 0x7FFFFFF0) + struct.pack("<I", 0)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd


def zip_archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("readme.txt", "a zip archive riding along with an image\n" * 20)
        archive.writestr("payload.html", "<script>alert(1)</script>")
    return buf.getvalue()


def gif(frames: int = 1) -> bytes:
    images = [Image.fromarray(np.roll(picture(), 8 * i, axis=1)).convert("P") for i in range(frames)]
    return save(images[0], "GIF", save_all=frames > 1, append_images=images[1:], duration=100, loop=0)


def animated(fmt: str, frames: int = 3, **options) -> bytes:
    images = [Image.fromarray(np.roll(picture(), 8 * i, axis=1)) for i in range(frames)]
    return save(images[0], fmt, save_all=True, append_images=images[1:], duration=100, loop=0, **options)


def truncated(data: bytes, keep: float) -> bytes:
    """The first `keep` bytes (an int), or that fraction of them (a float)."""
    return data[:keep] if isinstance(keep, int) else data[:int(len(data) * keep)]


# --------------------------------------------------------------------------- the corpus


def build_corpus(limits: Limits) -> list[HostileInput]:
    """Every entry, in a stable order with unique names."""
    entries = [
        *_accepted_formats(),
        *_truncated_files(),
        *_corrupt_files(),
        *_empty_and_not_images(),
        *_decompression_bombs(limits),
        *_huge_metadata(),
        *_animations(),
        *_pixel_formats(),
        *_tiny_and_thin(limits),
        *_orientations(),
        *_polyglots(),
        *_names_and_content_types(),
        *_multipart_bodies(),
        *_sizes_and_speeds(limits),
    ]
    names = [entry.name for entry in entries]
    duplicates = {name for name in names if names.count(name) > 1}
    assert not duplicates, f"duplicate corpus names: {duplicates}"
    return entries


def _image(name: str, data: bytes, expected: Expected, **part) -> HostileInput:
    return HostileInput(name, expected, parts=(Part(data, **part),))


def _accepted_formats():
    yield _image("jpeg-baseline", jpeg(), result())
    yield _image("jpeg-progressive", jpeg(progressive=True), result())
    yield _image("jpeg-4-4-4", jpeg(subsampling=0), result())
    yield _image("jpeg-optimized-huffman", jpeg(optimize=True), result())
    yield _image("png-rgb", png(), result())
    yield _image("png-interlaced-adam7", png_interlaced(), result())
    yield _image("png-rgba", save(picture_rgba(), "PNG"), result())
    yield _image("webp-lossy", webp(quality=80), result())
    yield _image("webp-lossless", webp(lossless=True), result())
    yield _image("webp-lossy-alpha", save(picture_rgba(), "WEBP", quality=80), result())
    yield _image("webp-lossless-alpha", save(picture_rgba(), "WEBP", lossless=True), result())
    yield _image("bmp-24-bit", bmp(), result())
    yield _image("bmp-32-bit-rgba", save(picture_rgba(), "BMP"), result())
    yield _image("tiff-uncompressed", tiff(), result())
    yield _image("tiff-lzw", tiff(compression="tiff_lzw"), result())
    yield _image("tiff-deflate", tiff(compression="tiff_adobe_deflate"), result())
    yield _image("tiff-packbits", tiff(compression="packbits"), result())
    yield _image("tiff-jpeg-compressed", tiff(compression="jpeg"), result())
    yield _image("tiff-rgba", save(picture_rgba(), "TIFF"), result())


def _truncated_files():
    files = {"jpeg": jpeg(), "png": png(), "webp": webp(quality=80), "bmp": bmp(), "tiff": tiff()}
    for fmt, data in files.items():
        yield _image(f"{fmt}-truncated-to-16-bytes", truncated(data, 16), refused(400))
        yield _image(f"{fmt}-truncated-to-half", truncated(data, 0.5), refused(400))
        yield _image(f"{fmt}-truncated-to-90-percent", truncated(data, 0.9), refused(400))
    yield _image("jpeg-missing-only-eoi", jpeg()[:-2], refused(400))
    yield _image("png-missing-iend", png_from_chunks(png_chunks(png())[:-1]), result())
    yield _image("tiff-compressed-strip-truncated", truncated(tiff(compression="tiff_lzw"), 0.8), refused(400))


def _corrupt_files():
    base_jpeg, base_png = jpeg(), png()
    sof = jpeg_sof_offset(base_jpeg)
    sos = base_jpeg.find(b"\xff\xda")
    scan_start = sos + 2 + struct.unpack(">H", base_jpeg[sos + 2:sos + 4])[0]
    garbage = bytes(np.random.default_rng(6).integers(0, 255, 256, dtype=np.uint8))
    # JPEG
    yield _image("jpeg-frame-height-zero", jpeg_with_size(base_jpeg, W, 0), refused(400))
    yield _image("jpeg-frame-width-zero", jpeg_with_size(base_jpeg, 0, H), refused(400))
    yield _image("jpeg-scan-overwritten-with-garbage",
                 base_jpeg[:scan_start + 16] + garbage + base_jpeg[scan_start + 16 + 256:], refused(400))
    yield _image("jpeg-scan-replaced-by-eoi", base_jpeg[:sos] + b"\xff\xd9", refused(400))
    bad_component = bytearray(base_jpeg)
    bad_component[sos + 5] = 0x77  # the scan names a component the frame does not have
    yield _image("jpeg-scan-names-unknown-component", bytes(bad_component), refused(400))
    bad_precision = bytearray(base_jpeg)
    bad_precision[sof + 4] = 3  # 3-bit samples do not exist
    yield _image("jpeg-sample-precision-3", bytes(bad_precision), refused(400))
    yield _image("jpeg-soi-then-eoi", b"\xff\xd8\xff\xd9", refused(400))
    # PNG
    chunks = png_chunks(base_png)
    ihdr = chunks[0][1]
    yield _image("png-ihdr-bad-crc", base_png[:8] + png_chunk(b"IHDR", ihdr, crc=0) + base_png[33:], refused(400))
    idat_index = base_png.find(b"IDAT")
    bad_idat = bytearray(base_png)
    bad_idat[idat_index + 20] ^= 0xFF  # a flipped byte in the compressed data: the CRC no longer matches
    yield _image("png-idat-bad-crc", bytes(bad_idat), refused(400))
    yield _image("png-idat-not-zlib", replace_chunk(base_png, b"IDAT", garbage), refused(400))
    yield _image("png-idat-too-short", replace_chunk(base_png, b"IDAT", zlib.compress(b"\0" * 100)), refused(400))
    yield _image("png-no-idat", png_from_chunks([chunks[0], (b"IEND", b"")]), refused(400))
    yield _image("png-bit-depth-3", png_from_chunks([(b"IHDR", ihdr[:8] + b"\x03" + ihdr[9:]), *chunks[1:]]),
                 refused(400))
    yield _image("png-colour-type-5", png_from_chunks([(b"IHDR", ihdr[:9] + b"\x05" + ihdr[10:]), *chunks[1:]]),
                 refused(400))
    yield _image("png-width-zero", png_from_chunks([(b"IHDR", struct.pack(">I", 0) + ihdr[4:]), *chunks[1:]]),
                 refused(400))
    bad_filter = b"".join(b"\x07" + picture()[y].tobytes() for y in range(H))
    yield _image("png-row-filter-7", png_raw(W, H, bad_filter), refused(400))
    # WebP
    lossy, lossless = webp(quality=80), webp(lossless=True)
    yield _image("webp-riff-size-past-end", webp_patch(lossy, 4, struct.pack("<I", 10_000_000)), refused(400))
    yield _image("webp-vp8-start-code-broken", webp_patch(lossy, 23, b"\0\0\0"), refused(400))
    yield _image("webp-vp8l-signature-broken", webp_patch(lossless, 20, b"\x00"), refused(400))
    yield _image("webp-unknown-chunk-only", b"RIFF" + struct.pack("<I", 4 + 8 + 16) + b"WEBPVP9 "
                 + struct.pack("<I", 16) + bytes(16), refused(400))
    # BMP
    base_bmp = bmp()
    yield _image("bmp-7-bits-per-pixel", bmp_with_header(base_bmp, bpp=7), refused(400))
    yield _image("bmp-width-zero", bmp_with_header(base_bmp, width=0), refused(400))
    yield _image("bmp-pixel-offset-past-end", bmp_with_header(base_bmp, data_offset=10_000_000), refused(400))
    yield _image("bmp-unknown-compression", bmp_with_header(base_bmp, compression=9), refused(400))
    yield _image("bmp-header-size-bogus", bmp_with_header(base_bmp, header_size=1000), refused(400))
    palette_bmp = save(Image.fromarray(picture()).convert("P"), "BMP")
    yield _image("bmp-palette-of-2-billion-colours", bmp_with_header(palette_bmp, colours_used=2**31), refused(400))
    # TIFF (written field by field)
    yield _image("tiff-ifd-offset-past-end", b"II*\0" + struct.pack("<I", 10_000_000) + tiff_raw(W, H)[8:],
                 refused(400))
    yield _image("tiff-strip-offset-past-end", tiff_raw(W, H, strip_offset=10_000_000), refused(400))
    # A reader takes the bytes the pixels need, not the strip's claim.
    yield _image("tiff-strip-byte-count-claims-4-gb", tiff_raw(W, H, strip_bytes=0xFFFFFFF0), result())
    yield _image("tiff-unknown-compression", tiff_raw(W, H, compression=12345), refused(400))
    yield _image("tiff-bits-per-sample-3", tiff_raw(W, H, bits=3), refused(400))
    yield _image("tiff-no-width-tag", tiff_raw(W, H, drop=(256,)), refused(400))
    yield _image("tiff-no-strip-offsets", tiff_raw(W, H, drop=(273, 279)), refused(400))
    yield _image("tiff-65535-samples-per-pixel", tiff_raw(W, H, samples=65535), refused(400))
    yield _image("tiff-rows-per-strip-zero", tiff_raw(W, H, rows_per_strip=0), refused(400))


def _empty_and_not_images():
    yield _image("empty-file", b"", refused(400))
    yield _image("one-byte", b"\xff", refused(415))
    yield _image("jpeg-signature-only", b"\xff\xd8\xff", refused(400))
    yield _image("png-signature-only", b"\x89PNG\r\n\x1a\n", refused(400))
    yield _image("webp-riff-header-only", b"RIFF\x04\x00\x00\x00WEBP", refused(400))
    yield _image("bmp-magic-only", b"BM", refused(400))
    yield _image("tiff-header-only", b"II*\x00\x08\x00\x00\x00", refused(400))
    yield _image("big-endian-tiff-header-only", b"MM\x00*\x00\x00\x00\x08", refused(400))
    yield _image("zeros-64-kb", bytes(65536), refused(415))
    yield _image("text-named-png", b"hello, this is not an image\n" * 10, refused(415),
                 filename="photo.png", content_type="image/png")
    yield _image("gif-static", gif(), refused(415))
    yield _image("ico", b"\x00\x00\x01\x00" + bytes(60), refused(415))
    yield _image("psd", b"8BPS" + bytes(60), refused(415))
    yield _image("avif-brand", b"\x00\x00\x00\x1cftypavif" + bytes(60), refused(415))
    yield _image("heic-brand", b"\x00\x00\x00\x18ftypheic" + bytes(60), refused(415))


def _decompression_bombs(limits: Limits):
    yield _image("png-header-30000x30000", png_header_bomb(30000, 30000), refused(413))
    yield _image("png-header-2147483647x1", png_header_bomb(2**31 - 1, 1), refused(413))
    yield _image("png-header-16-bit-rgba-9000x9000", png_header_bomb(9000, 9000, depth=16, colour=6), refused(413))
    yield _image("png-compressible-20000x20000-black", png_compressible(20000, 20000), refused(413))
    yield _image("png-compressible-2500x2500-black", png_compressible(2500, 2500), result(2500, 2500))
    yield _image("png-header-just-over-the-limit",
                 png_header_bomb(limits.max_pixels // limits.min_side + 1, limits.min_side), refused(413))
    apng = animated("PNG")
    frame_control = next(payload for kind, payload in png_chunks(apng) if kind == b"fcTL")
    big_frame = frame_control[:4] + struct.pack(">II", 30000, 30000) + frame_control[12:]
    yield _image("apng-frame-larger-than-canvas", replace_chunk(apng, b"fcTL", big_frame), refused(400))
    yield _image("jpeg-frame-65500x65500", jpeg_with_size(jpeg(), 65500, 65500), refused(413))
    side = int(limits.max_pixels ** 0.5) + 1
    yield _image("jpeg-frame-just-over-the-limit", jpeg_with_size(jpeg(), side, side), refused(413))
    yield _image("webp-vp8-16383x16383", webp_patch(webp(quality=80), 26, struct.pack("<HH", 16383, 16383)),
                 refused(413))
    lossless = webp(lossless=True)
    bits = (16383) | (16383 << 14) | (lossless[24] >> 4 << 28)
    yield _image("webp-vp8l-16384x16384", webp_patch(lossless, 21, struct.pack("<I", bits)), refused(413))
    canvas = animated("WEBP")
    huge = (16000 - 1).to_bytes(3, "little") * 2
    yield _image("webp-animation-canvas-16000x16000", webp_patch(canvas, 24, huge), refused(413))
    yield _image("bmp-header-100000x100000", bmp_with_header(bmp(), width=100000, height=100000), refused(413))
    yield _image("bmp-top-down-100000x100000", bmp_with_header(bmp(), width=100000, height=-100000), refused(413))
    yield _image("tiff-header-100000x100000", tiff_raw(100000, 100000, pixels=bytes(64)), refused(413))
    yield _image("tiff-header-4-billion-wide", tiff_raw(0xFFFFFFFF, 1, pixels=bytes(64)), refused(413))
    yield _image("tiff-deflate-header-20000x20000", tiff_raw(20000, 20000, compression=8,
                 pixels=zlib.compress(bytes(1_000_000), 9)), refused(413))
    yield _image("tiff-deflate-2500x2500-black", save(Image.fromarray(np.zeros((2500, 2500), np.uint8)), "TIFF",
                 compression="tiff_adobe_deflate"), result(2500, 2500))
    yield _image("gif-screen-65535x65535", b"GIF89a" + struct.pack("<HH", 65535, 65535) + bytes(20), refused(415))
    first_page = Image.fromarray(picture())
    yield _image("tiff-second-page-claims-huge", save(first_page, "TIFF", save_all=True,
                 append_images=[Image.fromarray(picture(2000, 16))]), result())


def _huge_metadata():
    base = jpeg()
    app_segments = [(0xEF, bytes([i % 256]) * 65000) for i in range(160)]  # ~10 MB of APP15
    yield _image("jpeg-10-mb-of-app-segments", jpeg_insert_segments(base, app_segments), result())
    yield _image("jpeg-1-mb-of-comments", jpeg_insert_segments(base, [(0xFE, b"<!-- comment -->" * 4000)] * 16),
                 result())
    yield _image("jpeg-icc-profile-2-mb-garbage", jpeg(icc_profile=bytes(range(256)) * 8192), result())
    yield _image("jpeg-exif-60-kb-description",
                 jpeg(exif=exif_with_description("A" * 60000)), result())
    yield _image("jpeg-exif-5000-entries", jpeg(exif=exif_many_entries(5000)), result())
    yield _image("jpeg-exif-ifd-loop", jpeg(exif=exif_loop()), result(H, W))
    yield _image("jpeg-exif-orientation-past-the-end", jpeg(exif=exif_orientation_far_away()), result())
    yield _image("jpeg-exif-garbage", jpeg(exif=b"Exif\0\0" + bytes(range(256)) * 40), result())
    text = [(b"tEXt", b"Comment\0" + b"x" * 1_000_000)] * 8  # 8 MB of text chunks
    yield _image("png-8-mb-of-text-chunks", insert_chunks_after_ihdr(png(), text), result())
    bomb = zlib.compress(b"\0" * 200_000_000, 9)  # 200 MB when inflated
    yield _image("png-ztxt-bomb-200-mb", insert_chunks_after_ihdr(png(), [(b"zTXt", b"Comment\0\0" + bomb)]),
                 refused(400))
    icc = bytes(range(256)) * 8192  # a 2 MB profile (big printer profiles are this size)
    yield _image("png-iccp-2-mb", insert_chunks_after_ihdr(png(), [(b"iCCP", b"icc\0\0" + zlib.compress(icc))]),
                 result())
    yield _image("png-iccp-bomb-200-mb", insert_chunks_after_ihdr(png(), [(b"iCCP", b"icc\0\0" + bomb)]),
                 refused(400))
    yield _image("png-exif-5000-entries", png(exif=exif_many_entries(5000)), result())
    yield _image("webp-exif-and-icc-1-mb", webp(quality=80, exif=exif_with_description("B" * 60000),
                                                 icc_profile=bytes(range(256)) * 4096), result())
    yield _image("tiff-10000-tags", tiff_raw(W, H, extra=tuple((50000 + i, 4, i) for i in range(10000))), result())


def _animations():
    yield _image("gif-animated", gif(frames=3), refused(415))
    yield _image("webp-animated", animated("WEBP"), result())
    yield _image("webp-animated-lossless", animated("WEBP", lossless=True), result())
    yield _image("apng", animated("PNG"), result())
    yield _image("apng-default-image-not-in-animation", animated("PNG", default_image=True), result())
    pages = [Image.fromarray(picture()), Image.fromarray(picture(32, 32))]
    yield _image("tiff-two-pages", save(pages[0], "TIFF", save_all=True, append_images=pages[1:]), result())


def _pixel_formats():
    rgb, rgba = picture(), picture_rgba()
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    pil = Image.fromarray(rgb)
    yield _image("jpeg-grayscale", save(pil.convert("L"), "JPEG"), result())
    yield _image("jpeg-cmyk", save(pil.convert("CMYK"), "JPEG"), result())
    yield _image("tiff-cmyk", save(pil.convert("CMYK"), "TIFF"), result())
    yield _image("png-16-bit-rgb", cv2_encode(".png", wide(rgb[..., ::-1])), result())
    yield _image("png-16-bit-rgba", cv2_encode(".png", wide(cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))), result())
    yield _image("png-16-bit-gray", cv2_encode(".png", wide(gray)), result())
    yield _image("png-gray-alpha-8-bit", save(pil.convert("LA"), "PNG"), result())
    la16 = np.dstack([wide(gray), wide(rgba[..., 3])]).astype(">u2")
    rows = b"".join(b"\0" + la16[y].tobytes() for y in range(H))
    yield _image("png-gray-alpha-16-bit", png_raw(W, H, rows, depth=16, colour=4), result())
    yield _image("png-palette-with-transparency",
                 save(Image.fromarray(rgba).convert("P", palette=Image.Palette.ADAPTIVE), "PNG",
                      transparency=0), result())
    yield _image("png-palette-2-bit", save(pil.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG",
                                           bits=2), result())
    yield _image("png-1-bit", save(pil.convert("1"), "PNG"), result())
    yield _image("png-gray-colour-key", save(pil.convert("L"), "PNG", transparency=128), result())
    yield _image("png-rgb-colour-key", save(pil, "PNG", transparency=(220, 20, 30)), result())
    yield _image("tiff-16-bit-rgb", cv2_encode(".tiff", wide(rgb[..., ::-1])), result())
    yield _image("tiff-16-bit-rgba", cv2_encode(".tiff", wide(cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))), result())
    yield _image("tiff-16-bit-gray", save(Image.fromarray(wide(gray)), "TIFF"), result())
    yield _image("tiff-32-bit-float", save(Image.fromarray(gray.astype(np.float32) / 255), "TIFF"), result())
    yield _image("tiff-32-bit-int", save(Image.fromarray(gray.astype(np.int32) * 1000), "TIFF"), result())
    yield _image("tiff-1-bit", save(pil.convert("1"), "TIFF", compression="group4"), result())
    yield _image("tiff-gray-alpha", save(pil.convert("LA"), "TIFF"), result())
    yield _image("bmp-1-bit", save(pil.convert("1"), "BMP"), result())
    yield _image("bmp-8-bit-palette", save(pil.convert("P"), "BMP"), result())
    rgb565 = ((rgb[..., 0].astype(np.uint16) >> 3) << 11) | ((rgb[..., 1].astype(np.uint16) >> 2) << 5) \
        | (rgb[..., 2].astype(np.uint16) >> 3)
    masks = struct.pack("<III", 0xF800, 0x07E0, 0x001F)
    yield _image("bmp-16-bit-565", bmp_raw(W, H, 16, rgb565[::-1].astype("<u2").tobytes(), compression=3,
                                           masks=masks), result())
    palette = b"".join(bytes((v, v, v, 0)) for v in range(256))
    rle = b"".join(bytes((W, 128 + y)) + b"\x00\x00" for y in range(H)) + b"\x00\x01"  # one run a row
    yield _image("bmp-rle8", bmp_raw(W, H, 8, rle, compression=1, palette=palette), result())
    overrun = b"".join(bytes((255, 7, 255, 9)) + b"\x00\x00" for _ in range(H)) + b"\x00\x01"  # rows too long
    # Runs past a row's end are clipped to the row, as BMP readers do.
    yield _image("bmp-rle8-rows-overrun", bmp_raw(W, H, 8, overrun, compression=1, palette=palette), result())
    top_down = bmp_with_header(bmp(), height=-H)
    yield _image("bmp-top-down", top_down, result())


def _tiny_and_thin(limits: Limits):
    side = limits.min_side
    yield _image("png-1x1", png(1, 1), refused(422))
    yield _image("jpeg-1x1", jpeg(1, 1), refused(422))
    yield _image("webp-1x1", webp(1, 1, lossless=True), refused(422))
    yield _image("bmp-1x1", save(picture(1, 1), "BMP"), refused(422))
    yield _image("tiff-1x1", tiff(1, 1), refused(422))
    yield _image("png-1x3000", png(1, 3000), refused(422))
    yield _image("png-3000x1", png(3000, 1), refused(422))
    yield _image(f"png-{side - 1}x2000", png(side - 1, 2000), refused(422))
    yield _image(f"png-{side}x{side}", png(side, side), result(side, side))
    yield _image(f"png-{side}x4000", png(side, 4000), result(side, 4000))
    yield _image(f"png-4000x{side}", png(4000, side), result(4000, side))
    yield _image(f"jpeg-{side}x3000", jpeg(side, 3000), result(side, 3000))
    yield _image(f"webp-{side}x16383", webp(side, 16383, lossless=True), result(side, 16383))
    yield _image(f"bmp-2000x{side}", save(picture(2000, side), "BMP"), result(2000, side))
    yield _image(f"tiff-{side}x2000", tiff(side, 2000), result(side, 2000))


def _orientations():
    for orientation in range(1, 9):
        size = result(H, W) if orientation >= 5 else result()
        yield _image(f"jpeg-exif-orientation-{orientation}", jpeg(exif=exif_bytes(orientation=orientation)), size)
    for bogus in (0, 9, 65535):
        yield _image(f"jpeg-exif-orientation-{bogus}-is-ignored", jpeg(exif=exif_bytes(orientation=bogus)), result())
    yield _image("png-exif-orientation-6", png(exif=exif_bytes(orientation=6)), result(H, W))
    yield _image("webp-exif-orientation-8", webp(quality=80, exif=exif_bytes(orientation=8)), result(H, W))
    yield _image("tiff-orientation-tag-5", tiff(tiffinfo={274: 5}), result(H, W))
    yield _image("jpeg-cmyk-exif-orientation-6",
                 save(Image.fromarray(picture()).convert("CMYK"), "JPEG", exif=exif_bytes(orientation=6)),
                 result(H, W))


def _polyglots():
    base_png, base_jpeg = png(), jpeg()
    yield _image("png-then-zip", base_png + zip_archive(), result())
    yield _image("zip-then-png", zip_archive() + base_png, refused(415))
    yield _image("jpeg-then-html", base_jpeg + b"<html><body><script>alert(document.cookie)</script></body></html>",
                 result())
    yield _image("jpeg-then-another-jpeg", base_jpeg + jpeg(32, 32), result())
    yield _image("html-then-png", b"<html><script>alert(1)</script></html>" + base_png, refused(415))
    yield _image("gifar", gif() + zip_archive(), refused(415))
    yield _image("pdf-holding-a-jpeg", b"%PDF-1.4\n1 0 obj\n<< /Length 100 >>\nstream\n" + base_jpeg, refused(415))
    yield _image("svg-with-script", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)">'
                 b"<script>alert(2)</script></svg>", refused(415))
    yield _image("png-with-php-in-text-chunk",
                 insert_chunks_after_ihdr(base_png, [(b"tEXt", b"Comment\0<?php system($_GET['c']); ?>")]), result())
    yield _image("jpeg-with-javascript-comment",
                 jpeg_insert_segments(base_jpeg, [(0xFE, b"*/=alert(1);/*")]), result())
    yield _image("bmp-magic-then-javascript", b"BM=1;/*" + bytes(40) + b"*/alert(1);", refused(400))


def _names_and_content_types():
    data = png()
    yield _image("content-type-text-html", data, result(), content_type="text/html", filename="photo.html")
    yield _image("content-type-says-gif", data, result(), content_type="image/gif", filename="photo.gif")
    yield _image("content-type-executable", data, result(), content_type="application/x-msdownload",
                 filename="setup.exe")
    yield _image("no-content-type", data, result(), content_type=None)
    yield _image("filename-path-traversal", data, result(), filename="../../../../etc/passwd")
    yield _image("filename-windows-path", data, result(), filename="C:\\Windows\\system32\\photo.png")
    yield _image("filename-quotes-and-semicolons", data, result(), filename='a"; name="other.png')
    yield _image("filename-4096-characters", data, result(), filename="a" * 4092 + ".png")
    # U+202E (right-to-left override) makes "gnp.exe" show as "exe.png".
    yield _image("filename-unicode", data, result(), filename="фото 😀 \u202egnp.exe")
    yield _image("filename-empty", data, result(), filename="")
    yield _image("jpeg-named-png-typed-webp", jpeg(), result(), filename="photo.png", content_type="image/webp")
    yield _image("not-a-file-but-a-text-field", b"just some text", refused(422), filename=None, content_type=None)


def _multipart_bodies():
    data = png()
    image = Part(data, filename="photo.png", content_type="image/png")
    yield HostileInput("missing-image-field", refused(422),
                       parts=(Part(data, field="picture", filename="photo.png"),))
    yield HostileInput("image-field-in-wrong-case", refused(422),
                       parts=(Part(data, field="Image", filename="photo.png"),))
    yield HostileInput("empty-multipart-body", refused(422), parts=())
    yield HostileInput("two-image-fields", refused(422), parts=(image, Part(jpeg(32, 32), filename="b.jpg")))
    yield HostileInput("image-and-other-fields", result(),
                       parts=(Part(b"classic", field="model", filename=None, content_type=None), image,
                              Part(b"x" * 1000, field="note", filename=None, content_type=None)))
    yield HostileInput("40-text-fields-and-an-image", refused(400),
                       parts=(image, *(Part(b"v", field=f"f{i}", filename=None, content_type=None)
                                       for i in range(40))))
    yield HostileInput("8-files", refused(400),
                       parts=(image, *(Part(data, field=f"extra{i}", filename=f"{i}.png") for i in range(7))))
    yield HostileInput("raw-png-body", refused(415), raw_body=data, content_type="image/png")
    yield HostileInput("urlencoded-body", refused(415), raw_body=b"image=" + data[:64],
                       content_type="application/x-www-form-urlencoded")
    yield HostileInput("json-body", refused(415), raw_body=b'{"image": "aGVsbG8="}', content_type="application/json")
    yield HostileInput("no-content-type-header", refused(415), raw_body=data, content_type=None)
    yield HostileInput("multipart-mixed", refused(415), raw_body=multipart_body((image,), "b"),
                       content_type="multipart/mixed; boundary=b")
    yield HostileInput("multipart-without-boundary", refused(400), raw_body=multipart_body((image,), "b"),
                       content_type="multipart/form-data")
    yield HostileInput("multipart-boundary-mismatch", refused(400), raw_body=multipart_body((image,), "real"),
                       content_type="multipart/form-data; boundary=announced")
    yield HostileInput("multipart-without-closing-boundary", refused(400),
                       raw_body=multipart_body((image,), "b")[:-len(b"--b--\r\n")],
                       content_type="multipart/form-data; boundary=b")
    yield HostileInput("multipart-part-without-disposition", refused(400),
                       raw_body=b"--b\r\nContent-Type: image/png\r\n\r\n" + data + b"\r\n--b--\r\n",
                       content_type="multipart/form-data; boundary=b")
    yield HostileInput("multipart-garbage", refused(400), raw_body=bytes(range(256)) * 8,
                       content_type="multipart/form-data; boundary=b")


def _sizes_and_speeds(limits: Limits):
    max_bytes = int(limits.max_upload_mb * 1024 * 1024)
    data = png()
    padding = max_bytes - len(data) - 1024
    just_under = data + bytes(padding)  # trailing bytes after IEND: ignored by a reader
    yield _image("png-padded-to-just-under-the-limit", just_under, result(), filename="big.png")
    oversized = data + bytes(max_bytes + 1 - len(data))
    yield _image("upload-one-byte-over-the-limit", oversized, refused(413), filename="big.png")
    yield HostileInput("upload-over-the-limit-without-length", refused(413),
                       parts=(Part(oversized, filename="big.png"),), delivery="chunked")
    yield HostileInput("upload-twice-the-limit-without-length", refused(413),
                       parts=(Part(data + bytes(2 * max_bytes), filename="big.png"),), delivery="chunked")
    yield HostileInput("small-upload-without-length", result(), parts=(Part(data, filename="photo.png"),),
                       delivery="chunked")
    yield HostileInput("slow-upload-that-finishes", result(), parts=(Part(jpeg(), filename="photo.jpg"),),
                       delivery="trickle")
    yield HostileInput("upload-that-stalls-halfway", refused(408), parts=(Part(jpeg(), filename="photo.jpg"),),
                       delivery="stall")
