"""A FLAME-shaped model made from ICT-FaceKit, for tests: the real FLAME files are licensed and absent.

Laid out exactly as the FLAME import writes its tensors (``rigcli.face.flame_mesh.FLAME_TENSORS``), in metres,
turned TILT_DEG about x so that nothing can rely on the two models sharing a frame:
the template is ICT's neutral, shape directions ICT's identity basis, expression directions a
random orthogonal mix of ICT's 50 blendshapes that do not move the jaw (as FLAME's PCA
expressions), and five joints as FLAME's: global, neck, a jaw hinge between the ears that skins
the lower face, and the two eyes skinning the eyeballs. Landmarks are ICT's 68 landmark vertices,
as barycentric points (1, 0, 0) on a triangle starting at each, the same contour for every yaw.
"""

from __future__ import annotations

import math

import numpy as np
import torch

TILT_DEG = 8.0
JAW_BLENDSHAPES = ("jawOpen", "jawLeft", "jawRight")


def tilt() -> torch.Tensor:
    a = math.radians(TILT_DEG)
    return torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(a), -math.sin(a)], [0.0, math.sin(a), math.cos(a)]])


def _triangle_from(triangles: torch.Tensor, vertex: int) -> tuple[int, list[float]]:
    """A triangle holding ``vertex`` and the barycentric weights that put the point on it."""
    rows, cols = torch.nonzero(triangles == vertex, as_tuple=True)
    bary = [0.0, 0.0, 0.0]
    bary[int(cols[0])] = 1.0
    return int(rows[0]), bary


def flame_like_tensors(ict, seed: int = 0) -> dict[str, torch.Tensor]:
    """FLAME tensors built from the ICT ``LinearFaceModel`` ``ict`` (see the module doc)."""
    turn = tilt()
    metres = lambda x: (x @ turn.T) / 100.0  # noqa: E731  (..., V, 3) cm -> metres, tilted
    neutral = ict.neutral
    v = neutral.shape[0]
    lm = ict.landmark_vertices
    keep = [i for i, n in enumerate(ict.expression_names) if n not in JAW_BLENDSHAPES]
    rng = np.random.default_rng(seed)
    mix = torch.from_numpy(np.linalg.qr(rng.normal(size=(len(keep), len(keep))))[0].astype(np.float32))
    exprdirs = torch.einsum("kj,jvc->kvc", mix, ict.expression_basis[keep])

    eyes = (ict.regions["eyeball_left"], ict.regions["eyeball_right"])
    mouth_y = float(neutral[lm[[62, 66]], 1].mean())
    chin_y = float(neutral[lm[8], 1])
    y = neutral[:, 1]
    jaw = ((mouth_y - y) / 0.5).clamp(0, 1) * ((y - (chin_y - 4.0)) / 2.0).clamp(0, 1)
    jaw = jaw * ict.regions["face"].float() * (neutral[:, 2] > float(neutral[lm[[0, 16]], 2].mean())).float()
    weights = torch.zeros(v, 5)
    weights[:, 0] = 1 - jaw
    weights[:, 2] = jaw
    for j, eye in zip((3, 4), eyes, strict=True):
        weights[eye] = 0.0
        weights[eye, j] = 1.0
    regressor = torch.zeros(5, v)
    regressor[0] = 1.0 / v
    regressor[1, lm[[0, 16]]] = 0.5
    for side in (-1.0, 1.0):  # the hinge: between the ears, 2 cm below and 4 cm behind the contour's ends
        hinge = neutral[lm[16]] * torch.tensor([side, 1.0, 1.0]) + torch.tensor([0.0, -2.0, -4.0])
        regressor[2, int((neutral - hinge).norm(dim=1).argmin())] = 0.5
    for j, eye in zip((3, 4), eyes, strict=True):
        regressor[j, eye] = 1.0 / float(eye.sum())

    tris = ict.triangles
    placed = [_triangle_from(tris, int(i)) for i in lm]
    faces = torch.tensor([f for f, _ in placed])
    bary = torch.tensor([b for _, b in placed])
    return {
        "v_template": metres(neutral),
        "shapedirs": metres(ict.identity_basis).permute(1, 2, 0).contiguous(),
        "exprdirs": metres(exprdirs).permute(1, 2, 0).contiguous(),
        "posedirs": torch.zeros(v, 3, 36),
        "J_regressor": regressor,
        "weights": weights,
        "kintree_table": torch.tensor([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
        "faces": tris.clone(),
        "static_lmk_faces_idx": faces[17:].clone(),
        "static_lmk_bary_coords": bary[17:].clone(),
        "dynamic_lmk_faces_idx": faces[:17].expand(79, -1).clone(),
        "dynamic_lmk_bary_coords": bary[:17].expand(79, -1, -1).clone(),
        "full_lmk_faces_idx": faces[None].clone(),
        "full_lmk_bary_coords": bary[None].clone(),
    }


def flame_like_model(ict, seed: int = 0):
    """The ``FlameFaceModel`` of ``flame_like_tensors`` (model id ``flame-test``)."""
    from rigcli.face.flame import FlameFaceModel

    return FlameFaceModel.from_tensors(flame_like_tensors(ict, seed), "flame-test" + "0" * 6)
