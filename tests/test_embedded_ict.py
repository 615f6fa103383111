"""The compact ICT FaceKit copy shipped in the package: made by tools/embed_ict.py, and as good as an import."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rigcli import RigError
from rigcli.estimate.landmarks import fit_landmarks, fit_light
from rigcli.face.ict import (
    EMBEDDED_LICENCE,
    EMBEDDED_META,
    EMBEDDED_TENSORS,
    embedded_available,
    installed,
    load_embedded_ict,
    load_ict,
)
from rigcli.image.align import align_face, apply_affine, invert_affine
from rigcli.image.photo import read_photo
from rigcli.render.buffers import render_buffers
from rigcli.store import Store
from tests.conftest import ICT, REPO

DATA = REPO / "rigcli" / "face" / "data"
FILES = (EMBEDDED_TENSORS, EMBEDDED_META, EMBEDDED_LICENCE)
BUDGET = 15_000_000  # bytes the embedded model may add to the wheel
CROP = 256


@pytest.fixture(scope="module")
def embedded():
    assert embedded_available(), f"the package data is missing from {DATA}: run tools/embed_ict.py"
    return load_embedded_ict()


def test_tool_makes_the_shipped_bytes(tmp_path):
    out = tmp_path / "data"
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "embed_ict.py"), str(ICT), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    print(done.stdout)
    for name in FILES:
        assert (out / name).read_bytes() == (DATA / name).read_bytes(), f"{name} differs from the shipped one"
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def test_tensors_are_bit_identical_to_an_import(embedded, imported_face_model):
    """Lossless on purpose: the landmark fitter turns even 1e-7 cm of noise into ~0.1 degree of pose."""
    assert embedded.name == imported_face_model.name == "ict"
    assert embedded.model_id.startswith("ict-embedded-") and embedded.model_id != imported_face_model.model_id
    assert embedded.expression_names == imported_face_model.expression_names
    for key in ("neutral", "identity_basis", "expression_basis", "triangles", "landmark_vertices"):
        mine, theirs = getattr(embedded, key), getattr(imported_face_model, key)
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, key
        assert torch.equal(bits(mine), bits(theirs)), key
    assert embedded.regions.keys() == imported_face_model.regions.keys()
    for key, mask in imported_face_model.regions.items():
        assert embedded.regions[key].dtype == torch.bool and torch.equal(embedded.regions[key], mask), key


def test_vertices_agree(embedded, imported_face_model):
    g = torch.Generator().manual_seed(7)
    identity = torch.randn(6, 100, generator=g) * torch.tensor([1.0, 1.0, 2.0, 2.0, 3.0, 3.0])[:, None]
    expression = torch.rand(6, 53, generator=g)
    expression[::2] *= (torch.rand(3, 53, generator=g) < 0.2).float()  # a few shapes at once, as in photos
    error = (embedded.vertices(identity, expression) - imported_face_model.vertices(identity, expression)).abs()
    worst = error.amax(dim=(1, 2))
    print(f"vertex max abs error per vector (cm): {[f'{v:.2e}' for v in worst.tolist()]}")
    assert worst.max() == 0


def album_crops(album, analyzer) -> tuple[torch.Tensor, torch.Tensor]:
    """Each album photo's 68 landmarks in its aligned crop, and the crops (B, H, W, 3) in [0, 1]."""
    landmarks, crops = [], []
    for photo in album:
        rgb = read_photo(photo.path).pixels
        face = analyzer.find_face(rgb)
        aligned = align_face(rgb, face.landmarks, CROP)
        landmarks.append(apply_affine(invert_affine(aligned.crop_to_photo), face.landmarks))
        crops.append(aligned.crop)
    return (
        torch.tensor(np.stack(landmarks), dtype=torch.float32),
        torch.from_numpy(np.stack(crops)).float() / 255.0,
    )


def fit_album(model, landmarks, crops):
    """The landmark fit plus light, as ``rigcli.enroll.fit_person`` does it for a person's album."""
    fit = fit_landmarks(model, landmarks)
    fit.light, fit.albedo = fit_light(model, fit, crops)
    return fit


def test_album_fit_and_buffers_agree(embedded, imported_face_model, album, analyzer):
    landmarks, crops = album_crops(album, analyzer)
    ours, theirs = fit_album(embedded, landmarks, crops), fit_album(imported_face_model, landmarks, crops)
    pose = torch.stack([ours.yaw - theirs.yaw, ours.pitch - theirs.pitch, ours.roll - theirs.roll]).abs()
    pose_deg = float(pose.max()) * 180 / math.pi
    expression = float((ours.expression - theirs.expression).abs().max())
    identity = float((ours.identity - theirs.identity).abs().max())
    a, b = render_buffers(embedded, ours, CROP), render_buffers(imported_face_model, theirs, CROP)
    close = ((a - b).abs() <= 1 / 255).all(dim=1)  # (B, H, W): all nine channels within one level
    face = (a.abs().sum(1) > 0) | (b.abs().sum(1) > 0)
    all_px, face_px = float(close.float().mean()), float(close[face].float().mean())
    print(
        f"album of {len(album)}: pose {pose_deg:.2e} deg, expression {expression:.2e}, identity {identity:.2e}; "
        f"buffers within 1/255 at {100 * all_px:.4f} % of pixels ({100 * face_px:.4f} % of face pixels)"
    )
    assert pose_deg < 0.1
    assert expression < 0.01
    assert all_px >= 0.999 and face_px >= 0.999
    assert torch.equal(a, b)  # same tensors, same arithmetic: the same buffers


def test_load_ict_falls_back_to_the_embedded_model(tmp_path, ict_store, embedded, imported_face_model):
    empty = Store(tmp_path / "home")
    assert not installed(empty)
    model = load_ict(empty)
    assert model.model_id == embedded.model_id and model.model_id.startswith("ict-embedded-")
    assert not (tmp_path / "home").exists()  # loading writes nothing into the store
    imported = load_ict(ict_store)
    assert (
        installed(ict_store)
        and imported.model_id == imported_face_model.model_id
        and imported.model_id.startswith("ict-")
    )


def test_each_load_gets_its_own_tensors(embedded):
    again = load_embedded_ict()
    assert again.identity_basis.data_ptr() != embedded.identity_basis.data_ptr()
    before = embedded.neutral.clone()
    again.neutral.zero_()
    again.regions["face"][:] = False
    assert torch.equal(load_embedded_ict().neutral, before) and torch.equal(embedded.neutral, before)
    assert load_embedded_ict().regions["face"].any()


def test_damaged_package_data_is_a_rig_error(tmp_path, monkeypatch):
    import rigcli.face.ict as ict

    for name in FILES:
        shutil.copy(DATA / name, tmp_path / name)
    blob = bytearray((tmp_path / EMBEDDED_TENSORS).read_bytes())
    blob[-1000] ^= 1
    (tmp_path / EMBEDDED_TENSORS).write_bytes(bytes(blob))
    monkeypatch.setattr(ict, "_embedded_file", lambda name: tmp_path / name)
    ict._embedded.cache_clear()
    try:
        with pytest.raises(RigError, match="reinstall rig"):
            load_ict(Store(tmp_path / "home"))
    finally:
        ict._embedded.cache_clear()


def test_wheel_carries_the_data_within_budget(tmp_path):
    """Build from a copy of the sources, so the build leaves nothing in the working tree."""
    source = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("rigcli", "engines"):
        shutil.copytree(REPO / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    out = tmp_path / "wheel"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = out.glob("rig-*.whl")
    with zipfile.ZipFile(wheel) as z:
        data = {Path(i.filename).name: i for i in z.infolist() if i.filename.startswith("rigcli/face/data/")}
        assert sorted(data) == sorted(FILES)
        for name in FILES:
            assert z.read(f"rigcli/face/data/{name}") == (DATA / name).read_bytes()
    total = sum(i.file_size for i in data.values())
    packed = sum(i.compress_size for i in data.values())
    print(
        f"wheel {wheel.stat().st_size / 1e6:.2f} MB; embedded data {total / 1e6:.2f} MB "
        f"({packed / 1e6:.2f} MB compressed in the wheel)"
    )
    assert total <= BUDGET
