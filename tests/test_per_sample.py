"""Tests of per-unit gradient clipping (scripts/privacy/per_sample.py).

Two models: a tiny float64 ``nn.Sequential`` for exact checks, and a tiny
``ConditionalDiffusionUNet`` with the diffusion loss, for the network the bundle trains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pytest
import torch
from helpers import diffusion_loss, diffusion_unit, tiny_unet
from scripts.privacy.per_sample import clip_factor, clipped_grad_sum
from torch import nn

MODES = ("loop", "vmap", "bookkeeping")  # bookkeeping in depth: tests/test_bookkeeping.py


# --------------------------------------------------------------------------- helpers


def reference(
    model: nn.Module, unit_loss: Callable, units: Sequence[Mapping[str, torch.Tensor]], max_grad_norm: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The textbook computation: per unit zero_grad, backward, clip by hand, sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    summed = [torch.zeros_like(p) for p in params]
    norms = []
    for unit in units:
        model.zero_grad(set_to_none=True)
        unit_loss(model, unit).backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for s, g in zip(summed, grads):
            s += factor * g
        norms.append(norm)
    model.zero_grad(set_to_none=True)
    return summed, torch.stack(norms) if norms else torch.zeros(0)


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def assert_grads_close(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], rtol: float, atol: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


# tiny float64 MLP: x (m, 3) -> (m, 2), loss = MSE to y averaged over the unit's rows


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def mlp_loss(net: Callable[..., torch.Tensor], unit: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return ((net(unit["x"]) - unit["y"]) ** 2).mean()


def mlp_unit(m: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(m, 3, generator=g, dtype=torch.float64),
        "y": torch.randn(m, 2, generator=g, dtype=torch.float64),
    }


# tiny conditional diffusion UNet and the epsilon-prediction loss of the bundle (tests/helpers.py)


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    return tiny_unet(perturb=None)


# --------------------------------------------------------------------------- equivalence


def test_loop_and_vmap_equal_reference_exactly_on_mlp() -> None:
    model = mlp()
    units = [mlp_unit(m, seed) for seed, m in enumerate([1, 3, 2, 3, 1, 3])]  # mixed m: grouping
    _, free_norms = reference(model, mlp_loss, units, 1e9)
    c = float(free_norms.median())  # about half of the units are clipped
    ref, ref_norms = reference(model, mlp_loss, units, c)
    assert (ref_norms > c).any() and (ref_norms < c).any()
    for mode in MODES:
        grads, norms = clipped_grad_sum(model, mlp_loss, units, c, mode=mode, max_physical_batch_size=2)
        assert_grads_close(grads, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # nothing left on the model


def test_loop_and_vmap_equal_reference_on_unet(unet: nn.Module) -> None:
    # K = 2 units, one subject unit (2 records x K), and a K = 1 unit: three m, one batch.
    units = [diffusion_unit(1, 2, 0), diffusion_unit(2, 2, 1), diffusion_unit(1, 1, 2), diffusion_unit(1, 2, 3)]
    _, free_norms = reference(unet, diffusion_loss, units, 1e9)
    c = float(free_norms.median())
    ref, ref_norms = reference(unet, diffusion_loss, units, c)
    assert (ref_norms > c).any() and (ref_norms < c).any()
    results = {
        mode: clipped_grad_sum(unet, diffusion_loss, units, c, mode=mode, max_physical_batch_size=1) for mode in MODES
    }
    results["bookkeeping-batched"] = clipped_grad_sum(
        unet, diffusion_loss, units, c, "bookkeeping", max_physical_batch_size=4
    )
    for grads, norms in results.values():
        assert_grads_close(grads, ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-6)
    assert_grads_close(results["loop"][0], results["vmap"][0], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in unet.parameters())


def test_clip_factor_is_opacus_convention() -> None:
    norms = torch.tensor([0.0, 0.5, 1.0, 4.0])
    torch.testing.assert_close(
        clip_factor(norms, 1.0), torch.tensor([1.0, 1.0, 1.0 / (1.0 + 1e-6), 1.0 / (4.0 + 1e-6)])
    )


# --------------------------------------------------------------------------- sensitivity


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [1, 4])
def test_adding_one_unit_moves_sum_by_at_most_c_mlp(mode: str, m: int) -> None:
    model, c = mlp(), 0.05
    batch = [mlp_unit(2, seed) for seed in range(3)]
    extra = mlp_unit(m, 99)
    extra["y"] = extra["y"] * 50  # a large loss: its gradient is far above C before clipping
    without, _ = clipped_grad_sum(model, mlp_loss, batch, c, mode=mode)
    with_, norms = clipped_grad_sum(model, mlp_loss, batch + [extra], c, mode=mode)
    assert norms[-1] > 10 * c
    assert float((flat(with_) - flat(without)).norm()) <= c + 1e-5


@pytest.mark.parametrize("records,k", [(1, 1), (1, 3), (2, 2)])  # single draw, K draws, subject (ED + ES) x K
def test_adding_one_unit_moves_sum_by_at_most_c_unet(unet: nn.Module, records: int, k: int) -> None:
    c = 1e-3  # far below the gradient norms of this network: every unit is clipped
    batch = [diffusion_unit(1, 2, seed) for seed in range(2)]
    extra = diffusion_unit(records, k, 42)
    without, _ = clipped_grad_sum(unet, diffusion_loss, batch, c, mode="loop")
    with_, norms = clipped_grad_sum(unet, diffusion_loss, batch + [extra], c, mode="loop")
    assert norms[-1] > 10 * c
    assert float((flat(with_) - flat(without)).norm()) <= c + 1e-5


def test_k_draws_as_separate_units_break_the_bound(unet: nn.Module) -> None:
    """What the issue warns about: K draws stacked as K units are clipped K times.

    One record with K = 4 draws. As one unit it moves the sum by at most C; split into K
    units of one row each (what stacking the K copies along Opacus's batch dimension does)
    each draw gets its own C, and the record moves the sum by well over C.
    """
    c, k = 1e-3, 4
    unit = diffusion_unit(1, k, 7)
    as_one, _ = clipped_grad_sum(unet, diffusion_loss, [unit], c, mode="loop")
    as_rows = [{name: t[i : i + 1] for name, t in unit.items()} for i in range(k)]
    as_k, row_norms = clipped_grad_sum(unet, diffusion_loss, as_rows, c, mode="loop")
    assert (row_norms > c).all()
    assert float(flat(as_one).norm()) <= c + 1e-5
    assert float(flat(as_k).norm()) > 1.5 * c  # up to K x C: the noise would be calibrated for C
    assert not torch.allclose(flat(as_one), flat(as_k))


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("mode", MODES)
def test_empty_units_give_zeros(mode: str) -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    grads, norms = clipped_grad_sum(model, mlp_loss, [], 1.0, mode=mode)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [g.shape for g in grads] == [p.shape for p in trainable]
    assert all(g.dtype == p.dtype and not g.any() for g, p in zip(grads, trainable))
    assert norms.shape == (0,)


@pytest.mark.parametrize("mode", MODES)
def test_frozen_parameters_excluded_and_unchanged(mode: str) -> None:
    model = mlp()
    model[0].requires_grad_(False)  # freeze the first layer (weight and bias)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    units = [mlp_unit(m, seed) for seed, m in enumerate([1, 2, 2])]
    grads, norms = clipped_grad_sum(model, mlp_loss, units, 0.1, mode=mode)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(grads) == len(trainable) == 2
    assert [g.shape for g in grads] == [p.shape for p in trainable]
    ref, ref_norms = reference(model, mlp_loss, units, 0.1)  # norms over the trainable parameters only
    assert_grads_close(grads, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    for n, p in model.named_parameters():
        assert p.grad is None
        if n in frozen:
            assert torch.equal(p, frozen[n]) and not p.requires_grad


def test_rejects_bad_arguments() -> None:
    model, units = mlp(), [mlp_unit(1, 0)]
    with pytest.raises(ValueError, match="mode"):
        clipped_grad_sum(model, mlp_loss, units, 1.0, mode="hooks")
    with pytest.raises(ValueError, match="max_grad_norm"):
        clipped_grad_sum(model, mlp_loss, units, 0.0)
    with pytest.raises(ValueError, match="max_physical_batch_size"):
        clipped_grad_sum(model, mlp_loss, units, 1.0, mode="vmap", max_physical_batch_size=0)
    with pytest.raises(ValueError, match="scalar"):
        clipped_grad_sum(model, lambda net, u: (net(u["x"]) - u["y"]) ** 2, units, 1.0)
