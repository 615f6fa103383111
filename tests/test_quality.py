"""The retoucher's measures (rigcli.evaluate.quality) on a real photo and its dlib landmarks: each one
moves by what a known change of the picture or of the landmarks makes it move, and no more."""

from __future__ import annotations

import numpy as np
import pytest

from rigcli.evaluate import quality
from rigcli.image.photo import read_photo
from tests.conftest import SHARED


@pytest.fixture(scope="module")
def portrait(analyzer):
    """obama-4 (frontal, neutral, blue backdrop) and dlib's 68 landmarks in it."""
    pixels = read_photo(SHARED / "assets" / "real" / "obama-4.jpg").pixels
    return pixels, analyzer.find_face(pixels).landmarks.astype(np.float64)


def test_an_unchanged_photo_measures_nothing_foreign_and_the_same_both_ways(portrait):
    pixels, points = portrait
    got = quality.measure_quality(pixels, points, pixels.copy(), points.copy())
    assert got.foreign_pixels == 0 and got.colour_blotches == 0
    for before, after in (got.light_balance, got.mouth_width, got.eye_opening, got.nose_offset):
        assert before == after
    assert 0.7 < got.light_balance[0] < 1.4 and 0.6 < got.mouth_width[0] < 0.9  # a frontal, evenly lit face
    assert 0.15 < got.eye_opening[0] < 0.45 and abs(got.nose_offset[0]) < 0.25  # turned a little


def test_light_balance_is_the_ratio_of_the_two_sides_of_the_nose_line(portrait):
    pixels, points = portrait
    height, width = pixels.shape[:2]
    top, tip = points[27], points[30]
    ys, xs = np.mgrid[0:height, 0:width]
    line_x = top[0] + (ys - top[1]) * (tip[0] - top[0]) / (tip[1] - top[1])  # the nose line at each row
    flat = np.where((xs < line_x)[..., None], 150, 100).astype(np.uint8).repeat(3, -1)
    assert quality.light_balance(flat, points) == pytest.approx(1.5, abs=1e-9)
    # the photo brightened on its left by a smooth ramp: the balance rises, the chromaticity stays
    gain = 1 + 0.3 * np.clip((line_x - xs) / quality.eye_width(points), 0, 1)
    brighter = np.clip(pixels * gain[..., None], 0, 255).round().astype(np.uint8)
    assert quality.light_balance(brighter, points) > quality.light_balance(pixels, points) * 1.15
    assert quality.colour_blotches(pixels, brighter, points) < 0.005


def test_shape_measures_follow_the_landmarks(portrait):
    _, points = portrait
    wider = points.copy()
    middle = (points[48] + points[54]) / 2
    wider[[48, 54]] = middle + (points[[48, 54]] - middle) * 1.1
    assert quality.mouth_width(wider) / quality.mouth_width(points) == pytest.approx(1.1, rel=1e-9)
    shut = points.copy()
    for upper, lower in ((37, 41), (38, 40), (43, 47), (44, 46)):
        shut[upper] = (points[upper] + points[lower]) / 2 + (points[upper] - points[lower]) / 4
        shut[lower] = (points[upper] + points[lower]) / 2 - (points[upper] - points[lower]) / 4
    assert quality.eye_opening(shut) / quality.eye_opening(points) == pytest.approx(0.5, rel=1e-9)
    turned = points.copy()
    eyes = points[42:48].mean(0) - points[36:42].mean(0)
    turned[30] += 0.1 * quality.eye_width(points) * eyes / np.linalg.norm(eyes)  # toward the image's right
    assert quality.nose_offset(turned) - quality.nose_offset(points) == pytest.approx(0.1, abs=1e-9)


def test_paint_over_hair_and_colour_speckle_are_counted_where_they_are(portrait):
    pixels, points = portrait
    width = quality.eye_width(points)
    distance = quality.signed_distance(quality.face_hull(pixels.shape[:2], points))
    band = (distance >= -0.15 * width) & (distance <= 0.6 * width)
    # a skin-coloured patch painted on the hair at the temple (image left, above the ear), 0.4 eye widths square
    top = int(points[0, 1] - 0.67 * width)
    left = int(points[0, 0] - 0.38 * width)
    side = int(0.4 * width)
    painted = pixels.copy()
    patch = np.zeros(pixels.shape[:2], bool)
    patch[top : top + side, left : left + side] = True
    painted[patch] = (230, 170, 140)
    assert pixels[patch].mean() < 100  # it lay on dark hair: the input shows no such colour near it
    share = quality.foreign_pixels(pixels, painted, points)
    inner = np.zeros_like(patch)  # the patch less a border of a window's half: all of it unlike its surroundings
    margin = round(0.125 * width) + 1
    inner[top + margin : top + side - margin, left + margin : left + side - margin] = True
    assert (inner & band).sum() / band.sum() <= share <= (patch & band).sum() / band.sum()
    # green and magenta speckle on the cheeks: colour blotches, not a change of brightness
    rng = np.random.default_rng(0)
    hull = quality.face_hull(pixels.shape[:2], points)
    speckle = hull & (rng.random(hull.shape) < 0.05)
    speckled = pixels.astype(np.int16)
    speckled[speckle] += np.where(rng.random((int(speckle.sum()), 1)) < 0.5, [-40, 40, -40], [40, -40, 40])
    speckled = np.clip(speckled, 0, 255).astype(np.uint8)
    region = distance <= 0.3 * width
    blotches = quality.colour_blotches(pixels, speckled, points)
    assert 0.5 * speckle.sum() / region.sum() < blotches <= speckle.sum() / region.sum()


def test_measured_on_the_face_window_as_over_the_whole_photo(portrait):
    """measure_quality reads only ``face_window`` of the photos: the values are those of the whole photo."""
    pixels, points = portrait
    rng = np.random.default_rng(1)
    changed = np.clip(pixels * rng.uniform(0.7, 1.3, pixels.shape), 0, 255).astype(np.uint8)  # noise everywhere
    moved = points + np.array([9.0, -4.0])
    x0, y0, x1, y1 = quality.face_window(pixels.shape[:2], points, moved)
    assert 0 < x1 - x0 < pixels.shape[1] and 0 < y1 - y0 < pixels.shape[0]  # a part of the photo, not all of it
    got = quality.measure_quality(pixels, points, changed, moved)
    assert got.light_balance == (quality.light_balance(pixels, points), quality.light_balance(changed, moved))
    assert got.foreign_pixels == quality.foreign_pixels(pixels, changed, points) > 0
    assert got.colour_blotches == quality.colour_blotches(pixels, changed, points) > 0


PASSING = {  # per named edit: a Quality that meets its bounds, and changes that each miss exactly one of them
    "light left": (
        quality.Quality((1.0, 1.3), (0.7, 0.7), (0.3, 0.3), (0.0, 0.0), 0.5, 0.004),
        {"left/right rises >= 0.25 to > 1.2": [{"light_balance": (1.0, 1.24)}, {"light_balance": (0.8, 1.15)}],
         "colour blotches <= 0.5 %": [{"colour_blotches": 0.006}]},
    ),
    "light right": (
        quality.Quality((1.1, 0.8), (0.7, 0.7), (0.3, 0.3), (0.0, 0.0), 0.5, 0.004),
        {"left/right falls >= 0.25 to < 0.85": [{"light_balance": (1.1, 0.86)}, {"light_balance": (1.0, 0.8)}],
         "colour blotches <= 0.5 %": [{"colour_blotches": 0.006}]},
    ),
    "smile 0.8": (
        quality.Quality((1.0, 1.0), (0.7, 0.76), (0.3, 0.3), (0.0, 0.0), 0.004, 0.5),
        {"mouth >= 8 % wider": [{"mouth_width": (0.7, 0.75)}], "foreign pixels <= 0.5 %": [{"foreign_pixels": 0.006}]},
    ),
    "blink 1": (
        quality.Quality((1.0, 1.0), (0.7, 0.7), (0.3, 0.14), (0.0, 0.0), 0.004, 0.5),
        {"eyelids <= half open": [{"eye_opening": (0.3, 0.16)}],
         "foreign pixels <= 0.5 %": [{"foreign_pixels": 0.006}]},
    ),
    "yaw 12": (
        quality.Quality((1.0, 1.0), (0.7, 0.7), (0.3, 0.3), (-0.02, 0.07), 0.004, 0.5),
        {"nose tip >= 0.08 eye widths to the right": [{"nose_offset": (-0.02, 0.05)}, {"nose_offset": (0.0, -0.1)}],
         "foreign pixels <= 0.5 %": [{"foreign_pixels": 0.006}]},
    ),
    "yaw -12": (
        quality.Quality((1.0, 1.0), (0.7, 0.7), (0.3, 0.3), (0.02, -0.07), 0.004, 0.5),
        {"nose tip >= 0.08 eye widths to the left": [{"nose_offset": (0.02, -0.05)}, {"nose_offset": (0.0, 0.1)}],
         "foreign pixels <= 0.5 %": [{"foreign_pixels": 0.006}]},
    ),
}  # fmt: skip


def test_misses_names_each_bound_an_edit_misses_and_no_other():
    from dataclasses import replace

    assert PASSING.keys() == quality.BOUNDS.keys()
    for label, (good, failing) in PASSING.items():
        assert quality.misses(label, good, 0.39) == [], label
        assert quality.misses(label, good, 0.41) == ["identity > 0.40"]
        assert quality.misses(label, good, None) == ["identity > 0.40"]  # no distance: no pass
        assert {b.text for b in quality.BOUNDS[label]} == set(failing)
        for text, changes in failing.items():
            for change in changes:
                assert quality.misses(label, replace(good, **change), 0.2) == [text], (label, change)
        everything = replace(good, **{k: v for change in failing.values() for k, v in change[0].items()})
        assert quality.misses(label, everything, 0.5) == ["identity > 0.40", *failing]
        assert quality.misses(label, None, 0.1) == [quality.NO_FACE]
    # the light's bound on foreign pixels, and the other edits' on blotches, are not the issue's
    assert quality.misses("light left", replace(PASSING["light left"][0], foreign_pixels=0.5), 0.1) == []
    assert quality.misses("smile 0.8", replace(PASSING["smile 0.8"][0], colour_blotches=0.5), 0.1) == []


def test_the_face_in_an_output_is_the_one_where_the_photos_was(analyzer):
    """In a photo of two people, each face's landmarks find that face again, not the larger one; a
    photo with no face there gives None."""
    from rigcli.evaluate.suite import closeup_box

    pixels = read_photo(SHARED / "assets" / "real" / "obama-biden-two-faces.jpg").pixels
    faces = analyzer.find_faces(pixels)
    assert len(faces) == 2
    for face in faces:
        assert np.array_equal(analyzer.face_near(pixels, face.landmarks), face.landmarks)
        x0, y0, x1, y1 = closeup_box(face.landmarks, pixels.shape[:2])
        side = 1.7 * np.ptp(face.landmarks, axis=0).max()
        assert abs((x1 - x0) - side) <= 1 and (y1 - y0) <= side + 1 and y0 >= 0  # square, clipped at the top
        assert (x0 <= face.landmarks.min(0)[0]) and (x1 >= face.landmarks.max(0)[0])
    blank = np.full_like(pixels, 128)
    assert analyzer.face_near(blank, faces[0].landmarks) is None
    # rig edit's identity distance of an unchanged group photo: 0 for either face, never the other's
    from types import SimpleNamespace

    from rigcli.edit.outputs import identity_distance

    for face in faces:
        prepared = SimpleNamespace(pixels=pixels, landmarks=face.landmarks)
        assert identity_distance(analyzer, prepared, pixels) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- issue 27's pairs measure


def _turned(angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """2x3: a rotation by ``angle`` degrees and a uniform ``scale``, then a ``shift``."""
    c, s = np.cos(np.radians(angle)) * scale, np.sin(np.radians(angle)) * scale
    return np.array([[c, -s, shift[0]], [s, c, shift[1]]])


def test_the_similarity_of_two_point_sets_is_the_one_that_made_them():
    from rigcli.image.align import apply_affine

    rng = np.random.default_rng(2)
    points = rng.uniform(0, 500, (68, 2))
    for angle, scale, shift in ((12.0, 0.8, (40.0, -25.0)), (-170.0, 2.5, (-300.0, 900.0)), (0.0, 1.0, (0.0, 0.0))):
        known = _turned(angle, scale, shift)
        assert np.allclose(quality.similarity(points, apply_affine(known, points)), known, rtol=0, atol=1e-9)
    # noisy points: the least-squares fit lies near the transform, and a reflection is never fitted
    noisy = apply_affine(known, points) + rng.normal(0, 1, points.shape)
    assert np.allclose(quality.similarity(points, noisy), known, atol=0.5)
    mirrored = points * [-1, 1]
    assert np.linalg.det(quality.similarity(points, mirrored)[:, :2]) > 0


def _moved(pixels: np.ndarray, points: np.ndarray, matrix: np.ndarray, shape: tuple[int, int]):
    """The photo and its landmarks carried by the 2x3 ``matrix`` into a frame of ``shape`` (cubic, by
    scipy: not the bilinear ``warp`` the measure uses), and the landmarks carried along."""
    from scipy import ndimage

    from rigcli.image.align import apply_affine, invert_affine

    back = invert_affine(matrix)  # frame (x, y) -> photo (x, y); scipy reads (row, column)
    linear = back[::-1, :2][:, ::-1]
    channels = [
        ndimage.affine_transform(pixels[..., c].astype(np.float64), linear, back[::-1, 2], shape, order=3)
        for c in range(3)
    ]
    moved = np.clip(np.stack(channels, -1), 0, 255).round().astype(np.uint8)
    return moved, apply_affine(matrix, points)


def test_a_photo_moved_by_a_similarity_matches_itself_and_another_photo_does_not(portrait, analyzer):
    pixels, points = portrait
    matrix = _turned(9.0, 0.85, (150.0, 60.0))
    moved, moved_points = _moved(pixels, points, matrix, (900, 1300))
    same = quality.pair_error(moved, moved_points, pixels, points)
    assert same < 2.0  # interpolation only: two resamplings of the same pixels
    other = read_photo(SHARED / "assets" / "real" / "obama-1.jpg").pixels
    other_points = analyzer.find_face(other).landmarks.astype(np.float64)
    assert quality.pair_error(other, other_points, pixels, points) > 10 * max(same, 1.0)
    # a frame that holds half the face: the uncovered half is left out, not counted as black
    half = moved.copy()
    half[:, : int(moved_points[:, 0].mean())] = 0
    cut = half[:, int(moved_points[:, 0].mean()) :]
    cut_points = moved_points - [int(moved_points[:, 0].mean()), 0]
    assert quality.pair_error(cut, cut_points, pixels, points) < 2.5
    assert quality.pair_error(half, moved_points, pixels, points) > 20  # the black half, where it is in the frame


def test_only_the_inner_face_counts(portrait):
    pixels, points = portrait
    matrix = _turned(-6.0, 1.1, (-80.0, 20.0))
    moved, moved_points = _moved(pixels, points, matrix, pixels.shape[:2])
    before = quality.pair_error(moved, moved_points, pixels, points)
    hull = quality.face_hull(pixels.shape[:2], points)
    inverted = 255 - pixels
    outside = np.where(hull[..., None], pixels, inverted)  # the target changed everywhere but its inner face
    assert quality.pair_error(moved, moved_points, outside, points) == before
    inside = np.where(hull[..., None], inverted, pixels)
    assert quality.pair_error(moved, moved_points, inside, points) > before + 50
    # the output likewise: hair and wall (outside its own hull grown by two pixels) do not count
    moved_hull = quality.signed_distance(quality.face_hull(moved.shape[:2], moved_points)) <= 2
    repainted = np.where(moved_hull[..., None], moved, 255 - moved)
    assert quality.pair_error(repainted, moved_points, pixels, points) == pytest.approx(before, abs=1e-9)
    # eyes and mouth are the inner face: changing the mouth alone raises the error
    mouth = quality._polygon(pixels.shape[:2], points[48:60])
    assert quality.pair_error(moved, moved_points, np.where(mouth[..., None], inverted, pixels), points) > before + 1
