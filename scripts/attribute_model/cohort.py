"""Synthesis of a cohort (``configs/inference.yaml``): attribute rows from a CSV or drawn from the DP model.

    python -m monai.bundle run inference --config_file "['configs/common.yaml','configs/inference.yaml']" \\
        --attributes_model models/attributes_dp.json --subjects N --output_dir DIR

draws N subjects (an ED and an ES request each, the same image seed for both) and generates them;
``--attributes_csv FILE`` keeps working. Every request records its source (the manifest's
``source`` column, the sidecars' ``attributes_source``), and the run writes the cohort card.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scripts.errors import ConfigError

__all__ = ["attribute_provenance", "cohort_requests", "write_inference_card"]

DP_NOTE = (
    "Conditioning attributes were drawn from the DP attribute model named in 'attributes_model': post-processing of a "
    "DP release, covered by the cohort's total guarantee (cohort_card.json)."
)


def _given(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("", "None", "null")


def cohort_requests(
    attributes_csv: str | None,
    attributes_model: str | None,
    subjects: int | None,
    seed: int,
    ranges: Mapping[str, Sequence[float]],
    clip_out_of_range: bool = False,
) -> list:
    """The requests of a synthesis run: the CSV's rows, or two rows per subject drawn from the attribute model.

    Args:
        attributes_csv: request CSV (``--attributes_csv``).
        attributes_model: DP attribute model (``--attributes_model``), with ``subjects``.
        subjects: N subjects to draw.
        seed: the run seed: subject k's rows get image seed ``seed + k``; the draw uses ``[seed, 1]``.
        ranges: reference ranges.
        clip_out_of_range: as for CSV rows.
    """
    from scripts.attribute_model.model import read_model
    from scripts.attribute_model.sample import draw_subjects, subject_rows
    from scripts.attributes import ATTRIBUTE_NAMES
    from scripts.synthesis import Request, read_requests

    if _given(attributes_csv) and _given(attributes_model):
        raise ConfigError("pass either --attributes_csv FILE or --attributes_model FILE --subjects N, not both")
    if not _given(attributes_model):
        if _given(subjects):
            raise ConfigError("--subjects needs --attributes_model FILE (a CSV gives its rows and counts itself)")
        requests = read_requests(attributes_csv, ranges, clip_out_of_range)
        for r in requests:
            r.source = f"csv {attributes_csv} line {r.line}"
        return requests
    if not _given(subjects):
        raise ConfigError("--attributes_model needs --subjects N (an integer >= 1: subjects to draw)")
    model = read_model(attributes_model)
    drawn = draw_subjects(model, int(subjects), np.random.default_rng([int(seed), 1]), ranges)
    requests = []
    for i, row in enumerate(subject_rows(model, drawn)):
        values = np.array([row[n] for n in ATTRIBUTE_NAMES], dtype=np.float64)
        subject, phase = divmod(i, 2)
        source = f"dp_attribute_model {os.path.basename(attributes_model)} subject {subject:04d} {('ED', 'ES')[phase]}"
        requests.append(Request(i, 0, values, 1, int(seed) + subject, {}, source))
    return requests


def attribute_provenance(
    provenance: Mapping[str, Any], attributes_model: str | None, attributes_csv: str | None
) -> dict[str, Any]:
    """The sidecars' provenance with the attribute source: the model file and its SHA-256, or the CSV."""
    from scripts.files import sha256

    out = dict(provenance)
    if _given(attributes_model):
        from scripts.attribute_model.model import read_model

        p = read_model(attributes_model).privacy
        out["attributes_model"] = attributes_model
        out["attributes_model_sha256"] = sha256(attributes_model)
        out["attributes_privacy"] = {k: p.get(k) for k in ("epsilon", "epsilon_alone", "delta", "privacy_unit")}
        out["attributes_note"] = DP_NOTE
    elif _given(attributes_csv):
        out["attributes_csv"] = attributes_csv
    return out


def write_inference_card(
    output_dir: str,
    provenance: Mapping[str, Any],
    report_path: str,
    attributes_model: str | None,
    attributes_csv: str | None,
    requests: Sequence,
    seed: int,
    batch_size: int,
) -> str:
    """Write the cohort card of a synthesis run (or a sweep: no requests) into its output folder; returns its path."""
    from scripts.attribute_model.card import build_card, write_card

    sampler = {k: provenance.get(k) for k in ("sampler", "steps", "guidance_scale", "weights")}
    sampler.update(seed=int(seed), batch_size=int(batch_size))
    model = attributes_model if _given(attributes_model) else None
    card = build_card(
        model_path=provenance.get("model"),
        autoencoder_path=provenance.get("autoencoder"),
        report_path=report_path,
        attributes_model=model,
        attributes_csv=attributes_csv if _given(attributes_csv) else None,
        sampler=sampler,
        bundle_version=provenance.get("model_version"),
        samples=sum(r.count for r in requests) if requests else None,  # a sweep passes no requests
        subjects=len(requests) // 2 if model else None,
    )
    path = write_card(output_dir, card)
    eps = card["privacy"]["epsilon"]
    print(f"cohort card {path}: total epsilon {eps if eps is None else f'{eps:.4g}'}, delta {card['privacy']['delta']}")
    return path
