"""The studio's service: ``rig edit``'s controls behind a local web page, over the same store and API.

``Studio`` (here, no web library) is everything the page does: list the store's people, find the
person's face in an uploaded or album photo as ``rig edit`` does, preview a setting of the controls
by rendering the edited face model over the photo (no diffusion model: tens of milliseconds), and
edit with the person's model by ``edit_photos`` itself, writing only under its output folder.
``rigcli.studio.page`` builds the Gradio page over it; Gradio is imported there, lazily.

The page never hands the studio a path: photos arrive as uploads (files Gradio stored under the
studio's own upload folder) or as the person's photo ids, which are looked up in their manifest.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from engines import ENGINES, OPTIONS, EngineSpec
from rigcli import RigError
from rigcli.edit.controls import EXPRESSION_CONTROLS, Controls, parse_sweep
from rigcli.edit.editor import DEFAULT_STRENGTH, Editor, EditResult, PreparedPhoto, edit_photos, fit_reference
from rigcli.edit.outputs import identity_distance, output_picture, sweep_frames
from rigcli.enroll import describe, fit_sheet
from rigcli.face.params import FaceFit, rescale_fit
from rigcli.files import atomic_write_bytes
from rigcli.image.align import compose_affine, resize_affine, warp
from rigcli.image.photo import encode_png
from rigcli.render.buffers import LIGHT_DIRECTIONS, Rendered, render_buffers

PREVIEW_SIZE = 384  # px: the side of the live preview's aligned crop
LIGHT_MODES = ("photo", *LIGHT_DIRECTIONS, "direction", "album photo")  # "photo": the light it was taken in
UNCHANGED = 0.005  # an expression slider this close to the photo's fitted amount leaves it alone
CACHED_PHOTOS = 8  # prepared and fitted photos kept for previews


@dataclass
class Settings:
    """Everything the page's controls hold: the same controls as ``rig edit``'s options.

    Expression sliders start at the photo's fitted amounts (``PhotoSession.amounts``); a control is
    applied only where its slider moved, so an untouched photo keeps its own expression, as it does
    when ``rig edit`` is not given that option."""

    light: str = "photo"  # one of LIGHT_MODES
    light_yaw: float = 0.0  # degrees, with light "direction"
    light_pitch: float = 0.0
    set_intensity: bool = False  # False: brightness kept as the photo's (as rig edit without --light-intensity)
    intensity: float = 0.8
    ambient: float = 0.35
    light_photo: str | None = None  # an album photo id, with light "album photo"
    expression: dict[str, float] = field(default_factory=dict)  # control name -> slider value
    blend_name: str | None = None
    blend_weight: float = 0.0
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0


@dataclass
class PhotoSession:
    """A photo prepared and fitted for one person, with what the page shows of it."""

    key: str
    name: str
    path: Path
    prepared: PreparedPhoto
    rendered: Rendered  # its fit, rasterised once for every preview and edit of it
    amounts: dict[str, float]  # expression control -> the photo's fitted amount
    weights: dict[str, float] = field(default_factory=dict)  # the face model's blendshape -> fitted weight
    view: np.ndarray | None = None  # (PREVIEW_SIZE, PREVIEW_SIZE, 3) float: the crop the preview draws on

    @property
    def fit(self) -> FaceFit:
        return self.rendered.fit

    def weight(self, name: str) -> float:
        """The photo's fitted weight of one blendshape, where the blendshape slider starts (0 for a
        name the face model does not have: ICT's on FLAME)."""
        return self.weights.get(name, 0.0)


@dataclass
class StudioEdit:
    """One edit made in the studio: the files written and what the table of ``rig edit`` reports."""

    path: Path
    before: np.ndarray
    after: np.ndarray
    identity_distance: float | None
    reconstruction_psnr: float | None
    warning: str | None


def engine_choices(device: str) -> list[str]:
    """Engine specs that can run on ``device`` here, the plain torch engine first."""
    specs = ["torch", *(f"{kind}-{o}" for kind in ENGINES for o in OPTIONS[kind] if o in ("fp16", "bf16"))]
    specs += [k for k in ENGINES if k != "torch"]
    return [s for s in dict.fromkeys(specs) if EngineSpec.parse(s).unavailable(device) is None]


class Studio:
    """The studio's state: loaded Editors (one per person and engine), fitted photos, the output folder."""

    def __init__(self, store, out_dir: Path | None = None, device: str = "cpu", engine: str = "torch"):
        self.store, self.device, self.engine = store, device, engine
        self.out_dir = Path(out_dir) if out_dir is not None else store.root / "studio"
        self.upload_dir = self.out_dir / "uploads"  # Gradio's own files (uploads, page images) go here
        self._editors: dict[tuple[str, str], Editor] = {}
        self._photos: OrderedDict[str, PhotoSession] = OrderedDict()
        self._sheets: dict[str, np.ndarray] = {}
        self._references: dict[Path, FaceFit] = {}
        self._load_lock = threading.Lock()  # one Editor load at a time
        self._model_lock = threading.Lock()  # the model runs one request at a time; the queue waits
        EngineSpec.parse(engine)

    # -- the store

    def people(self) -> list[list]:
        """One row per person: name, photos used / in the album, 3D fit, fine-tuned model."""
        rows = []
        for name in self.store.people():
            info = describe(self.store, name)
            usable = sum(p["status"] == "ok" and p["train"] for p in info["photos"])
            fitted = "yes" if info["face_fit"] else "no"
            model = info["model"]
            status = "none: run rig finetune" if model is None else f"{model['steps']} steps, {model['preset_size']} px"
            rows.append([name, f"{usable} / {len(info['photos'])}", fitted, status])
        return rows

    def album(self, name: str) -> list[tuple[str, str]]:
        """(label, photo id) for each photo of the person, for the page's choice of photo."""
        self.store.require(name)
        return [(f"{p.id[:8]} · {p.source}", p.id) for p in self.store.load(name).photos]

    def fit_sheet(self, name: str) -> np.ndarray:
        """``rig people show --sheet``'s picture (cached per person)."""
        if name not in self._sheets:
            self._sheets[name] = fit_sheet(self.store, name)
        return self._sheets[name]

    def album_photo(self, name: str, photo_id: str) -> Path:
        """The original file of one of the person's photos, named by its id alone (no path is read
        from the page: an id that is not in the manifest is refused)."""
        record = self.store.load(self.store.require(name)).find_photo(str(photo_id))
        if record is None:
            raise RigError(f"{name} has no photo {photo_id!r}")
        return self.store.person_dir(name) / record.original

    def upload(self, path: str | Path) -> Path:
        """An uploaded file, refused unless it lies in the studio's upload folder (where Gradio puts
        what the browser sends): a request that names another file is not read."""
        path = Path(path).resolve()
        root = self.upload_dir.resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise RigError("only photos uploaded to the studio (or the person's album photos) can be edited")
        return path

    # -- the model

    def editor(self, name: str, engine: str | None = None) -> Editor:
        """The person's Editor for ``engine``, loaded once and kept; exported engines are cached under
        the studio's folder, so the store itself is not written."""
        engine = engine or self.engine
        EngineSpec.parse(engine)
        key = (name, engine)
        with self._load_lock:
            if key not in self._editors:
                root = self.out_dir / "engines" / name
                self._editors[key] = Editor(self.store, name, device=self.device, engine=engine, engine_root=root)
            return self._editors[key]

    def open_photo(self, name: str, path: Path) -> PhotoSession:
        """Find the person's face in the photo (as ``rig edit`` does: in a group photo, the face
        nearest their album), fit it with their identity held, and keep it for previews."""
        data = path.read_bytes()
        key = hashlib.sha256(name.encode() + b"\0" + data).hexdigest()[:16]
        if key in self._photos:
            self._photos.move_to_end(key)
            return self._photos[key]
        editor = self.editor(name)
        prepared = editor.prepare(path)
        fit = editor.fit([prepared])
        names = editor.face_model.expression_names
        weights = dict(zip(names, fit.expression[0].clamp(0.0, 1.0).tolist(), strict=True))
        session = PhotoSession(key, name, path, prepared, editor.render(fit), self._amounts(editor, fit), weights)
        with self._load_lock:
            self._photos[key] = session
            while len(self._photos) > CACHED_PHOTOS:
                self._photos.popitem(last=False)
        return session

    def session(self, key: str | None) -> PhotoSession:
        if not key or key not in self._photos:
            raise RigError("choose a photo first (upload one, or pick one of the album)")
        return self._photos[key]

    @staticmethod
    def _amounts(editor: Editor, fit: FaceFit) -> dict[str, float]:
        """Each expression control's amount in the fit: the mean weight of its blendshapes (on FLAME
        without ICT's names, 0)."""
        names = editor.face_model.expression_names
        amounts = {}
        for control, shapes in EXPRESSION_CONTROLS.items():
            found = [names.index(s) for s in shapes if s in names]
            value = float(fit.expression[0, found].mean()) if found else 0.0
            amounts[control] = float(np.clip(value, 0.0, 1.0))
        return amounts

    def controls(self, session: PhotoSession, settings: Settings) -> Controls:
        """The page's settings as ``rig edit``'s Controls for this photo."""
        controls = Controls(yaw=settings.yaw, pitch=settings.pitch, roll=settings.roll)
        if settings.light not in LIGHT_MODES:
            raise RigError(f"unknown light {settings.light!r}; choose one of: {', '.join(LIGHT_MODES)}")
        if settings.light in LIGHT_DIRECTIONS:
            controls.light = settings.light
        elif settings.light == "direction":
            controls.light_dir = (settings.light_yaw, settings.light_pitch)
        elif settings.light == "album photo":
            if not settings.light_photo:
                raise RigError("choose the album photo whose light to use")
            controls.light_from = self.album_photo(session.name, settings.light_photo)
        if settings.set_intensity and controls.light_from is None and settings.light != "photo":
            controls.light_intensity, controls.ambient = settings.intensity, settings.ambient
        for control, value in settings.expression.items():
            if abs(value - session.amounts.get(control, 0.0)) > UNCHANGED:
                controls.expression[control] = float(value)
        if settings.blend_name and abs(settings.blend_weight - session.weight(settings.blend_name)) > UNCHANGED:
            controls.blend[settings.blend_name] = float(settings.blend_weight)
        return controls

    @torch.no_grad()
    def preview(self, key: str | None, settings: Settings, buffers: bool = False, opacity: float = 1.0) -> np.ndarray:
        """The edited face model's shaded render over the photo's aligned crop (PREVIEW_SIZE px), at
        ``opacity``; with ``buffers`` its normal and albedo buffers beside it. No diffusion model runs."""
        session = self.session(key)
        editor = self.editor(session.name)
        controls = self.controls(session, settings)
        controls.validate(editor.control_names)
        reference = {}
        if controls.light_from is not None:
            reference[controls.light_from] = self._reference_fit(editor, controls.light_from)
        edited = editor.edit_fit(session.rendered, controls, reference).fit
        size = PREVIEW_SIZE
        rendered = render_buffers(editor.face_model, rescale_fit(edited, editor.crop_size, size), size)[0]
        rendered = rendered.permute(1, 2, 0).numpy()
        if session.view is None:  # the photo's crop at the preview's size, made once per photo
            prepared = session.prepared
            to_photo = compose_affine(prepared.crop_to_photo, resize_affine(editor.crop_size, size))
            session.view = warp(prepared.pixels, to_photo, size).astype(np.float32)
        crop = session.view
        face = np.abs(rendered[..., 3:6]).sum(-1, keepdims=True) > 0
        shaded = np.clip(rendered[..., 0:3], 0, 1) * 255
        alpha = float(np.clip(opacity, 0.0, 1.0)) * face
        tiles = [(crop * (1 - alpha) + shaded * alpha).round().astype(np.uint8)]
        if buffers:
            tiles.append(np.where(face, rendered[..., 3:6] * 127.5 + 127.5, 0).round().astype(np.uint8))
            tiles.append((np.clip(rendered[..., 6:9], 0, 1) * 255).round().astype(np.uint8))
        return np.concatenate(tiles, axis=1)

    def _reference_fit(self, editor: Editor, path: Path) -> FaceFit:
        """The fit of an album photo whose light is asked for (fitted once)."""
        if path not in self._references:
            self._references[path] = fit_reference(editor, path)
        return self._references[path]

    def edit(
        self,
        key: str | None,
        settings: Settings,
        *,
        strength: float = DEFAULT_STRENGTH,
        steps: int = 20,
        engine: str | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> StudioEdit:
        """``rig edit``'s edit of the photo at its own size with the person's model, written as a PNG
        under the output folder (a new name per edit, written whole or not at all)."""
        session = self.session(key)
        controls = self.controls(session, settings)
        with self._model_lock:
            editor = self.editor(session.name, engine)
            results = edit_photos(
                editor, [session.path], controls, steps=steps, strength=strength, on_progress=on_progress
            )  # fmt: skip
            result = results[0]
            if result.error:
                raise RigError(result.error)
            picture = output_picture(result, "refined", False, 0)
            distance = identity_distance(editor.analyzer, result.prepared, picture)
        target = self._target(session, ".png")
        atomic_write_bytes(target, encode_png(picture))
        return StudioEdit(
            target, result.prepared.pixels, picture, distance, result.reconstruction_psnr, result.warning
        )  # fmt: skip

    def sweep(
        self,
        key: str | None,
        settings: Settings,
        spec: str,
        *,
        strength: float = DEFAULT_STRENGTH,
        steps: int = 20,
        engine: str | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> Path:
        """A GIF of one control swept (``spec`` as ``rig edit --sweep``: ``smile=0:1:8``), each frame
        made as the edit is; written under the output folder."""
        session = self.session(key)
        controls = self.controls(session, settings)
        with self._model_lock:
            editor = self.editor(session.name, engine)
            control, values = parse_sweep(spec, editor.control_names)
            controls.validate(editor.control_names)
            # the photo as it opened (found, aligned, fitted): each frame is made from it by sweep_frames
            result = EditResult(session.path, prepared=session.prepared, before=session.rendered)
            frames = sweep_frames(
                editor, result, controls, control, values, steps, 0, True, strength=strength,
                on_frame=(lambda i, n: on_progress(f"sweep {control}", i, n)) if on_progress else None,
            )  # fmt: skip
        gif = iio.imwrite("<bytes>", np.stack(frames), extension=".gif", duration=150, loop=0)
        target = self._target(session, ".gif")
        atomic_write_bytes(target, gif)
        return target

    def _target(self, session: PhotoSession, suffix: str) -> Path:
        """A new file name under the output folder: person, photo, a random part (two pages editing at
        once never share a name)."""
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in session.path.stem)[:40]
        return self.out_dir / f"{session.name}-{stem}-{uuid.uuid4().hex[:8]}{suffix}"
