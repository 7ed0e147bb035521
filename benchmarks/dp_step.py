"""Time and peak memory of one DP-SGD step per per-sample-gradient mode, against a non-DP step.

    python benchmarks/dp_step.py [--size default|small] [--batch B] [--scope all|attention] [--repeats R] [--modes ...]
    python benchmarks/dp_step.py --batch 16 --logical 256 --modes nodp bookkeeping   # logical batch in physical chunks

Modes (all at the same physical batch of B records, one (timestep, noise) draw each):

* ``nodp``: a plain batched step (forward, backward, AdamW step);
* ``hooks``, ``functorch``, ``ghost``: Opacus 1.6 ``PrivacyEngine.make_private`` with that
  ``grad_sample_mode`` (noise_multiplier 1.0, max_grad_norm 1.0), same loss and optimiser.
  Opacus cannot give ``AttributeEncoder.missing_embedding`` a per-sample gradient (the
  weight is read outside ``Embedding.forward``, so no hook sees it), so these modes freeze
  that table (marked ``*``); ``--opacus-as-is`` shows the error instead;
* ``loop``, ``vmap``, ``bookkeeping``: :func:`scripts.privacy.per_sample.clipped_grad_sum` with B
  units of one row, then the Gaussian noise, the division by B and the AdamW step, as
  ``DPOptimizer`` does (``bookkeeping``: per-layer ghost norms / per-unit gradients and
  book-keeping from one forward and backward, docs/fast_clipping.md);
* ``loop-k2`` (generally ``loop-kN`` / ``vmap-kN`` / ``bookkeeping-kN``): B units of one record
  with N draws each (noise multiplicity), to show what multiplicity costs.

``--scope`` freezes what the bundle's fine-tune scope excludes (``apply_scope``) in every
mode, ``nodp`` included: ``attention`` is the DP configs' default, ``all`` trains everything.
``--logical L`` gives every mode L records, processed in physical chunks of ``--batch``:
the DP modes get L units with ``max_physical_batch_size = --batch``; ``nodp`` accumulates
the gradients of the chunks. Its peak memory against a run with ``--logical`` equal to
``--batch`` shows whether memory grows with the logical batch. On CPU run it with
``MALLOC_MMAP_THRESHOLD_=131072``: with glibc's default (dynamic) threshold, blocks freed
after one chunk stay in the heap and the peak RSS grows over the chunks by about 15 %
for every mode, ``nodp`` included, without any tensor being kept.

Each mode runs in its own fresh subprocess: one warm-up step, then up to ``--repeats``
timed steps (median reported); a further step is only started if it is expected to end
within ``--budget`` seconds of the mode's start (column ``n`` = timed steps; ``0!`` = the
warm-up step alone exceeded the budget and its time is reported), which keeps the default
network, whose slowest Opacus steps take minutes on 2 CPU cores, to about 10 minutes.
``--rounds R`` runs the whole sequence R times, interleaved, and reports the median over
rounds: on a shared machine a burst of other load then hits every mode alike.

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak RSS of the process
(``ru_maxrss``). Both are reported as the increase over the memory after the model, the
batch and the optimiser are built (weights, imports and the interpreter are not counted;
gradients, optimiser state, activations and per-sample gradients are); on CPU the
absolute peak RSS is printed too. Ratios are against ``nodp``. On CPU the process CPU time
and the load average are printed as well: wall time on a shared machine moves with other
load (with 2 OpenMP threads on 2 busy cores a step can take several times longer).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

MODES = ("nodp", "hooks", "functorch", "ghost", "loop", "vmap", "bookkeeping", "loop-k2", "bookkeeping-k2")
DP_MODES = ("loop", "vmap", "bookkeeping")
OPACUS_MODES = ("hooks", "functorch", "ghost")
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0


# --------------------------------------------------------------------------- set-up


def network_config(size: str) -> dict:
    """Network kwargs, latent shape, lr and noise schedule from the bundle's YAML configs.

    ``small`` is ``configs/train_diffusion.yaml`` overridden by ``configs/small_diffusion.yaml``
    (the same merge as the bundle's
    ``--config_file "['configs/common.yaml','configs/train_diffusion.yaml','configs/small_diffusion.yaml']"``).
    """
    cfg = yaml.safe_load((REPO / "configs" / "train_diffusion.yaml").read_text())
    if size == "small":
        for key, value in yaml.safe_load((REPO / "configs" / "small_diffusion.yaml").read_text()).items():
            if key.startswith("network_def#"):
                cfg["network_def"][key.split("#", 1)[1]] = value
            else:
                cfg[key] = value
    net = dict(cfg["network_def"])
    if net.pop("_target_") != "scripts.networks.ConditionalDiffusionUNet":
        raise ValueError("network_def._target_ is no longer scripts.networks.ConditionalDiffusionUNet")
    latent_shape = list(cfg["latent_shape"])
    net["in_channels"] = net["out_channels"] = latent_shape[0]  # "$@latent_shape[0]" in the YAML
    unresolved = {k: v for k, v in net.items() if isinstance(v, str) and v[:1] in "$@%"}
    if unresolved:
        raise ValueError(f"network_def has config expressions this benchmark does not resolve: {unresolved}")
    return {
        "network": net,
        "latent_shape": latent_shape,
        "lr": float(cfg["lr"]),
        "scheduler": {
            "num_train_timesteps": int(cfg["num_train_timesteps"]),
            "schedule": cfg["beta_schedule"],
            "beta_start": float(cfg["beta_start"]),
            "beta_end": float(cfg["beta_end"]),
        },
    }


class PerSampleMSE(nn.Module):
    """MSE averaged per sample, reduced over the batch by ``self.reduction``.

    Opacus's ghost clipping sets ``reduction = "none"`` and needs one loss per row;
    ``nn.MSELoss(reduction="none")`` would return one loss per voxel.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = (pred - target).pow(2).flatten(1).mean(1)
        return {"mean": loss.mean, "sum": loss.sum}.get(self.reduction, lambda: loss)()


def make_batch(
    batch: int, k: int, latent_shape: list[int], num_attributes: int, t_max: int, device: torch.device
) -> dict:
    """B records, each with K (timestep, noise) draws: rows of one record are adjacent."""
    latents = torch.randn(batch, *latent_shape).repeat_interleave(k, 0)
    condition = torch.rand(batch, num_attributes, 2)
    condition[..., 1] = (condition[..., 1] < 0.2).float()
    rows = batch * k
    data = {
        "latents": latents,
        "noise": torch.randn(rows, *latent_shape),
        "timesteps": torch.randint(0, t_max, (rows,)),
        "condition": condition.repeat_interleave(k, 0),
    }
    return {name: t.to(device) for name, t in data.items()}


def current_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as f:  # Linux: resident pages
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


# --------------------------------------------------------------------------- one mode


def build_step(
    mode: str,
    model: nn.Module,
    scheduler,
    data: dict,
    batch: int,
    k: int,
    lr: float,
    mpbs: int,
    opacus_as_is: bool = False,
):
    """Return a zero-argument callable doing one full optimiser step of ``mode``.

    ``batch`` is the number of records in ``data`` (the logical batch); ``mpbs`` the
    physical batch: ``nodp`` accumulates over chunks of ``mpbs`` records when it is smaller.
    """
    from scripts.privacy.per_sample import clipped_grad_sum

    criterion = PerSampleMSE()

    def noisy_input(d: dict) -> torch.Tensor:
        return scheduler.add_noise(d["latents"], d["noise"], d["timesteps"])

    if mode == "nodp" or mode in OPACUS_MODES:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        module = model
        if mode in OPACUS_MODES:
            from opacus import PrivacyEngine

            if not opacus_as_is:
                # Opacus computes per-sample gradients in module hooks; AttributeEncoder reads
                # missing_embedding.weight directly (not through Embedding.forward), so no hook
                # sees it and DPOptimizer raises "Per sample gradient is not initialized"
                # (ghost: "no attribute '_norm_sample'"). Freezing this 14 x dim table lets
                # Opacus run the rest of the network; it changes the step time negligibly.
                model.attribute_encoder.missing_embedding.weight.requires_grad_(False)

            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(batch)), batch_size=batch)
            out = PrivacyEngine(accountant="rdp").make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM,
                poisson_sampling=False,  # the benchmark feeds one fixed batch of B rows
                grad_sample_mode=mode,
            )
            module, optimizer = out[0], out[1]
            if mode == "ghost":
                criterion = out[2]  # DPLossFastGradientClipping: two backward passes inside .backward()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            for start in range(0, batch * k, mpbs * k):  # gradient accumulation over physical chunks
                chunk = {name: t[start : start + mpbs * k] for name, t in data.items()}
                x = noisy_input(chunk)
                loss = criterion(module(x, chunk["timesteps"], chunk["condition"]), chunk["noise"])
                loss.backward()
            optimizer.step()

        return step

    base = mode.partition("-k")[0]  # "loop", "vmap" or "bookkeeping"
    units = [{name: t[i * k : (i + 1) * k] for name, t in data.items()} for i in range(batch)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    params = [p for p in model.parameters() if p.requires_grad]

    def unit_loss(net, unit) -> torch.Tensor:
        return criterion(net(noisy_input(unit), unit["timesteps"], unit["condition"]), unit["noise"])

    def step() -> None:
        grads, _ = clipped_grad_sum(model, unit_loss, units, MAX_GRAD_NORM, mode=base, max_physical_batch_size=mpbs)
        with torch.no_grad():  # as DPOptimizer.add_noise and scale_grad (loss_reduction="mean")
            for p, g in zip(params, grads):
                g.add_(torch.randn_like(g), alpha=NOISE_MULTIPLIER * MAX_GRAD_NORM).div_(batch)
                p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_mode(args: argparse.Namespace) -> dict:
    """Worker: build, warm up, time one mode; return the measurements."""
    from monai.networks.schedulers import DDPMScheduler
    from scripts.networks import ConditionalDiffusionUNet

    mode = args.worker
    k = int(mode.partition("-k")[2] or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    cfg = network_config(args.size)
    model = ConditionalDiffusionUNet(**cfg["network"]).to(device).train()
    apply_scope(model, args.scope)
    scheduler = DDPMScheduler(clip_sample=False, **cfg["scheduler"])
    records = args.logical or args.batch
    data = make_batch(
        records, k, cfg["latent_shape"], model.num_attributes, cfg["scheduler"]["num_train_timesteps"], device
    )
    mpbs = args.max_physical_batch_size or args.batch
    step = build_step(mode, model, scheduler, data, records, k, cfg["lr"], mpbs, args.opacus_as_is)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mb = current_memory_mb(device)
    start = time.perf_counter()
    step()
    sync()
    warmup = time.perf_counter() - start
    times, cpu_times, loads = [], [], [os.getloadavg()[0]]
    while len(times) < args.repeats:
        expected = statistics.median(times) if times else warmup
        if warmup >= args.budget or (times and time.perf_counter() - start + expected > args.budget):
            break
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        loads.append(os.getloadavg()[0])
    peak = peak_memory_mb(device)
    cpu = f"cpu ({torch.get_num_threads()} threads)"
    return {
        "mode": mode,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        "n": len(times),
        "step_s": statistics.median(times) if times else warmup,
        "times": [round(t, 3) for t in times],
        "cpu_s": statistics.median(cpu_times) if cpu_times else None,
        "warmup_s": warmup,
        "peak_mb": peak - base_mb,
        "abs_peak_mb": peak,
        "load": max(loads),
        "note": "missing_embedding frozen" if mode in OPACUS_MODES and not args.opacus_as_is else "",
    }


def apply_scope(model: nn.Module, scope: str) -> None:
    """The bundle's fine-tune scope (``all`` / ``attention`` / ``conditioning``)."""
    try:
        from scripts.privacy.validation import apply_scope as apply
    except ImportError:  # before the split of scripts/dp.py
        from scripts.dp import apply_scope as apply
    apply(model, scope)


# --------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=("default", "small"), default="small")
    parser.add_argument("--batch", type=int, default=None, help="physical batch (records); default 8 small, 4 default")
    parser.add_argument(
        "--scope", choices=("all", "attention", "conditioning"), default="attention", help="fine-tune scope"
    )
    parser.add_argument(
        "--logical", type=int, default=None, help="logical batch (records), in physical chunks of --batch"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per mode; default 5 small, 3 default")
    parser.add_argument("--modes", nargs="+", default=list(MODES), help=f"modes (default: {' '.join(MODES)})")
    parser.add_argument(
        "--max-physical-batch-size", type=int, default=None, help="vmap chunk in units (default: batch)"
    )
    parser.add_argument("--budget", type=float, default=None, help="seconds per mode (default 60)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run all modes this many times, interleaved (noisy machines)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--opacus-as-is",
        action="store_true",
        help="do not freeze missing_embedding for the Opacus modes (they then fail)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or (8 if args.size == "small" else 4)
    args.repeats = args.repeats or (5 if args.size == "small" else 3)
    args.budget = args.budget or 60.0
    for mode in args.modes:
        if mode not in ("nodp",) + OPACUS_MODES and not re.fullmatch(r"(loop|vmap|bookkeeping)(-k[1-9][0-9]*)?", mode):
            parser.error(f"unknown mode {mode!r}; expected one of {MODES} or loop-kN / vmap-kN / bookkeeping-kN")
    modes = {args.worker} if args.worker else set(args.modes)
    if args.logical and (args.logical < args.batch or modes & set(OPACUS_MODES)):
        parser.error("--logical must be >= --batch, and is for nodp and the clipped_grad_sum modes")

    if args.worker:
        try:
            result = run_mode(args)
        except Exception as e:  # reported in the table, the other modes still run
            result = {
                "mode": args.worker,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}",
            }
        print("RESULT " + json.dumps(result), flush=True)
        return

    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    t_start = time.perf_counter()
    for rnd in range(args.rounds):  # rounds interleave the modes, so a burst of other load hits all of them
        for mode in args.modes:
            runs[mode].append(run_worker(mode, args))
            print(
                f"# round {rnd + 1} {mode}: done after {time.perf_counter() - t_start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    rows = [merge_rounds(results) for results in runs.values()]
    print_table(rows, args, time.perf_counter() - t_start)


def run_worker(mode: str, args: argparse.Namespace) -> dict:
    """Run one mode in a fresh interpreter (so its peak RSS is its own) and parse its result."""
    cmd = [sys.executable, __file__, "--worker", mode, "--size", args.size, "--batch", str(args.batch)]
    cmd += [
        "--repeats",
        str(args.repeats),
        "--budget",
        str(args.budget),
        "--seed",
        str(args.seed),
        "--scope",
        args.scope,
    ]
    if args.logical:
        cmd += ["--logical", str(args.logical)]
    if args.opacus_as_is:
        cmd.append("--opacus-as-is")
    if args.max_physical_batch_size:
        cmd += ["--max-physical-batch-size", str(args.max_physical_batch_size)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT ") :])
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:150]  # killed (out of memory, say) before reporting
    return {"mode": mode, "error": f"worker exited with {proc.returncode}: {tail}"}


def merge_rounds(results: list[dict]) -> dict:
    """One row from a mode's rounds: median of the per-round medians, largest peak memory."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    row = dict(ok[0])
    for key in ("step_s", "cpu_s"):
        values = [r[key] for r in ok if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    for key in ("peak_mb", "abs_peak_mb", "load"):
        row[key] = max(r[key] for r in ok)
    row["n"] = sum(r["n"] for r in ok)
    return row


def print_table(rows: list[dict], args: argparse.Namespace, total_s: float) -> None:
    """One table: mode | steps | median step | ratio | peak memory | ratio (| CPU time, load on CPU)."""
    ok = [r for r in rows if "error" not in r]
    ref = next((r for r in ok if r["mode"] == "nodp"), None)
    device = ok[0]["device"] if ok else "?"
    cpu = device.startswith("cpu")
    params = f"{ok[0]['params_m']:.1f} M parameters ({ok[0].get('trainable_m', 0):.2f} M trainable)" if ok else ""
    rounds = f" --rounds {args.rounds}" if args.rounds > 1 else ""
    logical = f" --logical {args.logical}" if args.logical else ""
    print(
        f"\n--size {args.size} --batch {args.batch}{logical} --scope {args.scope} --repeats {args.repeats}{rounds} | "
        f"{device} | {params} | torch {torch.__version__}"
    )
    print(
        f"peak MB = peak minus memory after building model, batch and optimiser ({'RSS' if cpu else 'CUDA allocated'})"
    )

    def ratio(key: str, r: dict) -> str:
        return f"{r[key] / ref[key]:.2f}x" if ref and ref.get(key) and r.get(key) is not None else "-"

    header = ["mode", "n", "median step s", "time ratio", "peak MB", "memory ratio"]
    header += ["cpu s", "cpu ratio", "abs peak RSS MB", "max load"] if cpu else []
    table, notes = [header], []
    for r in rows:
        if "error" in r:
            table.append([r["mode"], "-", r["error"]])
            continue
        mode = r["mode"] + ("*" if r.get("note") else "")
        steps = f"{r['n']}" + ("!" if r["n"] == 0 else "")
        line = [mode, steps, f"{r['step_s']:.3f}", ratio("step_s", r), f"{r['peak_mb']:.0f}", ratio("peak_mb", r)]
        if cpu:
            cpu_s = f"{r['cpu_s']:.3f}" if r.get("cpu_s") is not None else "-"
            line += [cpu_s, ratio("cpu_s", r), f"{r['abs_peak_mb']:.0f}", f"{r['load']:.1f}"]
        table.append(line)
        if r.get("note") and r["note"] not in notes:
            notes.append(r["note"])
    widths = [max(len(row[i]) for row in table if len(row) == len(header)) for i in range(len(header))]
    for j, row in enumerate(table):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)) if len(row) == len(header) else " | ".join(row))
        if j == 0:
            print("-+-".join("-" * w for w in widths))
    for note in notes:
        print(f"*: {note} (Opacus cannot see it: AttributeEncoder reads the weight outside Embedding.forward)")
    if any(r.get("n") == 0 for r in ok):
        print("n = 0!: the warm-up step alone exceeded --budget; its time is reported.")
    if cpu:
        print("max load: highest 1-minute load average while timing; well above 2 (this process) means other")
        print("processes shared the cores and the wall times of that row are inflated (rerun, or use --rounds)")
    print(f"total {total_s:.0f} s")


if __name__ == "__main__":
    main()
