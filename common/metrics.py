"""Error measures used by every numerics check: tensors (max abs, relative L2, cosine), images (PSNR, SSIM)."""

from __future__ import annotations

import numpy as np


def compare(actual, expected) -> dict:
    a = np.asarray(actual, dtype=np.float64).ravel()
    e = np.asarray(expected, dtype=np.float64).ravel()
    diff = a - e
    denom = np.linalg.norm(e)
    norms = np.linalg.norm(a) * denom
    return {
        "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
        "rel_l2": float(np.linalg.norm(diff) / denom) if denom > 0 else float(np.linalg.norm(diff)),
        "cosine": float(a @ e / norms) if norms > 0 else float("nan"),
        "finite": bool(np.isfinite(a).all()),
        "non_finite": int(a.size - np.count_nonzero(np.isfinite(a))),
    }


def psnr(actual: np.ndarray, expected: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; images as float in [0, data_range]. Identical -> inf."""
    mse = float(np.mean((np.asarray(actual, np.float64) - np.asarray(expected, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def _gaussian_filter(image: np.ndarray, sigma: float = 1.5, radius: int = 5) -> np.ndarray:
    """Separable Gaussian over the first two axes, 'valid' region only (as Wang et al.'s SSIM)."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    rows = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), 0, image)
    return np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), 1, rows)


def ssim(actual: np.ndarray, expected: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity of two [H, W, C] (or [H, W]) images in [0, data_range]."""
    a = np.asarray(actual, np.float64)
    b = np.asarray(expected, np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _gaussian_filter(a), _gaussian_filter(b)
    var_a = _gaussian_filter(a * a) - mu_a**2
    var_b = _gaussian_filter(b * b) - mu_b**2
    cov = _gaussian_filter(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())
