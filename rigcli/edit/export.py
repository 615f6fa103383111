"""A person's UNet engines in the store: export to ONNX or TensorRT, list them with their state, remove.

The runtimes themselves live in ``engines`` (which knows nothing of the store); this module decides
where a person's artifacts go, which model they come from, and holds the person's lock while writing.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.onnx import artifact, missing_onnx, require_onnx, trace_device, weights_hash
from engines.tensorrt import device_key, missing_tensorrt, require_tensorrt, trt_artifact
from rigcli import RigError
from rigcli.diffusion.checkpoints import load_model
from rigcli.store import LockHolder, Store


def export_onnx(
    store: Store,
    name: str,
    fp16: bool = False,
    opset: int = 17,
    max_batch: int = 32,
    model: Path | None = None,
    on_wait: Callable[[LockHolder | None], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> Path:
    """Export a person's UNet step (or ``model``'s) to ONNX in their engines folder; the file's path."""
    require_onnx()
    folder = store.require_model(name, model)
    net, _ = load_model(folder)
    where = "on the GPU" if trace_device(fp16) == "cuda" else "on the CPU"
    with store.locked(name, on_wait=on_wait):
        if on_status:
            on_status(f"exporting to ONNX ({'fp16' if fp16 else 'fp32'}, {where})")
        return artifact(
            net.denoisingUNet, engines_dir(store, name), net.cfg.image_size, fp16, opset, max_batch,
            source=str(folder.resolve()),
        )  # fmt: skip


def export_trt(
    store: Store,
    name: str,
    fp16: bool = True,
    max_batch: int = 32,
    model: Path | None = None,
    on_wait: Callable[[LockHolder | None], None] | None = None,
    on_status: Callable[[str], None] | None = None,
) -> Path:
    """Build a TensorRT engine of a person's UNet step (via ONNX) for this GPU; the plan's path."""
    require_tensorrt()
    folder = store.require_model(name, model)
    net, _ = load_model(folder)
    with store.locked(name, on_wait=on_wait):
        if on_status:
            on_status("exporting to ONNX")
        return trt_artifact(
            net.denoisingUNet, engines_dir(store, name), net.cfg.image_size, fp16, max_batch,
            source=str(folder.resolve()), on_build=lambda message: on_status and on_status(f"{message} (minutes)"),
        )  # fmt: skip


@dataclass
class Artifact:
    """One exported engine in a person's ``engines/`` folder, and whether it is still current."""

    person: str
    key: str  # the folder name
    kind: str  # onnx or tensorrt
    precision: str
    size: int  # bytes on disk
    state: str  # current, stale or unknown
    reason: str  # why stale or unknown
    info: dict


def engines_dir(store, name: str) -> Path:
    return store.person_dir(name) / "engines"


def _staleness(info: dict, folder: Path, model_dir: Path, hashes: dict) -> tuple[str, str]:
    """(state, reason): is this artifact what an export would make now?"""
    kind = info.get("kind", "onnx")
    filename = "model.plan" if kind == "tensorrt" else "model.onnx"
    if not (folder / filename).is_file():
        return "stale", f"{filename} missing"
    if not (model_dir / "model.json").is_file():
        return "stale", f"its model is gone ({model_dir})"
    if model_dir not in hashes:
        try:
            hashes[model_dir] = weights_hash(load_model(model_dir)[0].denoisingUNet)
        except RigError as exc:
            hashes[model_dir] = f"unreadable: {exc}"
    if info.get("weights") != hashes[model_dir]:
        return "stale", "the model's weights changed"
    if info.get("torch") != torch.__version__:
        return "stale", f"exported with torch {info.get('torch')}"
    if missing_onnx():
        return "unknown", "onnx / onnxruntime not installed"
    import onnx
    import onnxruntime

    for package, module in (("onnx", onnx), ("onnxruntime", onnxruntime)):
        if info.get(package) != module.__version__:
            return "stale", f"exported with {package} {info.get(package)}"
    if kind == "tensorrt":
        if missing_tensorrt():
            return "unknown", "TensorRT not installed here"
        if not torch.cuda.is_available():
            return "unknown", "no CUDA GPU here"
        now = device_key()
        changed = [f"{k} {info.get(k)} -> {v}" for k, v in now.items() if info.get(k) != v]
        if changed:
            return "stale", "built for " + ", ".join(changed)
    return "current", ""


def list_artifacts(store, names: Sequence[str] | None = None) -> list[Artifact]:
    """Every exported engine of these people (default: everyone), each checked against its model."""
    found, hashes = [], {}
    for name in names or store.people():
        root = engines_dir(store, name)
        if not root.is_dir():
            continue
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            try:
                info = json.loads((folder / "engine.json").read_text())
            except (OSError, ValueError):
                info = {}
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            if not info:
                state, reason = "stale", "engine.json missing or damaged"
            else:
                model_dir = Path(info["source"]) if info.get("source") else store.model_dir(name)
                state, reason = _staleness(info, folder, model_dir, hashes)
            kind = info.get("kind", "onnx")
            found.append(Artifact(name, folder.name, kind, info.get("precision", "?"), size, state, reason, info))
    return found


def remove_artifacts(store, name: str, key: str | None = None, everything: bool = False) -> list[str]:
    """Remove one exported engine (by key) or all of a person's; the keys removed.

    Each folder is renamed out of the store in one step, then deleted, so none is left half-removed.
    """
    store.require(name)
    root = engines_dir(store, name)
    present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if everything == (key is not None):
        raise RigError("name one engine KEY or pass --all")
    if key is not None and key not in present:
        known = ", ".join(present) or "none"
        raise RigError(f"{name} has no engine {key!r} (engines: {known}); see `rig engines list`")
    removed = present if everything else [key]
    for folder_name in removed:
        trash = store.root / f".trash-engine-{name}-{uuid.uuid4().hex[:8]}"
        (root / folder_name).replace(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return removed
