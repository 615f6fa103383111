"""Issue 27's pairs measure (rigcli.evaluate.quality.pair_error): photo A edited to take photo B's
pose, expression and light, aligned to B by the similarity of dlib's landmarks, against B itself.

    RIG_HOME=STORE python benchmarks/bench_cross.py PERSON A B [--strength 0.3] [--steps 20] [--out DIR]

PERSON has a fine-tuned model in the store; A and B are photos of them held out of its training. In
one run: A unedited, the physical edit alone (strength 0) and the model's edit at the strength, each
made as `rig edit A --pose-from B --expression-from B --light-from B` makes it. With --out the outputs
are written there, with a sheet: A | physical edit | model edit | B, each aligned to B's frame.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from rigcli.edit.controls import Controls
from rigcli.edit.editor import DEFAULT_STRENGTH, Editor, edit_photos
from rigcli.edit.outputs import output_picture
from rigcli.evaluate.quality import align_to, pair_error
from rigcli.files import atomic_write_bytes
from rigcli.image.grid import grid
from rigcli.image.photo import PhotoError, encode_png
from rigcli.store import Store


def edited(editor: Editor, a: Path, b: Path, strength: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """A edited to B's pose, expression and light at ``strength`` (as `rig edit` writes it), and dlib's
    landmarks of the face in it nearest A's face; SystemExit with one line when either fails."""
    controls = Controls(pose_from=b, expression_from=b, light_from=b)
    (result,) = edit_photos(editor, [a], controls, steps=steps, strength=strength)
    if result.error:
        raise SystemExit(f"the edit of {a.name} at strength {strength:g} failed: {result.error}")
    picture = output_picture(result, "refined", False, 0)
    points = editor.analyzer.face_near(picture, result.prepared.landmarks)
    if points is None:
        raise SystemExit(f"no face found in the edit of {a.name} at strength {strength:g}")
    return picture, np.asarray(points, np.float64)


def sheet(tiles: list[tuple[np.ndarray, np.ndarray]], target: np.ndarray, target_points: np.ndarray) -> np.ndarray:
    """Each (image, landmarks) aligned to the target's frame (uncovered pixels black), then the target,
    side by side, cut to the target's face grown by half its size."""
    shape = target.shape[:2]
    aligned = []
    for image, points in tiles:
        pixels, covered = align_to(image, points, shape, target_points)
        aligned.append(np.where(covered[..., None], pixels, 0).astype(np.uint8))
    low, high = target_points.min(0), target_points.max(0)
    margin = 0.5 * (high - low).max()
    x0, y0 = np.maximum(np.floor(low - margin), 0).astype(int)
    x1, y1 = np.minimum(np.ceil(high + margin), [shape[1], shape[0]]).astype(int)
    return grid([tile[y0:y1, x0:x1] for tile in [*aligned, target]], columns=len(aligned) + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("person")
    parser.add_argument("a", type=Path, help="the photo to edit")
    parser.add_argument("b", type=Path, help="the photo whose pose, expression and light it takes")
    parser.add_argument("--strength", type=float, default=DEFAULT_STRENGTH)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    editor = Editor(Store(Path(os.environ["RIG_HOME"])), args.person)
    try:
        a = editor.prepare(args.a)
        target = editor.prepare(args.b, anyone=True)
    except PhotoError as exc:
        raise SystemExit(str(exc)) from None
    outputs = {
        "A unedited": (a.pixels, np.asarray(a.landmarks, np.float64)),
        "physical edit (strength 0)": edited(editor, args.a, args.b, 0.0, args.steps),
        f"model edit (strength {args.strength:g})": edited(editor, args.a, args.b, args.strength, args.steps),
    }
    errors = {
        label: pair_error(image, points, target.pixels, target.landmarks) for label, (image, points) in outputs.items()
    }
    physical = errors["physical edit (strength 0)"]
    print(f"{args.person}: {args.a.name} to {args.b.name}'s pose, expression and light, {args.steps} steps\n")
    print("| method | pair error (levels) | vs physical edit |")
    print("|---|---|---|")
    for label, error in errors.items():
        print(f"| {label} | {error:.2f} | {100 * (error / physical - 1):+.1f} % |")
    if args.out:
        for label, (image, _) in outputs.items():
            atomic_write_bytes(args.out / f"{label.split(' (')[0].replace(' ', '-')}.png", encode_png(image))
        pixels = sheet(list(outputs.values()), target.pixels, np.asarray(target.landmarks, np.float64))
        atomic_write_bytes(args.out / "sheet.png", encode_png(pixels))


if __name__ == "__main__":
    main()
