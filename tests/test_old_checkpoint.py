"""Weights saved by the standalone MONAI Generative package load into the bundle's networks.

MONAI Generative (Project-MONAI/GenerativeModels, ``generative.networks.nets``) saved
``AutoencoderKL`` and ``DiffusionModelUNet`` state dicts with another key layout than MONAI core:
self-attention blocks held ``to_q``/``to_k``/``to_v``/``proj_attn`` directly (MONAI core:
``attn.to_q``... ``attn.out_proj``), cross-attention blocks ``to_out.0`` (``out_proj``) and
upsamplers ``conv`` (``postconv``). MONAI core's ``load_old_state_dict`` maps that layout; these
tests write a state dict in the old layout from a network of the bundle's architecture and check
that the network loaded through ``load_old_state_dict`` computes exactly what the original does.
"""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_autoencoder, tiny_unet
from scripts.networks import ConditionalDiffusionUNet, SliceAutoencoder


def _autoencoder(seed: int) -> SliceAutoencoder:
    """Attention blocks at the second level and the non-local ones, and an upsampler."""
    return tiny_autoencoder(
        seed,
        channels=(8, 16),
        norm_num_groups=8,
        scale_factor=None,
        frozen=False,
        attention_levels=[False, True],
        with_encoder_nonlocal_attn=True,
        with_decoder_nonlocal_attn=True,
    ).eval()


def _unet(seed: int) -> ConditionalDiffusionUNet:
    return tiny_unet(seed, head_channels=16, perturb=None).eval()


def generative_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite a MONAI-core state dict of AutoencoderKL / DiffusionModelUNet in MONAI Generative's key layout."""
    old = {}
    for key, value in state.items():
        name = key
        if any(f".attn.to_{p}." in key for p in "qkv"):  # self-attention block: q/k/v directly on the block
            name = key.replace(".attn.to_", ".to_")
        elif ".attn.out_proj." in key:  # ... and its output projection proj_attn
            name = key.replace(".attn.out_proj.", ".proj_attn.")
        elif "transformer_blocks" in key and ".out_proj." in key:  # cross-attention: to_out = [Linear, Dropout]
            name = key.replace(".out_proj.", ".to_out.0.")
        old[name.replace("postconv", "conv")] = value.clone()  # upsampler convolution
    return old


def _perturb_(net: torch.nn.Module) -> None:
    """Make every parameter non-trivial (MONAI zero-initialises some output projections)."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_generative_autoencoder_loads_into_slice_autoencoder():
    original = _autoencoder(0)
    _perturb_(original)
    old = generative_layout(original.autoencoder.state_dict())
    assert "encoder.blocks.4.proj_attn.weight" in old and "decoder.blocks.6.conv.conv.weight" in old
    loaded = _autoencoder(1)
    with pytest.raises(RuntimeError, match="Missing key"):  # the old layout does not load as it is
        loaded.autoencoder.load_state_dict(old)
    loaded.autoencoder.load_old_state_dict(dict(old))
    x = torch.rand(2, 1, 3, 16, 16)  # (B, C, D, H, W): encoded slice by slice
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], original(x)[0])
        assert torch.equal(loaded.encode_stage_2_inputs(x), original.encode_stage_2_inputs(x))
    for key, value in original.autoencoder.state_dict().items():
        assert torch.equal(loaded.autoencoder.state_dict()[key], value), key


def test_generative_unet_loads_into_conditional_diffusion_unet():
    original = _unet(0)
    _perturb_(original)
    old = generative_layout(original.unet.state_dict())
    assert any(".to_out.0." in k for k in old) and "up_blocks.0.upsampler.conv.conv.weight" in old
    loaded = _unet(1)
    with pytest.raises(RuntimeError, match="Missing key"):
        loaded.unet.load_state_dict(old)
    loaded.unet.load_old_state_dict(dict(old))
    # the attribute encoder is the bundle's own module (MONAI Generative had none): load it as usual
    loaded.attribute_encoder.load_state_dict(original.attribute_encoder.state_dict())
    x, t = torch.randn(2, 4, 4, 8, 8), torch.tensor([3, 120])
    condition = torch.zeros(2, 14, 2)
    condition[:, :, 0] = torch.linspace(-1, 1, 14)
    condition[1, 5:, 1] = 1.0  # partly missing
    with torch.no_grad():
        assert torch.equal(loaded(x, t, condition), original(x, t, condition))
        assert torch.equal(loaded(x, t), original(x, t))  # unconditional
