"""The classical LV detector (scripts/evaluation/lv_detector.py) against phantom label maps.

It must find the LV in the phantoms at the demo crop and measure the blood pool as the label
maps do, and must NOT find one in noise, a constant image, a blurred blob (alone or inside a
grey disc, which is what a blurry reconstruction looks like) or a phantom blurred beyond
recognition: a negative control, so "LV found" cannot pass by construction.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scripts.evaluation.lv_detector import detect_lv, detect_many, otsu_threshold
from scripts.evaluation.volumes import to_network_layout
from scripts.phantom import LABELS, synthesize_subject

DEMO_SIZE = (16, 64, 64)  # the demo's crop (D, H, W)
SPACING = (1.8, 1.8, 10.0)


def _phantoms(domain: str, subjects: int, size=DEMO_SIZE):
    images, labels, spacing = [], [], []
    for i in range(subjects):
        r = synthesize_subject(3, domain, i)
        for phase in ("ED", "ES"):
            images.append(to_network_layout(r["images"][phase], size))
            labels.append(to_network_layout(r["labels"][phase], size, is_label=True))
            spacing.append(r["spacing"])
    return np.stack(images), np.stack(labels), np.asarray(spacing)


def test_otsu_threshold_splits_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.2, 0.03, 500), rng.normal(0.8, 0.03, 300)])
    assert 0.35 < otsu_threshold(values) < 0.65
    assert otsu_threshold(np.full(10, 0.5)) == 0.5


@pytest.mark.parametrize("domain", ["public", "private"])
def test_finds_the_lv_and_its_volume_in_phantoms(domain):
    images, labels, spacing = _phantoms(domain, 8)
    found = detect_many(images, spacing)
    rate = np.mean([d.found for d in found])
    assert rate >= 0.9, f"{domain}: LV found in {rate:.0%} of the phantoms"
    measured = np.array([d.volume_ml for d in found if d.found])
    truth = np.array(
        [(lab == LABELS["lv"]).sum() * np.prod(sp) / 1000.0 for lab, sp, d in zip(labels, spacing, found) if d.found]
    )
    r = np.corrcoef(measured, truth)[0, 1]
    assert r >= 0.9, f"{domain}: volume r = {r:.3f} vs the label maps"
    assert 0.8 < np.median(measured / truth) < 1.2
    # the track lies where the label map has its LV
    for d, lab in zip(found, labels):
        if d.found:
            z = d.slices[len(d.slices) // 2]
            i, j = (int(round(c)) for c in d.centroids[len(d.slices) // 2])
            assert lab[z, i, j] == LABELS["lv"]


def test_finds_no_lv_in_negative_controls():
    rng = np.random.default_rng(1)
    d, h, w = DEMO_SIZE
    zz, ii, jj = np.mgrid[:d, :h, :w]
    blob = ((((ii - h / 2) / 12) ** 2 + ((jj - w / 2) / 10) ** 2 + ((zz - d / 2) / 4) ** 2) <= 1).astype(np.float32)
    disc = ((((ii - h / 2) / 22) ** 2 + ((jj - w / 2) / 22) ** 2) <= 1).astype(np.float32)
    phantom = _phantoms("private", 1)[0][0]
    controls = {
        "uniform noise": rng.random(DEMO_SIZE).astype(np.float32),
        "constant": np.full(DEMO_SIZE, 0.5, np.float32),
        "zeros": np.zeros(DEMO_SIZE, np.float32),
    }
    for sigma in (2.0, 3.0):  # in-plane voxels (3.6 and 5.4 mm)
        controls[f"blurred blob {sigma}"] = ndimage.gaussian_filter(blob, (0.5, sigma, sigma))
        grey = ndimage.gaussian_filter(0.4 * disc + 0.6 * blob, (0.5, sigma, sigma))
        controls[f"blob in a grey disc {sigma}"] = grey + 0.02 * rng.standard_normal(DEMO_SIZE).astype(np.float32)
    controls["phantom blurred 3 voxels"] = ndimage.gaussian_filter(phantom, (0.0, 3.0, 3.0))
    for name, volume in controls.items():
        result = detect_lv(volume, SPACING)
        assert not result.found, f"{name}: the detector found an LV ({result.volume_ml:.1f} ml, slices {result.slices})"
        assert result.volume_ml == 0.0
    # ... while the same phantom, unblurred, is found
    assert detect_lv(phantom, SPACING).found


def test_a_vessel_and_its_first_slices_are_no_lv():
    """A bright tube of constant cross-section in a dark wall (the descending aorta) is no LV, nor
    is its first few slices (each prefix of a track is a track, shorter than the tube test looks at)."""
    d, h, w = DEMO_SIZE
    r = np.hypot(*(np.mgrid[:h, :w] - np.array([h / 2, w / 2])[:, None, None])) * SPACING[0]  # mm
    tube = np.full(DEMO_SIZE, 0.5, np.float32)
    tube[4:12][:, r < 26.0] = 0.1
    tube[4:12][:, r < 18.0] = 0.9
    result = detect_lv(tube, SPACING)
    assert not result.found, f"a tube found as an LV: {result.volume_ml:.1f} ml, slices {result.slices}"
    # the same pool tapering towards an apex is a ventricle
    ventricle = np.full(DEMO_SIZE, 0.5, np.float32)
    for z, t in enumerate((1.0, 1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5), start=4):
        ventricle[z][r < 18.0 * t + 8.0] = 0.1
        ventricle[z][r < 18.0 * t] = 0.9
    assert detect_lv(ventricle, SPACING).slices == list(range(4, 12))


def test_rejects_a_volume_of_the_wrong_rank():
    with pytest.raises(ValueError, match="D, H, W"):
        detect_lv(np.zeros((64, 64)), SPACING)
