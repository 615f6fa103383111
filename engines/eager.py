"""The torch runtime: the UNet module itself, in fp32, fp16 or bf16, optionally channels-last,
compiled, or replayed from CUDA graphs; and the half-precision cast the exports share."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rigcli import RigError

Engine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
