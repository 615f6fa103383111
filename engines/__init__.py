"""Inference runtimes for the conditioned UNet step, behind one interface.

An engine is a callable ``eps = engine(x_t, t, buffers, latent)`` on a batch of torch tensors; the
DDIM loop stays in torch (rigcli.diffusion) and calls it once per step, so the sampler does not
know which runtime serves it. ``torch`` runs the module itself (fp32, or fp16/bf16 and channels-last
on a GPU); ``onnx`` runs an exported ONNX file with ONNX Runtime (CUDA or TensorRT execution
provider where installed, the CPU one otherwise). TensorRT engines come with a GPU session.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Engine = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ENGINES = ("torch", "onnx")


def torch_engine(unet: torch.nn.Module, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> Engine:
    """The UNet itself as an engine, optionally in half precision and channels-last memory layout."""
    unet = unet.to(dtype=dtype)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def denoise(x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        x, b = x_t.to(dtype), buffers.to(dtype)
        if channels_last:
            x, b = x.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
        return unet(x, t, b, latent.to(dtype)).to(x_t.dtype)

    return denoise
