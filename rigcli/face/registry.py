"""The face models by name: the one module that knows both ICT and FLAME."""

from __future__ import annotations

from rigcli import RigError
from rigcli.face.flame import (
    FlameFaceModel,
    FlameTexture,
    flame_model_id,
    flame_status,
    flame_texture_id,
    load_flame_assets,
)
from rigcli.face.ict import ICT_NAME, ict_available, load_ict
from rigcli.store import Store

FLAME_NAME = "flame"


FACE_MODELS = (ICT_NAME, FLAME_NAME)


def face_model_name(fit_doc: dict | None) -> str:
    """The face model a person's fit (``fit.json``) was made with; ICT before the name was recorded."""
    return (fit_doc or {}).get("face_model", ICT_NAME)


def available(store: Store, name: str = ICT_NAME) -> bool:
    """Whether ``load_face_model(store, name)`` has what it needs (without loading it)."""
    if name == FLAME_NAME:
        present = {s.role for s in flame_status(store) if s.present}
        return {"flame", "landmarks"} <= present
    return ict_available(store)


def load_face_model(store: Store, name: str = ICT_NAME):
    """The face model called ``name`` ('ict' or 'flame'), or a RigError that says how to install it."""
    if name == FLAME_NAME:
        return load_flame_face_model(store)
    if name != ICT_NAME:
        raise RigError(f"unknown face model {name!r}; choose one of: {', '.join(FACE_MODELS)}")
    return load_ict(store, name)


def load_flame_face_model(store: Store):
    """FLAME from the user's import (model and landmark embedding) behind the FaceModel interface,
    with DECA's texture space when it was imported with the template's UVs."""

    tensors = load_flame_assets(store, require=("flame", "landmarks"))
    model = FlameFaceModel.from_tensors(tensors, flame_model_id(store))
    model.texture = FlameTexture.from_tensors(tensors)
    model.texture_id = flame_texture_id(store) if model.texture is not None else None
    return model
