"""A classical (non-learned) LV detector: the second instrument, trained on nothing.

The segmenter (``scripts.evaluation.segmenter``) was trained on crisp phantoms, so on blurred
or odd images it may report an LV of the right size where a reader sees a blob. This detector
encodes what a reader looks for in a bright-blood short-axis stack, with no parameters fitted
to any data set:

1. per slice, an Otsu threshold separates bright (blood) from dark voxels;
2. each bright connected component (holes filled: papillary muscles are blood pool in the
   label maps) is a candidate when it is round (solidity, aspect ratio), of LV size, away from
   the image border, and enclosed by a darker ring (myocardium): almost every voxel of a band
   just outside it is dark, the band is much darker than the component, and the edge is sharp
   (a blurred blob fades out instead);
3. candidates are tracked through the slices (centroid continuity); the LV is found when a
   track covers at least ``min_slices`` consecutive slices and ``min_volume_ml``, and its blood-pool volume is the
   sum of the tracked components' areas times the slice thickness.

Volumes are in network layout (D, H, W) = (slices, X, Y), as ``scripts.evaluation.volumes``
reads them, with ``spacing`` = (sx, sy, sz) in mm of the (X, Y, slice) axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

__all__ = ["DetectorSettings", "LVDetection", "detect_lv", "detect_many", "otsu_threshold"]


@dataclass(frozen=True, kw_only=True)
class DetectorSettings:
    """What counts as an LV for the classical detector (anatomical plausibility, not fitted).

    Attributes:
        min_area_mm2: smallest blood-pool cross-section of a candidate.
        max_area_mm2: largest (a disc of about 45 mm radius).
        min_solidity: area / convex-hull area of the filled component.
        max_aspect: longest / shortest axis of the component's moment ellipse.
        ring_mm: width of the band outside the component that must be dark (thinner than the
            thinnest myocardium, so the band does not reach the RV).
        min_ring_dark: fraction of the band's voxels below the slice's threshold.
        min_ring_contrast: (component mean - band mean) / component mean.
        min_uniformity: 10th / 90th intensity percentile of the component: blood is one bright
            class (a bright spot inside a grey disc is not).
        min_edge_sharpness: (threshold - band mean) / (component mean - threshold): how far below
            the threshold the band falls right outside the edge, relative to the blood's height
            above it (a sharp blood-myocardium edge is near 1, a blurred blob much lower).
        max_shift_mm: largest centroid shift between neighbouring slices of a track.
        min_slices: shortest track that counts as an LV.
        min_volume_ml: smallest blood pool that counts (the segmenter's "LV found" uses the same
            5 ml); a texture's small round specks can line up over a few slices.
        tube_min_slices, tube_max_variation: a track of at least this many slices whose area
            varies less than this (std / mean) is a vessel (the descending aorta), not an LV.
    """

    min_area_mm2: float = 40.0
    max_area_mm2: float = 6500.0
    min_solidity: float = 0.80
    max_aspect: float = 2.2
    ring_mm: float = 3.5
    min_ring_dark: float = 0.80
    min_ring_contrast: float = 0.40
    min_uniformity: float = 0.45
    min_edge_sharpness: float = 0.42
    max_shift_mm: float = 12.0
    min_slices: int = 3
    min_volume_ml: float = 5.0
    tube_min_slices: int = 5
    tube_max_variation: float = 0.1


@dataclass
class LVDetection:
    """The detector's answer for one volume.

    Attributes:
        found: whether an LV track of at least ``min_slices`` slices exists.
        volume_ml: blood-pool volume of the track in ml (0 when not found).
        slices: slice indices of the track.
        centroids: (H, W) centroid per tracked slice, in voxels.
    """

    found: bool
    volume_ml: float
    slices: list[int] = field(default_factory=list)
    centroids: list[tuple[float, float]] = field(default_factory=list)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (the one maximising the between-class variance).

    Written here because scikit-image (``threshold_otsu``) is not a dependency of the bundle and
    neither MONAI nor scipy provides it; it is a few lines on a histogram.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return hi
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(counts).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = (w0 * w1 * (mean0 - mean1) ** 2)[:-1]
    # empty bins between two modes tie: take the middle of the tied run, not its low end
    best = np.flatnonzero(between >= between.max() * (1.0 - 1e-12))
    run = best[: 1 + int(np.argmax(np.diff(best) > 1)) if np.any(np.diff(best) > 1) else None]
    return float(0.5 * (edges[1:][run[0]] + edges[1:][run[-1]]))


def _solidity(mask: np.ndarray) -> float:
    """Area / convex-hull area, the hull taken over the pixels' corners (so a square scores 1)."""
    ii, jj = np.nonzero(mask)
    corners = np.concatenate([np.stack([ii + di, jj + dj], axis=1) for di in (-0.5, 0.5) for dj in (-0.5, 0.5)], axis=0)
    try:
        hull = ConvexHull(corners)
    except QhullError:
        return 0.0
    return float(mask.sum() / hull.volume)  # a 2D hull's "volume" is its area


def _aspect(mask: np.ndarray) -> float:
    """Longest / shortest axis of the moment ellipse."""
    ii, jj = np.nonzero(mask)
    if ii.size < 3:
        return np.inf
    cov = np.cov(np.stack([ii, jj]).astype(np.float64)) + np.eye(2) / 12.0  # + a pixel's own spread
    ev = np.linalg.eigvalsh(cov)
    return float(np.sqrt(ev[1] / max(ev[0], 1e-9)))


def _disc(radius_h: float, radius_w: float) -> np.ndarray:
    """An elliptic structuring element with the given radii in voxels (at least 1)."""
    rh, rw = max(1, int(round(radius_h))), max(1, int(round(radius_w)))
    ii, jj = np.mgrid[-rh : rh + 1, -rw : rw + 1]
    return (ii / rh) ** 2 + (jj / rw) ** 2 <= 1.0 + 1e-9


def _candidates(image: np.ndarray, pixel_mm: tuple[float, float], s: DetectorSettings) -> list[dict]:
    """The LV-like bright components of one slice, with their centroid (voxels) and area (voxels).

    Two thresholds: Otsu's of the slice, and, where that finds nothing, Otsu's of the voxels
    above it (where bright surrounding tissue fills the field of view, the first one merges
    blood with it).
    """
    if not np.ptp(image) > 1e-6:
        return []
    t1 = otsu_threshold(image)
    found = _components(image, t1, pixel_mm, s)
    upper = image[image > t1]
    if upper.size > 1 and np.ptp(upper) > 1e-6:
        for cand in _components(image, otsu_threshold(upper), pixel_mm, s):
            if all(np.hypot(*np.subtract(c["centroid"], cand["centroid"])) >= 2.0 for c in found):
                found.append(cand)  # only where the first threshold found nothing
    return found


def _components(image: np.ndarray, t: float, pixel_mm: tuple[float, float], s: DetectorSettings) -> list[dict]:
    """The components above ``t`` that pass the LV criteria."""
    bright = image > t
    labelled, count = ndimage.label(bright)
    if count == 0:
        return []
    pixel_area = pixel_mm[0] * pixel_mm[1]
    ring_element = _disc(s.ring_mm / pixel_mm[0], s.ring_mm / pixel_mm[1])
    out = []
    for index, box in enumerate(ndimage.find_objects(labelled), start=1):
        if box is None:
            continue
        area = int(np.count_nonzero(labelled[box] == index))
        if not s.min_area_mm2 <= area * pixel_area <= s.max_area_mm2:
            continue
        if box[0].start == 0 or box[1].start == 0 or box[0].stop == image.shape[0] or box[1].stop == image.shape[1]:
            continue  # cut by the border: not a whole cross-section
        # a window around the component, large enough for the ring
        pad = ring_element.shape[0] // 2 + 1, ring_element.shape[1] // 2 + 1
        win = tuple(
            slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, image.shape, strict=True)
        )
        component = ndimage.binary_fill_holes(labelled[win] == index)
        if _solidity(component) < s.min_solidity or _aspect(component) > s.max_aspect:
            continue
        ring = ndimage.binary_dilation(component, structure=ring_element) & ~component
        if not ring.any():
            continue
        values = image[win]
        inside = float(values[component].mean())
        own = values[labelled[win] == index]
        uniformity = float(np.percentile(own, 10) / max(np.percentile(own, 90), 1e-9))
        band = values[ring]
        band_mean = float(band.mean())
        if inside <= t or inside <= 0:
            continue
        dark = float(np.mean(band <= t))
        contrast = (inside - band_mean) / inside
        sharpness = (t - band_mean) / (inside - t)
        if (
            dark < s.min_ring_dark
            or contrast < s.min_ring_contrast
            or sharpness < s.min_edge_sharpness
            or uniformity < s.min_uniformity
        ):
            continue
        ci, cj = ndimage.center_of_mass(component)
        out.append(
            {
                "centroid": (ci + win[0].start, cj + win[1].start),
                "area": int(component.sum()),
                "score": dark + contrast + sharpness,
                "features": {"dark": dark, "contrast": contrast, "sharpness": sharpness, "uniformity": uniformity},
            }
        )
    return out


def _is_tube(areas: Sequence[float], s: DetectorSettings) -> bool:
    """A long track whose cross-section hardly changes: a vessel, not a ventricle."""
    areas = np.asarray(areas, dtype=np.float64)
    return areas.size >= s.tube_min_slices and float(areas.std() / areas.mean()) < s.tube_max_variation


def detect_lv(volume: np.ndarray, spacing: Sequence[float], settings: DetectorSettings | None = None) -> LVDetection:
    """Find the LV blood pool in one (D, H, W) volume.

    Args:
        volume: the image, slices first (network layout).
        spacing: (sx, sy, sz) voxel size in mm of the (H, W, D) axes.
        settings: the detector's criteria (defaults when None).

    Returns:
        the :class:`LVDetection`.
    """
    s = settings or DetectorSettings()
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"detect_lv: expected a (D, H, W) volume, got shape {volume.shape}")
    sx, sy, sz = (float(v) for v in spacing)
    per_slice = [_candidates(volume[z], (sx, sy), s) for z in range(volume.shape[0])]
    # tracks: each candidate extends the best track that ended on the previous slice within reach
    tracks: list[list[tuple[int, dict]]] = []
    open_tracks: list[list[tuple[int, dict]]] = []
    for z, cands in enumerate(per_slice):
        extended = []
        for cand in sorted(cands, key=lambda c: -c["score"]):
            best, best_d = None, s.max_shift_mm
            for track in open_tracks:
                if any(t is track for t in extended):
                    continue
                (pi, pj) = track[-1][1]["centroid"]
                d = float(np.hypot((cand["centroid"][0] - pi) * sx, (cand["centroid"][1] - pj) * sy))
                if d <= best_d:
                    best, best_d = track, d
            track = [*best, (z, cand)] if best is not None else [(z, cand)]
            extended.append(track)
            tracks.append(track)
        open_tracks = extended
    if not tracks:
        return LVDetection(found=False, volume_ml=0.0)
    # the LV is the longest track (the atria above the base span fewer slices), then the widest;
    # a tube of constant cross-section (the descending aorta) is not a tapering ventricle
    voxel_ml = sx * sy * sz / 1000.0
    # ``tracks`` holds every prefix of every track; a prefix of a tube is part of that vessel, not
    # a short ventricle (shorter than ``tube_min_slices``, it would pass the tube test on its own)
    tubes = [tr for tr in tracks if _is_tube([c["area"] for _, c in tr], s)]
    tracks = [
        tr
        for tr in tracks
        if len(tr) >= s.min_slices
        and sum(c["area"] for _, c in tr) * voxel_ml >= s.min_volume_ml
        and not any(len(tube) >= len(tr) and all(a[1] is b[1] for a, b in zip(tr, tube)) for tube in tubes)
    ]
    if not tracks:
        return LVDetection(found=False, volume_ml=0.0)
    best = max(tracks, key=lambda tr: (len(tr), max(c["area"] for _, c in tr)))
    return LVDetection(
        found=True,
        volume_ml=float(sum(c["area"] for _, c in best)) * voxel_ml,
        slices=[z for z, _ in best],
        centroids=[tuple(float(v) for v in c["centroid"]) for _, c in best],
    )


def detect_many(images: np.ndarray, spacing: np.ndarray, settings: DetectorSettings | None = None) -> list[LVDetection]:
    """:func:`detect_lv` of each volume of an (N, D, H, W) stack with its (N, 3) spacing."""
    return [detect_lv(img, sp, settings) for img, sp in zip(images, spacing, strict=True)]
