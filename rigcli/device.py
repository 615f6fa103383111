"""Which torch device a command runs on: ``auto`` is CUDA when torch sees a GPU, else the CPU."""

from __future__ import annotations

import torch

from rigcli import RigError

AUTO = "auto"


def resolve_device(device: str | None = AUTO) -> str:
    """``auto`` (or None) becomes ``cuda`` or ``cpu``; an explicit CUDA device torch cannot see is refused
    with the fix, rather than failing later inside the model."""
    text = (device or AUTO).strip().lower()
    if text == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise RigError(f"--device {device!r}: write auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise RigError(f"--device {text}: torch sees no CUDA GPU (install torch's CUDA build, or use --device cpu)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise RigError(f"--device {text}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return text
