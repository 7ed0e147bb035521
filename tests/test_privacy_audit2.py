"""Second privacy audit: each finding's failure mode, reproduced on small networks and shown fixed.

1. The DP autoencoder step draws its posterior samples from the unit's private generator,
   leaves the global RNG untouched, and a unit added first or last moves the noise-off sum
   by at most C.
2. ``grad_sample_mode`` book-keeping is checked against ``loop`` before it is trusted:
   networks that break its layout assumption (a positional table indexed by ``arange(T)``,
   a Linear on a sequence-first tensor, a functional ``F.batch_norm``) fall back and keep
   the noise-off sensitivity at C; an unsupported layer inside the scope is refused before a
   step is recorded; a physical batch that does not divide a sequence does not end the run.
3. A resume whose write-ahead ledger is missing (or belongs to another run started in the
   same second) is refused or counted in full, never undercounted.
4. The DP stages' log lines carry no wall-clock time.
5. 16-bit clipped units stay within C; ``Embedding(max_norm=...)`` is refused; the ranks of
   the distributed Poisson sampler draw independent streams from one explicit seed.
"""

from __future__ import annotations

import copy
import logging
import logging.config
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import Records, dp_settings, make_dp_stage, tiny_autoencoder
from ignite.engine import Engine
from scripts.errors import ConfigError, DataError
from scripts.losses import AutoencoderKLLoss
from scripts.privacy import ledger as ledger_module
from scripts.privacy.accounting import compute_epsilon
from scripts.privacy.handler import DPTrainingHandler
from scripts.privacy.ledger import PrivacyLedger
from scripts.privacy.per_sample import MODES, clipped_grad_sum, resolve_grad_sample_mode
from scripts.privacy.unit_losses import AutoencoderUnitLoss
from scripts.privacy.units import PrivacyUnits, poisson_loader, sample_rate
from scripts.privacy.validation import validate_network
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def engine_stub() -> Engine:
    return Engine(lambda e, b: None)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


# ------------------------------------------------------------------ 1. the autoencoder's posterior noise


def autoencoder_stage(tmp_path, seed=0):
    ae = tiny_autoencoder(seed=0, frozen=False)
    loss = AutoencoderUnitLoss(AutoencoderKLLoss(kl_weight=1e-3))
    # set after construction (not as arguments) so that the test also runs, and fails, on the code before the fix
    loss.autoencoder, loss.generator = ae, torch.Generator().manual_seed(seed)
    return ae, loss


def test_dp_autoencoder_step_leaves_the_global_rng_untouched(tmp_path):
    ae, loss = autoencoder_stage(tmp_path)
    units = PrivacyUnits(Records(4), "subject")
    ledger = PrivacyLedger(
        dp_settings(units, stage="autoencoder_dp_finetune"), sample_rate(units, 2), 1, path=None, noise_multiplier=1.0
    )
    dp = DPTrainingHandler(ae, torch.optim.SGD(ae.parameters(), lr=0.1), ledger, loss, str(tmp_path / "r.json"))
    torch.manual_seed(0)  # the stage's public seed
    state = torch.get_rng_state()
    dp.iteration(engine_stub(), [units[0], units[1], units[2]])
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("place", ["first", "last"])
def test_dp_autoencoder_sensitivity_wherever_the_new_unit_is_placed(tmp_path, place):
    """Noise off, public global seed: a unit added first or last moves the clipped sum by <= C."""
    ae, loss = autoencoder_stage(tmp_path)
    units = PrivacyUnits(Records(5), "record")
    made = [loss.make_unit(units[i], "cpu") for i in range(5)]
    base, extra = made[:4], made[4]
    c = 1e-3  # below every unit's gradient norm: every unit is clipped

    def summed(batch):
        torch.manual_seed(0)
        return flat(clipped_grad_sum(ae.train(), loss.loss, batch, c, "loop")[0])

    with_one = summed([extra, *base] if place == "first" else [*base, extra])
    moved = float((with_one - summed(base)).norm()) / c
    assert moved <= 1 + 1e-5, f"adding one unit {place} moved the noise-off sum by {moved:.4f} C"


# ------------------------------------------------------------------ 2. auto / book-keeping checked before trusted


class PositionalTable(nn.Module):
    """A learned positional table looked up with arange(T): the Embedding sees T rows, not the batch."""

    def __init__(self, t=12, d=4):
        super().__init__()
        self.pos, self.inp, self.out = nn.Embedding(t, d), nn.Linear(d, d), nn.Linear(d, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x) * self.pos(torch.arange(x.shape[1]))))


class SequenceFirst(nn.Module):
    """A Linear applied to a (T, B, d) tensor: its leading dimension is the sequence."""

    def __init__(self, d=4):
        super().__init__()
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.inp(x.transpose(0, 1)))).transpose(0, 1)


class FunctionalBatchNorm(nn.Module):
    """F.batch_norm over the batch: no BatchNorm module for the validator to see."""

    def __init__(self, d=4):
        super().__init__()
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, 1)

    def forward(self, x):
        h = self.inp(x.flatten(0, 1) if x.ndim == 3 else x)
        h = F.batch_norm(h, None, None, training=True)
        return self.out(torch.tanh(h)).reshape(x.shape[0], -1)


class SequenceUnits:
    """Unit loss of a unit of one (T, d) sequence with a target (for the handler)."""

    def make_unit(self, unit, device):
        return {k: v.to(device) for k, v in unit.items()}

    def loss(self, net, unit):
        return ((net(unit["x"]).reshape(-1) - unit["y"].reshape(-1)) ** 2).mean()


def sequence_units(n, t=12, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(1, t, d, generator=g) * 3, "y": torch.randn(1, t, generator=g) * 3} for _ in range(n)]


def dp_stage(tmp_path, net, mode, physical=8, c=0.01):
    records = PrivacyUnits(Records(10), "record")
    ledger = PrivacyLedger(
        dp_settings(
            records,
            grad_sample_mode=mode,
            max_physical_batch_size=physical,
            max_grad_norm=c,
            logical_batch_size=4,
            target_epsilon=float("inf"),
        ),
        sample_rate(records, 4),
        1,
        path=str(tmp_path / "ledger.json"),
        noise_multiplier=0.0,
    )
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    return DPTrainingHandler(net, opt, ledger, SequenceUnits(), str(tmp_path / "report.json"), noise_seed=0)


def noise_off_sensitivity(tmp_path, make_net, units, mode, physical=8, c=0.01):
    """|| update(units + one) - update(units) || * expected batch / C, one DP step each, noise off, SGD lr 1."""
    updates = []
    for batch in (units[:-1], units):
        net = make_net()
        dp = dp_stage(tmp_path / str(len(batch)), net, mode, physical, c)
        before = [p.detach().clone() for p in net.parameters()]
        dp.iteration(engine_stub(), batch)
        updates.append(flat([b - p for b, p in zip(before, net.parameters())]))
    return float((updates[1] - updates[0]).norm()) * dp.optimizer.expected_batch_size / c, dp


def seeded(cls):
    def make():
        torch.manual_seed(0)
        return cls()

    return make


# network and units in the larger batch (one where the code before the fix moved the sum beyond C)
ADVERSARIAL = {
    "positional_table": (seeded(PositionalTable), 2),
    "sequence_first": (seeded(SequenceFirst), 3),
    "functional_batch_norm": (seeded(FunctionalBatchNorm), 3),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_auto_keeps_the_sensitivity_on_networks_that_break_bookkeeping(tmp_path, name):
    """What the configs resolve 'auto' to on CPU (book-keeping here) keeps noise-off sensitivity <= C."""
    make_net, batch = ADVERSARIAL[name]
    mode = resolve_grad_sample_mode("auto", "cpu", make_net())
    for tmp in (tmp_path / "a", tmp_path / "b"):
        tmp.mkdir()
    ratio, dp = noise_off_sensitivity(tmp_path / "a", make_net, sequence_units(batch), mode)
    assert ratio <= 1 + 1e-4, f"{name}: noise-off sum moved by {ratio:.3f} C"
    if name == "functional_batch_norm":
        assert "batch_norm" in dp.clipper.reason
    exact, _ = noise_off_sensitivity(tmp_path / "b", make_net, sequence_units(batch), "loop")
    assert ratio == pytest.approx(exact, rel=1e-3)


def test_auto_is_resolved_after_the_scope_and_checked_networks_keep_bookkeeping(tmp_path):
    dp, units = make_dp_stage(tmp_path, grad_sample_mode="auto", sigma=0.0)
    assert dp.clipper.mode == "bookkeeping" and dp.ledger.settings["grad_sample_mode"] == "bookkeeping"
    dp.iteration(engine_stub(), [units[0], units[1], units[2]])
    assert dp.clipper.reason is None and dp.clipper.mode == "bookkeeping"  # the shipped layers pass the check


def test_an_unsupported_layer_unfrozen_by_the_scope_never_reaches_a_recorded_step(tmp_path):
    """The configs resolved 'auto' before the scope: a frozen PReLU looked supported, then the scope unfroze it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 1))
    net[1].requires_grad_(False)
    mode = resolve_grad_sample_mode("auto", "cpu", net)  # as configs/common.yaml did
    records = PrivacyUnits(Records(10), "record")
    ledger = PrivacyLedger(
        dp_settings(records, grad_sample_mode=mode, logical_batch_size=4, target_epsilon=float("inf")),
        sample_rate(records, 4),
        1,
        path=str(tmp_path / "ledger.json"),
        noise_multiplier=0.0,
    )
    units = [{"x": torch.randn(1, 4), "y": torch.randn(1)} for _ in range(3)]
    with pytest.raises(ConfigError, match="PReLU"):
        dp = DPTrainingHandler(net, torch.optim.SGD(net.parameters(), lr=1.0), ledger, SequenceUnits(), "r.json")
        dp.iteration(engine_stub(), units)
    assert ledger.steps == 0 and not (tmp_path / "ledger.json").exists()
    # 'auto' itself, resolved by the handler after the scope, runs 'loop'
    ledger.settings["grad_sample_mode"] = "auto"
    dp = DPTrainingHandler(net, torch.optim.SGD(net.parameters(), lr=1.0), ledger, SequenceUnits(), "r.json")
    assert dp.clipper.mode == "loop"


def test_a_physical_batch_that_does_not_divide_the_sequence_does_not_end_the_run(tmp_path):
    """T = 4 positions and chunks of 3 units: book-keeping cannot split the rows; the recorded step still runs."""
    torch.manual_seed(0)
    net = SequenceFirst()
    dp = dp_stage(tmp_path, net, "bookkeeping", physical=3)
    units = sequence_units(3, t=4)
    dp.iteration(engine_stub(), units[:2])  # chunks of 2 divide 4
    dp.iteration(engine_stub(), units)  # a chunk of 3 does not
    assert dp.ledger.steps == 2 and dp.clipper.mode == "loop"


# ------------------------------------------------------------------ 3. resume without the write-ahead file


def test_resume_without_the_ledger_file_is_refused(tmp_path):
    dp, units = make_dp_stage(tmp_path, sigma=1.2)
    for _ in range(6):
        dp.iteration(engine_stub(), [])
    checkpoint = copy.deepcopy(dp.state_dict())
    for _ in range(4):  # steps after the checkpoint, then the run dies
        dp.iteration(engine_stub(), [])
    (tmp_path / "ledger.json").unlink()
    resumed, _ = make_dp_stage(tmp_path, sigma=1.2)
    with pytest.raises(DataError, match="write-ahead ledger .* is missing"):
        resumed.load_state_dict(checkpoint)


def test_runs_started_in_the_same_second_are_told_apart(tmp_path, monkeypatch):
    """Run A (checkpoint at 8, killed at 18); run B, fresh, same second, killed after 1; resume A: >= 19 steps."""
    monkeypatch.setattr(ledger_module.time, "strftime", lambda *a: "2026-01-01T00:00:00")
    a, _ = make_dp_stage(tmp_path, sigma=1.2)
    for _ in range(8):
        a.iteration(engine_stub(), [])
    checkpoint = copy.deepcopy(a.state_dict())
    for _ in range(10):
        a.iteration(engine_stub(), [])
    b, _ = make_dp_stage(tmp_path, sigma=1.2)  # --resume False: a new run, same start second
    b.iteration(engine_stub(), [])
    resumed, _ = make_dp_stage(tmp_path, sigma=1.2)
    resumed.load_state_dict(checkpoint)
    q = resumed.ledger.sample_rate
    assert resumed.ledger.get_epsilon() >= compute_epsilon(q, 1.2, 19, 1e-5) * (1 - 1e-9)


# ------------------------------------------------------------------ 4. no wall-clock time in DP log lines


def test_dp_stage_log_lines_carry_no_wall_clock_time(tmp_path):
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        logging.config.fileConfig(ROOT / "configs" / "logging.conf", disable_existing_loggers=False)
        make_dp_stage(tmp_path, sigma=1.0)
        record = logging.LogRecord("scripts.privacy.handler", logging.INFO, __file__, 1, "epoch 1: ...", None, None)
        lines = [h.format(record) for h in root.handlers if h not in saved[0]]
        assert lines and not any(re.search(r"\d\d:\d\d:\d\d", line) for line in lines), lines
    finally:
        for h in list(root.handlers):
            if h not in saved[0]:
                root.removeHandler(h)
        for h in saved[0]:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(saved[1])


# ------------------------------------------------------------------ 5. smaller findings


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
def test_a_clipped_unit_stays_within_c_in_16_bit_floats(dtype, mode):
    worst = 0.0
    for seed in range(4):
        torch.manual_seed(seed)
        net = Wide().to(dtype)
        unit = {"x": (torch.randn(2, 64) * 4).to(dtype), "y": (torch.randn(2, 1) * 4).to(dtype)}

        def loss(model, u):
            return ((model(u["x"]) - u["y"]) ** 2).mean()

        summed, norms = clipped_grad_sum(net, loss, [unit], 0.37, mode)
        assert float(norms[0]) > 0.37  # the unit is clipped
        worst = max(worst, float(flat(summed).norm()) / 0.37)
    assert worst <= 1.0, f"{dtype} {mode}: a clipped unit reached {worst:.5f} C"


def test_embedding_with_max_norm_is_refused():
    with pytest.raises(ConfigError, match="max_norm"):
        validate_network(nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 1)))
    validate_network(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 1)))


def test_distributed_sampler_ranks_draw_independent_streams_from_one_seed(monkeypatch):
    from scripts.privacy import units as units_module

    records = PrivacyUnits(Records(40), "record")
    picks = []
    for rank in (0, 1):
        monkeypatch.setattr(units_module.idist, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(units_module.idist, "get_world_size", lambda: 2)
        loader = poisson_loader(records, 0.25, seed=5, distributed=True)
        picks.append([[i // 2 for i in batch] for batch in loader.batch_sampler])
    assert picks[0] != picks[1]  # same seed, but not the same inclusions shard by shard
    monkeypatch.setattr(units_module.idist, "get_rank", lambda: 0)
    again = poisson_loader(records, 0.25, seed=5, distributed=True)
    assert [[i // 2 for i in b] for b in again.batch_sampler] == picks[0]  # still reproducible from the seed
