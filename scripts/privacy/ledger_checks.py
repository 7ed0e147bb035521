"""The checks of a privacy ledger: its settings, the earlier stages it composes, and a resume.

Each refusal names the setting, the value found and the command-line flag that gets out of it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from scripts.errors import ConfigError
from scripts.privacy.accounting import calibrate_noise_after
from scripts.privacy.composition import compose, entry_history
from scripts.privacy.journal import INTERRUPTED

logger = logging.getLogger(__name__)

# settings every stage records; those in RESUME_KEYS must not change when a run resumes
REQUIRED_SETTINGS = ("stage", "dataset", "privacy_unit", "units", "records", "target_epsilon", "delta", "accountant")
RESUME_KEYS = (
    "dataset",
    "privacy_unit",
    "units",
    "records",
    "logical_batch_size",
    "max_grad_norm",
    "noise_multiplicity",
    "accountant",
    "delta",
    "target_epsilon",
    "finetune_scope",
)
LATER_KEYS = ("finetune_scope",)  # recorded since v0.5: checkpoints written before lack it


def check_delta(delta: float, units: int) -> None:
    """Refuse ``delta >= 1/n`` (it would allow releasing a whole unit), warn above ``1/(10 n)``.

    Args:
        delta: the target delta.
        units: n, the number of privacy units.
    """
    if not 0 < delta < 1.0 / units:
        raise ConfigError(
            f"config field 'target_delta': expected 0 < delta < 1/n = {1.0 / units:.3g} for n = {units} privacy units, "
            f"got {delta:g}: a delta of 1/n permits revealing one unit outright. Use delta <= {0.1 / units:.2g}"
        )
    if delta > 0.1 / units:
        logger.warning(
            f"target_delta={delta:g} is above 1/(10 n) = {0.1 / units:.3g} for n = {units} units; a delta well below "
            "1/n is the usual choice"
        )


def check_settings(settings: Mapping[str, Any], sample_rate: float, epochs: int) -> None:
    """The settings a ledger records are all there; the rate and the plan are usable."""
    missing = [k for k in REQUIRED_SETTINGS if k not in settings]
    if missing:
        raise ConfigError(f"PrivacyLedger settings lack {missing}")
    if not 0 < sample_rate <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if int(epochs) < 1:
        raise ConfigError(f"config field 'epochs': expected an integer >= 1, got {epochs}")


def refuse_no_step(entry: Mapping[str, Any], prior: Sequence[Mapping[str, Any]]) -> None:
    """A stage whose sigma affords no step within the target is an error.

    It would "complete" with the pre-trained weights and replace an earlier release's model
    and report.
    """
    sigma, q, target = float(entry["noise_multiplier"]), float(entry["sample_rate"]), float(entry["target_epsilon"])
    one = compose(entry_history(prior) + [(sigma, q, 1)], float(entry["delta"]), str(entry["accountant"]))
    raise ConfigError(
        f"noise_multiplier={sigma:g} affords no DP step within target_epsilon={target:g}: one step (with the "
        f"earlier stages on this data) already gives epsilon {one:.4g}. Leave --noise_multiplier null to calibrate "
        "it, or raise it; nothing was run"
    )


def stage_sigma(
    sigma: float | None, entry: Mapping[str, Any], prior: Sequence[Mapping[str, Any]], planned_steps: int
) -> float:
    """The stage's noise multiplier: ``sigma`` when given (checked), else calibrated for the plan after ``prior``.

    When an interrupted run of this stage left its steps in the write-ahead file, a target
    they already exhaust is refused with the command that finishes that run instead.
    """
    target, history = float(entry["target_epsilon"]), entry_history(prior)
    check_noise(sigma, target, history)
    if sigma is not None:
        return float(sigma)
    q, delta, accountant = float(entry["sample_rate"]), float(entry["delta"]), str(entry["accountant"])
    try:
        return float(calibrate_noise_after(history, target, delta, q, planned_steps, accountant))
    except ConfigError as err:
        interrupted = [s for s in prior if INTERRUPTED in str(s.get("stage"))]
        if not interrupted and not prior:
            raise
        if not interrupted:
            names = [str(s.get("stage")) for s in prior]
            raise ConfigError(
                f"{err}. The earlier DP stages on this data are {names}: their epsilon counts against this "
                "target. Fine-tune from weights that did not see this private data (the public diffusion.pt, a public "
                "autoencoder), or raise --target_epsilon knowingly (the report composes everything)"
            ) from None
        raise ConfigError(
            f"{err} The write-ahead ledger holds {sum(int(s['steps']) for s in interrupted)} step(s) of an "
            "interrupted run of this stage, which count against the budget. If that run did its steps and its resume "
            "checkpoint is there, rerun the same command with --resume True (the default) to finish it without a "
            "step; a new run (--resume False) spends its own budget on top"
        ) from None


def check_step_arguments(sigma: float | None, rate: float | None, own_sigma: float, own_rate: float) -> None:
    """Opacus's ``step(noise_multiplier=, sample_rate=)`` may only repeat the ledger's own values."""
    for name, value, own in (("noise_multiplier", sigma, own_sigma), ("sample_rate", rate, own_rate)):
        if value is not None and value != own:
            raise ConfigError(f"PrivacyLedger.step: {name}={value} differs from the stage's {own}")


def check_prior(prior: Sequence[Mapping[str, Any]], unit: str) -> None:
    """Every earlier stage is a complete ledger entry at the same privacy unit."""
    for s in prior:
        missing = [k for k in ("stage", "noise_multiplier", "sample_rate", "steps", "privacy_unit") if k not in s]
        if missing:
            raise ConfigError(f"an earlier DP stage's ledger entry lacks {missing}: {dict(s)}")
        if s["privacy_unit"] != unit:
            level = "record" if "record" in (unit, s["privacy_unit"]) else unit
            raise ConfigError(
                f"earlier DP stage '{s['stage']}' is {s['privacy_unit']}-level but this stage is {unit}-level: a "
                f"composed guarantee would only be {level}-level. Use the same --privacy_unit in every DP stage on "
                "this data"
            )


def check_noise(noise_multiplier: float | None, target_epsilon: float, prior_history: Sequence[tuple]) -> None:
    """Refuse a sigma no target allows, and a finite target after steps without noise."""
    if noise_multiplier is None:
        if any(sigma == 0 for sigma, _, _ in prior_history):
            raise ConfigError(
                "an earlier stage on this data ran without noise (epsilon inf): no finite target_epsilon can be met; "
                "start from weights that did not see the private data without noise"
            )
        return
    if noise_multiplier < 0 or (noise_multiplier == 0 and not math.isinf(target_epsilon)):
        raise ConfigError(
            f"noise_multiplier={noise_multiplier!r}: expected null (calibrated to target_epsilon), a positive "
            "sigma, or 0 with target_epsilon inf (noise off: no privacy, for non-private baselines)"
        )


def same_path(a: str, b: str) -> bool:
    """Two spellings of one relative path (``./data/x`` and ``data/x``), or the same absolute path."""
    return os.path.normpath(a) == os.path.normpath(b)


def check_resume_settings(saved: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """Refuse a resume that changes a privacy setting (:data:`RESUME_KEYS`), naming the flags that resume."""
    saved = dict(saved)
    if isinstance(saved.get("dataset"), str) and isinstance(settings.get("dataset"), str):  # "./data/x" is "data/x"
        saved["dataset"] = settings["dataset"] if same_path(saved["dataset"], settings["dataset"]) else saved["dataset"]
    changed = [k for k in RESUME_KEYS if (k in saved or k not in LATER_KEYS) and saved.get(k) != settings.get(k)]
    if changed:
        flags = " ".join(f"--{k} {saved.get(k)}" for k in changed)
        raise ConfigError(
            f"cannot resume: the DP settings {changed} differ from the checkpoint's "
            f"({ {k: saved.get(k) for k in changed} } there, { {k: settings.get(k) for k in changed} } now); "
            f"resume with the checkpoint's settings ({flags}), or start a new run with --resume False (a new run "
            "spends its own budget)"
        )


def check_resume(state: Mapping[str, Any], settings: dict[str, Any], prior: Sequence[Mapping[str, Any]]) -> None:
    """Refuse a resume that changes a privacy setting or the earlier stages; record a changed clipping mode.

    Any change of :data:`RESUME_KEYS` (the target and the fine-tuned scope included) is refused,
    and so are earlier stages that differ from the checkpoint's (another autoencoder). A key
    recorded only since v0.5 (:data:`LATER_KEYS`) is not compared when an older checkpoint lacks
    it. The per-unit gradient mode may change (every mode clips the same per-unit gradients):
    the entry then names both.
    """
    check_resume_settings(state.get("settings", {}), settings)
    saved_prior = [{k: v for k, v in s.items() if k != "epsilon_alone"} for s in state["prior"]]
    now_prior = [{k: v for k, v in s.items() if k != "epsilon_alone"} for s in prior]
    if entry_history(saved_prior) != entry_history(now_prior):
        raise ConfigError(
            "cannot resume: the earlier DP stages of the weights loaded now (e.g. the autoencoder) differ from those "
            f"the checkpoint was trained on ({[s['stage'] for s in saved_prior]} there, "
            f"{[s['stage'] for s in now_prior]} now); load the same files or start a new run with --resume False"
        )
    before, now = state.get("settings", {}).get("grad_sample_mode"), settings.get("grad_sample_mode")
    if before is not None and now is not None and str(now).split(" ")[0] != str(before).split(" ")[0]:
        steps = sum(int(h[2]) for h in state.get("history", []))
        settings["grad_sample_mode"] = f"{before} for the first {steps} step(s), then {now}"
