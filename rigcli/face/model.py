"""The face-model interface (what the fitter, renderer and editor ask of a model) and the linear
blendshape model that ICT FaceKit is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from rigcli.store import Store


def vertex_normals(vertices: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals, (B, V, 3), for triangles counter-clockwise from outside."""
    v0, v1, v2 = (vertices[:, triangles[:, k]] for k in range(3))
    face = torch.cross(v1 - v0, v2 - v0, dim=-1)
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals.index_add_(1, triangles[:, k], face)
    return normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class FaceModel(Protocol):
    """What the fitter, renderer and CLI need from a face model (ICT now, FLAME later).

    ``regions`` must hold at least ``face`` (all facial skin), ``narrow_face`` (the skin the light
    fit may use, before eyes, brows and lips are cut out) and ``eyeball_left`` / ``eyeball_right``.

    Optional members the fitter uses when a model has them (FLAME, in ``rigcli.face.flame``, does):
    ``landmark_points(identity, expression, rotation) -> (B, 68, 3)`` places the landmarks itself
    (instead of ``landmark_vertices`` plus silhouette marching); ``expression_prior(expression) ->
    (B,)`` replaces the L1 blendshape prior; ``expression_range`` (default (0, 1), None for
    unbounded) is where the fitter keeps the expression values.
    """

    name: str
    model_id: str  # content hash of the model's data: checkpoints record it
    expression_names: list[str]
    neutral: torch.Tensor  # (V, 3) the mean shape, neutral expression
    landmark_vertices: torch.Tensor  # (68,) long, iBUG order
    triangles: torch.Tensor  # (F, 3) long, counter-clockwise seen from outside
    regions: dict[str, torch.Tensor]  # name -> (V,) bool

    @property
    def identity_size(self) -> int: ...

    @property
    def vertex_count(self) -> int: ...

    def vertices(
        self, identity: torch.Tensor, expression: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, V, 3) vertices in model space (centimetres, y up, z toward the viewer); ``index``
        restricts the result to some vertices (cheap, for landmark fitting)."""
        ...

    def albedo(self, fit, fragments) -> torch.Tensor:
        """Per-pixel albedo (B, H, W, 3) of ``fit`` on rasterized ``fragments``, zero off the mesh:
        the renderer asks the model, so it never needs to know which kind of model it draws."""
        ...

    def control_names(self, store: Store) -> list[str]:
        """The blendshape names ``--blend`` and ``--sweep`` accept: the model's own
        ``expression_names``, then any that ``expression_directions`` adds."""
        ...

    def expression_directions(self, store: Store) -> dict[str, torch.Tensor] | None:
        """Per blendshape name the edit controls use (ICT's ARKit names) that is not one of the
        model's own, its direction in the model's expression space; None when the model's own
        blendshapes carry those names (ICT). The editor asks the model, so it never needs to know
        which kind of model it edits."""
        ...


@dataclass
class LinearFaceModel:
    """A blendshape model: neutral + identity basis @ identity + expression basis @ expression."""

    name: str
    model_id: str
    neutral: torch.Tensor  # (V, 3)
    identity_basis: torch.Tensor  # (I, V, 3)
    expression_basis: torch.Tensor  # (E, V, 3)
    expression_names: list[str]
    triangles: torch.Tensor
    landmark_vertices: torch.Tensor
    regions: dict[str, torch.Tensor]

    @property
    def identity_size(self) -> int:
        return int(self.identity_basis.shape[0])

    @property
    def vertex_count(self) -> int:
        return int(self.neutral.shape[0])

    def vertices(
        self, identity: torch.Tensor, expression: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        neutral, ident, expr = self.neutral, self.identity_basis, self.expression_basis
        if index is not None:
            neutral, ident, expr = neutral[index], ident[:, index], expr[:, index]
        identity = identity.to(neutral.dtype)
        expression = expression.to(neutral.dtype)
        out = neutral + torch.einsum("bi,ivc->bvc", identity, ident)
        return out + torch.einsum("be,evc->bvc", expression, expr)

    def albedo(self, fit, fragments) -> torch.Tensor:
        """The fit's skin colour everywhere but the eyeballs, interpolated over the triangles."""
        return fragments.interpolate(vertex_albedo(self, fit.albedo), self.triangles)

    def control_names(self, store: Store) -> list[str]:
        """Its own blendshapes' names: the controls' ARKit names are ICT's own."""
        return list(self.expression_names)

    def expression_directions(self, store: Store) -> None:
        """None: the controls set its blendshape weights by name."""
        return None

    def to(self, device: torch.device | str) -> LinearFaceModel:
        """The same model with its tensors on ``device``."""
        move = lambda t: t.to(device)  # noqa: E731
        return LinearFaceModel(
            self.name,
            self.model_id,
            move(self.neutral),
            move(self.identity_basis),
            move(self.expression_basis),
            list(self.expression_names),
            move(self.triangles),
            move(self.landmark_vertices),
            {k: move(v) for k, v in self.regions.items()},
        )


EYE_ALBEDO = (0.75, 0.72, 0.70)


def vertex_albedo(model: FaceModel, skin_rgb: torch.Tensor) -> torch.Tensor:
    """Per-vertex albedo (B, V, 3): the skin colour everywhere but the eyeballs."""
    batch = skin_rgb.shape[0]
    eyes = model.regions["eyeball_left"] | model.regions["eyeball_right"]
    albedo = skin_rgb[:, None, :].expand(batch, model.vertex_count, 3).clone()
    albedo[:, eyes] = torch.tensor(EYE_ALBEDO, dtype=albedo.dtype)
    return albedo
