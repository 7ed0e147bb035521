"""Plain-text summary tables printed at the end of bundle runs."""

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


def demo(
    report: str = "models/privacy_report.json", synthetic: str = "outputs/demo", sweep: str = "outputs/demo_sweep"
) -> str:
    """The closing summary of ``make demo``: privacy spent, where the outputs are, how to see the runs.

    Args:
        report: the privacy report of models/model.pt.
        synthetic: output folder of the synthesis step.
        sweep: output folder of the attribute sweep.

    Returns:
        the summary text (the command line prints it).
    """
    import glob
    import json
    import os

    with open(report) as f:
        r = json.load(f)
    volumes = sorted(glob.glob(os.path.join(synthetic, "*.nii.gz")))
    lines = [
        "Demo complete",
        (
            f"  privacy: epsilon = {r['epsilon']:.3f}, delta = {r['delta']:g}, {r['privacy_unit']}-level "
            f"({r['accountant']} accountant; report {report})"
        ),
        f"  synthetic volumes: {len(volumes)} NIfTI files + JSON sidecars in {synthetic}/ (manifest.csv)",
        f"  montage: {os.path.join(synthetic, 'preview.png')}",
        f"  attribute sweep: {', '.join(sorted(glob.glob(os.path.join(sweep, '*.png'))))}",
        "  training montages: eval/autoencoder_reconstructions.png, eval/diffusion_samples.png",
        "  MLflow runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///eval/mlruns.db",
    ]
    return "\n".join(lines)


def timed(log: str, stage: str, command: Sequence[str]) -> int:
    """Run ``command``, append ``stage<TAB>seconds<TAB>exit status`` to ``log``; return its exit status.

    ``make demo`` runs every step through this (``python -m scripts.summary timed LOG STAGE CMD...``)
    so that :func:`stage_times` can print each stage's share of the wall time at the end.
    """
    import os
    import subprocess
    import time

    start = time.monotonic()
    status = subprocess.call(list(command))
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    with open(log, "a") as f:
        f.write(f"{stage}\t{time.monotonic() - start:.1f}\t{status}\n")
    return status


def stage_times(log: str = "outputs/demo_times.tsv") -> str:
    """The table of stage wall times recorded by :func:`timed` (each stage, its share, the total)."""
    import os

    if not os.path.isfile(log):
        return f"no stage times in {log}"
    rows = []
    with open(log) as f:
        for line in f:
            stage, seconds, status = line.rstrip("\n").split("\t")
            rows.append((stage, float(seconds), int(status)))
    total = sum(s for _, s, _ in rows) or 1.0
    width = max(len(r[0]) for r in rows)
    lines = [f"Wall time per stage ({log})"]
    for stage, seconds, status in rows:
        failed = "" if status == 0 else f"  (exit status {status})"
        share = 100 * seconds / total
        lines.append(f"  {stage:<{width}}  {seconds // 60:2.0f} min {seconds % 60:4.1f} s  {share:5.1f} %{failed}")
    lines.append(f"  {'total':<{width}}  {total // 60:2.0f} min {total % 60:4.1f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if len(sys.argv) > 3 and sys.argv[1] == "timed":  # not through fire: the command's own --flags stay its own
        sys.exit(timed(sys.argv[2], sys.argv[3], sys.argv[4:]))
    import fire

    fire.Fire({"demo": demo, "times": stage_times})
