"""A small album of one real person, made from the public-domain astronaut photo scikit-image ships.

Each photo is the portrait under a known similarity transform (scale, rotation, shift, sometimes a
mirror), with colour, gamma and compression changes, saved in several formats. The transform is
returned with each file so tests can check geometry against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from scipy import ndimage

from rigcli.align import invert_affine


@dataclass(frozen=True)
class AlbumPhoto:
    """One generated photo and the 2x3 transform from astronaut pixels to its pixels."""

    path: Path
    source_to_photo: np.ndarray
    mirrored: bool


def astronaut() -> np.ndarray:
    """The 512x512 RGB astronaut portrait (Eileen Collins, NASA, public domain)."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def similarity(scale: float, degrees: float, mirror: bool = False, shift=(0.0, 0.0)) -> np.ndarray:
    """2x3 matrix: optional mirror about x, then rotate counter-clockwise on screen, scale, shift."""
    theta = np.deg2rad(degrees)
    # image y points down, so a counter-clockwise turn on screen is a negative angle in (x, y)
    rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    flip = np.diag([-1.0, 1.0]) if mirror else np.eye(2)
    linear = scale * rot @ flip
    return np.concatenate([linear, np.asarray(shift, dtype=np.float64)[:, None]], axis=1)


def transform_image(rgb: np.ndarray, source_to_photo: np.ndarray, width: int, height: int) -> np.ndarray:
    """Render ``rgb`` through a 2x3 transform onto a width x height canvas (edges reflected)."""
    inverse = invert_affine(source_to_photo)  # photo (x, y) -> source (x, y)
    # ndimage works in (row, col) = (y, x): swap axes of the inverse transform
    swap = np.array([[0, 1], [1, 0]])
    matrix = swap @ inverse[:, :2] @ swap
    offset = swap @ inverse[:, 2]
    channels = [
        ndimage.affine_transform(
            rgb[:, :, c].astype(np.float32), matrix, offset, output_shape=(height, width), order=1, mode="mirror"
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=2), 0, 255).round().astype(np.uint8)


def make_album(folder: Path, count: int = 12, seed: int = 0, max_scale: float = 2.0) -> list[AlbumPhoto]:
    """Write ``count`` varied copies of the astronaut into ``folder``; return them with their transforms.

    Photo 0 is the original itself; the others rotate by up to 12 degrees, scale by 0.7 to
    ``max_scale``, shift, mirror one in four, and vary colour, gamma and file format.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    source = astronaut()
    face_center = np.array([220.0, 125.0])  # astronaut pixels, between the eyes and the mouth
    formats = [".jpg", ".png", ".webp", ".jpg", ".bmp", ".tif", ".jpg"]
    album = []
    for i in range(count):
        if i == 0:
            matrix, width, height, mirrored = similarity(1.0, 0.0), 512, 512, False
            pixels = source
        else:
            scale = float(rng.uniform(0.7, max_scale))
            degrees = float(rng.uniform(-12, 12))
            mirrored = i % 4 == 3
            width = int(rng.integers(380, 560) * scale)
            height = int(rng.integers(380, 560) * scale)
            # put the face somewhere in the middle third of the canvas
            target = np.array([width, height]) * rng.uniform(0.35, 0.65, size=2)
            matrix = similarity(scale, degrees, mirrored)
            matrix[:, 2] = target - matrix[:, :2] @ face_center
            pixels = transform_image(source, matrix, width, height).astype(np.float32)
            gain = rng.uniform(0.8, 1.15, size=3)  # white balance
            gamma = rng.uniform(0.8, 1.25)
            pixels = 255.0 * np.clip(pixels * gain / 255.0, 0, 1) ** gamma
            pixels = pixels.round().astype(np.uint8)
            if i == 5:  # one black-and-white print
                pixels = np.repeat(pixels.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
        ext = ".png" if i == 0 else formats[i % len(formats)]
        path = folder / f"astronaut_{i:02d}{ext}"
        kwargs = {"quality": int(rng.integers(55, 95))} if ext in (".jpg", ".webp") else {}
        iio.imwrite(path, pixels, extension=ext, **kwargs)
        album.append(AlbumPhoto(path, matrix, mirrored))
    return album
