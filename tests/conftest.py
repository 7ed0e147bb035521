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
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def bundle():
    """Callable running ``python -m monai.bundle ...`` from the bundle root."""
    return run_bundle
