"""The DiffusionRig network: a conditioned UNet (guided-diffusion style) and a ResNet-18 encoder.

The UNet predicts the noise in a noisy image given the 9 rendered buffer channels (concatenated to
the image: 12 input channels), the timestep, and a 64-D global latent that the encoder computes from
the clean photo. Every residual block applies the timestep's scale/shift and then the latent's:
``h = h * (1 + s_t) + b_t`` followed by ``h = h * (1 + s_z) + b_z``.

Parameter names follow the paper's public code (``denoisingUNet.*``: guided-diffusion's
``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``, with ResBlocks holding
``in_layers``, ``emb_layers``, ``cond_emb_layers``, ``out_layers``, ``skip_connection``; ``encoder.*``:
torchvision's ResNet-18 names), so released checkpoints load as plain state dicts. One class serves
every size; ``PRESETS`` holds the configurations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from rigcli import RigError


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes a model's shape."""

    image_size: int = 256
    base_channels: int = 128
    channel_mult: tuple[float, ...] = (1, 1, 2, 2, 4, 4)
    res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention
    heads: int = 1
    dropout: float = 0.1
    latent_dim: int = 64
    in_channels: int = 12  # noisy image 3 + buffers 9 (shaded, normal, albedo)
    out_channels: int = 3  # predicted noise (fixed variance)
    groups: int = 32
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data["channel_mult"] = list(self.channel_mult)
        data["attention_resolutions"] = list(self.attention_resolutions)
        return data

    @classmethod
    def from_json(cls, data: dict) -> ModelConfig:
        data = dict(data)
        data["channel_mult"] = tuple(data["channel_mult"])
        data["attention_resolutions"] = tuple(data["attention_resolutions"])
        return cls(**data)


PRESETS = {
    # the paper's configuration: 133.4 M UNet parameters, 556 GFLOPs per call at 256x256
    "paper": ModelConfig(),
    # a single consumer GPU: half the channels (about a quarter of the compute)
    "small": ModelConfig(base_channels=64),
    # CPUs and tests: 64x64, 32 base channels
    "tiny": ModelConfig(
        image_size=64,
        base_channels=32,
        channel_mult=(1, 2, 2, 2),
        res_blocks=1,
        attention_resolutions=(8,),
        dropout=0.0,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named configuration, optionally with some fields changed."""

    if name not in PRESETS:
        raise RigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def paper_arguments(cfg: ModelConfig) -> list[str]:
    """The flags of the paper's scripts (``scripts/train.py``, ``scripts/inference.py``) that build
    a network with exactly this configuration's state dict, or a RigError saying why none can.

    The paper's code builds its network from its own command-line arguments, with GroupNorm of 32
    groups, integer channel multipliers and attention placed by feature-map size (its
    ``--attention_resolutions 16`` is our ``(16,)``); scale-shift norm and residual up/down-sampling
    are its defaults. Every preset here meets those rules; ``paper`` needs no flags beyond the defaults.
    """

    levels = len(cfg.channel_mult)
    sizes = {cfg.image_size // 2**level for level in range(levels)}
    problems = []
    if cfg.groups != 32:
        problems.append(f"GroupNorm with {cfg.groups} groups (the paper's code has 32)")
    if any(float(m) != int(m) for m in cfg.channel_mult):
        problems.append(f"channel multipliers {cfg.channel_mult} (the paper's code takes integers)")
    if cfg.image_size % 2 ** (levels - 1):
        problems.append(f"image size {cfg.image_size} not divisible by {2 ** (levels - 1)}")
    if not set(cfg.attention_resolutions) <= sizes:
        problems.append(f"attention at {cfg.attention_resolutions}, not all feature-map sizes of the UNet")
    if cfg.out_channels not in (3, 6):
        problems.append(f"{cfg.out_channels} output channels (the paper's code has 3, or 6 with learn_sigma)")
    if problems:
        raise RigError("the paper's code cannot build this model: " + "; ".join(problems))
    return [
        f"--image_size {cfg.image_size}",
        f"--num_channels {cfg.base_channels}",
        f"--num_res_blocks {cfg.res_blocks}",
        "--channel_mult " + ",".join(str(int(m)) for m in cfg.channel_mult),
        "--attention_resolutions " + ",".join(str(r) for r in cfg.attention_resolutions),
        f"--num_heads {cfg.heads}",
        f"--dropout {cfg.dropout}",
        f"--latent_dim {cfg.latent_dim}",
        f"--in_channels {cfg.in_channels}",
        f"--learn_sigma {cfg.out_channels == 6}",
        "--encoder_type resnet18",
    ]


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (stable under mixed precision)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [cos(t f_i), sin(t f_i)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zeroed(module: nn.Module) -> nn.Module:
    """Start a layer at zero, so each residual block begins as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with FiLM conditioning on the timestep and on the global latent."""

    def __init__(self, cfg: ModelConfig, channels: int, emb_dim: int, out_channels: int, up=False, down=False):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(cfg.groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.resample = "up" if up else "down" if down else None
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cfg.latent_dim, 2 * out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(cfg.groups, out_channels),
            nn.SiLU(),
            nn.Dropout(cfg.dropout),
            zeroed(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        if self.resample:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self._resample(h))
            x = self._resample(x)
        else:
            h = self.in_layers(x)
        scale_t, shift_t = self.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
        scale_z, shift_z = self.cond_emb_layers(latent).type(h.dtype)[..., None, None].chunk(2, dim=1)
        norm, rest = self.out_layers[0], self.out_layers[1:]
        h = norm(h) * (1 + scale_t) + shift_t
        h = h * (1 + scale_z) + shift_z
        return self.skip_connection(x) + rest(h)


class AttentionBlock(nn.Module):
    """Self-attention over all positions of a feature map (heads split as in guided-diffusion's legacy order)."""

    def __init__(self, cfg: ModelConfig, channels: int):
        super().__init__()
        self.heads = cfg.heads
        self.norm = GroupNorm32(cfg.groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb=None, latent=None) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        ch = c // self.heads
        q, k, v = qkv.reshape(b * self.heads, 3 * ch, -1).split(ch, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = self.proj_out(out.transpose(1, 2).reshape(b, c, -1))
        return (flat + h).reshape(b, c, *spatial)


class Step(nn.ModuleList):
    """A sequence of layers; ResBlocks and attention receive the embeddings, convolutions do not."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb, latent) if isinstance(layer, ResBlock | AttentionBlock) else layer(x)
        return x


class UNet(nn.Module):
    """guided-diffusion's UNet with the global-latent FiLM of DiffusionRig in every ResBlock."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        base = cfg.base_channels
        emb_dim = 4 * base
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = int(cfg.channel_mult[0] * base)
        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        skips, size = [ch], cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.res_blocks):
                layers: list[nn.Module] = [ResBlock(cfg, ch, emb_dim, int(mult * base))]
                ch = int(mult * base)
                if size in cfg.attention_resolutions:
                    layers.append(AttentionBlock(cfg, ch))
                self.input_blocks.append(Step(layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Step([ResBlock(cfg, ch, emb_dim, ch, down=True)]))
                skips.append(ch)
                size //= 2
        self.middle_block = Step(
            [ResBlock(cfg, ch, emb_dim, ch), AttentionBlock(cfg, ch), ResBlock(cfg, ch, emb_dim, ch)]
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.res_blocks + 1):
                layers = [ResBlock(cfg, ch + skips.pop(), emb_dim, int(mult * base))]
                ch = int(mult * base)
                if size in cfg.attention_resolutions:
                    layers.append(AttentionBlock(cfg, ch))
                if level and i == cfg.res_blocks:
                    layers.append(ResBlock(cfg, ch, emb_dim, ch, up=True))
                    size *= 2
                self.output_blocks.append(Step(layers))
        self.out = nn.Sequential(
            GroupNorm32(cfg.groups, ch), nn.SiLU(), zeroed(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Predicted noise for noisy images (B, 3, H, W) at timesteps t (B,), given buffers (B, 9, H, W)."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(x_t.dtype))
        h = torch.cat([x_t, buffers.to(x_t.dtype)], dim=1)
        latent = latent.to(x_t.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, latent)
            skips.append(h)
        h = self.middle_block(h, emb, latent)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, latent)
        return self.out(h)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block (same parameter names)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """ResNet-18 in torchvision's layout with ``fc`` replaced by Linear(512, latent_dim)."""

    def __init__(self, latent_dim: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        widths, inplanes = (64, 128, 256, 512), 64
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(
                self, f"layer{i + 1}", nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes))
            )
            inplanes = planes
        self.fc = nn.Linear(512, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DiffusionRig(nn.Module):
    """The UNet and the global-latent encoder, named as in the paper's checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.denoisingUNet = UNet(cfg)
        self.encoder = ResNet18(cfg.latent_dim)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """64-D global latent of clean images in [-1, 1], (B, 3, H, W) -> (B, latent_dim)."""
        return self.encoder(images)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        buffers: torch.Tensor,
        latent: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted noise; the latent is given, or encoded here from the clean ``images`` (so that
        DistributedDataParallel, which wraps forward, also synchronizes the encoder's gradients)."""
        if latent is None:
            latent = self.encode(images)
        return self.denoisingUNet(x_t, t, buffers, latent)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
