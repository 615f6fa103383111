"""Read a photo file into upright 8-bit RGB, refusing what is not a usable image.

Decoding goes through imageio's pillow plugin. The header is read first so that a decompression bomb
is refused before any pixel is decoded; the EXIF orientation is applied; greyscale, 16-bit, RGBA,
palette and CMYK images all come out as ``(H, W, 3) uint8`` RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image, UnidentifiedImageError

from rigcli import RigError

MAX_PIXELS = 80_000_000
"""Largest image accepted (width x height); a larger one is refused as a likely decompression bomb."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
"""File name endings taken from a folder; files named on the command line are read by content."""


_FORMAT_EXT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}


# Modes that need pillow's own conversion to RGB (CMYK inversion, palettes, YCbCr, 1-bit).
_CONVERT_MODES = {"CMYK", "YCbCr", "P", "PA", "LAB", "HSV", "1"}


class PhotoError(RigError):
    """A file that cannot be used as a photo; ``reason`` is a short status word for reports."""

    def __init__(self, message: str, reason: str = "unreadable") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Photo:
    """A decoded photo: upright RGB pixels plus the file's bytes and real format."""

    pixels: np.ndarray
    data: bytes
    format: str

    @property
    def extension(self) -> str:
        """File name ending that matches the content (a PNG named .jpg is stored as .png)."""
        return _FORMAT_EXT[self.format]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, after the EXIF orientation."""
        return self.pixels.shape[1], self.pixels.shape[0]


def read_photo(path: Path, max_pixels: int = MAX_PIXELS) -> Photo:
    """Read and decode one photo file; raise PhotoError with a one-line reason if it is unusable."""
    try:
        data = Path(path).read_bytes()
    except IsADirectoryError as exc:
        raise PhotoError(f"{path} is a folder, not a photo") from exc
    except OSError as exc:
        raise PhotoError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_photo(data, max_pixels)


def decode_photo(data: bytes, max_pixels: int = MAX_PIXELS) -> Photo:
    """Decode photo bytes into upright 8-bit RGB."""
    if not data:
        raise PhotoError("empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        # Only the header is read here; pillow's own bomb check is lifted so we can give our limit.
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(io.BytesIO(data)) as header:
            fmt, mode, (width, height) = header.format, header.mode, header.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PhotoError("not an image (or not a supported format)") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    if fmt not in _FORMAT_EXT:
        raise PhotoError(f"unsupported image format {fmt}; use JPEG, PNG, WebP, BMP or TIFF")
    if width * height > max_pixels:
        raise PhotoError(
            f"image too large: {width}x{height} is {width * height / 1e6:.0f} MP, over the "
            f"{max_pixels / 1e6:.0f} MP limit (refused before decoding; a decompression bomb?)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = iio.imread(
                data, plugin="pillow", index=0, rotate=True, mode="RGB" if mode in _CONVERT_MODES else None
            )
    except Exception as exc:  # pillow raises OSError, SyntaxError, ValueError... for corrupt data
        text = str(exc)
        if "truncated" in text:
            raise PhotoError("truncated image file (the end of the data is missing)") from exc
        raise PhotoError(f"corrupt image data ({text or type(exc).__name__})") from exc
    return Photo(to_rgb8(pixels), data, fmt)


def to_rgb8(pixels: np.ndarray) -> np.ndarray:
    """Convert any decoded array (grey, grey+alpha, RGB, RGBA; 1/8/16/32-bit, float) to RGB uint8."""
    a = np.asarray(pixels)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        scale = 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else 1.0
        a = np.clip(np.nan_to_num(a) * scale, 0, 255).round().astype(np.uint8)
    elif a.dtype != np.uint8:
        # 16-bit data (uint16, or pillow's int32 "I" mode holding 0..65535): 65535 -> 255
        wide = a.astype(np.float64)
        if a.dtype.itemsize >= 2 and (a.dtype == np.uint16 or float(wide.max(initial=0)) > 255):
            wide = wide / 257.0
        a = np.clip(wide, 0, 255).round().astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise PhotoError(f"unexpected image array shape {a.shape}")
    channels = a.shape[2]
    if channels in (1, 2):  # grey, grey + alpha
        a = np.repeat(a[:, :, :1], 3, axis=2)
    elif channels >= 3:  # RGB, RGBA: alpha dropped
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an RGB image (lossless, for aligned crops and sheets)."""
    return iio.imwrite("<bytes>", np.ascontiguousarray(pixels), extension=".png")
