"""Gaussian diffusion as DiffusionRig trains and samples it.

- ``Diffusion`` holds the schedule (1000 steps, linear betas 1e-4 to 0.02) and every formula on it:
  forward noising, the x0 estimate, P2-weighted epsilon loss (w = 1 / (k + snr)^gamma, k = gamma = 1).
- ``ddim_timesteps`` picks the respaced steps (the paper sampled with 20).
- ``ddim_sample`` and ``ddim_invert`` are plain functions over any ``eps(x, t)`` callable (a torch
  module, an ONNX session, a TensorRT engine: the sampler does not care), with eta = 0. Inversion
  runs the same deterministic update forward in t. ``callback(i, n)`` follows progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # eps = f(x_t, t)


STEPS = 1000


@dataclass
class Diffusion:
    """The noise schedule and its formulas (float64 tables, cast on use)."""

    steps: int = STEPS
    beta_start: float = 1e-4
    beta_end: float = 0.02
    p2_k: float = 1.0
    p2_gamma: float = 1.0

    def __post_init__(self) -> None:
        self.betas = torch.linspace(self.beta_start, self.beta_end, self.steps, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t broadcast over an image batch like ``like``; t = -1 means abar = 1 (clean)."""
        table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        values = table[(t.long().cpu() + 1)].to(device=like.device, dtype=like.dtype)
        return values.view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        abar = self.alpha_bar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = self.alpha_bar(t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod[t.long().cpu()]
        return abar / (1 - abar)

    def p2_weight(self, t: torch.Tensor) -> torch.Tensor:
        """P2 weighting 1 / (k + snr(t))^gamma, per sample."""
        return (1.0 / (self.p2_k + self.snr(t)) ** self.p2_gamma).float().to(t.device)

    def loss(self, eps_pred: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """P2-weighted mean squared error of the predicted noise (mean over pixels, then batch)."""
        per_sample = ((eps_pred.float() - noise.float()) ** 2).flatten(1).mean(1)
        return (self.p2_weight(t) * per_sample).mean()


def ddim_timesteps(count: int, steps: int = STEPS) -> torch.Tensor:
    """``count`` evenly strided timesteps from 0 (as guided-diffusion's "ddimN" respacing), ascending."""
    if not 1 <= count <= steps:
        raise ValueError(f"DDIM steps must be between 1 and {steps}")
    stride = steps // count
    return torch.arange(0, stride * count, stride, dtype=torch.long)


def _ddim_move(diffusion: Diffusion, x, t_from, t_to, eps, clip: bool):
    x0 = diffusion.predict_x0(x, t_from, eps)
    if clip:
        x0 = x0.clamp(-1, 1)
    abar_to = diffusion.alpha_bar(t_to, x)
    return abar_to.sqrt() * x0 + (1 - abar_to).sqrt() * eps


def ddim_sample(
    denoiser: Denoiser,
    x_t: torch.Tensor,
    diffusion: Diffusion,
    timesteps: torch.Tensor,
    clip: bool = True,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from x at the last of ``timesteps`` down to a clean image."""
    ts = timesteps.tolist()
    batch = x_t.shape[0]
    x = x_t
    for i in reversed(range(len(ts))):
        t = torch.full((batch,), ts[i], dtype=torch.long, device=x.device)
        t_prev = torch.full_like(t, ts[i - 1] if i > 0 else -1)
        x = _ddim_move(diffusion, x, t, t_prev, denoiser(x, t), clip)
        if callback:
            callback(len(ts) - i, len(ts))
    return x


def ddim_invert(
    denoiser: Denoiser,
    x0: torch.Tensor,
    diffusion: Diffusion,
    timesteps: torch.Tensor,
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """DDIM inversion: the same update run forward, from a clean image to x at the last timestep.

    The clean image stands in for x at the first timestep (abar_0 = 0.9999), and each move from t
    to the next uses the noise predicted at t (the step ddim_sample takes backwards).
    """
    ts = timesteps.tolist()
    batch = x0.shape[0]
    x = x0
    for i in range(len(ts) - 1):
        t = torch.full((batch,), ts[i], dtype=torch.long, device=x.device)
        t_next = torch.full_like(t, ts[i + 1])
        x = _ddim_move(diffusion, x, t, t_next, denoiser(x, t), clip=False)
        if callback:
            callback(i + 1, len(ts) - 1)
    return x
