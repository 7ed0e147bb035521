"""The loss of one privacy unit: how a unit's records become rows, and the rows' mean loss.

:func:`scripts.privacy.per_sample.clipped_grad_sum` clips the gradient of each unit's loss;
these classes say what that loss is for the two DP stages. Every random draw of a unit
(timesteps, noise, condition dropout, posterior samples) comes from a generator seeded from
OS entropy, never from the global RNG: the global RNG starts from the public config seed and
is saved in checkpoints, so draws made from it would let anyone replay how many rows were
sampled, which is private.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import Any

import torch
from scripts.engines import LatentDiffusionPrepareBatch, make_condition
from scripts.errors import ConfigError
from torch import nn

__all__ = ["LatentDiffusionUnitLoss", "AutoencoderUnitLoss", "private_generator"]


def private_generator(seed: int | None = None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from OS entropy (or ``seed``, for tests), kept out of every saved file.

    Args:
        seed: fixed seed for tests; None draws 63 bits from ``secrets``.
        device: device of the generator.

    Returns:
        the generator.
    """
    return torch.Generator(device=device).manual_seed(secrets.randbits(63) if seed is None else seed)


class LatentDiffusionUnitLoss(LatentDiffusionPrepareBatch):
    """Rows and loss of a unit for the latent diffusion stage: K (timestep, noise) draws per record.

    The K draws of a record are rows of ONE unit, so the unit's loss averages them before
    clipping and the unit's sensitivity stays ``max_grad_norm`` (noise multiplicity as in
    DPDM). Stacking them as separate units would clip each draw as its own record.

    Args:
        autoencoder: frozen pre-trained autoencoder (its stored scale factor is used).
        scheduler: the training noise scheduler (``add_noise``).
        noise_multiplicity: K draws per record.
        condition_dropout: probability of dropping the whole condition of a row.
        subset_conditioning: show every other row a random attribute subset of uniform size
            (:func:`scripts.engines.attribute_mask`, drawn from the private generator).
        seed: seed of the private generator of the draws (tests only; None: OS entropy).
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        scheduler: Any,
        *,
        noise_multiplicity: int = 1,
        condition_dropout: float = 0.0,
        subset_conditioning: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__(autoencoder, scheduler.num_train_timesteps, condition_dropout, subset_conditioning)
        if noise_multiplicity < 1:
            raise ConfigError(f"config field 'noise_multiplicity': expected an integer >= 1, got {noise_multiplicity}")
        self.scheduler, self.k = scheduler, int(noise_multiplicity)
        self.generator = private_generator(seed)

    def make_unit(self, unit: Mapping[str, Any], device: str | torch.device) -> dict[str, torch.Tensor]:
        """The unit's rows: latents, noise, timesteps, condition, each with m = records x K rows.

        A unit that already holds ``latent`` (scaled latents cached once per record) skips the encoder.
        """
        latents = unit["latent"].to(device) if "latent" in unit else self.encode(unit["image"].to(device))
        latents = latents.repeat_interleave(self.k, dim=0)
        condition = make_condition(unit["attributes"], unit["missing"]).repeat_interleave(self.k, dim=0)
        noise = torch.randn(latents.shape, generator=self.generator).to(device)
        timesteps = torch.randint(0, self.num_train_timesteps, (latents.shape[0],), generator=self.generator).to(device)
        return {
            "latents": latents,
            "noise": noise,
            "timesteps": timesteps,
            "condition": self.drop_attributes(condition, self.generator).to(device),
        }

    def loss(self, net: Callable[..., torch.Tensor], unit: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean squared error of the predicted noise over the unit's rows (vmap-safe)."""
        noisy = self.scheduler.add_noise(unit["latents"], unit["noise"], unit["timesteps"])
        prediction = net(noisy, unit["timesteps"], unit["condition"])
        return ((prediction - unit["noise"]) ** 2).mean()


class AutoencoderUnitLoss:
    """Rows and loss of a unit for DP fine-tuning of the autoencoder: its volumes, K posterior draws.

    The posterior sample of each row, ``z_mu + noise * z_sigma``, takes its ``noise`` from the
    unit (drawn in :meth:`make_unit` from a generator seeded from OS entropy), as the diffusion
    stage's noise and timesteps: a draw from the global RNG, whose seed is public, let anyone
    replay how many rows a step sampled, and made the other units' draws depend on whether a
    unit was added ahead of them (noise-off sum moved by 1.033 C).

    Args:
        loss_function: ``AutoencoderKLLoss`` (reconstruction + KL); a loss with trainable
            state of its own (a discriminator) would train outside DP and is refused.
        noise_multiplicity: K posterior samples per record.
        autoencoder: the :class:`~scripts.networks.SliceAutoencoder` being fine-tuned (for the
            latent's shape); needed by :meth:`make_unit`.
        seed: seed of the private generator (tests only; None: OS entropy).
    """

    def __init__(
        self,
        loss_function: nn.Module,
        noise_multiplicity: int = 1,
        autoencoder: nn.Module | None = None,
        seed: int | None = None,
    ) -> None:
        trainable = (
            [n for n, p in loss_function.named_parameters() if p.requires_grad]
            if isinstance(loss_function, nn.Module)
            else []
        )
        if trainable or getattr(loss_function, "adversarial", None) is not None:
            raise ConfigError(
                "the DP autoencoder stage cannot use a loss with trainable state (adversarial_weight > 0 adds a "
                f"PatchGAN discriminator{': ' + ', '.join(trainable[:3]) if trainable else ''}): it would step on the "
                "private images outside DP-SGD. Set --adversarial_weight 0 for DP fine-tuning"
            )
        if noise_multiplicity < 1:
            raise ConfigError(f"config field 'noise_multiplicity': expected an integer >= 1, got {noise_multiplicity}")
        self.loss_function, self.k, self.autoencoder = loss_function, int(noise_multiplicity), autoencoder
        self.generator = private_generator(seed)

    def make_unit(self, unit: Mapping[str, Any], device: str | torch.device) -> dict[str, torch.Tensor]:
        """The unit's images, each repeated K times, and the standard normal draws of their posterior samples."""
        if self.autoencoder is None or not hasattr(self.autoencoder, "latent_shape"):
            raise ConfigError(
                "AutoencoderUnitLoss needs 'autoencoder' (the SliceAutoencoder being fine-tuned, e.g. autoencoder: "
                "'@network' in configs/dp_finetune_autoencoder.yaml) to draw its posterior noise privately"
            )
        image = unit["image"].to(device).repeat_interleave(self.k, dim=0)
        noise = torch.randn(self.autoencoder.latent_shape(image.shape), generator=self.generator)
        return {"image": image, "posterior_noise": noise.to(device)}

    def loss(self, net: Callable[..., torch.Tensor], unit: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Autoencoder loss of the unit's rows, with the unit's posterior noise."""
        return self.loss_function(net(unit["image"], unit["posterior_noise"]), unit["image"])
