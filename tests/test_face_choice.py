"""In a photo with several faces the person's is edited: the face nearest their album, not the largest."""

from __future__ import annotations

import numpy as np
import pytest

from rigcli.enroll import NOT_PERSON, person_face
from rigcli.image.photo import PhotoError, read_photo
from tests.conftest import SHARED

REAL = SHARED / "assets" / "real"


def embeddings(analyzer, names):
    out = []
    for name in names:
        photo = read_photo(REAL / name)
        face = analyzer.find_face(photo.pixels)
        out.append(analyzer.embed(photo.pixels, face.landmarks))
    return np.stack(out)


def test_the_face_nearest_the_album_is_chosen_and_a_stranger_is_not_the_person(analyzer):
    if not REAL.is_dir():
        pytest.fail(f"real test photos not found at {REAL}")
    album_a = embeddings(analyzer, ["obama-1.jpg", "obama-2.jpg", "obama-4.jpg"])
    album_b = embeddings(analyzer, ["biden-2.jpg"])
    two = read_photo(REAL / "obama-biden-two-faces.jpg")
    faces = analyzer.find_faces(two.pixels)
    assert len(faces) == 2 and faces[0].box.box[0] < faces[1].box.box[0]  # left to right
    a = person_face(two, analyzer, album_a, "obama")
    b = person_face(two, analyzer, album_b, "biden")
    assert a.box.box != b.box.box
    # --face N overrides the choice
    assert person_face(two, analyzer, album_a, "obama", face=1).box.box == faces[0].box.box
    assert person_face(two, analyzer, album_a, "obama", face=2).box.box == faces[1].box.box
    with pytest.raises(PhotoError, match="the photo has 2 face"):
        person_face(two, analyzer, album_a, "obama", face=3)
    with pytest.raises(PhotoError, match="not obama") as info:
        person_face(read_photo(REAL / "biden-1.jpg"), analyzer, album_a, "obama")
    assert info.value.reason == NOT_PERSON
