"""Estimators: from aligned crops and their 68 landmarks to fitted face parameters.

Two ways to get a FaceFit, behind one interface so that add-person, edit and training never ask
which: the landmark fitter (``landmarks.py``: pose, camera, expression and identity from the
landmarks, then SH light and albedo from the skin pixels) and DECA's encoder (``deca.py``: FLAME's
parameters regressed from the pixels, as the paper's data step did). ``make_estimator`` is the one
dispatch; ``resolve_estimator`` picks the default for a face model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from rigcli import RigError
from rigcli.estimate.deca import DecaEncoder, estimate_with_deca
from rigcli.estimate.landmarks import fit_landmarks, fit_light
from rigcli.face.flame import flame_status, load_deca_encoder
from rigcli.face.params import FaceFit
from rigcli.face.registry import FACE_MODELS, available, load_face_model
from rigcli.store import Store

ESTIMATORS = ("landmarks", "deca")


class Estimator(Protocol):
    """Fits a face model to aligned crops (N, S, S, 3) uint8 with their landmarks (N, 68, 2)."""

    name: str

    def fit(
        self,
        model,
        crops: np.ndarray,
        landmarks: np.ndarray,
        *,
        identity: torch.Tensor | None = None,
        identity_rows: Sequence[int] | None = None,
        shared_identity: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> FaceFit:
        """The photos' FaceFit. ``identity`` holds a known person's identity fixed; otherwise one
        identity is shared by the photos (``shared_identity``), estimated from ``identity_rows`` only
        when given (a person's training photos, not their outliers), or one per photo."""
        ...


class LandmarkEstimator:
    """The landmark fitter, then SH light and skin albedo from the pixels under that geometry."""

    name = "landmarks"

    def fit(self, model, crops, landmarks, *, identity=None, identity_rows=None, shared_identity=True, progress=None):
        lm = torch.as_tensor(np.asarray(landmarks), dtype=torch.float32)
        count = lm.shape[0]
        rows = list(range(count)) if identity_rows is None or identity is not None else list(identity_rows)
        rows = rows or list(range(count))
        rest = [i for i in range(count) if i not in rows]
        fits = [fit_landmarks(model, lm[rows], identity=identity, progress=progress, shared_identity=shared_identity)]
        if rest:  # fitted with the identity the others share, as a new photo of a known person is
            fits.append(fit_landmarks(model, lm[rest], identity=fits[0].identity))
        order = rows + rest
        fit = FaceFit.cat(fits).select([order.index(i) for i in range(count)]) if rest else fits[0]
        fit.light, fit.albedo = fit_light(model, fit, torch.from_numpy(np.asarray(crops)).float() / 255.0)
        return fit


class DecaEstimator:
    """DECA's encoder (FLAME only): its weights are read from the store's import on first use."""

    name = "deca"

    def __init__(self, store: Store) -> None:
        self.store = store
        self._encoder: DecaEncoder | None = None

    def fit(self, model, crops, landmarks, *, identity=None, identity_rows=None, shared_identity=True, progress=None):
        if self._encoder is None:
            self._encoder = DecaEncoder.from_state_dict(load_deca_encoder(self.store)).eval()
        fit, _ = estimate_with_deca(
            self._encoder, model, np.asarray(crops), np.asarray(landmarks), shared_identity=shared_identity,
            progress=progress, identity_rows=identity_rows, identity=identity,
        )  # fmt: skip
        return fit


def make_estimator(store: Store, name: str) -> Estimator:
    """The estimator called ``name`` ('landmarks' or 'deca')."""
    if name == "deca":
        return DecaEstimator(store)
    if name == "landmarks":
        return LandmarkEstimator()
    raise RigError(f"unknown estimator {name!r}; choose one of: {', '.join(ESTIMATORS)}")


def deca_available(store: Store) -> bool:
    """Whether DECA's encoder weights are imported (``rig assets import-flame --deca``)."""

    return any(s.role == "deca" and s.present for s in flame_status(store))


def resolve_estimator(store: Store, face_model: str, estimator: str | None) -> str:
    """The estimator to use: DECA's encoder for FLAME when its weights are imported, else the landmark fitter."""
    if estimator is not None and estimator not in ESTIMATORS:
        raise RigError(f"unknown estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
    if estimator == "deca":
        if face_model != "flame":
            raise RigError("--estimator deca estimates FLAME parameters: use it with --face-model flame")
        if not deca_available(store):
            load_deca_encoder(store)  # raises the import hint
        return "deca"
    if estimator is None and face_model == "flame" and deca_available(store):
        return "deca"
    return "landmarks"


def check_fit_options(store: Store, face_model: str, estimator: str | None) -> None:
    """Refuse an unknown or missing face model or estimator before any work (RigError with the fix)."""

    if face_model not in FACE_MODELS:
        raise RigError(f"unknown face model {face_model!r}; choose one of: {', '.join(FACE_MODELS)}")
    if not available(store, face_model):
        load_face_model(store, face_model)  # raises the RigError that says how to import it
    resolve_estimator(store, face_model, estimator)
