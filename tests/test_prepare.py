"""scripts.prepare: dataset layouts in, the stages' cohort layout out (phantom subjects written as ACDC, M&Ms...)."""

from __future__ import annotations

import csv
import gzip
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.data import load_datalist, read_attributes_csv
from scripts.errors import ConfigError, DataError
from scripts.phantom import CohortSpec, generate_cohort, generate_cohorts
from scripts.phantom_layouts import LayoutOptions, subject_name
from scripts.prepare import REASONS, PrepareSpec, prepare_cohort
from scripts.prepare.__main__ import main

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = 3
SIZE = (64, 64)
# the same phantom subjects in every layout; storage order, spacing and field of view differ
LAYOUTS = {
    "bundle": LayoutOptions("bundle"),
    "acdc": LayoutOptions("acdc"),
    "ukbb": LayoutOptions("ukbb", storage="transpose", offset=(16, 4)),
    "mnms": LayoutOptions("mnms", storage="flip", spacing=1.4),  # 4D cines
    "mnms2": LayoutOptions("mnms2", storage="flip_transpose", spacing=2.0),
}
FORMAT = {"bundle": "folder", "acdc": "acdc", "ukbb": "ukbb", "mnms": "mnms", "mnms2": "mnms2"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    specs = [
        CohortSpec(
            root / name, subjects=SUBJECTS, domain="public", seed=2, image_size=SIZE, progress=False, layout=opts
        )
        for name, opts in LAYOUTS.items()
    ]
    generate_cohorts(specs)
    return root


def prepare(sources: Path, name: str, out: Path, **settings) -> dict:
    settings.setdefault("demographics", sources / name / "demographics.csv" if name in ("acdc", "ukbb") else None)
    settings.setdefault("columns", {"id": "eid" if name == "ukbb" else "subject"})
    return prepare_cohort(PrepareSpec(format=FORMAT[name], source=sources / name, out=out, size=64, **settings))


@pytest.fixture(scope="module")
def prepared(sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prepared")
    for name in LAYOUTS:
        report = prepare(sources, name, root / name)
        assert report["included_subjects"] == SUBJECTS and report["excluded"] == [], report["excluded"]
    return {name: root / name for name in LAYOUTS}


def rows(cohort: Path) -> dict[str, dict[str, str]]:
    with open(cohort / "attributes.csv", newline="") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def volume(cohort: Path, kind: str, subject: str, phase: str = "ED") -> nib.Nifti1Image:
    return nib.load(cohort / kind / f"{subject}_{phase}.nii.gz")


def num(text: str) -> float:
    return float(text) if text != "" else math.nan


def test_the_phantom_writes_each_layout(sources):
    assert (sources / "acdc" / "patient001" / "Info.cfg").read_text().startswith("ED: 1\nES: 5\nGroup: ")
    cine = nib.load(sources / "mnms" / "Training" / "Labeled" / "A0000M" / "A0000M_sa_gt.nii.gz")
    assert cine.ndim == 4 and cine.shape[3] == 6
    gt = np.asarray(cine.dataobj)
    assert [bool(gt[..., t].any()) for t in range(6)] == [False, True, False, False, True, False]  # ED 1, ES 4
    acdc_label = np.asarray(nib.load(sources / "acdc" / "patient001" / "patient001_frame01_gt.nii.gz").dataobj)
    bundle_label = np.asarray(nib.load(sources / "bundle" / "labels" / "sub-0000_ED.nii.gz").dataobj)
    assert np.array_equal(acdc_label == 3, bundle_label == 1) and np.array_equal(acdc_label == 1, bundle_label == 3)
    ukbb = nib.load(sources / "ukbb" / "1000000" / "seg_sa_ED.nii.gz")
    assert ukbb.shape[:2] == (80, 80)  # a larger field of view: 16 voxels before X, 4 before Y, square
    assert nib.aff2axcodes(ukbb.affine)[:2] == ("A", "R")  # transposed storage, the affine says so


def test_each_layout_gives_a_cohort_the_stages_read(prepared):
    ranges = dict.fromkeys(ATTRIBUTE_NAMES, (-1000000000.0, 1000000000.0))
    for name, cohort in prepared.items():
        datalist = json.loads((cohort / "datalist.json").read_text())
        subjects = {split: {e["subject"] for e in datalist[split]} for split in ("training", "validation", "test")}
        assert sum(len(s) for s in subjects.values()) == SUBJECTS  # subject-level: no subject in two splits
        assert subjects["training"] and not subjects["training"] & (subjects["validation"] | subjects["test"])
        read_attributes_csv(str(cohort / "attributes.csv"), ranges)
        items = load_datalist(str(cohort / "datalist.json"), "training")
        assert {i["subject"] for i in items} == subjects["training"]
        expected = {subject_name(name, i) for i in range(SUBJECTS)}
        assert {r["subject"] for r in rows(cohort).values()} == expected  # the dataset's own identifiers
        for r in rows(cohort).values():
            image, label = nib.load(cohort / r["image"]), nib.load(cohort / r["label"])
            assert image.shape[:2] == (64, 64) and np.allclose(image.header.get_zooms()[:2], 1.8)
            assert np.allclose(image.affine, label.affine) and set(np.unique(label.dataobj)) <= {0, 1, 2, 3}
        report = json.loads((cohort / "prepare_report.json").read_text())
        assert report["included_subjects"] == SUBJECTS and report["settings"]["format"] == FORMAT[name]


def test_flipped_transposed_and_off_centre_storage_give_the_same_arrays(prepared):
    for i in range(SUBJECTS):
        for phase in ("ED", "ES"):
            ref = {k: volume(prepared["acdc"], k, subject_name("acdc", i), phase) for k in ("images", "labels")}
            for other in ("ukbb", "bundle"):
                got = {k: volume(prepared[other], k, subject_name(other, i), phase) for k in ("images", "labels")}
                for kind in ("images", "labels"):
                    assert np.array_equal(np.asarray(got[kind].dataobj), np.asarray(ref[kind].dataobj)), (other, i)
                    assert np.allclose(got[kind].affine, ref[kind].affine, atol=1e-4)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def test_layouts_with_other_spacings_agree_on_anatomy_and_attributes(prepared, sources):
    """The acceptance check: ACDC, M&Ms (4D, flipped, 1.4 mm) and M&Ms-2 (flipped + transposed, 2.0 mm)."""
    truth = rows(sources / "bundle")
    acdc = rows(prepared["acdc"])
    worst: dict[str, float] = {}
    for name in ("mnms", "mnms2"):
        other = rows(prepared[name])
        for i in range(SUBJECTS):
            a, b = acdc[f"{subject_name('acdc', i)}_ED"], other[f"{subject_name(name, i)}_ED"]
            for key in ("LVEDV", "LVESV", "RVEDV", "RVESV", "MYOEDTHICK", "MYOESTHICK"):
                worst[key] = max(worst.get(key, 0.0), abs(num(b[key]) / num(a[key]) - 1))
            for key in ("LVEF", "RVEF", "ANGLE"):
                worst[key] = max(worst.get(key, 0.0), abs(num(b[key]) - num(a[key])))
            assert a["DEPTH"] == b["DEPTH"]
            for phase in ("ED", "ES"):
                la = np.asarray(volume(prepared["acdc"], "labels", subject_name("acdc", i), phase).dataobj)
                lb = np.asarray(volume(prepared[name], "labels", subject_name(name, i), phase).dataobj)
                assert min(dice(la == c, lb == c) for c in (1, 2, 3)) > 0.85, (name, i, phase)
    print("worst disagreement with ACDC (relative for volumes / thickness, points for EF, degrees for ANGLE):", worst)
    assert max(worst[k] for k in ("LVEDV", "LVESV", "RVEDV", "RVESV")) < 0.05
    assert max(worst["MYOEDTHICK"], worst["MYOESTHICK"]) < 0.06
    assert max(worst["LVEF"], worst["RVEF"]) < 2.0 and worst["ANGLE"] < 2.0
    for i in range(SUBJECTS):  # volumes at the source resolution: the phantom's own numbers
        a, t = acdc[f"{subject_name('acdc', i)}_ED"], truth[f"sub-{i:04d}_ED"]
        for key in ("LVEDV", "LVESV", "RVEDV", "RVESV", "MYOEDTHICK", "MYOESTHICK", "DEPTH"):
            assert num(a[key]) == pytest.approx(num(t[key]), rel=1e-3), key
        # measured vs drawn: the RV crescent is skewed, its centroid off the drawn axis (sd 6.5 degrees)
        assert num(a["ANGLE"]) == pytest.approx(num(t["ANGLE"]), abs=15.0)


def test_another_output_spacing_changes_the_grid_not_the_attributes(prepared, sources, tmp_path):
    prepare_cohort(PrepareSpec(format="acdc", source=sources / "acdc", out=tmp_path / "fine", spacing=1.2, size=80))
    label = volume(tmp_path / "fine", "labels", "patient001")
    assert label.shape[:2] == (80, 80) and np.allclose(label.header.get_zooms()[:2], 1.2)
    coarse, fine = rows(prepared["acdc"]), rows(tmp_path / "fine")
    for vid, row in fine.items():
        for key in ("LVEDV", "RVESV", "MYOEDTHICK", "ANGLE", "DEPTH"):
            assert row[key] == coarse[vid][key]


def test_demographics_come_from_the_dataset_and_are_never_imputed(prepared, sources, tmp_path):
    truth = rows(sources / "bundle")
    prepare(sources, "acdc", tmp_path / "acdc", demographics=None)  # ACDC itself: BMI only
    prepare(sources, "ukbb", tmp_path / "ukbb", demographics=None)
    plain, ukbb, bare = rows(tmp_path / "acdc"), rows(prepared["ukbb"]), rows(tmp_path / "ukbb")
    for i in range(SUBJECTS):
        t = truth[f"sub-{i:04d}_ED"]
        a, u, b = plain[f"patient{i + 1:03d}_ED"], ukbb[f"{1000000 + i}_ED"], bare[f"{1000000 + i}_ED"]
        assert a["AGE"] == "" and a["SEX"] == ""
        assert (a["BMI"] == "") == (t["BMI"] == "")
        if t["BMI"]:
            assert num(a["BMI"]) == pytest.approx(num(t["BMI"]), rel=5e-3)  # from Height and Weight
        for key in ("AGE", "SEX", "BMI"):
            assert u[key] == t[key] and b[key] == ""


def _break_acdc(sources: Path, root: Path) -> dict[str, str]:
    """Copies of patient001, each broken one way; returns {patient: expected reason}."""
    root.mkdir()
    good = sources / "acdc" / "patient001"
    expected = {}

    def copy(pid: str, reason: str | None) -> Path:
        folder = root / pid
        shutil.copytree(good, folder)
        for path in folder.iterdir():
            path.rename(folder / path.name.replace("patient001", pid))
        if reason:
            expected[pid] = reason
        return folder

    def edit(path: Path, change) -> None:
        img = nib.load(path)
        data, affine = change(np.asarray(img.dataobj).copy(), img.affine.copy())
        nib.save(nib.Nifti1Image(data, affine), path)

    copy("patient001", None)
    (copy("patient101", "missing_metadata") / "Info.cfg").unlink()
    (copy("patient102", "missing_image") / "patient102_frame05.nii.gz").unlink()
    (copy("patient103", "missing_label") / "patient103_frame01_gt.nii.gz").unlink()
    f = copy("patient104", "unreadable_file") / "patient104_frame05_gt.nii.gz"
    f.write_bytes(f.read_bytes()[:200])
    f = copy("patient105", "frame_out_of_range") / "Info.cfg"
    f.write_text(f.read_text().replace("ES: 5", "ES: 9"))
    edit(copy("patient106", "shape_mismatch") / "patient106_frame01_gt.nii.gz", lambda d, a: (d[:-2], a))
    edit(copy("patient107", "affine_mismatch") / "patient107_frame05_gt.nii.gz", lambda d, a: (d, a + _shift()))
    edit(
        copy("patient108", "unknown_label_value") / "patient108_frame05_gt.nii.gz",
        lambda d, a: (np.where(d == 2, 7, d).astype(d.dtype), a),
    )
    edit(copy("patient109", "empty_label") / "patient109_frame05_gt.nii.gz", lambda d, a: (np.zeros_like(d), a))
    edit(
        copy("patient110", "no_lv_at_ed") / "patient110_frame01_gt.nii.gz",
        lambda d, a: (np.where(d == 3, 2, d).astype(d.dtype), a),
    )
    f = copy("patient111", "esv_above_edv") / "Info.cfg"
    f.write_text(f.read_text().replace("ED: 1\nES: 5", "ED: 5\nES: 1"))
    return expected


def _shift() -> np.ndarray:
    out = np.zeros((4, 4))
    out[0, 3] = 5.0  # 5 mm off
    return out


def test_every_exclusion_reason_is_named_and_the_rest_is_kept(sources, tmp_path, caplog):
    expected = _break_acdc(sources, tmp_path / "broken")
    assert set(expected.values()) == set(REASONS)  # every reason is exercised
    report = prepare_cohort(PrepareSpec(format="acdc", source=tmp_path / "broken", out=tmp_path / "out", size=64))
    assert [s["subject"] for s in report["included"]] == ["patient001"]
    assert {e["subject"]: e["reason"] for e in report["excluded"]} == expected
    on_disk = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert on_disk["exclusion_reasons"] == dict.fromkeys(REASONS, 1)
    assert all(f"excluded {pid}" in caplog.text and reason in caplog.text for pid, reason in expected.items())
    # worker processes give the same cohort, byte for byte
    prepare_cohort(
        PrepareSpec(format="acdc", source=tmp_path / "broken", out=tmp_path / "parallel", size=64, num_workers=2)
    )
    for path in sorted((tmp_path / "out").rglob("*.*")):
        if path.name != "prepare_report.json":  # it names its own output folder
            assert path.read_bytes() == (tmp_path / "parallel" / path.relative_to(tmp_path / "out")).read_bytes()
    before = (tmp_path / "out" / "datalist.json").read_bytes()
    with pytest.raises(DataError, match="--strict: 11 subject"):
        prepare_cohort(
            PrepareSpec(format="acdc", source=tmp_path / "broken", out=tmp_path / "out", strict=True, overwrite=True)
        )
    assert (tmp_path / "out" / "datalist.json").read_bytes() == before  # a failed run keeps the earlier cohort
    assert not list(tmp_path.glob(".out.*"))  # and leaves no staging folder


def test_a_frame_outside_the_cine_is_excluded(sources, tmp_path):
    shutil.copytree(sources / "mnms", tmp_path / "mnms")
    info = tmp_path / "mnms" / "mnms_dataset_info.csv"
    text = info.read_text().splitlines()
    text[1] = text[1].replace(",1,4,", ",1,6,")  # ES frame 6 of a 6-frame cine (0-based)
    info.write_text("\n".join(text) + "\n")
    report = prepare_cohort(PrepareSpec(format="mnms", source=tmp_path / "mnms", out=tmp_path / "out", size=64))
    assert [(e["subject"], e["reason"]) for e in report["excluded"]] == [("A0000M", "frame_out_of_range")]
    assert report["included_subjects"] == SUBJECTS - 1


def test_an_empty_result_is_an_error_naming_the_source(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["--format", "ukbb", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert code == 2 and f"--source {tmp_path / 'empty'}: no usable ukbb subject" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--spacing"):
        PrepareSpec(format="acdc", source=tmp_path, out=tmp_path / "x", spacing="fine")
    with pytest.raises(ConfigError, match="--labels"):
        PrepareSpec(format="folder", source=tmp_path, out=tmp_path / "x", labels="lv=1,myo=1,rv=3")


def test_folder_layout_with_other_codes_and_a_gzip_check(sources, tmp_path):
    """The folder layout reads any name pattern and label codes (--labels)."""
    src = tmp_path / "mine"
    for i in range(SUBJECTS):
        for phase in ("ED", "ES"):
            for kind, suffix in (("images", ""), ("labels", "_seg")):
                img = nib.load(sources / "bundle" / kind / f"sub-{i:04d}_{phase}.nii.gz")
                data = np.asarray(img.dataobj)
                if kind == "labels":
                    data = np.select([data == 1, data == 2, data == 3], [10, 20, 30], 0).astype(np.uint8)
                (src / f"case{i}").mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(data, img.affine), src / f"case{i}" / f"{phase}{suffix}.nii.gz")
    spec = PrepareSpec(
        format="folder",
        source=src,
        out=tmp_path / "out",
        size=64,
        labels="lv=10,myo=20,rv=30",
        image_pattern="{subject}/{phase}.nii.gz",
        label_pattern="{subject}/{phase}_seg.nii.gz",
    )
    report = prepare_cohort(spec)
    assert [s["subject"] for s in report["included"]] == ["case0", "case1", "case2"]
    assert gzip.open(tmp_path / "out" / "labels" / "case0_ED.nii.gz").read(4)  # a gzipped NIfTI
    bundle = rows(sources / "bundle")
    for i in range(SUBJECTS):
        assert rows(tmp_path / "out")[f"case{i}_ED"]["LVEDV"] == bundle[f"sub-{i:04d}_ED"]["LVEDV"]


def test_the_demo_writes_acdc_and_ukbb_and_reads_them_back(tmp_path, monkeypatch):
    """The demo's first steps (phantom in the dataset layouts, then prepare) run as the demo runs them."""
    from tools.demo import demo_steps, run_steps

    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    steps = [s for s in demo_steps(public_subjects=3, private_subjects=3) if s.needs in ((), ("phantom cohorts",))]
    assert [s.name for s in steps] == ["phantom cohorts", "prepare: public", "prepare: private"]
    steps[0].argv[steps[0].argv.index("--public_cohort#num_workers") + 1] = "1"
    steps[0].argv[steps[0].argv.index("--private_cohort#num_workers") + 1] = "1"
    assert run_steps(steps, str(tmp_path / "times.tsv")) == 0
    assert (tmp_path / "data" / "source" / "acdc" / "patient001" / "Info.cfg").is_file()
    assert (tmp_path / "data" / "source" / "ukbb" / "1000000" / "seg_sa_ES.nii.gz").is_file()
    # the same subjects straight from the phantom: same voxels (the box only moves), same attributes but ANGLE
    for domain, seed, fmt in (("public", 0, "acdc"), ("private", 1, "ukbb")):
        direct = tmp_path / f"direct_{domain}"
        generate_cohort(direct, subjects=3, domain=domain, seed=seed, progress=False)
        got, want = rows(tmp_path / "data" / domain), rows(direct)
        for i in range(3):
            for phase in ("ED", "ES"):
                g, w = got[f"{subject_name(fmt, i)}_{phase}"], want[f"sub-{i:04d}_{phase}"]
                assert all(g[n] == w[n] for n in ATTRIBUTE_NAMES if n != "ANGLE"), (domain, i, phase)
                assert abs(num(g["ANGLE"]) - num(w["ANGLE"])) < 15.0  # measured vs drawn
                for kind in ("images", "labels"):
                    a = nib.load(tmp_path / "data" / domain / kind / f"{subject_name(fmt, i)}_{phase}.nii.gz")
                    b = nib.load(direct / kind / f"sub-{i:04d}_{phase}.nii.gz")
                    dx, dy = np.rint((np.linalg.inv(b.affine) @ a.affine)[:2, 3]).astype(int)
                    pa, pb = np.asarray(a.dataobj), np.asarray(b.dataobj)
                    assert pa.shape == pb.shape == (112, 112, pb.shape[2])
                    # prepared voxel (i, j) is the phantom's (i + dx, j + dy); compare where both exist
                    i0, i1, j0, j1 = max(0, -dx), min(112, 112 - dx), max(0, -dy), min(112, 112 - dy)
                    assert np.array_equal(pa[i0:i1, j0:j1], pb[i0 + dx : i1 + dx, j0 + dy : j1 + dy])
