"""Prepare-batch callables that plug the two stages into MONAI's SupervisedTrainer.

MONAI's ``SupervisedTrainer`` runs the loop; a stage only supplies how a batch becomes
(inputs, targets, inferer kwargs) and how the loss is computed (losses: :mod:`scripts.losses`):

- autoencoder: :class:`ReconstructionPrepareBatch` (target = input) and
  :class:`scripts.losses.AutoencoderKLLoss` (reconstruction + KL, optional perceptual loss);
- latent diffusion: :class:`LatentDiffusionPrepareBatch` extends MONAI's
  ``DiffusionPrepareBatch`` by encoding images with the frozen autoencoder (MONAI's version
  draws noise of the *image* shape) and by attribute dropout for classifier-free guidance.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch, PrepareBatch
from torch import nn


def make_condition(attributes: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """Stack normalised attributes (B, A) and missing-mask (B, A) into the (B, A, 2) condition."""
    return torch.stack([attributes.float(), missing.float()], dim=-1)


def _batch_generator(batchdata: Mapping, seed: int) -> torch.Generator:
    """A generator seeded by the batch's record ids, so a batch always gets the same draws."""
    ids = batchdata.get("id", [])
    key = ",".join(str(i) for i in ids) if isinstance(ids, (list, tuple)) else str(ids)
    return torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))


class ReconstructionPrepareBatch(PrepareBatch):
    """Return (image, image): the autoencoder's target is its input."""

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = batchdata["image"].to(device=device, non_blocking=non_blocking)
        return image, image


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Encode images with the frozen autoencoder, then draw noise and timesteps for the latent.

    Returns what ``DiffusionInferer`` needs: (latent, target, (), {noise, timesteps, condition}).

    Args:
        autoencoder: pre-trained :class:`~scripts.networks.SliceAutoencoder`; its stored
            ``scale_factor`` (measured on public data) scales the latents.
        num_train_timesteps: T of the noise scheduler.
        condition_dropout: probability of dropping the whole condition (all missing).
        attribute_dropout: probability of dropping each attribute independently.
        seed: if given, draws are a deterministic function of the batch's record ids
            (for validation losses that are comparable across epochs); else global RNG.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        num_train_timesteps: int,
        condition_dropout: float = 0.0,
        attribute_dropout: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name="condition")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.condition_dropout, self.attribute_dropout, self.seed = condition_dropout, attribute_dropout, seed

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latent of ``images``."""
        return self.autoencoder.encode_stage_2_inputs(images) * self.autoencoder.scale_factor

    def drop_attributes(self, condition: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mark random attributes (and whole conditions) missing, for classifier-free guidance."""
        if self.condition_dropout <= 0 and self.attribute_dropout <= 0:
            return condition
        b, a, _ = condition.shape
        drop = torch.rand(b, a, generator=generator) < self.attribute_dropout
        drop |= (torch.rand(b, 1, generator=generator) < self.condition_dropout).expand(b, a)
        drop = drop.to(condition.device)
        condition = condition.clone()
        condition[..., 0] = torch.where(drop, torch.zeros_like(condition[..., 0]), condition[..., 0])
        condition[..., 1] = torch.where(drop, torch.ones_like(condition[..., 1]), condition[..., 1])
        return condition

    def latents_of(
        self, batchdata: dict[str, Any], device: str | torch.device | None = None, non_blocking: bool = False
    ) -> torch.Tensor:
        """The batch's scaled latents (encoded here; a cache can override this)."""
        return self.encode(batchdata["image"].to(device=device, non_blocking=non_blocking))

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        latents = self.latents_of(batchdata, device, non_blocking)
        generator = None if self.seed is None else _batch_generator(batchdata, self.seed)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        timesteps = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), generator=generator).to(
            latents.device
        )
        condition = make_condition(batchdata["attributes"], batchdata["missing"])
        condition = self.drop_attributes(condition, generator).to(device=device, non_blocking=non_blocking)
        target = self.get_target(latents, noise, timesteps)
        return latents, target, (), {"noise": noise, "timesteps": timesteps, "condition": condition}
