"""Public pre-training stages (autoencoder, latent diffusion) as bundle runs, end to end on tiny sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import LATENT, LDM, TINY, mlflow_runs, train_autoencoder, train_diffusion
from helpers import save_autoencoder, tiny_autoencoder, tiny_unet, torchrun_training
from scripts.engines import LatentDiffusionPrepareBatch, make_condition
from scripts.handlers import LatentScaleFactor
from scripts.networks import ConditionalDiffusionUNet, load_autoencoder


def test_autoencoder_checkpoint_and_scale_factor(pretrained, cohorts, attribute_ranges):
    ckpt = torch.load(pretrained / "models" / "autoencoder.pt", weights_only=False)
    assert {"network", "optimizer", "lr_scheduler", "ema", "rng", "trainer", "architecture"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 3 * ckpt["trainer"]["epoch_length"]
    ae = load_autoencoder(str(pretrained / "models" / "autoencoder.pt"))
    # the stored scale factor is 1 / std of the latents of the PUBLIC training split
    from scripts.data import get_dataset

    ds = get_dataset(str(cohorts["public"] / "datalist.json"), "training", (8, 48, 48), attribute_ranges)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    assert float(ae.scale_factor) == pytest.approx(LatentScaleFactor(ae, loader).compute(), rel=1e-4)
    assert float(ae.scale_factor) != 1.0


def test_autoencoder_learns_and_is_tracked(pretrained):
    client, runs = mlflow_runs(pretrained, "autoencoder_")
    assert len(runs) == 1
    run = runs[0]
    history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_l1"), key=lambda m: m.step)]
    assert len(history) == 4  # before training + 3 epochs
    assert history[-1] < history[0]
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 3
    assert run.data.params["stage"] == "autoencoder"
    assert run.data.params["checkpoint"].endswith("models/autoencoder.pt")
    assert "autoencoder_reconstructions.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert run.info.status == "FINISHED"


def test_diffusion_checkpoint_learns_and_is_tracked(pretrained):
    ckpt = torch.load(pretrained / "models" / "diffusion.pt", weights_only=False)
    ae = torch.load(pretrained / "models" / "autoencoder.pt", weights_only=False)
    assert ckpt["scale_factor"] == pytest.approx(float(ae["network"]["scale_factor"]))
    assert ckpt["latent_shape"] == [4, 8, 12, 12]
    assert ckpt["scheduler"] == {
        "num_train_timesteps": 150,
        "schedule": "linear_beta",
        "beta_start": 1e-4,
        "beta_end": 7e-2,
    }
    net = ConditionalDiffusionUNet(**ckpt["architecture"])
    net.load_state_dict(ckpt["ema"])
    client, runs = mlflow_runs(pretrained, "diffusion_")
    (run,) = runs
    history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step)]
    assert len(history) == 4 and history[-1] < history[0]
    assert "diffusion_samples.png" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_diffusion_reads_scale_factor_from_autoencoder_checkpoint(pretrained, tmp_path):
    ckpt = torch.load(pretrained / "models" / "autoencoder.pt", weights_only=False)
    ckpt["network"]["scale_factor"] = torch.tensor(7.0)
    path = tmp_path / "ae.pt"
    torch.save(ckpt, path)
    ae = load_autoencoder(str(path))
    prep = LatentDiffusionPrepareBatch(ae, num_train_timesteps=10, seed=0)
    batch = {
        "image": torch.rand(2, 1, 8, 48, 48),
        "attributes": torch.zeros(2, 14),
        "missing": torch.zeros(2, 14),
        "id": ["a", "b"],
    }
    latents, *_ = prep(batch)
    torch.testing.assert_close(latents, ae.encode_stage_2_inputs(batch["image"]) * 7.0)


def test_unmeasured_scale_factor_is_rejected(pretrained, tmp_path):
    ckpt = torch.load(pretrained / "models" / "autoencoder.pt", weights_only=False)
    ckpt["network"]["scale_factor_measured"] = torch.tensor(False)
    torch.save(ckpt, tmp_path / "ae.pt")
    with pytest.raises(ValueError, match="scale factor was never measured"):
        load_autoencoder(str(tmp_path / "ae.pt"))


def test_masked_attributes_do_not_change_the_output():
    net = tiny_unet(perturb="all", std=0.2).eval()  # MONAI zero-initialises the output conv; give every weight a value
    x, t = torch.randn(2, 4, 4, 8, 8), torch.tensor([3, 7])
    values, missing = torch.randn(2, 14), torch.zeros(2, 14)
    missing[:, [2, 8]] = 1.0
    base = net(x, t, make_condition(values, missing))
    changed = values.clone()
    changed[:, [2, 8]] += 5.0  # masked: no effect
    torch.testing.assert_close(net(x, t, make_condition(changed, missing)), base)
    changed[:, 0] += 5.0  # present: changes the prediction
    assert not torch.allclose(net(x, t, make_condition(changed, missing)), base)


def test_resume_continues_exactly(pretrained, tmp_path, cohorts, bundle):
    """A 3-epoch run stopped after 2 and resumed ends with the weights of 3 epochs straight.

    The first run plans 3 epochs (LR schedule) but stops after 2, like a killed run.
    """
    first = train_autoencoder(bundle, tmp_path, cohorts["public"], "--epochs", "2", "--lr_schedule_epochs", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = train_autoencoder(bundle, tmp_path, cohorts["public"], "--epochs", "3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    resumed = torch.load(tmp_path / "models" / "autoencoder.pt", weights_only=False)
    straight = torch.load(pretrained / "models" / "autoencoder.pt", weights_only=False)
    assert resumed["trainer"]["iteration"] == straight["trainer"]["iteration"]
    for key in ("network", "ema"):
        for name, value in straight[key].items():
            torch.testing.assert_close(resumed[key][name], value, msg=f"{key}.{name}")


def test_wrong_latent_shape_is_a_clear_error(pretrained, cohorts, bundle):
    proc = bundle(
        "run",
        "training",
        "--config_file",
        LDM,
        "--dataset_dir",
        str(cohorts["public"]),
        "--bundle_root",
        str(pretrained),
        *TINY,
        "--latent_shape",
        "[4,8,10,10]",
        "--epochs",
        "1",
        "--resume",
        "False",
    )
    assert proc.returncode != 0
    assert "config field 'latent_shape': [4, 8, 10, 10]" in proc.stderr and "expected [4, 8, 12, 12]" in proc.stderr


def test_unknown_attribute_in_config_is_a_clear_error(pretrained, cohorts, bundle, tmp_path, attribute_ranges):
    import yaml

    extra = tmp_path / "ranges.yaml"
    extra.write_text(yaml.safe_dump({"attribute_ranges": dict(attribute_ranges, LVMASS=[50.0, 300.0])}))
    files = f"['configs/common.yaml','configs/train_diffusion.yaml','configs/small_diffusion.yaml','{extra}']"
    proc = bundle(
        "run",
        "training",
        "--config_file",
        files,
        "--dataset_dir",
        str(cohorts["public"]),
        "--bundle_root",
        str(pretrained),
        *TINY,
        *LATENT,
        "--epochs",
        "1",
        "--resume",
        "False",
    )
    assert proc.returncode != 0
    assert "config field 'attribute_ranges': unknown attribute(s) ['LVMASS']" in proc.stderr


def test_missing_autoencoder_names_the_stage(tmp_path, cohorts, bundle):
    proc = train_diffusion(bundle, tmp_path, cohorts["public"], "--epochs", "1")
    assert proc.returncode != 0
    stage = (
        "python -m monai.bundle run training --config_file \"['configs/common.yaml','configs/train_autoencoder.yaml']\""
    )
    assert f"autoencoder.pt not found; it is produced by: {stage}" in proc.stderr


def test_multi_process_diffusion_with_gloo(pretrained, tmp_path, cohorts):
    """configs/multi_gpu_train.yaml under torchrun with 2 CPU processes (gloo)."""
    import shutil

    shutil.copytree(pretrained / "models", tmp_path / "models", ignore=shutil.ignore_patterns("diffusion*"))
    config = str(
        ["configs/common.yaml", "configs/train_diffusion.yaml", "configs/small_diffusion.yaml"]
        + ["configs/common.yaml", "configs/multi_gpu_train.yaml"]
    )
    proc = torchrun_training(config, cohorts["public"], tmp_path, *TINY, *LATENT, "--epochs", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "models" / "diffusion.pt", weights_only=False)
    assert ckpt["trainer"]["iteration"] == 2 * ckpt["trainer"]["epoch_length"]
    assert not any(k.startswith("module.") for k in ckpt["network"])  # saved unwrapped, loadable single-process
    _, runs = mlflow_runs(tmp_path, "diffusion_")
    assert len(runs) == 1  # only rank 0 logs


def test_patchgan_term_trains_the_discriminator_in_training_only():
    from scripts.losses import AutoencoderKLLoss

    torch.manual_seed(0)
    loss = AutoencoderKLLoss(adversarial_weight=0.1)
    recon, target = torch.rand(2, 1, 4, 32, 32, requires_grad=True), torch.rand(2, 1, 4, 32, 32)
    pred = (recon, torch.zeros(2, 4, 4, 8, 8), torch.ones(2, 4, 4, 8, 8))
    disc = loss.adversarial.discriminator
    before = [p.detach().clone() for p in disc.parameters()]
    total = loss(pred, target)
    total.backward()
    assert recon.grad.abs().sum() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))  # one discriminator step
    assert float(total) > float(AutoencoderKLLoss()(pred, target))
    after = [p.detach().clone() for p in disc.parameters()]
    with torch.no_grad():  # validation: no discriminator step
        loss(pred, target)
    assert all(torch.equal(a, b) for a, b in zip(after, disc.parameters()))
    assert "adversarial._extra_state" in loss.state_dict()  # discriminator optimiser checkpointed
    assert AutoencoderKLLoss().adversarial is None  # off by default


def test_ssim_term_is_one_minus_the_slice_ssim_and_off_by_default():
    from monai.metrics import SSIMMetric
    from scripts.losses import AutoencoderKLLoss
    from scripts.networks import to_slices

    torch.manual_seed(0)
    target = torch.rand(2, 1, 4, 32, 32)
    recon = (target + 0.2 * torch.randn_like(target)).requires_grad_(True)
    pred = (recon, torch.zeros(2, 2, 4, 8, 8), torch.ones(2, 2, 4, 8, 8))
    plain, with_ssim = AutoencoderKLLoss(), AutoencoderKLLoss(ssim_weight=0.5)
    assert plain.ssim is None
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0)(to_slices(recon.detach().clamp(0, 1)), to_slices(target)).mean()
    total = with_ssim(pred, target)
    assert float(total - plain(pred, target)) == pytest.approx(0.5 * (1.0 - float(ssim)), rel=1e-4)
    total.backward()
    assert recon.grad.abs().sum() > 0
    same = (target, pred[1], pred[2])  # a perfect reconstruction: the SSIM term adds nothing
    assert float(with_ssim(same, target)) == pytest.approx(float(plain(same, target)), abs=1e-5)


def test_patchgan_is_refused_under_torch_distributed(monkeypatch):
    """The discriminator steps outside DDP (its copies would drift apart): refused with more than one process."""
    from ignite import distributed as idist
    from scripts.losses import AutoencoderKLLoss

    monkeypatch.setattr(idist, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="--adversarial_weight: the PatchGAN discriminator trains in one process"):
        AutoencoderKLLoss(adversarial_weight=0.1)
    AutoencoderKLLoss(adversarial_weight=0.0)  # the rest of the loss is fine under DDP


def test_autoencoder_stage_with_patchgan(tmp_path, cohorts, bundle):
    proc = train_autoencoder(bundle, tmp_path, cohorts["public"], "--epochs", "1", "--adversarial_weight", "0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "models" / "autoencoder.pt", weights_only=False)
    assert any(k.startswith("adversarial.discriminator.") for k in ckpt["loss"])


def test_monai_tracking_mlflow_works(tmp_path, cohorts, bundle):
    """MONAI's built-in --tracking mlflow joins the stage's own MLflow run."""
    proc = train_autoencoder(bundle, tmp_path, cohorts["public"], "--epochs", "1", "--tracking", "mlflow")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, runs = mlflow_runs(tmp_path, "autoencoder_")
    (run,) = runs
    assert {"train_loss", "val_l1"} <= set(run.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "autoencoder_reconstructions.png" in artifacts
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts)  # the executed config


# --- corrupt, truncated and wrong-stage checkpoints: the error names the file and the stage that writes it -------


def _tiny_autoencoder_checkpoint(path):
    ae = tiny_autoencoder(seed=None, latent_channels=2, norm_num_groups=8, scale_factor=None, measured=True)
    return save_autoencoder(ae, path)


def test_corrupt_checkpoints_are_named(tmp_path):
    from scripts.errors import CheckpointError, MissingInputError
    from scripts.handlers import resume
    from scripts.networks import load_diffusion

    good = _tiny_autoencoder_checkpoint(tmp_path / "autoencoder.pt")
    assert load_autoencoder(str(good)).scale_factor_measured
    text = tmp_path / "text.pt"
    text.write_text("this is not a checkpoint\n")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    ae_stage = (
        "expected the file written by: python -m monai.bundle run training "
        "--config_file \"['configs/common.yaml','configs/train_autoencoder.yaml']\""
    )
    for bad in (text, truncated):
        with pytest.raises(CheckpointError) as err:
            load_autoencoder(str(bad))
        assert f"{bad}: not a readable PyTorch checkpoint" in str(err.value) and ae_stage in str(err.value)
    with pytest.raises(CheckpointError) as err:  # an autoencoder where a diffusion model belongs
        load_diffusion(str(good))
    assert f"{good}: lacks ['ema', 'latent_shape', 'spatial_size', 'scale_factor', 'scheduler']" in str(err.value)
    assert "configs/train_diffusion.yaml" in str(err.value)
    diffusion_like = tmp_path / "diffusion.pt"
    torch.save({"network": {}, "architecture": {"channels": [8]}, "latent_shape": [4, 8, 12, 12]}, diffusion_like)
    with pytest.raises(CheckpointError, match="diffusion-model checkpoint, not an autoencoder"):
        load_autoencoder(str(diffusion_like))
    wrong_weights = tmp_path / "wrong.pt"
    torch.save({"network": {"x": torch.zeros(1)}, "architecture": {"in_channels": 1, "bogus": 3}}, wrong_weights)
    with pytest.raises(
        CheckpointError, match=r"wrong\.pt: its 'network' weights and 'architecture' do not make a SliceAutoencoder"
    ):
        load_autoencoder(str(wrong_weights))
    with pytest.raises(MissingInputError, match="configs/train_autoencoder.yaml"):
        load_autoencoder(str(tmp_path / "absent.pt"))
    with pytest.raises(CheckpointError, match=r"text\.pt: not a readable PyTorch checkpoint.*--resume False"):
        resume(str(text), {}, None)
    with pytest.raises(
        CheckpointError, match=r"autoencoder\.pt: resume checkpoint lacks \['trainer'\].*--resume False"
    ):
        resume(str(good), {}, None)


def test_one_slicing_helper():
    """engines._slices and SliceAutoencoder._to_slices were twins: one pair of helpers in scripts.networks."""
    import scripts.engines
    import scripts.losses
    from scripts.networks import SliceAutoencoder, to_slices, to_stack

    x = torch.arange(2 * 3 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 3, 4, 5, 6)
    slices = to_slices(x)
    assert slices.shape == (8, 3, 5, 6) and torch.equal(slices[1], x[0, :, 1])
    assert torch.equal(to_stack(slices, 2), x)
    assert not hasattr(scripts.engines, "_slices") and not hasattr(SliceAutoencoder, "_to_slices")
    assert scripts.losses.to_slices is to_slices


def test_posterior_std_init_sets_the_initial_std_and_travels_in_the_checkpoint(tmp_path):
    from helpers import save_autoencoder, tiny_autoencoder
    from scripts.errors import ConfigError
    from scripts.networks import load_autoencoder

    ae = tiny_autoencoder(posterior_std_init=0.01, frozen=False, measured=True)
    _, sigma = ae.encode(torch.rand(2, 1, 3, 32, 32))
    assert torch.allclose(sigma, torch.full_like(sigma, 0.01))
    _, default_sigma = tiny_autoencoder(frozen=False).encode(torch.rand(2, 1, 3, 32, 32))
    assert float(default_sigma.mean()) > 0.3  # MONAI's own initialisation: about 1
    assert "posterior_std_init" not in tiny_autoencoder().init_kwargs  # earlier checkpoints compare equal
    loaded = load_autoencoder(str(save_autoencoder(ae, tmp_path / "ae.pt")))
    assert loaded.init_kwargs["posterior_std_init"] == 0.01
    for bad in (0.0, -1.0, "abc", True):
        with pytest.raises(ConfigError, match="posterior_std_init"):
            tiny_autoencoder(posterior_std_init=bad)
