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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from engines import EngineSpec, make_engine
from rigcli import RigError
from rigcli.diffusion.checkpoints import load_model
from rigcli.diffusion.schedule import Diffusion, ddim_invert, ddim_sample, ddim_timesteps
from rigcli.edit.controls import Controls, apply_controls, parse_sweep, sweep_controls
from rigcli.enroll import album_embeddings, analyze_face, person_face, read_fit
from rigcli.estimate import make_estimator
from rigcli.face.ict import ict_available, load_ict
from rigcli.face.params import FaceFit, rescale_fit
from rigcli.face.registry import face_model_name, load_face_model
from rigcli.face.retarget import load_control_directions
from rigcli.files import atomic_write_bytes
from rigcli.image.align import align_face, apply_affine, compose_affine, invert_affine, warp
from rigcli.image.detect import FaceAnalyzer
from rigcli.image.grid import grid, to_uint8
from rigcli.image.metrics import psnr
from rigcli.image.photo import PhotoError, encode_png, read_photo
from rigcli.render.buffers import rasterize_fit, render_buffers, skin_mask
from rigcli.render.compose import PhysicalEdit, physical_edit, resize_affine, transfer
from rigcli.train.stages import check_base_buffers


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
    photo_output: np.ndarray | None = None  # (H, W, 3) uint8: the photo edited at its size (with a strength)
    photo_mask: np.ndarray | None = None  # (H, W) float: where photo_output may differ from the photo
    physical: PhysicalEdit | None = None  # the model-free edit it started from (None at strength 1)
    reconstruction_psnr: float | None = None  # dB at the model's size: unedited crop vs its round trip
    warning: str | None = None
    identity_distance: float | None = None  # dlib distance, input face to output face (edit_to_files)


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
        engine_root: Path | None = None,
    ):
        """``engine_root``: where exported engines are cached (default the person's ``engines/``)."""
        folder = store.require_model(name, model_dir)
        fit_doc = read_fit(store, name)
        if fit_doc is None:
            raise RigError(f"{name} has no 3D fit: run `rig refit {name}`")
        self.store, self.name, self.device = store, name, device
        self.model, self.model_info = load_model(folder, device)
        self.face_model = load_face_model(store, face_model_name(fit_doc))
        self._directions: dict[str, torch.Tensor] | None = None
        self._control_names: list[str] | None = None
        if self.model_info.get("face_model_id") is not None:
            check_base_buffers(str(folder), self.model_info, name, self.face_model.model_id)
        self.identity = torch.tensor(fit_doc["identity"], dtype=torch.float32)
        self.estimator = make_estimator(store, fit_doc.get("estimator", "landmarks"))  # as the album was fitted
        manifest = store.load(name)
        self.crop_size = manifest.align_size
        self.album = np.stack(list(album_embeddings(store, name, manifest).values()))  # (N, 128) dlib
        self.analyzer = FaceAnalyzer(detector)
        self.denoise = self._engine(engine, engine_root or store.person_dir(name) / "engines", folder)

    def _engine(self, spec: str, root: Path, folder: Path):
        """The runtime that serves eps = f(x_t, t, buffers, latent) for the sampler (see engines)."""

        unet = self.model.denoisingUNet
        return make_engine(spec, unet, root, self.size, self.device, source=str(folder.resolve()))

    @property
    def size(self) -> int:
        return self.model.cfg.image_size

    @property
    def control_names(self) -> list[str]:
        """Names ``--blend`` and ``--sweep`` accept: the face model's, and on FLAME also ICT's
        blendshapes (through ``directions``) when ICT-FaceKit is imported."""

        if self._control_names is None:
            names = list(self.face_model.expression_names)
            if self.face_model.name == "flame" and ict_available(self.store):
                names += load_ict(self.store).expression_names
            self._control_names = names
        return self._control_names

    def directions_for(self, controls: Controls) -> dict[str, torch.Tensor] | None:
        """ICT's blendshapes as FLAME directions when the controls need them (None on ICT)."""

        own = self.face_model.expression_names
        if self.face_model.name != "flame" or not (controls.expression or set(controls.blend) - set(own)):
            return None
        if self._directions is None:
            self._directions = load_control_directions(self.store, self.face_model)
        return self._directions

    def prepare(self, path: Path, face: int | None = None, anyone: bool = False) -> PreparedPhoto:
        """Read, detect and align one photo: of several faces the person's (``person_face``), or the
        ``face``-th from the left; PhotoError when it has no usable face or none is the person.
        ``anyone``: the photo's main face, whoever it is (a reference photo for --light-from, ...)."""

        photo = read_photo(path)
        if anyone:
            face = analyze_face(photo, self.analyzer)
        else:
            face = person_face(photo, self.analyzer, self.album, self.name, face)
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

        identity = self.identity if hold_identity else None
        return self.estimator.fit(self.face_model, crops, landmarks, identity=identity)

    def buffers(self, fit: FaceFit) -> torch.Tensor:

        return render_buffers(self.face_model, rescale_fit(fit, self.crop_size, self.size), self.size)

    def face_masks(self, fit: FaceFit) -> np.ndarray:
        """(B, crop, crop) bool: where the fitted face covers each aligned crop."""

        return rasterize_fit(self.face_model, fit, self.crop_size).fragments.mask.numpy()

    def skin_normals(self, fit: FaceFit) -> list[torch.Tensor]:
        """Per photo, the rendered normals of the visible skin (to keep brightness under a new light)."""

        geometry = rasterize_fit(self.face_model, fit, self.crop_size)
        mask = skin_mask(self.face_model, geometry)
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

    @torch.no_grad()
    def refine(
        self,
        photos: list[PreparedPhoto],
        fit: FaceFit,
        edited: FaceFit,
        physical: np.ndarray,
        strength: float,
        steps: int = 20,
        callback: Callable[[int, int], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's part of the edit at ``strength`` in [0, 1], both branches in one batch.

        ``physical`` (B, crop, crop, 3) uint8: the physical edit in the aligned crop's frame. The edited
        branch takes it (at strength 1 the original crop, as the paper) into noise for the first
        round(strength x steps) DDIM timesteps under the edited buffers (at 1 the original ones) and
        samples it back under the edited buffers; the reconstruction branch does the same to the
        unedited crop under its own buffers. Returns (edited samples, reconstructions, the edited
        branch's input, the unedited crop), (B, 3, s, s) in [-1, 1] at the model's size s. At
        strength 0 nothing is called: the samples are the inputs.
        """

        size, device = self.size, self.device

        def at_size(crops: np.ndarray) -> torch.Tensor:
            tensor = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
            return torch.nn.functional.interpolate(tensor, size=(size, size), mode="area") / 127.5 - 1.0

        unedited = at_size(np.stack([p.crop for p in photos]))
        start = unedited if strength >= 1 else at_size(physical)
        count = round(strength * steps)
        if count == 0:
            return start.clone(), unedited.clone(), start, unedited
        batch = len(photos)
        original, changed = self.buffers(fit).to(device), self.buffers(edited).to(device)
        images = torch.cat([start, unedited]).to(device)
        latent = self.model.encode(unedited.to(device))
        latent = torch.cat([latent, latent])  # the photo's own latent in both branches
        into = torch.cat([original if strength >= 1 else changed, original])
        back = torch.cat([changed, original])
        diffusion, ts = Diffusion(), ddim_timesteps(steps)[:count]
        total = 2 * count - 1
        x_t = ddim_invert(
            lambda x, t: self.denoise(x, t, into, latent), images, diffusion, ts,
            callback=(lambda i, n: callback(i, total)) if callback else None,
        )  # fmt: skip
        out = ddim_sample(
            lambda x, t: self.denoise(x, t, back, latent), x_t, diffusion, ts, clip=False,
            callback=(lambda i, n: callback(count - 1 + i, total)) if callback else None,
        )  # fmt: skip
        out = out.cpu()
        return out[:batch], out[batch:], start, unedited


def paste_back_crop(
    photo: np.ndarray, crop: np.ndarray, crop_to_photo: np.ndarray, face_mask: np.ndarray, feather: float = 0.04
) -> np.ndarray:
    """The edited crop composed into the full photo through the crop's transform, with a feathered mask.

    ``crop`` and ``face_mask`` are in crop pixels (any size: the transform is scaled to match);
    photo pixels where the feathered mask is zero are returned unchanged.
    """
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


def fit_reference(editor: Editor, path: Path) -> FaceFit:
    """Fit a reference photo (--light-from, ...) with its own identity: it need not be the person."""

    try:
        photo = editor.prepare(Path(path), anyone=True)
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
    strength: float | None = None,
    face: int | None = None,
) -> list[EditResult]:
    """Edit many photos: every input gets a result; one that fails (no face, unreadable) says why
    and the rest go on. Usable photos go through the model in batches of ``batch``.

    ``strength`` None: the paper's edit at the model's size (``output``). A strength S in [0, 1]:
    also the photo edited at its own size (``photo_output``), by ``refine_photos``."""
    if strength is not None and not 0 <= strength <= 1:
        raise RigError(f"--strength {strength}: give a value between 0 and 1")

    controls.validate(editor.control_names)
    reference = {path: fit_reference(editor, path) for path in controls.needs_reference_fits}
    results = [EditResult(Path(p)) for p in inputs]
    ready = []
    for i, result in enumerate(results):
        try:
            result.prepared = editor.prepare(result.source, face)
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

        if strength is None:
            out, _, original, changed = editor.run(
                photos, fit, edited, steps=steps, invert=invert, seed=seed, callback=report
            )
        else:
            out = refine_photos(editor, [results[i] for i in chunk], photos, fit, edited, strength, steps, report)
            original, changed = editor.buffers(fit), editor.buffers(edited)
        outputs = to_uint8(out)
        for k, i in enumerate(chunk):
            results[i].output = outputs[k]
            results[i].original_buffers, results[i].edited_buffers = original[k], changed[k]
            results[i].fit, results[i].edited_fit = fit.select([k]), edited.select([k])
    return results


POOR_RECONSTRUCTION_DB = 20.0
CARRY_MODES = ("difference", "ratio")
RATIO_FLOOR, RATIO_LIMIT = 0.05, 2.0  # ratio carry: levels above black in [0, 2]; the factor's bound


def refine_photos(
    editor: Editor,
    results: list[EditResult],
    photos: list[PreparedPhoto],
    fit: FaceFit,
    edited: FaceFit,
    strength: float,
    steps: int,
    callback: Callable[[int, int], None] | None = None,
    carry: str = "difference",
) -> torch.Tensor:
    """The edit at the photos' own size: the physical edit, refined by the model as far as ``strength``.

    Per photo: the physical edit (``compose.physical_edit``; skipped at strength 1, where the model
    starts from the photo itself); the model's two branches (``Editor.refine``); and the correction
    (edited sample - its input) - (reconstruction - unedited crop), in levels at the model's size,
    added to the physical edit (at strength 1: to the photo) inside the feathered faces of θ0 and θ1.
    What the model does to an unedited photo (its reconstruction error) cancels, and so does the
    physical edit it was given: only what the model adds to it is carried over. ``carry`` "ratio"
    carries (edited sample / its input) / (reconstruction / unedited crop) as a factor instead (a
    gain error cancels rather than an offset); benchmarks/bench_strength.py measures both.
    Sets each result's ``photo_output``, ``physical`` and
    ``reconstruction_psnr`` (+ a ``warning`` below POOR_RECONSTRUCTION_DB); returns the edited
    samples (B, 3, s, s) in [-1, 1].
    """
    size = editor.crop_size
    physical = [None] * len(photos)
    if strength < 1:
        physical = [
            physical_edit(p.pixels, p.crop_to_photo, size, editor.face_model, fit.select([k]), edited.select([k]))
            for k, p in enumerate(photos)
        ]
        crops = np.stack([warp(e.image, p.crop_to_photo, size) for e, p in zip(physical, photos, strict=True)])
    else:
        crops = np.stack([p.crop for p in photos])
    if carry not in CARRY_MODES:
        raise RigError(f"carry {carry!r}: choose one of {', '.join(CARRY_MODES)}")
    samples, recon, start, unedited = editor.refine(photos, fit, edited, crops, strength, steps, callback)
    if carry == "ratio":  # in [0, 2] above black, floored so that near-black pixels cannot blow up

        def level(x: torch.Tensor) -> torch.Tensor:
            return (x + 1).clamp_min(RATIO_FLOOR)

        factor = (level(samples) / level(start)) / (level(recon) / level(unedited))
        correction = factor.clamp(1 / RATIO_LIMIT, RATIO_LIMIT)
    else:
        correction = ((samples - start) - (recon - unedited)) * 127.5
    faces = editor.face_masks(fit) | editor.face_masks(edited)
    for k, (result, photo) in enumerate(zip(results, photos, strict=True)):
        edit = physical[k]
        base = photo.pixels if edit is None else edit.image
        base_mask = np.zeros(base.shape[:2], np.float32) if edit is None else edit.mask
        delta = correction[k].permute(1, 2, 0).numpy()
        result.photo_output, result.photo_mask = transfer(
            base, base_mask, delta, photo.crop_to_photo, size, faces[k], ratio=carry == "ratio"
        )
        result.physical = edit
        if strength > 0:
            db = psnr(recon[k], unedited[k], value_range=(-1, 1))
            result.reconstruction_psnr = db
            if db < POOR_RECONSTRUCTION_DB:
                result.warning = (
                    f"the model reconstructs this photo at only {db:.1f} dB (under {POOR_RECONSTRUCTION_DB:.0f}):"
                    " its part of the edit is unreliable; a lower --strength trusts it less"
                )
    return samples


GIF_SIDE = 768  # px: the longest side of a sweep's frames


def sweep_frames(
    editor: Editor,
    result: EditResult,
    base: Controls,
    name: str,
    values,
    steps: int,
    seed: int,
    invert: bool,
    strength: float | None = None,
    crop: bool = False,
    crop_size: int = 512,
) -> list[np.ndarray]:
    """Frames of a sweep of one control over ``values`` for one edited photo.

    ``strength`` None (``--compose plain``): the paper's edit at the model's size, one inversion and one
    sample per value from the same x_T. A strength: each frame by the same method as the output
    (``refine_photos``: its own physical edit and refinement), the picture ``rig edit`` writes
    (whole photo or ``crop``), scaled to GIF_SIDE at most."""
    names = editor.face_model.expression_names
    photos = [result.prepared]
    fit = result.fit
    frames = []
    start = None
    for value in values:
        controls = sweep_controls(base, name, value)
        controls.validate(editor.control_names)
        edited = apply_controls(fit, controls, names, editor.skin_normals(fit), None, editor.directions_for(controls))
        if strength is None:
            out, x_t, _, _ = editor.run(photos, fit, edited, steps=steps, invert=invert, seed=seed, start=start)
            start = x_t  # the same noise for every frame
            frames.append(to_uint8(out)[0])
            continue
        frame = EditResult(result.source, prepared=result.prepared, fit=fit, edited_fit=edited)
        refine_photos(editor, [frame], photos, fit, edited, strength, steps)
        picture = Image.fromarray(output_picture(editor, frame, "refined", crop, crop_size))
        if max(picture.size) > GIF_SIDE:
            scale = GIF_SIDE / max(picture.size)
            shape = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
            picture = picture.resize(shape, Image.Resampling.LANCZOS)
        frames.append(np.asarray(picture))
    return frames


def buffer_tiles(buffers: torch.Tensor) -> list[np.ndarray]:
    """The shaded and normal channels of (9, S, S) buffers as two RGB tiles."""
    shaded = buffers[0:3].clamp(0, 1)
    normal = torch.where(buffers[3:6].abs().sum(0, keepdim=True) > 0, buffers[3:6] * 0.5 + 0.5, 0)
    return [(t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for t in (shaded, normal)]


def sheet_row(result: EditResult, size: int) -> list[np.ndarray]:
    """input | original shaded, normal | edited shaded, normal | output (the paper's edit, model size)."""
    crop = np.asarray(Image.fromarray(result.prepared.crop).resize((size, size), Image.Resampling.BOX))
    return [crop, *buffer_tiles(result.original_buffers), *buffer_tiles(result.edited_buffers), result.output]


def _crop_field(field: np.ndarray, crop_to_photo: np.ndarray, size: int) -> np.ndarray:
    """A float (H, W, C) field of the photo sampled at the crop's pixel centres (bilinear)."""
    v, u = np.mgrid[0:size, 0:size].astype(np.float64)
    x = crop_to_photo[0, 0] * u + crop_to_photo[0, 1] * v + crop_to_photo[0, 2]
    y = crop_to_photo[1, 0] * u + crop_to_photo[1, 1] * v + crop_to_photo[1, 2]
    return np.stack(
        [ndimage.map_coordinates(field[..., c], [y, x], order=1, mode="nearest") for c in range(field.shape[-1])], -1
    )


def flow_tile(flow: np.ndarray, crop_to_photo: np.ndarray, size: int) -> np.ndarray:
    """The displacement in the crop's frame as colour: hue the direction, brightness the length (full
    at the largest, black where nothing moves); photo pixels, scaled to the crop."""
    field = _crop_field(flow, crop_to_photo, size) / np.sqrt(abs(np.linalg.det(crop_to_photo[:, :2])))
    length = np.linalg.norm(field, axis=-1)
    hue = (np.arctan2(field[..., 1], field[..., 0]) / (2 * np.pi)) % 1.0
    value = np.clip(length / max(float(length.max()), 0.5), 0, 1)
    hsv = np.stack([hue, np.ones_like(hue), value], -1)
    return np.asarray(Image.fromarray((hsv * 255).round().astype(np.uint8), "HSV").convert("RGB"))


def ratio_tile(ratio: np.ndarray, crop_to_photo: np.ndarray, size: int) -> np.ndarray:
    """The shading ratio in the crop's frame as grey: mid-grey 1 (unchanged), white 4x, black 1/4."""
    field = _crop_field(ratio, crop_to_photo, size)
    return np.clip(128 + 127 * np.log2(np.maximum(field, 1e-6)) / 2, 0, 255).round().astype(np.uint8)


def method_sheet_row(result: EditResult, size: int) -> list[np.ndarray]:
    """input | physical edit | output | displacement | shading ratio, as aligned crops of ``size``
    from the full-resolution pictures (the strength method's sheet). At strength 1 the physical edit
    is not made: its tiles show the photo, no motion and a ratio of 1."""
    prepared = result.prepared
    crop_to_photo = compose_affine(prepared.crop_to_photo, resize_affine(prepared.crop.shape[0], size))
    edit = result.physical
    height, width = prepared.pixels.shape[:2]
    physical = prepared.pixels if edit is None else edit.image
    flow = np.zeros((height, width, 2), np.float32) if edit is None else edit.flow
    ratio = np.ones((height, width, 3), np.float32) if edit is None else edit.ratio
    return [
        warp(prepared.pixels, crop_to_photo, size),
        warp(physical, crop_to_photo, size),
        warp(result.photo_output, crop_to_photo, size),
        flow_tile(flow, crop_to_photo, size),
        ratio_tile(ratio, crop_to_photo, size),
    ]


@dataclass
class EditedFile:
    """One input of ``edit_to_files``: its result, and the file written (None when it failed)."""

    result: EditResult
    target: Path | None


def plan_outputs(
    inputs: Sequence[Path], output: Path | None, out_dir: Path, sheet: bool, sweep: bool, force: bool
) -> dict[Path, Path]:
    """Each input's output file (``-o`` for one input, else ``out_dir/STEM-edited.png``; inputs that
    share a stem, a/x.jpg and b/x.png, get STEM-2-edited.png, STEM-3-... in the order given), after
    checking that nothing would be overwritten without ``force`` (sheets and GIFs included) and that
    every input exists: before any model is loaded."""
    if output is not None and len(inputs) != 1:
        raise RigError("-o names one output file: with several inputs use --out-dir")
    targets: dict[Path, Path] = {}
    taken: set[str] = set()
    for p in inputs:
        if p in targets:
            continue
        stem, n = p.stem, 2
        while stem.lower() in taken:
            stem, n = f"{p.stem}-{n}", n + 1
        taken.add(stem.lower())
        targets[p] = output or out_dir / f"{stem}-edited.png"
    extra = [sheet_path(t) for t in targets.values()] if sheet else []
    extra += [t.with_suffix(".gif") for t in targets.values()] if sweep else []
    existing = [str(t) for t in [*targets.values(), *extra] if t.exists()]
    if existing and not force:
        raise RigError(f"output exists (pass --force to overwrite): {', '.join(existing[:3])}")
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise RigError(f"no such photo: {', '.join(missing)}")
    return targets


def sheet_path(target: Path) -> Path:
    return target.with_name(target.stem + "-sheet.png")


SHEET_TILE = 256  # px: the tiles of the strength method's contact sheet
DEFAULT_STRENGTH = 0.3  # by measurement on a held-out real photo (benchmarks/bench_strength.py, RESULTS.md)
COMPOSE_MODES = ("refined", "plain")


def output_picture(editor: Editor, result: EditResult, compose: str, crop: bool, crop_size: int) -> np.ndarray:
    """What ``rig edit`` writes for one edited photo: the whole photo at its size, or (``crop``) the
    aligned crop at ``crop_size``; ``compose`` "refined" (the strength method) or "plain" (the
    model's crop upsampled and blended in through a feathered face mask)."""
    prepared = result.prepared
    if compose == "plain":
        if crop:
            return np.asarray(Image.fromarray(result.output).resize((crop_size,) * 2, Image.Resampling.BICUBIC))
        mask = editor.face_masks(result.fit)[0]
        return paste_back_crop(prepared.pixels, result.output, prepared.crop_to_photo, mask)
    if crop:
        crop_to_photo = compose_affine(prepared.crop_to_photo, resize_affine(editor.crop_size, crop_size))
        return warp(result.photo_output, crop_to_photo, crop_size)
    return result.photo_output


def identity_distance(analyzer: FaceAnalyzer, prepared: PreparedPhoto, picture: np.ndarray) -> float | None:
    """dlib's descriptor distance from the input's face to the face found in ``picture`` (None: none found)."""
    face = analyzer.find_face(picture)
    if face is None:
        return None
    before = analyzer.embed(prepared.pixels, prepared.landmarks)
    return float(np.linalg.norm(before - analyzer.embed(picture, face.landmarks)))


def edit_to_files(
    store,
    name: str,
    inputs: Sequence[Path],
    controls: Controls,
    *,
    output: Path | None = None,
    out_dir: Path = Path("edits"),
    paste_back: bool = False,
    compose: str = "refined",
    strength: float = DEFAULT_STRENGTH,
    crop: bool = False,
    crop_size: int = 512,
    face: int | None = None,
    sheet: bool = False,
    sweep: str | None = None,
    force: bool = False,
    steps: int = 20,
    invert: bool = True,
    seed: int = 0,
    batch: int = 8,
    device: str = "cpu",
    model: Path | None = None,
    engine: str = "torch",
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[EditedFile]:
    """``rig edit``: edit photos of a person and write each result: the whole photo at its size (the
    default; ``paste_back``, its old name, asks for it explicitly), or with ``crop`` the aligned crop
    at ``crop_size``, by ``compose`` "refined" (the physical edit refined by the model as far as
    ``strength``, see ``refine_photos``) or "plain" (the paper's edit at the model's size, upsampled
    and blended in); with a contact sheet (``sheet``) and a GIF of one control (``sweep``, e.g.
    ``smile=0:1:8``) beside it. Outputs are planned and checked before the model loads; each file
    is written whole or not at all. Each result carries the identity distance from input to output.
    In a photo with several faces the person's is edited (``person_face``), or the ``face``-th."""
    if crop and paste_back:
        raise RigError("--crop writes the aligned crop, --paste-back the whole photo: choose one")
    if compose not in COMPOSE_MODES:
        raise RigError(f"--compose {compose!r}: choose one of {', '.join(COMPOSE_MODES)}")
    if not 0 <= strength <= 1:
        raise RigError(f"--strength {strength}: give a value between 0 and 1")
    if compose == "refined" and not invert:
        raise RigError("--no-invert starts the paper's edit from noise: use it with --compose plain")
    targets = plan_outputs(inputs, output, out_dir, sheet, sweep is not None, force)
    moved = on_progress or (lambda stage, done, total: None)
    if EngineSpec.parse(engine).kind in ("onnx", "trt"):  # exported or built on first use: minutes
        moved(f"preparing the {engine} engine (made once, then reused)", 0, len(inputs))
    editor = Editor(store, name, model_dir=model, device=device, engine=engine)
    controls.validate(editor.control_names)
    sweep_spec = parse_sweep(sweep, editor.control_names) if sweep else None
    results = edit_photos(
        editor, inputs, controls, steps=steps, invert=invert, seed=seed, batch=batch, on_progress=on_progress,
        strength=strength if compose == "refined" else None, face=face,
    )  # fmt: skip
    written = []
    for result in results:
        if result.output is None:
            written.append(EditedFile(result, None))
            continue
        target = targets[result.source]
        picture = output_picture(editor, result, compose, crop, crop_size)
        result.identity_distance = identity_distance(editor.analyzer, result.prepared, picture)
        atomic_write_bytes(target, encode_png(picture))
        if sheet:
            row = sheet_row(result, editor.size) if compose == "plain" else method_sheet_row(result, SHEET_TILE)
            atomic_write_bytes(sheet_path(target), encode_png(grid(row, len(row))))
        if sweep_spec:
            moved(f"sweep {sweep_spec[0]}", len(written), len(results))
            frames = sweep_frames(
                editor, result, controls, *sweep_spec, steps=steps, seed=seed, invert=invert,
                strength=strength if compose == "refined" else None, crop=crop, crop_size=crop_size,
            )  # fmt: skip
            gif = iio.imwrite("<bytes>", np.stack(frames), extension=".gif", duration=150, loop=0)
            atomic_write_bytes(target.with_suffix(".gif"), gif)
        written.append(EditedFile(result, target))
    return written
