"""Seconds per edit on this machine: the whole `rig edit` pipeline for one photo, and per photo in a batch.

    python benchmarks/bench_edit.py --ict ../shared/assets/ict-facekit [--preset tiny] [--steps 20]

Builds a store with the astronaut album and a model of the preset (random weights: speed does not
depend on training), then times edit_photos (detect, align, fit with the identity held, render,
20-step DDIM inversion + 20-step sampling) on 1 photo and on 8 photos at batch 8. The baseline in the
same run is the same edit without inversion (--no-invert: half the UNet calls).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from rigcli import __version__
from rigcli.assets.ict import import_ict
from rigcli.demo import make_album
from rigcli.diffusion.checkpoints import save_model
from rigcli.diffusion.unet import DiffusionRig, preset
from rigcli.edit.controls import Controls
from rigcli.edit.editor import Editor, edit_photos
from rigcli.enroll import add_photos, read_fit
from rigcli.store import Store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ict", type=Path, required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "home")
        import_ict(args.ict, store)
        album = make_album(Path(tmp) / "album", count=9, seed=3)
        add_photos(store, "astro", [a.path for a in album[:6]])
        model = DiffusionRig(preset(args.preset))
        save_model(store.person_dir("astro") / "model", model, {"face_model_id": read_fit(store, "astro")["model_id"]})
        editor = Editor(store, "astro", device=args.device)
        controls = Controls(light="left", expression={"smile": 0.8})

        def seconds(paths, invert: bool) -> float:
            start = time.perf_counter()
            edit_photos(editor, paths, controls, steps=args.steps, invert=invert, batch=8)
            return time.perf_counter() - start

        seconds([album[0].path], True)  # warm-up
        one = seconds([album[0].path], True)
        eight = seconds([a.path for a in album[:8]], True)
        baseline = seconds([album[0].path], False)
    print(json.dumps({
        "rig": __version__, "torch": torch.__version__, "cpus": os.cpu_count(), "device": args.device,
        "preset": args.preset, "ddim_steps": args.steps,
        "seconds_per_edit_batch1": round(one, 2),
        "seconds_per_edit_batch8": round(eight / 8, 2),
        "baseline_no_invert_seconds_batch1": round(baseline, 2),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
