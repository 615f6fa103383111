"""Inference runtimes for the conditioned UNet step, behind one interface.

An engine is a callable ``eps = engine(x_t, t, buffers, latent)`` on a batch of torch tensors; the
DDIM loop stays in torch (rigcli.diffusion) and calls it once per step, so the sampler does not
know which runtime serves it.

- ``torch``: the module itself, fp32 or fp16/bf16, optionally channels-last, ``torch.compile`` and
  CUDA graphs (one graph captured per input shape);
- ``onnx``: the exported ONNX file in ONNX Runtime (CUDA or TensorRT execution provider where
  installed, the CPU one otherwise), see engines.onnx;
- ``trt``: a TensorRT engine built from that ONNX file, run on torch CUDA tensors, see engines.tensorrt.

An engine is named by a spec, ``KIND[-OPTION...]``: ``torch-fp16-cl-graphs``, ``onnx``, ``trt-fp32``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rigcli import RigError

Engine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ENGINES = ("torch", "onnx", "trt")
OPTIONS = {  # kind -> the options its spec may carry
    "torch": ("fp32", "fp16", "bf16", "cl", "compile", "graphs"),
    "onnx": ("fp32", "fp16"),
    "trt": ("fp32", "fp16"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
            from engines.onnx import missing_onnx

            if missing_onnx():
                return missing_onnx()
        if self.kind == "trt":
            from engines.tensorrt import missing_tensorrt

            if missing_tensorrt():
                return missing_tensorrt()
            if not cuda:
                return "TensorRT needs a CUDA GPU (--device cuda)"
        return None


def cast_unet(unet: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``unet`` in ``dtype`` (in place), its GroupNorms kept in fp32 as the UNet computes them (GroupNorm32
    normalizes in fp32 and casts back): the usual half-precision recipe, as under autocast."""
    unet.to(dtype)
    if dtype != torch.float32:
        for module in unet.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.float()
    return unet


def torch_engine(
    unet: torch.nn.Module,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> Engine:
    """The UNet itself as an engine: half precision, channels-last, ``torch.compile`` and CUDA graphs
    are optional. With CUDA graphs, the first call at each input shape captures a graph (after a
    warm-up on a side stream) and later calls at that shape replay it on static buffers."""
    unet = cast_unet(unet, dtype).eval()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if cuda_graphs and next(unet.parameters()).device.type != "cuda":
        raise RigError("CUDA graphs need the model on a CUDA GPU (--device cuda)")
    forward = torch.compile(unet, dynamic=False) if compile else unet

    def prepare(x_t, buffers, latent):
        x, b = x_t.to(dtype), buffers.to(dtype)
        if channels_last:
            x, b = x.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
        return x, b, latent.to(dtype)

    @torch.no_grad()
    def eager(x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        x, b, z = prepare(x_t, buffers, latent)
        return forward(x, t, b, z).to(x_t.dtype)

    if not cuda_graphs:
        return eager
    graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}

    @torch.no_grad()
    def replay(x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        if not x_t.is_cuda:
            raise RigError("CUDA graphs need CUDA inputs (--device cuda)")
        shape = (tuple(x_t.shape), tuple(buffers.shape), tuple(latent.shape), x_t.dtype)
        if shape not in graphs:
            static = tuple(a.clone() for a in (x_t, t, buffers, latent))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up: cuDNN picks its kernels and compile settles before capture
                    eager(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                result = eager(*static)
            graphs[shape] = (graph, static, result)
        graph, static, result = graphs[shape]
        for target, value in zip(static, (x_t, t, buffers, latent), strict=True):
            target.copy_(value)
        graph.replay()
        return result.clone()

    return replay


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
        from engines.onnx import artifact, onnx_engine

        fp16 = spec.precision == "fp16"
        path = artifact(unet, root, image_size, fp16, max_batch=max_batch, source=source)
        return onnx_engine(path, providers=[] if torch.device(device).type == "cpu" else None)  # CPU: CPU provider
    from engines.tensorrt import trt_artifact, trt_engine

    return trt_engine(trt_artifact(unet, root, image_size, spec.precision == "fp16", max_batch, source=source))


# ---------------------------------------------------------------- artifacts in the store


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
    from engines.onnx import missing_onnx

    kind = info.get("kind", "onnx")
    filename = "model.plan" if kind == "tensorrt" else "model.onnx"
    if not (folder / filename).is_file():
        return "stale", f"{filename} missing"
    if not (model_dir / "model.json").is_file():
        return "stale", f"its model is gone ({model_dir})"
    if model_dir not in hashes:
        from engines.onnx import weights_hash
        from rigcli.train import load_model

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
        from engines.tensorrt import device_key, missing_tensorrt

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
    import json

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
                model_dir = Path(info["source"]) if info.get("source") else store.person_dir(name) / "model"
                state, reason = _staleness(info, folder, model_dir, hashes)
            kind = info.get("kind", "onnx")
            found.append(Artifact(name, folder.name, kind, info.get("precision", "?"), size, state, reason, info))
    return found


def remove_artifacts(store, name: str, key: str | None = None, everything: bool = False) -> list[str]:
    """Remove one exported engine (by key) or all of a person's; the keys removed.

    Each folder is renamed out of the store in one step, then deleted, so none is left half-removed.
    """
    import shutil
    import uuid

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
