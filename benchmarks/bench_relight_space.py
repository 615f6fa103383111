"""Does an augmented copy show the light it was made with? The same copies relit in sRGB (the space
``fit_light`` models: sRGB pixels = albedo x shading; rig finetune --augment's) and in linear light
(rig edit's physical edit).

For each space: the album's copies (``train.data.augmented_pairs``, 4 per photo, seed 1), their light
fitted again on their pixels with the geometry they were made with, and the angle between that and
the light each was made with (issue 15 asks within 15 deg), beside how far each copy's light moved
from its photo's own. Directions two ways: of the single light that best explains the shading over
the copy's visible skin (``render.buffers.light_direction``, what rig eval compares), and of the SH
first-order terms alone (``dominant_direction``, ill-posed on a face's normals). Album: obama-1..4
of ../shared/assets/real, fitted here.

    python benchmarks/bench_relight_space.py [--copies 4] [--bounds 120 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path

import numpy as np

from rigcli.enroll import add_photos, read_fit
from rigcli.estimate.landmarks import fit_light
from rigcli.evaluate.metrics import light_error_deg
from rigcli.face.params import FaceFit, fit_from_json
from rigcli.face.registry import face_model_name, load_face_model
from rigcli.render.buffers import light_direction, rasterize_fit, skin_mask
from rigcli.render.compose import RELIGHT_SPACES
from rigcli.store import Store
from rigcli.train.data import Augment, augmented_pairs

REAL = Path(os.environ.get("RIG_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "assets" / "real"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4, help="copies per album photo")
    parser.add_argument(
        "--bounds", type=float, nargs="*", default=[], help="Augment.max_light_move values also tried (sRGB)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "home")
        add_photos(store, "a", [REAL / f"obama-{i}.jpg" for i in (1, 2, 3, 4)])
        fit_doc = read_fit(store, "a")
        records = [r for r in store.load("a").photos if r.id in fit_doc["photos"]]
        model = load_face_model(store, face_model_name(fit_doc))
        own = fit_from_json([fit_doc["photos"][r.id] for r in records], fit_doc["identity"], model.expression_names)
        print(f"{len(records)} photos x {args.copies} copies, crop {fit_doc['crop_size']} px")
        arms = [(space, 180.0) for space in reversed(RELIGHT_SPACES)] + [("srgb", b) for b in args.bounds]
        own_geometry = rasterize_fit(model, own, fit_doc["crop_size"])
        own_skin = skin_mask(model, own_geometry)
        for space, bound in arms:
            augment = dataclasses.replace(Augment(copies=args.copies, seed=1), relight=space, max_light_move=bound)
            images, _, fits = augmented_pairs(store, "a", records, fit_doc, fit_doc["crop_size"], augment)
            asked = FaceFit.cat(fits)
            shown, _ = fit_light(model, asked, ((images.permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1))
            geometry = rasterize_fit(model, asked, fit_doc["crop_size"])
            skin = skin_mask(model, geometry)
            for way in ("skin", "first-order"):
                errors, moved = [], []
                for k in range(len(fits)):
                    normals = geometry.normals[k][skin[k]] if way == "skin" else None
                    i = k // args.copies
                    own_normals = own_geometry.normals[i][own_skin[i]] if way == "skin" else None
                    errors.append(light_error_deg(shown[k], asked.light[k], normals))
                    # how far the copy's light is from its photo's, each judged on its own face
                    moved.append(_angle(asked.light[k], normals, own.light[i], own_normals))
                errors, moved = np.array(errors), np.array(moved)
                near = moved <= 90
                print(
                    f"{space:>6}, moved at most {bound:3.0f} deg, {way:>11}: error median {np.median(errors):5.1f}"
                    f" deg, mean {errors.mean():5.1f}, max {errors.max():5.1f}; within 15 deg"
                    f" {np.mean(errors <= 15):4.0%}; moved <= 90 deg: median {np.median(errors[near]):5.1f},"
                    f" max {errors[near].max():5.1f} ({near.sum()} copies)"
                )
                print(f"        per copy {np.round(errors, 1).tolist()}")
                print(f"  moved per copy {np.round(moved, 1).tolist()}")


def _angle(light_a, normals_a, light_b, normals_b) -> float:
    """Degrees between two lights' directions, each read on its own face's skin (or first-order)."""
    if normals_a is None:
        return light_error_deg(light_a, light_b)
    a, b = light_direction(light_a, normals_a), light_direction(light_b, normals_b)
    return float(np.degrees(np.arccos(np.clip(float((a.double() * b.double()).sum()), -1, 1))))


if __name__ == "__main__":
    main()
