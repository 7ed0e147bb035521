"""Drawing synthetic subjects from a released attribute model (post-processing of the DP model).

A drawn subject becomes two request rows, ED then ES, with the request-CSV columns: the
subject-level values in both, LVEF / RVEF derived from the volumes (100 (EDV - ESV) / EDV),
ESED from the phase and DEPTH per phase.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scripts.attribute_model.mechanism import draw_scores, uniform_scores
from scripts.attribute_model.model import AttributeModel
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.errors import ConfigError
from scripts.files import write_text_atomic

__all__ = ["draw_subjects", "plausible", "subject_rows", "write_rows"]

#: decimals written per attribute (ml and mm to 0.1, EF to 0.1 %, ages to 0.1 year)
DECIMALS = {"SEX": 0, "ESED": 0, "DEPTH": 0}
MAX_TRIES = 100


def draw_raw(model: AttributeModel, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` subject vectors (NaN = missing) in the model's column order, without any filter."""
    u = uniform_scores(draw_scores(model.correlation, count, rng))
    return np.stack([m.quantile(u[:, j]) for j, m in enumerate(model.marginals)], axis=1)


def plausible(values: np.ndarray, columns: Sequence[str], ranges: Mapping[str, Sequence[float]]) -> np.ndarray:
    """Rows whose volumes are physiological: ESV < EDV for LV and RV, and EF within its reference range."""
    ok = np.ones(len(values), bool)
    col = {c: i for i, c in enumerate(columns)}
    for side in ("LV", "RV"):
        if f"{side}EDV" in col and f"{side}ESV" in col:
            edv, esv = values[:, col[f"{side}EDV"]], values[:, col[f"{side}ESV"]]
            both = ~(np.isnan(edv) | np.isnan(esv))
            ef = np.where(both, 100.0 * (edv - np.where(both, esv, 0)) / np.where(both, edv, 1), np.nan)
            low, high = ranges.get(f"{side}EF", (0.0, 100.0))
            ok &= ~both | ((esv < edv) & (ef >= low) & (ef <= high))
    return ok


def draw_subjects(
    model: AttributeModel,
    count: int,
    rng: np.random.Generator,
    ranges: Mapping[str, Sequence[float]],
    plausible_only: bool = True,
) -> np.ndarray:
    """Draw ``count`` subjects; with ``plausible_only`` implausible draws are redrawn (a public rule)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
        raise ConfigError(f"option --subjects: expected an integer >= 1, got {count!r}")
    if not plausible_only:
        return draw_raw(model, count, rng)
    kept: list[np.ndarray] = []
    have = 0
    for _ in range(MAX_TRIES):
        batch = draw_raw(model, max(2 * (count - have), 16), rng)
        batch = batch[plausible(batch, model.columns, ranges)]
        kept.append(batch)
        have += len(batch)
        if have >= count:
            return np.concatenate(kept)[:count]
    raise ConfigError(
        f"the attribute model gave only {have} plausible subjects (ESV < EDV, EF in range) in {MAX_TRIES} rounds; "
        "its noise is too large for this use (fit it with a larger epsilon)"
    )


def _round(name: str, value: float) -> float:
    if math.isnan(value):
        return value
    return float(round(value, DECIMALS.get(name, 1)))


def subject_rows(model: AttributeModel, subjects: np.ndarray) -> list[dict[str, float]]:
    """Two rows (ED, ES) per subject, each ``{attribute: value}`` in ``ATTRIBUTE_NAMES`` order (NaN = missing)."""
    col = {c: i for i, c in enumerate(model.columns)}
    rows = []
    for s in subjects:
        common = {c: _round(c, s[i]) for c, i in col.items() if not c.startswith("DEPTH_")}
        for side in ("LV", "RV"):
            edv, esv = common.get(f"{side}EDV", math.nan), common.get(f"{side}ESV", math.nan)
            common[f"{side}EF"] = (
                _round("EF", 100.0 * (edv - esv) / edv) if edv > 0 and not math.isnan(esv) else math.nan
            )
        for phase, esed in (("ED", 1.0), ("ES", 0.0)):
            depth = s[col[f"DEPTH_{phase}"]] if f"DEPTH_{phase}" in col else math.nan
            values = dict(common, ESED=esed, DEPTH=_round("DEPTH", depth))
            rows.append({n: values.get(n, math.nan) for n in ATTRIBUTE_NAMES})
    return rows


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:g}"


def write_rows(path: str, rows: Sequence[Mapping[str, float]]) -> None:
    """Write rows as a request CSV (blank = missing; a ``subject`` column is not a request column, so none)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ATTRIBUTE_NAMES)
    for row in rows:
        writer.writerow([_fmt(row[n]) for n in ATTRIBUTE_NAMES])
    write_text_atomic(path, buffer.getvalue())
