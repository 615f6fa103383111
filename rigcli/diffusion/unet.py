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
    # issue 27: channels of the physical edit the UNet also sees (its crop 3 + the mask of surface the
    # photo never showed 1, after the buffers); 0 is the paper's UNet. Their input convolution starts
    # at zero, so a base model widened to take them computes exactly what it did (``widened``)
    edit_channels: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def condition_channels(self) -> int:
        """Channels of the conditioning tensor the UNet takes with x_t: buffers (9), then the edit's."""
        return self.in_channels - 3 + self.edit_channels

    def to_json(self) -> dict:
        data = asdict(self)
        data["channel_mult"] = list(self.channel_mult)
        data["attention_resolutions"] = list(self.attention_resolutions)
        if not self.edit_channels:  # the paper's UNet: its config (and what is keyed by it) as before the field
            del data["edit_channels"]
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
    if cfg.edit_channels:
        problems.append("an input for the physical edit (the paper's code has none)")
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
    """GroupNorm with float32 statistics (stable under mixed precision).

    ``fused`` (the default) computes the statistics with float32 accumulators straight from the
    activation, whatever its dtype, and normalises in one pass (``scale_shift`` then ``apply``); off,
    it is the old recipe: the activation copied to float32, normalised there, and cast back. The two
    agree to float32 rounding on float32 inputs (tests/test_fused.py)."""

    fused: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x.float()).type(x.dtype)
        return apply_scale_shift(x, *self.scale_shift(x))

    def scale_shift(
        self, x: torch.Tensor, film: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (batch, channel) float32 ``scale`` and ``shift`` with ``x * scale + shift`` equal to this
        norm of ``x`` (its affine included), followed by the FiLM ``film = (A, B)``, ``h * A + B``, when given.

        With mean m and 1/std r of x's group and the affine (gamma, beta): norm(x) = x*r*gamma + beta - m*r*gamma;
        then (norm(x))*A + B = x*(r*gamma*A) + ((beta - m*r*gamma)*A + B)."""
        mean, rstd = group_statistics(x, self.num_groups, self.eps)  # (B, G) float32
        scale = rstd[:, :, None]  # (B, G, 1), spread over each group's channels below
        shift = -mean[:, :, None] * scale
        if self.affine:  # (G, C/G) per channel: (B, G, C/G) results, (B, C) as views
            weight = self.weight.float().unflatten(0, (self.num_groups, -1))
            scale, shift = scale * weight, shift * weight + self.bias.float().unflatten(0, (self.num_groups, -1))
        else:
            scale, shift = (v.expand(-1, -1, x.shape[1] // self.num_groups) for v in (scale, shift))
        scale, shift = scale.flatten(1), shift.flatten(1)  # (B, C)
        if film is not None:
            a, b = film
            scale, shift = scale * a, shift * a + b
        return scale, shift


def group_statistics(x: torch.Tensor, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and 1/sqrt(var + eps) of each (sample, group) of ``x`` (B, C, ...), float32, (B, groups).

    Two reductions over the spatial positions give each channel's sum and sum of squares in float32
    (``sum(..., dtype=float32)``, ``linalg.vector_norm(..., dtype=float32)``). No float32 copy of ``x``
    is made: on CUDA both kernels read half or bfloat16 values, accumulate in float32 and write float32
    (ATen's "cast and reduction in a single kernel" branches of its sum and norm reductions); a
    per-channel reduction over (H, W) is fast in either memory layout, on the CPU as well (torch.var_mean,
    Welford's update, measured 10x slower than GroupNorm there). A group's variance is the mean of its
    channels' variances plus the variance of their means (exact), each channel's E[x^2] - mean^2 losing
    about 1e-7 * (mean/std)^2 of itself to float32 rounding, where mean/std is within one channel (the
    spread between channels, a group's larger part, is not cancelled). Under torch.compile both
    reductions become one kernel."""
    dims = tuple(range(2, x.dim()))
    count = x[0, 0].numel()
    channel_mean = x.sum(dim=dims, dtype=torch.float32).unflatten(1, (groups, -1)) / count  # (B, G, C/G)
    channel_square = torch.linalg.vector_norm(x, 2, dim=dims, dtype=torch.float32).square().unflatten(1, (groups, -1))
    channel_var = (channel_square / count - channel_mean.square()).clamp_min(0)
    mean = channel_mean.mean(-1)
    var = channel_var.mean(-1) + (channel_mean - mean[..., None]).square().mean(-1)
    return mean, torch.rsqrt(var + eps)


def apply_scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool = False) -> torch.Tensor:
    """``x * scale + shift`` with per (batch, channel) float32 ``scale`` and ``shift`` (B, C), then SiLU if
    asked: one multiply-add pass and an in-place SiLU, in ``x``'s dtype and memory layout.

    The multiply-add is computed in float32 with the float32 scale and shift, and rounded to ``x``'s
    dtype once: rounding the shift to bf16 first would cost a group whose mean is m standard deviations
    a bf16 rounding of m, where the separate passes lose only the output's. For a half-precision ``x``
    without autograd it writes into a tensor of ``x``'s dtype (``out=``; on CUDA the kernel reads the
    half and float32 operands as they are, no float32 copy); with autograd, in an ONNX export or under
    torch.compile it goes through float32 and casts back, and inductor fuses all of it into one kernel."""
    for _ in range(x.dim() - 2):  # (B, C, 1, ...): unsqueezed, not viewed to a shape, so that an ONNX
        scale, shift = scale.unsqueeze(-1), shift.unsqueeze(-1)  # export keeps its batch axis dynamic
    if x.dtype == scale.dtype:
        out = torch.addcmul(shift, x, scale)
    elif (
        torch.compiler.is_compiling()  # first: inductor fuses this into one kernel, and nothing below breaks its graph
        or torch.onnx.is_in_onnx_export()
        or (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad))
    ):  # compiled, exported (plain ops recorded) or differentiated (autograd cannot go through out=)
        out = torch.addcmul(shift, x, scale).to(x.dtype)
    else:
        out = torch.addcmul(shift, x, scale, out=torch.empty_like(x))
    return F.silu(out, inplace=True) if silu else out


def film(scale_shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 + s, b) of a FiLM layer's output [s, b] (B, 2C), in float32."""
    s, b = scale_shift.float().chunk(2, dim=1)
    return 1 + s, b


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

    fused: bool = True  # see UNet.set_fused

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
        if self.fused:
            return self._fused(x, emb, latent)
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

    def _fused(self, x: torch.Tensor, emb: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """The same block with each norm, FiLM and SiLU as one scale-shift pass.

        The timestep's FiLM then the latent's, h*(1+s_t)+b_t then h*(1+s_z)+b_z, is h*A + B with
        A = (1+s_t)(1+s_z) and B = b_t(1+s_z) + b_z; the GroupNorm before them folds in too (see
        GroupNorm32.scale_shift), so the activation is read once and written once for all of it."""
        norm_in, conv_in = self.in_layers[0], self.in_layers[2]
        h = apply_scale_shift(x, *norm_in.scale_shift(x), silu=True)
        if self.resample:
            h, x = self._resample(h), self._resample(x)
        h = conv_in(h)
        a_t, b_t = film(self.emb_layers(emb))
        a_z, b_z = film(self.cond_emb_layers(latent))
        norm_out, dropout, conv_out = self.out_layers[0], self.out_layers[2], self.out_layers[3]
        h = apply_scale_shift(h, *norm_out.scale_shift(h, (a_t * a_z, b_t * a_z + b_z)), silu=True)
        return self.skip_connection(x) + conv_out(dropout(h))


class AttentionBlock(nn.Module):
    """Self-attention over all positions of a feature map (heads split as in guided-diffusion's legacy order)."""

    fused: bool = True  # see UNet.set_fused

    def __init__(self, cfg: ModelConfig, channels: int):
        super().__init__()
        self.heads = cfg.heads
        self.norm = GroupNorm32(cfg.groups, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zeroed(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb=None, latent=None) -> torch.Tensor:
        if self.fused:
            return self._fused(x)
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        ch = c // self.heads
        q, k, v = qkv.reshape(b * self.heads, 3 * ch, -1).split(ch, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        h = self.proj_out(out.transpose(1, 2).reshape(b, c, -1))
        return (flat + h).reshape(b, c, *spatial)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same attention computed position-major: the 1x1 convolutions as matmuls on (B, L, C),
        q, k, v as strided views of one qkv tensor in the legacy head order (per head [q, k, v], each
        ``C / heads`` channels), and the result added back as a (B, C, L) view. On a channels-last
        input (B, L, C) is the memory order already, so no transposed copy is made anywhere."""
        _, c, *spatial = x.shape
        flat = x.flatten(2)  # (B, C, L): a view in either memory layout
        normed = self.norm(flat).transpose(1, 2)  # (B, L, C)
        qkv = F.linear(normed, self.qkv.weight[..., 0], self.qkv.bias)  # (B, L, 3C), channels [head, q|k|v, ch]
        q, k, v = qkv.unflatten(2, (self.heads, 3, c // self.heads)).permute(3, 0, 2, 1, 4)  # 3 x (B, heads, L, ch)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, L, C), heads in order
        h = F.linear(out, self.proj_out.weight[..., 0], self.proj_out.bias)
        return (flat + h.transpose(1, 2)).unflatten(2, spatial)


class NormSiLUConv(nn.Sequential):
    """GroupNorm32, SiLU, convolution (the UNet's output head; ``out.0``, ``out.2`` as in guided-diffusion),
    with the norm and SiLU as one scale-shift pass when fused."""

    fused: bool = True  # see UNet.set_fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(x)
        return self[2](apply_scale_shift(x, *self[0].scale_shift(x), silu=True))


class Step(nn.ModuleList):
    """A sequence of layers; ResBlocks and attention receive the embeddings, convolutions do not."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb, latent) if isinstance(layer, ResBlock | AttentionBlock) else layer(x)
        return x


class UNet(nn.Module):
    """guided-diffusion's UNet with the global-latent FiLM of DiffusionRig in every ResBlock.

    Its elementwise work is fused by default (``set_fused``): each GroupNorm with the FiLMs and SiLU
    after it is one scale-shift pass over the activation, with float32 statistics."""

    fused: bool = True  # the mode set_fused last put every block in

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        base = cfg.base_channels
        emb_dim = 4 * base
        self.time_embed = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        ch = int(cfg.channel_mult[0] * base)
        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        # the physical edit's channels, added to the first convolution's output (a separate zero-started
        # convolution rather than wider input weights: adding an exact zero keeps a base model bit for bit)
        self.edit_in = zeroed(nn.Conv2d(cfg.edit_channels, ch, 3, padding=1)) if cfg.edit_channels else None
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
        self.out = NormSiLUConv(
            GroupNorm32(cfg.groups, ch), nn.SiLU(), zeroed(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, buffers: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Predicted noise for noisy images (B, 3, H, W) at timesteps t (B,), given the buffers (B, 9, H, W),
        followed, for a model with ``edit_channels``, by the physical edit's channels (``condition_channels``)."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.base_channels).to(x_t.dtype))
        buffers = buffers.to(x_t.dtype)
        extra = None
        if self.edit_in is not None:
            split = self.cfg.in_channels - 3
            buffers, extra = buffers[:, :split], buffers[:, split:]
        h = torch.cat([x_t, buffers], dim=1)
        latent = latent.to(x_t.dtype)
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, latent)
            if i == 0 and extra is not None:
                h = h + self.edit_in(extra)
            skips.append(h)
        h = self.middle_block(h, emb, latent)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, latent)
        return self.out(h)

    def set_fused(self, on: bool = True) -> UNet:
        """Fused elementwise passes (the default) or the separate ones they replace, in every block.

        The same parameters either way; the unfused path is kept to measure and test the fused one
        against (``rig bench`` compares them in one run)."""
        for module in self.modules():
            if isinstance(module, UNet | ResBlock | AttentionBlock | GroupNorm32 | NormSiLUConv):
                module.fused = on
        return self


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

    def latent_images(self, images: torch.Tensor, buffers: torch.Tensor) -> torch.Tensor:
        """What the latent is encoded from in training: the clean images, or for a model conditioned on
        the physical edit the edit's own crop (the target is another photo, which an edit never has)."""
        if not self.cfg.edit_channels:
            return images
        start = self.cfg.in_channels - 3
        return buffers[:, start : start + 3]

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


EDIT_CHANNELS = 4  # the physically edited crop (3) and the mask of what the photo never showed (1)


def widened(model: DiffusionRig, edit_channels: int = EDIT_CHANNELS) -> DiffusionRig:
    """``model`` (a base model, the paper's layout) as one that also takes the physical edit: the same
    weights, and a zero input convolution for the edit's channels, so it computes exactly what
    ``model`` did until fine-tuning teaches it to use them."""
    if model.cfg.edit_channels == edit_channels:
        return model
    if model.cfg.edit_channels:
        raise RigError(f"the model already takes {model.cfg.edit_channels} edit channels, not {edit_channels}")
    wide = DiffusionRig(replace(model.cfg, edit_channels=edit_channels)).to(next(model.parameters()).device)
    missing, unexpected = wide.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("denoisingUNet.edit_in.") for k in missing):
        raise RigError(f"cannot widen the model: missing {missing}, unexpected {unexpected}")
    return wide.train(model.training)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
