"""Training pairs: photos with the buffers their fits render (one person, or a folder of many)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save

from rigcli import RigError
from rigcli.enroll import read_fit
from rigcli.estimate import LandmarkEstimator
from rigcli.face.flame import flame_texture_id
from rigcli.face.params import fit_from_json, rescale_fit
from rigcli.face.registry import face_model_name, load_face_model
from rigcli.files import atomic_write_bytes, atomic_write_json
from rigcli.image.align import align_face, apply_affine, invert_affine
from rigcli.image.detect import MIN_FACE_PX, FaceAnalyzer
from rigcli.image.photo import IMAGE_EXTENSIONS, PhotoError, read_photo
from rigcli.render.buffers import render_buffers

RENDER_VERSION = 1  # bump when the buffers a fit renders to change


@dataclass
class TrainingData:
    """Clean images in [-1, 1] (N, 3, S, S) and their buffers (N, 9, S, S)."""

    images: torch.Tensor
    buffers: torch.Tensor
    data_hash: str
    face_model_id: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def person_data(store, name: str, size: int, exclude: Sequence[str] = ()) -> TrainingData:
    """A person's training photos (crop + buffers at ``size``), rendered once and cached; photos
    whose ids are in ``exclude`` (held out for evaluation) are left out.

    The cache key covers the fit, the face model, the renderer and, for a DECA fit, the texture space
    its albedo comes from, so a refit, a new face model or a texture import makes a new cache.
    """
    fit_doc = read_fit(store, name)
    if fit_doc is None:
        raise RigError(
            f"{name} has no 3D fit: install a face model (`rig assets download-ict`), then `rig refit {name}`"
        )
    manifest = store.load(name)
    records = [r for r in manifest.photos if r.train and r.id in fit_doc["photos"] and r.id not in exclude]
    if not records:
        raise RigError(f"{name} has no photos usable for training")
    parts = [fit_doc["model_id"], fit_doc["fitted"], [r.id for r in records], size, RENDER_VERSION]
    if any("texture_code" in p for p in fit_doc["photos"].values()):  # a DECA fit: albedo from the texture space
        parts.append(flame_texture_id(store))
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    cache = store.person_dir(name) / "cache" / f"train-{size}-{key}.safetensors"
    if cache.is_file():
        tensors = load_file(cache)
        return TrainingData(tensors["images"], tensors["buffers"], key, fit_doc["model_id"])
    images, buffers = render_training_pairs(store, name, records, fit_doc, size)
    for old in cache.parent.glob(f"train-{size}-*.safetensors"):
        old.unlink()
    atomic_write_bytes(cache, save({"images": images.contiguous(), "buffers": buffers.contiguous()}))
    return TrainingData(images, buffers, key, fit_doc["model_id"])


def render_training_pairs(store, name: str, records, fit_doc: dict, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops resized to ``size`` in [-1, 1], and the fit's buffers rendered at ``size``."""
    model = load_face_model(store, face_model_name(fit_doc))
    if model.model_id != fit_doc["model_id"]:
        raise RigError(f"{name} was fitted with another face model: run `rig refit {name}`")
    fit = fit_from_json([fit_doc["photos"][r.id] for r in records], fit_doc["identity"], model.expression_names)
    fit = rescale_fit(fit, fit_doc["crop_size"], size)
    buffers = render_buffers(model, fit, size)
    crops = []
    for record in records:
        crop = read_photo(store.person_dir(name) / record.aligned).pixels
        if crop.shape[0] != size:
            crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BOX))
        crops.append(crop)
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, buffers


def prepare_folder(
    store, data_dir: Path, cache_dir: Path, size: int, detector: str = "hog", chunk: int = 32, progress=None
) -> tuple[TrainingData, dict[str, int]]:
    """Detect, align and fit every face photo under ``data_dir`` into training pairs, in chunks.

    Resumable: finished chunks are kept (``chunk-NNNNN.safetensors``) and ``index.json`` records
    each file's outcome, so a rerun only processes what is new. Returns the data and the counts per
    outcome ("used", "no face", "unreadable", ...).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise RigError(f"{data_dir} is not a folder of photos")
    files = sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise RigError(f"{data_dir} holds no images")
    model = load_face_model(store)
    index_path = cache_dir / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"files": {}, "chunks": []}
    if index.get("face_model_id", model.model_id) != model.model_id or index.get("size", size) != size:
        raise RigError(f"{cache_dir} was prepared with another face model or size; use another --out")
    index.update(face_model_id=model.model_id, size=size)
    todo = [p for p in files if p.relative_to(data_dir).as_posix() not in index["files"]]
    analyzer = FaceAnalyzer(detector)
    for start in range(0, len(todo), chunk):
        outcomes, crops, landmarks = {}, [], []
        for path in todo[start : start + chunk]:
            rel = path.relative_to(data_dir).as_posix()
            try:
                rgb = read_photo(path).pixels
            except PhotoError as exc:
                outcomes[rel] = exc.reason
                continue
            face = analyzer.find_face(rgb)
            if face is None or face.box.width < MIN_FACE_PX:
                outcomes[rel] = "no face" if face is None else "too small"
                continue
            aligned = align_face(rgb, face.landmarks, 256)
            crops.append(aligned.crop)
            landmarks.append(apply_affine(invert_affine(aligned.crop_to_photo), face.landmarks))
            outcomes[rel] = "used"
        if crops:
            fit = LandmarkEstimator().fit(model, np.stack(crops), np.stack(landmarks), shared_identity=False)
            pixels = torch.from_numpy(np.stack(crops)).float() / 255.0
            small = rescale_fit(fit, 256, size)
            chunk_buffers = render_buffers(model, small, size)
            chunk_images = (
                torch.nn.functional.interpolate(pixels.permute(0, 3, 1, 2), size=(size, size), mode="area") * 2 - 1
            )
            name = f"chunk-{len(index['chunks']):05d}.safetensors"
            atomic_write_bytes(cache_dir / name, save({"images": chunk_images.contiguous(), "buffers": chunk_buffers}))
            index["chunks"].append(name)
        index["files"].update(outcomes)
        atomic_write_json(index_path, index)  # after the chunk: a kill redoes at most one chunk
        if progress:
            progress(min(start + chunk, len(todo)), len(todo))
    if not index["chunks"]:
        raise RigError(f"no usable face photos in {data_dir}")
    parts = [load_file(cache_dir / name) for name in index["chunks"]]
    counts: dict[str, int] = {}
    for outcome in index["files"].values():
        counts[outcome] = counts.get(outcome, 0) + 1
    digest = hashlib.sha256(json.dumps([index["chunks"], sorted(index["files"].items())]).encode()).hexdigest()[:16]
    data = TrainingData(
        torch.cat([p["images"] for p in parts]), torch.cat([p["buffers"] for p in parts]), digest, model.model_id
    )
    return data, counts
