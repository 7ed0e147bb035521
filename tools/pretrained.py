"""The demo's shipped PUBLIC pre-trained weights (``models/demo/``): ``make pretrain`` writes, ``make demo`` installs.

The two public pre-training stages (autoencoder, latent diffusion) of the demo recipe need more CPU
time than a 15-minute demo on 2 cores leaves once they are trained long enough for crisp images, so
the bundle ships their weights (trained on the PUBLIC phantom cohort only: no private record, no
privacy claim involved) with a provenance record beside them:

    python -m tools.pretrained ship [--models models --out models/demo --times outputs/pretrain_times.tsv]
    python -m tools.pretrained install [--shipped models/demo --models models]

``ship`` copies the checkpoints the stages wrote into ``--out`` without what only a resumed
pre-training reads (optimiser, learning-rate schedule, RNG and discriminator states: the diffusion
checkpoint would otherwise exceed the Model Zoo's 25 MB per file) and writes ``PROVENANCE.json``: the
command, seed, data command, config lists, each stage's wall time, the commit, library versions,
and each file's SHA-256 and size. ``install`` checks every shipped file against its recorded
SHA-256 and copies it where the stages read it (``models/autoencoder.pt``, ``models/diffusion.pt``);
a file that does not match is refused, nothing is copied.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

from scripts.errors import CheckpointError, MissingInputError
from scripts.files import atomic_path, sha256, write_text_atomic

__all__ = ["SHIPPED", "install", "provenance", "ship"]

#: the checkpoints shipped, as the pre-training stages name them in ``models/``
SHIPPED: tuple[str, ...] = ("autoencoder.pt", "diffusion.pt")
PROVENANCE = "PROVENANCE.json"
PRETRAIN_COMMAND = "make pretrain"
#: the Model Zoo's per-file limit, which the shipped files keep to in all
MAX_BYTES = 25 * 1024 * 1024
#: checkpoint entries that only a resumed pre-training reads (the final checkpoints are never resumed from)
TRAINING_STATE: tuple[str, ...] = ("optimizer", "lr_scheduler", "rng", "loss")


def _commit() -> str | None:
    """The bundle's git commit (with ``-dirty`` when the tree has changes), or None outside a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _stage_seconds(times: str | None) -> dict[str, float]:
    """``{stage: wall seconds}`` from a stage-times file of ``tools.summary.record_time``."""
    if not times or not os.path.isfile(times):
        return {}
    seconds = {}
    with open(times) as f:
        for line in f:
            stage, value, status, _ = line.rstrip("\n").split("\t")
            if int(status) == 0:
                seconds[stage] = round(float(value), 1)
    return seconds


def provenance(
    files: Mapping[str, str], *, settings: Mapping, times: str | None = None, commit: str | None = None
) -> dict:
    """The provenance record of the shipped files (``files``: name -> path; ``commit``: default the tree's now)."""
    import monai
    import torch

    return {
        "command": PRETRAIN_COMMAND,
        **settings,
        "wall_time_s": _stage_seconds(times),
        "commit": commit or _commit(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__},
        "machine": {"processor": platform.machine(), "cpus": os.cpu_count(), "threads": settings.get("threads")},
        "files": {name: {"sha256": sha256(path), "bytes": os.path.getsize(path)} for name, path in files.items()},
    }


def _check_pair(diffusion: Mapping, sources: Mapping[str, str]) -> None:
    """Refuse to ship a diffusion checkpoint that was trained with another autoencoder than the one beside it.

    The diffusion checkpoint names its autoencoder by SHA-256, so that a root decodes with the file it
    was trained with. Stripping the autoencoder's training state changes that file's hash, so the
    shipped diffusion checkpoint names the shipped autoencoder, which holds the same weights; this
    check first makes sure that the stage-written pair belongs together.
    """
    recorded = diffusion.get("autoencoder_sha256")
    if recorded is not None and recorded != sha256(sources["autoencoder.pt"]):
        raise CheckpointError(
            f"{sources['diffusion.pt']} was trained with the autoencoder of SHA-256 {recorded[:16]}..., not with "
            f"{sources['autoencoder.pt']}; rerun both pre-training stages ({PRETRAIN_COMMAND})"
        )


def ship(models: str, out: str, *, settings: Mapping, times: str | None = None) -> dict:
    """Copy the pre-trained checkpoints from ``models`` into ``out`` with their provenance record.

    Raises:
        MissingInputError: a checkpoint is missing (the stage did not run or failed).
        CheckpointError: the files together exceed :data:`MAX_BYTES`.
    """
    import torch
    from scripts.networks import load_checkpoint

    commit = _commit()  # before the shipped files are replaced: they are tracked, and would make the tree dirty
    sources = {name: os.path.join(models, name) for name in SHIPPED}
    for path in sources.values():
        if not os.path.isfile(path):
            raise MissingInputError(f"{path} not found: run the pre-training stages first ({PRETRAIN_COMMAND})")
    contents = {}
    for name, path in sources.items():
        ckpt = load_checkpoint(path, PRETRAIN_COMMAND)
        contents[name] = {k: v for k, v in ckpt.items() if k not in TRAINING_STATE}
    _check_pair(contents["diffusion.pt"], sources)
    os.makedirs(out, exist_ok=True)
    staged = {name: os.path.join(out, name + ".staged") for name in SHIPPED}
    try:
        for name, content in contents.items():  # the autoencoder first: the diffusion checkpoint names its hash
            if name == "diffusion.pt" and content.get("autoencoder_sha256") is not None:
                content["autoencoder_sha256"] = sha256(staged["autoencoder.pt"])
            torch.save(content, staged[name])
        total = sum(os.path.getsize(p) for p in staged.values())
        if total > MAX_BYTES:
            raise CheckpointError(f"the pre-trained checkpoints take {total / 2**20:.1f} MiB, over the 25 MiB shipped")
        for name, path in staged.items():  # all written and within the limit: only then replace the shipped ones
            os.replace(path, os.path.join(out, name))
    finally:
        for path in staged.values():
            if os.path.exists(path):
                os.remove(path)
    files = {name: os.path.join(out, name) for name in SHIPPED}
    record = provenance(files, settings=settings, times=times, commit=commit)
    write_text_atomic(os.path.join(out, PROVENANCE), json.dumps(record, indent=2) + "\n")
    return record


def check(shipped: str) -> dict:
    """The provenance record of ``shipped``, after checking every file's SHA-256 against it.

    Raises:
        MissingInputError: the record or a file is missing.
        CheckpointError: a file's SHA-256 differs from the record's.
    """
    path = os.path.join(shipped, PROVENANCE)
    if not os.path.isfile(path):
        raise MissingInputError(f"{path} not found; the shipped weights are written by: {PRETRAIN_COMMAND}")
    with open(path) as f:
        record = json.load(f)
    for name in SHIPPED:
        file = os.path.join(shipped, name)
        if not os.path.isfile(file):
            raise MissingInputError(f"{file} not found (listed in {path}); regenerate with: {PRETRAIN_COMMAND}")
        expected = record.get("files", {}).get(name, {}).get("sha256")
        if sha256(file) != expected:
            raise CheckpointError(
                f"{file}: SHA-256 {sha256(file)} differs from {expected} recorded in {path}; the file was changed "
                f"or is a Git LFS pointer; regenerate with: {PRETRAIN_COMMAND} (or run DEMO_PRETRAIN=1 make demo)"
            )
    return record


def install(shipped: str, models: str) -> dict:
    """Check the shipped weights (:func:`check`) and copy them into ``models``; returns their record."""
    record = check(shipped)
    os.makedirs(models, exist_ok=True)
    for name in SHIPPED:
        with atomic_path(os.path.join(models, name)) as tmp:
            shutil.copyfile(os.path.join(shipped, name), tmp)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``ship`` or ``install``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("ship", help="copy models/{autoencoder,diffusion}.pt into --out with PROVENANCE.json")
    s.add_argument("--models", default="models")
    s.add_argument("--out", default="models/demo")
    s.add_argument("--times", default="outputs/pretrain_times.tsv")
    s.add_argument("--settings", default="{}", help="JSON object of the run's settings (seed, configs, data command)")
    i = sub.add_parser("install", help="check the shipped weights' SHA-256 and copy them into --models")
    i.add_argument("--shipped", default="models/demo")
    i.add_argument("--models", default="models")
    args = parser.parse_args(argv)
    if args.command == "ship":
        record = ship(args.models, args.out, settings=json.loads(args.settings), times=args.times)
        print(f"shipped {', '.join(SHIPPED)} into {args.out} (commit {record['commit']})")
    else:
        record = install(args.shipped, args.models)
        print(
            f"installed the public pre-trained weights of {args.shipped} (commit {record['commit']}) into {args.models}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
