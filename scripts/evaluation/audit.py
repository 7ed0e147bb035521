"""Empirical privacy audit of a diffusion model: membership inference, memorisation, positive control.

- Membership inference (loss attack): the score of a record is minus the model's denoising
  loss at fixed timesteps with fixed noise (the same draw for every record), averaged over the
  records of its privacy unit. Members are the private training units, non-members the
  held-out private units (validation + test, never trained on). AUC (MONAI
  ``compute_roc_auc``) with a bootstrap interval, and the TPR at 1 % FPR, per timestep; the
  best timestep is reported (choosing it on the same data flatters the attack, which is the
  conservative direction for an audit).
- Memorisation: each synthetic volume's distance to its nearest private training volume and
  to its nearest held-out volume (features and pixels); a near-copy is closer to a training
  record than any held-out record is to the training set, and closer to training than to
  held-out data.
- Positive control: a non-DP copy of the model over-fitted on a handful of records must be
  flagged by the same code (AUC >= 0.8).

An audit gives an empirical LOWER bound on leakage at best: a weak attack failing does not
show privacy. Its numbers are computed on private records and are not covered by epsilon.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from monai.networks.schedulers import DDPMScheduler
from scripts.errors import ConfigError
from scripts.evaluation.volumes import require
from torch import nn

FLAG_AUC = 0.8
AUDIT_CAVEAT = (
    "The audit gives an empirical lower bound on leakage at best: an attack that fails does not prove privacy, and "
    "only the DP guarantee (epsilon) bounds every attack. Audit and evaluation numbers computed on private records "
    "(membership scores, distances to private volumes, segmenter accuracy on private volumes, real-vs-private "
    "distances) are themselves NOT covered by epsilon: do not release them as if they were."
)


def roc_auc(member: np.ndarray, nonmember: np.ndarray) -> float:
    """AUC of separating members (label 1) from non-members by score (higher = member)."""
    y_pred = torch.as_tensor(np.concatenate([member, nonmember]), dtype=torch.float64)
    y = torch.cat([torch.ones(len(member)), torch.zeros(len(nonmember))])
    return float(compute_roc_auc(y_pred, y))


def roc_curve(member: np.ndarray, nonmember: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold (for the plot), from (0, 0) to (1, 1)."""
    thresholds = np.unique(np.concatenate([member, nonmember]))[::-1]
    fpr = [0.0] + [float(np.mean(nonmember >= t)) for t in thresholds]
    tpr = [0.0] + [float(np.mean(member >= t)) for t in thresholds]
    return np.asarray(fpr), np.asarray(tpr)


def tpr_at_fpr(member: np.ndarray, nonmember: np.ndarray, fpr: float = 0.01) -> float:
    """Largest TPR at a threshold whose FPR is at most ``fpr`` (strictly above the allowed non-member scores)."""
    allowed = math.floor(fpr * len(nonmember))
    ordered = np.sort(nonmember)[::-1]
    threshold = ordered[allowed] if allowed < len(ordered) else -np.inf
    return float(np.mean(member > threshold))


def bootstrap_auc(
    member: np.ndarray, nonmember: np.ndarray, samples: int = 1000, seed: int = 0, level: float = 0.95
) -> list[float]:
    """Percentile bootstrap interval of the AUC (members and non-members resampled separately)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(samples)):
        m = member[rng.integers(0, len(member), len(member))]
        n = nonmember[rng.integers(0, len(nonmember), len(nonmember))]
        values.append(roc_auc(m, n))
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return [float(lo), float(hi)]


@torch.no_grad()
def encode_items(
    autoencoder: nn.Module, items: Sequence[dict], device: str | torch.device, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents and (B, 14, 2) conditions of dataset items (``scripts.data.get_dataset``)."""
    from scripts.engines import make_condition

    latents, conditions = [], []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        images = torch.stack([torch.as_tensor(it["image"]) for it in batch]).to(device)
        latents.append((autoencoder.encode_stage_2_inputs(images) * autoencoder.scale_factor).cpu())
        conditions.append(
            make_condition(
                torch.stack([it["attributes"] for it in batch]), torch.stack([it["missing"] for it in batch])
            )
        )
    return torch.cat(latents), torch.cat(conditions)


def _target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if scheduler.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if scheduler.prediction_type == "sample":
        return latents
    return noise


@torch.no_grad()
def denoising_losses(
    network: nn.Module,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    conditions: torch.Tensor,
    timesteps: Sequence[int],
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
) -> np.ndarray:
    """Per-record denoising loss at fixed timesteps with fixed noise (the same draw for every record).

    Args:
        network: the diffusion UNet.
        scheduler: DDPM scheduler with the model's training schedule.
        latents: (N, C, D, h, w) scaled latents.
        conditions: (N, 14, 2) conditions.
        timesteps: the timesteps to score at.
        seed: seed of the fixed noise (one draw per timestep, shared by all records).
        device: device.
        batch_size: records per forward pass.

    Returns:
        (N, K) mean squared errors.
    """
    network.eval()
    total = int(scheduler.num_train_timesteps)
    bad = [t for t in timesteps if not 0 <= int(t) < total]
    if bad:
        raise ConfigError(f"config field 'mia_timesteps': {bad} outside [0, {total - 1}] (the model has T = {total})")
    from tqdm import tqdm

    out = np.zeros((len(latents), len(timesteps)))
    for k, t in enumerate(
        tqdm(timesteps, desc=f"membership scores ({len(latents)} records)", unit="timestep", leave=False)
    ):
        noise = torch.randn(tuple(latents.shape[1:]), generator=torch.Generator().manual_seed(int(seed) + 1000 * k))
        for start in range(0, len(latents), batch_size):
            z = latents[start : start + batch_size].to(device)
            tt = torch.full((len(z),), int(t), dtype=torch.long, device=device)
            eps = noise.to(device).expand_as(z)
            noisy = scheduler.add_noise(original_samples=z, noise=eps, timesteps=tt)
            pred = network(noisy, tt, conditions[start : start + batch_size].to(device))
            err = (pred.float() - _target(scheduler, z, eps, tt).float()).pow(2).flatten(1).mean(1)
            out[start : start + len(z), k] = err.cpu().numpy()
    return out


def unit_scores(losses: np.ndarray, units: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Average the per-record losses of each privacy unit; returns (unit ids, (U, K) losses)."""
    order: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        order.setdefault(u, []).append(i)
    return list(order), np.stack([losses[idx].mean(0) for idx in order.values()])


def membership_inference(
    member_losses: np.ndarray,
    nonmember_losses: np.ndarray,
    timesteps: Sequence[int],
    bootstrap: int = 1000,
    seed: int = 0,
    fpr: float = 0.01,
) -> dict[str, Any]:
    """AUC, bootstrap interval and TPR at ``fpr`` of the loss attack, per timestep and for the mean over timesteps.

    Args:
        member_losses: (U_m, K) per-unit losses of members.
        nonmember_losses: (U_n, K) per-unit losses of non-members.
        timesteps: the K timesteps.
        bootstrap: bootstrap resamples for the interval.
        seed: bootstrap seed.
        fpr: false-positive rate of the reported TPR.

    Returns:
        ``{"auc", "auc_ci95", "tpr_at_1pct_fpr", "best", "per_timestep": [...], "members", "nonmembers", ...}``.
    """
    require(len(member_losses), 2, "membership inference: member units (private training split)")
    require(len(nonmember_losses), 2, "membership inference: non-member units (private validation + test splits)")
    candidates = [(f"t={int(t)}", k) for k, t in enumerate(timesteps)] + [("mean over timesteps", None)]
    rows = []
    for name, k in candidates:
        m = -(member_losses[:, k] if k is not None else member_losses.mean(1))
        n = -(nonmember_losses[:, k] if k is not None else nonmember_losses.mean(1))
        rows.append({"score": name, "auc": roc_auc(m, n), "tpr_at_1pct_fpr": tpr_at_fpr(m, n, fpr), "_m": m, "_n": n})
    best = max(rows, key=lambda r: r["auc"])
    ci = bootstrap_auc(best["_m"], best["_n"], bootstrap, seed)
    return {
        "auc": best["auc"],
        "auc_ci95": ci,
        "tpr_at_1pct_fpr": best["tpr_at_1pct_fpr"],
        "fpr_resolution": 1.0 / len(nonmember_losses),
        "best": best["score"],
        "members": len(member_losses),
        "nonmembers": len(nonmember_losses),
        "timesteps": [int(t) for t in timesteps],
        "per_timestep": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "scores": {"members": best["_m"].tolist(), "nonmembers": best["_n"].tolist()},
        "flagged": bool(best["auc"] >= FLAG_AUC),
    }


def memorisation(synthetic: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor, space: str) -> dict[str, Any]:
    """Nearest-neighbour distances of synthetic samples to private training and held-out records.

    Args:
        synthetic: (S, F) synthetic samples (features, or flattened pixels).
        train: (T, F) private training records.
        heldout: (H, F) held-out private records.
        space: name of the space (``"pixels"``, ``"FD_seg3d features"``).

    Returns:
        distances (RMS for pixels: L2 / sqrt(F)), their quantiles, the threshold and the near-copy count.
    """
    require(len(train), 1, f"memorisation ({space}): private training records")
    require(len(heldout), 1, f"memorisation ({space}): held-out private records")
    require(len(synthetic), 1, f"memorisation ({space}): synthetic samples")
    scale = math.sqrt(synthetic.shape[1]) if space == "pixels" else 1.0
    s, t, h = (torch.as_tensor(x, dtype=torch.float64).flatten(1) for x in (synthetic, train, heldout))
    d_train = (torch.cdist(s, t).min(1).values / scale).numpy()
    d_heldout = (torch.cdist(s, h).min(1).values / scale).numpy()
    threshold = float((torch.cdist(h, t).min(1).values / scale).min())
    near = (d_train < threshold) & (d_train < d_heldout)
    return {
        "space": space,
        "n": len(s),
        "distance_to_train": d_train.tolist(),
        "distance_to_heldout": d_heldout.tolist(),
        "ratio_quantiles": {
            q: float(np.quantile(d_train / np.maximum(d_heldout, 1e-12), float(q))) for q in ("0.05", "0.5", "0.95")
        },
        "distance_to_train_quantiles": {q: float(np.quantile(d_train, float(q))) for q in ("0.05", "0.5", "0.95")},
        "threshold": threshold,
        "near_copies": int(near.sum()),
        "near_copy_indices": np.flatnonzero(near).tolist(),
        "definition": "closer to a private training record than any held-out record is to the training set, "
        "and closer to the training set than to the held-out set",
    }


def overfit_control(
    network: nn.Module,
    scheduler: DDPMScheduler,
    member: tuple[torch.Tensor, torch.Tensor, list[str]],
    nonmember: tuple[torch.Tensor, torch.Tensor, list[str]],
    timesteps: Sequence[int],
    steps: int = 200,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    bootstrap: int = 200,
) -> dict[str, Any]:
    """Positive control: over-fit a non-DP copy of ``network`` on the members, then attack it with the same code.

    Args:
        network: the model to copy (left unchanged).
        scheduler: DDPM scheduler of the model's schedule.
        member: (latents, conditions, units) of the records to over-fit on.
        nonmember: (latents, conditions, units) of held-out records.
        timesteps: attack timesteps.
        steps: optimisation steps.
        lr: Adam learning rate.
        seed: seed of the training draws and of the attack noise.
        device: device.
        batch_size: records per step.
        bootstrap: bootstrap resamples.

    Returns:
        the :func:`membership_inference` result of the over-fitted copy, plus ``steps`` and ``flagged``.
    """
    from tqdm import tqdm

    model = copy.deepcopy(network).to(device).train().requires_grad_(True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(int(seed))
    latents, conditions, _ = member
    total = int(scheduler.num_train_timesteps)
    for _ in tqdm(range(int(steps)), desc="positive control (over-fitting)", unit="step", leave=False):
        idx = torch.randint(0, len(latents), (min(batch_size, len(latents)),), generator=generator)
        z = latents[idx].to(device)
        noise = torch.randn(z.shape, generator=generator).to(device)
        t = torch.randint(0, total, (len(z),), generator=generator).to(device)
        pred = model(scheduler.add_noise(original_samples=z, noise=noise, timesteps=t), t, conditions[idx].to(device))
        loss = nn.functional.mse_loss(pred.float(), _target(scheduler, z, noise, t).float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    scores = []
    for lat, cond, units in (member, nonmember):
        losses = denoising_losses(model, scheduler, lat, cond, timesteps, seed, device)
        scores.append(unit_scores(losses, units)[1])
    result = membership_inference(scores[0], scores[1], timesteps, bootstrap, seed)
    result["steps"] = int(steps)
    result["description"] = (
        f"non-DP copy of the model over-fitted for {int(steps)} steps on {result['members']} private training units, "
        f"attacked against {result['nonmembers']} held-out units; flagged when AUC >= {FLAG_AUC}"
    )
    return result
