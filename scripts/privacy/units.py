"""Privacy units as a dataset, their Poisson sampling, and the sample rate of a stage.

Opacus samples and clips batch rows; here the unit of privacy is a *unit* of one or more
records (a subject's ED and ES volumes together, or one volume), so the dataset yields units
and the loader draws each unit independently with probability q (Opacus's Poisson samplers).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections import defaultdict
from typing import Any

import torch
from ignite import distributed as idist
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from scripts.errors import ConfigError, DataError

__all__ = ["UNITS", "PrivacyUnits", "DistributedPoissonSampler", "poisson_loader", "rank_seed", "sample_rate"]

UNITS = ("subject", "record")


class PrivacyUnits(torch.utils.data.Dataset):
    """A dataset of privacy units: one subject (all its volumes) or one record (one volume).

    Args:
        dataset: a MONAI dataset whose items hold ``image``, ``attributes``, ``missing``,
            ``id``; its ``data`` list holds each record's ``subject``.
        unit: ``"subject"`` (default, a subject's ED and ES volumes together) or ``"record"``.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, unit: str = "subject") -> None:
        if unit not in UNITS:
            raise ConfigError(f"config field 'privacy_unit': expected one of {list(UNITS)}, got {unit!r}")
        self.dataset, self.unit = dataset, unit
        if unit == "subject":
            unnamed = [str(item.get("id", i)) for i, item in enumerate(dataset.data) if not item.get("subject")]
            if unnamed:
                raise ConfigError(
                    f"privacy_unit='subject' needs a 'subject' key in every datalist entry; {len(unnamed)} entries "
                    "have "
                    f"none (e.g. {unnamed[:3]}). Add it (volumes of one person share it), or use --privacy_unit record "
                    "if every volume is a different person"
                )
        _refuse_duplicates(dataset.data)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(dataset.data):
            groups[str(item["subject"]) if unit == "subject" else f"{i}"].append(i)
        self.groups = list(groups.values())
        self.num_records = len(dataset)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, Any]:
        items = [self.dataset[i] for i in self.groups[index]]
        return {
            "image": torch.stack([it["image"] for it in items]),
            "attributes": torch.stack([torch.as_tensor(it["attributes"]) for it in items]),
            "missing": torch.stack([torch.as_tensor(it["missing"]) for it in items]),
            "id": [it["id"] for it in items],
        }


def _refuse_duplicates(entries: list) -> None:
    """Refuse a record listed twice (same image file or same id): it would sit in two units and move the sum by 2C."""
    seen: dict[tuple[str, str], int] = {}
    for i, item in enumerate(entries):
        keys = [("id", str(item["id"]))] if item.get("id") not in (None, "") else []
        if isinstance(item.get("image"), str):
            keys.append(("image", os.path.realpath(item["image"])))
        for key in keys:
            if key in seen:
                j = seen[key]
                first, second = entries[j], item
                raise DataError(
                    f"the private datalist lists the same record twice ({key[0]} {key[1]!r}): entry {j} (subject "
                    f"{first.get('subject')!r}, id {first.get('id')!r}) and entry {i} (subject "
                    f"{second.get('subject')!r}, "
                    f"id {second.get('id')!r}). A record in two privacy units moves the clipped sum by 2 x "
                    "max_grad_norm; "
                    "list each volume once, under its subject"
                )
            seen[key] = i


def sample_rate(units: PrivacyUnits, logical_batch_size: int) -> float:
    """Poisson rate q = logical_batch_size / number of units, checked to be in (0, 1].

    Args:
        units: the private units.
        logical_batch_size: expected units per step.

    Returns:
        the sample rate.
    """
    n = len(units)
    if logical_batch_size < 1 or n < logical_batch_size:
        raise ConfigError(
            f"the private dataset has {n} privacy units ({units.unit}-level, {units.num_records} records), fewer than "
            f"logical_batch_size={logical_batch_size}; use a logical batch size of at most {n} (DP-SGD with Poisson "
            "sampling needs sample_rate = logical_batch_size / units <= 1)"
        )
    return logical_batch_size / n


class DistributedPoissonSampler(torch.utils.data.Sampler):
    """Poisson sampling across processes where every rank takes every planned step.

    Rank r owns the units ``r, r + world, ...`` and includes each independently with
    probability q, so over all ranks every unit is included with probability q, whatever
    the other units do. Empty local batches are yielded like any other: each rank runs
    exactly ``int(1 / q)`` steps an epoch and the ranks' all-reduces stay in step. (Opacus's
    ``DistributedUniformWithReplacementSampler`` skips empty local batches, which makes a
    rank's epoch shorter and raises a unit's inclusion probability above q.)

    Args:
        num_units: number of privacy units on all ranks together.
        sample_rate: Poisson rate q.
        rank: this process's rank.
        world_size: number of processes.
        seed: seed of the draws (tests); each rank derives its own stream from ``(seed, rank)``,
            so ranks never draw the same inclusions (which would include unit r and unit
            r + 1 together: Poisson sampling needs independent draws). None: OS entropy.
    """

    def __init__(
        self, num_units: int, sample_rate: float, rank: int, world_size: int, *, seed: int | None = None
    ) -> None:
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shard = list(range(rank, num_units, world_size))
        self.sample_rate, self.generator = sample_rate, torch.Generator().manual_seed(rank_seed(seed, rank))
        self.steps = int(1 / sample_rate)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            mask = torch.rand(len(self.shard), generator=self.generator) < self.sample_rate
            yield [self.shard[i] for i in mask.nonzero().reshape(-1).tolist()]


def rank_seed(seed: int | None, rank: int) -> int:
    """A 63-bit seed for ``rank``'s sampling stream: from ``(seed, rank)``, or from OS entropy when ``seed`` is None."""
    if seed is None:
        return secrets.randbits(63)
    digest = hashlib.sha256(f"poisson-sampler:{int(seed)}:{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _list_collate(units: list) -> list:
    return units


def poisson_loader(
    units: PrivacyUnits, sample_rate: float, num_workers: int = 0, seed: int | None = None, distributed: bool = False
) -> torch.utils.data.DataLoader:
    """Data loader that draws each unit independently with probability ``sample_rate``.

    Batches are lists of units (possibly empty: an empty batch still takes a noise-only
    step). One epoch is ``int(1 / sample_rate)`` steps, Opacus's convention.

    Args:
        units: the privacy units.
        sample_rate: Poisson rate q.
        num_workers: loader workers.
        seed: seed of the sampling generator (None: fresh entropy).
        distributed: sample this rank's shard (:class:`DistributedPoissonSampler`).

    Returns:
        a ``DataLoader`` yielding lists of unit dicts.
    """
    if distributed:
        sampler = DistributedPoissonSampler(
            len(units), sample_rate, idist.get_rank(), idist.get_world_size(), seed=seed
        )
    else:
        generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        sampler = UniformWithReplacementSampler(num_samples=len(units), sample_rate=sample_rate, generator=generator)
    return torch.utils.data.DataLoader(units, batch_sampler=sampler, collate_fn=_list_collate, num_workers=num_workers)
