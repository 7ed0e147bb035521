"""Autoencoder fidelity: validation PSNR/SSIM per epoch of the stage, and the metrics (scripts/fidelity.py)."""

from __future__ import annotations

import math

import numpy as np
import torch
from conftest import mlflow_runs
from scripts import fidelity


def test_autoencoder_stage_logs_validation_psnr_and_ssim_each_epoch(pretrained):
    client, runs = mlflow_runs(pretrained, "autoencoder_")
    run_id = runs[0].info.run_id
    for key in ("val_psnr", "val_ssim"):
        history = [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        assert len(history) == 4 and all(math.isfinite(v) for v in history), key  # before training + 3 epochs
        assert history[-1] > history[0], key  # training improves the held-out fidelity
    assert 0.0 < client.get_metric_history(run_id, "val_psnr")[-1].value < 60.0
    assert -1.0 <= client.get_metric_history(run_id, "val_ssim")[-1].value <= 1.0


def test_fidelity_metrics_rank_a_good_reconstruction_above_a_broken_one():
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(3, 1, 4, 32, 32)
    images[..., 8:24, 8:24] = 0.8  # a bright square on each slice
    close = (images + 0.02 * torch.randn(images.shape, generator=g)).clamp(0, 1)
    broken = torch.rand(images.shape, generator=g)  # what a random decoder gives
    good_psnr, bad_psnr = fidelity.psnr(close, images), fidelity.psnr(broken, images)
    assert good_psnr.shape == (3,) and (good_psnr > 30).all() and (bad_psnr < 8).all()
    good_ssim, bad_ssim = fidelity.ssim(close, images), fidelity.ssim(broken, images)
    assert good_ssim.shape == (3,) and (good_ssim > 0.8).all() and (bad_ssim < 0.1).all()
    # values outside [0, 1] are clipped as the images are: an overshoot costs no more than a saturated pixel
    np.testing.assert_allclose(fidelity.psnr(images * 3.0, images), fidelity.psnr((images * 3.0).clamp(0, 1), images))
