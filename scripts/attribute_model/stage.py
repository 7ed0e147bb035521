"""The DP attribute stage (``configs/dp_attributes.yaml``): fit, account, write.

The stage is one entry of the privacy ledger in the format of the DP-SGD stages: the two Gaussian
mechanisms of :mod:`.mechanism` are exactly one Gaussian step with q = 1 and noise multiplier
sigma, so :class:`~scripts.privacy.ledger.PrivacyLedger` records it with ``sample_rate = 1`` and
one planned step. Its earlier stages are those of the DP diffusion model's privacy report
(``compose_with``): ``target_epsilon`` is the budget of the whole cohort (the ledger composes
every stage with the accountant; never a sum of epsilons), and sigma is calibrated for what the
earlier stages left (:func:`scripts.privacy.accounting.calibrate_noise_after`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scripts.attribute_model.mechanism import default_norm_bound, fit
from scripts.attribute_model.model import METHOD, AttributeModel
from scripts.attribute_model.table import SUBJECT_COLUMNS, SubjectTable, subject_table
from scripts.errors import ConfigError, DataError
from scripts.files import sha256, write_text_atomic

__all__ = ["AttributeStage", "AttributeStageSettings", "prior_from_report"]

logger = logging.getLogger(__name__)

COVERS = (
    "({epsilon:.4g}, {delta:g})-differential privacy at the subject level (one subject, its ED and ES rows, added to "
    "or removed from {dataset}) for the attribute model file named below and every row drawn from it, composed by "
    "the accountant with the earlier DP stages listed (the diffusion model they name and its synthetic images)"
)


def prior_from_report(path: str | None) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The ledger entries of a DP stage's privacy report, and what it names (for the cohort card).

    Returns:
        (entries, {report, report_sha256, model_sha256, autoencoder_sha256, epsilon}) or ([], None)
        when ``path`` is null or absent.
    """
    from scripts.privacy.ledger import ancestors
    from scripts.privacy.report import read_report

    if not path or str(path) in ("None", "none", "null") or not os.path.isfile(path):
        return [], None
    report = read_report(path)
    if report.get("status", "complete") != "complete":
        raise DataError(f"{path}: the privacy report has status {report.get('status')!r}, not 'complete'")
    named = {
        "report": path,
        "report_sha256": sha256(path),
        "model_sha256": report.get("model_sha256"),
        "autoencoder_sha256": report.get("autoencoder_sha256"),
        "epsilon": report.get("epsilon"),
    }
    return ancestors({"privacy_ledger": report.get("stages", [])}), named


@dataclass(kw_only=True)
class AttributeStageSettings:
    """What the attribute stage reads, writes and spends (``configs/dp_attributes.yaml``).

    Attributes:
        datalist: the private datalist; its ``split`` is the private table.
        attribute_ranges: public reference ranges (the bounds of every contribution).
        model_path: the released model (``models/attributes_dp.json``).
        ledger_path: the write-ahead ledger file.
        report_path: the stage's privacy report.
        compose_with: privacy report of the DP diffusion model whose stages this one composes with
            (null or absent: the attribute stage alone).
        target_epsilon: budget of the whole ledger (earlier stages and this one).
        delta: target delta (< 1/n).
        accountant: ``prv`` or ``rdp``.
        noise_multiplier: null: calibrated; a number: used as is (0: noise off, tests only).
        marginal_share: share w of 1/sigma^2 for the marginals (1 - w for the dependence).
        bins: bins of a continuous column.
        norm_bound: R, the L2 clip of a subject's normal scores (null: sqrt(p) / 2).
        columns: subject columns modelled.
        max_noise_ratio: refuse when the noise std of a histogram bin exceeds this share of n.
        seed: seed of the noise (null: fresh OS entropy; a fixed seed is for tests only).
        split: the datalist split.
        stage: the stage's name in the ledger.
    """

    datalist: str
    attribute_ranges: Mapping[str, Sequence[float]]
    model_path: str
    ledger_path: str | None = None
    report_path: str | None = None
    compose_with: str | None = None
    target_epsilon: float = 10.5
    delta: float = 1e-5
    accountant: str = "prv"
    noise_multiplier: float | None = None
    marginal_share: float = 0.5
    bins: int = 16
    norm_bound: float | None = None
    columns: Sequence[str] = field(default_factory=lambda: SUBJECT_COLUMNS)
    max_noise_ratio: float = 0.5
    seed: int | None = None
    split: str = "training"
    stage: str = "attributes_dp"


class AttributeStage:
    """Fit the DP attribute model on the private table under the cohort's privacy ledger."""

    def __init__(self, settings: AttributeStageSettings) -> None:
        self.s = settings

    def load_table(self) -> SubjectTable:
        """The private subject table (checked: possible values, subject ids, one ED and one ES row, agreement)."""
        from scripts.data import load_datalist

        # the ranges make the reader refuse impossible values (LVEDV 1e6 ml), as every training stage does
        items = load_datalist(self.s.datalist, self.s.split, ranges=self.s.attribute_ranges)
        table = subject_table(items, tuple(self.s.columns), f"{self.s.datalist} ({self.s.split})")
        # a data check the custodian sees before anything is released (it is not part of the release)
        empty = [c for j, c in enumerate(table.columns) if np.isnan(table.values[:, j]).all()]
        if empty:
            raise DataError(
                f"{self.s.datalist} ({self.s.split}): column(s) {empty} are missing for every subject; remove them "
                f"from the config field 'columns' (a model of an empty column has nothing to release)"
            )
        return table

    def ledger(self, table: SubjectTable, prior: Sequence[Mapping[str, Any]]):
        from scripts.privacy.ledger import PrivacyLedger

        norm_bound = self.s.norm_bound if self.s.norm_bound is not None else default_norm_bound(len(table.columns))
        settings = {
            "stage": self.s.stage,
            "dataset": self.s.datalist,
            "privacy_unit": "subject",
            "units": len(table),
            "records": table.records,
            "target_epsilon": self.s.target_epsilon,
            "delta": self.s.delta,
            "accountant": self.s.accountant,
            "mechanism": "gaussian (two Gaussian mechanisms, recorded as one step with q = 1)",
            "columns": list(table.columns),
            "bins": self.s.bins,
            "marginal_share": self.s.marginal_share,
            "norm_bound": norm_bound,
        }
        return PrivacyLedger(
            settings, 1.0, 1, prior_stages=prior, path=self.s.ledger_path, noise_multiplier=self.s.noise_multiplier
        )

    def check_utility(self, sigma: float, n: int, p: int) -> None:
        """Refuse a budget that leaves the histograms mostly noise; warn when the noise is large."""
        if sigma == 0:
            return
        per_bin = sigma / math.sqrt(self.s.marginal_share) * math.sqrt(p)
        numbers = (
            f"noise multiplier {sigma:.3g} gives a noise std of {per_bin:.3g} subjects per histogram bin for n = {n} "
            f"subjects ({per_bin / n:.1%} of n)"
        )
        if per_bin > self.s.max_noise_ratio * n:
            raise ConfigError(
                f"config field 'target_epsilon' = {self.s.target_epsilon:g}: too small for a useful attribute model: "
                f"{numbers}, above max_noise_ratio = {self.s.max_noise_ratio:g}. Raise target_epsilon, model fewer "
                "'columns', or use a larger cohort"
            )
        if per_bin > n / self.s.bins:
            logger.warning(f"{numbers}: more than a bin's average count (n / bins); the marginals will be coarse")

    def run(self) -> dict[str, Any]:
        """Fit and write the model, the ledger and the report; returns the report."""
        prior, named = prior_from_report(self.s.compose_with)
        if named is None:
            logger.warning(
                f"no privacy report at compose_with={self.s.compose_with!r}: the attribute model's epsilon is that of "
                "the attribute stage alone; the cohort card composes it with the diffusion model's report at sampling"
            )
        table = self.load_table()
        ledger = self.ledger(table, prior)
        self.check_utility(ledger.noise_multiplier, len(table), len(table.columns))
        if not ledger.can_step():
            raise ConfigError(
                f"target_epsilon={self.s.target_epsilon:g} does not fit one step at noise multiplier "
                f"{ledger.noise_multiplier:g} after the earlier stages (epsilon {ledger.get_epsilon():.4g})"
            )
        ledger.step()  # write-ahead: recorded before the mechanism reads the private table
        rng = np.random.default_rng(self.s.seed)
        release = fit(
            table,
            self.s.attribute_ranges,
            noise_multiplier=ledger.noise_multiplier,
            marginal_share=self.s.marginal_share,
            bins=self.s.bins,
            norm_bound=self.s.norm_bound,
            rng=rng,
        )
        epsilon = ledger.get_epsilon()
        entry = ledger.entry()
        alone = ledger.report()["stages"][-1]["epsilon_alone"]
        privacy = {
            "epsilon": epsilon,
            "delta": ledger.delta,
            "accountant": ledger.accountant,
            "privacy_unit": "subject",
            "epsilon_alone": alone,
            "noise_multiplier": ledger.noise_multiplier,
            "sample_rate": 1.0,
            "steps": 1,
            "method": METHOD,
            "mechanisms": [
                {
                    "name": name,
                    "l2_sensitivity": release.sensitivities[name],
                    "noise_multiplier": release.noise_multipliers[name],
                    "noise_std": release.noise_multipliers[name] * release.sensitivities[name],
                }
                for name in ("marginals", "dependence")
            ],
            "composition": (
                "the two mechanisms compose exactly to one Gaussian step (q = 1, noise multiplier sigma with "
                "1/sigma^2 = sum of 1/sigma_k^2); the ledger composes it with the earlier stages by the "
                f"{ledger.accountant} accountant"
            ),
            "composed_with": named,
            "stage": entry["stage"],
            "started": entry["started"],
        }
        model = AttributeModel(release.marginals, release.correlation, len(table), privacy, ledger.entries())
        model.write(self.s.model_path)
        ledger.complete()
        report = ledger.report({"attributes_model": self.s.model_path})
        if not math.isinf(epsilon):
            report["covers"] = COVERS.format(epsilon=epsilon, delta=ledger.delta, dataset=self.s.datalist)
        report["not_covered"] = [s for s in report["not_covered"] if not s.startswith("attribute values copied")] + [
            "attribute rows a user types or edits by hand after drawing them (their own input)"
        ]
        if self.s.report_path:
            import json

            write_text_atomic(self.s.report_path, json.dumps(report, indent=2))
        logger.info(
            f"attribute model {self.s.model_path}: sigma {ledger.noise_multiplier:.4g}, epsilon alone {alone:.4g}, "
            f"whole ledger epsilon {epsilon:.4g} (target {self.s.target_epsilon:g}), delta {ledger.delta:g}"
        )
        print(
            f"DP attribute model {self.s.model_path}: n = {len(table)} subjects, {len(table.columns)} columns; "
            f"sigma = {ledger.noise_multiplier:.4g} (q = 1, 1 step), epsilon alone = {alone:.4f}, composed with "
            f"{len(prior)} earlier stage(s): epsilon = {epsilon:.4f}, delta = {ledger.delta:g}",
            flush=True,
        )
        return report
