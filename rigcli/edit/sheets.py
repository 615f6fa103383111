"""Contact sheets of an edit: tiles a person looks at to see what the edit did and why.

The paper's edit (``--compose plain``): input | original shaded, normal | edited shaded, normal |
output, at the model's size. The strength method: input | physical edit | output | displacement |
shading ratio, as aligned crops cut from the full-size pictures.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from rigcli.edit.editor import EditResult
from rigcli.image.align import compose_affine, resize_affine, warp

SHEET_TILE = 256  # px: the tiles of the strength method's contact sheet


def buffer_tiles(buffers: torch.Tensor) -> list[np.ndarray]:
    """The shaded and normal channels of (9, S, S) buffers as two RGB tiles."""
    shaded = buffers[0:3].clamp(0, 1)
    normal = torch.where(buffers[3:6].abs().sum(0, keepdim=True) > 0, buffers[3:6] * 0.5 + 0.5, 0)
    return [(t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for t in (shaded, normal)]


def sheet_row(result: EditResult, size: int) -> list[np.ndarray]:
    """input | original shaded, normal | edited shaded, normal | output (the paper's edit, model size)."""
    crop = np.asarray(Image.fromarray(result.prepared.crop).resize((size, size), Image.Resampling.BOX))
    return [crop, *buffer_tiles(result.original_buffers), *buffer_tiles(result.edited_buffers), result.output]


def _crop_field(field: np.ndarray, crop_to_photo: np.ndarray, size: int) -> np.ndarray:
    """A float (H, W, C) field of the photo sampled at the crop's pixel centres (bilinear)."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = crop_to_photo[0, 0] * u + crop_to_photo[0, 1] * v + crop_to_photo[0, 2]
    y = crop_to_photo[1, 0] * u + crop_to_photo[1, 1] * v + crop_to_photo[1, 2]
    return np.stack(
        [ndimage.map_coordinates(field[..., c], [y, x], order=1, mode="nearest") for c in range(field.shape[-1])], -1
    )


def flow_tile(flow: np.ndarray, crop_to_photo: np.ndarray, size: int) -> np.ndarray:
    """The displacement in the crop's frame as colour: hue the direction, brightness the length (full
    at the largest, black where nothing moves); photo pixels, scaled to the crop."""
    field = _crop_field(flow, crop_to_photo, size) / np.sqrt(abs(np.linalg.det(crop_to_photo[:, :2])))
    length = np.linalg.norm(field, axis=-1)
    hue = (np.arctan2(field[..., 1], field[..., 0]) / (2 * np.pi)) % 1.0
    value = np.clip(length / max(float(length.max()), 0.5), 0, 1)
    hsv = np.stack([hue, np.ones_like(hue), value], -1)
    return np.asarray(Image.fromarray((hsv * 255).round().astype(np.uint8), "HSV").convert("RGB"))


def ratio_tile(ratio: np.ndarray, crop_to_photo: np.ndarray, size: int) -> np.ndarray:
    """The shading ratio in the crop's frame as grey: mid-grey 1 (unchanged), white 4x, black 1/4."""
    field = _crop_field(ratio, crop_to_photo, size)
    return np.clip(128 + 127 * np.log2(np.maximum(field, 1e-6)) / 2, 0, 255).round().astype(np.uint8)


def method_sheet_row(result: EditResult, size: int) -> list[np.ndarray]:
    """input | physical edit | output | displacement | shading ratio, as aligned crops of ``size``
    from the full-resolution pictures (the strength method's sheet). At strength 1 the physical edit
    is not made: its tiles show the photo, no motion and a ratio of 1."""
    prepared = result.prepared
    crop_to_photo = compose_affine(prepared.crop_to_photo, resize_affine(prepared.crop.shape[0], size))
    edit = result.physical
    height, width = prepared.pixels.shape[:2]
    physical = prepared.pixels if edit is None else edit.image
    flow = np.zeros((height, width, 2), np.float32) if edit is None else edit.flow
    ratio = np.ones((height, width, 3), np.float32) if edit is None else edit.ratio
    return [
        warp(prepared.pixels, crop_to_photo, size),
        warp(physical, crop_to_photo, size),
        warp(result.photo_output, crop_to_photo, size),
        flow_tile(flow, crop_to_photo, size),
        ratio_tile(ratio, crop_to_photo, size),
    ]
