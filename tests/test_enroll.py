"""add-person's pipeline through the Python API: statuses, dedupe, outliers, removal, interruption."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest

from rigcli import RigError
from rigcli.enroll import ADDED, DUPLICATE, OUTLIER, add_photos, describe, photo_id, remove_photo
from rigcli.image.photo import read_photo
from rigcli.store import Store


def check_consistent(store: Store, name: str) -> None:
    """Every file the manifest names exists and reads; the manifest parses."""
    manifest = store.load(name)
    folder = store.person_dir(name)
    for record in manifest.photos:
        original = folder / record.original
        assert photo_id(original.read_bytes()) == record.id
        assert read_photo(folder / record.aligned).pixels.shape == (manifest.align_size, manifest.align_size, 3)
        face = json.loads((folder / record.face).read_text())
        assert len(face["landmarks"]) == 68 and len(face["embedding"]) == 128


def test_album_is_added_and_described(tmp_path, album):
    store = Store(tmp_path / "home")
    report = add_photos(store, "astro", [album[0].path.parent])
    assert [o.status for o in report.outcomes] == [ADDED] * len(album)
    check_consistent(store, "astro")
    info = describe(store, "astro")
    assert info["name"] == "astro" and info["schema_version"] == 1 and info["created"]
    assert len(info["photos"]) == len(album)
    for p in info["photos"]:
        assert set(p) >= {"id", "source", "status", "face_box", "landmarks", "aligned"}
        assert len(p["landmarks"]) == 68 and len(p["face_box"]) == 4
        x0, y0, x1, y1 = p["face_box"]
        w, h = p["image_size"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h  # original-photo pixels
        assert p["status"] == "ok" and p["train"] is True
    # nothing outside the store root was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_same_photo_twice_is_stored_once(tmp_path, album):
    store = Store(tmp_path)
    copy = tmp_path / "renamed.png"
    shutil.copy(album[0].path, copy)
    report = add_photos(store, "astro", [album[0].path, copy])
    assert [o.status for o in report.outcomes] == [ADDED, DUPLICATE]
    again = add_photos(store, "astro", [album[0].path, album[1].path])
    assert [o.status for o in again.outcomes] == [DUPLICATE, ADDED]
    assert len(store.load("astro").photos) == 2
    assert len(list((store.person_dir("astro") / "photos").iterdir())) == 2


def test_awkward_inputs_get_the_expected_status(tmp_path, inputs):
    store = Store(tmp_path)
    report = add_photos(store, "astro", [inputs])
    status = {o.source.name: o.status for o in report.outcomes}
    # ok_png_named.jpg is the same bytes as one of the others only if the files repeat; check by content
    expected = {
        "ok_cmyk.jpg": ADDED,
        "ok_exif_rot.jpg": ADDED,
        "ok_gray16.png": ADDED,
        "ok_png_named.jpg": ADDED,
        "ok_rgba.png": ADDED,
        "ok_two_faces.jpg": ADDED,
        "ok_webp.webp": ADDED,
        "bad_zero.jpg": "unreadable",
        "bad_truncated.jpg": "unreadable",
        "bad_text.png": "unreadable",
        "bad_bomb.png": "unreadable",
        "bad_no_face.jpg": "no face",
        "bad_tiny_face.png": "too small",
    }
    assert status == expected
    details = {o.source.name: o.detail for o in report.outcomes}
    assert "2 faces found, used the largest" in details["ok_two_faces.jpg"]
    assert "44 px" in details["bad_tiny_face.png"] or "43 px" in details["bad_tiny_face.png"]
    check_consistent(store, "astro")
    assert len(store.load("astro").photos) == 7  # nothing written for the bad files
    assert len(list((store.person_dir("astro") / "photos").iterdir())) == 7


def test_nothing_usable_creates_no_person(tmp_path, inputs):
    store = Store(tmp_path)
    report = add_photos(store, "ghost", [inputs / "bad_no_face.jpg", inputs / "bad_zero.jpg"])
    assert report.usable == 0
    assert store.people() == [] and not (store.people_dir / "ghost").exists()


def test_bad_paths_are_refused_before_any_work(tmp_path):
    store = Store(tmp_path / "home")
    with pytest.raises(RigError, match="does not exist"):
        add_photos(store, "astro", [tmp_path / "missing"])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no photos here")
    with pytest.raises(RigError, match="holds no images"):
        add_photos(store, "astro", [empty])
    with pytest.raises(RigError, match="invalid person name"):
        add_photos(store, "../escape", [empty])
    assert not (tmp_path / "escape").exists()


def test_crop_size_is_fixed_per_person(tmp_path, album):
    store = Store(tmp_path)
    add_photos(store, "big", [album[0].path], size=512)
    assert read_photo(store.person_dir("big") / store.load("big").photos[0].aligned).size == (512, 512)
    with pytest.raises(RigError, match="aligned at 512 px"):
        add_photos(store, "big", [album[1].path], size=256)


@pytest.fixture(scope="module")
def cameraman(tmp_path_factory):
    from skimage import data

    path = tmp_path_factory.mktemp("other") / "cameraman.png"
    iio.imwrite(path, np.repeat(data.camera()[:, :, None], 3, axis=2))
    return path


def test_another_person_is_flagged_and_kept_out_of_training(tmp_path, album, cameraman):
    store = Store(tmp_path)
    add_photos(store, "astro", [p.path for p in album[:5]])
    report = add_photos(store, "astro", [cameraman], detector="cnn")  # HOG misses his face
    (outcome,) = report.outcomes
    assert outcome.status == OUTLIER and "may be someone else" in outcome.detail
    info = describe(store, "astro")
    flags = {p["source"]: (p["status"], p["train"]) for p in info["photos"]}
    assert flags["cameraman.png"] == ("outlier", False)
    assert all(flag == ("ok", True) for src, flag in flags.items() if src != "cameraman.png")
    distances = {p["source"]: p["outlier_distance"] for p in info["photos"]}
    assert distances["cameraman.png"] > 0.5 > max(d for s, d in distances.items() if s != "cameraman.png")
    # --keep-outliers keeps the photo for training, and is remembered
    add_photos(store, "astro", [album[5].path], keep_outliers=True)
    assert {p.source: p.train for p in store.load("astro").photos}["cameraman.png"] is True
    # removing it leaves a clean album
    remove_photo(store, "astro", outcome.photo_id[:6])
    assert all(p.status == "ok" for p in store.load("astro").photos)
    check_consistent(store, "astro")


def test_remove_photo(tmp_path, album):
    store = Store(tmp_path)
    report = add_photos(store, "astro", [p.path for p in album[:3]])
    target = report.outcomes[1].photo_id
    removed = remove_photo(store, "astro", target)
    assert removed.id == target
    ids = [p.id for p in store.load("astro").photos]
    assert target not in ids and len(ids) == 2
    folder = store.person_dir("astro")
    assert not any(target in p.name for p in folder.rglob("*"))
    with pytest.raises(RigError, match="has no photo"):
        remove_photo(store, "astro", target)
    with pytest.raises(RigError, match="has no photo"):
        remove_photo(store, "astro", "ab")  # a prefix must have 4+ characters


def rig_process(home, *args, **popen):
    env = {**__import__("os").environ, "RIG_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "rigcli", *args], env=env, **popen)


def wait_for_photos(store: Store, name: str, count: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the add finished before it could be interrupted"
        if store.exists(name) and len(store.load(name).photos) >= count:
            return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for photos")


def test_killed_add_keeps_whole_photos_only(tmp_path, album):
    """SIGKILL mid-run: the store holds the photos fully added, and the next run completes it."""
    store = Store(tmp_path / "home")
    proc = rig_process(store.root, "add-person", "astro", str(album[0].path.parent), stdout=subprocess.DEVNULL)
    try:
        wait_for_photos(store, "astro", 2, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    kept = len(store.load("astro").photos)
    assert 2 <= kept < len(album)
    check_consistent(store, "astro")
    report = add_photos(store, "astro", [album[0].path.parent])
    assert sum(o.status == DUPLICATE for o in report.outcomes) == kept
    check_consistent(store, "astro")
    folder = store.person_dir("astro")
    for sub in ("photos", "aligned", "faces"):  # leftovers of the kill were collected
        assert len(list((folder / sub).iterdir())) == len(album)
    assert not list(folder.rglob(".tmp-*"))


def test_ctrl_c_stops_cleanly(tmp_path, album):
    store = Store(tmp_path / "home")
    proc = rig_process(
        store.root,
        "add-person",
        "astro",
        str(album[0].path.parent),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_photos(store, "astro", 1, proc)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in stderr and "Traceback" not in stderr + stdout
    check_consistent(store, "astro")
