"""The retoucher's measures (rigcli.evaluate.quality) of `rig edit`'s edits of one photo, against the
bounds issue 26 sets, from dlib's landmarks on the input and on each output (not from rig's fit).

    RIG_HOME=STORE python benchmarks/bench_quality.py PERSON PHOTO [--strength 0.3] [--steps 20] [--out DIR]

PERSON has a fine-tuned model in the store; PHOTO is a photo of them the model did not train on.
Each edit is made as `rig edit` makes it (``edit_photos`` at the strength, the whole photo at its
size); with --out the outputs are written there as PNGs, to be looked at.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from rigcli.edit.controls import Controls
from rigcli.edit.editor import DEFAULT_STRENGTH, Editor, edit_photos
from rigcli.edit.outputs import identity_distance, output_picture
from rigcli.evaluate.quality import measure_quality
from rigcli.files import atomic_write_bytes
from rigcli.image.photo import encode_png
from rigcli.store import Store

EDITS = {
    "light left": Controls(light="left"),
    "light right": Controls(light="right"),
    "smile 0.8": Controls(expression={"smile": 0.8}),
    "blink 1": Controls(expression={"blink": 1.0}),
    "yaw 12": Controls(yaw=12.0),
    "yaw -12": Controls(yaw=-12.0),
}


def verdict(label: str, q, distance: float | None) -> list[str]:
    """The issue's bounds this edit misses (empty: it passes them all)."""
    missed = [] if distance is not None and distance <= 0.40 else ["identity > 0.40"]
    (b0, b1), (m0, m1), (e0, e1), (n0, n1) = q.light_balance, q.mouth_width, q.eye_opening, q.nose_offset
    if label == "light left" and not (b1 - b0 >= 0.25 and b1 > 1.2):
        missed.append("left/right +0.25 to > 1.2")
    if label == "light right" and not (b0 - b1 >= 0.25 and b1 < 0.85):
        missed.append("left/right -0.25 to < 0.85")
    if label == "smile 0.8" and m1 / m0 < 1.08:
        missed.append("mouth 8 % wider")
    if label == "blink 1" and e1 / e0 > 0.5:
        missed.append("eyelids half shut")
    if label.startswith("yaw") and (n1 - n0) * np.sign(float(label.split()[1])) < 0.08:
        missed.append("nose 0.08 eye widths")
    if label.startswith("light") and q.colour_blotches > 0.005:
        missed.append("blotches > 0.5 %")
    if not label.startswith("light") and q.foreign_pixels > 0.005:
        missed.append("foreign > 0.5 %")
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("person")
    parser.add_argument("photo", type=Path)
    parser.add_argument("--strength", type=float, default=DEFAULT_STRENGTH)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    editor = Editor(Store(Path(os.environ["RIG_HOME"])), args.person)
    print(f"{args.person}, {args.photo.name}, strength {args.strength:g}, {args.steps} steps\n")
    print("| edit | identity | left/right | mouth / eyes | eyelids | nose offset | foreign % | blotches % | misses |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, controls in EDITS.items():
        (result,) = edit_photos(editor, [args.photo], controls, steps=args.steps, strength=args.strength)
        picture = output_picture(result, "refined", False, 0)
        if args.out:
            atomic_write_bytes(args.out / f"{label.replace(' ', '-')}.png", encode_png(picture))
        found = editor.analyzer.find_face(picture)
        if found is None:
            print(f"| {label} | no face found in the output | | | | | | | |")
            continue
        prepared = result.prepared
        q = measure_quality(prepared.pixels, prepared.landmarks, picture, found.landmarks)
        distance = identity_distance(editor.analyzer, prepared, picture)
        pairs = (q.light_balance, q.mouth_width, q.eye_opening, q.nose_offset)
        cells = [f"{a:.3f} -> {b:.3f}" for a, b in pairs]
        print(
            f"| {label} | {distance:.3f} | "
            + " | ".join(cells)
            + f" | {100 * q.foreign_pixels:.2f} | {100 * q.colour_blotches:.2f} | "
            + (", ".join(verdict(label, q, distance)) or "none")
            + " |"
        )


if __name__ == "__main__":
    main()
