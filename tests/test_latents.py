"""Latents encoded once per record (scripts/latents.py): same latents, batches and DP rows as encoding each time."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Records, dp_settings, tiny_autoencoder, tiny_unet
from monai.networks.schedulers import DDPMScheduler
from scripts.engines import LatentDiffusionPrepareBatch
from scripts.latents import CachedLatentPrepareBatch, CachedLatentUnitLoss, LatentCache, RepeatedDataset
from scripts.privacy.handler import DPTrainingHandler
from scripts.privacy.ledger import PrivacyLedger
from scripts.privacy.unit_losses import LatentDiffusionUnitLoss
from scripts.privacy.units import PrivacyUnits, sample_rate
from torch.utils.data import default_collate

TOL = dict(rtol=1e-5, atol=1e-6)  # encoding several volumes at once may round differently from one at a time


def test_cached_latents_equal_freshly_encoded():
    ae, records = tiny_autoencoder(), Records(3)
    cache = LatentCache(ae, records, batch_size=4)
    assert len(cache) == 6 and "s2_ES" in cache
    for item in records.items:
        fresh = ae.encode_stage_2_inputs(item["image"][None]) * ae.scale_factor
        torch.testing.assert_close(cache.latents([item["id"]]), fresh, **TOL)
        mean, std = ae.encode(item["image"][None])
        cached_mean, cached_std = cache.posterior(item["id"])
        torch.testing.assert_close(cached_mean, mean, **TOL)
        torch.testing.assert_close(cached_std, std, **TOL)
    # order follows the ids asked for
    both = cache.latents(["s1_ES", "s0_ED"])
    torch.testing.assert_close(both[1:], cache.latents(["s0_ED"]))
    with pytest.raises(KeyError, match="record 'nope' was not encoded"):
        cache.latents(["nope"])


def test_cached_prepare_batch_gives_the_same_batch():
    ae, records = tiny_autoencoder(), Records(3)
    batch = default_collate(records.items[1:5])
    kw = dict(condition_dropout=0.3, subset_conditioning=True, seed=7)  # seeded draws: comparable
    fresh = LatentDiffusionPrepareBatch(ae, 50, **kw)(batch)
    cached = CachedLatentPrepareBatch(ae, 50, cache=LatentCache(ae, records), **kw)(batch)
    torch.testing.assert_close(cached[0], fresh[0], **TOL)  # latents
    torch.testing.assert_close(cached[1], fresh[1])  # target (the noise)
    for key in ("noise", "timesteps", "condition"):
        torch.testing.assert_close(cached[3][key], fresh[3][key])
    uncached = CachedLatentPrepareBatch(ae, 50, cache=None, **kw)(batch)
    torch.testing.assert_close(uncached[0], fresh[0])


def _dp_step(tmp_path, loss, units, batch):
    """Parameter update of one DP step (noise off, SGD lr 1) on ``batch`` units, and the rows it made."""
    net = tiny_unet()
    ledger = PrivacyLedger(
        dp_settings(units, noise_multiplicity=loss.k, logical_batch_size=2, target_epsilon=float("inf")),
        sample_rate(units, 2),
        1,
        path=str(tmp_path / "ledger.json"),
        noise_multiplier=0.0,
    )
    handler = DPTrainingHandler(
        net, torch.optim.SGD(net.parameters(), lr=1.0), ledger, loss, str(tmp_path / "report.json"), noise_seed=0
    )
    before = [p.detach().clone() for p in net.parameters()]
    handler.iteration(None, [units[i] for i in batch])
    return torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(net.parameters(), before)])


def test_dp_rows_and_step_identical_with_and_without_cache(tmp_path):
    ae, scheduler = tiny_autoencoder(), DDPMScheduler(num_train_timesteps=50)
    units = PrivacyUnits(Records(4), "subject")
    kw = dict(noise_multiplicity=2, condition_dropout=0.3, subset_conditioning=True, seed=3)
    fresh = LatentDiffusionUnitLoss(ae, scheduler, **kw)
    cached = CachedLatentUnitLoss(ae, scheduler, cache=LatentCache(ae, units.dataset), **kw)
    for i in range(len(units)):
        a, b = fresh.make_unit(units[i], "cpu"), cached.make_unit(units[i], "cpu")
        assert a.keys() == b.keys() and a["latents"].shape[0] == 4  # 2 records x K = 2
        torch.testing.assert_close(b["latents"], a["latents"], **TOL)
        for key in ("noise", "timesteps", "condition"):
            torch.testing.assert_close(b[key], a[key])
    # a whole DP step (per-unit clipping, noise off) moves the weights the same way
    fresh = LatentDiffusionUnitLoss(ae, scheduler, **kw)
    cached = CachedLatentUnitLoss(ae, scheduler, cache=LatentCache(ae, units.dataset), **kw)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    step_fresh = _dp_step(tmp_path / "a", fresh, units, [0, 2, 3])
    step_cached = _dp_step(tmp_path / "b", cached, units, [0, 2, 3])
    assert float(step_fresh.norm()) > 0
    torch.testing.assert_close(step_cached, step_fresh, rtol=1e-4, atol=1e-6)


def test_store_is_reused_only_for_the_same_autoencoder_and_records(tmp_path):
    ae, records = tiny_autoencoder(), Records(2)
    store = str(tmp_path / "latents.pt")
    first = LatentCache(ae, records, store=store)
    again = LatentCache(ae, records, store=store)
    torch.testing.assert_close(again.latents(["s1_ED"]), first.latents(["s1_ED"]))
    other = copy.deepcopy(ae)
    with torch.no_grad():
        next(other.parameters()).add_(0.1)
    assert LatentCache(other, records, store=store).digest != first.digest
    fewer = Records(1)
    assert len(LatentCache(ae, fewer, store=store)) == 2  # other records: encoded afresh


def test_repeated_dataset():
    records = Records(2)
    rep = RepeatedDataset(records, 3)
    assert len(rep) == 12 and rep[5]["id"] == records[1]["id"] and rep.data is records.data
    with pytest.raises(ValueError, match="passes_per_epoch"):
        RepeatedDataset(records, 0)


def test_v_prediction_targets_in_pretraining_and_dp():
    ae, records = tiny_autoencoder(), Records(2)
    scheduler = DDPMScheduler(num_train_timesteps=50, prediction_type="v_prediction")
    batch = default_collate(records.items[:2])
    latents, target, _, kw = CachedLatentPrepareBatch(
        ae, 50, cache=LatentCache(ae, records), scheduler=scheduler, seed=1
    )(batch)
    torch.testing.assert_close(target, scheduler.get_velocity(latents, kw["noise"], kw["timesteps"]))
    units = PrivacyUnits(records, "subject")
    loss = CachedLatentUnitLoss(ae, scheduler, cache=LatentCache(ae, records), seed=0)
    unit = loss.make_unit(units[0], "cpu")
    net = tiny_unet()
    noisy = scheduler.add_noise(unit["latents"], unit["noise"], unit["timesteps"])
    velocity = scheduler.get_velocity(unit["latents"], unit["noise"], unit["timesteps"])
    expected = ((net(noisy, unit["timesteps"], unit["condition"]) - velocity) ** 2).mean()
    torch.testing.assert_close(loss.loss(net, unit), expected)


def test_global_conditioning_reaches_the_output_and_treats_cfg_condition_as_missing():
    from scripts.networks import ConditionalDiffusionUNet

    net = tiny_unet(perturb=None, global_conditioning=True)
    assert net.init_kwargs["global_conditioning"] is True
    rebuilt = ConditionalDiffusionUNet(**net.init_kwargs)
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():  # MONAI zero-initialises the residual branches' last convolutions and the output conv
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(2, 4, 4, 8, 8), torch.tensor([10, 40])
    cond = torch.stack([torch.rand(2, 14) * 2 - 1, torch.zeros(2, 14)], dim=-1)
    other = cond.clone()
    other[:, 0, 0] = -cond[:, 0, 0]  # another LVEDV
    assert float((net(x, t, cond) - net(x, t, other)).abs().max()) > 1e-4
    cfg_uncond = -torch.ones_like(cond)  # what MONAI's classifier-free guidance passes
    torch.testing.assert_close(net(x, t, cfg_uncond), net(x, t, None))


def test_duplicate_record_ids_are_refused_before_encoding():
    from scripts.errors import DataError

    records = Records(2)
    records.items[2]["id"] = records.data[2]["id"] = "s0_ED"  # a datalist with one id twice
    with pytest.raises(DataError, match=r"record id\(s\) \['s0_ED'\] appear more than once"):
        LatentCache(tiny_autoencoder(), records)
