"""The UNet step exported to ONNX and run with ONNX Runtime.

``export`` writes ``model.onnx`` with a dynamic batch axis (inputs x_t, t, buffers, latent; output
eps) and ``engine.json`` describing it. ``artifact`` keys the export by the weights' hash, the
precision, the opset and the library versions, so a stale file is rebuilt, never silently used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from rigcli import RigError

INPUTS = ("x_t", "t", "buffers", "latent")
DEFAULT_OPSET = 17


def require_onnx() -> None:
    """Refuse clearly when the optional ONNX packages are missing."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise RigError(f"{' and '.join(missing)} not installed: pip install 'rig[onnx]' (or onnx onnxruntime)")


class _Step(torch.nn.Module):
    """The UNet's forward with the global latent as an input (the encoder is not exported)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_t, t, buffers, latent):
        return self.unet(x_t, t, buffers, latent)


def weights_hash(unet: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def artifact_key(unet: torch.nn.Module, fp16: bool, opset: int) -> dict:
    """Everything an exported file depends on; its hash names the artifact's folder."""
    import onnx
    import onnxruntime

    return {
        "weights": weights_hash(unet),
        "precision": "fp16" if fp16 else "fp32",
        "opset": opset,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def export(unet: torch.nn.Module, folder: Path, image_size: int, fp16: bool = False, opset: int = DEFAULT_OPSET,
           max_batch: int = 32) -> Path:  # fmt: skip
    """Export the UNet step to ``folder/model.onnx`` (written atomically) and describe it in engine.json."""
    from rigcli.store import atomic_write_bytes, atomic_write_json

    require_onnx()
    key = artifact_key(unet, fp16, opset)
    dtype = torch.float16 if fp16 else torch.float32
    step = _Step(unet).eval().to(dtype)
    args = (
        torch.randn(2, 3, image_size, image_size, dtype=dtype),
        torch.tensor([10, 500]),
        torch.randn(2, 9, image_size, image_size, dtype=dtype),
        torch.randn(2, unet.cfg.latent_dim, dtype=dtype),
    )
    tmp = folder / "export.tmp.onnx"
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            step, args, str(tmp), input_names=list(INPUTS), output_names=["eps"], opset_version=opset,
            dynamic_axes={name: {0: "batch"} for name in (*INPUTS, "eps")}, dynamo=False,
        )  # fmt: skip
    atomic_write_bytes(folder / "model.onnx", tmp.read_bytes())
    tmp.unlink()
    atomic_write_json(folder / "engine.json", {**key, "image_size": image_size, "max_batch": max_batch})
    return folder / "model.onnx"


def artifact(unet: torch.nn.Module, root: Path, image_size: int, fp16: bool = False, opset: int = DEFAULT_OPSET,
             max_batch: int = 32) -> Path:  # fmt: skip
    """The up-to-date ONNX file for these weights and settings under ``root``, exported if missing."""
    require_onnx()
    key = artifact_key(unet, fp16, opset)
    folder = root / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / "model.onnx"
    info = folder / "engine.json"
    if path.is_file() and info.is_file() and {k: json.loads(info.read_text()).get(k) for k in key} == key:
        return path
    return export(unet, folder, image_size, fp16, opset, max_batch)


def onnx_engine(path: Path, providers: list[str] | None = None):
    """An engine over an ONNX file: CUDA or TensorRT providers when installed, else the CPU one."""
    require_onnx()
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = providers or [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    session = ort.InferenceSession(str(path), providers=[*wanted, "CPUExecutionProvider"])
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32

    def denoise(x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        feed = {
            "x_t": x_t.detach().cpu().numpy().astype(dtype),
            "t": t.detach().cpu().numpy().astype(np.int64),
            "buffers": buffers.detach().cpu().numpy().astype(dtype),
            "latent": latent.detach().cpu().numpy().astype(dtype),
        }
        (eps,) = session.run(["eps"], feed)
        return torch.from_numpy(eps.astype(np.float32)).to(x_t.device, x_t.dtype)

    denoise.providers = session.get_providers()  # type: ignore[attr-defined]
    return denoise
