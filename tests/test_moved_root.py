"""Files a checkpoint depends on, a moved or copied bundle root, and what reports say about the weights they describe.

- a copied bundle root decodes with its own autoencoder, and a file that is not the one the model
  was trained with is refused (the checkpoint stores a root-relative path and the file's SHA-256);
- the evaluation report's privacy block is that of the weights the synthetic set was drawn from;
- a resume that changes the fine-tuned scope is refused, one that changes the per-unit gradient
  mode is recorded with both modes.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import stage_checkpoint_info, tiny_stage_networks
from scripts.errors import CheckpointError, ConfigError
from scripts.evaluation.sections import privacy_of
from scripts.files import bundle_path, sha256
from scripts.privacy.ledger import PrivacyLedger
from scripts.synthesis import PUBLIC_NOTE, load_generator
from test_ledger import settings

SCHEDULE = {"num_train_timesteps": 150, "schedule": "linear_beta", "beta_start": 1.0e-4, "beta_end": 7.0e-2}


def _root(tmp_path, name: str):
    """A bundle root with a tiny models/{autoencoder,diffusion}.pt written the way the stages write them."""
    root = tmp_path / name
    models = root / "models"
    models.mkdir(parents=True)
    net = tiny_stage_networks(models)
    info = stage_checkpoint_info(net, str(models / "autoencoder.pt"), SCHEDULE)
    # what configs/train_diffusion.yaml stores: the path relative to the root, and the file's hash
    info["autoencoder"] = bundle_path(str(models / "autoencoder.pt"), str(root))
    info["autoencoder_sha256"] = sha256(models / "autoencoder.pt")
    torch.save({"network": net.state_dict(), "ema": net.state_dict(), **info}, models / "diffusion.pt")
    return root


def test_bundle_path_is_relative_under_the_root_only(tmp_path):
    assert bundle_path(str(tmp_path / "models" / "a.pt"), str(tmp_path)) == "models/a.pt"
    outside = str(tmp_path.parent / "elsewhere" / "a.pt")
    assert bundle_path(outside, str(tmp_path)) == outside


def test_a_copied_root_decodes_with_its_own_autoencoder(tmp_path):
    original = _root(tmp_path, "original")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    # an absolute path of the original root (a checkpoint written before paths were root-relative)
    ckpt = torch.load(copy / "models" / "diffusion.pt", weights_only=False)
    ckpt["autoencoder"] = str(original / "models" / "autoencoder.pt")
    torch.save(ckpt, copy / "models" / "diffusion.pt")
    generator = load_generator(str(copy / "models" / "diffusion.pt"), bundle_root=str(copy))
    assert generator.files.autoencoder == str(copy / "models" / "autoencoder.pt")
    assert generator.files.autoencoder_sha256 == sha256(copy / "models" / "autoencoder.pt")
    assert generator.files.model_sha256 == sha256(copy / "models" / "diffusion.pt")
    # the root-relative path is found from any working directory once the root is given
    moved = tmp_path / "moved"
    shutil.move(str(original), moved)
    found = load_generator(str(moved / "models" / "diffusion.pt"), bundle_root=str(moved))
    assert found.files.autoencoder == str(moved / "models" / "autoencoder.pt")


def test_an_autoencoder_that_is_not_the_trained_one_is_refused(tmp_path):
    root = _root(tmp_path, "root")
    other = _root(tmp_path, "other")
    # same architecture and scale factor, other weights: only the hash tells them apart
    state = torch.load(other / "models" / "autoencoder.pt", weights_only=False)
    for value in state["network"].values():
        if value.is_floating_point():
            value.add_(0.01)
    torch.save(state, root / "models" / "autoencoder.pt")
    with pytest.raises(CheckpointError, match="was trained with the autoencoder of SHA-256"):
        load_generator(str(root / "models" / "diffusion.pt"), bundle_root=str(root))


def test_the_report_states_the_guarantee_of_the_weights_sampled(tmp_path):
    """Samples drawn from the public diffusion.pt carry no epsilon, even when the audited model.pt has one."""
    sidecar = {"model": "models/diffusion.pt", "model_sha256": "ab" * 32, "privacy": None, "privacy_note": PUBLIC_NOTE}
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    (tmp_path / "privacy_report.json").write_text(
        '{"epsilon": 9.9, "delta": 1e-5, "privacy_unit": "subject", "accountant": "prv", "status": "complete", '
        f'"model_sha256": "{sha256(model)}"}}'
    )
    assert privacy_of(str(model))["privacy"]["epsilon"] == 9.9  # no sidecar: the model's report
    out = privacy_of(str(model), sidecar)
    assert out["privacy"] is None and out["privacy_note"] == PUBLIC_NOTE
    assert out["privacy_of"]["model"] == "models/diffusion.pt"


def _ledger(tmp_path, **overrides) -> PrivacyLedger:
    return PrivacyLedger(settings(**overrides), 0.2, 2, path=str(tmp_path / "ledger.json"), noise_multiplier=1.0)


def test_a_resume_with_another_scope_is_refused_and_another_mode_recorded(tmp_path):
    first = _ledger(tmp_path)
    for _ in range(3):
        first.step()
    state = first.state_dict()
    with pytest.raises(ConfigError, match=r"finetune_scope.*--finetune_scope attention"):
        _ledger(tmp_path, finetune_scope="all").load_state_dict(state)
    resumed = _ledger(tmp_path, grad_sample_mode="vmap")
    resumed.load_state_dict(state)
    assert resumed.steps == 3
    assert resumed.settings["grad_sample_mode"] == "loop for the first 3 step(s), then vmap"
    assert resumed.report()["stages"][-1]["grad_sample_mode"].startswith("loop for the first 3")
    # a checkpoint written before the scope was recorded still resumes
    old = {**state, "settings": {k: v for k, v in state["settings"].items() if k != "finetune_scope"}}
    _ledger(tmp_path).load_state_dict(old)


def test_choice_options_are_checked_before_a_stage_runs():
    from scripts.errors import _FORMS, check_options
    from scripts.privacy.clipping import MODES
    from scripts.privacy.validation import SCOPES

    # the forms name the same choices the DP handler accepts
    assert _FORMS["grad_sample_mode"][0] == "one of " + ", ".join(("auto", *MODES))
    assert _FORMS["finetune_scope"][0] == "one of " + ", ".join(SCOPES)
    for name, bad in (
        ("grad_sample_mode", "foo"),
        ("condition_dropout", 2),
        ("finetune_scope", "al"),
        ("spacing_tolerance", -1),
    ):
        with pytest.raises(ConfigError, match=f"option --{name}: expected"):
            check_options(**{name: bad})
    check_options(grad_sample_mode="auto", condition_dropout=0.1, finetune_scope="all", privacy_unit="record")


def test_messages_name_the_way_out():
    from scripts.privacy.accounting import calibrate_noise
    from scripts.privacy.ledger_checks import stage_sigma

    with pytest.raises(ConfigError, match="infinite target is no privacy"):
        calibrate_noise(float("inf"), 1e-5, 0.5, 2)
    spent = [{"stage": "diffusion_dp_finetune", "noise_multiplier": 0.5, "sample_rate": 0.5, "steps": 20}]
    entry = {"target_epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.5, "accountant": "rdp"}
    with pytest.raises(ConfigError, match=r"earlier DP stages on this data are \['diffusion_dp_finetune'\]"):
        stage_sigma(None, entry, spent, 2)
    interrupted = [{**spent[0], "stage": "diffusion_dp_finetune (interrupted run started 2026-12-01T00:00:00)"}]
    with pytest.raises(ConfigError, match="rerun the same command with --resume True"):
        stage_sigma(None, entry, interrupted, 2)


def test_a_cuda_device_without_a_gpu_is_named_as_such(tmp_path, monkeypatch):
    from scripts.networks import load_checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "model.pt"
    torch.save({"network": {}}, path)
    with pytest.raises(ConfigError, match="no CUDA device; pass --device cpu"):
        load_checkpoint(str(path), "the stage", "cuda")
    assert load_checkpoint(str(path), "the stage", "cpu") == {"network": {}}
