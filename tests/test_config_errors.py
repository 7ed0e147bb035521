"""A bad config field is a ConfigError (a BundleError): the bundle reports it in one short line.

Each of these was a bare ValueError, which MONAI's config runner wraps in a nested traceback; the
bundle's excepthook shortens only its own errors (scripts/errors.py).
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.data import EncodeAttributesd
from scripts.errors import BundleError, ConfigError
from scripts.evaluation import audit
from scripts.evaluation.features import InceptionFeatures
from scripts.latents import RepeatedDataset
from scripts.privacy.per_sample import resolve_grad_sample_mode


def _raises_config_error(field: str):
    return pytest.raises(ConfigError, match=f"config field '{field}'")


def test_config_error_is_a_bundle_error_and_a_value_error():
    assert issubclass(ConfigError, BundleError) and issubclass(ConfigError, ValueError)


def test_grad_sample_mode():
    with _raises_config_error("grad_sample_mode"):
        resolve_grad_sample_mode("fast")


def test_passes_per_epoch():
    with _raises_config_error("passes_per_epoch"):
        RepeatedDataset([1, 2], repeats=0)


def test_inception_slices(tmp_path):
    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"")  # the slices are checked before the weights are read
    with _raises_config_error("inception_slices"):
        InceptionFeatures(str(weights), slices="some")


def test_mia_timesteps():
    class Zero(torch.nn.Module):
        def forward(self, x, timesteps, condition):
            return torch.zeros_like(x)

    scheduler = DDPMScheduler(num_train_timesteps=10)
    latents, conditions = torch.zeros(2, 4, 2, 4, 4), torch.zeros(2, len(ATTRIBUTE_NAMES), 2)
    with _raises_config_error("mia_timesteps"):
        audit.denoising_losses(Zero(), scheduler, latents, conditions, [10])


@pytest.mark.parametrize("bad", ["absent", "reversed"])
def test_attribute_ranges(bad):
    ranges = {n: [0.0, 1.0] for n in ATTRIBUTE_NAMES}
    if bad == "absent":
        ranges.pop(ATTRIBUTE_NAMES[0])
    else:
        ranges[ATTRIBUTE_NAMES[0]] = [1.0, 0.0]
    with _raises_config_error("attribute_ranges"):
        EncodeAttributesd("attributes", ranges)
    assert EncodeAttributesd("attributes", {n: [0.0, 1.0] for n in ATTRIBUTE_NAMES}).low.shape == (
        len(ATTRIBUTE_NAMES),
    )
