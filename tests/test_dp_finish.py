"""A DP run killed after its last step, while its final files were written: the rerun finishes it, spending nothing.

The kill is reproduced by its result: a run that did all its steps, whose model.pt and privacy report are
gone and whose write-ahead ledger is still 'running' (the state a SIGKILL during the final checkpoint or
before the report leaves).
"""

from __future__ import annotations

import json

import pytest
from test_dp_bundle import _copy_models, _dp

pytestmark = pytest.mark.stage


def test_a_run_killed_at_its_very_end_is_finished_by_the_rerun(pretrained, cohorts, bundle, tmp_path):
    _copy_models(pretrained, tmp_path)
    models = tmp_path / "models"
    args = ("--epochs", "1")
    first = _dp(bundle, tmp_path, cohorts["private"], *args)
    assert first.returncode == 0, first.stderr[-3000:]
    done = json.loads((models / "privacy_report.json").read_text())
    ledger_path = models / "dp_finetune_ledger.json"
    # the state of a kill while model.pt was written: every step recorded, no final files
    (models / "model.pt").unlink()
    (models / "privacy_report.json").unlink()
    ledger = json.loads(ledger_path.read_text())
    ledger_path.write_text(json.dumps({**ledger, "status": "running"}))

    fresh = _dp(bundle, tmp_path, cohorts["private"], *args, "--resume", "False")
    assert fresh.returncode != 0 and "rerun the same command with --resume True" in fresh.stderr
    assert "Traceback" not in fresh.stderr and not (models / "model.pt").exists()

    rerun = _dp(bundle, tmp_path, cohorts["private"], *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "without a training step" in rerun.stdout + rerun.stderr
    report = json.loads((models / "privacy_report.json").read_text())
    assert report["epsilon"] == done["epsilon"] and [s["steps"] for s in report["stages"]] == [
        s["steps"] for s in done["stages"]
    ]
    assert report["stages"][0]["noise_multiplier"] == done["stages"][0]["noise_multiplier"]
    assert (models / "model.pt").is_file() and report["model_sha256"]
    final = json.loads(ledger_path.read_text())
    assert final["status"] == "complete" and final["stages"][-1]["steps"] == ledger["stages"][-1]["steps"]

    again = _dp(bundle, tmp_path, cohorts["private"], *args)
    assert again.returncode != 0 and "wrote its final files" in again.stderr


def test_a_moved_bundle_root_resumes_with_its_own_files(pretrained, cohorts, bundle, tmp_path):
    """The ledger names the datalist and the checkpoints the autoencoder relative to the root: a moved root resumes."""
    import shutil

    from test_dp_bundle import DP, DP_TINY

    old = tmp_path / "old"
    _copy_models(pretrained, old)
    shutil.copytree(cohorts["private"], old / "data" / "private")

    def dp(root, *extra):
        return bundle("run", "training", "--config_file", DP, "--bundle_root", str(root), *DP_TINY, *extra)

    first = dp(old, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    new = tmp_path / "new"
    shutil.move(str(old), new)
    second = dp(new, "--epochs", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    report = json.loads((new / "models" / "privacy_report.json").read_text())
    # one stage, resumed (sigma was calibrated for the first run's plan, so the budget stops it there)
    assert len(report["stages"]) == 1 and report["stages"][0]["steps"] == 2
    assert report["stages"][0]["dataset"] == "data/private/datalist.json"
    assert report["autoencoder"].startswith(str(new))
