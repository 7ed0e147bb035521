"""The request table of a synthesis run: one row per request, any subset of the attributes.

The request CSV has one row per request: any subset of the 14 attribute columns (blank cell =
missing, masked as in training) plus optional ``count`` (samples for the row, default 1) and
``seed`` (seed of the row's first sample; its k-th sample uses ``seed + k``). Rows without a
seed take ``--seed + n`` where n is the sample's position in the run.

Out-of-range policy: a value outside its reference range (``configs/common.yaml``) is an
error; ``--clip_out_of_range True`` clips it to the range with a warning and records the
requested value. SEX and ESED must be 0 or 1.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.data import check_attribute, parse_value
from scripts.errors import DataError
from scripts.files import refuse_duplicate_columns

REQUEST_COLUMNS = ("count", "seed")
CLIP_HINT = "pass --clip_out_of_range True to clip it"
MAX_SEED = 2**63 - 1


@dataclass
class Request:
    """One row of the request CSV.

    Attributes:
        row: 0-based data row (the header is not counted).
        line: line of the row in the file (the header is line 1).
        values: the 14 attributes in ``ATTRIBUTE_NAMES`` order used for conditioning
            (NaN = missing; clipped values already clipped).
        count: samples to generate for the row.
        seed: seed of the row's first sample, or None (derived from the run seed).
        clipped: ``{name: requested value}`` for values clipped to their reference range.
        source: where the attribute values came from (a CSV line, a DP attribute model's subject).
    """

    row: int
    line: int
    values: np.ndarray
    count: int = 1
    seed: int | None = None
    clipped: dict[str, float] = field(default_factory=dict)
    source: str | None = None

    def attributes(self) -> dict[str, float | None]:
        """``{name: value}`` in raw units, None for missing."""
        return {n: (None if math.isnan(v) else float(v)) for n, v in zip(ATTRIBUTE_NAMES, self.values)}


@dataclass
class SampleSpec:
    """One sample to generate: its request, its index within the row, and its seed."""

    request: Request
    index: int
    seed: int

    @property
    def stem(self) -> str:
        """File name stem: ``row<row>_sample<index>``."""
        return f"row{self.request.row:04d}_sample{self.index:03d}"


def _policy(clip_out_of_range: bool) -> str:
    """The out-of-range policy of :func:`scripts.data.check_attribute` for synthesis requests."""
    return "clip" if clip_out_of_range else "error"


def _parse_int(raw: str | None, where: str, column: str, minimum: int, maximum: int) -> int | None:
    text = (raw or "").strip()
    if text == "":
        return None
    if not re.fullmatch(r"[+]?\d+", text) or not minimum <= int(text) <= maximum:
        raise DataError(
            f"{where}, column '{column}': expected an integer in [{minimum}, {maximum}] or blank, got {raw!r}"
        )
    return int(text)


def read_requests(
    path: str | None, ranges: Mapping[str, Sequence[float]], clip_out_of_range: bool = False
) -> list[Request]:
    """Read and validate a request CSV (see the module docstring for the format).

    Args:
        path: CSV file.
        ranges: attribute reference ranges (``configs/common.yaml``).
        clip_out_of_range: clip values outside their range instead of raising.

    Returns:
        the requests, in file order.

    Raises:
        DataError: naming the file, row/line, column and expected form.
    """
    expected = f"columns: any of {list(ATTRIBUTE_NAMES)}, optionally {list(REQUEST_COLUMNS)}; blank cell = missing"
    if path is None or str(path).strip() in ("", "None"):
        raise DataError(f"no attribute CSV given: pass --attributes_csv FILE ({expected})")
    if not os.path.isfile(path):
        raise DataError(f"{path}: attribute CSV not found ({expected})")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if not any(header):
            raise DataError(f"{path}: empty file or header ({expected})")
        unknown = [h for h in header if h not in ATTRIBUTE_NAMES and h not in REQUEST_COLUMNS]
        if unknown:
            raise DataError(f"{path}, header: unknown column(s) {unknown}; {expected}")
        refuse_duplicate_columns(path, header)
        requests = []
        for cells in reader:
            if not cells:  # blank line (a request with every attribute missing is a line of commas)
                continue
            row, line = len(requests), reader.line_num
            where = f"{path}, row {row} (line {line})"
            if len(cells) > len(header):
                raise DataError(f"{where}: {len(cells)} cells but the header has {len(header)} columns")
            cell = dict(zip(header, cells))
            values = np.full(len(ATTRIBUTE_NAMES), np.nan)
            clipped = {}
            for i, name in enumerate(ATTRIBUTE_NAMES):
                if name not in cell:
                    continue
                value = parse_value(cell[name], where, name)
                values[i], was_clipped = check_attribute(
                    value, name, where, ranges, _policy(clip_out_of_range), CLIP_HINT
                )
                if was_clipped:
                    clipped[name] = value
            count = _parse_int(cell.get("count"), where, "count", 1, 10**6)
            seed = _parse_int(cell.get("seed"), where, "seed", 0, MAX_SEED)
            requests.append(Request(row, line, values, 1 if count is None else count, seed, clipped))
    if not requests:
        raise DataError(f"{path}: no request rows after the header ({expected})")
    return requests


def plan_samples(requests: Sequence[Request], seed: int = 0) -> list[SampleSpec]:
    """Expand requests into samples with their seeds.

    Args:
        requests: parsed requests.
        seed: run seed; sample n of the run (0-based, file order) gets ``seed + n`` unless its
            row gives a seed, whose k-th sample then gets ``row seed + k``.

    Returns:
        one :class:`SampleSpec` per sample, in manifest order.
    """
    samples = []
    for req in requests:
        for k in range(req.count):
            s = req.seed + k if req.seed is not None else int(seed) + len(samples)
            samples.append(SampleSpec(req, k, s))
    return samples
