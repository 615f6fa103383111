"""Evaluation: does a model keep the person's identity, keep the photo, and do what the edit asked?

``rig eval`` runs a fixed suite of edits on photos of the person the model did not train on (held
out at fine-tune time, or new ones) and measures three things per edit:

- identity: dlib's 128-D face descriptor of the output against that of the input, as cosine and
  euclidean distance, and whether the pair is within dlib's same-person threshold (0.6);
- fidelity: PSNR and SSIM of the output against the input inside the fitted face mask
  (reconstruction only: there the output should be the input) and outside it (every edit: the
  background the inversion is meant to keep; outside the input's and the edited face's masks);
- edit accuracy: the output is fitted again by the face pipeline (landmarks, face model with the
  person's identity held, SH light) and compared with the edited parameters that were asked for:
  light direction error in degrees, mean blendshape weight error, yaw error in degrees.

Everything is measured at the model's resolution: the input is the aligned crop resized to it, as
the model sees it, so the resolution of a small model costs it nothing on fidelity. For dlib the
input and outputs are resized from there to the crop size in the same way, so resolution alone
does not move the identity distance either. Each photo is DDIM-inverted once and its edits are
sampled from the same x_T as one batch; inversion and sampling are deterministic, so a run repeats
exactly, and two models compared are given the same prepared photos and fits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rigcli import RigError
from rigcli.edit.controls import Controls
from rigcli.edit.editor import Editor, PreparedPhoto, area_resize, refine_photos
from rigcli.edit.sheets import buffer_tiles
from rigcli.enroll import collect_inputs
from rigcli.evaluate.metrics import (
    DECIMALS,
    SAME_PERSON,
    blendshape_error,
    detail_ratio,
    identity_distances,
    light_error_deg,
    photo_mask,
    yaw_error_deg,
)
from rigcli.evaluate.quality import BOUNDS, Quality, measure_quality, misses
from rigcli.face.params import FaceFit
from rigcli.image.align import warp
from rigcli.image.detect import FaceBox, choose_face
from rigcli.image.grid import to_uint8
from rigcli.image.metrics import psnr, ssim
from rigcli.image.photo import PhotoError
from rigcli.render.buffers import Rendered
from rigcli.render.compose import paste_back_crop
from rigcli.store import registered_models, registry_dir

LIGHT_SIDES = ("left", "right", "top", "bottom")


EXPRESSIONS = {"smile": 0.8, "jaw_open": 0.6, "blink": 1.0}


YAWS = (12.0, -12.0)  # issue 26's bounds are set at +-12 deg


KINDS = ("reconstruction", "light", "expression", "pose", "transfer")


SUITE_DOC = {
    "reconstruction": "no edit, inversion on: the output should be the input",
    "light": f"light from {', '.join(LIGHT_SIDES)} (rig edit --light SIDE)",
    "expression": ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in EXPRESSIONS.items()),
    "pose": ", ".join(f"yaw {y:+g} deg" for y in YAWS),
    "transfer": "light, expression and head pose of each other evaluated photo",
}


@dataclass
class SuiteEdit:
    """One edit of the suite: its type, a label, and the controls (transfers name their source photo)."""

    kind: str
    label: str
    controls: Controls


def suite(sources: Sequence[Path], index: int, labels: Sequence[str]) -> list[SuiteEdit]:
    """The fixed suite for photo ``index`` of ``sources``: reconstruction, 4 lights, 3 expressions,
    yaw +-12 deg, and a transfer from every other photo (its light, expression and pose). The labels
    are written as ``rig edit``'s options (``smile 0.8``, ``blink 1``, ``yaw -12``): quality.BOUNDS's keys."""
    edits = [SuiteEdit("reconstruction", "reconstruction", Controls())]
    edits += [SuiteEdit("light", f"light {side}", Controls(light=side)) for side in LIGHT_SIDES]
    edits += [
        SuiteEdit("expression", f"{name.replace('_', ' ')} {weight:g}", Controls(expression={name: weight}))
        for name, weight in EXPRESSIONS.items()
    ]
    edits += [SuiteEdit("pose", f"yaw {yaw:g}", Controls(yaw=yaw)) for yaw in YAWS]
    for j, source in enumerate(sources):
        if j != index:
            copy = Controls(light_from=source, expression_from=source, pose_from=source)
            edits.append(SuiteEdit("transfer", f"from {labels[j]}", copy))
    return edits


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def _face_box(editor: Editor, image: np.ndarray, fallback):
    """The detected face nearest the expected place (within a quarter of its width), else ``fallback``."""
    hits = editor.analyzer.detect(image)
    fx0, fy0, fx1, fy1 = fallback.box
    centre, width = np.array([(fx0 + fx1) / 2, (fy0 + fy1) / 2]), fx1 - fx0
    near = [h for h in hits if np.linalg.norm(np.array(h.box).reshape(2, 2).mean(0) - centre) < width / 4]
    return (max(near, key=lambda h: h.width), True) if near else (fallback, False)


def expected_box(editor: Editor, photo: PreparedPhoto):
    """Where the face is in the aligned crop: detected there, else the landmarks' bounding box."""

    hits = editor.analyzer.detect(photo.crop)
    if hits:
        return choose_face(hits)[0]
    lm = photo.crop_landmarks
    return FaceBox((*lm.min(0), *lm.max(0)), 0.0)


@dataclass
class Refit:
    """Images fitted again by the face pipeline: the fit, dlib descriptors, whether a face was detected."""

    fit: FaceFit
    descriptors: np.ndarray  # (N, 128)
    detected: list[bool]


def refit_images(
    editor: Editor, images: Sequence[np.ndarray], boxes: Sequence, on_image: Callable[[], None] | None = None
) -> Refit:
    """Landmarks, descriptor and face-model fit (identity held, SH light) of model-size images, in
    one batch (the landmark fit costs about the same for 1 image as for 50), by the estimator the
    inputs were fitted with, so that edit errors do not measure the gap between two estimators.

    Each image is resized to the crop size; landmarks come from the face dlib detects near its box
    (the input's face in the crop), or from the box itself when none is found there.
    """
    size = editor.crop_size
    big = [_resize(image, size) for image in images]
    landmarks, descriptors, detected = [], [], []
    for image, box in zip(big, boxes, strict=True):
        found, ok = _face_box(editor, image, box)
        points = editor.analyzer.landmarks(image, found)
        landmarks.append(points)
        descriptors.append(editor.analyzer.embed(image, points))
        detected.append(ok)
        if on_image:
            on_image()
    fit = editor.fit_images(np.stack(big), np.stack(landmarks))  # as the inputs were fitted: same estimator
    return Refit(fit, np.stack(descriptors), detected)


@dataclass(frozen=True)
class ModelSpec:
    """What to evaluate: a model (``person``: the person's fine-tuned one; a registered base model;
    or a model folder), DDIM steps and engine, and how the edit is made: the paper's edit at the
    model's size, or (``strength``) ``rig edit``'s at the photo's size."""

    model: str = "person"
    steps: int = 20
    engine: str = "torch"
    strength: float | None = None  # None: the paper's edit at the model's size; else rig edit's method

    @property
    def label(self) -> str:
        method = "" if self.strength is None else f" s={self.strength:g}"
        return f"{self.model}:{self.steps}@{self.engine}{method}"


def parse_spec(text: str, default: ModelSpec) -> ModelSpec:
    """``[MODEL][:STEPS][@ENGINE]`` with the parts left out taken from ``default``: ``generic`` (a base
    model, same steps and engine), ``:10`` (the same model at 10 steps), ``@onnx``, ``person:10@onnx``."""
    rest, engine = text, default.engine
    if "@" in rest:
        rest, engine = rest.rsplit("@", 1)
    steps = default.steps
    head, sep, tail = rest.rpartition(":")
    if sep and (tail.isdigit() or not tail):
        if not tail.isdigit():
            raise RigError(f"{text!r}: write MODEL[:STEPS][@ENGINE], e.g. generic, :10, @onnx, person:10@onnx")
        rest, steps = head, int(tail)
    if not 1 <= steps <= 1000:
        raise RigError(f"{text!r}: DDIM steps must be between 1 and 1000")
    if not engine:
        raise RigError(f"{text!r}: name an engine after '@' (torch, onnx, trt, ...)")
    return ModelSpec(rest or default.model, steps, engine)


def model_folder(store, name: str, model: str) -> Path:
    """The folder of a model spec's model: the person's fine-tuned one, a registered base, or a path."""

    if model == "person":
        return store.model_dir(name)
    if model in registered_models(store):
        return registry_dir(store) / model
    if (Path(model) / "model.json").is_file():
        return Path(model)
    known = ", ".join(["person", *registered_models(store)])
    raise RigError(f"no model {model!r}: name one of {known}, or a folder holding model.json")


@dataclass
class EvalPhoto:
    """A photo to evaluate on: a short label (stored photo id, or file name) and its file."""

    label: str
    path: Path


def eval_photos(store, name: str, holdout: int | None = None, photos: Sequence[Path] | None = None) -> list[EvalPhoto]:
    """The photos to evaluate on: ``photos`` (files or folders), or ``holdout`` of the photos the
    person's model was fine-tuned without (all of them when neither is given)."""

    store.require(name)
    if photos and holdout is not None:
        raise RigError("choose one of --holdout and --photos")
    if photos:
        files = collect_inputs(photos)
        stems = [p.stem for p in files]
        return [EvalPhoto(s if stems.count(s) == 1 else p.name, p) for s, p in zip(stems, files, strict=True)]
    meta = store.model_dir(name) / "model.json"
    recorded = (json.loads(meta.read_text()).get("holdout") or []) if meta.is_file() else []
    if not recorded:
        raise RigError(
            f"{name}'s model holds no photos out: fine-tune with `rig finetune {name} --holdout K`, "
            "or give new photos with --photos"
        )
    count = len(recorded) if holdout is None else holdout
    if not 1 <= count <= len(recorded):
        raise RigError(f"--holdout {count}: {name}'s model was fine-tuned with {len(recorded)} photo(s) held out")
    manifest = store.load(name)
    chosen = []
    for pid in recorded[:count]:
        record = manifest.find_photo(pid)
        if record is None:
            raise RigError(f"held-out photo {pid} is no longer in {name}'s album")
        chosen.append(EvalPhoto(pid[:8], store.person_dir(name) / record.original))
    return chosen


@dataclass
class EditRecord:
    """One evaluated edit: which photo and edit, its metrics, and the tiles the report shows."""

    photo: str
    kind: str
    label: str
    metrics: dict[str, float | bool | list[str] | None]
    tiles: list[np.ndarray] = field(default_factory=list)  # input, edited shaded, edited normal, output
    closeup: np.ndarray | None = None  # the full-size output around the face (``closeup_box``); None at model size


@dataclass
class ModelRun:
    """A model's results on the suite."""

    spec: ModelSpec
    folder: Path
    size: int
    edits: list[EditRecord]
    floor: dict[str, float]  # edit-accuracy errors of the inputs themselves, re-fitted the same way

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        return summarize(self.edits)


METRICS = (  # key, column title in the tables
    ("identity_euclidean", "id dist"),
    ("same_person", "same person"),
    ("identity_cosine", "id cos dist"),
    ("psnr_face", "PSNR face"),
    ("ssim_face", "SSIM face"),
    ("psnr_background", "PSNR bg"),
    ("ssim_background", "SSIM bg"),
    ("light_error_deg", "light err deg"),
    ("blendshape_error", "blend err"),
    ("yaw_error_deg", "yaw err deg"),
    ("detail_ratio", "detail kept"),
    ("seconds", "s/edit"),
)

QUALITY_METRICS = (  # key, column title: issue 26's measures of one edit (quality.py), at the photo's size
    ("light_balance_before", "L/R before"),
    ("light_balance_after", "L/R after"),
    ("mouth_width_ratio", "mouth after/before"),
    ("eye_opening_ratio", "eyelids after/before"),
    ("nose_offset_change", "nose moved (eye widths)"),
    ("foreign_pixels_pct", "foreign %"),
    ("colour_blotches_pct", "blotches %"),
)


def summarize(edits: Sequence[EditRecord]) -> dict[str, dict[str, float | int | None]]:
    """Per edit type: the count and the mean of every metric (``same_person``: the share within the
    threshold), rounded to DECIMALS; None where the metric does not apply."""
    out = {}
    for kind in KINDS:
        chosen = [e for e in edits if e.kind == kind]
        if not chosen:
            continue
        row: dict[str, float | int | None] = {"count": len(chosen)}
        for key, _ in METRICS:
            values = [float(e.metrics[key]) for e in chosen if e.metrics.get(key) is not None]
            row[key] = round(float(np.mean(values)), DECIMALS) if values else None
        out[kind] = row
    return out


def _to_model_input(crop: np.ndarray, size: int) -> np.ndarray:
    """The crop as the model sees it (``area_resize``, as Editor.run does), 8-bit range float (S, S, 3)."""
    return area_resize(crop[None], size)[0].permute(1, 2, 0).numpy()


def _masks_at(masks: np.ndarray, size: int) -> np.ndarray:
    """Crop-size face masks (B, C, C) at the model's size: a pixel is face when over half of it is."""
    small = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None].float(), size=(size, size), mode="area")
    return small[:, 0].numpy() > 0.5


@dataclass
class Sampled:
    """One photo's suite through one model, before measuring: what was asked and what came out."""

    photo: int
    edits: list[SuiteEdit]
    before: Rendered  # the photo's fit
    after: Rendered  # the edited parameters asked for, one per edit
    outputs: np.ndarray  # (N, S, S, 3) uint8
    buffers: torch.Tensor  # (N, 9, S, S) edited buffers
    target: np.ndarray  # (S, S, 3) the input at the model's size, 8-bit range float
    face_out: np.ndarray  # (N, S, S) the edited faces' masks
    seconds: float  # per edit: the photo's inversion and batched sampling over its edits
    detail: list[float] = field(default_factory=list)  # per edit: detail_ratio at the photo's size
    quality: list[Quality | None] = field(default_factory=list)  # per edit at the photo's size (None: no face)
    closeups: list[np.ndarray] = field(default_factory=list)  # per edit: the output around the face, full size

    @property
    def asked(self) -> FaceFit:
        return self.after.fit

    @property
    def shown(self) -> np.ndarray:
        return np.clip(self.target.round(), 0, 255).astype(np.uint8)


def sample_suite(
    editor: Editor,
    spec: ModelSpec,
    photos: Sequence[EvalPhoto],
    prepared: Sequence[PreparedPhoto],
    fit: FaceFit,
    seed: int = 0,
    on_edit: Callable[[str], None] | None = None,
) -> list[Sampled]:
    """Each photo inverted once under its own buffers, then every edit of the suite sampled from
    that x_T as one batch (the reconstruction first, which also yields x_T)."""

    size = editor.size
    results = []
    for i, photo in enumerate(prepared):
        edits, before, after = suite_edits(editor, photos, prepared, fit, i)
        rest = len(edits) - 1
        torch.manual_seed(seed)
        started = time.perf_counter()
        first, x_t = editor.run([photo], before, after.take([0]), steps=spec.steps, seed=seed)
        outs = [first]
        if on_edit:
            on_edit(edits[0].label)
        if rest:
            out, _ = editor.run(
                [photo] * rest, before.take([0] * rest), after.take(range(1, len(edits))), steps=spec.steps,
                seed=seed, start=x_t.expand(rest, -1, -1, -1),
            )  # fmt: skip
            outs.append(out)
        seconds = (time.perf_counter() - started) / len(edits)
        for edit in edits[1:]:
            if on_edit:
                on_edit(edit.label)
        outputs = to_uint8(torch.cat(outs))
        masks = after.faces
        face = photo_mask(before.faces[0], photo.crop_to_photo, photo.pixels.shape[:2])
        detail = [
            detail_ratio(photo.pixels, paste_back_crop(photo.pixels, out, photo.crop_to_photo, m), face)
            for out, m in zip(outputs, masks, strict=True)
        ]
        results.append(
            Sampled(i, edits, before, after, outputs, after.buffers, _to_model_input(photo.crop, size),
                    _masks_at(masks, size), seconds, detail)
        )  # fmt: skip
    return results


def suite_edits(
    editor: Editor, photos: Sequence[EvalPhoto], prepared: Sequence[PreparedPhoto], fit: FaceFit, i: int
) -> tuple[list[SuiteEdit], Rendered, Rendered]:
    """Photo ``i``'s suite, its fit and the edited parameters it asks for (one per edit), each rendered
    once for everything the suite asks of them."""
    sources = [p.source for p in prepared]
    edits = suite(sources, i, [p.label for p in photos])
    before = editor.render(fit.select([i]))
    reference = {sources[j]: fit.select([j]) for j in range(len(prepared)) if j != i}
    asked = FaceFit.cat([editor.edit_fit(before, e.controls, reference).fit for e in edits])
    return edits, before, editor.render(asked)


def sample_suite_method(
    editor: Editor,
    spec: ModelSpec,
    photos: Sequence[EvalPhoto],
    prepared: Sequence[PreparedPhoto],
    fit: FaceFit,
    batch: int = 8,
    on_edit: Callable[[str], None] | None = None,
) -> list[Sampled]:
    """Each photo's suite made as ``rig edit`` makes it (``refine_photos`` at ``spec.strength``, at the
    photo's size), ``batch`` edits at a time; measured on the aligned crops of the full-size outputs
    at the crop size (the photo's own pixels, not the model's size), and for detail and issue 26's
    measures (``measure_output``) at full size, where the output's close-up for the report is cut too."""
    size = editor.crop_size
    results = []
    for i, photo in enumerate(prepared):
        edits, before, after = suite_edits(editor, photos, prepared, fit, i)
        face = photo_mask(before.faces[0], photo.crop_to_photo, photo.pixels.shape[:2])
        x0, y0, x1, y1 = closeup_box(photo.landmarks, photo.pixels.shape[:2])
        outputs, detail, quality, closeups = [], [], [], []
        started, measuring = time.perf_counter(), 0.0
        for lo in range(0, len(edits), batch):
            chunk = list(range(lo, min(lo + batch, len(edits))))
            _, refined = refine_photos(
                editor, [photo] * len(chunk), before.take([0] * len(chunk)), after.take(chunk), spec.strength,
                spec.steps,
            )  # fmt: skip
            for k, result in zip(chunk, refined, strict=True):
                outputs.append(warp(result.image, photo.crop_to_photo, size))
                since = time.perf_counter()
                detail.append(detail_ratio(photo.pixels, result.image, face))
                quality.append(measure_output(editor.analyzer, photo, result.image))
                closeups.append(result.image[y0:y1, x0:x1].copy())
                measuring += time.perf_counter() - since
                if on_edit:
                    on_edit(edits[k].label)
        seconds = (time.perf_counter() - started - measuring) / len(edits)
        buffers = torch.nn.functional.interpolate(after.buffers, size=(size, size))  # one render, all edits
        results.append(
            Sampled(i, edits, before, after, np.stack(outputs), buffers, photo.crop.astype(np.float32),
                    after.faces, seconds, detail, quality, closeups)
        )  # fmt: skip
    return results


CLOSEUP_GROWTH = 1.7  # the close-up's side over the larger side of the landmarks' bounding box


def closeup_box(points: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): where the report's contact sheet looks at a photo and its outputs, at the
    photo's own pixels: a square CLOSEUP_GROWTH times the larger side of the 68 landmarks' bounding
    box, raised by an eighth of its side (the landmarks stop at the brows; the hair above is where paint
    shows), clipped to the photo."""
    low, high = np.asarray(points, np.float64).min(0), np.asarray(points, np.float64).max(0)
    side = CLOSEUP_GROWTH * float((high - low).max())
    cx, cy = (low + high) / 2 - np.array([0.0, side / 8])
    height, width = shape
    x0, y0 = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    return x0, y0, min(width, round(cx + side / 2)), min(height, round(cy + side / 2))


def measure_output(analyzer, photo: PreparedPhoto, image: np.ndarray) -> Quality | None:
    """Issue 26's measures of one full-size output against the prepared photo, from dlib's landmarks
    found in each (the photo's: those it was prepared with); None where no face is found in the output."""
    points = analyzer.face_near(image, photo.landmarks)
    return None if points is None else measure_quality(photo.pixels, photo.landmarks, image, points)


def quality_metrics(label: str, quality: Quality | None, identity: float, measured: bool) -> dict:
    """An edit's issue-26 keys for metrics.json: the measures (None where not ``measured``, the
    model-size path, or where no face was found in the output: ``quality_face_found`` says which)
    and ``quality_misses``, the bounds missed for an edit BOUNDS names (None for the others)."""
    named = measured and label in BOUNDS
    row = {key: None for key, _ in QUALITY_METRICS}
    row["quality_face_found"] = (quality is not None) if measured else None
    row["quality_misses"] = misses(label, quality, identity) if named else None
    if quality is None:
        return row
    mouth, eyes, nose = quality.mouth_width, quality.eye_opening, quality.nose_offset
    return row | {
        "light_balance_before": quality.light_balance[0],
        "light_balance_after": quality.light_balance[1],
        "mouth_width_ratio": mouth[1] / mouth[0],
        "eye_opening_ratio": eyes[1] / max(eyes[0], 1e-9),
        "nose_offset_change": nose[1] - nose[0],
        "foreign_pixels_pct": 100 * quality.foreign_pixels,
        "colour_blotches_pct": 100 * quality.colour_blotches,
    }


def measure(
    sampled: Sampled,
    refit: Refit,
    offset: int,
    fit: FaceFit,
    face_in: np.ndarray,
    label: str,
) -> tuple[list[EditRecord], dict[str, float]]:
    """Metrics of one photo's edits, given the re-fit of [input, outputs...] at ``offset`` in ``refit``;
    also the input's own re-fit errors (the measurement's floor). Light directions are compared over
    the visible skin of the face asked for (from the renders the suite was sampled with)."""

    one = fit.select([sampled.photo])
    asked_normals, own_normals = sampled.after.skin_normals, sampled.before.skin_normals[0]
    records = []
    for k, edit in enumerate(sampled.edits):
        got = refit.fit.select([offset + 1 + k])
        cosine, euclidean = identity_distances(refit.descriptors[offset], refit.descriptors[offset + 1 + k])
        output = sampled.outputs[k]
        background = ~(face_in | sampled.face_out[k])
        recon = edit.kind == "reconstruction"
        metrics = {
            "identity_cosine": cosine,
            "identity_euclidean": euclidean,
            "same_person": euclidean < SAME_PERSON,
            "psnr_face": psnr(output, sampled.target, face_in) if recon else None,
            "ssim_face": ssim(output, sampled.target, face_in) if recon else None,
            "psnr_background": psnr(output, sampled.target, background),
            "ssim_background": ssim(output, sampled.target, background),
            "light_error_deg": light_error_deg(got.light[0], sampled.asked.light[k], asked_normals[k]),
            "blendshape_error": blendshape_error(got.expression[0], sampled.asked.expression[k], one.expression[0]),
            "yaw_error_deg": yaw_error_deg(got.yaw[0], sampled.asked.yaw[k]),
            "detail_ratio": sampled.detail[k] if sampled.detail else None,
            "seconds": sampled.seconds,
            "face_detected": refit.detected[offset + 1 + k],
        }
        quality = sampled.quality[k] if sampled.quality else None
        metrics |= quality_metrics(edit.label, quality, euclidean, measured=bool(sampled.quality))
        metrics = {key: round(v, DECIMALS) if isinstance(v, float) else v for key, v in metrics.items()}
        tiles = [sampled.shown, *buffer_tiles(sampled.buffers[k]), output]
        closeup = sampled.closeups[k] if sampled.closeups else None
        records.append(EditRecord(label, edit.kind, edit.label, metrics, tiles, closeup))
    itself = refit.fit.select([offset])
    floor = {
        "light_error_deg": light_error_deg(itself.light[0], one.light[0], own_normals),
        "blendshape_error": blendshape_error(itself.expression[0], one.expression[0], one.expression[0]),
        "yaw_error_deg": yaw_error_deg(itself.yaw[0], one.yaw[0]),
    }
    return records, floor


@dataclass
class Evaluation:
    """Everything ``rig eval`` found: the photos, the seed, one run per model."""

    person: str
    photos: list[EvalPhoto]
    seed: int
    runs: list[ModelRun]
    closeups: dict[str, np.ndarray] = field(default_factory=dict)  # per photo label: the input at closeup_box


def edit_count(count: int) -> int:
    """Edits the suite makes on ``count`` photos."""
    return count * (1 + len(LIGHT_SIDES) + len(EXPRESSIONS) + len(YAWS) + count - 1)


def evaluate(
    store,
    name: str,
    photos: Sequence[EvalPhoto],
    specs: Sequence[ModelSpec],
    *,
    seed: int = 0,
    device: str = "cpu",
    on_progress: Callable[[str, int, int], None] | None = None,
) -> Evaluation:
    """Evaluate each model spec on the same photos: they are read, aligned and fitted once (the
    person's identity held) and every model gets those very inputs and the same seed; then every
    output of every model is fitted again in one batch and measured."""

    if not photos:
        raise RigError("no photos to evaluate on")
    editors = [Editor(store, name, model_folder(store, name, s.model), device, engine=s.engine) for s in specs]
    edits = edit_count(len(photos))
    total = len(specs) * (2 * edits + len(photos))
    done = 0

    def step(label: str) -> None:
        nonlocal done
        done += 1
        if on_progress:
            on_progress(label, done, total)

    prepared = []
    for photo in photos:
        try:
            prepared.append(editors[0].prepare(photo.path))
        except PhotoError as exc:
            raise RigError(f"cannot evaluate on {photo.path}: {exc}") from exc
        if on_progress:
            on_progress(f"reading {photo.label}", 0, total)
    if on_progress:
        on_progress("fitting the photos", 0, total)
    fit = editors[0].fit(prepared)
    sampled = []
    for spec, editor in zip(specs, editors, strict=True):
        on_edit = lambda e, s=spec: step(f"{s.label} {e}")  # noqa: E731
        if spec.strength is None:
            sampled.append(sample_suite(editor, spec, photos, prepared, fit, seed, on_edit=on_edit))
        else:
            sampled.append(sample_suite_method(editor, spec, photos, prepared, fit, on_edit=on_edit))
    boxes = [expected_box(editors[0], photo) for photo in prepared]
    images, image_boxes = [], []
    for per_model in sampled:
        for s in per_model:
            images += [s.shown, *s.outputs]
            image_boxes += [boxes[s.photo]] * (1 + len(s.outputs))
    refit = refit_images(editors[0], images, image_boxes, on_image=lambda: step("re-fitting the outputs"))
    runs, offset = [], 0
    for spec, editor, per_model in zip(specs, editors, sampled, strict=True):
        measured_at = editor.size if spec.strength is None else editor.crop_size
        face_in = _masks_at(editor.render(fit).faces, measured_at)
        records, floors = [], []
        for s in per_model:
            got, floor = measure(s, refit, offset, fit, face_in[s.photo], photos[s.photo].label)
            records += got
            floors.append(floor)
            offset += 1 + len(s.outputs)
        floor = {k: round(float(np.mean([f[k] for f in floors])), DECIMALS) for k in floors[0]}
        runs.append(ModelRun(spec, model_folder(store, name, spec.model), measured_at, records, floor))
    closeups = {}
    for photo, ready in zip(photos, prepared, strict=True):
        x0, y0, x1, y1 = closeup_box(ready.landmarks, ready.pixels.shape[:2])
        closeups[photo.label] = ready.pixels[y0:y1, x0:x1].copy()
    return Evaluation(name, list(photos), seed, runs, closeups)
