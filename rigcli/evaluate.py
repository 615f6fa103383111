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

import base64
import hashlib
import html
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rigcli import RigError
from rigcli.edit import Controls, Editor, PreparedPhoto, apply_controls
from rigcli.fit import FaceFit

SAME_PERSON = 0.6  # dlib's threshold on the euclidean descriptor distance
PSNR_CAP = 100.0  # dB, for identical images (keeps metrics.json valid JSON: no Infinity)
DECIMALS = 4  # every number in metrics.json and report.html is round(value, 4)
ACTIVE = 0.1  # a blendshape at this weight or more counts as part of the asked expression

LIGHT_SIDES = ("left", "right", "top", "bottom")
EXPRESSIONS = {"smile": 0.8, "jaw_open": 0.6, "blink": 1.0}
YAWS = (15.0, -15.0)
KINDS = ("reconstruction", "light", "expression", "pose", "transfer")

SUITE_DOC = {
    "reconstruction": "no edit, inversion on: the output should be the input",
    "light": f"light from {', '.join(LIGHT_SIDES)} (rig edit --light SIDE)",
    "expression": ", ".join(f"{k} {v}" for k, v in EXPRESSIONS.items()),
    "pose": ", ".join(f"yaw {y:+.0f} deg" for y in YAWS),
    "transfer": "light, expression and head pose of each other evaluated photo",
}

# ---------------------------------------------------------------- the suite


@dataclass
class SuiteEdit:
    """One edit of the suite: its type, a label, and the controls (transfers name their source photo)."""

    kind: str
    label: str
    controls: Controls


def suite(sources: Sequence[Path], index: int, labels: Sequence[str]) -> list[SuiteEdit]:
    """The fixed suite for photo ``index`` of ``sources``: reconstruction, 4 lights, 3 expressions,
    yaw +-15 deg, and a transfer from every other photo (its light, expression and pose)."""
    edits = [SuiteEdit("reconstruction", "reconstruction", Controls())]
    edits += [SuiteEdit("light", f"light {side}", Controls(light=side)) for side in LIGHT_SIDES]
    edits += [
        SuiteEdit("expression", f"{name.replace('_', ' ')} {weight}", Controls(expression={name: weight}))
        for name, weight in EXPRESSIONS.items()
    ]
    edits += [SuiteEdit("pose", f"yaw {yaw:+.0f}", Controls(yaw=yaw)) for yaw in YAWS]
    for j, source in enumerate(sources):
        if j != index:
            copy = Controls(light_from=source, expression_from=source, pose_from=source)
            edits.append(SuiteEdit("transfer", f"from {labels[j]}", copy))
    return edits


# ---------------------------------------------------------------- metrics


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """PSNR in dB of 8-bit-range images (H, W, 3) over the pixels of ``mask`` (None: all); capped at
    PSNR_CAP for identical pixels; None when the mask is empty."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    if mask is not None:
        if not mask.any():
            return None
        diff = diff[mask]
    mse = float(diff.mean())
    return PSNR_CAP if mse <= 255.0**2 * 10 ** (-PSNR_CAP / 10) else 10 * math.log10(255.0**2 / mse)


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """SSIM at every pixel (Wang et al. 2004: Gaussian window, sigma 1.5, K1 0.01, K2 0.03), averaged
    over colour channels: (H, W, C) x 2 -> (H, W)."""
    from scipy.ndimage import gaussian_filter

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    maps = []
    for c in range(x.shape[2]):
        blur = lambda im: gaussian_filter(im, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
        xc, yc = x[..., c], y[..., c]
        mx, my = blur(xc), blur(yc)
        vx, vy, cov = blur(xc * xc) - mx * mx, blur(yc * yc) - my * my, blur(xc * yc) - mx * my
        maps.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return np.mean(maps, axis=0)


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Mean SSIM over the pixels of ``mask`` (None: all); None when the mask is empty."""
    values = ssim_map(a, b)
    if mask is None:
        return float(values.mean())
    return float(values[mask].mean()) if mask.any() else None


def identity_distances(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Cosine distance (1 - cos) and euclidean distance of two face descriptors."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cosine = 1.0 - float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12)
    return cosine, float(np.linalg.norm(a - b))


def light_error_deg(got: torch.Tensor, asked: torch.Tensor) -> float:
    """Angle in degrees between the dominant directions of two SH lights (9, 3)."""
    from rigcli.render import dominant_direction

    cos = (dominant_direction(got.double()) * dominant_direction(asked.double())).sum().clamp(-1, 1)
    return math.degrees(math.acos(float(cos)))


def blendshape_error(got: torch.Tensor, asked: torch.Tensor, before: torch.Tensor) -> float:
    """Mean |got - asked| over the blendshapes the edit sets (changed from ``before``) or that are
    active (>= ACTIVE) in what was asked; over all of them when there are none."""
    involved = ((asked - before).abs() > 1e-6) | (asked >= ACTIVE)
    if not involved.any():
        involved = torch.ones_like(asked, dtype=torch.bool)
    return float((got - asked).abs()[involved].mean())


def yaw_error_deg(got: torch.Tensor, asked: torch.Tensor) -> float:
    return abs(math.degrees(float(got - asked)))


# ---------------------------------------------------------------- re-fitting outputs


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

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
    from rigcli.detect import FaceBox, choose_face

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


# ---------------------------------------------------------------- running the suite


@dataclass(frozen=True)
class ModelSpec:
    """What to evaluate: a model (``person``: the person's fine-tuned one; a registered base model;
    or a model folder), DDIM steps and engine."""

    model: str = "person"
    steps: int = 20
    engine: str = "torch"

    @property
    def label(self) -> str:
        return f"{self.model}:{self.steps}@{self.engine}"


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
    from rigcli.train import registered_models, registry_dir

    if model == "person":
        return store.person_dir(name) / "model"
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
    from rigcli.enroll import collect_inputs

    store.require(name)
    if photos and holdout is not None:
        raise RigError("choose one of --holdout and --photos")
    if photos:
        files = collect_inputs(photos)
        stems = [p.stem for p in files]
        return [EvalPhoto(s if stems.count(s) == 1 else p.name, p) for s, p in zip(stems, files, strict=True)]
    meta = store.person_dir(name) / "model" / "model.json"
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
    metrics: dict[str, float | bool | None]
    tiles: list[np.ndarray] = field(default_factory=list)  # input, edited shaded, edited normal, output


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
    ("seconds", "s/edit"),
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
    """The crop as the model sees it (area-resized, as Editor.run does), 8-bit range float."""
    image = torch.from_numpy(crop).permute(2, 0, 1)[None].float()
    return torch.nn.functional.interpolate(image, size=(size, size), mode="area")[0].permute(1, 2, 0).numpy()


def _masks_at(masks: np.ndarray, size: int) -> np.ndarray:
    """Crop-size face masks (B, C, C) at the model's size: a pixel is face when over half of it is."""
    small = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None].float(), size=(size, size), mode="area")
    return small[:, 0].numpy() > 0.5


@dataclass
class Sampled:
    """One photo's suite through one model, before measuring: what was asked and what came out."""

    photo: int
    edits: list[SuiteEdit]
    asked: FaceFit  # the edited parameters, one per edit
    outputs: np.ndarray  # (N, S, S, 3) uint8
    buffers: torch.Tensor  # (N, 9, S, S) edited buffers
    target: np.ndarray  # (S, S, 3) the input at the model's size, 8-bit range float
    face_out: np.ndarray  # (N, S, S) the edited faces' masks
    seconds: float  # per edit: the photo's inversion and batched sampling over its edits

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
    from rigcli.edit import to_uint8

    names = editor.face_model.expression_names
    size = editor.size
    normals = editor.skin_normals(fit)
    labels = [p.label for p in photos]
    sources = [p.source for p in prepared]
    results = []
    for i, photo in enumerate(prepared):
        edits = suite(sources, i, labels)
        one = fit.select([i])
        reference = {sources[j]: fit.select([j]) for j in range(len(prepared)) if j != i}
        asked = FaceFit.cat(
            [
                apply_controls(one, e.controls, names, [normals[i]], reference, editor.directions_for(e.controls))
                for e in edits
            ]
        )
        rest = len(edits) - 1
        torch.manual_seed(seed)
        started = time.perf_counter()
        first, x_t, _, changed = editor.run([photo], one, asked.select([0]), steps=spec.steps, seed=seed)
        outs, buffers = [first], [changed]
        if on_edit:
            on_edit(edits[0].label)
        if rest:
            out, _, _, changed = editor.run(
                [photo] * rest, FaceFit.cat([one] * rest), asked.select(list(range(1, len(edits)))),
                steps=spec.steps, seed=seed, start=x_t.expand(rest, -1, -1, -1),
            )  # fmt: skip
            outs.append(out)
            buffers.append(changed)
        seconds = (time.perf_counter() - started) / len(edits)
        for edit in edits[1:]:
            if on_edit:
                on_edit(edit.label)
        results.append(
            Sampled(i, edits, asked, to_uint8(torch.cat(outs)), torch.cat(buffers), _to_model_input(photo.crop, size),
                    _masks_at(editor.face_masks(asked), size), seconds)
        )  # fmt: skip
    return results


def measure(
    sampled: Sampled, refit: Refit, offset: int, fit: FaceFit, face_in: np.ndarray, label: str
) -> tuple[list[EditRecord], dict[str, float]]:
    """Metrics of one photo's edits, given the re-fit of [input, outputs...] at ``offset`` in ``refit``;
    also the input's own re-fit errors (the measurement's floor)."""
    from rigcli.edit import buffer_tiles

    one = fit.select([sampled.photo])
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
            "light_error_deg": light_error_deg(got.light[0], sampled.asked.light[k]),
            "blendshape_error": blendshape_error(got.expression[0], sampled.asked.expression[k], one.expression[0]),
            "yaw_error_deg": yaw_error_deg(got.yaw[0], sampled.asked.yaw[k]),
            "seconds": sampled.seconds,
            "face_detected": refit.detected[offset + 1 + k],
        }
        metrics = {key: round(v, DECIMALS) if isinstance(v, float) else v for key, v in metrics.items()}
        tiles = [sampled.shown, *buffer_tiles(sampled.buffers[k]), output]
        records.append(EditRecord(label, edit.kind, edit.label, metrics, tiles))
    itself = refit.fit.select([offset])
    floor = {
        "light_error_deg": light_error_deg(itself.light[0], one.light[0]),
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
    from rigcli.photo import PhotoError

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
        sampled.append(
            sample_suite(editor, spec, photos, prepared, fit, seed, on_edit=lambda e, s=spec: step(f"{s.label} {e}"))
        )
    boxes = [expected_box(editors[0], photo) for photo in prepared]
    images, image_boxes = [], []
    for per_model in sampled:
        for s in per_model:
            images += [s.shown, *s.outputs]
            image_boxes += [boxes[s.photo]] * (1 + len(s.outputs))
    refit = refit_images(editors[0], images, image_boxes, on_image=lambda: step("re-fitting the outputs"))
    runs, offset = [], 0
    for spec, editor, per_model in zip(specs, editors, sampled, strict=True):
        face_in = _masks_at(editor.face_masks(fit), editor.size)
        records, floors = [], []
        for s in per_model:
            got, floor = measure(s, refit, offset, fit, face_in[s.photo], photos[s.photo].label)
            records += got
            floors.append(floor)
            offset += 1 + len(s.outputs)
        floor = {k: round(float(np.mean([f[k] for f in floors])), DECIMALS) for k in floors[0]}
        runs.append(ModelRun(spec, model_folder(store, name, spec.model), editor.size, records, floor))
    return Evaluation(name, list(photos), seed, runs)


# ---------------------------------------------------------------- outputs


def metrics_json(evaluation: Evaluation) -> dict:
    """The evaluation as JSON: settings, photos (with their files' SHA-256), per model every edit's
    metrics and the per-type summary."""
    from rigcli import __version__
    from rigcli.store import now_iso

    return {
        "person": evaluation.person,
        "created": now_iso(),
        "rig_version": __version__,
        "seed": evaluation.seed,
        "suite": SUITE_DOC,
        "same_person_threshold": SAME_PERSON,
        "rounding": f"every number is round(value, {DECIMALS}); report.html shows the same values",
        "photos": [
            {"label": p.label, "path": str(p.path), "sha256": hashlib.sha256(p.path.read_bytes()).hexdigest()}
            for p in evaluation.photos
        ],
        "models": [
            {
                "label": run.spec.label,
                "model": run.spec.model,
                "folder": str(run.folder),
                "steps": run.spec.steps,
                "engine": run.spec.engine,
                "image_size": run.size,
                "summary": run.summary(),
                "measurement_floor": run.floor,
                "edits": [{"photo": e.photo, "kind": e.kind, "label": e.label, **e.metrics} for e in run.edits],
            }
            for run in evaluation.runs
        ],
    }


def format_value(value) -> str:
    """How a summary value is shown: the stored number as is (already rounded), '-' when not applicable."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{DECIMALS}f}"


def _png_uri(image: np.ndarray) -> str:
    from rigcli.photo import encode_png

    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; }
table { border-collapse: collapse; margin: 8px 0; background: #fff; }
th, td { border: 1px solid #ccc; padding: 4px 8px; font-size: 13px; text-align: right; }
th { background: #eee; } td.name { text-align: left; }
img.row { height: 128px; image-rendering: pixelated; }
p.note { color: #555; font-size: 13px; max-width: 960px; }
"""


def report_html(evaluation: Evaluation, doc: dict) -> str:
    """A self-contained page: the summary table (the values of ``doc``, metrics.json) and per edit
    type a grid, one row per photo and edit: input | edited shaded, normal | output of each model."""
    from PIL import Image

    from rigcli.sheet import grid

    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>rig eval {esc(evaluation.person)}</title><style>{CSS}</style></head><body>",
        f"<h1>rig eval: {esc(evaluation.person)}</h1>",
        f"<p class='note'>{len(evaluation.photos)} photo(s): {esc(', '.join(p.label for p in evaluation.photos))}; "
        f"seed {evaluation.seed}; models: {esc(', '.join(r.spec.label for r in evaluation.runs))}. "
        f"id dist: euclidean distance of dlib's face descriptors of input and output (same person below "
        f"{SAME_PERSON}); same person: the share within it. PSNR and SSIM against the input at the model's "
        "size, inside the face (reconstruction) and outside it (background). Edit errors: the output fitted "
        f"again, against what was asked. Numbers are rounded to {DECIMALS} decimals, as in metrics.json.</p>",
        "<h2>Summary</h2><table id='summary'><thead><tr><th>model</th><th>edit type</th><th data-key='count'>n</th>",
    ]
    parts += [f"<th data-key='{key}'>{esc(title)}</th>" for key, title in METRICS]
    parts.append("</tr></thead><tbody>")
    for model in doc["models"]:
        for kind, row in model["summary"].items():
            parts.append(f"<tr data-model='{esc(model['label'])}' data-kind='{kind}'>")
            parts.append(f"<td class='name'>{esc(model['label'])}</td><td class='name'>{kind}</td>")
            parts.append(f"<td data-key='count'>{row['count']}</td>")
            parts += [f"<td data-key='{key}'>{format_value(row[key])}</td>" for key, _ in METRICS]
            parts.append("</tr>")
    parts.append("</tbody></table>")
    for model in doc["models"]:
        floor = model["measurement_floor"]
        parts.append(
            f"<p class='note'>Measurement floor of {esc(model['label'])}: the inputs themselves, fitted again the "
            f"same way, are off by {floor['light_error_deg']} deg in light, {floor['blendshape_error']} in "
            f"blendshape weight and {floor['yaw_error_deg']} deg in yaw.</p>"
        )
    first = evaluation.runs[0]
    size = first.size
    for kind in KINDS:
        rows = [i for i, e in enumerate(first.edits) if e.kind == kind]
        if not rows:
            continue
        outputs = " | ".join(f"output {r.spec.label}" for r in evaluation.runs)
        parts.append(f"<h2>{kind}</h2><p class='note'>{esc(SUITE_DOC[kind])}. Columns: input | edited shaded | "
                     f"edited normal | {esc(outputs)}.</p>")  # fmt: skip
        parts.append("<table class='grid'><thead><tr><th>photo</th><th>edit</th><th>images</th>")
        parts += [f"<th>id dist {esc(r.spec.label)}</th>" for r in evaluation.runs]
        parts.append("</tr></thead><tbody>")
        for i in rows:
            edit = first.edits[i]
            tiles = list(edit.tiles)
            for run in evaluation.runs[1:]:
                other = run.edits[i].tiles[-1]
                if other.shape[0] != size:
                    other = np.asarray(Image.fromarray(other).resize((size, size), Image.Resampling.BICUBIC))
                tiles.append(other)
            parts.append(
                f"<tr><td class='name'>{esc(edit.photo)}</td><td class='name'>{esc(edit.label)}</td>"
                f"<td><img class='row' alt='{esc(edit.label)}' src='{_png_uri(grid(tiles, len(tiles), pad=2))}'></td>"
            )
            parts += [f"<td>{format_value(run.edits[i].metrics['identity_euclidean'])}</td>" for run in evaluation.runs]
            parts.append("</tr>")
        parts.append("</tbody></table>")
    parts.append("</body></html>")
    return "".join(parts)


def output_paths(out_dir: Path) -> tuple[Path, Path]:
    return Path(out_dir) / "metrics.json", Path(out_dir) / "report.html"


def write_outputs(evaluation: Evaluation, out_dir: Path) -> tuple[Path, Path, dict]:
    """Write metrics.json and report.html (each atomically); return their paths and the JSON."""
    from rigcli.store import atomic_write_bytes, atomic_write_json

    metrics_path, report_path = output_paths(out_dir)
    doc = metrics_json(evaluation)
    atomic_write_json(metrics_path, doc)
    atomic_write_bytes(report_path, report_html(evaluation, doc).encode("utf-8"))
    return metrics_path, report_path, doc
