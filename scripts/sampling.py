"""Conditioned sampling of volumes from the latent diffusion model (MONAI inferer + scheduler).

- :func:`build_scheduler` makes the DDPM or DDIM sampler on the noise schedule stored in a
  diffusion checkpoint (``scheduler`` entry: ``num_train_timesteps``, ``schedule``,
  ``beta_start``, ``beta_end``);
- :func:`sample_latents` / :func:`sample_volumes` run MONAI's ``DiffusionInferer.sample``
  (optionally with classifier-free guidance); with ``seeds`` every sample has its own random
  stream, so a sample depends on its seed only, not on the other samples of its batch;
- :class:`EvaluationCounter` counts UNet evaluations (one per sample row of a forward pass).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler
from scripts.errors import ConfigError
from torch import nn

SAMPLERS = ("ddpm", "ddim")


class PerSampleDDPMScheduler(DDPMScheduler):
    """MONAI's ``DDPMScheduler`` whose per-step noise comes from one generator per sample.

    ``DDPMScheduler.step`` draws noise of the whole batch's shape from one generator (the
    global one when the inferer calls it), so a sample's noise depends on its position in the
    batch and on the batch size. When :attr:`generators` is set (one per batch row), every
    row is stepped with MONAI's own ``step`` and its own generator; the step is elementwise,
    so the row's result does not depend on the other rows. ``generators = None`` (default)
    keeps MONAI's behaviour.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.generators: list[torch.Generator] | None = None

    def step(
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse step; per-row noise when :attr:`generators` is set (see class docstring)."""
        if self.generators is None or generator is not None:
            return super().step(model_output, timestep, sample, generator)
        if len(self.generators) != model_output.shape[0]:
            raise ValueError(f"{len(self.generators)} generators for a batch of {model_output.shape[0]} samples")
        rows = [
            super(PerSampleDDPMScheduler, self).step(model_output[i : i + 1], timestep, sample[i : i + 1], g)
            for i, g in enumerate(self.generators)
        ]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


def build_scheduler(sampler: str, schedule: Mapping, num_inference_steps: int | None = None) -> Scheduler:
    """The sampler on the noise schedule a diffusion checkpoint was trained with.

    Args:
        sampler: ``"ddpm"`` (ancestral sampling over every training timestep) or ``"ddim"``
            (deterministic, eta = 0, ``num_inference_steps`` steps).
        schedule: the checkpoint's ``scheduler`` entry (``num_train_timesteps``, ``schedule``,
            ``beta_start``, ``beta_end``; other keys are passed on to the MONAI scheduler).
        num_inference_steps: DDIM steps (1 .. T); for DDPM None or T. MONAI's
            ``DDPMScheduler.step`` always steps from t to t - 1, so DDPM on a subset of the
            timesteps would be wrong: use DDIM for fewer steps.

    Returns:
        a MONAI scheduler with its inference timesteps set (``clip_sample=False``).
    """
    kwargs = dict(schedule)
    kwargs["clip_sample"] = False
    total = int(kwargs["num_train_timesteps"])
    if sampler == "ddpm":
        if num_inference_steps not in (None, total):
            raise ConfigError(
                f"config field 'num_inference_steps': DDPM runs every training timestep ({total}), got "
                f"{num_inference_steps}; use --sampler ddim for fewer steps (or leave num_inference_steps unset)"
            )
        scheduler = PerSampleDDPMScheduler(**kwargs)
        scheduler.set_timesteps(total)
        return scheduler
    if sampler == "ddim":
        steps = total if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= total:
            raise ConfigError(
                f"config field 'num_inference_steps': expected an integer in [1, {total}] for DDIM, got {steps!r}"
            )
        scheduler = DDIMScheduler(**kwargs)
        scheduler.set_timesteps(int(steps))
        return scheduler
    raise ConfigError(f"config field 'sampler': expected one of {list(SAMPLERS)}, got {sampler!r}")


def _step_seed(seed: int) -> int:
    """Seed of a sample's scheduler-noise stream, independent of its initial-noise stream."""
    return int(np.random.SeedSequence([int(seed), 1]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EvaluationCounter:
    """Count UNet evaluations: every forward pass adds its batch size (CFG doubles the batch).

    Args:
        network: the module whose forward passes are counted.

    Use as a context manager, or call :meth:`remove` when done.
    """

    def __init__(self, network: nn.Module) -> None:
        self.count = 0
        self._handle = network.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.count += int(output.shape[0])

    def remove(self) -> None:
        """Detach the hook."""
        self._handle.remove()

    def __enter__(self) -> EvaluationCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@torch.no_grad()
def sample_latents(
    network: nn.Module,
    scheduler: Scheduler,
    condition: torch.Tensor,
    latent_shape: Sequence[int],
    guidance_scale: float | None = None,
    *,
    seed: int = 0,
    verbose: bool = False,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Sample one (scaled) latent per condition row with MONAI's ``DiffusionInferer``.

    Args:
        network: :class:`~scripts.networks.ConditionalDiffusionUNet`.
        scheduler: MONAI scheduler with its inference timesteps already set.
        condition: (B, A, 2) attribute condition (values, missing flag).
        latent_shape: (C, D, h, w) of one latent.
        guidance_scale: classifier-free guidance scale; None or 1 = no guidance.
        seed: without ``seeds``: seed of the batch's initial noise and of the global generator
            (the DDPM noise), so the result depends on the batch composition.
        verbose: show MONAI's progress bar over the denoising steps.
        seeds: one seed per row: row i's initial noise is drawn on the CPU from a generator
            seeded with ``seeds[i]``, and a :class:`PerSampleDDPMScheduler`'s step noise from a
            second per-row generator on the condition's device, so a row's latent depends on
            its seed and condition only.

    Returns:
        (B, C, D, h, w) latents in the diffusion model's (scaled) space.
    """
    device = condition.device
    batch = condition.shape[0]
    per_sample = isinstance(scheduler, PerSampleDDPMScheduler)
    if seeds is None:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((batch, *latent_shape), generator=generator).to(device)
        torch.manual_seed(seed)  # the DDPM scheduler's per-step noise uses the global generator
    else:
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} condition rows")
        noise = torch.stack(
            [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        ).to(device)
        if per_sample:
            scheduler.generators = [torch.Generator(device=device).manual_seed(_step_seed(s)) for s in seeds]
    was_training = network.training
    network.eval()
    cfg = None if guidance_scale is None or guidance_scale == 1.0 else float(guidance_scale)
    try:
        latents = DiffusionInferer(scheduler).sample(
            input_noise=noise,
            diffusion_model=network,
            scheduler=scheduler,
            conditioning=condition,
            cfg=cfg,
            verbose=verbose,
        )
    finally:
        network.train(was_training)
        if per_sample:
            scheduler.generators = None
    return latents


@torch.no_grad()
def decode_latents(autoencoder: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Undo the latent scaling and decode: (B, C, D, h, w) latents -> (B, 1, D, H, W) volumes."""
    return autoencoder.decode_stage_2_outputs(latents / autoencoder.scale_factor)


@torch.no_grad()
def sample_volumes(
    autoencoder: nn.Module,
    network: nn.Module,
    scheduler: Scheduler,
    condition: torch.Tensor,
    latent_shape: Sequence[int],
    guidance_scale: float | None = None,
    *,
    seed: int = 0,
    verbose: bool = False,
    seeds: Sequence[int] | None = None,
) -> torch.Tensor:
    """Sample one volume per condition row.

    Args:
        autoencoder: :class:`~scripts.networks.SliceAutoencoder` holding ``scale_factor``.
        network: :class:`~scripts.networks.ConditionalDiffusionUNet`.
        scheduler: MONAI scheduler with its inference timesteps already set.
        condition: (B, A, 2) attribute condition (values, missing flag).
        latent_shape: (C, D, h, w) of one latent.
        guidance_scale: classifier-free guidance scale; None or 1 = no guidance.
        seed: seed of the initial noise and of the scheduler's noise (when ``seeds`` is None).
        verbose: show a progress bar over the denoising steps.
        seeds: one seed per row, for per-sample determinism (see :func:`sample_latents`).

    Returns:
        (B, 1, D, H, W) decoded volumes.
    """
    latents = sample_latents(
        network, scheduler, condition, latent_shape, guidance_scale, seed=seed, verbose=verbose, seeds=seeds
    )
    return decode_latents(autoencoder, latents)
