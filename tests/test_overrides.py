"""Command-line overrides: unknown keys and badly formed values are refused before a stage runs."""

from __future__ import annotations

import os

import pytest
from monai.bundle import ConfigParser
from scripts.errors import ConfigError
from scripts.overrides import check_command_line, command_line

BUNDLE_MAIN = os.path.join("site-packages", "monai", "bundle", "__main__.py")
DP = "['configs/common.yaml','configs/dp_finetune.yaml','configs/small_dp_finetune.yaml']"
AE = "['configs/common.yaml','configs/train_autoencoder.yaml','configs/small_autoencoder.yaml']"
INF = "['configs/common.yaml','configs/inference.yaml']"
# every stage config a user runs with `python -m monai.bundle run`, with its entry points
STAGES = {
    "configs/train_autoencoder.yaml": "initialize",
    "configs/train_diffusion.yaml": "initialize",
    "configs/dp_finetune.yaml": "initialize",
    "configs/dp_finetune_autoencoder.yaml": "initialize",
    "configs/train_segmenter.yaml": "initialize",
    "configs/evaluate.yaml": "initialize",
    "configs/inference.yaml": "initialize",
    "configs/phantom.yaml": "initialize",
    "configs/dp_attributes.yaml": "initialize",
    "configs/prepare.yaml": "initialize",
}


def run_argv(*words: str) -> list[str]:
    return [BUNDLE_MAIN, "run", "training", *words]


def test_command_line_reads_fire_forms():
    words, options = command_line(["run", "training", "--a", "1", "--b=x", "--flag", "--c", "[1, 2]"])
    assert words == ["run", "training"]
    assert options == {"a": 1, "b": "x", "flag": True, "c": [1, 2]}


@pytest.mark.parametrize(
    "override, close",
    [
        (("--target_epsilon_", "1"), "--target_epsilon"),
        (("--epoch", "5"), "--epochs"),
        (("--noise_multiplyer", "1.0"), "--noise_multiplier"),
    ],
)
def test_unknown_option_is_refused_with_close_matches(override, close):
    with pytest.raises(ConfigError, match="unknown option") as err:
        check_command_line(run_argv("--config_file", DP, *override))
    assert override[0] in str(err.value) and close in str(err.value)


def test_known_options_nested_keys_and_run_arguments_pass():
    check_command_line(
        run_argv(
            "--config_file",
            AE,
            "--seed",
            "5",
            "--epochs",
            "2",
            "--network_def#channels",
            "[8, 16]",
            "--logging_file",
            "configs/logging.conf",
            "--meta_file",
            "configs/metadata.json",
        )
    )


def test_tracking_adds_monai_mlflow_settings():
    argv = run_argv(
        "--config_file", "['configs/common.yaml','configs/train_autoencoder.yaml']", "--save_execute_config", "False"
    )
    with pytest.raises(ConfigError, match="save_execute_config"):
        check_command_line(argv)
    check_command_line([*argv, "--tracking", "mlflow"])


@pytest.mark.parametrize(
    "config_file, option, value, expected",
    [
        (DP, "--resume", "false", "True or False"),
        (DP, "--secure_mode", "abc", "True or False"),
        (DP, "--noise_multiplicity", "2.5", "integer >= 1"),
        (AE, "--batch_size", "0", "integer >= 1"),
        (AE, "--kl_weight", "-1", "number >= 0"),
        (AE, "--ema_momentum", "2", r"number in \(0, 1\]"),  # was a 60-line traceback from Ignite's EMAHandler
        (DP, "--target_epsilon", "abc", "number > 0"),  # was a traceback from the ledger
        (DP, "--target_delta", "0", r"number in \(0, 1\)"),
        (DP, "--noise_multiplier", "-1", "number >= 0, or None"),
        (INF, "--guidance_scale", "abc", "number >= 0, or None"),
        (INF, "--num_inference_steps", "0", "integer >= 1, or None"),
    ],
)
def test_badly_formed_values_are_refused(config_file, option, value, expected):
    with pytest.raises(ConfigError, match=expected):
        check_command_line(run_argv("--config_file", config_file, option, value))


def test_only_bundle_command_lines_are_checked():
    check_command_line(["pytest", "--config_file", DP, "--no_such_key", "1"])


@pytest.mark.parametrize("config_file, entry", sorted(STAGES.items()))
def test_every_stage_checks_its_command_line_first(config_file, entry):
    parser = ConfigParser()
    parser.read_config(["configs/common.yaml", config_file])  # merged first, as every command does
    steps = parser.get_parsed_content(entry, lazy=True, instantiate=False, eval_expr=False)
    flat = []
    for step in steps:
        flat += step if isinstance(step, list) else [step]
    texts = [str(getattr(s, "config", s)) for s in flat]
    first_real = next(t for t in texts if "distributed_setup" not in t and t != "[]")
    assert "scripts.overrides.check_command_line()" in first_real, texts
