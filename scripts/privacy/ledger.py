"""The privacy ledger of a DP stage: accounting, budget, write-ahead file, composition, report.

:class:`PrivacyLedger` is an Opacus accountant (``IAccountant``: ``step``, ``get_epsilon``,
``history``, ``state_dict``) that also

- composes the stage with every earlier DP stage on the same private data (a DP-fine-tuned
  autoencoder, a run killed before its first checkpoint) with the accountant's own
  composition (:func:`scripts.privacy.accounting.compose_epsilon`), never a sum of epsilons;
- calibrates the noise multiplier of the stage for its planned steps and the target;
- keeps a **write-ahead file**: :meth:`PrivacyLedger.step` is called *before* a step reads
  private data and records it on disk, so a run killed between two checkpoints still counts
  the steps it took after the last one when it resumes (the weights roll back, the privacy
  spent does not), and a run killed before its first checkpoint is counted by the next run;
- enforces the budget (:meth:`PrivacyLedger.fits`) and writes the privacy report.

It needs no network: the evaluation and release stages read reports with :func:`read_report`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ignite import distributed as idist
from opacus.accountants import IAccountant
from scripts.errors import ConfigError, DataError
from scripts.files import sha256, write_text_atomic
from scripts.privacy.accounting import calibrate_noise_after, compose_epsilon

__all__ = ["PrivacyLedger", "ancestors", "read_report", "report_summary", "run_id", "RESUME_KEYS"]

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
)


def _history(stages: Sequence[Mapping[str, Any]]) -> list[tuple[float, float, int]]:
    return [(float(s["noise_multiplier"]), float(s["sample_rate"]), int(s["steps"])) for s in stages if s["steps"] > 0]


def _compose(history: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """:func:`compose_epsilon`, with steps taken without noise (a non-private baseline) making epsilon infinite."""
    if any(sigma == 0 for sigma, _, steps in history if steps > 0):
        return math.inf
    return compose_epsilon(list(history), delta, accountant) if history else 0.0


def run_id(record: Mapping[str, Any] | None) -> str | None:
    """A run's identity: its random ``run_id``, or for files and checkpoints written before it, ``started``."""
    if not record:
        return None
    return record.get("run_id") or record.get("started")


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(
            f"{path}: cannot read the {what} ({type(err).__name__}: {err}); expected the JSON file a DP stage writes. "
            "Restore it from a backup: privacy spent on the data must not be forgotten"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        raise DataError(f"{path}: not a {what} (expected a JSON object with a 'stages' list)")
    return data


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
            "1/n "
            "is the usual choice"
        )


class PrivacyLedger(IAccountant):
    """Accountant of one DP stage composed with the earlier DP stages on the same private data.

    Args:
        settings: what the stage is, recorded in the ledger and the report: at least
            ``stage``, ``dataset``, ``privacy_unit``, ``units``, ``records``,
            ``target_epsilon``, ``delta``, ``accountant`` (plus e.g. ``max_grad_norm``,
            ``noise_multiplicity``, ``logical_batch_size``, ``finetune_scope``).
        sample_rate: Poisson rate q of the stage.
        epochs: planned epochs; one epoch is ``int(1 / q)`` steps (Opacus's convention).
        prior_stages: ledger entries of earlier DP stages whose output this stage builds on.
        path: the write-ahead file (rank 0 writes it); None keeps the ledger in memory.
        noise_multiplier: use this sigma instead of calibrating (the report still states the
            epsilon it gives). 0 switches the noise off: epsilon is infinite, so it needs
            ``target_epsilon=inf`` (sensitivity tests only).
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        sample_rate: float,
        epochs: int,
        prior_stages: Sequence[Mapping[str, Any]] = (),
        path: str | None = None,
        noise_multiplier: float | None = None,
    ) -> None:
        super().__init__()
        missing = [k for k in REQUIRED_SETTINGS if k not in settings]
        if missing:
            raise ConfigError(f"PrivacyLedger settings lack {missing}")
        self.settings = dict(settings)
        self.settings["target_epsilon"] = self.target_epsilon = float(settings["target_epsilon"])
        self.settings["delta"] = self.delta = float(settings["delta"])
        self.accountant = str(settings["accountant"])
        check_delta(self.delta, int(settings["units"]))
        if not 0 < sample_rate <= 1:
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if int(epochs) < 1:
            raise ConfigError(f"config field 'epochs': expected an integer >= 1, got {epochs}")
        self.sample_rate = float(sample_rate)
        self.steps_per_epoch = int(1 / self.sample_rate)
        self.planned_steps = int(epochs) * self.steps_per_epoch
        self.path = path
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        # the run's identity: random, not the start time (two runs started in the same second
        # were taken for one, and a resume composed 8 of their 18 steps)
        self.run_id = secrets.token_hex(8)
        self.status = "running"
        self.prior = [dict(s) for s in prior_stages]
        self._check_prior(self.prior)
        # a run of this stage killed before its first checkpoint: its steps were taken on the
        # private data, so they are composed (a resume of that same run replaces this entry)
        self._previous = _read_json(path, "privacy ledger") if path and os.path.isfile(path) else None
        self.interrupted = self._interrupted_entries(self._previous)
        if self.interrupted:
            logger.warning(
                f"{path}: a run started {self._previous.get('started')} took {self.interrupted[-1]['steps']} DP "
                "step(s) "
                "and left no checkpoint; its privacy cost is composed into this run's epsilon"
            )
        prior_history = _history(self.all_prior)
        if noise_multiplier is None and any(sigma == 0 for sigma, _, _ in prior_history):
            raise ConfigError(
                "an earlier stage on this data ran without noise (epsilon inf): no finite target_epsilon can be met; "
                "start from weights that did not see the private data without noise"
            )
        if noise_multiplier is None:
            noise_multiplier = calibrate_noise_after(
                prior_history, self.target_epsilon, self.delta, self.sample_rate, self.planned_steps, self.accountant
            )
        self.noise_multiplier = float(noise_multiplier)
        if self.noise_multiplier < 0 or (self.noise_multiplier == 0 and not math.isinf(self.target_epsilon)):
            raise ConfigError(
                f"noise_multiplier={noise_multiplier!r}: expected null (calibrated to target_epsilon), a positive "
                "sigma, or 0 with target_epsilon inf (noise off: no privacy, for non-private baselines)"
            )
        self.safe_steps = self._safe_steps()
        if self.safe_steps == 0:
            # a stage that cannot take one step would "complete" with the pre-trained weights and replace
            # an earlier release's model and report
            one = _compose(
                _history(self.all_prior) + [(self.noise_multiplier, self.sample_rate, 1)], self.delta, self.accountant
            )
            raise ConfigError(
                f"noise_multiplier={self.noise_multiplier:g} affords no DP step within target_epsilon="
                f"{self.target_epsilon:g}: one step (with the earlier stages on this data) already gives epsilon "
                f"{one:.4g}. Leave --noise_multiplier null to calibrate it, or raise it; nothing was run"
            )

    # -- Opacus accountant interface ---------------------------------------------------------------

    @classmethod
    def mechanism(cls) -> str:
        return "privacy_ledger"

    def __len__(self) -> int:
        return self.steps

    @property
    def steps(self) -> int:
        """Steps of this stage recorded so far (each recorded before it ran)."""
        return sum(int(h[2]) for h in self.history)

    @property
    def all_prior(self) -> list[dict[str, Any]]:
        """Earlier stages, with an interrupted run of this stage if there was one."""
        return self.prior + self.interrupted

    def step(self, *, noise_multiplier: float | None = None, sample_rate: float | None = None) -> None:
        """Record one step BEFORE it reads private data, and write the ledger file.

        Args:
            noise_multiplier: must be the ledger's (kept for Opacus's interface).
            sample_rate: must be the ledger's (kept for Opacus's interface).
        """
        for name, value, own in (
            ("noise_multiplier", noise_multiplier, self.noise_multiplier),
            ("sample_rate", sample_rate, self.sample_rate),
        ):
            if value is not None and value != own:
                raise ConfigError(f"PrivacyLedger.step: {name}={value} differs from the stage's {own}")
        if self.history and self.history[-1][:2] == (self.noise_multiplier, self.sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + 1)
        else:
            self.history.append((self.noise_multiplier, self.sample_rate, 1))
        self.status = "running"
        self.write()

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon of the whole ledger (earlier stages and this one composed) at ``delta`` (default: the stage's)."""
        if self.noise_multiplier == 0 and self.steps > 0:
            return math.inf
        history = _history(self.all_prior) + [tuple(h) for h in self.history]
        return _compose(history, self.delta if delta is None else delta, self.accountant)

    # -- budget ------------------------------------------------------------------------------------

    def fits(self, steps: int) -> bool:
        """Whether ``steps`` steps of this stage keep the whole ledger within the target."""
        if self.noise_multiplier == 0 and steps > 0:  # noise off: no privacy, only an infinite target allows it
            return math.isinf(self.target_epsilon)
        history = _history(self.all_prior) + ([(self.noise_multiplier, self.sample_rate, steps)] if steps > 0 else [])
        return not history or _compose(history, self.delta, self.accountant) <= self.target_epsilon

    def _safe_steps(self) -> int:
        """Step count known to fit the budget: the plan (checked once), else found by bisection."""
        if self.fits(self.planned_steps):
            return self.planned_steps
        low, high = 0, self.planned_steps
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self.fits(mid) else (low, mid)
        return low

    def can_step(self) -> bool:
        """Whether one more step keeps the ledger within the target (steps past the plan are checked one by one)."""
        if self.steps + 1 > self.safe_steps and self.fits(self.steps + 1):
            self.safe_steps = self.steps + 1
        return self.steps + 1 <= self.safe_steps

    # -- entries, file, report ----------------------------------------------------------------------

    def entry(self) -> dict[str, Any]:
        """This stage as a ledger entry (settings, sigma, q, steps)."""
        return {
            **self.settings,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "epochs": self.steps / self.steps_per_epoch,
            "started": self.started,
            "run_id": self.run_id,
        }

    def entries(self) -> list[dict[str, Any]]:
        """Every stage of the ledger (earlier ones, an interrupted run, this one): stored beside the weights."""
        return [*self.all_prior, self.entry()]

    def write(self) -> None:
        """Write the ledger file atomically (rank 0); an earlier complete run's file is kept under another name."""
        if not self.path or idist.get_rank() > 0:
            return
        if self._previous is not None and run_id(self._previous) != self.run_id and os.path.isfile(self.path):
            if self._previous.get("status") == "complete":
                stamp = f"{self._previous.get('started', 'unknown').replace(':', '')}"
                archived = f"{os.path.splitext(self.path)[0]}.{stamp}.{self._previous.get('run_id', 'old')}.json"
                os.replace(self.path, archived)
                logger.info(f"the ledger of the earlier complete run is kept as {archived}")
            self._previous = None
        write_text_atomic(
            self.path,
            json.dumps(
                {"stages": self.entries(), "started": self.started, "run_id": self.run_id, "status": self.status},
                indent=2,
            ),
        )

    def complete(self) -> None:
        """Mark the run complete in the ledger file."""
        self.status = "complete"
        self.write()

    def report(self, files: Mapping[str, str | None] | None = None) -> dict[str, Any]:
        """The privacy report: the composed (epsilon, delta), what it covers, every stage.

        Args:
            files: released files the epsilon applies to, by role (``model``, ``autoencoder``);
                each existing one is named with its SHA-256 so inference can check it.

        Returns:
            the report as a dict.
        """
        stages = self.entries()
        for s in stages:
            s["epsilon_alone"] = _compose(_history([s]), s["delta"], s["accountant"])
        unit = self.settings["privacy_unit"]
        epsilon = self.get_epsilon()
        covers = (
            f"({epsilon:.4g}, {self.delta:g})-differential privacy at the {unit} level (one {unit} added "
            f"to or removed from the private training set {self.settings['dataset']}) for everything derived from "
            "the model file named below, decoded with the autoencoder file named below: weights and synthetic images"
        )
        if math.isinf(epsilon):
            covers = "nothing: steps without noise (noise_multiplier 0) were taken on the private data; no DP guarantee"
        report = {
            "epsilon": epsilon,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": self.accountant,
            "composition": f"{self.accountant} accountant over all stages (opacus), not a sum of epsilons",
            "privacy_unit": unit,
            "covers": covers,
            "assumptions": [
                f"the number of private units (n = {self.settings['units']}) and records ({self.settings['records']}) "
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

    def write_report(self, path: str, files: Mapping[str, str | None] | None = None) -> dict[str, Any]:
        """Write the report atomically (rank 0) and return it.

        Args:
            path: the report file.
            files: see :meth:`report`.

        Returns:
            the report.
        """
        report = self.report(files)
        if idist.get_rank() == 0:
            write_text_atomic(path, json.dumps(report, indent=2))
        return report

    # -- checks ---------------------------------------------------------------------------------------

    def _check_prior(self, prior: Sequence[Mapping[str, Any]]) -> None:
        unit = self.settings["privacy_unit"]
        for s in prior:
            missing = [k for k in ("stage", "noise_multiplier", "sample_rate", "steps", "privacy_unit") if k not in s]
            if missing:
                raise ConfigError(f"an earlier DP stage's ledger entry lacks {missing}: {dict(s)}")
            if s["privacy_unit"] != unit:
                raise ConfigError(
                    f"earlier DP stage '{s['stage']}' is {s['privacy_unit']}-level but this stage is {unit}-level: a "
                    f"composed guarantee would only be {('record' if 'record' in (unit, s['privacy_unit']) else unit)}-"
                    f"level. Use the same --privacy_unit in every DP stage on this data"
                )

    def _interrupted_entries(self, previous: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        """Runs of this stage that left steps and no checkpoint: the file's last entry, and those it composed."""
        if not previous or previous.get("status") == "complete" or not previous["stages"]:
            return []
        last = dict(previous["stages"][-1])
        if last.get("stage") != self.settings["stage"] or int(last.get("steps", 0)) == 0:
            return []
        last["stage"] = f"{last['stage']} (interrupted run started {previous.get('started')})"
        earlier = [dict(s) for s in previous["stages"][:-1] if "(interrupted run started" in str(s.get("stage"))]
        entries = [*earlier, last]
        for s in entries:
            s.pop("epsilon_alone", None)
        self._check_prior(entries)
        return entries

    # -- resume ---------------------------------------------------------------------------------------

    def _check_file_covers(self, state: Mapping[str, Any]) -> None:
        """Refuse a resume whose write-ahead file is missing or records fewer steps of the run than the checkpoint.

        The steps a run took after its last checkpoint are known only from the file; without
        it a resume counted the checkpoint's steps (6 instead of 10, epsilon 2.43 instead of
        2.79). The file covers the checkpoint's run when it holds an entry of that run (its own,
        or the run composed as interrupted by a later one) with at least the checkpoint's steps.
        """
        if not self.path or not state.get("ledger_file", True):
            return
        steps = sum(int(h[2]) for h in state.get("history", []))
        if steps == 0:
            return
        identity = run_id(state)
        previous = self._previous
        recorded = [
            int(s.get("steps", 0))
            for s in (previous or {}).get("stages", [])
            if isinstance(s, Mapping) and run_id(s) == identity
        ]
        if previous is None or not recorded or max(recorded) < steps:
            found = (
                "is missing"
                if previous is None
                else f"records {max(recorded) if recorded else 0} step(s) of that run"
                if recorded or run_id(previous) == identity
                else "belongs to another run"
            )
            raise DataError(
                f"cannot resume: the checkpoint's run took {steps} DP step(s), but its write-ahead ledger {self.path} "
                f"{found}. The steps taken after the checkpoint are known only from that file, so a resume would "
                "undercount the privacy spent. Restore the file from a backup, or start a new run with --resume False "
                "(a new run spends its own budget)"
            )

    def state_dict(self, destination: dict | None = None) -> dict[str, Any]:
        state = super().state_dict(destination)
        state.update(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            settings=self.settings,
            prior=self.prior,
            interrupted=self.interrupted,
            started=self.started,
            run_id=self.run_id,
            ledger_file=bool(self.path),
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the checkpoint's history, plus the steps the write-ahead file recorded after it.

        Any change of a privacy setting (:data:`RESUME_KEYS`, the target included) is refused,
        and so are earlier stages that differ from the checkpoint's (another autoencoder).
        """
        saved = state.get("settings", {})
        changed = [k for k in RESUME_KEYS if saved.get(k) != self.settings.get(k)]
        if changed:
            raise ConfigError(
                f"cannot resume: the DP settings {changed} differ from the checkpoint's "
                f"({ {k: saved.get(k) for k in changed} } there, { {k: self.settings.get(k) for k in changed} } now); "
                "resume with the same settings, or start a new run with --resume False (a new run spends its own "
                "budget)"
            )
        saved_prior = [{k: v for k, v in s.items() if k != "epsilon_alone"} for s in state["prior"]]
        now_prior = [{k: v for k, v in s.items() if k != "epsilon_alone"} for s in self.prior]
        if _history(saved_prior) != _history(now_prior):
            raise ConfigError(
                "cannot resume: the earlier DP stages of the weights loaded now (e.g. the autoencoder) differ from "
                "those "
                f"the checkpoint was trained on ({[s['stage'] for s in saved_prior]} there, "
                f"{[s['stage'] for s in now_prior]} now); load the same files or start a new run with --resume False"
            )
        self._check_file_covers(state)
        super().load_state_dict(state)
        self.noise_multiplier = float(state["noise_multiplier"])
        self.sample_rate = float(state["sample_rate"])
        self.prior, self.started = [dict(s) for s in state["prior"]], state["started"]
        self.run_id = run_id(state)
        previous = self._previous
        saved_interrupted = [dict(s) for s in state.get("interrupted", [])]
        if previous and run_id(previous) == self.run_id:
            # the file is this run's own write-ahead record: its interrupted predecessors are in the checkpoint
            self.interrupted = saved_interrupted
            logged = int(previous["stages"][-1]["steps"])
            if logged > self.steps:
                lost = logged - self.steps
                logger.warning(
                    f"{lost} DP step(s) ran after the last checkpoint: their weights are lost, their privacy cost is "
                    "kept"
                )
                self.history.append((self.noise_multiplier, self.sample_rate, lost))
            self._previous = None
        else:  # another run left the file (killed before its first checkpoint): it stays composed
            self.interrupted = saved_interrupted + self.interrupted
        self.safe_steps = self._safe_steps()


def ancestors(*sources: Any) -> list[dict[str, Any]]:
    """Every DP stage behind the loaded weights, each once: the ledgers they carry, merged.

    A DP stage records its ledger in the weights it writes (``privacy_ledger``); a model
    fine-tuned from a DP model, or decoded with a DP autoencoder, builds on those stages.
    A stage found in several sources (the autoencoder's stage is also in the ledger of a
    diffusion model trained with it) is composed once.

    Args:
        sources: loaded networks (their ``privacy_ledger`` attribute) or checkpoint dicts
            (their ``"privacy_ledger"`` key).

    Returns:
        the ledger entries, in order of first appearance.
    """
    seen, out = set(), []
    for source in sources:
        entries = (
            source.get("privacy_ledger", []) if isinstance(source, Mapping) else getattr(source, "privacy_ledger", [])
        )
        for entry in entries or []:
            key = tuple(
                str(entry.get(k)) for k in ("stage", "started", "run_id", "noise_multiplier", "sample_rate", "steps")
            )
            if key not in seen:
                seen.add(key)
                out.append({k: v for k, v in entry.items() if k != "epsilon_alone"})
    return out


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
