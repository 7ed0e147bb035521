"""Report files (``report.json``, ``report.md``, written atomically), MLflow logging and the printed headline."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scripts.files import write_text_atomic

logger = logging.getLogger(__name__)


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return str(value)


def privacy_line(report: Mapping[str, Any]) -> str:
    """The report's one line on the guarantee of the weights the samples were drawn from."""
    priv = report.get("privacy")
    if priv:
        # an infinite epsilon (a run without noise) is null in the JSON report
        eps = "inf (steps without noise: no DP guarantee)" if priv["epsilon"] is None else f"{priv['epsilon']:.3g}"
        return f"Model privacy: epsilon = {eps}, delta = {priv['delta']:g}, {priv['privacy_unit']}-level."
    # samples of the public weights carry the public note (no private data behind them), not a warning
    return f"Model privacy: {report.get('privacy_warning') or report.get('privacy_note') or 'unknown'}"


def markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: headline, then every section."""
    h = report["headline"]
    lines = [
        "# Evaluation report",
        "",
        (
            f"Synthetic set: `{report['synthetic_dir']}` ({report['n_synthetic']} volumes, "
            f"size {report['spatial_size']}); "
            f"private cohort `{report['real_datalist']}`; public cohort `{report['public_datalist']}`."
        ),
        "",
        f"**Caveat.** {report['caveat']}",
        "",
    ]
    lines.append(privacy_line(report))
    lines += ["", "## Headline", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in h.items()]
    lines += ["", "## Segmenter (the measuring instrument) on held-out real volumes", ""]
    lines += [
        "| set | n | Dice LV | Dice MYO | Dice RV | mean | volume MAE LV / MYO / RV (ml) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, acc in report["segmenter"]["accuracy"].items():
        d, v = acc["dice"], acc["volume_mae_ml"]
        lines.append(
            f"| {name} | {acc['n']} | {_fmt(d['LV'])} | {_fmt(d['MYO'])} | {_fmt(d['RV'])} | {_fmt(d['mean'])} | "
            f"{_fmt(v['LV'])} / {_fmt(v['MYO'])} / {_fmt(v['RV'])} |"
        )
    lines += _instrument_lines(report)
    lines += [
        "",
        "## Fidelity (Fréchet distance, MMD)",
        "",
        "| features | comparison | sets | n | FD | MMD |",
        "|---|---|---|---|---|---|",
    ]
    for key, comps in report["fidelity"].items():
        for name, c in comps.items():
            lines.append(
                f"| {key} | {name} | {' vs '.join(c['sets'])} | {c['n']} | {_fmt(c[key])} | {_fmt(c['MMD'])} |"
            )
    lines += [
        "",
        "## Diversity (MS-SSIM between random pairs; lower = more diverse)",
        "",
        "| set | n | pairs | mean | std |",
        "|---|---|---|---|---|",
    ]
    for name, d in report["diversity"].items():
        if isinstance(d, Mapping):
            lines.append(f"| {name} | {d['n']} | {d['pairs']} | {_fmt(d['mean'])} | {_fmt(d['std'])} |")
    lines += _controllability_lines(report["controllability"])
    lines += _ladder_lines(report.get("ladders"))
    lines += _sweep_lines(report.get("sweeps", []))
    lines += _audit_lines(report.get("privacy_audit"))
    lines += ["", "## Timings (s)", "", ", ".join(f"{k} {v}" for k, v in report["timings_s"].items())]
    for name, path in (report.get("figures") or {}).items():
        lines += ["", f"![{name}]({os.path.basename(path)})"]
    return "\n".join(lines) + "\n"


def _controllability_lines(c: Mapping[str, Any]) -> list[str]:
    """The controllability section: attributes requested vs measured, phase, the classical detector."""
    lines: list[str] = []
    lines += [
        "",
        "## Controllability (requested vs measured by the segmenter)",
        "",
        f"LV found: {c['lv_found']} / {c['n']} ({_fmt(c['lv_found_rate'])}; {c['lv_found_definition']}).",
        "",
        "| attribute | n | Pearson r | Spearman rho | MAE | note |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in c["attributes"].items():
        lines.append(
            f"| {name} | {s['n']} | {_fmt(s['pearson_r'])} | {_fmt(s['spearman_rho'])} | {_fmt(s['mae'])} "
            f"| {s.get('note', '')} |"
        )
    p = c["phase"]
    lines += [
        "",
        f"ES/ED accuracy: {_fmt(p['accuracy'])} (n = {p['n']}); ED/ES pair accuracy {_fmt(p['pair_accuracy'])} "
        f"({p['pairs']} pairs). Method: {p['method']}.",
    ]
    k = c.get("classical")
    if k:
        lines += [
            "",
            f"Classical detector (no learned parameters): LV found {k['lv_found']} / {k['n']} "
            f"({_fmt(k['lv_found_rate'])}); "
            + "; ".join(
                f"{name} r {_fmt(v['pearson_r'])}, rho {_fmt(v['spearman_rho'])} (n = {v['n']})"
                for name, v in k["attributes"].items()
            )
            + ".",
        ]
    return lines


def _sweep_lines(sweeps: Sequence[Mapping[str, Any]]) -> list[str]:
    """One subsection per attribute sweep."""
    lines: list[str] = []
    for s in sweeps:
        lines += [
            "",
            f"### Sweep {s['attribute']} ({s.get('file', '')})",
            "",
            (
                f"values {_fmt(s['values'])}; measured {_fmt(s.get('measured'))}; "
                f"Spearman rho {_fmt(s.get('spearman_rho'))} (n = {s.get('n')}). {s.get('note', '')}"
            ),
        ]
        if s.get("classical"):
            k = s["classical"]
            lines.append(
                f"Classical detector: LV volume {_fmt(k['lv_volume_ml'])} ml, LV found {_fmt(k['lv_found_rate'])}, "
                f"Spearman rho {_fmt(k['spearman_rho'])}."
            )
    return lines


def _audit_lines(a: Mapping[str, Any] | None) -> list[str]:
    """The empirical privacy audit section (membership inference, memorisation, positive control)."""
    lines: list[str] = []
    lines += ["", "## Privacy audit (empirical; computed on private records, not covered by epsilon)", ""]
    if a:
        m = a["membership_inference"]
        lines += [
            (
                f"Membership inference (loss attack, {m['privacy_unit']} units, {m['members']} members vs "
                f"{m['nonmembers']} non-members): "
                f"AUC {_fmt(m['auc'])} (95 % bootstrap {_fmt(m['auc_ci95'])}), "
                f"TPR at 1 % FPR {_fmt(m['tpr_at_1pct_fpr'])} "
                f"(FPR resolution {_fmt(m['fpr_resolution'])}), best score: {m['best']}."
            ),
            "",
        ]
        for mem in a["memorisation"]:
            lines.append(
                f"- memorisation in {mem['space']}: {mem['near_copies']} near-copies of {mem['n']}; "
                "median distance to training "
                f"{_fmt(mem['distance_to_train_quantiles']['0.5'])}, threshold {_fmt(mem['threshold'])}; "
                f"median ratio train/held-out {_fmt(mem['ratio_quantiles']['0.5'])}."
            )
        ctrl = a.get("positive_control")
        if ctrl:
            lines += [
                "",
                f"Positive control: AUC {_fmt(ctrl['auc'])} ({'flagged' if ctrl['flagged'] else 'NOT flagged'}); "
                f"{ctrl['description']}.",
            ]
    else:
        lines.append("not run (no --model_path).")
    return lines


def _instrument_lines(report: Mapping[str, Any]) -> list[str]:
    """The classical detector beside the segmenter on held-out real volumes, then the reconstruction section."""
    lines = ["", "Classical LV detector on the same volumes (no learned parameters):", ""]
    lines += ["| set | n | LV found | volume r vs labels | volume MAE (ml) |", "|---|---|---|---|---|"]
    for name, d in (report.get("classical_detector") or {}).items():
        lines.append(
            f"| {name} | {d['n']} | {_fmt(d['lv_found_rate'])} | {_fmt(d.get('lv_volume_pearson_r'))} | "
            f"{_fmt(d.get('lv_volume_mae_ml'))} |"
        )
    rec = report.get("reconstruction")
    if not rec:
        return lines
    lines += ["", "## Reconstruction (autoencoder fidelity on a held-out test split)", ""]
    if "skipped" in rec:
        return lines + [f"Skipped: {rec['skipped']}."]
    lines += [
        f"{rec['set']} ({rec['n']} volumes), autoencoder `{rec.get('autoencoder')}`; files listed in "
        f"`{rec['manifest']}`. {rec.get('note', '')}",
        "",
        f"Median PSNR {_fmt(rec['psnr_db_median'])} dB, SSIM {_fmt(rec['ssim_median'])}. {rec['method']}.",
    ]
    if rec.get("contrast"):
        c = rec["contrast"]
        lines.append(
            f"Blood-pool / myocardium contrast: original {_fmt(c['original_median'])}, reconstruction "
            f"{_fmt(c['reconstruction_median'])}, ratio {_fmt(c['ratio_median'])} ({c['definition']})."
        )
    lines += ["", "| instrument | on | LV found | LV volume r vs labels | Dice mean |", "|---|---|---|---|---|"]
    for on in ("originals", "reconstructions"):
        d = rec["classical_detector"][on]
        lines.append(f"| classical | {on} | {_fmt(d['lv_found_rate'])} | {_fmt(d.get('lv_volume_pearson_r'))} | |")
    for on, acc in (rec.get("segmenter") or {}).items():
        lines.append(f"| segmenter | {on} | | {_fmt(acc.get('lv_volume_pearson_r'))} | {_fmt(acc['dice']['mean'])} |")
    return lines


def _ladder_lines(ladders: Mapping[str, Any] | None) -> list[str]:
    """The single-attribute ladders, both instruments."""
    if not ladders:
        return []
    lines = ["", "### Single-attribute ladders", ""]
    if "skipped" in ladders:
        return lines + [f"Skipped: {ladders['skipped']}."]
    lines += [f"{ladders['method']}; given {ladders['given']}; sampler {ladders.get('sampler')}.", ""]
    lines += [
        "| ladder | instrument | LV found | rho pooled | rho per seed | ED/ES accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("LVEDV", "LVEF", "ESED"):
        lad = ladders.get(name)
        if not lad:
            continue
        for inst in ("segmenter", "classical"):
            r = lad[inst]
            lines.append(
                f"| {name} | {inst} | {_fmt(r['lv_found_rate'])} | {_fmt(r.get('spearman_rho_pooled'))} | "
                f"{_fmt(list((r.get('spearman_rho_per_seed') or {}).values()))} | {_fmt(r.get('ed_es_accuracy'))} |"
            )
    return lines


def write_report(report: Mapping[str, Any], output_dir: str, name: str = "report") -> tuple[str, str]:
    """Write ``<name>.json`` and ``<name>.md`` into ``output_dir`` atomically; returns their paths."""
    clean = _clean(report)
    json_path, md_path = os.path.join(output_dir, f"{name}.json"), os.path.join(output_dir, f"{name}.md")
    write_text_atomic(json_path, json.dumps(clean, indent=2) + "\n")
    write_text_atomic(md_path, markdown(clean))
    return json_path, md_path


def flat_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Numeric metrics for MLflow: the headline plus every fidelity / diversity / controllability number."""
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if (
            isinstance(value, (int, float, np.floating, np.integer))
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        ):
            out[key.replace(" ", "_")] = float(value)

    for k, v in report["headline"].items():
        put(f"headline.{k}", v)
    for key, comps in report.get("fidelity", {}).items():
        for name, c in comps.items():
            put(f"{key}.{name}", c[key])
            put(f"MMD_{key}.{name}", c["MMD"])
    for name, d in report.get("diversity", {}).items():
        if isinstance(d, Mapping):
            put(f"ms_ssim.{name}", d["mean"])
    for name, s in (report.get("controllability") or {}).get("attributes", {}).items():
        put(f"control.{name}.pearson_r", s["pearson_r"])
        put(f"control.{name}.mae", s["mae"])
    return out


def log_mlflow(
    report: Mapping[str, Any],
    files: list[str],
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    params: Mapping[str, Any],
) -> str:
    """Log the report's numbers, parameters and files as one MLflow run; returns the run id."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is not None:
        exp_id = exp.experiment_id
    else:  # as MONAI's MLFlowHandler: artifacts of a local SQLite store go to the "mlruns" folder beside it
        location = None
        if str(tracking_uri).startswith("sqlite:///"):
            from pathlib import Path

            from monai.utils import path_to_uri

            location = path_to_uri(Path(str(tracking_uri)[len("sqlite:///") :]).parent / "mlruns")
        exp_id = client.create_experiment(experiment_name, artifact_location=location)
    run = client.create_run(exp_id, run_name=run_name)
    rid = run.info.run_id
    try:
        for k, v in params.items():
            client.log_param(rid, k, str(v)[:500])
        stamp = int(time.time() * 1000)
        for k, v in flat_metrics(report).items():
            client.log_metric(rid, k, v, timestamp=stamp, step=0)
        for path in files:
            if path and os.path.isfile(path):
                client.log_artifact(rid, path)
        client.set_terminated(rid, "FINISHED")
    except Exception:
        client.set_terminated(rid, "FAILED")
        raise
    return rid


def headline_text(report: Mapping[str, Any], json_path: str) -> str:
    """The lines printed at the end of the stage."""
    h = report["headline"]
    return "\n".join(
        [
            "Evaluation",
            f"  fidelity FD_seg3d: real-vs-real {_fmt(h['FD_seg3d_real_vs_real'])}, "
            f"real-vs-synthetic {_fmt(h['FD_seg3d_real_vs_synthetic'])}, "
            f"noise-vs-real {_fmt(h['FD_seg3d_noise_vs_real'])}"
            + (
                f"; FID_inception2d real-vs-synthetic {_fmt(h['FID_inception2d_real_vs_synthetic'])}"
                if h.get("FID_inception2d_real_vs_synthetic") is not None
                else ""
            ),
            (
                f"  controllability: LV found {_fmt(h['lv_found_rate'])}, "
                f"LVEDV Pearson r {_fmt(h['lvedv_pearson_r'])} (n = {h['lvedv_n']}, "
                f"MAE {_fmt(h['lvedv_mae_ml'])} ml), ES/ED accuracy {_fmt(h['phase_accuracy'])}, "
                f"sweep Spearman rho {_fmt(h['sweep_spearman_rho'])}"
            ),
            f"  classical detector: LV found {_fmt(h.get('classical_lv_found_rate'))}, "
            f"LVEDV Pearson r {_fmt(h.get('classical_lvedv_pearson_r'))}",
            f"  reconstruction ({h.get('recon_split') or 'not run'} test): PSNR {_fmt(h.get('recon_psnr_db'))} dB, "
            f"SSIM {_fmt(h.get('recon_ssim'))}, contrast ratio {_fmt(h.get('recon_contrast_ratio'))}, "
            f"classical LV found {_fmt(h.get('recon_classical_lv_found_originals'))} (originals) / "
            f"{_fmt(h.get('recon_classical_lv_found'))}",
            f"  ladders: LVEDV alone rho {_fmt(h.get('ladder_lvedv_rho_segmenter'))} (segmenter) / "
            f"{_fmt(h.get('ladder_lvedv_rho_classical'))} (classical), ESED alone ED/ES accuracy "
            f"{_fmt(h.get('ladder_esed_accuracy_segmenter'))} / {_fmt(h.get('ladder_esed_accuracy_classical'))}",
            f"  segmenter Dice on public test {_fmt(h['segmenter_dice_public_test'])}",
            f"  diversity MS-SSIM: synthetic {_fmt(h['ms_ssim_synthetic'])}, real {_fmt(h['ms_ssim_real'])}",
            f"  privacy audit: MIA AUC {_fmt(h['mia_auc'])} {_fmt(h['mia_auc_ci95'])}, "
            f"TPR@1%FPR {_fmt(h['mia_tpr_at_1pct_fpr'])}, "
            f"near-copies {_fmt(h['near_copies'])}"
            + (
                f", positive control AUC {_fmt(h['positive_control_auc'])}"
                if h.get("positive_control_auc") is not None
                else ""
            )
            + " (empirical lower bound; not covered by epsilon)",
            f"  report: {json_path} (+ report.md, PNG figures) in {report['timings_s']['total']:.0f} s",
        ]
    )
