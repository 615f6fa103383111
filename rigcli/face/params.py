"""Fitted face parameters (FaceFit), their JSON form, and the head-pose angle conventions.

A leaf: the value type every step from the fit to the edit passes along, knowing no model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch


def euler_to_matrix(yaw: torch.Tensor, pitch: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Head rotation from angles in radians: yaw about y (nose to the image's right when > 0), then
    pitch about x (face up when > 0), then roll about z (counter-clockwise in the image when > 0)."""
    cy, sy = torch.cos(yaw), torch.sin(yaw)
    cp, sp = torch.cos(pitch), torch.sin(pitch)
    cr, sr = torch.cos(roll), torch.sin(roll)
    zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    r_yaw = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(*yaw.shape, 3, 3)
    r_pitch = torch.stack([one, zero, zero, zero, cp, sp, zero, -sp, cp], -1).reshape(*yaw.shape, 3, 3)
    r_roll = torch.stack([cr, -sr, zero, sr, cr, zero, zero, zero, one], -1).reshape(*yaw.shape, 3, 3)
    return r_roll @ r_pitch @ r_yaw


def matrix_to_euler(rotation: torch.Tensor) -> torch.Tensor:
    """Inverse of euler_to_matrix: (..., 3, 3) -> (..., 3) as (yaw, pitch, roll) in radians.

    With R = Rz(roll) Rx(pitch) Ry(yaw): R[2] = (-cos p sin y, -sin p, cos p cos y),
    R[0, 1] = -sin r cos p and R[1, 1] = cos r cos p.
    """
    r = rotation
    pitch = torch.asin((-r[..., 2, 1]).clamp(-1, 1))
    yaw = torch.atan2(-r[..., 2, 0], r[..., 2, 2])
    roll = torch.atan2(-r[..., 0, 1], r[..., 1, 1])
    return torch.stack([yaw, pitch, roll], -1)


@dataclass
class FaceFit:
    """Fitted parameters of a batch of photos (tensors with a leading batch axis, except identity)."""

    yaw: torch.Tensor  # radians
    pitch: torch.Tensor
    roll: torch.Tensor
    scale: torch.Tensor  # crop pixels per centimetre
    translation: torch.Tensor  # (B, 2) crop pixels
    expression: torch.Tensor  # (B, E) in [0, 1]
    identity: torch.Tensor  # (I,) shared by the batch, or (B, I) one per photo
    light: torch.Tensor | None = None  # (B, 9, 3)
    albedo: torch.Tensor | None = None  # (B, 3)
    landmark_error: torch.Tensor | None = None  # (B,) mean error / inter-ocular distance
    texture: torch.Tensor | None = None  # (B, K) DECA's texture code (FLAME's albedo space), DECA fits only

    @property
    def rotation(self) -> torch.Tensor:
        return euler_to_matrix(self.yaw, self.pitch, self.roll)

    def __len__(self) -> int:
        return int(self.yaw.shape[0])

    @staticmethod
    def cat(fits: list[FaceFit]) -> FaceFit:
        """Photos of several fits, in order, as one batch (the identity of the first)."""
        join = lambda name: (  # noqa: E731
            None if getattr(fits[0], name) is None else torch.cat([getattr(f, name) for f in fits])
        )
        fields = ("yaw", "pitch", "roll", "scale", "translation", "expression")
        return FaceFit(
            *(join(n) for n in fields),
            torch.cat([f.identity for f in fits]) if fits[0].identity.dim() == 2 else fits[0].identity,
            join("light"),
            join("albedo"),
            join("landmark_error"),
            join("texture"),
        )

    def select(self, index: list[int]) -> FaceFit:
        """The fit of some photos of the batch."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return FaceFit(
            self.yaw[index],
            self.pitch[index],
            self.roll[index],
            self.scale[index],
            self.translation[index],
            self.expression[index],
            self.identity[index] if self.identity.dim() == 2 else self.identity,
            pick(self.light),
            pick(self.albedo),
            pick(self.landmark_error),
            pick(self.texture),
        )


def photo_fit_json(fit: FaceFit, i: int, names: list[str]) -> dict:
    """One photo's fitted parameters as a JSON-ready dict (the ``fit`` of ``people show --json``);
    ``texture_code`` only for a DECA fit."""
    doc = {
        "pose_deg": {
            "yaw": round(math.degrees(float(fit.yaw[i])), 3),
            "pitch": round(math.degrees(float(fit.pitch[i])), 3),
            "roll": round(math.degrees(float(fit.roll[i])), 3),
        },
        "scale": round(float(fit.scale[i]), 5),
        "translation": [round(float(v), 3) for v in fit.translation[i]],
        "expression": {n: round(float(w), 4) for n, w in zip(names, fit.expression[i], strict=True)},
        "light_sh": [[round(float(v), 5) for v in row] for row in fit.light[i]],
        "albedo": [round(float(v), 5) for v in fit.albedo[i]],
        "landmark_error": round(float(fit.landmark_error[i]), 5),
    }
    if fit.texture is not None:
        doc["texture_code"] = [round(float(v), 5) for v in fit.texture[i]]
    return doc


def fit_from_json(photos: list[dict], identity: list[float], names: list[str]) -> FaceFit:
    """Rebuild a batched FaceFit from stored per-photo dicts (the inverse of photo_fit_json)."""
    deg = [[p["pose_deg"][k] for k in ("yaw", "pitch", "roll")] for p in photos]
    angles = torch.deg2rad(torch.tensor(deg, dtype=torch.float32))
    return FaceFit(
        *angles.unbind(1),
        torch.tensor([p["scale"] for p in photos], dtype=torch.float32),
        torch.tensor([p["translation"] for p in photos], dtype=torch.float32),
        torch.tensor([[p["expression"].get(n, 0.0) for n in names] for p in photos], dtype=torch.float32),
        torch.tensor(identity, dtype=torch.float32),
        torch.tensor([p["light_sh"] for p in photos], dtype=torch.float32),
        torch.tensor([p["albedo"] for p in photos], dtype=torch.float32),
        torch.tensor([p["landmark_error"] for p in photos], dtype=torch.float32),
        torch.tensor([p["texture_code"] for p in photos], dtype=torch.float32)
        if photos and all("texture_code" in p for p in photos)
        else None,
    )


def rescale_fit(fit, from_size: int, to_size: int):
    """The same fit for a crop resized from ``from_size`` to ``to_size`` pixels (pixel centres kept)."""
    factor = to_size / from_size
    out = copy.copy(fit)
    out.scale = fit.scale * factor
    out.translation = (fit.translation + 0.5) * factor - 0.5
    return out
