"""Photo pixels through an affine map, a band of rows at a time: the sampling under compositing.

A field made in a crop's frame (a mask, a flow, a correction; any size) is read at the photo's own
pixels with ``grid_sample`` through the 2x3 map that places the crop in the photo, over only the box
of photo pixels it can reach, in bands of whole rows so that every intermediate stays small.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BAND_PIXELS = 1 << 20  # photo pixels composed at a time (whole rows): small intermediates, few torch calls


@dataclass
class Box:
    """The photo pixels [y0, y1] x [x0, x1] (inclusive) that a crop square can touch."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def rows(self) -> slice:
        return slice(self.y0, self.y1 + 1)

    @property
    def cols(self) -> slice:
        return slice(self.x0, self.x1 + 1)


def photo_box(to_photo: np.ndarray, x0: float, y0: float, x1: float, y1: float, height: int, width: int) -> Box:
    """The box of photo pixels that the pixels [x0, x1] x [y0, y1] of a grid placed in the photo by
    ``to_photo`` (2x3) can touch, clipped to the photo."""
    corners = np.array([[x0 - 0.5, y0 - 0.5], [x0 - 0.5, y1 + 0.5], [x1 + 0.5, y0 - 0.5], [x1 + 0.5, y1 + 0.5]])
    box = corners @ to_photo[:, :2].T + to_photo[:, 2]
    lo = np.clip(np.floor(box.min(0)).astype(int), 0, [width - 1, height - 1])
    hi = np.clip(np.ceil(box.max(0)).astype(int), 0, [width - 1, height - 1])
    return Box(int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1]))


def affine_grid(photo_to_field: np.ndarray, box: Box, field_height: int, field_width: int) -> torch.Tensor:
    """(1, h, w, 2) ``grid_sample`` grid (align_corners) of the box's photo pixels in a field's pixels:
    an affine map, so a row term plus a column term (each in float64, the sum in float32)."""
    norm = np.array([[2 / max(field_width - 1, 1)], [2 / max(field_height - 1, 1)]]) * photo_to_field
    norm[:, 2] -= 1
    xs = np.arange(box.x0, box.x1 + 1, dtype=np.float64)
    ys = np.arange(box.y0, box.y1 + 1, dtype=np.float64)
    grid = torch.empty((1, len(ys), len(xs), 2))
    for k in range(2):
        along = torch.from_numpy(norm[k, 0] * xs).float()[None, :]
        down = torch.from_numpy(norm[k, 1] * ys + norm[k, 2]).float()[:, None]
        grid[0, :, :, k] = along + down
    return grid


def bands(box: Box) -> Iterator[Box]:
    """The box in bands of whole rows of about BAND_PIXELS pixels: each intermediate stays about 12 MB,
    while much smaller bands would mean many more torch calls, each a wait for its threads when the
    cores are shared."""
    rows = max(1, BAND_PIXELS // (box.x1 - box.x0 + 1))
    for y in range(box.y0, box.y1 + 1, rows):
        yield Box(box.x0, y, box.x1, min(y + rows - 1, box.y1))


def support_box(field: np.ndarray, to_photo: np.ndarray, height: int, width: int) -> Box | None:
    """The photo pixels a bilinear sample of ``field`` (S, S) can find non-zero (its support, a pixel
    wider, placed in the photo by ``to_photo``); None where it is zero throughout."""
    rows, cols = np.nonzero((field > 0).any(1))[0], np.nonzero((field > 0).any(0))[0]
    if not len(rows):
        return None
    return photo_box(to_photo, cols[0] - 1, rows[0] - 1, cols[-1] + 1, rows[-1] + 1, height, width)


def sample(field: torch.Tensor, grid: torch.Tensor, border: bool = False) -> torch.Tensor:
    """Bilinear samples (C, h, w) of a field (C, H, W) at a grid (1, h, w, 2): zero outside it, or
    with ``border`` its nearest edge pixel."""
    padding = "border" if border else "zeros"
    return F.grid_sample(field[None], grid, mode="bilinear", padding_mode=padding, align_corners=True)[0]


def channels(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) or (H, W) array -> (C, H, W) float32 tensor."""
    t = torch.from_numpy(np.ascontiguousarray(image, np.float32))
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1).contiguous()
