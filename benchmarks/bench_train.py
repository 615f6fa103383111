"""Training speed: steps per second of the stage-2 loop for a preset, on this machine.

    python benchmarks/bench_train.py [--preset tiny] [--batch 4] [--steps 20] [--device cpu]
        [--precisions fp16,bf16,fp32] [--no-baseline] [--json PATH]

Runs the real loop (train.train: noise, encoder, UNet, P2 loss, backward, clip, Adam, EMA) on
random data shaped like a person's album, after 2 warm-up steps, once per autocast precision (on
CUDA; a CPU trains in fp32 whatever it is told). The baseline in the same run is the same loop with
the encoder trained too (stage 1 / --from-scratch) instead of frozen (stage 2), in the first precision.
The paper's stage 2 ran 5,000 steps at batch 4 in about 30 minutes on a V100 (2.8 steps/s).
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
from rigcli.diffusion.unet import DiffusionRig, preset
from rigcli.train.data import TrainingData
from rigcli.train.loop import TrainConfig, train


def steps_per_second(name: str, batch: int, steps: int, device: str, freeze: bool, precision: str = "fp16") -> float:
    cfg = preset(name)
    size = cfg.image_size
    data = TrainingData(torch.rand(16, 3, size, size) * 2 - 1, torch.randn(16, 9, size, size), "bench", "bench")
    rates = []
    for count in (2, 2 + steps):  # the difference removes start-up and warm-up
        torch.manual_seed(0)
        model = DiffusionRig(cfg)
        train_cfg = TrainConfig(steps=count, batch=batch, lr=1e-5, freeze_encoder=freeze, checkpoint_every=10**9,
                                preview_every=10**9, log_every=10**9, precision=precision)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            train(model, data, train_cfg, Path(tmp), {}, device=device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            rates.append(time.perf_counter() - start)
    return steps / (rates[1] - rates[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precisions", default="fp16", help="autocast precisions on CUDA, comma-separated")
    parser.add_argument("--no-baseline", action="store_true", help="skip the encoder-trained baseline")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    rates = {
        p: round(steps_per_second(args.preset, args.batch, args.steps, args.device, True, p), 3) for p in precisions
    }
    results = {
        "rig": __version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "preset": args.preset,
        "batch": args.batch,
        "stage2_steps_per_s": rates[precisions[0]],
        "stage2_steps_per_s_by_precision": rates,
        "stage2_5000_steps_minutes_by_precision": {p: round(5000 / r / 60, 1) for p, r in rates.items()},
    }
    if not args.no_baseline:
        results["baseline_encoder_trained_steps_per_s"] = round(
            steps_per_second(args.preset, args.batch, args.steps, args.device, False, precisions[0]), 3
        )
    results["stage2_5000_steps_minutes"] = round(5000 / results["stage2_steps_per_s"] / 60, 1)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
