"""FLAME as the second face model: choosing it, fitting with it, controls mapped from ICT, edit, finetune.

The real FLAME files are licensed and absent here, and the import checks FLAME 2020's sizes, so the
in-process tests put a FLAME-shaped model built from ICT-FaceKit (``tests.flame_like``) behind
``rigcli.face.registry.load_flame_face_model``; the subprocess tests see the real resolver, with no
FLAME imported, and check its errors.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from rigcli import RigError, enroll, estimate
from rigcli.diffusion.checkpoints import save_model
from rigcli.diffusion.registry import register_model
from rigcli.diffusion.unet import DiffusionRig, preset
from rigcli.edit.controls import EXPRESSION_CONTROLS, Controls, apply_controls
from rigcli.edit.editor import Editor, edit_photos
from rigcli.enroll import add_photos, describe, read_fit, refit
from rigcli.estimate.landmarks import fit_landmarks, project_landmarks
from rigcli.face import ict, registry
from rigcli.face.ict import load_ict
from rigcli.face.params import FaceFit
from rigcli.face.retarget import flame_control_directions, load_control_directions
from rigcli.store import Store
from rigcli.train import data as train_data
from rigcli.train.data import person_data
from rigcli.train.stages import finetune
from tests.conftest import NO_FACE_DATA, home_with_model, run_rig
from tests.flame_like import flame_like_model, tilt


@pytest.fixture(scope="module")
def flame(face_model):
    return flame_like_model(face_model)


@pytest.fixture(scope="module")
def with_flame(flame):
    """The FLAME-shaped model stands in for an imported FLAME while the module's tests run."""
    real = registry.available
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "load_flame_face_model", lambda store: flame)
        for module in (registry, enroll, estimate):  # each looks the name up in its own namespace
            mp.setattr(module, "available", lambda store, name="ict": name == "flame" or real(store, name))
        yield flame


@pytest.fixture(scope="module")
def flame_home(tmp_path_factory, album, with_flame):
    """The astronaut (3 photos) added with --face-model flame, and a tiny model fine-tuned on that fit."""
    home = home_with_model(tmp_path_factory.mktemp("flame"))
    store = Store(home)
    add_photos(store, "astro", [p.path for p in album[:3]], face_model="flame")
    finetune(store, "astro", from_scratch=True, preset_name="tiny", steps=2, batch=2, checkpoint_every=2)
    return home


def landmark_displacement(model, expression: torch.Tensor) -> torch.Tensor:
    """What an expression does to a FLAME model's 68 landmarks at rest, in outer-eye-corner distances."""
    identity, eye = torch.zeros(1, model.identity_size), torch.eye(3)[None]
    with torch.no_grad():
        rest = model.landmark_points(identity, torch.zeros(1, expression.shape[0]), eye)[0]
        moved = model.landmark_points(identity, expression[None], eye)[0]
    return (moved - rest) / (rest[45] - rest[36]).norm()


def ict_displacement(ict, names) -> torch.Tensor:
    """The same for ICT blendshapes at weight 1, posed through the model and turned into FLAME's frame."""
    weights = torch.zeros(1, len(ict.expression_names))
    for name in names:
        weights[0, ict.expression_names.index(name)] = 1.0
    zero = torch.zeros(1, ict.identity_size)
    lm = ict.landmark_vertices
    rest, moved = ict.vertices(zero, weights * 0, lm)[0], ict.vertices(zero, weights, lm)[0]
    return (moved - rest) @ tilt().T / (rest[45] - rest[36]).norm()


# ---------------------------------------------------------------- controls from ICT's blendshapes


def test_ict_blendshapes_map_onto_flame_by_their_landmark_motion(face_model, flame):
    names = ["mouthSmile_L", "mouthSmile_R", "jawOpen", "eyeBlink_L"]
    directions = flame_control_directions(face_model, flame, names)
    assert all(d.shape == (53,) for d in directions.values())
    for control, limit in (("smile", 0.1), ("jaw_open", 0.35)):
        parts = EXPRESSION_CONTROLS[control]
        target = ict_displacement(face_model, parts)
        got = landmark_displacement(flame, sum(directions[n] for n in parts))
        assert float((got - target).norm()) < limit * float(target.norm())
    # the jaw opens by turning FLAME's jaw joint (pitch, opening), not by imitating it with lips
    jaw_open = directions["jawOpen"]
    assert 0.1 < float(jaw_open[50]) < 0.6 and float(jaw_open[51:].abs().max()) < 0.02
    jaw_only, exp_only = jaw_open.clone(), jaw_open.clone()
    jaw_only[:50], exp_only[50:] = 0, 0
    assert landmark_displacement(flame, jaw_only).norm() > 1.5 * landmark_displacement(flame, exp_only).norm()
    # a smile or a blink does not move the jaw
    for name in ("mouthSmile_L", "eyeBlink_L"):
        assert not directions[name][50:].any()
    # left and right mirror each other: the same amount of motion
    left, right = (landmark_displacement(flame, directions[n]).norm() for n in ("mouthSmile_L", "mouthSmile_R"))
    assert abs(float(left - right)) < 0.02 * float(left)


def test_controls_set_the_amount_along_their_direction(flame):
    g = torch.Generator().manual_seed(3)
    directions = {n: torch.randn(53, generator=g) for n in ("mouthSmile_L", "mouthSmile_R", "jawOpen")}
    fit = FaceFit(
        yaw=torch.zeros(2), pitch=torch.zeros(2), roll=torch.zeros(2), scale=torch.ones(2),
        translation=torch.zeros(2, 2), expression=torch.randn(2, 53, generator=g), identity=torch.zeros(100),
        light=torch.zeros(2, 9, 3),
    )  # fmt: skip
    names = flame.expression_names
    edited = apply_controls(fit, Controls(expression={"smile": 0.7}), names, directions=directions)
    smile = directions["mouthSmile_L"] + directions["mouthSmile_R"]
    amount = edited.expression @ smile / (smile @ smile)
    torch.testing.assert_close(amount, torch.full((2,), 0.7))
    # only the smile's direction changed: what is orthogonal to it is the photo's
    change = edited.expression - fit.expression
    torch.testing.assert_close(change - (change @ smile)[:, None] * smile / (smile @ smile), torch.zeros(2, 53))
    # an ICT name in --blend goes through its direction; FLAME's own names are set directly
    edited = apply_controls(fit, Controls(blend={"jawOpen": 1.0, "exp03": 0.25}), names, directions=directions)
    assert torch.allclose(edited.expression[:, 3], torch.tensor(0.25))
    d = directions["jawOpen"].clone()
    d[3] = 0  # exp03 was set after the move along jawOpen
    assert torch.allclose((edited.expression - fit.expression)[:, torch.arange(53) != 3],
                          ((1.0 - fit.expression @ directions["jawOpen"] / (directions["jawOpen"] ** 2).sum())[:, None]
                           * directions["jawOpen"])[:, torch.arange(53) != 3], atol=1e-5)  # fmt: skip


def test_mapping_is_cached_per_model_pair_and_needs_ict(tmp_path, flame_home, flame, monkeypatch):
    monkeypatch.setattr(ict, "_embedded_file", lambda name: NO_FACE_DATA / name)  # as if rig shipped no ICT
    with pytest.raises(RigError, match=r"ICT-FaceKit.*download-ict"):
        load_control_directions(Store(tmp_path / "empty"), flame)
    monkeypatch.undo()  # the package's ICT FaceKit is back
    store = Store(flame_home)  # the edit below finds the directions cached
    first = load_control_directions(store, flame)
    files = sorted(p.name for p in (store.root / "assets" / "controls").iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    meta = json.loads((store.root / "assets" / "controls" / files[0]).read_text())
    assert meta["flame_model_id"] == flame.model_id and meta["ict_model_id"].startswith("ict-")
    assert meta["names"] == load_ict(store).expression_names
    second = load_control_directions(store, flame)
    assert second.keys() == first.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # a damaged cache is recomputed, not trusted
    blob = store.root / "assets" / "controls" / files[1]
    blob.write_bytes(blob.read_bytes()[:-8] + b"\0" * 8)
    third = load_control_directions(store, flame)
    assert all(torch.equal(first[k], third[k]) for k in first)


def test_face_models_answer_for_their_controls(tmp_path, flame_home, flame, face_model, monkeypatch):
    """ICT's own blendshapes carry the controls' names; FLAME adds ICT's, through their directions."""
    store = Store(flame_home)  # the directions are cached there
    assert face_model.control_names(store) == face_model.expression_names
    assert face_model.expression_directions(store) is None
    ict_names = load_ict(store).expression_names
    assert flame.control_names(store) == flame.expression_names + ict_names
    directions, cached = flame.expression_directions(store), load_control_directions(store, flame)
    assert directions.keys() == set(ict_names) == cached.keys()
    assert all(torch.equal(directions[k], cached[k]) for k in cached)
    monkeypatch.setattr(ict, "_embedded_file", lambda name: NO_FACE_DATA / name)  # as if rig shipped no ICT
    empty = Store(tmp_path / "empty")
    assert flame.control_names(empty) == flame.expression_names
    with pytest.raises(RigError, match=r"ICT-FaceKit.*download-ict"):
        flame.expression_directions(empty)


def test_flame_to_a_dtype_is_a_new_model(flame):
    model64 = flame.to(dtype=torch.float64)  # as the retargeting fits in
    assert model64.flame is not flame.flame and model64.model_id == flame.model_id
    assert model64.flame.v_template.dtype == torch.float64 and flame.flame.v_template.dtype == torch.float32
    assert model64.flame.faces.dtype == torch.int64 and torch.equal(model64.triangles, flame.triangles)
    identity, expression, eye = torch.zeros(1, 100), torch.zeros(1, 53), torch.eye(3)[None]
    torch.testing.assert_close(
        model64.landmark_points(identity.double(), expression.double(), eye.double()).float(),
        flame.landmark_points(identity, expression, eye),
    )


# ---------------------------------------------------------------- fitting with FLAME


def test_landmark_fitter_recovers_the_pose_of_a_flame_face(flame):
    g = torch.Generator().manual_seed(4)
    expression = torch.zeros(3, 53)
    expression[:, :50] = torch.randn(3, 50, generator=g) * 0.3
    expression[:, 50] = torch.tensor([0.0, 0.1, 0.2])
    truth = FaceFit(
        yaw=torch.tensor([0.35, -0.2, 0.05]), pitch=torch.tensor([-0.1, 0.15, 0.0]),
        roll=torch.tensor([0.05, -0.08, 0.1]), scale=torch.tensor([7.0, 8.0, 6.5]),
        translation=torch.tensor([[128.0, 140.0], [120.0, 132.0], [134.0, 128.0]]),
        expression=expression, identity=torch.randn(100, generator=g) * 0.5,
    )  # fmt: skip
    fit = fit_landmarks(flame, project_landmarks(flame, truth, None), steps=200)
    assert float(fit.landmark_error.max()) < 0.02
    for got, want in ((fit.yaw, truth.yaw), (fit.pitch, truth.pitch), (fit.roll, truth.roll)):
        assert float((got - want).abs().max()) < math.radians(2.0)
    assert float((fit.expression[:, 50] - truth.expression[:, 50]).abs().max()) < 0.05


def test_add_person_and_refit_record_the_face_model(flame_home, flame, face_model):
    store = Store(flame_home)
    doc = read_fit(store, "astro")
    assert doc["face_model"] == "flame" and doc["model_id"] == flame.model_id and doc["estimator"] == "landmarks"
    assert len(doc["identity"]) == 100 and len(doc["photos"]) == 3
    photo = next(iter(doc["photos"].values()))
    assert max(p["landmark_error"] for p in doc["photos"].values()) < 0.08
    assert "jawPitch" in json.dumps(photo)
    assert describe(store, "astro")["face_fit"]["face_model"] == "flame"
    # the fit sheet renders the FLAME fit: 3 rows of crop | shaded | normal | albedo, mesh outline drawn
    from rigcli.enroll import fit_sheet

    sheet = fit_sheet(store, "astro")
    assert sheet.shape[0] >= 3 * 256 and sheet.shape[1] >= 4 * 256
    assert (sheet == np.array([255, 64, 64], dtype=np.uint8)).all(-1).sum() > 100


def test_refit_switches_models_and_keeps_the_choice(tmp_path, album, with_flame, monkeypatch):
    monkeypatch.setattr(ict, "_embedded_file", lambda name: NO_FACE_DATA / name)  # as if rig shipped no ICT
    store = Store(tmp_path / "home")  # no ICT: the photos are stored unfitted
    add_photos(store, "bea", [album[4].path])
    assert read_fit(store, "bea") is None
    assert refit(store, "bea", face_model="flame")["face_model"] == "flame"
    add_photos(store, "bea", [album[5].path])  # the person's model is kept as photos are added
    doc = read_fit(store, "bea")
    assert doc["face_model"] == "flame" and doc["model_id"] == with_flame.model_id and len(doc["photos"]) == 2
    with pytest.raises(RigError, match="download-ict"):
        refit(store, "bea", face_model="ict")
    monkeypatch.undo()  # the package's ICT FaceKit is back
    assert refit(store, "bea", face_model="ict")["model_id"] == load_ict(store).model_id
    with pytest.raises(RigError, match="--face-model flame"):
        refit(store, "bea", estimator="deca")
    with pytest.raises(RigError, match="choose one of: ict, flame"):
        refit(store, "bea", face_model="flam")
    assert read_fit(store, "bea")["face_model"] == "ict"  # nothing changed by the refused refits


class FakeEncoder(torch.nn.Module):
    """Stands in for DECA's encoder: a known code per photo, told apart by the crop's mean colour."""

    def __init__(self, codes: torch.Tensor) -> None:
        super().__init__()
        self.codes = codes
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images)
        start = sum(len(s) for s in self.seen[:-1])
        return self.codes[start : start + len(images)]


def test_deca_estimator_is_the_default_when_its_weights_are_imported(tmp_path, album, with_flame, monkeypatch):
    from rigcli.estimate import deca

    store = Store(home_with_model(tmp_path))
    g = torch.Generator().manual_seed(9)
    codes = torch.zeros(2, deca.DECA_CODE_SIZE)
    codes[:, :100] = torch.randn(2, 100, generator=g) * 0.5  # shape
    codes[:, 156] = 0.0  # global pose at rest
    codes[:, 156 + 6] = 8.0  # orthographic scale
    codes[:, 156 + 9] = 1.5  # ambient light
    codes[:, 100:150] = torch.randn(2, 50, generator=g)  # texture
    encoder = FakeEncoder(codes)
    monkeypatch.setattr(estimate, "deca_available", lambda store: True)
    monkeypatch.setattr(estimate, "load_deca_encoder", lambda store: {})
    monkeypatch.setattr(deca.DecaEncoder, "from_state_dict", staticmethod(lambda state: encoder))
    add_photos(store, "cy", [p.path for p in album[:2]], face_model="flame")
    doc = read_fit(store, "cy")
    assert doc["face_model"] == "flame" and doc["estimator"] == "deca"
    assert sum(len(s) for s in encoder.seen) == 2 and encoder.seen[0].shape[1:] == (3, 224, 224)
    # the person's shape is DECA's mean over the album, as the paper fixed it
    np.testing.assert_allclose(doc["identity"], codes[:, :100].mean(0).numpy(), atol=1e-4)
    # each photo keeps its texture code, and the training data's cache follows the texture space
    texture = [doc["photos"][r.id]["texture_code"] for r in store.load("cy").photos]
    np.testing.assert_allclose(texture, codes[:, 100:150].numpy(), atol=1e-5)
    plain = person_data(store, "cy", 32)
    assert person_data(store, "cy", 32).data_hash == plain.data_hash
    monkeypatch.setattr(train_data, "flame_texture_id", lambda store: "texture-imported")
    assert person_data(store, "cy", 32).data_hash != plain.data_hash
    # at edit time a known person's shape is held instead
    held = torch.linspace(-1, 1, 100)
    crops = np.full((2, 256, 256, 3), 128, np.uint8)
    points = 80 + np.random.default_rng(2).random((2, 68, 2)) * 100
    fit, _ = deca.estimate_with_deca(FakeEncoder(codes), with_flame, crops, points, identity=held)
    torch.testing.assert_close(fit.identity, held)
    # rig eval re-fits outputs by the estimator the inputs were fitted with (here DECA's encoder)
    from rigcli.diffusion.checkpoints import PAPER_FACE_MODEL_ID
    from rigcli.evaluate.suite import refit_images
    from rigcli.image.detect import FaceBox

    save_model(tmp_path / "m", DiffusionRig(preset("tiny")), {"face_model_id": PAPER_FACE_MODEL_ID})
    editor = Editor(store, "cy", tmp_path / "m")
    editor.estimator._encoder = again_encoder = FakeEncoder(codes)
    again = refit_images(editor, list(crops), [FaceBox((60.0, 60.0, 200.0, 200.0), 0.0)] * 2)
    assert sum(len(s) for s in again_encoder.seen) == 2
    torch.testing.assert_close(again.fit.identity, torch.tensor(doc["identity"], dtype=torch.float32))
    with pytest.raises(RigError, match="unknown estimator"):
        refit(store, "cy", estimator="magic")
    assert refit(store, "cy", estimator="landmarks")["estimator"] == "landmarks"


# ---------------------------------------------------------------- finetune and edit on a FLAME fit


def test_finetune_refuses_a_base_of_the_other_face_model(flame_home, tmp_path, face_model, album):
    store = Store(flame_home)
    save_model(tmp_path / "ict", DiffusionRig(preset("tiny")), {"face_model_id": face_model.model_id})
    register_model(store, "ictbase", tmp_path / "ict")
    with pytest.raises(RigError, match=f"fitted with {read_fit(store, 'astro')['model_id']}"):
        finetune(store, "astro", base="ictbase", steps=2)
    # and an ICT person cannot start from a FLAME base
    info = json.loads((flame_home / "people" / "astro" / "model" / "model.json").read_text())
    assert info["face_model_id"] == read_fit(store, "astro")["model_id"]
    register_model(store, "flamebase", flame_home / "people" / "astro" / "model")
    add_photos(store, "dee", [album[6].path])
    assert read_fit(store, "dee")["face_model"] == "ict"
    with pytest.raises(RigError, match="face model flame-test"):
        finetune(store, "dee", base="flamebase", steps=2)


def test_editor_takes_the_papers_flame_model_and_refuses_an_ict_one(flame_home, tmp_path, face_model):
    """The paper's imported model saw FLAME buffers from DECA: any FLAME fit may use it, an ICT one not."""
    from rigcli.diffusion.checkpoints import PAPER_FACE_MODEL_ID

    store = Store(flame_home)
    save_model(tmp_path / "paper", DiffusionRig(preset("tiny")), {"face_model_id": PAPER_FACE_MODEL_ID})
    assert Editor(store, "astro", tmp_path / "paper").face_model.name == "flame"
    save_model(tmp_path / "ict", DiffusionRig(preset("tiny")), {"face_model_id": face_model.model_id})
    with pytest.raises(RigError, match="buffers would not match"):
        Editor(store, "astro", tmp_path / "ict")


def test_smile_on_a_flame_person_changes_the_mouth(flame_home, album):
    editor = Editor(Store(flame_home), "astro")
    assert editor.face_model.name == "flame"
    assert "mouthSmile_L" in editor.control_names and "jawPitch" in editor.control_names
    (result,) = edit_photos(editor, [album[5].path], Controls(expression={"smile": 1.0}), steps=2)
    assert result.error is None and result.output is not None
    change = (result.edited_buffers - result.original_buffers).abs().sum(0).numpy()  # (S, S)
    scale = editor.size / editor.crop_size
    points = result.prepared.crop_landmarks * scale
    mouth = points[48:68]
    (x0, y0), (x1, y1) = mouth.min(0) - 0.1 * editor.size, mouth.max(0) + 0.1 * editor.size
    ys, xs = np.mgrid[: editor.size, : editor.size]
    near_mouth = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    above_eyes = ys < points[17:27, 1].min() - 0.02 * editor.size
    below_eyes = ys > points[36:48, 1].max()
    assert change[near_mouth].sum() > 0.6 * change.sum() > 0  # the lips and the cheeks beside them
    assert change[below_eyes].sum() > 0.9 * change.sum()
    assert change[above_eyes].sum() < 0.01 * change.sum()
    directions = editor.directions_for(Controls(expression={"smile": 1.0}))
    smile = directions["mouthSmile_L"] + directions["mouthSmile_R"]
    assert abs(float(result.edited_fit.expression[0] @ smile / (smile @ smile)) - 1.0) < 1e-4


def test_eval_suite_runs_on_a_flame_person(flame_home, album):
    """The suite's expression edits go through the ICT-to-FLAME control mapping, not ICT's names."""
    from rigcli.evaluate.suite import ModelSpec, eval_photos, evaluate

    store = Store(flame_home)
    photos = eval_photos(store, "astro", photos=[album[5].path])
    (run,) = evaluate(store, "astro", photos, [ModelSpec(steps=2)]).runs
    kinds = {e.kind for e in run.edits}
    assert {"reconstruction", "expression", "light", "pose"} <= kinds
    smile = next(e for e in run.edits if e.kind == "expression")
    assert smile.metrics["blendshape_error"] is not None and np.isfinite(smile.metrics["blendshape_error"])


# ---------------------------------------------------------------- the CLI, with no FLAME imported


def test_cli_without_flame_says_how_to_import_it(tmp_path, album, without_embedded_face_model):
    from typer.testing import CliRunner

    from rigcli.cli import app

    home = tmp_path / "home"
    r = run_rig("add-person", "eve", str(album[0].path), "--face-model", "flame", home=home)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "import-flame" in r.stderr and "Using FLAME" in r.stderr
    assert not (home / "people" / "eve").exists()  # refused before any photo was stored
    add_photos(Store(home), "eve", [album[0].path])
    r = run_rig("refit", "eve", "--face-model", "flame", home=home)
    assert r.returncode == 2 and "import-flame" in r.stderr and "Traceback" not in r.stderr
    assert not (home / "people" / "eve" / "fit.json").exists()
    for command in ("refit", "add-person"):
        shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "--face-model" in shown and "--estimator" in shown


# ---------------------------------------------------------------- DECA's texture-space albedo


def linear_maps(size: int, coefficients: torch.Tensor) -> torch.Tensor:
    """(size, size, 3, K) maps, each channel a + b u + c v at the texel centres (rows top down: v = 1 at
    the top), from ``coefficients`` (K, 3, 3): per map and channel (a, b, c)."""
    centres = (torch.arange(size) + 0.5) / size
    u, v = centres[None, :].expand(size, -1), 1 - centres[:, None].expand(-1, size)
    ramps = torch.stack([torch.ones_like(u), u, v])  # (3, H, W)
    return torch.einsum("kcn,nhw->hwck", coefficients, ramps)


def test_a_deca_fit_renders_texture_space_albedo_through_its_uvs(flame):
    """A fit carrying a texture code renders albedo = mean + basis . code, read where the photo's pixel
    lies on the UV map. The UVs are made so that each vertex's UV is where the fit projects it (u = x /
    size, v = 1 - y / size), so a covered pixel (i, j) must read the maps at u = j / size, v = 1 - i / size,
    and maps linear in u and v give the albedo there by hand."""
    from rigcli.face.flame import FlameTexture
    from rigcli.render.buffers import rasterize_fit, render_buffers, sh_shading
    from rigcli.render.raster import project

    size, k = 64, 3
    fit = FaceFit(
        yaw=torch.zeros(2), pitch=torch.zeros(2), roll=torch.zeros(2), scale=torch.full((2,), 2.2),
        translation=torch.full((2, 2), 32.0), expression=torch.zeros(2, 53), identity=torch.zeros(100),
        light=torch.zeros(2, 9, 3), albedo=torch.tensor([[0.6, 0.5, 0.4], [0.3, 0.3, 0.3]]),
        landmark_error=torch.zeros(2),
    )  # fmt: skip
    fit.light[:, 0] = 0.8
    fit.light[:, 3] = 0.3  # some light from the front (z)
    verts = flame.vertices(fit.identity[None], fit.expression[:1])
    screen, _ = project(verts, fit.rotation[:1], fit.scale[:1], fit.translation[:1])
    uv = torch.stack([screen[0, :, 0] / size, 1 - screen[0, :, 1] / size], 1)
    g = torch.Generator().manual_seed(5)
    coefficients = torch.rand(k + 1, 3, 3, generator=g) * 0.4
    maps = linear_maps(32, coefficients)
    textured = copy.copy(flame)
    textured.texture = FlameTexture(maps[..., 0], maps[..., 1:], uv, flame.flame.faces, size=32)
    plain = render_buffers(flame, fit, size)

    # without a texture code (ICT, the landmark fitter): exactly as before, texture space or not
    torch.testing.assert_close(render_buffers(textured, fit, size), plain, rtol=0, atol=0)
    fit.texture = torch.tensor([[0.5, -0.25, 1.0], [-1.0, 0.75, 0.0]])
    # without a texture space (none imported): the code is kept but the skin colour is rendered
    torch.testing.assert_close(render_buffers(flame, fit, size), plain, rtol=0, atol=0)

    buffers = render_buffers(textured, fit, size)
    geometry = rasterize_fit(flame, fit, size)
    mask = geometry.fragments.mask
    shading = sh_shading(geometry.normals, fit.light).permute(0, 3, 1, 2)
    i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    u, v = j / size, 1 - i / size
    inside = mask[0] & (u > 0.05) & (u < 0.95) & (v > 0.05) & (v < 0.95)
    assert int(inside.sum()) > 500
    for b in range(2):
        weights = torch.cat([torch.ones(1), fit.texture[b]])
        abc = torch.einsum("k,kcn->cn", weights, coefficients)  # (3 channels, (a, b, c))
        expect = abc[:, 0, None, None] + abc[:, 1, None, None] * u + abc[:, 2, None, None] * v
        torch.testing.assert_close(buffers[b, 6:9][:, inside], expect[:, inside], atol=1e-4, rtol=0)
        # shaded = albedo x the SH shading of the camera-space normals, normals as the skin-colour render's
        torch.testing.assert_close(buffers[b, :3], buffers[b, 6:9] * shading[b], atol=1e-5, rtol=0)
        torch.testing.assert_close(buffers[b, 3:6], plain[b, 3:6], rtol=0, atol=0)
    assert float(buffers[:, 6:9].permute(1, 0, 2, 3)[:, ~mask].abs().max()) == 0.0
    # the photos differ only by their codes, and so do their albedos
    assert float((buffers[0, 6:9] - buffers[1, 6:9])[:, inside].abs().mean()) > 0.05
    # an edit keeps the photo's texture code
    edited = apply_controls(fit, Controls(yaw=10.0), flame.expression_names)
    torch.testing.assert_close(edited.texture, fit.texture)


def test_texture_code_round_trips_through_fit_json(flame):
    from rigcli.face.params import fit_from_json, photo_fit_json

    g = torch.Generator().manual_seed(6)
    fit = FaceFit(
        yaw=torch.tensor([0.1, -0.2]), pitch=torch.zeros(2), roll=torch.zeros(2), scale=torch.full((2,), 2.0),
        translation=torch.zeros(2, 2), expression=torch.zeros(2, 53), identity=torch.zeros(100),
        light=torch.zeros(2, 9, 3), albedo=torch.full((2, 3), 0.5), landmark_error=torch.zeros(2),
    )  # fmt: skip
    names = flame.expression_names
    docs = [json.loads(json.dumps(photo_fit_json(fit, i, names))) for i in range(2)]
    assert "texture_code" not in docs[0] and fit_from_json(docs, [0.0] * 100, names).texture is None
    fit.texture = torch.randn(2, 50, generator=g)
    docs = [json.loads(json.dumps(photo_fit_json(fit, i, names))) for i in range(2)]
    back = fit_from_json(docs, [0.0] * 100, names)
    torch.testing.assert_close(back.texture, fit.texture, atol=1e-5, rtol=0)
    torch.testing.assert_close(back.select([1]).texture, fit.texture[1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(FaceFit.cat([back, back]).texture, torch.cat([back.texture] * 2))
