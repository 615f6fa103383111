"""The schedule, the loss, and DDIM against closed forms with an exact (Gaussian) denoiser."""

from __future__ import annotations

import itertools
import math

import torch

from rigcli.diffusion.schedule import Diffusion, ddim_invert, ddim_sample, ddim_timesteps


def test_schedule_matches_closed_form():
    d = Diffusion()
    assert d.betas[0].item() == 1e-4 and abs(d.betas[-1].item() - 0.02) < 1e-15
    assert abs(d.betas[500].item() - (1e-4 + 500 * (0.02 - 1e-4) / 999)) < 1e-15
    abar = 1.0
    for t in range(1000):
        abar *= 1 - (1e-4 + t * (0.02 - 1e-4) / 999)
        if t in (0, 10, 499, 999):
            assert math.isclose(d.alphas_cumprod[t].item(), abar, rel_tol=1e-12)
    t = torch.tensor([0, 250, 999])
    snr = d.alphas_cumprod[t] / (1 - d.alphas_cumprod[t])
    assert torch.allclose(d.p2_weight(t).double(), 1 / (1 + snr), rtol=1e-6)
    assert ddim_timesteps(20).tolist() == list(range(0, 1000, 50))


def test_loss_and_forward_process():
    d = Diffusion()
    x0, noise = torch.ones(2, 3, 4, 4), torch.full((2, 3, 4, 4), 2.0)
    t = torch.tensor([100, 900])
    abar = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    assert torch.allclose(d.q_sample(x0, t, noise), abar.sqrt() + 2 * (1 - abar).sqrt())
    assert torch.allclose(d.predict_x0(d.q_sample(x0, t, noise), t, noise), x0, atol=1e-5)
    pred = noise + torch.tensor([1.0, 3.0]).view(-1, 1, 1, 1)  # squared errors 1 and 9
    expected = (d.p2_weight(t) * torch.tensor([1.0, 9.0])).mean()
    assert torch.isclose(d.loss(pred, noise, t), expected)


MU, SIGMA = 0.3, 0.5


def gaussian_denoiser(d: Diffusion):
    """The exact E[eps | x_t] when every pixel of the data is N(MU, SIGMA^2)."""

    def eps(x, t):
        abar = d.alpha_bar(t, x)
        return (1 - abar).sqrt() * (x - abar.sqrt() * MU) / (abar * SIGMA**2 + 1 - abar)

    return eps


def test_ddim_matches_the_closed_form_ode_solution():
    # the probability-flow ODE keeps (x_t - sqrt(abar) mu) / sqrt(abar sigma^2 + 1 - abar) constant
    d = Diffusion()
    x_t = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors = []
    for count in (5, 20, 100, 500):
        ts = ddim_timesteps(count)
        abar_t = d.alphas_cumprod[ts[-1]].item()
        exact = MU + SIGMA * (x_t - math.sqrt(abar_t) * MU) / math.sqrt(abar_t * SIGMA**2 + 1 - abar_t)
        out = ddim_sample(gaussian_denoiser(d), x_t, d, ts, clip=False)
        errors.append((out - exact).abs().max().item())
    assert errors == sorted(errors, reverse=True), errors  # shrinks as steps grow...
    # ...at first order, as an Euler step in DDIM's own variables should: 5x the steps, ~5x smaller
    for coarse, fine in itertools.pairwise(errors):
        assert coarse / fine > 3.0, errors
    assert errors[-1] < 0.012  # 500 steps


def test_inversion_then_sampling_returns_the_input():
    d = Diffusion()
    x0 = MU + SIGMA * torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eps = gaussian_denoiser(d)
    errors = []
    for count in (10, 50, 250, 1000):
        ts = ddim_timesteps(count)
        x_t = ddim_invert(eps, x0, d, ts)
        errors.append((ddim_sample(eps, x_t, d, ts, clip=False) - x0).abs().max().item())
    for coarse, fine in itertools.pairwise(errors):  # first-order convergence
        assert coarse / fine > 3.0, errors
    assert errors[-1] < 0.015  # every timestep: the round trip is nearly exact
