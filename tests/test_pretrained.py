"""The demo's shipped public pre-trained weights: ship/install round trip, and the committed files themselves."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import ROOT, save_autoencoder, tiny_autoencoder, tiny_unet
from monai.bundle import ConfigParser
from scripts.errors import CheckpointError, MissingInputError
from scripts.files import sha256
from scripts.networks import load_autoencoder, load_diffusion
from tools import pretrained
from tools.demo import AUTOENCODER, DIFFUSION, demo_steps, pretrain_steps

SHIPPED = ROOT / "models" / "demo"


def _stage_checkpoints(models):
    models.mkdir()
    ae = tiny_autoencoder(measured=True)
    save_autoencoder(ae, models / "autoencoder.pt")
    ckpt = torch.load(models / "autoencoder.pt", weights_only=False)
    torch.save({**ckpt, "optimizer": {"state": {}}, "rng": {"torch": 1}}, models / "autoencoder.pt")
    net = tiny_unet()
    torch.save(
        {
            "network": net.state_dict(),
            "ema": net.state_dict(),
            "optimizer": {"big": torch.zeros(1000)},
            "autoencoder": "models/autoencoder.pt",
            "autoencoder_sha256": sha256(models / "autoencoder.pt"),  # the stage-written file, with its state
        },
        models / "diffusion.pt",
    )


def test_ship_strips_training_state_records_hashes_and_install_checks_them(tmp_path):
    _stage_checkpoints(tmp_path / "models")
    times = tmp_path / "times.tsv"
    times.write_text("autoencoder\t12.5\t0\t1.0\nlatent diffusion\t30.0\t0\t14.0\n")
    record = pretrained.ship(str(tmp_path / "models"), str(tmp_path / "out"), settings={"seed": 0}, times=str(times))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["PROVENANCE.json", "autoencoder.pt", "diffusion.pt"]
    assert json.loads((out / "PROVENANCE.json").read_text()) == record
    assert record["seed"] == 0 and record["wall_time_s"] == {"autoencoder": 12.5, "latent diffusion": 30.0}
    for name in pretrained.SHIPPED:
        assert record["files"][name]["sha256"] == sha256(out / name)
        assert not {"optimizer", "rng"} & set(torch.load(out / name, weights_only=False))
    assert {"network", "architecture"} <= set(torch.load(out / "autoencoder.pt", weights_only=False))
    # stripping changed the autoencoder file's hash: the shipped diffusion names the shipped autoencoder
    # (it named the stage-written one, so synthesis refused the installed pair)
    shipped_ae = torch.load(out / "diffusion.pt", weights_only=False)["autoencoder_sha256"]
    assert shipped_ae == sha256(out / "autoencoder.pt") != sha256(tmp_path / "models" / "autoencoder.pt")
    pretrained.install(str(out), str(tmp_path / "installed"))
    assert sha256(tmp_path / "installed" / "diffusion.pt") == record["files"]["diffusion.pt"]["sha256"]
    # a changed file is refused and nothing is copied
    (out / "diffusion.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(CheckpointError, match="SHA-256"):
        pretrained.install(str(out), str(tmp_path / "other"))
    assert not (tmp_path / "other").exists()
    with pytest.raises(MissingInputError, match="make pretrain"):
        pretrained.install(str(tmp_path / "nothing"), str(tmp_path / "other"))


def test_ship_refuses_a_diffusion_trained_with_another_autoencoder(tmp_path):
    _stage_checkpoints(tmp_path / "models")
    ckpt = torch.load(tmp_path / "models" / "diffusion.pt", weights_only=False)
    torch.save({**ckpt, "autoencoder_sha256": "0" * 64}, tmp_path / "models" / "diffusion.pt")
    with pytest.raises(CheckpointError, match="trained with the autoencoder of SHA-256 0000"):
        pretrained.ship(str(tmp_path / "models"), str(tmp_path / "out"), settings={})
    assert not (tmp_path / "out").exists()


def test_demo_installs_the_shipped_weights_unless_asked_to_train_them():
    shipped = {s.name: s for s in demo_steps(pretrained="models/demo")}
    assert "autoencoder" not in shipped and "latent diffusion" not in shipped
    assert shipped["public pre-trained weights"].argv == ["install", "--shipped", "models/demo"]
    for name in ("DP fine-tuning", "segmenter", "synthesis: public model"):
        assert "public pre-trained weights" in shipped[name].needs
    scratch = {s.name for s in demo_steps(pretrained=None)}
    assert {"autoencoder", "latent diffusion"} <= scratch and "public pre-trained weights" not in scratch
    steps = pretrain_steps(out="models/demo")
    assert [s.name for s in steps] == [
        "phantom cohorts",
        "prepare: public",
        "prepare: private",
        "autoencoder",
        "latent diffusion",
        "ship pre-trained weights",
    ]
    settings = json.loads(steps[-1].argv[steps[-1].argv.index("--settings") + 1])
    assert settings["configs"] == {"autoencoder": AUTOENCODER, "diffusion": DIFFUSION} and "seed" in settings


def _config_network(config_list: str):
    parser = ConfigParser()
    parser.read_config([str(ROOT / f) for f in eval(config_list)])  # noqa: S307 (the demo's own literal list)
    return parser


def test_committed_demo_weights_match_their_record_and_the_current_configs():
    record = pretrained.check(str(SHIPPED))  # every file's SHA-256 as recorded
    assert record["command"] == "make pretrain" and record["commit"]
    assert sum(f["bytes"] for f in record["files"].values()) <= pretrained.MAX_BYTES
    assert record["configs"] == {"autoencoder": AUTOENCODER, "diffusion": DIFFUSION}
    autoencoder = load_autoencoder(str(SHIPPED / "autoencoder.pt"))
    ae_config = _config_network(AUTOENCODER)
    assert autoencoder.init_kwargs == ae_config.get_parsed_content("network_def").init_kwargs
    network, info = load_diffusion(str(SHIPPED / "diffusion.pt"))
    config = _config_network(DIFFUSION)
    assert network.init_kwargs == config.get_parsed_content("network_def").init_kwargs
    assert list(info["latent_shape"]) == list(config["latent_shape"])
    assert list(info["spatial_size"]) == list(config["spatial_size"])
    assert info["scale_factor"] == pytest.approx(float(autoencoder.scale_factor))
    # the installed pair decodes: the diffusion names the shipped autoencoder (None: weights from before hashes)
    assert info.get("autoencoder_sha256") in (None, record["files"]["autoencoder.pt"]["sha256"])
