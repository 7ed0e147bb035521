"""Per-unit gradient norms and clipped sums of one layer, from its input and its output gradient.

A layer with weight ``W`` (p outputs, d inputs per position) applied at positions t gets the
weight gradient ``sum_t g_t a_t^T``. A privacy unit owns a contiguous block of the layer's
batch rows; its gradient is the sum over ALL its rows and positions, ``A_u^T G_u`` with
``A_u`` (n x d) and ``G_u`` (n x p), n = rows of the unit x positions per row. Its norm is
the norm of that sum (never a sum of per-row norms). Three exact ways, chosen per layer
from its shapes (:func:`choose_rule`), with B units in the batch and n positions per unit:

* ``"keep"``: instantiate the per-unit gradients ``A_u^T G_u`` (B x p x d) and keep them
  until the clip factors are known; the clipped sum is then ``sum_u c_u (A_u^T G_u)``.
  Costs one weight-gradient product, like a non-DP backward. Chosen when the per-unit
  gradients take no more memory than the activation and output gradient they replace
  (``B p d <= |A| + |G|``: both are released as soon as this layer's backward is done).
* ``"ghost"``: the norm through Gram matrices, ``||A_u^T G_u||_F^2 = <A_u A_u^T, G_u G_u^T>``,
  costing ``n^2 (p + d)`` per unit instead of ``n p d``; ``A`` and ``G`` are kept and the
  clipped sum is formed afterwards by book-keeping, ``A^T (c * G)`` (one weight-gradient
  product). Chosen when the positions are few: ``n (p + d) < p d``.
* ``"instantiate"``: per-unit gradients computed in chunks of units only for their norms,
  then dropped; book-keeping as for ``"ghost"``. Two weight-gradient products, memory of a
  chunk. The fallback when neither of the above pays.

:func:`scripts.privacy.bookkeeping._plan` then turns some "ghost"/"instantiate" calls into
"keep" within a memory budget, from the whole batch's shapes.

Norm layers (GroupNorm, LayerNorm affine) have per-unit gradients of a few numbers per
channel: always ``"keep"``. Embedding: ``"keep"`` (one-hot scatter) or ``"ghost"`` (equal
index mask times ``G G^T``) by the same memory test.

Layout assumption, shared with Opacus's hooks: a layer's input and output have the batch
rows first, rows of one unit adjacent (the caller concatenates the units' rows in order),
and a layer may see each row several times along the leading dimension (a 2D layer inside
``SliceAutoencoder`` sees rows x slices): the leading dimension must be a multiple of B,
unit-major. Every function here runs under ``torch.no_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SUPPORTED", "LayerGrads", "choose_rule", "process", "unsupported_reason", "weight_dims"]

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)

# Elements of a chunk's temporaries (Gram matrices, per-unit gradients, unfolded inputs) at once.
_CHUNK_ELEMENTS = 1 << 24

Deferred = Callable[[torch.Tensor, "torch.Tensor | None"], dict[str, torch.Tensor]]


@dataclass
class LayerGrads:
    """What one layer invocation leaves for the clipping step.

    Attributes:
        per_unit: parameter name -> per-unit gradients, shape (B, *param.shape) ("keep").
        sq_norms: (B,) squared per-unit norms of the parameters NOT in ``per_unit``.
        deferred: ``deferred(factors, finite)`` returns the clipped sums of those parameters
            by book-keeping (``factors``: (B,) clip factors; ``finite``: (B,) bool mask of
            units to keep, or None when all are finite).
        rules: parameter name -> rule used (for the documentation and the tests).
    """

    per_unit: dict[str, torch.Tensor] = field(default_factory=dict)
    sq_norms: torch.Tensor | None = None
    deferred: Deferred | None = None
    rules: dict[str, str] = field(default_factory=dict)


def choose_rule(units: int, positions: int, p: int, d: int, activation_numel: int, can_ghost: bool = True) -> str:
    """The rule for a weight of p x d applied at ``positions`` positions per unit.

    Decided from shapes only (no timing), so the choice is the same on every device.

    Args:
        units: B, units in the physical batch.
        positions: n, positions per unit (rows of the unit x positions per row).
        p: outputs per position (output channels).
        d: inputs per position (input channels x kernel size).
        activation_numel: elements of the layer's input plus output gradient (what
            book-keeping would keep alive until the clip factors are known).
        can_ghost: whether the layer has a Gram formulation.

    Returns:
        ``"keep"``, ``"ghost"`` or ``"instantiate"`` (see the module docstring).
    """
    if units * p * d <= activation_numel:
        return "keep"
    if can_ghost and positions * (p + d) < p * d:
        return "ghost"
    return "instantiate"


def weight_dims(
    module: nn.Module, inp_shape: torch.Size, out_shape: torch.Size, units: int
) -> tuple[int, int, int] | None:
    """(positions per unit n, outputs p, inputs d) of a Linear or convolution weight; None for other layers.

    Args:
        module: the layer.
        inp_shape: shape of its input in this call.
        out_shape: shape of its output in this call.
        units: B.

    Returns:
        the dimensions :func:`choose_rule` weighs, or None where there is no choice to make.
    """
    if isinstance(module, nn.Linear):
        return math.prod(out_shape[:-1]) // units, out_shape[-1], inp_shape[-1]
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        positions = out_shape[0] // units * math.prod(out_shape[2:])
        return positions, out_shape[1], inp_shape[1] * math.prod(module.kernel_size)
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module``'s parameters cannot be handled layer by layer here, or None if they can."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str) and _conv_padding(module) is None:
            return f"padding={module.padding!r} with an even receptive field"
        return None
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return "sparse embedding"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq (the scale depends on the whole batch)"
        return None
    if isinstance(module, SUPPORTED):
        return None
    return f"no per-layer rule for {type(module).__name__}"


def process(
    module: nn.Module, inp: torch.Tensor, grad: torch.Tensor, units: int, trainable: set[str], rule: str | None = None
) -> LayerGrads:
    """Per-unit norms (or gradients) of one invocation of a supported layer.

    Args:
        module: the layer (one of :data:`SUPPORTED`).
        inp: its input (indices for Embedding), batch rows first.
        grad: gradient of the summed unit losses w.r.t. its output.
        units: B.
        trainable: names of the layer's own parameters that get gradients.
        rule: the weight's rule as planned for the whole batch (``"keep"`` for a layer
            called several times: the per-unit gradients of its calls are summed before the
            norm); None chooses it from this call's shapes (:func:`choose_rule`).

    Returns:
        the invocation's :class:`LayerGrads`.
    """
    if inp.shape[0] % units or grad.shape[0] != inp.shape[0]:
        raise ValueError(
            f"bookkeeping: {type(module).__name__} sees {inp.shape[0]} rows, not a multiple of the {units} units "
            "(a layer whose batch dimension is not first cannot be split by unit); use grad_sample_mode 'loop'"
        )
    if isinstance(module, nn.Linear):
        return _linear(module, inp, grad, units, trainable, rule)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv(module, inp, grad, units, trainable, rule)
    if isinstance(module, nn.GroupNorm):
        return _group_norm(module, inp, grad, units, trainable)
    if isinstance(module, nn.LayerNorm):
        return _layer_norm(module, inp, grad, units, trainable)
    if isinstance(module, nn.Embedding):
        return _embedding(module, inp, grad, units, trainable, rule)
    raise TypeError(f"bookkeeping: unsupported layer {type(module).__name__}")


# ----------------------------------------------------------------------------- helpers


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Squared norms are summed in at least float32 (16-bit sums lose the clipping bound)."""
    return torch.promote_types(dtype, torch.float32)


def _weighted(x: torch.Tensor, factors: torch.Tensor, finite: torch.Tensor | None) -> torch.Tensor:
    """``x * factors`` over the leading (unit) dimension; units not ``finite`` contribute exact zeros.

    ``0 * nan`` is nan, hence the ``where``: a unit with a non-finite gradient must not
    poison the sum.
    """
    shape = (-1,) + (1,) * (x.ndim - 1)
    out = x * factors.to(x.dtype).view(shape)
    if finite is not None:
        out = torch.where(finite.view(shape), out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


def _zero_bad(x: torch.Tensor, finite: torch.Tensor | None) -> torch.Tensor:
    """``x`` (units first) with the rows of non-finite units set to zero (None: all finite)."""
    if finite is None:
        return x
    return torch.where(finite.view((-1,) + (1,) * (x.ndim - 1)), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _unit_chunks(units: int, per_unit_elements: int) -> list[tuple[int, int]]:
    """Ranges of units whose temporaries of ``per_unit_elements`` each fit :data:`_CHUNK_ELEMENTS`."""
    step = max(1, _CHUNK_ELEMENTS // max(1, per_unit_elements))
    return [(i, min(units, i + step)) for i in range(0, units, step)]


def _ghost_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||a_u^T g_u||_F^2`` per unit through ``<a_u a_u^T, g_u g_u^T>``; a (B, n, d), g (B, n, p)."""
    out = []
    for lo, hi in _unit_chunks(a.shape[0], a.shape[1] ** 2):
        aa = torch.bmm(a[lo:hi], a[lo:hi].transpose(1, 2))
        gg = torch.bmm(g[lo:hi], g[lo:hi].transpose(1, 2))
        out.append((aa * gg).sum((1, 2)).clamp(min=0))  # a sum of squares: clamp the rounding below 0
    return torch.cat(out)


# ----------------------------------------------------------------------------- Linear


def _linear(
    module: nn.Linear, inp: torch.Tensor, grad: torch.Tensor, units: int, trainable: set[str], rule: str | None
) -> LayerGrads:
    d, p = inp.shape[-1], grad.shape[-1]
    a = inp.reshape(units, -1, d)  # (B, n, d): rows of a unit x positions (tokens) per row
    g = grad.reshape(units, -1, p)
    out = LayerGrads(sq_norms=torch.zeros(units, dtype=_acc(grad.dtype), device=grad.device))
    if "bias" in trainable:
        out.per_unit["bias"], out.rules["bias"] = g.sum(1), "keep"
    if "weight" not in trainable:
        return out
    rule = rule or choose_rule(units, a.shape[1], p, d, inp.numel() + grad.numel())
    out.rules["weight"] = rule
    if rule == "keep":
        out.per_unit["weight"] = torch.bmm(g.transpose(1, 2), a)
        return out
    if rule == "ghost":
        out.sq_norms += _ghost_sq(a, g)
    else:
        for lo, hi in _unit_chunks(units, p * d):
            out.sq_norms[lo:hi] = torch.bmm(g[lo:hi].transpose(1, 2), a[lo:hi]).pow(2).sum((1, 2))

    def deferred(factors: torch.Tensor, finite: torch.Tensor | None) -> dict[str, torch.Tensor]:
        gw = _weighted(g, factors, finite).reshape(-1, p)
        return {"weight": gw.t().mm(_zero_bad(a, finite).reshape(-1, d))}

    out.deferred = deferred
    return out


# ----------------------------------------------------------------------------- Conv1d/2d/3d


def _conv_padding(module: nn.Module) -> list[int] | None:
    """Explicit padding of a zero-padded convolution (None for an asymmetric 'same')."""
    if not isinstance(module.padding, str):
        return list(module.padding)
    if module.padding == "valid":
        return [0] * len(module.kernel_size)
    total = [dil * (k - 1) for dil, k in zip(module.dilation, module.kernel_size)]
    return None if any(t % 2 for t in total) else [t // 2 for t in total]


def _conv_weight_grad(module: nn.Module, inp: torch.Tensor, grad: torch.Tensor, groups: int) -> torch.Tensor:
    """Weight gradient of the convolution with ``groups`` groups (no input gradient is computed)."""
    cout, cin = grad.shape[1], inp.shape[1] // groups
    weight_shape = (cout, cin, *module.kernel_size)
    # Only the weight's shape is read when just the weight gradient is asked for.
    placeholder = torch.empty(weight_shape, dtype=inp.dtype, device=inp.device)
    return torch.ops.aten.convolution_backward(
        grad, inp, placeholder, None, list(module.stride), _conv_padding(module), list(module.dilation),
        False, [0] * len(module.kernel_size), groups, [False, True, False],
    )[1]  # fmt: skip


def _conv_per_unit(module: nn.Module, inp: torch.Tensor, grad: torch.Tensor, units: int) -> torch.Tensor:
    """Per-unit weight gradients (B, Cout, Cin, *k) as ONE grouped convolution's weight gradient.

    The B units become B groups (channels of unit u are group u) and a unit's rows become
    the batch: ``(B r, C, *S) -> (r, B C, *S)``. A weight gradient sums over the batch, so
    group u's gradient is exactly unit u's. One call keeps the batched kernels (a loop over
    units of batch 1 runs a slow native Conv3d kernel on CPU). On CPU, fewer than 16 output
    channels per group are padded with zero channels to 16: oneDNN's grouped weight
    gradient is several times slower below that (benchmarks/README.md, "DP step").
    """
    rows, cout = inp.shape[0] // units, grad.shape[1]
    if grad.device.type == "cpu" and cout < 16:
        grad = F.pad(grad, [0, 0] * (grad.ndim - 2) + [0, 16 - cout])
    x = inp.reshape(units, rows, *inp.shape[1:]).transpose(0, 1).reshape(rows, units * inp.shape[1], *inp.shape[2:])
    g = grad.reshape(units, rows, *grad.shape[1:]).transpose(0, 1).reshape(rows, units * grad.shape[1], *grad.shape[2:])
    gw = _conv_weight_grad(module, x, g, units)
    return gw.reshape(units, grad.shape[1], *gw.shape[1:])[:, :cout]


def _unfold(module: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """Input patches (N, positions, Cin * prod(k)) in the weight's (Cin, *k) order (im2col, any dims)."""
    nd = len(module.kernel_size)
    x = F.pad(inp, [q for pad in reversed(_conv_padding(module)) for q in (pad, pad)])
    for i, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)  # appends a window dimension
        if dil > 1:
            x = x[..., ::dil]
    # x: (N, Cin, *out, *k) -> (N, *out, Cin, *k)
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(perm)
    return x.reshape(x.shape[0], math.prod(x.shape[1 : 1 + nd]), -1)


def _conv(
    module: nn.Module, inp: torch.Tensor, grad: torch.Tensor, units: int, trainable: set[str], rule: str | None
) -> LayerGrads:
    cout = grad.shape[1]
    rows = inp.shape[0] // units
    out = LayerGrads(sq_norms=torch.zeros(units, dtype=_acc(grad.dtype), device=grad.device))
    if "bias" in trainable:
        out.per_unit["bias"], out.rules["bias"] = grad.reshape(units, rows, cout, -1).sum((1, 3)), "keep"
    if "weight" not in trainable:
        return out
    d = inp.shape[1] * math.prod(module.kernel_size)
    positions = rows * math.prod(grad.shape[2:])
    rule = rule or choose_rule(units, positions, cout, d, inp.numel() + grad.numel())
    out.rules["weight"] = rule
    if rule == "keep":
        out.per_unit["weight"] = _conv_per_unit(module, inp, grad, units)
        return out
    if rule == "ghost":
        # unfold a chunk of units at a time: the patches are k^dims times the input
        for lo, hi in _unit_chunks(units, positions * max(d, positions)):
            a = _unfold(module, inp[lo * rows : hi * rows]).reshape(hi - lo, positions, d)
            g = grad[lo * rows : hi * rows].flatten(2).transpose(1, 2).reshape(hi - lo, positions, cout)
            out.sq_norms[lo:hi] = _ghost_sq(a, g)
    else:
        for lo, hi in _unit_chunks(units, cout * d):
            gw = _conv_per_unit(module, inp[lo * rows : hi * rows], grad[lo * rows : hi * rows], hi - lo)
            out.sq_norms[lo:hi] = gw.pow(2).flatten(1).sum(1)

    def deferred(factors: torch.Tensor, finite: torch.Tensor | None) -> dict[str, torch.Tensor]:
        shape = (units, rows, *grad.shape[1:])
        g = _weighted(grad.reshape(shape), factors, finite).reshape(grad.shape)
        x = _zero_bad(inp.reshape(units, rows, *inp.shape[1:]), finite).reshape(inp.shape)
        return {"weight": _conv_weight_grad(module, x, g, 1)}

    out.deferred = deferred
    return out


# ----------------------------------------------------------------------------- GroupNorm / LayerNorm


def _norm_affine(
    xhat: torch.Tensor,
    grad: torch.Tensor,
    units: int,
    trainable: set[str],
    view: tuple[int, ...],
    dims: tuple[int, ...],
) -> LayerGrads:
    """Per-unit gradients of an affine ``y = xhat * weight + bias``: sums of ``G * xhat`` and ``G``."""
    out = LayerGrads()
    if "weight" in trainable:
        out.per_unit["weight"], out.rules["weight"] = (grad * xhat).reshape(view).sum(dims), "keep"
    if "bias" in trainable:
        out.per_unit["bias"], out.rules["bias"] = grad.reshape(view).sum(dims), "keep"
    return out


def _group_norm(
    module: nn.GroupNorm, inp: torch.Tensor, grad: torch.Tensor, units: int, trainable: set[str]
) -> LayerGrads:
    # the normalised input, recomputed with the same kernel as the forward (no affine)
    xhat = F.group_norm(inp, module.num_groups, None, None, module.eps) if "weight" in trainable else None
    c = inp.shape[1]
    return _norm_affine(xhat, grad, units, trainable, (units, -1, c, math.prod(inp.shape[2:])), (1, 3))


def _layer_norm(
    module: nn.LayerNorm, inp: torch.Tensor, grad: torch.Tensor, units: int, trainable: set[str]
) -> LayerGrads:
    shape = tuple(module.normalized_shape)
    xhat = F.layer_norm(inp, shape, None, None, module.eps) if "weight" in trainable else None
    return _norm_affine(xhat, grad, units, trainable, (units, -1, *shape), (1,))


# ----------------------------------------------------------------------------- Embedding


def _embedding(
    module: nn.Embedding, idx: torch.Tensor, grad: torch.Tensor, units: int, trainable: set[str], rule: str | None
) -> LayerGrads:
    out = LayerGrads(sq_norms=torch.zeros(units, dtype=_acc(grad.dtype), device=grad.device))
    if "weight" not in trainable:
        return out
    num, dim = module.weight.shape
    idx = idx.reshape(units, -1)  # (B, n) looked-up rows per unit
    g = grad.reshape(units, -1, dim)
    if module.padding_idx is not None:  # the padding row gets no gradient (as Embedding's backward)
        g = g.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0)
    positions = idx.shape[1]
    # ghost: <[i_s == i_t], G G^T> over a unit's positions (the Gram matrix of one-hot rows)
    keep = (rule or choose_rule(units, positions, dim, num, idx.numel() + grad.numel())) == "keep"
    rule = out.rules["weight"] = "keep" if keep else "ghost"
    if rule == "keep":
        offsets = idx + torch.arange(units, device=idx.device).unsqueeze(1) * num
        per_unit = torch.zeros(units * num, dim, dtype=g.dtype, device=g.device)
        per_unit.index_add_(0, offsets.reshape(-1), g.reshape(-1, dim))
        out.per_unit["weight"] = per_unit.reshape(units, num, dim)
        return out
    for lo, hi in _unit_chunks(units, positions**2):
        same = (idx[lo:hi].unsqueeze(2) == idx[lo:hi].unsqueeze(1)).to(g.dtype)
        out.sq_norms[lo:hi] = (same * torch.bmm(g[lo:hi], g[lo:hi].transpose(1, 2))).sum((1, 2)).clamp(min=0)

    def deferred(factors: torch.Tensor, finite: torch.Tensor | None) -> dict[str, torch.Tensor]:
        total = torch.zeros(num, dim, dtype=g.dtype, device=g.device)
        return {"weight": total.index_add_(0, idx.reshape(-1), _weighted(g, factors, finite).reshape(-1, dim))}

    out.deferred = deferred
    return out
