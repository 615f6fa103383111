"""Time `add-person` on an album of ~1 MP photos, stage by stage, plus a full-resolution baseline.

    python benchmarks/bench_add_person.py [--photos 20] [--json out.json]

Stages: decode, detect (HOG scan at most 1280 px, upsampled once), verify (CNN second look, only
when HOG returns several hits), landmarks, align, embed, and the whole add through the store
(atomic writes included). Then a few of the photos enlarged to camera size (4000 px on the long side) are
searched with the capped scan and, as the baseline, at full resolution as a plain
``detector(image, 1)`` call would, in the same run.
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

from rigcli import __version__
from rigcli.demo import make_album
from rigcli.enroll import add_photos
from rigcli.image import detect as detect_module
from rigcli.image.align import align_face
from rigcli.image.detect import FaceAnalyzer, choose_face
from rigcli.image.photo import read_photo
from rigcli.store import Store


def stage_times(paths: list[Path], analyzer: FaceAnalyzer) -> dict[str, float]:
    """Seconds spent in each stage over all photos."""
    totals = dict.fromkeys(("decode", "detect", "verify", "landmarks", "align", "embed"), 0.0)
    for path in paths:
        t = time.perf_counter()
        rgb = read_photo(path).pixels
        totals["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        hits = analyzer.detect(rgb)
        totals["detect"] += time.perf_counter() - t
        t = time.perf_counter()
        if len(hits) > 1:
            hits = [analyzer.verify(rgb, h) for h in hits]
        best, _ = choose_face(hits)
        totals["verify"] += time.perf_counter() - t
        t = time.perf_counter()
        landmarks = analyzer.landmarks(rgb, best)
        totals["landmarks"] += time.perf_counter() - t
        t = time.perf_counter()
        align_face(rgb, landmarks, 256)
        totals["align"] += time.perf_counter() - t
        t = time.perf_counter()
        analyzer.embed(rgb, landmarks)
        totals["embed"] += time.perf_counter() - t
    return totals


def upscale(rgb: np.ndarray, long_side: int) -> np.ndarray:
    """The photo enlarged so its long side is ``long_side`` (a camera-sized frame of the same scene)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    scale = long_side / max(h, w)
    return np.asarray(Image.fromarray(rgb).resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=20)
    parser.add_argument("--large", type=int, default=4, help="photos enlarged to 4000 px for the scan-cap comparison")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        # max_scale 2.4 gives canvases of about 0.6-1.3 MP, like phone photos resized for the web
        album = make_album(Path(tmp) / "album", count=args.photos, seed=7, max_scale=2.4)
        paths = [a.path for a in album]
        megapixels = [read_photo(p).size[0] * read_photo(p).size[1] / 1e6 for p in paths]
        analyzer = FaceAnalyzer("hog")
        analyzer.find_face(read_photo(paths[0]).pixels)  # load models outside the timings

        stages = stage_times(paths, analyzer)

        t = time.perf_counter()
        report = add_photos(Store(Path(tmp) / "home"), "bench", paths)
        add_seconds = time.perf_counter() - t
        assert all(o.status == "added" for o in report.outcomes), [o.detail for o in report.outcomes]

        # camera-sized photos: the same faces in 4000 px frames, scanned capped and at full resolution
        large = [upscale(read_photo(p).pixels, 4000) for p in paths[: args.large]]
        t = time.perf_counter()
        capped = [analyzer.find_face(rgb) for rgb in large]
        large_capped = time.perf_counter() - t
        detect_module.DETECT_MAX_SIDE = 10**9  # baseline: no downscaled scan
        t = time.perf_counter()
        full = [analyzer.find_face(rgb) for rgb in large]
        large_full = time.perf_counter() - t
        box_diff = max(
            float(np.abs(np.subtract(a.box.box, b.box.box)).max() / a.box.width)
            for a, b in zip(capped, full, strict=True)
        )

    results = {
        "rig": __version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "photos": len(paths),
        "megapixels_mean": round(float(np.mean(megapixels)), 2),
        "megapixels_max": round(float(np.max(megapixels)), 2),
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "add_person_seconds": round(add_seconds, 2),
        "add_person_seconds_per_photo": round(add_seconds / len(paths), 3),
        "large_photos": len(large),
        "large_megapixels": round(large[0].shape[0] * large[0].shape[1] / 1e6, 1) if large else None,
        "large_find_face_seconds_capped": round(large_capped, 2),
        "large_find_face_seconds_full_resolution_baseline": round(large_full, 2),
        "large_box_difference_over_face_width": round(box_diff, 3) if large else None,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
