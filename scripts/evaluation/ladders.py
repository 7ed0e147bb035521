"""Single-attribute ladders: does a request that names ONE attribute control what it names?

The demo's requests vary every attribute together, so "LVEDV r" cannot tell control of LVEDV
from control of anything that co-varies with it. A ladder asks for one attribute at several
values with every other cardiac attribute missing, as a user would write the request ("a
65-year-old woman with LVEDV 200 ml"), over several seeds, and measures the result with both
instruments (the segmenter and the classical detector):

- ``LVEDV``: ED volumes at each LVEDV value; Spearman rho of requested vs measured LV volume,
  per seed and pooled; LV found by each instrument.
- ``LVEF``: an ED and an ES volume per value and seed (ESED given, nothing else cardiac); rho of
  requested vs measured EF = (V_ED - V_ES) / V_ED.
- ``ESED``: ED and ES of the same seed with nothing else cardiac; ED/ES accuracy = fraction of
  pairs whose ED member has the larger LV volume.

The LVEDV ladder's images are drawn (``eval_ladder_LVEDV.png``, with both instruments' volumes),
so a reader can see whether the blood pool grows inside a closed ring.

Sampling is the bundle's own (``scripts.synthesis.Synthesizer``), with the sampler, steps,
guidance and weights of the synthetic set under evaluation (its sidecars), so the ladders
measure the model as it was used.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.errors import ConfigError
from scripts.evaluation import plots
from scripts.evaluation.control import correlation
from scripts.evaluation.lv_detector import detect_many

ESED = ATTRIBUTE_NAMES.index("ESED")
INSTRUMENTS = ("segmenter", "classical")


@dataclass(frozen=True, kw_only=True)
class LadderSettings:
    """The evaluation stage's ``ladders`` section.

    Attributes:
        enabled: run the section (needs ``model_path``).
        lvedv: LVEDV values (ml) of the LVEDV ladder (ED); empty skips it.
        lvef: LVEF values (%) of the LVEF ladder (ED + ES); empty skips it.
        seeds: sampling seeds of the LVEDV and LVEF ladders.
        esed_seeds: seeds of the ESED ladder (one ED/ES pair each); empty skips it.
        given: attributes every ladder request also names (the demographics a user gives);
            ``{}`` asks for the one attribute alone.
    """

    enabled: bool = True
    lvedv: Sequence[float] = (80.0, 120.0, 160.0, 200.0, 240.0, 280.0)
    lvef: Sequence[float] = (30.0, 45.0, 60.0, 75.0)
    seeds: Sequence[int] = (0, 1, 2)
    esed_seeds: Sequence[int] = (0, 1, 2, 3, 4, 5)
    given: Mapping[str, float] = field(default_factory=lambda: {"AGE": 65.0, "SEX": 0.0, "BMI": 25.0})

    def __post_init__(self) -> None:
        unknown = [k for k in self.given if k not in ATTRIBUTE_NAMES]
        cardiac = [k for k in self.given if k in ("LVEDV", "LVESV", "LVEF", "ESED")]
        if unknown or cardiac:
            raise ConfigError(
                f"config field 'ladders#given': expected non-cardiac attributes (e.g. AGE, SEX, BMI), got "
                f"{sorted(unknown + cardiac)}"
            )
        for name in ("seeds", "esed_seeds"):
            values = getattr(self, name)
            if isinstance(values, (str, int)) or any(isinstance(s, bool) or int(s) != s or s < 0 for s in values):
                raise ConfigError(f"config field 'ladders#{name}': expected a list of integers >= 0, got {values!r}")
        if self.lvedv and len(self.seeds) == 0 or self.lvef and len(self.seeds) == 0:
            raise ConfigError("config field 'ladders#seeds': expected at least one seed")


def _request(settings: LadderSettings, **values: float) -> np.ndarray:
    vec = np.full(len(ATTRIBUTE_NAMES), math.nan)
    for name, value in {**settings.given, **values}.items():
        vec[ATTRIBUTE_NAMES.index(name)] = float(value)
    return vec


def plan(settings: LadderSettings) -> dict[str, list[tuple[np.ndarray, int]]]:
    """The (request, seed) list of each ladder, in generation order."""
    out: dict[str, list[tuple[np.ndarray, int]]] = {}
    if settings.lvedv:
        out["LVEDV"] = [(_request(settings, LVEDV=v, ESED=1.0), int(s)) for s in settings.seeds for v in settings.lvedv]
    if settings.lvef:
        out["LVEF"] = [
            (_request(settings, LVEF=v, ESED=p), int(s))
            for s in settings.seeds
            for v in settings.lvef
            for p in (1.0, 0.0)
        ]
    if settings.esed_seeds:
        out["ESED"] = [(_request(settings, ESED=p), int(s)) for s in settings.esed_seeds for p in (1.0, 0.0)]
    return out


def _rho(requested: Sequence[float], measured: Sequence[float]) -> float | None:
    return correlation(requested, measured)["spearman_rho"]


def _ladder_stats(name: str, requests, seeds, volumes: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Statistics of one ladder from each instrument's LV volumes (0 where it found none)."""
    col = ATTRIBUTE_NAMES.index(name)
    out: dict[str, Any] = {"attribute": name, "n": len(seeds), "seeds": sorted(set(seeds))}
    for instrument, vol in volumes.items():
        found = np.asarray(vol["found"], dtype=bool)
        v = np.asarray(vol["volume"], dtype=np.float64)
        res: dict[str, Any] = {"lv_found_rate": float(found.mean()) if found.size else None}
        if name == "LVEDV":
            req = np.array([r[col] for r in requests])
            res["values"] = sorted(set(req.tolist()))
            res["measured_ml"] = v.tolist()
            res["spearman_rho_per_seed"] = {
                str(s): _rho(req[np.array(seeds) == s], v[np.array(seeds) == s]) for s in sorted(set(seeds))
            }
            res["spearman_rho_pooled"] = _rho(req, v)
        else:  # pairs: (ED, ES) consecutive
            ed, es = v[0::2], v[1::2]
            res["ed_es_accuracy"] = float(np.mean(ed > es)) if ed.size else None
            if name == "LVEF":
                req = np.array([r[col] for r in requests[0::2]])
                pair_seeds = np.array(seeds[0::2])
                ef = np.where(ed > 0, 100.0 * (ed - es) / np.where(ed > 0, ed, 1.0), np.nan)
                res["measured_ef"] = ef.tolist()
                res["spearman_rho_per_seed"] = {
                    str(s): _rho(req[pair_seeds == s], ef[pair_seeds == s]) for s in sorted(set(seeds))
                }
                res["spearman_rho_pooled"] = _rho(req, ef)
        out[instrument] = res
    per_seed = [r for inst in INSTRUMENTS for r in (out.get(inst, {}).get("spearman_rho_per_seed") or {}).values()]
    if per_seed and any(r is None for r in per_seed):
        out["note"] = "rho is undefined where a seed's measurements are missing"
    return out


def run_ladders(
    settings: LadderSettings,
    synthesize: Callable[[np.ndarray, Sequence[int]], np.ndarray],
    segment_volumes: Callable[[np.ndarray, np.ndarray], list[Mapping[str, float]]],
    spacing: Sequence[float],
    lv_found: Callable[[Mapping[str, float]], bool],
    batch_size: int = 4,
    figures_dir: str | None = None,
) -> dict[str, Any]:
    """Generate and measure every ladder.

    Args:
        settings: the section's settings.
        synthesize: ``(values (B, 14), seeds) -> (B, D, H, W)`` volumes (a ``Synthesizer``).
        segment_volumes: ``(volumes, spacing (B, 3)) -> measurements`` with the segmenter.
        spacing: (sx, sy, sz) of the generated volumes (the synthetic set's).
        lv_found: the segmenter's "LV found" rule (``scripts.evaluation.control.lv_found``).
        batch_size: volumes generated together.
        figures_dir: folder of ``eval_ladder_LVEDV.png`` (the LVEDV ladder's images); None draws none.

    Returns:
        ``{ladder name: statistics}`` with both instruments under ``segmenter`` and ``classical``.
    """
    out: dict[str, Any] = {
        "given": dict(settings.given),
        "method": "each request names one attribute (plus 'given'); measured by the segmenter and by the classical "
        "detector (LV volume 0 where an instrument finds no LV)",
    }
    for name, items in plan(settings).items():
        requests = [r for r, _ in items]
        seeds = [s for _, s in items]
        volumes = np.concatenate(
            [
                synthesize(np.stack(requests[i : i + batch_size]), seeds[i : i + batch_size])
                for i in range(0, len(items), batch_size)
            ]
        )
        sp = np.tile(np.asarray(spacing, dtype=np.float64), (len(volumes), 1))
        measured = segment_volumes(volumes, sp)
        found_seg = [lv_found(m) for m in measured]
        classical = detect_many(volumes, sp)
        per_instrument = {
            "segmenter": {"found": found_seg, "volume": [m["LV_VOLUME"] for m in measured]},
            "classical": {"found": [d.found for d in classical], "volume": [d.volume_ml for d in classical]},
        }
        out[name] = _ladder_stats(name, requests, seeds, per_instrument)
        if figures_dir and name == "LVEDV":  # the only ladder whose images should differ along a row
            col = ATTRIBUTE_NAMES.index(name)
            out[name]["figure"] = plots.ladder(
                volumes,
                [r[col] for r in requests],
                seeds,
                {inst: v["volume"] for inst, v in per_instrument.items()},
                name,
                os.path.join(figures_dir, f"eval_ladder_{name}.png"),
            )
    return out
