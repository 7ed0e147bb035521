"""The stages log to a real MLflow tracking server (``mlflow server``), and an unanswering one stops a stage.

A module fixture starts ``mlflow server`` on 127.0.0.1 and a free port (SQLite backend store and
proxied artifact store in a temp folder), waits for its health endpoint with a bounded timeout,
and stops the server's whole process group when the module ends, also when a test fails. The
stages run at the tiny sizes of the other stage tests, on the models of the shared ``pretrained``
fixture.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY, run_bundle, train_diffusion
from scripts.tracking import TrackingServerError, check_tracking_uri

DP = "['configs/common.yaml','configs/dp_finetune.yaml','configs/small_dp_finetune.yaml']"
DP_TINY = [*TINY, "--logical_batch_size", "2", "--max_physical_batch_size", "2"]
SERVER_START_TIMEOUT = 180.0  # seconds; the server imports a lot (about 25 s on 2 busy cores)
# MLflow's client retries an unreachable server for minutes by default: keep failures fast here
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
# what the DP fine-tuning stage logs: only these metrics (epsilon and the step count are not statistics of the data)
DP_METRICS = {"epsilon", "dp_steps"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server's process group (the CLI, uvicorn and any helper it spawned)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # helpers left behind by the group leader
    except ProcessLookupError:
        pass
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """URI of a running ``mlflow server`` on 127.0.0.1 (SQLite backend and artifact root in a temp folder)."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_cli),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    # no background job runner (it starts a pool of worker processes the test does not need)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", OMP_NUM_THREADS="1")
    uri = f"http://127.0.0.1:{port}"
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_healthy(proc, uri, root / "server.log")
        yield uri
    finally:
        _stop(proc)


def _wait_healthy(proc: subprocess.Popen, uri: str, log: Path) -> None:
    """Wait (at most SERVER_START_TIMEOUT seconds) until the server answers GET /health with 200."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT:g} s: {log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server_runs(mlflow_server, pretrained, cohorts, tmp_path_factory) -> dict:
    """A diffusion pre-training run (2 epochs) and a DP fine-tuning run (2 epochs) logged to the server."""
    for key, value in {**CLIENT_ENV, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}.items():
        os.environ[key] = value  # inherited by the stage subprocesses; restored below
    root = tmp_path_factory.mktemp("server_bundle")
    (root / "models").mkdir()
    shutil.copy(pretrained / "models" / "autoencoder.pt", root / "models" / "autoencoder.pt")
    try:
        ldm = train_diffusion(
            run_bundle, root, cohorts["public"], "--epochs", "2", "--resume", "False", "--tracking_uri", mlflow_server
        )
        assert ldm.returncode == 0, ldm.stderr[-3000:]
        dp = run_bundle(
            "run",
            "training",
            "--config_file",
            DP,
            "--dataset_dir",
            str(cohorts["private"]),
            "--bundle_root",
            str(root),
            *DP_TINY,
            "--epochs",
            "2",
            "--target_epsilon",
            "8",
            "--tracking_uri",
            mlflow_server,
        )
        assert dp.returncode == 0, dp.stderr[-3000:]
    finally:
        for key in (*CLIENT_ENV, "NO_PROXY", "no_proxy"):
            os.environ.pop(key, None)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("cardiac_ldm")
    assert experiment is not None, "no experiment 'cardiac_ldm' on the server"
    runs = client.search_runs([experiment.experiment_id])
    by_stage = {
        prefix: [r for r in runs if r.info.run_name.startswith(prefix)] for prefix in ("diffusion_", "dp_finetune_")
    }
    report = json.loads((root / "models" / "privacy_report.json").read_text())
    return {"client": client, "runs": by_stage, "report": report, "root": root}


def _history(client, run, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    """Every artifact file of a run (recursively)."""
    files = []
    for info in client.list_artifacts(run_id, path):
        files.extend(_artifacts(client, run_id, info.path) if info.is_dir else [info.path])
    return files


# ----------------------------------------------------------------------------- the server runs


def test_dp_run_on_server_holds_dp_parameters_epsilon_and_report(server_runs):
    client, report = server_runs["client"], server_runs["report"]
    (run,) = server_runs["runs"]["dp_finetune_"]
    (stage,) = report["stages"]
    params = run.data.params
    # sigma, C, sample rate, steps, K, unit, accountant
    assert float(params["noise_multiplier"]) == pytest.approx(stage["noise_multiplier"])
    assert float(params["max_grad_norm"]) == 1.0
    assert float(params["sample_rate"]) == pytest.approx(stage["sample_rate"]) == 0.5
    assert int(params["noise_multiplicity"]) == 1
    assert params["privacy_unit"] == "subject" and params["accountant"] == "prv"
    # steps: planned as a parameter, taken as a metric after every epoch
    assert int(params["planned_steps"]) == stage["steps"] == 4 and int(params["epochs"]) == 2
    assert _history(client, run, "dp_steps") == [2.0, 4.0]
    epsilon = _history(client, run, "epsilon")
    assert len(epsilon) == 2 and epsilon[0] < epsilon[1] == pytest.approx(report["epsilon"])  # one value per epoch
    artifacts = _artifacts(client, run.info.run_id)
    assert "privacy_report.json" in artifacts
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "privacy_report.json")).read_text())
    assert logged["model_sha256"] == report["model_sha256"]
    # nothing computed from the private data but epsilon (and the step count) is logged
    assert set(run.data.metrics) <= DP_METRICS, set(run.data.metrics) - DP_METRICS


def test_dp_run_on_server_holds_sample_images(server_runs):
    """Synthetic samples of the DP model (post-processing: covered by its epsilon) are logged as images."""
    client = server_runs["client"]
    (run,) = server_runs["runs"]["dp_finetune_"]
    images = [a for a in _artifacts(client, run.info.run_id) if a.lower().endswith((".png", ".jpg", ".jpeg"))]
    assert images, (
        "the DP fine-tuning run logs no sample images: configs/dp_finetune.yaml has no montage handler and its "
        f"MLFlowHandler logs only the privacy report (artifacts: {_artifacts(client, run.info.run_id)})"
    )


def test_pretraining_run_on_server_holds_loss_curves(server_runs):
    client = server_runs["client"]
    (run,) = server_runs["runs"]["diffusion_"]
    assert len(_history(client, run, "train_loss")) == 2  # one point per epoch
    assert len(_history(client, run, "val_loss")) == 3  # before training + 2 epochs
    assert any(a.endswith(".png") for a in _artifacts(client, run.info.run_id))  # the sample montage


# ------------------------------------------------------------------- a server that does not answer


def test_unanswering_server_stops_dp_stage_before_private_data(pretrained, bundle, tmp_path, monkeypatch):
    """The DP stage refuses an unanswering --tracking_uri before it reads the private cohort.

    The cohort folder does not exist: a stage that read data before checking the server would
    fail on the missing datalist instead. Needs the configs' ``initialize`` to call
    ``$scripts.tracking.check_tracking_uri(@tracking_uri)``.
    """
    for key, value in CLIENT_ENV.items():
        monkeypatch.setenv(key, value)
    shutil.copytree(pretrained / "models", tmp_path / "models", ignore=shutil.ignore_patterns("*_last.pt"))
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    proc = bundle(
        "run",
        "training",
        "--config_file",
        DP,
        "--dataset_dir",
        str(tmp_path / "private_not_read"),
        "--bundle_root",
        str(tmp_path),
        *DP_TINY,
        "--epochs",
        "1",
        "--tracking_uri",
        uri,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"MLflow tracking server {uri} (--tracking_uri) does not answer" in proc.stderr, (
        "expected the tracking check of the config's initialize block to stop the stage; stderr ends with: "
        + proc.stderr[-1500:]
    )
    assert (
        not (tmp_path / "models" / "model.pt").exists()
        and not (tmp_path / "models" / "dp_finetune_ledger.json").exists()
    )


def _expand(items: list, configs: Path) -> list[str]:
    """The expressions of an ``initialize`` list, with ``%configs/FILE::KEY`` macros replaced by what they name."""
    out = []
    for item in items:
        text = str(item)
        if text.startswith("%") and "::" in text:
            file_name, key = text[1:].split("::", 1)
            value = yaml.safe_load((configs.parent / file_name).read_text())
            for part in key.split("#"):
                value = value[part]
            out.extend(_expand(value if isinstance(value, list) else [value], configs))
        else:
            out.append(text)
    return out


def test_every_tracked_stage_checks_its_tracking_uri():
    """Every stage config with a tracking_uri checks it in ``initialize`` (run before any data is read)."""
    missing = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        config = yaml.safe_load(path.read_text()) or {}
        is_stage = any(key in config for key in ("initialize", "training", "evaluating", "run"))  # not common.yaml
        if "tracking_uri" in config and is_stage:
            calls = " ".join(_expand(config.get("initialize") or [], path.parent))
            if "scripts.tracking.check_tracking_uri(@tracking_uri)" not in calls:
                missing.append(path.name)
    assert not missing, f"initialize lacks $scripts.tracking.check_tracking_uri(@tracking_uri) in: {missing}"


# ------------------------------------------------------------------------- check_tracking_uri


def test_check_tracking_uri_passes_local_stores_and_answering_servers(mlflow_server):
    for uri in ("sqlite:////tmp/x/mlruns.db", "file:///tmp/mlruns", "/tmp/mlruns", "databricks"):
        assert check_tracking_uri(uri) == uri
    assert check_tracking_uri(mlflow_server) == mlflow_server
    assert check_tracking_uri(mlflow_server + "/") == mlflow_server + "/"


def test_check_tracking_uri_refuses_unanswering_and_failing_servers():
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(TrackingServerError, match=rf"MLflow tracking server {uri} \(--tracking_uri\) does not answer"):
        check_tracking_uri(uri, timeout=5)

    class Failing(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's method name)
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        failing = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(TrackingServerError, match=r"answered GET .*/health with HTTP 503"):
            check_tracking_uri(failing, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
