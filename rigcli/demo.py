"""The demo: the whole pipeline on an album of one real person, offline, in a few CPU minutes.

The album is made from the public-domain astronaut photo scikit-image ships: each photo is the
portrait under a known similarity transform (scale, rotation, shift, sometimes a mirror), with
colour, gamma and compression changes, saved in several formats. The transform is returned with
each file so tests can check geometry against it. ``run_demo`` then adds the person, fine-tunes a
tiny model from scratch and edits the photo kept out of the album, with the embedded face model
unless the store has an imported one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from scipy import ndimage
from skimage import data

from rigcli.assets.ict import download_ict, import_ict
from rigcli.edit.controls import Controls
from rigcli.edit.editor import DEFAULT_STRENGTH, Editor, edit_photos
from rigcli.edit.sheets import SHEET_TILE, method_sheet_row
from rigcli.enroll import AddReport, add_photos, aligned_sheet, fit_sheet
from rigcli.face.ict import ict_available
from rigcli.files import atomic_write_bytes
from rigcli.image.align import invert_affine
from rigcli.image.grid import grid
from rigcli.image.photo import encode_png
from rigcli.store import Store
from rigcli.train.stages import finetune

PERSON = "astronaut"
DEMO_EDITS = {  # output name -> controls
    "light-left": {"light": "left"},
    "light-right": {"light": "right"},
    "smile": {"expression": {"smile": 0.9}},
    "yaw": {"yaw": 15.0},
}


@dataclass(frozen=True)
class AlbumPhoto:
    """One generated photo and the 2x3 transform from astronaut pixels to its pixels."""

    path: Path
    source_to_photo: np.ndarray
    mirrored: bool


def astronaut() -> np.ndarray:
    """The 512x512 RGB astronaut portrait (Eileen Collins, NASA, public domain)."""
    return np.ascontiguousarray(data.astronaut())


def similarity(scale: float, degrees: float, mirror: bool = False, shift=(0.0, 0.0)) -> np.ndarray:
    """2x3 matrix: optional mirror about x, then rotate counter-clockwise on screen, scale, shift."""
    theta = np.deg2rad(degrees)
    # image y points down, so a counter-clockwise turn on screen is a negative angle in (x, y)
    rot = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    flip = np.diag([-1.0, 1.0]) if mirror else np.eye(2)
    linear = scale * rot @ flip
    return np.concatenate([linear, np.asarray(shift, dtype=np.float64)[:, None]], axis=1)


def transform_image(rgb: np.ndarray, source_to_photo: np.ndarray, width: int, height: int) -> np.ndarray:
    """Render ``rgb`` through a 2x3 transform onto a width x height canvas (edges reflected)."""
    inverse = invert_affine(source_to_photo)  # photo (x, y) -> source (x, y)
    # ndimage works in (row, col) = (y, x): swap axes of the inverse transform
    swap = np.array([[0, 1], [1, 0]])
    matrix = swap @ inverse[:, :2] @ swap
    offset = swap @ inverse[:, 2]
    channels = [
        ndimage.affine_transform(
            rgb[:, :, c].astype(np.float32), matrix, offset, output_shape=(height, width), order=1, mode="mirror"
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels, axis=2), 0, 255).round().astype(np.uint8)


def make_album(folder: Path, count: int = 12, seed: int = 0, max_scale: float = 2.0) -> list[AlbumPhoto]:
    """Write ``count`` varied copies of the astronaut into ``folder``; return them with their transforms.

    Photo 0 is the original itself; the others rotate by up to 12 degrees, scale by 0.7 to
    ``max_scale``, shift, mirror one in four, and vary colour, gamma and file format.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    source = astronaut()
    face_center = np.array([220.0, 125.0])  # astronaut pixels, between the eyes and the mouth
    formats = [".jpg", ".png", ".webp", ".jpg", ".bmp", ".tif", ".jpg"]
    album = []
    for i in range(count):
        if i == 0:
            matrix, width, height, mirrored = similarity(1.0, 0.0), 512, 512, False
            pixels = source
        else:
            scale = float(rng.uniform(0.7, max_scale))
            degrees = float(rng.uniform(-12, 12))
            mirrored = i % 4 == 3
            width = int(rng.integers(380, 560) * scale)
            height = int(rng.integers(380, 560) * scale)
            # put the face somewhere in the middle third of the canvas
            target = np.array([width, height]) * rng.uniform(0.35, 0.65, size=2)
            matrix = similarity(scale, degrees, mirrored)
            matrix[:, 2] = target - matrix[:, :2] @ face_center
            pixels = transform_image(source, matrix, width, height).astype(np.float32)
            gain = rng.uniform(0.8, 1.15, size=3)  # white balance
            gamma = rng.uniform(0.8, 1.25)
            pixels = 255.0 * np.clip(pixels * gain / 255.0, 0, 1) ** gamma
            pixels = pixels.round().astype(np.uint8)
            if i == 5:  # one black-and-white print
                pixels = np.repeat(pixels.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
        ext = ".png" if i == 0 else formats[i % len(formats)]
        path = folder / f"astronaut_{i:02d}{ext}"
        kwargs = {"quality": int(rng.integers(55, 95))} if ext in (".jpg", ".webp") else {}
        iio.imwrite(path, pixels, extension=ext, **kwargs)
        album.append(AlbumPhoto(path, matrix, mirrored))
    return album


@dataclass
class DemoResult:
    """What the demo wrote, for the summary."""

    aligned: Path
    fit: Path
    edits: dict[str, Path] = field(default_factory=dict)
    warnings: dict[str, str] = field(default_factory=dict)  # per edit, what `rig edit` would warn of
    sheet: Path | None = None
    steps: int = 0


def run_demo(
    store: Store,
    out_dir: Path,
    photos: int = 12,
    steps: int = 600,
    ict: Path | None = None,
    device: str = "cpu",
    add: Callable[[Store, str, list[Path]], AddReport] | None = None,
    on_message: Callable[[str], None] | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> DemoResult:
    """Album, add-person, fit sheets, a tiny model fine-tuned from scratch, and four edits of the
    photo kept out of the album (made as ``rig edit`` makes them), all under ``out_dir``. ``add``
    adds the album (default ``enroll.add_photos``; the CLI passes its own, with progress and the
    report table)."""
    say = on_message or (lambda text: None)
    moved = on_progress or (lambda stage, done, total: None)
    store.ensure_writable()
    if ict is not None:
        say(f"importing ICT-FaceKit from {ict}")
        import_ict(ict, store)
    elif not ict_available(store):
        say("no face model in the package or the store: downloading ICT-FaceKit (MIT, about 400 MB)")
        download_ict(store)
    say(f"making an album of {photos} photos in {out_dir / 'album'}")
    album = make_album(out_dir / "album", photos)
    (add or add_photos)(store, PERSON, [a.path for a in album[1:]])  # photo 0 is kept out: it is the one edited
    result = DemoResult(out_dir / "aligned.png", out_dir / "fit.png", steps=steps)
    atomic_write_bytes(result.aligned, encode_png(aligned_sheet(store, PERSON)))
    atomic_write_bytes(result.fit, encode_png(fit_sheet(store, PERSON)))
    finetune(
        store, PERSON, from_scratch=True, preset_name="tiny", steps=steps, batch=4, lr=3e-4, device=device,
        checkpoint_every=max(steps // 4, 1), restart=True,
        on_step=lambda step, loss: moved(f"fine-tuning  loss {loss:.3f}", step, steps),
    )  # fmt: skip
    editor = Editor(store, PERSON, device=device)
    rows = []
    for i, (label, fields) in enumerate(DEMO_EDITS.items()):
        moved("editing", i, len(DEMO_EDITS))
        (edited,) = edit_photos(editor, [album[0].path], Controls(**fields), steps=20, strength=DEFAULT_STRENGTH)
        result.edits[label] = out_dir / "edits" / f"{label}.png"
        atomic_write_bytes(result.edits[label], encode_png(edited.photo_output))  # as rig edit writes it
        if edited.warning:
            result.warnings[label] = edited.warning
        rows.extend(method_sheet_row(edited, SHEET_TILE))
    moved("editing", len(DEMO_EDITS), len(DEMO_EDITS))
    result.sheet = out_dir / "edits" / "sheet.png"
    atomic_write_bytes(result.sheet, encode_png(grid(rows, 5)))
    return result
