"""Shared fixtures: small phantom cohorts generated once per test session."""

from __future__ import annotations

import inspect
import os
import re
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


# --- markers: `stage` and `distributed` (pytest.ini; `make test-fast` deselects both) --------------
#
# Marked here from the source, not by hand in each file, so a new test is marked the day it is written:
# a test is `stage` when it, a fixture it uses, or a helper function it calls runs another process
# (a bundle stage, a CLI, a server) or a whole bundle workflow in-process; `distributed` when that is a
# multi-process torch.distributed run. A hand-written @pytest.mark.stage is kept as it is. An unmarked
# test that starts a process anyway fails (see _unit_tests_start_no_process), so the split cannot rot.

_SPAWNS = re.compile(r"\bsubprocess\.(run|Popen|call|check_call|check_output)\b|\brun_bundle\(|\bConfigWorkflow\(")
_DISTRIBUTED = re.compile(r"torch\.distributed\.run|\btorchrun\b|nproc_per_node|init_process_group")
_STAGE_FIXTURES = {"bundle"}  # fixtures whose *value* runs a stage when the test calls it


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _spawning_helpers(module, pattern: re.Pattern) -> set[str]:
    """Names of the functions visible in ``module`` (its own, helpers', conftest's) whose body matches
    ``pattern`` directly or through another such function (to a fixed point)."""
    local = {
        name: _source(obj)
        for name, obj in vars(module).items()
        if inspect.isfunction(obj) and getattr(obj, "__module__", "") in (module.__name__, "helpers", "conftest")
    }
    found = {name for name, text in local.items() if pattern.search(text)}
    while True:
        more = {n for n, text in local.items() if n not in found and any(f"{f}(" in text for f in found)}
        if not more:
            return found
        found |= more


def _runs(item: pytest.Item, pattern: re.Pattern, cache: dict) -> bool:
    module = item.module
    key = (module.__name__, pattern.pattern)
    if key not in cache:
        cache[key] = _spawning_helpers(module, pattern)
    texts = [_source(item.function)]
    for name, defs in item._fixtureinfo.name2fixturedefs.items():  # the test's whole fixture closure
        if name == "_unit_tests_start_no_process":  # the guard below names Popen itself
            continue
        texts += [_source(d.func) for d in defs if str(ROOT / "tests") in (inspect.getsourcefile(d.func) or "")]
    return any(pattern.search(t) or any(f"{f}(" in t for f in cache[key]) for t in texts)


def pytest_collection_modifyitems(config, items):
    cache: dict = {}
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        distributed = _runs(item, _DISTRIBUTED, cache)
        if distributed and not item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.distributed)
        stage = distributed or _runs(item, _SPAWNS, cache) or bool(_STAGE_FIXTURES & set(item.fixturenames))
        if stage and not item.get_closest_marker("stage"):
            item.add_marker(pytest.mark.stage)


def _starts_python(args) -> bool:
    command = " ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args)
    return any(word in command for word in (sys.executable, "python", "monai.bundle", "torch.distributed"))


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    """A test without the `stage` marker may not start a Python process (a stage, a CLI, torchrun): the
    classification above would have missed a way of spawning one, and `make test-fast` would be slow.
    Other programs (git for a commit id) stay allowed: they take milliseconds."""
    if request.node.get_closest_marker("stage"):
        return
    popen_init = subprocess.Popen.__init__

    def refuse(self, args, *rest, **kwargs):
        if _starts_python(args):
            raise AssertionError(
                f"{request.node.nodeid} starts a Python process ({args!r}) but is not marked `stage`: mark it "
                "@pytest.mark.stage or teach tests/conftest.py's _SPAWNS how it starts processes"
            )
        return popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
