"""Absurd values and malformed inputs: refused or answered with the numbers, never a hang or a silent result."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import jittered, stage_checkpoint_info, tiny_stage_networks, write_privacy_report
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.data import read_attributes_csv
from scripts.errors import CheckpointError, ConfigError, DataError
from scripts.handlers import AtomicCheckpoint
from scripts.privacy.accounting import MIN_NOISE_MULTIPLIER, calibrate_noise, compute_epsilon
from scripts.release import ReleaseError, release

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(120)  # a hang guard: the search used to run for minutes at this target
@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibrate_noise_huge_target_answers_with_the_smallest_searched_sigma(accountant):
    with pytest.warns(RuntimeWarning, match="smallest searched noise_multiplier"):
        sigma = calibrate_noise(1e6, 1e-5, 0.5, 2, accountant=accountant)
    assert sigma == MIN_NOISE_MULTIPLIER
    assert compute_epsilon(0.5, sigma, 2, 1e-5, accountant=accountant) <= 1e6


def _table(path, header: list[str], row: list[str]):
    path.write_text(",".join(header) + "\n" + ",".join(row) + "\n")
    return str(path)


def test_training_table_with_a_duplicated_column_is_refused(tmp_path):

    header = ["id", *ATTRIBUTE_NAMES, "LVEDV"]
    path = _table(tmp_path / "a.csv", header, ["r0", *["1"] * len(ATTRIBUTE_NAMES), "500"])
    with pytest.raises(DataError, match=r"duplicated column\(s\) \['LVEDV'\]"):
        read_attributes_csv(path)


@pytest.mark.parametrize("value", ["1e30", "1e6"])
def test_training_table_with_an_absurd_volume_is_refused(tmp_path, value, attribute_ranges):

    cells = ["100" if n != "LVEDV" else value for n in ATTRIBUTE_NAMES]
    cells = [c if n not in ("SEX", "ESED") else "1" for n, c in zip(ATTRIBUTE_NAMES, cells)]
    path = _table(tmp_path / "a.csv", ["id", *ATTRIBUTE_NAMES], ["r0", *cells])
    with pytest.raises(
        DataError, match=r"column 'LVEDV': .* is not a possible value; expected a number in \[0, 1000\]"
    ):
        read_attributes_csv(path, attribute_ranges)


def test_checkpoint_with_non_finite_weights_never_replaces_a_good_one(tmp_path):

    net = torch.nn.Linear(2, 2)
    saver = AtomicCheckpoint(str(tmp_path), {"network": net}, "final.pt", "last.pt")
    engine = SimpleNamespace(state=SimpleNamespace(epoch=1))
    saver.save(engine, saver.final_path)
    good = (tmp_path / "final.pt").read_bytes()
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"network\.weight.*the previous file is kept"):
        saver.save(engine, saver.final_path)
    assert (tmp_path / "final.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.pt"]


def test_release_refuses_a_model_trained_without_noise_unless_asked(tmp_path):

    models = tmp_path / "models"
    models.mkdir()
    net = tiny_stage_networks(models)
    schedule = {"num_train_timesteps": 150, "schedule": "linear_beta", "beta_start": 1.0e-4, "beta_end": 7.0e-2}
    info = stage_checkpoint_info(net, "./models/autoencoder.pt", schedule)
    state = net.state_dict()
    torch.save({"network": state, "ema": state, **info}, models / "diffusion.pt")
    tuned = jittered(state)
    dp = {"network": tuned, "ema": tuned, "dp": {"steps_done": 4}, "pretrained": "./models/diffusion.pt", **info}
    torch.save(dp, models / "model.pt")
    write_privacy_report(models, "./models/model.pt", "./models/autoencoder.pt")
    report = models / "privacy_report.json"
    content = json.loads(report.read_text())
    content.update(epsilon=None, covers="nothing: steps without noise (noise_multiplier 0) were taken")
    report.write_text(json.dumps(content))
    args = {name: models / f"{name}.pt" for name in ("autoencoder", "diffusion", "model")}
    out = tmp_path / "release"
    with pytest.raises(ReleaseError, match="WITHOUT noise.*--allow_non_private"):
        release(out, "https://example.org/r", ROOT, **args)
    assert not out.exists()
    summary = release(out, "https://example.org/r", ROOT, **args, allow_non_private=True)
    with zipfile.ZipFile(summary["archive"]) as archive:
        large_files = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("large_files.yml"))
    assert "WITHOUT noise" in large_files and "NO differential" in large_files


def test_unreachable_tracking_server_ends_in_one_short_error(tmp_path):
    """MONAI wraps the config's exceptions three deep; a bundle error is reported in a few lines."""

    with socket.socket() as s:  # a free local port: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CARDIAC_LDM_TRACEBACK", None)
    argv = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        "['configs/common.yaml','configs/train_autoencoder.yaml']",
    ]
    argv += ["--bundle_root", str(tmp_path), "--tracking_uri", f"http://127.0.0.1:{port}"]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: MLflow tracking server") and "does not answer" in lines[-1]
    assert "Traceback" not in done.stderr and len(lines) < 15, done.stderr


def test_phantom_cli_refuses_a_mistyped_option_before_generating(tmp_path):

    out = tmp_path / "cohort"
    argv = [sys.executable, "-m", "scripts.phantom", "--out", str(out), "--subject", "3"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "unknown option --subject (did you mean --subjects?)" in done.stderr
    assert not out.exists()  # nothing generated


def test_unwritable_output_folder_names_the_path(tmp_path, monkeypatch):
    import errno

    from scripts.errors import OutputWriteError
    from scripts.files import write_text_atomic

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)  # root ignores chmod: refuse as a read-only folder would
    with pytest.raises(OutputWriteError, match=r"report\.json: cannot create a file in .*Permission denied"):
        write_text_atomic(tmp_path / "report.json", "{}")


def test_full_disk_names_the_path_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    import errno

    from scripts.errors import OutputWriteError
    from scripts.files import atomic_path

    target = tmp_path / "model.pt"
    target.write_bytes(b"good")
    with pytest.raises(OutputWriteError, match=r"model\.pt: the disk is full .* MiB free"):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize("kind", ["complex", "zeros", "constant"])
def test_complex_or_blank_volumes_are_refused(tmp_path, kind):
    import nibabel as nib
    import numpy as np
    from monai.transforms import LoadImaged
    from scripts.data import CheckVolumed

    data = {"complex": np.random.rand(8, 8, 4) + 1j, "zeros": np.zeros((8, 8, 4)), "constant": np.full((8, 8, 4), 7.0)}
    array = data[kind].astype(np.complex64 if kind == "complex" else np.float32)
    path = str(tmp_path / f"{kind}.nii.gz")
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    with pytest.warns() if kind == "complex" else contextlib.nullcontext():
        loaded = LoadImaged(keys="image", ensure_channel_first=True)({"image": path})
    with pytest.raises(DataError, match=rf"{kind}\.nii\.gz: field 'image': (complex-valued|every voxel is)"):
        CheckVolumed(keys="image")(loaded)


def test_release_rerun_removes_a_killed_release_staging_folder(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    net = tiny_stage_networks(models)
    schedule = {"num_train_timesteps": 150, "schedule": "linear_beta", "beta_start": 1.0e-4, "beta_end": 7.0e-2}
    state = net.state_dict()
    info = stage_checkpoint_info(net, "./models/autoencoder.pt", schedule)
    torch.save({"network": state, "ema": state, **info}, models / "diffusion.pt")
    out = tmp_path / "release"
    stale = out / ".release_tmp_killed"
    stale.mkdir(parents=True)
    (stale / "diffusion.pt").write_bytes(b"partial")
    release(
        out, "https://example.org/r", ROOT, autoencoder=models / "autoencoder.pt", diffusion=models / "diffusion.pt"
    )
    assert not stale.exists()


class _Units(list):
    """What helpers.dp_settings reads of the privacy units: 12 subjects of 2 records."""

    unit, num_records = "subject", 24

    def __init__(self) -> None:
        super().__init__(range(12))


def test_explicit_sigma_that_affords_no_step_is_refused_before_anything_runs():
    from helpers import dp_settings
    from scripts.errors import ConfigError
    from scripts.privacy.ledger import PrivacyLedger

    settings = dp_settings(_Units(), target_epsilon=10.0)
    with pytest.raises(ConfigError, match=r"noise_multiplier=0.01 affords no DP step .* epsilon"):
        PrivacyLedger(settings, sample_rate=0.5, epochs=2, noise_multiplier=0.01)
    assert PrivacyLedger(settings, sample_rate=0.5, epochs=2, noise_multiplier=1.0).safe_steps == 4


def test_prepare_spacing_message_quotes_what_was_typed():
    """``--spacing abc`` said "got nan"."""
    from scripts.prepare import _spacing

    with pytest.raises(ConfigError, match=r"--spacing must be a number of mm > 0 or 'source'; got 'abc'"):
        _spacing("abc")
