"""Time FLAME (forward, landmarks, the landmark fit) and DECA's encoder, at their real sizes.

    python benchmarks/bench_deca.py [--ict ../shared/assets/ict-facekit] [--photos 20]

FLAME's data cannot ship, so the model is FLAME-sized random data (5,023 vertices, 9,976
triangles, 5 joints, 100 shape and 50 expression components used): the cost depends on the sizes,
not the values. The encoder has random weights (DECA's are the user's). With ``--ict``, the same
run times the ICT landmark fit on the same number of photos as the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_render_fit import timed  # the same warm-up-then-mean timer (benchmarks/ is on sys.path)

from rigcli import __version__
from rigcli.estimate.deca import DecaEncoder
from rigcli.estimate.landmarks import fit_landmarks, project_landmarks
from rigcli.face.flame import FlameFaceModel
from rigcli.face.params import FaceFit

V, F = 5023, 9976


def flame_sized(seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    weights = rng.random((V, 5)) ** 4
    weights /= weights.sum(1, keepdims=True)
    regressor = rng.random((5, V))
    regressor /= regressor.sum(1, keepdims=True)
    bary = rng.random((79, 17, 3))
    t = {
        "v_template": rng.normal(size=(V, 3)) * 0.05,
        "shapedirs": rng.normal(size=(V, 3, 300)) * 1e-3,
        "exprdirs": rng.normal(size=(V, 3, 100)) * 1e-3,
        "posedirs": rng.normal(size=(V, 3, 36)) * 1e-3,
        "J_regressor": regressor,
        "weights": weights,
        "kintree_table": np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]),
        "faces": rng.integers(0, V, size=(F, 3)),
        "static_lmk_faces_idx": rng.integers(0, F, size=51),
        "static_lmk_bary_coords": np.full((51, 3), 1 / 3),
        "dynamic_lmk_faces_idx": np.tile(rng.integers(0, F, size=(1, 17)), (79, 1)),
        "dynamic_lmk_bary_coords": np.tile(bary[:1] / bary[:1].sum(-1, keepdims=True), (79, 1, 1)),
        "full_lmk_faces_idx": rng.integers(0, F, size=(1, 68)),
        "full_lmk_bary_coords": np.full((1, 68, 3), 1 / 3),
    }
    return {k: torch.from_numpy(np.asarray(v)) for k, v in t.items()}


def synthetic_landmarks(model, photos: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    expression = torch.zeros(photos, len(model.expression_names))
    truth = FaceFit(
        yaw=(torch.rand(photos, generator=g) - 0.5) * 0.6,
        pitch=(torch.rand(photos, generator=g) - 0.5) * 0.3,
        roll=(torch.rand(photos, generator=g) - 0.5) * 0.3,
        scale=torch.full((photos,), 6.0),
        translation=torch.full((photos, 2), 128.0),
        expression=expression,
        identity=torch.zeros(model.identity_size),
    )
    candidates = None
    if not hasattr(model, "landmark_points"):
        from rigcli.estimate.landmarks import silhouette_candidates

        candidates = silhouette_candidates(model)
    with torch.no_grad():
        return project_landmarks(model, truth, candidates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ict", type=Path, help="an ICT-FaceKit folder or zip, for the baseline fit")
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300, help="fitter steps (its default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"rig": __version__, "torch": torch.__version__, "cpus": os.cpu_count()}
    results["machine"] = platform.machine()
    results["threads"] = args.threads

    model = FlameFaceModel.from_tensors(flame_sized(), "flame-bench")
    flame = model.flame
    for batch in (1, 20):
        shape, exp = torch.zeros(batch, 100), torch.zeros(batch, 50)
        pose = torch.full((batch, 5, 3), 0.1)
        with torch.no_grad():
            results[f"flame_forward_ms_b{batch}"] = round(
                1000 * timed(lambda a=shape, b=exp, c=pose: flame(a, b, c)), 2
            )
            verts, _ = flame(shape, exp, pose)
            rows = flame.contour_rows(pose)
            results[f"flame_landmarks_ms_b{batch}"] = round(
                1000 * timed(lambda a=verts, b=rows: flame.landmarks(a, b)), 3
            )

    landmarks = synthetic_landmarks(model, args.photos)
    start = time.perf_counter()
    fit = fit_landmarks(model, landmarks, steps=args.steps)
    results["flame_fit_seconds"] = round(time.perf_counter() - start, 2)
    results["flame_fit_error_max"] = round(float(fit.landmark_error.max()), 4)

    if args.ict:
        from rigcli.assets.ict import import_ict
        from rigcli.face.registry import load_face_model
        from rigcli.store import Store

        with tempfile.TemporaryDirectory() as tmp:
            store = Store(Path(tmp) / "home")
            import_ict(args.ict, store)
            ict = load_face_model(store)
            landmarks = synthetic_landmarks(ict, args.photos)
            start = time.perf_counter()
            fit = fit_landmarks(ict, landmarks, steps=args.steps)
            results["ict_fit_seconds"] = round(time.perf_counter() - start, 2)
            results["ict_fit_error_max"] = round(float(fit.landmark_error.max()), 4)

    encoder = DecaEncoder().eval()
    for batch in (1, 8):
        images = torch.rand(batch, 3, 224, 224)
        with torch.no_grad():
            results[f"deca_encoder_ms_b{batch}"] = round(1000 * timed(lambda a=images: encoder(a), repeat=3), 1)

    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
