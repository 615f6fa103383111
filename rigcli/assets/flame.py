"""FLAME and DECA assets: read the user's own files safely, check them, and cache them in the store.

FLAME (the face model DiffusionRig used) and DECA (the network that regresses FLAME parameters
from a photo) come from their authors after registration and may not be redistributed, so rig
reads the user's copies once and keeps a converted cache under ``assets/flame/`` in the store:

    flame.safetensors      FLAME 2020 (float32 unless noted)
        v_template (5023, 3)           neutral head
        shapedirs  (5023, 3, 300)      identity basis (the file's first 300 components)
        exprdirs   (5023, 3, 100)      expression basis (the file's last 100)
        posedirs   (5023, 3, 36)       pose correctives, in the file's layout: vertex, xyz, the 4
                                       non-root joints' (R - I) entries, 9 per joint, row-major
        J_regressor (5, 5023)          dense (the file holds a sparse matrix)
        weights    (5023, 5)           skinning weights
        kintree_table (2, 5) int64     row 0 parents (the root's, 2**32-1 in the file, is -1), row 1 ids
        faces      (9976, 3) int64     triangles (the file's ``f``)
    landmarks.safetensors  DECA's landmark_embedding.npy, same names as its keys:
        static_lmk_faces_idx (51,) int64, static_lmk_bary_coords (51, 3),
        dynamic_lmk_faces_idx (79, 17) int64, dynamic_lmk_bary_coords (79, 17, 3),
        full_lmk_faces_idx (68,) int64, full_lmk_bary_coords (68, 3)  (a leading 1 is dropped)
    texture.safetensors    albedo space: tex_mean (H, W, 3), tex_basis (H, W, 3, 50), RGB in [0, 1]
    template.safetensors   head_template.obj's UVs: uv_coords (N, 2) in [0, 1], uv_faces (9976, 3) int64
    deca.safetensors       DECA's coarse encoder E_flame, its state dict under its own key names
    assets.json            per asset: source file name and SHA-256, cache file and SHA-256, what it enables

FLAME's ``generic_model.pkl`` is a Python 2 pickle of chumpy arrays and a scipy sparse matrix, and
DECA's ``landmark_embedding.npy`` is a pickled dict (partly torch tensors) inside a .npy. Unpickling
can run any code the file names, so both go through :class:`RestrictedUnpickler`, which rebuilds
numpy arrays, sparse matrices, chumpy arrays (as plain numpy, without chumpy) and torch tensors
and refuses every other name before anything is called. ``deca_model.tar`` is read with
``torch.load(weights_only=True)``.

An import validates every given file before writing anything, writes the new cache into a fresh
folder beside the old one (carrying over assets not given this time) and swaps the folders, so a
failed import leaves the previous one as it was.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import shutil
import uuid
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from rigcli import RigError
from rigcli.assets.unpickle import _as_array, restricted_loads
from rigcli.estimate.deca import DECA_SPLIT, DecaEncoder
from rigcli.face.flame import (
    ASSETS,
    ASSETS_JSON,
    FLAME_FOLDER,
    FORMAT_VERSION,
    N_EXPRESSION,
    N_FACES,
    N_JOINTS,
    N_POSE_CORRECTIVES,
    N_SHAPE,
    N_VERTICES,
    TEXTURE_COMPONENTS,
    _load_cache,
    _manifest,
    _recover,
    flame_folder,
)
from rigcli.files import _fsync_dir, atomic_write_bytes, atomic_write_json, file_sha256, now_iso
from rigcli.store import Store, hold_lock

FLAME_2020_SHAPES = {
    "v_template": (N_VERTICES, 3),
    "shapedirs": (N_VERTICES, 3, N_SHAPE + N_EXPRESSION),
    "posedirs": (N_VERTICES, 3, N_POSE_CORRECTIVES),
    "J_regressor": (N_JOINTS, N_VERTICES),
    "weights": (N_VERTICES, N_JOINTS),
    "kintree_table": (2, N_JOINTS),
    "f": (N_FACES, 3),
}


LANDMARK_SHAPES = {
    # name: expected shape, None for "any"; full_* may carry a leading 1 in the file
    "static_lmk_faces_idx": (None,),
    "static_lmk_bary_coords": (None, 3),
    "dynamic_lmk_faces_idx": (None, None),
    "dynamic_lmk_bary_coords": (None, None, 3),
    "full_lmk_faces_idx": (68,),
    "full_lmk_bary_coords": (68, 3),
}


Progress = Callable[[str, int, int | None], None]
"""``progress(step, done, total)``: a description of the step and how far it is (bytes or items)."""


def _load_pickle(path: Path, data: bytes, what: str) -> Any:
    """Restricted-unpickle a file's bytes, turning every failure into one line naming the file."""
    if data[:4] == b"PK\x03\x04":
        raise RigError(f"{path.name} is a zip archive (a torch or npz file?), not {what}")
    try:
        return restricted_loads(data)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if message.startswith("refuses"):
            raise RigError(
                f"{path.name}: rig {message} (a pickle can run code when loaded; only the arrays "
                f"{what} holds are allowed): this is not a genuine {what}"
            ) from exc
        raise RigError(f"{path.name} is not a readable pickle ({message}): expected {what}") from exc
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, RuntimeError) as exc:
        raise RigError(f"{path.name} is truncated or damaged ({type(exc).__name__}: {exc}): expected {what}") from exc


def _read(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise RigError(f"{what} not found: {path}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise RigError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _shape_text(shape: tuple) -> str:
    return "(" + ", ".join("any" if n is None else str(n) for n in shape) + ")"


def _check_shape(array: np.ndarray, expected: tuple, where: str) -> None:
    if len(array.shape) != len(expected) or any(
        e is not None and e != n for e, n in zip(expected, array.shape, strict=True)
    ):
        raise RigError(f"{where} has shape {_shape_text(array.shape)}, expected {_shape_text(expected)}")


def _check_finite(array: np.ndarray, where: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise RigError(f"{where} holds NaN or infinite values: the file is damaged")


def _require_keys(path: Path, content: Any, keys: Iterable[str], holds: str, expected: str) -> None:
    """A one-line error unless ``content`` is a dict with every key (naming the missing and found ones)."""
    if not isinstance(content, dict):
        raise RigError(f"{path.name} holds a {type(content).__name__}, not {holds}")
    missing = [k for k in keys if k not in content]
    if missing:
        found = ", ".join(sorted(str(k) for k in content)) or "none"
        raise RigError(
            f"{path.name} has no {', '.join(repr(k) for k in missing)} (keys found: {found}); expected {expected}"
        )


def read_flame_model(path: Path) -> dict[str, np.ndarray]:
    """Read and check FLAME 2020's ``generic_model.pkl``; returns the cache's arrays (see the module doc)."""
    path = Path(path)
    data = _read(path, "FLAME model file")
    content = _load_pickle(path, data, "FLAME model (generic_model.pkl)")
    _require_keys(path, content, FLAME_2020_SHAPES, "FLAME's dict of arrays", "FLAME 2020's generic_model.pkl")
    arrays = {k: _as_array(content[k], f"{path.name}: '{k}'") for k in FLAME_2020_SHAPES}
    _check_version(path, arrays)
    for key, shape in FLAME_2020_SHAPES.items():
        _check_shape(arrays[key], shape, f"{path.name}: '{key}'")
        _check_finite(arrays[key], f"{path.name}: '{key}'")
    faces = arrays["f"]
    if faces.dtype.kind == "f" or faces.min() < 0 or faces.max() >= N_VERTICES:
        raise RigError(f"{path.name}: 'f' must hold vertex indices in 0..{N_VERTICES - 1}")
    kintree = arrays["kintree_table"].astype(np.int64)
    kintree[kintree >= 2**31] = -1  # the root's parent is stored as an unsigned -1
    if kintree[0, 0] != -1 or np.any(kintree[0, 1:] < 0) or np.any(kintree[0, 1:] >= N_JOINTS):
        raise RigError(f"{path.name}: 'kintree_table' does not describe a joint tree rooted at joint 0")
    shapedirs = arrays["shapedirs"].astype(np.float32)
    return {
        "v_template": arrays["v_template"].astype(np.float32),
        "shapedirs": np.ascontiguousarray(shapedirs[:, :, :N_SHAPE]),
        "exprdirs": np.ascontiguousarray(shapedirs[:, :, N_SHAPE:]),
        "posedirs": arrays["posedirs"].astype(np.float32),
        "J_regressor": arrays["J_regressor"].astype(np.float32),
        "weights": arrays["weights"].astype(np.float32),
        "kintree_table": kintree,
        "faces": faces.astype(np.int64),
    }


def _check_version(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Say plainly when a file is a FLAME other than 2020 (DECA and the paper used FLAME 2020)."""
    if arrays["v_template"].ndim != 2 or arrays["f"].ndim != 2 or arrays["shapedirs"].ndim != 3:
        return  # not a FLAME of any version: the shape checks say what is wrong
    vertices, faces = arrays["v_template"].shape[0], arrays["f"].shape[0]
    components = arrays["shapedirs"].shape[-1]
    advice = (
        "rig reads FLAME 2020 (generic_model.pkl from the FLAME 2020 download at flame.is.tue.mpg.de), "
        "the version DECA was trained with"
    )
    if (vertices, faces) != (N_VERTICES, N_FACES):
        raise RigError(
            f"{path.name} is not FLAME 2020: found {vertices} vertices and {faces} triangles, "
            f"expected {N_VERTICES} and {N_FACES}; {advice}"
        )
    if "2023" in path.name:
        raise RigError(
            f"{path.name} looks like FLAME 2023: it has FLAME 2020's mesh sizes but a different shape "
            f"and expression space (revised eye region), which DECA's encoder was not trained for; {advice}"
        )
    if components != N_SHAPE + N_EXPRESSION:
        raise RigError(
            f"{path.name} is not FLAME 2020: 'shapedirs' has {components} components, expected "
            f"{N_SHAPE + N_EXPRESSION} (300 shape + 100 expression); {advice}"
        )


def read_npy_object(path: Path, data: bytes) -> Any:
    """The object inside a .npy file: plain arrays as they are, pickled ones through the restricted unpickler.

    numpy's own ``np.load(allow_pickle=True)`` would run whatever the pickle names; this never does.
    """
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            _, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            _, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except ValueError as exc:
        raise RigError(f"{path.name} is not a .npy file ({exc})") from exc
    if not dtype.hasobject:
        try:
            return np.load(io.BytesIO(data), allow_pickle=False)
        except ValueError as exc:
            raise RigError(f"{path.name} is truncated or damaged ({exc})") from exc
    return _load_pickle(path, data[stream.tell() :], "landmark embedding (landmark_embedding.npy)")


def read_landmarks(path: Path, n_faces: int = N_FACES) -> dict[str, np.ndarray]:
    """Read and check DECA's ``landmark_embedding.npy`` (triangle indices and barycentric coordinates)."""
    path = Path(path)
    content = read_npy_object(path, _read(path, "landmark embedding file"))
    if isinstance(content, np.ndarray) and content.dtype == object and content.ndim == 0:
        content = content.item()
    _require_keys(path, content, LANDMARK_SHAPES, "DECA's dict of landmark arrays", "DECA's landmark_embedding.npy")
    result = {}
    for key, expected in LANDMARK_SHAPES.items():
        where = f"{path.name}: '{key}'"
        array = _as_array(content[key], where)
        if key.startswith("full_") and array.ndim == len(expected) + 1 and array.shape[0] == 1:
            array = array[0]
        _check_shape(array, expected, where)
        if key.endswith("faces_idx"):
            if array.dtype.kind == "f" or array.min() < 0 or array.max() >= n_faces:
                raise RigError(f"{where} must hold triangle indices in 0..{n_faces - 1}")
            result[key] = array.astype(np.int64)
        else:
            _check_finite(array, where)
            result[key] = array.astype(np.float32)
    pairs = [("static", 1), ("dynamic", 2), ("full", 1)]
    for prefix, dims in pairs:
        idx, bary = result[f"{prefix}_lmk_faces_idx"], result[f"{prefix}_lmk_bary_coords"]
        if bary.shape[:dims] != idx.shape:
            raise RigError(
                f"{path.name}: '{prefix}_lmk_bary_coords' has shape {bary.shape}, which does not match "
                f"'{prefix}_lmk_faces_idx' {idx.shape}"
            )
    return result


def read_texture(path: Path, components: int = TEXTURE_COMPONENTS) -> tuple[dict[str, np.ndarray], str]:
    """Read FLAME's ``FLAME_texture.npz`` (mean, tex_dir; 0..255) or ``FLAME_albedo_from_BFM.npz``
    (MU, PC; 0..1). Returns ``tex_mean`` (H, W, 3) and ``tex_basis`` (H, W, 3, components) in RGB,
    0..1, and which kind it was. Both files store a square UV image in BGR order, as DECA reads them.
    """
    path = Path(path)
    if not path.is_file():
        raise RigError(f"texture file not found: {path}")
    try:  # from the path, not via bytes in memory: texture spaces are hundreds of megabytes
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if {"mean", "tex_dir"} <= keys:
                kind, mean_key, basis_key, scale = "FLAME", "mean", "tex_dir", 1 / 255
            elif {"MU", "PC"} <= keys:
                kind, mean_key, basis_key, scale = "BFM", "MU", "PC", 1.0
            else:
                raise RigError(
                    f"{path.name} has neither 'mean' and 'tex_dir' (FLAME_texture.npz) nor 'MU' and 'PC' "
                    f"(FLAME_albedo_from_BFM.npz); keys found: {', '.join(sorted(keys)) or 'none'}"
                )
            mean = np.asarray(archive[mean_key])
            basis = np.asarray(archive[basis_key])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise RigError(f"{path.name} is not a readable .npz file, or is truncated ({exc})") from exc
    for key, array in ((mean_key, mean), (basis_key, basis)):
        if array.dtype.kind not in "biuf":
            raise RigError(f"{path.name}: '{key}' holds {array.dtype} values, not numbers")
    pixels = mean.size // 3
    side = math.isqrt(pixels)
    if mean.size != 3 * side * side or side == 0:
        raise RigError(f"{path.name}: '{mean_key}' has {mean.size} values, not a square RGB image (3 x N x N)")
    if basis.ndim < 2 or basis.size % mean.size or basis.size // mean.size != basis.shape[-1]:
        raise RigError(
            f"{path.name}: '{basis_key}' has shape {basis.shape}; expected {side}x{side}x3 values per component "
            f"(the size of '{mean_key}'), components last"
        )
    count = basis.shape[-1]
    if count < components:
        raise RigError(f"{path.name}: '{basis_key}' has {count} components; rig uses the first {components}")
    mean = mean.reshape(side, side, 3)[..., ::-1].astype(np.float32) * np.float32(scale)
    basis = basis.reshape(side, side, 3, count)[..., ::-1, :components].astype(np.float32) * np.float32(scale)
    _check_finite(mean, f"{path.name}: '{mean_key}'")
    _check_finite(basis, f"{path.name}: '{basis_key}'")
    return {"tex_mean": np.ascontiguousarray(mean), "tex_basis": np.ascontiguousarray(basis)}, kind


def read_template(path: Path) -> dict[str, np.ndarray]:
    """Read DECA's ``head_template.obj``: its UV coordinates and each triangle's UV indices."""
    path = Path(path)
    text = _read(path, "head template").decode("utf-8", errors="replace")
    vertices, uvs, faces, uv_faces = 0, [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if parts[0] == "v":
                vertices += 1
            elif parts[0] == "vt":
                uvs.append((float(parts[1]), float(parts[2])))
            elif parts[0] == "f":
                corners = [p.split("/") for p in parts[1:]]
                if len(corners) != 3 or any(len(c) < 2 or not c[1] for c in corners):
                    raise ValueError("expected a triangle with texture indices (f v/vt v/vt v/vt)")
                faces.append([int(c[0]) - 1 for c in corners])
                uv_faces.append([int(c[1]) - 1 for c in corners])
        except (ValueError, IndexError) as exc:
            raise RigError(f"{path.name}, line {number}: {exc}") from exc
    if vertices != N_VERTICES or len(faces) != N_FACES:
        raise RigError(
            f"{path.name} has {vertices} vertices and {len(faces)} triangles; FLAME's head template has "
            f"{N_VERTICES} and {N_FACES}"
        )
    uv_coords = np.asarray(uvs, dtype=np.float32).reshape(-1, 2)
    uv_faces_array = np.asarray(uv_faces, dtype=np.int64)
    if uv_faces_array.min() < 0 or uv_faces_array.max() >= len(uv_coords):
        raise RigError(f"{path.name}: texture indices refer to UVs that the file does not have")
    return {"uv_coords": uv_coords, "uv_faces": uv_faces_array, "template_faces": np.asarray(faces, np.int64)}


def e_flame_shapes() -> dict[str, tuple[int, ...]]:
    """E_flame's state dict, key by key: ``encoder.*`` (the ResNet-50 trunk), then ``layers.0``
    Linear(2048, 1024), ReLU, ``layers.2`` Linear(1024, 236): read off rig's DecaEncoder (built on
    the meta device, so nothing is allocated), which is tested against DECA's names."""

    with torch.device("meta"):
        encoder = DecaEncoder()
    return {k: tuple(v.shape) for k, v in encoder.state_dict().items()}


def read_deca(path: Path) -> dict[str, torch.Tensor]:
    """Read ``deca_model.tar`` with torch's weights-only loader and check its coarse encoder E_flame."""
    path = Path(path)
    if not path.is_file():
        raise RigError(f"DECA model file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused is None:
            detail = next((line for line in lines if "Unsupported" in line), lines[-1] if lines else "")
            raise RigError(f"{path.name} is not a readable torch file ({detail}): expected deca_model.tar") from exc
        raise RigError(
            f"{path.name} holds objects other than tensors, which rig does not load (torch.load with "
            f"weights_only=True, so that no code in the file runs): {refused}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, TypeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RigError(f"{path.name} is not a readable torch file ({message}): expected deca_model.tar") from exc
    if not isinstance(checkpoint, dict) or "E_flame" not in checkpoint:
        found = ", ".join(sorted(map(str, checkpoint))) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise RigError(f"{path.name} has no 'E_flame' (found: {found}); expected DECA's deca_model.tar")
    state = checkpoint["E_flame"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RigError(f"{path.name}: 'E_flame' is not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    expected = e_flame_shapes()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state and k not in optional]
    unknown = [k for k in state if k not in expected]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unknown:
            parts.append(f"{len(unknown)} unexpected (first: {unknown[0]})")
        raise RigError(
            f"{path.name}: 'E_flame' is not DECA's ResNet-50 encoder: of its {len(state)} tensors, {'; '.join(parts)}"
        )
    for key, tensor in state.items():
        if tuple(tensor.shape) != expected[key]:
            raise RigError(
                f"{path.name}: 'E_flame' {key} has shape {_shape_text(tuple(tensor.shape))}, "
                f"expected {_shape_text(expected[key])}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RigError(f"{path.name}: 'E_flame' {key} holds NaN or infinite values: the file is damaged")
    return {
        k: (v.to(torch.float32) if v.is_floating_point() else v.to(torch.int64)).contiguous() for k, v in state.items()
    }


def _sha256_file(path: Path, progress: Progress | None, step: str) -> str:
    return file_sha256(path, (lambda done, total: progress(step, done, total)) if progress else None)


def import_flame(
    store: Store,
    flame: Path | None = None,
    deca: Path | None = None,
    texture: Path | None = None,
    landmarks: Path | None = None,
    template: Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Check the given FLAME/DECA files and cache them in the store; returns the new assets.json.

    Every given file is read and checked before anything is written; files not given keep their
    earlier import. A FLAME model must be given, or imported before.
    """
    sources = {"flame": flame, "landmarks": landmarks, "deca": deca, "texture": texture, "template": template}
    sources = {role: Path(p) for role, p in sources.items() if p is not None}
    if not sources:
        raise RigError("nothing to import: give --flame generic_model.pkl and any of --deca, --texture, --landmarks")
    for role, path in sources.items():
        if not path.is_file():
            raise RigError(f"{ASSETS[role][2]}: file not found: {path}")
    store.ensure_writable()
    with hold_lock(store.root / "locks" / "assets-flame.lock"):
        _recover(store)
        manifest = _manifest(store)
        if "flame" not in sources and "flame" not in manifest["assets"]:
            raise RigError("no FLAME model imported yet: give --flame generic_model.pkl (FLAME 2020) as well")
        caches: dict[str, dict[str, torch.Tensor]] = {}
        extra: dict[str, dict[str, Any]] = {}
        for role, path in sources.items():
            if progress:
                progress(_STEPS[role], 0, None)
            tensors, info = _read_asset(role, path)
            if role == "template":
                template_faces = tensors.pop("template_faces")
                flame = caches["flame"] if "flame" in caches else _load_cache(store, manifest, "flame")
                flame_faces = flame["faces"]
                if not np.array_equal(flame_faces.numpy(), template_faces):
                    raise RigError(f"{path.name}: its triangles are not those of the FLAME model ('f')")
            caches[role] = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v) for k, v in tensors.items()}
            extra[role] = {
                "source": path.name,
                "source_sha256": _sha256_file(path, progress, f"hashing {path.name}"),
                **info,
            }
        return _write(store, manifest, caches, extra, progress)


_STEPS = {
    "flame": "reading the FLAME model",
    "landmarks": "reading the landmark embedding",
    "texture": "reading the texture space",
    "template": "reading the head template",
    "deca": "reading the DECA model",
}


def _read_asset(role: str, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """One asset's checked arrays, and what to record about it besides its hashes."""
    if role == "flame":
        return read_flame_model(path), {"flame_version": "2020"}
    if role == "landmarks":
        return read_landmarks(path), {}
    if role == "texture":
        tensors, kind = read_texture(path)
        return tensors, {"kind": kind, "components": TEXTURE_COMPONENTS, "resolution": tensors["tex_mean"].shape[0]}
    if role == "template":
        return read_template(path), {}
    return read_deca(path), {"code_split": dict(DECA_SPLIT)}


def _write(
    store: Store,
    manifest: dict[str, Any],
    caches: dict[str, dict[str, torch.Tensor]],
    extra: dict[str, dict[str, Any]],
    progress: Progress | None,
) -> dict[str, Any]:
    """Write the new caches into a fresh folder with the kept ones, then swap it in place of the old."""
    folder = flame_folder(store)
    staging = folder.parent / f".tmp-{FLAME_FOLDER}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        assets = dict(manifest["assets"])
        for role in manifest["assets"]:
            if role in caches:
                continue
            cache = folder / ASSETS[role][0]
            try:
                os.link(cache, staging / cache.name)
            except OSError:
                shutil.copy2(cache, staging / cache.name)
        for index, (role, tensors) in enumerate(caches.items()):
            if progress:
                progress("writing the cache", index, len(caches))
            blob = save({k: v.contiguous() for k, v in tensors.items()})
            cache_name, enables, _ = ASSETS[role]
            atomic_write_bytes(staging / cache_name, blob)
            assets[role] = {
                **extra[role],
                "cache": cache_name,
                "cache_sha256": hashlib.sha256(blob).hexdigest(),
                "enables": enables,
                "imported": now_iso(),
            }
        new_manifest = {"format": FORMAT_VERSION, "flame_version": "2020", "assets": assets}
        atomic_write_json(staging / ASSETS_JSON, new_manifest)
        trash = folder.parent / f".trash-{FLAME_FOLDER}-{uuid.uuid4().hex[:8]}"
        if folder.exists():
            os.replace(folder, trash)
        os.replace(staging, folder)
        _fsync_dir(folder.parent)
        shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        if not folder.exists():
            _recover(store)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return new_manifest
