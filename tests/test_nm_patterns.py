"""N:M plans from the command line: the pattern planned, verified and applied; a bad pattern is one line."""

from __future__ import annotations

import json

import pytest

from rr_alloc.cli import main


def test_nm_pattern_from_the_command_line(tmp_path, capsys):
    from rr_alloc import load_pruned
    from rr_alloc.models.digits import DigitsResNet

    out = tmp_path / "plan.json"
    assert main(["search", "--pattern", "2:4", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["version"] == 2 and d["pattern"] == "2:4" and d["allocator"] == "2:4"
    for l in d["layers"]:  # the project's grouping: 4 input channels at one kernel position, 2 kept
        want = l["n_weights"] // 2 if l["shape"][1] % 4 == 0 else 0
        assert l["n_pruned"] == want, l["name"]
    capsys.readouterr()
    assert main(["verify", "--plan", str(out)]) == 0
    assert f"{100 * d['verify']['top1']:.2f}" in capsys.readouterr().out
    assert main(["apply", "--plan", str(out), "--out", str(tmp_path / "p.pt")]) == 0
    model = load_pruned(DigitsResNet(), tmp_path / "p.pt")
    for l in d["layers"]:
        w = model.get_submodule(l["name"]).weight
        if l["n_pruned"]:
            g = (w != 0).movedim(1, -1)
            g = g.reshape(*g.shape[:-1], g.shape[-1] // 4, 4)
            assert bool((g.sum(-1) <= 2).all()), l["name"]


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--pattern", "2:4", "--budget", "0.9"], "exactly one"),
        ([], "exactly one"),
        (["--pattern", "4:2"], "0 < N < M"),
        (["--pattern", "two"], "N:M"),
    ],
)
def test_bad_pattern_is_one_line(tmp_path, capsys, args, msg):
    out = tmp_path / "plan.json"
    assert main(["search", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and msg in err
    assert not list(tmp_path.iterdir())
