"""PNG figures of the evaluation (all written atomically with ``scripts.files.atomic_path``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scripts.attributes import ATTRIBUTE_UNITS
from scripts.files import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> str:
    plt = _plt()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return path


def montage(pairs: Sequence[tuple[str, np.ndarray, str, np.ndarray]], path: str) -> str:
    """Real vs synthetic at matched attributes: one row per pair, mid slice of each.

    Args:
        pairs: (synthetic title, (D, H, W) synthetic, real title, (D, H, W) real).
        path: PNG path.
    """
    plt = _plt()
    rows = max(len(pairs), 1)
    fig, axes = plt.subplots(rows, 2, figsize=(4.6, 2.3 * rows), squeeze=False)
    for r, (s_title, s_vol, r_title, r_vol) in enumerate(pairs):
        for c, (title, vol) in enumerate(((s_title, s_vol), (r_title, r_vol))):
            ax = axes[r, c]
            ax.imshow(vol[vol.shape[0] // 2], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=6)
    fig.suptitle("synthetic (left) vs public real at the nearest attributes (right), middle slice", fontsize=7)
    return _save(fig, path)


def reconstructions(
    ids: Sequence[str],
    originals: np.ndarray,
    rows: Sequence[tuple[str, np.ndarray, Sequence[tuple[float, float]]]],
    path: str,
    count: int = 6,
) -> str:
    """Originals (top row) above one row of reconstructions per autoencoder, at the network's crop.

    Args:
        ids: volume ids.
        originals: (N, D, H, W) originals in [0, 1].
        rows: (label, (N, D, H, W) reconstructions in [0, 1], (PSNR dB, SSIM) per volume) per row.
        path: PNG path.
        count: volumes shown (the first ``count``).
    """
    plt = _plt()
    n = max(min(count, len(ids)), 1)
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(1.9 * n, 2.0 * (1 + len(rows))), squeeze=False)
    for c in range(min(count, len(ids))):
        # the middle of the slices with signal (the zero padding is left out): a mid-ventricular slice
        signal = np.flatnonzero(np.ptp(originals[c].reshape(originals.shape[1], -1), axis=1) > 0)
        z = int(signal[len(signal) // 2]) if signal.size else originals.shape[1] // 2
        panels = [("original", originals[c], f"{ids[c]} z={z}")]
        panels += [(label, recs[c], f"{scores[c][0]:.1f} dB, SSIM {scores[c][1]:.2f}") for label, recs, scores in rows]
        for r, (label, vol, title) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(vol[z], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=6)
            if c == 0:
                ax.set_ylabel(label, fontsize=6)
    fig.suptitle("held-out test volumes (top) and their autoencoder reconstructions", fontsize=7)
    return _save(fig, path)


def scatter(scatter_data: Mapping[str, Mapping[str, Sequence[float]]], stats: Mapping[str, Mapping], path: str) -> str:
    """Requested vs measured per attribute with the identity line."""
    plt = _plt()
    names = [n for n, d in scatter_data.items() if len(d["requested"])]
    cols = 3
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        ax.axis("on")
        x = np.asarray(scatter_data[name]["requested"], dtype=float)
        y = np.asarray(scatter_data[name]["measured"], dtype=float)
        ax.scatter(x, y, s=12)
        finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)]])
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="identity")
        s = stats.get(name, {})
        r = s.get("pearson_r")
        ax.set_title(f"{name}: r = {'n/a' if r is None else f'{r:.2f}'}, n = {s.get('n', len(x))}", fontsize=8)
        unit = ATTRIBUTE_UNITS.get(name, "")
        ax.set_xlabel(f"requested [{unit}]", fontsize=7)
        ax.set_ylabel(f"measured [{unit}]", fontsize=7)
        ax.tick_params(labelsize=6)
    return _save(fig, path)


def sweep_curve(sweep: Mapping[str, Any], path: str) -> str:
    """Measured quantity against the swept value (and the identity when both are in the same unit)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.0, 3.2))
    values = sweep["values"]
    if sweep.get("measured") is not None:
        ax.plot(values, sweep["measured"], "o-", label=f"measured ({sweep.get('measured_row', 'pair')})")
        ax.plot(values, values, "k--", lw=0.8, label="identity")
    for label, lv in sweep.get("lv_volume_ml", {}).items():
        ax.plot(values, lv, "x:", label=f"LV volume, {label} row")
    rho = sweep.get("spearman_rho")
    ax.set_title(f"sweep {sweep['attribute']}: Spearman rho = {'n/a' if rho is None else f'{rho:.2f}'}", fontsize=8)
    ax.set_xlabel(f"requested {sweep['attribute']} [{ATTRIBUTE_UNITS.get(sweep['attribute'], '')}]", fontsize=7)
    ax.set_ylabel("measured", fontsize=7)
    ax.legend(fontsize=6)
    return _save(fig, path)


def ladder(
    volumes: np.ndarray,
    requested: Sequence[float],
    seeds: Sequence[int],
    measured: Mapping[str, Sequence[float]],
    attribute: str,
    path: str,
) -> str:
    """A single-attribute ladder: one row per seed, one column per requested value, middle slice.

    Args:
        volumes: (N, D, H, W) generated volumes in [0, 1], in the ladder's order.
        requested: the requested value of each volume.
        seeds: the sampling seed of each volume.
        measured: {instrument: LV volume (ml) of each volume, 0 where it found none}.
        attribute: the ladder's attribute.
        path: PNG path.
    """
    plt = _plt()
    rows = sorted({int(s) for s in seeds})
    cols = sorted({float(v) for v in requested})
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.6 * len(cols), 1.75 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    unit = ATTRIBUTE_UNITS.get(attribute, "")
    for i, (vol, value, seed) in enumerate(zip(volumes, requested, seeds, strict=True)):
        ax = axes[rows.index(int(seed)), cols.index(float(value))]
        ax.imshow(vol[vol.shape[0] // 2], cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(" / ".join(f"{m[i]:.0f}" for m in measured.values()), fontsize=6)
        if cols.index(float(value)) == 0:
            ax.text(-0.08, 0.5, f"seed {seed}", transform=ax.transAxes, rotation=90, va="center", ha="right", size=6)
        if rows.index(int(seed)) == len(rows) - 1:
            ax.text(0.5, -0.08, f"{value:g} {unit}", transform=ax.transAxes, va="top", ha="center", fontsize=6)
    fig.suptitle(f"{attribute} alone (requested below), middle slice; LV ml above: {' / '.join(measured)}", fontsize=7)
    return _save(fig, path)


def membership(result: Mapping[str, Any], path: str, title: str = "membership inference") -> str:
    """Histogram of member / non-member scores and the ROC curve."""
    from scripts.evaluation.audit import roc_curve

    plt = _plt()
    m = np.asarray(result["scores"]["members"])
    n = np.asarray(result["scores"]["nonmembers"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(7.0, 3.0))
    bins = np.linspace(min(m.min(), n.min()), max(m.max(), n.max()) + 1e-12, 15)
    a.hist(m, bins=bins, alpha=0.6, label=f"members ({len(m)})")
    a.hist(n, bins=bins, alpha=0.6, label=f"non-members ({len(n)})")
    a.set_xlabel(f"score = -denoising loss ({result['best']})", fontsize=7)
    a.legend(fontsize=6)
    fpr, tpr = roc_curve(m, n)
    b.plot(fpr, tpr, "-", label=f"AUC {result['auc']:.2f}")
    b.plot([0, 1], [0, 1], "k--", lw=0.8)
    b.set_xlabel("FPR", fontsize=7)
    b.set_ylabel("TPR", fontsize=7)
    b.legend(fontsize=6)
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def distances(results: Sequence[Mapping[str, Any]], path: str) -> str:
    """Nearest-neighbour distances of synthetic samples to training vs held-out private records."""
    plt = _plt()
    fig, axes = plt.subplots(1, max(len(results), 1), figsize=(3.6 * max(len(results), 1), 3.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        x, y = np.asarray(res["distance_to_heldout"]), np.asarray(res["distance_to_train"])
        ax.scatter(x, y, s=12)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.axhline(res["threshold"], color="r", lw=0.8, label="near-copy threshold")
        ax.set_xlabel("distance to nearest held-out", fontsize=7)
        ax.set_ylabel("distance to nearest training", fontsize=7)
        ax.set_title(f"{res['space']}: {res['near_copies']} near-copies", fontsize=8)
        ax.legend(fontsize=6)
    return _save(fig, path)


def save_all(report: Mapping[str, Any], extras: Mapping[str, Any], out_dir: str) -> dict[str, str]:
    """Write every figure the report has data for; returns {name: path}."""
    paths: dict[str, str] = {}
    os.makedirs(out_dir, exist_ok=True)
    if extras.get("montage"):
        paths["montage"] = montage(extras["montage"], os.path.join(out_dir, "eval_montage.png"))
    figure = (report.get("reconstruction") or {}).get("figure")
    if figure:  # written by the reconstruction section, which holds the images
        paths["reconstructions"] = figure
    ctrl = report.get("controllability")
    if ctrl:
        paths["scatter"] = scatter(extras["scatter"], ctrl["attributes"], os.path.join(out_dir, "eval_scatter.png"))
    for sweep in report.get("sweeps", []):
        paths[f"sweep_{sweep['attribute']}"] = sweep_curve(
            sweep, os.path.join(out_dir, f"eval_sweep_{sweep['attribute']}.png")
        )
    for name, ladder_result in (report.get("ladders") or {}).items():
        if isinstance(ladder_result, Mapping) and ladder_result.get("figure"):  # drawn by the ladder section
            paths[f"ladder_{name}"] = ladder_result["figure"]
    audit = report.get("privacy_audit", {})
    if extras.get("mia"):
        paths["membership"] = membership(extras["mia"], os.path.join(out_dir, "eval_membership.png"))
    if extras.get("control"):
        paths["positive_control"] = membership(
            extras["control"],
            os.path.join(out_dir, "eval_positive_control.png"),
            "positive control (over-fitted, non-DP)",
        )
    if extras.get("memorisation"):
        paths["memorisation"] = distances(extras["memorisation"], os.path.join(out_dir, "eval_memorisation.png"))
    del audit
    return paths
