"""The attribute sweep: one attribute varied, the others fixed, the same seed for every value."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scripts.attributes import ATTRIBUTE_NAMES, BINARY_ATTRIBUTES
from scripts.data import check_attribute, check_attribute_names, parse_value
from scripts.errors import ConfigError, DataError, OutputExistsError, check_options
from scripts.files import remove_stale_temp, write_text_atomic
from scripts.synthesis.generator import Synthesizer
from scripts.synthesis.outputs import _batches
from scripts.synthesis.requests import CLIP_HINT, _policy, read_requests
from scripts.visualize import save_sweep_grid
from tqdm import tqdm

logger = logging.getLogger(__name__)


def sweep_values(
    attribute: str,
    values: Sequence[float] | None,
    count: int,
    ranges: Mapping[str, Sequence[float]],
    plausible: Mapping[str, Sequence[float]],
    clip_out_of_range: bool = False,
) -> list[float]:
    """The values of a sweep: the given ones (validated), else ``count`` evenly spaced ones.

    The default spacing covers the attribute's reference range clipped to its plausible
    sub-range (``sweep_ranges``); SEX and ESED sweep [0, 1].

    Returns:
        the values, in raw units.
    """
    if attribute not in ATTRIBUTE_NAMES:
        raise DataError(f"--attribute: unknown attribute {attribute!r}; expected one of {list(ATTRIBUTE_NAMES)}")
    where = "--values"
    if values is not None:
        if isinstance(values, (int, float, str)) or not len(values):
            raise DataError(f'{where}: expected a non-empty list of numbers, e.g. "[100,150,200]", got {values!r}')
        return [
            check_attribute(
                parse_value(v, where, attribute), attribute, where, ranges, _policy(clip_out_of_range), CLIP_HINT
            )[0]
            for v in values
        ]
    if attribute in BINARY_ATTRIBUTES:
        return [0.0, 1.0]
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or int(count) < 1:
        raise ConfigError(f"option --sweep_count: expected an integer >= 1, got {count!r}")
    low, high = (float(r) for r in ranges[attribute])
    if attribute in plausible:
        low, high = max(low, float(plausible[attribute][0])), min(high, float(plausible[attribute][1]))
    return [float(v) for v in np.linspace(low, high, int(count))] if int(count) > 1 else [(low + high) / 2]


def sweep_base(
    defaults: Mapping[str, float],
    base_csv: str | None,
    ranges: Mapping[str, Sequence[float]],
    clip_out_of_range: bool = False,
) -> tuple[np.ndarray, int | None]:
    """The fixed attributes of a sweep: ``defaults``, or the single row of ``base_csv``.

    A base CSV replaces the defaults entirely (absent or blank columns are missing); its
    ``seed`` column, if set, is the sweep's seed.

    Returns:
        (14 raw attributes, NaN = missing; the CSV row's seed or None).
    """
    if base_csv:
        requests = read_requests(base_csv, ranges, clip_out_of_range)
        if len(requests) != 1 or requests[0].count != 1:
            raise DataError(f"{base_csv}: expected exactly one row with count 1 (the fixed attributes of the sweep)")
        return requests[0].values, requests[0].seed
    check_attribute_names(list(defaults), "config field 'sweep_defaults'")
    values = np.full(len(ATTRIBUTE_NAMES), np.nan)
    for i, name in enumerate(ATTRIBUTE_NAMES):
        if defaults.get(name) is not None:
            where = "config field 'sweep_defaults'"
            values[i] = check_attribute(parse_value(defaults[name], where, name), name, where, ranges)[0]
    return values, None


def check_sweep_output(output_dir: str, attribute: str, overwrite: bool = False) -> str:
    """Refuse to replace an existing ``sweep_<attribute>.png`` unless ``overwrite``; returns its path."""
    png = os.path.join(output_dir, f"sweep_{attribute}.png")
    if os.path.exists(png) and not overwrite:
        raise OutputExistsError(f"{png} already exists; choose another --output_dir or pass --overwrite True")
    return png


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep varies and where it writes (``configs/inference.yaml``, ``run sweep``).

    Attributes:
        attribute: the attribute varied, e.g. ``LVEDV``.
        output_dir: folder of ``sweep_<attribute>.png`` and ``.json``.
        defaults: the fixed attributes (``sweep_defaults``), unless ``base_csv`` gives them.
        ranges: attribute reference ranges (``attribute_ranges``).
        plausible: sub-ranges the default values are spread over (``sweep_ranges``).
        values: explicit values, or None for ``count`` evenly spaced ones.
        base_csv: one-row CSV with the fixed attributes (replaces ``defaults``).
        count: number of default values.
        phases: one grid row per ESED value (1 = ED, 0 = ES); empty for one row.
        seed: the seed of every image (a ``base_csv`` seed wins).
        batch_size: volumes generated together.
        clip_out_of_range: clip values outside their range instead of refusing them.
        overwrite: replace an existing sweep picture.
    """

    attribute: str
    output_dir: str
    defaults: Mapping[str, float]
    ranges: Mapping[str, Sequence[float]]
    plausible: Mapping[str, Sequence[float]]
    values: Sequence[float] | None = None
    base_csv: str | None = None
    count: int = 5
    phases: Sequence[int] | None = (1, 0)
    seed: int = 0
    batch_size: int = 4
    clip_out_of_range: bool = False
    overwrite: bool = False

    def check(self) -> SweepPlan:
        """Validate everything the sweep reads or writes before any weights are loaded."""
        check_options(seed=self.seed, batch_size=self.batch_size)
        values = sweep_values(
            self.attribute, self.values, self.count, self.ranges, self.plausible, self.clip_out_of_range
        )
        base, base_seed = sweep_base(self.defaults, self.base_csv, self.ranges, self.clip_out_of_range)
        png = check_sweep_output(self.output_dir, self.attribute, self.overwrite)
        return SweepPlan(values, base, int(self.seed if base_seed is None else base_seed), png)


@dataclass(frozen=True)
class SweepPlan:
    """A checked sweep: its values, the fixed attributes (NaN = missing), the seed and the picture path."""

    values: list[float]
    base: np.ndarray
    seed: int
    png: str


class Sweep:
    """Vary one attribute with the others fixed, same seed for every value; save a PNG grid.

    Rows are the phases in ``settings.phases`` (ESED = 1 ED, 0 ES) unless the swept attribute is
    ESED or ``phases`` is empty (then one row with the base ESED). :meth:`run` writes
    ``sweep_<ATTRIBUTE>.png`` and ``sweep_<ATTRIBUTE>.json`` (values, base attributes, seed,
    provenance).

    Args:
        settings: what to vary and where to write.
        synthesizer: the sampler.
        provenance: copied into the JSON (``scripts.synthesis.make_provenance``).
    """

    def __init__(self, *, settings: SweepSettings, synthesizer: Synthesizer, provenance: Mapping[str, Any]) -> None:
        self.settings, self.synthesizer, self.provenance = settings, synthesizer, provenance

    def _rows(self, base: np.ndarray) -> list[tuple[float | None, str]]:
        phase_index = ATTRIBUTE_NAMES.index("ESED")
        if self.settings.attribute == "ESED" or not self.settings.phases:
            label = "missing" if math.isnan(base[phase_index]) else f"{base[phase_index]:g}"
            return [(None, f"ESED {label}")]
        return [(float(p), {1.0: "ED", 0.0: "ES"}.get(float(p), f"ESED {p}")) for p in self.settings.phases]

    def _conditions(self, plan: SweepPlan, rows: Sequence[tuple[float | None, str]]) -> list[np.ndarray]:
        conditions = []
        for phase, _ in rows:
            for v in plan.values:
                vec = plan.base.copy()
                if phase is not None:
                    vec[ATTRIBUTE_NAMES.index("ESED")] = phase
                vec[ATTRIBUTE_NAMES.index(self.settings.attribute)] = v
                conditions.append(vec)
        return conditions

    def run(self) -> str:
        """Generate the grid and write the picture and its JSON; returns the PNG path."""
        s, synthesizer = self.settings, self.synthesizer
        plan = s.check()
        sidecar = os.path.join(s.output_dir, f"sweep_{s.attribute}.json")
        remove_stale_temp(s.output_dir, [os.path.basename(plan.png), os.path.basename(sidecar)])
        os.makedirs(s.output_dir, exist_ok=True)
        rows = self._rows(plan.base)
        volumes = []
        for batch in tqdm(
            _batches(self._conditions(plan, rows), s.batch_size), desc=f"sweep {s.attribute}", unit="batch"
        ):
            volumes.append(synthesizer(np.stack(batch), [plan.seed] * len(batch)))
        grid = np.concatenate(volumes).reshape(len(rows), len(plan.values), *volumes[0].shape[1:])
        title = (
            f"{s.attribute} sweep, seed {plan.seed}, {synthesizer.sampler} {synthesizer.steps} steps, "
            f"guidance {synthesizer.guidance_scale or 'off'}"
        )
        save_sweep_grid(grid, plan.values, [label for _, label in rows], s.attribute, plan.png, title)
        meta = {
            "attribute": s.attribute,
            "values": plan.values,
            "rows": [label for _, label in rows],
            "base_attributes": {n: (None if math.isnan(v) else float(v)) for n, v in zip(ATTRIBUTE_NAMES, plan.base)},
            "base_csv": s.base_csv,
            "seed": plan.seed,
            "slice": int(grid.shape[2] // 2),
            "image": os.path.basename(plan.png),
            **self.provenance,
            "synthetic": True,
        }
        write_text_atomic(sidecar, json.dumps(meta, indent=2))
        logger.info(f"wrote {plan.png}")
        return plan.png
