"""Helper of tests/test_dp_bundle.py: DP steps and Poisson sampling, single- or multi-process.

    python tests/dp_distributed_check.py OUT.json [MODE]                                  # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dp_distributed_check.py OUT.json [MODE]

1. One DP step with noise off: every process takes its share of the same 8 privacy units
   (units[rank::world]); Opacus's DistributedDPOptimizer (via DPTrainingHandler) adds the
   noise on rank 0 only and all-reduces. Rank 0 writes the parameter update.
2. The epsilon each rank's ledger reports after 3 noisy steps.
3. The real sampler: each rank draws many epochs from ``poisson_loader(..., distributed=True)``;
   rank 0 writes every rank's step count, empty-batch count and per-unit inclusion counts.
MODE is the per-unit gradient mode (default loop).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
from ignite.engine import Engine
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.privacy.handler import DPTrainingHandler  # noqa: E402
from scripts.privacy.ledger import PrivacyLedger  # noqa: E402
from scripts.privacy.units import poisson_loader  # noqa: E402

SAMPLER_UNITS, SAMPLER_RATE, SAMPLER_EPOCHS = 16, 0.25, 250


class Units(list):
    """Privacy units as the DP stage sees them: a sized sequence with a unit level."""

    unit = "record"

    @property
    def num_records(self) -> int:
        return len(self)


class Rows:
    """Loss of a unit for a tiny regression model: the unit already holds its rows."""

    k = 1

    def make_unit(self, unit, device):
        return unit

    def loss(self, net, unit):
        return ((net(unit["x"]) - unit["y"]) ** 2).mean()


def settings(units: Units, mode: str) -> dict:
    return {
        "stage": "check",
        "dataset": "synthetic",
        "privacy_unit": "record",
        "units": len(units),
        "records": len(units),
        "target_epsilon": float("inf"),
        "delta": 1e-5,
        "accountant": "prv",
        "max_grad_norm": 0.5,
        "max_physical_batch_size": 2,
        "grad_sample_mode": mode,
        "logical_batch_size": 4,
        "finetune_scope": "all",
        "noise_multiplicity": 1,
    }


def dp_handler(units: Units, mode: str, sigma: float, target: float, rank: int) -> DPTrainingHandler:
    tmp = tempfile.mkdtemp()
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    ledger = PrivacyLedger(
        {**settings(units, mode), "target_epsilon": target},
        4 / len(units),
        1,
        path=os.path.join(tmp, "ledger.json"),
        noise_multiplier=sigma,
    )
    return DPTrainingHandler(
        net,
        torch.optim.SGD(net.parameters(), lr=1.0),
        ledger,
        Rows(),
        os.path.join(tmp, "report.json"),
        noise_seed=rank,
    )


def sampler_stats() -> dict:
    units = Units(range(SAMPLER_UNITS))
    loader = poisson_loader(units, SAMPLER_RATE, distributed=True)
    steps, empty, counts = 0, 0, [0] * SAMPLER_UNITS
    for _ in range(SAMPLER_EPOCHS):
        for batch in loader:
            steps += 1
            empty += not batch
            for u in batch:
                counts[u] += 1
    return {"steps": steps, "empty": empty, "counts": counts}


def main(out: str, mode: str = "loop") -> None:
    distributed = "RANK" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    g = torch.Generator().manual_seed(0)
    units = Units(
        {
            "x": torch.randn(m, 3, generator=g, dtype=torch.float64),
            "y": torch.randn(m, 1, generator=g, dtype=torch.float64),
        }
        for m in (1, 2, 3, 1, 2, 3, 1, 2)
    )
    torch.manual_seed(0)
    dp = dp_handler(units, mode, 0.0, float("inf"), rank)
    before = torch.cat([p.detach().reshape(-1).clone() for p in dp.network.parameters()])
    dp.iteration(Engine(lambda e, b: None), list(units[rank::world]))
    update = torch.cat([p.detach().reshape(-1) for p in dp.network.parameters()]) - before

    noisy = dp_handler(units, mode, 1.3, 10.0, rank)
    for _ in range(3):
        noisy.iteration(Engine(lambda e, b: None), [])
    eps = noisy.ledger.get_epsilon()
    stats = sampler_stats()
    gathered = [None] * world
    if distributed:
        torch.distributed.all_gather_object(gathered, {"epsilon": eps, "sampler": stats})
    else:
        gathered = [{"epsilon": eps, "sampler": stats}]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "world": world,
                    "update": update.tolist(),
                    "epsilons": [r["epsilon"] for r in gathered],
                    "sampler": [r["sampler"] for r in gathered],
                    "optimizer": type(dp.optimizer).__name__,
                    "sampler_setup": {"units": SAMPLER_UNITS, "rate": SAMPLER_RATE, "epochs": SAMPLER_EPOCHS},
                },
                f,
            )
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
