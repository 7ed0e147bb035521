"""Ignite event handlers that MONAI's handler set lacks.

- :class:`AtomicCheckpoint`: MONAI's ``CheckpointSaver`` writes non-atomically and, on an
  exception, overwrites the final checkpoint with the failed run's state; a failed run here
  must never replace a good artefact. This handler writes ``<name>_last.pt`` every epoch
  (for resume) and the final file only when training completes, both via temp + rename;
  when attached it removes the temp files a killed run left for those two files.
- :class:`RNGState`: torch / numpy / random generator states as a checkpointable object.
- :class:`LatentScaleFactor`: measures 1 / std of the autoencoder's latents on the public
  training data when training completes and stores it inside the autoencoder.
- :class:`MontagePNG`: writes a PNG montage of slices (reconstructions or samples) that the
  MLflow handler then logs as an artifact.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from ignite import distributed as idist
from ignite.engine import Engine, Events
from scripts.errors import CheckpointError, ConfigError, DataError
from scripts.files import atomic_path, remove_stale_temp

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the target directory, then rename over ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def resume(
    path: str,
    objects: Mapping[str, Any],
    trainer: Engine,
    map_location: Any = "cpu",
    *,
    finish_pending: Callable[[], bool] | None = None,
) -> bool:
    """Restore a run from the resume checkpoint written by :class:`AtomicCheckpoint`, if it exists.

    Called before ``trainer.run()`` rather than as a STARTED handler: the trainer's handlers
    cannot reference the trainer in a bundle config (circular reference), and loading before
    ``run`` guarantees every STARTED handler (e.g. validation at start) sees restored weights.
    The configured ``max_epochs`` is kept, so a finished run can be extended.

    Args:
        path: resume checkpoint; a missing file means a fresh run.
        objects: ``{key: object with load_state_dict}`` matching the saved keys.
        trainer: the Ignite trainer; its epoch / iteration counters are restored.
        map_location: ``torch.load`` map location.
        finish_pending: for a checkpoint of a run that did every epoch: called after its objects
            are restored, True when that run was killed before its final files (the DP stage: its
            write-ahead ledger is not marked complete). The run is then restored, not refused,
            and :func:`finish` writes those files without a step.

    Returns:
        True if a checkpoint was restored.
    """
    from scripts.networks import load_checkpoint

    if not os.path.isfile(path):
        return False
    stage = "this stage (it writes its resume checkpoint every epoch); or pass --resume False to start afresh"
    ckpt = load_checkpoint(path, stage, map_location)
    missing = [k for k in [*objects, "trainer"] if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path}: resume checkpoint lacks {missing} (written by another stage or version?); delete it or pass "
            "--resume False to start afresh"
        )
    max_epochs = trainer.state.max_epochs
    state = ckpt["trainer"]  # Ignite's Engine.state_dict(): iteration, epoch_length, max_epochs
    done = state["epoch"] if "epoch" in state else state["iteration"] // max(state.get("epoch_length") or 1, 1)
    finished = max_epochs is not None and done >= max_epochs
    if finished and finish_pending is None:
        raise ConfigError(
            f"{path}: the run to resume has already done {done} epochs (configured epochs={max_epochs}); "
            f"pass --epochs N with N > {done} to continue it, or --resume False to start afresh"
        )
    for key, obj in objects.items():
        try:
            getattr(obj, "module", obj).load_state_dict(ckpt[key])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(
                f"{path}: its '{key}' does not fit this run's configuration "
                f"({type(e).__name__}: {str(e).strip()[:200]}); "
                "resume with the settings it was written with, or pass --resume False to start afresh"
            ) from e
    if finished and not finish_pending():
        raise ConfigError(
            f"{path}: the run to resume has already done {done} epochs (configured epochs={max_epochs}) and wrote "
            f"its final files; pass --epochs N with N > {done} to continue it, or --resume False to start afresh"
        )
    trainer.load_state_dict(ckpt["trainer"])
    if max_epochs is not None:
        trainer.state.max_epochs = max_epochs
    logger.info(f"resumed from {path} at epoch {trainer.state.epoch}")
    return True


def checkpoint_run_id(path: str) -> str | None:
    """The run id of the privacy ledger a DP resume checkpoint holds (None: no such checkpoint or no ledger).

    Read before the ledger is built, so that a rerun recognises its own write-ahead entry
    instead of composing it as an earlier run; a file that cannot be read is the resume's to
    report, so it gives None here.
    """
    if not os.path.isfile(path):
        return None
    try:
        ledger = torch.load(path, map_location="cpu", weights_only=False).get("dp", {}).get("ledger", {})
    except Exception:  # noqa: BLE001 - any unreadable file: the resume names it with the stage to rerun
        return None
    return ledger.get("run_id") or ledger.get("started")


def finish(trainer: Engine) -> bool:
    """Fire COMPLETED on a trainer restored at its last epoch, instead of running it: the final files without a step.

    A run killed after its last step, while its final checkpoint or report was written, has
    spent its whole budget; ``trainer.run()`` on a finished state would start over. Firing the
    event runs exactly the end-of-run handlers (final checkpoint, privacy report, MLflow).

    Returns:
        True if the trainer was finished this way, False if it still has epochs to run.
    """
    if trainer.state.max_epochs is None or trainer.state.epoch < trainer.state.max_epochs:
        return False
    logger.warning(
        f"the resumed run did all {trainer.state.epoch} epochs but was stopped before its final files: writing them "
        "from its last checkpoint, without a training step (no privacy is spent)"
    )
    trainer.fire_event(Events.COMPLETED)
    return True


class RNGState:
    """The global RNG states (torch, numpy, random) as an object with ``state_dict``."""

    def state_dict(self) -> dict[str, Any]:
        """Capture the current generator states."""
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore generator states captured by :meth:`state_dict`."""
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["random"])


def non_finite_tensors(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) checkpoint ``state`` that hold NaN or inf."""
    if isinstance(state, torch.Tensor):
        finite = not state.is_floating_point() or bool(torch.isfinite(state).all())
        return [] if finite else [prefix or "tensor"]
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [
        name for key, value in items for name in non_finite_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    ]


class AtomicCheckpoint:
    """Save objects every ``save_interval`` epochs to ``last_filename`` and at the end to ``final_filename``.

    The engine's own state (epoch, iteration) is saved under ``"trainer"``; :func:`resume`
    restores it.

    Args:
        save_dir: directory of the checkpoints (created if needed).
        save_dict: ``{key: object with state_dict()}``; callables are called at save time,
            plain values are stored as they are.
        final_filename: file written once training completes (the stage's artefact).
        last_filename: file rewritten every ``save_interval`` epochs, used to resume.
        save_interval: epochs between resume checkpoints.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        final_filename: str,
        last_filename: str,
        save_interval: int = 1,
    ) -> None:
        self.save_dir, self.save_dict = save_dir, dict(save_dict)
        self.final_path = os.path.join(save_dir, final_filename)
        self.last_path = os.path.join(save_dir, last_filename)
        self.save_interval = save_interval
        self.filenames = (final_filename, last_filename)

    def attach(self, engine: Engine) -> None:
        """Register on ``engine``: EPOCH_COMPLETED -> last checkpoint, COMPLETED -> final.

        Also removes the temp files of these two checkpoints that a killed run left behind.
        """
        if idist.get_rank() == 0:
            for stale in remove_stale_temp(self.save_dir, self.filenames):
                logger.info(f"removed {stale}, the temp file of an interrupted checkpoint write")
        self.save_dict["trainer"] = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save, self.last_path)
        engine.add_event_handler(Events.COMPLETED, self.save, self.final_path)

    def state(self) -> dict[str, Any]:
        """The checkpoint content: every object's state_dict (DDP modules unwrapped)."""
        out = {}
        for key, obj in self.save_dict.items():
            obj = getattr(obj, "module", obj) if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj
            if hasattr(obj, "state_dict"):
                out[key] = obj.state_dict()
            else:  # a callable is evaluated at save time (e.g. a privacy ledger that grows every step)
                out[key] = obj() if callable(obj) else obj
        return out

    def save(self, engine: Engine, path: str) -> None:
        """Write the checkpoint atomically to ``path`` (rank 0 only); non-finite weights stop the stage instead."""
        if idist.get_rank() > 0:
            return
        state = self.state()
        bad = non_finite_tensors(state)
        if bad:
            # a diverged run (e.g. an absurd attribute value) must not replace a good artefact
            kept = "the previous file is kept" if os.path.isfile(path) else "nothing was written"
            raise CheckpointError(
                f"epoch {engine.state.epoch}: {len(bad)} tensor(s) of the checkpoint hold NaN or inf "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): training diverged, so {path} is not "
                f"written ({kept}). Check the input data and lower --lr"
            )
        atomic_torch_save(state, path)
        logger.info(f"epoch {engine.state.epoch}: saved checkpoint {path}")


class LatentScaleFactor:
    """Measure 1 / std of the latents on public data and store it in the autoencoder.

    Runs when training completes; attach it before :class:`AtomicCheckpoint` so the final
    checkpoint holds the value. Latents are the posterior means of
    ``autoencoder.encode_stage_2_inputs``, the same the diffusion stage uses.

    Args:
        autoencoder: :class:`~scripts.networks.SliceAutoencoder` (or its DDP wrapper).
        data_loader: loader over the PUBLIC training data.
        device: device to encode on.
    """

    def __init__(self, autoencoder: torch.nn.Module, data_loader: Any, device: str | torch.device = "cpu") -> None:
        self.autoencoder, self.data_loader, self.device = autoencoder, data_loader, device

    def attach(self, engine: Engine) -> None:
        """Register on COMPLETED."""
        engine.add_event_handler(Events.COMPLETED, self)

    @torch.no_grad()
    def compute(self) -> float:
        """Return 1 / std over all latent values of the data loader (streaming moments)."""
        model = getattr(self.autoencoder, "module", self.autoencoder)
        was_training = model.training
        model.eval()
        count, total, total_sq = 0, 0.0, 0.0
        for batch in self.data_loader:
            z = model.encode_stage_2_inputs(batch["image"].to(self.device)).double()
            count += z.numel()
            total += float(z.sum())
            total_sq += float((z * z).sum())
        model.train(was_training)
        if count == 0:
            raise DataError(
                "latent scale factor: the public training loader yielded no data (expected a non-empty training split)"
            )
        std = max((total_sq / count - (total / count) ** 2), 1e-12) ** 0.5
        return 1.0 / std

    def __call__(self, engine: Engine) -> None:
        model = getattr(self.autoencoder, "module", self.autoencoder)
        scale = self.compute()
        model.scale_factor.fill_(scale)
        model.scale_factor_measured.fill_(True)
        engine.state.latent_scale_factor = scale
        logger.info(f"latent scale factor (1 / std on public training data): {scale:.5f}")


class MontagePNG:
    """Write a PNG montage of mid-ventricular slices made by ``make_images`` when training completes.

    Args:
        make_images: callable returning a list of (title, (D, H, W) array) pairs.
        path: PNG file to write (atomically).
        every: also write every ``every`` epochs (0 = only at the end).
    """

    def __init__(self, make_images: Callable[[], list[tuple[str, np.ndarray]]], path: str, every: int = 0) -> None:
        self.make_images, self.path, self.every = make_images, path, every

    def attach(self, engine: Engine) -> None:
        """Register on COMPLETED (and every ``every`` epochs)."""
        engine.add_event_handler(Events.COMPLETED, self)
        if self.every > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)

    def __call__(self, engine: Engine | None = None) -> None:
        from scripts.visualize import save_montage

        save_montage(self.make_images(), self.path)
        logger.info(f"saved montage {self.path}")
