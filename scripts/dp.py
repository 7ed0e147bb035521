"""DP-SGD fine-tuning on MONAI's Ignite trainer: privacy units, Poisson sampling, the DP engine handler.

What comes from Opacus: Poisson sampling (``UniformWithReplacementSampler`` and its
distributed variant), the noise and the averaging of ``DPOptimizer`` /
``DistributedDPOptimizer`` (noise added once, on rank 0), the accountants (PRV, RDP) and
the noise calibration (:mod:`scripts.privacy`), and ``ModuleValidator``.

What Opacus lacks, and is written here:

- **privacy units** of several rows: Opacus clips per batch row, so it can neither keep a
  subject's ED and ES volumes together nor average K (timestep, noise) draws of a record
  before clipping. Units are clipped by :func:`scripts.per_sample.clipped_grad_sum`,
  which also splits the logical batch into physical chunks (so memory does not grow with
  the logical batch; Opacus's ``BatchMemoryManager`` splits by rows and cannot be used);
- a **write-ahead ledger**: every step is recorded on disk before it touches the data, so
  a run killed between two checkpoints still counts the steps it took after the last
  checkpoint when it resumes (the weights roll back, the privacy spent does not);
- the **budget stop** and the **privacy report** that composes every stage that touched
  the private data with the accountant's own composition.

Privacy-first choices: no statistic of the private data is logged (not the training
loss, not gradient norms: they are not differentially private); only epsilon is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from opacus.accountants import create_accountant
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler, UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from scripts.engines import LatentDiffusionPrepareBatch, make_condition
from scripts.files import write_text_atomic
from scripts.per_sample import clipped_grad_sum
from scripts.privacy import calibrate_noise, compose_epsilon

logger = logging.getLogger(__name__)

SCOPES = ("all", "attention", "conditioning")
UNITS = ("subject", "record")


# ----------------------------------------------------------------------------- network checks


def validate_network(model: nn.Module) -> None:
    """Raise ``ValueError`` naming every module that is invalid under DP-SGD.

    A layer that normalises across the batch (BatchNorm, InstanceNorm with running stats)
    mixes records, so one record's contribution is no longer bounded by clipping. Opacus's
    ``ModuleValidator`` is run on each module so its findings carry the module's name.

    Args:
        model: the network to train.
    """
    errors = []
    was_training = model.training
    model.train()  # Opacus's validators also require training mode, which is not a DP property
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) or (isinstance(module, _InstanceNorm) and module.track_running_stats):
            errors.append(f"'{name}' ({type(module).__name__}) normalises across the batch and mixes records")
        elif next(module.children(), None) is None:  # leaves: Opacus's validators look at leaf modules
            errors += [f"'{name}' ({type(module).__name__}): {e}" for e in ModuleValidator.validate(module, strict=False)]
    model.train(was_training)
    if errors:
        raise ValueError(
            "network is not valid for DP-SGD: " + "; ".join(errors) + ". Use GroupNorm or LayerNorm instead."
        )


def apply_scope(model: nn.Module, scope: str) -> list[str]:
    """Freeze every parameter outside the fine-tune ``scope``; return the trainable names.

    Scopes: ``all``; ``attention`` (the UNet's spatial-transformer blocks and the attribute
    encoder, as DP-LDM and the paper's ``finetune`` flag); ``conditioning`` (the attribute
    encoder and the cross-attention layers that read its tokens).

    Args:
        model: a :class:`~scripts.networks.ConditionalDiffusionUNet` (or any module for ``all``).
        scope: one of :data:`SCOPES`.

    Returns:
        names of the parameters left trainable.
    """
    from monai.networks.nets.diffusion_model_unet import SpatialTransformer

    if scope not in SCOPES:
        raise ValueError(f"config field 'finetune_scope': expected one of {list(SCOPES)}, got {scope!r}")
    if scope == "all":
        selected = {id(p) for p in model.parameters()}
    else:
        modules = [m for n, m in model.named_modules() if n == "attribute_encoder"]
        if scope == "attention":
            modules += [m for m in model.modules() if isinstance(m, SpatialTransformer)]
        else:
            modules += [m for n, m in model.named_modules() if n.endswith(".attn2")]
        if not modules:
            raise ValueError(f"finetune_scope={scope!r}: the network has no attribute encoder or attention blocks")
        selected = {id(p) for m in modules for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in selected)
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- privacy units


class PrivacyUnits(torch.utils.data.Dataset):
    """A dataset of privacy units: one subject (all its volumes) or one record (one volume).

    Args:
        dataset: a MONAI dataset whose items hold ``image``, ``attributes``, ``missing``,
            ``id``; its ``data`` list holds each record's ``subject``.
        unit: ``"subject"`` (default, a subject's ED and ES volumes together) or ``"record"``.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, unit: str = "subject") -> None:
        if unit not in UNITS:
            raise ValueError(f"config field 'privacy_unit': expected one of {list(UNITS)}, got {unit!r}")
        self.dataset, self.unit = dataset, unit
        if unit == "subject":
            unnamed = [str(item.get("id", i)) for i, item in enumerate(dataset.data) if not item.get("subject")]
            if unnamed:
                raise ValueError(
                    f"privacy_unit='subject' needs a 'subject' key in every datalist entry; {len(unnamed)} entries have "
                    f"none (e.g. {unnamed[:3]}). Add it (volumes of one person share it), or use --privacy_unit record "
                    "if every volume is a different person"
                )
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
        distributed: sample this rank's shard (Opacus's distributed Poisson sampler).

    Returns:
        a ``DataLoader`` yielding lists of unit dicts.
    """
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    if distributed:
        sampler = DistributedUniformWithReplacementSampler(
            total_size=len(units), sample_rate=sample_rate, shuffle_seed=0 if seed is None else seed, generator=generator
        )
    else:
        sampler = UniformWithReplacementSampler(num_samples=len(units), sample_rate=sample_rate, generator=generator)
    return torch.utils.data.DataLoader(units, batch_sampler=sampler, collate_fn=_list_collate, num_workers=num_workers)


# ----------------------------------------------------------------------------- per-unit loss


class LatentDiffusionUnits(LatentDiffusionPrepareBatch):
    """Turn a unit's records into the rows of its loss: K (timestep, noise) draws per record.

    The K draws of a record are rows of ONE unit, so the unit's loss averages them before
    clipping and the unit's sensitivity stays ``max_grad_norm`` (noise multiplicity as in
    DPDM). Stacking them as separate units would clip each draw as its own record.

    Args:
        autoencoder: frozen pre-trained autoencoder (its stored scale factor is used).
        scheduler: the training noise scheduler (``add_noise``).
        noise_multiplicity: K draws per record.
        condition_dropout: probability of dropping the whole condition of a row.
        attribute_dropout: probability of dropping each attribute of a row.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        scheduler: Any,
        noise_multiplicity: int = 1,
        condition_dropout: float = 0.0,
        attribute_dropout: float = 0.0,
    ) -> None:
        super().__init__(autoencoder, scheduler.num_train_timesteps, condition_dropout, attribute_dropout)
        if noise_multiplicity < 1:
            raise ValueError(f"config field 'noise_multiplicity': expected an integer >= 1, got {noise_multiplicity}")
        self.scheduler, self.k = scheduler, int(noise_multiplicity)

    def make_unit(self, unit: Mapping[str, Any], device: str | torch.device) -> dict[str, torch.Tensor]:
        """The unit's rows: latents, noise, timesteps, condition, each with m = records x K rows."""
        latents = self.encode(unit["image"].to(device)).repeat_interleave(self.k, dim=0)
        condition = make_condition(unit["attributes"], unit["missing"]).repeat_interleave(self.k, dim=0)
        noise = torch.randn(latents.shape).to(device)
        timesteps = torch.randint(0, self.num_train_timesteps, (latents.shape[0],)).to(device)
        return {
            "latents": latents,
            "noise": noise,
            "timesteps": timesteps,
            "condition": self.drop_attributes(condition).to(device),
        }

    def loss(self, net: Callable[..., torch.Tensor], unit: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean squared error of the predicted noise over the unit's rows (vmap-safe)."""
        noisy = self.scheduler.add_noise(unit["latents"], unit["noise"], unit["timesteps"])
        prediction = net(noisy, unit["timesteps"], unit["condition"])
        return ((prediction - unit["noise"]) ** 2).mean()


class AutoencoderUnits:
    """Rows of one unit for DP fine-tuning of the autoencoder: its volumes, K posterior draws.

    Args:
        loss_function: ``AutoencoderKLLoss`` (reconstruction + KL).
        noise_multiplicity: K posterior samples per record.
    """

    def __init__(self, loss_function: nn.Module, noise_multiplicity: int = 1) -> None:
        self.loss_function, self.k = loss_function, int(noise_multiplicity)

    def make_unit(self, unit: Mapping[str, Any], device: str | torch.device) -> dict[str, torch.Tensor]:
        """The unit's images, each repeated K times."""
        return {"image": unit["image"].to(device).repeat_interleave(self.k, dim=0)}

    def loss(self, net: Callable[..., torch.Tensor], unit: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Autoencoder loss of the unit's rows."""
        return self.loss_function(net(unit["image"]), unit["image"])


# ----------------------------------------------------------------------------- optimiser


class _UnitClipped:
    """Mixin for Opacus's DP optimisers when clipping already happened per privacy unit.

    ``DPOptimizer.pre_step`` clips ``p.grad_sample`` per batch row; here the caller sets
    ``p.summed_grad`` to the sum of per-unit clipped gradients
    (:func:`scripts.per_sample.clipped_grad_sum`), and the optimiser only adds the
    Gaussian noise (std = noise_multiplier x max_grad_norm), averages by the expected batch
    size, calls the accountant hook, and steps.
    """

    @property
    def accumulated_iterations(self) -> int:
        return 1

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool:
        if any(p.summed_grad is None for p in self.params):
            raise RuntimeError("set_clipped_sum() must be called before step()")
        self.add_noise()
        self.scale_grad()
        if self.step_hook:
            self.step_hook(self)
        return True

    def set_clipped_sum(self, params: Sequence[torch.Tensor], summed: Sequence[torch.Tensor]) -> None:
        """Hand over the per-unit clipped gradient sum, parameter by parameter."""
        for p in self.params:
            p.summed_grad = None
        for p, g in zip(params, summed):
            p.summed_grad = g


class UnitDPOptimizer(_UnitClipped, DPOptimizer):
    """``DPOptimizer`` fed with per-unit clipped sums (single process)."""


class UnitDistributedDPOptimizer(_UnitClipped, DistributedDPOptimizer):
    """``DistributedDPOptimizer`` fed with per-unit clipped sums: noise on rank 0, then all-reduce."""


# ----------------------------------------------------------------------------- files


def sha256(path: str) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_rank0() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_rank() == 0


def calibrate(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, prior: Sequence) -> float:
    """Noise multiplier for ``steps`` more steps so that the whole ledger stays within the target.

    Without earlier stages this is :func:`scripts.privacy.calibrate_noise` (Opacus's
    search). With earlier stages (e.g. a DP-fine-tuned autoencoder on the same data) the
    composition must include them, which Opacus's search cannot do: bisect on sigma with
    :func:`scripts.privacy.compose_epsilon`.
    """
    if not prior:
        return calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant)
    spent = compose_epsilon(list(prior), delta, accountant)
    if spent >= target_epsilon:
        raise ValueError(
            f"target_epsilon={target_epsilon:g} is already spent by earlier stages on this data (epsilon={spent:.4g}); "
            "raise target_epsilon or fine-tune from a non-private autoencoder"
        )
    low, high = 0.05, calibrate_noise(target_epsilon - spent, delta, sample_rate, steps, accountant) * 4
    if compose_epsilon([*prior, (high, sample_rate, steps)], delta, accountant) > target_epsilon:
        raise ValueError(f"target_epsilon={target_epsilon:g} cannot be reached after the earlier stages ({spent:.4g})")
    for _ in range(30):
        mid = 0.5 * (low + high)
        if compose_epsilon([*prior, (mid, sample_rate, steps)], delta, accountant) > target_epsilon:
            low = mid
        else:
            high = mid
        if high - low < 5e-3 * high:  # each evaluation composes PRVs (~1-2 s): a coarse sigma, rounded up
            break
    return high


# ----------------------------------------------------------------------------- engine handler


class DPEngine:
    """Ignite handler that makes a MONAI trainer's updates DP-SGD steps, accounted and budgeted.

    Built from the bundle config, before the trainer runs, it validates the network,
    freezes what the fine-tune scope excludes, calibrates the noise multiplier for the
    planned steps and the target (epsilon, delta), and wraps the optimiser in Opacus's
    ``DPOptimizer`` (``DistributedDPOptimizer`` under torch.distributed) with the
    accountant's step hook. The trainer's ``iteration_update`` is :meth:`iteration`; the
    data loader is :func:`poisson_loader` over :class:`PrivacyUnits`. Attached to the
    trainer it logs epsilon after every epoch and writes the privacy report.

    Args:
        network: the network to fine-tune (not wrapped in DDP: the DP optimiser reduces).
        optimizer: a torch optimiser over the network's parameters.
        units: the private :class:`PrivacyUnits` (all of them, on every rank).
        unit_rows: :class:`LatentDiffusionUnits` or :class:`AutoencoderUnits`.
        target_epsilon: budget of the whole ledger (earlier stages on this data included).
        target_delta: delta.
        max_grad_norm: per-unit clipping bound C.
        epochs: planned epochs; one epoch is ``int(1 / sample_rate)`` steps.
        logical_batch_size: expected units per step (sample rate = this / number of units).
        max_physical_batch_size: the most units whose gradients are held at once.
        accountant: ``"prv"`` (default) or ``"rdp"``.
        finetune_scope: one of :data:`SCOPES`.
        grad_sample_mode: ``"loop"`` or ``"vmap"`` (:func:`scripts.per_sample.clipped_grad_sum`).
        ledger_path: write-ahead ledger file of this stage.
        report_path: the privacy report to write when training completes.
        model_path: the final model file the report describes (named with its SHA-256).
        stage: name of the stage in the ledger.
        dataset: description of the private dataset (for the report).
        prior_stages: ledger entries of earlier stages whose output this one builds on.
        device: device of the computation.
        noise_seed: seed of the DP noise; None (default) draws it from OS entropy, so the
            noise cannot be regenerated from the config.
        noise_multiplier: use this sigma instead of calibrating (the report still states
            the epsilon it gives). 0 switches the noise off (epsilon is infinite, so it needs
            ``target_epsilon=inf``): only for sensitivity tests.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        units: PrivacyUnits,
        unit_rows: LatentDiffusionUnits | AutoencoderUnits,
        target_epsilon: float,
        target_delta: float,
        max_grad_norm: float,
        epochs: int,
        logical_batch_size: int,
        max_physical_batch_size: int = 8,
        accountant: str = "prv",
        finetune_scope: str = "all",
        grad_sample_mode: str = "loop",
        ledger_path: str = "models/privacy_ledger.json",
        report_path: str = "models/privacy_report.json",
        model_path: str | None = None,
        stage: str = "diffusion_dp_finetune",
        dataset: str = "",
        prior_stages: Sequence[Mapping[str, Any]] = (),
        device: str | torch.device = "cpu",
        noise_seed: int | None = None,
        noise_multiplier: float | None = None,
    ) -> None:
        validate_network(network)
        self.trainable = apply_scope(network, finetune_scope)
        if not self.trainable:
            raise ValueError(f"finetune_scope={finetune_scope!r} leaves no trainable parameter")
        n = len(units)
        if logical_batch_size < 1 or n < logical_batch_size:
            raise ValueError(
                f"the private dataset has {n} privacy units ({units.unit}-level, {units.num_records} records), fewer than "
                f"logical_batch_size={logical_batch_size}; use a logical batch size of at most {n} (DP-SGD with Poisson "
                "sampling needs sample_rate = logical_batch_size / units <= 1)"
            )
        if max_grad_norm <= 0:
            raise ValueError(f"config field 'max_grad_norm': expected a number > 0, got {max_grad_norm}")
        self.network, self.units, self.unit_rows, self.device = network, units, unit_rows, device
        self.max_grad_norm, self.max_physical_batch_size, self.grad_sample_mode = max_grad_norm, max_physical_batch_size, grad_sample_mode
        self.target_epsilon, self.delta, self.accountant_name = float(target_epsilon), float(target_delta), accountant
        self.ledger_path, self.report_path, self.model_path = ledger_path, report_path, model_path
        self.stage, self.dataset = stage, dataset
        self.prior = [dict(s) for s in prior_stages]
        self.sample_rate = logical_batch_size / n
        self.steps_per_epoch = int(1 / self.sample_rate)
        self.planned_steps = int(epochs) * self.steps_per_epoch
        self.config = {
            "stage": stage,
            "dataset": dataset,
            "privacy_unit": units.unit,
            "units": n,
            "records": units.num_records,
            "logical_batch_size": logical_batch_size,
            "max_physical_batch_size": max_physical_batch_size,
            "max_grad_norm": float(max_grad_norm),
            "noise_multiplicity": getattr(unit_rows, "k", 1),
            "finetune_scope": finetune_scope,
            "accountant": accountant,
            "grad_sample_mode": grad_sample_mode,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
        }
        prior_history = self._history(self.prior)
        if noise_multiplier is None:
            noise_multiplier = calibrate(
                self.target_epsilon, self.delta, self.sample_rate, self.planned_steps, accountant, prior_history
            )
        self.noise_multiplier = float(noise_multiplier)
        self.accountant = create_accountant(accountant)
        self.steps_done = 0  # steps recorded in the write-ahead ledger
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        generator = torch.Generator(device=device).manual_seed(secrets.randbits(63) if noise_seed is None else noise_seed)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if distributed else 1
        cls = UnitDistributedDPOptimizer if distributed else UnitDPOptimizer
        self.optimizer = cls(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=logical_batch_size / world,  # each rank averages its share; ranks' grads are averaged
            generator=generator,
        )
        self.optimizer.attach_step_hook(self.accountant.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        self.params = [p for p in network.parameters() if p.requires_grad]
        self.safe_steps = self._safe_steps()
        logger.info(
            f"DP-SGD: {n} {units.unit}-level units, q={self.sample_rate:.4g}, {self.planned_steps} steps planned, "
            f"sigma={self.noise_multiplier:.4g}, C={max_grad_norm}, K={self.config['noise_multiplicity']}, "
            f"target (epsilon={self.target_epsilon:g}, delta={self.delta:g}), {accountant} accountant"
        )

    # -- accounting ---------------------------------------------------------------------------

    @staticmethod
    def _history(stages: Sequence[Mapping[str, Any]]) -> list[tuple[float, float, int]]:
        return [(s["noise_multiplier"], s["sample_rate"], s["steps"]) for s in stages if s["steps"] > 0]

    def _stage_entry(self, steps: int) -> dict[str, Any]:
        return {
            **self.config,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": int(steps),
            "epochs": steps / self.steps_per_epoch,
        }

    def epsilon(self) -> float:
        """Epsilon of the whole ledger: earlier stages composed with this stage's accountant history."""
        if self.noise_multiplier == 0 and self.steps_done > 0:
            return math.inf
        history = self._history(self.prior) + [tuple(h) for h in self.accountant.history]
        return compose_epsilon(history, self.delta, self.accountant_name) if history else 0.0

    def _fits(self, steps: int) -> bool:
        """Whether ``steps`` steps of this stage keep the whole ledger within the target."""
        if self.noise_multiplier == 0 and steps > 0:  # noise off: no privacy, only an infinite target allows it
            return math.isinf(self.target_epsilon)
        history = self._history(self.prior) + ([(self.noise_multiplier, self.sample_rate, steps)] if steps > 0 else [])
        return not history or compose_epsilon(history, self.delta, self.accountant_name) <= self.target_epsilon

    def _safe_steps(self) -> int:
        """Step count known to fit the budget: the plan (checked once), else found by bisection.

        Steps beyond it are checked one by one when taken (:meth:`iteration`), so a run
        extended on resume stops exactly where one more step would exceed the target.
        """
        if self._fits(self.planned_steps):
            return self.planned_steps
        low, high = 0, self.planned_steps
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self._fits(mid) else (low, mid)
        return low

    # -- write-ahead ledger ---------------------------------------------------------------------

    def _write_ledger(self) -> None:
        if _is_rank0():
            write_text_atomic(self.ledger_path, json.dumps({"stages": self.ledger(), "started": self.started}, indent=2))

    # -- the DP step ------------------------------------------------------------------------------

    def iteration(self, engine: Engine, batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One DP-SGD step on a Poisson batch of units (MONAI ``iteration_update``)."""
        if self.steps_done + 1 > self.safe_steps:
            if self._fits(self.steps_done + 1):
                self.safe_steps = self.steps_done + 1
        if self.steps_done + 1 > self.safe_steps:
            logger.warning(
                f"privacy budget reached: {self.steps_done} steps give epsilon <= {self.target_epsilon:g}, one more "
                "would exceed it; stopping"
            )
            engine.terminate()
            return {"units": 0, "step": self.steps_done, "skipped": True}
        self.steps_done += 1
        self._write_ledger()  # record the step before it reads private data
        self.network.train()
        units = [self.unit_rows.make_unit(u, self.device) for u in batch]
        summed, _ = clipped_grad_sum(
            self.network, self.unit_rows.loss, units, self.max_grad_norm, self.grad_sample_mode, self.max_physical_batch_size
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.set_clipped_sum(self.params, summed)
        self.optimizer.step()
        # the per-unit losses and norms are private statistics: nothing of them is returned or logged
        return {"units": len(units), "step": self.steps_done}

    # -- handler ----------------------------------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        """Log epsilon after every epoch (as ``engine.state.metrics["epsilon"]``); write the report at the end.

        Attach it after the checkpoint handler: the report names the final model file
        and its hash, so it is written once that file exists. A run that does not
        complete never replaces the report of an earlier, complete one.
        """
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def epoch_completed(self, engine: Engine) -> None:
        eps = self.epsilon()
        engine.state.metrics["epsilon"] = eps
        engine.state.metrics["dp_steps"] = self.steps_done
        logger.info(f"epoch {engine.state.epoch}: {self.steps_done} DP steps, epsilon = {eps:.4f} (delta = {self.delta:g})")

    def completed(self, engine: Engine) -> None:
        report = self.write_report(self.model_path)
        logger.info(
            f"privacy: epsilon = {report['epsilon']:.4f}, delta = {self.delta:g}, {self.units.unit}-level, "
            f"{len(report['stages'])} stage(s) composed with the {self.accountant_name} accountant; report: {self.report_path}"
        )

    def report(self, model_path: str | None = None) -> dict[str, Any]:
        """The privacy report: the composed (epsilon, delta) and every stage of the ledger."""
        stages = [dict(s) for s in self.prior] + [self._stage_entry(self.steps_done)]
        for s in stages:
            s["epsilon_alone"] = (
                compose_epsilon(self._history([s]), s["delta"], s["accountant"]) if s["steps"] > 0 else 0.0
            )
        report = {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": self.accountant_name,
            "composition": f"{self.accountant_name} accountant over all stages (opacus), not a sum of epsilons",
            "privacy_unit": self.units.unit,
            "covers": (
                f"{'subject' if self.units.unit == 'subject' else 'record'}-level differential privacy of the private "
                "training data for everything derived from this model (weights, synthetic images). Not covered: the "
                "public pre-training data, and attribute values copied from private records to condition sampling "
                "(that is a separate release)."
            ),
            "status": "complete",
            "stages": stages,
        }
        if model_path and os.path.isfile(model_path):
            report["model"] = model_path
            report["model_sha256"] = sha256(model_path)
        return report

    def write_report(self, model_path: str | None = None) -> dict[str, Any]:
        """Write the report atomically (rank 0) and return it."""
        report = self.report(model_path)
        if _is_rank0():
            write_text_atomic(self.report_path, json.dumps(report, indent=2))
        return report

    def ledger(self) -> list[dict[str, Any]]:
        """The ledger entries (earlier stages + this one) to store beside the weights."""
        return [*self.prior, self._stage_entry(self.steps_done)]

    # -- checkpointing ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps_done": self.steps_done,
            "config": self.config,
            "prior": self.prior,
            "started": self.started,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: restore the accountant and count the steps the write-ahead ledger recorded after the checkpoint."""
        keys = ("privacy_unit", "units", "records", "logical_batch_size", "max_grad_norm", "noise_multiplicity", "accountant", "delta")
        changed = [k for k in keys if state["config"].get(k) != self.config.get(k)]
        if changed:
            raise ValueError(
                f"cannot resume: the DP settings {changed} differ from the checkpoint's "
                f"({ {k: state['config'].get(k) for k in changed} }); resume with the same settings or start afresh"
            )
        self.noise_multiplier = float(state["noise_multiplier"])
        self.optimizer.noise_multiplier = self.noise_multiplier
        self.accountant.load_state_dict(state["accountant"])
        self.prior, self.started = [dict(s) for s in state["prior"]], state["started"]
        self.steps_done = int(state["steps_done"])
        if os.path.isfile(self.ledger_path):
            with open(self.ledger_path) as f:
                ledger = json.load(f)
            if ledger.get("started") == self.started:
                logged = int(ledger["stages"][-1]["steps"])
                if logged > self.steps_done:
                    lost = logged - self.steps_done
                    logger.warning(
                        f"{lost} DP step(s) ran after the last checkpoint: their weights are lost, their privacy cost is kept"
                    )
                    self.accountant.history.append((self.noise_multiplier, self.sample_rate, lost))
                    self.steps_done = logged
        self.safe_steps = self._safe_steps()


def summary(report_path: str) -> str:
    """A few lines on the privacy report, for the end of a run."""
    if not os.path.isfile(report_path):
        return f"no privacy report at {report_path} (the run did not complete)"
    with open(report_path) as f:
        r = json.load(f)
    lines = [
        f"Privacy report {report_path}",
        f"  epsilon = {r['epsilon']:.4f} (target {r['target_epsilon']:g}), delta = {r['delta']:g}, "
        f"{r['privacy_unit']}-level, {r['accountant']} accountant",
    ]
    for s in r["stages"]:
        lines.append(
            f"  stage {s['stage']}: {s['units']} units / {s['records']} records, sigma = {s['noise_multiplier']:.4g}, "
            f"q = {s['sample_rate']:.4g}, {s['steps']} steps ({s['epochs']:.3g} epochs), C = {s['max_grad_norm']:g}, "
            f"K = {s['noise_multiplicity']}, scope = {s['finetune_scope']}, epsilon alone = {s['epsilon_alone']:.4f}"
        )
    if "model" in r:
        lines.append(f"  model: {r['model']} (sha256 {r['model_sha256'][:16]}...)")
    return "\n".join(lines)


def refuse_private_loss_logging(handlers: Sequence[Any]) -> None:
    """Raise ``ValueError`` if a handler would log per-iteration outputs of the DP trainer.

    MONAI's ``--tracking mlflow`` appends an ``MLFlowHandler`` that logs the training loss every
    iteration: on private data that is not differentially private. The DP stages log epsilon
    to MLflow through their own handler instead.

    Args:
        handlers: the trainer's handlers (``train#handlers`` of the bundle config).
    """
    from monai.handlers import MLFlowHandler

    for h in handlers:
        if isinstance(h, MLFlowHandler) and h.iteration_log:
            raise ValueError(
                "an MLflow handler would log the training loss on the PRIVATE data every iteration (MONAI's "
                "--tracking mlflow does that), which is not differentially private. The DP stages already log their "
                "parameters and epsilon to MLflow: drop --tracking and use --tracking_uri / --experiment_name"
            )
