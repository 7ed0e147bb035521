"""The ``"bookkeeping"`` per-unit clipping mode: one forward and one backward per physical batch.

How a step runs (:func:`bookkeeping_clipped_sum`):

1. **Batch the units.** ``unit_loss(net, unit)`` calls the network on one unit. Each unit's
   loss is run once with a recording ``net`` that keeps the call's arguments and stops;
   the units' arguments are concatenated along the batch (rows of a unit adjacent) and the
   network runs ONCE on the physical batch. Each unit's loss is then run again with a
   ``net`` returning that unit's rows of the batched output, and the losses are summed.
   So any loss that is a function of the unit's output rows is allowed (not only a mean of
   per-row terms), as in ``"loop"``; the network must not mix rows (no BatchNorm, which
   :func:`scripts.privacy.validation.validate_network` already refuses) and ``unit_loss`` must be
   deterministic given the unit (all randomness is drawn in the unit, as the API says).
2. **Capture.** A forward hook on every layer with trainable parameters keeps the layer's
   input (the tensor autograd saves for the weight gradient anyway: no copy) and passes its
   output through an identity autograd function whose backward receives the output
   gradient. The backward is ``torch.autograd.grad`` of the summed loss w.r.t. a dummy
   scalar every tap depends on, so autograd computes the gradients flowing through the
   network but no parameter gradient (the non-DP step's weight-gradient products are not
   paid; the layers below the lowest trainable layer are not visited).
3. **Per-layer norms, as the backward reaches each layer** (:mod:`scripts.privacy.grad_norms`):
   per-unit gradients kept, or Gram-matrix ghost norms, or per-unit gradients in chunks for
   their norms only, chosen from the layer's shapes. A unit's gradient is the sum over its
   rows, and its norm is the norm of that sum.
4. **Book-keeping.** Clip factors ``c_u = min(1, C / (||g_u|| + 1e-6))`` (0 for a unit with a
   non-finite gradient), then ``sum_u c_u g_u`` from the kept per-unit gradients, or as
   ``A^T (c * G)`` from the kept input and output gradient: no second backward.

Cost against a non-DP step of the same batch: the same forward and input-gradient backward;
one weight-gradient product per ``"keep"`` layer (as non-DP), a Gram product plus one per
``"ghost"`` layer, two per ``"instantiate"`` layer. Memory: the non-DP activations, plus per
layer either its per-unit gradients (``"keep"``: at most its input and output gradient by the
rule) or its output gradient until the end of the backward.

Guard: every trainable parameter must be used only inside its layer's ``forward`` (a weight
read directly elsewhere would be missed silently). The autograd graph of a batch is walked
(once per model, network-call shapes and trainable set: the same code path is assumed for
the same shapes) and a parameter used more often than its layer was called is an error; a layer
called several times in one forward (weight sharing) is handled exactly (its per-unit
gradients are summed over the calls before the norm).
"""

from __future__ import annotations

import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from scripts.privacy import grad_norms
from scripts.privacy.clipping import clip_factor
from scripts.privacy.grad_norms import LayerGrads, process, unsupported_reason
from torch import nn

__all__ = ["bookkeeping_clipped_sum", "unsupported_layers"]

UnitLoss = Callable[[Callable[..., Any], Mapping[str, torch.Tensor]], torch.Tensor]

# Extra memory the batch may spend on keeping per-unit gradients beyond what the per-layer
# rule allows, as a fraction of the inputs + output gradients of all its hooked layer calls
# (a proxy of the non-DP step's activation memory). See :func:`_plan`.
KEEP_BUDGET = 0.1

# Batch signatures whose parameter use was checked, per model (the graph walk costs a few
# milliseconds in Python: done once per network-call shape and trainable set, not every step).
_CHECKED: weakref.WeakKeyDictionary[nn.Module, set[tuple]] = weakref.WeakKeyDictionary()


class _Stop(BaseException):
    """Raised by the recording ``net`` to leave ``unit_loss`` once its network call is known.

    A ``BaseException`` so that an ``except Exception`` inside a loss does not swallow it.
    """


@dataclass
class _Layer:
    """A layer with trainable parameters: its module, and where its parameters go in the result."""

    name: str
    module: nn.Module
    index: dict[str, int]  # own parameter name -> position in the trainable-parameter list
    calls: list[_Call] = field(default_factory=list)


@dataclass
class _Call:
    """One invocation of a layer in the batched forward."""

    layer: _Layer
    inp: torch.Tensor | None
    units: int
    out_shape: torch.Size
    rule: str | None = None  # the weight's rule, planned once the forward is done
    result: LayerGrads | None = None

    def receive(self, grad: torch.Tensor) -> None:
        """Output gradient of this invocation, called by autograd during the backward."""
        with torch.no_grad():
            trainable = set(self.layer.index)
            self.result = process(self.layer.module, self.inp, grad, self.units, trainable, self.rule)
        if self.result.deferred is None:
            self.inp = None  # nothing to book-keep: release the activation now


class _Tap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands the output gradient to the layer's call."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, anchor: torch.Tensor, call: _Call) -> torch.Tensor:
        ctx.call = call
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.call.receive(grad)
        ctx.call = None
        return grad, None, None


def unsupported_layers(model: nn.Module) -> list[str]:
    """Names (and reasons) of the modules whose trainable parameters this mode cannot handle.

    Args:
        model: the network, with its ``requires_grad`` flags set (fine-tune scope applied).

    Returns:
        one line per problem; empty when every trainable parameter belongs to a supported
        layer (:data:`scripts.privacy.grad_norms.SUPPORTED`) and none is shared between layers.
    """
    problems, owner = [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        reason = unsupported_reason(module)
        if reason:
            problems.append(f"'{name}': {reason}")
        for n, p in own:
            if id(p) in owner and owner[id(p)] != f"{name}.{n}":
                problems.append(f"'{name}.{n}' is shared with '{owner[id(p)]}'")
            owner.setdefault(id(p), f"{name}.{n}")
    return problems


def _layers(model: nn.Module, named: Sequence[tuple[str, nn.Parameter]]) -> list[_Layer]:
    problems = unsupported_layers(model)
    if problems:
        raise ValueError(
            "grad_sample_mode 'bookkeeping' cannot clip these trainable parameters layer by layer: "
            + "; ".join(problems)
            + ". Use 'loop' or 'vmap', or freeze them"
        )
    position = {id(p): i for i, (_, p) in enumerate(named)}
    layers = []
    for name, module in model.named_modules():
        index = {n: position[id(p)] for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if index:
            layers.append(_Layer(name, module, index))
    return layers


# ----------------------------------------------------------------------------- batching units


def _record(unit_loss: UnitLoss, unit: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
    """The arguments of ``unit_loss``'s network call for ``unit``."""
    box: list[tuple[tuple, dict]] = []

    def net(*args: Any, **kwargs: Any) -> Any:
        box.append((args, kwargs))
        raise _Stop

    try:
        unit_loss(net, unit)
    except _Stop:
        return box[0]
    raise ValueError("grad_sample_mode 'bookkeeping': unit_loss returned without calling the network")


def _call_key(call: tuple[tuple, dict]) -> tuple:
    """What must match for units to share one batched call: structure, trailing shapes, rows, constants."""
    args, kwargs = call
    values = list(args) + [kwargs[k] for k in sorted(kwargs)]
    rows = {v.shape[0] for v in values if isinstance(v, torch.Tensor) and v.ndim > 0}
    if len(rows) > 1 or any(isinstance(v, torch.Tensor) and v.ndim == 0 for v in values):
        raise ValueError(
            "grad_sample_mode 'bookkeeping': the network's tensor arguments must all have the unit's rows as their "
            f"leading dimension (got leading sizes {sorted(rows)}); use 'loop' or 'vmap'"
        )
    key: list[Any] = [len(args), tuple(sorted(kwargs)), rows.pop() if rows else 0]
    for v in values:
        if isinstance(v, torch.Tensor):
            key.append((tuple(v.shape[1:]), v.dtype, v.device))
        else:
            try:
                hash(v)
                key.append(("value", v))
            except TypeError:
                key.append(("id", id(v)))
    return tuple(key)


def _concat(calls: Sequence[tuple[tuple, dict]]) -> tuple[tuple, dict]:
    """One call on the rows of all units (each tensor argument concatenated along dim 0)."""
    args0, kwargs0 = calls[0]

    def merge(values: list) -> Any:
        return torch.cat(values) if isinstance(values[0], torch.Tensor) else values[0]

    args = tuple(merge([c[0][i] for c in calls]) for i in range(len(args0)))
    kwargs = {k: merge([c[1][k] for c in calls]) for k in kwargs0}
    return args, kwargs


def _rows_of(out: Any, lo: int, hi: int, total: int) -> Any:
    """Rows ``lo:hi`` of every tensor in the network's output (a tensor, tuple, list or dict)."""
    if isinstance(out, torch.Tensor):
        if out.ndim == 0 or out.shape[0] != total:
            raise ValueError(
                f"grad_sample_mode 'bookkeeping': a network output of shape {tuple(out.shape)} does not have the "
                f"batch's {total} rows first; use 'loop' or 'vmap'"
            )
        return out[lo:hi]
    if isinstance(out, (tuple, list)):
        return type(out)(_rows_of(o, lo, hi, total) for o in out)
    if isinstance(out, dict):
        return {k: _rows_of(v, lo, hi, total) for k, v in out.items()}
    return out


# ----------------------------------------------------------------------------- one batch


def _check_parameter_use(total: torch.Tensor, layers: Sequence[_Layer], params: Sequence[torch.Tensor]) -> None:
    """Raise if a trainable parameter enters the graph more often than its layer was called.

    A weight read outside its layer's ``forward`` (``F.linear(x, layer.weight)``) gets a
    gradient no hook sees; the per-unit norms would silently miss it.
    """
    expected: dict[int, tuple[str, int]] = {}
    for layer in layers:
        for n, i in layer.index.items():
            expected[id(params[i])] = (f"{layer.name}.{n}" if layer.name else n, len(layer.calls))
    uses: Counter[int] = Counter()
    seen, stack = set(), [total.grad_fn]
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)
            if variable is not None:
                uses[id(variable)] += 1
            elif nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    wrong = [
        f"'{expected[i][0]}' ({n} uses, {expected[i][1]} layer calls)"
        for i, n in uses.items()
        if i in expected and n > expected[i][1]
    ]
    if wrong:
        raise ValueError(
            "grad_sample_mode 'bookkeeping': these parameters are used outside their layer's forward, so their "
            f"per-unit gradients cannot be captured: {', '.join(wrong)}. Use 'loop' or 'vmap'"
        )


def _plan(layers: Sequence[_Layer], units: int) -> None:
    """Set each call's weight rule: the per-layer rule, then "keep" where a memory budget allows.

    :func:`scripts.privacy.grad_norms.choose_rule` keeps per-unit gradients only where they
    take no more memory than the activations they release. Keeping them elsewhere saves a
    weight-gradient product ("instantiate") or a Gram product ("ghost") for some extra
    memory; with the whole forward's shapes known, calls are upgraded in order of compute
    saved per extra element while the extra stays within :data:`KEEP_BUDGET` of the hooked
    activations. Shapes only, so the plan is the same on every device and every run.
    """
    candidates, activations = [], 0
    for layer in layers:
        for call in layer.calls:
            if len(layer.calls) > 1:
                call.rule = "keep"  # weight sharing: per-unit gradients summed over calls before the norm
                continue
            dims = grad_norms.weight_dims(layer.module, call.inp.shape, call.out_shape, units)
            if dims is None or "weight" not in layer.index:
                continue
            positions, p, d = dims
            act = call.inp.numel() + call.out_shape.numel()
            activations += act
            call.rule = grad_norms.choose_rule(units, positions, p, d, act)
            extra = units * p * d - act
            if call.rule != "keep" and extra > 0:  # extra > 0 always, unless choose_rule is overridden (tests)
                saved = units * positions * p * d if call.rule == "instantiate" else units * positions**2 * (p + d)
                candidates.append((saved / extra, extra, call))
    budget = KEEP_BUDGET * activations
    for _, extra, call in sorted(candidates, key=lambda c: -c[0]):
        if extra <= budget:
            call.rule, budget = "keep", budget - extra


def _batch(
    model: nn.Module,
    layers: list[_Layer],
    unit_loss: UnitLoss,
    units: Sequence[Mapping[str, torch.Tensor]],
    calls: Sequence[tuple[tuple, dict]],
    max_grad_norm: float,
    params: Sequence[torch.Tensor],
    summed: list[torch.Tensor],
    key: tuple,
) -> torch.Tensor:
    """Clip and add the units of one physical batch (same call shapes ``key``) into ``summed``; return their norms."""
    count = len(units)
    args, kwargs = _concat(calls)
    anchor = torch.zeros((), device=params[0].device, requires_grad=True)

    def hook(layer: _Layer) -> Callable:
        def tap(module: nn.Module, inputs: tuple, output: Any) -> Any:
            if not torch.is_grad_enabled():
                return None
            if not isinstance(output, torch.Tensor) or not inputs or not isinstance(inputs[0], torch.Tensor):
                raise ValueError(f"grad_sample_mode 'bookkeeping': layer '{layer.name}' has no tensor input/output")
            call = _Call(layer, inputs[0].detach(), count, output.shape)
            layer.calls.append(call)
            return _Tap.apply(output, anchor, call)

        return tap

    for layer in layers:
        layer.calls = []
    try:
        handles = [layer.module.register_forward_hook(hook(layer)) for layer in layers]
        try:
            out = model(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        rows = next(v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)).shape[0] // count
        _plan(layers, count)
        total = _summed_losses(unit_loss, units, out, rows)
        out = None  # the taps hold what the backward needs
        if total.grad_fn is not None:
            signature = (key, count, tuple(id(p) for p in params), tuple(len(layer.calls) for layer in layers))
            if signature not in _CHECKED.setdefault(model, set()):
                _check_parameter_use(total, layers, params)
                _CHECKED[model].add(signature)
            torch.autograd.grad(total, anchor, allow_unused=True)
        del total
        return _clip_and_add(layers, count, max_grad_norm, summed)
    finally:
        for layer in layers:  # release the captured activations, also after an error
            layer.calls = []


def _summed_losses(
    unit_loss: UnitLoss, units: Sequence[Mapping[str, torch.Tensor]], out: Any, rows: int
) -> torch.Tensor:
    """Sum over units of ``unit_loss`` with a ``net`` that returns the unit's rows of the batched output."""
    total = None
    for u, unit in enumerate(units):
        used = []

        def net(*_: Any, u: int = u, used: list = used, **__: Any) -> Any:
            if used:
                raise ValueError(
                    "grad_sample_mode 'bookkeeping': unit_loss calls the network more than once; use 'loop'"
                )
            used.append(True)
            return _rows_of(out, u * rows, (u + 1) * rows, len(units) * rows)

        loss = unit_loss(net, unit)
        if loss.ndim != 0:
            raise ValueError(f"clipped_grad_sum: unit_loss must return a scalar, got shape {tuple(loss.shape)}")
        total = loss if total is None else total + loss
    return total


def _unit_results(
    layers: Sequence[_Layer], count: int, sq: torch.Tensor
) -> tuple[list[tuple[_Layer, dict[str, torch.Tensor]]], list]:
    """Each layer's per-unit gradients (summed over its calls) and deferred sums; adds their squared
    per-unit norms into ``sq`` in place."""
    kept: list[tuple[_Layer, dict[str, torch.Tensor]]] = []
    deferred = []
    for layer in layers:
        per_unit: dict[str, torch.Tensor] = {}
        for call in layer.calls:
            if call.result is None:  # this call's output did not reach the loss: zero gradient
                continue
            for n, g in call.result.per_unit.items():
                per_unit[n] = g if n not in per_unit else per_unit[n] + g
            if call.result.sq_norms is not None:
                sq += call.result.sq_norms.to(sq.dtype)
            if call.result.deferred is not None:
                deferred.append((layer, call.result.deferred))
        for g in per_unit.values():
            sq += torch.linalg.vector_norm(g.reshape(count, -1), dim=1, dtype=sq.dtype).pow(2)
        kept.append((layer, per_unit))
    return kept, deferred


def _clip_and_add(
    layers: Sequence[_Layer], count: int, max_grad_norm: float, summed: list[torch.Tensor]
) -> torch.Tensor:
    """Per-unit norms from the layers' results, clip factors, and the book-keeping sums into ``summed``."""
    with torch.no_grad():
        sq = torch.zeros(count, dtype=summed[0].dtype, device=summed[0].device)
        kept, deferred = _unit_results(layers, count, sq)
        norms = sq.sqrt()
        finite = torch.isfinite(norms)
        factors = torch.where(finite, clip_factor(norms, max_grad_norm), torch.zeros_like(norms))
        mask = None if bool(finite.all()) else finite  # one host sync per batch
        for layer, per_unit in kept:
            for n, g in per_unit.items():
                flat = g.reshape(count, -1)
                if mask is not None:
                    flat = torch.where(mask.unsqueeze(1), flat, torch.zeros((), dtype=flat.dtype, device=flat.device))
                target = summed[layer.index[n]]
                target.add_((factors.to(target.dtype) @ flat.to(target.dtype)).reshape(target.shape))
        del kept
        for layer, fn in deferred:
            for n, g in fn(factors, mask).items():
                summed[layer.index[n]].add_(g)
    return norms


def bookkeeping_clipped_sum(
    model: nn.Module,
    unit_loss: UnitLoss,
    units: Sequence[Mapping[str, torch.Tensor]],
    max_grad_norm: float,
    *,
    max_physical_batch_size: int,
    named: Sequence[tuple[str, nn.Parameter]],
    summed: list[torch.Tensor],
    norms: torch.Tensor,
) -> None:
    """Add the clipped per-unit gradients of ``units`` into ``summed``; write the norms into ``norms``.

    Args:
        model: the network (supported layers only, see :func:`unsupported_layers`).
        unit_loss: ``unit_loss(net, unit)``, calling ``net`` once (see the module docstring).
        units: the privacy units.
        max_grad_norm: C.
        max_physical_batch_size: the most units in one forward/backward.
        named: the trainable (name, parameter) pairs, in the order of ``summed``.
        summed: one zero-initialised tensor per trainable parameter (updated in place).
        norms: (len(units),) output: each unit's gradient norm before clipping.
    """
    layers = _layers(model, named)
    params = [p for _, p in named]
    # Units of the same tensor shapes are batched together (as "vmap"); each chunk is recorded,
    # split by the shapes of its network call, and run as one forward/backward per split.
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, unit in enumerate(units):
        groups[tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(unit.items()))].append(i)
    for indices in groups.values():
        for start in range(0, len(indices), max_physical_batch_size):
            chunk = indices[start : start + max_physical_batch_size]
            by_call: dict[tuple, list[tuple[int, tuple[tuple, dict]]]] = defaultdict(list)
            for i in chunk:
                call = _record(unit_loss, units[i])
                by_call[_call_key(call)].append((i, call))
            for key, members in by_call.items():
                idx = [i for i, _ in members]
                batch_norms = _batch(
                    model,
                    layers,
                    unit_loss,
                    [units[i] for i in idx],
                    [c for _, c in members],
                    max_grad_norm,
                    params,
                    summed,
                    key,
                )
                norms[torch.as_tensor(idx, device=norms.device)] = batch_norms.to(norms.dtype)
