"""A TensorRT engine built from the exported ONNX UNet step, run on torch CUDA tensors.

``build`` parses the ONNX artifact with TensorRT's ONNX parser and builds a serialized engine with
one optimization profile over the batch axis of every input (min 1, opt and max the largest batch),
in fp16 where asked. ``trt_artifact`` caches it as ``model.plan`` beside an ``engine.json`` whose key
extends the ONNX one with the GPU (name, compute capability) and the TensorRT version, so an engine
built for another GPU or library is rebuilt, never used. ``trt_engine`` runs it with the TensorRT 10
tensor API (set_input_shape, set_tensor_address, execute_async_v3) on torch's current CUDA stream,
binding the tensors' device pointers: no host copies. TensorRT is imported only when used.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

from engines.onnx import DEFAULT_OPSET, INPUTS, artifact, artifact_key, is_current, key_folder, require_onnx
from rigcli import RigError
from rigcli.files import atomic_write_bytes, atomic_write_json

INSTALL_HINT = "pip install 'rig[gpu]' on a machine with an NVIDIA GPU (or NVIDIA's wheels: pip install tensorrt)"


def missing_tensorrt() -> str | None:
    """What to install when TensorRT cannot be imported (None when it can).

    ``RIG_NO_TENSORRT=1`` makes rig behave as if it were absent (for tests and comparisons).
    """
    if os.environ.get("RIG_NO_TENSORRT") == "1":
        return f"TensorRT disabled by RIG_NO_TENSORRT=1; otherwise: {INSTALL_HINT}"
    try:
        found = importlib.util.find_spec("tensorrt") is not None
    except ValueError:  # sys.modules["tensorrt"] = None
        found = False
    if not found:
        return f"tensorrt not installed: {INSTALL_HINT}"
    return None


def require_tensorrt():
    """The tensorrt module, or a RigError saying what to install."""
    message = missing_tensorrt()
    if message is None:
        try:
            import tensorrt

            return tensorrt
        except ImportError as exc:  # installed but broken (no CUDA libraries, ...)
            message = f"tensorrt cannot be imported ({exc}): {INSTALL_HINT}"
    raise RigError(message)


def device_key() -> dict:
    """The GPU an engine is built for: TensorRT engines are specific to the GPU model and library."""
    trt = require_tensorrt()
    if not torch.cuda.is_available():
        raise RigError("TensorRT needs a CUDA GPU, and torch sees none (install torch's CUDA build)")
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "tensorrt": trt.__version__,
        "gpu": torch.cuda.get_device_name(index),
        "capability": f"{major}.{minor}",
        "cuda": torch.version.cuda,
    }


def trt_key(unet: torch.nn.Module | str, fp16: bool, max_batch: int, opset: int = DEFAULT_OPSET) -> dict:
    """Everything a TensorRT engine depends on: the ONNX export's key, the GPU, TensorRT and the profile."""
    key = artifact_key(unet, fp16, opset)
    return {**key, **device_key(), "kind": "tensorrt", "max_batch": max_batch}


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def build(
    onnx_path: Path, image_size: int, latent_dim: int, fp16: bool, max_batch: int, buffer_channels: int = 9
) -> bytes:
    """A serialized TensorRT engine for the ONNX UNet step, with a batch profile 1..max_batch."""
    trt = require_tensorrt()
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if fp16 and not hasattr(trt.BuilderFlag, "FP16") and strongly_typed is not None:
        flags = 1 << int(strongly_typed)  # newer TensorRT: precision follows the (fp16) ONNX types
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RigError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16 and hasattr(trt.BuilderFlag, "FP16"):
        config.set_flag(trt.BuilderFlag.FP16)
    shapes = {
        "x_t": (3, image_size, image_size),
        "t": (),
        "buffers": (buffer_channels, image_size, image_size),
        "latent": (latent_dim,),
    }
    profile = builder.create_optimization_profile()
    for name in INPUTS:
        rest = shapes[name]
        profile.set_shape(name, (1, *rest), (max_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RigError("TensorRT could not build an engine for the UNet (run with a smaller --max-batch?)")
    return bytes(serialized)


def trt_artifact(
    unet: torch.nn.Module,
    root: Path,
    image_size: int,
    fp16: bool = True,
    max_batch: int = 32,
    opset: int = DEFAULT_OPSET,
    source: str | None = None,
    on_build=None,
) -> Path:
    """The up-to-date ``model.plan`` for these weights, settings and this GPU under ``root``, built if
    missing or stale. ``on_build(message)`` is told before a (minutes-long) build starts."""

    require_onnx()
    trt = require_tensorrt()
    # TensorRT versions with an FP16 builder flag build fp16 from the fp32 export (keeping what needs
    # fp32 there); strongly typed ones take the precision from the ONNX file, so they get the fp16 export
    onnx_fp16 = fp16 and not hasattr(trt.BuilderFlag, "FP16")
    key = trt_key(unet, fp16, max_batch, opset)
    folder = key_folder(root, key)
    if is_current(folder, "model.plan", key):
        return folder / "model.plan"
    onnx_path = artifact(unet, root, image_size, onnx_fp16, opset, max_batch, source)
    if on_build:
        on_build(f"building a TensorRT engine ({'fp16' if fp16 else 'fp32'}, batch 1..{max_batch}) for {key['gpu']}")
    started = time.perf_counter()
    plan = build(onnx_path, image_size, unet.cfg.latent_dim, fp16, max_batch, unet.cfg.condition_channels)
    atomic_write_bytes(folder / "model.plan", plan)
    atomic_write_json(
        folder / "engine.json",
        {**key, "image_size": image_size, "onnx_artifact": onnx_path.parent.name, "source": source,
         "build_seconds": round(time.perf_counter() - started, 1)},
    )  # fmt: skip
    return folder / "model.plan"


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
    }
    for name, value in (("INT64", torch.int64), ("BF16", torch.bfloat16)):
        if hasattr(trt.DataType, name):
            table[getattr(trt.DataType, name)] = value
    if dtype not in table:
        raise RigError(f"TensorRT engine tensor of unsupported type {dtype}")
    return table[dtype]


def trt_engine(plan: Path):
    """An engine over a serialized TensorRT plan: inputs and output stay on the GPU.

    Inputs are cast to the engine's dtypes (a no-op when they match), made contiguous and bound by
    address; the output is a torch tensor TensorRT writes into. Batches larger than the profile's
    maximum run in chunks.
    """
    trt = require_tensorrt()
    if not torch.cuda.is_available():
        raise RigError("TensorRT needs a CUDA GPU, and torch sees none")
    runtime = trt.Runtime(_logger(trt))
    engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
    if engine is None:
        raise RigError(f"TensorRT could not load {plan} (built by another TensorRT or GPU? rebuild it)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    if sorted(inputs) != sorted(INPUTS) or outputs != ["eps"]:
        raise RigError(f"{plan} is not a UNet step engine (inputs {inputs}, outputs {outputs})")
    dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
    max_batch = engine.get_tensor_profile_shape("x_t", 0)[2][0]

    def run(feed: dict[str, torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.current_stream()
        bound = {n: feed[n].to(dtypes[n]).contiguous() for n in INPUTS}  # kept alive until the call ends
        for name, tensor in bound.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        eps = torch.empty(tuple(context.get_tensor_shape("eps")), dtype=dtypes["eps"], device=bound["x_t"].device)
        context.set_tensor_address("eps", eps.data_ptr())
        if not context.execute_async_v3(stream.cuda_stream):
            raise RigError("TensorRT failed to run the UNet step")
        return eps

    @torch.no_grad()
    def denoise(x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        if not x_t.is_cuda:
            raise RigError("the TensorRT engine needs CUDA tensors (--device cuda)")
        feed = {"x_t": x_t, "t": t.to(x_t.device), "buffers": buffers, "latent": latent}
        chunks = [run({n: v[i : i + max_batch] for n, v in feed.items()}) for i in range(0, x_t.shape[0], max_batch)]
        return torch.cat(chunks).to(x_t.dtype) if len(chunks) > 1 else chunks[0].to(x_t.dtype)

    denoise.max_batch = max_batch  # type: ignore[attr-defined]
    return denoise
