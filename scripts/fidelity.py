"""Reconstruction fidelity of the autoencoder: PSNR and SSIM, the same in the stage's validation and the benchmark.

MONAI's ``PSNRMetric`` and ``SSIMMetric`` do the arithmetic; what this module adds is where they are
taken: reconstructions clipped to the images' [0, 1] range, PSNR per volume, SSIM on the 2D
slices (the autoencoder is slice-wise, and the slices are 10 mm apart, too far for a 3D window),
averaged per volume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from scripts.networks import to_slices

__all__ = ["psnr", "reconstruction_pair", "reconstruction_slices", "ssim"]


def reconstruction_pair(output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction clipped to [0, 1], image) of an autoencoder evaluator's batch output."""
    return output["pred"][0].clamp(0.0, 1.0), output["label"]


def reconstruction_slices(output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`reconstruction_pair` as (B * D, 1, H, W) slices, for a 2D metric."""
    pred, label = reconstruction_pair(output)
    return to_slices(pred), to_slices(label)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """PSNR (dB, max value 1) of each (1, D, H, W) volume of a (B, 1, D, H, W) batch."""
    return PSNRMetric(max_val=1.0, reduction="none")(pred.clamp(0.0, 1.0), target).flatten().cpu().numpy()


def ssim(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Mean slice SSIM (data range 1) of each volume of a (B, 1, D, H, W) batch."""
    per_slice = SSIMMetric(spatial_dims=2, data_range=1.0, reduction="none")(
        to_slices(pred.clamp(0.0, 1.0)), to_slices(target)
    )
    return per_slice.reshape(pred.shape[0], -1).mean(1).cpu().numpy()
