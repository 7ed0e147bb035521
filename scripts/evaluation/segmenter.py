"""The measuring instrument: a MONAI 3D segmentation network trained on the PUBLIC cohort.

``configs/train_segmenter.yaml`` trains a ``UNet`` (LV blood pool 1, LV myocardium 2, RV
blood pool 3, as in the phantom label maps) with MONAI's ``SupervisedTrainer``. The
evaluation segments synthetic volumes with it to measure what was generated, and uses its
encoder as the offline feature extractor of the fidelity metrics (``FD_seg3d``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    RandAdjustContrastd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandRotated,
    RandScaleIntensityd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Transposed,
)
from scripts.data import SerialCacheDataset
from scripts.errors import DataError, MissingInputError
from scripts.phantom import LABELS, measure_attributes
from torch import nn

NUM_CLASSES = 4  # background, LV blood pool, LV myocardium, RV blood pool
CLASS_NAMES = {LABELS["lv"]: "LV", LABELS["myo"]: "MYO", LABELS["rv"]: "RV"}
SEGMENTER_STAGE = (
    "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/train_segmenter.yaml']\""
)


def build_segmenter(
    channels: Sequence[int] = (16, 32, 64, 128),
    strides: Sequence[Sequence[int]] = ((1, 2, 2), (1, 2, 2), (2, 2, 2)),
    num_res_units: int = 0,
    dropout: float = 0.0,
) -> nn.Module:
    """A MONAI 3D ``UNet`` with 4 output classes; ``init_kwargs`` is kept for the checkpoint.

    The default strides downsample in-plane first (short-axis stacks have few, thick slices),
    so nothing but the input and output layers runs at full resolution: cheap on a CPU.

    Args:
        channels: channels per level.
        strides: (D, H, W) stride of each downsampling (``len(channels) - 1`` of them).
        num_res_units: residual units per block (0 = plain convolutions, fastest).
        dropout: dropout probability.

    Returns:
        the network.
    """
    kwargs = {
        "channels": [int(c) for c in channels],
        "strides": [[int(s) for s in st] for st in strides],
        "num_res_units": int(num_res_units),
        "dropout": float(dropout),
    }
    if len(kwargs["strides"]) != len(kwargs["channels"]) - 1:
        raise ValueError(
            f"segmenter: expected {len(channels) - 1} strides for {len(channels)} channel levels, got {strides}"
        )
    net = UNet(spatial_dims=3, in_channels=1, out_channels=NUM_CLASSES, norm="INSTANCE", **kwargs)
    net.init_kwargs = kwargs
    return net


def encoder_blocks(network: nn.Module) -> list[nn.Module]:
    """The encoder blocks of a MONAI ``UNet`` (each downsampling block, then the bottom block), top to bottom."""
    from monai.networks.layers import SkipConnection

    blocks, level = [], network.model
    while isinstance(level, nn.Sequential):
        blocks.append(level[0])
        if len(level) < 2 or not isinstance(level[1], SkipConnection):
            break
        level = level[1].submodule
    else:
        blocks.append(level)
    return blocks


def downsampling(network: nn.Module) -> tuple[int, int, int]:
    """Total (D, H, W) downsampling factor of the segmenter (inputs are padded to a multiple of it)."""
    factor = np.ones(3, dtype=int)
    for st in getattr(network, "init_kwargs", {}).get("strides", []):
        factor *= np.asarray(st, dtype=int)
    return tuple(int(f) for f in factor)  # type: ignore[return-value]


def load_segmenter(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the trained segmenter from ``models/segmenter.pt``.

    Args:
        path: checkpoint written by ``configs/train_segmenter.yaml``.
        device: device of the network.

    Returns:
        (network in eval mode without gradients, checkpoint information without the weights).
    """
    if not path or not os.path.isfile(path):
        raise MissingInputError(
            f"segmenter weights {path} not found (--segmenter_path); they are produced by: {SEGMENTER_STAGE}"
        )
    ckpt = torch.load(path, map_location=device, weights_only=False)
    if "architecture" not in ckpt or "network" not in ckpt:
        raise DataError(
            f"{path}: not a segmenter checkpoint (expected 'network' and 'architecture'; written by {SEGMENTER_STAGE})"
        )
    net = build_segmenter(**ckpt["architecture"])
    net.load_state_dict(ckpt["network"])
    info = {k: v for k, v in ckpt.items() if k not in ("network", "optimizer", "lr_scheduler", "trainer", "rng")}
    return net.to(device).eval().requires_grad_(False), info


def segmentation_transforms(spatial_size: Sequence[int], augment: bool) -> Compose:
    """Image + label pipeline of the segmenter (the same intensity scaling as the rest of the bundle).

    Augmentation (training only) varies contrast, noise, blur and in-plane rotation, so the
    network trained on one domain (public) also measures images of another contrast, and the
    blurrier synthetic ones.

    Args:
        spatial_size: (D, H, W) after centre pad/crop.
        augment: add the random transforms.

    Returns:
        a MONAI ``Compose``.
    """
    keys = ["image", "label"]
    base = [
        LoadImaged(keys=keys, reader="NibabelReader", ensure_channel_first=True, image_only=True),
        Transposed(keys=keys, indices=(0, 3, 1, 2)),
        ScaleIntensityRangePercentilesd(keys="image", lower=0.0, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
        ResizeWithPadOrCropd(keys=keys, spatial_size=tuple(spatial_size)),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
        EnsureTyped(keys="label", dtype=torch.long, track_meta=False),
    ]
    if not augment:
        return Compose(base)
    random = [
        RandRotated(keys=keys, range_x=0.35, prob=0.5, mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandAdjustContrastd(keys="image", gamma=(0.6, 1.6), prob=0.5),
        RandScaleIntensityd(keys="image", factors=0.2, prob=0.5),
        RandGaussianSmoothd(keys="image", sigma_x=(0.0, 0.3), sigma_y=(0.5, 1.5), sigma_z=(0.5, 1.5), prob=0.4),
        RandGaussianNoised(keys="image", std=0.05, prob=0.5),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
    ]
    return Compose(base + random)


def segmentation_dataset(
    datalist: str, split: str, spatial_size: Sequence[int], augment: bool = False
) -> SerialCacheDataset:
    """Image + label dataset of one split (deterministic part cached).

    Args:
        datalist: datalist JSON whose entries have ``image`` and ``label``.
        split: split key.
        spatial_size: (D, H, W).
        augment: random augmentation (training).

    Returns:
        a MONAI ``CacheDataset`` (filled in the calling thread, ``scripts.data.SerialCacheDataset``).
    """
    import json

    from scripts.data import load_datalist

    items = load_datalist(datalist, split)
    with open(datalist) as f:
        entries = json.load(f)[split]
    base = os.path.dirname(os.path.abspath(datalist))
    data = []
    for i, (item, entry) in enumerate(zip(items, entries)):
        label = entry.get("label")
        if not isinstance(label, str):
            raise DataError(f"{datalist}, {split}[{i}]: field 'label' missing (the segmenter trains on label maps)")
        label = label if os.path.isabs(label) else os.path.join(base, label)
        if not os.path.isfile(label):
            raise DataError(f"{datalist}, {split}[{i}]: field 'label': file {label} does not exist")
        data.append({"image": item["image"], "label": label, "id": item["id"]})
    return SerialCacheDataset(data, segmentation_transforms(spatial_size, augment), cache_rate=1.0, progress=False)


def pad_to_multiple(x: torch.Tensor, multiple: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial dims of (B, C, D, H, W) up to multiples of (D, H, W) factors; returns the original sizes."""
    sizes = tuple(x.shape[2:])
    pads = []
    for s, m in reversed(list(zip(sizes, multiple))):
        pads += [0, (-s) % int(m)]
    return nn.functional.pad(x, pads), sizes


def keep_largest_components(label: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of every foreground class of a label map (others -> 0)."""
    from scipy import ndimage

    out = np.zeros_like(label)
    for c in CLASS_NAMES:
        comps, n = ndimage.label(label == c, structure=np.ones((3, 3, 3)))
        if n:
            sizes = np.bincount(comps.ravel())[1:]
            out[comps == 1 + int(np.argmax(sizes))] = c
    return out


@torch.no_grad()
def segment(
    network: nn.Module,
    images: np.ndarray,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
    largest_component: bool = True,
) -> np.ndarray:
    """Label maps of (N, D, H, W) volumes in [0, 1].

    Args:
        network: the segmenter.
        images: network-layout volumes.
        device: device.
        batch_size: volumes per forward pass.
        largest_component: keep the largest connected component of each class, which removes
            spurious islands (MONAI's ``KeepLargestConnectedComponent`` needs scikit-image on the
            CPU, which the bundle does not install; scipy does the same here).

    Returns:
        (N, D, H, W) uint8 label maps.
    """
    multiple = downsampling(network)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.as_tensor(images[start : start + batch_size], dtype=torch.float32)[:, None].to(device)
        x, sizes = pad_to_multiple(x, multiple)
        logits = network(x)[(slice(None), slice(None), *(slice(0, s) for s in sizes))]
        labels = logits.argmax(1).cpu()
        if largest_component:
            labels = torch.stack([torch.from_numpy(keep_largest_components(lab.numpy())) for lab in labels])
        out.append(labels.numpy().astype(np.uint8))
    return np.concatenate(out)


def lv_enclosure(label: np.ndarray) -> float:
    """Fraction of the LV blood pool's in-plane border that is myocardium (0 without LV).

    A heart's LV cavity is ringed by myocardium (about 1 on mid-ventricular slices); a blob
    that a segmenter finds in a texture is not. Computed over all slices of a (D, H, W) map.
    """
    from scipy import ndimage

    lv = label == LABELS["lv"]
    if not lv.any():
        return 0.0
    ring = ndimage.binary_dilation(lv, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool)) & ~lv
    return float(np.mean(label[ring] == LABELS["myo"])) if ring.any() else 0.0


def measure(labels: np.ndarray, spacing: np.ndarray) -> list[dict[str, float]]:
    """``scripts.phantom.measure_attributes`` of network-layout label maps, plus ``LV_ENCLOSED``.

    Args:
        labels: (N, D, H, W) label maps.
        spacing: (N, 3) voxel sizes (sx, sy, sz) of the (X, Y, slice) axes.

    Returns:
        one dict per volume: LV_VOLUME, RV_VOLUME, MYO_VOLUME (ml), MYO_THICKNESS (mm), DEPTH and
        LV_ENCLOSED (:func:`lv_enclosure`).
    """
    return [
        {**measure_attributes(np.transpose(lab, (1, 2, 0)), sp), "LV_ENCLOSED": lv_enclosure(lab)}
        for lab, sp in zip(labels, spacing)
    ]


def accuracy(predicted: np.ndarray, truth: np.ndarray, spacing: np.ndarray) -> dict[str, Any]:
    """The segmenter's accuracy against true label maps: Dice per class (MONAI ``DiceMetric``) and volume error.

    Args:
        predicted: (N, D, H, W) predicted labels.
        truth: (N, D, H, W) true labels.
        spacing: (N, 3) voxel sizes.

    Returns:
        ``{"n", "dice": {LV, MYO, RV, mean}, "volume_mae_ml": {...}, "volume_rel_error": {...}}``.
    """
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    pred = one_hot(torch.as_tensor(predicted, dtype=torch.long)[:, None], NUM_CLASSES)
    true = one_hot(torch.as_tensor(truth, dtype=torch.long)[:, None], NUM_CLASSES)
    metric(pred, true)
    dice = metric.aggregate().cpu().numpy()
    measured, reference = measure(predicted, spacing), measure(truth, spacing)
    keys = {"LV": "LV_VOLUME", "MYO": "MYO_VOLUME", "RV": "RV_VOLUME"}
    mae, rel = {}, {}
    for name, key in keys.items():
        m = np.array([x[key] for x in measured])
        r = np.array([x[key] for x in reference])
        mae[name] = float(np.mean(np.abs(m - r)))
        rel[name] = float(np.mean(np.abs(m - r) / np.maximum(r, 1e-6)))
    names = [CLASS_NAMES[c] for c in sorted(CLASS_NAMES)]
    out = {name: float(d) for name, d in zip(names, dice)}
    out["mean"] = float(np.nanmean(dice))
    lv_m, lv_r = np.array([x["LV_VOLUME"] for x in measured]), np.array([x["LV_VOLUME"] for x in reference])
    lv_r_value = (
        float(np.corrcoef(lv_m, lv_r)[0, 1]) if len(lv_m) >= 3 and np.ptp(lv_m) > 0 and np.ptp(lv_r) > 0 else None
    )
    return {
        "n": len(predicted),
        "dice": out,
        "volume_mae_ml": mae,
        "volume_rel_error": rel,
        "lv_volume_pearson_r": lv_r_value,
    }


def checkpoint_info(spatial_size: Sequence[int], datalist: str, network_def: nn.Module) -> Mapping[str, Any]:
    """What the segmenter checkpoint stores beside the weights (architecture, size, training data)."""
    return {"architecture": dict(network_def.init_kwargs), "spatial_size": list(spatial_size), "trained_on": datalist}
