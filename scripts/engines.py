"""Prepare-batch callables and losses that plug the two stages into MONAI's SupervisedTrainer.

MONAI's ``SupervisedTrainer`` runs the loop; a stage only supplies how a batch becomes
(inputs, targets, inferer kwargs) and how the loss is computed:

- autoencoder: :class:`ReconstructionPrepareBatch` (target = input) and
  :class:`AutoencoderKLLoss` (reconstruction + KL, optional perceptual loss);
- latent diffusion: :class:`LatentDiffusionPrepareBatch` extends MONAI's
  ``DiffusionPrepareBatch`` by encoding images with the frozen autoencoder (MONAI's version
  draws noise of the *image* shape) and by attribute dropout for classifier-free guidance.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import DiffusionPrepareBatch, PrepareBatch
from monai.losses import PatchAdversarialLoss, PerceptualLoss
from monai.networks.nets import PatchDiscriminator
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
        self, batchdata: dict[str, torch.Tensor], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = batchdata["image"].to(device=device, non_blocking=non_blocking)
        return image, image


def _slices(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B * D, C, H, W)."""
    b, c, d, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)


class PatchAdversarialTerm(nn.Module):
    """Optional PatchGAN term of the autoencoder loss: MONAI's ``PatchDiscriminator`` (2D, on
    slices, like the autoencoder) with least-squares ``PatchAdversarialLoss``.

    MONAI's ``AdversarialTrainer`` expects a generator that returns an image, while the KL
    autoencoder returns (reconstruction, z_mu, z_sigma); so the discriminator and its
    optimiser live here and take their step inside the loss call (on detached
    reconstructions) when gradients are enabled, i.e. in training, not in validation. The
    discriminator's optimiser state is part of this module's state_dict (extra state), so a
    resumed run continues it.

    Args:
        channels: discriminator base channels.
        num_layers: discriminator layers.
        lr: discriminator learning rate.
    """

    def __init__(self, channels: int = 32, num_layers: int = 3, lr: float = 1e-4) -> None:
        super().__init__()
        self.discriminator = PatchDiscriminator(
            spatial_dims=2, num_layers_d=num_layers, channels=channels, in_channels=1, out_channels=1, norm="INSTANCE"
        )
        self.criterion = PatchAdversarialLoss(criterion="least_squares")
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Generator loss of ``recon``; first one discriminator step when gradients are enabled."""
        fake, real = _slices(recon), _slices(target)
        if torch.is_grad_enabled():
            self.optimizer.zero_grad(set_to_none=True)
            d_loss = 0.5 * (
                self.criterion(self.discriminator(fake.detach())[-1], target_is_real=False, for_discriminator=True)
                + self.criterion(self.discriminator(real)[-1], target_is_real=True, for_discriminator=True)
            )
            d_loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return self.criterion(self.discriminator(fake)[-1], target_is_real=True, for_discriminator=False)

    def get_extra_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class AutoencoderKLLoss(nn.Module):
    """Reconstruction (L1 or L2) + ``kl_weight`` x KL, plus optional perceptual and PatchGAN terms.

    The perceptual term uses MONAI's ``PerceptualLoss`` (ResNet-50, 2.5D) and is only built
    when ``perceptual_weights`` names a local weights file: nothing is downloaded. The
    adversarial term (:class:`PatchAdversarialTerm`) is built when ``adversarial_weight > 0``.

    Args:
        reconstruction: "l1" or "l2".
        kl_weight: weight of the KL divergence to N(0, I).
        perceptual_weight: weight of the perceptual loss (used only with a weights file).
        perceptual_weights: local ResNet-50 weights file, or None to disable.
        adversarial_weight: weight of the PatchGAN generator loss (0 disables it).
        discriminator_lr: learning rate of the discriminator.
    """

    def __init__(
        self,
        reconstruction: str = "l1",
        kl_weight: float = 1e-6,
        perceptual_weight: float = 0.0,
        perceptual_weights: str | None = None,
        adversarial_weight: float = 0.0,
        discriminator_lr: float = 1e-4,
    ) -> None:
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"config field 'reconstruction': expected 'l1' or 'l2', got {reconstruction!r}")
        self.reconstruction = nn.L1Loss() if reconstruction == "l1" else nn.MSELoss()
        self.kl_weight = kl_weight
        self.perceptual_weight = perceptual_weight if perceptual_weights else 0.0
        self.perceptual = (
            PerceptualLoss(
                spatial_dims=3, network_type="resnet50", is_fake_3d=True, pretrained=True, pretrained_path=perceptual_weights
            )
            if perceptual_weights and perceptual_weight > 0
            else None
        )
        self.adversarial_weight = adversarial_weight
        self.adversarial = PatchAdversarialTerm(lr=discriminator_lr) if adversarial_weight > 0 else None

    def forward(self, pred: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """Loss of ``pred = (reconstruction, z_mu, z_sigma)`` against ``target``."""
        recon, z_mu, z_sigma = pred
        loss = self.reconstruction(recon, target)
        var = z_sigma.pow(2)
        kl = 0.5 * (z_mu.pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1).flatten(1).sum(1).mean()
        loss = loss + self.kl_weight * kl
        if self.perceptual is not None:
            loss = loss + self.perceptual_weight * self.perceptual(recon.float(), target.float())
        if self.adversarial is not None:
            loss = loss + self.adversarial_weight * self.adversarial(recon.float(), target.float())
        return loss


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

    def __call__(
        self, batchdata: dict[str, torch.Tensor], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images = batchdata["image"].to(device=device, non_blocking=non_blocking)
        latents = self.encode(images)
        generator = None if self.seed is None else _batch_generator(batchdata, self.seed)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        timesteps = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
        condition = make_condition(batchdata["attributes"], batchdata["missing"])
        condition = self.drop_attributes(condition, generator).to(device=device, non_blocking=non_blocking)
        target = self.get_target(latents, noise, timesteps)
        return latents, target, (), {"noise": noise, "timesteps": timesteps, "condition": condition}
