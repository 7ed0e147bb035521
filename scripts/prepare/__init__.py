"""Import a cardiac cine-MRI dataset (ACDC, M&Ms, M&Ms-2, ukbb_cardiac, a folder) into the bundle's cohort layout.

The output is what the stages read (the phantom's layout): ``images/<subject>_{ED,ES}.nii.gz``,
``labels/<subject>_{ED,ES}.nii.gz`` in the bundle's label codes (1 LV, 2 myocardium, 3 RV),
``attributes.csv``, ``subjects.csv``, ``datalist.json`` with subject-level splits, and
``prepare_report.json`` naming every included and excluded subject (with the reason).

Per subject (one record at a time; nothing is estimated across subjects):

1. read the ED and ES image and label volumes (``layouts``) and check them (shapes, affines,
   label values, an LV at ED, ESV <= EDV); a failed check excludes the subject with its reason;
2. map the dataset's label codes to the bundle's and turn the in-plane axes to the canonical
   orientation of the affine (``geometry.canonical_orientation``);
3. measure the 14 attributes at the **source** resolution (``scripts.cardiac``); AGE / SEX /
   BMI come from the dataset's metadata or ``--demographics`` and stay missing when absent;
4. resample in-plane to ``spacing`` (slices untouched) onto a ``size`` x ``size`` box centred
   on the ED LV blood pool (``centre="heart"``: on the whole ED heart), the same for ED and ES.

The cohort is written into a hidden folder beside ``out`` and moved into place when complete.

    python -m scripts.prepare --format acdc --source /data/ACDC/training --out data/public
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scripts.cardiac import LABELS, subject_attributes
from scripts.cohort import check_fractions, split_subjects
from scripts.errors import ConfigError, DataError
from scripts.files import nifti_gz_bytes, remove_stale_temp, temp_name, write_bytes_atomic
from scripts.prepare import geometry
from scripts.prepare.layouts import (
    FORMATS,
    LABEL_CODES,
    REASONS,
    DemographicColumns,
    Excluded,
    SourceSubject,
    Volume,
    read_demographics,
    subjects,
)
from scripts.prepare.report import summary_text, write_index

__all__ = ["FORMATS", "REASONS", "PrepareSpec", "parse_labels", "prepare_cohort", "summary_text"]

logger = logging.getLogger(__name__)


def parse_labels(text: str | Mapping[str, int] | None) -> dict[str, int] | None:
    """``'lv=3,myo=2,rv=1'`` (or a mapping) -> ``{'lv': 3, 'myo': 2, 'rv': 1}``; None stays None."""
    if text is None or isinstance(text, Mapping):
        mapping = dict(text) if text is not None else None
    else:
        try:
            mapping = {k.strip(): int(v) for k, v in (part.split("=") for part in str(text).split(","))}
        except ValueError:
            mapping = {}
    if mapping is None:
        return None
    if sorted(mapping) != ["lv", "myo", "rv"] or len(set(mapping.values())) != 3 or 0 in mapping.values():
        raise ConfigError(f"--labels must give three distinct non-zero codes as 'lv=N,myo=N,rv=N'; got {text!r}")
    return {k: int(v) for k, v in mapping.items()}


@dataclass
class PrepareSpec:
    """The settings of one import, checked when made (nothing is read or written).

    Args:
        format: dataset layout, one of :data:`FORMATS`.
        source: the dataset folder.
        out: the cohort folder to write; must be empty or absent unless ``overwrite``.
        spacing: in-plane spacing (mm) to resample to; None keeps each record's own.
        size: in-plane size (voxels) of the box.
        centre: ``"lv"``: the box is centred on the ED LV blood pool; ``"heart"``: on the ED
            heart (LV, myocardium and RV), which keeps more of the RV in a small box.
        demographics: optional CSV of AGE / SEX / BMI per subject (over the dataset's metadata).
        seed: seed of the subject-level split.
        split_fractions: (training, validation, test) fractions of subjects.
        strict: any exclusion is an error (nothing is written).
        overwrite: replace a cohort already in ``out``.
        labels: label codes of the source (``folder``; default the dataset's convention).
        image_pattern / label_pattern: ``folder`` file names, with ``{subject}`` and ``{phase}``.
        columns: column names of the demographics CSV.
        num_workers: worker processes (1 = in this process); the output does not depend on it.
    """

    format: str
    source: str | os.PathLike
    out: str | os.PathLike
    spacing: float | None = 1.8
    size: int = 112
    centre: str = "lv"
    demographics: str | os.PathLike | None = None
    seed: int = 0
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15)
    strict: bool = False
    overwrite: bool = False
    labels: Any = None
    image_pattern: str = "images/{subject}_{phase}.nii.gz"
    label_pattern: str = "labels/{subject}_{phase}.nii.gz"
    columns: DemographicColumns = field(default_factory=DemographicColumns)
    num_workers: int = 1

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        self.spacing = _spacing(self.spacing)
        if not _is_count(self.size, 16):
            raise ConfigError(f"--size must be an integer >= 16 (in-plane voxels); got {self.size!r}")
        if self.centre not in ("lv", "heart"):
            raise ConfigError(f"--centre must be 'lv' or 'heart'; got {self.centre!r}")
        if not _is_count(self.num_workers, 1):
            raise ConfigError(f"--num_workers must be an integer >= 1; got {self.num_workers!r}")
        if not _is_count(self.seed, 0):
            raise ConfigError(f"--seed must be a non-negative integer; got {self.seed!r}")
        self.split_fractions = check_fractions(self.split_fractions)
        self.labels = parse_labels(self.labels) or LABEL_CODES[self.format]
        if isinstance(self.columns, Mapping):
            self.columns = DemographicColumns(**self.columns)
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out}: is a file (expected a folder)")
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise ConfigError(f"--out {out}: exists and is not empty; choose a new folder or pass --overwrite")
        if Path(self.source).resolve() == out.resolve():
            raise ConfigError(f"--out {out} must differ from --source")


def _is_count(value: Any, minimum: int) -> bool:
    """An integer (not a bool) >= ``minimum``."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= minimum


def _spacing(value: Any) -> float | None:
    """``--spacing``: mm > 0, or None for 'source' / 'none' / '' (keep each record's own)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("source", "none", "")):
        return None
    try:
        spacing = float(value)
    except (TypeError, ValueError):
        spacing = math.nan
    if not (math.isfinite(spacing) and spacing > 0):
        raise ConfigError(f"--spacing must be a number of mm > 0 or 'source'; got {value!r}")
    return spacing


# ------------------------------------------------------------------------------------ one subject


def _checked(volumes: Mapping[str, Volume], codes: Mapping[str, int]) -> None:
    """Raise :class:`Excluded` for a subject whose volumes do not fit together or break the label convention."""
    ed = volumes["ED"]
    for phase, v in volumes.items():
        if v.image.shape != v.label.shape:
            raise Excluded("shape_mismatch", f"{phase} image {v.image.shape} vs label {v.label.shape}")
        if not np.allclose(v.image_affine, v.label_affine, atol=1e-3):
            raise Excluded("affine_mismatch", f"{phase} image and label affines differ")
        if v.image.shape != ed.image.shape:
            raise Excluded("shape_mismatch", f"ED {ed.image.shape} vs {phase} {v.image.shape}")
        if not np.allclose(v.image_affine, ed.image_affine, atol=1e-3):
            raise Excluded("affine_mismatch", f"ED and {phase} affines differ")
        if not np.all(np.isfinite(v.image)):
            raise Excluded("unreadable_file", f"{phase} image holds NaN or inf voxels")
        label = v.label
        if not np.issubdtype(label.dtype, np.integer):
            if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
                raise Excluded("unknown_label_value", f"{phase} label holds non-integer values")
        values = set(np.unique(label).astype(np.int64).tolist())
        unknown = sorted(values - {0, *codes.values()})
        if unknown:
            raise Excluded("unknown_label_value", f"{phase} label holds {unknown}; expected 0 and {dict(codes)}")
        if values <= {0}:
            raise Excluded("empty_label", f"{phase} label holds no heart label")


def _relabel(label: np.ndarray, codes: Mapping[str, int]) -> np.ndarray:
    out = np.zeros(label.shape, dtype=np.uint8)
    for name in ("lv", "myo", "rv"):
        out[label == codes[name]] = LABELS[name]
    return out


def _prepare_subject(sub: SourceSubject, spec: PrepareSpec, demographics: Mapping[str, float]) -> dict[str, Any]:
    """Normalise one subject; returns its arrays, affines, attributes and geometry; raises :class:`Excluded`."""
    if sub.error is not None:
        raise sub.error
    volumes = sub.load()
    _checked(volumes, spec.labels)
    affine = volumes["ED"].image_affine
    ornt = geometry.canonical_orientation(affine)
    canon: dict[str, dict[str, np.ndarray]] = {}
    for phase, v in volumes.items():
        image, canon_affine = geometry.reorient(v.image, affine, ornt)
        label, _ = geometry.reorient(_relabel(v.label, spec.labels), affine, ornt)
        canon[phase] = {"image": image, "label": label}
    source_spacing = geometry.spacing_of(canon_affine)
    if not np.any(canon["ED"]["label"] == LABELS["lv"]):
        raise Excluded("no_lv_at_ed", "the ED label map has no LV blood pool")
    attrs = subject_attributes(
        canon["ED"]["label"], canon["ES"]["label"], source_spacing, demographics=demographics
    )  # at the source resolution
    for key in ("LV", "RV"):
        edv, esv = attrs["ED"][f"{key}EDV"], attrs["ED"][f"{key}ESV"]
        if esv > edv:
            raise Excluded("esv_above_edv", f"{key}ESV > {key}EDV (ED and ES swapped?)")  # no values: may be private

    ed = canon["ED"]["label"]
    centre = np.argwhere(ed == LABELS["lv"] if spec.centre == "lv" else ed > 0).mean(axis=0)  # one box for ED and ES
    out: dict[str, Any] = {}
    for phase in ("ED", "ES"):
        image, box_affine = geometry.lv_box(
            canon[phase]["image"], canon_affine, centre, spec.spacing, spec.size, label=False
        )
        label, _ = geometry.lv_box(canon[phase]["label"], canon_affine, centre, spec.spacing, spec.size, label=True)
        out[phase] = (image, label.astype(np.uint8), box_affine)
    # does the box reach beyond the source field of view (zero padding)?
    corners = (
        np.linalg.inv(canon_affine) @ box_affine @ np.array([[0, 0, 0, 1], [spec.size - 1, spec.size - 1, 0, 1]]).T
    )
    shape = canon["ED"]["image"].shape
    padded = bool(np.any(corners[:2] < -0.5) or np.any(corners[:2].T > np.array(shape[:2]) - 0.5))
    return {
        "volumes": out,
        "attributes": attrs,
        "geometry": {
            "source_shape": [int(n) for n in volumes["ED"].image.shape],
            "source_spacing": [round(s, 4) for s in source_spacing],
            "orientation": [[int(a), int(f)] for a, f in ornt],
            "box_centre_voxel": [round(float(c), 2) for c in centre],
            "padded": padded,
        },
    }


def _process(job: tuple[SourceSubject, PrepareSpec, dict[str, float], Path]) -> tuple[str, dict[str, Any]]:
    """Prepare one subject and write its volumes into the staging folder (in a worker process or not).

    Returns:
        ("included", report entry) or ("excluded", subject, reason, detail, folder).
    """
    sub, spec, demographics, staging = job
    try:
        result = _prepare_subject(sub, spec, demographics)
    except Excluded as e:
        return "excluded", {"subject": sub.subject, "reason": e.reason, "detail": e.detail, "where": sub.where}
    files = {}
    for phase, (image, label, affine) in result["volumes"].items():
        name = f"{sub.subject}_{phase}.nii.gz"
        write_bytes_atomic(staging / "images" / name, nifti_gz_bytes(image, affine))
        write_bytes_atomic(staging / "labels" / name, nifti_gz_bytes(label, affine))
        files[phase] = (f"images/{name}", f"labels/{name}")
    entry = {"subject": sub.subject, "group": sub.group, "source": sub.where, **result["geometry"]}
    return "included", {**entry, "attributes": result["attributes"], "files": files}


# ------------------------------------------------------------------------------------ the cohort


def _replace(staging: Path, out: Path) -> None:
    """Move the finished cohort into place; an earlier cohort in ``out`` is removed only after that."""
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            old = Path(temp_name(out))
            os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_cohort(spec: PrepareSpec) -> dict[str, Any]:
    """Import one dataset into a cohort folder (see the module docstring).

    Args:
        spec: the checked settings.

    Returns:
        the report written to ``prepare_report.json`` (with the output paths).

    Raises:
        DataError: when no subject is left (naming the source folder), or with ``strict`` when
            any subject is excluded; the earlier content of ``out`` is then left as it was.
    """
    found = subjects(spec.format, spec.source, image_pattern=spec.image_pattern, label_pattern=spec.label_pattern)
    extra = read_demographics(spec.demographics, spec.columns) if spec.demographics else {}
    out = Path(spec.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(out.parent, [out.name])
    staging = Path(temp_name(out))
    included, excluded = [], []
    try:
        (staging / "images").mkdir(parents=True)
        (staging / "labels").mkdir()
        jobs, seen = [], set()
        for sub in found:
            if sub.subject in seen or "/" in sub.subject:
                excluded.append({"subject": sub.subject, "reason": "missing_metadata", "detail": "duplicate or bad id"})
                continue
            seen.add(sub.subject)
            # the CSV's values are used where it gives one; nothing is filled in where neither does
            jobs.append((sub, spec, {**sub.demographics, **extra.get(sub.subject, {})}, staging))
        if spec.num_workers > 1 and len(jobs) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=min(spec.num_workers, len(jobs))) as pool:
                results = list(pool.map(_process, jobs, chunksize=4))
        else:
            results = [_process(job) for job in jobs]
        for kind, entry in results:  # in the source's order, whatever the workers' order
            if kind == "excluded":
                logger.warning(f"excluded {entry['subject']} ({entry['where']}): {entry['reason']}: {entry['detail']}")
                excluded.append(entry)
            else:
                included.append(entry)
        if spec.strict and excluded:
            listed = "; ".join(f"{e['subject']}: {e['reason']} ({e['detail']})" for e in excluded)
            raise DataError(f"--strict: {len(excluded)} subject(s) of {spec.source} excluded: {listed}")
        if not included:
            why = f"; excluded: {sorted({e['reason'] for e in excluded})}" if excluded else ""
            raise DataError(
                f"--source {spec.source}: no usable {spec.format} subject found ({len(found)} listed{why}); "
                "see docs/data.md for the expected layout"
            )
        ids = [s["subject"] for s in included]
        splits = split_subjects(ids, spec.split_fractions, seed=spec.seed)
        settings = {
            k: (str(v) if isinstance(v, os.PathLike) else v)
            for k, v in asdict(spec).items()
            if k not in ("columns", "num_workers")
        }
        settings.update(source=str(spec.source), out=str(out), split_fractions=list(spec.split_fractions))
        report = write_index(staging, included=included, excluded=excluded, splits=splits, settings=settings)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _replace(staging, out)
    return report
