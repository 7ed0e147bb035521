"""Quality against cost of each sampler: Fréchet distance, LVEDV r and LV-found rate vs UNet evaluations per volume.

    python benchmarks/sampler_quality.py [--model models/model.pt] [--segmenter models/segmenter.pt]
        [--cohort data/public/datalist.json] [--split test] [--volumes 16] [--guidance 2.0]
        [--configs ddpm:150 ddim:50 ddim:25 ddim:10] [--device cpu] [--json out.json]

The quality side of ``benchmarks/sampling.py`` (whose latent-statistics columns are only a proxy):
every sampler generates the same requests with the same seeds through
:class:`scripts.synthesis.Synthesizer`, and the evaluation API (``scripts.evaluation``) measures
them. Requests are the attributes of a real cohort's split (default: the PUBLIC test split, so
nothing private is used), as ED/ES pairs with the same seed. Columns: UNet evaluations per volume
(counted), seconds per volume, ``FD_seg3d`` against that split's real volumes (lower is better;
its real-vs-real scale is in the evaluation report), LV-found rate, LVEDV Pearson r and n.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

DEFAULT_CONFIGS = ("ddpm:150", "ddim:50", "ddim:25", "ddim:10")


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; prints a table and returns its rows."""
    from scripts.evaluation import control, features, fidelity, segmenter
    from scripts.evaluation.volumes import load_real, to_network_layout
    from scripts.sampling import build_scheduler
    from scripts.synthesis import Synthesizer, load_matching_autoencoder, load_model, resolve_autoencoder_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/model.pt")
    parser.add_argument("--segmenter", default="models/segmenter.pt")
    parser.add_argument("--cohort", default="data/public/datalist.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--volumes", type=int, default=16, help="requests taken from the split (ED/ES pairs)")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--spacing", type=float, nargs=3, default=[1.8, 1.8, 10.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    with open(REPO / "configs" / "common.yaml") as f:
        ranges = yaml.safe_load(f)["attribute_ranges"]

    network, info = load_model(args.model, args.device)
    autoencoder = load_matching_autoencoder(resolve_autoencoder_path(None, info, args.model), info, args.device)
    seg, _ = segmenter.load_segmenter(args.segmenter, args.device)
    extractor = features.SegmenterFeatures(seg, args.device)
    size = info["spatial_size"]
    real = load_real(args.cohort, args.split, size)
    real_features = extractor(real.images)
    # requests: the split's attribute vectors (ED and ES of a subject share one seed)
    n = min(args.volumes, len(real))
    conditions = real.attributes[:n]
    subjects = real.subjects[:n]
    seeds = [1000 + sorted(set(subjects)).index(s) for s in subjects]
    rows = []
    for config in args.configs:
        sampler, _, steps = config.partition(":")
        scheduler = build_scheduler(sampler, info["scheduler"], None if sampler == "ddpm" else int(steps))
        synth = Synthesizer(autoencoder, network, scheduler, info["latent_shape"], ranges, args.guidance, args.device)
        start = time.perf_counter()
        volumes = np.concatenate([synth(conditions[i : i + 4], seeds[i : i + 4]) for i in range(0, n, 4)])
        seconds = (time.perf_counter() - start) / n
        images = np.stack([to_network_layout(np.transpose(v, (1, 2, 0)), size) for v in volumes])
        spacing = np.tile(np.asarray(args.spacing), (n, 1))
        measured = segmenter.measure(segmenter.segment(seg, images, args.device), spacing)
        keys = [(s, tuple(np.round(np.delete(c, control.ESED), 6))) for s, c in zip(seeds, conditions)]
        ctrl = control.controllability(conditions, keys, measured)
        rows.append(
            {
                "sampler": sampler,
                "steps": synth.steps,
                "unet_evaluations_per_volume": synth.evaluations / n,
                "seconds_per_volume": seconds,
                "FD_seg3d": fidelity.frechet_distance(extractor(images), real_features),
                "lv_found_rate": ctrl["lv_found_rate"],
                "lvedv_pearson_r": ctrl["attributes"]["LVEDV"]["pearson_r"],
                "lvedv_n": ctrl["attributes"]["LVEDV"]["n"],
            }
        )
    print(f"{n} volumes per sampler, guidance {args.guidance}, reference {args.cohort} [{args.split}]")
    print(f"{'sampler':>8} {'steps':>5} {'UNet/vol':>9} {'s/vol':>7} {'FD_seg3d':>9} {'LV found':>9} {'LVEDV r':>8}")
    for r in rows:
        lvedv = (
            "n/a" if r["lvedv_pearson_r"] is None or math.isnan(r["lvedv_pearson_r"]) else f"{r['lvedv_pearson_r']:.2f}"
        )
        print(
            f"{r['sampler']:>8} {r['steps']:>5} {r['unet_evaluations_per_volume']:>9.0f} "
            f"{r['seconds_per_volume']:>7.2f} "
            f"{r['FD_seg3d']:>9.3f} {r['lv_found_rate']:>9.2f} {lvedv:>8}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
