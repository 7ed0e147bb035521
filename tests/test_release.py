"""Model Zoo release (scripts/release.py) and the `monai.bundle download` round trip.

The weights are tiny random networks written in the layout of the stage checkpoints (as in
tests/test_inference.py), so the round trip (release -> local HTTP server -> MONAI's download
client -> download_large_files -> `run inference` from the downloaded folder) takes seconds.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import threading
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from helpers import jittered, stage_checkpoint_info, tiny_stage_networks, write_privacy_report
from scripts.files import sha256
from scripts.release import ReleaseError, main, release

SCHEDULE = {"num_train_timesteps": 150, "schedule": "linear_beta", "beta_start": 1.0e-4, "beta_end": 7.0e-2}
SCHEMA = ROOT.parent / "shared" / "schemas" / "meta_schema_20240725.json"
META = json.loads((ROOT / "configs" / "metadata.json").read_text())
NAME, VERSION = META.get("bundle_name", "cardiac_dp_ldm"), META["version"]
ARCHIVE = f"{NAME}_v{VERSION}.zip"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """models/{autoencoder,diffusion,model}.pt (tiny, random) and a privacy report naming model.pt's SHA-256.

    The checkpoints store the autoencoder as the relative path ``./models/autoencoder.pt``, as a stage
    run from the bundle root with the default ``bundle_root: .`` does.
    """
    models = tmp_path_factory.mktemp("weights") / "models"
    models.mkdir()
    net = tiny_stage_networks(models)
    info = stage_checkpoint_info(net, "./models/autoencoder.pt", SCHEDULE)
    state = net.state_dict()
    torch.save({"network": state, "ema": state, **info}, models / "diffusion.pt")
    tuned = jittered(state)
    torch.save(
        {"network": tuned, "ema": tuned, "dp": {"steps_done": 4}, "pretrained": "./models/diffusion.pt", **info},
        models / "model.pt",
    )
    write_privacy_report(models, "./models/model.pt", "./models/autoencoder.pt")
    return models


def _release(weights: Path, out: Path, base_url: str = "https://example.org/releases/v1", **kwargs) -> dict:
    args = {"autoencoder": weights / "autoencoder.pt", "diffusion": weights / "diffusion.pt", **kwargs}
    return release(out, base_url, ROOT, **args)


@pytest.fixture()
def file_server() -> Iterator[tuple[str, Path]]:
    """(base URL, served folder): a local HTTP server on 127.0.0.1 and a free port, stopped after the test."""
    import tempfile

    served = Path(tempfile.mkdtemp(prefix="release_served_"))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
        shutil.rmtree(served, ignore_errors=True)


# ----------------------------------------------------------------------------------- the release


def test_release_layout_and_large_files(weights, tmp_path):
    summary = _release(weights, tmp_path / "dist", model=weights / "model.pt", report=weights / "privacy_report.json")
    dist = tmp_path / "dist"
    assert sorted(os.listdir(dist)) == sorted(
        [ARCHIVE, f"{ARCHIVE}.sha256", "autoencoder.pt", "diffusion.pt", "model.pt", "privacy_report.json"]
    )
    for f in ("autoencoder.pt", "diffusion.pt", "model.pt", "privacy_report.json"):
        assert (dist / f).read_bytes() == (weights / f).read_bytes()
    with zipfile.ZipFile(dist / ARCHIVE) as archive:
        members = archive.namelist()
        listing = yaml.safe_load(archive.read(f"{NAME}/large_files.yml"))
    assert all(m.startswith(f"{NAME}/") for m in members)  # one top-level folder named after the bundle
    for required in (
        "configs/metadata.json",
        "configs/inference.yaml",
        "scripts/release.py",
        "scripts/networks.py",
        "docs/README.md",
        "docs/data_license.txt",
        "LICENSE",
        "README.md",
        "large_files.yml",
        "models/README.md",
    ):
        assert f"{NAME}/{required}" in members, required
    models = [f"{NAME}/models/{n}" for n in ("README.md", "cohort_card.json", "cohort_card.md")]
    assert [m for m in members if m.startswith(f"{NAME}/models/")] == models  # no weights
    assert not [m for m in members if m.endswith((".pt", ".pyc")) or "__pycache__" in m]
    entries = {e["path"]: e for e in listing["large_files"]}
    assert set(entries) == {
        "models/autoencoder.pt",
        "models/diffusion.pt",
        "models/model.pt",
        "models/privacy_report.json",
    }
    for path, entry in entries.items():
        assert entry["url"] == f"https://example.org/releases/v1/{Path(path).name}"
        assert entry["hash_type"] == "sha256" and entry["hash_val"] == sha256(weights / Path(path).name)
    assert summary["name"] == NAME and summary["version"] == VERSION
    assert summary["total_bytes"] == sum(f.stat().st_size for f in dist.iterdir())
    # the same bundle files give the same archive bytes (from a frozen copy: the work tree may change meanwhile)
    frozen = tmp_path / "frozen"
    for item in ("configs", "scripts", "docs", "models/README.md", "LICENSE", "README.md"):
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
        (frozen / item).parent.mkdir(parents=True, exist_ok=True)
        copy(ROOT / item, frozen / item)
    public = {"autoencoder": weights / "autoencoder.pt", "diffusion": weights / "diffusion.pt"}
    archives = [release(tmp_path / d, "https://e.org/r", frozen, **public)["archive"] for d in ("first", "second")]
    assert sha256(archives[0]) == sha256(archives[1])


def test_public_weights_only_by_default(weights, tmp_path):
    # without --model the public diffusion model is also models/model.pt (the Model Zoo checks require it)
    _release(weights, tmp_path)
    files = [ARCHIVE, f"{ARCHIVE}.sha256", "autoencoder.pt", "diffusion.pt", "model.pt"]
    assert sorted(os.listdir(tmp_path)) == sorted(files)
    assert (tmp_path / "model.pt").read_bytes() == (weights / "diffusion.pt").read_bytes()
    with zipfile.ZipFile(tmp_path / ARCHIVE) as archive:
        text = archive.read(f"{NAME}/large_files.yml").decode()
    listing = yaml.safe_load(text)
    paths = ["models/autoencoder.pt", "models/diffusion.pt", "models/model.pt"]
    assert [e["path"] for e in listing["large_files"]] == paths
    assert "public data only: no differential-privacy guarantee is" in text and "privacy_report" not in text
    # the archive's hash beside it, in sha256sum's format
    assert (tmp_path / f"{ARCHIVE}.sha256").read_text() == f"{sha256(tmp_path / ARCHIVE)}  {ARCHIVE}\n"


def test_strip_training_state_publishes_weights_only(weights, tmp_path):
    from scripts.networks import load_autoencoder, load_diffusion

    full = tmp_path / "full"
    full.mkdir()
    # as the diffusion stage writes it: with optimizer, RNG and trainer state
    ckpt = torch.load(weights / "diffusion.pt", weights_only=False)
    ckpt.update(optimizer={"state": {0: torch.zeros(1000)}}, rng={"torch": torch.get_rng_state()}, trainer={})
    torch.save(ckpt, full / "diffusion.pt")
    for f in ("autoencoder.pt", "model.pt", "privacy_report.json"):
        shutil.copy(weights / f, full / f)
    summary = release(
        tmp_path / "dist", "https://example.org/r", ROOT, autoencoder=full / "autoencoder.pt",
        diffusion=full / "diffusion.pt", model=full / "model.pt", strip_training_state=True,
    )  # fmt: skip
    dist = tmp_path / "dist"
    published = torch.load(dist / "diffusion.pt", weights_only=False)
    assert not {"optimizer", "rng", "trainer"} & set(published) and {"network", "ema", "architecture"} <= set(published)
    assert (dist / "diffusion.pt").stat().st_size < (full / "diffusion.pt").stat().st_size
    for f in ("model.pt", "autoencoder.pt"):  # the privacy report names their SHA-256: published byte for byte
        assert (dist / f).read_bytes() == (full / f).read_bytes()
    load_autoencoder(str(dist / "autoencoder.pt"))
    load_diffusion(str(dist / "diffusion.pt"))
    with zipfile.ZipFile(summary["archive"]) as archive:
        listing = yaml.safe_load(archive.read(f"{NAME}/large_files.yml"))
    for entry in listing["large_files"]:
        assert entry["hash_val"] == sha256(dist / Path(entry["path"]).name)


def _fails(match: str, weights: Path, out: Path, **kwargs) -> None:
    with pytest.raises(ReleaseError, match=match):
        _release(weights, out, **kwargs)
    assert not out.exists() or not os.listdir(out), os.listdir(out)  # nothing (half-)written


def test_bad_input_is_refused_and_leaves_nothing(weights, tmp_path):
    out = tmp_path / "dist"
    _fails(
        r"--autoencoder: .*missing\.pt not found; it is produced by: python -m monai.bundle run training "
        + re.escape("--config_file \"['configs/common.yaml','configs/train_autoencoder.yaml']\""),
        weights,
        out,
        autoencoder=tmp_path / "missing.pt",
    )
    _fails(r"--diffusion: .*not found", weights, out, diffusion=tmp_path / "missing.pt")
    # a model without its report
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(weights / "model.pt", lone / "model.pt")
    _fails(r"--model .*privacy report .* was not found", weights, out, model=lone / "model.pt")
    # a report about another model
    other = json.loads((weights / "privacy_report.json").read_text())
    other["model_sha256"] = "0" * 64
    (lone / "privacy_report.json").write_text(json.dumps(other))
    _fails(r"is about another model", weights, out, model=lone / "model.pt")
    # a report that covers images decoded with another autoencoder than the published one
    other = json.loads((weights / "privacy_report.json").read_text())
    other["autoencoder_sha256"] = "1" * 64
    (lone / "privacy_report.json").write_text(json.dumps(other))
    _fails(r"covers images decoded with the autoencoder of SHA-256 1111", weights, out, model=lone / "model.pt")
    _fails(r"--report .* given without --model", weights, out, report=weights / "privacy_report.json")
    # the DP model passed as the public diffusion model, a privately fine-tuned autoencoder as the public one
    _fails(
        r"--diffusion: .* is not the public pre-trained diffusion model", weights, out, diffusion=weights / "model.pt"
    )
    ckpt = torch.load(weights / "autoencoder.pt", weights_only=False)
    ckpt["privacy_ledger"] = [{"stage": "autoencoder_dp_finetune"}]
    torch.save(ckpt, lone / "autoencoder_dp.pt")
    _fails(r"fine-tuned on private data", weights, out, autoencoder=lone / "autoencoder_dp.pt")
    with pytest.raises(ReleaseError, match=r"--base_url: expected the URL"):
        release(out, "example.org/x", ROOT)
    assert not out.exists()


def test_version_already_released_is_refused(weights, tmp_path):
    _release(weights, tmp_path)
    before = {f: sha256(tmp_path / f) for f in os.listdir(tmp_path)}
    _fails_again = pytest.raises(ReleaseError, match=rf"version {VERSION} is already released")
    with _fails_again:
        _release(weights, tmp_path)
    assert {f: sha256(tmp_path / f) for f in os.listdir(tmp_path)} == before


def test_failed_build_leaves_nothing(weights, tmp_path, monkeypatch):
    import scripts.release as rel

    def broken(path, *args):
        Path(path).write_bytes(b"half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(rel, "write_archive", broken)
    with pytest.raises(OSError, match="disk full"):
        _release(weights, tmp_path / "dist", model=weights / "model.pt", report=weights / "privacy_report.json")
    assert not (tmp_path / "dist").exists()  # not even the folder it created


def test_cli_error_exit_status(weights, tmp_path, capsys):
    assert (
        main(
            [
                "--out",
                str(tmp_path),
                "--base_url",
                "http://x",
                "--bundle_root",
                str(ROOT),
                "--autoencoder",
                str(tmp_path / "nope.pt"),
            ]
        )
        == 1
    )
    assert "error: --autoencoder:" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- the round trip


def test_download_round_trip_and_model_zoo_checks(weights, file_server, bundle, tmp_path, monkeypatch, capsys):
    """Release -> HTTP server -> monai.bundle download, download_large_files -> run inference; bad hash refused."""
    base_url, served = file_server
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    # the release CLI in-process (each `python -m` costs seconds of imports); the MONAI steps run as users run them
    code = main(
        [
            "--out",
            str(served),
            "--base_url",
            base_url,
            "--bundle_root",
            str(ROOT),
            "--autoencoder",
            str(weights / "autoencoder.pt"),
            "--diffusion",
            str(weights / "diffusion.pt"),
            "--model",
            str(weights / "model.pt"),
            "--report",
            str(weights / "privacy_report.json"),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert json.loads(printed.out)["archive"] == str(served / ARCHIVE)

    dest = tmp_path / "downloaded"
    down = bundle(
        "download",
        "--name",
        NAME,
        "--version",
        VERSION,
        "--url",
        f"{base_url}/{ARCHIVE}",
        "--bundle_dir",
        str(dest),
        "--progress",
        "False",
    )
    assert down.returncode == 0, down.stderr[-3000:]
    root = dest / NAME
    assert (root / "configs" / "metadata.json").is_file() and not (root / "models" / "model.pt").exists()
    large = bundle("download_large_files", "--bundle_path", str(root))
    assert large.returncode == 0, large.stderr[-3000:]
    for f in ("autoencoder.pt", "diffusion.pt", "model.pt", "privacy_report.json"):
        assert sha256(root / "models" / f) == sha256(weights / f)

    # what the Model Zoo's CI checks in its minimal mode (ci/verify_bundle.py --mode min)
    for required in ("LICENSE", "configs/metadata.json", "models/model.pt", "configs/inference.yaml"):
        assert (root / required).is_file(), required
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    if SCHEMA.exists():
        from monai.bundle import verify_metadata

        (root / "eval").mkdir()
        shutil.copy(SCHEMA, root / "eval" / "schema.json")  # where the Model Zoo CI puts it (no download)
        with warnings.catch_warnings():  # "no hash value provided" for the local schema copy
            warnings.simplefilter("ignore", UserWarning)
            verify_metadata(
                meta_file=str(root / "configs" / "metadata.json"), filepath=str(root / "eval" / "schema.json")
            )

    # synthesis from the downloaded folder (its own scripts package and configs)
    (tmp_path / "req.csv").write_text("LVEDV,LVEF,SEX,count,seed\n150,60,1,1,7\n")
    out = tmp_path / "synthetic"
    infer = bundle(
        "run",
        "inference",
        "--config_file",
        "['configs/common.yaml','configs/inference.yaml']",
        "--bundle_root",
        str(root),
        "--attributes_csv",
        str(tmp_path / "req.csv"),
        "--output_dir",
        str(out),
        "--device",
        "cpu",
        "--num_inference_steps",
        "2",
        "--progress",
        "False",
        cwd=root,
    )
    assert infer.returncode == 0, infer.stderr[-3000:]
    side = json.loads((out / "row0000_sample000.json").read_text())
    assert side["privacy"]["epsilon"] == 7.9 and side["model_version"] == VERSION
    assert (out / "row0000_sample000.nii.gz").is_file()

    # a corrupted file on the server is rejected by its hash, and not installed
    data = bytearray((served / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (served / "model.pt").write_bytes(bytes(data))
    (root / "models" / "model.pt").unlink()
    from monai.apps.utils import HashCheckError
    from monai.bundle import download_large_files

    with pytest.raises(HashCheckError, match=r"sha256 hash check of downloaded file failed: url='.*/model.pt'"):
        download_large_files(bundle_path=str(root))
    assert not (root / "models" / "model.pt").exists()


def test_out_that_is_a_file_is_refused_before_anything_is_read(tmp_path):
    out = tmp_path / "release.zip"
    out.write_text("not a folder")
    with pytest.raises(ReleaseError, match="exists and is not a folder"):
        release(out, "https://example.org/weights", bundle_root=ROOT)
    assert out.read_text() == "not a folder"
