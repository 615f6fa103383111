"""rig edit: reconstruction, the edited buffers carry the request, controls, errors, paste-back, sweep."""

from __future__ import annotations

import math
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rigcli import RigError
from rigcli.cli import app
from rigcli.edit.controls import LIGHT_DIRECTIONS, Controls, apply_controls, direction_from_angles
from rigcli.edit.editor import UNSEEN_WARN, Editor, edit_photos, model_input, unseen_share
from rigcli.enroll import read_fit
from rigcli.estimate.landmarks import fit_landmarks, fit_light, project_landmarks, silhouette_candidates
from rigcli.image.metrics import psnr
from rigcli.image.photo import read_photo
from rigcli.render.buffers import dominant_direction, render_buffers, sh_shading
from rigcli.store import Store
from tests.conftest import run_rig

runner = CliRunner()


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory, trained_people):
    """The astronaut album (six copies), fitted, with a tiny model fine-tuned from scratch on it for 200
    steps (conftest's TRAINED_PEOPLE): the module's own copy."""
    return trained_people.home(tmp_path_factory.mktemp("edit"), "astro")


@pytest.fixture(scope="module")
def editor(trained_home):
    return Editor(Store(trained_home), "astro")


def rig(home, *args):
    return runner.invoke(app, ["--home", str(home), *args], env={"COLUMNS": "200"})


def as_model_range(result) -> torch.Tensor:
    return torch.from_numpy(result.output).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_no_controls_with_inversion_reproduces_the_input(editor, album):
    (inverted,) = edit_photos(editor, [album[0].path], Controls(), steps=20)
    (finer,) = edit_photos(editor, [album[0].path], Controls(), steps=50)
    (noise,) = edit_photos(editor, [album[0].path], Controls(), steps=20, invert=False)
    target = model_input(inverted.prepared.crop[None], editor.size)
    at20, at50 = (
        psnr(as_model_range(inverted), target, value_range=(-1, 1)),
        psnr(as_model_range(finer), target, value_range=(-1, 1)),
    )
    assert at20 > 20.0  # a tiny model after 200 CPU steps, the paper's 20 DDIM steps
    assert at50 > at20 + 3.0  # and the round trip tightens as steps grow
    assert at20 > psnr(as_model_range(noise), target, value_range=(-1, 1)) + 8.0  # inversion is what keeps the photo


def test_light_edit_is_in_the_edited_buffers(editor, album):
    result = edit_photos(editor, [album[1].path], Controls(), steps=2)[0]
    names = editor.face_model.expression_names
    for controls, want in ((Controls(light="left"), LIGHT_DIRECTIONS["left"]),
                           (Controls(light_dir=(30.0, 25.0)), direction_from_angles(30.0, 25.0))):  # fmt: skip
        edited = apply_controls(result.fit, controls, names, result.before.skin_normals)
        shaded = render_buffers(editor.face_model, edited, editor.crop_size)[:, :3].permute(0, 2, 3, 1)
        light, _ = fit_light(editor.face_model, edited, shaded)  # re-fit the edited shaded buffer
        got = dominant_direction(light.double())[0]
        want = torch.nn.functional.normalize(torch.tensor(want, dtype=torch.float64), dim=0)
        assert math.degrees(math.acos(float((got * want).sum().clamp(-1, 1)))) < 15.0
        # without explicit intensity the face keeps its brightness: mean shading over the skin stays 1
        mean = sh_shading(result.before.skin_normals[0][None], edited.light)[0].mean()
        assert abs(float(mean) - 1.0) < 0.02


def test_expression_and_pose_edits_are_in_the_geometry(editor, album):
    result = edit_photos(editor, [album[2].path], Controls(), steps=2)[0]
    names = editor.face_model.expression_names
    controls = Controls(expression={"smile": 0.8, "brow_raise": 0.5}, blend={"jawOpen": 0.3}, yaw=15.0)
    edited = apply_controls(result.fit, controls, names)
    for name, weight in (("mouthSmile_L", 0.8), ("mouthSmile_R", 0.8), ("browOuterUp_R", 0.5), ("jawOpen", 0.3)):
        assert edited.expression[0, names.index(name)].item() == pytest.approx(weight)
    assert math.degrees((edited.yaw - result.fit.yaw).item()) == pytest.approx(15.0)
    # re-fit the edited face from its own landmarks, identity held: the smile is found again
    lm = project_landmarks(editor.face_model, edited, silhouette_candidates(editor.face_model))
    again = fit_landmarks(editor.face_model, lm, identity=editor.identity)
    assert abs(again.expression[0, names.index("mouthSmile_L")].item() - 0.8) < 0.15
    assert abs(math.degrees(again.yaw.item()) - math.degrees(edited.yaw.item())) < 2.0


def test_copy_controls_from_another_photo(editor, album, monkeypatch):
    from rigcli.edit import editor as editor_module
    from rigcli.edit.editor import fit_reference

    fitted = []  # a reference named by several --*-from options is fitted once
    monkeypatch.setattr(editor_module, "fit_reference", lambda e, path: fitted.append(path) or fit_reference(e, path))
    reference = album[3].path  # a mirrored copy: its yaw has the other sign
    result = edit_photos(editor, [album[0].path], Controls(pose_from=reference, light_from=reference), steps=2)[0]
    assert fitted == [reference]

    ref = fit_reference(editor, reference)
    assert torch.allclose(result.edited_fit.yaw, ref.yaw) and torch.allclose(result.edited_fit.light, ref.light)
    copied = apply_controls(result.fit, Controls(expression_from=reference), editor.face_model.expression_names,
                            reference={reference: ref})  # fmt: skip
    assert torch.equal(copied.expression[0], ref.expression[0])
    assert torch.equal(copied.yaw, result.fit.yaw)  # only the expression was copied


def test_batch_with_bad_inputs_paste_back_and_sweep(trained_home, album, inputs, tmp_path):
    out_dir = tmp_path / "out"
    bad = [inputs / "bad_no_face.jpg", inputs / "bad_truncated.jpg"]
    result = rig(trained_home, "edit", "astro", str(album[0].path), *map(str, bad), str(album[4].path),
                 "--smile", "0.3", "--steps", "4", "--out-dir", str(out_dir), "--paste-back", "--sheet",
                 "--compose", "plain")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "--paste-back is no longer needed" in result.stderr  # the old name of the default, for one release
    assert result.stdout.count("edited") >= 2 and result.stdout.count("failed") == 2
    assert "no face" in result.stdout and "truncated" in result.stdout
    original = read_photo(album[0].path).pixels
    pasted = read_photo(out_dir / f"{album[0].path.stem}-edited.png").pixels
    assert pasted.shape == original.shape
    assert np.array_equal(pasted[:20, :20], original[:20, :20]) and np.array_equal(
        pasted[-20:, -20:], original[-20:, -20:]
    )
    assert (pasted != original).any()
    assert read_photo(out_dir / f"{album[0].path.stem}-edited-sheet.png").pixels.shape[1] == 6 * 68 + 4
    # outputs are not overwritten without --force
    again = rig(trained_home, "edit", "astro", str(album[0].path), "--out-dir", str(out_dir))
    assert again.exit_code == 2 and "--force" in again.stderr
    gif = tmp_path / "sweep.png"
    swept = rig(
        trained_home, "edit", "astro", str(album[0].path), "--sweep", "smile=0:1:5", "--steps", "3", "-o", str(gif)
    )
    assert swept.exit_code == 0, swept.output
    frames = iio.imread(gif.with_suffix(".gif"), index=None)
    assert frames.shape[0] == 5


@pytest.mark.parametrize(
    "args, words",
    [
        (["--light", "left", "--light-dir", "10,10"], "choose one of"),
        (["--light-dir", "ten"], "YAW,PITCH"),
        (["--smile", "1.5"], "between 0 and 1"),
        (["--strength", "2"], "--strength 2.0: give a value between 0 and 1"),
        (["--blend", "nope=1"], "unknown blendshape 'nope'"),
        (["--blend", "jawOpen"], "NAME=WEIGHT"),
        (["--yaw", "120"], "within +-60"),
        (["--sweep", "wink=0:1:3"], "unknown control 'wink'"),
        (["--expression-from", "{photo}", "--smile", "0.5"], "copies a whole expression"),
        (["--light-from", "{photo}", "--ambient", "0.5"], "not --light-from"),
    ],
)
def test_bad_controls_are_one_line_errors(trained_home, album, tmp_path, args, words):
    args = [a.format(photo=album[1].path) for a in args]
    result = rig(trained_home, "edit", "astro", str(album[0].path), "--out-dir", str(tmp_path), *args)
    assert result.exit_code == 2 and words in result.stderr and "Traceback" not in result.output


def test_person_without_a_model_and_other_errors(trained_home, album, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(trained_home, home, ignore=shutil.ignore_patterns("model"))
    result = rig(home, "edit", "astro", str(album[0].path), "--out-dir", str(tmp_path))
    assert result.exit_code == 2 and "rig finetune astro" in result.stderr
    two = rig(trained_home, "edit", "astro", str(album[0].path), str(album[1].path), "-o", str(tmp_path / "x.png"))
    assert two.exit_code == 2 and "--out-dir" in two.stderr
    with pytest.raises(RigError, match="no person"):
        Editor(Store(trained_home), "nobody")


def test_demo_quick_runs_end_to_end_offline_with_the_embedded_face_model(tmp_path):
    """`rig demo --quick` on a fresh store with no face model imported and no network: every proxy
    points at a closed local port, so a download attempt would fail the run."""
    out = tmp_path / "demo"
    closed = "http://127.0.0.1:9"
    offline = {"http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed, "HTTPS_PROXY": closed}
    result = run_rig("demo", "--quick", "--out", str(out), home=out / "home", env=offline, timeout=900)
    assert result.returncode == 0, result.stderr
    for name in ("aligned.png", "fit.png", "edits/light-left.png", "edits/light-right.png", "edits/smile.png",
                 "edits/yaw.png", "edits/sheet.png"):  # fmt: skip
        assert read_photo(out / name).pixels.size > 0, name
    assert "not the paper's quality" in result.stdout
    assert "device: cpu" in result.stderr
    assert not (out / "home" / "assets" / "ict").exists()  # nothing was imported or downloaded
    assert read_fit(Store(out / "home"), "astronaut")["model_id"].startswith("ict-embedded-")
    # one row per edit: input | physical edit | output | displacement | shading ratio, 256 px tiles
    assert read_photo(out / "edits" / "sheet.png").pixels.shape == (4 * 260 + 4, 5 * 260 + 4, 3)
    edited, photo = read_photo(out / "edits" / "smile.png").pixels, read_photo(out / "album" / "astronaut_00.png")
    assert edited.shape == photo.pixels.shape and (edited != photo.pixels).any()  # the whole photo, edited


def test_export_onnx_and_edit_with_the_onnx_engine(trained_home, album, tmp_path):
    exported = rig(trained_home, "export-onnx", "astro")
    assert exported.exit_code == 0, exported.output
    assert list((trained_home / "people" / "astro" / "engines").glob("*/model.onnx"))
    outputs = {}
    for engine in ("torch", "onnx"):
        target = tmp_path / f"{engine}.png"
        result = rig(trained_home, "edit", "astro", str(album[0].path), "--light", "left", "--steps", "10",
                     "--engine", engine, "-o", str(target))  # fmt: skip
        assert result.exit_code == 0, result.output
        outputs[engine] = torch.from_numpy(read_photo(target).pixels).float() / 127.5 - 1
    assert psnr(outputs["onnx"], outputs["torch"], value_range=(-1, 1)) > 35.0
    bad = rig(trained_home, "edit", "astro", str(album[0].path), "--engine", "tpu", "-o", str(tmp_path / "x.png"))
    assert bad.exit_code == 2 and "unknown engine 'tpu'" in bad.stderr


def test_strength_zero_is_the_physical_edit_and_one_is_the_paper_edit(editor, trained_home, album, tmp_path):
    from rigcli.edit.outputs import edit_to_files
    from rigcli.render.compose import physical_edit

    target = tmp_path / "s0.png"
    (item,) = edit_to_files(Store(trained_home), "astro", [album[1].path], Controls(light="left"), output=target,
                            strength=0.0, steps=3)  # fmt: skip
    result, prepared = item.result, item.result.prepared
    physical = physical_edit(prepared.pixels, prepared.crop_to_photo, editor.crop_size, editor.face_model,
                             result.fit, result.edited_fit)  # fmt: skip
    written = read_photo(target).pixels
    assert written.shape == prepared.pixels.shape
    assert np.array_equal(written, physical.image) and (written != prepared.pixels).any()
    assert result.reconstruction_psnr is None  # no model call at strength 0
    # strength 1: the model's edited branch is today's paper edit (the same steps; batched with the
    # reconstruction branch, so float sums may differ in the last bits)
    (paper,) = edit_photos(editor, [album[1].path], Controls(light="left"), steps=3)
    (one,) = edit_photos(editor, [album[1].path], Controls(light="left"), steps=3, strength=1.0)
    gap = np.abs(one.output.astype(int) - paper.output).max()
    print(f"strength 1 against the paper's edit: max {gap} levels")
    assert gap <= 2
    assert one.photo_output.shape == prepared.pixels.shape and one.reconstruction_psnr is not None


def test_refined_edit_keeps_the_photo_outside_its_mask_and_a_no_op_returns_the_photo(editor, album):
    (relit,) = edit_photos(editor, [album[0].path], Controls(light="right"), steps=4, strength=0.5)
    photo = relit.prepared.pixels
    outside = relit.photo_mask == 0
    assert outside.any() and (relit.photo_mask > 0).any()
    assert np.array_equal(relit.photo_output[outside], photo[outside])
    assert np.abs(relit.photo_output.astype(int) - photo).max() > 10
    print(f"reconstruction at the model's size: {relit.reconstruction_psnr:.1f} dB")
    (same,) = edit_photos(editor, [album[0].path], Controls(), steps=4, strength=0.5)
    diff = np.abs(same.photo_output.astype(int) - photo)
    print(f"no-op edit: max difference {diff.max()} levels over {int((same.photo_mask > 0).sum())} px of mask")
    assert diff.max() <= 1


def test_a_black_and_white_photo_stays_black_and_white(editor, album, tmp_path):
    """A grey photo (three equal channels, a one-channel file) edited by the model alone (strength 1,
    whose correction is not faded where the model knows the photo badly): its colour, kept at a
    coarse scale, is a tint the photo never had, which a retoucher would have to take out. The
    output is grey at both sizes (5 levels apart before, 246 in the model's crop), it is edited, and
    the photo outside the edit's mask is its own bit for bit."""
    pixels = read_photo(album[0].path).pixels.astype(np.float32)
    grey = np.repeat(np.round(pixels @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)[..., None], 3, -1)
    path = tmp_path / "grey.png"
    iio.imwrite(path, grey[..., 0])  # a one-channel file, as black-and-white scans are
    (result,) = edit_photos(editor, [path], Controls(expression={"smile": 0.8, "jaw_open": 0.4}), steps=4, strength=1.0)
    out = result.photo_output.astype(int)
    tint = max(np.abs(out[..., 0] - out[..., 1]).max(), np.abs(out[..., 1] - out[..., 2]).max())
    crop_tint = np.abs(result.output.astype(int) - result.output[..., :1].astype(int)).max()
    changed = np.abs(out - grey).max(-1) > 0
    print(f"channels apart by at most {tint} levels ({crop_tint} in the crop); {int(changed.sum())} px edited")
    assert tint == 0 and crop_tint == 0
    assert changed.sum() > 500
    assert np.array_equal(out[result.photo_mask == 0], grey[result.photo_mask == 0])


def test_default_output_is_the_whole_photo_and_crop_the_aligned_crop(trained_home, album, tmp_path):
    whole, crop = tmp_path / "whole.png", tmp_path / "crop.png"
    result = rig(trained_home, "edit", "astro", str(album[2].path), "--smile", "0.5", "--steps", "2", "-o", str(whole))
    assert result.exit_code == 0, result.output
    assert read_photo(whole).pixels.shape == read_photo(album[2].path).pixels.shape
    assert "identity" in result.stdout
    cropped = rig(trained_home, "edit", "astro", str(album[2].path), "--smile", "0.5", "--steps", "2", "--crop",
                  "--crop-size", "96", "-o", str(crop), "--sheet", "--sweep", "smile=0:1:3")  # fmt: skip
    assert cropped.exit_code == 0, cropped.output
    assert read_photo(crop).pixels.shape == (96, 96, 3)
    sheet = read_photo(tmp_path / "crop-sheet.png").pixels  # five 256 px tiles, 4 px apart
    assert sheet.shape == (256 + 8, 5 * 256 + 6 * 4, 3)
    tiles = [sheet[4:260, 4 + k * 260 : 260 + k * 260].astype(int) for k in range(5)]
    assert np.abs(tiles[2] - tiles[0]).max() > 10  # the output is edited
    assert tiles[3].max() > 0  # a smile moves the mouth: the displacement tile is not all black
    frames = iio.imread(tmp_path / "crop.gif", index=None)
    assert frames.shape[:3] == (3, 96, 96)  # the --crop picture, one frame per value
    assert np.abs(frames[2].astype(int) - frames[0]).max() > 10


def test_inputs_with_one_name_in_two_folders_get_distinct_outputs(tmp_path):
    from rigcli.edit.outputs import plan_outputs

    a, b = tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.png"
    for p in (a, b, tmp_path / "x-2.jpg"):
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"")
    targets = plan_outputs([a, b, tmp_path / "x-2.jpg"], None, tmp_path / "out", False, False, False)
    assert [t.name for t in targets.values()] == ["x-edited.png", "x-2-edited.png", "x-2-2-edited.png"]
    assert len(set(targets.values())) == 3


def test_an_edit_rasterises_each_fit_once_per_size(editor, album, monkeypatch):
    """One batch renders its fit and its edited fit once per size they are needed at (the crop: masks
    and skin normals; the model: buffers; the physical edit's working size), whatever asks for them:
    before the edit was a pipeline over one rendered value, a default edit rasterised 10 times."""
    import collections

    from rigcli.render import buffers

    sizes, shadow_maps = collections.Counter(), collections.Counter()
    real = buffers.rasterize

    def counted(screen, triangles, height, width, cull_back=True):
        (sizes if cull_back else shadow_maps)[height] += 1  # a shadow map sees the mesh from the light
        return real(screen, triangles, height, width, cull_back=cull_back)

    monkeypatch.setattr(buffers, "rasterize", counted)
    photo = editor.prepare(album[1].path)
    editor.fit([photo])
    fitting = sum(sizes.values())  # the estimator's own (the light fit), not the edit's
    for strength, model_renders in ((0.3, 2), (0.0, 0)):
        sizes.clear()
        shadow_maps.clear()
        (result,) = edit_photos(editor, [album[1].path], Controls(light="left", expression={"smile": 0.5}), steps=4,
                                strength=strength)  # fmt: skip
        assert result.photo_output is not None
        # θ0 and θ1 once at the crop's size (masks, skin normals) and once at the physical edit's working
        # size; the buffers at the model's size only when the model runs
        assert sizes[editor.size] == model_renders, dict(sizes)
        assert sum(sizes.values()) == fitting + 2 + 2 + model_renders, dict(sizes)
        assert sum(shadow_maps.values()) == 2, dict(shadow_maps)  # θ0's light and θ1's, once each


def test_a_turn_beyond_what_the_photo_shows_warns_and_a_small_one_does_not(editor, album):
    """A physical edit that must fill more than UNSEEN_WARN of the edited head (surface the photo never
    showed, painted flat) says so; a small turn is quiet. ``unseen_share`` weighs the fill by its alpha."""
    head = np.zeros((10, 10), bool)
    head[:, :5] = True
    fill = np.zeros((10, 10), np.float32)
    fill[:2, :5], fill[2:4, :5], fill[:, 5:] = 1.0, 0.5, 1.0  # outside the head: not counted
    assert unseen_share(fill, head) == pytest.approx(0.3) and unseen_share(fill, ~np.ones_like(head)) == 0.0
    small, large = (
        edit_photos(editor, [album[0].path], Controls(yaw=yaw), steps=2, strength=0.0)[0] for yaw in (5.0, -40.0)
    )
    print(f"yaw 5: {small.warning}; yaw -40: {large.warning}")
    assert small.warning is None
    share = float(large.warning.split("shows ")[1].split(" %")[0]) / 100
    assert share > UNSEEN_WARN and "never showed" in large.warning
    # the share against the physical edit's own fill, placed in the crop the other way (nearest pixels)
    crop_to_photo, fill = large.prepared.crop_to_photo, large.physical.fill
    v, u = np.mgrid[0 : editor.crop_size, 0 : editor.crop_size]
    x = np.round(crop_to_photo[0, 0] * u + crop_to_photo[0, 1] * v + crop_to_photo[0, 2]).astype(int)
    y = np.round(crop_to_photo[1, 0] * u + crop_to_photo[1, 1] * v + crop_to_photo[1, 2]).astype(int)
    inside = (x >= 0) & (x < fill.shape[1]) & (y >= 0) & (y < fill.shape[0])
    crop_fill = np.where(inside, fill[y.clip(0, fill.shape[0] - 1), x.clip(0, fill.shape[1] - 1)], 0)
    assert abs(unseen_share(crop_fill, large.after.faces[large.index]) - share) < 0.02


def test_the_demo_prints_what_rig_edit_would_warn_of(tmp_path, monkeypatch):
    """`rig demo` says of each edit what `rig edit` would warn of: with the fill warning's threshold at
    zero, the turn (which fills some surface its photo never showed) warns, the lights (which fill
    none) do not."""
    import rigcli.edit.editor as editor_module

    monkeypatch.setattr(editor_module, "UNSEEN_WARN", 0.0)
    out = tmp_path / "demo"
    result = rig(out / "home", "demo", "--quick", "--out", str(out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    warned = [line.split(":")[1].strip() for line in result.output.splitlines() if line.startswith("warning: ")]
    print(warned)
    assert "yaw" in warned and "light-left" not in warned and "light-right" not in warned
    assert "warning: yaw: the edit shows" in result.output
