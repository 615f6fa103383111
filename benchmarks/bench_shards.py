"""Stage 1 at scale: how fast photos are prepared into shards, what streaming costs a training step.

1. Preparation (``train.shards.prepare_shards``) of a generated album (``--photos``, default 40) with
   1 worker and with all cores: photos per second, and from the all-core rate per core the
   projected wall time for FFHQ's 70,000 photos on one 32-core node and on 8 such nodes.
2. Training steps per second of ``tiny`` (batch 8) on shards, buffers rendered from the parameters
   as each batch arrives, against the same rows with their buffers rendered once beforehand
   (``TrainingData``, what the old float32 cache gave); and bytes on disk per photo of each.

    python benchmarks/bench_shards.py [--photos 40] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from rigcli.demo import make_album
from rigcli.diffusion.unet import DiffusionRig, preset
from rigcli.face.params import FaceFit
from rigcli.face.registry import load_face_model
from rigcli.store import Store
from rigcli.train.data import TrainingData
from rigcli.train.loop import TrainConfig, train
from rigcli.train.shards import FIT_FIELDS, ShardData, prepare_shards, synthetic_shards

FFHQ = 70_000


def steps_per_second(data, steps: int, folder: Path) -> float:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=steps, batch=8, lr=1e-4, freeze_encoder=False, checkpoint_every=10**9, preview_every=10**9)
    started = time.perf_counter()
    train(DiffusionRig(preset("tiny")), data, cfg, folder, {})
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=40, help="generated photos to prepare")
    parser.add_argument("--steps", type=int, default=30, help="training steps timed per arm")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores, torch {torch.__version__}, {sys.platform}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "home").mkdir()
        store = Store(tmp / "home")
        make_album(tmp / "photos", count=args.photos, seed=3)
        size = preset("tiny").image_size
        rates = {}
        for workers in sorted({1, cores}):
            started = time.perf_counter()
            summary = prepare_shards(store, tmp / "photos", tmp / f"prep-{workers}", size, workers=workers,
                                     shard_size=20, chunk=20)  # fmt: skip
            rates[workers] = args.photos / (time.perf_counter() - started)
            print(f"prepare, {workers} worker(s): {rates[workers]:.2f} photos/s ({summary['counts']})")
        per_core = rates[cores] / cores
        for nodes in (1, 8):
            hours = FFHQ / (per_core * 32 * nodes) / 3600
            print(
                f"projected FFHQ ({FFHQ:,} photos) on {nodes} x 32-core node(s): {hours:.2f} h at {per_core:.2f}/s/core"
            )
        print(f"bytes on disk per photo (uint8 crop + parameters, {size} px): {summary['bytes_per_photo']:,}")
        for px in (size, 256):
            print(f"  float32 image + 9 buffer channels at {px} px (the old cache): {12 * px * px * 4:,}")

        model = load_face_model(store)
        real = ShardData(tmp / f"prep-{cores}", model)
        _, fit = real.read(torch.tensor([0]))
        synthetic_shards(tmp / "synthetic", model, FaceFit(**{f: getattr(fit, f) for f in FIT_FIELDS}), 1000, size)
        data = ShardData(tmp / "synthetic", model)
        fly = steps_per_second(data, args.steps, tmp / "run-fly")
        images, buffers = data.pairs(torch.arange(len(data)))
        rendered = TrainingData(images, buffers, data.data_hash, data.face_model_id)
        pre = steps_per_second(rendered, args.steps, tmp / "run-pre")
        started = time.perf_counter()
        for step in range(20):
            data.batch(step, 8, 0)
        batch_ms = (time.perf_counter() - started) / 20 * 1000
        print(f"train tiny, batch 8, {torch.get_num_threads()} threads: buffers rendered per batch {fly:.2f} steps/s, "
              f"precomputed {pre:.2f} steps/s; reading + rendering one batch {batch_ms:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
