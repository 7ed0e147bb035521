"""The generator: the diffusion model to sample from, its autoencoder, and the sampler around them.

:func:`load_generator` is the one load sequence (model file, the autoencoder it was trained with,
their checks and hashes) that synthesis, the evaluation and the benchmarks share.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import yaml
from monai.networks.schedulers import DDPMScheduler, Scheduler
from scripts.data import EncodeAttributesd
from scripts.engines import make_condition
from scripts.errors import CheckpointError, ConfigError, MissingInputError
from scripts.files import sha256
from scripts.networks import check_latent_shape, check_same_autoencoder, load_autoencoder, load_diffusion
from scripts.sampling import EvaluationCounter, decode_latents, sample_latents
from torch import nn

DP_STAGE = "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/dp_finetune.yaml']\""
AUTOENCODER_STAGE = (
    "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/train_autoencoder.yaml']\""
)


def _large_files_hint(path: str, bundle_root: str) -> str:
    """`` or fetch it with ...`` when large_files.yml lists ``path``, else empty."""
    listing = os.path.join(bundle_root, "large_files.yml")
    if not os.path.isfile(listing):
        listing = "large_files.yml"
    if not os.path.isfile(listing):
        return ""
    with open(listing) as f:
        entries = (yaml.safe_load(f) or {}).get("large_files") or []
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(bundle_root))
    if any(os.path.normpath(str(e.get("path", ""))) == os.path.normpath(rel) for e in entries):
        return "; or fetch the published file with: python -m monai.bundle download_large_files"
    return ""


def load_model(
    model_path: str, device: str | torch.device = "cpu", weights: str = "ema", bundle_root: str = "."
) -> tuple[nn.Module, dict]:
    """Load the diffusion model to sample from (``models/model.pt`` by default).

    Args:
        model_path: checkpoint of the DP fine-tuning stage (or any diffusion-stage checkpoint).
        device: device of the network.
        weights: ``"ema"`` (default) or ``"network"``.
        bundle_root: bundle root, to look the file up in ``large_files.yml``.

    Returns:
        (network in eval mode without gradients, checkpoint dict without the weights).
    """
    if weights not in ("ema", "network"):
        raise ConfigError(f"config field 'weights': expected 'ema' or 'network', got {weights!r}")
    if not os.path.isfile(model_path):
        raise MissingInputError(
            f"model weights {model_path} not found; they are produced by the DP fine-tuning stage: {DP_STAGE}"
            f"{_large_files_hint(model_path, bundle_root)}"
        )
    network, ckpt = load_diffusion(model_path, device, weights)
    info = {k: v for k, v in ckpt.items() if k not in ("network", "ema", "optimizer", "lr_scheduler", "rng", "dp")}
    return network.eval().requires_grad_(False), info


def resolve_autoencoder_path(
    autoencoder_path: str | None, model_info: Mapping, model_path: str, bundle_root: str = "."
) -> str:
    """The autoencoder file: the override, else the one the model checkpoint names.

    The stored path is looked up, in this order: relative to ``bundle_root`` (a downloaded or
    moved bundle), as ``bundle_root/models/<its file name>`` (an absolute path of another root or
    machine: a copied root decodes with its own file, not the original's), and only then as
    stored. When the checkpoint records the file's SHA-256 (``autoencoder_sha256``), the file
    found must have it.

    Returns:
        the path of an existing file.

    Raises:
        MissingInputError: naming the stage that produces the autoencoder.
        CheckpointError: the file found is not the one the model was trained with.
    """
    if autoencoder_path:
        path, origin = str(autoencoder_path), "--autoencoder_path"
    else:
        stored = str(model_info.get("autoencoder") or "")
        origin = f"the autoencoder path stored in {model_path}"
        candidates = [] if os.path.isabs(stored) else [os.path.join(bundle_root, stored)]
        candidates += [os.path.join(bundle_root, "models", os.path.basename(stored)), stored]
        candidates = [os.path.normpath(c) for c in candidates]  # "./models/x.pt" under "." is "models/x.pt"
        path = next((c for c in candidates if stored and os.path.isfile(c)), stored)
    if not path or not os.path.isfile(path):
        raise MissingInputError(
            f"autoencoder {path or '<none>'} ({origin}) not found; it is produced by: {AUTOENCODER_STAGE} "
            f"(a DP-fine-tuned one by configs/dp_finetune_autoencoder.yaml); or pass --autoencoder_path FILE"
        )
    expected = None if autoencoder_path else model_info.get("autoencoder_sha256")  # an override is the user's choice
    if expected and sha256(path) != expected:
        raise CheckpointError(
            f"autoencoder {path} ({origin}) has SHA-256 {sha256(path)[:16]}..., but {model_path} was trained with "
            f"the autoencoder of SHA-256 {str(expected)[:16]}...; pass --autoencoder_path with that file"
        )
    return path


def load_matching_autoencoder(path: str, model_info: Mapping, device: str | torch.device = "cpu") -> nn.Module:
    """Load the autoencoder and check it is the one the diffusion model was trained with.

    Args:
        path: autoencoder checkpoint.
        model_info: the diffusion checkpoint's model information (scale factor, shapes).
        device: device of the network.

    Returns:
        the frozen autoencoder.
    """
    autoencoder = load_autoencoder(path, device)
    check_same_autoencoder(model_info, autoencoder, path)
    check_latent_shape(model_info["spatial_size"], model_info["latent_shape"], autoencoder)
    return autoencoder


@dataclass(frozen=True)
class GeneratorFiles:
    """The files a generator was loaded from, as the provenance of its images records them.

    Attributes:
        model: the diffusion checkpoint sampled from; ``model_sha256`` its hash.
        autoencoder: the autoencoder decoded with; ``autoencoder_sha256`` its hash.
        weights: ``"ema"`` or ``"network"``.
        model_info: the checkpoint's entries besides the weights (schedule, shapes, ledger, ...).
    """

    model: str
    model_sha256: str
    autoencoder: str
    autoencoder_sha256: str
    weights: str = "ema"
    model_info: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Generator:
    """The networks of a generator and the files they came from."""

    network: nn.Module
    autoencoder: nn.Module
    files: GeneratorFiles

    @property
    def info(self) -> Mapping[str, Any]:
        """The diffusion checkpoint's model information."""
        return self.files.model_info


def load_generator(
    model_path: str,
    *,
    autoencoder_path: str | None = None,
    device: str | torch.device = "cpu",
    weights: str = "ema",
    bundle_root: str = ".",
) -> Generator:
    """Load a diffusion model and the autoencoder it was trained with, checked against each other.

    Args:
        model_path: diffusion checkpoint (``models/model.pt``, or a public ``diffusion.pt``).
        autoencoder_path: override of the autoencoder path stored in the checkpoint.
        device: device of the networks.
        weights: ``"ema"`` (default) or ``"network"``.
        bundle_root: bundle root the stored paths are looked up under.

    Returns:
        the networks (eval mode, no gradients) and their :class:`GeneratorFiles`.
    """
    network, info = load_model(model_path, device, weights, bundle_root)
    path = resolve_autoencoder_path(autoencoder_path, info, model_path, bundle_root)
    autoencoder = load_matching_autoencoder(path, info, device)
    files = GeneratorFiles(model_path, sha256(model_path), path, sha256(path), weights, info)
    return Generator(network, autoencoder, files)


def _guidance(scale: Any) -> float | None:
    if scale is None or (isinstance(scale, str) and scale.strip().lower() in ("", "none", "null", "off")):
        return None
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config field 'guidance_scale': expected a number >= 0 or null (off), got {scale!r}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"config field 'guidance_scale': expected a number >= 0 or null (off), got {scale!r}")
    return None if value == 1.0 else value


class Synthesizer:
    """Attribute vectors + seeds -> volumes: condition encoding, latent sampling, decoding.

    Args:
        autoencoder: frozen :class:`~scripts.networks.SliceAutoencoder` (holds the scale factor).
        network: :class:`~scripts.networks.ConditionalDiffusionUNet`.
        scheduler: from :func:`scripts.sampling.build_scheduler`.
        latent_shape: (C, D, h, w) of one latent.
        attribute_ranges: reference ranges used to normalise attributes (as in training).
        guidance_scale: classifier-free guidance scale; None or 1 = off.
        device: device to sample on.
        verbose: MONAI's progress bar over the denoising steps of every batch.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        network: nn.Module,
        scheduler: Scheduler,
        latent_shape: Sequence[int],
        attribute_ranges: Mapping[str, Sequence[float]],
        guidance_scale: float | None = None,
        device: str | torch.device = "cpu",
        verbose: bool = False,
    ) -> None:
        self.autoencoder, self.network, self.scheduler = autoencoder, network.eval(), scheduler
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.encoder = EncodeAttributesd(keys="attributes", ranges=attribute_ranges)
        self.guidance_scale = _guidance(guidance_scale)
        self.device = torch.device(device)
        self.verbose = verbose
        self.evaluations = 0  # UNet evaluations so far (counted by a forward hook while sampling)
        if self.device.type == "cuda":  # same kernels for the same shapes
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True

    @property
    def sampler(self) -> str:
        """``"ddpm"`` or ``"ddim"``."""
        return "ddpm" if isinstance(self.scheduler, DDPMScheduler) else "ddim"

    @property
    def steps(self) -> int:
        """Denoising steps per sample."""
        return len(self.scheduler.timesteps)

    def condition(self, values: np.ndarray) -> torch.Tensor:
        """(B, 14) raw attributes (NaN = missing) -> (B, 14, 2) condition on the device."""
        scaled, missing = zip(*(self.encoder.encode(v) for v in np.asarray(values, dtype=np.float64)))
        return make_condition(torch.from_numpy(np.stack(scaled)), torch.from_numpy(np.stack(missing))).to(self.device)

    def latents(self, values: np.ndarray, seeds: Sequence[int]) -> torch.Tensor:
        """Sample (B, C, D, h, w) latents, one per attribute row and seed; adds to :attr:`evaluations`."""
        with EvaluationCounter(self.network) as counter:
            latents = sample_latents(
                self.network,
                self.scheduler,
                self.condition(values),
                self.latent_shape,
                self.guidance_scale,
                verbose=self.verbose,
                seeds=list(seeds),
            )
        self.evaluations += counter.count
        return latents

    @torch.no_grad()
    def __call__(self, values: np.ndarray, seeds: Sequence[int]) -> np.ndarray:
        """Generate volumes.

        Args:
            values: (B, 14) raw attributes (NaN = missing).
            seeds: one seed per row.

        Returns:
            (B, D, H, W) float32 volumes clipped to [0, 1] (network layout: slices first).
        """
        volumes = decode_latents(self.autoencoder, self.latents(values, seeds))
        return volumes[:, 0].clamp(0.0, 1.0).float().cpu().numpy()
