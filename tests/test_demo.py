"""make demo's runner (tools/demo.py): steps forked from one process, their needs and core counts kept."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from tools.demo import Step, demo_steps, run_steps
from tools.summary import stage_times

REPO = Path(__file__).resolve().parents[1]
FAKE_STEP = """
    import sys, time, torch
    events, name, seconds, code = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    with open(events, "a") as f:
        f.write(f"start {name} {time.time()} {torch.get_num_threads()}\\n")
    print(f"{name} says hello")
    time.sleep(seconds)
    with open(events, "a") as f:
        f.write(f"end {name} {time.time()} 0\\n")
    sys.exit(code)
"""


@pytest.fixture
def fake_step(tmp_path, monkeypatch):
    """A module run as ``__main__`` by the steps: records its start, end and thread count, sleeps, exits."""
    (tmp_path / "fake_step.py").write_text(textwrap.dedent(FAKE_STEP))
    monkeypatch.syspath_prepend(str(tmp_path))
    events = tmp_path / "events.txt"

    def step(name, seconds=0.3, code=0, needs=(), threads=1, log=True):
        argv = [str(events), name, str(seconds), str(code)]
        return Step(name, argv, tuple(needs), threads, str(tmp_path / f"{name}.log") if log else None, "fake_step")

    def timeline():
        rows = [line.split() for line in events.read_text().splitlines()] if events.exists() else []
        return {(kind, name): (float(t), int(threads)) for kind, name, t, threads in rows}

    return step, timeline


def test_steps_wait_for_their_needs_and_share_the_cores(fake_step, tmp_path, capfd):
    step, timeline = fake_step
    times = str(tmp_path / "times.tsv")
    steps = [
        step("a", threads=2, log=False),
        step("b", needs=["a"], seconds=0.6),
        step("c", needs=["a"], seconds=0.6),
        step("d", needs=["b"], threads=2),
    ]
    assert run_steps(steps, times, cores=2) == 0
    t = timeline()
    assert t[("start", "a")][1] == 2 and t[("start", "b")][1] == 1  # each step's thread count
    assert t[("end", "a")][0] <= min(t[("start", "b")][0], t[("start", "c")][0])  # needs first
    assert t[("start", "c")][0] < t[("end", "b")][0] and t[("start", "b")][0] < t[("end", "c")][0]  # side by side
    assert t[("start", "d")][0] >= max(t[("end", "b")][0], t[("end", "c")][0])  # two cores: alone
    printed = capfd.readouterr().out
    assert "== b (output in " in printed and "python -m fake_step" in printed and "-- d: done in" in printed
    assert "a says hello" in printed and "b says hello" not in printed  # a logs to the terminal, b to its file
    assert "b says hello" in (tmp_path / "b.log").read_text()
    assert sorted(line.split("\t")[0] for line in open(times)) == ["a", "b", "c", "d"]
    assert "wall time" in stage_times(times)


def test_a_failure_stops_what_needs_it_and_shows_the_end_of_its_log(fake_step, tmp_path, capfd):
    step, timeline = fake_step
    times = str(tmp_path / "times.tsv")
    steps = [step("broken", code=3), step("beside", seconds=0.6), step("after", needs=["broken"])]
    assert run_steps(steps, times, cores=2) == 3
    t = timeline()
    assert ("end", "beside") in t and ("start", "after") not in t  # the running step finishes; nothing new starts
    printed = capfd.readouterr().out
    assert "-- broken: FAILED (exit status 3)" in printed and "broken says hello" in printed
    assert "not run after the failure: after" in printed
    assert [(r.split("\t")[0], r.split("\t")[2]) for r in open(times).read().splitlines()] == [
        ("broken", "3"),
        ("beside", "0"),
    ]


def test_unknown_need_is_refused(fake_step, tmp_path):
    step, _ = fake_step
    with pytest.raises(ValueError, match=r"unknown: \['nowhere'\]"):
        run_steps([step("a", needs=["nowhere"])], str(tmp_path / "times.tsv"))


def test_needs_in_a_cycle_are_refused_not_skipped(fake_step, tmp_path):
    step, timeline = fake_step
    steps = [step("a"), step("b", needs=["c"]), step("c", needs=["b"])]
    with pytest.raises(ValueError, match=r"the needs of \['b', 'c'\] can never all be met"):
        run_steps(steps, str(tmp_path / "times.tsv"))
    assert ("end", "a") in timeline() and ("start", "b") not in timeline()


def test_demo_steps_name_existing_configs_and_evaluate_after_the_segmenter():
    steps = {s.name: s for s in demo_steps(public_subjects=12, private_subjects=8, logs="logs")}
    assert len(steps) == 14 and all(set(s.needs) <= set(steps) for s in steps.values())
    for s in steps.values():
        for i, arg in enumerate(s.argv[:-1]):
            if arg == "--config_file":
                files = eval(s.argv[i + 1]) if s.argv[i + 1].startswith("[") else [s.argv[i + 1]]  # noqa: S307
                assert all((REPO / f).is_file() for f in files), s.name
    assert {"segmenter", "synthesis: DP model", "LVEDV sweep: DP model"} <= set(steps["evaluation: DP model"].needs)
    assert "segmenter" in steps["evaluation: public model"].needs
    assert [s.name for s in steps.values() if s.threads == 2] == ["phantom cohorts", "autoencoder", "latent diffusion"]
    assert steps["phantom cohorts"].argv[3:7] == ["--public_subjects", "12", "--private_subjects", "8"]
    assert all(s.log is None or s.log.startswith("logs" + os.sep) for s in steps.values())
