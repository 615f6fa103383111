"""rig edit on real photos (../shared/assets/real): the edit at the photo's size keeps its detail,
moves the light where it was asked, keeps the person, and edits the person's face in a group photo."""

from __future__ import annotations

import numpy as np
import pytest

from rigcli.edit.controls import Controls
from rigcli.edit.editor import DEFAULT_STRENGTH, Editor, edit_photos
from rigcli.edit.outputs import identity_distance, output_picture
from rigcli.evaluate.metrics import detail_ratio, photo_mask
from rigcli.image.photo import read_photo
from rigcli.store import Store
from tests.conftest import SHARED

REAL = SHARED / "assets" / "real"
HELD_OUT = "obama-4.jpg"  # A, not in the album: frontal, neutral, blue backdrop
ALBUM_B = ["biden-1.jpg", "biden-2.jpg"]
TWO_FACES = "obama-biden-two-faces.jpg"


@pytest.fixture(scope="module")
def real_home(tmp_path_factory, trained_people):
    """A store with A's album (three photos) and a tiny model trained briefly on it, and B's album
    (conftest's TRAINED_PEOPLE "a" and "b"): the module's own copy."""
    if not REAL.is_dir():
        pytest.fail(f"the real test photos are needed at {REAL}")
    return trained_people.home(tmp_path_factory.mktemp("real"), "a", "b")


@pytest.fixture(scope="module")
def editor_a(real_home):
    return Editor(Store(real_home), "a")


def luminance(image: np.ndarray) -> np.ndarray:
    return np.asarray(image, np.float64) @ np.array([0.299, 0.587, 0.114])


def left_over_right(image: np.ndarray, face: np.ndarray) -> float:
    """Mean luminance of the face's image-left half over its right half (split at the face's centre)."""
    cols = np.nonzero(face.any(0))[0]
    middle = (cols.min() + cols.max()) / 2
    xs = np.arange(face.shape[1])[None, :]
    luma = luminance(image)
    return float(luma[face & (xs < middle)].mean() / luma[face & (xs >= middle)].mean())


def test_relit_held_out_photo_keeps_detail_moves_the_light_and_keeps_the_person(editor_a):
    (result,) = edit_photos(editor_a, [REAL / HELD_OUT], Controls(light="left"), steps=10, strength=DEFAULT_STRENGTH)
    assert result.error is None, result.error
    prepared = result.prepared
    photo, output = prepared.pixels, output_picture(result, "refined", False, 512)
    plain = output_picture(result, "plain", False, 512)
    assert output.shape == photo.shape and plain.shape == photo.shape
    face = photo_mask(result.before.faces[result.index], prepared.crop_to_photo, photo.shape[:2])
    kept, kept_plain = detail_ratio(photo, output, face), detail_ratio(photo, plain, face)
    before, after = left_over_right(photo, face), left_over_right(output, face)
    distance = identity_distance(editor_a.analyzer, prepared, output)
    print(
        f"strength {DEFAULT_STRENGTH}: detail kept {kept:.3f} (plain blend {kept_plain:.3f}); left/right "
        f"{before:.3f} -> {after:.3f}; identity distance {distance:.3f}; reconstruction "
        f"{result.reconstruction_psnr:.1f} dB"
    )
    assert kept >= 0.8
    assert after > before * 1.05
    assert distance is not None and distance < 0.4
    outside = result.photo_mask == 0
    assert outside.mean() > 0.5 and np.array_equal(output[outside], photo[outside])


def test_the_group_photo_edits_the_face_of_the_albums_person(real_home, analyzer):
    store = Store(real_home)
    photo = read_photo(REAL / TWO_FACES).pixels
    faces = analyzer.find_faces(photo)
    assert len(faces) == 2
    # which face is whose, from photos in neither album: A's held-out photo and one of B's
    references = []
    for name in (HELD_OUT, ALBUM_B[1]):
        other = read_photo(REAL / name).pixels
        found = analyzer.find_face(other)
        references.append(analyzer.embed(other, found.landmarks))
    embedded = [analyzer.embed(photo, f.landmarks) for f in faces]
    nearest = [int(np.argmin([np.linalg.norm(e - ref) for e in embedded])) for ref in references]
    whose = {"a": nearest[0], "b": nearest[1]}
    assert whose["a"] != whose["b"]
    for person in "ab":
        # strength 0: the physical edit alone, so B can borrow A's model folder (it is never called)
        editor = Editor(store, person, store.model_dir("a"))
        (result,) = edit_photos(editor, [REAL / TWO_FACES], Controls(light="left"), steps=2, strength=0.0)
        assert result.error is None, result.error
        changed = np.argwhere((result.photo_output != photo).any(-1))
        y, x = changed.mean(0)
        x0, y0, x1, y1 = faces[whose[person]].box.box
        assert x0 <= x <= x1 and y0 <= y <= y1, (person, (x, y), faces[whose[person]].box.box)
        x0, y0, x1, y1 = faces[1 - whose[person]].box.box
        inside = (changed[:, 1] >= x0) & (changed[:, 1] <= x1) & (changed[:, 0] >= y0) & (changed[:, 0] <= y1)
        assert inside.mean() < 0.05  # the other face is left alone


def test_light_from_a_photo_of_someone_else_is_a_reference_not_a_stranger(editor_a):
    """A reference photo (--light-from) may show anyone; the photo edited must show the person."""
    controls = Controls(light_from=REAL / ALBUM_B[1])
    (result,) = edit_photos(editor_a, [REAL / HELD_OUT], controls, steps=2, strength=0.0)
    assert result.error is None, result.error
    assert not np.array_equal(result.photo_output, result.prepared.pixels)
    (stranger,) = edit_photos(editor_a, [REAL / ALBUM_B[1]], Controls(light="left"), steps=2, strength=0.0)
    assert stranger.photo_output is None and stranger.error.startswith("not the person: not a")
