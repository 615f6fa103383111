"""Contact sheets: grids of images with landmarks drawn, for people to judge crops and fits by eye."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from rigcli.align import apply_affine, invert_affine


def draw_points(rgb: np.ndarray, points: np.ndarray, color=(0, 255, 0), radius: float = 1.5) -> np.ndarray:
    """A copy of ``rgb`` with a dot at each (x, y) point (pixel centres at integers)."""
    image = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(image)
    for x, y in np.asarray(points, dtype=np.float64):
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=tuple(color))
    return np.asarray(image)


def grid(tiles: Sequence[np.ndarray], columns: int, pad: int = 4, background: int = 32) -> np.ndarray:
    """Lay equal-sized RGB tiles out in rows of ``columns``, with ``pad`` pixels between them."""
    if not tiles:
        raise ValueError("no tiles")
    height, width = tiles[0].shape[:2]
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, 3), background, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = pad + r * (height + pad), pad + c * (width + pad)
        sheet[y : y + height, x : x + width] = tile
    return sheet


def aligned_sheet(store, name: str, columns: int = 6) -> np.ndarray:
    """Every aligned crop of a person with its 68 landmarks mapped into the crop: a check by eye."""
    from rigcli.enroll import read_face
    from rigcli.photo import read_photo

    tiles = []
    for record in store.load(name).photos:
        face = read_face(store, name, record)
        crop = read_photo(store.person_dir(name) / record.aligned).pixels
        points = apply_affine(invert_affine(np.asarray(face["crop_to_photo"])), face["landmarks"])
        tiles.append(draw_points(crop, points))
    if not tiles:
        raise ValueError(f"{name} has no photos")
    return grid(tiles, columns=min(columns, len(tiles)))
