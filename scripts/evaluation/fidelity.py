"""Fidelity: Fréchet distance (MONAI ``FIDMetric``) and MMD (MONAI ``MMDMetric``) between feature sets.

The Fréchet distance is ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (squared L2
of the means; the paper's code used the L1 distance of the means, so its numbers are not
comparable). MONAI's MMD is the unbiased estimate of the squared MMD with a linear kernel on
the features (it can be slightly negative when the sets are alike); it needs sets of equal
size, so the larger set is subsampled (20 seeded draws, averaged).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from monai.metrics import FIDMetric, MMDMetric
from scripts.evaluation.volumes import require

MIN_SAMPLES = 2  # a covariance / the unbiased MMD needs two samples per set


def frechet_distance(a: torch.Tensor, b: torch.Tensor, what: str = "Fréchet distance") -> float:
    """Fréchet distance between two (N, F) feature sets (MONAI ``FIDMetric``).

    Args:
        a: features of one set.
        b: features of the other.
        what: name of the comparison for error messages.

    Returns:
        the distance (>= 0 up to rounding).
    """
    require(len(a), MIN_SAMPLES, f"{what} (first set)")
    require(len(b), MIN_SAMPLES, f"{what} (second set)")
    return float(FIDMetric()(torch.as_tensor(a).double(), torch.as_tensor(b).double()))


def mmd(a: torch.Tensor, b: torch.Tensor, what: str = "MMD", draws: int = 20, seed: int = 0) -> float:
    """Unbiased squared MMD with a linear kernel between two (N, F) feature sets (MONAI ``MMDMetric``).

    MONAI's metric takes sets of equal size: when the sizes differ, the larger set is
    subsampled to the smaller size ``draws`` times (seeded) and the values are averaged.
    """
    require(len(a), MIN_SAMPLES, f"{what} (first set)")
    require(len(b), MIN_SAMPLES, f"{what} (second set)")
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    metric = MMDMetric()
    if len(a) == len(b):
        return float(metric(a, b))
    small, large = (a, b) if len(a) < len(b) else (b, a)
    gen = torch.Generator().manual_seed(int(seed))
    values = [
        float(metric(small, large[torch.randperm(len(large), generator=gen)[: len(small)]])) for _ in range(int(draws))
    ]
    return float(np.mean(values))


def compare(features: Mapping[str, torch.Tensor], pairs: Mapping[str, tuple[str, str]], key: str) -> dict[str, dict]:
    """Fréchet distance and MMD for named pairs of feature sets.

    Args:
        features: ``{set name: (N, F) features}``.
        pairs: ``{comparison name: (set a, set b)}``, e.g. ``{"real_vs_synthetic": ("private_test", "synthetic")}``.
        key: metric name (``FD_seg3d``, ``FID_inception2d``, ...).

    Returns:
        ``{comparison: {key: value, "MMD": value, "n": [n_a, n_b], "sets": [a, b]}}``.
    """
    out = {}
    for name, (a, b) in pairs.items():
        fa, fb = features[a], features[b]
        out[name] = {
            key: frechet_distance(fa, fb, f"{key} {name} ({a} vs {b})"),
            "MMD": mmd(fa, fb, f"MMD {name} ({a} vs {b})"),
            "n": [len(fa), len(fb)],
            "sets": [a, b],
        }
    return out


def noise_volumes(reference: np.ndarray, seed: int = 0) -> np.ndarray:
    """Smoothed uniform noise volumes of the reference's shape: the far end of the distance scale.

    Args:
        reference: (N, D, H, W) volumes whose shape (and count) to copy.
        seed: seed of the noise.

    Returns:
        float32 volumes in [0, 1].
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    noise = rng.random(reference.shape).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=(0, 0.5, 2.0, 2.0))
    lo = noise.min(axis=(1, 2, 3), keepdims=True)
    hi = noise.max(axis=(1, 2, 3), keepdims=True)
    return ((noise - lo) / np.maximum(hi - lo, 1e-6)).astype(np.float32)
