"""DiffusionRig's physical buffers from a fit: SH shading (DECA's constants), normals, albedo.

- Lighting: second-order spherical harmonics, 9 coefficients per colour, with DECA's constants
  (it leaves the factor pi off the constant term): ``shading(n) = sum_k L[k] c[k] Y[k](n)``.
- Buffers, channel order: shaded = albedo x shading (3), unit normals in camera space (x right,
  y up, z toward the viewer, in [-1, 1]) (3), albedo (3); zero where there is no face.

Every caller (training data, edits, sheets, the light fit) rasterizes and shades through here, so
they all see the same pixels; the face model answers for its own albedo.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from rigcli.face.model import FaceModel, vertex_normals
from rigcli.face.params import FaceFit, rescale_fit
from rigcli.render.raster import project, rasterize

# DECA's SH constants for Y = [1, x, y, z, xy, xz, yz, x^2 - y^2, 3z^2 - 1]
SH_CONSTANTS = torch.tensor(
    [
        1 / math.sqrt(4 * math.pi),
        *[(2 * math.pi / 3) * math.sqrt(3 / (4 * math.pi))] * 3,
        *[(math.pi / 4) * 3 * math.sqrt(5 / (12 * math.pi))] * 3,
        (math.pi / 4) * (3 / 2) * math.sqrt(5 / (12 * math.pi)),
        (math.pi / 4) * (1 / 2) * math.sqrt(5 / (4 * math.pi)),
    ],
    dtype=torch.float64,
)


# Orthonormal real-SH normalisations for the same polynomials (c[k] = A_l * these, with DECA's A_0 = 1).
_SH_NORMS = torch.tensor(
    [
        1 / math.sqrt(4 * math.pi),
        *[math.sqrt(3 / (4 * math.pi))] * 3,
        *[3 * math.sqrt(5 / (12 * math.pi))] * 3,
        (3 / 2) * math.sqrt(5 / (12 * math.pi)),
        (1 / 2) * math.sqrt(5 / (4 * math.pi)),
    ],
    dtype=torch.float64,
)


BUFFER_CHANNELS = ("shaded", "normal", "albedo")

# Cast shadows (``shadow_visibility``): a depth map of the mesh seen from the light, its side fitted
# to the mesh's extent across the light; lengths below are fractions of that extent (the head's size)
SHADOW_MAP_SIZE = 512  # texels per side of the light's depth map (about 0.5 mm on a head)
SHADOW_SOFTNESS = 0.006  # of the extent: the PCF's radius, half the penumbra (a window light's, not a bulb's)
SHADOW_TAPS = 7  # PCF taps per side over that radius (a Gaussian-weighted square grid)
SHADOW_BIAS = 0.002  # of the extent: how far behind the front-most surface a point still counts as lit
SHADOW_SLOPE_MAX = 8.0  # the receiver plane's depth slope, texels of depth per texel, at most (grazing light)
SHADOW_KEEP = 0.25  # the least fraction of its shading a point in full shadow keeps
SHADOW_NORMAL_OFFSET = 1.5  # texels: each point is moved this far out along its normal first (the facets' own acne)


def sh_basis(normals: torch.Tensor) -> torch.Tensor:
    """The 9 polynomials Y(n) = [1, x, y, z, xy, xz, yz, x^2 - y^2, 3z^2 - 1], shape (..., 9)."""
    x, y, z = normals.unbind(-1)
    one = torch.ones_like(x)
    return torch.stack([one, x, y, z, x * y, x * z, y * z, x * x - y * y, 3 * z * z - 1], dim=-1)


def sh_shading(normals: torch.Tensor, light: torch.Tensor) -> torch.Tensor:
    """Lambertian SH shading per colour: normals (B, ..., 3), light (B, 9, 3) -> (B, ..., 3)."""
    basis = sh_basis(normals) * SH_CONSTANTS.to(normals)
    flat = basis.reshape(basis.shape[0], -1, 9)
    return torch.bmm(flat, light.to(normals)).reshape(*normals.shape[:-1], 3)


LIGHT_DIRECTIONS = {  # camera space: x to the image's right, y up, z toward the viewer
    "front": (0.0, 0.0, 1.0),
    "left": (-1.0, 0.0, 0.6),
    "right": (1.0, 0.0, 0.6),
    "top": (0.0, 1.0, 0.6),
    "bottom": (0.0, -1.0, 0.6),
    "back": (0.0, 0.3, -1.0),
}


def light_for(
    direction: Sequence[float], intensity: float, ambient: float, normals: torch.Tensor | None
) -> torch.Tensor:
    """A white SH light (9, 3) from a direction; without explicit intensity/ambient it is scaled so
    the shading averages 1 over ``normals`` (the face keeps its overall brightness)."""

    light = light_from_direction(torch.tensor(direction, dtype=torch.float64), intensity, ambient).float()
    if normals is not None and len(normals):
        mean = sh_shading(normals[None].float(), light[None])[0].mean()
        light = light / mean.clamp_min(1e-3)
    return light


def light_from_direction(
    direction: torch.Tensor, intensity: float | torch.Tensor = 1.0, ambient: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """SH coefficients (9, 3) whose shading is ambient + intensity * max(0, n . d), to second order.

    Closed form: the clamped cosine's SH coefficients are A_l * Y_lm(d) (A = pi, 2pi/3, pi/4); DECA's
    constants already hold A_l for l >= 1 and omit A_0 = pi, so L_0 = sqrt(4 pi) (ambient + intensity/4)
    and L_k = intensity * Y_k(d) for k >= 1 (orthonormal Y). ``intensity`` and ``ambient`` may be
    per-colour tensors of shape (3,).
    """
    d = torch.as_tensor(direction, dtype=torch.float64)
    d = d / d.norm()
    intensity = torch.as_tensor(intensity, dtype=torch.float64).expand(3)
    ambient = torch.as_tensor(ambient, dtype=torch.float64).expand(3)
    lobe = sh_basis(d) * _SH_NORMS  # orthonormal Y_k(d)
    light = lobe[:, None] * intensity[None, :]
    light[0] = math.sqrt(4 * math.pi) * (ambient + intensity / 4)
    return light


def dominant_direction(light: torch.Tensor) -> torch.Tensor:
    """Unit direction of the light's first-order (linear) part, averaged over colours: (..., 9, 3) -> (..., 3)."""
    linear = light[..., 1:4, :].mean(-1)
    return linear / linear.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def light_direction(light: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """Unit direction (3,) of the single light, ambient + intensity * max(0, n . d), whose shading
    best matches ``light``'s (9, 3; colours averaged) over ``normals`` (N, 3), the face's visible skin.

    This is what a face's pixels determine. ``dominant_direction`` reads the first-order terms alone,
    which a face does not pin down: its normals cover half the sphere, mostly facing the camera, so
    the z term trades off against the constant and 3z^2 - 1 terms, and a frontal light's fitted
    direction can swing by tens of degrees while its shading stays the same. Least squares over the
    two amplitudes for each direction (closed form from the 9x9 Gram matrix of the normals'
    polynomials), over a sphere of directions refined three times around the best; intensity > 0.
    With no normals, or a light no such light explains (all zero), it is ``dominant_direction``."""
    basis = sh_basis(normals.double().reshape(-1, 3)) * SH_CONSTANTS
    gram = basis.T @ basis
    target = light.double().reshape(9, -1).mean(-1)
    ambient = torch.zeros(9, dtype=torch.float64)
    ambient[0] = math.sqrt(4 * math.pi)
    aa, at, tt = ambient @ gram @ ambient, ambient @ gram @ target, target @ gram @ target

    def residual(directions: torch.Tensor) -> torch.Tensor:
        lobes = sh_basis(directions) * _SH_NORMS  # (K, 9): the clamped cosine of each direction, unit intensity
        lobes[:, 0] = math.sqrt(4 * math.pi) / 4
        al, ll, lt = lobes @ gram @ ambient, ((lobes @ gram) * lobes).sum(1), lobes @ gram @ target
        det = (aa * ll - al * al).clamp_min(1e-12)
        intensity = (aa * lt - al * at) / det
        explained = (ll * at * at - 2 * al * at * lt + aa * lt * lt) / det
        return torch.where(intensity > 0, tt - explained, torch.inf)

    count = 2048  # a Fibonacci sphere: about 4.5 deg between neighbours
    k = torch.arange(count, dtype=torch.float64) + 0.5
    polar, azimuth = torch.acos(1 - 2 * k / count), math.pi * (1 + math.sqrt(5)) * k
    directions = torch.stack([azimuth.cos() * polar.sin(), azimuth.sin() * polar.sin(), polar.cos()], 1)
    first = residual(directions)
    if not bool(torch.isfinite(first).any()):  # no skin, or no light (a fit that found too little skin)
        return dominant_direction(light)
    best = directions[int(first.argmin())]
    steps = torch.linspace(-1, 1, 9, dtype=torch.float64)
    for spacing in (math.radians(1.5), math.radians(0.4), math.radians(0.1)):  # 9 x 9 grids around the best
        u = torch.linalg.cross(best, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64) if abs(best[1]) < 0.9
                               else torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))  # fmt: skip
        u = u / u.norm()
        v = torch.linalg.cross(best, u)
        du, dv = torch.meshgrid(steps * 4 * spacing, steps * 4 * spacing, indexing="ij")
        near = best + du.reshape(-1, 1) * u + dv.reshape(-1, 1) * v
        near = torch.cat([best[None], near / near.norm(dim=1, keepdim=True)])
        best = near[int(residual(near).argmin())]
    return best.to(light.dtype)


def light_frame(direction: torch.Tensor) -> torch.Tensor:
    """(3, 3) rotation whose rows are camera-space axes (a, b, d), d the unit light direction and
    a x b = d: ``project`` with it views the mesh from the light as the camera views it from +z."""
    d = direction.double() / direction.double().norm().clamp_min(1e-12)
    helper = torch.tensor([0.0, 1.0, 0.0] if abs(float(d[1])) < 0.9 else [1.0, 0.0, 0.0], dtype=torch.float64)
    a = torch.linalg.cross(helper, d)
    a = a / a.norm()
    return torch.stack([a, torch.linalg.cross(d, a), d])


def shadow_visibility(
    vertices: torch.Tensor,
    triangles: torch.Tensor,
    points: torch.Tensor,
    normals: torch.Tensor,
    direction: torch.Tensor,
    size: int = SHADOW_MAP_SIZE,
    softness: float = SHADOW_SOFTNESS,
) -> torch.Tensor:
    """How much of a directional light from ``direction`` reaches each surface point, in [0, 1]: the
    mesh's cast (and attached) shadows, which second-order SH shading cannot hold.

    ``vertices`` (V, 3): one mesh in camera space; ``points``, ``normals`` (..., 3): the camera-space
    surface points asked about and their unit normals (zero normals: no surface, visibility 1).
    A shadow map: the mesh rasterized orthographically along the light (no culling: an open mesh's
    nearest surface is the occluder whichever way it faces) into ``size`` texels over its extent,
    and each point compared with the depth there, by percentage-closer filtering over a Gaussian
    grid of SHADOW_TAPS^2 texels within ``softness`` of the extent, so the shadow's edge is a
    penumbra, not a staircase. Each tap compares with the point's own tangent plane carried to that
    texel (receiver-plane depth bias, its slope capped at SHADOW_SLOPE_MAX) plus SHADOW_BIAS, so a
    lit surface does not shadow itself. Points facing away from the light (n . d <= 0) get 1: their
    darkness is the shading's, not a shadow's."""
    frame = light_frame(direction).to(vertices.dtype)
    local = vertices @ frame.T
    lo, hi = local[:, :2].amin(0), local[:, :2].amax(0)
    centre, extent = (lo + hi) / 2, float((hi - lo).max()) * 1.02
    texel = extent / size

    def to_map(q: torch.Tensor) -> torch.Tensor:  # light-frame points -> (u, v, depth), v down
        u = (q[..., 0] - centre[0]) / texel + (size - 1) / 2
        v = -(q[..., 1] - centre[1]) / texel + (size - 1) / 2
        return torch.stack([u, v, q[..., 2]], -1)

    screen = to_map(local)[None]
    frags = rasterize(screen, triangles, size, size, cull_back=False)
    depth = frags.interpolate(screen[..., 2:], triangles)[0, ..., 0]
    depth = torch.where(frags.mask[0], depth, -torch.inf)

    shape = points.shape[:-1]
    n = normals.reshape(-1, 3).to(frame) @ frame.T
    q = to_map((points.reshape(-1, 3).to(frame) @ frame.T) + SHADOW_NORMAL_OFFSET * texel * n)
    facing = n[:, 2] > 1e-6  # only these are looked up (no surface, or turned away: 1)
    n, q = n[facing], q[facing]
    nz = n[:, 2]
    # the tangent plane's depth per texel right (u) and down (v): z = -(nx x + ny y) / nz, v = -y / texel
    slope_u = (-n[:, 0] / nz).clamp(-SHADOW_SLOPE_MAX, SHADOW_SLOPE_MAX) * texel
    slope_v = (n[:, 1] / nz).clamp(-SHADOW_SLOPE_MAX, SHADOW_SLOPE_MAX) * texel
    radius = softness * size
    steps = torch.linspace(-radius, radius, SHADOW_TAPS, dtype=frame.dtype)
    sigma = max(radius / 2, 1e-6)
    lit, total = torch.zeros_like(nz, dtype=torch.float64), 0.0  # a wholly lit point: exactly 1
    for du in steps.tolist():
        for dv in steps.tolist():
            weight = math.exp(-(du * du + dv * dv) / (2 * sigma * sigma))
            col, row = (q[:, 0] + du).round(), (q[:, 1] + dv).round()
            inside = (col >= 0) & (col <= size - 1) & (row >= 0) & (row <= size - 1)
            front = depth[row.clamp(0, size - 1).long(), col.clamp(0, size - 1).long()]
            plane = q[:, 2] + slope_u * (col - q[:, 0]) + slope_v * (row - q[:, 1])
            lit += weight * (~inside | (plane >= front - SHADOW_BIAS * extent)).double()
            total += weight
    visibility = torch.ones(facing.shape, dtype=torch.float64)
    visibility[facing] = lit / total
    return visibility.reshape(shape).to(points.dtype)


def light_split(light: torch.Tensor, normals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``light`` (9, 3) as ambient + intensity * max(0, n . d) over ``normals`` (N, 3), the face's
    visible skin: the direction d (3,) (``light_direction``) and the intensity per colour (3,), by
    least squares of those two amplitudes with d fixed (closed form over the normals' Gram matrix),
    at least 0. The directional part is what a cast shadow takes away (``shadowed_shading``)."""
    direction = light_direction(light, normals)
    basis = sh_basis(normals.double().reshape(-1, 3)) * SH_CONSTANTS
    gram = basis.T @ basis
    flat = torch.zeros(9, dtype=torch.float64)
    flat[0] = math.sqrt(4 * math.pi)
    lobe = light_from_direction(direction.double(), 1.0, 0.0)[:, 0]  # the unit clamped cosine
    target = light.double()
    aa, al, ll = flat @ gram @ flat, flat @ gram @ lobe, lobe @ gram @ lobe
    at, lt = flat @ gram @ target, lobe @ gram @ target  # (3,) each
    intensity = (aa * lt - al * at) / (aa * ll - al * al).clamp_min(1e-12)
    return direction, intensity.clamp_min(0).to(light.dtype)


def shadowed_shading(
    shading: torch.Tensor,
    normals: torch.Tensor,
    direction: torch.Tensor,
    intensity: torch.Tensor,
    visibility: torch.Tensor,
) -> torch.Tensor:
    """SH ``shading`` (..., 3) at ``normals`` (..., 3) less what the cast shadows of ``visibility``
    (...) take: (1 - vis) times the light's directional part, ``intensity`` (3,) times the second-order
    SH clamped cosine about ``direction`` (``light_split``), so a point in full shadow keeps the rest
    of the light (its ambient, and what the split leaves over): the sky and the bounce that fill a
    real shadow. A shadow never brightens, and keeps at least SHADOW_KEEP of the shading (a fitted
    light's split is uncertain, and no face's shadow is black)."""
    lobe = light_from_direction(direction.double(), 1.0, 0.0)[None].to(shading)
    direct = intensity.to(shading) * sh_shading(normals.reshape(1, -1, 3).to(shading), lobe).reshape(shading.shape)
    taken = direct.clamp_min(0).minimum((1 - SHADOW_KEEP) * shading.clamp_min(0))
    return shading - (1 - visibility[..., None].to(shading)) * taken


def skin_vertices(model: FaceModel, radius: float = 1.0) -> torch.Tensor:
    """(V,) bool: the narrow face area minus the eyes, brows and lips (near their landmark vertices)."""
    neutral = model.neutral
    skin = model.regions["narrow_face"].clone()
    features = model.landmark_vertices[17:27].tolist() + model.landmark_vertices[36:68].tolist()
    centres = neutral[features]
    dist = torch.cdist(neutral, centres).min(1).values
    return skin & (dist > radius)


@dataclass
class Geometry:
    """A fit rasterized at crop resolution: fragments, per-pixel unit normals, per-vertex data."""

    fragments: object
    normals: torch.Tensor  # (B, H, W, 3) unit camera-space normals, zero off the mesh
    vertices_cam: torch.Tensor  # (B, V, 3)
    screen: torch.Tensor  # (B, V, 3)


def rasterize_fit(model: FaceModel, fit: FaceFit, size: int) -> Geometry:
    """Rasterize the fitted meshes into size x size crops (the fit's own frame)."""
    batch = len(fit)
    verts = model.vertices(fit.identity.expand(batch, -1), fit.expression)
    screen, cam = project(verts, fit.rotation, fit.scale, fit.translation)
    frags = rasterize(screen, model.triangles, size, size)
    normals = frags.interpolate(vertex_normals(cam, model.triangles), model.triangles)
    normals = normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return Geometry(frags, normals * frags.mask[..., None], cam, screen)


def skin_mask(model: FaceModel, geometry: Geometry) -> torch.Tensor:
    """(B, H, W) bool: the pixels wholly inside the visible skin (``skin_vertices``) of a rasterized
    fit: where the light is fitted and judged (the eyes, brows and lips left out)."""
    batch = geometry.normals.shape[0]
    skin = skin_vertices(model).to(torch.float32)[None, :, None].expand(batch, -1, 1)
    return geometry.fragments.interpolate(skin, model.triangles)[..., 0] > 0.999


def render_buffers(model: FaceModel, fit: FaceFit, size: int, geometry: Geometry | None = None) -> torch.Tensor:
    """DiffusionRig's buffers (B, 9, size, size): shaded, normal, albedo; zero off the face.

    The face model answers for the albedo (``FaceModel.albedo``): the fit's skin colour, or for a
    DECA fit of FLAME with an imported texture space, DECA's texture-space albedo, as the paper's
    data step rendered it. Every caller renders through here, so training data, edits and sheets
    agree."""
    geometry = geometry or rasterize_fit(model, fit, size)
    albedo = model.albedo(fit, geometry.fragments)
    shaded = albedo * sh_shading(geometry.normals, fit.light) * geometry.fragments.mask[..., None]
    buffers = torch.cat([shaded, geometry.normals, albedo], -1)
    return buffers.permute(0, 3, 1, 2).contiguous()


class Rendered:
    """One batch's fit, rasterised once for everything an edit asks of it, each part made on first use:
    the geometry at the crop's size (its face masks and its visible skin's normals) and the buffers
    at the model's size. An edit passes this value down instead of rendering the fit again in each
    step (counted by tests/test_edit.py)."""

    def __init__(self, model: FaceModel, fit: FaceFit, crop_size: int, model_size: int) -> None:
        self.model, self.fit, self.crop_size, self.model_size = model, fit, crop_size, model_size

    def __len__(self) -> int:
        return len(self.fit)

    def take(self, indices: Sequence[int]) -> Rendered:
        """These photos of the batch (in any order, repeats allowed), with what is already rendered
        sliced rather than rendered again."""
        indices = list(indices)
        part = Rendered(self.model, self.fit.select(indices), self.crop_size, self.model_size)
        done = vars(self)  # cached_property keeps each part made in the instance's __dict__
        for name in ("faces", "buffers"):
            if name in done:
                vars(part)[name] = done[name][indices]
        if "skin_normals" in done:
            vars(part)["skin_normals"] = [done["skin_normals"][i] for i in indices]
        return part

    @cached_property
    def geometry(self) -> Geometry:
        """The fit rasterised in its own frame, the aligned crop's ``crop_size`` pixels."""
        with torch.no_grad():
            return rasterize_fit(self.model, self.fit, self.crop_size)

    @cached_property
    def faces(self) -> np.ndarray:
        """(B, crop, crop) bool: where the fitted face covers each aligned crop."""
        return self.geometry.fragments.mask.numpy()

    @cached_property
    def skin_normals(self) -> list[torch.Tensor]:
        """Per photo, the rendered normals of the visible skin (to keep brightness under a new light)."""
        mask = skin_mask(self.model, self.geometry)
        return [self.geometry.normals[i][mask[i]] for i in range(len(self.fit))]

    @cached_property
    def buffers(self) -> torch.Tensor:
        """(B, 9, s, s): the buffers the diffusion model is conditioned on, at its size s."""
        with torch.no_grad():
            fit = rescale_fit(self.fit, self.crop_size, self.model_size)
            return render_buffers(self.model, fit, self.model_size)
