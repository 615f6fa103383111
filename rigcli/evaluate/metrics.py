"""What an edit is judged by: identity distance, light, blendshape and yaw errors."""

from __future__ import annotations

import math

import numpy as np
import torch

from rigcli.render.buffers import dominant_direction

ACTIVE = 0.1  # a blendshape at this weight or more counts as part of the asked expression
SAME_PERSON = 0.6  # dlib's threshold on the euclidean descriptor distance


DECIMALS = 4  # every number in metrics.json and report.html is round(value, 4)


def identity_distances(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Cosine distance (1 - cos) and euclidean distance of two face descriptors."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cosine = 1.0 - float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12)
    return cosine, float(np.linalg.norm(a - b))


def light_error_deg(got: torch.Tensor, asked: torch.Tensor) -> float:
    """Angle in degrees between the dominant directions of two SH lights (9, 3)."""

    cos = (dominant_direction(got.double()) * dominant_direction(asked.double())).sum().clamp(-1, 1)
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
