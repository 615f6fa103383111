"""Engines: the exported ONNX UNet step against torch, artifact keys, and the missing-package message."""

from __future__ import annotations

import json

import pytest
import torch

from engines import torch_engine
from engines.onnx import artifact, onnx_engine
from rigcli import RigError
from rigcli.fit import FaceFit, render_buffers
from rigcli.render import light_from_direction
from rigcli.unet import DiffusionRig, preset


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = DiffusionRig(preset("tiny")).eval()
    for p in model.parameters():  # give the zero-initialised output layers weights, so every path counts
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return model.denoisingUNet


@pytest.fixture(scope="module")
def exported(unet, tmp_path_factory):
    return artifact(unet, tmp_path_factory.mktemp("engines"), 64)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_onnx_matches_torch_on_random_inputs(unet, exported):
    reference, onnx = torch_engine(unet), onnx_engine(exported)
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3, 8):  # the batch axis is dynamic
        x, b = torch.randn(batch, 3, 64, 64, generator=g), torch.randn(batch, 9, 64, 64, generator=g)
        t, z = torch.randint(0, 1000, (batch,), generator=g), torch.randn(batch, 64, generator=g)
        assert relative_error(onnx(x, t, b, z), reference(x, t, b, z)) < 1e-4


def test_onnx_matches_torch_on_rendered_buffers(unet, exported, face_model):
    fit = FaceFit(
        torch.tensor([0.3, -0.2]), torch.tensor([0.1, 0.0]), torch.tensor([0.0, 0.1]), torch.full((2,), 2.35),
        torch.tensor([[32.0, 39.5], [31.0, 40.0]]), torch.zeros(2, 53), torch.zeros(100),
        light_from_direction(torch.tensor([-0.5, 0.3, 1.0]), 0.8, 0.3)[None].expand(2, 9, 3).float(),
        torch.tensor([[0.7, 0.5, 0.4], [0.5, 0.4, 0.3]]),
    )  # fmt: skip
    buffers = render_buffers(face_model, fit, 64)
    assert buffers.abs().sum() > 0
    x, t, z = torch.randn(2, 3, 64, 64), torch.tensor([0, 999]), torch.randn(2, 64)
    assert relative_error(onnx_engine(exported)(x, t, buffers, z), torch_engine(unet)(x, t, buffers, z)) < 1e-4


def test_artifacts_are_keyed_by_weights_and_settings(unet, exported):
    root = exported.parent.parent
    stamp = exported.stat().st_mtime_ns
    assert artifact(unet, root, 64) == exported and exported.stat().st_mtime_ns == stamp  # reused, not re-exported
    info = json.loads((exported.parent / "engine.json").read_text())
    assert {"weights", "precision", "opset", "torch", "onnx", "onnxruntime"} <= set(info)
    changed = DiffusionRig(preset("tiny")).denoisingUNet
    changed.load_state_dict(unet.state_dict())
    with torch.no_grad():
        changed.out[2].bias += 1.0
    stale = artifact(changed, root, 64)
    assert stale != exported  # new weights: a new artifact, the old one never used for them
    assert artifact(unet, root, 64, opset=18) not in (exported, stale)


def test_missing_onnx_says_what_to_install(monkeypatch, unet, tmp_path):
    import engines.onnx as module

    real = module.importlib.util.find_spec
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None if name == "onnx" else real(name))
    with pytest.raises(RigError, match=r"pip install 'rig\[onnx\]'"):
        artifact(unet, tmp_path, 64)
