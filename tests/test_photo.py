"""Reading photos: formats, EXIF orientation, bit depths, and refusal of bad files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rigcli.demo import astronaut
from rigcli.image import photo as photo_module
from rigcli.image.photo import MAX_PIXELS, PhotoError, decode_photo, read_photo, to_rgb8


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("ok_cmyk.jpg", "JPEG"),
        ("ok_exif_rot.jpg", "JPEG"),
        ("ok_rgba.png", "PNG"),
        ("ok_png_named.jpg", "PNG"),
        ("ok_webp.webp", "WEBP"),
    ],
)
def test_awkward_colour_inputs_decode_to_the_portrait(inputs, name, fmt):
    # each file is the astronaut portrait stored an awkward way; decoded, it must look like it
    p = read_photo(inputs / name)
    assert p.pixels.dtype == np.uint8 and p.pixels.shape == (512, 512, 3)
    assert p.format == fmt
    assert mean_abs_diff(p.pixels, astronaut()) < 4.0


def test_exif_rotation_is_applied(inputs):
    p = read_photo(inputs / "ok_exif_rot.jpg")
    with Image.open(inputs / "ok_exif_rot.jpg") as raw:
        stored = np.asarray(raw.convert("RGB"))
    assert mean_abs_diff(stored, astronaut()) > 40  # the stored pixels are sideways...
    assert mean_abs_diff(p.pixels, astronaut()) < 4  # ...and come out upright


def test_16bit_grey_is_scaled_not_clipped(inputs):
    p = read_photo(inputs / "ok_gray16.png")
    assert np.array_equal(p.pixels[..., 0], p.pixels[..., 1])
    grey = astronaut().astype(np.float64).mean(axis=2)
    assert mean_abs_diff(p.pixels[..., 0], grey) < 5
    assert p.pixels.max() > 240  # clipping 16-bit values would saturate nearly everything


def test_png_named_jpg_keeps_real_format(inputs):
    p = read_photo(inputs / "ok_png_named.jpg")
    assert p.extension == ".png"


@pytest.mark.parametrize(
    "name, words",
    [
        ("bad_zero.jpg", "empty file"),
        ("bad_truncated.jpg", "truncated"),
        ("bad_text.png", "not an image"),
        ("bad_bomb.png", "80 MP limit"),
    ],
)
def test_bad_files_are_refused_with_a_reason(inputs, name, words):
    with pytest.raises(PhotoError, match=words) as info:
        read_photo(inputs / name)
    assert info.value.reason == "unreadable"


def test_bomb_is_refused_before_decoding(inputs, monkeypatch):
    def no_decode(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(photo_module.iio, "imread", no_decode)
    with pytest.raises(PhotoError, match="20000x20000"):
        read_photo(inputs / "bad_bomb.png")
    assert Image.MAX_IMAGE_PIXELS is not None  # pillow's own guard is restored afterwards


def test_pixel_limit_is_configurable():
    buf = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buf, format="PNG")
    assert decode_photo(buf.getvalue()).size == (100, 100)
    with pytest.raises(PhotoError, match="too large"):
        decode_photo(buf.getvalue(), max_pixels=9_999)
    assert MAX_PIXELS == 80_000_000


def test_exif_orientation_rotates_wide_image():
    # a 40x20 image tagged "rotate 90 CW" must come out 20 wide and 40 tall
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    image.paste((10, 10, 200), (0, 0, 10, 20))  # blue band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    pixels = decode_photo(buf.getvalue()).pixels
    assert pixels.shape == (40, 20, 3)
    assert pixels[2, 10, 2] > 150 and pixels[-3, 10, 0] > 150  # the blue band is now at the top


def test_to_rgb8_conversions():
    wide = np.array([[0, 257, 65535]], dtype=np.uint16)
    assert to_rgb8(wide)[0, :, 0].tolist() == [0, 1, 255]
    grey_alpha = np.dstack([np.full((2, 2), 7, np.uint8), np.zeros((2, 2), np.uint8)])
    assert to_rgb8(grey_alpha).tolist() == np.full((2, 2, 3), 7).tolist()
    unit = np.array([[0.0, 0.5, 1.0]])
    assert to_rgb8(unit)[0, :, 1].tolist() == [0, 128, 255]
    rgba = np.zeros((1, 1, 4), np.uint8) + np.array([1, 2, 3, 0], np.uint8)
    assert to_rgb8(rgba).tolist() == [[[1, 2, 3]]]
    assert to_rgb8(np.array([[True, False]]))[0, :, 0].tolist() == [255, 0]
