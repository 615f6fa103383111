"""FLAME (the paper's face model) and DECA's coarse encoder, in torch, from plain tensors.

FLAME: a template mesh plus shape and expression blendshapes, pose blendshapes driven by the
rotations of the non-root joints, and linear blend skinning over five joints (global, neck, jaw,
left eye, right eye; ``kintree_table`` says who is whose parent). With joint rotations R_j from
axis-angle vectors and joints J = J_regressor @ (shaped mesh):

    shaped  = template + shapedirs . shape + exprdirs . expression
    posed   = shaped + posedirs . concat_j>0 (R_j - I)            (row-major 3x3 per joint)
    G_0     = [R_0 | J_0],  G_j = G_parent(j) [R_j | J_j - J_parent(j)]
    vertex  = sum_j w_vj G_j [I | -J_j] (posed, 1)

``posedirs`` comes in the FLAME file's own layout, (V, 3, 9 (J - 1)); DECA flattens the same
array to (9 (J - 1), 3V), which is the same product.

Landmarks (dlib's 68, iBUG order) are barycentric points on triangles: 51 static ones (brows,
eyes, nose, mouth) and 17 jaw-contour points whose triangles depend on how far the head is turned:
the yaw of R_global R_neck, in whole degrees, picks one of 79 rows of the dynamic embedding
(0..39 for yaw 0..39 degrees, 40..78 for yaw -1..-39; beyond +-39 the last row of each side),
exactly as DECA's FLAME layer does (DECA's sign, which differs from FLAME_PyTorch's).

DECA's coarse encoder ``E_flame``: a ResNet-50 trunk (bottleneck blocks, stride in the 3x3
convolution, 7x7 average pool, no classifier) then Linear(2048, 1024), ReLU, Linear(1024, 236).
The 236 outputs are, in order, shape 100, texture 50, expression 50, pose 6 (global axis-angle 3 +
jaw axis-angle 3), camera 3 (orthographic scale, then x and y translation) and light 27 (9 x 3
SH). Parameter names match ``deca_model.tar['E_flame']`` so its weights load strictly. Its input
is an RGB crop in [0, 1], 224 x 224, of a square 1.25 x 1.1 x the mean side of the 68-landmark
box, centred on that box (DECA's test-time crop from landmarks).

Then the paper's data step: ``FlameFaceModel`` puts FLAME behind the fitter's face-model interface
(so the landmark fitter fits FLAME without DECA's weights), ``deca_to_fit`` / ``estimate_with_deca``
turn DECA's codes into a fit in the aligned frame, and ``render_deca_buffers`` draws the buffers
with DECA's texture-space albedo (``FlameTexture``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

JOINT_NAMES = ("global", "neck", "jaw", "eye_left", "eye_right")
DECA_SPLIT = (("shape", 100), ("tex", 50), ("exp", 50), ("pose", 6), ("cam", 3), ("light", 27))
DECA_CODE_SIZE = sum(n for _, n in DECA_SPLIT)
DECA_INPUT_SIZE = 224
DECA_CROP_SCALE = 1.25  # DECA's TestData scale
DECA_LANDMARK_BOX = 1.1  # DECA's bbox2point for a 68-landmark box
CONTOUR_LIMIT_DEG = 39  # the dynamic embedding has 2 * 39 + 1 rows

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


# ---------------------------------------------------------------- rotations


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


# ---------------------------------------------------------------- FLAME


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


# ---------------------------------------------------------------- FLAME as the fitter's face model

FLAME_NAME = "flame"
CENTIMETRES = 100.0  # FLAME is in metres; the fitter, renderer and their constants work in centimetres
JAW_NAMES = ("jawPitch", "jawYaw", "jawRoll")  # the jaw joint's axis-angle (x opens the mouth)
EXPRESSION_PRIOR = 1e-4  # per squared PCA coefficient (FLAME's components are unit-variance)
JAW_PRIOR = (1e-4, 1e-2, 1e-2)  # per squared radian: opening is cheap, sideways and roll are not


class FlameFaceModel:
    """FLAME behind the ``FaceModel`` interface of ``rigcli.facemodel``.

    ``identity`` is FLAME's shape (DECA's first 100 components), ``expression`` is FLAME's first 50
    expression coefficients followed by the jaw's axis-angle (3): the jaw is a joint, so the mesh
    comes from skinning, not a linear basis. Rigid head pose stays in the fitter's camera, as for
    ICT: neck and eyes are at rest and the global joint is the identity. Vertices are in centimetres.

    Unlike ICT, the 68 landmarks are barycentric points whose jaw contour depends on the head's yaw:
    ``landmark_points`` gives them (the fitter uses it when a model has it); ``landmark_vertices``
    holds, per landmark, the corner of its triangle with the largest weight (frontal contour), for
    the few places that want a vertex (initial alignment, skin selection).

    Regions, from FLAME's own data: ``eyeball_left`` / ``eyeball_right`` are the vertices skinned
    mostly to the eye joints (left: the one on the subject's left, +x); ``face`` is every other
    vertex in front of the ears (z at least that of the contour's ends, landmarks 0 and 16, at
    rest) from the chin up to 0.45 of the chin-to-brow height above the brows; ``narrow_face`` is
    the face within 85% of the contour's half-width of the nose bridge, from the chin to 0.15 of
    that height above the brows.
    """

    name = FLAME_NAME
    expression_range = None  # PCA coefficients and a joint angle: unbounded, held by the L2 prior below

    def __init__(self, flame: Flame, model_id: str) -> None:
        self.flame = flame
        self.model_id = model_id
        self.expression_names = [f"exp{k:02d}" for k in range(flame.n_exp)] + list(JAW_NAMES)
        with torch.no_grad():
            self.neutral = flame.v_template * CENTIMETRES
            lm = flame.landmarks(self.neutral[None], torch.zeros(1, dtype=torch.long))[0]
        faces = torch.cat([flame.dynamic_faces[0], flame.static_faces])
        bary = torch.cat([flame.dynamic_bary[0], flame.static_bary])
        corners = flame.faces[faces]
        self.landmark_vertices = corners.gather(1, bary.argmax(1, keepdim=True))[:, 0]
        self.regions = self._regions(lm)
        self.triangles = self._outward(flame.faces)
        self.texture: FlameTexture | None = None  # DECA's albedo space, when imported with its UVs
        self.texture_id: str | None = None  # which one (training-data caches depend on it)

    def _regions(self, lm: torch.Tensor) -> dict[str, torch.Tensor]:
        flame, v = self.flame, self.neutral
        owner = flame.weights.argmax(1)
        eyes = [owner == j for j in (3, 4)] if flame.joint_count >= 5 else [owner < 0, owner < 0]
        left_first = (v[eyes[0], 0].mean() if eyes[0].any() else 0) >= (v[eyes[1], 0].mean() if eyes[1].any() else 0)
        eye_left, eye_right = eyes if left_first else eyes[::-1]
        chin, brow = lm[8, 1], lm[17:27, 1].max()
        height = brow - chin
        front = v[:, 2] >= torch.minimum(lm[0, 2], lm[16, 2])
        face = front & ~(eye_left | eye_right) & (v[:, 1] >= chin) & (v[:, 1] <= brow + 0.45 * height)
        half_width = (lm[16, 0] - lm[0, 0]).abs() / 2
        narrow = face & ((v[:, 0] - lm[27, 0]).abs() <= 0.85 * half_width) & (v[:, 1] <= brow + 0.15 * height)
        return {"face": face, "narrow_face": narrow, "eyeball_left": eye_left, "eyeball_right": eye_right}

    def _outward(self, faces: torch.Tensor) -> torch.Tensor:
        """Triangles wound counter-clockwise from outside: the face's normals must point at the viewer (+z)."""
        from rigcli.render import vertex_normals

        normals = vertex_normals(self.neutral[None], faces)[0]
        face = self.regions["face"]
        facing = normals[face, 2].mean() if face.any() else normals[:, 2].mean()
        self.winding_flipped = bool(facing < 0)  # corner order of uv_faces must follow
        return faces[:, [0, 2, 1]] if self.winding_flipped else faces

    @property
    def identity_size(self) -> int:
        return self.flame.n_shape

    @property
    def vertex_count(self) -> int:
        return int(self.neutral.shape[0])

    def _mesh(
        self, identity: torch.Tensor, expression: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.flame.n_exp
        batch = expression.shape[0]
        pose = expression.new_zeros(batch, self.flame.joint_count, 3)
        pose[:, 2] = expression[:, n : n + 3]
        verts, _ = self.flame(identity.expand(batch, -1), expression[:, :n], pose, index)
        return verts * CENTIMETRES, pose

    def vertices(
        self, identity: torch.Tensor, expression: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, V, 3) in centimetres; ``index`` poses only those vertices."""
        return self._mesh(identity, expression, index)[0]

    def landmark_points(self, identity: torch.Tensor, expression: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """The 68 landmarks (B, 68, 3) in model space for a head turned by ``rotation`` (B, 3, 3): the
        rotation plays FLAME's global joint (neck at rest), which picks the jaw contour."""
        flame = self.flame
        yaw = torch.rad2deg(matrix_yaw(rotation.detach()))
        rows = contour_row(yaw, (flame.dynamic_faces.shape[0] - 1) // 2)
        batch = rows.shape[0]
        faces = torch.cat([flame.dynamic_faces[rows], flame.static_faces.expand(batch, -1)], 1)
        bary = torch.cat([flame.dynamic_bary[rows], flame.static_bary.expand(batch, -1, -1)], 1)
        used, local = torch.unique(flame.faces[faces], return_inverse=True)  # only these vertices are posed
        verts, _ = self._mesh(identity, expression, used)
        corners = verts[torch.arange(batch, device=verts.device)[:, None, None], local]  # (B, 68, 3, 3)
        return (corners * bary[..., None].to(verts.dtype)).sum(2)

    def expression_prior(self, expression: torch.Tensor) -> torch.Tensor:
        """(B,) Gaussian prior on the coefficients and the jaw angle, in the fitter's loss units."""
        n = self.flame.n_exp
        jaw = torch.tensor(JAW_PRIOR, dtype=expression.dtype, device=expression.device)
        return EXPRESSION_PRIOR * (expression[:, :n] ** 2).sum(1) + (jaw * expression[:, n : n + 3] ** 2).sum(1)

    def to(self, device: torch.device | str) -> FlameFaceModel:
        """The same model with its tensors on ``device``."""
        moved = FlameFaceModel.__new__(FlameFaceModel)
        moved.__dict__.update(self.__dict__)
        moved.flame = copy.deepcopy(self.flame).to(device)  # nn.Module.to moves in place
        for key in ("neutral", "landmark_vertices", "triangles"):
            setattr(moved, key, getattr(self, key).to(device))
        moved.regions = {k: r.to(device) for k, r in self.regions.items()}
        moved.texture = self.texture.to(device) if self.texture is not None else None
        return moved

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], model_id: str, n_shape: int = 100, n_exp: int = 50):
        """The face model from the FLAME import's tensors (see ``FLAME_TENSORS``)."""
        return FlameFaceModel(Flame(tensors, n_shape=n_shape, n_exp=n_exp), model_id)


# ---------------------------------------------------------------- DECA's encoder


class Bottleneck(nn.Module):
    """ResNet-50 block: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4, identity or projected shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50Trunk(nn.Module):
    """ResNet-50 without its classifier: image (B, 3, H, W) -> pooled features (B, 2048)."""

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layer = []
            for k in range(count):
                layer.append(Bottleneck(inplanes, planes, stride if k == 0 else 1))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(x, 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean((2, 3))  # DECA's 7x7 average pool on a 224 input


class DecaEncoder(nn.Module):
    """DECA's coarse encoder ``E_flame``: crop (B, 3, 224, 224) RGB in [0, 1] -> code (B, 236)."""

    def __init__(self, out_size: int = DECA_CODE_SIZE) -> None:
        super().__init__()
        self.encoder = ResNet50Trunk()
        self.layers = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, out_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(self.encoder(images))

    @staticmethod
    def from_state_dict(state: dict[str, torch.Tensor]) -> DecaEncoder:
        """The encoder with ``deca_model.tar['E_flame']``'s weights, in eval mode; a RigError names
        the keys that differ when the state dict is not DECA's coarse encoder."""
        from rigcli import RigError

        encoder = DecaEncoder()
        expected = encoder.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
        if missing or unexpected or wrong:
            parts = [
                f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if keys
            ]
            raise RigError("not DECA's E_flame state dict (" + "; ".join(parts) + ")")
        encoder.load_state_dict(state, strict=True)
        return encoder.eval()


def decompose(code: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split DECA codes (B, 236) into shape, tex, exp, pose, cam and light (B, 9, 3)."""
    if code.shape[-1] != DECA_CODE_SIZE:
        raise ValueError(f"a DECA code has {DECA_CODE_SIZE} numbers, not {code.shape[-1]}")
    out, start = {}, 0
    for name, size in DECA_SPLIT:
        out[name] = code[:, start : start + size]
        start += size
    out["light"] = out["light"].reshape(-1, 9, 3)
    return out


def deca_crop_box(landmarks: np.ndarray, scale: float = DECA_CROP_SCALE) -> tuple[np.ndarray, float]:
    """Centre (2,) and side of DECA's square crop around 68 landmarks (N, 2) in pixels.

    Side = scale x 1.1 x the mean of the landmark box's width and height, truncated to whole
    pixels as DECA does; centre = the box's centre.
    """
    lo, hi = landmarks.min(0), landmarks.max(0)
    mean_side = ((hi - lo).sum()) / 2 * DECA_LANDMARK_BOX
    return (lo + hi) / 2, float(int(mean_side * scale))


def deca_crop_transform(landmarks: np.ndarray, size: int = DECA_INPUT_SIZE) -> np.ndarray:
    """2x3 affine from photo pixels to crop pixels: the box's corners go to pixel 0 and size - 1."""
    centre, side = deca_crop_box(landmarks)
    k = (size - 1) / side
    return np.array([[k, 0.0, -k * (centre[0] - side / 2)], [0.0, k, -k * (centre[1] - side / 2)]])


def deca_crop(rgb: np.ndarray, landmarks: np.ndarray, size: int = DECA_INPUT_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """DECA's input for one 8-bit photo (H, W, 3): (3, size, size) float RGB in [0, 1] (bilinear,
    the photo reflected where the square leaves it, as ``align`` does) and the photo-to-crop affine."""
    from rigcli.align import invert_affine, warp

    to_crop = deca_crop_transform(np.asarray(landmarks, dtype=np.float64), size)
    crop = warp(rgb, invert_affine(to_crop), size)
    image = torch.from_numpy(np.ascontiguousarray(crop)).float() / 255.0
    return image.permute(2, 0, 1).contiguous(), to_crop


@dataclass
class DecaOrthoCamera:
    """DECA's orthographic camera: normalized image coordinates = s * (X[:2] + t), y flipped."""

    scale: torch.Tensor  # (B,)
    translation: torch.Tensor  # (B, 2)

    @staticmethod
    def from_code(cam: torch.Tensor) -> DecaOrthoCamera:
        return DecaOrthoCamera(cam[:, 0], cam[:, 1:3])

    def to_pixels(self, points: torch.Tensor, size: int) -> torch.Tensor:
        """(B, N, 3) model points -> (B, N, 2) pixel coordinates in a size x size crop (y down)."""
        ndc = self.scale[:, None, None] * (points[..., :2] + self.translation[:, None])
        ndc = ndc * torch.tensor([1.0, -1.0], dtype=ndc.dtype)
        return (ndc + 1) * size / 2


# ---------------------------------------------------------------- DECA's estimate as a fit


def rotate_light_about_z(light: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """SH light (B, 9, 3) for a scene turned by ``angle`` (B,) radians about the camera's z axis, so
    that shading(Rz n, rotated) = shading(n, light). Order 1 (x, y) and the (xz, yz) pair turn with
    the angle, the (2xy, x^2 - y^2) pair with twice it (DECA's constant for xy is twice that of
    x^2 - y^2); the rest is symmetric about z."""
    c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    c2, s2 = torch.cos(2 * angle)[:, None], torch.sin(2 * angle)[:, None]
    out = light.clone()
    for a, b in ((1, 2), (5, 6)):  # (x, y) and (xz, yz)
        out[:, a] = c * light[:, a] - s * light[:, b]
        out[:, b] = s * light[:, a] + c * light[:, b]
    out[:, 4] = c2 * light[:, 4] + s2 * light[:, 7]  # xy
    out[:, 7] = -s2 * light[:, 4] + c2 * light[:, 7]  # x^2 - y^2
    return out


def _fit_width(values: torch.Tensor, width: int) -> torch.Tensor:
    """(B, n) -> (B, width) float32: cut, or padded with zeros (components DECA does not estimate)."""
    values = values[:, :width].to(torch.float32)
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))


def deca_to_fit(
    model: FlameFaceModel,
    params: dict[str, torch.Tensor],
    crop_to_frame: np.ndarray,
    crop_size: int = DECA_INPUT_SIZE,
    shared_identity: bool = True,
):
    """DECA's parameters of a batch (``decompose``'s dict) as the fitter's ``FaceFit`` in another frame.

    ``crop_to_frame`` (B, 2, 3) maps DECA's crop pixels to the target frame's (the aligned crop),
    a similarity. DECA turns the head about FLAME's root joint J0 and projects orthographically,
    pixel = (size / 2) (1 + s (X + t)) with y flipped; the fitter turns about the origin, so the
    turn's offset J0 - R J0 joins the translation, and an in-plane turn of the crop joins the
    rotation (as roll) and the light. With ``shared_identity`` the person's shape is the mean of
    DECA's shapes over the batch, as the paper fixed it; albedo is left to the caller.
    """
    from rigcli.fit import FaceFit
    from rigcli.render import matrix_to_euler

    flame = model.flame
    shape = _fit_width(params["shape"], flame.n_shape)
    exp = _fit_width(params["exp"], flame.n_exp)
    pose = params["pose"].to(torch.float32)
    cam = params["cam"].to(torch.float32)
    batch = shape.shape[0]
    identity = shape.mean(0) if shared_identity else shape
    rest_pose = torch.zeros(batch, flame.joint_count, 3)
    with torch.no_grad():
        _, joints = flame(identity.expand(batch, -1), exp, rest_pose)
    root = joints[:, 0]  # metres; at rest the posed joints are the regressed ones
    rotation = axis_angle_to_matrix(pose[:, :3])
    offset = (root - (rotation @ root[..., None])[..., 0])[:, :2] + cam[:, 1:3]
    half = crop_size / 2
    scale = half * cam[:, 0] / CENTIMETRES
    translation = torch.stack([half * (1 + cam[:, 0] * offset[:, 0]), half * (1 - cam[:, 0] * offset[:, 1])], 1)

    affine = torch.as_tensor(np.asarray(crop_to_frame, dtype=np.float64)).reshape(-1, 2, 3).expand(batch, 2, 3)
    linear, shift = affine[:, :, :2].to(torch.float32), affine[:, :, 2].to(torch.float32)
    det = torch.linalg.det(linear)
    if (det <= 0).any():
        raise ValueError("crop_to_frame must keep orientation (no mirror)")
    k = det.sqrt()
    flip = torch.diag(torch.tensor([1.0, -1.0]))
    turn2d = flip @ linear @ flip / k[:, None, None]  # the image-plane turn, in the camera's y-up axes
    turn = torch.eye(3).repeat(batch, 1, 1)
    turn[:, :2, :2] = turn2d
    rotation = turn @ rotation
    angles = matrix_to_euler(rotation)
    light = rotate_light_about_z(params["light"].to(torch.float32), torch.atan2(turn2d[:, 1, 0], turn2d[:, 0, 0]))
    jaw = pose[:, 3:6]
    return FaceFit(
        yaw=angles[:, 0],
        pitch=angles[:, 1],
        roll=angles[:, 2],
        scale=k * scale,
        translation=(linear @ translation[..., None])[..., 0] + shift,
        expression=torch.cat([exp, jaw], 1),
        identity=identity,
        light=light,
    )


def albedo_under_light(model, fit, images: torch.Tensor) -> torch.Tensor:
    """Per-photo skin albedo (B, 3) that best explains crops (B, H, W, 3) in [0, 1] under the fit's
    light: least squares of image = albedo x shading over the visible skin (``fit.skin_vertices``)."""
    from rigcli.fit import rasterize_fit, skin_vertices
    from rigcli.render import sh_shading

    batch, size = images.shape[0], images.shape[1]
    geometry = rasterize_fit(model, fit, size)
    skin = skin_vertices(model).to(torch.float32)[None, :, None].expand(batch, -1, 1)
    mask = (geometry.fragments.interpolate(skin, model.triangles)[..., 0] > 0.999).to(torch.float32)[..., None]
    shading = sh_shading(geometry.normals, fit.light)
    num = (images * shading * mask).sum((1, 2))
    den = (shading * shading * mask).sum((1, 2))
    fallback = (images * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1)
    return torch.where(den > 1e-6, num / den.clamp_min(1e-12), fallback).clamp(0, 1)


def estimate_with_deca(
    encoder,
    model: FlameFaceModel,
    crops: np.ndarray,
    landmarks: np.ndarray,
    shared_identity: bool = True,
    batch_size: int = 8,
    progress=None,
    identity_rows=None,
    identity: torch.Tensor | None = None,
):
    """FLAME parameters of photos by DECA's encoder, as the paper's data step estimated them:
    ``(fit, params)``, params being DECA's decomposed codes (``tex`` for ``render_deca_buffers``).

    ``crops`` (B, H, W, 3) uint8 are the aligned crops and ``landmarks`` (B, 68, 2) their 68 points
    in the same pixels; DECA sees its own 224 crop of each (``deca_crop``), and the result is a
    ``FaceFit`` in the aligned frame with DECA's light and texture code, the mean shape over the batch when
    ``shared_identity`` (the paper's per-person shape), a skin albedo under that light, and the
    landmark error; ``identity_rows`` (indices) takes that mean over those photos only (a person's
    training photos, not their outliers); ``identity`` (n_shape,) fixes the shape instead (a known
    person's, at edit time). ``encoder`` maps (N, 3, 224, 224) in [0, 1] to (N, 236) codes (a
    ``DecaEncoder`` with DECA's weights). ``progress(done, total)`` follows the photos.
    """
    from rigcli.align import invert_affine
    from rigcli.fit import interocular, project_landmarks

    inputs, to_frame = [], []
    for rgb, points in zip(crops, landmarks, strict=True):
        image, to_crop = deca_crop(rgb, points)
        inputs.append(image)
        to_frame.append(invert_affine(to_crop))
    codes = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            codes.append(encoder(torch.stack(inputs[start : start + batch_size])).to(torch.float32))
            if progress:
                progress(min(start + batch_size, len(inputs)), len(inputs))
        params = decompose(torch.cat(codes))
        if identity is not None:
            params["shape"] = identity.to(torch.float32)[None].expand(len(params["shape"]), -1).clone()
        elif identity_rows is not None and shared_identity:
            mean = params["shape"][list(identity_rows)].mean(0, keepdim=True)
            params["shape"] = mean.expand_as(params["shape"]).clone()
        fit = deca_to_fit(model, params, np.stack(to_frame), shared_identity=shared_identity)
        fit.texture = params["tex"].to(torch.float32).clone()  # rendered when a texture space is imported
        images = torch.from_numpy(np.asarray(crops)).to(torch.float32) / 255.0
        fit.albedo = albedo_under_light(model, fit, images)
        lm = torch.as_tensor(np.asarray(landmarks), dtype=torch.float32)
        pred = project_landmarks(model, fit, None)
        fit.landmark_error = (pred - lm).norm(dim=-1).mean(1) / interocular(lm).clamp_min(1.0)
    return fit, params


# ---------------------------------------------------------------- texture-space albedo (DECA's render)


class FlameTexture:
    """FLAME's albedo space in texture space, sampled on the mesh through head_template's UVs.

    ``tex_mean`` (H, W, 3) and ``tex_basis`` (H, W, 3, K) are RGB in [0, 1] (the import's layout);
    a code's map is mean + basis . code, resized to ``size`` by nearest neighbour as DECA does
    (512 -> 256). ``uv_coords`` (N, 2) in [0, 1] (v up) and ``uv_faces`` (F, 3) give each mesh
    triangle's corners in the map, in the corner order of FLAME's ``faces``.
    """

    def __init__(
        self,
        tex_mean: torch.Tensor,
        tex_basis: torch.Tensor,
        uv_coords: torch.Tensor,
        uv_faces: torch.Tensor,
        n_tex: int = 50,
        size: int = 256,
    ) -> None:
        self.mean = torch.as_tensor(tex_mean, dtype=torch.float32).permute(2, 0, 1).contiguous()  # (3, H, W)
        basis = torch.as_tensor(tex_basis, dtype=torch.float32)[..., :n_tex]
        self.basis = basis.permute(3, 2, 0, 1).contiguous()  # (K, 3, H, W)
        self.uv_coords = torch.as_tensor(uv_coords, dtype=torch.float32)
        self.uv_faces = torch.as_tensor(uv_faces, dtype=torch.int64)
        self.size = size

    def to(self, device: torch.device | str) -> FlameTexture:
        """The same texture space with its tensors on ``device``."""
        moved = copy.copy(self)
        for key in ("mean", "basis", "uv_coords", "uv_faces"):
            setattr(moved, key, getattr(self, key).to(device))
        return moved

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> FlameTexture | None:
        """The texture space of the FLAME import's tensors, or None without both --texture and --template."""
        if not {"tex_mean", "tex_basis", "uv_coords", "uv_faces"} <= tensors.keys():
            return None
        return FlameTexture(tensors["tex_mean"], tensors["tex_basis"], tensors["uv_coords"], tensors["uv_faces"])

    def maps(self, code: torch.Tensor) -> torch.Tensor:
        """Albedo maps (B, 3, size, size) for texture codes (B, <=K)."""
        k = min(code.shape[1], self.basis.shape[0])
        full = self.mean + torch.einsum("bk,kchw->bchw", code[:, :k].to(torch.float32), self.basis[:k])
        return torch.nn.functional.interpolate(full, size=(self.size, self.size), mode="nearest")

    def sample(self, fragments, maps: torch.Tensor, flipped: bool = False) -> torch.Tensor:
        """Per-pixel albedo (B, H, W, 3), zero off the mesh: the rasterized triangles' UVs looked up
        bilinearly in ``maps`` (grid x = 2u - 1, y = 1 - 2v, pixel-area convention, as DECA).
        ``flipped``: the face model reversed FLAME's winding, so the UV corners are reversed too."""
        uv_faces = self.uv_faces[:, [0, 2, 1]] if flipped else self.uv_faces
        batch = maps.shape[0]
        uv = fragments.interpolate(self.uv_coords.expand(batch, -1, -1), uv_faces)
        grid = torch.stack([2 * uv[..., 0] - 1, 1 - 2 * uv[..., 1]], -1)
        albedo = torch.nn.functional.grid_sample(maps, grid, mode="bilinear", align_corners=False)
        return albedo.permute(0, 2, 3, 1) * fragments.mask[..., None]


def render_deca_buffers(
    model: FlameFaceModel, fit, texture: FlameTexture, tex_code: torch.Tensor, size: int, geometry=None
) -> torch.Tensor:
    """DiffusionRig's buffers (B, 9, size, size) with DECA's texture-space albedo: shaded = albedo x
    SH shading of the camera-space normals, normals, albedo; zero off the face. ``geometry``: the fit
    already rasterized at ``size`` (``fit.rasterize_fit``)."""
    from rigcli.fit import rasterize_fit
    from rigcli.render import sh_shading

    geometry = geometry or rasterize_fit(model, fit, size)
    albedo = texture.sample(geometry.fragments, texture.maps(tex_code), model.winding_flipped)
    shaded = albedo * sh_shading(geometry.normals, fit.light) * geometry.fragments.mask[..., None]
    return torch.cat([shaded, geometry.normals, albedo], -1).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- ICT's blendshapes as FLAME directions

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
    import contextlib
    import hashlib
    import json

    from safetensors.torch import load, save

    from rigcli import RigError
    from rigcli.facemodel import installed, load_ict
    from rigcli.store import atomic_write_bytes, atomic_write_json

    if not installed(store):
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
