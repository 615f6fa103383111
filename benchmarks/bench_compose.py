"""Time the physical edit (rigcli.edit.compose) on a 12 MP photo (4000x3000): correspondence at the
working resolution (geometry, ratio), then the whole edit (with composition), printing seconds.

    python benchmarks/bench_compose.py
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from rigcli.edit.compose import correspondence, physical_edit, working_size
from rigcli.face.ict import load_embedded_ict
from rigcli.face.params import FaceFit
from rigcli.render.buffers import light_from_direction


def main() -> None:
    torch.set_grad_enabled(False)
    model = load_embedded_ict()
    crop, scale = 256, 1800 / 256  # the crop square 1800 px wide in the photo
    crop_to_photo = np.array([[scale, 0, 1100.0], [0, scale, 500.0]])
    photo = np.random.default_rng(0).integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
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
    size = working_size(crop_to_photo, crop)
    start = time.perf_counter()
    correspondence(model, fit0, fit1, crop, size)
    geometry = time.perf_counter() - start
    start = time.perf_counter()
    result = physical_edit(photo, crop_to_photo, crop, model, fit0, fit1)
    total = time.perf_counter() - start
    print(f"photo 4000x3000, working size {size}, {torch.get_num_threads()} threads")
    print(f"geometry + ratio (correspondence): {geometry:.2f} s")
    print(f"physical edit, all of it:          {total:.2f} s  (composition about {total - geometry:.2f} s)")
    print(f"pixels composed: {int((result.mask > 0).sum())}")


if __name__ == "__main__":
    main()
