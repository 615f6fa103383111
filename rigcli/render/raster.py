"""Project and rasterize a mesh in torch (no pytorch3d): the camera and a z-buffer with barycentrics.

- Camera: weak perspective (DECA's orthographic camera): the head is rotated, then
  ``u = s * x + tx`` and ``v = -s * y + ty`` in crop pixels (pixel centres at integers, y down);
  depth is the rotated z (toward the viewer). Screen-space barycentrics are then exact.
- Rasterizer: a z-buffer in tensor ops. Every triangle is expanded into the pixels of its bounding
  box (``repeat_interleave``, no Python loop over triangles or pixels), tested with edge functions,
  and the nearest hit per pixel wins. A pixel centre exactly on an edge shared by two triangles is
  given to exactly one of them, so a closed mesh has no cracks and no double coverage.

Shading and the 9 buffer channels built on this are in ``rigcli.render.buffers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def project(vertices: torch.Tensor, rotation: torch.Tensor, scale: torch.Tensor, translation: torch.Tensor):
    """Weak-perspective camera: model vertices (B, V, 3) -> screen (B, V, 3) as (u, v, depth) and
    camera-space points (B, V, 3)."""
    cam = vertices @ rotation.transpose(-1, -2)
    u = scale[:, None] * cam[..., 0] + translation[:, None, 0]
    v = -scale[:, None] * cam[..., 1] + translation[:, None, 1]
    return torch.stack([u, v, cam[..., 2]], -1), cam


@dataclass
class Fragments:
    """Per pixel: the nearest triangle (-1 for none), its barycentric weights, and the coverage mask."""

    triangle: torch.Tensor  # (B, H, W) long
    bary: torch.Tensor  # (B, H, W, 3)
    mask: torch.Tensor  # (B, H, W) bool

    def interpolate(self, attributes: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
        """Per-vertex attributes (B, V, C) -> per-pixel (B, H, W, C), zero off the mesh."""
        batch = attributes.shape[0]
        tri = self.triangle.clamp_min(0)
        corner = triangles[tri]  # (B, H, W, 3) vertex ids
        b_idx = torch.arange(batch, device=tri.device).view(batch, 1, 1, 1)
        values = attributes[b_idx, corner]  # (B, H, W, 3, C)
        out = (self.bary.unsqueeze(-1).to(values) * values).sum(-2)
        return out * self.mask.unsqueeze(-1)


@dataclass
class Coverage:
    """Every (image, triangle, pixel) a triangle covers, before the depth test, with barycentrics."""

    image: torch.Tensor
    triangle: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    bary: torch.Tensor


def coverage(
    screen: torch.Tensor, triangles: torch.Tensor, height: int, width: int, cull_back: bool = True
) -> Coverage:
    """All pixel centres inside each triangle (see rasterize for the conventions)."""
    device = screen.device
    batch, faces = screen.shape[0], triangles.shape[0]
    xy = screen[..., :2].to(torch.float32)
    corners = [xy[:, triangles[:, k]] for k in range(3)]  # (B, F, 2) each
    (x0, y0), (x1, y1), (x2, y2) = ((c[..., 0], c[..., 1]) for c in corners)
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)  # > 0: clockwise on a y-down screen
    keep = area != 0
    if cull_back:
        keep &= area < 0  # counter-clockwise from outside turns clockwise-negative with y down
    all_x = torch.stack([x0, x1, x2], -1)
    all_y = torch.stack([y0, y1, y2], -1)
    xmin = all_x.amin(-1).ceil().clamp(0, width - 1)
    xmax = all_x.amax(-1).floor().clamp(-1, width - 1)
    ymin = all_y.amin(-1).ceil().clamp(0, height - 1)
    ymax = all_y.amax(-1).floor().clamp(-1, height - 1)
    span_x = (xmax - xmin + 1).clamp_min(0).long()
    span_y = (ymax - ymin + 1).clamp_min(0).long()
    counts = torch.where(keep, span_x * span_y, torch.zeros_like(span_x)).reshape(-1)
    total = int(counts.sum())
    tri_flat = torch.repeat_interleave(torch.arange(batch * faces, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(total, device=device) - starts[tri_flat]
    wide = span_x.reshape(-1)[tri_flat]
    px = xmin.reshape(-1)[tri_flat] + (local % wide)
    py = ymin.reshape(-1)[tri_flat] + torch.div(local, wide, rounding_mode="floor")
    b = torch.div(tri_flat, faces, rounding_mode="floor")
    f = tri_flat % faces

    # Edge functions are computed from each edge's lower-numbered vertex, so the two triangles
    # sharing an edge get bitwise-opposite values. A centre exactly on an edge (or vertex) belongs
    # to the triangle that holds the point nudged infinitesimally right (then down, to break a tie):
    # the top-left rule, which gives every shared edge and vertex to exactly one triangle.
    tri = triangles[f]  # (P, 3)
    weights, inside = [], torch.ones(total, dtype=torch.bool, device=device)
    sign_area = torch.sign(area.reshape(-1)[tri_flat])
    for k in range(3):
        a_id, b_id = tri[:, (k + 1) % 3], tri[:, (k + 2) % 3]
        forward = a_id < b_id
        lo = torch.where(forward, a_id, b_id)
        hi = torch.where(forward, b_id, a_id)
        pa, pb = xy[b, lo], xy[b, hi]
        e_can = (pb[:, 0] - pa[:, 0]) * (py - pa[:, 1]) - (pb[:, 1] - pa[:, 1]) * (px - pa[:, 0])
        orient = torch.where(forward, 1.0, -1.0) * sign_area
        w = orient * e_can  # > 0 inside, for either winding
        grad_x = -(pb[:, 1] - pa[:, 1]) * orient  # how w changes as the point moves right...
        grad_y = (pb[:, 0] - pa[:, 0]) * orient  # ...and down
        owns = (grad_x > 0) | ((grad_x == 0) & (grad_y > 0))
        inside &= (w > 0) | ((w == 0) & owns)
        weights.append(w)
    w = torch.stack(weights, -1)[inside]
    return Coverage(b[inside], f[inside], px[inside].long(), py[inside].long(), w / w.sum(-1, keepdim=True))


def rasterize(
    screen: torch.Tensor, triangles: torch.Tensor, height: int, width: int, cull_back: bool = True
) -> Fragments:
    """Z-buffer rasterization of screen-space triangles.

    ``screen`` (B, V, 3) holds (u, v, depth) with larger depth nearer the viewer; pixel (i, j) has
    its centre at (u=j, v=i). Back faces (clockwise on screen for meshes counter-clockwise from
    outside, since v points down) are skipped when ``cull_back``.
    """
    device, batch = screen.device, screen.shape[0]
    cov = coverage(screen, triangles, height, width, cull_back)
    b, f, px, py, bary = cov.image, cov.triangle, cov.x, cov.y, cov.bary
    depth_corners = screen[..., 2][b[:, None], triangles[f]]  # (P, 3)
    depth = (bary.to(depth_corners) * depth_corners).sum(-1)

    pixel = (b * height + py) * width + px
    n_pix = batch * height * width
    zbuf = torch.full((n_pix,), -torch.inf, dtype=depth.dtype, device=device)
    zbuf.scatter_reduce_(0, pixel, depth, reduce="amax")
    front = depth == zbuf[pixel]
    order = torch.arange(pixel.shape[0], device=device)
    winner = torch.full((n_pix,), pixel.shape[0], dtype=torch.long, device=device)
    winner.scatter_reduce_(0, pixel[front], order[front], reduce="amin")
    hit = winner < pixel.shape[0]
    triangle = torch.full((n_pix,), -1, dtype=torch.long, device=device)
    out_bary = torch.zeros((n_pix, 3), dtype=bary.dtype, device=device)
    triangle[hit] = f[winner[hit]]
    out_bary[hit] = bary[winner[hit]]
    return Fragments(
        triangle.view(batch, height, width),
        out_bary.view(batch, height, width, 3),
        hit.view(batch, height, width),
    )
