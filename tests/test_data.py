"""Data pipeline: datalist + attribute table -> tensors, and the errors bad input gets."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.data import DataError, EncodeAttributesd, get_dataset, load_datalist, read_attributes_csv


def _error_chain(exc: BaseException) -> str:
    """All messages of an exception and its causes (MONAI wraps transform errors)."""
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def _copy_cohort(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_round_trip_shapes_ranges_and_attributes(cohorts, attribute_ranges):
    datalist = cohorts["public"] / "datalist.json"
    ds = get_dataset(str(datalist), "training", (16, 96, 96), attribute_ranges)
    items = load_datalist(str(datalist), "training")
    table = read_attributes_csv(str(cohorts["public"] / "attributes.csv"))
    assert len(ds) == len(items) > 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (1, 16, 96, 96) and item["image"].dtype == torch.float32
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        assert float(item["image"].max()) == pytest.approx(1.0)
        raw = table[item["id"]]
        missing = np.isnan(raw)
        np.testing.assert_array_equal(item["missing"].numpy(), missing.astype(np.float32))
        low = np.array([attribute_ranges[n][0] for n in ATTRIBUTE_NAMES])
        high = np.array([attribute_ranges[n][1] for n in ATTRIBUTE_NAMES])
        expected = np.where(missing, 0.0, 2 * (raw - low) / (high - low) - 1)
        np.testing.assert_allclose(item["attributes"].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_public_cohort_has_missing_attributes_masked(cohorts, attribute_ranges):
    ds = get_dataset(str(cohorts["public"] / "datalist.json"), "training", (16, 96, 96), attribute_ranges, cache=False)
    masks = torch.stack([ds[i]["missing"] for i in range(len(ds))])
    values = torch.stack([ds[i]["attributes"] for i in range(len(ds))])
    assert (values[masks.bool()] == 0).all()


def test_depth_axis_comes_first_and_is_padded(cohorts, attribute_ranges):
    """NIfTI (X, Y, slices) becomes (1, D, H, W); fewer slices than D are zero-padded."""
    items = load_datalist(str(cohorts["private"] / "datalist.json"), "training")
    raw = nib.load(items[0]["image"])
    slices = raw.shape[2]
    ds = get_dataset(str(cohorts["private"] / "datalist.json"), "training", (16, 96, 96), attribute_ranges, cache=False)
    image = ds[0]["image"][0]
    assert slices < 16
    nonzero_slices = int((image.flatten(1).abs().sum(1) > 0).sum())
    assert nonzero_slices == slices


def test_normalisation_uses_config_ranges_not_data(cohorts, attribute_ranges):
    """Changing the config range changes the encoding; the data never sets it."""
    enc = EncodeAttributesd("attributes", attribute_ranges)
    shifted = dict(attribute_ranges, LVEDV=[0.0, 1000.0])
    enc2 = EncodeAttributesd("attributes", shifted)
    raw = np.full(len(ATTRIBUTE_NAMES), np.nan, dtype=np.float32)
    raw[0] = 500.0
    assert enc.encode(raw)[0][0] == pytest.approx(2 * (500 - 40) / 360 - 1)
    assert enc2.encode(raw)[0][0] == pytest.approx(0.0)


def test_inline_attributes(tmp_path, cohorts, attribute_ranges):
    items = load_datalist(str(cohorts["private"] / "datalist.json"), "training")
    datalist = {"training": [{"image": items[0]["image"], "attributes": {"LVEDV": 120.0, "SEX": 1, "AGE": ""}}]}
    path = tmp_path / "inline.json"
    path.write_text(json.dumps(datalist))
    (loaded,) = load_datalist(str(path), "training")
    assert loaded["attributes"][0] == 120.0 and loaded["attributes"][9] == 1.0
    assert np.isnan(loaded["attributes"][8]) and np.isnan(loaded["attributes"][1])


# --- bad input: each gets a clear error naming the file and the field ---------------------------


def _first_training_image(cohort_dir):
    return cohort_dir / json.loads((cohort_dir / "datalist.json").read_text())["training"][0]["image"]


def _load_all(cohort_dir, attribute_ranges):
    ds = get_dataset(str(cohort_dir / "datalist.json"), "training", (16, 96, 96), attribute_ranges, cache=False)
    return [ds[i] for i in range(len(ds))]


def test_corrupt_nifti(tmp_path, cohorts, attribute_ranges):
    cohort = _copy_cohort(cohorts["private"], tmp_path / "c")
    image = _first_training_image(cohort)
    image.write_bytes(b"this is not a NIfTI file")
    with pytest.raises(Exception) as err:
        _load_all(cohort, attribute_ranges)
    assert image.name in _error_chain(err.value)


def test_wrong_number_of_dimensions(tmp_path, cohorts, attribute_ranges):
    cohort = _copy_cohort(cohorts["private"], tmp_path / "c")
    image = _first_training_image(cohort)
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), image)
    with pytest.raises(Exception) as err:
        _load_all(cohort, attribute_ranges)
    chain = _error_chain(err.value)
    assert image.name in chain and "expected a 3D volume" in chain and "'image'" in chain


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels(tmp_path, cohorts, attribute_ranges, bad):
    cohort = _copy_cohort(cohorts["private"], tmp_path / "c")
    image = _first_training_image(cohort)
    img = nib.load(image)
    data = np.asarray(img.dataobj).copy()
    data[5, 5, 2] = bad
    nib.save(nib.Nifti1Image(data, img.affine), image)
    with pytest.raises(Exception) as err:
        _load_all(cohort, attribute_ranges)
    chain = _error_chain(err.value)
    assert image.name in chain and "NaN or inf" in chain


def _rewrite_csv(cohort, edit):
    path = cohort / "attributes.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")
    return path


def _set_first_row(cohort, column, value):
    """Overwrite one cell (first data row) of the cohort's attribute table."""

    def edit(lines):
        header = lines[0].split(",")
        row = lines[1].split(",")
        row[header.index(column)] = value
        return [lines[0], ",".join(row), *lines[2:]]

    return _rewrite_csv(cohort, edit)


def test_missing_attribute_column(tmp_path, cohorts):
    cohort = _copy_cohort(cohorts["private"], tmp_path / "c")

    def drop_bmi(lines):
        header = lines[0].split(",")
        k = header.index("BMI")
        return [",".join(c for j, c in enumerate(line.split(",")) if j != k) for line in lines]

    path = _rewrite_csv(cohort, drop_bmi)
    with pytest.raises(DataError, match=r"attributes\.csv.*missing attribute column.*'BMI'"):
        load_datalist(str(cohort / "datalist.json"), "training")
    assert str(path) in str(pytest.raises(DataError, read_attributes_csv, str(path)).value)


def test_unknown_attribute_column(tmp_path, cohorts):
    cohort = _copy_cohort(cohorts["private"], tmp_path / "c")
    _rewrite_csv(cohort, lambda lines: [lines[0] + ",LVEDv"] + [line + ",1" for line in lines[1:]])
    with pytest.raises(DataError, match=r"attributes\.csv: unknown column.*'LVEDv'"):
        load_datalist(str(cohort / "datalist.json"), "training")


def test_non_numeric_attribute(tmp_path, cohorts):
    cohort = _copy_cohort(cohorts["private"], tmp_path / "c")
    _set_first_row(cohort, "LVEF", "sixty")
    with pytest.raises(DataError, match=r"attributes\.csv, line 2: attribute 'LVEF' must be a number.*'sixty'"):
        read_attributes_csv(str(cohort / "attributes.csv"))


def test_unknown_inline_attribute(tmp_path, cohorts):
    image = _first_training_image(cohorts["private"])
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": [{"image": str(image), "attributes": {"EF": 50}}]}))
    with pytest.raises(DataError, match=r"dl\.json, training\[0\].*unknown attribute.*'EF'"):
        load_datalist(str(path), "training")


def test_empty_datalist(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"training": []}))
    with pytest.raises(DataError, match=r"empty\.json: field 'training' is empty"):
        load_datalist(str(path), "training")


def test_missing_image_path(tmp_path, cohorts):
    path = tmp_path / "dl.json"
    path.write_text(json.dumps({"training": [{"image": "nowhere/x.nii.gz", "attributes": {"LVEDV": 100}}]}))
    expected = r"dl\.json, training\[0\]: field 'image': file .*nowhere/x\.nii\.gz does not exist"
    with pytest.raises(DataError, match=expected):
        load_datalist(str(path), "training")


def test_missing_datalist_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: datalist not found"):
        load_datalist(str(tmp_path / "nope.json"), "training")


def test_bad_config_ranges():
    with pytest.raises(DataError, match=r"attribute_ranges.*unknown attribute.*'FOO'"):
        EncodeAttributesd("attributes", {"FOO": [0, 1]})


def test_bundle_run_exits_nonzero_naming_file(tmp_path, cohorts, bundle):
    """A stage pointed at a broken cohort fails with a non-zero exit and names the file and field."""
    cohort = _copy_cohort(cohorts["public"], tmp_path / "c")
    _set_first_row(cohort, "AGE", "old")
    proc = bundle(
        "run",
        "training",
        "--config_file",
        "['configs/common.yaml','configs/train_autoencoder.yaml','configs/small_autoencoder.yaml']",
        "--dataset_dir",
        str(cohort),
        "--bundle_root",
        str(tmp_path / "b"),
        "--epochs",
        "1",
    )
    assert proc.returncode != 0
    assert "attributes.csv, line 2: attribute 'AGE' must be a number" in proc.stderr + proc.stdout


def test_truncated_nifti_names_the_file(tmp_path, cohorts, attribute_ranges):
    """A truncated .nii.gz failed with a bare EOFError; now the error names the file and the expected form."""
    cohort = _copy_cohort(cohorts["private"], tmp_path / "c")
    image = _first_training_image(cohort)
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    with pytest.raises(Exception) as err:
        _load_all(cohort, attribute_ranges)
    chain = _error_chain(err.value)
    assert f"{image}: field 'image': cannot read the volume (EOFError" in chain
    assert "expected a complete NIfTI-1 file" in chain


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("SEX", "7", "column 'SEX': expected 0 or 1"),
        ("LVEDV", "-5000", "column 'LVEDV': -5000 is not a possible value; expected a number in [0, 1000] (ml)"),
        ("LVEF", "120", "column 'LVEF': 120 is not a possible value; expected a number in [0, 100] (%)"),
    ],
)
def test_training_refuses_what_synthesis_refuses(tmp_path, cohorts, attribute_ranges, column, value, message):
    """One check (scripts.data.check_attribute) for the training data and the synthesis requests."""
    import scripts.synthesis
    from scripts.data import check_attribute

    cohort = _copy_cohort(cohorts["private"], tmp_path / "c")
    path = _set_first_row(cohort, column, value)
    with pytest.raises(DataError) as err:
        get_dataset(str(cohort / "datalist.json"), "training", (16, 96, 96), attribute_ranges)
    assert f"{path}, line 2, {message}" in str(err.value)
    request = tmp_path / "req.csv"
    request.write_text(f"{column}\n{value}\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        scripts.synthesis.read_requests(str(request), attribute_ranges)
    assert scripts.synthesis.requests.check_attribute is check_attribute
    inline = tmp_path / "inline.json"
    image = str(_first_training_image(cohort))
    inline.write_text(json.dumps({"training": [{"image": image, "attributes": {column: float(value)}}]}))
    with pytest.raises(DataError, match=r"inline\.json, training\[0\]: field 'attributes', " + message[:14]):
        load_datalist(str(inline), "training", ranges=attribute_ranges)


def test_possible_values_outside_the_reference_range_are_kept_for_training(tmp_path, cohorts, attribute_ranges):
    """A real record beyond the reference range (a very thick HCM wall) is kept and maps beyond +1 in training;
    a synthesis request for it is refused unless --clip_out_of_range True (docs/data.md, docs/synthesis.md)."""
    import scripts.synthesis

    cohort = _copy_cohort(cohorts["private"], tmp_path / "c")
    path = _set_first_row(cohort, "MYOESTHICK", "33.5")
    table = read_attributes_csv(str(path), attribute_ranges)
    assert next(iter(table.values()))[ATTRIBUTE_NAMES.index("MYOESTHICK")] == pytest.approx(33.5)
    request = tmp_path / "req.csv"
    request.write_text("MYOESTHICK\n33.5\n")
    with pytest.raises(DataError, match=r"outside the reference range \[3, 30\] \(mm\).*--clip_out_of_range True"):
        scripts.synthesis.read_requests(str(request), attribute_ranges)


@pytest.mark.parametrize("text", ["", "nan", "NaN", "NA", "n/a"])
def test_missing_value_spellings(tmp_path, cohorts, attribute_ranges, text):
    """A blank cell is missing; the texts nan / NA / N/A (any case) are read as missing too (docs/synthesis.md)."""
    cohort = _copy_cohort(cohorts["private"], tmp_path / "c")
    _set_first_row(cohort, "AGE", text)
    table = read_attributes_csv(str(cohort / "attributes.csv"), attribute_ranges)
    first = next(iter(table.values()))
    assert np.isnan(first[ATTRIBUTE_NAMES.index("AGE")])


BAD_LOAD = """
import sys, yaml
from scripts.data import get_dataset
ranges = yaml.safe_load(open("configs/common.yaml"))["attribute_ranges"]
get_dataset(sys.argv[1], "training", (8, 48, 48), ranges)
"""


def test_bad_volume_exits_cleanly_not_sigabrt(tmp_path, cohorts):
    """NaN voxels / a 4D file: the error, then a clean exit 1 (it aborted with SIGABRT, exit -6, in 5 of 6 runs).

    Three real processes (two NaN, one 4D) run at once: with the old threaded cache fill all three
    exiting cleanly had a chance of about 1 in 200.
    """
    import os
    import subprocess
    import sys

    from conftest import ROOT

    nan_cohort = _copy_cohort(cohorts["private"], tmp_path / "nan")
    nan_image = _first_training_image(nan_cohort)
    img = nib.load(nan_image)
    data = np.asarray(img.dataobj).copy()
    data[5, 5, 1] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), nan_image)
    cohort_4d = _copy_cohort(cohorts["private"], tmp_path / "4d")
    image_4d = _first_training_image(cohort_4d)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), img.affine), image_4d)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [
        (nan_cohort, f"{nan_image}: field 'image': volume contains NaN or inf voxels"),
        (nan_cohort, f"{nan_image}: field 'image': volume contains NaN or inf voxels"),
        (cohort_4d, f"{image_4d}: field 'image': expected a 3D volume"),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BAD_LOAD, str(cohort / "datalist.json")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cohort, _ in runs
    ]
    for proc, (_, message) in zip(procs, runs):
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1, (proc.returncode, stderr[-500:])
        assert "terminate called" not in stderr
        assert message in stderr.splitlines()[-1]
