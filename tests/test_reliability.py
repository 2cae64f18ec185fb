"""Runs that meet the limits of a machine or a model: activations above the free memory, an interrupt in
the middle of a reconstruction, a layer the reconstruction cannot re-fit."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

import rr_alloc.repair.propagate as propagate
from rr_alloc.cli import main

reconstruct_mod = importlib.import_module("rr_alloc.repair.reconstruct")  # the package exports a function of that name

OBS = "obs>bn>naive@block+logits"


def _search(out: Path, factory: str = "tiny_digits_cnn", *extra: str) -> list[str]:
    return [
        *("search", "--budget", "0.8", "--model", f"factories:{factory}", "--repair", OBS),
        *("--calib-size", "64", "--selection-size", "32", "--eval-size", "64", "--out", str(out), *extra),
    ]


def test_activations_above_the_free_memory_take_partial_passes_with_the_same_result(tmp_path, capsys, monkeypatch):
    assert main(_search(tmp_path / "lockstep.json")) == 0, capsys.readouterr().err
    capsys.readouterr()
    monkeypatch.setattr(propagate, "available_memory_bytes", lambda device="cpu": 1e3)  # a 400-byte cap
    assert main(_search(tmp_path / "partial.json")) == 0, capsys.readouterr().err
    assert "note: reconstruction: lockstep, then per-layer passes" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("lockstep.json", "partial.json"))
    assert a["verify"]["repair_path"] == "lockstep"
    assert "memory cap" in b["verify"]["repair_path"]
    assert [x["n_pruned"] for x in a["layers"]] == [x["n_pruned"] for x in b["layers"]]
    for key in ("top1", "agreement", "kl"):
        assert b["verify"][key] == pytest.approx(a["verify"][key], rel=1e-4, abs=1e-6)


def test_an_interrupt_during_the_reconstruction_leaves_the_old_plan(tmp_path, capsys, monkeypatch):
    out = tmp_path / "plan.json"
    assert main(_search(out)) == 0, capsys.readouterr().err
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}  # the plan and its side files
    fit, calls = reconstruct_mod.fit_groups, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C with one layer re-fitted
            raise KeyboardInterrupt
        return fit(*args, **kwargs)

    monkeypatch.setattr(reconstruct_mod, "fit_groups", interrupted)
    capsys.readouterr()
    assert main(_search(out)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: interrupted"
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing replaced, nothing added


def test_a_failure_while_the_side_files_are_written_leaves_the_earlier_runs_files(tmp_path, capsys, monkeypatch):
    import rr_alloc.cli.search_cmd as search_cmd

    out = tmp_path / "plan.json"
    args = ["search", "--budget", "0.9", "--calib-size", "64", "--selection-size", "32", "--out", str(out)]
    assert main(args) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken_figure(*args, **kwargs):  # the CSV is written by then; the figure fails
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(search_cmd, "plot_rr_curves", broken_figure)
    capsys.readouterr()
    assert main([*args[:3], "0.8", *args[4:], "--seed", "1"]) == 2  # another seed: another profile.csv
    assert capsys.readouterr().err.strip().startswith("error:")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing replaced, nothing left


def test_a_layer_the_reconstruction_cannot_refit_is_named_in_the_plan(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(_search(out, "reflect_padded_cnn")) == 0, capsys.readouterr().err
    plan = json.loads(out.read_text())
    left = plan["verify"]["repair_left"]
    assert list(left) == ["3"] and "padding_mode='reflect'" in left["3"]
    pruned = sum(x["n_pruned"] for x in plan["layers"])
    assert pruned == round(0.8 * sum(x["n_weights"] for x in plan["layers"]))


@pytest.mark.parametrize("after", [0.3, 1.5])
def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path, after):
    """SIGINT while torch and the library load (or just after) ends with one line and exit 130."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "plan.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rr_alloc", "search", "--budget", "0.9", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # finished before the signal (a fast machine): nothing to check
        return
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "error: interrupted" and not out.exists()


def test_a_profile_without_residual_distortion_plots_without_warnings(tmp_path):
    """Constant calibration images can leave every D_res at zero: the figure is drawn on a linear axis."""
    import warnings

    import numpy as np

    from rr_alloc.nn.layers import LayerInfo
    from rr_alloc.plans.report import plot_rr_curves
    from rr_alloc.profiling.rr import RRProfile

    zeros = np.zeros((2, 3))
    layers = [LayerInfo("a", (4, 4), 16, "linear"), LayerInfo("b", (4, 4), 16, "linear")]
    profile = RRProfile(layers, np.array([0.5, 0.7, 0.9]), zeros, zeros)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = plot_rr_curves(profile, tmp_path / "rr.png")
    assert path.stat().st_size > 0
