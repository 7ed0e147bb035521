"""Networks: a slice-wise AutoencoderKL, the attribute encoder, and the conditioned LDM UNet.

MONAI core provides ``AutoencoderKL`` and ``DiffusionModelUNet``; what it lacks is (a) an
autoencoder that compresses a short-axis stack in-plane only (a SAX stack has few, thick
slices, and MONAI's downsampling is isotropic), and (b) an encoder that turns a vector of
possibly-missing medical attributes into cross-attention tokens. Both are small wrappers.

Every layer here normalises per sample (GroupNorm / LayerNorm), never across a batch, so
the networks are valid for DP-SGD (docs/README.md section 3).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.utils import look_up_option
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.errors import CheckpointError, ConfigError, MissingInputError
from torch import nn

# default attribute count (a module constant: argument defaults are evaluated once, at definition)
NUM_ATTRIBUTES = len(ATTRIBUTE_NAMES)
AUTOENCODER_STAGE = (
    "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/train_autoencoder.yaml']\""
)
DIFFUSION_STAGE = (
    "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/train_diffusion.yaml']\""
)
WEIGHTS = ("ema", "network")


def to_slices(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) stack -> (B * D, C, H, W) slices (slice-major within each volume)."""
    b, c, d, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)


def to_stack(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * D, C, H, W) slices -> (B, C, D, H, W) stacks; the inverse of :func:`to_slices`."""
    bd, c, h, w = x.shape
    return x.reshape(batch, bd // batch, c, h, w).permute(0, 2, 1, 3, 4)


class SliceAutoencoder(nn.Module):
    """A 2D ``AutoencoderKL`` applied to every slice of a (B, C, D, H, W) stack.

    Compression is in-plane only (by ``2 ** (len(channels) - 1)`` in H and W); the depth is
    kept. The latent scale factor (1 / std of public-training latents) is a buffer, so it
    travels inside the checkpoint and later stages never recompute it on other data.

    Args:
        posterior_std_init: initial posterior std of every latent element (None: MONAI's
            initialisation, about 1). MONAI starts the log-variance convolution at random weights,
            so the decoder first trains on latents whose noise is as large as their signal, and
            with a KL weight of 1e-6 the std shrinks slowly; a small start lets the short CPU
            recipes spend their steps on detail (docs/demo_recipe.md). Only the initial weights
            depend on it.
        kwargs: forwarded to ``monai.networks.nets.AutoencoderKL`` (``spatial_dims`` is 2).
    """

    def __init__(self, posterior_std_init: float | None = None, **kwargs) -> None:
        super().__init__()
        kwargs.pop("spatial_dims", None)
        self.init_kwargs = dict(kwargs)  # stored in checkpoints so later stages rebuild the same network
        if posterior_std_init is not None:  # absent otherwise, so earlier checkpoints compare equal
            self.init_kwargs["posterior_std_init"] = posterior_std_init
        self.autoencoder = AutoencoderKL(spatial_dims=2, **kwargs)
        if posterior_std_init is not None:
            if (
                isinstance(posterior_std_init, bool)
                or not isinstance(posterior_std_init, int | float)
                or not posterior_std_init > 0
            ):
                raise ConfigError(
                    f"config field 'network_def#posterior_std_init': expected a number > 0, got {posterior_std_init!r}"
                )
            log_sigma = self.autoencoder.quant_conv_log_sigma.conv
            nn.init.zeros_(log_sigma.weight)
            nn.init.constant_(log_sigma.bias, 2.0 * math.log(posterior_std_init))
        self.register_buffer("scale_factor", torch.tensor(1.0))
        # 0 until the pre-training stage has measured the scale factor on public data.
        self.register_buffer("scale_factor_measured", torch.tensor(False))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (z_mu, z_sigma), each (B, latent_channels, D, H/f, W/f)."""
        z_mu, z_sigma = self.autoencoder.encode(to_slices(x))
        return to_stack(z_mu, x.shape[0]), to_stack(z_sigma, x.shape[0])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a (B, latent_channels, D, h, w) latent to a (B, C, D, H, W) stack."""
        return to_stack(self.autoencoder.decode(to_slices(z)), z.shape[0])

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (reconstruction, z_mu, z_sigma) like ``AutoencoderKL.forward``.

        In training the latent is sampled from the posterior, ``z_mu + noise * z_sigma``; in
        eval mode its mean is used, so validation losses are deterministic.

        Args:
            x: (B, C, D, H, W) stacks.
            noise: the standard normal draws of the posterior sample, shaped like the latent
                (:meth:`latent_shape`). None draws them from the global RNG (public
                pre-training); the DP stage passes draws from a private generator kept in
                each unit, so no DP step reads the public-seeded global RNG.
        """
        z_mu, z_sigma = self.encode(x)
        if self.training:
            noise = torch.randn_like(z_sigma) if noise is None else noise.to(z_sigma.dtype)
            z = z_mu + noise * z_sigma
        else:
            z = z_mu
        return self.decode(z), z_mu, z_sigma

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """The latent's shape for images of ``image_shape`` (B, C, D, H, W)."""
        factor = 2 ** _num_downsamples(self)
        b, _, d, h, w = image_shape
        return (b, self.autoencoder.latent_channels, d, h // factor, w // factor)

    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic latent (the posterior mean) for the diffusion stage, before scaling."""
        return self.encode(x)[0]

    def decode_stage_2_outputs(self, z: torch.Tensor) -> torch.Tensor:
        """Decode an unscaled latent."""
        return self.decode(z)


class AttributeEncoder(nn.Module):
    """Turn (attribute values, missing-mask) into one cross-attention token per attribute.

    Each attribute has its own ``Linear(1 -> dim)`` embedding; a missing attribute gets a
    learned "missing" embedding instead; tokens then pass SELU and a pre-norm self-attention
    block across the attribute tokens (as in the paper's released code). Built from Linear,
    Embedding and LayerNorm only, so every Opacus per-sample-gradient mode supports it.

    The condition is one tensor (B, A, 2): channel 0 holds the normalised values, channel 1
    the missing flag. Any non-zero flag means missing, so MONAI's classifier-free guidance,
    which fills the unconditional condition with -1, yields the all-missing condition.

    Args:
        num_attributes: number of attributes A.
        dim: token size (the UNet's ``cross_attention_dim``).
        num_heads: heads of the self-attention across tokens.
        global_dim: size of the global embedding; None: none.
    """

    def __init__(
        self, num_attributes: int = NUM_ATTRIBUTES, dim: int = 64, num_heads: int = 4, global_dim: int | None = None
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"attribute encoder: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_attributes, self.dim, self.num_heads = num_attributes, dim, num_heads
        self.value_embeddings = nn.ModuleList(nn.Linear(1, dim) for _ in range(num_attributes))
        self.missing_embedding = nn.Embedding(num_attributes, dim)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.out_norm = nn.LayerNorm(dim)
        self.global_mlp = (
            nn.Sequential(nn.Linear(2 * num_attributes, global_dim), nn.SiLU(), nn.Linear(global_dim, global_dim))
            if global_dim
            else None
        )

    def global_embedding(self, condition: torch.Tensor) -> torch.Tensor:
        """Map a (B, A, 2) condition to one (B, global_dim) vector (any non-zero flag means missing)."""
        missing = condition[..., 1] != 0
        values = torch.where(missing, torch.zeros_like(condition[..., 0]), condition[..., 0])
        return self.global_mlp(torch.cat([values, missing.to(values.dtype)], dim=1))

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        """Map a (B, A, 2) condition to (B, A, dim) tokens."""
        if condition.ndim != 3 or condition.shape[1:] != (self.num_attributes, 2):
            raise ValueError(
                f"attribute encoder: expected condition of shape (B, {self.num_attributes}, 2), "
                f"got {tuple(condition.shape)}"
            )
        values, missing = condition[..., 0:1], (condition[..., 1:2] != 0)
        embedded = torch.stack([emb(values[:, i]) for i, emb in enumerate(self.value_embeddings)], dim=1)
        # looked up per row through the module (not .weight), so per-sample-gradient tools see it
        index = torch.arange(self.num_attributes, device=condition.device).expand(condition.shape[0], -1)
        missing_tokens = self.missing_embedding(index)
        # torch.where selects, so a masked value has no influence on the output or gradients.
        tokens = nn.functional.selu(torch.where(missing, missing_tokens, embedded))
        b, a, d = tokens.shape
        q, k, v = self.qkv(self.norm(tokens)).reshape(b, a, 3, self.num_heads, d // self.num_heads).unbind(2)
        # explicit attention (not scaled_dot_product_attention, which has no vmap batching rule on CPU)
        weights = torch.softmax(torch.einsum("bqhc,bkhc->bhqk", q, k) / (d // self.num_heads) ** 0.5, dim=-1)
        attn = torch.einsum("bhqk,bkhc->bqhc", weights, v)
        tokens = tokens + self.proj(attn.reshape(b, a, d))
        return self.out_norm(tokens)


class ConditionalDiffusionUNet(nn.Module):
    """``DiffusionModelUNet`` conditioned on attributes through an :class:`AttributeEncoder`.

    The forward signature matches what MONAI's ``DiffusionInferer`` calls
    (``x, timesteps, context``), with ``context`` the (B, A, 2) attribute condition.

    With ``global_conditioning``, the condition also reaches every residual block: the attribute
    encoder's global embedding (:meth:`AttributeEncoder.global_embedding`) is added to the
    timestep embedding through MONAI's class-embedding slot (``num_class_embeds = 1``, its lookup
    table replaced by the identity, so the "class label" passed is the embedding itself).
    Cross-attention alone starts from MONAI's zero-initialised projections and picks the
    attributes up slowly; a short training needs this path (docs/README.md, "Demo recipe").

    Args:
        attribute_dim: token size of the attribute encoder (= cross-attention dim).
        attribute_heads: heads of the attribute self-attention.
        num_attributes: number of attributes.
        global_conditioning: also add a global attribute embedding to the timestep embedding.
        unet_kwargs: forwarded to ``DiffusionModelUNet`` (``with_conditioning`` and
            ``cross_attention_dim`` are set here).
    """

    def __init__(
        self,
        attribute_dim: int = 64,
        attribute_heads: int = 4,
        num_attributes: int = NUM_ATTRIBUTES,
        global_conditioning: bool = False,
        **unet_kwargs,
    ) -> None:
        super().__init__()
        self.init_kwargs = dict(
            attribute_dim=attribute_dim, attribute_heads=attribute_heads, num_attributes=num_attributes, **unet_kwargs
        )
        if global_conditioning:  # kept out of older checkpoints' architecture entries
            self.init_kwargs["global_conditioning"] = True
            unet_kwargs["num_class_embeds"] = 1
        time_embed_dim = 4 * list(unet_kwargs.get("channels", (32, 64, 64)))[0]  # DiffusionModelUNet's
        self.attribute_encoder = AttributeEncoder(
            num_attributes, attribute_dim, attribute_heads, time_embed_dim if global_conditioning else None
        )
        unet_kwargs.update(with_conditioning=True, cross_attention_dim=attribute_dim)
        self.unet = DiffusionModelUNet(**unet_kwargs)
        if global_conditioning:
            self.unet.class_embedding = nn.Identity()
        self.num_attributes = num_attributes

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise (or v) for latent ``x`` at ``timesteps`` given the condition."""
        if context is None:  # unconditional: every attribute missing
            context = torch.zeros(x.shape[0], self.num_attributes, 2, device=x.device, dtype=x.dtype)
            context[..., 1] = 1.0
        tokens = self.attribute_encoder(context)
        if self.attribute_encoder.global_mlp is None:
            return self.unet(x, timesteps, context=tokens)
        return self.unet(x, timesteps, context=tokens, class_labels=self.attribute_encoder.global_embedding(context))


def check_latent_shape(spatial_size: Sequence[int], latent_shape: Sequence[int], autoencoder: SliceAutoencoder) -> None:
    """Raise ``ValueError`` unless ``latent_shape`` is what the autoencoder makes of ``spatial_size``.

    Args:
        spatial_size: image (D, H, W).
        latent_shape: configured latent (C, D, h, w).
        autoencoder: the slice-wise autoencoder.
    """
    factor = 2 ** _num_downsamples(autoencoder)
    d, h, w = spatial_size
    expected = (autoencoder.autoencoder.latent_channels, d, h // factor, w // factor)
    if tuple(latent_shape) != expected:
        raise ConfigError(
            f"config field 'latent_shape': {list(latent_shape)} does not match the autoencoder's latent for "
            f"spatial_size {list(spatial_size)}; expected {list(expected)} (C, D, H/{factor}, W/{factor})"
        )


def _num_downsamples(autoencoder: SliceAutoencoder) -> int:
    from monai.networks.nets.autoencoderkl import AEKLDownsample

    return sum(isinstance(m, AEKLDownsample) for m in autoencoder.autoencoder.encoder.modules())


def check_device(device: object) -> None:
    """Refuse a CUDA device on a machine without one (torch.load's error reads like a corrupt file)."""
    cuda = isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA device; pass --device cpu")


def load_checkpoint(
    path: str, produced_by: str, device: str | torch.device = "cpu", required: Sequence[str] = ()
) -> dict:
    """Load a checkpoint dict; every failure names the file and the stage that writes it.

    Args:
        path: checkpoint file.
        produced_by: the bundle command that writes this file (for the error messages).
        device: map_location.
        required: keys the checkpoint must hold (a checkpoint of another stage lacks them).

    Returns:
        the checkpoint dict.

    Raises:
        MissingInputError: the file does not exist.
        CheckpointError: the file is not a readable PyTorch checkpoint dict (text, truncated,
            another format) or lacks a ``required`` key.
    """
    if not os.path.isfile(path):
        raise MissingInputError(f"checkpoint {path} not found; it is produced by: {produced_by}")
    check_device(device)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).strip()[:200]}); the file may be "
            f"truncated or of another kind; expected the file written by: {produced_by}"
        ) from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{path}: expected a checkpoint dict written by: {produced_by}; got a {type(ckpt).__name__}"
        )
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: lacks {missing} (it holds {sorted(ckpt)}); expected the checkpoint written by: {produced_by}"
        )
    return ckpt


def _build(path: str, produced_by: str, build: type[nn.Module], ckpt: dict, weights: str) -> nn.Module:
    """``build(**ckpt['architecture'])`` with ``ckpt[weights]`` loaded; errors name the file and its stage."""
    try:
        model = build(**ckpt["architecture"])
        model.load_state_dict(ckpt[weights])
    except (TypeError, KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: its '{weights}' weights and 'architecture' do not make a {build.__name__} "
            f"({type(e).__name__}: {str(e).strip()[:200]}); expected the checkpoint written by: {produced_by}"
        ) from e
    return model


def load_autoencoder(path: str, device: str | torch.device = "cpu") -> SliceAutoencoder:
    """Rebuild the pre-trained autoencoder from its checkpoint, frozen, with its scale factor.

    Args:
        path: autoencoder checkpoint written by the autoencoder stage.
        device: device of the returned network.

    Returns:
        the autoencoder in eval mode with ``requires_grad=False``; its ``privacy_ledger``
        lists the DP stages behind its weights (empty if it saw only public data).
    """
    ckpt = load_checkpoint(path, AUTOENCODER_STAGE, device, required=("architecture", "network"))
    if "latent_shape" in ckpt:
        raise CheckpointError(
            f"{path}: this is a diffusion-model checkpoint, not an autoencoder; expected the file written by: "
            f"{AUTOENCODER_STAGE}"
        )
    model = _build(path, AUTOENCODER_STAGE, SliceAutoencoder, ckpt, "network")
    # DP stages that produced these weights from private data (empty for public pre-training)
    model.privacy_ledger = list(ckpt.get("privacy_ledger", []))
    if not bool(model.scale_factor_measured):
        raise CheckpointError(
            f"{path}: the latent scale factor was never measured (the autoencoder stage did not complete)"
        )
    return model.to(device).eval().requires_grad_(False)


def load_diffusion(
    path: str, device: str | torch.device = "cpu", weights: str = "ema"
) -> tuple[ConditionalDiffusionUNet, dict]:
    """Rebuild the conditioned diffusion UNet from a checkpoint of the diffusion stage.

    Args:
        path: checkpoint written by the diffusion pre-training (or DP fine-tuning) stage.
        device: device of the returned network.
        weights: ``"ema"`` (default) or ``"network"`` (the raw weights).

    Returns:
        (network, checkpoint dict) — the dict holds ``latent_shape``, ``scale_factor``,
        ``scheduler`` and the other model information stored beside the weights.
    """
    weights = look_up_option(weights, WEIGHTS)
    required = ("architecture", weights, "latent_shape", "spatial_size", "scale_factor", "scheduler")
    ckpt = load_checkpoint(path, DIFFUSION_STAGE, device, required=required)
    model = _build(path, DIFFUSION_STAGE, ConditionalDiffusionUNet, ckpt, weights)
    return model.to(device), ckpt


def check_same_autoencoder(diffusion_info: dict, autoencoder: SliceAutoencoder, autoencoder_path: str) -> None:
    """Raise ``ValueError`` if the autoencoder's scale factor is not the one the diffusion model was trained with."""
    expected, actual = float(diffusion_info["scale_factor"]), float(autoencoder.scale_factor)
    if abs(expected - actual) > 1e-6 * max(1.0, abs(expected)):
        raise CheckpointError(
            f"{autoencoder_path}: latent scale factor {actual:.6g} differs from the {expected:.6g} "
            "the diffusion model was "
            f"trained with (autoencoder {diffusion_info.get('autoencoder')}); use that autoencoder"
        )
