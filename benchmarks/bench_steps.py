"""How edit quality falls with fewer DDIM steps: 50 (reference), 20 (the paper), 10 and 5.

    python benchmarks/bench_steps.py --ict ../shared/assets/ict-facekit [--preset tiny] [--train-steps 400]

Builds a store with the astronaut album, fine-tunes a model of the preset from scratch on 6 photos
(briefly: quality is not the point, the trend with steps is), then edits 3 held-out photos (light
from the left, with DDIM inversion) at each step count. For each count: the PSNR of the output
against the 50-step output, and dlib's face-embedding distance (the identity metric; same person
< 0.6) of the output to the input photo and to the 50-step output. The embedding is taken on the
aligned crop with the input's landmarks (the edit keeps the face's geometry), after the input and
outputs have been through the model's resolution the same way, so that resolution is not counted
as identity loss. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rigcli import __version__
from rigcli.assets.ict import import_ict
from rigcli.demo import make_album
from rigcli.edit.controls import Controls
from rigcli.edit.editor import Editor
from rigcli.enroll import add_photos
from rigcli.image.detect import FaceAnalyzer
from rigcli.image.metrics import psnr
from rigcli.store import Store
from rigcli.train.stages import finetune


def at_crop_size(image: np.ndarray, size: int) -> np.ndarray:
    """An (S, S, 3) uint8 image resized to the crop's size (bicubic) for dlib's embedding."""
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ict", type=Path, required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--steps", default="50,20,10,5", help="DDIM step counts; the first is the reference")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    counts = [int(s) for s in args.steps.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "home")
        import_ict(args.ict, store)
        album = make_album(Path(tmp) / "album", count=9, seed=3)
        add_photos(store, "astro", [a.path for a in album[:6]])
        finetune(store, "astro", from_scratch=True, preset_name=args.preset, steps=args.train_steps, batch=4,
                 lr=3e-4, checkpoint_every=args.train_steps, device=args.device)  # fmt: skip
        trained = time.perf_counter() - started
        editor = Editor(store, "astro", device=args.device)
        photos = [editor.prepare(a.path) for a in album[6:9]]
        fit = editor.fit(photos)
        before = editor.render(fit)
        after = editor.edit_fit(before, Controls(light="left"))
        outputs, seconds = {}, {}
        for count in counts:
            begin = time.perf_counter()
            outputs[count], _ = editor.run(photos, before, after, steps=count, invert=True)
            seconds[count] = time.perf_counter() - begin
    analyzer = FaceAnalyzer("hog")
    size = editor.size

    def embedding(image: np.ndarray, photo) -> np.ndarray:
        return analyzer.embed(at_crop_size(image, photo.crop.shape[0]), photo.crop_landmarks)

    def to_uint8(images: torch.Tensor) -> np.ndarray:
        return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()

    inputs = [np.asarray(Image.fromarray(p.crop).resize((size, size), Image.Resampling.BOX)) for p in photos]
    input_codes = [embedding(image, p) for image, p in zip(inputs, photos, strict=True)]
    reference = counts[0]
    reference_codes = [embedding(o, p) for o, p in zip(to_uint8(outputs[reference]), photos, strict=True)]
    rows = []
    for count in counts:
        codes = [embedding(o, p) for o, p in zip(to_uint8(outputs[count]), photos, strict=True)]
        rows.append({
            "ddim_steps": count,
            "unet_calls": 2 * count - 1,
            "seconds_for_3_edits": round(seconds[count], 2),
            "psnr_vs_reference_db": None
            if count == reference
            else round(psnr(outputs[count], outputs[reference], value_range=(-1, 1)), 2),
            "identity_distance_to_input": round(float(np.mean(
                [np.linalg.norm(c - i) for c, i in zip(codes, input_codes, strict=True)])), 3),
            "identity_distance_to_reference": round(float(np.mean(
                [np.linalg.norm(c - r) for c, r in zip(codes, reference_codes, strict=True)])), 3),
        })  # fmt: skip
    print(json.dumps({
        "rig": __version__, "torch": torch.__version__, "cpus": os.cpu_count(), "device": args.device,
        "preset": args.preset, "train_steps": args.train_steps, "train_seconds": round(trained, 1),
        "edit": "light left, with inversion, 3 held-out album photos", "reference_steps": reference,
        "date": time.strftime("%Y-%m-%d"), "rows": rows,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
