"""Editing: the paper's edit as a pipeline over the other steps; it owns no math of its own.

For each photo: detect and align it as ``add-person`` does, fit the face model with the person's
identity held fixed, render its buffers; apply the controls to the fitted parameters and render the
edited buffers; DDIM-invert the photo under its original buffers and global latent, then sample
under the edited buffers with the same latent. ``invert=False`` starts from seeded noise instead.

Controls change parameters only: light (a direction with intensity and ambient, or another photo's
light), expression (named ARKit blendshapes, or another photo's expression) and pose (angles added
to the fitted ones, or another photo's pose).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rigcli import RigError
from rigcli.fit import FaceFit

LIGHT_DIRECTIONS = {  # camera space: x to the image's right, y up, z toward the viewer
    "front": (0.0, 0.0, 1.0),
    "left": (-1.0, 0.0, 0.6),
    "right": (1.0, 0.0, 0.6),
    "top": (0.0, 1.0, 0.6),
    "bottom": (0.0, -1.0, 0.6),
    "back": (0.0, 0.3, -1.0),
}
EXPRESSION_CONTROLS = {
    "smile": ("mouthSmile_L", "mouthSmile_R"),
    "jaw_open": ("jawOpen",),
    "blink": ("eyeBlink_L", "eyeBlink_R"),
    "brow_raise": ("browInnerUp_L", "browInnerUp_R", "browOuterUp_L", "browOuterUp_R"),
    "frown": ("mouthFrown_L", "mouthFrown_R", "browDown_L", "browDown_R"),
    "pucker": ("mouthPucker",),
}
DEFAULT_INTENSITY, DEFAULT_AMBIENT = 0.8, 0.35
MAX_POSE_DEG = 60.0


@dataclass
class Controls:
    """What to change; everything left at None keeps the photo's fitted value."""

    light: str | None = None
    light_dir: tuple[float, float] | None = None  # yaw, pitch in degrees
    light_intensity: float | None = None
    ambient: float | None = None
    light_from: Path | None = None
    expression: dict[str, float] = field(default_factory=dict)  # control name -> weight
    blend: dict[str, float] = field(default_factory=dict)  # blendshape name -> weight
    expression_from: Path | None = None
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    pose_from: Path | None = None

    def validate(self, expression_names: Sequence[str]) -> None:
        """Refuse unknown names, values out of range and conflicting controls, listing what is valid."""
        lights = [x for x in (self.light, self.light_dir, self.light_from) if x is not None]
        if len(lights) > 1:
            raise RigError("choose one of --light, --light-dir and --light-from")
        if self.light is not None and self.light not in LIGHT_DIRECTIONS:
            raise RigError(f"unknown --light {self.light!r}; choose one of: {', '.join(LIGHT_DIRECTIONS)}")
        if self.light_from is not None and (self.light_intensity is not None or self.ambient is not None):
            raise RigError("--light-intensity and --ambient go with --light or --light-dir, not --light-from")
        for name, value in (("--light-intensity", self.light_intensity), ("--ambient", self.ambient)):
            if value is not None and not 0.0 <= value <= 4.0:
                raise RigError(f"{name} must be between 0 and 4, not {value}")
        for name, value in self.expression.items():
            if name not in EXPRESSION_CONTROLS:
                raise RigError(f"unknown expression control {name!r}; valid: {', '.join(EXPRESSION_CONTROLS)}")
            if not 0.0 <= value <= 1.0:
                raise RigError(f"--{name.replace('_', '-')} must be between 0 and 1, not {value}")
        for name, value in self.blend.items():
            if name not in expression_names:
                raise RigError(f"unknown blendshape {name!r}; valid: {', '.join(expression_names)}")
            if not 0.0 <= value <= 1.0:
                raise RigError(f"--blend {name}={value}: weights are between 0 and 1")
        if self.expression_from is not None and (self.expression or self.blend):
            raise RigError(
                "--expression-from copies a whole expression: do not combine it with other expression controls"
            )
        if self.pose_from is not None and (self.yaw or self.pitch or self.roll):
            raise RigError("--pose-from copies a whole pose: do not combine it with --yaw, --pitch or --roll")
        for name, value in (("--yaw", self.yaw), ("--pitch", self.pitch), ("--roll", self.roll)):
            if abs(value) > MAX_POSE_DEG:
                raise RigError(f"{name} must be within +-{MAX_POSE_DEG:.0f} degrees, not {value}")

    @property
    def needs_reference_fits(self) -> list[Path]:
        return [p for p in (self.light_from, self.expression_from, self.pose_from) if p is not None]


def light_for(
    direction: Sequence[float], intensity: float, ambient: float, normals: torch.Tensor | None
) -> torch.Tensor:
    """A white SH light (9, 3) from a direction; without explicit intensity/ambient it is scaled so
    the shading averages 1 over ``normals`` (the face keeps its overall brightness)."""
    from rigcli.render import light_from_direction, sh_shading

    light = light_from_direction(torch.tensor(direction, dtype=torch.float64), intensity, ambient).float()
    if normals is not None and len(normals):
        mean = sh_shading(normals[None].float(), light[None])[0].mean()
        light = light / mean.clamp_min(1e-3)
    return light


def direction_from_angles(yaw_deg: float, pitch_deg: float) -> tuple[float, float, float]:
    """Unit vector toward a light at yaw (to the image's right) and pitch (up), in degrees."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    return (math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch))


def apply_controls(
    fit: FaceFit,
    controls: Controls,
    names: Sequence[str],
    skin_normals: list[torch.Tensor] | None = None,
    reference: dict[Path, FaceFit] | None = None,
    directions: dict[str, torch.Tensor] | None = None,
) -> FaceFit:
    """The edited parameters of a batch of fitted photos (the input fit is not changed).

    ``directions`` (FLAME): per ICT blendshape name, a FLAME expression direction
    (``rigcli.deca.load_control_directions``); a control then sets the photo's amount along the
    sum of its blendshapes' directions to its weight (the amount read by projection), as setting
    the blendshape weights does on ICT. Names in ``names`` (FLAME's own) are set directly.
    """
    edited = fit.select(list(range(len(fit))))
    edited.expression = fit.expression.clone()
    edited.light = fit.light.clone()
    reference = reference or {}
    if controls.light is not None or controls.light_dir is not None:
        direction = LIGHT_DIRECTIONS[controls.light] if controls.light else direction_from_angles(*controls.light_dir)
        explicit = controls.light_intensity is not None or controls.ambient is not None
        intensity = DEFAULT_INTENSITY if controls.light_intensity is None else controls.light_intensity
        ambient = DEFAULT_AMBIENT if controls.ambient is None else controls.ambient
        for i in range(len(fit)):
            normals = None if explicit or skin_normals is None else skin_normals[i]
            edited.light[i] = light_for(direction, intensity, ambient, normals)
    if controls.light_from is not None:
        edited.light[:] = reference[controls.light_from].light[0]
    if controls.expression_from is not None:
        edited.expression[:] = reference[controls.expression_from].expression[0]
    for control, weight in controls.expression.items():
        if directions is not None:
            _set_along(edited, sum(directions[n] for n in EXPRESSION_CONTROLS[control]), weight)
            continue
        for name in EXPRESSION_CONTROLS[control]:
            edited.expression[:, names.index(name)] = weight
    for name, weight in controls.blend.items():
        if name in names:
            edited.expression[:, names.index(name)] = weight
        elif directions is not None:
            _set_along(edited, directions[name], weight)
    if controls.pose_from is not None:
        ref = reference[controls.pose_from]
        edited.yaw, edited.pitch, edited.roll = (
            ref.yaw.expand(len(fit)),
            ref.pitch.expand(len(fit)),
            ref.roll.expand(len(fit)),
        )
    else:
        edited.yaw = fit.yaw + math.radians(controls.yaw)
        edited.pitch = fit.pitch + math.radians(controls.pitch)
        edited.roll = fit.roll + math.radians(controls.roll)
    return edited


def _set_along(fit: FaceFit, direction: torch.Tensor, weight: float) -> None:
    """Move each photo's expression along ``direction`` so that its amount along it becomes ``weight``."""
    direction = direction.to(fit.expression.dtype)
    amount = fit.expression @ direction / (direction @ direction).clamp_min(1e-12)
    fit.expression += (weight - amount)[:, None] * direction


# ---------------------------------------------------------------- the pipeline


@dataclass
class PreparedPhoto:
    """A photo ready to edit: its pixels, aligned crop, transform back, and its fit."""

    source: Path
    pixels: np.ndarray
    crop: np.ndarray
    crop_to_photo: np.ndarray
    landmarks: np.ndarray  # 68 points in photo pixels

    @property
    def crop_landmarks(self) -> np.ndarray:
        """The 68 landmarks in the aligned crop's pixels."""
        from rigcli.align import apply_affine, invert_affine

        return apply_affine(invert_affine(self.crop_to_photo), self.landmarks)


@dataclass
class EditResult:
    """One edited photo: the output crop, the buffers before and after, and what went wrong if anything."""

    source: Path
    output: np.ndarray | None = None  # (S, S, 3) uint8 at the model's resolution
    original_buffers: torch.Tensor | None = None
    edited_buffers: torch.Tensor | None = None
    prepared: PreparedPhoto | None = None
    fit: FaceFit | None = None
    edited_fit: FaceFit | None = None
    error: str | None = None


class Editor:
    """A person's fine-tuned model with their identity and face model, ready to edit photos."""

    def __init__(
        self,
        store,
        name: str,
        model_dir: Path | None = None,
        device: str = "cpu",
        detector: str = "hog",
        engine: str = "torch",
    ):
        from rigcli.detect import FaceAnalyzer
        from rigcli.enroll import read_fit
        from rigcli.facemodel import face_model_name, load_face_model
        from rigcli.train import load_model

        store.require(name)
        folder = model_dir or store.person_dir(name) / "model"
        if not (folder / "model.json").is_file():
            raise RigError(f"{name} has no fine-tuned model: run `rig finetune {name}` first (or pass --model DIR)")
        fit_doc = read_fit(store, name)
        if fit_doc is None:
            raise RigError(f"{name} has no 3D fit: run `rig refit {name}`")
        self.store, self.name, self.device = store, name, device
        self.model, self.model_info = load_model(folder, device)
        self.face_model = load_face_model(store, face_model_name(fit_doc))
        self._directions: dict[str, torch.Tensor] | None = None
        self._control_names: list[str] | None = None
        if self.model_info.get("face_model_id") is not None:
            from rigcli.train import check_base_buffers

            check_base_buffers(str(folder), self.model_info, name, self.face_model.model_id)
        self.identity = torch.tensor(fit_doc["identity"], dtype=torch.float32)
        self.estimator = fit_doc.get("estimator", "landmarks")  # photos are fitted as the album was
        self._encoder = None
        self.crop_size = store.load(name).align_size
        self.analyzer = FaceAnalyzer(detector)
        self.denoise = self._engine(engine, store.person_dir(name) / "engines", folder)

    def _engine(self, spec: str, root: Path, folder: Path):
        """The runtime that serves eps = f(x_t, t, buffers, latent) for the sampler (see engines)."""
        from engines import make_engine

        unet = self.model.denoisingUNet
        return make_engine(spec, unet, root, self.size, self.device, source=str(folder.resolve()))

    @property
    def size(self) -> int:
        return self.model.cfg.image_size

    @property
    def control_names(self) -> list[str]:
        """Names ``--blend`` and ``--sweep`` accept: the face model's, and on FLAME also ICT's
        blendshapes (through ``directions``) when ICT-FaceKit is imported."""
        from rigcli.facemodel import installed, load_ict

        if self._control_names is None:
            names = list(self.face_model.expression_names)
            if self.face_model.name == "flame" and installed(self.store):
                names += load_ict(self.store).expression_names
            self._control_names = names
        return self._control_names

    def directions_for(self, controls: Controls) -> dict[str, torch.Tensor] | None:
        """ICT's blendshapes as FLAME directions when the controls need them (None on ICT)."""
        from rigcli.deca import load_control_directions

        own = self.face_model.expression_names
        if self.face_model.name != "flame" or not (controls.expression or set(controls.blend) - set(own)):
            return None
        if self._directions is None:
            self._directions = load_control_directions(self.store, self.face_model)
        return self._directions

    def prepare(self, path: Path) -> PreparedPhoto:
        """Read, detect and align one photo (PhotoError when it has no usable face)."""
        from rigcli.align import align_face
        from rigcli.enroll import analyze_face
        from rigcli.photo import read_photo

        photo = read_photo(path)
        face = analyze_face(photo, self.analyzer)
        aligned = align_face(photo.pixels, face.landmarks, self.crop_size)
        return PreparedPhoto(path, photo.pixels, aligned.crop, aligned.crop_to_photo, face.landmarks)

    def fit(self, photos: list[PreparedPhoto], hold_identity: bool = True) -> FaceFit:
        """Fit the face model to prepared photos, with the person's identity held fixed (or, for a
        reference photo that may show someone else, fitted freely)."""
        crops = np.stack([p.crop for p in photos])
        return self.fit_images(crops, np.stack([p.crop_landmarks for p in photos]), hold_identity)

    def fit_images(self, crops: np.ndarray, landmarks: np.ndarray, hold_identity: bool = True) -> FaceFit:
        """Fit aligned crops (N, S, S, 3) uint8 with their 68 landmarks (N, 68, 2) by the estimator the
        person's album was fitted with (the landmark fitter, or DECA's encoder)."""
        from rigcli.fit import fit_landmarks, fit_light

        lm = torch.tensor(np.asarray(landmarks), dtype=torch.float32)
        identity = self.identity if hold_identity else None
        if self.estimator == "deca":
            from rigcli.deca import DecaEncoder, estimate_with_deca
            from rigcli.flame import load_deca_encoder

            if self._encoder is None:
                self._encoder = DecaEncoder.from_state_dict(load_deca_encoder(self.store)).eval()
            return estimate_with_deca(self._encoder, self.face_model, crops, lm.numpy(), identity=identity)[0]
        fit = fit_landmarks(self.face_model, lm, identity=identity)
        fit.light, fit.albedo = fit_light(self.face_model, fit, torch.from_numpy(crops).float() / 255.0)
        return fit

    def buffers(self, fit: FaceFit) -> torch.Tensor:
        from rigcli.fit import render_buffers
        from rigcli.train import rescale_fit

        return render_buffers(self.face_model, rescale_fit(fit, self.crop_size, self.size), self.size)

    def face_masks(self, fit: FaceFit) -> np.ndarray:
        """(B, crop, crop) bool: where the fitted face covers each aligned crop."""
        from rigcli.fit import rasterize_fit

        return rasterize_fit(self.face_model, fit, self.crop_size).fragments.mask.numpy()

    def skin_normals(self, fit: FaceFit) -> list[torch.Tensor]:
        """Per photo, the rendered normals of the visible skin (to keep brightness under a new light)."""
        from rigcli.fit import rasterize_fit, skin_vertices

        geometry = rasterize_fit(self.face_model, fit, self.crop_size)
        skin = skin_vertices(self.face_model).float()[None, :, None].expand(len(fit), -1, 1)
        mask = geometry.fragments.interpolate(skin, self.face_model.triangles)[..., 0] > 0.999
        return [geometry.normals[i][mask[i]] for i in range(len(fit))]

    @torch.no_grad()
    def run(
        self,
        photos: list[PreparedPhoto],
        fit: FaceFit,
        edited: FaceFit,
        steps: int = 20,
        invert: bool = True,
        seed: int = 0,
        callback: Callable[[int, int], None] | None = None,
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The diffusion part of the edit, batched: (outputs in [-1, 1], x_T, original, edited buffers)."""
        from rigcli.diffusion import Diffusion, ddim_invert, ddim_sample, ddim_timesteps

        size, device = self.size, self.device
        crops = torch.from_numpy(np.stack([p.crop for p in photos])).permute(0, 3, 1, 2).float()
        images = torch.nn.functional.interpolate(crops, size=(size, size), mode="area") / 127.5 - 1.0
        images = images.to(device)
        original = self.buffers(fit).to(device)
        changed = self.buffers(edited).to(device)
        latent = self.model.encode(images)
        diffusion, ts = Diffusion(), ddim_timesteps(steps)
        total = 2 * steps if invert else steps
        if start is not None:
            x_t = start
        elif invert:
            x_t = ddim_invert(
                lambda x, t: self.denoise(x, t, original, latent), images, diffusion, ts,
                callback=(lambda i, n: callback(i, total)) if callback else None,
            )  # fmt: skip
        else:
            generator = torch.Generator().manual_seed(seed)
            x_t = torch.randn(images.shape, generator=generator).to(device)
        offset = steps if invert and start is None else 0
        # after an inversion, sample with the very update the inversion ran backwards: clamping the x0
        # estimate would break the round trip (20 steps: 15.6 dB instead of 22.8 dB on a tiny model)
        out = ddim_sample(
            lambda x, t: self.denoise(x, t, changed, latent), x_t, diffusion, ts, clip=not invert,
            callback=(lambda i, n: callback(offset + i, total)) if callback else None,
        )  # fmt: skip
        return out.cpu(), x_t, original.cpu(), changed.cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] -> (B, S, S, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def paste_back(
    photo: np.ndarray, crop: np.ndarray, crop_to_photo: np.ndarray, face_mask: np.ndarray, feather: float = 0.04
) -> np.ndarray:
    """The edited crop composed into the full photo through the crop's transform, with a feathered mask.

    ``crop`` and ``face_mask`` are in crop pixels (any size: the transform is scaled to match);
    photo pixels where the feathered mask is zero are returned unchanged.
    """
    from scipy import ndimage

    from rigcli.align import apply_affine, invert_affine

    size = crop.shape[0]
    scale_to = size / face_mask.shape[0]
    mask = ndimage.gaussian_filter(face_mask.astype(np.float32), sigma=feather * face_mask.shape[0])
    if scale_to != 1:
        mask = ndimage.zoom(mask, scale_to, order=1)
    # crop pixel (u, v) at this size <- crop pixel at the transform's size: centres kept
    matrix = np.asarray(crop_to_photo, dtype=np.float64)
    inv = invert_affine(matrix)  # photo -> original crop
    height, width = photo.shape[:2]
    corners = apply_affine(matrix, [[0, 0], [0, face_mask.shape[0]], [face_mask.shape[0], 0], [face_mask.shape[0]] * 2])
    x0, y0 = np.floor(corners.min(0)).astype(int).clip(0, [width - 1, height - 1])
    x1, y1 = np.ceil(corners.max(0)).astype(int).clip(0, [width - 1, height - 1])
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float64)
    uv = apply_affine(inv, np.stack([xs.ravel(), ys.ravel()], 1))
    uv = (uv + 0.5) * (size / face_mask.shape[0]) - 0.5
    coords = [uv[:, 1], uv[:, 0]]
    alpha = ndimage.map_coordinates(mask, coords, order=1, mode="constant", cval=0.0).reshape(xs.shape)
    out = photo.copy()
    region = out[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
    for c in range(3):
        value = ndimage.map_coordinates(crop[..., c].astype(np.float32), coords, order=1, mode="nearest")
        region[..., c] = region[..., c] * (1 - alpha) + value.reshape(xs.shape) * alpha
    changed = alpha > 0
    block = out[y0 : y1 + 1, x0 : x1 + 1]
    block[changed] = np.clip(region[changed], 0, 255).round().astype(np.uint8)
    return out


# ---------------------------------------------------------------- many photos


def fit_reference(editor: Editor, path: Path) -> FaceFit:
    """Fit a reference photo (--light-from, ...) with its own identity: it need not be the person."""
    from rigcli.photo import PhotoError

    try:
        photo = editor.prepare(Path(path))
    except PhotoError as exc:
        raise RigError(f"cannot use {path} as a reference: {exc}") from exc
    return editor.fit([photo], hold_identity=False)


def edit_photos(
    editor: Editor,
    inputs: Sequence[Path],
    controls: Controls,
    *,
    steps: int = 20,
    invert: bool = True,
    seed: int = 0,
    batch: int = 8,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[EditResult]:
    """Edit many photos: every input gets a result; one that fails (no face, unreadable) says why
    and the rest go on. Usable photos go through the model in batches of ``batch``."""
    from rigcli.photo import PhotoError

    controls.validate(editor.control_names)
    reference = {path: fit_reference(editor, path) for path in controls.needs_reference_fits}
    results = [EditResult(Path(p)) for p in inputs]
    ready = []
    for i, result in enumerate(results):
        try:
            result.prepared = editor.prepare(result.source)
            ready.append(i)
        except PhotoError as exc:
            result.error = f"{exc.reason}: {exc}"
        if on_progress:
            on_progress("reading", i + 1, len(results))
    names = editor.face_model.expression_names
    for start in range(0, len(ready), batch):
        chunk = ready[start : start + batch]
        photos = [results[i].prepared for i in chunk]
        fit = editor.fit(photos)
        edited = apply_controls(
            fit, controls, names, editor.skin_normals(fit), reference, editor.directions_for(controls)
        )

        size = len(chunk)

        def report(i: int, n: int, start: int = start, size: int = size) -> None:
            if on_progress:
                on_progress("editing", start + round(i / n * size), len(ready))

        out, _, original, changed = editor.run(
            photos, fit, edited, steps=steps, invert=invert, seed=seed, callback=report
        )
        outputs = to_uint8(out)
        for k, i in enumerate(chunk):
            results[i].output = outputs[k]
            results[i].original_buffers, results[i].edited_buffers = original[k], changed[k]
            results[i].fit, results[i].edited_fit = fit.select([k]), edited.select([k])
    return results


# ---------------------------------------------------------------- outputs


def parse_sweep(text: str, names: Sequence[str]) -> tuple[str, np.ndarray]:
    """``smile=0:1:8`` -> ("smile", 8 values from 0 to 1). The name is an expression control, a
    blendshape, or yaw / pitch / roll (degrees)."""
    try:
        name, spec = text.split("=", 1)
        start, stop, count = spec.split(":")
        values = np.linspace(float(start), float(stop), int(count))
    except ValueError as exc:
        raise RigError(f"--sweep {text!r}: write NAME=START:STOP:COUNT, e.g. smile=0:1:8") from exc
    valid = [*EXPRESSION_CONTROLS, "yaw", "pitch", "roll", *names]
    if name not in valid:
        raise RigError(f"--sweep: unknown control {name!r}; valid: {', '.join(valid)}")
    if not 2 <= len(values) <= 120:
        raise RigError("--sweep: between 2 and 120 frames")
    return name, values


def sweep_controls(base: Controls, name: str, value: float) -> Controls:
    """The controls of one sweep frame: ``base`` with one control set to ``value``."""
    from dataclasses import replace

    if name in ("yaw", "pitch", "roll"):
        return replace(base, **{name: float(value)})
    if name in EXPRESSION_CONTROLS:
        return replace(base, expression={**base.expression, name: float(value)})
    return replace(base, blend={**base.blend, name: float(value)})


def sweep_frames(
    editor: Editor, result: EditResult, base: Controls, name: str, values, steps: int, seed: int, invert: bool
):
    """Frames of a sweep for one edited photo: one inversion, then one sample per value from the same x_T."""
    names = editor.face_model.expression_names
    photos = [result.prepared]
    fit = result.fit
    frames = []
    start = None
    for value in values:
        controls = sweep_controls(base, name, value)
        controls.validate(editor.control_names)
        edited = apply_controls(fit, controls, names, editor.skin_normals(fit), None, editor.directions_for(controls))
        out, x_t, _, _ = editor.run(photos, fit, edited, steps=steps, invert=invert, seed=seed, start=start)
        start = x_t  # the same noise for every frame
        frames.append(to_uint8(out)[0])
    return frames


def buffer_tiles(buffers: torch.Tensor) -> list[np.ndarray]:
    """The shaded and normal channels of (9, S, S) buffers as two RGB tiles."""
    shaded = buffers[0:3].clamp(0, 1)
    normal = torch.where(buffers[3:6].abs().sum(0, keepdim=True) > 0, buffers[3:6] * 0.5 + 0.5, 0)
    return [(t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for t in (shaded, normal)]


def sheet_row(result: EditResult, size: int) -> list[np.ndarray]:
    """input | original shaded, normal | edited shaded, normal | output."""
    from PIL import Image

    crop = np.asarray(Image.fromarray(result.prepared.crop).resize((size, size), Image.Resampling.BOX))
    return [crop, *buffer_tiles(result.original_buffers), *buffer_tiles(result.edited_buffers), result.output]
