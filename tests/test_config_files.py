"""Config files and repeated options: every key checked as its flag is, nothing kept silently, no alias bomb."""

from __future__ import annotations

import json
import time

import pytest
from test_cli import run_cli

from rr_alloc.config.files import load_config_file
from rr_alloc.errors import UserError


def _search(tmp_path, *args: str):
    out = tmp_path / "run" / "plan.json"
    r = run_cli("search", "--budget", "0.9", *args, "--out", str(out))
    return r, out


@pytest.mark.parametrize(
    "text, words",
    [
        ("lam: bogus", "config key 'lam' must be mean or median, or a finite number >= 0"),
        ("lam: .nan", "config key 'lam' must be"),
        ("transform: {mean: null}", "transform mean must be a list of finite numbers"),
        ("transform: {crop: 100000}", "transform crop must be a whole number of pixels in [1, 1024]"),
        ("calib_size: 8\ncalib-size: 9", "sets 'calib_size' twice (as 'calib_size' and 'calib-size')"),
        ("n_trials: 5", "config key 'n_trials' applies to the end-to-end search"),
        ("stages: [4]", "config key 'stages' applies to the end-to-end search"),
    ],
)
def test_a_bad_config_key_is_one_line(tmp_path, text, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text + "\n")
    r, out = _search(tmp_path, "--config", str(cfg))
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_a_yaml_merge_key_is_read(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("<<: {seed: 1, calib_size: 64}\ncalib_size: 32\n")
    assert load_config_file(cfg) == {"seed": 1, "calib_size": 32}  # the explicit key overrides the merged one


def test_environment_variables_expand_inside_lists(tmp_path, monkeypatch):
    monkeypatch.setenv("RR_LAYER", "layer1")
    cfg = tmp_path / "c.yaml"
    cfg.write_text('include: ["${RR_LAYER}.*", "conv1"]\n')
    assert load_config_file(cfg)["include"] == ("layer1.*", "conv1")


def test_an_unset_variable_in_a_key_the_flag_overrides_is_no_error(tmp_path, monkeypatch):
    monkeypatch.delenv("RR_NOT_SET", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: ${RR_NOT_SET}\n")
    r, _ = _search(tmp_path, "--config", str(cfg))
    assert r.returncode == 2 and "uses ${RR_NOT_SET}, which is not set" in r.stderr
    r, out = _search(tmp_path, "--config", str(cfg), "--seed", "0")  # the fix the message suggests works
    assert r.returncode == 0 and out.exists(), r.stderr


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\n")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="expands to more than 100,000 values"):
        load_config_file(cfg)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("args", [["--budget", "0.8"], ["--seed", "1", "--seed=2"]])
def test_a_flag_given_twice_is_refused(tmp_path, args):
    r, out = _search(tmp_path, *args)
    assert r.returncode == 2 and "is given twice: keep one" in r.stderr and not out.exists(), r.stderr


@pytest.fixture(scope="module")
def plan_text(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert run_cli("search", "--budget", "0.9", "--out", str(out)).returncode == 0
    return out.read_text()


def test_a_plan_with_a_repeated_key_is_refused(tmp_path, plan_text):
    p = tmp_path / "plan.json"
    p.write_text(plan_text.replace('"budget": 0.9,', '"budget": 0.9,\n  "budget": 0.5,', 1))
    r = run_cli("verify", "--plan", str(p))
    assert r.returncode == 2 and "key 'budget' appears twice" in r.stderr, r.stderr


def test_a_deeply_nested_plan_names_the_plan(tmp_path, plan_text):
    d = json.loads(plan_text)
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    r = run_cli("verify", "--plan", str(p))
    assert r.returncode == 2 and "nested too deeply to be a plan" in r.stderr and "model" not in r.stderr, r.stderr


@pytest.mark.parametrize("text", ["? [a, b]\n: 1\n", "transform: {mean: [0.5], std: [0.5], {a: 1}: 2}\n"])
def test_a_key_that_is_not_a_plain_name_is_one_line(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(UserError, match="a key must be a plain name"):
        load_config_file(cfg)


def test_the_commands_out_overrides_an_unset_variable_in_the_files_out(tmp_path, monkeypatch):
    monkeypatch.delenv("RR_NOT_SET", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("out: ${RR_NOT_SET}/plan.json\n")
    r, out = _search(tmp_path, "--config", str(cfg))
    assert r.returncode == 0 and out.exists(), r.stderr


def test_an_option_with_its_own_flag_is_named_by_it(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text('cache: "no"\n')
    r, _ = _search(tmp_path, "--config", str(cfg))
    assert r.returncode == 2 and "cache (--no-cache) must be" in r.stderr, r.stderr


def test_config_expands_environment_variables(tmp_path, monkeypatch):
    from rr_alloc.config.files import load_config_file

    monkeypatch.setenv("RR_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("RR_TEST_NAME", "w")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("checkpoint: ${RR_TEST_ROOT}/$RR_TEST_NAME.th\ntrain_data: ~/data\ngrid: [0.5, 0.99]\n")
    kw = load_config_file(cfg)
    assert kw["checkpoint"] == f"{tmp_path}/w.th" and kw["train_data"] == f"{tmp_path}/home/data"
    assert kw["grid"] == (0.5, 0.99)
    cfg.write_text("checkpoint: ${RR_TEST_SURELY_UNSET}/x\n")
    with pytest.raises(UserError, match="RR_TEST_SURELY_UNSET"):
        load_config_file(cfg)
