"""The closing tables of ``make demo`` and ``make pretrain``: the summary, stage wall times, the demo checks.

The Makefile prints them (``python -m tools.summary demo``, ``times FILE``, ``checks PUBLIC DP``).
"""

from __future__ import annotations


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


def record_time(log: str, stage: str, seconds: float, status: int, started: float) -> None:
    """Append ``stage<TAB>seconds<TAB>exit status<TAB>start time`` to ``log`` (read by :func:`stage_times`).

    Args:
        log: the stage-times file.
        stage: the stage's name.
        seconds: its wall time.
        status: its exit status.
        started: its start (``time.time()``).
    """
    import os

    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    with open(log, "a") as f:  # one short line per append: steps running side by side do not interleave
        f.write(f"{stage}\t{seconds:.1f}\t{status}\t{started:.1f}\n")


def stage_times(log: str = "outputs/demo_times.tsv") -> str:
    """The table of stage wall times recorded by :func:`record_time`: each stage, its share, the wall time.

    Stages that ran beside another (``make demo`` runs some side by side, one core each) overlap,
    so the wall time is from the first start to the last end, not the sum of the stages.
    """
    import os

    if not os.path.isfile(log):
        return f"no stage times in {log}"
    rows = []
    with open(log) as f:
        for line in f:
            stage, seconds, status, started = line.rstrip("\n").split("\t")
            rows.append((stage, float(seconds), int(status), float(started)))
    rows.sort(key=lambda r: r[3])
    total = sum(r[1] for r in rows)
    wall = max(max(r[3] + r[1] for r in rows) - min(r[3] for r in rows), 1e-9)
    width = max(len("sum of the stages"), *(len(r[0]) for r in rows))
    lines = [f"Wall time per stage ({log})"]
    for stage, seconds, status, _ in rows:
        failed = "" if status == 0 else f"  (exit status {status})"
        share = 100 * seconds / wall
        lines.append(f"  {stage:<{width}}  {seconds // 60:2.0f} min {seconds % 60:4.1f} s  {share:5.1f} %{failed}")
    lines.append(f"  {'sum of the stages':<{width}}  {total // 60:2.0f} min {total % 60:4.1f} s")
    lines.append(f"  {'wall time':<{width}}  {wall // 60:2.0f} min {wall % 60:4.1f} s  (share: of the wall time)")
    return "\n".join(lines)


# The demo's acceptance checks: (report, headline key, lowest passing value, label).
# "public" is the pre-trained model without DP, "dp" the model fine-tuned at epsilon = 10.
DEMO_CHECKS = (
    ("public", "lv_found_rate", 0.90, "public model: LV found"),
    ("public", "lvedv_pearson_r", 0.80, "public model: LVEDV r (requested vs measured)"),
    ("dp", "lv_found_rate", 0.80, "DP model: LV found"),
    ("dp", "lvedv_pearson_r", 0.60, "DP model: LVEDV r (aim)"),
    ("dp", "sweep_spearman_rho", 0.90, "DP model: LVEDV sweep Spearman rho"),
    # the classical (non-learned) detector beside the segmenter, autoencoder fidelity on the test split the
    # evaluation reconstructed (the demo: private), single-attribute ladders (docs/evaluation.md)
    ("public", "classical_lv_found_rate", 0.90, "public model: LV found (classical detector)"),
    ("dp", "classical_lv_found_rate", 0.80, "DP model: LV found (classical detector)"),
    ("dp", "recon_psnr_db", 24.0, "reconstruction: median PSNR (dB)"),
    ("dp", "recon_ssim", 0.80, "reconstruction: median SSIM"),
    ("dp", "recon_classical_lv_found", 0.90, "reconstruction: LV found (classical detector)"),
    ("dp", "ladder_lvedv_rho_segmenter", 0.80, "LVEDV alone: Spearman rho (segmenter)"),
    ("dp", "ladder_lvedv_rho_classical", 0.80, "LVEDV alone: Spearman rho (classical detector)"),
    ("dp", "ladder_lvedv_lv_found_segmenter", 0.80, "LVEDV alone: LV found (segmenter)"),
    ("dp", "ladder_lvedv_lv_found_classical", 0.80, "LVEDV alone: LV found (classical detector)"),
    ("dp", "ladder_esed_accuracy_segmenter", 0.90, "ESED alone: ED/ES accuracy (segmenter)"),
    ("dp", "ladder_esed_accuracy_classical", 0.90, "ESED alone: ED/ES accuracy (classical detector)"),
)


def checks(public_report: str = "eval/public/report.json", dp_report: str = "eval/report.json") -> str:
    """The demo's acceptance checks, read from two evaluation reports, one line each with pass/FAIL.

    Args:
        public_report: evaluation report of the public pre-trained model's samples.
        dp_report: evaluation report of the DP model's samples and sweep.

    Returns:
        the table as text (a missing report or number is shown as such, never as a pass).
    """
    import json
    import os

    reports = {}
    for name, path in (("public", public_report), ("dp", dp_report)):
        if os.path.isfile(path):
            with open(path) as f:
                reports[name] = json.load(f).get("headline", {})
    lines = ["Demo checks (evaluation stage)"]
    for name, key, threshold, label in DEMO_CHECKS:
        value = reports.get(name, {}).get(key)
        if value is None:
            lines.append(f"  {label:<50} {'missing':>8}   >= {threshold:g}  FAIL")
            continue
        lines.append(f"  {label:<50} {value:8.3f}   >= {threshold:g}  {'pass' if value >= threshold else 'FAIL'}")
    split = reports.get("dp", {}).get("recon_split")
    if split:
        lines.append(
            f"  reconstruction: the {split} test split" + (" (not covered by epsilon)" if split == "private" else "")
        )
    for name, path in (("public", public_report), ("dp", dp_report)):
        lines.append(f"  {name} report: {path.replace('.json', '.md')}")
    return "\n".join(lines)


if __name__ == "__main__":
    import fire

    fire.Fire({"demo": demo, "times": stage_times, "checks": checks})
