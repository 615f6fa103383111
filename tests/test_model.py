"""The DiffusionRig network: the paper's size, torchvision's names, latent injection, FLOPs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rigcli import RigError
from rigcli.diffusion.unet import (
    PRESETS,
    DiffusionRig,
    ModelConfig,
    ResBlock,
    count_parameters,
    paper_arguments,
    preset,
    widened,
)


def test_paper_preset_has_the_papers_size():
    model = DiffusionRig(PRESETS["paper"])
    assert count_parameters(model.denoisingUNet) == 133_400_835  # 133.4 M, as counted on the paper's code
    # torchvision's ResNet-18 (11,689,512) with its 1000-way fc swapped for Linear(512, 64)
    assert count_parameters(model.encoder) == 11_689_512 - (512 * 1000 + 1000) + (512 * 64 + 64)


def test_paper_unet_flops_counted():
    with torch.device("meta"):
        model = DiffusionRig(PRESETS["paper"])
        args = (torch.randn(1, 3, 256, 256), torch.tensor([10]), torch.randn(1, 9, 256, 256), torch.randn(1, 64))
        with FlopCounterMode(display=False) as counter:
            model(*args)
    assert counter.get_total_flops() / 1e9 == pytest.approx(556, abs=1)


def test_encoder_uses_torchvision_names():
    keys = set(DiffusionRig(PRESETS["tiny"]).encoder.state_dict())
    assert len(keys) == 122
    expected = {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.num_batches_tracked", "layer4.1.bn2.bias", "fc.weight", "fc.bias"}  # fmt: skip
    assert expected <= keys
    unet_keys = set(DiffusionRig(PRESETS["tiny"]).denoisingUNet.state_dict())
    for key in ("time_embed.0.weight", "input_blocks.0.0.weight", "input_blocks.1.0.cond_emb_layers.1.weight",
                "middle_block.1.qkv.weight", "output_blocks.0.0.skip_connection.weight", "out.2.weight"):  # fmt: skip
        assert key in unet_keys


def test_every_residual_block_receives_the_latent():
    torch.manual_seed(0)
    model = DiffusionRig(PRESETS["tiny"]).eval()
    for p in model.parameters():  # the zero-initialised output layers would hide the latent's effect
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    blocks = [m for m in model.denoisingUNet.modules() if isinstance(m, ResBlock)]
    outputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(blocks))}
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: outputs[i].append(out)) for i, b in enumerate(blocks)]
    x, t, buffers = torch.randn(1, 3, 64, 64), torch.tensor([300]), torch.randn(1, 9, 64, 64)
    with torch.no_grad():
        model(x, t, buffers, torch.zeros(1, 64))
        model(x, t, buffers, torch.randn(1, 64))
    for hook in hooks:
        hook.remove()
    assert len(blocks) > 10
    for i in range(len(blocks)):
        # the first block's input does not depend on the latent, so a change there is the block's own
        assert not torch.allclose(outputs[i][0], outputs[i][1]), f"ResBlock {i} ignores the latent"
    # and changing only the latent changes the first block's output given the same input
    first = blocks[0]
    h = torch.randn(1, first.in_layers[0].num_channels, 64, 64)
    emb = torch.randn(1, first.emb_layers[1].in_features)
    assert not torch.allclose(first(h, emb, torch.zeros(1, 64)), first(h, emb, torch.ones(1, 64)))


def test_presets_run_and_unknown_preset_is_refused():
    model = DiffusionRig(PRESETS["tiny"]).eval()
    out = model(torch.randn(2, 3, 64, 64), torch.tensor([1, 999]), torch.randn(2, 9, 64, 64), torch.randn(2, 64))
    assert out.shape == (2, 3, 64, 64)
    assert model.encode(torch.randn(2, 3, 64, 64)).shape == (2, 64)
    with pytest.raises(RigError, match="unknown preset"):
        preset("huge")
    assert preset("tiny", dropout=0.2).dropout == 0.2


def test_a_widened_model_computes_exactly_what_its_base_did_and_learns_to_use_the_edit():
    """Issue 27: the physical edit's channels enter through a zero convolution, so a base model
    widened to take them gives the same noise bit for bit, whatever the edit channels hold; once that
    convolution is not zero, the edit changes the prediction, and only the edit's channels do."""
    torch.manual_seed(0)
    base = DiffusionRig(PRESETS["tiny"]).eval()
    for p in base.parameters():  # the zero-initialised output layer would hide every difference
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    wide = widened(base).eval()
    assert wide.cfg.edit_channels == 4 and wide.cfg.condition_channels == 13
    assert base.cfg.condition_channels == 9 and "edit_channels" not in base.cfg.to_json()
    assert ModelConfig.from_json(wide.cfg.to_json()) == wide.cfg
    x, t, latent = torch.randn(2, 3, 64, 64), torch.tensor([5, 700]), torch.randn(2, 64)
    buffers, edit = torch.randn(2, 9, 64, 64), torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        want = base(x, t, buffers, latent)
        assert torch.equal(wide(x, t, torch.cat([buffers, edit], 1), latent), want)
        torch.nn.init.normal_(wide.denoisingUNet.edit_in.weight, std=0.02)
        moved = wide(x, t, torch.cat([buffers, edit], 1), latent)
        assert not torch.allclose(moved, want, atol=1e-4)
        assert torch.equal(wide(x, t, torch.cat([buffers, edit], 1), latent), moved)
    # the latent of a conditioned model is encoded from the edit's crop, the plain model's from the image
    assert torch.equal(wide.latent_images(x, torch.cat([buffers, edit], 1)), edit[:, :3])
    assert torch.equal(base.latent_images(x, buffers), x)
    with pytest.raises(RigError, match="physical edit"):
        paper_arguments(wide.cfg)
    assert widened(wide) is wide
