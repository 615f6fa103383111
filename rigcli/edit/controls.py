"""Edit controls: light, expression and pose asked by name, turned into edited face parameters."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from rigcli import RigError
from rigcli.face.params import FaceFit
from rigcli.render.buffers import LIGHT_DIRECTIONS, light_for

EXPRESSION_CONTROLS = {
    "smile": ("mouthSmile_L", "mouthSmile_R"),
    "jaw_open": ("jawOpen",),
    "blink": ("eyeBlink_L", "eyeBlink_R"),
    "brow_raise": ("browInnerUp_L", "browInnerUp_R", "browOuterUp_L", "browOuterUp_R"),
    "frown": ("mouthFrown_L", "mouthFrown_R", "browDown_L", "browDown_R"),
    "pucker": ("mouthPucker",),
}


DEFAULT_INTENSITY, DEFAULT_AMBIENT = 0.8, 0.35


MAX_POSE_DEG = 60.0


@dataclass
class Controls:
    """What to change; everything left at None keeps the photo's fitted value."""

    light: str | None = None
    light_dir: tuple[float, float] | None = None  # yaw, pitch in degrees
    light_intensity: float | None = None
    ambient: float | None = None
    light_from: Path | None = None
    expression: dict[str, float] = field(default_factory=dict)  # control name -> weight
    blend: dict[str, float] = field(default_factory=dict)  # blendshape name -> weight
    expression_from: Path | None = None
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    pose_from: Path | None = None

    def validate(self, expression_names: Sequence[str]) -> None:
        """Refuse unknown names, values out of range and conflicting controls, listing what is valid."""
        lights = [x for x in (self.light, self.light_dir, self.light_from) if x is not None]
        if len(lights) > 1:
            raise RigError("choose one of --light, --light-dir and --light-from")
        if self.light is not None and self.light not in LIGHT_DIRECTIONS:
            raise RigError(f"unknown --light {self.light!r}; choose one of: {', '.join(LIGHT_DIRECTIONS)}")
        if self.light_from is not None and (self.light_intensity is not None or self.ambient is not None):
            raise RigError("--light-intensity and --ambient go with --light or --light-dir, not --light-from")
        for name, value in (("--light-intensity", self.light_intensity), ("--ambient", self.ambient)):
            if value is not None and not 0.0 <= value <= 4.0:
                raise RigError(f"{name} must be between 0 and 4, not {value}")
        for name, value in self.expression.items():
            if name not in EXPRESSION_CONTROLS:
                raise RigError(f"unknown expression control {name!r}; valid: {', '.join(EXPRESSION_CONTROLS)}")
            if not 0.0 <= value <= 1.0:
                raise RigError(f"--{name.replace('_', '-')} must be between 0 and 1, not {value}")
        for name, value in self.blend.items():
            if name not in expression_names:
                raise RigError(f"unknown blendshape {name!r}; valid: {', '.join(expression_names)}")
            if not 0.0 <= value <= 1.0:
                raise RigError(f"--blend {name}={value}: weights are between 0 and 1")
        if self.expression_from is not None and (self.expression or self.blend):
            raise RigError(
                "--expression-from copies a whole expression: do not combine it with other expression controls"
            )
        if self.pose_from is not None and (self.yaw or self.pitch or self.roll):
            raise RigError("--pose-from copies a whole pose: do not combine it with --yaw, --pitch or --roll")
        for name, value in (("--yaw", self.yaw), ("--pitch", self.pitch), ("--roll", self.roll)):
            if abs(value) > MAX_POSE_DEG:
                raise RigError(f"{name} must be within +-{MAX_POSE_DEG:.0f} degrees, not {value}")

    @property
    def needs_reference_fits(self) -> list[Path]:
        return [p for p in (self.light_from, self.expression_from, self.pose_from) if p is not None]


def direction_from_angles(yaw_deg: float, pitch_deg: float) -> tuple[float, float, float]:
    """Unit vector toward a light at yaw (to the image's right) and pitch (up), in degrees."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    return (math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch))


def apply_controls(
    fit: FaceFit,
    controls: Controls,
    names: Sequence[str],
    skin_normals: list[torch.Tensor] | None = None,
    reference: dict[Path, FaceFit] | None = None,
    directions: dict[str, torch.Tensor] | None = None,
) -> FaceFit:
    """The edited parameters of a batch of fitted photos (the input fit is not changed).

    ``directions`` (FLAME): per ICT blendshape name, an expression direction of the face model
    (its ``expression_directions(store)``, None on ICT); a control then sets the photo's amount along
    the sum of its blendshapes' directions to its weight (the amount read by projection), as setting
    the blendshape weights does on ICT. Names in ``names`` (the model's own) are set directly.
    """
    edited = fit.select(list(range(len(fit))))
    edited.expression = fit.expression.clone()
    edited.light = fit.light.clone()
    reference = reference or {}
    if controls.light is not None or controls.light_dir is not None:
        direction = LIGHT_DIRECTIONS[controls.light] if controls.light else direction_from_angles(*controls.light_dir)
        explicit = controls.light_intensity is not None or controls.ambient is not None
        intensity = DEFAULT_INTENSITY if controls.light_intensity is None else controls.light_intensity
        ambient = DEFAULT_AMBIENT if controls.ambient is None else controls.ambient
        for i in range(len(fit)):
            normals = None if explicit or skin_normals is None else skin_normals[i]
            edited.light[i] = light_for(direction, intensity, ambient, normals)
    if controls.light_from is not None:
        edited.light[:] = reference[controls.light_from].light[0]
    if controls.expression_from is not None:
        edited.expression[:] = reference[controls.expression_from].expression[0]
    for control, weight in controls.expression.items():
        if directions is not None:
            _set_along(edited, sum(directions[n] for n in EXPRESSION_CONTROLS[control]), weight)
            continue
        for name in EXPRESSION_CONTROLS[control]:
            edited.expression[:, names.index(name)] = weight
    for name, weight in controls.blend.items():
        if name in names:
            edited.expression[:, names.index(name)] = weight
        elif directions is not None:
            _set_along(edited, directions[name], weight)
    if controls.pose_from is not None:
        ref = reference[controls.pose_from]
        edited.yaw, edited.pitch, edited.roll = (
            ref.yaw.expand(len(fit)),
            ref.pitch.expand(len(fit)),
            ref.roll.expand(len(fit)),
        )
    else:
        edited.yaw = fit.yaw + math.radians(controls.yaw)
        edited.pitch = fit.pitch + math.radians(controls.pitch)
        edited.roll = fit.roll + math.radians(controls.roll)
    return edited


def _set_along(fit: FaceFit, direction: torch.Tensor, weight: float) -> None:
    """Move each photo's expression along ``direction`` so that its amount along it becomes ``weight``."""
    direction = direction.to(fit.expression.dtype)
    amount = fit.expression @ direction / (direction @ direction).clamp_min(1e-12)
    fit.expression += (weight - amount)[:, None] * direction


def parse_sweep(text: str, names: Sequence[str]) -> tuple[str, np.ndarray]:
    """``smile=0:1:8`` -> ("smile", 8 values from 0 to 1). The name is an expression control, a
    blendshape, or yaw / pitch / roll (degrees)."""
    try:
        name, spec = text.split("=", 1)
        start, stop, count = spec.split(":")
        values = np.linspace(float(start), float(stop), int(count))
    except ValueError as exc:
        raise RigError(f"--sweep {text!r}: write NAME=START:STOP:COUNT, e.g. smile=0:1:8") from exc
    valid = [*EXPRESSION_CONTROLS, "yaw", "pitch", "roll", *names]
    if name not in valid:
        raise RigError(f"--sweep: unknown control {name!r}; valid: {', '.join(valid)}")
    if not 2 <= len(values) <= 120:
        raise RigError("--sweep: between 2 and 120 frames")
    return name, values


def sweep_controls(base: Controls, name: str, value: float) -> Controls:
    """The controls of one sweep frame: ``base`` with one control set to ``value``."""

    if name in ("yaw", "pitch", "roll"):
        return replace(base, **{name: float(value)})
    if name in EXPRESSION_CONTROLS:
        return replace(base, expression={**base.expression, name: float(value)})
    return replace(base, blend={**base.blend, name: float(value)})
