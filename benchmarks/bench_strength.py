"""Choose rig edit's default --strength, and how the model's change is carried (a difference or a
ratio), by measurement on real photos the model did not train on.

A tiny model is fine-tuned from scratch on three photos of A (../shared/assets/real: obama-1, -2,
-3); then rig eval's suite (reconstruction, 4 lights, 3 expressions, 2 yaws, transfers) runs on the
held-out photo (obama-4) and, separately, on the album photos, by the paper's edit at the model's
size composed in by the plain blend, and by rig edit's method at strengths 0, 0.3, 0.6 and 1, with
the change carried as a difference and as a ratio. It prints one markdown table per photo set: the
reconstruction's PSNR in the face (the photo back, at the crop size), the identity distance over all
edits, the detail kept by the light edits, and the re-fitted light, blendshape and yaw errors.

    python benchmarks/bench_strength.py [--steps 600] [--out bench-strength]

About 25 minutes on 2 cores at 600 steps (fine-tuning about 5 of them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rigcli.enroll import add_photos
from rigcli.evaluate.suite import ModelSpec, eval_photos, evaluate
from rigcli.store import Store
from rigcli.train.stages import finetune

REAL = Path(__file__).resolve().parents[2] / "shared" / "assets" / "real"
ALBUM = ["obama-1.jpg", "obama-2.jpg", "obama-3.jpg"]
HELD_OUT = ["obama-4.jpg"]
STRENGTHS = (0.0, 0.3, 0.6, 1.0)
COLUMNS = (  # summary key, edit type, title
    ("psnr_face", "reconstruction", "recon. PSNR face dB"),
    ("identity_euclidean", None, "id dist (all edits)"),
    ("detail_ratio", "light", "detail kept (light)"),
    ("light_error_deg", "light", "light err deg"),
    ("blendshape_error", "expression", "blend err"),
    ("yaw_error_deg", "pose", "yaw err deg"),
)


def specs(steps: int) -> list[ModelSpec]:
    out = [ModelSpec("person", steps)]
    for strength in STRENGTHS:
        out.append(ModelSpec("person", steps, strength=strength))
    return out


def mean_over_edits(run, key: str, kind: str | None) -> float | None:
    values = [e.metrics[key] for e in run.edits if (kind is None or e.kind == kind) and e.metrics.get(key) is not None]
    return sum(values) / len(values) if values else None


def table(evaluation, title: str) -> str:
    lines = [f"**{title}** ({', '.join(p.label for p in evaluation.photos)})", ""]
    lines.append("| method | " + " | ".join(t for _, _, t in COLUMNS) + " |")
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    for run in evaluation.runs:
        spec = run.spec
        name = "paper's edit, plain blend" if spec.strength is None else f"strength {spec.strength:g}"
        cells = [mean_over_edits(run, key, kind) for key, kind, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="fine-tuning steps of the tiny model")
    parser.add_argument("--ddim", type=int, default=20, help="DDIM steps of the edits")
    parser.add_argument("--out", type=Path, default=Path("bench-strength"), help="store and results folder")
    args = parser.parse_args()
    torch.manual_seed(0)
    store = Store(args.out / "home")
    started = time.perf_counter()
    if not (store.model_dir("a") / "model.json").is_file():
        add_photos(store, "a", [REAL / n for n in ALBUM])
        finetune(store, "a", from_scratch=True, preset_name="tiny", steps=args.steps, batch=3, lr=3e-4, seed=0)
    trained = time.perf_counter() - started
    results = {}
    for title, names in (("held-out photo of A", HELD_OUT), ("album photos of A", ALBUM)):
        photos = eval_photos(store, "a", photos=[REAL / n for n in names])
        evaluation = evaluate(store, "a", photos, specs(args.ddim), seed=0)
        print(table(evaluation, title) + "\n", flush=True)
        results[title] = {r.spec.label: r.summary() for r in evaluation.runs}
    (args.out / "strength.json").write_text(json.dumps(results, indent=1))
    print(f"fine-tuning {trained:.0f} s; all {time.perf_counter() - started:.0f} s; {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
