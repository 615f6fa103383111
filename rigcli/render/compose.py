"""All compositing at the photo's own resolution: the physical edit (no model, only the fit before (θ0)
and after (θ1)) and the model's correction carried onto it.

1. Geometry: θ0 and θ1 are the same mesh, so they give a dense correspondence. θ1 is rasterized at
   a working resolution (the crop at about the photo's scale, capped at MAX_WORK_SIZE: the fields
   made there are smooth, and are sampled bilinearly at the photo's pixels); the barycentric point of
   each covered pixel is projected under θ0, and kept where θ0 sees it (a front face, and θ0's z-buffer
   there holds that triangle or one at the same depth). That backward flow is extended outside the
   face by a harmonic fill (cascadic multigrid) with the face's flow as its boundary condition, zero
   beyond a band around the face and near the crop square's edge; the full-resolution photo is
   warped by it (bilinear; a pixel whose flow is zero is copied).
2. Quotient-image relight: the warped photo, in linear light, times the new shading over the old one
   of the same surface point (θ1's normals under θ1's light over θ0's normals under θ0's light; the
   channels' mean when a white light is asked, so the skin keeps its hue), smoothed, times the cast
   shadows of θ1's light over θ0's (each pose's mesh in a shadow map from its light's direction,
   ``buffers.shadow_visibility``: the nose's on the far cheek, the brows' in the eye sockets; at
   their own softness, not smoothed away), clamped to [RATIO_MIN, RATIO_MAX], on the face's skin
   only: 1 on the ears and off the mesh (never a halo on the wall), rising over SILHOUETTE_FADE
   inside the outline, fading over HAIR_FADE across the scalp (no line at the hairline), and over a
   wide band where the mesh's open edge (the neck's cut) or the crop square's edge crosses the face.
   Surface θ1 shows and θ0 hid (a cheek turned into view, the opening of the mouth) is filled from
   ``fill`` (the model's output, crop frame, any size) or else from the photo's own warped and relit
   pixels that border it, inpainted, each kind of surface (skin; hair, brows, lips) from its own
   kind and given its grain, or the texture of its mirror image where the photo shows that (a photo
   turned away from the side a turn reveals) (``photo_fill``, ``kind_fill``, ``region_fill``,
   ``_mirror_detail``; the mesh's openings, where θ1 has no surface, from the render of θ1); so is
   the photo's darker rim of cheek inside its outline (OUTLINE_RIM) where a turn carries it inward
   beside that surface. Where that surface lies under hair the warp brings from inside the photo's
   head (a temple turned into view), the warp is kept: stretched hair reads as hair, a fill as a
   band across it (``warped_hair``; hair in the photo, not a thin line of another colour that the
   warp stretches). An ear a turn brings into view that the photo shows as a sliver (the warp would
   spread it into a flat smear) is the photo's other ear, cut out, mirrored by the mesh's ears and
   laid behind the head (``mirrored_ears``).
3. Composition: a feathered mask over everything that changed; it fades to zero before the crop
   square's edge (where the crop reflects the photo), and outside it the photo is returned bit for bit.
   The per-photo-pixel work (sampling the fields, the warp, the relight, the fill, the blend) runs in
   torch in bands of rows over the mask's reach only, so that a 12 MP photo takes well under a second.
4. The model's part (``rig edit --strength``): ``model_correction`` is what the model added to the
   edit it was given, ``transfer`` carries it onto the photo at its size through the faces' feathered
   mask; ``paste_back_crop`` is the plain blend of a crop into the photo (``--compose plain``).

Conventions: ``crop_to_photo`` (2x3) maps pixel centres of the crop of ``crop_size`` pixels (the fits'
frame) to photo pixels (x = column, y = row); flows are backward: output pixel p shows input p + flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import ndimage, signal, sparse
from scipy.sparse.linalg import spsolve
from scipy.spatial import ConvexHull, cKDTree

from rigcli.face.model import FaceModel, vertex_normals
from rigcli.face.params import FaceFit, rescale_fit
from rigcli.image.align import apply_affine, compose_affine, invert_affine, resize_affine, warp
from rigcli.image.resample import Box, affine_grid, bands, channels, sample, support_box
from rigcli.render.buffers import (
    Geometry,
    light_split,
    rasterize_fit,
    render_buffers,
    sh_shading,
    shadow_visibility,
    shadowed_shading,
    skin_mask,
)

MAX_WORK_SIZE = 512  # working resolution cap (crop pixels) for the correspondence
RATIO_MIN, RATIO_MAX = 0.25, 4.0
SHADE_FLOOR = 0.05  # of the mean shading: the least shading a surface point is taken to have
DEPTH_TOLERANCE = 0.3  # model units (cm): a θ0 z-buffer this close in front still counts as the same surface
FLOW_BAND = 0.10  # of the crop: the flow falls to zero this far outside the face
SILHOUETTE_FADE = 0.025  # of the crop: the shading ratio is 1 on the mesh's outline and the ears, full this far in
HAIR_FADE = 0.08  # of the crop: off the skin (the scalp under the hair) the ratio falls to 1 over this
OPEN_EDGE_BAND = 0.07  # of the crop: the ratio fades to 1 over this band inside the mesh's open edge
EDGE_MARGIN, EDGE_RAMP = 0.02, 0.06  # of the crop: nothing changes within MARGIN of its edge, fully from +RAMP
SEEN_SMOOTH = 0.006  # of the crop: the seen surface's ragged edge is smoothed this much (sigma) for the ratio
RATIO_SIGMA = 0.75 / 1024  # of the crop: smoothing of the log ratio (0.75 px of a 1024 px crop)
STRETCH_MIN = 0.4  # a surface the warp stretches to more than 1 / this of its area in the photo is filled
LASH_WIDTH = 0.05  # of the eye's width: the spread (sigma) of a closed eye's lash line
LASH_REACH = 0.1  # of the eye's width: how far round the landmarks' eye the lids cover (the lashes)
LID_LIFT_MAX = 1.6  # the most a shut lid's fill is brightened toward the skin around it
MESH_SHUT_GAP = 0.04  # of the eye's width: the face model's lid landmarks' gap when its lids meet (ICT's blink)
LID_MEET = 0.85  # a lid that closes this much of the mesh's opening meets the lower one (the rest is lashes)
LID_HOLD_REACH = 0.03  # of the working size: how far round shut lids the model's correction is held off
LID_SHUT = 0.25  # an eye whose opening (over its width) shrinks less than this is left to the warp
REVEAL_REACH = 0.002  # of the crop: a fill stops at the edited head's outline (``photo_head``), a pixel past it
SHADOW_LIFT_MAX = 1.3  # the most the cast shadows' term brightens a point (the photo's own shadows divided out)
OUTLINE_SMOOTH = 0.008  # of the crop: the edited head's outline is smoothed this much (sigma)
OUTLINE_BLEND = 0.006  # of the crop: the photo's outline, a blend of skin and wall, is not a fill's source
OUTLINE_RIM = 0.02  # of the crop: the photo's darker rim of cheek inside its outline, filled where a turn moves it in
SLIVER = 0.008  # of the crop: unseen surface thinner than about twice this is warped, not filled
FILL_REACH = 0.01  # of the crop: how far round the unseen surface the fill is read (feather, resampling)
KIND_CHROMA = 0.25  # a fill's source this far (log of a channel over the channels' mean) from the face's colour
KIND_LIGHT = 2.5  # ... or this many times lighter or darker (linear light) is of another kind (hair, brow, lip)
KIND_SPLIT, KIND_BLEND = 0.35, 0.3  # a fill pixel is the other kind's from this share of its border, fully +BLEND
GRAIN_SIGMA, GRAIN_PATCH = 1.5, 8  # working pixels: a fill's grain is its sources less their blur, in patches
GRAIN_REACH = 0.1  # of the crop: the grain comes from sources of the fill's kind within this of it
GRAIN_EDGE = 2.0  # a patch that reaches detail this many times the pool's median energy (a contour) is not copied
HAIR_WINDOW = 0.02  # of the crop: the photo's hair, where a warp's source lies, is most of the head this wide round it
MIRROR_TOLERANCE = 1e-3  # of the mesh's extent: a vertex this near another's mirror image is its mirror
MIRROR_FACING = 0.65  # a mirror image whose normal points less toward the camera (49 degrees off) is not read
MIRROR_DETAIL = 0.01  # of the crop: a fill takes its texture below this scale from the mirror image
EAR_STRETCH = 0.6  # an ear whose warp spreads the photo's pixels over more than 1 / this of their area is redrawn
EAR_REACH = 0.09  # of the crop: how far round the mesh's ear the photo's ear is looked for
EAR_SHIFT = 0.08  # of the crop: how far the mesh's ear may lie off the photo's
EAR_MARGIN = 0.05  # of the crop: how far the photo's ear may reach past the mesh's, moved onto it
EAR_SATURATION = 0.35  # skin: red over green over blue, blue under 1 - this of red (linear light)
EAR_LIGHT = 0.35  # ... lighter than this share of the ear's median (the temple's shaded skin is not the ear)
EAR_CLOSE = 0.01  # of the crop: gaps in the photo's ear this wide are closed (its shaded rim, a crease)
EAR_SIZE = 2.0  # the photo's ear is within this factor of the mesh's ear's size, or no ear was found
EAR_HOLD = 0.5  # the mesh's ear, moved onto the photo's, must hold skin over at least this share more than not
EAR_EDGE = 0.35  # the photo's ear ends where its colour does: at most this share of a ring round it is skin
EAR_ROWS = 0.02  # of the crop: the rows the sliver and the mirrored ear must share to place the ear by the sliver
EAR_WALL = 0.006  # of the crop: how far past the sliver's edge the wall must show for that row to count
EAR_RING = 0.016  # of the crop: that ring's outer edge, its inner one past the ear's outline blend (OUTLINE_BLEND)


@dataclass
class EarMap:
    """An ear a turn brings into view that the photo shows too thinly to warp (a sliver the warp would
    spread past EAR_STRETCH), to be drawn from the photo's other ear, mirrored (``mirrored_ears``)."""

    affine: np.ndarray  # (3, 2): a working pixel (x, y, 1) under θ1 -> the θ0 pixel of its mirror image
    source: np.ndarray  # (S, S) bool, θ0: the hull of the mesh's other ear, which the photo's ear is matched to
    search: np.ndarray  # (S, S) bool, θ0: where the photo's other ear may lie (off the face, beyond the jaw's end)
    sliver: np.ndarray  # (S, S) bool, θ0: where the photo's own sliver of this ear may lie (the same, this side)
    mirror: np.ndarray  # (3, 2): a working pixel under θ0 -> the θ0 pixel of its mirror image (this ear's)
    outward: float  # +1 or -1: the image's x away from the face on this ear's side under θ0
    beyond: np.ndarray  # (S, S) bool, θ0: off the mesh's head (its ears aside), where a sliver of ear shows


@dataclass
class Correspondence:
    """θ1 -> θ0 at the working resolution (crop frame of ``size`` pixels)."""

    size: int
    flow: np.ndarray  # (S, S, 2) backward flow (du, dv) in working pixels, filled and faded
    covered: np.ndarray  # (S, S) bool: θ1's mesh covers the pixel
    seen: np.ndarray  # (S, S) bool: ... and θ0 sees the same surface point
    unseen: np.ndarray  # (S, S) bool: the photo never showed what θ1 shows here (to be filled)
    log_ratio: np.ndarray  # (S, S, 3) log of the shading ratio, smoothed, bounded, faded
    edge_weight: np.ndarray  # (S, S) 0 within the crop edge's margin, 1 inside
    opening: np.ndarray  # (S, S) bool: inside the mesh's openings (the mouth's, the eyes'), no surface of θ1
    lids: np.ndarray | None = None  # (S, S) bool: the closing lids over the photo's eyes (``lid_cover``), in ``unseen``
    lashes: np.ndarray | None = None  # (S, S) in [0, 1]: the lash line where closing lids meet (``lid_cover``)
    head: np.ndarray | None = None  # (S, S) bool: where the edited head lies (``photo_head``)
    head_cover: np.ndarray | None = None  # (S, S) float32: ... and its outline's blend (``photo_head``)
    from_head: np.ndarray | None = None  # (S, S) bool: the warp brings the pixel from inside the photo's head
    inside: np.ndarray | None = None  # (S, S) bool: inside the photo's head, less its outline's blend (θ0's frame)
    mirror: np.ndarray | None = None  # (S, S, 2) backward flow to the mirror image of the pixel's surface point
    mirror_seen: np.ndarray | None = None  # (S, S) bool: θ0 shows that mirror image, facing the camera
    jaw_rim: np.ndarray | None = None  # (S, S) bool: the photo's rim along its lower jaw (θ0's frame; ``jaw_rim``)
    ear_maps: tuple[EarMap, ...] = ()  # the ears to draw from the photo's other ear (``_ear_maps``)
    front: np.ndarray | None = None  # (S, S) float32: what stands in front of an ear (the head, not its ears)


@dataclass
class PhysicalEdit:
    """The edited photo and the fields that made it, at the photo's size."""

    image: np.ndarray  # (H, W, 3) uint8
    flow: np.ndarray  # (H, W, 2) backward flow (dx, dy) in photo pixels
    ratio: np.ndarray  # (H, W, 3) shading ratio, applied in linear light or sRGB (1 outside the face)
    mask: np.ndarray  # (H, W) float32 in [0, 1]: where the edit is composed in; 0: the input's pixel
    fill: np.ndarray  # (H, W) float32: how much of the pixel comes from the fill (unseen surface)
    lids: np.ndarray  # (H, W) float32: the shut lids drawn over the photo's eyes (``lid_cover``), feathered


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] -> linear light (float32)."""
    return _to_linear(torch.from_numpy(np.asarray(x, np.float32))).numpy()


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Linear light -> sRGB in [0, 1] (float32), clipped to [0, 1] first."""
    return _to_srgb(torch.from_numpy(np.asarray(x, np.float32))).numpy()


def _to_linear(x: torch.Tensor) -> torch.Tensor:
    """sRGB -> linear light (a new tensor)."""
    high = (x + 0.055).mul_(1 / 1.055).pow_(2.4)
    return torch.where(x <= 0.04045, x * (1 / 12.92), high)


def _to_srgb(x: torch.Tensor) -> torch.Tensor:
    """Linear light -> sRGB, clamped to [0, 1] first (a new tensor)."""
    x = x.clamp(0, 1)
    high = x.pow(1 / 2.4).mul_(1.055).sub_(0.055)
    return torch.where(x <= 0.0031308, x * 12.92, high)


def working_size(crop_to_photo: np.ndarray, crop_size: int, cap: int = MAX_WORK_SIZE) -> int:
    """The crop's size at the photo's own scale (photo pixels per crop pixel x crop size), capped."""
    scale = float(np.sqrt(abs(np.linalg.det(np.asarray(crop_to_photo, np.float64)[:, :2]))))
    return int(np.clip(round(crop_size * scale), crop_size, cap))


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return (x * x * (3 - 2 * x)).astype(np.float32)


def harmonic_fill(values: np.ndarray, known: np.ndarray, iterations: int = 8) -> np.ndarray:
    """Values (H, W, C) kept where ``known``, elsewhere the harmonic interpolant of them (Laplace's
    equation with the known pixels as boundary condition), by cascadic multigrid: solve on a
    half-size grid, upsample as the initial guess, relax with ``iterations`` Jacobi steps, twice as
    many on each coarser grid (they carry the smooth part of the solution, and cost a quarter) but
    no more than the grid's side (the tiny grids' steps are Python overhead, and gain nothing)."""
    values = np.where(known[..., None], values, 0).astype(np.float32)
    height, width = known.shape
    if not known.any():
        return np.zeros_like(values)
    steps = min(iterations, max(height, width))
    if min(height, width) <= 4:
        guess = np.broadcast_to(values[known].mean(0), values.shape).copy()
        return _relax(np.where(known[..., None], values, guess), values, known, 4 * steps)
    h2, w2 = (height + 1) // 2, (width + 1) // 2
    pad = ((0, 2 * h2 - height), (0, 2 * w2 - width))
    weight = np.pad(known.astype(np.float32), pad).reshape(h2, 2, w2, 2).sum((1, 3))
    total = np.pad(values, (*pad, (0, 0))).reshape(h2, 2, w2, 2, -1).sum((1, 3))
    coarse_known = weight > 0
    coarse = harmonic_fill(total / np.maximum(weight, 1)[..., None], coarse_known, 2 * iterations)
    guess = np.repeat(np.repeat(coarse, 2, 0), 2, 1)[:height, :width]
    return _relax(np.where(known[..., None], values, guess), values, known, steps)


def region_fill(values: np.ndarray, known: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``values`` (H, W, C) with the unknown pixels of ``region`` replaced by the harmonic interpolant
    of the known pixels that border them, the region's other edges free (Neumann: no flux), by one
    sparse solve. Unlike ``harmonic_fill``, whose unknowns span the whole image, what lies beyond
    the region feeds nothing in: a band along a cheek takes its colour from the cheek beside it, not
    from the hair above it by way of the wall. A part of the region no known pixel borders keeps
    ``values``."""
    values = np.asarray(values, np.float32)
    free = region & ~known
    height, width = known.shape
    labels, components = ndimage.label(free)
    touching = ndimage.binary_dilation(known) & free  # 4-neighbours of a known pixel
    fed = np.zeros(components + 1, bool)
    fed[np.unique(labels[touching])] = True  # label 0, not free, stays False
    free &= fed[labels]
    if not free.any():
        return values.copy()
    index = np.full(known.shape, -1, np.int64)
    rows, cols = np.nonzero(free)
    count = len(rows)
    index[rows, cols] = np.arange(count)
    degree = np.zeros(count)
    rhs = np.zeros((count, values.shape[-1]))
    links_from, links_to = [], []
    me = np.arange(count)
    for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        r, c = rows + dr, cols + dc
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        r, c, at = r[inside], c[inside], me[inside]
        to_free, to_known = free[r, c], known[r, c]
        degree += np.bincount(at[to_free | to_known], minlength=count)
        links_from.append(at[to_free])
        links_to.append(index[r[to_free], c[to_free]])
        np.add.at(rhs, at[to_known], values[r[to_known], c[to_known]])
    # the graph Laplacian of the free pixels (each a neighbour's mean), the known ones on the right
    a, b = np.concatenate(links_from), np.concatenate(links_to)
    matrix = sparse.csc_matrix(
        (np.concatenate([degree, -np.ones(len(a))]), (np.concatenate([me, a]), np.concatenate([me, b]))),
        shape=(count, count),
    )
    out = values.copy()
    out[rows, cols] = np.asarray(spsolve(matrix, rhs)).reshape(count, -1)
    return out


def _relax(x: np.ndarray, values: np.ndarray, known: np.ndarray, iterations: int) -> np.ndarray:
    """Jacobi steps of Laplace's equation on the unknown pixels (edges replicated: a natural boundary),
    between two padded buffers: each step is the neighbours' sum times 1/4 where unknown (0 where
    known) plus the known values (0 where unknown), with no allocation."""
    free = np.repeat(np.where(known, 0.0, 0.25).astype(np.float32)[..., None], x.shape[-1], -1)  # no broadcast
    fixed = np.where(known[..., None], values, 0).astype(np.float32)
    a = np.pad(np.asarray(x, np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    b = a.copy()
    for _ in range(iterations):
        inner = b[1:-1, 1:-1]
        np.add(a[:-2, 1:-1], a[2:, 1:-1], out=inner)
        inner += a[1:-1, :-2]
        inner += a[1:-1, 2:]
        inner *= free
        inner += fixed
        b[0], b[-1] = b[1], b[-2]
        b[:, 0], b[:, -1] = b[:, 1], b[:, -2]
        a, b = b, a
    return a[1:-1, 1:-1].copy()


def mesh_boundaries(model: FaceModel) -> tuple[np.ndarray, np.ndarray]:
    """The mesh's boundary edges (used by one triangle), (N, 2) vertex ids, in two kinds: off the face
    region, where the mesh stops on skin that goes on in the photo (the neck's cut); and in it, the
    face's openings (eyes, mouth)."""
    tri = model.triangles.cpu().numpy().astype(np.int64)
    edges = np.sort(np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]), 1)
    n = int(tri.max()) + 1  # an edge as one integer (a flat np.unique is far faster than axis=0)
    unique, counts = np.unique(edges[:, 0] * n + edges[:, 1], return_counts=True)
    boundary = np.stack(np.divmod(unique[counts == 1], n), -1)
    in_face = model.regions["face"].cpu().numpy()[boundary].all(1)
    return boundary[~in_face], boundary[in_face]


def ears(model: FaceModel) -> torch.Tensor:
    """(V,) bool: the ears, the mesh lateral of the jaw's ends (landmarks 0 and 16) and behind them;
    a photo shows them half-hidden by hair, and a relight leaves them as they are."""
    neutral, ends = model.neutral, model.neutral[model.landmark_vertices[[0, 16]]]
    half_width, depth = float(ends[:, 0].abs().mean()), float(ends[:, 2].mean())
    return (neutral[:, 0].abs() > 0.95 * half_width) & (neutral[:, 2] < depth)


def ear_proper(model: FaceModel) -> np.ndarray:
    """(V,) bool: the ears themselves, the part of ``ears`` that stands out past the jaw's ends,
    between the nose's foot and the brows' height (not the side of the head behind them, nor the neck)."""
    neutral = model.neutral.cpu().numpy()
    half_width = float(np.abs(neutral[model.landmark_vertices.cpu().numpy()[[0, 16]], 0]).mean())
    bottom, top = neutral[model.landmark_vertices.cpu().numpy()[[33, 19]], 1]
    lateral, height = np.abs(neutral[:, 0]), neutral[:, 1]
    return ears(model).cpu().numpy() & (lateral > 1.05 * half_width) & (height > bottom - 2.0) & (height < top)


def mirror_vertices(model: FaceModel) -> np.ndarray:
    """(V,) int: each vertex's mirror image across the face's plane of symmetry (x = 0 of the neutral
    mesh: ICT's and FLAME's are symmetric), -1 where no vertex lies there."""
    neutral = model.neutral.cpu().numpy().astype(np.float64)
    extent = float(np.ptp(neutral, 0).max())
    dist, index = cKDTree(neutral).query(neutral * np.array([-1.0, 1.0, 1.0]))
    return np.where(dist <= MIRROR_TOLERANCE * extent, index, -1)


def relit_skin(model: FaceModel) -> torch.Tensor:
    """(V,) bool: the skin a relight changes fully: the face region without the ears."""
    return model.regions["face"] & ~ears(model)


def _relight_weight(skin: np.ndarray, ears_px: np.ndarray, covered: np.ndarray, size: int) -> np.ndarray:
    """(S, S) in [0, 1]: how much of the shading ratio a pixel of θ1's render takes. 1 on the skin
    (its openings closed), falling to 0 over HAIR_FADE across the rest of the mesh (the scalp under
    the hair: a forehead darkened by a side light does not stop at a line on the hairline), and
    falling to 0 over SILHOUETTE_FADE before the mesh's outline and the ears: the wall behind the
    head and the ears are never relit, whatever the fit's outline is off by."""
    skin = ndimage.binary_fill_holes(skin)
    head = ndimage.binary_fill_holes(covered)
    tail = smoothstep(1 - ndimage.distance_transform_edt(~skin) / (HAIR_FADE * size))
    inside = ndimage.distance_transform_edt(head & ~ears_px)
    return np.where(skin, 1.0, tail) * smoothstep(inside / (SILHOUETTE_FADE * size))


def _edge_weight(size: int) -> np.ndarray:
    idx = np.arange(size, dtype=np.float32)
    dist = np.minimum(idx, size - 1 - idx)
    ramp = smoothstep((dist - EDGE_MARGIN * size) / (EDGE_RAMP * size))
    return np.minimum(ramp[:, None], ramp[None, :])


def _under_theta0(point: torch.Tensor, g0, zbuf: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For θ0 screen points (S, S, 3: u, v, depth): the θ0 pixel each rounds to (rows, columns: (S, S)
    long), whether it lands on θ0's mesh inside the frame, and whether θ0's z-buffer (``zbuf``) there
    lies no more than DEPTH_TOLERANCE in front of it ((S, S) bool each)."""
    size = point.shape[0]
    col = point[..., 0].round().long().clamp(0, size - 1)
    row = point[..., 1].round().long().clamp(0, size - 1)
    on = (point[..., :2] >= -0.5).all(-1) & (point[..., :2] <= size - 0.5).all(-1) & g0.fragments.mask[0, row, col]
    return row, col, on, point[..., 2] >= zbuf[row, col] - DEPTH_TOLERANCE


def _visible_points(model: FaceModel, g0, g1, zbuf: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Per θ1 pixel: the θ0 screen point (u, v) of the same surface point, and whether θ0 sees it
    (``zbuf``: θ0's z-buffer)."""
    f1 = g1.fragments
    tri = model.triangles
    point = f1.interpolate(g0.screen, tri)[0]  # (S, S, 3): u, v, depth under θ0
    s0 = g0.screen[0, :, :2]
    a, b, c = s0[tri[:, 0]], s0[tri[:, 1]], s0[tri[:, 2]]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    front = area < 0  # the rasterizer's front-face test
    f0 = g0.fragments
    row, col, on, near = _under_theta0(point, g0, zbuf)
    t1 = f1.triangle[0]
    seen = f1.mask[0] & on & front[t1.clamp_min(0)] & ((f0.triangle[0, row, col] == t1) | near)
    return point[..., :2].numpy().astype(np.float64), seen.numpy(), f0.mask[0]


def _mirrored_points(model: FaceModel, g0, g1, zbuf: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per θ1 pixel, for the mirror image of its surface point (``mirror_vertices``): θ0's screen
    point (u, v), and whether θ0 shows it (its z-buffer ``zbuf`` there holds it, and it faces the
    camera more than MIRROR_FACING: a grazing view is foreshortened, and the outline and the ear's
    root lie there)."""
    index = torch.from_numpy(mirror_vertices(model))
    has = (index >= 0).to(torch.float32)[None, :, None]
    index = torch.where(index >= 0, index, torch.arange(len(index)))
    tri, f1 = model.triangles, g1.fragments
    point = f1.interpolate(g0.screen[:, index], tri)[0]  # (S, S, 3): u, v, depth under θ0
    normal = f1.interpolate(vertex_normals(g0.vertices_cam, tri)[:, index], tri)
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    _, _, on, near = _under_theta0(point, g0, zbuf)
    seen = f1.mask[0] & on & near & (normal[0, ..., 2] > MIRROR_FACING) & (f1.interpolate(has, tri)[0, ..., 0] > 0.999)
    return point[..., :2].numpy().astype(np.float64), seen.numpy()


def correspondence(model: FaceModel, fit0: FaceFit, fit1: FaceFit, crop_size: int, size: int) -> Correspondence:
    """θ1 -> θ0 of one photo (batch-1 fits in the crop frame of ``crop_size``) at ``size`` working pixels."""
    return _correspondence(model, fit0, fit1, crop_size, size)[0]


def _correspondence(
    model: FaceModel, fit0: FaceFit, fit1: FaceFit, crop_size: int, size: int, points: np.ndarray | None = None
) -> tuple[Correspondence, Geometry]:
    """``correspondence`` and θ1's rasterization at the working size (for the render fill); ``points``:
    the photo's own 68 landmarks (working pixels): their eyes closing lids cover (``lid_cover``), their
    jaw bounds the cheek a turn keeps in view (``photo_head``)."""
    with torch.no_grad():
        w0, w1 = rescale_fit(fit0, crop_size, size), rescale_fit(fit1, crop_size, size)
        g0, g1 = rasterize_fit(model, w0, size), rasterize_fit(model, w1, size)
        zbuf0 = g0.fragments.interpolate(g0.screen[..., 2:], model.triangles)[0, ..., 0]
        point, seen, covered0 = _visible_points(model, g0, g1, zbuf0)
        covered = g1.fragments.mask[0].numpy()
        # shading of the same surface point: θ0's vertex normals at θ1's barycentrics
        n0 = g1.fragments.interpolate(vertex_normals(g0.vertices_cam, model.triangles), model.triangles)
        n0 = n0 / n0.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        shade1 = sh_shading(g1.normals, fit1.light)[0]
        shade0 = sh_shading(n0, fit0.light)[0]
        # the cast shadows of each light on the same surface point, each pose's mesh its own occluder:
        # θ0's are in the photo already (divided out), θ1's are put in
        points1 = g1.fragments.interpolate(g1.vertices_cam, model.triangles)[0]
        points0 = g1.fragments.interpolate(g0.vertices_cam, model.triangles)[0]
        cast1 = _shadowed(model, g1, fit1.light[0], points1, g1.normals[0], shade1, size).numpy()
        cast0 = _shadowed(model, g0, fit0.light[0], points0, n0[0], shade0, size).numpy()
        shade1, shade0 = shade1.numpy(), shade0.numpy()
        # the mirror image is read only beside the photo's own outline (``_mirror_detail``)
        mirror_point, mirror_seen = _mirrored_points(model, g0, g1, zbuf0) if points is not None else (None, None)
        kinds = torch.stack([relit_skin(model), ears(model)], -1).to(torch.float32)[None]
        kinds = g1.fragments.interpolate(kinds, model.triangles)[0].numpy()
    relight_weight = _relight_weight(kinds[..., 0] > 0.999, kinds[..., 1] > 0.001, covered, size)
    light1 = fit1.light[0]
    coloured = not torch.equal(light1, fit0.light[0]) and not bool((light1 == light1[:, :1]).all())
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    edge = _edge_weight(size)
    outside = ndimage.distance_transform_edt(~ndimage.binary_fill_holes(covered))

    # 1. the flow: the face's as boundary condition, zero beyond a band and at the crop's edge
    flow_face = np.stack([point[..., 0] - u, point[..., 1] - v], -1).astype(np.float32) * edge[..., None]
    zero = (outside > FLOW_BAND * size) | (edge == 0)
    flow = harmonic_fill(np.where(seen[..., None], flow_face, 0), seen | zero)
    flow[zero & ~seen] = 0
    # the mouth's opening (inside the mesh's own openings, uncovered) is new where its source lands on
    # θ0's mesh (lips parting); where it lands in θ0's opening the photo showed it (teeth of a smile)
    # and it is warped; slivers of unseen surface (a pixel or two wide) are left to the warp
    open_edges, openings = mesh_boundaries(model)
    screen1 = g1.screen[0, :, :2].numpy()
    hole = _openings(screen1, openings, size) & ~covered
    src_row, src_col = _source_pixels(flow)
    unseen = (covered & ~seen) | (hole & covered0.numpy()[src_row, src_col])
    # surface θ0 shows foreshortened to a sliver (an upper lid folded under the brow that a blink
    # spreads over the eye) would be smeared by the warp: the photo has too few pixels of it
    area = _source_area(flow)
    unseen |= covered & (area < STRETCH_MIN)
    lids = lashes = head = head_cover = from_head = inside = rim_of_jaw = None
    if points is not None:
        lm = model.landmark_vertices[36:48]
        lids, lashes = lid_cover(points[36:48], g0.screen[0, lm, :2].numpy(), g1.screen[0, lm, :2].numpy(), flow)
        head0, head, head_cover = photo_head(points[:17], flow)
        # the photo's outline is a blend of skin and wall a few pixels wide: not the person's colour
        blend = max(1, round(OUTLINE_BLEND * size))
        inside = ndimage.binary_erosion(head0, iterations=blend)
        from_head = inside[src_row, src_col]
        inside_depth = ndimage.distance_transform_edt(inside)  # from the photo's outline, less the blend
        rim_of_jaw = jaw_rim(points, inside_depth)
        # the cheek the turn keeps in view whose source is the wall beyond the photo's cheek (the mesh
        # outline's excess) is the person's skin to fill, and so is the outline the warp brings in
        # beside it (a pale seam between cheek and fill); what the mesh shows beyond the head is not
        unseen |= covered & head & ~head0[src_row, src_col]
        unseen |= ndimage.binary_dilation(unseen, iterations=2 * blend) & covered & head & ~from_head
        # the fill ends where the head does: the mesh runs past it by the ears, and a fill reaching
        # further overhangs the cheek's outline there and steps in where the mesh ends (a notch)
        unseen &= ndimage.binary_dilation(head, iterations=max(1, round(REVEAL_REACH * size)))
        # the photo's last pixels of cheek before its outline are darker (a cheek turning away, its
        # stubble, the blend of skin and wall): a turn carries them inward beside the surface it
        # reveals, where they read as a grey band down the cheek; they are filled with that surface
        rim = OUTLINE_RIM * size
        depth = inside_depth[src_row, src_col] + blend  # the source's, in from the outline
        moved_in = ndimage.distance_transform_edt(head) - depth > max(2.0, SLIVER * size)
        carried = ndimage.label(covered & head & (depth < rim) & moved_in)[0]  # the turn may stretch it wide
        beside = np.unique(carried[ndimage.binary_dilation(unseen) & (carried > 0)])
        unseen |= np.isin(carried, beside)
    unseen = ndimage.binary_opening(unseen, iterations=max(1, round(SLIVER * size)))
    if lids is not None:
        unseen |= lids

    # 2. the shading ratio, on the face model's skin only (never the scalp's hair, the ears or the
    # wall), faded to 1 before the skin's edge, where the mesh ends on skin and at the crop's edge
    if not coloured:  # a white light asked: the skin keeps its hue, the ratio is the shading's grey
        shade0, shade1 = shade0.mean(-1, keepdims=True), shade1.mean(-1, keepdims=True)
        cast0, cast1 = cast0.mean(-1, keepdims=True), cast1.mean(-1, keepdims=True)
    # second-order SH shading goes negative on the dark side: both are floored alike, so the ratio
    # of a surface point lit the same way is exactly 1 (a no-op edit is one), never a clamp's 1/4
    floor = SHADE_FLOOR * max(float(np.abs(shade0[seen]).mean()) if seen.any() else 1.0, 1e-6)
    # the seen surface's edge where θ0's jaw hid the neck is ragged (the z-buffer's test, a pixel at a
    # time at a grazing view): the ratio's support is that edge smoothed, the ratio faded out beyond
    # it over as much (a ratio stepping from seen to warped neck drew its teeth across the neck)
    reach = SEEN_SMOOTH * size
    lit = (ndimage.gaussian_filter(seen.astype(np.float32), reach) > 0.5) & covered
    ratio = np.where(lit[..., None], np.maximum(shade1, floor) / np.maximum(shade0, floor), 1.0)
    log_ratio = np.log(np.clip(ratio, RATIO_MIN, RATIO_MAX)).astype(np.float32)
    sigma = RATIO_SIGMA * size
    weight = ndimage.gaussian_filter(lit.astype(np.float32), sigma)
    smooth = [ndimage.gaussian_filter(log_ratio[..., c] * lit, sigma) for c in range(log_ratio.shape[-1])]
    log_ratio = np.where(lit[..., None], np.stack(smooth, -1) / np.maximum(weight, 1e-6)[..., None], 0)
    # the cast shadows multiply in after that smoothing, at their own softness (the shadow map's PCF):
    # what θ1's shadows take from its shading over what θ0's took (exactly 0 where the two lights and
    # poses agree). The photo's own shadows are divided out, but they are only as sure as the fitted
    # light's split into ambient and direct: a broad studio light, fitted as a strong directional
    # one, would have its phantom nose shadow lifted into a bright patch; so the lift is capped
    shadow = np.log(np.maximum(cast1, floor) / np.maximum(shade1, floor))
    shadow -= np.log(np.maximum(cast0, floor) / np.maximum(shade0, floor))
    shadow = np.minimum(shadow, math.log(SHADOW_LIFT_MAX))
    log_ratio = np.clip(log_ratio + np.where(lit[..., None], shadow, 0), math.log(RATIO_MIN), math.log(RATIO_MAX))
    # the edge's own pixels are the least sure (a normal interpolated across a fold: a lip's edge
    # read as a bright dot beside its darkened neighbours): they take the extension too
    core = ndimage.binary_erosion(lit)
    near = ndimage.gaussian_filter(core.astype(np.float32), reach)
    beyond = [ndimage.gaussian_filter(log_ratio[..., c] * core, reach) for c in range(log_ratio.shape[-1])]
    beyond = np.stack(beyond, -1) / np.maximum(near, 1e-6)[..., None] * np.clip(2 * near, 0, 1)[..., None]
    log_ratio = np.where(core[..., None], log_ratio, beyond)
    log_ratio *= (relight_weight * edge * _open_edge_weight(screen1, open_edges, size))[..., None]
    log_ratio = np.broadcast_to(log_ratio, (size, size, 3))
    mirror = None if mirror_point is None else np.stack([mirror_point[..., 0] - u, mirror_point[..., 1] - v], -1)
    ear_maps = () if points is None else _ear_maps(model, g0, g1, area, points)
    front = None
    if ear_maps:
        # in front of an ear: the head's surface but its ears, no further out than the edited head's outline
        body = ndimage.gaussian_filter((covered & (kinds[..., 1] < 0.5)).astype(np.float32), 1.0)
        front = np.minimum(head_cover, body).astype(np.float32)
    corr = Correspondence(
        size, flow.astype(np.float32), covered, seen, unseen, log_ratio.astype(np.float32), edge, hole, lids, lashes,
        head, head_cover, from_head, inside, None if mirror is None else mirror.astype(np.float32), mirror_seen,
        rim_of_jaw, ear_maps, front,
    )  # fmt: skip
    return corr, g1


def _ear_maps(model: FaceModel, g0, g1, area: np.ndarray, points: np.ndarray) -> tuple[EarMap, ...]:
    """The ears a turn brings into view that the photo shows as a sliver: the mesh's ear (``ear_proper``)
    on a side of the face whose warp spreads the photo's pixels over more than 1 / EAR_STRETCH of
    their area (its median; ``area``: the flow's ``_source_area``). Each is drawn from the photo's
    other ear: the affine map (least squares over the ear's vertices) from this ear under θ1 to its
    mirror image under θ0, and where in the photo to look for that ear (``points``: the photo's 68
    landmarks, working pixels)."""
    size = area.shape[0]
    proper = ear_proper(model)
    mirror = mirror_vertices(model)
    lateral = np.sign(model.neutral[:, 0].cpu().numpy())
    s0 = g0.screen[0, :, :2].numpy().astype(np.float64)
    s1 = g1.screen[0, :, :2].numpy().astype(np.float64)
    with torch.no_grad():
        weight = torch.from_numpy(proper).to(torch.float32)[None, :, None]
        ear1 = g1.fragments.interpolate(weight, model.triangles)[0, ..., 0].numpy() > 0.5
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    nose = float(points[27:31, 0].mean())
    face = _polygon(np.concatenate([points[:17], points[26:16:-1]]), size)  # the jaw's and the brows' outline

    def around(ear: np.ndarray, screen_side: float) -> tuple[np.ndarray, np.ndarray]:
        """The hull of the mesh's ``ear`` (vertex ids) under θ0, and where beside it the photo's ear may
        lie: off the face, past the jaw's end on its side of the nose, level with it."""
        corners = s0[ear]
        hull = _polygon(corners[ConvexHull(corners).vertices], size)
        end = points[0] if screen_side < 0 else points[16]  # dlib's 0 is at the image's left
        reach = EAR_REACH * size
        level = (v > corners[:, 1].min() - reach) & (v < corners[:, 1].max() + reach)
        beyond = (u - end[0]) * screen_side > 0
        search = ndimage.binary_dilation(hull, iterations=max(1, round(reach))) & level & beyond & ~face
        return hull, search

    maps = []
    for side in (-1.0, 1.0):
        ear = proper & (lateral == side) & (mirror >= 0)
        if ear.sum() < 3:
            continue
        screen_side = float(np.sign(s1[ear, 0].mean() - nose))
        shown = ear1 & (np.sign(u - nose) == screen_side)
        if shown.sum() < 20 or float(np.median(area[shown])) > EAR_STRETCH:
            continue
        other = mirror[ear]
        affine = np.linalg.lstsq(np.c_[s1[ear], np.ones(len(s1[ear]))], s0[other], rcond=None)[0]
        mirrored = np.linalg.lstsq(np.c_[s0[ear], np.ones(len(s0[ear]))], s0[other], rcond=None)[0]
        source, search = around(other, float(np.sign(s0[other, 0].mean() - nose)))
        outward = float(np.sign(s0[ear, 0].mean() - nose))
        _, sliver = around(np.nonzero(ear)[0], outward)
        maps.append((affine, source, search, sliver, mirrored, outward))
    if not maps:
        return ()
    with torch.no_grad():  # off the mesh's head under θ0, its ears aside: where a sliver of ear shows
        ear0 = g0.fragments.interpolate(weight, model.triangles)[0, ..., 0].numpy() > 0.5
    beyond = ~ndimage.binary_dilation(g0.fragments.mask[0].numpy() & ~ear0, iterations=2)
    return tuple(EarMap(*fields, beyond) for fields in maps)


def _shadowed(
    model: FaceModel,
    geometry: Geometry,
    light: torch.Tensor,
    points: torch.Tensor,
    normals: torch.Tensor,
    shading: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """``shading`` (S, S, 3) of ``light`` (9, 3) at camera-space ``points`` with ``normals`` (S, S, 3)
    darkened by the cast shadows of the mesh of ``geometry`` (batch 1, its own pose) from the light's
    direction: the single light that best explains it over that pose's visible skin (``light_split``;
    a fitted light's first-order terms alone swing tens of degrees), in a shadow map of ``size``
    texels (``shadow_visibility``, ``shadowed_shading``)."""
    direction, intensity = light_split(light, geometry.normals[0][skin_mask(model, geometry)[0]])
    visibility = shadow_visibility(geometry.vertices_cam[0], model.triangles, points, normals, direction, size)
    return shadowed_shading(shading, normals, direction, intensity, visibility)


def lid_cover(
    eyes: np.ndarray, before: np.ndarray, after: np.ndarray, flow: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Where closing lids cover the photo's eyes: (S, S) bool, and the lash line of the lowered lid,
    (S, S) in [0, 1]. ``eyes``: the photo's eye contours (its landmarks 36-47, (12, 2) working pixels);
    ``before``, ``after``: the mesh's points for those landmarks at θ0 and θ1; ``flow``: the backward
    flow (S, S, 2).

    The mesh's eyes are smaller than a real eye: its lids shut leave the photo's open by the
    difference. So per eye, the fraction of the mesh's opening (``_lid_gap``, down to MESH_SHUT_GAP
    where its lids meet) that closes is applied to the photo's own opening: its upper lid comes down
    that fraction of the way onto its lower lid, both carried by the mesh's movement, and all the way
    from LID_MEET. An eye closing by no more than LID_SHUT (a smile's squint; a turn narrows an eye as
    much as it lowers it) is left to the warp.

    Covered: the photo's eye grown by LASH_REACH of its width (its lashes), and every pixel the warp
    fills from there, above the lowered lid's edge (a parabola through its points; a half-closed eye
    keeps its lower lashes), and the lash line, a soft dark curve along that edge, LASH_WIDTH of the
    eye's width; shut, it lies on the photo's lower lid."""
    size = flow.shape[0]
    cover, lashes = np.zeros((size, size), bool), np.zeros((size, size), np.float32)
    v, u = np.mgrid[0:size, 0:size]
    src_row, src_col = _source_pixels(flow)
    for eye in (slice(0, 6), slice(6, 12)):
        opening = _lid_gap(before[eye])
        shut = (opening - _lid_gap(after[eye])) / max(opening - MESH_SHUT_GAP, 1e-6)
        if shut <= LID_SHUT:
            continue
        shut = 1.0 if shut >= LID_MEET else shut
        carried = eyes[eye] + after[eye] - before[eye]
        lower = carried[[0, 5, 4, 3]]  # 36, 41, 40, 39: the lower lid, corners included
        upper = lower + (1 - shut) * (eyes[eye][[0, 1, 2, 3]] - eyes[eye][[0, 5, 4, 3]])
        width = float(np.linalg.norm(upper[3] - upper[0]))
        grown = ndimage.binary_dilation(_polygon(eyes[eye], size), iterations=max(2, round(LASH_REACH * width)))
        a, b, c = np.polyfit(upper[:, 0], upper[:, 1], 2)
        x = np.clip(u, upper[0, 0], upper[3, 0])
        lid_edge = a * x * x + b * x + c
        lids = (grown | grown[src_row, src_col]) & (v <= lid_edge + 2 * LASH_WIDTH * width)  # the lashes' width below
        near = ndimage.binary_dilation(lids, iterations=max(3, math.ceil(3 * LASH_WIDTH * width)))
        dist = np.hypot(u - x, v - lid_edge)[near]  # from the lid's edge, past the corners from its ends
        line = np.exp(-0.5 * (dist / (LASH_WIDTH * width)) ** 2)
        lashes[near] = np.maximum(lashes[near], line)
        cover |= lids | (lashes > 0.05)  # the lash line whole: no cut along its lower side
    return cover, lashes


def _lid_gap(eye: np.ndarray) -> float:
    """An eye's opening over its width from its 6 landmarks (36-41 order): the lower lid's points'
    distance below the upper lid's across the corners' line, negative where a mesh's lids cross (as
    lids pushed shut by a blink on top of a squint do; ``eye_aspect``'s distances would read open)."""
    axis = eye[3] - eye[0]
    width = max(float(np.linalg.norm(axis)), 1e-6)
    down = np.array([-axis[1], axis[0]]) / width  # screen y points down
    return float(((eye[5] - eye[1]) @ down + (eye[4] - eye[2]) @ down) / (2 * width))


def photo_head(jaw: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, S) each: where the photo's head is (bool: inside its jaw line, landmarks 0-16 in working
    pixels, or above the jaw's ends: forehead, temples, scalp, where the mesh's outline is trusted),
    and where the edited head lies (bool): that moved by the backward ``flow``, or moved by a part
    of it that grows from none at the jaw's ends (by the ears) to all of it at the chin, its outline
    smoothed (``OUTLINE_SMOOTH``); a head the flow leaves still keeps its own outline exactly. Third,
    the edited head's cover (float32 in [0, 1]): 1 inside, 0 beyond, and across the outline a ramp
    OUTLINE_BLEND wide, placed to a fraction of a pixel (the smoothed outline's signed distance), as
    a photo's own outline is a blend of skin and wall: the fill ends through it, where a binary
    outline, sampled up to the photo's pixels, steps along the wall a working pixel at a time.

    A head turning about the neck keeps its outline by the temples and cheeks nearly in place while
    its features move; the chin, in front of the axis, moves with them. The fitted mesh is often
    wider than the real cheek: the turned mesh's outline says little about where the real cheek
    ends. Inside the second region the head is the person's; beyond it the wall or the ear, which
    are warped with the head, never filled with skin."""
    size = flow.shape[0]
    top, far = min(float(jaw[:, 1].min()), 0.0) - size, 2.0 * size
    above = [[far, jaw[-1, 1]], [far, top], [-far, top], [-far, jaw[0, 1]]]  # level with the jaw's ends, to either side
    head = _polygon(np.concatenate([jaw, above]), size)
    if float(np.abs(flow).max(initial=0.0)) < 0.5:  # a still head (a relight, a no-op) keeps its outline exactly
        return head, head.copy(), head.astype(np.float32)
    v, u = np.mgrid[0:size, 0:size].astype(np.float32)
    ends, chin = (jaw[0, 1] + jaw[-1, 1]) / 2, jaw[8, 1]
    part = np.clip((v - ends) / max(chin - ends, 1.0), 0, 1)
    inside = head.astype(np.float32)
    edited = np.zeros(head.shape, np.float32)
    for t in (1.0, part):
        moved = ndimage.map_coordinates(inside, [v + t * flow[..., 1], u + t * flow[..., 0]], order=1, mode="nearest")
        edited = np.maximum(edited, moved)
    # the union of two warps steps where one overtakes the other: an outline is a smooth curve
    smooth = ndimage.gaussian_filter(edited, OUTLINE_SMOOTH * size)
    slope = np.hypot(*np.gradient(smooth))
    distance = (smooth - 0.5) / np.maximum(slope, 1e-6)  # signed, in pixels, from the 0.5 level
    cover = np.clip(0.5 + distance / max(1.0, OUTLINE_BLEND * size), 0, 1).astype(np.float32)
    return head, smooth > 0.5, cover


def jaw_rim(points: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """(S, S) bool: the photo's last OUTLINE_RIM of head (``depth``: the distance of each pixel of its
    head less its outline's blend from that head's edge, 0 beyond) along its jaw below the line
    through the ears' middles (landmarks 1 and 15 of ``points``, the 68 in working pixels). There
    those pixels are skin, its shaded edge, or the wall that the landmarks'
    jaw line, off the real one by more than the blend, takes in; rarely hair (the sideburns end
    above; a beard's last pixels are taken for the wall). Those of another hue than the skin are the
    wall's blend (a white, red or blue tint): neither hair that ``warped_hair`` keeps nor a kind of
    surface ``kind_fill`` fills a band with."""
    size = depth.shape[0]
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    (x1, y1), (x2, y2) = points[1], points[15]
    side = (x2 - x1) * (v - y1) - (y2 - y1) * (u - x1)  # the cross product: its sign tells the side
    chin = (x2 - x1) * (points[8, 1] - y1) - (y2 - y1) * (points[8, 0] - x1)
    return (depth > 0) & (depth < OUTLINE_RIM * size) & (side * chin > 0)


def _polygon(points: np.ndarray, size: int) -> np.ndarray:
    """(S, S) bool: the pixels inside a closed polygon of (x, y) points."""
    canvas = Image.new("1", (size, size))
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in np.asarray(points, float).tolist()], fill=1)
    return np.asarray(canvas, bool)


def _source_area(flow: np.ndarray) -> np.ndarray:
    """(S, S): the photo area (in pixels) that the backward ``flow`` maps onto each output pixel, the
    Jacobian determinant of p -> p + flow; 1 for a still or moved surface, under 1 where it is stretched."""
    dxu, dxv = np.gradient(flow[..., 0], axis=1), np.gradient(flow[..., 0], axis=0)
    dyu, dyv = np.gradient(flow[..., 1], axis=1), np.gradient(flow[..., 1], axis=0)
    return (1 + dxu) * (1 + dyv) - dxv * dyu


def _draw_edges(screen: np.ndarray, edges: np.ndarray, size: int) -> np.ndarray:
    """(S, S) bool: the pixels the projected mesh edges pass through."""
    canvas = np.zeros((size, size), bool)
    if not len(edges):
        return canvas
    length = np.linalg.norm(screen[edges[:, 0]] - screen[edges[:, 1]], axis=1).max()
    t = np.linspace(0, 1, int(np.ceil(length)) * 2 + 2)[:, None, None]
    pts = np.round(screen[edges[:, 0]] * (1 - t) + screen[edges[:, 1]] * t).reshape(-1, 2).astype(int)
    pts = pts[(pts >= 0).all(1) & (pts < size).all(1)]
    canvas[pts[:, 1], pts[:, 0]] = True
    return canvas


def _openings(screen: np.ndarray, openings: np.ndarray, size: int) -> np.ndarray:
    """(S, S) bool: inside the face's openings (``openings``: the boundary edges in the face region,
    loops round the eyes and mouth; ``mesh_boundaries``)."""
    return ndimage.binary_fill_holes(_draw_edges(screen, openings, size))


def _open_edge_weight(screen: np.ndarray, open_edges: np.ndarray, size: int) -> np.ndarray:
    """(S, S): 0 on the mesh's open edge (``open_edges``, as θ1 projects it), rising to 1 over OPEN_EDGE_BAND."""
    on_edge = _draw_edges(screen, open_edges, size)
    if not on_edge.any():
        return np.ones((size, size), np.float32)
    return smoothstep(ndimage.distance_transform_edt(~on_edge) / (OPEN_EDGE_BAND * size))


def render_fill(
    model: FaceModel, fit1: FaceFit, crop_size: int, size: int, geometry: Geometry | None = None
) -> np.ndarray:
    """θ1's shaded buffer (linear light) as sRGB in [0, 1]: the fill of the mesh's openings (``photo_fill``);
    ``geometry``: θ1 already rasterized at ``size`` (saves rasterizing it again)."""
    with torch.no_grad():
        shaded = render_buffers(model, rescale_fit(fit1, crop_size, size), size, geometry)[0, :3]
    return linear_to_srgb(shaded.permute(1, 2, 0).numpy())


def _warp_photo(photo: np.ndarray, sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """(3, h, w) float: the photo (uint8) sampled bilinearly at photo pixels (sx, sy) (h, w), the
    nearest edge pixel outside it; only the part of the photo the samples can reach is converted."""
    height, width = photo.shape[:2]
    x0 = int(np.clip(np.floor(float(sx.min())), 0, width - 1))
    x1 = int(np.clip(np.ceil(float(sx.max())), 0, width - 1))
    y0 = int(np.clip(np.floor(float(sy.min())), 0, height - 1))
    y1 = int(np.clip(np.ceil(float(sy.max())), 0, height - 1))
    source = channels(photo[y0 : y1 + 1, x0 : x1 + 1])
    gx = (sx - x0) * (2 / max(x1 - x0, 1)) - 1
    gy = (sy - y0) * (2 / max(y1 - y0, 1)) - 1
    return sample(source, torch.stack([gx, gy], -1)[None], border=True)


@dataclass
class _PixelEdit:
    """The per-photo-pixel part of the physical edit: every working-size field sampled at the photo's
    pixels, the photo warped, relit, filled and blended, for one box of photo pixels at a time."""

    photo: np.ndarray  # (H, W, 3) uint8
    fields: torch.Tensor  # (8, S, S): mask, flow (2), log ratio (3), fill weight, lids, in working pixels
    photo_to_work: np.ndarray  # 2x3
    work_to_photo: torch.Tensor  # (2, 2): working-pixel flow -> photo-pixel flow
    fill: torch.Tensor  # (3, F, F) sRGB in [0, 1]
    photo_to_fill: np.ndarray  # 2x3
    relight: str = "linear"  # the space the shading ratio multiplies (RELIGHT_SPACES)

    def __call__(self, box: Box) -> tuple[np.ndarray, ...]:
        """(image (h, w, 3) uint8, flow (h, w, 2), ratio (h, w, 3), mask, fill, lids (h, w)) of the box."""
        size = self.fields.shape[-1]
        sampled = sample(self.fields, affine_grid(self.photo_to_work, box, size, size))
        alpha, flow_w, log_ratio, f_alpha, lids = sampled[0], sampled[1:3], sampled[3:6], sampled[6], sampled[7]
        alpha.masked_fill_(alpha < 1e-4, 0)
        off = alpha == 0
        f_alpha.masked_fill_(off, 0)
        # the warp (flow in photo pixels); a pixel whose flow is zero is copied
        flow_p = torch.einsum("ij,jhw->ihw", self.work_to_photo, flow_w).masked_fill_(off, 0)
        before = channels(self.photo[box.rows, box.cols])
        still = (flow_w == 0).all(0) | off
        edited = before
        if not bool(still.all()):
            xs = torch.arange(box.x0, box.x1 + 1, dtype=torch.float32)[None, :]
            ys = torch.arange(box.y0, box.y1 + 1, dtype=torch.float32)[:, None]
            edited = torch.where(still, before, _warp_photo(self.photo, xs + flow_p[0], ys + flow_p[1]))
        edited = edited / 255.0
        # the relight (in linear light unless asked for in sRGB), then the fill of the unseen surface
        ratio = log_ratio.masked_fill_(off, 0).exp_()
        shaded = (ratio - 1).abs_().amax(0) > 1e-5
        if bool(shaded.any()):
            relit = edited * ratio if self.relight == "srgb" else _to_srgb(_to_linear(edited).mul_(ratio))
            edited = torch.where(shaded, relit, edited)
        filled = (f_alpha > 0).nonzero()
        if len(filled):
            (r0, c0), (r1, c1) = filled.amin(0).tolist(), filled.amax(0).tolist()
            sub = Box(box.x0 + c0, box.y0 + r0, box.x0 + c1, box.y0 + r1)
            fill_rgb = sample(self.fill, affine_grid(self.photo_to_fill, sub, *self.fill.shape[1:]), border=True)
            part = edited[:, r0 : r1 + 1, c0 : c1 + 1]
            part.copy_(torch.lerp(part, fill_rgb, f_alpha[r0 : r1 + 1, c0 : c1 + 1]))
        # alpha 0 gives ``before`` exactly (lerp's start): the photo's own pixel, bit for bit
        out = torch.lerp(before, edited.mul_(255.0), alpha).clamp_(0, 255).round_().to(torch.uint8)
        channels_last = (t.permute(1, 2, 0).numpy() for t in (out, flow_p, ratio))
        return (*channels_last, alpha.numpy(), f_alpha.numpy(), lids.masked_fill_(off, 0).numpy())


def physical_edit(
    photo: np.ndarray,
    crop_to_photo: np.ndarray,
    crop_size: int,
    model: FaceModel,
    fit0: FaceFit,
    fit1: FaceFit,
    fill: np.ndarray | None = None,
    work_size: int | None = None,
    relight: str = "linear",
    landmarks: np.ndarray | None = None,
) -> PhysicalEdit:
    """The model-free edit θ0 -> θ1 of one photo (H, W, 3) uint8 at its own size.

    ``fit0`` / ``fit1``: batch-1 fits in the crop frame of ``crop_size`` pixels that ``crop_to_photo``
    places in the photo; ``fill``: the model's output for θ1 (crop frame, any size, uint8 or [0, 1]
    floats) for the surface the photo never showed, else θ1's render is used. ``relight``: the space
    the shading ratio multiplies, "linear" light (physical) or "srgb" (the space the light is fitted
    in: ``fit_light`` models sRGB pixels as albedo x shading); benchmarks/bench_relight_space.py.
    ``landmarks``: the photo's 68 (photo pixels), whose eyes closing lids cover (``lid_cover``) and
    whose jaw bounds the cheek a turn keeps in view (``photo_head``), and so the hair the warp may
    carry over surface the photo never showed (``warped_hair``).
    """
    if relight not in RELIGHT_SPACES:
        raise ValueError(f"relight {relight!r}: one of {RELIGHT_SPACES}")
    size = work_size or working_size(crop_to_photo, crop_size)
    points = None
    if landmarks is not None:
        work_to_photo = compose_affine(np.asarray(crop_to_photo, np.float64), resize_affine(crop_size, size))
        points = apply_affine(invert_affine(work_to_photo), np.asarray(landmarks, np.float64))
    corr, g1 = _correspondence(model, fit0, fit1, crop_size, size, points)
    corr = warped_hair(photo, crop_to_photo, crop_size, corr)
    if fill is None:
        render = render_fill(model, fit1, crop_size, size, g1)
        fill = photo_fill(photo, crop_to_photo, crop_size, corr, render, relight)
        corr, fill = mirrored_ears(photo, crop_to_photo, crop_size, corr, fill, relight)
    return compose_edit(photo, crop_to_photo, crop_size, corr, fill, relight)


def photo_fill(
    photo: np.ndarray,
    crop_to_photo: np.ndarray,
    crop_size: int,
    corr: Correspondence,
    render: np.ndarray,
    relight: str = "linear",
) -> np.ndarray:
    """The fill where no model output is given (crop frame, working size, sRGB in [0, 1]): surface the
    photo never showed (a cheek a turn brings into view) inpainted from the photo's own warped pixels
    of the head that border it, as ``compose_edit`` relights them (``relight``: the fill meets the
    relit cheek beside it without a step), each kind of surface from its own kind (``kind_fill``:
    skin from the cheek, hair from the hair; ``region_fill``: the wall beyond the outline is not a
    source), never painted in the render's flat colour, which lies on hair and walls as a band; only
    the mesh's openings (the mouth's: no surface of θ1) keep the render's dark. Surface the warp
    would stretch (``STRETCH_MIN``: a blink's upper lid) is filled so too."""
    size = corr.size
    crop = _work_crop(photo, crop_to_photo, crop_size, size)
    moved = _warp_crop(crop, corr.flow)
    relit = _relit(moved, corr, relight)
    source = _fill_sources(corr)
    if corr.jaw_rim is not None:  # the wall's blend by the jaw is not a kind of surface to fill with
        rows, cols = _source_pixels(corr.flow)
        source &= ~corr.jaw_rim[rows, cols] | face_kind(relit, corr.seen & source, light_too=False)
    # the fill is read a few pixels round the unseen surface (its feathered edge); within that reach
    # only the head's pixels bordering it feed it; beyond, the whole head's harmonic fill
    reach = ndimage.binary_dilation(corr.unseen, iterations=max(3, math.ceil(FILL_REACH * size)))
    base = harmonic_fill(relit, source)
    grain = corr.unseen if corr.lids is None else corr.unseen & ~corr.lids
    inpainted = kind_fill(relit, base, source, reach, corr.seen & source, grain)
    inpainted = _mirror_detail(inpainted, crop, corr, grain & ~corr.opening)
    if corr.lids is not None and corr.lids.any():  # a shut lid is the lid's skin, lashes and all (``_closed_lids``)
        near = ndimage.binary_dilation(corr.lids, iterations=max(3, math.ceil(FILL_REACH * size)))
        inpainted = np.where(near[..., None], region_fill(base, source, reach), inpainted)
        inpainted = _closed_lids(inpainted, moved, corr.lids, corr.lashes)
    return np.where(corr.opening[..., None], render, inpainted).astype(np.float32)


def _mirror_detail(filled: np.ndarray, crop: np.ndarray, corr: Correspondence, target: np.ndarray) -> np.ndarray:
    """``filled`` (the inpainted fill, sRGB in [0, 1]) given, over ``target``, the texture of the same
    surface's mirror image where the photo shows it (a face is near symmetric; a photo turned away
    from the side a turn reveals shows that side's mirror image whole): the photo's pixels there
    (``crop``, the working size) less their blur at MIRROR_DETAIL multiply the fill's own blur (its
    colour and light, which meet the surface beside it; the grain ``kind_fill`` copied is replaced).
    Coarser detail is not taken: a mirrored cheek's folds and highlights lie a little off where this
    side's would (the fit is not exact, a highlight depends on the view), and drew streaks. Read only
    where the mirror image lies inside the photo's head, deeper than its darker rim (OUTLINE_RIM),
    faded in over FILL_REACH; detail stronger than GRAIN_EDGE times the median (a crease, a
    highlight's edge) is scaled down to it. Elsewhere ``filled`` is kept as it is."""
    if corr.mirror is None or corr.inside is None or not target.any():
        return filled
    size = corr.size
    rows, cols = _source_pixels(corr.mirror)
    read = corr.mirror_seen & (ndimage.distance_transform_edt(corr.inside)[rows, cols] > OUTLINE_RIM * size)
    weight = smoothstep(ndimage.distance_transform_edt(target & read) / max(2.0, FILL_REACH * size))
    if not weight.any():
        return filled
    sigma = MIRROR_DETAIL * size
    log_m = np.log(_warp_crop(crop, corr.mirror) + 1e-3) * read[..., None]
    norm = np.maximum(ndimage.gaussian_filter(read.astype(np.float32), sigma), 1e-6)[..., None]
    detail = log_m - np.stack([ndimage.gaussian_filter(log_m[..., c], sigma) for c in range(3)], -1) / norm
    detail *= read[..., None]
    energy = ndimage.gaussian_filter(np.square(detail).sum(-1), 2 * GRAIN_SIGMA)
    limit = GRAIN_EDGE * float(np.median(energy[weight > 0]))
    detail *= np.sqrt(np.clip(limit / np.maximum(energy, 1e-12), 0, 1))[..., None]
    smooth = np.stack([ndimage.gaussian_filter(filled[..., c], GRAIN_SIGMA) for c in range(3)], -1)
    return filled + (np.clip(smooth * np.exp(detail), 0, 1) - filled) * weight[..., None]


def warped_hair(photo: np.ndarray, crop_to_photo: np.ndarray, crop_size: int, corr: Correspondence) -> Correspondence:
    """``corr`` with the hair the warp carries left out of its unseen surface: where a turn reveals the
    side of the head under the hair (the temple), the warp brings the photo's own hair from inside its
    head, stretched a little, which reads as hair; a fill there, of any colour, is a flat band
    across it. Kept: unseen pixels whose warp source lies inside the photo's head (``from_head``) and,
    in the photo, in its hair: most of the head's pixels over a window ``HAIR_WINDOW`` of the crop
    wide round the source are not of the face's colour (``face_kind``). The test is made where the
    pixel comes from, not where the warp spreads it: the photo's outline (a blend of skin and wall)
    or a jaw's shaded edge, a few pixels of another colour beside the cheek, would read as hair once
    a turn stretches them into a band. The shut lids and the mouth's opening stay filled. Without
    the photo's landmarks (no ``from_head``) ``corr`` is returned as it is."""
    if corr.from_head is None or corr.inside is None or not corr.unseen.any():
        return corr
    crop = _work_crop(photo, crop_to_photo, crop_size, corr.size)
    rows, cols = _source_pixels(corr.flow)
    # the face's colour: the photo's pixels that the seen surface, a fill's sources, comes from
    seen = corr.seen & _fill_sources(corr)
    face = np.zeros(corr.inside.shape, bool)
    face[rows[seen], cols[seen]] = True
    other = ~face_kind(crop, face) & corr.inside
    if corr.jaw_rim is not None:  # the wall's blend by the jaw is not hair
        other &= ~corr.jaw_rim | face_kind(crop, face, light_too=False)
    window = max(3, round(HAIR_WINDOW * corr.size)) | 1
    share = ndimage.uniform_filter(other.astype(np.float32), window)
    share /= np.maximum(ndimage.uniform_filter(corr.inside.astype(np.float32), window), 1e-6)
    keep = corr.unseen & corr.from_head & (share[rows, cols] > 0.5) & ~corr.opening
    if corr.lids is not None:
        keep &= ~corr.lids
    if not keep.any():
        return corr
    unseen = ndimage.binary_opening(corr.unseen & ~keep, iterations=max(1, round(SLIVER * corr.size)))
    if corr.lids is not None:
        unseen |= corr.lids
    return replace(corr, unseen=unseen)


def mirrored_ears(
    photo: np.ndarray,
    crop_to_photo: np.ndarray,
    crop_size: int,
    corr: Correspondence,
    fill: np.ndarray,
    relight: str = "linear",
) -> tuple[Correspondence, np.ndarray]:
    """``corr`` and ``fill`` (``photo_fill``'s) with each ear of ``corr.ear_maps`` drawn from the photo's
    other ear: a turn toward the camera that reveals an ear the photo shows as a sliver spread that
    sliver into a flat, smeared shape. A face is near symmetric, and a photo turned away from that ear
    shows the other whole: it is cut out (``_photo_ear``), mirrored by the map, moved to where the
    photo's sliver of this ear says it stands (``_sliver_offset``), and laid behind the head
    (``corr.front``) over the wall, which is inpainted where the sliver was. Where no clean cut of the
    other ear is found (hair over it, a background of its colour) the ear is left to the warp."""
    if not corr.ear_maps or corr.front is None or corr.head_cover is None:
        return corr, fill
    size = corr.size
    crop = _work_crop(photo, crop_to_photo, crop_size, size)
    linear = srgb_to_linear(crop)
    skin = (linear[..., 0] > linear[..., 1]) & (linear[..., 1] > linear[..., 2])
    skin &= linear[..., 2] < (1 - EAR_SATURATION) * linear[..., 0]
    relit = _relit(_warp_crop(crop, corr.flow), corr, relight)
    shown = np.where(corr.unseen[..., None], fill, relit)  # the edit without the ear
    rows, cols = _source_pixels(corr.flow)
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    front, head = corr.front, corr.head_cover[..., None]
    unseen, cover, fill = corr.unseen.copy(), corr.head_cover.copy(), fill.copy()
    for ear in corr.ear_maps:
        matte = _photo_ear(skin, linear.mean(-1), ear.source, ear.search)
        if matte is None:
            continue
        offset = _sliver_offset(matte, ear, skin)
        src = (np.stack([u, v, np.ones_like(u)], -1) @ ear.affine - offset @ ear.mirror[:2]).astype(np.float32)
        at = [src[..., 1], src[..., 0]]
        soft = ndimage.gaussian_filter(matte.astype(np.float32), 0.7)  # its outline a blend, as a photo's is
        alpha = ndimage.map_coordinates(soft, at, order=1)
        colour = np.stack([ndimage.map_coordinates(crop[..., c], at, order=1, mode="nearest") for c in range(3)], -1)
        # the photo's own sliver of this ear, its outline's blend with the wall included, wherever the
        # warp carries it: the wall (or the hair) there
        sliver = ndimage.binary_dilation(ear.sliver & skin, iterations=2)[rows, cols] & (front < 0.5)
        region = ndimage.binary_dilation((alpha * (1 - front) > 0.01) | sliver) & (front < 0.99)
        ring = ndimage.binary_dilation(region, iterations=3)
        wall = region_fill(relit, ring & ~region & ~sliver & (front < 0.01) & ~skin[rows, cols], ring)
        # the ear over what lies behind it: the edit without the ear within the edited head's outline
        # (the mesh's ear, which ``front`` leaves out, may lie over a cheek the drawn ear does not
        # reach once the sliver has moved it), the wall beyond
        behind = alpha[..., None] * colour + (1 - alpha[..., None]) * (head * shown + (1 - head) * wall)
        fill = np.where(region[..., None], front[..., None] * shown + (1 - front[..., None]) * behind, fill)
        # the feather beyond the region blends into what shows there
        fill = np.where((ring & ~region & ~unseen)[..., None], relit, fill)
        unseen |= region
        cover = np.maximum(cover, region.astype(np.float32))
    return replace(corr, unseen=unseen, head_cover=cover), fill.astype(np.float32)


def _sliver_offset(matte: np.ndarray, ear: EarMap, skin: np.ndarray) -> np.ndarray:
    """(2,): how far (θ0 working pixels, along x) the photo's own sliver of ``ear`` says the ear lies
    from where its mirror image (``matte``, the photo's other ear) puts it. The mirror doubles any
    error of the fit's place and turn across the face (the other ear lies off the mesh's one way,
    this one the other). The sliver (skin past the mesh's head, its ears aside) is this ear's outer
    rim against the wall: the median, over the rows both show and where the wall follows the sliver
    (EAR_WALL), of its outer edge less the mirrored ear's, within EAR_SHIFT of the crop; none where
    the photo shows no sliver (the mirror alone) or no wall past it (a background of the skin's
    colour)."""
    size = matte.shape[0]
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    src = np.stack([u, v, np.ones_like(u)], -1) @ ear.mirror
    placed = ndimage.map_coordinates(matte.astype(np.float32), [src[..., 1], src[..., 0]], order=1) > 0.5
    sliver = ear.sliver & ear.beyond & skin
    both = placed.any(1) & sliver.any(1)
    if both.sum() < EAR_ROWS * size:
        return np.zeros(2)
    outer = u * ear.outward  # the larger, the farther from the face

    def edge(mask: np.ndarray) -> np.ndarray:
        return np.where(mask, outer, -np.inf)[both].max(1) * ear.outward

    rim, mirrored = edge(sliver), edge(placed)
    # a row counts where the wall (not skin, still where the sliver may lie) follows the sliver's edge:
    # skin that runs on to the end of that search is a background of its colour, not an ear's rim
    rows = np.nonzero(both)[0]
    past = np.clip(np.round(rim + EAR_WALL * size * ear.outward).astype(int), 0, size - 1)
    walled = ear.sliver[rows, past] & ~skin[rows, past]
    if walled.sum() < EAR_ROWS * size:
        return np.zeros(2)
    reach = EAR_SHIFT * size
    return np.array([float(np.clip(np.median((rim - mirrored)[walled]), -reach, reach)), 0.0])


def _photo_ear(skin: np.ndarray, light: np.ndarray, hull: np.ndarray, search: np.ndarray) -> np.ndarray | None:
    """(S, S) bool: the photo's ear beside the mesh's (``hull``, θ0), or None where no clean cut of it
    is found. The mesh's ear lies off the photo's (the fit's ears are the model's, not the person's):
    its hull is moved (at most EAR_SHIFT) to where it holds the most ``skin`` of ``search`` and the
    least else; the ear is the skin there (within EAR_MARGIN), lighter than EAR_LIGHT of its median
    (``light``: the temple's shaded skin beside it is not the ear), its largest piece, closed and
    its holes (the shaded bowl, a highlight) filled. Refused when the moved hull holds too little
    skin (EAR_HOLD), when the cut is off the mesh ear's size (EAR_SIZE), or when the skin goes on past
    it (EAR_EDGE of a ring out to EAR_RING: a background of the skin's colour, hair of it)."""
    size = skin.shape[0]
    reach = max(1, round(EAR_SHIFT * size))
    rows, cols = np.nonzero(hull)
    if not len(rows):
        return None
    top, left = rows.min(), cols.min()
    kernel = hull[top : rows.max() + 1, left : cols.max() + 1].astype(np.float32)
    candidates = skin & search
    score = np.pad(np.where(candidates, 1.0, -1.0).astype(np.float32), reach, constant_values=-1.0)
    window = score[top : top + kernel.shape[0] + 2 * reach, left : left + kernel.shape[1] + 2 * reach]
    scores = signal.correlate(window, kernel, mode="valid", method="fft")  # (2 reach + 1) squared shifts
    dy, dx = np.unravel_index(int(np.argmax(scores)), scores.shape)
    if float(scores[dy, dx]) < EAR_HOLD * float(kernel.sum()):
        return None
    placed = ndimage.shift(hull.astype(np.float32), (dy - reach, dx - reach), order=0) > 0.5
    held = np.nonzero(placed.any(1))[0]
    level = (np.arange(size)[:, None] >= held.min()) & (np.arange(size)[:, None] <= held.max() + EAR_MARGIN * size)
    near = candidates & level & ndimage.binary_dilation(placed, iterations=max(1, round(EAR_MARGIN * size)))
    if not (near & placed).any():
        return None
    near &= light > EAR_LIGHT * float(np.median(light[near & placed]))
    near = ndimage.binary_opening(near, iterations=2)
    labels, count = ndimage.label(near)
    if not count:
        return None
    ear = labels == 1 + int(np.argmax(ndimage.sum(near, labels, range(1, count + 1))))
    ear = ndimage.binary_fill_holes(ear | ndimage.binary_closing(ear, iterations=max(1, round(EAR_CLOSE * size))))
    if not 1 / EAR_SIZE < ear.sum() / kernel.sum() < EAR_SIZE:
        return None
    inner = ndimage.binary_dilation(ear, iterations=max(1, round(OUTLINE_BLEND * size)))
    ring = ndimage.binary_dilation(ear, iterations=max(2, round(EAR_RING * size))) & ~inner & search
    if ring.any() and float(skin[ring].mean()) > EAR_EDGE:
        return None
    return ear


def _work_crop(photo: np.ndarray, crop_to_photo: np.ndarray, crop_size: int, size: int) -> np.ndarray:
    """The photo's crop at the working size (sRGB in [0, 1], float32)."""
    work_to_photo = compose_affine(np.asarray(crop_to_photo, np.float64), resize_affine(crop_size, size))
    return warp(photo, work_to_photo, size).astype(np.float32) / 255.0


def _relit(moved: np.ndarray, corr: Correspondence, relight: str) -> np.ndarray:
    """The warped crop (``moved``, sRGB in [0, 1]) relit by ``corr``'s ratio as ``compose_edit`` relights
    it, in ``relight``'s space (RELIGHT_SPACES)."""
    ratio = np.exp(corr.log_ratio)
    return linear_to_srgb(srgb_to_linear(moved) * ratio) if relight == "linear" else np.clip(moved * ratio, 0, 1)


def _source_pixels(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, S) int rows and columns each: the pixel the backward ``flow`` takes each output pixel from."""
    size = flow.shape[0]
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    rows = np.clip(np.round(v + flow[..., 1]), 0, size - 1).astype(int)
    return rows, np.clip(np.round(u + flow[..., 0]), 0, size - 1).astype(int)


def _warp_crop(crop: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """The photo's crop at the working size (``_work_crop``) warped by the backward ``flow`` (bilinear)."""
    size = flow.shape[0]
    v, u = np.mgrid[0:size, 0:size].astype(np.float32)
    rows, cols = v + flow[..., 1], u + flow[..., 0]  # output pixel p shows p + flow
    return np.stack(
        [ndimage.map_coordinates(crop[..., c], [rows, cols], order=1, mode="nearest") for c in range(3)], -1
    )


def _fill_sources(corr: Correspondence) -> np.ndarray:
    """(S, S) bool: the pixels a fill may read: the head's own, a little way from the unseen surface."""
    around = ndimage.binary_dilation(corr.unseen, iterations=2)  # the warp smears the seam: not a source
    # from the head's own pixels only: a cheek turned into view at the outline is skin, not the wall
    source = ~around & ndimage.binary_fill_holes(corr.covered)
    if corr.head is not None:  # not the wall that the mesh's outline, wider than the cheek, covers
        source &= corr.head
    if corr.from_head is not None:  # nor the wall the warp brings in beside the chin (a large turn)
        source &= corr.from_head
    return source


def face_kind(values: np.ndarray, face: np.ndarray, light_too: bool = True) -> np.ndarray:
    """(H, W) bool: the pixels of ``values`` (sRGB in [0, 1]) of the face's colour, the median over
    ``face`` (every pixel where ``face`` is empty): within KIND_CHROMA of it in chromaticity (log of
    each channel over the channels' mean, in linear light, which a change of the light's strength
    keeps) and, unless not ``light_too``, within a factor KIND_LIGHT in light. The rest is another
    kind: hair, brows, lips."""
    linear = srgb_to_linear(np.clip(values, 0, 1)) + 1e-3
    light = linear.mean(-1)
    chroma = np.log(linear / light[..., None])
    if not face.any():
        face = np.ones(face.shape, bool)
    like = np.abs(chroma - np.median(chroma[face], 0)).max(-1) < KIND_CHROMA
    if not light_too:
        return like
    return like & (np.abs(np.log(light) - np.median(np.log(light[face]))) < math.log(KIND_LIGHT))


def kind_fill(
    values: np.ndarray,
    base: np.ndarray,
    source: np.ndarray,
    region: np.ndarray,
    face: np.ndarray,
    grain: np.ndarray | None = None,
) -> np.ndarray:
    """``region_fill`` of ``base`` (H, W, 3 sRGB in [0, 1]) over ``region`` that keeps two kinds of
    source apart: those of the face's colour (``face_kind`` of ``values`` over ``face``) and the rest
    (hair, brows, lips). Each kind is filled from its own sources alone; a pixel takes the other kind
    where that kind holds more than KIND_SPLIT of its border (the harmonic measure: the plain fill of
    the kinds' indicator), blended over KIND_BLEND. A band bordered by the cheek below and the
    temple's hair above so meets each in its own colour, with a hairline between, where one harmonic
    fill of both is a brown of neither. ``grain``: where each kind's fill is given the fine detail of
    its own sources (``_grain``), so that a filled cheek is not a flat patch of paint."""
    like = face_kind(values, face & source if (face & source).any() else source)
    mixed = region_fill(np.concatenate([base, (~like)[..., None].astype(np.float32)], -1), source, region)
    share = smoothstep((mixed[..., 3:] - KIND_SPLIT) / KIND_BLEND)
    own = region_fill(base, source & like, region)
    other = region_fill(base, source & ~like, region)
    if grain is not None and grain.any():
        rng = np.random.default_rng(0)  # the same edit, the same grain
        detail = values - np.stack([ndimage.gaussian_filter(values[..., c], GRAIN_SIGMA) for c in range(3)], -1)
        energy = ndimage.gaussian_filter(np.square(detail).sum(-1), 2 * GRAIN_SIGMA)
        near = ndimage.distance_transform_edt(~grain) <= GRAIN_REACH * max(grain.shape)
        own = own + _grain(detail, energy, source & like & near, grain, rng)
        other = other + _grain(detail, energy, source & ~like & near, grain, rng)
    out = np.where(region[..., None], own * (1 - share) + other * share, mixed[..., :3])
    return np.clip(out, 0, 1)


def _grain(
    detail: np.ndarray, energy: np.ndarray, pool: np.ndarray, target: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(H, W, 3): the fine ``detail`` (an image less its blur, GRAIN_SIGMA; ``energy``: its square,
    blurred) over ``target``, in overlapping patches (GRAIN_PATCH, a squared-sine window, their sum
    scaled to keep the detail's variance) copied from random places of ``pool`` (``kind_fill``: one
    kind's sources within GRAIN_REACH of the target); 0 elsewhere. A patch that reaches detail whose
    energy exceeds GRAIN_EDGE times the pool's median (a jaw's contour, a crease) is never copied:
    random pieces of a line would draw ghost lines across the fill."""
    height, width = target.shape
    out = np.zeros((height, width, 3), np.float32)
    if not pool.any():
        return out
    half = GRAIN_PATCH // 2
    calm = ndimage.binary_erosion(pool & (energy <= GRAIN_EDGE * np.median(energy[pool])), iterations=half)
    centre_rows, centre_cols = np.nonzero(calm)
    if not len(centre_rows):
        return out
    taper = np.sin(np.pi * (np.arange(GRAIN_PATCH) + 0.5) / GRAIN_PATCH) ** 2
    window = np.outer(taper, taper).astype(np.float32)
    power = np.zeros((height, width), np.float32)
    rows, cols = np.nonzero(target)
    for r0 in range(rows.min() - half, rows.max() + 1, half):
        for c0 in range(cols.min() - half, cols.max() + 1, half):
            r, c = slice(max(r0, 0), min(r0 + GRAIN_PATCH, height)), slice(max(c0, 0), min(c0 + GRAIN_PATCH, width))
            if not target[r, c].any():
                continue
            k = rng.integers(len(centre_rows))
            dr, dc = centre_rows[k] - half - r0, centre_cols[k] - half - c0  # the patch's offset
            w = window[r.start - r0 : r.stop - r0, c.start - c0 : c.stop - c0]
            out[r, c] += detail[r.start + dr : r.stop + dr, c.start + dc : c.stop + dc] * w[..., None]
            power[r, c] += w * w
    out /= np.sqrt(np.maximum(power, 1e-6))[..., None]
    return np.where(target[..., None], out, 0)


def _closed_lids(filled: np.ndarray, moved: np.ndarray, lids: np.ndarray, lashes: np.ndarray) -> np.ndarray:
    """The inpainted ``lids`` made a shut lid: brightened toward the skin around them (the median of a
    ring, at most LID_LIFT_MAX), given the skin's grain (the fine detail, the image less its blur, of
    the skin just above, moved down onto them) and a lash line in the darkest colour of the photo's
    own lashes (which the lids now cover)."""
    rows = np.nonzero(lids.any(1))[0]
    shift = int(rows.max() - rows.min() + 1)
    blur = np.stack([ndimage.gaussian_filter(moved[..., c], 1.5) for c in range(3)], -1)
    grain = np.roll(moved - blur, shift, axis=0)
    # a shut lid is stretched over the eyeball and lit like the skin around it; the fill takes the
    # dark of the lashes and the crease at its border: raised (never lowered) to the ring's median
    ring = ndimage.binary_dilation(lids, iterations=max(2, shift // 2)) & ~lids
    target = float(np.median(moved[ring].mean(-1)))
    gain = np.clip(target / np.maximum(ndimage.gaussian_filter(filled.mean(-1), 2), 1e-3), 1, LID_LIFT_MAX)
    inside = smoothstep(ndimage.distance_transform_edt(lids) / max(2, shift / 4))
    filled = filled * (1 + inside * (gain - 1))[..., None]
    out = np.where(lids[..., None], filled + grain, filled)
    shade = moved[lids].mean(-1)  # what the lids cover held the lashes (and the iris): their darkest tenth
    dark = moved[lids][shade <= np.quantile(shade, 0.1)].mean(0)
    alpha = (lashes * lids)[..., None]
    return np.clip(out * (1 - alpha) + dark * alpha, 0, 1)


RELIGHT_SPACES = ("linear", "srgb")


def compose_edit(
    photo: np.ndarray,
    crop_to_photo: np.ndarray,
    crop_size: int,
    corr: Correspondence,
    fill: np.ndarray,
    relight: str = "linear",
) -> PhysicalEdit:
    """Steps 2 and 3 at the photo's size: the photo (H, W, 3) uint8 warped by ``corr``'s flow, relit by
    its ratio, filled from ``fill`` (crop frame, any size, uint8 or [0, 1] floats) where unseen, and
    composed in through a feathered mask.

    The per-photo-pixel work runs in torch (``grid_sample``) in bands of rows over the photo pixels
    the mask can reach; every other pixel is the photo's, bit for bit.
    """
    photo = np.asarray(photo)
    height, width = photo.shape[:2]
    size = corr.size
    work_to_photo = compose_affine(np.asarray(crop_to_photo, np.float64), resize_affine(crop_size, size))
    photo_to_work = invert_affine(work_to_photo)
    fill_img = np.asarray(fill, np.float32) / (255.0 if np.asarray(fill).dtype == np.uint8 else 1.0)
    work_to_fill = resize_affine(fill_img.shape[0], size)

    # where anything changes (flow, ratio, fill), grown and feathered, kept off the crop's edge
    changed = (np.abs(corr.flow).max(-1) > 1e-3) | (np.abs(corr.log_ratio).max(-1) > 1e-4) | corr.unseen
    feather = max(1.0, 0.004 * size)
    grown = ndimage.binary_dilation(changed, iterations=max(1, int(2 * feather)))
    mask_w = np.minimum(ndimage.gaussian_filter(grown.astype(np.float32), feather) * 2, 1) * corr.edge_weight
    mask_w[corr.edge_weight == 0] = 0
    around = ndimage.binary_dilation(corr.unseen).astype(np.float32)
    fill_w = np.maximum(corr.unseen, np.clip(ndimage.gaussian_filter(around, 0.5 * feather) * 2, 0, 1))
    if corr.head_cover is not None:  # the fill ends through the edited head's outline, a blend with the wall
        fill_w = fill_w * corr.head_cover
    lids = np.zeros((size, size), np.float32) if corr.lids is None else corr.lids.astype(np.float32)
    reach = max(1, round(LID_HOLD_REACH * size))
    lids = np.clip(ndimage.gaussian_filter(ndimage.maximum_filter(lids, 2 * reach + 1), reach / 2) * 2, 0, 1)

    # the photo pixels the mask can reach (its support, a working pixel wider, placed in the photo),
    # composed in bands of rows so that every intermediate stays small
    full = (
        np.zeros((height, width, 2), np.float32),
        np.ones((height, width, 3), np.float32),
        np.zeros((height, width), np.float32),
        np.zeros((height, width), np.float32),
        np.zeros((height, width), np.float32),
    )
    image = photo.copy()
    box = support_box(mask_w, work_to_photo, height, width)
    if box is None:
        return PhysicalEdit(image, *full)
    edit = _PixelEdit(
        photo,
        channels(
            np.concatenate([mask_w[..., None], corr.flow, corr.log_ratio, fill_w[..., None], lids[..., None]], -1)
        ),
        photo_to_work,
        torch.from_numpy(work_to_photo[:, :2]).float(),
        channels(fill_img),
        compose_affine(work_to_fill, photo_to_work),
        relight,
    )
    with torch.no_grad():
        for part in bands(box):
            out, *fields = edit(part)
            image[part.rows, part.cols] = out
            for target, values in zip(full, fields, strict=True):
                target[part.rows, part.cols] = values
    return PhysicalEdit(image, *full)


TRUST_LEVELS = 16.0  # 8-bit levels: where the model's reconstruction is off by this much, it adds nothing
CHROMA_SIGMA = 0.04  # of the model's size: the scale below which the model's colour change is dropped
TRANSFER_FEATHER = 0.015  # of the crop: the face mask the model's correction is composed through is feathered this much


def transfer_mask(face_mask: np.ndarray) -> np.ndarray:
    """(S, S) float: where the model's correction is trusted, in the crop frame: the faces of θ0 and θ1
    (``face_mask``, bool, any size), feathered, and zero before the crop square's edge."""
    size = face_mask.shape[0]
    soft = np.minimum(ndimage.gaussian_filter(face_mask.astype(np.float32), TRANSFER_FEATHER * size) * 2, 1)
    edge = _edge_weight(size)
    soft = soft * edge
    soft[edge == 0] = 0
    return soft.astype(np.float32)


def transfer(
    image: np.ndarray,
    mask: np.ndarray,
    correction: np.ndarray,
    crop_to_photo: np.ndarray,
    crop_size: int,
    face_mask: np.ndarray,
    hold: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The model's correction carried to the photo's size: (image uint8, mask float) at the photo's size.

    ``correction`` (s, s, 3) in the crop frame at the model's size s, upsampled through the crop
    transform (bilinear), is applied to ``image`` (the physical edit, or the photo) inside
    ``transfer_mask(face_mask)``, added in 8-bit levels (``model_correction``). The mask returned is
    ``mask`` (the physical edit's)
    joined with that one. Where both are zero the pixels of ``image`` are returned bit for bit.
    ``hold`` (H, W) in [0, 1]: where the correction is held off (the physical edit's shut lids: a
    model that learnt the person's open eyes blurs their lash line back toward an open eye).
    """
    image = np.array(image, copy=True)
    mask = np.array(mask, np.float32, copy=True)
    height, width = image.shape[:2]
    size = correction.shape[0]
    soft = transfer_mask(face_mask)
    crop = np.asarray(crop_to_photo, np.float64)
    photo_to_model = invert_affine(compose_affine(crop, resize_affine(crop_size, size)))
    mask_to_photo = compose_affine(crop, resize_affine(crop_size, soft.shape[0]))
    photo_to_mask = invert_affine(mask_to_photo)
    box = support_box(soft, mask_to_photo, height, width)
    if box is None:
        return image, mask
    soft_t, correction_t = channels(soft), channels(correction)
    with torch.no_grad():
        for part in bands(box):
            alpha = sample(soft_t, affine_grid(photo_to_mask, part, *soft.shape))[0]
            if hold is not None:
                alpha = alpha * (1 - torch.from_numpy(np.ascontiguousarray(hold[part.rows, part.cols])))
            alpha = torch.where(alpha < 1e-4, 0.0, alpha)
            on = alpha > 0
            if not bool(on.any()):
                continue
            delta = sample(correction_t, affine_grid(photo_to_model, part, size, size), border=True)
            before = channels(image[part.rows, part.cols])
            value = before + delta * alpha
            value = value.clamp(0, 255).round()
            image[part.rows, part.cols] = torch.where(on, value, before).to(torch.uint8).permute(1, 2, 0).numpy()
            mask[part.rows, part.cols] = np.maximum(mask[part.rows, part.cols], alpha.numpy())
    return image, mask


def model_correction(
    samples: torch.Tensor, start: torch.Tensor, recon: torch.Tensor, unedited: torch.Tensor, trust: bool = True
) -> torch.Tensor:
    """What the model adds to the edit it was given, in 8-bit levels at the model's size (B, 3, s, s).

    (edited sample - its input) - (reconstruction - unedited crop), all in [-1, 1]: what the model does
    to an unedited photo (its reconstruction error) cancels, and so does the physical edit it started
    from; ``transfer`` carries the rest onto the photo at its own size. Its colour (each channel less
    the channels' mean) is blurred by CHROMA_SIGMA of the model's size; its brightness is kept whole;
    all of it fades out where the model's reconstruction is TRUST_LEVELS off the photo, unless
    ``trust`` is off: at strength 1 there is no physical edit to fall back on, and the fade turned a
    weak model's edit into the photo returned unchanged, without a word.
    """
    delta = ((samples - start) - (recon - unedited)) * 127.5
    # its colour is kept only at a coarse scale: a small model's per-pixel colour is speckle (green and
    # magenta flecks on the skin), while what an edit changes in colour (a lit cheek warmer) is broad
    grey = delta.mean(1, keepdim=True)
    delta = grey + _gaussian_blur(delta - grey, CHROMA_SIGMA * delta.shape[-1])
    if not trust:
        return delta
    # trusted where the model knows the photo: faded out where its reconstruction is off by TRUST_LEVELS
    error = _gaussian_blur((recon - unedited).abs().mean(1, keepdim=True) * 127.5, CHROMA_SIGMA * delta.shape[-1])
    return delta * (1 - error / TRUST_LEVELS).clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(B, C, H, W) blurred by a separable Gaussian of ``sigma`` pixels (the edges reflected)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / sigma) ** 2)
    taps = (taps / taps.sum()).to(x.device)
    channels = x.shape[1]
    out = torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="reflect")
    out = torch.nn.functional.conv2d(out, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    out = torch.nn.functional.pad(out, (0, 0, radius, radius), mode="reflect")
    return torch.nn.functional.conv2d(out, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def paste_back_crop(
    photo: np.ndarray, crop: np.ndarray, crop_to_photo: np.ndarray, face_mask: np.ndarray, feather: float = 0.04
) -> np.ndarray:
    """The edited crop composed into the full photo through the crop's transform, with a feathered mask
    (the plain blend of ``--compose plain``).

    ``crop`` and ``face_mask`` are in crop pixels (any size: the transform is scaled to match);
    photo pixels where the feathered mask is zero are returned unchanged.
    """
    size = crop.shape[0]
    scale_to = size / face_mask.shape[0]
    mask = ndimage.gaussian_filter(face_mask.astype(np.float32), sigma=feather * face_mask.shape[0])
    if scale_to != 1:
        mask = ndimage.zoom(mask, scale_to, order=1)
    # crop pixel (u, v) at this size <- crop pixel at the transform's size: centres kept
    matrix = np.asarray(crop_to_photo, dtype=np.float64)
    inv = invert_affine(matrix)  # photo -> original crop
    height, width = photo.shape[:2]
    corners = apply_affine(matrix, [[0, 0], [0, face_mask.shape[0]], [face_mask.shape[0], 0], [face_mask.shape[0]] * 2])
    x0, y0 = np.floor(corners.min(0)).astype(int).clip(0, [width - 1, height - 1])
    x1, y1 = np.ceil(corners.max(0)).astype(int).clip(0, [width - 1, height - 1])
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    uv = apply_affine(inv, np.stack([xs.ravel(), ys.ravel()], 1))
    uv = (uv + 0.5) * (size / face_mask.shape[0]) - 0.5
    coords = [uv[:, 1], uv[:, 0]]
    alpha = ndimage.map_coordinates(mask, coords, order=1, mode="constant", cval=0.0).reshape(xs.shape)
    out = photo.copy()
    region = out[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
    for c in range(3):
        value = ndimage.map_coordinates(crop[..., c].astype(np.float32), coords, order=1, mode="nearest")
        region[..., c] = region[..., c] * (1 - alpha) + value.reshape(xs.shape) * alpha
    changed = alpha > 0
    block = out[y0 : y1 + 1, x0 : x1 + 1]
    block[changed] = np.clip(region[changed], 0, 255).round().astype(np.uint8)
    return out
