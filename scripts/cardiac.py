"""Cardiac measurements of short-axis label maps: volumes, ejection fractions, wall thickness, DEPTH, ANGLE.

One module for every label map the bundle measures: the phantom's, the real cohorts read by
``scripts.prepare`` and the segmentations of synthetic volumes in the evaluation. The method of
each quantity is documented in docs/data.md ("What is measured and how").

Conventions: a label map is an integer array (X, Y, Z), Z being the slice axis, in the
bundle's codes (:data:`LABELS`: 1 LV blood pool, 2 LV myocardium, 3 RV blood pool) unless a
``labels`` mapping says otherwise; ``spacing`` is the voxel size (sx, sy, sz) in mm of those axes.

- volumes: voxel count x voxel volume (ml), at the resolution of the map given;
- wall thickness: per slice, the symmetric mean distance between the endocardial and the
  epicardial boundary (:func:`wall_thickness`), averaged over the slices holding LV blood pool
  and myocardium;
- DEPTH: slices holding any heart label;
- ANGLE: in-plane direction of the LV blood-pool centroid as seen from the RV centroid
  (:func:`heart_angle`), degrees in (-180, 180]: 0 when the RV lies towards -X of the LV,
  90 when it lies towards -Y. This is the phantom's rotation convention, so a phantom heart
  drawn at angle a measures about a.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from scripts.attributes import ATTRIBUTE_NAMES

__all__ = [
    "LABELS",
    "ejection_fraction",
    "heart_angle",
    "measure_attributes",
    "phase_pair_attributes",
    "subject_attributes",
    "wall_thickness",
]

#: the bundle's label codes
LABELS: dict[str, int] = {"background": 0, "lv": 1, "myo": 2, "rv": 3}

_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-neighbourhood


def _check(label: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, float, float]]:
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be a 3D (X, Y, Z) array, got shape {label.shape}")
    if len(spacing) != 3:
        raise ValueError(f"spacing must be (sx, sy, sz) in mm, got {spacing!r}")
    sx, sy, sz = (float(s) for s in spacing)
    return label, (sx, sy, sz)


def _slice_thickness(lv: np.ndarray, myo: np.ndarray, sampling: tuple[float, float]) -> float:
    """Symmetric mean boundary distance (mm) of one slice's LV wall; NaN without a wall.

    The endocardial boundary is the LV blood-pool pixels next to myocardium, the epicardial
    boundary the myocardium pixels next to anything that is neither LV nor myocardium (both are
    layers of pixels just inside their region, so the half-pixel offsets cancel). The thickness
    is the mean of (each endocardial pixel's distance to the nearest epicardial pixel) and (each
    epicardial pixel's distance to the nearest endocardial pixel): it follows the wall where it
    is, so an elongated, eccentric or open (basal) ring is measured where equivalent-area radii
    are not.
    """
    wall = lv | myo
    # every boundary pixel lies in the wall's bounding box: measure there (a tenth of a 112 x 112 slice)
    xs, ys = np.nonzero(wall.any(axis=1))[0], np.nonzero(wall.any(axis=0))[0]
    box = (slice(max(xs[0] - 1, 0), xs[-1] + 2), slice(max(ys[0] - 1, 0), ys[-1] + 2))
    lv, myo, wall = lv[box], myo[box], wall[box]
    endo = lv & ndimage.binary_dilation(myo, _CROSS)
    epi = myo & ~ndimage.binary_erosion(wall, _CROSS, border_value=0)
    if not endo.any() or not epi.any():
        return math.nan
    to_epi = ndimage.distance_transform_edt(~epi, sampling=sampling)[endo]
    to_endo = ndimage.distance_transform_edt(~endo, sampling=sampling)[epi]
    return 0.5 * (float(to_epi.mean()) + float(to_endo.mean()))


def wall_thickness(label: np.ndarray, spacing: Sequence[float], labels: Mapping[str, int] = LABELS) -> float:
    """Mean LV wall thickness (mm) of a label map: :func:`_slice_thickness` averaged over slices.

    Args:
        label: (X, Y, Z) label map.
        spacing: (sx, sy, sz) in mm.
        labels: codes of ``lv`` and ``myo``.

    Returns:
        the mean over the slices holding both LV blood pool and myocardium; NaN when none does.
    """
    label, (sx, sy, _) = _check(label, spacing)
    values = []
    for k in range(label.shape[2]):
        lv, myo = label[..., k] == labels["lv"], label[..., k] == labels["myo"]
        if lv.any() and myo.any():
            value = _slice_thickness(lv, myo, (sx, sy))
            if math.isfinite(value):
                values.append(value)
    return float(np.mean(values)) if values else math.nan


def heart_angle(label: np.ndarray, spacing: Sequence[float], labels: Mapping[str, int] = LABELS) -> float:
    """ANGLE (degrees): in-plane direction from the RV centroid to the LV centroid.

    Both centroids are taken in mm over the slices that hold LV blood pool and RV blood pool,
    so a heart whose centre drifts along the slices is not tilted by the RV being shorter than
    the LV. The angle is ``atan2(-dy, -dx)`` of the LV->RV vector (dx, dy): 0 when the RV lies
    towards -X, counter-clockwise positive in the (X, Y) index plane.

    Returns:
        the angle in (-180, 180]; NaN when no slice holds both LV and RV.
    """
    label, (sx, sy, _) = _check(label, spacing)
    lv, rv = label == labels["lv"], label == labels["rv"]
    both = lv.any(axis=(0, 1)) & rv.any(axis=(0, 1))
    if not both.any():
        return math.nan
    lv_idx = np.argwhere(lv[..., both])
    rv_idx = np.argwhere(rv[..., both])
    dx = (rv_idx[:, 0].mean() - lv_idx[:, 0].mean()) * sx
    dy = (rv_idx[:, 1].mean() - lv_idx[:, 1].mean()) * sy
    angle = math.degrees(math.atan2(-dy, -dx))
    return 180.0 if angle == -180.0 else angle


def measure_attributes(
    label: np.ndarray, spacing: Sequence[float], labels: Mapping[str, int] = LABELS
) -> dict[str, float]:
    """Measure the cardiac quantities of one label map.

    Args:
        label: integer label map (X, Y, Z), Z the slice axis.
        spacing: voxel size (sx, sy, sz) in mm, matching the axes of ``label``.
        labels: codes of ``lv``, ``myo`` and ``rv`` (default: the bundle's, :data:`LABELS`).

    Returns:
        ``LV_VOLUME``, ``RV_VOLUME``, ``MYO_VOLUME`` (ml), ``MYO_THICKNESS`` (mm, NaN without a
        wall) and ``DEPTH`` (slices holding any of the three labels).
    """
    label, (sx, sy, sz) = _check(label, spacing)
    voxel_ml = sx * sy * sz / 1000.0
    heart = np.isin(label, [labels["lv"], labels["myo"], labels["rv"]])
    return {
        "LV_VOLUME": np.count_nonzero(label == labels["lv"]) * voxel_ml,
        "RV_VOLUME": np.count_nonzero(label == labels["rv"]) * voxel_ml,
        "MYO_VOLUME": np.count_nonzero(label == labels["myo"]) * voxel_ml,
        "MYO_THICKNESS": wall_thickness(label, (sx, sy, sz), labels),
        "DEPTH": int(np.count_nonzero(heart.any(axis=(0, 1)))),
    }


def ejection_fraction(edv: float, esv: float) -> float:
    """EF (%) = 100 (EDV - ESV) / EDV; NaN when EDV is not positive."""
    return 100.0 * (edv - esv) / edv if edv > 0 else float("nan")


def phase_pair_attributes(ed: Mapping[str, float], es: Mapping[str, float]) -> dict[str, float]:
    """Combine the :func:`measure_attributes` of one subject's ED and ES label maps.

    Returns:
        LVEDV, LVESV, LVEF, RVEDV, RVESV, RVEF (ml, %), MYOESTHICK (on the ES map) and
        MYOEDTHICK (on the ED map) in mm.
    """
    return {
        "LVEDV": ed["LV_VOLUME"],
        "LVESV": es["LV_VOLUME"],
        "LVEF": ejection_fraction(ed["LV_VOLUME"], es["LV_VOLUME"]),
        "RVEDV": ed["RV_VOLUME"],
        "RVESV": es["RV_VOLUME"],
        "RVEF": ejection_fraction(ed["RV_VOLUME"], es["RV_VOLUME"]),
        "MYOESTHICK": es["MYO_THICKNESS"],
        "MYOEDTHICK": ed["MYO_THICKNESS"],
    }


def subject_attributes(
    ed_label: np.ndarray,
    es_label: np.ndarray,
    spacing: Sequence[float],
    *,
    labels: Mapping[str, int] = LABELS,
    demographics: Mapping[str, float] | None = None,
    angle: float | None = None,
) -> dict[str, dict[str, float]]:
    """The 14 attributes of one subject's ED and ES volumes, measured from their label maps.

    Args:
        ed_label: ED label map (X, Y, Z).
        es_label: ES label map, same grid.
        spacing: (sx, sy, sz) in mm.
        labels: label codes of the maps.
        demographics: ``AGE``, ``SEX``, ``BMI`` from the dataset's metadata; absent or NaN
            values stay missing (never imputed).
        angle: ANGLE to use instead of :func:`heart_angle` of the ED map (the phantom passes the
            angle it drew).

    Returns:
        ``{"ED": {name: value}, "ES": {...}}`` in :data:`scripts.attributes.ATTRIBUTE_NAMES`
        order, NaN for missing; subject-level values (volumes, EF, thickness, AGE, SEX, BMI,
        ANGLE) are the same in both phases, ESED and DEPTH are per phase.
    """
    measured = {phase: measure_attributes(lab, spacing, labels) for phase, lab in (("ED", ed_label), ("ES", es_label))}
    common = phase_pair_attributes(measured["ED"], measured["ES"])
    demographics = demographics or {}
    for name in ("AGE", "SEX", "BMI"):
        value = demographics.get(name)
        common[name] = float(value) if value is not None else math.nan
    common["ANGLE"] = heart_angle(ed_label, spacing, labels) if angle is None else float(angle)

    def value(phase: str, name: str) -> float:
        if name in common:
            return float(common[name])
        return float(phase == "ED") if name == "ESED" else float(measured[phase]["DEPTH"])

    return {phase: {name: value(phase, name) for name in ATTRIBUTE_NAMES} for phase in ("ED", "ES")}
