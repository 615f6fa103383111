"""Editing: a pipeline over the other steps (fit, render, compose, sampler, engine); it owns no math.

For a batch of photos: detect and align each as ``add-person`` does, fit the face model with the
person's identity held fixed, render that fit once (``Rendered``), apply the controls to the fitted
parameters and render the edited fit once. Then one of two methods:
- the strength method (``rig edit``'s default, ``refine_photos``): the physical edit at the photo's
  own size (``compose.physical_edit``), refined by the model over the first strength x steps DDIM
  steps (``Editor.refine``), what the model added carried onto the photo (``compose.model_correction``,
  ``compose.transfer``);
- the paper's edit at the model's size (``Editor.run``): DDIM-invert the crop under its buffers and
  global latent, then sample under the edited buffers with the same latent (``invert=False``: from
  seeded noise).

A model conditioned on the physical edit (``rig finetune --pairs``, issue 27) also takes the edit in
the crop's frame and the mask of what the photo never showed (``Editor.condition``); the photo itself
is the condition of its own reconstruction.

Controls change parameters only (``edit.controls``). Writing files, sheets and sweeps: ``outputs``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from engines import make_engine
from rigcli import RigError
from rigcli.diffusion.checkpoints import check_base_buffers, load_model
from rigcli.diffusion.schedule import Diffusion, ddim_invert, ddim_sample, ddim_timesteps
from rigcli.edit.controls import Controls, apply_controls
from rigcli.enroll import album_embeddings, analyze_face, person_face, read_fit
from rigcli.estimate import make_estimator
from rigcli.face.params import FaceFit
from rigcli.face.registry import face_model_name, load_face_model
from rigcli.image.align import align_face, apply_affine, invert_affine, warp
from rigcli.image.detect import FaceAnalyzer
from rigcli.image.grid import to_uint8
from rigcli.image.metrics import psnr
from rigcli.image.photo import PhotoError, read_photo
from rigcli.render.buffers import Rendered
from rigcli.render.compose import PhysicalEdit, model_correction, physical_edit, transfer

DEFAULT_STRENGTH = 0.3  # by measurement on a held-out real photo (benchmarks/bench_strength.py, RESULTS.md)
POOR_RECONSTRUCTION_DB = 20.0
UNSEEN_WARN = 0.10  # of the edited head: a physical edit that must fill more of it than this is mostly paint


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


@dataclass(frozen=True)
class Refined:
    """One photo edited at its own size by the strength method (``refine_photos``)."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) float: where the image may differ from the photo
    physical: PhysicalEdit | None  # the model-free edit it started from (None at strength 1)
    reconstruction_psnr: float | None  # dB at the model's size: unedited crop vs its round trip (None at 0)
    warning: str | None = None


@dataclass(frozen=True)
class EditResult:
    """One input of ``edit_photos``: why it failed, or its edit. The fits and buffers are read from
    the batch's renders (``before``, ``after``) at ``index``: made once per batch, not per photo."""

    source: Path
    error: str | None = None
    reason: str | None = None  # a short status word for reports (PhotoError.reason), with ``error``
    prepared: PreparedPhoto | None = None
    before: Rendered | None = None  # the batch's fit, rendered
    after: Rendered | None = None  # the batch's edited fit, rendered
    index: int = 0
    output: np.ndarray | None = None  # (S, S, 3) uint8 at the model's size (the paper's edit, or the refined crop)
    refined: Refined | None = None  # the photo at its own size (the strength method)

    @property
    def fit(self) -> FaceFit:
        return self.before.fit.select([self.index])

    @property
    def edited_fit(self) -> FaceFit:
        return self.after.fit.select([self.index])

    @property
    def original_buffers(self) -> torch.Tensor:
        return self.before.buffers[self.index]

    @property
    def edited_buffers(self) -> torch.Tensor:
        return self.after.buffers[self.index]

    @property
    def photo_output(self) -> np.ndarray | None:
        return None if self.refined is None else self.refined.image

    @property
    def photo_mask(self) -> np.ndarray | None:
        return None if self.refined is None else self.refined.mask

    @property
    def physical(self) -> PhysicalEdit | None:
        return None if self.refined is None else self.refined.physical

    @property
    def reconstruction_psnr(self) -> float | None:
        return None if self.refined is None else self.refined.reconstruction_psnr

    @property
    def warning(self) -> str | None:
        return None if self.refined is None else self.refined.warning


def model_input(crops: np.ndarray, size: int) -> torch.Tensor:
    """Aligned crops (B, C, C, 3) uint8 as the model sees them: (B, 3, s, s) area-resized to its size
    s, in [-1, 1] (``area_resize`` in 8-bit levels)."""
    return area_resize(crops, size) / 127.5 - 1.0


def area_resize(crops: np.ndarray, size: int) -> torch.Tensor:
    """(B, C, C, 3) uint8 -> (B, 3, s, s) float in 8-bit levels, area-resized (the model's view)."""
    tensor = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()
    return torch.nn.functional.interpolate(tensor, size=(size, size), mode="area")


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
        on_status: Callable[[str], None] | None = None,
    ):
        """``engine_root``: where exported engines are cached (default the person's ``engines/``); a
        compiled engine's code is cached under the store's ``cache/inductor`` for every model and
        person (inductor keys it by the graph, not the weights); ``on_status`` hears what takes long."""
        folder = store.require_model(name, model_dir)
        fit_doc = read_fit(store, name)
        if fit_doc is None:
            raise RigError(f"{name} has no 3D fit: run `rig refit {name}`")
        self.store, self.name, self.device = store, name, device
        self.model, self.model_info = load_model(folder, device)
        self.face_model = load_face_model(store, face_model_name(fit_doc))
        if self.model_info.get("face_model_id") is not None:
            check_base_buffers(str(folder), self.model_info, name, self.face_model.model_id)
        self.identity = torch.tensor(fit_doc["identity"], dtype=torch.float32)
        self.estimator = make_estimator(store, fit_doc.get("estimator", "landmarks"))  # as the album was fitted
        manifest = store.load(name)
        self.crop_size = manifest.align_size
        self.album = np.stack(list(album_embeddings(store, name, manifest).values()))  # (N, 128) dlib
        self.analyzer = FaceAnalyzer(detector)
        root = engine_root or store.person_dir(name) / "engines"
        # the runtime that serves eps = f(x_t, t, buffers, latent) for the sampler (see engines)
        self.denoise = make_engine(
            engine, self.model.denoisingUNet, root, self.size, device, source=str(folder.resolve()),
            compile_cache=store.root / "cache" / "inductor", on_status=on_status,
        )  # fmt: skip

    @property
    def size(self) -> int:
        return self.model.cfg.image_size

    @property
    def conditioned(self) -> bool:
        """The model refines a physical edit it is shown (``rig finetune --pairs``)."""
        return bool(self.model.cfg.edit_channels)

    def condition(self, buffers: torch.Tensor, crops: np.ndarray, unseen: np.ndarray | None = None) -> torch.Tensor:
        """What the UNet is conditioned on: ``buffers`` (B, 9, s, s), and for a model conditioned on the
        physical edit, the edit's aligned crops (B, C, C, 3) uint8 in [-1, 1] and where it shows what the
        photo never did (``unseen`` (B, C, C) in [0, 1]; None: nothing, the photo as its own edit)."""
        if not self.conditioned:
            return buffers
        mask = np.zeros(crops.shape[:3], np.float32) if unseen is None else np.asarray(unseen, np.float32)
        levels = area_resize(np.concatenate([crops.astype(np.float32), mask[..., None] * 255], -1), self.size)
        edit = torch.cat([levels[:, :3] / 127.5 - 1.0, levels[:, 3:] / 255.0], 1)
        return torch.cat([buffers, edit.to(buffers.device, buffers.dtype)], 1)

    def crop_edits(
        self, photos: list[PreparedPhoto], before: Rendered, after: Rendered
    ) -> tuple[np.ndarray, np.ndarray]:
        """The physical edit of each photo's aligned crop, in the crop's own frame, and where it filled
        what the photo never showed: ((B, C, C, 3) uint8, (B, C, C) float32), as ``rig finetune --pairs``
        made its training pairs."""
        edits = [
            physical_edit(p.crop, np.eye(2, 3), self.crop_size, self.face_model, before.fit.select([k]),
                          after.fit.select([k]), landmarks=p.crop_landmarks)
            for k, p in enumerate(photos)
        ]  # fmt: skip
        return np.stack([e.image for e in edits]), np.stack([e.fill for e in edits]).astype(np.float32)

    @cached_property
    def control_names(self) -> list[str]:
        """Blendshape names ``--blend`` and ``--sweep`` accept (the face model's answer)."""
        return self.face_model.control_names(self.store)

    @cached_property
    def _expression_directions(self) -> dict[str, torch.Tensor] | None:
        return self.face_model.expression_directions(self.store)

    def directions_for(self, controls: Controls) -> dict[str, torch.Tensor] | None:
        """The face model's directions for blendshapes it does not have itself (``apply_controls``),
        loaded only when the controls name an expression."""
        if not (controls.expression or set(controls.blend) - set(self.face_model.expression_names)):
            return None
        return self._expression_directions

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

    def render(self, fit: FaceFit) -> Rendered:
        """The fit (crop frame), to be rasterised once for everything asked of it (``Rendered``)."""
        return Rendered(self.face_model, fit, self.crop_size, self.size)

    def edit_fit(self, before: Rendered, controls: Controls, reference: dict[Path, FaceFit] | None = None) -> Rendered:
        """The controls applied to a rendered fit's parameters, as a fit to render."""
        edited = apply_controls(
            before.fit, controls, self.face_model.expression_names, before.skin_normals, reference,
            self.directions_for(controls),
        )  # fmt: skip
        return self.render(edited)

    @torch.no_grad()
    def run(
        self,
        photos: list[PreparedPhoto],
        before: Rendered,
        after: Rendered,
        steps: int = 20,
        invert: bool = True,
        seed: int = 0,
        callback: Callable[[int, int], None] | None = None,
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's edit, batched: (outputs in [-1, 1], x_T) at the model's size."""

        device = self.device
        crops = np.stack([p.crop for p in photos])
        images = model_input(crops, self.size).to(device)
        original, changed = before.buffers.to(device), after.buffers.to(device)
        latent = self.model.encode(images)
        edit_latent = latent
        if self.conditioned:  # the physical edit in the crop's frame is the condition of the edited branch
            edits, unseen = self.crop_edits(photos, before, after)
            original, changed = self.condition(original, crops), self.condition(changed, edits, unseen)
            edit_latent = self.model.encode(model_input(edits, self.size).to(device))
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
            lambda x, t: self.denoise(x, t, changed, edit_latent), x_t, diffusion, ts, clip=not invert,
            callback=(lambda i, n: callback(offset + i, total)) if callback else None,
        )  # fmt: skip
        return out.cpu(), x_t

    @torch.no_grad()
    def refine(
        self,
        photos: list[PreparedPhoto],
        before: Rendered,
        after: Rendered,
        physical: np.ndarray,
        strength: float,
        steps: int = 20,
        callback: Callable[[int, int], None] | None = None,
        unseen: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's part of the edit at ``strength`` in [0, 1], both branches in one batch.

        ``physical`` (B, crop, crop, 3) uint8: the physical edit in the aligned crop's frame. The edited
        branch takes it (at strength 1 the original crop, as the paper) into noise for the first
        round(strength x steps) DDIM timesteps under the edited buffers (at 1 the original ones) and
        samples it back under the edited buffers; the reconstruction branch does the same to the
        unedited crop under its own buffers. Returns (edited samples, reconstructions, the edited
        branch's input, the unedited crop), (B, 3, s, s) in [-1, 1] at the model's size s. At
        strength 0 nothing is called (and nothing rendered): the samples are the inputs.

        A model conditioned on the physical edit (``unseen``: where the edit filled what the photo never
        showed, crop frame) is run as the paper edits with buffers, inverting under the condition the
        picture has and sampling under the one asked: the physical edit (at every strength) is inverted
        with itself as a real photo (the album's photo-with-itself pairs: its own crop, nothing filled)
        and sampled back with itself as a physical edit (its unseen mask), which the album's pairs
        taught the model to make into a real photo; each branch is encoded from its own input. The
        unedited crop makes the same round trip as itself.
        """
        device = self.device
        crops = np.stack([p.crop for p in photos])
        unedited = model_input(crops, self.size)
        start = unedited if strength >= 1 and not self.conditioned else model_input(physical, self.size)
        count = round(strength * steps)
        if count == 0:
            return start.clone(), unedited.clone(), start, unedited
        batch = len(photos)
        original, changed = before.buffers.to(device), after.buffers.to(device)
        images = torch.cat([start, unedited]).to(device)
        if self.conditioned:
            own = self.condition(original, crops)
            into = torch.cat([self.condition(changed, physical), own])
            back = torch.cat([self.condition(changed, physical, unseen), own])
            latent = self.model.encode(images)
        else:
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


def check_strength(strength: float) -> None:
    if not 0 <= strength <= 1:
        raise RigError(f"--strength {strength}: give a value between 0 and 1")


def fit_reference(editor: Editor, path: Path) -> FaceFit:
    """Fit a reference photo (--light-from, ...) with its own identity: it need not be the person."""

    try:
        photo = editor.prepare(Path(path), anyone=True)
    except PhotoError as exc:
        raise RigError(f"cannot use {path} as a reference: {exc}") from exc
    return editor.fit([photo], hold_identity=False)


def refine_photos(
    editor: Editor,
    photos: list[PreparedPhoto],
    before: Rendered,
    after: Rendered,
    strength: float,
    steps: int,
    callback: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, list[Refined]]:
    """The edit at the photos' own size: the physical edit, refined by the model as far as ``strength``.

    Per photo: the physical edit (``compose.physical_edit``; skipped at strength 1, where the model
    starts from the photo itself, unless the model is conditioned on it); the model's two branches
    (``Editor.refine``); and what the model added (``compose.model_correction``) carried onto the
    physical edit (without one, at strength 1: onto the photo; held off the lids a blink shut) inside
    the feathered faces of θ0 and θ1 (``compose.transfer``).
    Returns the edited samples (B, 3, s, s) in [-1, 1] and each photo's result, with a warning where
    the model reconstructs the photo under POOR_RECONSTRUCTION_DB.
    """
    check_strength(strength)
    size = editor.crop_size
    physical: list[PhysicalEdit | None] = [None] * len(photos)
    unseen = None
    if strength < 1 or editor.conditioned:  # a conditioned model is shown the physical edit at any strength
        physical = [
            physical_edit(p.pixels, p.crop_to_photo, size, editor.face_model, before.fit.select([k]),
                          after.fit.select([k]), landmarks=p.landmarks)
            for k, p in enumerate(photos)
        ]  # fmt: skip
        crops = np.stack([warp(e.image, p.crop_to_photo, size) for e, p in zip(physical, photos, strict=True)])
        # the mask as a grey picture of its own (four channels would be RGBA, whose reduction premultiplies)
        filled = [np.repeat(np.round(e.fill * 255).astype(np.uint8)[..., None], 3, -1) for e in physical]
        unseen = np.stack([warp(f, p.crop_to_photo, size)[..., 0] for f, p in zip(filled, photos, strict=True)])
        unseen = unseen.astype(np.float32) / 255
    else:
        crops = np.stack([p.crop for p in photos])
    samples, recon, start, unedited = editor.refine(photos, before, after, crops, strength, steps, callback, unseen)
    correction = model_correction(samples, start, recon, unedited, trust=strength < 1)  # 1: the model alone
    faces = before.faces | after.faces
    refined = []
    for k, (photo, edit) in enumerate(zip(photos, physical, strict=True)):
        base = photo.pixels if edit is None else edit.image
        base_mask = np.zeros(base.shape[:2], np.float32) if edit is None else edit.mask
        delta = correction[k].permute(1, 2, 0).numpy()
        hold = None if edit is None else edit.lids
        image, mask = transfer(base, base_mask, delta, photo.crop_to_photo, size, faces[k], hold)
        image = keep_grey(photo.pixels, image)
        db, warnings = None, []
        if strength > 0:
            db = psnr(recon[k], unedited[k], value_range=(-1, 1))
            if db < POOR_RECONSTRUCTION_DB:
                warnings.append(
                    f"the model reconstructs this photo at only {db:.1f} dB (under {POOR_RECONSTRUCTION_DB:.0f}):"
                    " its part of the edit is unreliable; a lower --strength trusts it less"
                )
        share = unseen_share(unseen[k], after.faces[k]) if unseen is not None and strength < 1 else 0.0
        if round(100 * share) > round(100 * UNSEEN_WARN):  # as the message rounds it
            warnings.append(
                f"the edit shows {100 * share:.0f} % of the head that the photo never showed (a turn this large is "
                "beyond a warp): it is inpainted from its surroundings there; a smaller turn reads better"
            )
        refined.append(Refined(image, mask, edit, db, "; ".join(warnings) or None))
    return samples, refined


def keep_grey(source: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3 uint8) as grey, each pixel its channels' mean, when the photo ``source`` is
    grey (a black-and-white photo, its three channels equal everywhere): the model's correction and
    the render that fills an opened mouth carry colour the photo never had, a tint in a picture that
    has none. Pixels whose channels are already equal (all outside the edit) are unchanged."""
    if not (np.array_equal(source[..., 0], source[..., 1]) and np.array_equal(source[..., 1], source[..., 2])):
        return image
    return np.repeat(np.round(image.mean(-1, dtype=np.float32)).astype(np.uint8)[..., None], 3, -1)


def unseen_share(unseen: np.ndarray, head: np.ndarray) -> float:
    """The share of the edited head (``head``: θ1's mesh in the crop, bool) that the physical edit
    filled (``unseen``: its fill weight in the crop, in [0, 1]): surface the photo never showed."""
    return float(unseen[head].mean()) if head.any() else 0.0


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
    references: dict[Path, FaceFit] | None = None,
) -> list[EditResult]:
    """Edit many photos: every input gets a result; one that fails (no face, unreadable) says why
    and the rest go on. Usable photos go through the model in batches of ``batch``.

    ``strength`` None: the paper's edit at the model's size (``output``). A strength S in [0, 1]:
    also the photo edited at its own size (``photo_output``), by ``refine_photos``. ``references``: the
    reference photos' fits (``fit_reference``) by path, filled in here as they are made, so that edits
    to the same reference (rig eval --cross) fit it once."""
    if strength is not None:
        check_strength(strength)
    controls.validate(editor.control_names)
    # one fit per reference photo, however many of --light-from, --expression-from, --pose-from name it
    reference = {} if references is None else references
    for path in controls.needs_reference_fits:
        if path not in reference:
            reference[path] = fit_reference(editor, path)
    results: list[EditResult] = []
    for i, source in enumerate(Path(p) for p in inputs):
        try:
            results.append(EditResult(source, prepared=editor.prepare(source, face)))
        except PhotoError as exc:
            results.append(EditResult(source, error=f"{exc.reason}: {exc}", reason=exc.reason))
        if on_progress:
            on_progress("reading", i + 1, len(inputs))
    ready = [i for i, r in enumerate(results) if r.prepared is not None]
    for first in range(0, len(ready), batch):
        chunk = ready[first : first + batch]
        photos = [results[i].prepared for i in chunk]
        before = editor.render(editor.fit(photos))
        after = editor.edit_fit(before, controls, reference)

        def report(i: int, n: int, first: int = first, count: int = len(chunk)) -> None:
            if on_progress:
                on_progress("editing", first + round(i / n * count), len(ready))

        if strength is None:
            out, _ = editor.run(photos, before, after, steps=steps, invert=invert, seed=seed, callback=report)
            refined = [None] * len(chunk)
        else:
            out, refined = refine_photos(editor, photos, before, after, strength, steps, report)
        outputs = to_uint8(out)
        for k, i in enumerate(chunk):
            results[i] = EditResult(
                results[i].source, prepared=photos[k], before=before, after=after, index=k,
                output=keep_grey(photos[k].pixels, outputs[k]),
                refined=refined[k],
            )  # fmt: skip
    return results
