"""Time rig studio's live preview: per slider move, the edited face model rendered over the photo.

Three figures over the same settings (smile, light direction, head turn drawn at random):
- ``Studio.preview`` called directly (apply the controls, render the buffers, blend over the crop);
- the baseline, what the same update costs without the studio: the physical edit at the photo's
  size (``rig edit --strength 0``, no model), ``compose.physical_edit``;
- the page's round trip in headless chromium: from moving the smile slider to the new preview image
  in the page (Gradio's queue, PNG encoding and transfer included).
The store is made here: obama-1..3 of ../shared/assets/real, a tiny model trained 30 steps.

    python benchmarks/bench_studio.py [--moves 20] [--screenshot docs/studio.png]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from rigcli.enroll import add_photos
from rigcli.render.compose import physical_edit
from rigcli.store import Store
from rigcli.studio import Settings, Studio
from rigcli.train.stages import finetune

REAL = Path(os.environ.get("RIG_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "assets" / "real"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000


def summary(label: str, ms: list[float]) -> None:
    ms = sorted(ms)
    p90 = ms[min(len(ms) - 1, round(0.9 * (len(ms) - 1)))]
    print(f"{label:<48} median {statistics.median(ms):7.1f} ms   p90 {p90:7.1f} ms   ({len(ms)} updates)")


def page_round_trip(home: Path, photo: Path, moves: int, screenshot: Path | None = None) -> list[float]:
    """Slider moves in the real page, each timed until the preview image changes; with ``screenshot``,
    then an edit (light from the left, a smile) and a picture of the page (the README's)."""
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "rigcli", "--home", str(home), "studio", "--port", str(port), "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(url)
            page.locator("#person input").click()
            page.get_by_role("option", name="obama").click()
            page.locator("#upload input[type=file]").set_input_files(str(photo))
            page.wait_for_function("document.querySelector('#status').innerText.includes('fitted')", timeout=120_000)
            times = []
            for i in range(moves + 2):
                src = page.locator("#preview img").get_attribute("src")
                start = time.perf_counter()
                page.locator("#slider-smile input[type=range]").fill(f"{0.2 + 0.7 * (i % 2):.2f}")
                page.wait_for_function("s => document.querySelector('#preview img').src != s", arg=src)
                page.wait_for_function("() => document.querySelector('#preview img').complete")
                if i >= 2:  # the first moves warm the server up
                    times.append((time.perf_counter() - start) * 1000)
            if screenshot is not None:
                save_screenshot(page, screenshot)
            browser.close()
        return times
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)


def save_screenshot(page, path: Path) -> None:
    """The page after an edit, scaled to 1000 px wide, in 256 colours (dithered): a small PNG."""
    from PIL import Image

    page.get_by_label("left", exact=True).check()
    page.locator("#slider-smile input[type=range]").fill("0.8")
    page.locator("#edit").click()
    page.wait_for_function("document.querySelector('#info').innerText.includes('identity')", timeout=300_000)
    page.wait_for_timeout(500)
    raw = path.with_suffix(".raw.png")
    page.screenshot(path=str(raw), clip={"x": 0, "y": 0, "width": 1400, "height": 1560})
    image = Image.open(raw).convert("RGB")
    image = image.resize((1000, round(image.height * 1000 / image.width)), Image.Resampling.LANCZOS)
    palette = image.quantize(256, method=Image.Quantize.MEDIANCUT)  # Pillow dithers only onto a given palette
    image.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)
    raw.unlink()
    print(f"screenshot: {path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moves", type=int, default=20, help="slider moves timed per figure")
    parser.add_argument("--screenshot", type=Path, default=None, help="also write a picture of the page after an edit")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        store = Store(home)
        add_photos(store, "obama", [REAL / f"obama-{i}.jpg" for i in (1, 2, 3)])
        finetune(store, "obama", from_scratch=True, preset_name="tiny", steps=30, batch=2, checkpoint_every=30)
        studio = Studio(store, out_dir=Path(tmp) / "out")
        studio.upload_dir.mkdir(parents=True)
        photo = studio.upload_dir / "obama-4.jpg"
        photo.write_bytes((REAL / "obama-4.jpg").read_bytes())
        session = studio.open_photo("obama", photo)
        editor = studio.editor("obama")
        rng = np.random.default_rng(0)
        settings = [
            Settings(
                light="direction",
                light_yaw=float(rng.uniform(-80, 80)),
                light_pitch=float(rng.uniform(-30, 30)),
                expression=session.amounts | {"smile": float(rng.uniform(0, 1))},
                yaw=float(rng.uniform(-8, 8)),
            )
            for _ in range(args.moves)
        ]
        height, width = session.prepared.pixels.shape[:2]
        print(f"photo {width}x{height}, preview {studio.preview(session.key, settings[0]).shape[1]} px")
        summary("Studio.preview", [timed(lambda s=s: studio.preview(session.key, s)) for s in settings])
        summary(
            "Studio.preview with normal and albedo buffers",
            [timed(lambda s=s: studio.preview(session.key, s, buffers=True)) for s in settings],
        )

        def physical(s: Settings) -> None:
            controls = studio.controls(session, s)
            edited = editor.edit_fit(session.rendered, controls).fit
            prepared = session.prepared
            physical_edit(prepared.pixels, prepared.crop_to_photo, editor.crop_size, editor.face_model, session.fit,
                          edited)  # fmt: skip

        summary("baseline: physical edit at the photo's size", [timed(lambda s=s: physical(s)) for s in settings])
        round_trip = page_round_trip(home, photo, args.moves, args.screenshot)
        summary("the page: slider move to new preview (chromium)", round_trip)


if __name__ == "__main__":
    main()
