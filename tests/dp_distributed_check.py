"""Helper of tests/test_dp_bundle.py: one DP step with noise off, single- or multi-process.

    python tests/dp_distributed_check.py OUT.json                                  # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dp_distributed_check.py OUT.json

Every process takes its share of the same 8 privacy units (units[rank::world]); Opacus's
DistributedDPOptimizer (via scripts.dp.DPEngine) adds the noise on rank 0 only and
all-reduces. Rank 0 writes the parameter update and the epsilon an accountant reports.
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

from scripts.dp import DPEngine  # noqa: E402


class Units(list):
    """Privacy units as DPEngine sees them: a sized sequence with a unit level."""

    unit = "record"

    @property
    def num_records(self) -> int:
        return len(self)


class Rows:
    """Rows of a unit for a tiny regression model: the unit already holds them."""

    k = 1

    def make_unit(self, unit, device):
        return unit

    def loss(self, net, unit):
        return ((net(unit["x"]) - unit["y"]) ** 2).mean()


def main(out: str) -> None:
    distributed = "RANK" in os.environ
    if distributed:
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    g = torch.Generator().manual_seed(0)
    units = Units({"x": torch.randn(m, 3, generator=g, dtype=torch.float64), "y": torch.randn(m, 1, generator=g, dtype=torch.float64)} for m in (1, 2, 3, 1, 2, 3, 1, 2))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    before = torch.cat([p.detach().reshape(-1).clone() for p in net.parameters()])
    tmp = tempfile.mkdtemp()
    common = dict(
        units=units, unit_rows=Rows(), target_delta=1e-5, max_grad_norm=0.5, epochs=1, logical_batch_size=4,
        ledger_path=os.path.join(tmp, "ledger.json"), report_path=os.path.join(tmp, "report.json"), noise_seed=rank,
    )
    dp = DPEngine(net, torch.optim.SGD(net.parameters(), lr=1.0), target_epsilon=float("inf"), noise_multiplier=0.0, **common)
    dp.iteration(Engine(lambda e, b: None), list(units[rank::world]))
    update = torch.cat([p.detach().reshape(-1) for p in net.parameters()]) - before

    net2 = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    noisy = DPEngine(net2, torch.optim.SGD(net2.parameters(), lr=1.0), target_epsilon=10.0, noise_multiplier=1.3, **common)
    for _ in range(3):
        noisy.iteration(Engine(lambda e, b: None), [])
    eps = noisy.epsilon()
    epsilons = [None] * world
    if distributed:
        torch.distributed.all_gather_object(epsilons, eps)
    else:
        epsilons = [eps]
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "update": update.tolist(), "epsilons": epsilons, "optimizer": type(dp.optimizer).__name__}, f)
    if distributed:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
