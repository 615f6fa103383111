"""Face models: a small interface the fitter, renderer and CLI use, and the embedded default, ICT FaceKit.

A face model turns an identity vector and expression weights into mesh vertices, and knows its
triangles, its 68 landmark vertices (dlib's iBUG order), its expression names and region masks.
ICT FaceKit (MIT) is imported once from the user's copy (folder or the repository's zip, `.obj` or
`.obj.gz`) into a compact cached form in the store: ``assets/ict/model.safetensors`` with
``model.json`` and the licence beside it. Only the parts a DiffusionRig render needs are kept:
face, head and neck, and the eyeballs.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from rigcli import RigError
from rigcli.store import Store, atomic_write_bytes, atomic_write_json

ICT_NAME = "ict"
ICT_REPOSITORY_ZIP = "https://github.com/ICT-VGL/ICT-FaceKit/archive/refs/heads/master.zip"
IDENTITY_COUNT = 100

# Vertex and polygon ranges of the ICT mesh (0-based, inclusive), from the kit's documentation.
_ICT_RANGES = {
    "face": (0, 9408),
    "narrow_face": (0, 6705),
    "head_neck": (9409, 11247),
    "eyeball_left": (21451, 23020),
    "eyeball_right": (23021, 24590),
}
_ICT_POLYGONS = [(0, 11143), (21496, 24691)]  # face + head and neck; both eyeballs
_ICT_KEEP = [(0, 11247), (21451, 24590)]  # the vertices those polygons use


class FaceModel(Protocol):
    """What the fitter, renderer and CLI need from a face model (ICT now, FLAME later).

    ``regions`` must hold at least ``face`` (all facial skin), ``narrow_face`` (the skin the light
    fit may use, before eyes, brows and lips are cut out) and ``eyeball_left`` / ``eyeball_right``.

    Optional members the fitter uses when a model has them (FLAME, in ``rigcli.deca``, does):
    ``landmark_points(identity, expression, rotation) -> (B, 68, 3)`` places the landmarks itself
    (instead of ``landmark_vertices`` plus silhouette marching); ``expression_prior(expression) ->
    (B,)`` replaces the L1 blendshape prior; ``expression_range`` (default (0, 1), None for
    unbounded) is where the fitter keeps the expression values.
    """

    name: str
    model_id: str  # content hash of the model's data: checkpoints record it
    expression_names: list[str]
    neutral: torch.Tensor  # (V, 3) the mean shape, neutral expression
    landmark_vertices: torch.Tensor  # (68,) long, iBUG order
    triangles: torch.Tensor  # (F, 3) long, counter-clockwise seen from outside
    regions: dict[str, torch.Tensor]  # name -> (V,) bool

    @property
    def identity_size(self) -> int: ...

    @property
    def vertex_count(self) -> int: ...

    def vertices(
        self, identity: torch.Tensor, expression: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, V, 3) vertices in model space (centimetres, y up, z toward the viewer); ``index``
        restricts the result to some vertices (cheap, for landmark fitting)."""
        ...


@dataclass
class LinearFaceModel:
    """A blendshape model: neutral + identity basis @ identity + expression basis @ expression."""

    name: str
    model_id: str
    neutral: torch.Tensor  # (V, 3)
    identity_basis: torch.Tensor  # (I, V, 3)
    expression_basis: torch.Tensor  # (E, V, 3)
    expression_names: list[str]
    triangles: torch.Tensor
    landmark_vertices: torch.Tensor
    regions: dict[str, torch.Tensor]

    @property
    def identity_size(self) -> int:
        return int(self.identity_basis.shape[0])

    @property
    def vertex_count(self) -> int:
        return int(self.neutral.shape[0])

    def vertices(
        self, identity: torch.Tensor, expression: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        neutral, ident, expr = self.neutral, self.identity_basis, self.expression_basis
        if index is not None:
            neutral, ident, expr = neutral[index], ident[:, index], expr[:, index]
        identity = identity.to(neutral.dtype)
        expression = expression.to(neutral.dtype)
        out = neutral + torch.einsum("bi,ivc->bvc", identity, ident)
        return out + torch.einsum("be,evc->bvc", expression, expr)

    def to(self, device: torch.device | str) -> LinearFaceModel:
        """The same model with its tensors on ``device``."""
        move = lambda t: t.to(device)  # noqa: E731
        return LinearFaceModel(
            self.name,
            self.model_id,
            move(self.neutral),
            move(self.identity_basis),
            move(self.expression_basis),
            list(self.expression_names),
            move(self.triangles),
            move(self.landmark_vertices),
            {k: move(v) for k, v in self.regions.items()},
        )


# ---------------------------------------------------------------- reading ICT-FaceKit


class _Source:
    """Files of an ICT-FaceKit copy: a folder (FaceXModel/ or its parent) or the repository's zip."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        if not self.path.exists():
            raise RigError(f"{self.path} does not exist")
        if self.path.is_file():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except zipfile.BadZipFile as exc:
                raise RigError(f"{self.path} is neither a folder nor a zip of ICT-FaceKit") from exc
            names = [n for n in self._zip.namelist() if n.endswith("vertex_indices.json")]
            if not names:
                raise RigError(f"{self.path} holds no FaceXModel/vertex_indices.json: is it ICT-FaceKit?")
            self._prefix = names[0][: -len("vertex_indices.json")]
        else:
            for folder in (self.path, self.path / "FaceXModel"):
                if (folder / "vertex_indices.json").is_file():
                    self._folder = folder
                    break
            else:
                raise RigError(f"{self.path} holds no vertex_indices.json (nor FaceXModel/): is it ICT-FaceKit?")

    def read(self, name: str) -> bytes:
        """A file's bytes; ``NAME.obj`` is found as ``.obj`` or ``.obj.gz``."""
        candidates = [name, name + ".gz"] if name.endswith(".obj") else [name]
        for candidate in candidates:
            data = self._read_raw(candidate)
            if data is not None:
                return gzip.decompress(data) if candidate.endswith(".gz") else data
        raise RigError(f"ICT-FaceKit file {name} (or {name}.gz) is missing from {self.path}")

    def _read_raw(self, name: str) -> bytes | None:
        if self._zip is not None:
            try:
                return self._zip.read(self._prefix + name)
            except KeyError:
                return None
        path = self._folder / name
        return path.read_bytes() if path.is_file() else None

    def licence(self) -> bytes | None:
        for name in ("LICENSE", "../LICENSE", "LICENSE.txt"):
            data = self._read_raw(name)
            if data is None and self._zip is None:
                path = (self._folder / name).resolve()
                data = path.read_bytes() if path.is_file() else None
            if data:
                return data
        if self._zip is not None:
            for n in self._zip.namelist():
                if n.rsplit("/", 1)[-1] in ("LICENSE", "LICENSE.txt") and n.count("/") <= 1:
                    return self._zip.read(n)
        return None


_FLOAT = re.compile(rb"^v (.*)$", re.MULTILINE)


def parse_obj_vertices(data: bytes) -> np.ndarray:
    """The ``v x y z`` lines of an OBJ file as an (N, 3) float64 array."""
    rows = _FLOAT.findall(data)
    values = np.array(b" ".join(rows).split(), dtype=np.float64)
    if values.size != 3 * len(rows):
        raise RigError("OBJ vertex lines with other than 3 coordinates")
    return values.reshape(-1, 3)


def parse_obj_faces(data: bytes) -> list[list[int]]:
    """Each ``f`` line's vertex indices (0-based); texture/normal indices dropped."""
    faces = []
    for line in data.split(b"\n"):
        if line.startswith(b"f "):
            faces.append([int(tok.split(b"/")[0]) - 1 for tok in line.split()[1:]])
    return faces


def _triangulate(polygons: list[list[int]]) -> np.ndarray:
    """Fan-triangulate quads and triangles (ICT's quads are convex)."""
    tris = []
    for poly in polygons:
        for k in range(1, len(poly) - 1):
            tris.append((poly[0], poly[k], poly[k + 1]))
    return np.asarray(tris, dtype=np.int64)


def import_ict(source_path: Path, store: Store, progress=None) -> Path:
    """Convert an ICT-FaceKit copy into the store's cached model; returns the cache folder.

    ``progress(done, total)`` is called as the blendshape files are read.
    """
    source = _Source(source_path)
    try:
        indices = json.loads(source.read("vertex_indices.json"))
        expression_names = list(indices["expressions"])
        landmark_vertices = np.asarray(indices["idx_to_landmark_verts"], dtype=np.int64)
    except (ValueError, KeyError) as exc:
        raise RigError(f"vertex_indices.json in {source_path} is not ICT-FaceKit's ({exc})") from exc
    if len(expression_names) != 53 or landmark_vertices.shape != (68,):
        raise RigError("vertex_indices.json should list 53 expressions and 68 landmark vertices")

    neutral_obj = source.read("generic_neutral_mesh.obj")
    neutral_all = parse_obj_vertices(neutral_obj)
    polygons = parse_obj_faces(neutral_obj)
    keep = np.concatenate([np.arange(a, b + 1) for a, b in _ICT_KEEP])
    remap = np.full(len(neutral_all), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    chosen = [p for a, b in _ICT_POLYGONS for p in polygons[a : b + 1]]
    triangles = remap[_triangulate(chosen)]
    if (triangles < 0).any() or (remap[landmark_vertices] < 0).any():
        raise RigError("ICT mesh layout differs from the documented vertex ranges")

    names = [f"identity{k:03d}" for k in range(IDENTITY_COUNT)] + expression_names
    shapes = np.empty((len(names), len(keep), 3), dtype=np.float32)
    for i, name in enumerate(names):
        verts = parse_obj_vertices(source.read(f"{name}.obj"))
        if verts.shape != neutral_all.shape:
            raise RigError(f"{name}.obj has {len(verts)} vertices; the neutral mesh has {len(neutral_all)}")
        shapes[i] = (verts - neutral_all)[keep]
        if progress:
            progress(i + 1, len(names))

    regions = {}
    for region, (a, b) in _ICT_RANGES.items():
        mask = np.zeros(len(neutral_all), dtype=bool)
        mask[a : b + 1] = True
        regions[region] = mask[keep]

    tensors = {
        "neutral": torch.from_numpy(neutral_all[keep].astype(np.float32)),
        "identity_basis": torch.from_numpy(shapes[:IDENTITY_COUNT]),
        "expression_basis": torch.from_numpy(shapes[IDENTITY_COUNT:]),
        "triangles": torch.from_numpy(triangles),
        "landmark_vertices": torch.from_numpy(remap[landmark_vertices]),
        **{f"region.{k}": torch.from_numpy(v) for k, v in regions.items()},
    }
    return _write_cache(store, ICT_NAME, tensors, expression_names, source.licence(), str(source_path))


def _write_cache(
    store: Store, name: str, tensors: dict[str, torch.Tensor], expression_names: list[str], licence, origin: str
) -> Path:
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()})
    model_id = f"{name}-{hashlib.sha256(blob).hexdigest()[:16]}"
    folder = store.root / "assets" / name
    if licence:
        atomic_write_bytes(folder / "LICENSE", licence)
    atomic_write_bytes(folder / "model.safetensors", blob)
    meta = {
        "name": name,
        "model_id": model_id,
        "expression_names": expression_names,
        "vertices": int(tensors["neutral"].shape[0]),
        "triangles": int(tensors["triangles"].shape[0]),
        "identity_size": int(tensors["identity_basis"].shape[0]),
        "imported_from": origin,
    }
    atomic_write_json(folder / "model.json", meta)  # last: its presence means the import finished
    return folder


def model_folder(store: Store, name: str = ICT_NAME) -> Path:
    return store.root / "assets" / name


def installed(store: Store, name: str = ICT_NAME) -> bool:
    folder = model_folder(store, name)
    return (folder / "model.json").is_file() and (folder / "model.safetensors").is_file()


FLAME_NAME = "flame"
FACE_MODELS = (ICT_NAME, FLAME_NAME)


def face_model_name(fit_doc: dict | None) -> str:
    """The face model a person's fit (``fit.json``) was made with; ICT before the name was recorded."""
    return (fit_doc or {}).get("face_model", ICT_NAME)


def available(store: Store, name: str = ICT_NAME) -> bool:
    """Whether ``load_face_model(store, name)`` has what it needs (without loading it)."""
    if name == FLAME_NAME:
        from rigcli.flame import flame_status

        present = {s.role for s in flame_status(store) if s.present}
        return {"flame", "landmarks"} <= present
    return installed(store, name)


def load_face_model(store: Store, name: str = ICT_NAME):
    """The face model called ``name`` ('ict' or 'flame'), or a RigError that says how to install it."""
    if name == FLAME_NAME:
        return load_flame_face_model(store)
    if name != ICT_NAME:
        raise RigError(f"unknown face model {name!r}; choose one of: {', '.join(FACE_MODELS)}")
    return load_ict(store, name)


def load_flame_face_model(store: Store):
    """FLAME from the user's import (model and landmark embedding) behind the FaceModel interface,
    with DECA's texture space when it was imported with the template's UVs."""
    from rigcli.deca import FlameFaceModel, FlameTexture
    from rigcli.flame import flame_model_id, flame_texture_id, load_flame_assets

    tensors = load_flame_assets(store, require=("flame", "landmarks"))
    model = FlameFaceModel.from_tensors(tensors, flame_model_id(store))
    model.texture = FlameTexture.from_tensors(tensors)
    model.texture_id = flame_texture_id(store) if model.texture is not None else None
    return model


def load_ict(store: Store, name: str = ICT_NAME) -> LinearFaceModel:
    """The cached ICT model, or a RigError that says how to install it."""
    if not installed(store, name):
        raise RigError(
            "no face model installed: run `rig assets download-ict` (fetches the public ICT-FaceKit, MIT) "
            "or `rig assets import-ict PATH` with a folder or zip of ICT-FaceKit"
        )
    from safetensors.torch import load

    folder = model_folder(store, name)
    meta = json.loads((folder / "model.json").read_text())
    blob = (folder / "model.safetensors").read_bytes()
    if f"{name}-{hashlib.sha256(blob).hexdigest()[:16]}" != meta["model_id"]:
        raise RigError(f"the cached face model in {folder} is damaged: import it again")
    t = load(blob)
    regions = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("region.")}
    return LinearFaceModel(
        name,
        meta["model_id"],
        t["neutral"],
        t["identity_basis"],
        t["expression_basis"],
        meta["expression_names"],
        t["triangles"],
        t["landmark_vertices"],
        regions,
    )


def download_ict(store: Store, url: str = ICT_REPOSITORY_ZIP, progress=None, timeout: float = 60) -> Path:
    """Fetch the ICT-FaceKit repository's zip over HTTP(S) and import it; the zip is not kept.

    ``progress(bytes_done, bytes_total_or_None)`` follows the download.
    """
    import contextlib
    import urllib.error
    import urllib.request
    import uuid

    store.ensure_writable()
    tmp = store.root / f".tmp-ict-{uuid.uuid4().hex[:8]}.zip"
    try:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                total = response.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                done = 0
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, total)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise RigError(f"could not download ICT-FaceKit from {url}: {reason}") from exc
        return import_ict(tmp, store)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
