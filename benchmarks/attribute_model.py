"""Utility of the DP attribute model on the private phantom cohort, against two baselines.

    python benchmarks/attribute_model.py [--subjects 42 1000] [--epsilons 0.5 1 2 5] [--repeats 5]

For each private cohort size n (the private phantom cohort's first n subjects, attributes as the
phantom generator measures them from its label maps), the DP model is fitted at each epsilon (the
attribute stage alone, PRV accountant, delta 1e-5, the stage's defaults otherwise) and compared
with the private table it was fitted on:

- per-column distance: Wasserstein-1 over the observed values divided by the column's public range
  width (total variation for SEX), averaged over the columns; and the missing-rate error;
- column means: mean over columns of |mean - private mean| / range width;
- correlation error: mean absolute difference of the off-diagonal Pearson correlations (pairwise
  complete rows);
- plausible rows: the share of raw draws with ESV < EDV and EF in its reference range (LV and RV).

Baselines: the PUBLIC phantom cohort's own table (no private data; as many subjects as the largest
n) and the same model fitted without noise (noise multiplier 0: no privacy). Every DP setting is
repeated with ``--repeats`` noise seeds (mean and standard deviation reported); each model draws
``--draws`` subjects. Writes ``outputs/benchmarks/attribute_model.{json,md}`` and the plot
``docs/images/attribute_model.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scipy.stats import wasserstein_distance  # noqa: E402
from scripts.attribute_model.mechanism import fit  # noqa: E402
from scripts.attribute_model.model import AttributeModel  # noqa: E402
from scripts.attribute_model.sample import draw_raw, plausible  # noqa: E402
from scripts.attribute_model.table import SUBJECT_COLUMNS, SubjectTable, column_range, subject_table  # noqa: E402


def phantom_table(domain: str, subjects: int, seed: int, cache: Path) -> SubjectTable:
    """The subject table of a phantom cohort (seeds as configs/phantom.yaml: public 0, private 1)."""
    from scripts.phantom import synthesize_subject

    path = cache / f"{domain}_{seed}_{subjects}.npz"
    if path.is_file():
        data = np.load(path)
        return SubjectTable(SUBJECT_COLUMNS, data["values"], tuple(str(i) for i in range(subjects)), 2 * subjects)
    items = []
    for i in range(subjects):
        attrs = synthesize_subject(seed, domain, i)["attributes"]
        for phase in ("ED", "ES"):
            values = np.array(list(attrs[phase].values()), dtype=np.float64)
            items.append({"subject": f"s{i}", "id": f"s{i}_{phase}", "attributes": values})
    table = subject_table(items)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, values=table.values)
    return table


def correlation(values: np.ndarray) -> np.ndarray:
    p = values.shape[1]
    c = np.eye(p)
    for i in range(p):
        for j in range(i + 1, p):
            ok = ~(np.isnan(values[:, i]) | np.isnan(values[:, j]))
            a, b = values[ok, i], values[ok, j]
            r = np.corrcoef(a, b)[0, 1] if ok.sum() > 2 and a.std() > 0 and b.std() > 0 else 0.0
            c[i, j] = c[j, i] = r
    return c


def compare(values: np.ndarray, reference: np.ndarray, ranges) -> dict[str, float]:
    """The utility metrics of ``values`` against the private ``reference`` table."""
    dists, means, missing = [], [], []
    for j, name in enumerate(SUBJECT_COLUMNS):
        low, high = column_range(name, ranges)
        a, b = values[:, j], reference[:, j]
        a, b, miss_a, miss_b = a[~np.isnan(a)], b[~np.isnan(b)], np.isnan(a).mean(), np.isnan(b).mean()
        missing.append(abs(miss_a - miss_b))
        if not len(a) or not len(b):
            dists.append(1.0)
            means.append(1.0)
            continue
        if name == "SEX":
            dists.append(abs(a.mean() - b.mean()))  # total variation of a binary column
        else:
            dists.append(wasserstein_distance(a, b) / (high - low))
        means.append(abs(a.mean() - b.mean()) / (high - low))
    c, r = correlation(values), correlation(reference)
    off = ~np.eye(len(c), dtype=bool)
    return {
        "column_distance": float(np.mean(dists)),
        "mean_error": float(np.mean(means)),
        "missing_error": float(np.mean(missing)),
        "correlation_error": float(np.abs(c - r)[off].mean()),
        "plausible": float(plausible(values, SUBJECT_COLUMNS, ranges).mean()),
    }


def sigma_for(epsilon: float, delta: float) -> float:
    from scripts.privacy.accounting import calibrate_noise

    return calibrate_noise(epsilon, delta, 1.0, 1, "prv")


def model_rows(table: SubjectTable, ranges, sigma: float, seed: int, draws: int) -> np.ndarray:
    release = fit(table, ranges, noise_multiplier=sigma, rng=np.random.default_rng([seed, 0]))
    model = AttributeModel(release.marginals, release.correlation, len(table))
    return draw_raw(model, draws, np.random.default_rng([seed, 1]))


def main(argv=None) -> int:
    import yaml

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[42, 1000])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 2.0, 5.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"))
    parser.add_argument("--plot", default=str(ROOT / "docs" / "images" / "attribute_model.png"))
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the --out JSON")
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads((Path(args.out) / "attribute_model.json").read_text()), args.plot)
        return 0
    ranges = yaml.safe_load((ROOT / "configs" / "common.yaml").read_text())["attribute_ranges"]
    out = Path(args.out)
    start = time.time()
    largest = max(args.subjects)
    private_all = phantom_table("private", largest, 1, out / "tables")
    public = phantom_table("public", largest, 0, out / "tables")
    sigmas = {eps: sigma_for(eps, args.delta) for eps in args.epsilons}
    results = {"settings": vars(args), "sigmas": {str(k): v for k, v in sigmas.items()}, "cohorts": {}}
    for n in args.subjects:
        private = SubjectTable(SUBJECT_COLUMNS, private_all.values[:n], private_all.subjects[:n], 2 * n)
        rows = {"public table": compare(public.values, private.values, ranges)}
        rows["noise-free model"] = compare(model_rows(private, ranges, 0.0, 0, args.draws), private.values, ranges)
        for eps in args.epsilons:
            runs = [
                compare(model_rows(private, ranges, sigmas[eps], r, args.draws), private.values, ranges)
                for r in range(args.repeats)
            ]
            rows[f"DP eps={eps:g}"] = {k: float(np.mean([x[k] for x in runs])) for k in runs[0]} | {
                f"{k}_sd": float(np.std([x[k] for x in runs])) for k in runs[0]
            }
        results["cohorts"][str(n)] = rows
        print(f"n = {n}: done ({time.time() - start:.0f} s)", flush=True)
    results["seconds"] = time.time() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "attribute_model.json").write_text(json.dumps(results, indent=2))
    md = markdown(results)
    (out / "attribute_model.md").write_text(md)
    print(md)
    plot(results, args.plot)
    return 0


def markdown(results) -> str:
    keys = ("column_distance", "mean_error", "correlation_error", "missing_error", "plausible")
    lines = []
    for n, rows in results["cohorts"].items():
        lines += [
            f"n = {n} private subjects",
            "",
            "| model | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for name, m in rows.items():
            cells = [f"{m[k]:.3f} ± {m[k + '_sd']:.3f}" if k + "_sd" in m else f"{m[k]:.3f}" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (("mean_error", "column means error (share of range)"), ("correlation_error", "correlation error"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    eps = [float(e) for e in results["sigmas"]]
    for ax, (key, label) in zip(axes, keys):
        for i, (n, rows) in enumerate(results["cohorts"].items()):
            colour = f"C{i}"
            y = [rows[f"DP eps={e:g}"][key] for e in eps]
            sd = [rows[f"DP eps={e:g}"][key + "_sd"] for e in eps]
            ax.errorbar(eps, y, yerr=sd, marker="o", color=colour, label=f"DP model, n = {n}", capsize=3)
            ax.axhline(rows["public table"][key], color=colour, ls="--", lw=1, label=f"public table (vs n = {n})")
            ax.axhline(rows["noise-free model"][key], color=colour, ls=":", lw=1, label=f"noise-free model, n = {n}")
        ax.set_xscale("log")
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("epsilon (attribute stage alone, delta = 1e-5)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
