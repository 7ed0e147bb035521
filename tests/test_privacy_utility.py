"""The privacy-utility benchmark's own pieces: the "from scratch" starting point and the public request set."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import torch
from helpers import stage_checkpoint_info, tiny_stage_networks
from scripts.networks import load_diffusion

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("privacy_utility", ROOT / "benchmarks" / "privacy_utility.py")
privacy_utility = importlib.util.module_from_spec(spec)
spec.loader.exec_module(privacy_utility)


def test_scratch_checkpoint_keeps_the_model_information_and_reinitialises_every_weight(tmp_path):
    net = tiny_stage_networks(tmp_path, perturb="all")
    info = stage_checkpoint_info(net, str(tmp_path / "autoencoder.pt"), {"num_train_timesteps": 50})
    torch.save({**info, "network": net.state_dict(), "ema": net.state_dict(), "optimizer": {}}, tmp_path / "d.pt")
    privacy_utility.scratch_checkpoint(tmp_path / "d.pt", tmp_path / "scratch.pt")
    fresh, ckpt = load_diffusion(str(tmp_path / "scratch.pt"), "cpu", "network")
    assert all(ckpt[k] == v for k, v in info.items()) and "optimizer" not in ckpt
    trained = dict(net.named_parameters())
    changed = [n for n, p in fresh.named_parameters() if p.abs().sum() > 0 and not torch.equal(p, trained[n])]
    nonzero = [n for n, p in fresh.named_parameters() if p.abs().sum() > 0]
    assert changed == nonzero and len(nonzero) > 0.5 * len(trained)  # every non-zero-initialised weight is new


def test_requests_are_public_ed_es_pairs_with_one_seed_per_subject(tmp_path):
    attributes = tmp_path / "attributes.csv"
    rows = [
        {"subject": f"sub-{i}", "phase": p, "LVEDV": 100 + i, "LVESV": 40 + i, "ESED": int(p == "ED")}
        for i in range(5)
        for p in ("ED", "ES")
    ]
    with open(attributes, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert privacy_utility.write_requests(attributes, tmp_path / "requests.csv", 6) == 6
    with open(tmp_path / "requests.csv") as f:
        requests = list(csv.DictReader(f))
    assert list(requests[0]) == ["LVEDV", "LVESV", "ESED", "seed"]  # no subject id or file name
    assert [(r["LVEDV"], r["ESED"], r["seed"]) for r in requests[:2]] == [("100", "1", "1000"), ("100", "0", "1000")]
    assert len({r["seed"] for r in requests}) == 3
