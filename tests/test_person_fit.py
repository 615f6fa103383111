"""The 3D fit inside add-person, refit, people show --json / --sheet, and assets commands."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from rigcli.cli import app
from rigcli.enroll import FIT_FILE, add_photos, describe, read_fit, remove_photo
from rigcli.image.photo import read_photo
from rigcli.store import Store
from tests.conftest import ICT, home_with_model

runner = CliRunner()


def rig(home, *args):
    return runner.invoke(app, ["--home", str(home), *args], env={"COLUMNS": "200"})


def test_add_person_fits_and_show_reports_it(tmp_path, album, face_model):
    store = Store(home_with_model(tmp_path))
    report = add_photos(store, "astro", [p.path for p in album[:4]])
    assert report.fit_note.startswith("fitted ict to 4 photos")
    info = describe(store, "astro")
    assert info["face_fit"]["model_id"] == face_model.model_id and len(info["face_fit"]["identity"]) == 100
    poses = []
    for photo in info["photos"]:
        fit = photo["fit"]
        assert set(fit) >= {"pose_deg", "expression", "light_sh", "albedo", "landmark_error"}
        assert set(fit["pose_deg"]) == {"yaw", "pitch", "roll"}
        assert len(fit["expression"]) == 53 and all(0 <= w <= 1 for w in fit["expression"].values())
        assert np.asarray(fit["light_sh"]).shape == (9, 3) and len(fit["albedo"]) == 3
        assert fit["landmark_error"] < 0.05
        poses.append([fit["pose_deg"][k] for k in ("yaw", "pitch", "roll")])
        assert fit["expression"]["mouthSmile_L"] > 0.4  # the astronaut smiles broadly
    poses = np.array(poses)
    # mirrored copies flip yaw and roll; pitch agrees across every copy
    assert np.ptp(poses[:, 1]) < 3 and np.abs(poses[:, 0]).max() < 4
    # nothing new: the fit is not redone
    again = add_photos(store, "astro", [album[0].path])
    assert again.fit_note == "3D fit unchanged"


def test_without_a_face_model_photos_are_stored_and_the_note_says_how(tmp_path, album, without_embedded_face_model):
    store = Store(tmp_path / "home")
    report = add_photos(store, "astro", [album[0].path])
    assert "rig assets download-ict" in report.fit_note and "rig refit astro" in report.fit_note
    assert describe(store, "astro")["photos"][0]["fit"] is None
    result = rig(store.root, "refit", "astro")
    assert result.exit_code == 2 and "rig assets download-ict" in result.stderr


def test_cli_refit_sheet_and_remove(tmp_path, album):
    home = home_with_model(tmp_path)
    assert rig(home, "add-person", "astro", str(album[1].path), str(album[2].path)).exit_code == 0
    store = Store(home)
    fit_file = store.person_dir("astro") / FIT_FILE
    stale = {**read_fit(store, "astro"), "fitted": "2000-01-01T00:00:00Z"}  # so a refit that wrote nothing fails
    fit_file.write_text(json.dumps(stale))
    before = read_fit(store, "astro")["fitted"]
    result = rig(home, "refit", "astro")
    assert result.exit_code == 0 and "fitted ict to 2 photos" in result.stdout
    assert read_fit(store, "astro")["fitted"] > before
    sheet = tmp_path / "sheet.png"
    shown = rig(home, "people", "show", "astro", "--sheet", str(sheet))
    assert shown.exit_code == 0 and "yaw/pitch/roll" in shown.stdout
    image = read_photo(sheet).pixels
    assert image.shape == (2 * 260 + 4, 4 * 260 + 4, 3)  # 2 photos x (crop, shaded, normal, albedo)
    shaded_tile = image[4 : 4 + 256, 264 : 264 + 256]
    assert (shaded_tile.sum(axis=2) > 30).mean() > 0.2  # a face was rendered there
    pid = describe(store, "astro")["photos"][0]["id"]
    remove_photo(store, "astro", pid)
    assert pid not in read_fit(store, "astro")["photos"]


def test_cli_assets(tmp_path, ict_store, without_embedded_face_model):
    home = tmp_path / "home"
    missing = rig(home, "assets", "status")
    assert "face model (ICT FaceKit)" in missing.stdout and "download-ict" in missing.stdout
    imported = rig(home, "assets", "import-ict", str(ICT))
    assert imported.exit_code == 0, imported.output
    status = rig(home, "assets", "status")
    ict_row = next(line for line in status.stdout.splitlines() if "face model (ICT FaceKit)" in line)
    assert " ok " in ict_row and "missing" not in ict_row and "28552 triangles" in status.stdout
    bad = rig(home, "assets", "import-ict", str(tmp_path))
    assert bad.exit_code == 2 and "vertex_indices.json" in bad.stderr
    meta = json.loads((home / "assets" / "ict" / "model.json").read_text())
    assert meta["model_id"] == json.loads((ict_store.root / "assets" / "ict" / "model.json").read_text())["model_id"]
