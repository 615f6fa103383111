"""FLAME's mesh as a differentiable torch module: shape and expression blendshapes, pose
correctives, linear blend skinning over its five joints, and DECA's 68-landmark embedding (a
jaw contour chosen by the head's yaw), built from the tensors the FLAME import writes.

The mathematics alone, in FLAME's own units (metres) and joints: ``rigcli.face.flame`` puts it
behind the face-model interface (centimetres, the fitter's camera) and reads it from the store.
"""

from __future__ import annotations

import torch
from torch import nn

JOINT_NAMES = ("global", "neck", "jaw", "eye_left", "eye_right")


FLAME_TENSORS = (
    "v_template",
    "shapedirs",
    "exprdirs",
    "posedirs",
    "J_regressor",
    "weights",
    "kintree_table",
    "faces",
    "static_lmk_faces_idx",
    "static_lmk_bary_coords",
    "dynamic_lmk_faces_idx",
    "dynamic_lmk_bary_coords",
    "full_lmk_faces_idx",
    "full_lmk_bary_coords",
)


CONTOUR_LIMIT_DEG = 39  # the dynamic embedding has 2 * 39 + 1 rows


def axis_angle_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, (..., 3) -> (..., 3, 3); smooth (and differentiable) at zero rotation."""
    theta = torch.sqrt((rotvec * rotvec).sum(-1, keepdim=True) + 1e-16)
    axis = rotvec / theta
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*rotvec.shape[:-1], 3, 3)
    sin, cos = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)
    return eye + sin * k + (1 - cos) * (k @ k)


def matrix_yaw(rotation: torch.Tensor) -> torch.Tensor:
    """Rotation about y of (..., 3, 3) in a y-x-z reading: atan2(-R[2,0], hypot(R[0,0], R[1,0])), radians."""
    return torch.atan2(-rotation[..., 2, 0], torch.hypot(rotation[..., 0, 0], rotation[..., 1, 0]))


def contour_row(yaw_deg: torch.Tensor, limit: int = CONTOUR_LIMIT_DEG) -> torch.Tensor:
    """Row of the dynamic contour embedding for a head yaw in degrees (DECA's rule), (B,) long."""
    y = torch.round(yaw_deg.clamp(max=limit)).long()
    return torch.where(y >= 0, y, torch.where(y < -limit, 2 * limit, limit - y))


class Flame(nn.Module):
    """FLAME with linear blend skinning and its 68 landmarks, built from the import's tensors.

    Only the first ``n_shape`` shape and ``n_exp`` expression components are used (DECA: 100, 50).
    Everything is batched and differentiable; units are the file's (metres).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], n_shape: int = 100, n_exp: int = 50) -> None:
        super().__init__()
        missing = [k for k in FLAME_TENSORS if k not in tensors]
        if missing:
            raise ValueError(f"FLAME tensors missing: {', '.join(missing)}")
        f32 = lambda k: torch.as_tensor(tensors[k]).to(torch.float32)  # noqa: E731
        i64 = lambda k: torch.as_tensor(tensors[k]).to(torch.int64)  # noqa: E731
        template = f32("v_template")
        shapedirs, exprdirs = f32("shapedirs")[..., :n_shape], f32("exprdirs")[..., :n_exp]
        regressor = f32("J_regressor")
        self.register_buffer("v_template", template)
        # bases as (components, V, 3), contiguous: one matrix product each, and cheap vertex subsets
        self.register_buffer("shape_basis", shapedirs.permute(2, 0, 1).contiguous())
        self.register_buffer("expr_basis", exprdirs.permute(2, 0, 1).contiguous())
        self.register_buffer("pose_basis", f32("posedirs").permute(2, 0, 1).contiguous())
        self.register_buffer("J_regressor", regressor)
        self._joint_bases: dict = {}
        self.register_buffer("weights", f32("weights"))
        self.register_buffer("faces", i64("faces"))
        parents = i64("kintree_table")[0].clone()
        parents[0] = -1
        self.parents = [int(p) for p in parents]
        if any(not (0 <= p < j) for j, p in enumerate(self.parents[1:], 1)):
            raise ValueError("FLAME kintree_table: every joint's parent must come before it")
        self.register_buffer("static_faces", i64("static_lmk_faces_idx").reshape(-1))
        self.register_buffer("static_bary", f32("static_lmk_bary_coords").reshape(-1, 3))
        self.register_buffer("dynamic_faces", i64("dynamic_lmk_faces_idx"))
        self.register_buffer("dynamic_bary", f32("dynamic_lmk_bary_coords"))
        self.register_buffer("full_faces", i64("full_lmk_faces_idx").reshape(-1))
        self.register_buffer("full_bary", f32("full_lmk_bary_coords").reshape(-1, 3))
        joints = self.J_regressor.shape[0]
        if self.pose_basis.shape[0] != 9 * (joints - 1) or len(self.parents) != joints:
            raise ValueError("FLAME posedirs/kintree_table do not match the joint count")

    @property
    def n_shape(self) -> int:
        return int(self.shape_basis.shape[0])

    @property
    def n_exp(self) -> int:
        return int(self.expr_basis.shape[0])

    @property
    def joint_count(self) -> int:
        return int(self.J_regressor.shape[0])

    def full_pose(self, pose6: torch.Tensor) -> torch.Tensor:
        """DECA's 6 pose numbers (global 3, jaw 3) -> (B, 5, 3) axis-angles, neck and eyes at rest."""
        full = pose6.new_zeros(pose6.shape[0], self.joint_count, 3)
        full[:, 0] = pose6[:, :3]
        full[:, 2] = pose6[:, 3:6]
        return full

    def forward(
        self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Vertices (B, V, 3) and posed joints (B, J, 3) from shape (B, <=n_shape), expression
        (B, <=n_exp) and pose (B, J, 3) axis-angles in joint order (global, neck, jaw, eyes).

        ``index`` computes only those vertices (B, len(index), 3): skinning is per vertex and the
        joints come from regressed bases, so landmark fitting need not pose the whole mesh.
        """
        dtype = self.v_template.dtype
        shape, expression, pose = shape.to(dtype), expression.to(dtype), pose.to(dtype)
        batch, ns, ne = pose.shape[0], shape.shape[1], expression.shape[1]
        joint_template, joint_shape, joint_expr = self.joint_bases()
        joints = joint_template + torch.einsum("bs,sjc->bjc", shape, joint_shape[:ns])
        joints = joints + torch.einsum("be,ejc->bjc", expression, joint_expr[:ne])
        template, sb, eb, pb, weights = (
            self.v_template,
            self.shape_basis,
            self.expr_basis,
            self.pose_basis,
            self.weights,
        )
        if index is not None:
            template, sb, eb, pb, weights = template[index], sb[:, index], eb[:, index], pb[:, index], weights[index]
        count = template.shape[0]
        shaped = template + (shape @ sb[:ns].reshape(ns, -1)).reshape(batch, count, 3)
        shaped = shaped + (expression @ eb[:ne].reshape(ne, -1)).reshape(batch, count, 3)
        rot = axis_angle_to_matrix(pose)  # (B, J, 3, 3)
        eye = torch.eye(3, dtype=dtype, device=pose.device)
        feature = (rot[:, 1:] - eye).reshape(batch, -1)  # (R_j - I) row-major, joints 1..J-1
        posed = shaped + (feature @ pb.reshape(pb.shape[0], -1)).reshape(batch, count, 3)
        # world transform of each joint along the chain
        world = []
        for j, parent in enumerate(self.parents):
            offset = joints[:, j] if parent < 0 else joints[:, j] - joints[:, parent]
            local = _rigid(rot[:, j], offset)
            world.append(local if parent < 0 else world[parent] @ local)
        world = torch.stack(world, 1)  # (B, J, 4, 4)
        posed_joints = world[:, :, :3, 3]
        # remove the rest joint position so each transform acts on rest-pose vertices
        skin = world[:, :, :3].clone()
        skin[..., 3] = posed_joints - (world[:, :, :3, :3] @ joints[..., None])[..., 0]
        blended = (weights @ skin.reshape(batch, -1, 12)).reshape(batch, count, 3, 4)
        verts = (blended[..., :3] @ posed[..., None])[..., 0] + blended[..., 3]
        return verts, posed_joints

    def joint_bases(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """J_regressor applied to the template and to each basis: joints are linear in the
        coefficients, so they are regressed once (per dtype and device), not per call."""
        key = (self.v_template.dtype, self.v_template.device)
        if key not in self._joint_bases:
            reg = self.J_regressor
            self._joint_bases = {
                key: (
                    reg @ self.v_template,
                    torch.einsum("jv,svc->sjc", reg, self.shape_basis),
                    torch.einsum("jv,evc->ejc", reg, self.expr_basis),
                )
            }
        return self._joint_bases[key]

    def contour_rows(self, pose: torch.Tensor) -> torch.Tensor:
        """(B,) dynamic-contour row for poses (B, J, 3): the yaw of R_global R_neck."""
        rot = axis_angle_to_matrix(pose[:, :2].detach())
        return contour_row(torch.rad2deg(matrix_yaw(rot[:, 0] @ rot[:, 1])), (self.dynamic_faces.shape[0] - 1) // 2)

    def landmarks(self, vertices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The 68 landmarks (B, 68, 3): 17 contour points from ``rows`` of the dynamic embedding,
        then the 51 static points, each a barycentric mix of a triangle's vertices."""
        batch = vertices.shape[0]
        faces = torch.cat([self.dynamic_faces[rows], self.static_faces.expand(batch, -1)], 1)
        bary = torch.cat([self.dynamic_bary[rows], self.static_bary.expand(batch, -1, -1)], 1)
        return barycentric_points(vertices, self.faces, faces, bary.to(vertices.dtype))

    def landmarks3d(self, vertices: torch.Tensor) -> torch.Tensor:
        """DECA's fixed 3D 68 landmarks (the ``full`` embedding), (B, 68, 3)."""
        batch = vertices.shape[0]
        faces = self.full_faces.expand(batch, -1)
        return barycentric_points(vertices, self.faces, faces, self.full_bary.to(vertices.dtype).expand(batch, -1, -1))


def _rigid(rotation: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3), (B, 3) -> (B, 4, 4) homogeneous transforms."""
    out = torch.zeros(*rotation.shape[:-2], 4, 4, dtype=rotation.dtype, device=rotation.device)
    out[..., :3, :3] = rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1
    return out


def barycentric_points(
    vertices: torch.Tensor, triangles: torch.Tensor, face_index: torch.Tensor, bary: torch.Tensor
) -> torch.Tensor:
    """Points on a batch of meshes: vertices (B, V, 3), face_index (B, L), bary (B, L, 3) -> (B, L, 3)."""
    corners = triangles[face_index]  # (B, L, 3)
    batch = torch.arange(vertices.shape[0], device=vertices.device)[:, None, None]
    return (vertices[batch, corners] * bary[..., None]).sum(2)
