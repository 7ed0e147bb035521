"""Exactness of the "bookkeeping" per-unit clipping mode against "loop" (scripts/privacy/bookkeeping.py).

Every comparison is to 1e-5 relative: per-unit norms elementwise, the clipped sum per
parameter tensor (max abs difference over the tensor's max abs value). Networks:

* ``AllLayers``: float64, one of every layer family the bundle's networks hold (Conv3d
  k3/k1, stride 1/2, dilated "same"; Conv2d on slices; Linear on vectors and tokens;
  GroupNorm/LayerNorm affine; Embedding with and without padding_idx; a Linear called
  twice), and a loss that is NOT a mean of per-row terms. Each per-layer rule is forced in
  turn, so "keep", "ghost" and "instantiate" are all checked on every layer family;
* the tiny ``ConditionalDiffusionUNet`` with the bundle's diffusion loss: record and
  subject units, K = 1 and K = 3, fine-tune scopes all / attention / conditioning,
  physical chunks smaller than the batch;
* the tiny ``SliceAutoencoder`` (2D layers see rows x slices; a tuple output).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import helpers
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import diffusion_loss, tiny_autoencoder, tiny_unet
from scripts.privacy import bookkeeping, grad_norms
from scripts.privacy.bookkeeping import unsupported_layers
from scripts.privacy.per_sample import MODES, clipped_grad_sum, resolve_grad_sample_mode
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def apply_scope(model: nn.Module, scope: str) -> list[str]:
    """The bundle's fine-tune scopes (one place to change when the function moves)."""
    try:
        from scripts.privacy.validation import apply_scope as apply
    except ImportError:
        from scripts.privacy.validation import apply_scope as apply
    return apply(model, scope)


# --------------------------------------------------------------------------- comparison helpers


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def assert_same_step(got: tuple, ref: tuple, tol: float = TOL) -> None:
    """Clipped sums equal per tensor and norms elementwise, to ``tol`` relative.

    A tensor's error is relative to its largest entry, but at least 1e-2 of the largest
    entry of all: a conv bias just before a GroupNorm has gradient 0 up to float32
    rounding, which no relative tolerance of its own can compare.
    """
    (grads, norms), (ref_grads, ref_norms) = got, ref
    assert len(grads) == len(ref_grads)
    overall = max((float(r.abs().max()) for r in ref_grads), default=0.0)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape and g.dtype == r.dtype
        scale = max(float(r.abs().max()), 1e-2 * overall)
        assert float((g - r).abs().max()) <= tol * scale + 1e-12, (float((g - r).abs().max()), scale)
    torch.testing.assert_close(norms, ref_norms, rtol=tol, atol=1e-12)


def between(norms: torch.Tensor) -> float:
    """A clipping bound with units on both sides."""
    return float(norms.median())


# --------------------------------------------------------------------------- a network with every layer type


class AllLayers(nn.Module):
    """Every supported layer family, in the arrangements the bundle's networks use them."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(6, 8)  # small table: per-unit gradients kept
        self.big_embedding = nn.Embedding(64, 8, padding_idx=0)  # large table: ghost by the memory rule
        self.time = nn.Linear(1, 8)  # a vector per row (time embedding)
        self.conv_in = nn.Conv3d(2, 8, 3, padding=1)  # k3 s1
        self.norm = nn.GroupNorm(4, 8)
        self.down = nn.Conv3d(8, 8, 3, stride=2, padding=1)  # k3 s2
        self.proj = nn.Conv3d(8, 8, 1)  # k1
        self.dilated = nn.Conv3d(8, 8, 3, padding="same", dilation=2, bias=False)
        self.token_norm = nn.LayerNorm(8)
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))  # attention projections
        self.shared = nn.Linear(8, 8)  # called twice: weight sharing
        self.slice_conv = nn.Conv2d(8, 8, 3, padding=1)  # 2D layer on rows x slices
        self.line = nn.Conv1d(8, 8, 3, padding=1)
        self.head = nn.Conv3d(8, 2, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.conv_in(x) + self.time(t.unsqueeze(1)).view(n, 8, 1, 1, 1)
        h = h + (self.embedding(idx % 6).mean(1) + self.big_embedding(idx).sum(1)).view(n, 8, 1, 1, 1)
        h = F.silu(self.norm(h))
        h = self.down(h)  # (n, 8, 2, 2, 2)
        h = self.proj(h) + self.dilated(h)
        tokens = h.flatten(2).transpose(1, 2)  # (n, 8 tokens, 8)
        z = self.token_norm(tokens)
        weights = torch.softmax(self.q(z) @ self.k(z).transpose(1, 2) / 8**0.5, dim=-1)
        tokens = tokens + self.o(weights @ self.v(z))
        tokens = self.shared(torch.tanh(self.shared(tokens)))
        h = tokens.transpose(1, 2).reshape(n, 8, 2, 2, 2)
        d = h.shape[2]
        slices = self.slice_conv(h.permute(0, 2, 1, 3, 4).reshape(n * d, 8, 2, 2))
        h = slices.reshape(n, d, 8, 2, 2).permute(0, 2, 1, 3, 4)
        h = h + self.line(h.flatten(2)).view_as(h)
        return self.head(F.interpolate(h, scale_factor=2))


def all_layers_loss(net: Callable, unit: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A loss of the unit's rows that is not a mean of per-row terms (a square of the unit mean)."""
    out = net(unit["x"], unit["t"], unit["idx"])
    return ((out - unit["y"]) ** 2).mean() + 0.5 * out.mean() ** 2


def all_layers_unit(m: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(m, 2, 4, 4, 4, generator=g, dtype=torch.float64),
        "t": torch.rand(m, generator=g, dtype=torch.float64),
        "idx": torch.randint(0, 64, (m, 5), generator=g),  # index 0 hits the padding row sometimes
        "y": torch.randn(m, 2, 4, 4, 4, generator=g, dtype=torch.float64),
    }


@pytest.fixture(scope="module")
def all_layers() -> nn.Module:
    torch.manual_seed(0)
    return AllLayers().double()


@pytest.mark.parametrize("rule", ["shapes", "keep", "ghost", "instantiate"])
def test_every_layer_type_every_rule_equals_loop(all_layers: nn.Module, monkeypatch, rule: str) -> None:
    if rule != "shapes":  # force one rule on every layer that has a choice, with no memory-budget upgrade
        monkeypatch.setattr(grad_norms, "choose_rule", lambda *args, **kwargs: rule)
        monkeypatch.setattr(bookkeeping, "KEEP_BUDGET", 0.0)
    units = [all_layers_unit(m, seed) for seed, m in enumerate([1, 3, 3, 2, 3, 1])]  # mixed m: split batches
    c = between(clipped_grad_sum(all_layers, all_layers_loss, units, 1e9, mode="loop")[1])
    ref = clipped_grad_sum(all_layers, all_layers_loss, units, c, mode="loop")
    assert (ref[1] > c).any() and (ref[1] < c).any()
    for physical in (2, 8):
        assert_same_step(clipped_grad_sum(all_layers, all_layers_loss, units, c, "bookkeeping", physical), ref)
    assert all(p.grad is None for p in all_layers.parameters())


@pytest.mark.parametrize("budget", [0.0, bookkeeping.KEEP_BUDGET])
def test_rules_chosen_from_shapes(all_layers: nn.Module, monkeypatch, budget: float) -> None:
    """Which rule each layer family gets on this network: all three by the per-layer rule; the budget upgrades."""
    seen: dict[str, set[str]] = {}
    original = grad_norms.process

    def spy(module, *args, **kwargs):
        out = original(module, *args, **kwargs)
        seen.setdefault(type(module).__name__, set()).update(out.rules.values())
        return out

    monkeypatch.setattr(bookkeeping, "process", spy)
    monkeypatch.setattr(bookkeeping, "KEEP_BUDGET", budget)
    units = [all_layers_unit(3, seed) for seed in range(4)]
    clipped_grad_sum(all_layers, all_layers_loss, units, 1.0, "bookkeeping", 8)
    assert set(seen) == {"Linear", "Conv3d", "Conv2d", "Conv1d", "GroupNorm", "LayerNorm", "Embedding"}
    assert seen["Embedding"] == {"keep", "ghost"}  # the small table kept, the large one by Gram matrices
    # Conv2d on slices: B p d > |A| + |G| and many positions: "instantiate", unless the budget keeps it
    assert seen["Conv2d"] == ({"keep", "instantiate"} if budget == 0 else {"keep"})


def test_frozen_parameters_and_partly_frozen_layers(all_layers: nn.Module) -> None:
    units = [all_layers_unit(2, seed) for seed in range(4)]
    frozen = [all_layers.conv_in.weight, all_layers.q.bias, all_layers.big_embedding.weight, all_layers.norm.weight]
    before = [p.detach().clone() for p in frozen]
    try:
        for p in frozen:
            p.requires_grad_(False)
        c = between(clipped_grad_sum(all_layers, all_layers_loss, units, 1e9, mode="loop")[1])
        ref = clipped_grad_sum(all_layers, all_layers_loss, units, c, mode="loop")
        got = clipped_grad_sum(all_layers, all_layers_loss, units, c, mode="bookkeeping", max_physical_batch_size=3)
        assert len(got[0]) == sum(p.requires_grad for p in all_layers.parameters())
        assert_same_step(got, ref)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    assert all(torch.equal(p, b) for p, b in zip(frozen, before))


def test_units_below_c_are_not_scaled(all_layers: nn.Module) -> None:
    units = [all_layers_unit(2, seed) for seed in range(4)]
    free, norms = clipped_grad_sum(all_layers, all_layers_loss, units, 1e9, mode="loop")
    c = float(norms.max()) * 1.01  # every unit below C: the sum is the plain sum of unit gradients
    got, got_norms = clipped_grad_sum(all_layers, all_layers_loss, units, c, mode="bookkeeping")
    assert_same_step((got, got_norms), (free, norms))


def test_non_finite_unit_contributes_zero(all_layers: nn.Module) -> None:
    units = [all_layers_unit(2, seed) for seed in range(4)]
    bad = dict(all_layers_unit(2, 9))
    bad["x"] = bad["x"].clone()
    bad["x"][0, 0, 0, 0, 0] = float("nan")
    ref = clipped_grad_sum(all_layers, all_layers_loss, units, 0.5, mode="loop")
    for mode in MODES:
        grads, norms = clipped_grad_sum(all_layers, all_layers_loss, units[:2] + [bad] + units[2:], 0.5, mode=mode)
        assert not torch.isfinite(norms[2])
        assert_same_step((grads, norms[[0, 1, 3, 4]]), ref)


def test_parameter_used_outside_its_layer_is_refused() -> None:
    class Reads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + F.linear(x, self.lin.weight)  # the second use is invisible to the hooks

    units = [{"x": torch.randn(1, 3), "y": torch.randn(1, 2)} for _ in range(2)]
    with pytest.raises(ValueError, match="used outside"):
        clipped_grad_sum(Reads(), lambda net, u: ((net(u["x"]) - u["y"]) ** 2).mean(), units, 1.0, mode="bookkeeping")


class TwoInputs(nn.Module):
    """A Linear whose output may be transposed (rows last), and a second argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, transpose: bool = False) -> torch.Tensor:
        out = self.lin(x) + (0 if y is None else y.sum())
        return out.t() if transpose else out


def test_losses_the_batching_cannot_split_are_refused() -> None:
    net = TwoInputs()
    units = [{"x": torch.randn(2, 3)} for _ in range(2)]
    with pytest.raises(ValueError, match="more than once"):
        clipped_grad_sum(net, lambda n, u: n(u["x"]).sum() + n(u["x"]).mean(), units, 1.0, mode="bookkeeping")
    with pytest.raises(ValueError, match="rows first"):
        clipped_grad_sum(net, lambda n, u: n(u["x"], transpose=True).sum(), units, 1.0, mode="bookkeeping")
    with pytest.raises(ValueError, match="leading dimension"):
        clipped_grad_sum(net, lambda n, u: n(u["x"], u["x"][:1]).sum(), units, 1.0, mode="bookkeeping")


def test_unsupported_layers_and_auto() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.PReLU(), nn.Linear(4, 1))
    assert len(unsupported_layers(net)) == 1 and "PReLU" in unsupported_layers(net)[0]
    assert resolve_grad_sample_mode("auto", "cuda", net) == "vmap"
    assert resolve_grad_sample_mode("auto", "cpu", net) == "loop"
    net[1].requires_grad_(False)  # a frozen unsupported layer is fine
    assert unsupported_layers(net) == []
    assert resolve_grad_sample_mode("auto", "cuda", net) == "bookkeeping"
    assert resolve_grad_sample_mode("auto", torch.device("cpu"), net) == "bookkeeping"
    assert resolve_grad_sample_mode("loop", "cuda") == "loop"
    with pytest.raises(ValueError, match="grad_sample_mode"):
        resolve_grad_sample_mode("ghost", "cpu")
    units = [{"x": torch.randn(2, 3), "y": torch.randn(2, 1)} for _ in range(3)]

    def loss(n: Callable, u: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return ((n(u["x"]) - u["y"]) ** 2).mean()

    assert_same_step(
        clipped_grad_sum(net, loss, units, 0.1, mode="auto"), clipped_grad_sum(net, loss, units, 0.1, mode="loop")
    )


# --------------------------------------------------------------------------- the bundle's diffusion UNet


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    # MONAI zero-initialises output layers (UNet, attention blocks): most gradients would vanish
    return tiny_unet(perturb="zero_matrices", std=0.05)


def diffusion_unit(records: int, k: int, seed: int) -> dict[str, torch.Tensor]:
    """One privacy unit of tests/helpers.py, each attribute missing with probability 0.3."""
    return helpers.diffusion_unit(records, k, seed, missing_rate=0.3)


@pytest.mark.parametrize("scope", ["all", "attention", "conditioning"])
@pytest.mark.parametrize("records,k", [(1, 1), (1, 3), (2, 3)])  # record K=1, record K=3, subject (ED + ES) K=3
def test_unet_equals_loop(unet: nn.Module, scope: str, records: int, k: int) -> None:
    units = [diffusion_unit(records, k, seed) for seed in range(3)]
    apply_scope(unet, scope)
    try:
        free = clipped_grad_sum(unet, diffusion_loss, units, 1e9, mode="loop")[1]
        c = between(free)
        ref = clipped_grad_sum(unet, diffusion_loss, units, c, mode="loop")
        got = clipped_grad_sum(unet, diffusion_loss, units, c, mode="bookkeeping", max_physical_batch_size=2)
        assert_same_step(got, ref)
    finally:
        apply_scope(unet, "all")


def test_unet_mixed_units_and_chunks(unet: nn.Module) -> None:
    """Record and subject units in one batch, chunks of 1, 2 and all units give the same step."""
    units = [diffusion_unit(1, 2, 0), diffusion_unit(2, 2, 1), diffusion_unit(1, 2, 2), diffusion_unit(2, 2, 3)]
    c = between(clipped_grad_sum(unet, diffusion_loss, units, 1e9, mode="loop")[1])
    ref = clipped_grad_sum(unet, diffusion_loss, units, c, mode="loop")
    for physical in (1, 3, 8):
        assert_same_step(clipped_grad_sum(unet, diffusion_loss, units, c, "bookkeeping", physical), ref)


@pytest.mark.parametrize("records,k", [(1, 1), (2, 3)])
def test_unet_removing_one_unit_moves_sum_by_at_most_c(unet: nn.Module, records: int, k: int) -> None:
    """Noise off: the clipped sums with and without one unit differ by at most C."""
    c = 1e-3  # far below the gradient norms: every unit is clipped
    batch = [diffusion_unit(1, k, seed) for seed in range(3)]
    extra = diffusion_unit(records, k, 42)
    without, _ = clipped_grad_sum(unet, diffusion_loss, batch, c, mode="bookkeeping")
    with_, norms = clipped_grad_sum(unet, diffusion_loss, batch[:1] + [extra] + batch[1:], c, mode="bookkeeping")
    assert norms[1] > 10 * c
    assert float((flat(with_) - flat(without)).norm()) <= c * (1 + 1e-5)


# --------------------------------------------------------------------------- the slice autoencoder


def test_slice_autoencoder_equals_loop() -> None:
    """2D layers see rows x slices, the output is a tuple: AutoencoderUnits' shape of loss."""
    ae = tiny_autoencoder(
        seed=0, channels=(4, 8), latent_channels=2, scale_factor=None, frozen=False, num_res_blocks=[1, 1]
    ).eval()  # eval: the latent is the posterior mean, so "loop" and one batched forward see the same values

    def loss(net: Callable, unit: Mapping[str, torch.Tensor]) -> torch.Tensor:
        recon, mu, sigma = net(unit["image"])
        kl = 0.5 * (mu**2 + sigma**2 - torch.log(sigma**2) - 1).mean()
        return (recon - unit["image"]).abs().mean() + 1e-3 * kl

    g = torch.Generator().manual_seed(0)
    units = [{"image": torch.randn(m, 1, 3, 8, 8, generator=g)} for m in (1, 2, 2, 1)]
    c = between(clipped_grad_sum(ae, loss, units, 1e9, mode="loop")[1])
    ref = clipped_grad_sum(ae, loss, units, c, mode="loop")
    assert_same_step(clipped_grad_sum(ae, loss, units, c, mode="bookkeeping", max_physical_batch_size=4), ref)


# --------------------------------------------------------------------------- two processes (gloo)


def test_distributed_bookkeeping_step_equals_single_process_loop(tmp_path: Path, monkeypatch) -> None:
    """tests/dp_distributed_check.py with the new mode on 2 processes equals one process with "loop".

    The single-process reference runs in this process (a third interpreter would add its
    import time, about half a minute on 2 busy cores).
    """
    import importlib.util

    script = ROOT / "tests" / "dp_distributed_check.py"
    spec = importlib.util.spec_from_file_location("dp_distributed_check", script)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    monkeypatch.delenv("RANK", raising=False)
    check.main(str(tmp_path / "one.json"), "loop")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    multi = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
         str(tmp_path / "two.json"), "bookkeeping"],
        check=False, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (one["world"], two["world"]) == (1, 2) and two["optimizer"] == "UnitDistributedDPOptimizer"
    np.testing.assert_allclose(two["update"], one["update"], rtol=1e-10, atol=1e-12)
    assert np.abs(one["update"]).max() > 0
