"""Shared fixtures: small phantom cohorts generated once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MPLBACKEND", "Agg")

# In-process tests use tiny tensors: one intra-op thread is faster for them, and it avoids
# OpenMP's spin-wait collapse (100x slower ops) when another process holds a core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cohorts(tmp_path_factory) -> dict[str, Path]:
    """A public and a private phantom cohort of 6 subjects each (12 volumes)."""
    from scripts.phantom import generate_cohort

    root = tmp_path_factory.mktemp("cohorts")
    out = {}
    for domain, seed in (("public", 0), ("private", 1)):
        generate_cohort(root / domain, subjects=6, domain=domain, seed=seed, progress=False)
        out[domain] = root / domain
    return out


@pytest.fixture(scope="session")
def attribute_ranges() -> dict:
    """The fixed reference ranges written in configs/common.yaml."""
    import yaml

    with open(ROOT / "configs" / "common.yaml") as f:
        return yaml.safe_load(f)["attribute_ranges"]


def run_bundle(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle ARGS`` from the bundle root; returns the completed process."""
    # one intra-op thread: the test networks are tiny, and it avoids OpenMP spin-wait collapse under load
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def bundle():
    """Callable running ``python -m monai.bundle ...`` from the bundle root."""
    return run_bundle


# --- bundle stages on tiny sizes, shared by the stage tests ---------------------------------------

AE = "['configs/common.yaml','configs/train_autoencoder.yaml','configs/small_autoencoder.yaml']"
LDM = "['configs/common.yaml','configs/train_diffusion.yaml','configs/small_diffusion.yaml']"
TINY = ["--spatial_size", "[8,48,48]", "--num_workers", "0"]
LATENT = ["--latent_shape", "[4,8,12,12]"]


def mlflow_runs(root, prefix):
    """(client, runs whose name starts with ``prefix``) of the bundle's local MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    exp = client.get_experiment_by_name("cardiac_ldm")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name.startswith(prefix)]
    return client, runs


def train_autoencoder(bundle, root, cohort, *extra):
    return bundle(
        "run", "training", "--config_file", AE, "--dataset_dir", str(cohort), "--bundle_root", str(root), *TINY, *extra
    )


def train_diffusion(bundle, root, cohort, *extra):
    return bundle(
        "run",
        "training",
        "--config_file",
        LDM,
        "--dataset_dir",
        str(cohort),
        "--bundle_root",
        str(root),
        *TINY,
        *LATENT,
        *extra,
    )


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, cohorts, bundle):
    """Both pre-training stages, 3 epochs each, in one bundle root."""
    root = tmp_path_factory.mktemp("bundle")
    ae = train_autoencoder(bundle, root, cohorts["public"], "--epochs", "3")
    assert ae.returncode == 0, ae.stderr[-3000:]
    ldm = train_diffusion(bundle, root, cohorts["public"], "--epochs", "3")
    assert ldm.returncode == 0, ldm.stderr[-3000:]
    return root
