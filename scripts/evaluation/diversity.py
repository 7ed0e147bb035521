"""Diversity: MS-SSIM between random pairs of volumes (MONAI ``MultiScaleSSIMMetric``), as in the paper.

A short-axis stack has few thick slices, too few for 3D MS-SSIM's repeated downsampling, so
each pair is compared slice by slice in-plane (2D MS-SSIM, Gaussian kernel) and the slice
values are averaged. The number of scales is the largest (up to MONAI's 5) that the in-plane
size allows with the kernel; the report states both. Lower mean MS-SSIM between different
samples = more diverse; compare the synthetic value with the real one.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric
from scripts.evaluation.volumes import require

DEFAULT_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # MONAI / Wang et al. 2003


def scales_for(size: int, kernel_size: int) -> int:
    """Largest number of scales (<= 5) for which MS-SSIM fits an in-plane size with this kernel."""
    levels = 5
    while levels > 1 and size <= (kernel_size - 1) * 2 ** (levels - 1):
        levels -= 1
    return levels


def ms_ssim(a: np.ndarray, b: np.ndarray, kernel_size: int = 7) -> np.ndarray:
    """Slice-wise 2D MS-SSIM of volume pairs, averaged over slices.

    Args:
        a: (P, D, H, W) volumes in [0, 1].
        b: (P, D, H, W) volumes in [0, 1], paired with ``a``.
        kernel_size: Gaussian window size.

    Returns:
        (P,) MS-SSIM per pair (1 for identical volumes).
    """
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"MS-SSIM: shape mismatch {a.shape} vs {b.shape}")
    p, d, h, w = a.shape
    levels = scales_for(min(h, w), kernel_size)
    weights = np.asarray(DEFAULT_WEIGHTS[:levels]) / np.sum(DEFAULT_WEIGHTS[:levels])
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=kernel_size, weights=tuple(weights))
    x = torch.from_numpy(a.reshape(p * d, 1, h, w))
    y = torch.from_numpy(b.reshape(p * d, 1, h, w))
    values = metric(x, y).reshape(p, d).double()
    return values.mean(1).numpy()


def pairwise_ms_ssim(
    images: np.ndarray, pairs: int = 100, seed: int = 0, kernel_size: int = 7, what: str = "set"
) -> dict:
    """Mean MS-SSIM over random pairs of distinct volumes of one set.

    Args:
        images: (N, D, H, W) volumes.
        pairs: pairs to draw (all pairs when the set has fewer).
        seed: seed of the pair draw.
        kernel_size: Gaussian window size.
        what: name of the set for error messages.

    Returns:
        ``{"mean", "std", "pairs", "n", "scales", "kernel_size"}``.
    """
    n = len(images)
    require(n, 2, f"MS-SSIM diversity of the {what} (pairs of distinct volumes)")
    all_pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if len(all_pairs) > pairs:
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(all_pairs), size=pairs, replace=False)
        all_pairs = [all_pairs[k] for k in sorted(chosen)]
    i, j = (np.array(x) for x in zip(*all_pairs))
    values = ms_ssim(images[i], images[j], kernel_size)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "pairs": len(values),
        "n": int(n),
        "scales": scales_for(min(images.shape[2:]), kernel_size),
        "kernel_size": int(kernel_size),
    }
