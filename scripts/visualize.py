"""The bundle's pictures: PNG montages of short-axis slices (reconstructions, samples) and sweep grids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scripts.attributes import ATTRIBUTE_UNITS, BINARY_ATTRIBUTES
from scripts.engines import make_condition
from scripts.files import atomic_path
from torch import nn


def save_montage(images: Sequence[tuple[str, np.ndarray]], path: str, slices: int = 3) -> str:
    """Save a grid: one row per volume, ``slices`` evenly spaced slices (base to apex) per row.

    Args:
        images: (title, (D, H, W) array) pairs.
        path: PNG path (written atomically).
        slices: slices shown per volume.

    Returns:
        the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(len(images), 1)
    fig, axes = plt.subplots(rows, slices, figsize=(2.0 * slices, 2.0 * rows), squeeze=False)
    for r, (title, vol) in enumerate(images):
        vol = np.asarray(vol, dtype=np.float32)
        idx = np.linspace(vol.shape[0] * 0.25, vol.shape[0] * 0.75, slices).astype(int)
        for c, z in enumerate(idx):
            ax = axes[r, c]
            ax.imshow(vol[z], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(title, fontsize=7)
            if r == 0:
                ax.set_title(f"slice {z}", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")  # the temp name ends in .part
    plt.close(fig)
    return path


def save_sweep_grid(
    volumes: np.ndarray, values: Sequence[float], row_labels: Sequence[str], attribute: str, path: str, title: str = ""
) -> str:
    """Save a grid of mid-ventricular slices: one row per phase, one column per value.

    Args:
        volumes: (rows, columns, D, H, W) volumes.
        values: the swept values (columns).
        row_labels: one label per row.
        attribute: swept attribute (for the column titles).
        path: PNG path (written atomically).
        title: figure title.

    Returns:
        the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = volumes.shape[:2]
    mid = volumes.shape[2] // 2
    unit = ATTRIBUTE_UNITS[attribute].split(",")[0] if attribute not in BINARY_ATTRIBUTES else ""
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.1 * rows + 0.4), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(volumes[r, c, mid], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{attribute} = {values[c]:g} {unit}".strip(), fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{row_labels[r]}\nslice {mid}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")  # the temp name ends in .part
    plt.close(fig)
    return path


@torch.no_grad()
def reconstructions(autoencoder: nn.Module, dataset: Sequence[dict], count: int, device: str | torch.device) -> list:
    """(title, volume) pairs: each of the first ``count`` items and its reconstruction."""
    model = getattr(autoencoder, "module", autoencoder)
    was_training = model.training
    model.eval()
    out = []
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        recon = model(item["image"][None].to(device))[0]
        out += [(f"{item['id']} input", item["image"][0].cpu().numpy()), ("reconstruction", recon[0, 0].cpu().numpy())]
    model.train(was_training)
    return out


def samples(
    autoencoder: nn.Module,
    network: nn.Module,
    scheduler,
    dataset: Sequence[dict],
    count: int,
    latent_shape: Sequence[int],
    device: str | torch.device,
    guidance_scale: float | None = None,
) -> list:
    """(title, volume) pairs: samples conditioned on the attributes of the first ``count`` items."""
    from scripts.sampling import sample_volumes

    items = [dataset[i] for i in range(min(count, len(dataset)))]
    condition = torch.stack([make_condition(it["attributes"], it["missing"]) for it in items]).to(device)
    model = getattr(network, "module", network)
    vols = sample_volumes(autoencoder, model, scheduler, condition, latent_shape, guidance_scale, seed=0)
    return [(f"sample | {it['id']} attrs", v[0].clamp(0, 1).cpu().numpy()) for it, v in zip(items, vols)]


def attribute_items(requests: Sequence[dict], ranges: dict) -> list[dict]:
    """Montage conditions from attribute values written in a config (``{name: value}``, absent = missing).

    The DP stage draws its MLflow montage from these: values the user wrote, never a private
    record's attributes (conditioning on those would release them outside the guarantee).

    Args:
        requests: one mapping of attribute values per image.
        ranges: the reference ranges (``attribute_ranges`` of the config).

    Returns:
        items with ``attributes``, ``missing`` and ``id``, as :func:`samples` reads them.
    """
    from scripts.attributes import ATTRIBUTE_NAMES
    from scripts.data import EncodeAttributesd

    encoder = EncodeAttributesd(keys="attributes", ranges=ranges)
    items = []
    for i, request in enumerate(requests):
        raw = np.array([float(request.get(n, np.nan)) for n in ATTRIBUTE_NAMES], dtype=np.float32)
        scaled, missing = encoder.encode(raw)
        label = ", ".join(f"{k} {v:g}" for k, v in list(request.items())[:2])  # short: a montage row title
        items.append(
            {"attributes": torch.from_numpy(scaled), "missing": torch.from_numpy(missing), "id": label or f"#{i}"}
        )
    return items
