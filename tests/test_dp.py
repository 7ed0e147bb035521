"""DP training handler: sensitivity, empty batches, accounting, budget stop, resume, scopes, errors.

In-process tests build a tiny conditioned UNet and a tiny slice-wise autoencoder and call
``DPTrainingHandler.iteration`` directly; the ledger alone is tested in tests/test_ledger.py and
the bundle-level runs in tests/test_dp_bundle.py.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import Records, make_dp_stage, rdp_epsilon, tiny_unet
from ignite.engine import Engine
from scripts.privacy.accounting import compute_epsilon
from scripts.privacy.units import PrivacyUnits
from scripts.privacy.validation import apply_scope, validate_network
from torch import nn

SHAPE = (1, 4, 16, 16)
C = 1.0


def engine_stub() -> Engine:
    return Engine(lambda e, b: None)


def params_of(net):
    return [p.detach().clone() for p in net.parameters()]


def update(tmp_path, batch_indices, **kw):
    """Parameter update (flattened) of one DP step on the given units, noise off, SGD lr=1.

    The unit loss's private generator has a fixed seed, so two stages draw the same
    (timestep, noise) rows for the units their batches share (they come first)."""
    dp, units = make_dp_stage(tmp_path, **kw)
    before = params_of(dp.network)
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


def test_subject_unit_holds_both_phases():
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


@pytest.mark.parametrize("field", ["id", "image"])
def test_one_record_under_two_subjects_is_refused_naming_both_entries(field, tmp_path):
    records = Records(3)
    if field == "image":
        for i, entry in enumerate(records.data):
            entry["image"] = str(tmp_path / f"{i}.nii.gz")
        records.data[4]["image"] = str(tmp_path / "." / "1.nii.gz")  # same file, another spelling
    else:
        records.data[4]["id"] = records.data[1]["id"]
    for unit in ("subject", "record"):
        with pytest.raises(ValueError, match=r"same record twice .*entry 1 \(subject 's0'.*entry 4 \(subject 's2'"):
            PrivacyUnits(records, unit)


def test_empty_batch_takes_a_noise_only_step_and_is_accounted(tmp_path):
    dp, _ = make_dp_stage(tmp_path, sigma=1.0)
    before = params_of(dp.network)
    dp.iteration(engine_stub(), [])
    after = params_of(dp.network)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))  # noise moved the weights
    assert dp.ledger.history == [(1.0, dp.ledger.sample_rate, 1)]
    assert dp.ledger.get_epsilon() == pytest.approx(compute_epsilon(dp.ledger.sample_rate, 1.0, 1, 1e-5))


def test_step_output_and_global_rng_reveal_nothing_of_the_batch(tmp_path):
    """The step returns no unit count, and its draws leave the global RNG (saved in checkpoints) untouched."""
    dp, units = make_dp_stage(tmp_path, sigma=1.0, k=2)
    dp.unit_loss.generator = torch.Generator().manual_seed(123)
    state = torch.get_rng_state()
    out = dp.iteration(engine_stub(), [units[0], units[1], units[2]])
    assert torch.equal(torch.get_rng_state(), state)
    assert set(out) == {"step"}


def test_calibrated_noise_and_reported_epsilon_match_independent_accounting(tmp_path):
    dp, _ = make_dp_stage(tmp_path, sigma=None, accountant="rdp", batch=2, epochs=3, subjects=6)
    ledger = dp.ledger
    # 6 subject units, logical batch 2: q = 1/3, 3 steps an epoch, 9 steps planned
    assert ledger.sample_rate == pytest.approx(1 / 3) and ledger.planned_steps == 9
    independent, _ = rdp_epsilon([(ledger.noise_multiplier, ledger.sample_rate, 9)], 1e-5)
    assert independent <= 10.0 * 1.03  # integer orders only: at most a few % above Opacus's
    assert compute_epsilon(ledger.sample_rate, ledger.noise_multiplier, 9, 1e-5, "rdp") <= 10.0
    for _ in range(9):
        dp.iteration(engine_stub(), [])
    reported = ledger.get_epsilon()
    assert reported <= 10.0
    assert reported == pytest.approx(independent, rel=0.03) and reported <= independent + 1e-9


def test_budget_stop_never_exceeds_target(tmp_path):
    dp, _ = make_dp_stage(tmp_path, sigma=None, accountant="rdp", epochs=1, batch=2)
    engine = engine_stub()
    steps = 0
    for _ in range(dp.ledger.planned_steps * 3):
        out = dp.iteration(engine, [])
        if out.get("skipped"):
            break
        steps += 1
    assert engine.should_terminate
    assert dp.ledger.get_epsilon() <= 10.0
    # one more step would have exceeded the target
    assert compute_epsilon(dp.ledger.sample_rate, dp.ledger.noise_multiplier, steps + 1, 1e-5, "rdp") > 10.0
    assert steps >= dp.ledger.planned_steps


def test_resume_restores_history_and_counts_steps_lost_after_the_checkpoint(tmp_path):
    dp, units = make_dp_stage(tmp_path, sigma=1.2)
    for _ in range(2):
        dp.iteration(engine_stub(), [units[0]])
    checkpoint = copy.deepcopy(dp.state_dict())
    dp.iteration(engine_stub(), [units[1]])  # a step after the checkpoint, then the run dies
    ledger = json.loads((tmp_path / "ledger.json").read_text())
    assert ledger["stages"][-1]["steps"] == 3  # written before the step ran

    resumed, _ = make_dp_stage(tmp_path, sigma=1.2)
    resumed.load_state_dict(checkpoint)
    assert resumed.ledger.steps == 3
    q = resumed.ledger.sample_rate
    assert resumed.ledger.get_epsilon() == pytest.approx(compute_epsilon(q, 1.2, 3, 1e-5))
    resumed.iteration(engine_stub(), [units[2]])
    assert resumed.ledger.get_epsilon() == pytest.approx(compute_epsilon(q, 1.2, 4, 1e-5))


def test_resume_with_other_privacy_settings_is_refused(tmp_path):
    dp, _ = make_dp_stage(tmp_path, sigma=1.0)
    state = dp.state_dict()
    other, _ = make_dp_stage(tmp_path, sigma=1.0, unit="record")
    with pytest.raises(ValueError, match="cannot resume: the DP settings .*privacy_unit"):
        other.load_state_dict(state)


@pytest.mark.parametrize("scope", ["attention", "conditioning"])
def test_frozen_scopes_receive_no_update(tmp_path, scope):
    dp, units = make_dp_stage(tmp_path, sigma=1.0, finetune_scope=scope)
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
    with pytest.raises(
        ValueError, match=r"has 3 privacy units \(subject-level, 6 records\), fewer than logical_batch_size=4"
    ):
        make_dp_stage(tmp_path, subjects=3, batch=4)


def test_unreachable_epsilon_says_what_would_work(tmp_path):
    with pytest.raises(ValueError, match="unreachable.*Use a larger target_epsilon"):
        make_dp_stage(tmp_path, sigma=None, target_epsilon=0.001, epochs=5)


@pytest.mark.parametrize(
    "setting,value", [("max_physical_batch_size", 0), ("max_grad_norm", 0.0), ("grad_sample_mode", "fast")]
)
def test_bad_clipping_settings_fail_before_any_file_is_written(tmp_path, setting, value):
    with pytest.raises(ValueError, match=setting if setting != "grad_sample_mode" else "fast"):
        make_dp_stage(tmp_path, sigma=1.0, **{setting: value})
    assert list(tmp_path.iterdir()) == []


def test_a_loss_with_a_trainable_discriminator_is_refused_in_dp():
    from scripts.losses import AutoencoderKLLoss
    from scripts.privacy.unit_losses import AutoencoderUnitLoss

    with pytest.raises(ValueError, match="adversarial_weight"):
        AutoencoderUnitLoss(AutoencoderKLLoss(adversarial_weight=0.1))
    AutoencoderUnitLoss(AutoencoderKLLoss())
