"""Helpers shared by the tests: an independent RDP accountant, tiny networks, records, a tiny DP stage.

Tests import these (``from helpers import ...``) instead of importing each other.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler
from scipy.special import gammaln

from scripts.networks import ConditionalDiffusionUNet, SliceAutoencoder
from scripts.privacy.handler import DPTrainingHandler
from scripts.privacy.ledger import PrivacyLedger
from scripts.privacy.unit_losses import LatentDiffusionUnitLoss
from scripts.privacy.units import PrivacyUnits, sample_rate

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


def tiny_unet(seed: int = 0) -> ConditionalDiffusionUNet:
    """A tiny conditioned 3D UNet whose every layer gets gradients."""
    torch.manual_seed(seed)
    net = ConditionalDiffusionUNet(
        attribute_dim=16,
        attribute_heads=2,
        spatial_dims=3,
        in_channels=4,
        out_channels=4,
        channels=[16, 32],
        attention_levels=[False, True],
        num_res_blocks=1,
        num_head_channels=[0, 8],
        norm_num_groups=8,
    )
    with torch.no_grad():  # MONAI zero-initialises the output conv: give it weights so every layer gets gradients
        for p in net.unet.out.parameters():
            p.normal_(0, 0.1)
    return net


def tiny_autoencoder() -> SliceAutoencoder:
    """A tiny frozen slice-wise autoencoder with a fixed scale factor."""
    torch.manual_seed(1)
    ae = SliceAutoencoder(
        in_channels=1,
        out_channels=1,
        channels=[8, 8],
        latent_channels=4,
        num_res_blocks=1,
        attention_levels=[False, False],
        norm_num_groups=4,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )
    ae.scale_factor.fill_(1.5)
    return ae.eval().requires_grad_(False)


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
