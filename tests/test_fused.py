"""The UNet's fused elementwise passes (GroupNorm statistics in fp32 + both FiLMs + SiLU as one
scale-shift) against the separate passes they replace (``UNet.set_fused(False)``: GroupNorm on an
fp32 copy through F.group_norm, then each FiLM, then SiLU), and against float64 references.

Errors are relative to the output's scale: ||fused - reference|| / ||reference||."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engines import cast_unet
from rigcli.diffusion.unet import AttentionBlock, DiffusionRig, GroupNorm32, ResBlock, UNet, group_statistics, preset


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    value, expected = value.detach().double(), expected.detach().double()
    return float((value - expected).norm() / expected.norm())


def random_unet(**overrides) -> UNet:
    """The tiny preset (it has down- and up-sampling ResBlocks and attention) with every weight random,
    the zero-initialised output layers and the GroupNorms' affine too, so every path counts."""
    torch.manual_seed(0)
    unet = DiffusionRig(preset("tiny", **overrides)).denoisingUNet.eval()
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.abs().sum() == 0 or name.endswith(("0.weight", "0.bias", "norm.weight", "norm.bias")):
                p.normal_(mean=1.0 if name.endswith("weight") and p.dim() == 1 else 0.0, std=0.1)
    return unet


def inputs(batch: int = 3, size: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x, b = torch.randn(batch, 3, size, size, generator=g), torch.rand(batch, 9, size, size, generator=g)
    return x, torch.tensor([0, 500, 999][:batch]), b, torch.randn(batch, 64, generator=g)


def test_the_tiny_preset_has_every_kind_of_block():
    unet = random_unet()
    kinds = [m.resample for m in unet.modules() if isinstance(m, ResBlock)]
    assert {"up", "down", None} <= set(kinds)
    assert any(isinstance(m, AttentionBlock) for m in unet.modules())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("heads", [1, 2])
def test_fused_unet_matches_the_unfused_one_in_fp32(channels_last, heads):
    """One call within 1e-5 of the separate passes (dropout 0.1, in eval), in both memory layouts,
    with one head and with two (the legacy head order: per head [q, k, v])."""
    unet = random_unet(heads=heads, dropout=0.1)
    reference = copy.deepcopy(unet).set_fused(False)
    x, t, b, z = inputs()
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
        x, b = x.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, fused = reference(x, t, b, z), unet(x, t, b, z)
    assert 0 < relative_error(fused, expected) < 1e-5  # not the same code: rounding differs a little
    assert sorted(unet.state_dict()) == sorted(reference.state_dict())  # same names: checkpoints unchanged


def test_set_fused_switches_every_block():
    unet = random_unet().set_fused(False)
    flags = [m.fused for m in unet.modules() if isinstance(m, UNet | ResBlock | AttentionBlock | GroupNorm32)]
    assert flags and not any(flags)
    assert all(m.fused for m in unet.set_fused(True).modules() if hasattr(m, "fused"))


def test_fused_training_gradients_match_the_unfused_ones():
    """The same gradients (relative to their global norm): training uses the fused blocks too."""
    unet = random_unet().train()
    reference = copy.deepcopy(unet).set_fused(False)
    x, t, b, z = inputs(batch=2)
    for model in (unet, reference):
        model(x, t[:2], b, z).square().mean().backward()
    grads = [(p.grad, q.grad) for p, q in zip(unet.parameters(), reference.parameters(), strict=True)]
    total = sum(float(q.norm()) ** 2 for _, q in grads) ** 0.5
    difference = sum(float((p - q).norm()) ** 2 for p, q in grads) ** 0.5
    assert difference / total < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_statistics_are_fp32_accurate_on_offset_activations(dtype):
    """Mean and 1/std per (sample, group) against float64 on the same values, for groups whose mean
    is ten times their spread (where the E[x^2] - mean^2 formula loses most), in both layouts."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 64, 16, 16, generator=g) * 0.5 + torch.randn(2, 64, 1, 1, generator=g) * 5).to(dtype)
    grouped = x.double().reshape(2, 32, -1)
    mean, rstd = grouped.mean(-1), (grouped.var(-1, unbiased=False) + 1e-5).rsqrt()
    for layout in (torch.contiguous_format, torch.channels_last):
        got_mean, got_rstd = group_statistics(x.contiguous(memory_format=layout), 32, 1e-5)
        assert got_mean.dtype == got_rstd.dtype == torch.float32
        assert relative_error(got_mean, mean) < 1e-6
        assert relative_error(got_rstd, rstd) < 1e-4


def test_fused_groupnorm_matches_float64_group_norm():
    norm = GroupNorm32(8, 32)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
        norm.bias.normal_(0, 0.2)
    x = torch.randn(2, 32, 8, 8) * 3 + 1
    expected = F.group_norm(x.double(), 8, norm.weight.double(), norm.bias.double(), norm.eps)
    assert relative_error(norm(x), expected) < 1e-6
    assert relative_error(norm(x.bfloat16()).float(), expected) < 1e-2  # the bf16 output's rounding


def test_fused_resblock_in_bf16_is_within_1e_2_of_fp32():
    """One block (norm, both FiLMs folded with the norm, SiLU, resampling) in bf16 against the unfused
    fp32 block on the same bf16-representable inputs and weights: only bf16 rounding remains."""
    unet = random_unet(dropout=0.1)
    emb, latent = torch.randn(2, 128), torch.randn(2, 64)
    for block in [m for m in unet.modules() if isinstance(m, ResBlock)][:6]:
        channels = block.in_layers[0].num_channels
        x = torch.randn(2, channels, 16, 16).bfloat16()
        fused = cast_unet(copy.deepcopy(block), torch.bfloat16)
        reference = copy.deepcopy(fused).float()  # the bf16 weights, in fp32
        reference.fused = False
        for m in reference.modules():
            if isinstance(m, GroupNorm32):
                m.fused = False
        with torch.no_grad():
            expected = reference(x.float(), emb.bfloat16().float(), latent.bfloat16().float())
            got = fused(x, emb.bfloat16(), latent.bfloat16()).float()
        assert relative_error(got, expected) < 1e-2, block.resample


def test_fused_bf16_unet_is_no_further_from_fp32_than_the_unfused_one():
    """The whole UNet in bf16 (weights cast as the engines do): the fused passes' error against fp32
    is within 10 % of the unfused passes' (measured: 3.1e-2 fused, 3.2e-2 unfused on these weights;
    the error is bf16's rounding through 20 layers, see test_engines for the engines' bounds)."""
    unet = random_unet()
    x, t, b, z = inputs()
    with torch.no_grad():
        expected = copy.deepcopy(unet).set_fused(False)(x, t, b, z)
        errors = {}
        for fused in (True, False):
            model = cast_unet(copy.deepcopy(unet).set_fused(fused), torch.bfloat16)
            errors[fused] = relative_error(model(x.bfloat16(), t, b.bfloat16(), z.bfloat16()).float(), expected)
    assert 1e-4 < errors[True] < 6e-2
    assert errors[True] < 1.1 * errors[False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_unet_is_one_graph_for_torch_compile(dtype):
    """No graph breaks (dynamo's trace, no code generated), channels-last as the compiled engines run
    it: a break splits the UNet into many small graphs, each recompiled per shape until dynamo's limit
    sends them back to eager (the eager bf16 path's ``out=`` into a channels-last tensor made 32)."""
    cl = torch.channels_last
    unet = cast_unet(random_unet(), dtype).to(memory_format=cl)
    x, t, b, z = inputs(batch=2)
    x, b = (v.to(dtype).contiguous(memory_format=cl) for v in (x, b))
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(unet)(x, t[:2], b, z.to(dtype))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_unet_on_cuda_is_no_further_from_fp32_than_the_unfused_one(dtype):
    """On CUDA the statistics come from ATen's mixed-precision reductions (half in, fp32 accumulated
    and out): the channels-last half-precision fused UNet against the fp32 eager one, beside the unfused
    UNet in the same precision and layout."""
    unet = random_unet().cuda()
    x, t, b, z = (v.cuda() for v in inputs())
    with torch.no_grad():
        expected = copy.deepcopy(unet).set_fused(False)(x, t, b, z)
        errors = {}
        for fused in (True, False):
            model = cast_unet(copy.deepcopy(unet).set_fused(fused), dtype).to(memory_format=torch.channels_last)
            cl = [v.to(dtype).contiguous(memory_format=torch.channels_last) for v in (x, b)]
            errors[fused] = relative_error(model(cl[0], t, cl[1], z.to(dtype)).float(), expected)
    assert errors[True] < 6e-2 and errors[True] < 1.1 * errors[False]
