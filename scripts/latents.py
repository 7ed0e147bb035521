"""Latents encoded once per record for the diffusion and DP stages.

The autoencoder is frozen after its own stage (eval mode, no gradients), so a record's latent
posterior (mean and std of every slice) is a fixed function of that record alone. Encoding it
again for every batch of every epoch (as :class:`scripts.engines.LatentDiffusionPrepareBatch`
does) repeats the same computation: :class:`LatentCache` runs the encoder once per record and
the stages look the latents up by record id.

- :class:`LatentCache`: the posterior mean and std of every record of one or more datasets,
  keyed by record id, in memory; optionally kept in a file keyed by the autoencoder's SHA-256
  (``store``), so that a resumed or repeated run skips the encoding too.
- :class:`CachedLatentPrepareBatch`: the diffusion stage's prepare-batch with the latent looked
  up instead of encoded (same random draws in the same order, so the same batches).
- :class:`CachedLatentUnitLoss`: the DP stage's per-unit rows with the latents looked up.

Privacy: caching changes nothing in the DP analysis. The mechanism is the same function of the
data: each DP step reads the units that Poisson sampling drew and turns each unit into rows with
the same deterministic encoder output it computed before, only computed ahead of time; the
clipping, the noise and the accountant see identical inputs. The cache holds derivatives of the
private records, so it is as sensitive as the records themselves: it lives in memory unless a
``store`` path is given, is never logged, and a store of private latents must stay beside the
private data (never released).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from scripts.engines import LatentDiffusionPrepareBatch
from scripts.errors import ConfigError, DataError
from scripts.privacy.unit_losses import LatentDiffusionUnitLoss
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["LatentCache", "CachedLatentPrepareBatch", "CachedLatentUnitLoss", "RepeatedDataset", "autoencoder_digest"]


def autoencoder_digest(autoencoder: nn.Module) -> str:
    """SHA-256 of the autoencoder's weights and buffers (scale factor included), in state-dict order."""
    digest = hashlib.sha256()
    for name, tensor in autoencoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _ids(batch_ids: Any) -> list[str]:
    if isinstance(batch_ids, str):
        return [batch_ids]
    return [str(i) for i in batch_ids]


class LatentCache:
    """The frozen autoencoder's posterior (mean, std) of every record, encoded once, looked up by id.

    Args:
        autoencoder: the frozen :class:`~scripts.networks.SliceAutoencoder` (its ``scale_factor``
            scales what :meth:`latents` returns).
        datasets: datasets whose items hold ``image`` and ``id`` (one or several splits).
        batch_size: volumes encoded together.
        device: device of the encoding; the cache itself is kept on this device.
        store: optional file; when it holds latents of the same autoencoder (SHA-256) and the
            same records, they are loaded instead of encoded, else they are encoded and written.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        datasets: torch.utils.data.Dataset | Sequence[torch.utils.data.Dataset],
        batch_size: int = 8,
        device: str | torch.device = "cpu",
        store: str | None = None,
    ) -> None:
        if isinstance(datasets, torch.utils.data.Dataset):
            datasets = [datasets]
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.scale_factor = float(autoencoder.scale_factor)
        self.digest = autoencoder_digest(autoencoder)
        self.index: dict[str, int] = {}
        self.mean = self.std = torch.empty(0)
        counts = Counter(rid for rid, _ in self._record_keys(datasets))
        twice = sorted(rid for rid, n in counts.items() if n > 1)
        if twice:  # checked before anything is encoded: the cache maps each id to one latent
            raise DataError(
                f"latent cache: record id(s) {twice[:5]} appear more than once in the datasets; every record of the "
                "datalist needs its own 'id'"
            )
        if not (store and self._load(store, datasets)):
            self._encode(datasets, batch_size)
            if store:
                self._save(store)

    # -- building ---------------------------------------------------------------------------

    @staticmethod
    def _record_keys(datasets: Iterable[torch.utils.data.Dataset]) -> list[tuple[str, str]]:
        """(id, image path) of every record, from the datasets' datalist entries (no loading)."""
        keys = []
        for ds in datasets:
            for i, entry in enumerate(getattr(ds, "data", [None] * len(ds))):
                entry = entry if isinstance(entry, Mapping) else ds[i]
                image = entry.get("image")
                keys.append((str(entry["id"]), os.path.realpath(image) if isinstance(image, str) else ""))
        return keys

    @torch.no_grad()
    def _encode(self, datasets: Sequence[torch.utils.data.Dataset], batch_size: int) -> None:
        means, stds = [], []
        for ds in datasets:
            loader = torch.utils.data.DataLoader(ds, batch_size=max(int(batch_size), 1), shuffle=False, num_workers=0)
            for batch in loader:
                mean, std = self.autoencoder.encode(batch["image"].to(self.device))
                for rid in _ids(batch["id"]):
                    if rid in self.index:
                        raise DataError(f"latent cache: record id '{rid}' appears twice; record ids must be unique")
                    self.index[rid] = len(self.index)
                means.append(mean)
                stds.append(std)
        if not means:
            raise DataError("latent cache: the datasets hold no records (check the datalist's training split)")
        self.mean, self.std = torch.cat(means), torch.cat(stds)
        self.keys = self._record_keys(datasets)
        logger.info(f"latent cache: encoded {len(self.index)} records once, latent {tuple(self.mean.shape[1:])}")

    def _save(self, path: str) -> None:
        from scripts.files import atomic_path

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        content = {"autoencoder_sha256": self.digest, "keys": self.keys, "mean": self.mean.cpu(), "std": self.std.cpu()}
        with atomic_path(path) as tmp:
            torch.save(content, tmp)

    def _load(self, path: str, datasets: Sequence[torch.utils.data.Dataset]) -> bool:
        if not os.path.isfile(path):
            return False
        content = torch.load(path, map_location=self.device, weights_only=False)
        keys = self._record_keys(datasets)
        if content.get("autoencoder_sha256") != self.digest or [tuple(k) for k in content.get("keys", [])] != keys:
            logger.info(f"latent cache {path}: another autoencoder or other records; encoding afresh")
            return False
        self.keys = keys
        self.index = {rid: i for i, (rid, _) in enumerate(keys)}
        self.mean, self.std = content["mean"].to(self.device), content["std"].to(self.device)
        logger.info(f"latent cache: loaded {len(self.index)} records from {path}")
        return True

    # -- lookup -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, rid: str) -> bool:
        return str(rid) in self.index

    def rows(self, ids: Any) -> torch.Tensor:
        try:
            return torch.tensor([self.index[rid] for rid in _ids(ids)], dtype=torch.long, device=self.mean.device)
        except KeyError as e:
            raise KeyError(f"latent cache: record {e} was not encoded (the cache covers {len(self)} records)") from None

    def latents(self, ids: Any) -> torch.Tensor:
        """Scaled posterior means (what the diffusion model sees) of the records ``ids``."""
        return self.mean.index_select(0, self.rows(ids)) * self.scale_factor

    def posterior(self, ids: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior (mean, std) of the records ``ids``."""
        rows = self.rows(ids)
        return self.mean.index_select(0, rows), self.std.index_select(0, rows)


class CachedLatentPrepareBatch(LatentDiffusionPrepareBatch):
    """:class:`~scripts.engines.LatentDiffusionPrepareBatch` that looks latents up in a :class:`LatentCache`.

    The random draws (noise, timesteps, attribute dropout) are made in the same order from the
    same generator as in the parent, so a batch gives what the parent gives (up to the float
    rounding of encoding several volumes at once). ``cache=None`` is the parent.

    With a ``scheduler`` whose ``prediction_type`` is ``"v_prediction"`` the target is the
    velocity ``sqrt(abar) noise - sqrt(1 - abar) latent`` (MONAI's ``get_velocity``) instead of
    the noise; the model's stored schedule names the type, so DP fine-tuning and sampling use it.

    Args:
        cache: the latent cache of the records this prepare-batch sees.
        scheduler: the training noise scheduler (only its ``prediction_type`` and ``get_velocity``).
        other arguments: see the parent.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        num_train_timesteps: int,
        cache: LatentCache | None = None,
        scheduler: Any = None,
        **kwargs,
    ) -> None:
        super().__init__(autoencoder, num_train_timesteps, **kwargs)
        self.cache, self.scheduler = cache, scheduler

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise, or the velocity for a v-prediction schedule."""
        if getattr(self.scheduler, "prediction_type", "epsilon") == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        return noise

    def latents_of(
        self, batchdata: dict[str, Any], device: str | torch.device | None = None, non_blocking: bool = False
    ) -> torch.Tensor:
        """The batch's latents from the cache (the parent's draws and target follow unchanged)."""
        if self.cache is None:
            return super().latents_of(batchdata, device, non_blocking)
        return self.cache.latents(batchdata["id"]).to(device=device, non_blocking=non_blocking)


class CachedLatentUnitLoss(LatentDiffusionUnitLoss):
    """The DP stage's per-unit rows with every record's latent looked up in a :class:`LatentCache`.

    Its loss also follows the schedule's ``prediction_type`` (the velocity as target for
    ``"v_prediction"``, as :class:`CachedLatentPrepareBatch` in pre-training).

    :meth:`make_unit` hands the parent a unit that already holds ``latent`` (the cached, scaled
    posterior means of the unit's records, in the unit's record order), so the parent skips the
    encoder and makes its draws (noise, timesteps, attribute dropout) exactly as without the
    cache. ``cache=None`` is the parent.

    Args:
        cache: the latent cache of the private training records.
        other arguments: see the parent.
    """

    def __init__(self, autoencoder: nn.Module, scheduler: Any, cache: LatentCache | None = None, **kwargs) -> None:
        super().__init__(autoencoder, scheduler, **kwargs)
        self.cache = cache

    def make_unit(self, unit: Mapping[str, Any], device: str | torch.device) -> dict[str, torch.Tensor]:
        """The unit's rows (see the parent), its latents from the cache."""
        if self.cache is not None and "latent" not in unit:
            unit = {**unit, "latent": self.cache.latents(unit["id"])}
        return super().make_unit(unit, device)

    def loss(self, net: Callable[..., torch.Tensor], unit: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The parent's loss, with the velocity as target for a v-prediction schedule (vmap-safe)."""
        if getattr(self.scheduler, "prediction_type", "epsilon") != "v_prediction":
            return super().loss(net, unit)
        noisy = self.scheduler.add_noise(unit["latents"], unit["noise"], unit["timesteps"])
        target = self.scheduler.get_velocity(unit["latents"], unit["noise"], unit["timesteps"])
        return ((net(noisy, unit["timesteps"], unit["condition"]) - target) ** 2).mean()


class RepeatedDataset(torch.utils.data.Dataset):
    """``repeats`` passes over ``dataset`` as one epoch (index i is item i mod len(dataset)).

    With cached latents a pass over a small cohort is a handful of steps, and everything done
    once per epoch (validation, checkpoint, tracking) would cost as much as the training; one
    epoch of several passes keeps that overhead small. ``data`` is the wrapped dataset's.

    Args:
        dataset: the dataset (a MONAI ``CacheDataset`` keeps the items in memory).
        repeats: passes per epoch (>= 1).
    """

    def __init__(self, dataset: torch.utils.data.Dataset, repeats: int = 1) -> None:
        if isinstance(repeats, bool) or int(repeats) < 1:
            raise ConfigError(f"config field 'passes_per_epoch': expected an integer >= 1, got {repeats!r}")
        self.dataset, self.repeats = dataset, int(repeats)
        self.data = getattr(dataset, "data", None)

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index % len(self.dataset)]
