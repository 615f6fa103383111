"""FFHQ alignment: geometry on synthetic landmarks, resampling, and real photos under known transforms."""

from __future__ import annotations

import numpy as np
import pytest

from rigcli.demo import similarity
from rigcli.image.align import align_face, apply_affine, compose_affine, crop_transform, invert_affine, warp
from rigcli.image.photo import read_photo

N = 256


def frontal_landmarks(eye_half: float = 20.0, mouth_drop: float = 40.0, center=(300.0, 200.0)) -> np.ndarray:
    """68 points of an upright, symmetric face: eyes at centre +- eye_half, mouth corners below."""
    lm = np.zeros((68, 2))
    cx, cy = center
    ring = np.array([[-4, 0], [-2, -2], [2, -2], [4, 0], [2, 2], [-2, 2]], dtype=np.float64)
    lm[36:42] = ring + np.array([cx - eye_half, cy])
    lm[42:48] = ring + np.array([cx + eye_half, cy])
    lm[48] = [cx - 15, cy + mouth_drop]
    lm[54] = [cx + 15, cy + mouth_drop]
    return lm


def test_frontal_face_lands_at_ffhq_eye_positions():
    # FFHQ's square: half side = 2 x eye distance (it dominates 1.8 x eye-to-mouth here), centre
    # 0.1 eye-to-mouth below the eyes; so eyes sit at 3/8 and 5/8 of the width, a bit above middle.
    lm = frontal_landmarks(eye_half=20.0, mouth_drop=40.0)
    matrix = crop_transform(lm, N)
    eyes = apply_affine(invert_affine(matrix), [lm[36:42].mean(0), lm[42:48].mean(0)])
    half_side = 2 * 40.0
    pixels_per_unit = N / (2 * half_side)
    expected_y = N / 2 - 0.1 * 40.0 * pixels_per_unit - 0.5
    np.testing.assert_allclose(eyes, [[0.375 * N - 0.5, expected_y], [0.625 * N - 0.5, expected_y]], atol=1e-9)


def test_long_face_uses_the_eye_to_mouth_term():
    lm = frontal_landmarks(eye_half=10.0, mouth_drop=60.0)  # 1.8 * 60 > 2 * 20
    matrix = crop_transform(lm, N)
    assert np.sqrt(abs(np.linalg.det(matrix[:, :2]))) == pytest.approx(2 * 1.8 * 60.0 / N)


@pytest.mark.parametrize("scale, degrees, mirror", [(0.5, 0, False), (2.0, 17, False), (1.3, -33, True)])
def test_alignment_follows_the_photo(scale, degrees, mirror):
    # transforming the photo (and so its landmarks) by S must transform the crop square by S
    lm = frontal_landmarks()
    S = similarity(scale, degrees, mirror, shift=(40.0, -25.0))
    moved = apply_affine(S, lm)
    if mirror:  # a mirror swaps which eye and mouth corner is "left"
        moved[36:42], moved[42:48] = moved[42:48].copy(), moved[36:42].copy()
        moved[[48, 54]] = moved[[54, 48]]
    expected = compose_affine(S, crop_transform(lm, N))
    if mirror:
        flip = np.array([[-1.0, 0, N - 1], [0, 1, 0]])  # the crop comes out un-mirrored
        expected = compose_affine(expected, flip)
    np.testing.assert_allclose(crop_transform(moved, N), expected, atol=1e-9)


def test_warp_samples_exactly_where_the_transform_says():
    # bilinear sampling reproduces a linear ramp exactly, so every crop pixel can be checked
    ys, xs = np.mgrid[0:300, 0:400].astype(np.float64)
    ramp = np.dstack([xs * 0.5, ys * 0.6, 100 + 0 * xs])
    matrix = np.array([[0.8, -0.3, 120.0], [0.3, 0.8, 60.0]])
    crop = warp(ramp.astype(np.uint8), matrix, 128).astype(np.float64)
    v, u = np.mgrid[0:128, 0:128]
    pts = apply_affine(matrix, np.stack([u.ravel(), v.ravel()], 1))
    # inside the photo the crop equals the ramp at the mapped point (uint8 rounding aside)
    np.testing.assert_allclose(crop[..., 0].ravel(), np.floor(pts[:, 0] * 0.5), atol=1.01)
    np.testing.assert_allclose(crop[..., 1].ravel(), np.floor(pts[:, 1] * 0.6), atol=1.01)


def test_warp_reflects_outside_the_photo():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)
    shift = np.array([[1.0, 0, -10], [0, 1.0, -5]])  # crop pixel (u, v) <- photo (u - 10, v - 5)
    crop = warp(photo, shift, 40)
    assert np.array_equal(crop[5:, 10:], photo[:35, :30])
    assert np.array_equal(crop[5:, 9], photo[:35, 1])  # x = -1 mirrors to x = 1
    assert np.array_equal(crop[4, 10:], photo[1, :30])


def test_warp_antialiases_when_shrinking():
    # a fine checkerboard shrunk 8x must average to grey, not alias into stripes
    board = (np.indices((1024, 1024)).sum(0) % 2 * 255).astype(np.uint8)
    photo = np.dstack([board] * 3)
    crop = warp(photo, np.array([[8.0, 0, 3.5], [0, 8.0, 3.5]]), 128)
    assert abs(crop.mean() - 127.5) < 2 and crop.std() < 3


def eye_centres(landmarks: np.ndarray) -> np.ndarray:
    lm = np.asarray(landmarks)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0)])


def test_real_photos_align_to_the_same_crop(album, analyzer):
    """Rotated, scaled, mirrored, recoloured copies: eyes re-detected in each crop sit at FFHQ's places."""
    for item in album:
        rgb = read_photo(item.path).pixels
        face = analyzer.find_face(rgb)
        aligned = align_face(rgb, face.landmarks, N)
        # landmarks found again on the crop itself, independent of the transform
        redetected = analyzer.find_face(aligned.crop)
        eyes = eye_centres(redetected.landmarks)
        np.testing.assert_allclose(eyes[:, 0], [0.375 * N - 0.5, 0.625 * N - 0.5], atol=4, err_msg=item.path.name)
        assert abs(eyes[0, 1] - eyes[1, 1]) < 3, item.path.name
        assert 110 < eyes.mean(0)[1] < 128, item.path.name
        # the stored transform takes crop landmarks back onto the photo's landmarks
        back = apply_affine(aligned.crop_to_photo, redetected.landmarks)
        scale = np.sqrt(abs(np.linalg.det(aligned.crop_to_photo[:, :2])))
        err = np.linalg.norm(back[17:] - face.landmarks[17:], axis=1)  # inner points (jaw is looser)
        assert np.median(err) < 1.5 * scale + 1, item.path.name


def test_landmarks_follow_the_known_album_transform(album, analyzer):
    """Landmarks in each copy match the original's, moved by the transform that made the copy."""
    original = analyzer.find_face(read_photo(album[0].path).pixels).landmarks
    for item in album[1:]:
        found = analyzer.find_face(read_photo(item.path).pixels).landmarks
        expected = apply_affine(item.source_to_photo, original)
        scale = np.sqrt(abs(np.linalg.det(item.source_to_photo[:, :2])))
        got, want = eye_centres(found), eye_centres(expected)
        if item.mirrored:
            want = want[::-1]
        assert np.linalg.norm(got - want, axis=1).max() < 2.5 * scale, item.path.name
