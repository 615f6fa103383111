"""Contact sheets: tiles in a grid, points and outlines drawn on crops, images made 8-bit."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


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


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a boolean mask that touch a pixel outside it (the rendered mesh's outline)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def unit_to_uint8(image: np.ndarray) -> np.ndarray:
    """A [0, 1] float image (a buffer, a mask) as 8-bit (values outside are clipped)."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Model images (B, 3, S, S) in [-1, 1] -> (B, S, S, 3) uint8 pixels."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
