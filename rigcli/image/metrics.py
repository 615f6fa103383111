"""Image agreement: PSNR and SSIM, optionally inside a mask (the one definition every caller uses)."""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

PSNR_CAP = 100.0  # dB, for identical images (keeps metrics.json valid JSON: no Infinity)


def psnr(a, b, mask: np.ndarray | None = None, value_range: tuple[float, float] | None = None) -> float | None:
    """PSNR in dB of two images (numpy arrays or CPU tensors) over the pixels of ``mask`` (None:
    all); capped at PSNR_CAP for identical pixels; None when the mask is empty. The peak is 255 (8-bit
    pixels) unless ``value_range`` gives the range, e.g. (-1, 1) for the model's images, whose values
    are then clipped to it first (the model's output may overshoot)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    peak = 255.0
    if value_range is not None:
        low, high = value_range
        x, y, peak = np.clip(x, low, high), np.clip(y, low, high), high - low
    diff = (x - y) ** 2
    if mask is not None:
        if not mask.any():
            return None
        diff = diff[mask]
    mse = float(diff.mean())
    return PSNR_CAP if mse <= peak**2 * 10 ** (-PSNR_CAP / 10) else 10 * math.log10(peak**2 / mse)


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """SSIM at every pixel (Wang et al. 2004: Gaussian window, sigma 1.5, K1 0.01, K2 0.03), averaged
    over colour channels: (H, W, C) x 2 -> (H, W)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    maps = []
    for c in range(x.shape[2]):
        blur = lambda im: gaussian_filter(im, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
        xc, yc = x[..., c], y[..., c]
        mx, my = blur(xc), blur(yc)
        vx, vy, cov = blur(xc * xc) - mx * mx, blur(yc * yc) - my * my, blur(xc * yc) - mx * my
        maps.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return np.mean(maps, axis=0)


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Mean SSIM over the pixels of ``mask`` (None: all); None when the mask is empty."""
    values = ssim_map(a, b)
    if mask is None:
        return float(values.mean())
    return float(values[mask].mean()) if mask.any() else None
