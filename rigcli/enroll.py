"""Add photos to a person: read, detect, align, embed and store each one; flag likely other people.

This is the Python API behind ``rig add-person``; the CLI only draws progress and tables. Each photo
is committed on its own (its files, then the manifest), so an interrupted run keeps every photo that
was fully processed and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rigcli import RigError
from rigcli.estimate import check_fit_options, make_estimator, resolve_estimator
from rigcli.estimate.landmarks import FITTER_VERSION
from rigcli.face.params import fit_from_json, photo_fit_json
from rigcli.face.registry import available, face_model_name, load_face_model
from rigcli.files import atomic_write_json, now_iso
from rigcli.image.align import DEFAULT_SIZE, SIZES, Alignment, align_face, apply_affine, invert_affine
from rigcli.image.detect import MIN_FACE_PX, Face, FaceAnalyzer
from rigcli.image.grid import draw_points, grid, mask_outline, unit_to_uint8
from rigcli.image.photo import IMAGE_EXTENSIONS, Photo, PhotoError, decode_photo, encode_png, read_photo
from rigcli.render.buffers import rasterize_fit, render_buffers
from rigcli.store import LockHolder, Manifest, PhotoRecord, Store, check_name

ADDED, DUPLICATE, NO_FACE, TOO_SMALL, UNREADABLE, OUTLIER = (
    "added",
    "duplicate",
    "no face",
    "too small",
    "unreadable",
    "outlier",
)


OUTLIER_DISTANCE = 0.5
"""A photo whose embedding is further than this from the album's median embedding is flagged.

dlib's own rule is "same person below 0.6" for a pair of faces; the median of an album sits closer to
each of its true members than they sit to each other, so its limit is tighter."""


MIN_ALBUM_FOR_OUTLIERS = 3


FIT_FILE = "fit.json"


FIT_SUMMARY_KEYS = ("face_model", "model_id", "estimator", "fitter_version", "fitted", "camera", "identity")


NO_MODEL_NOTE = (
    "no face model installed, so the photos were stored without a 3D fit: run `rig assets download-ict` "
    "(or `rig assets import-ict PATH`), then `rig refit {name}`"
)


@dataclass
class Outcome:
    """What happened to one input of an add: status is one of the six report words above."""

    source: Path
    status: str
    detail: str
    photo_id: str | None = None


@dataclass
class AddReport:
    """The result of an add: one outcome per input, and the person's manifest afterwards."""

    outcomes: list[Outcome]
    manifest: Manifest
    fit_note: str = ""  # what happened to the 3D fit (fitted, skipped and why)

    @property
    def usable(self) -> int:
        """Inputs that are now usable photos of the person (added, or already there)."""
        return sum(o.status in (ADDED, DUPLICATE) for o in self.outcomes)


@dataclass
class Analysis:
    """A photo that passed every check, with its face, aligned crop and identity embedding."""

    photo: Photo
    face: Face
    alignment: Alignment
    embedding: np.ndarray


def collect_inputs(inputs: Sequence[Path | str]) -> list[Path]:
    """Expand folders to the image files they hold (not recursive); refuse missing paths and empty folders."""
    if not inputs:
        raise RigError("no photos given: name image files or a folder of them")
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not images:
                raise RigError(f"{item} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
            found.extend(images)
        elif item.is_file():
            found.append(item)
        elif item.exists():
            raise RigError(f"{item} is neither a file nor a folder")
        else:
            raise RigError(f"{item} does not exist")
    unique = list(dict.fromkeys(p.absolute() for p in found))
    return unique


def photo_id(data: bytes) -> str:
    """A photo's id: the first 16 hex digits of the SHA-256 of its bytes (same photo, same id)."""
    return hashlib.sha256(data).hexdigest()[:16]


def analyze_face(photo: Photo, analyzer: FaceAnalyzer, min_face: float = MIN_FACE_PX) -> Face:
    """The photo's face with its landmarks; PhotoError(no face / too small) when there is none usable."""
    face = analyzer.find_face(photo.pixels)
    if face is None:
        hint = "" if analyzer.detector_name == "cnn" else " (the slower --detector cnn may find it)"
        raise PhotoError(f"no face found{hint}", NO_FACE)
    if face.box.width < min_face:
        raise PhotoError(f"face is {face.box.width:.0f} px wide; at least {min_face:.0f} px is needed", TOO_SMALL)
    return face


PERSON_DISTANCE = 0.6  # dlib's "same person" limit: a face further than this from the album is someone else
NOT_PERSON = "not the person"


def person_face(
    photo: Photo,
    analyzer: FaceAnalyzer,
    album: np.ndarray,
    name: str,
    face: int | None = None,
    min_face: float = MIN_FACE_PX,
) -> Face:
    """The face of person ``name`` in a photo: of several, the one closest (dlib distance to the
    median of ``album``, their (N, 128) embeddings) to the album, not the largest; PhotoError
    ``not NAME`` when none is within PERSON_DISTANCE. ``face`` (1-based, left to right) picks one
    instead, unchecked."""
    faces = analyzer.find_faces(photo.pixels)
    if not faces:
        return analyze_face(photo, analyzer, min_face)  # the usual "no face" error
    if face is not None:
        if not 1 <= face <= len(faces):
            raise PhotoError(f"--face {face}: the photo has {len(faces)} face(s)", NO_FACE)
        chosen = faces[face - 1]
    else:
        centre = np.median(np.asarray(album, np.float64), axis=0)
        dist = [float(np.linalg.norm(analyzer.embed(photo.pixels, f.landmarks) - centre)) for f in faces]
        best = int(np.argmin(dist))
        if dist[best] > PERSON_DISTANCE:
            raise PhotoError(f"not {name}: the nearest face is {dist[best]:.2f} from {name}'s album", NOT_PERSON)
        chosen = faces[best]
    if chosen.box.width < min_face:
        raise PhotoError(f"face is {chosen.box.width:.0f} px wide; at least {min_face:.0f} px is needed", TOO_SMALL)
    return chosen


def analyze(photo: Photo, analyzer: FaceAnalyzer, size: int = DEFAULT_SIZE, min_face: float = MIN_FACE_PX) -> Analysis:
    """Detect, landmark, align and embed one decoded photo; PhotoError(no face / too small) otherwise."""
    face = analyze_face(photo, analyzer, min_face)
    alignment = align_face(photo.pixels, face.landmarks, size)
    embedding = analyzer.embed(photo.pixels, face.landmarks)
    return Analysis(photo, face, alignment, embedding)


def outlier_distances(embeddings: dict[str, np.ndarray]) -> dict[str, float]:
    """Distance of each embedding from the album's element-wise median (empty for tiny albums)."""
    if len(embeddings) < MIN_ALBUM_FOR_OUTLIERS:
        return {}
    ids = list(embeddings)
    stack = np.stack([embeddings[i] for i in ids])
    median = np.median(stack, axis=0)
    return {i: float(d) for i, d in zip(ids, np.linalg.norm(stack - median, axis=1), strict=True)}


def flag_outliers(manifest: Manifest, embeddings: dict[str, np.ndarray]) -> None:
    """Set each photo's status, distance and training flag from the album's current median."""
    distances = outlier_distances({p.id: embeddings[p.id] for p in manifest.photos if p.id in embeddings})
    for record in manifest.photos:
        distance = distances.get(record.id)
        record.outlier_distance = None if distance is None else round(distance, 4)
        record.status = OUTLIER if distance is not None and distance > OUTLIER_DISTANCE else "ok"
        record.train = record.status == "ok" or manifest.keep_outliers


def read_face(store: Store, name: str, record: PhotoRecord) -> dict:
    """The per-photo face file (box, landmarks, transform, embedding) of a stored photo."""
    return json.loads((store.person_dir(name) / record.face).read_text())


def album_embeddings(store: Store, name: str, manifest: Manifest) -> dict[str, np.ndarray]:
    """The stored 128-D embedding of each photo in the manifest, by photo id."""
    return {r.id: np.asarray(read_face(store, name, r)["embedding"], dtype=np.float64) for r in manifest.photos}


def _face_json(pid: str, source: str, analysis: Analysis, detector: str) -> dict:
    face = analysis.face
    return {
        "id": pid,
        "source": source,
        "image_size": list(analysis.photo.size),
        "detector": detector,
        "face_box": [round(v, 2) for v in face.box.box],
        "detector_score": round(face.box.score, 4),
        "other_faces": [{"face_box": [round(v, 2) for v in o.box], "score": round(o.score, 4)} for o in face.others],
        "landmarks": [[round(x, 2), round(y, 2)] for x, y in face.landmarks],
        "crop_size": int(analysis.alignment.crop.shape[0]),
        "crop_to_photo": [[round(v, 8) for v in row] for row in analysis.alignment.crop_to_photo],
        "embedding": [round(float(v), 7) for v in analysis.embedding],
    }


def _added_detail(analysis: Analysis) -> str:
    face = analysis.face
    detail = f"face {face.box.width:.0f} px"
    if face.others:
        detail += f"; {len(face.others) + 1} faces found, used the largest"
    return detail


def _outlier_detail(record: PhotoRecord, keep: bool) -> str:
    use = "kept for training (--keep-outliers)" if keep else "kept out of training (--keep-outliers uses it)"
    return (
        f"may be someone else: {record.outlier_distance:.2f} from the album's median face "
        f"(limit {OUTLIER_DISTANCE}); {use}"
    )


def add_photos(
    store: Store,
    name: str,
    inputs: Sequence[Path | str],
    *,
    detector: str = "hog",
    size: int | None = None,
    min_face: float = MIN_FACE_PX,
    keep_outliers: bool | None = None,
    on_start: Callable[[int, Path], None] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_wait: Callable[[LockHolder | None], None] | None = None,
    on_fit: Callable[[int, int], None] | None = None,
    face_model: str | None = None,
    estimator: str | None = None,
) -> AddReport:
    """Add photos (files or folders) to ``name``, creating the person on the first usable photo,
    then fit the face model to the album when one is installed.

    ``keep_outliers`` None keeps the person's setting. ``on_start(index, path)``, ``on_outcome(outcome)``
    and ``on_fit(step, steps)`` report progress. ``face_model`` ('ict' or 'flame'; None keeps the
    person's current one, else ICT) and ``estimator`` are as for ``refit``. Returns the outcomes and
    the final manifest.
    """
    check_name(name)
    if face_model is not None:
        check_fit_options(store, face_model, estimator)  # before any photo is stored
    paths = collect_inputs(inputs)
    if size is not None and size not in SIZES:
        raise RigError(f"unsupported crop size {size}; choose one of {', '.join(map(str, SIZES))}")
    analyzer = FaceAnalyzer(detector)
    outcomes: list[Outcome] = []

    def report(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)

    with store.locked(name, on_wait=on_wait):
        if store.exists(name):
            manifest = store.load(name)
            if size is not None and size != manifest.align_size:
                raise RigError(
                    f"{name}'s photos are aligned at {manifest.align_size} px; --size {size} would mix sizes"
                )
        else:
            store.check_new_name(name)
            manifest = Manifest(name, now_iso(), now_iso(), size or DEFAULT_SIZE)
        if keep_outliers is not None:
            manifest.keep_outliers = keep_outliers
        embeddings = album_embeddings(store, name, manifest)
        for index, path in enumerate(paths):
            if on_start:
                on_start(index, path)
            try:
                data = path.read_bytes()
            except OSError as exc:
                report(Outcome(path, UNREADABLE, f"cannot read: {exc.strerror or exc}"))
                continue
            pid = photo_id(data)
            known = manifest.find_photo(pid)
            if known is not None:
                report(Outcome(path, DUPLICATE, f"same content as photo {pid} ({known.source})", pid))
                continue
            try:
                analysis = analyze(decode_photo(data), analyzer, manifest.align_size, min_face)
            except PhotoError as exc:
                report(Outcome(path, exc.reason, str(exc)))
                continue
            record = PhotoRecord(
                id=pid,
                source=path.name,
                original=f"photos/{pid}{analysis.photo.extension}",
                aligned=f"aligned/{pid}.png",
                face=f"faces/{pid}.json",
                added=now_iso(),
            )
            # files first, manifest last: a kill in between leaves only unreferenced files
            store.write_file(name, record.original, data)
            store.write_file(name, record.aligned, encode_png(analysis.alignment.crop))
            face = _face_json(pid, path.name, analysis, detector)
            store.write_file(name, record.face, (json.dumps(face, indent=1) + "\n").encode())
            manifest.photos.append(record)
            embeddings[pid] = analysis.embedding
            flag_outliers(manifest, embeddings)
            store.save(manifest)
            report(Outcome(path, ADDED, _added_detail(analysis), pid))
        flag_outliers(manifest, embeddings)
        fit_note = ""
        if manifest.photos:
            store.save(manifest)
            fit_note = _fit_after_add(store, name, manifest, outcomes, on_fit, face_model, estimator)
    for outcome in outcomes:
        record = manifest.find_photo(outcome.photo_id) if outcome.status == ADDED else None
        if record is not None and record.status == OUTLIER:
            outcome.status, outcome.detail = OUTLIER, _outlier_detail(record, manifest.keep_outliers)
    return AddReport(outcomes, manifest, fit_note)


def _fit_after_add(
    store: Store, name: str, manifest: Manifest, outcomes: list[Outcome], on_fit, face_model=None, estimator=None
) -> str:

    current = read_fit(store, name)
    wanted = face_model or face_model_name(current)
    if not available(store, wanted):
        if face_model is None and wanted != "ict":
            return f"{name} is fitted with {wanted}, which is not imported now: the fit was not updated"
        return NO_MODEL_NOTE.format(name=name)
    model = load_face_model(store, wanted)
    estimator = resolve_estimator(store, wanted, estimator)
    changed = any(o.status == ADDED for o in outcomes)
    if (
        current
        and not changed
        and current["model_id"] == model.model_id
        and current.get("estimator", "landmarks") == estimator
        and set(current["photos"]) == {p.id for p in manifest.photos}
    ):
        return "3D fit unchanged"
    doc = fit_person(store, name, manifest, model, on_fit, estimator)
    worst = max(p["landmark_error"] for p in doc["photos"].values())
    return f"fitted {model.name} to {len(doc['photos'])} photos (worst landmark error {worst:.3f} of eye distance)"


def crop_landmarks(face: dict) -> np.ndarray:
    """A photo's 68 landmarks in its aligned crop's pixels."""
    return apply_affine(invert_affine(np.asarray(face["crop_to_photo"])), face["landmarks"])


def read_fit(store: Store, name: str) -> dict | None:
    """The person's stored 3D fit (``fit.json``), or None before the first fit."""
    path = store.person_dir(name) / FIT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def fit_person(store: Store, name: str, manifest: Manifest, model, on_fit=None, estimator: str = "landmarks") -> dict:
    """Fit the face model to all of a person's photos and store it (the caller holds the lock).

    With the landmark fitter, the identity is fitted on the photos used for training, shared by all
    of them; outliers are fitted with that identity held fixed, as a new photo is at edit time. With
    ``estimator='deca'`` (FLAME), DECA's encoder regresses each photo's parameters and the person's
    shape is the mean of its shapes over the training photos, as the paper fixed it.
    """

    folder = store.person_dir(name)
    records = manifest.photos
    landmarks = np.stack([crop_landmarks(read_face(store, name, r)) for r in records])
    train = [i for i, r in enumerate(records) if r.train] or list(range(len(records)))
    crops = np.stack([read_photo(folder / r.aligned).pixels for r in records])
    fit = make_estimator(store, estimator).fit(model, crops, landmarks, identity_rows=train, progress=on_fit)
    doc = {
        "face_model": model.name,
        "model_id": model.model_id,
        "estimator": estimator,
        "fitter_version": FITTER_VERSION,
        "fitted": now_iso(),
        "crop_size": manifest.align_size,
        "camera": "weak perspective: u = s*x + tx, v = -s*y + ty in crop pixels, after yaw/pitch/roll",
        "identity": [round(float(v), 5) for v in fit.identity],
        "photos": {r.id: photo_fit_json(fit, i, model.expression_names) for i, r in enumerate(records)},
    }
    atomic_write_json(folder / FIT_FILE, doc)
    return doc


def refit(
    store: Store, name: str, on_fit=None, on_wait=None, face_model: str | None = None, estimator: str | None = None
) -> dict:
    """Fit the person's album again (after the fitter or the face model changed).

    ``face_model`` ('ict' or 'flame') None keeps the person's current model (ICT for a person never
    fitted); ``estimator`` ('landmarks' or 'deca') None uses DECA for FLAME when its weights are imported.
    """

    store.require(name)
    current = read_fit(store, name)
    wanted = face_model or face_model_name(current)
    check_fit_options(store, wanted, estimator)
    model = load_face_model(store, wanted)
    estimator = resolve_estimator(store, wanted, estimator)
    with store.locked(name, on_wait=on_wait):
        manifest = store.load(name)
        if not manifest.photos:
            raise RigError(f"{name} has no photos to fit")
        return fit_person(store, name, manifest, model, on_fit, estimator)


def remove_photo(store: Store, name: str, photo: str) -> PhotoRecord:
    """Remove one photo (by id or a unique id prefix of at least 4 digits) and its files."""
    store.require(name)
    with store.locked(name):
        manifest = store.load(name)
        matches = [p for p in manifest.photos if p.id == photo] or (
            [p for p in manifest.photos if p.id.startswith(photo)] if len(photo) >= 4 else []
        )
        if not matches:
            ids = ", ".join(p.id for p in manifest.photos) or "none"
            raise RigError(f"{name} has no photo {photo!r} (photo ids: {ids})")
        if len(matches) > 1:
            raise RigError(f"photo id prefix {photo!r} is ambiguous: {', '.join(p.id for p in matches)}")
        record = matches[0]
        manifest.photos.remove(record)
        flag_outliers(manifest, album_embeddings(store, name, manifest))
        store.save(manifest)  # the manifest forgets the photo before its files go
        fit = read_fit(store, name)
        if fit and record.id in fit["photos"]:
            del fit["photos"][record.id]
            atomic_write_json(store.person_dir(name) / FIT_FILE, fit)
        store.remove_files(name, [record.original, record.aligned, record.face])
    return record


def describe(store: Store, name: str) -> dict:
    """A person as one JSON-ready object: manifest fields plus each photo's face data and paths."""
    manifest = store.load(name)
    folder = store.person_dir(name)
    fit = read_fit(store, name)
    fitted = fit["photos"] if fit else {}
    photos = []
    for record in manifest.photos:
        face = read_face(store, name, record)
        photos.append(
            {
                "id": record.id,
                "source": record.source,
                "status": record.status,
                "train": record.train,
                "outlier_distance": record.outlier_distance,
                "added": record.added,
                "face_box": face["face_box"],
                "landmarks": face["landmarks"],
                "image_size": face["image_size"],
                "detector": face["detector"],
                "crop_to_photo": face["crop_to_photo"],
                "original": str(folder / record.original),
                "aligned": str(folder / record.aligned),
                "fit": fitted.get(record.id),
            }
        )
    return {
        "name": manifest.name,
        "created": manifest.created,
        "updated": manifest.updated,
        "schema_version": manifest.schema_version,
        "align_size": manifest.align_size,
        "keep_outliers": manifest.keep_outliers,
        "folder": str(folder),
        "face_fit": None if fit is None else {k: fit.get(k) for k in FIT_SUMMARY_KEYS},
        "model": _model_summary(folder),
        "photos": photos,
    }


def _model_summary(folder) -> dict | None:
    """What `finetune` left in the person's folder: base, steps, final loss, when."""
    path = folder / "model" / "model.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    keys = ("base", "from_scratch", "steps", "final_loss", "trained", "face_model_id")
    return {k: info.get(k) for k in keys} | {"preset_size": info["config"]["image_size"]}


def aligned_sheet(store, name: str, columns: int = 6) -> np.ndarray:
    """Every aligned crop of a person with its 68 landmarks mapped into the crop: a check by eye."""

    tiles = []
    for record in store.load(name).photos:
        crop = read_photo(store.person_dir(name) / record.aligned).pixels
        tiles.append(draw_points(crop, crop_landmarks(read_face(store, name, record))))
    if not tiles:
        raise ValueError(f"{name} has no photos")
    return grid(tiles, columns=min(columns, len(tiles)))


def fit_sheet(store, name: str) -> np.ndarray:
    """Per photo a row: crop with landmarks and mesh outline | shaded | normal | albedo buffers."""

    doc = read_fit(store, name)
    if doc is None:
        raise RigError(f"{name} has no 3D fit yet: run `rig refit {name}`")
    model = load_face_model(store, face_model_name(doc))
    records = [r for r in store.load(name).photos if r.id in doc["photos"]]
    fit = fit_from_json([doc["photos"][r.id] for r in records], doc["identity"], model.expression_names)
    size = doc["crop_size"]
    geometry = rasterize_fit(model, fit, size)
    buffers = render_buffers(model, fit, size, geometry).permute(0, 2, 3, 1).numpy()
    masks = geometry.fragments.mask.numpy()
    tiles = []
    for i, record in enumerate(records):
        crop = read_photo(store.person_dir(name) / record.aligned).pixels.copy()
        crop[mask_outline(masks[i])] = (255, 64, 64)
        crop = draw_points(crop, crop_landmarks(read_face(store, name, record)))
        shaded, normal, albedo = buffers[i, ..., 0:3], buffers[i, ..., 3:6], buffers[i, ..., 6:9]
        normal = np.where(masks[i][..., None], normal * 0.5 + 0.5, 0.0)  # [-1, 1] shown as [0, 1]
        tiles += [crop, *(unit_to_uint8(image) for image in (shaded, normal, albedo))]
    return grid(tiles, columns=4)
