"""Seconds and UNet evaluations per volume for each sampler and step count, side by side.

    python benchmarks/sampling.py [--model models/model.pt] [--random-init] [--volumes 2] [--threads 1]
                                  [--guidance 2.0] [--device cpu] [--configs ddpm:150 ddim:50 ddim:25 ddim:10]

Every configuration runs with and without classifier-free guidance (``--guidance``) through the
same code as ``configs/inference.yaml`` (:class:`scripts.synthesis.Synthesizer`): ``--volumes``
volumes in one batch, seeds 0..V-1, all conditioned on the sweep's default healthy adult.

- UNet evaluations per volume are **counted** by a forward hook on the diffusion network
  (:class:`scripts.sampling.EvaluationCounter`: every forward pass adds its batch size, so
  guidance, which runs the conditional and unconditional halves in one doubled batch, counts 2
  per step), divided by the number of volumes.
- Seconds per volume: the sampling loop (``sample s/vol``) and the whole generation including
  decoding by the autoencoder (``total s/vol``), wall clock, after one warm-up forward pass.
- ``dmean %`` and ``dstd %``: a cheap **proxy, not an image-quality metric**: the per-channel
  mean and standard deviation of the generated latents compared with those of DDPM over the
  full schedule at the same guidance setting (mean over channels of |mean - mean_ref| /
  std_ref and of |std - std_ref| / std_ref, in %). It flags a sampler whose latents drift in
  distribution; realism is measured by the evaluation stage. With randomly initialised
  weights it means nothing.
- A second table runs the same samplers with an **analytic denoiser** instead of the network
  (:class:`GaussianOracle`: the exact noise prediction when the latents are Gaussian with
  known per-channel mean and std), so the proxy there measures the sampler's own
  discretisation error on the training schedule, whatever the weights; it also compares with
  the exact target statistics.

Networks: ``models/model.pt`` and its autoencoder when the file exists (unless
``--random-init``), else randomly initialised networks of the small CPU sizes
(``configs/small_diffusion.yaml``, ``configs/small_autoencoder.yaml``; latent 4 x 16 x 16 x 16)
on the paper's schedule (T = 150): timings are then representative, the proxy is not.
CPU runs default to one intra-op thread: on a shared 2-core machine two OpenMP threads can be
many times slower for these small convolutions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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


def _parse_config(text: str) -> tuple[str, int]:
    sampler, _, steps = text.partition(":")
    if sampler not in ("ddpm", "ddim") or not steps.isdigit():
        raise argparse.ArgumentTypeError(f"expected SAMPLER:STEPS with SAMPLER ddpm or ddim, got {text!r}")
    return sampler, int(steps)


def random_networks(device: str) -> tuple[torch.nn.Module, torch.nn.Module, dict, str]:
    """Randomly initialised networks of the small CPU configs and the paper's schedule.

    Returns:
        (diffusion network, autoencoder, model info with latent_shape and scheduler, description).
    """
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    ldm = ConfigParser()
    ldm.read_config(
        [
            str(REPO / "configs" / "common.yaml"),
            str(REPO / "configs" / "train_diffusion.yaml"),
            str(REPO / "configs" / "small_diffusion.yaml"),
        ]
    )
    network = ldm.get_parsed_content("network_def").to(device).eval().requires_grad_(False)
    ae = ConfigParser()
    ae.read_config(
        [
            str(REPO / "configs" / "common.yaml"),
            str(REPO / "configs" / "train_autoencoder.yaml"),
            str(REPO / "configs" / "small_autoencoder.yaml"),
        ]
    )
    autoencoder = ae.get_parsed_content("network_def").to(device).eval().requires_grad_(False)
    autoencoder.scale_factor_measured.fill_(True)
    # MONAI zero-initialises the attention output projections, so a fresh UNet ignores its
    # condition; small random values make guidance change the output as in a trained model
    with torch.no_grad():
        for p in network.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    info = {
        "latent_shape": list(ldm["latent_shape"]),
        "scheduler": {
            "num_train_timesteps": ldm["num_train_timesteps"],
            "schedule": ldm["beta_schedule"],
            "beta_start": ldm["beta_start"],
            "beta_end": ldm["beta_end"],
        },
    }
    return network, autoencoder, info, "randomly initialised small networks (configs/small_diffusion.yaml sizes)"


def trained_networks(model_path: str, device: str) -> tuple[torch.nn.Module, torch.nn.Module, dict, str]:
    """The model to sample from and its autoencoder, as ``configs/inference.yaml`` loads them."""
    from scripts.synthesis import load_matching_autoencoder, load_model, resolve_autoencoder_path

    network, info = load_model(model_path, device, "ema", str(REPO))
    autoencoder = load_matching_autoencoder(resolve_autoencoder_path(None, info, model_path, str(REPO)), info, device)
    return network, autoencoder, info, f"{model_path} (EMA weights)"


class GaussianOracle(torch.nn.Module):
    """Exact noise prediction for latents distributed N(mean_c, std_c^2) per channel (no network).

    With x_t = sqrt(a) x_0 + sqrt(1 - a) eps, E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mean) / (a std^2 + 1 - a).

    Args:
        alphas_cumprod: the schedule's cumulative alphas (indexed by timestep).
        mean: per-channel mean of the target latents.
        std: per-channel standard deviation of the target latents.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1, 1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        a = self.alphas_cumprod[timesteps.long()].view(-1, 1, 1, 1, 1).to(x)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mean) / (a * self.std**2 + 1 - a)


def latent_stats(latents: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of (B, C, D, h, w) latents."""
    flat = latents.transpose(0, 1).reshape(latents.shape[1], -1).double()
    return flat.mean(1).cpu().numpy(), flat.std(1).cpu().numpy()


def proxy(stats: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """Latent-statistics proxy in %: (mean |mean - mean_ref| / std_ref, mean |std - std_ref| / std_ref)."""
    (mean, std), (mean_ref, std_ref) = stats, ref
    return float(np.mean(np.abs(mean - mean_ref) / std_ref) * 100.0), float(
        np.mean(np.abs(std - std_ref) / std_ref) * 100.0
    )


def _pct(pair: tuple[float, float] | None) -> str:
    return "- | -" if pair is None else f"{pair[0]:.1f} | {pair[1]:.1f}"


def oracle_table(
    configs: list[tuple[str, int]], schedule: dict, latent_shape: list[int], volumes: int = 8
) -> list[dict]:
    """Run every sampler with :class:`GaussianOracle` and print the proxy against DDPM and the exact target."""
    from scripts.sampling import EvaluationCounter, build_scheduler, sample_latents

    channels = int(latent_shape[0])
    mean = list(np.linspace(-0.4, 0.4, channels))
    std = list(np.linspace(0.5, 1.0, channels))
    target = (np.array(mean), np.array(std))
    total_t = int(schedule["num_train_timesteps"])
    rows, ref = [], None
    for sampler, steps in configs:
        scheduler = build_scheduler(sampler, schedule, None if sampler == "ddpm" and steps == total_t else steps)
        oracle = GaussianOracle(scheduler.alphas_cumprod, mean, std)
        with EvaluationCounter(oracle) as counter:
            latents = sample_latents(
                oracle, scheduler, torch.zeros(volumes, 14, 2), latent_shape, seeds=list(range(volumes))
            )
        stats = latent_stats(latents)
        if sampler == "ddpm" and len(scheduler.timesteps) == total_t:
            ref = stats
        rows.append(
            {"sampler": sampler, "steps": len(scheduler.timesteps), "evals": counter.count / volumes, "stats": stats}
        )
    print(
        f"\nanalytic denoiser (Gaussian latents, mean {np.round(mean, 2).tolist()}, std {np.round(std, 2).tolist()}), "
        f"{volumes} volumes:"
    )
    print(
        f"| sampler | steps | evals / volume (counted) | dmean % vs DDPM {total_t} | dstd % vs DDPM {total_t} | "
        "dmean % vs exact | dstd % vs exact |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        row["proxy_vs_ddpm"] = None if ref is None else proxy(row["stats"], ref)
        row["proxy_vs_exact"] = proxy(row.pop("stats"), target)
        print(
            f"| {row['sampler']} | {row['steps']} | {row['evals']:g} | {_pct(row['proxy_vs_ddpm'])} | "
            f"{_pct(row['proxy_vs_exact'])} |"
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(REPO / "models" / "model.pt"))
    parser.add_argument("--random-init", action="store_true", help="random small networks even if --model exists")
    parser.add_argument("--volumes", type=int, default=2, help="volumes per configuration (one batch)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (0 = torch default)")
    parser.add_argument("--guidance", type=float, default=2.0, help="guidance scale of the 'with CFG' rows")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="+", type=_parse_config, default=[_parse_config(c) for c in DEFAULT_CONFIGS])
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    os.chdir(REPO)  # the configs import configs/common.yaml relative to the bundle root
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from scripts.sampling import build_scheduler, decode_latents
    from scripts.synthesis import Synthesizer

    if os.path.isfile(args.model) and not args.random_init:
        network, autoencoder, info, source = trained_networks(args.model, args.device)
    else:
        if not args.random_init:
            print(
                f"{args.model} not found: using randomly initialised networks (timings only; the proxy is meaningless)"
            )
        network, autoencoder, info, source = random_networks(args.device)
    with open(REPO / "configs" / "inference.yaml") as f:
        bundle = yaml.safe_load(f)
    with open(REPO / "configs" / "common.yaml") as f:
        ranges = yaml.safe_load(f)["attribute_ranges"]
    from scripts.attributes import ATTRIBUTE_NAMES

    adult = np.array([float(bundle["sweep_defaults"][n]) for n in ATTRIBUTE_NAMES])
    values = np.tile(adult, (args.volumes, 1))
    seeds = list(range(args.volumes))
    latent_shape = info["latent_shape"]
    total_t = int(info["scheduler"]["num_train_timesteps"])
    print(
        f"networks: {source}; latent {list(latent_shape)}; schedule T = {total_t}; device {args.device}; "
        f"torch threads {torch.get_num_threads()}; {args.volumes} volume(s) per configuration; "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    with torch.no_grad():  # warm-up
        network(torch.zeros(1, *latent_shape, device=args.device), torch.zeros(1, device=args.device), None)

    rows, refs = [], {}
    for sampler, steps in args.configs:
        for guidance in (None, args.guidance):
            scheduler = build_scheduler(
                sampler, info["scheduler"], None if sampler == "ddpm" and steps == total_t else steps
            )
            synth = Synthesizer(autoencoder, network, scheduler, latent_shape, ranges, guidance, args.device)
            start = time.perf_counter()
            latents = synth.latents(values, seeds)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            sampled = time.perf_counter()
            decode_latents(autoencoder, latents)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            done = time.perf_counter()
            row = {
                "sampler": sampler,
                "steps": synth.steps,
                "cfg": synth.guidance_scale,
                "unet_evals_per_volume": synth.evaluations / args.volumes,
                "sample_s_per_volume": (sampled - start) / args.volumes,
                "total_s_per_volume": (done - start) / args.volumes,
                "stats": latent_stats(latents),
            }
            if sampler == "ddpm" and synth.steps == total_t:
                refs[guidance is not None] = row["stats"]
            rows.append(row)
            cfg = synth.guidance_scale or "off"
            print(f"  done {sampler} {synth.steps} cfg {cfg}: {row['total_s_per_volume']:.2f} s/volume", flush=True)

    print()
    print(
        f"| sampler | steps | CFG | UNet evals / volume (counted) | sample s / volume | total s / volume | "
        f"dmean % vs DDPM {total_t} | dstd % vs DDPM {total_t} |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        ref = refs.get(row["cfg"] is not None)
        row["proxy_vs_ddpm"] = None if ref is None else proxy(row.pop("stats"), ref)
        print(
            f"| {row['sampler']} | {row['steps']} | {row['cfg'] or 'off'} | {row['unet_evals_per_volume']:g} | "
            f"{row['sample_s_per_volume']:.2f} | {row['total_s_per_volume']:.2f} | {_pct(row['proxy_vs_ddpm'])} |"
        )
    print(
        "proxy (dmean, dstd): latent statistics against DDPM over the full schedule at the same guidance, NOT an "
        "image-quality metric" + (" (meaningless here: random weights)" if "random" in source else "")
    )
    oracle = oracle_table(args.configs, info["scheduler"], latent_shape)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"source": source, "volumes": args.volumes, "rows": rows, "analytic": oracle}, indent=2)
        )
    return rows


if __name__ == "__main__":
    main()
