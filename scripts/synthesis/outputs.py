"""The files a synthesis run writes: NIfTI volumes, JSON sidecars, the manifest and the preview.

All are written to a temp file and renamed. One NIfTI per sample (float32, [0, 1], array layout
(X, Y, slices) like the input cohorts, affine with the configured spacing), a JSON sidecar per
sample (attributes, sampler, seed, model and privacy provenance), a run manifest ``manifest.csv``
and a ``preview.png`` montage of the first samples.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.errors import ConfigError, OutputExistsError, check_options
from scripts.files import remove_stale_temp, write_nifti, write_text_atomic
from scripts.synthesis.generator import Synthesizer
from scripts.synthesis.requests import Request, plan_samples
from scripts.visualize import save_montage
from tqdm import tqdm

logger = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
PREVIEW = "preview.png"
CARD_FILES = ("cohort_card.json", "cohort_card.md")  # scripts/attribute_model/card.py writes them after a run
SAMPLE_PATTERN = re.compile(r"^row\d+_sample\d+\.(nii\.gz|json)$")


def nifti_affine(shape_xyz: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """A 4x4 affine with voxel size ``spacing`` (mm) and the volume centred on the origin."""
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise ConfigError(
            f"config field 'spacing': expected 3 positive voxel sizes in mm (X, Y, slice), got {spacing!r}"
        )
    affine = np.diag([*(float(s) for s in spacing), 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * float(s) for n, s in zip(shape_xyz, spacing)]
    return affine


def save_nifti(volume: np.ndarray, path: str, spacing: Sequence[float]) -> np.ndarray:
    """Save a (D, H, W) = (slices, X, Y) volume as a float32 NIfTI with array layout (X, Y, slices).

    Written with :func:`scripts.files.write_nifti`, the bundle's one NIfTI writer (atomic,
    byte-reproducible, qform/sform code 1, units mm).

    Args:
        volume: network-layout volume.
        path: ``.nii.gz`` path.
        spacing: (X, Y, slice) voxel size in mm.

    Returns:
        the affine written.
    """
    data = np.ascontiguousarray(np.transpose(np.asarray(volume, dtype=np.float32), (1, 2, 0)))
    affine = nifti_affine(data.shape, spacing)
    write_nifti(path, data, affine, "synthetic (cardiac DP-LDM bundle)")
    return affine


def previous_run_files(output_dir: str) -> list[str]:
    """Files of an earlier synthesis run in ``output_dir`` (manifest, preview, samples, sidecars)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if n in (MANIFEST, PREVIEW, *CARD_FILES) or SAMPLE_PATTERN.match(n))


def check_output_dir(output_dir: str, overwrite: bool = False) -> list[str]:
    """Refuse an ``output_dir`` that holds a run (unless ``overwrite``) or is not a directory.

    Returns:
        the files of the earlier run (to be replaced when ``overwrite``).
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError(f"--output_dir {output_dir} exists and is not a directory; expected a folder path")
    old = previous_run_files(output_dir)
    if old and not overwrite:
        raise OutputExistsError(
            f"--output_dir {output_dir} already holds a synthesis run ({len(old)} files, e.g. {old[0]}); "
            "choose another --output_dir or pass --overwrite True to replace that run"
        )
    return old


def prepare_output_dir(output_dir: str, overwrite: bool = False) -> str:
    """Create ``output_dir`` after :func:`check_output_dir`; with ``overwrite`` remove the earlier run's files.

    Only the files a run writes are removed (and the temp files an interrupted run left,
    ``.<name>.<random>.part``); anything else in the folder is left alone.

    Returns:
        the output directory.
    """
    for name in check_output_dir(output_dir, overwrite):
        os.remove(os.path.join(output_dir, name))
    for stale in remove_stale_temp(output_dir):
        logger.info(f"removed {stale}, the temp file of an interrupted write")
    os.makedirs(output_dir, exist_ok=True)
    return output_dir


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:g}"


def write_manifest(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Write the run manifest atomically: one row per sample."""
    columns = ["file", "sidecar", "row", "sample", "seed", *ATTRIBUTE_NAMES, "clipped", "source"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < 1:
        raise ConfigError(f"option --batch_size: expected an integer >= 1, got {size!r}")
    return [items[i : i + int(size)] for i in range(0, len(items), int(size))]


def run_inference(
    requests: Sequence[Request],
    synthesizer: Synthesizer,
    output_dir: str,
    provenance: Mapping[str, Any],
    *,
    spacing: Sequence[float] = (1.8, 1.8, 10.0),
    batch_size: int = 4,
    seed: int = 0,
    preview_count: int = 4,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate every requested sample and write images, sidecars, the manifest and the preview.

    Args:
        requests: from :func:`read_requests`.
        synthesizer: the sampler.
        output_dir: output folder (see :func:`prepare_output_dir`).
        provenance: from :func:`make_provenance` (copied into every sidecar).
        spacing: (X, Y, slice) voxel size in mm of the written NIfTI files.
        batch_size: samples generated together.
        seed: run seed (samples of rows without a ``seed``).
        preview_count: samples shown in ``preview.png`` (0 = no preview).
        progress: tqdm progress bar over the samples.
        overwrite: replace a run already in ``output_dir``.

    Returns:
        a summary: output_dir, samples, manifest, preview, unet_evaluations_per_volume.
    """
    check_options(seed=seed, batch_size=batch_size, preview_count=preview_count)
    samples = plan_samples(requests, seed)
    nifti_affine((1, 1, 1), spacing)  # validate before sampling
    prepare_output_dir(output_dir, overwrite)
    logger.info(
        f"{len(samples)} sample(s) from {len(requests)} request(s): {synthesizer.sampler} {synthesizer.steps} steps, "
        f"guidance {synthesizer.guidance_scale or 'off'}, batch {batch_size}, device {synthesizer.device}"
    )
    if provenance.get("privacy_warning"):
        logger.warning(provenance["privacy_warning"])
    elif provenance.get("privacy_note"):
        logger.info(provenance["privacy_note"])
    manifest, preview = [], []
    evaluations = 0
    bar = tqdm(total=len(samples), unit="volume", desc="synthesis", disable=not progress)
    for batch in _batches(samples, batch_size):
        before = synthesizer.evaluations
        volumes = synthesizer(np.stack([s.request.values for s in batch]), [s.seed for s in batch])
        per_volume = (synthesizer.evaluations - before) / len(batch)
        evaluations += synthesizer.evaluations - before
        for spec, volume in zip(batch, volumes):
            image, sidecar = f"{spec.stem}.nii.gz", f"{spec.stem}.json"
            affine = save_nifti(volume, os.path.join(output_dir, image), spacing)
            attrs = spec.request.attributes()
            meta = {
                "image": image,
                "row": spec.request.row,
                "sample": spec.index,
                "seed": spec.seed,
                "attributes": attrs,
                "missing": [n for n, v in attrs.items() if v is None],
                "clipped": dict(spec.request.clipped),
                "attributes_source": spec.request.source,
                "shape": list(np.transpose(volume, (1, 2, 0)).shape),
                "layout": "array axes (X, Y, slices); the networks see (slices, X, Y)",
                "spacing_mm": [float(s) for s in spacing],
                "affine": np.round(affine, 6).tolist(),
                "intensity_range": [0.0, 1.0],
                "unet_evaluations": int(per_volume) if float(per_volume).is_integer() else per_volume,
                **provenance,
                "synthetic": True,
            }
            write_text_atomic(os.path.join(output_dir, sidecar), json.dumps(meta, indent=2))
            row = {"file": image, "sidecar": sidecar, "row": spec.request.row, "sample": spec.index, "seed": spec.seed}
            row.update({n: _fmt(v) for n, v in zip(ATTRIBUTE_NAMES, spec.request.values)})
            row["clipped"] = ";".join(f"{n}={v:g}" for n, v in spec.request.clipped.items())
            row["source"] = spec.request.source or ""
            manifest.append(row)
            if len(preview) < preview_count:
                preview.append((f"row {spec.request.row} #{spec.index} seed {spec.seed}", volume))
        bar.update(len(batch))
    bar.close()
    manifest_path = os.path.join(output_dir, MANIFEST)
    write_manifest(manifest_path, manifest)
    preview_path = save_montage(preview, os.path.join(output_dir, PREVIEW)) if preview else None
    summary = {
        "output_dir": output_dir,
        "samples": len(samples),
        "manifest": manifest_path,
        "preview": preview_path,
        "unet_evaluations_per_volume": evaluations / max(len(samples), 1),
    }
    logger.info(f"wrote {len(samples)} volume(s), {manifest_path} and {preview_path}")
    return summary
