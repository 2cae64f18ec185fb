"""search refuses bad input in one ``error:`` line (numbers, trial counts, patterns, config keys, outputs it
must not overwrite) and leaves nothing half-written."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import OPTUNA_ARGS, QUICK, bad_search, image_folder, refused, unwritable

from rr_alloc.cli import main


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--threads", "-1"], "--threads"),
        (["--threads", "0"], "--threads"),
        (["--grid", "nan", "0.99"], "--grid"),
        (["--grid", "0.5", "inf"], "--grid"),
        (["--s-max", "nan"], "--s-max"),
        (["--calib-size", "0"], "--calib-size"),
        (["--calib-size", "1"], "--calib-size) must be a whole number >= 2"),
        (["--seed", "-1"], "--seed"),
        (["--num-classes", "0"], "--num-classes"),
    ],
)
def test_bad_numbers_are_one_line(tmp_path, capsys, args, flag):
    err = bad_search(tmp_path, capsys, "--budget", "0.9", *args)
    assert flag in err


@pytest.mark.parametrize(
    "args", [["--n-trials", "-1"], ["--timeout", "-1"], ["--n-trials", "0"], ["--n-trials", "0", "--timeout", "nan"]]
)
def test_bad_trial_counts_leave_nothing(tmp_path, capsys, args):
    err = bad_search(tmp_path, capsys, "--budget", "0.9", *OPTUNA_ARGS, *args)
    assert "--n-trials" in err or "--timeout" in err
    assert not (tmp_path / "out").exists()  # no half-initialised optuna.db, no empty folder


def test_zero_trials_writes_the_best_trial(tmp_path, capsys):
    import json

    import optuna

    out = tmp_path / "run" / "plan.json"
    assert main(["search", "--budget", "0.9", *OPTUNA_ARGS, "--n-trials", "2", "--out", str(out)]) == 0
    storage = f"sqlite:///{out.parent / 'optuna.db'}"
    (name,) = optuna.get_all_study_names(storage)
    n = len(optuna.load_study(study_name=name, storage=storage).trials)
    first = json.loads(out.read_text())
    out.unlink()
    assert main(["search", "--budget", "0.9", *OPTUNA_ARGS, "--n-trials", "0", "--out", str(out)]) == 0
    assert len(optuna.load_study(study_name=name, storage=storage).trials) == n  # no trial added
    assert json.loads(out.read_text())["layers"] == first["layers"]  # the study's best trial


@pytest.mark.parametrize(
    "args,what",
    [
        (["--repair", "bogus"], "bogus"),
        (["--reference", "bogus"], "bogus"),
        (["--calib-size", "100000"], "exceed"),
        (["--checkpoint", "missing.pt"], "missing.pt"),
        (["--model", "no_such_model"], "no_such_model"),
        (["--storage", "x.txt"], "x.txt"),
    ],
)
def test_bad_input_with_optuna_leaves_no_folder(tmp_path, capsys, args, what):
    base = OPTUNA_ARGS if "--calib-size" not in args else [a for a in OPTUNA_ARGS if a not in ("--calib-size", "64")]
    err = bad_search(tmp_path, capsys, "--budget", "0.9", *base, "--n-trials", "1", *args)
    assert what in err
    assert not (tmp_path / "out").exists()


def test_summary_survives_other_studies(tmp_path, capsys):
    import optuna

    out = tmp_path / "run" / "plan.json"
    out.parent.mkdir()
    storage = f"sqlite:///{out.parent / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(storage=storage, study_name="empty")
    s = optuna.create_study(storage=storage, study_name="failed")
    s.tell(s.ask(), state=optuna.trial.TrialState.FAIL)
    s = optuna.create_study(storage=storage, study_name="multi", directions=["minimize", "minimize"])
    s.tell(s.ask(), [1.0, 2.0])
    optuna.create_study(storage=storage, study_name="running").ask()
    code = main(["search", "--budget", "0.9", *OPTUNA_ARGS, "--n-trials", "1", "--out", str(out)])
    cap = capsys.readouterr()
    assert code == 0 and "Traceback" not in cap.err, cap.err
    lines = [l for l in cap.out.splitlines() if l.startswith("optuna study") and "completed trials" in l]
    assert len(lines) == 5 and all(f"study {n}:" in cap.out for n in ("empty", "failed", "multi", "running"))


def test_ctrl_c_in_a_trial_is_one_line(tmp_path, capsys, monkeypatch):
    from rr_alloc.search.scoring import SelectionScorer

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(SelectionScorer, "score", interrupt)  # inside the first trial's evaluation
    code = main(
        ["search", "--budget", "0.9", *OPTUNA_ARGS, "--n-trials", "3", "--out", str(tmp_path / "r" / "plan.json")]
    )
    err = capsys.readouterr().err
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and "%|" not in l]  # minus progress bars
    assert code == 130 and lines == ["error: interrupted"], err
    assert not (tmp_path / "r" / "plan.json").exists()


@pytest.mark.parametrize(
    "line,key",
    [
        ("calib_size: abc", "calib_size"),
        ("grid: abc", "grid"),
        ("device: 5", "device"),
        ("seed: [1, 2]", "seed"),
        ("batch_size: 1.5", "batch_size"),
        ("pretrained: 'yes'", "pretrained"),
        ("include: [1, 2]", "include"),
        ("transform: [1, 2]", "transform"),
        ("model: ''", "model"),
        ("s_max: .inf", "s_max"),
        ("n_trials: -3", "n_trials"),
        ("transform: {mean: abc}", "transform mean"),
        ("transform: {mean: [0.5], std: [0]}", "transform std"),
        ("transform: {resize: big}", "transform resize"),
    ],
)
def test_config_values_are_type_checked(tmp_path, capsys, line, key):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(line + "\n")
    err = bad_search(tmp_path, capsys, "--budget", "0.9", "--config", str(cfg))
    assert err.startswith((f"error: {key} ", f"error: config key '{key}' "))  # the latter: keys with no flag


def test_config_out_key_is_used(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"out: {tmp_path / 'from_config'}/\ncalib_size: 64\nselection_size: 32\n")
    assert main(["search", "--budget", "0.9", "--no-verify", "--config", str(cfg)]) == 0, capsys.readouterr().err
    assert (tmp_path / "from_config" / "plan.json").is_file()


@pytest.mark.parametrize("how", ["existing-dir", "trailing-slash"])
def test_search_out_folder_means_plan_json(tmp_path, capsys, how):
    d = tmp_path / "run"
    if how == "existing-dir":
        d.mkdir()
    arg = str(d) + ("/" if how == "trailing-slash" else "")
    assert (
        main(["search", "--budget", "0.9", "--no-verify", "--calib-size", "64", "--selection-size", "32", "--out", arg])
        == 0
    ), capsys.readouterr().err
    assert (d / "plan.json").is_file() and (d / "profile.csv").is_file()


def test_an_eval_size_beyond_the_test_set_is_refused(tmp_path, capsys):
    err = bad_search(tmp_path, capsys, "--budget", "0.9", "--eval-size", "100000", *QUICK)
    assert "exceeds the 397 test images" in err


def test_an_interrupted_search_leaves_the_old_plan(good, tmp_path, capsys, monkeypatch):
    out = tmp_path / "plan.json"
    out.write_text(good.read_text())
    before = out.read_bytes()
    from rr_alloc import evidence

    def interrupted(session):
        raise KeyboardInterrupt

    monkeypatch.setattr(evidence, "profile", interrupted)
    code = main(["search", "--budget", "0.8", "--no-verify", "--allocator", "rr-greedy", *QUICK, "--out", str(out)])
    assert code == 130 and "error: interrupted" in capsys.readouterr().err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


def test_a_failing_profile_repair_replaces_nothing(good, tmp_path, capsys):
    out = tmp_path / "plan.json"
    out.write_text(good.read_text())
    before = out.read_bytes()
    args = ["search", "--budget", "0.9", "--profile-repair", "asr", "--no-verify", "--allocator", "rr-greedy"]
    assert "--profile-repair 'asr'" in refused(capsys, [*args, *QUICK, "--out", str(out)])
    assert out.read_bytes() == before


# --------------------------------------------------------------------------- patterns
@pytest.mark.parametrize(
    "pattern,words", [("1:3", "prunes nothing"), ("1:99999999999999999999", "prunes nothing"), (" 2:4", "must be N:M")]
)
def test_patterns_that_prune_nothing_or_are_malformed_are_one_line(tmp_path, capsys, pattern, words):
    assert words in bad_search(tmp_path, capsys, "--pattern", pattern, *QUICK)


@pytest.mark.parametrize(
    "flag", [("--allocator", "rr-greedy"), ("--reference", "lamp"), ("--unit", "flops"), ("--layer-weights", "uniform")]
)
def test_allocation_flags_beside_a_pattern_are_refused_not_ignored(tmp_path, capsys, flag):
    err = bad_search(tmp_path, capsys, "--pattern", "2:4", *QUICK, *flag)
    assert f"{flag[0]} does not apply with --pattern" in err and "--budget instead" in err


@pytest.mark.parametrize("suffix", ["db", "log"])
def test_zero_trials_on_a_new_storage_leaves_no_file(tmp_path, capsys, suffix):
    path = tmp_path / f"new.{suffix}"
    storage = f"sqlite:///{path}" if suffix == "db" else str(path)
    args = ["search", "--budget", "0.9", "--allocator", "optuna", "--n-trials", "0", "--storage", storage, *QUICK]
    assert "no Optuna study" in refused(capsys, [*args, "--out", str(tmp_path / "o" / "plan.json")])
    assert not path.exists() and not (tmp_path / "o").exists()


def test_an_error_after_a_progress_bar_starts_its_own_line(tmp_path):
    import subprocess

    code = (
        "import sys; from rr_alloc.system.progress import bar; from rr_alloc.cli import main\n"
        "b = bar(total=3, desc='x', disable=False); b.update(1); b.close()\n"
        "sys.exit(main(['search', '--budget', '2']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    assert any(line.startswith("error: ") for line in r.stderr.split("\n")), repr(r.stderr)


def test_a_cached_profile_of_the_wrong_shape_is_rebuilt(tmp_path, capsys, monkeypatch):
    from rr_alloc.profiling.store import ProfileCache

    monkeypatch.setenv("RR_ALLOC_CACHE", str(tmp_path / "cache"))
    args = ["search", "--budget", "0.9", "--allocator", "rr-greedy", "--no-verify", *QUICK]
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 0
    (entry,) = (tmp_path / "cache" / "profiles").glob("*.json")
    d = json.loads(entry.read_text())
    d["payload"]["d_raw"] = d["payload"]["d_raw"][:-1]  # one layer short, checksum made to match
    cache = ProfileCache(entry.parent)
    cache.put(entry.stem, d["payload"])
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "b.json")]) == 0
    assert "does not fit this run: rebuilding it" in capsys.readouterr().out


# ---------------------------------------------------------------- input that would be ignored
def test_search_flags_without_the_search_are_refused(tmp_path, capsys):
    rule = ("--budget", "0.9", "--allocator", "lamp")
    assert "--search-repair" in bad_search(tmp_path, capsys, *rule, "--search-repair", "bn")
    assert "--n-trials" in bad_search(tmp_path, capsys, "--budget", "0.9", "--n-trials", "3")  # the default reads none


def test_train_data_without_a_dataset_is_refused(tmp_path, capsys):
    assert "--dataset imagefolder" in bad_search(tmp_path, capsys, "--budget", "0.9", "--train-data", str(tmp_path))


@pytest.mark.parametrize(
    "text,key", [("transform: {mean: [0.5], std: [0.5]}\n", "transform"), ("download: true\n", "download")]
)
def test_config_keys_the_built_in_digits_would_ignore_are_refused(tmp_path, capsys, text, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    err = bad_search(tmp_path, capsys, "--budget", "0.9", "--config", str(cfg))
    assert f"config key {key!r} does not apply to the built-in digits" in err


@pytest.mark.parametrize(
    "text,words", [("budget: 0.5\n", "not a config key"), ("seed: 1\nseed: 2\n", "duplicate key 'seed'")]
)
def test_config_keys_that_would_be_ignored_are_refused(tmp_path, capsys, text, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert words in bad_search(tmp_path, capsys, "--budget", "0.9", "--config", str(cfg))


# ------------------------------------------------------------ inputs never become outputs
def test_search_refuses_to_write_over_its_checkpoint_config_or_images(tmp_path, capsys):

    from rr_alloc.models import build_model

    ck = tmp_path / "ck.pt"
    torch.save(build_model("cifar_resnet20").state_dict(), ck)
    before = ck.read_bytes()
    err = refused(
        capsys, ["search", "--budget", "0.9", "--model", "cifar_resnet20", "--checkpoint", str(ck), "--out", str(ck)]
    )
    assert "is the input" in err and ck.read_bytes() == before
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 1\n")
    assert "is the input" in refused(capsys, ["search", "--budget", "0.9", "--config", str(cfg), "--out", str(cfg)])
    data = image_folder(tmp_path / "data", per_class=2)
    args = [
        "search",
        "--budget",
        "0.9",
        "--model",
        "cifar_resnet20",
        "--dataset",
        "imagefolder",
        "--train-data",
        str(data),
        "--test-data",
        str(data),
        "--out",
        str(data / "class0" / "plan.json"),
    ]
    assert "inside the input folder" in refused(capsys, args)


def test_pretrained_for_a_zoo_model_without_weights_and_classes_for_the_digits_are_refused(tmp_path, capsys):
    assert "no downloadable weights" in bad_search(
        tmp_path, capsys, "--budget", "0.9", "--model", "cifar_resnet20", "--pretrained"
    )
    assert "10 classes" in bad_search(tmp_path, capsys, "--budget", "0.9", "--num-classes", "3")


@pytest.mark.parametrize("where", ["under-file", "under-proc"])
def test_unwritable_cache_fails_before_work(tmp_path, capsys, monkeypatch, where):
    monkeypatch.setenv("RR_ALLOC_CACHE", str(unwritable(tmp_path, where)))
    err = bad_search(tmp_path, capsys, "--budget", "0.9")
    assert "RR_ALLOC_CACHE" in err


@pytest.mark.parametrize("flag,pattern", [("--include", "layer3.*"), ("--exclude", "fc"), ("--exclude", "Linear")])
def test_a_layer_pattern_that_matches_no_layer_is_refused_naming_it(tmp_path, capsys, flag, pattern):
    err = bad_search(tmp_path, capsys, "--budget", "0.9", *QUICK, flag, "layer1.*", pattern)
    assert f"{flag} pattern {pattern!r} (" in err and "matches no prunable layer" in err and "layer1.0.conv1" in err


# --------------------------------------------------------------------------- commands
@pytest.mark.parametrize("flag,values", [("--budgets", ["0.9", "0.9"]), ("--allocators", ["global", "global"])])
def test_compare_refuses_repeated_values_before_writing(tmp_path, capsys, flag, values):
    args = ["compare", flag, *values, *QUICK, "--out-dir", str(tmp_path / "c")]
    if flag == "--allocators":
        args[1:1] = ["--budgets", "0.9"]
    assert "twice" in refused(capsys, args)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--pattern", "2:4"], "--pattern does not apply to compare"),
        (["--allocator", "lamp"], "--allocator does not apply to compare"),
        (["--reference", "lamp"], "--reference does not apply to compare"),
        (["--repair", "bn", "--repairs", "bn>naive@block+logits"], "--repair is the default of --repairs"),
        (["--budget", "0.9"], "unrecognized arguments: --budget"),  # no prefix of --budgets
        (["--out", "x"], "unrecognized arguments: --out"),  # no prefix of --out-dir
    ],
)
def test_compare_refuses_flags_it_would_ignore_or_guess(tmp_path, capsys, extra, words):
    args = ["compare", "--budgets", "0.8", *QUICK, "--out-dir", str(tmp_path / "c"), *extra]
    assert words in refused(capsys, args) and not (tmp_path / "c").exists()
