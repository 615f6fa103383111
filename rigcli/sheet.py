"""Contact sheets: grids of images with landmarks drawn, for people to judge crops and fits by eye."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
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


def aligned_sheet(store, name: str, columns: int = 6) -> np.ndarray:
    """Every aligned crop of a person with its 68 landmarks mapped into the crop: a check by eye."""
    from rigcli.enroll import crop_landmarks, read_face
    from rigcli.photo import read_photo

    tiles = []
    for record in store.load(name).photos:
        crop = read_photo(store.person_dir(name) / record.aligned).pixels
        tiles.append(draw_points(crop, crop_landmarks(read_face(store, name, record))))
    if not tiles:
        raise ValueError(f"{name} has no photos")
    return grid(tiles, columns=min(columns, len(tiles)))


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a boolean mask that touch a pixel outside it (the rendered mesh's outline)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def fit_sheet(store, name: str) -> np.ndarray:
    """Per photo a row: crop with landmarks and mesh outline | shaded | normal | albedo buffers."""
    from rigcli import RigError
    from rigcli.enroll import crop_landmarks, read_face, read_fit
    from rigcli.facemodel import face_model_name, load_face_model
    from rigcli.fit import fit_from_json, rasterize_fit, render_buffers
    from rigcli.photo import read_photo

    doc = read_fit(store, name)
    if doc is None:
        raise RigError(f"{name} has no 3D fit yet: run `rig refit {name}`")
    model = load_face_model(store, face_model_name(doc))
    records = [r for r in store.load(name).photos if r.id in doc["photos"]]
    fit = fit_from_json([doc["photos"][r.id] for r in records], doc["identity"], model.expression_names)
    size = doc["crop_size"]
    geometry = rasterize_fit(model, fit, size)
    buffers = render_buffers(model, fit, size, geometry).permute(0, 2, 3, 1).numpy()
    masks = geometry.fragments.mask.numpy()
    tiles = []
    for i, record in enumerate(records):
        crop = read_photo(store.person_dir(name) / record.aligned).pixels.copy()
        crop[mask_outline(masks[i])] = (255, 64, 64)
        crop = draw_points(crop, crop_landmarks(read_face(store, name, record)))
        shaded, normal, albedo = buffers[i, ..., 0:3], buffers[i, ..., 3:6], buffers[i, ..., 6:9]
        normal = np.where(masks[i][..., None], normal * 0.5 + 0.5, 0.0)  # [-1, 1] shown as [0, 1]
        tiles += [crop, *(to_uint8(image) for image in (shaded, normal, albedo))]
    return grid(tiles, columns=4)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A [0, 1] float image as 8-bit (values outside are clipped)."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
