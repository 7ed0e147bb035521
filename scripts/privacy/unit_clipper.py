"""The DP stage's per-unit clipping: ``grad_sample_mode`` resolved once, book-keeping checked before it is trusted.

:func:`scripts.privacy.per_sample.clipped_grad_sum` is exact in every mode for the networks
this bundle ships, but ``"bookkeeping"`` rests on an assumption that no rule on layer types
can check: every trainable layer sees its input batch-first with a unit's rows adjacent,
and nothing mixes rows of different units. Networks that break it run without an error and
clip the wrong quantity (a learned positional table looked up with ``arange(T)``: 1.14-1.75 C
with the noise off; a Linear applied to a sequence-first tensor: 1.83-2.05 C; a functional
``F.batch_norm``: 1.79-4.28 C, where ``"loop"`` gives 1.000 C). So :class:`UnitClipper`

* resolves ``"auto"`` once, after the fine-tune scope is applied (the layers checked are the
  ones that train), and refuses an explicit ``"bookkeeping"`` whose trainable layers it
  cannot handle before any step is recorded;
* before the first step of every new batch signature (unit shapes and units per physical
  batch), runs book-keeping and ``"loop"`` on a *check batch* of that signature whose values
  are random draws from a private generator (no private value enters the check, only the
  shapes), with a watch for functional batch normalisation; a mismatch of the per-unit norms
  or of the clipped sums, an error, or a batch normalisation makes it fall back to ``"loop"``
  (CPU) or ``"vmap"`` (CUDA) for the rest of the run, with the reason logged;
* never lets a book-keeping error end a step that was already recorded: the step is redone
  with the fallback mode.

The checks' outcome depends on shapes and the network only; which batch sizes come up first
is private, so the fallback is logged without them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from scripts.errors import ConfigError
from scripts.privacy.bookkeeping import unsupported_layers
from scripts.privacy.per_sample import MODES, UnitLoss, clipped_grad_sum, resolve_grad_sample_mode
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["UnitClipper", "check_bookkeeping"]

logger = logging.getLogger(__name__)

# Relative agreement of book-keeping and "loop" on a check batch: they agree to about 1e-6 in
# float32 on the shipped networks (tests/test_bookkeeping.py); layout errors are 10 % and more.
CHECK_RTOL = {torch.float16: 5e-2, torch.bfloat16: 5e-2}
DEFAULT_RTOL = 1e-3


class _BatchNormWatch(TorchFunctionMode):
    """Notes calls of ``F.batch_norm`` / ``torch.batch_norm`` in training mode (they mix the batch's rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.found = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            training = kwargs.get("training", args[5] if len(args) > 5 else False)
            self.found = self.found or bool(training)
        elif func is torch.batch_norm:
            self.found = self.found or bool(kwargs.get("training", args[5] if len(args) > 5 else False))
        return func(*args, **kwargs)


def _shape_key(unit: Mapping[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(unit.items()))


def _check_units(units: Sequence[Mapping[str, torch.Tensor]], generator: torch.Generator) -> list[dict]:
    """Units of the same shapes as ``units`` holding only public values: normal draws, integer and bool zeros."""
    out = []
    for unit in units:
        fake = {}
        for k, v in unit.items():
            if v.is_floating_point():
                fake[k] = torch.randn(v.shape, generator=generator, dtype=torch.float32).to(v.device, v.dtype)
            else:
                fake[k] = torch.zeros_like(v)
        out.append(fake)
    return out


def check_bookkeeping(
    model: nn.Module,
    unit_loss: UnitLoss,
    units: Sequence[Mapping[str, torch.Tensor]],
    max_grad_norm: float,
    max_physical_batch_size: int,
) -> str | None:
    """Why book-keeping cannot be trusted on ``units`` (a check batch of one signature), or None.

    Runs book-keeping (watching for functional batch normalisation) and ``"loop"`` on the
    same units and compares the per-unit norms and the clipped sums.

    Args:
        model: the network, scope applied.
        unit_loss: the unit loss.
        units: a check batch (public values, see :func:`_check_units`).
        max_grad_norm: C.
        max_physical_batch_size: as in the stage.

    Returns:
        the reason for a mismatch, or None when both agree.
    """
    watch = _BatchNormWatch()
    try:
        with watch:
            fast, fast_norms = clipped_grad_sum(
                model, unit_loss, units, max_grad_norm, "bookkeeping", max_physical_batch_size
            )
        if watch.found:
            return "the network calls F.batch_norm in training mode, which mixes the rows of different units"
        exact, exact_norms = clipped_grad_sum(model, unit_loss, units, max_grad_norm, "loop", max_physical_batch_size)
    except (ValueError, RuntimeError, TypeError, IndexError) as err:
        return f"book-keeping failed on a check batch ({type(err).__name__}: {str(err)[:200]})"
    params = [p for p in model.parameters() if p.requires_grad]
    rtol = CHECK_RTOL.get(params[0].dtype, DEFAULT_RTOL) if params else DEFAULT_RTOL
    scale = float(exact_norms.abs().max()) if len(exact_norms) else 0.0
    gap = float((fast_norms - exact_norms).abs().max()) if len(exact_norms) else 0.0
    if not (gap <= rtol * scale + 1e-12):
        return f"its per-unit gradient norms differ from 'loop' by up to {gap / max(scale, 1e-30):.3g} relative"
    total = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(fast, exact)))
    if not float(total) <= rtol * max_grad_norm * len(units) + 1e-12:
        return f"its clipped sum differs from 'loop' by {float(total) / max_grad_norm:.3g} C"
    return None


class UnitClipper:
    """Per-unit clipped gradient sums of a DP stage, in the mode it resolved and checked.

    Args:
        network: the network, with its fine-tune scope applied.
        mode: ``"auto"`` or one of :data:`~scripts.privacy.per_sample.MODES`.
        device: the device of the step.
        max_grad_norm: C.
        max_physical_batch_size: units per physical batch.
        generator: the private generator of the check batches' values.
    """

    def __init__(
        self,
        network: nn.Module,
        mode: str,
        device: str | torch.device,
        max_grad_norm: float,
        max_physical_batch_size: int,
        *,
        generator: torch.Generator,
    ) -> None:
        if mode != "auto" and mode not in MODES:
            raise ConfigError(f"config field 'grad_sample_mode': expected 'auto' or one of {list(MODES)}, got {mode!r}")
        self.network, self.requested = network, mode
        self.max_grad_norm, self.max_physical_batch_size = max_grad_norm, max_physical_batch_size
        self.fallback = "vmap" if torch.device(device).type == "cuda" else "loop"
        if mode == "bookkeeping":
            problems = unsupported_layers(network)
            if problems:
                raise ConfigError(
                    "config field 'grad_sample_mode': 'bookkeeping' cannot clip these trainable parameters (fine-tune "
                    f"scope applied): {'; '.join(problems[:5])}. Use 'auto', 'loop' or 'vmap', or freeze them"
                )
        self.mode = resolve_grad_sample_mode(mode, device, network)
        self.reason: str | None = None
        self.generator = generator
        self._checked: set[tuple] = set()

    @property
    def description(self) -> str:
        """The mode for the report: e.g. ``"bookkeeping"``, ``"loop (auto: ...)"``."""
        if self.reason:
            return f"{self.mode} (fell back from bookkeeping: {self.reason})"
        return self.mode

    def _fall_back(self, reason: str) -> None:
        self.mode, self.reason = self.fallback, reason
        level = logging.INFO if self.requested == "auto" else logging.WARNING
        logger.log(
            level,
            f"grad_sample_mode {self.requested}: per-unit clipping falls back to '{self.fallback}' for the rest of the "
            f"run: {reason}",
        )

    def verify(self, unit_loss: UnitLoss, units: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Check book-keeping on every signature of ``units`` not checked yet (check batches, no private value)."""
        if self.mode != "bookkeeping":
            return
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, unit in enumerate(units):
            groups[_shape_key(unit)].append(i)
        for key, indices in groups.items():
            for start in range(0, len(indices), self.max_physical_batch_size):
                chunk = indices[start : start + self.max_physical_batch_size]
                signature = (key, len(chunk))
                if signature in self._checked:
                    continue
                reason = check_bookkeeping(
                    self.network,
                    unit_loss,
                    _check_units([units[i] for i in chunk], self.generator),
                    self.max_grad_norm,
                    self.max_physical_batch_size,
                )
                if reason:
                    self._fall_back(reason)
                    return
                self._checked.add(signature)

    def __call__(self, unit_loss: UnitLoss, units: Sequence[Mapping[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The sum of the units' clipped gradients (one tensor per trainable parameter)."""
        self.verify(unit_loss, units)
        try:
            summed, _ = clipped_grad_sum(
                self.network, unit_loss, units, self.max_grad_norm, self.mode, self.max_physical_batch_size
            )
        except (ValueError, RuntimeError, TypeError, IndexError) as err:
            if self.mode != "bookkeeping":
                raise
            # the step is recorded already: redo it exactly rather than end the run on it
            self._fall_back(f"book-keeping failed on a step ({type(err).__name__}: {str(err)[:200]})")
            summed, _ = clipped_grad_sum(
                self.network, unit_loss, units, self.max_grad_norm, self.mode, self.max_physical_batch_size
            )
        return summed
