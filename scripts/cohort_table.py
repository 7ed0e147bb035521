"""The phantom stage's closing table: the generated cohorts side by side (``configs/phantom.yaml`` prints it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from scripts.attributes import ATTRIBUTE_NAMES, ATTRIBUTE_UNITS


def cohort_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """Side-by-side table of generated cohorts (as returned by ``scripts.phantom.generate_cohort``).

    Args:
        summaries: one summary dict per cohort.

    Returns:
        the table as text.
    """
    width = 24
    head = f"{'':<{width - 2}}" + "".join(f"{s['domain']:>{width}}" for s in summaries)
    lines = ["Phantom cohorts", head]

    def row(label: str, values: Sequence[str]) -> None:
        lines.append(f"{label:<{width - 2}}" + "".join(f"{v:>{width}}" for v in values))

    row("subjects", [str(s["subjects"]) for s in summaries])
    row("volumes (ED + ES)", [str(s["volumes"]) for s in summaries])
    row("train/val/test subj.", ["/".join(str(v) for v in s["splits"].values()) for s in summaries])
    row("groups", [", ".join(f"{k}:{v}" for k, v in s["groups"].items()) for s in summaries])
    lines.append("attribute ranges (min .. max, missing volumes)")
    for name in ATTRIBUTE_NAMES:
        cells = []
        for s in summaries:
            a = s["attributes"][name]
            rng = "-" if a["min"] is None else f"{a['min']:.1f} .. {a['max']:.1f}"
            cells.append(f"{rng}" + (f" ({a['missing']} na)" if a["missing"] else ""))
        unit = "0/1" if "=" in ATTRIBUTE_UNITS[name] else ATTRIBUTE_UNITS[name]
        row(f"  {name} [{unit}]", cells)
    lines.append("files")
    for s in summaries:
        lines.append(f"  {s['domain']}: {s['datalist']}  (attributes: {s['attributes_csv']})")
    return "\n".join(lines)
