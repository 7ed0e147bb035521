"""The cardiac measurements (scripts/cardiac.py) on analytic shapes whose truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scripts.cardiac import LABELS, heart_angle, measure_attributes, subject_attributes, wall_thickness

PIXEL = 1.8  # mm, the UK Biobank in-plane spacing
N = 56  # in-plane voxels
FINE = 8  # supersampling of the analytic shapes


def rasterise(inner, outer, rv=None) -> np.ndarray:
    """A (N, N, 3) label map of analytic regions (functions of x, y in mm), by majority of FINE x FINE samples."""
    c = ((np.arange(N * FINE) + 0.5) / FINE - N / 2) * PIXEL
    x, y = np.meshgrid(c, c, indexing="ij")

    def cover(region):
        return region(x, y).reshape(N, FINE, N, FINE).mean(axis=(1, 3)) >= 0.5

    sl = np.zeros((N, N), dtype=np.uint8)
    sl[cover(outer)] = LABELS["myo"]
    sl[cover(inner)] = LABELS["lv"]
    if rv is not None:
        sl[cover(rv) & (sl == 0)] = LABELS["rv"]
    return np.repeat(sl[..., None], 3, axis=2)


def offset_outer(inner, t):
    """The region within t mm of ``inner``: a wall of constant thickness t (the truth)."""

    def outer(x, y):
        step = x[1, 0] - x[0, 0]
        return ndimage.distance_transform_edt(~inner(x, y), sampling=(step, step)) < t

    return outer


def circle(r, cx=0.0, cy=0.0):
    return lambda x, y: np.hypot(x - cx, y - cy) < r


def ellipse(a, b):
    return lambda x, y: (x / a) ** 2 + (y / b) ** 2 < 1


def equivalent_radii(label) -> float:
    """The earlier method: sqrt((A_lv + A_myo) / pi) - sqrt(A_lv / pi), to show what the new one fixes."""
    lv, myo = np.count_nonzero(label[..., 0] == 1) * PIXEL**2, np.count_nonzero(label[..., 0] == 2) * PIXEL**2
    return math.sqrt((lv + myo) / math.pi) - math.sqrt(lv / math.pi)


SHAPES = {
    "circle r25 t8": (circle(25), offset_outer(circle(25), 8), 8.0),
    "circle r12 t12 (systole)": (circle(12), offset_outer(circle(12), 12), 12.0),
    "ellipse 30x20 t8": (ellipse(30, 20), offset_outer(ellipse(30, 20), 8), 8.0),
    "ellipse 30x15 t6": (ellipse(30, 15), offset_outer(ellipse(30, 15), 6), 6.0),
    # the cavity 4 mm off the centre of the epicardium: mean radial wall R - r - d^2 / (4 r)
    "eccentric ring r20 R30 d4": (circle(20, 4.0), circle(30), 10.0 - 16.0 / 80.0),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_wall_thickness_within_10_percent_of_the_truth(name):
    inner, outer, truth = SHAPES[name]
    label = rasterise(inner, outer)
    assert wall_thickness(label, (PIXEL, PIXEL, 8.0)) == pytest.approx(truth, rel=0.10)


def test_equal_area_radii_fail_where_the_boundary_distance_does_not():
    """An elongated cavity and an open (basal) ring: the check above would catch the earlier method."""
    label = rasterise(*SHAPES["ellipse 30x15 t6"][:2])
    assert abs(equivalent_radii(label) / 6.0 - 1) > 0.10
    half = rasterise(circle(20), lambda x, y: (np.hypot(x, y) < 20) | ((np.hypot(x, y) < 28) & (x > 0)))
    assert abs(equivalent_radii(half) / 8.0 - 1) > 0.4
    assert wall_thickness(half, (PIXEL, PIXEL, 8.0)) == pytest.approx(8.0, rel=0.2)


@pytest.mark.parametrize("angle", [0.0, 30.0, -40.0, 90.0, 180.0])
def test_angle_is_the_direction_from_the_rv_to_the_lv(angle):
    a = math.radians(angle)
    rv = circle(14, -40 * math.cos(a), -40 * math.sin(a))  # RV centroid at angle + 180 degrees
    label = rasterise(circle(18), circle(26), rv)
    assert heart_angle(label, (PIXEL, PIXEL, 8.0)) == pytest.approx(angle if angle != -180 else 180, abs=1.0)
    # flipping the first axis mirrors the direction: 180 - angle
    mirrored = heart_angle(label[::-1], (PIXEL, PIXEL, 8.0))
    assert math.cos(math.radians(mirrored)) == pytest.approx(-math.cos(a), abs=0.02)


def test_volumes_depth_and_label_codes():
    label = rasterise(circle(18), circle(26), circle(14, -40, 0))
    label[..., 2] = 0
    acdc = np.select([label == 1, label == 3], [3, 1], label.astype(np.int64))  # ACDC codes: 1 RV, 3 LV
    m = measure_attributes(label, (PIXEL, PIXEL, 8.0))
    assert m["DEPTH"] == 2 and m["LV_VOLUME"] == pytest.approx(np.count_nonzero(label == 1) * PIXEL**2 * 8 / 1000)
    assert measure_attributes(acdc, (PIXEL, PIXEL, 8.0), {"lv": 3, "myo": 2, "rv": 1}) == pytest.approx(m, nan_ok=True)
    attrs = subject_attributes(label, label, (PIXEL, PIXEL, 8.0), demographics={"AGE": 50.0})
    assert attrs["ED"]["LVEF"] == 0.0 and attrs["ED"]["ESED"] == 1.0 and attrs["ES"]["ESED"] == 0.0
    assert attrs["ED"]["AGE"] == 50.0 and math.isnan(attrs["ED"]["SEX"]) and math.isnan(attrs["ES"]["BMI"])


def test_canonical_orientation_undoes_flips_and_transposes_of_an_oblique_plane():
    """Real short-axis planes are oblique: the stored order still comes back to one array and one box."""
    from scripts.phantom_layouts import STORAGES
    from scripts.prepare import geometry

    rng = np.random.default_rng(0)
    array = rng.random((20, 24, 5)).astype(np.float32)
    a, b = math.radians(25.0), math.radians(-35.0)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([1.6, 1.6, 8.0])
    affine[:3, 3] = (-20.0, 10.0, 35.0)
    outputs = []
    for storage in STORAGES.values():
        stored, stored_affine = geometry.reorient(array, affine, np.array(storage, dtype=float))
        canon, canon_affine = geometry.reorient(stored, stored_affine, geometry.canonical_orientation(stored_affine))
        centre = np.array(canon.shape) / 2.0 - 0.3
        world = canon_affine @ np.array([*centre, 1.0])
        box, box_affine = geometry.lv_box(canon, canon_affine, centre, 1.2, 16, label=False)
        outputs.append((canon, canon_affine, box, box_affine, world))
    for canon, canon_affine, box, box_affine, world in outputs[1:]:
        assert np.array_equal(canon, outputs[0][0]) and np.allclose(canon_affine, outputs[0][1])
        assert np.allclose(world, outputs[0][4]) and np.allclose(box_affine, outputs[0][3])
        assert np.allclose(box, outputs[0][2], atol=1e-5)
    assert np.allclose(geometry.spacing_of(outputs[0][3]), (1.2, 1.2, 8.0))
