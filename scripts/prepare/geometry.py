"""Per-record geometry normalisation: canonical in-plane orientation, in-plane resampling, LV-centred crop.

Every function touches one record only (nothing is estimated across subjects), so it may run on
private data. The slice axis stays the last array axis and slices are never resampled: their
number and thickness are the source's, and the stages' ``spatial_size`` then pads or crops the
slice axis (centred) like any other axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing, SpatialResample

__all__ = ["canonical_orientation", "crop_or_pad", "lv_box", "reorient", "resample_inplane", "spacing_of"]


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis: the lengths of the affine's columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))


def canonical_orientation(affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation (3 x 2: new axis, flip) that makes a record's in-plane axes canonical.

    ``nibabel.orientations.io_orientation`` gives the world axis (x, y or z of the scanner's
    RAS+ frame) closest to each array axis and its sign. The two in-plane array axes are put in
    the order of their world axes and flipped to point along them; the slice axis stays last and
    as stored. The same anatomy stored flipped or transposed (with the affine saying so) thus
    gives the same array.

    Args:
        affine: 4 x 4 voxel-to-world affine of a (X, Y, slices) volume.

    Returns:
        the orientation for :func:`nibabel.orientations.apply_orientation`.
    """
    io = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(io[:2]).any():  # degenerate affine: keep the storage order
        return np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64)
    first = 0 if io[0, 0] < io[1, 0] else 1
    ornt = np.zeros((3, 2))
    ornt[first] = (0, io[first, 1])
    ornt[1 - first] = (1, io[1 - first, 1])
    ornt[2] = (2, 1)
    return ornt


def reorient(array: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``ornt`` to the first three axes of ``array``; returns the array and its new affine."""
    out = nib.orientations.apply_orientation(array, ornt)
    new_affine = np.asarray(affine, dtype=np.float64) @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
    return np.ascontiguousarray(out), new_affine


def resample_inplane(
    array: np.ndarray, affine: np.ndarray, spacing: float | None, *, label: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Resample the in-plane axes to ``spacing`` mm (MONAI ``Spacing``); the slices are kept as they are.

    The first voxel's centre stays where it is; images are interpolated linearly, label maps by
    nearest neighbour. ``spacing`` None returns the input.
    """
    if spacing is None:
        return array, np.asarray(affine, dtype=np.float64)
    current = spacing_of(affine)
    if math.isclose(current[0], spacing, rel_tol=1e-6) and math.isclose(current[1], spacing, rel_tol=1e-6):
        return array, np.asarray(affine, dtype=np.float64)
    tensor = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None], affine=torch.tensor(affine)
    )
    # a pixdim of 0 keeps that axis's spacing: the slices are not resampled
    out = Spacing(pixdim=(spacing, spacing, 0.0), mode="nearest" if label else "bilinear", padding_mode="zeros")(tensor)
    data = out[0].numpy()
    data = np.rint(data).astype(array.dtype) if label else data.astype(np.float32)
    return data, out.affine.numpy().astype(np.float64)


def lv_box(
    array: np.ndarray, affine: np.ndarray, centre: Sequence[float], spacing: float | None, size: int, *, label: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The ``size`` x ``size`` in-plane box at ``spacing`` mm centred on ``centre``, every slice kept.

    With a new spacing the box's grid is centred on ``centre`` exactly (MONAI ``SpatialResample``
    onto that grid; images linear, labels nearest), so the same anatomy stored flipped, transposed
    or in a larger field of view gives the same array. At the source spacing (``spacing`` None or
    equal to it) the box is cut on the source grid, its start rounded to the nearest voxel, and
    no voxel is interpolated.

    Args:
        array: (X, Y, Z) volume in the canonical orientation.
        affine: its affine.
        centre: box centre in voxel coordinates of ``array`` (the ED LV blood-pool centroid).
        spacing: in-plane spacing of the box (mm); None: the source's.
        size: box side in voxels.
        label: nearest-neighbour interpolation and the input dtype.

    Returns:
        the (size, size, Z) array and its affine.
    """
    affine = np.asarray(affine, dtype=np.float64)
    sx, sy, _ = spacing_of(affine)
    if spacing is None or (math.isclose(sx, spacing, rel_tol=1e-6) and math.isclose(sy, spacing, rel_tol=1e-6)):
        start = [int(math.floor(c + 0.5 - size / 2.0)) for c in centre[:2]]
        return crop_or_pad(array, affine, start, size)
    # destination voxel (i, j, k) -> source voxel (c + (i - (size - 1) / 2) * spacing / s, ..., k)
    to_source = np.eye(4)
    for axis, s in enumerate((sx, sy)):
        to_source[axis, axis] = spacing / s
        to_source[axis, 3] = centre[axis] - (size - 1) / 2.0 * spacing / s
    dst_affine = affine @ to_source
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    resample = SpatialResample(mode="nearest" if label else "bilinear", padding_mode="zeros", dtype=np.float64)
    out = resample(
        MetaTensor(data, affine=torch.tensor(affine)),
        dst_affine=torch.tensor(dst_affine),
        spatial_size=(size, size, array.shape[2]),
    )
    result = out[0].numpy()
    result = np.rint(result).astype(array.dtype) if label else result.astype(np.float32)
    return result, dst_affine


def crop_or_pad(
    array: np.ndarray, affine: np.ndarray, start: Sequence[int], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut the box (start, start + size) from the in-plane axes, zero-padded where it leaves the array.

    Written here because MONAI's pad-or-crop transforms centre on the array, not on a point.

    Returns:
        the (size, size, Z) array and the affine of its first voxel.
    """
    out = np.zeros((size, size, *array.shape[2:]), dtype=array.dtype)
    src, dst = [], []
    for axis, s in enumerate(start):
        lo, hi = max(s, 0), min(s + size, array.shape[axis])
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    out[dst[0], dst[1]] = array[src[0], src[1]]
    shift = np.eye(4)
    shift[:2, 3] = start
    return out, np.asarray(affine, dtype=np.float64) @ shift
