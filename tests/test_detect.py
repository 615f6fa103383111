"""Face detection, the choice among several hits, landmarks and embeddings (dlib)."""

from __future__ import annotations

import numpy as np
import pytest

from rigcli import RigError
from rigcli.demo import astronaut
from rigcli.image.detect import FaceAnalyzer, FaceBox, choose_face, model_path
from rigcli.image.photo import read_photo


def box(width: float, score: float, x: float = 0) -> FaceBox:
    return FaceBox((x, 0, x + width, width), score)


def test_choose_face_prefers_largest():
    big, small = box(100, 0.5), box(60, 2.0)
    best, others = choose_face([small, big])
    assert best is big and others == [small]


def test_choose_face_breaks_size_ties_by_confidence():
    a, b = box(91, 0.2 + 1.0), box(95, 0.4)  # within 10%: the more confident wins
    assert choose_face([a, b])[0] is a


def test_choose_face_drops_weak_hits_unless_alone():
    face, badge = box(91, 1.16), box(120, 0.12)
    best, others = choose_face([badge, face])
    assert best is face and others == []
    assert choose_face([badge])[0] is badge


def test_astronaut_face_and_landmarks(analyzer):
    face = analyzer.find_face(astronaut())
    assert face is not None and face.others == []  # the badge hit is weak and ignored
    x0, y0, x1, y1 = face.box.box
    assert 80 < x1 - x0 < 110 and 160 < x0 < 190 and 60 < y0 < 90
    lm = face.landmarks
    assert lm.shape == (68, 2)
    inside = (lm[:, 0] > x0 - 15) & (lm[:, 0] < x1 + 15) & (lm[:, 1] > y0 - 15) & (lm[:, 1] < y1 + 25)
    assert inside.all()
    left_eye, right_eye, nose_tip = lm[36:42].mean(0), lm[42:48].mean(0), lm[30]
    assert left_eye[0] < nose_tip[0] < right_eye[0]
    assert left_eye[1] < nose_tip[1] and right_eye[1] < nose_tip[1]


def test_two_faces_uses_the_larger(inputs, analyzer):
    # the smaller copy scores higher with HOG, but the larger face is the one to use
    face = analyzer.find_face(read_photo(inputs / "ok_two_faces.jpg").pixels)
    assert 85 < face.box.width < 100
    assert len(face.others) == 1 and face.others[0].width < 60
    assert face.others[0].score > face.box.score


def test_no_face_and_tiny_face(inputs, analyzer):
    assert analyzer.find_face(read_photo(inputs / "bad_no_face.jpg").pixels) is None
    tiny = analyzer.find_face(read_photo(inputs / "bad_tiny_face.png").pixels)
    assert tiny is not None and 38 < tiny.box.width < 48


def test_large_photo_is_scanned_downscaled_and_boxes_map_back(analyzer):
    from PIL import Image

    big = np.asarray(Image.fromarray(astronaut()).resize((2048, 2048), Image.Resampling.BICUBIC))
    small_face = analyzer.find_face(astronaut())
    big_face = analyzer.find_face(big)
    # same face, 4x larger, in the 4x photo (scan at 1280 px, boxes mapped back to 2048 px)
    np.testing.assert_allclose(np.array(big_face.box.box) / 4, small_face.box.box, atol=6)
    np.testing.assert_allclose(big_face.landmarks / 4, small_face.landmarks, atol=3)


def test_embedding_separates_people(analyzer):
    from skimage import data

    a = astronaut()
    face = analyzer.find_face(a)
    e1 = analyzer.embed(a, face.landmarks)
    mirrored = np.ascontiguousarray(a[:, ::-1])
    e2 = analyzer.embed(mirrored, analyzer.find_face(mirrored).landmarks)
    assert e1.shape == (128,)
    assert np.linalg.norm(e1 - e2) < 0.4  # the same person, mirrored
    camera = np.ascontiguousarray(np.repeat(data.camera()[:, :, None], 3, axis=2))
    cnn_face = FaceAnalyzer("cnn").find_face(camera)  # the cameraman: HOG misses him
    assert cnn_face is not None
    e3 = analyzer.embed(camera, cnn_face.landmarks)
    assert np.linalg.norm(e1 - e3) > 0.6  # a different person, by dlib's own threshold


def test_unknown_detector_and_missing_model(monkeypatch):
    with pytest.raises(RigError, match="unknown detector"):
        FaceAnalyzer("yolo")
    monkeypatch.setattr("rigcli.image.detect.models_dir", lambda: None)
    with pytest.raises(RigError, match="pip install face_recognition_models"):
        model_path("landmarks")


def test_choose_face_trusts_cnn_confirmation_over_size_and_score():
    badge = FaceBox((0, 0, 186, 186), 0.38, verified=False)
    face = FaceBox((300, 0, 480, 180), 0.34, verified=True)
    best, others = choose_face([badge, face])
    assert best is face and others == []


def test_badge_that_ties_with_the_face_is_rejected(album, analyzer):
    # in some scaled copies HOG scores the mission badge above the (equally wide) face;
    # the CNN's second look must still pick the face, whose eyes lie above the badge
    for item in album:
        rgb = read_photo(item.path).pixels
        face = analyzer.find_face(rgb)
        truth = np.array([220.0, 120.0]) @ item.source_to_photo[:, :2].T + item.source_to_photo[:, 2]
        centre = np.array(face.box.box).reshape(2, 2).mean(0)
        assert np.linalg.norm(centre - truth) < face.box.width * 0.5, item.path.name
