"""Volume sets for the evaluation: synthetic runs (manifest + sidecars) and real cohorts (datalist).

Every volume goes through the same preprocessing as training (``scripts.data``): array
layout (X, Y, slices) -> network layout (D, H, W) = (slices, X, Y), per-image intensity
scaling (0th..99.5th percentile to [0, 1], clipped) and centre pad/crop to one spatial size,
so real and synthetic volumes are compared on equal terms. Label maps (real cohorts) are
padded/cropped the same way. Voxel spacing comes from the NIfTI header (real) or from the
sidecar, checked against the header (synthetic).
"""

from __future__ import annotations

import csv
import json
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import ResizeWithPadOrCrop, ScaleIntensityRangePercentiles
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.data import load_datalist
from scripts.errors import DataError
from scripts.files import refuse_duplicate_columns

MANIFEST = "manifest.csv"
SPACING_RTOL = 1e-3  # sidecar spacing vs NIfTI header
UPPER_PERCENTILE = 99.5


@dataclass
class VolumeSet:
    """A set of volumes in network layout with what the evaluation needs to know about them.

    Attributes:
        name: what the set is (for messages and the report).
        images: (N, D, H, W) float32, per-image scaled to [0, 1].
        spacing: (N, 3) voxel size (sx, sy, sz) in mm of the (X, Y, slice) axes.
        attributes: (N, 14) requested (synthetic) or true (real) attributes, NaN = missing.
        ids: one id per volume (file stem or datalist id).
        subjects: subject (real) or "" (synthetic).
        seeds: sampling seed (synthetic) or None (real).
        files: image paths.
        labels: (N, D, H, W) uint8 label maps, when the cohort has them.
    """

    name: str
    images: np.ndarray
    spacing: np.ndarray
    attributes: np.ndarray
    ids: list[str]
    subjects: list[str] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def spatial_size(self) -> tuple[int, int, int]:
        """(D, H, W) of the volumes."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, index: Sequence[int], name: str | None = None) -> VolumeSet:
        """The volumes at ``index`` (a new set)."""
        idx = list(index)
        return VolumeSet(
            name=name or self.name,
            images=self.images[idx],
            spacing=self.spacing[idx],
            attributes=self.attributes[idx],
            ids=[self.ids[i] for i in idx],
            subjects=[self.subjects[i] for i in idx] if self.subjects else [],
            seeds=[self.seeds[i] for i in idx] if self.seeds else [],
            files=[self.files[i] for i in idx] if self.files else [],
            labels=None if self.labels is None else self.labels[idx],
        )


def require(count: int, needed: int, what: str) -> None:
    """Raise :class:`DataError` when a statistic has fewer than ``needed`` samples.

    Args:
        count: samples available.
        needed: minimum for the statistic.
        what: the statistic and the set, for the message.
    """
    if count < needed:
        raise DataError(f"{what}: needs at least {needed} samples, got {count}")


def to_network_layout(array: np.ndarray, spatial_size: Sequence[int] | None, is_label: bool = False) -> np.ndarray:
    """(X, Y, slices) array -> (D, H, W), per-image scaled (images) and centre padded/cropped.

    Args:
        array: the NIfTI data array.
        spatial_size: output (D, H, W), or None to keep the size.
        is_label: a label map (no intensity scaling, kept integer).

    Returns:
        float32 (images) or uint8 (labels) array.
    """
    vol = np.transpose(np.asarray(array), (2, 0, 1))[None]
    if not is_label:
        vol = ScaleIntensityRangePercentiles(lower=0.0, upper=UPPER_PERCENTILE, b_min=0.0, b_max=1.0, clip=True)(
            torch.as_tensor(vol.astype(np.float32))
        )
    if spatial_size is not None:
        vol = ResizeWithPadOrCrop(tuple(int(s) for s in spatial_size))(torch.as_tensor(vol))
    vol = np.asarray(torch.as_tensor(vol)[0])
    return vol.astype(np.uint8) if is_label else vol.astype(np.float32)


def _load_nifti(path: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(data, spacing) of a 3D NIfTI file; errors name the file."""
    if not os.path.isfile(path):
        raise DataError(f"{where}: file {path} does not exist")
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except (OSError, ValueError, EOFError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        raise DataError(f"{path}: not a readable NIfTI file ({e})") from None
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume (X, Y, slices), got shape {data.shape}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: volume contains NaN or inf voxels")
    return data, np.asarray(img.header.get_zooms()[:3], dtype=np.float64)


def _manifest_rows(directory: str) -> tuple[str, list[dict[str, str]]]:
    """The path and the rows of the synthetic folder's manifest.csv, or DataError."""
    if directory is None or str(directory).strip() in ("", "None"):
        raise DataError("no synthetic set given: pass --synthetic_dir DIR (the --output_dir of `run inference`)")
    if not os.path.isdir(directory):
        raise DataError(f"--synthetic_dir {directory}: folder not found (expected the --output_dir of `run inference`)")
    manifest = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest):
        raise DataError(
            f"--synthetic_dir {directory}: no {MANIFEST} (expected the --output_dir of `run inference`: "
            "NIfTI files, JSON sidecars and manifest.csv)"
        )
    with open(manifest, newline="") as f:
        reader = csv.DictReader(f)
        refuse_duplicate_columns(manifest, reader.fieldnames or [])
        missing_cols = [c for c in ("file", "sidecar") if c not in (reader.fieldnames or [])]
        if missing_cols:
            raise DataError(f"{manifest}: missing column(s) {missing_cols} (header is {reader.fieldnames})")
        rows = list(reader)
    if not rows:
        raise DataError(f"{manifest}: no samples listed (the synthesis run wrote no volumes)")
    return manifest, rows


def _read_sidecar(sidecar: str) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """A sample's JSON sidecar: (content, requested attribute vector with NaN = missing, spacing in mm)."""
    try:
        with open(sidecar) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{sidecar}: not valid JSON ({e})") from None
    for key in ("attributes", "spacing_mm"):
        if key not in meta:
            raise DataError(f"{sidecar}: missing field '{key}' (written by `run inference`)")
    requested = meta["attributes"]
    if not isinstance(requested, dict):
        raise DataError(f"{sidecar}: field 'attributes' must be a mapping name -> value or null")
    values = np.array(
        [math.nan if requested.get(n) is None else float(requested[n]) for n in ATTRIBUTE_NAMES], dtype=np.float64
    )
    spacing = np.asarray(meta["spacing_mm"], dtype=np.float64)
    if spacing.shape != (3,) or not (spacing > 0).all():
        raise DataError(f"{sidecar}: field 'spacing_mm' must be 3 positive numbers (X, Y, slice) in mm")
    return meta, values, spacing


def load_synthetic(directory: str, spatial_size: Sequence[int] | None = None) -> VolumeSet:
    """Read a ``run inference`` output folder: ``manifest.csv``, one JSON sidecar and one NIfTI per sample.

    Requested attributes and spacing come from the sidecars; the spacing is checked against the
    NIfTI header and every volume must have the same shape.

    Args:
        directory: the folder given as ``--output_dir`` to ``run inference``.
        spatial_size: (D, H, W) to pad/crop to; None keeps the volumes' own size.

    Returns:
        the :class:`VolumeSet` (``seeds`` from the sidecars).
    """
    manifest, rows = _manifest_rows(directory)
    images, spacings, attributes, ids, seeds, files = [], [], [], [], [], []
    shape0 = None
    for i, row in enumerate(rows):
        where = f"{manifest}, row {i}"
        sidecar = os.path.join(directory, row["sidecar"] or "")
        if not row["sidecar"] or not os.path.isfile(sidecar):
            raise DataError(f"{where}: sidecar {sidecar} not found (every sample needs its JSON sidecar)")
        meta, values, spacing = _read_sidecar(sidecar)
        path = os.path.join(directory, row["file"] or "")
        data, header_spacing = _load_nifti(path, where)
        if not np.allclose(header_spacing, spacing, rtol=SPACING_RTOL):
            raise DataError(
                f"{path}: spacing mismatch: the NIfTI header says {header_spacing.round(4).tolist()} mm, the sidecar "
                f"{sidecar} says {spacing.tolist()} mm"
            )
        if shape0 is None:
            shape0 = data.shape
        elif data.shape != shape0:
            raise DataError(
                f"{path}: shape mismatch: {data.shape} but the first sample of {directory} has {shape0} "
                "(one synthesis run has one shape)"
            )
        if "shape" in meta and list(meta["shape"]) != list(data.shape):
            raise DataError(f"{path}: shape mismatch: NIfTI {list(data.shape)}, sidecar {sidecar} says {meta['shape']}")
        images.append(to_network_layout(data, spatial_size))
        spacings.append(spacing)
        attributes.append(values)
        ids.append(os.path.basename(path).removesuffix(".nii.gz"))
        seeds.append(None if meta.get("seed") is None else int(meta["seed"]))
        files.append(path)
    return VolumeSet(
        name=f"synthetic ({directory})",
        images=np.stack(images),
        spacing=np.stack(spacings),
        attributes=np.stack(attributes),
        ids=ids,
        subjects=[""] * len(ids),
        seeds=seeds,
        files=files,
    )


def load_real(
    datalist: str,
    splits: str | Sequence[str],
    spatial_size: Sequence[int],
    with_labels: bool | None = False,
    name: str = "",
) -> VolumeSet:
    """Read one or more splits of a cohort in the datalist format (``scripts.data.load_datalist``).

    Args:
        datalist: datalist JSON.
        splits: split key(s), e.g. ``"test"`` or ``["validation", "test"]``.
        spatial_size: (D, H, W) to pad/crop to.
        with_labels: also read each entry's ``label`` map (an error if an entry has none); None: read
            them when the first entry has one.
        name: name of the set in messages.

    Returns:
        the :class:`VolumeSet`.
    """
    splits = [splits] if isinstance(splits, str) else list(splits)
    loaded = {split: load_datalist(datalist, split) for split in splits}  # checks the file, the splits, the images
    with open(datalist) as f:
        content = json.load(f)
    base = os.path.dirname(os.path.abspath(datalist))
    images, spacings, attributes, ids, subjects, files, labels = [], [], [], [], [], [], []
    for split in splits:
        items = loaded[split]
        entries = content[split]
        for i, (item, entry) in enumerate(zip(items, entries)):
            data, spacing = _load_nifti(item["image"], f"{datalist}, {split}[{i}]")
            images.append(to_network_layout(data, spatial_size))
            if with_labels is None:  # optional: decided by the first entry
                with_labels = isinstance(entry.get("label"), str)
            if with_labels:
                if not isinstance(entry.get("label"), str):
                    raise DataError(f"{datalist}, {split}[{i}]: field 'label' missing (expected a label-map path)")
                path = entry["label"] if os.path.isabs(entry["label"]) else os.path.join(base, entry["label"])
                label, label_spacing = _load_nifti(path, f"{datalist}, {split}[{i}], field 'label'")
                if label.shape != data.shape or not np.allclose(label_spacing, spacing, rtol=SPACING_RTOL):
                    raise DataError(
                        f"{path}: shape/spacing mismatch with its image {item['image']}: {label.shape} "
                        f"{label_spacing.round(4).tolist()} vs {data.shape} {spacing.round(4).tolist()}"
                    )
                labels.append(to_network_layout(np.rint(label).astype(np.uint8), spatial_size, is_label=True))
            spacings.append(spacing)
            attributes.append(np.asarray(item["attributes"], dtype=np.float64))
            ids.append(item["id"])
            subjects.append(item["subject"])
            files.append(item["image"])
    return VolumeSet(
        name=name or f"{datalist} [{'+'.join(splits)}]",
        images=np.stack(images),
        spacing=np.stack(spacings),
        attributes=np.stack(attributes),
        ids=ids,
        subjects=subjects,
        seeds=[None] * len(ids),
        files=files,
        labels=np.stack(labels) if with_labels and labels else None,
    )


def check_spacing_compatible(synthetic: VolumeSet, real: VolumeSet, tolerance: float = 0.25) -> None:
    """Refuse to compare sets whose median voxel sizes differ by more than ``tolerance`` (relative).

    The networks see voxels, not millimetres: a synthetic set written at another spacing than
    the real cohort would be compared at the wrong scale.
    """
    a, b = np.median(synthetic.spacing, axis=0), np.median(real.spacing, axis=0)
    rel = np.abs(a - b) / b
    if (rel > tolerance).any():
        raise DataError(
            f"spacing mismatch: {synthetic.name} has median voxel size {a.round(3).tolist()} mm, {real.name} "
            f"{b.round(3).tolist()} mm (more than {tolerance:.0%} apart); resample one of them or write the synthetic "
            "volumes with the cohort's spacing (`run inference --spacing`)"
        )
