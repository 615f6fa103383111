"""Time the renderer and the 3D fit, and add-person with the fit on a 20-photo album of ~1 MP.

    python benchmarks/bench_render_fit.py --ict ../shared/assets/ict-facekit [--photos 20]

Rendering: the ICT mesh (14,388 vertices, 28,552 triangles) into 256x256 buffers at batch 1 and
16; the baseline in the same run rasterizes without back-face culling (every triangle expanded
into its pixels). add-person: the whole command through the Python API, from reading the photos
to fit.json, on an album of about 1 MP photos (`--max-scale` sets their size).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from rigcli import __version__
from rigcli.assets.ict import import_ict
from rigcli.demo import make_album
from rigcli.enroll import add_photos
from rigcli.face.params import FaceFit
from rigcli.face.registry import load_face_model
from rigcli.image.photo import read_photo
from rigcli.render.buffers import light_from_direction, render_buffers
from rigcli.render.raster import project, rasterize
from rigcli.store import Store


def timed(fn, repeat: int = 5) -> float:
    fn()  # warm up
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ict", type=Path, required=True, help="an ICT-FaceKit folder or zip")
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--max-scale", type=float, default=3.0, help="largest album scale (3.0: ~1 MP mean)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "home")
        start = time.perf_counter()
        import_ict(args.ict, store)
        import_seconds = time.perf_counter() - start
        model = load_face_model(store)

        results: dict = {"rig": __version__, "torch": torch.__version__, "cpus": os.cpu_count()}
        results["machine"] = platform.machine()
        results["import_ict_seconds"] = round(import_seconds, 2)
        for batch in (1, 16):
            fit = FaceFit(
                torch.linspace(-0.5, 0.5, batch),
                torch.zeros(batch),
                torch.zeros(batch),
                torch.full((batch,), 9.4),
                torch.tensor([[128.0, 158.0]]).expand(batch, 2),
                torch.zeros(batch, 53),
                torch.zeros(100),
                light_from_direction(torch.tensor([0.5, 0.3, 1.0]), 0.7, 0.3)[None].expand(batch, 9, 3).float(),
                torch.full((batch, 3), 0.6),
            )
            verts = model.vertices(fit.identity.expand(batch, -1), fit.expression)
            screen, _ = project(verts, fit.rotation, fit.scale, fit.translation)
            results[f"render_buffers_ms_batch{batch}"] = round(
                1000 * timed(lambda f=fit: render_buffers(model, f, 256)), 1
            )
            results[f"rasterize_ms_batch{batch}"] = round(
                1000 * timed(lambda s=screen: rasterize(s, model.triangles, 256, 256)), 1
            )
            results[f"baseline_rasterize_no_culling_ms_batch{batch}"] = round(
                1000 * timed(lambda s=screen: rasterize(s, model.triangles, 256, 256, cull_back=False)), 1
            )

        album = make_album(Path(tmp) / "album", count=args.photos, seed=7, max_scale=args.max_scale)
        sizes = [read_photo(a.path).size for a in album]
        results["album_megapixels_mean"] = round(sum(w * h for w, h in sizes) / len(sizes) / 1e6, 2)
        start = time.perf_counter()
        report = add_photos(store, "bench", [a.path for a in album])
        results["add_person_with_fit_seconds"] = round(time.perf_counter() - start, 2)
        results["add_person_photos"] = args.photos
        results["fit_note"] = report.fit_note
        assert all(o.status == "added" for o in report.outcomes)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
