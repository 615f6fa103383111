"""Import ICT FaceKit from the user's copy (folder or the repository's zip, `.obj` or `.obj.gz`)."""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import uuid
import zipfile
from pathlib import Path

import numpy as np
import torch

from rigcli import RigError
from rigcli.face.ict import _ICT_KEEP, _ICT_POLYGONS, _ICT_RANGES, ICT_NAME, IDENTITY_COUNT, _write_cache
from rigcli.store import Store

ICT_REPOSITORY_ZIP = "https://github.com/ICT-VGL/ICT-FaceKit/archive/refs/heads/master.zip"


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


def read_ict(source_path: Path, progress=None) -> tuple[dict[str, torch.Tensor], list[str], bytes | None]:
    """The kept part of an ICT-FaceKit copy as the model's tensors, its expression names and its licence.

    Shared by the store import and the packaging tool (``tools/embed_ict.py``), so both start from the
    same tensors. ``progress(done, total)`` is called as the blendshape files are read.
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
    return tensors, expression_names, source.licence()


def import_ict(source_path: Path, store: Store, progress=None) -> Path:
    """Convert an ICT-FaceKit copy into the store's cached model; returns the cache folder.

    ``progress(done, total)`` is called as the blendshape files are read.
    """
    tensors, expression_names, licence = read_ict(source_path, progress)
    return _write_cache(store, ICT_NAME, tensors, expression_names, licence, str(source_path))


def download_ict(store: Store, url: str = ICT_REPOSITORY_ZIP, progress=None, timeout: float = 60) -> Path:
    """Fetch the ICT-FaceKit repository's zip over HTTP(S) and import it; the zip is not kept.

    ``progress(bytes_done, bytes_total_or_None)`` follows the download.
    """
    import urllib.error
    import urllib.request

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
