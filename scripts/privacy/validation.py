"""Checks that a network, its fine-tune scope and its handlers are fit for DP-SGD."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opacus.validators import ModuleValidator
from scripts.errors import ConfigError
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["SCOPES", "validate_network", "apply_scope", "refuse_private_loss_logging"]

SCOPES = ("all", "attention", "conditioning")


def validate_network(model: nn.Module) -> None:
    """Raise ``ValueError`` naming every module that is invalid under DP-SGD.

    A layer that normalises across the batch (BatchNorm, InstanceNorm with running stats)
    mixes records, so one record's contribution is no longer bounded by clipping. Opacus's
    ``ModuleValidator`` is run on each module so its findings carry the module's name.

    Args:
        model: the network to train.
    """
    errors = []
    was_training = model.training
    model.train()  # Opacus's validators also require training mode, which is not a DP property
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) or (isinstance(module, _InstanceNorm) and module.track_running_stats):
            errors.append(f"'{name}' ({type(module).__name__}) normalises across the batch and mixes records")
        elif isinstance(module, nn.Embedding) and module.max_norm is not None:
            # Embedding.forward renormalises the looked-up rows of the weight IN PLACE: a change
            # of the weights by private data outside the clipped, noised update
            errors.append(
                f"'{name}' (Embedding with max_norm={module.max_norm}) renormalises its weight rows in place, outside "
                "DP-SGD; use max_norm=None"
            )
        elif next(module.children(), None) is None:  # leaves: Opacus's validators look at leaf modules
            errors += [
                f"'{name}' ({type(module).__name__}): {e}" for e in ModuleValidator.validate(module, strict=False)
            ]
    model.train(was_training)
    if errors:
        raise ConfigError(
            "network is not valid for DP-SGD: " + "; ".join(errors) + ". Use GroupNorm or LayerNorm instead."
        )


def apply_scope(model: nn.Module, scope: str) -> list[str]:
    """Freeze every parameter outside the fine-tune ``scope``; return the trainable names.

    Scopes: ``all``; ``attention`` (the UNet's spatial-transformer blocks and the attribute
    encoder, as DP-LDM and the paper's ``finetune`` flag); ``conditioning`` (the attribute
    encoder and the cross-attention layers that read its tokens).

    Args:
        model: a :class:`~scripts.networks.ConditionalDiffusionUNet` (or any module for ``all``).
        scope: one of :data:`SCOPES`.

    Returns:
        names of the parameters left trainable.
    """
    from monai.networks.nets.diffusion_model_unet import SpatialTransformer

    if scope not in SCOPES:
        raise ConfigError(f"config field 'finetune_scope': expected one of {list(SCOPES)}, got {scope!r}")
    if scope == "all":
        selected = {id(p) for p in model.parameters()}
    else:
        modules = [m for n, m in model.named_modules() if n == "attribute_encoder"]
        if scope == "attention":
            modules += [m for m in model.modules() if isinstance(m, SpatialTransformer)]
        else:
            modules += [m for n, m in model.named_modules() if n.endswith(".attn2")]
        if not modules:
            raise ConfigError(f"finetune_scope={scope!r}: the network has no attribute encoder or attention blocks")
        selected = {id(p) for m in modules for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in selected)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"finetune_scope={scope!r} leaves no trainable parameter")
    return trainable


def refuse_private_loss_logging(handlers: Sequence[Any]) -> None:
    """Raise ``ValueError`` if a handler would log per-iteration outputs of the DP trainer.

    MONAI's ``--tracking mlflow`` appends an ``MLFlowHandler`` that logs the training loss every
    iteration: on private data that is not differentially private. The DP stages log epsilon
    to MLflow through their own handler instead.

    Args:
        handlers: the trainer's handlers (``train#handlers`` of the bundle config).
    """
    from monai.handlers import MLFlowHandler

    for h in handlers:
        if isinstance(h, MLFlowHandler) and h.iteration_log:
            raise ConfigError(
                "an MLflow handler would log the training loss on the PRIVATE data every iteration (MONAI's "
                "--tracking mlflow does that), which is not differentially private. The DP stages already log their "
                "parameters and epsilon to MLflow: drop --tracking and use --tracking_uri / --experiment_name"
            )
