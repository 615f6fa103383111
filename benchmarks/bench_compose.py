"""Time the physical edit (rigcli.render.compose) on a 12 MP photo (4000x3000), stage by stage: the
correspondence at the working resolution (geometry, ratio), θ1's render as the fill, the composition
at the photo's size, and the transfer of a model's correction (64 px) onto the result; then the whole
``physical_edit`` end to end. Each figure is the best of ``--repeat`` runs (the cores may be shared).

    python benchmarks/bench_compose.py [--repeat 3] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np
import torch

from rigcli.face.ict import load_embedded_ict
from rigcli.face.params import FaceFit
from rigcli.render.buffers import light_from_direction
from rigcli.render.compose import (
    _correspondence,
    compose_edit,
    physical_edit,
    render_fill,
    transfer,
    working_size,
)

MODEL_SIZE = 64  # the model's output size: the correction ``transfer`` carries


def best_of(repeat: int, run: Callable[[], object]) -> tuple[float, object]:
    """The least wall time of ``repeat`` calls of ``run`` (seconds) and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per stage; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model = load_embedded_ict()
    crop, scale = 256, 1800 / 256  # the crop square 1800 px wide in the photo
    crop_to_photo = np.array([[scale, 0, 1100.0], [0, scale, 500.0]])
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    light = light_from_direction(torch.tensor([0.3, 0.2, 1.0]), 0.8, 0.3)[None].float()
    fit0 = FaceFit(
        torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.tensor([8.5]), torch.tensor([[128.0, 136.0]]),
        torch.zeros(1, len(model.expression_names)), torch.zeros(100), light, torch.tensor([[0.5, 0.37, 0.3]]),
    )  # fmt: skip
    fit1 = fit0.select([0])
    fit1.expression = fit0.expression.clone()
    fit1.expression[0, model.expression_names.index("mouthSmile_L")] = 0.8
    fit1.expression[0, model.expression_names.index("mouthSmile_R")] = 0.8
    fit1.yaw = fit0.yaw + math.radians(10)
    fit1.light = light_from_direction(torch.tensor([-1.0, 0.2, 0.6]), 0.8, 0.3)[None].float()
    correction = rng.normal(0, 8, (MODEL_SIZE, MODEL_SIZE, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:crop, 0:crop]
    face_mask = (yy - crop / 2) ** 2 + (xx - crop / 2) ** 2 < (0.35 * crop) ** 2

    size = working_size(crop_to_photo, crop)
    physical_edit(photo, crop_to_photo, crop, model, fit0, fit1)  # warm-up (first calls allocate, load)
    r = args.repeat
    t_corr, (corr, g1) = best_of(r, lambda: _correspondence(model, fit0, fit1, crop, size))
    t_fill, fill = best_of(r, lambda: render_fill(model, fit1, crop, size, g1))
    t_comp, result = best_of(r, lambda: compose_edit(photo, crop_to_photo, crop, corr, fill))
    t_transfer, (_, mask) = best_of(
        r, lambda: transfer(result.image, result.mask, correction, crop_to_photo, crop, face_mask)
    )
    t_edit, _ = best_of(r, lambda: physical_edit(photo, crop_to_photo, crop, model, fit0, fit1))

    total = t_corr + t_fill + t_comp + t_transfer
    print(f"photo 4000x3000, working size {size}, {torch.get_num_threads()} torch threads, best of {r}")
    print(f"  geometry + ratio (correspondence): {t_corr:6.2f} s")
    print(f"  fill (θ1's render, reused raster): {t_fill:6.2f} s")
    print(f"  composition at the photo's size:   {t_comp:6.2f} s")
    print(f"  transfer ({MODEL_SIZE} px correction):       {t_transfer:6.2f} s")
    print(f"  total of the stages:               {total:6.2f} s")
    print(f"physical_edit end to end:            {t_edit:6.2f} s")
    print(f"pixels composed: {int((result.mask > 0).sum())}, after the transfer: {int((mask > 0).sum())}")


if __name__ == "__main__":
    main()
