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

from rigcli.edit.controls import Controls
from rigcli.edit.editor import DEFAULT_STRENGTH, Editor, edit_photos
from rigcli.edit.outputs import identity_distance, output_picture
from rigcli.evaluate.quality import BOUNDS, NO_FACE, misses
from rigcli.evaluate.suite import measure_output
from rigcli.files import atomic_write_bytes
from rigcli.image.photo import encode_png
from rigcli.store import Store

EDITS = {  # the edits issue 26 names: quality.BOUNDS's keys
    "light left": Controls(light="left"),
    "light right": Controls(light="right"),
    "smile 0.8": Controls(expression={"smile": 0.8}),
    "blink 1": Controls(expression={"blink": 1.0}),
    "yaw 12": Controls(yaw=12.0),
    "yaw -12": Controls(yaw=-12.0),
}
assert EDITS.keys() == BOUNDS.keys()


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
        if result.error:
            raise SystemExit(f"{args.photo}: {result.error}")
        picture = output_picture(result, "refined", False, 0)
        if args.out:
            atomic_write_bytes(args.out / f"{label.replace(' ', '-')}.png", encode_png(picture))
        q = measure_output(editor.analyzer, result.prepared, picture)  # as rig eval measures it
        if q is None:
            print(f"| {label} | {NO_FACE} | | | | | | | |")
            continue
        distance = identity_distance(editor.analyzer, result.prepared, picture)
        pairs = (q.light_balance, q.mouth_width, q.eye_opening, q.nose_offset)
        cells = [f"{a:.3f} -> {b:.3f}" for a, b in pairs]
        print(
            f"| {label} | {distance:.3f} | "
            + " | ".join(cells)
            + f" | {100 * q.foreign_pixels:.2f} | {100 * q.colour_blotches:.2f} | "
            + (", ".join(misses(label, q, distance)) or "none")
            + " |"
        )


if __name__ == "__main__":
    main()
