"""The Model Zoo's ways of running the bundle, from a working directory that is not the bundle root.

- the zoo's unit-test pattern (``ci/unit_tests`` of Project-MONAI/model-zoo, as for
  brats_mri_generative_diffusion): ``ConfigWorkflow(config_file=..., workflow_type=..., bundle_root=...)``
  in-process, ``initialize`` / ``check_properties`` / ``run`` / ``finalize``, for the autoencoder, the
  diffusion model, the DP fine-tuning and inference, on tiny sizes;
- ``python -m monai.bundle run`` with absolute config paths and ``--bundle_root``, with the zoo's
  default run id ``run``.

The working directory is an empty folder: MONAI opens ``%file::key`` macros relative to it, so a
config that named another file that way would fail here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from monai.bundle import ConfigWorkflow

CONFIGS = ROOT / "configs"
TINY = {"spatial_size": [8, 48, 48], "num_workers": 0, "epochs": 1, "resume": False}
LATENT = {"latent_shape": [4, 8, 12, 12]}
DP = {"logical_batch_size": 2, "max_physical_batch_size": 2}


def run_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ARGS`` in ``cwd``, the bundle's code on PYTHONPATH (as a user elsewhere sets it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _configs(*names: str) -> list[str]:
    return [str(CONFIGS / f"{n}.yaml") for n in ("common", *names)]


def _workflow(workflow_type: str, names: tuple[str, ...], bundle_root: Path, **override) -> None:
    """The zoo's ``check_workflow(workflow, check_properties=True)``: initialize, check, run, finalize."""
    workflow = ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=_configs(*names),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        bundle_root=str(bundle_root),
        **override,
    )
    workflow.initialize()
    missing = workflow.check_properties()
    assert not missing, f"{names}: properties missing or with wrong ids: {missing}"
    workflow.run()
    workflow.finalize()


@pytest.fixture()
def elsewhere(tmp_path, monkeypatch):
    """An empty working directory; the bundle's code on sys.path, as the zoo's unit tests put it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", [str(ROOT), *sys.path])
    return cwd


def test_zoo_unit_test_pattern(cohorts, tmp_path, elsewhere):
    root = tmp_path / "bundle"
    public, private = str(cohorts["public"]), str(cohorts["private"])
    _workflow("train", ("train_autoencoder", "small_autoencoder"), root, dataset_dir=public, **TINY)
    _workflow("train", ("train_diffusion", "small_diffusion"), root, dataset_dir=public, **TINY, **LATENT)
    _workflow("train", ("dp_finetune", "small_dp_finetune"), root, dataset_dir=private, **TINY, **DP)
    for f in ("autoencoder.pt", "diffusion.pt", "model.pt", "privacy_report.json"):
        assert (root / "models" / f).is_file(), f
    requests = tmp_path / "requests.csv"
    requests.write_text("LVEDV,LVESV,ESED,seed\n150,60,1,0\n")
    out = tmp_path / "synthetic"
    _workflow("infer", ("inference",), root, attributes_csv=str(requests), output_dir=str(out), progress=False)
    volumes = sorted(out.glob("*.nii.gz"))
    assert len(volumes) == 1 and not list(elsewhere.iterdir())  # nothing written to the working directory
    assert json.loads((out / "row0000_sample000.json").read_text())["privacy"]["epsilon"] > 0  # the DP model
    # the public model (what a public-only release ships as models/model.pt): its sidecars say so plainly
    public_out = tmp_path / "synthetic_public"
    public = {"model_path": str(root / "models" / "diffusion.pt"), "output_dir": str(public_out)}
    _workflow("infer", ("inference",), root, attributes_csv=str(requests), progress=False, **public)
    side = json.loads((public_out / "row0000_sample000.json").read_text())
    assert side["privacy"] is None and "public data only" in side["privacy_note"] and "privacy_warning" not in side


def test_cli_from_another_directory_answers_run(cohorts, tmp_path, elsewhere):
    """``monai.bundle run`` (the default id ``run``) trains with absolute config paths; inference from
    another directory is covered in-process above."""
    root = tmp_path / "bundle"
    flags = ["--bundle_root", str(root), "--spatial_size", "[8,48,48]", "--num_workers", "0", "--epochs", "1"]
    ae = run_bundle(
        "run", "--config_file", str(_configs("train_autoencoder", "small_autoencoder")),
        "--dataset_dir", str(cohorts["public"]), *flags, cwd=elsewhere,
    )  # fmt: skip
    assert ae.returncode == 0, ae.stderr[-3000:]
    ckpt = torch.load(root / "models" / "autoencoder.pt", weights_only=False)
    assert {"architecture", "network"} <= set(ckpt)
    assert not list(elsewhere.iterdir()) and os.getcwd() == str(elsewhere)
