"""Feature extractors for the fidelity metrics (Fréchet distance, MMD).

- :class:`SegmenterFeatures` (offline default, ``FD_seg3d``): the encoder of the segmenter
  trained in the bundle on the PUBLIC cohort; each encoder level's activations averaged over
  space, concatenated.
- :class:`InceptionFeatures` (the paper's protocol, ``FID_inception2d``): torchvision's
  InceptionV3 on 2D slices (grey repeated to 3 channels, resized to 299 x 299, ImageNet
  normalisation), 2048 pool features. Weights only from a local file: nothing is downloaded.
- :class:`TorchScript3DFeatures` (``FD_<name>``): any 3D feature network saved with
  ``torch.jit.save`` (input (B, 1, D, H, W) in [0, 1]; output (B, F) or feature maps, averaged
  over space).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from scripts.errors import ConfigError, DataError, MissingInputError
from torch import nn


class FeatureExtractor:
    """Base class: ``name`` (report key) and ``__call__`` mapping (N, D, H, W) volumes to (N, F) features."""

    name = "features"

    def __call__(self, images: np.ndarray) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _check_weights_file(path: str | None, option: str, what: str) -> str:
    if not path or not os.path.isfile(str(path)):
        raise MissingInputError(
            f"--{option}: weights file {path!r} not found; {what} reads its weights only from a local file "
            "(nothing is downloaded): pass the path of a file that exists, or leave the option unset to skip the metric"
        )
    return str(path)


class SegmenterFeatures(FeatureExtractor):
    """Global-average-pooled encoder activations of the bundle's segmenter (``FD_seg3d``).

    Args:
        network: the segmenter (``scripts.evaluation.segmenter.build_segmenter``).
        device: device.
        batch_size: volumes per forward pass.
    """

    name = "seg3d"

    def __init__(self, network: nn.Module, device: str | torch.device = "cpu", batch_size: int = 8) -> None:
        self.network, self.device, self.batch_size = network.eval(), torch.device(device), int(batch_size)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        from scripts.evaluation.segmenter import downsampling, encoder_blocks, pad_to_multiple

        levels: list[torch.Tensor] = []
        hooks = [
            b.register_forward_hook(lambda m, i, o: levels.append(o.mean(dim=(2, 3, 4))))
            for b in encoder_blocks(self.network)
        ]
        out = []
        try:
            for start in range(0, len(images), self.batch_size):
                x = torch.as_tensor(images[start : start + self.batch_size], dtype=torch.float32)[:, None].to(
                    self.device
                )
                levels.clear()
                self.network(pad_to_multiple(x, downsampling(self.network))[0])
                out.append(torch.cat(levels, dim=1).cpu())
        finally:
            for h in hooks:
                h.remove()
        return torch.cat(out).double()


class InceptionFeatures(FeatureExtractor):
    """InceptionV3 pool features of 2D slices, as in the paper's FID protocol (``FID_inception2d``).

    Args:
        weights: local file with a torchvision ``inception_v3`` state dict (e.g. the file
            torchvision caches as ``inception_v3_google-0cc3c7bd.pth``). Required.
        device: device.
        slices: ``"middle"`` (the paper: the middle slice of each volume) or ``"all"``.
        batch_size: slices per forward pass.
    """

    name = "inception2d"

    def __init__(
        self, weights: str | None, device: str | torch.device = "cpu", slices: str = "middle", batch_size: int = 16
    ) -> None:
        from torchvision.models import inception_v3

        path = _check_weights_file(weights, "inception_weights", "the InceptionV3 feature extractor (FID_inception2d)")
        if slices not in ("middle", "all"):
            raise ConfigError(f"config field 'inception_slices': expected 'middle' or 'all', got {slices!r}")
        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise DataError(f"{path}: not torchvision inception_v3 weights ({str(e).splitlines()[0]})") from None
        net.fc = nn.Identity()
        self.network = net.eval().requires_grad_(False).to(device)
        self.device, self.slices, self.batch_size = torch.device(device), slices, int(batch_size)
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def slices_of(self, images: np.ndarray) -> np.ndarray:
        """(N, D, H, W) -> (M, H, W) slices: the middle one of each volume, or all."""
        return images[:, images.shape[1] // 2] if self.slices == "middle" else images.reshape(-1, *images.shape[2:])

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        planes = self.slices_of(np.asarray(images, dtype=np.float32))
        out = []
        for start in range(0, len(planes), self.batch_size):
            x = torch.as_tensor(planes[start : start + self.batch_size])[:, None].repeat(1, 3, 1, 1)
            x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = ((x - self.mean) / self.std).to(self.device)
            out.append(self.network(x).cpu())
        return torch.cat(out).double()


class TorchScript3DFeatures(FeatureExtractor):
    """A 3D feature network from a local TorchScript file (``FD_<name>``).

    Args:
        weights: ``torch.jit.save`` file of a module mapping (B, 1, D, H, W) to (B, F) or to
            feature maps (averaged over space).
        name: report name (the key becomes ``FD_<name>``).
        device: device.
        batch_size: volumes per forward pass.
    """

    def __init__(
        self, weights: str | None, name: str = "custom3d", device: str | torch.device = "cpu", batch_size: int = 4
    ) -> None:
        path = _check_weights_file(weights, "feature_3d_weights", "the 3D feature network")
        try:
            self.network = torch.jit.load(path, map_location=device).eval()
        except (RuntimeError, ValueError, OSError) as e:
            raise DataError(f"{path}: not a TorchScript module (save the network with torch.jit.save; {e})") from None
        self.name, self.device, self.batch_size = str(name), torch.device(device), int(batch_size)

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            x = torch.as_tensor(images[start : start + self.batch_size], dtype=torch.float32)[:, None].to(self.device)
            y = self.network(x)
            y = y[0] if isinstance(y, (tuple, list)) else y
            out.append((y.flatten(2).mean(-1) if y.ndim > 2 else y).cpu())
        return torch.cat(out).double()


def build_extractors(
    segmenter: nn.Module | None,
    inception_weights: str | None = None,
    feature_3d_weights: str | None = None,
    feature_3d_name: str = "custom3d",
    inception_slices: str = "middle",
    device: str | torch.device = "cpu",
) -> list[FeatureExtractor]:
    """The extractors to run: the segmenter's encoder, plus InceptionV3 / a 3D network when their files are given.

    A given path that does not exist is an error (never a silent skip).

    Returns:
        the extractors, the offline default first.
    """
    out: list[FeatureExtractor] = []
    if segmenter is not None:
        out.append(SegmenterFeatures(segmenter, device))
    if inception_weights not in (None, "", "None"):
        out.append(InceptionFeatures(inception_weights, device, inception_slices))
    if feature_3d_weights not in (None, "", "None"):
        out.append(TorchScript3DFeatures(feature_3d_weights, feature_3d_name, device))
    return out


def metric_key(extractor: FeatureExtractor) -> str:
    """Report name of the Fréchet distance with this extractor: ``FID_inception2d`` or ``FD_<name>``."""
    return "FID_inception2d" if isinstance(extractor, InceptionFeatures) else f"FD_{extractor.name}"


def stack_features(extractor: FeatureExtractor, sets: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Features of several image sets with one extractor."""
    return [extractor(images) for images in sets]
