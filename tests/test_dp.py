"""DP engine: sensitivity, empty batches, accounting, budget stop, resume, scopes, errors.

In-process tests build a tiny conditioned UNet and a tiny slice-wise autoencoder, and call
``DPEngine.iteration`` directly; the bundle-level tests are in tests/test_dp_bundle.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from ignite.engine import Engine
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from scripts.dp import DPEngine, LatentDiffusionUnits, PrivacyUnits, apply_scope, validate_network
from scripts.networks import ConditionalDiffusionUNet, SliceAutoencoder
from scripts.privacy import compute_epsilon
from test_privacy_accounting import rdp_epsilon

C = 1.0
SHAPE = (1, 4, 16, 16)  # image (1, D, H, W); latent (4, 4, 8, 8)


class Records(torch.utils.data.Dataset):
    """Records shaped like the data pipeline's items; ``data`` holds the subject ids."""

    def __init__(self, subjects: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for s in range(subjects):
            for phase in ("ED", "ES"):
                missing = (torch.rand(14, generator=g) < 0.2).float()
                self.items.append(
                    {
                        "image": torch.rand(SHAPE, generator=g),
                        "attributes": torch.randn(14, generator=g) * (1 - missing),
                        "missing": missing,
                        "id": f"s{s}_{phase}",
                        "subject": f"s{s}",
                    }
                )
        self.data = [{"subject": it["subject"]} for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def tiny_unet(seed: int = 0) -> ConditionalDiffusionUNet:
    torch.manual_seed(seed)
    net = ConditionalDiffusionUNet(
        attribute_dim=16, attribute_heads=2, spatial_dims=3, in_channels=4, out_channels=4, channels=[16, 32],
        attention_levels=[False, True], num_res_blocks=1, num_head_channels=[0, 8], norm_num_groups=8,
    )
    with torch.no_grad():  # MONAI zero-initialises the output conv: give it weights so every layer gets gradients
        for p in net.unet.out.parameters():
            p.normal_(0, 0.1)
    return net


def tiny_autoencoder() -> SliceAutoencoder:
    torch.manual_seed(1)
    ae = SliceAutoencoder(
        in_channels=1, out_channels=1, channels=[8, 8], latent_channels=4, num_res_blocks=1,
        attention_levels=[False, False], norm_num_groups=4, with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )
    ae.scale_factor.fill_(1.5)
    return ae.eval().requires_grad_(False)


def make_engine(tmp_path, net=None, subjects=6, unit="subject", k=1, sigma=0.0, lr=1.0, batch=2, epochs=1, **kw):
    """A DP engine on tiny networks; ``sigma=0`` switches the noise off (infinite target)."""
    net = net or tiny_unet()
    units = PrivacyUnits(Records(subjects), unit)
    rows = LatentDiffusionUnits(tiny_autoencoder(), DDPMScheduler(num_train_timesteps=50), noise_multiplicity=k)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    args = dict(
        network=net, optimizer=opt, units=units, unit_rows=rows, target_epsilon=10.0 if sigma != 0 else float("inf"), target_delta=1e-5,
        max_grad_norm=C, epochs=epochs, logical_batch_size=batch, ledger_path=str(tmp_path / "ledger.json"),
        report_path=str(tmp_path / "report.json"), noise_multiplier=sigma, noise_seed=0, finetune_scope="all",
    )
    args.update(kw)
    return DPEngine(**args), units


def engine_stub() -> Engine:
    return Engine(lambda e, b: None)


def params_of(net):
    return [p.detach().clone() for p in net.parameters()]


def update(tmp_path, batch_indices, seed=0, **kw):
    """Parameter update (flattened) of one DP step on the given units, noise off, SGD lr=1."""
    dp, units = make_engine(tmp_path, **kw)
    before = params_of(dp.network)
    torch.manual_seed(seed)  # same draws for the units the batches share (they come first)
    dp.iteration(engine_stub(), [units[i] for i in batch_indices])
    after = params_of(dp.network)
    return torch.cat([(b - a).reshape(-1) for a, b in zip(before, after)]), dp


@pytest.mark.parametrize(
    "unit,k,mode,physical",
    [("subject", 1, "loop", 8), ("subject", 3, "loop", 8), ("record", 2, "vmap", 1), ("subject", 2, "vmap", 2)],
)
def test_sensitivity_adding_one_unit_moves_sum_by_at_most_c(tmp_path, unit, k, mode, physical):
    """With noise off, sum of clipped gradients with and without one extra unit differ by <= C."""
    kw = dict(unit=unit, k=k, grad_sample_mode=mode, max_physical_batch_size=physical, batch=2)
    without, dp = update(tmp_path, [0, 1, 2], **kw)
    with_one, _ = update(tmp_path, [0, 1, 2, 3], **kw)
    expected_batch = dp.optimizer.expected_batch_size
    # update = -lr * summed / expected_batch_size
    delta_sum = (with_one - without) * expected_batch
    assert float(delta_sum.norm()) <= C * (1 + 1e-4)
    assert float(delta_sum.norm()) > 0.1 * C  # the extra unit did contribute (not vacuous)


def test_physical_batch_split_does_not_change_the_step(tmp_path):
    a, _ = update(tmp_path, [0, 1, 2, 3], grad_sample_mode="vmap", max_physical_batch_size=1, k=2)
    b, _ = update(tmp_path, [0, 1, 2, 3], grad_sample_mode="vmap", max_physical_batch_size=4, k=2)
    c, _ = update(tmp_path, [0, 1, 2, 3], grad_sample_mode="loop", k=2)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


def test_subject_unit_holds_both_phases(tmp_path):
    units = PrivacyUnits(Records(3), "subject")
    assert len(units) == 3 and units.num_records == 6
    assert units[1]["id"] == ["s1_ED", "s1_ES"] and units[1]["image"].shape == (2, *SHAPE)
    records = PrivacyUnits(Records(3), "record")
    assert len(records) == 6 and records[1]["id"] == ["s0_ES"]


def test_subject_level_refuses_records_without_subject():
    records = Records(2)
    records.data[1]["subject"] = ""
    with pytest.raises(ValueError, match="privacy_unit='subject' needs a 'subject' key.*--privacy_unit record"):
        PrivacyUnits(records, "subject")
    assert len(PrivacyUnits(records, "record")) == 4


def test_empty_batch_takes_a_noise_only_step_and_is_accounted(tmp_path):
    dp, _ = make_engine(tmp_path, sigma=1.0)
    before = params_of(dp.network)
    dp.iteration(engine_stub(), [])
    after = params_of(dp.network)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # noise moved the weights
    assert dp.accountant.history == [(1.0, dp.sample_rate, 1)]
    assert dp.epsilon() == pytest.approx(compute_epsilon(dp.sample_rate, 1.0, 1, 1e-5))


def test_calibrated_noise_and_reported_epsilon_match_independent_accounting(tmp_path):
    dp, _ = make_engine(tmp_path, sigma=None, accountant="rdp", batch=2, epochs=3, subjects=6)
    # 6 subject units, logical batch 2: q = 1/3, 3 steps an epoch, 9 steps planned
    assert dp.sample_rate == pytest.approx(1 / 3) and dp.planned_steps == 9
    independent, _ = rdp_epsilon([(dp.noise_multiplier, dp.sample_rate, 9)], 1e-5)
    assert independent <= 10.0 * 1.03  # integer orders only: at most a few % above Opacus's
    assert compute_epsilon(dp.sample_rate, dp.noise_multiplier, 9, 1e-5, "rdp") <= 10.0
    for _ in range(9):
        dp.iteration(engine_stub(), [])
    reported = dp.epsilon()
    independent, _ = rdp_epsilon([(dp.noise_multiplier, dp.sample_rate, 9)], 1e-5)
    assert reported <= 10.0
    assert reported == pytest.approx(independent, rel=0.03) and reported <= independent + 1e-9


def test_budget_stop_never_exceeds_target(tmp_path):
    dp, _ = make_engine(tmp_path, sigma=None, accountant="rdp", epochs=1, batch=2)
    engine = engine_stub()
    steps = 0
    for _ in range(dp.planned_steps * 3):
        out = dp.iteration(engine, [])
        if out.get("skipped"):
            break
        steps += 1
    assert engine.should_terminate
    assert dp.epsilon() <= 10.0
    # one more step would have exceeded the target
    assert compute_epsilon(dp.sample_rate, dp.noise_multiplier, steps + 1, 1e-5, "rdp") > 10.0
    assert steps >= dp.planned_steps


def test_resume_restores_history_and_counts_steps_lost_after_the_checkpoint(tmp_path):
    dp, units = make_engine(tmp_path, sigma=1.2)
    for _ in range(2):
        dp.iteration(engine_stub(), [units[0]])
    checkpoint = copy.deepcopy(dp.state_dict())
    dp.iteration(engine_stub(), [units[1]])  # a step after the checkpoint, then the run dies
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert ledger["stages"][-1]["steps"] == 3  # written before the step ran

    resumed, _ = make_engine(tmp_path, sigma=1.2)
    resumed.load_state_dict(checkpoint)
    assert resumed.steps_done == 3
    assert sum(h[2] for h in resumed.accountant.history) == 3
    assert resumed.epsilon() == pytest.approx(compute_epsilon(resumed.sample_rate, 1.2, 3, 1e-5))
    resumed.iteration(engine_stub(), [units[2]])
    assert resumed.epsilon() == pytest.approx(compute_epsilon(resumed.sample_rate, 1.2, 4, 1e-5))


def test_resume_with_other_privacy_settings_is_refused(tmp_path):
    dp, _ = make_engine(tmp_path, sigma=1.0)
    state = dp.state_dict()
    other, _ = make_engine(tmp_path, sigma=1.0, unit="record")
    with pytest.raises(ValueError, match="cannot resume: the DP settings .*privacy_unit"):
        other.load_state_dict(state)


@pytest.mark.parametrize("scope", ["attention", "conditioning"])
def test_frozen_scopes_receive_no_update(tmp_path, scope):
    dp, units = make_engine(tmp_path, sigma=1.0, finetune_scope=scope)
    names = dict(dp.network.named_parameters())
    before = {n: p.detach().clone() for n, p in names.items()}
    dp.iteration(engine_stub(), [units[0], units[1]])
    trainable = set(dp.trainable)
    assert any(n.startswith("attribute_encoder.") for n in trainable)
    if scope == "attention":
        assert any(".attentions." in n or "middle_block.attention" in n for n in trainable)
    else:
        assert all(n.startswith("attribute_encoder.") or ".attn2." in n for n in trainable)
    assert not any("resnets" in n or n.startswith("unet.conv_in") for n in trainable)
    for n, p in names.items():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), n


def test_scope_all_trains_everything():
    net = tiny_unet()
    assert len(apply_scope(net, "all")) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="finetune_scope.*expected one of"):
        apply_scope(net, "attn")


def test_batchnorm_is_rejected_by_name():
    net = nn.Sequential(nn.Conv3d(1, 4, 3), nn.BatchNorm3d(4), nn.ReLU(), nn.GroupNorm(2, 4))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm3d\) normalises across the batch"):
        validate_network(net)
    validate_network(nn.Sequential(nn.Conv3d(1, 4, 3), nn.GroupNorm(2, 4)))


def test_dataset_smaller_than_logical_batch(tmp_path):
    with pytest.raises(ValueError, match=r"has 3 privacy units \(subject-level, 6 records\), fewer than logical_batch_size=4"):
        make_engine(tmp_path, subjects=3, batch=4)


def test_unreachable_epsilon_says_what_would_work(tmp_path):
    with pytest.raises(ValueError, match="unreachable.*Use a larger target_epsilon"):
        make_engine(tmp_path, sigma=None, target_epsilon=0.001, epochs=5)


def test_report_composes_stages_with_the_accountant(tmp_path):
    prior = [
        {
            "stage": "autoencoder_dp_finetune", "noise_multiplier": 2.0, "sample_rate": 1 / 3, "steps": 6, "delta": 1e-5,
            "accountant": "rdp",
        }
    ]
    dp, _ = make_engine(tmp_path, sigma=None, accountant="rdp", prior_stages=prior, epochs=2)
    for _ in range(dp.planned_steps):
        dp.iteration(engine_stub(), [])
    report = dp.write_report()
    assert json.loads((tmp_path / "report.json").read_text())["epsilon"] == pytest.approx(report["epsilon"])
    alone = [s["epsilon_alone"] for s in report["stages"]]
    assert len(alone) == 2 and max(alone) < report["epsilon"] < sum(alone)
    independent, _ = rdp_epsilon([(2.0, 1 / 3, 6), (dp.noise_multiplier, dp.sample_rate, dp.planned_steps)], 1e-5)
    assert report["epsilon"] == pytest.approx(independent, rel=0.03)
    assert report["epsilon"] <= 10.0  # the budget covers the whole ledger
    assert report["privacy_unit"] == "subject" and "separate release" in report["covers"]
