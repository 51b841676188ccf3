"""Crafted pictures that a careless or hostile visitor might upload (issue 29): each must be refused
with one clear line, or decoded within the goal (at most 150 MB more than a small photo at its
peak, 1 s of CPU; measured by benchmarks/bench_pictures.py). `write(folder)` makes them.

A module of the tests, not a test: tests/test_pictures.py checks what happens to each, and the
benchmark measures what each costs.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> what must happen to it as an upload: "refused" (one line), or "answered"
EXPECTED = {
    "png16-7000.png": "refused",           # 95 kB: a 16-bit 7000x7000 PNG, once 1.25 GB and 4 s to decode
    "rgba-7000.png": "refused",            # 190 kB: a transparent 7000x7000 PNG, once 0.96 GB and 2.3 s
    "rgba-3700.png": "answered",           # a transparent PNG just under its limit of 14 megapixels
    "jpeg-claims-60000.jpg": "refused",    # a small JPEG whose header says 60,000 x 60,000
    "png-claims-60000.png": "refused",     # a small PNG whose header says 60,000 x 60,000
    "jpeg-8000.jpg": "answered",           # a real 8000 x 6000 JPEG: decoded at 1/8 scale
    "progressive-7000.jpg": "answered",    # a 7000 x 5000 progressive JPEG: every coefficient held while decoding
    "progressive-claims-12000.jpg": "refused",  # a progressive JPEG whose header says 12,000 x 8,000: past its 40 Mpx
    "picture.eps": "refused",              # PostScript: Pillow would run Ghostscript
    "picture.tif": "refused",              # TIFF: not an upload format (predict and folders read it)
    "picture.psd": "refused",              # Photoshop: not an upload format
    "frames-1000.gif": "answered",         # an animated GIF of 1,000 frames: its first frame only
    "truncated.jpg": "refused",            # half a JPEG
    "empty.png": "refused",                # no bytes at all
    "huge-exif.png": "answered",           # a PNG with an 8 MB EXIF block
    "text.png": "refused",                 # a text file named .png
    "webp-2800.webp": "answered",          # a WebP just under its limit of 8 megapixels
    "bmp-rle-claims-40000.bmp": "refused",  # a run-length BMP of a few bytes that says 40,000 x 40,000
}
UPLOADS_REFUSE_ONLY_AS_UPLOADS = ("picture.tif", "picture.psd")  # `predict` and training folders read these


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says `width` x `height`."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = buf.getvalue()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    start = data.index(b"IHDR") - 4
    return data[:start] + _png_chunk(b"IHDR", ihdr) + data[start + 25:]


def _jpeg_claiming(width: int, height: int, progressive: bool = False) -> bytes:
    """A small JPEG whose frame header (SOF0, or SOF2 when progressive) says `width` x `height`."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG", progressive=progressive)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _psd(width: int = 8, height: int = 8) -> bytes:
    """A minimal Photoshop file: RGB, 8 bits, raw."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes(3 * width * height)


def _bmp_rle_claiming(width: int, height: int) -> bytes:
    """An 8-bit run-length BMP of a few bytes whose header says `width` x `height`."""
    palette = bytes(4 * 256)
    pixels = b"\x00\x01"  # end of bitmap
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def write(folder: Path) -> dict[str, Path]:
    """Every crafted picture in `folder`; their paths by name."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {name: folder / name for name in EXPECTED}
    Image.fromarray(np.zeros((7000, 7000), dtype=np.uint16)).save(out["png16-7000.png"], optimize=True)
    Image.new("RGBA", (7000, 7000), (0, 0, 0, 0)).save(out["rgba-7000.png"], optimize=True)
    noise = Image.effect_noise((370, 370), 60).convert("RGB").resize((3700, 3700))  # in a PNG: a large file
    noise.putalpha(128)
    noise.save(out["rgba-3700.png"])
    out["jpeg-claims-60000.jpg"].write_bytes(_jpeg_claiming(60000, 60000))
    out["png-claims-60000.png"].write_bytes(_png_claiming(60000, 60000))
    photo = Image.effect_noise((1000, 750), 60).convert("RGB").resize((8000, 6000))
    photo.save(out["jpeg-8000.jpg"], quality=80)
    photo.resize((7000, 5000)).save(out["progressive-7000.jpg"], quality=80, progressive=True)
    out["progressive-claims-12000.jpg"].write_bytes(_jpeg_claiming(12000, 8000, progressive=True))
    out["picture.eps"].write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n"
                                   b"showpage\n%%EOF\n")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out["picture.tif"])
    out["picture.psd"].write_bytes(_psd())
    frames = [Image.new("P", (64, 64), i % 256) for i in range(1000)]
    frames[0].save(out["frames-1000.gif"], save_all=True, append_images=frames[1:], duration=10)
    jpeg = out["jpeg-8000.jpg"].read_bytes()
    out["truncated.jpg"].write_bytes(jpeg[: len(jpeg) // 2])
    out["empty.png"].write_bytes(b"")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (50, 60, 70)).save(buf, "PNG")
    data = buf.getvalue()
    exif = b"MM\x00*\x00\x00\x00\x08" + b"\x00" * (8 * 2**20)  # a TIFF header, then 8 MB of nothing
    end = data.index(b"IEND") - 4
    out["huge-exif.png"].write_bytes(data[:end] + _png_chunk(b"eXIf", exif) + data[end:])
    out["text.png"].write_text("not a picture\n")
    Image.effect_noise((280, 280), 60).convert("RGB").resize((2800, 2800)).save(out["webp-2800.webp"], quality=80)
    out["bmp-rle-claims-40000.bmp"].write_bytes(_bmp_rle_claiming(40000, 40000))
    return out
