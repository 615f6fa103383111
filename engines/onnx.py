"""The UNet step exported to ONNX and run with ONNX Runtime.

``export`` writes ``model.onnx`` with a dynamic batch axis (inputs x_t, t, buffers, latent; output
eps) and ``engine.json`` describing it. ``artifact`` keys the export by the weights' hash, the
precision, the opset and the library versions, so a stale file is rebuilt, never silently used.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from engines.eager import cast_unet
from rigcli import RigError
from rigcli.files import atomic_write_bytes, atomic_write_json

INPUTS = ("x_t", "t", "buffers", "latent")
DEFAULT_OPSET = 17


def missing_onnx() -> str | None:
    """What to install when the optional ONNX packages are missing (None when they are there)."""
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed: pip install 'rig[onnx]' (or onnx onnxruntime)"
    return None


def require_onnx() -> None:
    """Refuse clearly when the optional ONNX packages are missing."""
    message = missing_onnx()
    if message:
        raise RigError(message)


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


def artifact_key(unet: torch.nn.Module | str, fp16: bool, opset: int) -> dict:
    """Everything an exported file depends on (``unet`` or its weights hash); its hash names the folder."""
    import onnx
    import onnxruntime

    return {
        "weights": unet if isinstance(unet, str) else weights_hash(unet),
        "precision": "fp16" if fp16 else "fp32",
        "opset": opset,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def key_folder(root: Path, key: dict) -> Path:
    """The artifact folder of a key under ``root``: the first 16 hex digits of the key's hash."""
    return root / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def is_current(folder: Path, filename: str, key: dict) -> bool:
    """Whether ``folder`` holds ``filename`` made for exactly ``key`` (else it is rebuilt)."""
    info = folder / "engine.json"
    if not ((folder / filename).is_file() and info.is_file()):
        return False
    try:
        recorded = json.loads(info.read_text())
    except ValueError:
        return False
    return {k: recorded.get(k) for k in key} == key


def trace_device(fp16: bool) -> str:
    """Where an export traces the UNet: an fp16 one on the GPU when there is one, because torch's CPU
    fp16 convolutions take a slow fallback (the paper's UNet took 27 minutes on a 2-core CPU)."""
    return "cuda" if fp16 and torch.cuda.is_available() else "cpu"


def export(unet: torch.nn.Module, folder: Path, image_size: int, fp16: bool = False, opset: int = DEFAULT_OPSET,
           max_batch: int = 32, source: str | None = None) -> Path:  # fmt: skip
    """Export the UNet step to ``folder/model.onnx`` (written atomically) and describe it in engine.json.

    The export traces a copy of the UNet (on ``trace_device``), so the caller's module keeps its device
    and dtype.
    """

    require_onnx()
    key = artifact_key(unet, fp16, opset)
    dtype = torch.float16 if fp16 else torch.float32

    device = trace_device(fp16)
    step = _Step(cast_unet(copy.deepcopy(unet).to(device), dtype)).eval()
    args = (
        torch.randn(2, 3, image_size, image_size, dtype=dtype, device=device),
        torch.tensor([10, 500], device=device),
        torch.randn(2, unet.cfg.condition_channels, image_size, image_size, dtype=dtype, device=device),
        torch.randn(2, unet.cfg.latent_dim, dtype=dtype, device=device),
    )
    tmp = folder / "export.tmp.onnx"
    folder.mkdir(parents=True, exist_ok=True)
    try:  # the exporter writes its own file: keep it out of sight until it is whole, and never leave it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                step, args, str(tmp), input_names=list(INPUTS), output_names=["eps"], opset_version=opset,
                dynamic_axes={name: {0: "batch"} for name in (*INPUTS, "eps")}, dynamo=False,
            )  # fmt: skip
        atomic_write_bytes(folder / "model.onnx", tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_json(
        folder / "engine.json",
        {**key, "kind": "onnx", "image_size": image_size, "max_batch": max_batch, "source": source},
    )
    return folder / "model.onnx"


def artifact(unet: torch.nn.Module, root: Path, image_size: int, fp16: bool = False, opset: int = DEFAULT_OPSET,
             max_batch: int = 32, source: str | None = None) -> Path:  # fmt: skip
    """The up-to-date ONNX file for these weights and settings under ``root``, exported if missing.

    ``source`` (the model folder) is recorded so that ``rig engines list`` can tell a stale export.
    """
    require_onnx()
    key = artifact_key(unet, fp16, opset)
    folder = key_folder(root, key)
    if is_current(folder, "model.onnx", key):
        return folder / "model.onnx"
    return export(unet, folder, image_size, fp16, opset, max_batch, source)


def onnx_engine(path: Path, providers: list[str] | None = None):
    """An engine over an ONNX file: ``providers`` before the CPU one (default: the TensorRT and CUDA
    providers that are installed; ``[]``: the CPU provider alone).

    On a GPU provider with CUDA tensors the inputs and output are bound by device address.
    """
    require_onnx()
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None:
        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    wanted = [p for p in providers if p != "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), providers=[*wanted, "CPUExecutionProvider"])
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32

    on_gpu = any(p in session.get_providers() for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider"))
    torch_dtype = torch.float16 if dtype == np.float16 else torch.float32

    def bound(x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """CUDA tensors in, CUDA tensor out: ONNX Runtime reads and writes torch's memory (no host copies)."""
        device = x_t.device
        feed = {
            "x_t": x_t.to(torch_dtype).contiguous(),
            "t": t.to(device, torch.int64).contiguous(),
            "buffers": buffers.to(torch_dtype).contiguous(),
            "latent": latent.to(torch_dtype).contiguous(),
        }
        eps = torch.empty(x_t.shape, dtype=torch_dtype, device=device)
        binding = session.io_binding()
        for name, tensor in (*feed.items(), ("eps", eps)):
            kind = np.int64 if name == "t" else dtype
            bind = binding.bind_output if name == "eps" else binding.bind_input
            bind(name, "cuda", device.index or 0, kind, tuple(tensor.shape), tensor.data_ptr())
        torch.cuda.current_stream(device).synchronize()  # ONNX Runtime runs on its own stream
        session.run_with_iobinding(binding)
        return eps.to(x_t.dtype)

    def denoise(x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        if on_gpu and x_t.is_cuda:
            return bound(x_t, t, buffers, latent)
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
