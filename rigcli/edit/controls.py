"""Edit controls: light, expression and pose asked by name, turned into edited face parameters."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save

from rigcli import RigError
from rigcli.face.flame import FlameFaceModel
from rigcli.face.ict import ict_available, load_ict
from rigcli.face.params import FaceFit
from rigcli.files import atomic_write_bytes, atomic_write_json
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

    ``directions`` (FLAME): per ICT blendshape name, a FLAME expression direction
    (``rigcli.edit.controls.load_control_directions``); a control then sets the photo's amount along the
    sum of its blendshapes' directions to its weight (the amount read by projection), as setting
    the blendshape weights does on ICT. Names in ``names`` (FLAME's own) are set directly.
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


CONTROLS_VERSION = 1


CONTROL_RIDGE_EXP = 1e-3  # per squared PCA coefficient, in squared eye-distances of landmark error


CONTROL_RIDGE_JAW = (1e-4, 1e-1, 1e-1)  # per squared radian: opening cheap, sideways and roll not


CONTROL_JAW_SHARE = 0.5  # the jaw moves for a blendshape when it alone explains this share of its motion


CONTROL_STEPS = 4  # Gauss-Newton steps for the jaw (its skinning makes landmarks non-linear in its angle)


def _landmark_frame(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre (3,) and scale (outer eye corners' distance) of 68 iBUG landmarks (68, 3)."""
    return points.mean(0), (points[45] - points[36]).norm()


def _kabsch(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The rotation R (3, 3) minimising |R source_i - target_i| over centred point sets (N, 3)."""
    u, _, vt = torch.linalg.svd(target.T @ source)
    d = torch.sign(torch.linalg.det(u @ vt))
    return u @ torch.diag(torch.tensor([1.0, 1.0, float(d)], dtype=source.dtype)) @ vt


def ict_landmark_displacements(ict, names) -> tuple[torch.Tensor, torch.Tensor]:
    """ICT's neutral landmarks (68, 3) and, per blendshape name, its landmark displacement at weight 1 (N, 68, 3)."""
    lm = ict.landmark_vertices
    neutral = ict.neutral[lm].to(torch.float64)
    index = [ict.expression_names.index(n) for n in names]
    return neutral, ict.expression_basis[index][:, lm].to(torch.float64)


def flame_control_directions(ict, flame_model: FlameFaceModel, names=None) -> dict[str, torch.Tensor]:
    """Per ICT blendshape name, the FLAME expression (50 coefficients + 3 jaw axis-angle) whose
    landmark displacement on FLAME's neutral face matches the blendshape's on ICT's neutral face.

    Both displacements are measured in a normalised frame: each model's neutral landmarks centred
    and scaled by the outer eye corners' distance, ICT's turned onto FLAME's (Kabsch); the 68
    landmarks are the shared definition (FLAME's frontal jaw contour). The skeleton explains first:
    the jaw's rotation is fitted alone (ridge least squares, Gauss-Newton, as it acts through
    skinning), and kept when it explains at least ``CONTROL_JAW_SHARE`` of the motion's squared norm;
    then the expression coefficients fit what is left (ridge, linear given the jaw).
    Otherwise a rich expression basis would imitate an opening jaw with lips and cheeks.
    """
    names = list(ict.expression_names if names is None else names)
    ict_neutral, displacement = ict_landmark_displacements(ict, names)
    n_exp, count = flame_model.flame.n_exp, len(names)
    model64 = FlameFaceModel.__new__(FlameFaceModel)
    model64.__dict__.update(flame_model.__dict__)
    model64.flame = copy.deepcopy(flame_model.flame).to(torch.float64)
    identity = torch.zeros(1, flame_model.identity_size, dtype=torch.float64)

    def landmarks(exp: torch.Tensor, jaw: torch.Tensor) -> torch.Tensor:
        """(N, 204) landmarks of N expressions (N, n_exp) with jaws (N, 3), in eye-distances."""
        eye = torch.eye(3, dtype=torch.float64).expand(exp.shape[0], 3, 3)
        return model64.landmark_points(identity, torch.cat([exp, jaw], 1), eye).reshape(exp.shape[0], -1) / scale

    def jacobians(fn, x: torch.Tensor) -> torch.Tensor:
        """(N, 204, k): d fn(x)_n / d x_n for a row-wise fn of x (N, k), one forward-mode pass per column."""
        columns = []
        for k in range(x.shape[1]):
            tangent = torch.zeros_like(x)
            tangent[:, k] = 1
            columns.append(torch.func.jvp(fn, (x,), (tangent,))[1])
        return torch.stack(columns, -1)

    scale = 1.0
    zero_exp, zero_jaw = torch.zeros(1, n_exp, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    flame_neutral = landmarks(zero_exp, zero_jaw)[0].reshape(-1, 3)
    ict_centre, ict_scale = _landmark_frame(ict_neutral)
    flame_centre, scale = _landmark_frame(flame_neutral)
    rest = flame_neutral.reshape(-1) / scale
    turn = _kabsch((ict_neutral - ict_centre) / ict_scale, (flame_neutral - flame_centre) / scale)
    targets = (displacement @ turn.T / ict_scale).reshape(count, -1)  # eye-distances, FLAME's axes
    ridge_jaw = torch.diag(torch.tensor(CONTROL_RIDGE_JAW, dtype=torch.float64))
    ridge_exp = CONTROL_RIDGE_EXP * torch.eye(n_exp, dtype=torch.float64)
    no_exp = zero_exp.expand(count, -1)

    def jaw_landmarks(jaw: torch.Tensor) -> torch.Tensor:
        return landmarks(no_exp, jaw)

    # the jaw alone, for every name at once: ridge Gauss-Newton
    jaw = zero_jaw.expand(count, -1).clone()
    for _ in range(CONTROL_STEPS):
        jac = jacobians(jaw_landmarks, jaw)
        residual = jaw_landmarks(jaw) - rest - targets
        lhs = jac.transpose(1, 2) @ jac + ridge_jaw
        rhs = (jac.transpose(1, 2) @ residual[..., None])[..., 0] + jaw @ ridge_jaw
        jaw = jaw - torch.linalg.solve(lhs, rhs)
    left = jaw_landmarks(jaw) - rest - targets
    weak = (left * left).sum(1) > (1 - CONTROL_JAW_SHARE) * (targets * targets).sum(1)
    jaw[weak] = 0  # the jaw explains little of these blendshapes: leave them to the expression
    # then the expression coefficients, linear given the jaw (exactly so at rest: one Jacobian for all)
    jac = jacobians(lambda e: landmarks(e, jaw), torch.zeros(count, n_exp, dtype=torch.float64))
    residual = landmarks(no_exp, jaw) - rest - targets
    lhs = jac.transpose(1, 2) @ jac + ridge_exp
    exp = -torch.linalg.solve(lhs, (jac.transpose(1, 2) @ residual[..., None])[..., 0])
    directions = torch.cat([exp, jaw], 1).to(torch.float32)
    return {name: directions[i].clone() for i, name in enumerate(names)}


def flame_displacement(flame_model: FlameFaceModel, expression: torch.Tensor) -> torch.Tensor:
    """Landmark displacement (68, 3) of a FLAME expression (53,) on the neutral face, in eye-distances."""
    identity = torch.zeros(1, flame_model.identity_size)
    eye = torch.eye(3)[None]
    with torch.no_grad():
        moved = flame_model.landmark_points(identity, expression[None].float(), eye)[0]
        rest = flame_model.landmark_points(identity, torch.zeros_like(expression)[None].float(), eye)[0]
    return (moved - rest) / _landmark_frame(rest)[1]


def load_control_directions(store, flame_model: FlameFaceModel) -> dict[str, torch.Tensor]:
    """ICT's blendshapes as FLAME directions (``flame_control_directions``), cached in the store per
    (ICT model, FLAME model) as safetensors + JSON; a RigError when ICT-FaceKit is not imported."""

    if not ict_available(store):
        raise RigError(
            "expression controls on FLAME are derived from ICT-FaceKit's blendshapes, which are not imported: "
            "run `rig assets download-ict` (or `rig assets import-ict PATH`) (see README, 'Using FLAME')"
        )
    ict = load_ict(store)
    folder = store.root / "assets" / "controls"
    stem = f"{ict.model_id}--{flame_model.model_id}-v{CONTROLS_VERSION}"
    blob_path, meta_path = folder / f"{stem}.safetensors", folder / f"{stem}.json"
    if blob_path.is_file() and meta_path.is_file():
        blob = blob_path.read_bytes()
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") == hashlib.sha256(blob).hexdigest():
            return dict(load(blob))
    directions = flame_control_directions(ict, flame_model)
    blob = save({k: v.contiguous() for k, v in directions.items()})
    meta = {
        "ict_model_id": ict.model_id,
        "flame_model_id": flame_model.model_id,
        "version": CONTROLS_VERSION,
        "names": list(directions),
        "layout": flame_model.expression_names,
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    with contextlib.suppress(OSError):  # a read-only store computes them each time
        atomic_write_bytes(blob_path, blob)
        atomic_write_json(meta_path, meta)  # last: the pair is complete
    return directions
