"""How many times one edit rasterises the face model, by size, and the wall time of the edit.

    RIG_HOME=STORE python benchmarks/count_renders.py PERSON PHOTO [--strength 0.3] [--steps 4]

Edits PHOTO of PERSON (a person with a fine-tuned model in the store) with --light left --smile 0.5
through ``edit_photos`` and counts the calls of the rasterizer, split by size: the aligned crop's (the
fit's own light fit, the masks and skin normals), the model's (its buffers) and the physical edit's
working size. Run it on two commits (PYTHONPATH=CHECKOUT, from outside the checkout) to compare.
"""

from __future__ import annotations

import argparse
import collections
import os
import time
from pathlib import Path

from rigcli.edit.controls import Controls
from rigcli.edit.editor import Editor, edit_photos
from rigcli.render import buffers
from rigcli.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("person")
    parser.add_argument("photo", type=Path)
    parser.add_argument("--strength", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    sizes: collections.Counter[int] = collections.Counter()
    real = buffers.rasterize

    def counted(screen, triangles, height, width):
        sizes[height] += 1
        return real(screen, triangles, height, width)

    buffers.rasterize = counted
    editor = Editor(Store(Path(os.environ["RIG_HOME"])), args.person)
    editor.fit([editor.prepare(args.photo)])
    fitting = dict(sizes)
    sizes.clear()
    started = time.perf_counter()
    controls = Controls(light="left", expression={"smile": 0.5})
    edit_photos(editor, [args.photo], controls, steps=args.steps, strength=args.strength)
    seconds = time.perf_counter() - started
    print(f"the fit alone: {fitting}")
    print(
        f"edit_photos at strength {args.strength:g}: rasterisations by size {dict(sorted(sizes.items()))}, "
        f"{sum(sizes.values())} in all (the fit's included), {seconds:.2f} s"
    )


if __name__ == "__main__":
    main()
