"""ICT-FaceKit's blendshapes retargeted onto FLAME: per blendshape name, the FLAME expression (50
coefficients, then the jaw's axis-angle) that moves FLAME's 68 landmarks as the blendshape moves ICT's.

Why: the edit controls (``--smile``, ``--blend jawOpen=1``, ``--sweep``) are named after ICT's ARKit
blendshapes, which are ICT's own expression values; FLAME's expression is unnamed PCA components
and a jaw joint. So FLAME answers ``expression_directions`` (the face-model interface,
``rigcli.face.model``) with these directions, and an edit on FLAME sets the photo's amount along
them (``rigcli.edit.controls.apply_controls``). They belong to the two models, not to an edit:
computed once per (ICT, FLAME) pair and cached in the store's ``assets/controls``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load, save

from rigcli import RigError
from rigcli.face.ict import ict_available, load_ict
from rigcli.files import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from rigcli.face.flame import FlameFaceModel
    from rigcli.store import Store

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
    model64 = flame_model.to(dtype=torch.float64)
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


def load_control_directions(store: Store, flame_model: FlameFaceModel) -> dict[str, torch.Tensor]:
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
