"""Autoencoder fidelity where it matters: encode + decode held-out test volumes and measure them.

Every synthetic volume leaves the pipeline through the decoder, so no sample can look better
than the reconstructions of real volumes. This section encodes and decodes the test split of a
datalist (the PUBLIC one by default; the private test split only when the data owner asks:
that is an evaluation on private records that the epsilon does not cover), writes every
reconstruction, and measures it against its original with instruments that were not trained
on it: PSNR and SSIM (MONAI metrics), the blood-pool / myocardium contrast in the label maps'
regions, the classical LV detector (``scripts.evaluation.lv_detector``) and the segmenter's
own accuracy on the reconstructions.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from monai.transforms import ResizeWithPadOrCrop
from scripts.errors import ConfigError
from scripts.evaluation import plots
from scripts.evaluation.lv_detector import detect_many
from scripts.evaluation.volumes import VolumeSet
from scripts.files import write_nifti, write_text_atomic
from scripts.phantom import LABELS

MANIFEST = "manifest.csv"
SPLITS = ("public", "private")
PRIVATE_NOTE = "reconstructions of private test records: an evaluation on private data, not covered by epsilon"


@dataclass(frozen=True, kw_only=True)
class ReconstructionSettings:
    """The evaluation stage's ``reconstruction`` section.

    Attributes:
        enabled: run the section.
        split: ``public`` (the public cohort's test split, default) or ``private`` (the private
            cohort's test split: the data owner's choice, not covered by epsilon).
        autoencoder_path: the autoencoder to measure; None: the one the diffusion model
            (``model_path``) was trained with.
        output_dir: where the NIfTI files and ``manifest.csv`` go; None: ``reconstructions/`` in the
            stage's output folder (``eval/``).
        ssim_kernel: SSIM window (2D, in-plane, per slice; Gaussian, sigma 1.5: the standard SSIM).
    """

    enabled: bool = True
    split: str = "public"
    autoencoder_path: str | None = None
    output_dir: str | None = None
    ssim_kernel: int = 11

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(
                f"config field 'reconstruction#split': expected one of {list(SPLITS)}, got {self.split!r}"
            )
        if (
            isinstance(self.ssim_kernel, bool)
            or not isinstance(self.ssim_kernel, int)
            or self.ssim_kernel < 3
            or self.ssim_kernel % 2 == 0
        ):
            raise ConfigError(
                f"config field 'reconstruction#ssim_kernel': expected an odd integer >= 3, got {self.ssim_kernel!r}"
            )


@torch.no_grad()
def reconstruct(autoencoder: torch.nn.Module, images: np.ndarray, device: str, batch_size: int = 4) -> np.ndarray:
    """Encode (posterior mean) and decode (N, D, H, W) volumes; clipped to [0, 1] like synthesis output."""
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.as_tensor(images[start : start + batch_size], dtype=torch.float32)[:, None].to(device)
        z = autoencoder.encode_stage_2_inputs(x)
        out.append(autoencoder.decode_stage_2_outputs(z)[:, 0].clamp(0.0, 1.0).float().cpu().numpy())
    return np.concatenate(out)


def psnr_ssim(originals: np.ndarray, reconstructions: np.ndarray, kernel: int = 11) -> tuple[np.ndarray, np.ndarray]:
    """Per-volume PSNR (dB, over all voxels) and SSIM (2D, mean over the slices with any signal).

    Slices that are constant in the original (the zero padding added to reach the network size)
    are left out of the SSIM, where they would score 1 whatever the decoder does.
    """
    psnr = PSNRMetric(max_val=1.0, reduction="none")
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=kernel, reduction="none")
    p, s = [], []
    for orig, rec in zip(originals, reconstructions):
        a, b = torch.as_tensor(orig)[None, None], torch.as_tensor(rec)[None, None]
        p.append(float(psnr(b, a).item()))
        keep = [z for z in range(orig.shape[0]) if np.ptp(orig[z]) > 0]
        a2, b2 = torch.as_tensor(orig[keep])[:, None], torch.as_tensor(rec[keep])[:, None]
        s.append(float(ssim(b2, a2).mean().item()) if keep else float("nan"))
    return np.asarray(p), np.asarray(s)


def contrast(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Michelson contrast (blood - myo) / (blood + myo) of the mean intensities in the label map's regions."""
    out = []
    for img, lab in zip(images, labels):
        blood, myo = img[lab == LABELS["lv"]], img[lab == LABELS["myo"]]
        if not blood.size or not myo.size:
            out.append(np.nan)
            continue
        b, m = float(blood.mean()), float(myo.mean())
        out.append((b - m) / (b + m) if b + m > 0 else np.nan)
    return np.asarray(out)


def detector_summary(images: np.ndarray, spacing: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """The classical detector on a set: LV found rate, and its volume vs the label maps' LV volume."""
    found = detect_many(images, spacing)
    out: dict[str, Any] = {
        "n": len(found),
        "lv_found": int(sum(d.found for d in found)),
        "lv_found_rate": float(np.mean([d.found for d in found])) if found else None,
        "lv_volume_ml": [d.volume_ml if d.found else None for d in found],
    }
    if labels is not None:
        truth = np.array([(lab == LABELS["lv"]).sum() * np.prod(sp) / 1000.0 for lab, sp in zip(labels, spacing)])
        hit = np.array([d.found for d in found])
        measured = np.array([d.volume_ml for d in found])
        out["lv_volume_pearson_r"] = (
            float(np.corrcoef(measured[hit], truth[hit])[0, 1])
            if hit.sum() >= 3 and np.ptp(measured[hit]) > 0
            else None
        )
        out["lv_volume_mae_ml"] = float(np.mean(np.abs(measured[hit] - truth[hit]))) if hit.any() else None
    return out


def _median(values: Sequence[float]) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else None


def to_original_geometry(volume: np.ndarray, original_shape: Sequence[int]) -> np.ndarray:
    """(D, H, W) network-layout volume -> the original (X, Y, slices) array shape.

    Inverts the centre pad/crop of ``scripts.evaluation.volumes.to_network_layout`` exactly: the
    same MONAI transform is applied to a grid of the original voxel indices, which says where each
    network voxel came from (what the crop removed comes back as 0).
    """
    x, y, z = (int(s) for s in original_shape)
    size = volume.shape
    grid = np.stack(np.meshgrid(np.arange(1, z + 1), np.arange(1, x + 1), np.arange(1, y + 1), indexing="ij"))
    moved = np.asarray(ResizeWithPadOrCrop(size, mode="constant")(torch.as_tensor(grid, dtype=torch.int64)))
    out = np.zeros((z, x, y), dtype=np.float32)
    inside = moved[0] > 0
    out[moved[0][inside] - 1, moved[1][inside] - 1, moved[2][inside] - 1] = volume[inside]
    return np.transpose(out, (1, 2, 0))


def write_reconstructions(real: VolumeSet, reconstructions: np.ndarray, output_dir: str) -> str:
    """``<output_dir>/<id>.nii.gz`` per volume with its original's affine, then ``manifest.csv`` (its path)."""
    os.makedirs(output_dir, exist_ok=True)
    rows = []
    for rid, source, rec in zip(real.ids, real.files, reconstructions):
        original = nib.load(source)
        name = f"{rid}.nii.gz"
        write_nifti(
            os.path.join(output_dir, name),
            to_original_geometry(rec, original.shape[:3]),
            original.affine,
            "autoencoder reconstruction (cardiac DP-LDM bundle)",
        )
        rows.append({"id": rid, "image": source, "reconstruction": os.path.join(output_dir, name)})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["id", "image", "reconstruction"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = os.path.join(output_dir, MANIFEST)
    write_text_atomic(path, buffer.getvalue())  # last: a manifest lists only files already written
    return path


def evaluate_reconstruction(
    real: VolumeSet,
    autoencoder: torch.nn.Module,
    segment,
    settings: ReconstructionSettings,
    output_dir: str,
    device: str,
    batch_size: int = 4,
    figure: str | None = None,
) -> dict[str, Any]:
    """The ``reconstruction`` section of the report.

    Args:
        real: the test split to reconstruct (with label maps for the contrast and accuracy).
        autoencoder: the frozen autoencoder.
        segment: ``images -> segmenter accuracy dict`` (``scripts.evaluation.segmenter.accuracy``
            of the segmentation against ``real.labels``), or None without label maps.
        settings: the section's settings.
        output_dir: folder of the NIfTI files and the manifest.
        device: device.
        batch_size: volumes per forward pass.
        figure: PNG path of the first volumes above their reconstructions, or None for none.

    Returns:
        the section: medians, per-volume values, both instruments on originals and reconstructions.
    """
    rec = reconstruct(autoencoder, real.images, device, batch_size)
    manifest = write_reconstructions(real, rec, output_dir)
    psnr, ssim = psnr_ssim(real.images, rec, settings.ssim_kernel)
    out: dict[str, Any] = {
        "split": settings.split,
        "set": real.name,
        "n": len(real),
        "manifest": manifest,
        "psnr_db_median": _median(psnr),
        "ssim_median": _median(ssim),
        "method": "PSNR (MONAI PSNRMetric, max 1) over the volume; SSIM (MONAI SSIMMetric, 2D, window "
        f"{settings.ssim_kernel}) per slice with signal, averaged per volume; images scaled to [0, 1] per volume "
        "as for training; medians over the volumes",
        "per_volume": [{"id": i, "psnr_db": float(p), "ssim": float(s)} for i, p, s in zip(real.ids, psnr, ssim)],
        "classical_detector": {
            "originals": detector_summary(real.images, real.spacing, real.labels),
            "reconstructions": detector_summary(rec, real.spacing, real.labels),
        },
    }
    if real.labels is not None:
        c_orig, c_rec = contrast(real.images, real.labels), contrast(rec, real.labels)
        out["contrast"] = {
            "definition": "(blood - myo) / (blood + myo) of the mean intensities in the label map's LV blood pool "
            "and myocardium",
            "original_median": _median(c_orig),
            "reconstruction_median": _median(c_rec),
            "ratio_median": _median(c_rec / c_orig),
        }
        if segment is not None:
            out["segmenter"] = {"originals": segment(real.images), "reconstructions": segment(rec)}
    if figure:
        out["figure"] = plots.reconstructions(
            real.ids, real.images, [("reconstruction", rec, list(zip(psnr, ssim)))], figure
        )
    if settings.split == "private":
        out["note"] = PRIVATE_NOTE
    return out
