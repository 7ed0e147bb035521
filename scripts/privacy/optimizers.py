"""Opacus's DP optimisers fed with sums of per-UNIT clipped gradients.

``DPOptimizer.pre_step`` clips ``p.grad_sample`` per batch row; a privacy unit here may hold
several rows (a subject's ED and ES volumes, K noise draws), so clipping happens upstream,
per unit (:func:`scripts.privacy.per_sample.clipped_grad_sum`), and the optimiser only adds
the Gaussian noise (std = noise_multiplier x max_grad_norm), averages by the expected batch
size and steps. Accounting is not done here: the stage's :class:`~scripts.privacy.ledger.PrivacyLedger`
records every step before it reads private data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

__all__ = ["UnitDPOptimizer", "UnitDistributedDPOptimizer"]


class _UnitClipped:
    """Mixin for Opacus's DP optimisers when clipping already happened per privacy unit."""

    @property
    def accumulated_iterations(self) -> int:
        return 1

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        if any(p.summed_grad is None for p in self.params):
            raise RuntimeError("set_clipped_sum() must be called before step()")
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        return True

    def set_clipped_sum(self, params: Sequence[torch.Tensor], summed: Sequence[torch.Tensor]) -> None:
        """Hand over the per-unit clipped gradient sum, parameter by parameter.

        Args:
            params: the trainable parameters, in the order of ``summed``.
            summed: the sums of per-unit clipped gradients.
        """
        for p in self.params:
            p.summed_grad = None
        for p, g in zip(params, summed, strict=True):
            p.summed_grad = g


class UnitDPOptimizer(_UnitClipped, DPOptimizer):
    """``DPOptimizer`` fed with per-unit clipped sums (single process)."""


class UnitDistributedDPOptimizer(_UnitClipped, DistributedDPOptimizer):
    """``DistributedDPOptimizer`` fed with per-unit clipped sums: noise on rank 0, then all-reduce."""
