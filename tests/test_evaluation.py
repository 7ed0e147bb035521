"""Evaluation stage (configs/evaluate.yaml, configs/train_segmenter.yaml, scripts/evaluation).

Known answers first (Fréchet distance, MMD, MS-SSIM, measured volumes of a phantom, AUC and
near-copies), then the audit on tiny data with the positive control, the segmenter trained end
to end on a tiny config, the whole stage through the bundle command on a tiny random model, and
bad input with clear errors and a non-zero exit.
"""

from __future__ import annotations

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import stage_checkpoint_info, tiny_stage_networks, tiny_unet
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.errors import DataError, MissingInputError
from scripts.evaluation import audit, control, diversity, features, fidelity, segmenter
from scripts.evaluation.volumes import load_real, load_synthetic, to_network_layout

SCHEDULE = {"num_train_timesteps": 150, "schedule": "linear_beta", "beta_start": 1.0e-4, "beta_end": 7.0e-2}
SEG = "['configs/common.yaml','configs/train_segmenter.yaml','configs/small_segmenter.yaml']"
TINY_SIZE = [8, 48, 48]  # helpers.tiny_stage_networks' image size


# ------------------------------------------------------------------------------------ known answers


def test_frechet_distance_identical_sets_is_zero():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0)).double()
    assert abs(fidelity.frechet_distance(x, x.clone())) < 1e-6
    assert abs(fidelity.mmd(x, x.clone())) < 1.0  # unbiased estimate around 0 (it drops the self-pairs)


def test_frechet_distance_of_two_gaussians_is_analytic():
    gen = torch.Generator().manual_seed(1)
    n, mu, s = 20000, torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.5, 1.0])
    a = torch.randn(n, 3, generator=gen).double()
    b = (torch.randn(n, 3, generator=gen) * s + mu).double()
    # N(0, I) vs N(mu, diag(s^2)): |mu|^2 + sum(1 + s^2 - 2 s)
    expected = float((mu**2).sum() + (1 + s**2 - 2 * s).sum())
    assert fidelity.frechet_distance(a, b) == pytest.approx(expected, rel=0.03)
    # MONAI's linear-kernel MMD estimates |mean_a - mean_b|^2
    assert fidelity.mmd(a[:4000], b[:4000]) == pytest.approx(float((mu**2).sum()), rel=0.05)


def test_mmd_of_unequal_sets_subsamples():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(30, 4, generator=gen), torch.randn(90, 4, generator=gen) + 3.0
    assert fidelity.mmd(a, b) == pytest.approx(36.0, rel=0.35)


def test_ms_ssim_of_a_volume_with_itself_is_one():
    vol = np.random.default_rng(0).random((2, 4, 64, 64)).astype(np.float32)
    assert np.allclose(diversity.ms_ssim(vol, vol.copy()), 1.0, atol=1e-5)
    other = np.random.default_rng(1).random((2, 4, 64, 64)).astype(np.float32)
    assert (diversity.ms_ssim(vol, other) < 0.5).all()
    res = diversity.pairwise_ms_ssim(np.concatenate([vol, other]), pairs=3)
    assert res["pairs"] == 3 and res["n"] == 4 and res["scales"] == diversity.scales_for(64, 7)


def test_phantom_label_map_gives_the_known_volumes():
    from scripts.phantom import synthesize_subject

    subject = synthesize_subject(seed=3, domain="private", index=0, image_size=(64, 64))
    for phase, key in (("ED", "LVEDV"), ("ES", "LVESV")):
        label = to_network_layout(subject["labels"][phase], None, is_label=True)  # (slices, X, Y)
        measured = segmenter.measure(label[None], np.asarray([subject["spacing"]]))[0]
        assert measured["LV_VOLUME"] == pytest.approx(subject["attributes"][phase][key], rel=1e-6)
    ed = segmenter.measure(
        to_network_layout(subject["labels"]["ED"], None, True)[None], np.asarray([subject["spacing"]])
    )[0]
    assert ed["RV_VOLUME"] == pytest.approx(subject["attributes"]["ED"]["RVEDV"], rel=1e-6)
    assert ed["MYO_THICKNESS"] == pytest.approx(subject["attributes"]["ED"]["MYOEDTHICK"], rel=1e-6)


def test_controllability_with_perfect_measurements():
    rng = np.random.default_rng(0)
    n = 6
    attrs = np.full((2 * n, len(ATTRIBUTE_NAMES)), np.nan)
    col = {name: ATTRIBUTE_NAMES.index(name) for name in ATTRIBUTE_NAMES}
    edv, esv = rng.uniform(90, 250, n), rng.uniform(30, 80, n)
    meas, seeds = [], []
    for i in range(n):
        for phase, v in ((1.0, edv[i]), (0.0, esv[i])):
            row = attrs[len(meas)]
            row[col["LVEDV"]], row[col["LVESV"]], row[col["ESED"]] = edv[i], esv[i], phase
            row[col["LVEF"]] = 100 * (edv[i] - esv[i]) / edv[i]
            meas.append({"LV_VOLUME": v, "RV_VOLUME": 0.0, "MYO_VOLUME": 50.0, "MYO_THICKNESS": 8.0, "DEPTH": 9})
            seeds.append(100 + i)
    keys = [(s, "same") for s in seeds]
    out = control.controllability(attrs, keys, meas)
    assert out["lv_found_rate"] == 1.0
    assert out["attributes"]["LVEDV"]["pearson_r"] == pytest.approx(1.0) and out["attributes"]["LVEDV"]["mae"] < 1e-9
    assert out["attributes"]["LVEF"]["pearson_r"] == pytest.approx(1.0) and out["attributes"]["LVEF"]["n"] == n
    assert out["phase"]["accuracy"] == 1.0 and out["phase"]["pair_accuracy"] == 1.0 and out["phase"]["pairs"] == n
    assert "needs at least 3" in out["attributes"]["RVEDV"]["note"]


def test_auc_tpr_and_near_copies_known_answers():
    assert audit.roc_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert audit.roc_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert audit.tpr_at_fpr(np.array([5.0, 6.0, 0.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(2 / 3)
    gen = torch.Generator().manual_seed(0)
    train, heldout = torch.randn(10, 50, generator=gen), torch.randn(8, 50, generator=gen)
    copies = audit.memorisation(train[:4] + 0.01 * torch.randn(4, 50, generator=gen), train, heldout, "pixels")
    assert copies["near_copies"] == 4
    fresh = audit.memorisation(torch.randn(5, 50, generator=gen), train, heldout, "pixels")
    assert fresh["near_copies"] == 0
    with pytest.raises(DataError, match="needs at least 2 samples"):
        audit.membership_inference(np.zeros((1, 2)), np.zeros((3, 2)), [10, 20])


# ------------------------------------------------------------------------------------------ fixtures


def _tiny_models(root):
    """models/{autoencoder,model}.pt of random tiny networks (the layout of the DP stage's checkpoint)."""
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    net = tiny_stage_networks(models)
    state = net.state_dict()
    info = stage_checkpoint_info(net, str(models / "autoencoder.pt"), SCHEDULE)
    torch.save({"network": state, "ema": state, **info}, models / "model.pt")
    return models


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluation")


@pytest.fixture(scope="module")
def trained_segmenter(tiny_root, cohorts, bundle):
    """The segmenter stage end to end (stock trainer, MLflow) on the tiny public cohort."""
    proc = bundle(
        "run",
        "training",
        "--config_file",
        SEG,
        "--dataset_dir",
        str(cohorts["public"]),
        "--bundle_root",
        str(tiny_root),
        "--spatial_size",
        "[8,48,48]",
        "--epochs",
        "2",
        "--val_interval",
        "1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tiny_root / "models" / "segmenter.pt"


@pytest.fixture(scope="module")
def synthetic_runs(tiny_root, attribute_ranges):
    """A `run inference` folder (ED/ES pairs with the same seed) and a `run sweep` folder from a tiny random model."""
    from scripts.sampling import build_scheduler
    from scripts.synthesis import (
        Sweep,
        SweepSettings,
        Synthesizer,
        load_generator,
        make_provenance,
        read_requests,
        run_inference,
    )

    models = _tiny_models(tiny_root)
    model_path = str(models / "model.pt")
    generator = load_generator(model_path)
    info = generator.info
    synth = Synthesizer(
        generator.autoencoder,
        generator.network,
        build_scheduler("ddim", info["scheduler"], 2),
        info["latent_shape"],
        attribute_ranges,
        2.0,
    )
    prov = make_provenance(generator.files, str(models / "privacy_report.json"), None, synth)
    req = tiny_root / "requests.csv"
    req.write_text(
        "LVEDV,LVESV,LVEF,ESED,count,seed\n120,50,58.3,1,1,5\n120,50,58.3,0,1,5\n200,120,40,1,1,6\n200,120,40,0,1,6\n160,70,56.2,1,1,7\n"
    )
    out = tiny_root / "synthetic"
    run_inference(read_requests(str(req), attribute_ranges), synth, str(out), prov, preview_count=0, progress=False)
    sweep = tiny_root / "sweep"
    settings = SweepSettings(
        "LVEDV",
        str(sweep),
        {"LVEDV": 150, "LVESV": 60, "ESED": 1},
        attribute_ranges,
        {"LVEDV": [80, 300]},
        values=[100, 160, 220],
        phases=[1, 0],
    )
    Sweep(settings=settings, synthesizer=synth, provenance=prov).run()
    return out, sweep, model_path


# ------------------------------------------------------------------------------------- audit, tiny


def _units_latents(count: int, offset: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    lat = torch.randn(2 * count, 4, 4, 8, 8, generator=gen)
    cond = torch.zeros(2 * count, len(ATTRIBUTE_NAMES), 2)
    cond[..., 1] = 1.0
    return lat, cond, [f"sub-{offset + i // 2}" for i in range(2 * count)]


def test_positive_control_flags_an_overfitted_model():
    """A non-DP copy over-fitted on 3 units is flagged by the same attack code (AUC >= 0.8)."""
    from monai.networks.schedulers import DDPMScheduler

    # smaller than the default tiny UNet: no attention, 8/16 channels
    net = tiny_unet(perturb=None, attribute_dim=8, channels=[8, 16], attention_levels=[False, False])
    gen = torch.Generator().manual_seed(0)
    members, nonmembers = _units_latents(3, 0, gen), _units_latents(3, 10, gen)
    scheduler = DDPMScheduler(**SCHEDULE, clip_sample=False)
    before = [n.clone() for n in net.parameters()]
    result = audit.overfit_control(net, scheduler, members, nonmembers, [20, 60], steps=40, lr=1e-2, bootstrap=50)
    assert result["flagged"] and result["auc"] >= 0.8, result
    assert result["members"] == 3 and result["nonmembers"] == 3 and len(result["auc_ci95"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the audited model is untouched
    # the untrained model on the same records: no signal to speak of
    losses = [
        audit.unit_scores(audit.denoising_losses(net, scheduler, lat, cond, [20, 60]), units)[1]
        for lat, cond, units in (members, nonmembers)
    ]
    assert audit.membership_inference(losses[0], losses[1], [20, 60], bootstrap=20)["auc"] < 1.0


def test_denoising_losses_use_the_same_noise_for_every_record():
    from monai.networks.schedulers import DDPMScheduler

    class Echo(torch.nn.Module):
        def forward(self, x, t, c):
            return torch.zeros_like(x)

    lat = torch.zeros(3, 4, 2, 4, 4)
    cond = torch.zeros(3, len(ATTRIBUTE_NAMES), 2)
    losses = audit.denoising_losses(Echo(), DDPMScheduler(**SCHEDULE, clip_sample=False), lat, cond, [5, 100])
    assert np.allclose(losses, losses[0])  # same record -> same loss: fixed noise shared by all records
    with pytest.raises(ValueError, match="mia_timesteps"):
        audit.denoising_losses(Echo(), DDPMScheduler(**SCHEDULE, clip_sample=False), lat, cond, [150])


# ------------------------------------------------------------------------------- segmenter and stage


def test_segmenter_trains_and_measures(trained_segmenter, cohorts, tiny_root):
    from conftest import mlflow_runs

    net, info = segmenter.load_segmenter(str(trained_segmenter))
    assert info["trained_on"].endswith("datalist.json") and info["spatial_size"] == TINY_SIZE
    real = load_real(str(cohorts["public"] / "datalist.json"), "test", TINY_SIZE, with_labels=True)
    labels = segmenter.segment(net, real.images)
    assert labels.shape == real.labels.shape and labels.dtype == np.uint8
    acc = segmenter.accuracy(real.labels, real.labels, real.spacing)  # truth against itself: Dice 1, no error
    assert acc["dice"]["mean"] == pytest.approx(1.0) and acc["volume_mae_ml"]["LV"] == 0.0
    feats = features.SegmenterFeatures(net)(real.images)
    assert feats.shape[0] == len(real) and feats.shape[1] == sum(net.init_kwargs["channels"])
    _, runs = mlflow_runs(tiny_root, "segmenter_")
    assert runs


def test_evaluation_stage_end_to_end(trained_segmenter, synthetic_runs, cohorts, tiny_root, bundle):
    synthetic, sweep, model_path = synthetic_runs
    out = tiny_root / "eval"
    proc = bundle(
        "run",
        "evaluating",
        "--config_file",
        "['configs/common.yaml','configs/evaluate.yaml']",
        "--bundle_root",
        str(tiny_root),
        "--synthetic_dir",
        str(synthetic),
        "--sweep_dir",
        str(sweep),
        "--model_path",
        model_path,
        "--real_datalist",
        str(cohorts["private"] / "datalist.json"),
        "--public_datalist",
        str(cohorts["public"] / "datalist.json"),
        "--segmenter_path",
        str(trained_segmenter),
        "--device",
        "cpu",
        "--mia_timesteps",
        "[20,80]",
        "--mia_bootstrap",
        "50",
        "--ms_ssim_pairs",
        "5",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LVEDV Pearson r" in proc.stdout and "MIA AUC" in proc.stdout
    report = json.loads((out / "report.json").read_text())
    print("evaluation timings (s):", report["timings_s"])
    h = report["headline"]
    for key in ("FD_seg3d_real_vs_real", "FD_seg3d_real_vs_synthetic", "lv_found_rate", "ms_ssim_synthetic", "mia_auc"):
        assert h[key] is not None, key
    assert "lvedv_pearson_r" in h and "sweep_spearman_rho" in h
    assert report["n_synthetic"] == 5 and report["controllability"]["phase"]["pairs"] == 2
    assert report["sweeps"][0]["attribute"] == "LVEDV" and len(report["sweeps"][0]["measured"]) == 3
    mia = report["privacy_audit"]["membership_inference"]
    assert mia["members"] == 4 and mia["nonmembers"] == 2 and mia["privacy_unit"] == "subject"
    assert "not covered by epsilon" in report["caveat"].lower() and "lower bound" in report["caveat"]
    assert "not covered by epsilon" in (out / "report.md").read_text().lower()
    for name in (
        "eval_montage.png",
        "eval_scatter.png",
        "eval_membership.png",
        "eval_memorisation.png",
        "eval_sweep_LVEDV.png",
    ):
        assert (out / name).stat().st_size > 1000, name
    assert not [p for p in os.listdir(out) if p.endswith(".part")]
    from conftest import mlflow_runs

    _, runs = mlflow_runs(tiny_root, "evaluation_")
    assert runs and "headline.lv_found_rate" in runs[0].data.metrics


def test_evaluate_from_python_on_a_real_cohort(trained_segmenter, cohorts, attribute_ranges):
    """The Python API; a real cohort as the candidate set (pairs by subject) and no audit."""
    from scripts.evaluation import Evaluation, EvaluationInputs, FeatureSettings

    inputs = EvaluationInputs(
        str(cohorts["private"]),
        str(cohorts["private"] / "datalist.json"),
        None,
        str(trained_segmenter),
        attribute_ranges,
        spatial_size=TINY_SIZE,
    )
    report = Evaluation(inputs=inputs, features=FeatureSettings(ms_ssim_pairs=3)).run()
    assert report["n_synthetic"] == 2 * 1 and report["privacy_audit"] is None
    assert report["fidelity"]["FD_seg3d"]["real_vs_synthetic"]["FD_seg3d"] == pytest.approx(0.0, abs=1e-6)
    assert report["controllability"]["phase"]["pairs"] == 1


# -------------------------------------------------------------------------------------- bad input


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_synthetic_folders(tmp_path, synthetic_runs):
    synthetic = synthetic_runs[0]
    with pytest.raises(DataError, match="folder not found"):
        load_synthetic(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no manifest.csv"):
        load_synthetic(str(tmp_path / "empty"))
    run = _copy_run(synthetic, tmp_path / "no_sidecar")
    os.remove(run / "row0001_sample000.json")
    with pytest.raises(DataError, match=r"row 1: sidecar .*row0001_sample000.json not found"):
        load_synthetic(str(run))
    run = _copy_run(synthetic, tmp_path / "spacing")
    meta = json.loads((run / "row0000_sample000.json").read_text())
    meta["spacing_mm"] = [1.0, 1.0, 5.0]
    (run / "row0000_sample000.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="spacing mismatch"):
        load_synthetic(str(run))
    run = _copy_run(synthetic, tmp_path / "shape")
    img = nib.load(run / "row0002_sample000.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((48, 48, 6), np.float32), img.affine), run / "row0002_sample000.nii.gz")
    with pytest.raises(DataError, match="shape mismatch"):
        load_synthetic(str(run))
    run = _copy_run(synthetic, tmp_path / "header_only")
    with open(run / "manifest.csv") as f:
        header = next(csv.reader(f))
    with open(run / "manifest.csv", "w", newline="") as f:
        csv.writer(f).writerow(header)
    with pytest.raises(DataError, match="no samples listed"):
        load_synthetic(str(run))


def test_missing_weights_and_too_few_samples(tmp_path):
    with pytest.raises(MissingInputError, match="--inception_weights: weights file .*nope.pth"):
        features.InceptionFeatures(str(tmp_path / "nope.pth"))
    with pytest.raises(MissingInputError, match="--feature_3d_weights"):
        features.TorchScript3DFeatures(str(tmp_path / "nope.ts"))
    with pytest.raises(MissingInputError, match="segmenter weights .*configs/train_segmenter.yaml"):
        segmenter.load_segmenter(str(tmp_path / "segmenter.pt"))
    with pytest.raises(DataError, match="needs at least 2 samples, got 1"):
        fidelity.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(DataError, match="needs at least 2 samples, got 1"):
        diversity.pairwise_ms_ssim(np.zeros((1, 4, 64, 64), np.float32))


def test_optional_feature_networks(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    path = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(Tiny()), str(path))
    ex = features.TorchScript3DFeatures(str(path), "tiny")
    assert ex(np.zeros((3, 4, 16, 16), np.float32)).shape == (3, 5) and features.metric_key(ex) == "FD_tiny"
    bad = tmp_path / "bad.ts"
    bad.write_bytes(b"not a network")
    with pytest.raises(DataError, match="not a TorchScript module"):
        features.TorchScript3DFeatures(str(bad))


def test_inception_features_from_a_local_file(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    ex = features.InceptionFeatures(str(path))
    feats = ex(np.random.default_rng(0).random((3, 4, 32, 32)).astype(np.float32))
    assert feats.shape == (3, 2048) and features.metric_key(ex) == "FID_inception2d"


def test_report_is_written_atomically(tmp_path, monkeypatch):
    from scripts.evaluation import report as rep

    fake = {
        "synthetic_dir": "x",
        "n_synthetic": 0,
        "spatial_size": [1, 1, 1],
        "real_datalist": "r",
        "public_datalist": None,
        "caveat": audit.AUDIT_CAVEAT,
        "headline": {"lv_found_rate": float("nan")},
        "segmenter": {"accuracy": {}},
        "fidelity": {},
        "diversity": {},
        "controllability": {
            "lv_found": 0,
            "n": 0,
            "lv_found_rate": None,
            "lv_found_definition": "",
            "attributes": {},
            "phase": {"accuracy": None, "n": 0, "pair_accuracy": None, "pairs": 0, "method": ""},
        },
        "timings_s": {"total": 0.0},
    }
    # a model trained without noise (the benchmark's baseline): infinite epsilon
    fake["privacy"] = {"epsilon": float("inf"), "delta": 1e-5, "privacy_unit": "subject"}
    json_path, md_path = rep.write_report(fake, str(tmp_path))
    assert json.loads(open(json_path).read())["headline"]["lv_found_rate"] is None  # NaN -> null
    assert "epsilon = inf (steps without noise" in open(md_path).read()
    import scripts.files

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(scripts.files.os, "replace", fail)
    (tmp_path / "second").mkdir()
    with pytest.raises(OSError):
        rep.write_report(fake, str(tmp_path / "second"))
    assert os.listdir(tmp_path / "second") == []  # no half-written report, no temp file left


def test_bundle_run_with_bad_input_exits_non_zero(tmp_path, bundle):
    """The bundle command stops on bad input (before any network is loaded) with the message and a non-zero exit."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = bundle(
        "run", "evaluating", "--config_file", "['configs/common.yaml','configs/evaluate.yaml']",
        "--bundle_root", str(tmp_path),
        "--synthetic_dir", str(empty),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--synthetic_dir" in proc.stderr and "no manifest.csv" in proc.stderr


def test_every_check_fails_on_a_broken_model(trained_segmenter, synthetic_runs, cohorts, tmp_path, attribute_ranges):
    """Reconstruction and ladders of a model with random weights: every demo check FAILS, while the
    instruments still see the LV in the originals (the failures are the model's, not a blind instrument's)."""
    from scripts.evaluation import (
        AuditSettings,
        Evaluation,
        EvaluationInputs,
        FeatureSettings,
        LadderSettings,
        ReconstructionSettings,
    )
    from tools.summary import DEMO_CHECKS, checks

    synthetic, _, model_path = synthetic_runs
    inputs = EvaluationInputs(
        str(synthetic),
        str(cohorts["private"] / "datalist.json"),
        str(cohorts["public"] / "datalist.json"),
        str(trained_segmenter),
        attribute_ranges,
        model_path=model_path,
    )
    report = Evaluation(
        inputs=inputs,
        features=FeatureSettings(ms_ssim_pairs=3),
        audit=AuditSettings(enabled=False),
        reconstruction=ReconstructionSettings(split="private", output_dir=str(tmp_path / "reconstructions")),
        ladders=LadderSettings(lvedv=(80, 180, 280), lvef=(30, 70), seeds=(0, 1), esed_seeds=(0, 1)),
    ).run()
    rec = report["reconstruction"]
    assert rec["split"] == "private" and "not covered by epsilon" in rec["note"]
    # the files: one NIfTI per test record with its original's geometry, and the manifest
    with open(rec["manifest"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [v["id"] for v in rec["per_volume"]] and len(rows) == rec["n"] == 2
    for row in rows:
        original, written = nib.load(row["image"]), nib.load(row["reconstruction"])
        assert written.shape == original.shape and np.allclose(written.affine, original.affine)
    # the instruments see the originals ...
    assert rec["classical_detector"]["originals"]["lv_found_rate"] == 1.0
    assert rec["contrast"]["original_median"] > 0.3
    # ... and a random decoder fails every target
    h = report["headline"]
    assert h["recon_psnr_db"] < 24 and h["recon_ssim"] < 0.8 and h["recon_classical_lv_found"] == 0.0
    assert h["recon_segmenter_dice"] < h["recon_segmenter_dice_originals"]
    lad = report["ladders"]
    assert set(lad) >= {"LVEDV", "LVEF", "ESED"} and len(lad["LVEDV"]["segmenter"]["measured_ml"]) == 6
    assert set(lad["LVEDV"]["classical"]["spearman_rho_per_seed"]) == {"0", "1"}
    assert h["ladder_lvedv_lv_found_classical"] == 0.0 and h["classical_lv_found_rate"] == 0.0
    dp = tmp_path / "report.json"
    dp.write_text(json.dumps({"headline": h}))
    public = tmp_path / "public.json"
    public.write_text(json.dumps({"headline": h}))
    lines = checks(str(public), str(dp)).splitlines()[1 : 1 + len(DEMO_CHECKS)]
    assert len(lines) == len(DEMO_CHECKS)
    passed = [line for line in lines if not line.endswith("FAIL")]
    assert not passed, passed


def test_report_of_public_weights_gives_their_note_not_unknown():
    """Samples of the public diffusion.pt: the Markdown report said "Model privacy: unknown"."""
    from scripts.evaluation.report import privacy_line
    from scripts.synthesis.provenance import PUBLIC_NOTE

    assert privacy_line({"privacy": None, "privacy_note": PUBLIC_NOTE}) == f"Model privacy: {PUBLIC_NOTE}"
    assert privacy_line({"privacy": None, "privacy_warning": "no model given"}) == "Model privacy: no model given"
