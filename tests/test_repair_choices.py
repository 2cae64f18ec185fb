"""The repair a command runs is the one it says: a step with nothing to act on is refused (or, in the default
pipeline, skipped with a note), and an obs plan is never replayed with magnitude masks."""

from __future__ import annotations

import pytest
from test_cli import run_cli


def test_bn_on_a_model_without_batchnorm_is_refused(tmp_path):
    out = tmp_path / "plan.json"
    r = run_cli("search", "--budget", "0.8", "--model", "factories:plain_vgg", "--repair", "bn", "--out", str(out))
    assert r.returncode == 2 and "repair step 'bn' has nothing to act on" in r.stderr and not out.exists(), r.stderr


def test_the_default_pipeline_says_once_that_it_skips_bn(tmp_path):
    r = run_cli("search", "--budget", "0.8", "--model", "factories:plain_vgg", "--out", str(tmp_path / "plan.json"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("note: repair step bn skipped: the model has no BatchNorm") == 1


@pytest.fixture(scope="module")
def obs_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("obs") / "plan.json"
    r = run_cli("search", "--budget", "0.9", "--repair", "obs>bn>naive@block+logits", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize(
    "command",
    [["verify"], ["apply", "--out", "w.pt"], ["export", "--format", "masks", "--out", "m.pt"]],
)
@pytest.mark.parametrize("repair", ["bn", "none"])
def test_an_obs_plan_is_never_replayed_with_magnitude_masks(obs_plan, tmp_path, command, repair):
    r = run_cli(command[0], "--plan", str(obs_plan), "--repair", repair, *command[1:], cwd=tmp_path)
    assert r.returncode == 2 and "mask_rule obs" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())
