"""Inference runtimes for the conditioned UNet step, behind one interface.

An engine is a callable ``eps = engine(x_t, t, buffers, latent)`` on a batch of torch tensors; the
DDIM loop stays in torch (rigcli.diffusion.schedule) and calls it once per step, so the sampler does not
know which runtime serves it.

- ``torch``: the module itself, fp32 or fp16/bf16, optionally channels-last, ``torch.compile`` and
  CUDA graphs (one graph captured per input shape);
- ``onnx``: the exported ONNX file in ONNX Runtime (CUDA or TensorRT execution provider where
  installed, the CPU one otherwise), see engines.onnx;
- ``trt``: a TensorRT engine built from that ONNX file, run on torch CUDA tensors, see engines.tensorrt.

An engine is named by a spec, ``KIND[-OPTION...]``: ``torch-fp16-cl-graphs``, ``onnx``, ``trt-fp32``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engines.eager import DTYPES, Engine, cast_unet, torch_engine
from engines.onnx import artifact, missing_onnx, onnx_engine
from engines.tensorrt import missing_tensorrt, trt_artifact, trt_engine
from rigcli import RigError

__all__ = ["DTYPES", "ENGINES", "Engine", "EngineSpec", "cast_unet", "make_engine", "torch_engine"]

ENGINES = ("torch", "onnx", "trt")
OPTIONS = {  # kind -> the options its spec may carry
    "torch": ("fp32", "fp16", "bf16", "cl", "compile", "graphs"),
    "onnx": ("fp32", "fp16"),
    "trt": ("fp32", "fp16"),
}


@dataclass(frozen=True)
class EngineSpec:
    """A parsed engine name: runtime, precision and the torch-only switches."""

    kind: str
    precision: str
    channels_last: bool = False
    compile: bool = False
    cuda_graphs: bool = False

    @classmethod
    def parse(cls, text: str) -> EngineSpec:
        kind, *options = text.strip().lower().split("-")
        if kind not in OPTIONS:
            raise RigError(f"unknown engine {text!r}; choose one of: {', '.join(ENGINES)} (e.g. torch-fp16, trt)")
        bad = [o for o in options if o not in OPTIONS[kind]]
        if bad:
            raise RigError(f"engine {text!r}: {kind} takes options {', '.join(OPTIONS[kind])}, not {', '.join(bad)}")
        precisions = [o for o in options if o in DTYPES]
        if len(precisions) > 1:
            raise RigError(f"engine {text!r}: one precision at most")
        default = "fp16" if kind == "trt" else "fp32"
        return cls(
            kind, precisions[0] if precisions else default, "cl" in options, "compile" in options, "graphs" in options
        )

    def unavailable(self, device: str | torch.device) -> str | None:
        """Why this engine cannot run on ``device`` here (None when it can)."""
        cuda = torch.device(device).type == "cuda"
        if cuda and not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        if self.kind == "torch":
            if self.precision == "fp16" and not cuda:  # measured: 60x slower than fp32 on a 2-core EPYC
                return (
                    "fp16 needs a CUDA GPU (torch's CPU convolutions in fp16 take a slow fallback); "
                    "on a CPU use onnx-fp16 or torch-bf16"
                )
            if self.cuda_graphs and not cuda:
                return "CUDA graphs need a CUDA GPU (--device cuda)"
        if self.kind in ("onnx", "trt"):
            if missing_onnx():
                return missing_onnx()
        if self.kind == "trt":
            if missing_tensorrt():
                return missing_tensorrt()
            if not cuda:
                return "TensorRT needs a CUDA GPU (--device cuda)"
        return None


def make_engine(
    spec: str | EngineSpec,
    unet: torch.nn.Module,
    root: Path,
    image_size: int,
    device: str | torch.device = "cpu",
    max_batch: int = 32,
    source: str | None = None,
) -> Engine:
    """The engine a spec names, for ``unet`` (on ``device``); exported artifacts go under ``root``.

    ONNX and TensorRT artifacts are keyed by the weights and settings (see engines.onnx), so a
    stale one is rebuilt. Raises RigError, saying why, when the engine cannot run here.
    """
    spec = EngineSpec.parse(spec) if isinstance(spec, str) else spec
    reason = spec.unavailable(device)
    if reason:
        raise RigError(f"engine {spec.kind} ({spec.precision}) cannot run here: {reason}")
    if spec.kind == "torch":
        return torch_engine(unet.to(device), DTYPES[spec.precision], spec.channels_last, spec.compile, spec.cuda_graphs)
    if spec.kind == "onnx":
        fp16 = spec.precision == "fp16"
        path = artifact(unet, root, image_size, fp16, max_batch=max_batch, source=source)
        return onnx_engine(path, providers=[] if torch.device(device).type == "cpu" else None)  # CPU: CPU provider
    return trt_engine(trt_artifact(unet, root, image_size, spec.precision == "fp16", max_batch, source=source))
