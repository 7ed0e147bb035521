"""Bad input, as a careless user gives it: every stage's options and files, each case classified.

    python benchmarks/bad_input_cases.py [--jobs 2] [--only SUBSTRING] [--work outputs/benchmarks/bad_input]

Builds a tiny pipeline once (phantom cohorts of 6 + 6 subjects cropped to 8 x 48 x 48, both public
pre-training stages and one DP fine-tuning), then runs each case as its own command, as a user
types it, in its own copy of that bundle root, and sorts what happened:

- ``clear``: non-zero exit, an ``error:`` line naming what the case names, no traceback;
- ``unclear``: non-zero exit and no traceback, but no error line, or one that does not name it;
- ``wrongly accepted``: exit 0 for input that must be refused, or an accepted case whose result
  is wrong (its check failed);
- ``crash``: a Python traceback, or no answer within the case's time limit;
- ``data lost``: a refused case changed or removed a good artefact that was there before it
  (the weights, the privacy report and ledger);
- ``accepted``: exit 0 where it should be, its check passed; ``wrongly refused``: non-zero exit
  for good input.

Prints one row per case that is not ``clear`` or ``accepted``, then the counts per stage and in all.
The tests (``tests/test_bad_input*.py``, ``tests/test_overrides.py``) pin the behaviour case by
case; this script is the count across every stage, recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable

AE = "['configs/common.yaml','configs/train_autoencoder.yaml','configs/small_autoencoder.yaml']"
LDM = "['configs/common.yaml','configs/train_diffusion.yaml','configs/small_diffusion.yaml']"
DP = "['configs/common.yaml','configs/dp_finetune.yaml','configs/small_dp_finetune.yaml']"
DPAE = "['configs/common.yaml','configs/dp_finetune_autoencoder.yaml','configs/small_dp_finetune_autoencoder.yaml']"
SEG = "['configs/common.yaml','configs/train_segmenter.yaml','configs/small_segmenter.yaml']"
INF = "['configs/common.yaml','configs/inference.yaml']"
EVAL = "['configs/common.yaml','configs/evaluate.yaml']"
ATTR = "['configs/common.yaml','configs/dp_attributes.yaml']"
TINY = ("--spatial_size", "[8,48,48]", "--num_workers", "0")
LATENT = ("--latent_shape", "[4,8,12,12]")
DP_TINY = (*TINY, "--logical_batch_size", "2", "--max_physical_batch_size", "2")
BUNDLE = (PY, "-m", "monai.bundle", "run")

# each stage's command on the case's bundle root ({root}); a case appends its options
STAGES: dict[str, tuple[str, ...]] = {
    "autoencoder": (*BUNDLE, "training", "--config_file", AE, "--dataset_dir", "{root}/data/public",
                    "--bundle_root", "{root}", *TINY, "--epochs", "1", "--resume", "False"),
    "diffusion": (*BUNDLE, "training", "--config_file", LDM, "--dataset_dir", "{root}/data/public",
                  "--bundle_root", "{root}", *TINY, *LATENT, "--epochs", "1", "--resume", "False"),
    "dp_finetune": (*BUNDLE, "training", "--config_file", DP, "--dataset_dir", "{root}/data/private",
                    "--bundle_root", "{root}", *DP_TINY, "--epochs", "1", "--resume", "False"),
    "dp_autoencoder": (*BUNDLE, "training", "--config_file", DPAE, "--dataset_dir", "{root}/data/private",
                       "--bundle_root", "{root}", *DP_TINY, "--epochs", "1", "--resume", "False"),
    "segmenter": (*BUNDLE, "training", "--config_file", SEG, "--dataset_dir", "{root}/data/public",
                  "--bundle_root", "{root}", *TINY, "--epochs", "1"),
    "synthesis": (*BUNDLE, "inference", "--config_file", INF, "--attributes_csv", "{root}/requests.csv",
                  "--output_dir", "{root}/synthetic", "--bundle_root", "{root}", "--device", "cpu",
                  "--num_inference_steps", "3"),
    "evaluation": (*BUNDLE, "evaluating", "--config_file", EVAL, "--bundle_root", "{root}"),
    "dp_attributes": (*BUNDLE, "training", "--config_file", ATTR, "--dataset_dir", "{root}/data/private",
                      "--bundle_root", "{root}", "--target_epsilon", "40", "--max_noise_ratio", "5"),
    "phantom": (PY, "-m", "scripts.phantom", "--out", "{root}/new_cohort", "--image_size", "[48,48]",
                "--progress", "False"),
    "prepare": (PY, "-m", "scripts.prepare", "--source", "{root}/data/source_acdc", "--out", "{root}/prepared",
                "--format", "acdc"),
    "privacy": (PY, "-m", "scripts.privacy"),
    "release": (PY, "-m", "scripts.release", "--base_url", "https://example.org/bundle", "--bundle_root", str(REPO),
                "--autoencoder", "{root}/models/autoencoder.pt", "--diffusion", "{root}/models/diffusion.pt",
                "--model", "{root}/models/model.pt"),
}  # fmt: skip
# the good artefacts of the fixture: a refused case must leave each as it was
GUARDED = ("models/autoencoder.pt", "models/diffusion.pt", "models/model.pt", "models/privacy_report.json")
TRACEBACK = "Traceback (most recent call last)"


# ----------------------------------------------------------------------------------- case edits


def write_text(relative: str, text: str) -> Callable[[Path], None]:
    """An edit writing ``text`` to ``root/relative``."""

    def edit(root: Path) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return edit


def edit_csv(relative: str, transform: Callable[[list[list[str]]], None]) -> Callable[[Path], None]:
    """An edit that rewrites the comma-separated table ``root/relative`` in place (rows include the header)."""

    def edit(root: Path) -> None:
        path = root / relative
        rows = [line.split(",") for line in path.read_text().splitlines()]
        transform(rows)
        path.write_text("\n".join(",".join(r) for r in rows) + "\n")

    return edit


def set_column(name: str, value: str) -> Callable[[list[list[str]]], None]:
    def transform(rows: list[list[str]]) -> None:
        i = rows[0].index(name)
        for row in rows[1:3]:
            row[i] = value

    return transform


def duplicate_column(name: str) -> Callable[[list[list[str]]], None]:
    def transform(rows: list[list[str]]) -> None:
        i = rows[0].index(name)
        for row in rows:
            row.append(row[i])

    return transform


def drop_column(name: str) -> Callable[[list[list[str]]], None]:
    def transform(rows: list[list[str]]) -> None:
        i = rows[0].index(name)
        for row in rows:
            del row[i]

    return transform


def training_image(root: Path, cohort: str = "public") -> Path:
    """The first training image of a fixture cohort."""
    datalist = json.loads((root / "data" / cohort / "datalist.json").read_text())
    return root / "data" / cohort / datalist["training"][0]["image"]


def replace_volume(kind: str, cohort: str = "public") -> Callable[[Path], None]:
    """An edit replacing a training volume by a bad one: zeros, constant, nan, complex, 4d, truncated, text."""

    def edit(root: Path) -> None:
        import nibabel as nib
        import numpy as np

        path = training_image(root, cohort)
        if kind in ("truncated", "text"):
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 3] if kind == "truncated" else b"not a volume\n")
            return
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
        if kind == "zeros":
            arr = np.zeros_like(arr)
        elif kind == "nan":
            arr[arr.shape[0] // 2, :, :] = np.nan
        elif kind == "complex":
            arr = arr.astype(np.complex64) + 1j * arr
        elif kind == "4d":
            arr = np.stack([arr, arr], axis=-1)
        nib.save(nib.Nifti1Image(arr, img.affine), str(path))

    return edit


def truncate(relative: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / relative
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return edit


def remove(relative: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / relative
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return edit


def in_report(key: str, value) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / "models" / "privacy_report.json"
        report = json.loads(path.read_text())
        report[key] = value
        path.write_text(json.dumps(report))

    return edit


# ----------------------------------------------------------------------------------- checks of accepted cases


def exists(*relative: str) -> Callable[[Path], bool]:
    return lambda root: all((root / r).exists() for r in relative)


def report_epsilon_at_most(limit: float) -> Callable[[Path], bool]:
    def check(root: Path) -> bool:
        report = json.loads((root / "models" / "privacy_report.json").read_text())
        return report.get("status") == "complete" and report["epsilon"] is not None and report["epsilon"] <= limit

    return check


# ----------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One command a user might type: its stage, extra options, the edit before it and what must happen."""

    stage: str
    name: str
    options: tuple[str, ...] = ()
    refuse: bool = True
    names: str = ""  # a word the error must contain (case-insensitive); "" is any error line
    edit: Callable[[Path], None] | None = None
    check: Callable[[Path], bool] | None = None  # for accepted cases: the result is right
    timeout: int = 300
    base: tuple[str, ...] | None = None  # instead of the stage's command


def option_cases() -> list[Case]:
    """Mistyped, unknown and badly formed options, checked before any data is read."""
    typos = [
        ("autoencoder", "--epoch", "5", "--epochs"),
        ("autoencoder", "--learning_rate", "1e-3", "--learning_rate"),
        ("autoencoder", "--beta_start", "0.1", "--beta_start"),
        ("dp_finetune", "--target_epsilon_", "1", "--target_epsilon"),
        ("dp_finetune", "--noise_multiplyer", "1.0", "--noise_multiplier"),
        ("dp_autoencoder", "--adversarial_weight", "0.01", "adversarial_weight"),
        ("segmenter", "--epoch", "2", "--epochs"),
        ("synthesis", "--guidance", "2", "--guidance"),
        ("evaluation", "--synthetic_dirs", "x", "--synthetic_dir"),
        ("dp_attributes", "--target_epsilon_", "1", "--target_epsilon"),
    ]
    cases = [Case(s, f"unknown option {o}", (o, v), names=n) for s, o, v, n in typos]
    forms = [
        ("autoencoder", "--batch_size", "0"),
        ("autoencoder", "--epochs", "1.5"),
        ("autoencoder", "--epochs", "-1"),
        ("autoencoder", "--kl_weight", "-1"),
        ("autoencoder", "--lr", "0"),
        ("autoencoder", "--lr", "abc"),
        ("autoencoder", "--resume", "false"),
        ("autoencoder", "--adversarial_weight", "-1"),
        ("autoencoder", "--ema_momentum", "2"),
        ("diffusion", "--passes_per_epoch", "0"),
        ("diffusion", "--passes_per_epoch", "1.5"),
        ("diffusion", "--passes_per_epoch", "abc"),
        ("diffusion", "--batch_size", "abc"),
        ("diffusion", "--condition_dropout", "2"),
        ("dp_finetune", "--resume", "false"),
        ("dp_finetune", "--secure_mode", "abc"),
        ("dp_finetune", "--noise_multiplicity", "2.5"),
        ("dp_finetune", "--noise_multiplicity", "0"),
        ("dp_finetune", "--target_epsilon", "0"),
        ("dp_finetune", "--target_epsilon", "-1"),
        ("dp_finetune", "--target_epsilon", "inf"),
        ("dp_finetune", "--target_epsilon", "abc"),
        ("dp_finetune", "--target_delta", "1"),
        ("dp_finetune", "--target_delta", "0"),
        ("dp_finetune", "--max_grad_norm", "0"),
        ("dp_finetune", "--max_grad_norm", "-1"),
        ("dp_finetune", "--noise_multiplier", "-1"),
        ("dp_finetune", "--grad_sample_mode", "foo"),
        ("dp_finetune", "--finetune_scope", "foo"),
        ("dp_finetune", "--privacy_unit", "foo"),
        ("dp_finetune", "--condition_dropout", "2"),
        ("dp_finetune", "--logical_batch_size", "0"),
        ("dp_finetune", "--max_physical_batch_size", "0"),
        ("dp_finetune", "--epochs", "0"),
        ("synthesis", "--clip_out_of_range", "abc"),
        ("synthesis", "--num_inference_steps", "0"),
        ("synthesis", "--guidance_scale", "abc"),
        ("evaluation", "--spacing_tolerance", "-1"),
        ("dp_attributes", "--target_epsilon", "0"),
    ]
    cases += [Case(s, f"{o} {v}", (o, v), names=o.lstrip("-")) for s, o, v in forms]
    cases += [
        Case("dp_finetune", "--noise_multiplier 0.01 (no step fits)", ("--noise_multiplier", "0.01"),
             names="noise_multiplier"),
        Case("autoencoder", "--tracking_uri unreachable", ("--tracking_uri", "http://127.0.0.1:9"),
             names="127.0.0.1:9"),
        Case("synthesis", "--device cuda without a GPU", ("--device", "cuda"), names="cuda"),
        Case("autoencoder", "--ckpt_dir under a file", ("--ckpt_dir", "{root}/requests.csv/models"),
             names="requests.csv"),
    ]  # fmt: skip
    return cases


def data_cases() -> list[Case]:
    """Missing, corrupt and absurd datasets, volumes and attribute tables."""
    pub, priv = "data/public", "data/private"
    cases = [
        Case("autoencoder", "dataset folder missing", edit=remove(pub), names="datalist"),
        Case("autoencoder", "datalist not JSON", edit=write_text(f"{pub}/datalist.json", "{not json"),
             names="datalist.json"),
        Case("autoencoder", "datalist image missing", edit=lambda r: training_image(r).unlink(), names="sub-"),
        Case("dp_finetune", "datalist missing", edit=remove(f"{priv}/datalist.json"), names="datalist"),
    ]  # fmt: skip
    for kind in ("zeros", "nan", "complex", "4d", "truncated", "text"):
        cases.append(Case("autoencoder", f"volume {kind}", edit=replace_volume(kind), names="sub-"))
    cases.append(Case("dp_finetune", "volume complex", edit=replace_volume("complex", "private"), names="sub-"))
    cases.append(Case("dp_finetune", "volume zeros", edit=replace_volume("zeros", "private"), names="sub-"))
    tables = [
        ("diffusion", pub, "LVEDV 1e30", set_column("LVEDV", "1e30"), "LVEDV"),
        ("diffusion", pub, "LVEDV 1e6", set_column("LVEDV", "1e6"), "LVEDV"),
        ("diffusion", pub, "LVEDV abc", set_column("LVEDV", "abc"), "LVEDV"),
        ("diffusion", pub, "SEX 2", set_column("SEX", "2"), "SEX"),
        ("diffusion", pub, "duplicated column", duplicate_column("LVEF"), "LVEF"),
        ("diffusion", pub, "column missing", drop_column("LVEF"), "LVEF"),
        ("dp_finetune", priv, "LVEDV 1e30", set_column("LVEDV", "1e30"), "LVEDV"),
        ("dp_finetune", priv, "duplicated column", duplicate_column("AGE"), "AGE"),
        ("dp_attributes", priv, "LVEDV 1e6", set_column("LVEDV", "1e6"), "LVEDV"),
        ("dp_attributes", priv, "duplicated column", duplicate_column("AGE"), "AGE"),
        ("segmenter", pub, "duplicated column", duplicate_column("AGE"), "AGE"),
    ]
    for stage, cohort, name, transform, word in tables:
        cases.append(
            Case(stage, f"attributes: {name}", edit=edit_csv(f"{cohort}/attributes.csv", transform), names=word)
        )
    return cases


def model_cases() -> list[Case]:
    """Missing, corrupt or mismatched weights, ledgers and reports, and reruns of finished stages."""
    return [
        Case("dp_finetune", "pre-trained diffusion.pt missing", edit=remove("models/diffusion.pt"),
             names="diffusion.pt"),
        Case("dp_finetune", "diffusion.pt truncated", edit=truncate("models/diffusion.pt"), names="diffusion.pt"),
        Case("dp_finetune", "autoencoder.pt truncated", edit=truncate("models/autoencoder.pt"), names="autoencoder.pt"),
        Case("dp_finetune", "ledger corrupt", edit=write_text("models/dp_finetune_ledger.json", "{"), names="ledger"),
        Case("dp_finetune", "rerun of a finished run (resume is the default)", ("--resume", "True"),
             names="already done"),
        Case("dp_finetune", "--resume True --epochs 2 continues within budget", ("--resume", "True", "--epochs", "2"),
             refuse=False, check=report_epsilon_at_most(10.0), timeout=600),
        Case("diffusion", "autoencoder.pt missing", edit=remove("models/autoencoder.pt"), names="autoencoder.pt"),
        Case("synthesis", "model.pt truncated", edit=truncate("models/model.pt"), names="model.pt"),
        Case("synthesis", "model.pt missing", edit=remove("models/model.pt"), names="model.pt"),
        Case("synthesis", "autoencoder.pt not the one trained with", edit=lambda r: shutil.copy(
             r / "models" / "autoencoder_other.pt", r / "models" / "autoencoder.pt"), names="autoencoder"),
        Case("release", "model.pt does not match its report", edit=in_report("model_sha256", "0" * 64),
             options=("--out", "{root}/dist"), names="sha"),
        Case("release", "report missing", edit=remove("models/privacy_report.json"), options=("--out", "{root}/dist"),
             names="privacy_report"),
        Case("release", "--out is a file", options=("--out", "{root}/requests.csv"), names="requests.csv"),
        Case("release", "--model missing", options=("--out", "{root}/dist", "--model", "{root}/models/nope.pt"),
             names="nope.pt"),
    ]  # fmt: skip


def request_cases() -> list[Case]:
    """Synthesis requests: the CSV a user writes."""
    bad = [
        ("duplicated column", "LVEDV,LVEDV,count\n150,150,1\n", "LVEDV"),
        ("unknown column", "LVEDVV,count\n150,1\n", "LVEDVV"),
        ("LVEDV 1e6", "LVEDV,count\n1e6,1\n", "LVEDV"),
        ("LVEF 150", "LVEF,count\n150,1\n", "LVEF"),
        ("SEX 2", "SEX,count\n2,1\n", "SEX"),
        ("count 0", "LVEDV,count\n150,0\n", "count"),
        ("count 1.5", "LVEDV,count\n150,1.5\n", "count"),
        ("seed -1", "LVEDV,seed\n150,-1\n", "seed"),
        ("no rows", "LVEDV,count\n", "requests.csv"),
        ("LVEDV abc", "LVEDV,count\nabc,1\n", "LVEDV"),
        ("LVEDV 500 outside the reference range", "LVEDV,count\n500,1\n", "LVEDV"),
    ]
    cases = [Case("synthesis", f"requests: {n}", edit=write_text("requests.csv", t), names=w) for n, t, w in bad]
    cases += [
        Case("synthesis", "requests file missing", edit=remove("requests.csv"), names="requests.csv"),
        Case("synthesis", "a good partial request",
             edit=write_text("requests.csv", "LVEDV,AGE,count,seed\n150,60,2,1\n"),
             refuse=False, check=exists("synthetic/manifest.csv", "synthetic/row0000_sample001.nii.gz")),
        Case("synthesis", "LVEDV 500 with --clip_out_of_range True", ("--clip_out_of_range", "True"),
             edit=write_text("requests.csv", "LVEDV,count\n500,1\n"), refuse=False,
             check=exists("synthetic/manifest.csv")),
        Case("evaluation", "--synthetic_dir without manifest", ("--synthetic_dir", "{root}/models"),
             names="manifest.csv"),
        Case("evaluation", "--synthetic_dir missing", ("--synthetic_dir", "{root}/nothing"), names="nothing"),
    ]  # fmt: skip
    return cases


def cli_cases() -> list[Case]:
    """The command-line tools: phantom, prepare, the privacy calculator, release."""
    noise = ("noise", "--delta", "1e-5", "--sample_rate", "0.5", "--steps", "2")
    return [
        Case("phantom", "--subject 3 (typo)", ("--subject", "3"), names="--subjects"),
        Case("phantom", "--subjects 0", ("--subjects", "0"), names="subjects"),
        Case("phantom", "--subjects -1", ("--subjects", "-1"), names="subjects"),
        Case("phantom", "--domain foo", ("--domain", "foo"), names="domain"),
        Case("phantom", "--layout foo", ("--layout", "foo"), names="layout"),
        Case("phantom", "--seed -1", ("--seed", "-1"), names="seed"),
        Case("phantom", "--image_size [0,0]", ("--image_size", "[0,0]"), names="image_size"),
        Case("phantom", "--split_fractions [0.5,0.5,0.5] (normalised, as documented)",
             ("--split_fractions", "[0.5,0.5,0.5]", "--subjects", "3"), refuse=False,
             check=exists("new_cohort/datalist.json")),
        Case("phantom", "out exists, no --overwrite", ("--out", "{root}/data/public", "--subjects", "3"),
             names="overwrite"),
        Case("phantom", "3 subjects", ("--subjects", "3"), refuse=False, check=exists("new_cohort/datalist.json")),
        Case("prepare", "source missing", ("--source", "{root}/nothing"), names="nothing"),
        Case("prepare", "--format foo", ("--format", "foo"), names="format"),
        Case("prepare", "--spacing abc", ("--spacing", "abc"), names="spacing"),
        Case("prepare", "--spacing -1", ("--spacing", "-1"), names="spacing"),
        Case("prepare", "--size 0", ("--size", "0"), names="size"),
        Case("prepare", "--split_fractions 1,2", ("--split_fractions", "1,2"), names="split"),
        Case("prepare", "--labels lv=x", ("--labels", "lv=x"), names="labels"),
        Case("prepare", "--demographics missing", ("--demographics", "{root}/nothing.csv"), names="nothing.csv"),
        Case("prepare", "out exists, no --overwrite", ("--out", "{root}/data/public"), names="overwrite"),
        Case("prepare", "a good import", refuse=False, check=exists("prepared/datalist.json")),
        Case("privacy", "noise: target 1e6 answers", ("--target_epsilon", "1e6", *noise[1:]), refuse=False,
             base=(PY, "-m", "scripts.privacy", "noise"), timeout=60),
        Case("privacy", "noise: --delta 2", ("--target_epsilon", "1", "--delta", "2", *noise[3:]), names="delta",
             base=(PY, "-m", "scripts.privacy", "noise")),
        Case("privacy", "noise: --sample_rate 1.5", ("--target_epsilon", "1", "--delta", "1e-5", "--sample_rate", "1.5",
             "--steps", "2"), names="sample_rate", base=(PY, "-m", "scripts.privacy", "noise")),
        Case("privacy", "noise: --steps 0", ("--target_epsilon", "1", *noise[1:5], "--steps", "0"), names="steps",
             base=(PY, "-m", "scripts.privacy", "noise")),
        Case("privacy", "epsilon: --noise_multiplier 0", ("epsilon", "--noise_multiplier", "0", "--delta", "1e-5",
             "--sample_rate", "0.5", "--steps", "2"), names="noise_multiplier"),
        Case("privacy", "unknown subcommand", ("epsilom",), names="epsilom"),
        Case("privacy", "epsilon: a good question", ("epsilon", "--noise_multiplier", "1", "--delta", "1e-5",
             "--sample_rate", "0.5", "--steps", "2"), refuse=False),
        Case("release", "a good release", ("--out", "{root}/dist"), refuse=False,
             check=lambda r: (r / "dist" / "model.pt").is_file() and any((r / "dist").glob("*.zip"))),
    ]  # fmt: skip


def all_cases() -> list[Case]:
    return option_cases() + data_cases() + model_cases() + request_cases() + cli_cases()


# ----------------------------------------------------------------------------------- the fixture


def build_fixture(work: Path) -> Path:
    """The tiny pipeline every case copies: cohorts, both pre-trained models, a DP model and its report."""
    root = work / "fixture"
    if (root / "models" / "privacy_report.json").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    from scripts.phantom import generate_cohort

    for domain, seed in (("public", 0), ("private", 1)):
        generate_cohort(str(root / "data" / domain), subjects=6, domain=domain, seed=seed, progress=False)
    generate_cohort(str(root / "data" / "source_acdc"), subjects=3, domain="public", seed=2, progress=False,
                    layout="acdc")  # fmt: skip
    stages = [
        ("autoencoder", "--epochs", "2"),
        ("diffusion", "--epochs", "2"),
        ("dp_finetune", "--target_epsilon", "10"),
        ("autoencoder", "--seed", "7", "--ckpt_dir", "{root}/other"),  # not the one the models were trained with
    ]
    for stage, *options in stages:
        print(f"fixture: {stage} {' '.join(options)}", flush=True)
        subprocess.run(command(Case(stage, "fixture", tuple(options)), root), cwd=REPO, env=environment(), check=True,
                       capture_output=True)  # fmt: skip
    shutil.copy(root / "other" / "autoencoder.pt", root / "models" / "autoencoder_other.pt")
    (root / "requests.csv").write_text("LVEDV,LVESV,SEX,count,seed\n150,60,1,1,5\n")
    return root


def command(case: Case, root: Path) -> list[str]:
    """The stage's command with the case's options; an option the case gives replaces the stage's own."""
    base = case.base or STAGES[case.stage]
    keys = {w for w in case.options if w.startswith("--")}
    words, i = [], 0
    while i < len(base):
        if base[i] in keys:  # every option of a stage command is a "--key value" pair
            i += 2
            continue
        words.append(base[i])
        i += 1
    return [w.replace("{root}", str(root)) for w in (*words, *case.options)]


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env.pop("CARDIAC_LDM_TRACEBACK", None)
    return env


# ----------------------------------------------------------------------------------- running and sorting


@dataclass
class Outcome:
    case: Case
    kind: str
    seconds: float
    message: str


def digests(root: Path) -> dict[str, str]:
    return {r: hashlib.sha256((root / r).read_bytes()).hexdigest() for r in GUARDED if (root / r).is_file()}


def error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if re.search(r"\berror:", ln, re.IGNORECASE)]
    return lines[-1].strip() if lines else ""


def classify(case: Case, rc: int | None, output: str, lost: bool, checked: bool) -> tuple[str, str]:
    """The outcome kind and the line that decided it."""
    message = error_line(output)
    if rc is None:
        return "crash", "no answer within the time limit"
    if TRACEBACK in output:
        return "crash", output.split(TRACEBACK)[-1].strip().splitlines()[-1][:200]
    if lost:
        return "data lost", message or "a guarded artefact changed"
    if rc == 0:
        if case.refuse:
            return "wrongly accepted", "exit 0"
        return ("accepted", "") if checked else ("wrongly accepted", "exit 0, its check failed")
    last = (output.strip().splitlines() or [""])[-1][:200]
    if not case.refuse:
        return "wrongly refused", message or last
    if message and case.names.lower() in message.lower():
        return "clear", message
    return "unclear", message or last


def run_case(case: Case, fixture: Path, work: Path, index: int) -> Outcome:
    root = work / "cases" / f"{index:03d}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(fixture, root, ignore=shutil.ignore_patterns("other"))
    if case.edit is not None:
        case.edit(root)
    before = digests(root)
    cmd = command(case, root)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=case.timeout)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, output = None, ""
    seconds = time.perf_counter() - start
    after = digests(root)
    lost = case.refuse and any(after.get(k) != v for k, v in before.items())
    checked = case.check is None or (rc == 0 and case.check(root))
    kind, message = classify(case, rc, output, lost, checked)
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / f"{index:03d}.log").write_text(" ".join(cmd) + f"\nexit {rc}\n\n{output}")
    shutil.rmtree(root, ignore_errors=True)
    return Outcome(case, kind, seconds, message)


KINDS = ("clear", "accepted", "unclear", "wrongly accepted", "wrongly refused", "crash", "data lost")


def summarise(outcomes: list[Outcome]) -> None:
    print("\ncases that are not clear errors or correct acceptances:")
    for i, o in enumerate(outcomes):
        if o.kind not in ("clear", "accepted"):
            print(f"  {i:03d} {o.case.stage:14s} {o.case.name:45s} {o.kind:16s} {o.message[:110]}")
    stages = sorted({o.case.stage for o in outcomes})
    print("\n| stage | cases | " + " | ".join(KINDS) + " |")
    print("|---|---|" + "---|" * len(KINDS))
    for stage in [*stages, "all"]:
        mine = [o for o in outcomes if stage in ("all", o.case.stage)]
        counts = Counter(o.kind for o in mine)
        label = f"**{stage}**" if stage == "all" else stage
        print(f"| {label} | {len(mine)} | " + " | ".join(str(counts.get(k, 0)) for k in KINDS) + " |")
    seconds = sorted(o.seconds for o in outcomes)
    print(f"\nmedian seconds per case {seconds[len(seconds) // 2]:.1f}, longest {seconds[-1]:.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(REPO / "outputs" / "benchmarks" / "bad_input"))
    parser.add_argument("--jobs", type=int, default=2, help="cases run side by side (one thread each)")
    parser.add_argument("--only", default="", help="run the cases whose stage or name contains this")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fixture = build_fixture(work)
    cases = [c for c in all_cases() if args.only in c.stage or args.only in c.name]
    print(f"{len(cases)} cases, {args.jobs} at a time; logs in {work / 'logs'}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        outcomes = list(pool.map(lambda ic: run_case(ic[1], fixture, work, ic[0]), enumerate(cases)))
    summarise(outcomes)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
