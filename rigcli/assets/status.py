"""What rig needs on disk besides its own code, and whether it is there (``rig assets status``)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from rigcli.face.flame import SOURCE_NAMES, flame_status
from rigcli.face.ict import embedded_available, embedded_meta, installed, model_folder
from rigcli.image.detect import MODEL_FILES, models_dir
from rigcli.store import Store

_PURPOSE = {
    "landmarks": "68-point face landmarks (needed)",
    "cnn": "CNN face detector (--detector cnn)",
    "recognition": "128-D identity embedding (needed)",
}


@dataclass(frozen=True)
class AssetLine:
    """One row of the status table: what, whether it is ready, and a detail (path, version, hint)."""

    name: str
    ok: bool
    detail: str


def asset_status(store: Store) -> list[AssetLine]:
    """Check the store root, dlib and its model files, and torch."""
    lines = [
        AssetLine("store", store.root.is_dir(), str(store.root) + ("" if store.root.is_dir() else " (not created yet)"))
    ]
    try:
        import dlib

        lines.append(AssetLine("dlib", True, f"version {dlib.__version__}"))
    except ImportError:
        lines.append(AssetLine("dlib", False, "not installed: pip install dlib-bin"))
    folder = models_dir()
    for key, filename in MODEL_FILES.items():
        path = folder / filename if folder else None
        if path is not None and path.is_file():
            detail = f"{_PURPOSE[key]}: {path} ({path.stat().st_size / 1e6:.1f} MB)"
            lines.append(AssetLine(filename, True, detail))
        else:
            lines.append(AssetLine(filename, False, f"{_PURPOSE[key]}: missing; pip install face_recognition_models"))

    folder = model_folder(store)
    if installed(store):
        meta = json.loads((folder / "model.json").read_text())
        detail = f"{meta['model_id']}: {meta['vertices']} vertices, {meta['triangles']} triangles, in {folder}"
        lines.append(AssetLine("face model (ICT FaceKit)", True, detail))
    elif embedded_available():
        meta = embedded_meta()
        detail = (
            f"{meta['model_id']}: the compact copy in the package ({meta['vertices']} vertices); "
            "`rig assets import-ict PATH` uses a full kit instead"
        )
        lines.append(AssetLine("face model (ICT FaceKit)", True, detail))
    else:
        lines.append(
            AssetLine(
                "face model (ICT FaceKit)",
                False,
                "needed for the 3D fit: `rig assets download-ict` or `rig assets import-ict PATH`",
            )
        )
    lines += flame_lines(store)
    try:
        import torch

        cuda = "CUDA " + torch.version.cuda if torch.cuda.is_available() else "CPU only"
        lines.append(AssetLine("torch", True, f"version {torch.__version__} ({cuda})"))
    except ImportError:
        lines.append(AssetLine("torch", False, "not installed: pip install torch (see README)"))
    return lines


def flame_lines(store: Store) -> list[AssetLine]:
    """The user's FLAME/DECA files: what is imported, and what each missing one would enable."""

    lines = []
    for item in flame_status(store):
        name = f"FLAME: {SOURCE_NAMES[item.role]}" if item.role != "deca" else f"DECA: {SOURCE_NAMES['deca']}"
        if item.present:
            detail = f"{item.enables}; imported from {item.source} at {item.imported}"
        else:
            detail = f"optional, enables {item.enables}: `rig assets import-flame {item.option} FILE`"
        lines.append(AssetLine(name, item.present, detail))
    return lines
