"""Controllability: does a synthetic volume have the attributes it was asked for?

The segmenter (trained on public data) segments every synthetic volume; the label map is
measured with the same code that made the phantom attributes (``scripts.phantom``: volume =
voxel count x voxel volume from the sidecar's spacing, wall thickness from equivalent radii).
A volume requested at ED (ESED = 1) is compared with the requested LVEDV / RVEDV /
MYOEDTHICK, one at ES with LVESV / RVESV / MYOESTHICK; EF comes from an ED and an ES volume
generated with the same attributes and the same seed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.errors import DataError
from scripts.files import sha256
from scripts.sampling import build_scheduler
from scripts.synthesis import Synthesizer, load_generator

MIN_CORRELATION_SAMPLES = 3
ESED = ATTRIBUTE_NAMES.index("ESED")
# attribute -> (phase it is measured at: 1 ED, 0 ES, None any; measurement key)
MEASURABLE: dict[str, tuple[float | None, str]] = {
    "LVEDV": (1.0, "LV_VOLUME"),
    "LVESV": (0.0, "LV_VOLUME"),
    "RVEDV": (1.0, "RV_VOLUME"),
    "RVESV": (0.0, "RV_VOLUME"),
    "MYOEDTHICK": (1.0, "MYO_THICKNESS"),
    "MYOESTHICK": (0.0, "MYO_THICKNESS"),
    "DEPTH": (None, "DEPTH"),
}
EF_ATTRIBUTES = {"LVEF": "LV_VOLUME", "RVEF": "RV_VOLUME"}
PHASE_METHOD = (
    "phase from the measured LV volume relative to the request: ED if |log(V / LVEDV)| < |log(V / LVESV)| (needs "
    "both requested); pairs: the ED member of an ED/ES pair (same attributes and seed) must have the larger LV volume"
)


def correlation(requested: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """Pearson r, Spearman rho and MAE of requested vs measured values, with the sample count.

    Statistics that cannot be computed are None with a ``note`` that says why (fewer than
    3 samples, or constant values).
    """
    x, y = np.asarray(requested, dtype=np.float64), np.asarray(measured, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    out: dict[str, Any] = {"n": len(x), "pearson_r": None, "spearman_rho": None}
    out["mae"] = float(np.mean(np.abs(x - y))) if len(x) else None
    if len(x) < MIN_CORRELATION_SAMPLES:
        out["note"] = f"needs at least {MIN_CORRELATION_SAMPLES} samples with both values, got {len(x)}"
    elif np.ptp(x) == 0:
        out["note"] = "requested values are constant: no correlation defined"
    elif np.ptp(y) == 0:  # the request varies, the measurement does not: no control at all
        out.update(
            pearson_r=0.0, spearman_rho=0.0, note="measured values are constant (no response to the request): r = 0"
        )
    else:
        out["pearson_r"] = float(stats.pearsonr(x, y)[0])
        out["spearman_rho"] = float(stats.spearmanr(x, y)[0])
    return out


MIN_ENCLOSURE = 0.5


def lv_found(measurement: Mapping[str, float], min_lv_ml: float = 5.0) -> bool:
    """A plausible LV: at least ``min_lv_ml`` of LV blood pool, ringed by myocardium.

    Ringed: at least ``MIN_ENCLOSURE`` of the blood pool's in-plane border is myocardium
    (``LV_ENCLOSED``; real hearts: about 0.9, blobs in a texture: much less).
    """
    enclosed = measurement.get("LV_ENCLOSED", 1.0 if math.isfinite(measurement["MYO_THICKNESS"]) else 0.0)
    return measurement["LV_VOLUME"] >= min_lv_ml and enclosed >= MIN_ENCLOSURE


def ed_es_pairs(attributes: np.ndarray, seeds: Sequence[int | None]) -> list[tuple[int, int]]:
    """(ED index, ES index) of volumes generated with the same attributes (except ESED) and the same seed."""
    groups: dict[tuple, dict[float, int]] = {}
    for i, (values, seed) in enumerate(zip(attributes, seeds)):
        if seed is None or not np.isfinite(values[ESED]):
            continue
        key = (seed, *[None if math.isnan(v) else round(float(v), 6) for k, v in enumerate(values) if k != ESED])
        groups.setdefault(key, {})[float(values[ESED])] = i
    return [(g[1.0], g[0.0]) for g in groups.values() if 1.0 in g and 0.0 in g]


def controllability(
    attributes: np.ndarray,
    seeds: Sequence[int | None],
    measurements: Sequence[Mapping[str, float]],
    min_lv_ml: float = 5.0,
) -> dict[str, Any]:
    """Requested vs measured attributes of a set of volumes.

    Args:
        attributes: (N, 14) requested attributes (NaN = missing).
        seeds: sampling seed per volume (pairs ED/ES by seed), None when unknown.
        measurements: :func:`scripts.evaluation.segmenter.measure` of the segmentations.
        min_lv_ml: smallest LV blood pool counted as "LV found".

    Returns:
        ``{"n", "lv_found_rate", "attributes": {name: correlation}, "phase": {...}, "per_volume": [...]}``.
    """
    n = len(measurements)
    found = [lv_found(m, min_lv_ml) for m in measurements]
    per_attribute: dict[str, Any] = {}
    pairs_by_attribute: dict[str, tuple[list, list]] = {}
    for name, (phase, key) in MEASURABLE.items():
        col = ATTRIBUTE_NAMES.index(name)
        req, mea = [], []
        for values, m in zip(attributes, measurements):
            if math.isnan(values[col]) or (phase is not None and values[ESED] != phase):
                continue
            req.append(float(values[col]))
            mea.append(float(m[key]))
        per_attribute[name] = correlation(req, mea)
        pairs_by_attribute[name] = (req, mea)
    pairs = ed_es_pairs(attributes, seeds)
    for name, key in EF_ATTRIBUTES.items():
        col = ATTRIBUTE_NAMES.index(name)
        req, mea = [], []
        for ed, es in pairs:
            if math.isnan(attributes[ed, col]):
                continue
            v_ed, v_es = measurements[ed][key], measurements[es][key]
            req.append(float(attributes[ed, col]))
            mea.append(100.0 * (v_ed - v_es) / v_ed if v_ed > 0 else math.nan)
        per_attribute[name] = correlation(req, mea)
        pairs_by_attribute[name] = (req, mea)
    # ES/ED accuracy
    lvedv, lvesv = ATTRIBUTE_NAMES.index("LVEDV"), ATTRIBUTE_NAMES.index("LVESV")
    correct = []
    for values, m in zip(attributes, measurements):
        if any(math.isnan(values[c]) for c in (ESED, lvedv, lvesv)) or values[lvedv] <= 0 or values[lvesv] <= 0:
            continue
        v = m["LV_VOLUME"]
        if v <= 0:
            correct.append(False)
            continue
        predicted = 1.0 if abs(math.log(v / values[lvedv])) < abs(math.log(v / values[lvesv])) else 0.0
        correct.append(predicted == values[ESED])
    pair_correct = [measurements[ed]["LV_VOLUME"] > measurements[es]["LV_VOLUME"] for ed, es in pairs]
    phase = {
        "method": PHASE_METHOD,
        "accuracy": float(np.mean(correct)) if correct else None,
        "n": len(correct),
        "pair_accuracy": float(np.mean(pair_correct)) if pair_correct else None,
        "pairs": len(pairs),
    }
    return {
        "n": n,
        "lv_found_rate": float(np.mean(found)) if n else None,
        "lv_found": int(sum(found)),
        "lv_found_definition": f"LV blood pool >= {min_lv_ml:g} ml with >= {MIN_ENCLOSURE:g} of its in-plane border "
        "myocardium",
        "lv_enclosure_median": float(np.median([m.get("LV_ENCLOSED", math.nan) for m in measurements])) if n else None,
        "attributes": per_attribute,
        "phase": phase,
        "scatter": {k: {"requested": v[0], "measured": v[1]} for k, v in pairs_by_attribute.items()},
    }


# ------------------------------------------------------------------------------------------ sweep


def read_sweep(sweep_dir: str) -> list[tuple[str, dict]]:
    """The ``sweep_<ATTRIBUTE>.json`` files of a ``run sweep`` output folder, parsed.

    Returns:
        [(path, content), ...] sorted by name.
    """
    if not sweep_dir or not os.path.isdir(sweep_dir):
        raise DataError(f"--sweep_dir {sweep_dir}: folder not found (expected the --output_dir of `run sweep`)")
    files = sorted(f for f in os.listdir(sweep_dir) if f.startswith("sweep_") and f.endswith(".json"))
    if not files:
        raise DataError(
            f"--sweep_dir {sweep_dir}: no sweep_<ATTRIBUTE>.json (expected the --output_dir of `run sweep`)"
        )
    out = []
    for name in files:
        path = os.path.join(sweep_dir, name)
        try:
            with open(path) as f:
                meta = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        missing = [
            k
            for k in ("attribute", "values", "rows", "base_attributes", "seed", "sampler", "steps", "model")
            if k not in meta
        ]
        if missing:
            raise DataError(f"{path}: missing field(s) {missing} (written by `run sweep`)")
        out.append((path, meta))
    return out


def sweep_conditions(meta: Mapping[str, Any]) -> tuple[np.ndarray, list[float | None]]:
    """The (rows x values, 14) attribute vectors of a sweep, in ``run_sweep``'s order, and each row's phase."""
    base = np.array(
        [
            math.nan if meta["base_attributes"].get(n) is None else float(meta["base_attributes"][n])
            for n in ATTRIBUTE_NAMES
        ]
    )
    phases = [{"ED": 1.0, "ES": 0.0}.get(label) for label in meta["rows"]]
    col = ATTRIBUTE_NAMES.index(meta["attribute"])
    rows = []
    for phase in phases:
        for v in meta["values"]:
            vec = base.copy()
            if phase is not None:
                vec[ESED] = phase
            vec[col] = float(v)
            rows.append(vec)
    return np.stack(rows), phases


def sweep_statistics(
    meta: Mapping[str, Any], phases: Sequence[float | None], measurements: Sequence[Mapping[str, float]]
) -> dict:
    """Measured attribute against the swept value (Spearman rho) for one sweep.

    Args:
        meta: the sweep JSON.
        phases: the phase of each grid row.
        measurements: one per volume, rows x values in order.

    Returns:
        ``{"attribute", "values", "measured": {row label: [...]}, "spearman_rho", "n", ...}``; the
        rho is that of the row whose phase the attribute is measured at (EF: the ED/ES pair).
    """
    attribute, values = meta["attribute"], [float(v) for v in meta["values"]]
    c = len(values)
    grid = [measurements[r * c : (r + 1) * c] for r in range(len(phases))]
    out: dict[str, Any] = {"attribute": attribute, "values": values, "rows": list(meta["rows"]), "seed": meta["seed"]}
    out["lv_volume_ml"] = {label: [m["LV_VOLUME"] for m in row] for label, row in zip(meta["rows"], grid)}
    measured = None
    if attribute in MEASURABLE:
        phase, key = MEASURABLE[attribute]
        out["measured_quantity"] = key
        for p, row in zip(phases, grid):
            if phase is None or p == phase:
                measured = [m[key] for m in row]
                out["measured_row"] = meta["rows"][phases.index(p)]
                break
    elif attribute in EF_ATTRIBUTES and 1.0 in phases and 0.0 in phases:
        key = EF_ATTRIBUTES[attribute]
        ed, es = grid[phases.index(1.0)], grid[phases.index(0.0)]
        measured = [100.0 * (a[key] - b[key]) / a[key] if a[key] > 0 else math.nan for a, b in zip(ed, es)]
        out["measured_quantity"] = f"EF from {key} (ED row, ES row)"
    if measured is None:
        out.update(
            spearman_rho=None,
            n=0,
            note=f"{attribute} is not measurable from a segmentation (or the sweep lacks its phase)",
        )
        return out
    out["measured"] = [float(v) for v in measured]
    stats_ = correlation(values, measured)
    out.update(spearman_rho=stats_["spearman_rho"], pearson_r=stats_["pearson_r"], n=stats_["n"])
    if "note" in stats_:
        out["note"] = stats_["note"]
    return out


def regenerate_sweep(
    meta: Mapping[str, Any],
    path: str,
    model_path: str | None,
    attribute_ranges: Mapping[str, Sequence[float]],
    device: str = "cpu",
    batch_size: int = 4,
    bundle_root: str = ".",
) -> tuple[np.ndarray, list[float | None]]:
    """Re-create the volumes of a sweep (``run sweep`` saves only the PNG and the JSON).

    The sweep JSON records the model file and its SHA-256, the sampler, steps, guidance and
    seed, and sampling is deterministic per seed, so the same volumes come back.

    Args:
        meta: the sweep JSON.
        path: its path (for messages).
        model_path: the model to use (None: the one the JSON names); its SHA-256 must match.
        attribute_ranges: reference ranges (as for sampling).
        device: device.
        batch_size: volumes per batch.
        bundle_root: bundle root for relative paths.

    Returns:
        ((rows x values, D, H, W) volumes, phases of the rows).
    """
    synth = synthesizer_for(meta, path, model_path, attribute_ranges, device, bundle_root)
    conditions, phases = sweep_conditions(meta)
    from tqdm import tqdm

    volumes = [
        synth(conditions[i : i + batch_size], [int(meta["seed"])] * len(conditions[i : i + batch_size]))
        for i in tqdm(
            range(0, len(conditions), batch_size), desc=f"re-generating sweep {meta['attribute']}", unit="batch"
        )
    ]
    return np.concatenate(volumes), phases


def synthesizer_for(
    meta: Mapping[str, Any],
    path: str,
    model_path: str | None,
    attribute_ranges: Mapping[str, Sequence[float]],
    device: str = "cpu",
    bundle_root: str = ".",
):
    """The ``scripts.synthesis.Synthesizer`` a sidecar or sweep JSON records (model, sampler, steps, guidance, weights).

    Args:
        meta: the JSON (``model``, ``sampler``, ``steps``, optional ``model_sha256``, ``autoencoder``,
            ``guidance_scale``, ``weights``).
        path: its path (for messages).
        model_path: the model to use (None: the one the JSON names); its SHA-256 must match.
        attribute_ranges: reference ranges (as for sampling).
        device: device.
        bundle_root: bundle root for relative paths.
    """
    model = model_path or meta["model"]
    if not os.path.isabs(model) and not os.path.isfile(model):
        model = os.path.join(bundle_root, model)
    if meta.get("model_sha256") and os.path.isfile(model) and sha256(model) != meta["model_sha256"]:
        raise DataError(
            f"{path}: it was made with model sha256 {meta['model_sha256'][:16]}..., but {model} differs; "
            "pass --model_path with the file it was made with"
        )
    stored = meta.get("autoencoder")
    if stored and not os.path.isabs(stored) and not os.path.isfile(stored):
        stored = os.path.join(bundle_root, stored)  # the sweep ran from the bundle root
    generator = load_generator(
        model, autoencoder_path=stored, device=device, weights=meta.get("weights", "ema"), bundle_root=bundle_root
    )
    info = generator.info
    steps = None if meta["sampler"] == "ddpm" else int(meta["steps"])
    scheduler = build_scheduler(meta["sampler"], info["scheduler"], steps)
    return Synthesizer(
        generator.autoencoder,
        generator.network,
        scheduler,
        info["latent_shape"],
        attribute_ranges,
        meta.get("guidance_scale"),
        device,
    )
