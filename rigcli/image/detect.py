"""Find the face in a photo, its 68 landmarks and its 128-D identity embedding, with dlib.

The model files come from the ``face_recognition_models`` package. They are located by path with
``importlib.util.find_spec``; the package itself is never imported (its ``__init__`` needs the
removed ``pkg_resources``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from rigcli import RigError

MODEL_FILES = {
    "landmarks": "shape_predictor_68_face_landmarks.dat",
    "cnn": "mmod_human_face_detector.dat",
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
}


DETECTORS = ("hog", "cnn")


DETECT_MAX_SIDE = 1280
"""Photos are scanned for faces at most this large (long side); landmarks use the full photo."""


MIN_FACE_PX = 48
"""Smallest face box accepted, in original-photo pixels."""


WEAK_SCORE = 0.3
"""HOG hits scoring below this (e.g. the astronaut's badge) count only when nothing else is found."""


VERIFY_BOX_PX = 100
"""When HOG finds several faces, each is checked by the CNN detector at about this width."""


SIZE_TIE = 0.10
"""Faces whose widths differ by less than this fraction are a tie, broken by detector confidence."""


def models_dir() -> Path | None:
    """Folder holding the dlib model files, or None when face_recognition_models is not installed."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def model_path(key: str) -> Path:
    """Path of one dlib model file; a clear error says how to install it when missing."""
    folder = models_dir()
    path = folder / MODEL_FILES[key] if folder else None
    if path is None or not path.is_file():
        raise RigError(
            f"dlib model file {MODEL_FILES[key]} not found: install it with `pip install face_recognition_models`"
        )
    return path


@dataclass(frozen=True)
class FaceBox:
    """One detector hit in original-photo pixels: [x0, y0, x1, y1], the detector's score, and
    whether a second look with the CNN detector confirmed it (None: not checked)."""

    box: tuple[float, float, float, float]
    score: float
    verified: bool | None = None

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]


@dataclass
class Face:
    """The chosen face of a photo: box, 68 landmarks (x, y) and the other hits seen."""

    box: FaceBox
    landmarks: np.ndarray
    others: list[FaceBox] = field(default_factory=list)


def choose_face(hits: list[FaceBox]) -> tuple[FaceBox, list[FaceBox]]:
    """Pick the largest face; near-equal sizes (within SIZE_TIE) go to the more confident hit.

    Only hits the CNN confirmed are considered when any were; otherwise weak hits (score <
    WEAK_SCORE) are dropped when a strong one exists. Returns the choice and the other hits kept,
    so the report can say how many faces there were.
    """
    if not hits:
        raise ValueError("no hits to choose from")
    pool = candidate_hits(hits)
    widest = max(h.width for h in pool)
    tied = [h for h in pool if h.width >= widest * (1.0 - SIZE_TIE)]
    best = max(tied, key=lambda h: (h.score, h.width))
    return best, [h for h in pool if h is not best]


def candidate_hits(hits: list[FaceBox]) -> list[FaceBox]:
    """The hits worth considering: those the CNN confirmed when any were, else the strong ones."""
    return [h for h in hits if h.verified] or [h for h in hits if h.score >= WEAK_SCORE] or list(hits)


class FaceAnalyzer:
    """dlib's detector (HOG or CNN), 68-point shape predictor and face-recognition ResNet.

    Models load on first use and are kept, so one analyzer serves a whole album.
    """

    def __init__(self, detector: str = "hog") -> None:
        if detector not in DETECTORS:
            raise RigError(f"unknown detector {detector!r}; choose one of: {', '.join(DETECTORS)}")
        self.detector_name = detector
        self._detector = None
        self._predictor = None
        self._recognizer = None
        self._verifier = None

    def _dlib(self):
        import dlib

        if self._predictor is None:
            self._predictor = dlib.shape_predictor(str(model_path("landmarks")))
            if self.detector_name == "cnn":
                self._detector = dlib.cnn_face_detection_model_v1(str(model_path("cnn")))
            else:
                self._detector = dlib.get_frontal_face_detector()
        return dlib

    def _cnn(self):
        import dlib

        if self._verifier is None:
            self._verifier = dlib.cnn_face_detection_model_v1(str(model_path("cnn")))
        return self._verifier

    def verify(self, rgb: np.ndarray, hit: FaceBox) -> FaceBox:
        """Look again at one HOG hit with the CNN detector, on a 200 px crop around it (~0.25 s).

        HOG sometimes scores a round patch (the astronaut's mission badge) as high as a real face.
        """
        x0, y0, x1, y1 = hit.box
        cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, hit.width
        side = 2 * VERIFY_BOX_PX
        crop = Image.fromarray(rgb).transform(
            (side, side),
            Image.Transform.EXTENT,
            (cx - half, cy - half, cx + half, cy + half),
            Image.Resampling.BILINEAR,
        )
        found = self._cnn()(np.asarray(crop), 0)
        return replace(hit, verified=len(found) > 0)

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        """All face hits in an RGB photo, in original-photo pixels.

        Large photos are scanned at DETECT_MAX_SIDE; the scan upsamples once so faces down to about
        40 px are found (and can be reported as too small rather than missed).
        """
        self._dlib()
        height, width = rgb.shape[:2]
        scale = min(1.0, DETECT_MAX_SIDE / max(height, width))
        image = rgb
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))
        if self.detector_name == "cnn":
            found = [(d.rect, float(d.confidence)) for d in self._detector(image, 1)]
        else:
            rects, scores, _ = self._detector.run(image, 1, 0.0)
            found = list(zip(rects, (float(s) for s in scores), strict=True))
        hits = []
        for rect, score in found:
            # dlib boxes are inclusive pixel ranges; map the scan image's pixel edges back.
            x0, y0 = rect.left() / scale, rect.top() / scale
            x1, y1 = (rect.right() + 1) / scale, (rect.bottom() + 1) / scale
            hits.append(FaceBox((x0, y0, x1, y1), score))
        return hits

    def landmarks(self, rgb: np.ndarray, box: FaceBox) -> np.ndarray:
        """68 (x, y) landmarks, dlib's iBUG order, in photo pixels (pixel centres at integers)."""
        dlib = self._dlib()
        x0, y0, x1, y1 = box.box
        rect = dlib.rectangle(round(x0), round(y0), round(x1) - 1, round(y1) - 1)
        shape = self._predictor(rgb, rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    def embed(self, rgb: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """dlib's 128-D identity embedding of the face with these landmarks (same person: < 0.6)."""
        dlib = self._dlib()
        if self._recognizer is None:
            self._recognizer = dlib.face_recognition_model_v1(str(model_path("recognition")))
        points = [dlib.point(round(x), round(y)) for x, y in landmarks]
        x0, y0 = np.floor(landmarks.min(axis=0)).astype(int)
        x1, y1 = np.ceil(landmarks.max(axis=0)).astype(int)
        shape = dlib.full_object_detection(dlib.rectangle(int(x0), int(y0), int(x1), int(y1)), points)
        return np.array(self._recognizer.compute_face_descriptor(rgb, shape), dtype=np.float64)

    def find_faces(self, rgb: np.ndarray) -> list[Face]:
        """Every face worth considering (``candidate_hits``) with its landmarks, left to right."""
        hits = self.detect(rgb)
        if len(hits) > 1 and self.detector_name == "hog":
            hits = [self.verify(rgb, h) for h in hits]
        pool = sorted(candidate_hits(hits), key=lambda h: h.box[0] + h.box[2]) if hits else []
        return [Face(h, self.landmarks(rgb, h), [o for o in pool if o is not h]) for h in pool]

    def face_near(self, rgb: np.ndarray, points: np.ndarray) -> np.ndarray | None:
        """dlib's 68 landmarks in ``rgb`` of the face it detects nearest a known face (``points``: its
        landmarks; the landmarks' means within half that face's width of each other): the same face
        after an edit, never another face of a group photo. None where dlib finds no face there."""
        points = np.asarray(points, np.float64)
        width = float(np.ptp(points[:, 0]))
        found = [self.landmarks(rgb, hit) for hit in self.detect(rgb)]
        gaps = [float(np.linalg.norm(f.mean(0) - points.mean(0))) for f in found]
        best = int(np.argmin(gaps)) if gaps else None
        return found[best] if best is not None and gaps[best] < width / 2 else None

    def find_face(self, rgb: np.ndarray) -> Face | None:
        """The face to use in a photo (see choose_face), with its landmarks; None if there is none."""
        hits = self.detect(rgb)
        if not hits:
            return None
        if len(hits) > 1 and self.detector_name == "hog":
            hits = [self.verify(rgb, h) for h in hits]
        best, others = choose_face(hits)
        return Face(best, self.landmarks(rgb, best), others)
