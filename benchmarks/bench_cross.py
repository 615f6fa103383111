"""Issue 27's pairs measure (rigcli.evaluate.quality.pair_error): photo A edited to take photo B's
pose, expression and light, aligned to B by the similarity of dlib's landmarks, against B itself.

    RIG_HOME=STORE python benchmarks/bench_cross.py PERSON A B [--strength 0.3] [--steps 20] [--out DIR]

PERSON has a fine-tuned model in the store; A and B are photos of them held out of its training. In
one run: A unedited, the physical edit alone (strength 0) and the model's edit at the strength, each
made as `rig edit A --pose-from B --expression-from B --light-from B` makes it. With --out the outputs
are written there, with a sheet: A | physical edit | model edit | B, each aligned to B's frame.
The measure itself is rigcli/evaluate/cross.py's, which `rig eval NAME --cross` runs on every ordered pair.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rigcli.edit.editor import DEFAULT_STRENGTH, Editor
from rigcli.evaluate.cross import PHYSICAL, measure_pair
from rigcli.files import atomic_write_bytes
from rigcli.image.photo import encode_png
from rigcli.store import Store


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
    pair = measure_pair(editor, args.a, args.b, [args.strength], args.steps)
    if pair.reason:
        raise SystemExit(pair.reason)
    for method in pair.methods:
        if method.reason:
            raise SystemExit(f"{args.a.name}, {method.label}: {method.reason}")
    physical = pair.error(PHYSICAL)
    print(f"{args.person}: {args.a.name} to {args.b.name}'s pose, expression and light, {args.steps} steps\n")
    print("| method | pair error (levels) | vs physical edit |")
    print("|---|---|---|")
    for method in pair.methods:
        print(f"| {method.label} | {method.error:.2f} | {100 * (method.error / physical - 1):+.1f} % |")
    if args.out:
        for method in pair.methods:
            name = method.label.split(" (")[0].replace(" ", "-")
            atomic_write_bytes(args.out / f"{name}.png", encode_png(method.output))
        atomic_write_bytes(args.out / "sheet.png", encode_png(pair.sheet))


if __name__ == "__main__":
    main()
