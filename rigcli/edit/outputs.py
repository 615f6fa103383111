"""What ``rig edit`` writes: each output planned and checked before any model loads, the picture of
each edit (whole photo or aligned crop), its contact sheet and its sweep GIF, each file written whole
or not at all."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image

from engines import EngineSpec, resolve_engine
from rigcli import RigError
from rigcli.edit.controls import Controls, parse_sweep, sweep_controls
from rigcli.edit.editor import (
    DEFAULT_STRENGTH,
    Editor,
    EditResult,
    PreparedPhoto,
    check_strength,
    edit_photos,
    fit_reference,
    refine_photos,
)
from rigcli.edit.sheets import SHEET_TILE, method_sheet_row, sheet_row
from rigcli.files import atomic_write_bytes
from rigcli.image.align import compose_affine, resize_affine, warp
from rigcli.image.detect import FaceAnalyzer
from rigcli.image.grid import grid, to_uint8
from rigcli.image.photo import encode_png
from rigcli.render.compose import paste_back_crop

COMPOSE_MODES = ("refined", "plain")
GIF_SIDE = 768  # px: the longest side of a sweep's frames


@dataclass
class EditedFile:
    """One input of ``edit_to_files``: its result, the file written (None when it failed), and the dlib
    identity distance from the input's face to the output's (None: no face found in the output)."""

    result: EditResult
    target: Path | None
    identity_distance: float | None = None


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


def output_picture(result: EditResult, compose: str, crop: bool, crop_size: int) -> np.ndarray:
    """What ``rig edit`` writes for one edited photo: the whole photo at its size, or (``crop``) the
    aligned crop at ``crop_size``; ``compose`` "refined" (the strength method) or "plain" (the
    model's crop upsampled and blended in through a feathered face mask)."""
    prepared = result.prepared
    if compose == "plain":
        if crop:
            return np.asarray(Image.fromarray(result.output).resize((crop_size,) * 2, Image.Resampling.BICUBIC))
        mask = result.before.faces[result.index]
        return paste_back_crop(prepared.pixels, result.output, prepared.crop_to_photo, mask)
    if crop:
        crop_to_photo = compose_affine(prepared.crop_to_photo, resize_affine(prepared.crop.shape[0], crop_size))
        return warp(result.photo_output, crop_to_photo, crop_size)
    return result.photo_output


def identity_distance(analyzer: FaceAnalyzer, prepared: PreparedPhoto, picture: np.ndarray) -> float | None:
    """dlib's descriptor distance from the input's face to the same face in ``picture`` (the one found
    nearest it: in a group photo not the largest, which may be someone else; None: none found)."""
    points = analyzer.face_near(picture, prepared.landmarks)
    if points is None:
        return None
    before = analyzer.embed(prepared.pixels, prepared.landmarks)
    return float(np.linalg.norm(before - analyzer.embed(picture, points)))


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
    on_frame: Callable[[int, int], None] | None = None,
) -> list[np.ndarray]:
    """Frames of a sweep of one control over ``values`` for one edited photo (its fit rendered once).

    ``strength`` None (``--compose plain``): the paper's edit at the model's size, one inversion and one
    sample per value from the same x_T. A strength: each frame by the same method as the output
    (``refine_photos``: its own physical edit and refinement), the picture ``rig edit`` writes
    (whole photo or ``crop``), scaled to GIF_SIDE at most. ``on_frame(done, total)`` before each frame."""
    photos = [result.prepared]
    # rendered alone unless its batch was this photo alone: a batch's renders can differ in the last bits
    before = result.before if len(result.before) == 1 else editor.render(result.fit)
    reference = {path: fit_reference(editor, path) for path in base.needs_reference_fits}
    frames = []
    start = None
    for i, value in enumerate(values):
        if on_frame:
            on_frame(i, len(values))
        after = editor.edit_fit(before, sweep_controls(base, name, value), reference)
        if strength is None:
            out, x_t = editor.run(photos, before, after, steps=steps, invert=invert, seed=seed, start=start)
            start = x_t  # the same noise for every frame
            frames.append(to_uint8(out)[0])
            continue
        _, (refined,) = refine_photos(editor, photos, before, after, strength, steps)
        frame = EditResult(result.source, prepared=result.prepared, before=before, after=after, refined=refined)
        picture = Image.fromarray(output_picture(frame, "refined", crop, crop_size))
        if max(picture.size) > GIF_SIDE:
            scale = GIF_SIDE / max(picture.size)
            shape = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
            picture = picture.resize(shape, Image.Resampling.LANCZOS)
        frames.append(np.asarray(picture))
    return frames


def edit_to_files(
    store,
    name: str,
    inputs: Sequence[Path],
    controls: Controls,
    *,
    output: Path | None = None,
    out_dir: Path = Path("edits"),
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
    engine: str = "auto",
    on_progress: Callable[[str, int, int], None] | None = None,
) -> list[EditedFile]:
    """``rig edit``: edit photos of a person and write each result: the whole photo at its size (the
    default), or with ``crop`` the aligned crop at ``crop_size``, by ``compose`` "refined" (the physical
    edit refined by the model as far as ``strength``, see ``refine_photos``) or "plain" (the paper's
    edit at the model's size, upsampled and blended in); with a contact sheet (``sheet``) and a GIF of
    one control (``sweep``, e.g. ``smile=0:1:8``) beside it. Outputs are planned and checked before the
    model loads; each file is written whole or not at all. In a photo with several faces the person's
    is edited (``person_face``), or the ``face``-th."""
    check_strength(strength)  # before the model loads
    if compose not in COMPOSE_MODES:
        raise RigError(f"--compose {compose!r}: choose one of {', '.join(COMPOSE_MODES)}")
    if compose == "refined" and not invert:
        raise RigError("--no-invert starts the paper's edit from noise: use it with --compose plain")
    targets = plan_outputs(inputs, output, out_dir, sheet, sweep is not None, force)
    last = [0, len(inputs)]  # where the progress line stands, for the engine's status messages

    def moved(stage: str, done: int, total: int) -> None:
        last[:] = [done, total]
        if on_progress:
            on_progress(stage, done, total)

    if EngineSpec.parse(resolve_engine(engine, device)).kind in ("onnx", "trt"):  # made on first use: minutes
        moved(f"preparing the {engine} engine (made once, then reused)", 0, len(inputs))
    editor = Editor(
        store, name, model_dir=model, device=device, engine=engine, on_status=lambda text: moved(text, *last)
    )
    sweep_spec = parse_sweep(sweep, editor.control_names) if sweep else None
    for value in sweep_spec[1] if sweep_spec else ():  # every frame's controls checked before any edit
        sweep_controls(controls, sweep_spec[0], value).validate(editor.control_names)
    method_strength = strength if compose == "refined" else None
    results = edit_photos(
        editor, inputs, controls, steps=steps, invert=invert, seed=seed, batch=batch, on_progress=moved,
        strength=method_strength, face=face,
    )  # fmt: skip
    written = []
    for result in results:
        if result.prepared is None:
            written.append(EditedFile(result, None))
            continue
        target = targets[result.source]
        picture = output_picture(result, compose, crop, crop_size)
        distance = identity_distance(editor.analyzer, result.prepared, picture)
        atomic_write_bytes(target, encode_png(picture))
        if sheet:
            row = sheet_row(result, editor.size) if compose == "plain" else method_sheet_row(result, SHEET_TILE)
            atomic_write_bytes(sheet_path(target), encode_png(grid(row, len(row))))
        if sweep_spec:
            moved(f"sweep {sweep_spec[0]}", len(written), len(results))
            frames = sweep_frames(
                editor, result, controls, *sweep_spec, steps=steps, seed=seed, invert=invert,
                strength=method_strength, crop=crop, crop_size=crop_size,
            )  # fmt: skip
            gif = iio.imwrite("<bytes>", np.stack(frames), extension=".gif", duration=150, loop=0)
            atomic_write_bytes(target.with_suffix(".gif"), gif)
        written.append(EditedFile(result, target, distance))
    return written
