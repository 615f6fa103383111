"""What a retoucher sees in an edit, measured from dlib's 68 landmarks, never from rig's own fit: an
edit that fools the fit must not pass.

Per pair (input photo, output photo), each with the landmarks dlib finds in it:
- ``light_balance``: the skin's mean luminance left of the nose line over right of it (image sides);
- ``mouth_width``: mouth-corner distance over the outer eye-corner distance (the eye width);
- ``eye_opening``: the eyelids' mean opening over each eye's own width (both eyes);
- ``nose_offset``: the nose tip's offset from the eyes' midpoint along the eye line, in eye widths
  (> 0: toward the image's right);
- ``foreign_pixels``: output pixels in a band around the face (0.15 eye widths inside to 0.6 outside
  the hull of the jaw and brow landmarks) whose colour lies, in some channel, more than 25 levels
  outside the range the input shows around that pixel (a window a quarter of an eye width wide):
  paint over hair, a halo on the wall;
- ``colour_blotches``: the same test on chromaticity (r, g over r + g + b of 8-bit values + 8, tolerance
  0.025) over the hull grown by 0.3 eye widths: a change of the light's strength keeps chromaticity,
  speckle and blotches do not.
The regions are drawn from the input's landmarks (where the photo's face, hair and wall were).

``pair_error`` is issue 27's pairs measure: an edit of photo A asked to take photo B's pose,
expression and light, aligned to B by the similarity transform of their landmarks, against B itself.

``BOUNDS`` holds the bounds issue 26 sets on the edits it names, and ``misses`` says which of them an
edit misses: ``rig eval`` (evaluate/suite.py) and benchmarks/bench_quality.py both judge by them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull
from skimage.draw import polygon2mask

from rigcli.image.align import apply_affine, eye_aspect, invert_affine, warp

JAW_AND_BROWS = slice(0, 27)
NOSE_BRIDGE, NOSE_TIP = 27, 30
RIGHT_EYE, LEFT_EYE = slice(36, 42), slice(42, 48)  # the subject's right eye is on the image's left
OUTER_LIPS = slice(48, 60)
MOUTH_CORNERS = (48, 54)
OUTER_EYE_CORNERS = (36, 45)
LUMA = np.array([0.299, 0.587, 0.114])

BAND_INSIDE, BAND_OUTSIDE = 0.15, 0.6  # eye widths: the foreign-pixel band around the face's hull
BLOTCH_GROWTH = 0.3  # eye widths: the colour-blotch region, the hull grown this much
WINDOW = 0.25  # eye widths: the window the input's local colour range is taken over
LEVELS = 25  # 8-bit levels outside that range: a foreign pixel
CHROMA_OFFSET, CHROMA_TOLERANCE = 8.0, 0.025


def eye_width(points: np.ndarray) -> float:
    """The outer eye-corner distance: the unit every length here is measured in."""
    a, b = OUTER_EYE_CORNERS
    return float(np.linalg.norm(points[a] - points[b]))


def _polygon(shape: tuple[int, int], xy: np.ndarray) -> np.ndarray:
    """(H, W) bool: inside the polygon of (x, y) vertices."""
    return polygon2mask(shape, np.asarray(xy, np.float64)[:, ::-1])


def face_hull(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """(H, W) bool: the convex hull of the jaw and brow landmarks."""
    outline = np.asarray(points[JAW_AND_BROWS], np.float64)
    return _polygon(shape, outline[ConvexHull(outline).vertices])


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Pixels' distance to the mask's edge: negative inside, positive outside."""
    return ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)


def skin_mask(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    """(H, W) bool: the face's hull less the eyes and the lips (each grown by a tenth of an eye width)."""
    grow = max(1, round(0.1 * eye_width(points)))
    features = np.zeros(shape, bool)
    for part in (RIGHT_EYE, LEFT_EYE, OUTER_LIPS):
        features |= _polygon(shape, points[part])
    return face_hull(shape, points) & ~ndimage.binary_dilation(features, iterations=grow)


def light_balance(image: np.ndarray, points: np.ndarray) -> float:
    """Mean luminance of the skin on the image's left of the nose line over that on its right."""
    height, width = image.shape[:2]
    skin = skin_mask((height, width), points)
    top, tip = np.asarray(points[NOSE_BRIDGE], np.float64), np.asarray(points[NOSE_TIP], np.float64)
    ys, xs = np.mgrid[0:height, 0:width]
    along = tip - top
    side = along[0] * (ys - top[1]) - along[1] * (xs - top[0])  # > 0: left of the line, seen down the nose
    left = side > 0 if along[1] > 0 else side < 0
    luma = np.asarray(image, np.float64) @ LUMA
    return float(luma[skin & left].mean() / max(luma[skin & ~left].mean(), 1e-6))


def mouth_width(points: np.ndarray) -> float:
    a, b = MOUTH_CORNERS
    return float(np.linalg.norm(points[a] - points[b])) / eye_width(points)


def eye_opening(points: np.ndarray) -> float:
    """Mean over both eyes of the two lid-to-lid distances over the eye's corner-to-corner width."""
    return float(np.mean([eye_aspect(points[part]) for part in (RIGHT_EYE, LEFT_EYE)]))


def nose_offset(points: np.ndarray) -> float:
    """The nose tip's offset from the eyes' midpoint along the eye line (image left to right), in eye widths."""
    right_eye, left_eye = points[RIGHT_EYE].mean(0), points[LEFT_EYE].mean(0)
    axis = (left_eye - right_eye) / np.linalg.norm(left_eye - right_eye)
    return float((points[NOSE_TIP] - (left_eye + right_eye) / 2) @ axis) / eye_width(points)


def _outside_local_range(before: np.ndarray, after: np.ndarray, window: int, tolerance: float) -> np.ndarray:
    """(H, W) bool: where ``after`` lies, in some channel, more than ``tolerance`` outside the range
    ``before`` shows in the ``window`` x ``window`` pixels around it."""
    size = (window, window)
    out = np.zeros(before.shape[:2], bool)
    for c in range(before.shape[-1]):
        low = ndimage.minimum_filter(before[..., c], size=size, mode="nearest")
        high = ndimage.maximum_filter(before[..., c], size=size, mode="nearest")
        out |= (after[..., c] < low - tolerance) | (after[..., c] > high + tolerance)
    return out


def chromaticity(image: np.ndarray) -> np.ndarray:
    """(H, W, 2): r and g over r + g + b, of 8-bit values + CHROMA_OFFSET (dark pixels stay defined)."""
    rgb = np.asarray(image, np.float64) + CHROMA_OFFSET
    return rgb[..., :2] / rgb.sum(-1, keepdims=True)


def foreign_pixels(before: np.ndarray, after: np.ndarray, points: np.ndarray) -> float:
    """The share of the band around the face (``points``: the input's landmarks) whose output colour
    the input does not show nearby."""
    hull = face_hull(before.shape[:2], points)
    width = eye_width(points)
    distance = signed_distance(hull)
    band = (distance >= -BAND_INSIDE * width) & (distance <= BAND_OUTSIDE * width)
    window = max(3, round(WINDOW * width))
    foreign = _outside_local_range(np.asarray(before, np.float64), np.asarray(after, np.float64), window, LEVELS)
    return float(foreign[band].mean())


def colour_blotches(before: np.ndarray, after: np.ndarray, points: np.ndarray) -> float:
    """The share of the face (its hull grown by BLOTCH_GROWTH eye widths) whose output chromaticity
    the input does not show nearby."""
    hull = face_hull(before.shape[:2], points)
    width = eye_width(points)
    region = signed_distance(hull) <= BLOTCH_GROWTH * width
    window = max(3, round(WINDOW * width))
    blotched = _outside_local_range(chromaticity(before), chromaticity(after), window, CHROMA_TOLERANCE)
    return float(blotched[region].mean())


@dataclass(frozen=True)
class Quality:
    """An edit measured from dlib's landmarks on its input and on its output."""

    light_balance: tuple[float, float]  # input, output
    mouth_width: tuple[float, float]
    eye_opening: tuple[float, float]
    nose_offset: tuple[float, float]
    foreign_pixels: float
    colour_blotches: float


def face_window(shape: tuple[int, int], *point_sets: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the part of a photo every measure reads, for faces with these landmarks: the
    jaw and brows' bounding box grown by the foreign-pixel band and a window's width (in the first
    set's eye widths) and a pixel, clipped to the photo."""
    outline = np.concatenate([np.asarray(p, np.float64)[JAW_AND_BROWS] for p in point_sets])
    margin = (max(BAND_OUTSIDE, BLOTCH_GROWTH) + WINDOW) * eye_width(point_sets[0]) + 2
    (x0, y0), (x1, y1) = np.floor(outline.min(0) - margin), np.ceil(outline.max(0) + margin) + 1
    height, width = shape
    return max(0, int(x0)), max(0, int(y0)), min(width, int(x1)), min(height, int(y1))


def measure_quality(
    before: np.ndarray, before_points: np.ndarray, after: np.ndarray, after_points: np.ndarray
) -> Quality:
    """Every measure of one edit: the photo (H, W, 3) uint8 and its 68 landmarks, before and after.

    Measured on ``face_window`` of both photos, which holds every pixel any measure reads (and its
    filter windows): the same values as over the whole photo, in a tenth of the time on a large one."""
    x0, y0, x1, y1 = face_window(before.shape[:2], before_points, after_points)
    before, after = before[y0:y1, x0:x1], after[y0:y1, x0:x1]
    offset = np.array([x0, y0], np.float64)
    before_points, after_points = np.asarray(before_points) - offset, np.asarray(after_points) - offset
    pairs = [(f(before, before_points), f(after, after_points)) for f in (light_balance,)]
    pairs += [(f(before_points), f(after_points)) for f in (mouth_width, eye_opening, nose_offset)]
    return Quality(*pairs, foreign_pixels(before, after, before_points), colour_blotches(before, after, before_points))


# ---------------------------------------------------------------- issue 27's pairs measure


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """2x3: the least-squares similarity (rotation, uniform scale, translation; no reflection) that maps
    (N, 2) ``source`` points onto ``target`` (Umeyama 1991): landmarks place a face by where it is, how
    large and how tilted; a similarity keeps its shape, so what is left is the edit's own error."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    source_mean, target_mean = source.mean(0), target.mean(0)
    s, t = source - source_mean, target - target_mean
    u, d, vt = np.linalg.svd(t.T @ s / len(s))
    sign = np.diag([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt))])
    rotation = u @ sign @ vt
    scale = float(np.trace(np.diag(d) @ sign) / (s**2).sum(1).mean())
    offset = target_mean - scale * rotation @ source_mean
    return np.concatenate([scale * rotation, offset[:, None]], axis=1)


def align_to(
    image: np.ndarray, points: np.ndarray, shape: tuple[int, int], target_points: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` (its face's landmarks ``points``) resampled into a frame of ``shape`` (H, W) where those
    landmarks fall on ``target_points`` as nearly as a similarity can put them (``warp``: bilinear,
    box-filtered first when it shrinks 2x or more), and (H, W) bool: the pixels the image covers."""
    height, width = shape
    frame_to_image = invert_affine(similarity(points, target_points))
    aligned = warp(image, frame_to_image, max(height, width))[:height, :width]  # square, cut to the frame
    ys, xs = np.mgrid[0:height, 0:width]
    x, y = apply_affine(frame_to_image, np.stack([xs.ravel(), ys.ravel()], 1)).T
    covered = (x >= 0) & (x <= image.shape[1] - 1) & (y >= 0) & (y <= image.shape[0] - 1)
    return aligned, covered.reshape(height, width)


def pair_error(output: np.ndarray, output_points: np.ndarray, target: np.ndarray, target_points: np.ndarray) -> float:
    """Issue 27's pairs measure: the mean absolute difference, in 8-bit levels over all three channels,
    between ``target`` (photo B) and ``output`` (A edited to B's pose, expression and light) aligned to
    it by the similarity of their 68 landmarks (``align_to``), over B's inner face: the hull of its jaw
    and brows (eyes and mouth included), less what the aligned output does not cover. Only the face
    counts because only the face is edited (hair, clothes and wall stay A's); the similarity takes out
    where the face sits and how large, which the edit does not set, and keeps its shape, which it does."""
    shape = target.shape[:2]
    aligned, covered = align_to(output, output_points, shape, target_points)
    inner = face_hull(shape, target_points) & covered
    if not inner.any():
        raise ValueError("the aligned output covers none of the target's face")
    difference = np.abs(aligned.astype(np.float64) - np.asarray(target, np.float64))
    return float(difference[inner].mean())


# ---------------------------------------------------------------- issue 26's bounds

IDENTITY_BOUND = 0.40  # dlib's descriptor distance from the input, for every edit BOUNDS names
SHARE_BOUND = 0.005  # foreign pixels (around the face) or colour blotches (on it), as a fraction
NO_FACE = "no face found in the output"


@dataclass(frozen=True)
class Bound:
    """One bound issue 26 sets on an edit: what it asks, in words, and whether a Quality meets it."""

    text: str
    met: Callable[[Quality], bool]


def _light(rises: bool) -> Bound:
    """The skin's left/right ratio moves >= 0.25 the asked way and ends past 1.2 (left) or 0.85 (right)."""

    def met(q: Quality) -> bool:
        before, after = q.light_balance
        return after - before >= 0.25 and after > 1.2 if rises else before - after >= 0.25 and after < 0.85

    return Bound("left/right rises >= 0.25 to > 1.2" if rises else "left/right falls >= 0.25 to < 0.85", met)


def _turn(sign: float) -> Bound:
    """The nose tip moves >= 0.08 eye widths the asked way (a positive yaw: toward the image's right)."""

    def met(q: Quality) -> bool:
        return sign * (q.nose_offset[1] - q.nose_offset[0]) >= 0.08

    return Bound(f"nose tip >= 0.08 eye widths to the {'right' if sign > 0 else 'left'}", met)


BLOTCHES = Bound("colour blotches <= 0.5 %", lambda q: q.colour_blotches <= SHARE_BOUND)
FOREIGN = Bound("foreign pixels <= 0.5 %", lambda q: q.foreign_pixels <= SHARE_BOUND)

BOUNDS: dict[str, tuple[Bound, ...]] = {  # the edits issue 26 names (as `rig edit` writes them), and its bounds
    "light left": (_light(rises=True), BLOTCHES),
    "light right": (_light(rises=False), BLOTCHES),
    "smile 0.8": (Bound("mouth >= 8 % wider", lambda q: q.mouth_width[1] >= 1.08 * q.mouth_width[0]), FOREIGN),
    "blink 1": (Bound("eyelids <= half open", lambda q: q.eye_opening[1] <= 0.5 * q.eye_opening[0]), FOREIGN),
    "yaw 12": (_turn(1.0), FOREIGN),
    "yaw -12": (_turn(-1.0), FOREIGN),
}


def misses(label: str, quality: Quality | None, identity_distance: float | None) -> list[str]:
    """The bounds of BOUNDS[label] that an edit misses, in words (empty: it meets them all): the
    identity bound first; with no face found in the output (``quality`` None), NO_FACE alone."""
    if quality is None:
        return [NO_FACE]
    missed = [] if identity_distance is not None and identity_distance <= IDENTITY_BOUND else ["identity > 0.40"]
    return missed + [bound.text for bound in BOUNDS[label] if not bound.met(quality)]
