"""The privacy ledger alone (no network): accounting, composition, budget, write-ahead file, resume rules, report."""

from __future__ import annotations

import json
import logging
import math

import pytest
from helpers import rdp_epsilon
from scripts.errors import ConfigError
from scripts.privacy.accounting import compute_epsilon
from scripts.privacy.ledger import PrivacyLedger, ancestors
from scripts.privacy.report import read_report, report_summary

N = 50  # units


def settings(**overrides) -> dict:
    s = {
        "stage": "diffusion_dp_finetune",
        "dataset": "private/datalist.json",
        "privacy_unit": "subject",
        "units": N,
        "records": 2 * N,
        "target_epsilon": 10.0,
        "delta": 1e-5,
        "accountant": "rdp",
        "max_grad_norm": 1.0,
        "noise_multiplicity": 1,
        "logical_batch_size": 10,
        "max_physical_batch_size": 4,
        "grad_sample_mode": "loop",
        "finetune_scope": "attention",
    }
    s.update(overrides)
    return s


def ledger(tmp_path, sigma=1.0, epochs=2, prior=(), **overrides) -> PrivacyLedger:
    return PrivacyLedger(
        settings(**overrides),
        0.2,
        epochs,
        prior_stages=prior,
        path=str(tmp_path / "ledger.json"),
        noise_multiplier=sigma,
    )


AE_STAGE = {
    "stage": "autoencoder_dp_finetune",
    "noise_multiplier": 2.0,
    "sample_rate": 1 / 3,
    "steps": 6,
    "delta": 1e-5,
    "accountant": "rdp",
    "privacy_unit": "subject",
    "started": "2026-01-01T00:00:00",
}


def test_report_composes_stages_with_the_accountant_without_any_network(tmp_path):
    led = ledger(tmp_path, sigma=None, prior=[AE_STAGE])
    for _ in range(led.planned_steps):
        led.step()
    report = led.write_report(str(tmp_path / "report.json"), {"model": str(tmp_path / "missing.pt")})
    assert json.loads((tmp_path / "report.json").read_text())["epsilon"] == pytest.approx(report["epsilon"])
    alone = [s["epsilon_alone"] for s in report["stages"]]
    assert len(alone) == 2 and max(alone) < report["epsilon"] < sum(alone)
    independent, _ = rdp_epsilon([(2.0, 1 / 3, 6), (led.noise_multiplier, 0.2, led.planned_steps)], 1e-5)
    # Opacus's RDP also uses fractional orders below 11: at most the integer-order bound, and close to it
    assert 0.85 * independent <= report["epsilon"] <= independent + 1e-9
    assert report["epsilon"] <= 10.0  # calibrated for the whole ledger
    assert report["privacy_unit"] == "subject" and "model" not in report  # a file that does not exist is not named
    not_covered = " ".join(report["not_covered"])
    for words in (
        "separate release",
        "repeated runs",
        "hyper-parameter",
        "timing",
        "evaluation",
        "another autoencoder",
    ):
        assert words in not_covered
    assert any(f"n = {N}" in a and "public" in a for a in report["assumptions"])
    assert "diffusion_dp_finetune" in report_summary(str(tmp_path / "report.json"))


def test_each_step_is_written_before_it_runs(tmp_path):
    led = ledger(tmp_path)
    led.step()
    led.step()
    on_disk = json.loads((tmp_path / "ledger.json").read_text())
    assert on_disk["status"] == "running" and on_disk["stages"][-1]["steps"] == 2
    assert led.get_epsilon() == pytest.approx(compute_epsilon(0.2, 1.0, 2, 1e-5, "rdp"))
    led.complete()
    assert json.loads((tmp_path / "ledger.json").read_text())["status"] == "complete"


def test_steps_of_a_run_killed_before_its_first_checkpoint_are_counted(tmp_path):
    killed = ledger(tmp_path, sigma=1.0)
    for _ in range(3):
        killed.step()  # then the process dies: no checkpoint, only the write-ahead file
    rerun = ledger(tmp_path, sigma=1.0)  # a fresh start (no checkpoint to resume)
    assert [s["steps"] for s in rerun.interrupted] == [3]
    assert rerun.get_epsilon() == pytest.approx(compute_epsilon(0.2, 1.0, 3, 1e-5, "rdp"))
    rerun.step()
    on_disk = json.loads((tmp_path / "ledger.json").read_text())
    assert [s["steps"] for s in on_disk["stages"]] == [3, 1] and "interrupted run" in on_disk["stages"][0]["stage"]
    # killed again: the next run counts both
    again = ledger(tmp_path, sigma=1.0)
    assert sorted(s["steps"] for s in again.interrupted) == [1, 3]
    assert again.get_epsilon() == pytest.approx(compute_epsilon(0.2, 1.0, 4, 1e-5, "rdp"))


def test_calibration_includes_an_interrupted_run(tmp_path):
    fresh = ledger(tmp_path / "a", sigma=None)
    killed = ledger(tmp_path, sigma=None)
    for _ in range(4):
        killed.step()
    rerun = ledger(tmp_path, sigma=None)
    assert rerun.noise_multiplier > fresh.noise_multiplier
    for _ in range(rerun.planned_steps):
        assert rerun.can_step()
        rerun.step()
    assert rerun.get_epsilon() <= 10.0


def test_a_complete_runs_ledger_is_kept_not_overwritten(tmp_path, caplog):
    first = ledger(tmp_path)
    first.step()
    first.complete()
    before = (tmp_path / "ledger.json").read_text()
    second = ledger(tmp_path)
    assert second.interrupted == []  # a complete run is not this run's ancestor
    second.started = "2099-01-01T00:00:00"
    with caplog.at_level("WARNING", logger="scripts.privacy.journal"):
        second.step()
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("ledger.") and p.name != "ledger.json"]
    assert len(archived) == 1 and archived[0].read_text() == before
    # the user is told the earlier run is not composed into the new report, and when it still counts
    last = json.loads(before)["stages"][-1]
    assert f"earlier complete run ({last['steps']} steps at sigma {last['noise_multiplier']}" in caplog.text
    assert "total privacy loss is the sum" in caplog.text


def test_resume_refuses_a_changed_target(tmp_path):
    run = ledger(tmp_path, sigma=1.0)
    run.step()
    state = run.state_dict()
    for target in (4.0, 20.0):
        other = ledger(tmp_path, sigma=1.0, target_epsilon=target)
        with pytest.raises(ValueError, match=r"cannot resume: the DP settings \['target_epsilon'\]"):
            other.load_state_dict(state)


def test_resume_refuses_other_earlier_stages(tmp_path):
    run = ledger(tmp_path, sigma=1.0, prior=[AE_STAGE])
    run.step()
    state = run.state_dict()
    other = ledger(tmp_path, sigma=1.0)
    with pytest.raises(ValueError, match="earlier DP stages .* differ"):
        other.load_state_dict(state)


def test_earlier_stage_of_another_unit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="record-level but this stage is subject-level"):
        ledger(tmp_path, prior=[{**AE_STAGE, "privacy_unit": "record"}])


def test_ancestors_compose_each_stage_once():
    class Weights:
        privacy_ledger = [AE_STAGE]

    dp_model = {"privacy_ledger": [AE_STAGE, {**AE_STAGE, "stage": "diffusion_dp_finetune", "steps": 9}]}
    merged = ancestors(Weights(), dp_model)
    assert [s["stage"] for s in merged] == ["autoencoder_dp_finetune", "diffusion_dp_finetune"]
    assert ancestors(Weights(), {}) == [AE_STAGE] and ancestors({}, object()) == []


def test_delta_is_checked_against_the_number_of_units(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"target_delta.*1/n = 0.02 for n = 50"):
        ledger(tmp_path, delta=0.02)
    with caplog.at_level(logging.WARNING):
        ledger(tmp_path, delta=0.005)
    assert "above 1/(10 n)" in caplog.text


def test_corrupt_ledger_and_report_files_are_named(tmp_path):
    (tmp_path / "ledger.json").write_text("{not json")
    with pytest.raises(
        ValueError, match=r"ledger.json: cannot read the privacy ledger .*no DP run starts here.*keeps no copy"
    ):
        ledger(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"epsilon": 1.0}))
    with pytest.raises(ValueError, match=r"report.json: not a privacy report"):
        read_report(str(tmp_path / "report.json"))


def test_noise_off_only_with_an_infinite_target(tmp_path):
    # the clipping-only baseline of benchmarks/privacy_utility.py: sigma 0 must never pass as a finite epsilon
    with pytest.raises(ConfigError, match="target_epsilon inf"):
        ledger(tmp_path, sigma=0.0)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        ledger(tmp_path, sigma=-1.0)
    off = ledger(tmp_path, sigma=0.0, target_epsilon=float("inf"))
    off.step(noise_multiplier=0.0, sample_rate=0.2)
    assert math.isinf(off.get_epsilon()) and off.fits(1)
    report = off.report({"model": str(tmp_path / "model.pt")})
    assert math.isinf(report["epsilon"]) and math.isinf(report["stages"][-1]["epsilon_alone"])
    assert report["covers"].startswith("nothing")
    # a later DP stage on weights trained without noise cannot promise a finite epsilon
    with pytest.raises(ConfigError, match="without noise"):
        PrivacyLedger(settings(), 0.2, 2, prior_stages=report["stages"], path=str(tmp_path / "next.json"))


def test_memoised_rdp_returns_what_opacus_computes():
    """scripts.privacy.accounting caches Opacus's per-order RDP (a pure function); values stay Opacus's own."""
    from opacus.accountants.analysis import rdp
    from scripts.privacy.accounting import _memoise_opacus_rdp, compute_epsilon

    compute_epsilon(0.5, 1.0, 8, 1e-5, accountant="rdp")  # installs the cache
    _memoise_opacus_rdp()  # a second call does not wrap it again
    assert hasattr(rdp._compute_rdp, "cache_info") and not hasattr(rdp._compute_rdp.__wrapped__, "cache_info")
    original = rdp._compute_rdp.__wrapped__
    for q, sigma, alpha in [(0.5, 0.9564, 1.5), (0.01, 1.1, 32.0), (1.0, 2.0, 3.0), (0.3, 0.7, 10.9)]:
        for _ in range(2):  # computed, then from the cache
            assert rdp._compute_rdp(q, sigma, alpha) == original(q, sigma, alpha)
