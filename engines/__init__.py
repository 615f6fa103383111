"""Inference runtimes for the conditioned UNet step, behind one interface.

An engine is a callable ``eps = engine(x_t, t, buffers, latent)`` on a batch of torch tensors; the
DDIM loop stays in torch (rigcli.diffusion.schedule) and calls it once per step, so the sampler does not
know which runtime serves it.

- ``torch``: the module itself, fp32 or fp16/bf16, optionally channels-last, ``torch.compile`` (its
  compiled code cached on disk, see engines.eager) and CUDA graphs (one graph captured per input
  shape); ``unfused`` runs the UNet's separate elementwise passes instead of the fused ones (to measure
  the fusion against);
- ``onnx``: the exported ONNX file in ONNX Runtime (CUDA or TensorRT execution provider where
  installed, the CPU one otherwise), see engines.onnx;
- ``trt``: a TensorRT engine built from that ONNX file, run on torch CUDA tensors, see engines.tensorrt.

An engine is named by a spec, ``KIND[-OPTION...]``: ``torch-fp16-cl-graphs``, ``onnx``, ``trt-fp32``;
``auto`` is the default for the device (``default_engine``): on CUDA the compiled bf16 channels-last
UNet, which falls back to eager if compiling fails; on a CPU the eager fp32 UNet.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.eager import DTYPES, Engine, cast_unet, torch_engine
from engines.onnx import artifact, missing_onnx, onnx_engine
from engines.tensorrt import missing_tensorrt, trt_artifact, trt_engine
from rigcli import RigError

__all__ = [
    "AUTO",
    "DTYPES",
    "ENGINES",
    "Engine",
    "EngineSpec",
    "cast_unet",
    "default_engine",
    "make_engine",
    "resolve_engine",
    "torch_engine",
]

ENGINES = ("torch", "onnx", "trt")
AUTO = "auto"
OPTIONS = {  # kind -> the options its spec may carry
    "torch": ("fp32", "fp16", "bf16", "cl", "compile", "graphs", "unfused"),
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
    unfused: bool = False

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
            kind,
            precisions[0] if precisions else default,
            "cl" in options,
            "compile" in options,
            "graphs" in options,
            "unfused" in options,
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
            if self.compile:
                reason = missing_compiler(cuda)
                if reason:
                    return reason
        if self.kind in ("onnx", "trt"):
            if missing_onnx():
                return missing_onnx()
        if self.kind == "trt":
            if missing_tensorrt():
                return missing_tensorrt()
            if not cuda:
                return "TensorRT needs a CUDA GPU (--device cuda)"
        return None


def missing_compiler(cuda: bool) -> str | None:
    """Why torch.compile's inductor cannot generate code here (None when it can): it writes Triton
    kernels on a GPU and C++ on a CPU, which it builds with the system's compiler."""
    if cuda:
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on a GPU needs Triton (it ships with torch's CUDA wheels)"
        return None
    if not any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return "torch.compile on a CPU needs a C++ compiler (g++ or clang++) to build its kernels"
    return None


def default_engine(device: str | torch.device) -> str:
    """What ``auto`` means on ``device``: on CUDA the compiled bf16 channels-last UNet (issue 28's
    measurement on an H200: 66.8 ms per paper-UNet call at batch 32 against 188 ms for the best eager
    row); on a CPU the eager fp32 UNet (compiled, the tiny preset ran no faster on the 2-core CPU
    machine, 27.8 against 26.9 ms per call, after a 49 s first compile: benchmarks/RESULTS.md, issue 28)."""
    return "torch-bf16-cl-compile" if torch.device(device).type == "cuda" else "torch"


def resolve_engine(spec: str, device: str | torch.device) -> str:
    """``spec`` itself, or for ``auto`` the device's default engine."""
    return default_engine(device) if spec.strip().lower() == AUTO else spec


def make_engine(
    spec: str | EngineSpec,
    unet: torch.nn.Module,
    root: Path,
    image_size: int,
    device: str | torch.device = "cpu",
    max_batch: int = 32,
    source: str | None = None,
    compile_cache: Path | None = None,
    on_status: Callable[[str], None] | None = None,
) -> Engine:
    """The engine a spec names, for ``unet`` (on ``device``); exported artifacts go under ``root``,
    torch.compile's code under ``compile_cache`` (see torch_engine); ``on_status`` hears what takes
    long (a compilation) while it happens.

    ONNX and TensorRT artifacts are keyed by the weights and settings (see engines.onnx), so a
    stale one is rebuilt. ``auto`` is the device's default engine (``default_engine``); when it is a
    compiled one and compiling fails, it runs eager instead and says so. Raises RigError, saying why,
    when the engine cannot run here.
    """
    fallback = isinstance(spec, str) and spec.strip().lower() == AUTO
    if fallback:
        spec = EngineSpec.parse(default_engine(device))
        if spec.compile and spec.unavailable(device):  # no compiler here: the same engine, eager
            spec = EngineSpec(spec.kind, spec.precision, spec.channels_last, False, spec.cuda_graphs, spec.unfused)
    spec = EngineSpec.parse(spec) if isinstance(spec, str) else spec
    reason = spec.unavailable(device)
    if reason:
        raise RigError(f"engine {spec.kind} ({spec.precision}) cannot run here: {reason}")
    if spec.kind == "torch":
        return torch_engine(
            unet.to(device), DTYPES[spec.precision], spec.channels_last, spec.compile, spec.cuda_graphs,
            fused=not spec.unfused, compile_cache=compile_cache, on_status=on_status, fallback=fallback,
        )  # fmt: skip
    if spec.kind == "onnx":
        fp16 = spec.precision == "fp16"
        path = artifact(unet, root, image_size, fp16, max_batch=max_batch, source=source)
        return onnx_engine(path, providers=[] if torch.device(device).type == "cpu" else None)  # CPU: CPU provider
    return trt_engine(trt_artifact(unet, root, image_size, spec.precision == "fp16", max_batch, source=source))
