"""The subject-level attribute table: one row per subject (its ED and ES rows together).

The privacy unit of the attribute stage is one subject, as in the subject-level DP fine-tuning:
a subject's ED and ES rows become one vector of :data:`SUBJECT_COLUMNS`. Attributes that describe
the subject (volumes, wall thicknesses, AGE, SEX, BMI, ANGLE) must agree between the two rows;
DEPTH is kept per phase. EF is not a column (it is derived from the volumes when rows are drawn),
nor is ESED (it is the phase).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.errors import ConfigError, DataError

__all__ = ["SUBJECT_COLUMNS", "PHASE_COLUMNS", "DISCRETE", "SubjectTable", "column_range", "subject_table"]

#: attributes of the subject, identical in its ED and ES rows
SUBJECT_ATTRIBUTES: tuple[str, ...] = (
    "LVEDV",
    "LVESV",
    "RVEDV",
    "RVESV",
    "MYOESTHICK",
    "MYOEDTHICK",
    "AGE",
    "SEX",
    "BMI",
    "ANGLE",
)
#: checked for agreement too, though not modelled (derived from the volumes)
DERIVED_ATTRIBUTES: tuple[str, ...] = ("LVEF", "RVEF")
#: per-phase columns: name -> (attribute, ESED value of the phase)
PHASE_COLUMNS: dict[str, tuple[str, int]] = {"DEPTH_ED": ("DEPTH", 1), "DEPTH_ES": ("DEPTH", 0)}
SUBJECT_COLUMNS: tuple[str, ...] = (*SUBJECT_ATTRIBUTES, *PHASE_COLUMNS)
#: columns with integer values (one histogram bin per value)
DISCRETE: frozenset[str] = frozenset({"SEX", "DEPTH_ED", "DEPTH_ES"})
_INDEX = {name: i for i, name in enumerate(ATTRIBUTE_NAMES)}


def column_range(column: str, ranges: Mapping[str, Sequence[float]]) -> tuple[float, float]:
    """The public reference range of a subject column (``DEPTH_ED`` takes DEPTH's)."""
    attribute = PHASE_COLUMNS.get(column, (column, None))[0]
    if attribute not in ranges:
        raise ConfigError(f"config field 'attribute_ranges': no range for {attribute} (needed by column {column})")
    low, high = (float(v) for v in ranges[attribute])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ConfigError(f"config field 'attribute_ranges.{attribute}': expected [low, high] with low < high")
    return low, high


@dataclass
class SubjectTable:
    """Subject-level values (NaN = missing), one row per subject.

    Attributes:
        columns: the column names (a subset of :data:`SUBJECT_COLUMNS`, in that order).
        values: array (subjects, columns).
        subjects: the subject ids (never released).
        records: volumes (ED and ES rows) behind the subjects.
    """

    columns: tuple[str, ...]
    values: np.ndarray
    subjects: tuple[str, ...]
    records: int

    def __len__(self) -> int:
        return len(self.subjects)


def _agree(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-4)


def subject_table(
    items: Sequence[Mapping], columns: Sequence[str] = SUBJECT_COLUMNS, where: str = "the private cohort"
) -> SubjectTable:
    """Group volume rows into subjects and check them.

    Args:
        items: rows with ``subject`` (id), ``id`` and ``attributes`` (the 14 values in
            ``ATTRIBUTE_NAMES`` order, NaN = missing), as :func:`scripts.data.load_datalist` returns.
        columns: the subject columns to keep.
        where: the data's name, for messages.

    Returns:
        the subject table.

    Raises:
        DataError: a row without a subject id or a phase, a subject with two rows of one phase,
            or a subject whose ED and ES rows disagree on a subject-level attribute.
    """
    unknown = [c for c in columns if c not in SUBJECT_COLUMNS]
    if unknown or not columns:
        raise ConfigError(
            f"config field 'columns': unknown column(s) {unknown}; expected a subset of {SUBJECT_COLUMNS}"
        )
    by_subject: dict[str, dict[int, tuple[str, np.ndarray]]] = {}
    for item in items:
        sid, rid = str(item.get("subject", "")), str(item.get("id", "?"))
        values = np.asarray(item["attributes"], dtype=np.float64)
        if not sid:
            raise DataError(
                f"{where}, row {rid}: no subject id; the attribute stage's privacy unit is one subject, so every row "
                "needs its 'subject'"
            )
        phase = values[_INDEX["ESED"]]
        if phase not in (0.0, 1.0):
            raise DataError(f"{where}, row {rid} (subject {sid}): ESED must be 0 (ES) or 1 (ED), got {phase}")
        rows = by_subject.setdefault(sid, {})
        if int(phase) in rows:
            raise DataError(
                f"{where}: subject {sid} has two {'ED' if phase else 'ES'} rows ({rows[int(phase)][0]}, {rid}); a "
                "subject contributes one ED and one ES row"
            )
        rows[int(phase)] = (rid, values)
    table = np.full((len(by_subject), len(columns)), np.nan)
    for i, (sid, rows) in enumerate(by_subject.items()):
        if len(rows) == 2:
            (ed_id, ed), (es_id, es) = rows[1], rows[0]
            for name in (*SUBJECT_ATTRIBUTES, *DERIVED_ATTRIBUTES):
                a, b = ed[_INDEX[name]], es[_INDEX[name]]
                if not _agree(a, b):
                    raise DataError(
                        f"{where}: subject {sid}: its ED row {ed_id} and ES row {es_id} disagree on the subject-level "
                        f"attribute {name} ({a:g} vs {b:g}); fix the table (both rows of a subject carry the same "
                        "subject-level values)"
                    )
        either = next(iter(rows.values()))[1]
        for j, column in enumerate(columns):
            if column in PHASE_COLUMNS:
                attribute, phase = PHASE_COLUMNS[column]
                table[i, j] = rows[phase][1][_INDEX[attribute]] if phase in rows else np.nan
            else:
                table[i, j] = either[_INDEX[column]]
    return SubjectTable(tuple(columns), table, tuple(by_subject), sum(len(r) for r in by_subject.values()))
