"""Import a MONAI Generative (``monai-generative`` 0.2.x) state dict as a bundle checkpoint.

    python -m scripts.import_generative --kind autoencoder --state_dict ae.pth \\
        --config_file "['configs/common.yaml','configs/train_autoencoder.yaml']" --scale_factor 0.9 \\
        --out models/autoencoder.pt
    python -m scripts.import_generative --kind diffusion --state_dict unet.pth \\
        --config_file "['configs/common.yaml','configs/train_diffusion.yaml']" --out models/diffusion.pt

The config list (as the bundle commands take it) describes the old network: its ``network_def`` must
have the old network's widths. The weights are mapped with MONAI core's ``load_old_state_dict``;
this module adds what that call does not say:

- **carried faithfully**: Generative 0.2.3's autoencoder attention creates ``proj_attn`` but never
  applies it, while MONAI core's ``load_old_state_dict`` copies it into an active output projection
  (the outputs then differ). With ``proj_attn`` in the state dict the autoencoder is built with
  ``include_fc=False`` (no output projection), which computes what the old network computed.
- **reported, never dropped silently**: old tensors with no place in the bundle's network
  (``class_embedding.weight``: the bundle conditions on attributes, not class labels) and bundle
  parameters the old network did not have (the attribute encoder, which keeps its fresh
  initialisation and must be trained) are listed by name in the report and the checkpoint.
- **refused**: a width that does not match raises :class:`~scripts.errors.CheckpointError` naming the
  parameter and both shapes; an unconditional Generative UNet (self-attention blocks where the
  bundle's conditioned UNet has transformer blocks) is refused with the reason.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from monai.bundle import ConfigParser
from scripts.errors import CheckpointError, ConfigError, MissingInputError
from scripts.files import atomic_path
from scripts.networks import ConditionalDiffusionUNet, SliceAutoencoder, load_autoencoder

__all__ = ["ImportReport", "import_autoencoder", "import_diffusion", "main"]

_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape (torch\.Size\(\[[^\]]*\]\)) from checkpoint, "
    r"the shape in current model is (torch\.Size\(\[[^\]]*\]\))"
)


@dataclass
class ImportReport:
    """What an import carried, left out and left fresh (all by parameter name)."""

    kind: str
    carried: int = 0
    not_carried: dict[str, str] = field(default_factory=dict)  # old tensor -> why
    fresh: list[str] = field(default_factory=list)  # bundle parameters with no counterpart in the old network
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"{self.kind}: {self.carried} tensors carried from the Generative state dict"]
        out += [f"  note: {n}" for n in self.notes]
        out += [f"  NOT CARRIED {k}: {why}" for k, why in self.not_carried.items()]
        if self.fresh:
            prefixes = sorted({k.split(".")[0] for k in self.fresh})
            out.append(
                f"  FRESH (not in the old network, initialised, must be trained): "
                f"{len(self.fresh)} tensors of {prefixes}"
            )
            out += [f"    {k}" for k in self.fresh]
        return out


def _load_old(target: torch.nn.Module, old: dict[str, torch.Tensor], path: str) -> tuple[list[str], list[str]]:
    """``target.load_old_state_dict(old)``; returns (old keys it left unused, target keys it did not fill).

    Unfilled parameters are found by filling the target with NaN first; they get a fresh initialisation back.
    """
    fresh_state = {k: v.clone() for k, v in target.state_dict().items()}
    with torch.no_grad():
        for t in target.state_dict().values():
            if t.is_floating_point():
                t.fill_(float("nan"))
    remaining = dict(old)
    try:
        target.load_old_state_dict(remaining)
    except RuntimeError as e:
        found = _MISMATCH.findall(str(e))
        if not found:
            raise CheckpointError(f"{path}: does not load into the configured network ({str(e).strip()[:400]})") from e
        detail = "; ".join(f"{name}: state dict {src}, configured network {dst}" for name, src, dst in found)
        raise CheckpointError(
            f"{path}: shapes differ from the configured network_def ({detail}); set network_def to the old "
            f"network's settings (channels, attention, heads, cross-attention width)"
        ) from e
    except KeyError as e:
        raise CheckpointError(f"{path}: lacks {e} that the configured network_def needs") from e
    unfilled = [k for k, v in target.state_dict().items() if v.is_floating_point() and torch.isnan(v).any()]
    with torch.no_grad():
        for k in unfilled:
            target.state_dict()[k].copy_(fresh_state[k])
    return list(remaining), unfilled


def _network_def(config_file: str | Sequence[str], expected: type) -> dict:
    parser = ConfigParser()
    parser.read_config(config_file)
    if "network_def" not in parser:
        raise ConfigError(f"{config_file}: no network_def; give the stage config list whose network_def describes it")
    target = parser["network_def"].get("_target_", "")
    if not str(target).endswith(expected.__name__):
        raise ConfigError(f"{config_file}: network_def is {target}, expected scripts.networks.{expected.__name__}")
    parser.parse()
    kwargs = {k: parser.get_parsed_content(f"network_def#{k}") for k in parser["network_def"] if k != "_target_"}
    return {"kwargs": kwargs, "parser": parser}


def import_autoencoder(
    old: dict[str, torch.Tensor], kwargs: dict, path: str = "state dict"
) -> tuple[SliceAutoencoder, ImportReport]:
    """A :class:`SliceAutoencoder` computing what Generative's 2D ``AutoencoderKL`` with ``old`` computed."""
    report = ImportReport("autoencoder")
    kwargs = dict(kwargs)
    if any(k.endswith("proj_attn.weight") for k in old):
        kwargs["include_fc"] = False
        report.notes.append(
            "proj_attn tensors present: Generative 0.2.3 never applied them, so the network is built with "
            "include_fc=False (no output projection) and they are not used"
        )
    net = SliceAutoencoder(**kwargs)
    remaining, unfilled = _load_old(net.autoencoder, old, path)
    dropped_proj = [k for k in old if k.endswith(("proj_attn.weight", "proj_attn.bias"))]
    report.not_carried = dict.fromkeys(dropped_proj, "not applied by Generative 0.2.3 (include_fc=False)")
    report.not_carried.update(
        {k: "no counterpart in the configured network" for k in remaining if k not in dropped_proj}
    )
    report.fresh = [f"autoencoder.{k}" for k in unfilled]
    report.carried = len(old) - len(report.not_carried)
    if report.fresh:
        raise CheckpointError(f"{path}: the configured network_def has parameters the state dict lacks: {report.fresh}")
    return net, report


def import_diffusion(
    old: dict[str, torch.Tensor], kwargs: dict, path: str = "state dict"
) -> tuple[ConditionalDiffusionUNet, ImportReport]:
    """A :class:`ConditionalDiffusionUNet` whose UNet computes what Generative's ``DiffusionModelUNet`` computed."""
    report = ImportReport("diffusion")
    if any(re.search(r"attentions\.\d+\.to_q\.weight$", k) for k in old) and not any("attn2" in k for k in old):
        raise CheckpointError(
            f"{path}: an unconditional Generative DiffusionModelUNet (with_conditioning=False: self-attention blocks, "
            f"no cross-attention); the bundle's network is conditioned on attributes through cross-attention, "
            f"so its attention blocks have another structure and these weights cannot be carried"
        )
    net = ConditionalDiffusionUNet(**kwargs)
    remaining, unfilled = _load_old(net.unet, old, path)
    why = {"class_embedding.weight": "class-label embedding: the bundle conditions on attributes, not class labels"}
    report.not_carried = {k: why.get(k, "no counterpart in the configured network") for k in remaining}
    report.carried = len(old) - len(remaining)
    if unfilled:
        raise CheckpointError(
            f"{path}: the configured network_def has UNet parameters the state dict lacks: {unfilled}"
        )
    report.fresh = [f"attribute_encoder.{k}" for k in net.attribute_encoder.state_dict()]
    report.notes.append("the old package had no attribute encoder: it keeps its fresh initialisation (train it)")
    return net, report


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise MissingInputError(f"--state_dict {path}: file not found") from e
    except Exception as e:
        raise CheckpointError(
            f"--state_dict {path}: not a readable PyTorch state dict ({type(e).__name__}: {e})"
        ) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"--state_dict {path}: expected a dict of tensors (a network's state_dict())")
    return state


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--kind", required=True, choices=["autoencoder", "diffusion"])
    ap.add_argument("--state_dict", required=True, help="the Generative network's state_dict() file")
    ap.add_argument("--config_file", required=True, help="stage config or list, as the bundle commands take it")
    ap.add_argument("--out", required=True, help="bundle checkpoint to write")
    ap.add_argument("--scale_factor", type=float, help="autoencoder: latent scale factor (1 / std of the latents)")
    args = ap.parse_args(argv)
    try:
        # the bundle commands' syntax: one file, or a Python list literal of files merged in order
        files = ast.literal_eval(args.config_file) if args.config_file.strip().startswith("[") else args.config_file
        old = _read_state_dict(args.state_dict)
        if args.kind == "autoencoder":
            if args.scale_factor is None or not args.scale_factor > 0:
                raise ConfigError("--scale_factor: required for an autoencoder, a positive number (1 / latent std)")
            net, report = import_autoencoder(old, _network_def(files, SliceAutoencoder)["kwargs"], args.state_dict)
            net.scale_factor.fill_(args.scale_factor)
            net.scale_factor_measured.fill_(True)
            state = net.state_dict()
            ckpt = {"architecture": net.init_kwargs, "network": state, "ema": state}
        else:
            parsed = _network_def(files, ConditionalDiffusionUNet)
            net, report = import_diffusion(old, parsed["kwargs"], args.state_dict)
            p = parsed["parser"]
            autoencoder_path = p.get_parsed_content("autoencoder_path")
            autoencoder = load_autoencoder(autoencoder_path)
            state = net.state_dict()
            names = {"num_train_timesteps": "num_train_timesteps", "schedule": "beta_schedule"}
            names.update(beta_start="beta_start", beta_end="beta_end")
            scheduler = {k: p.get_parsed_content(c) for k, c in names.items()}
            if p.get_parsed_content("prediction_type") != "epsilon":
                scheduler["prediction_type"] = p.get_parsed_content("prediction_type")
            ckpt = {
                "architecture": net.init_kwargs, "network": state, "ema": state,
                "latent_shape": list(p.get_parsed_content("latent_shape")),
                "spatial_size": list(p.get_parsed_content("spatial_size")),
                "scale_factor": float(autoencoder.scale_factor), "autoencoder": autoencoder_path,
                "scheduler": scheduler,
            }  # fmt: skip
        ckpt["imported_from"] = {
            "state_dict": args.state_dict,
            "not_carried": report.not_carried,
            "fresh": report.fresh,
            "notes": report.notes,
        }
        with atomic_path(args.out) as tmp:  # a failed import never replaces a good checkpoint
            torch.save(ckpt, tmp)
    except (ConfigError, CheckpointError, MissingInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(report.lines()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
