"""Fit the face model to photos, in the aligned crop's frame: pose, expression, identity, light, albedo.

Geometry comes from the 68 landmarks in one batched optimization over the album: per photo a head
rotation (yaw, pitch, roll), a weak-perspective scale and 2D translation (see ``render``) and the
expression weights in [0, 1]; per person one identity vector shared by all photos (the paper fits
one mean shape per person), or held fixed when fitting a new photo of a known person. The loss is
the landmark reprojection error over the inter-ocular distance, plus a Gaussian prior on identity
(ICT's components are PCA-scaled) and an L1 prior on expression, which prefers few blendshapes.
The 17 jaw landmarks are silhouette points: each has a strip of candidate vertices along an
outward ray on the mesh, and at every step the outermost projected candidate is the one that has
to meet the detected point ("landmark marching"). A model may instead place its landmarks and
price its expression itself (FLAME: barycentric landmarks with a yaw-dependent contour, unbounded
PCA coefficients under a Gaussian prior); see ``FaceModel``.

Light and albedo then come from the pixels: with the geometry fixed, the visible skin (face minus
eyes, brows and lips) gives per colour a least-squares fit on the 9 SH shading functions of the
rendered normals; a second pass drops the worst-fitting tenth (hair, specular spots, shadows).
The product albedo x light is split so that the shading averages 1 over the visible skin: albedo
is the skin's mean colour, one RGB per photo (never per-pixel colour, which would copy the photo
into the buffer), and the light carries the direction, contrast and any colour cast.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rigcli.face.model import FaceModel
from rigcli.face.params import FaceFit
from rigcli.render.buffers import SH_CONSTANTS, Geometry, rasterize_fit, sh_basis, skin_mask
from rigcli.render.raster import project

FITTER_VERSION = 1


JAW = list(range(17))


INNER = list(range(17, 68))


OUTER_EYE_CORNERS = (36, 45)


IDENTITY_PRIOR = 1e-5  # per photo, against a loss measured in (inter-ocular distances)^2


EXPRESSION_L1 = 2e-5


EXPRESSION_L2 = 1e-5


JAW_WEIGHT = 0.5


UNSEEN_BY_LANDMARKS = ("eyeLook",)


ACTIVE = 0.1  # shapes above this after the L1 stage are refitted without the L1 penalty


SYMMETRY = 5e-5  # faces mostly move both sides together: a soft pull of X_L toward X_R


def silhouette_candidates(model: FaceModel, band: float = 0.45) -> torch.Tensor:
    """(17, K) vertex ids per jaw landmark: face vertices near the ray from the face's centre through
    that landmark's vertex (neutral mesh, image plane), padded by repeating the landmark vertex."""
    neutral = model.neutral.double()
    face = model.regions["face"] & (neutral[:, 2] > neutral[model.landmark_vertices[JAW], 2].min() - 2.0)
    centre = neutral[model.landmark_vertices[27:36], :2].mean(0)
    rows = []
    for k in JAW:
        vid = int(model.landmark_vertices[k])
        ray = neutral[vid, :2] - centre
        radius = ray.norm()
        ray = ray / radius
        rel = neutral[:, :2] - centre
        along = rel @ ray
        across = (rel - along[:, None] * ray).norm(dim=1)
        chosen = face & (across < band) & (along > 0.8 * radius) & (along < 1.25 * radius)
        ids = torch.nonzero(chosen).flatten().tolist()
        rows.append([vid, *[i for i in ids if i != vid]])
    width = max(len(r) for r in rows)
    return torch.tensor([r + [r[0]] * (width - len(r)) for r in rows], dtype=torch.long)


def project_landmarks(
    model: FaceModel,
    fit: FaceFit,
    candidates: torch.Tensor,
) -> torch.Tensor:
    """The 68 landmarks a fit puts in the crop (B, 68, 2), jaw points on the silhouette.

    A model with ``landmark_points`` (FLAME: barycentric points, a yaw-dependent jaw contour)
    places them itself; ``candidates`` is then unused.
    """
    batch = len(fit)
    identity = fit.identity.expand(batch, -1)
    if hasattr(model, "landmark_points"):
        points = model.landmark_points(identity, fit.expression, fit.rotation)
        return project(points, fit.rotation, fit.scale, fit.translation)[0][..., :2]
    inner_ids = model.landmark_vertices[INNER]
    index = torch.cat([inner_ids, candidates.flatten(), model.landmark_vertices[27:36]])
    verts = model.vertices(identity, fit.expression, index)
    screen, _ = project(verts, fit.rotation, fit.scale, fit.translation)
    uv = screen[..., :2]
    n_inner, n_cand = len(INNER), candidates.numel()
    inner = uv[:, :n_inner]
    cand = uv[:, n_inner : n_inner + n_cand].reshape(batch, *candidates.shape, 2)
    centre = uv[:, n_inner + n_cand :].mean(1)  # nose, projected
    outward = cand[:, :, 0] - centre[:, None]  # direction through each jaw landmark's own vertex
    outward = outward / outward.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    reach = ((cand - centre[:, None, None]) * outward[:, :, None]).sum(-1)  # (B, 17, K)
    pick = reach.argmax(-1)  # the outermost candidate is on the silhouette
    jaw = torch.gather(cand, 2, pick[..., None, None].expand(-1, -1, 1, 2)).squeeze(2)
    return torch.cat([jaw, inner], 1)


def mirrored_pairs(names: list[str]) -> tuple[list[int], list[int]]:
    """Indices of (X_L, X_R) blendshape pairs."""
    left = [i for i, n in enumerate(names) if n.endswith("_L") and n[:-2] + "_R" in names]
    return left, [names.index(names[i][:-2] + "_R") for i in left]


def interocular(landmarks: torch.Tensor) -> torch.Tensor:
    a, b = OUTER_EYE_CORNERS
    return (landmarks[:, a] - landmarks[:, b]).norm(dim=-1)


def _initial_pose(model: FaceModel, landmarks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and translation that match the neutral face's inner landmarks to the detected ones."""
    lm3d = model.neutral[model.landmark_vertices[INNER]].to(landmarks)
    flat = torch.stack([lm3d[:, 0], -lm3d[:, 1]], 1)
    target = landmarks[:, INNER]
    spread_model = (flat - flat.mean(0)).norm(dim=1).mean()
    spread_image = (target - target.mean(1, keepdim=True)).norm(dim=2).mean(1)
    scale = spread_image / spread_model
    translation = target.mean(1) - scale[:, None] * flat.mean(0)
    return scale, translation


def fit_landmarks(
    model: FaceModel,
    landmarks: torch.Tensor,
    identity: torch.Tensor | None = None,
    steps: int = 300,
    progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
    shared_identity: bool = True,
) -> FaceFit:
    """Fit pose, camera, expression (and one shared identity, unless given) to (B, 68, 2) landmarks.

    ``shared_identity=False`` fits one identity per photo (photos of different people, as in stage 1);
    the fit's identity is then (B, I).
    """
    torch.manual_seed(seed)
    lm = landmarks.to(torch.float32)
    batch = lm.shape[0]
    candidates = None if hasattr(model, "landmark_points") else silhouette_candidates(model)
    scale0, trans0 = _initial_pose(model, lm)
    iod = interocular(lm).clamp_min(1.0)
    angles = torch.zeros(batch, 3, requires_grad=True)
    log_scale = scale0.log().clone().requires_grad_(True)
    shift = torch.zeros(batch, 2, requires_grad=True)  # translation offset in inter-ocular distances
    expression = torch.zeros(batch, len(model.expression_names), requires_grad=True)
    fixed_identity = identity is not None
    start = torch.zeros(model.identity_size if shared_identity else (batch, model.identity_size))
    ident = (identity.to(torch.float32).clone() if fixed_identity else start).requires_grad_(not fixed_identity)
    # gaze moves the iris, which none of the 68 landmarks sees: those shapes stay at zero here
    visible = torch.tensor([not name.startswith(UNSEEN_BY_LANDMARKS) for name in model.expression_names])
    weights = torch.ones(68)
    weights[JAW] = JAW_WEIGHT
    left, right = mirrored_pairs(model.expression_names)
    model_prior = getattr(model, "expression_prior", None)
    bounds = getattr(model, "expression_range", (0.0, 1.0))  # None: unbounded

    def current() -> FaceFit:
        return FaceFit(*angles.unbind(1), log_scale.exp(), trans0 + shift * iod[:, None], expression, ident)

    def loss_fn(rigid: bool) -> torch.Tensor:
        fit = current()
        if rigid:
            fit.expression = expression.detach() * 0
        pred = project_landmarks(model, fit, candidates)
        err = ((pred - lm) ** 2).sum(-1) / iod[:, None] ** 2  # (B, 68)
        loss = (err * weights).sum(1).mean() / weights.sum()
        if not rigid:
            if model_prior is not None:  # the model knows its coefficients' distribution (FLAME: Gaussian)
                loss = loss + model_prior(expression).mean()
            else:  # blendshape weights in [0, 1]: L1 prefers few shapes
                l1 = (expression * l1_weight).sum(1).mean()
                loss = loss + EXPRESSION_L1 * l1 + EXPRESSION_L2 * (expression**2).sum(1).mean()
            if len(left):
                loss = loss + SYMMETRY * ((expression[:, left] - expression[:, right]) ** 2).sum(1).mean()
            if not fixed_identity:
                loss = loss + IDENTITY_PRIOR * (ident**2).sum() / batch  # per photo, shared or not
        return loss

    l1_weight = torch.ones_like(expression)
    free = [angles, log_scale, shift, expression] + ([] if fixed_identity else [ident])
    stages = [  # rigid start; all parameters with L1 selecting shapes; "relaxed lasso" refit
        ([angles, log_scale, shift], steps // 3, 0.03, True),
        (free, steps, 0.02, False),
        (free, steps // 2, 0.01, False),
    ]
    done, total = 0, sum(s[1] for s in stages)
    for stage, (params, count, lr, rigid) in enumerate(stages):
        if stage == 2:  # lift the L1 penalty from the shapes it selected, which removes its shrinkage
            l1_weight = (expression.detach() <= ACTIVE).to(l1_weight)
        optimizer = torch.optim.Adam(params, lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, count, eta_min=lr * 0.05)
        for _ in range(count):
            optimizer.zero_grad()
            loss_fn(rigid).backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                if bounds is not None:
                    expression.clamp_(*bounds)
                expression[:, ~visible] = 0.0
            done += 1
            if progress:
                progress(done, total)
    with torch.no_grad():
        fit = current()
        fit = FaceFit(*(t.detach().clone() for t in (fit.yaw, fit.pitch, fit.roll, fit.scale, fit.translation)),
                      expression.detach().clone(), ident.detach().clone())  # fmt: skip
        pred = project_landmarks(model, fit, candidates)
        fit.landmark_error = (pred - lm).norm(dim=-1).mean(1) / iod
    return fit


def fit_light(
    model: FaceModel, fit: FaceFit, images: torch.Tensor, geometry: Geometry | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SH light (B, 9, 3) and skin albedo (B, 3) from crops (B, H, W, 3) in [0, 1]."""
    batch, size = images.shape[0], images.shape[1]
    geometry = geometry or rasterize_fit(model, fit, size)
    skin_px = skin_mask(model, geometry)
    design_all = sh_basis(geometry.normals) * SH_CONSTANTS.to(torch.float32)
    lights, albedos = [], []
    for i in range(batch):  # one small least-squares problem per photo
        mask = skin_px[i]
        design = design_all[i][mask].double()
        target = images[i][mask].double()
        if design.shape[0] < 50:
            lights.append(torch.zeros(9, 3))
            albedos.append(target.mean(0) if len(target) else torch.full((3,), 0.5))
            continue
        keep = torch.ones(design.shape[0], dtype=torch.bool)
        for _ in range(2):  # fit, drop the worst-fitting tenth, fit again
            coef = _ridge(design[keep], target[keep])
            residual = (design @ coef - target).abs().sum(1)
            keep = residual <= torch.quantile(residual, 0.9)
        coef = _ridge(design[keep], target[keep])  # (9, 3): albedo x light
        # Split so the shading averages 1 over the visible skin: albedo is the skin's mean colour.
        # (Defining albedo by the constant term alone would be ill-posed: on mostly frontal normals
        # the constant and 3z^2 - 1 terms are nearly collinear.)
        albedo = (design @ coef).mean(0).clamp_min(1e-3)
        lights.append((coef / albedo).float())
        albedos.append(albedo.float())
    return torch.stack(lights), torch.stack(albedos)


def _ridge(design: torch.Tensor, target: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """Least squares with a little damping (a frontal face sees only half the sphere of normals)."""
    gram = design.T @ design
    gram = gram + damping * torch.trace(gram) / gram.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, design.T @ target)
