"""What every cohort folder shares: its subject splits and its two CSV tables.

The phantom (``scripts.phantom``) and the importer of real cohorts (``scripts.prepare``) write the same
``attributes.csv`` / ``subjects.csv`` and split subjects the same way; both use this leaf module (it
imports no other cohort writer, so neither imports the other).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence

import numpy as np
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.errors import ConfigError

__all__ = ["CSV_COLUMNS", "SPLITS", "SUBJECT_COLUMNS", "check_fractions", "csv_bytes", "format_value", "split_subjects"]

CSV_COLUMNS: tuple[str, ...] = ("id", "subject", "phase", "image", "label") + ATTRIBUTE_NAMES
SUBJECT_COLUMNS: tuple[str, ...] = ("subject", "domain", "group", "split")
SPLITS: tuple[str, ...] = ("training", "validation", "test")

_INT_ATTRIBUTES = frozenset({"SEX", "ESED", "DEPTH"})


def format_value(name: str, value: float) -> str:
    """One attributes.csv cell: empty when missing, integers for the integer attributes, else 4 decimals."""
    if value is None or not math.isfinite(value):
        return ""
    if name in _INT_ATTRIBUTES:
        return str(round(value))
    return repr(round(float(value), 4))


def csv_bytes(header: Sequence[str], rows: Sequence[Sequence[str]]) -> bytes:
    """The CSV file of ``header`` and ``rows`` (LF line ends on every OS, so the bytes are reproducible)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def split_subjects(
    subjects: Sequence[str], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[str]]:
    """Split subject ids into training/validation/test by subject (shuffled, deterministic).

    Training always gets at least one subject; with three or more subjects, validation and
    test each get at least one when their fraction is positive.

    Args:
        subjects: subject ids.
        fractions: (training, validation, test) fractions; normalised to sum to 1.
        seed: seed of the shuffle.

    Returns:
        {"training": [...], "validation": [...], "test": [...]}, each sorted.
    """
    fractions = check_fractions(fractions)
    n = len(subjects)
    order = np.random.default_rng([int(seed), n, 7919]).permutation(n)
    n_val = round(fractions[1] * n)
    n_test = round(fractions[2] * n)
    if n >= 3:
        n_val = max(n_val, int(fractions[1] > 0))
        n_test = max(n_test, int(fractions[2] > 0))
    while n_val + n_test > n - 1 and n_val + n_test > 0:  # keep training non-empty
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    n_train = n - n_val - n_test
    picked = [subjects[i] for i in order]
    return {
        "training": sorted(picked[:n_train]),
        "validation": sorted(picked[n_train : n_train + n_val]),
        "test": sorted(picked[n_train + n_val :]),
    }


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """``fractions`` as three non-negative floats summing to 1 (training positive), or ConfigError."""
    try:
        values = tuple(float(x) for x in fractions)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or any(not math.isfinite(x) or x < 0 for x in values) or values[0] <= 0:
        raise ConfigError(
            "split_fractions must be three non-negative numbers (training, validation, test) "
            f"with a positive training fraction, e.g. (0.7, 0.15, 0.15); got {fractions!r}"
        )
    total = sum(values)
    return (values[0] / total, values[1] / total, values[2] / total)
