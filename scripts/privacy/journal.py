"""The write-ahead file of a DP stage: every step recorded on disk before it reads private data.

A run killed between two checkpoints still counts, when it resumes, the steps it took after
the last one (the weights roll back, the privacy spent does not), and a run killed before its
first checkpoint is composed into the next run's epsilon. :class:`WriteAheadJournal` holds the
file; the accounting is :class:`scripts.privacy.ledger.PrivacyLedger`'s.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

from ignite import distributed as idist
from scripts.errors import DataError
from scripts.files import write_text_atomic

logger = logging.getLogger(__name__)

INTERRUPTED = "(interrupted run started"


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
            "The privacy it records as spent must not be forgotten, so no DP run starts here (not even with --resume "
            "False). The bundle keeps no copy: restore the file if you have one (the report beside it, "
            "privacy_report.json, and the weights' privacy_ledger list the stages of a completed run); otherwise "
            "start in a new bundle root and count this data's earlier spending yourself"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        raise DataError(f"{path}: not a {what} (expected a JSON object with a 'stages' list)")
    return data


class WriteAheadJournal:
    """The ledger file of one stage's output folder, and the run that wrote it before this one.

    Args:
        path: the file (rank 0 writes it); None keeps the ledger in memory.
    """

    def __init__(self, path: str | None) -> None:
        self.path = path
        # what an earlier run left: its steps count even when it left no checkpoint
        self.previous = _read_json(path, "privacy ledger") if path and os.path.isfile(path) else None

    def interrupted_entries(self, stage: str) -> list[dict[str, Any]]:
        """Runs of ``stage`` that left steps and no checkpoint: the file's last entry, and those it composed."""
        previous = self.previous
        if not previous or previous.get("status") == "complete" or not previous["stages"]:
            return []
        last = dict(previous["stages"][-1])
        if last.get("stage") != stage or int(last.get("steps", 0)) == 0:
            return []
        last["stage"] = f"{last['stage']} {INTERRUPTED} {previous.get('started')})"
        earlier = [dict(s) for s in previous["stages"][:-1] if INTERRUPTED in str(s.get("stage"))]
        entries = [*earlier, last]
        for s in entries:
            s.pop("epsilon_alone", None)
        return entries

    def write(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` atomically (rank 0); an earlier complete run's file is kept under another name."""
        if not self.path or idist.get_rank() > 0:
            return
        previous = self.previous
        if previous is not None and run_id(previous) != run_id(record) and os.path.isfile(self.path):
            if previous.get("status") == "complete":
                stamp = f"{previous.get('started', 'unknown').replace(':', '')}"
                archived = f"{os.path.splitext(self.path)[0]}.{stamp}.{previous.get('run_id', 'old')}.json"
                os.replace(self.path, archived)
                # the new model does not build on the earlier one, so its report does not compose it; but the
                # earlier run's outputs (its model, the samples it logged to MLflow) may be out already
                last = (previous.get("stages") or [{}])[-1]
                spent = f"{last.get('steps')} steps at sigma {last.get('noise_multiplier')}, started {stamp}"
                logger.warning(
                    f"a new DP run on this data: the earlier complete run ({spent}) is not composed into this "
                    f"model's report, as this model does not build on it; its ledger is kept as {archived}. If the "
                    "earlier model or its outputs were shared, the data's total privacy loss is the sum of both"
                )
            self.previous = None
        write_text_atomic(self.path, json.dumps(dict(record), indent=2))

    def steps_after_checkpoint(self, identity: str | None) -> int | None:
        """Steps the file recorded for run ``identity`` when it is that run's own file (else None)."""
        if self.previous and run_id(self.previous) == identity:
            return int(self.previous["stages"][-1]["steps"])
        return None

    def check_covers(self, state: Mapping[str, Any]) -> None:
        """Refuse a resume whose file is missing or records fewer steps of the run than the checkpoint.

        The steps a run took after its last checkpoint are known only from the file; without
        it a resume would count the checkpoint's steps only. The file covers the checkpoint's
        run when it holds an entry of that run (its own, or the run composed as interrupted by a
        later one) with at least the checkpoint's steps.
        """
        if not self.path or not state.get("ledger_file", True):
            return
        steps = sum(int(h[2]) for h in state.get("history", []))
        if steps == 0:
            return
        identity = run_id(state)
        previous = self.previous
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
