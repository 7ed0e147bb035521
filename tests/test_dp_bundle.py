"""DP fine-tuning as bundle runs (configs/dp_finetune*.yaml) and multi-process DP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, mlflow_runs
from helpers import torchrun_training
from scripts.files import sha256
from scripts.privacy.accounting import compute_epsilon

DP = "['configs/common.yaml','configs/dp_finetune.yaml','configs/small_dp_finetune.yaml']"
# 6 private subjects -> 4 in the training split; logical batch 2 -> q = 0.5, 2 steps an epoch
DP_TINY = [*TINY, "--logical_batch_size", "2", "--max_physical_batch_size", "2"]


def _copy_models(pretrained, root):
    shutil.copytree(pretrained / "models", root / "models", ignore=shutil.ignore_patterns("*_last.pt"))


def _dp(bundle, root, cohort, *extra, config=DP):
    return bundle(
        "run",
        "training",
        "--config_file",
        config,
        "--dataset_dir",
        str(cohort),
        "--bundle_root",
        str(root),
        *DP_TINY,
        *extra,
    )


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
    assert report["autoencoder_sha256"] == sha256(str(tmp_path / "models" / "autoencoder.pt"))
    ckpt = torch.load(tmp_path / "models" / "model.pt", weights_only=False)
    assert {"network", "ema", "dp", "architecture", "scale_factor", "scheduler", "latent_shape"} <= set(ckpt)
    assert sum(h[2] for h in ckpt["dp"]["ledger"]["history"]) == 4
    # the released model holds no RNG state (nothing derived from which units were sampled)
    assert "rng" not in ckpt and not any(torch.is_tensor(v) and v.dtype == torch.uint8 for v in ckpt.values())
    assert [s["stage"] for s in ckpt["privacy_ledger"]] == ["diffusion_dp_finetune"]
    # trained weights differ from the pre-trained ones only in the fine-tune scope (attention by default)
    pre = torch.load(tmp_path / "models" / "diffusion.pt", weights_only=False)["ema"]
    changed = {k for k in pre if not torch.equal(pre[k], ckpt["network"][k])}
    assert changed and all(".attention" in k or k.startswith("attribute_encoder.") for k in changed)
    assert "Privacy report" in proc.stdout and "epsilon = " in proc.stdout
    client, runs = mlflow_runs(tmp_path, "dp_finetune_")
    (run,) = runs
    history = sorted(client.get_metric_history(run.info.run_id, "epsilon"), key=lambda m: m.step)
    eps = [m.value for m in history]
    assert len(eps) == 2 and eps[0] < eps[1] == pytest.approx(report["epsilon"])
    # no per-epoch or per-step time anywhere: not in the log, not in the progress bar, not in MLflow's stamps
    assert len({m.timestamp for m in history}) == 1
    assert "Time taken" not in proc.stdout + proc.stderr and "it/s" not in proc.stdout + proc.stderr
    assert float(run.data.params["noise_multiplier"]) == pytest.approx(stage["noise_multiplier"])
    assert {"privacy_report.json", "dp_finetune_samples.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    # nothing computed from the private data but epsilon is logged
    assert set(run.data.metrics) <= {"epsilon", "dp_steps"}


def test_dp_resume_continues_the_accounting(pretrained, cohorts, bundle, tmp_path):
    """A run killed after its first checkpoint resumes: same sigma, epsilon keeps accumulating, within the target."""
    _copy_models(pretrained, tmp_path)
    args = ("--epochs", "12", "--accountant", "rdp")
    last = tmp_path / "models" / "dp_finetune_last.pt"
    first = _start_dp(tmp_path, cohorts["private"], *args)
    try:
        deadline = time.time() + 300
        while not last.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        first.kill()
        first.communicate()
    assert last.exists() and not (tmp_path / "models" / "model.pt").exists(), "the run ended before it could be killed"
    sigma = torch.load(last, weights_only=False)["dp"]["ledger"]["noise_multiplier"]
    second = _dp(bundle, tmp_path, cohorts["private"], *args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr + second.stdout
    report = json.loads((tmp_path / "models" / "privacy_report.json").read_text())
    assert len(report["stages"]) == 1 and report["stages"][0]["noise_multiplier"] == sigma  # not re-calibrated
    assert report["stages"][0]["steps"] == 24
    assert (
        report["epsilon"] == pytest.approx(compute_epsilon(0.5, sigma, 24, 1e-5, "rdp")) and report["epsilon"] <= 10.0
    )
    ledger = json.loads((tmp_path / "models" / "dp_finetune_ledger.json").read_text())
    assert ledger["stages"][-1]["steps"] == 24 and ledger["status"] == "complete"


def test_dp_resume_with_another_target_is_refused_and_changes_nothing(pretrained, cohorts, bundle, tmp_path):
    _copy_models(pretrained, tmp_path)
    first = _dp(bundle, tmp_path, cohorts["private"], "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p.name: p.read_bytes() for p in (tmp_path / "models").iterdir() if p.is_file() and p.name != ".lock"}
    lower = _dp(bundle, tmp_path, cohorts["private"], "--epochs", "2", "--target_epsilon", "4")
    assert lower.returncode != 0 and "cannot resume: the DP settings ['target_epsilon']" in lower.stderr
    after = {p.name: p.read_bytes() for p in (tmp_path / "models").iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before  # nothing rewritten


def _ledger_steps(path) -> int:
    try:
        return json.loads(path.read_text())["stages"][-1]["steps"]
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def _start_dp(root, cohort, *extra):
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        DP,
        "--dataset_dir",
        str(cohort),
        "--bundle_root",
        str(root),
        *DP_TINY,
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_run_killed_before_its_first_checkpoint_keeps_every_step(pretrained, cohorts, bundle, tmp_path):
    """SIGKILL a real DP run after a few steps, before any checkpoint: the next run's report counts those steps."""
    _copy_models(pretrained, tmp_path)
    ledger = tmp_path / "models" / "dp_finetune_ledger.json"
    # record-level: 8 units, logical batch 1 -> q = 1/8, 8 steps before the first checkpoint
    proc = _start_dp(
        tmp_path, cohorts["private"], "--privacy_unit", "record", "--logical_batch_size", "1", "--epochs", "3"
    )
    try:
        deadline = time.time() + 300
        while _ledger_steps(ledger) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.kill()
    finally:
        proc.kill()
        proc.communicate()
    killed = _ledger_steps(ledger)
    assert killed >= 2 and not (tmp_path / "models" / "dp_finetune_last.pt").exists()
    rerun = _dp(
        bundle, tmp_path, cohorts["private"], "--privacy_unit", "record", "--logical_batch_size", "1", "--epochs", "1"
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "left no checkpoint; its privacy cost is composed" in rerun.stdout + rerun.stderr
    report = json.loads((tmp_path / "models" / "privacy_report.json").read_text())
    steps = [s["steps"] for s in report["stages"]]
    assert steps[0] == killed and "interrupted run" in report["stages"][0]["stage"] and sum(steps) >= killed + 1
    assert report["epsilon"] <= 10.0


def test_a_second_run_on_the_same_bundle_root_is_refused(pretrained, cohorts, bundle, tmp_path):
    _copy_models(pretrained, tmp_path)
    first = _start_dp(tmp_path, cohorts["private"], "--epochs", "50")
    try:
        deadline = time.time() + 300
        while _ledger_steps(tmp_path / "models" / "dp_finetune_ledger.json") < 1 and first.poll() is None:
            assert time.time() < deadline
            time.sleep(0.05)
        second = _dp(bundle, tmp_path, cohorts["private"], "--epochs", "1", "--target_epsilon", "4")
        assert second.returncode != 0
        assert "is in use by another run (pid " + str(first.pid) in second.stderr
    finally:
        first.kill()
        first.communicate()


def test_dp_errors_name_the_cause(pretrained, cohorts, bundle, tmp_path):
    missing = _dp(bundle, tmp_path / "empty", cohorts["private"], "--epochs", "1")
    assert missing.returncode != 0
    assert (
        "diffusion.pt not found; it is produced by: python -m monai.bundle run training --config_file "
        "\"['configs/common.yaml','configs/train_diffusion.yaml']\"" in missing.stderr
    )
    _copy_models(pretrained, tmp_path)
    too_big = _dp(bundle, tmp_path, cohorts["private"], "--epochs", "1", "--logical_batch_size", "16")
    assert too_big.returncode != 0 and "fewer than logical_batch_size=16" in too_big.stderr
    unreachable = _dp(bundle, tmp_path, cohorts["private"], "--epochs", "50", "--target_epsilon", "0.005")
    assert unreachable.returncode != 0 and "Use a larger target_epsilon" in unreachable.stderr
    assert not (tmp_path / "models" / "model.pt").exists()  # failed runs leave no artefact


def test_dp_autoencoder_ledger_is_composed_into_the_report(pretrained, cohorts, bundle, tmp_path):
    _copy_models(pretrained, tmp_path)
    config = (
        "['configs/common.yaml','configs/dp_finetune_autoencoder.yaml','configs/small_dp_finetune_autoencoder.yaml']"
    )
    ae = _dp(
        bundle,
        tmp_path,
        cohorts["private"],
        "--epochs",
        "1",
        "--target_epsilon",
        "3",
        "--accountant",
        "rdp",
        config=config,
    )
    assert ae.returncode == 0, ae.stderr[-3000:]
    ae_ckpt = torch.load(tmp_path / "models" / "autoencoder_dp.pt", weights_only=False)
    public = torch.load(tmp_path / "models" / "autoencoder.pt", weights_only=False)
    assert float(ae_ckpt["network"]["scale_factor"]) == float(public["network"]["scale_factor"])  # never re-estimated
    ldm = _dp(
        bundle,
        tmp_path,
        cohorts["private"],
        "--epochs",
        "1",
        "--accountant",
        "rdp",
        "--autoencoder_path",
        str(tmp_path / "models" / "autoencoder_dp.pt"),
    )
    assert ldm.returncode == 0, ldm.stderr[-3000:]
    report = json.loads((tmp_path / "models" / "privacy_report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["autoencoder_dp_finetune", "diffusion_dp_finetune"]
    alone = [s["epsilon_alone"] for s in report["stages"]]
    assert max(alone) < report["epsilon"] < sum(alone)  # composed by the accountant, not added
    assert report["epsilon"] <= 10.0  # the diffusion stage was calibrated for the whole ledger


def test_distributed_dp_step_equals_single_process(tmp_path):
    """2 CPU processes (gloo), noise off: the all-reduced clipped sum equals the single-process one; same epsilon;
    the real distributed sampler takes every planned step on every rank and includes each unit with rate q."""
    script = str(ROOT / "tests" / "dp_distributed_check.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run(
        [sys.executable, script, str(tmp_path / "one.json")], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            script,
            str(tmp_path / "two.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (one["world"], two["world"]) == (1, 2)
    assert two["optimizer"] == "UnitDistributedDPOptimizer"
    np.testing.assert_allclose(two["update"], one["update"], rtol=1e-10, atol=1e-12)
    assert np.abs(one["update"]).max() > 0
    assert two["epsilons"][0] == two["epsilons"][1] == pytest.approx(one["epsilons"][0])

    setup = two["sampler_setup"]
    q, epochs, n = setup["rate"], setup["epochs"], setup["units"]
    planned = epochs * int(1 / q)
    counts = [0] * n
    for rank, stats in enumerate(two["sampler"]):
        assert stats["steps"] == planned, f"rank {rank} took {stats['steps']} of {planned} planned steps"
        shard = len(range(rank, n, 2))
        expected_empty = planned * (1 - q) ** shard  # Poisson: a local batch is empty with probability (1-q)^shard
        sd = (planned * (1 - q) ** shard * (1 - (1 - q) ** shard)) ** 0.5
        assert abs(stats["empty"] - expected_empty) < 5 * sd, (rank, stats["empty"], expected_empty)
        counts = [c + k for c, k in zip(counts, stats["counts"])]
    rates = np.array(counts) / planned  # every unit is drawn on exactly one rank
    sd = (q * (1 - q) / planned) ** 0.5
    assert np.all(np.abs(rates - q) < 5 * sd), rates


def test_multi_process_dp_finetune_bundle(pretrained, cohorts, tmp_path):
    _copy_models(pretrained, tmp_path)
    config = str(
        ["configs/common.yaml", "configs/dp_finetune.yaml", "configs/small_dp_finetune.yaml"]
        + ["configs/common.yaml", "configs/multi_gpu_dp_finetune.yaml"]
    )
    proc = torchrun_training(config, cohorts["private"], tmp_path, *DP_TINY, "--epochs", "1")
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
