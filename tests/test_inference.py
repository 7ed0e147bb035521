"""Synthesis (configs/inference.yaml, scripts/synthesis/): requests, determinism, outputs, errors, sweep.

The model to sample from is built by the ``tiny_bundle`` fixture, not trained: a model.pt-shaped
checkpoint (the keys the DP stage writes) of randomly initialised tiny networks at the sizes of
the other stage tests (images 8 x 48 x 48, latent 4 x 8 x 12 x 12), with the zero-initialised
attention projections perturbed so that the condition and guidance change the output, plus an
autoencoder.pt and a privacy_report.json naming model.pt's SHA-256. These tests check the
plumbing, determinism and geometry, which do not depend on trained weights, in seconds instead
of the minutes the pre-training fixture takes.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import jittered, stage_checkpoint_info, tiny_stage_networks, write_privacy_report
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.data import DataError
from scripts.sampling import build_scheduler
from scripts.synthesis import (
    Sweep,
    SweepSettings,
    Synthesizer,
    check_output_dir,
    load_generator,
    load_model,
    make_provenance,
    plan_samples,
    prepare_output_dir,
    privacy_info,
    read_requests,
    resolve_autoencoder_path,
    run_inference,
    sweep_values,
)

SCHEDULE = {"num_train_timesteps": 150, "schedule": "linear_beta", "beta_start": 1.0e-4, "beta_end": 7.0e-2}
STEPS = ["--num_inference_steps", "3"]


def _write_csv(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A bundle root with models/{autoencoder,model}.pt (tiny, random) and a matching privacy report."""
    root = tmp_path_factory.mktemp("synthesis")
    models = root / "models"
    models.mkdir()
    net = tiny_stage_networks(models, perturb="zero")  # MONAI zero-initialises the attention output projections
    info = stage_checkpoint_info(net, str(models / "autoencoder.pt"), SCHEDULE)
    ema = jittered(net.state_dict())
    torch.save(
        {
            "network": net.state_dict(),
            "ema": ema,
            "dp": {"steps_done": 4},
            **info,
            "pretrained": str(models / "diffusion.pt"),
        },
        models / "model.pt",
    )
    write_privacy_report(models, str(models / "model.pt"))
    return root


@pytest.fixture(scope="module")
def loaded(tiny_bundle):
    generator = load_generator(str(tiny_bundle / "models" / "model.pt"))
    return generator.network, generator.autoencoder, generator.info


def _synth(loaded, ranges, sampler="ddim", steps=3, guidance=2.0):
    network, autoencoder, info = loaded
    scheduler = build_scheduler(sampler, info["scheduler"], steps if sampler == "ddim" else None)
    return Synthesizer(autoencoder, network, scheduler, info["latent_shape"], ranges, guidance)


# --------------------------------------------------------------------------------- request CSV


def test_requests_partial_attributes_counts_seeds(tmp_path, attribute_ranges):
    path = _write_csv(
        tmp_path / "req.csv",
        "\ufeffLVEDV, LVEF ,SEX,count,seed\n150,60,1,2,100\n,55.5,,,\n\n,,,3,\n",  # BOM, spaces, blank line
    )
    requests = read_requests(path, attribute_ranges)
    assert [(r.row, r.line, r.count, r.seed) for r in requests] == [(0, 2, 2, 100), (1, 3, 1, None), (2, 5, 3, None)]
    first = requests[0].attributes()
    assert first["LVEDV"] == 150.0 and first["LVEF"] == 60.0 and first["SEX"] == 1.0
    assert all(first[n] is None for n in ATTRIBUTE_NAMES if n not in ("LVEDV", "LVEF", "SEX"))
    assert math.isnan(requests[1].values[ATTRIBUTE_NAMES.index("LVEDV")]) and requests[1].values[2] == 55.5
    assert np.isnan(requests[2].values).all()  # every attribute missing: an unconditional request
    samples = plan_samples(requests, seed=7)
    # a row seed gives seed + k to its k-th sample; other samples get the run seed + their position
    assert [(s.request.row, s.index, s.seed) for s in samples] == [
        (0, 0, 100),
        (0, 1, 101),
        (1, 0, 9),
        (2, 0, 10),
        (2, 1, 11),
        (2, 2, 12),
    ]
    assert samples[1].stem == "row0000_sample001"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("LVEDV,FOO\n150,1\n", ["header: unknown column(s) ['FOO']", "columns: any of ['LVEDV'", "'count', 'seed'"]),
        ("LVEDV,LVESV\n150,abc\n", ["row 0 (line 2)", "'LVESV' must be a number or blank (missing)", "'abc'"]),
        (
            "LVEDV\n150\n500\n",
            [
                "row 1 (line 3), column 'LVEDV'",
                "outside the reference range [40, 400] (ml)",
                "--clip_out_of_range True",
            ],
        ),
        ("SEX\n0.5\n", ["row 0 (line 2), column 'SEX'", "expected 0 or 1"]),
        ("LVEDV,count\n150,0\n", ["column 'count'", "expected an integer in [1,"]),
        ("LVEDV,seed\n150,-3\n", ["column 'seed'", "expected an integer in [0,"]),
        ("LVEDV,LVEDV\n1,2\n", ["duplicated column(s) ['LVEDV']"]),
        ("LVEDV\n150,1\n", ["row 0 (line 2): 2 cells but the header has 1 columns"]),
        ("LVEDV,LVESV\n", ["no request rows after the header"]),
        ("", ["empty file or header"]),
    ],
)
def test_bad_requests_name_file_row_field_and_form(tmp_path, attribute_ranges, text, expected):
    path = _write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(DataError) as err:
        read_requests(path, attribute_ranges)
    assert path in str(err.value)
    for part in expected:
        assert part in str(err.value)


def test_missing_csv_and_clip_policy(tmp_path, attribute_ranges, caplog):
    with pytest.raises(DataError, match="pass --attributes_csv FILE"):
        read_requests(None, attribute_ranges)
    with pytest.raises(DataError, match="nope.csv: attribute CSV not found"):
        read_requests(str(tmp_path / "nope.csv"), attribute_ranges)
    path = _write_csv(tmp_path / "req.csv", "LVEDV,AGE\n500,120\n150,50\n")
    with caplog.at_level("WARNING"):
        requests = read_requests(path, attribute_ranges, clip_out_of_range=True)
    assert requests[0].values[0] == 400.0 and requests[0].values[ATTRIBUTE_NAMES.index("AGE")] == 100.0
    assert requests[0].clipped == {"LVEDV": 500.0, "AGE": 120.0} and requests[1].clipped == {}
    assert "row 0 (line 2), column 'LVEDV': 500 is outside [40, 400] (ml); clipped to 400" in caplog.text
    impossible = _write_csv(tmp_path / "impossible.csv", "AGE\n-1\n")  # clipping never hides an impossible value
    with pytest.raises(DataError, match=r"column 'AGE': -1 is not a possible value; expected a number in \[0, 150\]"):
        read_requests(impossible, attribute_ranges, clip_out_of_range=True)


def test_sweep_values(attribute_ranges):
    plausible = {"LVEDV": [80, 300], "AGE": [20, 90]}
    assert sweep_values("LVEDV", None, 5, attribute_ranges, plausible) == [80.0, 135.0, 190.0, 245.0, 300.0]
    assert sweep_values("LVESV", None, 2, attribute_ranges, plausible) == [10.0, 330.0]  # no sub-range: reference range
    assert sweep_values("SEX", None, 5, attribute_ranges, plausible) == [0.0, 1.0]
    assert sweep_values("AGE", [30, "40"], 5, attribute_ranges, plausible) == [30.0, 40.0]
    with pytest.raises(DataError, match="--attribute: unknown attribute 'LVX'"):
        sweep_values("LVX", None, 5, attribute_ranges, plausible)
    with pytest.raises(DataError, match="--values, column 'LVEDV': 900 is outside the reference range"):
        sweep_values("LVEDV", [100, 900], 5, attribute_ranges, plausible)


def test_scheduler_choices():
    assert len(build_scheduler("ddpm", SCHEDULE).timesteps) == 150
    assert len(build_scheduler("ddim", SCHEDULE, 25).timesteps) == 25
    assert build_scheduler("ddim", SCHEDULE, 25).clip_sample is False
    with pytest.raises(ValueError, match="DDPM runs every training timestep"):
        build_scheduler("ddpm", SCHEDULE, 25)
    with pytest.raises(ValueError, match=r"integer in \[1, 150\]"):
        build_scheduler("ddim", SCHEDULE, 151)
    with pytest.raises(ValueError, match="'sampler'"):
        build_scheduler("euler", SCHEDULE, 10)


# ------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seed_same_volume_across_batches(loaded, attribute_ranges, sampler):
    """Per-sample random streams: a seed gives the same volume in any batch (bitwise for the same batch composition)."""
    synth = _synth(loaded, attribute_ranges, sampler, guidance=None)
    values = np.full((3, len(ATTRIBUTE_NAMES)), np.nan)
    values[0, 0], values[1, 0], values[2, 9] = 100.0, 200.0, 1.0
    batch = synth(values, [5, 6, 7])
    again = synth(values, [5, 6, 7])
    assert np.array_equal(batch, again)  # same composition: same bytes
    alone = synth(values[1:2], [6])
    swapped = synth(values[[2, 1]], [7, 6])
    # other batch compositions: same random streams, equal up to float rounding of batched kernels
    np.testing.assert_allclose(alone[0], batch[1], atol=1e-4)
    np.testing.assert_allclose(swapped[1], batch[1], atol=1e-4)
    np.testing.assert_allclose(swapped[0], batch[2], atol=1e-4)
    other_seed = synth(values[1:2], [8])
    assert np.abs(other_seed[0] - alone[0]).mean() > 1e-2
    assert batch.dtype == np.float32 and batch.shape == (3, 8, 48, 48) and batch.min() >= 0.0 and batch.max() <= 1.0


def test_guidance_changes_output_and_doubles_evaluations(loaded, attribute_ranges):
    values = np.full((2, len(ATTRIBUTE_NAMES)), np.nan)
    values[:, 0] = [90.0, 250.0]
    plain, guided = _synth(loaded, attribute_ranges, guidance=None), _synth(loaded, attribute_ranges, guidance=3.0)
    assert _synth(loaded, attribute_ranges, guidance=1.0).guidance_scale is None  # 1 = off
    a, b = plain(values, [1, 2]), guided(values, [1, 2])
    assert plain.evaluations == 2 * 3 and guided.evaluations == 2 * 2 * 3  # counted by the forward hook
    assert np.abs(a - b).mean() > 1e-3


# -------------------------------------------------------------------------------------- outputs


def _provenance(tiny_bundle, synth):
    models = tiny_bundle / "models"
    files = load_generator(str(models / "model.pt")).files
    return make_provenance(files, str(models / "privacy_report.json"), "0.1.0", synth)


def test_run_writes_nifti_sidecars_manifest_preview(tiny_bundle, loaded, attribute_ranges, tmp_path):
    path = _write_csv(tmp_path / "req.csv", "LVEDV,LVESV,ESED,count,seed\n150,60,1,2,11\n,,0,,\n")
    requests = read_requests(path, attribute_ranges)
    synth = _synth(loaded, attribute_ranges)
    info = _provenance(tiny_bundle, synth)
    out = tmp_path / "run"
    summary = run_inference(
        requests, synth, str(out), info, spacing=(1.5, 1.6, 8.0), batch_size=2, seed=3, progress=False
    )
    assert summary["samples"] == 3 and summary["unet_evaluations_per_volume"] == 6
    with open(out / "manifest.csv") as f:
        manifest = list(csv.DictReader(f))
    assert [(m["file"], m["row"], m["sample"], m["seed"]) for m in manifest] == [
        ("row0000_sample000.nii.gz", "0", "0", "11"),
        ("row0000_sample001.nii.gz", "0", "1", "12"),
        ("row0001_sample000.nii.gz", "1", "0", "5"),
    ]
    assert manifest[0]["LVEDV"] == "150" and manifest[0]["AGE"] == "" and manifest[2]["ESED"] == "0"
    image = nib.load(out / "row0000_sample000.nii.gz")
    assert image.shape == (48, 48, 8)  # (X, Y, slices) like the input cohorts
    assert image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.header.get_zooms(), (1.5, 1.6, 8.0), rtol=1e-6)
    np.testing.assert_allclose(np.diag(image.affine)[:3], (1.5, 1.6, 8.0), rtol=1e-6)
    assert image.header["qform_code"] == 1 and image.header["sform_code"] == 1
    assert image.header.get_xyzt_units()[0] == "mm"
    data = image.get_fdata()
    assert 0.0 <= data.min() and data.max() <= 1.0
    # the NIfTI holds the generated volume transposed from (slices, X, Y)
    alone = synth(requests[0].values[None], [11])[0]
    np.testing.assert_allclose(np.asarray(image.dataobj), alone.transpose(1, 2, 0), atol=1e-4)
    side = json.loads((out / "row0000_sample000.json").read_text())
    assert side["attributes"]["LVEDV"] == 150.0 and side["attributes"]["AGE"] is None
    assert "AGE" in side["missing"] and "LVEDV" not in side["missing"] and side["clipped"] == {}
    assert (side["sampler"], side["steps"], side["guidance_scale"]) == ("ddim", 3, 2.0)
    assert (side["seed"], side["weights"]) == (11, "ema")
    assert side["unet_evaluations"] == 6 and side["model_version"] == "0.1.0"
    assert side["model"].endswith("model.pt") and len(side["model_sha256"]) == 64
    privacy = side["privacy"]
    assert (privacy["epsilon"], privacy["delta"], privacy["privacy_unit"]) == (7.9, 1e-5, "subject")
    assert "privacy_warning" not in side and side["spacing_mm"] == [1.5, 1.6, 8.0]
    assert (out / "preview.png").stat().st_size > 0
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # atomic writes leave no temp files
    # a second run with the same request and batch size writes the same image bytes
    run_inference(
        requests, synth, str(tmp_path / "again"), info, spacing=(1.5, 1.6, 8.0), batch_size=2, seed=3, progress=False
    )
    for name in ("row0000_sample000.nii.gz", "row0001_sample000.nii.gz"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_privacy_missing_or_mismatched_report(tiny_bundle, tmp_path):
    from scripts.files import sha256

    model = str(tiny_bundle / "models" / "model.pt")
    report = str(tiny_bundle / "models" / "privacy_report.json")
    assert privacy_info(report, sha256(model))["privacy"]["accountant"] == "prv"
    other = privacy_info(report, "0" * 64)
    assert other["privacy"] is None and "describes model sha256" in other["privacy_warning"]
    assert "no differential-privacy guarantee is known" in other["privacy_warning"]
    missing = privacy_info(str(tmp_path / "privacy_report.json"), sha256(model))
    assert missing["privacy"] is None and "no privacy report at" in missing["privacy_warning"]
    # the epsilon covers images decoded with the autoencoder the report names, not another one
    decoder = str(tiny_bundle / "models" / "autoencoder.pt")
    assert privacy_info(report, sha256(model), sha256(decoder))["privacy"] is not None
    other_decoder = privacy_info(report, sha256(model), "1" * 64)
    assert other_decoder["privacy"] is None and "decoded with the autoencoder" in other_decoder["privacy_warning"]


def test_output_dir_holding_a_run_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert check_output_dir(str(out)) == []  # unrelated files are no run
    (out / "manifest.csv").write_text("file\n")
    (out / "row0000_sample000.nii.gz").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already holds a synthesis run .*--overwrite True"):
        check_output_dir(str(out))
    prepare_output_dir(str(out), overwrite=True)
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_overwrite_rerun_removes_temp_files_of_a_killed_run(tmp_path):
    """A kill during synthesis left a 0-byte temp NIfTI that find -name '*.nii.gz' counted and that survived an
    --overwrite rerun; temp files are now .part files and the rerun removes them (and the earlier .tmp_ ones)."""
    import fnmatch

    from scripts.files import temp_name

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.csv").write_text("file\n")
    leftover = temp_name(out / "row0000_sample000.nii.gz")  # what a kill mid-write leaves (tests/test_files.py)
    open(leftover, "wb").close()
    (out / ".tmp_ab12cd.nii.gz").write_bytes(b"")  # the naming of earlier versions
    assert not fnmatch.fnmatch(os.path.basename(leftover), "*.nii.gz")
    prepare_output_dir(str(out), overwrite=True)
    assert os.listdir(out) == []


def test_wrong_stage_checkpoint_is_named(tiny_bundle):
    from scripts.errors import CheckpointError

    autoencoder = str(tiny_bundle / "models" / "autoencoder.pt")
    with pytest.raises(CheckpointError) as err:
        load_model(autoencoder)
    assert f"{autoencoder}: lacks" in str(err.value) and "configs/train_diffusion.yaml" in str(err.value)


def test_missing_weights_name_the_stage(tiny_bundle, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_model(str(tmp_path / "models" / "model.pt"), bundle_root=str(tmp_path))
    assert (
        "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/dp_finetune.yaml']\""
        in str(err.value)
    )
    assert "download_large_files" not in str(err.value)  # large_files.yml lists no weights
    (tmp_path / "large_files.yml").write_text(
        "large_files:\n  - path: models/model.pt\n    url: https://example.org/m.pt\n"
    )
    with pytest.raises(FileNotFoundError, match="python -m monai.bundle download_large_files"):
        load_model(str(tmp_path / "models" / "model.pt"), bundle_root=str(tmp_path))
    _, info = load_model(str(tiny_bundle / "models" / "model.pt"))
    moved = dict(info, autoencoder=str(tmp_path / "gone.pt"))
    with pytest.raises(FileNotFoundError, match="configs/train_autoencoder.yaml.*--autoencoder_path"):
        resolve_autoencoder_path(None, moved, "model.pt")
    override = str(tiny_bundle / "models" / "autoencoder.pt")
    assert resolve_autoencoder_path(override, moved, "model.pt") == override
    # a downloaded bundle: the stored path is the training machine's; the file is in <bundle_root>/models/
    elsewhere = dict(info, autoencoder="/training/machine/models/autoencoder.pt")
    found = resolve_autoencoder_path(None, elsewhere, "model.pt", bundle_root=str(tiny_bundle))
    assert found == str(tiny_bundle / "models" / "autoencoder.pt")


def test_weights_choice(tiny_bundle):
    path = str(tiny_bundle / "models" / "model.pt")
    ema, _ = load_model(path, weights="ema")
    raw, _ = load_model(path, weights="network")
    key = "unet.conv_in.conv.weight"
    assert not torch.equal(ema.state_dict()[key], raw.state_dict()[key])
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    with pytest.raises(ValueError, match="'weights': expected 'ema' or 'network'"):
        load_model(path, weights="last")


def test_sweep_in_process_esed(tiny_bundle, loaded, attribute_ranges, tmp_path):
    synth = _synth(loaded, attribute_ranges, guidance=None)
    base = tmp_path / "base.csv"
    base.write_text("LVEDV,ESED,seed\n150,1,4\n")
    settings = SweepSettings(
        "ESED", str(tmp_path / "sweep"), {}, attribute_ranges, {}, base_csv=str(base), batch_size=2
    )
    png = Sweep(settings=settings, synthesizer=synth, provenance=_provenance(tiny_bundle, synth)).run()
    meta = json.loads((tmp_path / "sweep" / "sweep_ESED.json").read_text())
    assert os.path.isfile(png) and meta["values"] == [0.0, 1.0] and meta["seed"] == 4 and meta["rows"] == ["ESED 1"]
    assert meta["base_attributes"]["LVEDV"] == 150.0 and meta["base_attributes"]["AGE"] is None


# ---------------------------------------------------------------------------------- bundle runs


def test_bundle_inference_end_to_end(tiny_bundle, bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    csv_path = _write_csv(tmp_path / "req.csv", "LVEDV,LVESV,LVEF,SEX,count,seed\n150,60,60,1,2,5\n,,,0,,\n")
    out = tmp_path / "out"
    args = [
        "--config_file",
        "['configs/common.yaml','configs/inference.yaml']",
        "--attributes_csv",
        csv_path,
        "--output_dir",
        str(out),
        "--bundle_root",
        str(tiny_bundle),
        "--device",
        "cpu",
        *STEPS,
    ]
    proc = bundle("run", "inference", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(os.listdir(out))
    assert names == [
        "cohort_card.json",
        "cohort_card.md",
        "manifest.csv",
        "preview.png",
        "row0000_sample000.json",
        "row0000_sample000.nii.gz",
        "row0000_sample001.json",
        "row0000_sample001.nii.gz",
        "row0001_sample000.json",
        "row0001_sample000.nii.gz",
    ]
    side = json.loads((out / "row0001_sample000.json").read_text())
    assert side["seed"] == 2 and side["steps"] == 3 and side["sampler"] == "ddim" and side["guidance_scale"] == 2.0
    assert side["unet_evaluations"] == 6 and side["privacy"]["epsilon"] == 7.9
    assert side["model_version"] == json.loads(Path("configs/metadata.json").read_text())["version"]
    assert nib.load(out / "row0000_sample000.nii.gz").shape == (48, 48, 8)
    # the default `run` entry does the same; an output folder holding a run is refused (non-zero exit)
    again = bundle("run", *args)
    assert again.returncode != 0 and "already holds a synthesis run" in again.stderr
    # bad input stops before any weights are loaded, naming file, row and column
    bad = _write_csv(tmp_path / "bad.csv", "LVEDV,LVESV\n150,lots\n")
    proc = bundle(
        "run",
        "inference",
        *args[:2],
        "--attributes_csv",
        bad,
        "--output_dir",
        str(tmp_path / "o2"),
        "--bundle_root",
        str(tmp_path / "no_models"),
    )
    assert proc.returncode != 0
    assert f"{bad}, row 0 (line 2): attribute 'LVESV' must be a number or blank (missing), got 'lots'" in proc.stderr
    missing = bundle(
        "run",
        "inference",
        *args[:2],
        "--attributes_csv",
        csv_path,
        "--output_dir",
        str(tmp_path / "o3"),
        "--bundle_root",
        str(tmp_path / "no_models"),
    )
    assert missing.returncode != 0
    stage = "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/dp_finetune.yaml']\""
    assert f"they are produced by the DP fine-tuning stage: {stage}" in missing.stderr


def test_bundle_sweep_png(tiny_bundle, bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    proc = bundle(
        "run",
        "sweep",
        "--config_file",
        "['configs/common.yaml','configs/inference.yaml']",
        "--attribute",
        "LVEDV",
        "--sweep_count",
        "3",
        "--output_dir",
        str(tmp_path),
        "--bundle_root",
        str(tiny_bundle),
        "--device",
        "cpu",
        *STEPS,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sweep_LVEDV.png").stat().st_size > 0
    meta = json.loads((tmp_path / "sweep_LVEDV.json").read_text())
    assert meta["values"] == [80.0, 190.0, 300.0] and meta["rows"] == ["ED", "ES"] and meta["seed"] == 0
    assert meta["base_attributes"]["LVESV"] == 60.0 and meta["privacy"]["epsilon"] == 7.9
    assert json.loads((tmp_path / "cohort_card.json").read_text())["privacy"]["epsilon"] is not None
