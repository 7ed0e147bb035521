"""The files ``scripts.prepare`` writes besides the volumes: attributes.csv, subjects.csv, datalist, report."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from scripts.attributes import ATTRIBUTE_NAMES
from scripts.cohort import CSV_COLUMNS, SPLITS, SUBJECT_COLUMNS, csv_bytes, format_value
from scripts.files import write_bytes_atomic

__all__ = ["summary_text", "write_index"]


def write_index(
    folder: Path,
    *,
    included: Sequence[Mapping[str, Any]],
    excluded: Sequence[Mapping[str, Any]],
    splits: Mapping[str, Sequence[str]],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """Write attributes.csv, subjects.csv, prepare_report.json and (last) datalist.json into ``folder``.

    Args:
        folder: the cohort folder being written (the staging folder).
        included: one entry per included subject: ``subject``, ``group``, ``attributes``
            ({"ED": {...}, "ES": {...}}), ``files`` ({"ED": (image, label), ...}) and geometry details.
        excluded: ``subject``, ``reason``, ``detail`` per excluded subject.
        splits: subject ids per split.
        settings: the run's settings (format, source, spacing, size, ...).

    Returns:
        the report written to prepare_report.json.
    """
    split_of = {sid: name for name in SPLITS for sid in splits[name]}
    rows, entries = [], {name: [] for name in SPLITS}
    for sub in included:
        sid = sub["subject"]
        for phase in ("ED", "ES"):
            image, label = sub["files"][phase]
            vid = f"{sid}_{phase}"
            rows.append(
                [
                    vid,
                    sid,
                    phase,
                    image,
                    label,
                    *(format_value(n, sub["attributes"][phase][n]) for n in ATTRIBUTE_NAMES),
                ]
            )
            entries[split_of[sid]].append({"id": vid, "subject": sid, "image": image, "label": label})
    write_bytes_atomic(folder / "attributes.csv", csv_bytes(CSV_COLUMNS, rows))
    subject_rows = [[s["subject"], settings["format"], s["group"], split_of[s["subject"]]] for s in included]
    write_bytes_atomic(folder / "subjects.csv", csv_bytes(SUBJECT_COLUMNS, subject_rows))
    reasons: dict[str, int] = {}
    for e in excluded:
        reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    report = {
        "settings": dict(settings),
        "included_subjects": len(included),
        "excluded_subjects": len(excluded),
        "exclusion_reasons": dict(sorted(reasons.items())),
        "splits": {name: len(splits[name]) for name in SPLITS},
        "included": [
            {
                **{k: v for k, v in s.items() if k not in ("attributes", "files")},
                "attributes": {
                    n: _clean(s["attributes"]["ED"][n]) for n in ATTRIBUTE_NAMES if n not in ("ESED", "DEPTH")
                },
                "depth": {ph: _clean(s["attributes"][ph]["DEPTH"]) for ph in ("ED", "ES")},
            }
            for s in included
        ],
        "excluded": list(excluded),
    }
    write_bytes_atomic(folder / "prepare_report.json", (json.dumps(report, indent=2) + "\n").encode())
    datalist = {
        "description": f"{settings['format']} cohort prepared from {settings['source']} (scripts.prepare)",
        "format": settings["format"],
        "seed": settings["seed"],
        "attributes_csv": "attributes.csv",
        **entries,
    }
    write_bytes_atomic(folder / "datalist.json", (json.dumps(datalist, indent=2) + "\n").encode())
    return report


def _clean(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 4)


def summary_text(report: Mapping[str, Any]) -> str:
    """A few lines for the terminal: counts, splits and the exclusions with their reasons."""
    s = report["settings"]
    lines = [
        f"prepared {report['included_subjects']} subjects ({s['format']}, {s['source']} -> {s['out']}); "
        f"excluded {report['excluded_subjects']}; splits {report['splits']}"
    ]
    lines += [f"  excluded {e['subject']}: {e['reason']} ({e['detail']})" for e in report["excluded"]]
    return "\n".join(lines)
