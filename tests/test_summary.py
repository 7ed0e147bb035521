"""The demo's closing tables: stage times (also of steps run side by side) and the acceptance checks."""

from __future__ import annotations

import json
import re

from tools.summary import checks, stage_times


def test_wall_time_of_overlapping_stages_is_not_their_sum(tmp_path):
    log = tmp_path / "times.tsv"
    # two stages side by side (0-100 s and 10-60 s), then one after them (100-130 s)
    log.write_text("a\t100.0\t0\t1000.0\nbeside a\t50.0\t0\t1010.0\nb\t30.0\t0\t1100.0\n")
    text = stage_times(str(log))
    assert re.search(r"sum of the stages +3 min  0.0 s", text)
    assert re.search(r"wall time +2 min 10.0 s", text)


def test_checks_fail_below_a_threshold_or_without_a_number(tmp_path):
    def report(name, **headline):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"headline": headline}))
        return str(path)

    public = report("public", lv_found_rate=0.95, lvedv_pearson_r=0.79)
    dp = report("dp", lv_found_rate=0.8, lvedv_pearson_r=0.7)  # no sweep number
    lines = {line.split("  ")[1].strip(): line for line in checks(public, dp).splitlines()[1:6]}
    assert lines["public model: LV found"].endswith("pass")
    assert lines["public model: LVEDV r (requested vs measured)"].endswith("FAIL")
    assert lines["DP model: LV found"].endswith("pass")
    assert "missing" in lines["DP model: LVEDV sweep Spearman rho"] and lines[
        "DP model: LVEDV sweep Spearman rho"
    ].endswith("FAIL")
    assert "missing" in checks(str(tmp_path / "none.json"), dp).splitlines()[1]
