"""The renderer against independent references: brute force, exact edge ties, spheres, SH integrals."""

from __future__ import annotations

import math

import numpy as np
import torch

from rigcli.face.model import vertex_normals
from rigcli.face.params import euler_to_matrix, matrix_to_euler
from rigcli.render.buffers import SH_CONSTANTS, dominant_direction, light_from_direction, sh_basis, sh_shading
from rigcli.render.raster import coverage, rasterize


def brute_force(screen: np.ndarray, triangles: np.ndarray, height: int, width: int):
    """Per pixel, per triangle: inside test and depth in float64, nearest wins (no culling)."""
    tri_out = np.full((height, width), -1)
    depth_out = np.full((height, width), -np.inf)
    for i in range(height):
        for j in range(width):
            for f, (a, b, c) in enumerate(triangles):
                (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = screen[a], screen[b], screen[c]
                area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
                if area == 0:
                    continue
                w0 = ((x2 - x1) * (i - y1) - (y2 - y1) * (j - x1)) / area
                w1 = ((x0 - x2) * (i - y2) - (y0 - y2) * (j - x2)) / area
                w2 = 1 - w0 - w1
                if min(w0, w1, w2) > 0:
                    z = w0 * z0 + w1 * z1 + w2 * z2
                    if z > depth_out[i, j]:
                        depth_out[i, j], tri_out[i, j] = z, f
    return tri_out


def test_rasterizer_matches_brute_force_on_random_meshes():
    rng = np.random.default_rng(0)
    for _ in range(3):
        screen = np.column_stack([rng.uniform(-4, 28, 30), rng.uniform(-4, 28, 30), rng.uniform(-5, 5, 30)])
        triangles = rng.integers(0, 30, (25, 3))
        triangles = triangles[(triangles[:, 0] != triangles[:, 1]) & (triangles[:, 1] != triangles[:, 2])]
        frags = rasterize(torch.tensor(screen)[None], torch.tensor(triangles), 24, 24, cull_back=False)
        expected = brute_force(screen, triangles, 24, 24)
        assert np.array_equal(frags.triangle[0].numpy(), expected)
        assert np.array_equal(frags.mask[0].numpy(), expected >= 0)


def grid_mesh(n: int, spacing: float, origin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat n x n grid of quads split into triangles, counter-clockwise seen from +z (y up)."""
    ys, xs = torch.meshgrid(torch.arange(n + 1.0), torch.arange(n + 1.0), indexing="ij")
    verts = torch.stack([origin + xs.flatten() * spacing, origin + ys.flatten() * spacing, torch.zeros(xs.numel())], 1)
    tris = []
    for r in range(n):
        for c in range(n):
            a, b, d, e = r * (n + 1) + c, r * (n + 1) + c + 1, (r + 1) * (n + 1) + c, (r + 1) * (n + 1) + c + 1
            tris += [(a, e, d), (a, b, e)] if (r + c) % 2 else [(a, b, d), (b, e, d)]
    return verts, torch.tensor(tris)


def test_shared_edges_cover_each_pixel_exactly_once():
    # vertices on pixel centres: many centres lie exactly on edges and vertices of the grid
    verts, tris = grid_mesh(8, 4.0, 2.0)
    screen = verts.clone()
    screen[:, 1] = 36 - verts[:, 1]  # y up -> v down (the grid spans u, v in [2, 34])
    cov = coverage(screen[None], tris, 40, 40)
    counts = torch.zeros(40, 40, dtype=torch.long)
    counts.index_put_((cov.y, cov.x), torch.ones_like(cov.x), accumulate=True)
    # strictly inside the grid's square (u, v in (2, 34)) every pixel is covered exactly once
    assert counts[3:34, 3:34].eq(1).all()
    assert counts.max() == 1


def icosphere(subdivisions: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = (1 + 5**0.5) / 2
    verts = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
             (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]  # fmt: skip
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2),
             (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5), (2, 4, 11),
             (6, 2, 10), (8, 6, 7), (9, 8, 1)]  # fmt: skip
    verts = [np.array(v, float) / np.linalg.norm(v) for v in verts]
    for _ in range(subdivisions):
        cache, new_faces = {}, []

        def mid(a, b, cache=cache):
            key = (min(a, b), max(a, b))
            if key not in cache:
                m = verts[a] + verts[b]
                verts.append(m / np.linalg.norm(m))
                cache[key] = len(verts) - 1
            return cache[key]

        for a, b, c in faces:
            ab, bc, ca = mid(a, b), mid(b, c), mid(c, a)
            new_faces += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new_faces
    return torch.tensor(np.array(verts)), torch.tensor(faces)


def sphere_screen(verts: torch.Tensor, radius: float, centre: float) -> torch.Tensor:
    return torch.stack([centre + radius * verts[:, 0], centre - radius * verts[:, 1], verts[:, 2]], 1)


def test_closed_sphere_has_no_cracks_or_double_coverage():
    verts, tris = icosphere(3)
    rot = euler_to_matrix(torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64),
                          torch.tensor(0.1, dtype=torch.float64))  # fmt: skip
    screen = sphere_screen(verts @ rot.T, 28.0, 32.0)
    cov = coverage(screen[None], tris, 64, 64)  # front faces only
    counts = torch.zeros(64, 64, dtype=torch.long)
    counts.index_put_((cov.y, cov.x), torch.ones_like(cov.x), accumulate=True)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    inner = ((xx - 32) ** 2 + (yy - 32) ** 2).sqrt() < 27.0  # well inside the polygonal outline
    assert counts[inner].eq(1).all()
    frags = rasterize(screen[None], tris, 64, 64)
    assert frags.mask[0][inner].all()


def test_sphere_normals_match_the_analytic_ones():
    verts, tris = icosphere(4)
    screen = sphere_screen(verts, 28.0, 32.0)
    frags = rasterize(screen[None], tris, 64, 64)
    normals = frags.interpolate(vertex_normals(verts[None], tris), tris)[0]
    normals = normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-9)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    nx, ny = (xx - 32) / 28, -(yy - 32) / 28
    inner = (nx**2 + ny**2) < 0.9**2
    analytic = torch.stack([nx, ny, (1 - nx**2 - ny**2).clamp_min(0).sqrt()], -1)
    error = (normals[inner] - analytic[inner].to(normals)).norm(dim=-1)
    assert error.max() < 0.02


def fibonacci_sphere(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    r = (1 - z * z).sqrt()
    return torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], 1)


def test_sh_shading_equals_numerically_integrated_irradiance():
    # radiance R(w) = sum_k R_k Ytilde_k(w) (orthonormal); irradiance E(n) = int R(w) max(0, n.w) dw.
    # DECA's shading with L_0 = pi R_0 and L_k = R_k (k >= 1) must reproduce it (order-2 radiance).
    torch.manual_seed(0)
    norms = torch.tensor([1 / math.sqrt(4 * math.pi)] + [math.sqrt(3 / (4 * math.pi))] * 3
                         + [3 * math.sqrt(5 / (12 * math.pi))] * 3 + [1.5 * math.sqrt(5 / (12 * math.pi)),
                         0.5 * math.sqrt(5 / (4 * math.pi))], dtype=torch.float64)  # fmt: skip
    radiance = torch.randn(9, 3, dtype=torch.float64)
    dirs = fibonacci_sphere(200_000)
    values = (sh_basis(dirs) * norms) @ radiance  # (N, 3)
    normals = torch.nn.functional.normalize(torch.randn(7, 3, dtype=torch.float64), dim=1)
    cosine = (normals @ dirs.T).clamp_min(0)  # (7, N)
    integral = cosine @ values * (4 * math.pi / dirs.shape[0])
    light = radiance.clone()
    light[0] *= math.pi
    shading = sh_shading(normals[None], light[None])[0]
    np.testing.assert_allclose(shading.numpy(), integral.numpy(), atol=2e-3)


def test_light_from_direction_against_numeric_projection():
    # project E(n) = ambient + I max(0, n.d) onto the 9 shading functions c_k Y_k by quadrature
    d = torch.tensor([-0.6, 0.3, 0.74], dtype=torch.float64)
    d = d / d.norm()
    dirs = fibonacci_sphere(200_000)
    target = 0.2 + 0.9 * (dirs @ d).clamp_min(0)
    design = sh_basis(dirs) * SH_CONSTANTS
    numeric = torch.linalg.lstsq(design, target[:, None]).solution[:, 0]
    helper = light_from_direction(d, 0.9, 0.2)
    np.testing.assert_allclose(helper[:, 0].numpy(), numeric.numpy(), atol=2e-3)
    assert torch.allclose(helper[:, 0], helper[:, 2])  # white light: same for every colour
    # the order-2 fit peaks toward the light, and its linear part points at it
    assert torch.allclose(dominant_direction(helper), d, atol=1e-9)
    shade = sh_shading(torch.stack([d, -d])[None].float(), helper[None].float())[0, :, 0]
    assert shade[0] > 1.0 > 0.2 > shade[1] - 0.1


def test_euler_angles_round_trip_and_signs():
    angles = torch.tensor([[0.4, -0.3, 0.2], [-0.6, 0.25, -0.5]], dtype=torch.float64)
    rot = euler_to_matrix(*angles.T)
    assert torch.allclose(matrix_to_euler(rot), angles)
    nose = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    yaw_right = euler_to_matrix(*torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64)) @ nose
    pitch_up = euler_to_matrix(*torch.tensor([0.0, 0.3, 0.0], dtype=torch.float64)) @ nose
    assert yaw_right[0] > 0 and pitch_up[1] > 0  # camera space: x right, y up
    x_axis = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    rolled = euler_to_matrix(*torch.tensor([0.0, 0.0, 0.3], dtype=torch.float64)) @ x_axis
    assert rolled[1] > 0  # counter-clockwise in the image: the right side goes up
