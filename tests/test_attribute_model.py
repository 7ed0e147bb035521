"""The DP attribute model (scripts/attribute_model): sensitivity, noise scale, composition, no private row, bad input.

Most tests use a tiny phantom-like subject table built with numpy (no images); the stage test uses
the session's 6-subject private phantom cohort; one end-to-end test runs
``configs/inference.yaml --attributes_model`` on the tiny random networks of tests/test_inference.py.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
from helpers import rdp_epsilon
from scripts.attribute_model.card import add_evaluation, build_card, compose_cohort
from scripts.attribute_model.mechanism import (
    bin_edges,
    default_norm_bound,
    fit,
    marginal_counts,
    marginal_sensitivity,
    normal_scores,
    score_moments,
)
from scripts.attribute_model.model import AttributeModel, read_model
from scripts.attribute_model.sample import draw_subjects, plausible, subject_rows
from scripts.attribute_model.stage import AttributeStage, AttributeStageSettings
from scripts.attribute_model.table import SUBJECT_COLUMNS, SubjectTable, subject_table
from scripts.attributes import ATTRIBUTE_NAMES
from scripts.errors import ConfigError, DataError
from test_inference import tiny_bundle  # noqa: F401 (the tiny random model.pt fixture)
from test_release import weights  # noqa: F401 (tiny random release weights)

IDX = {n: i for i, n in enumerate(ATTRIBUTE_NAMES)}
ATTRIBUTE_RANGES = {"LVEDV": [40, 400], "LVESV": [10, 330], "RVEDV": [40, 400], "RVESV": [10, 330], "LVEF": [5, 85],
                    "RVEF": [5, 85], "MYOESTHICK": [3, 30], "MYOEDTHICK": [2, 25], "AGE": [0, 100], "SEX": [0, 1],
                    "BMI": [12, 50], "ESED": [0, 1], "ANGLE": [-45, 45], "DEPTH": [4, 16]}  # fmt: skip


def _phantom_rows(n: int, seed: int = 0, missing: float = 0.2) -> list[dict]:
    """ED and ES rows of n UK-Biobank-like subjects (values off the public bin grid)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n):
        edv = rng.uniform(90, 220)
        esv = edv * rng.uniform(0.3, 0.5)
        base = {
            "LVEDV": edv, "LVESV": esv, "LVEF": 100 * (edv - esv) / edv, "RVEDV": edv * 1.05, "RVESV": esv * 1.1,
            "RVEF": 100 * (1.05 * edv - 1.1 * esv) / (1.05 * edv), "MYOESTHICK": rng.uniform(9, 16),
            "MYOEDTHICK": rng.uniform(6, 11), "AGE": rng.uniform(45, 80), "SEX": float(rng.integers(2)),
            "BMI": rng.uniform(19, 34), "ANGLE": rng.uniform(-30, 30),
        }  # fmt: skip
        if rng.random() < missing:
            base.update(AGE=math.nan, SEX=math.nan, BMI=math.nan)
        for phase, esed in (("ED", 1.0), ("ES", 0.0)):
            values = np.array([base.get(n, math.nan) for n in ATTRIBUTE_NAMES])
            values[IDX["ESED"]], values[IDX["DEPTH"]] = esed, float(rng.integers(7, 13))
            rows.append({"subject": f"sub-{s:04d}", "id": f"sub-{s:04d}_{phase}", "attributes": values})
    return rows


@pytest.fixture(scope="module")
def table():
    return subject_table(_phantom_rows(24))


def _with(table: SubjectTable, row: np.ndarray) -> SubjectTable:
    return SubjectTable(table.columns, np.vstack([table.values, row]), (*table.subjects, "new"), table.records + 2)


def _extremes(table: SubjectTable, ranges) -> list[np.ndarray]:
    lows = np.array([bin_edges(c, ranges, 16)[0][0] for c in table.columns])
    highs = np.array([bin_edges(c, ranges, 16)[0][-1] for c in table.columns])
    return [lows, highs, np.full(len(table.columns), np.nan), table.values[0], np.where(np.arange(12) % 2, lows, highs)]


def test_subject_table_groups_ed_es_and_keeps_depth_per_phase(table):
    assert table.columns == SUBJECT_COLUMNS and len(table) == 24 and table.records == 48
    rows = _phantom_rows(24)
    assert table.values[0, SUBJECT_COLUMNS.index("DEPTH_ED")] == rows[0]["attributes"][IDX["DEPTH"]]
    assert table.values[0, SUBJECT_COLUMNS.index("DEPTH_ES")] == rows[1]["attributes"][IDX["DEPTH"]]


def test_noise_off_one_subject_moves_each_statistic_by_at_most_its_sensitivity(table, attribute_ranges):
    """Add one subject (typical, extreme, all-missing): histograms move <= sqrt(p), score moments <= R^2."""
    released = fit(table, attribute_ranges, noise_multiplier=0.0, rng=np.random.default_rng(0))
    p = len(table.columns)
    edges = [m.edges for m in released.marginals]
    bound = default_norm_bound(p)
    before_counts = np.concatenate(marginal_counts(table, edges))
    before_moments = score_moments(normal_scores(table, released.marginals, bound))
    for row in _extremes(table, attribute_ranges):
        bigger = _with(table, row)
        moved = np.linalg.norm(np.concatenate(marginal_counts(bigger, edges)) - before_counts)
        assert moved == pytest.approx(marginal_sensitivity(p))  # one count per column: exactly sqrt(p)
        # the dependence statistic, under the released (fixed) marginals, as the adaptive composition has it
        moved = np.linalg.norm(score_moments(normal_scores(bigger, released.marginals, bound)) - before_moments)
        assert moved <= released.sensitivities["dependence"] + 1e-9
    assert released.sensitivities == {"marginals": pytest.approx(math.sqrt(p)), "dependence": pytest.approx(p / 4)}
    # noise off: the released marginals are the table's own histograms
    counts = marginal_counts(table, edges)
    for m, c in zip(released.marginals, counts):
        assert m.missing == pytest.approx(c[0] / len(table))


def test_noise_scale_matches_sigma_times_sensitivity(table, attribute_ranges):
    sigma, share = 2.0, 0.3
    true_counts = np.concatenate(marginal_counts(table, [bin_edges(c, attribute_ranges, 16)[0] for c in table.columns]))
    count_noise, moment_noise = [], []
    rng = np.random.default_rng(1)
    for _ in range(60):
        r = fit(table, attribute_ranges, noise_multiplier=sigma, marginal_share=share, rng=rng)
        count_noise.append(np.concatenate(r.noisy_counts) - true_counts)
        exact = score_moments(normal_scores(table, r.marginals, default_norm_bound(len(table.columns))))
        moment_noise.append(r.noisy_moments - exact)
    p = len(table.columns)
    assert np.std(count_noise) == pytest.approx(sigma / math.sqrt(share) * math.sqrt(p), rel=0.05)
    assert np.std(moment_noise) == pytest.approx(sigma / math.sqrt(1 - share) * p / 4, rel=0.05)  # R^2 = p / 4
    # 1/sigma^2 is split between the two mechanisms: together they are one Gaussian step with sigma
    assert sum(1 / s**2 for s in r.noise_multipliers.values()) == pytest.approx(1 / sigma**2)


def test_composition_against_an_independent_rdp_computation():
    """The attribute step (q = 1) composed with DP-SGD steps: the ledger's accountant vs closed-form RDP."""
    from scripts.privacy.accounting import compose_epsilon

    dp_sgd, attribute = (1.1, 0.5, 8), (2.5, 1.0, 1)
    ours = compose_epsilon([dp_sgd, attribute], 1e-5, "rdp")
    independent, _ = rdp_epsilon([dp_sgd, attribute], 1e-5)  # integer orders, no Opacus
    # Opacus also uses fractional orders (a tighter bound), so it is at most the integer-order one and close
    assert ours <= independent + 1e-9 and ours == pytest.approx(independent, rel=0.03)
    # the two mechanisms of the stage (sigma_k = sigma / sqrt(w_k)) are exactly the recorded single step
    split = [(2.5 / math.sqrt(0.3), 1.0, 1), (2.5 / math.sqrt(0.7), 1.0, 1)]
    assert rdp_epsilon([dp_sgd, *split], 1e-5)[0] == pytest.approx(independent, rel=1e-12)
    assert compose_epsilon([dp_sgd, *split], 1e-5, "prv") == pytest.approx(
        compose_epsilon([dp_sgd, attribute], 1e-5, "prv"), abs=0.02
    )
    # composed, never added
    alone = compose_epsilon([dp_sgd], 1e-5, "rdp") + compose_epsilon([attribute], 1e-5, "rdp")
    assert ours < alone
    # the cohort card composes each stage once, even when it is in both ledgers
    a = {"stage": "dp", "started": "t0", "noise_multiplier": 1.1, "sample_rate": 0.5, "steps": 8}
    b = {"stage": "attributes_dp", "started": "t1", "noise_multiplier": 2.5, "sample_rate": 1.0, "steps": 1}
    total, stages = compose_cohort([[a], [a, b]], 1e-5, "rdp")
    assert len(stages) == 2 and total == pytest.approx(ours)


def _stage(cohorts, tmp_path, attribute_ranges, **overrides) -> AttributeStageSettings:
    args = dict(
        datalist=str(cohorts["private"] / "datalist.json"),
        attribute_ranges=attribute_ranges,
        model_path=str(tmp_path / "attributes_dp.json"),
        ledger_path=str(tmp_path / "ledger.json"),
        report_path=str(tmp_path / "report.json"),
        accountant="rdp",
        target_epsilon=30.0,
        max_noise_ratio=10.0,
        seed=0,
    )
    return AttributeStageSettings(**{**args, **overrides})


def _private_values(cohorts) -> list[str]:
    """Every private value that is not on the public grid (cells of attributes.csv with decimals)."""
    with open(cohorts["private"] / "attributes.csv") as f:
        return sorted({v for row in csv.DictReader(f) for k, v in row.items() if k in ATTRIBUTE_NAMES and "." in v})


def test_stage_ledger_entry_composition_and_no_private_row(cohorts, tmp_path, attribute_ranges):
    dp_entry = {
        "stage": "diffusion_dp_finetune", "dataset": str(cohorts["private"] / "datalist.json"),
        "privacy_unit": "subject", "units": 4, "records": 8, "noise_multiplier": 1.5, "sample_rate": 0.5,
        "steps": 8, "started": "2026-01-01T00:00:00", "delta": 1e-5, "accountant": "rdp",
    }  # fmt: skip
    report = tmp_path / "privacy_report.json"
    report.write_text(
        json.dumps(
            {
                "epsilon": 9.0,
                "delta": 1e-5,
                "privacy_unit": "subject",
                "status": "complete",
                "accountant": "rdp",
                "stages": [dp_entry],
                "model_sha256": "ab" * 32,
            }
        )
    )
    settings = _stage(cohorts, tmp_path, attribute_ranges, compose_with=str(report))
    out = AttributeStage(settings).run()
    from scripts.privacy.accounting import compose_epsilon

    model = read_model(settings.model_path)
    ledger = json.loads(open(settings.ledger_path).read())
    assert ledger["status"] == "complete" and [s["stage"] for s in ledger["stages"]] == [
        "diffusion_dp_finetune",
        "attributes_dp",
    ]
    entry = ledger["stages"][-1]
    assert (entry["sample_rate"], entry["steps"], entry["privacy_unit"]) == (1.0, 1, "subject")
    sigma = entry["noise_multiplier"]
    total = compose_epsilon([(1.5, 0.5, 8), (sigma, 1.0, 1)], 1e-5, "rdp")
    assert model.privacy["epsilon"] == pytest.approx(total) == pytest.approx(out["epsilon"])
    assert total <= 30.0 and model.privacy["composed_with"]["model_sha256"] == "ab" * 32
    assert out["attributes_model_sha256"] and "subject level" in out["covers"]
    assert model.subjects == len(json.loads((cohorts["private"] / "datalist.json").read_text())["training"]) // 2
    # no private row, nor any private value, in the model file
    text = open(settings.model_path).read()
    numbers = {
        float(x)
        for x in json.dumps(model.to_dict()["columns"]).replace("[", " ").replace("]", " ").replace(",", " ").split()
        if x.replace(".", "").replace("-", "").replace("e", "").isdigit()
    }
    for value in _private_values(cohorts):
        assert f"{value}," not in text and f"{value}\n" not in text and float(value) not in numbers
    assert "sub-" not in text  # nor a subject id
    # rows drawn from the model: EF derived from the volumes, ED and ES rows agree on the subject
    rows = subject_rows(model, draw_subjects(model, 20, np.random.default_rng(0), attribute_ranges))
    for ed, es in zip(rows[::2], rows[1::2]):
        assert (ed["ESED"], es["ESED"]) == (1.0, 0.0)
        assert all(
            ed[n] == es[n] or (math.isnan(ed[n]) and math.isnan(es[n]))
            for n in ATTRIBUTE_NAMES
            if n not in ("ESED", "DEPTH")
        )
        assert ed["LVESV"] < ed["LVEDV"]
        assert ed["LVEF"] == pytest.approx(100 * (ed["LVEDV"] - ed["LVESV"]) / ed["LVEDV"], abs=0.1)


def test_budget_too_small_is_refused_with_numbers(cohorts, tmp_path, attribute_ranges):
    settings = _stage(cohorts, tmp_path, attribute_ranges, target_epsilon=0.5, max_noise_ratio=0.5)
    with pytest.raises(
        ConfigError,
        match=r"too small for a useful attribute model: noise multiplier .* subjects per "
        r"histogram bin for n = \d+ subjects",
    ):
        AttributeStage(settings).run()
    assert not os.path.exists(settings.model_path)
    # a budget already spent by the earlier stages is refused by the ledger, with the numbers
    report = tmp_path / "spent.json"
    entry = {"stage": "dp", "privacy_unit": "subject", "noise_multiplier": 0.5, "sample_rate": 0.5, "steps": 50}
    report.write_text(json.dumps({"epsilon": 99.0, "delta": 1e-5, "privacy_unit": "subject", "stages": [entry]}))
    with pytest.raises(ConfigError, match="already spent by earlier stages"):
        AttributeStage(_stage(cohorts, tmp_path, attribute_ranges, compose_with=str(report))).run()


def test_bad_tables_are_refused(attribute_ranges):
    rows = _phantom_rows(3)
    rows[3]["attributes"] = rows[3]["attributes"].copy()
    rows[3]["attributes"][IDX["AGE"]] += 1.0  # the ES row of sub-0001 disagrees with its ED row
    with pytest.raises(
        DataError,
        match=r"subject sub-0001: its ED row sub-0001_ED and ES row sub-0001_ES disagree on "
        r"the subject-level attribute AGE",
    ):
        subject_table(rows)
    rows = _phantom_rows(2)
    rows[1]["attributes"] = rows[0]["attributes"]  # two ED rows
    with pytest.raises(DataError, match="has two ED rows"):
        subject_table(rows)
    with pytest.raises(DataError, match="no subject id"):
        subject_table([dict(_phantom_rows(1)[0], subject="")])


def test_all_missing_column_is_refused(tmp_path, attribute_ranges, monkeypatch):
    rows = _phantom_rows(6, missing=1.0)  # AGE, SEX, BMI missing for everyone
    stage = AttributeStage(
        AttributeStageSettings(
            datalist="private.json", attribute_ranges=attribute_ranges, model_path=str(tmp_path / "m.json")
        )
    )
    monkeypatch.setattr("scripts.data.load_datalist", lambda *a, **k: rows)
    with pytest.raises(DataError, match=r"column\(s\) \['AGE', 'SEX', 'BMI'\] are missing for every subject"):
        stage.load_table()


def test_files_that_are_not_attribute_models_are_refused(tmp_path, table, attribute_ranges):
    good = fit(table, attribute_ranges, noise_multiplier=1.0, rng=np.random.default_rng(0))
    model = AttributeModel(good.marginals, good.correlation, len(table))
    model.write(str(tmp_path / "ok.json"))
    assert read_model(str(tmp_path / "ok.json")).columns == SUBJECT_COLUMNS
    cases = {
        "garbage.json": ("not json", "not an attribute model"),
        "report.json": (json.dumps({"epsilon": 1.0, "stages": []}), r"not an attribute model \(kind None\)"),
        "future.json": (json.dumps(dict(model.to_dict(), version=99)), "version 99 is not supported"),
        "broken.json": (json.dumps(dict(model.to_dict(), correlation=[[1.0]])), "malformed attribute model"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            read_model(str(tmp_path / name))
    with pytest.raises(DataError, match="attribute model not found"):
        read_model(str(tmp_path / "absent.json"))


def test_sampling_cli_and_plausibility(tmp_path, table, attribute_ranges):
    from scripts.attribute_model.__main__ import main

    release = fit(table, attribute_ranges, noise_multiplier=0.0, rng=np.random.default_rng(0))
    AttributeModel(release.marginals, release.correlation, len(table)).write(str(tmp_path / "m.json"))
    assert main(["sample", "--model", str(tmp_path / "m.json"), "--subjects", "5", "--out", str(tmp_path / "r.csv"),
                 "--seed", "3"]) == 0  # fmt: skip
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and list(rows[0]) == list(ATTRIBUTE_NAMES)
    assert [r["ESED"] for r in rows[:2]] == ["1", "0"]
    bad = np.array([[100.0, 120.0] + [np.nan] * 10])  # ESV > EDV
    assert not plausible(bad, SUBJECT_COLUMNS, attribute_ranges)[0]
    assert main(["sample", "--model", str(tmp_path / "r.csv"), "--subjects", "5", "--out", str(tmp_path / "x")]) == 2


def test_card_states_what_is_not_covered_and_takes_the_evaluation(tmp_path):
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    card = build_card(model_path=str(model), autoencoder_path=None, report_path=str(tmp_path / "absent.json"),
                      attributes_csv=str(model), sampler={"sampler": "ddim"})  # fmt: skip
    assert card["privacy"]["epsilon"] is None
    assert any("no privacy report" in s for s in card["privacy"]["not_covered"])
    assert any("the user's input" in s for s in card["privacy"]["not_covered"])
    report = tmp_path / "privacy_report.json"
    report.write_text(json.dumps({"epsilon": 1.0, "delta": 1e-5, "privacy_unit": "subject", "stages": [],
                                  "model_sha256": "00" * 32}))  # fmt: skip
    card = build_card(model_path=str(model), autoencoder_path=None, report_path=str(report))
    assert any("describes another model" in s for s in card["privacy"]["not_covered"])
    # a matching report without its stages: its own epsilon alone, but nothing to compose an attribute model with
    from scripts.files import sha256

    report.write_text(json.dumps(dict(json.loads(report.read_text()), model_sha256=sha256(model))))
    assert build_card(model_path=str(model), autoencoder_path=None, report_path=str(report))["privacy"]["epsilon"] == 1
    fitted = fit(subject_table(_phantom_rows(4)), ATTRIBUTE_RANGES, noise_multiplier=2.0, rng=np.random.default_rng(0))
    entry = {"stage": "attributes_dp", "started": "t", "noise_multiplier": 2.0, "sample_rate": 1.0, "steps": 1}
    attrs = AttributeModel(fitted.marginals, fitted.correlation, 4, {"delta": 1e-5, "privacy_unit": "subject"}, [entry])
    attrs.write(str(tmp_path / "a.json"))
    card = build_card(model_path=str(model), autoencoder_path=None, report_path=str(report),
                      attributes_model=str(tmp_path / "a.json"))  # fmt: skip
    assert card["privacy"]["epsilon"] is None and "lists no stages" in card["privacy"]["not_covered"][0]
    from scripts.attribute_model.card import write_card

    write_card(str(tmp_path), card)
    (tmp_path / "report.json").write_text(json.dumps({"headline": {"mia_auc": 0.51, "lv_found_rate": 0.4}}))
    add_evaluation(str(tmp_path), str(tmp_path / "report.json"))
    updated = json.loads((tmp_path / "cohort_card.json").read_text())
    assert updated["evaluation"]["headline"]["mia_auc"] == 0.51
    assert "membership-inference AUC: 0.51" in (tmp_path / "cohort_card.md").read_text()


def test_requests_from_the_model_or_a_csv(tmp_path, table, attribute_ranges):
    from scripts.attribute_model.cohort import cohort_requests

    release = fit(table, attribute_ranges, noise_multiplier=1.0, rng=np.random.default_rng(0))
    AttributeModel(release.marginals, release.correlation, len(table)).write(str(tmp_path / "m.json"))
    reqs = cohort_requests(None, str(tmp_path / "m.json"), 3, 7, attribute_ranges)
    assert len(reqs) == 6 and [r.seed for r in reqs] == [7, 7, 8, 8, 9, 9]
    assert reqs[1].source == "dp_attribute_model m.json subject 0000 ES"
    (tmp_path / "req.csv").write_text("LVEDV,ESED\n150,1\n")
    assert cohort_requests(str(tmp_path / "req.csv"), None, None, 0, attribute_ranges)[0].source.endswith("line 2")
    with pytest.raises(ConfigError, match="not both"):
        cohort_requests(str(tmp_path / "req.csv"), str(tmp_path / "m.json"), 3, 0, attribute_ranges)
    with pytest.raises(ConfigError, match="needs --subjects"):
        cohort_requests(None, str(tmp_path / "m.json"), None, 0, attribute_ranges)


def test_bundle_inference_draws_a_cohort_and_card(tiny_bundle, bundle, cohorts, tmp_path, monkeypatch):  # noqa: F811
    """``configs/inference.yaml --attributes_model --subjects``: sources, card with composed total, no private row."""
    import yaml

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    models = tiny_bundle / "models"
    ranges = yaml.safe_load(open("configs/common.yaml"))["attribute_ranges"]
    # the tiny model's report, with the ledger entry of a DP fine-tuning
    dp = {"stage": "dp", "started": "t0", "privacy_unit": "subject", "noise_multiplier": 1.2, "sample_rate": 0.5,
          "steps": 8, "delta": 1e-5, "accountant": "prv"}  # fmt: skip
    report = dict(json.loads((models / "privacy_report.json").read_text()), stages=[dp])
    (tmp_path / "privacy_report.json").write_text(json.dumps(report))
    settings = _stage(cohorts, tmp_path, ranges, model_path=str(tmp_path / "attributes_dp.json"),
                      compose_with=str(tmp_path / "privacy_report.json"))  # fmt: skip
    AttributeStage(settings).run()
    out = tmp_path / "cohort"
    args = [
        "--config_file",
        "['configs/common.yaml','configs/inference.yaml']",
        "--attributes_model",
        settings.model_path,
        "--subjects",
        "2",
    ]
    args += ["--output_dir", str(out), "--bundle_root", str(tiny_bundle), "--device", "cpu", "--num_inference_steps"]
    args = ["--report_path", str(tmp_path / "privacy_report.json"), *args]
    proc = bundle("run", "inference", *args, "2", "--preview_count", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "manifest.csv") as f:
        manifest = list(csv.DictReader(f))
    assert [m["source"] for m in manifest] == [
        f"dp_attribute_model attributes_dp.json subject {s:04d} {p}" for s in range(2) for p in ("ED", "ES")
    ]
    assert [m["seed"] for m in manifest] == ["0", "0", "1", "1"] and [m["ESED"] for m in manifest] == ["1", "0"] * 2
    private = set(_private_values(cohorts))
    assert not private & {m[n] for m in manifest for n in ATTRIBUTE_NAMES}  # no private value in the manifest
    side = json.loads((out / "row0001_sample000.json").read_text())
    assert side["attributes_source"].endswith("subject 0000 ES") and len(side["attributes_model_sha256"]) == 64
    card = json.loads((out / "cohort_card.json").read_text())
    model = read_model(settings.model_path)
    from scripts.privacy.accounting import compose_epsilon

    # the report names the prv accountant: the card composes both stages with it, the DP fine-tuning once
    assert card["privacy"]["accountant"] == "prv" and len(card["privacy"]["stages"]) == 2
    sigma = model.privacy["noise_multiplier"]
    total = compose_epsilon([(1.2, 0.5, 8), (sigma, 1.0, 1)], 1e-5, "prv")
    assert card["privacy"]["epsilon"] == pytest.approx(total) and total < 30.0
    assert side["privacy"]["epsilon"] == 7.9  # the sidecar's image-model guarantee is unchanged
    assert card["files"]["attribute_model"]["sha256"] == side["attributes_model_sha256"]
    assert card["files"]["diffusion_model"]["sha256"] == side["model_sha256"] and card["sampler"]["steps"] == 2
    assert card["attribute_source"] == "dp_attribute_model" and card["subjects"] == 2 and card["samples"] == 4
    assert "Total: (" in (out / "cohort_card.md").read_text()


def test_release_archive_holds_the_cohort_card(weights, tmp_path, table, attribute_ranges):  # noqa: F811
    import zipfile

    from scripts.release import ReleaseError, release

    release_ = fit(table, attribute_ranges, noise_multiplier=2.0, rng=np.random.default_rng(0))
    entry = {"stage": "attributes_dp", "started": "t", "noise_multiplier": 2.0, "sample_rate": 1.0, "steps": 1}
    privacy = {"delta": 1e-5, "privacy_unit": "subject", "accountant": "prv"}
    AttributeModel(release_.marginals, release_.correlation, len(table), privacy, [entry]).write(
        str(tmp_path / "a.json")
    )
    public = {"autoencoder": weights / "autoencoder.pt", "diffusion": weights / "diffusion.pt"}
    dp_entry = {"stage": "dp", "started": "t0", "noise_multiplier": 1.2, "sample_rate": 0.5, "steps": 8}
    report = dict(json.loads((weights / "privacy_report.json").read_text()), stages=[dp_entry])
    (tmp_path / "privacy_report.json").write_text(json.dumps(report))
    dp = {"model": weights / "model.pt", "report": tmp_path / "privacy_report.json"}
    summary = release(tmp_path / "dist", "https://e.org/r", ".", **public, **dp, attributes_model=tmp_path / "a.json")
    name = summary["name"]
    with zipfile.ZipFile(summary["archive"]) as archive:
        card = json.loads(archive.read(f"{name}/models/cohort_card.json"))
        assert archive.read(f"{name}/models/attributes_dp.json") == (tmp_path / "a.json").read_bytes()
        assert "Total: (" in archive.read(f"{name}/models/cohort_card.md").decode()
    from scripts.privacy.accounting import compose_epsilon

    assert card["privacy"]["epsilon"] == pytest.approx(compose_epsilon([(1.2, 0.5, 8), (2.0, 1.0, 1)], 1e-5, "prv"))
    assert not any("not covered" in s or "no privacy report" in s for s in card["privacy"]["not_covered"])
    assert card["files"]["diffusion_model"] == {"path": "models/model.pt", "sha256": summary["files"][3]["sha256"]}
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ReleaseError, match="--attributes_model: .*not an attribute model"):
        release(tmp_path / "dist2", "https://e.org/r", ".", **public, **dp, attributes_model=tmp_path / "bad.json")


def test_bundle_config_runs_the_stage(cohorts, tmp_path, monkeypatch):
    """configs/dp_attributes.yaml, parsed and run in-process as `monai.bundle run training` does."""
    from conftest import ROOT
    from monai.bundle import ConfigParser

    monkeypatch.chdir(ROOT)
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / "common.yaml"), str(ROOT / "configs" / "dp_attributes.yaml")])
    parser.update(
        {"bundle_root": str(tmp_path), "dataset_dir": str(cohorts["private"]), "accountant": "rdp",
         "target_epsilon": 40.0, "max_noise_ratio": 5.0, "seed": 0}
    )  # fmt: skip
    parser.parse()
    parser.get_parsed_content("initialize")
    report = parser.get_parsed_content("training")[0]
    assert report["stages"][-1]["stage"] == "attributes_dp" and report["epsilon"] <= 40.0
    assert read_model(str(tmp_path / "models" / "attributes_dp.json")).privacy["composed_with"] is None
    assert (tmp_path / "models" / "attributes_privacy_report.json").is_file()


def test_stage_refuses_an_impossible_value(cohorts, tmp_path, attribute_ranges):
    """LVEDV = 1e6 ml in the private table: refused naming file, line and column (it was fitted, exit 0)."""
    cohort = tmp_path / "cohort"
    shutil.copytree(cohorts["private"], cohort)
    table = (cohort / "attributes.csv").read_text().splitlines()
    header = table[0].split(",")
    row = table[1].split(",")
    row[header.index("LVEDV")] = "1e6"
    (cohort / "attributes.csv").write_text("\n".join([table[0], ",".join(row), *table[2:]]) + "\n")
    stage = AttributeStage(
        AttributeStageSettings(
            datalist=str(cohort / "datalist.json"),
            attribute_ranges=attribute_ranges,
            model_path=str(tmp_path / "m.json"),
        )
    )
    with pytest.raises(DataError, match=r"attributes.csv, line 2, column 'LVEDV': 1e\+06 is not a possible value"):
        stage.load_table()
