"""The paper's checkpoints: import into the registry, export back, refusals, and which block each name drives.

The reference layout is enumerated here from the construction rules of the paper's public code
(``diffusion/model.py`` and ``utils/script_util.py`` of DiffusionRig, which follow guided-diffusion's
``UNetModel``; the encoder is torchvision's ``resnet18`` with ``fc`` replaced), not from our network.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

from rigcli import RigError
from rigcli.diffusion.checkpoints import PAPER_FACE_MODEL_ID, check_base_buffers, load_model
from rigcli.diffusion.unet import PRESETS, paper_arguments
from tests.conftest import run_rig

# ---------------------------------------------------------------- the reference, from the paper's rules


def paper_layout(
    image_size: int = 256,
    num_channels: int = 128,
    num_res_blocks: int = 2,
    channel_mult: str = "",
    attention_resolutions: str = "16",
    learn_sigma: bool = False,
    latent_dim: int = 64,
    in_channels: int = 12,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of ``DiffusionRig(...).state_dict()`` in the paper's code, for its
    defaults (use_scale_shift_norm and resblock_updown on, GroupNorm 32, encoder resnet18)."""
    if not channel_mult:
        mult = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        mults = mult[image_size]
    else:
        mults = tuple(int(m) for m in channel_mult.split(","))
    attention_ds = {image_size // int(r) for r in attention_resolutions.split(",")}
    emb = 4 * num_channels
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    f32 = torch.float32

    def vector(name, n):
        out[name] = ((n,), f32)

    def linear(name, fan_in, fan_out):
        out[f"{name}.weight"] = ((fan_out, fan_in), f32)
        vector(f"{name}.bias", fan_out)

    def conv(name, cin, cout, k, dims=2):
        out[f"{name}.weight"] = ((cout, cin) + (k,) * dims, f32)
        vector(f"{name}.bias", cout)

    def groupnorm(name, c):
        vector(f"{name}.weight", c)
        vector(f"{name}.bias", c)

    def resblock(p, cin, cout):  # in_layers: norm, SiLU, conv; emb/cond: SiLU, linear; out: norm, SiLU, dropout, conv
        groupnorm(f"{p}.in_layers.0", cin)
        conv(f"{p}.in_layers.2", cin, cout, 3)
        linear(f"{p}.emb_layers.1", emb, 2 * cout)
        linear(f"{p}.cond_emb_layers.1", latent_dim, 2 * cout)
        groupnorm(f"{p}.out_layers.0", cout)
        conv(f"{p}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{p}.skip_connection", cin, cout, 1)

    def attention(p, c):
        groupnorm(f"{p}.norm", c)
        conv(f"{p}.qkv", c, 3 * c, 1, dims=1)
        conv(f"{p}.proj_out", c, c, 1, dims=1)

    u = "denoisingUNet"
    linear(f"{u}.time_embed.0", num_channels, emb)
    linear(f"{u}.time_embed.2", emb, emb)
    ch = int(mults[0] * num_channels)
    conv(f"{u}.input_blocks.0.0", in_channels, ch, 3)
    chans, ds, block = [ch], 1, 1
    for level, m in enumerate(mults):
        for _ in range(num_res_blocks):
            resblock(f"{u}.input_blocks.{block}.0", ch, int(m * num_channels))
            ch = int(m * num_channels)
            if ds in attention_ds:
                attention(f"{u}.input_blocks.{block}.1", ch)
            chans.append(ch)
            block += 1
        if level != len(mults) - 1:
            resblock(f"{u}.input_blocks.{block}.0", ch, ch)  # down-sampling ResBlock
            chans.append(ch)
            block += 1
            ds *= 2
    resblock(f"{u}.middle_block.0", ch, ch)
    attention(f"{u}.middle_block.1", ch)
    resblock(f"{u}.middle_block.2", ch, ch)
    block = 0
    for level, m in reversed(list(enumerate(mults))):
        for i in range(num_res_blocks + 1):
            resblock(f"{u}.output_blocks.{block}.0", ch + chans.pop(), int(m * num_channels))
            ch = int(m * num_channels)
            layer = 1
            if ds in attention_ds:
                attention(f"{u}.output_blocks.{block}.1", ch)
                layer = 2
            if level and i == num_res_blocks:
                resblock(f"{u}.output_blocks.{block}.{layer}", ch, ch)  # up-sampling ResBlock
                ds //= 2
            block += 1
    groupnorm(f"{u}.out.0", ch)
    conv(f"{u}.out.2", int(mults[0] * num_channels), 6 if learn_sigma else 3, 3)

    def batchnorm(name, c):
        for stat in ("weight", "bias", "running_mean", "running_var"):
            vector(f"{name}.{stat}", c)
        out[f"{name}.num_batches_tracked"] = ((), torch.int64)

    def conv_nobias(name, cin, cout, k):
        out[f"{name}.weight"] = ((cout, cin, k, k), f32)

    conv_nobias("encoder.conv1", 3, 64, 7)
    batchnorm("encoder.bn1", 64)
    inplanes = 64
    for index, planes in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):  # BasicBlock x 2
            p = f"encoder.layer{index}.{b}"
            conv_nobias(f"{p}.conv1", inplanes if b == 0 else planes, planes, 3)
            batchnorm(f"{p}.bn1", planes)
            conv_nobias(f"{p}.conv2", planes, planes, 3)
            batchnorm(f"{p}.bn2", planes)
            if b == 0 and index > 1:  # stride 2 and a change of width
                conv_nobias(f"{p}.downsample.0", inplanes, planes, 1)
                batchnorm(f"{p}.downsample.1", planes)
        inplanes = planes
    linear("encoder.fc", 512, latent_dim)
    return out


def random_state_dict(layout: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of the layout's shapes at trained-like scales (so a forward pass stays finite)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (shape, dtype) in layout.items():
        if dtype == torch.int64:
            tensors[name] = torch.randint(0, 100_000, shape, generator=g)
        elif name.endswith("running_var"):
            tensors[name] = torch.rand(shape, generator=g) + 0.5
        elif len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            tensors[name] = torch.randn(shape, generator=g) / fan_in**0.5
        elif name.endswith("weight"):  # norm scales
            tensors[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            tensors[name] = 0.1 * torch.randn(shape, generator=g)
    return tensors


def test_reference_layout_has_the_papers_size():
    layout = paper_layout()
    count = lambda prefix: sum(  # noqa: E731
        int(torch.tensor(shape).prod()) for k, (shape, dtype) in layout.items()
        if k.startswith(prefix) and "running_" not in k and dtype == torch.float32
    )  # fmt: skip
    assert count("denoisingUNet.") == 133_400_835  # 133.4 M, the paper's UNet
    assert count("encoder.") == 11_689_512 - (512 * 1000 + 1000) + (512 * 64 + 64)  # torchvision's, 64-wide fc
    assert sum(k.startswith("encoder.") for k in layout) == 122  # torchvision's resnet18 state dict has 122


# ---------------------------------------------------------------- import and export through the CLI


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A checkpoint in the paper's layout (random tensors), imported with the CLI as base model ``paper``."""
    folder = tmp_path_factory.mktemp("paper-ckpt")
    tensors = random_state_dict(paper_layout())
    path = folder / "model050000.pt"
    torch.save(tensors, path)
    home = folder / "home"
    result = run_rig("models", "import-diffusionrig", str(path), "--name", "paper", home=home, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "registered paper" in result.stdout
    return home, path, tensors


def test_import_registers_the_checkpoint_as_a_flame_base(imported):
    home, path, _ = imported
    info = json.loads((home / "models" / "paper" / "model.json").read_text())
    assert info["face_model"] == "flame" and info["face_model_id"] == PAPER_FACE_MODEL_ID
    assert info["preset"] == "paper" and info["config"] == PRESETS["paper"].to_json()
    import hashlib

    assert info["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    listed = run_rig("models", "list", home=home)
    assert listed.returncode == 0 and "paper" in listed.stdout and PAPER_FACE_MODEL_ID in listed.stdout


def test_export_gives_back_the_same_tensors_bit_for_bit(imported, tmp_path):
    home, _, tensors = imported
    out = tmp_path / "exported.pt"
    result = run_rig("models", "export-diffusionrig", str(out), "--model", "paper", home=home, timeout=300)
    assert result.returncode == 0, result.stderr
    back = torch.load(out, map_location="cpu", weights_only=True)  # what the paper's code loads
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    again = run_rig("models", "export-diffusionrig", str(out), "--model", "paper", home=home)
    assert again.returncode == 2 and "--force" in again.stderr


def test_mismatched_checkpoint_is_refused_naming_the_keys(tmp_path):
    tensors = random_state_dict(paper_layout(64, 32, 1, "1,2,2,2", "8"))  # the tiny preset, to keep it quick
    tensors["denoisingUNet.middle_block.1.qkv_renamed.weight"] = tensors.pop("denoisingUNet.middle_block.1.qkv.weight")
    del tensors["encoder.layer3.1.bn2.running_var"]
    tensors["denoisingUNet.out.2.weight"] = torch.zeros(6, 32, 3, 3)
    path, home = tmp_path / "bad.pt", tmp_path / "home"
    torch.save(tensors, path)
    result = run_rig("models", "import-diffusionrig", str(path), "--name", "other", "--preset", "tiny", home=home)
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    shape = "denoisingUNet.out.2.weight [6, 32, 3, 3] (expected [3, 32, 3, 3])"
    renamed = "denoisingUNet.middle_block.1.qkv_renamed.weight"
    for expected in ("2 missing", "denoisingUNet.middle_block.1.qkv.weight", "encoder.layer3.1.bn2.running_var",
                     "1 unexpected", renamed, "1 wrong shape", shape):  # fmt: skip
        assert expected in message, message
    assert "Traceback" not in result.stderr
    assert not (home / "models" / "other").exists()


def test_unsafe_and_foreign_files_are_refused(tmp_path):
    from rigcli.diffusion.registry import import_diffusionrig
    from rigcli.store import Store

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"denoisingUNet.out.2.bias": torch.zeros(3), "x": Payload()}, evil)
    home = tmp_path / "home"
    result = run_rig("models", "import-diffusionrig", str(evil), "--name", "x", home=home)
    assert result.returncode == 2 and "holds objects other than tensors" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    assert not marker.exists()  # the payload never ran
    text, odd = tmp_path / "notes.pt", tmp_path / "odd.pt"
    text.write_text("not a checkpoint")
    torch.save({"state_dict": {"a": torch.zeros(1), "b": [1, 2]}}, odd)
    cases = {text: "not a PyTorch checkpoint", tmp_path / "missing.pt": "no such file", odd: "not named tensors: b"}
    for path, expected in cases.items():
        with pytest.raises(RigError, match=expected):
            import_diffusionrig(Store(home), path, "x")
    assert not (home / "models" / "x").exists()


def test_wrapped_checkpoints_unwrap_and_other_presets_export_for_the_papers_flags(tmp_path):
    """A DDP-prefixed state dict nested under 'state_dict' imports (preset tiny); exported, its layout is
    the paper's network built with the flags we print for it."""
    from rigcli.diffusion.registry import export_diffusionrig, import_diffusionrig
    from rigcli.store import Store, registry_dir

    # the tiny preset in the paper's own arguments
    layout = paper_layout(64, 32, 1, "1,2,2,2", "8")
    tensors = random_state_dict(layout, seed=1)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tensors.items()}, "step": 5000}, path)
    store = Store(tmp_path / "home")
    import_diffusionrig(store, path, "tinybase", preset_name="tiny")
    with pytest.raises(RigError, match="already registered"):
        import_diffusionrig(store, path, "tinybase", preset_name="tiny")
    import_diffusionrig(store, path, "tinybase", preset_name="tiny", force=True)  # replaced whole
    assert [p.name for p in registry_dir(store).iterdir()] == ["tinybase"]
    info = export_diffusionrig(store, tmp_path / "tiny.pt", model_name="tinybase")
    back = torch.load(tmp_path / "tiny.pt", weights_only=True)
    assert {k: (tuple(v.shape), v.dtype) for k, v in back.items()} == layout
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    flags = dict(a.removeprefix("--").split(" ") for a in info["arguments"])
    assert paper_layout(
        int(flags["image_size"]), int(flags["num_channels"]), int(flags["num_res_blocks"]), flags["channel_mult"],
        flags["attention_resolutions"], flags["learn_sigma"] == "True", int(flags["latent_dim"]),
        int(flags["in_channels"]),
    ) == layout  # fmt: skip
    with pytest.raises(RigError, match="paper's layout for preset paper"):
        import_diffusionrig(store, path, "wrongpreset")  # a tiny checkpoint is not the paper's size
    with pytest.raises(RigError, match="exactly one"):
        export_diffusionrig(store, tmp_path / "x.pt")


def test_half_precision_is_stored_as_float32_and_integer_weights_are_refused(tmp_path):
    from rigcli.diffusion.registry import import_diffusionrig
    from rigcli.store import Store, registry_dir

    layout = paper_layout(64, 32, 1, "1,2,2,2", "8")
    tensors = random_state_dict(layout, seed=2)
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    torch.save(half, tmp_path / "half.pt")
    store = Store(tmp_path / "home")
    info = import_diffusionrig(store, tmp_path / "half.pt", "half", preset_name="tiny")
    assert info["source_dtypes"] == ["float16", "int64"]
    model, _ = load_model(registry_dir(store) / "half")
    for k, v in model.state_dict().items():
        assert v.dtype == layout[k][1] and torch.equal(v, half[k].to(v.dtype)), k
    half["encoder.fc.weight"] = half["encoder.fc.weight"].round().int()
    torch.save(half, tmp_path / "int.pt")
    with pytest.raises(RigError, match=r"1 wrong type \(encoder.fc.weight int32 \(expected float32\)\)"):
        import_diffusionrig(store, tmp_path / "int.pt", "int", preset_name="tiny")


def test_configurations_the_papers_code_cannot_build_are_refused():
    assert paper_arguments(PRESETS["paper"])[:4] == [
        "--image_size 256", "--num_channels 128", "--num_res_blocks 2", "--channel_mult 1,1,2,2,4,4",
    ]  # fmt: skip
    with pytest.raises(RigError, match="32"):
        paper_arguments(replace(PRESETS["tiny"], groups=16))
    with pytest.raises(RigError, match="integers"):
        paper_arguments(replace(PRESETS["tiny"], channel_mult=(1, 1.5, 2, 2)))


def test_the_papers_base_refuses_a_person_fitted_with_ict():
    with pytest.raises(RigError, match=r"FLAME.*--face-model flame"):
        check_base_buffers("paper", {"face_model_id": PAPER_FACE_MODEL_ID}, "alice", "ict-0123456789abcdef")
    check_base_buffers("paper", {"face_model_id": PAPER_FACE_MODEL_ID}, "alice", "flame-0123456789abcdef")
    check_base_buffers("mine", {"face_model_id": "ict-01"}, "alice", "ict-01")
    with pytest.raises(RigError, match="face model flame-02"):
        check_base_buffers("mine", {"face_model_id": "flame-02"}, "alice", "ict-01")


# ---------------------------------------------------------------- each name drives its own block


def _owner(name: str, blocks: dict[str, torch.nn.Module]) -> str:
    return max((b for b in blocks if name.startswith(b + ".")), key=len)


def test_one_tensor_changes_its_own_block_and_no_other(imported):
    """Perturb one named tensor; re-run every top-level block on the inputs it had before: only the
    block that the name belongs to gives another output."""
    home, _, _ = imported
    model, _ = load_model(home / "models" / "paper")
    unet, enc = model.denoisingUNet, model.encoder
    blocks = {"denoisingUNet.time_embed": unet.time_embed, "denoisingUNet.middle_block": unet.middle_block,
              "denoisingUNet.out": unet.out}  # fmt: skip
    blocks.update({f"denoisingUNet.input_blocks.{i}": b for i, b in enumerate(unet.input_blocks)})
    blocks.update({f"denoisingUNet.output_blocks.{i}": b for i, b in enumerate(unet.output_blocks)})
    blocks.update(
        {f"encoder.{n}": getattr(enc, n) for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")}
    )
    seen: dict[str, tuple] = {}
    hooks = [
        b.register_forward_hook(lambda m, args, out, n=n: seen.__setitem__(n, (args, out))) for n, b in blocks.items()
    ]
    g = torch.Generator().manual_seed(0)
    size = 64  # the paper's network at 64x64: every block runs, at 1/16 of the cost
    x, buffers, photo = (torch.randn(1, c, size, size, generator=g) for c in (3, 9, 3))
    with torch.no_grad():
        model(x, torch.tensor([500]), buffers, images=photo)
    for hook in hooks:
        hook.remove()
    assert set(seen) == set(blocks)
    state = model.state_dict()
    for name in ("denoisingUNet.input_blocks.4.0.cond_emb_layers.1.weight", "denoisingUNet.middle_block.1.qkv.weight",
                 "denoisingUNet.output_blocks.5.2.in_layers.2.bias", "encoder.layer2.0.bn1.running_var"):  # fmt: skip
        tensor = state[name]
        original = tensor.clone()
        with torch.no_grad():
            tensor.mul_(1.5).add_(0.01)
            changed = {n for n, b in blocks.items() if not torch.equal(b(*seen[n][0]), seen[n][1])}
            tensor.copy_(original)
        assert changed == {_owner(name, blocks)}, name
