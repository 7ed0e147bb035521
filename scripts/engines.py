"""Prepare-batch callables that plug the two stages into MONAI's SupervisedTrainer.

MONAI's ``SupervisedTrainer`` runs the loop; a stage only supplies how a batch becomes
(inputs, targets, inferer kwargs) and how the loss is computed (losses: :mod:`scripts.losses`):

- autoencoder: :class:`ReconstructionPrepareBatch` (target = input) and
  :class:`scripts.losses.AutoencoderKLLoss` (reconstruction + KL, optional perceptual loss);
- latent diffusion: :class:`LatentDiffusionPrepareBatch` extends MONAI's
  ``DiffusionPrepareBatch`` by encoding images with the frozen autoencoder (MONAI's version
  draws noise of the *image* shape) and by the training mask of the condition
  (:func:`attribute_mask`: the all-missing condition for classifier-free guidance, attribute
  subsets of every size for partial requests).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch, PrepareBatch
from scripts.errors import ConfigError
from torch import nn


def make_condition(attributes: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """Stack normalised attributes (B, A) and missing-mask (B, A) into the (B, A, 2) condition."""
    return torch.stack([attributes.float(), missing.float()], dim=-1)


def attribute_mask(
    rows: int,
    attributes: int,
    condition_dropout: float = 0.0,
    subset_conditioning: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw which attributes of each training row are masked (True = shown to the model as missing).

    A row is all-missing with probability ``condition_dropout`` (the unconditional branch of
    classifier-free guidance). With ``subset_conditioning`` every other row keeps a number of
    attributes drawn uniformly from 1 .. ``attributes`` and, of that size, a uniformly drawn subset;
    without it, the other rows keep every attribute. A user's request usually names a few
    attributes ("a 65-year-old woman with LVEF 35 %"): independent per-attribute dropout at
    p = 0.1 shows the model a row with 9 or more of 14 attributes missing about once in 800,000
    rows; the subset draw keeps exactly 5 once in 14 (of the rows it draws). Attributes missing
    in the record stay missing whatever the draw.

    Args:
        rows: rows B.
        attributes: attributes A.
        condition_dropout: probability of the all-missing condition.
        subset_conditioning: draw attribute subsets of uniform size (else keep all).
        generator: source of the draws (the DP stage passes its private generator); None: global RNG.

    Returns:
        a (B, A) bool tensor on the CPU.
    """
    mask = torch.zeros(rows, attributes, dtype=torch.bool)
    if subset_conditioning:
        keep = torch.randint(1, attributes + 1, (rows, 1), generator=generator)
        # the ranks of i.i.d. uniforms are a uniform random permutation: the k lowest a uniform k-subset
        ranks = torch.rand(rows, attributes, generator=generator).argsort(dim=1).argsort(dim=1)
        mask = ranks >= keep
    if condition_dropout > 0:
        mask |= (torch.rand(rows, 1, generator=generator) < condition_dropout).expand(rows, attributes)
    return mask


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
        subset_conditioning: show every other row a random subset of its attributes, of a
            uniformly drawn size (:func:`attribute_mask`), so partial requests are in the
            training distribution; False: the whole condition.
        seed: if given, draws are a deterministic function of the batch's record ids
            (for validation losses that are comparable across epochs); else global RNG.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        num_train_timesteps: int,
        condition_dropout: float = 0.0,
        subset_conditioning: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name="condition")
        if not 0.0 <= float(condition_dropout) <= 1.0:
            raise ConfigError(
                f"config field 'condition_dropout': expected a probability in [0, 1], got {condition_dropout}"
            )
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.condition_dropout, self.subset_conditioning = float(condition_dropout), bool(subset_conditioning)
        self.seed = seed

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latent of ``images``."""
        return self.autoencoder.encode_stage_2_inputs(images) * self.autoencoder.scale_factor

    def drop_attributes(self, condition: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mark the attributes that :func:`attribute_mask` draws missing (value 0, flag 1)."""
        if self.condition_dropout <= 0 and not self.subset_conditioning:
            return condition
        b, a, _ = condition.shape
        drop = attribute_mask(b, a, self.condition_dropout, self.subset_conditioning, generator).to(condition.device)
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
