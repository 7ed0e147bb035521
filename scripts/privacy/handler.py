"""The DP-SGD step of a MONAI trainer, as an Ignite handler.

:class:`DPTrainingHandler` turns a MONAI ``SupervisedTrainer`` into a DP-SGD trainer: its
:meth:`~DPTrainingHandler.iteration` is the trainer's ``iteration_update`` (one step on a
Poisson batch of privacy units: per-unit clipping, Gaussian noise, optimiser step), and
attached to the trainer it logs epsilon after every epoch, stops at the budget and writes the
privacy report. Accounting, budget and report live in :class:`~scripts.privacy.ledger.PrivacyLedger`.

What comes from Opacus: the noise and averaging of ``DPOptimizer`` /
``DistributedDPOptimizer`` (noise added once, on rank 0), the accountants behind the ledger,
``ModuleValidator``. What Opacus lacks and is written here: privacy units of several rows,
clipped per unit (:func:`scripts.privacy.per_sample.clipped_grad_sum`, which also splits the
logical batch into physical chunks: Opacus's ``BatchMemoryManager`` splits by rows and cannot
be used), and the write-ahead ledger.

Privacy-first choices: no statistic of the private data is logged or returned (not the
training loss, not gradient norms, not the number of units in a step); only epsilon is. Log
lines carry no wall-clock time (:func:`drop_log_times`), and every step runs with the global
RNG forked and re-seeded from OS entropy (:func:`private_rng`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import mlflow
import torch
from ignite import distributed as idist
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler
from monai.utils import look_up_option
from scripts.errors import ConfigError
from scripts.files import remove_stale_temp
from scripts.privacy.ledger import PrivacyLedger
from scripts.privacy.optimizers import UnitDistributedDPOptimizer, UnitDPOptimizer
from scripts.privacy.per_sample import MODES
from scripts.privacy.unit_clipper import UnitClipper
from scripts.privacy.unit_losses import private_generator
from scripts.privacy.validation import apply_scope, validate_network
from torch import nn

__all__ = ["DPTrainingHandler", "UntimedMLFlowHandler", "drop_log_times", "private_rng"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def private_rng(device: str | torch.device = "cpu") -> Iterator[None]:
    """Run the block with the global RNG (CPU, and ``device`` if CUDA) re-seeded from OS entropy, then restore it.

    The global RNG starts from the public config seed and is saved in checkpoints: a draw
    from it inside a DP step (a posterior sample, dropout, ``vmap``'s randomness) could be
    replayed from the seed, and how far the stream advanced would count the private rows of
    the step. Inside the block every such draw is unpredictable; after it the global state is
    as before, whatever the batch held. The bundle's own draws come from private generators
    kept in the units; this covers what a network draws by itself.
    """
    device = torch.device(device)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(secrets.randbits(63))
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(secrets.randbits(63))
        yield


def drop_log_times() -> None:
    """Remove the wall-clock field from the format of every handler of the root logger.

    configs/logging.conf stamps each line with ``asctime``; in a DP stage the gaps between the
    epoch lines are epoch durations, which grow with the number of units sampled
    (docs/privacy.md, "The privacy ledger and what the reported epsilon covers"). Applied when a DP handler is built,
    before the first step; the lines keep logger name, level and message.
    """
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        fmt = getattr(formatter, "_fmt", None) or ""
        if "asctime" not in fmt:
            continue
        untimed = fmt.replace("%(asctime)s - ", "").replace("%(asctime)s ", "").replace("%(asctime)s", "")
        handler.setFormatter(logging.Formatter(untimed or "%(name)s - %(levelname)s - %(message)s"))


class DPTrainingHandler:
    """Make a MONAI trainer's updates DP-SGD steps on privacy units, accounted by a ledger.

    Built before the trainer runs, it validates the network, freezes what the fine-tune scope
    excludes and wraps the optimiser in Opacus's ``DPOptimizer`` (``DistributedDPOptimizer``
    under torch.distributed). The clipping settings are read from the ledger's settings
    (``max_grad_norm``, ``max_physical_batch_size``, ``grad_sample_mode``, ``finetune_scope``),
    so what runs is what the report says.

    Args:
        network: the network to fine-tune (not wrapped in DDP: the DP optimiser reduces).
        optimizer: a torch optimiser over the network's parameters.
        ledger: the stage's :class:`PrivacyLedger` (sigma, q, budget, write-ahead file).
        unit_loss: :class:`~scripts.privacy.unit_losses.LatentDiffusionUnitLoss` or
            :class:`~scripts.privacy.unit_losses.AutoencoderUnitLoss`.
        report_path: the privacy report written when training completes.
        released_files: the files the report's epsilon applies to, by role
            (``{"model": models/model.pt, "autoencoder": models/autoencoder.pt}``); named
            with their SHA-256 in the report.
        device: device of the computation.
        noise_seed: seed of the DP noise; None (default) draws it from OS entropy, so the
            noise cannot be regenerated from the config.
        secure_mode: Opacus's noise robust to floating-point attacks (4 draws per
            coordinate, slower); off by default.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        ledger: PrivacyLedger,
        unit_loss: Any,
        report_path: str,
        released_files: Mapping[str, str | None] | None = None,
        device: str | torch.device = "cpu",
        noise_seed: int | None = None,
        secure_mode: bool = False,
    ) -> None:
        settings = ledger.settings
        self.max_grad_norm = float(settings["max_grad_norm"])
        self.max_physical_batch_size = int(settings["max_physical_batch_size"])
        self.grad_sample_mode = str(settings["grad_sample_mode"])
        if not self.max_grad_norm > 0:
            raise ConfigError(f"config field 'max_grad_norm': expected a number > 0, got {settings['max_grad_norm']}")
        if self.max_physical_batch_size < 1:
            raise ConfigError(
                "config field 'max_physical_batch_size': expected an integer >= 1, got "
                f"{settings['max_physical_batch_size']}"
            )
        look_up_option(self.grad_sample_mode, ("auto", *MODES))
        validate_network(network)
        self.trainable = apply_scope(network, str(settings.get("finetune_scope", "all")))
        # "auto" is resolved here, after the scope: the layers it checks are those that train
        self.clipper = UnitClipper(
            network,
            self.grad_sample_mode,
            device,
            self.max_grad_norm,
            self.max_physical_batch_size,
            generator=private_generator(None, "cpu"),
        )
        ledger.settings["grad_sample_mode"] = self.clipper.description
        drop_log_times()
        # temp files of a killed writer of the ledger or the report (the checkpoint handler cleans its own)
        for path in (ledger.path, report_path):
            if path:
                remove_stale_temp(os.path.dirname(path) or ".", [os.path.basename(path)])
        self.network, self.ledger, self.unit_loss, self.device = network, ledger, unit_loss, device
        self.report_path, self.released_files = report_path, dict(released_files or {})
        cls = UnitDistributedDPOptimizer if idist.get_world_size() > 1 else UnitDPOptimizer
        self.optimizer = cls(
            optimizer,
            noise_multiplier=ledger.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            # each rank averages its share; the ranks' gradients are then averaged
            expected_batch_size=settings["logical_batch_size"] / idist.get_world_size(),
            generator=private_generator(noise_seed, device),
            secure_mode=secure_mode,
        )
        self.params = [p for p in network.parameters() if p.requires_grad]
        logger.info(
            f"DP-SGD: {settings['units']} {settings['privacy_unit']}-level units, q={ledger.sample_rate:.4g}, "
            f"{ledger.planned_steps} steps planned, sigma={ledger.noise_multiplier:.4g}, C={self.max_grad_norm}, "
            f"K={settings.get('noise_multiplicity', 1)}, per-unit gradients: {self.clipper.description}, target "
            f"(epsilon={ledger.target_epsilon:g}, delta={ledger.delta:g}), {ledger.accountant} accountant"
        )

    def iteration(self, engine: Engine, batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One DP-SGD step on a Poisson batch of units (MONAI ``iteration_update``).

        Args:
            engine: the trainer.
            batch: the sampled units (possibly none: a noise-only step).

        Returns:
            ``{"step": steps so far}``; nothing computed from the private data.
        """
        if not self.ledger.can_step():
            logger.warning(
                f"privacy budget reached: {self.ledger.steps} steps give epsilon <= {self.ledger.target_epsilon:g}, "
                "one "
                "more would exceed it; stopping"
            )
            engine.terminate()
            return {"step": self.ledger.steps, "skipped": True}
        self.ledger.step()  # recorded before the step reads private data
        self.network.train()
        with private_rng(self.device):
            units = [self.unit_loss.make_unit(u, self.device) for u in batch]
            summed = self.clipper(self.unit_loss.loss, units)
            if self.clipper.description != self.ledger.settings["grad_sample_mode"]:  # a fall-back: the report says so
                self.ledger.settings["grad_sample_mode"] = self.clipper.description
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.set_clipped_sum(self.params, summed)
            self.optimizer.step()
        return {"step": self.ledger.steps}

    def attach(self, engine: Engine) -> None:
        """Log epsilon after every epoch (``engine.state.metrics["epsilon"]``); write the report at the end.

        Attach it after the checkpoint handler: the report names the final model file and its
        hash, so it is written once that file exists. A run that does not complete never
        replaces the report of an earlier, complete one. The trainer's own INFO messages
        ("Epoch[n] Complete. Time taken: ...") are silenced: in a DP stage a step's time grows
        with the number of units it drew, so per-epoch times are a side channel.

        Args:
            engine: the trainer.
        """
        engine.logger.setLevel(logging.WARNING)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def epoch_completed(self, engine: Engine) -> None:
        """Put epsilon and the step count in the trainer's metrics and the log."""
        eps = self.ledger.get_epsilon()
        engine.state.metrics["epsilon"] = eps
        engine.state.metrics["dp_steps"] = self.ledger.steps
        logger.info(
            f"epoch {engine.state.epoch}: {self.ledger.steps} DP steps, epsilon = {eps:.4f} (delta = "
            f"{self.ledger.delta:g})"
        )

    def completed(self, engine: Engine) -> None:
        """Mark the ledger complete and write the privacy report."""
        self.ledger.complete()
        report = self.ledger.write_report(self.report_path, self.released_files)
        logger.info(
            f"privacy: epsilon = {report['epsilon']:.4f}, delta = {self.ledger.delta:g}, "
            f"{report['privacy_unit']}-level, "
            f"{len(report['stages'])} stage(s) composed with the {self.ledger.accountant} accountant; report: "
            f"{self.report_path}"
        )

    def state_dict(self) -> dict[str, Any]:
        """The ledger's state (the accountant history lives in the checkpoint)."""
        return {"ledger": self.ledger.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the ledger and use its noise multiplier."""
        self.ledger.load_state_dict(state["ledger"])
        self.optimizer.noise_multiplier = self.ledger.noise_multiplier


class UntimedMLFlowHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` whose metrics all carry the run's start time, not each epoch's wall time.

    MLflow stamps every logged metric with the time it was logged; in a DP stage the gaps
    between per-epoch stamps are epoch durations, which grow with the number of units sampled
    (a timing side channel of the private data). Epsilon itself is a function of public
    quantities. MONAI offers no option for the timestamp, hence this override.
    """

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if not self.cur_run:
            raise ConfigError("Current Run is not Active to log metrics")
        stamp = int(self.cur_run.info.start_time)
        entries = [mlflow.entities.Metric(k, float(v), stamp, step or 0) for k, v in metrics.items()]
        self.client.log_batch(run_id=self.cur_run.info.run_id, metrics=entries, params=[], tags=[])
