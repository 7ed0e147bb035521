"""The clipping rule every per-unit gradient path shares: the modes, the bound C and the clip factor.

A leaf module (it imports only torch), so the paths that compute per-unit gradients
(:mod:`scripts.privacy.per_sample`, :mod:`scripts.privacy.bookkeeping`) clip with one rule
without importing each other.
"""

from __future__ import annotations

import torch

__all__ = ["MODES", "accumulation_dtype", "clip_bound", "clip_factor"]

#: the per-unit gradient paths (``grad_sample_mode``; ``"auto"`` picks one of them)
MODES: tuple[str, ...] = ("loop", "vmap", "bookkeeping")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of norms, clip factors and clipped sums for parameters of ``dtype``: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def clip_bound(max_grad_norm: float, dtype: torch.dtype | None = None) -> float:
    """The norm a unit is clipped to for parameters of ``dtype``: C, or C (1 - 2 eps) in 16-bit floats.

    The clipped sum is accumulated in float32 and rounded to the parameters' dtype once; a
    rounding moves each element by at most eps / 2 relative, and the per-layer norms of
    ``"bookkeeping"`` are computed from 16-bit activations (about eps relative). Clipping to
    C (1 - 2 eps) keeps the rounded unit contribution within C in bfloat16 and float16
    (tests/test_privacy_audit2.py); clipping to C, a bf16 unit reached 1.005 C.
    """
    if dtype is None or not dtype.is_floating_point or dtype.itemsize > 2:
        return float(max_grad_norm)
    return float(max_grad_norm) * (1.0 - 2.0 * torch.finfo(dtype).eps)


def clip_factor(norms: torch.Tensor, max_grad_norm: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Opacus's per-sample clip factor ``min(1, C / (norm + 1e-6))``, in at least float32.

    Same expression as ``DPOptimizer.clip_and_accumulate`` (opacus/optimizers/optimizer.py),
    so a unit here is clipped exactly as Opacus clips a row; for 16-bit parameters
    (``dtype``) C is :func:`clip_bound`'s.

    Args:
        norms: per-unit gradient L2 norms, any shape.
        max_grad_norm: the clipping bound C.
        dtype: the parameters' dtype (None: C as given).

    Returns:
        the factors, shape of ``norms``, in ``accumulation_dtype(norms.dtype)``.
    """
    norms = norms.to(accumulation_dtype(norms.dtype))
    return (clip_bound(max_grad_norm, dtype) / (norms + 1e-6)).clamp(max=1.0)
