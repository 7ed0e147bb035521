"""The condition's training mask (scripts.engines.attribute_mask) and a partial request through guidance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import Records, tiny_autoencoder, tiny_unet
from monai.networks.schedulers import DDPMScheduler
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.engines import LatentDiffusionPrepareBatch, attribute_mask
from scripts.errors import ConfigError
from scripts.privacy.unit_losses import LatentDiffusionUnitLoss
from scripts.privacy.units import PrivacyUnits
from scripts.sampling import build_scheduler
from scripts.synthesis import Synthesizer, read_requests
from torch.utils.data import default_collate

A = len(ATTRIBUTE_NAMES)


def test_mask_draws_every_subset_size_uniformly_and_the_all_missing_share():
    rows, p0 = 42_000, 0.1
    mask = attribute_mask(
        rows, A, condition_dropout=p0, subset_conditioning=True, generator=torch.Generator().manual_seed(0)
    )
    assert mask.shape == (rows, A) and mask.dtype == torch.bool
    kept = (~mask).sum(1)
    counts = torch.bincount(kept, minlength=A + 1).numpy()
    # all missing: the guidance draw only (a subset keeps at least one attribute)
    assert abs(counts[0] / rows - p0) < 4 * math.sqrt(p0 * (1 - p0) / rows)
    # every number of kept attributes 1 .. A, each (1 - p0) / A of the rows
    share = (1 - p0) / A
    assert (counts[1:] > 0).all()
    np.testing.assert_allclose(counts[1:] / rows, share, atol=5 * math.sqrt(share / rows))
    # a uniform subset of its size: every attribute equally often kept
    per_attribute = (~mask[kept > 0]).float().mean(0).numpy()
    np.testing.assert_allclose(per_attribute, (A + 1) / (2 * A), atol=0.015)
    # single-attribute rows name each attribute alike (a request naming only LVEDV is in the distribution)
    singles = (~mask[kept == 1]).float().mean(0).numpy()
    np.testing.assert_allclose(singles, 1 / A, atol=0.03)


def test_mask_without_subsets_keeps_the_condition_or_drops_all():
    g = torch.Generator().manual_seed(1)
    mask = attribute_mask(5000, A, condition_dropout=0.2, subset_conditioning=False, generator=g)
    kept = (~mask).sum(1)
    assert set(kept.unique().tolist()) == {0, A}
    assert abs((kept == 0).float().mean().item() - 0.2) < 0.03
    assert not attribute_mask(10, A).any()  # nothing asked, nothing masked
    with pytest.raises(ConfigError, match="condition_dropout"):
        LatentDiffusionPrepareBatch(tiny_autoencoder(), 10, condition_dropout=1.5)


def test_pretraining_mask_keeps_record_missing_and_zeroes_masked_values():
    records = Records(8, seed=2)
    batch = default_collate(records.items)
    prepare = LatentDiffusionPrepareBatch(
        tiny_autoencoder(), 10, condition_dropout=0.1, subset_conditioning=True, seed=0
    )
    condition = prepare(batch)[3]["condition"]
    missing = condition[..., 1] != 0
    assert missing[batch["missing"] != 0].all()  # missing in the record stays missing
    assert (condition[..., 0][missing] == 0).all()  # a masked value is 0 (and has no influence)
    kept = (~missing).sum(1)
    assert len(set(kept.tolist())) > 3  # rows of many sizes in one batch


def test_dp_unit_mask_comes_from_the_private_generator():
    scheduler = DDPMScheduler(num_train_timesteps=10)
    units = PrivacyUnits(Records(12, seed=3), "record")
    loss = LatentDiffusionUnitLoss(
        tiny_autoencoder(), scheduler, condition_dropout=0.1, subset_conditioning=True, seed=5
    )
    torch.manual_seed(0)
    state = torch.get_rng_state()
    conditions = [loss.make_unit(units[i], "cpu")["condition"] for i in range(len(units))]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (saved in checkpoints) is untouched
    kept = [int((c[..., 1] == 0).sum()) for c in conditions]
    assert len(set(kept)) > 3  # the mask is drawn: subsets of several sizes
    # the same private seed replays the same masks; another seed draws others
    again = LatentDiffusionUnitLoss(
        tiny_autoencoder(), scheduler, condition_dropout=0.1, subset_conditioning=True, seed=5
    )
    assert all(torch.equal(again.make_unit(units[i], "cpu")["condition"], c) for i, c in enumerate(conditions))
    other = LatentDiffusionUnitLoss(
        tiny_autoencoder(), scheduler, condition_dropout=0.1, subset_conditioning=True, seed=6
    )
    assert not all(torch.equal(other.make_unit(units[i], "cpu")["condition"], c) for i, c in enumerate(conditions))


def test_partial_request_reaches_the_network_with_its_mask(tmp_path, attribute_ranges):
    csv = tmp_path / "requests.csv"
    csv.write_text("LVEDV,AGE,ESED,seed\n180,65,1,3\n")
    (request,) = read_requests(str(csv), attribute_ranges)
    given = {"LVEDV", "AGE", "ESED"}
    seen = []
    network = tiny_unet()
    network.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["context"].clone()), with_kwargs=True)
    schedule = {"num_train_timesteps": 10, "schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 2e-2}
    synth = Synthesizer(
        tiny_autoencoder(), network, build_scheduler("ddim", schedule, 2), (4, 4, 8, 8), attribute_ranges, 2.0
    )
    synth(request.values[None], [request.seed])
    assert len(seen) == 2  # two DDIM steps, each one forward pass of both guidance branches
    for context in seen:
        unconditional, conditional = context.chunk(2)  # MONAI's order: unconditional first
        expected = torch.tensor([[name not in given for name in ATTRIBUTE_NAMES]])
        assert torch.equal(conditional[..., 1] != 0, expected)  # blanks masked, named attributes shown
        i = ATTRIBUTE_NAMES.index("LVEDV")
        low, high = attribute_ranges["LVEDV"]
        assert conditional[0, i, 0].item() == pytest.approx(2 * (180 - low) / (high - low) - 1)
        assert (unconditional[..., 1] != 0).all()  # the guidance branch: every attribute missing
        # the encoder sees the unconditional branch as the training's all-missing condition
        all_missing = torch.stack([torch.zeros(1, A), torch.ones(1, A)], -1)
        tokens = network.attribute_encoder
        torch.testing.assert_close(tokens(unconditional), tokens(all_missing))
