"""What an edit is judged by: identity distance, light, blendshape and yaw errors, detail kept."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from rigcli.render.buffers import dominant_direction, light_direction

ACTIVE = 0.1  # a blendshape at this weight or more counts as part of the asked expression
SAME_PERSON = 0.6  # dlib's threshold on the euclidean descriptor distance


DECIMALS = 4  # every number in metrics.json and report.html is round(value, 4)


def identity_distances(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Cosine distance (1 - cos) and euclidean distance of two face descriptors."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cosine = 1.0 - float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12)
    return cosine, float(np.linalg.norm(a - b))


def light_error_deg(got: torch.Tensor, asked: torch.Tensor, normals: torch.Tensor | None = None) -> float:
    """Angle in degrees between the directions of two SH lights (9, 3): with ``normals`` (N, 3), the
    face's visible skin, those of the single lights that best explain each shading there
    (``light_direction``, what the pixels determine); without, their first-order terms'."""

    if normals is not None:
        a, b = light_direction(got, normals), light_direction(asked, normals)
    else:
        a, b = dominant_direction(got.double()), dominant_direction(asked.double())
    cos = (a.double() * b.double()).sum().clamp(-1, 1)
    return math.degrees(math.acos(float(cos)))


def blendshape_error(got: torch.Tensor, asked: torch.Tensor, before: torch.Tensor) -> float:
    """Mean |got - asked| over the blendshapes the edit sets (changed from ``before``) or that are
    active (>= ACTIVE) in what was asked; over all of them when there are none."""
    involved = ((asked - before).abs() > 1e-6) | (asked >= ACTIVE)
    if not involved.any():
        involved = torch.ones_like(asked, dtype=torch.bool)
    return float((got - asked).abs()[involved].mean())


def yaw_error_deg(got: torch.Tensor, asked: torch.Tensor) -> float:
    return abs(math.degrees(float(got - asked)))


def photo_mask(face_mask: np.ndarray, crop_to_photo: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: a crop-frame face mask (C, C) carried onto the photo (nearest crop pixel)."""
    size = face_mask.shape[0]
    inv = np.linalg.inv(np.vstack([np.asarray(crop_to_photo, np.float64), [0, 0, 1]]))[:2]
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]]
    u = np.round(inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]).astype(int)
    v = np.round(inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]).astype(int)
    inside = (u >= 0) & (u < size) & (v >= 0) & (v < size)
    out = np.zeros(shape, bool)
    out[inside] = face_mask[v[inside], u[inside]]
    return out


def detail_ratio(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float:
    """High-frequency energy kept: the variance of the Laplacian of ``after``'s luminance over that of
    ``before``'s, inside ``mask`` (both (H, W, 3) uint8 at full resolution; 1 keeps all detail, a
    blurred face falls well below)."""

    def energy(image: np.ndarray) -> float:
        luma = np.asarray(image, np.float64) @ np.array([0.299, 0.587, 0.114])
        return float(ndimage.laplace(luma)[mask].var())

    return energy(after) / max(energy(before), 1e-12)
