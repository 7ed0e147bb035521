"""The privacy report of a DP stage: the composed (epsilon, delta), what it covers and what it does not.

Readers (inference, evaluation, release) use :func:`read_report`; they need no network.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from ignite import distributed as idist
from scripts.errors import DataError
from scripts.files import sha256, write_text_atomic
from scripts.privacy.composition import compose, entry_history
from scripts.privacy.journal import _read_json


def build_report(ledger: Any, files: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """The privacy report: the composed (epsilon, delta), what it covers, every stage.

    Args:
        ledger: the stage's :class:`~scripts.privacy.ledger.PrivacyLedger` (not imported: it imports this module).
        files: released files the epsilon applies to, by role (``model``, ``autoencoder``);
            each existing one is named with its SHA-256 so inference can check it.

    Returns:
        the report as a dict.
    """
    stages = ledger.entries()
    for s in stages:
        s["epsilon_alone"] = compose(entry_history([s]), s["delta"], s["accountant"])
    unit = ledger.settings["privacy_unit"]
    epsilon = ledger.get_epsilon()
    covers = (
        f"({epsilon:.4g}, {ledger.delta:g})-differential privacy at the {unit} level (one {unit} added "
        f"to or removed from the private training set {ledger.settings['dataset']}) for everything derived from "
        "the model file named below, decoded with the autoencoder file named below: weights and synthetic images"
    )
    if math.isinf(epsilon):
        covers = "nothing: steps without noise (noise_multiplier 0) were taken on the private data; no DP guarantee"
    report = {
        "epsilon": epsilon,
        "delta": ledger.delta,
        "target_epsilon": ledger.target_epsilon,
        "accountant": ledger.accountant,
        "composition": f"{ledger.accountant} accountant over all stages (opacus), not a sum of epsilons",
        "privacy_unit": unit,
        "covers": covers,
        "assumptions": [
            f"the number of private units (n = {ledger.settings['units']}) and records ({ledger.settings['records']}) "
            "is public: it sets the sample rate q = logical_batch_size / n and is written in this report, the log "
            "and MLflow, as is standard for DP-SGD with Poisson sampling",
            "the pre-training data is public",
        ],
        "not_covered": [
            "attribute values copied from private records to condition sampling (that is a separate release)",
            "repeated runs and hyper-parameter selection on the private data: every run spends its own budget "
            "(--resume False starts a fresh ledger; the earlier ledger is kept beside it)",
            "logs and timing: the total run time, the ledger's start stamp and MLflow's run timestamps; file "
            "modification times (the write-ahead ledger is rewritten every step, the resume checkpoint every "
            "epoch: watching the folder during the run shows step and epoch durations). The DP stages' log "
            "lines and MLflow metrics carry no per-step or per-epoch time",
            "evaluation numbers computed on private records (eval/report.json)",
            "synthetic images decoded with another autoencoder than the one named here",
        ],
        "status": "complete",
        "stages": stages,
    }
    for role, path in (files or {}).items():
        if path and os.path.isfile(path):
            report[role] = path
            report[f"{role}_sha256"] = sha256(path)
    return report


def write_report(ledger: Any, path: str, files: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """Write the report atomically (rank 0) and return it.

    Args:
        path: the report file.
        ledger: the stage's ledger.
        files: see :func:`build_report`.

    Returns:
        the report.
    """
    report = build_report(ledger, files)
    if idist.get_rank() == 0:
        write_text_atomic(path, json.dumps(report, indent=2))
    return report


def read_report(path: str) -> dict[str, Any]:
    """Read a privacy report, with a clear error naming the file when it is not one.

    Args:
        path: the report file.

    Returns:
        the report.
    """
    report = _read_json(path, "privacy report")
    missing = [k for k in ("epsilon", "delta", "privacy_unit") if k not in report]
    if missing:
        raise DataError(f"{path}: not a privacy report (lacks {missing})")
    return report


def report_summary(report_path: str) -> str:
    """A few lines on the privacy report, for the end of a run.

    Args:
        report_path: the report file.

    Returns:
        the text.
    """
    if not os.path.isfile(report_path):
        return f"no privacy report at {report_path} (the run did not complete)"
    r = read_report(report_path)
    lines = [
        f"Privacy report {report_path}",
        f"  epsilon = {r['epsilon']:.4f} (target {r['target_epsilon']:g}), delta = {r['delta']:g}, "
        f"{r['privacy_unit']}-level, {r['accountant']} accountant",
    ]
    for s in r["stages"]:
        units = f"{s['units']} units / {s['records']} records, " if "units" in s else ""
        details = ", ".join(
            f"{label} = {s[key]:g}" if isinstance(s[key], float) else f"{label} = {s[key]}"
            for key, label in (
                ("max_grad_norm", "C"),
                ("noise_multiplicity", "K"),
                ("finetune_scope", "scope"),
                ("grad_sample_mode", "per-unit gradients"),
            )
            if key in s
        )
        lines.append(
            f"  stage {s['stage']}: {units}sigma = {s['noise_multiplier']:.4g}, q = {s['sample_rate']:.4g}, "
            f"{s['steps']} steps{', ' + details if details else ''}, epsilon alone = {s['epsilon_alone']:.4f}"
        )
    for role in ("model", "autoencoder"):
        if role in r:
            lines.append(f"  {role}: {r[role]} (sha256 {r[role + '_sha256'][:16]}...)")
    return "\n".join(lines)
