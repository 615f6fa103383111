"""FLAME (the paper's face model) behind the face-model interface, with DECA's texture space, read
from the converted files that `rig assets import-flame` leaves in the store.

Apart: FLAME's mesh as a torch module (``rigcli.face.flame_mesh``: blendshapes, pose correctives,
skinning, landmark embedding), the retargeting of ICT's blendshapes that answers
``expression_directions`` (``rigcli.face.retarget``), and the import of the user's original files
(the pickles, ``rigcli.assets.flame``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load

from rigcli import RigError
from rigcli.face.flame_mesh import Flame, contour_row, matrix_yaw
from rigcli.face.ict import ict_available, load_ict
from rigcli.face.model import vertex_albedo, vertex_normals
from rigcli.face.retarget import load_control_directions
from rigcli.store import Store, hold_lock

FLAME_NAME = "flame"


CENTIMETRES = 100.0  # FLAME is in metres; the fitter, renderer and their constants work in centimetres


JAW_NAMES = ("jawPitch", "jawYaw", "jawRoll")  # the jaw joint's axis-angle (x opens the mouth)


EXPRESSION_PRIOR = 1e-4  # per squared PCA coefficient (FLAME's components are unit-variance)


JAW_PRIOR = (1e-4, 1e-2, 1e-2)  # per squared radian: opening is cheap, sideways and roll are not


@dataclass(eq=False, repr=False)  # identity equality and repr, as a plain class: its fields are tensors
class FlameFaceModel:
    """FLAME behind the ``FaceModel`` interface of ``rigcli.face.model``.

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

    flame: Flame
    model_id: str
    expression_names: list[str]
    neutral: torch.Tensor  # (V, 3) centimetres
    landmark_vertices: torch.Tensor  # (68,) long
    regions: dict[str, torch.Tensor]
    triangles: torch.Tensor  # (F, 3) long, FLAME's faces wound outward
    winding_flipped: bool  # the triangles reverse FLAME's corner order (the texture's UV corners must follow)
    texture: FlameTexture | None = None  # DECA's albedo space, when imported with its UVs
    texture_id: str | None = None  # which one (training-data caches depend on it)

    @classmethod
    def from_flame(cls, flame: Flame, model_id: str) -> FlameFaceModel:
        """The face model of ``flame``, its neutral mesh, landmark vertices, regions and outward
        triangles derived from FLAME's own data (see the class doc)."""
        names = [f"exp{k:02d}" for k in range(flame.n_exp)] + list(JAW_NAMES)
        with torch.no_grad():
            neutral = flame.v_template * CENTIMETRES
            lm = flame.landmarks(neutral[None], torch.zeros(1, dtype=torch.long))[0]
        faces = torch.cat([flame.dynamic_faces[0], flame.static_faces])
        bary = torch.cat([flame.dynamic_bary[0], flame.static_bary])
        landmark_vertices = flame.faces[faces].gather(1, bary.argmax(1, keepdim=True))[:, 0]
        regions = _regions(flame, neutral, lm)
        flipped = _wound_inward(neutral, flame.faces, regions["face"])
        triangles = flame.faces[:, [0, 2, 1]] if flipped else flame.faces
        return cls(flame, model_id, names, neutral, landmark_vertices, regions, triangles, flipped)

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], model_id: str, n_shape: int = 100, n_exp: int = 50):
        """The face model from the FLAME import's tensors (see ``rigcli.face.flame_mesh.FLAME_TENSORS``)."""
        return FlameFaceModel.from_flame(Flame(tensors, n_shape=n_shape, n_exp=n_exp), model_id)

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

    def albedo(self, fit, fragments) -> torch.Tensor:
        """DECA's texture-space albedo for a fit with a texture code when the texture space was
        imported (as the paper's data step rendered it), else the fit's skin colour per vertex."""
        if self.texture is not None and fit.texture is not None:
            return self.texture.sample(fragments, self.texture.maps(fit.texture), self.winding_flipped)
        return fragments.interpolate(vertex_albedo(self, fit.albedo), self.triangles)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FlameFaceModel:
        """A copy with its tensors on ``device``, and FLAME's floating tensors and the neutral mesh in
        ``dtype`` (the texture space stays float32); None keeps either as it is."""
        move = lambda t: t.to(device=device)  # noqa: E731
        return replace(
            self,
            flame=copy.deepcopy(self.flame).to(device=device, dtype=dtype),  # nn.Module.to moves in place
            neutral=self.neutral.to(device=device, dtype=dtype),
            landmark_vertices=move(self.landmark_vertices),
            regions={k: move(r) for k, r in self.regions.items()},
            triangles=move(self.triangles),
            texture=self.texture.to(device) if self.texture is not None else None,
        )

    def control_names(self, store: Store) -> list[str]:
        """Names ``--blend`` and ``--sweep`` accept: FLAME's own, then ICT's blendshapes (through
        ``expression_directions``) when ICT-FaceKit is imported."""
        return list(self.expression_names) + (load_ict(store).expression_names if ict_available(store) else [])

    def expression_directions(self, store: Store) -> dict[str, torch.Tensor]:
        """Per ICT blendshape name, the FLAME expression that moves FLAME's landmarks as the blendshape
        moves ICT's (``rigcli.face.retarget``), cached in the store; a RigError without ICT-FaceKit."""
        return load_control_directions(store, self)


def _regions(flame: Flame, v: torch.Tensor, lm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The regions of the class doc, from the neutral vertices ``v`` (V, 3) and landmarks ``lm`` (68, 3)."""
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


def _wound_inward(neutral: torch.Tensor, faces: torch.Tensor, face: torch.Tensor) -> bool:
    """Whether ``faces`` must be reversed to wind counter-clockwise from outside: the face's normals
    must point at the viewer (+z)."""
    normals = vertex_normals(neutral[None], faces)[0]
    facing = normals[face, 2].mean() if face.any() else normals[:, 2].mean()
    return bool(facing < 0)


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


SOURCE_NAMES = {
    "flame": "generic_model.pkl",
    "landmarks": "landmark_embedding.npy",
    "deca": "deca_model.tar",
    "texture": "FLAME_texture.npz or FLAME_albedo_from_BFM.npz",
    "template": "head_template.obj",
}


FLAME_FOLDER = "flame"


ASSETS_JSON = "assets.json"


FORMAT_VERSION = 1


IMPORT_HINT = "`rig assets import-flame --flame generic_model.pkl` (see README, 'Using FLAME')"


N_VERTICES = 5023


N_FACES = 9976


N_JOINTS = 5


N_SHAPE = 300


N_EXPRESSION = 100


N_POSE_CORRECTIVES = 36


TEXTURE_COMPONENTS = 50


ASSETS = {
    # role: (cache file, what it enables, the option that imports it)
    "flame": ("flame.safetensors", "`--face-model flame` fitting (the paper's face model)", "--flame"),
    "landmarks": ("landmarks.safetensors", "FLAME landmark fitting (68 points on the mesh)", "--landmarks"),
    "deca": ("deca.safetensors", "DECA regression of FLAME parameters, as the paper did", "--deca"),
    "texture": ("texture.safetensors", "FLAME albedo (texture space)", "--texture"),
    "template": ("template.safetensors", "UV coordinates to sample the albedo on the mesh", "--template"),
}


@dataclass(frozen=True)
class FlameAssetStatus:
    """One FLAME/DECA asset: whether it is imported, what it enables, and where it came from."""

    role: str
    present: bool
    enables: str
    option: str
    source: str | None = None
    imported: str | None = None


def flame_folder(store: Store) -> Path:
    return store.root / "assets" / FLAME_FOLDER


def _recover(store: Store) -> None:
    """Finish or undo a folder swap that a killed import left half done."""
    folder = flame_folder(store)
    parent = folder.parent
    if folder.exists() or not parent.is_dir():
        for leftover in parent.glob(f".tmp-{FLAME_FOLDER}-*") if parent.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in parent.glob(f".trash-{FLAME_FOLDER}-*") if parent.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)
        return
    ready = [p for p in parent.glob(f".tmp-{FLAME_FOLDER}-*") if (p / ASSETS_JSON).is_file()]
    previous = sorted(parent.glob(f".trash-{FLAME_FOLDER}-*"))
    if not ready and not previous:
        return  # nothing was ever imported
    if ready:  # the new folder was complete: the swap only had its last rename left
        os.replace(ready[0], folder)
    else:
        os.replace(previous[0], folder)
    _recover(store)  # now tidy what is left


def _manifest(store: Store) -> dict[str, Any]:
    path = flame_folder(store) / ASSETS_JSON
    if not path.is_file():
        return {"format": FORMAT_VERSION, "assets": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RigError(f"{path} is damaged ({exc}): import the FLAME files again with {IMPORT_HINT}") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise RigError(f"{path} was written by another version of rig: import the FLAME files again")
    return manifest


def flame_status(store: Store) -> list[FlameAssetStatus]:
    """Each FLAME/DECA asset, imported or not, with what it enables (for ``rig assets status``)."""
    folder = flame_folder(store)
    try:
        assets = _manifest(store)["assets"]
    except RigError:
        assets = {}
    lines = []
    for role, (cache, enables, option) in ASSETS.items():
        record = assets.get(role)
        present = record is not None and (folder / cache).is_file()
        lines.append(
            FlameAssetStatus(
                role,
                present,
                enables,
                option,
                record.get("source") if present else None,
                record.get("imported") if present else None,
            )
        )
    return lines


def load_flame_assets(store: Store, require: tuple[str, ...] = ("flame",)) -> dict[str, torch.Tensor]:
    """All imported FLAME tensors (model, and landmarks, texture and template UVs where imported) in
    one dict, named as in the module doc; a RigError naming the import command when ``require``d
    ones are missing or a cache is damaged."""
    _recover_readonly(store)
    manifest = _manifest(store)
    _require(manifest, require)
    tensors: dict[str, torch.Tensor] = {}
    for role in ("flame", "landmarks", "texture", "template"):
        if role in manifest["assets"]:
            tensors.update(_load_cache(store, manifest, role))
    return tensors


def flame_model_id(store: Store) -> str:
    """An id for the imported FLAME model and landmarks (from their caches' hashes), for checkpoints
    to record which face model made their buffers."""
    manifest = _manifest(store)
    _require(manifest, ("flame",))
    digest = hashlib.sha256()
    for role in ("flame", "landmarks"):
        digest.update(manifest["assets"].get(role, {}).get("cache_sha256", "").encode())
    return f"flame-{digest.hexdigest()[:16]}"


def flame_texture_id(store: Store) -> str | None:
    """An id for the imported texture space and template UVs (from their caches' hashes), or None
    when either is missing: DECA fits render their albedo from them, so cached buffers depend on it."""
    assets = _manifest(store)["assets"]
    if not {"texture", "template"} <= assets.keys():
        return None
    digest = hashlib.sha256()
    for role in ("texture", "template"):
        digest.update(assets[role].get("cache_sha256", "").encode())
    return f"texture-{digest.hexdigest()[:16]}"


def load_deca_encoder(store: Store) -> dict[str, torch.Tensor]:
    """E_flame's state dict (DECA's coarse encoder), or a RigError naming the import command."""
    _recover_readonly(store)
    manifest = _manifest(store)
    _require(manifest, ("deca",))
    return _load_cache(store, manifest, "deca")


def _recover_readonly(store: Store) -> None:
    """Before reading: if an import was killed mid-swap, finish or undo it (under the import's lock)."""
    if not flame_folder(store).exists() and flame_folder(store).parent.is_dir():
        with contextlib.suppress(OSError), hold_lock(store.root / "locks" / "assets-flame.lock"):
            _recover(store)


def _require(manifest: dict[str, Any], roles: tuple[str, ...]) -> None:
    missing = [r for r in roles if r not in manifest["assets"]]
    if missing:
        wanted = " ".join(f"{ASSETS[r][2]} {SOURCE_NAMES[r].split(' or ')[0]}" for r in missing)
        needs = "; ".join(ASSETS[r][1] for r in missing)
        raise RigError(
            f"FLAME assets missing ({', '.join(SOURCE_NAMES[r] for r in missing)}), needed for {needs}: "
            f"run `rig assets import-flame {wanted}` (see README, 'Using FLAME')"
        )


def _load_cache(store: Store, manifest: dict[str, Any], role: str) -> dict[str, torch.Tensor]:
    record = manifest["assets"][role]
    path = flame_folder(store) / record["cache"]
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise RigError(f"the FLAME cache {path} is missing ({exc.strerror}): run {IMPORT_HINT} again") from exc
    if hashlib.sha256(blob).hexdigest() != record["cache_sha256"]:
        raise RigError(f"the FLAME cache {path} is damaged: run {IMPORT_HINT} again")
    return load(blob)
