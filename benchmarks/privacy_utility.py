"""Privacy-utility benchmark: DP fine-tuning of the public pre-trained LDM vs DP training from scratch.

    python benchmarks/privacy_utility.py [--work outputs/privacy_utility] [--private_subjects 160]
        [--epsilons inf 10 5 1] [--scratch_epsilons 10 inf] [--steps 30] [--logical_batch_size 56]
        [--lr 3e-4] [--pretrained DIR] [--jobs 2] [--reuse]

Every model comes from the bundle's own entry points (``python -m monai.bundle run ...`` with
``--bundle_root WORK``), at the demo's scale and recipe (``configs/demo_*.yaml``):

1. phantom cohorts in ``WORK/data``: the demo's public cohort and a larger private one;
2. public pre-training of the autoencoder and the latent diffusion model (skipped with
   ``--pretrained DIR``, which copies ``DIR/autoencoder.pt`` and ``DIR/diffusion.pt``: they must
   come from the same public cohort, e.g. ``make demo``'s ``models/``); the segmenter of the
   evaluation stage on the public cohort;
3. DP training on the private cohort, every run with the same number of steps, Poisson rate,
   clipping norm, learning rate and optimiser: from the pre-trained model at each epsilon
   (``inf`` = clipping without noise, a non-private baseline), and from a randomly initialised
   network of the same architecture (the public autoencoder is kept: "from scratch" is about the
   diffusion model) at epsilon = 10 and without noise (what the same steps learn from scratch
   at all). All runs train every weight (``finetune_scope all``), so they differ only in their
   starting point and their noise. The pre-trained model itself (no private step; its EMA weights,
   which fine-tuning starts from) is the reference row ``public``;
4. each model samples the same requests (attribute rows of the PUBLIC cohort, ED/ES pairs sharing a
   seed; nothing private) with its raw weights (an EMA over a 30-step run is mostly its starting
   point), and the evaluation stage measures them: ``FD_seg3d`` against the private test split,
   LV-found rate, requested-vs-measured LVEDV r, and the membership-inference AUC of the same
   weights on the private training vs held-out subjects.

Runs go ``--jobs`` at a time, one thread each. Prints the table, writes ``WORK/privacy_utility.json``
and the plot ``WORK/privacy_utility.png`` (``--figure`` to put it elsewhere), and each stage's wall
time. ``--reuse`` keeps the results of steps already completed in WORK (a run is redone only if its
evaluation report is missing). benchmarks/README.md ("Privacy-utility") has the measured table,
the machine and the command.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tools.demo import AUTOENCODER, DIFFUSION, DP, SEGMENTER  # noqa: E402 (the demo recipe's config lists)

BUNDLE = [sys.executable, "-m", "monai.bundle", "run"]
HEADLINE = ("FD_seg3d_real_vs_synthetic", "lv_found_rate", "lvedv_pearson_r", "mia_auc")


class Stages:
    """Runs commands from the repository root and records each one's wall time."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []

    def run(self, name: str, command: list[str], log: Path, env: dict | None = None) -> None:
        """Run ``command`` (output to ``log``); raise with the log's tail if it fails."""
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        with open(log, "w") as f:
            status = subprocess.call(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        self.times.append((name, time.monotonic() - start))
        if status != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{name} failed (exit status {status}); log {log}:\n" + "\n".join(tail))

    def table(self) -> str:
        """Each stage's wall time and the total."""
        total = sum(s for _, s in self.times)
        lines = ["Wall time per stage"] + [f"  {n:<44} {s / 60:6.1f} min" for n, s in self.times]
        return "\n".join(lines + [f"  {'total':<44} {total / 60:6.1f} min"])


def write_requests(attributes_csv: Path, out: Path, volumes: int) -> int:
    """Request CSV from the PUBLIC cohort's attribute rows: ED/ES pairs, one seed per subject.

    Args:
        attributes_csv: ``data/public/attributes.csv`` of the phantom stage.
        out: request CSV to write.
        volumes: number of requests (rounded down to whole subjects).

    Returns:
        the number of requests written.
    """
    from scripts.attributes import ATTRIBUTE_NAMES
    from scripts.files import write_text_atomic

    with open(attributes_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    subjects = list(dict.fromkeys(r["subject"] for r in rows))[: max(1, volumes // 2)]
    columns = [a for a in ATTRIBUTE_NAMES if a in rows[0]]
    lines = [",".join([*columns, "seed"])]
    for r in rows:
        if r["subject"] in subjects:
            lines.append(",".join([*(r[a] for a in columns), str(1000 + subjects.index(r["subject"]))]))
    write_text_atomic(out, "\n".join(lines) + "\n")
    return len(lines) - 1


def scratch_checkpoint(pretrained: Path, out: Path, seed: int = 0) -> None:
    """A diffusion checkpoint with the pre-trained one's architecture and model information, weights re-initialised.

    Args:
        pretrained: ``diffusion.pt`` of the public pre-training.
        out: the "from scratch" starting point to write.
        seed: seed of the initialisation.
    """
    import torch
    from scripts.handlers import atomic_torch_save
    from scripts.networks import ConditionalDiffusionUNet

    ckpt = torch.load(pretrained, map_location="cpu", weights_only=False)
    torch.manual_seed(seed)
    fresh = ConditionalDiffusionUNet(**ckpt["architecture"]).state_dict()
    keep = {k: v for k, v in ckpt.items() if k not in ("network", "ema", "optimizer", "lr_scheduler", "rng")}
    atomic_torch_save({**keep, "network": fresh, "ema": fresh, "initialisation": f"random (seed {seed})"}, str(out))


def run_name(init: str, epsilon: float) -> str:
    """Folder name of one run, e.g. ``pretrained_eps10`` or ``scratch_epsinf``."""
    return f"{init}_eps{'inf' if math.isinf(epsilon) else f'{epsilon:g}'}"


def plot(rows: list[dict], path: Path) -> None:
    """Distance and LVEDV r against epsilon: pre-trained line, from-scratch points, the public model as a level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in rows if r["init"] != "public"]
    finite = [r["epsilon"] for r in trained if not math.isinf(r["epsilon"])]
    x_inf = 2 * max(finite) if finite else 20.0  # epsilon = inf drawn to the right of the largest finite one

    def x(r: dict) -> float:
        return x_inf if math.isinf(r["epsilon"]) else r["epsilon"]

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    for ax, key, label in (
        (axes[0], "FD_seg3d_real_vs_synthetic", "FD_seg3d to the private test split (lower is better)"),
        (axes[1], "lvedv_pearson_r", "LVEDV r, requested vs measured (higher is better)"),
    ):
        for init, style in (("pretrained", "o-"), ("scratch", "s")):
            pts = sorted((x(r), r[key]) for r in trained if r["init"] == init and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), style, label=f"DP training from {init}", markersize=7)
        public = next((r.get(key) for r in rows if r["init"] == "public"), None)
        if public is not None:
            ax.axhline(public, color="tab:green", linestyle="--", label="pre-trained, no private data")
        ref = next((r.get("FD_seg3d_real_vs_real") for r in rows), None)
        if key.startswith("FD") and ref is not None:
            ax.axhline(ref, color="grey", linestyle=":", label="real vs real")
        ax.set_xscale("log")
        ticks = sorted({x(r) for r in trained})
        ax.set_xticks(ticks, ["inf\n(no noise)" if t == x_inf else f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("epsilon (subject-level, delta 1e-5)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    from scripts.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def table(rows: list[dict]) -> str:
    """The result table as text."""
    head = f"{'init':<11} {'epsilon':>7} {'sigma':>6} {'steps':>5} {'FD_seg3d':>9} {'LV found':>9} {'LVEDV r':>8}"
    lines = [head + f" {'MIA AUC':>8}"]
    for r in rows:
        eps = "-" if r["init"] == "public" else "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}"
        lines.append(
            f"{r['init']:<11} {eps:>7} {_cell(r, 'noise_multiplier', '.3f'):>6} {_cell(r, 'steps', 'd'):>5} "
            f"{_cell(r, 'FD_seg3d_real_vs_synthetic', '.3f'):>9} {_cell(r, 'lv_found_rate', '.2f'):>9} "
            f"{_cell(r, 'lvedv_pearson_r', '.2f'):>8} {_cell(r, 'mia_auc', '.2f'):>8}"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="outputs/privacy_utility", help="bundle root of the benchmark's runs")
    parser.add_argument("--public_subjects", type=int, default=40, help="the demo's public cohort")
    parser.add_argument("--private_subjects", type=int, default=160)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[math.inf, 10.0, 5.0, 1.0])
    parser.add_argument("--scratch_epsilons", type=float, nargs="+", default=[10.0, math.inf])
    parser.add_argument("--steps", type=int, default=30, help="DP steps of every run")
    parser.add_argument("--logical_batch_size", type=int, default=56, help="expected subjects per DP step")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--delta", type=float, default=1e-5, help="must be below 1/(private training subjects)")
    parser.add_argument("--requests", type=int, default=32, help="synthetic volumes per model (public attributes)")
    parser.add_argument("--pretrained", default=None, help="folder with autoencoder.pt + diffusion.pt to reuse")
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    parser.add_argument("--reuse", action="store_true", help="keep the results of steps completed in --work")
    parser.add_argument("--figure", default=None, help="plot path (default WORK/privacy_utility.png)")
    return parser


class Benchmark:
    """The benchmark's runs in one bundle root ``work``: shared models first, then one DP run per plan entry."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = (REPO / args.work).resolve()
        self.models, self.logs = self.work / "models", self.work / "logs"
        self.models.mkdir(parents=True, exist_ok=True)
        self.stages = Stages()
        self.root = ["--bundle_root", str(self.work)]
        self.requests = self.work / "requests.csv"
        self.n_requests = 0
        self.epochs = 1
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.jobs > 1 else None

    def done(self, path: Path) -> bool:
        return self.args.reuse and path.is_file()

    def shared(self) -> None:
        """1-2. cohorts, public pre-training, the evaluation's segmenter, the scratch network, the requests."""
        args, models, logs, root = self.args, self.models, self.logs, self.root
        if not self.done(self.work / "data" / "private" / "datalist.json"):
            self.stages.run(
                "phantom cohorts",
                [*BUNDLE, "--config_file", "['configs/common.yaml','configs/phantom.yaml']", *root]
                + ["--public_subjects", str(args.public_subjects), "--private_subjects", str(args.private_subjects)],
                logs / "phantom.log",
            )
        if args.pretrained:
            for name in ("autoencoder.pt", "diffusion.pt"):
                shutil.copyfile(Path(args.pretrained) / name, models / name)
        else:
            if not self.done(models / "autoencoder.pt"):
                self.stages.run(
                    "public pre-training: autoencoder",
                    [*BUNDLE, "training", "--config_file", AUTOENCODER, *root, "--resume", "False"],
                    logs / "autoencoder.log",
                )
            if not self.done(models / "diffusion.pt"):
                self.stages.run(
                    "public pre-training: latent diffusion",
                    [*BUNDLE, "training", "--config_file", DIFFUSION, *root, "--resume", "False"],
                    logs / "diffusion.log",
                )
        if not self.done(models / "segmenter.pt"):
            self.stages.run(
                "segmenter (public)", [*BUNDLE, "training", "--config_file", SEGMENTER, *root], logs / "seg.log"
            )
        scratch_checkpoint(models / "diffusion.pt", models / "scratch.pt")
        self.n_requests = write_requests(self.work / "data" / "public" / "attributes.csv", self.requests, args.requests)

    def one_run(self, init: str, epsilon: float) -> dict:
        """3-4. one DP run (none for ``public``), its synthesis and evaluation; the table row."""
        args, models, logs, root, env = self.args, self.models, self.logs, self.root, self.env
        name = run_name(init, epsilon)
        out = self.work / "runs" / name
        report = out / "eval" / "report.json"
        # "public": the pre-trained model before any private step (its EMA weights, as fine-tuning starts from them)
        model, weights = (models / "diffusion.pt", "ema") if init == "public" else (out / "model.pt", "network")
        if not self.done(report):
            if init != "public":
                eps = ["--target_epsilon", "inf", "--noise_multiplier", "0"] if math.isinf(epsilon) else []
                self.stages.run(
                    f"{name}: DP training",
                    [*BUNDLE, "training", "--config_file", DP, *root, "--resume", "False"]
                    + ["--ckpt_dir", str(out), "--autoencoder_path", str(models / "autoencoder.pt")]
                    + ["--pretrained_path", str(models / ("diffusion.pt" if init == "pretrained" else "scratch.pt"))]
                    + (eps or ["--target_epsilon", str(epsilon)])
                    + ["--target_delta", str(args.delta), "--epochs", str(self.epochs)]
                    + ["--logical_batch_size", str(args.logical_batch_size), "--lr", str(args.lr)]
                    + ["--finetune_scope", "all"],
                    logs / f"{name}_train.log",
                    env,
                )
            self.stages.run(
                f"{name}: synthesis ({self.n_requests} volumes)",
                [*BUNDLE, "inference", "--config_file", "['configs/common.yaml','configs/inference.yaml']", *root]
                + ["--model_path", str(model), "--report_path", str(out / "privacy_report.json")]
                + ["--weights", weights, "--attributes_csv", str(self.requests)]
                + ["--output_dir", str(out / "synthetic"), "--overwrite", "True", "--progress", "False"],
                logs / f"{name}_synthesis.log",
                env,
            )
            self.stages.run(
                f"{name}: evaluation",
                [*BUNDLE, "evaluating", "--config_file", "['configs/common.yaml','configs/evaluate.yaml']", *root]
                + ["--synthetic_dir", str(out / "synthetic"), "--model_path", str(model), "--weights", weights]
                + ["--output_dir", str(out / "eval")],
                logs / f"{name}_evaluation.log",
                env,
            )
        with open(report) as f:
            headline = json.load(f)["headline"]
        stage = {}
        if init != "public":
            with open(out / "privacy_report.json") as f:
                stage = json.load(f)["stages"][-1]
        return {
            "init": init,
            "epsilon": epsilon,
            "noise_multiplier": stage.get("noise_multiplier"),
            "steps": stage.get("steps", 0),
            "sample_rate": stage.get("sample_rate"),
            **{k: headline.get(k) for k in (*HEADLINE, "FD_seg3d_real_vs_real", "lvedv_n", "mia_auc_ci95")},
        }

    def guarded(self, run: tuple[str, float]) -> dict | None:
        """:meth:`one_run`, a failure printed and left out of the table (the other runs go on)."""
        try:
            return self.one_run(*run)
        except RuntimeError as e:
            print(e, flush=True)
            return None


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; prints the table and returns its rows."""
    args = _parser().parse_args(argv)
    bench = Benchmark(args)
    work = bench.work
    bench.shared()

    # 3-4. DP runs, synthesis, evaluation
    with open(work / "data" / "private" / "datalist.json") as f:
        train_subjects = len({it.get("subject") or it["id"] for it in json.load(f)["training"]})
    q = min(1.0, args.logical_batch_size / train_subjects)
    bench.epochs = max(1, round(args.steps / int(1 / q)))  # the ledger plans epochs of int(1/q) steps
    plan = [("public", 0.0)] + [("pretrained", e) for e in args.epsilons]
    plan += [("scratch", e) for e in args.scratch_epsilons]
    # runs side by side, one core each (the small networks gain little from a second thread)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = [r for r in pool.map(bench.guarded, plan) if r is not None]
    if len(rows) < len(plan):
        print(f"{len(plan) - len(rows)} of {len(plan)} runs failed (above); the table has the others")

    print(
        f"\nPrivate cohort: {args.private_subjects} subjects ({train_subjects} training), DP steps {args.steps} "
        f"(q = {q:.3f}, logical batch {args.logical_batch_size} subjects), lr {args.lr}, delta {args.delta:g}, "
        f"{bench.n_requests} synthetic volumes per model (raw weights)"
    )
    print(table(rows))
    ref = rows[0].get("FD_seg3d_real_vs_real")
    if ref is not None:
        print(f"FD_seg3d real vs real (private test vs public training): {ref:.3f}")
    figure = Path(args.figure) if args.figure else work / "privacy_utility.png"
    plot(rows, figure)
    from scripts.files import write_text_atomic

    write_text_atomic(work / "privacy_utility.json", json.dumps(rows, indent=2, default=str))
    print(f"plot: {figure}\nrows: {work / 'privacy_utility.json'}")
    print(bench.stages.table())
    return rows


if __name__ == "__main__":
    main()
