"""ICT FaceKit (MIT) as a face model: the store's imported copy, else the compact form in the package."""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from rigcli import RigError
from rigcli.face.model import LinearFaceModel
from rigcli.files import atomic_write_bytes, atomic_write_json
from rigcli.store import Store

ICT_NAME = "ict"


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


def _write_cache(
    store: Store, name: str, tensors: dict[str, torch.Tensor], expression_names: list[str], licence, origin: str
) -> Path:

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
    """Whether ICT FaceKit was imported into the store (the package's compact copy does not count)."""
    folder = model_folder(store, name)
    return (folder / "model.json").is_file() and (folder / "model.safetensors").is_file()


def load_ict(store: Store, name: str = ICT_NAME) -> LinearFaceModel:
    """The store's imported ICT model when there is one, else the compact copy shipped in the package
    (their ``model_id`` differ, so a checkpoint says which one made its buffers)."""
    if installed(store, name):
        return _load_imported(store, name)
    if name == ICT_NAME and embedded_available():
        return load_embedded_ict()
    raise RigError(
        "no face model installed: run `rig assets download-ict` (fetches the public ICT-FaceKit, MIT) "
        "or `rig assets import-ict PATH` with a folder or zip of ICT-FaceKit"
    )


def _load_imported(store: Store, name: str) -> LinearFaceModel:
    """The model ``import_ict`` cached in the store, checked against its recorded hash."""
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


# ---------------------------------------------------------------- the compact copy in the package
#
# ``tools/embed_ict.py`` writes it from ICT-FaceKit; it expands to tensors bit-identical to an import's
# (the landmark fitter is chaotic: a change of 1e-7 cm in a basis moves a fitted pose by ~0.1 degree).
# ICT's OBJ files hold short decimals (%g, mostly 6 significant digits) and an import's delta is
# float32(shape - neutral) computed in float64, so each delta is stored as the integer difference of
# the two decimals:
#   neutral              float32 (V, 3)   as imported
#   neutral.mantissa     int32 (V, 3)     the neutral's decimals: neutral = mantissa / 10**digits
#   neutral.digits       uint8 (V, 3)
#   B.count              int32 (1,)       B = identity | expression: how many shapes
#   B.code               uint8            zlib of five byte planes over (count, V, 3) values: the zigzag
#                                         int32 difference, in units of 10**-(digits + extra), of the
#                                         shape's decimal from the neutral's (4 planes, low byte first),
#                                         then ``extra`` (uint8)
#   B.exception_index    int32 (X,)       flat indices whose delta has no such code (a decimal too fine
#   B.exception_value    float32 (X,)     or too far from the neutral's), stored as is
#   triangles            int32 (F, 3)
#   landmark_vertices    int32 (68,)
#   region.NAME          int32 (R, 2)     the region's vertices as half-open runs [start, stop)
# and ict_embedded.json the expression names, format version and provenance.

EMBEDDED_FORMAT = 1
EMBEDDED_TENSORS = "ict_embedded.safetensors"
EMBEDDED_META = "ict_embedded.json"
EMBEDDED_LICENCE = "LICENSE-ICT-FaceKit"
MAX_DIGITS = 22  # 10**k is exact in float64 up to here
_POW10 = np.array([float(10**k) for k in range(MAX_DIGITS + 1)])
_CHUNK = 1 << 20  # values decoded at a time (bounds the memory the int64 temporaries take)


def _embedded_file(name: str):
    return resources.files("rigcli.face").joinpath("data", name)


def ict_available(store: Store) -> bool:
    """Whether ``load_ict(store)`` has a model to load: the store's import, or the package's copy."""
    return installed(store) or embedded_available()


def embedded_available() -> bool:
    """Whether the package ships the compact ICT model (it does, unless a build left it out)."""
    return all(_embedded_file(n).is_file() for n in (EMBEDDED_TENSORS, EMBEDDED_META))


def embedded_model_id(blob: bytes) -> str:
    """The model id of the compact form: distinct from an import's ``ict-<hash>`` of dense tensors."""
    return f"{ICT_NAME}-embedded-{hashlib.sha256(blob).hexdigest()[:16]}"


def decode_deltas(difference: np.ndarray, extra: np.ndarray, mantissa: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """float32 deltas from their codes (int64 difference and extra digits) and their cells' neutral
    decimals; the encoder runs this same arithmetic to check every value it stores."""
    extra, digits = extra.astype(np.int64), digits.astype(np.int64)
    if (digits + extra).max(initial=0) > MAX_DIGITS:
        raise ValueError("decimal digits out of range")
    neutral = mantissa.astype(np.float64)
    shape = (neutral * _POW10[extra] + difference.astype(np.float64)) / _POW10[digits + extra]  # as ICT's text parses
    return (shape - neutral / _POW10[digits]).astype(np.float32)


def _expand_basis(compact: dict[str, torch.Tensor], key: str, mantissa: np.ndarray, digits: np.ndarray) -> torch.Tensor:
    """One basis (count, V, 3) from its zlib'd byte planes and float32 exceptions."""
    count, size = int(compact[f"{key}.count"][0]), mantissa.size
    planes = np.frombuffer(zlib.decompress(compact[f"{key}.code"].numpy().tobytes()), np.uint8)
    if planes.size != 5 * count * size:
        raise ValueError(f"{key} holds {planes.size} bytes, not 5 x {count} x {size}")
    planes = planes.reshape(5, count * size)
    out = np.empty(count * size, np.float32)
    for start in range(0, count * size, _CHUNK):
        stop = min(start + _CHUNK, count * size)
        zigzag = np.ascontiguousarray(planes[:4, start:stop].T).view("<u4")[:, 0].astype(np.int64)
        cells = np.arange(start, stop) % size
        difference = (zigzag >> 1) ^ -(zigzag & 1)
        out[start:stop] = decode_deltas(difference, planes[4, start:stop], mantissa[cells], digits[cells])
    out[compact[f"{key}.exception_index"].numpy()] = compact[f"{key}.exception_value"].numpy()
    return torch.from_numpy(out.reshape(count, size // 3, 3))


def expand_embedded(compact: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compact tensors as the dense ones an import holds (float32 bases, int64 indices, bool regions)."""
    vertex_count = compact["neutral"].shape[0]
    mantissa = compact["neutral.mantissa"].numpy().reshape(-1)
    digits = compact["neutral.digits"].numpy().reshape(-1)
    dense = {
        "neutral": compact["neutral"].to(torch.float32),
        "identity_basis": _expand_basis(compact, "identity", mantissa, digits),
        "expression_basis": _expand_basis(compact, "expression", mantissa, digits),
        "triangles": compact["triangles"].to(torch.int64),
        "landmark_vertices": compact["landmark_vertices"].to(torch.int64),
    }
    for key, runs in compact.items():
        if key.startswith("region."):
            mask = torch.zeros(vertex_count, dtype=torch.bool)
            for start, stop in runs.tolist():
                mask[start:stop] = True
            dense[key] = mask
    return dense


def embedded_meta() -> dict:
    """The compact copy's JSON (model id, sizes, provenance), without expanding its tensors."""
    return json.loads(_embedded_file(EMBEDDED_META).read_text())


@functools.lru_cache(maxsize=1)
def _embedded() -> tuple[str, list[str], dict[str, torch.Tensor]]:
    """The compact model expanded once per process (the fitter, renderer and editor all ask for it)."""
    blob = _embedded_file(EMBEDDED_TENSORS).read_bytes()
    meta = json.loads(_embedded_file(EMBEDDED_META).read_text())
    if meta.get("format_version") != EMBEDDED_FORMAT or meta.get("sha256") != hashlib.sha256(blob).hexdigest():
        raise RigError("the face model shipped with rig is damaged or from another version: reinstall rig")
    try:
        dense = expand_embedded(load(blob))
    except (SafetensorError, KeyError, ValueError, IndexError, zlib.error) as exc:
        raise RigError(f"the face model shipped with rig cannot be read ({exc}): reinstall rig") from exc
    return embedded_model_id(blob), list(meta["expression_names"]), dense


def load_embedded_ict() -> LinearFaceModel:
    """ICT FaceKit's kept part from the package's compact copy, dense float32 like an import.

    Each call gets its own tensors (copies of the cached expansion), so no caller can alter another's.
    """
    model_id, expression_names, t = _embedded()
    t = {k: v.clone() for k, v in t.items()}
    regions = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("region.")}
    return LinearFaceModel(
        ICT_NAME,
        model_id,
        t["neutral"],
        t["identity_basis"],
        t["expression_basis"],
        list(expression_names),
        t["triangles"],
        t["landmark_vertices"],
        regions,
    )
