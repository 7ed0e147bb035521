"""Helpers shared by the tests: an independent RDP accountant, tiny networks, records, a tiny DP stage.

Tests import these (``from helpers import ...``) instead of importing each other.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler
from scipy.special import gammaln
from scripts.files import sha256
from scripts.networks import ConditionalDiffusionUNet, SliceAutoencoder
from scripts.privacy.handler import DPTrainingHandler
from scripts.privacy.ledger import PrivacyLedger
from scripts.privacy.unit_losses import LatentDiffusionUnitLoss
from scripts.privacy.units import PrivacyUnits, sample_rate

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------- independent RDP (no Opacus)

RDP_ORDERS = range(2, 64)


def rdp_sgm_step(q: float, sigma: float, alpha: int) -> float:
    """RDP of one step of the sampled Gaussian mechanism at integer order alpha."""
    if q == 1.0:
        return alpha / (2.0 * sigma**2)
    k = np.arange(alpha + 1)
    log_terms = (
        gammaln(alpha + 1)
        - gammaln(k + 1)
        - gammaln(alpha - k + 1)
        + k * math.log(q)
        + (alpha - k) * math.log1p(-q)
        + (k * k - k) / (2.0 * sigma**2)
    )
    m = log_terms.max()
    log_a = m + math.log(np.exp(log_terms - m).sum())
    return log_a / (alpha - 1)


def rdp_epsilon(stages, delta: float, orders=RDP_ORDERS) -> tuple[float, int]:
    """(eps, best order) of stages [(sigma, q, steps), ...] composed in RDP."""
    best = (math.inf, 0)
    for a in orders:
        rdp = sum(steps * rdp_sgm_step(q, sigma, a) for sigma, q, steps in stages)
        eps = rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        best = min(best, (eps, a))
    return best


# ----------------------------------------------------------------- tiny networks and records

SHAPE = (1, 4, 16, 16)  # image (1, D, H, W); latent (4, 4, 8, 8)


class Records(torch.utils.data.Dataset):
    """Records shaped like the data pipeline's items; ``data`` holds each record's subject and id."""

    def __init__(self, subjects: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for s in range(subjects):
            for phase in ("ED", "ES"):
                missing = (torch.rand(14, generator=g) < 0.2).float()
                self.items.append(
                    {
                        "image": torch.rand(SHAPE, generator=g),
                        "attributes": torch.randn(14, generator=g) * (1 - missing),
                        "missing": missing,
                        "id": f"s{s}_{phase}",
                        "subject": f"s{s}",
                    }
                )
        self.data = [{"subject": it["subject"], "id": it["id"]} for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def tiny_unet(
    seed: int | None = 0, head_channels: int = 8, perturb: str | None = "output", std: float = 0.1, **architecture
) -> ConditionalDiffusionUNet:
    """A tiny conditioned 3D UNet (latent 4 channels, levels 16/32, attention at the second).

    Args:
        seed: ``torch.manual_seed`` before building; ``None`` builds from the current random state.
        head_channels: channels per attention head at the second level.
        perturb: which parameters get N(0, std) values, as MONAI zero-initialises the output conv and the
            attention output projections: ``"output"`` the output conv (every layer gets gradients), ``"zero"``
            every all-zero parameter, ``"zero_matrices"`` every all-zero one of 2 or more dimensions, ``"all"``
            every parameter, ``None`` none.
        std: the standard deviation of the perturbation.
        architecture: overrides of the keyword arguments below (e.g. ``global_conditioning=True``).
    """
    if seed is not None:
        torch.manual_seed(seed)
    net = ConditionalDiffusionUNet(
        **{
            "attribute_dim": 16,
            "attribute_heads": 2,
            "spatial_dims": 3,
            "in_channels": 4,
            "out_channels": 4,
            "channels": [16, 32],
            "attention_levels": [False, True],
            "num_res_blocks": 1,
            "num_head_channels": [0, head_channels],
            "norm_num_groups": 8,
            **architecture,
        }
    )
    params = {
        None: [],
        "output": list(net.unet.out.parameters()),
        "zero": [p for p in net.parameters() if not p.any()],
        "zero_matrices": [p for p in net.parameters() if p.ndim > 1 and not p.any()],
        "all": list(net.parameters()),
    }[perturb]
    with torch.no_grad():
        for p in params:
            p.normal_(0, std)
    return net


def tiny_autoencoder(
    seed: int | None = 1,
    channels: tuple[int, ...] = (8, 8),
    latent_channels: int = 4,
    norm_num_groups: int = 4,
    scale_factor: float | None = 1.5,
    measured: bool = False,
    frozen: bool = True,
    **kwargs,
) -> SliceAutoencoder:
    """A tiny slice-wise autoencoder; by default frozen (eval, no gradients) with a fixed scale factor.

    Args:
        seed: ``torch.manual_seed`` before building; ``None`` builds from the current random state.
        channels: channels per level (no attention at any level unless ``attention_levels`` is given).
        latent_channels: latent channels.
        norm_num_groups: GroupNorm groups.
        scale_factor: the latent scale factor to store; ``None`` keeps the network's initial one.
        measured: mark the scale factor as measured (``load_autoencoder`` refuses a checkpoint without it).
        frozen: return it in eval mode with ``requires_grad`` off.
        kwargs: other ``SliceAutoencoder`` arguments, replacing the defaults (one residual block, no non-local
            attention).
    """
    if seed is not None:
        torch.manual_seed(seed)
    arguments = {
        "in_channels": 1,
        "out_channels": 1,
        "channels": list(channels),
        "latent_channels": latent_channels,
        "num_res_blocks": 1,
        "attention_levels": [False] * len(channels),
        "norm_num_groups": norm_num_groups,
        "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False,
    }
    ae = SliceAutoencoder(**{**arguments, **kwargs})
    if scale_factor is not None:
        ae.scale_factor.fill_(scale_factor)
    if measured:
        ae.scale_factor_measured.fill_(True)
    return ae.eval().requires_grad_(False) if frozen else ae


def save_autoencoder(ae: SliceAutoencoder, path: Path) -> Path:
    """Write ``ae`` as the autoencoder stage does (``network`` and ``architecture``); returns ``path``."""
    torch.save({"network": ae.state_dict(), "architecture": ae.init_kwargs}, path)
    return path


# ----------------------------------------------------------------- tiny stage checkpoints (images 8 x 48 x 48)


def tiny_stage_networks(models: Path, perturb: str | None = None) -> ConditionalDiffusionUNet:
    """Write ``models/autoencoder.pt`` (random, seed 0, scale factor 0.8, measured) and return a random UNet.

    The sizes of the other stage tests: images 8 x 48 x 48, latent 4 x 8 x 12 x 12. The UNet is built from the
    random state the autoencoder leaves; ``perturb`` as in :func:`tiny_unet` (std 0.05).
    """
    ae = tiny_autoencoder(
        seed=0, channels=(8, 16, 16), norm_num_groups=8, scale_factor=0.8, measured=True, frozen=False
    )
    save_autoencoder(ae, models / "autoencoder.pt")
    return tiny_unet(seed=None, head_channels=16, perturb=perturb, std=0.05)


def stage_checkpoint_info(net: ConditionalDiffusionUNet, autoencoder: str, scheduler: dict) -> dict:
    """The keys a diffusion checkpoint of :func:`tiny_stage_networks` holds besides its weights."""
    return {
        "architecture": net.init_kwargs,
        "latent_shape": [4, 8, 12, 12],
        "spatial_size": [8, 48, 48],
        "scale_factor": 0.8,
        "autoencoder": autoencoder,
        "scheduler": dict(scheduler),
    }


def jittered(state: dict[str, torch.Tensor], std: float = 0.01) -> dict[str, torch.Tensor]:
    """``state`` with N(0, std) noise added to its floating-point tensors (a "fine-tuned" copy)."""
    return {k: v + std * torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}


def write_privacy_report(models: Path, model: str, autoencoder: str | None = None) -> None:
    """``models/privacy_report.json`` of a complete run naming ``models/{model,autoencoder}.pt``'s SHA-256.

    ``model`` and ``autoencoder`` are the paths the report names (no ``autoencoder`` key when ``None``).
    """
    report = {
        "epsilon": 7.9,
        "delta": 1e-5,
        "privacy_unit": "subject",
        "accountant": "prv",
        "status": "complete",
        "stages": [],
        "model": model,
        "model_sha256": sha256(models / "model.pt"),
    }
    if autoencoder is not None:
        report["autoencoder"] = autoencoder
    report["autoencoder_sha256"] = sha256(models / "autoencoder.pt")
    report["covers"] = "subject-level DP of the private training data"
    (models / "privacy_report.json").write_text(json.dumps(report))


# ----------------------------------------------------------------- per-unit clipping on the tiny UNet

UNIT_LATENT = (4, 4, 8, 8)
NUM_ATTRIBUTES = 14
SCHEDULER = DDPMScheduler(num_train_timesteps=150, schedule="linear_beta", beta_start=1e-4, beta_end=7e-2)


def diffusion_loss(net: Callable, unit: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The bundle's epsilon-prediction loss (LatentDiffusionUnits.loss)."""
    noisy = SCHEDULER.add_noise(unit["latents"], unit["noise"], unit["timesteps"])
    return ((net(noisy, unit["timesteps"], unit["condition"]) - unit["noise"]) ** 2).mean()


def diffusion_unit(records: int, k: int, seed: int, missing_rate: float = 0.2) -> dict[str, torch.Tensor]:
    """One privacy unit: ``records`` volumes (a subject's ED + ES: 2), each with K (timestep, noise) draws.

    Each attribute is missing with probability ``missing_rate``.
    """
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(records, *UNIT_LATENT, generator=g).repeat_interleave(k, dim=0)
    condition = torch.rand(records, NUM_ATTRIBUTES, 2, generator=g)
    condition[..., 1] = (condition[..., 1] < missing_rate).float()
    return {
        "latents": latents,
        "noise": torch.randn(records * k, *UNIT_LATENT, generator=g),
        "timesteps": torch.randint(0, 150, (records * k,), generator=g),
        "condition": condition.repeat_interleave(k, dim=0),
    }


# ----------------------------------------------------------------- multi-process bundle runs


def torchrun_training(config_file: str, dataset_dir: Path, bundle_root: Path, *args: str):
    """``monai.bundle run training`` under torchrun with 2 CPU processes (gloo), from the bundle root."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        config_file,
        "--dataset_dir",
        str(dataset_dir),
        "--bundle_root",
        str(bundle_root),
        *args,
    ]
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, check=False)


def dp_settings(units: PrivacyUnits, **overrides) -> dict:
    """Ledger settings of a tiny DP stage."""
    settings = {
        "stage": "diffusion_dp_finetune",
        "dataset": "records",
        "privacy_unit": units.unit,
        "units": len(units),
        "records": units.num_records,
        "target_epsilon": 10.0,
        "delta": 1e-5,
        "accountant": "prv",
        "max_grad_norm": 1.0,
        "noise_multiplicity": 1,
        "logical_batch_size": 2,
        "max_physical_batch_size": 8,
        "grad_sample_mode": "loop",
        "finetune_scope": "all",
    }
    settings.update(overrides)
    return settings


def make_dp_stage(
    tmp_path,
    net=None,
    subjects=6,
    unit="subject",
    k=1,
    sigma=0.0,
    lr=1.0,
    batch=2,
    epochs=1,
    prior=(),
    seed=0,
    **settings,
) -> tuple[DPTrainingHandler, PrivacyUnits]:
    """A DP stage on tiny networks (handler + ledger); ``sigma=0`` switches the noise off (infinite target)."""
    net = net or tiny_unet()
    units = PrivacyUnits(Records(subjects), unit)
    loss = LatentDiffusionUnitLoss(
        tiny_autoencoder(), DDPMScheduler(num_train_timesteps=50), noise_multiplicity=k, seed=seed
    )
    settings.setdefault("target_epsilon", 10.0 if sigma != 0 else float("inf"))
    ledger = PrivacyLedger(
        dp_settings(units, noise_multiplicity=k, logical_batch_size=batch, **settings),
        sample_rate(units, batch),
        epochs,
        prior_stages=prior,
        path=str(tmp_path / "ledger.json"),
        noise_multiplier=sigma,
    )
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    handler = DPTrainingHandler(net, opt, ledger, loss, str(tmp_path / "report.json"), noise_seed=0)
    return handler, units
