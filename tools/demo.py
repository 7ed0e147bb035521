"""``make demo``: the pipeline's bundle commands on the embedded phantom data, two cores kept busy.

Each step is one bundle command (``python -m monai.bundle ...``, printed when it starts, so it can
be re-run by hand) in its own process, with its own lock, exit status and, for steps that run beside
another, its own log file. Two things differ from typing the commands one after the other:

* **Started from one process that has imported the libraries.** Starting a bundle command costs
  seconds of CPU before its first line runs, nearly all of it ``import monai`` (MONAI imports every
  submodule and their optional dependencies: torchvision, scipy, mlflow, ...). The demo runs about
  15 commands, so this runner imports them once and forks a child per step (the saving, measured:
  benchmarks/README.md, "make demo"). Nothing has run in the parent but imports, so the children
  start with no OpenMP thread pool and set their own thread count. (``multiprocessing``'s fork
  server does the same for Python functions; a bundle command is a ``__main__`` module, run here
  with ``runpy``.)
* **Two at a time.** A step starts as soon as the steps it needs have finished and its threads fit
  in the cores left (``make -j`` with per-step core counts): the autoencoder and diffusion stages
  use both cores (they run faster on two than on one, and a second job beside the diffusion stage
  slows it), the short steps one each, side by side.

    python -m tools.demo [--public_subjects 40 --private_subjects 40 --times outputs/demo_times.tsv]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tools.summary import record_time

__all__ = ["Step", "config_list", "demo_steps", "main", "prepare_steps", "preload", "pretrain_steps", "run_steps"]


def config_list(*names: str) -> str:
    """The ``--config_file`` value that merges ``configs/common.yaml`` and ``configs/<name>.yaml`` in order."""
    return "[" + ",".join(f"'configs/{name}.yaml'" for name in ("common", *names)) + "]"


# the demo recipe of each stage, merged last (benchmarks/privacy_utility.py uses the same)
AUTOENCODER = config_list("train_autoencoder", "small_autoencoder", "demo_autoencoder")
DIFFUSION = config_list("train_diffusion", "small_diffusion", "demo_diffusion")
DP = config_list("dp_finetune", "small_dp_finetune", "demo_dp_finetune")
SEGMENTER = config_list("train_segmenter", "small_segmenter")
INFERENCE = config_list("inference")
EVALUATE = config_list("evaluate")
# where the phantom writes the dataset-layout cohorts that the prepare steps import into data/public, data/private
SOURCES = {"public": "data/source/acdc", "private": "data/source/ukbb"}
# what the bundle commands import, imported once by the parent (scripts.* are imported by the configs)
PRELOAD = ("monai", "monai.bundle", "monai.bundle.__main__", "fire", "ignite", "mlflow", "nibabel", "opacus")


@dataclass
class Step:
    """One bundle command of the demo.

    Args:
        name: the step's name (progress lines and the times table).
        argv: arguments of ``python -m <module>``.
        needs: names of the steps that must have finished first.
        threads: cores it uses (its torch/OpenMP thread count).
        log: file for its output; None: the terminal.
        module: the module run as ``__main__`` (``python -m module argv...``).
    """

    name: str
    argv: list[str]
    needs: tuple[str, ...] = ()
    threads: int = 1
    log: str | None = None
    module: str = "monai.bundle"


def phantom_step(public_subjects: int, private_subjects: int) -> Step:
    """The phantom cohorts, written as a public ACDC and a private UK Biobank (ukbb_cardiac) dataset."""
    return Step(
        "phantom cohorts",
        ["run", "--config_file", config_list("phantom"), "--public_subjects", str(public_subjects)]
        + ["--private_subjects", str(private_subjects)]
        + ["--public_cohort#num_workers", "2", "--private_cohort#num_workers", "2"]
        + ["--public_dir", SOURCES["public"], "--public_cohort#layout", "acdc"]
        + ["--private_dir", SOURCES["private"], "--private_cohort#layout", "ukbb"],
        threads=2,
    )


def prepare_steps() -> list[Step]:
    """Import the phantom's ACDC and ukbb cohorts with ``configs/prepare.yaml`` (docs/data.md).

    The settings keep the geometry the stages saw when they read the phantom directly: the
    phantom's own in-plane spacing (``--spacing source``: nothing is interpolated) and its
    112-voxel field of view, the box centred on the ED heart (the phantom centres the heart;
    the LV centre would push the RV out of the stages' 64-voxel crop more often).
    """
    common = ["--spacing", "source", "--size", "112", "--centre", "heart"]
    return [
        Step(
            f"prepare: {domain}",
            ["run", "--config_file", config_list("prepare"), "--format", fmt, "--source", SOURCES[domain]]
            + ["--out", f"data/{domain}", "--demographics", f"{SOURCES[domain]}/demographics.csv", *common],
            ("phantom cohorts",),
        )
        for domain, fmt in (("public", "acdc"), ("private", "ukbb"))
    ]


def pretraining_steps() -> list[Step]:
    """The two public pre-training stages of the demo recipe (both cores each, one after the other)."""
    return [
        Step(
            "autoencoder",
            ["run", "training", "--config_file", AUTOENCODER, "--resume", "False"],
            ("prepare: public",),
            threads=2,
        ),
        Step(
            "latent diffusion",
            ["run", "training", "--config_file", DIFFUSION, "--resume", "False"],
            ("autoencoder",),
            threads=2,
        ),
    ]


def pretrain_steps(public_subjects: int = 40, private_subjects: int = 40, out: str = "models/demo") -> list[Step]:
    """``make pretrain``: the cohorts, the two public pre-training stages, then the weights shipped in ``out``.

    Args:
        public_subjects: subjects of the public phantom cohort (the weights' training data).
        private_subjects: subjects of the private phantom cohort (generated alike; not read here).
        out: folder of the shipped weights and their ``PROVENANCE.json`` (``tools.pretrained``).
    """
    phantom = phantom_step(public_subjects, private_subjects)
    prepare = prepare_steps()
    stages = pretraining_steps()
    settings = {
        "seed": 0,
        "data_command": " && ".join("python -m monai.bundle " + _shell(s.argv) for s in (phantom, prepare[0])),
        "data": "the PUBLIC phantom cohort (data/public) only",
        "configs": {"autoencoder": AUTOENCODER, "diffusion": DIFFUSION},
        "stage_commands": {s.name: "python -m monai.bundle " + _shell(s.argv) for s in stages},
        "threads": 2,
    }
    ship = Step(
        "ship pre-trained weights",
        ["ship", "--out", out, "--settings", json.dumps(settings)],
        ("latent diffusion",),
        module="tools.pretrained",
    )
    return [phantom, *prepare, *stages, ship]


def demo_steps(
    public_subjects: int = 40,
    private_subjects: int = 40,
    logs: str = "outputs/demo_logs",
    pretrained: str | None = None,
) -> list[Step]:
    """The demo's steps (recipe: ``configs/demo_*.yaml``; docs/demo_recipe.md).

    Args:
        public_subjects: subjects of the public phantom cohort.
        private_subjects: subjects of the private phantom cohort.
        logs: folder of the logs of the steps that run beside another one.
        pretrained: folder of shipped public pre-trained weights (``make pretrain``), installed after a check of
            their SHA-256 instead of running the two pre-training stages; None: train them here.

    Returns:
        the steps, in the order they are preferred when several could start.
    """

    def log(name: str) -> str:
        return os.path.join(logs, f"{name}.log")

    requests = "configs/demo_requests.csv"
    if pretrained:
        public = [Step("public pre-trained weights", ["install", "--shipped", pretrained], module="tools.pretrained")]
    else:
        public = pretraining_steps()
    weights = public[-1].name  # what the steps on the public weights wait for
    return [
        phantom_step(public_subjects, private_subjects),
        *prepare_steps(),
        *public,
        Step(
            "DP fine-tuning",
            ["run", "training", "--config_file", DP, "--resume", "False"],
            ("prepare: private", weights),
            log=log("dp_finetune"),
        ),
        # the attribute table under the same ledger, then a cohort drawn from it (cohort_card.json: composed total)
        Step(
            "DP attributes",
            ["run", "training", "--config_file", config_list("dp_attributes")],
            ("DP fine-tuning",),
            log=log("dp_attributes"),
        ),
        Step(
            "synthesis: DP cohort",
            ["run", "inference", "--config_file", INFERENCE]
            + ["--attributes_model", "models/attributes_dp.json", "--subjects", "2"]
            + ["--output_dir", "outputs/demo_cohort", "--overwrite", "True", "--progress", "False"],
            ("DP attributes",),
            log=log("cohort_synthesis"),
        ),
        Step(
            "segmenter",
            ["run", "training", "--config_file", SEGMENTER],
            ("prepare: public", weights),  # after the two-core stages
            log=log("segmenter"),
        ),
        Step(
            "synthesis: DP model",
            ["run", "inference", "--config_file", INFERENCE, "--attributes_csv", requests]
            + ["--output_dir", "outputs/demo", "--overwrite", "True", "--progress", "False"],
            ("DP fine-tuning",),
            log=log("synthesis"),
        ),
        Step(
            "synthesis: public model",
            ["run", "inference", "--config_file", INFERENCE, "--model_path", "models/diffusion.pt"]
            + ["--attributes_csv", requests, "--output_dir", "outputs/demo_public", "--overwrite", "True"]
            + ["--progress", "False"],
            (weights,),
            log=log("public_synthesis"),
        ),
        Step(
            "LVEDV sweep: DP model",
            ["run", "sweep", "--config_file", INFERENCE, "--attribute", "LVEDV"]
            + ["--output_dir", "outputs/demo_sweep", "--overwrite", "True"],
            ("DP fine-tuning",),
            log=log("sweep"),
        ),
        # reconstructions of the PRIVATE test split (an evaluation on private data, outside epsilon: docs/evaluation.md)
        Step(
            "evaluation: DP model",
            ["run", "evaluating", "--config_file", EVALUATE, "--synthetic_dir", "outputs/demo"]
            + ["--sweep_dir", "outputs/demo_sweep", "--reconstruction#split", "private"],
            ("synthesis: DP model", "LVEDV sweep: DP model", "segmenter"),
            log=log("evaluation"),
        ),
        Step(
            "evaluation: public model",
            ["run", "evaluating", "--config_file", EVALUATE, "--synthetic_dir", "outputs/demo_public"]
            + ["--model_path", "models/diffusion.pt", "--audit_privacy", "False", "--output_dir", "eval/public"],
            ("synthesis: public model", "segmenter"),
            log=log("public_evaluation"),
        ),
    ]


def preload() -> None:
    """Import what the bundle commands import (MONAI and its dependencies, the ``scripts`` package)."""
    import importlib
    import pkgutil

    import scripts

    for module in PRELOAD:
        importlib.import_module(module)
    for module in pkgutil.walk_packages(scripts.__path__, "scripts."):
        if not module.name.endswith("__main__"):  # a package's __main__ is its command line
            importlib.import_module(module.name)


def _run_child(step: Step) -> None:
    """In the forked child: run the step's module as ``__main__`` and leave with its exit status."""
    code = 1
    try:
        if step.log:
            os.makedirs(os.path.dirname(os.path.abspath(step.log)), exist_ok=True)
            fd = os.open(step.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            # Python-level streams on the new descriptors (the inherited objects may write elsewhere)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (lives until os._exit)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        import torch

        torch.set_num_threads(step.threads)
        os.environ["OMP_NUM_THREADS"] = str(step.threads)  # for processes the step starts
        sys.argv = [f"python -m {step.module}", *step.argv]
        runpy.run_module(step.module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (Exception, KeyboardInterrupt):  # every failure of the step is reported by the excepthook
        sys.excepthook(*sys.exc_info())
    finally:
        atexit._run_exitfuncs()  # what a normal end of the process runs (logging, MLflow)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _shell(argv: Sequence[str]) -> str:
    """The command line as one would type it (a config list in double quotes, as in the docs)."""
    plain = "'" not in "".join(argv) or any(c in a for a in argv for c in '"$`\\')
    return shlex.join(argv) if plain else " ".join(f'"{a}"' if "'" in a else shlex.quote(a) for a in argv)


def _tail(path: str, lines: int = 25) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def run_steps(steps: Sequence[Step], times: str, cores: int = 2) -> int:
    """Run the steps, each in a forked child, as many at once as their threads fit in ``cores``.

    A step starts when every step it needs has finished with status 0 (the first in list order
    among those that fit). After a failure no new step starts; the running ones are waited for.

    Args:
        steps: the steps (names unique; ``needs`` name earlier or later steps of the list).
        times: the stage-times file (``tools.summary.stage_times`` prints it).
        cores: cores to fill.

    Returns:
        0 if every step succeeded, else the first failing step's exit status.
    """
    names = [s.name for s in steps]
    unknown = {n for s in steps for n in s.needs if n not in names}
    if len(set(names)) != len(names) or unknown:
        raise ValueError(f"demo steps: names must be unique and needs must name steps; unknown: {sorted(unknown)}")
    todo, done, running = list(steps), set(), {}  # running: pid -> (step, monotonic start, wall start)
    failed = 0
    while todo or running:
        free = cores - sum(min(step.threads, cores) for step, _, _ in running.values())
        startable = [] if failed else [s for s in todo if set(s.needs) <= done]
        for step in startable:
            # a step wider than the machine runs alone
            if min(step.threads, cores) > free:
                continue
            where = f" (output in {step.log})" if step.log else ""
            print(f"== {step.name}{where}: python -m {step.module} {_shell(step.argv)}", flush=True)
            sys.stderr.flush()  # nothing buffered is written twice (by the parent and the child)
            pid = os.fork()
            if pid == 0:
                _run_child(step)
            running[pid] = (step, time.monotonic(), time.time())
            todo.remove(step)
            free -= min(step.threads, cores)
        if not running:
            if not failed:  # nothing runs, nothing failed, yet steps are left: their needs form a cycle
                raise ValueError(f"demo steps: the needs of {[s.name for s in todo]} can never all be met")
            break  # a failure stopped the rest
        pid, status = os.wait()
        step, start, started = running.pop(pid)
        seconds, status = time.monotonic() - start, os.waitstatus_to_exitcode(status)
        record_time(times, step.name, seconds, status, started)
        if status == 0:
            done.add(step.name)
            print(f"-- {step.name}: done in {seconds:.0f} s", flush=True)
            continue
        failed = failed or status
        print(f"-- {step.name}: FAILED (exit status {status})", flush=True)
        if step.log and os.path.isfile(step.log):
            print(f"   end of {step.log}:\n{_tail(step.log)}", flush=True)
    if todo and failed:
        print(f"not run after the failure: {', '.join(s.name for s in todo)}", flush=True)
    return failed if failed > 0 else (1 if failed else 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``make demo``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--public_subjects", type=int, default=40)
    parser.add_argument("--private_subjects", type=int, default=40)
    parser.add_argument("--times", default="outputs/demo_times.tsv", help="stage-times file (replaced)")
    parser.add_argument("--logs", default="outputs/demo_logs", help="logs of the steps run beside another")
    parser.add_argument(
        "--pretrained",
        default="models/demo",
        help="shipped public pre-trained weights to start from ('' trains them here: DEMO_PRETRAIN=1 make demo)",
    )
    parser.add_argument("--pretrain_only", action="store_true", help="make pretrain: train and ship into --pretrained")
    args = parser.parse_args(argv)
    preload()
    if os.path.exists(args.times):
        os.remove(args.times)
    if args.pretrain_only:
        steps = pretrain_steps(args.public_subjects, args.private_subjects, args.pretrained or "models/demo")
    else:
        steps = demo_steps(args.public_subjects, args.private_subjects, args.logs, args.pretrained or None)
    return run_steps(steps, args.times)


if __name__ == "__main__":
    sys.exit(main())
