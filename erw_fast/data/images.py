"""Image preprocessing and the byte encodings of the stored images.

``center_crop_arr`` is ADM's ImageNet centre crop (guided-diffusion ``image_datasets.py``, used by REPA's
``dataset_tools.py convert --transform=center-crop-dhariwal``): halve with a BOX filter while the short side is at
least twice the target (cheap, alias-free downscaling of large photos), then one BICUBIC resize so the short side
equals the target, then a centre crop. The exact PIL filters matter: they decide the pixels the VAE and the
teacher encoder see, so this must match the reference bit for bit.

Stored image formats (the encoder's input, decoded in the loaders):
    png  lossless; what the VAE saw, exactly (REPA stores uncompressed PNG)
    jpg  lossy, smallest; the teacher sees JPEG artefacts the VAE did not
    raw  uncompressed HWC uint8 ``.npy``: no decode at all, the fastest to load
Decoding matches webdataset's ``rgb8`` decoder (PIL open → ``convert("RGB")`` → HWC uint8).

``check_image_bytes`` is a cheap structural check run by both loaders before an image is decoded (the DALI loader
decodes inside DALI, where a failure could not be attributed to a sample or skipped): PNG chunk CRCs and
IHDR/IEND, JPEG SOI/EOI markers and segment structure, and the stored size.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

IMAGE_FORMATS: tuple[str, ...] = ("png", "jpg", "raw")
# Tar member extension of the image per format (webdataset picks decoders by extension).
IMAGE_MEMBER: dict[str, str] = {"png": "png", "jpg": "jpg", "raw": "img.npy"}


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM centre crop of an RGB PIL image to ``(image_size, image_size, 3)`` uint8."""
    if image_size < 1:
        raise ValueError(f"image_size must be ≥ 1, got {image_size}")
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.Resampling.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size].copy()  # writable, contiguous


def load_rgb(path: str) -> Image.Image:
    """Open an image file as RGB (greyscale, CMYK and palette ImageNet files exist)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def encode_image(arr: np.ndarray, fmt: str, *, jpeg_quality: int = 95, png_compress_level: int = 1) -> bytes:
    """HWC uint8 RGB → the bytes stored in the shard for ``fmt``."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {arr.dtype} {arr.shape}")
    if fmt == "raw":
        from erw_fast.data.shards import npy_bytes  # local: shards imports this module

        return npy_bytes(np.ascontiguousarray(arr))
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(arr).save(buf, format="png", compress_level=png_compress_level, optimize=False)
    elif fmt == "jpg":
        Image.fromarray(arr).save(buf, format="jpeg", quality=jpeg_quality)
    else:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {IMAGE_FORMATS}")
    return buf.getvalue()


def decode_image(data: bytes | memoryview) -> np.ndarray:
    """PNG / JPEG bytes → HWC uint8 RGB, as webdataset's ``rgb8`` decoder does."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (C4 = DHT, C8 = JPG extension, CC = DAC are not frames)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def check_image_bytes(data: bytes | bytearray | memoryview, fmt: str, size: int) -> str | None:
    """None if ``data`` is a structurally intact ``fmt`` image of ``size``×``size``, else what is wrong."""
    view = memoryview(data)
    if fmt == "png":
        return _check_png(view, size)
    if fmt == "jpg":
        return _check_jpeg(view, size)
    raise ValueError(f"no structural check for image format {fmt!r}")


def _check_png(data: memoryview, size: int) -> str | None:
    if bytes(data[:8]) != _PNG_SIGNATURE:
        return "not a PNG (bad signature)"
    pos, first = 8, True
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        ctype = bytes(data[pos + 4 : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return f"PNG chunk {ctype!r} runs past the end (truncated)"
        if zlib.crc32(data[pos + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return f"PNG chunk {ctype!r} fails its CRC (corrupt)"
        if first:
            if ctype != b"IHDR":
                return "PNG does not start with IHDR"
            w, h = int.from_bytes(data[pos + 8 : pos + 12], "big"), int.from_bytes(data[pos + 12 : pos + 16], "big")
            if (w, h) != (size, size):
                return f"PNG is {w}x{h}, expected {size}x{size}"
            first = False
        if ctype == b"IEND":
            return None if end == len(data) else "bytes after the PNG's IEND"
        pos = end
    return "PNG without IEND (truncated)"


def _check_jpeg(data: memoryview, size: int) -> str | None:
    if bytes(data[:2]) != b"\xff\xd8":
        return "not a JPEG (no SOI marker)"
    if bytes(data[-2:]) != b"\xff\xd9":
        return "JPEG without EOI marker (truncated)"
    pos, frame = 2, False
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return f"JPEG segment structure broken at byte {pos}"
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: entropy-coded data follows
            return None if frame else "JPEG scan before any frame header"
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            return f"JPEG segment at byte {pos} has an impossible length"
        if marker in _JPEG_SOF:
            h, w = int.from_bytes(data[pos + 5 : pos + 7], "big"), int.from_bytes(data[pos + 7 : pos + 9], "big")
            if (w, h) != (size, size):
                return f"JPEG is {w}x{h}, expected {size}x{size}"
            frame = True
        pos += 2 + length
    return "JPEG without scan data (truncated)"
