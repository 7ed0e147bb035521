"""Checkpoints made by the real MONAI Generative package (``monai-generative==0.2.3``) import into the bundle.

``python -m scripts.import_generative`` maps the old state dict with MONAI core's
``load_old_state_dict`` and reports what it cannot carry. These tests build tiny networks with
``generative.networks.nets`` and compare outputs with the imported bundle networks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ROOT
from generative.networks.nets import AutoencoderKL as GenerativeAutoencoder
from generative.networks.nets import DiffusionModelUNet as GenerativeUNet
from scripts.errors import CheckpointError
from scripts.import_generative import import_autoencoder, import_diffusion, main
from scripts.networks import SliceAutoencoder, load_autoencoder, load_diffusion

warnings.filterwarnings("ignore", module="generative")
TOL = 1e-5
UNET = {"spatial_dims": 3, "in_channels": 4, "out_channels": 4, "num_res_blocks": 1, "norm_num_groups": 8}


def _jitter(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every weight off its initialisation (zero-initialised projections would hide a wrong mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def _generative_autoencoder(attention: bool) -> GenerativeAutoencoder:
    return _jitter(
        GenerativeAutoencoder(
            spatial_dims=2, in_channels=1, out_channels=1, num_channels=(8, 16), latent_channels=4, num_res_blocks=1,
            attention_levels=(False, attention), norm_num_groups=8,
            with_encoder_nonlocal_attn=attention, with_decoder_nonlocal_attn=attention,
        ),
        0,
    )  # fmt: skip


def _ae_kwargs(attention: bool) -> dict:
    return dict(
        in_channels=1, out_channels=1, channels=[8, 16], latent_channels=4, num_res_blocks=1,
        attention_levels=[False, attention], norm_num_groups=8,
        with_encoder_nonlocal_attn=attention, with_decoder_nonlocal_attn=attention,
    )  # fmt: skip


def _ae_difference(old: GenerativeAutoencoder, new: SliceAutoencoder) -> float:
    """Max |difference| of latent mean and reconstruction, the bundle network applied slice-wise."""
    x = torch.rand(2, 1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    slices = x.permute(0, 2, 1, 3, 4).reshape(-1, 1, 16, 16)
    with torch.no_grad():
        mu_old = old.encode(slices)[0]
        rec_old = old.decode(mu_old)
        mu_new, _ = new.eval().encode(x)
        rec_new = new.decode(mu_new)
    flat = lambda t: t.permute(0, 2, 1, 3, 4).reshape(-1, *t.shape[1:2], *t.shape[3:])  # noqa: E731
    return max((flat(mu_new) - mu_old).abs().max().item(), (flat(rec_new) - rec_old).abs().max().item())


@pytest.mark.parametrize("attention", [False, True])
def test_autoencoder_reproduces_generative_outputs(attention):
    old = _generative_autoencoder(attention)
    new, report = import_autoencoder(old.state_dict(), _ae_kwargs(attention))
    assert _ae_difference(old, new) < TOL
    if attention:
        # Generative never applied proj_attn: reported, and the network built without an output projection
        assert new.init_kwargs["include_fc"] is False and report.not_carried
        assert all("proj_attn" in k for k in report.not_carried)
        # the documented load_old_state_dict path alone copies proj_attn into an active projection: it differs
        plain = SliceAutoencoder(**_ae_kwargs(attention))
        plain.autoencoder.load_old_state_dict(dict(old.state_dict()))
        assert _ae_difference(old, plain) > 1e-2
    else:
        assert not report.not_carried and not report.fresh


def _unet_kwargs(width: int = 16, **extra) -> dict:
    return dict(
        attribute_dim=width, attribute_heads=2, channels=[16, 32], attention_levels=[False, True],
        num_head_channels=[0, 8], **UNET, **extra,
    )  # fmt: skip


def _generative_unet(**kwargs) -> GenerativeUNet:
    return _jitter(GenerativeUNet(num_channels=(16, 32), attention_levels=(False, True), num_head_channels=(0, 8),
                                  **UNET, **kwargs), 2)  # fmt: skip


def test_cross_attention_unet_reproduces_outputs_and_reports_the_attribute_encoder():
    old = _generative_unet(with_conditioning=True, cross_attention_dim=16)
    new, report = import_diffusion(old.state_dict(), _unet_kwargs())
    x = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t, context = torch.tensor([3, 70]), torch.randn(2, 14, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (old(x, t, context=context) - new.unet.eval()(x, t, context=context)).abs().max().item()
    assert diff < TOL
    assert not report.not_carried and report.fresh and all(k.startswith("attribute_encoder.") for k in report.fresh)


def test_class_embedding_is_reported_by_name():
    old = _generative_unet(with_conditioning=True, cross_attention_dim=16, num_class_embeds=3)
    _, report = import_diffusion(old.state_dict(), _unet_kwargs())
    assert list(report.not_carried) == ["class_embedding.weight"]
    assert "class labels" in report.not_carried["class_embedding.weight"]


def test_width_mismatch_names_the_parameter_and_both_shapes():
    old = _generative_unet(with_conditioning=True, cross_attention_dim=32)
    with pytest.raises(
        CheckpointError,
        match=r"attn2\.to_k\.weight: state dict torch.Size\(\[32, 32\]\), configured network torch.Size\(\[32, 16\]\)",
    ):  # noqa: E501
        import_diffusion(old.state_dict(), _unet_kwargs(width=16))


def test_unconditional_unet_is_refused_with_the_reason():
    old = _generative_unet(with_conditioning=False)
    with pytest.raises(CheckpointError, match="unconditional Generative DiffusionModelUNet"):
        import_diffusion(old.state_dict(), _unet_kwargs())


def test_command_writes_checkpoints_the_stages_load(tmp_path, capsys):
    """Both kinds through the command, with a config list describing the old networks; the loaders accept them."""
    overlay = tmp_path / "old_networks.yaml"
    overlay.write_text(
        "autoencoder_path: $os.path.join(@ckpt_dir, 'autoencoder.pt')\nckpt_dir: " + str(tmp_path) + "\n"
        "latent_shape: [4, 4, 8, 8]\nspatial_size: [4, 32, 32]\n"
        "network_def#attribute_dim: 16\nnetwork_def#attribute_heads: 2\nnetwork_def#channels: [16, 32]\n"
        "network_def#attention_levels: [false, true]\nnetwork_def#num_head_channels: [0, 8]\n"
        "network_def#num_res_blocks: 1\nnetwork_def#norm_num_groups: 8\n"
    )
    ae_overlay = tmp_path / "old_autoencoder.yaml"
    ae_overlay.write_text(
        "".join(f"network_def#{k}: {v}\n" for k, v in _ae_kwargs(True).items())
        .replace("True", "true")
        .replace("False", "false")
    )  # noqa: E501
    old_ae, old_unet = _generative_autoencoder(True), _generative_unet(with_conditioning=True, cross_attention_dim=16)
    torch.save(old_ae.state_dict(), tmp_path / "ae.pth")
    torch.save(old_unet.state_dict(), tmp_path / "unet.pth")
    common = str(ROOT / "configs" / "common.yaml")
    ae_configs = str([common, str(ROOT / "configs" / "train_autoencoder.yaml"), str(ae_overlay)])
    ldm_configs = str([common, str(ROOT / "configs" / "train_diffusion.yaml"), str(overlay)])
    args = ["--kind", "autoencoder", "--state_dict", str(tmp_path / "ae.pth"), "--config_file", ae_configs]
    assert main([*args, "--scale_factor", "0.8", "--out", str(tmp_path / "autoencoder.pt")]) == 0
    assert "NOT CARRIED encoder.blocks" in capsys.readouterr().out
    args = ["--kind", "diffusion", "--state_dict", str(tmp_path / "unet.pth"), "--config_file", ldm_configs]
    assert main([*args, "--out", str(tmp_path / "diffusion.pt")]) == 0
    assert "FRESH" in capsys.readouterr().out and "attribute_encoder" in str(
        torch.load(tmp_path / "diffusion.pt", weights_only=False)["imported_from"]["fresh"]
    )
    ae = load_autoencoder(str(tmp_path / "autoencoder.pt"))
    assert _ae_difference(old_ae, ae) < TOL and float(ae.scale_factor) == pytest.approx(0.8)
    net, info = load_diffusion(str(tmp_path / "diffusion.pt"))
    assert info["scale_factor"] == pytest.approx(0.8) and info["latent_shape"] == [4, 4, 8, 8]
    # a bad input fails with a short error and writes nothing
    assert main([*args, "--out", str(tmp_path / "x.pt"), "--state_dict", str(tmp_path / "ae.pth")]) == 1
    assert not (tmp_path / "x.pt").exists() and "error:" in capsys.readouterr().err
