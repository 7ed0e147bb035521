"""Every bundle config parses, shared blocks come from configs/common.yaml, multi-GPU overlays add to their base."""

from __future__ import annotations

from pathlib import Path

import pytest
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["train_autoencoder", "train_diffusion", "dp_finetune", "dp_finetune_autoencoder"]
OVERLAYS = {
    "train_autoencoder": "multi_gpu_train",
    "train_diffusion": "multi_gpu_train",
    "dp_finetune": "multi_gpu_dp_finetune",
    "dp_finetune_autoencoder": "multi_gpu_dp_finetune",
}


def parsed(*names: str) -> ConfigParser:
    """The merged configs/common.yaml + configs/<names>.yaml, as a bundle command reads them."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f"{n}.yaml") for n in dict.fromkeys(("common", *names))])
    parser.parse()  # resolves every macro and reference id; nothing is instantiated
    return parser


@pytest.fixture(autouse=True)
def _elsewhere(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the configs resolve the same from any working directory


@pytest.mark.parametrize(
    "name",
    sorted(
        p.stem
        for p in (ROOT / "configs").glob("*.yaml")
        if not p.stem.startswith(("small_", "demo_", "multi_gpu_", "schedule_"))
    ),
)
def test_every_config_parses(name):
    parser = parsed(name)
    assert parser.get("imports") or name == "common"


@pytest.mark.parametrize("stage", STAGES)
def test_small_and_multi_gpu_variants_parse(stage):
    small = {
        "train_autoencoder": "small_autoencoder",
        "train_diffusion": "small_diffusion",
        "dp_finetune": "small_dp_finetune",
        "dp_finetune_autoencoder": "small_dp_finetune_autoencoder",
    }[stage]
    parsed(stage, small)
    parsed(stage, small, OVERLAYS[stage])


@pytest.mark.parametrize(
    "stage,demo",
    [
        ("train_autoencoder", "demo_autoencoder"),
        ("train_diffusion", "demo_diffusion"),
        ("dp_finetune", "demo_dp_finetune"),
    ],
)
def test_demo_recipe_overrides_only_existing_settings(stage, demo):
    # a misspelt key in an overlay would add an unused setting, and the demo would silently run another recipe
    import yaml

    base = parsed(stage, stage.replace("train_", "small_") if stage.startswith("train_") else "small_dp_finetune")
    with open(ROOT / "configs" / f"{demo}.yaml") as f:
        keys = list(yaml.safe_load(f))
    missing = [k for k in keys if base.get(k) is None]
    assert not missing, f"configs/{demo}.yaml sets {missing}, which configs/{stage}.yaml does not have"
    parsed(stage, demo)


@pytest.mark.parametrize("stage", STAGES)
def test_multi_gpu_overlay_keeps_every_base_initialize_step(stage):
    base, multi = parsed(stage), parsed(stage, OVERLAYS[stage])
    assert multi["initialize"] == base["initialize"] and multi["finalize"] == base["finalize"]
    assert base["initialize"][0] == "@distributed_setup" and base["distributed_setup"] == []
    assert any("init_process_group" in step for step in multi["distributed_setup"])
    assert any("destroy_process_group" in step for step in multi["distributed_teardown"])
    # the shared first steps (determinism, folder lock, tracking check) are in every stage
    setup = parsed("common")["setup"]
    assert base["initialize"][1] == setup


@pytest.mark.parametrize("stage", STAGES)
def test_shared_blocks_are_taken_from_common(stage):
    raw = ConfigParser.load_config_file(str(ROOT / "configs" / f"{stage}.yaml"))
    text = (ROOT / "configs" / f"{stage}.yaml").read_text()
    assert "imports" not in raw  # configs/common.yaml, merged first, holds them
    for block in ("MLFlowHandler", "ignite.handlers.ProgressBar", "SupervisedTrainer", "init_process_group"):
        assert block not in text, f"{stage}.yaml writes {block} itself instead of taking it from configs/common.yaml"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_no_macro_names_another_file(path):
    # MONAI opens a macro's file relative to the working directory, not the bundle root
    values = [line.split("#", 1)[0] for line in path.read_text().splitlines()]  # comments may name the old form
    assert not any('"%configs/' in v for v in values), f"{path.name}: use '%<key>' on the merged configs/common.yaml"
