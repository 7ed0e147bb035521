"""A DP run killed after its last step, while its final files were written, in a root that was then moved.

The kill is reproduced by its result: a run that did all its steps, whose model.pt and privacy report are
gone and whose write-ahead ledger is still 'running' (the state a SIGKILL during the final checkpoint or
before the report leaves). The rerun finishes it without a step; the ledger names the datalist and the
checkpoints the autoencoder relative to the root, so it does so from the moved root, with its own files.
"""

from __future__ import annotations

import json
import shutil

import pytest
from test_dp_bundle import DP, DP_TINY, _copy_models

pytestmark = pytest.mark.stage


def test_a_run_killed_at_its_very_end_is_finished_by_the_rerun_in_a_moved_root(pretrained, cohorts, bundle, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _copy_models(pretrained, old)
    shutil.copytree(cohorts["private"], old / "data" / "private")  # the default dataset_dir, inside the root

    def dp(root, *extra):
        return bundle(
            "run", "training", "--config_file", DP, "--bundle_root", str(root), *DP_TINY, "--epochs", "1", *extra
        )

    first = dp(old)
    assert first.returncode == 0, first.stderr[-3000:]
    done = json.loads((old / "models" / "privacy_report.json").read_text())
    assert done["stages"][0]["dataset"] == "data/private/datalist.json"
    # the state of a kill while model.pt was written: every step recorded, no final files
    (old / "models" / "model.pt").unlink()
    (old / "models" / "privacy_report.json").unlink()
    ledger = json.loads((old / "models" / "dp_finetune_ledger.json").read_text())
    (old / "models" / "dp_finetune_ledger.json").write_text(json.dumps({**ledger, "status": "running"}))
    shutil.move(str(old), new)
    models = new / "models"

    fresh = dp(new, "--resume", "False")
    assert fresh.returncode != 0 and "rerun the same command with --resume True" in fresh.stderr
    assert "Traceback" not in fresh.stderr and not (models / "model.pt").exists()

    rerun = dp(new)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "without a training step" in rerun.stdout + rerun.stderr
    report = json.loads((models / "privacy_report.json").read_text())
    assert report["epsilon"] == done["epsilon"] and len(report["stages"]) == 1
    assert report["stages"][0]["steps"] == done["stages"][0]["steps"]
    assert report["stages"][0]["noise_multiplier"] == done["stages"][0]["noise_multiplier"]
    assert (models / "model.pt").is_file() and report["autoencoder"].startswith(str(new))
    final = json.loads((models / "dp_finetune_ledger.json").read_text())
    assert final["status"] == "complete" and final["stages"][-1]["steps"] == ledger["stages"][-1]["steps"]

    again = dp(new)
    assert again.returncode != 0 and "wrote its final files" in again.stderr
