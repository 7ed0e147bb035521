"""Losses of the autoencoder stage (as the MONAI Model Zoo bundles keep them: one module).

- :class:`AutoencoderKLLoss`: reconstruction (L1 or L2) + KL, optional SSIM, perceptual and PatchGAN terms;
- :class:`PatchAdversarialTerm`: the PatchGAN term, whose discriminator steps inside the loss call.

The diffusion stages need no loss class: MONAI's ``DiffusionInferer`` and an MSE do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ignite import distributed as idist
from monai.losses import PatchAdversarialLoss, PerceptualLoss, SSIMLoss
from monai.networks.nets import PatchDiscriminator
from scripts.errors import ConfigError
from scripts.networks import to_slices
from torch import nn

__all__ = ["AutoencoderKLLoss", "PatchAdversarialTerm"]


class PatchAdversarialTerm(nn.Module):
    """Optional PatchGAN term of the autoencoder loss: MONAI's ``PatchDiscriminator`` (2D, on
    slices, like the autoencoder) with least-squares ``PatchAdversarialLoss``.

    MONAI's ``AdversarialTrainer`` expects a generator that returns an image, while the KL
    autoencoder returns (reconstruction, z_mu, z_sigma); so the discriminator and its
    optimiser live here and take their step inside the loss call (on detached
    reconstructions) when gradients are enabled, i.e. in training, not in validation. The
    discriminator's optimiser state is part of this module's state_dict (extra state), so a
    resumed run continues it.

    Single process only: the discriminator steps outside DDP, so under torch.distributed each
    rank's copy would drift apart and only rank 0's would be saved. It is refused there
    (train the adversarial term on one GPU, or set ``adversarial_weight`` to 0).

    Args:
        channels: discriminator base channels.
        num_layers: discriminator layers.
        lr: discriminator learning rate.
    """

    def __init__(self, channels: int = 32, num_layers: int = 3, lr: float = 1e-4) -> None:
        super().__init__()
        if idist.get_world_size() > 1:
            raise ConfigError(
                f"option --adversarial_weight: the PatchGAN discriminator trains in one process only, and this run has "
                f"{idist.get_world_size()} (its copies would drift apart under DDP). Use adversarial_weight 0 with "
                "configs/multi_gpu_train.yaml, or train the adversarial term on one GPU"
            )
        self.discriminator = PatchDiscriminator(
            spatial_dims=2, num_layers_d=num_layers, channels=channels, in_channels=1, out_channels=1, norm="INSTANCE"
        )
        self.criterion = PatchAdversarialLoss(criterion="least_squares")
        self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Generator loss of ``recon``; first one discriminator step when gradients are enabled."""
        fake, real = to_slices(recon), to_slices(target)
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
        """The discriminator optimiser's state (saved in the module's state_dict)."""
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Restore the discriminator optimiser's state."""
        self.optimizer.load_state_dict(state["optimizer"])


class AutoencoderKLLoss(nn.Module):
    """Reconstruction (L1 or L2) + ``kl_weight`` x KL, plus optional SSIM, perceptual and PatchGAN terms.

    The SSIM term is MONAI's ``SSIMLoss`` (1 - SSIM) on the 2D slices, data range 1, taken on the
    reconstruction clipped to the images' [0, 1] range as the fidelity metrics take it.

    The perceptual term uses MONAI's ``PerceptualLoss`` (ResNet-50, 2.5D) and is only built
    when ``perceptual_weights`` names a local weights file: nothing is downloaded. The
    adversarial term (:class:`PatchAdversarialTerm`) is built when ``adversarial_weight > 0``.

    Args:
        reconstruction: "l1" or "l2".
        kl_weight: weight of the KL divergence to N(0, I).
        ssim_weight: weight of the slice SSIM loss (0 disables it).
        perceptual_weight: weight of the perceptual loss (used only with a weights file).
        perceptual_weights: local ResNet-50 weights file, or None to disable.
        adversarial_weight: weight of the PatchGAN generator loss (0 disables it).
        discriminator_lr: learning rate of the discriminator.
    """

    def __init__(
        self,
        *,
        reconstruction: str = "l1",
        kl_weight: float = 1e-6,
        ssim_weight: float = 0.0,
        perceptual_weight: float = 0.0,
        perceptual_weights: str | None = None,
        adversarial_weight: float = 0.0,
        discriminator_lr: float = 1e-4,
    ) -> None:
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ConfigError(f"config field 'reconstruction': expected 'l1' or 'l2', got {reconstruction!r}")
        self.reconstruction = nn.L1Loss() if reconstruction == "l1" else nn.MSELoss()
        self.kl_weight = kl_weight
        self.ssim_weight = ssim_weight
        self.ssim = SSIMLoss(spatial_dims=2, data_range=1.0) if ssim_weight > 0 else None
        self.perceptual_weight = perceptual_weight if perceptual_weights else 0.0
        self.perceptual = (
            PerceptualLoss(
                spatial_dims=3,
                network_type="resnet50",
                is_fake_3d=True,
                pretrained=True,
                pretrained_path=perceptual_weights,
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
        if self.ssim is not None:
            clipped = to_slices(recon.float().clamp(0.0, 1.0))
            loss = loss + self.ssim_weight * self.ssim(clipped, to_slices(target.float()))
        if self.perceptual is not None:
            loss = loss + self.perceptual_weight * self.perceptual(recon.float(), target.float())
        if self.adversarial is not None:
            loss = loss + self.adversarial_weight * self.adversarial(recon.float(), target.float())
        return loss
