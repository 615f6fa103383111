"""DECA's encoder as a face estimator: ResNet-50 E_flame, its crop, and its codes turned into a FaceFit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rigcli import RigError
from rigcli.estimate.landmarks import interocular, project_landmarks
from rigcli.face.flame import CENTIMETRES, FlameFaceModel
from rigcli.face.flame_mesh import axis_angle_to_matrix
from rigcli.face.params import FaceFit, matrix_to_euler
from rigcli.image.align import invert_affine, warp
from rigcli.render.buffers import rasterize_fit, sh_shading, skin_mask

DECA_SPLIT = (("shape", 100), ("tex", 50), ("exp", 50), ("pose", 6), ("cam", 3), ("light", 27))


DECA_CODE_SIZE = sum(n for _, n in DECA_SPLIT)


DECA_INPUT_SIZE = 224


DECA_CROP_SCALE = 1.25  # DECA's TestData scale


DECA_LANDMARK_BOX = 1.1  # DECA's bbox2point for a 68-landmark box


class Bottleneck(nn.Module):
    """ResNet-50 block: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4, identity or projected shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50Trunk(nn.Module):
    """ResNet-50 without its classifier: image (B, 3, H, W) -> pooled features (B, 2048)."""

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            stride = 1 if i == 0 else 2
            layer = []
            for k in range(count):
                layer.append(Bottleneck(inplanes, planes, stride if k == 0 else 1))
                inplanes = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(x, 3, stride=2, padding=1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean((2, 3))  # DECA's 7x7 average pool on a 224 input


class DecaEncoder(nn.Module):
    """DECA's coarse encoder ``E_flame``: crop (B, 3, 224, 224) RGB in [0, 1] -> code (B, 236)."""

    def __init__(self, out_size: int = DECA_CODE_SIZE) -> None:
        super().__init__()
        self.encoder = ResNet50Trunk()
        self.layers = nn.Sequential(nn.Linear(2048, 1024), nn.ReLU(), nn.Linear(1024, out_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(self.encoder(images))

    @staticmethod
    def from_state_dict(state: dict[str, torch.Tensor]) -> DecaEncoder:
        """The encoder with ``deca_model.tar['E_flame']``'s weights, in eval mode; a RigError names
        the keys that differ when the state dict is not DECA's coarse encoder."""

        encoder = DecaEncoder()
        expected = encoder.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
        if missing or unexpected or wrong:
            parts = [
                f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if keys
            ]
            raise RigError("not DECA's E_flame state dict (" + "; ".join(parts) + ")")
        encoder.load_state_dict(state, strict=True)
        return encoder.eval()


def decompose(code: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split DECA codes (B, 236) into shape, tex, exp, pose, cam and light (B, 9, 3)."""
    if code.shape[-1] != DECA_CODE_SIZE:
        raise ValueError(f"a DECA code has {DECA_CODE_SIZE} numbers, not {code.shape[-1]}")
    out, start = {}, 0
    for name, size in DECA_SPLIT:
        out[name] = code[:, start : start + size]
        start += size
    out["light"] = out["light"].reshape(-1, 9, 3)
    return out


def deca_crop_box(landmarks: np.ndarray, scale: float = DECA_CROP_SCALE) -> tuple[np.ndarray, float]:
    """Centre (2,) and side of DECA's square crop around 68 landmarks (N, 2) in pixels.

    Side = scale x 1.1 x the mean of the landmark box's width and height, truncated to whole
    pixels as DECA does; centre = the box's centre.
    """
    lo, hi = landmarks.min(0), landmarks.max(0)
    mean_side = ((hi - lo).sum()) / 2 * DECA_LANDMARK_BOX
    return (lo + hi) / 2, float(int(mean_side * scale))


def deca_crop_transform(landmarks: np.ndarray, size: int = DECA_INPUT_SIZE) -> np.ndarray:
    """2x3 affine from photo pixels to crop pixels: the box's corners go to pixel 0 and size - 1."""
    centre, side = deca_crop_box(landmarks)
    k = (size - 1) / side
    return np.array([[k, 0.0, -k * (centre[0] - side / 2)], [0.0, k, -k * (centre[1] - side / 2)]])


def deca_crop(rgb: np.ndarray, landmarks: np.ndarray, size: int = DECA_INPUT_SIZE) -> tuple[torch.Tensor, np.ndarray]:
    """DECA's input for one 8-bit photo (H, W, 3): (3, size, size) float RGB in [0, 1] (bilinear,
    the photo reflected where the square leaves it, as ``align`` does) and the photo-to-crop affine."""

    to_crop = deca_crop_transform(np.asarray(landmarks, dtype=np.float64), size)
    crop = warp(rgb, invert_affine(to_crop), size)
    image = torch.from_numpy(np.ascontiguousarray(crop)).float() / 255.0
    return image.permute(2, 0, 1).contiguous(), to_crop


@dataclass
class DecaOrthoCamera:
    """DECA's orthographic camera: normalized image coordinates = s * (X[:2] + t), y flipped."""

    scale: torch.Tensor  # (B,)
    translation: torch.Tensor  # (B, 2)

    @staticmethod
    def from_code(cam: torch.Tensor) -> DecaOrthoCamera:
        return DecaOrthoCamera(cam[:, 0], cam[:, 1:3])

    def to_pixels(self, points: torch.Tensor, size: int) -> torch.Tensor:
        """(B, N, 3) model points -> (B, N, 2) pixel coordinates in a size x size crop (y down)."""
        ndc = self.scale[:, None, None] * (points[..., :2] + self.translation[:, None])
        ndc = ndc * torch.tensor([1.0, -1.0], dtype=ndc.dtype)
        return (ndc + 1) * size / 2


def rotate_light_about_z(light: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """SH light (B, 9, 3) for a scene turned by ``angle`` (B,) radians about the camera's z axis, so
    that shading(Rz n, rotated) = shading(n, light). Order 1 (x, y) and the (xz, yz) pair turn with
    the angle, the (2xy, x^2 - y^2) pair with twice it (DECA's constant for xy is twice that of
    x^2 - y^2); the rest is symmetric about z."""
    c, s = torch.cos(angle)[:, None], torch.sin(angle)[:, None]
    c2, s2 = torch.cos(2 * angle)[:, None], torch.sin(2 * angle)[:, None]
    out = light.clone()
    for a, b in ((1, 2), (5, 6)):  # (x, y) and (xz, yz)
        out[:, a] = c * light[:, a] - s * light[:, b]
        out[:, b] = s * light[:, a] + c * light[:, b]
    out[:, 4] = c2 * light[:, 4] + s2 * light[:, 7]  # xy
    out[:, 7] = -s2 * light[:, 4] + c2 * light[:, 7]  # x^2 - y^2
    return out


def _fit_width(values: torch.Tensor, width: int) -> torch.Tensor:
    """(B, n) -> (B, width) float32: cut, or padded with zeros (components DECA does not estimate)."""
    values = values[:, :width].to(torch.float32)
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))


def deca_to_fit(
    model: FlameFaceModel,
    params: dict[str, torch.Tensor],
    crop_to_frame: np.ndarray,
    crop_size: int = DECA_INPUT_SIZE,
    shared_identity: bool = True,
):
    """DECA's parameters of a batch (``decompose``'s dict) as the fitter's ``FaceFit`` in another frame.

    ``crop_to_frame`` (B, 2, 3) maps DECA's crop pixels to the target frame's (the aligned crop),
    a similarity. DECA turns the head about FLAME's root joint J0 and projects orthographically,
    pixel = (size / 2) (1 + s (X + t)) with y flipped; the fitter turns about the origin, so the
    turn's offset J0 - R J0 joins the translation, and an in-plane turn of the crop joins the
    rotation (as roll) and the light. With ``shared_identity`` the person's shape is the mean of
    DECA's shapes over the batch, as the paper fixed it; albedo is left to the caller.
    """

    flame = model.flame
    shape = _fit_width(params["shape"], flame.n_shape)
    exp = _fit_width(params["exp"], flame.n_exp)
    pose = params["pose"].to(torch.float32)
    cam = params["cam"].to(torch.float32)
    batch = shape.shape[0]
    identity = shape.mean(0) if shared_identity else shape
    rest_pose = torch.zeros(batch, flame.joint_count, 3)
    with torch.no_grad():
        _, joints = flame(identity.expand(batch, -1), exp, rest_pose)
    root = joints[:, 0]  # metres; at rest the posed joints are the regressed ones
    rotation = axis_angle_to_matrix(pose[:, :3])
    offset = (root - (rotation @ root[..., None])[..., 0])[:, :2] + cam[:, 1:3]
    half = crop_size / 2
    scale = half * cam[:, 0] / CENTIMETRES
    translation = torch.stack([half * (1 + cam[:, 0] * offset[:, 0]), half * (1 - cam[:, 0] * offset[:, 1])], 1)

    affine = torch.as_tensor(np.asarray(crop_to_frame, dtype=np.float64)).reshape(-1, 2, 3).expand(batch, 2, 3)
    linear, shift = affine[:, :, :2].to(torch.float32), affine[:, :, 2].to(torch.float32)
    det = torch.linalg.det(linear)
    if (det <= 0).any():
        raise ValueError("crop_to_frame must keep orientation (no mirror)")
    k = det.sqrt()
    flip = torch.diag(torch.tensor([1.0, -1.0]))
    turn2d = flip @ linear @ flip / k[:, None, None]  # the image-plane turn, in the camera's y-up axes
    turn = torch.eye(3).repeat(batch, 1, 1)
    turn[:, :2, :2] = turn2d
    rotation = turn @ rotation
    angles = matrix_to_euler(rotation)
    light = rotate_light_about_z(params["light"].to(torch.float32), torch.atan2(turn2d[:, 1, 0], turn2d[:, 0, 0]))
    jaw = pose[:, 3:6]
    return FaceFit(
        yaw=angles[:, 0],
        pitch=angles[:, 1],
        roll=angles[:, 2],
        scale=k * scale,
        translation=(linear @ translation[..., None])[..., 0] + shift,
        expression=torch.cat([exp, jaw], 1),
        identity=identity,
        light=light,
    )


def albedo_under_light(model, fit, images: torch.Tensor) -> torch.Tensor:
    """Per-photo skin albedo (B, 3) that best explains crops (B, H, W, 3) in [0, 1] under the fit's
    light: least squares of image = albedo x shading over the visible skin (``render.buffers.skin_mask``)."""

    geometry = rasterize_fit(model, fit, images.shape[1])
    mask = skin_mask(model, geometry).to(torch.float32)[..., None]
    shading = sh_shading(geometry.normals, fit.light)
    num = (images * shading * mask).sum((1, 2))
    den = (shading * shading * mask).sum((1, 2))
    fallback = (images * mask).sum((1, 2)) / mask.sum((1, 2)).clamp_min(1)
    return torch.where(den > 1e-6, num / den.clamp_min(1e-12), fallback).clamp(0, 1)


def estimate_with_deca(
    encoder,
    model: FlameFaceModel,
    crops: np.ndarray,
    landmarks: np.ndarray,
    shared_identity: bool = True,
    batch_size: int = 8,
    progress=None,
    identity_rows=None,
    identity: torch.Tensor | None = None,
):
    """FLAME parameters of photos by DECA's encoder, as the paper's data step estimated them:
    ``(fit, params)``, params being DECA's decomposed codes (``tex`` for ``render_deca_buffers``).

    ``crops`` (B, H, W, 3) uint8 are the aligned crops and ``landmarks`` (B, 68, 2) their 68 points
    in the same pixels; DECA sees its own 224 crop of each (``deca_crop``), and the result is a
    ``FaceFit`` in the aligned frame with DECA's light and texture code, the mean shape over the batch when
    ``shared_identity`` (the paper's per-person shape), a skin albedo under that light, and the
    landmark error; ``identity_rows`` (indices) takes that mean over those photos only (a person's
    training photos, not their outliers); ``identity`` (n_shape,) fixes the shape instead (a known
    person's, at edit time). ``encoder`` maps (N, 3, 224, 224) in [0, 1] to (N, 236) codes (a
    ``DecaEncoder`` with DECA's weights). ``progress(done, total)`` follows the photos.
    """

    inputs, to_frame = [], []
    for rgb, points in zip(crops, landmarks, strict=True):
        image, to_crop = deca_crop(rgb, points)
        inputs.append(image)
        to_frame.append(invert_affine(to_crop))
    codes = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            codes.append(encoder(torch.stack(inputs[start : start + batch_size])).to(torch.float32))
            if progress:
                progress(min(start + batch_size, len(inputs)), len(inputs))
        params = decompose(torch.cat(codes))
        if identity is not None:
            params["shape"] = identity.to(torch.float32)[None].expand(len(params["shape"]), -1).clone()
        elif identity_rows is not None and shared_identity:
            mean = params["shape"][list(identity_rows)].mean(0, keepdim=True)
            params["shape"] = mean.expand_as(params["shape"]).clone()
        fit = deca_to_fit(model, params, np.stack(to_frame), shared_identity=shared_identity)
        fit.texture = params["tex"].to(torch.float32).clone()  # rendered when a texture space is imported
        images = torch.from_numpy(np.asarray(crops)).to(torch.float32) / 255.0
        fit.albedo = albedo_under_light(model, fit, images)
        lm = torch.as_tensor(np.asarray(landmarks), dtype=torch.float32)
        pred = project_landmarks(model, fit, None)
        fit.landmark_error = (pred - lm).norm(dim=-1).mean(1) / interocular(lm).clamp_min(1.0)
    return fit, params
