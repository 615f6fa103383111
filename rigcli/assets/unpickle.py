"""A pickle reader that runs no code: what FLAME's and DECA's pickled files hold, and nothing else.

FLAME's ``generic_model.pkl`` is a Python 2 pickle of chumpy arrays and a scipy sparse matrix, and
DECA's ``landmark_embedding.npy`` a pickled dict (partly torch tensors). Unpickling can call any
name a file gives, so :class:`RestrictedUnpickler` rebuilds only numpy arrays, sparse matrices,
chumpy arrays (as inert stand-ins that become numpy, without chumpy) and torch tensors, and refuses
every other name before anything is called.
"""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any

import numpy as np
import torch

from rigcli import RigError


class _ChumpyArray:
    """Stand-in for a chumpy object (``chumpy.ch.Ch`` and chumpy's expression classes): it only keeps
    the pickled state. Values are computed for the few kinds FLAME-style files hold: ``Ch`` (its
    ``x``), and the reorderings ``Select``, ``transpose`` and ``Reshape`` over another array."""

    kind = "chumpy.ch.Ch"

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def to_numpy(self, where: str, depth: int = 0) -> np.ndarray:
        state = getattr(self, "state", None)
        if not isinstance(state, dict) or depth > 16:
            raise RigError(f"{where}: a damaged chumpy array (no state)")

        def inner(key: str) -> np.ndarray:
            if key not in state:
                raise RigError(f"{where}: a chumpy {self.kind} without its '{key}'")
            value = state[key]
            return value.to_numpy(where, depth + 1) if isinstance(value, _ChumpyArray) else _as_array(value, where)

        try:
            if self.kind == "chumpy.ch.Ch":
                return inner("x")
            if self.kind == "chumpy.reordering.Select":
                picked = inner("a").ravel()[np.asarray(state["idxs"], dtype=np.int64)]
                shape = state.get("preferred_shape")
                return picked.reshape(shape) if shape is not None else picked
            if self.kind == "chumpy.reordering.transpose":
                return np.transpose(inner("a"), state.get("axes"))
            if self.kind == "chumpy.reordering.Reshape":
                return inner("a").reshape(state["newshape"])
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise RigError(f"{where}: a damaged chumpy {self.kind} ({exc})") from exc
        raise RigError(f"{where} is a chumpy {self.kind} expression, which rig does not evaluate")


_CHUMPY_MODULES = ("chumpy", "chumpy.ch", "chumpy.ch_ops", "chumpy.reordering", "chumpy.linalg", "chumpy.logic")


_chumpy_kinds: dict[str, type] = {"chumpy.ch.Ch": _ChumpyArray}


def _chumpy_stand_in(module: str, name: str) -> type:
    """An inert stand-in class per chumpy class name (it runs nothing; see _ChumpyArray)."""
    kind = f"{module}.{name}"
    if kind not in _chumpy_kinds:
        _chumpy_kinds[kind] = type(f"_Chumpy_{name}", (_ChumpyArray,), {"kind": kind})
    return _chumpy_kinds[kind]


class _SparseMatrix:
    """Stand-in for scipy's compressed sparse matrices (CSC/CSR): rebuilt densely with numpy."""

    column_major = True

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def to_numpy(self, where: str) -> np.ndarray:
        state = getattr(self, "state", None)
        if not isinstance(state, dict):
            raise RigError(f"{where}: a sparse matrix without stored values")
        try:
            shape = tuple(int(n) for n in state.get("_shape", state.get("shape")))
            data = np.asarray(state["data"], dtype=np.float64)
            indices = np.asarray(state["indices"], dtype=np.int64)
            indptr = np.asarray(state["indptr"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise RigError(f"{where}: a damaged sparse matrix ({exc})") from exc
        outer, inner = (shape[1], shape[0]) if self.column_major else shape
        if (
            len(shape) != 2
            or indptr.shape != (outer + 1,)
            or len(data) != len(indices)
            or indptr[-1] != len(data)
            or np.any(np.diff(indptr) < 0)
            or (len(indices) and (indices.min() < 0 or indices.max() >= inner))
        ):
            raise RigError(f"{where}: a damaged sparse matrix (its indices do not fit its shape {shape})")
        dense = np.zeros(shape, dtype=np.float64)
        owner = np.repeat(np.arange(outer), np.diff(indptr))
        if self.column_major:
            np.add.at(dense, (indices, owner), data)
        else:
            np.add.at(dense, (owner, indices), data)
        return dense


class _RowSparseMatrix(_SparseMatrix):
    column_major = False


def _reconstruct_array(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refuses to build an array of type {subtype!r}")
    return _NUMPY_RECONSTRUCT(subtype, shape, dtype)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copy_reg._reconstructor, for the stand-in classes only."""
    stand_in = isinstance(cls, type) and issubclass(cls, _ChumpyArray | _SparseMatrix)
    if not stand_in or base is not object or state is not None:
        raise pickle.UnpicklingError(f"refuses copy_reg._reconstructor for {cls!r}")
    return cls.__new__(cls)


def _encode_latin1(text: Any, encoding: str = "latin1") -> bytes:
    """_codecs.encode as protocol-2 pickles use it for bytes: latin-1 only."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError("refuses _codecs.encode other than text to latin-1 bytes")
    return text.encode("latin1")


def _storage_from_bytes(data: Any) -> Any:
    """torch.storage._load_from_bytes, but through torch's own weights-only loader."""
    if not isinstance(data, bytes | bytearray):
        raise pickle.UnpicklingError("refuses a torch storage that is not bytes")
    return torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 with its arguments checked: a storage, integers, no hooks."""
    if not isinstance(storage, torch.TypedStorage | torch.UntypedStorage):
        raise pickle.UnpicklingError("refuses a torch tensor whose storage is not a torch storage")
    if hooks:
        raise pickle.UnpicklingError("refuses a torch tensor with backward hooks")
    if not all(isinstance(n, int) for n in (offset, *size, *stride)):
        raise pickle.UnpicklingError("refuses a torch tensor with a non-integer size or stride")
    return torch._utils._rebuild_tensor_v2(
        storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict()
    )


_NUMPY_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's _reconstruct, wherever this numpy keeps it


_NUMPY_SCALAR = np.float64(1).__reduce__()[0]


_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")


_SPARSE_MODULES = (
    "scipy.sparse",
    "scipy.sparse.csc",
    "scipy.sparse._csc",
    "scipy.sparse.csr",
    "scipy.sparse._csr",
    "scipy.sparse.compressed",
    "scipy.sparse._compressed",
    "scipy.sparse._arrays",
)


_ALLOWED: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): _reconstruct_array for m in _NUMPY_MODULES},
    **{(m, "scalar"): _NUMPY_SCALAR for m in _NUMPY_MODULES},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(m, n): _SparseMatrix for m in _SPARSE_MODULES for n in ("csc_matrix", "csc_array")},
    **{(m, n): _RowSparseMatrix for m in _SPARSE_MODULES for n in ("csr_matrix", "csr_array")},
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("__builtin__", "object"): object,
    ("builtins", "object"): object,
    ("__builtin__", "set"): set,
    ("builtins", "set"): set,
    ("_codecs", "encode"): _encode_latin1,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only what FLAME and DECA files hold, and refuses any other name.

    Allowed: numpy arrays, dtypes and scalars; scipy CSC/CSR matrices and chumpy arrays (as
    stand-ins that become numpy arrays, so neither library is imported); torch tensors (their
    storage is read by torch's weights-only loader); sets, ordered dicts and latin-1 bytes. A
    pickle naming anything else (``os.system``, ``builtins.eval``, ...) fails here, before that
    name is looked up, let alone called.
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="latin1")

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None and module in _CHUMPY_MODULES and name.isidentifier() and not name.startswith("_"):
            found = _chumpy_stand_in(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"refuses to load {module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refuses persistent references")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (raises pickle.UnpicklingError and friends)."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _as_array(value: Any, where: str) -> np.ndarray:
    """A plain numeric numpy array from what a FLAME/DECA pickle holds there."""
    if isinstance(value, _ChumpyArray | _SparseMatrix):
        return value.to_numpy(where)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray) and value.dtype == object and value.ndim == 0:
        return _as_array(value.item(), where)
    if not isinstance(value, np.ndarray | np.generic):
        raise RigError(f"{where} is a {type(value).__name__}, not an array")
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise RigError(f"{where} holds {array.dtype} values, not numbers")
    return array
