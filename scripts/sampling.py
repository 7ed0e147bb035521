"""Conditioned sampling of volumes from the latent diffusion model (MONAI inferer + scheduler)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import Scheduler
from torch import nn


@torch.no_grad()
def sample_volumes(
    autoencoder: nn.Module,
    network: nn.Module,
    scheduler: Scheduler,
    condition: torch.Tensor,
    latent_shape: Sequence[int],
    guidance_scale: float | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> torch.Tensor:
    """Sample one volume per condition row.

    Args:
        autoencoder: :class:`~scripts.networks.SliceAutoencoder` holding ``scale_factor``.
        network: :class:`~scripts.networks.ConditionalDiffusionUNet`.
        scheduler: MONAI scheduler with its inference timesteps already set.
        condition: (B, A, 2) attribute condition (values, missing flag).
        latent_shape: (C, D, h, w) of one latent.
        guidance_scale: classifier-free guidance scale; None or 1 = no guidance.
        seed: seed of the initial noise and of the scheduler's noise.
        verbose: show a progress bar over the denoising steps.

    Returns:
        (B, 1, D, H, W) decoded volumes.
    """
    device = condition.device
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((condition.shape[0], *latent_shape), generator=generator).to(device)
    torch.manual_seed(seed)  # the DDPM scheduler's per-step noise uses the global generator
    was_training = network.training
    network.eval()
    cfg = None if guidance_scale is None or guidance_scale == 1.0 else float(guidance_scale)
    latents = DiffusionInferer(scheduler).sample(
        input_noise=noise, diffusion_model=network, scheduler=scheduler, conditioning=condition, cfg=cfg, verbose=verbose
    )
    network.train(was_training)
    return autoencoder.decode_stage_2_outputs(latents / autoencoder.scale_factor)
