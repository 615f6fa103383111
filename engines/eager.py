"""The torch runtime: the UNet module itself, in fp32, fp16 or bf16, optionally channels-last,
compiled, or replayed from CUDA graphs; and the half-precision cast the exports share."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rigcli import RigError

Engine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cast_unet(unet: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``unet`` in ``dtype`` (in place), its GroupNorms' affine kept in fp32: the usual half-precision
    recipe, as under autocast. The UNet's GroupNorms compute their statistics in fp32 either way (the
    fused path reads the half-precision activation into fp32 sums; the unfused one copies it to fp32)."""
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
    fused: bool = True,
    compile_cache: Path | None = None,
    on_status: Callable[[str], None] | None = None,
    fallback: bool = False,
) -> Engine:
    """The UNet itself as an engine: half precision, channels-last, ``torch.compile`` and CUDA graphs
    are optional. With CUDA graphs, the first call at each input shape captures a graph (after a
    warm-up on a side stream) and later calls at that shape replay it on static buffers.

    ``fused`` chooses the UNet's fused elementwise passes (the default) or its separate ones (see
    UNet.set_fused). With ``compile``, each new input shape is compiled on its first call (about a
    minute for the paper UNet on a GPU), which ``on_status`` hears about before and after; inductor
    keeps what it compiled under ``compile_cache`` (TORCHINDUCTOR_CACHE_DIR, set for this process
    when given), so a later run at the same shape loads it instead. With ``fallback``, a compilation
    that fails is said (``on_status``) and the eager module serves from then on; without, it raises."""
    if hasattr(unet, "set_fused"):
        unet.set_fused(fused)
    unet = cast_unet(unet, dtype).eval()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    if cuda_graphs and next(unet.parameters()).device.type != "cuda":
        raise RigError("CUDA graphs need the model on a CUDA GPU (--device cuda)")
    forward = compiling(unet, compile_cache, on_status or (lambda text: None), fallback) if compile else unet

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


def compiling(
    unet: torch.nn.Module, cache: Path | None, on_status: Callable[[str], None], fallback: bool
) -> Callable[..., torch.Tensor]:
    """``torch.compile(unet)`` (static shapes: one specialised graph per input shape), saying when a
    shape compiles and how long it took; with ``fallback`` a failed compilation leaves the eager module."""
    if cache is not None:  # inductor reads it when it compiles: its FX-graph and kernel caches go there
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    compiled = torch.compile(unet, dynamic=False)
    seen: set[tuple] = set()
    state = {"forward": compiled}

    def forward(x: torch.Tensor, t: torch.Tensor, b: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        shape = (tuple(x.shape), tuple(b.shape), x.dtype, x.device.type)
        if shape in seen or state["forward"] is not compiled:
            return state["forward"](x, t, b, z)
        where = f", then cached in {cache}" if cache is not None else ""
        on_status(f"compiling the UNet for batch {x.shape[0]} (torch.compile; a minute or more the first time{where})")
        started = time.perf_counter()
        try:
            out = compiled(x, t, b, z)
        except Exception as exc:  # inductor's errors have no common type; KeyboardInterrupt is not one
            if not fallback:
                raise
            on_status(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); running the UNet eager")
            state["forward"] = unet
            return unet(x, t, b, z)
        seen.add(shape)
        on_status(f"compiled the UNet for batch {x.shape[0]} in {time.perf_counter() - started:.0f} s")
        return out

    return forward
