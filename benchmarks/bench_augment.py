"""Does fine-tuning on physical-edit copies (rig finetune --augment) make a personal model follow
the controls and keep a new photo? Measured on real photos the model did not train on.

Two `tiny` models are fine-tuned from scratch on three photos of A (../shared/assets/real: obama-1,
-2, -3), with and without augmentation, with the same steps and seed. rig eval's suite then runs on
the held-out photo (obama-4) and on the album photos: the model's own round trip at its size (the
paper's edit, no controls: PSNR in the face, identity distance), and rig edit's method at the
default strength and at strength 1 (identity distance over all edits, re-fitted light, blendshape
and yaw errors). One markdown table per photo set.

    python benchmarks/bench_augment.py [--steps 600] [--out bench-augment] [--arms without with with-linear]
        [--strengths 0.3 1]

About 20 minutes on 2 cores at 600 steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rigcli.edit.editor import DEFAULT_STRENGTH
from rigcli.enroll import add_photos
from rigcli.evaluate.suite import ModelSpec, eval_photos, evaluate
from rigcli.store import Store
from rigcli.train.data import Augment
from rigcli.train.stages import finetune

REAL = Path(__file__).resolve().parents[2] / "shared" / "assets" / "real"
ALBUM = ["obama-1.jpg", "obama-2.jpg", "obama-3.jpg"]
HELD_OUT = ["obama-4.jpg"]
COLUMNS = (  # summary key, edit type, title
    ("identity_euclidean", None, "id dist (all edits)"),
    ("light_error_deg", "light", "light err deg"),
    ("blendshape_error", "expression", "blend err"),
    ("yaw_error_deg", "pose", "yaw err deg"),
)


ARMS = {  # name: rig finetune's augment argument
    "without": False,
    "with": True,  # rig finetune --augment's copies: relit in sRGB (the fit's space), any light direction
    "with-linear": Augment(relight="linear"),  # the same draws relit in linear light, as --augment did before
    "with-srgb60": Augment(relight="srgb", max_light_move=60.0),  # relit in sRGB, light turned at most 60 deg
}


def mean_over_edits(run, key: str, kind: str | None) -> float | None:
    values = [e.metrics[key] for e in run.edits if (kind is None or e.kind == kind) and e.metrics.get(key) is not None]
    return sum(values) / len(values) if values else None


def kind_rows(evaluation, arm: str) -> list[str]:
    """Per strength: identity distance of each kind of edit, and the light edits' light error."""
    out = []
    for run in evaluation.runs[1:]:
        cells = [f"{mean_over_edits(run, 'identity_euclidean', kind):.3f}" for kind in ("light", "expression", "pose")]
        cells[0] += f", {mean_over_edits(run, 'light_error_deg', 'light'):.1f} deg"
        out.append(f"| {arm} | {run.spec.strength:g} | " + " | ".join(cells) + " |")
    return out


def rows(evaluation, arm: str) -> list[str]:
    out = []
    paper, *method = evaluation.runs
    recon = [e for e in paper.edits if e.kind == "reconstruction"]
    psnr = sum(e.metrics["psnr_face"] for e in recon) / len(recon)
    ident = sum(e.metrics["identity_euclidean"] for e in recon) / len(recon)
    for run in method:
        cells = [mean_over_edits(run, key, kind) for key, kind, _ in COLUMNS]
        out.append(
            f"| {arm} | {psnr:.2f} | {ident:.3f} | {run.spec.strength:g} | "
            + " | ".join("-" if c is None else f"{c:.3f}" for c in cells)
            + " |"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps of each tiny model")
    parser.add_argument("--ddim", type=int, default=20, help="DDIM steps of the edits")
    parser.add_argument("--out", type=Path, default=Path("bench-augment"), help="stores and results folder")
    parser.add_argument(
        "--arms", nargs="+", default=["without", "with"], choices=sorted(ARMS), help="trainings compared, in order"
    )
    parser.add_argument(
        "--strengths", type=float, nargs="+", default=[DEFAULT_STRENGTH, 1.0], help="rig edit strengths measured"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    specs = [ModelSpec("person", args.ddim)] + [ModelSpec("person", args.ddim, strength=s) for s in args.strengths]
    tables: dict[str, list[str]] = {"held-out photo of A": [], "album photos of A": []}
    by_kind: list[str] = []
    results = {}
    for arm in args.arms:
        augment = ARMS[arm]
        store = Store(args.out / arm)
        if not (store.model_dir("a") / "model.json").is_file():
            add_photos(store, "a", [REAL / n for n in ALBUM])
            info = finetune(store, "a", from_scratch=True, preset_name="tiny", steps=args.steps, batch=3, lr=3e-4,
                            seed=0, augment=augment)  # fmt: skip
            copies, seconds = info["augmented_copies_per_photo"], time.perf_counter() - started
            print(f"{arm} augmentation: {info['photos']} photos, {copies} copies each, "
                  f"final loss {info['final_loss']:.4f} ({seconds:.0f} s)", flush=True)  # fmt: skip
        for title, names in (("held-out photo of A", HELD_OUT), ("album photos of A", ALBUM)):
            photos = eval_photos(store, "a", photos=[REAL / n for n in names])
            evaluation = evaluate(store, "a", photos, specs, seed=0)
            tables[title] += rows(evaluation, arm)
            if names == HELD_OUT:
                by_kind += kind_rows(evaluation, arm)
            results[f"{arm} {title}"] = {r.spec.label: r.summary() for r in evaluation.runs}
    header = "| augmentation | round trip PSNR face dB | round trip id dist | strength | " + " | ".join(
        t for _, _, t in COLUMNS
    )
    for title, lines in tables.items():
        print(f"**{title}**\n\n{header} |\n" + "|---" * (4 + len(COLUMNS)) + "|\n" + "\n".join(lines) + "\n")
    print("**held-out photo of A, by kind of edit** (identity distance; light error of the light edits)\n")
    print("| augmentation | strength | light edits | expression edits | pose edits |\n|---|---|---|---|---|")
    print("\n".join(by_kind) + "\n")
    (args.out / "augment.json").write_text(json.dumps(results, indent=1))
    print(f"all {time.perf_counter() - started:.0f} s; {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
