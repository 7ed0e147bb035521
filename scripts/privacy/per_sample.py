"""Per-unit gradient clipping for DP-SGD, where a privacy unit may hold several batch rows.

Opacus computes one gradient per *row* of the batch (``p.grad_sample``) and clips each row
(``DPOptimizer.clip_and_accumulate``). Two things this bundle needs do not fit that:

* noise multiplicity K (as in DPDM): a record's loss averages K independent (timestep,
  noise) draws *before* clipping, so the record's sensitivity stays ``max_grad_norm``.
  Stacking the K draws as K batch rows would clip each draw as its own record, so a record
  could move the sum by up to K x ``max_grad_norm`` while the noise is calibrated for one;
* subject-level privacy (docs/privacy.md): a subject's ED and ES volumes are clipped
  together as ONE unit.

So the unit of clipping here is a *unit*: a mapping of tensors whose leading dimension m
(records in the unit x K draws) is what ``unit_loss`` averages over. This module computes
each unit's gradient, its L2 norm, scales it by Opacus's factor
``min(1, max_grad_norm / (norm + 1e-6))`` and returns the sum; the caller adds the Gaussian
noise and steps the optimiser (as ``DPOptimizer.add_noise`` / ``scale_grad`` / ``step`` do).

Three ways to get the per-unit clipped sum, with the same result (tests/test_per_sample.py,
tests/test_bookkeeping.py), and ``"auto"`` (:func:`resolve_grad_sample_mode`) to pick one:

* ``"loop"``: one forward + backward per unit (``torch.autograd.grad``). Activation memory
  is that of one unit, so the peak stays below a non-DP step at the same batch; the cost is
  B small steps instead of one batched step, which on CPU is cheap (CPU throughput is
  roughly linear in the batch) and leaves a GPU idle.
* ``"vmap"``: ``torch.func.vmap(torch.func.grad(...))`` over chunks of at most
  ``max_physical_batch_size`` units of the same m. Batched like a non-DP step (meant for
  GPU), but it holds the chunk's per-unit gradients (chunk x number of parameters) and
  functorch's batching rules keep larger temporaries (a multiple of the non-DP peak at a
  chunk of the whole batch). ``max_physical_batch_size`` trades this against speed.

* ``"bookkeeping"`` (:mod:`scripts.privacy.bookkeeping`): no per-unit gradient of the whole
  model. One forward and one backward of the physical batch (all units' rows together);
  each layer's per-unit gradient norm is computed from its captured input and output
  gradient (Gram-matrix ghost norm when the layer has few positions, per-unit gradient
  otherwise: :mod:`scripts.privacy.grad_norms`), and the clipped sum is formed by
  book-keeping (kept per-unit gradients, or ``A^T (c * G)``) without a second backward.
  About the time and memory of a non-DP step (docs/fast_clipping.md). Needs every
  trainable parameter in a Linear, Conv1d/2d/3d, GroupNorm, LayerNorm or Embedding used
  through its ``forward``, and ``unit_loss`` calling the network once.

On CPU, PyTorch runs a Conv3d whose input has batch 1 and N*C*D*H <= 20480 with its slow
native kernel instead of oneDNN (heuristic in ``ConvParams::use_mkldnn``), several times
slower per sample. Units of one row (K = 1) on a small network therefore make ``"loop"`` slower
than a batched step on CPU (``--size small`` in the benchmark; the numbers are in
benchmarks/README.md); units of 2+ rows (K >= 2,
subjects) and the default network are hardly affected, and ``"vmap"`` folds the units into
the convolution's batch.

Why not Opacus's per-sample modes: they clip per row (see above). Summing Opacus's row grad
samples per unit before clipping would give the unit gradient (no layer mixes rows), but
only with one forward over the whole batch and a loss of the form sum over units of a
function of that unit's output rows; ``unit_loss`` calls the network itself on one unit, so
Opacus would need one forward per unit (the cost of ``"loop"`` plus Opacus's per-row
gradient storage) or a loss that is a mean of per-row terms, which this API does not
promise. Opacus also gives no per-sample gradient to ``AttributeEncoder.missing_embedding``
(its weight is read outside ``Embedding.forward``, where no hook sees it) and fails the
step. For Conv3d its ``"hooks"`` mode unfolds the input and ``"ghost"`` falls back to full
per-sample gradients (measured in docs/fast_clipping.md).
``benchmarks/dp_step.py`` measures them beside ``"loop"`` and ``"vmap"``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

import torch
from scripts.errors import ConfigError
from scripts.privacy.bookkeeping import bookkeeping_clipped_sum, unsupported_layers
from scripts.privacy.clipping import MODES, accumulation_dtype, clip_bound, clip_factor
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["MODES", "accumulation_dtype", "clip_bound", "clip_factor", "clipped_grad_sum", "resolve_grad_sample_mode"]


UnitLoss = Callable[[Callable[..., torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]


def resolve_grad_sample_mode(mode: str, device: str | torch.device = "cpu", network: nn.Module | None = None) -> str:
    """The per-unit clipping mode to run: ``mode`` itself, or for ``"auto"`` the fastest exact one.

    ``"auto"`` is decided by rules on the device and the network's layers, never by timing
    at run time (so a run is reproducible and its report can say why): ``"bookkeeping"``
    whenever every trainable parameter sits in a layer it supports (Linear, Conv1d/2d/3d,
    GroupNorm, LayerNorm, Embedding: :func:`scripts.privacy.bookkeeping.unsupported_layers`),
    on CUDA (one batched forward and backward, memory close to a non-DP step, docs/fast_clipping.md)
    and on CPU (measured fastest there too: ``benchmarks/dp_step.py``, docs/fast_clipping.md).
    Otherwise ``"vmap"`` on CUDA (batched; its memory is bounded by ``max_physical_batch_size``)
    and ``"loop"`` on CPU (batching buys little on CPU, and it holds one unit's activations).

    Args:
        mode: ``"auto"`` or one of :data:`MODES`.
        device: the device the step runs on.
        network: the network with its fine-tune scope applied (``requires_grad`` set); None
            assumes every layer is supported.

    Returns:
        one of :data:`MODES`.
    """
    if mode != "auto":
        if mode not in MODES:
            raise ConfigError(f"config field 'grad_sample_mode': expected 'auto' or one of {list(MODES)}, got {mode!r}")
        return mode
    device = torch.device(device)
    problems = unsupported_layers(network) if network is not None else []
    if problems:
        choice = "vmap" if device.type == "cuda" else "loop"
        logger.info(f"grad_sample_mode auto -> {choice}: 'bookkeeping' does not support {'; '.join(problems[:3])}")
        return choice
    return "bookkeeping"


def clipped_grad_sum(
    model: nn.Module,
    unit_loss: UnitLoss,
    units: Sequence[Mapping[str, torch.Tensor]],
    max_grad_norm: float,
    mode: str = "loop",
    max_physical_batch_size: int = 8,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sum over privacy units of each unit's gradient clipped to L2 norm ``max_grad_norm``.

    The model's ``.grad`` fields are neither read nor written (the gradients are returned),
    and its ``training`` mode is left as it is.

    Args:
        model: the network; only parameters with ``requires_grad`` get gradients.
        unit_loss: ``unit_loss(net, unit)`` returns the scalar loss of one unit, averaged
            over its m rows; ``net(*args, **kwargs)`` behaves like ``model(*args, **kwargs)``.
            With ``mode="vmap"`` it runs under ``torch.func.vmap``: it must use only
            tensors of ``unit`` and ``net`` (no in-place writes to captured tensors, no
            ``.item()``); any random op inside the model draws independently per unit.
        units: the privacy units of the batch; each maps names to tensors whose leading
            dimension is the unit's m rows (records x K draws). All randomness (noise,
            timesteps, condition dropout) is already drawn inside the unit.
        max_grad_norm: the clipping bound C > 0.
        mode: "loop", "vmap", "bookkeeping" (see the module docstring) or "auto"
            (:func:`resolve_grad_sample_mode` on the parameters' device).
        max_physical_batch_size: with "vmap", the most units whose per-unit gradients are
            held at once; with "bookkeeping", the most units in one forward/backward.
            Ignored by "loop", which holds one unit's.

    Returns:
        (grads, norms): ``grads`` has one tensor per trainable parameter, in the order of
        ``[p for p in model.parameters() if p.requires_grad]``, holding the sum of the
        clipped unit gradients (zeros for an empty ``units``); ``norms`` has shape
        ``(len(units),)``, each unit's gradient L2 norm before clipping, in ``units`` order.
        A unit whose gradient is not finite (nan/inf norm) contributes zero to the sum
        (dropping a unit's contribution keeps the sensitivity bound).
    """
    if mode not in MODES + ("auto",):
        raise ValueError(f"clipped_grad_sum: mode must be one of {MODES + ('auto',)}, got {mode!r}")
    if not max_grad_norm > 0:
        raise ValueError(f"clipped_grad_sum: max_grad_norm must be > 0, got {max_grad_norm}")
    if max_physical_batch_size < 1:
        raise ValueError(f"clipped_grad_sum: max_physical_batch_size must be >= 1, got {max_physical_batch_size}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        return [], torch.zeros(len(units))
    # Norms, factors and the sum in at least float32, rounded to the parameters' dtype once at the end
    # (16-bit accumulation let a clipped unit reach 1.005 C in bfloat16).
    acc = accumulation_dtype(params[0].dtype)
    summed = [torch.zeros_like(p, dtype=acc) for p in params]
    norms = torch.zeros(len(units), device=params[0].device, dtype=acc)
    if units:
        if mode == "auto":
            mode = resolve_grad_sample_mode("auto", params[0].device, model)
        bound = clip_bound(max_grad_norm, params[0].dtype)
        if mode == "loop":
            _loop(model, unit_loss, units, bound, params, summed, norms)
        elif mode == "vmap":
            _vmap(model, unit_loss, units, bound, max_physical_batch_size, named, summed, norms)
        else:
            bookkeeping_clipped_sum(
                model,
                unit_loss,
                units,
                bound,
                max_physical_batch_size=max_physical_batch_size,
                named=named,
                summed=summed,
                norms=norms,
            )
    return [s.to(p.dtype) for s, p in zip(summed, params)], norms


def _loop(
    model: nn.Module,
    unit_loss: UnitLoss,
    units: Sequence[Mapping[str, torch.Tensor]],
    max_grad_norm: float,
    params: list[nn.Parameter],
    summed: list[torch.Tensor],
    norms: torch.Tensor,
) -> None:
    """One forward + backward per unit; clip and add into ``summed``, norms into ``norms``.

    Units are not batched even when they have the same m: a batched backward returns only
    the sum over units, and splitting it per unit is exactly what per-sample machinery
    (``"vmap"``, Opacus's grad samples) costs. One unit at a time keeps the activation
    memory of one unit, which is the point of this mode.
    """
    for i, unit in enumerate(units):
        loss = unit_loss(model, unit)
        if loss.ndim != 0:
            raise ValueError(f"clipped_grad_sum: unit_loss must return a scalar, got shape {tuple(loss.shape)}")
        # allow_unused: a parameter the loss does not reach (an unused branch) has gradient 0.
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            # Same norm as Opacus: L2 of the per-parameter L2 norms (in float32 at least).
            norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g, dtype=norms.dtype) for g in grads])
            )
            norms[i] = norm
            if not bool(torch.isfinite(norm)):  # a non-finite unit gradient contributes zero (host sync: CPU-cheap)
                continue
            factor = clip_factor(norm, max_grad_norm)
            for s, g in zip(summed, grads):
                s.addcmul_(g.to(s.dtype), factor)  # tensor factor: no host sync on GPU, no temporary in float32
        # Free this unit's gradients before the next backward allocates the next ones
        # (else the peak holds two sets of per-unit gradients plus the sum).
        del loss, grads


def _vmap(
    model: nn.Module,
    unit_loss: UnitLoss,
    units: Sequence[Mapping[str, torch.Tensor]],
    max_grad_norm: float,
    max_physical_batch_size: int,
    named: list[tuple[str, nn.Parameter]],
    summed: list[torch.Tensor],
    norms: torch.Tensor,
) -> None:
    """Per-unit gradients with ``vmap(grad)`` over chunks of units of identical shapes."""
    trainable = {n: p.detach() for n, p in named}
    # Frozen parameters and buffers enter the functional call as constants (no gradient).
    constants = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    constants.update(dict(model.named_buffers()))

    def loss_of(params: dict[str, torch.Tensor], unit: Mapping[str, torch.Tensor]) -> torch.Tensor:
        def net(*args, **kwargs) -> torch.Tensor:
            return torch.func.functional_call(model, (params, constants), args, kwargs)

        return unit_loss(net, unit)

    # randomness="different": a random op inside the model (dropout) draws per unit, as in "loop".
    per_unit_grads = torch.func.vmap(torch.func.grad(loss_of), in_dims=(None, 0), randomness="different")

    # vmap needs stackable units; units of different m (or shapes) are processed group by group.
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, unit in enumerate(units):
        groups[tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(unit.items()))].append(i)
    for indices in groups.values():
        for start in range(0, len(indices), max_physical_batch_size):
            chunk = indices[start : start + max_physical_batch_size]
            stacked = {k: torch.stack([units[i][k] for i in chunk]) for k in units[chunk[0]]}
            grads = per_unit_grads(trainable, stacked)
            with torch.no_grad():
                grads = [grads[n] for n, _ in named]
                n = len(chunk)
                # As DPOptimizer.clip_and_accumulate: per-parameter norms, then their L2 norm.
                acc = norms.dtype
                chunk_norms = torch.stack(
                    [torch.linalg.vector_norm(g.reshape(n, -1), dim=-1, dtype=acc) for g in grads], dim=1
                ).norm(2, dim=1)
                norms[torch.as_tensor(chunk, device=norms.device)] = chunk_norms.to(norms.dtype)
                finite = torch.isfinite(chunk_norms)
                factor = torch.where(finite, clip_factor(chunk_norms, max_grad_norm), torch.zeros_like(chunk_norms))
                if not bool(finite.all()):  # non-finite unit gradients contribute zero (0 * nan is nan)
                    keep = [finite.view((-1,) + (1,) * (g.ndim - 1)) for g in grads]
                    grads = [torch.where(k, g, torch.zeros_like(g)) for k, g in zip(keep, grads)]
                for s, g in zip(summed, grads):
                    s.add_(torch.einsum("i,i...", factor.to(s.dtype), g.to(s.dtype)))
            del grads
