"""The store's registry of base models: register a trained model, import the paper's released
checkpoint (a plain torch state dict, read with ``weights_only``) and export a model back to it."""

from __future__ import annotations

import io
import json
import shutil
import uuid
from pathlib import Path

import torch

from rigcli import RigError
from rigcli.diffusion.checkpoints import (
    PAPER_FACE_MODEL_ID,
    check_layout,
    load_model,
    read_torch_state_dict,
    save_model,
)
from rigcli.diffusion.unet import DiffusionRig, paper_arguments, preset
from rigcli.files import atomic_write_bytes, atomic_write_json, file_sha256, now_iso
from rigcli.store import check_name, registered_models, registry_dir


def register_model(store, name: str, source: Path) -> dict:
    """Copy a saved model (a folder with model.safetensors + model.json) into the registry as ``name``."""

    check_name(name)
    source = Path(source)
    model, info = load_model(source)  # validates the files before anything is copied
    del model
    target = registry_dir(store) / name
    if target.exists():
        raise RigError(f"a model named {name!r} is already registered; remove it or pick another name")
    store.ensure_writable()
    atomic_write_bytes(target / "model.safetensors", (source / "model.safetensors").read_bytes())
    atomic_write_json(target / "model.json", info)
    return info


def import_diffusionrig(store, path: Path, name: str, preset_name: str = "paper", force: bool = False) -> dict:
    """Register the paper's checkpoint (a plain state dict: ``denoisingUNet.*``, ``encoder.*``) as base ``name``.

    Read with ``weights_only``; strict: every tensor of the preset's network must be there with its
    shape, and nothing else. Floating tensors are stored as float32. Returns the model.json written.
    """

    check_name(name)
    cfg = preset(preset_name)
    target = registry_dir(store) / name
    if target.exists() and not force:
        raise RigError(f"a model named {name!r} is already registered; pass --force to replace it")
    path = Path(path)
    tensors = read_torch_state_dict(path)
    with torch.device("meta"):
        model = DiffusionRig(cfg)
    expected = model.state_dict()
    check_layout(tensors, expected, f"{path} does not match the paper's layout for preset {preset_name}")
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values()})
    model.load_state_dict(
        {k: tensors[k].to(want.dtype).contiguous() for k, want in expected.items()}, strict=True, assign=True
    )
    info = {
        "source": "diffusionrig",
        "source_file": path.name,
        "source_sha256": file_sha256(path),
        "source_dtypes": dtypes,
        "preset": preset_name,
        "face_model": "flame",
        "face_model_id": PAPER_FACE_MODEL_ID,
        "imported": now_iso(),
    }
    store.ensure_writable()
    # build the entry beside the registry and swap it in, so a failure leaves the old entry whole
    staging = registry_dir(store) / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        save_model(staging, model, info)
        if target.exists():
            trash = registry_dir(store) / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            target.rename(trash)
            staging.rename(target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return json.loads((target / "model.json").read_text())


def export_diffusionrig(
    store, out_path: Path, *, model_name: str | None = None, person: str | None = None, force: bool = False
) -> dict:
    """Write a registered base model or a person's fine-tuned model as the paper's plain state dict.

    The file loads in the paper's code with ``model.load_state_dict(th.load(path))`` once its network
    is built with the flags returned under ``arguments`` (none beyond the defaults for ``paper``).
    """

    if (model_name is None) == (person is None):
        raise RigError("give exactly one of --model NAME (a registered base model) or --person NAME")
    if model_name is not None:
        check_name(model_name)
        folder = registry_dir(store) / model_name
        if not (folder / "model.json").is_file():
            models = ", ".join(registered_models(store)) or "none"
            raise RigError(f"no base model named {model_name!r} (registered: {models})")
    else:
        folder = store.require_model(person)
    out_path = Path(out_path)
    if out_path.exists() and not force:
        raise RigError(f"{out_path} exists; pass --force to overwrite it")
    model, info = load_model(folder)
    arguments = paper_arguments(model.cfg)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)  # what the paper's trainer saves: the model's state_dict()
    atomic_write_bytes(out_path, buffer.getvalue())
    return {
        "path": str(out_path),
        "tensors": len(model.state_dict()),
        "arguments": arguments,
        "face_model_id": info.get("face_model_id"),
        "flame_buffers": str(info.get("face_model_id", "")).startswith("flame"),
    }
