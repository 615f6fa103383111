"""Small stand-ins for the user's FLAME and DECA files, written in the same formats as the real ones.

FLAME's generic_model.pkl is a Python 2 pickle (protocol 2): chumpy arrays (``chumpy.ch.Ch``
objects whose state holds the values under ``x``), a scipy CSC matrix, plain numpy arrays, bytes
as Python 2 strings and globals under their Python 2 module names. :func:`write_flame_pickle`
reproduces that in kind, with throwaway ``chumpy`` modules present only while pickling, so
neither chumpy nor Python 2 is needed. The values are random; the sizes are FLAME 2020's unless
a test asks otherwise.
"""

from __future__ import annotations

import pickle
import struct
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import scipy.sparse as sp
import torch

from rigcli.assets.flame import e_flame_shapes
from rigcli.face.flame import N_FACES, N_JOINTS, N_VERTICES

PY2_MODULES = {
    "numpy._core.multiarray": "numpy.core.multiarray",
    "numpy.core.multiarray": "numpy.core.multiarray",
    "scipy.sparse._csc": "scipy.sparse.csc",
}


class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle did: bytes as (BIN)STRING, py2 module names for globals."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        module = PY2_MODULES.get(obj.__module__)
        if module is None:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def _chumpy_classes() -> types.SimpleNamespace:
    """Classes named as chumpy's (``chumpy.ch.Ch``, ``chumpy.reordering.Select`` and ``transpose``)
    whose instances pickle their state the way chumpy's do: a dict of terms, no caches."""

    class Node:
        def __getstate__(self) -> dict:
            return dict(self.__dict__)

    class Ch(Node):
        def __init__(self, x: np.ndarray) -> None:
            self.__dict__.update(
                x=x, _dirty_vars={"x"}, _itr=None, _depends_on_deps={}, _make_dense=False, _make_sparse=False
            )

    class Select(Node):
        def __init__(self, a, idxs: np.ndarray, preferred_shape: tuple) -> None:
            self.__dict__.update(a=a, idxs=idxs, preferred_shape=preferred_shape, _dirty_vars=set(), _itr=None)

    class transpose(Node):  # chumpy's name
        def __init__(self, a, axes=None) -> None:
            self.__dict__.update(a=a, axes=axes, _dirty_vars=set(), _itr=None)

    for cls, module in ((Ch, "chumpy.ch"), (Select, "chumpy.reordering"), (transpose, "chumpy.reordering")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
    return types.SimpleNamespace(Ch=Ch, Select=Select, transpose=transpose)


def py2_pickle(obj_factory) -> bytes:
    """Pickle what ``obj_factory(chumpy_classes)`` builds, with throwaway ``chumpy.ch`` and
    ``chumpy.reordering`` modules in sys.modules while pickling (then removed)."""
    import io

    ch = _chumpy_classes()
    modules = {name: types.ModuleType(name) for name in ("chumpy", "chumpy.ch", "chumpy.reordering")}
    modules["chumpy.ch"].Ch = ch.Ch
    modules["chumpy.reordering"].Select = ch.Select
    modules["chumpy.reordering"].transpose = ch.transpose
    saved = {k: sys.modules.get(k) for k in modules}
    sys.modules.update(modules)
    try:
        buffer = io.BytesIO()
        _Py2Pickler(buffer, protocol=2).dump(obj_factory(ch))
        return buffer.getvalue()
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


def flame_arrays(
    vertices: int = N_VERTICES, faces: int = N_FACES, components: int = 400, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random arrays with FLAME's keys, dtypes and (by default) FLAME 2020's sizes."""
    rng = np.random.default_rng(seed)
    weights = rng.random((vertices, N_JOINTS))
    regressor = np.where(rng.random((N_JOINTS, vertices)) < 0.01, rng.random((N_JOINTS, vertices)), 0.0)
    return {
        "v_template": rng.normal(0, 0.1, (vertices, 3)),
        "shapedirs": rng.normal(0, 1e-3, (vertices, 3, components)),
        "posedirs": rng.normal(0, 1e-3, (vertices, 3, 36)),
        "J_regressor": regressor,
        "weights": weights / weights.sum(1, keepdims=True),
        "kintree_table": np.array([[2**32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32),
        "f": rng.integers(0, vertices, (faces, 3)).astype(np.uint32),
    }


def write_flame_pickle(
    path: Path, arrays: dict[str, np.ndarray], drop: tuple[str, ...] = (), select_shapedirs: bool = False
) -> Path:
    """Write ``arrays`` as FLAME's generic_model.pkl does: chumpy for the dense float arrays, CSC for
    J_regressor, numpy for f and kintree_table, plus a few of the real file's other keys (``J`` as a
    chumpy expression rig never evaluates). ``select_shapedirs`` stores shapedirs as a chumpy
    ``Select`` over a flat ``Ch``, as some SMPL-family files do."""

    def build(ch):
        content = {}
        for key, value in arrays.items():
            if key in drop:
                continue
            if key == "J_regressor":
                content[key.encode()] = sp.csc_matrix(value)
            elif key in ("f", "kintree_table") or value.dtype.kind != "f":
                content[key.encode()] = value
            elif key == "shapedirs" and select_shapedirs:
                flat = ch.Ch(np.concatenate([value.ravel()[::-1], np.zeros(7)]))
                idxs = np.arange(value.size)[::-1].copy()
                content[key.encode()] = ch.Select(flat, idxs, value.shape)
            else:
                content[key.encode()] = ch.Ch(value)
        content[b"J"] = ch.transpose(ch.Ch(np.zeros((3, N_JOINTS))), None)
        content[b"bs_style"] = b"lbs"
        content[b"bs_type"] = b"lrotmin"
        return content

    path.write_bytes(py2_pickle(build))
    return path


def landmark_content(seed: int = 0) -> dict:
    """DECA's landmark embedding: numpy for static/full (full with a leading 1), torch for dynamic."""
    rng = np.random.default_rng(seed)

    def bary(*shape):
        b = rng.random((*shape, 3))
        return b / b.sum(-1, keepdims=True)

    return {
        "static_lmk_faces_idx": rng.integers(0, N_FACES, 51).astype(np.int64),
        "static_lmk_bary_coords": bary(51),
        "dynamic_lmk_faces_idx": torch.from_numpy(rng.integers(0, N_FACES, (79, 17))).to(torch.int32),
        "dynamic_lmk_bary_coords": torch.from_numpy(bary(79, 17)).float(),
        "full_lmk_faces_idx": rng.integers(0, N_FACES, (1, 68)).astype(np.int64),
        "full_lmk_bary_coords": bary(1, 68).astype(np.float32),
    }


def write_landmarks(path: Path, content: dict) -> Path:
    """A .npy holding a pickled dict, as np.save writes it (what np.load(allow_pickle=True)[()] reads)."""
    with open(path, "wb") as f:
        np.save(f, np.array(content, dtype=object), allow_pickle=True)
    return path


def write_texture(path: Path, kind: str = "FLAME", side: int = 16, components: int = 60, seed: int = 0) -> dict:
    """FLAME_texture.npz (mean, tex_dir in 0..255) or FLAME_albedo_from_BFM.npz (MU, PC flat, 0..1)."""
    rng = np.random.default_rng(seed)
    if kind == "FLAME":
        arrays = {
            "mean": rng.uniform(0, 255, (side, side, 3)),
            "tex_dir": rng.normal(0, 10, (side, side, 3, components)),
        }
    else:
        arrays = {
            "MU": rng.uniform(0, 1, side * side * 3),
            "PC": rng.normal(0, 0.05, (side * side * 3, components)),
            "specMU": np.zeros(side * side * 3),
        }
    np.savez(path, **arrays)
    return arrays


def write_template(path: Path, faces: np.ndarray, uvs: int = 5118, seed: int = 0) -> dict:
    """head_template.obj: FLAME's vertices and triangles with a UV per corner (f v/vt v/vt v/vt)."""
    rng = np.random.default_rng(seed)
    uv = rng.random((uvs, 2)).round(6)  # as written below
    uv_faces = rng.integers(0, uvs, faces.shape)
    lines = [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in rng.normal(0, 0.1, (N_VERTICES, 3))]
    lines += [f"vt {u:.6f} {v:.6f}" for u, v in uv]
    lines += [
        "f " + " ".join(f"{int(v) + 1}/{int(t) + 1}" for v, t in zip(face, uv_face, strict=True))
        for face, uv_face in zip(faces, uv_faces, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return {"uv_coords": uv.astype(np.float32), "uv_faces": uv_faces.astype(np.int64)}


def e_flame_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with DECA's E_flame names and shapes (ResNet-50 trunk and its regressor)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in e_flame_shapes().items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000, dtype=torch.int64)
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.01
    return state


def write_deca(path: Path, e_flame: dict, extra: dict | None = None, legacy: bool = True) -> Path:
    """deca_model.tar as DECA saves it: E_flame, E_detail and D_detail state dicts (small stand-ins for
    the detail networks, which rig does not use)."""
    checkpoint = {
        "E_flame": e_flame,
        "E_detail": {"layers.0.weight": torch.zeros(4, 4)},
        "D_detail": {"conv.weight": torch.zeros(2, 2)},
        **(extra or {}),
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=not legacy)
    return path
