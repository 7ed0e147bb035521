"""Tests of the synthetic phantom cohort generator (scripts/phantom.py)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.phantom import (
    LABELS,
    CohortSpec,
    generate_cohort,
    generate_cohorts,
    measure_attributes,
    phase_pair_attributes,
    sample_subject,
    split_subjects,
)

REPO = Path(__file__).resolve().parents[1]
N_SUBJECTS = 6
SUBJECT_ATTRIBUTES = [n for n in ATTRIBUTE_NAMES if n not in ("ESED", "DEPTH")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phantom")
    runs = {
        "public": ("public", 0),
        "public_again": ("public", 0),
        "public_seed1": ("public", 1),
        "private": ("private", 0),
    }
    out = {}
    for name, (domain, seed) in runs.items():
        out[name] = root / name
        summary = generate_cohort(out[name], subjects=N_SUBJECTS, domain=domain, seed=seed, progress=False)
        assert summary["subjects"] == N_SUBJECTS and summary["volumes"] == 2 * N_SUBJECTS
    return out


def read_rows(cohort: Path) -> list[dict[str, str]]:
    with open(cohort / "attributes.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def value(row: dict[str, str], name: str) -> float:
    return float(row[name]) if row[name] != "" else math.nan


def all_files(cohort: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cohort)): p.read_bytes() for p in sorted(cohort.rglob("*")) if p.is_file()}


def test_csv_columns_and_rows(runs):
    with open(runs["public"] / "attributes.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["id", "subject", "phase", "image", "label", *ATTRIBUTE_NAMES]
    rows = read_rows(runs["public"])
    assert [r["id"] for r in rows] == [f"sub-{i:04d}_{ph}" for i in range(N_SUBJECTS) for ph in ("ED", "ES")]
    for r in rows:
        assert r["id"] == f"{r['subject']}_{r['phase']}"
        assert r["image"] == f"images/{r['id']}.nii.gz" and r["label"] == f"labels/{r['id']}.nii.gz"


def test_volumes_dtypes_and_affine(runs):
    for name, (lo_z, hi_z) in (("public", (9.0, 10.0)), ("private", (10.0, 10.0))):
        cohort = runs[name]
        for r in read_rows(cohort):
            image = nib.load(cohort / r["image"])
            label = nib.load(cohort / r["label"])
            assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
            img = np.asarray(image.dataobj)
            lab = np.asarray(label.dataobj)
            assert img.dtype == np.float32 and lab.dtype == np.uint8
            assert img.shape == lab.shape and img.shape[:2] == (112, 112) and 10 <= img.shape[2] <= 16
            assert set(np.unique(lab)) <= set(LABELS.values())
            assert np.isfinite(img).all() and img.min() >= 0 and img.max() > 0
            np.testing.assert_array_equal(image.affine, label.affine)
            affine = image.affine
            np.testing.assert_allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3])))
            sx, sy, sz = image.header.get_zooms()
            assert 1.7 <= sx <= 1.95 and 1.7 <= sy <= 1.95 and lo_z <= sz <= hi_z
            np.testing.assert_allclose(np.diag(affine)[:3], (sx, sy, sz), rtol=1e-6)
            assert image.header["sform_code"] == 1 and image.header["qform_code"] == 1
        # both phases of a subject share the grid
        ed, es = nib.load(cohort / "images/sub-0000_ED.nii.gz"), nib.load(cohort / "images/sub-0000_ES.nii.gz")
        assert ed.shape == es.shape
        np.testing.assert_array_equal(ed.affine, es.affine)


def test_attributes_are_measured_from_labels(runs):
    for name in ("public", "private"):
        cohort = runs[name]
        rows = {r["id"]: r for r in read_rows(cohort)}
        for i in range(N_SUBJECTS):
            ed, es = rows[f"sub-{i:04d}_ED"], rows[f"sub-{i:04d}_ES"]
            labels, zooms = {}, {}
            for phase, row in (("ED", ed), ("ES", es)):
                img = nib.load(cohort / row["label"])
                labels[phase], zooms[phase] = np.asarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms())
            voxel_ml = {ph: np.prod(zooms[ph]) / 1000.0 for ph in labels}
            # independent volume computation: voxel count x voxel volume from the header
            expected = {
                "LVEDV": np.count_nonzero(labels["ED"] == 1) * voxel_ml["ED"],
                "LVESV": np.count_nonzero(labels["ES"] == 1) * voxel_ml["ES"],
                "RVEDV": np.count_nonzero(labels["ED"] == 3) * voxel_ml["ED"],
                "RVESV": np.count_nonzero(labels["ES"] == 3) * voxel_ml["ES"],
                "MYOEDTHICK": measure_attributes(labels["ED"], zooms["ED"])["MYO_THICKNESS"],
                "MYOESTHICK": measure_attributes(labels["ES"], zooms["ES"])["MYO_THICKNESS"],
            }
            for row in (ed, es):
                for key, want in expected.items():
                    assert want > 0
                    assert value(row, key) == pytest.approx(want, rel=5e-3), (row["id"], key)
                for key in ("LV", "RV"):
                    edv, esv = value(row, f"{key}EDV"), value(row, f"{key}ESV")
                    assert esv < edv
                    assert value(row, f"{key}EF") == pytest.approx(100.0 * (edv - esv) / edv, abs=0.05)
                assert value(row, "MYOESTHICK") > value(row, "MYOEDTHICK")  # systolic thickening
            for phase, row in (("ED", ed), ("ES", es)):
                depth = int(np.count_nonzero(labels[phase].reshape(-1, labels[phase].shape[2]).any(axis=0)))
                assert value(row, "DEPTH") == depth and 5 <= depth <= 13
                assert value(row, "ESED") == (1.0 if phase == "ED" else 0.0)
            for key in SUBJECT_ATTRIBUTES:  # subject-level attributes are shared by both phases
                assert ed[key] == es[key], key
            assert -45.0 <= value(ed, "ANGLE") <= 45.0
            # myocardial volume roughly conserved between ED and ES
            myo = {ph: np.count_nonzero(labels[ph] == 2) * voxel_ml[ph] for ph in labels}
            assert myo["ES"] == pytest.approx(myo["ED"], rel=0.2)


def test_measure_attributes_known_geometry():
    label = np.zeros((64, 64, 8), dtype=np.uint8)
    x, y = np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5, indexing="ij")
    r = np.hypot(x, y)
    for k in range(1, 6):
        label[..., k][r < 25] = LABELS["myo"]
        label[..., k][r < 20] = LABELS["lv"]
        label[..., k][(x < -26) & (np.abs(y) < 5)] = LABELS["rv"]
    spacing = (1.5, 1.5, 10.0)
    m = measure_attributes(label, spacing)
    assert m["LV_VOLUME"] == pytest.approx(np.count_nonzero(label == 1) * 1.5 * 1.5 * 10.0 / 1000.0)
    assert m["RV_VOLUME"] == pytest.approx(np.count_nonzero(label == 3) * 1.5 * 1.5 * 10.0 / 1000.0)
    assert m["MYO_THICKNESS"] == pytest.approx(5 * 1.5, rel=0.05)  # boundary distances of a pixelated ring
    assert m["DEPTH"] == 5
    empty = measure_attributes(np.zeros((8, 8, 3), dtype=np.uint8), spacing)
    assert empty["LV_VOLUME"] == 0 and empty["DEPTH"] == 0 and math.isnan(empty["MYO_THICKNESS"])
    pair = phase_pair_attributes(
        {"LV_VOLUME": 100.0, "RV_VOLUME": 120.0, "MYO_THICKNESS": 8.0},
        {"LV_VOLUME": 40.0, "RV_VOLUME": 60.0, "MYO_THICKNESS": 12.0},
    )
    assert pair == {
        "LVEDV": 100.0, "LVESV": 40.0, "LVEF": 60.0, "RVEDV": 120.0, "RVESV": 60.0, "RVEF": 50.0,
        "MYOESTHICK": 12.0, "MYOEDTHICK": 8.0,
    }  # fmt: skip
    with pytest.raises(ValueError, match="label"):
        measure_attributes(np.zeros((8, 8)), spacing)


def test_same_seed_same_bytes(runs):
    first, again = all_files(runs["public"]), all_files(runs["public_again"])
    assert first.keys() == again.keys()
    assert len([k for k in first if k.endswith(".nii.gz")]) == 4 * N_SUBJECTS
    for key in first:
        assert first[key] == again[key], key
        if key.endswith(".gz"):
            assert first[key][4:8] == b"\x00\x00\x00\x00"  # gzip mtime
    assert not any(Path(k).name.startswith(".") for k in first)  # no temporary files left


def test_different_seed_differs(runs):
    first, other = all_files(runs["public"]), all_files(runs["public_seed1"])
    assert first.keys() == other.keys()
    volumes = [k for k in first if k.endswith(".nii.gz")]
    assert all(first[k] != other[k] for k in volumes if k.startswith("images/"))
    assert first["attributes.csv"] != other["attributes.csv"]


def test_subject_independent_of_cohort_size(runs, tmp_path):
    generate_cohort(tmp_path / "small", subjects=2, domain="public", seed=0, progress=False)
    for phase in ("ED", "ES"):
        for kind in ("images", "labels"):
            rel = f"{kind}/sub-0001_{phase}.nii.gz"
            assert (tmp_path / "small" / rel).read_bytes() == (runs["public"] / rel).read_bytes()


def _blood_stats(cohort: Path) -> tuple[list[float], list[float]]:
    """Per ED volume: relative noise in the LV blood pool and myocardium / blood contrast."""
    noise, contrast = [], []
    for r in read_rows(cohort):
        if r["phase"] != "ED":
            continue
        img = np.asarray(nib.load(cohort / r["image"]).dataobj, dtype=np.float64)
        lab = np.asarray(nib.load(cohort / r["label"]).dataobj)
        core = ndimage.binary_erosion(lab == 1, np.ones((5, 5, 1), bool))  # away from partial volume
        pairs = core[:-1] & core[1:]  # neighbours along X, both in the blood pool
        diff = img[1:][pairs] - img[:-1][pairs]
        blood = np.median(img[core])
        mad = np.median(np.abs(diff - np.median(diff)))  # robust to papillary muscles
        noise.append(1.4826 * mad / math.sqrt(2.0) / blood)
        contrast.append(np.median(img[lab == 2]) / blood)
    return noise, contrast


def test_domains_differ_in_appearance(runs):
    pub_noise, pub_contrast = _blood_stats(runs["public"])
    priv_noise, priv_contrast = _blood_stats(runs["private"])
    assert max(priv_noise) < min(pub_noise)
    assert np.mean(priv_contrast) < np.mean(pub_contrast)


def test_domains_differ_in_attributes(runs):
    public = [sample_subject(0, "public", i) for i in range(200)]
    private = [sample_subject(0, "private", i) for i in range(200)]
    assert all(45.0 <= s.age <= 80.0 for s in private)
    assert not any(s.demographics_missing for s in private)
    assert 0.1 <= np.mean([s.demographics_missing for s in public]) <= 0.4
    assert min(s.age for s in public) < 40.0 and max(s.age for s in public) > 80.0
    assert {s.group for s in public} == {"NOR", "DCM", "HCM", "MINF"}
    assert np.mean([s.group == "NOR" for s in private]) > 0.8
    # heart size grows with body surface area
    nor = [s for s in private if s.group == "NOR"]
    assert np.corrcoef([s.bsa for s in nor], [s.target["LVEDV"] for s in nor])[0, 1] > 0.3
    # the written runs: private complete, public ejection fractions spread wider
    for r in read_rows(runs["private"]):
        assert all(r[n] != "" for n in ATTRIBUTE_NAMES)
    pub_ef = [value(r, "LVEF") for r in read_rows(runs["public"])]
    priv_ef = [value(r, "LVEF") for r in read_rows(runs["private"])]
    assert np.std(pub_ef) > np.std(priv_ef)


def test_datalist_splits(runs):
    for name in ("public", "private"):
        cohort = runs[name]
        datalist = json.loads((cohort / "datalist.json").read_text())
        assert datalist["domain"] == name and datalist["seed"] == 0
        assert datalist["attributes_csv"] == "attributes.csv"
        rows = {r["id"]: r for r in read_rows(cohort)}
        subjects_of = {}
        for split in ("training", "validation", "test"):
            assert datalist[split], split  # 6 subjects: every split non-empty
            subjects_of[split] = {e["subject"] for e in datalist[split]}
            for entry in datalist[split]:
                assert set(entry) == {"id", "subject", "image", "label"}
                assert entry["image"] == rows[entry["id"]]["image"] and entry["label"] == rows[entry["id"]]["label"]
                assert (cohort / entry["image"]).is_file() and (cohort / entry["label"]).is_file()
            ids = {e["id"] for e in datalist[split]}
            assert ids == {f"{s}_{ph}" for s in subjects_of[split] for ph in ("ED", "ES")}  # both phases
        tr, va, te = subjects_of["training"], subjects_of["validation"], subjects_of["test"]
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert tr | va | te == {r["subject"] for r in rows.values()}
        with open(cohort / "subjects.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                assert r["subject"] in subjects_of[r["split"]] and r["domain"] == name


@pytest.mark.parametrize(
    "n, fractions, sizes",
    [
        (1, (0.7, 0.15, 0.15), (1, 0, 0)),
        (2, (0.7, 0.15, 0.15), (2, 0, 0)),
        (3, (0.7, 0.15, 0.15), (1, 1, 1)),
        (100, (0.7, 0.15, 0.15), (70, 15, 15)),
        (10, (0.8, 0.2, 0.0), (8, 2, 0)),
        (10, (1.0, 0.0, 0.0), (10, 0, 0)),
    ],
)
def test_split_sizes(n, fractions, sizes):
    ids = [f"sub-{i:04d}" for i in range(n)]
    splits = split_subjects(ids, fractions, seed=3)
    assert tuple(len(splits[k]) for k in ("training", "validation", "test")) == sizes
    assert sorted(s for part in splits.values() for s in part) == ids
    assert split_subjects(ids, fractions, seed=3) == splits


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="domain must be one of 'public', 'private'"):
        generate_cohort(tmp_path / "a", subjects=2, domain="foo")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="subjects must be an integer >= 1"):
            generate_cohort(tmp_path / "a", subjects=bad)
    with pytest.raises(ValueError, match="seed"):
        generate_cohort(tmp_path / "a", subjects=1, seed=-1)
    with pytest.raises(ValueError, match="split_fractions"):
        generate_cohort(tmp_path / "a", subjects=1, split_fractions=(0.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="image_size"):
        generate_cohort(tmp_path / "a", subjects=1, image_size=(16, 16))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "note.txt").write_text("keep")
    with pytest.raises(ValueError, match="out_dir .* not empty.*overwrite=True"):
        generate_cohort(busy, subjects=1, progress=False)
    assert not (busy / "images").exists()


def test_overwrite_replaces_previous_cohort(tmp_path):
    out = tmp_path / "cohort"
    generate_cohort(out, subjects=3, domain="private", seed=2, progress=False)
    summary = generate_cohort(
        out, subjects=1, domain="private", seed=2, overwrite=True, image_size=(64, 64), progress=False
    )
    assert sorted(p.name for p in (out / "images").iterdir()) == ["sub-0000_ED.nii.gz", "sub-0000_ES.nii.gz"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == ["sub-0000_ED.nii.gz", "sub-0000_ES.nii.gz"]
    assert nib.load(out / "images/sub-0000_ED.nii.gz").shape[:2] == (64, 64)
    datalist = json.loads((out / "datalist.json").read_text())
    assert [e["id"] for e in datalist["training"]] == ["sub-0000_ED", "sub-0000_ES"]
    assert summary["splits"] == {"training": 1, "validation": 0, "test": 0}
    assert summary["attributes"]["LVEDV"]["min"] > 0


def test_workers_give_identical_files(tmp_path):
    generate_cohort(tmp_path / "serial", subjects=3, domain="private", seed=4, progress=False)
    generate_cohort(tmp_path / "parallel", subjects=3, domain="private", seed=4, num_workers=2, progress=False)
    assert all_files(tmp_path / "serial") == all_files(tmp_path / "parallel")


def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "scripts.phantom", "--out", str(out), "--subjects", "3", "--domain", "private"]
    done = subprocess.run(cmd + ["--seed", "1"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["subjects"] == 3 and summary["volumes"] == 6 and summary["domain"] == "private"
    assert len(read_rows(out)) == 6 and (out / "datalist.json").is_file()

    bad = subprocess.run(
        [sys.executable, "-m", "scripts.phantom", "--out", str(tmp_path / "bad"), "--subjects", "3", "--domain", "foo"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert bad.returncode != 0
    assert "domain must be one of 'public', 'private'; got 'foo'" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_failed_run_replaces_nothing(tmp_path, monkeypatch):
    """A bad argument of the second cohort stops the run before the first is touched; a failure while
    generating leaves every earlier cohort as it was, and no staging folder behind."""
    import scripts.phantom

    public, private = tmp_path / "data" / "public", tmp_path / "data" / "private"
    generate_cohort(public, subjects=1, domain="public", seed=0, image_size=(64, 64), progress=False)
    before = all_files(public)
    with pytest.raises(ValueError, match=r"private cohort .*: subjects must be an integer >= 1 .*got 'abc'"):
        generate_cohorts(
            [
                CohortSpec(public, subjects=2, domain="public", overwrite=True, progress=False),
                CohortSpec(private, subjects="abc", domain="private", overwrite=True, progress=False),
            ]
        )
    assert all_files(public) == before and not private.exists()

    real = scripts.phantom._write_subject

    def fail_on_private(job):
        if job[2] == "private":
            raise RuntimeError("disk full")
        return real(job)

    monkeypatch.setattr(scripts.phantom, "_write_subject", fail_on_private)
    specs = [
        CohortSpec(public, subjects=2, domain="public", image_size=(64, 64), overwrite=True, progress=False),
        CohortSpec(private, subjects=1, domain="private", image_size=(64, 64), overwrite=True, progress=False),
    ]
    with pytest.raises(RuntimeError, match="disk full"):
        generate_cohorts(specs)
    assert all_files(public) == before  # rendered, but not swapped in
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["public"]  # staging folders removed


def test_bundle_phantom_with_bad_argument_keeps_data(tmp_path, bundle):
    """configs/phantom.yaml --private_subjects abc replaced data/public before failing; now it fails first."""
    public = tmp_path / "public"
    generate_cohort(public, subjects=1, domain="public", seed=0, image_size=(64, 64), progress=False)
    (tmp_path / ".public.0badcafe.part").mkdir()  # a staging folder of a killed run
    before = all_files(public)
    proc = bundle(
        "run",
        "--config_file",
        "['configs/common.yaml','configs/phantom.yaml']",
        "--public_dir",
        str(public),
        "--private_dir",
        str(tmp_path / "private"),
        "--public_subjects",
        "1",
        "--private_subjects",
        "abc",
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: private cohort (")
    assert "subjects must be an integer >= 1 (number of subjects); got 'abc'" in proc.stderr
    assert all_files(public) == before and not (tmp_path / "private").exists()
    assert (tmp_path / ".public.0badcafe.part").exists()  # nothing ran: not even the clean-up


def test_overwrite_keeps_other_files_and_cleans_stale_staging(tmp_path):
    out = tmp_path / "cohort"
    generate_cohort(out, subjects=2, domain="private", seed=2, image_size=(64, 64), progress=False)
    (out / "notes.txt").write_text("keep")
    (out / "images" / "extra.txt").write_text("keep too")
    (tmp_path / ".cohort.12345678.part").mkdir()
    generate_cohort(out, subjects=1, domain="private", seed=2, image_size=(64, 64), overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "keep" and (out / "images" / "extra.txt").read_text() == "keep too"
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "extra.txt",
        "sub-0000_ED.nii.gz",
        "sub-0000_ES.nii.gz",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]
