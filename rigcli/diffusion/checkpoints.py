"""Saved models (safetensors + model.json), their sizes and costs, the paper's checkpoint layout, and the
rule of which buffers a base model was trained on."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load, save

from rigcli import RigError
from rigcli.diffusion.unet import DiffusionRig, ModelConfig, count_parameters
from rigcli.files import atomic_write_bytes, atomic_write_json, now_iso


def save_model(folder: Path, model: DiffusionRig, info: dict) -> None:
    """A trained model: ``model.safetensors`` (weights) and ``model.json`` (config and provenance)."""
    blob = save({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    atomic_write_bytes(folder / "model.safetensors", blob)
    atomic_write_json(
        folder / "model.json",
        {**info, "config": model.cfg.to_json(), "sha256": hashlib.sha256(blob).hexdigest(), "saved": now_iso()},
    )


def load_model(folder: Path, device: str = "cpu") -> tuple[DiffusionRig, dict]:
    """A saved model and its JSON (refusing a damaged or mismatched weights file)."""
    meta_path = folder / "model.json"
    if not meta_path.is_file():
        raise RigError(f"no model in {folder} (model.json missing)")
    info = json.loads(meta_path.read_text())
    blob = (folder / "model.safetensors").read_bytes()
    if hashlib.sha256(blob).hexdigest() != info.get("sha256"):
        raise RigError(f"the model weights in {folder} are damaged (hash mismatch)")
    model = DiffusionRig(ModelConfig.from_json(info["config"]))
    model.load_state_dict(load(blob))
    return model.to(device).eval(), info


def model_info(cfg: ModelConfig, batch: int = 1) -> dict:
    """Parameters, FLOPs of one UNet call and training memory at ``batch``, counted on the meta device.

    Memory is what a training step holds: fp32 weights, gradients and Adam's two moments, plus every
    activation autograd saves for the backward pass (recorded by a saved-tensor hook).
    """
    from torch.utils.flop_counter import FlopCounterMode

    size = cfg.image_size
    with torch.device("meta"):
        model = DiffusionRig(cfg)
        x = torch.randn(batch, 3, size, size)
        args = (
            x,
            torch.zeros(batch, dtype=torch.long),
            torch.randn(batch, cfg.condition_channels, size, size),
            torch.randn(batch, cfg.latent_dim),
        )
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
        ):
            model(*args).sum()
    unet = count_parameters(model.denoisingUNet)
    encoder = count_parameters(model.encoder)
    return {
        "unet_parameters": unet,
        "encoder_parameters": encoder,
        "unet_gflops_per_call": counter.get_total_flops() / 1e9 / batch,
        "batch": batch,
        "weights_mb": (unet + encoder) * 4 / 2**20,
        "training_state_mb": unet * 4 * 4 / 2**20,  # UNet weights, grads, Adam m and v (stage 2)
        "activations_mb": sum(saved) / 2**20,
    }


PAPER_FACE_MODEL_ID = "flame2020-deca"
"""What the paper's released models were trained on: FLAME 2020 fitted and rendered by DECA."""


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "ema", "net")  # where trainers nest a state dict


_KEY_PREFIXES = ("module.", "model.")  # DistributedDataParallel, Lightning


def read_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a foreign PyTorch checkpoint, read with ``weights_only`` (no code in it runs).

    Unwraps what trainers put around a state dict: ``{'state_dict': ...}``, ``{'model': ...}``,
    ``{'ema': ...}`` and key prefixes ``module.`` (DistributedDataParallel) or ``model.`` (Lightning).
    """

    path = Path(path)
    if not path.is_file():
        raise RigError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch's zip format, or its legacy pickle
        raise RigError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise RigError(f"{path} is not a readable PyTorch checkpoint ({exc})") from None
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise RigError(
            f"refused {path}: it holds objects other than tensors{what}, which loading would have to run as code"
        ) from None
    except Exception as exc:  # a zip that is not torch's, a truncated file, text, ...
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        raise RigError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {first})") from None
    for _ in range(3):
        if not isinstance(obj, dict) or all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise RigError(f"{path} holds no state dict (a dict of named tensors) but {type(obj).__name__}")
    odd = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise RigError(f"{path}: {len(odd)} entries of its state dict are not named tensors: {', '.join(odd[:5])}")
    tensors = dict(obj)
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def _listed(names: list[str], shown: int = 3) -> str:
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_layout(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """RigError naming the missing, unexpected, wrongly shaped and wrongly typed entries, if any."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes, kinds = [], []
    for k, want in expected.items():
        got = tensors.get(k)
        if got is None:
            continue
        if tuple(got.shape) != tuple(want.shape):
            shapes.append(f"{k} {list(got.shape)} (expected {list(want.shape)})")
        elif got.is_floating_point() != want.is_floating_point() or got.is_complex():
            kinds.append(
                f"{k} {str(got.dtype).removeprefix('torch.')} (expected {str(want.dtype).removeprefix('torch.')})"
            )
    parts = [
        f"{len(found)} {label} ({_listed(found)})"
        for label, found in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", shapes),
            ("wrong type", kinds),
        )
        if found
    ]
    if parts:
        raise RigError(f"{what}: " + "; ".join(parts))


def check_base_buffers(base: str, base_info: dict, person: str, face_model_id: str) -> None:
    """Refuse a base model trained on buffers of another face model than the person's fit.

    The paper's released models (registered by ``import_diffusionrig``) saw FLAME 2020 buffers
    rendered by DECA; any FLAME fit here renders those buffers, whatever its files' hash.
    """
    base_id = base_info.get("face_model_id")
    if base_id == face_model_id:
        return
    if base_id == PAPER_FACE_MODEL_ID:
        if face_model_id.startswith("flame"):
            return
        raise RigError(
            f"base model {base!r} is the paper's, trained on FLAME buffers (rendered by DECA), but {person} is "
            f"fitted with {face_model_id}: fit {person} with FLAME first (`rig refit {person} --face-model flame`, "
            "see 'Using FLAME' in the README)"
        )
    raise RigError(
        f"base model {base!r} was trained on buffers of face model {base_id}, but "
        f"{person} is fitted with {face_model_id}: the buffers would not match"
    )
