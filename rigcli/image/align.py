"""FFHQ-style alignment: an oriented square from the eyes and mouth, resampled to size x size.

The square is the one the FFHQ dataset (and the paper's ``align`` step) uses: its axis follows the
eye line corrected by the eye-to-mouth direction, its half side is max(2 x eye distance,
1.8 x eye-to-mouth distance), and its centre sits 0.1 of the eye-to-mouth vector below the eyes.

Coordinates follow dlib's convention: pixel (row i, column j) has its centre at (x=j, y=i). The crop
is tied to the photo by a similarity transform ``crop_to_photo`` (a 2x3 matrix) so a later step can
paste edits back; ``photo_to_crop`` inverts it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

DEFAULT_SIZE = 256


SIZES = (256, 512)


# The 68-point (iBUG) index ranges the FFHQ recipe uses.
LEFT_EYE = slice(36, 42)  # the subject's right eye, on the image's left


RIGHT_EYE = slice(42, 48)


MOUTH_LEFT, MOUTH_RIGHT = 48, 54


@dataclass(frozen=True)
class Alignment:
    """An aligned crop and the similarity transform that maps crop pixels to photo pixels."""

    crop: np.ndarray
    crop_to_photo: np.ndarray  # 2x3: [x, y] = A @ [u, v] + t, with A a scaled rotation

    @property
    def photo_to_crop(self) -> np.ndarray:
        return invert_affine(self.crop_to_photo)


def ffhq_square(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre c and half-axes x (rightwards), y (downwards) of FFHQ's square, in photo pixels."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_left = lm[LEFT_EYE].mean(axis=0)
    eye_right = lm[RIGHT_EYE].mean(axis=0)
    eye_avg = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[MOUTH_LEFT] + lm[MOUTH_RIGHT]) / 2
    eye_to_mouth = mouth_avg - eye_avg
    # Turn eye_to_mouth a quarter turn (down -> right, along the eye line) and average the directions.
    x = eye_to_eye + np.array([eye_to_mouth[1], -eye_to_mouth[0]])
    x = x / np.hypot(*x)
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.array([-x[1], x[0]])
    center = eye_avg + eye_to_mouth * 0.1
    return center, x, y


def crop_transform(landmarks: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
    """2x3 matrix mapping crop pixel centres (u, v) to photo coordinates (x, y).

    The crop's outer corner (-0.5, -0.5) lands on the square's top-left corner c - x - y and
    (size - 0.5, size - 0.5) on c + x + y.
    """
    center, x, y = ffhq_square(landmarks)
    linear = np.stack([2 * x / size, 2 * y / size], axis=1)  # columns: du, dv
    offset = center - x - y + linear @ np.array([0.5, 0.5])
    return np.concatenate([linear, offset[:, None]], axis=1)


def eye_aspect(eye: np.ndarray) -> float:
    """An eye's opening over its width from its 6 iBUG landmarks in order (corner, upper, upper, corner,
    lower, lower): the two lid-to-lid distances' mean over the corner-to-corner distance."""
    eye = np.asarray(eye, np.float64)
    lids = np.linalg.norm(eye[1] - eye[5]) + np.linalg.norm(eye[2] - eye[4])
    return float(lids / (2 * max(np.linalg.norm(eye[3] - eye[0]), 1e-6)))


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine transform."""
    linear, offset = matrix[:, :2], matrix[:, 2]
    inv = np.linalg.inv(linear)
    return np.concatenate([inv, (-inv @ offset)[:, None]], axis=1)


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The 2x3 transform that applies ``inner`` first, then ``outer``."""
    linear = outer[:, :2] @ inner[:, :2]
    offset = outer[:, :2] @ inner[:, 2] + outer[:, 2]
    return np.concatenate([linear, offset[:, None]], axis=1)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (N, 2) points through a 2x3 affine transform."""
    pts = np.asarray(points, dtype=np.float64)
    return pts @ matrix[:, :2].T + matrix[:, 2]


def warp(rgb: np.ndarray, crop_to_photo: np.ndarray, size: int) -> np.ndarray:
    """Resample the photo into a size x size crop, reflecting the photo where the square leaves it.

    When the crop shrinks the photo by 2x or more, the photo is first box-filtered down by an
    integer factor so the bilinear lookup does not alias.
    """
    matrix = np.asarray(crop_to_photo, dtype=np.float64)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))  # photo pixels per crop pixel
    source = rgb
    shrink = int(np.floor(scale))
    if shrink >= 2:
        source = np.asarray(Image.fromarray(rgb).reduce(shrink))
        # reduced pixel (x', y') covers photo pixels [k x', k x' + k): centre at k x' + (k - 1) / 2
        back = np.array([[shrink, 0, (shrink - 1) / 2], [0, shrink, (shrink - 1) / 2]], dtype=np.float64)
        matrix = compose_affine(invert_affine(back), matrix)  # crop -> photo -> reduced photo
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    xs = matrix[0, 0] * u + matrix[0, 1] * v + matrix[0, 2]
    ys = matrix[1, 0] * u + matrix[1, 1] * v + matrix[1, 2]
    channels = [
        ndimage.map_coordinates(source[:, :, c].astype(np.float32), [ys, xs], order=1, mode="mirror")
        for c in range(source.shape[2])
    ]
    return np.clip(np.stack(channels, axis=2).round(), 0, 255).astype(np.uint8)


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int = DEFAULT_SIZE) -> Alignment:
    """The FFHQ-aligned crop of a photo from its 68 landmarks, with the transform back."""
    matrix = crop_transform(landmarks, size)
    return Alignment(warp(rgb, matrix, size), matrix)


def resize_affine(from_size: int, to_size: int) -> np.ndarray:
    """2x3: pixel centres of a crop of ``to_size`` -> the same crop at ``from_size`` (centres kept)."""
    k = from_size / to_size
    return np.array([[k, 0, 0.5 * k - 0.5], [0, k, 0.5 * k - 0.5]], dtype=np.float64)
