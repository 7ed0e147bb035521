"""Synthetic cardiac cine-MRI short-axis cohorts ("phantoms") for tests and demos.

Each subject gets an end-diastolic (ED) and an end-systolic (ES) short-axis stack that
looks like a balanced SSFP cine acquisition (bright blood, dark myocardium, textured
surrounding tissue, dark lungs, partial-volume edges, a smooth bias field and Rician
noise), a label map per phase (0 background, 1 LV blood pool, 2 LV myocardium, 3 RV blood
pool) and the 14 conditioning attributes of ``scripts.attributes.ATTRIBUTE_NAMES``.

The cardiac attributes are *measured* from the saved label maps with ``scripts.cardiac``
(the measurement every cohort gets); the shape parameters drawn per subject are only targets,
and ANGLE is the rotation the heart was drawn with. Two domains differ on purpose:

- ``public``: ACDC-like. Healthy (NOR), dilated (DCM), hypertrophic (HCM) and
  infarct-thinned (MINF) hearts, a wide age range, AGE/SEX/BMI missing for about a quarter
  of the subjects, lower contrast and more noise.
- ``private``: UK-Biobank-like. Mostly healthy adults aged 45-80, complete attributes,
  higher contrast and less noise.

Every subject is drawn from ``np.random.default_rng([seed, domain_index, subject_index])``,
so a subject does not depend on the cohort size or on the order of generation, and the
same seed gives byte-identical files (gzip is written with mtime 0; bytes may change with
the numpy / scipy version).

Conventions: arrays are (X, Y, Z) with Z the slice axis running from base to apex; the
affine is ``diag(sx, sy, sz, 1)`` plus an origin (in-plane 1.7-1.95 mm, slices 9-10 mm in
``public`` and 10 mm in ``private``); 10-15 slices of which 5-13 contain heart. ANGLE is
the rotation (degrees, counter-clockwise in the X-Y index plane) of the heart about the LV
centre; at 0 the RV lies towards -X. Image intensities are in arbitrary scanner-like units
(a per-subject gain, different per domain), so downstream code normalises per image.
The heart is a truncated prolate ellipsoid (LV cavity) in a myocardial shell and an RV
crescent on the septal side; HCM adds septal hypertrophy, MINF a regionally thinned wall.

Output layout (``DIR`` is ``out_dir``)::

    DIR/images/sub-0000_ED.nii.gz  DIR/images/sub-0000_ES.nii.gz   float32 (X, Y, Z) images
    DIR/labels/sub-0000_ED.nii.gz  DIR/labels/sub-0000_ES.nii.gz   uint8 label maps
    DIR/attributes.csv   id,subject,phase,image,label,LVEDV,...,DEPTH (one row per volume)
    DIR/subjects.csv     subject,domain,group,split
    DIR/datalist.json    MONAI datalist with training/validation/test splits by subject

Command line::

    python -m scripts.phantom --out DIR --subjects 200 --domain public --seed 0 [--layout acdc|mnms|mnms2|ukbb]
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.cardiac import LABELS, measure_attributes, phase_pair_attributes, subject_attributes
from scripts.cohort import (
    CSV_COLUMNS,
    SPLITS,
    SUBJECT_COLUMNS,
    check_fractions,
    csv_bytes,
    format_value,
    split_subjects,
)
from scripts.errors import ConfigError
from scripts.files import nifti_gz_bytes, remove_stale_temp, temp_name, write_bytes_atomic

__all__ = [
    "DOMAINS",
    "LABELS",
    "PHASES",
    "CohortSpec",
    "SubjectParams",
    "generate_cohort",
    "generate_cohorts",
    "measure_attributes",
    "phase_pair_attributes",
    "sample_subject",
    "split_subjects",
    "synthesize_subject",
]

DOMAINS: tuple[str, ...] = ("public", "private")
PHASES: tuple[str, ...] = ("ED", "ES")

_OVERSAMPLE = 2  # in-plane super-sampling factor used for partial-volume rendering
_EDGE_MM = 0.45  # half-width of the soft edge of every rendered structure, in mm

# pathology groups and their sampling probabilities per domain
_GROUPS: dict[str, dict[str, float]] = {
    "public": {"NOR": 0.4, "DCM": 0.2, "HCM": 0.2, "MINF": 0.2},
    "private": {"NOR": 0.92, "HCM": 0.03, "MINF": 0.05},
}


@dataclass(frozen=True)
class _PhaseGeometry:
    """Long-axis geometry of one cardiac phase (all lengths in mm, volumes in ml)."""

    z_base: float  # position of the LV base plane along the slice axis
    cav_length: float  # LV cavity length, base to endocardial apex
    cav_radius: float  # LV cavity radius at the base
    out_length: float  # LV length to the epicardial apex
    out_radius: float  # epicardial radius at the base
    rv_z0: float  # basal end of the RV
    rv_length: float
    rv_area: float  # RV cross-sectional area at its basal end, mm2


@dataclass(frozen=True)
class SubjectParams:
    """Everything drawn for one subject (targets, shape, appearance).

    Volumes and ejection fractions here are targets; the attributes written to
    ``attributes.csv`` are measured from the rendered label maps.
    """

    subject: str
    index: int
    domain: str
    group: str
    age: float
    sex: int
    bmi: float
    bsa: float
    demographics_missing: bool
    angle: float  # in-plane rotation of the heart, degrees
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    target: dict[str, float]
    ed: _PhaseGeometry
    es: _PhaseGeometry
    shape_params: dict[str, float]
    contrast: dict[str, float]


# --------------------------------------------------------------------------------------
# sampling


def _check_domain(domain: str) -> int:
    if domain not in DOMAINS:
        raise ConfigError(f"domain must be one of {', '.join(map(repr, DOMAINS))}; got {domain!r}")
    return DOMAINS.index(domain)


def _subject_rng(seed: int, domain: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _check_domain(domain), int(index)])


def _clipped_normal(rng: np.random.Generator, mean: float, std: float, low: float, high: float) -> float:
    return float(np.clip(rng.normal(mean, std), low, high))


def _ellipsoid_sum(z: np.ndarray, z0: float, length: float) -> float:
    """sum_k (1 - ((z_k - z0) / length)^2) over the slices inside [z0, z0 + length]."""
    t = (z - z0) / length
    inside = (t >= 0) & (t <= 1)
    return float(np.sum(1.0 - t[inside] ** 2))


def _rv_profile(z: np.ndarray, z0: float, length: float, power: float) -> np.ndarray:
    """Relative RV cross-sectional area along the slice axis (1 at the base, 0 at the tip)."""
    t = (z - z0) / length
    return np.where((t >= 0) & (t <= 1), 1.0 - np.clip(t, 0, 1) ** power, 0.0)


def _sample_targets(rng: np.random.Generator, group: str, sex: int, age: float, bsa: float) -> dict[str, float]:
    """Target volumes (ml), ejection fractions (%), wall thickness (mm) and shortening."""
    age_factor = 1.0 - 0.004 * (age - 50.0)
    male = sex == 1
    if group == "NOR":
        lv_edvi = (78.0 if male else 68.0) * age_factor * math.exp(rng.normal(0.0, 0.12))
        lvef = _clipped_normal(rng, 62.0 + (0.0 if male else 1.5), 4.5, 50.0, 75.0)
        rv_edvi = (86.0 if male else 74.0) * age_factor * math.exp(rng.normal(0.0, 0.12))
        rvef = _clipped_normal(rng, 57.0, 5.0, 45.0, 70.0)
        wall = float(np.clip((9.0 if male else 7.8) * (bsa / 1.9) ** 0.3 + rng.normal(0.0, 0.7), 6.0, 11.5))
        shortening = _clipped_normal(rng, 0.13, 0.03, 0.06, 0.2)
    elif group == "DCM":
        lv_edvi = _clipped_normal(rng, 150.0, 28.0, 105.0, 230.0)
        lvef = _clipped_normal(rng, 22.0, 7.0, 8.0, 38.0)
        rv_edvi = _clipped_normal(rng, 105.0, 25.0, 60.0, 170.0)
        rvef = _clipped_normal(rng, 38.0, 10.0, 15.0, 60.0)
        wall = _clipped_normal(rng, 7.0, 0.8, 5.0, 9.0)
        shortening = _clipped_normal(rng, 0.05, 0.02, 0.01, 0.1)
    elif group == "HCM":
        lv_edvi = _clipped_normal(rng, 62.0, 10.0, 40.0, 90.0)
        lvef = _clipped_normal(rng, 72.0, 5.0, 60.0, 85.0)
        rv_edvi = _clipped_normal(rng, 70.0, 12.0, 45.0, 100.0)
        rvef = _clipped_normal(rng, 62.0, 6.0, 48.0, 75.0)
        wall = _clipped_normal(rng, 16.0, 2.5, 12.0, 24.0)
        shortening = _clipped_normal(rng, 0.12, 0.03, 0.05, 0.2)
    elif group == "MINF":
        lv_edvi = _clipped_normal(rng, 112.0, 20.0, 75.0, 180.0)
        lvef = _clipped_normal(rng, 34.0, 7.0, 18.0, 48.0)
        rv_edvi = _clipped_normal(rng, 90.0, 18.0, 55.0, 140.0)
        rvef = _clipped_normal(rng, 48.0, 8.0, 25.0, 65.0)
        wall = _clipped_normal(rng, 8.5, 1.0, 6.0, 11.0)
        shortening = _clipped_normal(rng, 0.07, 0.02, 0.02, 0.12)
    else:  # pragma: no cover - groups are internal
        raise ValueError(f"unknown group {group!r}")
    lvedv = float(np.clip(lv_edvi * bsa, 50.0, 380.0))
    rvedv = float(np.clip(rv_edvi * bsa, 50.0, 380.0))
    return {
        "LVEDV": lvedv,
        "LVESV": lvedv * (1.0 - lvef / 100.0),
        "RVEDV": rvedv,
        "RVESV": rvedv * (1.0 - rvef / 100.0),
        "WALL": wall,
        "SHORTENING": shortening,
    }


def _sample_contrast(rng: np.random.Generator, domain: str) -> dict[str, float]:
    """Relative tissue intensities, noise level, bias strength and scanner gain."""
    if domain == "public":
        return {
            "blood": rng.uniform(0.85, 1.0),
            "myo": rng.uniform(0.22, 0.32),
            "tissue": rng.uniform(0.38, 0.5),
            "fat": rng.uniform(0.7, 0.85),
            "lung": rng.uniform(0.05, 0.1),
            "spine": rng.uniform(0.3, 0.45),
            "noise": rng.uniform(0.045, 0.075),
            "bias": rng.uniform(0.15, 0.3),
            "gain": rng.uniform(250.0, 450.0),
        }
    return {
        "blood": rng.uniform(0.95, 1.05),
        "myo": rng.uniform(0.15, 0.21),
        "tissue": rng.uniform(0.28, 0.36),
        "fat": rng.uniform(0.85, 1.0),
        "lung": rng.uniform(0.02, 0.05),
        "spine": rng.uniform(0.25, 0.35),
        "noise": rng.uniform(0.015, 0.03),
        "bias": rng.uniform(0.08, 0.18),
        "gain": rng.uniform(900.0, 1100.0),
    }


def _draw_params(rng: np.random.Generator, domain: str, index: int, image_size: tuple[int, int]) -> SubjectParams:
    groups = _GROUPS[domain]
    group = str(rng.choice(list(groups), p=list(groups.values())))
    if domain == "public":
        sex = int(rng.random() < 0.6)
        age = _clipped_normal(rng, 57.0, 15.0, 18.0, 90.0)
        bmi = _clipped_normal(rng, 26.5, 4.5, 17.0, 42.0)
        missing = bool(rng.random() < 0.25)
        angle = float(rng.uniform(-45.0, 45.0))
        slice_spacing = float(rng.uniform(9.0, 10.0))
    else:
        sex = int(rng.random() < 0.47)
        age = float(rng.uniform(45.0, 80.0))
        bmi = _clipped_normal(rng, 27.0, 4.2, 18.0, 45.0)
        missing = False
        angle = _clipped_normal(rng, -8.0, 14.0, -45.0, 45.0)
        slice_spacing = 10.0
    height = rng.normal(176.0, 7.0) if sex else rng.normal(163.0, 6.5)  # cm
    weight = bmi * (height / 100.0) ** 2  # kg
    bsa = math.sqrt(height * weight / 3600.0)  # Mosteller, m2
    target = _sample_targets(rng, group, sex, age, bsa)

    # voxel grid; spacings are rounded to float32 because that is what the header stores
    sx = sy = float(np.float32(rng.uniform(1.7, 1.95)))  # square in-plane pixels
    sz = float(np.float32(slice_spacing))

    # long axis: ED length scales with the cube root of the LV volume, 7-13 slices
    wall = target["WALL"]
    out_len_ed = 88.0 * (target["LVEDV"] / 140.0) ** (1.0 / 3.0) * math.exp(rng.normal(0.0, 0.06))
    out_len_ed = float(np.clip(out_len_ed, 6.3 * sz, 12.4 * sz))
    apex_ed = 0.8 * wall
    cav_len_ed = out_len_ed - apex_ed
    n_heart = math.ceil(out_len_ed / sz) + 1
    nz = max(int(rng.integers(10, 15)), n_heart + 1)
    z = np.arange(nz) * sz
    lo, hi = 0.2 * sz, (nz - 1) * sz - out_len_ed
    z_base_ed = float(rng.uniform(lo, hi)) if hi > lo else lo

    ecc = float(rng.uniform(0.0, 0.06))
    ecc_factor = 1.0 + ecc**2 / 2.0  # area of the slightly elliptical cavity vs a circle

    def cavity_radius(volume_ml: float, z0: float, length: float) -> float:
        s = _ellipsoid_sum(z, z0, length)
        return math.sqrt(volume_ml * 1000.0 / (math.pi * sz * s * ecc_factor)) if s > 0 else 0.0

    cav_r_ed = cavity_radius(target["LVEDV"], z_base_ed, cav_len_ed)
    out_r_ed = cav_r_ed + wall
    outer_ed = out_r_ed**2 * _ellipsoid_sum(z, z_base_ed, out_len_ed)
    inner_ed = cav_r_ed**2 * _ellipsoid_sum(z, z_base_ed, cav_len_ed) * ecc_factor
    myo_ml = math.pi * sz * (outer_ed - inner_ed) / 1000.0

    # ES: the base descends towards the nearly fixed apex; the myocardial volume is kept
    shortening = target["SHORTENING"]
    cav_len_es = cav_len_ed * (1.0 - shortening)
    out_len_es = cav_len_es + 1.3 * apex_ed
    z_base_es = z_base_ed + out_len_ed - float(rng.uniform(0.0, 2.0)) - out_len_es
    cav_r_es = cavity_radius(target["LVESV"], z_base_es, cav_len_es)
    cav_es_ml = math.pi * sz * cav_r_es**2 * _ellipsoid_sum(z, z_base_es, cav_len_es) * ecc_factor / 1000.0
    s_out = _ellipsoid_sum(z, z_base_es, out_len_es)
    out_r_es = math.sqrt((myo_ml + cav_es_ml) * 1000.0 / (math.pi * sz * s_out)) if s_out > 0 else 0.0
    out_r_es = max(out_r_es, cav_r_es + 1.05 * wall)

    # RV: from (about) the LV base towards the apex, largest at the base
    rv_offset = float(rng.uniform(0.0, 3.0))
    rv_power = float(rng.uniform(1.5, 2.5))
    rv_len_ed = float(rng.uniform(0.75, 0.9)) * out_len_ed
    rv_len_es = min(rv_len_ed * (1.0 - 0.8 * shortening), 0.92 * out_len_es)

    def rv_area(volume_ml: float, z0: float, length: float) -> float:
        s = float(np.sum(_rv_profile(z, z0, length, rv_power)))
        return volume_ml * 1000.0 / (sz * s) if s > 0 else 0.0

    ed = _PhaseGeometry(
        z_base=z_base_ed,
        cav_length=cav_len_ed,
        cav_radius=cav_r_ed,
        out_length=out_len_ed,
        out_radius=out_r_ed,
        rv_z0=z_base_ed + rv_offset,
        rv_length=rv_len_ed,
        rv_area=rv_area(target["RVEDV"], z_base_ed + rv_offset, rv_len_ed),
    )
    es = _PhaseGeometry(
        z_base=z_base_es,
        cav_length=cav_len_es,
        cav_radius=cav_r_es,
        out_length=out_len_es,
        out_radius=out_r_es,
        rv_z0=z_base_es + rv_offset,
        rv_length=rv_len_es,
        rv_area=rv_area(target["RVESV"], z_base_es + rv_offset, rv_len_es),
    )

    rv_arc = math.radians(rng.uniform(170.0, 210.0))
    rv_fullness = float(rng.uniform(0.5, 0.75))
    rv_skew = float(rng.uniform(-0.25, 0.25))
    phi = np.linspace(-math.pi, math.pi, 360, endpoint=False)
    c_rv = _rv_angular(np.cos(phi), np.sin(phi), rv_arc, rv_fullness, rv_skew)
    i1, i2 = out_r_ed * c_rv.sum() * (2 * math.pi / 360), (c_rv**2).sum() * (2 * math.pi / 360)
    rv_extent = float(-i1 + math.sqrt(i1**2 + 2.0 * i2 * ed.rv_area)) / i2  # basal RV thickness at the septum
    heart_radius = out_r_ed + rv_extent
    angle_rad = math.radians(angle)
    # centre the whole heart (LV + RV) in the field of view, then jitter
    shift = 0.45 * rv_extent
    shape_params = {
        "ecc": ecc,
        "ecc_angle": float(rng.uniform(0.0, math.pi)),
        "infarct_depth": float(rng.uniform(0.4, 0.65)) if group == "MINF" else 0.0,
        "infarct_angle": float(rng.uniform(-2.1, 2.1)),
        "infarct_width": float(rng.uniform(0.45, 0.8)),
        "septal_gain": float(rng.uniform(0.2, 0.6)) if group == "HCM" else 0.0,
        "septal_width": float(rng.uniform(0.5, 0.8)),
        "rv_arc": rv_arc,
        "rv_fullness": rv_fullness,
        "rv_skew": rv_skew,
        "rv_power": rv_power,
        "rv_wall": float(rng.uniform(2.5, 4.0)),
        "fat_base": float(rng.uniform(0.5, 1.5)),
        "fat_groove": float(rng.uniform(3.0, 7.0)),
        "centre_x": math.cos(angle_rad) * shift + float(rng.normal(0.0, 6.0)),
        "centre_y": math.sin(angle_rad) * shift + float(rng.normal(0.0, 6.0)),
        "drift_x": float(rng.normal(0.0, 0.8)),
        "drift_y": float(rng.normal(0.0, 0.8)),
        "heart_radius": heart_radius,
        "rv_extent": rv_extent,
        "pap_radius": float(rng.uniform(2.5, 3.8)),
        "pap_angle_1": float(rng.uniform(-1.2, -0.6)),
        "pap_angle_2": float(rng.uniform(0.6, 1.3)),
        "lung_a": float(rng.uniform(55.0, 75.0)),
        "lung_b": float(rng.uniform(80.0, 105.0)),
        "lung_gap_l": float(rng.uniform(-10.0, 5.0)),
        "lung_gap_r": float(rng.uniform(-10.0, 5.0)),
        "lung_dy": float(rng.normal(10.0, 8.0)),
        "body_a": float(rng.uniform(150.0, 190.0)),
        "body_b": float(rng.uniform(100.0, 125.0)),
        "body_dy": float(rng.normal(8.0, 6.0)),
        "subq_fat": float(rng.uniform(6.0, 18.0)),
        "aorta_radius": float(rng.uniform(9.0, 13.0)),
        "aorta_x": float(rng.uniform(-10.0, 25.0)),
    }
    nx, ny = image_size
    origin = (
        -(nx - 1) / 2.0 * sx + float(rng.normal(0.0, 10.0)),
        -(ny - 1) / 2.0 * sy + float(rng.normal(0.0, 10.0)),
        float(rng.uniform(-90.0, -30.0)),
    )
    return SubjectParams(
        subject=f"sub-{index:04d}",
        index=index,
        domain=domain,
        group=group,
        age=age,
        sex=sex,
        bmi=bmi,
        bsa=bsa,
        demographics_missing=missing,
        angle=angle,
        spacing=(sx, sy, sz),
        shape=(nx, ny, nz),
        origin=origin,
        target=target,
        ed=ed,
        es=es,
        shape_params=shape_params,
        contrast=_sample_contrast(rng, domain),
    )


def sample_subject(seed: int, domain: str, index: int, image_size: Sequence[int] = (112, 112)) -> SubjectParams:
    """Draw the parameters of one subject without rendering it (cheap).

    Args:
        seed: cohort seed (non-negative int).
        domain: ``"public"`` or ``"private"``.
        index: subject index; the subject id is ``f"sub-{index:04d}"``.
        image_size: in-plane size (X, Y) of the volumes.

    Returns:
        the :class:`SubjectParams`, identical to the ones :func:`synthesize_subject` uses.
    """
    return _draw_params(_subject_rng(seed, domain, index), domain, int(index), _check_image_size(image_size))


# --------------------------------------------------------------------------------------
# rendering


def _soft(distance: np.ndarray) -> np.ndarray:
    """Soft inside-mask from a signed distance in mm (positive inside)."""
    return np.clip(0.5 + distance * (0.5 / _EDGE_MM), 0.0, 1.0)


def _ellipse_distance(x: np.ndarray, y: np.ndarray, a: float | np.ndarray, b: float | np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm, positive inside) to an axis-aligned ellipse."""
    return (1.0 - np.sqrt((x / a) ** 2 + (y / b) ** 2)) * np.minimum(a, b)


def _lerp(a: np.ndarray, b: np.ndarray | float, m: np.ndarray) -> np.ndarray:
    return a + m * (b - a)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-std smoothed Gaussian noise (tissue texture)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-6)


def _downsample(a: np.ndarray) -> np.ndarray:
    """Average non-overlapping 2x2 in-plane blocks of a (Z, X, Y) array."""
    return 0.25 * (a[:, 0::2, 0::2] + a[:, 1::2, 0::2] + a[:, 0::2, 1::2] + a[:, 1::2, 1::2])


def _slice_profiles(p: SubjectParams, g: _PhaseGeometry, z: np.ndarray) -> dict[str, np.ndarray]:
    """Per-slice LV cavity radius, wall thickness, RV area and flags, shape (Z,)."""
    t_cav = (z - g.z_base) / g.cav_length
    t_out = (z - g.z_base) / g.out_length
    in_cav = (t_cav >= 0) & (t_cav <= 1)
    in_out = (t_out >= 0) & (t_out <= 1)
    r_cav = np.where(in_cav, g.cav_radius * np.sqrt(np.clip(1.0 - t_cav**2, 0, 1)), 0.0)
    r_out = np.where(in_out, g.out_radius * np.sqrt(np.clip(1.0 - t_out**2, 0, 1)), 0.0)
    thickness = np.maximum(r_out - r_cav, 0.0)
    rv_area = np.where(in_out, g.rv_area * _rv_profile(z, g.rv_z0, g.rv_length, p.shape_params["rv_power"]), 0.0)
    prof = {
        "r_cav": r_cav,
        "thickness": thickness,
        "rv_area": rv_area,
        "has_lv": in_out & (r_out > 0),
        "papillary": (t_cav > 0.2) & (t_cav < 0.8),
        "atrium": np.clip(1.0 + (z - g.z_base) / 30.0, 0.0, 1.0) * (z < g.z_base),
    }
    prof["rv_thickness"] = _rv_thickness(p, prof)
    return prof


def _angular_terms(p: SubjectParams, cos_phi: np.ndarray, sin_phi: np.ndarray) -> dict[str, np.ndarray]:
    """Angle-dependent shape factors in the heart frame (septum / RV at phi = pi)."""
    sp = p.shape_params

    def von_mises(phi0: float, width: float) -> np.ndarray:
        cos_d = cos_phi * math.cos(phi0) + sin_phi * math.sin(phi0)
        return np.exp((cos_d - 1.0) * (1.0 / width**2))

    cos2 = cos_phi * cos_phi - sin_phi * sin_phi
    sin2 = 2.0 * cos_phi * sin_phi
    ellipse = 1.0 + sp["ecc"] * (cos2 * math.cos(2 * sp["ecc_angle"]) + sin2 * math.sin(2 * sp["ecc_angle"]))
    regional = np.ones_like(cos_phi)
    if sp["infarct_depth"] > 0:
        regional = regional - sp["infarct_depth"] * von_mises(sp["infarct_angle"], sp["infarct_width"])
    if sp["septal_gain"] > 0:
        regional = regional + sp["septal_gain"] * von_mises(math.pi, sp["septal_width"])
    half_arc = sp["rv_arc"] / 2.0
    rv = _rv_angular(cos_phi, sin_phi, sp["rv_arc"], sp["rv_fullness"], sp["rv_skew"])
    rv_wall = np.clip((-cos_phi - math.cos(half_arc + 0.25)) * (1.0 / 0.15), 0.0, 1.0)
    groove = von_mises(math.pi - half_arc, 0.35) + von_mises(math.pi + half_arc, 0.35)
    return {"ellipse": ellipse, "regional": regional, "rv": rv, "rv_wall": rv_wall, "groove": groove}


def _rv_angular(cos_phi: np.ndarray, sin_phi: np.ndarray, arc: float, fullness: float, skew: float) -> np.ndarray:
    """Relative RV thickness around the LV: 1 at the septum (phi = pi), 0 beyond arc / 2."""
    half_arc = arc / 2.0
    base = np.clip((-cos_phi - math.cos(half_arc)) * (1.0 / (1.0 - math.cos(half_arc))), 0.0, None)
    return base**fullness * (1.0 - skew * sin_phi)


def _rv_thickness(p: SubjectParams, prof: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-slice maximal RV thickness H so that the crescent has the target area.

    In the heart frame the RV occupies r_epi(phi) < rho < r_epi(phi) + H c(phi), so its area
    is H * int(r_epi c) + H^2 / 2 * int(c^2), solved for H on a fine angular grid.
    """
    phi = np.linspace(-math.pi, math.pi, 720, endpoint=False)
    dphi = 2 * math.pi / 720
    ang = _angular_terms(p, np.cos(phi), np.sin(phi))
    r_epi = prof["r_cav"][:, None] * ang["ellipse"][None] + prof["thickness"][:, None] * ang["regional"][None]
    i1 = np.sum(r_epi * ang["rv"][None], axis=1) * dphi
    i2 = float(np.sum(ang["rv"] ** 2) * dphi)
    area = prof["rv_area"]
    return np.where(area > 0, (-i1 + np.sqrt(i1**2 + 2.0 * i2 * area)) / i2, 0.0)


def _heart_radii(
    p: SubjectParams, prof: Mapping[str, np.ndarray], ang: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Boundary radii (mm, heart frame) of the nested heart layers; -10 where absent.

    ``prof`` entries must broadcast against the angular terms (slices on the first axis).
    """
    sp = p.shape_params
    has_lv, r_cav = prof["has_lv"], prof["r_cav"]
    lv_shape = r_cav * ang["ellipse"]
    r_endo = np.where(r_cav > 0, lv_shape, -10.0)
    r_epi = np.where(has_lv, lv_shape + prof["thickness"] * ang["regional"], -10.0)
    r_rv = r_epi + prof["rv_thickness"] * ang["rv"]
    r_wall = np.where(has_lv, r_rv + sp["rv_wall"] * ang["rv_wall"], -10.0)
    r_fat = np.where(has_lv, r_wall + sp["fat_base"] + sp["fat_groove"] * ang["groove"], -10.0)
    return {"endo": r_endo, "epi": r_epi, "rv": r_rv, "wall": r_wall, "fat": r_fat}


def _polar(p: SubjectParams, x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray):
    """Heart-frame coordinates (u, v), radius and angular terms of image points (mm)."""
    a = math.radians(p.angle)
    dx, dy = x - cx, y - cy
    u = math.cos(a) * dx + math.sin(a) * dy  # rotate by -angle: the heart is rotated by +angle
    v = -math.sin(a) * dx + math.cos(a) * dy
    rho = np.sqrt(u * u + v * v) + np.float32(1e-4)
    inv = 1.0 / rho
    return u, v, rho, _angular_terms(p, u * inv, v * inv)


def _heart_box(p: SubjectParams, prof: Mapping[str, np.ndarray], cx: np.ndarray, cy: np.ndarray) -> tuple[slice, slice]:
    """Native-resolution in-plane index ranges that contain every heart layer of every slice."""
    nx, ny, _ = p.shape
    sx, sy, _ = p.spacing
    phi = np.linspace(-math.pi, math.pi, 720, endpoint=False)
    ang = _angular_terms(p, np.cos(phi), np.sin(phi))
    col = {k: np.asarray(v)[:, None] for k, v in prof.items()}
    r = _heart_radii(p, col, ang)["fat"] + 3.0 * _EDGE_MM
    if not np.any(r > 0):
        return slice(0, 0), slice(0, 0)
    a = math.radians(p.angle)
    x = cx[:, None] + r * np.cos(phi + a)[None]
    y = cy[:, None] + r * np.sin(phi + a)[None]
    keep = r > 0
    x_lo, x_hi = x[keep].min() / sx + nx / 2.0, x[keep].max() / sx + nx / 2.0
    y_lo, y_hi = y[keep].min() / sy + ny / 2.0, y[keep].max() / sy + ny / 2.0
    return (
        slice(max(math.floor(x_lo) - 1, 0), min(math.ceil(x_hi) + 1, nx)),
        slice(max(math.floor(y_lo) - 1, 0), min(math.ceil(y_hi) + 1, ny)),
    )


def _render_phase(
    p: SubjectParams, phase: str, rng: np.random.Generator, textures: Mapping[str, np.ndarray], bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Render one phase; returns the (X, Y, Z) float32 image and uint8 label map.

    The surroundings are drawn at the native resolution with anti-aliased edges; the heart
    is drawn at ``_OVERSAMPLE`` x the in-plane resolution inside its bounding box as a
    premultiplied (colour, coverage) layer, averaged down and composited over them.
    """
    g = p.ed if phase == "ED" else p.es
    sp, c = p.shape_params, p.contrast
    nx, ny, nz = p.shape
    sx, sy, sz = p.spacing
    f = _OVERSAMPLE
    z = np.arange(nz) * sz
    prof = _slice_profiles(p, g, z)
    colp = {k: np.asarray(v, dtype=np.float32)[:, None, None] for k, v in prof.items()}
    z_mid = g.z_base + g.out_length / 2.0
    cx = sp["centre_x"] + sp["drift_x"] * (z - z_mid) / sz  # LV centre per slice, mm
    cy = sp["centre_y"] + sp["drift_y"] * (z - z_mid) / sz
    cx3 = cx.astype(np.float32)[:, None, None]
    cy3 = cy.astype(np.float32)[:, None, None]
    tex_c, tex_f = textures["coarse"], textures["fine"]

    # ---- surroundings at native resolution (Z, X, Y), pixel centres in mm
    xn = ((np.arange(nx) + 0.5 - nx / 2.0) * sx).astype(np.float32)[None, :, None]
    yn = ((np.arange(ny) + 0.5 - ny / 2.0) * sy).astype(np.float32)[None, None, :]
    u, v, rho, ang = _polar(p, xn, yn, cx3, cy3)
    r_fat = _heart_radii(p, colp, ang)["fat"]
    blood = c["blood"] * (1.0 + 0.02 * tex_f)
    myo = c["myo"] * (1.0 + 0.07 * tex_f)
    body_d = _ellipse_distance(xn, yn - sp["body_dy"], sp["body_a"], sp["body_b"])
    img = _soft(body_d) * (c["tissue"] * (1.0 + 0.18 * tex_c))
    img = _lerp(img, c["fat"] * (1.0 + 0.08 * tex_f), _soft(body_d) - _soft(body_d - sp["subq_fat"]))
    # lungs left and right of the heart, carved around the heart / mediastinum
    hr = sp["heart_radius"]
    r_med = np.maximum(r_fat, 0.75 * (p.ed.out_radius + 0.5 * hr) * (1.0 + 0.1 * ang["ellipse"]))
    lung_keep = _soft(rho - r_med - 2.5) * _soft(body_d - sp["subq_fat"] - 8.0)
    lung_scale = (1.0 - 0.25 * np.arange(nz, dtype=np.float32) / max(nz - 1, 1))[:, None, None]
    heart_x = sp["centre_x"] - math.cos(math.radians(p.angle)) * 0.45 * sp["rv_extent"]
    half_width = p.ed.out_radius + 0.5 * sp["rv_extent"]
    lung_a, lung_b = sp["lung_a"] * lung_scale, sp["lung_b"] * lung_scale
    lung_y = yn - sp["lung_dy"]
    lung_l = _ellipse_distance(xn - (heart_x + half_width + sp["lung_gap_l"] + sp["lung_a"]), lung_y, lung_a, lung_b)
    lung_r = _ellipse_distance(xn - (heart_x - half_width - sp["lung_gap_r"] - sp["lung_a"]), lung_y, lung_a, lung_b)
    img = _lerp(img, c["lung"] * (1.0 + 0.5 * tex_c), np.maximum(_soft(lung_l), _soft(lung_r)) * lung_keep)
    # descending aorta and vertebral body, posterior to the heart
    aorta_y = sp["centre_y"] + 0.9 * hr + sp["aorta_radius"] + 6.0
    aorta_d = sp["aorta_radius"] - np.sqrt((xn - sp["centre_x"] - sp["aorta_x"]) ** 2 + (yn - aorta_y) ** 2)
    img = _lerp(img, blood, _soft(aorta_d))
    spine_d = _ellipse_distance(xn - sp["centre_x"] + 10.0, yn - aorta_y - 30.0, 20.0, 16.0)
    img = _lerp(img, c["spine"] * (1.0 + 0.15 * tex_c), _soft(spine_d))
    # atria above the LV base (blood, unlabelled as in ACDC)
    atrium = colp["atrium"]
    if np.any(atrium > 0):
        r_atrium = atrium * 0.7 * p.ed.out_radius
        la_d = np.sqrt((u - 0.2 * p.ed.out_radius) ** 2 + (v - 0.3 * p.ed.out_radius) ** 2)
        ra_d = np.sqrt((u + 1.2 * p.ed.out_radius) ** 2 + v * v)
        present = atrium > 0
        img = _lerp(img, myo, _soft(r_atrium + 2.5 - la_d) * present)
        img = _lerp(img, blood, np.maximum(_soft(r_atrium - la_d), _soft(0.8 * r_atrium - ra_d)) * present)

    # ---- heart at f x resolution inside its bounding box
    label = np.zeros((nz, nx, ny), dtype=np.uint8)
    bx, by = _heart_box(p, prof, cx, cy)
    if bx.stop > bx.start and by.stop > by.start:
        xf = ((np.arange(bx.start * f, bx.stop * f) + 0.5) / f - nx / 2.0) * sx
        yf = ((np.arange(by.start * f, by.stop * f) + 0.5) / f - ny / 2.0) * sy
        u, v, rho, ang = _polar(p, xf.astype(np.float32)[None, :, None], yf.astype(np.float32)[None, None, :], cx3, cy3)
        r = _heart_radii(p, colp, ang)
        lv, epi, rv_out = _soft(r["endo"] - rho), _soft(r["epi"] - rho), _soft(r["rv"] - rho)
        fractions = np.stack([1.0 - rv_out, lv, epi - lv, rv_out - epi])  # background, LV, myo, RV
        fractions = np.stack([_downsample(a) for a in fractions])
        label[:, bx, by] = np.argmax(fractions, axis=0)

        def up(a: np.ndarray) -> np.ndarray:
            return np.repeat(np.repeat(a[:, bx, by], f, axis=1), f, axis=2)

        blood_f, myo_f = up(blood), up(myo)
        fat_f = c["fat"] * (1.0 + 0.08 * up(tex_f))
        # premultiplied colour and coverage, painted back to front
        alpha = _soft(r["fat"] - rho)
        colour = alpha * fat_f
        wall = _soft(r["wall"] - rho)
        colour = _lerp(colour, myo_f, wall)
        colour = _lerp(colour, blood_f, rv_out)
        colour = _lerp(colour, myo_f, epi)
        colour = _lerp(colour, blood_f, lv)
        pap_r = sp["pap_radius"] * (1.0 if phase == "ED" else 1.3)
        pap = np.zeros_like(lv)
        for phi0 in (sp["pap_angle_1"], sp["pap_angle_2"]):
            pu, pv = 0.55 * colp["r_cav"] * math.cos(phi0), 0.55 * colp["r_cav"] * math.sin(phi0)
            pap = np.maximum(pap, _soft(pap_r - np.sqrt((u - pu) ** 2 + (v - pv) ** 2)))
        colour = _lerp(colour, myo_f, pap * lv * colp["papillary"])
        sub = img[:, bx, by]
        img[:, bx, by] = _downsample(colour) + (1.0 - _downsample(alpha)) * sub

    image = ndimage.gaussian_filter(img, (0.0, 0.35, 0.35))  # scanner point-spread
    image = image * bias
    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels
    sigma = c["noise"]
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real * real + imag * imag) * c["gain"]
    return (
        np.ascontiguousarray(image.transpose(1, 2, 0), dtype=np.float32),
        np.ascontiguousarray(label.transpose(1, 2, 0)),
    )


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative bias field of shape (Z, X, Y), log-polynomial of degree 2."""
    nx, ny, nz = shape
    zz = np.linspace(-1, 1, nz, dtype=np.float32)[:, None, None]
    xx = np.linspace(-1, 1, nx, dtype=np.float32)[None, :, None]
    yy = np.linspace(-1, 1, ny, dtype=np.float32)[None, None, :]
    k = rng.normal(0.0, strength / 2.0, size=6)
    log_b = k[0] * xx + k[1] * yy + k[2] * xx * xx + k[3] * yy * yy + k[4] * xx * yy + 0.3 * k[5] * zz
    return np.exp(log_b - 0.3 * strength * yy).astype(np.float32)  # anterior coil: brighter at -y


def _affine(p: SubjectParams) -> np.ndarray:
    affine = np.diag([*p.spacing, 1.0])
    affine[:3, 3] = p.origin
    return affine


def synthesize_subject(seed: int, domain: str, index: int, image_size: Sequence[int] = (112, 112)) -> dict[str, Any]:
    """Render the ED and ES volumes of one subject and measure their attributes.

    Args:
        seed: cohort seed (non-negative int).
        domain: ``"public"`` or ``"private"``.
        index: subject index; the subject is seeded with ``[seed, domain_index, index]``.
        image_size: in-plane size (X, Y) of the volumes.

    Returns:
        dict with ``params`` (:class:`SubjectParams`), ``affine`` (4x4), ``spacing``,
        ``images`` and ``labels`` ({"ED": (X, Y, Z) array, "ES": ...}; float32 / uint8)
        and ``attributes`` ({"ED": {name: value}, "ES": ...} in ``ATTRIBUTE_NAMES`` order,
        NaN for missing values).
    """
    rng = _subject_rng(seed, domain, index)
    p = _draw_params(rng, domain, int(index), _check_image_size(image_size))
    nx, ny, nz = p.shape
    textures = {
        "coarse": _smooth_noise(rng, (nz, nx, ny), (0.7, 2.5, 2.5)),
        "fine": _smooth_noise(rng, (nz, nx, ny), (0.3, 0.8, 0.8)),
    }
    bias = _bias_field(rng, p.shape, p.contrast["bias"])
    images, labels = {}, {}
    for phase in PHASES:
        images[phase], labels[phase] = _render_phase(p, phase, rng, textures, bias)
    demographics = {} if p.demographics_missing else {"AGE": p.age, "SEX": float(p.sex), "BMI": p.bmi}
    # ANGLE is the rotation the heart was drawn with (the truth), not a measurement of it
    attributes = subject_attributes(labels["ED"], labels["ES"], p.spacing, demographics=demographics, angle=p.angle)
    return {
        "params": p,
        "affine": _affine(p),
        "spacing": p.spacing,
        "images": images,
        "labels": labels,
        "attributes": attributes,
    }


# --------------------------------------------------------------------------------------
# files


def _volume_paths(subject: str, phase: str) -> tuple[str, str]:
    name = f"{subject}_{phase}.nii.gz"
    return f"images/{name}", f"labels/{name}"


def _write_subject(job: tuple[str, int, str, int, tuple[int, int]]) -> tuple[str, str, dict[str, dict[str, float]]]:
    """Worker: render one subject, write its four NIfTI files, return its attribute rows."""
    out_dir, seed, domain, index, image_size = job
    result = synthesize_subject(seed, domain, index, image_size)
    p = result["params"]
    for phase in PHASES:
        image_rel, label_rel = _volume_paths(p.subject, phase)
        write_bytes_atomic(Path(out_dir, image_rel), nifti_gz_bytes(result["images"][phase], result["affine"]))
        write_bytes_atomic(Path(out_dir, label_rel), nifti_gz_bytes(result["labels"][phase], result["affine"]))
    return p.subject, p.group, result["attributes"]


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    try:
        size = tuple(int(s) for s in image_size)
        ok = len(size) == 2 and all(s >= 32 and s == float(t) for s, t in zip(size, image_size))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"image_size must be two integers >= 32 (X, Y), e.g. (112, 112); got {image_size!r}")
    return size  # type: ignore[return-value]


def _progress(iterable: Iterator[Any], total: int, enabled: bool) -> Iterator[Any]:
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency, but optional here
        return iterable
    return tqdm(iterable, total=total, desc="phantom subjects", unit="subject")


def _is_count(value: Any, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= minimum


@dataclass
class CohortSpec:
    """The arguments of one cohort, checked when the spec is made (nothing is written).

    ``configs/phantom.yaml`` makes one spec per cohort and hands them all to
    :func:`generate_cohorts`, so a bad argument of the second cohort (``--private_subjects abc``)
    stops the run before the first cohort is generated or replaced.

    Args:
        out_dir: output directory. It must be empty or absent unless ``overwrite``.
        subjects: number of subjects (>= 1); each gets an ED and an ES volume.
        domain: ``"public"`` (ACDC-like) or ``"private"`` (UK-Biobank-like).
        seed: non-negative seed; the same seed gives byte-identical files.
        image_size: in-plane size (X, Y) of the volumes.
        split_fractions: (training, validation, test) fractions of subjects.
        overwrite: replace a cohort already in ``out_dir``.
        num_workers: worker processes for rendering (1 = in this process).
        progress: show a tqdm progress bar.
        layout: ``"bundle"`` (the phantom's own layout, read by the stages) or a dataset layout
            to write instead, ``"acdc"``, ``"mnms"``, ``"mnms2"``, ``"ukbb"``, or a
            ``scripts.phantom_layouts.LayoutOptions`` (storage order, spacing, offset); a
            dataset layout is read back with ``python -m scripts.prepare``.
    """

    out_dir: str | os.PathLike
    subjects: int = 20
    domain: str = "public"
    seed: int = 0
    image_size: Sequence[int] = (112, 112)
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15)
    overwrite: bool = False
    num_workers: int = 1
    progress: bool = True
    layout: Any = "bundle"
    domain_index: int = field(init=False)

    def __post_init__(self) -> None:
        self.domain_index = _check_domain(self.domain)
        what = f"{self.domain} cohort ({self.out_dir})"
        if not _is_count(self.subjects, 1):
            raise ConfigError(f"{what}: subjects must be an integer >= 1 (number of subjects); got {self.subjects!r}")
        if not _is_count(self.seed, 0):
            raise ConfigError(f"{what}: seed must be a non-negative integer; got {self.seed!r}")
        if not _is_count(self.num_workers, 1):
            raise ConfigError(f"{what}: num_workers must be an integer >= 1; got {self.num_workers!r}")
        if not isinstance(self.overwrite, bool):
            raise ConfigError(f"{what}: overwrite must be True or False; got {self.overwrite!r}")
        # imported here, not at the top: the layout writers load torch and MONAI (resampling), which the
        # phantom itself does not need
        from scripts.phantom_layouts import LayoutOptions

        self.layout = self.layout if isinstance(self.layout, LayoutOptions) else LayoutOptions(layout=str(self.layout))
        self.image_size = _check_image_size(self.image_size)
        self.split_fractions = check_fractions(self.split_fractions)
        self.subjects, self.seed, self.num_workers = int(self.subjects), int(self.seed), int(self.num_workers)
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out_dir must be a directory path; {str(out)!r} is a file")
        if out.is_dir() and any(out.iterdir()) and not self.overwrite:
            raise ConfigError(
                f"out_dir {str(out)!r} exists and is not empty; choose a new or empty directory "
                "or pass overwrite=True (CLI: --overwrite)"
            )


def _render(spec: CohortSpec, staging: Path) -> tuple[dict[str, Any], list]:
    """Write the whole cohort of ``spec`` into ``staging``; returns (summary with final paths, results)."""
    out = Path(spec.out_dir)
    (staging / "images").mkdir(parents=True)
    (staging / "labels").mkdir()
    subjects, seed, domain = spec.subjects, spec.seed, spec.domain
    jobs = [(str(staging), seed, domain, i, spec.image_size) for i in range(subjects)]
    if spec.num_workers > 1 and subjects > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(spec.num_workers, subjects)) as pool:
            results = list(_progress(pool.map(_write_subject, jobs, chunksize=4), subjects, spec.progress))
    else:
        results = list(_progress(map(_write_subject, jobs), subjects, spec.progress))

    ids = [sid for sid, _, _ in results]
    splits = split_subjects(ids, spec.split_fractions, seed=seed * len(DOMAINS) + spec.domain_index)
    empty = [name for name, fraction in zip(SPLITS, spec.split_fractions) if fraction > 0 and not splits[name]]
    if empty:
        warnings.warn(
            f"{spec.domain} cohort ({out}): {subjects} subject(s) leave the {' and '.join(empty)} split(s) empty; "
            "stages that validate or evaluate on them need at least 3 subjects",
            UserWarning,
            stacklevel=2,
        )
    split_of = {sid: name for name in SPLITS for sid in splits[name]}
    rows, entries = [], {name: [] for name in SPLITS}
    for sid, _, attrs in results:
        for phase in PHASES:
            image_rel, label_rel = _volume_paths(sid, phase)
            vid = f"{sid}_{phase}"
            values = [format_value(n, attrs[phase][n]) for n in ATTRIBUTE_NAMES]
            rows.append([vid, sid, phase, image_rel, label_rel, *values])
            entries[split_of[sid]].append({"id": vid, "subject": sid, "image": image_rel, "label": label_rel})
    subject_rows = [[sid, domain, group, split_of[sid]] for sid, group, _ in results]
    write_bytes_atomic(staging / "subjects.csv", csv_bytes(SUBJECT_COLUMNS, subject_rows))
    write_bytes_atomic(staging / "attributes.csv", csv_bytes(CSV_COLUMNS, rows))
    datalist = {
        "description": f"synthetic bSSFP short-axis phantom cohort ({domain} domain, scripts/phantom.py)",
        "domain": domain,
        "seed": seed,
        "attributes_csv": "attributes.csv",
        **entries,
    }
    write_bytes_atomic(staging / "datalist.json", (json.dumps(datalist, indent=2) + "\n").encode())

    summary_attrs = {}
    for j, name in enumerate(ATTRIBUTE_NAMES):
        values = np.array([float(r[5 + j]) if r[5 + j] else np.nan for r in rows])
        finite = values[np.isfinite(values)]
        summary_attrs[name] = {
            "min": float(finite.min()) if finite.size else None,
            "max": float(finite.max()) if finite.size else None,
            "missing": int(values.size - finite.size),
        }
    groups: dict[str, int] = {}
    for _, group, _ in results:
        groups[group] = groups.get(group, 0) + 1
    summary = {
        "out_dir": str(out),
        "domain": domain,
        "seed": seed,
        "subjects": subjects,
        "volumes": len(rows),
        "groups": dict(sorted(groups.items())),
        "splits": {name: len(splits[name]) for name in SPLITS},
        "datalist": str(out / "datalist.json"),
        "attributes_csv": str(out / "attributes.csv"),
        "subjects_csv": str(out / "subjects.csv"),
        "attributes": summary_attrs,
    }
    return summary, results


_INDEX_FILES = ("datalist.json", "attributes.csv", "subjects.csv")
_VOLUME_GLOB = "sub-*_E[DS].nii.gz"


def _swap_in(staging: Path, out: Path) -> None:
    """Move the cohort generated in ``staging`` to ``out``, replacing an earlier cohort there.

    An absent or empty ``out`` is replaced by one rename. Otherwise the earlier cohort's index
    files go first (so no datalist ever points at missing volumes), then ``images/`` and
    ``labels/`` are swapped by renames, then the new index files, datalist last. Files that are
    not the phantom's (other names in ``out``, ``images/`` or ``labels/``) are kept.
    """
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
        return
    for name in _INDEX_FILES:
        (out / name).unlink(missing_ok=True)
    for sub in ("images", "labels"):
        old = out / sub
        if old.is_dir():
            parked = Path(temp_name(old))
            os.replace(old, parked)
            os.replace(staging / sub, old)
            for path in parked.iterdir():  # keep what is not a phantom volume
                if not path.match(_VOLUME_GLOB):
                    os.replace(path, old / path.name)
            shutil.rmtree(parked)
        else:
            if old.exists():
                old.unlink()
            os.replace(staging / sub, old)
    for name in _INDEX_FILES[::-1]:  # datalist last
        os.replace(staging / name, out / name)
    shutil.rmtree(staging)


def _replace_folder(staging: Path, out: Path) -> None:
    """Put a cohort written in a dataset layout in place of ``out`` (an earlier one is removed after)."""
    old = None
    if out.exists():
        old = Path(temp_name(out))
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def generate_cohorts(specs: Sequence[CohortSpec]) -> list[dict[str, Any]]:
    """Generate several cohorts; nothing is replaced unless all of them are generated.

    Every cohort is rendered into a hidden folder beside its ``out_dir``
    (``.<name>.<random>.part``); only when all are complete are they moved into place. A run
    that fails (bad argument, error, kill) therefore leaves every earlier cohort as it was. The
    staging folders of a killed run are removed by the next run.

    Args:
        specs: one checked :class:`CohortSpec` per cohort (distinct ``out_dir``).

    Returns:
        one summary per cohort (see :func:`generate_cohort`).
    """
    outs = [Path(spec.out_dir).resolve() for spec in specs]
    if len(set(outs)) != len(outs):
        raise ConfigError(f"cohorts must have distinct out_dir folders; got {[str(s.out_dir) for s in specs]}")
    staging_dirs: list[Path] = []
    summaries = []
    try:
        for spec in specs:
            out = Path(spec.out_dir)
            out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temp(out.parent, [out.name])  # staging folders of a killed run
            staging_dirs.append(Path(temp_name(out)))
            summaries.append(_render(spec, staging_dirs[-1])[0])
            if spec.layout.layout != "bundle":  # rewrite the rendered cohort in the dataset's layout
                from scripts.phantom_layouts import write_layout

                rendered = staging_dirs[-1]
                staging_dirs[-1] = Path(temp_name(out))
                write_layout(rendered, staging_dirs[-1], spec.layout)
                shutil.rmtree(rendered)
                layout = spec.layout.layout  # the index files come from the importer
                where = f"{out} in the {layout} layout (python -m scripts.prepare --format {layout} writes it)"
                summaries[-1].update(layout=layout, datalist=where, attributes_csv="-", subjects_csv="-")
    except BaseException:
        for staging in staging_dirs:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    for spec, staging in zip(specs, staging_dirs):
        if spec.layout.layout == "bundle":
            _swap_in(staging, Path(spec.out_dir))
        else:
            _replace_folder(staging, Path(spec.out_dir))
    return summaries


def generate_cohort(
    out_dir: str | os.PathLike,
    *,
    subjects: int = 20,
    domain: str = "public",
    seed: int = 0,
    image_size: Sequence[int] = (112, 112),
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
    num_workers: int = 1,
    progress: bool = True,
    layout: Any = "bundle",
) -> dict[str, Any]:
    """Generate a synthetic cohort: NIfTI volumes, label maps, attributes.csv and datalist.json.

    All arguments are checked first; the cohort is then generated in a hidden folder beside
    ``out_dir`` and moved into place only when complete (:func:`generate_cohorts`), so a run
    that fails never replaces an earlier cohort.

    Args:
        out_dir: output directory; created if needed. It must be empty unless ``overwrite``.
        subjects: number of subjects (>= 1); each gets an ED and an ES volume.
        domain: ``"public"`` (ACDC-like) or ``"private"`` (UK-Biobank-like).
        seed: non-negative seed; the same seed gives byte-identical files.
        image_size: in-plane size (X, Y) of the volumes.
        split_fractions: (training, validation, test) fractions of subjects.
        overwrite: allow a non-empty ``out_dir``; files of a previous phantom cohort there
            (``images/sub-*``, ``labels/sub-*``, the CSV files, the datalist) are replaced,
            other files are kept.
        num_workers: worker processes for rendering (1 = in this process).
        progress: show a tqdm progress bar.
        layout: ``"bundle"`` or a dataset layout (see :class:`CohortSpec`).

    Returns:
        summary dict: out_dir, domain, seed, subjects, volumes, groups, split sizes,
        datalist / attributes_csv / subjects_csv paths and per-attribute min / max /
        missing counts.
    """
    spec = CohortSpec(
        out_dir, subjects, domain, seed, image_size, split_fractions, overwrite, num_workers, progress, layout
    )
    return generate_cohorts([spec])[0]


def main(
    out: str,
    *,
    subjects: int = 20,
    domain: str = "public",
    seed: int = 0,
    image_size: Sequence[int] = (112, 112),
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
    overwrite: bool = False,
    num_workers: int = 1,
    progress: bool = True,
    layout: str = "bundle",
) -> None:
    """Command-line entry point (``python -m scripts.phantom --out DIR ...``); prints the summary as JSON.

    Args:
        out: output directory.
        subjects: number of subjects.
        domain: ``public`` or ``private``.
        seed: non-negative integer seed.
        image_size: in-plane size, e.g. ``--image_size '[112,112]'``.
        split_fractions: e.g. ``--split_fractions '[0.7,0.15,0.15]'``.
        overwrite: replace an existing cohort in ``out``.
        num_workers: rendering processes.
        progress: show a progress bar.
        layout: ``bundle`` or a dataset layout: ``acdc``, ``mnms``, ``mnms2``, ``ukbb``.
    """
    summary = generate_cohort(
        str(out),
        subjects=subjects,
        domain=str(domain),
        seed=seed,
        image_size=image_size,
        split_fractions=split_fractions,
        overwrite=overwrite,
        num_workers=num_workers,
        progress=progress,
        layout=str(layout),
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    import fire
    from scripts.overrides import check_function_options

    try:
        check_function_options(main, sys.argv[1:], "python -m scripts.phantom")
        fire.Fire(main)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
