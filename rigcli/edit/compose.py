"""The physical edit at the photo's own resolution: no model, only the fit before (θ0) and after (θ1).

1. Geometry: θ0 and θ1 are the same mesh, so they give a dense correspondence. θ1 is rasterized at
   a working resolution (the crop at about the photo's scale, capped); the barycentric point of each
   covered pixel is projected under θ0, and kept where θ0 sees it (a front face, and θ0's z-buffer
   there holds that triangle or one at the same depth). That backward flow is extended outside the
   face by a harmonic fill (cascadic multigrid) with the face's flow as its boundary condition, zero
   beyond a band around the face and near the crop square's edge; the full-resolution photo is
   warped by it (bilinear; a pixel whose flow is zero is copied).
2. Quotient-image relight: the warped photo, in linear light, times the new shading over the old one
   of the same surface point (θ1's normals under θ1's light over θ0's normals under θ0's light),
   smoothed, clamped to [RATIO_MIN, RATIO_MAX], faded to 1 over a wide band where the mesh's open
   edge (the neck's cut) or the crop square's edge crosses the face, and harmonically extended a
   little past the silhouette. Surface θ1 shows and θ0 hid (a cheek turned into view, the opening
   of the mouth) is filled from ``fill`` (the model's output, crop frame, any size) or else from the
   render of θ1 (its shaded buffer, taken as linear light).
3. Composition: a feathered mask over everything that changed; it fades to zero before the crop
   square's edge (where the crop reflects the photo), and outside it the photo is returned bit for bit.

Conventions: ``crop_to_photo`` (2x3) maps pixel centres of the crop of ``crop_size`` pixels (the fits'
frame) to photo pixels (x = column, y = row); flows are backward: output pixel p shows input p + flow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from rigcli.face.model import FaceModel, vertex_normals
from rigcli.face.params import FaceFit, rescale_fit
from rigcli.image.align import compose_affine, invert_affine
from rigcli.render.buffers import rasterize_fit, render_buffers, sh_shading

MAX_WORK_SIZE = 1024  # working resolution cap (crop pixels) for the correspondence
RATIO_MIN, RATIO_MAX = 0.25, 4.0
SHADE_FLOOR = 0.05  # of the mean shading: the least shading a surface point is taken to have
DEPTH_TOLERANCE = 0.3  # model units (cm): a θ0 z-buffer this close in front still counts as the same surface
FLOW_BAND = 0.10  # of the crop: the flow falls to zero this far outside the face
RATIO_BAND = 0.03  # of the crop: the shading ratio falls to 1 this far outside the silhouette
OPEN_EDGE_BAND = 0.07  # of the crop: the ratio fades to 1 over this band inside the mesh's open edge
EDGE_MARGIN, EDGE_RAMP = 0.02, 0.06  # of the crop: nothing changes within MARGIN of its edge, fully from +RAMP
RATIO_SIGMA = 0.75  # working pixels: smoothing of the log ratio
SLIVER = 0.002  # of the crop: unseen surface thinner than about twice this is warped, not filled


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


@dataclass
class PhysicalEdit:
    """The edited photo and the fields that made it, at the photo's size."""

    image: np.ndarray  # (H, W, 3) uint8
    flow: np.ndarray  # (H, W, 2) backward flow (dx, dy) in photo pixels
    ratio: np.ndarray  # (H, W, 3) shading ratio applied in linear light (1 outside the face)
    mask: np.ndarray  # (H, W) float32 in [0, 1]: where the edit is composed in; 0: the input's pixel
    fill: np.ndarray  # (H, W) float32: how much of the pixel comes from the fill (unseen surface)


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(x, np.float32), 0, 1)
    return np.where(x <= 0.0031308, x * 12.92, 1.055 * np.power(x, 1 / 2.4) - 0.055).astype(np.float32)


def working_size(crop_to_photo: np.ndarray, crop_size: int, cap: int = MAX_WORK_SIZE) -> int:
    """The crop's size at the photo's own scale (photo pixels per crop pixel x crop size), capped."""
    scale = float(np.sqrt(abs(np.linalg.det(np.asarray(crop_to_photo, np.float64)[:, :2]))))
    return int(np.clip(round(crop_size * scale), crop_size, cap))


def resize_affine(from_size: int, to_size: int) -> np.ndarray:
    """2x3: pixel centres of a crop of ``to_size`` -> the same crop at ``from_size`` (centres kept)."""
    k = from_size / to_size
    return np.array([[k, 0, 0.5 * k - 0.5], [0, k, 0.5 * k - 0.5]], dtype=np.float64)


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return (x * x * (3 - 2 * x)).astype(np.float32)


def harmonic_fill(values: np.ndarray, known: np.ndarray, iterations: int = 24) -> np.ndarray:
    """Values (H, W, C) kept where ``known``, elsewhere the harmonic interpolant of them (Laplace's
    equation with the known pixels as boundary condition), by cascadic multigrid: solve on a
    half-size grid, upsample as the initial guess, relax with Jacobi steps."""
    values = np.where(known[..., None], values, 0).astype(np.float32)
    height, width = known.shape
    if not known.any():
        return np.zeros_like(values)
    if min(height, width) <= 4:
        guess = np.broadcast_to(values[known].mean(0), values.shape).copy()
        return _relax(np.where(known[..., None], values, guess), values, known, 4 * iterations)
    h2, w2 = (height + 1) // 2, (width + 1) // 2
    pad = ((0, 2 * h2 - height), (0, 2 * w2 - width))
    weight = np.pad(known.astype(np.float32), pad).reshape(h2, 2, w2, 2).sum((1, 3))
    total = np.pad(values, (*pad, (0, 0))).reshape(h2, 2, w2, 2, -1).sum((1, 3))
    coarse_known = weight > 0
    coarse = harmonic_fill(total / np.maximum(weight, 1)[..., None], coarse_known, iterations)
    guess = np.repeat(np.repeat(coarse, 2, 0), 2, 1)[:height, :width]
    return _relax(np.where(known[..., None], values, guess), values, known, iterations)


def _relax(x: np.ndarray, values: np.ndarray, known: np.ndarray, iterations: int) -> np.ndarray:
    """Jacobi steps of Laplace's equation on the unknown pixels (edges replicated: a natural boundary)."""
    for _ in range(iterations):
        p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
        x = 0.25 * (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:])
        x = np.where(known[..., None], values, x)
    return x


def mesh_boundaries(model: FaceModel) -> tuple[np.ndarray, np.ndarray]:
    """The mesh's boundary edges (used by one triangle), (N, 2) vertex ids, in two kinds: off the face
    region, where the mesh stops on skin that goes on in the photo (the neck's cut); and in it, the
    face's openings (eyes, mouth)."""
    tri = model.triangles.cpu().numpy()
    edges = np.sort(np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]), 1)
    unique, counts = np.unique(edges, axis=0, return_counts=True)
    boundary = unique[counts == 1]
    in_face = model.regions["face"].cpu().numpy()[boundary].all(1)
    return boundary[~in_face], boundary[in_face]


def _edge_weight(size: int) -> np.ndarray:
    idx = np.arange(size, dtype=np.float32)
    dist = np.minimum(idx, size - 1 - idx)
    ramp = smoothstep((dist - EDGE_MARGIN * size) / (EDGE_RAMP * size))
    return np.minimum(ramp[:, None], ramp[None, :])


def _visible_points(model: FaceModel, g0, g1) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Per θ1 pixel: the θ0 screen point (u, v) of the same surface point, and whether θ0 sees it."""
    f1 = g1.fragments
    tri = model.triangles
    point = f1.interpolate(g0.screen, tri)[0]  # (S, S, 3): u, v, depth under θ0
    size = point.shape[0]
    s0 = g0.screen[0, :, :2]
    a, b, c = s0[tri[:, 0]], s0[tri[:, 1]], s0[tri[:, 2]]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    front = area < 0  # the rasterizer's front-face test
    f0 = g0.fragments
    zbuf = f0.interpolate(g0.screen[..., 2:], tri)[0, ..., 0]
    col = point[..., 0].round().long().clamp(0, size - 1)
    row = point[..., 1].round().long().clamp(0, size - 1)
    inside = (point[..., 0] >= -0.5) & (point[..., 0] <= size - 0.5) & (point[..., 1] >= -0.5)
    inside &= point[..., 1] <= size - 0.5
    t1 = f1.triangle[0]
    same = f0.triangle[0, row, col] == t1
    near = point[..., 2] >= zbuf[row, col] - DEPTH_TOLERANCE
    seen = f1.mask[0] & inside & front[t1.clamp_min(0)] & f0.mask[0, row, col] & (same | near)
    return point[..., :2].numpy().astype(np.float64), seen.numpy(), f0.mask[0]


def correspondence(model: FaceModel, fit0: FaceFit, fit1: FaceFit, crop_size: int, size: int) -> Correspondence:
    """θ1 -> θ0 of one photo (batch-1 fits in the crop frame of ``crop_size``) at ``size`` working pixels."""
    with torch.no_grad():
        w0, w1 = rescale_fit(fit0, crop_size, size), rescale_fit(fit1, crop_size, size)
        g0, g1 = rasterize_fit(model, w0, size), rasterize_fit(model, w1, size)
        point, seen, covered0 = _visible_points(model, g0, g1)
        covered = g1.fragments.mask[0].numpy()
        # shading of the same surface point: θ0's vertex normals at θ1's barycentrics
        n0 = g1.fragments.interpolate(vertex_normals(g0.vertices_cam, model.triangles), model.triangles)
        n0 = n0 / n0.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        shade1 = sh_shading(g1.normals, fit1.light)[0].numpy()
        shade0 = sh_shading(n0, fit0.light)[0].numpy()
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    edge = _edge_weight(size)
    outside = ndimage.distance_transform_edt(~ndimage.binary_fill_holes(covered))

    # 1. the flow: the face's as boundary condition, zero beyond a band and at the crop's edge
    flow_face = np.stack([point[..., 0] - u, point[..., 1] - v], -1).astype(np.float32) * edge[..., None]
    zero = (outside > FLOW_BAND * size) | (edge == 0)
    flow = harmonic_fill(np.where(seen[..., None], flow_face, 0), seen | zero)
    flow[zero & ~seen] = 0
    # the mouth's opening (inside the mesh's own openings, uncovered) is new wherever it moved or its
    # source lands on θ0's mesh; slivers of unseen surface (a pixel or two wide) are left to the warp
    hole = _openings(model, g1.screen[0, :, :2].numpy(), size) & ~covered
    src_col = np.clip(np.round(u + flow[..., 0]), 0, size - 1).astype(int)
    src_row = np.clip(np.round(v + flow[..., 1]), 0, size - 1).astype(int)
    moved = np.abs(flow).max(-1) > 0.5
    unseen = (covered & ~seen) | (hole & (covered0.numpy()[src_row, src_col] | moved))
    unseen = ndimage.binary_opening(unseen, iterations=max(1, round(SLIVER * size)))

    # 2. the shading ratio, faded where the mesh ends on skin and at the crop's edge
    # second-order SH shading goes negative on the dark side: both are floored alike, so the ratio
    # of a surface point lit the same way is exactly 1 (a no-op edit is one), never a clamp's 1/4
    floor = SHADE_FLOOR * max(float(np.abs(shade0[seen]).mean()) if seen.any() else 1.0, 1e-6)
    ratio = np.where(seen[..., None], np.maximum(shade1, floor) / np.maximum(shade0, floor), 1.0)
    log_ratio = np.log(np.clip(ratio, RATIO_MIN, RATIO_MAX)).astype(np.float32)
    weight = ndimage.gaussian_filter(seen.astype(np.float32), RATIO_SIGMA)
    smooth = np.stack([ndimage.gaussian_filter(log_ratio[..., c] * seen, RATIO_SIGMA) for c in range(3)], -1)
    log_ratio = np.where(seen[..., None], smooth / np.maximum(weight, 1e-6)[..., None], 0)
    log_ratio *= (edge * _open_edge_weight(model, g1.screen[0, :, :2].numpy(), size))[..., None]
    zero_r = (outside > RATIO_BAND * size) | (edge == 0)
    log_ratio = harmonic_fill(log_ratio, (seen & ~zero_r) | zero_r)
    log_ratio[zero_r] = 0
    return Correspondence(size, flow.astype(np.float32), covered, seen, unseen, log_ratio.astype(np.float32), edge)


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


def _openings(model: FaceModel, screen: np.ndarray, size: int) -> np.ndarray:
    """(S, S) bool: inside the face's openings (the boundary loops in the face region: eyes, mouth)."""
    return ndimage.binary_fill_holes(_draw_edges(screen, mesh_boundaries(model)[1], size))


def _open_edge_weight(model: FaceModel, screen: np.ndarray, size: int) -> np.ndarray:
    """(S, S): 0 on the mesh's open edge (as θ1 projects it), rising to 1 over OPEN_EDGE_BAND."""
    on_edge = _draw_edges(screen, mesh_boundaries(model)[0], size)
    if not on_edge.any():
        return np.ones((size, size), np.float32)
    return smoothstep(ndimage.distance_transform_edt(~on_edge) / (OPEN_EDGE_BAND * size))


def render_fill(model: FaceModel, fit1: FaceFit, crop_size: int, size: int) -> np.ndarray:
    """The fill where no model output is given: θ1's shaded buffer (linear light) as sRGB in [0, 1]."""
    with torch.no_grad():
        shaded = render_buffers(model, rescale_fit(fit1, crop_size, size), size)[0, :3]
    return linear_to_srgb(shaded.permute(1, 2, 0).numpy())


def _sample(field: np.ndarray, rows: np.ndarray, cols: np.ndarray, cval: float = 0.0) -> np.ndarray:
    """Bilinear samples of an (S, S) or (S, S, C) field at fractional positions: (N,) or (N, C)."""
    if field.ndim == 2:
        return ndimage.map_coordinates(field, [rows, cols], order=1, mode="constant", cval=cval)
    return np.stack([_sample(field[..., c], rows, cols, cval) for c in range(field.shape[-1])], -1)


def physical_edit(
    photo: np.ndarray,
    crop_to_photo: np.ndarray,
    crop_size: int,
    model: FaceModel,
    fit0: FaceFit,
    fit1: FaceFit,
    fill: np.ndarray | None = None,
    work_size: int | None = None,
) -> PhysicalEdit:
    """The model-free edit θ0 -> θ1 of one photo (H, W, 3) uint8 at its own size.

    ``fit0`` / ``fit1``: batch-1 fits in the crop frame of ``crop_size`` pixels that ``crop_to_photo``
    places in the photo; ``fill``: the model's output for θ1 (crop frame, any size, uint8 or [0, 1]
    floats) for the surface the photo never showed, else θ1's render is used.
    """
    photo = np.asarray(photo)
    height, width = photo.shape[:2]
    size = work_size or working_size(crop_to_photo, crop_size)
    corr = correspondence(model, fit0, fit1, crop_size, size)
    work_to_photo = compose_affine(np.asarray(crop_to_photo, np.float64), resize_affine(crop_size, size))
    photo_to_work = invert_affine(work_to_photo)
    if fill is None:
        fill_img, work_to_fill = render_fill(model, fit1, crop_size, size), np.eye(2, 3)
    else:
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

    # the photo pixels the crop square can touch, then those the mask reaches
    corners = np.array([[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, -0.5], [size - 0.5, size - 0.5]])
    box = corners @ work_to_photo[:, :2].T + work_to_photo[:, 2]
    x0, y0 = np.clip(np.floor(box.min(0)).astype(int), 0, [width - 1, height - 1])
    x1, y1 = np.clip(np.ceil(box.max(0)).astype(int), 0, [width - 1, height - 1])
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    wu = photo_to_work[0, 0] * xs + photo_to_work[0, 1] * ys + photo_to_work[0, 2]
    wv = photo_to_work[1, 0] * xs + photo_to_work[1, 1] * ys + photo_to_work[1, 2]
    alpha_box = _sample(mask_w, wv.ravel(), wu.ravel()).reshape(xs.shape)
    alpha_box[alpha_box < 1e-4] = 0
    on = alpha_box > 0
    px, py, pu, pv = xs[on], ys[on], wu[on], wv[on]
    alpha = alpha_box[on]

    flow_w = _sample(corr.flow, pv, pu)  # working pixels
    flow_p = flow_w @ work_to_photo[:, :2].T  # photo pixels
    sx, sy = px + flow_p[:, 0], py + flow_p[:, 1]
    still = (flow_p == 0).all(1)
    warped = np.empty((len(px), 3), np.float32)
    for c in range(3):
        warped[:, c] = ndimage.map_coordinates(photo[..., c].astype(np.float32), [sy, sx], order=1, mode="nearest")
    warped[still] = photo[py[still], px[still]]
    ratio = np.exp(_sample(corr.log_ratio, pv, pu))
    relight = np.abs(ratio - 1).max(1) > 1e-5
    edited = warped / 255.0
    edited[relight] = linear_to_srgb(srgb_to_linear(edited[relight]) * ratio[relight])
    f_alpha = _sample(fill_w, pv, pu)
    if (f_alpha > 0).any():
        fu = work_to_fill[0, 0] * pu + work_to_fill[0, 2]
        fv = work_to_fill[1, 1] * pv + work_to_fill[1, 2]
        sampled = np.stack(
            [ndimage.map_coordinates(fill_img[..., c], [fv, fu], order=1, mode="nearest") for c in range(3)], -1
        )
        edited = edited * (1 - f_alpha[:, None]) + sampled * f_alpha[:, None]
    before = photo[py, px].astype(np.float32)
    blended = before * (1 - alpha[:, None]) + edited * 255.0 * alpha[:, None]

    image = photo.copy()
    image[py, px] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
    flow_full = np.zeros((height, width, 2), np.float32)
    ratio_full = np.ones((height, width, 3), np.float32)
    mask_full = np.zeros((height, width), np.float32)
    fill_full = np.zeros((height, width), np.float32)
    flow_full[py, px], ratio_full[py, px], mask_full[py, px], fill_full[py, px] = flow_p, ratio, alpha, f_alpha
    return PhysicalEdit(image, flow_full, ratio_full, mask_full, fill_full)


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
) -> tuple[np.ndarray, np.ndarray]:
    """The model's correction carried to the photo's size: (image uint8, mask float) at the photo's size.

    ``correction`` (s, s, 3), in 8-bit levels in the crop frame at the model's size s, is added (a
    difference, not a ratio: see ``rigcli.edit.editor``) to ``image`` (the physical edit, or the
    photo) through the crop transform (bilinear), inside ``transfer_mask(face_mask)``; the mask
    returned is ``mask`` (the physical edit's) joined with that one. Where both are zero the pixels
    of ``image`` are returned bit for bit.
    """
    image = np.array(image, copy=True)
    height, width = image.shape[:2]
    size = correction.shape[0]
    soft = transfer_mask(face_mask)
    mask_size = soft.shape[0]
    model_to_photo = compose_affine(np.asarray(crop_to_photo, np.float64), resize_affine(crop_size, size))
    photo_to_model = invert_affine(model_to_photo)
    photo_to_mask = invert_affine(
        compose_affine(np.asarray(crop_to_photo, np.float64), resize_affine(crop_size, mask_size))
    )
    corners = np.array([[-0.5, -0.5], [-0.5, size - 0.5], [size - 0.5, -0.5], [size - 0.5, size - 0.5]])
    box = corners @ model_to_photo[:, :2].T + model_to_photo[:, 2]
    x0, y0 = np.clip(np.floor(box.min(0)).astype(int), 0, [width - 1, height - 1])
    x1, y1 = np.clip(np.ceil(box.max(0)).astype(int), 0, [width - 1, height - 1])
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1]
    mu = photo_to_mask[0, 0] * xs + photo_to_mask[0, 1] * ys + photo_to_mask[0, 2]
    mv = photo_to_mask[1, 0] * xs + photo_to_mask[1, 1] * ys + photo_to_mask[1, 2]
    alpha_box = _sample(soft, mv.ravel(), mu.ravel()).reshape(xs.shape)
    alpha_box[alpha_box < 1e-4] = 0
    on = alpha_box > 0
    mask = np.array(mask, np.float32, copy=True)
    if not on.any():
        return image, mask
    px, py, alpha = xs[on], ys[on], alpha_box[on]
    u = photo_to_model[0, 0] * px + photo_to_model[0, 1] * py + photo_to_model[0, 2]
    v = photo_to_model[1, 0] * px + photo_to_model[1, 1] * py + photo_to_model[1, 2]
    delta = np.stack(
        [
            ndimage.map_coordinates(correction[..., c].astype(np.float32), [v, u], order=1, mode="nearest")
            for c in range(3)
        ],
        -1,
    )
    value = image[py, px].astype(np.float32) + delta * alpha[:, None]
    image[py, px] = np.clip(np.round(value), 0, 255).astype(np.uint8)
    mask[py, px] = np.maximum(mask[py, px], alpha)
    return image, mask
