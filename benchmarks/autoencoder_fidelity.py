"""Autoencoder fidelity per recipe, beside bicubic down-and-up sampling at the same numbers per slice.

    python benchmarks/autoencoder_fidelity.py [--recipes demo_v041 demo] [--datalist data/private/datalist.json]
        [--split test] [--work outputs/autoencoder_fidelity] [--no_train] [--checkpoints NAME=PATH ...]
        [--threads 2] [--json out.json] [--figure out.png]

Each recipe is the autoencoder stage (``configs/train_autoencoder.yaml`` + ``configs/small_autoencoder.yaml``)
with overrides, trained by its own bundle command on the PUBLIC training split (``data/public``,
``make demo``'s cohorts) into ``<work>/<recipe>/``, then measured on held-out volumes (default: the
PRIVATE test split, never seen in training) at the demo size: median over volumes of PSNR (MONAI
``PSNRMetric``, max value 1) and SSIM (MONAI ``SSIMMetric`` on the 2D slices with signal, data range
1), as the evaluation stage's reconstruction section takes them. The baseline row of each recipe is bicubic down-and-up
sampling in-plane to a slice that keeps as many numbers as the recipe's latent (channels x h x w),
which an autoencoder worth its compute must beat. With ``scripts.evaluation.lv_detector``
present, the LV-found rate of the classical (non-learned) LV detector is reported on the originals,
the reconstructions and the bicubic images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

STAGE = ["configs/common.yaml", "configs/train_autoencoder.yaml", "configs/small_autoencoder.yaml"]
# the v0.5.2 demo recipe: 4x [16, 32, 64], latent 2, 40 epochs of batch 2, lr 1e-3, L1
V052 = {
    "epochs": "40",
    "batch_size": "2",
    "lr": "1.0e-3",
    "network_def#channels": "[16,32,64]",
    "network_def#attention_levels": "[False,False,False]",
    "network_def#latent_channels": "2",
}
# recipe name -> (extra config files merged after STAGE, command-line overrides)
RECIPES: dict[str, tuple[list[str], dict[str, str]]] = {
    # the v0.4.1 demo recipe: 8x in-plane, latent 8 x 8 x 8 per slice, 6 epochs of batch 2 (168 steps)
    "demo_v041": (
        [],
        {
            "epochs": "6",
            "batch_size": "2",
            "lr": "2.0e-3",
            "network_def#channels": "[8,16,32,32]",
            "network_def#attention_levels": "[False,False,False,False]",
            "network_def#latent_channels": "8",
        },
    ),
    # 8x as above, 6x the steps
    "8x_long": (
        [],
        {
            "epochs": "36",
            "batch_size": "2",
            "lr": "2.0e-3",
            "network_def#channels": "[8,16,32,32]",
            "network_def#attention_levels": "[False,False,False,False]",
            "network_def#latent_channels": "8",
        },
    ),
    # 4x in-plane as in the paper, 2 latent channels (16 x 16 x 2 = 512 numbers per slice, as the 8x one)
    "4x_c2": (
        [],
        {
            "epochs": "12",
            "batch_size": "2",
            "lr": "1.0e-3",
            "network_def#channels": "[16,32,64]",
            "network_def#attention_levels": "[False,False,False]",
            "network_def#latent_channels": "2",
        },
    ),
    # 4x in-plane, 4 latent channels (1,024 numbers per slice)
    "4x_c4": (
        [],
        {
            "epochs": "12",
            "batch_size": "2",
            "lr": "1.0e-3",
            "network_def#channels": "[16,32,64]",
            "network_def#attention_levels": "[False,False,False]",
            "network_def#latent_channels": "4",
        },
    ),
    # the v0.4.1 recipe, twice the channels at every level
    "demo_v041_wide": (
        [],
        {
            "epochs": "6",
            "batch_size": "2",
            "lr": "2.0e-3",
            "network_def#channels": "[16,32,64,64]",
            "network_def#attention_levels": "[False,False,False,False]",
            "network_def#latent_channels": "8",
        },
    ),
    # 4x in-plane, 2 latent channels, the demo's 1,120-step budget (40 epochs of batch 2)
    "4x_c2_long": (
        [],
        {
            "epochs": "40",
            "batch_size": "2",
            "lr": "1.0e-3",
            "network_def#channels": "[16,32,64]",
            "network_def#attention_levels": "[False,False,False]",
            "network_def#latent_channels": "2",
        },
    ),
    # 4x in-plane, 4 latent channels, the demo's 1,120-step budget
    "4x_c4_long": (
        [],
        {
            "epochs": "40",
            "batch_size": "2",
            "lr": "1.0e-3",
            "network_def#channels": "[16,32,64]",
            "network_def#attention_levels": "[False,False,False]",
            "network_def#latent_channels": "4",
        },
    ),
    # 4x in-plane with the 8x recipe's narrow levels (one downsampling fewer: about its cost per step), 2 latent
    # channels (512 numbers per slice, as the 8x latent), the demo's 1,120-step budget
    "4x_narrow_c2": (
        [],
        {
            "epochs": "40",
            "batch_size": "2",
            "lr": "2.0e-3",
            "network_def#channels": "[8,16,32]",
            "network_def#attention_levels": "[False,False,False]",
            "network_def#latent_channels": "2",
        },
    ),
    # the same, 4 latent channels (1,024 numbers per slice)
    "4x_narrow_c4": (
        [],
        {
            "epochs": "40",
            "batch_size": "2",
            "lr": "2.0e-3",
            "network_def#channels": "[8,16,32]",
            "network_def#attention_levels": "[False,False,False]",
            "network_def#latent_channels": "4",
        },
    ),
    "v052": ([], V052),
    # v0.5.2 with the L2 reconstruction loss (PSNR's own) instead of L1
    "v052_l2": ([], {**V052, "reconstruction": "l2"}),
    # v0.5.2 with a slice SSIM term beside L1 (MONAI SSIMLoss)
    "v052_ssim": ([], {**V052, "ssim_weight": "0.5"}),
    # the same, the posterior std starting at 0.01 (scripts.networks.SliceAutoencoder)
    "v052_ssim_std": ([], {**V052, "ssim_weight": "0.5", "network_def#posterior_std_init": "0.01"}),
    # v0.5.2 with a slice SSIM term, two residual blocks per level
    "v052_ssim_res2": ([], {**V052, "ssim_weight": "0.5", "network_def#num_res_blocks": "2"}),
    # the v0.5.3a candidate (not shipped: its diffusion stage lost the ladders): SSIM term, std 0.01, 80 epochs
    "v053a": ([], {**V052, "epochs": "80", "ssim_weight": "0.5", "network_def#posterior_std_init": "0.01"}),
    # the current demo recipe (configs/demo_autoencoder.yaml; v0.5.3: SSIM term, 80 epochs)
    "demo": (["configs/demo_autoencoder.yaml"], {}),
}


def train(name: str, work: Path, threads: int, epochs: int | None = None) -> float:
    """Run the recipe's autoencoder stage into ``work/name``; returns its wall time in seconds."""
    files, overrides = RECIPES[name]
    if epochs is not None:  # the same number of steps for every candidate
        overrides = dict(overrides, epochs=str(epochs))
    out = work / name
    config = "[" + ",".join(f"'{f}'" for f in STAGE + files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config, "--resume", "False"]
    cmd += ["--ckpt_dir", str(out / "models"), "--output_dir", str(out / "eval")]
    for key, value in overrides.items():
        cmd += [f"--{key}", value]
    # idle OpenMP threads sleep instead of spinning (as `make demo` runs): other jobs on the cores cost their share only
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    start = time.perf_counter()
    with open(work / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def bicubic(volumes: torch.Tensor, numbers_per_slice: int) -> torch.Tensor:
    """Down-and-up bicubic sampling in-plane to a square slice of about ``numbers_per_slice`` pixels."""
    b, c, d, h, w = volumes.shape
    side = max(1, round(math.sqrt(numbers_per_slice)))
    slices = volumes.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
    small = torch.nn.functional.interpolate(slices, size=(side, side), mode="bicubic", antialias=True)
    up = torch.nn.functional.interpolate(small, size=(h, w), mode="bicubic").clamp(0.0, 1.0)
    return up.reshape(b, d, c, h, w).permute(0, 2, 1, 3, 4)


def fidelity(pred: torch.Tensor, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-volume PSNR and SSIM as the evaluation stage's reconstruction section takes them (its numbers
    are the demo's targets): SSIM over the slices with signal only, where the stage's validation SSIM
    also averages in the empty padding slices that score 1 whatever the decoder does."""
    from scripts.evaluation.reconstruction import psnr_ssim

    return psnr_ssim(target[:, 0].numpy(), pred[:, 0].numpy())


def lv_found(volumes: torch.Tensor, spacing: np.ndarray) -> float:
    """Share of (B, 1, D, H, W) volumes in which the classical (non-learned) LV detector finds an LV."""
    from scripts.evaluation.lv_detector import detect_many

    return float(np.mean([d.found for d in detect_many(volumes[:, 0].numpy(), spacing)]))


def main(argv: list[str] | None = None) -> list[dict]:
    """Train (unless ``--no_train``) and measure each recipe; prints the table and returns its rows."""
    from scripts.evaluation.volumes import load_real
    from scripts.networks import load_autoencoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--datalist", default="data/private/datalist.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--spatial_size", type=int, nargs=3, default=[16, 64, 64])
    parser.add_argument("--work", default="outputs/autoencoder_fidelity")
    parser.add_argument("--no_train", action="store_true", help="measure the checkpoints already in --work")
    parser.add_argument(
        "--checkpoints", nargs="*", default=[], metavar="NAME=PATH", help="also measure these autoencoder checkpoints"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="train every recipe this many epochs (28 steps each)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--figure", default=None, help="PNG of the originals above each recipe's reconstructions")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # read as the evaluation stage reads a cohort (the training pipeline's per-image scaling and crop)
    real = load_real(str(REPO / args.datalist), args.split, args.spatial_size)
    originals, spacing = torch.from_numpy(real.images)[:, None], real.spacing
    rows = [{"recipe": "originals", "lv_found": lv_found(originals, spacing)}]
    measured = [(name, None) for name in args.recipes] + [tuple(c.split("=", 1)) for c in args.checkpoints]
    figure_rows = []
    for name, path in measured:
        seconds = None if args.no_train or path else train(name, work, args.threads, args.epochs)
        autoencoder = load_autoencoder(path or str(work / name / "models" / "autoencoder.pt"))
        with torch.no_grad():
            recon = torch.cat([autoencoder.decode(autoencoder.encode(x)[0]) for x in originals.split(4)]).clamp(0, 1)
            latent = autoencoder.encode(originals[:1])[0]
        numbers = latent.shape[1] * latent.shape[3] * latent.shape[4]
        steps = None
        for label, images in ((name, recon), (f"bicubic, {numbers} numbers/slice", bicubic(originals, numbers))):
            psnr, ssim = fidelity(images, originals)
            if label == name:
                figure_rows.append((name, images[:, 0].numpy(), list(zip(psnr, ssim))))
            row = {"recipe": label, "numbers_per_slice": numbers, "psnr": float(np.median(psnr))}
            row.update(ssim=float(np.median(ssim)), lv_found=lv_found(images, spacing), seconds=seconds, steps=steps)
            rows.append(row)
            seconds = None
    print(f"{args.datalist} [{args.split}], {len(originals)} volumes at {args.spatial_size}:")
    print("| recipe | numbers / slice | median PSNR (dB) | median SSIM | LV found (classical) | training time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        found = "-" if r.get("lv_found") is None else f"{100 * r['lv_found']:.0f} %"
        time_s = "-" if r.get("seconds") is None else f"{r['seconds']:.0f} s"
        if "psnr" not in r:
            print(f"| {r['recipe']} | - | - | - | {found} | - |")
            continue
        print(f"| {r['recipe']} | {r['numbers_per_slice']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {found} | {time_s} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if args.figure:
        from scripts.evaluation.plots import reconstructions

        reconstructions(real.ids, real.images, figure_rows, args.figure)
    return rows


if __name__ == "__main__":
    main()
