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

import logging
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

from opacus.accountants import IAccountant
from scripts.privacy.composition import compose, entry_history, largest_fitting
from scripts.privacy.journal import WriteAheadJournal, run_id
from scripts.privacy.ledger_checks import (
    RESUME_KEYS,
    check_delta,
    check_prior,
    check_resume,
    check_resume_settings,
    check_settings,
    check_step_arguments,
    refuse_no_step,
    stage_sigma,
)
from scripts.privacy.report import build_report, write_report

__all__ = ["PrivacyLedger", "ancestors", "run_id", "RESUME_KEYS"]

logger = logging.getLogger(__name__)


class PrivacyLedger(IAccountant):
    """Accountant of one DP stage composed with the earlier DP stages on the same private data.

    Args:
        settings: what the stage is, recorded in the ledger and the report: at least
            :data:`~scripts.privacy.ledger_checks.REQUIRED_SETTINGS` (plus e.g. ``max_grad_norm``).
        sample_rate: Poisson rate q of the stage.
        epochs: planned epochs; one epoch is ``int(1 / q)`` steps (Opacus's convention).
        prior_stages: ledger entries of earlier DP stages whose output this stage builds on.
        path: the write-ahead file (rank 0 writes it); None keeps the ledger in memory.
        noise_multiplier: use this sigma instead of calibrating (the report still states the
            epsilon it gives). 0 switches the noise off: epsilon is infinite, so it needs
            ``target_epsilon=inf`` (sensitivity tests only).
        resume_run_id: the run of the checkpoint about to be resumed: when the write-ahead file
            is that run's, its entry is not composed as an earlier run and its sigma is kept.
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        sample_rate: float,
        epochs: int,
        prior_stages: Sequence[Mapping[str, Any]] = (),
        path: str | None = None,
        noise_multiplier: float | None = None,
        resume_run_id: str | None = None,
    ) -> None:
        super().__init__()
        check_settings(settings, sample_rate, epochs)
        self.settings = dict(settings)
        self.settings["target_epsilon"] = self.target_epsilon = float(settings["target_epsilon"])
        self.settings["delta"] = self.delta = float(settings["delta"])
        self.accountant = str(settings["accountant"])
        check_delta(self.delta, int(settings["units"]))
        self.sample_rate = float(sample_rate)
        self.steps_per_epoch = int(1 / self.sample_rate)
        self.planned_steps = int(epochs) * self.steps_per_epoch
        self.journal = WriteAheadJournal(path)
        self.started, self.status = time.strftime("%Y-%m-%dT%H:%M:%S"), "running"
        # random, not the start time: two runs started in the same second were taken for one
        self.run_id = secrets.token_hex(8)
        self.prior = [dict(s) for s in prior_stages]
        # a run of this stage killed before its first checkpoint: its steps are composed (unless it is the run resumed)
        own = resume_run_id is not None and run_id(self.journal.previous) == resume_run_id
        self.interrupted = [] if own else self.journal.interrupted_entries(self.settings["stage"])
        self.release_pending = False  # set on resume: the run did its steps but not its final files
        check_prior(self.all_prior, self.settings["privacy_unit"])
        if self.interrupted:
            logger.warning(
                f"{path}: a run started {self.journal.previous.get('started')} took {self.interrupted[-1]['steps']} DP "
                "step(s) and left no checkpoint; its privacy cost is composed into this run's epsilon"
            )
        if own:  # the resumed run's sigma (the checkpoint restores it); a changed setting is refused first
            check_resume_settings(self.journal.previous["stages"][-1], self.settings)
            noise_multiplier = self.journal.previous["stages"][-1]["noise_multiplier"]
        stage = {**self.settings, "sample_rate": self.sample_rate}
        self.noise_multiplier = stage_sigma(noise_multiplier, stage, self.all_prior, self.planned_steps)
        self.safe_steps = self._safe_steps()
        if self.safe_steps == 0:
            refuse_no_step(self.entry(), self.all_prior)

    @property
    def path(self) -> str | None:
        """The write-ahead file (None: in memory)."""
        return self.journal.path

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
        check_step_arguments(noise_multiplier, sample_rate, self.noise_multiplier, self.sample_rate)
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
        history = entry_history(self.all_prior) + [tuple(h) for h in self.history]
        return compose(history, self.delta if delta is None else delta, self.accountant)

    def fits(self, steps: int) -> bool:
        """Whether ``steps`` steps of this stage keep the whole ledger within the target."""
        if self.noise_multiplier == 0 and steps > 0:  # noise off: no privacy, only an infinite target allows it
            return math.isinf(self.target_epsilon)
        this = [(self.noise_multiplier, self.sample_rate, steps)] if steps > 0 else []
        history = entry_history(self.all_prior) + this
        return not history or compose(history, self.delta, self.accountant) <= self.target_epsilon

    def _safe_steps(self) -> int:
        """Step count known to fit the budget (:func:`~scripts.privacy.composition.largest_fitting`)."""
        return largest_fitting(self.fits, self.planned_steps)

    def can_step(self) -> bool:
        """Whether one more step keeps the ledger within the target (steps past the plan are checked one by one)."""
        if self.steps + 1 > self.safe_steps and self.fits(self.steps + 1):
            self.safe_steps = self.steps + 1
        return self.steps + 1 <= self.safe_steps

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
        """Write the ledger file (:class:`~scripts.privacy.journal.WriteAheadJournal`)."""
        record = {"stages": self.entries(), "started": self.started, "run_id": self.run_id, "status": self.status}
        self.journal.write(record)

    def complete(self) -> None:
        """Mark the run complete in the ledger file."""
        self.status = "complete"
        self.write()

    def report(self, files: Mapping[str, str | None] | None = None) -> dict[str, Any]:
        """The privacy report (:func:`scripts.privacy.report.build_report`)."""
        return build_report(self, files)

    def write_report(self, path: str, files: Mapping[str, str | None] | None = None) -> dict[str, Any]:
        """Write the report atomically (rank 0) and return it (:func:`scripts.privacy.report.write_report`)."""
        return write_report(self, path, files)

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
            ledger_file=bool(self.journal.path),
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the checkpoint's history, plus the steps the write-ahead file recorded after it.

        Any change of a privacy setting (:data:`RESUME_KEYS`, the target included) is refused,
        and so are earlier stages that differ from the checkpoint's (another autoencoder).
        """
        check_resume(state, self.settings, self.prior)
        self.journal.check_covers(state)
        super().load_state_dict(state)
        self.noise_multiplier = float(state["noise_multiplier"])
        self.sample_rate = float(state["sample_rate"])
        self.prior, self.started = [dict(s) for s in state["prior"]], state["started"]
        self.run_id = run_id(state)
        saved_interrupted = [dict(s) for s in state.get("interrupted", [])]
        logged = self.journal.steps_after_checkpoint(self.run_id)
        self.release_pending = logged is not None and self.journal.previous.get("status") != "complete"
        if logged is not None:
            # the file is this run's own write-ahead record: its interrupted predecessors are in the checkpoint
            self.interrupted = saved_interrupted
            if logged > self.steps:
                lost = logged - self.steps
                logger.warning(f"{lost} DP step(s) ran after the last checkpoint: weights lost, privacy cost kept")
                self.history.append((self.noise_multiplier, self.sample_rate, lost))
            self.journal.previous = None
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
