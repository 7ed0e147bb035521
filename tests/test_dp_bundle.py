"""DP fine-tuning as bundle runs (configs/dp_finetune*.yaml) and multi-process DP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, mlflow_runs
from scripts.dp import sha256
from scripts.privacy import compute_epsilon

DP = "['configs/dp_finetune.yaml','configs/small_dp_finetune.yaml']"
# 6 private subjects -> 4 in the training split; logical batch 2 -> q = 0.5, 2 steps an epoch
DP_TINY = [*TINY, "--logical_batch_size", "2", "--max_physical_batch_size", "2"]


def _copy_models(pretrained, root):
    shutil.copytree(pretrained / "models", root / "models", ignore=shutil.ignore_patterns("*_last.pt"))


def _dp(bundle, root, cohort, *extra, config=DP):
    return bundle("run", "training", "--config_file", config, "--dataset_dir", str(cohort), "--bundle_root", str(root), *DP_TINY, *extra)


def test_dp_finetune_end_to_end(pretrained, cohorts, bundle, tmp_path):
    _copy_models(pretrained, tmp_path)
    proc = _dp(bundle, tmp_path, cohorts["private"], "--epochs", "2", "--target_epsilon", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "models" / "privacy_report.json").read_text())
    (stage,) = report["stages"]
    assert report["status"] == "complete" and report["privacy_unit"] == "subject"
    assert stage["units"] == 4 and stage["records"] == 8 and stage["sample_rate"] == 0.5 and stage["steps"] == 4
    assert report["epsilon"] <= 8.0
    assert report["epsilon"] == pytest.approx(compute_epsilon(0.5, stage["noise_multiplier"], 4, 1e-5))
    assert report["epsilon"] > 7.5  # calibrated to use the budget
    assert report["model_sha256"] == sha256(str(tmp_path / "models" / "model.pt"))
    ckpt = torch.load(tmp_path / "models" / "model.pt", weights_only=False)
    assert {"network", "ema", "dp", "architecture", "scale_factor", "scheduler", "latent_shape"} <= set(ckpt)
    assert ckpt["dp"]["steps_done"] == 4
    # trained weights differ from the pre-trained ones only in the fine-tune scope (attention by default)
    pre = torch.load(tmp_path / "models" / "diffusion.pt", weights_only=False)["ema"]
    changed = {k for k in pre if not torch.equal(pre[k], ckpt["network"][k])}
    assert changed and all(".attention" in k or k.startswith("attribute_encoder.") for k in changed)
    assert "Privacy report" in proc.stdout and "epsilon = " in proc.stdout
    client, runs = mlflow_runs(tmp_path, "dp_finetune_")
    (run,) = runs
    eps = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "epsilon"), key=lambda m: m.step)]
    assert len(eps) == 2 and eps[0] < eps[1] == pytest.approx(report["epsilon"])
    assert float(run.data.params["noise_multiplier"]) == pytest.approx(stage["noise_multiplier"])
    assert "privacy_report.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    # nothing computed from the private data but epsilon is logged
    assert set(run.data.metrics) <= {"epsilon", "dp_steps"}


def test_dp_resume_continues_the_accounting(pretrained, cohorts, bundle, tmp_path):
    """A run planned for 2 epochs that stopped after 1 resumes: epsilon keeps accumulating, within the target."""
    _copy_models(pretrained, tmp_path)
    first = _dp(bundle, tmp_path, cohorts["private"], "--epochs", "2", "--train#trainer#max_epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    sigma = torch.load(tmp_path / "models" / "dp_finetune_last.pt", weights_only=False)["dp"]["noise_multiplier"]
    second = _dp(bundle, tmp_path, cohorts["private"], "--epochs", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr + second.stdout
    report = json.loads((tmp_path / "models" / "privacy_report.json").read_text())
    assert report["stages"][0]["noise_multiplier"] == sigma  # not re-calibrated
    assert report["stages"][0]["steps"] == 4
    assert report["epsilon"] == pytest.approx(compute_epsilon(0.5, sigma, 4, 1e-5)) and report["epsilon"] <= 10.0
    ledger = json.loads((tmp_path / "models" / "dp_finetune_ledger.json").read_text())
    assert ledger["stages"][-1]["steps"] == 4


def test_dp_errors_name_the_cause(pretrained, cohorts, bundle, tmp_path):
    missing = _dp(bundle, tmp_path / "empty", cohorts["private"], "--epochs", "1")
    assert missing.returncode != 0
    assert "diffusion.pt not found; it is produced by: python -m monai.bundle run training --config_file configs/train_diffusion.yaml" in missing.stderr
    _copy_models(pretrained, tmp_path)
    too_big = _dp(bundle, tmp_path, cohorts["private"], "--epochs", "1", "--logical_batch_size", "16")
    assert too_big.returncode != 0 and "fewer than logical_batch_size=16" in too_big.stderr
    unreachable = _dp(bundle, tmp_path, cohorts["private"], "--epochs", "50", "--target_epsilon", "0.005")
    assert unreachable.returncode != 0 and "Use a larger target_epsilon" in unreachable.stderr
    assert not (tmp_path / "models" / "model.pt").exists()  # failed runs leave no artefact


def test_dp_autoencoder_ledger_is_composed_into_the_report(pretrained, cohorts, bundle, tmp_path):
    _copy_models(pretrained, tmp_path)
    config = "['configs/dp_finetune_autoencoder.yaml','configs/small_dp_finetune_autoencoder.yaml']"
    ae = _dp(bundle, tmp_path, cohorts["private"], "--epochs", "1", "--target_epsilon", "3", "--accountant", "rdp", config=config)
    assert ae.returncode == 0, ae.stderr[-3000:]
    ae_ckpt = torch.load(tmp_path / "models" / "autoencoder_dp.pt", weights_only=False)
    public = torch.load(tmp_path / "models" / "autoencoder.pt", weights_only=False)
    assert float(ae_ckpt["network"]["scale_factor"]) == float(public["network"]["scale_factor"])  # never re-estimated
    ldm = _dp(
        bundle, tmp_path, cohorts["private"], "--epochs", "1", "--accountant", "rdp",
        "--autoencoder_path", str(tmp_path / "models" / "autoencoder_dp.pt"),
    )
    assert ldm.returncode == 0, ldm.stderr[-3000:]
    report = json.loads((tmp_path / "models" / "privacy_report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["autoencoder_dp_finetune", "diffusion_dp_finetune"]
    alone = [s["epsilon_alone"] for s in report["stages"]]
    assert max(alone) < report["epsilon"] < sum(alone)  # composed by the accountant, not added
    assert report["epsilon"] <= 10.0  # the diffusion stage was calibrated for the whole ledger


def test_distributed_dp_step_equals_single_process(tmp_path):
    """2 CPU processes (gloo), noise off: the all-reduced clipped sum equals the single-process one; same epsilon."""
    script = str(ROOT / "tests" / "dp_distributed_check.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, script, str(tmp_path / "one.json")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, str(tmp_path / "two.json")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (one["world"], two["world"]) == (1, 2)
    assert two["optimizer"] == "UnitDistributedDPOptimizer"
    np.testing.assert_allclose(two["update"], one["update"], rtol=1e-10, atol=1e-12)
    assert np.abs(one["update"]).max() > 0
    assert two["epsilons"][0] == two["epsilons"][1] == pytest.approx(one["epsilons"][0])


def test_multi_process_dp_finetune_bundle(pretrained, cohorts, tmp_path):
    _copy_models(pretrained, tmp_path)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
        "--config_file", "['configs/dp_finetune.yaml','configs/small_dp_finetune.yaml','configs/multi_gpu_dp_finetune.yaml']",
        "--dataset_dir", str(cohorts["private"]), "--bundle_root", str(tmp_path), *DP_TINY, "--epochs", "1",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, MPLBACKEND="Agg"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "models" / "privacy_report.json").read_text())
    stage = report["stages"][0]
    assert stage["steps"] == 2 and stage["sample_rate"] == 0.5
    assert report["epsilon"] == pytest.approx(compute_epsilon(0.5, stage["noise_multiplier"], 2, 1e-5))


def test_monai_tracking_is_refused_for_dp(pretrained, cohorts, bundle, tmp_path):
    """MONAI's --tracking handler logs the private training loss: the DP stage refuses it."""
    _copy_models(pretrained, tmp_path)
    proc = _dp(bundle, tmp_path, cohorts["private"], "--epochs", "1", "--tracking", "mlflow")
    assert proc.returncode != 0
    assert "not differentially private" in proc.stderr
    assert not (tmp_path / "models" / "model.pt").exists()
